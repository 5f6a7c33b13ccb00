"""The label column of a row kernel run on a vocab SLICE (Triton): two one-thread-per-row kernels around it.

The fused head's chunked backward (``linear/chunked.py``) runs ``entropy_logprob``'s Triton row backward on
the logits (fp32, or 16-bit with dz in place) of a vocab range [v0, v0 + vc) of every row: a slice of the "vocab" loop order, or the whole
vocabulary of a shard whose global ids start at v0. The row kernel treats its input as whole rows, so its
label term (1 - p_y from the sum over the row) is wrong there. As the CUDA backend's ops (csrc/hero_rowmath.h
``slice_col`` / ``slice_fix``, ``cpp_launch.linear_vocab_backward``):

``_slice_labels_kernel`` (before the row kernel): per row the slice-local label handed to the row kernel,
    -1 on masked rows (the row kernel then runs with ignore_index -1: the user's ignore_index may be a
    vocabulary id inside [0, vc)), y - v0 when the label is in the slice, else 0 (a stand-in column); and that
    column's x = z / tau in fp64, rounded in fp32 exactly as the row kernel rounds it (``_scale``).
``_slice_label_fix_kernel`` (after it): that one column per row rewritten in fp64 from the saved stats:
    the label, (1/tau) [g (1 - p_y) - k p_y (log p_y + H)] with log p_y = the forward's logp when given
    (accurate as p_y -> 1, where the row's other columns are not all in the slice) and 1 - p_y =
    -expm1(log p_y); a stand-in column, the ordinary -(1/tau) p (g + k (log p + H)). Masked rows untouched.

Shapes: z / dz [n, vc] (last-dim stride 1, any row stride), labels [n] int64 (global ids), cols [n] int64,
x [n] fp64, lse [n] fp64, H, g, k, logp [n] fp32 (contiguous).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from hero_kernels.backends import gemm
from hero_kernels.backends.plan import KernelLaunch
from hero_kernels.backends.triton import entropy_logprob as ROWS
from hero_kernels.backends.triton.entropy_logprob import _scale

__all__ = ["slice_labels", "slice_label_fix", "plan", "KERNEL_CONFIGS", "compile_attrs", "BLOCK", "NUM_WARPS"]

#: Rows per program and warps of both kernels (one row per thread, two per thread at 4 warps).
BLOCK, NUM_WARPS = 256, 4
#: Below this |log p| the fp64 series of expm1 (five terms, relative error < 1e-18) replaces 1 - e^{log p},
#: which loses log10(1 / |log p|) of fp64's digits (the interpreter has no libdevice expm1).
_EXPM1_SERIES = tl.constexpr(1e-3)


@triton.jit
def _neg_expm1(x):
    """1 - e^x = -expm1(x) in fp64 for x <= 0 (log p), to fp64 relative accuracy near 0."""
    s = tl.where(tl.abs(x) < _EXPM1_SERIES, x, 0.0)  # the series on small |x| only (no inf * inf lanes)
    series = -s * (1.0 + s * (0.5 + s * (1.0 / 6.0 + s * (1.0 / 24.0 + s * (1.0 / 120.0)))))
    return tl.where(tl.abs(x) < _EXPM1_SERIES, series, 1.0 - tl.exp(x))


@triton.jit
def _rows(labels_ptr, n, vc, v0, BLOCK: tl.constexpr):
    """(rows, row < n, label, label in [v0, v0 + vc)) of this program's BLOCK rows."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n
    y = tl.load(labels_ptr + rows, mask=live, other=0)
    return rows, live, y, (y >= v0) & (y < v0 + vc)


@triton.jit(do_not_specialize=["v0", "inv_temp", "ignore_index"])
def _slice_labels_kernel(
    z_ptr,  # [n, vc] logits of the slice (fp32, or the 16-bit input dtype), last-dim stride 1
    labels_ptr,  # [n] int64 global label ids
    cols_ptr,  # [n] int64 out: the row kernel's slice-local label (-1: masked)
    x_ptr,  # [n] fp64 out: that column's z / tau as the row kernel rounds it (0 on masked rows)
    n, vc, stride_z, v0, inv_temp, ignore_index,  # v0: the global id of the slice's first column
    BLOCK: tl.constexpr,
    ROUND_X: tl.constexpr,
):
    rows, live, y, inside = _rows(labels_ptr, n, vc, v0, BLOCK)
    masked = y == ignore_index
    col = tl.where(masked, -1, tl.where(inside, y - v0, 0))
    z = tl.load(z_ptr + rows.to(tl.int64) * stride_z + tl.maximum(col, 0), mask=live & ~masked, other=0.0)
    x = _scale(z.to(tl.float32), tl.cast(inv_temp, tl.float32), ROUND_X)
    tl.store(cols_ptr + rows, col.to(tl.int64), mask=live)
    tl.store(x_ptr + rows, tl.where(masked, 0.0, x.to(tl.float64)), mask=live)


@triton.jit(do_not_specialize=["v0", "inv_temp", "ignore_index"])
def _slice_label_fix_kernel(
    dz_ptr,  # [n, vc] dz of the slice (input dtype), last-dim stride 1: one column per row rewritten
    labels_ptr,  # [n] int64 global label ids
    x_ptr,  # [n] fp64 from _slice_labels_kernel
    lse_ptr,  # [n] fp64
    ent_ptr,  # [n] fp32
    g_ptr,  # [n] fp32
    k_ptr,  # [n] fp32
    logp_ptr,  # [n] fp32 the forward's log p(label) (read when HAS_LOGP)
    n, vc, stride_dz, v0, inv_temp, ignore_index,
    HAS_LOGP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, live, y, inside = _rows(labels_ptr, n, vc, v0, BLOCK)
    valid = live & (y != ignore_index)
    x = tl.load(x_ptr + rows, mask=valid, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    lq = x - lse
    if HAS_LOGP:
        lp = tl.where(inside, tl.load(logp_ptr + rows, mask=valid, other=0.0).to(tl.float64), lq)
    else:
        lp = lq
    p = tl.exp(lp)
    # p = 0 (a -inf logit or label logp) adds no entropy term: no 0 * -inf.
    ent = p * (tl.where(p > 0, lp, 0.0) + tl.load(ent_ptr + rows, mask=valid, other=0.0).to(tl.float64))
    g = tl.load(g_ptr + rows, mask=valid, other=0.0).to(tl.float64)
    k_ent = tl.load(k_ptr + rows, mask=valid, other=0.0).to(tl.float64) * ent
    d = tl.where(inside, g * _neg_expm1(lp) - k_ent, -(g * p + k_ent))
    d = d * tl.cast(inv_temp, tl.float32).to(tl.float64)  # the row kernel's fp32 1 / tau
    col = tl.where(inside, y - v0, 0)
    tl.store(dz_ptr + rows.to(tl.int64) * stride_dz + col, d.to(tl.float32).to(dz_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# plan and launchers
# ----------------------------------------------------------------------------------------------
def plan(n: int, reps: int, meta: Dict) -> Tuple[KernelLaunch, KernelLaunch]:
    """The two launches for a slice of n rows (``gemm.slice_label_plan``: bytes per row, as the CUDA ones)."""
    return gemm.slice_label_plan(("_slice_labels_kernel", "_slice_label_fix_kernel"), n, (triton.cdiv(n, BLOCK),),
                                 NUM_WARPS, meta, reps)


def _check_rows(name: str, t: Tensor, n: int, dtype: torch.dtype) -> None:
    if t.dtype != dtype or tuple(t.shape) != (n,) or (n > 1 and t.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous {dtype} [{n}], got {t.dtype} {tuple(t.shape)}")


def _check_slice(name: str, z: Tensor) -> None:
    if z.dim() != 2 or (z.shape[1] > 1 and z.stride(1) != 1):
        raise ValueError(f"{name} must be [n, vc] with last-dim stride 1, got {tuple(z.shape)} {tuple(z.stride())}")


def slice_labels(z: Tensor, labels: Tensor, v0: int, inv_temp: float, ignore_index: int, cols: Tensor,
                 x: Tensor) -> None:
    """cols [n] int64 and x [n] fp64 (out) for the logits slice z [n, vc] (fp32 or 16-bit) of global columns
    [v0, v0 + vc)."""
    _check_slice("z", z)
    n = z.shape[0]
    _check_rows("labels", labels, n, torch.int64)
    _check_rows("cols", cols, n, torch.int64)
    _check_rows("x", x, n, torch.float64)
    if n:
        _slice_labels_kernel[(triton.cdiv(n, BLOCK),)](
            z, labels, cols, x, n, z.shape[1], z.stride(0), int(v0), float(inv_temp), int(ignore_index),
            BLOCK=BLOCK, ROUND_X=ROWS._round_x(), num_warps=NUM_WARPS)


def slice_label_fix(dz: Tensor, labels: Tensor, v0: int, x: Tensor, lse: Tensor, H: Tensor, g: Tensor, k: Tensor,
                    logp: Optional[Tensor], inv_temp: float, ignore_index: int) -> None:
    """Rewrite the label / stand-in column of each unmasked row of dz [n, vc] (module docstring)."""
    _check_slice("dz", dz)
    n = dz.shape[0]
    _check_rows("labels", labels, n, torch.int64)
    _check_rows("x", x, n, torch.float64)
    _check_rows("lse", lse, n, torch.float64)
    for name, t in (("H", H), ("g", g), ("k", k)) + ((("logp", logp),) if logp is not None else ()):
        _check_rows(name, t, n, torch.float32)
    if n:
        _slice_label_fix_kernel[(triton.cdiv(n, BLOCK),)](
            dz, labels, x, lse, H, g, k, H if logp is None else logp, n, dz.shape[1], dz.stride(0), int(v0),
            float(inv_temp), int(ignore_index), HAS_LOGP=logp is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------------------
# compile check: these kernels, and the row backward builds only the chunked head launches (fp32 logits in,
# 16-bit dz out after a fused forward: ``entropy_logprob``'s own list has the same-dtype, in-place builds)
# ----------------------------------------------------------------------------------------------
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _labels_signature(dt: str) -> Dict[str, str]:
    return {"z_ptr": f"*{dt}", "labels_ptr": "*i64", "cols_ptr": "*i64", "x_ptr": "*fp64", "n": "i32", "vc": "i32",
            "stride_z": "i32", "v0": "i64", "inv_temp": "fp32", "ignore_index": "i64", "BLOCK": "constexpr",
            "ROUND_X": "constexpr"}


def _fix_signature(dt: str) -> Dict[str, str]:
    return {"dz_ptr": f"*{dt}", "labels_ptr": "*i64", "x_ptr": "*fp64", "lse_ptr": "*fp64", "ent_ptr": "*fp32",
            "g_ptr": "*fp32", "k_ptr": "*fp32", "logp_ptr": "*fp32", "n": "i32", "vc": "i32", "stride_dz": "i32",
            "v0": "i64", "inv_temp": "fp32", "ignore_index": "i64", "HAS_LOGP": "constexpr", "BLOCK": "constexpr"}


def _kernel_configs() -> List[tuple]:
    rows = []
    for dt in _DT.values():  # the logits: fp32, or 16-bit after a chunked forward (dz in place over them)
        rows.append((_slice_labels_kernel, _labels_signature(dt), {"BLOCK": BLOCK, "ROUND_X": True}, NUM_WARPS, 1,
                     f"slice_labels[{dt}]"))
        for has_logp in (True, False):
            rows.append((_slice_label_fix_kernel, _fix_signature(dt), {"HAS_LOGP": has_logp, "BLOCK": BLOCK},
                         NUM_WARPS, 1, f"slice_label_fix[{dt},logp={int(has_logp)}]"))
    for cfg in ROWS.LAUNCH_CONFIGS:
        for dt in ("bf16", "fp16"):
            sig = dict(ROWS._bwd_signature("fp32"), out_ptr=f"*{dt}")
            rows.append((ROWS._entropy_logprob_bwd_kernel, sig, {"BLOCK_V": cfg.block_v, "ROUND_X": True},
                         cfg.num_warps, cfg.num_stages, f"entropy_logprob_bwd[fp32>{dt},{cfg.name}]"))
    return rows


#: Every build the chunked head's launchers run beyond ``entropy_logprob.KERNEL_CONFIGS`` (compile report).
KERNEL_CONFIGS: List[tuple] = _kernel_configs()


def compile_attrs(fn, signature: Dict[str, str]) -> Dict[tuple, list]:
    """The row kernel's aligned build (its own attributes); the slice kernels: 16-byte aligned pointers (their
    row vectors are sliced per chunk at multiples of 16 rows or not at all)."""
    if fn is ROWS._entropy_logprob_bwd_kernel:
        return ROWS.compile_attrs(fn, signature)
    return {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
