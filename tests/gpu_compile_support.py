"""Shared by the tests that check GPU code without a GPU: compiles of real sm_80 / sm_90a code, and GPU-sized
element offsets in the interpreter (``sparse_rows``).

``triton.compile`` needs real JIT functions, which ``TRITON_INTERPRET=1`` (set by conftest on CPU machines)
replaces with interpreted ones, so each compile runs in a subprocess without that variable.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_compiler() -> None:
    """Skip unless triton's NVIDIA backend and cuobjdump (for the register / spill counts) are present."""
    pytest.importorskip("triton.backends.nvidia")
    from hero_kernels.gpu_compile import cuobjdump_path

    if cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")


def compile_env() -> dict:
    """This process's environment without TRITON_INTERPRET, with the checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_json_script(script: str, *args: str, timeout: float):
    """Run ``python -c script args...`` under ``compile_env()``; return the JSON on its last stdout line."""
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=compile_env(),
                       cwd=REPO, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def sparse_rows(path, rows: int, row_stride: int, cols: int, dtype):
    """A [rows, cols] view at row stride ``row_stride`` elements into a sparse file mapped shared (zeros): row
    offsets beyond 2^31 elements, as at GPU shapes (16384 x 151936 logits: 2.49e9), without allocating the
    memory between the rows (only the pages touched exist). For kernels run in the Triton interpreter."""
    import torch

    n = (rows - 1) * row_stride + cols
    with open(path, "wb") as f:
        f.truncate(n * torch.empty((), dtype=dtype).element_size())
    return torch.from_file(str(path), shared=True, size=n, dtype=dtype).as_strided((rows, cols), (row_stride, 1))
