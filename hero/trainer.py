"""The lean HERO trainer: GRPO with entropy-weighted tokens on HuggingFace transformers models.

One step (``Trainer.train_step``):

1. take ``batch_size`` rows (a deterministic per-epoch permutation; bad rows skipped or fatal per
   ``on_bad_row``), build prompts from ``data.prompt_template``;
2. sample G = ``generation.num_generations`` completions per prompt with ``model.generate`` (KV cache,
   ``do_sample``, ``generation.temperature``), in eval mode, without grad;
3. score them with the reward functions (weighted sum), compute group advantages (``hero.grpo``), apply the
   variance gate (VG-HNM) and keep only the kept groups' completions;
4. optional no-grad passes: old-policy log-probs (``num_iterations > 1``) and reference log-probs (KL term);
5. for each of ``num_iterations`` passes and each micro-batch: run the base model to the LAST HIDDEN STATES,
   slice the completion positions and call ``hero_loss(hidden, labels, advantages, weight=lm_head.weight,
   temperature=generation.temperature, beta=controller.beta, normalizer=<global count>, ...)``: the
   [tokens x vocab] logits are never materialized (``loss.path="fused"``); backward; then clip + optimizer
   step + LR schedule. Micro-batches hold ``micro_batch_size`` completions, or (``micro_batch_tokens``) are
   length-sorted groups within a token budget; one whose longest completion reaches
   ``model.gradient_checkpointing_min_len`` runs with gradient checkpointing. With ``model.packing`` (auto: on
   for text causal LMs and the VLMs of ``hero.models.hf_vlm`` where it is exact; with eager / sdpa only where
   the packed T^2 attention is no larger than the padded one, ``Trainer._packs``) a micro-batch's rows run
   padding-free, concatenated into one sequence with position ids restarting per row
   (``hero.rollout.pack_rows``), and the loss sees only the scored tokens [N, D] with
   ``seq_ids`` naming their rows: the same loss and gradients as the padded layout, no pad tokens computed;
6. update the adaptive KL controller (dynamic balancer) from the measured KL and log.

``loss.path="logits"`` materializes the completion logits and feeds them to ``hero_loss``;
``loss.path="reference"`` does the same in float64 through ``hero_kernels.reference`` (tests compare the
gradients of the three).

Logs: ``<output_dir>/metrics.jsonl`` (one JSON object per step), TensorBoard events when
``tensorboard: true`` and torch.utils.tensorboard imports, a tqdm bar. Checkpoints: ``hero.checkpoint``.

Logged per step (TRL names where TRL has one):
* rollout: ``reward`` (mean weighted reward), ``reward_std`` (mean of the per-group stds, Bessel),
  ``rewards/<fn>/mean|std``, ``frac_reward_zero_std``, ``completions/mean_length`` (tokens incl. eos),
  ``completions/clipped_ratio`` (no eos within max_new_tokens), ``bad_rows`` (groups dropped for a NaN reward),
  ``temperature``;
* gate: ``gate/kept_frac`` (kept groups / all groups), ``gate/threshold`` (smallest kept variance),
  ``gate/all_correct``, ``gate/all_wrong`` (group counts; correctness from the FIRST reward function >=
  rewards.correct_threshold); ``gate/easy|medium|hard`` (group counts by the total reward's group variance and
  mean, thresholds gate.medium_variance / gate.easy_mean); ``advantages/mean|std`` over the kept completions;
* OMNEX-VL (hero.omnex): ``omnex/caption_reward`` (= rewards/caption/mean, when the caption reward is on);
  with omnex.ntk_weight > 0 the NTK-conflict regularizer is added to each micro-batch's loss and logs
  ``omnex/ntk_loss``, ``omnex/positive_pairs``, ``omnex/anchors`` (hero.omnex.hook; zeros when nothing trained);
* loss (from hero_loss, aggregated over micro-batches of the last pass; null when nothing was kept):
  ``entropy`` (mean over tokens), ``entropy/min|max``, ``weights/max``, ``weights/effective_tokens``, ``kl``,
  ``clip_ratio/low_mean``, ``clip_ratio/high_mean``; ``loss`` (mean over the num_iterations passes),
  ``grad_norm`` (before clipping), ``beta`` (the KL coefficient this step used), ``lr``;
* cost: ``tokens_per_s`` (completion tokens sampled / step wall time), ``time/step_s``, ``time/generate_s``,
  ``peak_memory_mb`` (CUDA: max_memory_allocated this step; CPU: the process's lifetime ru_maxrss).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from hero import checkpoint as ckpt
from hero.config import ConfigError, ModelConfig, TrainConfig, config_diff, config_to_dict
from hero.errors import HeroUserError, TrainingInterrupted
from hero.grpo import AdaptiveKLController, GateResult, difficulty_counts, group_advantages, variance_gate
from hero.io import atomic_dir, atomic_write_text, json_safe, remove_stale_temp_dirs
from hero.omnex.hook import build_ntk_hook
from hero.registry import dataset_builder
from hero.rewards import check_rewards, get_reward, reward_name
from hero.rollout import (IGNORE_INDEX, BadRowError, ModelAdapter, PackedRows, build_policy, completion_hidden,
                          completion_labels, frozen_copy, pack_rows, row_name)
from hero_kernels import linear_entropy_logprob
from hero_kernels.loss import METRIC_KEYS, hero_loss, loss_normalizer, metrics_to_floats

__all__ = ["Trainer", "Rollout", "LossMetrics", "BadRowError", "MetricsLogger", "peak_memory_mb", "load_dataset"]


# ----------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated (reset each step by the trainer); CPU: process ru_maxrss
    (the lifetime peak resident set size)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


class MetricsLogger:
    """Appends one JSON line per step to ``<dir>/metrics.jsonl`` (+ TensorBoard scalars when enabled)."""

    def __init__(self, output_dir: str, tensorboard: bool = False, resume_step: Optional[int] = None):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None and os.path.isfile(self.path):
            # drop lines of steps after the checkpoint (written before a kill): the resumed run redoes them
            keep = []
            with open(self.path, encoding="utf-8") as f:
                for ln in f:
                    try:
                        if json.loads(ln).get("step", 0) <= resume_step:
                            keep.append(ln if ln.endswith("\n") else ln + "\n")
                    except json.JSONDecodeError:  # a line cut short by the kill
                        continue
            atomic_write_text(self.path, "".join(keep))
        elif resume_step is None and os.path.isfile(self.path):
            os.replace(self.path, self.path + ".prev")  # a fresh run never mixes with an old log
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tb"))
            except Exception as e:  # noqa: BLE001 - tensorboard missing or broken
                warnings.warn(f"TensorBoard logging disabled: {e}")

    def log(self, metrics: Dict[str, Any]) -> None:
        self._f.write(json.dumps(json_safe(metrics), allow_nan=False) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = int(metrics.get("step", 0))
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def load_dataset(cfg: TrainConfig) -> List[dict]:
    """Rows for ``cfg.data``: the builder registered for ``data.name`` in ``hero.registry`` ("jsonl": the
    file at ``data.path``, images loaded lazily per row; "digits_pope": built offline by the experiment)."""
    return dataset_builder(cfg.data.name)(cfg)


class RowStream:
    """Endless stream of (index, row) in a per-epoch permutation seeded by (seed, epoch); state = (epoch, pos)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        if n <= 0:
            raise HeroUserError("the dataset is empty; check data.name / data.path")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(self.n)

    def next(self) -> int:
        if self.pos >= self.n:
            self.epoch += 1
            self.pos = 0
            self._order = self._make_order()
        i = int(self._order[self.pos])
        self.pos += 1
        return i

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load_state_dict(self, st: Dict[str, int]) -> None:
        if st.get("n", self.n) != self.n:
            raise HeroUserError(f"the checkpoint was taken on a dataset of {st['n']} usable rows, this one has "
                                f"{self.n}; resume on the same data (or start a fresh run)")
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])
        self._order = self._make_order()


# ----------------------------------------------------------------------------------------------
# what one step carries
# ----------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One step's sampled batch: B prompts x G completions = N rows; the gate keeps n of them.

    Sequence layout: ``[left-padded prompt (P) | completion (C, right-padded)]`` (see hero.rollout)."""

    row_indices: List[int]  # [B] dataset index of each prompt
    group_size: int  # G
    prompt: Dict[str, Tensor]  # input_ids / attention_mask [N, P] (+ pixel_values, ...), each prompt G times
    completion_ids: Tensor  # [N, C]
    completion_mask: Tensor  # [N, C] long: 1 up to and including eos
    texts: List[str]  # [N] decoded completions
    rewards: Tensor  # [N, F] float64, one column per reward function (NaN: could not score)
    total_reward: Tensor  # [N] weighted sum of the finite rewards
    advantages: Tensor  # [N]
    gate: GateResult
    bad_groups: Tensor  # [B] bool: a reward was NaN/inf, the group is dropped
    kept: Tensor  # [n] long: indices into N of the kept groups' completions
    labels: Tensor  # [n, C] completion ids of the kept completions, IGNORE_INDEX after eos
    generate_s: float = 0.0
    old_logp: Optional[Tensor] = None  # [n, C] under the sampling policy (num_iterations > 1)
    ref_logp: Optional[Tensor] = None  # [n, C] under the reference policy (KL term on)
    metrics: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return len(self.row_indices)

    @property
    def prompt_len(self) -> int:
        return self.prompt["input_ids"].shape[1]


class MicroBatch(NamedTuple):
    """Model inputs of some kept completions, trimmed to their longest completion (C')."""

    input_ids: Tensor  # [m, P + C']
    attention_mask: Tensor  # [m, P + C']
    extra: Dict[str, Tensor]  # other model inputs (pixel_values, ...)
    labels: Tensor  # [m, C']
    rows: Union[slice, Tensor]  # which kept completions (a slice, or row indices [m] under micro_batch_tokens)
    packed: Optional[PackedRows] = None  # the padding-free layout of the same rows (model.packing), or None

    @property
    def completion_len(self) -> int:
        return self.labels.shape[1]

    def scored(self, per_token: Optional[Tensor]) -> Optional[Tensor]:
        """[m, C', ...] -> the loss's layout: as is, or (packed) the N scored tokens [N, ...] in row order."""
        if per_token is None or self.packed is None:
            return per_token
        return per_token[self.packed.row, self.packed.col]

    def padded(self, scored: Tensor) -> Tensor:
        """Inverse of ``scored``: [N, ...] -> [m, C', ...] (zeros where nothing is scored) when packed."""
        return scored if self.packed is None else self.packed.unpack(scored, tuple(self.labels.shape))


#: How hero_loss's per-micro-batch metrics combine over a pass (every METRIC_KEYS entry is in exactly one).
TOKEN_MEANS = ("entropy/mean", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean")
RESPONSE_MEANS = ("weights/effective_tokens",)
MAXIMA = ("entropy/max", "weights/max")
MINIMA = ("entropy/min",)
COUNTS = ("tokens", "responses")
#: The loss-side metrics a step logs (NaN when nothing was trained).
LOSS_METRICS = tuple(k for k in METRIC_KEYS if k not in COUNTS)


class LossMetrics:
    """Accumulates one pass's micro-batch losses and metrics: token-weighted means, response-weighted means,
    extrema over micro-batches that had tokens, and counts. The loss is a sum (each micro-batch's loss is
    already divided by the pass's global normalizer)."""

    def __init__(self):
        self.loss = 0.0
        self.counts = dict.fromkeys(COUNTS, 0.0)
        self.sums = dict.fromkeys(TOKEN_MEANS + RESPONSE_MEANS, 0.0)
        self.extrema: Dict[str, float] = {}

    def add(self, loss: float, metrics: Dict[str, float]) -> None:
        tokens, responses = metrics.get("tokens", 0.0), metrics.get("responses", 0.0)
        self.loss += loss
        self.counts["tokens"] += tokens
        self.counts["responses"] += responses
        for key in TOKEN_MEANS + RESPONSE_MEANS:
            if key in metrics:
                self.sums[key] += metrics[key] * (tokens if key in TOKEN_MEANS else responses)
        if tokens > 0:
            for key, pick in [(k, max) for k in MAXIMA] + [(k, min) for k in MINIMA]:
                if key in metrics:
                    self.extrema[key] = pick(self.extrema.get(key, metrics[key]), metrics[key])

    def result(self) -> Dict[str, float]:
        out = {"loss": self.loss, "tokens": self.counts["tokens"]}
        for key, total in self.sums.items():
            weight = self.counts["tokens" if key in TOKEN_MEANS else "responses"]
            out[key] = total / max(weight, 1.0)
        out.update({k: v for k, v in self.extrema.items() if math.isfinite(v)})
        return out


# ----------------------------------------------------------------------------------------------
# run control
# ----------------------------------------------------------------------------------------------
#: Warn when every group has been dropped (nothing trained) for this many consecutive steps.
DROPPED_STEPS_WARNING = 3


def _nothing_trains_message(m: Dict[str, Any], cfg: TrainConfig) -> str:
    """Why every group was dropped (from the last step's metrics) and what to do about it."""
    groups = cfg.batch_size
    if m.get("bad_rows", 0) >= groups:
        why, fix = "every group had a NaN/Inf reward", "fix the reward or the rows named in the bad-row warnings"
    elif m.get("gate/all_wrong", 0) >= groups:
        why = "every completion got the same low reward, so no group has reward variance"
        fix = ("a policy that never earns a reward learns nothing from GRPO: start from a model that sometimes "
               "earns it (e.g. the demo's warm-started demo_out/models/sft), use a denser reward, or raise "
               "generation.num_generations / generation.temperature")
    elif m.get("gate/all_correct", 0) >= groups:
        why = "every group was all correct"
        fix = "the task is solved for this model: use harder rows (e.g. a larger data.sigma for digits_pope)"
    else:
        why = "every group's completions got identical rewards (zero variance)"
        fix = "use a reward that tells completions apart, or raise generation.num_generations / temperature"
    return f"nothing has trained for {DROPPED_STEPS_WARNING} steps (gate/kept_frac=0, loss 0): {why}; {fix}"


class _StopAtStepBoundary:
    """Context manager: the first SIGINT only sets ``requested`` (the loop saves at the step boundary), the
    second raises KeyboardInterrupt at once. A no-op outside the main thread (signals go to the main thread)."""

    def __init__(self, next_step: Callable[[], int]):
        self.requested = False
        self._next_step = next_step
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C stops at once
        print(f"\nCtrl-C: saving a checkpoint when step {self._next_step()} ends (Ctrl-C again to stop now, "
              "losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopAtStepBoundary":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
def _is_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model already recomputes activations in backward (False when it cannot tell)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 name first
        if isinstance(getattr(type(model), name, None), property):
            return bool(getattr(model, name))
    return False


def _resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; a device this machine does not have is a HeroUserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (i - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


class Trainer:
    """HERO-GRPO trainer (see module docstring).

    cfg: a validated TrainConfig. model / adapter: bring your own (both or neither; default built from
    cfg.model). dataset: list of row dicts (default ``load_dataset(cfg)``). reward_funcs: callables
    overriding cfg.rewards.funcs (weights still from cfg.rewards.weights). ref_model: overrides the frozen
    copy / cfg.model.ref_model.
    """

    def __init__(self, cfg: TrainConfig, model: Optional[nn.Module] = None, adapter: Optional[ModelAdapter] = None,
                 dataset: Optional[List[dict]] = None, reward_funcs: Optional[Sequence[Callable]] = None,
                 ref_model: Optional[nn.Module] = None):
        cfg.validate()
        self.cfg = cfg
        self.device = _resolve_device(cfg.device)
        resume_path = self._resume_checkpoint()  # before anything slow: a wrong path or a changed config fails fast
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        self._build_rewards(reward_funcs)  # before the model too: an unknown reward name fails fast
        self.dataset = dataset if dataset is not None else load_dataset(cfg)
        if not self.dataset:
            raise HeroUserError(f"the dataset is empty (data.name={cfg.data.name!r}"
                                + (f", data.path={cfg.data.path!r}" if cfg.data.path else "") + "): no usable rows")
        self.model, self.adapter = self._build_policy(model, adapter)
        self.ntk_hook = build_ntk_hook(cfg)  # OMNEX-VL NTK-conflict regularizer (None when omnex.ntk_weight == 0)
        # KL: the controller (dynamic balancer) and the reference model
        self.kl_ctl = AdaptiveKLController(cfg.kl.beta, cfg.kl.target or None, cfg.kl.horizon, cfg.kl.clip)
        self.use_kl = cfg.kl.beta > 0
        self.ref_model, self.ref_is_copy = self._build_reference(ref_model) if self.use_kl else (None, False)
        self.packing = self._resolve_packing()
        # eager / sdpa attend packed rows through a materialized [T, T] block-diagonal mask (and eager a [heads, T, T]
        # score tensor): "auto" packs a micro-batch only where that is no larger than the padded rows x width^2
        # (_packs); flash_attention_2's varlen kernels, and model.packing on, always pack
        self.pack_always = (self.cfg.model.packing == "on"
                            or getattr(self.model.config, "_attn_implementation", None) == "flash_attention_2")
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(
            cfg.lr_schedule, cfg.warmup_steps * cfg.num_iterations, cfg.steps * cfg.num_iterations))
        self.rows = RowStream(len(self.dataset), cfg.seed, cfg.data.shuffle)
        self.step = 0
        self.bad_rows: List[str] = []
        self.last_metrics: Dict[str, Any] = {}
        self.last_rollout: Optional[Rollout] = None
        self._logger: Optional[MetricsLogger] = None
        self._resumed_from: Optional[str] = None
        self._dropped_steps = 0  # consecutive steps in which every group was dropped
        self.run_id = ckpt.new_run_id()
        if resume_path is not None:
            self.load(resume_path)

    @property
    def finished(self) -> bool:
        """All cfg.steps are done (e.g. a resumed run that had already completed)."""
        return self.step >= self.cfg.steps

    def _resume_checkpoint(self) -> Optional[str]:
        """The checkpoint to resume from (None: a fresh run). Refuses, with a HeroUserError, a fresh run into an
        output_dir that holds checkpoints (unless cfg.overwrite), a --resume path without a checkpoint, and a
        checkpoint of another run or with another run-defining config (``_check_resumable``)."""
        cfg = self.cfg
        remove_stale_temp_dirs(cfg.output_dir)  # e.g. .tmp-final-<pid> of a killed export
        latest = ckpt.find_checkpoint(cfg.output_dir)
        if not cfg.resume:
            if latest is not None and not cfg.overwrite:
                raise HeroUserError(
                    f"output_dir {cfg.output_dir} already holds a run (latest: {os.path.basename(latest)}); add "
                    "--resume auto to continue it, --overwrite to delete it and start over, or pick another --output_dir")
            return None
        path = latest if cfg.resume == "auto" else cfg.resume
        if cfg.resume != "auto" and not (os.path.isfile(os.path.join(path, ckpt.STATE_FILE)) or
                                         (os.path.isfile(path) and path.endswith(".pt"))):
            raise HeroUserError(f"--resume {path!r}: no checkpoint there (no {ckpt.STATE_FILE}); give a run's "
                                "checkpoint-N folder, or --resume auto for the latest one in --output_dir")
        if path is not None:
            self._check_resumable(path)
        return path

    def _check_resumable(self, path: str) -> None:
        """The checkpoint at ``path`` belongs to the run in output_dir and has the same run-defining config."""
        cfg, folder = self.cfg, (path if os.path.isdir(path) else os.path.dirname(path))
        ckpt_run, dir_run = ckpt.read_run_id(folder), ckpt.read_run_id(cfg.output_dir)
        if ckpt_run and dir_run and ckpt_run != dir_run:
            raise HeroUserError(f"--resume {path}: that checkpoint is from run {ckpt_run}, but output_dir "
                                f"{cfg.output_dir} holds run {dir_run}; resume into a new --output_dir instead")
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):  # a checkpoint without its config: nothing to compare
            return
        changes = config_diff(saved, config_to_dict(cfg))
        if changes and not cfg.allow_config_change:
            raise HeroUserError(f"resume: run-defining settings differ from {folder}: {'; '.join(changes)}; "
                                "put them back, or add --allow-config-change to resume with the new values")
        if changes:
            warnings.warn(f"resuming with changed run-defining settings (allow_config_change): {'; '.join(changes)}")

    def _build_policy(self, model: Optional[nn.Module], adapter: Optional[ModelAdapter]):
        if (model is None) != (adapter is None):
            raise ValueError("pass both model and adapter, or neither")
        if model is None:
            sample = self.dataset[0] if self.dataset and isinstance(self.dataset[0], dict) else None
            model, adapter = build_policy(self.cfg.model, seed=self.cfg.seed, device=self.device,
                                          image_field=self.cfg.data.image_field, sample_row=sample)
        return model.to(self.device), adapter

    def _build_rewards(self, reward_funcs: Optional[Sequence[Callable]]) -> None:
        """reward_funcs (default: cfg.rewards.funcs by name), their log names and weights [F] (float64)."""
        cfg = self.cfg.rewards
        if reward_funcs is None:
            judge = self.cfg.caption_judge
            caption = dict(caption_model=judge.model, caption_prompt=judge.prompt, caption_options=dict(
                max_new_tokens=judge.max_new_tokens, batch_size=judge.batch_size, device=self.device))
            try:
                reward_funcs = [get_reward(name, nli_model=cfg.nli_model, nli_reference_field=cfg.nli_reference_field,
                                           nli_reduce=cfg.nli_reduce, **caption) for name in cfg.funcs]
            except ValueError as e:  # unknown name, module that does not import, not callable
                raise ConfigError(f"rewards.funcs: {e}") from e
        self.reward_funcs = list(reward_funcs)
        self.reward_names = [reward_name(f) for f in self.reward_funcs]
        weights = cfg.weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"rewards.weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float64)

    def _build_reference(self, ref_model: Optional[nn.Module]) -> Tuple[nn.Module, bool]:
        """(reference model, whether it is a frozen copy of the initial policy, saved in checkpoints)."""
        if ref_model is not None:
            return ref_model.to(self.device).eval(), False
        if not self.cfg.model.ref_model:
            return frozen_copy(self.model), True
        ref_cfg = ModelConfig(**{**config_to_dict(self.cfg)["model"], "name": self.cfg.model.ref_model,
                                 "gradient_checkpointing": False})
        model, _ = build_policy(ref_cfg, seed=self.cfg.seed, device=self.device)
        return frozen_copy(model), False

    def _resolve_packing(self) -> bool:
        """model.packing: "off" -> False; "auto" -> whether the adapter packs the policy (and reference) exactly;
        "on" -> True, or a ConfigError saying why it cannot."""
        if self.cfg.model.packing == "off":
            return False
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        why = next((w for w in map(self.adapter.packing_unsupported, models) if w), None)
        if why and self.cfg.model.packing == "on":
            raise ConfigError(f"model.packing=on: {why}; use model.packing auto (packs only where it is exact) or off")
        return why is None

    def _packs(self, tokens: int, rows: int, width: int) -> bool:
        """Whether a micro-batch of ``rows`` rows (``tokens`` attended in all, padded width ``width``) runs packed:
        always with pack_always, else only when its T^2 attention area does not exceed rows x width^2."""
        return self.packing and (self.pack_always or tokens * tokens <= rows * width * width)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        st = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "data": self.rows.state_dict(),
            "rng": ckpt.capture_rng(),
            "bad_rows": list(self.bad_rows),
            "run_id": self.run_id,
            "format": 1,
        }
        if self.ref_model is not None and self.ref_is_copy:
            st["ref_model"] = self.ref_model.state_dict()
        return st

    def save(self) -> str:
        """Atomic checkpoint of everything needed to continue the run exactly."""
        return ckpt.save_checkpoint(self.cfg.output_dir, self.step, self.state_dict(), config_to_dict(self.cfg),
                                    keep=self.cfg.save_total_limit, run_id=self.run_id)

    def load(self, path: str) -> None:
        st = ckpt.load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.kl_ctl.load_state_dict(st["kl_controller"])
        self.rows.load_state_dict(st["data"])
        if self.ref_model is not None and "ref_model" in st:
            self.ref_model.load_state_dict(st["ref_model"])
        self.bad_rows = list(st.get("bad_rows", []))
        self.run_id = st.get("run_id") or self.run_id
        self.step = int(st["step"])
        ckpt.restore_rng(st["rng"])
        self._resumed_from = path

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _bad(self, msg: str, row_id: str) -> None:
        if self.cfg.on_bad_row == "stop":
            raise BadRowError(msg + " (on_bad_row=stop; checkpoints already written are intact)", row_id)
        if row_id not in self.bad_rows:  # warn once per row (a bad row comes back every epoch)
            warnings.warn(msg + " -- skipped (on_bad_row=skip)")
            self.bad_rows.append(row_id)

    def _next_rows(self) -> Tuple[List[int], List[dict], List[str]]:
        """batch_size usable rows: (dataset indices, prepared rows, prompts)."""
        idx, rows, prompts = [], [], []
        tried = 0
        d = self.cfg.data
        while len(rows) < self.cfg.batch_size:
            if tried >= len(self.dataset) + self.cfg.batch_size and not rows:
                raise BadRowError(f"no usable row in a full pass over the dataset ({len(self.dataset)} rows)")
            tried += 1
            i = self.rows.next()
            row = self.dataset[i]
            name = row_name(row, i)
            if not isinstance(row, dict):
                self._bad(f"row {name} is a {type(row).__name__}, not a dict", name)
                continue
            missing = [f for f in d.required_fields if f not in row or row[f] is None]
            if missing:
                self._bad(f"row {name} is missing required field(s) {missing}", name)
                continue
            try:
                prompt = d.prompt_template.format(**row)
            except (KeyError, IndexError) as e:
                self._bad(f"row {name} has no field {e} used by data.prompt_template {d.prompt_template!r}", name)
                continue
            try:
                row = self.adapter.prepare_row(row, prompt, i)
            except BadRowError as e:
                self._bad(str(e), e.row_id or name)
                continue
            idx.append(i)
            rows.append(row)
            prompts.append(prompt)
        return idx, rows, prompts

    def _to_device(self, inputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}

    def _score(self, texts: List[str], rows: List[dict], idx: List[int], G: int) -> Tuple[Tensor, Tensor]:
        """Rewards [N, n_funcs] (float64) and bad-group mask [B]."""
        N = len(texts)
        fields: Dict[str, List[Any]] = {}
        keys = set().union(*[r.keys() for r in rows]) - {"completions"}
        for k in keys:
            fields[k] = [r.get(k) for r in rows for _ in range(G)]
        R = torch.zeros(N, len(self.reward_funcs), dtype=torch.float64)
        for j, (fn, name) in enumerate(zip(self.reward_funcs, self.reward_names)):
            R[:, j] = torch.tensor(self._call_reward(fn, name, texts, fields), dtype=torch.float64)
        bad = ~torch.isfinite(R).all(1).view(-1, G).all(1)
        for b in bad.nonzero().flatten().tolist():
            name = row_name(rows[b], idx[b])
            fns = [self.reward_names[j] for j in range(R.shape[1]) if not bool(torch.isfinite(R[b * G:(b + 1) * G, j]).all())]
            self._bad(f"row {name}: reward {', '.join(fns)} returned NaN/Inf", name)
        return R, bad

    def _call_reward(self, fn: Callable, name: str, texts: List[str], fields: Dict[str, List[Any]]) -> List[float]:
        """N floats from one reward function; raising or returning the wrong shape is a HeroUserError."""
        try:
            return check_rewards(fn(texts, **fields), len(texts), name)
        except Exception as e:  # noqa: BLE001 - the user's function: report it in one line, traceback with HERO_DEBUG
            raise HeroUserError(
                f"reward {name!r} failed at step {self.step + 1}: {type(e).__name__}: {e} -- a reward gets the N "
                f"completions and each row field as lists of N and must return N floats (N={len(texts)} here)") from e

    # ------------------------------------------------------------------ loss
    def _loss(self, hidden: Tensor, batch: MicroBatch, advantages: Tensor, old_logp: Optional[Tensor],
              ref_logp: Optional[Tensor], normalizer: float, beta: float) -> Tuple[Tensor, Dict[str, float]]:
        """hero_loss on the micro-batch's completion hidden states in its layout (``_scored_hidden``: [m, C', D],
        or packed [N, D] with seq_ids); advantages [m], old/ref log-probs [m, C'] -> (loss, float metrics)."""
        path = self.cfg.loss.path
        config = self.cfg.loss.hero_loss_config(beta=float(beta), temperature=float(self.cfg.generation.temperature),
                                                max_len=self.cfg.generation.max_new_tokens)
        labels, seq_ids = batch.scored(batch.labels), None if batch.packed is None else batch.packed.row
        if seq_ids is not None:  # packed: one advantage per token
            advantages = advantages[seq_ids]
        inputs = dict(old_logp=batch.scored(old_logp), ref_logp=batch.scored(ref_logp), seq_ids=seq_ids,
                      normalizer=float(normalizer), ignore_index=IGNORE_INDEX)
        head = self.adapter.lm_head(self.model)
        weight, bias = head.weight, getattr(head, "bias", None)
        if path == "reference":  # the float64 spec, logits materialized in float64 (tests compare)
            from hero_kernels import reference

            options = {k: v for k, v in config.options().items() if k not in ("impl", "ignore_index")}
            loss, parts = reference.hero_loss(hidden, labels, advantages, weight=weight, bias=bias, **inputs, **options)
            return loss.to(torch.float32), {k: float(parts[k]) for k in METRIC_KEYS}
        # bf16 autocast: run the head in the activations' dtype
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
        if path == "logits":
            logits = nn.functional.linear(hidden, weight, bias)
            loss, metrics = hero_loss(logits, labels, advantages, config=config, **inputs)
        else:  # "fused": the [tokens x vocab] logits are never materialized
            loss, metrics = hero_loss(hidden, labels, advantages, weight=weight, bias=bias, config=config, **inputs)
        return loss, metrics_to_floats(metrics)

    def _scored_hidden(self, model: nn.Module, batch: MicroBatch, prompt_len: int) -> Tensor:
        """Last hidden states that predict the micro-batch's completion tokens, in the loss's layout: [m, C', D]
        (padded), or [N, D] for its N scored tokens when ``batch.packed`` (the decoder never sees a pad)."""
        with self._autocast():
            if batch.packed is None:
                hidden = self.adapter.hidden_states(model, batch.input_ids, batch.attention_mask, **batch.extra)
                return completion_hidden(hidden, prompt_len, batch.completion_len)
            hidden = self.adapter.packed_hidden_states(model, batch.packed.input_ids, batch.packed.position_ids,
                                                       padded_mask=batch.attention_mask, **batch.extra)
        return hidden[0, batch.packed.hidden_index]

    def _completion_hidden(self, model: nn.Module, batch: MicroBatch, prompt_len: int) -> Tensor:
        """Last hidden states that predict the micro-batch's completion tokens: [m, C', D] in either layout
        (packed: zeros where no token is scored)."""
        return batch.padded(self._scored_hidden(model, batch, prompt_len))

    def _logp_no_grad(self, model: nn.Module, batch: MicroBatch, prompt_len: int) -> Tensor:
        """Per-token log-probs [m, C'] of the micro-batch's labels under ``model`` (fused op, no grad)."""
        with torch.no_grad():
            hidden = self._scored_hidden(model, batch, prompt_len)
            head = self.adapter.lm_head(model)
            bias = None if getattr(head, "bias", None) is None else head.bias.to(hidden.dtype)
            with self._autocast():
                logp, _ = linear_entropy_logprob(hidden, head.weight.to(hidden.dtype), batch.scored(batch.labels),
                                                 bias=bias, temperature=float(self.cfg.generation.temperature),
                                                 ignore_index=IGNORE_INDEX, impl=self.cfg.loss.impl)
        return batch.padded(logp.float())

    # ------------------------------------------------------------------ one step: sample
    def rollout(self) -> Rollout:
        """Steps 1-4 of the module docstring: sample, score, advantages, gate, old/ref log-probs."""
        group_size = self.cfg.generation.num_generations
        start = time.perf_counter()
        row_indices, rows, prompts = self._next_rows()
        encoded = self._to_device(self.adapter.encode(rows, prompts))
        prompt = {k: v.repeat_interleave(group_size, dim=0) for k, v in encoded.items() if isinstance(v, Tensor)}
        completion_ids, completion_mask = self._generate(prompt)
        texts = self.adapter.decode(completion_ids.cpu(), completion_mask.cpu())
        generate_s = time.perf_counter() - start
        rewards, bad_groups = self._score(texts, rows, row_indices, group_size)
        finite_rewards = torch.nan_to_num(rewards, nan=0.0, posinf=0.0, neginf=0.0)  # bad groups are dropped anyway
        total_reward = (finite_rewards * self.reward_weights).sum(1)
        advantages, gate, kept = self._advantages_and_gate(finite_rewards, total_reward, bad_groups)
        labels = completion_labels(completion_ids, completion_mask)[kept.to(self.device)]
        rollout = Rollout(row_indices, group_size, prompt, completion_ids, completion_mask, texts, rewards,
                          total_reward, advantages, gate, bad_groups, kept, labels, generate_s)
        rollout.metrics = self._rollout_metrics(rollout)
        if kept.numel() and self.cfg.num_iterations > 1:
            rollout.old_logp = self._fixed_policy_logp(self.model, rollout)
        if kept.numel() and self.use_kl:
            rollout.ref_logp = self._fixed_policy_logp(self.ref_model, rollout)
        return rollout

    def _generate(self, prompt: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """G completions per prompt (already repeated): (ids [N, C], mask [N, C]), eval mode, no grad."""
        gen = self.cfg.generation
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            ids, mask = self.adapter.generate(self.model, prompt, max_new_tokens=gen.max_new_tokens,
                                              temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        self.model.train(was_training)
        return ids.to(self.device), mask.to(self.device)

    def _advantages_and_gate(self, rewards: Tensor, total_reward: Tensor,
                             bad_groups: Tensor) -> Tuple[Tensor, GateResult, Tensor]:
        """rewards [N, F] (finite), total_reward [N] -> group advantages [N], the variance gate, and the kept
        completions' indices [n] (bad groups dropped)."""
        cfg, group_size = self.cfg, self.cfg.generation.num_generations
        advantages = group_advantages(total_reward, group_size, cfg.advantages.scale, cfg.advantages.eps)
        # correctness for the gate's all-correct / all-wrong counts: the FIRST reward function's threshold
        correct = rewards[:, 0] >= cfg.rewards.correct_threshold
        gate = variance_gate(total_reward, group_size, cfg.gate.keep_frac, correct=correct, enabled=cfg.gate.enabled)
        kept_groups = [g for g in gate.kept.tolist() if not bool(bad_groups[g])]
        kept = torch.tensor([g * group_size + j for g in kept_groups for j in range(group_size)], dtype=torch.long)
        return advantages, gate, kept

    def _rollout_metrics(self, rollout: Rollout) -> Dict[str, Any]:
        """The rollout side of the step's log (module docstring)."""
        num_prompts, kept = rollout.num_prompts, rollout.kept
        total, advantages, gate = rollout.total_reward, rollout.advantages, rollout.gate
        eos = torch.as_tensor(self.adapter.eos_token_ids, device=rollout.completion_ids.device)
        has_eos = torch.isin(rollout.completion_ids, eos).any(1)  # no eos anywhere = clipped
        metrics: Dict[str, Any] = {
            "reward": float(total.mean()),
            "reward_std": float(total.view(num_prompts, -1).std(1).mean()),
            "frac_reward_zero_std": gate.stats["zero_std"] / num_prompts,
        }
        for j, name in enumerate(self.reward_names):
            column = rollout.rewards[:, j][torch.isfinite(rollout.rewards[:, j])]
            metrics[f"rewards/{name}/mean"] = float(column.mean()) if column.numel() else float("nan")
            metrics[f"rewards/{name}/std"] = float(column.std()) if column.numel() > 1 else 0.0
        metrics.update({
            "gate/kept_frac": kept.numel() / rollout.group_size / num_prompts,
            "gate/threshold": gate.stats["threshold"],
            "gate/all_correct": gate.stats["all_correct"],
            "gate/all_wrong": gate.stats["all_wrong"],
            **{f"gate/{k}": v for k, v in difficulty_counts(total, rollout.group_size, self.cfg.gate.medium_variance,
                                                            self.cfg.gate.easy_mean).items()},
            "advantages/mean": float(advantages[kept].mean()) if kept.numel() else 0.0,
            "advantages/std": float(advantages[kept].std()) if kept.numel() > 1 else 0.0,
            "completions/mean_length": float(rollout.completion_mask.sum(1).float().mean()),
            "completions/clipped_ratio": float((~has_eos).float().mean()),
            "bad_rows": int(rollout.bad_groups.sum()),
        })
        if "caption" in self.reward_names:  # OMNEX-VL's name for the caption reward's mean
            metrics["omnex/caption_reward"] = metrics["rewards/caption/mean"]
        return metrics

    def _micro_batches(self, rollout: Rollout) -> List[Union[slice, Tensor]]:
        """Row selections of the kept completions, one per forward/backward: consecutive slices of
        micro_batch_size, or (micro_batch_tokens > 0) length-sorted groups whose size stays within the budget
        (a longer single row goes alone): padded, rows x (P + longest completion); packed (``self._packs``),
        the sum of the rows' unpadded prompt + completion lengths."""
        n, size, budget = rollout.labels.shape[0], self.cfg.micro_batch_size, self.cfg.micro_batch_tokens
        size = size or n
        if budget <= 0:
            return [slice(s, min(s + size, n)) for s in range(0, n, size)]
        lengths = (rollout.labels != IGNORE_INDEX).sum(1).clamp_min(1).tolist()
        tokens = lengths
        if self.packing:
            prompt_lengths = rollout.prompt["attention_mask"][rollout.kept.to(self.device)].sum(1).tolist()
            tokens = [p + c for p, c in zip(prompt_lengths, lengths)]

        def cost(rows: List[int]) -> int:  # the tokens the group runs: packed, or padded where _packs says no
            t, w = sum(tokens[r] for r in rows), rollout.prompt_len + lengths[rows[0]]  # longest first: width
            return t if self._packs(t, len(rows), w) else len(rows) * w

        groups: List[List[int]] = []
        for i in sorted(range(n), key=lambda r: -lengths[r]):
            group = groups[-1] if groups else None
            if group is None or len(group) >= size or cost(group + [i]) > budget:
                groups.append([i])
            else:
                group.append(i)
        return [torch.tensor(sorted(g), dtype=torch.long) for g in groups]

    @contextlib.contextmanager
    def _checkpointing_for(self, completion_len: int) -> Iterator[None]:
        """Gradient checkpointing for a forward/backward of completion_len tokens when it is off and the length
        reaches model.gradient_checkpointing_min_len (long chains of thought), back off afterwards."""
        threshold = self.cfg.model.gradient_checkpointing_min_len
        switch = (not self.cfg.model.gradient_checkpointing and threshold > 0 and completion_len >= threshold
                  and not _is_checkpointing(self.model))
        if switch:
            self.adapter.enable_gradient_checkpointing(self.model)
        try:
            yield
        finally:
            if switch:
                self.adapter.disable_gradient_checkpointing(self.model)

    def _micro_batch(self, rollout: Rollout, rows: Union[slice, Tensor]) -> MicroBatch:
        """Inputs of kept completions ``rows``, trimmed to the longest of them (at least one token)."""
        kept = rollout.kept[rows].to(self.device)
        labels = rollout.labels[rows]
        length = max(int((labels != IGNORE_INDEX).sum(1).max()) if labels.numel() else 1, 1)
        prompt = rollout.prompt
        input_ids = torch.cat([prompt["input_ids"][kept], rollout.completion_ids[kept, :length]], 1)
        attention_mask = torch.cat([prompt["attention_mask"][kept], rollout.completion_mask[kept, :length]], 1)
        extra = {k: v[kept] for k, v in prompt.items() if k not in ("input_ids", "attention_mask")}
        labels = labels[:, :length]
        packs = self.packing and self._packs(int(attention_mask.sum()), *input_ids.shape)
        packed = pack_rows(input_ids, attention_mask, labels) if packs else None
        return MicroBatch(input_ids, attention_mask, extra, labels, rows, packed)

    def _fixed_policy_logp(self, model: nn.Module, rollout: Rollout) -> Tensor:
        """Log-probs [n, C] of the kept completions under a fixed policy, micro-batched, in eval mode."""
        out = torch.zeros(rollout.labels.shape, dtype=torch.float32, device=self.device)
        was_training = model.training
        model.eval()
        for rows in self._micro_batches(rollout):
            batch = self._micro_batch(rollout, rows)
            out[rows, : batch.completion_len] = self._logp_no_grad(model, batch, rollout.prompt_len)
        model.train(was_training)
        return out

    # ------------------------------------------------------------------ one step: learn
    def backward(self, rollout: Rollout) -> Dict[str, float]:
        """Accumulate gradients of one pass over the kept completions (micro-batched); returns loss metrics
        ({} when nothing was kept)."""
        labels = rollout.labels
        if self.ntk_hook is not None:
            self.ntk_hook.start_pass(labels.shape[0])
        if labels.shape[0] == 0:
            return {}
        # one denominator for the whole pass, so micro-batch gradients add up to the full-batch gradient
        normalizer = float(loss_normalizer(labels, self.cfg.loss.loss_agg, ignore_index=IGNORE_INDEX))
        if normalizer == 0:
            return {}
        advantages = rollout.advantages.to(self.device)[rollout.kept.to(self.device)]
        beta = self.kl_ctl.beta if self.use_kl else 0.0
        totals = LossMetrics()
        for rows in self._micro_batches(rollout):
            batch = self._micro_batch(rollout, rows)
            old_logp, ref_logp = (None if lp is None else lp[rows, : batch.completion_len]
                                  for lp in (rollout.old_logp, rollout.ref_logp))
            with self._checkpointing_for(batch.completion_len):
                hidden = self._scored_hidden(self.model, batch, rollout.prompt_len)
                loss, metrics = self._loss(hidden, batch, advantages[rows], old_logp, ref_logp, normalizer, beta)
                if self.ntk_hook is not None:
                    loss = loss + self._ntk_loss(batch.padded(hidden), batch, rollout)
                self._check_finite(loss, rollout, rows)
                loss.backward()
            totals.add(float(loss.detach()), metrics)
        return totals.result()

    def _ntk_loss(self, hidden: Tensor, batch: MicroBatch, rollout: Rollout) -> Tensor:
        """The NTK-conflict regularizer of the micro-batch's completions (hero.omnex.hook), pairs within prompts;
        hidden [m, C', D]."""
        head = self.adapter.lm_head(self.model)
        bias = None if getattr(head, "bias", None) is None else head.bias.to(hidden.dtype)
        groups = rollout.kept[batch.rows].to(self.device) // rollout.group_size
        return self.ntk_hook.loss(hidden, head.weight.to(hidden.dtype), batch.labels, bias=bias, groups=groups)

    def _check_finite(self, loss: Tensor, rollout: Rollout, rows: Union[slice, Tensor]) -> None:
        if bool(torch.isfinite(loss.detach())):
            return
        dataset_rows = sorted({rollout.row_indices[int(k) // rollout.group_size] for k in rollout.kept[rows].tolist()})
        raise FloatingPointError(
            f"step {self.step + 1}: non-finite loss {float(loss)} on a micro-batch of dataset rows {dataset_rows}; "
            "stopping before the optimizer update (the last checkpoint is intact)")

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the LR schedule, zero the grads; returns the pre-clip grad norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self) -> Dict[str, Any]:
        """One rollout + num_iterations optimizer updates + KL controller update; returns the step's metrics."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        beta = self.kl_ctl.beta if self.use_kl else 0.0  # the coefficient this step's loss uses
        rollout = self.rollout()
        self.model.train()
        losses, grad_norms, loss_metrics = [], [], {}
        for _ in range(self.cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss_metrics = self.backward(rollout)
            if not loss_metrics:  # nothing kept: no update, but the LR schedule advances
                self.optimizer.step()
                self.scheduler.step()
                continue
            losses.append(loss_metrics["loss"])
            grad_norms.append(self.optimizer_step())
        if self.use_kl and loss_metrics:
            self.kl_ctl.update(loss_metrics["kl"], rollout.completion_ids.shape[0])
        self.step += 1
        metrics = {**rollout.metrics, **self._update_metrics(loss_metrics, losses, grad_norms, beta)}
        if self.ntk_hook is not None:
            metrics.update(self.ntk_hook.metrics())
        metrics.update(self._cost_metrics(rollout, time.perf_counter() - start), step=self.step)
        self.last_metrics, self.last_rollout = metrics, rollout
        return metrics

    def _update_metrics(self, loss_metrics: Dict[str, float], losses: List[float], grad_norms: List[float],
                        beta: float) -> Dict[str, Any]:
        """Loss side of the log: from the last pass; NaN (logged as null) when nothing was trained."""
        metrics: Dict[str, Any] = {k: loss_metrics.get(k, float("nan")) for k in LOSS_METRICS}
        metrics["entropy"] = metrics.pop("entropy/mean")
        metrics.update({
            "temperature": self.cfg.generation.temperature,
            "loss": float(np.mean(losses)) if losses else 0.0,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "beta": beta,
        })
        return metrics

    def _cost_metrics(self, rollout: Rollout, step_s: float) -> Dict[str, Any]:
        return {
            "tokens_per_s": float(rollout.completion_mask.sum()) / max(step_s, 1e-9),
            "time/step_s": step_s,
            "time/generate_s": rollout.generate_s,
            "peak_memory_mb": peak_memory_mb(self.device),
            "lr": self.scheduler.get_last_lr()[0],
        }

    # ------------------------------------------------------------------ loop
    def train(self) -> Dict[str, Any]:
        """Run until cfg.steps (continuing a resumed run); checkpoints every save_steps and at the end.

        Ctrl-C (SIGINT, main thread) finishes the current step, saves a checkpoint and raises
        TrainingInterrupted naming it; a second Ctrl-C raises KeyboardInterrupt at once."""
        cfg = self.cfg
        self._open_run_dir()
        bar = self._progress_bar()
        last_saved = self.step if self._resumed_from else -1
        try:
            with _StopAtStepBoundary(lambda: self.step + 1) as stop:
                while self.step < cfg.steps:
                    m = self.train_step()
                    self._logger.log(m)
                    self._after_step(m, bar)
                    if (cfg.save_steps and self.step % cfg.save_steps == 0) or stop.requested:
                        path = self.save()
                        last_saved = self.step
                    if stop.requested and self.step < cfg.steps:
                        raise TrainingInterrupted(f"interrupted by Ctrl-C after step {self.step} of {cfg.steps}; "
                                                  f"checkpoint saved: {path}", path)
                if last_saved != self.step:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self._logger.close()
        return self.last_metrics

    def _open_run_dir(self) -> None:
        """Clear an earlier run when overwriting, record this run's id, open metrics.jsonl."""
        cfg = self.cfg
        if not self._resumed_from and cfg.overwrite:
            ckpt.clear_run(cfg.output_dir)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if not self._resumed_from or not ckpt.read_run_id(cfg.output_dir):
            ckpt.write_run_id(cfg.output_dir, self.run_id)
        self._logger = MetricsLogger(cfg.output_dir, cfg.tensorboard, self.step if self._resumed_from else None)

    def _progress_bar(self):
        if not self.cfg.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return None
        return tqdm(total=self.cfg.steps, initial=self.step, desc="hero train", dynamic_ncols=True)

    def _after_step(self, m: Dict[str, Any], bar) -> None:
        """Progress bar (loss in %.3g: 1e-05, not 0.0000) and the nothing-trains warning."""
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3g}", reward=f"{m['reward']:.3f}", kept=f"{m['gate/kept_frac']:.2f}")
        self._dropped_steps = self._dropped_steps + 1 if m["gate/kept_frac"] == 0 else 0
        if self._dropped_steps == DROPPED_STEPS_WARNING:  # once per streak
            warnings.warn(_nothing_trains_message(m, self.cfg))

    def export(self, path: Optional[str] = None) -> str:
        """save_pretrained of the policy (+ tokenizer) into ``path`` (default <output_dir>/final), atomically."""
        path = path or os.path.join(self.cfg.output_dir, "final")
        with atomic_dir(path) as tmp:
            self.adapter.save_pretrained(self.model, tmp)
        return path
