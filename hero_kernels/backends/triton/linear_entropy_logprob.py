"""Fused LM head on Triton: entropy + log-prob of ``hidden @ weight.T + bias`` without [N, V] logits.

Math: docs/design.md section 1 (tests compare with ``hero_kernels.reference``, the float64 oracle).

Shapes
------
hidden [N, D] (bf16 / fp16 / fp32, last-dim stride 1 after the launcher), weight [V, D] (same dtype),
bias [V] or None, labels [N] int64. Outputs (logp, H, lse) float32 [N]; masked rows
(``label == ignore_index``) are 0 and cost no GEMM work: the launchers compact the valid rows with
``index_select`` before any kernel runs and scatter the results back.

Kernels (block sizes are constexpr, every shape / stride is a runtime int, offsets are int64)
------------------------------------------------------------------------------------------
``_fwd_partials_kernel``  grid (row blocks, vocab splits). Each program streams the vocab tiles of its
    split: the logits tile [BLOCK_N, BLOCK_V] is ``tl.dot`` of hidden and weight tiles over a masked K
    loop (fp32 accumulate), then the online update and the label logit are taken from the tile while it
    is in registers. It writes five fp32 partials per (split, row): m, s, so (s over the NON-label
    columns), t = sum (x - m) e^{x-m} (shifted), x_label; nothing [N, V].
    Vocab splits only exist to fill the GPU when there are few row blocks.
``_merge_partials_kernel``  grid (row blocks). Merges the per-split partials in a fixed order and
    writes (logp, H, lse) or, for a vocab shard (``hero_kernels.sharded``), the merged (m, s, t, x_label).
    Dominant label (p_y -> 1, the low-entropy rows HERO up-weights): x_y - lse and 1 - p_y cancel to
    O(eps |lse|) noise in fp32, so with e_y = e^{x_y - m} >= so (p_y >= 1/2) the kernel writes
    logp = -log1p(so / e_y) and log s = (x_y - m) + log1p(so / e_y); H = log s - t / s adds two
    non-negative terms. logp and H keep their relative accuracy down to 1 - p_y ~ 1e-7.
``_bwd_dh_kernel``  grid (row blocks, vocab splits). Recomputes each logits tile from the saved lse and
    H, forms dz = (1/tau)[g(1[j=y] - p) - k p (log p + H)] in fp32 (the label column from the forward's
    accurate logp, see ``backward``) and accumulates dz @ W into an fp32 dh buffer that only this
    program writes (read-modify-write over D chunks): deterministic, no atomics. With several vocab
    splits each split owns its own fp32 [N, D] slice and the slices are summed in a fixed order.
``_bwd_dw_kernel``  grid (vocab blocks). Same recompute, looping over row blocks; accumulates
    dz^T @ h into the fp32 dW rows it owns and db in registers. Deterministic.
``_bwd_atomic_kernel``  (option ``deterministic=False``, off by default) grid (row blocks, vocab blocks):
    one recompute per tile, dh / dW / db through fp32 ``atomic_add`` (order-dependent rounding). This is
    the 4-GEMM schedule (forward, recompute, dh, dW); the deterministic one pays one more recompute.

Skipped gradients (``backward(..., need_dh=False)`` for a detached hidden, ``need_dw=False`` for a frozen
LM head): the deterministic schedule does not launch that gradient's kernel (no dh buffer / no fp32 [V, D]
dW buffer). The atomic kernel always writes both, so when only one gradient is wanted the launcher runs
the single deterministic kernel for it instead (same recompute + one GEMM, and deterministic).

Cost model (bytes / FLOPs), N valid rows: forward 2*N*D*V FLOPs; deterministic backward 8*N*D*V
(2 recomputes + dh + dW), atomic backward 6*N*D*V. Extra memory: O(N*D + V*D) fp32 accumulators plus
per-row partials (5 * splits * N floats); never O(N*V).

Bytes: each forward program re-reads its hidden rows once per vocab tile and every weight tile once per
row block (L2-resident re-reads, as in any tiled GEMM); HBM traffic is ~N*D + V*D elements per pass
plus the fp32 dh / dW read-modify-writes of the backward (N*D*8 bytes per vocab tile of a row block in
the dh kernel, V*D*8 per row block in the dW kernel, mostly L2 hits).

Alignment: the launchers keep D, the row strides and the base addresses multiples of 16 (odd D is
zero-padded, misaligned views are copied), so Triton always takes its aligned specialization (16-byte
vector loads). ``compile_attrs`` gives the compile checks the same attributes; without them the
unaligned variant of every config spills registers.

Temperature is a runtime fp32 argument (no recompilation per value). fp32 inputs use IEEE fp32 dots by
default (``allow_tf32=False``) so they match PyTorch's fp32 matmul accuracy. 16-bit inputs: dz is rounded
to the input dtype before the dh / dW dots (as eager PyTorch's bf16 backward does); every accumulation
is fp32. Label logits of a vocab shard never match padded columns (a label of the next shard could).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hero_kernels.options import RowOptions

__all__ = [
    "Tile",
    "LinearEntropyConfig",
    "default_config",
    "forward",
    "forward_partials",
    "backward",
    "KERNEL_CONFIGS",
    "compile_attrs",
    "compile_resource_report",
]


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """Block sizes of one kernel. block_k: K step of the logits GEMM; block_d: D chunk of the dh/dW update."""

    block_n: int
    block_v: int
    block_k: int
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_k", "block_d"):
            v = getattr(self, name)
            # tl.dot needs every dimension >= 16 and power-of-two blocks.
            if v < 16 or v & (v - 1):
                raise ValueError(f"Tile.{name} must be a power of two >= 16, got {v}")


@dataclass(frozen=True)
class LinearEntropyConfig:
    """Launch configuration of the fused LM head.

    fwd / dh / dw / atomic: tiles of the four GEMM kernels.
    deterministic: True (default) = two-kernel backward, bitwise reproducible; False = single kernel with
        fp32 atomics (one recompute fewer, run-to-run rounding differences).
    vocab_splits / dh_splits: None = choose from the SM count (1 on CPU / interpreter); an int forces it.
    allow_tf32: fp32 inputs only; TF32 tensor cores instead of IEEE fp32 dots (faster, ~1e-3 relative).
    max_split_bytes: cap on the fp32 [splits, N, D] dh buffer when the backward splits the vocab.
    """

    fwd: Tile
    dh: Tile
    dw: Tile
    atomic: Tile
    deterministic: bool = True
    vocab_splits: Optional[int] = None
    dh_splits: Optional[int] = None
    allow_tf32: bool = False
    max_split_bytes: int = 512 << 20

    def __post_init__(self):
        for name in ("vocab_splits", "dh_splits"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"LinearEntropyConfig.{name} must be None or an int >= 1, got {v!r}")


# 16-bit inputs: tensor-core tiles. fp32 inputs: IEEE fp32 dots run on FMA units, so smaller tiles keep
# the register file free of spills (checked by compile_resource_report / tests for sm_80 and sm_90a).
_CONFIG_16 = LinearEntropyConfig(
    fwd=Tile(block_n=128, block_v=128, block_k=64, num_warps=8, num_stages=3),
    dh=Tile(block_n=64, block_v=128, block_k=64, block_d=64, num_warps=8, num_stages=2),
    dw=Tile(block_n=64, block_v=128, block_k=64, block_d=64, num_warps=8, num_stages=2),
    atomic=Tile(block_n=64, block_v=128, block_k=64, block_d=32, num_warps=8, num_stages=2),
)
_CONFIG_32 = LinearEntropyConfig(
    fwd=Tile(block_n=64, block_v=128, block_k=32, num_warps=8, num_stages=2),
    dh=Tile(block_n=64, block_v=128, block_k=32, block_d=32, num_warps=8, num_stages=2),
    dw=Tile(block_n=32, block_v=64, block_k=32, block_d=32, num_warps=4, num_stages=2),
    atomic=Tile(block_n=64, block_v=64, block_k=16, block_d=16, num_warps=4, num_stages=2),
)


def default_config(dtype: torch.dtype) -> LinearEntropyConfig:
    """The configuration the launchers use for ``dtype`` when none is given."""
    return _CONFIG_32 if dtype == torch.float32 else _CONFIG_16


# Whether @triton.jit produced interpreter functions (TRITON_INTERPRET=1 when this module was imported).
_INTERPRETED = False

_TL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
# Register pressure: padded rows / columns of a tile load a clamped, real row of hidden / weight instead
# of carrying a 2-D mask through the K loop (their results are discarded or masked to -inf / 0), and the
# K / D loops advance one int64 pointer block instead of recomputing addresses.
@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST_DOT is set only under the Triton interpreter, whose dot
    multiplies bf16 bit patterns as integers (np.matmul on uint16); products of 16-bit floats are exact in
    fp32, so the upcast dot gives the tensor-core result up to summation order."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x = (h[rows_c] @ w[cols_c].T + b[cols_c]) / tau, fp32 [BLOCK_N, BLOCK_V]; -inf where ~col_mask.

    rows_c / cols_c: row / vocab indices already clamped into range (padded lanes repeat a real one).
    """
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows_c.to(tl.int64)[:, None] * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols_c.to(tl.int64)[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        # D need not be a multiple of BLOCK_K: the tail lanes load 0 and add nothing.
        k_mask = ks[None, :] < D - k0
        h = tl.load(h_ptrs, mask=k_mask, other=0.0)
        w = tl.load(w_ptrs, mask=k_mask, other=0.0)
        acc = _mma(h, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols_c).to(tl.float32)[None, :]
    x = acc * inv_temp
    # Padded vocab columns must contribute nothing: -inf, never a logit of 0.
    return tl.where(col_mask[None, :], x, float("-inf"))


@triton.jit
def _dlogits_tile(x, cols, col_mask, row_mask, labels, lse, k, c, lab, inv_temp, LABEL_STATS: tl.constexpr):
    """dz = (1/tau)[g (1[j=y] - p) - k p (log p + H)] in fp32; 0 on padded columns and padded rows.

    Per row: k, c = g + k H and lab. Off the label, dz = -(1/tau) p (k log p + c): two tile ops fewer
    than the textbook form (registers). The label column: with LABEL_STATS it is replaced by
    lab = g (1 - p_y) - k p_y (log p_y + H), formed by the launcher from the forward's accurate logp; from
    the tile, 1 - e^{x_y - lse} and x_y - lse are rounding noise when p_y -> 1 (an O(eps |lse|) error
    against values ~ 1 - p_y: the Liger #1329 class, in the low-entropy rows HERO up-weights). Without
    (vocab shards), lab = g is added to the tile's value: the plain form.
    """
    valid = row_mask[:, None] & col_mask[None, :]
    # Padded columns are -inf: use log q = 0 there (p = 0 anyway) so no (-inf) * 0 = NaN appears.
    logq = tl.where(valid, x - lse[:, None], 0.0)
    p = tl.where(valid, tl.exp(logq), 0.0)
    dz = -p * (k[:, None] * logq + c[:, None])
    is_label = cols[None, :] == labels[:, None]
    if LABEL_STATS:
        dz = tl.where(is_label, lab[:, None], dz)
    else:
        dz = tl.where(is_label, dz + lab[:, None], dz)
    # Padded rows must give exactly 0: dW sums dz over rows.
    return tl.where(valid, dz * inv_temp, 0.0)


@triton.jit
def _fwd_partials_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr,
    m_ptr, s_ptr, so_ptr, t_ptr, xl_ptr,
    N, D, V, stride_h, stride_w, cols_per_split, label_offset, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partials of one (row block, vocab split). Outputs m, s, so, t, xl: fp32 [splits, N] (row stride N).

    m = max x, s = sum e^{x-m}, so = the same sum over the NON-label columns, t = sum (x - m) e^{x-m}
    (shifted: every term <= 0, so H = log s - t / s has no cancellation against |lse| when p_y -> 1);
    xl = x[label] when the label falls in this split, else 0 (so partials of disjoint splits merge by a
    plain sum).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows_c = tl.minimum(rows, N - 1)
    labels = tl.load(labels_ptr + rows_c) - label_offset
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    # s is not carried through the loop (registers: the 16-bit tiles sit at the sm_80 limit): the label's
    # term is added back to so from xl whenever s is needed, s = so + e^{xl - m} once the label was seen.
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    so = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    xl = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, tl.minimum(cols, v_end - 1), col_mask, D, stride_h,
                         stride_w, inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
        # Rebasing t from m to m_new adds (m - m_new) s (<= 0); s before this tile, 0 on the first one.
        seen = (labels >= v_begin) & (labels < v0)
        s_prev = so + tl.where(seen, tl.exp(tl.where(seen, xl - m, 0.0)), 0.0)
        # Mask the padded columns too: for a vocab shard a label of the NEXT shard can equal one of them.
        is_label = (cols[None, :] == labels[:, None]) & col_mask[None, :]
        xl += tl.sum(tl.where(is_label, x, 0.0), axis=1)
        # Every tile holds >= 1 real column, so m_new is finite and alpha = e^{-inf} = 0 on the first tile.
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp(m - m_new)
        shift = tl.where(m > float("-inf"), m - m_new, 0.0) * s_prev
        xs = x - m_new[:, None]
        e = tl.exp(xs)
        so = so * alpha + tl.sum(tl.where(is_label, 0.0, e), axis=1)
        # xs is -inf on padded columns where e = 0: zero it there so no (-inf) * 0 = NaN appears.
        t = (t + shift) * alpha + tl.sum(tl.where(col_mask[None, :], xs, 0.0) * e, axis=1)
        m = m_new
    in_split = (labels >= v_begin) & (labels < v_end)
    s = so + tl.where(in_split, tl.exp(tl.where(in_split, xl - m, 0.0)), 0.0)

    out = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(so_ptr + out, so, mask=row_mask)
    tl.store(t_ptr + out, t, mask=row_mask)
    tl.store(xl_ptr + out, xl, mask=row_mask)


@triton.jit
def _log1p_unit(r):
    """log(1 + r) for 0 <= r <= 1 to fp32 relative accuracy, from basic ops only (the interpreter has no
    libdevice, and tl.log near 1 is an approximation with an ABSOLUTE error bound, useless for tiny r):
    log1p(r) = 2 atanh(w), w = r / (2 + r) <= 1/3, by its odd series; 8 terms leave < 2e-9 relative."""
    w = r / (2.0 + r)
    w2 = w * w
    acc = 1.0 / 15.0
    acc = acc * w2 + 1.0 / 13.0
    acc = acc * w2 + 1.0 / 11.0
    acc = acc * w2 + 1.0 / 9.0
    acc = acc * w2 + 1.0 / 7.0
    acc = acc * w2 + 1.0 / 5.0
    acc = acc * w2 + 1.0 / 3.0
    acc = acc * w2 + 1.0
    return 2.0 * w * acc


@triton.jit
def _merge_partials_kernel(
    m_ptr, s_ptr, so_ptr, t_ptr, xl_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, N, S,
    FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge [S, N] partials in split order.

    FINAL: o0..o2 = (logp, H, lse). Else o0..o3 = merged (m, s, t, xl) in the vocab-shard format of
    ``hero_kernels.sharded`` (t UNshifted: sum x e^{x-m}).
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    M = tl.full((BLOCK,), float("-inf"), tl.float32)
    off = rows.to(tl.int64)
    for _ in range(0, S):
        M = tl.maximum(M, tl.load(m_ptr + off, mask=mask, other=float("-inf")))
        off += N
    # Rows whose partials are all empty keep (-inf, 0, 0); never exp(-inf - (-inf)).
    M_safe = tl.where(M > float("-inf"), M, 0.0)
    s = tl.zeros((BLOCK,), tl.float32)
    so = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    xl = tl.zeros((BLOCK,), tl.float32)
    off = rows.to(tl.int64)
    for _ in range(0, S):
        mk = tl.load(m_ptr + off, mask=mask, other=float("-inf"))
        live = mk > float("-inf")
        a = tl.where(live, tl.exp(mk - M_safe), 0.0)
        sk = tl.load(s_ptr + off, mask=mask, other=0.0)
        s += a * sk
        so += a * tl.load(so_ptr + off, mask=mask, other=0.0)
        # Rebase the split's shifted t from mk to M: + (mk - M) sk, same sign as t (no cancellation).
        t += a * (tl.load(t_ptr + off, mask=mask, other=0.0) + tl.where(live, mk - M_safe, 0.0) * sk)
        xl += tl.load(xl_ptr + off, mask=mask, other=0.0)
        off += N
    if FINAL:
        # Padded lanes (rows >= N) are never stored; s = 1 there keeps log / divide finite.
        s = tl.where(mask, s, 1.0)
        # The label's own term e_y = e^{x_y - M}. When it dominates (e_y >= so, i.e. p_y >= 1/2, and then
        # the label is the row max), log p_y = -log1p(so / e_y) and log s = (x_y - M) + log1p(so / e_y)
        # keep their relative accuracy as p_y -> 1, where x_y - lse and log(s ~ 1) are rounding noise.
        dy = xl - M_safe
        e_y = tl.exp(dy)
        dom = e_y >= so
        l1p = _log1p_unit(tl.where(dom, so / tl.where(dom, e_y, 1.0), 0.0))
        log_s = tl.where(dom, dy + l1p, tl.log(s))
        # H = log s - t / s: both terms >= 0, so H >= 0 and accurate even when H -> 0.
        tl.store(o0_ptr + rows, tl.where(dom, -l1p, dy - log_s), mask=mask)
        tl.store(o1_ptr + rows, log_s - t / s, mask=mask)
        tl.store(o2_ptr + rows, M + log_s, mask=mask)
    else:
        tl.store(o0_ptr + rows, M, mask=mask)
        tl.store(o1_ptr + rows, s, mask=mask)
        tl.store(o2_ptr + rows, t + M_safe * s, mask=mask)
        tl.store(o3_ptr + rows, xl, mask=mask)


@triton.jit
def _row_stats(labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, rows_c, label_offset):
    """Per-row labels (shard-local), lse, k, c = g + k H and the label-column value (see _dlogits_tile) of
    the clamped rows."""
    labels = tl.load(labels_ptr + rows_c) - label_offset
    lse = tl.load(lse_ptr + rows_c)
    return labels, lse, tl.load(k_ptr + rows_c), tl.load(c_ptr + rows_c), tl.load(lab_ptr + rows_c)


@triton.jit
def _bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, dh_ptr,
    N, D, V, stride_h, stride_w, cols_per_split, label_offset, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    LABEL_STATS: tl.constexpr,
):
    """dh[split] rows of this block += dz @ W over the split's vocab. dh: fp32 [splits, N, D], zero-filled."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows_c = tl.minimum(rows, N - 1)
    labels, lse, k, c, lab = _row_stats(labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, rows_c, label_offset)
    ds = tl.arange(0, BLOCK_D)
    dh_rows = dh_ptr + pid_s.to(tl.int64) * N * D + rows_c.to(tl.int64)[:, None] * D + ds[None, :]
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        cols_c = tl.minimum(cols, v_end - 1)
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w,
                         inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
        dz = _dlogits_tile(x, cols, col_mask, row_mask, labels, lse, k, c, lab, inv_temp,
                           LABEL_STATS)
        dz = dz.to(w_ptr.dtype.element_ty)
        w_ptrs = w_ptr + cols_c.to(tl.int64)[:, None] * stride_w + ds[None, :]
        dh_ptrs = dh_rows
        for d0 in range(0, D, BLOCK_D):
            d_mask = ds[None, :] < D - d0
            # dz is 0 on padded columns, so the clamped (repeated) weight rows add nothing.
            w = tl.load(w_ptrs, mask=d_mask, other=0.0)
            o_mask = row_mask[:, None] & d_mask
            # This program is the only writer of these rows of this split: plain read-modify-write.
            cur = tl.load(dh_ptrs, mask=o_mask, other=0.0)
            tl.store(dh_ptrs, _mma(dz, w, cur, DOT_PRECISION, UPCAST_DOT), mask=o_mask)
            w_ptrs += BLOCK_D
            dh_ptrs += BLOCK_D


@triton.jit
def _bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, dw_ptr, db_ptr,
    N, D, V, stride_h, stride_w, label_offset, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    LABEL_STATS: tl.constexpr,
):
    """dW rows of this vocab block += dz^T @ h over all rows; db = column sums of dz.

    dw: fp32 [V, D] zero-filled (contiguous); db: fp32 [V] (written when HAS_BIAS).
    """
    pid_v = tl.program_id(0)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols_c = tl.minimum(cols, V - 1)
    ds = tl.arange(0, BLOCK_D)
    dw_cols = dw_ptr + cols_c.to(tl.int64)[:, None] * D + ds[None, :]
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows_c = tl.minimum(rows, N - 1)
        labels, lse, k, c, lab = _row_stats(labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, rows_c, label_offset)
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w,
                         inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
        dz = _dlogits_tile(x, cols, col_mask, row_mask, labels, lse, k, c, lab, inv_temp,
                           LABEL_STATS)
        if HAS_BIAS:
            db += tl.sum(dz, axis=0)
        dz_t = tl.trans(dz.to(h_ptr.dtype.element_ty))
        h_ptrs = h_ptr + rows_c.to(tl.int64)[:, None] * stride_h + ds[None, :]
        dw_ptrs = dw_cols
        for d0 in range(0, D, BLOCK_D):
            d_mask = ds[None, :] < D - d0
            # dz is 0 on padded rows, so the clamped (repeated) hidden rows add nothing.
            h = tl.load(h_ptrs, mask=d_mask, other=0.0)
            o_mask = col_mask[:, None] & d_mask
            cur = tl.load(dw_ptrs, mask=o_mask, other=0.0)
            tl.store(dw_ptrs, _mma(dz_t, h, cur, DOT_PRECISION, UPCAST_DOT), mask=o_mask)
            h_ptrs += BLOCK_D
            dw_ptrs += BLOCK_D
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=col_mask)


@triton.jit
def _bwd_atomic_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, dh_ptr, dw_ptr, db_ptr,
    N, D, V, stride_h, stride_w, label_offset, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    LABEL_STATS: tl.constexpr,
):
    """One (row block, vocab block) tile: dh, dW, db via fp32 atomic_add (NOT deterministic).

    dh: fp32 [N, D], dw: fp32 [V, D], db: fp32 [V]; all zero-filled and contiguous.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows_c = tl.minimum(rows, N - 1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols_c = tl.minimum(cols, V - 1)
    labels, lse, k, c, lab = _row_stats(labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, rows_c, label_offset)
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w,
                     inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
    dz = _dlogits_tile(x, cols, col_mask, row_mask, labels, lse, k, c, lab, inv_temp,
                       LABEL_STATS)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
    dz_c = dz.to(w_ptr.dtype.element_ty)
    dz_t = tl.trans(dz_c)
    ds = tl.arange(0, BLOCK_D)
    w_ptrs = w_ptr + cols_c.to(tl.int64)[:, None] * stride_w + ds[None, :]
    h_ptrs = h_ptr + rows_c.to(tl.int64)[:, None] * stride_h + ds[None, :]
    dh_ptrs = dh_ptr + rows_c.to(tl.int64)[:, None] * D + ds[None, :]
    dw_ptrs = dw_ptr + cols_c.to(tl.int64)[:, None] * D + ds[None, :]
    zero = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    zero_t = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = ds[None, :] < D - d0
        w = tl.load(w_ptrs, mask=d_mask, other=0.0)
        h = tl.load(h_ptrs, mask=d_mask, other=0.0)
        tl.atomic_add(dh_ptrs, _mma(dz_c, w, zero, DOT_PRECISION, UPCAST_DOT), mask=row_mask[:, None] & d_mask)
        tl.atomic_add(dw_ptrs, _mma(dz_t, h, zero_t, DOT_PRECISION, UPCAST_DOT), mask=col_mask[:, None] & d_mask)
        w_ptrs += BLOCK_D
        h_ptrs += BLOCK_D
        dh_ptrs += BLOCK_D
        dw_ptrs += BLOCK_D


_INTERPRETED = type(_fwd_partials_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------
# launchers (no autograd here)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About two waves of programs on a GPU; 0 (= no splitting) elsewhere, e.g. the CPU interpreter."""
    if device.type != "cuda":
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _sm_count(idx)


def _num_splits(forced: Optional[int], row_blocks: int, V: int, block_v: int, device: torch.device) -> int:
    max_splits = triton.cdiv(V, block_v)
    if forced is not None:
        return max(1, min(forced, max_splits))
    target = _target_programs(device)
    if target == 0 or row_blocks >= target:
        return 1
    return max(1, min(triton.cdiv(target, max(row_blocks, 1)), max_splits))


def _split_columns(V: int, splits: int, block_v: int) -> Tuple[int, int]:
    """(columns per split rounded up to block_v, actual split count with no empty split)."""
    per = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    return per, triton.cdiv(V, per)


def _upcast_dot(dtype: torch.dtype) -> bool:
    """True only under the Triton interpreter with bf16 inputs (see ``_mma``)."""
    return dtype == torch.bfloat16 and _INTERPRETED


def _dot_precision(dtype: torch.dtype, cfg: LinearEntropyConfig) -> str:
    return "tf32" if (dtype == torch.float32 and cfg.allow_tf32) else "ieee"


def _check(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> None:
    if hidden.dtype not in _TL_DTYPES:
        raise TypeError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N]={hidden.shape[0]}, got {tuple(labels.shape)}")


# Every launch keeps D, the row strides and the base addresses multiples of 16 (elements / bytes), so
# Triton always picks its aligned specialization (vectorized 16-byte loads): the one the sm_80 / sm_90a
# compile checks cover (see ``compile_attrs``). Odd D is zero-padded, which adds nothing to any dot.
_ALIGN = 16


def _padded_dim(D: int) -> int:
    return triton.cdiv(D, _ALIGN) * _ALIGN


def _aligned_2d(x: Tensor, D_pad: int) -> Tensor:
    """x [R, D] -> [R, D_pad]: last-dim stride 1, row stride % 16 == 0, 16-byte aligned base."""
    if D_pad != x.shape[1]:
        return torch.nn.functional.pad(x, (0, D_pad - x.shape[1]))
    if x.stride(1) == 1 and (x.shape[0] <= 1 or x.stride(0) % _ALIGN == 0) and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _aligned_1d(x: Tensor) -> Tensor:
    if x.stride(0) == 1 and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _compact(hidden: Tensor, labels: Tensor, ignore_index: int):
    """Valid-row indices (None when every row is valid), compacted hidden and labels."""
    valid = labels != ignore_index
    idx = torch.nonzero(valid).squeeze(1)
    if idx.numel() == labels.numel():
        return None, hidden, labels
    return idx, hidden.index_select(0, idx), labels.index_select(0, idx)


def _prepare(hidden, weight, bias, labels, ignore_index):
    """(valid-row idx | None, h [n, D_pad], weight [V, D_pad], bias | None, labels [n]) ready for launch."""
    idx, h, lab = _compact(hidden, labels, ignore_index)
    D_pad = _padded_dim(hidden.shape[1])
    h = _aligned_2d(h, D_pad)
    w = _aligned_2d(weight, D_pad)
    b = _aligned_1d(bias) if bias is not None else None
    return idx, h, w, b, _aligned_1d(lab)


def _launch_partials(h, weight, bias, labels, inv_temp, label_offset, cfg):
    """Unmerged partials (m, s, so, t, xl), each fp32 [splits, n], for compact rows h [n, D]."""
    n, D = h.shape
    V = weight.shape[0]
    t_ = cfg.fwd
    row_blocks = triton.cdiv(n, t_.block_n)
    per, splits = _split_columns(V, _num_splits(cfg.vocab_splits, row_blocks, V, t_.block_v, h.device), t_.block_v)
    parts = torch.empty((5, splits, n), dtype=torch.float32, device=h.device)
    _fwd_partials_kernel[(row_blocks, splits)](
        h, weight, bias if bias is not None else weight, labels,
        parts[0], parts[1], parts[2], parts[3], parts[4],
        n, D, V, h.stride(0), weight.stride(0), per, label_offset, inv_temp,
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(h.dtype, cfg), UPCAST_DOT=_upcast_dot(h.dtype),
        BLOCK_N=t_.block_n, BLOCK_V=t_.block_v, BLOCK_K=t_.block_k,
        num_warps=t_.num_warps, num_stages=t_.num_stages,
    )
    return parts, splits


_MERGE_BLOCK = 256


def _merge(parts: Tensor, splits: int, final: bool) -> Tuple[Tensor, ...]:
    """(logp, H, lse) when final, else merged (m, s, t, label_x); separate fp32 [n] tensors (the public
    custom op may not return outputs that alias each other)."""
    n = parts.shape[2]
    out = tuple(torch.empty(n, dtype=torch.float32, device=parts.device) for _ in range(3 if final else 4))
    o3 = out[0] if final else out[3]
    _merge_partials_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
        parts[0], parts[1], parts[2], parts[3], parts[4], out[0], out[1], out[2], o3, n, splits,
        FINAL=final, BLOCK=_MERGE_BLOCK, num_warps=4,
    )
    return out


def forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    opts: RowOptions,
    config: Optional[LinearEntropyConfig] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, H, lse), each fp32 [N]; masked rows 0. hidden [N, D], weight [V, D], bias [V] | None, labels [N]."""
    _check(hidden, weight, bias, labels)
    cfg = config or default_config(hidden.dtype)
    N = hidden.shape[0]
    idx, h, w, b, lab = _prepare(hidden, weight, bias, labels, opts.ignore_index)
    if h.shape[0] == 0:
        return tuple(torch.zeros(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    parts, splits = _launch_partials(h, w, b, lab, float(opts.inv_temperature), 0, cfg)
    res = _merge(parts, splits, final=True)
    if idx is None:
        return res
    return tuple(torch.zeros(N, dtype=torch.float32, device=hidden.device).index_copy_(0, idx, r) for r in res)


def forward_partials(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    opts: RowOptions,
    vocab_start: int = 0,
    config: Optional[LinearEntropyConfig] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row partials (m, s, t, label_x) of a vocab shard, each fp32 [N].

    weight [V_local, D] holds global vocab rows [vocab_start, vocab_start + V_local); labels are global
    ids. label_x is x[label] when the label is in the shard, else 0. Masked rows: (-inf, 0, 0, 0).
    Merge shards with ``hero_kernels.sharded.merge_stacked_partials``.
    """
    _check(hidden, weight, bias, labels)
    cfg = config or default_config(hidden.dtype)
    N = hidden.shape[0]
    idx, h, w, b, lab = _prepare(hidden, weight, bias, labels, opts.ignore_index)
    if h.shape[0] > 0:
        parts, splits = _launch_partials(h, w, b, lab, float(opts.inv_temperature), int(vocab_start), cfg)
        res = _merge(parts, splits, final=False)
        if idx is None:
            return res
    out = tuple(torch.zeros(N, dtype=torch.float32, device=hidden.device) for _ in range(4))
    out[0].fill_(float("-inf"))
    if h.shape[0] > 0:
        for o, r in zip(out, res):
            o.index_copy_(0, idx, r)
    return out


def backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Optional[Tensor],
    grad_H: Optional[Tensor],
    opts: RowOptions,
    config: Optional[LinearEntropyConfig] = None,
    vocab_start: int = 0,
    grad_hidden_dtype: Optional[torch.dtype] = None,
    *,
    logp: Optional[Tensor] = None,
    need_dh: bool = True,
    need_dw: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_hidden [N, D], grad_weight [V, D] in weight.dtype, grad_bias [V] | None).

    need_dh=False: grad_hidden is None and ``_bwd_dh_kernel`` is not launched. need_dw=False: grad_weight
    and grad_bias are None and ``_bwd_dw_kernel`` is not launched. With ``deterministic=False`` and only one
    gradient wanted, that gradient's deterministic kernel runs instead of the atomic one (which writes both).

    lse, H: fp32 [N] saved by the forward (GLOBAL values when weight is a vocab shard starting at
    ``vocab_start``; then grad_hidden is this shard's share, to be summed over shards).
    grad_logp, grad_H: fp32 [N] upstream gradients (None = 0). Accumulation is fp32 throughout; results
    are cast at the end. grad_hidden_dtype: defaults to hidden.dtype (pass torch.float32 for shards).
    logp: fp32 [N], the forward's (accurate) log p(label), GLOBAL like lse / H. Given, the label column
    takes 1 - p_y = -expm1(logp) and log p_y = logp from it (accurate as p_y -> 1); None (e.g. vocab
    shards without it) keeps the tile's 1 - e^{x_y - lse}, which is rounding noise when p_y -> 1.
    """
    _check(hidden, weight, bias, labels)
    if not (need_dh or need_dw):
        return None, None, None
    cfg = config or default_config(hidden.dtype)
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    gh_dtype = grad_hidden_dtype or hidden.dtype
    idx, h, w, b, labs = _prepare(hidden, weight, bias, labels, opts.ignore_index)
    n, D_pad = h.shape
    if n == 0:
        return (torch.zeros((N, D), dtype=gh_dtype, device=dev) if need_dh else None,
                torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if (bias is not None and need_dw) else None)
    zeros = torch.zeros(N, dtype=torch.float32, device=dev)
    label_stats = logp is not None
    rows = (lse, H, grad_logp if grad_logp is not None else zeros, grad_H if grad_H is not None else zeros,
            logp if label_stats else zeros)
    if idx is not None:
        rows = tuple(x.index_select(0, idx) for x in rows)
    lse, H, g, k, lp = (_aligned_1d(x.to(torch.float32)) for x in rows)
    # Per-row terms of dz, O(n) (see _dlogits_tile): c = g + k H and the label column's value, with
    # logp: g (1 - p_y) - k p_y (log p_y + H), 1 - p_y = -expm1(logp) (no cancellation as p_y -> 1).
    c = torch.addcmul(g, k, H)
    lab = torch.expm1(lp).mul_(g).neg_().sub_(torch.exp(lp).mul_(lp + H).mul_(k)) if label_stats else g
    inv_temp = float(opts.inv_temperature)
    prec = _dot_precision(h.dtype, cfg)
    has_bias = b is not None
    b_arg = b if has_bias else w

    dw32 = torch.zeros((V, D_pad), dtype=torch.float32, device=dev) if need_dw else None
    db32 = torch.zeros((V,), dtype=torch.float32, device=dev) if (has_bias and need_dw) else lse

    dh = None
    if not cfg.deterministic and need_dh and need_dw:
        t_ = cfg.atomic
        dh = torch.zeros((n, D_pad), dtype=torch.float32, device=dev)
        _bwd_atomic_kernel[(triton.cdiv(n, t_.block_n), triton.cdiv(V, t_.block_v))](
            h, w, b_arg, labs, lse, k, c, lab, dh, dw32, db32,
            n, D_pad, V, h.stride(0), w.stride(0), int(vocab_start), inv_temp,
            HAS_BIAS=has_bias, DOT_PRECISION=prec, UPCAST_DOT=_upcast_dot(h.dtype),
            BLOCK_N=t_.block_n, BLOCK_V=t_.block_v, BLOCK_K=t_.block_k, BLOCK_D=t_.block_d,
            LABEL_STATS=label_stats, num_warps=t_.num_warps, num_stages=t_.num_stages,
        )
        need_dh = need_dw = False  # both done
    if need_dh:
        t_ = cfg.dh
        row_blocks = triton.cdiv(n, t_.block_n)
        splits = _num_splits(cfg.dh_splits, row_blocks, V, t_.block_v, dev)
        if cfg.dh_splits is None:
            # Each split owns an fp32 [n, D] slice: cap the extra memory.
            splits = max(1, min(splits, cfg.max_split_bytes // max(1, n * D_pad * 4)))
        per, splits = _split_columns(V, splits, t_.block_v)
        dh32 = torch.zeros((splits, n, D_pad), dtype=torch.float32, device=dev)
        _bwd_dh_kernel[(row_blocks, splits)](
            h, w, b_arg, labs, lse, k, c, lab, dh32,
            n, D_pad, V, h.stride(0), w.stride(0), per, int(vocab_start), inv_temp,
            HAS_BIAS=has_bias, DOT_PRECISION=prec, UPCAST_DOT=_upcast_dot(h.dtype),
            BLOCK_N=t_.block_n, BLOCK_V=t_.block_v, BLOCK_K=t_.block_k, BLOCK_D=t_.block_d,
            LABEL_STATS=label_stats, num_warps=t_.num_warps, num_stages=t_.num_stages,
        )
        # Fixed-order reduction over splits: deterministic.
        dh = dh32[0] if splits == 1 else dh32.sum(0)
        del dh32
    if need_dw:
        t_ = cfg.dw
        _bwd_dw_kernel[(triton.cdiv(V, t_.block_v),)](
            h, w, b_arg, labs, lse, k, c, lab, dw32, db32,
            n, D_pad, V, h.stride(0), w.stride(0), int(vocab_start), inv_temp,
            HAS_BIAS=has_bias, DOT_PRECISION=prec, UPCAST_DOT=_upcast_dot(h.dtype),
            BLOCK_N=t_.block_n, BLOCK_V=t_.block_v, BLOCK_K=t_.block_k, BLOCK_D=t_.block_d,
            LABEL_STATS=label_stats, num_warps=t_.num_warps, num_stages=t_.num_stages,
        )

    grad_hidden = grad_weight = grad_bias = None
    if dh is not None:
        dh = dh[:, :D]
        if idx is None:
            grad_hidden = dh.to(gh_dtype) if (gh_dtype != torch.float32 or D_pad != D) else dh
        else:
            grad_hidden = torch.zeros((N, D), dtype=gh_dtype, device=dev).index_copy_(0, idx, dh.to(gh_dtype))
        grad_hidden = grad_hidden.contiguous()
    if dw32 is not None:
        if weight.dtype == torch.float32 and D_pad == D:
            grad_weight = dw32
        else:
            grad_weight = dw32[:, :D].to(weight.dtype, memory_format=torch.contiguous_format)
        grad_bias = db32.to(bias.dtype) if has_bias else None
    return grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# every configuration the launchers can pick, for GPU compile checks (sm_80 / sm_90a)
# ----------------------------------------------------------------------------------------------
def _signature(kernel: str, dt: str, bias_dt: str) -> Dict[str, str]:
    f32 = "*fp32"
    common_in = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{bias_dt}", "labels_ptr": "*i64"}
    if kernel == "fwd":
        sig = dict(common_in, m_ptr=f32, s_ptr=f32, so_ptr=f32, t_ptr=f32, xl_ptr=f32,
                   N="i32", D="i32", V="i32", stride_h="i32", stride_w="i32", cols_per_split="i32",
                   label_offset="i64", inv_temp="fp32")
        const = ("HAS_BIAS", "DOT_PRECISION", "UPCAST_DOT", "BLOCK_N", "BLOCK_V", "BLOCK_K")
    else:
        grads = {"lse_ptr": f32, "k_ptr": f32, "c_ptr": f32, "lab_ptr": f32}
        if kernel == "dh":
            outs = {"dh_ptr": f32}
        elif kernel == "dw":
            outs = {"dw_ptr": f32, "db_ptr": f32}
        else:
            outs = {"dh_ptr": f32, "dw_ptr": f32, "db_ptr": f32}
        sig = dict(common_in, **grads, **outs, N="i32", D="i32", V="i32", stride_h="i32", stride_w="i32")
        if kernel == "dh":
            sig["cols_per_split"] = "i32"
        sig.update(label_offset="i64", inv_temp="fp32")
        const = ("HAS_BIAS", "DOT_PRECISION", "UPCAST_DOT", "BLOCK_N", "BLOCK_V", "BLOCK_K", "BLOCK_D", "LABEL_STATS")
    for c in const:
        sig[c] = "constexpr"
    return sig


def _kernel_configs() -> List[tuple]:
    """(kernel fn, signature, constexprs, num_warps, num_stages, description) for every launchable config."""
    kernels = {"fwd": _fwd_partials_kernel, "dh": _bwd_dh_kernel, "dw": _bwd_dw_kernel, "atomic": _bwd_atomic_kernel}
    out = []
    for torch_dt, dt in _TL_DTYPES.items():
        base = default_config(torch_dt)
        precs = ["ieee", "tf32"] if torch_dt == torch.float32 else ["ieee"]
        for prec in precs:
            cfg = replace(base, allow_tf32=(prec == "tf32"))
            for has_bias in (False, True):
                for name, fn in kernels.items():
                    tile = getattr(cfg, name)
                    # Backward kernels: LABEL_STATS=True (the public op, logp given), False (vocab shards).
                    for label_stats in ((None,) if name == "fwd" else (True, False)):
                        const = {"HAS_BIAS": has_bias, "DOT_PRECISION": prec, "UPCAST_DOT": False,
                                 "BLOCK_N": tile.block_n, "BLOCK_V": tile.block_v, "BLOCK_K": tile.block_k}
                        if name != "fwd":
                            const.update(BLOCK_D=tile.block_d, LABEL_STATS=label_stats)
                        desc = (f"{fn.__name__} {dt} bias={has_bias} {prec} BN={tile.block_n} BV={tile.block_v} "
                                f"BK={tile.block_k}"
                                + ("" if name == "fwd" else f" BD={tile.block_d} label_stats={int(label_stats)}")
                                + f" w={tile.num_warps} s={tile.num_stages}")
                        out.append((fn, _signature(name, dt, dt), const, tile.num_warps, tile.num_stages, desc))
    merge_sig = {f"{p}_ptr": "*fp32" for p in ("m", "s", "so", "t", "xl", "o0", "o1", "o2", "o3")}
    merge_sig.update(N="i32", S="i32", FINAL="constexpr", BLOCK="constexpr")
    for final in (True, False):
        out.append((_merge_partials_kernel, dict(merge_sig), {"FINAL": final, "BLOCK": _MERGE_BLOCK}, 4, 1,
                    f"_merge_partials_kernel final={final} BLOCK={_MERGE_BLOCK} w=4"))
    return out


KERNEL_CONFIGS: List[tuple] = _kernel_configs()


# Arguments that every launch keeps divisible by 16 (see _prepare): pointers (16-byte aligned), D and the
# row strides (padded), cols_per_split (a multiple of BLOCK_V). Triton's runtime specializes on exactly
# this, so compiling with these attributes reproduces the code that runs on the GPU.
_ALIGNED_INTS = ("D", "stride_h", "stride_w", "cols_per_split")


def compile_attrs(fn, signature: Dict[str, str]) -> Dict[tuple, list]:
    """ASTSource ``attrs`` for ``fn``: tt.divisibility=16 on the arguments the launchers keep aligned."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        ty = signature.get(name, "")
        if ty.startswith("*") or name in _ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _resource_usage(fn, sig, const, cc, warps, stages, desc):
    from hero_kernels import gpu_compile

    attrs = compile_attrs(fn, sig)
    return gpu_compile.triton_resource_usage(fn, sig, const, cc, warps, stages, config=desc, attrs=attrs)


def compile_resource_report(ccs=(80, 90), configs: Optional[List[tuple]] = None) -> List[dict]:
    """Compile every entry of KERNEL_CONFIGS for each cc (no GPU needed) and return resource rows.

    Must run WITHOUT ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit`` functions cannot be
    compiled); tests call it in a subprocess. Rows: kernel, arch, registers, shared_bytes, local_bytes,
    stack_bytes, config (the description). Register spills show up as stack_bytes > 0 (cuobjdump's
    LOCAL column stays 0 for them), so check both.
    """
    rows = []
    for fn, sig, const, warps, stages, desc in (configs if configs is not None else KERNEL_CONFIGS):
        for cc in ccs:
            rows.append(_resource_usage(fn, sig, const, cc, warps, stages, desc).as_dict())
    return rows


if __name__ == "__main__":  # python -m hero_kernels.backends.triton.linear_entropy_logprob
    import json
    import sys

    for r in compile_resource_report():
        print(json.dumps(r))
    sys.stdout.flush()
