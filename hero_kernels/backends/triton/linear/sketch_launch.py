"""Launchers of the gradient sketch through the LM head, and ``plan``: the one description of what they launch
(design per pass, grids, tiles, vocab splits, sketch blocks, chunk sizes; ``benchmarks/roofline.py`` prices it).

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N], proj [k, V], opts)
    -> (a [N, k] fp32, stats [N, 2] fp32 = (max x, log s)); masked rows 0
backward(hidden, weight, bias, labels, proj, a, stats, grad_a [N, k], opts, need_dh, need_dw)
    -> (grad_hidden [N, D] | None, grad_weight [V, D] | None, grad_bias [V] | None)

Two designs per pass; ``plan`` prices both with the roofline model and runs the faster (``SketchPlan.variants``;
``LinearSketchConfig.forward_variant`` / ``backward_variant`` or ``FORWARD_ENV`` / ``BACKWARD_ENV`` force one).
Fused forward: ``_sketch_fwd_partials_kernel`` (vocab splits, split-fastest order and the split count of the
fused entropy head's forward, ``config.forward_splits``) then ``_sketch_merge_kernel``. Chunked forward: per
chunk of C rows a cuBLAS GEMM writes the fp32 logits [C, V], then ``grad_sketch._fwd_kernel`` (the row op's
kernel) gives a and the same (max x, log s) stats. Backward: per chunk of C rows (``gemm.chunk_rows``) dz
[C, V] is written once in the input dtype, by ``_sketch_bwd_dz_kernel`` (fused: logits tile recomputed by
tl.dot) or by cuBLAS fp32 logits + ``grad_sketch._bwd_kernel`` (chunked), then cuBLAS dh = dz W and
dW += dz^T h (``gemm.chunk_grads``). Either backward takes either forward's stats. No [N, V] tensor anywhere.

Precision. 16-bit inputs: both tensor-core dots of the sketch (e P^T forward, v P backward) take proj rounded
to the input dtype (2^-9 relative per entry for bf16, below the effect of eager's own bf16 logits), e in [0, 1]
and the upstream v rounded to it; accumulation is fp32, the logits stay fp32 (never rounded to bf16), and the
per-row terms c = (P p) . v and the label column are formed in fp32 from the same rounded P and v, so dz is
the exact gradient of the computed sketch for that P and v. fp32 inputs: IEEE fp32 dots (TF32 with
``allow_tf32``). The fused kernels leave the label column out of the forward sums (a = (P_y so - uo) /
(s tau), no cancellation as p_y -> 1) and the fused backward takes it from the forward's a; the row kernels
(chunked designs) sum it in like the row op (a = (P_y - u / s) / tau), within 2x eager's error in the tests.
The chunked designs' cuBLAS logits are fp32 too (fp32 GEMM output), fp32 inputs run IEEE dots in the row
kernels whatever ``allow_tf32`` says, and their fp32 [C, V] logits buffer is twice the dz chunk buffer.

Modeled at N = 16384, D = 4096, V = 151936, k = 128, bf16 (``python -m benchmarks.roofline --op
linear_grad_sketch --shapes headline``): see docs/design.md (the fused gradient sketch section).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from hero_kernels.backends import gemm
from hero_kernels.backends.plan import GPU_SPECS, KernelLaunch, gemm_l2_bytes
from hero_kernels.backends.triton import grad_sketch as ROWS
from hero_kernels.options import RowOptions

from . import sketch_kernels as SK
from .config import (SKETCH_MERGE_BLOCK, SKETCH_MERGE_WARPS, LinearSketchConfig, default_sketch_config, device_arch,
                     forward_splits)
from .chunked import chunk_sizes, logits_chunk_plan, logits_into
from .launch import (_ALIGN, _MASKED_LSE, DesignPlan, _aligned_2d, _check, _device_sms, _dot_precision, _entry,
                     _prepare, _tf32, _upcast_dot, forced_variant, plan_passes, plan_target)

__all__ = ["plan", "forward", "backward", "SKETCH_K", "SketchPlan", "FORWARD_ENV", "BACKWARD_ENV"]

#: Sketch size k the plan models when none is given: hero.omnex's default k1.
SKETCH_K = 128


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
def _proj_plan(k: int, V: int, e: int) -> KernelLaunch:
    return KernelLaunch("cast_proj", (), "stream", 0.0, k * V * (4 + e), "proj [k, V] (fp32) cast / padded once "
                        "per pass into the input dtype, rows 16-aligned", external=True)


def _forward_plan(N: int, D: int, V: int, k: int, e: int, has_bias: bool, cfg: LinearSketchConfig,
                  sms: int) -> List[KernelLaunch]:
    t, bp = cfg.fwd, cfg.block_p
    kb = triton.cdiv(k, bp)
    row_blocks = triton.cdiv(N, t.block_n)
    S = forward_splits(row_blocks, V, t.block_v, sms, cfg.vocab_splits)
    per = triton.cdiv(triton.cdiv(V, S), t.block_v) * t.block_v
    S = triton.cdiv(V, per)
    # As the entropy head's forward: a wave of ~sms programs covers sms / S row blocks x S splits; their
    # hidden blocks stay in L2, W (and the proj tiles) stream from HBM once per wave, per sketch block.
    wave_rows = max(1, sms // (S * kb))
    w_passes = triton.cdiv(row_blocks, wave_rows) * kb
    logit_flops = 2.0 * N * D * V * kb
    sketch_flops = 2.0 * N * V * bp * kb
    hbm = (N * D * e + w_passes * V * (D * e + bp * e + (e if has_bias else 0)) + 8 * N
           + S * N * (12 + 4 * k))
    note = (f"hidden block shared by its S={S} co-resident split programs (wave working set "
            f"{min(wave_rows, row_blocks) * t.block_n * D * e / 2**20:.1f} MiB); W and proj streamed once per "
            f"wave ({w_passes} passes, {kb} sketch block(s) each recomputing the logits)")
    meta = {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k, "BLOCK_P": bp, "splits": S,
            "cols_per_split": per, "sketch_blocks": kb, "elt": e}
    # L2 -> SM: the logits GEMM's operand tiles, plus a proj tile [BP, BV] per vocab tile (e stays in registers).
    l2 = gemm_l2_bytes(logit_flops, t.block_n, t.block_v, e) + sketch_flops * e / (2 * t.block_n)
    mb = SKETCH_MERGE_BLOCK
    return [
        _proj_plan(k, V, e),
        KernelLaunch("_sketch_fwd_partials_kernel", (row_blocks * S, kb), "gemm", logit_flops + sketch_flops, hbm,
                     note, t.num_warps, t.num_stages, meta, l2_bytes=l2),
        KernelLaunch("_sketch_merge_kernel", (triton.cdiv(N, mb), kb), "stream", 0.0,
                     S * N * (12 + 4 * k) + 32 * N * k + 4 * N * k + 16 * N,
                     "partials read once; proj[:, y] gathered (one 32-byte sector per element)", SKETCH_MERGE_WARPS, 1,
                     {"BLOCK_R": mb, "BLOCK_P": bp, "splits": S}),
    ]


def _row_kernel_entry(name: str, grid: Tuple[int, int], c: int, V: int, k: int, e: int, reps: int, flops: float,
                      hbm: float, l2: float, sms: int) -> KernelLaunch:
    """A ``grad_sketch`` row kernel on a chunk's fp32 logits. Fewer programs than SMs leave SMs idle: the
    L2 -> SM term then scales by sms / programs."""
    t = ROWS.TILES["fwd" if name.endswith("_fwd_kernel") else "bwd"]
    programs = grid[0] * grid[1]
    return KernelLaunch(name, grid, "gemm", flops, hbm,
                        f"fp32 logits chunk streamed from HBM; proj read once per chunk and shared in L2 by the "
                        f"programs sweeping V in step ({programs} programs on {sms} SMs)",
                        t.num_warps, t.num_stages, {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v,
                                                    "BLOCK_K": ROWS.block_k(k), "chunk_rows": c, "elt": e},
                        repeats=reps, l2_bytes=l2 / min(1.0, programs / sms))


def _chunked_forward_plan(N: int, D: int, V: int, k: int, e: int, has_bias: bool, cfg: LinearSketchConfig,
                          sms: int) -> List[KernelLaunch]:
    """The chunked forward: per chunk of C rows (the backward's ``gemm.chunk_rows``; the fp32 buffer is twice
    the backward's dz chunk) the fp32 logits, then ``grad_sketch._fwd_kernel`` streams them once per k block
    (16 rows per program, proj tiles [BK, BV] in the input dtype, e in registers)."""
    out = [_proj_plan(k, V, e)]
    bn, bk = ROWS.TILES["fwd"].block_n, ROWS.block_k(k)
    for c, reps in chunk_sizes(N, gemm.chunk_rows(N, D, V, e, cfg.chunk_rows)):
        grid = ROWS.fwd_grid(c, k)
        sf = 2.0 * c * V * bk * grid[1]
        out += logits_chunk_plan(c, reps, D, V, e, has_bias)
        out.append(_row_kernel_entry("grad_sketch._fwd_kernel", grid, c, V, k, e, reps, sf,
                                     grid[1] * (4 * c * V + V * bk * e) + c * (4 * k + 24),
                                     grid[1] * 4.0 * c * V + sf * e / (2 * bn), sms))
    return out


def _fused_dz_plan(c: int, reps: int, D: int, V: int, k: int, e: int, has_bias: bool, cfg: LinearSketchConfig,
                   sms: int) -> List[KernelLaunch]:
    """The fused backward's dz of one chunk: ``_sketch_bwd_dz_kernel`` recomputes the logits tile (tl.dot)."""
    t, bp = cfg.dz, cfg.dz_block_p
    kp = triton.cdiv(k, bp) * bp
    grid = (triton.cdiv(c, t.block_n) * triton.cdiv(V, t.block_v),)
    gf, sf = 2.0 * c * D * V, 2.0 * c * V * kp
    note = (f"W and proj streamed once per chunk (a wave shares each tile), chunk hidden rows "
            f"{c * D * e / 2**20:.1f} MiB and v L2-resident, dz [C, V] written once")
    return [KernelLaunch("_sketch_bwd_dz_kernel", grid, "gemm", gf + sf,
                         c * D * e + V * (D + k) * e + c * V * e + c * (k * e + 16) + (V * e if has_bias else 0),
                         note, t.num_warps, t.num_stages,
                         {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k, "BLOCK_P": bp,
                          "chunk_rows": c, "elt": e}, repeats=reps,
                         l2_bytes=gemm_l2_bytes(gf, t.block_n, t.block_v, e) + gemm_l2_bytes(sf, t.block_n,
                                                                                             t.block_v, e))]


def _chunked_dz_plan(c: int, reps: int, D: int, V: int, k: int, e: int, has_bias: bool, cfg: LinearSketchConfig,
                     sms: int) -> List[KernelLaunch]:
    """The chunked backward's dz of one chunk: the fp32 logits, then ``grad_sketch._bwd_kernel`` (per program
    16 rows x BV columns: v [16, k] fp32 and proj [k, BV] tiles, w = v proj by tl.dot) writes dz in the input
    dtype into the chunk buffer."""
    t, bk = ROWS.TILES["bwd"], ROWS.block_k(k)
    kp = triton.cdiv(k, bk) * bk
    grid = ROWS.bwd_grid(c, V)
    l2 = (4 + e) * c * V + grid[0] * grid[1] * kp * (4 * t.block_n + e * t.block_v)
    return logits_chunk_plan(c, reps, D, V, e, has_bias) + [
        _row_kernel_entry("grad_sketch._bwd_kernel", grid, c, V, k, e, reps, 2.0 * c * V * kp,
                          (4 + e) * c * V + V * kp * e + c * (4 * k + 12), l2, sms)]


#: Environment overrides of each pass's design ("fused" | "chunked") when the config leaves it None.
FORWARD_ENV, BACKWARD_ENV = "HERO_KERNELS_SKETCH_FORWARD", "HERO_KERNELS_SKETCH_BACKWARD"

_FORWARD_PLANS = {"fused": _forward_plan, "chunked": _chunked_forward_plan}
_DZ_PLANS = {"fused": _fused_dz_plan, "chunked": _chunked_dz_plan}


#: The sketch's plan: a ``DesignPlan`` (the design each pass runs, both designs' modeled seconds).
SketchPlan = DesignPlan


def plan(N: int, D: int, V: int, dtype, *, k: int = SKETCH_K, pass_: str = "fwd", has_bias: bool = False,
         need_dh: bool = True, need_dw: bool = True, config: Optional[LinearSketchConfig] = None,
         sms: Optional[int] = None, total_rows: Optional[int] = None, weight_copied: Optional[bool] = None,
         arch: Optional[int] = None, gpu: str = "h100", tf32: bool = False) -> SketchPlan:
    """Kernel launches, in order, of ``pass_`` ("fwd", "bwd" or "fwd+bwd") for N valid rows, hidden width D,
    V vocabulary rows and a k-row projection. Other arguments as the entropy head's ``launch.plan``.
    Each pass runs the design (``SketchPlan.variants``) the roofline model prices faster on ``gpu`` (a
    ``GPU_SPECS`` key; the launchers price on the H100 at the device's SM count, fp32 under torch's cuBLAS TF32
    flag: ``tf32``), unless the config or ``FORWARD_ENV`` / ``BACKWARD_ENV`` forces one."""
    dt, e, sms = plan_target(pass_, dtype, sms)
    cfg = config or default_sketch_config(dt, GPU_SPECS["h100"].cc if arch is None else arch)
    out, fp32 = SketchPlan(), dt == torch.float32
    forced = {w: forced_variant(cfg, w, (FORWARD_ENV, BACKWARD_ENV), dt) for w in ("forward", "backward")}

    def forward(D_pad: int) -> List[KernelLaunch]:
        priced = {name: fn(N, D_pad, V, k, e, has_bias, cfg, sms) for name, fn in _FORWARD_PLANS.items()}
        return out.choose("forward", priced, forced["forward"], gpu, fp32, tf32)

    launches, backward = plan_passes(N, D, V, e, pass_, total_rows, weight_copied, need_dh, need_dw, forward)
    out += launches
    if not backward:
        return out
    out.append(_proj_plan(k, V, e))
    out.append(KernelLaunch("row_terms", (), "stream", 0.0, N * k * (32 + 4 + 4 + 2 * e) + 8 * N,
                            "torch ops: proj[:, y] gathered, v cast, c = (P p) . v and the label term", external=True))
    D = triton.cdiv(D, _ALIGN) * _ALIGN
    C = gemm.chunk_rows(N, D, V, e, cfg.chunk_rows)
    priced = {name: gemm.chunked_backward_plan(
        N, D, V, e, C, lambda c, reps, fn=fn: fn(c, reps, D, V, k, e, has_bias, cfg, sms), has_bias=has_bias,
        need_dh=need_dh, need_dw=need_dw) for name, fn in _DZ_PLANS.items()}
    out += out.choose("backward", priced, forced["backward"], gpu, fp32, tf32)
    return out


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _proj(proj: Tensor, dtype: torch.dtype, V: int) -> Tensor:
    """proj [k, V] in the kernels' dtype (the input dtype), rows 16-aligned ([k, V] view of [k, V_pad])."""
    P = proj.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(P).all()):
        raise ValueError("proj has entries beyond float16's range (the float16 kernels dot in float16); scale proj "
                         "or pass bfloat16 / float32 hidden states")
    return _aligned_2d(P, triton.cdiv(V, _ALIGN) * _ALIGN)[:, :V]


def _config(hidden: Tensor, config: Optional[LinearSketchConfig]) -> LinearSketchConfig:
    return config or default_sketch_config(hidden.dtype, device_arch(hidden.device))


def _common(hidden, weight, bias, labels, proj, opts, config):
    _check(hidden, weight, bias, labels)
    cfg = _config(hidden, config)
    idx, h, w, b, lab = _prepare(hidden, weight, bias, labels, opts.ignore_index, may_skip_compaction=True)
    return cfg, idx, h, w, b, lab


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, proj: Tensor, opts: RowOptions,
            config: Optional[LinearSketchConfig] = None) -> Tuple[Tensor, Tensor]:
    """(a [N, k] fp32, stats [N, 2] fp32); masked rows 0. Shapes: module docstring."""
    cfg, idx, h, w, b, lab = _common(hidden, weight, bias, labels, proj, opts, config)
    N, V, KS = hidden.shape[0], weight.shape[0], proj.shape[0]
    dev = hidden.device
    a = torch.zeros((N, KS), dtype=torch.float32, device=dev)
    stats = torch.zeros((N, 2), dtype=torch.float32, device=dev)
    n = h.shape[0]
    if n == 0:
        return a, stats
    P = _proj(proj, h.dtype, V)
    launches = plan(n, hidden.shape[1], V, h.dtype, k=KS, pass_="fwd", has_bias=b is not None, config=cfg,
                    sms=_device_sms(dev), total_rows=N, weight_copied=w is not weight, tf32=_tf32(h.dtype))
    a_c = torch.empty((n, KS), dtype=torch.float32, device=dev) if idx is not None else a
    st_c = torch.empty((n, 2), dtype=torch.float32, device=dev) if idx is not None else stats
    if launches.forward_variant == "chunked":
        _chunked_forward(h, w, b, lab, P, a_c, st_c, opts, _entry(launches, "cublas_logits").meta["chunk_rows"])
    else:
        _fused_forward(h, w, b, lab, P, a_c, st_c, opts, cfg, launches)
    if idx is None:  # uncompacted: masked rows (if any) were computed, their results are 0
        masked = (lab == opts.ignore_index)[:, None]
        return a.masked_fill_(masked, 0.0), stats.masked_fill_(masked, 0.0)
    return a.index_copy_(0, idx, a_c), stats.index_copy_(0, idx, st_c)


def _chunked_forward(h: Tensor, w: Tensor, b: Optional[Tensor], lab: Tensor, P: Tensor, a: Tensor, stats: Tensor,
                     opts: RowOptions, C: int) -> None:
    """The chunked design into a [n, k] / stats [n, 2] (h [n, D'], w [V, D']): per chunk of C rows the fp32
    logits [C, V] by cuBLAS (``gemm.mm_into``: 16-bit operands, fp32 output), + bias, then the row kernel on
    every row of the chunk (no host sync; a masked row of an uncompacted batch gets label 0 here and is zeroed
    by the caller; a bad label gives a NaN row)."""
    n, V = h.shape[0], w.shape[0]
    buf = torch.empty((min(C, n), V), dtype=torch.float32, device=h.device)
    rows = torch.arange(buf.shape[0], device=h.device)
    # masked rows of an uncompacted batch read column 0 (zeroed by the caller); an out-of-range label stays
    # out of range, so the row kernel's guard makes that row NaN instead of a plausible sketch
    lab = torch.where(lab == opts.ignore_index, 0, lab)
    bias = None if b is None else b.float()
    for s in range(0, n, C):
        e = min(n, s + C)
        logits_into(h[s:e], w, bias, buf[:e - s])
        ROWS.forward_rows(buf[:e - s], rows[:e - s], lab[s:e], P, a[s:e], stats[s:e], opts)


def _fused_forward(h: Tensor, w: Tensor, b: Optional[Tensor], lab: Tensor, P: Tensor, a_c: Tensor, st_c: Tensor,
                   opts: RowOptions, cfg: LinearSketchConfig, launches: List[KernelLaunch]) -> None:
    """The fused design (partials + merge kernels) into a_c [n, k] / st_c [n, 2]."""
    n, D = h.shape
    V, KS = w.shape[0], P.shape[0]
    dev = h.device
    fwd, merge = _entry(launches, "_sketch_fwd_partials_kernel"), _entry(launches, "_sketch_merge_kernel")
    S, t, inv_t = fwd.meta["splits"], cfg.fwd, float(opts.inv_temperature)
    parts = [torch.empty((S, n), dtype=torch.float32, device=dev) for _ in range(3)]  # m, so, xl
    u = torch.empty((S, n, KS), dtype=torch.float32, device=dev)
    SK._sketch_fwd_partials_kernel[fwd.grid](
        h, w, b if b is not None else w, lab, P, parts[0], parts[1], parts[2], u,
        n, D, V, KS, h.stride(0), w.stride(0), P.stride(0), fwd.meta["cols_per_split"], S, inv_t,
        HAS_BIAS=b is not None, DOT_PRECISION=_dot_precision(h.dtype, cfg), UPCAST_DOT=_upcast_dot(h.dtype),
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k, BLOCK_P=cfg.block_p,
        num_warps=fwd.num_warps, num_stages=fwd.num_stages,
    )
    SK._sketch_merge_kernel[merge.grid](
        parts[0], parts[1], parts[2], u, lab, P, a_c, st_c, n, V, KS, S, P.stride(0), inv_t,
        BLOCK_R=merge.meta["BLOCK_R"], BLOCK_P=merge.meta["BLOCK_P"], num_warps=merge.num_warps,
    )


def _row_terms(P: Tensor, lab: Tensor, a: Tensor, stats: Tensor, grad_a: Tensor, opts: RowOptions, dtype,
               masked: Optional[Tensor]):
    """(stats, v [n, k] input dtype, c, lab_term fp32 [n]) for the dz kernel. v is rounded to the dot's dtype
    first and c = (P p) . v = v . (P_y - tau a), lab_term = -(v . a) / tau use that same v."""
    v = grad_a.to(dtype)
    if masked is not None:  # uncompacted: masked rows get v = 0 (dz = 0) and p = 0 (a huge row max)
        v = v.masked_fill(masked[:, None], 0)
        stats = stats.clone()
        stats[:, 0].masked_fill_(masked, _MASKED_LSE)
    vf = v.float()
    p_y = P.index_select(1, lab.clamp(0, P.shape[1] - 1)).t().float()
    c = (vf * (p_y - opts.temperature * a)).sum(-1)
    lab_term = (vf * a).sum(-1).mul_(-opts.inv_temperature)
    return stats.contiguous(), v.contiguous(), c.contiguous(), lab_term.contiguous()


def _fused_dz(h: Tensor, w: Tensor, b: Optional[Tensor], lab: Tensor, P: Tensor, st: Tensor, v: Tensor, c: Tensor,
              lab_term: Tensor, z: Tensor, opts: RowOptions, cfg: LinearSketchConfig,
              launches: List[KernelLaunch]) -> None:
    """``_sketch_bwd_dz_kernel`` on one chunk (h [c, D'], row terms [c, ...]): dz into z [c, V]."""
    t, (n, Dp), (KS, V) = cfg.dz, h.shape, P.shape
    dz = next(x for x in launches if x.name == "_sketch_bwd_dz_kernel" and x.meta["chunk_rows"] == n)
    SK._sketch_bwd_dz_kernel[dz.grid](
        h, w, b if b is not None else w, lab, P, st, v, c, lab_term, z,
        n, Dp, V, KS, h.stride(0), w.stride(0), P.stride(0), z.stride(0), float(opts.inv_temperature),
        HAS_BIAS=b is not None, DOT_PRECISION=_dot_precision(h.dtype, cfg), UPCAST_DOT=_upcast_dot(h.dtype),
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k, BLOCK_P=cfg.dz_block_p,
        num_warps=dz.num_warps, num_stages=dz.num_stages,
    )


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, proj: Tensor, a: Tensor,
             stats: Tensor, grad_a: Tensor, opts: RowOptions, need_dh: bool = True, need_dw: bool = True,
             config: Optional[LinearSketchConfig] = None
             ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_hidden, grad_weight, grad_bias) of the sketch for upstream grad_a [N, k]; a / stats: the forward's."""
    if not (need_dh or need_dw):
        return None, None, None
    cfg, idx, h, w, b, lab = _common(hidden, weight, bias, labels, proj, opts, config)
    N, D = hidden.shape
    V, KS = weight.shape[0], proj.shape[0]
    dev = hidden.device
    n = h.shape[0]
    if n == 0:
        return (torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if (bias is not None and need_dw) else None)
    P = _proj(proj, h.dtype, V)
    rows = (a, stats, grad_a) if idx is None else (a.index_select(0, idx), stats.index_select(0, idx),
                                                   grad_a.index_select(0, idx))
    masked = (lab == opts.ignore_index) if idx is None else None
    st, v, c, lab_term = _row_terms(P, lab, rows[0].float(), rows[1], rows[2], opts, h.dtype, masked)
    launches = plan(n, D, V, h.dtype, k=KS, pass_="bwd", has_bias=b is not None, need_dh=need_dh, need_dw=need_dw,
                    config=cfg, sms=_device_sms(dev), total_rows=N, weight_copied=w is not weight,
                    tf32=_tf32(h.dtype))
    chunked = launches.backward_variant == "chunked"
    dz_launch = _entry(launches, "grad_sketch._bwd_kernel" if chunked else "_sketch_bwd_dz_kernel")
    C = dz_launch.meta["chunk_rows"]
    Dp = h.shape[1]
    buf = torch.empty((min(C, n), triton.cdiv(V, _ALIGN) * _ALIGN), dtype=h.dtype, device=dev)
    dh = torch.empty((n, Dp), dtype=hidden.dtype, device=dev) if need_dh else None
    dW = torch.empty((V, Dp), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.empty((V,), dtype=torch.float32, device=dev) if (need_dw and b is not None) else None
    if chunked:  # the fp32 logits chunk, and v in fp32 for the row kernel (exact: v is already rounded)
        zf, ids, vf, bias_f = (torch.empty((buf.shape[0], V), dtype=torch.float32, device=dev),
                                torch.arange(buf.shape[0], device=dev), v.float(), None if b is None else b.float())
    for s in range(0, n, C):
        e = min(n, s + C)
        z = buf[:e - s, :V]
        if chunked:
            logits_into(h[s:e], w, bias_f, zf[:e - s])
            ROWS.backward_rows(zf[:e - s], ids[:e - s], P, st[s:e], vf[s:e], c[s:e], z, opts)
        else:
            _fused_dz(h[s:e], w, b, lab[s:e], P, st[s:e], v[s:e], c[s:e], lab_term[s:e], z, opts, cfg, launches)
        gemm.chunk_grads(z, h[s:e], w, None if dh is None else dh[s:e], dW, db, first=s == 0)
    grad_hidden = grad_weight = grad_bias = None
    if dh is not None:
        dh = dh[:, :D]
        grad_hidden = dh.contiguous() if idx is None else \
            torch.zeros((N, D), dtype=hidden.dtype, device=dev).index_copy_(0, idx, dh)
    if dW is not None:
        grad_weight = dW[:, :D].to(weight.dtype, memory_format=torch.contiguous_format)
        grad_bias = db.to(bias.dtype) if bias is not None else None
    return grad_hidden, grad_weight, grad_bias
