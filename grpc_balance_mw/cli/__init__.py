"""The ``grpc-balance`` command: tools on top of the library, never imported by it.

Subcommands: ``demo`` (the problem and its fixes on a local cluster), ``bench`` (every strategy
under steady load and faults), ``doctor`` (what balances a target), ``overhead`` (what
observing adds to a call) and ``simulate`` (a fleet of many clients and pods, simulated).
Argument errors exit 2 with one usage line, a configuration or cluster error exits 1 with one
line, Ctrl-C exits 130; progress goes to stderr, results to stdout.

The parser lives here and imports nothing optional, so ``--help`` and usage errors work on a plain
install; a subcommand's module is imported only to run it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from grpc_balance_mw import __version__
from grpc_balance_mw.cli.arguments import bounded_float, bounded_int
from grpc_balance_mw.cli.signals import sigterm_unwinds
from grpc_balance_mw.errors import BalanceError

__all__ = ["build_parser", "main"]

#: The extra that brings what each subcommand imports beyond the core install.
EXTRAS = {"demo": "demo", "overhead": "bench", "doctor": "cli", "bench": "bench"}
#: Subcommands whose ``run(args)`` lives in a module not named after them.
_COMMAND_MODULES = {"bench": "bench_command"}
#: ``bench``'s choices, here so that ``--help`` and usage errors import nothing optional.
BENCH_SCENARIOS = (
    "steady",
    "scale-up",
    "surge",
    "pod-kill",
    "streaming",
    "gray-failure",
    "slow-pod",
    "hung-pod",
    "fleet",
    "scale-down",
    "client-ip",
    "unidentified",
    "defaults",
)
STRATEGIES = (
    "plain",
    "dial-per-request",
    "headless-round-robin",
    "server-max-age",
    "l7-proxy",
    "interceptors",
    "balanced",
    "balanced-p2c",
    "balanced-predial",
)
#: The balanced channel with ``PoolConfig.subset``: the ``fleet`` scenario runs it after
#: ``balanced`` by default; other scenarios only when asked (``--strategy balanced-subset``).
SUBSET_STRATEGY = "balanced-subset"
#: The ``grpc.aio`` forms of the observing strategies: the membership scenarios only.
AIO_STRATEGIES = ("aio-interceptors", "aio-balanced")
MEMBERSHIP_SCENARIOS = ("client-ip", "unidentified", "defaults")
#: Top-level packages a subcommand may lack on a plain install, and their distributions.
_OPTIONAL = {
    "opentelemetry.sdk": "opentelemetry-sdk",
    "opentelemetry.instrumentation": "opentelemetry-instrumentation-grpc",
    "google.protobuf": "protobuf",
}


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (``grpc-balance demo: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="grpc-balance", description="Client-side gRPC balancing: tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="the problem, the alarm and the fix, on a local cluster (about 20 s)",
        description="omni calls charge-points (3 pods) through a ClusterIP-like Service: one "
        "plain channel pins every call to one pod and the observing wrapper raises the alarm in "
        "its spans; a surge overloads the pinned pod; the balanced channel spreads the same "
        "surge; the Service scales to 5 pods and the new ones get traffic. Writes a PNG chart "
        "of calls per pod over time (needs the chart extra).",
    )
    demo.add_argument(
        "--calls",
        type=bounded_int(1, 100_000),
        default=600,
        help="calls through the plain channel in act 1 (1..100000)",
    )
    demo.add_argument(
        "--rate",
        type=bounded_float(0.1, 10_000.0),
        default=300.0,
        help="calls per second in acts 1 and 4 (0.1..10000)",
    )
    demo.add_argument(
        "--surge",
        type=bounded_int(1, 500),
        default=48,
        help="concurrent calls in the surge (1..500; a pod takes 8 at once)",
    )
    demo.add_argument(
        "--l4",
        "--service",
        dest="l4",
        choices=("userspace", "haproxy", "iptables"),
        default="userspace",
        help="the ClusterIP Service: embedded proxy (default, no root), HAProxy mode tcp, or "
        "kube-proxy's iptables chains in a network namespace (root)",
    )
    demo.add_argument(
        "--chart",
        default="grpc-balance-demo.png",
        metavar="PATH",
        help="where to write the PNG chart (default: grpc-balance-demo.png)",
    )
    demo.add_argument(
        "--json", action="store_true", help="the benchmark's JSON document, one entry per act"
    )

    overhead = commands.add_parser(
        "overhead",
        help="what observing adds to a warm unary call (about 90 s)",
        description="Warm unary calls on a bare channel, with a no-op interceptor, with "
        "detection and spans through the interceptor and the channel wrapper, and with "
        "opentelemetry-instrumentation-grpc alone, interleaved in rounds.",
    )
    overhead.add_argument("--rounds", type=bounded_int(1, 100), default=30, help="1..100")
    overhead.add_argument(
        "--calls", type=bounded_int(1, 10_000), default=200, help="calls per variant per round"
    )
    overhead.add_argument(
        "--warmup", type=bounded_int(0, 10_000), default=200, help="calls per variant first"
    )
    overhead.add_argument(
        "--threads",
        type=bounded_int(0, 256),
        default=32,
        help="sync callers on one channel (0: skip)",
    )
    overhead.add_argument(
        "--aio-tasks",
        type=bounded_int(0, 2000),
        default=500,
        help="aio tasks on one channel (0: skip)",
    )
    overhead.add_argument(
        "--balanced",
        action="store_true",
        help="the balanced channel's client CPU per call against grpcio's native round_robin "
        "and a plain channel (3 pods, one caller, threads, aio tasks, streaming; idle CPU)",
    )
    overhead.add_argument(
        "--quick", action="store_true", help="--balanced: 2 short rounds (a smoke run)"
    )
    overhead.add_argument("--json", action="store_true", help="--balanced: one JSON document")
    overhead.add_argument(
        "--service",
        choices=("auto", "haproxy", "userspace", "iptables"),
        default="auto",
        help="--balanced: the pods' L4 Service (auto: HAProxy if installed, else userspace)",
    )
    overhead.add_argument(
        "--idle-s",
        type=bounded_float(0.1, 600.0),
        default=5.0,
        help="--balanced: the idle window timed per kind of channel",
    )
    overhead.add_argument(
        "--idle-settle-s",
        type=bounded_float(0.0, 600.0),
        default=3.0,
        help="--balanced: how long channels sit idle before the window (60: a minute of a "
        "stable pod set)",
    )
    doctor = commands.add_parser(
        "doctor",
        help="what balances a target's calls, what does not, and the fix (bounded: about 5 s)",
        description="Resolves the target, dials each address, samples fresh connections with "
        "health checks to see which pods answer, and judges: per-connection (ClusterIP), "
        "per-request (an L7 proxy), headless under pick_first, sessionAffinity ClientIP, the "
        "headless port gotcha, a server that stamps no identity. Exit 0: nothing wrong; 1: "
        "something is.",
    )
    doctor.add_argument("target", help="host:port, or dns:[//dns-server/]host:port")
    doctor.add_argument(
        "--samples", type=bounded_int(1, 200), default=12, help="fresh connections (1..200)"
    )
    doctor.add_argument(
        "--checks", type=bounded_int(2, 20), default=4, help="health checks per connection"
    )
    doctor.add_argument(
        "--timeout",
        type=bounded_float(0.05, 60.0),
        default=2.0,
        help="seconds per DNS query, dial and check",
    )
    doctor.add_argument(
        "--max-seconds",
        type=bounded_float(1.0, 600.0),
        default=20.0,
        help="stop sampling after this long",
    )
    doctor.add_argument(
        "--lb-policy",
        choices=("pick_first", "round_robin"),
        default="pick_first",
        help="the load-balancing policy your client uses",
    )
    doctor.add_argument(
        "--expected-pods",
        type=bounded_int(1, 10_000),
        default=None,
        help="the replicas the Deployment has, if known (tells ClientIP affinity from one pod)",
    )
    doctor.add_argument(
        "--pod-header",
        action="append",
        default=None,
        help="a response header the servers name their pod in (repeatable, in order); "
        "default x-balance-pod, the server half's",
    )
    doctor.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    doctor.add_argument("--ca-cert", help="PEM file of the roots to trust (implies TLS)")
    doctor.add_argument("--client-cert", help="PEM client certificate (mutual TLS)")
    doctor.add_argument("--client-key", help="PEM client key (mutual TLS)")
    doctor.add_argument("--server-name", help="the name the server's certificate must carry")
    doctor.add_argument("--json", action="store_true", help="one JSON document on stdout")
    bench = commands.add_parser(
        "bench",
        help="every strategy side by side under steady load, faults, scale events and what "
        "the package learns of the pods with default options",
        description="Runs each strategy (plain channel, dial-per-request, headless round_robin, "
        "server max-age, L7 proxy, observed channel, balanced channel, fallback with predial) "
        "against the local cluster, interleaved, and reports calls, errors, calls per pod (the "
        "pods' own counts), max share over fair share, p50/p99 and the affinity alarm. "
        "client-ip, unidentified and defaults give each strategy a cluster of its own and "
        "no options (see the module grpc_balance_mw.cli.bench_membership); slow-pod and fleet "
        "run client processes, hung-pod SIGSTOPs a pod (grpc_balance_mw.cli.bench_fleet). "
        "--scenario all "
        "takes about an hour.",
    )
    bench.add_argument(
        "--scenario", choices=(*BENCH_SCENARIOS, "all"), default="steady", help="default: steady"
    )
    bench.add_argument("--json", action="store_true", help="one JSON document on stdout")
    bench.add_argument(
        "--calls",
        type=bounded_int(1, 100_000),
        default=3000,
        help="steady: calls per strategy; pod-kill: at most this many per strategy (1..100000)",
    )
    bench.add_argument(
        "--rate",
        type=bounded_float(0.0, 10_000.0),
        default=0.0,
        help="steady: calls per second per strategy, 0..10000 (0: back to back, the default)",
    )
    bench.add_argument(
        "--rounds", type=bounded_int(1, 100), default=10, help="steady: rounds (1..100)"
    )
    bench.add_argument(
        "--l4",
        choices=("userspace", "haproxy", "iptables"),
        default="userspace",
        help="the ClusterIP Service: embedded proxy (default), HAProxy mode tcp, or kube-proxy's "
        "iptables chains in a network namespace (root)",
    )
    bench.add_argument(
        "--strategy",
        action="append",
        choices=(*STRATEGIES, SUBSET_STRATEGY, *AIO_STRATEGIES),
        help="run only this strategy (repeat for more); default: all sync ones (the aio-* "
        "forms: client-ip, unidentified and defaults only)",
    )
    bench.add_argument(
        "--surge",
        type=bounded_int(1, 500),
        default=48,
        help="surge: concurrent calls per wave (1..500; one pod takes 8 at once)",
    )
    bench.add_argument(
        "--scale-wait-s",
        type=bounded_float(1.0, 120.0),
        default=10.0,
        help="scale-up: how long to wait for a new pod's first call (1..120)",
    )
    bench.add_argument(
        "--client-ip-s",
        type=bounded_float(1.0, 600.0),
        default=20.0,
        help="client-ip: how long each strategy calls through the ClientIP Service (1..600)",
    )
    bench.add_argument(
        "--long-window-s",
        type=bounded_float(5.0, 600.0),
        default=60.0,
        help="unidentified: the long windows' length; each strategy calls for twice it (5..600)",
    )
    bench.add_argument(
        "--run-s",
        type=bounded_float(5.0, 600.0),
        default=25.0,
        help="slow-pod and fleet: how long each strategy's clients call; hung-pod: how long "
        "the calls go on after the hang (5..600, default 25)",
    )
    bench.add_argument(
        "--clients",
        type=bounded_int(1, 64),
        default=None,
        help="slow-pod and fleet: client processes (default: 4 for slow-pod, 8 for fleet)",
    )
    _add_simulate(commands)
    return parser


def _add_simulate(commands: argparse._SubParsersAction[_Parser]) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="many clients' balanced channels behind one ClusterIP, simulated (seconds)",
        description="A deterministic fleet simulation: kube-proxy's random pick per connection, "
        "each client's lanes, rotation and picker (fed by the pods' load reports), Poisson "
        "calls, pods with a capacity, and the subset rule that redials away from pods holding "
        "far more connections than the mean. "
        "Reports the busiest pod's share of calls over the fair share, connections per pod "
        "(max over mean), lanes per client and latency.",
    )
    simulate.add_argument(
        "--clients", type=bounded_int(1, 100_000), default=500, help="client replicas"
    )
    simulate.add_argument("--pods", type=bounded_int(1, 100_000), default=200, help="pods")
    simulate.add_argument(
        "--lanes", type=bounded_int(1, 1000), default=6, help="lanes per client (at most --pods)"
    )
    simulate.add_argument(
        "--seconds", type=bounded_float(1.0, 3600.0), default=60.0, help="simulated seconds"
    )
    simulate.add_argument("--seed", type=bounded_int(0, 2**31), default=0, help="random seed")
    simulate.add_argument(
        "--runs",
        type=bounded_int(1, 100),
        default=1,
        help="runs with seeds --seed, --seed + 1, ...; the medians are reported",
    )
    simulate.add_argument(
        "--rebalance-subset",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients redial away from pods far above the mean of connections, by the pods' "
        "load reports (default: on; --no-rebalance-subset: kube-proxy's random picks alone)",
    )
    simulate.add_argument(
        "--load",
        type=bounded_float(0.01, 2.0),
        default=0.6,
        help="the fleet's utilization, which sets each client's call rate (default 0.6)",
    )
    simulate.add_argument(
        "--rate",
        type=bounded_float(0.001, 1_000_000.0),
        default=None,
        help="calls per second per client (overrides --load)",
    )
    simulate.add_argument(
        "--concurrency", type=bounded_int(1, 10_000), default=4, help="calls a pod serves at once"
    )
    simulate.add_argument(
        "--service-ms",
        type=bounded_float(0.001, 600_000.0),
        default=100.0,
        help="a call's mean service time on a pod (exponential)",
    )
    simulate.add_argument(
        "--rotate-s",
        type=bounded_float(0.0, 86_400.0),
        default=60.0,
        help="lanes are rotated after this (+/- 20 %%; 0: never)",
    )
    simulate.add_argument(
        "--picker",
        choices=("weighted", "least-outstanding"),
        default="weighted",
        help="each client's picker: weighted (the pool's default, by the pods' load reports) "
        "or least-outstanding (its own calls in flight only)",
    )
    simulate.add_argument("--json", action="store_true", help="one JSON document on stdout")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
        try:
            name = _COMMAND_MODULES.get(args.command, args.command)
            module = importlib.import_module(f"grpc_balance_mw.cli.{name}")
        except ModuleNotFoundError as exc:
            dist = next((d for p, d in _OPTIONAL.items() if (exc.name or "").startswith(p)), None)
            if dist is None:
                raise
            print(
                f"grpc-balance {args.command} needs {dist}: "
                f"pip install 'grpc_balance_mw[{EXTRAS[args.command]}]'",
                file=sys.stderr,
            )
            return 1
        with sigterm_unwinds():  # timeout, CI and systemd stop us as Ctrl-C does
            code: int = module.run(args)
        return code
    except KeyboardInterrupt:
        print("grpc-balance: interrupted", file=sys.stderr)
        return 130
    except BalanceError as exc:
        print(f"grpc-balance: error: {exc}", file=sys.stderr)
        return 1
