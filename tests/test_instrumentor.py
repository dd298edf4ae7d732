"""The OpenTelemetry instrumentor: every channel observed with no change to the client's code,
in process and under the real ``opentelemetry-instrument`` launcher; composed with
opentelemetry-instrumentation-grpc in either order; its environment settings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import IDENTITY, SyncPod
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcInstrumentorClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otel_fixtures import CHECK, FLAVOURS, GET, global_spans, instrumented, named

import grpc_balance_mw
from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw import instrumentor as instrumentor_module
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
    with global_spans() as spans:
        yield spans


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


def test_lanes_are_dialled_like_the_users_channel() -> None:
    dialled: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def dial(*args: Any, **kwargs: Any) -> str:
        dialled.append((args, kwargs))
        return "lane"

    creds, mine, lane = object(), ("grpc.mine", 1), ("grpc.lane", 2)
    sync = instrumentor_module._lane_factory(
        dial, {"target": "t:1", "credentials": creds, "options": [mine], "compression": 2}
    )
    assert sync([lane]) == "lane"
    assert dialled.pop() == (("t:1", creds), {"options": (mine, lane), "compression": 2})
    aio = instrumentor_module._lane_factory(
        dial,
        {"target": "t:1", "credentials": None, "options": None, "compression": None,
         "interceptors": ["theirs"]},
    )  # fmt: skip
    assert aio([lane], ["the lane's"]) == "lane"
    assert dialled.pop() == (
        ("t:1",),
        {"options": (lane,), "compression": None, "interceptors": ["theirs", "the lane's"]},
    )


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


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_secure_channels_are_observed_too(flavour: str, sync_pod: SyncPod) -> None:
    async def made_aio() -> Any:
        channel = grpc.aio.secure_channel(sync_pod.target, grpc.ssl_channel_credentials())
        await channel.close()
        return channel

    with instrumented(GrpcBalanceInstrumentor()):
        if flavour == "sync":
            channel = grpc.secure_channel(sync_pod.target, grpc.ssl_channel_credentials())
            channel.close()
        else:
            channel = asyncio.run(made_aio())
    assert isinstance(channel, OBSERVED[flavour])


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
    def module(name: str) -> dict[str, Any]:
        """A ``call(function, *args)`` defined in a module called ``name``."""
        namespace: dict[str, Any] = {"__name__": name}
        exec("def call(function, *args):\n    return function(*args)", namespace)
        return namespace

    exporter, package = module("opentelemetry.exporter.otlp.fake"), module("grpc_balance_mw.fake")

    def users_factory(extra: Any) -> grpc.Channel:  # a factory of the user's, for lanes
        return grpc.insecure_channel(sync_pod.target, options=list(extra))

    with instrumented(GrpcBalanceInstrumentor()):
        made = {
            "channel_factory": grpc_balance_mw.channel_factory(sync_pod.target)(()),
            "exporter": exporter["call"](grpc.insecure_channel, sync_pod.target),
            "user's factory": package["call"](users_factory, ()),
            "user": grpc.insecure_channel(sync_pod.target),
        }
    for channel in made.values():
        channel.close()
    observed = {name for name, c in made.items() if isinstance(c, grpc_balance_mw.ObservedChannel)}
    assert observed == {"user"}


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
    assert project["optional-dependencies"]["instruments"] == ["grpcio>=1.53.0"]


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
            'Requires-Dist: grpcio>=1.53.0; extra == "instruments"\n'
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
@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
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
