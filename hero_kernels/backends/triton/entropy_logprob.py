"""Triton backend of ``entropy_logprob``: per-row log-prob of the label, entropy and log-sum-exp.

Math: docs/design.md section 1 (tests compare with the float64 oracle). With ``x = z / tau``:
``lse = log sum_j e^{x_j}``, ``logp = x_y - lse``, ``H = lse - sum_j p_j x_j``, and the backward
``dz_j = (1/tau) [g (1[j=y] - p_j) - k p_j (log p_j + H)]``.

Forward: one program per row, ONE pass over the vocabulary in tiles of ``BLOCK_V`` columns. Every lane keeps
its own online state (running max ``m``, ``s = sum e^{x-m}``, ``t = sum (x-m) e^{x-m}``) so the hot loop
has no cross-thread reduction and exactly one ``exp`` per element; the lanes are merged once per row.
``t`` is kept *relative to the running max* so ``H = log s - t/s`` has no cancellation between two
large numbers (the absolute form ``lse - sum p x`` loses ~ulp(lse) when logits are large).

Backward: one program per row, one pass; ``p`` recomputed from the saved ``lse`` (never stored), all
math in fp32. The target column's ``1 - p_y`` is NOT formed as ``1 - exp(x_y - lse)``: the pass sums
``q = sum_{j != y} p_j`` and rewrites column ``y`` after the loop with ``1 - p_y = q / (q + p_y)``, so
``g (1 - p_y)`` keeps its relative precision when ``p_y -> 1`` (the bf16 cancellation of Liger #1329, and
the ulp(lse) loss of fp32). Every element is loaded and stored by the same thread in the same iteration
and ``x_y`` is read (behind a barrier) before the loop, so ``out`` may alias ``logits`` (in-place backward).

Launchers (``forward``, ``backward``) never touch autograd; the public op lives in
``hero_kernels/entropy_logprob.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hero_kernels.options import RowOptions

__all__ = ["LaunchConfig", "launch_config", "LAUNCH_CONFIGS", "KERNEL_CONFIGS", "forward", "backward"]

_NEG_LOG2E = tl.constexpr(-1.4426950408889634)
# Finite "no element seen yet" lane max: with -inf, the first update would compute (+inf) * 0 = NaN.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# |x - m| beyond this gives e^{-|x-m|} == 0 in fp32; clamping keeps (x - m) * 0 finite for x = -inf.
_D_CLAMP = tl.constexpr(128.0)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["inv_temp", "ignore_index"])
def _entropy_logprob_fwd_kernel(
    logits_ptr,  # [N, V] bf16/fp16/fp32, last-dim stride 1
    labels_ptr,  # [N] int64 (contiguous)
    logp_ptr,  # [N] fp32 out
    ent_ptr,  # [N] fp32 out
    lse_ptr,  # [N] fp32 out
    V,
    stride_row,
    inv_temp,  # fp32 runtime scalar: one compiled kernel for every temperature
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    base = logits_ptr + row.to(tl.int64) * stride_row
    inv_t = tl.cast(inv_temp, tl.float32)  # explicit: a Python float must never make the loop state fp64

    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -_FLT_MAX, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    # Masked rows skip the loop entirely (zero trip count) and write 0 below.
    v_end = tl.where(valid, V, 0)
    for start in range(0, v_end, BLOCK_V):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        d = x - m
        up = d > 0  # new lane max: rescale the old state by e^{-d}, the new element contributes e^0 = 1
        e = tl.exp2(tl.abs(d) * _NEG_LOG2E)  # e^{-|d|}: the only transcendental per element
        # t first: its rescale needs the OLD s. Padded columns / -inf logits give d = -inf and e = 0:
        # the clamps keep d * e (and d * s under e = 0) at 0, not NaN.
        t = tl.where(up, (t - tl.minimum(d, _D_CLAMP) * s) * e, t + tl.maximum(d, -_D_CLAMP) * e)
        s = tl.where(up, s * e + 1.0, s + e)
        m = tl.where(up, x, m)

    # Merge the lanes once per row.
    m_row = tl.max(m, axis=0)
    alpha = tl.exp(m - m_row)
    s_row = tl.sum(s * alpha, axis=0)
    # Lanes far below the row max have alpha == 0 while (m - m_row) * s may be -inf: drop them.
    t_row = tl.sum(tl.where(alpha > 0, alpha * (t + (m - m_row) * s), 0.0), axis=0)
    log_s = tl.log(s_row)
    # The label logit: one scalar load, scaled exactly like the loop scales it.
    x_y = tl.load(base + label, mask=valid, other=0.0).to(tl.float32) * inv_t
    logp = (x_y - m_row) - log_s
    ent = log_s - t_row / s_row
    lse = m_row + log_s
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))


@triton.jit(do_not_specialize=["inv_temp", "ignore_index"])
def _entropy_logprob_bwd_kernel(
    logits_ptr,  # [N, V] in, last-dim stride 1
    out_ptr,  # [N, V] out (may be logits_ptr itself), last-dim stride 1
    labels_ptr,  # [N] int64 (contiguous)
    lse_ptr,  # [N] fp32 (saved by the forward)
    ent_ptr,  # [N] fp32 (saved by the forward)
    g_ptr,  # [N] fp32 dL/dlogp, any stride (0 for an expanded scalar)
    k_ptr,  # [N] fp32 dL/dH, any stride
    V,
    stride_row,
    stride_out,
    stride_g,
    stride_k,
    inv_temp,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    row64 = row.to(tl.int64)
    base = logits_ptr + row64 * stride_row
    obase = out_ptr + row64 * stride_out
    inv_t = tl.cast(inv_temp, tl.float32)
    # Masked rows: g = k = 0 and no logits read, so every element written below is 0.
    g = tl.where(valid, tl.load(g_ptr + row64 * stride_g, mask=valid, other=0.0).to(tl.float32), 0.0)
    k = tl.where(valid, tl.load(k_ptr + row64 * stride_k, mask=valid, other=0.0).to(tl.float32), 0.0)
    lse = tl.where(valid, tl.load(lse_ptr + row), 0.0)
    ent = tl.where(valid, tl.load(ent_ptr + row), 0.0)
    g_t = g * inv_t
    k_t = k * inv_t

    # The label logit, read before the loop: in place, the loop overwrites column y. The barrier makes
    # every thread's read happen before any thread's store.
    x_y = tl.load(base + label, mask=valid, other=0.0).to(tl.float32) * inv_t
    tl.debug_barrier()

    cols0 = tl.arange(0, BLOCK_V)
    # q = sum_{j != y} p_j (= 1 - p_y up to the lse rounding), so the target gradient g (1 - p_y) keeps its
    # relative precision when p_y -> 1 (1 - exp(x_y - lse) would lose it to cancellation and to ulp(lse)).
    q = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        cmask = cols < V
        # other=-inf: padded columns get p = 0 and add nothing to q.
        x = tl.load(base + cols, mask=cmask & valid, other=float("-inf")).to(tl.float32) * inv_t
        logq = x - lse
        p = tl.exp(logq)
        q += tl.where(cols != label, p, 0.0)
        # p == 0 with logq == -inf (a -inf logit or a padded lane) must give 0, not 0 * -inf.
        dz = -g_t * p - k_t * (p * (tl.maximum(logq, -_FLT_MAX) + ent))
        # Full tiles (vector stores; a mask excluding column y would split them into scalar stores): at
        # j == y this lacks the g term and is overwritten below. Same thread loads and stores an element.
        tl.store(obase + cols, dz.to(out_ptr.dtype.element_ty), mask=cmask)

    q_row = tl.sum(q, axis=0)
    logq_y = x_y - lse
    p_y = tl.exp(logq_y)
    # 1 - p_y = q / (q + p_y): the ratio cancels the common factor e^{-err(lse)} that the fp32 rounding
    # of lse puts on every p_j (|lse| ~ 1e4 has ulp ~ 1e-3), so it is accurate for any p_y.
    one_minus_p_y = q_row / (q_row + p_y)
    dz_y = g_t * one_minus_p_y - k_t * (p_y * (logq_y + ent))
    # Order the loop's store of column y (any thread) before this one.
    tl.debug_barrier()
    tl.store(obase + label, dz_y.to(out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Tile of one loop iteration and the warps of one row program.

    block_v: vocabulary columns per iteration (constexpr); num_warps / num_stages: Triton launch options.
    block_v / (32 * num_warps) is the elements each thread holds per iteration (8 or 16: one or two
    16-byte bf16 vectors in flight, three fp32 state registers each in the forward).
    """

    block_v: int
    num_warps: int
    num_stages: int = 1

    @property
    def name(self) -> str:
        return f"BLOCK_V={self.block_v},warps={self.num_warps},stages={self.num_stages}"


#: Every config ``launch_config`` can return, smallest first (the compile check covers all of them).
LAUNCH_CONFIGS: Tuple[LaunchConfig, ...] = (
    LaunchConfig(256, 1),
    LaunchConfig(1024, 4),
    LaunchConfig(2048, 8),
    LaunchConfig(4096, 8),
)


def launch_config(V: int) -> LaunchConfig:
    """Heuristic tile for a row of V columns: the smallest tile covering short rows (little padding
    waste), 4096 columns x 8 warps for LM vocabularies (32k-262k: 8-64 iterations per row)."""
    if V <= 256:
        return LAUNCH_CONFIGS[0]
    if V <= 1024:
        return LAUNCH_CONFIGS[1]
    if V <= 4096:
        return LAUNCH_CONFIGS[2]
    return LAUNCH_CONFIGS[3]


_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _kernel_configs() -> List[tuple]:
    """(kernel fn, signature, constexprs, num_warps, num_stages, description) for the compile check."""
    rows = []
    for cfg in LAUNCH_CONFIGS:
        for dt in ("bf16", "fp16", "fp32"):
            fwd_sig = {
                "logits_ptr": f"*{dt}", "labels_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
                "lse_ptr": "*fp32", "V": "i32", "stride_row": "i32", "inv_temp": "fp32", "ignore_index": "i32",
                "BLOCK_V": "constexpr",
            }
            bwd_sig = {
                "logits_ptr": f"*{dt}", "out_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": "*fp32",
                "ent_ptr": "*fp32", "g_ptr": "*fp32", "k_ptr": "*fp32", "V": "i32", "stride_row": "i32",
                "stride_out": "i32", "stride_g": "i32", "stride_k": "i32", "inv_temp": "fp32",
                "ignore_index": "i32", "BLOCK_V": "constexpr",
            }
            const = {"BLOCK_V": cfg.block_v}
            rows.append((_entropy_logprob_fwd_kernel, fwd_sig, const, cfg.num_warps, cfg.num_stages,
                         f"entropy_logprob_fwd[{dt},{cfg.name}]"))
            rows.append((_entropy_logprob_bwd_kernel, bwd_sig, const, cfg.num_warps, cfg.num_stages,
                         f"entropy_logprob_bwd[{dt},{cfg.name}]"))
    return rows


#: Every (kernel, dtype, launch config) the launchers can run; consumed by the GPU compile check/report.
KERNEL_CONFIGS: List[tuple] = _kernel_configs()


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _check_logits(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, V], got shape {tuple(t.shape)}")
    if t.dtype not in _TRITON_DTYPE:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have last-dim stride 1, got strides {tuple(t.stride())}")


def forward(logits: Tensor, labels: Tensor, opts: RowOptions) -> Tuple[Tensor, Tensor, Tensor]:
    """logits [N, V] (bf16/fp16/fp32, last-dim stride 1, any row stride), labels [N] int64.

    Returns (logp, H, lse), each float32 [N]; rows with label == opts.ignore_index give 0, 0, 0.
    """
    _check_logits("logits", logits)
    N, V = logits.shape
    dev = logits.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return logp, ent, lse
    labels = labels.contiguous()
    cfg = launch_config(V)
    _entropy_logprob_fwd_kernel[(N,)](
        logits, labels, logp, ent, lse, V, logits.stride(0), float(opts.inv_temperature), int(opts.ignore_index),
        BLOCK_V=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return logp, ent, lse


def _row_vector(t: Optional[Tensor], N: int, dev) -> Tensor:
    """Upstream gradient [N] as fp32; None -> zeros (stride 0, no allocation of N elements)."""
    if t is None:
        return torch.zeros((), dtype=torch.float32, device=dev).expand(N)
    return t.to(torch.float32)


def backward(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Optional[Tensor],
    grad_H: Optional[Tensor],
    opts: RowOptions,
    out: Optional[Tensor] = None,
) -> Tensor:
    """dL/dlogits [N, V] in logits.dtype from the saved (lse [N], H [N]) and upstream grads [N] (fp32).

    ``out`` (optional, [N, V], logits.dtype, last-dim stride 1) receives the result; it may be ``logits``
    itself (in-place). Masked rows get 0. ``None`` upstream gradients count as zeros.
    """
    _check_logits("logits", logits)
    N, V = logits.shape
    dev = logits.device
    if out is None:
        out = torch.empty((N, V), dtype=logits.dtype, device=dev)
    else:
        _check_logits("out", out)
        if tuple(out.shape) != (N, V) or out.dtype != logits.dtype:
            raise ValueError(f"out must be [{N}, {V}] {logits.dtype}, got {tuple(out.shape)} {out.dtype}")
    if N == 0 or V == 0:
        return out
    labels = labels.contiguous()
    g = _row_vector(grad_logp, N, dev)
    k = _row_vector(grad_H, N, dev)
    lse = lse.to(torch.float32).contiguous()
    H = H.to(torch.float32).contiguous()
    cfg = launch_config(V)
    _entropy_logprob_bwd_kernel[(N,)](
        logits, out, labels, lse, H, g, k, V, logits.stride(0), out.stride(0), g.stride(0), k.stride(0),
        float(opts.inv_temperature), int(opts.ignore_index),
        BLOCK_V=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
