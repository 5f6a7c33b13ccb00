"""Digits-POPE: a POPE-style object-existence task built offline from scikit-learn's handwritten digits.

Each image composes ``k`` distinct digits (8x8 source images from ``sklearn.datasets.load_digits``, values
0..16 scaled to 0..255 uint8) in a row (``layout="row"``: 8 x 8k) or a square grid (``layout="grid"``:
ceil(sqrt k) cells a side, unused cells blank), optionally upscaled by an integer factor (nearest).
Each example asks ``"Is there a 7 in the image?"``; exactly half of each split is "yes" (a present digit)
and half "no" (an absent digit).

Co-occurrence structure (fixed, so "popular" and "adversarial" mean something)
------------------------------------------------------------------------------
* Marginal popularity: the first digit of a composition is drawn from ``POPULARITY`` (1 and 7 most often).
  Ties in the statistics below are broken toward the smaller digit.
* Pairs: ``PAIRS`` = (0,6), (1,7), (2,5), (3,8), (4,9). Each further digit is, with probability
  ``pair_prob``, the partner of a digit already present (when that partner is absent), else drawn from
  the absent digits by popularity. So partners co-occur far more often than other digit pairs.
* ``digit_statistics(k, pair_prob)`` gives the exact digit frequencies and co-occurrence matrix of this
  process (seed-independent, cached).

Negative ("no") question digit per split, POPE-style:
* ``random``: an absent digit, uniformly.
* ``popular``: the absent digit with the highest overall frequency.
* ``adversarial``: the absent digit that co-occurs most often with the present ones
  (argmax over absent d of sum_{p present} C[p, d]).
The three splits share the same compositions and the same "yes" questions; only the "no" digit differs.

No leakage: the 1797 source images are split once (``split_seed``, stratified by digit, ``test_frac``) into
train and test pools; ``subset="train"`` only draws from the train pool and ``subset="test"`` from the test pool.

Noise: ``add_noise`` adds Gaussian pixel noise of std ``sigma`` on the 0..255 scale, rounded and clipped,
seeded per example from (seed, sigma, example id), so it is reproducible and independent of order.

Example dict keys: image (uint8 [H, W]), question (str), answer ("yes"|"no"), digits (list[int], reading
order), split (random|popular|adversarial), id (str, unique), plus subset ("train"|"test"), query (int, the
asked digit) and sigma (float). ``cot_target(ex)`` gives the warm-start text
``<think>I see 3, 1, 4.</think><answer>no</answer>``.
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = [
    "SPLITS",
    "SIGMAS",
    "sigma_key",
    "PAIRS",
    "POPULARITY",
    "build_digits_pope",
    "digit_statistics",
    "image_shape",
    "add_noise",
    "with_noise",
    "question_text",
    "cot_target",
    "answer_target",
    "source_split",
]

SPLITS = ("random", "popular", "adversarial")
#: Noise levels of the confidence-trap study (std on the 0..255 scale).
SIGMAS = (0.0, 30.0, 50.0)
PAIRS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9))
#: Marginal weights of the first digit (sums to 1).
POPULARITY = (0.07, 0.14, 0.08, 0.10, 0.08, 0.09, 0.07, 0.14, 0.11, 0.12)

_PARTNER = np.empty(10, dtype=np.int64)
for _a, _b in PAIRS:
    _PARTNER[_a], _PARTNER[_b] = _b, _a
_POP = np.asarray(POPULARITY, dtype=np.float64)
_POP = _POP / _POP.sum()


@functools.lru_cache(maxsize=1)
def sigma_key(sigma: float) -> str:
    """The key of a noise level in per-sigma dicts and JSON: 0 -> "0", 30.0 -> "30", 12.5 -> "12.5"."""
    return f"{float(sigma):g}"


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] scaled 0..255, targets int64 [1797]); sklearn ships the data, no download."""
    import importlib.util
    import os

    # Read sklearn's bundled CSV directly when we can find it: importing sklearn costs ~1.5 s (scipy),
    # the file itself loads in ~40 ms. Same data as sklearn.datasets.load_digits().
    spec = importlib.util.find_spec("sklearn")
    csv = None
    if spec is not None and spec.submodule_search_locations:
        cand = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
        csv = cand if os.path.isfile(cand) else None
    if csv is not None:
        data = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    if images.shape != (1797, 8, 8):
        raise RuntimeError(f"unexpected sklearn digits shape {images.shape}")
    imgs = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return imgs, target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def source_split(test_frac: float = 0.3, split_seed: int = 0) -> Dict[str, Tuple[np.ndarray, ...]]:
    """Indices of source images per digit for each subset: {"train": (idx_digit0, ..., idx_digit9), "test": ...}.

    Stratified by digit; the first ``round(test_frac * n_d)`` of a seeded permutation go to test.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    _, y = _load_digits()
    rng = np.random.default_rng(split_seed)
    train, test = [], []
    for d in range(10):
        idx = np.flatnonzero(y == d)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(test_frac * idx.size))
        test.append(np.sort(idx[:n_test]))
        train.append(np.sort(idx[n_test:]))
    return {"train": tuple(train), "test": tuple(test)}


def _sample_composition(rng: np.random.Generator, k: int, pair_prob: float) -> List[int]:
    """k distinct digits (in sampling order) following the fixed popularity + pair structure."""
    present = [int(rng.choice(10, p=_POP))]
    while len(present) < k:
        open_partners = [int(_PARTNER[p]) for p in present if _PARTNER[p] not in present]
        if open_partners and rng.random() < pair_prob:
            present.append(open_partners[int(rng.integers(len(open_partners)))])
        else:
            absent = np.array([d for d in range(10) if d not in present])
            w = _POP[absent] / _POP[absent].sum()
            present.append(int(rng.choice(absent, p=w)))
    return present


def _transition(present: Tuple[int, ...], pair_prob: float) -> Dict[int, float]:
    """P(next digit | set of present digits) of ``_sample_composition`` (it only depends on the set)."""
    absent = [d for d in range(10) if d not in present]
    open_partners = [int(_PARTNER[p]) for p in present if _PARTNER[p] not in present]
    q = pair_prob if open_partners else 0.0
    w = _POP[absent] / _POP[absent].sum()
    probs = {d: (1.0 - q) * float(wd) for d, wd in zip(absent, w)}
    for d in open_partners:  # each open partner picked uniformly among them
        probs[d] += q / len(open_partners)
    return probs


@functools.lru_cache(maxsize=16)
def digit_statistics(k: int = 3, pair_prob: float = 0.8) -> Tuple[np.ndarray, np.ndarray]:
    """Exact (frequency [10], cooccurrence [10, 10]) of the composition process.

    frequency[d] = P(d in image); cooccurrence[a, b] = P(a and b both in image) (diagonal 0).
    Computed by dynamic programming over digit sets (the sampling step only depends on the set present),
    so it is exact, seed-free and fast; every subset/seed agrees on which digits are "popular" and which
    co-occur.
    """
    states: Dict[Tuple[int, ...], float] = {(d,): float(_POP[d]) for d in range(10)}
    for _ in range(k - 1):
        nxt: Dict[Tuple[int, ...], float] = {}
        for present, p in states.items():
            for d, pd in _transition(present, pair_prob).items():
                key = tuple(sorted(present + (d,)))
                nxt[key] = nxt.get(key, 0.0) + p * pd
        states = nxt
    freq = np.zeros(10)
    co = np.zeros((10, 10))
    for present, p in states.items():
        idx = list(present)
        freq[idx] += p
        co[np.ix_(idx, idx)] += p
    np.fill_diagonal(co, 0.0)
    freq.setflags(write=False)
    co.setflags(write=False)
    return freq, co


def image_shape(k: int = 3, layout: str = "row", upscale: int = 1) -> Tuple[int, int]:
    """(H, W) of a composed image."""
    if layout == "row":
        return 8 * upscale, 8 * k * upscale
    if layout == "grid":
        g = math.ceil(math.sqrt(k))
        return 8 * g * upscale, 8 * g * upscale
    raise ValueError(f"layout must be 'row' or 'grid', got {layout!r}")


def question_text(digit: int) -> str:
    return f"Is there a {int(digit)} in the image?"


def answer_target(example: dict) -> str:
    """``<answer>yes</answer>`` / ``<answer>no</answer>``."""
    return f"<answer>{example['answer']}</answer>"


def cot_target(example: dict) -> str:
    """Warm-start target: ``<think>I see 3, 1, 4.</think><answer>no</answer>`` (digits in reading order)."""
    seen = ", ".join(str(d) for d in example["digits"])
    return f"<think>I see {seen}.</think>{answer_target(example)}"


def _noise_rng(seed: int, sigma: float, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(round(sigma * 1000)), zlib.crc32(key.encode())])


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 image + N(0, sigma^2) per pixel (0..255 scale), rounded and clipped; sigma=0 returns a copy."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    if sigma == 0:
        return img.copy()
    noisy = img.astype(np.float32) + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return np.rint(noisy).clip(0, 255).astype(np.uint8)


def with_noise(examples: Sequence[dict], sigma: float, seed: int = 0) -> List[dict]:
    """Copies of ``examples`` with Gaussian noise of std ``sigma`` added to ``image`` (key ``sigma`` set).

    Works for any example with a uint8 ``image`` array (digits-POPE or loaded JSONL, gray or RGB).
    Noise for an example depends only on (seed, sigma, example id), not on its position in the list.
    """
    out = []
    for i, ex in enumerate(examples):
        key = str(ex.get("id", i))
        new = dict(ex)
        new["image"] = add_noise(ex["image"], float(sigma), _noise_rng(seed, float(sigma), key))
        new["sigma"] = float(sigma)
        out.append(new)
    return out


def _compose(cells: Sequence[np.ndarray], positions: Sequence[int], k: int, layout: str, upscale: int) -> np.ndarray:
    h, w = image_shape(k, layout, 1)
    img = np.zeros((h, w), dtype=np.uint8)
    cols = w // 8
    for cell, pos in zip(cells, positions):
        r, c = divmod(pos, cols)
        img[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = cell
    if upscale > 1:
        img = np.repeat(np.repeat(img, upscale, axis=0), upscale, axis=1)
    return img


def build_digits_pope(
    n_per_split: int = 500,
    *,
    subset: str = "train",
    splits: Sequence[str] = SPLITS,
    sigma: float = 0.0,
    seed: int = 0,
    k: int = 3,
    layout: str = "row",
    upscale: int = 1,
    pair_prob: float = 0.8,
    test_frac: float = 0.3,
    split_seed: int = 0,
) -> List[dict]:
    """Build the digits-POPE examples (deterministic given all arguments).

    n_per_split: examples per split (even: exactly half "yes"; odd: one more "no").
    subset: "train" or "test" (disjoint source images, see ``source_split``).
    splits: any of "random", "popular", "adversarial"; the splits share compositions and "yes" questions.
    sigma: Gaussian pixel noise std (0..255 scale), applied via ``with_noise(examples, sigma, seed)``.
    k: digits per image (2..9); layout "row" (8 x 8k) or "grid"; upscale: integer nearest-neighbour factor.
    Returns a list ordered split by split.
    """
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
    if isinstance(n_per_split, bool) or not isinstance(n_per_split, int) or n_per_split < 1:
        raise ValueError(f"n_per_split must be a positive int, got {n_per_split!r}")
    if not isinstance(k, int) or not 2 <= k <= 9:
        raise ValueError(f"k must be an int in [2, 9], got {k!r}")
    if not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"upscale must be a positive int, got {upscale!r}")
    if not 0.0 <= pair_prob <= 1.0:
        raise ValueError(f"pair_prob must be in [0, 1], got {pair_prob}")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {tuple(splits)!r}")
    image_shape(k, layout, upscale)  # validates layout

    imgs, _ = _load_digits()
    pools = source_split(test_frac, split_seed)[subset]
    freq, co = digit_statistics(k, pair_prob)
    n_cells = image_shape(k, layout, 1)[0] // 8 * (image_shape(k, layout, 1)[1] // 8)

    # One stream for the shared compositions; seeds differ per subset so train/test never share layouts.
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0 if subset == "train" else 1])
    n = n_per_split
    is_yes = np.zeros(n, dtype=bool)
    is_yes[: n // 2] = True
    is_yes = is_yes[rng.permutation(n)]

    base = []
    for i in range(n):
        digits = _sample_composition(rng, k, pair_prob)
        positions = rng.choice(n_cells, size=k, replace=False)
        order = np.argsort(positions)  # reading order (row-major cells)
        digits = [digits[j] for j in order]
        positions = [int(positions[j]) for j in order]
        srcs = [int(pools[d][rng.integers(pools[d].size)]) for d in digits]
        image = _compose([imgs[s] for s in srcs], positions, k, layout, upscale)
        absent = np.array([d for d in range(10) if d not in digits])
        yes_digit = int(digits[rng.integers(k)])
        rand_no = int(absent[rng.integers(absent.size)])
        # Round before argmax so exact ties (1 and 7 are equally popular) go to the smaller digit,
        # not to whichever float summation order happened to win.
        pop_no = int(absent[np.argmax(np.round(freq[absent], 12))])
        adv_no = int(absent[np.argmax(np.round(co[digits][:, absent].sum(0), 12))])
        base.append((image, digits, yes_digit, {"random": rand_no, "popular": pop_no, "adversarial": adv_no}))

    examples = []
    for split in splits:
        for i, (image, digits, yes_digit, nos) in enumerate(base):
            q = yes_digit if is_yes[i] else nos[split]
            examples.append(
                {
                    "image": image.copy(),
                    "question": question_text(q),
                    "answer": "yes" if is_yes[i] else "no",
                    "digits": list(digits),
                    "split": split,
                    "id": f"{subset}-{split}-{i:05d}",
                    "subset": subset,
                    "query": q,
                    "sigma": 0.0,
                }
            )
    if sigma:
        examples = with_noise(examples, float(sigma), seed)
    return examples


def main(argv=None) -> int:
    """``python -m <this module> --jsonl OUT_DIR``: write digits-POPE as the JSONL + PNG format of
    ``hero.data.jsonl`` (``OUT_DIR/<subset>.jsonl`` + ``OUT_DIR/<subset>_images/*.png``), e.g. to train a
    transformers VLM with ``data.name: jsonl`` (configs/vlm_tiny.yaml)."""
    import argparse
    import os

    from hero.data.jsonl import write_jsonl

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0].strip("`: "))
    p.add_argument("--jsonl", required=True, metavar="OUT_DIR", help="output folder (created)")
    p.add_argument("--n-per-split", type=int, default=32, help="examples per POPE split (default 32)")
    p.add_argument("--subset", choices=("train", "test"), default="train")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated subset of random,popular,adversarial")
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian pixel noise std (0..255 scale)")
    p.add_argument("--upscale", type=int, default=4, help="integer upscale of the 8 x 24 images (default 4: 32 x 96)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = tuple(s.strip() for s in a.splits.split(",") if s.strip())
    ex = build_digits_pope(a.n_per_split, subset=a.subset, splits=splits, sigma=a.sigma, seed=a.seed,
                           upscale=a.upscale)
    path = write_jsonl(ex, os.path.join(a.jsonl, f"{a.subset}.jsonl"))
    print(f"wrote {len(ex)} rows to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
