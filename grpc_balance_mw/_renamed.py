"""Old module names kept for one release: each forwards every name to the module's new home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, new: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Warn that ``old`` is now ``new``; the ``__getattr__`` and ``__dir__`` that forward to it."""
    warnings.warn(f"{old} is deprecated: import from {new}", DeprecationWarning, stacklevel=3)

    def forward(name: str) -> Any:
        return getattr(importlib.import_module(new), name)

    def names() -> list[str]:
        return dir(importlib.import_module(new))

    return forward, names
