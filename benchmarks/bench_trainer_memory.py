"""Peak memory of one HERO training step on a long completion: fused LM head vs materialized logits.

Run: ``python -m benchmarks.bench_trainer_memory [--vocab 32000 --completion 2048 --impl auto --json out.json]``

Each variant runs in a FRESH subprocess (so allocator caches and earlier peaks never leak between them) on a
random-init ``LlamaForCausalLM`` built from a config (no downloads). The child builds the model and the
inputs, runs tiny warm-up steps on 8 and 16 completion tokens (loads the kernels / C++ extension and allocates
AdamW's state), records the process's peak resident set size (``ru_maxrss``), runs one full training step
(forward, loss, backward, AdamW step) on the long completion and reports the growth of ``ru_maxrss``: the
step's own peak above everything already resident (model, optimizer state, inputs).
On CUDA (``--device cuda``) it reports ``torch.cuda.max_memory_allocated`` growth instead.

Variants
--------
* ``fused``: the trainer's path. ``model.model(...)`` gives the last hidden states [B, T, D]; only the
  completion slice [B, C, D] goes into ``hero_loss(hidden, labels, A, weight=lm_head.weight)``, whose fused
  LM-head op computes log-probs and entropies tile by tile and never holds [B*C, V] logits.
* ``fused-4gemm``: ``fused`` forced onto the generic fused op (``linear_entropy_logprob``, whose backward
  recomputes the logits: 4 GEMMs) instead of ``hero_loss``'s 3-GEMM path (``hero_kernels.linear_hero_loss``,
  gradients computed in the loss's forward); not run by default.
* ``liger``: TRL's ``use_liger_kernel=True`` loss, ``LigerFusedLinearGRPOLoss`` as TRL builds it (loss_type
  "dapo", beta 0, no reference model, compiled) on the same hidden states, on the UNPATCHED model (TRL's
  ``train()`` would also patch the model with Liger's Triton kernels, which do not run on CPU). No entropy
  weighting (Liger has none). Not run by default.
* ``materialized``: the usual recipe. ``model(...).logits`` ([B, T, V] fp32, prompt included), then
  ``log_softmax``, the label gather, the entropy ``-(p * log p).sum(-1)``, HERO weights and the GRPO loss.

Memory model (fp32, N = B*T tokens, V vocab, D width)
-----------------------------------------------------
Materialized: the logits are N*V*4 bytes (V = 32000, N = 2112: 270 MB) and autograd keeps several tensors of
that size alive at once: the logits, ``log_softmax``'s output, ``p = exp(log p)`` and ``p * log p`` saved for
backward, then the same number of [N, V] gradients in backward, so the peak is ~4-6 x N*V*4 bytes on top of
the model. Fused: the loss saves only the hidden states and three floats per token (logp, entropy, lse); its
forward and backward hold one [chunk, V] tile at a time (chunked PyTorch / C++ backends) or none at all
(Triton), so its peak above the model is O(N*D + chunk*V), independent of the completion length's N*V.
Both variants pay the same for the decoder activations and the parameter gradients (re-allocated by each
step: 1 x parameters, here ~70 MB, most of it the embedding and the LM head), so the difference is the logits
traffic alone; the ratio printed is materialized / fused. AdamW's state is in the baseline of both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("fused", "materialized")
ALL_MODES = ("fused", "fused-4gemm", "liger", "materialized")


def _rss_peak_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hero_kernels as hk

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.prompt + args.completion + 8, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B, P, C = args.batch, args.prompt, args.completion
    ids = torch.randint(0, args.vocab, (B, P + C), device=dev)
    mask = torch.ones_like(ids)
    labels = ids[:, P:].clone()
    labels[:, -C // 8 :] = -100  # some padding at the end, as after an early eos
    adv = torch.randn(B, device=dev)
    tau, kappa = args.temperature, 1.0

    def loss_fused(h_full, lab, a):
        h = h_full[:, P - 1 : P - 1 + lab.shape[1]]
        loss, _ = hk.hero_loss(h, lab, a, weight=model.lm_head.weight, temperature=tau, kappa=kappa, impl=args.impl)
        return loss

    def loss_materialized(logits_full, lab, a):
        logits = logits_full[:, P - 1 : P - 1 + lab.shape[1]].float() / tau
        logq = torch.log_softmax(logits, dim=-1)
        valid = lab != -100
        logp = logq.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        H = -(logq.exp() * logq).sum(-1)
        Hd = H.detach().masked_fill(~valid, float("inf"))
        w = torch.softmax(-Hd / kappa, dim=-1)  # per response, sums to 1 over valid tokens
        ratio = torch.exp(logp - logp.detach())
        pg = -ratio * a[:, None]
        return ((w * pg).masked_fill(~valid, 0.0).sum(-1)).mean()

    liger = None
    if args.mode == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", temperature=tau,
                                         max_completion_length=C)

    def loss_liger(h_full, lab, a):
        h = h_full[:, P - 1 : P - 1 + lab.shape[1]]
        out = liger(h, model.lm_head.weight, lab.clamp_min(0), (lab != -100).long(), a)
        return out[0] if isinstance(out, tuple) else out

    if args.checkpointing:
        model.gradient_checkpointing_enable()
    if args.mode == "fused-4gemm":
        from hero_kernels import linear_hero_loss

        linear_hero_loss.ENABLED = False

    def step(small: int = 0):
        if small:  # warm-up on a few tokens: loads kernels / extensions, touches the code paths
            i, m, lab = ids[:, : P + small], mask[:, : P + small], labels[:, :small]
        else:
            i, m, lab = ids, mask, labels
        if args.mode != "materialized":
            h = model.model(input_ids=i, attention_mask=m).last_hidden_state
            loss = (loss_liger if args.mode == "liger" else loss_fused)(h, lab, adv)
        else:
            logits = model(input_ids=i, attention_mask=m).logits
            loss = loss_materialized(logits, lab, adv)
        loss.backward()
        opt.step()  # the warm-up's step allocates AdamW's state, so the baseline already holds it
        opt.zero_grad(set_to_none=True)
        return float(loss)

    # Two warm-up lengths: torch.compile (Liger's chunk loss) then traces a dynamic-length graph, so the long
    # step is not charged for a recompile.
    step(small=8)
    step(small=16)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / 2**20
    base_rss = _rss_peak_mb()
    t0 = time.perf_counter()
    loss = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak_rss = _rss_peak_mb()
    impl = {"fused": args.impl, "fused-4gemm": args.impl, "liger": "liger"}.get(args.mode, "eager")
    out = {"mode": args.mode, "impl": impl, "loss": loss, "time_s": dt,
           "rss_before_mb": base_rss, "rss_peak_mb": peak_rss, "delta_mb": peak_rss - base_rss,
           "logits_mb": B * (P + C) * args.vocab * 4 / 2**20}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        out.update(cuda_before_mb=base, cuda_peak_mb=peak, delta_mb=peak - base)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_trainer_memory", description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--completion", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--impl", default="auto", help="hero_kernels backend of the fused path (auto|cpu|torch|triton|cuda)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (as TRL's default)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {ALL_MODES}")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--mode", choices=ALL_MODES, help=argparse.SUPPRESS)  # child process
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        _parser().error(f"--modes: unknown {bad}; choose from {ALL_MODES}")
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    env = dict(os.environ)
    for mode in modes:
        cmd = [sys.executable, "-m", "benchmarks.bench_trainer_memory", *base, "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{mode}: child failed (rc={proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(line[len("RESULT "):])
    logits_mb = next(iter(results.values()))["logits_mb"]
    print(f"one HERO training step, B={args.batch} prompt={args.prompt} completion={args.completion} "
          f"V={args.vocab} D={args.hidden} layers={args.layers} device={args.device} "
          f"checkpointing={args.checkpointing} (full fp32 logits would be {logits_mb:.0f} MB)")
    print(f"{'variant':<22}{'peak growth MB':>16}{'step s':>10}{'loss':>12}")
    for r in results.values():
        name = r["mode"] + (f" ({r['impl']})" if r["mode"].startswith("fused") else "")
        print(f"{name:<22}{r['delta_mb']:>16.1f}{r['time_s']:>10.2f}{r['loss']:>12.5f}")
    ratio = None
    if "fused" in results and "materialized" in results:
        ratio = results["materialized"]["delta_mb"] / max(results["fused"]["delta_mb"], 1e-9)
        print(f"materialized / fused peak growth: {ratio:.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "mode"}, "results": results,
                       "ratio": ratio}, fh, indent=1)
    return 0

if __name__ == "__main__":
    sys.exit(main())
