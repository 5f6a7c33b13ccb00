"""The OMNEX-VL NTK-conflict regularizer as a trainer hook (``TrainConfig.omnex``; off when ``ntk_weight == 0``).

Per micro-batch the trainer hands over the completion hidden states it already computed for the HERO loss
(``hidden [m, C', D]``, aligned with ``labels [m, C']``) and the LM head; the hook returns
``lambda * InfoNCE`` over the sketched last-layer gradients of those m completions
(``hero.omnex.ntk.NTKRegularizer``, the features from ``hero_kernels.linear_grad_sketch``: no [tokens x vocab]
logits), scaled by m / n (n = kept completions of the pass) so the pass's loss is the completion-weighted mean
over micro-batches. Pairs are the completions of the same prompt (``omnex.pairs = "group"``) or every pair in
the micro-batch ("batch"); pairs never cross micro-batches.

Metrics of the last pass: ``omnex/ntk_loss`` (unweighted InfoNCE, completion-weighted mean over micro-batches),
``omnex/positive_pairs`` (pairs (i, j) with sim < tau, summed), ``omnex/anchors`` (completions with a positive).
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor

from .ntk import NTKRegularizer

__all__ = ["NTKHook", "build_ntk_hook"]


class NTKHook:
    """Wraps an NTKRegularizer with the trainer's pass bookkeeping (``start_pass`` / ``loss`` / ``metrics``)."""

    def __init__(self, reg: NTKRegularizer, pairs: str = "group"):
        self.reg = reg
        self.pairs = pairs
        self.start_pass(1)

    def start_pass(self, n_rows: int) -> None:
        """A new pass over ``n_rows`` kept completions (resets the metrics)."""
        self.n_rows = max(int(n_rows), 1)
        self._sums = {"ntk_loss": 0.0, "positive_pairs": 0.0, "anchors": 0.0}

    def loss(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
             groups: Optional[Tensor] = None) -> Tensor:
        """hidden [m, C', D], weight [V, D], labels [m, C'], groups [m] prompt ids -> scalar loss to add."""
        m = hidden.shape[0]
        if m < 2:  # no pair: nothing to pull together (still attached, so backward sees a graph)
            return hidden.sum() * 0.0
        loss, parts = self.reg(hidden, weight, labels, bias=bias, groups=groups if self.pairs == "group" else None)
        frac = m / self.n_rows
        self._sums["ntk_loss"] += float(parts["ntk_loss"]) * frac
        self._sums["positive_pairs"] += float(parts["positive_pairs"])
        self._sums["anchors"] += float(parts["anchors"])
        return loss * frac

    def metrics(self) -> Dict[str, float]:
        return {f"omnex/{k}": v for k, v in self._sums.items()}


def build_ntk_hook(cfg) -> Optional[NTKHook]:
    """The hook for a TrainConfig, or None when ``omnex.ntk_weight == 0``."""
    from hero.rollout import IGNORE_INDEX

    om = cfg.omnex
    if om.ntk_weight == 0:
        return None
    reg = NTKRegularizer(ntk_weight=om.ntk_weight, threshold=om.tau, k1=om.k1, k2=om.k2, seed=om.seed,
                         temperature=float(cfg.generation.temperature), ignore_index=IGNORE_INDEX, impl=cfg.loss.impl)
    return NTKHook(reg, om.pairs)
