"""Compile GPU code for sm_80 / sm_90a WITHOUT a GPU and read its resource usage.

Used by tests (fail on local-memory spills) and by ``python -m benchmarks.compile_report``.

* Triton: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` builds a cubin;
  ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) reports REG / STACK / SHARED / LOCAL.
* CUDA: ``nvcc -cubin -arch=sm_XX --resource-usage`` on a pure-CUDA translation unit (no torch headers).

``LOCAL`` > 0 or ``STACK`` > 0 means the kernel spills registers to local memory (slow HBM traffic).
Triton's spills show up as STACK with LOCAL = 0, so both count.

Pass ``attrs`` (e.g. ``{(0,): [["tt.divisibility", 16]]}``) to compile the variant the runtime actually
launches: Triton specializes pointers and ints divisible by 16 at run time, and without those hints the
offline build is an unaligned, unvectorized variant with different register use.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

__all__ = ["ResourceUsage", "triton_compile", "triton_resource_usage", "nvcc_resource_usage", "cuobjdump_path",
           "nvcc_path", "nvcc_cubin", "cubin_sass", "cubin_max_threads"]


@dataclass
class ResourceUsage:
    """Per-kernel resource usage of one compiled function for one target."""

    kernel: str
    arch: str  # "sm_80" / "sm_90a"
    registers: int
    shared_bytes: int  # static shared memory (plus Triton's dynamic shared, when known)
    local_bytes: int  # per-thread local memory: > 0 means spills
    stack_bytes: int
    config: str = ""

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    def as_dict(self) -> dict:
        return asdict(self)


_FUNC = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump_path() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.exists(p) else shutil.which("cuobjdump")


def nvcc_path() -> Optional[str]:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _parse_cuobjdump(text: str, arch: str, extra_shared: int = 0, config: str = "") -> List[ResourceUsage]:
    out = []
    for name, reg, stack, shared, local in _FUNC.findall(text):
        out.append(ResourceUsage(name, arch, int(reg), int(shared) + extra_shared, int(local), int(stack), config))
    return out


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships in the triton wheel under triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True)
    return r.stdout


def _dump_cubin(cubin: bytes) -> str:
    return _cuobjdump(cubin, "--dump-resource-usage")


def cubin_sass(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin: one ``Function : <mangled name>`` section per kernel."""
    return _cuobjdump(cubin, "-sass")


_MAX_THREADS = re.compile(r"^\.nv\.info\.(\S+)\s*$|EIATTR_MAX_THREADS\s*\n\s*Format:.*\n\s*Value:\s*(0x[0-9a-f]+)", re.M)


def cubin_max_threads(cubin: bytes) -> Dict[str, int]:
    """{mangled kernel name: threads per block} from the cubin's EIATTR_MAX_THREADS (``__launch_bounds__`` /
    Triton's reqntid); kernels without that attribute are absent."""
    out, current = {}, None
    for name, val in _MAX_THREADS.findall(_cuobjdump(cubin, "-elf")):
        if name:
            current = name
        elif current:
            out[current] = int(val, 16)
    return out


def triton_compile(fn, signature: Dict[str, str], constexprs: Dict[str, object], cc: int, num_warps: int = 4,
                   num_stages: int = 3, attrs: Optional[Dict[tuple, list]] = None):
    """Compile a ``@triton.jit`` function for ``cc`` without a GPU; ``.asm`` holds "ttgir", "ptx", "cubin"
    (e.g. to check that an sm_90a GEMM uses wgmma: ``"wgmma.mma_async" in compiled.asm["ptx"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def triton_resource_usage(
    fn,
    signature: Dict[str, str],
    constexprs: Dict[str, object],
    cc: int,
    num_warps: int = 4,
    num_stages: int = 3,
    config: str = "",
    attrs: Optional[Dict[tuple, list]] = None,
) -> ResourceUsage:
    """Compile a ``@triton.jit`` function for ``cc`` (80 or 90) and report its resources.

    signature: argument name -> Triton type string ("*fp32", "*bf16", "i32", "i64", "fp32", "constexpr").
    constexprs: values for the constexpr arguments.
    attrs: ASTSource attributes per argument index, e.g. divisibility hints (see the module docstring).
    """
    compiled = triton_compile(fn, signature, constexprs, cc, num_warps, num_stages, attrs)
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    rows = _parse_cuobjdump(_dump_cubin(compiled.asm["cubin"]), arch, 0, config)
    if not rows:
        raise RuntimeError(f"no function found in the cubin of {fn.__name__} for {arch}")
    row = rows[0]
    # Triton's dynamic shared memory is in the metadata, not in the cubin's static SHARED figure.
    row.shared_bytes = max(row.shared_bytes, int(getattr(compiled.metadata, "shared", 0)))
    return row


def nvcc_cubin(cu_file: str, cc: int, extra_flags: Optional[List[str]] = None) -> bytes:
    """Compile a pure-CUDA ``.cu`` to a cubin for ``cc`` (sm_90a for 90)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "k.cubin")
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-o", out, cu_file] + list(extra_flags or [])
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        with open(out, "rb") as f:
            return f.read()


def nvcc_resource_usage(cu_file: str, cc: int, extra_flags: Optional[List[str]] = None) -> List[ResourceUsage]:
    """Compile a pure-CUDA ``.cu`` to a cubin for ``cc`` and report every kernel in it."""
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    return _parse_cuobjdump(_dump_cubin(nvcc_cubin(cu_file, cc, extra_flags)), arch)
