"""The way in (sync): ``observe(channel)`` sees which pod served each call, without interceptors.

Usage::

    channel = observe(grpc.insecure_channel("charge-points.ev.svc:50051"),
                      ObserveOptions(expected_pods=3, telemetry=AffinityTelemetry()))
    stub = ChargePointsStub(channel)
    ...
    channel.detector.snapshot()

:class:`ObservedChannel` (:mod:`grpc_balance_mw.observed_methods`) does the observing, on the
inner channel's own multicallables (no ``grpc.intercept_channel`` machinery per call); the
balanced and dial-per-request channels observe their lanes with it. ``observe()`` sits above
them all, since ``rebalance=`` moves calls onto a balanced channel.
"""

from __future__ import annotations

import grpc

from grpc_balance_mw.observed_methods import ObservedChannel
from grpc_balance_mw.observing import ObserveOptions, observe_parts
from grpc_balance_mw.rebalance import Rebalance, Rebalancer

__all__ = ["ObservedChannel", "observe"]


def observe(
    channel: grpc.Channel,
    options: ObserveOptions | None = None,
    *,
    target: str | None = None,
    rebalance: Rebalance | None = None,
) -> ObservedChannel:
    """``channel``, observed: every call feeds its target's affinity detector; sync channels.

    Args:
        channel: a ``grpc.Channel`` (plain, intercepted or instrumented); closed with the result.
        options: what to observe with (expected pods, telemetry, probe...); defaults need none.
        target: the channel's target string, only for a channel whose target grpcio does not
            tell (a channel class of your own); read from the channel otherwise.
        rebalance: move calls onto connections of their own (a balanced channel made with its
            factory, retrying as its ``retry`` says) once the detector says the channel is
            pinned or skewed, or always; closed with the result. See
            :class:`~grpc_balance_mw.rebalance.Rebalance`. None: observe only.

    Raises:
        ConfigurationError: the target could not be learned from ``channel`` and was not given;
            the rebalance factory is a ``grpc.aio`` one.
    """
    target, observer, rebalancer = observe_parts(channel, options, target, rebalance, Rebalancer)
    return ObservedChannel(channel, observer, rebalancer=rebalancer)
