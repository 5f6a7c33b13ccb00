"""Launch configurations of the fused LM head on Triton: tiles, vocab splits, the backward's chunk size.

Everything a launcher chooses from a shape lives here, so ``launch.plan`` (the single source of truth for
what runs) and the compile checks (``compile.py``) read the same numbers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch

__all__ = ["Tile", "LinearEntropyConfig", "default_config", "forward_splits", "MERGE_BLOCK", "GROUP_N", "ARCHS",
           "device_arch", "LinearSketchConfig", "default_sketch_config", "SKETCH_MERGE_BLOCK",
           "SKETCH_MERGE_WARPS", "SKETCH_VARIANTS", "VARIANTS"]


@dataclass(frozen=True)
class Tile:
    """Block sizes of one kernel. block_k: K step of the logits GEMM; block_d: D chunk of the dh/dW update."""

    block_n: int
    block_v: int
    block_k: int
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_k", "block_d"):
            v = getattr(self, name)
            # tl.dot needs every dimension >= 16 and power-of-two blocks.
            if v < 16 or v & (v - 1):
                raise ValueError(f"Tile.{name} must be a power of two >= 16, got {v}")


#: Designs of each pass of the fused heads (``LinearEntropyConfig`` / ``LinearSketchConfig``:
#: ``forward_variant`` / ``backward_variant``).
VARIANTS = ("fused", "chunked")
SKETCH_VARIANTS = VARIANTS


def _check_variants(cfg) -> None:
    for name in ("forward_variant", "backward_variant"):
        if getattr(cfg, name) not in VARIANTS + (None,):
            raise ValueError(f"{type(cfg).__name__}.{name} must be None or one of {VARIANTS}, "
                             f"got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class LinearEntropyConfig:
    """Launch configuration of the fused LM head.

    fwd: tile of the forward partials kernel; atomic: tile of the opt-in atomic backward kernel.
    dz: tile of the chunked backward's ``_bwd_dz_kernel``; None = the forward's (``dz_tile``).
    deterministic: True (default) = chunked backward (GEMM recompute of [C, V] logits, the row kernel in
        place, cuBLAS dh / dW GEMMs), bitwise reproducible; False = one fused kernel with fp32 atomics.
    vocab_splits: None = from the SM count (``forward_splits``); an int forces the forward's split count.
    chunk_rows: None = from the memory budget (``hero_kernels.backends.gemm.chunk_rows``); an int forces
        the backward's chunk C (and, without vocab_cols, its "rows" loop order).
    vocab_cols: None = the backward's loop order and vocab slice from the memory model
        (``hero_kernels.backends.gemm.backward_order``); an int forces the "vocab" order with slices of
        that many columns.
    allow_tf32: fp32 inputs only; TF32 tensor cores instead of IEEE fp32 dots (faster, ~1e-3 relative).
    forward_variant / backward_variant: the design of each pass (``VARIANTS``): "fused" (the tl.dot kernels
        above), "chunked" (per row chunk / vocab slice a cuBLAS GEMM writes the logits, the Triton row
        kernels of ``entropy_logprob`` read them; ``chunked.py``) or None: the environment variable
        ``HERO_KERNELS_LINEAR_FORWARD`` / ``_BACKWARD`` if set, else whichever ``launch.plan`` models faster.
        Either backward takes either forward's saved stats, on the logits that forward used (16-bit after a
        chunked 16-bit forward, fp32 after a fused one: ``launch.plan`` derives the forward's design from this
        config, so pass the backward the forward's config); deterministic=False runs the atomic kernel.
    """

    fwd: Tile
    atomic: Tile
    dz: Optional[Tile] = None
    deterministic: bool = True
    vocab_splits: Optional[int] = None
    chunk_rows: Optional[int] = None
    allow_tf32: bool = False
    vocab_cols: Optional[int] = None
    forward_variant: Optional[str] = None
    backward_variant: Optional[str] = None

    def __post_init__(self):
        _check_variants(self)
        for name in ("vocab_splits", "chunk_rows", "vocab_cols"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"LinearEntropyConfig.{name} must be None or an int >= 1, got {v!r}")

    @property
    def dz_tile(self) -> Tile:
        return self.dz if self.dz is not None else self.fwd


# 16-bit inputs: tensor-core tiles. fp32 inputs: IEEE fp32 dots run on FMA units, so smaller tiles keep
# the register file free of spills (checked by compile_resource_report / tests for sm_80 and sm_90a).
_CONFIG_16 = LinearEntropyConfig(
    fwd=Tile(block_n=128, block_v=128, block_k=64, num_warps=8, num_stages=3),
    atomic=Tile(block_n=64, block_v=128, block_k=64, block_d=32, num_warps=8, num_stages=2),
)
_CONFIG_32 = LinearEntropyConfig(
    fwd=Tile(block_n=64, block_v=128, block_k=32, num_warps=8, num_stages=2),
    atomic=Tile(block_n=64, block_v=64, block_k=16, block_d=16, num_warps=4, num_stages=2),
)


# sm_90 (H100 / H200), 16-bit inputs: the forward and the dz kernel at 128 x 256 x 64, 8 warps (two
# consumer warpgroups, 128 fp32 accumulator registers per thread), 3 stages: 85 FLOP per L2 byte instead of
# 64 (their L2 -> SM operand traffic bounds them, see ``hero_kernels.backends.plan.gemm_l2_bytes``). Both
# compile to wgmma without spills on sm_90a (255 / 198 registers, 144 KB shared; bf16 and fp16, with and
# without bias, checked by the compile tests). The forward fits because its epilogue is lean
# (``kernels._online_update``): exp2, an int32 label-column test and a select pass only on tiles holding a
# label or padded columns. Both spill on sm_80, so only sm_90 runs them.
_TILE_SM90 = Tile(block_n=128, block_v=256, block_k=64, num_warps=8, num_stages=3)
_CONFIG_16_SM90 = replace(_CONFIG_16, fwd=_TILE_SM90, dz=_TILE_SM90)

#: Compute capabilities with their own tuned configurations (major * 10 + minor); others use sm_80's.
ARCHS = (80, 90)


def default_config(dtype: torch.dtype, arch: Optional[int] = None) -> LinearEntropyConfig:
    """The configuration the launchers use for ``dtype`` on compute capability ``arch`` (e.g. 80, 90; see
    ``device_arch``) when none is given. arch None (CPU, the interpreter) or anything but sm_90: sm_80's."""
    if dtype == torch.float32:
        return _CONFIG_32
    return _CONFIG_16_SM90 if arch is not None and arch // 10 == 9 else _CONFIG_16


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability of a CUDA device as major * 10 + minor; None elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


#: Rows per program of the merge kernel.
MERGE_BLOCK = 256
#: Row blocks per group of the atomic backward's program order (their dh tiles stay in L2 together).
GROUP_N = 8
#: Forward vocab splits: at least this many (co-resident programs share their hidden block in L2).
MIN_SPLITS, MAX_SPLITS = 8, 16


def forward_splits(row_blocks: int, V: int, block_v: int, sms: int, forced: Optional[int] = None) -> int:
    """Vocab splits S of the forward. Programs run in split-fastest order (pid -> (pid // S, pid % S)), so
    a wave of ``sms`` programs covers ~sms / S row blocks x S splits: each hidden block is read by S
    co-resident programs and each weight tile by sms / S of them. S ~ sqrt(sms) balances the two (8-16);
    few row blocks raise S to fill two waves. Never more splits than vocab tiles."""
    tiles = -(-V // block_v)
    if forced is not None:
        return max(1, min(forced, tiles))
    s = MIN_SPLITS
    while s * s < sms and s < MAX_SPLITS:
        s += 1
    s = max(s, -(-2 * sms // max(row_blocks, 1)))
    return max(1, min(s, tiles))


# ----------------------------------------------------------------------------------------------
# the fused gradient sketch (``linear_grad_sketch``; kernels in ``sketch_kernels.py``)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSketchConfig:
    """Launch configuration of the fused gradient sketch through the LM head.

    fwd: tile of ``_sketch_fwd_partials_kernel`` (logits tile block_n x block_v, GEMM step block_k);
    dz: tile of ``_sketch_bwd_dz_kernel``; block_p: sketch columns of the forward's accumulator (a power of
    two >= 16; k above it: forward programs per sketch block, each recomputing the logits); dz_block_p: the
    dz kernel's step over the sketch dimension (it loops, any k).
    vocab_splits / chunk_rows / allow_tf32: as in ``LinearEntropyConfig``.
    forward_variant / backward_variant: "fused" (the kernels above; the backward's dz kernel recomputes the
    logits tile), "chunked" (per chunk of chunk_rows rows a cuBLAS GEMM writes the fp32 logits [C, V], then
    the row kernel of ``grad_sketch``: the forward's a / stats, the backward's dz) or None: the environment
    variable ``HERO_KERNELS_SKETCH_FORWARD`` / ``_BACKWARD`` if set, else whichever ``sketch_launch.plan``
    models faster. Both backwards end in the same cuBLAS dh / dW GEMMs; both take either forward's stats.
    """

    fwd: Tile
    dz: Tile
    block_p: int = 128
    dz_block_p: int = 64
    vocab_splits: Optional[int] = None
    chunk_rows: Optional[int] = None
    allow_tf32: bool = False
    forward_variant: Optional[str] = None
    backward_variant: Optional[str] = None

    def __post_init__(self):
        _check_variants(self)
        for name in ("block_p", "dz_block_p"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"LinearSketchConfig.{name} must be a power of two >= 16, got {v}")
        for name in ("vocab_splits", "chunk_rows"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"LinearSketchConfig.{name} must be None or an int >= 1, got {v!r}")


# Two fp32 accumulators per program (the logits tile and the [block_n, block_p] sketch / w tile), like a
# flash-attention forward: tiles chosen as the largest that compile without spills on sm_80 and sm_90a
# (tests/test_grad_sketch.py::test_fused_sketch_compile_no_spills; numbers in sketch_launch's docstring).
_SKETCH_16 = LinearSketchConfig(fwd=Tile(block_n=128, block_v=64, block_k=64, num_warps=8, num_stages=3),
                                dz=Tile(block_n=128, block_v=64, block_k=64, num_warps=8, num_stages=3))
# fp32 (IEEE dots on the FMA units): 64 x 64 forward tiles with a 64- or 32-column sketch block spill 160-384 B;
# 64 x 32 with 32 sketch columns (4 sketch blocks at k = 128, each recomputing the logits) compiles to 128
# registers. The fp32 path is the accurate one, not the fast one.
_SKETCH_32 = LinearSketchConfig(fwd=Tile(block_n=64, block_v=32, block_k=32, num_warps=8, num_stages=2),
                                dz=Tile(block_n=64, block_v=64, block_k=32, num_warps=4, num_stages=2), block_p=32,
                                dz_block_p=32)
# sm_90: the dz kernel at 128 x 128 (wgmma, 254 registers, no spills; 48-112 B of spills on sm_80 and with
# dz_block_p = 128, so sm_80 runs 128 x 64 (207 registers) and both step 64 sketch columns at a time).
_SKETCH_BY_ARCH = {90: replace(_SKETCH_16, dz=Tile(block_n=128, block_v=128, block_k=64, num_warps=8, num_stages=3))}

#: Rows per program and warps of the sketch merge kernel (16 rows x 128 sketch columns: 4 warps leave 8 B of
#: stack on sm_80, 8 warps 77 registers and none).
SKETCH_MERGE_BLOCK, SKETCH_MERGE_WARPS = 16, 8


def default_sketch_config(dtype: torch.dtype, arch: Optional[int] = None) -> LinearSketchConfig:
    """The sketch launchers' configuration for ``dtype`` on compute capability ``arch`` (None: sm_80's)."""
    if dtype == torch.float32:
        return _SKETCH_32
    return _SKETCH_BY_ARCH.get(None if arch is None else arch // 10 * 10, _SKETCH_16)
