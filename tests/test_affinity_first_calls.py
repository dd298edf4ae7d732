"""Issue 9's "done when", at the sizes the issue states, against the local cluster, sync and aio.

- one channel through each L4 Service implementation (userspace, haproxy, iptables) with 3 known
  pods: pinned within 100 back-to-back calls, and paced at 20 ms, with the default config; the
  call at which each alarm came is logged and written to the terminal at the end of the module;
- 50 fresh round_robin channels over the headless Service, started ten at a time while other
  channels load the pods, 600 back-to-back calls each: no alarm, balanced; the same through the
  L7 proxy: no alarm, balanced per request (l7_balanced);
- a detector shared by 30 fresh channels of 10 calls each through the L4 Service: no alarm in
  20 runs, and the connections are spread over the pods;
- sessionAffinity ClientIP is named by the probe and in the advice; a pod added by a scale-up
  from 3 to 4 is known within one probe round.

The two large checks are marked ``slow`` (CI runs them): they cost about 30,000 calls each,
mostly the pods' CPU, so the channels run at once (threads sync, tasks of one loop aio) and the
background load is paced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from conftest import require

from grpc_balance_mw.affinity import AffinityDetector, AffinityRegistry, AffinityState, Transition
from grpc_balance_mw.aio.observed_channel import observe as observe_aio
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

pytestmark = pytest.mark.cluster

Factory = Callable[..., LocalCluster]
FRESH = [("grpc.use_local_subchannel_pool", 1)]
ROUND_ROBIN = [*FRESH, ("grpc.lb_policy_name", "round_robin")]
#: The call at which each pinned test's alarm came, by "<service> <mode> <pace>": logged by
#: each test and written to the terminal at the end of the module (the issue asks for them).
ALARM_CALLS: dict[str, int] = {}
log = logging.getLogger(__name__)


@pytest.fixture(scope="module", autouse=True)
def alarm_calls_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if ALARM_CALLS and reporter is not None:
        calls = ", ".join(f"{run}: {made}" for run, made in sorted(ALARM_CALLS.items()))
        # Teardown output is captured: write past the capture, as pytest's docs show.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(f"pinned alarm at call: {calls}")


class Alarms:
    """An ``on_alarm`` hook that keeps every transition."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self._lock = threading.Lock()

    def __call__(self, transition: Transition) -> None:
        with self._lock:
            self.transitions.append(transition)

    @property
    def raised(self) -> list[AffinityState]:
        return [t.current for t in self.transitions if t.current.is_alarm]


def _options(registry: AffinityRegistry, alarms: Alarms | None = None, **kw: Any) -> Any:
    telemetry = AffinityTelemetry(spans=False, metrics=False, on_alarm=alarms) if alarms else None
    kw.setdefault("probe", False)  # judged from the calls alone (test_default_probe.py: with)
    return ObserveOptions(registry=registry, telemetry=telemetry, **kw)


_REQUEST = pb.GetChargePointRequest(id="cp-1")


def run_sync(
    target: str,
    options: ObserveOptions,
    calls: int,
    *,
    channel_options: list[tuple[str, Any]] | None = None,
    pace_s: float = 0.0,
    stop: Callable[[AffinityDetector], bool] | None = None,
    on_first: Callable[[], object] | None = None,
) -> tuple[int, AffinityDetector]:
    """Up to ``calls`` unary calls on one fresh observed channel, one stub for all (a failed
    call raises); ``on_first`` runs after the first. Returns how many were made, the detector."""
    with observe(grpc.insecure_channel(target, options=channel_options), options) as observed:
        get = pb_grpc.ChargePointsStub(observed).GetChargePoint
        made = 0
        while made < calls:
            made += 1
            get(_REQUEST, timeout=10)
            if made == 1 and on_first is not None:
                on_first()
            if stop is not None and stop(observed.detector):
                break
            if pace_s:
                time.sleep(pace_s)
        return made, observed.detector


async def run_aio(
    target: str,
    options: ObserveOptions,
    calls: int,
    *,
    channel_options: list[tuple[str, Any]] | None = None,
    pace_s: float = 0.0,
    stop: Callable[[AffinityDetector], bool] | None = None,
    on_first: Callable[[], object] | None = None,
) -> tuple[int, AffinityDetector]:
    async with observe_aio(
        grpc.aio.insecure_channel(target, options=channel_options), options
    ) as observed:
        get = pb_grpc.ChargePointsStub(observed).GetChargePoint
        made = 0
        while made < calls:
            made += 1
            await get(_REQUEST, timeout=10)
            if made == 1 and on_first is not None:
                on_first()
            await asyncio.sleep(pace_s)  # also lets the done-callback run
            if stop is not None and stop(observed.detector):
                break
    return made, observed.detector


def _pinned(detector: AffinityDetector) -> bool:
    return detector.state is AffinityState.PINNED


@pytest.fixture(scope="module", params=["userspace", "haproxy", "iptables"])
def l4(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    missing = missing_components(request.param)
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service=request.param, dns=None) as cluster:
        yield cluster


@pytest.mark.parametrize("pace_s", [0.0, 0.02], ids=["back-to-back", "paced-20ms"])
@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_one_channel_through_an_l4_service_is_pinned_within_its_first_calls(
    l4: LocalCluster, mode: str, pace_s: float
) -> None:
    alarms = Alarms()
    options = _options(AffinityRegistry(), alarms, expected_pods=3)  # the default config
    target = l4.service_target
    pinned_at: list[int] = []  # the call after which the state was first pinned

    def note(detector: AffinityDetector) -> bool:
        note.calls += 1  # type: ignore[attr-defined]
        if not pinned_at and detector.state is AffinityState.PINNED:
            pinned_at.append(note.calls)  # type: ignore[attr-defined]
        # Back to back, all 100 calls; paced, 10 calls past the alarm show it holds (the
        # other 60 would only add 1.2 s of sleep per run).
        return bool(pace_s and pinned_at and note.calls >= pinned_at[0] + 10)  # type: ignore[attr-defined]

    note.calls = 0  # type: ignore[attr-defined]
    if mode == "sync":
        made, detector = await asyncio.to_thread(
            run_sync, target, options, 100, pace_s=pace_s, stop=note
        )
    else:
        made, detector = await run_aio(target, options, 100, pace_s=pace_s, stop=note)
    snapshot = detector.snapshot()
    run = f"{l4.service_kind} {mode} {pace_s * 1000:.0f}ms"
    ALARM_CALLS[run] = pinned_at[0] if pinned_at else 0
    log.info("%s: pinned alarm at call %s of %d, %s", run, pinned_at, made, snapshot)
    assert made == (pinned_at[0] + 10 if pace_s and pinned_at else 100) and pinned_at, snapshot
    # One alarm, pinned, and it held to the last call.
    assert alarms.raised == [AffinityState.PINNED] and detector.state is AffinityState.PINNED
    assert snapshot.warmup_calls == 0 and snapshot.connections == 1
    assert snapshot.cause == "single_connection" and "balanced_channel" in (snapshot.advice or "")


@pytest.fixture(scope="module")
def spread_cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace", "embedded", "haproxy")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns="embedded", l7="haproxy") as cluster:
        yield cluster


class Load:
    """Other clients loading the pods through the Service while a test runs (bounded in time;
    a pause between calls leaves the 2 cores to the channels under test)."""

    def __init__(
        self, target: str, channels: int = 2, limit_s: float = 90.0, pause_s: float = 0.005
    ) -> None:
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit_s
        self._pause_s = pause_s
        self.calls = 0
        self._threads = [
            threading.Thread(target=self._run, args=(target,), daemon=True) for _ in range(channels)
        ]

    def _run(self, target: str) -> None:
        with grpc.insecure_channel(target, options=ROUND_ROBIN) as channel:
            get = pb_grpc.ChargePointsStub(channel).GetChargePoint
            while not self._stop.wait(self._pause_s) and time.monotonic() < self._deadline:
                get(_REQUEST, timeout=10)
                self.calls += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


#: The issue's figures: 50 fresh channels, started ten at a time (a wave starts once the one
#: before has made its first calls, so all 50 run at once by the end), 600 calls each.
CHANNELS, WAVE, CALLS_EACH = 50, 10, 600


def waves_sync(target: str, options: ObserveOptions, channel_options: Any) -> list[int]:
    """CHANNELS channels on a thread each, started WAVE at a time; the calls each made."""
    with ThreadPoolExecutor(CHANNELS) as pool:
        runs = []
        for _ in range(CHANNELS // WAVE):
            first = threading.Semaphore(0)
            runs += [
                pool.submit(
                    run_sync,
                    target,
                    options,
                    CALLS_EACH,
                    channel_options=channel_options,
                    on_first=first.release,
                )
                for _ in range(WAVE)
            ]
            assert all(first.acquire(timeout=30) for _ in range(WAVE))
        return [run.result()[0] for run in runs]


async def waves_aio(target: str, options: ObserveOptions, channel_options: Any) -> list[int]:
    """CHANNELS channels as tasks of one loop, started WAVE at a time; the calls each made."""
    runs = []
    for _ in range(CHANNELS // WAVE):
        first = [asyncio.Event() for _ in range(WAVE)]
        runs += [
            asyncio.ensure_future(
                run_aio(
                    target,
                    options,
                    CALLS_EACH,
                    channel_options=channel_options,
                    on_first=event.set,
                )
            )
            for event in first
        ]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in first)), 30)
    return [made for made, _ in await asyncio.gather(*runs)]


@pytest.mark.slow
@pytest.mark.parametrize("route", ["headless", "l7"])
@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_fresh_channels_balanced_by_round_robin_or_a_proxy_never_alarm(
    spread_cluster: LocalCluster, mode: str, route: str
) -> None:
    headless = route == "headless"
    target = spread_cluster.headless_target if headless else spread_cluster.l7_target
    channel_options = ROUND_ROBIN if headless else FRESH
    alarms, registry = Alarms(), AffinityRegistry()
    options = _options(registry, alarms, expected_pods=3)
    with Load(spread_cluster.headless_target) as load:
        if mode == "sync":
            made = await asyncio.to_thread(waves_sync, target, options, channel_options)
        else:
            made = await waves_aio(target, options, channel_options)
    assert made == [CALLS_EACH] * CHANNELS and load.calls > 0
    detector = registry.detector(target)
    snapshot = detector.snapshot()
    print(f"{route} {mode}: alarms {alarms.raised}, load {load.calls} calls, {snapshot}")
    assert alarms.raised == []  # no skewed or pinned alarm, ever
    assert snapshot.lanes == CHANNELS
    # A lane stops counting as per-request after 32 calls in a row on one pod; HAProxy's
    # leastconn under the background load can do that to one lane near its end (seen once in
    # CI: 19 of 20). The state and the absence of alarms are the claims; most lanes must switch.
    assert snapshot.per_request_lanes >= CHANNELS * 0.9
    expected = AffinityState.BALANCED if headless else AffinityState.L7_BALANCED
    assert detector.state is expected and snapshot.cause == "per_request"
    assert snapshot.addresses == (3 if headless else 1)


#: The issue's figures: 30 fresh channels of 10 calls each on one detector, 20 runs. The
#: channels of a run go ten at a time (threads, or tasks of one loop): each still dials its own
#: connection, which lands where the Service sends it; the pure test repeats the core 300 times.
RUNS, SHORT_CHANNELS, SHORT_CALLS = 20, 30, 10


def short_channels_sync(target: str, options: ObserveOptions) -> None:
    with ThreadPoolExecutor(WAVE) as pool:
        runs = [
            pool.submit(run_sync, target, options, SHORT_CALLS, channel_options=FRESH)
            for _ in range(SHORT_CHANNELS)
        ]
        assert [run.result()[0] for run in runs] == [SHORT_CALLS] * SHORT_CHANNELS


async def short_channels_aio(target: str, options: ObserveOptions) -> None:
    for _ in range(SHORT_CHANNELS // WAVE):
        runs = [run_aio(target, options, SHORT_CALLS, channel_options=FRESH) for _ in range(WAVE)]
        assert [made for made, _ in await asyncio.gather(*runs)] == [SHORT_CALLS] * WAVE


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_a_detector_shared_by_many_short_channels_never_alarms(
    spread_cluster: LocalCluster, mode: str
) -> None:
    """30 fresh channels of 10 calls each through the L4 Service, 20 times."""
    target = spread_cluster.service_target
    raised: list[AffinityState] = []
    for _ in range(RUNS):
        alarms, registry = Alarms(), AffinityRegistry()
        options = _options(registry, alarms, expected_pods=3)
        if mode == "sync":
            await asyncio.to_thread(short_channels_sync, target, options)
        else:
            await short_channels_aio(target, options)
        raised += alarms.raised
        snapshot = registry.detector(target).snapshot()
        assert snapshot.lanes == snapshot.connections == SHORT_CHANNELS, snapshot
        # The channels are spread over the pods: more than one holds them, none holds all.
        assert len(snapshot.connection_pods) >= 2, snapshot
        assert snapshot.state is AffinityState.BALANCED, snapshot
    print(f"{mode}: {RUNS} runs, alarms {raised}, last {snapshot}")
    assert raised == []


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_client_ip_session_affinity_is_named(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(
        pods=3, service="iptables", session_affinity="ClientIP", dns=None
    )
    target, registry = cluster.service_target, AffinityRegistry()
    probe = PodProbe(target, registry.detector(target), interval_s=0.05)
    options = _options(registry, Alarms(), expected_pods=3, probe=probe)
    caplog.set_level(logging.WARNING, logger="grpc_balance_mw.probe")

    def named(detector: AffinityDetector) -> bool:
        return detector.snapshot().cause == "same_pod_every_connection"

    if mode == "sync":
        made, detector = await asyncio.to_thread(run_sync, target, options, 2000, stop=named)
    else:
        made, detector = await run_aio(target, options, 2000, pace_s=0.001, stop=named)
    probe.join(5)
    snapshot = detector.snapshot()
    print(f"ClientIP {mode}: named after {made} calls, {probe.rounds} probe rounds, {snapshot}")
    assert detector.state is AffinityState.PINNED and named(detector), snapshot
    assert "sessionAffinity" in (snapshot.advice or "")
    assert snapshot.probe_connections >= 9 and len(snapshot.connection_pods) == 1
    assert any("sessionAffinity" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("mode", "service"), [("sync", "headless"), ("aio", "headless"), ("sync", "clusterip")]
)
async def test_a_pod_added_by_a_scale_up_is_known_within_one_probe_round(
    local_cluster_factory: Factory, caplog: pytest.LogCaptureFixture, mode: str, service: str
) -> None:
    """Headless: the probe dials every address of the answer. ClusterIP: its connections per
    round follow the pods known (20 for 3), so the first round after the scale-up reaches the
    new pod but 0.3 % of the time (three connections, the old default, missed it 42 %)."""
    cluster = local_cluster_factory(pods=3, service="userspace", dns="embedded")
    target = cluster.headless_target if service == "headless" else cluster.service_target
    registry = AffinityRegistry()
    probe = PodProbe(target, registry.detector(target), interval_s=0.5)
    options = _options(registry, Alarms(), probe=probe)
    caplog.set_level(logging.INFO, logger="grpc_balance_mw.telemetry")
    # pick_first on the headless name: the channel's calls stay on one pod; only the probe can
    # learn the others, and the new one.
    async with contextlib.AsyncExitStack() as stack:
        if mode == "sync":
            channel = grpc.insecure_channel(target, options=FRESH)
            observed: Any = stack.enter_context(observe(channel, options))
            get = pb_grpc.ChargePointsStub(observed).GetChargePoint

            async def call() -> None:
                await asyncio.to_thread(get, _REQUEST, timeout=10)

        else:
            aio_channel = grpc.aio.insecure_channel(target, options=FRESH)
            observed = await stack.enter_async_context(observe_aio(aio_channel, options))
            aio_get = pb_grpc.ChargePointsStub(observed).GetChargePoint

            async def call() -> None:
                await aio_get(_REQUEST, timeout=10)

        deadline = time.monotonic() + 20  # bounds both loops
        # Before the scale-up, every pod known: through the ClusterIP the first round's 10
        # connections miss one of the two pods the calls did not show 3.5 % of the time, so
        # the rounds go on until they have them all (the next round, but rarely).
        everyone = {p.name for p in cluster.pods}
        while time.monotonic() < deadline and (
            probe.rounds < 1 or set(observed.detector.snapshot().known_pods) != everyone
        ):
            await call()
            await asyncio.sleep(0.01)
        assert set(observed.detector.snapshot().known_pods) == everyone
        await asyncio.to_thread(cluster.scale, 4)
        new = cluster.pods[-1].name
        scaled_at, rounds = time.monotonic(), probe.rounds
        # A round that started after the scale-up has finished: it must have learned the pod.
        while probe.rounds < rounds + 2 and time.monotonic() < deadline:
            await call()
            await asyncio.sleep(0.01)
        learned_s = time.monotonic() - scaled_at
        # Pod events go out with the next call's span and log line: one after the last round.
        await call()
        snapshot = observed.detector.snapshot()
    probe.join(5)
    print(f"scale-up {mode}: {new} known {learned_s:.2f}s later (interval 0.5 s), {snapshot}")
    assert new in snapshot.known_pods
    assert snapshot.dns_pods == (4 if service == "headless" else 0), snapshot
    assert any(f"pod_added {new}" in r.getMessage() for r in caplog.records)


def test_any_l7_proxy_is_recognised_by_its_pod_switches(local_cluster_factory: Factory) -> None:
    """nginx grpc_pass (HAProxy is above): no Envoy headers, the pods switching between calls
    on one connection tell."""
    cluster = local_cluster_factory(pods=3, dns=None, l7="nginx")
    alarms, registry = Alarms(), AffinityRegistry()
    _, detector = run_sync(cluster.l7_target, _options(registry, alarms), 60)
    snapshot = detector.snapshot()
    assert detector.state is AffinityState.L7_BALANCED and alarms.raised == [], snapshot
    assert snapshot.l7_share == 0.0 and snapshot.per_request_lanes == 1
