"""HERO policy loss for verl (written against verl 0.9.1's policy-loss registry; verl itself is optional).

Importing this module never fails without verl. When ``verl`` is importable it registers
``compute_policy_loss_hero`` under ``actor_rollout_ref.actor.policy_loss.loss_mode=hero`` with verl's
``register_policy_loss``. The function has verl's policy-loss signature::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
       rollout_is_weights=None, *, entropy=None) -> (loss, metrics)

all tensors ``[batch, response_length]``. Per token it computes exactly verl's ``vanilla`` objective (clipped ratio
with ``clip_ratio_low`` / ``clip_ratio_high``, dual clip ``clip_ratio_c`` for negative advantages, log-ratio clamped
to +-20, optional rollout importance weights) times the HERO weight ``w_i = L_s softmax_{j in s}(-H_j / kappa)_i``
of its response, then aggregates with verl's own ``agg_loss`` (so dp_size / global token / global batch
normalization is verl's). With ``hero_entropy_weighting=False`` it IS verl's vanilla loss.

Where the entropy comes from
----------------------------
verl computes per-token entropy in the actor when ``actor_rollout_ref.actor.calculate_entropy=True`` (or
``entropy_coeff != 0``), but verl 0.9.1's ``ppo_loss`` does NOT pass it to the policy-loss function. Two routes:

* exact (default, ``hero_entropy_source=exact``): install ``hero_ppo_loss`` as the actor's loss function
  (``actor_rollout_wg.set_loss_fn(partial(hero_ppo_loss, config=actor_config))``, see the README). It hands the
  padded ``model_output["entropy"]`` to this policy loss and otherwise calls verl's ``ppo_loss`` unchanged. Needs
  ``calculate_entropy=True``; keep ``entropy_coeff=0`` unless you also want verl's entropy bonus.
* sampled (``hero_entropy_source=sampled``): no code changes. ``H_i`` is estimated by the sampled token's surprisal
  ``-old_log_prob_i``, an unbiased one-sample estimate of the entropy of the sampling distribution
  (``E_{y~p}[-log p(y)] = H(p)``) when the rollout samples the full tempered softmax (no top-p / top-k) and the
  actor's log-probs use the rollout temperature. Noisier weights than the exact entropy; logged as
  ``actor/hero_entropy_sampled = 1``.
A call without entropy under ``exact`` raises a ValueError saying so (never a silent fallback).

Options (read from ``config.policy_loss``; hero_kernels' defaults apply when absent, and hero_kernels'
``HEROLossConfig`` checks them, so every value ``hero_loss`` accepts works here too): ``hero_kappa`` (1.0; < 0
favours high-entropy tokens), ``hero_entropy_weighting`` (True), ``hero_weight_on`` ("all" | "negative"),
``hero_entropy_grad`` (False), ``hero_entropy_source`` ("exact" | "sampled"). Set them on the command line through ``HEROPolicyLossConfig``::

    actor_rollout_ref.actor.policy_loss._target_=hero.integrations.verl.HEROPolicyLossConfig \\
    actor_rollout_ref.actor.policy_loss.loss_mode=hero +actor_rollout_ref.actor.policy_loss.hero_kappa=0.5

(hydra instantiates the ``_target_`` in every worker, which also imports this module there and registers the loss).
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from hero_kernels.loss import clipped_token_loss
from hero_kernels.options import HEROLossConfig, loss_option_field
from hero_kernels.weights import entropy_weights

__all__ = [
    "HERO_LOSS_NAME",
    "VERL_AVAILABLE",
    "VERL_IMPORT_ERROR",
    "HEROPolicyLossConfig",
    "LOSS_OPTION_NAMES",
    "hero_options",
    "compute_policy_loss_hero",
    "hero_ppo_loss",
    "agg_loss",
    "entropy_context",
]

HERO_LOSS_NAME = "hero"
ENTROPY_SOURCES = ("exact", "sampled")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

try:  # verl is optional: only its registry, config base class and agg_loss are used
    from verl.trainer.ppo import core_algos as _core_algos
    from verl.workers.config import PolicyLossConfig as _VerlPolicyLossConfig

    VERL_AVAILABLE = True
    VERL_IMPORT_ERROR: Optional[str] = None
except Exception as _e:  # ImportError, or a broken verl install: never break importing hero
    _core_algos = None
    _VerlPolicyLossConfig = None
    VERL_AVAILABLE = False
    VERL_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

# entropy [B, T] handed from hero_ppo_loss to compute_policy_loss_hero for the duration of one loss call
_ENTROPY: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("hero_verl_entropy", default=None)


class entropy_context:
    """``with entropy_context(H): ...`` makes ``H`` [B, T] the entropy every HERO policy loss call inside uses."""

    def __init__(self, entropy: Optional[Tensor]):
        self.entropy = entropy
        self._token = None

    def __enter__(self):
        self._token = _ENTROPY.set(self.entropy)
        return self

    def __exit__(self, *exc):
        _ENTROPY.reset(self._token)
        return False


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
#: hero_kernels loss option -> where verl's actor config holds it (``policy_loss.*`` are ours; clip_ratio_low /
#: clip_ratio_high are verl's own, both defaulting to ``clip_ratio``)
LOSS_OPTION_NAMES = {"kappa": "policy_loss.hero_kappa", "entropy_weighting": "policy_loss.hero_entropy_weighting",
                     "weight_on": "policy_loss.hero_weight_on", "entropy_grad": "policy_loss.hero_entropy_grad",
                     "eps_low": "clip_ratio_low", "eps_high": "clip_ratio_high"}
_POLICY_LOSS_FIELDS = {name: path.split(".", 1)[1] for name, path in LOSS_OPTION_NAMES.items()
                       if path.startswith("policy_loss.")}


@dataclass
class _PolicyLossConfigStandIn:
    """Base of HEROPolicyLossConfig when verl is not importable: the dict-like ``get`` verl's configs have."""

    def get(self, key, default=None):
        return getattr(self, key, default)


@dataclass
class HEROPolicyLossConfig(_VerlPolicyLossConfig if VERL_AVAILABLE else _PolicyLossConfigStandIn):
    """verl's ``PolicyLossConfig`` plus HERO's options (see the module docstring); without verl, a plain dataclass
    with the same HERO fields. Defaults, help texts and checks of the loss options come from hero_kernels'
    ``HEROLossConfig``."""

    loss_mode: str = HERO_LOSS_NAME
    hero_kappa: float = loss_option_field("kappa")
    hero_entropy_weighting: bool = loss_option_field("entropy_weighting")
    hero_weight_on: str = loss_option_field("weight_on")
    hero_entropy_grad: bool = loss_option_field("entropy_grad")
    hero_entropy_source: str = field(default="exact", metadata={
        "help": "'exact': the actor's entropy (hero_ppo_loss); 'sampled': the sampled token's surprisal."})

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        _check_options({k: getattr(self, f) for k, f in _POLICY_LOSS_FIELDS.items()}, self.hero_entropy_source)


def _check_options(options: Mapping[str, Any], entropy_source) -> None:
    """hero_kernels' checks of the HERO options (``{core name: value}``), named as verl's config names them."""
    for name, value in options.items():
        HEROLossConfig.check(name, value, LOSS_OPTION_NAMES[name])
    if entropy_source not in ENTROPY_SOURCES:
        raise ValueError(f"policy_loss.hero_entropy_source must be one of {ENTROPY_SOURCES}, got {entropy_source!r}")


def hero_options(config) -> Tuple[Dict[str, Any], str]:
    """({core option name: value}, entropy source) that ``config`` (verl's ActorConfig, a mapping or None) sets
    for the HERO policy loss; absent options take hero_kernels' defaults. Checked."""
    pl = _get(config, "policy_loss", None)
    opts = {k: _get(pl, f, HEROLossConfig.default(k)) for k, f in _POLICY_LOSS_FIELDS.items()}
    clip = _get(config, "clip_ratio", HEROLossConfig.default("eps_low"))
    opts["eps_low"] = _get(config, "clip_ratio_low", clip)
    opts["eps_high"] = _get(config, "clip_ratio_high", clip)
    source = _get(pl, "hero_entropy_source", "exact")
    _check_options(opts, source)
    return opts, source


def _get(cfg, key: str, default):
    """cfg.key for verl configs (dataclass with .get), DictConfig, plain dicts or None."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            v = cfg.get(key, default)
        except Exception:  # omegaconf struct mode raises on unknown keys
            v = default
        return default if v is None and default is not None else v
    return getattr(cfg, key, default)


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> Tensor:
    """verl's loss aggregation (same modes and global-batch arguments): verl's own ``agg_loss`` when verl is
    importable, else an implementation of its documented semantics (tested equal to verl's and to
    ``hero_kernels.reference.aggregate_loss``).

    loss_mat, loss_mask: [B, T]. dp_size: data-parallel ranks (the loss is multiplied by it because DP averages
    gradients). batch_num_tokens: valid tokens of the global batch (token-mean); global_batch_size: non-empty
    responses of the global batch (seq-mean-*); loss_scale_factor: the constant length of seq-mean-token-sum-norm
    (default T).
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    if _core_algos is not None:
        return _core_algos.agg_loss(loss_mat=loss_mat, loss_mask=loss_mask, loss_agg_mode=loss_agg_mode,
                                    dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                                    global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    m = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode in ("token-mean", "token-sum"):
        total = (loss_mat * m).sum()
        if loss_agg_mode == "token-sum":
            return total * dp_size
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens (global valid tokens) is required when dp_size > 1")
            batch_num_tokens = m.sum()
        return total / batch_num_tokens * dp_size
    tok = m.sum(-1)
    nonempty = (tok > 0).to(loss_mat.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1) / (tok + 1e-8)
    else:
        per_seq = (loss_mat * m).sum(-1)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size (global non-empty responses) is required when dp_size > 1")
        global_batch_size = nonempty.sum()
    loss = (per_seq * nonempty).sum() / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


# ----------------------------------------------------------------------------------------------
# the policy loss
# ----------------------------------------------------------------------------------------------
def compute_policy_loss_hero(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[Tensor] = None,
    *,
    entropy: Optional[Tensor] = None,
    rollout_log_probs: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Any]]:
    """HERO-weighted clipped policy loss with verl's policy-loss signature (all tensors [B, T]).

    config: verl's ``ActorConfig`` (or any mapping) with ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
    ``clip_ratio_c`` (dual clip, default 3.0), ``policy_loss`` (HERO options, see the module docstring) and
    ``global_batch_info`` (forwarded to ``agg_loss``). entropy: per-token entropy [B, T] (default: the one set by
    ``hero_ppo_loss`` / ``entropy_context``, else per ``hero_entropy_source``). rollout_log_probs: the 7th
    argument of older verl releases (0.5.x); accepted for their call convention, and refused when their truncated
    importance sampling (``tis_imp_ratio_cap > 0``) would need it.

    Returns (loss, metrics) with verl's metric names (``actor/pg_clipfrac``, ``actor/ppo_kl``,
    ``actor/pg_clipfrac_lower``) plus ``actor/hero_entropy_mean``, ``actor/hero_weights_max``,
    ``actor/hero_weights_effective_tokens`` (1 / sum (w/L)^2 per response, averaged) and
    ``actor/hero_entropy_sampled``.
    """
    if rollout_log_probs is not None and (_get(config, "tis_imp_ratio_cap", -1) or -1) > 0:
        raise NotImplementedError("HERO policy loss: truncated importance sampling of older verl releases "
                                  "(tis_imp_ratio_cap > 0) is not supported; use rollout_is_weights (verl >= 0.6)")
    shape = tuple(log_prob.shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of log_prob {shape}, got {tuple(t.shape)}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [batch, response_length], got shape {shape}")
    opts, source = hero_options(config)
    kappa, weighting, weight_on, entropy_grad = (opts[k] for k in ("kappa", "entropy_weighting", "weight_on",
                                                                   "entropy_grad"))
    eps_low, eps_high = opts["eps_low"], opts["eps_high"]
    clip_c = _get(config, "clip_ratio_c", 3.0)
    if not clip_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip bound) must be > 1, got {clip_c}")

    mask = response_mask.bool()
    maskf = mask.to(log_prob.dtype)
    n_tok = maskf.sum().clamp(min=1.0)
    # verl clamps the log-ratio to +-20 before exp; folding the clamp into old_logp keeps the gradient identical
    # (zero outside the band, one inside)
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    old_eff = log_prob - log_ratio
    _, pg, _, ratio = clipped_token_loss(log_prob, advantages, old_logp=old_eff, eps_low=eps_low, eps_high=eps_high)
    # dual clip: for A < 0 the loss is capped at -A * clip_ratio_c
    capped = torch.minimum(pg, -advantages * clip_c)
    pg_final = torch.where(advantages < 0, capped, pg)
    if rollout_is_weights is not None:
        pg_final = pg_final * rollout_is_weights

    sampled = 0.0
    H = None
    if weighting:
        H = entropy if entropy is not None else _ENTROPY.get()
        if H is None:
            if source == "exact":
                raise ValueError(
                    "HERO policy loss: no per-token entropy was passed. verl's ppo_loss does not forward the actor's "
                    "entropy to policy losses: install hero.integrations.verl.hero_ppo_loss as the actor loss "
                    "function with actor_rollout_ref.actor.calculate_entropy=True, or set "
                    "policy_loss.hero_entropy_source=sampled (surprisal estimate), or "
                    "policy_loss.hero_entropy_weighting=False (plain vanilla loss)"
                )
            H = -old_log_prob.detach()
            sampled = 1.0
        if tuple(H.shape) != shape:
            raise ValueError(f"entropy must have the shape of log_prob {shape}, got {tuple(H.shape)}")
        H_in = H if entropy_grad else H.detach()
        wdt = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
        w = entropy_weights(H_in.to(wdt), mask, kappa=float(kappa), weight_on=weight_on,
                            advantages=advantages.detach() if weight_on == "negative" else None)
        loss_mat = w.to(pg_final.dtype) * pg_final
    else:
        w = maskf
        loss_mat = pg_final

    gbi = dict(_get(config, "global_batch_info", None) or {})
    loss = agg_loss(loss_mat, response_mask, loss_agg_mode, **gbi)

    with torch.no_grad():
        clipped = (-advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)) > (-advantages * ratio)
        lower = (pg > -advantages * clip_c) & (advantages < 0)
        wd = w.detach().to(torch.float32)
        L = mask.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
        q = torch.where(mask, wd / L, torch.zeros_like(wd))
        sumsq = (q * q).sum(-1)
        nonempty = mask.any(-1)
        eff = torch.where(nonempty, 1.0 / torch.where(nonempty, sumsq, torch.ones_like(sumsq)),
                          torch.zeros_like(sumsq))
        metrics = {
            "actor/pg_clipfrac": ((clipped.to(maskf.dtype) * maskf).sum() / n_tok).item(),
            "actor/ppo_kl": ((-log_ratio.detach() * maskf).sum() / n_tok).item(),
            "actor/pg_clipfrac_lower": ((lower.to(maskf.dtype) * maskf).sum() / n_tok).item(),
            "actor/hero_weights_max": float(torch.where(mask, wd, torch.zeros_like(wd)).max()) if wd.numel() else 0.0,
            "actor/hero_weights_effective_tokens": float(eff.sum() / nonempty.sum().clamp(min=1)),
            "actor/hero_entropy_sampled": sampled,
        }
        if H is not None:
            Hd = H.detach().to(torch.float32)
            metrics["actor/hero_entropy_mean"] = float((Hd * mask).sum() / mask.sum().clamp(min=1))
    return loss, metrics


def hero_ppo_loss(config, model_output, data, dp_group=None):
    """verl's actor loss (``verl.workers.utils.losses.ppo_loss``) with the actor's exact entropy handed to the HERO
    policy loss. Drop-in for ``partial(ppo_loss, config=actor_config)``; needs ``calculate_entropy=True``."""
    if not VERL_AVAILABLE:
        raise ImportError(f"hero_ppo_loss needs verl ({VERL_IMPORT_ERROR})")
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    ent = model_output.get("entropy", None)
    if ent is None:
        raise ValueError("hero_ppo_loss: the actor returned no entropy; "
                         "set actor_rollout_ref.actor.calculate_entropy=True")
    with entropy_context(no_padding_2_padding(ent, data)):
        return ppo_loss(config, model_output, data, dp_group)


if VERL_AVAILABLE:
    # verl looks the loss up by name in each worker process; importing this module there registers it (hydra
    # _target_, actor_rollout_ref.model.external_lib, VERL_USE_EXTERNAL_MODULES or a verl.plugins entry point).
    _core_algos.register_policy_loss(HERO_LOSS_NAME)(compute_policy_loss_hero)
