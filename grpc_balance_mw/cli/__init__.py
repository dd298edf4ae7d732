"""The ``grpc-balance`` command: tools on top of the library, never imported by it.

Subcommands: ``demo`` (the problem and its fixes on a local cluster) and ``overhead`` (what
observing adds to a call). Argument errors exit 2 with one usage line, a configuration or cluster
error exits 1 with one line, Ctrl-C exits 130; progress goes to stderr, results to stdout.

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
from grpc_balance_mw.errors import BalanceError

__all__ = ["build_parser", "main"]

#: The extra that brings what each subcommand imports beyond the core install.
EXTRAS = {"demo": "demo", "overhead": "bench"}
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
        help="the problem and its fixes, on a local cluster (about 20 s)",
        description="One channel through a ClusterIP-like Service pins every call to one pod; "
        "a headless Service with round_robin and an L7 proxy spread them; then a surge.",
    )
    demo.add_argument(
        "--calls", type=bounded_int(1, 100_000), default=600, help="calls per scenario (1..100000)"
    )
    demo.add_argument(
        "--rate",
        type=bounded_float(0.1, 10_000.0),
        default=300.0,
        help="calls per second, 0.1..10000 (the detector's warm-up is 1 s)",
    )
    demo.add_argument("--service", choices=("userspace", "haproxy"), default="userspace")

    overhead = commands.add_parser(
        "overhead",
        help="what observing adds to a warm unary call (about 30 s)",
        description="Warm unary calls on a bare channel, with a no-op interceptor, with "
        "detection and spans through the interceptor and the channel wrapper, and with "
        "opentelemetry-instrumentation-grpc alone, interleaved in rounds.",
    )
    overhead.add_argument("--rounds", type=bounded_int(1, 100), default=10, help="1..100")
    overhead.add_argument(
        "--calls", type=bounded_int(1, 10_000), default=500, help="calls per variant per round"
    )
    overhead.add_argument(
        "--warmup", type=bounded_int(0, 10_000), default=200, help="calls per variant first"
    )
    # `bench --scenario ...` (the balanced channel's scenarios) and `doctor` come here later.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
        try:
            module = importlib.import_module(f"grpc_balance_mw.cli.{args.command}")
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
        code: int = module.run(args)
        return code
    except KeyboardInterrupt:
        print("grpc-balance: interrupted", file=sys.stderr)
        return 130
    except BalanceError as exc:
        print(f"grpc-balance: error: {exc}", file=sys.stderr)
        return 1
