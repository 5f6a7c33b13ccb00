"""NTK-similarity conflict regularizer: sketched last-layer gradient features, their cosine similarities and an
InfoNCE loss that pulls together responses whose gradients conflict.

The NTK similarity of responses i and j is approximated by the cosine of their LM-head log-probability
gradients G_s = sum_t d log p(y_t) / dW = sum_t delta_t h_t^T ([V, D]; delta_t = d log p(y_t) / dz_t, h_t the
hidden state entering the LM head). G_s is far too big, so it is sketched on both sides with fixed seeded
Gaussian matrices proj [k1, V] (entries N(0, 1/k1)) and B [D, k2] (entries N(0, 1/k2)):

    f_s = proj G_s B = sum_t (proj delta_t) (B^T h_t)^T = sum_t a_t (outer) (B^T h_t)      [k1 * k2]

with a_t = ``hero_kernels.linear_grad_sketch`` (one vocabulary pass, no [N, V] logits). Because
E[proj^T proj] = I_V and E[B B^T] = I_D, E<f_i, f_j> = <G_i, G_j> (unbiased inner products); the cosine of the
sketches tracks the exact cosine with an error of order 1 / sqrt(k1 k2) per pair (tests/test_omnex.py states
the tolerance for the defaults). Everything is differentiable: a_t w.r.t. hidden / LM head (the op's backward)
and B^T h_t w.r.t. hidden. The temperature factor 1/tau of a_t scales every f_s alike and cancels in cosines.

Loss (threshold tau_sim, 0.54 in the paper): P(i) = {j != i : sim_ij < tau_sim} and
loss_i = -log( sum_{j in P(i)} exp(sim_ij) / sum_{k != i} exp(sim_ik) ), averaged over the i with non-empty
P(i) (0 when there are none), weighted by lambda (``ntk_weight``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Sketch", "make_sketch", "response_features", "cosine_similarities", "ntk_conflict_loss",
           "NTKRegularizer"]


@dataclass(frozen=True)
class Sketch:
    """proj [k1, V] ~ N(0, 1/k1) and B [D, k2] ~ N(0, 1/k2), float32."""

    proj: Tensor
    B: Tensor


def make_sketch(vocab_size: int, hidden_size: int, k1: int = 128, k2: int = 128, seed: int = 0,
                device=None) -> Sketch:
    """Fixed Gaussian sketch matrices from a CPU generator seeded with ``seed`` (same on every device / run)."""
    for name, v in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("k1", k1), ("k2", k2)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    g = torch.Generator().manual_seed(int(seed))
    proj = torch.randn(k1, vocab_size, generator=g) / k1 ** 0.5
    B = torch.randn(hidden_size, k2, generator=g) / k2 ** 0.5
    return Sketch(proj.to(device), B.to(device))


def response_features(hidden: Tensor, weight: Tensor, labels: Tensor, sketch: Sketch, *, bias: Optional[Tensor] = None,
                      temperature: float = 1.0, ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """f [R, k1 * k2] float32 for R responses.

    hidden: [R, T, D] hidden states entering the LM head (aligned with labels: hidden[:, t] predicts labels[:, t]);
    weight: [V, D] LM head; labels: [R, T] with ``ignore_index`` on prompt / padding positions (they add 0).
    """
    from hero_kernels import linear_grad_sketch

    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [R, T, D] and labels [R, T]; got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if sketch.B.shape[0] != hidden.shape[-1]:
        raise ValueError(f"sketch.B must be [D, k2] with D = hidden.shape[-1] = {hidden.shape[-1]}, got "
                         f"{tuple(sketch.B.shape)}; build it with make_sketch(V, D)")
    a = linear_grad_sketch(hidden, weight, labels, sketch.proj, bias=bias, temperature=temperature,
                           ignore_index=ignore_index, impl=impl)  # [R, T, k1], 0 on masked tokens
    hb = hidden.to(torch.float32) @ sketch.B.to(hidden.device)  # [R, T, k2]
    return torch.einsum("rtk,rtl->rkl", a, hb).reshape(hidden.shape[0], -1)


def cosine_similarities(f: Tensor, eps: float = 1e-12) -> Tensor:
    """[R, R] cosine similarities of the rows of f [R, F] (a zero row has similarity 0 with everything)."""
    fn = f / f.norm(dim=-1, keepdim=True).clamp_min(eps)
    return fn @ fn.t()


def ntk_conflict_loss(sim: Tensor, threshold: float = 0.54, groups: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """InfoNCE over the conflict pairs of sim [R, R] (see the module docstring).

    groups: optional [R] ids; when given, only pairs within a group count (numerator and denominator).
    Returns (loss, metrics): loss is a scalar (0, still attached to ``sim``, when no i has a positive);
    metrics ``positive_pairs`` (number of (i, j) in some P(i)) and ``anchors`` (i with non-empty P(i)), detached.
    """
    R = sim.shape[0]
    if sim.dim() != 2 or sim.shape[1] != R:
        raise ValueError(f"sim must be a square [R, R] matrix, got {tuple(sim.shape)}")
    eye = torch.eye(R, dtype=torch.bool, device=sim.device)
    others = ~eye if groups is None else (~eye & (groups[:, None] == groups[None, :]))
    pos = others & (sim.detach() < threshold)
    neg_inf = torch.full_like(sim, float("-inf"))
    log_num = torch.logsumexp(torch.where(pos, sim, neg_inf), dim=1)
    log_den = torch.logsumexp(torch.where(others, sim, neg_inf), dim=1)
    anchors = pos.any(dim=1)
    per = torch.where(anchors, log_den - log_num, torch.zeros_like(log_num))  # -inf - -inf would be NaN
    n = anchors.sum()
    loss = per.sum() / n.clamp_min(1)
    return loss, {"positive_pairs": pos.sum().detach().float(), "anchors": n.detach().float()}


@dataclass
class NTKRegularizer:
    """lambda * InfoNCE conflict loss of the sketched response gradients; call it on the LM head's inputs.

    ``reg(hidden [R, T, D], weight [V, D], labels [R, T], bias=None, groups=None)`` ->
    (weighted loss, {"ntk_loss": unweighted loss, "positive_pairs": count, "anchors": count}, all detached
    except the loss). The sketch is built on first use from (V, D) and ``seed`` and then fixed.
    """

    ntk_weight: float = 0.1
    threshold: float = 0.54
    k1: int = 128
    k2: int = 128
    seed: int = 0
    temperature: float = 1.0
    ignore_index: int = -100
    impl: str = "auto"

    def __post_init__(self):
        self._sketch: Optional[Sketch] = None

    def sketch(self, V: int, D: int, device) -> Sketch:
        s = self._sketch
        if s is None or s.proj.shape[1] != V or s.B.shape[0] != D or s.proj.device != torch.device(device):
            s = self._sketch = make_sketch(V, D, self.k1, self.k2, self.seed, device)
        return s

    def __call__(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                 groups: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        sk = self.sketch(weight.shape[0], weight.shape[1], hidden.device)
        f = response_features(hidden, weight, labels, sk, bias=bias, temperature=self.temperature,
                              ignore_index=self.ignore_index, impl=self.impl)
        loss, metrics = ntk_conflict_loss(cosine_similarities(f), self.threshold, groups)
        metrics = {"ntk_loss": loss.detach(), **metrics}
        return self.ntk_weight * loss, metrics
