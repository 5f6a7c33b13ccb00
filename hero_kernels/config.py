"""Run-time input checks, switchable globally.

Data-dependent checks (label range, NaN/+inf) read the inputs; on CUDA each costs one device sync per
call, so by default the label check runs for CPU tensors only. They run inside the custom ops, so they
are opaque to torch.compile and never graph-break.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Optional

__all__ = ["Checks", "get_checks", "set_checks", "checks"]


def _env_flag(name: str, default):
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Checks:
    """labels: raise on a label outside [0, V) that is not ignore_index. True: always; False: never;
    None (default): for CPU tensors only (on a GPU the check syncs the host; the kernels write a NaN row
    for such a label instead).
    finite: raise on NaN / +inf in float inputs, -inf (masking) accepted (default off: one extra read)."""

    labels: Optional[bool] = None
    finite: bool = False


_current = Checks(
    labels=_env_flag("HERO_KERNELS_CHECK_LABELS", None),
    finite=_env_flag("HERO_KERNELS_CHECK_FINITE", False),
)


def get_checks() -> Checks:
    return _current


def set_checks(**kwargs) -> Checks:
    """Set checks globally, e.g. ``set_checks(finite=True)``. Returns the previous setting."""
    global _current
    prev = _current
    _current = replace(_current, **kwargs)
    return prev


@contextlib.contextmanager
def checks(**kwargs):
    """Context manager: ``with checks(finite=True): ...``."""
    prev = set_checks(**kwargs)
    try:
        yield _current
    finally:
        set_checks(labels=prev.labels, finite=prev.finite)
