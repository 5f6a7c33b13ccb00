"""HEROGRPOTrainer on a vision-language model: a tiny random-init Qwen2-VL with TRL's image column (offline)."""
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
G = 2


def spread_reward(completions, **_):
    return [float(sum(map(ord, str(c))) % 3) for c in completions]


@pytest.fixture(scope="module")
def vlm_batch(tmp_path_factory):
    """A HEROGRPOTrainer (KL on, no gate) on tiny Qwen2-VL and one scored batch with perturbed old log-probs."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from trl import GRPOTrainer

    from hero.integrations.trl import HEROGRPOConfig, HEROGRPOTrainer
    from hero.testing.tiny_models import load_processor, write_tiny_model

    root = tmp_path_factory.mktemp("trl_vlm")
    path = write_tiny_model("qwen2_vl", str(root / "qwen2_vl"))
    model = AutoModelForImageTextToText.from_pretrained(path)
    rng = np.random.default_rng(0)
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Is there a {i}?"}]}]
                   for i in range(4)],
        "image": [Image.fromarray(rng.integers(0, 255, (28 + 8 * (i % 3), 56, 3), dtype=np.uint8)) for i in range(4)],
    })
    args = HEROGRPOConfig(output_dir=str(root / "out"), per_device_train_batch_size=4 * G, num_generations=G,
                          max_completion_length=5, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                          hero_impl="torch", seed=0, disable_dropout=True, beta=0.04, variance_gate=False,
                          entropy_weighting=False)
    tr = HEROGRPOTrainer(model=model, reward_funcs=spread_reward, args=args, train_dataset=ds,
                         processing_class=load_processor(path))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    torch.manual_seed(1)
    out = tr._generate_and_score_completions([dict(ds[i]) for i in range(4) for _ in range(G)])
    assert out["pixel_values"] is not None and out["mm_token_type_ids"] is not None
    with torch.no_grad():
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        T = out["completion_ids"].size(1)
        mm = {k: out[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(tr, tr.model, ids, am, T, num_images=out["num_images"], **mm)
    out["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
    out["ref_per_token_logps"] = logps - 0.1 * torch.rand(logps.shape, generator=torch.Generator().manual_seed(3))
    return tr, out


def _loss_and_grads(tr, fn, inputs):
    tr.model.zero_grad(set_to_none=True)
    loss = fn(tr.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    tr.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("weighting", [False, True])
def test_fused_path_equals_logits_path(vlm_batch, weighting):
    tr, inputs = vlm_batch
    tr.args.entropy_weighting, tr.args.kappa = weighting, 0.5
    res = {}
    try:
        for path in ("fused", "logits"):
            tr.hero_lm_head_path = path
            res[path] = _loss_and_grads(tr, tr.compute_loss, inputs)
    finally:
        tr.args.entropy_weighting, tr.args.kappa, tr.hero_lm_head_path = False, 1.0, "fused"
    (lf, gf), (ll, gl) = res["fused"], res["logits"]
    torch.testing.assert_close(lf, ll, atol=1e-7, rtol=1e-5)
    assert gf.keys() == gl.keys() and any(n.startswith("model.visual") for n in gf)  # gradients reach the vision tower
    for n, g in gl.items():
        torch.testing.assert_close(gf[n], g, atol=1e-7, rtol=2e-4, msg=lambda m: f"{n}: {m}")
    assert abs(float(lf)) > 1e-4  # the perturbed old / ref log-probs make a real loss


def test_weighting_off_equals_trl_own_grpo_loss(vlm_batch):
    from trl import GRPOTrainer

    tr, inputs = vlm_batch
    l_trl, g_trl = _loss_and_grads(tr, lambda m, x: GRPOTrainer.compute_loss(tr, m, x), inputs)
    l_hero, g_hero = _loss_and_grads(tr, tr.compute_loss, inputs)
    torch.testing.assert_close(l_hero, l_trl, atol=1e-7, rtol=1e-5)
    for n, g in g_trl.items():
        torch.testing.assert_close(g_hero[n], g, atol=1e-7, rtol=2e-4, msg=lambda m: f"{n}: {m}")
