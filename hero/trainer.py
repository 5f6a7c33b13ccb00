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
   step + LR schedule;
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
  rewards.correct_threshold); ``advantages/mean|std`` over the kept completions;
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
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from hero import checkpoint as ckpt
from hero.config import TrainConfig, config_to_dict
from hero.grpo import AdaptiveKLController, group_advantages, variance_gate
from hero.io import atomic_dir, atomic_write_text
from hero.registry import dataset_builder
from hero.rewards import check_rewards, get_reward, reward_name
from hero.rollout import (BadRowError, ModelAdapter, build_policy, completion_hidden, frozen_copy, row_name)

__all__ = ["Trainer", "BadRowError", "MetricsLogger", "peak_memory_mb", "load_dataset"]


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
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._f.write(json.dumps(clean) + "\n")
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
            raise ValueError("the dataset is empty")
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
            raise ValueError(f"checkpoint was taken on a dataset of {st['n']} rows, this one has {self.n}")
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])
        self._order = self._make_order()


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
_LOSS_METRICS = ("entropy/mean", "entropy/min", "entropy/max", "weights/max", "weights/effective_tokens", "kl",
                 "clip_ratio/low_mean", "clip_ratio/high_mean")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        self.dataset = dataset if dataset is not None else load_dataset(cfg)
        if (model is None) != (adapter is None):
            raise ValueError("pass both model and adapter, or neither")
        if model is None:
            sample = self.dataset[0] if self.dataset and isinstance(self.dataset[0], dict) else None
            model, adapter = build_policy(cfg.model, seed=cfg.seed, device=self.device,
                                          image_field=cfg.data.image_field, sample_row=sample)
        self.model = model.to(self.device)
        self.adapter = adapter
        # reward functions
        if reward_funcs is None:
            r = cfg.rewards
            reward_funcs = [get_reward(n, nli_model=r.nli_model, nli_reference_field=r.nli_reference_field,
                                       nli_reduce=r.nli_reduce) for n in r.funcs]
        self.reward_funcs = list(reward_funcs)
        self.reward_names = [reward_name(f) for f in self.reward_funcs]
        w = cfg.rewards.weights or [1.0] * len(self.reward_funcs)
        if len(w) != len(self.reward_funcs):
            raise ValueError(f"rewards.weights has {len(w)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(w, dtype=torch.float64)
        # KL: reference model and controller (the dynamic balancer)
        self.kl_ctl = AdaptiveKLController(cfg.kl.beta, cfg.kl.target or None, cfg.kl.horizon, cfg.kl.clip)
        self.use_kl = cfg.kl.beta > 0
        self.ref_is_copy = False
        self.ref_model = None
        if self.use_kl:
            if ref_model is not None:
                self.ref_model = ref_model.to(self.device).eval()
            elif cfg.model.ref_model:
                from hero.config import ModelConfig

                rcfg = ModelConfig(**{**config_to_dict(cfg)["model"], "name": cfg.model.ref_model,
                                      "gradient_checkpointing": False})
                self.ref_model, _ = build_policy(rcfg, seed=cfg.seed, device=self.device)
                self.ref_model = frozen_copy(self.ref_model)
            else:
                self.ref_model = frozen_copy(self.model)
                self.ref_is_copy = True
        # optimizer / schedule
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        total_updates = cfg.steps * cfg.num_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.lr_schedule, cfg.warmup_steps * cfg.num_iterations, total_updates))
        self.rows = RowStream(len(self.dataset), cfg.seed, cfg.data.shuffle)
        self.step = 0
        self.bad_rows: List[str] = []
        self.last_metrics: Dict[str, Any] = {}
        self._logger: Optional[MetricsLogger] = None
        self._resumed_from: Optional[str] = None
        if cfg.resume:
            path = ckpt.find_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
            if path is not None:
                self.load(path)
            elif cfg.resume != "auto":
                raise FileNotFoundError(f"resume: no checkpoint at {cfg.resume}")

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
            "format": 1,
        }
        if self.ref_model is not None and self.ref_is_copy:
            st["ref_model"] = self.ref_model.state_dict()
        return st

    def save(self) -> str:
        """Atomic checkpoint of everything needed to continue the run exactly."""
        return ckpt.save_checkpoint(self.cfg.output_dir, self.step, self.state_dict(), config_to_dict(self.cfg),
                                    keep=self.cfg.save_total_limit)

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
            vals = check_rewards(fn(texts, **fields), N, name)
            R[:, j] = torch.tensor(vals, dtype=torch.float64)
        bad = ~torch.isfinite(R).all(1).view(-1, G).all(1)
        for b in bad.nonzero().flatten().tolist():
            name = row_name(rows[b], idx[b])
            fns = [self.reward_names[j] for j in range(R.shape[1]) if not bool(torch.isfinite(R[b * G:(b + 1) * G, j]).all())]
            self._bad(f"row {name}: reward {', '.join(fns)} returned NaN/Inf", name)
        return R, bad

    # ------------------------------------------------------------------ loss
    def _loss(self, hidden: Tensor, labels: Tensor, adv: Tensor, old: Optional[Tensor], ref: Optional[Tensor],
              normalizer: float, beta: float) -> Tuple[Tensor, Dict[str, float]]:
        """hero_loss on completion hidden states [n, C, D]; path per cfg.loss.path."""
        from hero_kernels import hero_loss
        from hero_kernels.loss import metrics_to_floats

        L = self.cfg.loss
        head = self.adapter.lm_head(self.model)
        weight, bias = head.weight, getattr(head, "bias", None)
        kw = dict(old_logp=old, ref_logp=ref, beta=float(beta), eps_low=L.eps_low, eps_high=L.eps_high,
                  temperature=float(self.cfg.generation.temperature), kappa=L.kappa,
                  entropy_weighting=L.entropy_weighting, entropy_grad=L.entropy_grad, weight_on=L.weight_on,
                  loss_agg=L.loss_agg, normalizer=float(normalizer), max_len=self.cfg.generation.max_new_tokens)
        if L.path == "fused":
            if hidden.dtype != weight.dtype:  # bf16 autocast: run the head in the activations' dtype
                weight = weight.to(hidden.dtype)
                bias = None if bias is None else bias.to(hidden.dtype)
            loss, m = hero_loss(hidden, labels, adv, weight=weight, bias=bias, impl=L.impl, **kw)
            return loss, metrics_to_floats(m)
        if L.path == "logits":
            logits = nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
            loss, m = hero_loss(logits, labels, adv, impl=L.impl, **kw)
            return loss, metrics_to_floats(m)
        # "reference": the float64 spec, logits materialized in float64 (hero_kernels.reference.hero_loss)
        from hero_kernels import reference as R

        loss, parts = R.hero_loss(hidden, labels, adv, weight=weight, bias=bias, **kw)
        keys = ("entropy/mean", "entropy/min", "entropy/max", "weights/max", "weights/effective_tokens",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "tokens", "responses")
        return loss.to(torch.float32), {k: float(parts[k]) for k in keys}

    def _logp_no_grad(self, model: nn.Module, ids: Tensor, mask: Tensor, extra: Dict[str, Tensor], labels: Tensor,
                      P: int) -> Tensor:
        """Per-token log-probs [n, C] of ``labels`` under ``model`` (fused op, no grad, eval mode)."""
        from hero_kernels import linear_entropy_logprob

        with torch.no_grad(), self._autocast():
            h = completion_hidden(self.adapter.hidden_states(model, ids, mask, **extra), P, labels.shape[1])
            head = self.adapter.lm_head(model)
            w = head.weight.to(h.dtype)
            b = None if getattr(head, "bias", None) is None else head.bias.to(h.dtype)
            logp, _ = linear_entropy_logprob(h, w, labels, bias=b, temperature=float(self.cfg.generation.temperature),
                                             impl=self.cfg.loss.impl)
        return logp.float()

    # ------------------------------------------------------------------ one step
    def rollout(self) -> Dict[str, Any]:
        """Steps 1-4 of the module docstring: sample, score, advantages, gate, old/ref log-probs."""
        cfg, gen = self.cfg, self.cfg.generation
        G = gen.num_generations
        t0 = time.perf_counter()
        idx, rows, prompts = self._next_rows()
        B = len(rows)
        enc = self._to_device(self.adapter.encode(rows, prompts))
        rep = {k: v.repeat_interleave(G, dim=0) for k, v in enc.items() if isinstance(v, Tensor)}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            comp, cmask = self.adapter.generate(self.model, rep, max_new_tokens=gen.max_new_tokens,
                                                temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        self.model.train(was_training)
        comp, cmask = comp.to(self.device), cmask.to(self.device)
        texts = self.adapter.decode(comp.cpu(), cmask.cpu())
        t_gen = time.perf_counter() - t0
        R, bad = self._score(texts, rows, idx, G)
        Rclean = torch.where(torch.isfinite(R), R, torch.zeros_like(R))
        total = (Rclean * self.reward_weights).sum(1)  # [N]
        adv = group_advantages(total, G, cfg.advantages.scale, cfg.advantages.eps)
        correct = Rclean[:, 0] >= cfg.rewards.correct_threshold
        gate = variance_gate(total, G, cfg.gate.keep_frac, correct=correct, enabled=cfg.gate.enabled)
        kept_groups = [g for g in gate.kept.tolist() if not bool(bad[g])]
        keep = torch.tensor([g * G + j for g in kept_groups for j in range(G)], dtype=torch.long)
        # eos found anywhere -> not truncated
        has_eos = torch.isin(comp, torch.as_tensor(self.adapter.eos_token_ids, device=comp.device)).any(1)
        lengths = cmask.sum(1).float()
        P = rep["input_ids"].shape[1]
        ro = {
            "B": B, "G": G, "P": P, "prompt": rep, "completion": comp, "completion_mask": cmask, "texts": texts,
            "rewards": R, "total_reward": total, "advantages": adv, "gate": gate, "bad_groups": bad, "keep": keep,
            "idx": idx, "t_gen": t_gen,
        }
        std_g = total.view(B, G).std(1)
        m: Dict[str, Any] = {
            "reward": float(total.mean()),
            "reward_std": float(std_g.mean()),
            "frac_reward_zero_std": gate.stats["zero_std"] / B,
        }
        for j, name in enumerate(self.reward_names):
            col = R[:, j][torch.isfinite(R[:, j])]
            m[f"rewards/{name}/mean"] = float(col.mean()) if col.numel() else float("nan")
            m[f"rewards/{name}/std"] = float(col.std()) if col.numel() > 1 else 0.0
        m.update({
            "gate/kept_frac": len(kept_groups) / B,
            "gate/threshold": gate.stats["threshold"],
            "gate/all_correct": gate.stats["all_correct"],
            "gate/all_wrong": gate.stats["all_wrong"],
            "advantages/mean": float(adv[keep].mean()) if keep.numel() else 0.0,
            "advantages/std": float(adv[keep].std()) if keep.numel() > 1 else 0.0,
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float((~has_eos).float().mean()),
            "bad_rows": int(bad.sum()),
        })
        ro["metrics"] = m
        # fixed-policy passes over the kept completions
        ro["old_logp"] = ro["ref_logp"] = None
        if keep.numel():
            labels = torch.where(cmask.bool(), comp, torch.full_like(comp, -100))[keep.to(self.device)]
            ro["labels"] = labels
            if cfg.num_iterations > 1:
                self.model.eval()
                ro["old_logp"] = self._batched_logp(self.model, ro, labels)
                self.model.train(was_training)
            if self.use_kl:
                ro["ref_logp"] = self._batched_logp(self.ref_model, ro, labels)
        return ro

    def _micro_batches(self, n: int) -> List[slice]:
        mb = self.cfg.micro_batch_size or n
        return [slice(s, min(s + mb, n)) for s in range(0, n, mb)]

    def _mb_inputs(self, ro: Dict[str, Any], sl: slice, labels: Tensor):
        """(ids, mask, extra, labels, C) for kept completions ``sl``, trimmed to the micro-batch's longest."""
        keep = ro["keep"][sl].to(self.device)
        lab = labels[sl]
        C = int((lab != -100).sum(1).max()) if lab.numel() else 1
        C = max(C, 1)
        lab = lab[:, :C]
        ids = torch.cat([ro["prompt"]["input_ids"][keep], ro["completion"][keep, :C]], 1)
        mask = torch.cat([ro["prompt"]["attention_mask"][keep], ro["completion_mask"][keep, :C]], 1)
        extra = {k: v[keep] for k, v in ro["prompt"].items() if k not in ("input_ids", "attention_mask")}
        return ids, mask, extra, lab, C

    def _batched_logp(self, model, ro, labels) -> Tensor:
        out = torch.zeros(labels.shape, dtype=torch.float32, device=self.device)
        for sl in self._micro_batches(labels.shape[0]):
            ids, mask, extra, lab, C = self._mb_inputs(ro, sl, labels)
            out[sl, :C] = self._logp_no_grad(model, ids, mask, extra, lab, ro["P"])
        return out

    def backward(self, ro: Dict[str, Any]) -> Dict[str, float]:
        """Accumulate gradients of one pass over the kept completions (micro-batched); returns loss metrics."""
        cfg = self.cfg
        keep, labels = ro["keep"], ro.get("labels")
        n = keep.numel()
        if n == 0:
            return {}
        valid = labels != -100
        normalizer = float(valid.sum()) if cfg.loss.loss_agg == "token-mean" else float((valid.sum(1) > 0).sum())
        if normalizer == 0:
            return {}
        adv_all = ro["advantages"].to(self.device)[keep.to(self.device)]
        beta = self.kl_ctl.beta if self.use_kl else 0.0
        agg: Dict[str, float] = {"loss": 0.0}
        tok_sum = resp_sum = 0.0
        acc = {"entropy/mean": 0.0, "kl": 0.0, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0,
               "weights/effective_tokens": 0.0}
        mx = {"weights/max": -math.inf, "entropy/max": -math.inf}
        mn = {"entropy/min": math.inf}
        P = ro["P"]
        for sl in self._micro_batches(n):
            ids, mask, extra, lab, C = self._mb_inputs(ro, sl, labels)
            old = None if ro["old_logp"] is None else ro["old_logp"][sl, :C]
            ref = None if ro["ref_logp"] is None else ro["ref_logp"][sl, :C]
            with self._autocast():
                h = completion_hidden(self.adapter.hidden_states(self.model, ids, mask, **extra), P, C)
            loss, m = self._loss(h, lab, adv_all[sl], old, ref, normalizer, beta)
            if not bool(torch.isfinite(loss.detach())):
                rows = sorted({ro["idx"][int(k) // ro["G"]] for k in keep[sl].tolist()})
                raise FloatingPointError(
                    f"step {self.step + 1}: non-finite loss {float(loss)} on a micro-batch of dataset rows {rows}; "
                    "stopping before the optimizer update (the last checkpoint is intact)")
            loss.backward()
            agg["loss"] += float(loss.detach())
            t, r = m.get("tokens", 0.0), m.get("responses", 0.0)
            tok_sum += t
            resp_sum += r
            for k in acc:
                if k in m:
                    acc[k] += m[k] * (r if k == "weights/effective_tokens" else t)
            for k in mx:
                if k in m and t > 0:
                    mx[k] = max(mx[k], m[k])
            for k in mn:
                if k in m and t > 0:
                    mn[k] = min(mn[k], m[k])
        for k, v in acc.items():
            agg[k] = v / max(resp_sum if k == "weights/effective_tokens" else tok_sum, 1.0)
        agg.update({k: v for k, v in mx.items() if math.isfinite(v)})
        agg.update({k: v for k, v in mn.items() if math.isfinite(v)})
        agg["tokens"] = tok_sum
        return agg

    def optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.max_grad_norm > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            gn = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn

    def train_step(self) -> Dict[str, Any]:
        """One rollout + num_iterations optimizer updates + KL controller update; returns the step's metrics."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        beta_used = self.kl_ctl.beta if self.use_kl else 0.0
        ro = self.rollout()
        m = dict(ro["metrics"])
        self.model.train()
        losses, grad_norms, lm = [], [], {}
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            lm = self.backward(ro)
            if not lm:  # nothing kept: no update (step() without grads is a no-op); the LR schedule advances
                self.optimizer.step()
                self.scheduler.step()
                continue
            losses.append(lm["loss"])
            grad_norms.append(self.optimizer_step())
        # loss-side metrics come from the last pass; NaN (logged as null) when nothing was trained this step
        for k in _LOSS_METRICS:
            m[k] = lm.get(k, float("nan"))
        m["entropy"] = m.pop("entropy/mean")
        m["temperature"] = cfg.generation.temperature
        m["loss"] = float(np.mean(losses)) if losses else 0.0
        m["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        m["beta"] = beta_used
        if self.use_kl and lm:
            self.kl_ctl.update(lm["kl"], ro["B"] * ro["G"])
        self.step += 1
        dt = time.perf_counter() - t0
        m["tokens_per_s"] = float(ro["completion_mask"].sum()) / max(dt, 1e-9)
        m["time/step_s"] = dt
        m["time/generate_s"] = ro["t_gen"]
        m["peak_memory_mb"] = peak_memory_mb(self.device)
        m["lr"] = self.scheduler.get_last_lr()[0]
        m["step"] = self.step
        self.last_metrics = m
        self.last_rollout = ro
        return m

    # ------------------------------------------------------------------ loop
    def train(self) -> Dict[str, Any]:
        """Run until cfg.steps (continuing a resumed run); checkpoints every save_steps and at the end."""
        cfg = self.cfg
        resume_step = self.step if self._resumed_from else None
        self._logger = MetricsLogger(cfg.output_dir, cfg.tensorboard, resume_step)
        bar = None
        if cfg.progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, desc="hero train", dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                bar = None
        last_saved = self.step if self._resumed_from else -1
        try:
            while self.step < cfg.steps:
                m = self.train_step()
                self._logger.log(m)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", reward=f"{m['reward']:.3f}", kept=f"{m['gate/kept_frac']:.2f}")
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self.save()
                    last_saved = self.step
            if last_saved != self.step:
                self.save()
        finally:
            if bar is not None:
                bar.close()
            self._logger.close()
        return self.last_metrics

    def export(self, path: Optional[str] = None) -> str:
        """save_pretrained of the policy (+ tokenizer) into ``path`` (default <output_dir>/final), atomically."""
        path = path or os.path.join(self.cfg.output_dir, "final")
        with atomic_dir(path) as tmp:
            self.adapter.save_pretrained(self.model, tmp)
        return path
