"""hero.experiments.confidence_trap.diagnostics: the confidence-trap diagnosis (hand-checked aggregation, adapters, end to end)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from hero.experiments.confidence_trap.digits_pope import build_digits_pope
from hero.experiments.confidence_trap.diagnostics import AnswerBatch, HFVLMAdapter, TinyVLMAdapter, diagnose, reference_entropy
from hero.experiments.confidence_trap.metrics import UNPARSED


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    from hero.experiments.confidence_trap.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(seed=0)


def _strict_json(path):
    def bad(x):
        raise ValueError(f"non-strict JSON constant {x}")

    with open(path) as f:
        return json.load(f, parse_constant=bad)


def test_reference_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0, 0.0]])
    H = reference_entropy(logits)
    assert H.dtype == torch.float64
    assert H[0].item() == pytest.approx(math.log(5))
    assert 0 <= H[1].item() < 1e-10


# ---------------------------------------------------------------------------------------------
# aggregation, checked by hand with a scripted adapter
# ---------------------------------------------------------------------------------------------
class ScriptedAdapter:
    """Answers from a table keyed by question; records the images it was shown."""

    name = "scripted"

    def __init__(self, table):
        self.table = table
        self.seen = []

    def answer_token_distribution(self, images, questions):
        self.seen += [np.asarray(im).astype(float).std() for im in images]
        rows = [self.table[q] for q in questions]
        texts = [r[0] for r in rows]
        from hero.experiments.confidence_trap.metrics import parse_answer

        return AnswerBatch(texts=texts, predictions=[parse_answer(t) for t in texts],
                           entropy=np.array([r[1] for r in rows]), confidence=np.array([r[2] for r in rows]),
                           answer_found=np.array([t.startswith("<answer>") for t in texts]))


def _hand_examples():
    img = np.full((8, 8), 128, np.uint8)
    gold = ["yes", "no", "yes", "no"]
    splits = ["random", "random", "adversarial", "adversarial"]
    return [{"image": img, "question": f"q{i}", "answer": a, "split": s, "id": f"e{i}"}
            for i, (a, s) in enumerate(zip(gold, splits))]


TABLE = {
    "q0": ("<answer>yes</answer>", 0.1, 0.95),  # right, confident
    "q1": ("<answer>yes</answer>", 0.2, 0.90),  # wrong, confident (the trap)
    "q2": ("I think so", 1.5, 0.30),  # unparsed -> wrong, uncertain
    "q3": ("<answer>no</answer>", 0.5, 0.70),  # right, mid entropy
}


def test_diagnose_aggregates_by_hand():
    ad = ScriptedAdapter(TABLE)
    d = diagnose(ad, _hand_examples(), sigmas=(0, 30), batch_size=3, keep_records=True)
    assert d.sigmas == [0.0, 30.0] and set(d.per_sigma) == {"0", "30"}
    r = d.per_sigma["0"]
    assert r["n"] == 4 and r["accuracy"] == 0.5 and r["unparsed"] == 1
    assert r["mean_entropy"] == pytest.approx((0.1 + 0.2 + 1.5 + 0.5) / 4)
    assert r["mean_entropy_correct"] == pytest.approx(0.3) and r["mean_entropy_wrong"] == pytest.approx(0.85)
    assert r["low_entropy_frac"] == 0.5 and r["low_entropy_accuracy"] == 0.5
    assert r["confident_error_frac"] == 0.5  # errors q1 (H 0.2) and q2 (H 1.5): one of two at H <= 0.3
    # ECE, 10 bins: [0.9, 1.0] holds 0.95 and 0.9 (mean 0.925, acc 0.5, gap 0.425, weight 1/2);
    # 0.3 -> gap 0.3 (weight 1/4); 0.7 -> gap 0.3 (weight 1/4). ECE = 0.2125 + 0.075 + 0.075 = 0.3625
    assert r["ece"] == pytest.approx(0.3625)
    assert [b["count"] for b in r["entropy_bins"]] == [2, 1, 0, 1]
    assert [b["accuracy"] for b in r["entropy_bins"]] == [0.5, 1.0, None, 0.0]
    pope = r["pope"]
    assert (pope["all"]["tp"], pope["all"]["fp"], pope["all"]["tn"], pope["all"]["fn"]) == (1, 1, 1, 1)
    assert pope["random"]["precision"] == 0.5 and pope["random"]["recall"] == 1.0
    assert pope["adversarial"]["unparsed"] == 1 and pope["adversarial"]["accuracy"] == 0.5
    assert r["answer_found_frac"] == 0.75 and r["chair"] is None  # no "digits" in these examples
    assert [x["prediction"] for x in r["records"]] == ["yes", "yes", UNPARSED, "no"]
    # sigma 0 keeps the flat gray images, sigma 30 really adds noise
    assert max(ad.seen[:4]) == 0 and min(ad.seen[4:]) > 20
    assert "| 30 | 4 | 0.500 |" in d.table()


def test_diagnose_free_text_answers_and_errors():
    exs = [{"image": np.zeros((4, 4), np.uint8), "question": "a", "answer": "Seven"},
           {"image": np.zeros((4, 4), np.uint8), "question": "b", "answer": "three"}]
    ad = ScriptedAdapter({"a": ("<answer>seven.</answer>", 0.1, 0.9), "b": ("<answer>two</answer>", 0.1, 0.9)})
    r = diagnose(ad, exs, sigmas=(0,)).per_sigma["0"]
    assert r["accuracy"] == 0.5 and r["pope"] is None
    with pytest.raises(ValueError, match="empty"):
        diagnose(ad, [])
    with pytest.raises(ValueError, match=r"examples\[0\] is missing 'answer'"):
        diagnose(ad, [{"image": np.zeros((2, 2), np.uint8), "question": "a"}])
    with pytest.raises(ValueError, match="uint8 array"):
        diagnose(ad, [{"image": "x.png", "question": "a", "answer": "yes"}])
    two = [np.zeros((2, 2), np.uint8)] * 2  # a training row with several images: one line, not a dtype complaint
    with pytest.raises(ValueError, match=r"examples\[0\] \(id 'q7'\) has 2 images; hero diagnose scores one image"):
        diagnose(ad, [{"id": "q7", "image": two, "question": "a", "answer": "yes"}])


# ---------------------------------------------------------------------------------------------
# TinyVLMAdapter: answer position found in the output vs. forced
# ---------------------------------------------------------------------------------------------
def test_tiny_adapter_answer_position(tiny, monkeypatch):
    from hero.experiments.confidence_trap.tiny_vlm import TinyGenerateOutput

    model, proc = tiny
    tok = proc.tokenizer
    exs = build_digits_pope(2, subset="test", seed=0, splits=("random",))
    row0 = tok.encode("<think>I see 1.</think><answer>yes</answer>") + [tok.eos_token_id]
    row1 = tok.encode("<think>I see<image>")  # cut before any answer, no eos; a stray <image> is dropped
    T = len(row0)
    seqs = torch.zeros(2, T, dtype=torch.long)
    seqs[0] = torch.tensor(row0)
    seqs[1, : len(row1)] = torch.tensor(row1)
    mask = torch.zeros(2, T, dtype=torch.long)
    mask[0] = 1
    mask[1, : len(row1)] = 1
    logits = torch.randn(2, T, tok.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    fake = TinyGenerateOutput(sequences=seqs, completion_mask=mask, logits=logits)
    monkeypatch.setattr(model, "generate", lambda *a, **k: fake)

    res = TinyVLMAdapter(model, proc).answer_token_distribution([e["image"] for e in exs], [e["question"] for e in exs])
    assert res.predictions == ["yes", UNPARSED] and res.answer_found.tolist() == [True, False]
    t = row0.index(tok.convert_tokens_to_ids("<answer>")) + 1
    assert tok.convert_ids_to_tokens(row0[t]) == "yes"
    assert res.entropy[0] == pytest.approx(reference_entropy(logits[0, t : t + 1])[0].item(), rel=1e-6)
    assert res.confidence[0] == pytest.approx(logits[0, t].double().softmax(-1)[row0[t]].item(), rel=1e-6)
    # forced: prompt + the generated text + <answer>, next-token distribution of the real model
    ids = torch.tensor([proc.prompt_ids(exs[1]["question"]) + row1[:-1] + [tok.convert_tokens_to_ids("<answer>")]])
    with torch.no_grad():
        ref = model(ids, torch.ones_like(ids), proc.pixel_values([exs[1]["image"]])).logits[0, -1]
    assert res.entropy[1] == pytest.approx(reference_entropy(ref[None])[0].item(), rel=1e-5)
    assert res.confidence[1] == pytest.approx(ref.double().softmax(-1).max().item(), rel=1e-5)


def test_tiny_adapter_custom_entropy_fn(tiny):
    model, proc = tiny
    exs = build_digits_pope(2, subset="test", seed=0, splits=("random",))
    ad = TinyVLMAdapter(model, proc, max_new_tokens=4, entropy_fn=lambda z: torch.full((z.shape[0],), 0.25))
    res = ad.answer_token_distribution([e["image"] for e in exs], [e["question"] for e in exs])
    assert res.entropy.tolist() == [0.25, 0.25]


def test_diagnose_end_to_end_tiny_vlm(tiny, tmp_path):
    model, proc = tiny
    exs = build_digits_pope(2, subset="test", seed=0)  # 6 examples over 3 splits
    calls = []
    d = diagnose(TinyVLMAdapter(model, proc, max_new_tokens=8), exs, sigmas=(0, 30, 50), batch_size=4,
                 progress=lambda s, done, total: calls.append((s, done, total)))
    assert calls[-1] == (50.0, 6, 6)
    logV = math.log(proc.tokenizer.vocab_size)
    for key in ("0", "30", "50"):
        r = d.per_sigma[key]
        for k in ("n", "accuracy", "mean_entropy", "median_entropy", "mean_confidence", "ece", "reliability",
                  "entropy_bins", "low_entropy_frac", "confident_error_frac", "unparsed", "pope"):
            assert k in r, k
        assert r["n"] == 6 and 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1
        assert 0 <= r["mean_entropy"] <= logV + 1e-9 and math.isfinite(r["mean_entropy"])
        assert set(r["pope"]) == {"all", "random", "popular", "adversarial"}
        assert sum(b["count"] for b in r["entropy_bins"]) == 6
        assert set(r["chair"]) >= {"chair_i", "chair_s"}
    js = d.save_json(str(tmp_path / "out" / "diagnosis.json"))
    data = _strict_json(js)
    assert data["meta"]["entropy_edges"][-1] is None and data["per_sigma"]["30"]["n"] == 6
    pngs = d.save_plots(str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in pngs] == ["reliability.png", "entropy_vs_sigma.png", "entropy_bins.png"]
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path / "plots") if p.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------
# HFVLMAdapter on a tiny random-init transformers LLaVA, its generation replaced by planned tokens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["first_token", "tag"])
def test_hf_adapter_answer_position(mode):
    pytest.importorskip("transformers")
    from hero.testing.tiny_models import build_tiny_model

    model, proc = build_tiny_model("llava")
    ad = HFVLMAdapter(model.eval(), proc, answer_mode=mode, max_new_tokens=3)
    tok = ad.tokenizer
    if mode == "first_token":
        texts, steps, preds, found = [" Yes", "No  "], [1, 0], ["yes", "no"], [True, True]
    else:
        texts, steps, preds, found = ["<answer> Yes</answer>", "No no"], [9, 0], ["yes", UNPARSED], [True, False]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    T = max(map(len, ids))
    new = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in ids])
    logits = torch.randn(T, 2, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(1))
    seen = {}

    def planned(enc, keys):
        seen["prompt"] = tok.batch_decode(enc["input_ids"], skip_special_tokens=True)
        return new, list(logits)

    ad._decode = planned
    imgs = [np.zeros((8, 8), np.uint8), np.zeros((30, 20, 3), np.uint8)]  # grayscale -> RGB, any size
    res = ad.answer_token_distribution(imgs, ["Is there a cat?", "Is there a dog?"])
    assert res.predictions == preds and res.answer_found.tolist() == found and res.texts == texts
    assert seen["prompt"][0].endswith("USER: \nIs there a cat? Answer the question with yes or no. ASSISTANT:")
    for i, t in enumerate(steps):
        z = logits[t, i]
        assert res.entropy[i] == pytest.approx(reference_entropy(z[None])[0].item(), rel=1e-6)
        assert res.confidence[i] == pytest.approx(z.double().softmax(-1)[new[i, t]].item(), rel=1e-6)
    with pytest.raises(ValueError, match="answer_mode"):
        HFVLMAdapter(model, proc, answer_mode="last")
    raw = HFVLMAdapter(model, proc, use_chat_template=False, prompt="<image>\nQ: {question} A:")
    enc, keys = raw._encode(imgs, ["cat?", "a dog?"])  # the prompt as is, left-padded
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == ["\nQ: cat? A:", "\nQ: a dog? A:"]
    assert enc["pixel_values"].shape[0] == 2 and keys[0] != keys[1]


def test_hf_adapter_without_chat_template_on_qwen_vl():
    """--no-chat-template on Qwen-VL: the processor's flat patches [sum of patches, F] are packed per row like
    encode() does (this path called a helper that no longer existed: AttributeError)."""
    from hero.testing.tiny_models import build_tiny_model

    model, proc = build_tiny_model("qwen2_vl", hidden_size=32, num_layers=1)
    raw = HFVLMAdapter(model.eval(), proc, use_chat_template=False, max_new_tokens=2,
                       prompt="<|vision_start|><|image_pad|><|vision_end|>{question} Answer:")
    imgs = [np.zeros((28, 56, 3), np.uint8), np.full((56, 28, 3), 200, np.uint8)]
    enc, _ = raw._encode(imgs, ["Cat?", "Red?"])
    assert enc["pixel_values"].dim() == 3 and enc["pixel_values"].shape[0] == 2  # [rows, max patches, F]
    assert len(raw.answer_token_distribution(imgs, ["Cat?", "Red?"]).texts) == 2


def test_imports_without_triton_or_hero_kernels():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import hero, hero.experiments.confidence_trap.metrics, hero.data, hero.experiments.confidence_trap.diagnostics, hero.experiments.confidence_trap.tiny_vlm\n"
        "assert 'hero_kernels' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


def test_diagnose_chair_on_digits():
    img = np.zeros((8, 24), np.uint8)
    exs = [{"image": img, "question": "a", "answer": "yes", "digits": [1, 2, 3]},
           {"image": img, "question": "b", "answer": "no", "digits": [4, 5, 6]}]
    ad = ScriptedAdapter({"a": ("<think>I see 1, 9.</think><answer>yes</answer>", 0.1, 0.9),
                          "b": ("<think>I see 4, 5, 6.</think><answer>no</answer>", 0.1, 0.9)})
    c = diagnose(ad, exs, sigmas=(0,)).per_sigma["0"]["chair"]
    # mentions: 1, 9 | 4, 5, 6 -> 9 is the only hallucination: CHAIR_i = 1/5, CHAIR_s = 1/2
    assert c["chair_i"] == pytest.approx(1 / 5) and c["chair_s"] == pytest.approx(1 / 2)
