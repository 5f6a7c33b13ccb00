"""hero_loss's 3-GEMM path (hero_kernels.linear_hero_loss) against the 4-GEMM op path and the float64 reference.

Small shapes with a tiny chunk budget, so responses span several chunks ("open" responses: the unscaled X
accumulator and the deferred dh rows), chunk boundaries fall inside and between responses, and the packed
layouts reorder rows. CPU C++ and torch backends.
"""
import math

import pytest
import torch

import hero_kernels as hk
from hero_kernels import linear_hero_loss as LHL
from hero_kernels import reference as R
from hero_kernels.loss import LOSS_AGGS, METRIC_KEYS

B, T, D, V = 3, 23, 12, 41


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows: the 23-token responses span five chunks, boundaries land mid-response."""
    monkeypatch.setattr(LHL, "CHUNK_BYTES", {"cpu": 5 * V * 4, "cuda": 5 * V * 4})


def _problem(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.6).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 17:] = -100  # ragged tail
    y[1, 4] = -100  # hole inside a response
    y[2, :3] = -100
    lp = R.linear_entropy_logprob(h, W, y, b)[0].float()
    old = lp + 0.3 * torch.randn(B, T, generator=g)  # some ratios clip
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    return h, W, b, y, old, ref


def _call(three, h, W, b, y, A, impl="cpu", upstream=1.7, **kw):
    """(loss, metrics, grads of h / W / b) on the 3-GEMM path or the 4-GEMM op path."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (h, W, b)]
    calls = []
    orig = LHL.run

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    LHL.ENABLED = three
    LHL.run = spy
    try:
        loss, m = hk.hero_loss(leaves[0], y, A, weight=leaves[1], bias=leaves[2], impl=impl, **kw)
    finally:
        LHL.ENABLED, LHL.run = True, orig
    assert bool(calls) == three, "the 3-GEMM path was (not) taken"
    (loss * upstream).backward()
    return loss.detach(), m, [None if t is None else t.grad for t in leaves]


def _assert_same(a, b, rtol=2e-5):
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
    for k in METRIC_KEYS:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-6, atol=1e-7)
    for ga, gb in zip(a[2], b[2]):
        if gb is None:
            assert ga is None
            continue
        scale = gb.abs().max().clamp(min=1e-6)
        torch.testing.assert_close((ga / scale).double(), (gb / scale).double(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_matches_four_gemm_path(small_chunks, loss_agg, impl):
    h, W, b, y, old, ref = _problem()
    # (kl terms, weight_on, per-token advantages, entropy weighting): each option on and off at least once
    combos = [("none", "all", False, True), ("old", "negative", True, True), ("old+ref", "all", True, True),
              ("old+ref", "negative", False, True), ("old", "all", False, False), ("old+ref", "all", True, False)]
    for i, (kl, weight_on, per_token_A, weighting) in enumerate(combos):
        g = torch.Generator().manual_seed(i)
        A = torch.randn((B, T) if per_token_A else (B,), generator=g)
        kw = dict(loss_agg=loss_agg, weight_on=weight_on, entropy_weighting=weighting, kappa=0.7, temperature=0.9,
                  eps_high=0.28)
        if kl != "none":
            kw["old_logp"] = old
        if kl == "old+ref":
            kw.update(ref_logp=ref, beta=0.05)
        _assert_same(_call(True, h, W, b, y, A, impl, **kw), _call(False, h, W, b, y, A, impl, **kw))


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_matches_float64_reference(small_chunks, loss_agg):
    h, W, b, y, old, ref = _problem()
    A = torch.randn(B)
    kw = dict(old_logp=old, ref_logp=ref, beta=0.05, kappa=0.5, loss_agg=loss_agg, weight_on="negative")
    loss, m, grads = _call(True, h, W, b, y, A, upstream=1.0, **kw)
    leaves = [t.double().requires_grad_(True) for t in (h, W, b)]
    rloss, parts = R.hero_loss(leaves[0], y, A, weight=leaves[1], bias=leaves[2], **kw)
    rloss.backward()
    torch.testing.assert_close(loss.double(), rloss.detach(), rtol=2e-5, atol=2e-6)
    for g, r in zip(grads, leaves):
        scale = r.grad.abs().max()
        torch.testing.assert_close(g.double() / scale, r.grad / scale, rtol=1e-4, atol=2e-5)
    for k in METRIC_KEYS:
        assert float(m[k]) == pytest.approx(parts[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("layout", ["packed-shuffled", "several-per-row"])
def test_packed_layouts(small_chunks, layout):
    h, W, b, y, old, ref = _problem()
    N = B * T
    g = torch.Generator().manual_seed(3)
    if layout == "packed-shuffled":  # [N] tokens in random order, arbitrary ids: rows are regrouped by response
        perm = torch.randperm(N, generator=g)
        ids = (torch.arange(B) * 7 + 5).repeat_interleave(T)[perm]
        hh, yy, oo, rr = h.reshape(N, D)[perm], y.reshape(N)[perm], old.reshape(N)[perm], ref.reshape(N)[perm]
    else:  # one [1, N] row holding responses of 1, 2, 9, 30 and 27 tokens, plus masked ids
        cuts = [0, 1, 3, 12, 42, 67, N]
        ids = torch.cat([torch.full((e - s,), i if i < 5 else -1) for i, (s, e) in enumerate(zip(cuts, cuts[1:]))])
        ids = ids.reshape(1, N)
        hh, yy, oo, rr = h.reshape(1, N, D), y.reshape(1, N), old.reshape(1, N), ref.reshape(1, N)
    A = torch.randn(yy.shape, generator=g)
    for agg in LOSS_AGGS:
        kw = dict(seq_ids=ids, max_len=40, loss_agg=agg, old_logp=oo, ref_logp=rr, beta=0.02, kappa=0.6)
        _assert_same(_call(True, hh, W, b, yy, A, **kw), _call(False, hh, W, b, yy, A, **kw))


def test_normalizer_and_gradient_accumulation(small_chunks):
    h, W, b, y, old, _ = _problem()
    A = torch.randn(B)
    norm = hk.loss_normalizer(y) * 2.5
    for n in (norm, float(norm)):
        kw = dict(normalizer=n, old_logp=old)
        _assert_same(_call(True, h, W, b, y, A, **kw), _call(False, h, W, b, y, A, **kw))


def test_rescale_of_open_accumulator(monkeypatch, small_chunks):
    """Entropies falling along a response (the running max of -H/kappa keeps growing) with a tiny rescale
    threshold: X is rescaled on most chunks; a small |kappa| makes the weights very peaked."""
    monkeypatch.setattr(LHL, "_RESCALE_AT", 0.5)
    h, W, b, y, old, _ = _problem()
    h = h * torch.linspace(0.2, 3.0, T).reshape(1, T, 1)  # later tokens: sharper rows, lower entropy
    A = torch.randn(B)
    for kappa in (0.05, -0.3, 3.0):
        kw = dict(old_logp=old, kappa=kappa)
        _assert_same(_call(True, h, W, b, y, A, **kw), _call(False, h, W, b, y, A, **kw))


def test_default_budget_single_chunk_and_no_bias():
    h, W, _, y, old, _ = _problem(bias=False)
    A = torch.randn(B)
    _assert_same(_call(True, h, W, None, y, A, old_logp=old), _call(False, h, W, None, y, A, old_logp=old))


def test_bfloat16_hidden_within_twice_the_op_error(small_chunks):
    h, W, b, y, old, _ = _problem()
    A = torch.randn(B)
    exact = _call(True, h.double(), W.double(), b.double(), y, A, old_logp=old)
    hb, Wb, bb = h.bfloat16(), W.bfloat16(), b.bfloat16()
    ours = _call(True, hb, Wb, bb, y, A, old_logp=old)
    op = _call(False, hb, Wb, bb, y, A, old_logp=old)
    assert ours[2][0].dtype == torch.bfloat16 and ours[2][1].dtype == torch.bfloat16
    for go, gp, ge in zip(ours[2], op[2], exact[2]):
        err_ours = (go.double() - ge).abs().max()
        err_op = (gp.double() - ge).abs().max()
        assert err_ours <= 2 * err_op + 1e-6 * ge.abs().max(), (float(err_ours), float(err_op))


def test_frozen_head_and_detached_hidden(small_chunks):
    h, W, b, y, old, _ = _problem()
    A = torch.randn(B)
    ref = _call(False, h, W, b, y, A, old_logp=old)[2]
    # frozen LM head (LoRA): only dh; detached hidden: only dW / db
    hh = h.clone().requires_grad_(True)
    loss, _ = hk.hero_loss(hh, y, A, weight=W, bias=b, old_logp=old, impl="cpu")
    (loss * 1.7).backward()
    torch.testing.assert_close(hh.grad, ref[0], rtol=2e-5, atol=1e-7)
    Wl, bl = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss, _ = hk.hero_loss(h, y, A, weight=Wl, bias=bl, old_logp=old, impl="cpu")
    (loss * 1.7).backward()
    torch.testing.assert_close(Wl.grad, ref[1], rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(bl.grad, ref[2], rtol=2e-5, atol=1e-7)


def test_non_contiguous_hidden_view_and_all_masked(small_chunks):
    h, W, b, y, old, _ = _problem()
    A = torch.randn(B)
    base = torch.randn(B, T + 5, D)
    base[:, 2:2 + T] = h
    for yy in (y, torch.full_like(y, -100)):
        outs = []
        for three in (True, False):
            bb = base.clone().requires_grad_(True)
            LHL.ENABLED = three
            try:
                loss, _ = hk.hero_loss(bb[:, 2:2 + T], yy, A, weight=W, old_logp=old, impl="cpu")
            finally:
                LHL.ENABLED = True
            loss.backward()
            outs.append((loss.detach(), bb.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-5, atol=1e-7)
        assert torch.isfinite(outs[0][1]).all()


def test_falls_back_where_it_cannot_apply():
    h, W, b, y, old, _ = _problem()
    A = torch.randn(B)
    Wl = W.clone().requires_grad_(True)
    assert LHL.applies(h, Wl, None, "cpu", False)
    assert not LHL.applies(h, Wl, None, "cpu", True)  # entropy_grad: the op's backward owns dH
    assert not LHL.applies(h, W, None, "cpu", False)  # nothing needs a gradient
    assert not LHL.applies(h, Wl, None, "cpu", False, (A.clone().requires_grad_(True),))
    with torch.no_grad():
        assert not LHL.applies(h, Wl, None, "cpu", False)
    # hero_loss then runs the op path: run() is never called
    orig = LHL.run
    LHL.run = None
    try:
        loss, _ = hk.hero_loss(h, y, A, weight=Wl, old_logp=old, entropy_grad=True, impl="cpu")
        loss.backward()
        with torch.no_grad():
            hk.hero_loss(h, y, A, weight=Wl, old_logp=old, impl="cpu")
    finally:
        LHL.run = orig
    assert Wl.grad is not None


def test_backward_twice_is_refused(small_chunks):
    h, W, b, y, old, _ = _problem()
    Wl = W.clone().requires_grad_(True)
    loss, _ = hk.hero_loss(h, y, torch.randn(B), weight=Wl, old_logp=old, impl="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_chunk_plan_ends_on_response_boundaries():
    starts = [0, 3, 4, 20, 22, 30]  # responses of 3, 1, 16, 2 and 8 rows
    plan = LHL.chunk_plan(starts, 5, open_runs=True)
    assert plan == [(0, 4, False), (4, 9, True), (9, 14, True), (14, 19, True), (19, 22, False), (22, 27, True),
                    (27, 30, False)]
    assert LHL.chunk_plan(starts, 5, open_runs=False) == [(p, min(p + 5, 30), False) for p in range(0, 30, 5)]
    assert LHL.chunk_plan([0], 5, True) == []
    # every two consecutive chunks hold more than C rows
    assert all(p[1] - p[0] + q[1] - q[0] > 5 for p, q in zip(plan, plan[1:]))
    assert LHL.chunk_rows(128256, 4, "cpu") == (32 << 20) // (128256 * 4)
    assert math.isclose(LHL.chunk_rows(100, 6, "cpu", budget=600), 1)


# ---- launch plan of the CUDA path (pure Python: no GPU) ----
_MIXED = [1, 5000, 300, 4185, 4186, 9000, 17, 1024, 1024, 12000, 2]  # closed, open, chunk-sized, tiny


def _starts(lengths):
    s = [0]
    for n in lengths:
        s.append(s[-1] + n)
    return s


def _plan_chunks(launches):
    """{(rows, open): count} from the plan's logits GEMM entries (one per chunk visited)."""
    out = {}
    for k in launches:
        if k.name == "cublas_logits":
            key = (k.meta["chunk_rows"], k.meta["open"])
            out[key] = out.get(key, 0) + k.repeats
    return out


@pytest.mark.parametrize("ew", [True, False])
def test_plan_chunks_are_runs_chunks(ew):
    """The plan visits the chunks ``chunk_plan`` gives for ``chunk_rows`` of the CUDA budget (bf16: 2 bytes a
    logit), closed and open alike, and follows CHUNK_BYTES when it changes."""
    N, D, V = sum(_MIXED), 4096, 128256
    C = LHL.chunk_rows(V, 2, "cuda")
    assert C == LHL.CHUNK_BYTES["cuda"] // (V * 2)
    expect = {}
    for p0, p1, o in LHL.chunk_plan(_starts(_MIXED), C, ew):
        expect[(p1 - p0, o)] = expect.get((p1 - p0, o), 0) + 1
    launches = LHL.plan(N, D, V, "bf16", lengths=_MIXED, entropy_weighting=ew)
    assert _plan_chunks(launches) == expect
    assert any(o for _, o in expect) == ew  # the mix has open responses only with entropy weighting
    n_open = sum(c for (_, o), c in expect.items() if o)
    assert sum(k.repeats for k in launches if k.name == "cublas_x") == n_open
    rows_fwd = [k for k in launches if k.name == "entropy_logprob_fwd_kernel"]
    assert sum(k.meta["chunk_rows"] * k.repeats for k in rows_fwd) == N


def test_plan_follows_the_chunk_budget(monkeypatch):
    monkeypatch.setattr(LHL, "CHUNK_BYTES", {"cpu": 1 << 20, "cuda": 1000 * 50 * 2})
    got = _plan_chunks(LHL.plan(2500, 64, 50, "bf16", lengths=[2500], entropy_weighting=False))
    assert got == {(1000, False): 2, (500, False): 1}


def test_plan_flops_are_six_ndv_and_x_memory():
    """3 GEMMs of 2 C D V per chunk: 6 N D V exactly (every other entry streams); a KL term adds the open
    chunks' unweighted dW GEMM. Open responses hold the fp32 X [V, D] on top (live_bytes)."""
    from hero_kernels.backends.plan import peak_extra_bytes

    N, D, V = sum(_MIXED), 4096, 128256
    launches = LHL.plan(N, D, V, "bf16", lengths=_MIXED)
    assert sum(k.flops * k.repeats for k in launches) == 6 * N * D * V
    assert all(k.flops == 0 for k in launches if k.kind == "stream")
    open_rows = sum(k.meta["chunk_rows"] * k.repeats for k in launches if k.name == "cublas_x")
    kl = LHL.plan(N, D, V, "bf16", lengths=_MIXED, kl=True)
    assert sum(k.flops * k.repeats for k in kl) == 6 * N * D * V + 2 * open_rows * D * V
    closed = LHL.plan(N, D, V, "bf16", lengths=[1024] * (N // 1024) + [N % 1024])
    assert peak_extra_bytes(launches) - peak_extra_bytes(closed) == 4 * V * D
    assert sum(k.flops * k.repeats for k in LHL.plan(N, D, V, "bf16", lengths=_MIXED, pass_="bwd")) == 0
    with pytest.raises(ValueError, match="lengths must sum"):
        LHL.plan(N + 1, D, V, "bf16", lengths=_MIXED)


def test_run_visits_the_chunks_of_chunks_for(small_chunks, monkeypatch):
    """``run`` takes its chunks from ``chunks_for`` (the function ``plan`` calls) and visits exactly them."""
    h, W, b, y, old, _ = _problem()
    seen, made = [], []
    orig_for, orig_chunk = LHL.chunks_for, LHL._Run.chunk

    def chunks_for(*a, **k):
        made.append(orig_for(*a, **k)[1])
        return orig_for(*a, **k)

    def chunk(self, p0, p1, is_open):
        seen.append((p0, p1, is_open))
        return orig_chunk(self, p0, p1, is_open)

    monkeypatch.setattr(LHL, "chunks_for", chunks_for)
    monkeypatch.setattr(LHL._Run, "chunk", chunk)
    hk.hero_loss(h, y, torch.randn(B), weight=W.clone().requires_grad_(True), old_logp=old, impl="cpu")
    assert made and seen == made[0] and any(o for *_, o in seen)
