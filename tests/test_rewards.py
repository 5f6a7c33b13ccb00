"""hero.rewards: answer-tag parsing rewards, format, exact match, the NLI reward with a tiny offline model."""
import math

import pytest
import torch

from hero.rewards import (NLIReward, REWARDS, check_rewards, exact_match_reward, format_reward, get_reward,
                          split_sentences, yes_no_reward)


def test_yes_no_uses_answer_tag_not_first_sentence():
    comps = [
        "<think>No wait, I think yes.</think><answer>yes</answer>",  # first word "No", tag says yes
        "Yes. <answer>no</answer>",
        "yes",  # no tag -> unparsed -> wrong
        "<answer>Yes, there is.</answer>",
        "<answer>yes",  # unclosed tag
        "<answer>no</answer><answer>yes</answer>",  # the last complete tag decides
    ]
    gold = ["yes", "no", "yes", "YES", "yes", "yes"]
    assert yes_no_reward(comps, answer=gold, id=list(range(6))) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(KeyError, match="answer"):
        yes_no_reward(comps)
    with pytest.raises(ValueError, match="6 completions"):
        yes_no_reward(comps, answer=["yes"])


def test_exact_match_and_format():
    assert exact_match_reward(["<answer> Paris. </answer>", "paris", "Lyon", "<answer>paris france</answer>"],
                              answer=["paris"] * 4) == [1.0, 1.0, 0.0, 0.0]
    comps = [
        "<think>I see 3, 1.</think><answer>no</answer>",
        "  <think>a</think>\n<answer>yes</answer>\n",
        "<answer>yes</answer>",
        "<think>a</think><answer>yes</answer> trailing",
        "<think>a<answer>x</answer></think><answer>yes</answer>",
        "<think></think><answer></answer>",
    ]
    assert format_reward(comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_registry_and_import_path():
    assert get_reward("yes_no") is REWARDS["yes_no"]
    assert get_reward("hero.rewards:format_reward") is format_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="nli_model"):
        get_reward("nli")
    assert check_rewards([1, None, 0.5], 3, "x")[2] == 0.5 and math.isnan(check_rewards([1, None, 0.5], 3, "x")[1])
    with pytest.raises(ValueError, match="returned 2 values for 3"):
        check_rewards([1, 2], 3, "x")


def test_split_sentences():
    assert split_sentences("<think>I see a cat. A dog!</think><answer>yes</answer>") == ["I see a cat.", "A dog!", "yes"]
    assert split_sentences("<think></think> ... ") == []


def _tiny_nli(label2id):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat", "dog", "is", "there", "red", "i", "see", ".", "yes", "no"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=3,
                     id2label={v: k for k, v in label2id.items()}, label2id=label2id)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval(), tok


def test_nli_reward_tiny_model_mean_min_and_label_indices():
    label2id = {"ENTAILMENT": 2, "neutral": 1, "contradiction": 0}
    model, tok = _tiny_nli(label2id)
    r = NLIReward(model, tok, reference_field="description", reduce="mean", batch_size=2)
    assert (r.entail_id, r.contra_id) == (2, 0)
    comps = ["<think>I see a cat. A dog.</think><answer>yes</answer>", "<think></think>", "a red cat"]
    desc = ["a cat", "a dog", "a red dog"]
    got = r(comps, description=desc, answer=["yes"] * 3)
    # by hand: each sentence against its description
    def score(p, h):
        enc = tok([p], [h], return_tensors="pt")
        with torch.no_grad():
            pr = model(**enc).logits.softmax(-1)[0]
        return float(pr[2] - pr[0])
    s0 = [score("a cat", h) for h in ["I see a cat.", "A dog.", "yes"]]
    assert got[0] == pytest.approx(sum(s0) / 3, abs=1e-5)
    assert got[1] == 0.0  # no sentence: neutral
    assert got[2] == pytest.approx(score("a red dog", "a red cat"), abs=1e-5)
    assert all(-1.0 <= g <= 1.0 for g in got)
    rmin = NLIReward(model, tok, reduce="min")
    assert rmin(comps, description=desc)[0] == pytest.approx(min(s0), abs=1e-5)
    with pytest.raises(KeyError, match="description"):
        r(comps, answer=["yes"] * 3)
    bad, _ = _tiny_nli({"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2})
    with pytest.raises(ValueError, match="entail"):
        NLIReward(bad, tok)
