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


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["nope"]])
def test_cli_imports_no_experiment_for_help_and_train(argv):
    """``hero --help`` lists every command and ``hero train`` runs without importing an experiment or the
    benchmark suite: the command table names modules, and only the chosen command's module is imported."""
    code = (
        "import contextlib, io, sys\n"
        "from hero.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):\n"
        f"    rc = main({argv!r})\n"
        "bad = sorted(m for m in sys.modules if m.startswith('hero.experiments') or m.split('.')[0] == 'benchmarks')\n"
        "print(rc, bad, 'diagnose' in out.getvalue() and 'demo' in out.getvalue())\n"
    )
    rc, listed = {"nope": ("2", "True"), "--help": ("0", "True")}.get(argv[0], ("0", "False"))
    assert _run(code).strip() == f"{rc} [] {listed}"


def test_python_m_hero_help_imports_no_experiment():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "hero", "train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: hero train" in out.stdout
    assert "hero.experiments" not in out.stderr  # -X importtime lists every module imported


def test_chosen_command_imports_its_module_and_a_missing_one_is_one_line(monkeypatch, capsys):
    from hero import cli

    monkeypatch.setitem(cli.COMMANDS, "gone", cli.Command("hero.no_such_module:run", "a command whose module is gone"))
    assert cli.main(["gone"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hero gone: ") and "hero.no_such_module" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="module:function"):
        cli.register_command("x", "no_colon")
