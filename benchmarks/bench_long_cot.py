"""Long chain-of-thought: peak memory and time of one RL training step against TRL, by completion length.

Run: ``python -m benchmarks.bench_long_cot --json OUT.json [--budget-gb 8] [--lengths 1024,2048,4096,8192]``
Mixed lengths: ``python -m benchmarks.bench_long_cot --mixed 256,768,1280,2048 --trainers hero,hero_packed`` (one
group of completions of those lengths instead of G=2 per length; the row's ``completion_len`` is the longest).

One step = the policy forward, the GRPO loss (per-token log-probs and entropies) and backward on fixed random
completions (generation excluded, no optimizer step) of a random-init ``LlamaForCausalLM``: V=128256 (the Llama-3
vocabulary), D=256, 2 layers, fp32, prompt 64 tokens, G=2 completions of ``completion_len`` tokens (the second
one ends 1/8 early: padding), activation checkpointing on (non-reentrant, as TRL's trainers turn it on).
Each (trainer, length) runs in a FRESH subprocess; it warms up on 8 completion tokens, runs the long step and
reports the growth of the process's peak RSS (``ru_maxrss``) over the warm-up's (``peak_mb``), the step's wall time
(``step_s``) and its process CPU time (``cpu_s``, all threads). ``trl_liger`` runs the long step twice and times the
second: Liger's loss is ``torch.compile``'d for each new shape, a one-time cost. On a shared CPU the wall times carry
the load of other processes (compare ``cpu_s``); the memory does not.

Trainers
--------
* ``trl``: stock TRL ``GRPOTrainer.compute_loss`` (``loss_type="grpo"``): full logits, its own
  ``selective_log_softmax`` log-probs and entropies.
* ``trl_liger``: TRL with ``use_liger_kernel=True``: its ``LigerFusedLinearGRPOLoss`` on the hidden states.
  ``Trainer.train()`` would also patch the model with Liger's Triton kernels (RMSNorm, SwiGLU, RoPE), which
  cannot run on CPU; calling ``compute_loss`` directly leaves the model UNPATCHED, so this row measures TRL's
  Liger loss on a stock transformers model.
* ``hero_trl``: ``hero.integrations.trl.HEROGRPOTrainer.compute_loss`` (fused LM head, entropy weighting on).
* ``hero``: ``hero train``'s step: ``hero.trainer.Trainer.backward`` on a rollout of the same completions
  (fused LM head, entropy weighting on), padded layout (``model.packing off``).
* ``hero_packed``: the same with ``model.packing on`` (``auto`` does this for a text causal LM with
  flash_attention_2, and with eager / sdpa where the packed T^2 attention is no larger than the padded one):
  the rows concatenated into one sequence, no pad tokens through the decoder.

Memory guard: each child's address space for data (``RLIMIT_DATA``) is capped at ``--mem-cap-gb`` (default:
the machine's available memory minus 2 GB), so a run that would not fit fails inside the child with
``status="oom"`` (and the failing allocation in ``error``) instead of waking the kernel's OOM killer.
``--budget-gb X`` adds, per trainer, the longest completion whose ``peak_mb`` fits in X GB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from benchmarks.bench_trainer_memory import _rss_peak_mb

TRAINERS = ("trl", "trl_liger", "hero_trl", "hero", "hero_packed")
V, D, LAYERS, PROMPT, G = 128256, 256, 2, 64, 2


def _model(total_len: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=total_len + 16,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _mixed(mixed: str):
    """``--mixed`` "256,768" -> [256, 768] ([] when not given)."""
    return [int(x) for x in mixed.split(",") if x.strip()]


def _row_lengths(C: int, mixed: str = ""):
    """Completion lengths of the step's rows: ``--mixed``, else G=2 rows of which the second ended 1/8 early."""
    return _mixed(mixed) or [C, C - C // 8]


def _batch(lengths):
    """(prompt ids [n, P], completion ids [n, C], completion mask [n, C], advantages [n] = +-1) -- fixed random,
    n = len(lengths) rows, C = max(lengths)."""
    import torch

    n, C = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (n, PROMPT), generator=g)
    comp = torch.randint(3, V, (n, C), generator=g)
    cmask = (torch.arange(C)[None] < torch.tensor(lengths)[:, None]).long()
    return prompt, comp, cmask, torch.tensor([1.0 - 2 * (i % 2) for i in range(n)])


def _trl_runner(kind: str, model, lengths, tmp: str):
    """compute_loss + backward of a TRL trainer built around ``model`` (never .train()ed: no Liger patching)."""
    import torch
    from datasets import Dataset

    from hero.testing.tiny_models import build_tokenizer

    G, C = len(lengths), max(lengths)
    common = dict(output_dir=tmp, per_device_train_batch_size=G, num_generations=G, max_completion_length=C,
                  beta=0.0, use_cpu=True, report_to=[], save_strategy="no", loss_type="grpo", seed=0)
    if kind == "hero_trl":
        from hero.integrations.trl import HEROGRPOConfig as Cfg, HEROGRPOTrainer as Tr

        common.update(variance_gate=False, entropy_weighting=True, hero_impl="auto")
    else:
        from trl import GRPOConfig as Cfg, GRPOTrainer as Tr

        common.update(use_liger_kernel=kind == "trl_liger")
    tr = Tr(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=Cfg(**common),
            train_dataset=Dataset.from_dict({"prompt": ["a"] * G}), processing_class=build_tokenizer("llama"))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1

    def run(c: int) -> float:
        prompt, comp, cmask, adv = _batch(lengths)
        inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": comp[:, :c],
                  "completion_mask": cmask[:, :c], "advantages": adv, "num_items_in_batch": cmask[:, :c].sum()}
        loss = tr.compute_loss(tr.model, inputs)
        loss.backward()
        tr.model.zero_grad(set_to_none=True)
        return float(loss)

    return run


def _hero_runner(model, lengths, tmp: str, packing: str):
    """hero.trainer.Trainer.backward on a Rollout of the fixed completions (gradient checkpointing already on)."""
    import torch

    from hero.config import TrainConfig, apply_overrides
    from hero.grpo import variance_gate
    from hero.rollout import CausalLMAdapter, completion_labels
    from hero.testing.tiny_models import build_tokenizer
    from hero.trainer import Rollout, Trainer

    G, C = len(lengths), max(lengths)
    cfg = TrainConfig()
    apply_overrides(cfg, [("data.name", "jsonl"), ("data.path", "unused"), ("generation.max_new_tokens", C),
                          ("generation.num_generations", G), ("device", "cpu"), ("output_dir", tmp),
                          ("progress", False), ("batch_size", 1), ("model.packing", packing),
                          ("model.gradient_checkpointing", True)])  # on already (_model); the config says so
    tr = Trainer(cfg.validate(), model=model, adapter=CausalLMAdapter(build_tokenizer("llama")), dataset=[{}],
                 reward_funcs=[lambda completions, **_: [0.0] * len(completions)])

    def run(c: int) -> float:
        prompt, comp, cmask, adv = _batch(lengths)
        comp, cmask = comp[:, :c], cmask[:, :c]
        rewards = adv.double().view(G, 1)
        ro = Rollout(row_indices=[0], group_size=G, completion_ids=comp,
                     prompt={"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, completion_mask=cmask,
                     texts=[""] * G, rewards=rewards,
                     total_reward=rewards[:, 0], advantages=adv, gate=variance_gate(rewards[:, 0], G, enabled=False),
                     bad_groups=torch.zeros(1, dtype=torch.bool), kept=torch.arange(G),
                     labels=completion_labels(comp, cmask))
        m = tr.backward(ro)
        tr.model.zero_grad(set_to_none=True)
        return m["loss"]

    return run


def _child(a) -> dict:
    import resource

    import torch

    if a.mem_cap_gb > 0:
        cap = int(a.mem_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    torch.set_num_threads(a.threads)
    C = a.completion_len
    lengths = _row_lengths(C, a.mixed)
    model = _model(PROMPT + C)
    with tempfile.TemporaryDirectory() as tmp:
        if a.trainer.startswith("hero") and a.trainer != "hero_trl":
            run = _hero_runner(model, lengths, tmp, "on" if a.trainer == "hero_packed" else "off")
        else:
            run = _trl_runner(a.trainer, model, lengths, tmp)
        run(8)  # warm-up: kernels / extensions loaded, code paths touched
        base = _rss_peak_mb()
        if a.trainer == "trl_liger":
            run(C)  # Liger's loss is torch.compile'd per shape: compile on a first long step, time the second
        t0, c0 = time.perf_counter(), time.process_time()
        loss = run(C)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"peak_mb": _rss_peak_mb() - base, "step_s": dt, "cpu_s": cpu, "loss": loss, "status": "ok",
            "lengths": lengths, "checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("MemAvailable:"):
                    return int(ln.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _run_one(trainer: str, C: int, a) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_long_cot", "--child", trainer, "--completion-len", str(C),
           "--threads", str(a.threads), "--mem-cap-gb", str(a.mem_cap_gb), "--mixed", a.mixed]
    row = {"trainer": trainer, "completion_len": C, "peak_mb": None, "step_s": None}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"timeout ({a.timeout} s)"}
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is not None:
        return {**row, **json.loads(line[len("RESULT "):])}
    err = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    last = err[-1] if err else f"exit code {p.returncode}"
    oom = "can't allocate memory" in p.stderr or "MemoryError" in p.stderr or p.returncode in (-9, 137)
    return {**row, "status": "oom" if oom else "error", "error": last[-300:]}


def longest_fit(rows, budget_mb: float) -> dict:
    """trainer -> the longest completion_len with status ok and peak_mb <= budget_mb (None: none fits)."""
    out = {}
    for r in rows:
        fits = r["status"] == "ok" and r["peak_mb"] <= budget_mb
        best = out.get(r["trainer"])
        out[r["trainer"]] = max(best or 0, r["completion_len"]) if fits else best
    return out


def _parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_long_cot", description=__doc__.split("\n")[0])
    p.add_argument("--json", default="", help="write rows (+ budget fits) to this JSON file")
    p.add_argument("--budget-gb", type=float, default=0.0, help="report the longest completion fitting this peak growth")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated completion lengths")
    p.add_argument("--mixed", default="", help="instead of --lengths: one step on one group of completions of these "
                                               "comma-separated lengths (e.g. 256,768,1280,2048)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated subset of {','.join(TRAINERS)}")
    p.add_argument("--threads", type=int, default=2, help="torch threads per child")
    p.add_argument("--mem-cap-gb", type=float, default=-1.0,
                   help="RLIMIT_DATA of each child (default: available memory - 2 GB; 0 = no cap)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per child")
    p.add_argument("--child", choices=TRAINERS, dest="trainer", help=argparse.SUPPRESS)
    p.add_argument("--completion-len", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.trainer:
        print("RESULT " + json.dumps(_child(a)), flush=True)
        return 0
    if a.mem_cap_gb < 0:
        a.mem_cap_gb = max(1.0, round(_mem_available_gb() - 2.0, 1))
    trainers = [t.strip() for t in a.trainers.split(",") if t.strip()]
    bad = [t for t in trainers if t not in TRAINERS]
    if bad:
        raise SystemExit(f"--trainers: unknown {bad}; choose from {TRAINERS}")
    try:
        mixed = _mixed(a.mixed)
        lengths = [max(mixed)] if mixed else [int(x) for x in a.lengths.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--lengths / --mixed: comma-separated integers, got {a.lengths!r} / {a.mixed!r}") from None
    if any(n < 8 for n in mixed + lengths):
        raise SystemExit("--lengths / --mixed: every completion length must be >= 8 (the warm-up step's length)")
    rows_desc = f"rows of lengths {mixed}" if mixed else f"G={G}"
    print(f"one RL step, Llama V={V} D={D} layers={LAYERS} fp32, prompt {PROMPT}, {rows_desc}, checkpointing on, "
          f"{a.threads} threads, child memory cap {a.mem_cap_gb} GB", flush=True)
    rows = []
    for C in lengths:
        for t in trainers:
            r = _run_one(t, C, a)
            rows.append(r)
            pk = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            st = "-" if r["step_s"] is None else f"{r['step_s']:.2f}"
            cs = "-" if r.get("cpu_s") is None else f"{r['cpu_s']:.2f}"
            print(f"{t:<11} C={C:<6} peak_mb={pk:>7} step_s={st:>7} cpu_s={cs:>7} {r['status']} {r.get('error', '')}",
                  flush=True)
            if a.json:  # written after every row: a long run that is stopped keeps what it measured
                _write(a, rows)
    if a.budget_gb:
        for t, c in longest_fit(rows, a.budget_gb * 1024).items():
            print(f"budget {a.budget_gb} GB: {t} fits completions up to {c}")
    return 0


def _write(a, rows) -> None:
    from benchmarks.common import write_json

    mixed = _mixed(a.mixed)
    out = {"config": {"vocab": V, "hidden": D, "layers": LAYERS, "prompt": PROMPT, "dtype": "float32",
                      "G": len(mixed) if mixed else G, "mixed_lengths": mixed or None,
                      "checkpointing": True, "threads": a.threads, "mem_cap_gb": a.mem_cap_gb,
                      "measure": "growth of ru_maxrss during one forward+loss+backward (CPU)",
                      "trl_liger": "TRL's Liger loss on the unpatched model (Liger's Triton model patches need a GPU)"},
           "rows": rows}
    if a.budget_gb:
        out["budget_gb"] = a.budget_gb
        out["longest_fit"] = longest_fit(rows, a.budget_gb * 1024)
    write_json(a.json, out)


if __name__ == "__main__":
    sys.exit(main())
