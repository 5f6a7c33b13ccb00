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
from gpu_compile_support import compile_env, require_compiler

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

    t0 = time.process_time()  # CPU time of this process: machine load must not fail the test
    res = run_suite(size="tiny", impls=["ours", "eager", "liger", "cce", "verl"], device="cpu", out_dir=str(tmp_path),
                    stem="t", progress=False, threads=1)
    cpu_s = time.process_time() - t0
    assert cpu_s < 60, f"tiny suite took {cpu_s:.1f} s of CPU time"
    paths = res["files"]
    assert set(paths) == {"json", "md", "png"}
    with open(paths["json"]) as f:
        data = json.load(f)
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["md"]).read()
    # size tiny is a smoke run: labelled as such, and 2-3 sub-millisecond repeats never make a headline ratio
    assert "## Smoke results" in md and "NOT a performance claim" in md and "floor" in md
    assert data["smoke"] is True
    for s in data["summary"]:
        assert s["speedup_gmean"] is None and s["n"] == 0 and s["refused"], s
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
    assert any("speedup" in ln for ln in lines) and any("Smoke results" in ln for ln in lines)


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


def _timed(ms, reps, lo=None, hi=None):
    return {"status": "ok", "time_ms": ms, "time_min_ms": lo or ms, "time_max_ms": hi or ms, "reps": reps}


def test_headline_rule_refuses_few_repeats_and_short_times():
    """A ratio from fewer than MIN_HEADLINE_REPS repeats or from a median under the threshold is refused
    (saying which); accepted ratios carry their min-max spread."""
    from benchmarks import __main__ as M

    kinds = {"ours:cpu": "ours", "eager": "anchor"}
    cpu = torch.device("cpu")
    reps = M.MIN_HEADLINE_REPS
    per = {"fwd": {"ours:cpu": _timed(10.0, reps, 9.0, 12.0), "eager": _timed(20.0, reps, 18.0, 30.0)},
           "fwd+bwd": {"ours:cpu": _timed(10.0, reps - 1), "eager": _timed(20.0, reps)}}
    rows = {r["pass"]: r for r in M._ratios("entropy_logprob", "N=1", per, kinds, cpu)}
    ok = rows["fwd"]
    assert ok["refused"] is None and ok["speedup"] == pytest.approx(2.0)
    assert ok["speedup_lo"] == pytest.approx(18.0 / 12.0) and ok["speedup_hi"] == pytest.approx(30.0 / 9.0)
    assert f"{reps - 1} timed repeats < {reps}" in rows["fwd+bwd"]["refused"]
    short = {"fwd": {"ours:cpu": _timed(0.2, 50), "eager": _timed(20.0, 50)}}
    (r,) = M._ratios("entropy_logprob", "N=1", short, kinds, cpu)
    assert "ours: median 0.2 ms < 1 ms" in r["refused"]
    txt = C.format_table(C.RATIO_HEAD, C.ratio_rows({"ops": {"entropy_logprob": {"ratios": [ok, r]}}}))
    assert "1.50-3.33" in txt and "not in headline" in txt


def test_hero_bench_cli_labels_smoke_and_refuses_headline(tmp_path):
    """`hero bench --size tiny` (the real CLI): the headline is labelled a smoke result and no speedup is
    computed from 2-3 sub-millisecond repeats; the refusal says which rule; exit code 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "hero", "bench", "--size", "tiny", "--ops", "entropy_logprob",
                        "--impls", "ours:cpu,ours:torch,eager", "--device", "cpu", "--out", str(tmp_path),
                        "--no-progress", "--threads", "1"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Smoke results (size tiny" in r.stdout and "NOT a performance claim" in r.stdout
    assert "refused: ours: " in r.stdout and "timed repeats < 5" in r.stdout, r.stdout[-2000:]
    data = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert data["smoke"] and all(s["speedup_gmean"] is None for s in data["summary"])


def _fake_plan_module(monkeypatch):
    """Give the Triton logits launcher a fake ``plan`` (the real ones may not exist yet) and hide any real
    plan of the others, so the test does not depend on the launchers' numbers."""
    import importlib

    from benchmarks import roofline as RL
    from hero_kernels.backends.plan import KernelLaunch

    calls = []

    def plan(N, V, dtype, *, pass_="fwd", inplace_backward=False, batch=None):
        calls.append((N, V, dtype, pass_))
        elt = torch.empty((), dtype=dtype).element_size()
        ks = [KernelLaunch("_fwd", (N,), "stream", 0.0, N * V * elt, l2_note="labels/lse in L2", num_warps=8)]
        if pass_ == "fwd+bwd":
            ks.append(KernelLaunch("_bwd", (N,), "stream", 0.0, 2 * N * V * elt, num_warps=8, repeats=2))
        return ks

    for (op, impl), name in RL.IMPL_MODULES.items():
        mod = importlib.import_module(name)
        if (op, impl) == ("entropy_logprob", "triton"):
            monkeypatch.setattr(mod, "plan", plan, raising=False)
        elif hasattr(mod, "plan"):
            monkeypatch.delattr(mod, "plan")
    RL._CACHE.clear()
    return calls


def test_roofline_calls_the_launchers_plans(monkeypatch, tmp_path):
    """roofline sums the plan's modeled_seconds, computes the floors itself, and reports a launcher without
    ``plan`` as not ported instead of crashing; --json writes a list of rows with the documented keys."""
    from benchmarks import roofline as RL
    from hero_kernels.backends.plan import GPU_SPECS

    calls = _fake_plan_module(monkeypatch)
    h100 = GPU_SPECS["h100"]
    r = RL.model_row("entropy_logprob", "triton", "fwd+bwd", 16384, 0, 151936, "bf16", "h100")
    nv2 = 16384 * 151936 * 2
    assert calls[-1] == (16384, 151936, torch.bfloat16, "fwd+bwd")
    assert r["floor_s"] == pytest.approx(3 * nv2 / 3.35e12)
    bw = h100.hbm_bytes_per_s * h100.hbm_efficiency  # the model's achievable HBM rate (no issue count given)
    expect = nv2 / bw + h100.launch_s + 2 * (2 * nv2 / bw + h100.launch_s)
    assert r["modeled_s"] == pytest.approx(expect) and r["ratio"] == pytest.approx(expect / r["floor_s"])
    assert [k["name"] for k in r["kernels"]] == ["_fwd", "_bwd"] and r["kernels"][1]["bound"] == "hbm"
    assert r["l2_notes"] == ["labels/lse in L2"]
    lin = RL.model_row("linear_entropy_logprob", "cuda", "fwd+bwd", 16384, 4096, 128256, "bf16", "h200")
    assert lin["status"] == "no plan" and lin["reason"] == RL.NO_PLAN and lin["modeled_s"] is None
    assert lin["floor_s"] == pytest.approx(8 * 16384 * 4096 * 128256 / 989e12)

    out = tmp_path / "rl.json"
    assert RL.main(["--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    keys = {"op", "pass", "N", "D", "V", "dtype", "gpu", "impl", "modeled_s", "floor_s", "ratio"}
    assert all(keys <= set(x) for x in rows)
    got = {(x["op"], x["pass"], x["N"], x["D"], x["V"], x["gpu"], x["impl"]) for x in rows}
    assert ("linear_entropy_logprob", "fwd+bwd", 16384, 4096, 128256, "h100", "triton") in got
    assert ("entropy_logprob", "fwd+bwd", 16384, 0, 151936, "h200", "cuda") in got
    assert {x["gpu"] for x in rows} == {"h100", "h200"} and all(x["dtype"] == "bf16" for x in rows)
    assert all(x["modeled_s"] > 0 for x in rows if (x["op"], x["impl"]) == ("entropy_logprob", "triton"))
    assert RL.main(["--gpu", "a100"]) == 2


def test_roofline_reports_the_memory_model():
    """Fused-head rows carry the plans' memory model next to eager's lower bound N V (e + 8): at the
    headline shape both backwards ("vocab" order) hold <= 2% of it."""
    pytest.importorskip("triton")
    from benchmarks import roofline as RL

    rows = {impl: RL.model_row("linear_entropy_logprob", impl, "fwd+bwd", 16384, 4096, 128256, "bf16", "h100")
            for impl in ("triton", "cuda")}
    assert rows["triton"]["eager_peak_bytes"] == 16384 * 128256 * 10
    assert rows["triton"]["extra_share"] <= 0.02 and rows["cuda"]["extra_share"] <= 0.02
    line = RL.table_rows([rows["triton"]])[0]
    assert line[RL.HEAD.index("extra mem (of eager)")].endswith("(2.0%)")


def test_bench_attaches_modeled_time(monkeypatch):
    """On an H100 / H200 every ours:triton / ours:cuda time gets modeled_ms and measured/modeled."""
    from benchmarks import __main__ as M

    _fake_plan_module(monkeypatch)
    case = C.Case("entropy_logprob", N=1024, V=32000)
    r = {"time_ms": 1.0}
    M._attach_model(r, "entropy_logprob", "ours:triton", case, "fwd", torch.bfloat16, "h100")
    assert r["modeled_ms"] > 0 and r["measured_vs_modeled"] == pytest.approx(1.0 / r["modeled_ms"])
    r2 = {"time_ms": 1.0}
    M._attach_model(r2, "entropy_logprob", "ours:cuda", case, "fwd", torch.bfloat16, "h100")
    assert "modeled_ms" not in r2 and "not ported" in r2["modeled_reason"]
    r3 = {"time_ms": 1.0}
    M._attach_model(r3, "entropy_logprob", "eager", case, "fwd", torch.bfloat16, "h100")
    M._attach_model(r3, "entropy_logprob", "ours:triton", case, "fwd", torch.bfloat16, None)
    assert r3 == {"time_ms": 1.0}
    row = C.result_rows({"ops": {"entropy_logprob": {"cases": [{"shape": case.as_dict(), "results": {
        "fwd": {"ours:triton": dict(r, status="ok", reps=5, time_min_ms=0.9, time_max_ms=1.2)}}}]}}})[0]
    assert row[C.TIMES_HEAD.index("modeled_ms")] == f"{r['modeled_ms']:.3f}"
    assert row[C.TIMES_HEAD.index("min-max ms")] == "0.900-1.200"


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


def test_compile_report_occupancy_and_sass_loops():
    from benchmarks import compile_report as CR

    # 68 registers x 8 warps: 72 regs/thread allocated -> 2304 per warp -> 28 warps -> 3 CTAs of 8 warps
    assert CR.ctas_per_sm("sm_90a", 68, 1024, 8) == (3, "registers")
    assert CR.ctas_per_sm("sm_90a", 32, 0, 1) == (32, "ctas")
    assert CR.ctas_per_sm("sm_90a", 32, 100 * 1024, 4) == (2, "shared")
    assert CR.ctas_per_sm("sm_90a", 16, 0, 32) == (2, "warps")
    sass = """
        Function : k
        /*0000*/                   LDG.E.64 R2, desc[UR14][R2.64] ;
        /*0010*/                   NOP ;
        /*0020*/              @!P0 LDG.E.128 R16, desc[UR14][R62.64] ;
        /*0030*/                   FADD R1, R1, R2 ;
        /*0040*/              @!P0 LDG.E.128 R20, desc[UR14][R62.64+0x1000] ;
        /*0050*/                   MUFU.EX2 R3, R3 ;
        /*0060*/              @!P0 BRA 0x20 ;
        /*0070*/               @P0 LDG.E.U16 R10, desc[UR14][R2.64] ;
        /*0080*/               @P0 BRA 0x70 ;
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*00a0*/                   BRA 0xa0;
    """
    funcs = CR.sass_functions(sass)
    s = CR.sass_summary(funcs["k"], "sm_90a", 2)
    hl = s["hot_loop"]  # the vector loop (32 bytes per thread), not the scalar tail or the self-branch
    assert hl["instructions"] == 5 and hl["load_bytes_per_thread"] == 32 and hl["loops_with_loads"] == 2
    assert hl["elements_per_thread"] == 16 and hl["instr_per_element"] == pytest.approx(5 / 16)
    assert s["wgmma"] is True and CR.sass_summary(funcs["k"], "sm_80", 2)["wgmma"] is None


def test_compile_report_counts_the_common_path_of_a_branchy_loop():
    """A loop that branches around a rare case (a chunk raising the running max) runs its common path per
    iteration: SASS per element counts that path (the shortest one issuing one exp per element), not the
    static body, and not a shortcut that skips the math (an all -inf chunk)."""
    from benchmarks import compile_report as CR

    sass = """
        Function : k
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/               @P2 BRA 0x100 ;
        /*0020*/               @P0 BRA 0x90 ;
        /*0030*/                   MUFU.EX2 R4, R4 ;
        /*0040*/                   MUFU.EX2 R5, R5 ;
        /*0050*/                   MUFU.EX2 R6, R6 ;
        /*0060*/                   MUFU.EX2 R7, R7 ;
        /*0070*/                   FADD R8, R8, R4 ;
        /*0080*/                   BRA 0x100 ;
        /*0090*/                   MUFU.EX2 R4, R4 ;
        /*00a0*/                   MUFU.EX2 R5, R5 ;
        /*00b0*/                   MUFU.EX2 R6, R6 ;
        /*00c0*/                   MUFU.EX2 R7, R7 ;
        /*00d0*/                   FMUL R8, R8, R4 ;
        /*00e0*/                   FMUL R9, R9, R4 ;
        /*00f0*/                   FMUL R10, R10, R4 ;
        /*0100*/              @!P1 BRA 0x0 ;
        /*0110*/                   EXIT ;
    """
    hl = CR.hot_loop(CR.sass_functions(sass)["k"], 4)
    assert hl["instructions"] == 17 and hl["path_instructions"] == 10 and hl["elements_per_thread"] == 4
    assert hl["instr_per_element"] == pytest.approx(10 / 4)


def test_compile_report_discovery_has_no_spurious_package_note(monkeypatch):
    """The ``linear/`` package holds the fused head's kernels in submodules whose KERNEL_CONFIGS the entry
    modules (linear_entropy_logprob, linear_grad_sketch) re-export: it is built there, so no note. A
    ``*KERNEL_CONFIGS`` list no entry module exposes is still a note (it would not be built)."""
    from benchmarks import compile_report as CR
    from hero_kernels.backends.triton.linear import compile as LC

    jobs, notes = CR.discover_triton()
    assert jobs and not [n for n in notes if "linear" in n["module"]], notes
    monkeypatch.setattr(LC, "ORPHAN_KERNEL_CONFIGS", [], raising=False)
    _, notes = CR.discover_triton()
    assert [n["module"] for n in notes] == ["hero_kernels.backends.triton.linear.compile.ORPHAN_KERNEL_CONFIGS"]


def test_compile_report_builds_row_kernels_aligned_and_unaligned():
    """Both builds: pointers (+ the specializable ints, or the module's compile_attrs) divisible by 16, and
    pointers only (odd V)."""
    from benchmarks import compile_report as CR
    from hero_kernels.backends.triton import entropy_logprob as M

    fn, sig = M.KERNEL_CONFIGS[0][:2]
    v = CR.build_variants(M, fn, sig)
    names = fn.arg_names
    aligned = {names[i] for (i,) in v["aligned"]}
    unaligned = {names[i] for (i,) in v["unaligned"]}
    assert "V" in aligned and "V" not in unaligned and "logits_ptr" in unaligned
    assert "ignore_index" not in aligned  # do_not_specialize: never specialized at run time


def test_compile_report_compiles_one_triton_kernel(tmp_path):
    """A real compile (no GPU): one Triton config for sm_90a, in a fresh process without TRITON_INTERPRET."""
    require_compiler()
    env = compile_env()
    from hero_kernels.backends.triton import entropy_logprob as M

    # the largest bf16 forward config the row launcher can pick
    desc = [c[5] for c in M.KERNEL_CONFIGS if c[5].startswith("entropy_logprob_fwd[bf16")][-1]
    r = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--match", desc,
                        "--cc", "90", "--skip-cu", "--jobs", "1", "--out", str(tmp_path), "--stem", "cr"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "cr.json").read_text())
    assert rep["n_kernels"] >= 1 and rep["n_errors"] == 0
    assert all(row["registers"] > 0 and row["arch"] == "sm_90a" for row in rep["rows"])
    # the row kernel is built as it runs for V % 16 == 0 and for odd V, with its hot loop and occupancy
    assert {row["variant"] for row in rep["rows"]} == {"aligned", "unaligned"}
    for row in rep["rows"]:
        hl = row["hot_loop"]
        assert hl["instructions"] > 0 and hl["elements_per_thread"] > 0 and hl["instr_per_element"] > 0, row
        assert 1 <= row["ctas_per_sm"] <= 32 and row["wgmma"] is False


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    """benchmarks/gpu_suite.sh --cpu: every stage (venv on top of this python, project install, extension
    build, device checks on the CPU backends, the benchmarks at size tiny, a pytest subset, finalize, copy
    to $OUT); the timings stage needs CUDA and says so."""
    out = tmp_path / "out"
    res = tmp_path / "res"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({
        "HERO_PYTHON": sys.executable, "HERO_SUITE_RESULTS": str(res), "OUT": str(out), "HERO_SUITE_SIZE": "tiny",
        "HERO_SUITE_IMPLS": "ours,eager", "HERO_SUITE_PYTEST_ARGS": "-q tests/test_benchmarks.py -k work_models",
        "HERO_SUITE_TOTAL": "400",
    })
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"), "--cpu"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=500)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    jsons = [p for p in res.glob("cpu-*-dryrun.json")]
    assert len(jsons) == 1, list(res.iterdir())
    data = json.loads(jsons[0].read_text())
    stages = {s["name"]: s for s in data["suite"]["stages"]}
    assert {"setup", "build", "checks", "timings", "bench", "tests", "total"} <= set(stages)
    assert "compile" not in stages  # the compile report needs no device: not in the device window
    assert "needs CUDA" in stages["timings"]["note"]
    if os.path.exists(os.path.join(REPO, "benchmarks", "bench_trainer_memory.py")):
        assert "trainer" in stages and "results" in data["suite"]["trainer_memory"]
    assert all(s["rc"] == 0 for s in stages.values()), stages
    assert "passed" in data["suite"]["pytest_summary"]
    checks = data["suite"]["device_checks"]
    assert checks and all(c["ok"] for c in checks), checks
    assert set(data["ops"]) == {"entropy_logprob", "linear_entropy_logprob"}
    names = {p.name for p in out.iterdir()}
    stem = jsons[0].stem
    assert {f"{stem}.json", f"{stem}.md", f"{stem}.png", f"{stem}-checks.json", f"{stem}-suite.log"} <= names
    assert len(names) <= 8  # the device tool returns at most 8 files from $OUT
    assert "device checks" in (res / f"{stem}.md").read_text()


def test_kernel_timings_match_plan_kernels():
    """Measured kernels are matched to the plan entries by name; cuBLAS (external) entries take what no plan
    kernel claimed; measured/modeled per entry."""
    from benchmarks import kernel_timings as KT

    model = {"kernels": [{"name": "_fwd_kernel", "modeled_s": 1e-3, "external": False},
                         {"name": "cublas_gemm", "modeled_s": 2e-3, "external": True},
                         {"name": "_fwd_kernel", "modeled_s": 1e-3, "external": False},
                         {"name": "cublas_dw", "modeled_s": 1e-3, "external": True}]}
    measured = [{"name": "_fwd_kernel_0d1d2d", "ms": 3.0, "count": 2}, {"name": "sm90_xmma_gemm_bf16", "ms": 4.0,
                                                                         "count": 1},
                {"name": "elementwise_kernel", "ms": 0.5, "count": 1}]
    rows = {r["name"]: r for r in KT._match(measured, model)}
    assert rows["_fwd_kernel"]["modeled_ms"] == pytest.approx(2.0) and rows["_fwd_kernel"]["ms"] == 3.0
    assert rows["_fwd_kernel"]["measured_vs_modeled"] == pytest.approx(1.5)
    ext = rows["external (cublas_gemm, cublas_dw)"]
    assert ext["ms"] == pytest.approx(4.5) and ext["modeled_ms"] == pytest.approx(3.0) and len(rows) == 2
    no_ext = {"kernels": model["kernels"][:1]}
    names = [r["name"] for r in KT._match(measured, no_ext)]
    assert names[0] == "_fwd_kernel" and "sm90_xmma_gemm_bf16" in names


def test_suite_writes_partial_json_after_every_case(monkeypatch, tmp_path):
    """The GPU suite kills the bench stage at its timeout when one measurement (a torch.compile warm-up) overruns
    the budget's slack: the JSON on disk already holds every finished case (partial: true); the last write
    replaces it with the complete result."""
    from benchmarks import __main__ as M

    seen = []
    real = I.make_inputs

    def make_inputs(case, *a, **k):  # each case starts here: read what the cases before it left on disk
        path = tmp_path / "p.json"
        seen.append(json.loads(path.read_text()) if path.exists() else None)
        return real(case, *a, **k)

    monkeypatch.setattr(I, "make_inputs", make_inputs)
    res = M.run_suite(size="tiny", ops=["entropy_logprob"], impls=["eager", "ours:torch"], device="cpu",
                      out_dir=str(tmp_path), stem="p", progress=False)
    assert len(seen) == 2 and seen[0] is None, seen
    part = seen[1]
    assert part["partial"] is True and len(part["ops"]["entropy_logprob"]["cases"]) == 1
    assert part["ops"]["entropy_logprob"]["cases"][0]["results"]["fwd"]["eager"]["status"] == "ok"
    assert C.render_markdown(part)  # finalize renders whatever the bench stage left
    final = json.loads((tmp_path / "p.json").read_text())
    assert "partial" not in final and len(final["ops"]["entropy_logprob"]["cases"]) == 2 and res["summary"]


def test_device_checks_write_json_after_every_check(tmp_path):
    """A checks stage cut short by its timeout (first builds on the device) keeps the rows it finished: the JSON
    holds every check that was logged, at the moment it is logged."""
    from benchmarks import device_checks as DC

    path = str(tmp_path / "checks.json")
    seen = []

    def log(line):
        seen.append(line)
        assert len(json.loads(open(path).read())) == len(seen), line

    rows = DC.run_checks("cpu", ["torch"], full=False, log=log, json_path=path)
    assert rows and all(r["ok"] for r in rows) and len(seen) == len(rows)


class _FakeEvent:
    """torch.cuda.Event on the host clock: runs kernel_timings.time_op on CPU tensors."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return 1e3 * (end.t - self.t)


@pytest.mark.parametrize("op", ["entropy_logprob", "linear_entropy_logprob", "linear_hero_loss"])
def test_kernel_timings_time_op_runs_on_cpu_with_cuda_faked(monkeypatch, op):
    """The suite's timings stage never runs without a GPU: its per-op code (inputs, the public op calls, the
    forward / backward split, the hero_loss 3-GEMM gate, profile, model lookup) runs here on CPU tensors with
    impl torch and the torch.cuda timers / memory stats faked."""
    from benchmarks import kernel_timings as KT

    for name, fn in (("synchronize", lambda *a, **k: None), ("reset_peak_memory_stats", lambda *a, **k: None),
                     ("memory_allocated", lambda *a, **k: 0), ("max_memory_allocated", lambda *a, **k: 0)):
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(KT, "profile_kernels", lambda fn, setup=None: (setup and setup(), fn(), [])[-1])
    N, D, V = 2 * KT.HERO_T if op == "linear_hero_loss" else 8, 32, 300
    r = KT.time_op(op, "torch", N, D if op != "entropy_logprob" else 0, V, torch.float32, 2, "h100", device="cpu")
    assert r["fwd"]["reps"] == 2 and r["bwd"]["reps"] == 2 and r["fwd"]["ms"] > 0 and r["bwd"]["ms"] > 0, r
    assert r["fwd"]["kernels"] == [] and r["bwd"]["kernels"] == [] and "peak_extra_bytes" in r


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton interpreter on CPU tensors")
def test_kernel_timings_triton_rows_matched_to_the_plan_and_rendered(monkeypatch):
    """time_op with impl triton (interpreter) and a fake profiler's kernel names: every plan kernel is matched
    to its measured kernel, modeled beside it, and the suite's markdown renders the result."""
    from benchmarks import kernel_timings as KT

    for name, fn in (("synchronize", lambda *a, **k: None), ("reset_peak_memory_stats", lambda *a, **k: None),
                     ("memory_allocated", lambda *a, **k: 0), ("max_memory_allocated", lambda *a, **k: 0)):
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    prof = [[{"name": "_entropy_logprob_fwd_kernel", "ms": 0.5, "count": 1}],
            [{"name": "_entropy_logprob_bwd_kernel", "ms": 1.0, "count": 1}]]
    monkeypatch.setattr(KT, "profile_kernels", lambda fn, setup=None: prof.pop(0))
    r = KT.time_op("entropy_logprob", "triton", 16, 0, 4096, torch.float32, 2, "h200", device="cpu")
    rows = {k["name"]: k for k in r["by_plan_kernel"]}
    assert set(rows) == {"_entropy_logprob_fwd_kernel", "_entropy_logprob_bwd_kernel"}, rows
    assert rows["_entropy_logprob_bwd_kernel"]["ms"] == 1.0 and rows["_entropy_logprob_bwd_kernel"]["modeled_ms"] > 0
    md = C.render_kernel_timings({"gemms": [], "ops": [r, {"op": "x", "impl": "cuda", "error": "RuntimeError: y"}]})
    assert "_entropy_logprob_bwd_kernel" in md and "error: RuntimeError: y" in md


def test_roofline_models_the_hero_loss_training_path():
    """linear_hero_loss rows: the 3-GEMM plan (Triton or CUDA row kernels) against 6 N D V, its ratio to the
    fused head's 8 N D V floor beside it, closed and open responses in the headline rows, fwd+bwd only;
    kernel_timings' entry models the same plan (and needs CUDA to run)."""
    from benchmarks import kernel_timings as KT
    from benchmarks import roofline as RL

    N, D, V = 16384, 4096, 128256
    rows = [r for r in RL.rows_for("headline", ("h100",), ("linear_hero_loss",), ("triton", "cuda")) if r]
    assert [(r["impl"], r["pass"], r["responses"]) for r in rows] == [
        (impl, "fwd+bwd", resp) for impl in ("triton", "cuda") for resp in ("16x1024", "2x8192")]
    tri = rows[0]
    assert tri["status"] == "ok" and tri["flops"] == 6 * N * D * V
    assert {"_entropy_logprob_fwd_kernel", "_entropy_logprob_bwd_kernel"} <= {k["name"] for k in tri["kernels"]}
    closed, open_ = rows[2:]
    assert closed["floor_s"] == pytest.approx(6 * N * D * V / 989e12)
    assert closed["generic_floor_s"] == pytest.approx(8 * N * D * V / 989e12)
    assert closed["flops"] == 6 * N * D * V and closed["ratio_generic"] == pytest.approx(closed["ratio"] * 0.75)
    assert open_["peak_extra_bytes"] > closed["peak_extra_bytes"] and open_["modeled_s"] > closed["modeled_s"]
    assert "(8NDV: " in RL.table_rows([closed])[0][RL.HEAD.index("ratio")]
    assert RL.modeled_for("linear_hero_loss", "cuda", "fwd", N, D, V, torch.bfloat16, "h100") is None
    m = RL.modeled_for("linear_hero_loss", "cuda", "fwd+bwd", N, D, V, torch.bfloat16, "h100",
                       lengths=RL.hero_lengths(N, KT.HERO_T))
    assert m["modeled_s"] == pytest.approx(closed["modeled_s"])
    if not torch.cuda.is_available():
        assert KT.main(["--small"]) == 2
    from benchmarks import __main__ as M

    case = C.Case("linear_hero_loss", N, V, D=D, B=N // KT.HERO_T)
    r = {"time_ms": 80.0}
    M._attach_model(r, "linear_hero_loss", "ours:cuda", case, "fwd+bwd", torch.bfloat16, "h100")
    assert r["modeled_ms"] == pytest.approx(1e3 * closed["modeled_s"])
    r2 = {"time_ms": 1.0}
    M._attach_model(r2, "linear_hero_loss", "ours:cuda", case, "fwd", torch.bfloat16, "h100")
    assert r2 == {"time_ms": 1.0}  # a no-grad forward runs the fused head, not the 3-GEMM path


def test_shapes_option_replaces_the_named_ops_shapes(capsys):
    """--shapes 'OP=AxB,...;OP=...' replaces the size's shapes of the ops it names (the others keep theirs);
    a malformed value is a one-line error naming the part (exit 2)."""
    from benchmarks.__main__ import main, run_suite

    got = C.parse_shapes(" grad_sketch=8x100, 4x37 ; linear_hero_loss=2x3x16x64")
    assert got == {"grad_sketch": [(8, 100), (4, 37)], "linear_hero_loss": [(2, 3, 16, 64)]}
    cases = C.cases_for("grad_sketch", "tiny", got)
    assert [(c.N, c.V) for c in cases] == [(8, 100), (4, 37)]
    assert C.cases_for("entropy_logprob", "tiny", got) == C.cases_for("entropy_logprob", "tiny")
    for bad, msg in [("grad_sketch=8x100x3", "grad_sketch takes NxV"), ("nope=1x2", "is not OP=SHAPE"),
                     ("hero_loss=2x0x9", "positive integers"), ("entropy_logprob=", "has no shape")]:
        with pytest.raises(ValueError, match=msg):
            C.parse_shapes(bad)
        assert main(["--size", "tiny", "--shapes", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --shapes:") and "\n" not in err
    res = run_suite(size="tiny", ops=["grad_sketch"], impls=["ours:torch", "eager"], device="cpu", write=False,
                    progress=False, threads=1, shapes={"grad_sketch": [(6, 50)]})
    cases = res["ops"]["grad_sketch"]["cases"]
    assert [(c["shape"]["N"], c["shape"]["V"]) for c in cases] == [(6, 50)]
    assert res["shapes_override"] == {"grad_sketch": [[6, 50]]}
