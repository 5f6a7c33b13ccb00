"""Peak memory of one HERO training step on a long completion: fused LM head vs materialized logits.

Run: ``python -m benchmarks.bench_trainer_memory [--vocab 32000 --completion 2048 --impl auto --json out.json]``

Each variant runs in a FRESH subprocess (so allocator caches and earlier peaks never leak between them) on a
random-init ``LlamaForCausalLM`` built from a config (no downloads). The child builds the model and the
inputs, runs a tiny warm-up step on 8 completion tokens (loads the kernels / C++ extension and allocates
AdamW's state), records the process's peak resident set size (``ru_maxrss``), runs one full training step
(forward, loss, backward, AdamW step) on the long completion and reports the growth of ``ru_maxrss``: the
step's own peak above everything already resident (model, optimizer state, inputs).
On CUDA (``--device cuda``) it reports ``torch.cuda.max_memory_allocated`` growth instead.

Variants
--------
* ``fused``: the trainer's path. ``model.model(...)`` gives the last hidden states [B, T, D]; only the
  completion slice [B, C, D] goes into ``hero_loss(hidden, labels, A, weight=lm_head.weight)``, whose fused
  LM-head op computes log-probs and entropies tile by tile and never holds [B*C, V] logits.
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

    def step(small: bool):
        if small:  # warm-up on 8 tokens: loads kernels / extensions, touches the code paths
            i, m, lab = ids[:, : P + 8], mask[:, : P + 8], labels[:, :8]
        else:
            i, m, lab = ids, mask, labels
        if args.mode == "fused":
            h = model.model(input_ids=i, attention_mask=m).last_hidden_state
            loss = loss_fused(h, lab, adv)
        else:
            logits = model(input_ids=i, attention_mask=m).logits
            loss = loss_materialized(logits, lab, adv)
        loss.backward()
        opt.step()  # the warm-up's step allocates AdamW's state, so the baseline already holds it
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step(small=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / 2**20
    base_rss = _rss_peak_mb()
    t0 = time.perf_counter()
    loss = step(small=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak_rss = _rss_peak_mb()
    out = {"mode": args.mode, "impl": args.impl if args.mode == "fused" else "eager", "loss": loss, "time_s": dt,
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
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    env = dict(os.environ)
    for mode in MODES:
        cmd = [sys.executable, "-m", "benchmarks.bench_trainer_memory", *base, "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{mode}: child failed (rc={proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[mode] = json.loads(line[len("RESULT "):])
    f, m = results["fused"], results["materialized"]
    print(f"one HERO training step, B={args.batch} prompt={args.prompt} completion={args.completion} "
          f"V={args.vocab} D={args.hidden} layers={args.layers} device={args.device} "
          f"(full fp32 logits would be {m['logits_mb']:.0f} MB)")
    print(f"{'variant':<14}{'peak growth MB':>16}{'step s':>10}{'loss':>12}")
    for r in (f, m):
        name = r["mode"] + (f" ({r['impl']})" if r["mode"] == "fused" else "")
        print(f"{name:<14}{r['delta_mb']:>16.1f}{r['time_s']:>10.2f}{r['loss']:>12.5f}")
    ratio = m["delta_mb"] / max(f["delta_mb"], 1e-9)
    print(f"materialized / fused peak growth: {ratio:.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "mode"}, "results": results,
                       "ratio": ratio}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
