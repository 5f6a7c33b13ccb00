"""hero trainer on CPU with tiny random-init models (no downloads): config loading, training steps, fused vs
unfused gradients, exact resume after a kill, atomic checkpoints, bad rows, the VLM adapter and the CLI."""
import json
import os

import pytest
import torch

from hero import checkpoint as ckpt
from hero.config import ConfigError, TrainConfig, apply_overrides, config_from_dict, load_config
from hero.trainer import BadRowError, Trainer


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def vowel_reward(completions, **_):
    """Continuous reward so random completions differ within a group (the gate keeps something)."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def rows(n=6):
    return [{"id": f"r{i}", "question": f"Is there a {i % 10} in the image?", "answer": "yes" if i % 2 else "no"}
            for i in range(n)]


def tiny_cfg(tmp_path, **over) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.name = "tiny-llama"
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads, cfg.model.intermediate_size = 32, 1, 2, 64
    cfg.data.image_field = ""
    cfg.generation.num_generations = 3
    cfg.generation.max_new_tokens = 6
    cfg.rewards.funcs = ["yes_no"]
    cfg.gate.keep_frac = 1.0
    cfg.loss.impl = "torch"
    cfg.batch_size = 2
    cfg.lr = 1e-2
    cfg.steps = 2
    cfg.progress = False
    cfg.export = False
    cfg.output_dir = str(tmp_path / "run")
    apply_overrides(cfg, [(k, v) for k, v in over.items()])
    return cfg.validate()


def make_trainer(cfg, data=None, rewards=(vowel_reward,)):
    return Trainer(cfg, dataset=data if data is not None else rows(), reward_funcs=list(rewards))


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def test_config_yaml_overrides_types_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-5\nloss:\n  kappa: 2\n  weight_on: negative\nrewards:\n  funcs: [yes_no, format]\n")
    cfg = load_config(str(p), ["--lr", "3e-4", "--loss.kappa=0.5", "--gate.keep_frac", "0.8", "--bf16",
                               "--rewards.weights", "1,0.5", "--generation.max-new-tokens", "12"])
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.loss.kappa == 0.5 and cfg.loss.weight_on == "negative" and cfg.gate.keep_frac == 0.8
    assert cfg.bf16 is True and cfg.rewards.weights == [1.0, 0.5] and cfg.generation.max_new_tokens == 12
    assert config_from_dict({"lr": "1e-5"}).lr == 1e-5  # YAML 1.1 reads 1e-5 as a string
    with pytest.raises(ConfigError, match="'loss.kapa'"):
        load_config(str(p), ["--loss.kapa", "1"])
    with pytest.raises(ConfigError, match="'optim'"):
        config_from_dict({"optim": {"lr": 1}})
    with pytest.raises(ConfigError, match="steps must be int"):
        load_config(None, ["--steps", "2.5"])
    with pytest.raises(ConfigError, match="gate.keep_frac"):
        load_config(None, ["--gate.keep_frac", "0"])
    with pytest.raises(ConfigError, match="kl.beta > 0"):
        load_config(None, ["--kl.target", "0.1"])
    with pytest.raises(ConfigError, match="'loss' is a section"):
        load_config(None, ["--loss", "1"])


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def test_training_steps_update_params_and_log(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"kl.beta": 0.05, "kl.target": 0.01, "kl.horizon": 10, "num_iterations": 2,
                                "micro_batch_size": 4})
    tr = make_trainer(cfg)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    m = tr.train()
    assert tr.step == 2 and torch.isfinite(torch.tensor(m["loss"]))
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed and len(changed) > 3
    lines = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2]
    for k in ("reward", "reward_std", "rewards/vowel/mean", "rewards/vowel/std", "frac_reward_zero_std",
              "gate/kept_frac", "gate/threshold", "gate/all_correct", "gate/all_wrong", "advantages/mean",
              "advantages/std", "entropy", "weights/max", "weights/effective_tokens", "kl", "beta",
              "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "completions/clipped_ratio",
              "tokens_per_s", "peak_memory_mb", "loss"):
        assert k in lines[-1], k
    assert lines[-1]["gate/kept_frac"] > 0 and lines[-1]["peak_memory_mb"] > 0
    # the balancer moved beta after each step and the logged beta is the one the step used
    assert lines[0]["beta"] == 0.05 and lines[1]["beta"] != 0.05 and tr.kl_ctl.beta != lines[1]["beta"]
    assert ckpt.find_checkpoint(cfg.output_dir).endswith("checkpoint-000002")


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_fused_logits_and_reference_paths_give_the_same_gradients(tmp_path, loss_agg):
    """One rollout; gradients of the fused path (hidden + lm_head weight), the materialized-logits path and the
    float64 reference, with KL, old log-probs (num_iterations 2), weight temperature and micro-batches."""
    cfg = tiny_cfg(tmp_path, **{"kl.beta": 0.1, "num_iterations": 2, "micro_batch_size": 4, "loss.kappa": 0.7,
                                "loss.loss_agg": loss_agg, "generation.temperature": 0.8})
    tr = make_trainer(cfg)
    ro = tr.rollout()
    assert ro.kept.numel() > 0
    with torch.no_grad():  # make old/ref differ from the policy so ratio and KL terms are exercised
        ro.old_logp = ro.old_logp + 0.3 * torch.randn_like(ro.old_logp)  # some ratios clip
        ro.ref_logp = ro.ref_logp - 0.1 * torch.rand_like(ro.ref_logp)
    grads, losses = {}, {}
    for path in ("fused", "logits", "reference"):
        tr.cfg.loss.path = path
        tr.model.zero_grad(set_to_none=True)
        m = tr.backward(ro)
        losses[path] = m["loss"]
        grads[path] = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    assert grads["fused"].keys() == grads["reference"].keys() and "lm_head.weight" in grads["fused"]
    for n, g in grads["reference"].items():
        scale = g.abs().max().item() + 1e-12
        torch.testing.assert_close(grads["fused"][n], g, atol=2e-5 * scale, rtol=1e-4, msg=n)
        torch.testing.assert_close(grads["logits"][n], g, atol=2e-5 * scale, rtol=1e-4, msg=n)
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-5, abs=1e-7)
    assert losses["logits"] == pytest.approx(losses["reference"], rel=1e-5, abs=1e-7)


def test_resume_after_kill_gives_the_same_next_step(tmp_path):
    over = {"steps": 3, "kl.beta": 0.05, "kl.target": 0.02, "kl.horizon": 20, "lr_schedule": "linear",
            "warmup_steps": 1, "micro_batch_size": 3}
    # uninterrupted: 3 steps
    a = make_trainer(tiny_cfg(tmp_path / "a", **over))
    for _ in range(3):
        ma = a.train_step()
    # killed run: 2 steps, checkpoint, process "dies"
    b = make_trainer(tiny_cfg(tmp_path / "b", **over))
    b.train_step()
    b.train_step()
    b.save()
    del b
    torch.manual_seed(1234)  # whatever the RNG did meanwhile must not matter
    c = make_trainer(tiny_cfg(tmp_path / "b", **over, resume="auto"))
    assert c.step == 2
    mc = c.train()
    assert c.step == 3
    for (n, pa), (_, pc) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(pa, pc), n
    assert mc["loss"] == ma["loss"] and mc["reward"] == ma["reward"] and mc["beta"] == ma["beta"]
    assert c.kl_ctl.beta == a.kl_ctl.beta and c.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    assert a.last_rollout.texts == c.last_rollout.texts
    steps = [json.loads(x)["step"] for x in open(os.path.join(tmp_path / "b" / "run", "metrics.jsonl"))]
    assert steps == [3]  # the killed run logged nothing through train(); the resumed one logs step 3


def test_checkpoint_is_atomic_when_the_save_crashes(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, steps=1)
    tr = make_trainer(cfg)
    tr.train_step()
    first = tr.save()
    tr.train_step()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save({"partial": True}, f)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.find_checkpoint(cfg.output_dir) == first
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(cfg.output_dir)] == ["checkpoint-000001"]
    assert not [n for n in os.listdir(cfg.output_dir) if n.startswith(".tmp")]
    assert ckpt.load_checkpoint(first)["step"] == 1


def test_bad_rows_skip_or_stop_naming_the_row(tmp_path):
    data = rows(6)
    del data[2]["answer"]

    def nan_for_r3(completions, id, **_):
        return [float("nan") if i == "r3" else 0.5 * (k % 2) for k, i in enumerate(id)]

    cfg = tiny_cfg(tmp_path, **{"data.shuffle": False, "steps": 2, "batch_size": 2})
    tr = Trainer(cfg, dataset=data, reward_funcs=[nan_for_r3])
    with pytest.warns(UserWarning) as rec:
        tr.train_step()  # rows r0, r1
        m = tr.train_step()  # r2 skipped -> r3 (NaN reward -> group dropped) + r4
    msgs = [str(r.message) for r in rec]
    assert any("id='r2' (index 2) is missing required field(s) ['answer']" in x for x in msgs), msgs
    assert any("id='r3' (index 3): reward nan_for_r3 returned NaN" in x for x in msgs), msgs
    assert "id='r2' (index 2)" in tr.bad_rows and "id='r3' (index 3)" in tr.bad_rows
    assert m["bad_rows"] == 1 and m["gate/kept_frac"] == 0.5
    # stop: the error names the row; the checkpoint written before is intact
    cfg = tiny_cfg(tmp_path / "stop", **{"data.shuffle": False, "on_bad_row": "stop", "batch_size": 2})
    tr = Trainer(cfg, dataset=data, reward_funcs=[nan_for_r3])
    tr.train_step()
    saved = tr.save()
    with pytest.raises(BadRowError, match=r"id='r2' \(index 2\) is missing required field"):
        tr.train_step()
    assert ckpt.find_checkpoint(cfg.output_dir) == saved and ckpt.load_checkpoint(saved)["step"] == 1


def test_tiny_vlm_adapter_trains_and_skips_an_image_that_does_not_load(tmp_path):
    from hero.experiments.confidence_trap.digits_pope import build_digits_pope

    data = build_digits_pope(4, splits=("random",))
    data[1]["image"] = str(tmp_path / "missing.png")
    cfg = tiny_cfg(tmp_path, **{"model.name": "tiny-vlm", "data.image_field": "image", "data.shuffle": False,
                                "steps": 1})
    tr = Trainer(cfg, dataset=data, reward_funcs=[vowel_reward])
    before = tr.model.vision.patch.weight.clone()
    with pytest.warns(UserWarning, match=r"id='train-random-00001'.*image does not load"):
        m = tr.train_step()
    assert "pixel_values" in tr.last_rollout.prompt and m["gate/kept_frac"] > 0
    assert not torch.equal(before, tr.model.vision.patch.weight)  # gradients reached the vision tower


def test_hf_tokenizer_adapter_roundtrip():
    """CausalLMAdapter with a transformers PreTrainedTokenizerFast (WordLevel, built offline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hero.rollout import CausalLMAdapter, build_tiny_llama

    words = ["<pad>", "<unk>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>", "yes", "no",
             "is", "there", "a", "?"] + [str(i) for i in range(10)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[^>]+>|\w+|[^\w\s]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    model, _ = build_tiny_llama(32, 1, 2, 64, tokenizer=tok)
    ad = CausalLMAdapter(tok)
    enc = ad.encode([{}, {}], ["is there a 7 ?", "a 3"])
    assert enc["attention_mask"][1, 0] == 0  # left padding
    torch.manual_seed(0)
    comp, mask = ad.generate(model.eval(), enc, max_new_tokens=5, temperature=1.0)
    assert comp.shape[0] == 2 and mask.shape == comp.shape and (mask[:, 0] == 1).all()
    h = ad.hidden_states(model, torch.cat([enc["input_ids"], comp], 1), torch.cat([enc["attention_mask"], mask], 1))
    assert h.shape[:2] == (2, enc["input_ids"].shape[1] + comp.shape[1]) and h.shape[2] == 32
    assert all(isinstance(t, str) for t in ad.decode(comp, mask))


def test_cli_train_and_errors(tmp_path, capsys):
    from hero.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(
        "model: {name: tiny-llama, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}\n"
        "data: {n_per_split: 4, splits: [random], image_field: ''}\n"
        "generation: {num_generations: 2, max_new_tokens: 4}\n"
        "loss: {impl: torch}\nbatch_size: 2\nsteps: 1\nprogress: false\n"
    )
    out = str(tmp_path / "run")
    assert main(["train", "--config", str(p), "--output_dir", out, "--lr", "1e-3"]) == 0
    assert os.path.isfile(os.path.join(out, "metrics.jsonl")) and os.path.isdir(os.path.join(out, "final"))
    assert ckpt.find_checkpoint(out) is not None
    # the exported tiny-llama (+ its offline tokenizer) loads back as a policy
    assert main(["train", "--config", str(p), "--output_dir", str(tmp_path / "run2"), "--model.name",
                 os.path.join(out, "final"), "--export", "false"]) == 0
    assert main(["train", "--config", str(p), "--loss.kapa", "1"]) == 2
    assert "unknown config key 'loss.kapa'" in capsys.readouterr().err
    assert main(["nope"]) == 2


def test_micro_batches_give_the_full_batch_gradient(tmp_path):
    """The global normalizer makes gradient accumulation over micro-batches exact (no double division)."""
    for agg in ("seq-mean-token-mean", "token-mean"):
        tr = make_trainer(tiny_cfg(tmp_path, **{"loss.loss_agg": agg}))
        ro = tr.rollout()
        grads = []
        for mb in (0, 2):
            tr.cfg.micro_batch_size = mb
            tr.model.zero_grad(set_to_none=True)
            tr.backward(ro)
            grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[1][n], g, atol=1e-6 * (g.abs().max().item() + 1e-12), rtol=1e-5, msg=n)


def test_loss_metrics_combine_micro_batches_and_cover_every_metric_key():
    from hero.trainer import COUNTS, MAXIMA, MINIMA, RESPONSE_MEANS, TOKEN_MEANS, LossMetrics
    from hero_kernels.loss import METRIC_KEYS

    assert sorted(TOKEN_MEANS + RESPONSE_MEANS + MAXIMA + MINIMA + COUNTS) == sorted(METRIC_KEYS)
    acc = LossMetrics()
    acc.add(0.5, {"entropy/mean": 1.0, "kl": 0.1, "clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0,
                  "weights/effective_tokens": 2.0, "entropy/max": 3.0, "weights/max": 1.5, "entropy/min": 0.2,
                  "tokens": 3.0, "responses": 1.0})
    acc.add(0.25, {"entropy/mean": 2.0, "kl": 0.4, "clip_ratio/low_mean": 1.0, "clip_ratio/high_mean": 0.0,
                   "weights/effective_tokens": 4.0, "entropy/max": 2.5, "weights/max": 1.9, "entropy/min": 0.1,
                   "tokens": 1.0, "responses": 3.0})
    out = acc.result()
    assert out["loss"] == 0.75 and out["tokens"] == 4.0
    assert out["entropy/mean"] == pytest.approx((3 * 1.0 + 1 * 2.0) / 4) and out["kl"] == pytest.approx(0.7 / 4)
    assert out["weights/effective_tokens"] == pytest.approx((2.0 + 12.0) / 4)
    assert (out["entropy/max"], out["weights/max"], out["entropy/min"]) == (3.0, 1.9, 0.1)


def test_micro_batch_tokens_packs_by_length_and_keeps_the_gradient(tmp_path):
    """Token-budget micro-batches, padded layout: length-sorted groups within rows x (P + longest) <= budget, the
    same gradient (the packed layout's budget: tests/test_packing.py)."""
    tr = make_trainer(tiny_cfg(tmp_path, **{"gate.enabled": False, "generation.max_new_tokens": 8,
                                            "model.packing": "off"}))
    ro = tr.rollout()
    ro.labels[0, 2:] = -100  # lengths differ: one short completion
    grads, packs = [], None
    for budget in (0, 2 * (ro.prompt_len + 8)):
        tr.cfg.micro_batch_tokens = budget
        if budget:
            packs = tr._micro_batches(ro)
        tr.model.zero_grad(set_to_none=True)
        tr.backward(ro)
        grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    lengths = (ro.labels != -100).sum(1).clamp_min(1)
    assert sorted(torch.cat(packs).tolist()) == list(range(ro.labels.shape[0])) and len(packs) > 1
    for p in packs:
        assert len(p) == 1 or len(p) * (ro.prompt_len + int(lengths[p].max())) <= tr.cfg.micro_batch_tokens
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6 * (g.abs().max().item() + 1e-12), rtol=1e-5, msg=n)


def test_gradient_checkpointing_switches_on_for_long_completions(tmp_path):
    tr = make_trainer(tiny_cfg(tmp_path, **{"gate.enabled": False, "model.gradient_checkpointing_min_len": 3}))
    ro = tr.rollout()
    seen = []
    hook = tr.model.model.layers[0].register_forward_pre_hook(
        lambda mod, args: seen.append(bool(getattr(mod, "gradient_checkpointing", False))))
    tr.backward(ro)
    assert seen and all(seen) and not tr.model.is_activation_checkpointing  # on during the pass, off after
    seen.clear()
    tr.cfg.model.gradient_checkpointing_min_len = 10_000
    tr.backward(ro)
    hook.remove()
    assert seen and not any(seen)
