"""Padding-free (packed) forward of transformers VLMs (hero.models.hf_vlm): on tiny LLaVA / LLaVA-NeXT /
Idefics3 (1-D positions) and Qwen2-VL / Qwen2.5-VL (per-row M-RoPE ids + a text-position row), rows of different
lengths and image counts (a 2-image row between 1-image rows) give the padded layout's per-token log-probs,
entropies, loss and parameter gradients; editing one row's image and tokens leaves every other row unchanged;
other model types keep refusing with the reason."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from hero.models.hf_vlm import HFVLMAdapter  # noqa: E402
from hero.rollout import IGNORE_INDEX, completion_hidden, completion_labels, completion_mask_from_eos, pack_rows  # noqa: E402
from hero_kernels import hero_loss, linear_entropy_logprob  # noqa: E402
from tests.test_packing import assert_layouts_agree, assert_trainer_layouts_agree  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3")  # each test < 4 s on CPU
#: image sizes per row: a 2-image row in the middle; Qwen grids of 2x1, 1x2, 2x2 and 1x2 merged tokens (M-RoPE
#: ids then differ from 1-D positions), LLaVA-NeXT / Idefics3 token counts that depend on the size
IMAGES = [[(56, 28)], [(28, 56), (56, 56)], [(30, 50)]]
QUESTIONS = ["What is it?", "<image> left, <image> right: are they the same picture?", "Colour?"]
COMPLETION = [9, 3, 14]  # scored tokens per row; row 0's last one is a sampled image placeholder (an eos)


def _model(fam, attn="sdpa"):
    from hero.testing.tiny_models import build_tiny_model

    model, proc = build_tiny_model(fam, hidden_size=32, num_layers=2, seed=1)
    model.config._attn_implementation = attn
    for sub in (getattr(model.config, "text_config", None), getattr(model.config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = attn
    return model.float(), HFVLMAdapter(proc, model)


def _rows(adapter, seed=0, edit_row=None):
    """Padded rows [prompt | completion]: input_ids / attention_mask [3, P + C], labels [3, C], extra (per row).
    ``edit_row``: that row gets other image pixels (same sizes) and other completion tokens."""
    rows = []
    for i, sizes in enumerate(IMAGES):
        r = np.random.default_rng(100 + i + (1000 if i == edit_row else 0))
        rows.append({"image": [r.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]})
    enc = adapter.encode(rows, QUESTIONS)
    C = max(COMPLETION)
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(40, 120, (3, C), generator=g)  # byte tokens: no special or image token
    if edit_row is not None:
        comp[edit_row] = torch.randint(40, 120, (C,), generator=torch.Generator().manual_seed(seed + 7))
    for i, c in enumerate(COMPLETION):
        comp[i, c - 1] = adapter.eos_token_ids[0]
        comp[i, c:] = adapter.pad_token_id
    comp[0, COMPLETION[0] - 1] = adapter.image_token_id  # a sampled placeholder: scored, but pad as an input
    cmask = completion_mask_from_eos(comp, adapter.eos_token_ids)
    assert cmask.sum(1).tolist() == COMPLETION
    ids = torch.cat([enc.pop("input_ids"), comp], 1)
    mask = torch.cat([enc.pop("attention_mask"), cmask], 1)
    return ids, mask, completion_labels(comp, cmask), enc


def _scored(adapter, model, ids, mask, labels, extra, layout):
    """Hidden states that predict the scored tokens [N, D] (row order) and their labels [N], in ``layout``."""
    pk = pack_rows(ids, mask, labels)
    if layout == "padded":
        P, C = ids.shape[1] - labels.shape[1], labels.shape[1]
        h = completion_hidden(adapter.hidden_states(model, ids, mask, **extra), P, C)[pk.row, pk.col]
    else:
        h = adapter.packed_hidden_states(model, pk.input_ids, pk.position_ids, padded_mask=mask, **extra)
        h = h[0, pk.hidden_index]
    return h, labels[pk.row, pk.col], pk


@pytest.mark.parametrize("fam", FAMILIES)
def test_packed_vlm_forward_matches_padded_logp_entropy_loss_and_grads(fam):
    model, adapter = _model(fam)
    assert adapter.packing_unsupported(model) is None
    ids, mask, labels, extra = _rows(adapter)
    assert extra["hero_n_images"].tolist() == [1, 2, 1]
    assert (mask.sum(1) - torch.tensor(COMPLETION)).unique().numel() == 3  # prompts of three different lengths
    head = model.lm_head.weight
    C = labels.shape[1]
    out = {}
    for layout in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        h, y, pk = _scored(adapter, model, ids, mask, labels, extra, layout)
        logp, H = linear_entropy_logprob(h, head, y, impl="torch")
        adv = torch.tensor([1.0, -0.5, 0.25])[pk.row]
        loss, _ = hero_loss(h, y, adv, weight=head, seq_ids=pk.row, impl="torch", max_len=C)
        (loss + (logp * 0.01).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[layout] = (logp.detach(), H.detach(), loss.detach(), grads)
    assert out["packed"][0].shape == (sum(COMPLETION),)
    g0 = out["padded"][3]
    vision = [n for n in g0 if any(k in n for k in ("visual", "vision_tower", "vision_model"))]
    assert vision and any(g0[n].abs().max() > 0 for n in vision)  # the images reach the loss
    assert_layouts_agree(out["padded"], out["packed"])


@pytest.mark.parametrize("fam", FAMILIES)
def test_packed_vlm_rows_do_not_leak(fam):
    """Row 1 (2 images, middle) gets other images and completion tokens: its states change, those of the
    earlier row 0 and the later row 2 stay bit-for-bit close (block-diagonal mask, per-row images / positions)."""
    model, adapter = _model(fam)
    with torch.no_grad():
        h0, _, pk = _scored(adapter, model, *_rows(adapter), "packed")
        h1, _, _ = _scored(adapter, model, *_rows(adapter, edit_row=1), "packed")
    row = pk.row
    assert not torch.allclose(h0[row == 1], h1[row == 1])
    torch.testing.assert_close(h1[row != 1], h0[row != 1], atol=1e-6, rtol=0)


def test_packing_refuses_unverified_vlms_and_unsupported_attention_with_the_reason():
    model, adapter = _model("llava")
    adapter.model_type = "gemma3"
    assert "verified only for llava, llava_next, idefics3, qwen2_vl, qwen2_5_vl" in adapter.packing_unsupported(model)
    model, adapter = _model("qwen2_vl", attn="flex_attention")
    assert "attention implementation 'flex_attention'" in adapter.packing_unsupported(model)
    with pytest.raises(ValueError, match="needs padded_mask"):
        adapter.packed_hidden_states(model, torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None])


def test_trainer_packed_vlm_step_equals_padded(tmp_path):
    """Trainer.backward with model.packing on vs off on one Qwen2-VL rollout (1- and 2-image rows, KL term, old
    log-probs, token-budget micro-batches of several rows): the same log-probs, loss, metrics and gradients."""
    from hero.trainer import Trainer
    from tests.test_hf_vlm import cfg_for, vowel_reward

    model, adapter = _model("qwen2_vl")
    rng = np.random.default_rng(0)
    data = [{"image": [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes], "question": q,
             "answer": "yes", "id": str(i)} for i, (sizes, q) in enumerate(zip(IMAGES, QUESTIONS))]
    cfg = cfg_for(tmp_path, **{"kl.beta": 0.1, "num_iterations": 2, "batch_size": 3, "data.shuffle": False,
                               "gate.enabled": False, "data.prompt_template": "{question}",
                               "generation.max_new_tokens": 8})
    tr = Trainer(cfg, model=model, adapter=adapter, dataset=data, reward_funcs=[vowel_reward])
    assert tr.packing
    ro = tr.rollout()
    ro.labels[0, 2:] = IGNORE_INDEX  # one short completion: pad tokens in the padded layout
    budget = int(ro.prompt["attention_mask"].sum(1).max()) * 2 + 16
    assert_trainer_layouts_agree(tr, ro, micro_batch_tokens=budget)
    tr.packing = tr.pack_always = True
    groups = tr._micro_batches(ro)
    assert len(groups) > 1 and max(len(g) for g in groups) > 1  # several forwards, each of several rows
