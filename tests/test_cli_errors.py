"""`hero train` / `hero diagnose` / `hero plot` as a user runs them: the real CLI in a subprocess, checked for the
exit code, the one-line message (no traceback) and that nothing of a run was lost or mixed.

Tiny random-init models on CPU (no downloads); each training run is a few steps of a 1-layer tiny-llama."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = (
    "model: {name: tiny-llama, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}\n"
    "data: {n_per_split: 4, splits: [random], image_field: '', shuffle: false}\n"
    "generation: {num_generations: 2, max_new_tokens: 4}\n"
    "loss: {impl: torch}\nbatch_size: 2\nsteps: 2\nsave_steps: 1\nsave_total_limit: 0\nprogress: false\n"
    "export: false\nlr: 1.0e-3\n"
)


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, str(tmp_path)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("HERO_DEBUG", None)
    env.setdefault("HERO_KERNELS_BUILD_DIR", os.path.join(REPO, ".build-cache"))
    env.update(extra)
    return env


def start(tmp_path, *args, **env):
    return subprocess.Popen([sys.executable, "-m", "hero", *args], cwd=REPO, env=_env(tmp_path, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def hero(tmp_path, *args, **env):
    return finish(start(tmp_path, *args, **env))


def hero_all(tmp_path, commands):
    """Run several CLI commands at once (most of each is the torch import); results in order."""
    procs = [start(tmp_path, *args, **env) for args, env in commands]
    return [finish(p) for p in procs]


def one_line_error(rc, err, code=2):
    """The command failed with ``code`` and said why in exactly one line, without a traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip() and " warning: " not in ln]
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def config(tmp_path, text=TINY, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def metrics_steps(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(ln)["step"] for ln in f]


def run_id(folder):
    with open(os.path.join(folder, "run.json")) as f:
        return json.load(f)["run_id"]


# ----------------------------------------------------------------------------------------------
# 5. one-line errors, exit code 2
# ----------------------------------------------------------------------------------------------
def test_common_mistakes_are_one_line_errors(tmp_path):
    cfg = config(tmp_path)
    bad_yaml = config(tmp_path, "model:\n  name: tiny-llama\n hidden_size: 3\n", "bad.yaml")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    out = str(tmp_path / "run")
    cases = [
        (["train", "--config", bad_yaml], {}, "bad.yaml, line 3, column 2: malformed YAML"),
        (["train", "--config", cfg, "--rewards.funcs", "yes_no,nope"], {}, "rewards.funcs: unknown reward 'nope'"),
        (["train", "--config", cfg, "--model.name", "./no/such/model"], {}, "model.name './no/such/model': no such folder"),
        (["train", "--config", cfg, "--model.name", "no-such-org/no-such-model"], {"HF_HUB_OFFLINE": "1"},
         "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"),
        (["diagnose", "--model", "no-such-org/no-such-model", "--data", "digits_pope:2", "--out", out],
         {"HF_HUB_OFFLINE": "1"}, "--model 'no-such-org/no-such-model' is not a local folder"),
        (["train", "--config", cfg, "--resume", str(tmp_path / "nope")], {}, "no checkpoint there"),
        (["train", "--config", cfg, "--data.name", "jsonl", "--data.path", str(tmp_path / "empty.jsonl")], {},
         "the dataset is empty"),
        (["train", "--config", cfg, "--data.path", "x.jsonl"], {}, "data.path is set but data.name is 'digits_pope'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "--config", cfg, "--device", "cuda"], {}, "CUDA is not available here"))
    start_t = time.monotonic()
    results = hero_all(tmp_path, [(args, env) for args, env, _ in cases])
    elapsed = time.monotonic() - start_t
    for (args, _, expected), (rc, stdout, err) in zip(cases, results):
        line = one_line_error(rc, err)
        assert line.startswith(f"hero {args[0]}: ") and expected in line, (args, line)
    assert not os.path.exists(out + "/diagnosis.json")
    assert elapsed < 240, f"the model-name checks must not wait on the hub ({elapsed:.0f}s for all cases)"
    # HERO_DEBUG=1: the traceback too
    rc, _, err = hero(tmp_path, "train", "--config", bad_yaml, HERO_DEBUG="1")
    assert rc == 2 and "Traceback" in err and "malformed YAML" in err.splitlines()[-1]


def test_a_reward_that_raises_or_returns_the_wrong_length(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def short(completions, **_):\n    return [1.0] * (len(completions) - 1)\n"
        "def boom(completions, **_):\n    raise KeyError('no field called label')\n")
    cfg = config(tmp_path)
    short, boom = hero_all(tmp_path, [
        (["train", "--config", cfg, "--rewards.funcs", "my_rewards:short", "--output_dir", str(tmp_path / "a")], {}),
        (["train", "--config", cfg, "--rewards.funcs", "my_rewards:boom", "--output_dir", str(tmp_path / "b")], {}),
    ])
    assert "reward 'short' failed at step 1: ValueError: reward 'short' returned 3 values for 4 completions" in \
        one_line_error(*short[::2])
    assert "reward 'boom' failed at step 1: KeyError" in one_line_error(*boom[::2])


# ----------------------------------------------------------------------------------------------
# 1. bad rows
# ----------------------------------------------------------------------------------------------
def _jsonl_with_bad_lines(tmp_path):
    from hero.data.jsonl import save_image_png

    save_image_png(np.full((8, 24), 128, np.uint8), str(tmp_path / "img.png"))
    good = [{"image": "img.png", "question": f"Is there a {i} in the image?", "answer": "yes" if i % 2 else "no"}
            for i in range(4)]
    lines = [json.dumps(good[0]),
             json.dumps({"image": "missing.png", "question": "q?", "answer": "yes"}),  # line 2: no image file
             json.dumps({"image": "img.png", "question": "q?"}),  # line 3: no answer
             '{"image": "img.png", "question": ',  # line 4: malformed JSON
             "[1, 2, 3]",  # line 5: not an object
             ] + [json.dumps(g) for g in good[1:]]
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_bad_jsonl_rows_are_skipped_with_one_warning_each_or_stop_the_run(tmp_path):
    data = _jsonl_with_bad_lines(tmp_path)
    cfg = config(tmp_path, TINY.replace("tiny-llama", "tiny-vlm").replace("image_field: ''", "image_field: image"))
    skip, stop = hero_all(tmp_path, [
        (["train", "--config", cfg, "--data.name", "jsonl", "--data.path", data, "--output_dir", str(tmp_path / "s"),
          "--steps", "1"], {}),
        (["train", "--config", cfg, "--data.name", "jsonl", "--data.path", data, "--output_dir", str(tmp_path / "t"),
          "--on_bad_row", "stop"], {}),
    ])
    rc, out, err = skip
    assert rc == 0 and "Traceback" not in err, err
    warned = [ln for ln in err.splitlines() if "line skipped" in ln]
    assert [ln.split(f"{data}, line ")[1][:1] for ln in warned] == ["2", "3", "4", "5"], err
    for ln, reason in zip(warned, ["image file not found", "missing required field 'answer'", "invalid JSON",
                                   "expected a JSON object"]):
        assert ln.startswith("hero train: warning: ") and reason in ln, ln
    assert metrics_steps(str(tmp_path / "s")) == [1]
    line = one_line_error(*stop[::2], code=3)
    assert f"{data}, line 2: image file not found" in line
    assert not os.path.exists(tmp_path / "t" / "metrics.jsonl")


def test_tiny_vlm_row_with_several_images_is_a_one_line_bad_row(tmp_path):
    """A JSONL row may list several images (transformers VLMs place them); the tiny VLM has one image slot, so
    such a row is a bad row naming its image count, not a traceback from sizing the model by the list."""
    from hero.data.jsonl import save_image_png

    save_image_png(np.full((8, 24), 128, np.uint8), str(tmp_path / "img.png"))
    row = {"image": ["img.png", "img.png"], "question": "Is there a cat?", "answer": "yes"}
    data = tmp_path / "multi.jsonl"
    data.write_text("\n".join(json.dumps(dict(row, id=f"r{i}")) for i in range(4)) + "\n")
    cfg = config(tmp_path, TINY.replace("tiny-llama", "tiny-vlm").replace("image_field: ''", "image_field: image"))
    rc, out, err = hero(tmp_path, "train", "--config", cfg, "--data.name", "jsonl", "--data.path", str(data),
                        "--output_dir", str(tmp_path / "run"), "--on_bad_row", "stop")
    assert "has 2 images but the tiny VLM takes one image per row" in one_line_error(rc, err, code=3)


# ----------------------------------------------------------------------------------------------
# 2, 3, 6, 9. runs never mixed, resume checks the config, summary, plot, complete runs, stale temp folders
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # several real training runs in subprocesses (~20-50 s): make test-all
def test_runs_are_never_mixed_and_resume_checks_the_config(tmp_path):
    cfg, run = config(tmp_path), str(tmp_path / "run")
    rc, out, err = hero(tmp_path, "train", "--config", cfg, "--output_dir", run, "--steps", "3")
    assert rc == 0 and "Traceback" not in err, err
    assert "run summary: 3 steps; mean reward" in out and f"metrics: {run}/metrics.jsonl" in out
    # a random model never earns the reward: said once, with what to do
    assert err.count("nothing has trained for 3 steps") == 1 and "warm-started demo_out/models/sft" in err
    rid, ckpts = run_id(run), sorted(os.listdir(run))
    assert run_id(os.path.join(run, "checkpoint-000003")) == rid

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(run, f".tmp-final-{dead.pid}")  # a killed export's leftover
    os.makedirs(stale)
    fresh, changed, complete = hero_all(tmp_path, [
        (["train", "--config", cfg, "--output_dir", run, "--steps", "3"], {}),
        (["train", "--config", cfg, "--output_dir", run, "--resume", "auto", "--steps", "4", "--lr", "0.5",
          "--generation.num_generations", "3", "--loss.kappa", "2"], {}),
        (["train", "--config", cfg, "--output_dir", run, "--resume", "auto", "--steps", "3"], {}),
    ])
    line = one_line_error(*fresh[::2])
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    line = one_line_error(*changed[::2])
    assert "generation.num_generations 2 -> 3; loss.kappa 1.0 -> 2.0; lr 0.001 -> 0.5" in line, line
    assert "--allow-config-change" in line and " steps " not in line  # steps may change
    rc, out, err = complete
    assert rc == 0 and "already complete: step 3 of 3" in out and "last step" not in out, (out, err)
    assert not os.path.exists(stale)
    assert sorted(os.listdir(run)) == ckpts and run_id(run) == rid and metrics_steps(run) == [1, 2, 3]

    # allowed changes pass (steps, save cadence, logging); a forced change is said once
    more, forced = (hero(tmp_path, "train", "--config", cfg, "--output_dir", run, "--resume", "auto", *a)
                    for a in (["--steps", "4", "--save_steps", "2", "--tensorboard", "false"],
                              ["--steps", "5", "--lr", "2e-3", "--allow-config-change"]))
    assert more[0] == 0 and forced[0] == 0, (more[2], forced[2])
    assert "resuming with changed run-defining settings (allow_config_change): lr 0.001 -> 0.002" in forced[2]
    assert metrics_steps(run) == [1, 2, 3, 4, 5] and run_id(run) == rid

    rc, out, err = hero(tmp_path, "plot", run)
    assert rc == 0 and os.path.getsize(os.path.join(run, "metrics.png")) > 1000, err
    rc, out, err = hero(tmp_path, "train", "--config", cfg, "--output_dir", run, "--overwrite", "--steps", "1")
    assert rc == 0 and metrics_steps(run) == [1] and run_id(run) != rid, err
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint-")) == ["checkpoint-000001"]


@pytest.mark.slow  # several real training runs in subprocesses (~20-50 s): make test-all
def test_resume_from_a_checkpoint_of_another_run_into_a_run_dir_is_refused(tmp_path):
    cfg = config(tmp_path)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert [r[0] for r in hero_all(tmp_path, [(["train", "--config", cfg, "--output_dir", d], {}) for d in (a, b)])] == [0, 0]
    line = one_line_error(*hero(tmp_path, "train", "--config", cfg, "--output_dir", b, "--resume",
                                os.path.join(a, "checkpoint-000001"), "--steps", "3")[::2])
    assert f"that checkpoint is from run {run_id(a)}, but output_dir {b} holds run {run_id(b)}" in line
    assert metrics_steps(b) == [1, 2]


# ----------------------------------------------------------------------------------------------
# 4. Ctrl-C
# ----------------------------------------------------------------------------------------------
def _wait_for_steps(run, n, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.isfile(os.path.join(run, "metrics.jsonl")) and len(metrics_steps(run)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("the run did not reach its first step")


@pytest.mark.slow  # several real training runs in subprocesses (~20-50 s): make test-all
def test_ctrl_c_saves_at_the_step_boundary_and_prints_the_resume_command(tmp_path):
    cfg, run = config(tmp_path), str(tmp_path / "run")
    args = ["train", "--config", cfg, "--output_dir", run, "--steps", "200", "--save_steps", "0"]
    p = start(tmp_path, *args)
    _wait_for_steps(run, 1, p)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p)
    assert rc == 130 and "Traceback" not in err, err
    assert "Ctrl-C: saving a checkpoint when step" in err
    line = [ln for ln in err.splitlines() if ln.startswith("hero train: ")][-1]
    done = metrics_steps(run)
    ckpt_dir = os.path.join(run, f"checkpoint-{done[-1]:06d}")
    assert f"interrupted by Ctrl-C after step {done[-1]} of 200; checkpoint saved: {ckpt_dir}" in line, line
    resume = line.split("resume with: ")[1].split()
    assert resume[:2] == ["hero", "train"] and resume[-2:] == ["--resume", "auto"]
    assert os.path.isfile(os.path.join(ckpt_dir, "state.pt")) and done == list(range(1, done[-1] + 1))
    # the printed command continues the run (here with fewer total steps, an allowed change)
    rc, out, err = hero(tmp_path, *resume[1:], "--steps", str(done[-1] + 1))
    assert rc == 0, err
    assert metrics_steps(run) == list(range(1, done[-1] + 2))

    # a second Ctrl-C stops at once, still without a traceback
    p = start(tmp_path, *(args[:4] + [str(tmp_path / "run2")] + args[5:]))
    _wait_for_steps(str(tmp_path / "run2"), 1, p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p)
    assert rc == 130 and "Traceback" not in err, err
    assert "resume with: hero train" in err.splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# the pieces, in process (fast)
# ----------------------------------------------------------------------------------------------
def test_stale_temp_dirs_of_dead_writers_only_are_removed(tmp_path):
    from hero.io import remove_stale_temp_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = [f".tmp-final-{dead.pid}", f"final.old-{dead.pid}", f".tmp-final-{os.getpid()}", ".tmp-ab12cd34-x.json",
             "checkpoint-000001"]
    for n in names:
        (tmp_path / n).mkdir()
    assert sorted(os.path.basename(p) for p in remove_stale_temp_dirs(tmp_path)) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_config_diff_ignores_resumable_keys():
    from hero.config import TrainConfig, config_diff, config_to_dict

    a, b = TrainConfig(), TrainConfig()
    b.steps, b.save_steps, b.progress, b.output_dir, b.loss.impl = 99, 3, False, "elsewhere", "torch"
    assert config_diff(config_to_dict(a), config_to_dict(b)) == []
    b.lr, b.model.name, b.data.splits = 0.5, "other", ["random"]
    assert config_diff(config_to_dict(a), config_to_dict(b)) == [
        "data.splits ['random', 'popular', 'adversarial'] -> ['random']", "lr 1e-05 -> 0.5",
        "model.name 'tiny-llama' -> 'other'"]


def test_progress_bar_shows_small_losses_and_the_summary_reads_every_step(tmp_path):
    from hero.run_report import summarize
    from hero.trainer import Trainer

    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, **kw):
            self.kw = kw

    bar = Bar()
    stub = Trainer.__new__(Trainer)
    stub._dropped_steps, stub.cfg = 0, None
    stub._after_step({"loss": 1.2e-5, "reward": 0.5, "gate/kept_frac": 0.5}, bar)
    assert bar.kw["loss"] == "1.2e-05"
    recs = [{"step": i, "reward": float(i), "tokens_per_s": 10.0, "time/step_s": 1.0, "peak_memory_mb": 5.0 * i,
             "gate/kept_frac": None if i == 3 else 1.0} for i in range(1, 21)]
    s = summarize(recs)
    assert (s["steps"], s["reward_first"], s["reward_last"], s["tail_steps"]) == (20, 1.5, 19.5, 2)
    assert s["tokens_per_s"] == 10.0 and s["peak_memory_mb"] == 100.0 and s["kept_frac"] == 1.0
