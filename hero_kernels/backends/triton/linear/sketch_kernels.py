"""Triton kernels of the fused gradient sketch through the LM head (``linear_grad_sketch``; launchers and
``plan``: ``sketch_launch.py``; tiles: ``config.LinearSketchConfig``).

With x = (h W^T + b) / tau and p = softmax(x), per row a = (1/tau) (P[:, y] - P p), P [KS, V] the projection.
Shapes: h [n, D], w [V, D] (bf16 / fp16 / fp32, D and row strides multiples of 16: the launchers pad), bias
[V] | None, labels [n] int64 (valid rows), proj [KS, V] in the input dtype (16-bit inputs: rounded by the
launcher, see ``sketch_launch``) with row stride stride_p. The logits tile comes from the fused entropy head's
``_logits_tile`` (same GEMM, same rounding of x = z / tau), so nothing [n, V] ever exists.

``_sketch_fwd_partials_kernel``  grid (row_blocks * S, sketch blocks), split-fastest like the entropy head's
    forward (the S programs of a row block share its hidden rows in L2). Flash-attention structure: per
    vocab tile, the logits tile in fp32 registers, the running max m, so = sum of e^{x - m} over the NON-label
    columns, the label logit xl, and the [BLOCK_N, BLOCK_P] accumulator uo = sum_{j != y} e^{x_j - m} P[:, j]
    (one ``tl.dot`` of e [BLOCK_N, BLOCK_V] with P^T [BLOCK_V, BLOCK_P]), rescaled by e^{m_old - m_new} when
    the max moves. The label column is left out of so / uo so that the merge forms
    a = (P_y so - uo) / (s tau), s = so + e^{x_y - m}: no cancellation of P_y against P p as p_y -> 1.
    Outputs fp32 partials m, so, xl [S, n] and uo [S, n, KS]. KS > BLOCK_P: every sketch block recomputes
    the logits (one block at hero.omnex's k = 128).
``_sketch_merge_kernel``  grid (cdiv(n, BLOCK_R), sketch blocks): merges the S partials in split order and
    writes a [n, KS] fp32 and stats [n, 2] = (M, log s) (the sketch op's saved statistics: log p =
    (x - M) - log s with x - M exact, so no ulp(lse) error at large logit offsets).
``_sketch_bwd_dz_kernel``  grid (row_blocks * vocab_blocks) over one chunk of C rows, row-block-fastest like
    the entropy head's ``_bwd_dz_kernel``: the logits tile recomputed in registers, w = v @ P[:, cols] (a
    ``tl.dot`` over the sketch dimension), dz = -(p / tau^2) (w - c) with c = (P p) . v per row, the label
    column from the forward's accurate a (w_y - c = tau v . a), written once in the input dtype into the
    chunk buffer that cuBLAS multiplies (dh = dz W, dW += dz^T h).
-inf logits (masked vocabulary, padded columns) give e = 0 / p = 0 through the same finite stand-in max as
the entropy head; NaN in a row's inputs reaches so, hence the row's a.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _block, _log1p_unit, _logits_tile, _mma, _split_max


@triton.jit
def _sketch_fwd_partials_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, proj_ptr,
    m_ptr, so_ptr, xl_ptr, u_ptr,
    N, D, V, KS, stride_h, stride_w, stride_p, cols_per_split, splits, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Partials of one (row block, vocab split, sketch block): m, so, xl fp32 [splits, N] (written by sketch
    block 0) and uo fp32 [splits, N, KS]."""
    pid = tl.program_id(0)
    pid_n = pid // splits
    pid_s = pid % splits
    rows, row_mask, rows_c = _block(pid_n, N, BLOCK_N)
    labels = tl.load(labels_ptr + rows_c)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = ps < KS
    # Padded sketch rows read a real (finite) proj row; their uo columns are never stored.
    p_rows = tl.minimum(ps, KS - 1).to(tl.int64)[:, None] * stride_p
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    so = tl.zeros((BLOCK_N,), tl.float32)
    xl = tl.zeros((BLOCK_N,), tl.float32)
    uo = tl.zeros((BLOCK_N, BLOCK_P), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        cols_c = tl.minimum(cols, v_end - 1)
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w, inv_temp,
                         HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
        is_label = (cols[None, :] == labels[:, None]) & col_mask[None, :]
        xl += tl.sum(tl.where(is_label, x, 0.0), axis=1)
        # All -inf so far (masked vocabulary): m_new = -inf, exponents use the finite stand-in 0 (e = 0,
        # alpha = 0), never e^{-inf - (-inf)}.
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_ref)
        e = tl.where(is_label, 0.0, tl.exp(x - m_ref[:, None]))
        so = so * alpha + tl.sum(e, axis=1)
        pt = tl.load(proj_ptr + p_rows + cols_c[None, :])  # [BLOCK_P, BLOCK_V], contiguous along V
        uo = _mma(e.to(pt.dtype), tl.trans(pt), uo * alpha[:, None], DOT_PRECISION, UPCAST_DOT)
        m = m_new

    out = pid_s.to(tl.int64) * N + rows
    first = row_mask & (tl.program_id(1) == 0)
    tl.store(m_ptr + out, m, mask=first)
    tl.store(so_ptr + out, so, mask=first)
    tl.store(xl_ptr + out, xl, mask=first)
    tl.store(u_ptr + out[:, None] * KS + ps[None, :], uo, mask=row_mask[:, None] & p_mask[None, :])


@triton.jit
def _sketch_merge_kernel(
    m_ptr, so_ptr, xl_ptr, u_ptr, labels_ptr, proj_ptr, a_ptr, stats_ptr,
    N, V, KS, S, stride_p, inv_temp,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merge [S, N] (m, so, xl) and [S, N, KS] uo in split order into a [N, KS] fp32 and stats [N, 2] fp32
    = (M, log s) (stats by sketch block 0). a = (P_y so - uo) / (s tau) with s = so + e_y, e_y = e^{x_y - M}.
    Dominant label (e_y >= so, so x_y = M): log s = log1p(so / e_y), accurate as p_y -> 1."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < N
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = mask[:, None] & (ps < KS)[None, :]
    M, M_safe = _split_max(m_ptr, rows, mask, N, S, BLOCK_R)
    so = tl.zeros((BLOCK_R,), tl.float32)
    xl = tl.zeros((BLOCK_R,), tl.float32)
    u = tl.zeros((BLOCK_R, BLOCK_P), tl.float32)
    off = rows.to(tl.int64)
    for _ in range(0, S):
        mk = tl.load(m_ptr + off, mask=mask, other=float("-inf"))
        f = tl.where(mk > float("-inf"), tl.exp(mk - M_safe), 0.0)
        so += f * tl.load(so_ptr + off, mask=mask, other=0.0)
        xl += tl.load(xl_ptr + off, mask=mask, other=0.0)
        u += f[:, None] * tl.load(u_ptr + off[:, None] * KS + ps[None, :], mask=pm, other=0.0)
        off += N
    dy = xl - M_safe
    e_y = tl.exp(dy)  # 0 for a masked (-inf) label
    s = tl.where(mask, so + e_y, 1.0)
    raw = tl.load(labels_ptr + rows, mask=mask, other=0)
    # in-kernel label guard (no host sync): an out-of-range label matched no column, so its row is NaN
    bad = (raw < 0) | (raw >= V)
    labels = tl.minimum(tl.maximum(raw, 0), V - 1)
    p_y = tl.load(proj_ptr + ps[None, :].to(tl.int64) * stride_p + labels[:, None], mask=pm, other=0.0)
    a = (p_y.to(tl.float32) * so[:, None] - u) * (inv_temp / s)[:, None]
    a = tl.where(bad[:, None], float("nan"), a)
    M = tl.where(bad, float("nan"), M)
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * KS + ps[None, :], a, mask=pm)
    dom = e_y >= so
    log_s = tl.where(dom, dy + _log1p_unit(tl.where(dom, so / tl.where(dom, e_y, 1.0), 0.0)), tl.log(s))
    first = mask & (tl.program_id(1) == 0)
    tl.store(stats_ptr + 2 * rows, M, mask=first)
    tl.store(stats_ptr + 2 * rows + 1, log_s, mask=first)


@triton.jit
def _sketch_bwd_dz_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, proj_ptr, stats_ptr, v_ptr, c_ptr, lab_ptr, dz_ptr,
    N, D, V, KS, stride_h, stride_w, stride_p, stride_dz, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dz [N, V] (input dtype, row stride stride_dz) of one chunk of N rows. Per row (fp32 [N]): stats
    (M, log s) [N, 2], c = (P p) . v, lab = -(v . a) / tau (the label column's w_y - c = tau v . a, times
    -p_y / tau^2); v [N, KS] in the input dtype (the dot's operand)."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % row_blocks
    pid_v = pid // row_blocks
    rows, row_mask, rows_c = _block(pid_n, N, BLOCK_N)
    cols, col_mask, cols_c = _block(pid_v, V, BLOCK_V)
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w, inv_temp,
                     HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
    wt = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    ps = tl.arange(0, BLOCK_P)
    for p0 in range(0, KS, BLOCK_P):
        pmask = ps < KS - p0
        v = tl.load(v_ptr + rows_c.to(tl.int64)[:, None] * KS + (p0 + ps)[None, :], mask=pmask[None, :], other=0.0)
        pk = tl.load(proj_ptr + (p0 + ps).to(tl.int64)[:, None] * stride_p + cols_c[None, :], mask=pmask[:, None],
                     other=0.0)
        wt = _mma(v, pk, wt, DOT_PRECISION, UPCAST_DOT)
    m = tl.load(stats_ptr + 2 * rows_c)
    log_s = tl.load(stats_ptr + 2 * rows_c + 1)
    live = row_mask[:, None] & (x > float("-inf"))
    p = tl.where(live, tl.exp((x - m[:, None]) - log_s[:, None]), 0.0)
    labels = tl.load(labels_ptr + rows_c)
    is_label = cols[None, :] == labels[:, None]
    c = tl.load(c_ptr + rows_c)
    lab = tl.load(lab_ptr + rows_c)
    dz = tl.where(is_label, lab[:, None], (c[:, None] - wt) * (inv_temp * inv_temp)) * p
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


#: Whether @triton.jit produced interpreter functions (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = type(_sketch_fwd_partials_kernel).__name__ == "InterpretedFunction"
