"""hero.experiments.confidence_trap.tiny_vlm: tokenizer, forward/backward, padding invariance, generate (KV cache), save/load."""
import json
import os
import time

import numpy as np
import pytest
import torch

from hero.experiments.confidence_trap.digits_pope import build_digits_pope, cot_target
from hero.experiments.confidence_trap.tiny_vlm import (
    SPECIAL_TOKENS,
    TinyTokenizer,
    TinyVLM,
    build_tiny_vlm,
    load_tiny_vlm,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: OpenMP threads only add contention on a shared 2-core machine (40 ms vs 1.5 s per generate).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_tiny_vlm(seed=0)
    return model, proc


@pytest.fixture(scope="module")
def examples():
    return build_digits_pope(4, subset="test", seed=0)[:8]


def _sft(proc, exs):
    return proc.sft_batch([e["image"] for e in exs], [e["question"] for e in exs], [cot_target(e) for e in exs])


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def test_tokenizer_roundtrip_and_single_tokens():
    tok = TinyTokenizer()
    text = "<think>I see 3, 1, 4.</think><answer>no</answer> Random text: ~{}|\\ nothing!\n\tyes"
    assert tok.decode(tok.encode(text)) == text
    for t in SPECIAL_TOKENS + ("yes", "no"):
        assert len(tok.encode(t)) == 1, t
    assert tok.convert_ids_to_tokens(tok.encode("Is there a 7 in the image?")) == ["Is there a ", "7", " in the image?"]
    assert len(tok.encode(cot_target({"digits": [3, 1, 4], "answer": "no"}))) == 12
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("é") == [tok.unk_token_id]
    ids = [tok.bos_token_id, tok.image_token_id] + tok.encode("<answer>yes</answer>") + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<answer>yes</answer>"


def test_tokenizer_padding_and_persistence(tmp_path):
    tok = TinyTokenizer()
    b = tok(["ab", "abcd"])
    assert b["input_ids"].shape == (2, 4)
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert b["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2
    ids, mask = tok.pad([[5, 6], [7]], padding_side="right")
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    tok.save_pretrained(str(tmp_path))
    tok2 = TinyTokenizer.from_pretrained(str(tmp_path))
    assert tok2.vocab_size == tok.vocab_size and tok2.encode("I see 5.") == tok.encode("I see 5.")
    with pytest.raises(ValueError, match="padding_side"):
        tok.pad([[1]], padding_side="middle")


# ---------------------------------------------------------------------------------------------
# forward / backward
# ---------------------------------------------------------------------------------------------
def test_forward_shapes_hidden_and_loss(tiny, examples):
    model, proc = tiny
    b = _sft(proc, examples)
    B, T = b["input_ids"].shape
    cfg = model.config
    assert (b["labels"] != -100).sum(1).tolist() == [len(proc.tokenizer.encode(cot_target(e))) + 1 for e in examples]
    assert b["pixel_values"].shape == (B, 1, 8, 24)
    out = model(**b, output_hidden_states=True)
    assert out.logits.shape == (B, T, cfg.vocab_size)
    assert out.last_hidden_state.shape == (B, T, cfg.hidden_size)
    assert out.hidden_states is not None and len(out.hidden_states) >= cfg.num_layers
    assert torch.isfinite(out.loss) and abs(out.loss.item() - np.log(cfg.vocab_size)) < 1.0  # random init
    # hidden states without logits, and logits = h @ W^T (what the fused LM-head loss relies on)
    h = model.hidden_states(b["input_ids"], b["attention_mask"], b["pixel_values"])
    torch.testing.assert_close(h, out.last_hidden_state)
    W = model.get_output_embeddings().weight
    assert W.shape == (cfg.vocab_size, cfg.hidden_size) and model.get_output_embeddings().bias is None
    torch.testing.assert_close(h @ W.T, out.logits)
    no_logits = model(b["input_ids"], b["attention_mask"], b["pixel_values"], return_logits=False)
    assert no_logits.logits is None and no_logits.last_hidden_state.shape == (B, T, cfg.hidden_size)
    # the loss is HF's shifted mean CE over labels != -100
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), b["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_backward_reaches_vision_and_decoder(tiny, examples):
    model, proc = tiny
    model.zero_grad(set_to_none=True)
    model(**_sft(proc, examples)).loss.backward()
    for name in ("vision.patch.weight", "vision.proj.0.weight", "lm.model.layers.0.self_attn.q_proj.weight", "lm.lm_head.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_left_padding_and_images_matter(tiny, examples):
    model, proc = tiny
    short = examples[:1]
    b1 = _sft(proc, short)
    # pair it with a longer sequence so it gets left-padded
    long_ex = dict(examples[1], digits=[1, 2, 3, 4, 5, 6, 7])
    b2 = _sft(proc, short + [long_ex])
    T1 = b1["input_ids"].shape[1]
    pad = b2["input_ids"].shape[1] - T1
    assert pad > 0 and (b2["attention_mask"][0, :pad] == 0).all()
    with torch.no_grad():
        l1 = model(**b1).logits[0]
        l2 = model(**b2).logits[0, pad:]
        assert torch.isfinite(model(**b2).logits).all()  # padded positions too (no NaN from empty softmax)
    torch.testing.assert_close(l2, l1, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        other = dict(b1, pixel_values=-b1["pixel_values"])
        assert (model(**other).logits - l1).abs().max() > 1e-4  # the image is actually used


def test_input_errors(tiny, examples):
    model, proc = tiny
    b = proc([e["image"] for e in examples[:2]], [e["question"] for e in examples[:2]])
    with pytest.raises(ValueError, match="pixel_values is None"):
        model(b["input_ids"], b["attention_mask"])
    with pytest.raises(ValueError, match="<image> tokens"):
        model(b["input_ids"][:, 3:], b["attention_mask"][:, 3:], b["pixel_values"])
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(b["input_ids"], b["attention_mask"], b["pixel_values"][:, :, :4])
    with pytest.raises(ValueError, match="image_size"):
        build_tiny_vlm(image_size=(8, 22))


def test_processor_handles_rgb_and_other_sizes(tiny):
    _, proc = tiny
    rgb = np.random.default_rng(0).integers(0, 256, (8, 24, 3), dtype=np.uint8)
    big = np.random.default_rng(1).integers(0, 256, (16, 48), dtype=np.uint8)
    pv = proc.pixel_values([rgb, big])
    assert pv.shape == (2, 1, 8, 24) and pv.min() >= -1 and pv.max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        proc.pixel_values([np.zeros((8, 24), np.float32)])


def test_forward_backward_speed(tiny, examples):
    model, proc = tiny
    b = _sft(proc, examples)  # 8 sequences of ~30 tokens (12 image + prompt + 13 target)
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        model(**b).loss.backward()
        ts.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    # ~15 ms on one idle core; generous bound for a loaded shared machine
    assert sorted(ts)[len(ts) // 2] < 0.5


def test_sft_steps_reduce_loss(examples):
    model, proc = build_tiny_vlm(seed=1)
    b = _sft(proc, examples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = model(**b).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


def test_gradient_checkpointing_matches(examples):
    m1, proc = build_tiny_vlm(seed=2)
    m2, _ = build_tiny_vlm(seed=2)
    m2.load_state_dict(m1.state_dict())
    m2.gradient_checkpointing_enable()
    m1.train()
    m2.train()
    b = _sft(proc, examples[:4])
    l1, l2 = m1(**b).loss, m2(**b).loss
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=n)
    m2.gradient_checkpointing_disable()


def test_qwen2_decoder_builds(examples):
    model, proc = build_tiny_vlm(seed=0, decoder_type="qwen2", num_layers=1)
    out = model(**_sft(proc, examples[:2]))
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def test_generate_greedy_cache_matches_no_cache(tiny, examples):
    model, proc = tiny
    g = proc([e["image"] for e in examples], [e["question"] for e in examples])
    a = model.generate(**g, max_new_tokens=10, output_logits=True, eos_token_id=[])
    b = model.generate(**g, max_new_tokens=10, output_logits=True, eos_token_id=[], use_cache=False)
    assert a.sequences.shape == (8, 10) and a.logits.shape == (8, 10, model.config.vocab_size)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.sequences, a.logits.argmax(-1))
    assert (a.completion_mask == 1).all()
    assert len(proc.batch_decode(a.sequences)) == 8


def test_generate_eos_and_padding(tiny, examples):
    model, proc = tiny
    g = proc([e["image"] for e in examples], [e["question"] for e in examples])
    ref = model.generate(**g, max_new_tokens=6, eos_token_id=[])
    eos = int(ref.sequences[0, 1])  # row 0 emits this token at step 1 -> it stops there
    out = model.generate(**g, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    seq, mask = out.sequences, out.completion_mask
    assert seq[0, 1] == eos and mask[0].tolist()[:2] == [1, 1]
    for i in range(seq.shape[0]):
        hits = (seq[i] == eos).nonzero()
        if len(hits):
            t = int(hits[0])
            assert (seq[i, t + 1 :] == 0).all() and mask[i, : t + 1].all() and not mask[i, t + 1 :].any()
            assert torch.equal(seq[i, : t + 1], ref.sequences[i, : t + 1])
        else:
            assert mask[i].all()
    # every row stops at its first token -> a single step
    first = int(ref.sequences[0, 0])
    one = model.generate(**{k: v[:1] for k, v in g.items()}, max_new_tokens=6, eos_token_id=first)
    assert one.sequences.shape == (1, 1)


def test_generate_sampling_is_seeded(tiny, examples):
    model, proc = tiny
    g = proc([e["image"] for e in examples], [e["question"] for e in examples])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, eos_token_id=[])
    s1 = model.generate(**g, generator=torch.Generator().manual_seed(0), **kw).sequences
    s2 = model.generate(**g, generator=torch.Generator().manual_seed(0), **kw).sequences
    s3 = model.generate(**g, generator=torch.Generator().manual_seed(1), **kw).sequences
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    greedy = model.generate(**g, max_new_tokens=8, eos_token_id=[]).sequences
    assert torch.equal(model.generate(**g, do_sample=True, temperature=0.0, max_new_tokens=8, eos_token_id=[]).sequences, greedy)
    top1 = model.generate(**g, generator=torch.Generator().manual_seed(3), top_k=1, **kw).sequences
    assert torch.equal(top1, greedy)  # top_k=1 sampling is greedy
    tiny_p = model.generate(**g, generator=torch.Generator().manual_seed(3), top_p=1e-6, **kw).sequences
    assert torch.equal(tiny_p, greedy)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**g, max_new_tokens=0)


# ---------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tiny, examples, tmp_path):
    model, proc = tiny
    path = str(tmp_path / "ckpt")
    model.save_pretrained(path, tokenizer=proc.tokenizer)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["model_type"] == "hero-tiny-vlm" and cfg["image_size"] == [8, 24]
    m2, p2 = load_tiny_vlm(path)
    b = _sft(proc, examples)
    with torch.no_grad():
        torch.testing.assert_close(m2(**_sft(p2, examples)).logits, model(**b).logits, atol=0, rtol=0)
    # saving again over an existing checkpoint works (atomic replace)
    m2.save_pretrained(path)
    assert TinyVLM.from_pretrained(path).num_parameters() == model.num_parameters()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    with pytest.raises(ValueError, match="not a hero tiny VLM"):
        TinyVLM.from_pretrained(path)


def test_completion_hidden_states_match_generate(tiny, examples):
    model, proc = tiny
    g = proc([e["image"] for e in examples], [e["question"] for e in examples])
    out = model.generate(**g, max_new_tokens=7, output_logits=True, eos_token_id=[])
    h = model.completion_hidden_states(g["input_ids"], g["attention_mask"], g["pixel_values"],
                                       out.sequences, out.completion_mask)
    assert h.shape == (8, 7, model.config.hidden_size)
    logits = h @ model.get_output_embeddings().weight.T
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
