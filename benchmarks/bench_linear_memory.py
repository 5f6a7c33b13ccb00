"""Peak extra memory of the fused LM head (forward + backward): chunked PyTorch path vs eager PyTorch, on CPU.

Run: ``python -m benchmarks.bench_linear_memory [--N 8192 --D 512 --V 32000 --json out.json]``
Import: ``measure(N, D, V, ...) -> dict`` (used by tests and the benchmark suite).

Variants (fp32, N tokens, D width, V vocab, random upstream gradients g on logp and k on H)
------------------------------------------------------------------------------------------
* ``eager``: ``(hidden @ W.T).float()``, then log_softmax / entropy / gather
  (``benchmarks.impls.eager_linear_entropy_logprob``), ``(g*logp + k*H).sum().backward()`` through autograd.
* ``chunked``: ``hero_kernels.backends.torch.linear_entropy_logprob`` forward + backward (``impl="torch"``):
  row chunks of C rows, each building its fp32 [C, V] logits and calling the reference math.

Method
------
Each variant runs in a FRESH subprocess, so allocator state and earlier peaks never leak between them. The
child builds the inputs (hidden, weight, labels, g, k), runs the same variant once at a tiny size (loads
MKL / thread pools), then measures one forward+backward with ``benchmarks.common.MemoryMeter``:
``malloc_trim(0)`` returns glibc's free heap pages to the OS, writing 5 to ``/proc/self/clear_refs`` resets
the peak resident set, and the result is ``VmHWM`` after the call minus ``VmRSS`` before it: the call's own
peak above everything already resident (inputs included in the baseline, not in the figure). PyTorch's CPU
allocator does not cache, so the resident set tracks live tensors to a page. Outputs created by the call
(logp, H and the gradients of hidden and weight) count in both variants.

Memory model (bytes; fp32 so 4 per element)
-------------------------------------------
* eager: autograd keeps several [N, V] fp32 tensors alive (logits, log_softmax output, p = exp(log p),
  p * log p, then their gradients in backward): ~4-6 x 4*N*V. At N=8192, V=32000 one [N, V] is 1.05 GB.
* chunked torch path: O(C*V) for one chunk (~10 fp32 [C, V] temporaries inside the reference math, C chosen
  so one is <= ``TorchChunkConfig.max_chunk_bytes``) + O(N*D + V*D) for the fp32 gradient accumulators
  (and an fp32 copy of a 16-bit weight). Independent of N*V.
* Triton path (GPU, not measured here): O(N*D + V*D + tile): fp32 dh / dW accumulators (N*D*4 + V*D*4),
  per-row partials (4 * splits * N floats), compacted copies of the valid rows of hidden; logits exist
  only as [BLOCK_N, BLOCK_V] register tiles, never in memory.

Measured (2-core x86 CPU, torch 2.13 CPU, default 16 MiB chunks): eager 5010 MiB, chunked 265 MiB, ratio
0.053 at N=8192, D=512, V=32000; 632 MiB vs 59 MiB (0.094) at N=2048, D=256, V=16000 with 2 MiB chunks.

Byte / FLOP model of the Triton path: forward 2*N*D*V FLOPs, reads N*D + V*D inputs per row-block /
vocab-tile pass (L2-resident re-reads of W, one per row block); deterministic backward 8*N*D*V FLOPs
(2 logits recomputes + dh + dW GEMMs) and the atomic option 6*N*D*V; the design floor
is 8*N*D*V in total (forward, recompute, dh, dW) over the matmul peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

VARIANTS = ("eager", "chunked")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the chunked path must stay at or below this fraction of eager's peak extra memory
MAX_RATIO = 0.15


def _inputs(N: int, D: int, V: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen)
    W = torch.randn(V, D, generator=gen) / D**0.5
    y = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(N, generator=gen)
    k = torch.randn(N, generator=gen)
    return h, W, y, g, k


def _run(variant: str, h, W, y, g, k, chunk_bytes: Optional[int]):
    """One forward + backward; returns the outputs (kept alive until the peak is read)."""
    if variant == "eager":
        from benchmarks.impls import eager_linear_entropy_logprob

        h_ = h.detach().requires_grad_()
        W_ = W.detach().requires_grad_()
        logp, H = eager_linear_entropy_logprob(h_, W_, y)
        (g * logp + k * H).sum().backward()
        return logp.detach(), H.detach(), h_.grad, W_.grad
    if variant == "chunked":
        from hero_kernels.backends import UpstreamGrads
        from hero_kernels.backends.torch import linear_entropy_logprob as TB
        from hero_kernels.options import RowOptions

        cfg = TB.TorchChunkConfig(max_chunk_bytes=chunk_bytes) if chunk_bytes else None
        opts = RowOptions()
        saved = TB.forward(h, W, None, y, opts, cfg)
        dh, dW, _ = TB.backward(h, W, None, y, saved, UpstreamGrads(g, k), opts, cfg)
        return saved.logp, saved.H, dh, dW
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _child(variant: str, N: int, D: int, V: int, chunk_bytes: Optional[int], threads: Optional[int]) -> Dict:
    import torch

    from benchmarks.common import MemoryMeter

    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(True)
    meter = MemoryMeter(torch.device("cpu"))
    if not meter.available:
        raise RuntimeError("CPU peak memory cannot be measured here (needs /proc/self/clear_refs and glibc)")
    _run(variant, *_inputs(16, min(D, 64), min(V, 512), seed=1), chunk_bytes)  # warm-up: libraries, pools
    inputs = _inputs(N, D, V)
    t0 = time.perf_counter()
    peak = meter.measure(lambda: _run(variant, *inputs, chunk_bytes))
    return {"variant": variant, "peak_extra_bytes": peak, "seconds": time.perf_counter() - t0,
            "method": meter.method}


def measure(N: int = 8192, D: int = 512, V: int = 32000, chunk_bytes: Optional[int] = None,
            variants=VARIANTS, threads: Optional[int] = None, timeout: float = 1800) -> Dict:
    """Run each variant in a fresh subprocess; returns {variant: result dict, "ratio": chunked / eager, ...}."""
    out: Dict = {"N": N, "D": D, "V": V, "dtype": "float32", "device": "cpu", "chunk_bytes": chunk_bytes}
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for v in variants:
        cmd = [sys.executable, "-m", "benchmarks.bench_linear_memory", "--child", v, "--N", str(N), "--D", str(D),
               "--V", str(V)]
        if chunk_bytes:
            cmd += ["--chunk-bytes", str(chunk_bytes)]
        if threads:
            cmd += ["--threads", str(threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"variant {v} failed:\n{r.stderr[-4000:]}")
        out[v] = json.loads(r.stdout.strip().splitlines()[-1])
    if "eager" in out and "chunked" in out:
        out["ratio"] = out["chunked"]["peak_extra_bytes"] / max(1, out["eager"]["peak_extra_bytes"])
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--chunk-bytes", type=int, default=None,
                   help="TorchChunkConfig.max_chunk_bytes (default: its default, 16 MiB)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.N, a.D, a.V, a.chunk_bytes, a.threads)))
        return 0
    res = measure(a.N, a.D, a.V, a.chunk_bytes, threads=a.threads)
    mb = lambda b: b / 2**20  # noqa: E731
    print(f"fused LM head fwd+bwd, fp32 CPU, N={a.N} D={a.D} V={a.V}  ({res['eager']['method']})")
    for v in VARIANTS:
        print(f"  {v:8s} peak extra {mb(res[v]['peak_extra_bytes']):9.1f} MiB   ({res[v]['seconds']:.1f} s)")
    ok = res["ratio"] <= MAX_RATIO
    print(f"  ratio chunked / eager = {res['ratio']:.3f}  (bound {MAX_RATIO}: {'OK' if ok else 'EXCEEDED'})")
    if a.json:
        from benchmarks.common import atomic_write

        atomic_write(a.json, json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
