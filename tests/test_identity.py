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
from grpc_balance_mw.identity import MIN_OPAQUE_KEY_BYTES, check_opaque_key, merge_identity


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


KEY_1 = "k1-0123456789abcdef"
KEY_2 = b"k2-0123456789abcdef"


def test_opaque_is_stable_keyed_and_hides_everything() -> None:
    real = PodIdentity("cp-1", "10.1.2.3", "ev")
    opaque = real.to_opaque(KEY_1)
    assert opaque == PodIdentity("cp-1", "10.9.9.9", "ev").to_opaque(KEY_1)  # IP changes on restart
    assert opaque == real.to_opaque(KEY_1.encode())  # a str key is its UTF-8 bytes
    assert opaque != real.to_opaque(KEY_2)
    assert opaque != PodIdentity("cp-2", "10.1.2.3", "ev").to_opaque(KEY_1)
    assert opaque.ip is None and opaque.namespace is None and opaque.opaque
    assert all("cp-1" not in v and "10.1.2.3" not in v for _, v in opaque.to_metadata())


@pytest.mark.parametrize(
    "key",
    [
        "",
        b"",
        " " * 20,
        "\t\n" * 10,
        b" " * 20,
        "k",
        "x" * (MIN_OPAQUE_KEY_BYTES - 1),
        b"x" * (MIN_OPAQUE_KEY_BYTES - 1),
        "0123456789abcdef\n",  # read from a file with its newline
        42,
        4.2,
        bytearray(b"x" * 20),
        None,
    ],
    ids=repr,
)
def test_an_opaque_key_that_is_not_a_usable_key_is_a_configuration_error(key: object) -> None:
    real = PodIdentity("cp-1", "10.1.2.3", "ev")
    with pytest.raises(ConfigurationError):
        real.to_opaque(key)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        check_opaque_key(key)
    if key is not None:
        with pytest.raises(ConfigurationError):
            PodIdentity.from_env({"POD_NAME": "cp-1"}, opaque_key=key)  # type: ignore[arg-type]


def test_a_key_of_the_minimum_length_is_accepted() -> None:
    key = "x" * MIN_OPAQUE_KEY_BYTES
    assert check_opaque_key(key) == key.encode()
    assert PodIdentity("cp-1").to_opaque(key).opaque


def test_opaque_from_env_key() -> None:
    env = {"POD_NAME": "cp-1", "GRPC_BALANCE_POD_KEY": KEY_1}
    assert PodIdentity.from_env(env) == PodIdentity("cp-1").to_opaque(KEY_1)


@pytest.mark.parametrize("key", ["", "   ", "short"])
def test_opaque_mode_asked_for_in_the_environment_never_falls_back(key: str) -> None:
    # GRPC_BALANCE_POD_KEY='' once turned opaque mode off and sent the real name and IP.
    env = {"POD_NAME": "cp-1", "POD_IP": "10.1.2.3", "GRPC_BALANCE_POD_KEY": key}
    with pytest.raises(ConfigurationError):
        PodIdentity.from_env(env)


def test_without_the_variable_the_identity_is_real() -> None:
    env = {"POD_NAME": "cp-1", "POD_IP": "10.1.2.3"}
    assert PodIdentity.from_env(env) == PodIdentity("cp-1", "10.1.2.3")


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
