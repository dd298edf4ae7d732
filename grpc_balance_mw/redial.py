"""Deprecated name of :mod:`grpc_balance_mw.dial_per_request`, kept for one release.

Every name there is still found here; importing this module warns (``DeprecationWarning``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW = "grpc_balance_mw.dial_per_request"
warnings.warn(
    "grpc_balance_mw.redial is deprecated: import from grpc_balance_mw.dial_per_request",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(importlib.import_module(_NEW), name)


def __dir__() -> list[str]:
    return dir(importlib.import_module(_NEW))
