"""The package's own calls (health checks, scouts, probes) kept out of the user's traces.

OpenTelemetry instrumentations skip a call made while the context says "suppress
instrumentation": opentelemetry-instrumentation-grpc's sync and aio client interceptors check it
before they start a span (0.36b0 checks opentelemetry-api's key; later versions also the plain
string key that older instrumentations set), and so do its HTTP and database cousins. Both keys
are set here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context

from grpc_balance_mw._grpcio import SUPPRESS_KEYS

__all__ = ["suppressed"]

#: opentelemetry-api's key (``create_key("suppress_instrumentation")``), and the plain string
#: that opentelemetry-instrumentation's ``is_instrumentation_enabled`` also honours.
_KEYS = SUPPRESS_KEYS


@contextmanager
def suppressed() -> Iterator[None]:
    """Calls started inside make no span in OpenTelemetry's instrumentations.

    A ``grpc.aio`` call must be started inside (its interceptors run in a task that copies the
    context when the call is made); a sync call's interceptors run as it is invoked.
    """
    quiet = context.get_current()
    for key in _KEYS:
        quiet = context.set_value(key, True, quiet)
    token = context.attach(quiet)
    try:
        yield
    finally:
        context.detach(token)
