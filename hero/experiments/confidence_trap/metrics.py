"""Evaluation metrics: answer parsing, POPE scores, calibration (ECE), accuracy per entropy bin, CHAIR.

Everything here is plain Python / NumPy (no torch) so it can score predictions from any source.

Answer parsing
--------------
Model outputs are scored from the ``<answer>...</answer>`` tag (``parse_answer(text)``), never from the
first sentence: a chain of thought such as ``<think>Is there a 7? No wait, yes</think>`` must not decide the
answer. A text without a complete tag is ``"unparsed"``: it is counted as wrong and reported as a count.
For models that were never taught the tag (off-the-shelf VLMs prompted "Answer yes or no."), use
``parse_answer(text, mode="yesno")``, which takes the first standalone "yes"/"no" word.
The parser lives in ``hero.rewards`` (the ``yes_no`` reward uses the same one) and is re-exported here.

POPE conventions (``pope_metrics``)
-----------------------------------
"yes" is the positive class. A prediction that is neither "yes" nor "no" (``"unparsed"`` or free text) is
never a "yes": it is a false negative when the gold answer is "yes", and an error that is *not* a true
negative when the gold answer is "no". So ``accuracy = (tp + tn) / n`` counts it as wrong, and the counts
``unparsed`` / ``invalid`` say how many there were. Empty denominators give 0.0 (precision with no predicted
"yes", recall with no gold "yes").

Bins
----
* ECE uses ``n_bins`` equal-width confidence bins ``[i/n, (i+1)/n)``, the last one closed at 1.0
  (bin index ``floor(conf * n_bins)``, which puts 0.3 in ``[0.3, 0.4)`` despite float rounding).
* Entropy bins use explicit edges, right-closed, the first one starting at 0 inclusive: with the default
  ``ENTROPY_EDGES = (0, 0.3, 0.7, 1.2, inf)`` the bins are ``H <= 0.3``, ``0.3 < H <= 0.7``,
  ``0.7 < H <= 1.2``, ``H > 1.2`` (entropy in nats).
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from hero.rewards import UNPARSED, normalize_yes_no, parse_answer  # one answer parser, shared with the rewards

__all__ = [
    "UNPARSED",
    "ENTROPY_EDGES",
    "parse_answer",
    "normalize_yes_no",
    "pope_metrics",
    "pope_metrics_by_split",
    "reliability_bins",
    "expected_calibration_error",
    "entropy_bin_labels",
    "entropy_bin_index",
    "accuracy_by_entropy_bin",
    "chair",
    "mentioned_digits",
]

#: Default answer-token entropy bin edges in nats (right-closed bins; first bin is ``H <= 0.3``).
ENTROPY_EDGES = (0.0, 0.3, 0.7, 1.2, math.inf)

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _check_gold(answers: Sequence[str]) -> List[str]:
    gold = []
    for i, a in enumerate(answers):
        g = str(a).strip().lower()
        if g not in ("yes", "no"):
            raise ValueError(f"answers[{i}] must be 'yes' or 'no' for POPE scoring, got {a!r}")
        gold.append(g)
    return gold


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> Dict[str, float]:
    """POPE scores with "yes" as the positive class.

    predictions: parsed predictions ("yes", "no", "unparsed" or other free text); answers: gold "yes"/"no".
    Returns a dict: n, accuracy, precision, recall, f1, yes_ratio (fraction of predictions that are "yes"),
    tp, fp, tn, fn, unparsed (count of "unparsed"), invalid (count of other non yes/no predictions).
    See the module docstring for how unparsed/invalid predictions are counted.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"predictions ({len(predictions)}) and answers ({len(answers)}) differ in length")
    gold = _check_gold(answers)
    tp = fp = tn = fn = unparsed = invalid = 0
    for p, g in zip(predictions, gold):
        p = str(p).strip().lower()
        if p == "yes":
            if g == "yes":
                tp += 1
            else:
                fp += 1
        elif p == "no":
            if g == "no":
                tn += 1
            else:
                fn += 1
        else:
            if p == UNPARSED:
                unparsed += 1
            else:
                invalid += 1
            if g == "yes":
                fn += 1  # a missed positive, whatever was written
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": unparsed,
        "invalid": invalid,
    }


def pope_metrics_by_split(
    predictions: Sequence[str], answers: Sequence[str], splits: Optional[Sequence[str]] = None
) -> Dict[str, Dict[str, float]]:
    """``pope_metrics`` overall (key "all") and per split (keys = split names, sorted).

    splits: the split of each example ("random" / "popular" / "adversarial" / ...); None -> only "all".
    """
    out = {"all": pope_metrics(predictions, answers)}
    if splits is None:
        return out
    if len(splits) != len(answers):
        raise ValueError(f"splits ({len(splits)}) and answers ({len(answers)}) differ in length")
    for name in sorted(set(splits)):
        if name == "all":
            raise ValueError("splits must not contain the reserved name 'all'")
        idx = [i for i, s in enumerate(splits) if s == name]
        out[name] = pope_metrics([predictions[i] for i in idx], [answers[i] for i in idx])
    return out


def _as_conf_correct(confidences, correct):
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(f"confidences ({conf.shape[0]}) and correct ({corr.shape[0]}) differ in length")
    if conf.size and (not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must be finite and in [0, 1]")
    return conf, corr


def reliability_bins(confidences, correct, n_bins: int = 10) -> List[Dict[str, Optional[float]]]:
    """Equal-width confidence bins for a reliability diagram.

    confidences: [N] in [0, 1]; correct: [N] bool/0-1. Bin i is [i/n_bins, (i+1)/n_bins) (the last bin
    includes 1.0). Returns one dict per bin: lo, hi, count, mean_confidence, accuracy (None when empty).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, corr = _as_conf_correct(confidences, correct)
    idx = np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = idx == b
        c = int(sel.sum())
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": c,
                "mean_confidence": float(conf[sel].mean()) if c else None,
                "accuracy": float(corr[sel].mean()) if c else None,
            }
        )
    return bins


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) * |accuracy_b - mean_confidence_b| over equal-width bins (``reliability_bins``).

    Returns 0.0 for empty input.
    """
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return float(
        sum(b["count"] / total * abs(b["accuracy"] - b["mean_confidence"]) for b in bins if b["count"])
    )


def _check_edges(edges: Sequence[float]) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0) or np.isnan(e).any():
        raise ValueError(f"edges must be a strictly increasing sequence of >= 2 numbers, got {edges!r}")
    return e


def entropy_bin_labels(edges: Sequence[float] = ENTROPY_EDGES) -> List[str]:
    """Human-readable labels, e.g. ["H<=0.3", "0.3<H<=0.7", "0.7<H<=1.2", "H>1.2"]."""
    e = _check_edges(edges)
    labels = []
    for i in range(e.size - 1):
        lo, hi = e[i], e[i + 1]
        if i == 0:
            labels.append(f"H<={hi:g}" if lo <= 0 else f"{lo:g}<=H<={hi:g}")
        elif math.isinf(hi):
            labels.append(f"H>{lo:g}")
        else:
            labels.append(f"{lo:g}<H<={hi:g}")
    return labels


def entropy_bin_index(entropies, edges: Sequence[float] = ENTROPY_EDGES) -> np.ndarray:
    """Bin index of each entropy for right-closed bins (lo, hi], the first bin [e0, e1].

    Values below the first edge (e.g. -1e-12 from rounding) go to bin 0, above the last to the last bin.
    """
    e = _check_edges(edges)
    h = np.asarray(entropies, dtype=np.float64).reshape(-1)
    if np.isnan(h).any():
        raise ValueError("entropies contain NaN")
    idx = np.searchsorted(e, h, side="left") - 1
    return np.clip(idx, 0, e.size - 2)


def accuracy_by_entropy_bin(
    entropies, correct, edges: Sequence[float] = ENTROPY_EDGES
) -> List[Dict[str, Optional[float]]]:
    """Accuracy per answer-token entropy bin.

    entropies: [N] nats; correct: [N] bool/0-1. Returns one dict per bin: label, lo, hi, count,
    fraction (count / N), accuracy and mean_entropy (None when the bin is empty).
    """
    e = _check_edges(edges)
    h = np.asarray(entropies, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if h.shape != corr.shape:
        raise ValueError(f"entropies ({h.shape[0]}) and correct ({corr.shape[0]}) differ in length")
    idx = entropy_bin_index(h, e)
    out = []
    for b, label in enumerate(entropy_bin_labels(e)):
        sel = idx == b
        c = int(sel.sum())
        out.append(
            {
                "label": label,
                "lo": float(e[b]),
                "hi": float(e[b + 1]),
                "count": c,
                "fraction": c / h.size if h.size else 0.0,
                "accuracy": float(corr[sel].mean()) if c else None,
                "mean_entropy": float(h[sel].mean()) if c else None,
            }
        )
    return out


def chair(
    mentioned: Sequence[Iterable], ground_truth: Sequence[Iterable], unique: bool = True
) -> Dict[str, float]:
    """CHAIR hallucination rates (object-mention and caption level, as the POPE/CHAIR literature defines them).

    mentioned[i]: objects mentioned in caption i; ground_truth[i]: objects really in image i.
    CHAIR_i = hallucinated mentions / all mentions; CHAIR_s = captions with >= 1 hallucinated mention /
    captions. unique=True counts each object once per caption (a caption naming "dog" twice is one mention).
    Empty denominators give 0.0. Returns chair_i, chair_s, mentions, hallucinated, captions,
    hallucinated_captions.
    """
    if len(mentioned) != len(ground_truth):
        raise ValueError(f"mentioned ({len(mentioned)}) and ground_truth ({len(ground_truth)}) differ in length")
    n_ment = n_hal = n_hal_caps = 0
    for objs, gt in zip(mentioned, ground_truth):
        objs = list(objs)
        if unique:
            objs = list(dict.fromkeys(objs))
        gt = set(gt)
        hal = sum(1 for o in objs if o not in gt)
        n_ment += len(objs)
        n_hal += hal
        n_hal_caps += hal > 0
    n_caps = len(mentioned)
    return {
        "chair_i": n_hal / n_ment if n_ment else 0.0,
        "chair_s": n_hal_caps / n_caps if n_caps else 0.0,
        "mentions": n_ment,
        "hallucinated": n_hal,
        "captions": n_caps,
        "hallucinated_captions": n_hal_caps,
    }


def mentioned_digits(text: str) -> List[int]:
    """Digits a digits-POPE output claims to see: the single digits inside the last ``<think>...</think>``
    (e.g. "<think>I see 3, 1, 4.</think>..." -> [3, 1, 4]); [] when there is no complete think tag.
    Feed these to ``chair`` with the example's ``digits`` as ground truth.
    """
    bodies = _THINK_RE.findall(text)
    if not bodies:
        return []
    return [int(d) for d in re.findall(r"(?<!\d)\d(?!\d)", bodies[-1])]
