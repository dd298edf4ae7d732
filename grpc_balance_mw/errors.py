"""The package's exceptions: one root, a flat hierarchy."""

from __future__ import annotations


class BalanceError(Exception):
    """Root of every exception grpc_balance_mw raises."""


class ConfigurationError(BalanceError, ValueError):
    """A setting is invalid; raised at start-up, never on a call."""


class MalformedPodHeader(BalanceError, ValueError):
    """A response carried a pod identity header that is not a valid identity."""

    def __init__(self, header: str, value: object, reason: str) -> None:
        super().__init__(f"malformed {header!r} header {value!r}: {reason}")
        self.header = header
        self.value = value
        self.reason = reason
