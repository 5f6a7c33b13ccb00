"""hero.omnex: the response template parser and format reward, the caption reward with a real tiny transformers
judge (built offline), and the NTK-conflict regularizer (sketched cosine vs exact float64 gradients, loss vs a
direct loop, backprop to a tiny model)."""
import math
import os

import pytest
import torch

from hero.omnex import (CaptionJudge, CaptionReward, NTKRegularizer, answer_matches, cosine_similarities,
                        format_reward, make_sketch, ntk_conflict_loss, parse_response, response_features)
from hero.omnex.template import UNPARSED

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton interpreter, discarded branches

# Triton runs on CUDA when there is a GPU, else in the interpreter on CPU tensors (tests/conftest.py)
_TRITON_DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"


def _dev(impl):
    return _TRITON_DEV if impl == "triton" else "cpu"


GOOD = ("<planning>top left</planning>\n<caption>a red cat on a mat</caption> <think>it is red</think>"
        "<answer>yes</answer>")


# ----------------------------------------------------------------------------------------------
# template
# ----------------------------------------------------------------------------------------------
def test_parse_well_formed():
    r = parse_response("  " + GOOD + "\n")
    assert r.well_formed
    assert (r.planning, r.caption, r.think, r.answer) == ("top left", "a red cat on a mat", "it is red", "yes")
    assert r.part("caption") == "a red cat on a mat"


@pytest.mark.parametrize("text,bad", [
    (GOOD.replace("<planning>top left</planning>", ""), "planning"),  # missing part
    (GOOD.replace("</caption>", ""), "caption"),  # unclosed
    (GOOD + "<caption>again</caption>", "caption"),  # repeated
    (GOOD.replace("it is red", "<answer>x</answer>"), "think"),  # nested tag
    (GOOD.replace("a red cat on a mat", "  "), "caption"),  # empty body
    ("<planning>p</planning></caption>c<caption><think>t</think><answer>a</answer>", "caption"),  # reversed
])
def test_parse_malformed_parts_are_unparsed(text, bad):
    r = parse_response(text)
    assert r.part(bad) == UNPARSED and not r.well_formed
    assert format_reward([text]) == [0.0]


def test_parse_never_raises_and_order_matters():
    for t in (None, 3, b"<answer>yes</answer>", "", "<answer>", "</answer><answer>", "x" * 10000):
        r = parse_response(t)
        assert not r.well_formed
    swapped = "<caption>c</caption><planning>p</planning><think>t</think><answer>a</answer>"
    r = parse_response(swapped)
    assert r.caption == "c" and r.planning == "p" and not r.well_formed  # parts parse, the template does not
    assert format_reward([GOOD, swapped, "free text " + GOOD]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="part must be one of"):
        r.part("image")


# ----------------------------------------------------------------------------------------------
# caption reward
# ----------------------------------------------------------------------------------------------
WORDS = ["<pad>", "<eos>", "<unk>", "yes", "no", "a", "red", "cat", "dog", "is", "there", "on", "mat", "Image",
         "description", ":", "Question", "?", "Answer", "the", "question", "from", "alone", "with", "or", "short",
         "phrase", ".", ","]


def _tiny_judge(**kw):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    return CaptionJudge(LlamaForCausalLM(cfg), tok, **kw)


def _completion(caption):
    return f"<planning>p</planning><caption>{caption}</caption><think>t</think><answer>yes</answer>"


def test_caption_judge_batched_greedy_matches_one_by_one():
    judge = _tiny_judge(max_new_tokens=4, batch_size=3)
    caps = ["a red cat", "a dog on a mat", "cat", "there is a red dog on the mat", "no"]
    qs = ["is there a cat ?", "is there a dog ?", "red ?", "is the dog red ?", "is there a cat ?"]
    batched = judge.answers(caps, qs)
    assert judge.calls == 5
    single = [judge._generate([judge.prompt.format(caption=c, question=q)])[0] for c, q in zip(caps, qs)]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_caption_reward_scores_caches_and_skips_unparsed():
    judge = _tiny_judge(max_new_tokens=3)
    caps = ["a red cat", "a dog on a mat"]
    preds = judge.answers(caps, ["is there a cat ?"] * 2)
    judge.calls = 0
    reward = CaptionReward(judge)
    comps = [_completion(caps[0]), _completion(caps[0]), _completion(caps[1]), "no caption here"]
    gold = [preds[0], preds[0] + " wrong", preds[1], preds[1]]
    out = reward(comps, question=["is there a cat ?"] * 4, answer=gold, image=[None] * 4)
    assert out == [1.0, 0.0, 1.0, 0.0]
    assert judge.calls == 2  # the repeated (caption, question) judged once; the unparsed one not at all
    assert reward.last_stats == {"parsed": 3.0, "judged": 2.0}
    reward(comps[:1], question=["is there a cat ?"], answer=gold[:1])
    assert judge.calls == 3  # the cache lives for one call (one step)
    with pytest.raises(KeyError, match="question"):
        reward(comps, answer=gold)


def test_answer_matching_and_judge_errors():
    assert answer_matches("Yes, there is.", "yes") and not answer_matches("no", "Yes")
    assert not answer_matches("yesterday", "yes")
    assert answer_matches("  A red Cat. ", "a red cat") and not answer_matches("", "")
    with pytest.raises(ValueError, match="placeholder \\{caption\\}"):
        _tiny_judge(prompt="Question: {question}")


# ----------------------------------------------------------------------------------------------
# NTK features and loss
# ----------------------------------------------------------------------------------------------
def _responses(R=8, T=10, D=48, V=257, seed=0):
    """Responses in pairs sharing most tokens / hidden states, so exact cosines spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * (2 / D**0.5)
    h = torch.randn(R, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (R, T), generator=g)
    for i in range(1, R, 2):
        share = i * T // R  # more shared tokens for later pairs
        h[i, :share] = h[i - 1, :share] + 0.1 * torch.randn(share, D, generator=g, dtype=torch.float64)
        y[i, :share] = y[i - 1, :share]
    y[:, -2:] = -100  # padding
    y[0, 0] = -100
    return h, W, y


def _exact_cosines(h, W, y):
    """From explicit float64 [V, D] gradients G_s = d sum_t log p(y_t) / dW."""
    G = []
    for s in range(h.shape[0]):
        Ws = W.clone().requires_grad_(True)
        lp = torch.log_softmax(h[s] @ Ws.t(), dim=-1)
        valid = y[s] != -100
        lp[valid].gather(-1, y[s][valid][:, None]).sum().backward()
        G.append(Ws.grad.flatten())
    return cosine_similarities(torch.stack(G))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sketched_cosine_tracks_exact_cosine(impl):
    """Default k1 = k2 = 128: |sketched - exact cosine| <= 0.1 for every pair and <= 0.03 on average (the
    sketch error is O(1 / sqrt(k1 k2)) per pair; measured here: see the assertion message)."""
    h, W, y = _responses()
    exact = _exact_cosines(h, W, y)
    d = _dev(impl)
    f = response_features(h.float().to(d), W.float().to(d), y.to(d), make_sketch(W.shape[0], W.shape[1], device=d),
                          impl=impl).cpu()
    sk = cosine_similarities(f).double()
    iu = torch.triu_indices(8, 8, 1)
    err = (sk - exact)[iu[0], iu[1]].abs()
    assert exact[iu[0], iu[1]].max() > 0.5 and exact[iu[0], iu[1]].min() < 0.1  # a real spread of cosines
    assert err.max() <= 0.1 and err.mean() <= 0.03, f"max {err.max():.3f} mean {err.mean():.3f}"


def _loss_loop(sim, tau, groups=None):
    R = len(sim)
    losses, pairs = [], 0
    for i in range(R):
        others = [k for k in range(R) if k != i and (groups is None or groups[k] == groups[i])]
        pos = [j for j in others if sim[i][j] < tau]
        pairs += len(pos)
        if pos:
            num = sum(math.exp(sim[i][j]) for j in pos)
            den = sum(math.exp(sim[i][k]) for k in others)
            losses.append(-math.log(num / den))
    return (sum(losses) / len(losses) if losses else 0.0), pairs


def test_conflict_loss_matches_direct_loop():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(9, 5, generator=g, dtype=torch.float64) + 0.5
    sim = cosine_similarities(f)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    for tau, grp in ((0.54, None), (0.3, None), (0.54, groups), (-2.0, None)):
        loss, m = ntk_conflict_loss(sim, tau, grp)
        ref, pairs = _loss_loop(sim.tolist(), tau, None if grp is None else grp.tolist())
        assert abs(loss.item() - ref) < 1e-12 and m["positive_pairs"].item() == pairs
    s = sim.clone().requires_grad_(True)
    loss, m = ntk_conflict_loss(s, -2.0)  # no positives: 0, still differentiable, zero gradient
    loss.backward()
    assert loss.item() == 0 and m["anchors"].item() == 0 and (s.grad == 0).all()


class _TinyLM(torch.nn.Module):
    def __init__(self, V=97, D=24):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.mix = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.mix(self.emb(ids)))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_regularizer_backpropagates_to_the_model(impl):
    """Every parameter gets the gradient of the float64 pure-autograd version of the same regularizer."""
    torch.manual_seed(0)
    model = _TinyLM()
    R, T = 6, 7
    ids = torch.randint(0, 97, (R, T))
    y = torch.randint(0, 97, (R, T))
    y[:, :2] = -100
    reg = NTKRegularizer(ntk_weight=0.5, k1=32, k2=16, impl=impl)
    with torch.no_grad():  # threshold in a gap near the median similarity: some pairs positive, some not
        sim = cosine_similarities(response_features(model.hidden(ids), model.head.weight, y, reg.sketch(97, 24, "cpu")))
        vals = sim[tuple(torch.triu_indices(R, R, 1))].sort().values
        gaps = vals[1:] - vals[:-1]
        mid = len(gaps) // 4 + int(gaps[len(gaps) // 4: 3 * len(gaps) // 4].argmax())  # a clear gap: fp32 = fp64 sets
        reg.threshold = ((vals[mid] + vals[mid + 1]) / 2).item()
    d = _dev(impl)  # differentiable .to: the gradients come back to the CPU model
    loss, metrics = reg(model.hidden(ids).to(d), model.head.weight.to(d), y.to(d))
    loss, metrics = loss.cpu(), {k: v.cpu() for k, v in metrics.items()}
    loss.backward()
    assert 0 < metrics["positive_pairs"] < R * (R - 1) and loss > 0
    assert math.isclose(loss.item(), 0.5 * metrics["ntk_loss"].item(), rel_tol=1e-6)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_model = _TinyLM().double()
    ref_model.load_state_dict(model.state_dict())
    sk = reg.sketch(97, 24, "cpu")
    h = ref_model.hidden(ids)
    p = torch.softmax(h @ ref_model.head.weight.t(), dim=-1)
    valid = y != -100
    a = sk.proj.double()[:, torch.where(valid, y, 0)].permute(1, 2, 0) - p @ sk.proj.double().t()
    a = a * valid[..., None]
    f = torch.einsum("rtk,rtl->rkl", a, h @ sk.B.double()).reshape(R, -1)
    ref_loss, _ = ntk_conflict_loss(cosine_similarities(f), reg.threshold)
    (0.5 * ref_loss).backward()
    assert abs(ref_loss.item() - metrics["ntk_loss"].item()) < 1e-5
    for n, prm in ref_model.named_parameters():
        assert ours[n].abs().max() > 0, n
        torch.testing.assert_close(ours[n].double(), prm.grad, atol=2e-6, rtol=1e-3, msg=n)
