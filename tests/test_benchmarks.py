"""The benchmark suite: work models, the in-process suite at size tiny (JSON ratios for every op, markdown,
PNG), the compile report's table / exit codes, and the GPU suite script's CPU dry run (slow)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import common as C
from benchmarks import impls as I

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_work_models_and_floors():
    c = C.Case("entropy_logprob", N=1000, V=32000)
    assert C.work_model(c, "fwd", 2)["bytes"] == 1000 * 32000 * 2
    assert C.work_model(c, "fwd+bwd", 2)["bytes"] == 3 * 1000 * 32000 * 2
    lc = C.Case("linear_entropy_logprob", N=64, V=1000, D=128)
    assert C.work_model(lc, "fwd", 2)["flops"] == 2 * 64 * 128 * 1000
    m = C.work_model(lc, "fwd+bwd", 2)
    assert m["flops"] == 8 * 64 * 128 * 1000
    # the floor is the larger of the byte time and the FLOP time
    assert C.floor_seconds(m, bandwidth=1e30, matmul_flops=1e9) == pytest.approx(m["flops"] / 1e9)
    assert C.floor_seconds(m, bandwidth=1.0, matmul_flops=1e30) == pytest.approx(m["bytes"])
    hc = C.cases_for("hero_loss", "tiny")[0]
    assert hc.N == hc.B * hc.T and hc.label.startswith("B=")
    for size in C.SIZES:
        for op in C.OPS:
            assert C.cases_for(op, size), (op, size)
    with pytest.raises(ValueError, match="size"):
        C.cases_for("entropy_logprob", "huge")


def test_eager_baseline_matches_reference():
    from hero_kernels import reference as R

    x = torch.randn(6, 50) * 3
    y = torch.randint(0, 50, (6,))
    y[2] = -100
    logp, H = I.eager_entropy_logprob(x, y)
    rl, rH, _ = R.entropy_logprob(x, y)
    torch.testing.assert_close(logp.double(), rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(H.double(), rH, atol=1e-5, rtol=1e-5)


def test_memory_meter_counts_temporaries():
    meter = C.MemoryMeter(torch.device("cpu"))
    if not meter.available:
        pytest.skip(f"no CPU memory meter here ({meter.method})")
    x = torch.randn(1024, 1024)  # 4 MiB

    def f():
        a = x * 2  # 4 MiB
        b = a + 1  # 4 MiB, both alive at the peak
        return float(b[0, 0])

    peak = meter.measure(f)
    assert 7.5 * 2**20 <= peak <= 10 * 2**20, peak


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown impl"):
        I.get_impls(["nope"])
    from benchmarks.__main__ import run_suite

    with pytest.raises(ValueError, match="unknown op"):
        run_suite(size="tiny", ops=["nope"], write=False, progress=False)


def test_suite_tiny_writes_ratios_for_every_op(tmp_path):
    """The whole suite in-process at size tiny: every op gets ours-vs-eager ratios for both passes, and the
    JSON, markdown and PNG are written. Anchors that are not installed must be skipped with a reason."""
    from benchmarks.__main__ import print_report, run_suite

    t0 = time.perf_counter()
    res = run_suite(size="tiny", impls=["ours", "eager", "liger", "cce", "verl"], device="cpu", out_dir=str(tmp_path),
                    stem="t", progress=False, threads=1)
    wall = time.perf_counter() - t0
    assert wall < 60, f"tiny suite took {wall:.1f} s"
    paths = res["files"]
    assert set(paths) == {"json", "md", "png"}
    with open(paths["json"]) as f:
        data = json.load(f)
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["md"]).read()
    assert "## Headline" in md and "floor" in md
    assert data["ceilings"]["bandwidth"] > 0 and data["ceilings"]["matmul_flops"] > 0
    assert set(data["ops"]) == set(C.OPS)
    for op, entry in data["ops"].items():
        assert entry["status"] == "ok", (op, entry["reason"])
        passes = {(r["pass"]) for r in entry["ratios"] if r["primary"] and r["anchor"] == "eager"}
        assert passes == set(C.PASSES), (op, entry["ratios"], data["skipped"])
        for r in entry["ratios"]:
            assert r["speedup"] is None or r["speedup"] > 0
        for case in entry["cases"]:
            for p in C.PASSES:
                assert case["model"][p]["floor_s"] > 0
                eager = case["results"][p]["eager"]
                assert eager["status"] == "ok", eager
                assert eager["time_ms"] > 0 and 0 < eager["floor_frac"]
                if data["memory_method"] != "unmeasured":
                    assert eager["peak_mem_bytes"] > 0
            for n, r in case["results"]["fwd"].items():
                if r["status"] == "ok" and r.get("max_abs_diff_vs_eager"):
                    assert max(r["max_abs_diff_vs_eager"].values()) < 1e-3, (op, n, r)
        for name, d in entry["impls"].items():
            if d["status"] == "skipped":
                assert d["reason"], (op, name)
    # triton / cuda cannot run on CPU and must say why
    assert "needs CUDA" in data["ops"]["entropy_logprob"]["impls"]["ours:triton"]["reason"]
    lines = []
    print_report(res, log=lines.append)
    assert any("speedup" in ln for ln in lines)


@pytest.mark.gpu
def test_suite_tiny_on_cuda(tmp_path):
    """The harness on a GPU (run by benchmarks/gpu_suite.sh's test stage): CUDA events, the CUDA memory meter,
    Triton as the primary ours backend, anchors either timed or skipped/failed with a reason."""
    from benchmarks.__main__ import run_suite

    res = run_suite(size="tiny", impls=["ours", "eager", "liger", "cce", "verl"], device="cuda",
                    out_dir=str(tmp_path), stem="g", progress=False)
    data = json.loads(open(res["files"]["json"]).read())
    assert data["device"]["type"] == "cuda" and data["dtype"] == "bfloat16"
    assert data["ceilings"]["nominal"] is None or data["ceilings"]["bandwidth_vs_nominal"] > 0
    for op, entry in data["ops"].items():
        assert entry["status"] == "ok", (op, entry["reason"])
        prim = {r["pass"]: r["ours"] for r in entry["ratios"] if r["primary"] and r["anchor"] == "eager"}
        assert set(prim) == set(C.PASSES), (op, data["skipped"])
        assert set(prim.values()) == {"ours:triton"}, prim
        for case in entry["cases"]:
            for p in C.PASSES:
                r = case["results"][p]["ours:triton"]
                assert r["status"] == "ok" and r["peak_mem_bytes"] > 0, r
        for name, d in entry["impls"].items():
            assert d["status"] == "ok" or d["reason"], (op, name)


def test_compile_report_table_and_exit_codes(monkeypatch, tmp_path):
    from benchmarks import compile_report as CR

    def fake_report(ccs, match, skip_cu, skip_triton, jobs, verbose=False):
        rows = [CR._row("triton", "m", "k[ok]", "sm_80", usage={"kernel": "k", "registers": 40, "shared_bytes": 0,
                                                                  "local_bytes": 0, "stack_bytes": 0}),
                CR._row("triton", "m", "k[spill]", "sm_90a", usage={"kernel": "k", "registers": 255,
                                                                      "shared_bytes": 0, "local_bytes": 0,
                                                                      "stack_bytes": 16})]
        return {"schema": 1, "targets": ["sm_80", "sm_90a"], "rows": rows, "notes": [], "n_kernels": 2,
                "n_spills": 1, "n_errors": 0, "exit_code": 1, "ok": False, "wall_s": 0.0, "tools": {},
                "spill_rule": "local_bytes > 0 or stack_bytes > 0"}

    monkeypatch.setattr(CR, "run_report", fake_report)
    assert CR.main(["--out", str(tmp_path), "--stem", "cr"]) == 1
    md = (tmp_path / "cr.md").read_text()
    assert "SPILL" in md and "k[ok]" in md
    assert json.loads((tmp_path / "cr.json").read_text())["n_spills"] == 1


def test_compile_report_compiles_one_triton_kernel(tmp_path):
    """A real compile (no GPU): one Triton config for sm_90a, in a fresh process without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    from hero_kernels.gpu_compile import cuobjdump_path

    if cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--match", "entropy_logprob_fwd[bf16",
                        "--cc", "90", "--skip-cu", "--jobs", "1", "--out", str(tmp_path), "--stem", "cr"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "cr.json").read_text())
    assert rep["n_kernels"] >= 1 and rep["n_errors"] == 0
    assert all(row["registers"] > 0 and row["arch"] == "sm_90a" for row in rep["rows"])


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    """benchmarks/gpu_suite.sh --cpu: every stage (venv on top of this python, project install, extension
    build, a pytest subset, the benchmarks at size tiny, a one-kernel compile report, finalize, copy to $OUT)."""
    out = tmp_path / "out"
    res = tmp_path / "res"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({
        "HERO_PYTHON": sys.executable, "HERO_SUITE_RESULTS": str(res), "OUT": str(out), "HERO_SUITE_SIZE": "tiny",
        "HERO_SUITE_IMPLS": "ours,eager", "HERO_SUITE_PYTEST_ARGS": "-q tests/test_benchmarks.py -k work_models",
        "HERO_SUITE_COMPILE_ARGS": "--match entropy_logprob_fwd[bf16,BLOCK_V=4096 --cc 90 --skip-cu",
        "HERO_SUITE_TOTAL": "400",
    })
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"), "--cpu"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=500)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    jsons = [p for p in res.glob("cpu-*-dryrun.json")]
    assert len(jsons) == 1, list(res.iterdir())
    data = json.loads(jsons[0].read_text())
    stages = {s["name"]: s for s in data["suite"]["stages"]}
    assert {"setup", "build", "tests", "bench", "compile", "total"} <= set(stages)
    if os.path.exists(os.path.join(REPO, "benchmarks", "bench_trainer_memory.py")):
        assert "trainer" in stages and "results" in data["suite"]["trainer_memory"]
    assert all(s["rc"] == 0 for s in stages.values()), stages
    assert "passed" in data["suite"]["pytest_summary"]
    assert data["suite"]["compile_report"]["n_kernels"] >= 1
    assert set(data["ops"]) == set(C.OPS)
    names = {p.name for p in out.iterdir()}
    stem = jsons[0].stem
    assert {f"{stem}.json", f"{stem}.md", f"{stem}.png", f"{stem}-compile.md", f"{stem}-suite.log"} <= names
    assert len(names) <= 8  # the device tool returns at most 8 files from $OUT
