"""Fused LM head backends (Triton, chunked torch) against the float64 reference (hero_kernels/reference.py).

Without a GPU the Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1, set by
tests/conftest.py and, defensively, here before triton is imported).

Acceptance rule (developers' guide): error vs float64 <= 2 x the error of the same-dtype PyTorch
computation + a small floor. The same-dtype PyTorch computation is autograd through the reference
functions with the matmul in the input dtype and the softmax math in fp32, i.e. eager
``(hidden @ W.T).float()`` then log_softmax / entropy / gather. Gradients use random upstream gradients
on both logp and H.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402

from hero_kernels import reference as R  # noqa: E402
from hero_kernels.backends import RowStats, UpstreamGrads  # noqa: E402
from hero_kernels.backends.torch import linear_entropy_logprob as TB  # noqa: E402
from hero_kernels.options import RowOptions  # noqa: E402
from gpu_compile_support import compile_env, require_compiler, run_json_script, sparse_rows  # noqa: E402

try:
    from hero_kernels.backends.triton import linear_entropy_logprob as K
except ImportError:  # triton not installed: only the torch path is tested
    K = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(K is None or (DEVICE == "cpu" and not INTERPRET),
                                  reason="triton missing, or no GPU and TRITON_INTERPRET unset")

# Discarded branches (log 0 on padded lanes) can raise numpy warnings in the interpreter.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

IGNORE = -100


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _problem(N, D, V, dtype, bias=True, n_masked=3, seed=0, confident_row=True):
    """Random LM-head problem. One row is made very confident (p(label) -> 1) to catch the low-precision
    cancellation in 1 - p; a few rows are masked."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen)
    W = torch.randn(V, D, generator=gen) / math.sqrt(D) * 3.0
    b = torch.randn(V, generator=gen) if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    if n_masked:
        y[torch.randperm(N, generator=gen)[:n_masked]] = IGNORE
    if confident_row and N > 1:
        r = int(torch.nonzero(y != IGNORE)[0])
        h[r] = W[y[r]] * 4.0  # logit of the label far above the rest
    g = torch.randn(N, generator=gen)
    k = torch.randn(N, generator=gen)
    to = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return to(h), to(W), to(b), y.to(DEVICE), g.to(DEVICE), k.to(DEVICE)


def _reference(h, W, b, y, g, k, tau, ig=IGNORE):
    vals = R.linear_entropy_logprob(h, W, y, b, tau, ig)
    grads = R.linear_entropy_logprob_backward(h, W, y, g, k, b, tau, ig)
    return vals, grads


def _same_dtype_torch(h, W, b, y, g, k, tau, ig=IGNORE):
    """Eager PyTorch in the input dtype: matmul in h.dtype, softmax math in fp32, autograd backward."""
    h_ = h.detach().clone().requires_grad_()
    W_ = W.detach().clone().requires_grad_()
    b_ = None if b is None else b.detach().clone().requires_grad_()
    z = R.linear_logits(h_, W_, b_, h.dtype)
    logp, H, lse = R.entropy_logprob(z, y, tau, ig, dtype=torch.float32)
    (logp * g + H * k).sum().backward()
    return (logp.detach(), H.detach(), lse.detach()), (h_.grad, W_.grad, None if b is None else b_.grad)


def _err(x, ref):
    return (x.double().cpu() - ref.double().cpu()).abs().max().item()


def _check(name, got, ref, base, floor):
    e, eb = _err(got, ref), _err(base, ref)
    scale = ref.abs().max().item()
    assert e <= 2.0 * eb + floor * max(scale, 1.0), f"{name}: error {e:.3e} vs same-dtype torch {eb:.3e}"


def _check_all(fwd, bwd, h, W, b, y, g, k, tau, ig=IGNORE):
    vals_ref, grads_ref = _reference(h, W, b, y, g, k, tau, ig)
    vals_base, grads_base = _same_dtype_torch(h, W, b, y, g, k, tau, ig)
    logp, H, lse = fwd
    for name, got, ref, base in zip(("logp", "H", "lse"), (logp, H, lse), vals_ref, vals_base):
        assert got.dtype == (torch.float64 if name == "lse" else torch.float32) and got.shape == ref.shape
        _check(name, got, ref, base, 2e-6)
    valid = (y != ig).cpu()
    # Invariants on valid rows; masked rows are exactly 0.
    V = W.shape[0]
    assert (H.cpu()[valid] >= -1e-5).all() and (H.cpu()[valid] <= math.log(V) + 1e-4).all()
    assert (logp.cpu()[valid] <= 1e-5).all()
    for x in (logp, H, lse):
        assert (x.cpu()[~valid] == 0).all()
    dh, dW, db = bwd
    assert dh.dtype == h.dtype and dW.dtype == W.dtype and dh.shape == h.shape and dW.shape == W.shape
    assert (db is None) == (b is None)
    for name, got, ref, base in zip(("grad_hidden", "grad_weight", "grad_bias"), bwd, grads_ref, grads_base):
        if ref is None:
            continue
        _check(name, got, ref, base, 2e-6)
    assert (dh.cpu()[~valid] == 0).all()


# Small tiles and chunks: several row blocks, vocab tiles, K steps, D chunks and backward chunks (with a
# tail) even at N=37, D=96, V=1003.
def _small_config(dtype, **kw):
    small = dict(fwd=K.Tile(16, 64, 32), atomic=K.Tile(16, 64, 32, 32), chunk_rows=8)
    return replace(K.default_config(dtype), **dict(small, **kw))


@pytest.fixture
def model_picks(monkeypatch):
    """No HERO_KERNELS_LINEAR_FORWARD / _BACKWARD from the caller's environment: for the tests of what the plan
    itself picks and launches (the others may run under a forced design, e.g. to cover the chunked one)."""
    for name in ("HERO_KERNELS_LINEAR_FORWARD", "HERO_KERNELS_LINEAR_BACKWARD"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize(
    "dtype,bias,tau,small",
    [
        (torch.float32, True, 0.7, True),
        (torch.float32, False, 1.0, False),
        (torch.bfloat16, True, 1.3, False),
        (torch.bfloat16, False, 0.7, True),
    ],
)
def test_triton_matches_reference(dtype, bias, tau, small):
    """N=37, D=96, V=1003: V and D are multiples of no block, masked rows, temperature != 1.
    ``small`` uses 16x64 tiles with 3 vocab splits in the forward and backward chunks of 8 rows."""
    h, W, b, y, g, k = _problem(37, 96, 1003, dtype, bias=bias)
    cfg = _small_config(dtype, vocab_splits=3) if small else None
    opts = RowOptions(temperature=tau, ignore_index=IGNORE)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    bwd = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    _check_all((logp, H, lse), bwd, h, W, b, y, g, k, tau)


@needs_triton
def test_triton_sm90_config_matches_reference():
    """sm_90's default config (dz tile 128 x 256) runs correctly: N=37 rows in backward chunks of 16 (a
    tail), V=1003 (a masked last vocab tile), bias. On CPU the launchers pick sm_80's; force sm_90's."""
    cfg = replace(K.default_config(torch.bfloat16, 90), chunk_rows=16)
    assert cfg.dz_tile != K.default_config(torch.bfloat16, 80).dz_tile
    h, W, b, y, g, k = _problem(37, 96, 1003, torch.bfloat16, bias=True)
    opts = RowOptions(temperature=0.8, ignore_index=IGNORE)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    bwd = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    _check_all((logp, H, lse), bwd, h, W, b, y, g, k, 0.8)


@needs_triton
def test_default_config_per_arch():
    """The plan models the arch's own config: sm_90 (the default target, H100 / H200) its 128 x 256 forward
    and dz tiles, sm_80 and the CPU interpreter (arch None) 128 x 128; fp32 the same everywhere."""
    bf = torch.bfloat16
    assert K.default_config(bf, None) == K.default_config(bf, 80) == K.default_config(bf, 86)
    assert K.default_config(bf, 90).dz_tile.block_v == 256 and K.default_config(bf, 80).dz_tile.block_v == 128
    assert K.default_config(bf, 90).fwd.block_v == 256 and K.default_config(bf, 80).fwd.block_v == 128
    assert K.default_config(torch.float32, 90) == K.default_config(torch.float32, 80)
    assert K.device_arch(torch.device("cpu")) is None

    def dz(**kw):
        return next(x for x in K.plan(4096, 512, 5000, bf, pass_="bwd", **kw) if x.name == "_bwd_dz_kernel")

    assert dz().meta["BLOCK_V"] == dz(arch=90).meta["BLOCK_V"] == 256
    assert dz(arch=80).meta["BLOCK_V"] == 128 and dz(config=K.default_config(bf, 80)).meta["BLOCK_V"] == 128
    assert dz(arch=90).l2_bytes < dz(arch=80).l2_bytes


@needs_triton
def test_triton_fp16_odd_hidden_size_strided_input():
    """D=50 (padded to 64 inside the launcher), fp16, hidden a strided view, no bias; backward without
    logp (the vocab-shard form of the label column)."""
    h, W, b, y, g, k = _problem(21, 50, 300, torch.float16, bias=False, n_masked=2)
    big = torch.zeros(21, 80, dtype=h.dtype, device=h.device)
    big[:, 7:57] = h
    hv = big[:, 7:57]  # row stride 80, misaligned base
    opts = RowOptions(temperature=0.9)
    logp, H, lse = K.forward(hv, W, None, y, opts)
    bwd = K.backward(hv, W, None, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts)
    _check_all((logp, H, lse), bwd, h, W, None, y, g, k, 0.9)


@needs_triton
def test_triton_atomic_backward_matches_reference():
    h, W, b, y, g, k = _problem(37, 96, 1003, torch.float32)
    cfg = replace(K.default_config(torch.float32), deterministic=False)
    opts = RowOptions(temperature=0.8)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    bwd = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    _check_all((logp, H, lse), bwd, h, W, b, y, g, k, 0.8)


@needs_triton
def test_triton_backward_is_deterministic():
    h, W, b, y, g, k = _problem(37, 96, 1003, torch.bfloat16)
    cfg = replace(K.default_config(torch.bfloat16), chunk_rows=16)
    opts = RowOptions()
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    first = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    second = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@needs_triton
def test_triton_padding_columns_contribute_nothing():
    """All logits very negative and V a multiple of no block: a padded column counted as logit 0 would
    dominate lse and the entropy (the verl V=151936 bug)."""
    h, W, _, y, g, k = _problem(19, 32, 1003, torch.float32, n_masked=0, confident_row=False)
    b = torch.full((1003,), -60.0, device=h.device)
    opts = RowOptions()
    logp, H, lse = K.forward(h, W * 0.1, b, y, opts)
    ref = R.linear_entropy_logprob(h, W * 0.1, y, b)
    assert (lse < -50).all()
    for got, r in zip((logp, H, lse), ref):
        assert _err(got, r) < 1e-4


@needs_triton
@pytest.mark.parametrize("n", [0, 5])
def test_triton_empty_and_all_masked(n):
    h, W, b, y, g, k = _problem(max(n, 1), 32, 100, torch.float32, n_masked=0)
    h, y, g, k = h[:n], torch.full((n,), IGNORE, device=h.device), g[:n], k[:n]
    opts = RowOptions()
    logp, H, lse = K.forward(h, W, b, y, opts)
    assert logp.shape == (n,) and not logp.any() and not H.any() and not lse.any()
    dh, dW, db = K.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts)
    assert dh.shape == h.shape and dW.shape == W.shape and db.shape == b.shape
    assert not dh.any() and not dW.any() and not db.any()


@needs_triton
def test_triton_rejects_bad_input():
    h, W, b, y, g, k = _problem(4, 32, 50, torch.float32, n_masked=0)
    with pytest.raises(TypeError, match="weight"):
        K.forward(h, W.double(), b, y, RowOptions())
    with pytest.raises(ValueError, match="bias"):
        K.forward(h, W, b[:10], y, RowOptions())
    with pytest.raises(ValueError, match="block_v"):
        K.Tile(16, 48, 32)


# ----------------------------------------------------------------------------------------------
# dominant label: p(label) -> 1 (1 - p_y in ~[1e-7, 1e-3]), the Liger #1329 bug class
# ----------------------------------------------------------------------------------------------
def _dominant_problem(dtype, bias, N=10, D=48, V=300, seed=1):
    """Rows whose label logit sits log(V / q) above the rest, q = 1e-7 ... 1e-3 (1 - p_y ~ q); one row
    masked. Only dominant rows, so the label columns' dW rows are not swamped by ordinary rows.
    h, W, b in ``dtype`` on DEVICE; the float64 reference takes these same rounded values."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen)
    W = torch.randn(V, D, generator=gen) * 0.05
    y = torch.randperm(V, generator=gen)[:N]  # distinct labels: each label row of W belongs to one row
    target = math.log(V) - torch.linspace(math.log(1e-7), math.log(1e-3), N)
    W[y] = h * (target / h.pow(2).sum(1))[:, None]  # h_i . W[y_i] = target_i
    b = torch.randn(V, generator=gen) * 0.1 if bias else None
    y[N // 2] = IGNORE
    g = torch.randn(N, generator=gen)
    k = torch.randn(N, generator=gen)
    to = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return to(h), to(W), to(b), y.to(DEVICE), g.to(DEVICE), k.to(DEVICE)


def _dominant_check(dtype, logp, H, dh, dW, db, h, W, b, y, g, k, check_H=True, logits=None):
    """Relative errors vs float64 on the SAME inputs: logp (and H) per row, grad_hidden per row, grad_weight
    per vocab row, grad_bias. fp32: 1e-4 (measured ~3e-6; the bug gives ~1e-1 on grad_hidden and logp = 0
    exactly). bf16: the gradients are rounded to bf16 (2^-9 relative) and dz is rounded to bf16 before the
    dh / dW dots, as in eager PyTorch's bf16 backward, so 2e-2 (measured ~7e-3; the bug ~1.5e-1, eager
    bf16 PyTorch ~9e-2); logp / H are fp32 outputs of exact bf16 products: 1e-4 both. logits: the [N, V]
    logits the op rounded to its 16-bit dtype (a chunked forward, as eager): the float64 reference is then
    that of these logits (1 - p_y ~ 1e-7 moves by 10% with one bf16 ulp of a logit of ~20)."""
    h, W, b, y, g, k, logp, H = (None if x is None else x.cpu() for x in (h, W, b, y, g, k, logp, H))
    valid = y != IGNORE
    if logits is None:
        logp64, H64, _ = R.linear_entropy_logprob(h, W, y, b, 1.0, IGNORE)
        dh64, dW64, db64 = R.linear_entropy_logprob_backward(h, W, y, g, k, b, 1.0, IGNORE)
    else:
        z = logits.cpu().double()
        logp64, H64, _ = R.entropy_logprob(z, y, 1.0, IGNORE, torch.float64)
        dz = R.entropy_logprob_backward(z, y, g, k, 1.0, IGNORE, torch.float64)
        dh64, dW64, db64 = dz @ W.double(), dz.t() @ h.double(), None if b is None else dz.sum(0)
    q = -torch.expm1(logp64[valid])
    assert q.min() < 1e-6 and q.max() > 1e-4 and q.max() < 1e-2, q  # the regime under test
    rel = lambda got, ref: ((got.double() - ref).abs() / ref.abs()).max().item()  # noqa: E731
    assert rel(logp[valid], logp64[valid]) < 1e-4, "logp"
    assert (logp[~valid] == 0).all() and (logp[valid] < 0).all()
    if check_H:
        assert rel(H[valid], H64[valid]) < 1e-4, "H"
    tol = 1e-4 if dtype == torch.float32 else 2e-2

    def row_rel(got, ref):
        got, ref_n = got.double().cpu(), ref.norm(dim=1)
        keep = ref_n > 0
        assert (got[~keep] == 0).all()
        return ((got - ref)[keep].norm(dim=1) / ref_n[keep]).max().item()

    assert dh.dtype == h.dtype and dW.dtype == W.dtype
    e_h, e_w = row_rel(dh, dh64), row_rel(dW, dW64)
    assert e_h < tol, f"grad_hidden row relative error {e_h:.3e}"
    assert e_w < tol, f"grad_weight row relative error {e_w:.3e}"
    if b is not None:
        e_b = ((db.double().cpu() - db64).norm() / db64.norm()).item()
        assert e_b < tol, f"grad_bias relative error {e_b:.3e}"


def _public_op(impl, h, W, b, y, g, k):
    """Forward + autograd backward of the public op with upstream gradients g on logp and k on H."""
    from hero_kernels import linear_entropy_logprob

    hh = h.clone().requires_grad_()
    WW = W.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    logp, H = linear_entropy_logprob(hh, WW, y, bias=bb, impl=impl)
    (logp * g + H * k).sum().backward()
    return logp.detach(), H.detach(), hh.grad, WW.grad, None if bb is None else bb.grad


@needs_triton
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_triton_dominant_label_public_op(dtype, bias):
    """The public op (impl="triton") hands the forward's accurate logp to the backward (of the 16-bit logits
    after a chunked forward, ``HERO_KERNELS_LINEAR_FORWARD=chunked``; fp32 ones after the fused forward)."""
    from hero_kernels.backends.triton.linear import chunked as CH

    h, W, b, y, g, k = _dominant_problem(dtype, bias)
    n = int((y != IGNORE).sum())
    chunked = K.plan(n, h.shape[1], W.shape[0], dtype, has_bias=bias).forward_variant == "chunked"
    z = None
    if chunked and dtype != torch.float32:
        z = torch.empty(h.shape[0], W.shape[0], dtype=dtype, device=h.device)
        CH.logits_into(h, W, b, z)
    _dominant_check(dtype, *_public_op("triton", h, W, b, y, g, k), h, W, b, y, g, k, logits=z)


@needs_triton
@pytest.mark.parametrize("variant", ["splits", "atomic"])
def test_triton_dominant_label_backend(variant):
    """Backend functions directly: 3 forward vocab splits (so / t / xl merged across splits, the label in
    one of them) and the chunked backward in chunks of 8 rows, or the atomic backward."""
    h, W, b, y, g, k = _dominant_problem(torch.float32, True)
    cfg = _small_config(torch.float32, vocab_splits=3, deterministic=(variant == "splits"))
    opts = RowOptions(ignore_index=IGNORE)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    dh, dW, db = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    _dominant_check(torch.float32, logp, H, dh, dW, db, h, W, b, y, g, k)


@needs_triton
def test_triton_dominant_label_without_logp_is_the_old_formula():
    """Without logp (vocab shards) the label column uses the tile's 1 - e^{x_y - lse}: same result as with
    logp on ordinary rows, rounding noise on dominant ones (why the public op passes logp). The fused designs
    pinned (the chunked forward + backward take x_y and lse from the same fp32 logits: no such noise), so
    HERO_KERNELS_LINEAR_FORWARD / _BACKWARD in the environment do not change what this checks."""
    cfg = replace(K.default_config(torch.float32), forward_variant="fused", backward_variant="fused")
    h, W, b, y, g, k = _problem(37, 96, 1003, torch.float32, n_masked=3, confident_row=False)
    opts = RowOptions(temperature=0.8)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    with_lp = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    without = K.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts, cfg)
    for a, c in zip(with_lp, without):
        assert _err(a, c) <= 1e-5 * max(1.0, c.abs().max().item())
    h, W, b, y, g, k = _dominant_problem(torch.float32, False)
    logp, H, lse = K.forward(h, W, b, y, RowOptions(), cfg)
    dh, _, _ = K.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, None), RowOptions(), cfg)
    dh64 = R.linear_entropy_logprob_backward(h, W, y, g, None)[0]
    valid = y != IGNORE
    assert ((dh.double() - dh64).norm(dim=1)[valid] / dh64.norm(dim=1)[valid]).max() > 1e-3


@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_torch_dominant_label_public_op(dtype, bias):
    """impl="torch": whole rows per chunk, the reference's own accurate label column (H: see
    test_torch_dominant_label_entropy)."""
    h, W, b, y, g, k = _dominant_problem(dtype, bias)
    _dominant_check(dtype, *_public_op("torch", h, W, b, y, g, k), h, W, b, y, g, k, check_H=False)


def test_torch_dominant_label_entropy():
    """H of dominant rows, impl='torch', fp32: relative error vs float64 (the Triton path is < 1e-5)."""
    h, W, b, y, g, k = _dominant_problem(torch.float32, False)
    _, H, _, _, _ = _public_op("torch", h, W, b, y, g, k)
    H64 = R.linear_entropy_logprob(h, W, y, b, 1.0, IGNORE)[1]
    valid = y != IGNORE
    assert ((H.double() - H64).abs()[valid] / H64[valid]).max().item() < 1e-4


# ----------------------------------------------------------------------------------------------
# chunked torch path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,bias,tau",
    [(torch.float32, True, 0.7), (torch.float32, False, 1.0),
     (torch.bfloat16, True, 1.3), (torch.bfloat16, False, 0.7)],
)
def test_torch_chunked_matches_reference(dtype, bias, tau):
    """8 rows per chunk, so the 37 rows span several chunks."""
    h, W, b, y, g, k = _problem(37, 96, 1003, dtype, bias=bias)
    cfg = TB.TorchChunkConfig(max_chunk_bytes=8 * 4 * 1003, min_rows=1)
    assert TB.chunk_rows(1003, cfg) == 8
    opts = RowOptions(temperature=tau)
    logp, H, lse = TB.forward(h, W, b, y, opts, cfg)
    bwd = TB.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts, cfg)
    _check_all((logp, H, lse), bwd, h, W, b, y, g, k, tau)


def test_torch_chunked_empty_and_none_grads():
    h, W, b, y, g, k = _problem(6, 16, 40, torch.float32, n_masked=0)
    opts = RowOptions()
    logp, H, lse = TB.forward(h[:0], W, b, y[:0], opts)
    assert logp.shape == (0,)
    dh, dW, db = TB.backward(h[:0], W, b, y[:0], RowStats(None, H, lse), UpstreamGrads(g[:0], k[:0]), opts)
    assert dh.shape == (0, 16) and not dW.any() and not db.any()
    # None upstream gradient = 0.
    logp, H, lse = TB.forward(h, W, b, y, opts)
    dh, dW, db = TB.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(None, k), opts)
    ref = R.linear_entropy_logprob_backward(h, W, y, None, k, b)
    assert _err(dh, ref[0]) < 1e-4 and _err(dW, ref[1]) < 1e-4


# ----------------------------------------------------------------------------------------------
# GPU compile check (no GPU needed): every config for sm_80 and sm_90a, no spills
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json, sys
from hero_kernels.backends.triton import linear_entropy_logprob as K
print(json.dumps(K.compile_resource_report((int(sys.argv[1]),))))
"""


@pytest.mark.slow
@pytest.mark.skipif(K is None, reason="triton missing")
def test_gpu_compile_no_spills():
    """Every KERNEL_CONFIGS entry for each of its archs, sm_80 / sm_90a (one subprocess per arch), compiled with
    the launchers' alignment attributes. triton.compile needs real JIT functions, which TRITON_INTERPRET=1
    replaces, so the subprocesses run without that variable. Spills show up as STACK (LOCAL stays 0)."""
    require_compiler()
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, str(cc)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=compile_env(), cwd=REPO) for cc in (80, 90)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
        rows += json.loads(out.strip().splitlines()[-1])
    assert len(rows) == sum(len(c[6]) for c in K.KERNEL_CONFIGS)
    assert {90} in [set(c[6]) for c in K.KERNEL_CONFIGS]  # sm_90's own dz tile is compiled (for sm_90a only)
    for u in rows:
        print(f"{u['config']:86s} {u['arch']:7s} registers={u['registers']:3d} shared={u['shared_bytes']:6d} "
              f"local={u['local_bytes']} stack={u['stack_bytes']}")
    spills = [u for u in rows if u["local_bytes"] != 0 or u["stack_bytes"] != 0]
    assert not spills, f"register spills: {spills}"


_WGMMA_SCRIPT = r"""
import json
from hero_kernels.backends.triton import linear_entropy_logprob as K
from hero_kernels.gpu_compile import triton_compile
out = {}
for fn, sig, const, w, s, desc, _ in K.KERNEL_CONFIGS:
    if " bf16 bias=False " in desc and "label_stats=0" not in desc and "atomic" not in desc:
        asm = triton_compile(fn, sig, const, 90, w, s, K.compile_attrs(fn, sig)).asm
        out[desc] = asm["ptx"].count("wgmma.mma_async")
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(K is None, reason="triton missing")
def test_gpu_compile_sm90_gemms_use_wgmma():
    """The forward and dz GEMM kernels compile to Hopper's wgmma on sm_90a (bf16), not to mma.sync."""
    pytest.importorskip("triton.backends.nvidia")
    counts = run_json_script(_WGMMA_SCRIPT, timeout=900)
    print(counts)
    assert {d.split()[0] for d in counts} == {"_fwd_partials_kernel", "_bwd_dz_kernel"}
    assert all(n > 0 for n in counts.values()), counts


# ----------------------------------------------------------------------------------------------
# memory: chunked torch path vs eager PyTorch (benchmarks/bench_linear_memory.py, fresh subprocesses)
# ----------------------------------------------------------------------------------------------
def _memory(**kw):
    from benchmarks.bench_linear_memory import measure

    try:
        return measure(**kw)
    except RuntimeError as e:
        if "cannot be measured" in str(e):
            pytest.skip(str(e).splitlines()[-1])
        raise


@pytest.mark.slow  # eager [2048, 16000] fp32 intermediates on CPU: ~30 s of CPU
def test_chunked_memory_within_15_percent_of_eager_small():
    """N=2048, D=256, V=16000 with 2 MiB chunks (the default is 16 MiB for the full-size shape below)."""
    from benchmarks.bench_linear_memory import MAX_RATIO

    res = _memory(N=2048, D=256, V=16000, chunk_bytes=2 << 20)
    print({v: res[v]["peak_extra_bytes"] for v in ("eager", "chunked")}, res["ratio"])
    assert res["eager"]["peak_extra_bytes"] > 3 * 2048 * 16000 * 4  # eager holds several [N, V] fp32
    assert res["ratio"] <= MAX_RATIO


@pytest.mark.slow
def test_chunked_memory_within_15_percent_of_eager_full_size():
    """The benchmark's shape, N=8192, D=512, V=32000 fp32, default chunk size (a few minutes on 2 cores)."""
    from benchmarks.bench_linear_memory import MAX_RATIO

    res = _memory(N=8192, D=512, V=32000)
    print({v: res[v]["peak_extra_bytes"] for v in ("eager", "chunked")}, res["ratio"])
    assert res["ratio"] <= MAX_RATIO


# ----------------------------------------------------------------------------------------------
# skipped gradients: frozen LM head (LoRA) / detached hidden
# ----------------------------------------------------------------------------------------------
_SKIP_IMPLS = ["torch", "cpu", pytest.param("triton", marks=needs_triton)]


def _public_grads(impl, h, W, b, y, g, k, grad_h=True, grad_w=True):
    """Autograd through the public op; grad_w also decides the bias's requires_grad."""
    from hero_kernels import linear_entropy_logprob

    hh = h.clone().requires_grad_(grad_h)
    WW = W.clone().requires_grad_(grad_w)
    bb = None if b is None else b.clone().requires_grad_(grad_w)
    logp, H = linear_entropy_logprob(hh, WW, y, bias=bb, impl=impl)
    (logp * g + H * k).sum().backward()
    return hh.grad, WW.grad, None if bb is None else bb.grad


@pytest.mark.parametrize("impl", _SKIP_IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_weight_and_detached_hidden_skip_grads(impl, bias):
    h, W, b, y, g, k = _problem(21, 32, 301, torch.float32, bias=bias)
    full = _public_grads(impl, h, W, b, y, g, k)
    # Frozen LM head: grad_hidden identical, no weight / bias grad.
    dh, dW, db = _public_grads(impl, h, W, b, y, g, k, grad_w=False)
    assert dW is None and db is None
    assert torch.equal(dh, full[0])
    # Detached hidden: weight / bias grads identical, no hidden grad.
    dh, dW, db = _public_grads(impl, h, W, b, y, g, k, grad_h=False)
    assert dh is None
    assert torch.equal(dW, full[1])
    if bias:
        assert torch.equal(db, full[2])
    # Bias trainable, weight frozen: the weight pass still runs (db comes from it); weight.grad stays None.
    if bias:
        from hero_kernels import linear_entropy_logprob

        WW = W.clone()
        bb = b.clone().requires_grad_()
        logp, H = linear_entropy_logprob(h, WW, y, bias=bb, impl=impl)
        (logp * g + H * k).sum().backward()
        assert WW.grad is None and torch.equal(bb.grad, full[2])


@pytest.mark.parametrize("need_dh,need_dw", [(True, False), (False, True)])
def test_public_op_passes_need_flags_to_backend(need_dh, need_dw):
    """_backward maps ctx.needs_input_grad to the backend's need_dh / need_dw (and back to None)."""
    from unittest import mock

    h, W, b, y, g, k = _problem(9, 16, 50, torch.float32)
    with mock.patch.object(TB, "backward", wraps=TB.backward) as spy:
        dh, dW, db = _public_grads("torch", h, W, b, y, g, k, grad_h=need_dh, grad_w=need_dw)
    assert spy.call_count == 1
    kw = spy.call_args.kwargs
    assert kw["need_dh"] is need_dh and kw["need_dw"] is need_dw
    assert (dh is not None) == need_dh and (dW is not None) == need_dw and (db is not None) == need_dw


def test_torch_backend_skips_the_skipped_gemms():
    """Count GEMMs and [V, D] allocations of the torch backend's backward with each flag off."""
    from torch.overrides import TorchFunctionMode

    N, D, V = 30, 16, 64
    h, W, b, y, g, k = _problem(N, D, V, torch.float32, n_masked=0)
    opts = RowOptions()
    cfg = TB.TorchChunkConfig(max_chunk_bytes=4 * V * 8, min_rows=8)  # 4 chunks of 8 rows
    logp, H, lse = TB.forward(h, W, b, y, opts, cfg)

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.gemm = 0
            self.big_zeros = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in ("matmul", "__matmul__", "mm", "addmm", "addmm_"):
                self.gemm += 1
            if name == "zeros" and args and tuple(args[0]) in ((V, D), (N, D)):
                self.big_zeros += 1
            return func(*args, **kwargs)

    def run(**flags):
        with Count() as c:
            out = TB.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts, cfg, **flags)
        return c, out

    full, (dh, dW, db) = run()
    no_dw, (dh2, dW2, db2) = run(need_dw=False)
    no_dh, (dh3, dW3, db3) = run(need_dh=False)
    chunks = 4
    # Per chunk: logits GEMM + dh GEMM + dW GEMM; each flag removes one GEMM per chunk and one buffer.
    assert full.gemm == 3 * chunks and full.big_zeros == 2
    assert no_dw.gemm == 2 * chunks and no_dw.big_zeros == 1 and dW2 is None and db2 is None
    assert no_dh.gemm == 2 * chunks and no_dh.big_zeros == 1 and dh3 is None
    assert torch.equal(dh2, dh) and torch.equal(dW3, dW) and torch.equal(db3, db)
    none = TB.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts, cfg, need_dh=False, need_dw=False)
    assert none == (None, None, None)


class _CallCounter:
    """Stands in for a @triton.jit kernel (``kernel[grid](...)``) or a function, counting calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            return self.fn[grid](*args, **kwargs)

        return launch

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@needs_triton
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.usefixtures("model_picks")
def test_triton_backend_skips_kernel_launches(deterministic, monkeypatch):
    """Chunked backward: per chunk one dz-kernel launch, one dh GEMM (mm_into) and one dW GEMM (the first
    chunk writes, the others accumulate); a skipped gradient skips its GEMMs. Atomic: one launch."""
    from hero_kernels.backends.triton.linear import launch as L

    h, W, b, y, g, k = _problem(21, 32, 301, torch.float32)
    cfg = _small_config(torch.float32, deterministic=deterministic, chunk_rows=8)
    opts = RowOptions(temperature=0.9)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    counters = {"atomic": _CallCounter(L.K._bwd_atomic_kernel), "dz": _CallCounter(L.K._bwd_dz_kernel),
                "mm": _CallCounter(L.gemm.mm_into), "acc": _CallCounter(L.gemm.accumulate_dw)}
    monkeypatch.setattr(L.K, "_bwd_atomic_kernel", counters["atomic"])
    monkeypatch.setattr(L.K, "_bwd_dz_kernel", counters["dz"])
    monkeypatch.setattr(L.gemm, "mm_into", counters["mm"])
    monkeypatch.setattr(L.gemm, "accumulate_dw", counters["acc"])

    def run(**flags):
        for c in counters.values():
            c.calls = 0
        out = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg, **flags)
        return out, {n: c.calls for n, c in counters.items()}

    chunks = 3  # 18 valid rows in chunks of 8
    (dh, dW, db), n_full = run()
    if deterministic:
        assert n_full == {"atomic": 0, "dz": chunks, "mm": chunks + 1, "acc": chunks - 1}
    else:
        assert n_full == {"atomic": 1, "dz": 0, "mm": 0, "acc": 0}
    (dh2, dW2, db2), n = run(need_dw=False)
    assert n == {"atomic": 0, "dz": chunks, "mm": chunks, "acc": 0} and dW2 is None and db2 is None
    (dh3, dW3, db3), n = run(need_dh=False)
    assert n == {"atomic": 0, "dz": chunks, "mm": 1, "acc": chunks - 1} and dh3 is None
    if deterministic:
        assert torch.equal(dh2, dh) and torch.equal(dW3, dW) and torch.equal(db3, db)
    else:
        # The atomic variant falls back to the chunked path: same math, other summation order.
        _check_all((logp, H, lse), (dh2, dW3, db3), h, W, b, y, g, k, 0.9)


def test_backward_op_fake_mirrors_skipped_shapes():
    """The registered fake returns [0] tensors exactly where the real op skips a gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import hero_kernels  # noqa: F401  (registers the ops)

    h, W, b, y, g, k = _problem(9, 16, 50, torch.float32)
    logp, H, lse = TB.forward(h, W, b, y, RowOptions())
    for need_dh, need_dw in [(True, True), (True, False), (False, True)]:
        for bias in (b, None):
            args = (h, W, bias, y, logp, lse, H, g, k, 1.0, IGNORE, "torch", need_dh, need_dw)
            real = torch.ops.hero_kernels.linear_entropy_logprob_backward(*args)
            with FakeTensorMode(allow_non_fake_inputs=True):
                fake = torch.ops.hero_kernels.linear_entropy_logprob_backward(*args)
            assert [tuple(t.shape) for t in real] == [tuple(t.shape) for t in fake]
            assert [t.dtype for t in real] == [t.dtype for t in fake]
            assert real[0].numel() == (h.numel() if need_dh else 0)
            assert real[1].numel() == (W.numel() if need_dw else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_launcher_need_flags_on_cpu(dtype, monkeypatch):
    """The CUDA launcher's need_dh / need_dw logic, run against the CPU row kernels (as in
    tests/test_cpu_backend.py): skipped grads are None, the others as the full backward's."""
    from hero_kernels import _cpp_build
    from hero_kernels.backends.cuda import linear_entropy_logprob as cuda_lin

    monkeypatch.setattr(cuda_lin, "require_cuda", _cpp_build.require_cpu)
    monkeypatch.setattr(cuda_lin, "CHUNK_BYTES", 5 * 301 * 4)
    monkeypatch.setitem(cuda_lin._OUT_DTYPE_MM, "ok", None)
    h, W, b, y, g, k = _problem(21, 32, 301, dtype)
    opts = RowOptions(temperature=1.1)
    logp, H, lse = cuda_lin.forward(h, W, b, y, opts)
    dh, dW, db = cuda_lin.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts)
    dh2, dW2, db2 = cuda_lin.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts, need_dw=False)
    # without dW the "rows" order runs (nothing of [V, D] to save), with it the "vocab" order: same dh to rounding
    assert dW2 is None and db2 is None and torch.allclose(dh2.float(), dh.float(), rtol=1e-2,
                                                          atol=1e-2 * dh.abs().max().item())
    dh3, dW3, db3 = cuda_lin.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts, need_dh=False)
    assert dh3 is None and torch.equal(dW3, dW) and torch.equal(db3, db)
    # 5-row chunks: the first writes dW / db (beta = 0, no zero-fill), the others accumulate.
    ref = TB.backward(h, W, b, y, RowStats(None, H, lse), UpstreamGrads(g, k), opts)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip((dh, dW, db), ref):
        assert _err(got, want) <= tol * max(1.0, want.abs().max().item())


# ----------------------------------------------------------------------------------------------
# non-finite inputs: masked vocabulary tiles (-inf), NaN rows
# ----------------------------------------------------------------------------------------------
def _masked_oracle(h, W, b, y, tau=1.0):
    """float64 from the math alone over the unmasked columns only (-inf columns have p = 0 exactly):
    logp = x_y - lse, H = -sum p log p, over the finite logits of each row."""
    x = (h.double() @ W.double().t() + b.double()) / tau
    keep = torch.isfinite(x)
    xf = torch.where(keep, x, torch.full_like(x, -1e300))
    lse = torch.logsumexp(xf, dim=1)
    p = torch.where(keep, torch.exp(xf - lse[:, None]), torch.zeros_like(x))
    logq = torch.where(keep, xf - lse[:, None], torch.zeros_like(x))
    return (x.gather(1, y[:, None]).squeeze(1) - lse), -(p * logq).sum(1)


@pytest.mark.parametrize("impl", ["torch", "cpu", pytest.param("triton", marks=needs_triton)])
def test_masked_leading_vocab_tiles(impl):
    """bias = -inf on columns [0, 300) of V=700: the first vocab tiles (and, with splits, whole splits) hold
    no real column. logp, H and every gradient stay finite and match the oracle over the live columns."""
    h, W, _, y, g, k = _problem(13, 32, 700, torch.float32, n_masked=2, confident_row=False)
    b = torch.zeros(700, device=h.device)
    b[:300] = float("-inf")
    y = torch.where(y == IGNORE, y, 300 + y % 400)  # labels on live columns
    logp, H, dh, dW, db = _public_op(impl, h, W, b, y, g, k)
    valid = (y != IGNORE).cpu()
    r_logp, r_H = _masked_oracle(h.cpu(), W.cpu(), b.cpu(), y.cpu().clamp(min=0))
    assert torch.isfinite(logp).all() and torch.isfinite(H).all()
    assert _err(logp.cpu()[valid], r_logp[valid]) < 1e-4 and _err(H.cpu()[valid], r_H[valid]) < 1e-4
    for t in (dh, dW, db):
        assert torch.isfinite(t).all()
    assert (dW.cpu()[:300] == 0).all() and (db.cpu()[:300] == 0).all()
    # Gradients over the live columns equal the unmasked problem restricted to them.
    ref = _public_op("torch", h, W[300:].contiguous(), b[300:].contiguous(), torch.where(y == IGNORE, y, y - 300),
                     g, k)
    for got, want in ((logp, ref[0]), (H, ref[1]), (dh, ref[2]), (dW[300:], ref[3]), (db[300:], ref[4])):
        assert _err(got, want) <= 1e-4 * max(1.0, want.abs().max().item())


@needs_triton
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_triton_nan_input_gives_nan_rows(where):
    """NaN in a hidden row -> that row's logp and H are NaN (the others finite); NaN in a weight row or a
    bias entry is in every row's logits -> every valid row is NaN. Never H = 0 (the most confident value)."""
    h, W, b, y, g, k = _problem(11, 32, 301, torch.float32, n_masked=2, confident_row=False)
    cfg = _small_config(torch.float32, vocab_splits=3)
    row = int(torch.nonzero(y != IGNORE)[0])
    if where == "hidden":
        h[row, 5] = float("nan")
    elif where == "weight":
        W[17, 3] = float("nan")
    else:
        b[200] = float("nan")
    import warnings

    with warnings.catch_warnings():  # numpy (the interpreter) warns on all-NaN rows: expected here
        warnings.simplefilter("ignore", RuntimeWarning)
        logp, H, _ = K.forward(h, W, b, y, RowOptions(), cfg)
    valid = (y != IGNORE).cpu()
    bad = torch.zeros_like(valid)
    if where == "hidden":
        bad[row] = True
    else:
        bad = valid.clone()
    logp, H = logp.cpu(), H.cpu()
    assert torch.isnan(logp[bad]).all() and torch.isnan(H[bad]).all()
    assert torch.isfinite(logp[~bad]).all() and torch.isfinite(H[~bad]).all()


# ----------------------------------------------------------------------------------------------
# launch plans (no GPU): the model of what the launchers run
# ----------------------------------------------------------------------------------------------
@needs_triton
def test_plan_flagship_shape_model():
    """(16384, 4096, 128256) bf16 fwd+bwd under the honest model (tensor-core efficiency, L2 operand traffic,
    HBM efficiency): both paths model SLOWER than the 8 N D V floor at the datasheet peak, by the term the
    design says. The issue's "<= 1.3x the floor" target does NOT hold on an H100 (benchmarks/results/README.md):
    4 cuBLAS GEMMs at 0.75 of the peak are 1.33x alone, and the Triton path's 128 x 256 tl.dot tiles are
    L2-bound (85 FLOP/B x 6 TB/s = 512 TFLOP/s). The backward chunk stays <= 2% of eager's materialized peak."""
    from hero_kernels.backends import gemm
    from hero_kernels.backends.cuda import linear_entropy_logprob as CU
    from hero_kernels.backends.plan import GPU_SPECS, gemm_l2_bytes, modeled_seconds, modeled_terms, peak_extra_bytes

    N, D, V = 16384, 4096, 128256
    floor = 8 * N * D * V / 989e12
    fused = replace(K.default_config(torch.bfloat16, 90), forward_variant="fused", backward_variant="fused")
    for plan in (K.plan, CU.plan, lambda *a, **kw: K.plan(*a, config=fused, **kw)):
        launches = plan(N, D, V, torch.bfloat16, pass_="fwd+bwd")
        for gpu in ("h100", "h200"):
            spec = GPU_SPECS[gpu]
            t = sum(modeled_seconds(x, spec) for x in launches)
            assert t >= floor / spec.tc_efficiency, (gpu, t / floor)
            if gpu == "h100":
                assert t > 1.3 * floor, "the 1.3x target now holds: update benchmarks/results/README.md"
        assert peak_extra_bytes(launches) <= 0.02 * gemm.eager_peak_bytes(N, V, 2)
    C = gemm.chunk_rows(N, D, V, 2)  # the fused backward's and the CUDA path's chunk
    assert C * (V + D) * 2 <= 0.02 * gemm.eager_peak_bytes(N, V, 2) and C >= 1181
    fwd = K.plan(N, D, V, "bf16", config=fused)
    assert [x.name for x in fwd] == ["_fwd_partials_kernel", "_merge_partials_kernel"]
    assert 8 <= fwd[0].meta["splits"] <= 16 and all(x.l2_note for x in fwd)
    # Our tl.dot kernels carry the L2 operand traffic of their tile; at 128 x 256 it is still the bound.
    for x in K.plan(N, D, V, "bf16", pass_="fwd+bwd", config=fused):
        if x.kind == "gemm" and not x.external:
            m = x.meta
            assert x.l2_bytes == pytest.approx(gemm_l2_bytes(x.flops, m["BLOCK_N"], m["BLOCK_V"], m["elt"]))
            terms = modeled_terms(x, GPU_SPECS["h100"])
            assert max(terms, key=terms.get) == "l2", (x.name, terms)
    # Skipped gradients drop their GEMMs; the atomic path is one fused kernel, with its atomics in the L2 term.
    names = [x.name for x in K.plan(N, D, V, "bf16", pass_="bwd", need_dw=False)]
    assert "cublas_dw" not in names and "cublas_dh" in names
    atomic = next(x for x in K.plan(N, D, V, "bf16", pass_="bwd", deterministic=False)
                  if x.name == "_bwd_atomic_kernel")
    assert atomic.l2_bytes > gemm_l2_bytes(atomic.flops, 64, 128, 2)


@needs_triton
def test_model_can_miss_a_target():
    """The model is not tautological: a smaller tile moves more operand bytes through L2 and models slower,
    a larger one faster; a tensor-core entry without its L2 traffic is refused; a higher instruction count
    per element makes a row kernel issue-bound."""
    from hero_kernels.backends.plan import GPU_SPECS, KernelLaunch, modeled_seconds

    N, D, V = 16384, 4096, 128256
    h100 = GPU_SPECS["h100"]
    floor = 2 * N * D * V / 989e12

    def fwd_time(tile):
        cfg = replace(K.default_config(torch.bfloat16), fwd=tile, forward_variant="fused")
        return sum(modeled_seconds(x, h100) for x in K.plan(N, D, V, "bf16", config=cfg))

    base = fwd_time(K.default_config(torch.bfloat16).fwd)
    small = fwd_time(K.Tile(64, 64, 64, num_warps=4))
    big = fwd_time(K.Tile(128, 256, 64, num_warps=8))
    assert small > 1.9 * base > 1.9 * big and small / floor > 5
    with pytest.raises(ValueError, match="l2_bytes"):
        modeled_seconds(KernelLaunch("k", (1,), "gemm", 1e12, 0.0), h100)
    row = KernelLaunch("r", (N,), "stream", 0.0, 2.0 * N * V, meta={"elements": N * V, "sass_per_elt": 1.0})
    slow = replace(row, meta={"elements": N * V, "sass_per_elt": 40.0})
    assert modeled_seconds(slow, h100) > 2 * modeled_seconds(row, h100)


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_chunked_backward_reads_the_dz_grid_from_the_plan(monkeypatch):
    """Every chunk's ``_bwd_dz_kernel`` launch (full chunks and the tail) takes its grid from the plan entry
    of its chunk size: the launcher computes no grid of its own."""
    from hero_kernels.backends.triton.linear import launch as L

    h, W, b, y, g, k = _problem(21, 32, 301, torch.float32)
    cfg = _small_config(torch.float32)  # chunk_rows = 8: 18 valid rows -> 8, 8, 2
    logp, H, lse = K.forward(h, W, b, y, RowOptions(), cfg)
    grids, planned = [], []
    real_kernel, real_plan = L.K._bwd_dz_kernel, L.plan

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real_kernel[grid]

    def plan(*a, **kw):
        out = real_plan(*a, **kw)
        planned.extend(x for x in out if x.name == "_bwd_dz_kernel")
        return out

    monkeypatch.setattr(L.K, "_bwd_dz_kernel", Spy())
    monkeypatch.setattr(L, "plan", plan)
    K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), RowOptions(), cfg)
    assert [x.meta["chunk_rows"] for x in planned] == [8, 2]
    assert grids == [x.grid for x in planned for _ in range(x.repeats)]


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_plan_counts_compaction_and_padding():
    """Masked rows (total_rows > N) add the nonzero (a host sync), the gathers and scatters; D % 16 != 0 adds
    the padded copies of hidden and weight (once per pass) and the dh unpad; a misaligned weight its copy."""
    from hero_kernels.backends.cuda import linear_entropy_logprob as CU

    names = lambda ks: [x.name for x in ks]  # noqa: E731
    plain = K.plan(1000, 64, 512, "bf16", pass_="fwd+bwd")
    assert not {"compact_rows", "pad_hidden", "copy_weight"} & set(names(plain))
    masked = K.plan(1000, 64, 512, "bf16", pass_="fwd+bwd", total_rows=1200)
    assert names(masked).count("compact_rows") == 2 and all(x.host_sync for x in masked if x.name == "compact_rows")
    assert {"gather_rows", "scatter_outputs", "gather_stats", "scatter_dh"} <= set(names(masked))
    odd = K.plan(1000, 60, 512, "bf16", pass_="fwd+bwd")
    assert names(odd).count("pad_hidden") == 2 and names(odd).count("copy_weight") == 2 and "unpad_dh" in names(odd)
    assert next(x for x in odd if x.name == "_fwd_partials_kernel").flops == 2.0 * 1000 * 64 * 512
    assert "copy_weight" in names(K.plan(1000, 64, 512, "bf16", weight_copied=True))
    assert "compact_rows" in names(CU.plan(1000, 64, 512, "bf16", pass_="fwd+bwd", total_rows=1001))


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_launchers_use_the_plan(monkeypatch):
    """The forward launches exactly the plan's grid and splits (the plan is the single source of truth)."""
    from hero_kernels.backends.triton.linear import launch as L

    h, W, b, y, g, k = _problem(21, 32, 301, torch.float32)
    cfg = _small_config(torch.float32, vocab_splits=None)
    grids = []
    real = L.K._fwd_partials_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(L.K, "_fwd_partials_kernel", Spy())
    K.forward(h, W, b, y, RowOptions(), cfg)
    want = K.plan(int((y != IGNORE).sum()), 32, 301, torch.float32, config=cfg)[0]
    assert grids == [want.grid] and want.grid[0] == triton_cdiv(18, 16) * want.meta["splits"]


def triton_cdiv(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# host syncs: the masked-row compaction is skipped during CUDA graph capture
# ----------------------------------------------------------------------------------------------
def test_compact_rows():
    from hero_kernels.backends import compact_rows

    y = torch.tensor([3, IGNORE, 5, IGNORE])
    assert compact_rows(y, IGNORE).tolist() == [0, 2]
    assert compact_rows(torch.tensor([1, 2]), IGNORE) is None  # nothing masked: no gathers
    assert compact_rows(torch.full((3,), IGNORE), IGNORE).numel() == 0


@pytest.mark.parametrize("impl", ["cpu", "cuda_launcher", pytest.param("triton", marks=needs_triton),
                                  pytest.param("triton-chunked", marks=needs_triton)])
def test_uncompacted_rows_match_compacted(impl, monkeypatch):
    """During CUDA graph capture ``compact_rows`` returns None without looking at the labels (its nonzero
    would sync the host) and the fused heads compute every row; simulated here. Masked rows still give 0
    results and 0 gradients, the others what the compacted path gives."""
    import importlib

    from hero_kernels import _cpp_build

    if not impl.startswith("triton") and not _cpp_build.cpu_available():
        pytest.skip("CPU extension not built")
    if impl == "triton-chunked":  # both passes' chunked designs (cuBLAS logits, the row kernels, slice labels)
        L = importlib.import_module("hero_kernels.backends.triton.linear.launch")
        monkeypatch.setenv(L.FORWARD_ENV, "chunked")
        monkeypatch.setenv(L.BACKWARD_ENV, "chunked")
    if impl.startswith("triton"):
        mod, patch_at = K, importlib.import_module("hero_kernels.backends.triton.linear.launch")
    else:
        mod = importlib.import_module(f"hero_kernels.backends.{'cpu' if impl == 'cpu' else 'cuda'}"
                                      ".linear_entropy_logprob")
        patch_at = mod
        if impl == "cuda_launcher":  # the CUDA launcher over the CPU row kernels, 5-row chunks
            monkeypatch.setattr(mod, "require_cuda", _cpp_build.require_cpu)
            monkeypatch.setattr(mod, "CHUNK_BYTES", 5 * 301 * 4)
    h, W, b, y, g, k = _problem(21, 32, 301, torch.float32, n_masked=5)
    opts = RowOptions(temperature=1.3)

    def run():
        logp, H, lse = mod.forward(h, W, b, y, opts)
        return (logp, H, lse) + tuple(mod.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts))

    want = run()
    monkeypatch.setattr(patch_at, "compact_rows", lambda labels, ignore_index: None)
    got = run()
    masked = (y == IGNORE).cpu()
    for i, (a, w) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), i
        if i in (0, 1, 2, 3):
            assert (a.cpu()[masked] == 0).all(), i
        assert _err(a, w) <= 1e-5 * max(1.0, w.abs().max().item()), i


def test_compute_capability_gate(monkeypatch):
    """bf16 kernels need sm_80 (bf16 tl.dot in the fused head, bf16 math in the row kernels). On an older
    GPU an explicit impl='triton' / 'cuda' says so in one line; impl='auto' runs the chunked torch path and
    warns. Simulated: a CUDA device object with a patched capability (no tensor is created)."""
    from hero_kernels import dispatch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(dispatch, "_has_triton", lambda: True)
    dev = torch.device("cuda", 0)
    for impl in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=rf"impl='{impl}' with bfloat16 hidden needs .*8\.0.*got sm_75"):
            dispatch.check_capability(impl, dev, torch.bfloat16, "hidden")
        dispatch.check_capability(impl, dev, torch.float16, "hidden")  # fp16 / fp32 run there
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        dispatch.resolve_impl("triton", dev, torch.bfloat16, "hidden")
    with pytest.warns(RuntimeWarning, match="chunked torch path"):
        assert dispatch.resolve_impl("auto", dev, torch.bfloat16, "hidden") == "torch"
    assert dispatch.resolve_impl("auto", dev, torch.float16, "hidden") == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dispatch.resolve_impl("auto", dev, torch.bfloat16, "hidden") == "triton"


# ----------------------------------------------------------------------------------------------
# backward loop order and memory model: the "vocab" order holds no fp32 [V, D]
# ----------------------------------------------------------------------------------------------
#: The dz launch of each backward design (its meta: order, chunk_rows, vocab_cols).
_DZ_ENTRY = {"fused": "_bwd_dz_kernel", "chunked": "_entropy_logprob_bwd_kernel"}


@needs_triton
@pytest.mark.parametrize("dtype,bias,tau,logp_given,design", [
    pytest.param(*case, design, marks=[pytest.mark.slow] if (
        case[0] != torch.float32 and (design == "chunked" or case[2] == 1.3)) else [])
    for design in ("fused", "chunked")
    for case in [(torch.float32, True, 0.7, True), (torch.bfloat16, False, 1.3, True),
                 (torch.bfloat16, True, 1.0, False)]
])  # slow here (to keep `make test` short), by default in test_triton_every_design_pair_matches_reference
#     (bf16-vocab: the same case, every design pair) and the 16-bit pairing test
def test_triton_vocab_order_matches_reference(dtype, bias, tau, logp_given, design):
    """The "vocab" order at N=37, D=96, V=1003: slices of 256 columns (the tail 235, masked last vocab
    tiles inside each slice), dz launched in row chunks of 8 (+ a tail; the chunked design: all rows at once),
    labels and the confident row's label column landing in different slices; with and without the forward's
    logp; each backward design."""
    h, W, b, y, g, k = _problem(37, 96, 1003, dtype, bias=bias)
    cfg = _small_config(dtype, vocab_cols=256, backward_variant=design)
    opts = RowOptions(temperature=tau, ignore_index=IGNORE)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    plan = K.plan(int((y != IGNORE).sum()), 96, 1003, dtype, pass_="bwd", has_bias=bias, config=cfg)
    assert {x.meta["vocab_cols"] for x in plan if x.name == _DZ_ENTRY[design]} == {256, 235}
    assert "dw_cast" not in [x.name for x in plan]
    bwd = K.backward(h, W, b, y, RowStats(logp if logp_given else None, H, lse), UpstreamGrads(g, k), opts, cfg)
    _check_all((logp, H, lse), bwd, h, W, b, y, g, k, tau)
    again = K.backward(h, W, b, y, RowStats(logp if logp_given else None, H, lse), UpstreamGrads(g, k), opts, cfg)
    assert all(torch.equal(a, c) for a, c in zip(bwd, again) if a is not None)  # deterministic
    rows = K.backward(h, W, b, y, RowStats(logp if logp_given else None, H, lse), UpstreamGrads(g, k), opts,
                      _small_config(dtype, backward_variant=design))
    for a, c in zip(bwd, rows):  # the "rows" order: same gradients up to rounding
        if a is not None:
            assert torch.allclose(a.float(), c.float(), rtol=2e-2, atol=2e-2 * c.float().abs().max().item())


@needs_triton
@pytest.mark.parametrize("need_dh,need_dw", [(True, False), (False, True)])
def test_triton_vocab_order_skipped_grads(need_dh, need_dw):
    h, W, b, y, g, k = _problem(21, 32, 301, torch.bfloat16, bias=True)
    cfg = _small_config(torch.bfloat16, vocab_cols=128)
    opts = RowOptions()
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    got = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg, need_dh=need_dh,
                     need_dw=need_dw)
    full = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    for a, c, want in zip(got, full, (need_dh, need_dw, need_dw)):
        assert (a is not None) == want
        if want:
            assert torch.equal(a, c)


def _fake_dz(monkeypatch, launch):
    """Replace the dz kernel by an in-place fill of its output (no allocation) and the GEMM helpers by
    blockwise products writing into their outputs: on CPU, torch has no 16-bit GEMM with an fp32 output,
    so the real helpers upcast whole operands (a CPU-only temporary a GPU run does not have). Counted:
    what the orchestration allocates, not the kernels' or cuBLAS' internals."""
    def blockwise(out, a, b, acc, B=32):  # out (+)= a @ b in B x B blocks, fp32 sums
        for i in range(0, out.shape[0], B):
            for j in range(0, out.shape[1], B):
                o = out[i:i + B, j:j + B]
                blk = o.float() if acc else torch.zeros(o.shape)
                for q in range(0, a.shape[1], B):
                    blk.addmm_(a[i:i + B, q:q + B].float(), b[q:q + B, j:j + B].float())
                o.copy_(blk)

    class Fill:  # the dz kernel's output: argument `at` (the fused dz kernel's z, the row kernel's out)
        def __init__(self, at):
            self.at = at

        def __getitem__(self, grid):
            return lambda *args, **kw: args[self.at].fill_(0.01)

    monkeypatch.setattr(launch.K, "_bwd_dz_kernel", Fill(8))
    monkeypatch.setattr(launch.CH.ROWS, "_entropy_logprob_bwd_kernel", Fill(1))  # the chunked design's
    monkeypatch.setattr(launch.CH.SL, "slice_labels", lambda *a: None)
    monkeypatch.setattr(launch.CH.SL, "slice_label_fix", lambda *a: None)
    monkeypatch.setattr(launch.gemm, "mm_into", lambda a, b, out: blockwise(out, a, b, False))
    monkeypatch.setattr(launch.gemm, "accumulate_mm", lambda out, a, b: blockwise(out, a, b, True))
    monkeypatch.setattr(launch.gemm, "accumulate_dw", lambda dW, dz, h: blockwise(dW, dz.t(), h, True))


def _measured_peak(fn):
    """(peak bytes the CPU allocator held while fn ran, fn's result, fp32 shapes allocated): the memory
    profiler's allocations and frees in time order."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t._base is None:
                    shapes.append(tuple(t.shape))
            return out

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p, Log():
        out = fn()
    evs = [e for e in p.events() if (e.name == "[memory]" or not e.cpu_children) and e.cpu_memory_usage]
    cur = peak = 0
    for e in sorted(evs, key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak, out, shapes


@needs_triton
def test_backward_peak_memory_matches_the_model(monkeypatch):
    """The orchestration's allocations on CPU (dz kernel and GEMMs faked, see ``_fake_dz``) against the
    plan's memory model: the default order ("vocab", 2 slices at N=64, D=64, V=2000 bf16) peaks within its
    model + the returned gradients and never allocates an fp32 [V, D]; the "rows" order (forced chunk)
    holds the fp32 [V, D] accumulator, as its model says. Each after a fused forward (the chunked design's fp32
    logits beside its bf16 dz) and after a chunked one (dz in place over the bf16 logits: no fp32 logits buffer).
    No bias: torch's CPU column sum of a bf16 dz upcasts it whole (a CPU-only temporary)."""
    from hero_kernels.backends.plan import peak_extra_bytes
    from hero_kernels.backends.triton.linear import launch as L

    N, D, V = 64, 64, 2000
    h, W, _, y, g, k = _problem(N, D, V, torch.bfloat16, bias=False, n_masked=0)
    base = K.default_config(torch.bfloat16)
    stats = {f: K.forward(h, W, None, y, RowOptions(), replace(base, forward_variant=f)) for f in ("fused", "chunked")}
    _fake_dz(monkeypatch, L)
    orders = ((None, "vocab"), (32, "rows"))
    for fwd, cfg, order in [(f, replace(base, forward_variant=f, backward_variant=d, chunk_rows=c), o)
                            for f in ("fused", "chunked") for d in _DZ_ENTRY for c, o in orders]:
        logp, H, lse = stats[fwd]
        plan = K.plan(N, D, V, torch.bfloat16, pass_="bwd", config=cfg)
        dz_entry = next(x for x in plan if x.name == _DZ_ENTRY[cfg.backward_variant])
        assert dz_entry.meta["order"] == order and plan.round_logits == (fwd == "chunked")
        peak, out, fp32 = _measured_peak(lambda: K.backward(h, W, None, y, RowStats(logp, H, lse),
                                                            UpstreamGrads(g, k), RowOptions(), cfg))
        rows, cols = (N, dz_entry.meta["vocab_cols"]) if order == "vocab" else (32, V)
        if cfg.backward_variant == "chunked":  # the flat fp32 logits buffer beside dz: only after a fused forward
            assert ((rows * cols,) in fp32) == (fwd == "fused"), (fwd, order)
        returned = sum(x.numel() * x.element_size() for x in out if x is not None)
        model = peak_extra_bytes(plan)
        assert peak <= model + returned + 4096, (order, peak, model, returned)
        if order == "vocab":
            assert (V, D) not in fp32 and model < 4 * V * D
            assert len({x.meta["vocab_cols"] for x in plan if x.name == _DZ_ENTRY[cfg.backward_variant]}) == 2
        else:
            assert (V, D) in fp32 and peak >= 4 * V * D and model >= 4 * V * D


@needs_triton
def test_plan_memory_model_flagship():
    """(16384, 4096, 128256) bf16: the Triton and CUDA backwards run the "vocab" order and hold <= 2% of
    eager's lower bound N V (e + 8) beyond the gradients they return; the "rows" order holds the fp32
    [V, D] (~12%). Where 4 N D outgrows 4 V D (N = 65536,
    V = 32000) the choice flips to "rows"."""
    from hero_kernels.backends import gemm
    from hero_kernels.backends.cuda import linear_entropy_logprob as CU
    from hero_kernels.backends.plan import peak_extra_bytes

    N, D, V = 16384, 4096, 128256
    bound = gemm.eager_peak_bytes(N, V, 2)
    for bwd, dz in _DZ_ENTRY.items():
        tri = K.plan(N, D, V, "bf16", pass_="fwd+bwd", config=replace(K.default_config(torch.bfloat16, 90),
                                                                      backward_variant=bwd))
        assert {x.meta.get("order") for x in tri if x.name == dz} == {"vocab"}
        assert "dw_cast" not in [x.name for x in tri] and "dh_cast" in [x.name for x in tri]
        assert peak_extra_bytes(tri) <= 0.02 * bound
    rows = K.plan(N, D, V, "bf16", pass_="bwd", config=replace(K.default_config(torch.bfloat16, 90), chunk_rows=1504))
    assert peak_extra_bytes(rows) >= 4 * V * D and peak_extra_bytes(CU.plan(N, D, V, "bf16", pass_="bwd",
                                                                            order="rows")) >= 4 * V * D
    cu = CU.plan(N, D, V, "bf16", pass_="fwd+bwd")
    assert {x.meta.get("order") for x in cu if x.name == "entropy_logprob_bwd_kernel"} == {"vocab"}
    assert peak_extra_bytes(cu) <= 0.02 * bound
    assert gemm.backward_order(N, D, V, 2)[0] == "vocab" and gemm.backward_order(65536, D, 32000, 2)[0] == "rows"
    assert gemm.backward_order(N, D, V, 2, need_dw=False)[0] == "rows"
    assert gemm.backward_order(N, D, V, 2, vocab_ok=False)[0] == "rows"


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_auto_picks_the_faster_fused_head_path_by_the_model(monkeypatch):
    """impl="auto" on CUDA: the fused head's Triton or cuBLAS-chunked path, whichever plan models faster for
    the shape and GPU (pure Python, checked here with a simulated device); Triton when the CUDA extension
    is unavailable. At the headline shape the two model the same (the Triton head's chunked designs write
    16-bit logits like the CUDA path), so Triton; with its forward forced fused (environment) CUDA models
    more than the margin faster."""
    import importlib
    from types import SimpleNamespace

    from hero_kernels import dispatch
    from hero_kernels.backends import plan as P

    h100 = P.GPU_SPECS["h100"]
    best, t = P.fastest_linear_impl(16384, 4096, 128256, "bf16", h100)
    assert best == min(t, key=t.get) and set(t) == {"triton", "cuda"}
    assert abs(t["triton"] / t["cuda"] - 1) < dispatch.AUTO_CUDA_MARGIN  # the same cuBLAS GEMMs and row passes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HERO_KERNELS_LINEAR_FORWARD", "fused")  # the L2-bound tl.dot forward: CUDA faster
        _, t_fused = P.fastest_linear_impl(16384, 4096, 128256, "bf16", h100)
        assert t_fused["cuda"] < (1 - dispatch.AUTO_CUDA_MARGIN) * t_fused["triton"]
    assert P.fastest_linear_impl(512, 896, 151936, "bf16", h100)[0] == "triton"  # launch-bound: fewer launches
    # fp32: both paths' GEMMs at the FMA peak (no tensor cores for either), as plan_seconds prices fp32 plans
    # (it used the tensor-core peak, so cuBLAS looked 3x faster than it runs and won every large fp32 shape)
    _, t32 = P.fastest_linear_impl(4096, 4096, 151936, torch.float32, h100)
    for impl, secs in t32.items():
        mod = importlib.import_module(P.LINEAR_IMPLS[impl])
        kw = dict(sms=h100.sms, arch=h100.cc) if impl == "triton" else {}
        assert secs == P.plan_seconds(mod.plan(4096, 4096, 151936, torch.float32, pass_="fwd+bwd", **kw), h100, True)
    a100 = P.gpu_spec("NVIDIA A100-SXM4-80GB", 108, 80)
    assert (a100.sms, a100.cc) == (108, 80) and P.gpu_spec("NVIDIA H200", 132, 90) is P.GPU_SPECS["h200"]

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(dispatch, "_cpp_ok", lambda kind: True)
    dev = torch.device("cuda", 0)
    dispatch._auto_linear_impl.cache_clear()
    try:
        assert dispatch.auto_linear_impl(16384, 4096, 128256, torch.bfloat16, dev, False) == "triton"
        dispatch._auto_linear_impl.cache_clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HERO_KERNELS_LINEAR_FORWARD", "fused")
            assert dispatch.auto_linear_impl(16384, 4096, 128256, torch.bfloat16, dev, False) == "cuda"
        dispatch._auto_linear_impl.cache_clear()
        assert dispatch.auto_linear_impl(512, 896, 151936, torch.bfloat16, dev, False) == "triton"
        dispatch._auto_linear_impl.cache_clear()
        monkeypatch.setattr(dispatch, "_cpp_ok", lambda kind: False)
        monkeypatch.setenv("HERO_KERNELS_LINEAR_FORWARD", "fused")
        assert dispatch.auto_linear_impl(16384, 4096, 128256, torch.bfloat16, dev, False) == "triton"
    finally:
        dispatch._auto_linear_impl.cache_clear()


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_auto_prices_fp32_with_torchs_tf32_flag(monkeypatch):
    """fp32 under torch's cuBLAS TF32 flag: every cuBLAS GEMM (all of the CUDA path's, the Triton path's
    chunked designs' logits and its backward's dh / dW) runs on tensor cores, so the plan prices it at the TF32
    term while the Triton kernels' own dots stay IEEE (FMA peak) unless their config says tf32; the Triton plan
    then picks its chunked designs (``test_triton_designs_priced_with_torchs_tf32_flag``), within the margin of
    the CUDA path. impl="auto" follows the flag and its cache is keyed on it (one model run per flag value)."""
    import dataclasses
    from types import SimpleNamespace

    from hero_kernels import dispatch
    from hero_kernels.backends import plan as P
    from hero_kernels.backends.triton.linear import launch as TL
    from hero_kernels.backends.triton.linear.config import default_config

    h100, shape = P.GPU_SPECS["h100"], (4096, 4096, 151936)
    tc32 = h100.tf32_flops_per_s * h100.tc_efficiency
    assert h100.tf32_flops_per_s == h100.bf16_flops_per_s / 2 and tc32 > 4 * h100.fp32_flops_per_s
    launches = TL.plan(*shape, torch.float32, pass_="fwd+bwd", sms=h100.sms, arch=h100.cc)
    ext = next(k for k in launches if k.kind == "gemm" and k.external)
    own = next(k for k in launches if k.kind == "gemm" and not k.external)
    assert P.launch_peak(ext, h100, True, True) == tc32 and P.launch_peak(ext, h100, True) == h100.fp32_flops_per_s
    assert P.launch_peak(own, h100, True, True) == h100.fp32_flops_per_s  # IEEE dots: torch's flag does not apply
    assert P.launch_peak(ext, h100, False, True) is None  # 16-bit plans: the default tensor-core term
    cfg = dataclasses.replace(default_config(torch.float32, h100.cc), allow_tf32=True)
    own32 = next(k for k in TL.plan(*shape, torch.float32, pass_="fwd", sms=h100.sms, config=cfg) if k.kind == "gemm")
    assert own32.meta["precision"] == "tf32" and P.launch_peak(own32, h100, True) == tc32
    _, t = P.fastest_linear_impl(*shape, torch.float32, h100)
    _, t_tf32 = P.fastest_linear_impl(*shape, torch.float32, h100, tf32=True)
    assert t["triton"] < t["cuda"] and t_tf32["triton"] < 0.25 * t["triton"] and t_tf32["cuda"] < 0.25 * t["cuda"]
    tf32_plan = TL.plan(*shape, torch.float32, pass_="fwd+bwd", sms=h100.sms, arch=h100.cc, tf32=True)
    assert t_tf32["triton"] == P.plan_seconds(tf32_plan, h100, True, True)
    assert abs(t_tf32["cuda"] / t_tf32["triton"] - 1) < dispatch.AUTO_CUDA_MARGIN  # within the margin: Triton

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(dispatch, "_cpp_ok", lambda kind: True)
    dev, matmul = torch.device("cuda", 0), torch.backends.cuda.matmul
    before = matmul.allow_tf32
    dispatch._auto_linear_impl.cache_clear()
    try:
        misses = []
        for flag in (False, True, False):  # no cache clear between
            matmul.allow_tf32 = flag
            assert dispatch.cublas_tf32() is flag
            assert dispatch.auto_linear_impl(*shape, torch.float32, dev, False) == "triton"
            misses.append(dispatch._auto_linear_impl.cache_info().misses)
            assert dispatch.auto_linear_impl(16384, 4096, 128256, torch.bfloat16, dev, False) == "triton"  # no effect
        assert misses == [1, 3, 3]  # fp32 off (then bf16), fp32 on: a new entry; off again: the cached one
    finally:
        matmul.allow_tf32 = before
        dispatch._auto_linear_impl.cache_clear()


@pytest.mark.parametrize("dtype,bias,logp_given,compacted", [
    (torch.float32, True, True, True),
    (torch.bfloat16, False, True, False),
    (torch.bfloat16, True, False, True),
])
def test_cuda_launcher_vocab_order_on_cpu(dtype, bias, logp_given, compacted, monkeypatch):
    """The CUDA launcher's "vocab" order against the CPU row kernels (the same C++ math): 64-column slices
    of V=301 (a tail of 45), the row kernel on each slice with the label column rewritten from the forward's
    logp (or as an ordinary column where the label is elsewhere), confident and masked rows, compacted or
    every row computed (CUDA graph capture). Gradients match the float64 oracle like eager's; deterministic;
    the memory model holds no fp32 [V, D]."""
    from hero_kernels import _cpp_build
    from hero_kernels.backends import gemm
    from hero_kernels.backends.cuda import linear_entropy_logprob as cuda_lin
    from hero_kernels.backends.plan import peak_extra_bytes

    monkeypatch.setattr(cuda_lin, "require_cuda", _cpp_build.require_cpu)
    monkeypatch.setattr(gemm, "VOCAB_MIN_COLS", 64)  # the budget of this small shape asks for less
    if not compacted:
        monkeypatch.setattr(cuda_lin, "compact_rows", lambda labels, ignore_index: None)
    h, W, b, y, g, k = _problem(21, 32, 301, dtype, bias=bias)
    tau = 1.1
    opts = RowOptions(temperature=tau, ignore_index=IGNORE)
    launches = cuda_lin.plan(21, 32, 301, dtype, pass_="bwd", has_bias=bias)
    assert {x.meta.get("vocab_cols") for x in launches if x.name == "entropy_logprob_bwd_kernel"} == {64, 45}
    assert peak_extra_bytes(launches) < 4 * 301 * 32
    logp, H, lse = cuda_lin.forward(h, W, b, y, opts)
    # "rows" order: no dW to save
    rows = cuda_lin.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, need_dw=False)
    monkeypatch.setattr(cuda_lin, "linear_rows_backward", None)  # from here on only the "vocab" order may run
    got = cuda_lin.backward(h, W, b, y, RowStats(logp if logp_given else None, H, lse), UpstreamGrads(g, k), opts)
    again = cuda_lin.backward(h, W, b, y, RowStats(logp if logp_given else None, H, lse), UpstreamGrads(g, k), opts)
    assert all(torch.equal(a, c) for a, c in zip(got, again) if a is not None)
    _check_all((logp, H, lse), got, h, W, b, y, g, k, tau)
    assert rows[1] is None and torch.allclose(rows[0].float(), got[0].float(), atol=3e-2 * got[0].abs().max().item())


@pytest.mark.parametrize("compacted", [True, False])
def test_cuda_launcher_vocab_order_ignore_index_inside_the_slice(compacted, monkeypatch):
    """An ignore_index that is a vocabulary id (e.g. a pad id, here 0): the "vocab" order hands the row
    kernel slice-local labels in [0, Vc), so a real row whose label is elsewhere (slice column 0) must not
    read as masked there (it got a zero dz slice: dh off by ~0.4 on O(2) values). Masked rows stay 0."""
    import functools

    from hero_kernels import _cpp_build
    from hero_kernels.backends import gemm
    from hero_kernels.backends.cuda import linear_entropy_logprob as cuda_lin

    if not _cpp_build.cpu_available():
        pytest.skip("CPU extension not built")
    monkeypatch.setattr(cuda_lin, "require_cuda", _cpp_build.require_cpu)
    monkeypatch.setattr(gemm, "VOCAB_MIN_COLS", 64)
    monkeypatch.setattr(cuda_lin, "plan", functools.partial(cuda_lin.plan, order="vocab"))
    if not compacted:
        monkeypatch.setattr(cuda_lin, "compact_rows", lambda labels, ignore_index: None)
    h, W, b, y, g, k = _problem(9, 32, 150, torch.float32, n_masked=0)
    y[y == 0] = 1
    y[3] = 0  # masked
    y[5] = 64  # a real label at a slice's column 0
    opts = RowOptions(temperature=1.3, ignore_index=0)
    logp, H, lse = cuda_lin.forward(h, W, b, y, opts)
    got = cuda_lin.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts)
    want = R.linear_entropy_logprob_backward(h, W, y, g, k, b, 1.3, 0)
    for a, w in zip(got, want):
        assert _err(a, w) <= 1e-5 * max(1.0, w.abs().max().item())
    assert (got[0][3] == 0).all()


# ----------------------------------------------------------------------------------------------
# "vocab" order: the slice label column (ops.entropy_logprob_slice_labels / _slice_label_fix) against the
# ~20 torch ops it replaced, kept here as the reference
# ----------------------------------------------------------------------------------------------
def _old_label_column(x, inside, lse, H, g, k, logp, inv_tau):
    """The torch formula the slice ops replaced (fp64 [n]): the label column (1/tau) [g (1 - p_y) - k p_y (log
    p_y + H)] with log p_y = the forward's logp when given, else an ordinary column -(1/tau) p (g + k (log p + H))."""
    lq = x.double() - lse
    lp = torch.where(inside, logp.double(), lq) if logp is not None else lq
    p = torch.exp(lp)
    ent = torch.where(p > 0, p * (lp + H.double()), torch.zeros_like(p))
    lab = g.double() * -torch.expm1(lp) - k.double() * ent
    other = -(g.double() * p + k.double() * ent)
    return inv_tau * torch.where(inside, lab, other)


class _TorchSliceOps:
    """An ops handle whose two slice ops are the old torch sequence (gather / where / index_copy_ around
    ``_old_label_column``); every other op is the real one. x of fp64 logits stays fp64 (the old gather went
    through fp32 there; the C++ op keeps the row kernel's fp64 x)."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    @staticmethod
    def _col(z, y, v0):
        inside = (y >= v0) & (y < v0 + z.shape[1])
        return inside, torch.where(inside, y - v0, torch.zeros_like(y))

    def entropy_logprob_slice_labels(self, z, y, v0, inv, ig, cols, x):
        _, col = self._col(z, y, v0)
        xs = z.gather(1, col[:, None]).squeeze(1)
        xs = xs * inv if z.dtype == torch.float64 else xs.float() * torch.tensor(inv, dtype=torch.float32)
        x.copy_(xs.masked_fill(y == ig, 0.0))
        cols.copy_(col.masked_fill(y == ig, -1))

    def entropy_logprob_slice_label_fix(self, dz, y, v0, x, lse, H, g, k, logp, inv, ig):
        inside, col = self._col(dz, y, v0)
        fix = _old_label_column(x, inside, lse, H, g, k, logp, inv).masked_fill(y == ig, 0.0)
        dz.view(-1).index_copy_(0, torch.arange(dz.shape[0], device=dz.device) * dz.shape[1] + col, fix.to(dz.dtype))


_SLICE_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA")])]


def _slice_ops(dev):
    from hero_kernels import _cpp_build

    if dev == "cpu" and not _cpp_build.cpu_available():
        pytest.skip("CPU extension not built")
    return _cpp_build.require_cpu() if dev == "cpu" else _cpp_build.require_cuda()


def _slice_labels(N, V, v0, vc, ig, gen):
    """Labels hitting a slice [v0, v0 + vc): its first and last column, the columns just outside, masked rows,
    and (ig inside [0, vc)) a real label whose slice-local column is ig."""
    y = torch.randint(0, V, (N,), generator=gen)
    inner = v0 + ig if 0 <= ig < vc else v0 + 1
    y[:7] = torch.tensor([v0, v0 + vc - 1, max(v0 - 1, 0), min(v0 + vc, V - 1), ig, ig, inner])
    return y


@pytest.mark.parametrize("dev", _SLICE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("ig", [IGNORE, 3])
@pytest.mark.parametrize("logp_given", [True, False])
def test_slice_label_ops_match_the_torch_formula(dev, dtype, ig, logp_given):
    """One slice [v0, v0 + 37) of V=203 through slice_labels -> row backward -> slice_label_fix, against the
    old torch sequence: bit-identical dz (and slice labels). Labels at the slice's edges and just outside,
    masked rows, a user ignore_index inside [0, vc), p_y -> 1 (a huge label logit), tau != 1, stride-0
    upstream grads; the ops on a row-strided view of the slice give the same bits."""
    if dev == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes 16/32-bit logits")
    ops = _slice_ops(dev)
    gen = torch.Generator().manual_seed(5)
    N, V, v0, vc, inv = 41, 203, 64, 37, 1 / 0.7
    y = _slice_labels(N, V, v0, vc, ig, gen)
    zf = (3 * torch.randn(N, V, generator=gen)).to(dtype)
    zf[0, v0] = zf[1, v0 + vc - 1] = 60.0  # p_y -> 1 at both slice edges
    zf[7, y[7]] = 60.0 if y[7] != ig else 0.0  # and somewhere else
    zf, y = zf.to(dev), y.to(dev)
    logp, H, lse = ops.entropy_logprob_fwd(zf, y, inv, ig)
    g = torch.randn(N, generator=gen).to(dev)
    k = torch.tensor(0.7, device=dev).expand(N)  # stride 0, as an upstream grad of a sum may be
    lp = logp if logp_given else None

    def run(handle, z):
        cols, x = torch.empty(N, dtype=torch.int64, device=dev), torch.empty(N, dtype=torch.float64, device=dev)
        handle.entropy_logprob_slice_labels(z, y, v0, inv, ig, cols, x)
        handle.entropy_logprob_bwd(z, cols, lse, H, g, k, inv, -1, z)
        handle.entropy_logprob_slice_label_fix(z, y, v0, x, lse, H, g, k, lp, inv, ig)
        return z, cols

    want, want_cols = run(_TorchSliceOps(ops), zf[:, v0:v0 + vc].contiguous())
    got, got_cols = run(ops, zf[:, v0:v0 + vc].contiguous())
    assert torch.equal(got_cols, want_cols) and torch.equal(got, want)
    # p_y -> 1: 1 - p_y ~ e^-72 is a nonzero label gradient (below fp16's range)
    assert got[0].float().abs().max() < 1e-3 and (got[0, 0] != 0 or dtype == torch.float16)
    strided = torch.zeros(N, vc + 9, dtype=dtype, device=dev)[:, 4:4 + vc]
    assert torch.equal(run(ops, strided.copy_(zf[:, v0:v0 + vc]))[0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_slice_label_ops_schemas_match_what_they_write(dtype):
    """torch.library.opcheck of the two slice ops: the schema's mutability annotations (cols!, x! / dz!) are
    what the kernels write (functionalization and torch.compile rely on them) and the Meta impls trace."""
    ops = _slice_ops("cpu")
    gen = torch.Generator().manual_seed(2)
    N, V, v0, vc, inv = 9, 50, 20, 13, 1 / 0.7
    y = _slice_labels(N, V, v0, vc, IGNORE, gen)
    z = torch.randn(N, V, generator=gen).to(dtype)
    logp, H, lse = ops.entropy_logprob_fwd(z, y, inv, IGNORE)
    zs, g, k = z[:, v0:v0 + vc].contiguous(), torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    cols, x = torch.empty(N, dtype=torch.int64), torch.empty(N, dtype=torch.float64)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.hero_kernels_cpp.entropy_logprob_slice_labels.default,
                          (zs, y, v0, inv, IGNORE, cols, x), test_utils=utils)
    torch.library.opcheck(torch.ops.hero_kernels_cpp.entropy_logprob_slice_label_fix.default,
                          (zs, y, v0, x, lse, H, g, k, logp, inv, IGNORE), test_utils=utils)


def test_slice_label_ops_name_the_bad_argument():
    ops = _slice_ops("cpu")
    z, y = torch.zeros(4, 7), torch.zeros(4, dtype=torch.int64)
    f32, f64 = torch.zeros(4), torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="slice_labels: x must be a contiguous Double"):
        ops.entropy_logprob_slice_labels(z, y, 0, 1.0, -100, y.clone(), f32)
    with pytest.raises(RuntimeError, match="slice_labels: cols must be a contiguous Long"):
        ops.entropy_logprob_slice_labels(z, y, 0, 1.0, -100, torch.zeros(3, dtype=torch.int64), f64)
    with pytest.raises(RuntimeError, match="slice_label_fix: logp must be float32"):
        ops.entropy_logprob_slice_label_fix(z, y, 0, f64, f64, f32, f32, f32, f64, 1.0, -100)


@pytest.mark.parametrize("dev", _SLICE_DEVICES)
@pytest.mark.parametrize("dtype,bias,logp_given,compacted,ig", [
    (torch.float32, True, True, True, IGNORE),
    (torch.bfloat16, True, False, False, IGNORE),
    (torch.bfloat16, False, True, True, 5),
    (torch.float16, True, True, False, 5),
])
def test_vocab_backward_matches_the_torch_label_fix(dev, dtype, bias, logp_given, compacted, ig):
    """``cpp_launch.linear_vocab_backward`` (the CUDA backend's "vocab" order) with the C++ slice ops against
    the same loop with the old torch label fix: bit-identical grad_hidden / grad_weight / grad_bias. V=301 in
    slices of 64 (a tail of 45), labels on the slice edges, masked rows compacted or computed, an ignore_index
    inside a slice, tau != 1, bias, non-contiguous hidden."""
    from hero_kernels.backends import compact_rows
    from hero_kernels.backends.cpp_launch import linear_rows_forward, linear_vocab_backward

    ops = _slice_ops(dev)
    gen = torch.Generator().manual_seed(11)
    N, D, V, cols = 29, 40, 301, 64
    y = _slice_labels(N, V, 128, cols, ig, gen)
    y[7:10] = torch.tensor([256, 300, 63])  # the tail's edges, the last column of a slice
    h = torch.randn(N, D + 8, generator=gen)[:, 3:3 + D]  # non-contiguous rows
    W = torch.randn(V, D, generator=gen) / math.sqrt(D) * 3.0
    h[0] = W[y[0]] * 4.0  # p_y -> 1
    b = torch.randn(V, generator=gen) if bias else None
    g, k = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    to = lambda t: None if t is None else t.to(dtype).to(dev)  # noqa: E731
    h, W, b, y, g, k = to(h), to(W), to(b), y.to(dev), g.to(dev), k.to(dev)
    h = torch.empty(N, D + 8, dtype=dtype, device=dev)[:, 3:3 + D].copy_(h)  # still non-contiguous on dev
    opts = RowOptions(temperature=0.7, ignore_index=ig)
    rows = compact_rows(y, ig) if compacted else None
    logp, H, lse = linear_rows_forward(ops, h, W, b, y, opts, 8, rows=rows)
    saved, grads = RowStats(logp if logp_given else None, H, lse), UpstreamGrads(g, k)
    run = lambda handle: linear_vocab_backward(handle, h, W, b, y, saved, grads, opts, cols, need_dh=True,  # noqa
                                               need_dw=True, threads=lambda vc: 0, rows=rows)
    got, want = run(ops), run(_TorchSliceOps(ops))
    for a, w in zip(got, want):
        assert (a is None) == (w is None) and (a is None or torch.equal(a, w))
    assert (got[0][y == ig] == 0).all() and got[0].abs().max() > 0


@pytest.mark.parametrize("order", ["vocab", "rows"])
def test_cuda_launcher_peak_memory_matches_the_model(order, monkeypatch):
    """The CUDA launcher's orchestration (CPU row kernels in place, GEMM helpers faked as in ``_fake_dz``)
    allocates at most its plan's memory model + the returned gradients: "vocab" (the default, 2 slices at
    N=64, D=64, V=2000 bf16) never an fp32 [V, D], "rows" (forced) the fp32 [V, D] accumulator."""
    import functools

    from hero_kernels import _cpp_build
    from hero_kernels.backends.cuda import linear_entropy_logprob as cuda_lin
    from hero_kernels.backends.plan import peak_extra_bytes
    from hero_kernels.backends.triton.linear import launch as L

    monkeypatch.setattr(cuda_lin, "require_cuda", _cpp_build.require_cpu)
    monkeypatch.setattr(cuda_lin, "plan", functools.partial(cuda_lin.plan, order=order))
    N, D, V = 64, 64, 2000
    h, W, _, y, g, k = _problem(N, D, V, torch.bfloat16, bias=False, n_masked=0)
    opts = RowOptions()
    logp, H, lse = cuda_lin.forward(h, W, None, y, opts)
    _fake_dz(monkeypatch, L)
    launches = cuda_lin.plan(N, D, V, torch.bfloat16, pass_="bwd")
    peak, out, fp32 = _measured_peak(lambda: cuda_lin.backward(h, W, None, y, RowStats(logp, H, lse),
                                                               UpstreamGrads(g, k), opts))
    returned = sum(x.numel() * x.element_size() for x in out if x is not None)
    assert peak <= peak_extra_bytes(launches) + returned + 4096, (peak, peak_extra_bytes(launches), returned)
    assert ((V, D) in fp32) == (order == "rows") and (peak >= 4 * V * D) == (order == "rows")


@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter only: the rows live in a host memory map")
def test_fused_head_offsets_beyond_int32(tmp_path):
    """hidden and weight rows at element offsets beyond 2^31 (row index and row stride both int32: a 32-bit
    product wraps) feed the forward partials and the backward's dz kernel the right rows: both widen row
    indices to int64 before the stride."""
    gen = torch.Generator().manual_seed(0)
    N, D, V = 3, 32, 40
    h = sparse_rows(tmp_path / "h.bin", N, 2**30 + 64, D, torch.float32)  # row 2 at 2^31 + 128
    W = sparse_rows(tmp_path / "w.bin", V, 2**26, D, torch.float32)  # rows 32.. beyond 2^31
    h.copy_(torch.randn(N, D, generator=gen))
    W.copy_(torch.randn(V, D, generator=gen) / math.sqrt(D) * 3)
    y, g, k = torch.tensor([3, V - 1, 35]), torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    opts = RowOptions(temperature=1.0)
    stats = K.forward(h, W, None, y, opts)
    dh, dW, _ = K.backward(h, W, None, y, stats, UpstreamGrads(g, k), opts)
    (r_logp, r_H, _), (r_dh, r_dW, _) = _reference(h.clone(), W.clone(), None, y, g, k, 1.0)
    for got, ref in ((stats.logp, r_logp), (stats.H, r_H), (dh, r_dh), (dW, r_dW)):
        assert _err(got, ref) < 1e-5 * max(1.0, ref.abs().max().item())


# ----------------------------------------------------------------------------------------------
# the Triton head's designs per pass: "fused" (tl.dot kernels) and "chunked" (cuBLAS fp32 logits + the Triton
# row kernels, the slice label column by the Triton slice-label kernels)
# ----------------------------------------------------------------------------------------------
_DESIGNS = [(f, b) for f in ("fused", "chunked") for b in ("fused", "chunked")]


_PAIR_CASES = {
    "fp32-rows": (torch.float32, True, 0.7, dict(chunk_rows=8)),  # "rows" chunks of 8 + a tail
    "bf16-vocab": (torch.bfloat16, False, 1.3, dict(vocab_cols=256)),  # "vocab" slices of 256 + a tail of 235
    "bf16-rows-bias": (torch.bfloat16, True, 1.0, dict(chunk_rows=16)),
}


def _pair_is_slow(case: str, fwd: str, bwd: str) -> bool:
    """`make test` runs each case's pairings that no other default test covers: fp32 rows same-design pairs,
    bf16 rows + bias mixed pairs, every bf16 vocab pair; the rest run under `make test-all`."""
    return (case == "fp32-rows") == (fwd != bwd) if case != "bf16-vocab" else False


@needs_triton
@pytest.mark.parametrize("dtype,bias,tau,kw,fwd,bwd", [
    pytest.param(*c, f, b, id=f"{name}-{f}-{b}", marks=[pytest.mark.slow] if _pair_is_slow(name, f, b) else [])
    for name, c in _PAIR_CASES.items() for f, b in _DESIGNS
])
def test_triton_every_design_pair_matches_reference(fwd, bwd, dtype, bias, tau, kw):
    """Every forward design x every backward design (each backward takes either forward's saved stats) at N=37,
    D=96, V=1003 (odd V, V not a multiple of the slice): masked rows, a confident row (p_y -> 1), temperature,
    bias, non-contiguous hidden; within the tolerance rule against the float64 oracle (bf16 in the interpreter
    rounds by truncation on every kernel-side cast, the cuBLAS stand-in torch.mm to nearest)."""
    h, W, b, y, g, k = _problem(37, 96, 1003, dtype, bias=bias)
    h = torch.empty(37, 104, dtype=dtype, device=DEVICE)[:, 5:101].copy_(h)  # row stride 104, offset 5
    cfg = _small_config(dtype, vocab_splits=3, forward_variant=fwd, backward_variant=bwd, **kw)
    p = K.plan(int((y != IGNORE).sum()), 96, 1003, dtype, pass_="fwd+bwd", has_bias=bias, config=cfg)
    assert (p.forward_variant, p.backward_variant) == (fwd, bwd) and p.variants["backward"]["forced"]
    opts = RowOptions(temperature=tau, ignore_index=IGNORE)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    grads = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    _check_all((logp, H, lse), grads, h, W, b, y, g, k, tau)
    assert logp[(y != IGNORE).nonzero()[0]].abs().item() < 1e-4  # the confident row: log p_y -> 0


@needs_triton
@pytest.mark.parametrize("dtype,fwd,bwd", [
    pytest.param(dt, f, b, id=f"{dt}-{f}-{b}", marks=[pytest.mark.slow] if (
        dt == torch.float16 and (f, b) not in (("chunked", "chunked"), ("fused", "atomic"))) else [])
    for dt in (torch.bfloat16, torch.float16) for f in ("fused", "chunked") for b in ("fused", "chunked", "atomic")
])  # fp16: two pairings by default, all six under `make test-all`
def test_triton_16bit_logits_every_pairing_matches_reference(fwd, bwd, dtype):
    """16-bit inputs: a chunked forward writes the logits rounded once to the input dtype (as eager), a fused one
    keeps them fp32, and every backward (fused dz kernel, chunked in place / beside fp32 logits, atomic) uses the
    ones its forward's lse / H came from, derived from the forward's plan (the same config here). Within 2x eager
    PyTorch's same-dtype error against the float64 oracle at N=37, D=96, odd V=1003 in vocab slices of 256:
    bias, tau = 1.3, masked rows, a confident row (p_y -> 1), a user ignore_index (5) that is a vocabulary id
    inside the first slice, real labels at slice columns 5 (261) and 0 (512)."""
    ig = 5
    h, W, b, y, g, k = _problem(37, 96, 1003, dtype, bias=True)
    y[y == ig] = 6
    y[y == IGNORE] = ig
    y[[3, 4]] = torch.tensor([261, 512], device=y.device)
    cfg = _small_config(dtype, vocab_splits=3, forward_variant=fwd, backward_variant=None if bwd == "atomic" else bwd,
                        deterministic=bwd != "atomic", vocab_cols=256)
    n = int((y != ig).sum())
    p = K.plan(n, 96, 1003, dtype, pass_="fwd+bwd", has_bias=True, config=cfg)
    assert p.forward_variant == fwd and p.round_logits == (fwd == "chunked")
    assert K.plan(n, 96, 1003, dtype, pass_="bwd", has_bias=True, config=cfg).round_logits == (fwd == "chunked")
    opts = RowOptions(temperature=1.3, ignore_index=ig)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    grads = K.backward(h, W, b, y, RowStats(logp, H, lse), UpstreamGrads(g, k), opts, cfg)
    _check_all((logp, H, lse), grads, h, W, b, y, g, k, 1.3, ig)
    assert logp[(y != ig).nonzero()[0]].abs().item() < 1e-3  # the confident row: log p_y -> 0


@needs_triton
@pytest.mark.parametrize("bwd", ["fused", "chunked", "atomic"])
def test_triton_fp32_bias_of_16bit_inputs_same_logits_both_passes(bwd):
    """The backend API takes an fp32 bias with bf16 hidden / weight (the public op does not). A chunked forward's
    16-bit logits take the bias rounded to bf16 first (addmm needs one dtype), so every backward after it must
    too: the fused dz and atomic kernels added the unrounded fp32 bias before rounding (grad_bias 4.3e-2 / 4.7e-2
    vs 3.6e-3 / 1e-7 against the float64 answer of the forward's own logits here; 1.4e-1 at V=1003). N=20,
    D=32, V=300, an fp32 bias ~ 8, +20 on every 25th column."""
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(20, 32, generator=gen).to(dt).to(DEVICE)
    W = (torch.randn(300, 32, generator=gen) * 0.5).to(dt).to(DEVICE)
    b = torch.randn(300, generator=gen) * 8
    b[::25] += 20.03  # dominant columns whose fp32 bias is off the bf16 grid (ulp 0.125 there)
    b = b.to(DEVICE)
    y = torch.randint(0, 300, (20,), generator=gen).to(DEVICE)
    y[3] = IGNORE
    g, k = torch.randn(20, generator=gen).to(DEVICE), torch.zeros(20, device=DEVICE)
    cfg = _small_config(dt, forward_variant="chunked", backward_variant=None if bwd == "atomic" else bwd,
                        deterministic=bwd != "atomic", vocab_cols=128)
    stats = K.forward(h, W, b, y, RowOptions(), cfg)
    _, _, db = K.backward(h, W, b, y, stats, UpstreamGrads(g, k), RowOptions(), cfg)
    assert db.dtype == torch.float32
    z = (h.double() @ W.double().t() + b.to(dt).double()).to(dt).double().cpu()  # the forward's logits
    y_, g_ = y.cpu(), g.cpu()
    dz = g_[:, None] * (torch.nn.functional.one_hot(y_.clamp(min=0), 300) - torch.softmax(z, 1))
    db64 = dz[y_ != IGNORE].sum(0)
    assert ((db.cpu().double() - db64).abs().max() / db64.abs().max()).item() < 1e-2


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_triton_forward_and_backward_agree_on_the_logits_under_every_env_override(monkeypatch):
    """The backend API tells the backward nothing of its forward's design: ``plan`` derives it from the forward's
    own pricing (same N valid rows, D, V, dtype, bias, config, environment). Under every combination of
    FORWARD_ENV / BACKWARD_ENV (unset, fused, chunked): at the headline shape (the model picks chunked) and a
    tiny one (fused), bf16 / fp16 / fp32, the backward plan's logits are the input dtype exactly when the
    forward plan runs chunked on 16-bit inputs; and the launchers (interpreter, a tiny bf16 problem with masked
    rows) run the backward with the rounding of the forward they followed."""
    from hero_kernels.backends.triton.linear import launch as L

    envs = [None, "fused", "chunked"]
    real = L.plan
    for fe, be in [(f, b) for f in envs for b in envs]:
        for name, v in ((L.FORWARD_ENV, fe), (L.BACKWARD_ENV, be)):
            monkeypatch.delenv(name, raising=False) if v is None else monkeypatch.setenv(name, v)
        for dt in ("bf16", "fp16", "fp32"):
            for N, D, V, bias in ((16384, 4096, 128256, False), (16384, 4096, 128256, True), (40, 32, 300, True)):
                fwd = real(N, D, V, dt, has_bias=bias).forward_variant
                want = dt if (fwd == "chunked" and dt != "fp32") else "fp32"
                for pass_ in ("bwd", "fwd+bwd"):
                    p = real(N, D, V, dt, pass_=pass_, has_bias=bias)
                    assert p.backward_logits == want, (fe, be, dt, N, pass_)
                    dz = [x for x in p if x.name in ("_bwd_dz_kernel", "_entropy_logprob_bwd_kernel")]
                    assert all(x.meta.get("ROUND_LOGITS", x.meta.get("INPLACE", want != "fp32")) == (want != "fp32")
                               or dt == "fp32" for x in dz)
        seen = []
        monkeypatch.setattr(L, "plan", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
        h, W, b, y, g, k = _problem(40, 32, 300, torch.bfloat16, bias=True, n_masked=5)
        stats = K.forward(h, W, b, y, RowOptions(ignore_index=IGNORE))
        K.backward(h, W, b, y, stats, UpstreamGrads(g, k), RowOptions(ignore_index=IGNORE))
        assert [x.forward_variant for x in seen] == [fe or "fused", None]
        assert seen[1].round_logits == (seen[0].forward_variant == "chunked"), (fe, be)
        monkeypatch.setattr(L, "plan", real)


@needs_triton
@pytest.mark.parametrize("fwd", ["fused", "chunked"])
@pytest.mark.parametrize("kw", [dict(vocab_cols=64), dict(chunk_rows=4)], ids=["vocab", "rows"])
def test_triton_chunked_backward_ignore_index_inside_a_slice(fwd, kw):
    """A user ignore_index that is a vocabulary id (3): the chunked backward hands the row kernel slice-local
    labels with -1 on masked rows, so a real row whose label sits at slice column 3 (67) or 0 (64) is not read
    as masked; masked rows stay 0. fp32 against the float64 oracle at that ignore_index. Without the forward's
    logp the label column is the old 1 - e^{x_y - lse}, rounding noise as p_y -> 1 unless x_y and lse come from
    the same logits (the same design: 1e-5 of relative error on the confident row when they do not)."""
    h, W, b, y, g, k = _problem(9, 32, 150, torch.float32, n_masked=0)
    y[y == 3] = 1
    y[[2, 6]] = 3  # masked
    y[4], y[5], y[7] = 67, 64, 149  # slice columns 3 and 0, the last column
    opts = RowOptions(temperature=1.3, ignore_index=3)
    cfg = _small_config(torch.float32, forward_variant=fwd, backward_variant="chunked", **kw)
    logp, H, lse = K.forward(h, W, b, y, opts, cfg)
    for given in (logp, None) if fwd == "chunked" else (logp,):  # the label column from the forward's logp or not
        got = K.backward(h, W, b, y, RowStats(given, H, lse), UpstreamGrads(g, k), opts, cfg)
        want = R.linear_entropy_logprob_backward(h, W, y, g, k, b, 1.3, 3)
        for a, w in zip(got, want):
            assert _err(a, w) <= 1e-5 * max(1.0, w.abs().max().item())
        assert (got[0][[2, 6]] == 0).all()


def _torch_row_dz(z, y, lse, H, g, k, inv):
    """dz of whole fp32 rows z [n, V] in fp64 (the row kernel's math; labels y in [0, V))."""
    x = z.double() * inv
    lp = x - lse[:, None]
    p = lp.exp()
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    return inv * (g.double()[:, None] * (onehot - p) - k.double()[:, None] * p * (lp + H.double()[:, None]))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ig", [IGNORE, 3])
@pytest.mark.parametrize("logp_given", [True, False])
def test_triton_slice_label_kernels_match_the_torch_formula(dtype, ig, logp_given):
    """One slice [v0, v0 + 37) of V=203 through the Triton slice_labels -> row backward (fp32 logits in, dz in
    ``dtype``) -> slice_label_fix: the slice labels as ``hero_rowmath.h`` slice_col, x the row kernel's fp32
    z / tau, the label / stand-in column the torch formula the C++ ops replaced (``_old_label_column``), every
    other column the whole-row dz. Labels at the slice's edges and just outside, masked rows, a user
    ignore_index inside [0, vc), p_y -> 1 (a huge label logit), tau != 1, stride-0 upstream grads, a row-strided
    view of the slice."""
    from hero_kernels.backends.triton import entropy_logprob as ROWS
    from hero_kernels.backends.triton import slice_label as SL

    gen = torch.Generator().manual_seed(5)
    N, V, v0, vc, inv = 41, 203, 64, 37, 1 / 0.7
    y = _slice_labels(N, V, v0, vc, ig, gen)
    zf = 3 * torch.randn(N, V, generator=gen)
    zf[0, v0] = zf[1, v0 + vc - 1] = 60.0  # p_y -> 1 at both slice edges
    zf[7, y[7]] = 60.0 if y[7] != ig else 0.0  # and somewhere else
    zf, y = zf.to(DEVICE), y.to(DEVICE)
    logp, H, lse = ROWS.forward(zf, y, RowOptions(temperature=0.7, ignore_index=ig))
    g = torch.randn(N, generator=gen).to(DEVICE)
    k = torch.full((N,), 0.7, device=DEVICE)
    lp = logp if logp_given else None
    z = torch.zeros(N, vc + 9, device=DEVICE)[:, 4:4 + vc].copy_(zf[:, v0:v0 + vc])  # row stride vc + 9
    dz = torch.zeros(N, vc + 3, dtype=dtype, device=DEVICE)[:, 1:1 + vc]
    cols, x = torch.empty(N, dtype=torch.int64, device=DEVICE), torch.empty(N, dtype=torch.float64, device=DEVICE)
    SL.slice_labels(z, y, v0, inv, ig, cols, x)
    (launch,) = ROWS.plan(N, vc, torch.float32, pass_="bwd")
    ROWS._entropy_logprob_bwd_kernel[launch.grid](
        z, dz, cols, lse, H, g, k, vc, N, 0, z.stride(0), 0, dz.stride(0), 1, 1, inv, -1,
        BLOCK_V=launch.meta["BLOCK_V"], ROUND_X=ROWS._round_x(), num_warps=launch.num_warps)
    SL.slice_label_fix(dz, y, v0, x, lse, H, g, k, lp, inv, ig)

    masked = y == ig
    inside = (y >= v0) & (y < v0 + vc)
    col = torch.where(inside, y - v0, torch.zeros_like(y))
    assert torch.equal(cols, col.masked_fill(masked, -1))
    x_want = (z.gather(1, col[:, None]).squeeze(1) * torch.tensor(inv, dtype=torch.float32)).double()
    assert torch.equal(x[~masked], x_want[~masked]) and (x[masked] == 0).all()
    # every other column: the whole-row formula of the fp32 row kernel (p from x - lse in fp32: ~1e-5 relative)
    want = _torch_row_dz(z, col, lse, H, g, k, inv)
    rows = torch.arange(N)
    fix = _old_label_column(x, inside, lse, H, g, k, lp, torch.tensor(inv, dtype=torch.float32).double().item())
    got_fix, want[rows, col], dz[rows, col] = dz[rows, col].double(), 0.0, 0.0
    bf16 = dtype == torch.bfloat16  # the interpreter truncates bf16: up to 2^-7 relative
    err = (dz.double() - want)[~masked].abs()
    assert (err <= (2 ** -7 if bf16 else 2e-5) * want[~masked].abs() + 1e-30).all(), err.max()
    assert (dz[masked] == 0).all() and (got_fix[masked] == 0).all()
    # the rewritten column: the fp64 formula, rounded once
    err = (got_fix - fix)[~masked].abs()
    assert (err <= (2 ** -7 if bf16 else 2 ** -23) * fix[~masked].abs() + 1e-45).all(), err.max()
    dz[rows, col] = got_fix.to(dtype)
    # p_y -> 1: 1 - p_y ~ e^-72 is a nonzero label gradient, from the forward's logp (or the old formula)
    assert dz[0].float().abs().max() < 1e-3 and (dz[0, 0] != 0 or not logp_given)


@needs_triton
@pytest.mark.parametrize("design", ["fused", "chunked"])
@pytest.mark.parametrize("kw", [dict(vocab_cols=48), dict(chunk_rows=4)], ids=["vocab", "rows"])
def test_triton_backward_takes_int32_labels(design, kw):
    """int32 labels (the backend API and ``hero_kernels.sharded.shard_backward`` pass them on as given): each
    backward design gives the int64 labels' gradients, on the whole vocabulary and on a shard [50, 131) (the
    chunked design's slice-label kernels read int64 labels)."""
    h, W, b, y, g, k = _problem(13, 24, 131, torch.float32, n_masked=2)
    opts = RowOptions(temperature=0.9, ignore_index=IGNORE)
    cfg = _small_config(torch.float32, backward_variant=design, **kw)
    stats = K.forward(h, W, b, y, opts, cfg)
    for v0 in (0, 50):
        want = K.backward(h, W[v0:], b[v0:], y, stats, UpstreamGrads(g, k), opts, cfg, vocab_start=v0)
        got = K.backward(h, W[v0:], b[v0:], y.int(), stats, UpstreamGrads(g, k), opts, cfg, vocab_start=v0)
        for a, w in zip(got, want):
            assert torch.equal(a, w)


@needs_triton
def test_backward_frees_the_dz_buffers_before_the_dh_cast(monkeypatch):
    """The "vocab" order casts the fp32 dh accumulator once at the end: by then the dz producer (the dz buffer
    and, chunked, the fp32 logits beside it) is gone, as the memory model's "final" phase says (it holds the
    fp32 dh only). Kernels and GEMMs faked (``_fake_dz``); bf16, 2 slices, each design."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from hero_kernels.backends.triton.linear import launch as L

    N, D, V = 16, 32, 200
    h, W, _, y, g, k = _problem(N, D, V, torch.bfloat16, bias=False, n_masked=0)
    logp, H, lse = K.forward(h, W, None, y, RowOptions())
    _fake_dz(monkeypatch, L)
    alive = []
    for name in ("_FusedDz", "DzProducer"):
        mod = L if name == "_FusedDz" else L.CH
        cls = getattr(mod, name)
        monkeypatch.setattr(mod, name, type(name, (cls,), {
            "__init__": lambda self, *a, _cls=cls, **kw: (_cls.__init__(self, *a, **kw),
                                                          alive.append(weakref.ref(self)))[0]}))
    at_cast = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            x = args[0] if args else None
            if (func is torch.ops.aten._to_copy.default and isinstance(x, torch.Tensor)
                    and x.dtype == torch.float32 and tuple(x.shape) == (N, D)
                    and (kwargs or {}).get("dtype") == torch.bfloat16):
                at_cast.append(sum(r() is not None for r in alive))
            return func(*args, **(kwargs or {}))

    for design in _DZ_ENTRY:
        alive.clear(), at_cast.clear()
        cfg = replace(K.default_config(torch.bfloat16), vocab_cols=128, backward_variant=design)
        with Watch():
            K.backward(h, W, None, y, RowStats(logp, H, lse), UpstreamGrads(g, k), RowOptions(), cfg)
        assert len(alive) == 1 and at_cast == [0], (design, at_cast)


@needs_triton
def test_forward_peak_memory_matches_the_model(monkeypatch):
    """The forward's allocations on CPU (the logits GEMM faked: an in-place fill) within its plan's memory model + the
    returned stats, in each design: the fused split partials, the chunked [C, V] logits chunk in the input dtype
    (the bias in the GEMM); bf16, N=40 in chunks of 16 + a tail, V=300, bias."""
    from hero_kernels.backends.plan import peak_extra_bytes
    from hero_kernels.backends.triton.linear import launch as L

    N, D, V = 40, 32, 300
    h, W, b, y, _, _ = _problem(N, D, V, torch.bfloat16, bias=True, n_masked=0)
    monkeypatch.setattr(L.gemm, "mm_into", lambda a, b, out: out.fill_(0.5))  # cuBLAS writes its output only
    for design in ("fused", "chunked"):
        cfg = _small_config(torch.bfloat16, chunk_rows=16, forward_variant=design)
        plan = K.plan(N, D, V, torch.bfloat16, has_bias=True, config=cfg)
        assert plan.forward_variant == design
        peak, out, _ = _measured_peak(lambda: K.forward(h, W, b, y, RowOptions(), cfg))
        returned = sum(x.numel() * x.element_size() for x in out)
        model = peak_extra_bytes(plan)
        assert peak <= model + returned + 4096, (design, peak, model, returned)
        if design == "chunked":
            assert model >= 16 * V * 2 and peak >= 16 * V * 2


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_triton_designs_priced_with_torchs_tf32_flag(monkeypatch):
    """fp32 under torch's cuBLAS TF32 flag: the chunked designs' cuBLAS logits GEMMs run on tensor cores while
    the fused designs' own dots stay IEEE, so the plan picks each pass's design at the flag's prices (it picked
    at IEEE prices: fused / fused, modeled 3x slower than chunked / chunked under TF32) and impl="auto" prices
    the Triton path it would run. The launchers plan with the flag (fp32 only)."""
    from hero_kernels.backends import plan as P
    from hero_kernels.backends.triton.linear import launch as L

    h100, shape = P.GPU_SPECS["h100"], (4096, 4096, 151936)
    kw = dict(pass_="fwd+bwd", sms=h100.sms, arch=h100.cc)
    p = L.plan(*shape, torch.float32, tf32=True, **kw)
    assert (p.forward_variant, p.backward_variant) == ("chunked", "chunked")
    assert L.plan(*shape, torch.float32, **kw).forward_variant == "fused"  # IEEE cuBLAS: fused as before
    monkeypatch.setenv(L.FORWARD_ENV, "fused")
    monkeypatch.setenv(L.BACKWARD_ENV, "fused")
    fused = P.plan_seconds(L.plan(*shape, torch.float32, tf32=True, **kw), h100, True, True)
    monkeypatch.delenv(L.FORWARD_ENV)
    monkeypatch.delenv(L.BACKWARD_ENV)
    _, t = P.fastest_linear_impl(*shape, torch.float32, h100, tf32=True)
    assert t["triton"] == P.plan_seconds(p, h100, True, True) < 0.5 * fused
    seen = []
    real = L.plan
    monkeypatch.setattr(L, "plan", lambda *a, **k: seen.append(k.get("tf32")) or real(*a, **k))
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (True, False):
            matmul.allow_tf32 = flag
            for dtype in (torch.float32, torch.bfloat16):
                h, W, _, y, g, k = _problem(5, 16, 40, dtype, bias=False, n_masked=0)
                seen.clear()
                stats = K.forward(h, W, None, y, RowOptions())
                K.backward(h, W, None, y, stats, UpstreamGrads(g, k), RowOptions())
                assert seen == [flag and dtype == torch.float32] * 2, (flag, dtype, seen)
    finally:
        matmul.allow_tf32 = before


@needs_triton
def test_chunked_designs_need_torchs_fp32_output_gemm(monkeypatch):
    """A torch without the 16-bit GEMM with an fp32 output (aten ``mm.dtype_out``: torch < 2.8, which
    pyproject allows) makes ``gemm.mm_into`` upcast whole operands: every chunked logits GEMM would copy the
    [V, D] weight to fp32 (2.1 GB at the headline shape, beyond the 2% memory model) and run at the fp32 FMA
    peak. There the 16-bit plans keep the fused designs (the Triton head's and the sketch's) unless the config or
    the environment forces one; fp32 plans are unaffected (a plain fp32 GEMM)."""
    from hero_kernels.backends import gemm
    from hero_kernels.backends.triton.linear import launch as L
    from hero_kernels.backends.triton.linear import sketch_launch as SL

    N, D, V = 16384, 4096, 128256
    assert gemm.has_fp32_out_gemm()  # this torch (the model's default)
    monkeypatch.setattr(gemm, "has_fp32_out_gemm", lambda: False)
    for mod in (L, SL):
        p = mod.plan(N, D, V, "bf16", pass_="fwd+bwd")
        assert (p.forward_variant, p.backward_variant) == ("fused", "fused"), mod.__name__
        monkeypatch.setenv(mod.BACKWARD_ENV, "chunked")
        assert mod.plan(N, D, V, "bf16", pass_="bwd").backward_variant == "chunked"
    assert L.plan(N, D, V, torch.float32, pass_="fwd", tf32=True).forward_variant == "chunked"


@needs_triton
@pytest.mark.usefixtures("model_picks")
def test_triton_plan_picks_the_faster_designs():
    """Pure Python: at the headline shape (16384, 4096, 128256) bf16 the model picks the chunked forward and
    backward on both GPUs (cuBLAS at the tensor-core term vs the L2-bound tl.dot tiles), the whole plan within 2%
    of eager's memory bound; a tiny shape stays fused (fewer launches). The config and the environment force a
    design; a bad value names the variable or the field in one line. The roofline row shows both designs."""
    from hero_kernels.backends import gemm
    from hero_kernels.backends.plan import peak_extra_bytes
    from hero_kernels.backends.triton.linear import launch as L

    N, D, V = 16384, 4096, 128256
    for gpu in ("h100", "h200"):
        p = K.plan(N, D, V, "bf16", pass_="fwd+bwd", gpu=gpu)
        fw, bw = p.variants["forward"], p.variants["backward"]
        assert (p.forward_variant, p.backward_variant) == ("chunked", "chunked") and not fw["forced"]
        assert fw["modeled_s"]["chunked"] < 0.85 * fw["modeled_s"]["fused"]
        assert bw["modeled_s"]["chunked"] < 0.95 * bw["modeled_s"]["fused"]
        names = {x.name for x in p}
        assert {"_entropy_logprob_fwd_kernel", "_slice_labels_kernel", "_slice_label_fix_kernel"} <= names
        assert not {"_fwd_partials_kernel", "_bwd_dz_kernel", "dw_cast"} & names
        assert peak_extra_bytes(p) <= 0.02 * gemm.eager_peak_bytes(N, V, 2)
    assert K.plan(64, 64, 1000, "bf16", pass_="fwd+bwd").forward_variant == "fused"
    assert K.plan(N, D, V, "bf16", pass_="bwd").forward_variant is None
    assert K.plan(N, D, V, "bf16", pass_="bwd", deterministic=False).backward_variant is None  # atomic
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(L.FORWARD_ENV, "fused")
        p = K.plan(N, D, V, "bf16")
        assert p.forward_variant == "fused" and p.variants["forward"]["forced"]
        mp.setenv(L.BACKWARD_ENV, "fused")
        assert K.plan(N, D, V, "bf16", pass_="bwd").backward_variant == "fused"
        assert K.plan(N, D, V, "bf16", pass_="bwd", config=replace(K.default_config(torch.bfloat16, 90),
                                                                  backward_variant="chunked")).backward_variant \
            == "chunked"  # the config wins over the environment
        mp.setenv(L.BACKWARD_ENV, "tiled")
        with pytest.raises(ValueError, match=f"^{L.BACKWARD_ENV}='tiled': set it to one of fused, chunked"):
            K.plan(N, D, V, "bf16", pass_="bwd")
    with pytest.raises(ValueError, match="forward_variant must be None or one of"):
        replace(K.default_config(torch.bfloat16), forward_variant="tiled")
    from benchmarks import roofline as RL

    row = RL.model_row("linear_entropy_logprob", "triton", "fwd+bwd", N, D, V, "bf16", "h200")
    assert row["modeled_s"] == pytest.approx(sum(v["modeled_s"]["chunked"] for v in row["variants"].values()))
    assert all(x.endswith("-> chunked (faster by the model)") for x in RL.variant_lines([row]))


_SLICE_COMPILE_SCRIPT = r"""
import json, sys
from hero_kernels.backends.triton import slice_label as S
from hero_kernels.gpu_compile import triton_resource_usage
print(json.dumps([triton_resource_usage(fn, sig, const, int(sys.argv[1]), w, s, desc, S.compile_attrs(fn, sig)).as_dict()
                  for fn, sig, const, w, s, desc in S.KERNEL_CONFIGS]))
"""


@pytest.mark.slow
@pytest.mark.skipif(K is None, reason="triton missing")
@pytest.mark.parametrize("cc", [80, 90])
def test_gpu_compile_slice_label_kernels_no_spills(cc):
    """The chunked design's own builds (the slice-label kernels, the row backward with fp32 logits in and 16-bit
    dz out) compile for sm_80 / sm_90a without spills (STACK / LOCAL 0)."""
    require_compiler()
    rows = run_json_script(_SLICE_COMPILE_SCRIPT, str(cc), timeout=900)
    from hero_kernels.backends.triton import slice_label as S

    assert len(rows) == len(S.KERNEL_CONFIGS)
    spills = [u for u in rows if u["local_bytes"] or u["stack_bytes"]]
    assert not spills, spills
