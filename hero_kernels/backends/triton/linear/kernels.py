"""Triton kernels of the fused LM head (no launch logic here: see ``launch.py``; tiles: ``config.py``).

Shapes: hidden h [n, D] and weight w [V, D] in bf16 / fp16 / fp32 with last-dim stride 1, row strides and
D multiples of 16 (the launchers pad / copy); bias [V] | None; labels [n] int64 (valid rows only).
Block sizes are constexpr, every shape / stride is a runtime int, offsets are int64.

``_fwd_partials_kernel``  1-D grid of row_blocks * S programs in split-fastest order: program pid owns row
    block pid // S and vocab split pid % S, so the ~132 co-resident programs of a wave are ~132 / S row
    blocks x S splits sweeping their splits in lockstep: a hidden block is shared by S programs and a
    weight tile by 132 / S programs in L2 (see ``launch.plan`` for the traffic). Each logits tile
    [BLOCK_N, BLOCK_V] is ``tl.dot`` over a masked K loop (fp32 accumulate); the online update and the
    label logit are taken from the tile in registers. Five fp32 partials per (split, row): m, s, so (s over
    the NON-label columns), t = sum (x - m) e^{x-m} (shifted), x_label; nothing [N, V].
    Masked vocabulary (-inf logits) may fill whole tiles, even the first ones of a split: the running max
    is then -inf and every exp / shift uses a finite stand-in (one scalar select per row and tile).
    NaN anywhere in a row's inputs reaches so / t, so the row's logp and H are NaN.
``_merge_partials_kernel``  grid (cdiv(n, BLOCK)). Merges the per-split partials in a fixed order and
    writes (logp, H, lse) or, for a vocab shard (``hero_kernels.sharded``), the merged (m, s, t, x_label).
    Dominant label (p_y -> 1): with e_y = e^{x_y - m} >= so, logp = -log1p(so / e_y) and
    log s = (x_y - m) + log1p(so / e_y); H = log s - t / s adds two non-negative terms.
``_bwd_dz_kernel``  1-D grid of row_blocks * vocab_blocks over ONE chunk of C rows (the deterministic
    backward, see ``launch.py``): the logits tile in fp32 registers (ROUND_LOGITS: rounded to the 16-bit input
    dtype, the logits of a chunked forward), dz in fp32 (the label column from the forward's accurate logp),
    written once in the input dtype to a [C, V] buffer that cuBLAS then multiplies (dh = dz @ W, dW += dz^T h).
    Row-block-fastest order: a W tile is shared by the wave.
``_bwd_atomic_kernel``  (option ``deterministic=False``) 1-D grid of row_blocks * vocab_blocks in grouped
    order (GROUP_N row blocks per group): one recompute per tile, dh / dW / db through relaxed fp32
    ``atomic_add`` (order-dependent rounding).
"""
from __future__ import annotations

import triton
import triton.language as tl

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
def _block(pid, n, BLOCK: tl.constexpr):
    """(idx, mask, idx_c) of block ``pid`` of a dimension of size n: indices, in-range mask, indices clamped
    into range (padded lanes repeat a real row / column, see the note above ``_mma``)."""
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < n, tl.minimum(idx, n - 1)


@triton.jit
def _logits_acc(
    h_ptr, w_ptr, b_ptr, rows_c, cols_c, D, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_LOGITS: tl.constexpr = False,
):
    """x = (h[rows_c] @ w[cols_c].T + b[cols_c]) / tau, fp32 [BLOCK_N, BLOCK_V], NO column mask.

    rows_c / cols_c: row / vocab indices already clamped into range (padded lanes repeat a real one).
    ROUND_LOGITS (16-bit inputs, a backward after the chunked forward): z = h w^T + b rounded once to the input
    dtype before the temperature, the logits that forward's lse / H came from (``launch.plan``).
    """
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows_c.to(tl.int64)[:, None] * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols_c.to(tl.int64)[:, None] * stride_w + ks[None, :]
    # 16-bit inputs (tensor cores): the bias starts the accumulator, so no tile of bias registers is live
    # next to it after the K loop (what lets the 128 x 256 forward fit on sm_90a). fp32 FMA dots keep the
    # bias last (accumulating onto it costs them registers). Forward and backward share this function,
    # so both see the same rounding.
    BIAS_FIRST: tl.constexpr = HAS_BIAS and w_ptr.dtype.element_ty != tl.float32
    if BIAS_FIRST:
        acc = tl.broadcast_to(tl.load(b_ptr + cols_c).to(tl.float32)[None, :], (BLOCK_N, BLOCK_V))
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        # D need not be a multiple of BLOCK_K: the tail lanes load 0 and add nothing.
        k_mask = ks[None, :] < D - k0
        h = tl.load(h_ptrs, mask=k_mask, other=0.0)
        w = tl.load(w_ptrs, mask=k_mask, other=0.0)
        acc = _mma(h, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS and not BIAS_FIRST:
        acc += tl.load(b_ptr + cols_c).to(tl.float32)[None, :]
    if ROUND_LOGITS:
        acc = _round_to_input(acc, w_ptr.dtype.element_ty, UPCAST_DOT)
    return acc * inv_temp


@triton.jit
def _round_to_input(x, DT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """x (fp32) rounded to nearest in the 16-bit input dtype DT, as fp32: the logits a chunked forward wrote
    (cuBLAS: fp32 accumulation, bias included, one rounding to the output dtype). The interpreter truncates
    fp32 -> bf16 casts (UPCAST_DOT: set only there, for bf16), so there the round-to-nearest-even is done on
    the bits (+-inf stay +-inf, NaN stays NaN); fp16 casts round to nearest in the interpreter too."""
    if UPCAST_DOT:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(DT).to(tl.float32)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_LOGITS: tl.constexpr = False,
):
    """``_logits_acc``, -inf where ~col_mask (padded vocab columns must contribute nothing, never a 0)."""
    x = _logits_acc(h_ptr, w_ptr, b_ptr, rows_c, cols_c, D, stride_h, stride_w, inv_temp, HAS_BIAS,
                    DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K, ROUND_LOGITS)
    return tl.where(col_mask[None, :], x, float("-inf"))


@triton.jit
def _dlogits_tile(x, cols, col_mask, row_mask, labels, lse_hi, lse_lo, k, c, lab, inv_temp,
                  LABEL_STATS: tl.constexpr):
    """dz = (1/tau)[g (1[j=y] - p) - k p (log p + H)] in fp32; 0 on padded columns and padded rows.

    Per row: k, c = g + k H and lab. Off the label, dz = -(1/tau) p (k log p + c): two tile ops fewer
    than the textbook form (registers). The label column: with LABEL_STATS it is replaced by
    lab = g (1 - p_y) - k p_y (log p_y + H), formed by the launcher from the forward's accurate logp; from
    the tile, 1 - e^{x_y - lse} and x_y - lse are rounding noise when p_y -> 1 (an O(eps |lse|) error
    against values ~ 1 - p_y: the Liger #1329 class, in the low-entropy rows HERO up-weights). Without
    (vocab shards), lab = g is added to the tile's value: the plain form.
    -inf logits (masked vocabulary, and the padded columns, which _logits_tile sets to -inf) have p = 0
    and log p is replaced by 0 there, so no 0 * inf = NaN; a masked LABEL column still gets g (1 - 0).
    lse = hi + lo (``_row_stats``): log p = (x - hi) - lo has no ulp(lse) error at large logit offsets.
    """
    live = row_mask[:, None] & (x > float("-inf"))
    logq = tl.where(live, (x - lse_hi[:, None]) - lse_lo[:, None], 0.0)
    p = tl.where(live, tl.exp(logq), 0.0)
    dz = -p * (k[:, None] * logq + c[:, None])
    is_label = (cols[None, :] == labels[:, None]) & col_mask[None, :] & row_mask[:, None]
    if LABEL_STATS:
        dz = tl.where(is_label, lab[:, None], dz)
    else:
        dz = tl.where(is_label, dz + lab[:, None], dz)
    return dz * inv_temp


_LOG2E = tl.constexpr(1.4426950408889634)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _online_update(x, m, s, so, t, xl, lab_local, n_valid, GENERAL: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fold one logits tile x [BLOCK_N, BLOCK_V] into the running (m, s, so, t, xl) of its rows.

    GENERAL=False is the common tile: all BLOCK_V columns are real and no row's label is among them, so
    the per-element work is the max, x - m, one exp2 and the s and t sums (so gets the same tile sum as
    s). GENERAL=True first masks the padded columns (n_valid real ones) and takes the label column out
    of the tile (lab_local: its column in this tile, -1 if elsewhere; an int32 per row against the
    tile's column index, no 64-bit compare, no per-column registers): its logit goes to xl and the tile
    keeps -inf there, so the sums over the tile are so's, and the label's own term e_y = e^{x_y - m}
    (and its t term) is added to s and t per row.
    """
    if GENERAL:
        idx = tl.arange(0, BLOCK_V)[None, :]
        x = tl.where(idx < n_valid, x, float("-inf"))
        is_label = idx == lab_local[:, None]
        xl_t = tl.sum(tl.where(is_label, x, 0.0), axis=1)
        x = tl.where(is_label, float("-inf"), x)
        has = lab_local >= 0
        xl += xl_t
        tile_max = tl.maximum(tl.max(x, axis=1), tl.where(has, xl_t, float("-inf")))
    else:
        tile_max = tl.max(x, axis=1)
    # A tile (or every tile so far) may be all -inf (masked vocabulary): then m_new = -inf, and the
    # exponents use the finite stand-in m_ref = 0 (e = 0, alpha = 0 or 1), never e^{-inf - (-inf)}.
    m_new = tl.maximum(m, tile_max)
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2((m - m_ref) * _LOG2E)
    # Rebasing the shifted t from m to m_new adds (m - m_new) s (<= 0); s = 0 before the first tile.
    shift = tl.where(m > float("-inf"), m - m_ref, 0.0) * s
    xs = x - m_ref[:, None]
    e = tl.exp2(xs * _LOG2E)
    # xs is -inf where e = 0 (-inf logits, padded columns, the label's slot): clamped to a finite value
    # for the product, so no (-inf) * 0 = NaN. A NaN logit gives e = NaN, which still poisons s, so, t.
    t_tile = tl.sum(tl.maximum(xs, -_FLT_MAX) * e, axis=1)
    so_tile = tl.sum(e, axis=1)
    s_tile = so_tile
    if GENERAL:
        d = xl_t - m_ref
        e_y = tl.where(has, tl.exp2(d * _LOG2E), 0.0)
        s_tile += e_y
        t_tile += tl.maximum(d, -_FLT_MAX) * e_y
    t = (t + shift) * alpha + t_tile
    s = s * alpha + s_tile
    so = so * alpha + so_tile
    return m_new, s, so, t, xl


@triton.jit
def _fwd_partials_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr,
    m_ptr, s_ptr, so_ptr, t_ptr, xl_ptr,
    N, D, V, stride_h, stride_w, cols_per_split, splits, label_offset, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partials of one (row block, vocab split). Outputs m, s, so, t, xl: fp32 [splits, N] (row stride N).

    m = max x, s = sum e^{x-m}, so = the same sum over the NON-label columns, t = sum (x - m) e^{x-m}
    (shifted: every term <= 0, so H = log s - t / s has no cancellation against |lse| when p_y -> 1);
    xl = x[label] when the label falls in this split, else 0 (so partials of disjoint splits merge by a
    plain sum).
    Registers: a tile takes the lean epilogue (``_online_update`` GENERAL=False) unless it is the split's
    partial last tile or holds some row's label; the test is per row, then one max over the block.
    """
    # Split-fastest order: the S programs of one row block run side by side and share its hidden rows.
    pid = tl.program_id(0)
    pid_n = pid // splits
    pid_s = pid % splits
    rows, row_mask, rows_c = _block(pid_n, N, BLOCK_N)
    labels = tl.load(labels_ptr + rows_c) - label_offset
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    so = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    xl = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        x = _logits_acc(h_ptr, w_ptr, b_ptr, rows_c, tl.minimum(v0 + tl.arange(0, BLOCK_V), v_end - 1), D,
                        stride_h, stride_w, inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V,
                        BLOCK_K)
        n_valid = v_end - v0
        # Only real columns: for a vocab shard a label of the NEXT shard can equal a padded column.
        hit = (labels >= v0) & (labels < v0 + tl.minimum(n_valid, BLOCK_V))
        lab_local = tl.where(hit, labels - v0, -1).to(tl.int32)
        # The select pass runs only on a split's partial last tile or a tile holding some row's label.
        if (n_valid < BLOCK_V) | (tl.max(lab_local, axis=0) >= 0):
            m, s, so, t, xl = _online_update(x, m, s, so, t, xl, lab_local, n_valid, True, BLOCK_V)
        else:
            m, s, so, t, xl = _online_update(x, m, s, so, t, xl, lab_local, n_valid, False, BLOCK_V)

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
def _split_max(m_ptr, rows, mask, N, S, BLOCK: tl.constexpr):
    """(M, M_safe) [BLOCK]: the max of the rows' S split partials m [S, N] and a finite stand-in, 0 where every
    split is empty (-inf; such rows keep zero sums, never exp(-inf - (-inf)))."""
    M = tl.full((BLOCK,), float("-inf"), tl.float32)
    off = rows.to(tl.int64)
    for _ in range(0, S):
        M = tl.maximum(M, tl.load(m_ptr + off, mask=mask, other=float("-inf")))
        off += N
    return M, tl.where(M > float("-inf"), M, 0.0)


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
    M, M_safe = _split_max(m_ptr, rows, mask, N, S, BLOCK)
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
        # lse in fp64 (o2 is fp64 when FINAL): the backward splits it into fp32 hi + lo (_row_stats)
        tl.store(o2_ptr + rows, M.to(tl.float64) + log_s.to(tl.float64), mask=mask)
    else:
        tl.store(o0_ptr + rows, M, mask=mask)
        tl.store(o1_ptr + rows, s, mask=mask)
        tl.store(o2_ptr + rows, t + M_safe * s, mask=mask)
        tl.store(o3_ptr + rows, xl, mask=mask)


@triton.jit
def _row_stats(labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, rows_c, label_offset):
    """Per-row labels (shard-local), lse as fp32 hi + lo (from the fp64 lse), k, c = g + k H and the
    label-column value (see _dlogits_tile) of the clamped rows."""
    labels = tl.load(labels_ptr + rows_c) - label_offset
    lse = tl.load(lse_ptr + rows_c).to(tl.float64)
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    return labels, lse_hi, lse_lo, tl.load(k_ptr + rows_c), tl.load(c_ptr + rows_c), tl.load(lab_ptr + rows_c)


@triton.jit
def _dz_tile(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, pid_n, pid_v, N, D, V, stride_h, stride_w,
    label_offset, inv_temp, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, LABEL_STATS: tl.constexpr,
    ROUND_LOGITS: tl.constexpr,
):
    """(rows, row_mask, rows_c, cols, col_mask, cols_c, dz fp32 [BLOCK_N, BLOCK_V]) of tile (pid_n, pid_v):
    the logits recomputed in registers (rounded to the input dtype with ROUND_LOGITS), then ``_dlogits_tile``."""
    rows, row_mask, rows_c = _block(pid_n, N, BLOCK_N)
    cols, col_mask, cols_c = _block(pid_v, V, BLOCK_V)
    labels, lse_hi, lse_lo, k, c, lab = _row_stats(labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, rows_c,
                                                   label_offset)
    x = _logits_tile(h_ptr, w_ptr, b_ptr, rows_c, cols_c, col_mask, D, stride_h, stride_w,
                     inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K, ROUND_LOGITS)
    dz = _dlogits_tile(x, cols, col_mask, row_mask, labels, lse_hi, lse_lo, k, c, lab, inv_temp, LABEL_STATS)
    return rows, row_mask, rows_c, cols, col_mask, cols_c, dz


@triton.jit
def _bwd_dz_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, dz_ptr,
    N, D, V, stride_h, stride_w, stride_dz, label_offset, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, LABEL_STATS: tl.constexpr,
    ROUND_LOGITS: tl.constexpr,
):
    """dz [N, V] (input dtype, row stride stride_dz) of one chunk of N rows: the logits GEMM with the dz
    epilogue, so the logits exist only as registers (fp32, or rounded to the input dtype with ROUND_LOGITS:
    after a chunked 16-bit forward) and dz is written once, rounded once.

    Row-block-fastest order: the programs of a wave share one W tile (read once from HBM) and the chunk's
    hidden rows (N x D, ~12 MB at C = 1536, D = 4096) stay in L2.
    """
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % row_blocks
    pid_v = pid // row_blocks
    rows, row_mask, rows_c, cols, col_mask, cols_c, dz = _dz_tile(
        h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, pid_n, pid_v, N, D, V, stride_h,
        stride_w, label_offset, inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K,
        LABEL_STATS, ROUND_LOGITS)
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _bwd_atomic_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, dh_ptr, dw_ptr, db_ptr,
    N, D, V, stride_h, stride_w, label_offset, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    LABEL_STATS: tl.constexpr, GROUP_N: tl.constexpr, ROUND_LOGITS: tl.constexpr,
):
    """One (row block, vocab block) tile: dh, dW, db via fp32 atomic_add (NOT deterministic).

    dh: fp32 [N, D], dw: fp32 [V, D], db: fp32 [V]; all zero-filled and contiguous. Grouped order: a wave
    covers GROUP_N row blocks x (wave / GROUP_N) vocab blocks, so the accumulator tiles being added to
    are few enough to stay in L2. Relaxed atomics: no ordering is needed between the adds, only atomicity
    (acq_rel would add a fence and an L1 invalidate per atomic).
    """
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    vocab_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * vocab_blocks
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(row_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    rows, row_mask, rows_c, cols, col_mask, cols_c, dz = _dz_tile(
        h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, k_ptr, c_ptr, lab_ptr, pid_n, pid_v, N, D, V, stride_h,
        stride_w, label_offset, inv_temp, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_K,
        LABEL_STATS, ROUND_LOGITS)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
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
        tl.atomic_add(dh_ptrs, _mma(dz_c, w, zero, DOT_PRECISION, UPCAST_DOT), mask=row_mask[:, None] & d_mask,
                      sem="relaxed")
        tl.atomic_add(dw_ptrs, _mma(dz_t, h, zero_t, DOT_PRECISION, UPCAST_DOT), mask=col_mask[:, None] & d_mask,
                      sem="relaxed")
        w_ptrs += BLOCK_D
        h_ptrs += BLOCK_D
        dh_ptrs += BLOCK_D
        dw_ptrs += BLOCK_D


#: Whether @triton.jit produced interpreter functions (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = type(_fwd_partials_kernel).__name__ == "InterpretedFunction"
