"""hero-kernels: fused entropy / log-prob / HERO-GRPO kernels.

Public API (../shared/DESIGN.md section 2)::

    from hero_kernels import entropy_logprob, linear_entropy_logprob, hero_loss, HEROLoss, entropy_weights

Importing is cheap: no device probing, no compilation; backends load on first use.
"""
from .config import checks, get_checks, set_checks
from .entropy_logprob import entropy_logprob
from .linear_entropy_logprob import linear_entropy_logprob
from .options import IMPLS, RowOptions

__version__ = "0.1.0"

__all__ = [
    "entropy_logprob",
    "linear_entropy_logprob",
    "RowOptions",
    "IMPLS",
    "checks",
    "get_checks",
    "set_checks",
]

try:  # the loss module lands separately; keep the kernels importable without it
    from .loss import HEROLoss, entropy_weights, hero_loss  # noqa: F401

    __all__ += ["hero_loss", "HEROLoss", "entropy_weights"]
except ImportError as _e:  # pragma: no cover
    if "loss" not in str(_e):
        raise
