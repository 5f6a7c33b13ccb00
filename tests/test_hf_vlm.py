"""hero.models.hf_vlm: the trainer on transformers VLMs (tiny random-init Qwen2-VL and LLaVA, offline)."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from hero.config import TrainConfig, apply_overrides  # noqa: E402
from hero.data.jsonl import load_jsonl, save_image_png  # noqa: E402
from hero.models.hf_vlm import HFVLMAdapter, load_vlm  # noqa: E402
from hero.testing.tiny_models import load_processor, write_tiny_model  # noqa: E402
from hero.trainer import BadRowError, Trainer  # noqa: E402


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next")


def vowel_reward(completions, **_):
    """Continuous reward so random completions differ within a group."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        save_image_png(rng.integers(0, 255, (20 + 8 * i, 40, 3), dtype=np.uint8), str(root / f"im{i}.png"))
        lines.append({"image": f"im{i}.png", "question": f"Is there a {i} in the image?", "answer": "yes",
                      "id": f"r{i}"})
    (root / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for fam in FAMILIES:
        write_tiny_model(fam, str(root / fam))
    return root


def cfg_for(tmp_path, **over) -> TrainConfig:
    cfg = TrainConfig()
    apply_overrides(cfg, [("data.name", "jsonl"), ("data.path", "unused.jsonl"), ("generation.num_generations", 2),
                          ("generation.max_new_tokens", 5), ("gate.keep_frac", 1.0), ("loss.impl", "torch"),
                          ("batch_size", 2), ("lr", 1e-2), ("steps", 2), ("progress", False), ("device", "cpu"),
                          ("output_dir", str(tmp_path / "run"))] + list(over.items()))
    return cfg.validate()


def trainer_for(tiny_dir, tmp_path, fam, **over):
    model, ad = load_vlm(str(tiny_dir / fam), attn_implementation="sdpa", dtype=torch.float32)
    data = load_jsonl(str(tiny_dir / "data.jsonl"), load_images=False)
    return Trainer(cfg_for(tmp_path, **over), model=model, adapter=ad, dataset=data, reward_funcs=[vowel_reward])


@pytest.mark.parametrize("fam", [FAMILIES[0]] + [pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[1:]])
def test_trains_and_exports(tiny_dir, tmp_path, fam):
    from transformers import AutoModelForImageTextToText

    tr = trainer_for(tiny_dir, tmp_path, fam, **{"kl.beta": 0.05, "gate.enabled": False})
    frozen = [n for n, p in tr.model.named_parameters() if not p.requires_grad]
    assert frozen and all("visual" in n or "vision_tower" in n for n in frozen)  # model.freeze_vision default
    assert not any("merger" in n or "multi_modal_projector" in n for n in frozen)  # the projector trains
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.train()
    assert all(np.isfinite(m[k]) for k in ("loss", "entropy", "reward", "kl")) and m["grad_norm"] > 0
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert "lm_head.weight" in changed and not changed & set(frozen)
    path = tr.export()
    back = AutoModelForImageTextToText.from_pretrained(path)
    torch.testing.assert_close(back.lm_head.weight, tr.model.lm_head.weight)
    assert type(load_processor(path)).__name__ == type(tr.adapter.processor).__name__


@pytest.mark.parametrize("fam", FAMILIES)
def test_fused_path_matches_logits_and_never_runs_the_lm_head(tiny_dir, tmp_path, fam):
    tr = trainer_for(tiny_dir, tmp_path, fam, **{"kl.beta": 0.1, "num_iterations": 2, "micro_batch_size": 3,
                                                 "generation.temperature": 0.7, "gate.enabled": False})
    ro = tr.rollout()
    assert ro.kept.numel() == 4 and ro.old_logp is not None and ro.ref_logp is not None
    with torch.no_grad():  # old/ref differ from the policy: ratio and KL terms are exercised
        ro.old_logp += 0.3 * torch.randn_like(ro.old_logp)
        ro.ref_logp -= 0.1 * torch.rand_like(ro.ref_logp)
    grads, losses = {}, {}
    for path in ("logits", "fused"):
        tr.cfg.loss.path = path
        tr.model.zero_grad(set_to_none=True)
        if path == "fused":  # hidden states + lm_head.weight only: the head module never runs
            tr.model.lm_head.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("lm_head ran")))
        losses[path] = tr.backward(ro)["loss"]
        grads[path] = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    assert grads["fused"].keys() == grads["logits"].keys() and "lm_head.weight" in grads["fused"]
    for n, g in grads["logits"].items():
        torch.testing.assert_close(grads["fused"][n], g, atol=2e-5 * (g.abs().max().item() + 1e-12), rtol=1e-4, msg=n)
    assert losses["fused"] == pytest.approx(losses["logits"], rel=1e-5, abs=1e-7)


def test_sampled_image_token_ends_the_completion_and_is_not_an_image(tiny_dir, tmp_path):
    tr = trainer_for(tiny_dir, tmp_path, "qwen2_vl")
    ad: HFVLMAdapter = tr.adapter
    rows = [ad.prepare_row(r, r["question"], i) for i, r in enumerate(tr.dataset[:2])]
    enc = ad.encode(rows, [r["question"] for r in rows])
    assert enc["pixel_values"].shape[0] == 2  # flat Qwen patches packed per row (rows differ in size)
    comp = torch.tensor([[5, ad.image_token_id, 7], [ad.image_token_id, 6, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    from hero.rollout import completion_mask_from_eos

    assert torch.equal(completion_mask_from_eos(comp, ad.eos_token_ids), mask)
    ids = torch.cat([enc["input_ids"], comp], 1)
    am = torch.cat([enc["attention_mask"], mask], 1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    h = ad.hidden_states(tr.model, ids, am, **extra)  # would raise "image features and tokens do not match"
    assert h.shape[:2] == ids.shape and torch.isfinite(h).all()


def test_bad_image_rows_are_named_and_skipped(tiny_dir, tmp_path):
    tr = trainer_for(tiny_dir, tmp_path, "llava", **{"on_bad_row": "stop"})
    with pytest.raises(BadRowError, match=r"row id='x' \(index 0\): image does not load"):
        tr.adapter.prepare_row({"id": "x", "image": str(tmp_path / "missing.png")}, "q", 0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    data = [{"id": "bad", "image": str(tmp_path / "bad.png"), "question": "q", "answer": "yes"}]
    data += load_jsonl(str(tiny_dir / "data.jsonl"), load_images=False)
    tr = trainer_for(tiny_dir, tmp_path, "llava", **{"data.shuffle": False, "steps": 1})
    tr.dataset = data
    from hero.trainer import RowStream

    tr.rows = RowStream(len(data), 0, False)
    with pytest.warns(UserWarning, match="row id='bad'.*image does not load.*skipped"):
        tr.train_step()
    assert tr.bad_rows == ["id='bad' (index 0)"]


def test_max_pixels_limits_image_tokens(tiny_dir, tmp_path):
    model, ad = load_vlm(str(tiny_dir / "qwen2_vl"), attn_implementation="sdpa", dtype=torch.float32,
                         max_pixels=28 * 28)
    big = {"image": np.zeros((200, 300, 3), np.uint8)}
    row = ad.prepare_row(big, "q", 0)
    assert row["image"].shape[0] * row["image"].shape[1] <= 28 * 28
    enc = ad.encode([row], ["q"])
    assert int(enc["image_grid_thw"].prod()) == 4  # one 2x2 merge window: a single image token


def test_config_name_loads_the_vlm_folder(tiny_dir, tmp_path):
    """model.name = a VLM folder: build_policy picks HFVLMAdapter; model.freeze_vision false trains the tower."""
    over = {"model.name": str(tiny_dir / "llava"), "data.path": str(tiny_dir / "data.jsonl"), "steps": 1,
            "model.freeze_vision": False, "model.attn_implementation": "auto", "gate.enabled": False}
    tr = Trainer(cfg_for(tmp_path, **over), reward_funcs=[vowel_reward])
    assert isinstance(tr.adapter, HFVLMAdapter) and all(p.requires_grad for p in tr.model.parameters())
    assert tr.model.config._attn_implementation == "sdpa"  # auto on CPU
    m = tr.train()
    assert np.isfinite(m["entropy"]) and m["grad_norm"] > 0
    with pytest.raises(ValueError, match="data.image_field is empty"):
        Trainer(cfg_for(tmp_path, **over, **{"data.image_field": "", "output_dir": str(tmp_path / "run2")}),
                reward_funcs=[vowel_reward])
