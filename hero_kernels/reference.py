"""The test oracle: plain float64 PyTorch versions of every op in hero_kernels (the math of docs/design.md).

For tests and benchmarks ONLY. No production code path imports this module: the public ops, the backends
(the chunked ``impl="torch"`` path has its own fp32 row math), ``hero_loss``, the sharded path and the
integrations each carry their own implementation, so a slip in one of them shows up as a disagreement with
this file instead of being copied into both sides. (The trainer's ``loss.path="reference"`` comparison mode,
documented as tests-only, imports it lazily.) A test checks that importing hero_kernels and running every op
on every CPU backend leaves ``hero_kernels.reference`` out of ``sys.modules``.

Everything here is written for clarity, not speed (Python loops over responses, float64 throughout).

Conventions shared by all backends
----------------------------------
* Rows are flattened tokens: logits ``[N, V]`` (or ``[..., V]``), labels ``[N]`` (or ``[...]``).
* All quantities use ``x = z / temperature``.
* A row whose label equals ``ignore_index`` is *masked*: its ``logp``, ``H`` and ``lse`` are 0 and it
  receives zero gradient. Kernels may skip it entirely.
* Outputs are float32 in the kernels; here they come out in ``dtype`` (float64 by default).
* Online partials ``(m, s, t)`` over a set of columns: ``m = max x``, ``s = sum e^{x-m}``,
  ``t = sum x e^{x-m}``. They merge associatively (``merge_partials``) and finalize to
  ``lse = m + log s`` and ``H = lse - t / s``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "entropy_logprob",
    "entropy_logprob_backward",
    "linear_entropy_logprob",
    "linear_entropy_logprob_backward",
    "row_partials",
    "merge_partials",
    "finalize_partials",
    "entropy_weights",
    "grpo_token_loss",
    "aggregate_loss",
    "hero_loss",
    "hero_metrics",
]


# ----------------------------------------------------------------------------------------------
# entropy + log-prob from logits
# ----------------------------------------------------------------------------------------------
def _label_split(x: Tensor, safe: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """For rows x [..., V] and label ids ``safe`` [...]: (is_label [..., V], e_y, s_o) where, with m the row max,
    e_y = e^{x_y - m} and s_o = sum_{j != y} e^{x_j - m} (the label's term kept apart).

    When the label dominates (p_y -> 1), 1 - p_y = s_o / (s_o + e_y) and log p_y = -log1p(s_o / e_y) are
    accurate, while 1 - exp(x_y - lse) and x_y - lse cancel to rounding noise (Liger #1329 in fp32)."""
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    is_label = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, safe.unsqueeze(-1), True)
    e_y = e.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    s_o = torch.where(is_label, torch.zeros_like(e), e).sum(-1)
    return is_label, e_y, s_o


def _lse_entropy(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(lse, H) of rows x [..., V] in forms that keep their accuracy when one column dominates.

    With m the row max and e = e^{x - m}: lse = m + log1p(s_r), s_r = the sum of e over the other columns
    (log of a sum near 1 loses its digits), and H = log s - sum (x - m) e / s: both terms >= 0, no
    cancellation against |lse| as in lse - sum p x."""
    m = x.max(dim=-1, keepdim=True)
    e = torch.exp(x - m.values)
    at_max = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, m.indices, True)
    s_r = torch.where(at_max, torch.zeros_like(e), e).sum(-1)
    log_s = torch.log1p(s_r)
    t = torch.where(e > 0, (x - m.values) * e, torch.zeros_like(e)).sum(-1)
    return m.values.squeeze(-1) + log_s, log_s - t / (1 + s_r)


def entropy_logprob(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row log-prob of the label, entropy and log-sum-exp.

    logits: [..., V] any float dtype; labels: [...] integer.
    Returns (logp, H, lse), each [...] in ``dtype``; masked rows are 0.
    """
    x = logits.to(dtype) / temperature
    lse, H = _lse_entropy(x)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    # p_y >= 1/2: log p_y = -log1p(s_o / e_y) keeps its relative accuracy as p_y -> 1
    _, e_y, s_o = _label_split(x, safe)
    dominant = e_y >= s_o
    logp = torch.where(dominant, -torch.log1p(s_o / torch.where(dominant, e_y, torch.ones_like(e_y))), logp)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, H, zero), torch.where(valid, lse, zero)


def entropy_logprob_backward(
    logits: Tensor,
    labels: Tensor,
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
    *,
    lse: Optional[Tensor] = None,
    H: Optional[Tensor] = None,
    vocab_start: int = 0,
) -> Tensor:
    """Closed-form dL/dlogits (docs/design.md): (1/tau) [g (1[j=y] - p) - k p (log p + H)].

    logits: [..., V]; labels, grad_logp (g), grad_entropy (k): [...]. None means zero.
    Returns [..., V] in ``dtype``; masked rows are 0. With the whole row at hand, the label column's
    1 - p_y is computed as the sum of the other probabilities (no cancellation when p_y -> 1).

    Vocab shards (tensor parallel): pass the GLOBAL ``lse`` and ``H`` ([...]) and the shard's first column
    ``vocab_start``; ``logits`` are then the shard's columns and ``labels`` stay global ids (the one-hot
    term appears only in the shard that holds the label). By default lse and H come from ``logits``.
    """
    x = logits.to(dtype) / temperature
    full_row = lse is None
    if full_row:
        lse, H_row = _lse_entropy(x)
        H = H_row if H is None else H
    logq = x - lse.to(dtype).unsqueeze(-1)
    p = logq.exp()
    if H is None:
        H = -torch.where(p > 0, p * logq, torch.zeros_like(p)).sum(-1)
    H = H.to(dtype).unsqueeze(-1)
    valid = labels != ignore_index
    local = labels.long() - vocab_start
    inside = valid & (local >= 0) & (local < x.shape[-1])
    safe = torch.where(inside, local, torch.zeros_like(local))
    g = torch.zeros_like(H) if grad_logp is None else grad_logp.to(dtype).unsqueeze(-1)
    k = torch.zeros_like(H) if grad_entropy is None else grad_entropy.to(dtype).unsqueeze(-1)
    is_label = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, safe.unsqueeze(-1), inside.unsqueeze(-1))
    if full_row:
        _, e_y, s_o = _label_split(x, safe)
        one_minus_py = (s_o / (s_o + e_y)).unsqueeze(-1)
        # the label column's log p_y and p_y in their accurate forms (log p_y = log1p(-(1 - p_y)))
        logp_y = torch.log1p(-one_minus_py)
        logq = torch.where(is_label, logp_y, logq)
        p = torch.where(is_label, torch.exp(logp_y), p)
    else:  # a shard sees only its columns: the plain form
        one_minus_py = 1 - p
    d_onehot = torch.where(is_label, one_minus_py, -p)  # 1[j=y] - p_j
    dz = g * d_onehot - k * torch.where(p > 0, p * (logq + H), torch.zeros_like(p))
    dz = dz / temperature
    return torch.where(valid.unsqueeze(-1), dz, torch.zeros_like(dz))


# ----------------------------------------------------------------------------------------------
# fused LM head: hidden @ weight.T (+ bias), never needed materialized by the kernels
# ----------------------------------------------------------------------------------------------
def linear_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """hidden [..., D], weight [V, D], bias [V] -> logits [..., V] in ``dtype``."""
    z = hidden.to(dtype) @ weight.to(dtype).t()
    return z if bias is None else z + bias.to(dtype)


def linear_entropy_logprob(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor, Tensor]:
    """entropy_logprob of ``hidden @ weight.T + bias``. hidden [..., D], weight [V, D] -> 3 x [...]."""
    return entropy_logprob(linear_logits(hidden, weight, bias, dtype), labels, temperature, ignore_index, dtype)


def linear_entropy_logprob_backward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad_hidden [..., D], grad_weight [V, D], grad_bias [V] or None) in ``dtype``."""
    z = linear_logits(hidden, weight, bias, dtype)
    dz = entropy_logprob_backward(z, labels, grad_logp, grad_entropy, temperature, ignore_index, dtype)
    dz2 = dz.reshape(-1, dz.shape[-1])
    h2 = hidden.to(dtype).reshape(-1, hidden.shape[-1])
    dh = (dz2 @ weight.to(dtype)).reshape(hidden.shape)
    dW = dz2.t() @ h2
    db = None if bias is None else dz2.sum(0)
    return dh, dW, db


# ----------------------------------------------------------------------------------------------
# online partials (vocab sharding / tensor parallel)
# ----------------------------------------------------------------------------------------------
def row_partials(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(m, s, t) of already temperature-scaled rows x [..., V]. An empty or all -inf set gives (-inf, 0, 0)."""
    m = x.max(dim=-1).values if x.shape[-1] > 0 else x.new_full(x.shape[:-1], float("-inf"))
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m_safe.unsqueeze(-1))
    s = e.sum(-1)
    t = torch.where(e > 0, x * e, torch.zeros_like(e)).sum(-1)
    return m, s, t


def merge_partials(a: Tuple[Tensor, Tensor, Tensor], b: Tuple[Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Associative merge of two (m, s, t) partials over disjoint column sets."""
    m1, s1, t1 = a
    m2, s2, t2 = b
    m = torch.maximum(m1, m2)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # exp(-inf - finite) = 0 handles an empty side; both empty keeps (-inf, 0, 0).
    a1 = torch.where(torch.isfinite(m1), torch.exp(m1 - m_safe), torch.zeros_like(m1))
    a2 = torch.where(torch.isfinite(m2), torch.exp(m2 - m_safe), torch.zeros_like(m2))
    return m, s1 * a1 + s2 * a2, t1 * a1 + t2 * a2


def finalize_partials(m: Tensor, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """(lse, H) from merged partials."""
    lse = m + torch.log(s)
    return lse, lse - t / s


# ----------------------------------------------------------------------------------------------
# HERO: entropy weights and the weighted GRPO objective
# ----------------------------------------------------------------------------------------------
def entropy_weights(
    H: Tensor,
    seq_ids: Tensor,
    kappa: float = 1.0,
    weight_on: str = "all",
    advantages: Optional[Tensor] = None,
) -> Tensor:
    """w_i = L_s * softmax_{j in s}(-H_j / kappa)_i over each response s (mean 1 within s).

    H: [N] entropies; seq_ids: [N] int, the response of each token, negative = masked (w = 0).
    weight_on="negative": tokens with advantage >= 0 get w = 1 (advantages [N] required).
    Straightforward loop over responses: the reference, not fast.
    """
    H = H.to(torch.float64)
    w = torch.zeros_like(H)
    for s in torch.unique(seq_ids[seq_ids >= 0]).tolist():
        idx = seq_ids == s
        w[idx] = idx.sum() * torch.softmax(-H[idx] / kappa, dim=0)
    if weight_on == "negative":
        if advantages is None:
            raise ValueError("weight_on='negative' needs advantages")
        w = torch.where((advantages.to(torch.float64) < 0) | (seq_ids < 0), w, torch.ones_like(w))
    elif weight_on != "all":
        raise ValueError(f"weight_on must be 'all' or 'negative', got {weight_on!r}")
    return w


def grpo_token_loss(
    logp: Tensor,
    advantages: Tensor,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token loss_i = w_i pg_i + beta kl_i (docs/design.md). All inputs [N].

    Returns (loss, pg, kl, ratio), each [N].
    """
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
    else:
        kl = torch.zeros_like(logp)
    w = torch.ones_like(logp) if weights is None else weights
    return w * pg + beta * kl, pg, kl, ratio


def aggregate_loss(
    loss: Tensor,
    seq_ids: Tensor,
    loss_agg: str = "seq-mean-token-mean",
    normalizer: Optional[float] = None,
    max_len: Optional[int] = None,
) -> Tensor:
    """Reduce per-token losses [N] to a scalar.

    token-mean:               sum_i loss_i / (normalizer or #valid tokens)
    seq-mean-token-mean:      sum_s mean_{t in s} loss_t / (normalizer or #non-empty responses)
    seq-mean-token-sum-norm:  sum_i loss_i / max_len / (normalizer or #responses)   (Dr. GRPO)
    Masked tokens (seq_ids < 0) contribute nothing. Passing the global normalizer makes the sum
    of micro-batch losses equal to the full-batch loss (gradient accumulation).
    """
    valid = seq_ids >= 0
    ids = seq_ids[valid]
    lv = loss[valid]
    if loss_agg == "token-mean":
        den = normalizer if normalizer is not None else max(int(valid.sum()), 1)
        return lv.sum() / den
    if loss_agg == "seq-mean-token-mean":
        total = lv.new_zeros(())
        uniq = torch.unique(ids).tolist()
        for s in uniq:
            total = total + lv[ids == s].mean()
        den = normalizer if normalizer is not None else max(len(uniq), 1)
        return total / den
    if loss_agg == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm needs max_len")
        den = normalizer if normalizer is not None else max(len(torch.unique(ids).tolist()), 1)
        return lv.sum() / max_len / den
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def hero_loss(
    hidden_or_logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    *,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    temperature: float = 1.0,
    kappa: float = 1.0,
    entropy_weighting: bool = True,
    entropy_grad: bool = False,
    weight_on: str = "all",
    loss_agg: str = "seq-mean-token-mean",
    seq_ids: Optional[Tensor] = None,
    normalizer: Optional[float] = None,
    max_len: Optional[int] = None,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, dict]:
    """The unfused HERO objective: entropy_logprob -> entropy_weights -> grpo_token_loss -> aggregate_loss.

    Same arguments as ``hero_kernels.hero_loss``: logits [B, T, V] (or hidden [B, T, D] with ``weight``)
    and labels [B, T] with one response per row, or any shape plus ``seq_ids`` shaped like labels.
    advantages [B] (per row) or shaped like labels. Differentiable (float64 autograd) w.r.t. the inputs.
    Returns (loss, parts) with parts = flat [N] tensors logp, H, w, pg, kl, ratio, seq_ids (-1 = masked),
    advantages, and the scalar metrics of ``hero_metrics``.
    """
    if weight is not None:
        logp, H, _ = linear_entropy_logprob(hidden_or_logits, weight, labels, bias, temperature, ignore_index, dtype)
    else:
        logp, H, _ = entropy_logprob(hidden_or_logits, labels, temperature, ignore_index, dtype)
    valid = (labels != ignore_index).reshape(-1)
    if seq_ids is None:
        B, T = labels.shape
        ids = torch.arange(B, device=labels.device).unsqueeze(1).expand(B, T).reshape(-1)
        if max_len is None:
            max_len = T
    else:
        ids = seq_ids.reshape(-1).long()
    ids = torch.where(valid & (ids >= 0), ids, torch.full_like(ids, -1))
    A = advantages.to(dtype)
    if seq_ids is None and A.dim() == 1:
        A = A.unsqueeze(1).expand(labels.shape)
    A = A.reshape(-1)
    logp, H = logp.reshape(-1), H.reshape(-1)
    if entropy_weighting:
        w = entropy_weights(H if entropy_grad else H.detach(), ids, kappa, weight_on, A)
    else:
        w = (ids >= 0).to(dtype)
    old = None if old_logp is None else old_logp.reshape(-1).to(dtype)
    ref = None if ref_logp is None else ref_logp.reshape(-1).to(dtype)
    loss_tok, pg, kl, ratio = grpo_token_loss(logp, A, old, ref, w, beta, eps_low, eps_high)
    loss = aggregate_loss(loss_tok, ids, loss_agg, normalizer, max_len)
    parts = dict(logp=logp, H=H, w=w, pg=pg, kl=kl, ratio=ratio, seq_ids=ids, advantages=A)
    parts.update(hero_metrics(H, w, ratio, kl, A, ids, eps_low, eps_high))
    return loss, parts


def hero_metrics(
    H: Tensor, w: Tensor, ratio: Tensor, kl: Tensor, advantages: Tensor, seq_ids: Tensor, eps_low: float, eps_high: float
) -> dict:
    """The logged statistics of one hero_loss call (Python floats), from flat [N] tensors; seq_ids < 0 masked.

    Means are over valid tokens; weights/effective_tokens is 1 / sum_i (w_i / L_s)^2 averaged over responses.
    Clip fractions follow TRL / verl: low = ratio < 1 - eps_low with A < 0, high = ratio > 1 + eps_high with A > 0.
    """
    valid = seq_ids >= 0
    n = int(valid.sum())
    if n == 0:
        keys = ("entropy/mean", "entropy/min", "entropy/max", "weights/max", "weights/effective_tokens",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "tokens", "responses")
        return {k: 0.0 for k in keys}
    Hv, wv, rv, kv, Av = (t.detach()[valid].double() for t in (H, w, ratio, kl, advantages))
    eff = []
    for s in torch.unique(seq_ids[valid]).tolist():
        ws = w.detach()[seq_ids == s].double()
        eff.append(float(1.0 / ((ws / ws.numel()) ** 2).sum()))
    return {
        "entropy/mean": float(Hv.mean()),
        "entropy/min": float(Hv.min()),
        "entropy/max": float(Hv.max()),
        "weights/max": float(wv.max()),
        "weights/effective_tokens": sum(eff) / len(eff),
        "clip_ratio/low_mean": float(((rv < 1 - eps_low) & (Av < 0)).double().mean()),
        "clip_ratio/high_mean": float(((rv > 1 + eps_high) & (Av > 0)).double().mean()),
        "kl": float(kv.mean()),
        "tokens": float(n),
        "responses": float(len(eff)),
    }
