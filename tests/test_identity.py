"""Pure core: building, validating and reading pod identities (no sockets)."""

from __future__ import annotations

import pytest

from grpc_balance_mw import (
    POD_HEADER,
    POD_IP_HEADER,
    ConfigurationError,
    MalformedPodHeader,
    PodIdentity,
    pod_from_metadata,
)
from grpc_balance_mw.identity import merge_identity


def test_from_env_reads_the_downward_api() -> None:
    identity = PodIdentity.from_env(
        {"POD_NAME": "cp-1", "POD_IP": "10.1.2.3", "POD_NAMESPACE": "ev", "HOSTNAME": "other"}
    )
    assert identity == PodIdentity("cp-1", "10.1.2.3", "ev")


def test_from_env_falls_back_to_hostname() -> None:
    assert PodIdentity.from_env({"HOSTNAME": "cp-7"}).name == "cp-7"


def test_from_env_without_a_name_says_what_to_set() -> None:
    with pytest.raises(ConfigurationError, match="POD_NAME"):
        PodIdentity.from_env({})


@pytest.mark.parametrize(
    ("name", "ip", "namespace"),
    [
        ("", None, None),
        (" cp-1", None, None),
        ("cp\n1", None, None),
        ("cp-é", None, None),
        ("x" * 254, None, None),
        ("cp-1", "not-an-ip", None),
        ("cp-1", None, ""),
    ],
)
def test_invalid_identity_fails_at_construction(
    name: str, ip: str | None, namespace: str | None
) -> None:
    with pytest.raises(ConfigurationError):
        PodIdentity(name, ip, namespace)


def test_opaque_is_stable_keyed_and_hides_everything() -> None:
    real = PodIdentity("cp-1", "10.1.2.3", "ev")
    opaque = real.to_opaque("k1")
    assert opaque == PodIdentity("cp-1", "10.9.9.9", "ev").to_opaque("k1")  # IP changes on restart
    assert opaque != real.to_opaque("k2")
    assert opaque != PodIdentity("cp-2", "10.1.2.3", "ev").to_opaque("k1")
    assert opaque.ip is None and opaque.namespace is None and opaque.opaque
    assert all("cp-1" not in v and "10.1.2.3" not in v for _, v in opaque.to_metadata())
    with pytest.raises(ConfigurationError):
        real.to_opaque("")


def test_opaque_from_env_key() -> None:
    env = {"POD_NAME": "cp-1", "GRPC_BALANCE_POD_KEY": "secret"}
    assert PodIdentity.from_env(env) == PodIdentity("cp-1").to_opaque("secret")


def test_round_trip_through_metadata() -> None:
    identity = PodIdentity("cp-1", "fd00::1", "ev")
    assert pod_from_metadata(identity.to_metadata()) == identity
    assert pod_from_metadata([("other", "x")]) is None
    assert pod_from_metadata(None) is None


@pytest.mark.parametrize(
    "metadata",
    [
        [(POD_HEADER, "")],
        [(POD_HEADER, b"cp-1")],
        [(POD_HEADER, "cp-1"), (POD_HEADER, "cp-2")],
        [(POD_HEADER, "cp-1"), (POD_IP_HEADER, "300.1.1.1")],
        [(POD_HEADER, "cp\x7f")],
    ],
)
def test_malformed_metadata_is_a_clear_error(metadata: list[tuple[str, object]]) -> None:
    with pytest.raises(MalformedPodHeader) as info:
        pod_from_metadata(metadata)  # type: ignore[arg-type]
    assert info.value.header in (POD_HEADER, POD_IP_HEADER)


def test_repeated_identical_header_is_accepted() -> None:
    assert pod_from_metadata([(POD_HEADER, "cp-1"), (POD_HEADER, "cp-1")]) == PodIdentity("cp-1")


def test_merge_replaces_spoofed_identity_and_keeps_the_rest() -> None:
    stamp = PodIdentity("cp-1").to_metadata()
    merged = merge_identity([("x-user", "1"), (POD_HEADER, "spoof")], stamp)
    assert merged == (("x-user", "1"), (POD_HEADER, "cp-1"))
