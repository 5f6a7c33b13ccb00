"""CUDA kernels in csrc/: compile checks without a GPU, runtime checks with one.

1. Every ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90a (with the flags torch's extension build
   adds) and no kernel spills: LOCAL == 0 and STACK == 0 for every kernel. Registers / shared memory are
   printed (run with ``-s`` to see them). Skipped, with the reason, only when nvcc is missing.
2. Runtime tests (marked ``gpu``, skipped without CUDA): CUDA-specific shapes the shared grid in
   test_cpu_backend.py does not reach (long vocabularies, every row alignment, int64 offsets, many rows),
   against the float64 reference and against the CPU backend (same per-row math header).
"""
from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hero_kernels import reference as R
from hero_kernels.backends import RowStats, UpstreamGrads
from hero_kernels.gpu_compile import nvcc_path, nvcc_resource_usage
from hero_kernels.options import RowOptions

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = (80, 90)
# What torch.utils.cpp_extension passes to nvcc for extension sources, so the check matches the real build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-DHK_WITH_CUDA",
    f"-I{CSRC}",
]


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return name
    return out.replace("(anonymous namespace)::", "").split("(")[0] or name


@pytest.fixture(scope="module")
def resource_table():
    if nvcc_path() is None:
        pytest.skip("nvcc not found: cannot compile csrc/*.cu for sm_80 / sm_90a")
    assert CU_FILES, f"no .cu files under {CSRC}"
    jobs = [(cu, cc) for cu in CU_FILES for cc in ARCHS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # nvcc runs are independent: overlap them
        results = list(pool.map(lambda j: nvcc_resource_usage(str(j[0]), j[1], TORCH_NVCC_FLAGS), jobs))
    table = {job: rows for job, rows in zip(jobs, results)}
    print()
    for (cu, cc), rows in table.items():
        for r in rows:
            print(
                f"[nvcc] {cu.name} {r.arch:7s} reg={r.registers:3d} shared={r.shared_bytes:5d}B "
                f"local={r.local_bytes}B stack={r.stack_bytes}B  {_demangle(r.kernel)}"
            )
    return table


@pytest.mark.slow  # nvcc of every .cu for every target arch
@pytest.mark.parametrize("cc", ARCHS)
def test_cu_compiles_without_spills(resource_table, cc):
    for cu in CU_FILES:
        rows = resource_table[(cu, cc)]
        assert rows, f"{cu.name}: no kernels found in the sm_{cc} cubin"
        names = {_demangle(r.kernel).split("<")[0].split()[-1] for r in rows}
        if cu.name == "entropy_logprob_cuda.cu":
            assert {"entropy_logprob_fwd_kernel", "entropy_logprob_bwd_kernel"} <= names, names
        for r in rows:
            assert r.local_bytes == 0, f"{cu.name} {r.arch} {_demangle(r.kernel)} spills {r.local_bytes} B local"
            assert r.stack_bytes == 0, f"{cu.name} {r.arch} {_demangle(r.kernel)} uses {r.stack_bytes} B stack"
            assert r.registers <= 64, f"{cu.name} {r.arch} {_demangle(r.kernel)}: {r.registers} registers > 64"


def test_cu_compiles_like_the_extension_build(tmp_path):
    """``nvcc -c`` (host and device passes, as torch.utils.cpp_extension builds a .cu) of every csrc/*.cu for
    sm_90 with torch's flags. The resource check above builds device code only (``-cubin``), which never
    compiles the host side: an error there (hero_rowmath.h's std::memcpy without <cstring> under nvcc 13)
    surfaces only on a GPU machine, as a CUDA build that falls back to the CPU-only extension."""
    if nvcc_path() is None:
        pytest.skip("nvcc not found: cannot compile csrc/*.cu")
    for cu in CU_FILES:
        cmd = [nvcc_path(), "-c", "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90",
               "--compiler-options", "-fPIC", *TORCH_NVCC_FLAGS, "-o", str(tmp_path / (cu.stem + ".o")), str(cu)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cu.name}: nvcc -c failed:\n{r.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------
# runtime (needs a GPU)
# ------------------------------------------------------------------------------------------------
def _cuda_backend():
    from hero_kernels import _cpp_build
    from hero_kernels.backends.cuda import entropy_logprob as cuda_el

    _cpp_build.require_cuda()  # fails with the build reason rather than skipping
    return cuda_el


def _check_vs_reference(logits, labels, g, k, tau, lse_tol_rel=2e-6):
    be = _cuda_backend()
    opts = RowOptions(temperature=tau)
    logp, H, lse = be.forward(logits, labels, opts)
    dz = be.backward(logits, labels, RowStats(None, H, lse), UpstreamGrads(g, k), opts)
    zc, yc = logits.float().cpu(), labels.cpu()
    r_logp, r_H, r_lse = R.entropy_logprob(zc, yc, tau)
    r_dz = R.entropy_logprob_backward(zc, yc, g.cpu(), k.cpu(), tau)
    scale = 1 + r_lse.abs().max().item()
    torch.testing.assert_close(logp.cpu().double(), r_logp, rtol=0, atol=lse_tol_rel * scale)
    torch.testing.assert_close(H.cpu().double(), r_H, rtol=0, atol=lse_tol_rel * scale)
    torch.testing.assert_close(lse.cpu().double(), r_lse, rtol=0, atol=lse_tol_rel * scale)
    eps = torch.finfo(logits.dtype).eps
    atol = (eps + 4 * 2.0**-24 * scale) * r_dz.abs().max().item()
    torch.testing.assert_close(dz.cpu().double(), r_dz, rtol=0, atol=atol)
    return logp, H, lse, dz


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("V", [32000, 151936])
@pytest.mark.parametrize("pad", [0, 1, 3, 8])
def test_cuda_long_rows_every_alignment(dtype, V, pad):
    """Long vocabularies at every 16-byte phase: vector body, scalar head and tail all used."""
    torch.manual_seed(V + pad)
    N = 16
    buf = torch.full((N, V + pad), float("nan"), dtype=dtype, device="cuda")
    buf[:, :V] = (3 * torch.randn(N, V, device="cuda")).to(dtype)
    logits = buf[:, :V]
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[3] = -100
    g, k = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    _check_vs_reference(logits, labels, g, k, 0.9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_backend_and_inplace():
    from hero_kernels.backends.cpu import entropy_logprob as cpu_el

    be = _cuda_backend()
    torch.manual_seed(0)
    N, V = 300, 5003
    logits = (2 * torch.randn(N, V)).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,))
    labels[::7] = -100
    g, k = torch.randn(N), torch.randn(N)
    opts = RowOptions(temperature=1.1)
    c = cpu_el.forward(logits, labels, opts)
    d = be.forward(logits.cuda(), labels.cuda(), opts)
    for a, b in zip(c, d):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    dz_cpu = cpu_el.backward(logits, labels, c, UpstreamGrads(g, k), opts)
    work = logits.cuda().clone()
    dz_gpu = be.backward(work, labels.cuda(), d, UpstreamGrads(g.cuda(), k.cuda()), opts, out=work)
    assert dz_gpu.data_ptr() == work.data_ptr()
    diff = (dz_gpu.cpu().float() - dz_cpu.float()).abs().max().item()
    assert diff <= 2 * torch.finfo(torch.bfloat16).eps * dz_cpu.float().abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_many_rows_and_bad_label():
    """More rows than a typical grid, and an out-of-range label gives NaN for that row only."""
    be = _cuda_backend()
    torch.manual_seed(1)
    N, V = 70000, 64
    logits = torch.randn(N, V, device="cuda")
    labels = torch.randint(0, V, (N,), device="cuda")
    g, k = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    idx = torch.arange(0, N, 997, device="cuda")
    _check_vs_reference(logits[idx], labels[idx], g[idx], k[idx], 1.0)
    logp, H, lse = be.forward(logits, labels, RowOptions())
    r_logp, r_H, _ = R.entropy_logprob(logits[idx].cpu(), labels[idx].cpu())
    torch.testing.assert_close(logp[idx].cpu().double(), r_logp, rtol=0, atol=1e-5)
    labels[5] = V + 3
    logp, H, lse = be.forward(logits, labels, RowOptions())
    assert torch.isnan(logp[5]) and torch.isfinite(logp[torch.arange(N, device="cuda") != 5]).all()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_int64_offsets():
    """N * V > 2^31 elements: the last rows must be addressed with 64-bit offsets."""
    V = 131072
    N = (2**31) // V + 8
    need = N * V * 2 * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, have {free / 2**30:.1f}")
    be = _cuda_backend()
    logits = torch.empty(N, V, dtype=torch.bfloat16, device="cuda")
    logits.normal_()
    labels = torch.randint(0, V, (N,), device="cuda")
    g, k = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    opts = RowOptions()
    logp, H, lse = be.forward(logits, labels, opts)
    tail = torch.arange(N - 4, N, device="cuda")
    z_tail, y_tail = logits[tail].cpu(), labels[tail].cpu()
    r_logp, r_H, r_lse = R.entropy_logprob(z_tail, y_tail)
    torch.testing.assert_close(lse[tail].cpu().double(), r_lse, rtol=0, atol=3e-5)
    torch.testing.assert_close(H[tail].cpu().double(), r_H, rtol=0, atol=3e-5)
    torch.testing.assert_close(logp[tail].cpu().double(), r_logp, rtol=0, atol=3e-5)
    be.backward(logits, labels, RowStats(None, H, lse), UpstreamGrads(g, k), opts, out=logits)  # in place, 4 GiB
    r_dz = R.entropy_logprob_backward(z_tail, y_tail, g[tail].cpu(), k[tail].cpu())
    atol = 2 * torch.finfo(torch.bfloat16).eps * r_dz.abs().max().item()
    torch.testing.assert_close(logits[tail].cpu().double(), r_dz, rtol=0, atol=atol)
