"""Pod identity: which headers a serving pod stamps, and how both sides build and read them.

The header names below are the one place both halves agree on: the server middleware writes them
and the client interceptors read them. Pure code, no gRPC I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from grpc_balance_mw.errors import ConfigurationError, MalformedPodHeader

#: The serving pod's name (or its opaque id in opaque mode). Always present when stamped.
POD_HEADER = "x-balance-pod"
#: The serving pod's IP; never sent in opaque mode.
POD_IP_HEADER = "x-balance-pod-ip"
#: The serving pod's namespace; never sent in opaque mode.
POD_NAMESPACE_HEADER = "x-balance-pod-namespace"
IDENTITY_HEADERS = (POD_HEADER, POD_IP_HEADER, POD_NAMESPACE_HEADER)
#: The headers a client reads the serving pod's name from, by default: this package's own.
DEFAULT_POD_HEADERS = (POD_HEADER,)
#: Names a response header can have (gRPC metadata keys: lower case; ``-bin`` values are bytes).
_HEADER_NAME = re.compile(r"^[0-9a-z_.-]+$")

#: A Kubernetes object name is a DNS subdomain: at most 253 characters.
MAX_VALUE_LENGTH = 253
#: Environment variable the opaque mode reads its key from when none is given.
OPAQUE_KEY_ENV = "GRPC_BALANCE_POD_KEY"
#: The shortest opaque key accepted, in bytes: a short key is found by brute force from one
#: opaque id and a guessed pod name (3 characters took 0.03 s). 16 random bytes (e.g.
#: ``openssl rand -hex 16``) put that search out of reach.
MIN_OPAQUE_KEY_BYTES = 16
_OPAQUE_PREFIX = "pod-"

Metadata = Iterable[tuple[str, str | bytes]]


def check_opaque_key(key: object) -> bytes:
    """The HMAC key of opaque mode as bytes, or ConfigurationError if it is not a usable key.

    A key is a str (UTF-8 encoded) or bytes of at least :data:`MIN_OPAQUE_KEY_BYTES` bytes,
    not blank, without blanks at either end (a key read with its trailing newline on some
    replicas and without it on others would give the same pod two ids).
    """
    if isinstance(key, str):
        raw = key.encode()
    elif isinstance(key, bytes):
        raw = key
    else:
        raise ConfigurationError(
            f"opaque pod identity needs a str or bytes key, got {type(key).__name__}"
        )
    if not raw.strip():
        raise ConfigurationError("opaque pod identity needs a non-empty key, not blank")
    if raw != raw.strip():
        raise ConfigurationError("the opaque key has leading or trailing whitespace")
    if len(raw) < MIN_OPAQUE_KEY_BYTES:
        raise ConfigurationError(
            f"the opaque key is {len(raw)} bytes; it needs {MIN_OPAQUE_KEY_BYTES} or more "
            "(e.g. openssl rand -hex 16)"
        )
    return raw


def check_value(header: str, value: object) -> str:
    """Return ``value`` if it can be sent as the ``header`` metadata value, else raise.

    gRPC ASCII metadata values are printable ASCII (0x20-0x7E); an identity also may not be empty
    or have blanks at either end, so that a value always compares equal to itself once parsed.
    """
    if not isinstance(value, str):
        raise MalformedPodHeader(header, value, f"expected str, got {type(value).__name__}")
    if not value:
        raise MalformedPodHeader(header, value, "empty")
    if len(value) > MAX_VALUE_LENGTH:
        raise MalformedPodHeader(header, value, f"longer than {MAX_VALUE_LENGTH} characters")
    if value != value.strip():
        raise MalformedPodHeader(header, value, "leading or trailing whitespace")
    bad = next((c for c in value if not 0x20 <= ord(c) <= 0x7E), None)
    if bad is not None:
        raise MalformedPodHeader(header, value, f"character {bad!r} is not printable ASCII")
    return value


@dataclass(frozen=True)
class PodIdentity:
    """Who a serving pod says it is.

    Attributes:
        name: the pod name, or in opaque mode a stable keyed hash of namespace/name.
        ip: the pod IP, when known and not opaque.
        namespace: the pod namespace, when known and not opaque.
        opaque: whether ``name`` is a keyed hash rather than the real pod name.
    """

    name: str
    ip: str | None = None
    namespace: str | None = None
    opaque: bool = False

    def __post_init__(self) -> None:
        try:
            check_value(POD_HEADER, self.name)
            if self.ip is not None:
                check_value(POD_IP_HEADER, self.ip)
                ipaddress.ip_address(self.ip)
            if self.namespace is not None:
                check_value(POD_NAMESPACE_HEADER, self.namespace)
        except ValueError as exc:  # MalformedPodHeader, or ipaddress's ValueError
            raise ConfigurationError(f"invalid pod identity: {exc}") from exc

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        opaque_key: str | bytes | None = None,
    ) -> PodIdentity:
        """Read the identity the Kubernetes downward API puts in the environment.

        ``POD_NAME`` (``HOSTNAME`` as a fallback: it is the pod name unless the pod sets
        ``hostname``), ``POD_IP`` and ``POD_NAMESPACE``. With ``opaque_key``, or when the
        ``GRPC_BALANCE_POD_KEY`` variable is set at all, the result is opaque: a variable set to
        an empty or short key raises rather than send the real identity.

        Raises:
            ConfigurationError: no name can be found, a value is not valid metadata, or the
                opaque key is not a usable key (see :func:`check_opaque_key`).
        """
        env = os.environ if environ is None else environ
        name = env.get("POD_NAME") or env.get("HOSTNAME")
        if not name:
            raise ConfigurationError(
                "no pod identity: set POD_NAME from the downward API "
                "(env: - name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}), "
                "or HOSTNAME, or pass a PodIdentity explicitly"
            )
        identity = cls(
            name=name,
            ip=env.get("POD_IP") or None,
            namespace=env.get("POD_NAMESPACE") or None,
        )
        key = opaque_key if opaque_key is not None else env.get(OPAQUE_KEY_ENV)
        # Opaque mode asked for (the argument, or the variable even if empty) never falls back.
        return identity.to_opaque(key) if key is not None else identity

    def to_opaque(self, key: str | bytes) -> PodIdentity:
        """Return the identity as a stable keyed hash that reveals neither name, IP nor namespace.

        The same key and the same namespace/name give the same id on every restart and replica
        of the server, so clients can still tell pods apart and count them.

        Raises:
            ConfigurationError: ``key`` is not a usable key (see :func:`check_opaque_key`).
        """
        raw_key = check_opaque_key(key)
        if self.opaque:
            return self
        digest = hmac.new(raw_key, f"{self.namespace or ''}/{self.name}".encode(), hashlib.sha256)
        return PodIdentity(name=_OPAQUE_PREFIX + digest.hexdigest()[:16], opaque=True)

    def to_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata pairs a server stamps on its responses."""
        pairs = [(POD_HEADER, self.name)]
        if self.ip is not None:
            pairs.append((POD_IP_HEADER, self.ip))
        if self.namespace is not None:
            pairs.append((POD_NAMESPACE_HEADER, self.namespace))
        return tuple(pairs)

    def __str__(self) -> str:
        return self.name


def merge_identity(
    metadata: Metadata | None, stamp: tuple[tuple[str, str | bytes], ...]
) -> tuple[tuple[str, str | bytes], ...]:
    """Add the identity pairs to ``metadata``, replacing any identity headers already there.

    The identity is authoritative: a handler cannot spoof another pod's name by setting the header.
    """
    kept = tuple((k, v) for k, v in metadata or () if k.lower() not in IDENTITY_HEADERS)
    return kept + stamp


def check_pod_headers(headers: object) -> tuple[str, ...]:
    """The response headers to read the pod's name from, in order, checked.

    A fleet that already returns its pod name in a header of its own (``x-pod-name``, say) is
    read as it is: ``("x-pod-name",)``, or ``("x-balance-pod", "x-pod-name")`` while servers
    move to the server half. The first header present in a response names the pod.

    Raises:
        ConfigurationError: not a non-empty sequence of distinct metadata keys (lower case,
            no ``grpc-`` prefix, no ``-bin`` suffix: a pod name is text).
    """
    if isinstance(headers, str | bytes) or not isinstance(headers, tuple | list):
        raise ConfigurationError(
            f"pod headers must be a tuple of header names, e.g. ('x-pod-name',), not {headers!r}"
        )
    names = tuple(headers)
    if not names or len(set(names)) != len(names):
        raise ConfigurationError(f"pod headers must be distinct and at least one: {names!r}")
    for name in names:
        if (
            not isinstance(name, str)
            or not _HEADER_NAME.match(name)
            or name.startswith("grpc-")
            or name.endswith("-bin")
        ):
            raise ConfigurationError(
                f"{name!r} is not a header a pod name can be read from: a lower-case "
                "metadata key, not grpc-* nor *-bin"
            )
    return names


def pod_name_from_metadata(
    metadata: Metadata | None, headers: tuple[str, ...] = DEFAULT_POD_HEADERS
) -> str | None:
    """The serving pod's name, read from the first of ``headers`` the response carries.

    With the default headers this is :func:`pod_from_metadata`'s name (the IP and namespace
    headers are checked too); a header of the fleet's own is read as one name, checked as an
    identity value.

    Raises:
        MalformedPodHeader: the header is there but is not a valid name, or is repeated with
            different values.
    """
    if headers == DEFAULT_POD_HEADERS:
        identity = pod_from_metadata(metadata)
        return identity.name if identity is not None else None
    found = _values(metadata, headers)
    for header in headers:
        if header in found:
            if header == POD_HEADER:
                identity = pod_from_metadata(metadata)
                return identity.name if identity is not None else None
            return check_value(header, found[header])
    return None


def _values(metadata: Metadata | None, headers: Iterable[str]) -> dict[str, str | bytes]:
    """The value of each of ``headers`` in ``metadata`` (keys in any case).

    Raises:
        MalformedPodHeader: a header is repeated with another value.
    """
    values: dict[str, str | bytes] = {}
    for key, value in metadata or ():
        lowered = key.lower()
        if lowered not in headers:
            continue
        if lowered in values and values[lowered] != value:
            raise MalformedPodHeader(
                lowered, value, f"repeated with another value {values[lowered]!r}"
            )
        values[lowered] = value
    return values


def pod_from_metadata(metadata: Metadata | None) -> PodIdentity | None:
    """Read the serving pod from response metadata.

    Returns:
        The identity, or ``None`` when the response carries no pod header (a server without the
        middleware, or a proxy that answered by itself).

    Raises:
        MalformedPodHeader: the header is there but is not a valid identity (not ASCII, empty,
            repeated with different values, an IP that does not parse).
    """
    values = _values(metadata, IDENTITY_HEADERS)
    if POD_HEADER not in values:
        return None
    name = check_value(POD_HEADER, values[POD_HEADER])
    ip = values.get(POD_IP_HEADER)
    namespace = values.get(POD_NAMESPACE_HEADER)
    if ip is not None:
        ip = check_value(POD_IP_HEADER, ip)
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise MalformedPodHeader(POD_IP_HEADER, ip, "not an IP address") from exc
    if namespace is not None:
        namespace = check_value(POD_NAMESPACE_HEADER, namespace)
    return PodIdentity(
        name=name, ip=ip, namespace=namespace, opaque=name.startswith(_OPAQUE_PREFIX) and ip is None
    )
