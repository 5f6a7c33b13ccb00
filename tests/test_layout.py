"""Package layout: the trainer core never imports an experiment or the benchmark suite; experiments plug in
through hero.registry; ``hero bench`` finds the suite only in a source checkout."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The trainer core: everything ``hero train`` needs for a transformers model on a JSONL dataset.
CORE_MODULES = ("hero", "hero.config", "hero.registry", "hero.rollout", "hero.rewards", "hero.grpo", "hero.trainer",
                "hero.checkpoint", "hero.io", "hero.data", "hero.data.jsonl", "hero.cli", "hero.bench_cli", "hero.omnex")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_trainer_core_imports_no_experiment_and_no_benchmarks():
    code = (
        "import importlib, sys\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.startswith('hero.experiments') or m.split('.')[0] == 'benchmarks')\n"
        "print(bad)\n"
    )
    assert _run(code).strip() == "[]"


def test_experiment_registers_on_first_use_of_its_names():
    code = (
        "import sys\n"
        "from hero import registry\n"
        "assert 'hero.experiments.confidence_trap' not in sys.modules\n"
        "assert 'digits_pope' in registry.dataset_names() and 'jsonl' in registry.dataset_names()\n"
        "assert registry.model_builder('tiny-vlm') is not None\n"
        "assert 'hero.experiments.confidence_trap' in sys.modules and 'digits_pope' in registry.DATASETS\n"
        "assert registry.model_builder('some/hub-id') is None\n"
    )
    _run(code)


def test_unknown_dataset_names_the_known_ones():
    from hero.registry import dataset_builder

    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; known: \['digits_pope', 'jsonl'"):
        dataset_builder("nope")


def test_bench_outside_a_checkout_says_where_the_suite_is(tmp_path, monkeypatch, capsys):
    from hero import bench_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_cli, "__file__", str(tmp_path / "site-packages" / "hero" / "bench_cli.py"))
    assert bench_cli.find_benchmarks_root() is None
    assert bench_cli._bench(["--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert "source checkout" in err and len(err.splitlines()) == 1
    monkeypatch.chdir(ROOT)
    assert bench_cli.find_benchmarks_root() == ROOT


def test_wheel_leaves_out_the_benchmarks():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.split(".")[0].rstrip("*") == "benchmarks" for p in include)
