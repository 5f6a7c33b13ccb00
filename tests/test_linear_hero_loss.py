"""hero_loss's 3-GEMM path (hero_kernels.linear_hero_loss) against the 4-GEMM op path and the float64 reference.

Small shapes with a tiny chunk budget, so responses span several chunks ("open" responses: the unscaled X
accumulator and the deferred dh rows), chunk boundaries fall inside and between responses, and the packed
layouts reorder rows. CPU C++ and torch backends; the Triton row kernels (what impl="auto" runs on CUDA) in
the interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU).
"""
import importlib.util
import math
import os

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


# ---- impl "triton": the Triton row kernels in the chunk loop (interpreter on CPU tensors without a GPU) ----
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TDEV = "cuda" if torch.cuda.is_available() and not _INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None or (_TDEV == "cpu" and not _INTERPRET),
                                  reason="triton missing, or no GPU and TRITON_INTERPRET unset")
# (kl terms, weight_on, per-token advantages, entropy weighting, loss_agg)
_TRITON_COMBOS = [("old+ref", "negative", False, True, "seq-mean-token-mean"), ("old", "all", True, True, "token-mean"),
                  ("none", "all", False, False, "seq-mean-token-sum-norm")]


def _triton_kw(i, kl, weight_on, per_token_A, weighting, loss_agg, old, ref):
    g = torch.Generator().manual_seed(10 + i)
    A = torch.randn((B, T) if per_token_A else (B,), generator=g).to(_TDEV)
    kw = dict(loss_agg=loss_agg, weight_on=weight_on, entropy_weighting=weighting, kappa=0.7, temperature=0.9)
    if kl != "none":
        kw["old_logp"] = old.to(_TDEV)
    if kl == "old+ref":
        kw.update(ref_logp=ref.to(_TDEV), beta=0.05)
    return A, kw


@needs_triton
def test_triton_rows_match_four_gemm_path(small_chunks, monkeypatch):
    """fp32, odd V, masked tokens, bias, temperature, responses over several chunks (open responses): the
    3-GEMM path with the Triton row kernels equals the 4-GEMM op path (the Triton fused head), and that op
    never runs on the 3-GEMM side (it raises there)."""
    from hero_kernels import loss as L

    h, W, b, y, old, ref = (t.to(_TDEV) for t in _problem())
    op = L.linear_entropy_logprob

    def refuse(*a, **k):
        raise AssertionError("the 4-GEMM op ran on the 3-GEMM path")

    for i, combo in enumerate(_TRITON_COMBOS):
        A, kw = _triton_kw(i, *combo, old, ref)
        monkeypatch.setattr(L, "linear_entropy_logprob", refuse)
        three = _call(True, h, W, b, y, A, "triton", **kw)
        monkeypatch.setattr(L, "linear_entropy_logprob", op)
        four = _call(False, h, W, b, y, A, "triton", **kw)
        _assert_same(three, four, rtol=5e-5)


@needs_triton
def test_triton_rows_bfloat16_within_twice_eager(small_chunks, monkeypatch):
    """bf16: the chunk's dlogits are written over its bf16 logits (in place, as for impl "cuda"), and loss
    and gradients stay within 2x eager bf16 PyTorch's error (logits GEMM in bf16, then hero_loss on them)
    against the float64 reference. (The interpreter truncates fp32 -> bf16 where a GPU rounds.)"""
    from hero_kernels.backends.triton import entropy_logprob as TR

    h, W, b, y, old, ref = _problem()
    inplace = []
    orig = TR.backward

    def spy(logits, *a, out=None, **k):
        inplace.append(out is not None and out.data_ptr() == logits.data_ptr() and out.dtype == torch.bfloat16)
        return orig(logits, *a, out=out, **k)

    monkeypatch.setattr(TR, "backward", spy)
    for i, combo in enumerate(_TRITON_COMBOS[:2]):
        A, kw = _triton_kw(i, *combo, old, ref)
        leaves = [t.double().requires_grad_(True) for t in (h, W, b)]
        rkw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        rloss, _ = R.hero_loss(leaves[0], y, A.cpu(), weight=leaves[1], bias=leaves[2], **rkw)
        (rloss * 1.7).backward()
        exact = [rloss.detach()] + [t.grad for t in leaves]
        hb, Wb, bb = (t.to(_TDEV, torch.bfloat16) for t in (h, W, b))
        loss, _, grads = _call(True, hb, Wb, bb, y.to(_TDEV), A, "triton", **kw)
        e_leaves = [t.clone().requires_grad_(True) for t in (hb, Wb, bb)]
        z = torch.addmm(e_leaves[2], e_leaves[0].reshape(-1, D), e_leaves[1].t()).view(B, T, V)
        eloss, _ = hk.hero_loss(z, y.to(_TDEV), A, impl="torch", **kw)
        (eloss * 1.7).backward()
        for ours, eager, ex in zip([loss] + list(grads), [eloss.detach()] + [t.grad for t in e_leaves], exact):
            assert ours.dtype == eager.dtype
            err_ours = (ours.double().cpu() - ex).abs().max()
            err_eager = (eager.double().cpu() - ex).abs().max()
            assert err_ours <= 2 * err_eager + 1e-6 * ex.abs().max(), (i, float(err_ours), float(err_eager))
    assert inplace and all(inplace)


@needs_triton
def test_auto_on_cuda_takes_the_three_gemm_path(monkeypatch):
    """impl="auto" resolves to "triton" on a CUDA device: applies() takes the 3-GEMM path for it; its row
    kernels are Triton's unless the plan (``fastest_linear_impl(op="linear_hero_loss")``) models the CUDA
    ones faster and the extension loads (simulated devices: pure Python)."""
    from types import SimpleNamespace

    from hero_kernels import dispatch
    from hero_kernels.backends import plan as P

    Wl = torch.randn(V, D, requires_grad=True)
    monkeypatch.setattr(LHL, "resolve_impl", lambda impl, *a: "triton" if impl == "auto" else impl)
    assert LHL.applies(torch.randn(5, D), Wl, None, "auto", False)
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        best, t = P.fastest_linear_impl(16384, 4096, 128256, "bf16", P.gpu_spec(name, 132, 90), op="linear_hero_loss")
        assert set(t) == {"triton", "cuda"} and best == ("cuda" if t["cuda"] < t["triton"] else "triton")
        # auto wants a clear modeled gain before it builds the CUDA extension (AUTO_CUDA_MARGIN)
        best = "cuda" if t["cuda"] < (1 - dispatch.AUTO_CUDA_MARGIN) * t["triton"] else "triton"
        props = SimpleNamespace(name=name, multi_processor_count=132, major=9, minor=0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, props=props: props)
        dev = torch.device("cuda", 0)
        for ext_ok in (True, False):
            monkeypatch.setattr(dispatch, "_cpp_ok", lambda kind, ok=ext_ok: ok)
            dispatch._auto_linear_impl.cache_clear()
            got = dispatch.auto_linear_impl(16384, 4096, 128256, torch.bfloat16, dev, False, op="linear_hero_loss")
            assert got == (best if ext_ok else "triton")
    dispatch._auto_linear_impl.cache_clear()
    with pytest.raises(ValueError, match="op must be"):
        P.fastest_linear_impl(16, 8, 32, "bf16", P.GPU_SPECS["h100"], op="entropy_logprob")


@pytest.mark.gpu
def test_auto_on_a_gpu_runs_the_three_gemm_path():
    h, W, b, y, old, _ = (t.cuda() for t in _problem())
    A = torch.randn(B, device="cuda")
    three = _call(True, h, W, b, y, A, "auto", old_logp=old)
    four = _call(False, h, W, b, y, A, "torch", old_logp=old)
    _assert_same(three, four, rtol=1e-4)


def test_plan_prices_the_triton_row_kernels():
    """impl="triton": the same chunks and GEMMs, the Triton row backend's own launches (in place)."""
    N, D_, V_ = sum(_MIXED), 4096, 128256
    cu = LHL.plan(N, D_, V_, "bf16", lengths=_MIXED)
    tr = LHL.plan(N, D_, V_, "bf16", lengths=_MIXED, impl="triton")
    assert _plan_chunks(tr) == _plan_chunks(cu)
    assert sum(k.flops * k.repeats for k in tr) == 6 * N * D_ * V_
    rows = [k for k in tr if "entropy_logprob" in k.name]
    assert {k.name for k in rows} == {"_entropy_logprob_fwd_kernel", "_entropy_logprob_bwd_kernel"}
    assert all(k.meta["INPLACE"] == 1 for k in rows if "bwd" in k.name)
    assert sum(k.meta["chunk_rows"] * k.repeats for k in rows if "fwd" in k.name) == N
    with pytest.raises(ValueError, match="impl must be"):
        LHL.plan(N, D_, V_, "bf16", lengths=_MIXED, impl="cpu")


def test_upstream_scale_of_16bit_dh_is_applied_in_fp32():
    """dh is kept in the hidden dtype; the upstream scalar multiplies it in fp32 and the product is rounded
    once: cast to fp16, GradScaler's first scale 2**16 is inf (every dh was inf), cast to bf16 1/3 is off
    by 2e-3."""
    dh = torch.randn(7, 5)
    for dt, g in ((torch.float16, 65536.0), (torch.bfloat16, 1 / 3)):
        grads = LHL._Grads(dh.to(dt), None, None, torch.empty(3, 5, dtype=dt), None)
        got = grads.take(torch.tensor(g))[0]
        assert got.dtype == dt and torch.equal(got, (dh.to(dt).float() * g).to(dt))


def test_upstream_scale_rides_on_the_weight_cast():
    """The fp32 dW (and db) accumulators are scaled and cast in one pass: the result equals scaling in fp32
    and rounding once, for a plain backward (g = 1) and a GradScaler-sized g, in bf16 and fp16, and the fp32
    accumulators are left as they were (no in-place scale)."""
    dW, db = torch.randn(6, 5), torch.randn(6)
    for dt, g in ((torch.bfloat16, 1.0), (torch.bfloat16, 65536.0), (torch.float16, 1 / 3)):
        w, b = torch.empty(6, 5, dtype=dt), torch.empty(6, dtype=dt)
        acc_w, acc_b = dW.clone(), db.clone()
        _, got_w, got_b = LHL._Grads(None, acc_w, acc_b, w, b).take(torch.tensor(g))
        assert got_w.dtype == dt and torch.equal(got_w, (dW * g).to(dt))
        assert got_b.dtype == dt and torch.equal(got_b, (db * g).to(dt))
        assert torch.equal(acc_w, dW) and torch.equal(acc_b, db)


def test_accumulators_need_no_zero_fill(small_chunks, monkeypatch):
    """dW and the open responses' X are written by their first GEMM: garbage in the fresh buffers (here NaN,
    as torch.empty may return) never reaches the gradients, with open responses, a KL term and
    weight_on="negative" (the unweighted part's GEMM into dW)."""
    h, W, b, y, old, ref = _problem()
    A = torch.randn(B, generator=torch.Generator().manual_seed(3))
    kw = dict(old_logp=old, ref_logp=ref, beta=0.05, weight_on="negative", kappa=0.7)
    want = _call(False, h, W, b, y, A, "cpu", **kw)
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    _assert_same(_call(True, h, W, b, y, A, "cpu", **kw), want)


def test_float16_hidden_keeps_the_recomputing_op(monkeypatch):
    """fp16 dlogits must see the upstream gradient (a GradScaler's scale) before they are rounded: at an LM
    vocabulary p_j / tokens is below fp16's subnormals, so the 3-GEMM path (dlogits made in the forward,
    unscaled) is not taken for fp16 hidden states, on any backend."""
    h, W, b, y, old, _ = _problem()
    assert LHL.applies(h.bfloat16(), W.bfloat16().requires_grad_(True), None, "cpu", False)
    monkeypatch.setattr(LHL, "run", None)  # hero_loss must not call it
    for impl in ["cpu", "torch"] + (["triton"] if _TDEV == "cpu" and _INTERPRET else []):
        Wl = W.half().requires_grad_(True)
        assert not LHL.applies(h.half(), Wl, None, impl, False)
        loss, _ = hk.hero_loss(h.half(), y, torch.randn(B), weight=Wl, old_logp=old, impl=impl)
        (loss * 256.0).backward()
        assert torch.isfinite(Wl.grad).all()


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_16bit_first_dw_gemm_on_a_closed_chunk(impl, dtype=torch.bfloat16):
    """One chunk, every response closed: the first dW GEMM writes the fp32 dW from fp32 dlogits (a CPU
    backend's wide dz / the torch backend's fp32 math) and the 16-bit hidden rows (cast to one dtype)."""
    h, W, b, y, old, _ = _problem()
    A = torch.randn(B)
    exact = _call(True, h.double(), W.double(), b.double(), y, A, impl, old_logp=old)
    hb, Wb, bb = h.to(dtype), W.to(dtype), b.to(dtype)
    ours = _call(True, hb, Wb, bb, y, A, impl, old_logp=old)
    op = _call(False, hb, Wb, bb, y, A, impl, old_logp=old)
    for go, gp, ge in zip(ours[2], op[2], exact[2]):
        assert go.dtype == dtype
        err_ours, err_op = (go.double() - ge).abs().max(), (gp.double() - ge).abs().max()
        assert err_ours <= 2 * err_op + 1e-6 * ge.abs().max(), (float(err_ours), float(err_op))
