"""The OpenTelemetry instrumentor: every channel observed with no change to the client's code,
in process and under the real ``opentelemetry-instrument`` launcher; composed with
opentelemetry-instrumentation-grpc in either order; its environment settings. And
``suppressed()``, which keeps the package's own calls out of otel-grpc's spans."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import IDENTITY, SyncPod
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcInstrumentorClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_telemetry import global_tracer_provider

import grpc_balance_mw
from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw import instrumentor as instrumentor_module
from grpc_balance_mw._suppress import suppressed
from grpc_balance_mw.instrumentor import (
    ENV_EXCLUDED_TARGETS,
    ENV_EXPECTED_PODS,
    ENV_REBALANCE,
    ENV_TARGETS,
    ENV_TELEMETRY,
    GrpcBalanceInstrumentor,
    InstrumentorSettings,
    settings_from_env,
)
from grpc_balance_mw.telemetry import ATTR_POD

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "zero_code_client.py"
FLAVOURS = ("sync", "aio")
GET = "chargepoints.v1.ChargePoints/GetChargePoint"
CHECK = "grpc.health.v1.Health/Check"
CHANNEL_FUNCTIONS = (
    (grpc, "insecure_channel"),
    (grpc, "secure_channel"),
    (grpc.aio, "insecure_channel"),
    (grpc.aio, "secure_channel"),
)
ORIGINALS = [getattr(module, name) for module, name in CHANNEL_FUNCTIONS]


def current_functions() -> list[Any]:
    return [getattr(module, name) for module, name in CHANNEL_FUNCTIONS]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Spans of the global tracer provider (otel-grpc's sync instrumentor uses only that one)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with global_tracer_provider(provider):
        yield spans
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    """The finished spans called ``name``, once ``count`` of them are there (aio spans end in
    done-callbacks), waiting at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in exporter.get_finished_spans() if s.name.lstrip("/") == name]
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def make_calls(flavour: str, target: str, calls: int = 3) -> Any:
    """``calls`` unary calls on a channel made as any application makes it; the channel."""
    if flavour == "sync":
        with grpc.insecure_channel(target) as channel:
            for _ in range(calls):
                assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
        return channel

    async def run() -> Any:
        async with grpc.aio.insecure_channel(target) as channel:
            for _ in range(calls):
                assert (await call_aio(channel, "unary_unary")).code is grpc.StatusCode.OK
        return channel

    return asyncio.run(run())


OBSERVED = {"sync": grpc_balance_mw.ObservedChannel, "aio": balance_aio.ObservedChannel}


@contextlib.contextmanager
def instrumented(*instrumentors: Any, **kwargs: Any) -> Iterator[None]:
    """Instrument in this order, uninstrument in the reverse one."""
    done: list[Any] = []
    try:
        for instrumentor in instrumentors:
            instrumentor.instrument(**kwargs)
            done.append(instrumentor)
        yield
    finally:
        for instrumentor in reversed(done):
            instrumentor.uninstrument()


# settings


def test_settings_from_env_read_every_variable() -> None:
    settings, errors = settings_from_env(
        {
            ENV_TARGETS: "charge-points*, billing:443",
            ENV_EXCLUDED_TARGETS: "charge-points-admin:*",
            ENV_EXPECTED_PODS: "charge-points:80=3, *=5",
            ENV_TELEMETRY: "FALSE",
            ENV_REBALANCE: "always",
        }
    )
    assert errors == []
    assert settings.selects("charge-points:80")
    assert settings.selects("dns:///charge-points.ev.svc:80")  # also matched without dns:///
    assert settings.selects("billing:443")
    assert not settings.selects("billing:80")
    assert not settings.selects("charge-points-admin:9000")  # excluded wins
    assert settings.expected_pods_for("charge-points:80") == 3
    assert settings.expected_pods_for("billing:443") == 5  # the first pattern that matches
    assert settings.telemetry is False
    assert settings.rebalance == "always"
    assert settings_from_env({})[0] == InstrumentorSettings()  # every default: observe all
    assert settings_from_env({ENV_REBALANCE: "true"})[0].rebalance == "alarm"


def test_bad_values_are_logged_once_and_left_at_their_defaults(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_EXPECTED_PODS, f"{sync_pod.target}=3,broken,other:80=zero")
    monkeypatch.setenv(ENV_TELEMETRY, "maybe")
    monkeypatch.setenv(ENV_REBALANCE, "sometimes")
    with caplog.at_level(logging.ERROR, "grpc_balance_mw"), instrumented(GrpcBalanceInstrumentor()):
        channel = make_calls("sync", sync_pod.target)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4, errors
    for variable, value in [
        (ENV_EXPECTED_PODS, "'broken'"),
        (ENV_EXPECTED_PODS, "'other:80=zero'"),
        (ENV_TELEMETRY, "'maybe'"),
        (ENV_REBALANCE, "'sometimes'"),
    ]:
        assert any(variable in error and value in error for error in errors), errors
    # The good pair was kept; the rest at their defaults (telemetry on, no rebalance).
    assert isinstance(channel, grpc_balance_mw.ObservedChannel)
    assert channel.detector.expected_pods == 3
    assert channel.observer.telemetry is not None
    assert channel.rebalancer is None


# instrument() / uninstrument() in process


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_instrument_observes_every_channel_and_uninstrument_restores_grpc(
    flavour: str, sync_pod: SyncPod, exporter: InMemorySpanExporter
) -> None:
    with instrumented(GrpcBalanceInstrumentor()):
        observed = make_calls(flavour, sync_pod.target)
        spans = named(exporter, GET, 3)
    assert isinstance(observed, OBSERVED[flavour])
    assert len(spans) == 3
    assert all((span.attributes or {})[ATTR_POD] == IDENTITY.name for span in spans)
    assert current_functions() == ORIGINALS
    assert not isinstance(make_calls(flavour, sync_pod.target, 1), OBSERVED[flavour])


@pytest.mark.parametrize("order", ["otel-grpc first", "grpc_balance_mw first"])
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("rebalance", ["observe", "rebalance"])
def test_with_otel_grpc_in_either_order_one_span_per_call_with_the_pod(
    rebalance: str,
    flavour: str,
    order: str,
    sync_pod: SyncPod,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if rebalance == "rebalance":  # every call moves onto lanes: still one span each
        monkeypatch.setenv(ENV_REBALANCE, "always")
    theirs = GrpcInstrumentorClient() if flavour == "sync" else GrpcAioInstrumentorClient()
    ours = GrpcBalanceInstrumentor()
    both = (theirs, ours) if order == "otel-grpc first" else (ours, theirs)
    with instrumented(*both):
        made = make_calls(flavour, sync_pod.target, 5)
        spans = named(exporter, GET, 5)
    assert len(spans) == 5, [s.name for s in exporter.get_finished_spans()]
    for span in spans:
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "opentelemetry.instrumentation.grpc"
        assert (span.attributes or {})[ATTR_POD] == IDENTITY.name
    # Sync: otel-grpc's interceptor outside the observed channel, whichever wrapped first.
    inner = made if flavour == "aio" else made._channel
    assert isinstance(inner, OBSERVED[flavour])
    assert (inner.rebalancer is not None) is (rebalance == "rebalance")
    assert current_functions() == ORIGINALS


def test_uninstrumented_out_of_order_it_passes_channels_through(sync_pod: SyncPod) -> None:
    theirs, ours = GrpcInstrumentorClient(), GrpcBalanceInstrumentor()
    ours.instrument()
    theirs.instrument()
    try:
        ours.uninstrument()  # not the last one on: it cannot take itself out of the chain
        channel = make_calls("sync", sync_pod.target, 1)
    finally:
        theirs.uninstrument()
    assert not isinstance(channel._channel, grpc_balance_mw.ObservedChannel)


def test_channels_of_the_package_and_of_exporters_are_not_observed_again(
    sync_pod: SyncPod,
) -> None:
    exporter_module: dict[str, Any] = {"__name__": "opentelemetry.exporter.otlp.fake", "grpc": grpc}
    exec("def dial(target):\n    return grpc.insecure_channel(target)", exporter_module)
    with instrumented(GrpcBalanceInstrumentor()):
        lane = grpc_balance_mw.channel_factory(sync_pod.target)(())  # as a balanced channel dials
        exporters = exporter_module["dial"](sync_pod.target)
        users = grpc.insecure_channel(sync_pod.target)
    for channel in (lane, exporters, users):
        channel.close()
    assert not isinstance(lane, grpc_balance_mw.ObservedChannel)
    assert not isinstance(exporters, grpc_balance_mw.ObservedChannel)
    assert isinstance(users, grpc_balance_mw.ObservedChannel)


def test_a_channel_that_cannot_be_observed_is_returned_as_made(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("observe broke")

    monkeypatch.setattr(instrumentor_module, "observe", broken)
    with caplog.at_level(logging.DEBUG, "grpc_balance_mw"), instrumented(GrpcBalanceInstrumentor()):
        first = make_calls("sync", sync_pod.target, 2)
        make_calls("sync", sync_pod.target, 2)
    assert type(first).__module__ == "grpc._channel"  # and its calls went through
    warnings = [r for r in caplog.records if "left unobserved" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.DEBUG]


def test_the_entry_point_names_the_instrumentor() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    entry = project["entry-points"]["opentelemetry_instrumentor"]["grpc_balance_mw"]
    point = metadata.EntryPoint("grpc_balance_mw", entry, "opentelemetry_instrumentor")
    assert point.load() is GrpcBalanceInstrumentor
    # opentelemetry-instrument 0.36b0 reads this extra of every instrumentor's distribution and
    # starts no instrumentation at all if one lacks it.
    assert project["optional-dependencies"]["instruments"] == ["grpcio>=1.50.0"]


# the real launcher


def launcher_path(tmp_path: Path) -> str:
    """PYTHONPATH for the launched client: this checkout, and, when the installed metadata
    predates the entry point (an editable install made before it was added), a dist-info that
    declares it as pyproject.toml does."""
    paths = [str(ROOT)]
    installed = metadata.entry_points(group="opentelemetry_instrumentor")
    if not any(point.name == "grpc_balance_mw" for point in installed):
        tomllib = pytest.importorskip("tomllib")
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        points = project["entry-points"]["opentelemetry_instrumentor"]
        info = tmp_path / "site" / "grpc_balance_mw_entry_points-0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: x\nVersion: 0\nProvides-Extra: instruments\n"
            'Requires-Dist: grpcio>=1.50.0; extra == "instruments"\n'
        )
        lines = [f"{name} = {value}" for name, value in points.items()]
        (info / "entry_points.txt").write_text("[opentelemetry_instrumentor]\n" + "\n".join(lines))
        paths.append(str(info.parent))
    return os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans ConsoleSpanExporter printed (JSON objects, one after another)."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) != -1:
        span, at = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


@pytest.mark.parametrize(
    ("flavour", "otel_grpc"), [("sync", True), ("aio", True), ("sync", False), ("aio", False)]
)
def test_opentelemetry_instrument_observes_a_client_that_knows_nothing_of_it(
    flavour: str, otel_grpc: bool, sync_pod: SyncPod, tmp_path: Path
) -> None:
    calls = 60
    env = {
        **os.environ,
        "PYTHONPATH": launcher_path(tmp_path),
        "OTEL_SERVICE_NAME": "zero-code-client",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        ENV_EXPECTED_PODS: f"{sync_pod.target}=3",
    }
    if not otel_grpc:
        env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = "grpc_client,grpc_aio_client"
    launcher = str(Path(sys.executable).with_name("opentelemetry-instrument"))
    command = [launcher, sys.executable, str(EXAMPLE), sync_pod.target, "--calls", str(calls)]
    done = subprocess.run(
        [*command, *(["--aio"] if flavour == "aio" else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "grpc_balance_mw instrumentor" not in done.stderr  # no configuration error
    spans = [span for span in console_spans(done.stdout) if span["name"].lstrip("/") == CHECK]
    assert len(spans) == calls, done.stdout[-2000:]  # one span per call, whoever made it
    assert {span["attributes"].get(ATTR_POD) for span in spans} == {IDENTITY.name}
    assert f"calls to {sync_pod.target} are pinned" in done.stderr, done.stderr


# suppressed()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_health_check_inside_suppressed_makes_no_otel_grpc_span(
    flavour: str, sync_pod: SyncPod, exporter: InMemorySpanExporter
) -> None:
    def check_sync(quiet: Callable[[], Any]) -> None:
        with grpc.insecure_channel(sync_pod.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with quiet():
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

    async def check_aio(quiet: Callable[[], Any]) -> None:
        async with grpc.aio.insecure_channel(sync_pod.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with quiet():
                call = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            await call  # awaited outside: the context the call was started in is what counts
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

    theirs = GrpcInstrumentorClient() if flavour == "sync" else GrpcAioInstrumentorClient()
    with instrumented(theirs):
        if flavour == "sync":
            check_sync(suppressed)
        else:
            asyncio.run(check_aio(suppressed))
        # The unsuppressed check's span proves spans get through; the suppressed one was
        # started (and ended) before it.
        spans = named(exporter, CHECK, 1)
        assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
        # And without suppressed(), the same two checks make two spans.
        exporter.clear()
        if flavour == "sync":
            check_sync(contextlib.nullcontext)
        else:
            asyncio.run(check_aio(contextlib.nullcontext))
        assert len(named(exporter, CHECK, 2)) == 2


class CheckCounter(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts the health checks a server was asked (the balanced channel's own traffic)."""

    def __init__(self) -> None:
        self.checks = 0

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.lstrip("/") == CHECK:
            self.checks += 1
        return continuation(details)


@pytest.fixture
def counted_pod() -> Iterator[tuple[str, CheckCounter]]:
    from concurrent.futures import ThreadPoolExecutor

    from grpc_balance_mw import server as sync_server

    counter = CheckCounter()
    server = grpc.server(
        ThreadPoolExecutor(4),
        interceptors=[sync_server.PodIdentityInterceptor(IDENTITY), counter],
    )
    sync_server.add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", counter
    server.stop(None).wait()


@pytest.mark.xfail(
    strict=True,
    reason="issue 24 item 3: the balanced channel's health checks and scouts are to be made "
    "inside suppressed() (wired after the merge); remove this mark then",
)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_idle_balanced_channel_makes_no_span_under_otel_grpc(
    flavour: str, counted_pod: tuple[str, CheckCounter], exporter: InMemorySpanExporter
) -> None:
    target, counter = counted_pod

    def wait_for_checks(count: int) -> None:
        deadline = time.monotonic() + 15
        while counter.checks < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counter.checks >= count, "the balanced channel made no health checks"

    async def idle_aio() -> None:
        channel = balance_aio.balanced_channel(target)
        try:
            await asyncio.get_running_loop().run_in_executor(None, wait_for_checks, 4)
        finally:
            await channel.close()

    theirs = GrpcInstrumentorClient() if flavour == "sync" else GrpcAioInstrumentorClient()
    with instrumented(theirs):
        if flavour == "sync":
            with grpc_balance_mw.balanced_channel(target):
                wait_for_checks(4)
        else:
            asyncio.run(idle_aio())
    assert [s.name for s in exporter.get_finished_spans()] == []
