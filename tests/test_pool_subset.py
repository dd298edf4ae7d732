"""``PoolConfig.subset``: the pool keeps its lanes off pods that report far more connections
than the mean (pure core: a fake clock and scripted checks that carry the pods' reports)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Mapping

from pool_fakes import FakeClock, KubeProxy, active_pods, run, scripted, settle

from grpc_balance_mw.cli.bench import Settings
from grpc_balance_mw.cli.bench_fleet import fleet_strategies
from grpc_balance_mw.cli.strategies import Targets, channel_for
from grpc_balance_mw.identity import DEFAULT_POD_HEADERS
from grpc_balance_mw.orca import (
    GRPCIO_TRAILER_KEY,
    TRAILER_KEY,
    LoadReport,
    encode_load_report,
)
from grpc_balance_mw.pool import CheckResult, Lane, LanePool, LaneState, PoolConfig, rotate_never
from grpc_balance_mw.pool.health import read_check
from grpc_balance_mw.subset import SubsetRule

HEADER = DEFAULT_POD_HEADERS[0]
QUIET = {f"pod-{i}": 5.0 for i in range(3, 9)}  # pods reached before, each at 5 connections


class Always(random.Random):
    """Draws 0.0: every chance the rule gives comes true."""

    def random(self) -> float:
        return 0.0


def reporting(pods: Iterable[str], load: Mapping[str, float]) -> Callable[[Lane], CheckResult]:
    """``scripted`` checks that carry each pod's reported connections (none for pods not in
    ``load``)."""
    check = scripted(pods)

    def reported(lane: Lane) -> CheckResult:
        result = check(lane)
        return dataclasses.replace(result, connections=load.get(result.pod or ""))

    return reported


def pool(config: PoolConfig, rng: random.Random | None = None) -> LanePool:
    clock = FakeClock()
    lanes = LanePool(config, clock=clock, rng=rng or random.Random(0), rotation=rotate_never())
    for pod, count in QUIET.items():
        lanes.load_book.record(pod, count, clock())
    return lanes


def one_lane(rule: SubsetRule | None, redials: int = 6) -> PoolConfig:
    return PoolConfig(
        min_lanes=1,
        max_lanes=1,
        follow_pods=False,
        redials=redials,
        scout_interval_s=None,
        subset=rule,
    )


def closed_reasons(lanes: LanePool, check: Callable[[Lane], CheckResult]) -> list[str]:
    reasons: list[str] = []
    for _ in range(20):
        plan = run(lanes, check)
        reasons += [lane.reason for lane in plan.close]
        if not plan.dial:
            return reasons
    raise AssertionError(f"still dialling: {lanes!r}")


def test_a_new_lane_on_a_crowded_pod_is_redialled_up_to_the_rules_bound_then_kept() -> None:
    lanes = pool(one_lane(SubsetRule(redials=2)))
    reasons = closed_reasons(lanes, reporting(["pod-0"] * 5, {"pod-0": 30.0}))
    # mean: (30 + 6 * 5) / 7. A pod counts a connection from its first call or third check:
    # neither a dial's check nor its confirmation (a name never seen) is in its count: + 1.
    assert reasons == ["crowded: 31 connections, mean 8.6", "crowded: 31 connections, mean 8.6"]
    assert lanes.dials == 3 and lanes.crowded == 2 and lanes.left_crowded == 0
    assert active_pods(lanes) == ["pod-0"]


def test_the_pools_redials_bound_the_crowded_redials_too() -> None:
    lanes = pool(one_lane(SubsetRule(redials=10), redials=1))
    reasons = closed_reasons(lanes, reporting(["pod-0"] * 5, {"pod-0": 30.0}))
    assert len(reasons) == 1 and reasons[0].startswith("crowded: 31 connections")
    assert active_pods(lanes) == ["pod-0"]


def test_a_redial_that_reaches_an_even_pod_is_kept() -> None:
    lanes = pool(one_lane(SubsetRule()))
    check = reporting(["pod-0", "pod-1"], {"pod-0": 30.0, "pod-1": 6.0})
    assert len(closed_reasons(lanes, check)) == 1
    assert active_pods(lanes) == ["pod-1"]


def test_without_reports_the_rule_changes_nothing() -> None:
    def lanes_of(rule: SubsetRule | None) -> tuple[list[str | None], int]:
        config = PoolConfig(expected_pods=6, max_lanes=4, scout_interval_s=None, subset=rule)
        lanes = LanePool(config, clock=FakeClock(), rng=random.Random(3))
        settle(lanes, KubeProxy(6, random.Random(4)))  # KubeProxy's checks carry no report
        return active_pods(lanes), lanes.dials

    assert lanes_of(SubsetRule()) == lanes_of(None)
    lanes = pool(one_lane(SubsetRule()))
    assert closed_reasons(lanes, reporting(["pod-0"], {})) == []
    assert lanes.crowded == 0


def three_crowded_lanes(rng: random.Random) -> tuple[LanePool, Callable[[Lane], CheckResult]]:
    config = PoolConfig(
        min_lanes=3, max_lanes=3, scout_interval_s=None, subset=SubsetRule(leave_damping=1.0)
    )
    lanes = pool(config, rng)
    load = {"pod-0": 5.0, "pod-1": 5.0, "pod-2": 5.0, "pod-3": 5.0, "pod-4": 5.0}
    check = reporting(["pod-0", "pod-1", "pod-2", "pod-3", "pod-4"], load)
    settle(lanes, check)
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    for pod in ("pod-0", "pod-1", "pod-2"):
        load[pod] = 40.0  # other clients crowded them since
    return lanes, check


def test_a_lane_on_a_crowded_pod_leaves_one_a_round_replacement_first() -> None:
    lanes, check = three_crowded_lanes(Always())
    clock: FakeClock = lanes.clock  # type: ignore[assignment]
    clock.advance(lanes.config.health_interval_s)
    plan = run(lanes, check)  # all three checked: one leaves
    assert len(plan.check) == 3
    leaving = [lane for lane in lanes.lanes if lane.reason == "rotating: crowded pod"]
    assert len(leaving) == 1 and leaving[0].state is LaneState.ACTIVE
    assert [lane.replaces for lane in lanes.lanes if lane.state is LaneState.DIALING] == [
        leaving[0].id
    ]
    run(lanes, check)  # the replacement reaches pod-3, then the old lane drains
    assert leaving[0].state is LaneState.DRAINING
    assert leaving[0].reason == "crowded pod"
    assert [lane.pod for lane in lanes.lanes if lane.state is LaneState.ACTIVE][-1] == "pod-3"
    assert lanes.crowded == lanes.left_crowded == 1


def test_a_lane_never_leaves_when_the_odds_say_stay() -> None:
    class Never(random.Random):
        def random(self) -> float:
            return 0.999999

    lanes, check = three_crowded_lanes(Never())
    lanes.clock.advance(lanes.config.health_interval_s)  # type: ignore[attr-defined]
    plan = run(lanes, check)
    assert len(plan.check) == 3
    assert lanes.crowded == 0 and not any(lane.state is LaneState.DIALING for lane in lanes.lanes)


def test_the_only_lane_never_leaves() -> None:
    config = dataclasses.replace(one_lane(SubsetRule(leave_damping=1.0)))
    lanes = pool(config, Always())
    load = {"pod-0": 5.0}
    check = reporting(["pod-0"], load)
    settle(lanes, check)
    load["pod-0"] = 40.0
    lanes.clock.advance(lanes.config.health_interval_s)  # type: ignore[attr-defined]
    plan = run(lanes, check)
    assert len(plan.check) == 1
    assert lanes.crowded == 0 and lanes.dials == 1


def test_a_checks_trailers_carry_the_pods_connections_and_a_bad_report_is_ignored() -> None:
    report = encode_load_report(LoadReport(named_metrics={"connections": 12.0, "in_flight": 1}))
    named = [(HEADER, "pod-7")]
    good = read_check("OK", True, named, [(GRPCIO_TRAILER_KEY, report)])
    assert good == CheckResult(True, "pod-7", True, connections=12.0)
    bad = read_check("OK", True, named, [(GRPCIO_TRAILER_KEY, b"\xff\xff")])
    assert bad == CheckResult(True, "pod-7", True)
    # The standard key never reaches a grpcio client; the pool reads only the one it can.
    assert read_check("OK", True, named, [(TRAILER_KEY, report)]).connections is None
    assert read_check("OK", True, named).connections is None


def test_the_fleet_bench_runs_balanced_subset_after_balanced_with_the_rule() -> None:
    assert fleet_strategies(Settings())[:3] == ("plain", "dial-per-request", "headless-round-robin")
    names = fleet_strategies(Settings())
    assert names[names.index("balanced") + 1] == "balanced-subset"
    assert fleet_strategies(Settings(strategies=("balanced",))) == ("balanced",)
    config = PoolConfig(min_lanes=3, max_lanes=4)
    channel, _detector = channel_for("balanced-subset", Targets("127.0.0.1:1"), pool_config=config)
    try:
        pool_config = channel.pool.config  # type: ignore[attr-defined]
        assert pool_config.subset == SubsetRule() and pool_config.max_lanes == 4
    finally:
        channel.close()


def three_lanes_and_a_hole(
    dials: list[str], load: dict[str, float], rule: SubsetRule
) -> tuple[LanePool, Callable[[Lane], CheckResult], list[Lane]]:
    """Lanes on pods 0-2 (6 connections each), a pod the pool heard of holding 2 (the mean
    of what it knows is 5): one lane is due to move; later dials reach ``dials``."""
    config = PoolConfig(min_lanes=3, max_lanes=3, scout_interval_s=None, subset=rule)
    lanes = pool(config, Always())
    load.update({"pod-0": 5.0, "pod-1": 5.0, "pod-2": 5.0})
    check = reporting(["pod-0", "pod-1", "pod-2", *dials], load)
    settle(lanes, check)
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    load.update({"pod-0": 6.0, "pod-1": 6.0, "pod-2": 6.0})  # the lanes counted, others came
    clock: FakeClock = lanes.clock  # type: ignore[assignment]
    for pod, count in {"pod-0": 6.0, "pod-1": 6.0, "pod-2": 6.0, "pod-3": 2.0}.items():
        lanes.load_book.record(pod, count, clock())
    clock.advance(lanes.config.health_interval_s)
    run(lanes, check)  # every lane checked: one moves (the odds always come true here)
    moving = [lane for lane in lanes.lanes if lane.reason.startswith("rotating: moved")]
    assert len(moving) == 1 and moving[0].state is LaneState.ACTIVE
    return lanes, check, moving


def test_a_lane_above_the_mean_moves_to_a_pod_holding_fewer() -> None:
    lanes, check, [moving] = three_lanes_and_a_hole(["pod-3"], {"pod-3": 2.0}, SubsetRule())
    run(lanes, check)  # the replacement reaches pod-3: 3 connections with it, fewer than 6
    assert moving.state is LaneState.DRAINING
    assert moving.reason == "moved to a pod holding fewer connections"
    assert sorted(active_pods(lanes)) == ["pod-1", "pod-2", "pod-3"]
    assert lanes.evened == 1 and lanes.crowded == 0


def test_a_move_whose_dials_reach_no_pod_holding_fewer_is_given_up() -> None:
    # Dials reach pod-4 and pod-5 (5 connections, 6 with the new one: not fewer than 6), then
    # pod-1 (a pod a lane holds): the rule's 2 redials are spent and the lane stays.
    load = {"pod-4": 5.0, "pod-5": 5.0}
    lanes, check, [moving] = three_lanes_and_a_hole(
        ["pod-4", "pod-5", "pod-1"], load, SubsetRule(redials=2)
    )
    dials = lanes.dials
    reasons = closed_reasons(lanes, check)
    assert reasons == [
        "not fewer: 6 connections against 6",
        "not fewer: 6 connections against 6",
        "duplicate of pod-1",
    ]
    assert lanes.dials == dials + 2
    assert moving.state is LaneState.ACTIVE and moving.reason == ""
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    assert lanes.evened == 0


def test_no_lane_moves_while_the_pods_are_as_even_as_whole_connections_allow() -> None:
    # Every pod the pool knows holds 5 or 6: no pod holds 2 fewer than a lane's, nothing moves.
    config = PoolConfig(min_lanes=3, max_lanes=3, scout_interval_s=None, subset=SubsetRule())
    lanes = pool(config, Always())
    load = {"pod-0": 5.0, "pod-1": 5.0, "pod-2": 5.0}
    check = reporting(["pod-0", "pod-1", "pod-2"], load)
    settle(lanes, check)
    load.update({"pod-0": 6.0, "pod-1": 6.0, "pod-2": 6.0})
    for _ in range(5):
        lanes.clock.advance(lanes.config.health_interval_s)  # type: ignore[attr-defined]
        plan = run(lanes, check)
        assert len(plan.check) == 3 and not plan.dial
    assert lanes.evened == 0 and lanes.rotations == 0
