"""Visual contrastive decoding (hero.experiments.confidence_trap.vcd) in the diagnosis: the diffusion noise, the
contrastive logits with the plausibility cutoff, the decoding loop, VCD with alpha = 0 equals greedy on the tiny
VLM and on tiny transformers Qwen2-VL / LLaVA, their VCD logits against two explicit forwards at every step,
and ``hero diagnose --decode vcd`` (flags, report, the CLI in a subprocess)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from hero.experiments.confidence_trap.diagnose_cli import diagnose_main
from hero.experiments.confidence_trap.diagnostics import HFVLMAdapter, TinyVLMAdapter, diagnose
from hero.experiments.confidence_trap.digits_pope import build_digits_pope
from hero.experiments.confidence_trap.vcd import (VCDConfig, alpha_bar, contrastive_logits, diffusion_noise,
                                                  distort_rows, vcd_decode)
from test_diagnostics import _one_thread, tiny  # noqa: F401  (fixtures: one torch thread, the tiny VLM)


def test_diffusion_noise_schedule_seed_and_batch_independence():
    betas = np.linspace(1e-4, 0.02, 1000)
    assert alpha_bar(0, "ddpm") == 1.0 and alpha_bar(500, "ddpm") == pytest.approx(np.prod(1 - betas[:500]), rel=1e-12)
    assert alpha_bar(1000, "ddpm") < 1e-4 < alpha_bar(500, "ddpm") < alpha_bar(100, "ddpm") < 1
    assert alpha_bar(500) == alpha_bar(500, "vcd")  # the default is VCD's own schedule
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
    ref = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5  # VCD's code
    assert alpha_bar(500, "vcd") == pytest.approx(float(torch.cumprod(1 - ref, 0)[499]), rel=1e-12)
    assert alpha_bar(0, "vcd") == 1.0 and alpha_bar(500, "ddpm") < 0.1 < 0.7 < alpha_bar(500, "vcd")


def test_distort_rows_per_image_seeds_padding_and_tiles():
    cfg = VCDConfig(noise_steps=500, seed=3)
    pv = torch.rand(2, 5, 12) * 2 - 1  # Qwen-style packed rows: row 1 has 3 patches + 2 padding patches
    pv[1, 3:] = 0
    out = distort_rows(pv, cfg, [b"a", b"b"], counts=[5, 3])
    assert torch.equal(out[1, 3:], pv[1, 3:]) and not torch.equal(out[1, :3], pv[1, :3])
    alone = distort_rows(pv[1:, :3], cfg, [b"b"], counts=[3])
    assert torch.equal(alone[0], out[1, :3])  # seeded by the image's key, not its batch slot or padding
    tiles = torch.rand(1, 3, 3, 4, 4)  # LLaVA-NeXT-style [B, tiles, 3, H, W]: tile noise does not depend on the count
    assert torch.equal(distort_rows(tiles, cfg, [b"t"])[0, :2], distort_rows(tiles[:, :2], cfg, [b"t"])[0])
    frames = torch.rand(2, 3, 1, 4).expand(2, 3, 2, 4).reshape(1, 2, 24)  # two copies of each patch's pixels
    d = distort_rows(frames, cfg, [b"f"], counts=[2], frames=(2, 4)).view(2, 3, 2, 4)
    assert torch.equal(d[:, :, 0], d[:, :, 1])


def test_hf_vcd_leaves_idefics3_padding_images_alone(hf_models):
    """Idefics3 pads a row with fewer tiles with all-zero images and drops them by that test; noising them
    made them real images without placeholder tokens ("Image features and image tokens do not match")."""
    images = [np.full((112, 112, 3), 90, np.uint8), np.full((14, 112, 3), 200, np.uint8)]  # 5 vs 3 tiles
    ad = _hf_adapter(hf_models, "idefics3", VCDConfig(alpha=1.0, beta=0.1), max_new_tokens=2)
    enc, keys = ad._encode(images, ["Cat?", "Red?"])
    pad = (enc["pixel_values"] == 0).flatten(2).all(-1)
    assert pad[1].any() and not pad[0].any()
    noisy = ad._distorted(enc, keys)
    assert torch.equal((noisy == 0).flatten(2).all(-1), pad) and not torch.equal(noisy, enc["pixel_values"])
    assert len(ad.answer_token_distribution(images, ["Cat?", "Red?"]).texts) == 2


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


# ---------------------------------------------------------------------------------------------- transformers VLMs
HF_FAMILIES = ("qwen2_vl", "llava")
#: the same checks on the other families (slow: each model costs a few seconds to build)
MORE_FAMILIES = [pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2_5_vl", "llava_next")]


class _Models(dict):
    def __missing__(self, fam):
        from hero.testing.tiny_models import build_tiny_model

        self[fam] = build_tiny_model(fam)
        return self[fam]


@pytest.fixture(scope="module")
def hf_models():
    """Tiny random-init transformers VLMs by family (hero.testing.tiny_models, offline, built on first use)."""
    pytest.importorskip("transformers")
    return _Models()


def _hf_adapter(hf_models, fam, vcd=None, **kw):
    model, proc = hf_models[fam]
    return HFVLMAdapter(model.eval(), proc, vcd=vcd, max_new_tokens=kw.pop("max_new_tokens", 6), name=fam, **kw)


def _hf_questions(n=3):
    """n questions on images of different sizes (Qwen2-VL: different patch counts, so rows are packed/padded)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (28 + 14 * i, 56 - 7 * i, 3), dtype=np.uint8) for i in range(n)]
    questions = ["Is there a cat?", "Is there a dog in the picture?", "Red?", "Two?"][:n]
    return images, questions


@pytest.mark.parametrize("fam", HF_FAMILIES)
def test_hf_vcd_alpha_zero_is_greedy_and_batching_does_not_matter(hf_models, fam):
    images, questions = _hf_questions()
    greedy = _hf_adapter(hf_models, fam)
    g_new, g_logits = greedy._decode(*greedy._encode(images, questions))
    g_res = greedy.answer_token_distribution(images, questions)
    for beta in (0.0, 0.1):  # the cutoff never removes the argmax
        vcd = _hf_adapter(hf_models, fam, VCDConfig(alpha=0.0, beta=beta))
        new, logits = vcd._decode(*vcd._encode(images, questions))
        assert torch.equal(new, g_new)  # token for token
        res = vcd.answer_token_distribution(images, questions)
        assert res.texts == g_res.texts and res.predictions == g_res.predictions
        if beta == 0:  # the doubled batch runs the clean rows as greedy does, up to float32 rounding
            for z, zg in zip(logits, g_logits):
                torch.testing.assert_close(z, zg.float(), rtol=0, atol=2e-5)
            np.testing.assert_allclose(res.entropy, g_res.entropy, rtol=1e-6)
            np.testing.assert_allclose(res.confidence, g_res.confidence, rtol=1e-5)
    # batching: each question alone decodes the same tokens as in the batch (noise seeded per image)
    vcd = _hf_adapter(hf_models, fam, VCDConfig(alpha=1.0, beta=0.1))
    batch, b_logits = vcd._decode(*vcd._encode(images, questions))
    for i in (2, 0):
        one, o_logits = vcd._decode(*vcd._encode(images[i : i + 1], questions[i : i + 1]))
        T = one.shape[1]
        assert torch.equal(one[0], batch[i, :T]) and (T == batch.shape[1] or batch[i, T] == vcd.vlm.pad_token_id)
        torch.testing.assert_close(o_logits[0][0], b_logits[0][i], rtol=0, atol=2e-5)


def test_hf_decode_reports_the_scores_its_tokens_were_picked_from(hf_models):
    """A checkpoint's generation config (here a strong repetition penalty) must not make generate pick tokens
    from other scores than the logits the diagnosis reports, for greedy and VCD; the model's config is restored."""
    model, _ = hf_models["qwen2_vl"]
    before = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 3.0
    try:
        images, questions = _hf_questions()
        for vcd in (None, VCDConfig(alpha=1.0, beta=0.1)):
            ad = _hf_adapter(hf_models, "qwen2_vl", vcd, max_new_tokens=8)
            new, logits = ad._decode(*ad._encode(images, questions))
            live = new != ad.vlm.pad_token_id  # after its eos a row emits pads
            assert torch.equal(torch.stack([z.argmax(-1).cpu() for z in logits], 1)[live], new[live])
        assert model.generation_config.repetition_penalty == 3.0
    finally:
        model.generation_config.repetition_penalty = before

def _distinct_eos(new):
    """(token, row) such that ``row`` emits ``token`` at some step t and another row never does up to t + 1."""
    B, T = new.shape
    for t in range(T - 1):
        for r in range(B):
            tok = int(new[r, t])
            if tok not in new[r, :t].tolist() and any(tok not in new[s, : t + 2].tolist() for s in range(B) if s != r):
                return tok, r
    raise AssertionError(f"no row-specific token in {new.tolist()}")


@pytest.mark.parametrize("fam", list(HF_FAMILIES) + MORE_FAMILIES)
def test_hf_vcd_logits_equal_the_formula_from_two_explicit_forwards(hf_models, fam):
    images, questions = _hf_questions()
    cfg = VCDConfig(alpha=1.5, beta=0.9, noise_steps=300)  # beta near 1: the cutoff removes tokens
    ad = _hf_adapter(hf_models, fam, cfg)
    eos, row = _distinct_eos(ad._decode(*ad._encode(images, questions))[0])
    ad.vlm.eos_token_ids = list(ad.vlm.eos_token_ids) + [eos]  # one row stops early; the others go on
    enc, keys = ad._encode(images, questions)
    new, logits = ad._decode(enc, keys)
    stop = new[row].tolist().index(eos)
    assert stop < new.shape[1] - 1 and (new[row, stop + 1 :] == ad.vlm.pad_token_id).all()
    assert any(eos not in new[s].tolist() for s in range(len(images)) if s != row)
    noisy = ad._distorted(enc, keys)
    assert not torch.equal(noisy, enc["pixel_values"])
    if fam.startswith("qwen"):  # flat patches (channel, frame, pixel): the image's two frames got the same noise
        n = int(enc["image_grid_thw"][0].prod())
        fr = noisy[0, :n].view(n, 3, 2, -1)
        assert torch.equal(fr[:, :, 0], fr[:, :, 1])
    model = hf_models[fam][0]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    n_cut = 0
    with torch.no_grad():
        for t, z_vcd in enumerate(logits):  # step t: prompt + the t tokens decoded so far, no KV cache
            ids = torch.cat([enc["input_ids"], new[:, :t]], 1)
            mask = torch.cat([enc["attention_mask"], torch.ones_like(new[:, :t])], 1)
            z = [model(input_ids=ids, attention_mask=mask, use_cache=False,
                       **ad.vlm._model_inputs(dict(extra, pixel_values=pv), ids.shape[1])).logits[:, -1]
                 for pv in (enc["pixel_values"], noisy)]
            want = contrastive_logits(z[0], z[1], cfg.alpha, cfg.beta)
            assert torch.equal(torch.isinf(z_vcd), torch.isinf(want))
            torch.testing.assert_close(z_vcd[~torch.isinf(want)], want[~torch.isinf(want)], rtol=0, atol=5e-5)
            live = ~torch.isin(new[:, :t], torch.tensor(ad.vlm.eos_token_ids)).any(1)  # rows not finished yet
            assert torch.equal(new[live, t], want[live].argmax(-1))
            n_cut += int(torch.isinf(want).sum())
    assert 0 < n_cut < sum(z.numel() for z in logits)


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
                       (["--decode", "vcd", "--vcd-noise-steps", "x"], "--vcd-noise-steps must be an integer"),
                       (["--vcd-schedule", "vcd"], "--vcd-schedule needs --decode vcd"),
                       (["--decode", "vcd", "--vcd-schedule", "cosine"], "--vcd-schedule must be one of ddpm, vcd")]:
        assert diagnose_main(common + ["--out", str(tmp_path / "bad")] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_cli_vcd_on_a_transformers_vlm_folder(tmp_path):
    pytest.importorskip("transformers")
    from hero.testing.tiny_models import write_tiny_model

    model_dir = write_tiny_model("llava", str(tmp_path / "llava"))
    common = ["--model", model_dir, "--data", "digits_pope:1", "--sigmas", "0,50", "--max-new-tokens", "3",
              "--device", "cpu", "--threads", "1"]
    outs = {}
    for name, extra in [("greedy", []), ("vcd", ["--decode", "vcd"])]:
        assert diagnose_main(common + ["--out", str(tmp_path / name)] + extra, log=lambda *_: None) == 0
        with open(tmp_path / name / "diagnosis.json") as f:
            outs[name] = json.load(f)["per_sigma"]
    for sigma, r in outs["greedy"].items():  # reported exactly as for greedy
        assert set(outs["vcd"][sigma]) == set(r) and outs["vcd"][sigma]["pope"] is not None
        assert outs["vcd"][sigma]["mean_entropy"] != r["mean_entropy"]
    md = (tmp_path / "vcd" / "diagnosis.md").read_text()
    assert "## Decoding: visual contrastive decoding (VCD)" in md and "`vcd` diffusion schedule" in md


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~15 s on one CPU
def test_cli_vcd_on_a_transformers_vlm_folder_in_a_subprocess(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("transformers")
    from hero.testing.tiny_models import write_tiny_model

    model_dir, out = write_tiny_model("qwen2_vl", str(tmp_path / "qwen")), tmp_path / "out"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [repo] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    cmd = [sys.executable, "-m", "hero", "diagnose", "--model", model_dir, "--data", "digits_pope:1",
           "--sigmas", "0,50", "--max-new-tokens", "3", "--device", "cpu", "--decode", "vcd", "--vcd-schedule", "vcd",
           "--out", str(out)]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "diagnosis.json") as f:
        diag = json.load(f)
    assert diag["meta"]["decode"] == "vcd" and diag["meta"]["vcd"]["schedule"] == "vcd"
    assert diag["per_sigma"]["50"]["n"] == 3 and diag["per_sigma"]["50"]["pope"] is not None
    md = (out / "diagnosis.md").read_text()
    assert "## Decoding: visual contrastive decoding (VCD)" in md and "signal x0.864" in md
    bad = subprocess.run(cmd[:-2] + ["--vcd-beta", "-1", "--out", str(out)], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "hero diagnose: --vcd-beta must be in [0, 1], got -1.0"
