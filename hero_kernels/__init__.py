"""hero-kernels: fused entropy / log-prob / HERO-GRPO kernels.

Public API (docs/design.md, "API")::

    from hero_kernels import entropy_logprob, linear_entropy_logprob, hero_loss, HEROLoss, entropy_weights

Importing is cheap: no device probing, no compilation; backends load on first use.
"""
from .config import checks, get_checks, set_checks
from .entropy_logprob import entropy_logprob
from .grad_sketch import grad_sketch, linear_grad_sketch
from .linear_entropy_logprob import linear_entropy_logprob
from .loss import HEROLoss, hero_loss, loss_normalizer, metrics_to_floats
from .options import IMPLS, LOSS_AGGS, WEIGHT_ON, HEROLossConfig, RowOptions
from .weights import entropy_weights

__version__ = "0.1.0"

__all__ = [
    "entropy_logprob",
    "linear_entropy_logprob",
    "grad_sketch",
    "linear_grad_sketch",
    "hero_loss",
    "HEROLoss",
    "HEROLossConfig",
    "entropy_weights",
    "loss_normalizer",
    "metrics_to_floats",
    "RowOptions",
    "IMPLS",
    "LOSS_AGGS",
    "WEIGHT_ON",
    "checks",
    "get_checks",
    "set_checks",
]

