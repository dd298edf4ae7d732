"""The affinity state gauge, and the Prometheus example (examples/prometheus/): the rules pass
promtool, a real scrape of a pinned channel shows the state and the calls per pod, and every
metric and label that the rules and the dashboard name is in that scrape."""

from __future__ import annotations

import enum
import importlib.util
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import grpc
import pytest
import yaml
from conftest import IDENTITY, SyncPod, require
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityDetector,
    AffinityRegistry,
    AffinityState,
    CallObserver,
)
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "prometheus"
STATE = "grpc_balance_mw.affinity.state"
FAST = AffinityConfig(min_samples=5, dwell_calls=2, warmup_s=0)
#: opentelemetry-exporter-prometheus 0.46b0 (SDK 1.25) names metrics as the specification says
#: (unit annotations such as {call} dropped, ``_total`` on counters); the files use those names.
SPEC_NAMING = (0, 46)


# The gauge, read with the SDK's in-memory reader.


def _states(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        (point.attributes["grpc_balance_mw.target"], point.attributes[STATE]): point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == STATE
        for point in metric.data.data_points
    }


def _finish(observer: CallObserver, pod: str) -> None:
    observer.begin("/svc.S/M", "unary_unary").finish([("x-balance-pod", pod)], None, 0)


def test_the_state_gauge_is_1_for_the_current_state_and_0_for_the_others() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry = AffinityTelemetry(meter_provider=provider, spans=False)
    pinned = CallObserver(AffinityDetector("svc:1", FAST), telemetry=telemetry)
    pinned.detector.expected_pods = 2
    spread = CallObserver(AffinityDetector("svc:2", FAST), telemetry=telemetry)
    spread.detector.expected_pods = 2
    assert _states(reader) == {
        (target, state.value): int(state is AffinityState.UNVERIFIED)
        for target in ("svc:1", "svc:2")
        for state in AffinityState
    }
    for number in range(12):
        _finish(pinned, "p0")
        _finish(spread, f"p{number % 2}")
    assert pinned.detector.state is AffinityState.PINNED
    assert spread.detector.state is AffinityState.BALANCED
    states = _states(reader)
    assert {key for key, value in states.items() if value == 1} == {
        ("svc:1", "pinned"),
        ("svc:2", "balanced"),
    }
    assert set(states) == {(t, s.value) for t in ("svc:1", "svc:2") for s in AffinityState}
    provider.shutdown()


class _Extended(enum.Enum):
    """A detector's states, one of which AffinityState does not have (yet)."""

    BALANCED = "balanced"
    UNIDENTIFIED = "unidentified"


class _ExtendedDetector(AffinityDetector):
    @property
    def state(self) -> Any:
        return _Extended.UNIDENTIFIED


class _BrokenDetector(AffinityDetector):
    @property
    def state(self) -> Any:
        raise RuntimeError("detector on fire")


def test_the_gauge_takes_any_state_of_the_detector_and_a_broken_one_costs_its_target() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry = AffinityTelemetry(meter_provider=provider, spans=False)
    # Kept in a variable: the telemetry holds a target only as long as its observers live.
    observers = [
        CallObserver(_BrokenDetector("svc:0", FAST), telemetry=telemetry),
        CallObserver(_ExtendedDetector("svc:1", FAST), telemetry=telemetry),
    ]
    assert _states(reader) == {("svc:1", "balanced"): 0, ("svc:1", "unidentified"): 1}
    assert len(observers) == 2
    provider.shutdown()


# The example, scraped for real.


def _require_exporter() -> None:
    """The exporter the test extra installs, naming metrics as the example's files expect."""
    try:
        version: str | None = metadata.version("opentelemetry-exporter-prometheus")
    except metadata.PackageNotFoundError:
        version = None
    require(version is not None, "opentelemetry-exporter-prometheus (pip install '.[test]')")
    assert version is not None
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < SPEC_NAMING:
        pytest.skip(
            f"opentelemetry-exporter-prometheus {version} puts units into metric names "
            "(the dependency floors run); the example's files use the names of 0.46b0 and later"
        )


def _example_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prometheus_example_app", EXAMPLE / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Scrape:
    """One scrape's samples: (name, labels, value)."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples = [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
        self.names = {name for name, _, _ in self.samples}
        self.labels = {label for _, labels, _ in self.samples for label in labels}

    def values(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The samples of ``name`` having ``labels``, by their other labels."""
        return {
            tuple(sorted((k, v) for k, v in got.items() if k not in labels)): value
            for sample, got, value in self.samples
            if sample == name and all(got.get(k) == v for k, v in labels.items())
        }


def _scrape_a_pinned_channel(pod: SyncPod) -> tuple[Scrape, int]:
    """A plain channel to one pod that says two exist, observed with the example's wiring,
    called until pinned, then /metrics fetched over HTTP; and how many calls it made."""
    _require_exporter()
    app = _example_app()
    with app.MetricsEndpoint("127.0.0.1", 0) as endpoint:
        telemetry = AffinityTelemetry(meter_provider=endpoint.provider, spans=False)
        options = ObserveOptions(
            expected_pods=2,
            telemetry=telemetry,
            config=FAST,
            registry=AffinityRegistry(FAST),
        )
        with observe(grpc.insecure_channel(pod.target), options) as channel:
            stub = pb_grpc.ChargePointsStub(channel)
            calls = 0
            while channel.detector.state is not AffinityState.PINNED and calls < 200:
                stub.GetChargePoint(pb.GetChargePointRequest(id=f"cp-{calls}"), timeout=10)
                calls += 1
            assert channel.detector.state is AffinityState.PINNED, channel.detector
            with urllib.request.urlopen(endpoint.url, timeout=10) as response:
                assert response.status == 200
                return Scrape(response.read().decode()), calls


@pytest.fixture
def scrape(sync_pod: SyncPod) -> tuple[Scrape, int, str]:
    scraped, calls = _scrape_a_pinned_channel(sync_pod)
    return scraped, calls, sync_pod.target


def test_a_scrape_of_a_pinned_channel_shows_the_state_and_the_calls_per_pod(
    scrape: tuple[Scrape, int, str],
) -> None:
    scraped, calls, target = scrape
    states = {
        dict(labels)["grpc_balance_mw_affinity_state"]: value
        for labels, value in scraped.values(
            "grpc_balance_mw_affinity_state", grpc_balance_mw_target=target
        ).items()
    }
    assert states == {state.value: float(state is AffinityState.PINNED) for state in AffinityState}
    counted = scraped.values(
        "grpc_balance_mw_client_calls_total",
        grpc_balance_mw_target=target,
        grpc_balance_mw_pod=IDENTITY.name,
        rpc_service="chargepoints.v1.ChargePoints",
        rpc_grpc_status_code="0",
    )
    assert list(counted.values()) == [calls]
    top_share = scraped.values("grpc_balance_mw_affinity_top_share", grpc_balance_mw_target=target)
    assert list(top_share.values()) == [1.0]


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
def test_the_example_app_serves_the_state_on_its_metrics_port(sync_pod: SyncPod) -> None:
    """examples/prometheus/app.py as a user runs it, with the package's defaults."""
    _require_exporter()
    command = [sys.executable, str(EXAMPLE / "app.py"), "--target", sync_pod.target]
    command += ["--expected-pods", "2", "--calls", "600", "--rate", "300"]
    command += ["--port", "0", "--linger", "60"]
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:  # closes the pipes
        reader = threading.Thread(target=_pump, args=(process.stdout, lines))
        reader.start()
        try:
            first = lines.get(timeout=30)
            assert first.startswith("metrics at http://127.0.0.1:"), first
            url = first.split()[-1]
            assert lines.get(timeout=60).startswith("calls done"), "the calls did not finish"
            with urllib.request.urlopen(url, timeout=10) as response:
                scraped = Scrape(response.read().decode())
        finally:
            process.terminate()
            process.wait(30)
            reader.join(10)
        assert process.stderr is not None
        errors = process.stderr.read()
    pinned = scraped.values(
        "grpc_balance_mw_affinity_state",
        grpc_balance_mw_target=sync_pod.target,
        grpc_balance_mw_affinity_state="pinned",
    )
    assert list(pinned.values()) == [1.0], errors
    assert "are pinned" in errors  # the client's warning, beside the metric


# What the rules and the dashboard name, read out of their PromQL.

_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_NAME = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*(?!\w|\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression uses."""
    labels: set[str] = set()
    grafana = _LABEL_VALUES.match(expr.strip())
    if grafana is not None:
        expr = grafana[1]
        labels.add(grafana[2])
    for names in _LABEL_LISTS.findall(expr):
        labels |= {name.strip() for name in names.split(",") if name.strip()}
    rest = _LABEL_LISTS.sub(" ", expr)
    for matchers in _MATCHERS.findall(rest):
        labels |= set(_MATCHER_NAME.findall(_STRINGS.sub('""', matchers)))
    rest = _RANGES.sub(" ", _STRINGS.sub(" ", _MATCHERS.sub(" ", rest)))
    metrics = {name for name in _IDENTIFIER.findall(rest) if name not in _KEYWORDS}
    return metrics, labels


def test_promql_names_reads_metrics_and_labels() -> None:
    assert promql_names(
        'sum without (a, b) (rate(m_total{c="x", d=~"$y"}[$__rate_interval])) / on (e) n > 0.9'
    ) == ({"m_total", "n"}, {"a", "b", "c", "d", "e"})
    assert promql_names('label_values(m{job=~"$job"}, t)') == ({"m"}, {"job", "t"})


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and every dashboard query."""
    rules = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())
    found = [
        (f"alerts.yml {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]
    dashboard = json.loads((EXAMPLE / "dashboard.json").read_text())
    found += [
        (f"dashboard.json panel {panel['title']!r}", query["expr"])
        for panel in dashboard["panels"]
        for query in panel.get("targets", [])
    ]
    found += [
        (f"dashboard.json variable {variable['name']}", variable["query"]["query"])
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return found


def _templated_labels() -> set[str]:
    """Labels the alerts' annotations ($labels.x) and the panels' legends ({{x}}) print."""
    text = (EXAMPLE / "alerts.yml").read_text() + (EXAMPLE / "dashboard.json").read_text()
    return set(re.findall(r"\$labels\.(\w+)", text)) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))


def test_every_metric_and_label_in_the_rules_and_dashboard_is_in_a_real_scrape(
    scrape: tuple[Scrape, int, str],
) -> None:
    scraped = scrape[0]
    queries = _queries()
    assert len(queries) >= 8, queries  # 3 rules, 5 panels, 2 variables
    # Added by Prometheus when it scrapes, not by the exporter.
    scrape_labels = {"job", "instance"}
    for where, expr in queries:
        metrics, labels = promql_names(expr)
        assert metrics, f"{where}: no metric read from {expr!r}"
        assert metrics <= scraped.names, f"{where}: {metrics - scraped.names} not in the scrape"
        unknown = labels - scraped.labels - scrape_labels
        assert not unknown, f"{where}: labels {unknown} not in the scrape"
    unknown = _templated_labels() - scraped.labels - scrape_labels
    assert not unknown, f"annotations or legends print labels {unknown} not in the scrape"


def test_the_dashboard_has_calls_per_pod_top_share_and_a_state_timeline() -> None:
    dashboard = json.loads((EXAMPLE / "dashboard.json").read_text())
    panels = {panel["title"]: panel for panel in dashboard["panels"]}
    assert {panel["type"] for panel in panels.values()} >= {"timeseries", "state-timeline"}
    assert len({panel["id"] for panel in panels.values()}) == len(panels)
    (timeline,) = [p for p in panels.values() if p["type"] == "state-timeline"]
    assert "grpc_balance_mw_affinity_state" in timeline["targets"][0]["expr"]
    assert "grpc_balance_mw_pod" in panels["Calls per pod: $target"]["targets"][0]["expr"]
    assert "grpc_balance_mw_affinity_top_share" in panels["Top share"]["targets"][0]["expr"]


# promtool, from Debian's prometheus package (scripts/setup_prometheus.sh installs it).


@pytest.mark.parametrize(
    "command",
    [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]],
    ids=["check", "test"],
)
def test_promtool_passes_the_rules(command: list[str]) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (bash scripts/setup_prometheus.sh)")
    assert promtool is not None
    done = subprocess.run(
        [promtool, *command],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_finds_nothing_to_lint_in_a_real_scrape(scrape: tuple[Scrape, int, str]) -> None:
    """Prometheus' own naming lint (units, ``_total``, help texts) on what the exporter serves."""
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (bash scripts/setup_prometheus.sh)")
    assert promtool is not None
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape[0].text,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
