"""GRPO pieces of the trainer: group advantages, the variance gate (VG-HNM), the dynamic KL balancer.

Layout: rewards of one step are ``[B * G]`` group-major (completions ``b*G .. b*G+G-1`` answer prompt
``b``) or already ``[B, G]``.

Advantages (``group_advantages``)
---------------------------------
``A = (r - mean_g) / (std + eps)`` with the group mean ``mean_g`` always, and
* ``scale="group"``: std of the group's G rewards;
* ``scale="batch"``: std of all B*G rewards (the group mean is still subtracted);
* ``scale="none"``: ``A = r - mean_g`` (Dr. GRPO: no std, no eps).
Std convention: Bessel-corrected (``ddof=1``, ``torch.std`` default) and ``eps = 1e-4``, the same as TRL, so
runs compare with TRL's numbers; e.g. rewards (1, 0, 0, 0): mean 0.25, std 0.5, A = (1.49970, -0.49990 x3).
A zero-variance group gets A = 0 exactly. Computed in float64, returned float32.

Variance gate (``variance_gate``)
---------------------------------
Per group, the population variance (``ddof=0``) of its rewards (any ddof gives the same order; population is
what "variance" means in the logs). Zero-variance groups (all G rewards exactly equal, tested as
``max == min`` so rounding cannot make them look non-zero) are always dropped: their advantages are all 0.
Of the rest, the ``n_keep = min(ceil(keep_frac * B), n_nonzero)`` groups with the largest variance are kept
(``keep_frac`` is a fraction of ALL B groups; ``keep_frac * B`` is rounded to 9 decimals before the ceil so
0.6 * 5 = 3.0000000000000004 keeps 3, not 4). Ties in variance are broken by group index (lower index
kept first); variances that agree to 9 significant digits count as tied, so floating-point rounding
(e.g. (1, 0, 0, 0) vs (0, 1, 1, 1), both 3/16) never decides the order. Kept indices are returned ascending.

Dynamic balancer (``AdaptiveKLController``)
-------------------------------------------
Adaptive KL coefficient of Ziegler et al. 2019: after each step with measured KL (mean k3 KL per token)
``e = clip(KL / target - 1, -clip, clip)``, ``beta <- beta * (1 + e * n / horizon)`` with ``n`` the number of
samples (completions) in the step. ``target = 0`` (or None) keeps beta fixed. ``beta`` multiplies the KL
LOSS term (``hero_loss(..., beta=controller.beta)``). ``state_dict`` / ``load_state_dict`` go into checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = ["group_advantages", "variance_gate", "GateResult", "AdaptiveKLController", "n_keep_groups",
           "difficulty_counts"]

SCALES = ("group", "batch", "none")


def _as_groups(rewards: Tensor, num_generations: Optional[int]) -> Tensor:
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.float64)
    if r.dim() == 2:
        if num_generations is not None and r.shape[1] != num_generations:
            raise ValueError(f"rewards is [B, G] = {tuple(r.shape)} but num_generations = {num_generations}")
        return r
    if r.dim() != 1:
        raise ValueError(f"rewards must be [B * G] or [B, G], got shape {tuple(r.shape)}")
    if num_generations is None or num_generations < 1:
        raise ValueError("num_generations (G) is required for flat [B * G] rewards")
    if r.numel() % num_generations:
        raise ValueError(f"rewards has {r.numel()} entries, not a multiple of num_generations = {num_generations}")
    return r.view(-1, num_generations)


def group_advantages(rewards: Tensor, num_generations: Optional[int] = None, scale: str = "group",
                     eps: float = 1e-4) -> Tensor:
    """rewards [B*G] (group-major) or [B, G] -> advantages of the same shape, float32 (see module docstring)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r = _as_groups(rewards, num_generations)
    if not bool(torch.isfinite(r).all()):
        bad = (~torch.isfinite(r)).any(1).nonzero().flatten().tolist()
        raise ValueError(f"rewards contain NaN/Inf in group(s) {bad}")
    G = r.shape[1]
    r64 = r.to(torch.float64)
    mean = r64.mean(1, keepdim=True)
    centered = r64 - mean
    if scale == "none":
        adv = centered
    else:
        if scale == "group":
            if G < 2:
                raise ValueError("scale='group' needs num_generations >= 2 (Bessel std of one sample is undefined)")
            std = r64.std(1, keepdim=True)
        else:
            if r64.numel() < 2:
                raise ValueError("scale='batch' needs at least 2 rewards")
            std = r64.std()
        adv = centered / (std + eps)
    # exact zeros for zero-variance groups (mean of equal floats can be off by an ulp)
    zero = r64.amax(1, keepdim=True) == r64.amin(1, keepdim=True)
    adv = torch.where(zero, torch.zeros_like(adv), adv)
    return adv.to(torch.float32).view(torch.as_tensor(rewards).shape)


def n_keep_groups(keep_frac: float, n_groups: int) -> int:
    """ceil(keep_frac * n_groups), with the product rounded to 9 decimals first (0.6 * 5 -> 3)."""
    if not 0 < keep_frac <= 1:
        raise ValueError(f"keep_frac must be in (0, 1], got {keep_frac}")
    return int(math.ceil(round(keep_frac * n_groups, 9)))


@dataclass
class GateResult:
    """kept: [K] int64 group indices kept, ascending. variance: [B] float64 per-group population variance.
    zero_var: [B] bool. stats: kept_frac, threshold (smallest kept variance, 0.0 when nothing is kept),
    all_correct, all_wrong (group counts), zero_std (count of zero-variance groups), n_groups, n_kept."""

    kept: Tensor
    variance: Tensor
    zero_var: Tensor
    stats: Dict[str, float] = field(default_factory=dict)


def variance_gate(rewards: Tensor, num_generations: Optional[int] = None, keep_frac: float = 0.6,
                  correct: Optional[Tensor] = None, enabled: bool = True) -> GateResult:
    """VG-HNM: drop zero-variance groups, keep the top ``keep_frac`` of all groups by reward variance.

    rewards: [B*G] group-major or [B, G]. correct: same shape, bool (a completion counts as correct);
    default ``rewards > 0``. enabled=False keeps every group (stats are still computed).
    """
    r = _as_groups(rewards, num_generations).to(torch.float64)
    B = r.shape[0]
    if correct is None:
        c = r > 0
    else:
        c = _as_groups(torch.as_tensor(correct), r.shape[1]).to(torch.bool)
    srt = torch.sort(r, dim=1).values  # order-independent: the same multiset of rewards -> the same bits
    var = srt.var(1, unbiased=False) if r.shape[1] > 1 else torch.zeros(B, dtype=torch.float64)
    zero_var = srt[:, -1] == srt[:, 0]
    var = torch.where(zero_var, torch.zeros_like(var), var)
    if enabled:
        candidates = [i for i in range(B) if not bool(zero_var[i])]
        # 9 significant digits: equal variances computed in a different summation order still tie
        candidates.sort(key=lambda i: (-float(f"{float(var[i]):.9g}"), i))
        k = min(n_keep_groups(keep_frac, B), len(candidates)) if B else 0
        kept_list = sorted(candidates[:k])
    else:
        kept_list = list(range(B))
    kept = torch.tensor(kept_list, dtype=torch.int64)
    threshold = float(min(float(var[i]) for i in kept_list)) if kept_list else 0.0
    stats = {
        "kept_frac": len(kept_list) / B if B else 0.0,
        "threshold": threshold,
        "all_correct": int(c.all(1).sum()),
        "all_wrong": int((~c).all(1).sum()),
        "zero_std": int(zero_var.sum()),
        "n_groups": B,
        "n_kept": len(kept_list),
    }
    return GateResult(kept=kept, variance=var, zero_var=zero_var, stats=stats)


def difficulty_counts(rewards: Tensor, num_generations: Optional[int] = None, medium_variance: float = 0.05,
                      easy_mean: float = 0.5) -> Dict[str, int]:
    """Groups by difficulty, from rewards [B*G] (group-major) or [B, G]: ``medium`` = population variance >
    ``medium_variance`` (the gate's material), ``easy`` = the other groups with mean >= ``easy_mean``,
    ``hard`` = the rest (low mean, low variance). The three counts sum to B."""
    r = _as_groups(rewards, num_generations).to(torch.float64)
    medium = r.var(1, unbiased=False) > medium_variance if r.shape[1] > 1 else torch.zeros(r.shape[0], dtype=torch.bool)
    easy = ~medium & (r.mean(1) >= easy_mean)
    return {"easy": int(easy.sum()), "medium": int(medium.sum()), "hard": int((~medium & ~easy).sum())}


class AdaptiveKLController:
    """Dynamic balancer: adaptive KL coefficient (Ziegler et al. 2019), see the module docstring.

    init_beta >= 0; target > 0 makes it adaptive (then init_beta must be > 0, the update is multiplicative);
    target in (0, None) keeps beta fixed. horizon > 0 (samples); clip > 0.
    """

    def __init__(self, init_beta: float = 0.0, target: Optional[float] = None, horizon: int = 10000,
                 clip: float = 0.2):
        if not (math.isfinite(init_beta) and init_beta >= 0):
            raise ValueError(f"init_beta must be finite and >= 0, got {init_beta}")
        if target is not None and target < 0:
            raise ValueError(f"target must be >= 0 or None, got {target}")
        if target and init_beta == 0:
            raise ValueError("an adaptive KL controller (target > 0) needs init_beta > 0")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.beta = float(init_beta)
        self.target = float(target) if target else None
        self.horizon = int(horizon)
        self.clip = float(clip)
        self.n_updates = 0
        self.last_error = 0.0

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float, n: int) -> float:
        """Update beta from the step's measured KL over ``n`` samples; returns the new beta."""
        if not self.adaptive:
            return self.beta
        kl = float(kl)
        if not math.isfinite(kl):
            raise ValueError(f"KL must be finite to update the KL controller, got {kl}")
        e = min(max(kl / self.target - 1.0, -self.clip), self.clip)
        self.beta = self.beta * (1.0 + e * n / self.horizon)
        self.last_error = e
        self.n_updates += 1
        return self.beta

    def state_dict(self) -> Dict[str, float]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon, "clip": self.clip,
                "n_updates": self.n_updates, "last_error": self.last_error}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        missing = {"beta", "target", "horizon", "clip"} - set(state)
        if missing:
            raise KeyError(f"KL controller state is missing {sorted(missing)}")
        self.beta = float(state["beta"])
        self.target = None if state["target"] is None else float(state["target"])
        self.horizon = int(state["horizon"])
        self.clip = float(state["clip"])
        self.n_updates = int(state.get("n_updates", 0))
        self.last_error = float(state.get("last_error", 0.0))
