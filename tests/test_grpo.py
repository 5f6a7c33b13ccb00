"""hero.grpo: group advantages, the variance gate and the adaptive KL controller, against hand-computed values."""
import math

import pytest
import torch

from hero.grpo import AdaptiveKLController, group_advantages, n_keep_groups, variance_gate


def test_group_advantages_hand_values_bessel_std_eps():
    # mean 0.25, Bessel std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5, eps 1e-4
    a = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0]), 4)
    exp = torch.tensor([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001] + [0.5 / (math.sqrt(1 / 3) + 1e-4)] * 2
                       + [-0.5 / (math.sqrt(1 / 3) + 1e-4)] * 2)
    torch.testing.assert_close(a, exp)
    assert a.dtype == torch.float32 and a.shape == (8,)


def test_group_advantages_scales():
    r = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    # batch: group means, std over all 4 values (Bessel): values 1,0,3,1 mean 1.25
    std_b = torch.tensor([1.0, 0.0, 3.0, 1.0]).std().item()
    torch.testing.assert_close(group_advantages(r, scale="batch"),
                               torch.tensor([[0.5, -0.5], [1.0, -1.0]]) / (std_b + 1e-4))
    torch.testing.assert_close(group_advantages(r, scale="none"), torch.tensor([[0.5, -0.5], [1.0, -1.0]]))
    # group: std of (1, 0) = sqrt(0.5); of (3, 1) = sqrt(2)
    torch.testing.assert_close(group_advantages(r, scale="group", eps=0.0),
                               torch.tensor([[0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)], [1 / math.sqrt(2), -1 / math.sqrt(2)]]))


def test_group_advantages_zero_variance_is_exact_zero_and_errors():
    a = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.5]), 3)
    assert (a[:3] == 0).all() and (a[3:5] != 0).all() and a[5] == 0  # 0.5 is the mean of (1, 0, 0.5)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 2, scale="std")
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match=r"group\(s\) \[1\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), 2)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        group_advantages(torch.ones(3), 1)


@pytest.mark.parametrize("frac,B,k", [(0.6, 5, 3), (0.6, 4, 3), (0.6, 3, 2), (0.6, 1, 1), (0.5, 4, 2), (1.0, 7, 7), (0.1, 3, 1), (0.7, 10, 7)])
def test_keep_count_rounding_is_ceil(frac, B, k):
    assert n_keep_groups(frac, B) == k


def test_gate_hand_values_ties_and_zero_variance():
    # 6 groups of G=4; population variances: g0 0 (all 1: all-correct), g1 0 (all 0: all-wrong),
    # g2 p=1/4 -> 3/16, g3 p=1/2 -> 1/4, g4 p=1/2 (permuted) -> 1/4 (tie with g3), g5 p=3/4 -> 3/16 (tie with g2)
    r = torch.tensor([
        [1, 1, 1, 1],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 0, 1],
        [0, 1, 1, 1],
    ], dtype=torch.float32)
    g = variance_gate(r.flatten(), 4, keep_frac=0.6)
    # ceil(0.6 * 6) = 4 (3.6 -> 4) of 4 non-zero groups: all four
    assert g.kept.tolist() == [2, 3, 4, 5]
    torch.testing.assert_close(g.variance, torch.tensor([0, 0, 3 / 16, 1 / 4, 1 / 4, 3 / 16], dtype=torch.float64))
    assert g.stats["all_correct"] == 1 and g.stats["all_wrong"] == 1 and g.stats["zero_std"] == 2
    assert g.stats["kept_frac"] == pytest.approx(4 / 6) and g.stats["threshold"] == pytest.approx(3 / 16)
    # keep_frac 0.5 -> 3 groups: g3, g4 (var 1/4) then the tie g2 vs g5 at 3/16 -> lower index g2
    g = variance_gate(r, keep_frac=0.5)
    assert g.kept.tolist() == [2, 3, 4] and g.stats["threshold"] == pytest.approx(3 / 16)
    # keep_frac 0.3 -> ceil(1.8) = 2: the tie g3/g4 both kept
    assert variance_gate(r, keep_frac=0.3).kept.tolist() == [3, 4]
    # keep_frac 0.1 -> 1: tie at the top broken by index -> g3
    g = variance_gate(r, keep_frac=0.1)
    assert g.kept.tolist() == [3] and g.stats["n_kept"] == 1 and g.stats["threshold"] == pytest.approx(0.25)


def test_gate_all_zero_variance_and_disabled_and_correct_mask():
    r = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    g = variance_gate(r, keep_frac=1.0)
    assert g.kept.numel() == 0 and g.stats["kept_frac"] == 0.0 and g.stats["threshold"] == 0.0
    g = variance_gate(r, keep_frac=0.6, enabled=False)
    assert g.kept.tolist() == [0, 1] and g.stats["zero_std"] == 2
    # correctness from another reward (e.g. the accuracy reward), not the summed reward
    g = variance_gate(torch.tensor([[1.5, 0.5], [0.5, 0.5]]), correct=torch.tensor([[True, False], [False, False]]))
    assert g.stats["all_correct"] == 0 and g.stats["all_wrong"] == 1
    # tiny differences are not zero variance; identical values are
    g = variance_gate(torch.tensor([[0.1, 0.1 + 1e-12], [0.3, 0.3]], dtype=torch.float64), keep_frac=1.0)
    assert g.kept.tolist() == [0] and g.zero_var.tolist() == [False, True]
    with pytest.raises(ValueError, match="keep_frac"):
        variance_gate(r, keep_frac=0.0)


def test_adaptive_kl_controller_hand_values_and_state():
    c = AdaptiveKLController(0.1, target=0.05, horizon=100)
    # KL 0.1: e = clip(2 - 1) = 0.2 -> beta * (1 + 0.2 * 8/100) = 0.1 * 1.016
    assert c.update(0.1, 8) == pytest.approx(0.1016)
    # KL 0.04: e = -0.2 -> * (1 - 0.2 * 0.1)
    assert c.update(0.04, 10) == pytest.approx(0.1016 * 0.98)
    # KL 0.055: e = 0.1 (inside the clip)
    b = c.beta
    assert c.update(0.055, 50) == pytest.approx(b * 1.05)
    s = c.state_dict()
    d = AdaptiveKLController(0.5, target=0.01, horizon=7)
    d.load_state_dict(s)
    assert d.state_dict() == s and d.update(0.0, 100) == pytest.approx(c.update(0.0, 100))
    fixed = AdaptiveKLController(0.3)
    assert fixed.update(10.0, 100) == 0.3 and not fixed.adaptive
    with pytest.raises(ValueError, match="finite"):
        c.update(float("nan"), 4)
    with pytest.raises(ValueError, match="init_beta > 0"):
        AdaptiveKLController(0.0, target=0.1)
    with pytest.raises(KeyError, match="beta"):
        d.load_state_dict({"target": 0.1})
