"""pytest-benchmark: every op x every implementation x {fwd, fwd+bwd}; time from pytest-benchmark, peak memory,
byte/FLOP model, floor and floor fraction in each benchmark's ``extra_info``.

    pytest benchmarks/bench_ops.py                                  # CPU: size ci, fp32
    pytest benchmarks/bench_ops.py -k "entropy_logprob and fwd+bwd" --benchmark-json out.json
    HERO_BENCH_SIZE=full pytest benchmarks/bench_ops.py             # GPU default: full, bf16

Environment: HERO_BENCH_SIZE (tiny | ci | full; default full on CUDA, ci on CPU), HERO_BENCH_DEVICE
(cpu | cuda), HERO_BENCH_IMPLS (comma list, as ``python -m benchmarks --impls``). An implementation that
cannot run here is skipped with its reason. Memory and floors use the same methods as ``python -m benchmarks``
(benchmarks/common.py); on CUDA each timed call ends with a synchronize (pytest-benchmark uses wall clocks).
"""
from __future__ import annotations

import gc
import os
from typing import Dict, Optional

import pytest
import torch

from benchmarks import common as C
from benchmarks import impls as I

DEVICE = torch.device(os.environ.get("HERO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SIZE = os.environ.get("HERO_BENCH_SIZE") or ("full" if DEVICE.type == "cuda" else "ci")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
_IMPLS = I.get_impls([x for x in os.environ.get("HERO_BENCH_IMPLS", "").split(",") if x.strip()] or None)
_BY_NAME = {i.name: i for i in _IMPLS}
_ROUNDS = {"tiny": (1, 2), "ci": (1, 5), "full": (2, 10)}  # (warm-up rounds, timed rounds)

_PARAMS = [
    pytest.param(op, case, impl.name, p, id=f"{op}-{case.label}-{impl.name}-{p}")
    for op in C.OPS
    for case in C.cases_for(op, SIZE)
    for impl in _IMPLS
    if op in impl.ops
    for p in C.PASSES
]

_avail: Dict[tuple, Optional[str]] = {}
_inputs: Dict[str, object] = {}  # one case's inputs at a time (full-size logits are GBs)


@pytest.fixture(scope="session")
def ceilings() -> C.Ceilings:
    return C.measure_ceilings(DEVICE, DTYPE, SIZE)


@pytest.fixture(scope="session")
def meter() -> C.MemoryMeter:
    return C.MemoryMeter(DEVICE)


def _get_inputs(case: C.Case) -> I.Inputs:
    if _inputs.get("case") != case:
        _inputs.clear()
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _inputs["case"] = case
        _inputs["inp"] = I.make_inputs(case, DEVICE, DTYPE)
    return _inputs["inp"]


@pytest.mark.parametrize("op,case,impl_name,pass_", _PARAMS)
def test_op(benchmark, ceilings, meter, op, case, impl_name, pass_):
    impl = _BY_NAME[impl_name]
    key = (op, impl_name)
    if key not in _avail:
        _avail[key] = impl.check(op, DEVICE, DTYPE)
    if _avail[key] is not None:
        pytest.skip(_avail[key])
    inp = _get_inputs(case)
    built = impl.build(op, inp)
    call = I.make_call(built, inp, pass_, sync_device=DEVICE)
    call()  # first call: torch.compile / Triton JIT, not timed
    warm, rounds = _ROUNDS[SIZE]
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warm, iterations=1)
    for leaf in built.leaves:
        leaf.grad = None
    peak = meter.measure(call)
    for leaf in built.leaves:
        leaf.grad = None
    elt = torch.empty((), dtype=DTYPE).element_size()
    model = C.work_model(case, pass_, elt)
    floor = C.floor_seconds(model, ceilings.bandwidth, ceilings.matmul_flops)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = getattr(stats, "median", None)
    benchmark.extra_info.update({
        "op": op, "shape": case.as_dict(), "impl": impl_name, "kind": impl.kind, "pass": pass_,
        "device": C.device_label(DEVICE), "dtype": str(DTYPE).replace("torch.", ""),
        "peak_mem_bytes": peak, "memory_method": meter.method,
        "bytes": model["bytes"], "flops": model["flops"], "model": model["formula"], "floor_s": floor,
        "floor_frac": (floor / median) if median else None,
        "bandwidth_Bps": ceilings.bandwidth, "matmul_flops": ceilings.matmul_flops,
    })
