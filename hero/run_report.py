"""What a finished ``hero train`` run says about itself: the end-of-run summary and ``hero plot RUN_DIR``.

Both read ``<run_dir>/metrics.jsonl`` (one JSON object per step, written by ``hero.trainer.MetricsLogger``), so
they cover every step of a resumed run, not only the steps of the last process.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from hero.errors import HeroUserError

__all__ = ["read_metrics", "summarize", "summary_lines", "plot_metrics", "PLOTTED"]

#: (metrics.jsonl key, panel title) drawn by ``plot_metrics``.
PLOTTED = (("reward", "mean reward"), ("entropy", "entropy (nats / token)"), ("kl", "KL to the reference"),
           ("gate/kept_frac", "kept fraction of groups"))


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The step records of ``run_dir/metrics.jsonl`` (lines cut short by a kill are skipped), by step."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise HeroUserError(f"{run_dir}: no metrics.jsonl there; give the --output_dir of a hero train run")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append(rec)
    return sorted(records, key=lambda r: r["step"])


def _mean(values: Sequence[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(records: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """steps, mean reward over the first / last 10% of steps (at least one step each), completion tokens per
    second over the whole run, peak memory (MB), mean kept fraction."""
    n = len(records)
    tail = max(1, math.ceil(0.1 * n))
    tokens = sum(r.get("tokens_per_s", 0.0) * r.get("time/step_s", 0.0) for r in records
                 if r.get("tokens_per_s") is not None and r.get("time/step_s") is not None)
    seconds = sum(r.get("time/step_s") or 0.0 for r in records)
    peaks = [r["peak_memory_mb"] for r in records if isinstance(r.get("peak_memory_mb"), (int, float))]
    return {
        "steps": records[-1]["step"] if records else 0,
        "reward_first": _mean([r.get("reward") for r in records[:tail]]),
        "reward_last": _mean([r.get("reward") for r in records[-tail:]]),
        "tail_steps": tail,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "peak_memory_mb": max(peaks) if peaks else float("nan"),
        "kept_frac": _mean([r.get("gate/kept_frac") for r in records]),
    }


def summary_lines(run_dir: str, final_model: Optional[str] = None) -> List[str]:
    """The few lines ``hero train`` ends with."""
    s = summarize(read_metrics(run_dir))
    lines = [
        f"run summary: {s['steps']} steps; mean reward {s['reward_first']:.3f} (first {s['tail_steps']} steps) -> "
        f"{s['reward_last']:.3f} (last {s['tail_steps']}); kept {s['kept_frac']:.2f} of groups on average; "
        f"{s['tokens_per_s']:.1f} completion tokens/s; peak memory {s['peak_memory_mb']:.0f} MB",
        f"metrics: {os.path.join(run_dir, 'metrics.jsonl')} (plot: hero plot {run_dir})",
    ]
    if final_model:
        lines.append(f"final model: {final_model}")
    return lines


def plot_metrics(run_dir: str, out: Optional[str] = None) -> str:
    """PNG of reward, entropy, KL and kept fraction per step (``PLOTTED``) -> ``out`` (default
    ``<run_dir>/metrics.png``), written atomically; returns its path. Steps without a value (null) are gaps."""
    records = read_metrics(run_dir)
    if not records:
        raise HeroUserError(f"{run_dir}/metrics.jsonl has no steps yet")
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hero.io import atomic_write_bytes

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        ys = [r.get(key) if isinstance(r.get(key), (int, float)) else float("nan") for r in records]
        ax.plot(steps, ys, marker="." if len(steps) < 50 else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)), fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out = out or os.path.join(run_dir, "metrics.png")
    atomic_write_bytes(out, buf.getvalue())
    return out
