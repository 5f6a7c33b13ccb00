"""The confidence-trap demo, end to end on a laptop CPU, offline: ``make demo``.

``python -m hero.experiments.confidence_trap.demo [--config configs/demo.yaml] [--out demo_out] [--KEY VALUE ...] [--runs hero,grpo]``
(also ``hero demo ...``, listed in ``hero.cli.COMMANDS``).

Stages (each prints a line with its wall time; the trainer shows a tqdm bar):

1. data: digits-POPE (``hero.experiments.confidence_trap.digits_pope``): an SFT pool (clean by default), an RL pool at every sigma in
   ``data.rl_sigmas`` (train source images, another seed), a held-out test set (test source images);
2. sft: a random-init tiny VLM (``hero.experiments.confidence_trap.tiny_vlm``) is warm-started on chain-of-thought targets
   ``<think>I see 3, 1, 4.</think><answer>no</answer>`` (``hero.experiments.confidence_trap.sft``), saved to ``models/sft``;
3. diagnose ``sft``: ``hero.experiments.confidence_trap.diagnostics.diagnose`` at every sigma in ``data.sigmas`` (answer-token entropy,
   accuracy per entropy bin, ECE + reliability, POPE per split, CHAIR of the digits named in ``<think>``);
4. one RL run per entry of ``runs`` (``hero.trainer.Trainer``, each from the same warm-started weights with
   the same seed, budget and data; default: ``hero`` = entropy weights + variance gate + adaptive KL, ``grpo``
   = no entropy weights and no gate, ``hero_negative`` = weights only on negative-advantage responses,
   ``hero_high`` = kappa -1, i.e. weights favouring HIGH-entropy tokens, the 80/20 paper / GTPO direction),
   each followed by the same diagnosis;
5. report: ``report.md`` (tables and sentences generated from the numbers, ``hero.experiments.confidence_trap.report``), PNG plots and
   ``summary.json`` (every number, the timings, the exact config).

Output layout (``--out``)::

    report.md  summary.json  config.yaml
    plots/{comparison,training_curves,sft_loss}.png  plots/<model>_{reliability,entropy_vs_sigma,entropy_bins}.png
    diagnosis/<model>.json       per-sigma numbers of each model
    models/sft/                  the warm-started model (``hero diagnose --model demo_out/models/sft ...``)
    runs/<run>/                  trainer output: metrics.jsonl, checkpoint-*, final/ (the trained policy)

Determinism: everything is seeded from ``seed`` (data, init, SFT batches, rollouts); with ``threads: 1`` two
runs give the same numbers. Files are written atomically. No network access anywhere.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hero.config import ConfigError, set_dotted, update_from_dict
from hero.io import json_safe, write_json

from .sft import SFTConfig

__all__ = [
    "DemoDataConfig",
    "DemoDiagnoseConfig",
    "DemoConfig",
    "DEFAULT_RL",
    "DEFAULT_RUNS",
    "MICRO_OVERRIDES",
    "OMNEX_RUNS",
    "load_demo_config",
    "demo_config_to_dict",
    "run_demo",
    "demo_main",
]


@dataclass
class DemoDataConfig:
    # Digits per image (image is 8 x 8k pixels, row layout).
    k: int = 3
    # SFT pool: questions per POPE split (the 3 splits share compositions; 3 x this many examples).
    sft_per_split: int = 2000
    # RL pool: questions per split at EACH sigma of rl_sigmas (seed + 1, train source images).
    rl_per_split: int = 200
    # Noise levels of the RL rollouts' images.
    rl_sigmas: List[float] = field(default_factory=lambda: [0.0, 30.0, 50.0])
    # Diagnosis: questions per split (held-out test source images); 3 x this many per sigma.
    test_per_split: int = 400
    # Diagnosis noise levels (std on the 0..255 pixel scale): the study's 0/30/50 plus 80 and 120, because on
    # this task accuracy barely moves up to sigma 50 (measured: 0.757 -> 0.730, within sampling noise), so the
    # trap (accuracy falls, entropy does not rise) can only show at stronger noise.
    sigmas: List[float] = field(default_factory=lambda: [0.0, 30.0, 50.0, 80.0, 120.0])


@dataclass
class DemoDiagnoseConfig:
    # Greedy tokens generated per question (a CoT answer is ~13 tokens + eos).
    max_new_tokens: int = 20
    # Questions per generate call.
    batch_size: int = 100
    # "Confident" threshold on the answer-token entropy (nats).
    low_entropy: float = 0.3
    # ECE / reliability bins.
    n_bins: int = 10


#: The shared RL (hero trainer) config of every run, as in configs/demo.yaml; keys from hero/config.py.
DEFAULT_RL: Dict[str, Any] = {
    "model": {"name": "tiny-vlm"},
    "generation": {"num_generations": 8, "max_new_tokens": 20, "temperature": 1.0},
    "rewards": {"funcs": ["yes_no", "format"], "weights": [1.0, 0.5]},
    "gate": {"enabled": True, "keep_frac": 0.6},
    "kl": {"beta": 0.02, "target": 0.05, "horizon": 1000},
    "loss": {"kappa": 1.0, "weight_on": "all", "entropy_weighting": True, "loss_agg": "seq-mean-token-mean",
             "impl": "auto", "path": "fused"},
    "steps": 200,
    "batch_size": 16,
    "lr": 2.0e-4,
    "save_steps": 0,
    "save_total_limit": 1,
}

#: Runs: name -> overrides (dotted keys) of DEFAULT_RL.
DEFAULT_RUNS: Dict[str, Dict[str, Any]] = {
    "hero": {},
    "grpo": {"loss.entropy_weighting": False, "gate.enabled": False},
    "hero_negative": {"loss.weight_on": "negative"},
    "hero_high": {"loss.kappa": -1.0},
}

#: OMNEX-VL runs (``--omnex``; not in the default comparison, see the README for their time): the method's
#: variance-guided selection (keep the top half of groups by reward variance), its caption reward (the digits
#: named in <think> must answer the question; hero.experiments.confidence_trap.grounding) and the NTK-conflict
#: regularizer (lambda 0.1, tau 0.54), on vanilla GRPO (``omnex``) or on HERO (``omnex_hero`` = omnex+hero).
OMNEX: Dict[str, Any] = {
    "gate.enabled": True,
    "gate.keep_frac": 0.5,
    "rewards.funcs": ["yes_no", "format", "hero.experiments.confidence_trap.grounding:caption_reward"],
    "rewards.weights": [1.0, 0.5, 0.5],
    "omnex.ntk_weight": 0.1,
    "omnex.tau": 0.54,
    "omnex.k1": 64,
    "omnex.k2": 32,
}
OMNEX_RUNS: Dict[str, Dict[str, Any]] = {
    "omnex": {"loss.entropy_weighting": False, **OMNEX},
    "omnex_hero": dict(OMNEX),
}

#: A micro budget for smoke tests (``--micro``): seconds, not minutes; the numbers mean nothing.
MICRO_OVERRIDES: Dict[str, Any] = {
    "data.sft_per_split": 16,
    "data.rl_per_split": 4,
    "data.test_per_split": 4,
    "sft.steps": 4,
    "sft.batch_size": 8,
    "sft.log_every": 2,
    "diagnose.batch_size": 16,
    "rl.steps": 2,
    "rl.batch_size": 2,
    "rl.generation.num_generations": 2,
}


@dataclass
class DemoConfig:
    # Seed of everything (data, model init, SFT batches, RL rollouts).
    seed: int = 0
    # torch intra-op threads (torch.set_num_threads) during the demo; 1 is fastest for this tiny model.
    threads: int = 1
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    # hero.experiments.confidence_trap.tiny_vlm.TinyVLMConfig overrides (hidden_size, num_layers, num_heads, num_kv_heads, ...).
    model: Dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                                           "num_kv_heads": 2, "intermediate_size": 128})
    # Supervised warm-start (hero.experiments.confidence_trap.sft.SFTConfig); 1200 steps reach ~0.9 clean test accuracy (600: ~0.76).
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=1200))
    diagnose: DemoDiagnoseConfig = field(default_factory=DemoDiagnoseConfig)
    # The shared trainer config (hero/config.py TrainConfig as a nested dict).
    rl: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_RL))
    # name -> {dotted trainer key: value} applied on top of ``rl`` for that run (in order).
    runs: Dict[str, Dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_RUNS))

    def validate(self) -> "DemoConfig":
        if not self.runs:
            raise ValueError("runs must be a non-empty mapping of run name -> overrides")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        d = self.data
        for name in ("sft_per_split", "rl_per_split", "test_per_split"):
            if getattr(d, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(d, name)}")
        if not 2 <= d.k <= 9:
            raise ValueError(f"data.k must be in [2, 9], got {d.k}")
        for name in ("sigmas", "rl_sigmas"):
            vals = getattr(d, name)
            if not vals or any(not math.isfinite(s) or s < 0 for s in vals):
                raise ValueError(f"data.{name} must be a non-empty list of numbers >= 0, got {vals}")
        if self.diagnose.max_new_tokens < 1 or self.diagnose.batch_size < 1 or self.diagnose.n_bins < 1:
            raise ValueError("diagnose.max_new_tokens, diagnose.batch_size and diagnose.n_bins must be >= 1")
        self.sft.validate()
        for name in self.runs:
            if not name or not all(c.isalnum() or c in "-_" for c in name) or name == "sft":
                raise ValueError(f"run name {name!r} must be non-empty [A-Za-z0-9_-] and not 'sft'")
        for name in self.runs:
            self.rl_config(name, "/tmp/unused")  # raises hero.config.ConfigError naming the bad key
        return self

    def rl_config(self, run: str, output_dir: str, progress: bool = False):
        """The validated hero TrainConfig of one run (shared ``rl`` + the run's overrides)."""
        from hero.config import apply_overrides, config_from_dict

        cfg = config_from_dict(copy.deepcopy(self.rl))
        ov = self.runs[run] or {}
        if not isinstance(ov, dict):
            raise ValueError(f"runs.{run} must be a mapping of dotted trainer keys to values, got {ov!r}")
        apply_overrides(cfg, [(k, v) for k, v in ov.items()])
        cfg.seed = self.seed
        cfg.output_dir = output_dir
        cfg.progress = progress
        cfg.export = True
        cfg.resume = ""
        return cfg.validate()


# ----------------------------------------------------------------------------------------------
# config loading
# ----------------------------------------------------------------------------------------------
def _apply(cfg: DemoConfig, key: str, value: Any) -> None:
    """One dotted override. ``runs.<run>.<trainer key>`` keeps the trainer key dotted (the run's overrides are
    applied to its TrainConfig by hero.config); everything else goes through hero.config's typed setter."""
    head, _, rest = key.partition(".")
    if head == "runs" and "." in rest:
        run, _, trainer_key = rest.partition(".")
        cfg.runs.setdefault(run, {})[trainer_key] = value
        return
    try:
        set_dotted(cfg, key, value)
    except ConfigError as e:
        raise ValueError(f"demo config: {e}") from None


def load_demo_config(path: Optional[str] = None, overrides: Sequence[Tuple[str, Any]] = ()) -> DemoConfig:
    """Defaults (= configs/demo.yaml) <- YAML file <- (dotted key, value) overrides; validated. Loading and
    typing are hero.config's (one loader for every config); ``model``, ``rl`` and ``runs`` replace the defaults
    as a whole when the file sets them."""
    cfg = DemoConfig()
    if path:
        import yaml

        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        try:
            update_from_dict(cfg, d)
        except ConfigError as e:
            raise ValueError(f"{path}: {e}") from None
    for k, v in overrides:
        _apply(cfg, k, v)
    return cfg.validate()


def demo_config_to_dict(cfg: DemoConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------
class _Clock:
    """Stage timer + progress lines ``[demo  12.3s] ...``."""

    def __init__(self, log: Optional[Callable[[str], None]]):
        self.t0 = time.perf_counter()
        self.log = log
        self.timings: Dict[str, float] = {}

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(f"[demo {time.perf_counter() - self.t0:6.1f}s] {msg}")

    def stage(self, name: str):
        clock = self

        class _S:
            def __enter__(self):
                self.t = time.perf_counter()
                clock.say(f"{name} ...")
                return self

            def __exit__(self, et, ev, tb):
                dt = time.perf_counter() - self.t
                clock.timings[name] = dt
                if et is None:
                    clock.say(f"{name} done in {dt:.1f}s")
                return False

        return _S()


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):  # pragma: no cover - Windows
        return "n/a"


def _build_data(cfg: DemoConfig) -> Tuple[List[dict], List[dict], List[dict]]:
    from hero.experiments.confidence_trap.digits_pope import build_digits_pope

    d = cfg.data
    sft = []
    for s in cfg.sft.sigmas:
        for ex in build_digits_pope(d.sft_per_split, subset="train", sigma=float(s), seed=cfg.seed, k=d.k):
            ex["id"] = f"{ex['id']}-s{float(s):g}"
            sft.append(ex)
    rl = []
    for s in d.rl_sigmas:
        for ex in build_digits_pope(d.rl_per_split, subset="train", sigma=float(s), seed=cfg.seed + 1, k=d.k):
            ex["id"] = f"{ex['id']}-s{float(s):g}"
            rl.append(ex)
    test = build_digits_pope(d.test_per_split, subset="test", sigma=0.0, seed=cfg.seed, k=d.k)
    return sft, rl, test


def _diagnose(model, processor, test: List[dict], cfg: DemoConfig, name: str, out_dir: str, clock: _Clock):
    from hero.experiments.confidence_trap.diagnostics import TinyVLMAdapter, diagnose

    model.eval()
    adapter = TinyVLMAdapter(model, processor, max_new_tokens=cfg.diagnose.max_new_tokens, seed=cfg.seed)
    D = cfg.diagnose
    diag = diagnose(adapter, test, [float(s) for s in cfg.data.sigmas], seed=cfg.seed, batch_size=D.batch_size,
                    n_bins=D.n_bins, low_entropy=D.low_entropy)
    diag.meta["model"] = name
    diag.save_json(os.path.join(out_dir, "diagnosis", f"{name}.json"))
    plots = diag.save_plots(os.path.join(out_dir, "plots"), prefix=f"{name}_")
    for s in diag.sigmas:
        r = diag.per_sigma[f"{s:g}"]
        clock.say(f"  {name} sigma={s:g}: accuracy {r['accuracy']:.3f}, mean answer entropy {r['mean_entropy']:.3f} nats, "
                  f"H<={D.low_entropy:g} {r['low_entropy_frac']:.2f}, ECE {r['ece']:.3f}")
    return diag, [os.path.relpath(p, out_dir) for p in plots]


_CURVE_FIELDS = ("step", "reward", "reward_std", "rewards/yes_no/mean", "rewards/format/mean", "entropy", "kl", "beta",
                 "gate/kept_frac", "gate/all_correct", "gate/all_wrong", "frac_reward_zero_std", "loss", "grad_norm",
                 "completions/mean_length", "clip_ratio/low_mean", "clip_ratio/high_mean", "weights/max",
                 "weights/effective_tokens", "time/step_s")


def _read_metrics(path: str) -> List[dict]:
    import json

    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    m = json.loads(line)
                    rows.append({k: m[k] for k in _CURVE_FIELDS if k in m})
    return rows


def run_demo(cfg: DemoConfig, out_dir: str, *, log: Optional[Callable[[str], None]] = print,
             progress_bars: bool = True, command: str = "") -> Dict[str, Any]:
    """Run the whole pipeline (module docstring) into ``out_dir``; returns the summary dict (also written
    to ``out_dir/summary.json``)."""
    import torch

    from hero.experiments.confidence_trap import report as R
    from hero.io import atomic_write_text

    cfg.validate()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    clock = _Clock(log)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    load_start = _loadavg()
    cfg_dict = demo_config_to_dict(cfg)
    try:
        import yaml

        atomic_write_text(os.path.join(out_dir, "config.yaml"), yaml.safe_dump(cfg_dict, sort_keys=False))
        clock.say(f"out={out_dir} threads={cfg.threads} load average {load_start} "
                  f"runs={','.join(cfg.runs)} (sft {cfg.sft.steps} steps, rl {cfg.rl.get('steps')} steps/run)")

        with clock.stage("data"):
            sft_data, rl_data, test = _build_data(cfg)
            clock.say(f"  {len(sft_data)} SFT examples, {len(rl_data)} RL rows, {len(test)} test questions x "
                      f"{len(cfg.data.sigmas)} sigmas")

        from hero.experiments.confidence_trap.tiny_vlm import build_tiny_vlm
        from hero.experiments.confidence_trap.sft import sft_train

        with clock.stage("sft"):
            model, processor = build_tiny_vlm(image_size=tuple(sft_data[0]["image"].shape[:2]), seed=cfg.seed,
                                              **cfg.model)
            n_params = model.num_parameters()
            clock.say(f"  tiny VLM: {n_params} parameters; {cfg.sft.steps} steps x batch {cfg.sft.batch_size}")
            sft_res = sft_train(model, processor, sft_data, cfg.sft, seed=cfg.seed,
                                progress=lambda s, n, l: clock.say(f"  sft step {s}/{n} loss {l:.4f}"))
            model.save_pretrained(os.path.join(out_dir, "models", "sft"), tokenizer=processor.tokenizer)

        diags: Dict[str, dict] = {}
        per_model_plots: Dict[str, List[str]] = {}
        with clock.stage("diagnose/sft"):
            d, plots = _diagnose(model, processor, test, cfg, "sft", out_dir, clock)
            diags["sft"], per_model_plots["sft"] = d.to_dict(), plots

        from .models import TinyVLMModelAdapter
        from hero.trainer import Trainer
        from hero.config import config_to_dict

        training: Dict[str, List[dict]] = {}
        rl_configs: Dict[str, dict] = {}
        for name in cfg.runs:
            run_dir = os.path.join(out_dir, "runs", name)
            tcfg = cfg.rl_config(name, run_dir, progress=progress_bars)
            rl_configs[name] = config_to_dict(tcfg)
            with clock.stage(f"rl/{name}"):
                if os.path.isdir(run_dir):  # a previous demo's run: start clean (only our own folder)
                    shutil.rmtree(run_dir)
                policy = copy.deepcopy(model)
                trainer = Trainer(tcfg, model=policy, adapter=TinyVLMModelAdapter(processor), dataset=rl_data)
                m = trainer.train()
                trainer.export()
                clock.say(f"  {name}: last step reward {m.get('reward', float('nan')):.3f}, entropy "
                          f"{m.get('entropy', float('nan')):.3f}, kept {m.get('gate/kept_frac', float('nan')):.2f}, "
                          f"beta {m.get('beta', float('nan')):.4f}")
            training[name] = _read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            with clock.stage(f"diagnose/{name}"):
                d, plots = _diagnose(trainer.model, processor, test, cfg, name, out_dir, clock)
                diags[name], per_model_plots[name] = d.to_dict(), plots
            del trainer, policy

        with clock.stage("report"):
            plots_dir = os.path.join(out_dir, "plots")
            plot_paths: Dict[str, Any] = {"per_model": per_model_plots}
            colors = {n: f"C{i}" for i, n in enumerate(diags)}  # one color per model in every plot
            R.plot_comparison(diags, os.path.join(plots_dir, "comparison.png"), colors=colors)
            plot_paths["comparison"] = "plots/comparison.png"
            if training:
                R.plot_training_curves(training, os.path.join(plots_dir, "training_curves.png"), colors=colors)
                plot_paths["training_curves"] = "plots/training_curves.png"
            if sft_res.losses:
                R.plot_sft_loss(sft_res.losses, os.path.join(plots_dir, "sft_loss.png"))
                plot_paths["sft_loss"] = "plots/sft_loss.png"
    finally:
        torch.set_num_threads(prev_threads)

    clock.timings["total"] = time.perf_counter() - clock.t0
    import transformers

    summary: Dict[str, Any] = {
        "format": 1,
        "command": command or "python -m hero.experiments.confidence_trap.demo",
        "config": cfg_dict,
        "runs": {k: dict(v or {}) for k, v in cfg.runs.items()},
        "rl_configs": rl_configs,
        "model_parameters": n_params,
        "sft": dict(sft_res.summary(), losses=[round(x, 6) for x in sft_res.losses]),
        "diagnoses": diags,
        "training": training,
        "plots": plot_paths,
        "timings": {k: round(v, 2) for k, v in clock.timings.items()},
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(terse=True), "cpu_count": os.cpu_count(), "torch_threads": cfg.threads,
            "load_average_start": load_start, "load_average_end": _loadavg(),
        },
        "not_run": [],
    }
    summary = json_safe(summary)  # the report reads what summary.json holds
    write_json(os.path.join(out_dir, "summary.json"), summary)
    R.write_report(summary, out_dir)
    clock.say(f"wrote {os.path.join(out_dir, 'report.md')} (total {clock.timings['total']:.1f}s, load average "
              f"{_loadavg()})")
    return summary


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
_HELP = """usage: python -m hero.experiments.confidence_trap.demo [--config FILE] [--out DIR] [--runs NAME,...] [--micro] [--quiet] [--KEY VALUE ...]
       (hero demo ... when registered)

The confidence-trap demo: SFT warm-start of a tiny VLM on digits-POPE, diagnosis at sigma 0/30/50, HERO and
vanilla GRPO runs of the same budget, the same diagnosis after each, a markdown report with plots.
  --config FILE   demo config (default: built-in defaults = configs/demo.yaml)
  --out DIR       output folder (default demo_out)
  --runs A,B      only these runs from the config (e.g. --runs hero,grpo)
  --omnex         add the OMNEX-VL runs omnex and omnex_hero (omnex+hero) to the comparison (see README)
  --micro         tiny smoke-test budget (seconds; numbers meaningless)
  --quiet         no progress lines or bars
  --KEY VALUE     override any config key, dotted: --sft.steps 300 --rl.steps 50 --rl.loss.kappa 0.5
                  --data.test_per_split 100 --runs.grpo.loss.loss_agg token-mean
"""


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path: Optional[str] = None
    out = "demo_out"
    only: Optional[List[str]] = None
    quiet = micro = omnex = False
    overrides: List[Tuple[str, Any]] = []
    i = 0
    try:
        while i < len(argv):
            a = argv[i]
            if a in ("-h", "--help"):
                print(_HELP)
                return 0
            key, val = (a.split("=", 1) + [None])[:2] if a.startswith("--") and "=" in a else (a, None)
            if key in ("--config", "--out", "--runs"):
                if val is None:
                    if i + 1 >= len(argv):
                        raise ValueError(f"{key} needs a value")
                    val = argv[i + 1]
                    i += 1
                if key == "--config":
                    config_path = val
                elif key == "--out":
                    out = val
                else:
                    only = [r.strip() for r in val.split(",") if r.strip()]
            elif key == "--micro":
                micro = True
            elif key == "--omnex":
                omnex = True
            elif key == "--quiet":
                quiet = True
            elif key.startswith("--") and len(key) > 2:
                if val is None:
                    if i + 1 >= len(argv):
                        raise ValueError(f"{key} needs a value")
                    val = argv[i + 1]
                    i += 1
                overrides.append((key[2:], val))
            else:
                raise ValueError(f"unexpected argument {a!r}")
            i += 1
        pre = list(MICRO_OVERRIDES.items()) if micro else []
        cfg = load_demo_config(config_path, pre + overrides)
        if omnex:
            cfg.runs.update({k: dict(v) for k, v in OMNEX_RUNS.items() if k not in cfg.runs})
            cfg.validate()
        if only is not None:
            unknown = [r for r in only if r not in cfg.runs]
            if unknown:
                raise ValueError(f"--runs: unknown run(s) {unknown}; the config has {list(cfg.runs)}")
            cfg.runs = {r: cfg.runs[r] for r in only}
    except (ValueError, OSError) as e:
        print(f"hero demo: {e}", file=sys.stderr)
        return 2
    command = "python -m hero.experiments.confidence_trap.demo " + " ".join(argv)
    log = None if quiet else (lambda s: print(s, flush=True))
    summary = run_demo(cfg, out, log=log, progress_bars=not quiet, command=command.strip())
    if not quiet:
        print(f"report: {os.path.join(os.path.abspath(out), 'report.md')}")
    return 0 if summary else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(demo_main())
