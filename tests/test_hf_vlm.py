"""hero.models.hf_vlm: the trainer on transformers VLMs (tiny random-init Qwen2-VL and LLaVA, offline)."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from hero.config import TrainConfig, apply_overrides  # noqa: E402
from hero.data.jsonl import load_jsonl, save_image_png  # noqa: E402
from hero.models.hf_vlm import VISION_MODULE_NAMES, HFVLMAdapter, load_vlm  # noqa: E402
from hero.testing.tiny_models import load_processor, write_tiny_model  # noqa: E402
from hero.trainer import BadRowError, Trainer  # noqa: E402


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3")


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
    multi = [dict(lines[0], image=["im0.png", "im1.png"], question="<image> left, <image> right: the same?", id="m0"),
             dict(lines[2], id="m1"),  # one image, in the same batch as rows with two
             dict(lines[3], image=["im3.png", "im1.png"], question="Do these match?", id="m2")]
    (root / "multi.jsonl").write_text("\n".join(json.dumps(x) for x in multi) + "\n")
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


def trainer_for(tiny_dir, tmp_path, fam, data_file="data.jsonl", **over):
    model, ad = load_vlm(str(tiny_dir / fam), attn_implementation="sdpa", dtype=torch.float32)
    data = load_jsonl(str(tiny_dir / data_file), load_images=False)
    return Trainer(cfg_for(tmp_path, **over), model=model, adapter=ad, dataset=data, reward_funcs=[vowel_reward])


@pytest.mark.parametrize("fam", [FAMILIES[0]] + [pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[1:]])
def test_trains_and_exports(tiny_dir, tmp_path, fam):
    from transformers import AutoModelForImageTextToText

    tr = trainer_for(tiny_dir, tmp_path, fam, **{"kl.beta": 0.05, "gate.enabled": False})
    frozen = [n for n, p in tr.model.named_parameters() if not p.requires_grad]
    assert frozen and all(any(m in n for m in VISION_MODULE_NAMES) for n in frozen)  # model.freeze_vision default
    assert not any(m in n for n in frozen for m in ("merger", "multi_modal_projector", "connector"))  # projector trains
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
    assert ad.processor.image_processor.size["longest_edge"] == 28 * 28  # the processor's own pixel budget too


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


def own_forward_loss(tr, ro) -> float:
    """The loss of rollout ``ro`` from each completion's own processor output (its row alone, no padding, the
    user turn written out by hand) and the model's own forward (logits), through the trainer's loss."""
    proc, ad = tr.adapter.processor, tr.adapter
    G, labels = ro.group_size, ro.labels
    C = max(int((labels != -100).sum(1).max()), 1)
    logits = []
    for g in range(len(ro.row_indices)):  # the G completions of one row together: same prompt, no padding
        row = tr.dataset[ro.row_indices[g]]
        paths = row["image"] if isinstance(row["image"], list) else [row["image"]]
        q = row["question"]
        if "<image>" in q:  # "<image> left, <image> right: ..." -> images in place
            _, b, c = q.split("<image>")
            content = [{"type": "image"}, {"type": "text", "text": b}, {"type": "image"}, {"type": "text", "text": c}]
        else:
            content = [{"type": "image"}] * len(paths) + [{"type": "text", "text": q}]
        text = proc.apply_chat_template([[{"role": "user", "content": content}]], add_generation_prompt=True,
                                        tokenize=False)
        images = [ad.prepare_row({"image": p}, "", 0)["image"] for p in paths]
        enc = dict(proc(images=images * G, text=text * G, return_tensors="pt"))
        comp = ro.completion_ids[g * G:(g + 1) * G, :C].clone()
        comp[comp == ad.image_token_id] = ad.pad_token_id  # a sampled placeholder ends the completion anyway
        P = enc["input_ids"].shape[1]
        enc["input_ids"] = torch.cat([enc["input_ids"], comp], 1)
        enc["attention_mask"] = torch.cat([enc["attention_mask"], ro.completion_mask[g * G:(g + 1) * G, :C]], 1)
        for key in [key for key in enc if key.endswith("token_type_ids")]:
            enc[key] = torch.cat([enc[key], enc[key].new_zeros(G, C)], 1)
        logits.append(tr.model(**enc, use_cache=False).logits[:, P - 1: P - 1 + C])
    from hero_kernels.loss import hero_loss, loss_normalizer

    cfg = tr.cfg
    config = cfg.loss.hero_loss_config(beta=float(tr.kl_ctl.beta), temperature=float(cfg.generation.temperature),
                                       max_len=cfg.generation.max_new_tokens)
    assert ro.kept.tolist() == list(range(len(ro.row_indices) * G))  # every completion kept (no gate)
    adv = ro.advantages[ro.kept]
    loss, _ = hero_loss(torch.cat(logits), labels[:, :C], adv, config=config, old_logp=ro.old_logp[:, :C],
                        ref_logp=ro.ref_logp[:, :C], normalizer=float(loss_normalizer(labels, cfg.loss.loss_agg)),
                        ignore_index=-100)
    return float(loss)


@pytest.mark.parametrize("fam", ["qwen2_vl", "llava"] + [pytest.param(f, marks=pytest.mark.slow)
                                                         for f in ("qwen2_5_vl", "llava_next", "idefics3")])
def test_rows_with_several_images_train_and_match_the_models_own_forward(tiny_dir, tmp_path, fam):
    """A batch mixing 2-image rows (placeholders in the prompt or not) and a 1-image row: the trainer's per-row
    inputs, packed into one padding-free sequence, give the loss of the model's own forward on each row alone,
    and a step trains."""
    tr = trainer_for(tiny_dir, tmp_path, fam, "multi.jsonl", **{
        "kl.beta": 0.1, "num_iterations": 2, "batch_size": 3, "micro_batch_size": 6, "data.shuffle": False,
        "generation.temperature": 0.7, "gate.enabled": False, "data.prompt_template": "{question}"})
    assert tr.packing  # model.packing auto: the padding-free forward (tests/test_vlm_packing.py)
    tr.pack_always = True  # every micro-batch packed (auto + sdpa packs only where T^2 <= rows x width^2)
    ro = tr.rollout()
    assert sorted(ro.row_indices) == [0, 1, 2] and ro.kept.numel() == 6
    assert tr.adapter.encode([tr.adapter.prepare_row(r, r["question"], i) for i, r in enumerate(tr.dataset)],
                             [r["question"] for r in tr.dataset])["hero_n_images"].tolist() == [2, 1, 2]
    with torch.no_grad():
        ro.old_logp += 0.3 * torch.randn_like(ro.old_logp)
        ro.ref_logp -= 0.1 * torch.rand_like(ro.ref_logp)
        own = own_forward_loss(tr, ro)
    tr.model.zero_grad(set_to_none=True)
    loss = tr.backward(ro)["loss"]  # fused path on the batched, packed inputs
    assert loss == pytest.approx(own, rel=1e-4, abs=1e-6) and abs(own) > 1e-4
    assert np.isfinite(tr.optimizer_step()) and tr.model.lm_head.weight.grad is None  # stepped and zeroed


def test_image_count_errors_are_one_line(tiny_dir, tmp_path):
    tr = trainer_for(tiny_dir, tmp_path, "llava", "multi.jsonl")
    ad: HFVLMAdapter = tr.adapter
    row = tr.dataset[0]  # two images
    with pytest.raises(BadRowError, match=r"row id='m0' \(index 0\) has 2 image\(s\) but its prompt has 3 <image> "
                                          "placeholder"):
        ad.prepare_row(row, "<image> <image> <image> q", 0)
    with pytest.raises(BadRowError, match=r"field 'image' is an empty list"):
        ad.prepare_row(dict(row, image=[]), "q", 0)
    with pytest.raises(BadRowError, match=r"image 1 does not load"):
        ad.prepare_row(dict(row, image=[row["image"][0], str(tmp_path / "missing.png")]), "q", 0)
    ad.model_type = "blip-2"  # a model type whose processor takes one image per prompt
    with pytest.raises(BadRowError, match=r"has 2 images but blip-2 models take one image per prompt"):
        ad.prepare_row(row, "q", 0)
    assert ad.prepare_row(tr.dataset[1], "q", 1)["image"].ndim == 3  # one image: fine
    msg = str(pytest.raises(BadRowError, ad.prepare_row, row, "q", 0).value)
    assert "\n" not in msg

    class Refusing:  # a processor that takes one image per text (BLIP-style), for a type not in the list
        def __init__(self, proc):
            self.proc = proc

        def __getattr__(self, name):
            return getattr(self.proc, name)

        def __call__(self, images, text, **kw):
            if len(images) != len(text):
                raise ValueError("expected one image per text")
            return self.proc(images=images, text=text, **kw)

    ad.model_type, ad.processor = "llava", Refusing(ad.processor)
    rows = [ad.prepare_row(r, r["question"], i) for i, r in enumerate(tr.dataset)]
    assert ad.encode(rows[1:2], ["q"])["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=r"failed on rows with \[2, 1\] images \(ValueError: expected one image per "
                                         r"text\); keep one image per row for this model"):
        ad.encode(rows[:2], ["q", "q"])


def test_idefics3_splits_images_into_tiles(tiny_dir, tmp_path):
    """Idefics3 / SmolVLM: an image is resized, split into 56 x 56 tiles plus a global view, 4 tokens each;
    pixel_values [B, max tiles, 3, 56, 56] is per row already, padding tiles are all zero (the model drops them)."""
    _, ad = load_vlm(str(tiny_dir / "idefics3"), attn_implementation="sdpa", dtype=torch.float32)
    wide, square = np.zeros((20, 40, 3), np.uint8) + 9, np.zeros((30, 30, 3), np.uint8) + 9
    enc = ad.encode([{"image": wide}, {"image": square}, {"image": [square, wide]}], ["a", "b", "c"])
    assert enc["pixel_values"].shape == (3, 8, 3, 56, 56) and enc["pixel_attention_mask"].shape == (3, 8, 56, 56)
    tiles = (enc["pixel_values"].flatten(2) != 0).any(-1).sum(1).tolist()
    assert tiles == [3, 5, 8]  # 1 x 2 tiles + global; 2 x 2 + global; both
    assert enc["hero_n_image_tokens"].tolist() == [4 * t for t in tiles]
    _, small = load_vlm(str(tiny_dir / "idefics3"), attn_implementation="sdpa", dtype=torch.float32,
                        max_pixels=60 * 60)  # one tile edge: no splitting
    assert small.encode([{"image": wide}], ["a"])["pixel_values"].shape[1] == 1


def test_jsonl_image_lists(tiny_dir, tmp_path):
    rows = load_jsonl(str(tiny_dir / "multi.jsonl"), load_images=False)
    assert rows[0]["image"] == [str(tiny_dir / "im0.png"), str(tiny_dir / "im1.png")] and isinstance(rows[1]["image"], str)
    loaded = load_jsonl(str(tiny_dir / "multi.jsonl"))
    assert [im.shape for im in loaded[0]["image"]] == [(20, 40, 3), (28, 40, 3)]
    from hero.data.jsonl import JSONLFormatError

    for bad, msg in (([], "must be an image path or a non-empty list"), (["im0.png", 3], "non-empty list of paths"),
                     (["im0.png", "nope.png"], "image file not found")):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"image": bad, "question": "q", "answer": "yes"}) + "\n")
        with pytest.raises(JSONLFormatError, match=f"bad.jsonl, line 1: .*{msg}"):
            load_jsonl(str(tmp_path / "bad.jsonl"))
