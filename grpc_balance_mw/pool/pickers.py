"""Pickers: which lane takes the next call. Small callable policy objects.

A picker is called under the pool's lock with the lanes that take calls now (never empty) and
returns one of them; it may keep state of its own (a cursor), which the lock protects.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.pool.lane import Lane

__all__ = ["LeastOutstanding", "Picker", "RoundRobin"]


class Picker(Protocol):
    """Chooses the lane for one call among ``lanes`` (at least one)."""

    def __call__(self, lanes: Sequence[Lane]) -> Lane: ...


class RoundRobin:
    """Each lane in turn."""

    def __init__(self) -> None:
        self._next = 0

    def __repr__(self) -> str:
        return "RoundRobin()"

    def __call__(self, lanes: Sequence[Lane]) -> Lane:
        lane = lanes[self._next % len(lanes)]
        self._next += 1
        return lane


class LeastOutstanding:
    """Envoy's ``least_request``: of ``choices`` lanes drawn at random, the one with the fewest
    calls in flight ("power of two choices"); among equals, the one picked least recently, so
    sequential calls (always 0 in flight) still spread evenly instead of by coin toss.

    Args:
        choices: lanes drawn per pick (2 is Envoy's default; more approaches least-of-all).
        rng: the random source (injected in tests).
    """

    def __init__(self, choices: int = 2, *, rng: random.Random | None = None) -> None:
        if choices < 2:
            raise ConfigurationError(f"LeastOutstanding needs choices >= 2, got {choices}")
        self.choices = choices
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        return f"LeastOutstanding(choices={self.choices})"

    def __call__(self, lanes: Sequence[Lane]) -> Lane:
        if len(lanes) <= self.choices:
            drawn: Sequence[Lane] = lanes
        else:
            drawn = self._rng.sample(lanes, self.choices)
        return min(drawn, key=_load)


def _load(lane: Lane) -> tuple[int, int]:
    return lane.in_flight, lane.last_picked
