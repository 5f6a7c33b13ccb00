"""``hero diagnose`` and ``hero demo`` subcommands (``hero.cli.COMMANDS`` names them and imports
this module only when one of them runs).

``hero diagnose --model PATH --data FILE.jsonl [--sigmas 0,30,50] --out DIR [options]``

Runs the confidence-trap diagnosis (``hero.experiments.confidence_trap.diagnostics.diagnose``) of a model on a dataset and writes
``DIR/diagnosis.json`` (every number), ``DIR/diagnosis.md`` (tables + sentences generated from the numbers)
and ``DIR/{reliability,entropy_vs_sigma,entropy_bins}.png``.

* ``--model``: a folder saved by ``hero.experiments.confidence_trap.tiny_vlm`` (``config.json`` with ``model_type: hero-tiny-vlm``, e.g.
  ``demo_out/models/sft`` or ``demo_out/runs/hero/final``) -> ``hero.experiments.confidence_trap.diagnostics.TinyVLMAdapter``; anything else
  (a local folder or a hub id) is loaded by the trainer's ``hero.models.hf_vlm.load_vlm`` (transformers'
  ``AutoModelForImageTextToText`` + its processor) -> ``hero.experiments.confidence_trap.diagnostics.HFVLMAdapter``.
* ``--data``: a JSONL file in the format of ``hero.data.jsonl`` (one object per line: ``image`` path relative
  to the file, ``question``, ``answer`` "yes"/"no", optional ``split`` and ``id``), or ``digits_pope[:N]`` for
  the built-in digits-POPE test set with N questions per split (default 100).
* ``--sigmas``: Gaussian pixel-noise levels (std on the 0..255 scale) added to every image, seeded per example.
* ``--decode vcd``: visual contrastive decoding instead of greedy (``hero.experiments.confidence_trap.vcd``);
  the same report, from the contrastive answer distribution, plus a section with the VCD settings.

This module imports nothing heavy at import time, so ``hero diagnose --help`` stays fast.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

__all__ = ["diagnose_main", "load_adapter"]

_HELP = """usage: hero diagnose --model PATH --data FILE.jsonl|digits_pope[:N] --out DIR [options]

Confidence-trap diagnosis: per noise level sigma, answer-token entropy (nats), accuracy, accuracy per entropy
bin, ECE + reliability, POPE accuracy/precision/recall/F1/yes-ratio per split; writes DIR/diagnosis.json,
DIR/diagnosis.md and PNG plots.

  --model PATH          hero tiny-VLM folder, or a transformers VLM (local folder or hub id)
  --data FILE           JSONL (image, question, answer[, split, id]; image paths relative to the file),
                        or digits_pope[:N] (built-in test set, N questions per split, default 100)
  --out DIR             output folder (created)
  --sigmas 0,30,50      noise levels (default 0,30,50)
  --limit N             only the first N JSONL examples
  --batch-size N        questions per generate call (default 32 tiny VLM, 8 transformers)
  --max-new-tokens N    generated tokens (default 32 tiny VLM, 8 transformers)
  --seed N              noise seed (default 0)
  --low-entropy X       "confident" threshold in nats (default 0.3)
  --n-bins N            ECE bins (default 10)
  --keep-records        also store every answer (text, entropy, confidence) in diagnosis.json
  --threads N           torch threads on CPU (default 1 for the tiny VLM, torch's default otherwise)
  --decode greedy|vcd   greedy decoding (default) or visual contrastive decoding: logits
                        (1 + alpha) z(image) - alpha z(image under diffusion noise), plausibility cutoff beta
  --vcd-alpha X         contrast strength alpha >= 0 (default 1.0)
  --vcd-beta X          plausibility cutoff beta in [0, 1] (default 0.1)
  --vcd-noise-steps N   diffusion step of the distorted image, 0..1000 (default 500)
  --vcd-schedule S      vcd (default: the VCD reference code's sigmoid betas 1e-5..5e-3) | ddpm (linear
                        betas 1e-4..0.02: stronger, at step 500 signal x0.28 / noise x0.96 vs x0.86 / x0.50)
transformers models only:
  --device D            auto (cuda if available) | cpu | cuda | cuda:1 ...
  --dtype T             bfloat16 | float16 | float32 (default bfloat16 on CUDA, float32 on CPU)
  --prompt TEMPLATE     text with {question} (default "{question} Answer the question with yes or no.")
  --answer-mode M       first_token (default: first non-blank generated token) | tag (token after <answer>)
  --no-chat-template    feed the prompt as is (default: the processor's chat template, one user turn)
"""

_VALUED = {"--model", "--data", "--out", "--sigmas", "--limit", "--batch-size", "--max-new-tokens", "--seed",
           "--low-entropy", "--n-bins", "--threads", "--device", "--dtype", "--prompt", "--answer-mode", "--decode",
           "--vcd-alpha", "--vcd-beta", "--vcd-noise-steps", "--vcd-schedule"}
_FLAGS = {"--keep-records", "--no-chat-template"}


def _parse(argv: Sequence[str]) -> dict:
    opts: dict = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        key, val = (a.split("=", 1) if a.startswith("--") and "=" in a else (a, None))
        if key in _FLAGS:
            if val is not None:
                raise ValueError(f"{key} takes no value")
            opts[key] = True
        elif key in _VALUED:
            if val is None:
                if i + 1 >= len(argv):
                    raise ValueError(f"{key} needs a value")
                val = argv[i + 1]
                i += 1
            opts[key] = val
        else:
            raise ValueError(f"unknown option {a!r} (see hero diagnose --help)")
        i += 1
    for req in ("--model", "--data", "--out"):
        if req not in opts:
            raise ValueError(f"{req} is required")
    return opts


def _int(opts, key, default, lo=1):
    if key not in opts:
        return default
    try:
        v = int(opts[key])
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {opts[key]!r}") from None
    if v < lo:
        raise ValueError(f"{key} must be >= {lo}, got {v}")
    return v


def _float(opts, key, default):
    if key not in opts:
        return default
    try:
        return float(opts[key])
    except ValueError:
        raise ValueError(f"{key} must be a number, got {opts[key]!r}") from None


def _sigmas(text: str) -> List[float]:
    try:
        vals = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not (v >= 0) or v == float("inf") for v in vals):
        raise ValueError(f"--sigmas must be finite numbers >= 0, got {text!r}")
    return vals


def vcd_config(opts: dict):
    """``--decode`` and the ``--vcd-*`` options -> a VCDConfig (seeded by ``--seed``), or None for greedy."""
    decode = opts.get("--decode", "greedy")
    if decode not in ("greedy", "vcd"):
        raise ValueError(f"--decode must be greedy or vcd, got {decode!r}")
    given = [k for k in ("--vcd-alpha", "--vcd-beta", "--vcd-noise-steps", "--vcd-schedule") if k in opts]
    if decode == "greedy":
        if given:
            raise ValueError(f"{given[0]} needs --decode vcd")
        return None
    from hero.experiments.confidence_trap.vcd import VCDConfig

    return VCDConfig(alpha=_float(opts, "--vcd-alpha", 1.0), beta=_float(opts, "--vcd-beta", 0.1),
                     noise_steps=_int(opts, "--vcd-noise-steps", 500, lo=0), seed=_int(opts, "--seed", 0, lo=0),
                     schedule=opts.get("--vcd-schedule", "vcd"))


def vcd_section(vcd) -> str:
    """The report's markdown section on the VCD settings (what the numbers above were decoded with)."""
    from hero.experiments.confidence_trap.vcd import alpha_bar

    ab = alpha_bar(vcd.noise_steps, vcd.schedule)
    return (f"\n## Decoding: visual contrastive decoding (VCD)\n\n"
            f"- Each token is the argmax of `(1 + alpha) z(v) - alpha z(v')`, alpha = {vcd.alpha:g}, among the tokens "
            f"with `p(y | v) >= beta * max p(. | v)`, beta = {vcd.beta:g}.\n"
            f"- v': every image's processed pixel values after {vcd.noise_steps} steps of the `{vcd.schedule}` "
            f"diffusion schedule (signal x{ab ** 0.5:.3f}, Gaussian noise x{(1 - ab) ** 0.5:.3f}; seed {vcd.seed}).\n"
            "- The entropy, confidence, accuracy per entropy bin and POPE numbers above are those of this contrastive "
            "distribution at the answer position.\n")


def is_tiny_vlm(path: str) -> bool:
    import json

    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "hero-tiny-vlm"


def load_adapter(model: str, opts: Optional[dict] = None):
    """(adapter, kind) for ``--model``: hero tiny VLM folder -> TinyVLMAdapter, else HFVLMAdapter."""
    import torch

    from hero.experiments.confidence_trap.diagnostics import HFVLMAdapter, TinyVLMAdapter

    opts = opts or {}
    if is_tiny_vlm(model):
        from hero.experiments.confidence_trap.tiny_vlm import load_tiny_vlm

        dev = opts.get("--device", "auto")
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev
        m, proc = load_tiny_vlm(model, map_location=dev)
        ad = TinyVLMAdapter(m.eval(), proc, max_new_tokens=_int(opts, "--max-new-tokens", 32), vcd=vcd_config(opts))
        ad.name = f"tiny-vlm:{os.path.abspath(model)}"
        return ad, "tiny"
    dev = opts.get("--device", "auto")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    dname = opts.get("--dtype", "bfloat16" if str(dev).startswith("cuda") else "float32")
    if dname not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {dname!r}")
    kw = dict(max_new_tokens=_int(opts, "--max-new-tokens", 8),
              answer_mode=opts.get("--answer-mode", "first_token"),
              use_chat_template=not opts.get("--no-chat-template", False), vcd=vcd_config(opts))
    if "--prompt" in opts:
        if "{question}" not in opts["--prompt"]:
            raise ValueError("--prompt must contain {question}")
        kw["prompt"] = opts["--prompt"]
    return HFVLMAdapter.from_pretrained(model, device=dev, dtype=dtypes[dname], **kw), "hf"


def load_examples(data: str, limit: Optional[int] = None, seed: int = 0) -> List[dict]:
    """``--data``: a JSONL file (hero.data.jsonl format) or ``digits_pope[:N]``."""
    if data == "digits_pope" or data.startswith("digits_pope:"):
        from hero.experiments.confidence_trap.digits_pope import build_digits_pope

        n = 100
        if ":" in data:
            try:
                n = int(data.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"--data digits_pope:N needs an integer N, got {data!r}") from None
        ex = build_digits_pope(n, subset="test", seed=seed)
        return ex[:limit] if limit else ex
    from hero.data.jsonl import load_jsonl

    if not os.path.isfile(data):
        raise ValueError(f"--data: no such file {data!r}")
    ex = load_jsonl(data, limit=limit)
    if not ex:
        raise ValueError(f"--data {data!r} holds no examples")
    return ex


def diagnose_main(argv: Optional[Sequence[str]] = None, log=print) -> int:
    """``hero diagnose`` (see module docstring); returns an exit code (2 for a bad command line or data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_HELP)
        return 0 if argv else 2
    from hero.errors import HeroUserError
    from hero.hub import check_model_source

    try:
        opts = _parse(argv)
        sigmas = _sigmas(opts.get("--sigmas", "0,30,50"))
        seed = _int(opts, "--seed", 0, lo=0)
        limit = _int(opts, "--limit", None) if "--limit" in opts else None
        low = _float(opts, "--low-entropy", 0.3)
        n_bins = _int(opts, "--n-bins", 10)
        threads = _int(opts, "--threads", None) if "--threads" in opts else None
        vcd = vcd_config(opts)  # checked before any model loads
        check_model_source(opts["--model"], "--model")  # at once, not after the hub's retries
        examples = load_examples(opts["--data"], limit, seed)
    except (ValueError, HeroUserError) as e:  # JSONLFormatError is both
        print(f"hero diagnose: {e}", file=sys.stderr)
        return 2
    import time

    import torch

    from hero.experiments.confidence_trap import report as R
    from hero.experiments.confidence_trap.diagnostics import diagnose
    from hero.io import atomic_write_text

    out = opts["--out"]
    os.makedirs(out, exist_ok=True)
    prev = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        adapter, kind = load_adapter(opts["--model"], opts)
        if threads is not None or (kind == "tiny" and str(adapter.model.device) == "cpu"):
            torch.set_num_threads(threads or 1)  # tiny matmuls: one thread avoids OpenMP contention
        bs = _int(opts, "--batch-size", 32 if kind == "tiny" else 8)
        log(f"[diagnose] {adapter.name}: {len(examples)} questions x sigmas {sigmas} (batch {bs})")
        last = {}

        def progress(sigma, done, total):
            if done == total or done - last.get(sigma, 0) >= max(total // 4, 1):
                last[sigma] = done
                log(f"[diagnose {time.perf_counter() - t0:6.1f}s] sigma={sigma:g}: {done}/{total}")

        diag = diagnose(adapter, examples, sigmas, seed=seed, batch_size=bs, n_bins=n_bins, low_entropy=low,
                        keep_records="--keep-records" in opts, progress=progress)
    finally:
        torch.set_num_threads(prev)
    diag.meta.update({"model": opts["--model"], "data": opts["--data"], "seconds": time.perf_counter() - t0,
                      "decode": "greedy" if vcd is None else "vcd"})
    if vcd is not None:
        diag.meta["vcd"] = {"alpha": vcd.alpha, "beta": vcd.beta, "noise_steps": vcd.noise_steps, "seed": vcd.seed,
                            "schedule": vcd.schedule}
    diag.save_json(os.path.join(out, "diagnosis.json"))
    plots = diag.save_plots(out)
    title = f"Confidence-trap diagnosis of `{opts['--model']}`" + (" (VCD)" if vcd else "")
    md = R.diagnosis_markdown(diag.to_dict(), title=title,
                              plots=[os.path.basename(p) for p in plots], level=1)
    how = "greedy decoding" if vcd is None else (
        f"visual contrastive decoding (alpha {vcd.alpha:g}, beta {vcd.beta:g}, noise step {vcd.noise_steps})")
    md += "" if vcd is None else vcd_section(vcd)
    md += (f"\nData: `{opts['--data']}` ({len(examples)} questions), sigmas {sigmas}, seed {seed}, {how}, "
           f"{diag.meta['seconds']:.1f}s.\n")
    atomic_write_text(os.path.join(out, "diagnosis.md"), md)
    log(diag.table())
    log(f"[diagnose] wrote {os.path.join(out, 'diagnosis.json')}, diagnosis.md and {len(plots)} plots")
    return 0


def _diagnose_cmd(argv: List[str]) -> int:
    return diagnose_main(argv)


def _demo_cmd(argv: List[str]) -> int:
    from hero.experiments.confidence_trap.demo import demo_main

    return demo_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(diagnose_main())
