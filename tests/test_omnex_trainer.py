"""OMNEX-VL in the trainer: the caption / omnex_format rewards by name, the gate's difficulty counts with up to
G = 64 samples per input, the NTK-conflict regularizer hook (its gradient is exactly the regularizer's), the
config errors and the CLI. Tiny random-init models built offline, as in test_trainer.py."""
import math

import pytest
import torch

from hero.config import ConfigError, load_config
from hero.grpo import difficulty_counts
from hero.omnex import NTKRegularizer
from hero.trainer import Trainer
from test_omnex import _tiny_judge
from test_trainer import make_trainer, rows, tiny_cfg, vowel_reward

OMNEX_TEXT = "<planning>p</planning><caption>a red cat</caption><think>t</think><answer>yes</answer>"


def _judge_dir(tmp_path):
    judge = _tiny_judge()
    path = tmp_path / "judge"
    judge.model.save_pretrained(path)
    judge.tokenizer.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# rewards and config
# ----------------------------------------------------------------------------------------------
def test_rewards_by_name_and_config_errors(tmp_path):
    from hero.omnex import CaptionReward
    from hero.rewards import get_reward, reward_name

    fmt = get_reward("omnex_format")
    assert reward_name(fmt) == "omnex_format" and fmt([OMNEX_TEXT, "<answer>yes</answer>"]) == [1.0, 0.0]
    cap = get_reward("caption", caption_model=_judge_dir(tmp_path), caption_prompt="C: {caption} Q: {question}",
                     caption_options={"max_new_tokens": 2})
    assert isinstance(cap, CaptionReward) and reward_name(cap) == "caption"
    assert cap.judge.prompt == "C: {caption} Q: {question}" and cap.judge.max_new_tokens == 2
    assert cap([OMNEX_TEXT, "no caption"], question=["is there a cat ?"] * 2, answer=["yes"] * 2)[1] == 0.0
    for over, msg in [
        (["--rewards.funcs", "yes_no,nope"], r"rewards.funcs: unknown reward 'nope'; known: \[.*'caption'"),
        (["--rewards.funcs", "caption"], "caption_judge.model is empty"),
        (["--caption_judge.prompt", "no placeholders"], r"\{caption\} and \{question\}"),
        (["--omnex.tau", "2"], "omnex.tau"),
        (["--omnex.ntk_weight", "-1"], "omnex.ntk_weight"),
        (["--omnex.pairs", "all"], "omnex.pairs"),
        (["--gate.medium_variance", "-0.1"], "gate.medium_variance"),
    ]:
        with pytest.raises(ConfigError, match=msg) as e:
            load_config(None, over)
        assert "\n" not in str(e.value)
    cfg = load_config(None, ["--rewards.funcs", "yes_no,omnex_format,caption,pkg.mod:fn", "--caption_judge.model",
                             "some/path", "--omnex.ntk_weight", "0.1", "--omnex.k1", "32"])
    assert cfg.omnex.ntk_weight == 0.1 and cfg.omnex.k1 == 32 and cfg.omnex.tau == 0.54


def test_cli_unknown_reward_is_one_line(capsys):
    from hero.cli import main

    assert main(["train", "--rewards.funcs", "yes_no,captoin"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown reward 'captoin'" in err


# ----------------------------------------------------------------------------------------------
# variance-guided selection
# ----------------------------------------------------------------------------------------------
def test_difficulty_counts():
    r = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0.9], [0.1, 0, 0, 0]])
    assert difficulty_counts(r, medium_variance=0.05, easy_mean=0.5) == {"easy": 2, "medium": 1, "hard": 2}
    assert difficulty_counts(r.flatten(), 4, medium_variance=0.0, easy_mean=0.5) == {"easy": 1, "medium": 3,
                                                                                        "hard": 1}


def test_g64_keeps_top_half_by_variance_and_logs_difficulty(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"generation.num_generations": 64, "generation.max_new_tokens": 3, "batch_size": 4,
                                "gate.keep_frac": 0.5, "gate.medium_variance": 0.0, "steps": 1})
    tr = make_trainer(cfg, rewards=[vowel_reward])
    m = tr.train_step()
    ro = tr.last_rollout
    assert ro.completion_ids.shape[0] == 4 * 64 and m["gate/kept_frac"] == 0.5 and ro.kept.numel() == 2 * 64
    assert m["gate/easy"] + m["gate/medium"] + m["gate/hard"] == 4
    var = ro.total_reward.view(4, 64).var(1, unbiased=False)
    kept_groups = sorted({int(k) // 64 for k in ro.kept})
    assert kept_groups == sorted(var.argsort(descending=True)[:2].tolist())
    assert m["gate/medium"] == int((var > 0).sum()) and math.isfinite(m["loss"])


# ----------------------------------------------------------------------------------------------
# each module in a trainer step
# ----------------------------------------------------------------------------------------------
def omnex_rows(n=6):
    return [dict(r, question="is there a cat ?") for r in rows(n)]


@pytest.mark.parametrize("module", ["caption", "omnex_format", "ntk", "all"])
def test_trainer_step_with_each_omnex_module(tmp_path, module):
    over = {"generation.num_generations": 4, "steps": 1}
    funcs = ["yes_no"]
    if module in ("caption", "all"):
        funcs.append("caption")
        over.update({"caption_judge.model": _judge_dir(tmp_path), "caption_judge.max_new_tokens": 2})
    if module in ("omnex_format", "all"):
        funcs.append("omnex_format")
    if module in ("ntk", "all"):
        over.update({"omnex.ntk_weight": 0.5, "omnex.tau": 0.3, "omnex.k1": 16, "omnex.k2": 8})
    if module == "all":
        over.update({"gate.keep_frac": 0.5, "micro_batch_size": 4})
    cfg = tiny_cfg(tmp_path, **over, **{"rewards.funcs": ",".join(funcs)})
    tr = Trainer(cfg, dataset=omnex_rows())  # rewards by name from the config
    m = tr.train_step()
    assert [f"rewards/{f}/mean" in m for f in funcs] == [True] * len(funcs)
    assert ("omnex/caption_reward" in m) == ("caption" in funcs)
    assert ("omnex/ntk_loss" in m) == (module in ("ntk", "all"))
    if "omnex/ntk_loss" in m:
        assert math.isfinite(m["omnex/ntk_loss"]) and m["omnex/positive_pairs"] >= 0
    assert math.isfinite(m["loss"]) and m["gate/easy"] + m["gate/medium"] + m["gate/hard"] == cfg.batch_size


def test_ntk_hook_adds_exactly_the_regularizer_gradient(tmp_path):
    """Trainer gradient with omnex.ntk_weight = gradient without + gradient of NTKRegularizer on the same
    completion hidden states (pairs within each prompt's group), and the logged loss / pair counts match."""
    from hero.omnex import cosine_similarities, response_features

    cfg = tiny_cfg(tmp_path, **{"generation.num_generations": 4, "omnex.ntk_weight": 0.7, "omnex.k1": 16,
                                "omnex.k2": 8})
    tr = make_trainer(cfg)
    ro = tr.rollout()
    n, groups = ro.labels.shape[0], ro.kept // 4
    assert n == 8
    batch = tr._micro_batch(ro, slice(0, n))
    reg = NTKRegularizer(ntk_weight=0.7, k1=16, k2=8, impl="torch")

    def hidden():
        return tr._completion_hidden(tr.model, batch, ro.prompt_len)

    with torch.no_grad():  # tau = the median within-group similarity, so some pairs are positives and some not
        sim = cosine_similarities(response_features(hidden(), tr.model.lm_head.weight, batch.labels,
                                                    reg.sketch(*tr.model.lm_head.weight.shape, "cpu")))
        pairs = (groups[:, None] == groups[None, :]) & ~torch.eye(n, dtype=torch.bool)
        reg.threshold = tr.ntk_hook.reg.threshold = float(sim[pairs].median())

    def grads():
        return {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}

    tr.model.zero_grad(set_to_none=True)
    tr.backward(ro)
    with_hook, logged = grads(), tr.ntk_hook.metrics()
    hook, tr.ntk_hook = tr.ntk_hook, None
    tr.model.zero_grad(set_to_none=True)
    tr.backward(ro)
    without = grads()
    tr.ntk_hook = hook
    tr.model.zero_grad(set_to_none=True)
    loss, parts = reg(hidden(), tr.model.lm_head.weight, batch.labels, groups=groups)
    loss.backward()
    direct = grads()
    assert 0 < parts["positive_pairs"].item() < pairs.sum() and loss.item() > 0  # the regularizer really acts
    assert logged["omnex/ntk_loss"] == pytest.approx(parts["ntk_loss"].item(), rel=1e-5)
    assert logged["omnex/positive_pairs"] == parts["positive_pairs"].item()
    for k, g in with_hook.items():
        torch.testing.assert_close(g, without[k] + direct.get(k, torch.zeros_like(g)), rtol=1e-4, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------------------
# the demo's omnex runs
# ----------------------------------------------------------------------------------------------
def test_digits_caption_reward():
    from hero.experiments.confidence_trap.grounding import caption_reward
    from hero.rewards import reward_name

    texts = ["<think>I see 3, 1, 4.</think><answer>no</answer>", "<think>I see 3, 1, 4.</think><answer>no</answer>",
             "<think>I see 2.</think><answer>yes</answer>", "<answer>yes</answer>"]
    assert caption_reward(texts, query=[3, 7, 3, 3], answer=["yes", "no", "yes", "yes"]) == [1.0, 1.0, 0.0, 0.0]
    assert reward_name(caption_reward) == "caption"


def test_demo_omnex_flag_adds_the_runs(capsys):
    from hero.experiments.confidence_trap.demo import MICRO_OVERRIDES, OMNEX_RUNS, demo_main, load_demo_config

    cfg = load_demo_config(None, list(MICRO_OVERRIDES.items()))
    cfg.runs.update(OMNEX_RUNS)
    cfg.validate()
    omnex, both = cfg.rl_config("omnex", "/tmp/x"), cfg.rl_config("omnex_hero", "/tmp/x")
    for c in (omnex, both):
        assert c.gate.keep_frac == 0.5 and c.omnex.ntk_weight == 0.1 and c.omnex.tau == 0.54
        assert c.rewards.funcs[-1].endswith("grounding:caption_reward")
    assert not omnex.loss.entropy_weighting and both.loss.entropy_weighting
    assert demo_main(["--runs", "omnex", "--micro"]) == 2  # not in the default runs without --omnex
    assert "unknown run(s) ['omnex']" in capsys.readouterr().err
