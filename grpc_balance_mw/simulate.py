"""A fleet simulator: many clients' balanced channels behind one ClusterIP, to reason at scales
one machine cannot run (hundreds of client replicas, hundreds of pods).

Pure and deterministic for a seed: a discrete-event simulation with :mod:`heapq` and one
:class:`random.Random`, no gRPC, no clock. What it models, and what it leaves out:

- **kube-proxy**: every new connection lands on a pod drawn uniformly at random (iptables'
  ``statistic --mode random`` chains), whatever the client wants.
- **lanes**: each client keeps ``lanes`` connections on distinct pods, as the pool does (a dial that
  reaches a pod another of its lanes holds is dialled again, up to ``duplicate_redials`` times).
  Each lane is rotated by age as :func:`~grpc_balance_mw.pool.rotate_after_age` does (``rotate_s``
  +/- 20 %): a replacement is dialled, the old lane takes no new calls, and it closes when its last
  call ends. While two lanes share a pod, scouts look for a pod none holds (checked once a
  second). Dials take no time; health checks and scouts' own reports are not modelled.
- **picking**: each client picks among its lanes with the package's own picker on real
  :class:`~grpc_balance_mw.pool.Lane` objects (its in-flight counts are the client's own calls,
  as in the pool): :class:`~grpc_balance_mw.pool.Weighted`, the pool's default (``picker=
  "weighted"``), or :class:`~grpc_balance_mw.pool.LeastOutstanding` (``"least-outstanding"``).
- **the pods' load reports to the picker** (``"weighted"``): each pod has the server half's own
  :class:`~grpc_balance_mw.load_meter.LoadMeter` (capacity ``concurrency``, on the simulated
  clock); a call's end gives its report, which the client's picker reads at most once per lane
  per :data:`~grpc_balance_mw.pool.weights.READ_EVERY_S`, as the pool does. A call counts from
  its arrival, queued or served, as in a server whose handler waits for a slot (the local
  cluster's pods; a grpcio server whose executor queues calls before any handler runs would
  report at most 1.0, and A58's weight would not see its queue).
- **calls**: each client calls at ``rate`` per second (Poisson); a pod serves ``concurrency`` calls
  at once, each taking an exponential time of mean ``service_s``, and queues the rest (FIFO). A
  call's latency is its wait plus its service.
- **load reports** (with ``subset_rule``): each dial and each answered call tells the client its
  pod's connection count and utilization; the client keeps them in a
  :class:`~grpc_balance_mw.subset.LoadBook` and applies :class:`~grpc_balance_mw.subset.SubsetRule`
  when it dials (redial a pod far above the mean) and once a second per lane (leave such a pod,
  or move to a pod holding fewer: at most one move a client a second, as the pool).

Results: ``max_share_over_fair`` (the busiest pod's served calls over the fair share),
``connections_per_pod_max_over_mean`` (the worst of one-second samples; ``..._mean_...``: their
mean; ``..._end_...``: at the end), ``lanes_per_client_max`` (lanes taking calls at once),
``connections_per_client_max`` (draining lanes and a replacement's overlap included), latency
percentiles, dials and redials, lanes that left a crowded pod, lanes moved to a pod holding fewer
connections (``moves``; ``move_dials``: the dials that looked for one, kept or not).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.load_meter import LoadMeter
from grpc_balance_mw.pool.lane import Lane, LaneState
from grpc_balance_mw.pool.pickers import LeastOutstanding, Weighted
from grpc_balance_mw.subset import LoadBook, SubsetRule

__all__ = ["PICKERS", "FleetConfig", "FleetResult", "simulate"]

#: The pickers a simulated client may use: the pool's default first.
PICKERS = ("weighted", "least-outstanding")

#: Event kinds, ordered so that at equal times a call ends before another arrives.
_DONE, _ARRIVE, _ROTATE, _TICK = 0, 1, 2, 3
#: rotate_after_age's default jitter.
_JITTER = 0.2


@dataclass(frozen=True)
class FleetConfig:
    """One fleet: its clients, pods, lanes and load.

    Attributes:
        clients: client replicas, each with one balanced channel.
        pods: pods behind the Service.
        lanes: lanes per client (at most ``pods``).
        seconds: simulated time during which calls arrive (calls in flight then are finished).
        seed: the random seed; the same config and seed give the same result.
        rate: calls per second per client; None: what loads the pods to ``load``.
        load: the fleet's utilization when ``rate`` is None (0..1 of all pods' capacity).
        concurrency: calls a pod serves at once.
        service_s: a call's mean service time (exponential).
        rotate_s: lanes are rotated after this (+/- 20 %); None: never.
        duplicate_redials: dials per lane to reach a pod the client's other lanes do not hold.
        scouts_per_s: while two lanes of a client share a pod, this many fresh connections a
            second look for a pod none holds (the pool's scouts); one that finds one moves a lane.
        subset_rule: the rule that keeps the subsets even by load reports; None: plain random.
        report_ttl_s: how long a client trusts a pod's report.
        picker: ``"weighted"`` (the pool's default, fed by the pods' load reports) or
            ``"least-outstanding"`` (the client's own calls in flight only).
        slow_pods: this many pods (the first) serve ``slow_factor`` times slower (a noisy
            node); ``load`` is still counted at full speed.
        slow_factor: how much slower they serve.
    """

    clients: int = 500
    pods: int = 200
    lanes: int = 6
    seconds: float = 60.0
    seed: int = 0
    rate: float | None = None
    load: float = 0.6
    concurrency: int = 4
    service_s: float = 0.1
    rotate_s: float | None = 60.0
    duplicate_redials: int = 6
    scouts_per_s: int = 4
    subset_rule: SubsetRule | None = field(default_factory=SubsetRule)
    report_ttl_s: float = 30.0
    picker: str = "weighted"
    slow_pods: int = 0
    slow_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.picker not in PICKERS:
            raise ConfigurationError(f"picker must be one of {PICKERS}, got {self.picker!r}")
        if not 0 <= self.slow_pods <= self.pods or self.slow_factor <= 0:
            raise ConfigurationError(
                f"need 0 <= slow_pods <= pods and slow_factor > 0, got {self.slow_pods} and "
                f"{self.slow_factor}"
            )
        if self.clients < 1 or self.pods < 1 or not 1 <= self.lanes <= self.pods:
            raise ConfigurationError(
                f"a fleet needs clients >= 1, pods >= 1 and 1 <= lanes <= pods, got "
                f"{self.clients} clients, {self.pods} pods, {self.lanes} lanes"
            )
        if self.seconds <= 0 or self.service_s <= 0 or self.concurrency < 1:
            raise ConfigurationError("seconds, service_s and concurrency must be positive")
        if self.rate is None and not 0 < self.load <= 10:
            raise ConfigurationError(f"load must be in (0, 10], got {self.load}")
        if self.rate is not None and self.rate <= 0:
            raise ConfigurationError(f"rate must be positive, got {self.rate}")
        if self.rotate_s is not None and self.rotate_s <= 0:
            raise ConfigurationError(f"rotate_s must be positive, got {self.rotate_s}")

    def client_rate(self) -> float:
        """Calls per second per client."""
        if self.rate is not None:
            return self.rate
        return self.load * self.pods * self.concurrency / self.service_s / self.clients


@dataclass(frozen=True)
class FleetResult:
    """What one simulated run measured (see the module's docstring)."""

    clients: int
    pods: int
    lanes: int
    seconds: float
    seed: int
    rebalance_subset: bool
    picker: str
    calls: int
    served: int
    max_share_over_fair: float
    min_share_over_fair: float
    connections_per_pod_max_over_mean: float
    connections_per_pod_end_max_over_mean: float
    connections_per_pod_mean_max_over_mean: float
    lanes_per_client_max: int
    connections_per_client_max: int
    p50_ms: float
    p99_ms: float
    utilization: float
    dials: int
    redials: int
    leaves: int
    moves: int
    move_dials: int
    served_per_pod: list[int]

    def summary(self) -> dict[str, Any]:
        """The result as a JSON-ready dict, without the per-pod list."""
        out = asdict(self)
        del out["served_per_pod"]
        return out


class _Client:
    __slots__ = ("active", "book", "closing", "index", "lane_ids", "picker", "picks")

    def __init__(
        self, index: int, rng: random.Random, ttl_s: float, picker: LeastOutstanding
    ) -> None:
        self.index = index
        self.active: list[Lane] = []
        self.closing = 0  # draining lanes with calls still on them
        self.picker = picker
        self.picks = 0
        self.lane_ids = 0
        self.book = LoadBook(ttl_s)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def simulate(config: FleetConfig) -> FleetResult:
    """Run one fleet for ``config.seconds`` of simulated time and measure it."""
    rng = random.Random(config.seed)
    n_pods = config.pods
    rule = config.subset_rule
    names = [f"pod-{i}" for i in range(n_pods)]
    conns = [0] * n_pods
    busy = [0] * n_pods
    served = [0] * n_pods
    queues: list[deque[tuple[int, Lane, float]]] = [deque() for _ in range(n_pods)]
    clock = [0.0]  # the simulated time, for the pods' meters and the pickers' updates

    def now_s() -> float:
        return clock[0]

    weighted = config.picker == "weighted"
    meters = [  # only the weighted picker reads the pods' reports
        LoadMeter(config.concurrency, clock=now_s, cpu_clock=lambda: 0.0, cpus=1)
        for _ in range(n_pods if weighted else 0)
    ]

    def picker() -> LeastOutstanding:
        return Weighted(rng=rng, clock=now_s) if weighted else LeastOutstanding(rng=rng)

    clients = [_Client(i, rng, config.report_ttl_s, picker()) for i in range(config.clients)]
    events: list[tuple[float, int, int, Any]] = []
    seq = 0
    latencies: list[float] = []
    dials = redials = leaves = moves = move_dials = 0
    lanes_max = client_conns_max = 0
    conc = config.concurrency
    service_rates = [
        1.0 / (config.service_s * (config.slow_factor if pod < config.slow_pods else 1.0))
        for pod in range(n_pods)
    ]
    rotate_s = config.rotate_s

    def push(at: float, kind: int, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, kind, seq, payload))

    def report(client: _Client, pod: int, now: float) -> None:
        client.book.record(names[pod], conns[pod], now, busy[pod] / conc)

    def dial(client: _Client, now: float, replacing: Lane | None) -> int:
        """A pod for a new lane of ``client``: kube-proxy's random pick, redialled as the pool
        (a pod another lane holds: not the one ``replacing`` leaves) and the subset rule (a pod
        far above the mean) say."""
        nonlocal dials, redials
        held = {lane.connection for lane in client.active if lane is not replacing}
        attempts = max(config.duplicate_redials, rule.redials if rule is not None else 0)
        mean = client.book.mean_connections(now) if rule is not None else None
        pod = 0
        for attempt in range(attempts + 1):
            dials += 1
            redials += attempt > 0
            pod = rng.randrange(n_pods)
            if rule is not None:
                # The dial's health check answers with the pod's report (this connection in it).
                client.book.record(names[pod], conns[pod] + 1, now, busy[pod] / conc)
            if pod in held and len(held) < n_pods and attempt < config.duplicate_redials:
                continue
            if rule is not None and not rule.accepts(conns[pod] + 1, mean, attempt):
                continue
            break
        return pod

    def dial_fewer(client: _Client, now: float, left: float, mean: float) -> int | None:
        """A pod holding fewer connections than a moving lane's pod (``left``, the lane
        included), within the rule's redials; None if every dial missed (the lane stays)."""
        nonlocal dials, move_dials
        assert rule is not None
        held = {other.connection for other in client.active}
        for _ in range(rule.redials + 1):
            dials += 1
            move_dials += 1
            pod = rng.randrange(n_pods)
            client.book.record(names[pod], conns[pod] + 1, now, busy[pod] / conc)
            if pod not in held and rule.improves(conns[pod] + 1, left, mean):
                return pod
        return None

    def open_lane(
        client: _Client, now: float, replacing: Lane | None = None, pod: int | None = None
    ) -> None:
        nonlocal client_conns_max
        if pod is None:
            pod = dial(client, now, replacing)
        client.lane_ids += 1
        lane = Lane(client.lane_ids, now)
        lane.state = LaneState.ACTIVE
        lane.pod = names[pod]
        lane.connection = pod
        lane.activated_at = now
        conns[pod] += 1
        client.active.append(lane)
        client_conns_max = max(client_conns_max, len(client.active) + client.closing)
        if rotate_s is not None:
            # Lanes of a fleet that has run for a while are of every age: the first ones are
            # due at any time within one period.
            if replacing is None:
                lane.rotate_at = now + rng.uniform(0, rotate_s * (1 + _JITTER))
            else:
                lane.rotate_at = now + rotate_s * (1 + rng.uniform(-_JITTER, _JITTER))
            push(lane.rotate_at, _ROTATE, (client, lane))

    def retire(
        client: _Client, lane: Lane, now: float, reason: str, pod: int | None = None
    ) -> None:
        """Replace ``lane`` (by a lane on ``pod`` if given): its successor first, then drain it."""
        nonlocal lanes_max
        open_lane(client, now, replacing=lane, pod=pod)
        client.active.remove(lane)
        lanes_max = max(lanes_max, len(client.active))
        lane.state = LaneState.DRAINING
        lane.reason = reason
        if lane.in_flight == 0:
            lane.state = LaneState.CLOSED
            conns[lane.connection] -= 1
        else:
            client.closing += 1

    def scout(client: _Client, now: float) -> None:
        """The pool's scouts (``scouts_per_s`` fresh connections a second) while two lanes of
        ``client`` share a pod: one that reaches a pod no lane holds takes over one of them."""
        nonlocal dials
        held: dict[int, Lane] = {}
        doubled: Lane | None = None
        for lane in client.active:
            if lane.connection in held:
                doubled = lane
            held[lane.connection] = lane
        if doubled is None or len(held) >= n_pods:
            return
        for _ in range(config.scouts_per_s):
            dials += 1
            pod = rng.randrange(n_pods)
            if pod not in held:
                retire(client, doubled, now, "doubled", pod)
                return

    def start(pod: int, client_index: int, lane: Lane, arrived: float, now: float) -> None:
        push(now + rng.expovariate(service_rates[pod]), _DONE, (pod, client_index, lane, arrived))

    # Clients start in a random order within the first second, each opening its lanes in turn,
    # so that the later ones see the earlier ones' connections in the reports.
    order = list(range(config.clients))
    rng.shuffle(order)
    for position, index in enumerate(order):
        at = position / config.clients
        for _ in range(config.lanes):
            open_lane(clients[index], at)
    lanes_max = max(len(client.active) for client in clients)
    total_rate = config.client_rate() * config.clients
    push(1.0 + rng.expovariate(total_rate), _ARRIVE, None)
    push(2.0, _TICK, None)
    end = 1.0 + config.seconds
    calls = 0
    worst_conns = conns_ratio_sum = 0.0
    samples = 0

    while events:
        now, kind, _, payload = heapq.heappop(events)
        clock[0] = now
        if kind == _DONE:
            pod, client_index, lane, arrived = payload
            served[pod] += 1
            latencies.append(now - arrived)
            lane.in_flight -= 1
            client = clients[client_index]
            if weighted:
                load_report = meters[pod].end()
                picking = client.picker
                if isinstance(picking, Weighted) and (
                    lane.load is None or now >= lane.load.read_after
                ):
                    picking.reported(lane, load_report, now)
            if lane.state is LaneState.DRAINING and lane.in_flight == 0:
                lane.state = LaneState.CLOSED
                conns[pod] -= 1
                client.closing -= 1
            if rule is not None:
                report(client, pod, now)
            queue = queues[pod]
            if queue:
                waiting_client, waiting_lane, waiting_since = queue.popleft()
                start(pod, waiting_client, waiting_lane, waiting_since, now)
            else:
                busy[pod] -= 1
            continue
        if now >= end:
            continue  # past the end only the calls in flight finish
        if kind == _ARRIVE:
            push(now + rng.expovariate(total_rate), _ARRIVE, None)
            client = clients[rng.randrange(config.clients)]
            lane = client.picker(client.active)
            client.picks += 1
            lane.last_picked = client.picks
            lane.in_flight += 1
            lane.calls += 1
            calls += 1
            pod = lane.connection
            if weighted:
                meters[pod].start()  # the handler waits for a slot: queued calls count
            if busy[pod] < conc:
                busy[pod] += 1
                start(pod, client.index, lane, now, now)
            else:
                queues[pod].append((client.index, lane, now))
        elif kind == _ROTATE:
            client, lane = payload
            if lane.state is LaneState.ACTIVE:
                retire(client, lane, now, "age")
        else:  # _TICK: sample the connections, and let lanes leave crowded pods
            push(now + 1.0, _TICK, None)
            for client in clients:
                scout(client, now)
            mean_conns_all = sum(conns) / n_pods
            worst_conns = max(worst_conns, max(conns) / mean_conns_all)
            conns_ratio_sum += max(conns) / mean_conns_all
            samples += 1
            if rule is None:
                continue
            for client in clients:
                mean = client.book.mean_connections(now)
                if mean is None:
                    continue
                least = client.book.least_connections(now)
                moved = False
                for lane in list(client.active):
                    known = client.book.get(names[lane.connection], now)
                    if known is None:
                        continue
                    chance = rule.leave_probability(known.connections, mean)
                    if chance > 0 and rng.random() < chance:
                        leaves += 1
                        retire(client, lane, now, "crowded")
                        continue
                    chance = rule.move_probability(known.connections, mean, least)
                    if moved or chance <= 0 or rng.random() >= chance:
                        continue
                    moved = True
                    found = dial_fewer(client, now, known.connections, mean)
                    if found is not None:
                        moves += 1
                        retire(client, lane, now, "evened", found)

    latencies.sort()
    total_served = sum(served)
    fair = total_served / n_pods if total_served else 1.0
    return FleetResult(
        clients=config.clients,
        pods=n_pods,
        lanes=config.lanes,
        seconds=config.seconds,
        seed=config.seed,
        rebalance_subset=rule is not None,
        picker=config.picker,
        calls=calls,
        served=total_served,
        max_share_over_fair=round(max(served) / fair, 4),
        min_share_over_fair=round(min(served) / fair, 4),
        connections_per_pod_max_over_mean=round(worst_conns, 4),
        connections_per_pod_end_max_over_mean=round(max(conns) / (sum(conns) / n_pods), 4),
        connections_per_pod_mean_max_over_mean=round(conns_ratio_sum / max(samples, 1), 4),
        lanes_per_client_max=lanes_max,
        connections_per_client_max=client_conns_max,
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 3),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 3),
        utilization=round(total_served * config.service_s / (config.seconds * n_pods * conc), 4),
        dials=dials,
        redials=redials,
        leaves=leaves,
        moves=moves,
        move_dials=move_dials,
        served_per_pod=served,
    )
