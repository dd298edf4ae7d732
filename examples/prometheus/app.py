"""omni with Prometheus: the affinity metrics on /metrics, through the OTel SDK's Prometheus reader.

    pip install grpc_balance_mw opentelemetry-sdk opentelemetry-exporter-prometheus
    python examples/prometheus/app.py --target charge-points.ev.svc.cluster.local:80 \\
        --expected-pods 3 --host 0.0.0.0 --port 9464
    python examples/prometheus/app.py --local-cluster --mode observe   # try it on this machine

The wiring is ``start_metrics`` (a MeterProvider with a ``PrometheusMetricReader``, and an HTTP
server for Prometheus to scrape) and the ``meter_provider=`` given to ``AffinityTelemetry``; the
rest is the omni client calling GetChargePoint. Point Prometheus at ``http://<pod>:9464/metrics``,
load ``alerts.yml`` beside this file as a rule file and import ``dashboard.json`` into Grafana.
docs/metrics.md lists the metrics and their Prometheus names.

Modes: ``observe`` (the channel you have, observed: pinned behind a ClusterIP Service, and the
state gauge says so) and ``balanced`` (the fix: the calls spread, the gauge says balanced).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import REGISTRY, make_wsgi_app

from grpc_balance_mw import AffinityTelemetry, ObserveOptions, balanced_channel, observe
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

MODES = ("observe", "balanced")
#: The port OpenTelemetry's Prometheus exporter uses by default (OTEL_EXPORTER_PROMETHEUS_PORT).
DEFAULT_PORT = 9464


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log line per scrape."""


class MetricsEndpoint:
    """A MeterProvider whose metrics are served at ``url`` for Prometheus; ``close()`` ends both.

    ``PrometheusMetricReader`` adds its collector to prometheus_client's default registry (which
    also holds the process and Python collectors); the server here serves that registry.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.reader = PrometheusMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        try:
            self._server: WSGIServer = make_server(
                host, port, make_wsgi_app(REGISTRY), handler_class=_QuietHandler
            )
        except BaseException:
            self.provider.shutdown()  # the reader leaves the default registry
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics endpoint", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.provider.shutdown()

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def make_channel(
    mode: str, target: str, expected_pods: int | None, telemetry: AffinityTelemetry
) -> grpc.Channel:
    """The client change, per mode (plaintext here; pass grpc.ssl_channel_credentials() for TLS)."""
    options = ObserveOptions(expected_pods=expected_pods, telemetry=telemetry)
    if mode == "observe":
        return observe(grpc.insecure_channel(target), options)
    if mode == "balanced":
        return balanced_channel(target, observe=options)
    raise ValueError(f"unknown mode {mode!r}")


def call(channel: grpc.Channel, calls: int, rate: float) -> None:
    """``calls`` GetChargePoint calls, at most ``rate`` a second."""
    stub = pb_grpc.ChargePointsStub(channel)
    started = time.monotonic()
    for number in range(calls):
        stub.GetChargePoint(pb.GetChargePointRequest(id=f"cp-{number}"), timeout=5)
        ahead = started + (number + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def run(args: argparse.Namespace, target: str, expected_pods: int | None) -> None:
    with MetricsEndpoint(args.host, args.port) as endpoint:
        print(f"metrics at {endpoint.url}", flush=True)
        telemetry = AffinityTelemetry(meter_provider=endpoint.provider, spans=False)
        with make_channel(args.mode, target, expected_pods, telemetry) as channel:
            call(channel, args.calls, args.rate)
        print(f"calls done; serving {endpoint.url} for {args.linger:g} s more", flush=True)
        time.sleep(args.linger)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="observe")
    parser.add_argument("--target", help="host:port of charge-points (not with --local-cluster)")
    parser.add_argument("--expected-pods", type=int, default=None)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=50.0, help="calls a second at most")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a pod, for Prometheus")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    parser.add_argument(
        "--linger", type=float, default=60.0, help="seconds to keep serving after the calls"
    )
    parser.add_argument(
        "--local-cluster", action="store_true", help="start a 3-pod local cluster and call it"
    )
    args = parser.parse_args(argv)
    if args.local_cluster == (args.target is not None):
        parser.error("give either --target or --local-cluster")
    if not 1 <= args.calls <= 1_000_000:
        parser.error("--calls must be in 1..1000000")
    if not 0 < args.rate <= 10_000 or not 0 <= args.linger <= 86_400:
        parser.error("--rate must be in (0, 10000] and --linger in [0, 86400]")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.local_cluster:
        run(args, args.target, args.expected_pods)
        return 0
    from grpc_balance_mw.testing import LocalCluster

    with LocalCluster(pods=3) as cluster:
        run(args, cluster.service_target, args.expected_pods or 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
