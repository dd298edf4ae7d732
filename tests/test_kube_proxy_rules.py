"""kube-proxy's iptables rules as rendered text: the pure core, no namespace, no sockets."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.testing.kube_proxy import (
    DEFAULT_AFFINITY_TIMEOUT_S,
    ServicePort,
    chain_hash,
    endpoint_addresses,
    pick_chances,
    probability,
    render,
    saved_probability,
)

PODS = (("10.244.1.7", 8080), ("10.244.2.9", 8080), ("10.244.3.4", 8080))


def service(endpoints: tuple[tuple[str, int], ...] = PODS, **kwargs: object) -> ServicePort:
    fields: dict[str, object] = {
        "name": "charge-points",
        "namespace": "ev",
        "cluster_ip": "10.96.0.10",
        "port": 80,
        "endpoints": endpoints,
    }
    fields.update(kwargs)
    return ServicePort(**fields)  # type: ignore[arg-type]


def chain(text: str, name: str) -> list[str]:
    """The ``-A name ...`` rules of one chain, in order."""
    return [line for line in text.splitlines() if line.startswith(f"-A {name} ")]


def declared(text: str) -> list[str]:
    return [line[1:].split()[0] for line in text.splitlines() if line.startswith(":")]


def probabilities(rules: list[str]) -> list[float]:
    """Each rule's statistic probability; a rule without one always matches."""
    found = (re.search(r"--probability (\S+)", rule) for rule in rules)
    return [float(m.group(1)) if m else 1.0 for m in found]


# Chain names seen in `iptables-save` on real clusters (kubeadm, minikube, EKS).
@pytest.mark.parametrize(
    ("service_port_name", "protocol", "expected"),
    [
        ("default/kubernetes:https", "tcp", "NPX46M4PTMTKRN6Y"),
        ("kube-system/kube-dns:dns", "udp", "TCOU7JCQXEZGVUNU"),
        ("kube-system/kube-dns:dns-tcp", "tcp", "ERIFXISQEP7F7OF4"),
        ("kube-system/kube-dns:metrics", "tcp", "JD5MR3NA4I4DYORP"),
    ],
)
def test_service_chain_hash_matches_real_clusters(
    service_port_name: str, protocol: str, expected: str
) -> None:
    assert chain_hash(service_port_name, protocol) == expected


def test_chain_names_match_real_clusters() -> None:
    api = ServicePort(name="kubernetes", namespace="default", cluster_ip="10.96.0.1", port=443,
                      port_name="https")  # fmt: skip
    assert api.port_name_string == "default/kubernetes:https"
    assert api.svc_chain == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    assert api.sep_chain(("192.168.49.2", 8443)) == "KUBE-SEP-VPILYQBSPPXYB66K"
    assert api.sep_chain(("172.31.14.42", 443)) == "KUBE-SEP-A7FK4LHINPNK7Q5J"
    # iptables limits chain names to 28 characters.
    assert len(api.svc_chain) <= 28 and len(api.sep_chain(("1.2.3.4", 5))) <= 28


def test_probabilities_are_printed_as_kube_proxy_and_iptables_save_print_them() -> None:
    assert [probability(n) for n in (2, 3, 4)] == ["0.5000000000", "0.3333333333", "0.2500000000"]
    assert saved_probability(3) == "0.33333333349"
    assert saved_probability(2) == "0.50000000000"
    assert saved_probability(4) == "0.25000000000"


@pytest.mark.parametrize("n", range(1, 12))
def test_one_over_n_minus_i_gives_every_endpoint_the_same_chance(n: int) -> None:
    endpoints = tuple((f"10.244.0.{i + 1}", 8080) for i in range(n))
    svc = service(endpoints)
    rules = chain(render([svc]), svc.svc_chain)
    assert len(rules) == n
    assert "statistic" not in rules[-1]  # the last endpoint takes whatever is left
    written = probabilities(rules)
    assert pick_chances(written) == pytest.approx([1 / n] * n, abs=1e-9)
    # The kernel keeps a 31-bit fraction; what it really applies is still uniform.
    saved = [float(saved_probability(n - i)) for i in range(n - 1)] + [1.0]
    assert pick_chances(saved) == pytest.approx([1 / n] * n, abs=1e-8)


def test_pick_chances_tells_a_naive_one_over_n_chain_apart() -> None:
    """1/n on every rule would favour the first endpoints; the check above would catch it."""
    naive = pick_chances([1 / 3, 1 / 3, 1.0])
    assert naive == pytest.approx([1 / 3, 2 / 9, 4 / 9])
    assert naive != pytest.approx([1 / 3] * 3, abs=1e-3)


def test_rules_have_kube_proxys_shape() -> None:
    svc = service()
    text = render([svc])
    assert '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in text
    assert chain(text, "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -m comment --comment "ev/charge-points cluster IP" -m tcp -p tcp'
        f" -d 10.96.0.10/32 --dport 80 -j {svc.svc_chain}"
    ]
    seps = [svc.sep_chain(ep) for ep in PODS]
    assert chain(text, svc.svc_chain) == [
        f'-A {svc.svc_chain} -m comment --comment "ev/charge-points -> 10.244.1.7:8080"'
        f" -m statistic --mode random --probability 0.3333333333 -j {seps[0]}",
        f'-A {svc.svc_chain} -m comment --comment "ev/charge-points -> 10.244.2.9:8080"'
        f" -m statistic --mode random --probability 0.5000000000 -j {seps[1]}",
        f'-A {svc.svc_chain} -m comment --comment "ev/charge-points -> 10.244.3.4:8080"'
        f" -j {seps[2]}",
    ]
    assert chain(text, seps[0]) == [
        f"-A {seps[0]} -m comment --comment ev/charge-points -s 10.244.1.7/32 -j KUBE-MARK-MASQ",
        f"-A {seps[0]} -m comment --comment ev/charge-points -m tcp -p tcp"
        " -j DNAT --to-destination 10.244.1.7:8080",
    ]
    assert "recent" not in text


def test_every_jump_target_is_declared_before_use() -> None:
    text = render([service(), service(name="billing", cluster_ip="10.96.0.11")])
    nat = text[text.index("*nat") :]
    names = set(declared(nat))
    targets = set(re.findall(r"-j (KUBE-[A-Z0-9-]+)", nat))
    assert targets <= names
    assert len([n for n in names if n.startswith("KUBE-SVC-")]) == 2
    assert len([n for n in names if n.startswith("KUBE-SEP-")]) == 6
    assert text.count("COMMIT") == 2


def test_endpoint_order_does_not_change_the_rules_and_duplicates_count_once() -> None:
    shuffled = (PODS[2], PODS[0], PODS[1], PODS[0])
    assert render([service(shuffled)]) == render([service(PODS)])


def test_no_endpoints_rejects_in_the_filter_table_and_has_no_service_chain() -> None:
    svc = service(())
    text = render([svc])
    filter_table, nat_table = text.split("*nat")
    assert (
        '-A KUBE-SERVICES -m comment --comment "ev/charge-points has no endpoints"'
        " -m tcp -p tcp -d 10.96.0.10/32 --dport 80 -j REJECT --reject-with tcp-reset"
    ) in filter_table
    assert "KUBE-SVC-" not in nat_table and "KUBE-SEP-" not in nat_table
    assert chain(nat_table, "KUBE-SERVICES") == []


def test_client_ip_affinity_checks_recent_before_the_random_pick() -> None:
    svc = service(session_affinity="ClientIP", affinity_timeout_s=600)
    text = render([svc])
    rules = chain(text, svc.svc_chain)
    seps = [svc.sep_chain(ep) for ep in PODS]
    sticky, random_pick = rules[:3], rules[3:]
    assert sticky == [
        f'-A {svc.svc_chain} -m comment --comment "ev/charge-points -> {ip}:{port}"'
        f" -m recent --name {sep} --rcheck --seconds 600 --reap -j {sep}"
        for (ip, port), sep in zip(PODS, seps, strict=True)
    ]
    assert pick_chances(probabilities(random_pick)) == pytest.approx([1 / 3] * 3)
    for (ip, port), sep in zip(PODS, seps, strict=True):
        assert chain(text, sep)[-1] == (
            f"-A {sep} -m comment --comment ev/charge-points -m recent --name {sep} --set"
            f" -m tcp -p tcp -j DNAT --to-destination {ip}:{port}"
        )


def test_client_ip_timeout_defaults_to_three_hours() -> None:
    text = render([service(session_affinity="ClientIP")])
    assert DEFAULT_AFFINITY_TIMEOUT_S == 10800
    assert text.count("--rcheck --seconds 10800 --reap") == 3


def test_invalid_service_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        service(session_affinity="None")
    with pytest.raises(ConfigurationError):
        service(port=0)


@dataclass(frozen=True)
class Endpoint:
    name: str
    ip: str
    port: int


def test_endpoints_are_tuples_or_endpoint_objects() -> None:
    given = [("10.244.1.7", 8080), Endpoint("cp-1", "10.244.2.9", 8080)]
    assert endpoint_addresses(given) == (("10.244.1.7", 8080), ("10.244.2.9", 8080))
