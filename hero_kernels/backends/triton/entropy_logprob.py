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
math in fp32. The forward saves lse in fp64 and the backward splits it into fp32 ``hi + lo`` once per row:
``log p = (x - hi) - lo`` keeps the digits an fp32 lse loses at large logit offsets (ulp(lse)).
The target column's ``1 - p_y`` is NOT formed as ``1 - exp(x_y - lse)``: the pass sums
``q = sum_{j != y} p_j`` and rewrites column ``y`` after the loop with ``1 - p_y = q / (q + p_y)``, so
``g (1 - p_y)`` keeps its relative precision when ``p_y -> 1`` (the bf16 cancellation of Liger #1329, and
the ulp(lse) loss of fp32). Every element is loaded and stored by the same thread in the same iteration
and ``x_y`` is read (behind a barrier) before the loop, so ``out`` may alias ``logits`` (in-place backward).

Launchers (``forward``, ``backward``) never touch autograd; the public op lives in
``hero_kernels/entropy_logprob.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hero_kernels.backends import RowStats, UpstreamGrads
from hero_kernels.backends.plan import KernelLaunch, ctas_per_sm, sass_per_element
from hero_kernels.backends.triton.linear.kernels import _log1p_unit
from hero_kernels.dispatch import check_capability
from hero_kernels.options import RowOptions

__all__ = ["LaunchConfig", "launch_config", "LAUNCH_CONFIGS", "KERNEL_CONFIGS", "compile_attrs", "plan", "forward",
           "backward"]

_LOG2E = tl.constexpr(1.4426950408889634)
_NEG_LOG2E = tl.constexpr(-1.4426950408889634)
# Lane max before any element: finite (with -inf the first update would give inf - inf = NaN) and far
# below any real logit, yet small enough that |x - _M_INIT| * log2(e) cannot overflow fp32 (the
# interpreter's "overflow encountered in multiply" warning came from -FLT_MAX here). Logits below
# -1e30 count as masked.
_M_INIT = tl.constexpr(-1e30)
# |x - m| beyond this gives e^{-|x-m|} == 0 in fp32; clamping keeps (x - m) * 0 finite for x = -inf.
_D_CLAMP = tl.constexpr(128.0)
# log p below this has p == 0 in fp32: clamping keeps 0 * log p at 0 for -inf logits and padded lanes.
_LOGP_CLAMP = tl.constexpr(-256.0)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scale(z, inv_t, ROUND_X: tl.constexpr):
    """x = z * inv_t rounded on its own, in the forward and the backward alike: an FMA contraction with
    the next subtraction (x - m, x - lse) would use the unrounded product, while lse was built from the
    rounded one (a one-hot row at |x| ~ 3e4 then gets p_argmax = exp(residue) = 1.0046). ``mul.rn``
    is never contracted by ptxas. ROUND_X is off only in the interpreter (numpy rounds every product)."""
    if ROUND_X:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [z, inv_t + tl.zeros_like(z)], dtype=tl.float32, is_pure=True,
            pack=1,
        )
    else:
        return z * inv_t


@triton.jit
def _log1p(r):
    """log(1 + r) for r > -1 to fp32 relative accuracy (log(1 + r) loses every digit of a tiny r): the fused
    head's atanh series for |r| <= 1 (|w| = |r / (2 + r)| <= 1/3 down to r = -1/2, where the callers stop),
    log(1 + r) above, where it is accurate."""
    return tl.where(tl.abs(r) <= 1.0, _log1p_unit(r), tl.log(1.0 + r))


@triton.jit
def _row_setup(labels_ptr, T, stride_b, stride_row, V, ignore_index):
    """(row, base offset, label, valid, ok) of this program. Grid (T, B): row = b * T + t of the flat
    [B*T] labels; the logits row sits at b * stride_b + t * stride_row ([N, V]: B = 1, stride_b unused).
    valid: not ignore_index. ok: valid with a label in [0, V); valid & ~ok rows are written as NaN and
    their label column is never read (the in-kernel guard that lets the default path skip a host sync)."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = b * T + t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    ok = valid & (label >= 0) & (label < V)
    return row, b * stride_b + t * stride_row, label, valid, ok


@triton.jit
def _online_update(x, m, r, t):
    """One tile into the per-lane state (m, r, t): one exp per element, no cross-thread work.

    With d = x - m and e = e^{-|d|}: a new lane max (d > 0) rescales the old state by f = e and makes x
    the argmax, r' = (r + 1) e, t' = (t - d s) e = t e - d r'; otherwise f = 1, r' = r + e, t' = t + d e.
    Both as r' = r f + e and t' = d h + t f (h = -r' or e): two FMAs, a multiply and two selects.
    Padded columns / -inf logits give d = -inf and e = 0: the clamp keeps d * e finite (d > 0 is never
    clamped). A NaN x poisons r and t (and never becomes the max)."""
    d = x - m
    up = d > 0
    e = tl.exp2(tl.abs(d) * _NEG_LOG2E)  # e^{-|d|}: the only transcendental per element
    f = tl.where(up, e, 1.0)
    r_new = r * f + e
    h = tl.where(up, -r_new, e)
    t_new = tl.maximum(d, -_D_CLAMP) * h + t * f
    return tl.maximum(m, x), r_new, t_new


@triton.jit
def _grad_tile(x, cols, label, lse_hi, lse_lo, c_t, k_t, q):
    """dz of one tile (off-label form; column y is rewritten after the loop) and q += sum_{j != y} p_j.
    log q = (x - hi) - lo with lse = hi + lo: x - hi is exact near the row max, so no ulp(lse) error."""
    logq = (x - lse_hi) - lse_lo
    p = tl.exp2(logq * _LOG2E)
    q += tl.where(cols != label, p, 0.0)  # label: int32 (one compare per element, not two)
    # p == 0 with logq == -inf (a -inf logit or a padded lane) must give 0, not 0 * -inf.
    return -p * (c_t + k_t * tl.maximum(logq, _LOGP_CLAMP)), q


@triton.jit(do_not_specialize=["inv_temp", "ignore_index"])
def _entropy_logprob_fwd_kernel(
    logits_ptr,  # [B, T, V] or [N, V] bf16/fp16/fp32, last-dim stride 1
    labels_ptr,  # [B*T] int64 (contiguous)
    logp_ptr,  # [B*T] fp32 out
    ent_ptr,  # [B*T] fp32 out
    lse_ptr,  # [B*T] fp64 out (m + log s unrounded: the backward splits it into fp32 hi + lo)
    V,
    T,
    stride_b,
    stride_row,
    inv_temp,  # fp32 runtime scalar: one compiled kernel for every temperature
    ignore_index,
    BLOCK_V: tl.constexpr,
    ROUND_X: tl.constexpr,
):
    row, off, label, valid, ok = _row_setup(labels_ptr, T, stride_b, stride_row, V, ignore_index)
    base = logits_ptr + off
    inv_t = tl.cast(inv_temp, tl.float32)  # explicit: a Python float must never make the loop state fp64

    cols0 = tl.arange(0, BLOCK_V)
    # Per lane: m = max x, r = s - 1 = sum of e^{x-m} over the lane's columns but ONE argmax (so a
    # dominant logit's tiny remaining mass is not rounded away against 1), t = sum (x-m) e^{x-m}.
    m = tl.full([BLOCK_V], _M_INIT, tl.float32)
    r = tl.full([BLOCK_V], -1.0, tl.float32)  # s = 0
    t = tl.zeros([BLOCK_V], tl.float32)
    # Masked rows and bad labels skip the loops entirely (zero trip count). Full tiles load unmasked (no
    # predicate, no fill registers in the hot loop); the last partial tile, if any, is one masked trip.
    v_end = tl.where(ok, V, 0)
    v_full = v_end - v_end % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        x = _scale(tl.load(base + start + cols0).to(tl.float32), inv_t, ROUND_X)
        m, r, t = _online_update(x, m, r, t)
    for start in range(v_full, v_end, BLOCK_V):
        cols = start + cols0
        x = _scale(tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32), inv_t, ROUND_X)
        m, r, t = _online_update(x, m, r, t)

    # Merge the lanes once per row. The row's designated argmax is the first lane holding the row max:
    # its r is kept as is, every other lane adds its whole mass alpha * (r + 1).
    m_row = tl.max(m, axis=0)
    alpha = tl.exp2((m - m_row) * _LOG2E)
    first = tl.min(tl.where(m == m_row, cols0, BLOCK_V), axis=0)
    r_row = tl.sum(tl.where(cols0 == first, r, alpha * (r + 1.0)), axis=0)
    # Lanes far below the row max have alpha == 0 while (m - m_row) * s may be -inf: drop them.
    t_row = tl.sum(tl.where(alpha > 0, alpha * (t + (m - m_row) * (r + 1.0)), 0.0), axis=0)
    # No distribution (every column -inf, a +inf, or NaN in the row; a masked row or bad label): NaN logp,
    # H and lse. Such rows compute on r = 0 (finite) and are overwritten below.
    defined = ok & (m_row > _M_INIT) & (m_row < float("inf"))
    r_row = tl.where(defined, r_row, 0.0)
    log_s = _log1p(r_row)
    # The label logit: one scalar load, rounded exactly like the loop rounds it (x_y - m_row is exactly 0
    # when y is the argmax, so logp = -log1p(r) keeps its relative accuracy as p_y -> 1).
    x_y = _scale(tl.load(base + label, mask=ok, other=0.0).to(tl.float32), inv_t, ROUND_X)
    nan = float("nan")
    logp = tl.where(defined, (x_y - m_row) - log_s, nan)
    h = log_s - t_row / (1.0 + r_row)
    ent = tl.where(defined, tl.where(h < 0.0, 0.0, h), nan)  # rounding below 0 clamped, NaN kept
    lse = tl.where(defined, m_row.to(tl.float64) + log_s.to(tl.float64), nan)
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))


@triton.jit(do_not_specialize=["inv_temp", "ignore_index"])
def _entropy_logprob_bwd_kernel(
    logits_ptr,  # [B, T, V] or [N, V] in, last-dim stride 1
    out_ptr,  # same shape (may be logits_ptr itself), last-dim stride 1
    labels_ptr,  # [B*T] int64 (contiguous)
    lse_ptr,  # [B*T] fp64 (saved by the forward)
    ent_ptr,  # [B*T] fp32 (saved by the forward)
    g_ptr,  # [B*T] fp32 dL/dlogp, any stride (0 for an expanded scalar)
    k_ptr,  # [B*T] fp32 dL/dH, any stride
    V,
    T,
    stride_b,
    stride_row,
    stride_ob,
    stride_out,
    stride_g,
    stride_k,
    inv_temp,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ROUND_X: tl.constexpr,
):
    row, off, label, valid, ok = _row_setup(labels_ptr, T, stride_b, stride_row, V, ignore_index)
    base = logits_ptr + off
    obase = out_ptr + tl.program_id(1).to(tl.int64) * stride_ob + tl.program_id(0).to(tl.int64) * stride_out
    inv_t = tl.cast(inv_temp, tl.float32)
    # Masked rows: g = k = 0 and no logits read, so every element written below is 0. A bad label: lse =
    # NaN makes the whole row NaN at no cost in the loop.
    g = tl.where(valid, tl.load(g_ptr + row * stride_g, mask=valid, other=0.0).to(tl.float32), 0.0)
    k = tl.where(valid, tl.load(k_ptr + row * stride_k, mask=valid, other=0.0).to(tl.float32), 0.0)
    lse = tl.where(ok, tl.load(lse_ptr + row).to(tl.float64), tl.where(valid, float("nan"), 0.0))
    # lse = hi + lo in fp32 (scalar work per row): log q = (x - hi) - lo has no ulp(lse) error (x - lse with an
    # fp32 lse is off by up to ulp(lse)/2 = 1.2e-4 at |x| ~ 3e3, a relative error on every p_j).
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    ent = tl.where(valid, tl.load(ent_ptr + row), 0.0)
    k_t = k * inv_t
    # Off the label: dz = -(1/tau) p (g + k (log p + H)) = -p (c_t + k_t log p), one FMA and a multiply.
    c_t = (g + k * ent) * inv_t

    # The label logit, read before the loop: in place, the loop overwrites column y. The barrier makes
    # every thread's read happen before any thread's store.
    x_y = _scale(tl.load(base + label, mask=ok, other=0.0).to(tl.float32), inv_t, ROUND_X)
    tl.debug_barrier()

    cols0 = tl.arange(0, BLOCK_V)
    # q = sum_{j != y} p_j (= 1 - p_y up to the lse rounding), so the target gradient g (1 - p_y) keeps its
    # relative precision when p_y -> 1 (1 - exp(x_y - lse) would lose it to cancellation and to ulp(lse)).
    q = tl.zeros([BLOCK_V], tl.float32)
    label32 = tl.where(ok, label, -1).to(tl.int32)  # in [0, V) or -1: exact in int32
    if valid:
        # Full tiles unmasked, then at most one masked trip. Full tiles store whole vectors (a mask
        # excluding column y would split them into scalar stores): at j == y dz lacks the g term and is
        # rewritten below. The same thread loads and stores an element, so out may alias logits.
        v_full = V - V % BLOCK_V
        for start in range(0, v_full, BLOCK_V):
            cols = start + cols0
            x = _scale(tl.load(base + cols).to(tl.float32), inv_t, ROUND_X)
            dz, q = _grad_tile(x, cols, label32, lse_hi, lse_lo, c_t, k_t, q)
            tl.store(obase + cols, dz.to(out_ptr.dtype.element_ty))
        for start in range(v_full, V, BLOCK_V):
            cols = start + cols0
            cmask = cols < V
            # other=-inf: padded columns get p = 0 and add nothing to q.
            x = _scale(tl.load(base + cols, mask=cmask, other=float("-inf")).to(tl.float32), inv_t, ROUND_X)
            dz, q = _grad_tile(x, cols, label32, lse_hi, lse_lo, c_t, k_t, q)
            tl.store(obase + cols, dz.to(out_ptr.dtype.element_ty), mask=cmask)
    else:
        # Masked rows: zeros, without reading the logits (whatever they hold, NaN included).
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            tl.store(obase + cols, tl.zeros([BLOCK_V], out_ptr.dtype.element_ty), mask=cols < V)

    q_row = tl.sum(q, axis=0)
    logq_y = (x_y - lse_hi) - lse_lo
    p_y = tl.exp2(logq_y * _LOG2E)
    # 1 - p_y = q / (q + p_y): the ratio cancels the common factor e^{-err(lse)} that the fp32 rounding
    # of lse puts on every p_j (|lse| ~ 1e4 has ulp ~ 1e-3), so it is accurate for any p_y. When p_y > 1/2
    # log p_y = log1p(-(1 - p_y)) likewise (x_y - lse carries ulp(lse)).
    one_minus_p_y = q_row / (q_row + p_y)
    dom = p_y > 0.5
    logp_y = tl.where(dom, _log1p(-tl.where(dom, one_minus_p_y, 0.0)), logq_y)
    p_y = tl.where(dom, 1.0 - one_minus_p_y, p_y)
    # A -inf label logit (p_y = 0, log p_y = -inf) adds nothing to the entropy term: finite gradients.
    ent_y = p_y * (tl.maximum(logp_y, _LOGP_CLAMP) + ent)
    dz_y = g * inv_t * one_minus_p_y - k_t * ent_y
    # Order the loop's store of column y (any thread) before this one.
    tl.debug_barrier()
    tl.store(obase + label, dz_y.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# launch plan (the single source of the grid, tile and warps; benchmarks/roofline.py reads the same)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Tile of one loop iteration and the warps of one row program.

    block_v: vocabulary columns per iteration (constexpr); num_warps / num_stages: Triton launch options.
    block_v / (32 * num_warps) is the elements each thread holds per iteration (16 for LM vocabularies:
    two 16-byte bf16 vectors per thread and iteration, both loads issued before the math; 3 fp32 state
    registers each in the forward). The lanes (the online state) are the block_v columns whatever the warps,
    so the warps change no result.
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
    LaunchConfig(2048, 4),
)


def launch_config(V: int) -> LaunchConfig:
    """Tile for a row of V columns: the smallest tile covering short rows (little padding waste), then
    2048 columns x 4 warps. For LM vocabularies (32k-262k) that is 16 elements (two 16-byte bf16 loads,
    issued back to back) per thread and iteration. bf16 on sm_90a (compile report, triton 3.8): the forward
    80 registers, 6 CTAs of 4 warps per SM, 24 KB of loads in flight per SM (by Little's law ~23 KB keep an
    H200 at 0.9 of 4.8 TB/s through ~700 ns of loaded latency: ``plan.GpuSpec.dram_latency_s``), 14.25 SASS
    per element; the backward 71 registers, 7 CTAs, 28 KB, 14.5. The 8-warp tile (8 elements per thread)
    took 47 registers and 5 CTAs: 20 KB in flight, 14.75 SASS per element. Rejected (sm_90a builds): a
    register cap on it (maxnreg 40 for 6 CTAs spills 16 bytes of stack), a software prefetch of the next
    tile (56 registers, 4 CTAs, ~19 SASS per element), and 4096 columns (68 registers, 3 CTAs of 8 warps,
    and other lanes, so other roundings)."""
    if V <= 256:
        return LAUNCH_CONFIGS[0]
    if V <= 1024:
        return LAUNCH_CONFIGS[1]
    return LAUNCH_CONFIGS[2]


#: forward / backward take a [B, T, V] view of any batch stride in ONE launch (grid (T, B)); the public op
#: then passes such views whole instead of walking the batch.
BATCHED = True

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _TRITON_DTYPE:
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        return _TRITON_DTYPE[dtype]
    name = _DTYPE_NAMES.get(str(dtype).replace("torch.", ""))
    if name is None:
        raise TypeError(f"dtype must be bfloat16, float16 or float32 (or 'bf16'/'fp16'/'fp32'), got {dtype!r}")
    return name


def _grid(N: int, batch: Optional[int]) -> Tuple[int, int]:
    """(rows per batch, batches): one 2-D launch for [B, T, V] (any batch stride), (N, 1) for [N, V]."""
    if batch is None or batch <= 1:
        return (N, 1)
    if N % batch:
        raise ValueError(f"N = {N} must be a multiple of batch = {batch}")
    return (N // batch, batch)


def plan(N: int, V: int, dtype, *, pass_: str = "fwd", inplace_backward: bool = False,
         batch: Optional[int] = None) -> List[KernelLaunch]:
    """The launches of ``entropy_logprob`` on N rows of V columns (``batch`` = B for a [B, T, V] view,
    N = B * T), in order. pass_: "fwd" (forward kernel), "bwd" (backward kernel) or "fwd+bwd".

    HBM bytes: the forward reads each logit once (+ labels, 2 fp32 outputs and the fp64 lse per row); the backward reads
    each logit once and writes each dlogit once in the logits dtype (the same bytes in place, where the
    write lands in the caller's buffer), + labels, 3 fp32 row vectors and the fp64 lse. Nothing is assumed L2-resident:
    a row (<= 0.6 MB) is streamed once per kernel. The launchers call this and launch exactly it.
    meta["sass_per_elt"]: the measured hot-loop SASS instructions per element of the build that runs (aligned
    when V % 16 == 0, as Triton specializes it; ``hero_kernels.backends.sass_counts``), for the roofline's
    instruction-issue term over meta["elements"] = N * V. meta["bytes_in_flight_per_sm"]: the tile one program
    loads per iteration (BLOCK_V x elt) x the build's resident CTAs per SM (``plan.ctas_per_sm``, from its
    measured registers), and meta["load_bytes"] the bytes it loads (the outputs, and the backward's dlogits, are
    stores): the roofline's latency term.
    """
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_!r}")
    dt = _dtype_name(dtype)
    e = _ELEM_BYTES[dt]
    cfg = launch_config(V)
    grid = _grid(N, batch)
    build = f"{dt},{cfg.name}]:{'aligned' if V % 16 == 0 else 'unaligned'}"

    def meta(kernel: str) -> dict:
        key = f"triton:entropy_logprob_{kernel}[{build}"
        ctas = ctas_per_sm(key)
        return {"BLOCK_V": cfg.block_v, "elements": N * V, "sass_per_elt": sass_per_element(key), "sass_build": key,
                "ctas_per_sm": ctas, "bytes_in_flight_per_sm": cfg.block_v * e * ctas if ctas else None}

    note = "stream: every logit crosses HBM once per kernel (rows are not reused; no L2 residency assumed)"
    out = []
    if pass_ in ("fwd", "fwd+bwd"):
        out.append(KernelLaunch("_entropy_logprob_fwd_kernel", grid, "stream", 0.0, float(N) * (V * e + 8 + 16),
                                note, cfg.num_warps, cfg.num_stages, dict(meta("fwd"), load_bytes=float(N) * (V * e + 8))))
    if pass_ in ("bwd", "fwd+bwd"):
        out.append(KernelLaunch("_entropy_logprob_bwd_kernel", grid, "stream", 0.0, float(N) * (2 * V * e + 8 + 20),
                                note + ("; dlogits written over the logits (in place)" if inplace_backward else ""),
                                cfg.num_warps, cfg.num_stages, dict(meta("bwd"), INPLACE=int(bool(inplace_backward)),
                                                                    load_bytes=float(N) * (V * e + 28))))
    return out


def _fwd_signature(dt: str) -> Dict[str, str]:
    return {
        "logits_ptr": f"*{dt}", "labels_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
        "lse_ptr": "*fp64", "V": "i32", "T": "i32", "stride_b": "i64", "stride_row": "i32", "inv_temp": "fp32",
        "ignore_index": "i32", "BLOCK_V": "constexpr", "ROUND_X": "constexpr",
    }


def _bwd_signature(dt: str) -> Dict[str, str]:
    return {
        "logits_ptr": f"*{dt}", "out_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": "*fp64",
        "ent_ptr": "*fp32", "g_ptr": "*fp32", "k_ptr": "*fp32", "V": "i32", "T": "i32", "stride_b": "i64",
        "stride_row": "i32", "stride_ob": "i64", "stride_out": "i32", "stride_g": "i32", "stride_k": "i32",
        "inv_temp": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr", "ROUND_X": "constexpr",
    }


def _kernel_configs() -> List[tuple]:
    """(kernel fn, signature, constexprs, num_warps, num_stages, description) for the compile check."""
    rows = []
    for cfg in LAUNCH_CONFIGS:
        for dt in ("bf16", "fp16", "fp32"):
            const = {"BLOCK_V": cfg.block_v, "ROUND_X": True}
            rows.append((_entropy_logprob_fwd_kernel, _fwd_signature(dt), const, cfg.num_warps, cfg.num_stages,
                         f"entropy_logprob_fwd[{dt},{cfg.name}]"))
            rows.append((_entropy_logprob_bwd_kernel, _bwd_signature(dt), const, cfg.num_warps, cfg.num_stages,
                         f"entropy_logprob_bwd[{dt},{cfg.name}]"))
    return rows


#: Every (kernel, dtype, launch config) the launchers can run; consumed by the GPU compile check/report.
KERNEL_CONFIGS: List[tuple] = _kernel_configs()

#: Arguments Triton specializes as 16-divisible at run time for an LM vocabulary (V % 16 == 0, every
#: tensor from the caching allocator): the aligned build the compile report should show.
_ALIGNED_ARGS = ("logits_ptr", "out_ptr", "labels_ptr", "logp_ptr", "ent_ptr", "lse_ptr", "g_ptr", "k_ptr", "V",
                 "stride_b", "stride_row", "stride_ob", "stride_out")


def compile_attrs(fn, signature: Dict[str, str]) -> Dict[tuple, list]:
    """ASTSource attributes of the aligned build (V and the row strides multiples of 16)."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name in _ALIGNED_ARGS}


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _check_logits(name: str, t: Tensor) -> None:
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, V] or [B, T, V], got shape {tuple(t.shape)}")
    if t.dtype not in _TRITON_DTYPE:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have last-dim stride 1, got strides {tuple(t.stride())}")
    check_capability("triton", t.device, t.dtype, name)


def _strides(t: Tensor) -> Tuple[int, int]:
    """(batch stride, row stride) of a [N, V] (batch stride 0) or [B, T, V] tensor."""
    return (0, t.stride(0)) if t.dim() == 2 else (t.stride(0), t.stride(1))


def _round_x() -> bool:
    from hero_kernels.dispatch import triton_interpreter_on

    return not triton_interpreter_on()


def forward(logits: Tensor, labels: Tensor, opts: RowOptions) -> RowStats:
    """logits [N, V] or [B, T, V] (bf16/fp16/fp32, last-dim stride 1, any row / batch stride), labels [N]
    or [B, T] int64. One launch either way.

    Returns (logp, H, lse) [N] (N = B * T; logp, H float32, lse float64); rows with label ==
    opts.ignore_index give 0, 0, 0, rows with a label outside [0, V) NaN.
    """
    _check_logits("logits", logits)
    V = logits.shape[-1]
    N = labels.numel()
    B = logits.shape[0] if logits.dim() == 3 else None
    dev = logits.device
    logp, ent, lse = (torch.empty(N, dtype=dt, device=dev) for dt in (torch.float32, torch.float32, torch.float64))
    if N == 0:
        return RowStats(logp, ent, lse)
    labels = labels.reshape(-1).contiguous()
    (launch,) = plan(N, V, logits.dtype, pass_="fwd", batch=B)
    sb, sr = _strides(logits)
    _entropy_logprob_fwd_kernel[launch.grid](
        logits, labels, logp, ent, lse, V, launch.grid[0], sb, sr, float(opts.inv_temperature),
        int(opts.ignore_index), BLOCK_V=launch.meta["BLOCK_V"], ROUND_X=_round_x(), num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return RowStats(logp, ent, lse)


def _row_vector(t: Optional[Tensor], N: int, dev) -> Tensor:
    """Upstream gradient [N] as fp32; None -> zeros (stride 0, no allocation of N elements)."""
    if t is None:
        return torch.zeros((), dtype=torch.float32, device=dev).expand(N)
    return t.reshape(-1).to(torch.float32)


def backward(logits: Tensor, labels: Tensor, saved: RowStats, grads: UpstreamGrads, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    """dL/dlogits (shape of logits, in logits.dtype) from the forward's saved.lse / saved.H [N] and the
    upstream grads.g / grads.k [N] (fp32). logits [N, V] or [B, T, V] as in ``forward``; one launch.

    ``out`` (optional, shape of logits, logits.dtype, last-dim stride 1) receives the result; it may be
    ``logits`` itself (in-place). Masked rows get 0, rows with a label outside [0, V) NaN. ``None``
    upstream gradients count as zeros.
    """
    _check_logits("logits", logits)
    V = logits.shape[-1]
    N = labels.numel()
    B = logits.shape[0] if logits.dim() == 3 else None
    dev = logits.device
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=dev)
    else:
        _check_logits("out", out)
        if tuple(out.shape) != tuple(logits.shape) or out.dtype != logits.dtype:
            raise ValueError(f"out must be {tuple(logits.shape)} {logits.dtype}, got {tuple(out.shape)} {out.dtype}")
    if N == 0 or V == 0:
        return out
    labels = labels.reshape(-1).contiguous()
    g = _row_vector(grads.g, N, dev)
    k = _row_vector(grads.k, N, dev)
    lse = saved.lse.to(torch.float64).contiguous()  # an fp32 lse is widened (then lo = 0: the old accuracy)
    H = saved.H.to(torch.float32).contiguous()
    (launch,) = plan(N, V, logits.dtype, pass_="bwd", batch=B)
    sb, sr = _strides(logits)
    ob, orow = _strides(out)
    _entropy_logprob_bwd_kernel[launch.grid](
        logits, out, labels, lse, H, g, k, V, launch.grid[0], sb, sr, ob, orow, g.stride(0), k.stride(0),
        float(opts.inv_temperature), int(opts.ignore_index), BLOCK_V=launch.meta["BLOCK_V"],
        ROUND_X=_round_x(), num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
