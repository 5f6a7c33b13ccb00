"""Compile metadata of the fused-LM-head kernels, generated from the kernels' own argument lists.

``KERNEL_CONFIGS``: one ``(kernel fn, signature, constexprs, num_warps, num_stages, description, archs)`` per
build the launchers can run, archs the compute capabilities (80, 90) whose launchers run it (read by
``benchmarks/compile_report.py`` and the tests' sm_80 / sm_90a compile check). The signature is derived from the kernel's Python signature (names and ``tl.constexpr`` annotations), so adding or reordering
a kernel argument needs no second edit here; only the typing rule below knows argument names.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from itertools import product
from typing import Dict, List, Optional

import torch
import triton.language as tl

from . import kernels as K
from . import sketch_kernels as SK
from .config import (ARCHS, GROUP_N, MERGE_BLOCK, SKETCH_MERGE_BLOCK, SKETCH_MERGE_WARPS, default_config,
                     default_sketch_config)

__all__ = ["KERNEL_CONFIGS", "SKETCH_KERNEL_CONFIGS", "signature", "compile_attrs", "compile_resource_report"]

_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
#: Pointers to the inputs carry the input dtype, and so do the dz chunk buffer (written in the input dtype for
#: cuBLAS) and the sketch's projection / upstream grads (the operands of its 16-bit dots); every other
#: pointer is fp32 except the labels.
_INPUT_PTRS = ("h_ptr", "w_ptr", "b_ptr", "dz_ptr", "proj_ptr", "v_ptr")
_I64 = ("labels_ptr", "label_offset")
#: Arguments every launch keeps divisible by 16 (see launch._prepare): pointers (16-byte aligned), D and
#: the row strides (padded; the dz chunk buffer's rows too), cols_per_split (a multiple of BLOCK_V).
#: Triton's runtime specializes on exactly this, so compiling with these attributes reproduces the code
#: that runs on the GPU.
_ALIGNED_INTS = ("D", "stride_h", "stride_w", "stride_dz", "stride_p", "cols_per_split")
#: So the compile report builds only the aligned variant of these kernels: no launch runs an unaligned one.
ALIGNED_ONLY = True


def _params(fn) -> List[tuple]:
    """(name, is_constexpr) of every argument of a @triton.jit function, from its Python signature (works
    for JIT and interpreter functions alike)."""
    py = getattr(fn, "fn", fn)
    out = []
    for name, prm in inspect.signature(py).parameters.items():
        ann = prm.annotation
        out.append((name, ann is tl.constexpr or (isinstance(ann, str) and ann.endswith("constexpr"))))
    return out


def signature(fn, dt: str) -> Dict[str, str]:
    """Triton signature of ``fn`` for input dtype ``dt`` ("bf16" / "fp16" / "fp32"), from its arguments."""
    sig = {}
    for n, is_constexpr in _params(fn):
        if is_constexpr:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            kind = "i64" if n in _I64 else "fp64" if n == "lse_ptr" else "fp32"  # lse: fp64, split hi + lo
            sig[n] = "*" + (dt if n in _INPUT_PTRS else kind)
        else:
            sig[n] = "i64" if n in _I64 else "fp32" if n == "inv_temp" else "i32"
    return sig


def _entry(fn, dt: str, const: dict, warps: int, stages: int, desc: str) -> tuple:
    sig = signature(fn, dt)
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in const]
    if missing:
        raise ValueError(f"{fn.__name__}: constexprs {missing} have no value in its compile config")
    return (fn, sig, const, warps, stages, desc)


def _dtype_configs(torch_dt, dt: str) -> List[tuple]:
    """Every build of ``default_config(torch_dt, arch)`` for one arch (see ``_kernel_configs``)."""
    out = []
    for arch in ARCHS:
        base = default_config(torch_dt, arch)
        for prec in (["ieee", "tf32"] if torch_dt == torch.float32 else ["ieee"]):
            cfg = replace(base, allow_tf32=(prec == "tf32"))
            for has_bias in (False, True):
                common = {"HAS_BIAS": has_bias, "DOT_PRECISION": prec, "UPCAST_DOT": False}
                t = cfg.fwd
                const = dict(common, BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k)
                out.append((arch, _entry(K._fwd_partials_kernel, dt, const, t.num_warps, t.num_stages,
                                         f"_fwd_partials_kernel {dt} bias={has_bias} {prec} BN={t.block_n} "
                                         f"BV={t.block_v} BK={t.block_k} w={t.num_warps} s={t.num_stages}")))
                # LABEL_STATS=True (the public op, logp given), False (vocab shards).
                # ROUND_LOGITS=True: 16-bit inputs after a chunked forward (the logits rounded to the input dtype)
                for label_stats, rnd in product((True, False), (False, True) if dt != "fp32" else (False,)):
                    t = cfg.dz_tile
                    const = dict(common, BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k,
                                 LABEL_STATS=label_stats, ROUND_LOGITS=rnd)
                    out.append((arch, _entry(K._bwd_dz_kernel, dt, const, t.num_warps, t.num_stages,
                                             f"_bwd_dz_kernel {dt} bias={has_bias} {prec} BN={t.block_n} "
                                             f"BV={t.block_v} BK={t.block_k} label_stats={int(label_stats)} "
                                             f"{'round_logits=1 ' if rnd else ''}w={t.num_warps} s={t.num_stages}")))
                    t = cfg.atomic
                    const = dict(common, BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k,
                                 BLOCK_D=t.block_d, LABEL_STATS=label_stats, GROUP_N=GROUP_N, ROUND_LOGITS=rnd)
                    out.append((arch, _entry(K._bwd_atomic_kernel, dt, const, t.num_warps, t.num_stages,
                                             f"_bwd_atomic_kernel {dt} bias={has_bias} {prec} BN={t.block_n} "
                                             f"BV={t.block_v} BK={t.block_k} BD={t.block_d} "
                                             f"label_stats={int(label_stats)} {'round_logits=1 ' if rnd else ''}"
                                             f"w={t.num_warps} s={t.num_stages}")))
    return out


def _kernel_configs() -> List[tuple]:
    """One entry per distinct build, its 7th field the archs (``config.ARCHS``) whose default config runs it:
    a build shared by every arch is listed once, an arch-specific one (sm_90's dz tile) only for its arch."""
    archs: Dict[str, list] = {}
    entries: Dict[str, tuple] = {}
    for torch_dt, dt in _TL.items():
        for arch, entry in _dtype_configs(torch_dt, dt):
            entries.setdefault(entry[5], entry)
            archs.setdefault(entry[5], []).append(arch)
    out = [entries[d] + (tuple(archs[d]),) for d in entries]
    for final in (True, False):
        e = _entry(K._merge_partials_kernel, "fp32", {"FINAL": final, "BLOCK": MERGE_BLOCK}, 4, 1,
                   f"_merge_partials_kernel final={final} BLOCK={MERGE_BLOCK} w=4")
        if final:
            e[1]["o2_ptr"] = "*fp64"  # lse
        out.append(e + (ARCHS,))
    return out


KERNEL_CONFIGS: List[tuple] = _kernel_configs()


def _sketch_configs() -> List[tuple]:
    """Every build the fused gradient sketch's launchers run (``sketch_launch``), archs as in ``KERNEL_CONFIGS``."""
    archs: Dict[str, list] = {}
    entries: Dict[str, tuple] = {}
    for torch_dt, dt in _TL.items():
        for arch in ARCHS:
            base = default_sketch_config(torch_dt, arch)
            for prec in (["ieee", "tf32"] if torch_dt == torch.float32 else ["ieee"]):
                for has_bias in (False, True):
                    for fn, t, bp in ((SK._sketch_fwd_partials_kernel, base.fwd, base.block_p),
                                      (SK._sketch_bwd_dz_kernel, base.dz, base.dz_block_p)):
                        const = {"HAS_BIAS": has_bias, "DOT_PRECISION": prec, "UPCAST_DOT": False,
                                 "BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k, "BLOCK_P": bp}
                        desc = (f"{fn.__name__} {dt} bias={has_bias} {prec} BN={t.block_n} BV={t.block_v} "
                                f"BK={t.block_k} BP={bp} w={t.num_warps} s={t.num_stages}")
                        entries.setdefault(desc, _entry(fn, dt, const, t.num_warps, t.num_stages, desc))
                        archs.setdefault(desc, []).append(arch)
                desc = f"_sketch_merge_kernel {dt} BLOCK_R={SKETCH_MERGE_BLOCK} BP={base.block_p} w={SKETCH_MERGE_WARPS}"
                const = {"BLOCK_R": SKETCH_MERGE_BLOCK, "BLOCK_P": base.block_p}
                entries.setdefault(desc, _entry(SK._sketch_merge_kernel, dt, const, SKETCH_MERGE_WARPS, 1, desc))
                archs.setdefault(desc, []).append(arch)
    return [entries[d] + (tuple(dict.fromkeys(archs[d])),) for d in entries]


#: The fused gradient sketch's builds (``hero_kernels.backends.triton.linear_grad_sketch`` exports them as its
#: KERNEL_CONFIGS for the compile report).
SKETCH_KERNEL_CONFIGS: List[tuple] = _sketch_configs()


def compile_attrs(fn, signature: Dict[str, str]) -> Dict[tuple, list]:
    """ASTSource ``attrs`` for ``fn``: tt.divisibility=16 on the arguments the launchers keep aligned."""
    attrs = {}
    for i, (name, _) in enumerate(_params(fn)):
        ty = signature.get(name, "")
        if ty.startswith("*") or name in _ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_resource_report(ccs=(80, 90), configs: Optional[List[tuple]] = None) -> List[dict]:
    """Compile every entry of KERNEL_CONFIGS for each cc among its archs (no GPU needed); resource rows.

    Must run WITHOUT ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit`` functions cannot be
    compiled); tests call it in a subprocess. Rows: kernel, arch, registers, shared_bytes, local_bytes,
    stack_bytes, config (the description). Register spills show up as stack_bytes > 0 (cuobjdump's
    LOCAL column stays 0 for them), so check both.
    """
    from hero_kernels import gpu_compile

    rows = []
    for fn, sig, const, warps, stages, desc, archs in (configs if configs is not None else KERNEL_CONFIGS):
        for cc in (c for c in ccs if c in archs):
            rows.append(gpu_compile.triton_resource_usage(fn, sig, const, cc, warps, stages, config=desc,
                                                          attrs=compile_attrs(fn, sig)).as_dict())
    return rows
