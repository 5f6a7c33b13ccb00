"""hero.experiments.confidence_trap.metrics: answer parsing, POPE, ECE, entropy bins, CHAIR, with hand-computed expectations."""
import json
import math

import pytest

from hero.experiments.confidence_trap.metrics import (
    ENTROPY_EDGES,
    UNPARSED,
    accuracy_by_entropy_bin,
    chair,
    entropy_bin_index,
    entropy_bin_labels,
    expected_calibration_error,
    mentioned_digits,
    parse_answer,
    pope_metrics,
    pope_metrics_by_split,
    reliability_bins,
)


# ---------------------------------------------------------------------------------------------
# answer parsing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>I see 3, 1, 4.</think><answer>no</answer>", "no"),
        ("<answer>yes</answer>", "yes"),
        ("<answer> Yes. </answer>", "yes"),
        ("<answer>No, there is not.</answer>", "no"),
        ("<answer>\nyes\n</answer>", "yes"),
        # the think block says "no" first: the tag decides, not the first sentence
        ("<think>No... wait</think><answer>yes</answer>", "yes"),
        ("No. <answer>yes</answer>", "yes"),
        # several tags: the last complete one is the final answer
        ("<answer>yes</answer> hmm <answer>no</answer>", "no"),
        # "nothing"/"yesterday" are not yes/no (word boundary)
        ("<answer>nothing</answer>", "nothing"),
        ("<answer>Yesterday</answer>", "yesterday"),
        ("<answer>maybe?</answer>", "maybe"),
        # missing / broken tags -> unparsed
        ("Yes, there is a 7.", UNPARSED),
        ("<answer>yes", UNPARSED),
        ("yes</answer>", UNPARSED),
        ("<answer></answer>", UNPARSED),
        ("<answer>  </answer>", UNPARSED),
        ("", UNPARSED),
    ],
)
def test_parse_answer_tag_mode(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, I can see it.", "yes"),
        ("There is nothing like that. No.", "no"),  # "nothing" is skipped, the standalone "No" counts
        ("I don't know", UNPARSED),
        ("<answer>no</answer> yes", "no"),  # a complete tag still wins
    ],
)
def test_parse_answer_yesno_mode(text, expected):
    assert parse_answer(text, mode="yesno") == expected


def test_parse_answer_bad_input():
    with pytest.raises(TypeError, match="text"):
        parse_answer(None)
    with pytest.raises(ValueError, match="mode"):
        parse_answer("x", mode="first_sentence")


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------
def test_pope_metrics_hand_example():
    preds = ["yes", "yes", "no", "no", "yes", UNPARSED, "no", "maybe"]
    gold = ["yes", "no", "no", "yes", "yes", "yes", "no", "no"]
    # pairs: tp, fp, tn, fn, tp, (unparsed on gold yes -> fn), tn, (invalid on gold no -> just wrong)
    # tp=2 fp=1 tn=2 fn=2; accuracy = (2+2)/8 = 0.5
    # precision = 2/(2+1) = 2/3; recall = 2/(2+2) = 1/2; F1 = 2*(2/3)*(1/2)/(2/3+1/2) = (2/3)/(7/6) = 4/7
    # yes_ratio = predicted "yes" / n = 3/8
    m = pope_metrics(preds, gold)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 2)
    assert (m["unparsed"], m["invalid"], m["n"]) == (1, 1, 8)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(3 / 8)


def test_pope_metrics_case_and_zero_division():
    # gold answers are case-insensitive; no predicted "yes" -> precision 0 (not NaN), F1 0
    m = pope_metrics(["no", "no", "no"], ["Yes", "NO", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 2, 1)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert pope_metrics([], [])["accuracy"] == 0.0


def test_pope_metrics_by_split():
    preds = ["yes", "no", "yes", "yes"]
    gold = ["yes", "no", "no", "yes"]
    splits = ["random", "random", "adversarial", "adversarial"]
    out = pope_metrics_by_split(preds, gold, splits)
    assert set(out) == {"all", "random", "adversarial"}
    assert out["random"]["accuracy"] == 1.0
    # adversarial: fp + tp -> accuracy 1/2, precision 1/2, recall 1, yes_ratio 1
    assert out["adversarial"]["accuracy"] == 0.5
    assert out["adversarial"]["precision"] == 0.5
    assert out["adversarial"]["recall"] == 1.0
    assert out["adversarial"]["yes_ratio"] == 1.0
    assert out["all"]["accuracy"] == 0.75
    assert set(pope_metrics_by_split(preds, gold)) == {"all"}
    with pytest.raises(ValueError, match="reserved"):
        pope_metrics_by_split(preds, gold, ["all"] * 4)


def test_pope_metrics_bad_input():
    with pytest.raises(ValueError, match=r"answers\[1\]"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(ValueError, match="length"):
        pope_metrics(["yes"], ["yes", "no"])


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------
def test_ece_hand_example():
    conf = [0.95, 0.85, 0.75, 0.62, 0.15, 0.3]
    correct = [1, 0, 1, 1, 0, 0]
    # 5 bins of width 0.2: [0.8,1]: 0.95, 0.85 -> mean conf 0.9, acc 0.5, gap 0.4
    # [0.6,0.8): 0.75, 0.62 -> mean 0.685, acc 1, gap 0.315; [0,0.2): 0.15 -> gap 0.15; [0.2,0.4): 0.3 -> gap 0.3
    # ECE = (2*0.4 + 2*0.315 + 0.15 + 0.3) / 6 = 1.88 / 6
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(1.88 / 6)
    bins = reliability_bins(conf, correct, n_bins=5)
    assert [b["count"] for b in bins] == [1, 1, 0, 2, 2]
    assert bins[2]["accuracy"] is None and bins[2]["mean_confidence"] is None
    assert bins[3]["mean_confidence"] == pytest.approx(0.685)
    assert bins[4]["accuracy"] == 0.5


def test_ece_bin_edges_and_trivial_cases():
    # 0.3 * 10 rounds to 3.0000000000000004: it must land in [0.3, 0.4), 1.0 in the last bin, 0.0 in the first
    bins = reliability_bins([0.3, 1.0, 0.0], [1, 1, 1], n_bins=10)
    assert bins[3]["count"] == 1 and bins[9]["count"] == 1 and bins[0]["count"] == 1
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([], []) == 0.0
    # always 0.5 confident, right half the time -> perfectly calibrated
    assert expected_calibration_error([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="confidences"):
        expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [1], n_bins=0)


# ---------------------------------------------------------------------------------------------
# entropy bins
# ---------------------------------------------------------------------------------------------
def test_entropy_bins():
    assert entropy_bin_labels() == ["H<=0.3", "0.3<H<=0.7", "0.7<H<=1.2", "H>1.2"]
    assert ENTROPY_EDGES[1] == 0.3 and math.isinf(ENTROPY_EDGES[-1])
    H = [0.0, 0.3, 0.31, 0.7, 1.0, 1.2, 5.0, -1e-12]
    correct = [1, 1, 0, 1, 0, 0, 0, 1]
    assert entropy_bin_index(H).tolist() == [0, 0, 1, 1, 2, 2, 3, 0]
    bins = accuracy_by_entropy_bin(H, correct)
    # bin 0 (H <= 0.3): 0.0, 0.3, -1e-12 all correct; bin 1: 0.31 wrong, 0.7 right; bins 2, 3: all wrong
    assert [b["count"] for b in bins] == [3, 2, 2, 1]
    assert [b["accuracy"] for b in bins] == [1.0, 0.5, 0.0, 0.0]
    assert bins[1]["mean_entropy"] == pytest.approx((0.31 + 0.7) / 2)
    assert bins[0]["fraction"] == pytest.approx(3 / 8)
    empty = accuracy_by_entropy_bin([0.1], [1])
    assert empty[3]["accuracy"] is None and empty[3]["count"] == 0
    custom = accuracy_by_entropy_bin([0.05, 0.5], [1, 0], edges=[0, 0.1, 10])
    assert [b["label"] for b in custom] == ["H<=0.1", "0.1<H<=10"]
    with pytest.raises(ValueError, match="edges"):
        accuracy_by_entropy_bin([0.1], [1], edges=[0.3, 0.1])
    json.dumps(bins[:3])  # plain Python types


# ---------------------------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------------------------
def test_chair_hand_example():
    mentioned = [["dog", "cat"], ["car"], ["dog", "dog", "tree"]]
    truth = [["dog"], ["car", "person"], ["cat"]]
    # unique: caption 1 -> cat hallucinated (1 of 2); caption 2 -> 0 of 1; caption 3 -> dog, tree (2 of 2)
    # CHAIR_i = 3 / 5; CHAIR_s = 2 / 3
    c = chair(mentioned, truth)
    assert c["chair_i"] == pytest.approx(3 / 5)
    assert c["chair_s"] == pytest.approx(2 / 3)
    assert (c["mentions"], c["hallucinated"], c["captions"], c["hallucinated_captions"]) == (5, 3, 3, 2)
    # counting repeats: caption 3 has 3 mentions, all hallucinated -> 4 / 6
    assert chair(mentioned, truth, unique=False)["chair_i"] == pytest.approx(4 / 6)
    assert chair([], [])["chair_i"] == 0.0
    with pytest.raises(ValueError, match="length"):
        chair([["a"]], [])


def test_mentioned_digits():
    assert mentioned_digits("<think>I see 3, 1, 4.</think><answer>no</answer>") == [3, 1, 4]
    assert mentioned_digits("<think>I see 12 and 7</think>") == [7]  # only single digits
    assert mentioned_digits("I see 3") == []
    c = chair([mentioned_digits("<think>I see 3, 1, 4.</think>")], [[3, 1, 5]])
    assert c["chair_i"] == pytest.approx(1 / 3) and c["chair_s"] == 1.0
