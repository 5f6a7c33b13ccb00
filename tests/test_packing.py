"""Padding-free (packed) policy forward: the packed layout, its equality with the padded layout (per-token
log-probs / entropies, loss and parameter gradients of tiny Llama / Qwen2 from transformers configs), no
attention across rows, and the trainer's model.packing option."""
import pytest
import torch

from hero.config import ConfigError
from hero.rollout import IGNORE_INDEX, CausalLMAdapter, completion_hidden, pack_rows
from hero_kernels import hero_loss, linear_entropy_logprob
from tests.test_trainer import make_trainer, tiny_cfg

PROMPT = [7, 2, 12, 1]  # unpadded prompt lengths: left padding up to P = 12
COMPLETION = [3, 61, 17, 90]  # very different completion lengths: right padding up to C = 90


def _rows(seed=0, vocab=250):
    """Left-padded prompts + right-padded completions: input_ids / attention_mask [4, P + C], labels [4, C]."""
    g = torch.Generator().manual_seed(seed)
    P, C = max(PROMPT), max(COMPLETION)
    ids = torch.randint(3, vocab, (len(PROMPT), P + C), generator=g)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(PROMPT, COMPLETION)):
        mask[i, P - p: P + c] = 1
    ids = ids * mask  # pad id 0 where masked
    labels = torch.where(mask[:, P:].bool(), ids[:, P:], torch.full_like(ids[:, P:], IGNORE_INDEX))
    return ids, mask, labels


def _model(family, attn):
    from hero.testing.tiny_models import build_tiny_model

    model, tok = build_tiny_model(family, hidden_size=32, num_layers=2, seed=1)
    model.config._attn_implementation = attn
    return model.float(), CausalLMAdapter(tok)


def test_pack_rows_layout_and_errors():
    ids = torch.tensor([[0, 5, 6, 7, 8, 0], [0, 9, 4, 3, 2, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[7, 8, -100], [3, 2, -100]])  # P = 3, C' = 3
    pk = pack_rows(ids, mask, labels)
    assert pk.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3, 2]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    # token 7 (row 0, col 0) is predicted by the state of token 6 (packed position 1), ...
    assert pk.hidden_index.tolist() == [1, 2, 5, 6] and pk.row.tolist() == [0, 0, 1, 1]
    assert pk.unpack(torch.tensor([1.0, 2.0, 3.0, 4.0]), (2, 3)).tolist() == [[1, 2, 0], [3, 4, 0]]
    with pytest.raises(ValueError, match="attention_mask 0"):
        pack_rows(ids, mask * torch.tensor([1, 1, 1, 1, 0, 1]), labels)
    with pytest.raises(ValueError, match="no attended prompt token"):
        pack_rows(ids, torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0]]), labels)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager")])
def test_packed_forward_matches_padded_logp_entropy_and_grads(family, attn):
    """The same rows padded [4, P + C] and packed [1, sum of lengths]: per-token log-prob / entropy, the HERO
    loss and every parameter gradient agree to fp32 tolerance."""
    model, adapter = _model(family, attn)
    assert adapter.packing_unsupported(model) is None
    ids, mask, labels = _rows()
    P, C = ids.shape[1] - labels.shape[1], labels.shape[1]
    pk = pack_rows(ids, mask, labels)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0])
    head = model.lm_head.weight
    out = {}
    for layout in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        if layout == "padded":
            h = completion_hidden(adapter.hidden_states(model, ids, mask), P, C)
            logp, H = linear_entropy_logprob(h, head, labels, impl="torch")
            logp, H = logp[pk.row, pk.col], H[pk.row, pk.col]
            loss, _ = hero_loss(h, labels, adv, weight=head, impl="torch", max_len=C)
        else:
            h = adapter.packed_hidden_states(model, pk.input_ids, pk.position_ids)[0, pk.hidden_index]
            y = labels[pk.row, pk.col]
            logp, H = linear_entropy_logprob(h, head, y, impl="torch")
            loss, _ = hero_loss(h, y, adv[pk.row], weight=head, seq_ids=pk.row, impl="torch", max_len=C)
        (loss + (logp * 0.01).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[layout] = (logp.detach(), H.detach(), loss.detach(), grads)
    assert out["packed"][0].shape == (sum(COMPLETION),) and "model.embed_tokens.weight" in out["padded"][3]
    assert_layouts_agree(out["padded"], out["packed"])


def assert_layouts_agree(padded, packed):
    """(log-probs [N], entropies [N], loss, {name: grad}) of the padded and the packed layout agree (fp32)."""
    (lp0, H0, l0, g0), (lp1, H1, l1, g1) = padded, packed
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(H1, H0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for n, g in g0.items():  # (+ 1e-9: key biases' gradients are 0 in exact arithmetic, ~1e-11 of rounding)
        torch.testing.assert_close(g1[n], g, atol=1e-5 * g.abs().max().item() + 1e-9, rtol=1e-4, msg=n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_to_each_other(attn):
    """Changing row 1's tokens changes only row 1's hidden states: not the earlier row 0 (causality alone would
    give that) and not the later rows 2, 3 (only the block-diagonal mask gives that)."""
    model, adapter = _model("llama", attn)
    ids, mask, labels = _rows()
    other, _, _ = _rows(seed=5)
    ids2 = ids.clone()
    ids2[1] = torch.where(mask[1].bool(), other[1], ids[1])
    labels2 = labels.clone()
    labels2[1] = torch.where(labels[1] != IGNORE_INDEX, ids2[1, -labels.shape[1]:], labels[1])
    with torch.no_grad():
        hs = []
        for x, y in ((ids, labels), (ids2, labels2)):
            pk = pack_rows(x, mask, y)
            hs.append(adapter.packed_hidden_states(model, pk.input_ids, pk.position_ids)[0, pk.hidden_index])
    row = pk.row
    assert not torch.allclose(hs[0][row == 1], hs[1][row == 1])
    torch.testing.assert_close(hs[1][row != 1], hs[0][row != 1], atol=1e-6, rtol=0)


def test_packing_option_resolves_per_model_and_on_fails_with_the_reason(tmp_path):
    assert make_trainer(tiny_cfg(tmp_path)).packing  # auto: a text causal LM with sdpa
    assert not make_trainer(tiny_cfg(tmp_path, **{"model.packing": "off"})).packing
    assert not make_trainer(tiny_cfg(tmp_path, **{"model.attn_implementation": "flex_attention"})).packing
    with pytest.raises(ConfigError, match="model.packing=on: attention implementation 'flex_attention'"):
        make_trainer(tiny_cfg(tmp_path, **{"model.packing": "on", "model.attn_implementation": "flex_attention"}))
    with pytest.raises(ConfigError, match="model.packing must be one of"):
        tiny_cfg(tmp_path, **{"model.packing": "yes"})


def test_packing_resolves_for_a_vlm(tmp_path):
    """Qwen2-VL packs (per-row M-RoPE ids); tests/test_vlm_packing.py checks the VLM families' packed forward."""
    from hero.models.hf_vlm import HFVLMAdapter
    from hero.testing.tiny_models import build_tiny_model

    model, proc = build_tiny_model("qwen2_vl", hidden_size=32, num_layers=1)
    model.config._attn_implementation = "sdpa"
    assert HFVLMAdapter(proc, model).packing_unsupported(model) is None


@pytest.mark.parametrize("path,loss_agg", [("fused", "seq-mean-token-mean"), ("fused", "token-mean"),
                                           ("fused", "seq-mean-token-sum-norm"), ("reference", "seq-mean-token-mean")])
def test_trainer_packed_step_equals_padded(tmp_path, path, loss_agg):
    """Trainer.backward with packing on vs off on one rollout (completions of different lengths, KL term, old
    log-probs, token-budget micro-batches): the same loss, metrics and gradients."""
    cfg = tiny_cfg(tmp_path, **{"kl.beta": 0.1, "num_iterations": 2, "gate.enabled": False, "loss.path": path,
                                "loss.loss_agg": loss_agg, "generation.max_new_tokens": 8})
    tr = make_trainer(cfg)
    assert tr.packing
    ro = tr.rollout()
    ro.labels[0, 2:] = IGNORE_INDEX  # one short completion: pad tokens in the padded layout
    ro.labels[3, 5:] = IGNORE_INDEX
    assert_trainer_layouts_agree(tr, ro, micro_batch_tokens=2 * (ro.prompt_len + 8))


def assert_trainer_layouts_agree(tr, ro, micro_batch_tokens):
    """Fixed-policy log-probs, then Trainer.backward's metrics and gradients on rollout ``ro``, with packing on
    and off (old log-probs moved off the policy's): the same in both layouts."""
    results = {}
    for packing in (True, False):
        tr.packing = tr.pack_always = packing  # every micro-batch packed (auto + sdpa packs only where it pays)
        ro.old_logp, ro.ref_logp = tr._fixed_policy_logp(tr.model, ro), tr._fixed_policy_logp(tr.ref_model, ro)
        logps = (ro.old_logp.clone(), ro.ref_logp.clone())
        with torch.no_grad():  # ratios and KL away from 1 / 0
            ro.old_logp += 0.3 * torch.randn(ro.old_logp.shape, generator=torch.Generator().manual_seed(0))
        tr.cfg.micro_batch_tokens = micro_batch_tokens
        tr.model.zero_grad(set_to_none=True)
        metrics = tr.backward(ro)
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        results[packing] = (logps, metrics, grads)
    (lp1, m1, g1), (lp0, m0, g0) = results[True], results[False]
    for a, b in zip(lp1, lp0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert m1.keys() == m0.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-6), k
    assert g0.keys() == g1.keys()
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, atol=1e-5 * g.abs().max().item() + 1e-9, rtol=1e-4, msg=n)


def test_micro_batch_tokens_counts_unpadded_tokens_when_packed(tmp_path):
    tr = make_trainer(tiny_cfg(tmp_path, **{"gate.enabled": False, "generation.max_new_tokens": 8}))
    ro = tr.rollout()
    ro.labels[0, 2:] = IGNORE_INDEX
    lengths = (ro.labels != IGNORE_INDEX).sum(1)
    tokens = ro.prompt["attention_mask"][ro.kept].sum(1) + lengths
    tr.cfg.micro_batch_tokens = int(tokens.max()) + 3
    groups = tr._micro_batches(ro)
    assert sorted(torch.cat(groups).tolist()) == list(range(ro.labels.shape[0])) and len(groups) > 1
    assert all(len(g) == 1 or int(tokens[g].sum()) <= tr.cfg.micro_batch_tokens for g in groups)


def test_auto_packs_a_micro_batch_only_where_the_sdpa_mask_is_no_larger(tmp_path):
    """eager / sdpa attend packed rows through a [T, T] mask (eager: [heads, T, T] scores), so "auto" packs a
    micro-batch only when T^2 <= rows x width^2: equal-length rows stay padded (packing them grew the attention
    memory ~rows x: 12x sdpa / 23x eager peak at 32 x 256 tokens), one long row among short ones is packed;
    "on" always packs."""
    tr = make_trainer(tiny_cfg(tmp_path, **{"gate.enabled": False, "generation.max_new_tokens": 16}))
    assert tr.packing and not tr.pack_always  # auto, sdpa
    ro = tr.rollout()
    assert ro.labels.shape[1] == 16 and ro.prompt_len <= 6  # (random tiny model: no early eos everywhere)
    ro.completion_mask[:] = 1
    ro.labels[:] = ro.completion_ids[:, : ro.labels.shape[1]]
    rows = torch.arange(ro.labels.shape[0])
    assert tr._micro_batch(ro, rows).packed is None  # equal lengths: T^2 = rows^2 L^2 > rows L^2
    ro.labels[1:, 1:] = IGNORE_INDEX  # one 16-token completion, the others 1 token
    ro.completion_mask[1:, 1:] = 0
    assert tr._micro_batch(ro, rows).packed is not None
    ro.labels[:] = ro.completion_ids[:, : ro.labels.shape[1]]
    ro.completion_mask[:] = 1
    tr.pack_always = True  # model.packing on / flash_attention_2
    assert tr._micro_batch(ro, rows).packed is not None
    assert make_trainer(tiny_cfg(tmp_path, **{"model.packing": "on"})).pack_always
