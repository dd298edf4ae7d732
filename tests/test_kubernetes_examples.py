"""The Kubernetes manifests in examples/kubernetes: valid against the Kubernetes schemas
(kubernetes-validate, strict: an unknown or misspelt field fails), the Istio DestinationRule
against the structure of Istio's API, and the details the README promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

EXAMPLES = Path(__file__).parent.parent / "examples" / "kubernetes"
KUBERNETES_VERSION = "1.28.0"  # gRPC probes are GA since 1.27; kubernetes-validate 1.28 knows it


def _documents() -> dict[str, dict[str, Any]]:
    documents = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[f"{path.name}:{document['kind']}"] = document
    return documents


DOCUMENTS = _documents()
KUBERNETES = {name: doc for name, doc in DOCUMENTS.items() if "istio.io" not in doc["apiVersion"]}


def test_every_manifest_is_checked() -> None:
    assert set(KUBERNETES) == {
        "deployment.yaml:Deployment",
        "service-clusterip.yaml:Service",
        "service-headless.yaml:Service",
    }
    assert set(DOCUMENTS) - set(KUBERNETES) == {"istio-destinationrule.yaml:DestinationRule"}


@pytest.mark.parametrize("name", sorted(KUBERNETES))
def test_the_manifest_is_valid_kubernetes(name: str) -> None:
    kubernetes_validate.validate(KUBERNETES[name], KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_would_be_caught() -> None:
    broken = yaml.safe_load((EXAMPLES / "service-headless.yaml").read_text())
    broken["spec"]["clusterIp"] = broken["spec"].pop("clusterIP")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_pods_get_their_identity_and_grpc_health_probes() -> None:
    container = KUBERNETES["deployment.yaml:Deployment"]["spec"]["template"]["spec"]["containers"][
        0
    ]
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in container["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_IP": "status.podIP",
        "POD_NAMESPACE": "metadata.namespace",
    }
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["livenessProbe"]["grpc"]["port"] == 50051


def test_the_headless_service_is_headless_and_dialled_on_the_pod_port() -> None:
    headless = KUBERNETES["service-headless.yaml:Service"]["spec"]
    clusterip = KUBERNETES["service-clusterip.yaml:Service"]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["ports"][0]["port"] == headless["ports"][0]["targetPort"] == 50051
    # The gotcha the comments warn about: the ClusterIP Service's port is not the pods' port.
    assert clusterip["ports"][0]["port"] != 50051
    assert clusterip["sessionAffinity"] == "None"


#: The part of Istio's networking.istio.io DestinationRule API the example uses; unknown
#: fields are refused, as istioctl's validation refuses them.
_LOAD_BALANCERS = [
    "UNSPECIFIED",
    "RANDOM",
    "PASSTHROUGH",
    "ROUND_ROBIN",
    "LEAST_REQUEST",
    "LEAST_CONN",
]
DESTINATION_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"enum": ["networking.istio.io/v1", "networking.istio.io/v1beta1"]},
        "kind": {"const": "DestinationRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["host"],
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string", "minLength": 1},
                "trafficPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "loadBalancer": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"simple": {"enum": _LOAD_BALANCERS}},
                        },
                        "connectionPool": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "http": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "http2MaxRequests": {"type": "integer", "minimum": 1},
                                        "maxRequestsPerConnection": {
                                            "type": "integer",
                                            "minimum": 0,
                                        },
                                    },
                                }
                            },
                        },
                        "outlierDetection": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "consecutive5xxErrors": {"type": "integer", "minimum": 0},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "baseEjectionTime": {
                                    "type": "string",
                                    "pattern": "^[0-9]+(ms|s|m|h)$",
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_the_istio_destination_rule_has_istios_structure() -> None:
    rule = DOCUMENTS["istio-destinationrule.yaml:DestinationRule"]
    jsonschema.validate(rule, DESTINATION_RULE)
    policy = rule["spec"]["trafficPolicy"]
    assert policy["loadBalancer"]["simple"] == "LEAST_REQUEST"
    assert policy["connectionPool"]["http"]["maxRequestsPerConnection"] > 0
    assert rule["spec"]["host"] == "charge-points.ev.svc.cluster.local"
    misspelt = {**rule, "spec": {**rule["spec"], "trafficPolicy": {"loadbalancer": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, DESTINATION_RULE)


def test_the_termination_grace_period_outlasts_the_drain_and_the_graceful_stop() -> None:
    spec = KUBERNETES["deployment.yaml:Deployment"]["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    drain_s = float(args[args.index("--drain-s") + 1])
    grace_s = float(args[args.index("--grace-s") + 1])
    pre_stop = spec["containers"][0].get("lifecycle", {}).get("preStop")
    assert pre_stop is None  # the app drains on SIGTERM itself; a preStop sleep would add to it
    assert drain_s > 5 + 1 + 1  # the clients' health interval, a check and its grace
    assert spec["terminationGracePeriodSeconds"] > drain_s + grace_s
