"""Visual contrastive decoding (hero.experiments.confidence_trap.vcd) in the diagnosis: the diffusion noise, the
contrastive logits with the plausibility cutoff, the decoding loop, VCD with alpha = 0 equals greedy on the tiny
VLM, the transformers adapter's VCD path with a stand-in model, and the ``hero diagnose --decode vcd`` flags."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hero.experiments.confidence_trap.diagnose_cli import diagnose_main
from hero.experiments.confidence_trap.diagnostics import HFVLMAdapter, TinyVLMAdapter, diagnose
from hero.experiments.confidence_trap.digits_pope import build_digits_pope
from hero.experiments.confidence_trap.vcd import (VCDConfig, alpha_bar, contrastive_logits, diffusion_noise,
                                                  vcd_decode)
from test_diagnostics import _one_thread, tiny  # noqa: F401  (fixtures: one torch thread, the tiny VLM)


def test_diffusion_noise_schedule_seed_and_batch_independence():
    betas = np.linspace(1e-4, 0.02, 1000)
    assert alpha_bar(0) == 1.0 and alpha_bar(500) == pytest.approx(np.prod(1 - betas[:500]), rel=1e-12)
    assert alpha_bar(1000) < 1e-4 < alpha_bar(500) < alpha_bar(100) < 1
    x = torch.rand(3, 1, 8, 24) * 2 - 1
    assert torch.equal(diffusion_noise(x, 0), x)
    a = diffusion_noise(x, 500, seed=1)
    assert torch.equal(a, diffusion_noise(x, 500, seed=1)) and not torch.equal(a, diffusion_noise(x, 500, seed=2))
    assert torch.equal(a[[2, 0]], diffusion_noise(x[[2, 0]], 500, seed=1))  # per image, not per batch slot
    big = diffusion_noise(torch.zeros(1, 1, 200, 200) + 0.5, 500, seed=0)
    ab = alpha_bar(500)
    assert big.mean().item() == pytest.approx(0.5 * math.sqrt(ab), abs=0.01)
    assert big.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.02)
    assert diffusion_noise(x.to(torch.bfloat16), 10).dtype == torch.bfloat16


def test_contrastive_logits_and_cutoff():
    z = torch.tensor([[2.0, 1.0, -3.0, 0.0]])
    zd = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    out = contrastive_logits(z, zd, alpha=1.0, beta=0.0)
    assert torch.equal(out, 2 * z - zd)
    p = z.softmax(-1)
    out = contrastive_logits(z, zd, alpha=1.0, beta=0.2)
    keep = p >= 0.2 * p.max()
    assert torch.equal(torch.isinf(out), ~keep) and torch.equal(out[keep], (2 * z - zd)[keep])
    assert torch.equal(contrastive_logits(z, zd, 0.0, 0.0), z)
    with pytest.raises(ValueError, match="--vcd-beta"):
        VCDConfig(beta=1.5)
    with pytest.raises(ValueError, match="--vcd-alpha"):
        VCDConfig(alpha=-1)
    with pytest.raises(ValueError, match="--vcd-noise-steps"):
        VCDConfig(noise_steps=1001)


def test_vcd_decode_loop_stops_at_eos():
    V, eos, pad = 5, 4, 0
    plan = {0: [1, 4, 2], 1: [2, 3, 4]}  # row 0 emits eos at step 1, row 1 at step 2

    def branch(shift):
        t = {"step": 0}

        def logits():
            z = torch.full((2, V), -5.0)
            for r in range(2):
                z[r, plan[r][t["step"]]] = 5.0
            z[:, 3] += shift  # the distorted branch likes token 3
            return z

        def step(nxt):
            t["step"] += 1
            return logits()

        return logits, step

    seq, mask, logits = vcd_decode(branch(0.0), branch(20.0), VCDConfig(alpha=1.0, beta=0.0), 8, [eos], pad)
    # row 1 step 1: clean picks 3 but the distorted image explains 3 away -> VCD picks another token
    assert seq[0].tolist() == [1, 4, pad] and seq[1, 0] == 2 and seq[1, 1] != 3
    assert seq[1, 2] == eos and mask.tolist() == [[1, 1, 0], [1, 1, 1]] and logits.shape == (2, 3, V)


def _batch(exs):
    return [e["image"] for e in exs], [e["question"] for e in exs]


def test_vcd_with_alpha_zero_is_greedy_on_the_tiny_vlm(tiny):
    model, proc = tiny
    exs = build_digits_pope(2, subset="test", seed=0)
    greedy = TinyVLMAdapter(model, proc, max_new_tokens=6).answer_token_distribution(*_batch(exs))
    same = TinyVLMAdapter(model, proc, max_new_tokens=6, vcd=VCDConfig(alpha=0.0, beta=0.0))
    res = same.answer_token_distribution(*_batch(exs))
    assert res.texts == greedy.texts and res.predictions == greedy.predictions
    assert np.array_equal(res.entropy, greedy.entropy) and np.array_equal(res.confidence, greedy.confidence)
    cut = TinyVLMAdapter(model, proc, max_new_tokens=6, vcd=VCDConfig(alpha=0.0, beta=0.1))
    res = cut.answer_token_distribution(*_batch(exs))  # the cutoff never removes the argmax: same tokens
    assert res.texts == greedy.texts and (res.entropy <= greedy.entropy + 1e-12).all()
    vcd = TinyVLMAdapter(model, proc, max_new_tokens=6, vcd=VCDConfig(alpha=1.0, beta=0.1, noise_steps=500))
    d_vcd = diagnose(vcd, exs, sigmas=(0, 50), batch_size=4)
    d_greedy = diagnose(TinyVLMAdapter(model, proc, max_new_tokens=6, vcd=VCDConfig(0.0, 0.0)), exs, sigmas=(0, 50),
                        batch_size=4)
    assert d_greedy.per_sigma == diagnose(TinyVLMAdapter(model, proc, max_new_tokens=6), exs, sigmas=(0, 50),
                                          batch_size=4).per_sigma
    assert set(d_vcd.per_sigma["50"]) == set(d_greedy.per_sigma["50"])  # reported exactly as for greedy
    assert math.isfinite(d_vcd.per_sigma["50"]["mean_entropy"]) and d_vcd.per_sigma["50"]["pope"] is not None
    with pytest.raises(ValueError, match="greedily"):
        TinyVLMAdapter(model, proc, temperature=1.0, vcd=VCDConfig())


class _Tok:
    eos_token_id, pad_token_id, padding_side = 2, 0, "right"

    def decode(self, ids, skip_special_tokens=False):
        return "".join(["", "Yes", "", "No", " "][i] for i in ids)

    def batch_decode(self, batch, skip_special_tokens=False):
        return [self.decode(list(map(int, r))) for r in batch]


class _Proc:
    tokenizer = _Tok()

    def __call__(self, images, text, return_tensors, padding):
        n = len(text)
        return SimpleNamespace(to=lambda dev: {"input_ids": torch.ones(n, 3, dtype=torch.long),
                                               "attention_mask": torch.ones(n, 3, dtype=torch.long),
                                               "pixel_values": torch.linspace(-1, 1, n * 12).view(n, 3, 2, 2)})


class _HFModel:
    """logits[:, -1] = clean preference for "Yes" (1) plus the image's mean pushing "No" (3); eos after 2 tokens."""

    device = "cpu"
    config = SimpleNamespace(_name_or_path="fake-vlm")
    generation_config = SimpleNamespace(eos_token_id=2)

    def __call__(self, input_ids, attention_mask, pixel_values, use_cache):
        assert not use_cache and attention_mask.shape == input_ids.shape
        B, T = input_ids.shape
        z = torch.zeros(B, 5)
        z[:, 1] = 2.0
        z[:, 3] = 1.0 + 4.0 * pixel_values.float().abs().mean((1, 2, 3))
        if T >= 4:
            z[:, 2] = 10.0
        return SimpleNamespace(logits=z[:, None].expand(B, T, 5))


def test_hf_adapter_vcd_with_a_stand_in_model():
    model = _HFModel()
    ad = HFVLMAdapter(model, _Proc(), vcd=VCDConfig(alpha=1.0, beta=0.0, noise_steps=800), use_chat_template=False)
    imgs = [np.zeros((2, 2, 3), np.uint8)] * 2
    res = ad.answer_token_distribution(imgs, ["q1", "q2"])
    x = _Proc()(None, ["a", "b"], None, None).to("cpu")
    z = model(x["input_ids"], x["attention_mask"], x["pixel_values"], False).logits[:, -1]
    zd = model(x["input_ids"], x["attention_mask"], diffusion_noise(x["pixel_values"], 800), False).logits[:, -1]
    final = contrastive_logits(z, zd, 1.0, 0.0)
    assert res.texts == [["Yes", "No"][int(final[i].argmax() == 3)] for i in range(2)]
    probs = final.double().softmax(-1)
    assert res.confidence.tolist() == pytest.approx(probs.max(-1).values.tolist(), rel=1e-6)


def test_cli_decode_vcd_and_flag_errors(tiny, tmp_path, capsys):
    model, proc = tiny
    path = str(tmp_path / "tiny")
    model.save_pretrained(path, tokenizer=proc.tokenizer)
    common = ["--model", path, "--data", "digits_pope:2", "--sigmas", "0,50", "--max-new-tokens", "4"]
    outs = {}
    for name, extra in [("greedy", []), ("vcd0", ["--decode", "vcd", "--vcd-alpha", "0", "--vcd-beta", "0"]),
                        ("vcd", ["--decode", "vcd", "--vcd-alpha", "1.0", "--vcd-beta", "0.1", "--vcd-noise-steps",
                                 "500"])]:
        out = str(tmp_path / name)
        assert diagnose_main(common + ["--out", out] + extra, log=lambda *_: None) == 0
        with open(os.path.join(out, "diagnosis.json")) as f:
            outs[name] = json.load(f)
    assert outs["vcd0"]["per_sigma"] == outs["greedy"]["per_sigma"]
    assert outs["vcd"]["meta"]["decode"] == "vcd" and outs["vcd"]["meta"]["vcd"]["noise_steps"] == 500
    assert outs["greedy"]["meta"]["decode"] == "greedy"
    assert "visual contrastive decoding" in open(os.path.join(tmp_path, "vcd", "diagnosis.md")).read()
    capsys.readouterr()
    for extra, msg in [(["--vcd-alpha", "1"], "--vcd-alpha needs --decode vcd"),
                       (["--decode", "beam"], "--decode must be greedy or vcd"),
                       (["--decode", "vcd", "--vcd-beta", "2"], "--vcd-beta must be in [0, 1]"),
                       (["--decode", "vcd", "--vcd-noise-steps", "x"], "--vcd-noise-steps must be an integer")]:
        assert diagnose_main(common + ["--out", str(tmp_path / "bad")] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
