"""Small option dataclasses passed from the public ops to the backends (no long positional lists)."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RowOptions", "IMPLS"]

#: Accepted values of every public op's ``impl`` argument.
IMPLS = ("auto", "triton", "cuda", "cpu", "torch")


@dataclass(frozen=True)
class RowOptions:
    """Per-row math options shared by every backend.

    temperature: sampling temperature tau > 0; every quantity uses logits / tau.
    ignore_index: label value that masks a row (its outputs are 0 and it gets no gradient).
    """

    temperature: float = 1.0
    ignore_index: int = -100

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"temperature must be a Python float, got {type(t).__name__}")
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {t}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        # Python floats become float64 under Inductor; store a plain float so backends can cast explicitly.
        object.__setattr__(self, "temperature", float(t))

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature
