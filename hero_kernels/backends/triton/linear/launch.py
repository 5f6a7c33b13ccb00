"""Launchers of the fused LM head on Triton, and ``plan``: the one description of what they launch.

``plan(N, D, V, dtype, ...)`` turns a shape into a list of ``KernelLaunch`` (grid, tiles, vocab splits,
chunk size, FLOPs, HBM bytes under a stated L2 assumption); ``forward`` / ``forward_partials`` /
``backward`` call it and launch exactly what it says, and ``benchmarks/roofline.py`` calls it without a
GPU. Design and numbers: the package docstring (``hero_kernels/backends/triton/linear/__init__.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
import triton
from torch import Tensor

from hero_kernels.backends import RowStats, UpstreamGrads, compact_rows, gemm
from hero_kernels.backends.plan import GPU_SPECS, GpuSpec, KernelLaunch, gemm_l2_bytes, plan_seconds
from hero_kernels.backends.torch.rowmath import out_of_range_labels
from hero_kernels.dispatch import check_capability, cublas_tf32
from hero_kernels.options import RowOptions

from . import chunked as CH
from . import kernels as K
from .config import (GROUP_N, MERGE_BLOCK, VARIANTS, LinearEntropyConfig, default_config, device_arch,
                     forward_splits)

__all__ = ["plan", "forward", "forward_partials", "backward", "DesignPlan", "FORWARD_ENV", "BACKWARD_ENV"]

_TL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
def _forward_plan(N: int, D: int, V: int, e: int, has_bias: bool, cfg: LinearEntropyConfig, sms: int,
                  final: bool = True) -> List[KernelLaunch]:
    t = cfg.fwd
    row_blocks = triton.cdiv(N, t.block_n)
    S = forward_splits(row_blocks, V, t.block_v, sms, cfg.vocab_splits)
    per = triton.cdiv(triton.cdiv(V, S), t.block_v) * t.block_v
    S = triton.cdiv(V, per)  # no empty split
    # One CTA per SM (the fp32 accumulator + the tile epilogue fill the register file), so a wave
    # is `sms` programs: ~sms / S row blocks x S splits. Each wave reads its hidden blocks once (they stay
    # in L2: (sms / S) x BLOCK_N x D x e bytes, 11 MB at the flagship shape) and streams W once, each W
    # tile shared by the wave's row blocks in L2 (the programs sweep their splits in lockstep).
    wave_rows = max(1, sms // S)
    w_passes = triton.cdiv(row_blocks, wave_rows)
    hbm = N * D * e + w_passes * V * D * e + (w_passes * V * e if has_bias else 0) + 8 * N + 20 * S * N
    note = (f"hidden block of a row block shared by its S={S} co-resident split programs "
            f"(wave working set {min(wave_rows, row_blocks) * t.block_n * D * e / 2**20:.1f} MiB of hidden "
            f"+ in-flight W tiles, < 50 MB L2); W streamed from HBM once per wave of {wave_rows} row blocks "
            f"({w_passes} passes)")
    meta = {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k, "splits": S,
            "cols_per_split": per, "elt": e, **_precision_meta(e, cfg)}
    flops = 2.0 * N * D * V
    out = [KernelLaunch("_fwd_partials_kernel", (row_blocks * S,), "gemm", flops, hbm, note,
                        t.num_warps, t.num_stages, meta, l2_bytes=gemm_l2_bytes(flops, t.block_n, t.block_v, e))]
    out.append(KernelLaunch("_merge_partials_kernel", (triton.cdiv(N, MERGE_BLOCK),), "stream", 0.0,
                            20 * S * N + (12 if final else 16) * N, "partials read once", 4, 1,
                            {"BLOCK": MERGE_BLOCK, "splits": S, "FINAL": int(final)}))
    return out


def _precision_meta(e: int, cfg: LinearEntropyConfig) -> dict:
    """fp32 plans: the tl.dot precision the kernel runs (``_dot_precision``), which prices it (FMA peak for
    "ieee", the TF32 tensor-core term for "tf32": ``plan.launch_peak``); 16-bit plans: nothing."""
    return {"precision": "tf32" if cfg.allow_tf32 else "ieee"} if e == 4 else {}


def _atomic_plan(N: int, D: int, V: int, e: int, has_bias: bool, cfg: LinearEntropyConfig,
                 round16: bool) -> List[KernelLaunch]:
    t = cfg.atomic
    rb, vb = triton.cdiv(N, t.block_n), triton.cdiv(V, t.block_v)
    l2_atomic = 4.0 * N * V * D * (1.0 / t.block_v + 1.0 / t.block_n)
    note = (f"grouped order ({GROUP_N} row blocks per group) keeps the dh / dW tiles being added to in L2; "
            f"HBM: operands once per group + fp32 dh / dW written back once; L2 term includes "
            f"{l2_atomic / 1e9:.0f} GB of fp32 atomics (throughput of the atomic units themselves NOT modeled)")
    hbm = N * D * e * 2 + triton.cdiv(rb, GROUP_N) * V * D * e + 8 * (N * D + V * D) + (8 * V if has_bias else 0)
    # L2 -> SM: the logits GEMM's operand tiles, then per D chunk a W tile [BV, BD] for dh += dz W (e / (2 BN)
    # bytes per FLOP) and an h tile [BN, BD] for dW += dz^T h (e / (2 BV)), plus the fp32 atomics (>= 4 bytes
    # each into L2): 4 N D V (1 / BV + 1 / BN).
    f = 2.0 * N * D * V
    l2 = gemm_l2_bytes(f, t.block_n, t.block_v, e) + f * e / (2 * t.block_n) + f * e / (2 * t.block_v) + l2_atomic
    return [
        KernelLaunch("zero_fill", (), "stream", 0.0, 4 * (N * D + V * D), "fp32 dh / dW zeroed", external=True),
        KernelLaunch("_bwd_atomic_kernel", (rb * vb,), "gemm", 6.0 * N * D * V, hbm, note, t.num_warps,
                     t.num_stages, {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k,
                                    "BLOCK_D": t.block_d, "GROUP_N": GROUP_N, "elt": e, "ROUND_LOGITS": round16,
                                    **_precision_meta(e, cfg)},
                     l2_bytes=l2),
        KernelLaunch("cast_grads", (), "stream", 0.0, (4 + e) * (N * D + V * D), "fp32 -> input dtype",
                     external=True),
    ]


def plan_target(pass_: str, dtype, sms: Optional[int]) -> Tuple[torch.dtype, int, int]:
    """(dtype, bytes per element, SM count) of a plan: the dtype as a torch.dtype, sms defaulting to an H100's;
    rejects an unknown pass."""
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_!r}")
    dt = gemm.as_dtype(dtype)
    return dt, torch.finfo(dt).bits // 8, sms or GPU_SPECS["h100"].sms


def plan_passes(N: int, D: int, V: int, e: int, pass_: str, total_rows: Optional[int],
                weight_copied: Optional[bool], need_dh: bool, need_dw: bool, forward) -> Tuple[List[KernelLaunch], bool]:
    """How the fused heads' plans start: for a forward pass the input preparation and ``forward(D_pad)`` (the
    head's forward launches at D rounded up to 16), then the backward's input preparation when a backward
    runs. Returns (launches, whether the backward's own launches follow)."""
    out: List[KernelLaunch] = []
    if N <= 0:
        return out, False
    if pass_ in ("fwd", "fwd+bwd"):
        out += _prepare_plan(N, D, V, e, "fwd", total_rows, weight_copied)
        out += forward(triton.cdiv(D, _ALIGN) * _ALIGN)
    if pass_ == "fwd" or not (need_dh or need_dw):
        return out, False
    return out + _prepare_plan(N, D, V, e, "bwd", total_rows, weight_copied, need_dh), True


class DesignPlan(list):
    """A plan (list of ``KernelLaunch``) plus the design each pass runs. ``variants``: {"forward" | "backward":
    {"pick": "fused" | "chunked", "modeled_s": {design: modeled seconds of that pass on ``gpu``}, "forced":
    the config or the environment chose, not the model}}, for the passes the plan has."""

    def __init__(self):
        super().__init__()
        self.variants: Dict[str, dict] = {}
        #: the logits the backward uses ("fp32" or the 16-bit input dtype's name: its forward ran chunked); None:
        #: no backward planned (the entropy head's plan sets it; the sketch's keeps fp32 logits, None)
        self.backward_logits: Optional[str] = None

    @property
    def forward_variant(self) -> Optional[str]:
        return self.variants.get("forward", {}).get("pick")

    @property
    def backward_variant(self) -> Optional[str]:
        return self.variants.get("backward", {}).get("pick")

    @property
    def round_logits(self) -> bool:
        """The backward uses the logits rounded to the 16-bit input dtype (its forward ran the chunked design:
        ``backward_logits``), not fp32 ones."""
        return self.backward_logits not in (None, "fp32")

    def choose(self, which: str, priced: Dict[str, List[KernelLaunch]], forced: Optional[str],
               gpu: Union[str, GpuSpec], fp32: bool, tf32: bool = False) -> List[KernelLaunch]:
        """Record both designs' modeled seconds for pass ``which`` on ``gpu`` (a ``GPU_SPECS`` key or a spec;
        tf32: cuBLAS runs fp32 GEMMs on TF32 tensor cores, ``plan_seconds``); return the launches of the pick."""
        pick, secs = pick_design(priced, forced, gpu, fp32, tf32)
        self.variants[which] = {"pick": pick, "modeled_s": secs, "forced": forced is not None}
        return priced[pick]


def pick_design(priced: Dict[str, List[KernelLaunch]], forced: Optional[str], gpu: Union[str, GpuSpec], fp32: bool,
                tf32: bool = False) -> Tuple[str, Dict[str, float]]:
    """(the design a pass runs, {design: modeled seconds on ``gpu``}): ``forced``, else the faster by the model."""
    spec = gpu if isinstance(gpu, GpuSpec) else GPU_SPECS[gpu]
    secs = {n: plan_seconds(x, spec, fp32, tf32) for n, x in priced.items()}
    return forced or min(secs, key=secs.get), secs


def forced_variant(cfg, which: str, envs: Tuple[str, str], dtype: torch.dtype) -> Optional[str]:
    """The design of pass ``which`` ("forward" | "backward") the config (``<which>_variant``) or else the
    environment variable (``envs``: the forward's and the backward's) forces; else "fused" for 16-bit inputs
    where torch has no fp32-output GEMM (``gemm.has_fp32_out_gemm``: the chunked logits would upcast the
    weight); None: the model picks."""
    env = envs[0] if which == "forward" else envs[1]
    v = getattr(cfg, f"{which}_variant") or os.environ.get(env) or None
    if v is not None and v not in VARIANTS:
        raise ValueError(f"{env}={v!r}: set it to one of {', '.join(VARIANTS)} or unset it")
    if v is None and dtype != torch.float32 and not gemm.has_fp32_out_gemm():
        return "fused"
    return v


#: Environment overrides of each pass's design ("fused" | "chunked") when the config leaves it None.
FORWARD_ENV, BACKWARD_ENV = "HERO_KERNELS_LINEAR_FORWARD", "HERO_KERNELS_LINEAR_BACKWARD"


def plan(N: int, D: int, V: int, dtype, *, pass_: str = "fwd", has_bias: bool = False, need_dh: bool = True,
         need_dw: bool = True, deterministic: bool = True, config: Optional[LinearEntropyConfig] = None,
         sms: Optional[int] = None, total_rows: Optional[int] = None,
         weight_copied: Optional[bool] = None, arch: Optional[int] = None,
         grad_hidden_dtype=None, gpu: Union[str, GpuSpec] = "h100", tf32: bool = False) -> DesignPlan:
    """Kernel launches, in order, of ``pass_`` ("fwd", "bwd" or "fwd+bwd") for N valid rows of width D and
    V vocabulary rows (the kernels run at D rounded up to 16: ``_prepare`` pads).

    deterministic=True (default): the chunked backward (``hero_kernels.backends.gemm``) in the loop order
    the memory model picks (``gemm.backward_order``: "vocab" slices over all rows for n < V, else "rows"
    chunks): ``_bwd_dz_kernel`` (logits GEMM + dz epilogue, dz written once), cuBLAS dh and dW GEMMs. False
    (with both gradients wanted): the fused atomic kernel. sms: SM count of the target (default: an H100's 132).
    total_rows: rows before the masked-row compaction (> N: its nonzero / gathers / scatters are entries).
    weight_copied: ``_prepare`` copies the weight (D % 16 != 0, or a misaligned / strided weight); None:
    from D % 16 alone. Each pass prepares its inputs, so the copies count once per pass.
    arch: compute capability (major * 10 + minor) whose default configuration runs when ``config`` is None
    (``config.default_config``); default: the H100 / H200's (90), like ``sms``. The launchers pass their
    device's configuration as ``config``. grad_hidden_dtype: the backward's grad_hidden dtype (default:
    dtype); an fp32 one needs no fp32 dh accumulator of its own. Every entry carries the memory model
    (``live_bytes``, ``hero_kernels.backends.plan.peak_extra_bytes``).
    Each pass runs the design (``DesignPlan.variants``: "fused" above, or "chunked": cuBLAS logits and the
    Triton row kernels, ``chunked.py``) the roofline model prices faster on ``gpu`` (a ``GPU_SPECS`` key or a
    spec; the launchers price on the H100 at the device's SM count), unless the config's forward_variant /
    backward_variant or ``FORWARD_ENV`` / ``BACKWARD_ENV`` forces one. deterministic=False: the atomic backward.
    A backward plan also carries the logits its forward used (``DesignPlan.backward_logits``: the input dtype
    after a chunked 16-bit forward, else "fp32"), derived from the forward's design for the same arguments.
    tf32: fp32 plans priced with cuBLAS on TF32 tensor cores (torch's flag, ``dispatch.cublas_tf32``, which the
    launchers pass: it decides what the chunked designs' GEMMs run at, not the Triton dots).
    """
    dt, e, sms = plan_target(pass_, dtype, sms)
    cfg = config or default_config(dt, GPU_SPECS["h100"].cc if arch is None else arch)
    if config is not None:
        deterministic = cfg.deterministic
    out, fp32 = DesignPlan(), dt == torch.float32
    forced = {w: forced_variant(cfg, w, (FORWARD_ENV, BACKWARD_ENV), dt) for w in ("forward", "backward")}
    copies = _copy_bytes(N, D, V, e, total_rows, weight_copied)

    def forward_priced(D_pad: int) -> Dict[str, List[KernelLaunch]]:
        fwd = _forward_plan(N, D_pad, V, e, has_bias, cfg, sms)
        # memory model: the fp32 split partials [5, S, N] / the logits chunk (input dtype; bias in it), + copies
        live = {"fused": 20 * fwd[0].meta["splits"] * N, "chunked": CH.forward_rows(N, D_pad, V, e, cfg.chunk_rows)
                * V * e}
        priced = {"fused": fwd, "chunked": CH.forward_plan(N, D_pad, V, e, has_bias, cfg.chunk_rows)}
        return {n: [dataclasses.replace(k, live_bytes=live[n] + copies) for k in x] for n, x in priced.items()}

    def forward(D_pad: int) -> List[KernelLaunch]:
        return out.choose("forward", forward_priced(D_pad), forced["forward"], gpu, fp32, tf32)

    launches, backward = plan_passes(N, D, V, e, pass_, total_rows, weight_copied, need_dh, need_dw, forward)
    out += launches
    if not backward:
        return out
    D_in, D = D, triton.cdiv(D, _ALIGN) * _ALIGN
    # Which logits the backward must see: those the forward's lse / H came from. A chunked 16-bit forward wrote
    # them rounded to the input dtype (``chunked.py``), a fused one kept them fp32. The backend API passes no
    # design, so the backward derives it here from the forward's own pricing: the same N valid rows, D, V,
    # dtype, bias, config (its forward_variant) and FORWARD_ENV give the same pick (``forward`` and
    # ``backward`` both plan with the compacted row count, the device's SM count and torch's TF32 flag).
    # A forward and backward that see different N (one under CUDA graph capture, ``compact_rows``) or a
    # FORWARD_ENV changed in between may disagree: the backward then runs on the other rounding of the
    # logits (grad_bias error ~3x eager's on the tests' bf16 problem, ``__init__``), never on wrong shapes.
    fwd_pick = out.forward_variant or pick_design(forward_priced(D), forced["forward"], gpu, fp32, tf32)[0]
    round16 = e != 4 and fwd_pick == "chunked"
    out.backward_logits = _TL_DTYPES[dt] if round16 else "fp32"
    if not deterministic and need_dh and need_dw:
        live = 4 * (N * D + V * D) + _copy_bytes(N, D_in, V, e, total_rows, weight_copied)
        out += [dataclasses.replace(k, live_bytes=live) for k in _atomic_plan(N, D, V, e, has_bias, cfg, round16)]
        return out
    dh_e = e if grad_hidden_dtype is None else torch.finfo(gemm.as_dtype(grad_hidden_dtype)).bits // 8
    mem_kw = dict(need_dh=need_dh, need_dw=need_dw, has_bias=has_bias, dh_elem=dh_e,
                  copies=_copy_bytes(N, D_in, V, e, total_rows, weight_copied))
    priced = {"fused": _fused_backward_plan(N, D, V, e, has_bias, cfg, mem_kw, round16),
              "chunked": _chunked_backward_plan(N, D, V, e, has_bias, cfg, mem_kw, round16)}
    out += out.choose("backward", priced, forced["backward"], gpu, fp32, tf32)
    return out


def _backward_plan(N: int, D: int, V: int, e: int, cfg: LinearEntropyConfig, mem_kw: dict, logits_elem: int,
                   dz_launches, vocab_rows: Optional[int] = None) -> List[KernelLaunch]:
    """The deterministic backward in the loop order of the memory model (``gemm.backward_order``) around a
    design's ``dz_launches(c, vc, reps, order)``; logits_elem: its separate logits buffer (``gemm``);
    vocab_rows: the rows of its dz launches in the "vocab" order (default: the chunk rows C)."""
    kw = dict(mem_kw, logits_elem=logits_elem)
    order, C, Vc = gemm.backward_order(N, D, V, e, forced_rows=cfg.chunk_rows, forced_cols=cfg.vocab_cols, **kw)
    memory = gemm.backward_memory(order, N, D, V, e, C, Vc, **kw)
    grads = dict(has_bias=mem_kw["has_bias"], need_dh=mem_kw["need_dh"], need_dw=mem_kw["need_dw"], memory=memory)
    if order == "vocab":
        return gemm.vocab_backward_plan(N, D, V, e, vocab_rows or C, Vc, lambda c, vc, r: dz_launches(c, vc, r, order),
                                        dh_elem=mem_kw["dh_elem"], **grads)
    return gemm.chunked_backward_plan(N, D, V, e, C, lambda c, r: dz_launches(c, V, r, order), **grads)


def _chunked_backward_plan(N: int, D: int, V: int, e: int, has_bias: bool, cfg: LinearEntropyConfig,
                           mem_kw: dict, round16: bool) -> List[KernelLaunch]:
    """The chunked design (``chunked.dz_plan``), one logits GEMM over all n rows per vocab slice: dz in place
    over the logits (fp32 inputs, or round16: 16-bit logits after a chunked forward), else fp32 logits beside
    the 16-bit dz buffer."""
    in_place = e == 4 or round16
    return _backward_plan(N, D, V, e, cfg, mem_kw, 0 if in_place else 4,
                          lambda c, vc, reps, order: CH.dz_plan(c, vc, reps, D, e, has_bias, order, in_place),
                          vocab_rows=N)


def _fused_backward_plan(N: int, D: int, V: int, e: int, has_bias: bool, cfg: LinearEntropyConfig,
                         mem_kw: dict, round16: bool) -> List[KernelLaunch]:
    """The fused design: ``_bwd_dz_kernel`` (the logits tile by tl.dot, rounded to the input dtype with
    round16, dz written once) per row chunk."""
    t = cfg.dz_tile

    def dz(c: int, vc: int, reps: int, order: str) -> List[KernelLaunch]:
        grid = (triton.cdiv(c, t.block_n) * triton.cdiv(vc, t.block_v),)
        # Row-block-fastest order: each W tile (of the slice) is read from HBM once per launch, the chunk's
        # hidden rows (c x D x e) stay in L2; dz is written once.
        note = (f"W{'' if vc == V else ' slice'} streamed once per chunk (a wave shares each tile), chunk "
                f"hidden rows {c * D * e / 2**20:.1f} MiB L2-resident, dz [C, {'V' if vc == V else 'Vc'}] "
                f"written once")
        return [KernelLaunch("_bwd_dz_kernel", grid, "gemm", 2.0 * c * D * vc,
                             c * D * e + vc * D * e + c * vc * e + 20 * c + (vc * e if has_bias else 0), note,
                             t.num_warps, t.num_stages,
                             {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k, "chunk_rows": c,
                              "vocab_cols": vc, "order": order, "elt": e, "ROUND_LOGITS": round16,
                              **_precision_meta(e, cfg)}, repeats=reps,
                             l2_bytes=gemm_l2_bytes(2.0 * c * D * vc, t.block_n, t.block_v, e))]

    return _backward_plan(N, D, V, e, cfg, mem_kw, 0, dz)


def _copy_bytes(n: int, D: int, V: int, e: int, total_rows: Optional[int], weight_copied: Optional[bool]) -> int:
    """Input copies ``_prepare`` keeps alive through a pass (the memory model): the gathered and / or padded
    hidden rows [n, D_pad], a padded or realigned weight copy [V, D_pad]."""
    D_pad = triton.cdiv(D, _ALIGN) * _ALIGN
    compacted = total_rows is not None and total_rows > n
    return (n * D_pad * e if (compacted or D_pad != D) else 0) + (V * D_pad * e if (D_pad != D or weight_copied) else 0)


def _prepare_plan(n: int, D: int, V: int, e: int, pass_: str, total_rows: Optional[int],
                  weight_copied: Optional[bool], need_dh: bool = True) -> List[KernelLaunch]:
    """``_prepare``'s work before the kernels: the masked-row compaction (``gemm.compaction_plan``) and the
    zero-padded copies of ``_aligned_2d`` (hidden when D % 16 != 0; the weight then too, or when
    ``weight_copied``); the backward also copies dh [n, D] out of the padded [n, D_pad] (the dW cast reads
    its padded view in the same pass as the unpadded one)."""
    out = gemm.compaction_plan(total_rows, n, D, e, pass_)
    D_pad = triton.cdiv(D, _ALIGN) * _ALIGN
    note = "input preparation (torch ops): read once, written once"
    if D_pad != D:
        out.append(KernelLaunch("pad_hidden", (), "stream", 0.0, n * (D + D_pad) * e, note, external=True))
    if D_pad != D or weight_copied:
        out.append(KernelLaunch("copy_weight", (), "stream", 0.0, V * (D + D_pad) * e,
                                note + (f"; D = {D} padded to {D_pad}" if D_pad != D else "; misaligned weight"),
                                external=True))
    if pass_ == "bwd" and D_pad != D and need_dh:
        out.append(KernelLaunch("unpad_dh", (), "stream", 0.0, 2 * n * D * e, note, external=True))
    return out


def _entry(launches: List[KernelLaunch], name: str) -> KernelLaunch:
    return next(x for x in launches if x.name == name)


# ----------------------------------------------------------------------------------------------
# input preparation
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> Optional[int]:
    """SM count of a CUDA device; None elsewhere (the interpreter plans for an H100)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _tf32(dtype: torch.dtype) -> bool:
    """Does cuBLAS run this dtype's GEMMs (the chunked designs' logits, dh, dW) on TF32 tensor cores now?"""
    return dtype == torch.float32 and cublas_tf32()


def _upcast_dot(dtype: torch.dtype) -> bool:
    """True only under the Triton interpreter with bf16 inputs (see ``kernels._mma``)."""
    return dtype == torch.bfloat16 and K.INTERPRETED


def _dot_precision(dtype: torch.dtype, cfg: LinearEntropyConfig) -> str:
    return "tf32" if (dtype == torch.float32 and cfg.allow_tf32) else "ieee"


def _check(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> None:
    if hidden.dtype not in _TL_DTYPES:
        raise TypeError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N]={hidden.shape[0]}, got {tuple(labels.shape)}")
    check_capability("triton", hidden.device, hidden.dtype, "hidden")  # bf16 tl.dot needs sm_80


# lse of a masked row in an uncompacted backward: exp(x - 1e30) = 0 and 0 * (x - 1e30) = 0 for |x| < 1e29.
_MASKED_LSE = 1e30

# Every forward launch keeps D, the row strides and the base addresses multiples of 16 (elements / bytes),
# so Triton always picks its aligned specialization (vectorized 16-byte loads): the one the sm_80 / sm_90a
# compile checks cover (``compile.compile_attrs``). Odd D is zero-padded, which adds nothing to any dot.
_ALIGN = 16


def _aligned_2d(x: Tensor, D_pad: int) -> Tensor:
    """x [R, D] -> [R, D_pad]: last-dim stride 1, row stride % 16 == 0, 16-byte aligned base."""
    if D_pad != x.shape[1]:
        return torch.nn.functional.pad(x, (0, D_pad - x.shape[1]))
    if x.stride(1) == 1 and (x.shape[0] <= 1 or x.stride(0) % _ALIGN == 0) and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _aligned_1d(x: Tensor) -> Tensor:
    if x.stride(0) == 1 and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _prepare(hidden, weight, bias, labels, ignore_index, align: bool = True, may_skip_compaction: bool = False):
    """(valid-row idx | None, h [n, D'], weight [V, D'], bias | None, labels [n]) ready for launch.
    align: D' = D rounded up to 16 and 16-byte aligned rows (the Triton GEMM kernels); else only last-dim
    stride 1 (cuBLAS and the row kernel need nothing more).
    idx None: every row, in order. Compacting costs one host sync (``compact_rows``); with
    may_skip_compaction (the launchers that zero masked rows themselves) there is none during CUDA graph
    capture, and the returned rows may include masked ones."""
    if may_skip_compaction:
        idx = compact_rows(labels, ignore_index)
    else:  # hero_kernels.sharded: compact rows always
        idx = torch.nonzero(labels != ignore_index).squeeze(1)
        idx = None if idx.numel() == labels.numel() else idx
    if idx is None:
        h, lab = hidden, labels
    else:
        h, lab = hidden.index_select(0, idx), labels.index_select(0, idx)
    if align:
        D_pad = triton.cdiv(hidden.shape[1], _ALIGN) * _ALIGN
        h, weight = _aligned_2d(h, D_pad), _aligned_2d(weight, D_pad)
        bias = _aligned_1d(bias) if bias is not None else None
    else:
        h = h if h.stride(-1) == 1 else h.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
    return idx, h, weight, bias, _aligned_1d(lab.contiguous())


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
def _launch_partials(h, weight, bias, labels, inv_temp, label_offset, cfg) -> Tuple[Tensor, int]:
    """Unmerged per-split partials (m, s, so, t, xl) as fp32 [5, S, n], and S, for compact rows h [n, D]
    (also used by ``hero_kernels.sharded``, which merges the splits like shards)."""
    n, D = h.shape
    V = weight.shape[0]
    fwd = _forward_plan(n, D, V, h.element_size(), bias is not None, cfg,
                        _device_sms(h.device) or GPU_SPECS["h100"].sms)[0]
    S, t = fwd.meta["splits"], cfg.fwd
    parts = torch.empty((5, S, n), dtype=torch.float32, device=h.device)
    K._fwd_partials_kernel[fwd.grid](
        h, weight, bias if bias is not None else weight, labels,
        parts[0], parts[1], parts[2], parts[3], parts[4],
        n, D, V, h.stride(0), weight.stride(0), fwd.meta["cols_per_split"], S, label_offset, inv_temp,
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(h.dtype, cfg), UPCAST_DOT=_upcast_dot(h.dtype),
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k,
        num_warps=fwd.num_warps, num_stages=fwd.num_stages,
    )
    return parts, S


def _launch_forward(h, weight, bias, labels, inv_temp, label_offset, cfg, final: bool):
    """(logp, H, lse) when final, else merged (m, s, t, label_x): separate fp32 [n] tensors (the public
    custom op may not return outputs that alias each other). h [n, D] compact rows."""
    n = h.shape[0]
    parts, S = _launch_partials(h, weight, bias, labels, inv_temp, label_offset, cfg)
    merge = _forward_plan(n, h.shape[1], weight.shape[0], h.element_size(), bias is not None, cfg,
                          _device_sms(h.device) or GPU_SPECS["h100"].sms, final)[1]
    assert merge.meta["splits"] == S
    # final: lse (out[2]) in float64, split into fp32 hi + lo by the backward (no ulp(lse) error)
    out = tuple(torch.empty(n, dtype=torch.float64 if final and i == 2 else torch.float32, device=h.device)
                for i in range(3 if final else 4))
    K._merge_partials_kernel[merge.grid](
        parts[0], parts[1], parts[2], parts[3], parts[4], out[0], out[1], out[2], out[0] if final else out[3],
        n, S, FINAL=final, BLOCK=merge.meta["BLOCK"], num_warps=merge.num_warps,
    )
    return out


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions,
            config: Optional[LinearEntropyConfig] = None) -> RowStats:
    """RowStats(logp, H fp32, lse fp64) [N]; masked rows 0. hidden [N, D], weight [V, D], bias [V] | None,
    labels [N]."""
    _check(hidden, weight, bias, labels)
    cfg = config or default_config(hidden.dtype, device_arch(hidden.device))
    N = hidden.shape[0]
    idx, h, w, b, lab = _prepare(hidden, weight, bias, labels, opts.ignore_index, may_skip_compaction=True)
    dts = (torch.float32, torch.float32, torch.float64)  # lse in float64 (backends/__init__.py RowStats)
    if h.shape[0] == 0:
        return RowStats(*(torch.zeros(N, dtype=dt, device=hidden.device) for dt in dts))
    launches = plan(h.shape[0], hidden.shape[1], weight.shape[0], h.dtype, has_bias=b is not None, config=cfg,
                    sms=_device_sms(hidden.device), total_rows=N, weight_copied=w is not weight,
                    tf32=_tf32(h.dtype))
    if launches.forward_variant == "chunked":
        res = CH.forward(h, w, b, lab, opts, _entry(launches, "_entropy_logprob_fwd_kernel").meta["chunk_rows"])
    else:
        res = _launch_forward(h, w, b, lab, float(opts.inv_temperature), 0, cfg, final=True)
    # A label outside [0, V) never matches a column in the kernels (no out-of-bounds read), so its row would
    # come out as if the label's logit were 0: make it a NaN row instead (backend contract; no host sync).
    bad, _ = out_of_range_labels(lab, weight.shape[0], opts.ignore_index)
    res = tuple(r.masked_fill_(bad, float("nan")) for r in res)
    if idx is None:  # uncompacted: masked rows (if any) were computed, their results are 0
        return RowStats(*(r.masked_fill_(lab == opts.ignore_index, 0.0) for r in res))
    return RowStats(*(torch.zeros(N, dtype=dt, device=hidden.device).index_copy_(0, idx, r)
                      for dt, r in zip(dts, res)))


def forward_partials(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions,
                     vocab_start: int = 0, config: Optional[LinearEntropyConfig] = None
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row partials (m, s, t, label_x) of a vocab shard, each fp32 [N].

    weight [V_local, D] holds global vocab rows [vocab_start, vocab_start + V_local); labels are global
    ids. label_x is x[label] when the label is in the shard, else 0. Masked rows: (-inf, 0, 0, 0).
    Merge shards with ``hero_kernels.sharded.merge_stacked_partials``.
    """
    _check(hidden, weight, bias, labels)
    cfg = config or default_config(hidden.dtype, device_arch(hidden.device))
    N = hidden.shape[0]
    idx, h, w, b, lab = _prepare(hidden, weight, bias, labels, opts.ignore_index)
    if h.shape[0] > 0:
        res = _launch_forward(h, w, b, lab, float(opts.inv_temperature), int(vocab_start), cfg, final=False)
        if idx is None:
            return res
    out = tuple(torch.zeros(N, dtype=torch.float32, device=hidden.device) for _ in range(4))
    out[0].fill_(float("-inf"))
    if h.shape[0] > 0:
        for o, r in zip(out, res):
            o.index_copy_(0, idx, r)
    return out


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
def _launch_dz(launches, cfg, h_c, w, b, labs, row_stats, label_stats: bool, z, stride_z: int,
               label_offset: int, inv_temp: float) -> None:
    """``_bwd_dz_kernel`` on chunk rows h_c [c, D] x vocab rows w [vc, D] (a slice: label_offset includes
    its first column) into z (row stride stride_z), with the grid of the plan entry of (c, vc).
    row_stats: the chunk's fp32 [c] (lse, k, c_row, label term (label_stats) or any [c] tensor)."""
    (c, D), vc = h_c.shape, w.shape[0]
    entry = next(x for x in launches if x.name == "_bwd_dz_kernel" and x.meta["chunk_rows"] == c
                 and x.meta["vocab_cols"] == vc)
    t = cfg.dz_tile
    K._bwd_dz_kernel[entry.grid](
        h_c, w, b if b is not None else w, labs, *row_stats, z,
        c, D, vc, h_c.stride(0), w.stride(0), stride_z, int(label_offset), float(inv_temp),
        HAS_BIAS=b is not None, DOT_PRECISION=_dot_precision(h_c.dtype, cfg), UPCAST_DOT=_upcast_dot(h_c.dtype),
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k, LABEL_STATS=label_stats,
        ROUND_LOGITS=entry.meta["ROUND_LOGITS"], num_warps=entry.num_warps, num_stages=entry.num_stages,
    )


def _label_term(lp: Tensor, H: Tensor, g: Tensor, k: Tensor) -> Tensor:
    """The label column's value from the forward's accurate logp [n]: g (1 - p_y) - k p_y (log p_y + H), with
    1 - p_y = -expm1(logp) (no cancellation as p_y -> 1); p_y = 0 (a masked label) gives no 0 * inf."""
    p_y = torch.exp(lp)
    return -torch.expm1(lp) * g - k * torch.where(p_y > 0, p_y * (lp + H), torch.zeros_like(p_y))


class _FusedDz:
    """The fused backward's dz (``chunked.DzProducer``'s interface): ``_bwd_dz_kernel`` recomputes the logits tile
    (tl.dot) and writes dz into a [rows, cols] buffer whose rows are 16-aligned (vector stores, cuBLAS); the
    label column from the forward's logp (``label_stats``), else the tile's 1 - e^{x_y - lse}."""

    def __init__(self, h, w, b, labs, stats, opts: RowOptions, vocab_start: int, launches, cfg, rows: int,
                 cols: int):
        lse, H, g, k, lp = stats
        self.label_stats = lp is not None
        # per-row terms of dz (see kernels._dlogits_tile); without a label term any [n] fp32 (g) stands in
        self.row_stats = (lse, k, torch.addcmul(g, k, H), g if lp is None else _label_term(lp, H, g, k))
        self.h, self.w, self.b, self.labs, self.opts, self.v_start = h, w, b, labs, opts, vocab_start
        self.launches, self.cfg = launches, cfg
        self.buf = torch.empty((rows, triton.cdiv(cols, _ALIGN) * _ALIGN), dtype=h.dtype, device=h.device)

    def view(self, rows: int, cols: int) -> Tensor:
        return self.buf[:rows, :cols]

    def fill(self, z: Tensor, s: int, e: int, v0: int, v1: int) -> None:
        _launch_dz(self.launches, self.cfg, self.h[s:e], self.w[v0:v1], None if self.b is None else self.b[v0:v1],
                   self.labs[s:e], tuple(x[s:e] for x in self.row_stats), self.label_stats, z, z.stride(0),
                   self.v_start + v0, self.opts.inv_temperature)


def _chunked_backward(h, w, b, labs, stats, opts: RowOptions, vocab_start: int, launches, cfg, gh_dtype,
                      need_dh: bool, need_dw: bool):
    """The deterministic backward, in the plan's design (``DesignPlan.backward_variant``: the dz producer,
    ``_FusedDz`` or ``chunked.DzProducer``) and loop order (``gemm.backward_order``). "rows": per chunk of C
    rows, dz [C, V] (input dtype), then cuBLAS dh_c = dz @ W (written once) and dW += dz^T h_c (fp32, see
    ``hero_kernels.backends.gemm``). "vocab": ``gemm.vocab_grads``.
    h [n, D] compact rows, w [V, D]; stats: (lse fp64, H, g, k fp32, logp fp32 | None) [n].
    Returns (dh [n, D] gh_dtype | None, dW [V, D] fp32 ("rows") or w.dtype ("vocab") | None, db fp32 [V] | None)."""
    chunked = launches.backward_variant == "chunked"
    meta = _entry(launches, "_entropy_logprob_bwd_kernel" if chunked else "_bwd_dz_kernel").meta
    n, D = h.shape
    V = w.shape[0]
    C, Vc = meta["chunk_rows"], meta["vocab_cols"]
    size = (n, Vc) if meta["order"] == "vocab" else (min(C, n), V)

    def producer():
        return (CH.DzProducer(h, w, b, labs, stats, opts, vocab_start, *size,
                              in_place=h.dtype == torch.float32 or launches.round_logits) if chunked else
                _FusedDz(h, w, b, labs, stats, opts, vocab_start, launches, cfg, *size))

    if meta["order"] == "vocab":  # the producer made there: no reference here keeps its buffers past the loop
        return gemm.vocab_grads(h, w, b is not None, producer, C, Vc, gh_dtype, need_dh, need_dw)
    dz = producer()
    dh = torch.empty((n, D), dtype=gh_dtype, device=h.device) if need_dh else None
    # The first chunk writes dW / db (beta = 0), the others accumulate: no zero-fill pass over [V, D].
    dW = torch.empty((V, D), dtype=torch.float32, device=h.device) if need_dw else None
    db = torch.empty((V,), dtype=torch.float32, device=h.device) if (need_dw and b is not None) else None
    for s in range(0, n, C):
        e = min(n, s + C)
        z = dz.view(e - s, V)
        dz.fill(z, s, e, 0, V)
        gemm.chunk_grads(z, h[s:e], w, None if dh is None else dh[s:e], dW, db, first=s == 0)
    return dh, dW, db


def _atomic_backward(h, w, b, labs, stats, opts: RowOptions, vocab_start: int, launch: KernelLaunch, cfg):
    n, D = h.shape
    V = w.shape[0]
    lse, H, g, k, lp = stats
    c = torch.addcmul(g, k, H)  # per-row terms of dz (see kernels._dlogits_tile)
    label_stats = lp is not None
    lab = _label_term(lp, H, g, k) if label_stats else None
    dh = torch.zeros((n, D), dtype=torch.float32, device=h.device)
    dW = torch.zeros((V, D), dtype=torch.float32, device=h.device)
    db = torch.zeros((V,), dtype=torch.float32, device=h.device) if b is not None else None
    t = cfg.atomic
    K._bwd_atomic_kernel[launch.grid](
        h, w, b if b is not None else w, labs, lse, k, c, lab if label_stats else g, dh, dW,
        db if db is not None else lse,
        n, D, V, h.stride(0), w.stride(0), int(vocab_start), float(opts.inv_temperature),
        HAS_BIAS=b is not None, DOT_PRECISION=_dot_precision(h.dtype, cfg), UPCAST_DOT=_upcast_dot(h.dtype),
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k, BLOCK_D=t.block_d,
        LABEL_STATS=label_stats, GROUP_N=launch.meta["GROUP_N"], ROUND_LOGITS=launch.meta["ROUND_LOGITS"],
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return dh, dW, db


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, saved: RowStats,
             grads: UpstreamGrads, opts: RowOptions, config: Optional[LinearEntropyConfig] = None,
             vocab_start: int = 0, grad_hidden_dtype: Optional[torch.dtype] = None, *, need_dh: bool = True,
             need_dw: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_hidden [N, D], grad_weight [V, D] in weight.dtype, grad_bias [V] | None).

    need_dh=False: grad_hidden is None and no dh GEMM runs. need_dw=False: grad_weight and grad_bias are
    None, no fp32 [V, D] buffer and no dW GEMM. The atomic kernel (``deterministic=False``) writes both, so
    with only one gradient wanted the chunked path runs instead.

    saved: the forward's RowStats [N], lse float64 (an fp32 one is widened), H / logp fp32 (GLOBAL values
    when weight is a vocab shard starting at ``vocab_start``; then grad_hidden is this shard's share, to be
    summed over shards). saved.logp, the forward's (accurate) log p(label): given, the label column takes
    1 - p_y = -expm1(logp) and log p_y = logp from it (accurate as p_y -> 1); None keeps the tile's
    1 - e^{x_y - lse}, which is rounding noise when p_y -> 1.
    grads.g, grads.k: fp32 [N] upstream gradients (None = 0). grad_hidden_dtype: defaults to hidden.dtype
    (pass torch.float32 for shards).
    """
    _check(hidden, weight, bias, labels)
    if not (need_dh or need_dw):
        return None, None, None
    cfg = config or default_config(hidden.dtype, device_arch(hidden.device))
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    gh_dtype = grad_hidden_dtype or hidden.dtype
    atomic = not cfg.deterministic and need_dh and need_dw
    idx, h, w, b, labs = _prepare(hidden, weight, bias, labels, opts.ignore_index, may_skip_compaction=True)
    n = h.shape[0]
    if n == 0:
        return (torch.zeros((N, D), dtype=gh_dtype, device=dev) if need_dh else None,
                torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if (bias is not None and need_dw) else None)
    zeros = torch.zeros(N, dtype=torch.float32, device=dev)
    label_stats = saved.logp is not None
    stats = (saved.lse, saved.H, grads.g if grads.g is not None else zeros, grads.k if grads.k is not None else zeros,
             saved.logp if label_stats else zeros)
    if idx is not None:
        stats = tuple(x.index_select(0, idx) for x in stats)
    lse_, H_, g, k, lp = (_aligned_1d(x.to(torch.float64 if i == 0 else torch.float32).contiguous())
                          for i, x in enumerate(stats))  # lse fp64 (an fp32 one, e.g. sharded, is widened)
    # A label outside [0, V) (not ignore_index) got lse = NaN from ``forward``, so its dz row is NaN here. Not
    # re-checked: for a vocab shard (``vocab_start``, ``hero_kernels.sharded``) such labels are legitimate.
    if idx is None:
        # Uncompacted (masked rows possible): g = k = 0 and a huge lse give p = 0, log p finite, so dz = 0
        # exactly on a masked row with finite logits (its dh row is then 0 and it adds nothing to dW).
        masked = labs == opts.ignore_index
        lse_, g, k = lse_.masked_fill(masked, _MASKED_LSE), g.masked_fill(masked, 0.0), k.masked_fill(masked, 0.0)
    # The label column's value comes from the forward's accurate logp (``_FusedDz``, ``chunked.DzProducer``).
    stats = (lse_, H_, g, k, lp if label_stats else None)
    launches = plan(n, D, V, h.dtype, pass_="bwd", has_bias=b is not None, need_dh=need_dh,
                    need_dw=need_dw, config=cfg, sms=_device_sms(dev), total_rows=N, weight_copied=w is not weight,
                    grad_hidden_dtype=gh_dtype, tf32=_tf32(h.dtype))
    if launches.round_logits and b is not None and b.dtype != h.dtype:
        # The chunked forward's 16-bit logits took the bias in the input dtype (``chunked.logits_into``: addmm
        # needs one dtype), so the kernels that round their register logits add that rounded bias too.
        b = b.to(h.dtype)
    if atomic:
        dh, dW, db = _atomic_backward(h, w, b, labs, stats, opts, vocab_start,
                                      _entry(launches, "_bwd_atomic_kernel"), cfg)
        dh = dh.to(gh_dtype)
    else:
        dh, dW, db = _chunked_backward(h, w, b, labs, stats, opts, vocab_start, launches, cfg, gh_dtype,
                                       need_dh, need_dw)
    grad_hidden = grad_weight = grad_bias = None
    if dh is not None:
        dh = dh[:, :D]
        if idx is None:
            grad_hidden = dh.contiguous()
        else:
            grad_hidden = torch.zeros((N, D), dtype=gh_dtype, device=dev).index_copy_(0, idx, dh)
    if dW is not None:
        dW = dW[:, :D]
        grad_weight = dW if (weight.dtype == torch.float32 and dW.is_contiguous()) else \
            dW.to(weight.dtype, memory_format=torch.contiguous_format)
        grad_bias = db.to(bias.dtype) if bias is not None else None
    return grad_hidden, grad_weight, grad_bias
