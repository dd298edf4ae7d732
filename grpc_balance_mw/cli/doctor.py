"""``grpc-balance doctor TARGET``: what balances this target's calls, what does not, and the fix.

It looks the way a client would, bounded in count and time:

1. resolves the target and reports its addresses (one: a ClusterIP or a single pod; several: a
   headless Service, whose pods a client reaches only with ``round_robin``);
2. dials each address on the target's port (the headless port gotcha: the Service port on a
   headless name reaches nothing);
3. samples fresh connections (each its own, through whatever is in front) with a
   ``grpc.health.v1`` check, and reads the pod each reached from the identity header the server
   stamps; several checks per connection tell per-request balancing (an L7 proxy: the pod changes
   on one connection) from per-connection balancing (kube-proxy: a pod per connection);
4. judges: a per-connection Service (one channel pins to one pod), every fresh connection on one
   pod while more exist (Service ``sessionAffinity: ClientIP``), a headless target under
   ``pick_first``, per-request balancing (nothing to do), a server that stamps no identity.

The verdict comes with the fix, as YAML or code. Exit code 0: nothing wrong; 1: something is.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from grpc_balance_mw.affinity.advice import VOICES, Cause
from grpc_balance_mw.errors import ConfigurationError, MalformedPodHeader
from grpc_balance_mw.headless import (
    DnsTarget,
    normalize_target,
    parse_dns_target,
    resolve_addresses,
)
from grpc_balance_mw.health_check import check_method
from grpc_balance_mw.identity import DEFAULT_POD_HEADERS, check_pod_headers, pod_name_from_metadata

__all__ = ["Findings", "TargetNames", "Verdict", "diagnose", "judge", "run"]

LOCAL_POOL = ("grpc.use_local_subchannel_pool", 1)
#: Chance that n fresh connections all land on one of k pods at random is k * (1/k)**n; below
#: this, "they all landed on one pod" is not luck.
_NOT_LUCK = 0.01


@dataclass
class Connection:
    """One fresh connection: the pods its checks were answered by, in order."""

    pods: list[str | None] = field(default_factory=list)
    error: str | None = None

    @property
    def switched(self) -> bool:
        named = [pod for pod in self.pods if pod is not None]
        return len(set(named)) > 1


@dataclass
class Findings:
    """What the doctor saw; ``judge`` turns it into a verdict."""

    target: str
    lb_policy: str
    addresses: list[str] | None = None
    dns_error: str | None = None
    unreachable: list[str] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    unstamped: int = 0
    expected_pods: int | None = None
    seconds: float = 0.0

    @property
    def pods(self) -> list[str]:
        seen: list[str] = []
        for connection in self.connections:
            for pod in connection.pods:
                if pod is not None and pod not in seen:
                    seen.append(pod)
        return seen

    @property
    def answered(self) -> list[Connection]:
        return [c for c in self.connections if c.error is None and c.pods]


@dataclass(frozen=True)
class Verdict:
    """The diagnosis: a short code, whether it is a problem, what it means, and the fix.

    ``cause``: the situation in the package's one table of causes
    (:data:`~grpc_balance_mw.affinity.advice.VOICES`), the same value the affinity detector's
    snapshot and alarm give; None for what only the doctor sees (DNS, ports, reachability).
    """

    code: str
    problem: bool
    summary: str
    fix: str = ""
    cause: str | None = None


def _voiced(code: str, cause: Cause, evidence: str, fix: str) -> Verdict:
    """A verdict worded from the table: the evidence, the cause's words, and its fix followed
    by the steps for this target."""
    voice = VOICES[cause]
    return Verdict(
        code,
        voice.problem,
        f"{evidence}: {voice.cause}",
        f"{_fill(voice.fix[0].upper() + voice.fix[1:] + '.')}\n\n{fix}",
        cause.value,
    )


def judge(findings: Findings) -> Verdict:
    """The verdict the findings support (pure: tested without sockets).

    Every fix names the target the doctor was given (see :class:`TargetNames`), so that it can
    be pasted as it is.
    """
    names = TargetNames.of(findings.target)
    if findings.dns_error is not None:
        return Verdict(
            "dns-failure",
            True,
            f"the name did not resolve: {findings.dns_error}",
            _dns_fix(names),
        )
    addresses = findings.addresses or []
    if addresses and len(findings.unreachable) == len(addresses):
        return Verdict(
            "port-unreachable",
            True,
            f"nothing answers on the target's port at {', '.join(findings.unreachable)}",
            _port_fix(names) if len(addresses) > 1 else _closed_port_fix(names),
        )
    answered = findings.answered
    if not answered:
        errors = sorted({c.error for c in findings.connections if c.error})
        return Verdict(
            "unreachable",
            True,
            "no fresh connection got a health answer"
            + (f" ({'; '.join(errors)})" if errors else ""),
            _unreachable_fix(names),
        )
    if not findings.pods:
        return _voiced(
            "no-identity",
            Cause.UNIDENTIFIED,
            f"{len(answered)} fresh connections got health answers naming no pod",
            _identity_fix(names),
        )
    pods = findings.pods
    if any(connection.switched for connection in answered):
        if len(addresses) > 1 and findings.lb_policy == "round_robin":
            return _voiced(
                "headless-round-robin",
                Cause.PER_REQUEST,
                f"round_robin over {len(addresses)} pod addresses spreads calls per request "
                f"over {len(pods)} pods",
                _rotation_note(names),
            )
        return _voiced(
            "per-request",
            Cause.PER_REQUEST,
            f"the pod changes from call to call on one connection ({len(pods)} pods seen)",
            _per_request_note(names),
        )
    if len(addresses) > 1:
        return _voiced(
            "headless-pick-first",
            Cause.SINGLE_CONNECTION,
            f"{len(addresses)} pod addresses (a headless Service), but {findings.lb_policy} "
            "sends all of a channel's calls to one of them",
            _headless_fix(names),
        )
    known = max(len(pods), findings.expected_pods or 0)
    if len(pods) == 1:
        n = len(answered)
        if known > 1 and known * (1 / known) ** n < _NOT_LUCK:
            return _voiced(
                "session-affinity",
                Cause.CLIENT_IP,
                f"{n} fresh connections all reached {pods[0]} while {known} pods exist",
                _affinity_fix(names),
            )
        # Not "OK": a client cannot tell one ready pod from ClientIP affinity hiding others.
        return _voiced(
            "one-pod-or-client-ip",
            Cause.ONE_POD_OR_CLIENT_IP,
            f"{n} fresh connection(s) all reached {pods[0]}",
            _one_pod_note(names),
        )
    return _voiced(
        "per-connection",
        Cause.SINGLE_CONNECTION,
        f"one address (a ClusterIP) and {len(pods)} pods, one per connection",
        _clusterip_fix(names),
    )


# -- the fixes, each naming the target ------------------------------------------------------------

#: Stands for the pods' port in a suggested headless target: a headless Service maps no ports,
#: and the doctor, dialling a Service port, cannot see the pods' containerPort.
TARGET_PORT = "<targetPort>"


@dataclass(frozen=True)
class TargetNames:
    """The names a fix gives, derived from the target the doctor was given (pure).

    ``service`` is the Kubernetes Service the host names (``NAME``, ``NAME.NAMESPACE`` or
    ``NAME.NAMESPACE.svc[.DOMAIN]``), None for an address or another kind of name;
    ``headless`` the name a headless Service beside it would have by the examples' convention
    (``NAME-headless``, same namespace and domain).
    """

    target: str
    authority: str | None
    host: str
    port: int

    @classmethod
    def of(cls, target: str) -> TargetNames:
        parsed = _parse(target)
        # The DNS server as the user wrote it (the parser adds the default port).
        authority = target[len("dns://") :].partition("/")[0] if target.startswith("dns://") else ""
        return cls(target, authority or None, parsed.host, parsed.port)

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def _labels(self) -> list[str] | None:
        """The host's DNS labels when it reads as a Service name, else None."""
        try:
            ipaddress.ip_address(self.host)
            return None
        except ValueError:
            pass
        labels = self.host.rstrip(".").split(".")
        if self.host == "localhost" or not all(labels):
            return None
        if len(labels) <= 2 or labels[2] == "svc":
            return labels
        return None

    @property
    def service(self) -> tuple[str, str | None] | None:
        """(name, namespace or None) of the Service the host names, or None."""
        labels = self._labels
        if labels is None:
            return None
        return labels[0], labels[1] if len(labels) > 1 else None

    @property
    def service_phrase(self) -> str:
        """How a sentence names the Service: by its name, else by the address dialled."""
        if self.service is None:
            return f"the Service at {self.hostport}"
        return f"the Service {self.host} (port {self.port})"

    @property
    def headless(self) -> str:
        """The headless Service's name, or a pattern to fill in when the host is an address."""
        labels = self._labels
        if labels is None:
            return "<name>-headless.<namespace>.svc.cluster.local"
        if labels[0].endswith("-headless"):
            return ".".join(labels)
        return ".".join([f"{labels[0]}-headless", *labels[1:]])

    def dns(self, host: str, port: int | str) -> str:
        """A target for ``host:port``, asking the same DNS server as the given target did."""
        return f"dns://{self.authority or ''}/{host}:{port}"


def _fill(text: str) -> str:
    """Prose of a fix, wrapped (never inside a name: targets carry hyphens)."""
    return textwrap.fill(text, 92, break_long_words=False, break_on_hyphens=False)


def _with_code(prose: str, code: str) -> str:
    """A fix's prose, then the code or YAML to paste, indented."""
    return f"{_fill(prose)}\n\n{textwrap.indent(code, '    ')}"


def _dns_fix(names: TargetNames) -> str:
    server = f"the DNS server {names.authority}" if names.authority else "the cluster DNS"
    return _fill(
        f"Check the name {names.host} in {names.target} (a Service is "
        f"NAME.NAMESPACE.svc.cluster.local) and that {server} answers from where the client runs."
    )


def _port_fix(names: TargetNames) -> str:
    return _fill(
        f"A headless Service maps no ports: dial {names.host} on the pods' containerPort (the "
        f"Service's targetPort), e.g. {names.dns(names.host, TARGET_PORT)}, not the Service "
        f"port {names.port}."
    )


def _closed_port_fix(names: TargetNames) -> str:
    return _fill(
        f"Check the port {names.port} of {names.host} and that the pods behind it are ready."
    )


def _unreachable_fix(names: TargetNames) -> str:
    return _fill(
        f"Serve grpc.health.v1 on the pods behind {names.hostport} "
        "(grpc_balance_mw.server.add_health) and check the target, port and TLS settings."
    )


def _identity_fix(names: TargetNames) -> str:
    return (
        _with_code(
            f"Stamp the pod identity on the servers behind {names.hostport} (and give them the "
            "downward-API env, see examples/kubernetes/deployment.yaml):",
            "from grpc_balance_mw import PodIdentity\n"
            "from grpc_balance_mw.server import PodIdentityInterceptor, add_health\n"
            "server = grpc.server(\n"
            "    pool, interceptors=[PodIdentityInterceptor(PodIdentity.from_env())]\n"
            ")\n"
            "add_health(server)",
        )
        + "\n\n"
        + _fill(
            "If they already send their pod name in a header of their own, name it: "
            f"grpc-balance doctor {names.target} --pod-header x-pod-name, and on the client "
            "ObserveOptions(pod_headers=('x-pod-name',))."
        )
    )


def _per_request_note(names: TargetNames) -> str:
    return _fill(
        f"Nothing to do on the client for {names.hostport}: per-request balancing already "
        "spreads one channel's calls. Keep it (Envoy LEAST_REQUEST with "
        "maxRequestsPerConnection, as in examples/kubernetes/istio-destinationrule.yaml)."
    )


def _headless_fix(names: TargetNames) -> str:
    return _with_code(
        f"Use round_robin with health checking on the headless name {names.host} (all four "
        "parts in one call):",
        "from grpc_balance_mw.headless_channel import headless_channel\n"
        f'channel = headless_channel("{names.target}")',
    )


def _rotation_note(names: TargetNames) -> str:
    return _fill(
        f"Pods added behind {names.hostport} get no calls until a connection drops (gRPC "
        "re-resolves DNS only then): set connection_age_options() on the server, or use the "
        "balanced channel."
    )


def _one_pod_note(names: TargetNames) -> str:
    return _fill(
        f"If the Deployment behind {names.service_phrase} has more replicas, look for "
        "sessionAffinity: ClientIP on that Service, or run the doctor again with "
        f"--expected-pods N to tell; a Service with one ready pod at {names.hostport} is "
        "what it looks like, and nothing is wrong."
    )


def _affinity_fix(names: TargetNames) -> str:
    service = names.service
    if service is None:
        patch = "kubectl patch service <name> -n <namespace>"
    else:
        name, namespace = service
        patch = f"kubectl patch service {name}" + (f" -n {namespace}" if namespace else "")
    fix = _with_code(
        f"Remove the session affinity of {names.service_phrase}: no client-side fix can reach "
        "other pods through it.",
        "spec:\n  sessionAffinity: None",
    )
    return f"""{fix}\n\nor: {patch} -p '{{"spec":{{"sessionAffinity":"None"}}}}'"""


def _clusterip_fix(names: TargetNames) -> str:
    service = names.service
    beside = (
        f"a headless Service {service[0]}-headless beside {service[0]}"
        if service is not None and not service[0].endswith("-headless")
        else f"a headless Service beside the one at {names.hostport}"
    )
    spread = _with_code(
        "Either spread calls over several connections from the client (no cluster change):",
        "from grpc_balance_mw import balanced_channel\n"
        f'channel = balanced_channel("{names.target}")',
    )
    headless = _with_code(
        f"or add {beside} (clusterIP: None, the same selector; "
        "examples/kubernetes/service-headless.yaml) and dial it on the pods' port with "
        "round_robin:",
        "from grpc_balance_mw.headless_channel import headless_channel\n"
        f'channel = headless_channel("{names.dns(names.headless, TARGET_PORT)}")',
    )
    return f"{spread}\n\n{headless}"


# -- looking --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DoctorOptions:
    """How hard to look: every loop is bounded in count and in time."""

    samples: int = 12
    checks_per_connection: int = 4
    timeout_s: float = 2.0
    max_seconds: float = 20.0
    lb_policy: str = "pick_first"
    expected_pods: int | None = None
    credentials: grpc.ChannelCredentials | None = None
    channel_options: tuple[tuple[str, Any], ...] = ()
    pod_headers: tuple[str, ...] = DEFAULT_POD_HEADERS

    def __post_init__(self) -> None:
        check_pod_headers(self.pod_headers)


def _parse(target: str) -> DnsTarget:
    """The host, port and DNS server of a target; ConfigurationError for one the doctor cannot
    read (the doctor resolves names itself, so only names and addresses with a port)."""
    try:
        parsed = parse_dns_target(normalize_target(target))
    except ConfigurationError:
        parsed = None
    if parsed is None:
        raise ConfigurationError(
            f"cannot read the target {target!r}: use host:port or dns:[//dns-server/]host:port"
        )
    return parsed


def _resolve(parsed: DnsTarget, timeout_s: float) -> tuple[list[str] | None, str | None]:
    """(addresses, None), or (None, why not)."""
    try:
        return [str(ipaddress.ip_address(parsed.host))], None
    except ValueError:
        pass
    addresses = resolve_addresses(parsed, timeout_s)
    if addresses is None:
        where = f" from {parsed.authority}" if parsed.authority else ""
        return None, f"no answer for {parsed.host}{where}"
    if not addresses:
        return None, f"{parsed.host} does not exist (NXDOMAIN)"
    return addresses, None


def _port_answers(address: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _channel(target: str, options: DoctorOptions) -> grpc.Channel:
    channel_options = [*options.channel_options, LOCAL_POOL]
    if options.lb_policy != "pick_first":
        channel_options.append(("grpc.lb_policy_name", options.lb_policy))
    if options.credentials is not None:
        return grpc.secure_channel(target, options.credentials, options=channel_options)
    return grpc.insecure_channel(target, options=channel_options)


#: Server-controlled text (a status message) is cut to this many characters when shown.
_MAX_SHOWN = 200


def printable(text: str, limit: int = _MAX_SHOWN) -> str:
    """``text`` safe to print on one terminal line: control characters, line breaks and other
    unprintable characters escaped as ``repr`` does, and cut at ``limit`` characters.

    A server chooses its status messages: raw, one could forge a ``verdict:`` line or send
    terminal escape sequences to whoever runs the doctor.
    """
    shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _sample(target: str, options: DoctorOptions, findings: Findings, deadline: float) -> Connection:
    """Checks on one fresh connection; none runs past ``deadline`` (``--max-seconds``)."""
    connection = Connection()
    channel = _channel(target, options)
    try:
        check = check_method(channel)
        for _ in range(options.checks_per_connection):
            timeout = min(options.timeout_s, _left(deadline))
            if timeout <= 0:
                break
            try:
                _, call = check.with_call("", timeout=timeout, wait_for_ready=True)
                initial, trailing = call.initial_metadata(), call.trailing_metadata()
            except grpc.RpcError as err:
                initial, trailing = (), err.trailing_metadata()
                if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                    connection.error = f"{err.code().name}: {printable(err.details() or '')}"
                    return connection
            try:
                headers = options.pod_headers
                pod = pod_name_from_metadata(initial, headers) or pod_name_from_metadata(
                    trailing, headers
                )
            except MalformedPodHeader as err:
                connection.error = printable(str(err))
                return connection
            if pod is None:
                findings.unstamped += 1
            connection.pods.append(pod)
    finally:
        channel.close()
    return connection


def diagnose(
    target: str, options: DoctorOptions, progress: Callable[[str], None] = lambda _: None
) -> Findings:
    """Look at ``target`` the way a client would; see the module docstring."""
    started = time.monotonic()
    deadline = started + options.max_seconds
    findings = Findings(target, options.lb_policy, expected_pods=options.expected_pods)
    parsed = _parse(target)
    progress(f"resolving {parsed.host}")
    addresses, error = _resolve(parsed, min(options.timeout_s, options.max_seconds))
    findings.addresses, findings.dns_error = addresses, error
    if addresses is None:
        findings.seconds = time.monotonic() - started
        return findings
    port = parsed.port
    dialled = 0
    for address in addresses[:16]:
        wait_s = min(options.timeout_s, 1.0, _left(deadline))
        if wait_s <= 0:
            break
        progress(f"dialling {address}:{port}")
        dialled += 1
        if not _port_answers(address, port, wait_s):
            findings.unreachable.append(address)
    if len(findings.unreachable) < dialled:
        for index in range(options.samples):
            if _left(deadline) <= 0:
                break
            progress(f"fresh connection {index + 1}/{options.samples}")
            findings.connections.append(_sample(target, options, findings, deadline))
    findings.seconds = time.monotonic() - started
    return findings


# -- the command ----------------------------------------------------------------------------------


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls or args.ca_cert or args.client_cert):
        return None
    if bool(args.client_cert) != bool(args.client_key):
        raise ConfigurationError("--client-cert and --client-key go together")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as err:
            raise ConfigurationError(f"cannot read {path}: {err.strerror}") from None

    return grpc.ssl_channel_credentials(
        read(args.ca_cert), read(args.client_key), read(args.client_cert)
    )


def render(findings: Findings, verdict: Verdict) -> str:
    lines = [f"target:     {findings.target}"]
    if findings.addresses is not None:
        lines.append(f"addresses:  {', '.join(findings.addresses)}")
    if findings.unreachable:
        lines.append(f"no answer:  {', '.join(findings.unreachable)}")
    answered = findings.answered
    if findings.connections:
        lines.append(
            f"sampled:    {len(findings.connections)} fresh connections, {len(answered)} answered "
            f"({findings.lb_policy}), in {findings.seconds:.1f} s"
        )
    if findings.pods:
        lines.append(f"pods seen:  {', '.join(findings.pods)}")
        switched = sum(c.switched for c in answered)
        lines.append(
            f"per conn.:  {switched} of {len(answered)} connections changed pod between checks"
        )
    marker = "PROBLEM" if verdict.problem else "OK"
    lines += ["", f"verdict:    {marker} {verdict.code}: {verdict.summary}"]
    if verdict.fix:
        lines += ["", "fix:", *(f"  {line}".rstrip() for line in verdict.fix.splitlines())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options = DoctorOptions(
        samples=args.samples,
        checks_per_connection=args.checks,
        timeout_s=args.timeout,
        max_seconds=args.max_seconds,
        lb_policy=args.lb_policy,
        expected_pods=args.expected_pods,
        pod_headers=tuple(args.pod_header) if args.pod_header else DEFAULT_POD_HEADERS,
        credentials=_credentials(args),
        channel_options=(("grpc.ssl_target_name_override", args.server_name),)
        if args.server_name
        else (),
    )

    def progress(message: str) -> None:
        print(f"doctor: {message}", file=sys.stderr, flush=True)

    findings = diagnose(args.target, options, progress)
    verdict = judge(findings)
    if args.json:
        document = {
            "target": findings.target,
            "verdict": asdict(verdict),
            "addresses": findings.addresses,
            "dns_error": findings.dns_error,
            "unreachable": findings.unreachable,
            "pods": findings.pods,
            "connections": [asdict(c) for c in findings.connections],
            "seconds": round(findings.seconds, 3),
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(findings, verdict))
    return 1 if verdict.problem else 0
