"""Engine integrations: hero.integrations.trl (HEROGRPOTrainer) and hero.integrations.verl (loss_mode=hero).

TRL tests build a tiny random Llama + an offline word-level tokenizer + an in-memory dataset (no downloads) and
skip when trl is not installed. verl tests that need verl itself skip with the import error when verl is not
importable; the verl policy loss is always checked against hero_kernels.reference without verl.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hero_kernels import reference as R

HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install 'hero-kernels[integrations]')")

from hero.integrations import verl as hv  # noqa: E402  (must import without verl)

needs_verl = pytest.mark.skipif(not hv.VERL_AVAILABLE, reason=f"verl is not importable: {hv.VERL_IMPORT_ERROR}")


def _close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=atol, rtol=rtol)


# ==============================================================================================
# TRL
# ==============================================================================================
WORDS = ["<pad>", "<eos>", "<unk>"] + [chr(ord("a") + i) for i in range(26)] + ["yes", "no", "?"]
G = 3  # completions per prompt


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _dataset(n=8):
    from datasets import Dataset

    letters = "abcdefghijklmnopqrstuvwxyz"
    return Dataset.from_dict({"prompt": [" ".join(letters[i:i + 3]) + " ?" for i in range(n)]})


def spread_reward(completions, **_):
    """Deterministic, content-dependent reward in {0, 1, 2}: most groups have non-zero variance."""
    return [float(sum(map(ord, c)) % 3) for c in completions]


def _args(tmp, **kw):
    from hero.integrations.trl import HEROGRPOConfig

    base = dict(output_dir=str(tmp), per_device_train_batch_size=4 * G, num_generations=G, max_completion_length=5,
                learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                hero_impl="torch", seed=0, disable_dropout=True)
    base.update(kw)
    return HEROGRPOConfig(**base)


def _trainer(tmp, **kw):
    """A HEROGRPOTrainer on a fresh tiny model, saved first: with beta != 0 TRL loads the reference model from
    the policy's config name (a local folder here, no download)."""
    from hero.integrations.trl import HEROGRPOTrainer

    model = _model()
    path = os.path.join(str(tmp), "tiny-llama")
    if not os.path.isdir(path):
        model.save_pretrained(path)
    model.config._name_or_path = path
    return HEROGRPOTrainer(model=model, reward_funcs=spread_reward, args=_args(tmp, **kw), train_dataset=_dataset(),
                           processing_class=_tokenizer())


def _rows(tr, n_prompts=4):
    ds = tr.train_dataset
    return [dict(ds[i]) for i in range(n_prompts) for _ in range(G)]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_trl
def test_trl_config_validation(tmp_path):
    from hero.integrations.trl import HEROGRPOConfig

    with pytest.raises(ValueError, match="loss_type='cispo'"):
        _args(tmp_path, loss_type="cispo")
    with pytest.raises(ValueError, match="kappa"):
        _args(tmp_path, kappa=0.0)
    with pytest.raises(ValueError, match="weight_on"):
        _args(tmp_path, weight_on="positive")
    with pytest.raises(ValueError, match="keep_frac"):
        _args(tmp_path, keep_frac=1.5)
    with pytest.raises(ValueError, match="needs beta > 0"):
        _args(tmp_path, kl_target=0.1, beta=0.0)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        _args(tmp_path, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        _args(tmp_path, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="loss_agg"):
        _args(tmp_path, loss_agg="sum")
    a = _args(tmp_path, loss_type="dr_grpo")
    assert isinstance(a, HEROGRPOConfig) and a.hero_loss_agg == "seq-mean-token-sum-norm"
    assert _args(tmp_path, loss_type="grpo").hero_loss_agg == "seq-mean-token-mean"
    assert _args(tmp_path, loss_type="grpo", loss_agg="token-mean").hero_loss_agg == "token-mean"


@pytest.fixture(scope="module")
def trl_batch(tmp_path_factory):
    """One trainer (no gate, KL on) and one scored generation batch with perturbed old log-probs (clipping active)."""
    if not HAS_TRL:
        pytest.skip("trl is not installed")
    from trl import GRPOTrainer

    tr = _trainer(tmp_path_factory.mktemp("trl"), beta=0.04, entropy_weighting=False, variance_gate=False,
                  loss_type="grpo")
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    torch.manual_seed(1)
    out = tr._generate_and_score_completions(_rows(tr))
    # old log-probs = current ones + noise: ratios spread over [~0.6, ~1.7], so both clip sides are exercised
    with torch.no_grad():
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        T = out["completion_ids"].size(1)
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(tr, tr.model, ids, am, T)
    g = torch.Generator().manual_seed(2)
    out["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=g)
    assert out["completion_mask"].sum(1).min() > 0  # no empty completion: TRL's and our denominators agree
    return tr, out


@needs_trl
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_trl_grad_matches_trl_grpo_loss(trl_batch, loss_type):
    """Entropy weighting off: our loss (fused hidden + lm_head) and its gradients equal TRL's own GRPO loss."""
    from trl import GRPOTrainer

    from hero.integrations.trl import LOSS_TYPE_TO_AGG

    tr, inputs = trl_batch
    tr.loss_type, tr.hero_loss_agg = loss_type, LOSS_TYPE_TO_AGG[loss_type]
    tr.model.zero_grad(set_to_none=True)
    loss_trl = GRPOTrainer.compute_loss(tr, tr.model, inputs)  # TRL's _compute_loss (logits path)
    loss_trl.backward()
    g_trl = _grads(tr.model)
    tr.model.zero_grad(set_to_none=True)
    loss_hero = tr.compute_loss(tr.model, inputs)
    loss_hero.backward()
    g_hero = _grads(tr.model)
    tr.model.zero_grad(set_to_none=True)
    _close(loss_hero, loss_trl, atol=1e-7, rtol=1e-5)
    assert g_trl.keys() == g_hero.keys() and len(g_trl) > 0
    for n in g_trl:
        torch.testing.assert_close(g_hero[n], g_trl[n], atol=1e-7, rtol=2e-4, msg=lambda m: f"{n}: {m}")
    # clipping was really exercised, and our metrics carry TRL's names
    m = tr._metrics["train"]
    assert m["clip_ratio/low_mean"][-1] + m["clip_ratio/high_mean"][-1] > 0
    for k in ("entropy", "kl", "weights/max", "weights/effective_tokens"):
        assert k in m


@needs_trl
def test_trl_fused_equals_logits_path_with_weighting(trl_batch):
    """HERO weighting on: the fused (hidden + lm_head) path equals hero_loss on the materialized logits."""
    tr, inputs = trl_batch
    tr.loss_type, tr.hero_loss_agg = "grpo", "seq-mean-token-mean"
    tr.args.entropy_weighting, tr.args.kappa = True, 0.5
    try:
        res = {}
        for path in ("fused", "logits"):
            tr.hero_lm_head_path = path
            tr.model.zero_grad(set_to_none=True)
            loss = tr.compute_loss(tr.model, inputs)
            loss.backward()
            res[path] = (loss.detach(), _grads(tr.model))
        _close(res["fused"][0], res["logits"][0], atol=1e-7, rtol=1e-5)
        for n, g in res["logits"][1].items():
            torch.testing.assert_close(res["fused"][1][n], g, atol=1e-7, rtol=2e-4)
        assert tr._metrics["train"]["weights/max"][-1] > 1.0  # weights really differ from 1
    finally:
        tr.args.entropy_weighting, tr.args.kappa, tr.hero_lm_head_path = False, 1.0, "fused"
        tr.model.zero_grad(set_to_none=True)


@needs_trl
def test_trl_variance_gate_postprocessing(trl_batch):
    """The gate keeps ceil(keep_frac * groups) non-zero-variance groups, zeroes the rest's advantages, and the
    stored normalizer counts only kept responses."""
    from hero.grpo import variance_gate

    tr, _ = trl_batch
    tr.args.variance_gate, tr.args.keep_frac = True, 0.5
    try:
        torch.manual_seed(3)
        rows = _rows(tr)
        out = tr._generate_and_score_completions(rows)
    finally:
        tr.args.variance_gate, tr.args.keep_frac = False, 0.6
    texts = tr.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    r = torch.tensor(spread_reward(texts), dtype=torch.float64)
    res = variance_gate(r.view(-1, G), keep_frac=0.5)
    keep = torch.zeros(len(rows))
    for gi in res.kept.tolist():
        keep[gi * G:(gi + 1) * G] = 1.0
    _close(out["hero_keep"], keep)
    assert float(out["hero_num_seqs"]) == float(keep.sum())
    assert float(out["hero_num_tokens"]) == float((out["completion_mask"].sum(1) * keep).sum())
    assert torch.all(out["advantages"][keep == 0] == 0)
    assert tr._metrics["train"]["gate/kept_frac"][-1] == pytest.approx(res.stats["kept_frac"])


@needs_trl
def test_trl_train_steps_kl_state_saved_and_restored(tmp_path):
    """A few real steps (gate + HERO weights + adaptive KL): parameters change, HERO metrics are logged, the KL
    controller's state lands in the checkpoint and comes back on resume."""
    from hero.integrations.trl import HERO_STATE_NAME

    kw = dict(beta=0.05, kl_target=1e-4, kl_horizon=8, max_steps=2, save_strategy="steps", save_steps=2,
              keep_frac=0.5, loss_type="grpo")
    tr = _trainer(tmp_path, **kw)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    for k in ("entropy", "kl", "kl_coef", "weights/max", "weights/effective_tokens", "gate/kept_frac",
              "clip_ratio/low_mean", "reward"):
        assert k in logs[-1], k
    assert logs[-1]["gate/kept_frac"] <= 0.5
    assert math.isfinite(logs[-1]["loss"])
    st = tr.kl_controller.state_dict()
    assert st["n_updates"] == 2 and st["beta"] != 0.05  # KL > target: beta moved (multiplicatively)
    ckpt = os.path.join(str(tmp_path), "checkpoint-2")
    with open(os.path.join(ckpt, HERO_STATE_NAME)) as f:
        saved = json.load(f)
    assert saved["kl_controller"] == st

    tr2 = _trainer(tmp_path, **kw)
    assert tr2.kl_controller.beta == 0.05
    tr2.train(resume_from_checkpoint=ckpt)  # global_step == max_steps: loads the checkpoint, trains nothing
    assert tr2.kl_controller.state_dict() == st


@needs_trl
def test_trl_gradient_accumulation_invariance(trl_batch):
    """With the gate masking whole groups, two accumulated micro-batches give the full batch's gradient: the
    global normalizer is divided once for accumulation (never twice, never per micro-batch)."""
    tr, _ = trl_batch
    tr.args.variance_gate, tr.args.keep_frac, tr.args.entropy_weighting = True, 0.5, True
    tr.loss_type, tr.hero_loss_agg = "grpo", "seq-mean-token-mean"
    spg = tr.args.steps_per_generation
    try:
        torch.manual_seed(4)
        out = tr._generate_and_score_completions(_rows(tr))
        assert 0 < float(out["hero_num_seqs"]) < out["completion_ids"].shape[0]  # some groups were dropped
        # kept rows first: the two micro-batches hold very different numbers of kept responses, so a per-micro-batch
        # normalizer (or one divided twice) would change the gradient
        order = torch.argsort(-out["hero_keep"], stable=True)
        halves = order.chunk(2)
        res = []
        for parts in (1, 2):
            tr.current_gradient_accumulation_steps, tr.args.steps_per_generation = parts, parts
            tr.model.zero_grad(set_to_none=True)
            total = 0.0
            for idx in ([order] if parts == 1 else halves):
                mb = {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in out.items()}
                loss = tr.compute_loss(tr.model, mb)
                loss.backward()
                total += float(loss)
            res.append((total, _grads(tr.model)))
    finally:
        tr.args.variance_gate, tr.args.keep_frac, tr.args.entropy_weighting = False, 0.6, False
        tr.current_gradient_accumulation_steps, tr.args.steps_per_generation = 1, spg
        tr.model.zero_grad(set_to_none=True)
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-5, abs=1e-8)
    for n, g in res[0][1].items():
        torch.testing.assert_close(res[1][1][n], g, atol=1e-7, rtol=2e-4)


@needs_trl
def test_trl_command_line_main(tmp_path):
    """`python -m hero.integrations.trl --model_name_or_path DIR --dataset FILE.jsonl ...` trains and saves."""
    from hero.integrations.trl import main

    model_dir = tmp_path / "tiny"
    _model().save_pretrained(str(model_dir))
    _tokenizer().save_pretrained(str(model_dir))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": f"{c} b ?", "answer": "yes"}) + "\n" for c in "acdefg"))
    tr = main(["--model_name_or_path", str(model_dir), "--dataset", str(data), "--prompt_field", "question",
               "--reward_funcs", "format", "exact_match", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
               "--per_device_train_batch_size", "6", "--num_generations", "3", "--max_completion_length", "4",
               "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--kappa", "0.5", "--keep_frac", "1.0",
               "--loss_type", "grpo"])
    assert tr.args.kappa == 0.5 and tr.hero_loss_agg == "seq-mean-token-mean" and tr.state.global_step == 1
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


_DDP_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
import test_integrations as T
tr = T._trainer({out!r}, beta=0.05, kl_target=1e-4, kl_horizon=8, max_steps=2, keep_frac=0.5, loss_type="grpo",
                per_device_train_batch_size=2 * T.G)
tr.train()
flat = torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()])
rank = tr.accelerator.process_index
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"world": tr.accelerator.num_processes, "params": flat[:64].tolist(), "sum": float(flat.double().sum()),
               "kl": tr.kl_controller.state_dict(),
               "log": [h for h in tr.state.log_history if "loss" in h][-1]}}, f)
"""


@needs_trl
@pytest.mark.slow
def test_trl_ddp_two_cpu_processes(tmp_path):
    """2-process DDP (gloo, CPU) through torchrun: ranks see different completions, yet after two steps their
    parameters and adaptive-KL states are identical (gradients all-reduced through the redirected forward, one
    global gate and normalizer, metrics reduced over ranks)."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["sum"] == ranks[1]["sum"]
    assert ranks[0]["kl"] == ranks[1]["kl"] and ranks[0]["kl"]["n_updates"] == 2
    log = ranks[0]["log"]
    assert log["gate/kept_frac"] <= 0.5 and "weights/effective_tokens" in log and "kl_coef" in log


# ==============================================================================================
# verl
# ==============================================================================================
def _verl_batch(B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.01
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False
    mask[3, :] = False  # an empty response
    H = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return logp.requires_grad_(True), old, A, mask, H


def _plain_cfg(**pl):
    return {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 1e9,
            "policy_loss": pl, "global_batch_info": {}}


def _reference_loss(logp, old, A, mask, H, mode, kappa=1.0, weight_on="all", weighting=True):
    """hero_kernels.reference: entropy weights + grpo_token_loss + aggregate_loss on the flattened tokens."""
    B, T = logp.shape
    seq = torch.arange(B).view(B, 1).expand(B, T).clone()
    seq[~mask] = -1
    s, m = seq.reshape(-1), mask.reshape(-1)
    w = R.entropy_weights(H.reshape(-1), s, kappa, weight_on, A.reshape(-1)) if weighting else m.double()
    loss_tok, _, _, _ = R.grpo_token_loss(logp.reshape(-1), A.reshape(-1), old.reshape(-1), weights=w,
                                          eps_low=0.2, eps_high=0.28)
    return R.aggregate_loss(loss_tok, s, mode, max_len=T)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("weight_on", ["all", "negative"])
def test_verl_policy_loss_matches_reference(mode, weight_on):
    """Without verl: compute_policy_loss_hero == reference math (value and d/dlog_prob), dual clip disabled."""
    logp, old, A, mask, H = _verl_batch()
    cfg = _plain_cfg(hero_kappa=0.7, hero_weight_on=weight_on)
    loss, metrics = hv.compute_policy_loss_hero(old, logp, A, mask, mode, cfg, entropy=H)
    (g,) = torch.autograd.grad(loss, logp)
    ref = _reference_loss(logp, old, A, mask, H, mode, kappa=0.7, weight_on=weight_on)
    (g_ref,) = torch.autograd.grad(ref, logp)
    _close(loss, ref, atol=1e-10, rtol=1e-7)
    _close(g, g_ref, atol=1e-10, rtol=1e-7)
    assert metrics["actor/hero_weights_max"] > 1.0 and metrics["actor/hero_entropy_sampled"] == 0.0
    assert metrics["actor/pg_clipfrac"] > 0


def test_verl_policy_loss_entropy_sources_and_errors():
    logp, old, A, mask, H = _verl_batch(seed=1)
    with pytest.raises(ValueError, match="no per-token entropy"):
        hv.compute_policy_loss_hero(old, logp, A, mask, "token-mean", _plain_cfg())
    # sampled: surprisal of the behaviour policy stands in for H
    loss, m = hv.compute_policy_loss_hero(old, logp, A, mask, "token-mean", _plain_cfg(hero_entropy_source="sampled"))
    _close(loss, _reference_loss(logp, old, A, mask, -old, "token-mean"), atol=1e-10, rtol=1e-7)
    assert m["actor/hero_entropy_sampled"] == 1.0
    # the context set by hero_ppo_loss is picked up
    with hv.entropy_context(H):
        loss_ctx, _ = hv.compute_policy_loss_hero(old, logp, A, mask, "token-mean", _plain_cfg())
    _close(loss_ctx, _reference_loss(logp, old, A, mask, H, "token-mean"), atol=1e-10, rtol=1e-7)
    # weighting off needs no entropy and is the plain clipped loss
    loss_off, _ = hv.compute_policy_loss_hero(old, logp, A, mask, "token-mean",
                                              _plain_cfg(hero_entropy_weighting=False))
    _close(loss_off, _reference_loss(logp, old, A, mask, H, "token-mean", weighting=False), atol=1e-10, rtol=1e-7)
    with pytest.raises(ValueError, match="hero_kappa"):
        hv.compute_policy_loss_hero(old, logp, A, mask, "token-mean", _plain_cfg(hero_kappa=0.0), entropy=H)
    with pytest.raises(ValueError, match="advantages must have the shape"):
        hv.compute_policy_loss_hero(old, logp, A[:, :3], mask, "token-mean", _plain_cfg(), entropy=H)


def test_verl_dual_clip_caps_negative_advantages():
    """clip_ratio_c bounds the loss of A < 0 tokens at -A * c (verl's dual clip)."""
    logp = torch.log(torch.tensor([[0.9, 0.9]], dtype=torch.float64)).requires_grad_(True)
    old = torch.log(torch.tensor([[0.1, 0.1]], dtype=torch.float64))  # ratio 9 > c = 3
    A = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = _plain_cfg(hero_entropy_weighting=False)
    cfg["clip_ratio_c"] = 3.0
    loss, m = hv.compute_policy_loss_hero(old, logp, A, mask, "token-sum", cfg)
    # token 0: min(-A * ratio = 9, -A * c = 3) = 3; token 1: -min(9, 1.28) = -1.28
    _close(loss, torch.tensor(3.0 - 1.28, dtype=torch.float64), atol=1e-12, rtol=0)
    assert m["actor/pg_clipfrac_lower"] == 0.5


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_agg_fallback_matches_reference(mode):
    torch.manual_seed(0)
    _, _, _, mask, _ = _verl_batch()
    x = torch.randn(mask.shape, dtype=torch.float64)
    B, T = mask.shape
    seq = torch.arange(B).view(B, 1).expand(B, T).clone()
    seq[~mask] = -1
    _close(hv.agg_loss(x, mask, mode), R.aggregate_loss(x.reshape(-1), seq.reshape(-1), mode, max_len=T),
           atol=1e-7, rtol=1e-7)  # verl's seq-mean-token-mean adds 1e-8 to each length


def test_verl_module_imports_without_verl(monkeypatch):
    """Loading the module with verl blocked (sys.modules['verl'] = None) works and registers nothing."""
    import importlib.util

    for name in [k for k in sys.modules if k == "verl" or k.startswith("verl.")] + ["verl"]:
        monkeypatch.setitem(sys.modules, name, None)  # cached submodules too: they would bypass the parent
    spec = importlib.util.spec_from_file_location("_hero_verl_without_verl", hv.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    assert not mod.VERL_AVAILABLE and "verl" in mod.VERL_IMPORT_ERROR
    c = mod.HEROPolicyLossConfig(hero_kappa=0.5)
    assert c.get("hero_kappa") == 0.5
    with pytest.raises(ValueError, match="hero_weight_on"):
        mod.HEROPolicyLossConfig(hero_weight_on="x")
    with pytest.raises(ImportError, match="needs verl"):
        mod.hero_ppo_loss(None, {}, None)


# ---- against verl itself ----------------------------------------------------------------------
def _verl_actor_config(loss_agg_mode="token-mean", **pl):
    from verl.workers.config import ActorConfig

    policy_loss = hv.HEROPolicyLossConfig(**pl)
    return ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                       clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=loss_agg_mode,
                       policy_loss=policy_loss)


@needs_verl
def test_verl_registered():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    assert get_policy_loss_fn("hero") is hv.compute_policy_loss_hero


@needs_verl
@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("gbi", [{}, {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9,
                                      "loss_scale_factor": 11}])
def test_verl_weighting_off_equals_vanilla(mode, gbi):
    """hero_entropy_weighting=False: loss, gradients and metrics equal verl's vanilla policy loss."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    logp, old, A, mask, H = _verl_batch()
    old = old.clone()
    old[1, 2] = logp[1, 2].detach() - 2.0  # ratio e^2 > clip_ratio_c for the dual clip
    A = A.clone()
    A[1] = -A[1].abs()
    weights = torch.rand(mask.shape, dtype=torch.float64)
    cfg = _verl_actor_config(mode, hero_entropy_weighting=False)
    cfg.global_batch_info.update(gbi)
    kw = dict(old_log_prob=old, log_prob=logp, advantages=A, response_mask=mask, loss_agg_mode=mode, config=cfg,
              rollout_is_weights=weights)
    l_v, m_v = compute_policy_loss_vanilla(**kw)
    (g_v,) = torch.autograd.grad(l_v, logp)
    l_h, m_h = hv.compute_policy_loss_hero(**kw, entropy=H)
    (g_h,) = torch.autograd.grad(l_h, logp)
    _close(l_h, l_v, atol=1e-12, rtol=1e-10)
    _close(g_h, g_v, atol=1e-12, rtol=1e-10)
    for k, v in m_v.items():
        assert m_h[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert m_v["actor/pg_clipfrac_lower"] > 0
    # and verl's agg_loss agrees with our fallback implementation of its semantics
    x = torch.randn(mask.shape, dtype=torch.float64)
    core, hv._core_algos = hv._core_algos, None
    try:
        fallback = hv.agg_loss(x, mask, mode, **gbi)
    finally:
        hv._core_algos = core
    # (verl adds its 1e-8 to an integer count, which float32 rounds away; ours keeps it: ~1e-9 relative)
    _close(fallback, hv.agg_loss(x, mask, mode, **gbi), atol=1e-12, rtol=1e-7)


@needs_verl
def test_verl_config_via_hydra_target():
    """`policy_loss._target_=hero.integrations.verl.HEROPolicyLossConfig` + `+policy_loss.hero_kappa=...` on the
    command line builds our config inside verl's ActorConfig (how verl instantiates it from YAML)."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    raw = OmegaConf.create({
        "_target_": "verl.workers.config.ActorConfig", "strategy": "fsdp", "rollout_n": 2,
        "ppo_micro_batch_size_per_gpu": 2,
        "policy_loss": {"_target_": "hero.integrations.verl.HEROPolicyLossConfig", "loss_mode": "hero",
                        "hero_kappa": 0.5, "hero_weight_on": "negative"},
    })
    cfg = omega_conf_to_dataclass(raw)
    assert isinstance(cfg.policy_loss, hv.HEROPolicyLossConfig)
    assert cfg.policy_loss.hero_kappa == 0.5 and cfg.policy_loss.loss_mode == "hero"
    logp, old, A, mask, H = _verl_batch()
    loss, _ = hv.compute_policy_loss_hero(old, logp, A, mask, "seq-mean-token-mean", cfg, entropy=H)
    assert torch.isfinite(loss)


@needs_verl
def test_verl_hero_ppo_loss_passes_exact_entropy():
    """hero_ppo_loss runs verl's own ppo_loss on unpadded actor outputs and the HERO policy loss sees the actor's
    entropy (same value and gradient as calling the policy loss on the padded tensors directly)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    B, P, T = 3, 2, 4
    attn = torch.zeros(B, P + T, dtype=torch.long)
    attn[:, :P] = 1
    for i, L in enumerate([4, 2, 3]):
        attn[i, P:P + L] = 1
    g = torch.Generator().manual_seed(0)
    data = TensorDict({
        "prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, T, dtype=torch.long),
        "attention_mask": attn, "response_mask": attn[:, P:].clone(),
        "old_log_probs": -torch.rand(B, T, generator=g, dtype=torch.float64),
        "advantages": torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous(),
    }, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    nnz = int(attn.sum())
    lp = (-torch.rand(nnz, generator=g, dtype=torch.float64)).requires_grad_(True)
    ent = torch.rand(nnz, generator=g, dtype=torch.float64) * 2
    cfg = _verl_actor_config("seq-mean-token-mean", hero_kappa=0.5)
    loss, metrics = hv.hero_ppo_loss(cfg, {"log_probs": lp, "entropy": ent}, data)
    (g1,) = torch.autograd.grad(loss, lp)
    ref, _ = hv.compute_policy_loss_hero(data["old_log_probs"], no_padding_2_padding(lp, data), data["advantages"],
                                         data["response_mask"].bool(), "seq-mean-token-mean", cfg,
                                         entropy=no_padding_2_padding(ent, data))
    (g2,) = torch.autograd.grad(ref, lp)
    _close(loss, ref, atol=1e-12, rtol=1e-10)
    _close(g1, g2, atol=1e-12, rtol=1e-10)
    assert "actor/hero_entropy_mean" in metrics
    with pytest.raises(ValueError, match="calculate_entropy"):
        hv.hero_ppo_loss(cfg, {"log_probs": lp}, data)


# ==============================================================================================
# one declaration of the loss options: every value hero_kernels accepts reaches the loss through each front end
# ==============================================================================================
def _accepted_values():
    """{option: values HEROLossConfig accepts}, read from its own declaration (range edges, a negative value where
    the range allows one, e.g. kappa < 0, every choice, both bools)."""
    from dataclasses import fields

    from hero_kernels.options import HEROLossConfig

    out = {}
    for f in fields(HEROLossConfig):
        m = f.metadata
        if m["kind"] == "bool":
            vals = [True, False]
        elif m["kind"] == "choice":
            vals = list(m["choices"])
        elif m["kind"] == "int":
            vals = [1 if "lo" in m else -1, 3] + ([None] if m.get("optional") else [])
        else:
            lo, hi, lo_open = m.get("lo", -math.inf), m.get("hi", math.inf), m.get("lo_open", False)
            vals = [v for v in (lo, hi, -2.5, 0.37, 7.0) if math.isfinite(v) and (lo < v or (v == lo and not lo_open))
                    and v <= hi and not (m.get("nonzero") and v == 0)]
        for v in vals:
            HEROLossConfig.check(f.name, v)  # the core accepts each one
        out[f.name] = list(dict.fromkeys(vals))
    assert -2.5 in out["kappa"]  # the high-entropy ablation (kappa < 0) is among them
    return out


def test_loss_options_round_trip_core():
    """hero_loss(**{opt: v}) and HEROLoss(**{opt: v}) accept every value and carry it unchanged."""
    from hero_kernels import HEROLoss, HEROLossConfig, hero_loss

    x, y, A = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)), torch.randn(2)
    ref = torch.randn(2, 3)
    for name, vals in _accepted_values().items():
        for v in vals:
            assert HEROLossConfig.resolve(None, {name: v}).options()[name] == v
            assert HEROLoss(**{name: v}).config.options()[name] == v
            if name != "impl" or v in ("auto", "torch"):  # the other backends need their hardware
                loss, _ = hero_loss(x, y, A, ref_logp=ref, **{"impl": "torch", name: v})
                assert torch.isfinite(loss), (name, v)


def test_loss_options_round_trip_trainer_config():
    """The trainer's YAML / CLI keys: every accepted value survives the string round trip into hero_loss's config."""
    from hero.config import LOSS_OPTION_KEYS, TrainConfig, apply_overrides

    where = {k: f"loss.{k}" for k in LOSS_OPTION_KEYS}
    where.update(beta="kl.beta", temperature="generation.temperature", max_len="generation.max_new_tokens")
    values = _accepted_values()
    assert set(values) - set(where) == {"ignore_index"}  # the trainer masks with its own -100
    for name, key in where.items():
        for v in values[name]:
            if v is None:
                continue  # max_len None: the trainer always has a generation budget
            cfg = apply_overrides(TrainConfig(), [(key, str(v))]).validate()
            got = cfg.loss.hero_loss_config(cfg.kl.beta, cfg.generation.temperature, cfg.generation.max_new_tokens)
            assert got.options()[name] == v, (key, v)


@needs_trl
def test_loss_options_round_trip_trl(tmp_path):
    from hero.integrations.trl import LOSS_OPTION_NAMES

    values = _accepted_values()
    assert set(values) - set(LOSS_OPTION_NAMES) == {"ignore_index"}  # TRL masks with its own -100
    for name, arg in LOSS_OPTION_NAMES.items():
        for v in values[name]:
            if v is None:
                continue
            extra = {"loss_type": "dr_grpo"} if name == "max_len" else {}  # max_len only exists for Dr. GRPO
            a = _args(tmp_path, **{arg: v, **extra})
            assert a.hero_loss_config().options()[name] == v, (arg, v)


def test_loss_options_round_trip_verl():
    """Without verl: HEROPolicyLossConfig (one declaration, verl's base class when verl imports) and verl's clip
    keys carry every accepted value of the options verl leaves to HERO."""
    values = _accepted_values()
    assert set(hv.LOSS_OPTION_NAMES) == {"kappa", "entropy_weighting", "weight_on", "entropy_grad", "eps_low",
                                         "eps_high"}
    for name, path in hv.LOSS_OPTION_NAMES.items():
        for v in values[name]:
            if path.startswith("policy_loss."):
                cfg = {"policy_loss": hv.HEROPolicyLossConfig(**{path.split(".", 1)[1]: v})}
            else:
                cfg = {path: v, "policy_loss": hv.HEROPolicyLossConfig()}
            opts, _ = hv.hero_options(cfg)
            assert opts[name] == v, (path, v)
    with pytest.raises(ValueError, match="policy_loss.hero_kappa"):
        hv.HEROPolicyLossConfig(hero_kappa=0.0)


def _verl_stand_in(monkeypatch):
    """Just enough of verl 0.9.1 for hero.integrations.verl's import branch: its registry and a PolicyLossConfig
    with the semantics of verl's BaseConfig (a read-only Mapping dataclass), so the verl branch of the one
    HEROPolicyLossConfig declaration is tested in this venv, where verl itself does not install."""
    import collections.abc
    import types
    from dataclasses import FrozenInstanceError, dataclass, field, fields

    @dataclass
    class BaseConfig(collections.abc.Mapping):
        _mutable_fields = {"extra"}
        extra: dict = field(default_factory=dict)

        def __setattr__(self, name, value):
            if name in self.__dict__ and name not in getattr(self, "_mutable_fields", set()):
                raise FrozenInstanceError(f"Field '{name}' is frozen and cannot be modified")
            super().__setattr__(name, value)

        def get(self, key, default=None):
            return getattr(self, key, default)

        def __getitem__(self, key):
            return getattr(self, key)

        def __iter__(self):
            return (f.name for f in fields(self))

        def __len__(self):
            return len(fields(self))

    @dataclass
    class PolicyLossConfig(BaseConfig):
        loss_mode: str = "vanilla"
        clip_cov_ratio: float = 0.0002

    registry = {}
    mods = {name: types.ModuleType(name) for name in ("verl", "verl.trainer", "verl.trainer.ppo",
                                                       "verl.trainer.ppo.core_algos", "verl.workers",
                                                       "verl.workers.config")}
    mods["verl.trainer.ppo.core_algos"].register_policy_loss = lambda name: (lambda fn: registry.setdefault(name, fn))
    mods["verl.workers.config"].PolicyLossConfig = PolicyLossConfig
    mods["verl.trainer.ppo"].core_algos = mods["verl.trainer.ppo.core_algos"]
    mods["verl.workers"].config = mods["verl.workers.config"]
    for name, m in mods.items():
        monkeypatch.setitem(sys.modules, name, m)
    return PolicyLossConfig, registry


def test_verl_config_declared_once_on_verls_base(monkeypatch):
    """With verl importable, the same single HEROPolicyLossConfig declaration sits on verl's PolicyLossConfig:
    a read-only Mapping with verl's fields and ours, registered as loss_mode=hero, carrying every value."""
    import dataclasses
    import importlib.util

    base, registry = _verl_stand_in(monkeypatch)
    spec = importlib.util.spec_from_file_location("_hero_verl_with_verl", hv.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    assert mod.VERL_AVAILABLE and issubclass(mod.HEROPolicyLossConfig, base)
    assert registry["hero"] is mod.compute_policy_loss_hero
    c = mod.HEROPolicyLossConfig(hero_kappa=-0.5)
    assert dict(c)["hero_kappa"] == -0.5 and c["loss_mode"] == "hero" and c.clip_cov_ratio == 0.0002
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hero_kappa = 2.0
    values = _accepted_values()
    for name, path in mod.LOSS_OPTION_NAMES.items():
        if path.startswith("policy_loss."):
            for v in values[name]:
                cfg = {"policy_loss": mod.HEROPolicyLossConfig(**{path.split(".", 1)[1]: v})}
                assert mod.hero_options(cfg)[0][name] == v
    with pytest.raises(ValueError, match="policy_loss.hero_weight_on"):
        mod.HEROPolicyLossConfig(hero_weight_on="positive")
