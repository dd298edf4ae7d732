"""A sliding window of which pod served each call, bounded by count and by age."""

from __future__ import annotations

from collections import deque

#: One call: (at, pod, weight, l7). A plain tuple: building it is on every call's path.
_Sample = tuple[float, str | None, float, bool]


class PodWindow:
    """Calls of the last ``max_age_s`` seconds, at most ``max_calls`` of them, with running totals.

    Totals are kept incrementally so adding a call costs O(1) whatever the window size; ``None``
    stands for a call whose pod is unknown.
    """

    def __init__(self, max_calls: int, max_age_s: float) -> None:
        self.max_calls = max_calls
        self.max_age_s = max_age_s
        self._samples: deque[_Sample] = deque()
        self.calls: dict[str | None, int] = {}
        self.weights: dict[str | None, float] = {}
        self.l7_calls = 0

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, pod: str | None, weight: float, l7: bool, now: float) -> None:
        samples = self._samples
        samples.append((now, pod, weight, l7))
        self.calls[pod] = self.calls.get(pod, 0) + 1
        self.weights[pod] = self.weights.get(pod, 0.0) + weight
        if l7:
            self.l7_calls += 1
        if len(samples) > self.max_calls:
            self._drop_oldest()
        if samples[0][0] < now - self.max_age_s:
            self.evict(now)

    def ages_out(self, now: float) -> bool:
        """Whether the oldest call is older than the window (cheap: one comparison). Safe
        without the detector's lock: a window emptied meanwhile has nothing to age out."""
        try:
            return self._samples[0][0] < now - self.max_age_s
        except IndexError:
            return False

    def evict(self, now: float) -> None:
        """Forget calls older than the window."""
        horizon = now - self.max_age_s
        samples = self._samples
        while samples and samples[0][0] < horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, pod, weight, l7 = self._samples.popleft()
        left = self.calls[pod] - 1
        if left:
            self.calls[pod] = left
            # max() guards against float drift; the entry goes when its last call goes.
            self.weights[pod] = max(self.weights[pod] - weight, 0.0)
        else:
            del self.calls[pod]
            del self.weights[pod]
        if l7:
            self.l7_calls -= 1

    @property
    def identified_calls(self) -> int:
        return len(self._samples) - self.calls.get(None, 0)

    def top(self) -> tuple[str | None, float]:
        """The pod with the largest weight and its share of the identified weight."""
        best: str | None = None
        best_weight = 0.0
        total = 0.0
        for pod, weight in self.weights.items():
            if pod is None:
                continue
            total += weight
            if weight > best_weight:
                best, best_weight = pod, weight
        return best, (best_weight / total if total > 0 else 0.0)

    def shares(self) -> dict[str, tuple[int, float, float]]:
        """Per identified pod: calls, weight, share of the identified weight."""
        total = sum(w for pod, w in self.weights.items() if pod is not None)
        return {
            pod: (self.calls[pod], weight, weight / total if total > 0 else 0.0)
            for pod, weight in self.weights.items()
            if pod is not None
        }
