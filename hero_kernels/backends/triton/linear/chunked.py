"""The chunked designs of the fused LM head on Triton: cuBLAS logits, then the Triton row kernels.

Where the fused designs' tl.dot tiles are L2 -> SM bound (``__init__``'s docstring: 85 FLOP per L2 byte at
128 x 256), a cuBLAS GEMM runs at the tensor-core term and the row kernels stream its output once:

forward (``forward_plan`` / ``forward``): per chunk of C rows (``forward_rows``: the memory budget spent on
    the [C, V] logits) one GEMM writes the logits in the INPUT dtype (fp32 accumulation, the bias in the
    GEMM's epilogue, rounded once: the logits eager PyTorch and the CUDA path see), then ``entropy_logprob``'s
    Triton forward row kernel.
backward (``dz_plan`` / ``DzProducer``): dz of a row chunk x vocab range (a "rows" chunk of C rows over the
    whole vocabulary, or a "vocab" slice of Vc columns over all n rows: one GEMM per slice, as the CUDA
    backend's ``cpp_launch.linear_vocab_backward``): the logits by one GEMM, ``slice_label.py``'s
    ``_slice_labels_kernel`` (each row's label moved into the range, its logit saved), the Triton row
    backward writing dz in the input dtype into the dz buffer the cuBLAS dh / dW GEMMs read, then
    ``_slice_label_fix_kernel`` rewriting the label column from the forward's logp. The label ops run on
    "rows" chunks too: a vocab shard (``vocab_start`` > 0, ``hero_kernels.sharded``) is a slice of the global
    vocabulary. Which logits: those the forward's lse / H came from. After a chunked forward (or with fp32
    inputs) they are in the input dtype and dz is written IN PLACE over them (one buffer, as the CUDA path);
    after a fused forward (logits in fp32 registers) they are fp32 logits beside the 16-bit dz buffer (4 bytes
    per element more). The backend API does not say which forward ran: ``launch.plan`` derives it from the
    forward's own pricing (``DesignPlan.backward_logits``), and the fused backward's dz kernel rounds its
    register logits to the input dtype the same way (``kernels._round_to_input``).

Why the logits of the forward and not one choice for all: dz from rounded logits against an lse of unrounded
ones (or the reverse) has probabilities that do not sum to 1 (grad_bias 5.8e-2 vs eager's 2.0e-2 on the
tests' bf16 problem, ``__init__``'s docstring). Memory: the budget (``gemm.memory_budget``) covers the buffers
(``gemm.backward_order(..., logits_elem=4)`` after a fused forward), so at N = 16384, V = 128256 bf16 the
slices are Vc = 4608 after a chunked forward (the fused backward's width) and 1536 after a fused one; the
forward's 16-bit chunk holds C = 1504 rows.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from hero_kernels.backends import gemm
from hero_kernels.backends.plan import KernelLaunch
from hero_kernels.backends.triton import entropy_logprob as ROWS
from hero_kernels.backends.triton import slice_label as SL
from hero_kernels.options import RowOptions

__all__ = ["chunk_sizes", "logits_chunk_plan", "logits_into", "forward_rows", "forward_plan", "dz_plan", "forward",
           "DzProducer"]

_NOTE = "logits written by cuBLAS, streamed once from HBM by the row kernel (beyond 50 MB of L2)"


def chunk_sizes(N: int, C: int) -> List[Tuple[int, int]]:
    """(rows, repeats) of N rows in chunks of C: the equal chunks, then the tail."""
    return [(c, r) for c, r in [(C, N // C), (N % C, 1)] if c and r]


def logits_chunk_plan(c: int, reps: int, D: int, V: int, e: int, has_bias: bool,
                      meta: Optional[Dict] = None, logits_elem: int = 4) -> List[KernelLaunch]:
    """One cuBLAS GEMM writing the logits [c, V] of ``logits_elem`` bytes per element: fp32 (16-bit operands,
    fp32 output, never rounded), the bias added in place; or the input dtype (logits_elem = e), the bias in
    the GEMM's epilogue (addmm: fp32 accumulation, one rounding)."""
    meta = meta or {"chunk_rows": c}
    le = logits_elem
    out = [KernelLaunch("cublas_logits", (), "gemm", 2.0 * c * D * V, (c + V) * D * e + le * c * V,
                        f"cuBLAS: operands streamed once per GEMM; the {'fp32' if le == 4 else '16-bit'} [C, V] "
                        "output is written to HBM", meta=meta, external=True, repeats=reps)]
    if has_bias and le == 4:
        out.append(KernelLaunch("bias_add", (), "stream", 0.0, 8 * c * V + V * e,
                                "torch add_: the fp32 logits read and written once", meta=meta, external=True,
                                repeats=reps))
    return out


def logits_into(h: Tensor, w: Tensor, bias: Optional[Tensor], z: Tensor) -> None:
    """z [c, V] = h [c, D'] @ w [V, D']^T (+ bias) by cuBLAS with fp32 accumulation: an fp32 z takes the bias in
    place after the GEMM; a 16-bit z (the input dtype) is written once, rounded once, with the bias (cast to the
    input dtype, as eager F.linear needs) in the GEMM (addmm), as eager PyTorch."""
    if bias is not None and z.dtype == h.dtype != torch.float32:
        torch.addmm(bias.to(z.dtype), h, w.t(), out=z)
        return
    gemm.mm_into(h, w.t(), z)
    if bias is not None:
        z.add_(bias)


def forward_rows(N: int, D: int, V: int, e: int, forced: Optional[int]) -> int:
    """Rows C of the chunked forward: the memory budget (``gemm.chunk_rows``) spent on the [C, V] logits in the
    input dtype (no dW GEMM to keep busy: no CHUNK_MIN_ROWS floor). ``forced``: the config's chunk_rows."""
    return gemm.chunk_rows(N, D, V, e, forced, row_bytes=e * V, min_rows=gemm.CHUNK_ALIGN)


def forward_plan(N: int, D: int, V: int, e: int, has_bias: bool, forced_rows: Optional[int]) -> List[KernelLaunch]:
    """Launches of the chunked forward for N rows (no ``live_bytes``: ``launch.plan`` stamps them): logits in
    the input dtype, then the row forward on them."""
    dt = {2: torch.bfloat16, 4: torch.float32}[e]  # the row kernel's bf16 and fp16 builds cost the same
    out: List[KernelLaunch] = []
    for c, reps in chunk_sizes(N, forward_rows(N, D, V, e, forced_rows)):
        out += logits_chunk_plan(c, reps, D, V, e, has_bias, logits_elem=e)
        (k,) = ROWS.plan(c, V, dt, pass_="fwd")
        out.append(dataclasses.replace(k, l2_note=_NOTE, meta=dict(k.meta, chunk_rows=c), repeats=reps))
    return out


def dz_plan(c: int, w: int, reps: int, D: int, e: int, has_bias: bool, order: str,
            in_place: bool) -> List[KernelLaunch]:
    """dz [c, w] of a row chunk x vocab range (``DzProducer.fill``): the logits, slice labels, the row backward,
    the label-column fix. in_place (fp32 inputs, or 16-bit logits after a chunked forward): logits in the input
    dtype, dz written over them; else fp32 logits read, dz written in the input dtype beside them. The row
    entry is ``entropy_logprob.plan``'s build of the logits' dtype (its measured SASS per element)."""
    meta = {"chunk_rows": c, "vocab_cols": w, "order": order}
    le = e if in_place else 4
    labels, fix = SL.plan(c, reps, meta)
    (k,) = ROWS.plan(c, w, torch.float32 if le == 4 else torch.bfloat16, pass_="bwd", inplace_backward=in_place)
    row = dataclasses.replace(k, hbm_bytes=float(c) * (w * (le + e) + 28), l2_note=_NOTE, meta=dict(k.meta, **meta),
                              repeats=reps)
    return logits_chunk_plan(c, reps, D, w, e, has_bias, meta, le) + [labels, row, fix]


def forward(h: Tensor, w: Tensor, b: Optional[Tensor], lab: Tensor, opts: RowOptions,
            C: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, H fp32, lse fp64) [n] of h [n, D'], w [V, D'] in chunks of C rows, from the logits in the input
    dtype (``logits_into``: 16-bit ones rounded once, as eager): the row kernel zeroes rows whose label is
    opts.ignore_index and makes a row with a label outside [0, V) NaN (no host sync)."""
    n, V = h.shape[0], w.shape[0]
    dev = h.device
    out = tuple(torch.empty(n, dtype=dt, device=dev) for dt in (torch.float32, torch.float32, torch.float64))
    buf = torch.empty((min(C, n), V), dtype=h.dtype, device=dev)
    for s in range(0, n, C):
        e = min(n, s + C)
        logits_into(h[s:e], w, b, buf[:e - s])
        for o, r in zip(out, ROWS.forward(buf[:e - s], lab[s:e], opts)):
            o[s:e].copy_(r)
    return out


class DzProducer:
    """The chunked backward's dz: ``view(rows, cols)`` is a contiguous [rows, cols] dz buffer (input dtype; the
    cuBLAS dh / dW GEMMs read it), ``fill(z, s, e, v0, v1)`` writes dz of rows [s, e) x vocab rows [v0, v1) of
    the weight into z. h [n, D'], w [V, D'], b [V] | None, labs [n] global ids, stats: (lse fp64, H, g, k fp32,
    logp fp32 | None) [n]; rows x cols: the largest dz the plan asks for."""

    def __init__(self, h, w, b, labs, stats, opts: RowOptions, vocab_start: int, rows: int, cols: int,
                 in_place: bool):
        self.h, self.w, self.stats, self.opts, self.v_start = h, w, stats, opts, vocab_start
        self.labs = labs.long()  # the slice-label kernels read int64 ids (the backend API passes int32 on as given)
        dev = h.device
        self.dz = torch.empty(rows * cols, dtype=h.dtype, device=dev)
        # in_place (fp32 inputs, or 16-bit logits after a chunked forward: ``launch.plan``): dz over the logits;
        # else fp32 logits beside the 16-bit dz buffer (a fused forward's lse / H are those of fp32 logits)
        self.logits = None if in_place else torch.empty(rows * cols, dtype=torch.float32, device=dev)
        self.bias = None if b is None else b if in_place else b.float()
        self.cols = torch.empty(rows, dtype=torch.int64, device=dev)
        self.x = torch.empty(rows, dtype=torch.float64, device=dev)

    def view(self, rows: int, cols: int) -> Tensor:
        return self.dz[:rows * cols].view(rows, cols)

    def fill(self, z: Tensor, s: int, e: int, v0: int, v1: int) -> None:
        c, vc = e - s, v1 - v0
        zf = z if self.logits is None else self.logits[:c * vc].view(c, vc)
        logits_into(self.h[s:e], self.w[v0:v1], None if self.bias is None else self.bias[v0:v1], zf)
        lse, H, g, k, lp = (None if x is None else x[s:e] for x in self.stats)
        labs, inv, ig, g0 = self.labs[s:e], float(self.opts.inv_temperature), int(self.opts.ignore_index), \
            self.v_start + v0
        SL.slice_labels(zf, labs, g0, inv, ig, self.cols[:c], self.x[:c])
        (launch,) = ROWS.plan(c, vc, zf.dtype, pass_="bwd", inplace_backward=zf is z)
        # slice-local labels, -1 on masked rows (ignore_index -1: the user's may lie inside [0, vc))
        ROWS._entropy_logprob_bwd_kernel[launch.grid](
            zf, z, self.cols[:c], lse, H, g, k, vc, c, 0, zf.stride(0), 0, z.stride(0), 1, 1, inv, -1,
            BLOCK_V=launch.meta["BLOCK_V"], ROUND_X=ROWS._round_x(), num_warps=launch.num_warps,
            num_stages=launch.num_stages)
        SL.slice_label_fix(z, labs, g0, self.x[:c], lse, H, g, k, lp, inv, ig)
