"""Markdown report and plots of the confidence-trap demo (``hero.experiments.confidence_trap.demo``) and of ``hero diagnose``.

Everything here reads plain dicts (``Diagnosis.to_dict()`` and the demo's ``summary.json``), so a report can
be regenerated from ``summary.json`` alone: ``python -m hero.experiments.confidence_trap.report demo_out/summary.json``.

The text is generated from the numbers: every sentence that says something rose, fell, held or differs is
computed from the tables with the tolerances below (stated in the report itself), never a fixed story.

* Accuracy differences use a two-standard-error rule: with accuracies p1, p2 on n1, n2 questions, a
  difference counts only when ``|p1 - p2| >= 2 * sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)``, else it is
  "within sampling noise".
* Mean answer-token entropy counts as "flat" when it moves by less than ``ENTROPY_TOL`` nats.
* Confidence-trap verdict for one model over the sigma range: accuracy falls (2-SE rule) from the lowest to
  the highest sigma while the mean confidence (probability of the emitted answer token) falls by less than
  ``TRACK_FRAC`` (half) of that accuracy drop -> "trap" (the model does not signal the damage); confidence
  falls by at least half the accuracy drop -> "uncertainty signalled"; accuracy does not fall -> "no accuracy
  loss" (the noise was not strong enough to test the trap on this model). A calibrated model's confidence
  falls as much as its accuracy. The sentence also gives the mean-entropy change.

All files are written atomically with ``hero.io`` (temp file + ``os.replace``).
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from hero.io import atomic_write_bytes, atomic_write_text

from .digits_pope import sigma_key

__all__ = [
    "ENTROPY_TOL",
    "TRACK_FRAC",
    "accuracy_change",
    "trend_sentence",
    "trap_verdict",
    "diagnosis_markdown",
    "plot_training_curves",
    "plot_sft_loss",
    "plot_comparison",
    "write_report",
    "render_report",
    "render_plots",
]

#: Mean-entropy changes below this (nats) are called "flat".
ENTROPY_TOL = 0.02

#: Trap verdict: the model's mean confidence must fall by at least this fraction of its accuracy drop for the
#: damage to count as signalled.
TRACK_FRAC = 0.5


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def _save_fig(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# number -> words
# ----------------------------------------------------------------------------------------------
def _f(x, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return f"{x:.{nd}f}"


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def accuracy_change(p1: float, n1: int, p2: float, n2: int) -> Tuple[float, bool]:
    """(p2 - p1, significant under the 2-SE rule)."""
    d = p2 - p1
    tol = 2 * math.sqrt(_se(p1, n1) ** 2 + _se(p2, n2) ** 2)
    # equal accuracies of 0 or 1 have SE 0: a zero difference is never significant
    return d, abs(d) > 0 and abs(d) >= tol


def trend_sentence(what: str, values: Sequence[float], sigmas: Sequence[float], *, tol: float,
                   unit: str = "", ns: Optional[Sequence[int]] = None) -> str:
    """'<what> rose/fell/stayed flat as sigma increased: a -> b -> c (sigma 0 -> 30 -> 50)'.

    With ``ns`` (sample sizes) the first-vs-last change is judged by the 2-SE rule (accuracies); else by
    ``|last - first| >= tol``."""
    vals = [float(v) for v in values]
    path = " -> ".join(_f(v) for v in vals)
    sig = " -> ".join(f"{s:g}" for s in sigmas)
    d = vals[-1] - vals[0]
    if ns is not None:
        _, significant = accuracy_change(vals[0], ns[0], vals[-1], ns[-1])
    else:
        significant = abs(d) >= tol
    if not significant:
        verb = "stayed flat" + (" (within sampling noise)" if ns is not None else f" (|change| < {tol:g}{unit})")
    else:
        verb = "rose" if d > 0 else "fell"
    return f"{what} {verb} as sigma increased: {path} (sigma {sig})"


def trap_verdict(diag: dict, tol: float = ENTROPY_TOL, track: float = TRACK_FRAC) -> Tuple[str, str]:
    """(label, sentence) for one diagnosis dict over its sigma range (see module docstring)."""
    sig = [float(s) for s in diag["sigmas"]]
    lo, hi = diag["per_sigma"][sigma_key(sig[0])], diag["per_sigma"][sigma_key(sig[-1])]
    dacc, acc_sig = accuracy_change(lo["accuracy"], lo["n"], hi["accuracy"], hi["n"])
    dH = hi["mean_entropy"] - lo["mean_entropy"]
    ce = hi["confident_error_frac"]
    low = diag.get("meta", {}).get("low_entropy", 0.3)
    h_words = ("stayed flat" if abs(dH) < tol else ("rose" if dH > 0 else "fell"))
    ent = f"mean answer entropy {h_words} ({_f(lo['mean_entropy'])} -> {_f(hi['mean_entropy'])} nats)"
    tail = (f"; at sigma={sig[-1]:g}, {100 * ce:.0f}% of its errors were made with answer entropy <= {low:g} nats "
            f"(confidently wrong)")
    if "mean_confidence" in hi and "mean_confidence" in lo:
        tail += (f" and its mean confidence exceeded its accuracy by {_f(hi['mean_confidence'] - hi['accuracy'])} "
                 "(overconfidence gap)")
    if not (acc_sig and dacc < 0):
        what = "rose" if (acc_sig and dacc > 0) else "did not fall significantly"
        return ("no accuracy loss",
                f"accuracy {what} from sigma={sig[0]:g} to {sig[-1]:g} ({_f(lo['accuracy'])} -> {_f(hi['accuracy'])}), "
                f"so the noise did not hurt this model enough to test the trap; {ent}{tail}")
    if "mean_confidence" in lo and "mean_confidence" in hi:
        dconf = lo["mean_confidence"] - hi["mean_confidence"]
        ratio = dconf / -dacc
        if dconf > 0:
            conf = (f"its mean confidence fell by only {_f(dconf)} ({_f(lo['mean_confidence'])} -> "
                    f"{_f(hi['mean_confidence'])}), {100 * ratio:.0f}% of the accuracy drop")
        else:
            conf = f"its mean confidence did not fall ({_f(lo['mean_confidence'])} -> {_f(hi['mean_confidence'])})"
        trapped = ratio < track
    else:  # older dicts without confidence: fall back on the entropy
        conf = "no confidence recorded"
        trapped = dH < tol
    if trapped:
        return ("trap",
                f"accuracy fell {_f(lo['accuracy'])} -> {_f(hi['accuracy'])} from sigma={sig[0]:g} to {sig[-1]:g} but "
                f"{conf}, and the {ent}: the model did not signal the damage (confidence trap){tail}")
    return ("uncertainty signalled",
            f"accuracy fell {_f(lo['accuracy'])} -> {_f(hi['accuracy'])} from sigma={sig[0]:g} to {sig[-1]:g} and "
            f"{conf.replace('fell by only', 'fell by')}; the {ent}: the model's confidence tracked the damage{tail}")


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _sigma_table(diag: dict) -> str:
    rows = []
    low = diag.get("meta", {}).get("low_entropy", 0.3)
    for s in diag["sigmas"]:
        r = diag["per_sigma"][sigma_key(s)]
        pope = (r.get("pope") or {}).get("all") or {}
        ch = r.get("chair") or {}
        rows.append([f"{float(s):g}", r["n"], _f(r["accuracy"]), _f(r["mean_entropy"]), _f(r["median_entropy"]),
                     _f(r.get("mean_entropy_correct")), _f(r.get("mean_entropy_wrong")), _f(r["low_entropy_frac"]),
                     _f(r.get("low_entropy_accuracy")), _f(r["confident_error_frac"]), _f(r["ece"]),
                     _f(pope.get("f1")), _f(pope.get("yes_ratio")), _f(ch.get("chair_s")), r["unparsed"]])
    return _table(["sigma", "n", "accuracy", "mean H", "median H", "H correct", "H wrong", f"frac H<={low:g}",
                   f"acc at H<={low:g}", f"errors at H<={low:g}", "ECE", "F1", "yes-ratio", "CHAIR_s", "unparsed"], rows)


def _bins_table(diag: dict) -> str:
    sig = diag["sigmas"]
    labels = [b["label"] for b in diag["per_sigma"][sigma_key(sig[0])]["entropy_bins"]]
    rows = []
    for s in sig:
        bins = diag["per_sigma"][sigma_key(s)]["entropy_bins"]
        rows.append([f"{float(s):g}"] + [f"{_f(b['accuracy'])} (n={b['count']})" for b in bins])
    return _table(["sigma"] + [f"acc {lab}" for lab in labels], rows)


def _pope_table(diags: Dict[str, dict], model_column: bool = True) -> str:
    rows = []
    for name, d in diags.items():
        for s in d["sigmas"]:
            pope = d["per_sigma"][sigma_key(s)].get("pope") or {}
            for split in sorted(k for k in pope if k != "all") + (["all"] if "all" in pope else []):
                m = pope[split]
                rows.append(([name] if model_column else []) +
                            [f"{float(s):g}", split, m["n"], _f(m["accuracy"]), _f(m["precision"]),
                             _f(m["recall"]), _f(m["f1"]), _f(m["yes_ratio"])])
    head = ["sigma", "split", "n", "accuracy", "precision", "recall", "F1", "yes-ratio"]
    return _table((["model"] if model_column else []) + head, rows, ("l" if model_column else "") + "llrrrrrr")


def diagnosis_markdown(diag: dict, title: str = "Confidence-trap diagnosis", plots: Sequence[str] = (),
                       level: int = 2, pope: bool = True) -> str:
    """One diagnosis as markdown: verdict, per-sigma table, entropy bins, POPE per split (``pope``), plots."""
    h = "#" * level
    sig = diag["sigmas"]
    per = [diag["per_sigma"][sigma_key(s)] for s in sig]
    low = diag.get("meta", {}).get("low_entropy", 0.3)
    label, sentence = trap_verdict(diag)
    lines = [f"{h} {title}", ""]
    lines.append(f"- Verdict: **{label}**: {sentence}.")
    lines.append("- " + trend_sentence("Accuracy", [r["accuracy"] for r in per], sig, tol=0, ns=[r["n"] for r in per]) + ".")
    lines.append("- " + trend_sentence("Mean answer-token entropy", [r["mean_entropy"] for r in per], sig,
                                       tol=ENTROPY_TOL, unit=" nats") + ".")
    lines.append("- " + trend_sentence(f"The share of answers with H <= {low:g}", [r["low_entropy_frac"] for r in per],
                                       sig, tol=0.02) + ".")
    lines.append("- " + trend_sentence("ECE", [r["ece"] for r in per], sig, tol=0.02) + ".")
    if all(r.get("chair") for r in per):
        lines.append("- " + trend_sentence("CHAIR_s (captions naming a digit that is not there)",
                                           [r["chair"]["chair_s"] for r in per], sig, tol=0.02) + ".")
    lines += ["", _sigma_table(diag), "", f"Accuracy per answer-token entropy bin (nats):", "", _bins_table(diag), ""]
    if pope and all(r.get("pope") for r in per):
        lines += ["POPE per split (\"yes\" is the positive class):", "", _pope_table({"model": diag}, False), ""]
    for p in plots:
        lines.append(f"![{os.path.splitext(os.path.basename(p))[0]}]({p})")
    if plots:
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _smooth(xs: Sequence[float], w: int) -> List[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > w:
            acc.pop(0)
        vals = [a for a in acc if a is not None and math.isfinite(a)]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


CURVE_KEYS = (("reward", "reward (weighted sum)"), ("entropy", "token entropy of rollouts (nats)"),
              ("gate/kept_frac", "kept fraction of groups"), ("rewards/yes_no/mean", "answer correct (yes_no)"),
              ("kl", "KL to reference (k3)"), ("beta", "KL coefficient beta"))


def _colors(names: Sequence[str], colors: Optional[Dict[str, str]]) -> Dict[str, str]:
    colors = dict(colors or {})
    for i, n in enumerate(names):
        colors.setdefault(n, f"C{i}")
    return colors


def plot_training_curves(training: Dict[str, List[dict]], path: str, smooth: int = 10,
                         colors: Optional[Dict[str, str]] = None) -> str:
    """reward / entropy / kept fraction / yes_no / KL / beta vs step per run (raw thin, moving average thick).
    colors: model name -> matplotlib color (default C0, C1, ... in order)."""
    from matplotlib.figure import Figure

    colors = _colors(list(training), colors)
    fig = Figure(figsize=(12, 6.8))
    fig.subplots_adjust(hspace=0.45, wspace=0.25)
    for i, (key, label) in enumerate(CURVE_KEYS):
        ax = fig.add_subplot(2, 3, i + 1)
        for j, (name, rows) in enumerate(training.items()):
            steps = [r.get("step", k + 1) for k, r in enumerate(rows)]
            ys = [r.get(key) for r in rows]
            ys = [float("nan") if y is None else float(y) for y in ys]
            color = colors[name]
            ax.plot(steps, ys, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, _smooth(ys, smooth), color=color, lw=1.8, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"RL training curves (thin: per step, thick: {smooth}-step moving average)", fontsize=10)
    return _save_fig(fig, path)


def plot_sft_loss(losses: Sequence[float], path: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, color="C0")
    ax.plot(range(1, len(losses) + 1), _smooth(list(losses), 20), lw=1.6, color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("cross-entropy (target tokens)")
    ax.set_title("Supervised warm-start loss")
    return _save_fig(fig, path)


def plot_comparison(diags: Dict[str, dict], path: str, colors: Optional[Dict[str, str]] = None) -> str:
    """Mean answer entropy, accuracy, mean confidence, share of errors at low entropy and ECE vs sigma, one line
    per model. colors: model name -> matplotlib color (default C0, C1, ... in order)."""
    from matplotlib.figure import Figure

    colors = _colors(list(diags), colors)
    low = next(iter(diags.values())).get("meta", {}).get("low_entropy", 0.3) if diags else 0.3
    panels = (("mean_entropy", "mean answer-token entropy (nats)"), ("accuracy", "accuracy"),
              ("mean_confidence", "mean confidence (p of answer)"),
              ("confident_error_frac", f"share of errors with H <= {low:g}"), ("ece", "ECE"))
    fig = Figure(figsize=(16, 3.4))
    fig.subplots_adjust(wspace=0.3)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, d in diags.items():
            xs = [float(s) for s in d["sigmas"]]
            ax.plot(xs, [d["per_sigma"][sigma_key(s)].get(key, float("nan")) for s in xs], marker="o", color=colors[name],
                    label=name)
        ax.set_xlabel("noise sigma")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        if key != "mean_entropy":
            ax.set_ylim(0, 1.02)
        if i == 0:
            ax.legend(fontsize=7)
    return _save_fig(fig, path)


# ----------------------------------------------------------------------------------------------
# the demo report
# ----------------------------------------------------------------------------------------------
def _yaml(d) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=110).rstrip()


def _last_mean(rows: List[dict], key: str, n: int = 10) -> Optional[float]:
    vals = [r.get(key) for r in rows[-n:]]
    vals = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _comparison_table(diags: Dict[str, dict], base: str) -> str:
    rows = []
    b = diags.get(base)
    for name, d in diags.items():
        for s in d["sigmas"]:
            r = d["per_sigma"][sigma_key(s)]
            pope = (r.get("pope") or {})
            adv = pope.get("adversarial") or pope.get("all") or {}
            delta = ""
            if b is not None and name != base and sigma_key(s) in b["per_sigma"]:
                rb = b["per_sigma"][sigma_key(s)]
                dd, significant = accuracy_change(rb["accuracy"], rb["n"], r["accuracy"], r["n"])
                delta = f"{dd:+.3f}" + ("" if significant else " (noise)")
            rows.append([name, f"{float(s):g}", _f(r["accuracy"]), delta, _f(r["mean_entropy"]), _f(r["low_entropy_frac"]),
                         _f(r["confident_error_frac"]), _f(r["ece"]), _f(adv.get("f1")), _f(adv.get("yes_ratio")),
                         _f((r.get("chair") or {}).get("chair_s"))])
    return _table(["model", "sigma", "accuracy", f"vs {base}", "mean H", "frac H<=low", "errors at H<=low", "ECE",
                   "F1 (adversarial)", "yes-ratio (adv.)", "CHAIR_s"], rows, "llrrrrrrrrr")


def _pair_sentences(diags: Dict[str, dict], a: str, b: str) -> List[str]:
    """Per-sigma comparison sentences of model a vs model b."""
    out = []
    da, db = diags[a], diags[b]
    for s in da["sigmas"]:
        k = sigma_key(s)
        if k not in db["per_sigma"]:
            continue
        ra, rb = da["per_sigma"][k], db["per_sigma"][k]
        d, significant = accuracy_change(rb["accuracy"], rb["n"], ra["accuracy"], ra["n"])
        acc = (f"accuracy {_f(ra['accuracy'])} vs {_f(rb['accuracy'])} "
               + (f"({'higher' if d > 0 else 'lower'} by {abs(d):.3f})" if significant else "(within sampling noise)"))
        dH = ra["mean_entropy"] - rb["mean_entropy"]
        ent = (f"mean answer entropy {_f(ra['mean_entropy'])} vs {_f(rb['mean_entropy'])} nats"
               + ("" if abs(dH) >= ENTROPY_TOL else " (about equal)"))
        ce = f"errors at low entropy {100 * ra['confident_error_frac']:.0f}% vs {100 * rb['confident_error_frac']:.0f}%"
        ece = f"ECE {_f(ra['ece'])} vs {_f(rb['ece'])}"
        out.append(f"sigma={float(s):g}: {a} vs {b}: {acc}; {ent}; {ce}; {ece}.")
    return out


def render_report(summary: dict) -> str:
    """The demo's report.md text from its summary dict (see hero.experiments.confidence_trap.demo for the keys)."""
    cfg = summary["config"]
    diags: Dict[str, dict] = summary["diagnoses"]
    training: Dict[str, List[dict]] = summary.get("training", {})
    plots: Dict[str, object] = summary.get("plots", {})
    timings: Dict[str, float] = summary.get("timings", {})
    env = summary.get("environment", {})
    runs = list(summary.get("runs", {}).keys())
    base = "sft"
    L: List[str] = ["# Confidence-trap demo report", ""]
    L.append("Generated by `hero.experiments.confidence_trap.demo` from the numbers in `summary.json` (regenerate with "
             "`python -m hero.experiments.confidence_trap.report summary.json`). Every trend sentence below is computed from the tables "
             "with the rules in the *How to read this* section; nothing is a pre-written story.")
    L.append("")

    # ---------------- findings
    L += ["## Findings", ""]
    verdicts = {n: trap_verdict(d)[0] for n, d in diags.items()}
    sig = next(iter(diags.values()))["sigmas"] if diags else []
    if verdicts:
        L.append(f"- Verdicts over sigma {float(sig[0]):g} -> {float(sig[-1]):g}: "
                 + ", ".join(f"`{n}`: **{v}**" for n, v in verdicts.items()) + " (rules in *How to read this*).")
    if base in diags:
        label, sent = trap_verdict(diags[base])
        L.append(f"- **Warm-started model (SFT, clean images only)**: {label}: {sent}.")
    for name in runs:
        if name in diags:
            label, sent = trap_verdict(diags[name])
            L.append(f"- **After RL `{name}`**: {label}: {sent}.")
    if base in diags:
        for name in runs:
            if name not in diags:
                continue
            d0, d1 = diags[base], diags[name]
            s_hi = sigma_key(d0["sigmas"][-1])
            if s_hi in d1["per_sigma"]:
                r0, r1 = d0["per_sigma"][s_hi], d1["per_sigma"][s_hi]
                dd, significant = accuracy_change(r0["accuracy"], r0["n"], r1["accuracy"], r1["n"])
                dH = r1["mean_entropy"] - r0["mean_entropy"]
                L.append(f"- RL `{name}` vs the warm start at sigma={float(d0['sigmas'][-1]):g}: accuracy "
                         f"{_f(r0['accuracy'])} -> {_f(r1['accuracy'])} "
                         + (f"({'up' if dd > 0 else 'down'} {abs(dd):.3f})" if significant else "(within sampling noise)")
                         + f"; mean answer entropy {_f(r0['mean_entropy'])} -> {_f(r1['mean_entropy'])} nats "
                         + ("(flat)" if abs(dH) < ENTROPY_TOL else f"({'rose' if dH > 0 else 'fell'})")
                         + f"; share of answers with H <= low {_f(r0['low_entropy_frac'])} -> {_f(r1['low_entropy_frac'])}"
                         + f"; ECE {_f(r0['ece'])} -> {_f(r1['ece'])}.")
    if "hero" in diags and "grpo" in diags:
        L.append("- HERO vs vanilla GRPO (same steps, G, lr, seed, rollouts' data):")
        L += [f"  - {s}" for s in _pair_sentences(diags, "hero", "grpo")]
    for name in runs:
        if name not in ("hero", "grpo") and name in diags and "hero" in diags:
            L.append(f"- Ablation `{name}` vs `hero`:")
            L += [f"  - {s}" for s in _pair_sentences(diags, name, "hero")]
    for item in summary.get("not_run", []):
        L.append(f"- Not run: **{item['name']}**: {item['reason']}")
    L.append("")

    # ---------------- setup
    data = cfg["data"]
    sft = summary.get("sft", {})
    L += ["## Setup", ""]
    L.append(f"- Task: digits-POPE (`hero.experiments.confidence_trap.digits_pope`): {data['k']} handwritten digits per 8x{8 * data['k']} image, "
             "\"Is there a 7 in the image?\", half yes / half no, three POPE splits (random / popular / adversarial "
             "negatives). Train and test images come from disjoint source digits.")
    L.append(f"- Model: tiny VLM (`hero.experiments.confidence_trap.tiny_vlm`), {summary.get('model_parameters', '?')} parameters, random init, "
             f"offline tokenizer; sizes {json.dumps(cfg['model'])}.")
    L.append(f"- Warm start: {sft.get('steps', 0)} SFT steps (batch {cfg['sft']['batch_size']}, AdamW lr "
             f"{cfg['sft']['lr']:g}) on {sft.get('examples', 0)} examples at sigma {cfg['sft']['sigmas']}; target "
             "`<think>I see 3, 1, 4.</think><answer>no</answer>`; loss "
             f"{_f(sft.get('loss_first'))} -> {_f(sft.get('loss_last'))}.")
    L.append(f"- Diagnosis: {data['test_per_split']} questions per split x 3 splits per sigma in {data['sigmas']}; greedy "
             "decoding; entropy (nats) of the full next-token distribution at the answer token; confidence = "
             "probability of the emitted answer token.")
    rl = cfg["rl"]
    L.append(f"- RL: {rl.get('steps')} steps x {rl.get('batch_size')} prompts x G={rl.get('generation', {}).get('num_generations')} "
             f"completions, lr {rl.get('lr')}, rewards {rl.get('rewards', {}).get('funcs')} weights "
             f"{rl.get('rewards', {}).get('weights')}, rollouts on {data['rl_per_split']} x 3 splits per sigma in "
             f"{data['rl_sigmas']}; every run starts from the same warm-started weights with the same seed.")
    L.append("- Runs (overrides of the shared `rl` config):")
    for name, ov in summary.get("runs", {}).items():
        L.append(f"  - `{name}`: {json.dumps(ov) if ov else '(none: HERO as configured)'}")
    L.append("")

    # ---------------- comparison
    L += ["## All models per sigma", "",
          f"Accuracy deltas are vs `{base}`; \"(noise)\" marks a difference below two standard errors. "
          "\"errors at H<=low\": share of the wrong answers given with answer entropy <= the low threshold.", "",
          _comparison_table(diags, base), ""]
    if plots.get("comparison"):
        L += [f"![comparison]({plots['comparison']})", ""]

    # ---------------- training
    if training:
        L += ["## RL training", ""]
        rows = []
        for name, tr in training.items():
            rows.append([name, len(tr), _f(_last_mean(tr, "reward")), _f(_last_mean(tr, "rewards/yes_no/mean")),
                         _f(_last_mean(tr, "entropy")), _f(_last_mean(tr, "gate/kept_frac")), _f(_last_mean(tr, "kl")),
                         _f(_last_mean(tr, "beta"), 4), _f(timings.get(f"rl/{name}"), 1)])
        L.append(_table(["run", "steps", "reward (last 10)", "yes_no (last 10)", "entropy (last 10)",
                         "kept frac (last 10)", "KL (last 10)", "beta (last 10)", "seconds"], rows))
        L.append("")
        for name, tr in training.items():
            a, b = _first_mean(tr, "entropy"), _last_mean(tr, "entropy")
            if a is not None and b is not None and len(tr) >= 2:
                # rollout entropies average mostly near-deterministic format tokens (~0.05-0.1 nats): judge the
                # change relative to the starting value (flat below 10%), not by the answer-entropy tolerance
                verb = ("stayed flat" if abs(b - a) < 0.1 * abs(a) else ("rose" if b > a else "fell"))
                L.append(f"- `{name}`: rollout token entropy {verb} over training: {_f(a)} (first 10 steps) -> "
                         f"{_f(b)} nats (last 10 steps).")
        L.append("")
        if plots.get("training_curves"):
            L += [f"![training curves]({plots['training_curves']})", ""]
        if plots.get("sft_loss"):
            L += [f"![SFT loss]({plots['sft_loss']})", ""]

    # ---------------- per-model sections
    L += ["## Per-model diagnosis", ""]
    for name, d in diags.items():
        L.append(diagnosis_markdown(d, title=f"`{name}`", plots=plots.get("per_model", {}).get(name, []), level=3,
                                    pope=False))  # all models' POPE tables are in one section below

    # ---------------- POPE
    if all(d["per_sigma"][sigma_key(d["sigmas"][0])].get("pope") for d in diags.values()):
        L += ["## POPE per split", "", "\"yes\" is the positive class; yes-ratio = share of \"yes\" answers.", "",
              _pope_table(diags), ""]

    # ---------------- how to read
    L += ["## How to read this", "",
          "- Accuracy changes are called significant only when larger than two standard errors of the difference "
          "(binomial, `2 * sqrt(p1(1-p1)/n1 + p2(1-p2)/n2)`); smaller ones are reported as sampling noise.",
          f"- Mean entropy moves smaller than {ENTROPY_TOL:g} nats are called flat (shares and ECE: 0.02).",
          "- Verdict \"trap\": accuracy falls significantly from the lowest to the highest sigma while the mean "
          "confidence (probability of the emitted answer token) falls by less than half as much (a calibrated model's "
          "confidence falls as much as its accuracy): the model is nearly as sure as before while more often wrong. "
          "\"uncertainty signalled\": confidence falls by at least half the accuracy drop. \"no accuracy loss\": the "
          "noise did not hurt this model enough to tell. The overconfidence gap is mean confidence minus accuracy.",
          "- The rollout token entropy in the training curves averages every completion token (most are the "
          "deterministic format; its change is called flat below 10% of the starting value); the diagnosis "
          "measures the single answer token.",
          "- One seed per run: differences between RL runs can depend on it (rerun with `--seed N` to check).", ""]

    # ---------------- timings and environment
    L += ["## Timings", ""]
    L.append(_table(["stage", "seconds"], [[k, _f(v, 1)] for k, v in timings.items()]))
    L.append("")
    if env:
        L.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) + ".")
        L.append("")

    # ---------------- config
    L += ["## Exact configuration", "", "Demo config (after command-line overrides):", "", "```yaml", _yaml(cfg), "```", ""]
    rcfg = summary.get("rl_configs", {})
    if rcfg:
        first = next(iter(rcfg))
        L += [f"Resolved trainer config of `{first}` (the other runs differ only by their overrides above):", "",
              "```yaml", _yaml(rcfg[first]), "```", ""]
    L += ["Command: `" + summary.get("command", "python -m hero.experiments.confidence_trap.demo") + "`", ""]
    return "\n".join(L)


def _first_mean(rows: List[dict], key: str, n: int = 10) -> Optional[float]:
    return _last_mean(rows[:n], key, n)


def write_report(summary: dict, out_dir: str, name: str = "report.md") -> str:
    """Render ``render_report(summary)`` into ``out_dir/name`` atomically; returns the path."""
    return atomic_write_text(os.path.join(out_dir, name), render_report(summary))


def render_plots(summary: dict, out_dir: str) -> List[str]:
    """Re-draw every demo plot from a summary dict (comparison, training curves, SFT loss, per-model plots)."""
    from hero.experiments.confidence_trap.diagnostics import Diagnosis

    diags = summary["diagnoses"]
    colors = {n: f"C{i}" for i, n in enumerate(diags)}
    plots = os.path.join(out_dir, "plots")
    paths = [plot_comparison(diags, os.path.join(plots, "comparison.png"), colors=colors)]
    if summary.get("training"):
        paths.append(plot_training_curves(summary["training"], os.path.join(plots, "training_curves.png"), colors=colors))
    if summary.get("sft", {}).get("losses"):
        paths.append(plot_sft_loss(summary["sft"]["losses"], os.path.join(plots, "sft_loss.png")))
    for name, d in diags.items():
        paths += Diagnosis(sigmas=[float(x) for x in d["sigmas"]], per_sigma=d["per_sigma"],
                           meta=d.get("meta", {})).save_plots(plots, prefix=f"{name}_")
    return paths


def main(argv: Optional[List[str]] = None) -> int:  # python -m hero.experiments.confidence_trap.report summary.json [out_dir] [--plots]
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m hero.experiments.confidence_trap.report SUMMARY.json [OUT_DIR] [--plots]\n"
              "re-renders report.md (and with --plots every PNG) from a demo's summary.json")
        return 0 if argv else 2
    plots = "--plots" in argv
    argv = [a for a in argv if a != "--plots"]
    with open(argv[0], encoding="utf-8") as f:
        summary = json.load(f)
    out = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(argv[0]))
    if plots:
        for p in render_plots(summary, out):
            print(p)
    print(write_report(summary, out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
