"""The Kubernetes manifests in examples/kubernetes: valid against the Kubernetes schemas
(kubernetes-validate, strict: an unknown or misspelt field fails), passing checkov's Kubernetes
checks (each skip with its reason), the Istio DestinationRule against the structure of Istio's
API, and the details the README and docs/draining.md promise: the stop's arithmetic, probes
that survive a slow answer and a drain, a disruption budget."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import require

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples" / "kubernetes"
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
        "networkpolicy.yaml:NetworkPolicy",
        "poddisruptionbudget.yaml:PodDisruptionBudget",
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


POD = KUBERNETES["deployment.yaml:Deployment"]["spec"]["template"]
CONTAINER = POD["spec"]["containers"][0]


def _arg(name: str) -> float:
    args = CONTAINER["args"]
    return float(args[args.index(name) + 1])


def _pre_stop_s() -> float:
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return float(command[1])


def test_the_termination_grace_period_outlasts_pre_stop_drain_and_graceful_stop() -> None:
    drain_s, grace_s, pre_stop_s = _arg("--drain-s"), _arg("--grace-s"), _pre_stop_s()
    assert pre_stop_s > 0  # the endpoints change reaches kube-proxy and DNS before the drain
    assert drain_s > 5 + 1 + 1  # the clients' health interval, a check and its grace
    # The kubelet counts terminationGracePeriodSeconds from the start of the preStop hook.
    assert POD["spec"]["terminationGracePeriodSeconds"] > pre_stop_s + drain_s + grace_s


def test_readiness_tolerates_a_slow_probe_and_liveness_a_drain() -> None:
    readiness, liveness = CONTAINER["readinessProbe"], CONTAINER["livenessProbe"]
    assert readiness["grpc"]["service"] == "chargepoints.v1.ChargePoints"
    assert readiness["failureThreshold"] >= 2  # one slow or lost answer keeps the pod in
    assert readiness["timeoutSeconds"] > 1  # Kubernetes' default of 1 s, on a busy node
    # The drain answers NOT_SERVING for "" too, so liveness fails while the pod drains: the
    # failures it needs, counted from the first, must outlast the drain and the graceful stop.
    failing_s = (liveness["failureThreshold"] - 1) * liveness["periodSeconds"]
    assert failing_s >= _arg("--drain-s") + _arg("--grace-s")
    assert liveness["timeoutSeconds"] > 1


def _selects_the_pods(selector: dict[str, Any]) -> bool:
    labels = POD["metadata"]["labels"]
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def test_the_disruption_budget_and_the_network_policy_cover_the_pods() -> None:
    budget = KUBERNETES["poddisruptionbudget.yaml:PodDisruptionBudget"]["spec"]
    deployment = KUBERNETES["deployment.yaml:Deployment"]["spec"]
    assert _selects_the_pods(budget["selector"])
    assert 1 <= budget["maxUnavailable"] < deployment["replicas"]
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    policy = KUBERNETES["networkpolicy.yaml:NetworkPolicy"]["spec"]
    assert _selects_the_pods(policy["podSelector"])
    [rule] = policy["ingress"]
    assert [port["port"] for port in rule["ports"]] == [CONTAINER["ports"][0]["name"]]


#: checkov reads a Kubernetes skip from an annotation ``checkov.io/skipN: CKV_K8S_xx=reason``
#: and splits it at "=": a second "=" in the reason would break its parser.
SKIP = re.compile(r"^(CKV2?_K8S_\d+)=([^=]{20,})$")


def _skips() -> dict[str, str]:
    skips = {}
    for name, document in KUBERNETES.items():
        for key, value in document["metadata"].get("annotations", {}).items():
            if key.startswith(("checkov.io/skip", "bridgecrew.io/skip")):
                match = SKIP.match(value)
                assert match, f"{name}: {key} has no reason (CKV_K8S_xx=why): {value!r}"
                skips[match[1]] = match[2]
    return skips


def test_every_checkov_skip_carries_a_reason() -> None:
    # Only the image digest: the image is a placeholder. (checkov's inline comment form,
    # "# checkov:skip=ID:reason", is not read for Kubernetes manifests.)
    assert set(_skips()) == {"CKV_K8S_43"}


def _checkov() -> str | None:
    installed = ROOT / ".venv-checkov" / "bin" / "checkov"
    return str(installed) if installed.exists() else shutil.which("checkov")


def _run_checkov(directory: Path) -> tuple[int, dict[str, Any]]:
    checkov = _checkov()
    require(checkov is not None, "checkov (bash scripts/setup_checkov.sh)")
    assert checkov is not None
    # --skip-download: no call to checkov's platform for guidelines (CI has no network).
    command = [checkov, "-d", str(directory), "--framework", "kubernetes", "--compact"]
    command += ["--skip-download", "--output", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
def test_checkov_passes_on_the_manifests() -> None:
    returncode, report = _run_checkov(EXAMPLES)
    results, summary = report["results"], report["summary"]
    failed = [(check["check_id"], check["resource"]) for check in results["failed_checks"]]
    assert failed == []
    assert returncode == 0
    assert summary["parsing_errors"] == 0
    # It checked what it should: nothing skipped over unread.
    assert {check["resource"] for check in results["passed_checks"]} >= {
        "Deployment.ev.charge-points",
        "Pod.ev.charge-points.app-charge-points",  # the NetworkPolicy check, on the pod
        "Service.ev.charge-points",
        "Service.ev.charge-points-headless",
    }
    skipped = {
        check["check_id"]: check["check_result"]["suppress_comment"]
        for check in results["skipped_checks"]
    }
    assert skipped == _skips()


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
def test_checkov_would_catch_a_container_that_may_escalate(tmp_path: Path) -> None:
    broken = yaml.safe_load((EXAMPLES / "deployment.yaml").read_text())
    del broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(broken))
    returncode, report = _run_checkov(tmp_path)
    failed = {check["check_id"] for check in report["results"]["failed_checks"]}
    assert returncode == 1
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28"} <= failed
