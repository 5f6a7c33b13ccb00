"""hero.experiments.confidence_trap.digits_pope and hero.data.jsonl: determinism, balance, splits, leakage, noise, JSONL I/O."""
import json
import os
import time
from collections import Counter

import numpy as np
import pytest

from hero.experiments.confidence_trap import digits_pope as dp
from hero.experiments.confidence_trap.digits_pope import (
    PAIRS,
    SPLITS,
    add_noise,
    build_digits_pope,
    cot_target,
    digit_statistics,
    image_shape,
    source_split,
    with_noise,
)
from hero.data.jsonl import JSONLFormatError, load_jsonl, write_jsonl

PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}


@pytest.fixture(scope="module")
def train():
    return build_digits_pope(200, subset="train", seed=0)


def test_example_format(train):
    assert len(train) == 3 * 200
    assert len({e["id"] for e in train}) == len(train)
    for e in train[:50]:
        assert set(e) >= {"image", "question", "answer", "digits", "split", "id"}
        assert e["image"].dtype == np.uint8 and e["image"].shape == (8, 24)
        assert e["answer"] in ("yes", "no") and e["split"] in SPLITS
        assert len(e["digits"]) == 3 and len(set(e["digits"])) == 3
        assert e["question"] == f"Is there a {e['query']} in the image?"
        assert (e["query"] in e["digits"]) == (e["answer"] == "yes")
    e = train[0]
    d = ", ".join(map(str, e["digits"]))
    assert cot_target(e) == f"<think>I see {d}.</think><answer>{e['answer']}</answer>"
    # 0..16 source values scaled to 0..255 (digit strokes reach 255, background 0)
    assert max(int(x["image"].max()) for x in train) == 255 and min(int(x["image"].min()) for x in train) == 0


def test_deterministic_and_seed_dependent(train):
    again = build_digits_pope(200, subset="train", seed=0)
    for a, b in zip(train, again):
        assert np.array_equal(a["image"], b["image"])
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    other = build_digits_pope(200, subset="train", seed=1)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(train, other))


def test_half_yes_half_no(train):
    for s in SPLITS:
        c = Counter(e["answer"] for e in train if e["split"] == s)
        assert c == {"yes": 100, "no": 100}
    odd = build_digits_pope(7, subset="test", seed=3, splits=("random",))
    assert Counter(e["answer"] for e in odd) == {"yes": 3, "no": 4}


def test_splits_share_compositions_and_yes_questions(train):
    by = {s: [e for e in train if e["split"] == s] for s in SPLITS}
    for r, p, a in zip(by["random"], by["popular"], by["adversarial"]):
        assert np.array_equal(r["image"], a["image"]) and r["digits"] == p["digits"] == a["digits"]
        assert r["answer"] == p["answer"] == a["answer"]
        if r["answer"] == "yes":
            assert r["query"] == p["query"] == a["query"]


def test_statistics_are_exact_and_structured():
    freq, co = digit_statistics(3, 0.8)
    assert freq.sum() == pytest.approx(3.0)  # 3 digits per image
    assert np.allclose(co, co.T)
    # each image containing a has k-1 = 2 other digits: sum_b co[a, b] = 2 * freq[a]
    assert np.allclose(co.sum(1), 2 * freq)
    for a in range(10):  # every digit's most frequent companion is its fixed partner
        assert int(np.argmax(co[a])) == PARTNER[a]
    # the exact statistics match what the sampler produces
    ex = build_digits_pope(2000, subset="train", seed=5, splits=("random",))
    emp = np.zeros(10)
    for e in ex:
        emp[e["digits"]] += 1
    assert np.abs(emp / len(ex) - freq).max() < 0.04


def test_popular_and_adversarial_negatives(train):
    freq, co = digit_statistics(3, 0.8)
    scores = {s: [] for s in SPLITS}
    for e in train:
        if e["answer"] != "no":
            continue
        absent = [d for d in range(10) if d not in e["digits"]]
        assert e["query"] in absent
        score = lambda d: co[e["digits"], d].sum()  # noqa: E731
        scores[e["split"]].append(score(e["query"]))
        if e["split"] == "adversarial":
            # the absent digit that co-occurs most with the present ones ...
            assert score(e["query"]) == pytest.approx(max(score(d) for d in absent))
            # ... which with this structure is always the missing partner of a present digit
            assert any(PARTNER[d] == e["query"] for d in e["digits"])
        if e["split"] == "popular":
            assert freq[e["query"]] == pytest.approx(max(freq[d] for d in absent))
    assert np.mean(scores["adversarial"]) > np.mean(scores["popular"]) > np.mean(scores["random"])
    # random negatives are spread over many digits
    assert len({e["query"] for e in train if e["split"] == "random" and e["answer"] == "no"}) >= 8


def test_train_test_source_images_do_not_leak():
    split = source_split()
    imgs, y = dp._load_digits()
    tr = np.concatenate(split["train"])
    te = np.concatenate(split["test"])
    assert not set(tr) & set(te) and len(tr) + len(te) == len(y)
    for d in range(10):  # stratified
        assert (y[split["test"][d]] == d).all() and 0.25 < len(split["test"][d]) / (y == d).sum() < 0.35
    test_cells = {d: {imgs[i].tobytes() for i in split["test"][d]} for d in range(10)}
    test = build_digits_pope(100, subset="test", seed=0, splits=("random",))
    for e in test:
        cells = [e["image"][:, 8 * j : 8 * j + 8] for j in range(3)]
        for d, cell in zip(e["digits"], cells):
            assert cell.tobytes() in test_cells[d]


def test_layouts_and_upscale():
    assert image_shape(3, "row", 1) == (8, 24) and image_shape(3, "grid", 2) == (32, 32)
    g = build_digits_pope(10, layout="grid", seed=0, splits=("random",))
    assert g[0]["image"].shape == (16, 16)
    # exactly one blank 8x8 cell in a 2x2 grid of 3 digits (digit images are never all-zero)
    for e in g:
        blanks = sum(int(e["image"][r : r + 8, c : c + 8].max() == 0) for r in (0, 8) for c in (0, 8))
        assert blanks == 1
    up = build_digits_pope(4, upscale=3, seed=0, splits=("random",))
    base = build_digits_pope(4, upscale=1, seed=0, splits=("random",))
    assert up[0]["image"].shape == (24, 72)
    assert np.array_equal(up[0]["image"][::3, ::3], base[0]["image"])
    five = build_digits_pope(4, k=5, seed=0, splits=("random",))
    assert five[0]["image"].shape == (8, 40) and len(five[0]["digits"]) == 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="subset"):
        build_digits_pope(4, subset="val")
    with pytest.raises(ValueError, match="splits"):
        build_digits_pope(4, splits=("hard",))
    with pytest.raises(ValueError, match="layout"):
        build_digits_pope(4, layout="ring")
    with pytest.raises(ValueError, match="k"):
        build_digits_pope(4, k=1)
    with pytest.raises(ValueError, match="n_per_split"):
        build_digits_pope(0)
    with pytest.raises(ValueError, match="sigma"):
        add_noise(np.zeros((2, 2), np.uint8), -1.0, np.random.default_rng(0))


def test_noise_statistics_and_seeding():
    img = np.full((128, 128), 128, dtype=np.uint8)
    for sigma in (30.0, 50.0):
        noisy = add_noise(img, sigma, np.random.default_rng(0)).astype(np.float64) - 128
        assert abs(noisy.mean()) < 0.02 * sigma
        # sigma=50 clips ~1% of pixels at 0/255, which shrinks the std a little
        assert noisy.std() == pytest.approx(sigma, rel=0.03 if sigma == 30 else 0.05)
    assert np.array_equal(add_noise(img, 0.0, np.random.default_rng(0)), img)
    ex = build_digits_pope(20, seed=0, splits=("random",))
    n1 = with_noise(ex, 30, seed=0)
    assert all(e["sigma"] == 30.0 and e["image"].dtype == np.uint8 for e in n1)
    # noise depends on (seed, sigma, id), not on position
    n_rev = with_noise(ex[::-1], 30, seed=0)[::-1]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(n1, n_rev))
    n2 = with_noise(ex, 30, seed=1)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(n1, n2))
    # the sigma argument of the builder is the same thing
    built = build_digits_pope(20, seed=0, splits=("random",), sigma=30)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(n1, built))
    # the input examples are untouched
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(ex, build_digits_pope(20, seed=0, splits=("random",))))
    # measured on real images: residual std is about sigma where no clipping happens (mid-gray pixels rare),
    # overall the noisy images differ a lot
    diff = np.concatenate([(b["image"].astype(float) - a["image"]).ravel() for a, b in zip(ex, n1)])
    assert 15 < diff.std() < 30


def test_build_is_fast():
    build_digits_pope(10, seed=9)  # warm the CSV cache
    # process CPU time, not wall time: a loaded machine must not fail this (it guards against an O(n^2) build)
    t = time.process_time()
    ex = build_digits_pope(1000, seed=1, sigma=30)
    dt = time.process_time() - t
    assert len(ex) == 3000
    assert dt < 2.0, f"building 3000 noisy examples took {dt:.2f} s"  # ~0.3 s on an idle core


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------
def test_jsonl_roundtrip(tmp_path):
    ex = build_digits_pope(4, seed=0, sigma=30)
    path = write_jsonl(ex, tmp_path / "sub" / "pope.jsonl")
    assert os.path.isfile(path)
    assert not [p for p in os.listdir(tmp_path / "sub") if p.startswith(".tmp-")]
    first = json.loads(open(path).readline())
    assert first["image"] == os.path.join("pope_images", ex[0]["id"] + ".png")  # relative to the JSONL folder
    loaded = load_jsonl(path)
    assert len(loaded) == len(ex)
    for a, b in zip(ex, loaded):
        assert np.array_equal(a["image"], b["image"])  # PNG is lossless, gray stays [H, W]
        for k in ("question", "answer", "digits", "split", "id", "query", "sigma"):
            assert a[k] == b[k]
        assert os.path.isabs(b["image_path"])
    assert load_jsonl(path, mode="RGB")[0]["image"].shape == (8, 24, 3)
    lazy = load_jsonl(path, load_images=False, limit=2)
    assert len(lazy) == 2 and lazy[0]["image"] == lazy[0]["image_path"]


def test_jsonl_defaults_and_absolute_paths(tmp_path):
    ex = build_digits_pope(2, seed=0, splits=("random",))
    write_jsonl(ex, tmp_path / "a.jsonl")
    png = str(tmp_path / "a_images" / (ex[0]["id"] + ".png"))
    (tmp_path / "other").mkdir()
    p = tmp_path / "other" / "b.jsonl"
    p.write_text(json.dumps({"image": png, "question": "Is there a dog?", "answer": " Yes"}) + "\n\n")
    out = load_jsonl(p)
    assert out[0]["answer"] == "yes" and out[0]["split"] == "default" and out[0]["id"] == "line1"
    p.write_text(json.dumps({"image": png, "question": "What digit?", "answer": "Seven"}) + "\n")
    assert load_jsonl(p)[0]["answer"] == "Seven"  # free text kept as is


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "answer": "yes"}', "line 2.*missing required field 'image'"),
        ('{"image": "x.png", "answer": "yes"}', "line 2.*missing required field 'question'"),
        ('{"image": "x.png", "question": "q"}', "line 2.*missing required field 'answer'"),
        ('{"image": "x.png", "question": "", "answer": "yes"}', "line 2.*'question' must be a non-empty string"),
        ('{"image": "x.png", "question": "q", "answer": "yes", "split": 3}', "line 2.*'split' must be a string"),
        ("{not json", "line 2.*invalid JSON"),
        ("[1, 2]", "line 2.*expected a JSON object"),
        ('{"image": "missing.png", "question": "q", "answer": "yes"}', "line 2.*image file not found"),
        ('{"image": "bad.png", "question": "q", "answer": "yes"}', "line 2.*cannot load image"),
        ('{"image": "x.png", "question": "q", "answer": "no", "id": "line1"}', "line 2.*duplicate id 'line1'"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    from hero.data.jsonl import save_image_png

    save_image_png(np.zeros((4, 4), np.uint8), str(tmp_path / "x.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    good = json.dumps({"image": "x.png", "question": "q", "answer": "yes"})
    p = tmp_path / "d.jsonl"
    p.write_text(good + "\n" + line + "\n")
    with pytest.raises(JSONLFormatError, match=message):
        load_jsonl(p)


def test_write_jsonl_rejects_bad_examples(tmp_path):
    with pytest.raises(ValueError, match=r"examples\[0\].*'answer'"):
        write_jsonl([{"image": np.zeros((2, 2), np.uint8), "question": "q"}], tmp_path / "x.jsonl")
    ex = build_digits_pope(2, seed=0, splits=("random",))
    with pytest.raises(ValueError, match="duplicate id"):
        write_jsonl([ex[0], ex[0]], tmp_path / "y.jsonl")
