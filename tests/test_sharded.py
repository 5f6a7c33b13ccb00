"""Vocab-sharded (tensor-parallel) fused LM head: two shards (V = 500 + 503) against the unsharded float64
reference, simulated in one process (torch path and Triton path) and with two real gloo processes; dominant
labels (p_y -> 1) under a +1e3 logit offset over three shards against a float64 oracle written from the math."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from hero_kernels import reference as R  # noqa: E402
from hero_kernels.backends import RowStats, UpstreamGrads  # noqa: E402
from hero_kernels import sharded as S  # noqa: E402
from hero_kernels.options import RowOptions  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON or (DEVICE == "cpu" and not INTERPRET), reason="triton missing, or no GPU and no interpreter"))]

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

IGNORE = -100
N, D, V, SPLIT = 37, 96, 1003, 500


def _problem(dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen)
    W = torch.randn(V, D, generator=gen) / math.sqrt(D) * 3.0
    b = torch.randn(V, generator=gen) if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    y[:3] = torch.tensor([5, SPLIT + 7, V - 1])  # labels in both shards, incl. the last column
    y[[4, 20]] = IGNORE
    g, k = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    to = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return to(h), to(W), to(b), y.to(DEVICE), g.to(DEVICE), k.to(DEVICE)


def _shards(W, b):
    """[(weight shard, bias shard, vocab_start)] for V = 500 + 503."""
    cut = [(0, SPLIT), (SPLIT, V)]
    return [(W[a:e], None if b is None else b[a:e], a) for a, e in cut]


def _err(x, ref):
    return (x.double().cpu() - ref.double().cpu()).abs().max().item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_two_shards_match_unsharded(impl, bias):
    h, W, b, y, g, k = _problem(bias=bias)
    opts = RowOptions(temperature=0.8, ignore_index=IGNORE)
    parts = [S.shard_partials(h, Ws, y, start, bs, opts, impl=impl) for Ws, bs, start in _shards(W, b)]
    valid = (y != IGNORE).cpu()

    # Each shard's partials are those of its own columns (label_x: x[label] or 0), from the definition.
    for (Ws, bs, start), p in zip(_shards(W, b), parts):
        x = R.linear_logits(h, Ws, bs, torch.float64) / 0.8
        ref = _partials_from_definition(x.cpu(), y.cpu() - start)
        for got, r in zip(p, ref):
            assert _err(got[valid], r[valid]) < 1e-4 * (1 + r.abs().max().item())
        assert torch.isinf(p.m.cpu()[~valid]).all() and not p.s.cpu()[~valid].any()

    merged = S.merge_stacked_partials(S.stack_partials(parts))
    logp, H, lse = S.finalize(merged, y, opts)
    ref_vals = R.linear_entropy_logprob(h, W, y, b, 0.8, IGNORE)
    for got, ref, dt in zip((logp, H, lse), ref_vals, (torch.float32, torch.float32, torch.float64)):
        assert got.dtype == dt  # lse float64: the backward splits it into fp32 hi + lo
        assert _err(got, ref) < 2e-5 * (1 + ref.abs().max().item())
    assert not logp.cpu()[~valid].any() and not H.cpu()[~valid].any()

    # Backward per shard with the GLOBAL lse / H: shard grads concatenate, grad_hidden shares sum.
    outs = [S.shard_backward(h, Ws, y, start, RowStats(logp, H, lse), UpstreamGrads(g, k), bs, opts, impl=impl)
            for Ws, bs, start in _shards(W, b)]
    dh = sum(o[0] for o in outs)
    dW = torch.cat([o[1] for o in outs])
    ref_dh, ref_dW, ref_db = R.linear_entropy_logprob_backward(h, W, y, g, k, b, 0.8, IGNORE)
    assert outs[0][0].dtype == torch.float32 and dW.dtype == W.dtype
    assert _err(dh, ref_dh) < 2e-5 * (1 + ref_dh.abs().max().item())
    assert _err(dW, ref_dW) < 2e-5 * (1 + ref_dW.abs().max().item())
    if bias:
        db = torch.cat([o[2] for o in outs])
        assert _err(db, ref_db) < 2e-5 * (1 + ref_db.abs().max().item())
    else:
        assert all(o[2] is None for o in outs)


def _partials_from_definition(x, loc):
    """(m, s, so, t, label_x) of float64 rows x [N, V_local] straight from their definitions; loc = label - start."""
    V_local = x.shape[1]
    m = x.max(1).values
    e = torch.exp(x - m[:, None])
    inside = (loc >= 0) & (loc < V_local)
    is_label = torch.zeros_like(e, dtype=torch.bool)
    is_label[inside, loc[inside]] = True
    t = ((x - m[:, None]) * e).sum(1)
    label_x = torch.where(inside, x.gather(1, loc.clamp(0, V_local - 1)[:, None])[:, 0], torch.zeros_like(m))
    return m, e.sum(1), (e * ~is_label).sum(1), t, label_x


def _same_dtype_torch(h, W, b, y, g, k, tau):
    """Eager PyTorch in the input dtype (matmul in h.dtype, softmax math in fp32, autograd) for the
    "<= 2x same-dtype PyTorch error" rule."""
    h_, W_ = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    b_ = None if b is None else b.detach().clone().requires_grad_()
    logp, H, lse = R.entropy_logprob(R.linear_logits(h_, W_, b_, h.dtype), y, tau, IGNORE, dtype=torch.float32)
    (logp * g + H * k).sum().backward()
    return (logp.detach(), H.detach(), lse.detach()), (h_.grad, W_.grad, None if b is None else b_.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_shards_bf16(impl):
    """bf16 weights: error vs float64 within 2x the same-dtype eager PyTorch error (+ a small floor)."""
    h, W, b, y, g, k = _problem(torch.bfloat16)
    opts = RowOptions(temperature=1.2)
    parts = [S.shard_partials(h, Ws, y, start, bs, opts, impl=impl) for Ws, bs, start in _shards(W, b)]
    logp, H, lse = S.finalize(S.merge_stacked_partials(S.stack_partials(parts)), y, opts)
    outs = [S.shard_backward(h, Ws, y, start, RowStats(logp, H, lse), UpstreamGrads(g, k), bs, opts, impl=impl)
            for Ws, bs, start in _shards(W, b)]
    dh = sum(o[0] for o in outs).to(torch.bfloat16)
    dW = torch.cat([o[1] for o in outs])
    db = torch.cat([o[2] for o in outs])
    assert dW.dtype == torch.bfloat16 and db.dtype == torch.bfloat16
    ref_vals = R.linear_entropy_logprob(h, W, y, b, 1.2)
    ref_grads = R.linear_entropy_logprob_backward(h, W, y, g, k, b, 1.2)
    base_vals, base_grads = _same_dtype_torch(h, W, b, y, g, k, 1.2)
    for got, ref, base in zip((logp, H, lse, dh, dW, db), ref_vals + ref_grads, base_vals + base_grads):
        assert _err(got, ref) <= 2 * _err(base, ref) + 2e-6 * (1 + ref.abs().max().item())


def test_merge_order_and_empty_shards():
    """Merging the partials of three column ranges (+ an empty, all -inf shard, which is neutral) gives the
    partials of the whole row, and finalize gives its log-sum-exp, entropy and label log-prob."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 40, generator=gen, dtype=torch.float64) * 3
    y = torch.tensor([0, 12, 39, 24, 25])
    cuts = [(0, 10), (10, 25), (25, 40)]
    parts = [S.Partials(*_partials_from_definition(x[:, a:e], y - a)) for a, e in cuts]
    zero = torch.zeros(5, dtype=torch.float64)
    empty = S.Partials(torch.full((5,), float("-inf"), dtype=torch.float64), zero, zero, zero, zero)
    merged = S.merge_stacked_partials(S.stack_partials(parts + [empty]))
    for got, ref in zip(merged, _partials_from_definition(x, y)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    logp, H, lse = S.finalize(merged, y)
    ref_lse = torch.logsumexp(x, 1)
    p = torch.softmax(x, 1)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(H, -(p * torch.log(p)).sum(1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logp, x.gather(1, y[:, None])[:, 0] - ref_lse, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# p(label) -> 1 under a large common logit offset, three shards, against a float64 oracle from the math
# ----------------------------------------------------------------------------------------------
def _offset_problem(dominant=True, offset=1e3, seed=3):
    """All logits shifted by ``offset``; V = 301 (shards 100 + 100 + 101), distinct labels, D = 16. dominant:
    each row's label leads the other logits by a margin (1 - p_y from ~1e-3 down to ~1e-15); else the logits
    spread over a few units (H ~ log V) and the labels are arbitrary."""
    gen = torch.Generator().manual_seed(seed)
    Nd, Dd, Vd = 6, 16, 301
    h = torch.randn(Nd, Dd, generator=gen) * 0.3
    h[:, :Nd] = torch.eye(Nd)  # row i points along axis i (only) ...
    W = torch.randn(Vd, Dd, generator=gen) / math.sqrt(Dd)
    y = torch.tensor([3, 150, 299, 77, 201, 120])
    margins = torch.tensor([12.0, 20.0, 40.0, 30.0, 16.0, 25.0]) if dominant else torch.zeros(Nd)
    W[y, torch.arange(Nd)] += margins  # ... and its label's weight row along it: a lead of ~margin
    b = offset + torch.randn(Vd, generator=gen) * (0.5 if dominant else 2.0)
    g, k = torch.randn(Nd, generator=gen), torch.randn(Nd, generator=gen)
    return h, W, b, y, g, k


def _oracle(h, W, b, y, g, k, tau):
    """float64 (logp, H, dz at the label column) from the definitions, in forms that stay accurate as p_y -> 1:
    log p_j = (x_j - m) - log1p(sum_{j != argmax} e^{x_j - m}), H = -sum_j p_j log p_j (positive terms), and
    1 - p_y = sum_{j != y} p_j."""
    x = (h.double() @ W.double().t() + b.double()) / tau
    m, a = x.max(1)
    e = torch.exp(x - m[:, None])
    e_other = e.scatter(1, a[:, None], 0.0)
    logq = (x - m[:, None]) - torch.log1p(e_other.sum(1))[:, None]
    p = torch.exp(logq)
    H = -(p * logq).sum(1)
    logp = logq.gather(1, y[:, None])[:, 0]
    one_minus_py = p.scatter(1, y[:, None], 0.0).sum(1)
    dz_y = (g.double() * one_minus_py - k.double() * torch.exp(logp) * (logp + H)) / tau
    return logp, H, dz_y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dominant", [True, False], ids=["p_y->1", "spread"])
def test_offset_three_shards_match_unsharded_accuracy(impl, dominant):
    """+1e3 on every logit, three shards: logp, H and the label column's gradient keep their relative accuracy
    (also as p_y -> 1); errors within ~2x the unsharded fused op's (same impl) against the oracle."""
    import hero_kernels as hk

    tau = 0.9
    h, W, b, y, g, k = (t.to(DEVICE) for t in _offset_problem(dominant))
    ref_logp, ref_H, ref_dz = _oracle(h.cpu(), W.cpu(), b.cpu(), y.cpu(), g.cpu(), k.cpu(), tau)
    if dominant:
        assert ref_logp.abs().min() < 1e-14 and ref_H.min() < 1e-12  # the regime under test
    opts = RowOptions(temperature=tau)
    cuts = [(0, 100), (100, 200), (200, 301)]
    parts = [S.shard_partials(h, W[a:e], y, a, b[a:e], opts, impl=impl) for a, e in cuts]
    logp, H, lse = S.finalize(S.merge_stacked_partials(S.stack_partials(parts)), y, opts)
    bb = b.clone().requires_grad_(True)  # the unsharded op, same backend: its error is the yardstick
    u_logp, u_H = hk.linear_entropy_logprob(h, W, y, bias=bb, temperature=tau, impl=impl)
    # The label column's gradient dz_y of row i is the bias gradient at y_i when only row i has upstream
    # gradients (any other row's dz there is ~e^-12 g, far above a dz_y of ~1e-15 g: one row at a time).
    dz_y, u_dz_y = torch.zeros(len(y), dtype=torch.float64), torch.zeros(len(y), dtype=torch.float64)
    for i in range(len(y)):
        gi, ki = (torch.zeros_like(g).index_fill_(0, torch.tensor([i], device=g.device), 1.0) * v for v in (g, k))
        db = torch.cat([S.shard_backward(h, W[a:e], y, a, RowStats(logp, H, lse), UpstreamGrads(gi, ki), b[a:e], opts,
                                         impl=impl)[2] for a, e in cuts])
        dz_y[i] = db[y[i]].double()
        (gb,) = torch.autograd.grad((u_logp * gi + u_H * ki).sum(), bb, retain_graph=True)
        u_dz_y[i] = gb[y[i]].double()

    def rel(x, ref):
        return ((x.double().cpu() - ref) / ref.abs()).abs().max().item()

    for got, unsharded, ref in ((logp, u_logp, ref_logp), (H, u_H, ref_H), (dz_y, u_dz_y, ref_dz)):
        err, yard = rel(got, ref), rel(unsharded, ref)
        assert err <= 2 * yard + 1e-5, (err, yard)
    for got, ref in ((logp, ref_logp), (H, ref_H), (dz_y, ref_dz)):
        assert rel(got, ref) < 1e-3  # relative accuracy, not just absolute


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cuts", [[(0, 150), (150, 301)], [(0, 100), (100, 200), (200, 301)]], ids=["2sh", "3sh"])
def test_shard_backward_at_large_offset_has_no_lse_rounding(impl, cuts):
    """+3e3 bias, values on a grid that makes every logit exact in fp32 (h in 1/4, W in 1/8, b in 1/32 steps):
    the only error left is how the backward forms p. An fp32 lse (M + log s rounded) puts up to ulp(lse)/2 =
    1.2e-4 of relative error on every p; finalize's lse is float64 and the backward splits it into fp32 hi + lo.
    dh / dW / db within ~2x the unsharded fused op's (same impl) against a float64 oracle from the math."""
    import hero_kernels as hk

    from test_numerics_contract import exact_offset_head

    h, W, b, y, g, k, z = exact_offset_head()  # V = 301, logits exact in fp32 at +3e3
    logq = torch.log_softmax(z, -1)  # float64 oracle: dz = g (1[j=y] - p) - k p (log p + H)
    p = logq.exp()
    H = -(p * logq).sum(-1)
    dz = g[:, None] * (torch.zeros_like(p).scatter_(1, y[:, None], 1.0) - p) - k[:, None] * p * (logq + H[:, None])
    g, k = g.float(), k.float()
    refs = (dz @ W.double(), dz.t() @ h.double(), dz.sum(0))

    hd, Wd, bd, yd, gd, kd = (t.to(DEVICE) for t in (h, W, b, y, g, k))
    parts = [S.shard_partials(hd, Wd[a:e], yd, a, bd[a:e], impl=impl) for a, e in cuts]
    saved = S.finalize(S.merge_stacked_partials(S.stack_partials(parts)), yd)
    assert saved.lse.dtype == torch.float64
    outs = [S.shard_backward(hd, Wd[a:e], yd, a, saved, UpstreamGrads(gd, kd), bd[a:e], impl=impl) for a, e in cuts]
    got = (sum(o[0] for o in outs), torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs]))
    leaves = [t.clone().requires_grad_(True) for t in (hd, Wd, bd)]  # the unsharded op: the yardstick
    u_logp, u_H = hk.linear_entropy_logprob(leaves[0], leaves[1], yd, bias=leaves[2], impl=impl)
    yard = torch.autograd.grad((u_logp * gd + u_H * kd).sum(), leaves)
    for name, x, u, ref in zip(("dh", "dW", "db"), got, yard, refs):
        err, base = _err(x, ref), _err(u, ref)
        assert err <= 2 * base + 1e-7, (name, err, base)


@pytest.mark.skipif(not HAVE_TRITON or (DEVICE == "cpu" and not INTERPRET), reason="triton missing")
@pytest.mark.parametrize("design", ["fused", "chunked"])
def test_triton_shard_backward_each_design(design, monkeypatch):
    """The Triton shard backward in each design (the chunked one: the shard is a slice of the global vocabulary,
    so labels outside it take the slice-label path, inside it the forward's logp): the two-shard problem and the
    exact large-offset one, as above."""
    from hero_kernels.backends.triton.linear import launch

    monkeypatch.setenv(launch.BACKWARD_ENV, design)
    test_two_shards_match_unsharded("triton", True)
    test_shard_backward_at_large_offset_has_no_lse_rounding("triton", [(0, 100), (100, 200), (200, 301)])


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_label_gives_finite_gradients(impl):
    """A label on a -inf (masked) column: logp = -inf, p_y = 0, and every gradient stays finite (the label
    column's entropy term is 0, never 0 * (-inf)). Oracle: the float64 softmax of the math, masked column p = 0."""
    gen = torch.Generator().manual_seed(3)
    W, h, b = torch.randn(64, 16, generator=gen), torch.randn(3, 16, generator=gen), torch.randn(64, generator=gen)
    b[5] = float("-inf")
    y = torch.tensor([5, 40, 50])
    g, k = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    z = (h.double() @ W.double().t() + b.double())
    logq = torch.log_softmax(z, -1)
    p = logq.exp()
    H = -torch.where(p > 0, p * logq, torch.zeros_like(p)).sum(-1)
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    dz = g.double()[:, None] * (onehot - p) - k.double()[:, None] * torch.where(p > 0, p * (logq + H[:, None]), 0.0)
    to = lambda x: x.to(DEVICE)  # noqa: E731
    cuts = [(0, 32), (32, 64)]
    parts = [S.shard_partials(to(h), to(W[a:e]), to(y), a, to(b[a:e]), impl=impl) for a, e in cuts]
    logp, Hs, lse = S.finalize(S.merge_stacked_partials(S.stack_partials(parts)), to(y))
    assert logp[0].item() == float("-inf")
    dh, dW, db = torch.zeros(3, 16, dtype=torch.float64), [], []
    for a, e in cuts:
        gh, gw, gb = S.shard_backward(to(h), to(W[a:e]), to(y), a, RowStats(logp, Hs, lse), UpstreamGrads(to(g), to(k)),
                                      to(b[a:e]), impl=impl)
        dh += gh.double().cpu()
        dW.append(gw)
        db.append(gb)
    dW, db = torch.cat(dW).double().cpu(), torch.cat(db).double().cpu()
    for got, ref in ((dh, dz @ W.double()), (dW, dz.t() @ h.double()), (db, dz.sum(0))):
        assert torch.isfinite(got).all()
        assert _err(got, ref) < 1e-4


def test_bad_arguments():
    h, W, b, y, g, k = _problem()
    with pytest.raises(ValueError, match="vocab_start"):
        S.shard_partials(h, W, y, -1, b)
    with pytest.raises(ValueError, match="impl"):
        S.shard_partials(h, W, y, 0, b, impl="cuda")
    with pytest.raises(ValueError, match="bias"):
        S.shard_partials(h, W, y, 0, b[:3])
    # Without a process group the collective helpers are no-ops.
    p = S.shard_partials(h, W, y, 0, b)
    assert S.all_reduce_partials(p) is p


# ----------------------------------------------------------------------------------------------
# two real processes (gloo): one collective merges the partials
# ----------------------------------------------------------------------------------------------
def _gloo_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h, W, b, y, g, k = (None if x is None else x.cpu() for x in _problem())
        Ws, bs, start = _shards(W, b)[rank]
        opts = RowOptions(temperature=0.8)
        saved = S.sharded_linear_entropy_logprob(h, Ws, y, start, bs, opts, impl="torch")
        dh, dW, db = S.shard_backward(h, Ws, y, start, saved, UpstreamGrads(g, k), bs, opts, impl="torch")
        S.all_reduce_grad_hidden(dh)
        torch.save({"vals": tuple(saved), "dh": dh, "dW": dW, "db": db}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_two_processes(tmp_path):
    """Two spawned processes (~10-25 s on 2 busy cores, mostly importing torch twice)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    h, W, b, y, g, k = (None if x is None else x.cpu() for x in _problem())
    ref_vals = R.linear_entropy_logprob(h, W, y, b, 0.8)
    for a, c, ref in zip(r0["vals"], r1["vals"], ref_vals):
        assert torch.equal(a, c)  # every rank merges the same gathered tensor in the same order
        assert _err(a, ref) < 2e-5 * (1 + ref.abs().max().item())
    ref_dh, ref_dW, ref_db = R.linear_entropy_logprob_backward(h, W, y, g, k, b, 0.8)
    assert torch.equal(r0["dh"], r1["dh"])
    assert _err(r0["dh"], ref_dh) < 2e-5 * (1 + ref_dh.abs().max().item())
    assert _err(torch.cat([r0["dW"], r1["dW"]]), ref_dW) < 2e-5 * (1 + ref_dW.abs().max().item())
    assert _err(torch.cat([r0["db"], r1["db"]]), ref_db) < 2e-5 * (1 + ref_db.abs().max().item())
