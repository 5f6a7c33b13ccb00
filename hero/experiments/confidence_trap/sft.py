"""Short supervised warm-start (SFT) of the tiny VLM on chain-of-thought answers.

Target per example: ``<think>I see 3, 1, 4.</think><answer>no</answer>`` (``hero.experiments.confidence_trap.digits_pope.cot_target``)
followed by ``<eos>``; the loss is the mean next-token cross-entropy over the target tokens only (prompt and
padding are -100, ``TinyVLMProcessor.sft_batch``).

Why a warm-start: a random-init policy never writes ``<answer>yes</answer>``, so every GRPO group has zero
reward variance and RL has nothing to learn from. A few hundred SFT steps teach the format and the digits,
which is the starting point of the confidence-trap study (``hero.experiments.confidence_trap.demo``). Measured on digits-POPE (6000
examples, batch 32, lr 2e-3, one CPU thread of a shared machine): 600 steps (~30-45 s) -> clean test accuracy
0.76 with answer entropy ~0.62 nats; 1200 steps (~65-80 s) -> 0.91 with ~0.24 nats.

Speed: every digits-POPE sequence (fixed ``k``) has the same token length, so the whole training set is
tokenized once into [N, T] tensors and batches are index selections (no per-step tokenization). With uneven
lengths (other ``k`` per example, custom targets) batches are built per step with the processor.

Determinism: batches are drawn with a ``torch.Generator`` seeded from ``seed`` (sampling without replacement
within an epoch, reshuffled per epoch); dropout is 0 in the tiny VLM; on one thread the run is bit-for-bit
reproducible.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SFTConfig", "SFTResult", "sft_train", "sft_tensors", "teacher_forced_accuracy"]


@dataclass
class SFTConfig:
    """Supervised warm-start settings (``sft:`` section of configs/demo.yaml)."""

    # Optimizer steps (0 = no warm-start). The demo uses 1200 (configs/demo.yaml).
    steps: int = 600
    # Examples per step.
    batch_size: int = 32
    # AdamW learning rate (constant after a linear warmup of ``warmup_steps``, then cosine to 10% at the end).
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    # Gradient-norm clip (0 = off).
    max_grad_norm: float = 1.0
    # Noise levels (0..255 scale) of the SFT images; [0] = clean only (the confidence-trap setting: the model
    # never sees noise before the diagnosis).
    sigmas: List[float] = field(default_factory=lambda: [0.0])
    # Log the running loss every this many steps (progress callback).
    log_every: int = 50

    def validate(self) -> "SFTConfig":
        if self.steps < 0:
            raise ValueError(f"sft.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"sft.batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"sft.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.log_every < 1:
            raise ValueError("sft.warmup_steps must be >= 0 and sft.log_every >= 1")
        if not self.sigmas or any((not math.isfinite(s)) or s < 0 for s in self.sigmas):
            raise ValueError(f"sft.sigmas must be a non-empty list of numbers >= 0, got {self.sigmas}")
        return self


@dataclass
class SFTResult:
    """losses: per-step training loss; seconds: wall time of the loop; steps, examples (training-set size)."""

    losses: List[float]
    seconds: float
    steps: int
    examples: int

    def summary(self) -> Dict[str, float]:
        first = self.losses[: max(1, len(self.losses) // 20)]
        last = self.losses[-max(1, len(self.losses) // 20):]
        return {
            "steps": self.steps,
            "examples": self.examples,
            "seconds": self.seconds,
            "loss_first": float(sum(first) / len(first)) if first else float("nan"),
            "loss_last": float(sum(last) / len(last)) if last else float("nan"),
        }


def sft_tensors(processor, examples: Sequence[dict], targets: Optional[Sequence[str]] = None) -> Optional[Dict[str, Tensor]]:
    """Tokenize all examples at once when every sequence has the same length, else None.

    targets: default ``cot_target(ex)`` per example. Returns input_ids / attention_mask / labels [N, T] and
    pixel_values [N, C, H, W].
    """
    from hero.experiments.confidence_trap.digits_pope import cot_target

    targets = [cot_target(ex) for ex in examples] if targets is None else list(targets)
    tok = processor.tokenizer
    lengths = {len(processor.prompt_ids(ex["question"])) + len(tok.encode(t)) + 1 for ex, t in zip(examples, targets)}
    if len(lengths) != 1:
        return None
    return processor.sft_batch([ex["image"] for ex in examples], [ex["question"] for ex in examples], targets)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def sft_train(model: nn.Module, processor, examples: Sequence[dict], cfg: SFTConfig, *, seed: int = 0,
              targets: Optional[Sequence[str]] = None,
              progress: Optional[Callable[[int, int, float], None]] = None) -> SFTResult:
    """Train ``model`` in place on (image, question) -> target (default CoT) with AdamW; returns the losses.

    progress(step, total, running_loss) is called every ``cfg.log_every`` steps and at the end.
    """
    from hero.experiments.confidence_trap.digits_pope import cot_target

    cfg.validate()
    if not len(examples):
        raise ValueError("examples is empty")
    targets = [cot_target(ex) for ex in examples] if targets is None else list(targets)
    if len(targets) != len(examples):
        raise ValueError(f"targets ({len(targets)}) and examples ({len(examples)}) differ in length")
    dev = next(model.parameters()).device
    fixed = sft_tensors(processor, examples, targets)
    if fixed is not None:
        fixed = {k: v.to(dev) for k, v in fixed.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(examples)
    order = torch.randperm(n, generator=gen)
    pos = 0
    losses: List[float] = []
    model.train()
    t0 = time.perf_counter()
    running = None
    for step in range(cfg.steps):
        if pos + cfg.batch_size > n:  # new epoch: reshuffle (drop the short tail so batches stay equal)
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        if fixed is not None:
            batch = {k: v[idx.to(v.device)] for k, v in fixed.items()}
        else:
            sel = idx.tolist()
            batch = processor.sft_batch([examples[i]["image"] for i in sel], [examples[i]["question"] for i in sel],
                                        [targets[i] for i in sel])
            batch = {k: v.to(dev) for k, v in batch.items()}
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps, cfg.steps)
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"],
                    return_logits=False)
        loss = out.loss
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(f"SFT step {step + 1}: non-finite loss {float(loss)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        lv = float(loss.detach())
        losses.append(lv)
        running = lv if running is None else 0.9 * running + 0.1 * lv
        if progress is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            progress(step + 1, cfg.steps, running)
    model.eval()
    return SFTResult(losses=losses, seconds=time.perf_counter() - t0, steps=cfg.steps, examples=n)


@torch.no_grad()
def teacher_forced_accuracy(model: nn.Module, processor, examples: Sequence[dict], batch_size: int = 128) -> float:
    """Share of examples whose answer token ("yes"/"no") is the argmax under teacher forcing of the CoT
    target (a cheap check without generation; the diagnosis uses free generation)."""
    from hero.experiments.confidence_trap.digits_pope import cot_target

    tok = processor.tokenizer
    ans_ids = {tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")}
    dev = next(model.parameters()).device
    model.eval()
    hits = 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        b = processor.sft_batch([e["image"] for e in chunk], [e["question"] for e in chunk], [cot_target(e) for e in chunk])
        b = {k: v.to(dev) for k, v in b.items()}
        logits = model(b["input_ids"], b["attention_mask"], b["pixel_values"]).logits[:, :-1]
        lab = b["labels"][:, 1:]
        is_ans = torch.zeros_like(lab, dtype=torch.bool)
        for a in ans_ids:
            is_ans |= lab == a
        pred = logits.argmax(-1)
        hits += int(((pred == lab) & is_ans).sum())
    return hits / len(examples)
