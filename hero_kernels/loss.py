"""HERO-weighted GRPO loss on top of the fused entropy / log-prob ops.

``loss, metrics = hero_loss(hidden_or_logits, labels, advantages, *, weight=None, ...)``

Per token i of response s (docs/design.md, "The loss"):
    rho_i  = exp(logp_i - old_logp_i)
    pg_i   = -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)
    kl_i   = exp(ref_i - logp_i) - (ref_i - logp_i) - 1                 (k3, only with ref_logp)
    w_i    = L_s softmax_{j in s}(-H_j / kappa)_i                        (1 without entropy weighting)
    loss_i = w_i pg_i + beta kl_i
then one of three aggregations (``loss_agg``). Everything after the fused op is a few elementwise and
segment (scatter) ops with static shapes: no ``.item()``, no Python loop over responses, so
``torch.compile(hero_loss, fullgraph=True)`` traces it. Python-float options are turned into float32
0-dim tensors first, so nothing is promoted to float64 under Inductor.

The options (names, defaults, ranges, meaning) are declared once, in ``hero_kernels.options.HEROLossConfig``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import linear_hero_loss
from .entropy_logprob import entropy_logprob
from .linear_entropy_logprob import linear_entropy_logprob
from .options import LOSS_AGGS, WEIGHT_ON, HEROLossConfig, check_real
from .weights import (
    Segments,
    broadcast_advantages,
    entropy_weights,
    gate_negative,
    segment_weights,
    segments_from_ids,
    segments_from_mask,
)

__all__ = [
    "hero_loss",
    "HEROLoss",
    "HEROLossConfig",
    "entropy_weights",
    "clipped_token_loss",
    "loss_normalizer",
    "metrics_to_floats",
    "LOSS_AGGS",
    "WEIGHT_ON",
    "METRIC_KEYS",
]

#: keys of the metrics dict, in order
METRIC_KEYS = (
    "entropy/mean",
    "entropy/min",
    "entropy/max",
    "weights/max",
    "weights/effective_tokens",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "kl",
    "tokens",
    "responses",
)

Scalar = Union[float, Tensor]


def _scalar(v: Scalar, device) -> Tensor:
    """Python float / tensor -> float32 0-dim tensor (explicit: no float64 constants under Inductor)."""
    return torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())


def _per_token(name: str, t: Optional[Tensor], labels: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor shaped like labels")
    if tuple(t.shape) != tuple(labels.shape):
        raise ValueError(f"{name} must have the shape of labels {tuple(labels.shape)}, got {tuple(t.shape)}")
    if t.device != labels.device:
        raise ValueError(f"{name} is on {t.device} but labels is on {labels.device}")
    return t.reshape(-1).to(torch.float32)


def _structure(labels: Tensor, seq_ids: Optional[Tensor], ignore_index: int) -> Tuple[Segments, bool]:
    """(segments, per_row): one response per row of labels [B, T], or packed responses named by seq_ids."""
    if seq_ids is None:
        if labels.dim() != 2:
            raise ValueError(
                f"labels must be [B, T] (one response per row), got shape {tuple(labels.shape)}; "
                "for packed tokens pass seq_ids shaped like labels"
            )
        return segments_from_mask(labels != ignore_index), True
    if not isinstance(seq_ids, Tensor) or seq_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_ids must be an int32/int64 torch.Tensor, got {getattr(seq_ids, 'dtype', type(seq_ids))}")
    if tuple(seq_ids.shape) != tuple(labels.shape):
        raise ValueError(f"seq_ids must have the shape of labels {tuple(labels.shape)}, got {tuple(seq_ids.shape)}")
    if seq_ids.device != labels.device:
        raise ValueError(f"seq_ids is on {seq_ids.device} but labels is on {labels.device}")
    return segments_from_ids(seq_ids, extra_valid=labels.reshape(-1) != ignore_index), False


def clipped_token_loss(logp: Tensor, advantages: Tensor, *, old_logp: Optional[Tensor] = None,
                       ref_logp: Optional[Tensor] = None, weights: Optional[Tensor] = None, beta: Scalar = 0.0,
                       eps_low: Scalar = 0.2, eps_high: Scalar = 0.2) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token (loss, pg, kl, ratio), each shaped like ``logp`` (all inputs alike; None old_logp = logp.detach()).

    ratio = exp(logp - old), pg = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A), kl = the k3 estimator
    exp(d) - d - 1 with d = ref - logp (0 without ref_logp), loss = w pg + beta kl. k3 is formed as expm1(d) - d:
    near the reference policy (|d| small) exp(d) - 1 would round away the d^2 / 2 it is made of.
    """
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:
        d = ref_logp - logp
        kl = torch.expm1(d) - d
    weighted = pg if weights is None else weights * pg
    return weighted + beta * kl, pg, kl, ratio


def _aggregate(loss_tok: Tensor, segs: Segments, loss_agg: str, normalizer: Optional[Tensor], max_len) -> Tensor:
    """Scalar loss from per-token losses [N] (masked tokens already 0). See ``hero_loss`` for the formulas."""
    seg, valid, count, S = segs
    nonempty = count > 0
    if loss_agg == "token-mean":
        num = loss_tok.sum()
        den = count.sum()
    elif loss_agg == "seq-mean-token-mean":
        per_seq = torch.zeros(S, dtype=loss_tok.dtype, device=loss_tok.device).index_add(0, seg, loss_tok)
        num = torch.where(nonempty, per_seq / count.clamp(min=1.0), torch.zeros_like(per_seq)).sum()
        den = nonempty.sum().to(loss_tok.dtype)
    else:  # seq-mean-token-sum-norm (Dr. GRPO): a constant length instead of each response's length
        num = loss_tok.sum() / max_len
        den = nonempty.sum().to(loss_tok.dtype)
    if normalizer is None:
        den = den.clamp(min=1.0)  # an empty micro-batch gives 0, never 0/0
    else:
        den = normalizer
    return num / den


def _metrics(H: Tensor, w: Tensor, ratio: Tensor, kl: Tensor, A: Tensor, segs: Segments, eps_low, eps_high):
    """Detached float32 0-dim tensors; statistics over this call's valid tokens / non-empty responses."""
    seg, valid, count, S = segs
    H, w, ratio, kl = H.detach(), w.detach(), ratio.detach(), kl.detach()
    zero = torch.zeros((), dtype=torch.float32, device=H.device)
    tokens = count.sum()
    nt = tokens.clamp(min=1.0)
    nonempty = count > 0
    responses = nonempty.sum().to(torch.float32)
    inf = torch.full((1,), math.inf, dtype=torch.float32, device=H.device)
    # The appended sentinel keeps amin/amax defined when N = 0 (static shape N + 1).
    h_min = torch.cat([torch.where(valid, H, inf), inf]).amin()
    h_max = torch.cat([torch.where(valid, H, -inf), -inf]).amax()
    has = tokens > 0
    # Per-response effective token count 1 / sum_i (w_i / L_s)^2 (= L_s for uniform weights).
    q = torch.where(valid, w / count.clamp(min=1.0)[seg], zero)
    sumsq = torch.zeros(S, dtype=torch.float32, device=H.device).index_add(0, seg, q * q)
    eff = torch.where(nonempty, 1.0 / torch.where(nonempty, sumsq, torch.ones_like(sumsq)), torch.zeros_like(sumsq))
    low = valid & (ratio < 1.0 - eps_low) & (A < 0)
    high = valid & (ratio > 1.0 + eps_high) & (A > 0)
    return {
        "entropy/mean": torch.where(valid, H, zero).sum() / nt,
        "entropy/min": torch.where(has, h_min, zero),
        "entropy/max": torch.where(has, h_max, zero),
        "weights/max": torch.cat([w, zero.reshape(1)]).amax(),
        "weights/effective_tokens": eff.sum() / responses.clamp(min=1.0),
        "clip_ratio/low_mean": low.sum().to(torch.float32) / nt,
        "clip_ratio/high_mean": high.sum().to(torch.float32) / nt,
        "kl": torch.where(valid, kl, zero).sum() / nt,
        "tokens": tokens,
        "responses": responses,
    }


def metrics_to_floats(metrics: Dict[str, Tensor]) -> Dict[str, float]:
    """Tensor metrics -> Python floats with ONE device sync (call outside torch.compile'd code)."""
    keys = list(metrics)
    vals = torch.stack([metrics[k].detach().reshape(()).to(torch.float32) for k in keys]).tolist() if keys else []
    return dict(zip(keys, vals))


# ----------------------------------------------------------------------------------------------
# public loss
# ----------------------------------------------------------------------------------------------
def hero_loss(
    hidden_or_logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    *,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    seq_ids: Optional[Tensor] = None,
    normalizer: Optional[Scalar] = None,
    config: Optional[HEROLossConfig] = None,
    float_metrics: bool = False,
    **options: Any,
) -> Tuple[Tensor, Dict[str, Union[Tensor, float]]]:
    """HERO (entropy-weighted) GRPO / DAPO loss straight from logits or from hidden states + LM head.

    Args:
        hidden_or_logits: logits [B, T, V] / [N, V]; or, when ``weight`` is given, hidden states
            [B, T, D] / [N, D] and the fused LM-head op computes logp and entropy without logits.
        labels: [B, T] (one response per row) or, with ``seq_ids``, any shape matching the rows
            ([N] packed, or [B, T] rows holding several responses). ``ignore_index`` masks a token.
        advantages: [B] per response (broadcast over T; [B, T] layout only) or one per token
            (shaped like labels).
        weight, bias: LM head [V, D] and optional [V] (fused path; bias needs weight).
        old_logp: behaviour-policy log-probs shaped like labels (default: logp.detach(), ratio = 1).
        ref_logp: reference-policy log-probs for the k3 KL term; required when beta > 0 or beta is a tensor.
        seq_ids: integer response id of each token (negative = masked), shaped like labels; needed
            for packed inputs. A response must not be split across micro-batches.
        normalizer: global denominator for gradient accumulation (see below); Python number or
            0-dim tensor (e.g. an all-reduced count), > 0. Default: this call's own count.
        config: a ``HEROLossConfig`` holding the loss options (default: all defaults).
        float_metrics: return metrics as Python floats (one device sync; breaks fullgraph compile).
        **options: any ``HEROLossConfig`` option, overriding ``config``: beta, eps_low, eps_high,
            temperature, kappa, entropy_weighting, entropy_grad, weight_on, loss_agg ("token-mean" |
            "seq-mean-token-mean" | "seq-mean-token-sum-norm", see below), impl, max_len (the constant
            L_max of "seq-mean-token-sum-norm": default T in the [B, T] layout, required with seq_ids; use
            the generation budget), ignore_index. ``HEROLossConfig.doc(name)`` gives each one's meaning and
            range. beta, eps_low, eps_high and kappa may be 0-dim tensors (checked asynchronously on a GPU).

    Aggregation (tokens i of non-empty responses s; masked tokens never count):
        token-mean:              sum_i loss_i / D,  D = #valid tokens
        seq-mean-token-mean:     sum_s (1/L_s) sum_{i in s} loss_i / D,  D = #non-empty responses
                                 (with entropy weighting: sum_s sum_i softmax(-H/kappa)_i pg_i / D)
        seq-mean-token-sum-norm: sum_i loss_i / max_len / D,  D = #non-empty responses   (Dr. GRPO)
        ``normalizer`` replaces D. For gradient accumulation over micro-batches pass the global D of
        the whole batch (``loss_normalizer`` summed over micro-batches) to every micro-batch and
        backpropagate each micro-batch loss as is; do NOT divide again by the number of micro-batches.
        The sum of the micro-batch losses then equals the full-batch loss, and so do the gradients.
        (With DDP, which averages gradients over ranks, pass global D / world_size.)

    Returns:
        (loss, metrics): loss is a float32 0-dim tensor. metrics maps METRIC_KEYS to detached
        float32 0-dim tensors (no device sync, torch.compile fullgraph friendly), or to Python floats
        when ``float_metrics=True``: entropy/mean|min|max over valid tokens, weights/max,
        weights/effective_tokens (1 / sum_i (w_i/L_s)^2, averaged over responses),
        clip_ratio/low_mean (ratio < 1 - eps_low with A < 0) and clip_ratio/high_mean
        (ratio > 1 + eps_high with A > 0) as fractions of valid tokens, kl (mean k3 over valid
        tokens; 0 without ref_logp), tokens (valid tokens) and responses (non-empty responses).
    """
    cfg = HEROLossConfig.resolve(config, options)
    beta, kappa, loss_agg, max_len, ignore_index = cfg.beta, cfg.kappa, cfg.loss_agg, cfg.max_len, cfg.ignore_index
    if ref_logp is None and isinstance(beta, Tensor):
        raise ValueError("beta given as a tensor needs ref_logp (a tensor beta means a KL term); pass beta=0.0 "
                         "(a float) to train without it")
    if ref_logp is None and not isinstance(beta, Tensor) and beta > 0:
        raise ValueError(f"beta = {beta} > 0 needs ref_logp (the k3 KL is taken against the reference policy)")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    # Hidden states + LM head and the loss is the final objective: gradients in the forward, 3 GEMMs per chunk.
    three_gemm = weight is not None and linear_hero_loss.applies(
        hidden_or_logits, weight, bias, cfg.impl, cfg.entropy_grad,
        (advantages, old_logp, ref_logp, beta, cfg.eps_low, cfg.eps_high, kappa, normalizer))
    if weight is not None and not three_gemm:
        logp, H = linear_entropy_logprob(hidden_or_logits, weight, labels, bias=bias, temperature=cfg.temperature,
                                         ignore_index=ignore_index, impl=cfg.impl)
    elif weight is None:
        if bias is not None:
            raise ValueError("bias is only used with weight= (hidden states + LM head); add it to the logits instead")
        logp, H = entropy_logprob(hidden_or_logits, labels, temperature=cfg.temperature, ignore_index=ignore_index,
                                  impl=cfg.impl)
    segs, per_row = _structure(labels, seq_ids, ignore_index)
    if max_len is None and loss_agg == "seq-mean-token-sum-norm":
        if not per_row:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' with seq_ids needs max_len (the constant L_max)")
        max_len = labels.shape[1]
    dev = labels.device
    valid = segs.valid
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    if isinstance(advantages, Tensor) and advantages.device != dev:
        raise ValueError(f"advantages is on {advantages.device} but labels is on {dev}")
    A = torch.where(valid, broadcast_advantages(advantages, labels.shape, per_row).to(torch.float32), zero)
    old_in, ref_in = _per_token("old_logp", old_logp, labels), _per_token("ref_logp", ref_logp, labels)
    if normalizer is not None:
        check_real("normalizer", normalizer, 0.0, lo_open=True)
        normalizer = _scalar(normalizer, dev)
    if three_gemm:
        objective = linear_hero_loss.TokenObjective(
            A, old_in, ref_in, _scalar(beta, dev), _scalar(cfg.eps_low, dev), _scalar(cfg.eps_high, dev),
            _scalar(kappa, dev), cfg.weight_on, cfg.entropy_weighting, segs, clipped_token_loss,
            lambda lt: _aggregate(torch.where(valid, lt, zero), segs, loss_agg, normalizer, max_len))
        logp, H, grads = linear_hero_loss.run(hidden_or_logits, weight, bias, labels, cfg.temperature, ignore_index,
                                              cfg.impl, objective)
    logp, H = logp.reshape(-1), H.reshape(-1)
    # Masked tokens: replace caller values (padding may hold anything) so ratio = 1 and kl = 0 there, and
    # no inf * 0 can turn into NaN in the forward or the backward.
    old = None if old_in is None else torch.where(valid, old_in, logp.detach())
    ref = None if ref_in is None else torch.where(valid, ref_in, logp.detach())

    if cfg.entropy_weighting:
        w = segment_weights(H if cfg.entropy_grad else H.detach(), segs, _scalar(kappa, dev))
        if cfg.weight_on == "negative":
            w = gate_negative(w, A, valid)
    else:
        w = valid.to(torch.float32)
    eps_low_t, eps_high_t = _scalar(cfg.eps_low, dev), _scalar(cfg.eps_high, dev)
    loss_tok, pg, kl, ratio = clipped_token_loss(
        logp, A, old_logp=old, ref_logp=ref, weights=w, beta=_scalar(beta, dev), eps_low=eps_low_t, eps_high=eps_high_t
    )
    loss_tok = torch.where(valid, loss_tok, zero)
    loss = _aggregate(loss_tok, segs, loss_agg, normalizer, max_len)
    if three_gemm:
        loss = linear_hero_loss.attach(loss, hidden_or_logits, weight, bias, grads)
    metrics = _metrics(H, w, ratio, kl, A, segs, eps_low_t, eps_high_t)
    return loss, (metrics_to_floats(metrics) if float_metrics else metrics)


def loss_normalizer(
    labels: Tensor,
    loss_agg: str = "seq-mean-token-mean",
    *,
    seq_ids: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Tensor:
    """The default denominator D of ``hero_loss`` for one micro-batch, as a float32 0-dim tensor.

    Sum it over the micro-batches of an optimizer step (and all-reduce it across ranks) and pass the
    total as ``normalizer=`` to every micro-batch's ``hero_loss``: #valid tokens for "token-mean",
    #non-empty responses for the two seq-mean aggregations.
    """
    HEROLossConfig.check("loss_agg", loss_agg)
    segs, _ = _structure(labels, seq_ids, ignore_index)
    if loss_agg == "token-mean":
        return segs.count.sum()
    return (segs.count > 0).sum().to(torch.float32)


# ----------------------------------------------------------------------------------------------
# nn.Module wrapper
# ----------------------------------------------------------------------------------------------
class HEROLoss(nn.Module):
    """``loss, metrics = HEROLoss(loss_agg="token-mean")(logits, labels, advantages, old_logp=...)``.

    Holds a ``HEROLossConfig`` (``config`` and/or option keywords) and calls ``hero_loss``. Metrics are Python
    floats by default (``float_metrics=True``, one device sync per call); set ``float_metrics=False`` to get 0-dim
    tensors (needed inside ``torch.compile(fullgraph=True)``) and convert later with ``metrics_to_floats``.
    """

    def __init__(self, config: Optional[HEROLossConfig] = None, *, float_metrics: bool = True, **overrides):
        super().__init__()
        if not isinstance(float_metrics, bool):
            raise TypeError(f"float_metrics must be a bool, got {type(float_metrics).__name__}")
        self.config = HEROLossConfig.resolve(config, overrides, caller="HEROLoss")
        self.float_metrics = float_metrics

    def forward(
        self,
        hidden_or_logits: Tensor,
        labels: Tensor,
        advantages: Tensor,
        *,
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        old_logp: Optional[Tensor] = None,
        ref_logp: Optional[Tensor] = None,
        seq_ids: Optional[Tensor] = None,
        normalizer: Optional[Scalar] = None,
        beta: Optional[Scalar] = None,
    ) -> Tuple[Tensor, Dict[str, Union[Tensor, float]]]:
        """Same arguments as ``hero_loss``; ``beta`` (if given) overrides ``config.beta`` for this call."""
        extra = {} if beta is None else {"beta": beta}
        return hero_loss(hidden_or_logits, labels, advantages, weight=weight, bias=bias, old_logp=old_logp,
                         ref_logp=ref_logp, seq_ids=seq_ids, normalizer=normalizer, config=self.config,
                         float_metrics=self.float_metrics, **extra)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.options().items())
        return f"{opts}, float_metrics={self.float_metrics!r}"
