"""Launchers shared by the two compiled C++ backends (``cpu`` and ``cuda``): both reach the row kernels through
``torch.ops.hero_kernels_cpp`` (csrc/bindings.cpp), which dispatches on the tensors' device, so one Python
launcher serves both; the backends pass in their ops handle and their own knobs (CUDA threads per row, the
dW accumulation, whether dlogits stay in fp32).

Row op:      rows_forward / rows_backward        (logits [N, V] or [B, T, V])
Fused head:  linear_rows_forward / linear_rows_backward (token chunks: GEMM -> row kernel -> GEMMs)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hero_kernels.backends import RowStats, UpstreamGrads, gemm
from hero_kernels.options import RowOptions

__all__ = ["rows_forward", "rows_backward", "logits_chunk", "linear_rows_forward", "linear_rows_backward",
           "linear_vocab_backward"]


def rows_forward(ops, logits: Tensor, labels: Tensor, opts: RowOptions,
                 threads: int = 0, grid: int = 0) -> RowStats:
    """Forward through the compiled row ops ``ops`` (torch.ops.hero_kernels_cpp); shared with the CUDA backend.
    threads / grid: CUDA threads per row block and row blocks, from the CUDA plan (0: the C++ default; ignored
    on CPU)."""
    return RowStats(*ops.entropy_logprob_fwd(logits, labels.reshape(-1), opts.inv_temperature, opts.ignore_index,
                                             threads, grid))


def rows_backward(ops, logits: Tensor, labels: Tensor, saved: RowStats, grads: UpstreamGrads, opts: RowOptions,
                  out: Optional[Tensor] = None, threads: int = 0, grid: int = 0) -> Tensor:
    """Backward through the compiled row ops ``ops`` into ``out`` (allocated when None); saved.lse / saved.H
    and grads [N] as the RowBackend protocol (``hero_kernels.backends``)."""
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    # lse: float64 from rows_forward (an fp32 lse is accepted and widened: the old, ulp(lse)-limited accuracy)
    ops.entropy_logprob_bwd(logits, labels.reshape(-1), saved.lse.to(torch.float64), saved.H, grads.g.reshape(-1),
                            grads.k.reshape(-1), opts.inv_temperature, opts.ignore_index, out, threads, grid)
    return out


def logits_chunk(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """h [c, D] @ weight.T (+ bias) -> [c, V] in h.dtype (torch's CPU GEMMs accumulate in fp32)."""
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def _row_chunks(rows: Optional[Tensor], N: int, step: int):
    """Chunks of ``step`` rows: yields (s, take, put) with take(t) = the chunk's rows of t [N, ...] and
    put(out, v) writing v back to them; ``rows`` from ``compact_rows`` (None: every row, plain slices)."""
    n = N if rows is None else rows.numel()
    for s in range(0, n, step):
        if rows is None:
            sl = slice(s, min(n, s + step))
            # contiguous: as index_select's copies (upstream grads may be stride-0 expands)
            yield s, (lambda t, sl=sl: t[sl].contiguous()), (lambda out, v, sl=sl: out[sl].copy_(v))
        else:
            idx = rows[s:s + step]
            yield (s, (lambda t, idx=idx: t.index_select(0, idx)),
                   (lambda out, v, idx=idx: out.index_copy_(0, idx, v)))


def linear_rows_forward(ops, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions,
                        step: int, threads: int = 0, *, rows: Optional[Tensor]) -> RowStats:
    """The chunk loop shared with the CUDA backend: the rows of ``rows`` (``compact_rows``; None: all, the
    row kernel zeroes masked ones) in chunks of ``step``, each chunk's logits through ``logits_chunk`` and
    the fused row kernel ``ops.entropy_logprob_fwd`` (``threads`` per row block: the CUDA row plan's; 0 on
    CPU). No host sync here."""
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, H = torch.zeros(N, **f32), torch.zeros(N, **f32)
    lse = torch.zeros(N, dtype=torch.float64, device=hidden.device)  # float64: backends/__init__.py RowStats
    for _, take, put in _row_chunks(rows, N, step):
        z = logits_chunk(take(hidden), weight, bias)
        res = ops.entropy_logprob_fwd(z, take(labels), opts.inv_temperature, opts.ignore_index, threads)
        for o, r in zip((logp, H, lse), res):
            put(o, r)
    return RowStats(logp, H, lse)


def linear_rows_backward(ops, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                         saved: RowStats, grads: UpstreamGrads, opts: RowOptions, step: int, *, need_dh: bool,
                         need_dw: bool, fp32_dlogits: bool, accumulate_dw, threads: int = 0,
                         rows: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The chunk loop shared with the CUDA backend: per chunk of valid rows, recompute the logits, turn them
    into dlogits with ``ops.entropy_logprob_bwd``, then dh = dz @ W and dW: the first chunk writes it
    (``gemm.mm_into``, beta = 0: no zero-fill pass over [V, D]), later ones ``accumulate_dw(dW, dz, h)``.

    fp32_dlogits: 16-bit logits get their dlogits in a separate fp32 buffer (so the grad_weight GEMM sees
    unrounded values); otherwise dlogits overwrite the logits chunk in place.
    grad_weight / grad_bias accumulate in fp32 (fp64 for fp64 weights) and are cast at the end.
    saved.logp is not read: the row kernels see whole rows and get 1 - p_y right themselves.
    """
    V, D = weight.shape
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n = hidden.shape[0] if rows is None else rows.numel()
    alloc = torch.empty if n else torch.zeros  # no chunk to write them: zeros
    grad_hidden = torch.zeros_like(hidden) if need_dh else None
    dW = alloc((V, D), dtype=acc, device=weight.device) if need_dw else None
    db = alloc(V, dtype=acc, device=weight.device) if (bias is not None and need_dw) else None
    for s, take, put in _row_chunks(rows, hidden.shape[0], step):
        h = take(hidden)
        z = logits_chunk(h, weight, bias)
        wide = fp32_dlogits and z.dtype not in (torch.float32, torch.float64)
        dz = torch.empty(z.shape, dtype=torch.float32, device=z.device) if wide else z
        # lse float64 (an fp32 one is widened: the old, ulp(lse)-limited accuracy)
        ops.entropy_logprob_bwd(z, take(labels), take(saved.lse).to(torch.float64), take(saved.H), take(grads.g),
                                take(grads.k), opts.inv_temperature, opts.ignore_index, dz, threads)
        if grad_hidden is not None:
            dz_w = dz if dz.dtype == weight.dtype else dz.to(weight.dtype)
            put(grad_hidden, (dz_w @ weight).to(hidden.dtype))
        if dW is not None:
            if s == 0:
                gemm.mm_into(dz.t(), h if h.dtype == dz.dtype else h.to(dz.dtype), dW)
            else:
                accumulate_dw(dW, dz, h)
        if db is not None:
            torch.sum(dz, 0, dtype=acc, out=db) if s == 0 else db.add_(dz.sum(0, dtype=acc))
    z = dz = h = None  # the last chunk is freed before dW's cast (the CUDA plan's memory model counts on it)
    return (grad_hidden, None if dW is None else dW.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


class _SliceDz:
    """dz of a vocab slice through the whole-row C++ / CUDA kernels (``gemm.vocab_grads``' producer): the
    logits [n, vc] = h @ W[slice].T (+ bias) by one GEMM over all n rows into the [n, cols] buffer, then in place
    ``ops.entropy_logprob_slice_labels`` (each row's label moved into the slice: its label column when the label
    is in the slice, else column 0; that column's logit saved before dz overwrites it),
    ``ops.entropy_logprob_bwd`` and ``ops.entropy_logprob_slice_label_fix`` (that one column per row rewritten
    from saved.logp: the row kernel's label term would sum p over the slice only; logp None: the old
    1 - e^{x_y - lse}). h, y, lse (fp64), H, g, k, logp | None: [n] rows as the kernels take them."""

    def __init__(self, ops, h, w, b, y, stats, opts: RowOptions, cols: int, threads):
        self.ops, self.h, self.w, self.b, self.y, self.stats, self.threads = ops, h, w, b, y, stats, threads
        self.inv, self.ig = float(opts.inv_temperature), opts.ignore_index
        n, dev = h.shape[0], h.device
        self.buf = torch.empty(n * min(cols, w.shape[0]), dtype=h.dtype, device=dev)
        self.cols_y, self.x_y = torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, dtype=torch.float64,
                                                                                           device=dev)

    def view(self, rows: int, cols: int) -> Tensor:
        return self.buf[:rows * cols].view(rows, cols)

    def fill(self, z: Tensor, s: int, e: int, v0: int, v1: int) -> None:
        # the producer of whole slices (gemm.vocab_grads with C = n): s = 0, e = n
        w_s, (lse, H, g, k, lp), inv, ig = self.w[v0:v1], self.stats, self.inv, self.ig
        if self.b is not None:
            torch.addmm(self.b[v0:v1], self.h, w_s.t(), out=z)
        else:
            torch.mm(self.h, w_s.t(), out=z)
        # The row kernel sees slice-local labels in [0, vc) and -1 (its ignore_index here) on masked rows: the
        # user's ignore_index may itself lie in [0, vc) (e.g. a pad id), where it would zero real rows.
        self.ops.entropy_logprob_slice_labels(z, self.y, v0, inv, ig, self.cols_y, self.x_y)
        self.ops.entropy_logprob_bwd(z, self.cols_y, lse, H, g, k, inv, -1, z, self.threads(v1 - v0))
        self.ops.entropy_logprob_slice_label_fix(z, self.y, v0, self.x_y, lse, H, g, k, lp, inv, ig)


def linear_vocab_backward(ops, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                          saved: RowStats, grads: UpstreamGrads, opts: RowOptions, cols: int, *, need_dh: bool,
                          need_dw: bool, threads, rows: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The "vocab" loop order (``hero_kernels.backends.gemm``) through the whole-row kernels: per slice of
    ``cols`` vocab rows, dz [n, vc] over all n valid rows by ``_SliceDz`` (one GEMM and three launches), then
    ``gemm.vocab_grads``: dW[slice] = dz^T h, ONE GEMM written once in weight.dtype, and dh += dz W[slice] into
    fp32 [n, D] (one slice: written once). No fp32 [V, D]. threads(vc): the row kernel's threads for a slice
    width (0 on CPU)."""
    # contiguous per-row vectors, as index_select's copies (upstream grads may be stride-0 expands)
    take = (lambda t: t.contiguous()) if rows is None else (lambda t: t.index_select(0, rows))
    h, y = (hidden if rows is None else take(hidden)), take(labels)
    stats = (take(saved.lse).to(torch.float64), take(saved.H), take(grads.g), take(grads.k),
             None if saved.logp is None else take(saved.logp))
    n = h.shape[0]
    dh, dW, db = gemm.vocab_grads(h, weight, bias is not None,
                                  lambda: _SliceDz(ops, h, weight, bias, y, stats, opts, cols, threads), n, cols,
                                  hidden.dtype, need_dh, need_dw)
    grad_hidden = dh if (dh is None or rows is None) else torch.zeros_like(hidden).index_copy_(0, rows, dh)
    return grad_hidden, dW, (None if db is None else db.to(bias.dtype))
