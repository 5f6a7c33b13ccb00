"""The chunked GEMM backward shared by the GPU launchers of the fused LM head (Triton and CUDA backends).

Per chunk of C valid rows: logits [C, V] = h_c @ W.T (+ b) by one GEMM in the input dtype, the backend's row
kernel turns them into dz IN PLACE, then dh_c = dz @ W (one GEMM, fp32 accumulate, written once) and
dW += dz^T @ h_c (one GEMM with an fp32 C operand and beta = 1: the fp32 [V, D] accumulator is read and
written once per chunk, inside the GEMM's epilogue). C comes from a memory budget (``chunk_rows``).
Shapes: h [n, D], weight [V, D], dz [C, V] (input dtype), dW fp32 [V, D].

Two loop orders (``backward_order``), chosen per shape by the memory model (``backward_memory``):
  "rows"  (above) vocab-wide chunks of C rows: dW needs an fp32 [V, D] accumulator (4 V D bytes, plus its
          cast to the weight dtype at the end: 2.1 GB + 1.05 GB at V=128256, D=4096 bf16).
  "vocab" slices of Vc vocab columns over ALL n rows, outer: dz [n, Vc], then dW[slice] = dz^T @ h is ONE
          GEMM over all rows (fp32 accumulation inside it, written once in the weight dtype: no fp32
          [V, D] anywhere) and dh += dz @ W[slice] into an fp32 [n, D] accumulator (4 n D bytes), cast once
          at the end. Needs a dz producer that works on a vocab slice: the Triton dz kernel does (like a
          vocab shard); the CUDA backend runs its whole-row kernel on the slice and rewrites the one label
          column per row from the forward's logp (``cpp_launch.linear_vocab_backward``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from hero_kernels.backends.plan import KernelLaunch

__all__ = ["as_dtype", "eager_peak_bytes", "memory_budget", "chunk_rows", "accumulate_dw", "accumulate_mm",
           "mm_into", "chunk_grads", "slice_grads", "chunked_backward_plan", "vocab_backward_plan", "compaction_plan",
           "vocab_cols", "slice_label_plan", "SLICE_LABELS_ROW_BYTES", "SLICE_FIX_ROW_BYTES", "has_fp32_out_gemm",
           "backward_memory", "backward_order", "CHUNK_MEMORY_SHARE", "CHUNK_MIN_ROWS", "VOCAB_MIN_COLS"]

#: Chunk: extra memory <= this share of eager's peak (``eager_peak_bytes``) where possible ...
CHUNK_MEMORY_SHARE = 0.02
#: ... but at least this many rows, so the dW GEMM's fp32 read-modify-write of [V, D] per chunk (8 V D
#: bytes) stays under its 2 C V D FLOPs on an H100 (C >= 4 * 989e12 / 3.35e12 = 1181).
CHUNK_MIN_ROWS = 1280
#: The budget's chunk rows are rounded down to a multiple of this (GEMM tiles).
CHUNK_ALIGN = 256
#: "vocab" order: at least this many columns per slice, so the dh GEMM's fp32 read-modify-write of [n, D]
#: per slice (8 n D bytes) stays under its 2 n Vc D FLOPs on an H100 (the same bound as CHUNK_MIN_ROWS).
VOCAB_MIN_COLS = 1280
#: Per-row fp32 / fp64 statistics the backward keeps (lse, H, g, k, label term, c; ~48 bytes a row).
_ROW_STAT_BYTES = 48


_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def as_dtype(dtype) -> torch.dtype:
    """A plan's dtype argument (torch.dtype or a name such as "bf16" / "bfloat16") as a torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be bf16, fp16 or fp32 (a torch.dtype or its name), got {dtype!r}")
    return _DTYPE_NAMES[name]


def eager_peak_bytes(N: int, V: int, elem: int) -> int:
    """A LOWER bound of eager PyTorch's materialized peak for fwd+bwd of this op: the [N, V] logits in the
    input dtype, the fp32 log-softmax saved for backward and the fp32 gradient of the logits."""
    return N * V * (elem + 8)


def memory_budget(n: int, V: int, elem: int) -> int:
    """Bytes the backward may hold beyond its inputs and the gradients it returns: CHUNK_MEMORY_SHARE of
    eager's lower bound (``eager_peak_bytes``; eager returns the same gradients on top of it)."""
    return int(CHUNK_MEMORY_SHARE * eager_peak_bytes(n, V, elem))


def chunk_rows(n: int, D: int, V: int, elem: int, forced: Optional[int] = None, *, row_bytes: Optional[int] = None,
               min_rows: int = CHUNK_MIN_ROWS) -> int:
    """Rows C per chunk for n valid rows. Extra memory per row (row_bytes): by default the [C, V] logits / dz
    buffer and the [C, D] hidden rows of the chunk (both in the input dtype). min_rows: the floor (a chunk
    without a dW GEMM, e.g. a forward's, needs no CHUNK_MIN_ROWS)."""
    if forced is not None:
        return max(1, min(n, forced))
    c = memory_budget(n, V, elem) // (row_bytes or (V + D) * elem)
    c = max(min_rows, c - c % CHUNK_ALIGN)
    if c >= n:
        return max(1, n)
    # Even chunks (multiples of 16 rows): no short tail chunk whose dW pass would be memory-bound.
    chunks = -(-n // c)
    return min(c, -(-(-(-n // chunks)) // 16) * 16)


def vocab_cols(n: int, D: int, V: int, elem: int, *, need_dh: bool = True, has_bias: bool = False,
               forced: Optional[int] = None, logits_elem: int = 0) -> int:
    """Columns Vc per vocab slice of the "vocab" order: what the budget leaves after the fp32 dh accumulator
    (4 n D), db and the row statistics, spent on the [n, Vc] dz buffer (and a separate [n, Vc] logits buffer
    of logits_elem bytes per element, ``backward_memory``); a multiple of CHUNK_ALIGN, at least
    VOCAB_MIN_COLS, at most V."""
    if forced is not None:
        return max(1, min(V, forced))
    fixed = (4 * n * D if need_dh else 0) + (4 * V if has_bias else 0) + _ROW_STAT_BYTES * n
    c = (memory_budget(n, V, elem) - fixed) // max(n * (elem + logits_elem), 1)
    return min(V, max(VOCAB_MIN_COLS, c - c % CHUNK_ALIGN))


def _pad16(x: int) -> int:
    return -(-x // 16) * 16


def backward_memory(order: str, n: int, D: int, V: int, elem: int, C: int, Vc: int, *, need_dh: bool = True,
                    need_dw: bool = True, has_bias: bool = False, dh_elem: Optional[int] = None,
                    chunk_row_bytes: int = 0, copies: int = 0, logits_elem: int = 0) -> Dict[str, int]:
    """Bytes the chunked backward holds beyond its inputs and the gradients it returns, per phase:
    {"loop": while the chunks / slices run, "final": during the last cast}. dh_elem: bytes per element of
    grad_hidden (default elem). chunk_row_bytes: other per-row temporaries of a chunk (the CUDA path's
    hidden-row copy and dh product); copies: input copies alive throughout (gathered / padded hidden, a
    copied weight). The dz buffer rows are padded to 16 columns (the Triton launcher's). logits_elem: bytes per
    element of a separate logits buffer the dz producer reads (the Triton chunked design's fp32 cuBLAS logits
    beside a 16-bit dz; 0: dz made in place or by a fused kernel): [C, V] in "rows", [n, Vc] in "vocab" (one
    logits GEMM over all rows per slice).
    "rows": the [C, V] buffer + the fp32 dW [V, D] (unless the weight is fp32: then it is the output), and
    in the final cast the fp32 dW while its cast (returned) exists.
    "vocab": the [n, Vc] buffer + the fp32 dh [n, D] (none with one slice: dh is written once), nothing of
    [V, D] size: each dW slice is written once in the weight dtype; final: the fp32 dh while it is cast."""
    dh_elem = elem if dh_elem is None else dh_elem
    small = (4 * V if (has_bias and need_dw) else 0) + _ROW_STAT_BYTES * n + copies
    if order == "rows":
        acc = 4 * V * D if (need_dw and elem != 4) else 0
        return {"loop": C * (_pad16(V) * elem + chunk_row_bytes + V * logits_elem) + acc + small,
                "final": acc + copies}
    if order != "vocab":
        raise ValueError(f"order must be 'rows' or 'vocab', got {order!r}")
    acc = 4 * n * D if (need_dh and dh_elem != 4 and Vc < V) else 0
    return {"loop": n * (_pad16(Vc) * elem + Vc * logits_elem) + acc + small, "final": acc + copies}


def backward_order(n: int, D: int, V: int, elem: int, *, need_dh: bool = True, need_dw: bool = True,
                   has_bias: bool = False, forced_rows: Optional[int] = None, forced_cols: Optional[int] = None,
                   vocab_ok: bool = True, logits_elem: int = 0, **memory_kw) -> Tuple[str, int, int]:
    """(order, C, Vc) of the chunked backward for n valid rows, by the memory model (``backward_memory``):
    "vocab" where its peak is smaller than "rows"' (n < V with dW wanted, i.e. every LLM training shape),
    else "rows" (Vc = V). C also sizes the "vocab" order's dz launches (row chunks whose hidden rows stay in
    L2). forced_cols: "vocab" with slices of that many columns; forced_rows alone: "rows" (a config that
    forces the chunk). vocab_ok False: the backend has no vocab-slice dz producer. Both orders cost the
    same 6 n D V FLOPs; "vocab" moves fewer bytes (no [V, D] fp32 pass). logits_elem: a separate logits buffer
    beside the dz buffer (``backward_memory``), which the chunk and the slice are sized to fit in the budget."""
    C = chunk_rows(n, D, V, elem, forced_rows, row_bytes=(V + D) * elem + V * logits_elem)
    if not vocab_ok or n <= 0:
        return "rows", C, V
    if forced_cols is not None:
        return "vocab", C, vocab_cols(n, D, V, elem, forced=forced_cols)
    if forced_rows is not None or not need_dw:  # no fp32 dW to avoid: "vocab" would only add the dh acc
        return "rows", C, V
    Vc = vocab_cols(n, D, V, elem, need_dh=need_dh, has_bias=has_bias, logits_elem=logits_elem)
    kw = dict(need_dh=need_dh, need_dw=need_dw, has_bias=has_bias, logits_elem=logits_elem, **memory_kw)
    rows = max(backward_memory("rows", n, D, V, elem, C, V, **kw).values())
    vocab = max(backward_memory("vocab", n, D, V, elem, C, Vc, **kw).values())
    return ("vocab", C, Vc) if vocab < rows else ("rows", C, V)


#: Does this torch run a 16-bit GEMM with an fp32 output (``out_dtype``; CUDA builds only)? Per call form:
#: "ok" = torch.mm(..., out_dtype), "addmm" = torch.addmm(C, ..., out_dtype, out=C). None = untried.
OUT_DTYPE_MM = {"ok": None, "addmm": None}


def has_fp32_out_gemm() -> bool:
    """Does this torch have the 16-bit GEMM with an fp32 output at all (aten ``mm.dtype_out``, torch >= 2.8; its
    CUDA builds run it)? Without it ``mm_into`` upcasts whole operands, so a design whose cuBLAS GEMM writes fp32
    logits from 16-bit operands would copy the [V, D] weight to fp32 per call and run at the fp32 peak."""
    return "dtype_out" in torch.ops.aten.mm.overloads()


def _out_dtype_call(key: str, fn) -> bool:
    """Run ``fn`` (a GEMM with out_dtype=float32) unless it is known not to work; False where torch lacks
    it (argument checks fail before any write). An error after a first success is a real error."""
    if OUT_DTYPE_MM.get(key) is False:
        return False
    try:
        fn()
    except (RuntimeError, TypeError, NotImplementedError):
        if OUT_DTYPE_MM.get(key):
            raise
        OUT_DTYPE_MM[key] = False
        return False
    OUT_DTYPE_MM[key] = True
    return True


def accumulate_mm(out: Tensor, a: Tensor, b: Tensor, slice_rows: int = 16384) -> None:
    """out (fp32 / fp64) += a @ b without rounding partial sums to a's dtype. a [M, K], b [K, P], out [M, P].

    16-bit inputs: one cuBLAS GEMM with bf16 / fp16 operands and the fp32 ``out`` as C (beta = 1, fp32
    output; ``torch.addmm(..., out_dtype=float32, out=out)``). Where torch lacks ``out_dtype`` (CPU builds)
    the operands are upcast ``slice_rows`` rows of ``out`` at a time (correct, slower; bounded memory).
    """
    if a.dtype == out.dtype:
        out.addmm_(a, b.to(out.dtype))
        return
    if out.dtype == torch.float32 and _out_dtype_call(
            "addmm", lambda: torch.addmm(out, a, b, out_dtype=torch.float32, out=out)):
        return
    b_up = b.to(out.dtype)
    for r0 in range(0, out.shape[0], slice_rows):
        out[r0:r0 + slice_rows].addmm_(a[r0:r0 + slice_rows].to(out.dtype), b_up)


def accumulate_dw(dW: Tensor, dz: Tensor, h: Tensor, slice_rows: int = 16384) -> None:
    """dW (fp32 / fp64) += dz^T @ h (``accumulate_mm``). dz [C, V], h [C, D]."""
    accumulate_mm(dW, dz.t(), h, slice_rows)


def mm_into(a: Tensor, b: Tensor, out: Tensor, slice_rows: int = 16384) -> None:
    """out = a @ b with fp32 accumulation, written once in out.dtype (a 16-bit GEMM straight into an fp32
    ``out`` where torch offers ``out_dtype``; else upcast operands, ``slice_rows`` rows of a at a time)."""
    if out.dtype == a.dtype:
        torch.mm(a, b.to(out.dtype), out=out)  # b in out's dtype, as accumulate_mm (a no-op when it already is)
    elif out.dtype == torch.float32 and _out_dtype_call(
            "ok", lambda: torch.mm(a, b, out_dtype=torch.float32, out=out)):
        return
    else:
        b_up = b.to(out.dtype)
        for r0 in range(0, a.shape[0], slice_rows):
            torch.mm(a[r0:r0 + slice_rows].to(out.dtype), b_up, out=out[r0:r0 + slice_rows])


def chunk_grads(dz: Tensor, h_c: Tensor, weight: Tensor, dh: Optional[Tensor], dW: Optional[Tensor],
                db: Optional[Tensor], first: bool) -> None:
    """The GEMM half of one chunk: dh = dz @ W (written once into the chunk's rows ``dh``), dW (+)= dz^T h_c and
    db (+)= column sums of dz, in fp32; ``first``: the first chunk writes dW / db (beta = 0, no zero-fill pass).
    dz [C, V] and h_c [C, D] in the input dtype, weight [V, D]; None skips a gradient."""
    if dh is not None:
        mm_into(dz, weight, dh)
    if dW is not None:
        mm_into(dz.t(), h_c, dW) if first else accumulate_dw(dW, dz, h_c)
    if db is not None:
        torch.sum(dz, 0, dtype=torch.float32, out=db) if first else db.add_(dz.sum(0, dtype=torch.float32))



def slice_grads(dz: Tensor, h: Tensor, w_s: Tensor, dh: Optional[Tensor], dW_s: Optional[Tensor],
                db_s: Optional[Tensor], first: bool) -> None:
    """The GEMM half of one vocab slice (the "vocab" order): dh (+)= dz @ W[slice] into the [n, D] accumulator
    (``first``: the first slice writes it), dW[slice] = dz^T h written once (one GEMM over all n rows), and
    db[slice] = column sums of dz in fp32. dz [n, vc], h [n, D] in the input dtype; None skips a gradient."""
    if dh is not None:
        mm_into(dz, w_s, dh) if first else accumulate_mm(dh, dz, w_s)
    if dW_s is not None:
        mm_into(dz.t(), h, dW_s)
    if db_s is not None:
        torch.sum(dz, 0, dtype=torch.float32, out=db_s)

def vocab_grads(h: Tensor, w: Tensor, has_bias: bool, make_dz, C: int, Vc: int, gh_dtype, need_dh: bool,
                need_dw: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The "vocab" loop order of a backward (module docstring), whatever makes dz: per slice of Vc vocab rows,
    dz [n, vc] from the producer ``make_dz()`` (``view(rows, cols)``: its [rows, cols] dz buffer; ``fill(z, s, e,
    v0, v1)``: dz of rows [s, e) x vocab rows [v0, v1) into z) in row chunks of C, then ``slice_grads`` over all
    n rows: dh (+)= dz @ W[slice] into an fp32 [n, D] accumulator (gh_dtype itself when it is fp32 or there is
    one slice), dW[slice] = dz^T h written once in w.dtype (no fp32 [V, D]), db[slice] fp32.
    h [n, D], w [V, D]. Returns (dh [n, D] gh_dtype | None, dW [V, D] w.dtype | None, db [V] fp32 | None).
    The producer is made here, so its buffers are freed before dh's cast (the memory model's "final" phase)."""
    n, D = h.shape
    V = w.shape[0]
    dz = make_dz()
    acc = None
    if need_dh:
        acc_dtype = gh_dtype if (Vc >= V or gh_dtype == torch.float32) else torch.float32
        acc = torch.empty((n, D), dtype=acc_dtype, device=h.device)
    dW = torch.empty((V, D), dtype=w.dtype, device=h.device) if need_dw else None
    db = torch.empty((V,), dtype=torch.float32, device=h.device) if (need_dw and has_bias) else None
    for v0 in range(0, V, Vc):
        v1 = min(V, v0 + Vc)
        z = dz.view(n, v1 - v0)
        for s in range(0, n, C):
            dz.fill(z[s:min(n, s + C)], s, min(n, s + C), v0, v1)
        slice_grads(z, h, w[v0:v1], acc, None if dW is None else dW[v0:v1], None if db is None else db[v0:v1],
                    first=v0 == 0)
    del dz, z
    return (None if acc is None else acc.to(gh_dtype)), dW, db


def _with_memory(launches: List[KernelLaunch], memory: Optional[Dict[str, int]],
                 final: str) -> List[KernelLaunch]:
    """Stamp ``backward_memory``'s phases on a backward plan: the final cast entry ``final`` gets
    memory["final"], every other entry memory["loop"]."""
    if memory is None:
        return launches
    return [dataclasses.replace(k, live_bytes=memory["final" if k.name == final else "loop"]) for k in launches]


def chunked_backward_plan(n: int, D: int, V: int, elem: int, C: int, dz_launches, *, has_bias: bool,
                          need_dh: bool, need_dw: bool, dw_zeroed: bool = False,
                          memory: Optional[Dict[str, int]] = None) -> List[KernelLaunch]:
    """Plan of the chunked backward for n valid rows in chunks of C (equal chunks repeated, then the tail).

    dz_launches(c, reps) -> the backend's launches that leave dz [c, V] (input dtype) in the chunk buffer.
    dw_zeroed: the launcher zero-fills dW first, so every chunk's dW GEMM accumulates.
    Byte model: the [C, V] chunk (C V e bytes, ~0.4 GB at the flagship shape) is far beyond 50 MB of L2, so
    each GEMM reading it reads it from HBM; W [V, D] is streamed once per GEMM that reads it; the fp32 dW
    is read and written once per chunk inside the dW GEMM (beta = 1), written once by the first chunk.
    memory: ``backward_memory("rows", ...)``, stamped on the entries as ``live_bytes``.
    """
    out: List[KernelLaunch] = []
    note = ("cuBLAS: operands streamed once per GEMM (its tile swizzle keeps reuse in L2); the [C, V] chunk "
            "does not fit in 50 MB of L2")
    sizes = [(C, n // C)] + ([(n % C, 1)] if n % C else [])
    first = not dw_zeroed
    for c, reps in sizes:
        if reps == 0:
            continue
        cv = c * V * elem
        out += dz_launches(c, reps)
        if need_dh:
            out.append(KernelLaunch("cublas_dh", (), "gemm", 2.0 * c * D * V, cv + V * D * elem + c * D * 4,
                                    note, meta={"chunk_rows": c}, external=True, repeats=reps))
        if need_dw:
            # The first chunk writes dW (beta = 0): 4 V D bytes; every later one reads and writes it.
            for r, acc in ((1, not first), (reps - 1, True)):
                if r:
                    out.append(KernelLaunch("cublas_dw", (), "gemm", 2.0 * c * D * V,
                                            cv + c * D * elem + (8 if acc else 4) * V * D,
                                            note + "; fp32 dW in the GEMM's epilogue", meta={"chunk_rows": c},
                                            external=True, repeats=r))
            if has_bias:
                out.append(KernelLaunch("db_sum", (), "stream", 0.0, cv + 8 * V, "column sums of the chunk",
                                        external=True, repeats=reps))
        first = False
    if need_dw and elem != 4:
        out.append(KernelLaunch("dw_cast", (), "stream", 0.0, V * D * (4 + elem), "fp32 dW -> weight dtype",
                                external=True))
    return _with_memory(out, memory, "dw_cast")


def _sizes(total: int, step: int) -> List[Tuple[int, int]]:
    """[(step, full steps), (tail, 1)] without empty entries."""
    return [(s, r) for s, r in ((step, total // step), (total % step, 1)) if s and r]


def vocab_backward_plan(n: int, D: int, V: int, elem: int, C: int, Vc: int, dz_launches, *, has_bias: bool,
                        need_dh: bool, need_dw: bool, dh_elem: int, memory: Optional[Dict[str, int]] = None
                        ) -> List[KernelLaunch]:
    """Plan of the "vocab" order (module docstring): per slice of Vc columns (equal slices, then the tail),
    dz [n, Vc] from the backend's launches in row chunks of C (``dz_launches(c, vc, reps)``), then over all
    n rows: cuBLAS dh (+)= dz @ W[slice] (fp32 [n, D]: the first slice writes it, later ones read and write
    it in the GEMM's epilogue; one slice writes dh once in its own dtype) and dW[slice] = dz^T @ h (one
    GEMM, K = n, written once in the weight dtype), db[slice] = column sums; last, the fp32 dh's cast.
    Bytes: the [n, Vc] buffer is far beyond 50 MB of L2 (read from HBM by each GEMM); W[slice] once per
    GEMM reading it; h [n, D] once per dW GEMM."""
    note = ("cuBLAS over all n rows of a vocab slice: operands streamed once per GEMM; the [n, Vc] dz slice "
            "does not fit in 50 MB of L2")
    slices = -(-V // Vc)
    out: List[KernelLaunch] = []
    first = True
    for vc, reps in _sizes(V, Vc):
        nv = n * vc * elem
        for c, creps in _sizes(n, C):
            out += dz_launches(c, vc, reps * creps)
        meta = {"vocab_cols": vc, "order": "vocab"}
        if need_dh:
            for r, acc in ((1, not first), (reps - 1, True)):
                if r:
                    dh_bytes = (8 if acc else 4) * n * D if slices > 1 else n * D * dh_elem
                    out.append(KernelLaunch("cublas_dh", (), "gemm", 2.0 * n * vc * D, nv + vc * D * elem + dh_bytes,
                                            note + ("; fp32 dh in the GEMM's epilogue" if slices > 1 else ""),
                                            meta=meta, external=True, repeats=r))
        if need_dw:
            out.append(KernelLaunch("cublas_dw", (), "gemm", 2.0 * n * vc * D, nv + n * D * elem + vc * D * elem,
                                    note + "; dW slice written once in the weight dtype", meta=meta,
                                    external=True, repeats=reps))
            if has_bias:
                out.append(KernelLaunch("db_sum", (), "stream", 0.0, nv + 4 * vc, "column sums of the slice",
                                        meta=meta, external=True, repeats=reps))
        first = False
    if need_dh and slices > 1 and dh_elem != 4:
        out.append(KernelLaunch("dh_cast", (), "stream", 0.0, n * D * (4 + dh_elem), "fp32 dh -> grad dtype",
                                external=True))
    return _with_memory(out, memory, "dh_cast")


#: HBM bytes per row of the "vocab" order's slice-label launch (one thread per row, the CUDA and Triton
#: backends alike): label 8, one 32-byte sector of the logits (rows are far apart: one sector each), the slice
#: label and x written 8 + 8 ...
SLICE_LABELS_ROW_BYTES = 56
#: ... and of the label-column rewrite: label, x, lse 8 each, H, g, k, logp 4 each, and the dz sector read and
#: written back (a partial-sector write) 2 x 32.
SLICE_FIX_ROW_BYTES = 104


def slice_label_plan(names: Tuple[str, str], n: int, grid: Tuple[int, ...], num_warps: int, meta: Dict,
                     reps: int) -> Tuple[KernelLaunch, KernelLaunch]:
    """The two launches around a row kernel that runs on a vocab slice of n rows (``names``: the backend's
    slice-label and label-fix kernels): each row's label moved into the slice (its logit saved), then that one
    column per row rewritten from the forward's logp (the row kernel's label term sums over the slice only)."""
    note = "one thread per row; [n] vectors and one logits sector per row"
    return (KernelLaunch(names[0], grid, "stream", 0.0, SLICE_LABELS_ROW_BYTES * n, note, num_warps=num_warps,
                         meta=meta, repeats=reps),
            KernelLaunch(names[1], grid, "stream", 0.0, SLICE_FIX_ROW_BYTES * n, note, num_warps=num_warps,
                         meta=meta, repeats=reps))


def compaction_plan(total_rows: Optional[int], n: int, D: int, elem: int, pass_: str) -> List[KernelLaunch]:
    """What the fused heads' masked-row compaction costs when ``total_rows`` > n (n valid rows kept): one
    ``nonzero`` over the labels (a host sync: the grids depend on n), gathers of the valid rows' hidden
    states and labels, and the scatter of the results back to [total_rows] (forward: logp, H, lse; backward:
    the per-row stats gathered, dh [n, D] scattered into a zero-filled [total_rows, D]). Nothing when every
    row is valid (or total_rows is None: the caller did not say)."""
    if total_rows is None or total_rows <= n:
        return []
    N = total_rows
    note = "masked-row compaction (torch ops): every byte once through HBM"
    out = [KernelLaunch("compact_rows", (), "stream", 0.0, 8 * N + 8 * n, note + "; nonzero syncs the host",
                        external=True, host_sync=True),
           KernelLaunch("gather_rows", (), "stream", 0.0, 2 * n * D * elem + 16 * n, note + "; hidden + labels",
                        external=True)]
    if pass_ == "fwd":
        out.append(KernelLaunch("scatter_outputs", (), "stream", 0.0, 3 * (4 * N + 8 * n), note + "; logp, H, lse",
                                external=True))
    else:
        out.append(KernelLaunch("gather_stats", (), "stream", 0.0, 5 * 8 * n, note + "; lse, H, g, k, logp",
                                external=True))
        out.append(KernelLaunch("scatter_dh", (), "stream", 0.0, (N + 2 * n) * D * elem,
                                note + "; zero-filled [N, D] + index_copy of dh", external=True))
    return out
