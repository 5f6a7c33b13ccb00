"""Triton backend of ``grad_sketch``: a = (1/tau) (proj[:, y] - proj p) per row, one pass over the vocabulary.

Shapes: logits [N, V] (bf16 / fp16 / fp32, last-dim stride 1, any row stride), labels [N] int64, proj [k, V]
(fp32 or the logits dtype; anything else is cast to fp32 by the launcher). Outputs a [N, k] fp32 and the row
statistics stats [N, 2] fp32 = (m, log s): the max of x = z / tau and log sum e^{x - m}, saved for the backward.

Forward ``_fwd_kernel``, grid (row blocks of the VALID rows, k blocks): the launcher compacts the valid row ids
(masked rows cost nothing and stay 0) and the kernel gathers its BLOCK_N rows through them. It streams the
vocabulary in [BLOCK_N, BLOCK_V] tiles keeping, per row, the running max m, s = sum e^{x - m} and the k-vector
u = sum_j proj[:, j] e^{x_j - m}: a new max rescales s and u by e^{m_old - m_new} (flash-attention style), and
the tile's contribution to u is one ``tl.dot`` of e [BLOCK_N, BLOCK_V] with proj^T [BLOCK_V, BLOCK_K]. p is
never stored. At the end proj p = u / s. One exp per logit; the running max starts at
-FLT_MAX (finite) so -inf logits and padded lanes give e = 0, never NaN. k > BLOCK_K: each k block re-reads
the row's logits (the softmax state is recomputed, so no cross-program reduction is needed).

Backward ``_bwd_kernel``, grid (valid row blocks, vocab blocks): dz = -(p / tau^2) (w - c) with
w = v @ proj over the k dimension (``tl.dot`` over k tiles) and p = exp((x - m) - log s) from the saved stats:
(m, log s) rather than lse = m + log s, whose fp32 rounding (ulp(1e4) ~ 1e-3) would put a relative error of
that size on every p of a row with large logits, while x - m is exact.
c = (proj p) . v is a per-row scalar the launcher computes from the forward output:
proj p = proj[:, y] - tau a, so c = v . proj[:, y] - tau (v . a) ([N, k] work, no vocabulary pass). Every tile
is independent (no loop-carried state), and each element is loaded and stored by the same program, so the
output may alias the logits (in-place).

Dots: with a 16-bit proj both operands are in that dtype (e in [0, 1] and v rounded to it), accumulating in
fp32 (tensor cores); with an fp32 proj they are IEEE fp32 (``input_precision="ieee"``) so fp32 matches
PyTorch's fp32 matmul. Temperature is a runtime fp32 (one compiled kernel for every value).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hero_kernels.options import RowOptions

__all__ = ["SketchTile", "TILES", "BLOCK_KS", "block_k", "KERNEL_CONFIGS", "compile_attrs", "forward", "backward",
           "forward_rows", "fwd_grid", "backward_rows", "bwd_grid"]

_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a (fp32) @ b with fp32 accumulation: IEEE fp32 for an fp32 b, else a rounded to b's 16-bit dtype.
    UPCAST is set only under the Triton interpreter with bf16, whose dot multiplies bf16 bit patterns as
    integers (np.matmul on uint16); products of 16-bit floats are exact in fp32, so the upcast dot gives the
    tensor-core result up to summation order."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    elif UPCAST:
        return tl.dot(a.to(b.dtype).to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit(do_not_specialize=["inv_temp"])
def _fwd_kernel(
    logits_ptr,  # [N, V], last-dim stride 1
    rows_ptr,  # [n] int64: valid row ids
    labels_ptr,  # [N] int64
    proj_ptr,  # [k, V], last-dim stride 1
    a_ptr,  # [N, k] fp32 out (pre-zeroed: masked rows stay 0)
    stats_ptr,  # [N, 2] fp32 out: (m, log s)
    n_rows,
    V,
    K,
    stride_row,
    stride_pk,
    stride_a,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=nmask, other=0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    inv_t = tl.cast(inv_temp, tl.float32)
    base = logits_ptr + rows[:, None] * stride_row
    pbase = proj_ptr + ks[:, None].to(tl.int64) * stride_pk  # [BLOCK_K, 1]

    m = tl.full([BLOCK_N], -_FLT_MAX, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        cmask = cols < V
        x = tl.load(base + cols[None, :], mask=nmask[:, None] & cmask[None, :], other=float("-inf"))
        x = x.to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])
        # proj tile loaded [BLOCK_K, BLOCK_V] (contiguous along V: vector loads), transposed for the dot
        pk = tl.load(pbase + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        s = s * alpha + tl.sum(e, axis=1)
        u = u * alpha[:, None] + _dot(e, tl.trans(pk), IEEE, UPCAST)
        m = m_new

    labels = tl.load(labels_ptr + rows, mask=nmask, other=0)
    p_y = tl.load(proj_ptr + ks[None, :].to(tl.int64) * stride_pk + labels[:, None],
                  mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    a = (p_y - u / s[:, None]) * inv_t
    omask = nmask[:, None] & kmask[None, :]
    tl.store(a_ptr + rows[:, None] * stride_a + ks[None, :], a, mask=omask)
    first = nmask & (tl.program_id(1) == 0)
    tl.store(stats_ptr + 2 * rows, m, mask=first)
    tl.store(stats_ptr + 2 * rows + 1, tl.log(s), mask=first)


@triton.jit(do_not_specialize=["inv_temp"])
def _bwd_kernel(
    logits_ptr,  # [N, V], last-dim stride 1
    out_ptr,  # [N, V] dlogits (may alias logits), last-dim stride 1
    rows_ptr,  # [n] int64 valid row ids
    proj_ptr,  # [k, V]
    stats_ptr,  # [N, 2] fp32 (m, log s) from the forward
    v_ptr,  # [n, k] fp32 upstream grads of the valid rows (compacted, contiguous)
    c_ptr,  # [n] fp32 (proj p) . v of the valid rows
    n_rows,
    V,
    K,
    stride_row,
    stride_out,
    stride_pk,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=nmask, other=0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    inv_t = tl.cast(inv_temp, tl.float32)
    w = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * K + ks[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        pk = tl.load(proj_ptr + ks[:, None].to(tl.int64) * stride_pk + cols[None, :],
                     mask=kmask[:, None] & cmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_V]
        w += _dot(v, pk, IEEE, UPCAST)
    c = tl.load(c_ptr + offs_n, mask=nmask, other=0.0)
    m = tl.load(stats_ptr + 2 * rows, mask=nmask, other=0.0)
    log_s = tl.load(stats_ptr + 2 * rows + 1, mask=nmask, other=0.0)
    mask = nmask[:, None] & cmask[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=float("-inf"))
    p = tl.exp((x.to(tl.float32) * inv_t - m[:, None]) - log_s[:, None])
    dz = -(p * (inv_t * inv_t)) * (w - c[:, None])
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], dz.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SketchTile:
    """block_n rows x block_v vocabulary columns per step (both >= 16: tl.dot); warps of one program."""

    block_n: int
    block_v: int
    num_warps: int = 4
    num_stages: int = 2


TILES = {"fwd": SketchTile(16, 64, num_warps=8), "bwd": SketchTile(16, 64)}
#: k tile sizes; k above the largest is split over the grid (forward: each k block re-reads the logits) or
#: looped (backward). 16 x 64 tiles (8 warps in the forward, whose fp32 k = 64 build spills with 4) keep every
#: build under the register limit without spills. k = 128 (hero.omnex's default) is one block: one logits pass.
BLOCK_KS = (32, 64, 128)


def block_k(k: int) -> int:
    for b in BLOCK_KS:
        if k <= b:
            return b
    return BLOCK_KS[-1]


_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _kernel_configs() -> List[tuple]:
    """(kernel, signature, constexprs, num_warps, num_stages, description) of every build the launchers run."""
    rows = []
    for dt in ("bf16", "fp16", "fp32"):
        # fp32 logits also run with a 16-bit proj: the LM head's chunked passes (fp32 logits, proj and the
        # backward's dz in the input dtype)
        for pdt in (("bf16", "fp16", "fp32") if dt == "fp32" else sorted({dt, "fp32"})):
            odt = pdt if dt == "fp32" else dt
            for bk in BLOCK_KS:
                ieee = pdt == "fp32"
                fwd = {"logits_ptr": f"*{dt}", "rows_ptr": "*i64", "labels_ptr": "*i64", "proj_ptr": f"*{pdt}",
                       "a_ptr": "*fp32", "stats_ptr": "*fp32", "n_rows": "i32", "V": "i32", "K": "i32",
                       "stride_row": "i32", "stride_pk": "i32", "stride_a": "i32", "inv_temp": "fp32"}
                bwd = {"logits_ptr": f"*{dt}", "out_ptr": f"*{odt}", "rows_ptr": "*i64", "proj_ptr": f"*{pdt}",
                       "stats_ptr": "*fp32", "v_ptr": "*fp32", "c_ptr": "*fp32", "n_rows": "i32", "V": "i32",
                       "K": "i32", "stride_row": "i32", "stride_out": "i32", "stride_pk": "i32", "inv_temp": "fp32"}
                for name, fn, sig in (("fwd", _fwd_kernel, fwd), ("bwd", _bwd_kernel, bwd)):
                    t = TILES[name]
                    const = {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": bk, "IEEE": ieee, "UPCAST": False}
                    sig = dict(sig, **{c: "constexpr" for c in const})
                    rows.append((fn, sig, const, t.num_warps, t.num_stages,
                                 f"grad_sketch_{name}[{dt},proj={pdt},BLOCK_K={bk}]"
                                 + (f"[out={odt}]" if name == "bwd" and odt != dt else "")))
    return rows


#: Every (kernel, dtype, tile) the launchers can run; consumed by the GPU compile check / report.
KERNEL_CONFIGS: List[tuple] = _kernel_configs()

# Integer arguments that are multiples of 16 for LM vocabularies (V = 32000, 128256, 151936, 262144) and k.
_ALIGNED_INTS = ("V", "K", "stride_row", "stride_pk", "stride_a", "stride_out")


def compile_attrs(fn, signature: Dict[str, str]) -> Dict[tuple, list]:
    """ASTSource ``attrs`` of the variant Triton specializes at run time for LM shapes: tt.divisibility=16 on
    every pointer (torch allocations) and on V, k and the row strides. The compile check builds both this
    variant and the unaligned one (odd V)."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature.get(name, "").startswith("*") or name in _ALIGNED_INTS}


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
# Whether @triton.jit produced interpreter functions (TRITON_INTERPRET=1 when this module was imported).
_INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"


def _upcast(proj: Tensor) -> bool:
    return _INTERPRETED and proj.dtype == torch.bfloat16


def _prepare(logits: Tensor, labels: Tensor, proj: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    if logits.dim() != 2 or logits.dtype not in _TRITON_DTYPE or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"logits must be [N, V] bf16/fp16/fp32 with last-dim stride 1, got {tuple(logits.shape)} "
                         f"{logits.dtype} strides {tuple(logits.stride())}")
    if proj.dtype not in (torch.float32, logits.dtype):
        proj = proj.float()
    rows = torch.nonzero(labels != ignore_index).flatten()
    return proj.contiguous(), rows


def forward(logits: Tensor, labels: Tensor, proj: Tensor, opts: RowOptions) -> Tuple[Tensor, Tensor]:
    """(a [N, k] fp32, stats [N, 2] fp32); masked rows 0."""
    N, K = logits.shape[0], proj.shape[0]
    proj, rows = _prepare(logits, labels, proj, opts.ignore_index)
    a = torch.zeros((N, K), dtype=torch.float32, device=logits.device)
    stats = torch.zeros((N, 2), dtype=torch.float32, device=logits.device)
    if rows.numel():
        forward_rows(logits, rows, labels.contiguous(), proj, a, stats, opts)
    return a, stats


def fwd_grid(n: int, K: int) -> Tuple[int, int]:
    """Grid of ``_fwd_kernel`` for n rows and a k-row proj: (row blocks, k blocks)."""
    return triton.cdiv(n, TILES["fwd"].block_n), triton.cdiv(K, block_k(K))


def forward_rows(logits: Tensor, rows: Tensor, labels: Tensor, proj: Tensor, a: Tensor, stats: Tensor,
                 opts: RowOptions) -> None:
    """``_fwd_kernel`` on the rows ``rows`` (int64 [n], ids into logits / labels / a / stats; a label
    outside [0, V) gives a NaN row), writing a [R, k] fp32 (row stride a.stride(0)) and stats [R, 2] fp32 (contiguous) there. logits
    [R, V] last-dim stride 1; proj [k, V] last-dim stride 1, fp32 (IEEE dots) or 16-bit (the dots take e
    rounded to proj's dtype, for any logits dtype: the fused LM head's chunked forward feeds fp32 logits
    with a bf16 proj). No host sync: callers on a CUDA graph pass every row."""
    t, K, V = TILES["fwd"], proj.shape[0], logits.shape[1]
    # label guard with device ops (no host sync; in the kernel it pushes the fp32-logits build past its
    # registers): an out-of-range label is clamped for the read, and its row is NaN afterwards
    bad = (labels != opts.ignore_index) & ((labels < 0) | (labels >= V))
    _fwd_kernel[fwd_grid(rows.numel(), K)](
        logits, rows, labels.clamp(0, V - 1), proj, a, stats, rows.numel(), V, K, logits.stride(0), proj.stride(0),
        a.stride(0), float(opts.inv_temperature), BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=block_k(K),
        IEEE=proj.dtype == torch.float32, UPCAST=_upcast(proj), num_warps=t.num_warps, num_stages=t.num_stages,
    )
    a.masked_fill_(bad[:, None], float("nan"))
    stats[:, 0].masked_fill_(bad, float("nan"))


def backward(logits: Tensor, labels: Tensor, proj: Tensor, a: Tensor, stats: Tensor, grad_a: Tensor, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    """dlogits [N, V] in logits.dtype (into ``out`` when given, which may be ``logits`` itself)."""
    proj, rows = _prepare(logits, labels, proj, opts.ignore_index)
    if out is None:
        out = torch.empty_like(logits)
    if out.shape != logits.shape or out.stride(-1) != 1 or out.dtype != logits.dtype:
        raise ValueError(f"out must be [N, V] = {tuple(logits.shape)} {logits.dtype} with last-dim stride 1, got "
                         f"{tuple(out.shape)} {out.dtype}")
    out.index_fill_(0, torch.nonzero(labels == opts.ignore_index).flatten(), 0)
    if rows.numel() == 0:
        return out
    v = grad_a.index_select(0, rows).to(torch.float32).contiguous()
    # (proj p) . v from the forward output: proj p = proj[:, y] - tau a.
    # a bad label (checks off) clamped for the gather: its row of a is NaN, so c and dz stay NaN
    p_y = proj.index_select(1, labels.index_select(0, rows).clamp(0, logits.shape[1] - 1)).t().to(torch.float32)
    c = (v * (p_y - opts.temperature * a.index_select(0, rows))).sum(-1).contiguous()
    backward_rows(logits, rows, proj, stats, v, c, out, opts)
    return out


def bwd_grid(n: int, V: int) -> Tuple[int, int]:
    """Grid of ``_bwd_kernel`` for n rows and V vocabulary columns: (row blocks, vocab blocks)."""
    return triton.cdiv(n, TILES["bwd"].block_n), triton.cdiv(V, TILES["bwd"].block_v)


def backward_rows(logits: Tensor, rows: Tensor, proj: Tensor, stats: Tensor, v: Tensor, c: Tensor, out: Tensor,
                  opts: RowOptions) -> None:
    """``_bwd_kernel``: dz of the rows ``rows`` (int64 [n] ids into logits / stats / out) into ``out`` [R, V]
    (last-dim stride 1, any float dtype: the LM head's chunked backward reads fp32 logits and writes dz in
    the input dtype; may alias logits when the dtypes match). v [n, k] fp32 and c [n] fp32 are compacted
    (row i of them belongs to rows[i]); proj as in ``forward_rows``."""
    t, (V, K) = TILES["bwd"], (logits.shape[1], proj.shape[0])
    _bwd_kernel[bwd_grid(rows.numel(), V)](
        logits, out, rows, proj, stats, v, c, rows.numel(), V, K, logits.stride(0), out.stride(0), proj.stride(0),
        float(opts.inv_temperature), BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=block_k(K),
        IEEE=proj.dtype == torch.float32, UPCAST=_upcast(proj), num_warps=t.num_warps, num_stages=t.num_stages,
    )
