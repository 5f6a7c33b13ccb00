"""grad_sketch / linear_grad_sketch against a float64 oracle written here, on every backend that runs on this machine
(Triton through the interpreter on CPU), with awkward inputs: odd V and k, -inf vocabulary columns, masked rows,
temperature, huge logit offsets, a dominant label, non-contiguous views, random upstream gradients.

Acceptance: error vs float64 <= 2 x the error of the same computation done by PyTorch in the input dtype, plus a
small floor (outputs are fp32 for every input dtype, so the fp32 floor applies to bf16 inputs too).
"""
import os
import subprocess
import sys

import pytest
import torch

import hero_kernels as hk
from gpu_compile_support import require_compiler, run_json_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ["torch", "cpu", "triton"]
# Triton runs on CUDA when there is a GPU, else in the interpreter on CPU tensors (tests/conftest.py)
_TRITON_DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"


def _dev(impl):
    return _TRITON_DEV if impl == "triton" else "cpu"


def sketch(z, y, P, impl, **kw):
    """grad_sketch on the impl's device; inputs / output moved with differentiable .to (grads reach CPU leaves)."""
    d = _dev(impl)
    return hk.grad_sketch(z.to(d), y.to(d), P.to(d), impl=impl, **kw).cpu()


def lsketch(h, W, y, P, impl, bias=None, **kw):
    d = _dev(impl)
    b = None if bias is None else bias.to(d)
    return hk.linear_grad_sketch(h.to(d), W.to(d), y.to(d), P.to(d), bias=b, impl=impl, **kw).cpu()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # discarded tl.where branches (interpreter)


# ----------------------------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------------------------
def oracle(z, y, P, tau=1.0, ignore_index=-100, dtype=torch.float64):
    """a [N, k] = (1/tau)(P[:, y] - P softmax(z/tau)) in ``dtype``, masked rows 0; differentiable (autograd)."""
    valid = y != ignore_index
    x = z.to(dtype) / tau
    p = torch.softmax(x, dim=-1)
    Pd = P.to(dtype)
    a = (Pd[:, torch.where(valid, y, 0)].t() - p @ Pd.t()) / tau
    return torch.where(valid[:, None], a, torch.zeros_like(a))


def oracle_grad(z, y, P, v, tau=1.0, ignore_index=-100):
    """Closed form dz_l = -(p_l / tau^2)(P[:, l] . v - (P p) . v), float64, masked rows 0."""
    x = z.double() / tau
    p = torch.softmax(x, dim=-1)
    w = v.double() @ P.double()
    dz = -(p / tau**2) * (w - (p * w).sum(-1, keepdim=True))
    return torch.where((y != ignore_index)[:, None], dz, torch.zeros_like(dz))


def _case(N=13, V=301, k=37, dtype=torch.float32, n_masked=3, neg_inf_cols=(0, 7, 300), scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * scale
    z[:, list(neg_inf_cols)] = float("-inf")
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.isin(y, torch.tensor(neg_inf_cols))] = 1  # a -inf label would have p_y = 0 (log p = -inf)
    y[torch.randperm(N, generator=g)[:n_masked]] = -100
    P = torch.randn(k, V, generator=g) / k**0.5
    v = torch.randn(N, k, generator=g)
    return z.to(dtype), y, P, v


def _bound(ours, exact, same_dtype, floor):
    err = (ours.double() - exact).abs().max().item()
    ref = (same_dtype.double() - exact).abs().max().item()
    assert err <= 2 * ref + floor, f"error {err:.3g} > 2 x same-dtype PyTorch error {ref:.3g} + {floor:g}"


def _run(z, y, P, v, impl, **kw):
    zz = z.detach().clone().requires_grad_(True)
    a = sketch(zz, y, P, impl, **kw)
    (a * v).sum().backward()
    return a, zz.grad


# ----------------------------------------------------------------------------------------------
# the math
# ----------------------------------------------------------------------------------------------
def test_closed_form_backward_matches_float64_autograd():
    """dz_l = -(p_l/tau^2)(P[:, l].v - (P p).v): no label term (P[:, y] does not depend on z)."""
    z, y, P, v = _case(dtype=torch.float64, neg_inf_cols=())
    z.requires_grad_(True)
    (oracle(z, y, P, 0.6) * v.double()).sum().backward()
    torch.testing.assert_close(z.grad, oracle_grad(z.detach(), y, P, v, 0.6), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# grad_sketch on every backend
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau,k", [(1.0, 37), (0.7, 140)])  # k = 140 > 128: the Triton k split
def test_values_and_grads(impl, dtype, tau, k):
    z, y, P, v = _case(k=k, dtype=dtype)
    a, dz = _run(z, y, P, v, impl, temperature=tau)
    assert a.dtype == torch.float32 and a.shape == (13, k) and dz.dtype == dtype
    exact = oracle(z, y, P, tau)
    _bound(a, exact, oracle(z, y, P, tau, dtype=dtype), 2e-6)
    g_exact = oracle_grad(z, y, P, v, tau)
    zs = z.detach().clone().requires_grad_(True)
    (oracle(zs, y, P, tau, dtype=dtype) * v.to(dtype)).sum().backward()
    _bound(dz, g_exact, zs.grad, 4e-6 if dtype == torch.float32 else 2 * 2.0**-8 * g_exact.abs().max().item())
    masked = y == -100
    assert (a[masked] == 0).all() and (dz[masked] == 0).all()
    assert torch.isfinite(dz).all() and (dz[:, [0, 7, 300]] == 0).all()  # -inf columns: p = 0


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_proj_and_temperature(impl):
    """A 16-bit proj (the Triton kernel dots in bf16 with fp32 accumulation): within bf16 rounding of proj."""
    z, y, P, v = _case(dtype=torch.bfloat16, k=64)
    Pb = P.to(torch.bfloat16)
    a, dz = _run(z, y, Pb, v, impl, temperature=1.3)
    exact = oracle(z, y, Pb, 1.3)
    scale = exact.abs().max().item()
    assert (a.double() - exact).abs().max().item() <= 2 * 2.0**-8 * scale
    g = oracle_grad(z, y, Pb, v, 1.3)
    assert (dz.double() - g).abs().max().item() <= 4 * 2.0**-8 * g.abs().max().item()


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_offsets_and_dominant_label(impl):
    z, y, P, v = _case(N=6, V=257, k=33, n_masked=1, neg_inf_cols=())
    z = z + 1.0e4  # online rescaling must not overflow
    valid = (y != -100).nonzero().flatten()
    z[valid[0], y[valid[0]]] += 60.0  # p_y -> 1: a -> 0, dz -> 0
    a, dz = _run(z, y, P, v, impl)
    exact = oracle(z, y, P)
    _bound(a, exact, oracle(z, y, P, dtype=torch.float32), 1e-5)
    assert a[valid[0]].abs().max() < 1e-5
    _bound(dz, oracle_grad(z, y, P, v), oracle_grad(z, y, P, v), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_non_contiguous_views(impl):
    """[B, T, V] causal-shift view (not flattenable) and a non-unit last-dim stride."""
    B, T, V, k = 3, 6, 129, 17
    d = _dev(impl)
    base = torch.randn(B, T + 1, V, device=d) * 2
    y = torch.randint(0, V, (B, T))
    y[0, :2] = -100
    P = torch.randn(k, V)
    v = torch.randn(B, T, k)
    zz = base[:, :-1].cpu()
    x = zz.clone().requires_grad_(True)
    a = hk.grad_sketch(base[:, :-1], y.to(d), P.to(d), impl=impl).cpu()  # the view itself, on the impl's device
    assert a.shape == (B, T, k)
    torch.testing.assert_close(a.double(), oracle(zz.reshape(-1, V), y.reshape(-1), P).view(B, T, k), atol=2e-6,
                               rtol=0)
    (sketch(x, y, P, impl) * v).sum().backward()
    torch.testing.assert_close(x.grad.double().reshape(-1, V), oracle_grad(zz.reshape(-1, V), y.reshape(-1), P,
                                                                           v.reshape(-1, k)), atol=4e-6, rtol=0)
    wide = torch.randn(5, 2 * V, device=d)
    a2 = hk.grad_sketch(wide[:, ::2], y[0, :5].to(d), P.to(d), impl=impl).cpu()  # last-dim stride 2: copied
    torch.testing.assert_close(a2.double(), oracle(wide[:, ::2].cpu(), y[0, :5], P), atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_and_k128(impl):
    """ignore_index = 3 masks label-3 rows only; k = 128 is one Triton k block (hero.omnex's default k1)."""
    z, y, P, v = _case(N=9, V=131, k=128, n_masked=0, neg_inf_cols=())
    y[[0, 4]] = 3
    a, dz = _run(z, y, P, v, impl, ignore_index=3)
    torch.testing.assert_close(a.double(), oracle(z, y, P, ignore_index=3), atol=2e-6, rtol=0)
    torch.testing.assert_close(dz.double(), oracle_grad(z, y, P, v, ignore_index=3), atol=4e-6, rtol=0)
    assert (a[[0, 4]] == 0).all() and (a[1] != 0).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_all_ignored(impl):
    P = torch.randn(5, 11)
    z = torch.randn(0, 11, requires_grad=True)
    a = sketch(z, torch.zeros(0, dtype=torch.long), P, impl)
    assert a.shape == (0, 5)
    z = torch.randn(4, 11, requires_grad=True)
    a = sketch(z, torch.full((4,), -100), P, impl)
    a.sum().backward()
    assert (a == 0).all() and (z.grad == 0).all()


def test_float64_torch_path_is_float64_accurate():
    z, y, P, v = _case(dtype=torch.float64)
    for impl in ("torch", "cpu"):
        a, dz = _run(z, y, P, v, impl, temperature=0.9)
        torch.testing.assert_close(a.double(), oracle(z, y, P, 0.9), atol=1e-6, rtol=0)  # fp32 output
        # upstream grads arrive as fp32 (the output's dtype); dz is computed in float64 from them
        torch.testing.assert_close(dz, oracle_grad(z, y, P, v.float(), 0.9), atol=1e-12, rtol=1e-10)


def test_torch_compile_fullgraph():
    z, y, P, v = _case(V=29, k=8, neg_inf_cols=())

    def f(z, h, W):
        return (hk.grad_sketch(z, y, P, temperature=0.8, impl="torch") * v).sum() + \
            (hk.linear_grad_sketch(h, W, y, P, temperature=0.8, impl="torch") * v).sum()

    h, W = torch.randn(13, 6), torch.randn(29, 6)
    args = [t.clone().requires_grad_(True) for t in (z, h, W)]
    args_c = [t.clone().requires_grad_(True) for t in (z, h, W)]
    f(*args).backward()
    out = torch.compile(f, fullgraph=True)(*args_c)
    out.backward()
    torch.testing.assert_close(out, f(z, h, W))
    for a, b in zip(args, args_c):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------------------------
# linear_grad_sketch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_values_and_grads(impl, bias):
    N, D, V, k = 11, 24, 203, 19
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g) / D**0.5 * 2
    b = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[[1, 6]] = -100
    P = torch.randn(k, V, generator=g)
    v = torch.randn(N, k, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (h, W) + ((b,) if bias else ())]
    a = lsketch(leaves[0], leaves[1], y, P, impl, bias=leaves[2] if bias else None, temperature=0.8)
    (a * v).sum().backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (h, W) + ((b,) if bias else ())]
    z = ref_leaves[0] @ ref_leaves[1].t() + (ref_leaves[2] if bias else 0)
    exact = oracle(z, y, P, 0.8)
    (exact * v.double()).sum().backward()
    torch.testing.assert_close(a.double(), exact.detach(), atol=5e-6, rtol=0)
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=2e-5, rtol=1e-5)
    assert (leaves[0].grad[[1, 6]] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_bf16_and_frozen_head(impl):
    """bf16 hidden / weight, a frozen LM head (no dW). Against the float64 oracle of the exact logits of the bf16
    inputs, within 2x eager PyTorch (bf16 logits, fp32 sketch): the chunked paths see bf16-rounded logits like
    eager, the fused Triton kernels keep fp32 logits and dot in bf16 (proj, e, v rounded)."""
    N, D, V, k = 9, 32, 130, 16
    h = torch.randn(2, N, D).to(torch.bfloat16).requires_grad_(True)
    W = (torch.randn(V, D) / D**0.5 * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (2, N))
    P = torch.randn(k, V)
    v = torch.randn(2, N, k)
    a = lsketch(h, W, y, P, impl)
    (a * v).sum().backward()
    assert a.shape == (2, N, k) and h.grad.dtype == torch.bfloat16 and W.grad is None
    yf, vf = y.reshape(-1), v.reshape(-1, k)
    z = h.detach().double().reshape(-1, D) @ W.double().t()  # exact logits of the bf16 inputs
    z16 = (h.detach() @ W.t()).reshape(-1, V)  # eager: bf16 logits, fp32 sketch
    _bound(a.reshape(-1, k), oracle(z, yf, P), oracle(z16, yf, P, dtype=torch.float32), 1e-5)
    he = h.detach().clone().requires_grad_(True)
    (oracle((he @ W.t()).reshape(-1, V), yf, P, dtype=torch.float32) * vf).sum().backward()
    dh = (oracle_grad(z, yf, P, vf) @ W.double()).reshape(2, N, D)
    _bound(h.grad, dh, he.grad, 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_chunks(impl, monkeypatch):
    """Tiny chunk budgets: the row ranges (torch) and the LM-head row chunks (every backend) split the rows."""
    from hero_kernels.backends.cpu import linear_grad_sketch as lin_cpu
    from hero_kernels.backends.torch import grad_sketch as rows_torch
    from hero_kernels.backends.triton.linear import sketch_launch

    monkeypatch.setattr(rows_torch, "CHUNK_ELEMENTS", 3 * 41)
    monkeypatch.setattr(lin_cpu, "CHUNK_ELEMENTS", 3 * 41)
    small = _fused_cfg(chunk_rows=3, forward_variant="chunked", backward_variant="chunked")  # the chunked designs
    monkeypatch.setattr(sketch_launch, "default_sketch_config", lambda dtype, arch=None: small)
    z, y, P, v = _case(N=10, V=41, k=7, neg_inf_cols=())
    a, dz = _run(z, y, P, v, impl)
    torch.testing.assert_close(a.double(), oracle(z, y, P), atol=2e-6, rtol=0)
    torch.testing.assert_close(dz.double(), oracle_grad(z, y, P, v), atol=4e-6, rtol=0)
    h = torch.randn(10, 6, requires_grad=True)
    W = torch.randn(41, 6, requires_grad=True)
    (lsketch(h, W, y, P, impl) * v).sum().backward()
    hd, Wd = h.detach().double().requires_grad_(True), W.detach().double().requires_grad_(True)
    (oracle(hd @ Wd.t(), y, P) * v.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), hd.grad, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(W.grad.double(), Wd.grad, atol=2e-5, rtol=1e-5)


def test_linear_float64_and_impl_agreement():
    N, D, V, k = 7, 5, 33, 6
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    P = torch.randn(k, V, dtype=torch.float64)
    v = torch.randn(N, k, dtype=torch.float64)
    gs = torch.autograd.grad((hk.linear_grad_sketch(h, W, y, P, impl="torch") * v).sum(), (h, W))
    gr = torch.autograd.grad((oracle(h @ W.t(), y, P) * v.float().double()).sum(), (h, W))
    for a, b in zip(gs, gr):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# the fused Triton head (hero_kernels/backends/triton/linear/sketch_*.py), small tiles so one problem covers
# several vocab splits, row blocks, sketch blocks (k > block_p) and backward chunks
# ----------------------------------------------------------------------------------------------
def _fused_cfg(**kw):
    from hero_kernels.backends.triton.linear.config import LinearSketchConfig, Tile

    base = dict(fwd=Tile(16, 32, 16), dz=Tile(16, 32, 16), block_p=16, vocab_splits=3, chunk_rows=7)
    return LinearSketchConfig(**dict(base, **kw))


def _head_case(dtype, bias, N=19, D=37, V=211, k=21, tau=0.7, offset=0.0, seed=5):
    """Odd D / V / k, masked rows, -inf bias entries (a whole first vocab tile and a masked LABEL column), a
    dominant label (p_y -> 1), a logit offset, random upstream grads; hidden a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g) * (2 / D**0.5)
    y = torch.randint(40, V, (N,), generator=g)
    y[[2, 11]] = -100
    hb = torch.randn(2 * N, D + 3, generator=g)
    hb[12, :D] = W[y[6]] * 15.0  # hidden row 6  # x_y ~ 60, the others ~ +-10: p_y = 1 - O(e^-30)
    h = hb[::2, :D]  # row stride 2 (D + 3), not contiguous
    b = torch.randn(V, generator=g) + offset if bias else None
    if bias:
        b[:32] = float("-inf")  # the first tile of the first split: all -inf
        b[y[4]] = float("-inf")  # a masked label: p_y = 0
    P = torch.randn(k, V, generator=g) / k**0.5
    v = torch.randn(N, k, generator=g)
    return h.to(dtype), W.to(dtype), None if b is None else b.to(dtype), y, P, v, tau


def _head_ref(h, W, b, y, P, v, tau, dtype):
    """(a, dh, dW, db) by autograd with the logits z = h W^T + b computed in ``dtype`` (float64: the oracle;
    the input dtype: eager PyTorch, whose sketch is then taken in fp32)."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (h, W) + ((b,) if b is not None else ())]
    z = leaves[0] @ leaves[1].t() + (leaves[2] if b is not None else 0)
    a = oracle(z, y, P, tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    (a * v.to(a.dtype)).sum().backward()
    return [a.detach()] + [t.grad for t in leaves]


_SKETCH_PAIRS = [("fused", "fused"), ("chunked", "chunked"), ("chunked", "fused"), ("fused", "chunked")]
_SKETCH_CASES = [(bias, off, f, b) for bias, off in ((False, 0.0), (True, 0.0), (True, 1.0e3)) for f, b in _SKETCH_PAIRS]


@pytest.mark.parametrize("dtype,bias,offset,fwd,bwd", [
    # `make test` runs every 3rd case, rotated per dtype, which still pairs each forward design with each
    # backward design once per dtype; all 24 run under `make test-all`
    pytest.param(dt, *case, marks=[] if (i + j) % 3 == 0 else [pytest.mark.slow])
    for i, dt in enumerate((torch.float32, torch.bfloat16)) for j, case in enumerate(_SKETCH_CASES)
])
def test_fused_head_awkward_inputs(dtype, bias, offset, fwd, bwd):
    """Every pairing of the forward and backward designs (forced by the config: each backward takes either
    forward's saved stats) vs the float64 oracle, within 2x eager PyTorch in the input dtype (+ a floor)."""
    from hero_kernels.backends.triton.linear import sketch_launch as SL
    from hero_kernels.options import RowOptions

    h, W, b, y, P, v, tau = _head_case(dtype, bias, offset=offset)
    opts, cfg = RowOptions(tau), _fused_cfg(forward_variant=fwd, backward_variant=bwd)
    p = SL.plan(h.shape[0], h.shape[1], W.shape[0], dtype, k=P.shape[0], pass_="fwd+bwd", config=cfg)
    assert (p.forward_variant, p.backward_variant) == (fwd, bwd)
    a, stats = SL.forward(h, W, b, y, P, opts, cfg)
    grads = SL.backward(h, W, b, y, P, a, stats, v, opts, config=cfg)
    exact = _head_ref(h, W, b, y, P, v, tau, torch.float64)
    eager = _head_ref(h, W, b, y, P, v, tau, dtype)
    masked = y == -100
    assert (a[masked] == 0).all() and (grads[0][masked] == 0).all()
    assert a[6].abs().max() < 1e-4  # p_y -> 1: a -> 0
    floor = 2e-6 if dtype == torch.float32 else 1e-4
    for name, ours, ex, ea in zip(("a", "dh", "dW", "db"), [a] + list(grads), exact, eager):
        if ex is None:
            assert ours is None
            continue
        assert ours.dtype == (torch.float32 if name == "a" else dtype) and torch.isfinite(ours).all(), name
        _bound(ours, ex, ea, floor * max(1.0, ex.abs().max().item()))
    if bias:
        assert (grads[2][:32] == 0).all() and (grads[1][:32] == 0).all()  # -inf columns: p = 0


@pytest.mark.parametrize("variant", ["fused", "chunked"])
def test_fused_head_uncompacted_rows_and_one_chunk(monkeypatch, variant):
    """Without the masked-row compaction (CUDA graph capture) the masked rows are computed and zeroed; one
    sketch block (k <= block_p), one backward chunk, need_dh only. The design forced by the environment."""
    from hero_kernels.backends.triton.linear import launch, sketch_launch as SL
    from hero_kernels.options import RowOptions

    monkeypatch.setenv(SL.FORWARD_ENV, variant)
    monkeypatch.setenv(SL.BACKWARD_ENV, variant)
    h, W, b, y, P, v, tau = _head_case(torch.float32, True, k=16)
    opts, cfg = RowOptions(tau), _fused_cfg(chunk_rows=None, vocab_splits=None)
    p = SL.plan(h.shape[0], h.shape[1], W.shape[0], "fp32", k=16, pass_="fwd+bwd", config=cfg)
    assert p.forward_variant == p.backward_variant == variant
    a0, s0 = SL.forward(h, W, b, y, P, opts, cfg)
    dh0, _, _ = SL.backward(h, W, b, y, P, a0, s0, v, opts, config=cfg)
    monkeypatch.setattr(launch, "compact_rows", lambda labels, ignore_index: None)
    a1, s1 = SL.forward(h, W, b, y, P, opts, cfg)
    dh1, dW1, db1 = SL.backward(h, W, b, y, P, a1, s1, v, opts, need_dw=False, config=cfg)
    assert dW1 is None and db1 is None
    torch.testing.assert_close(a1, a0, atol=1e-6, rtol=0)
    torch.testing.assert_close(dh1, dh0, atol=1e-6, rtol=0)
    assert (dh1[y == -100] == 0).all() and torch.isfinite(dh1).all()


def test_fused_head_nan_row():
    """NaN in one row's hidden state gives that row a NaN sketch and leaves the other rows exact."""
    from hero_kernels.backends.triton.linear import sketch_launch as SL
    from hero_kernels.options import RowOptions

    h, W, b, y, P, v, tau = _head_case(torch.float32, True, k=16)
    h = h.clone()
    h[3, 5] = float("nan")
    a, _ = SL.forward(h, W, b, y, P, RowOptions(tau), _fused_cfg())
    assert torch.isnan(a[3]).all()
    ok = torch.arange(h.shape[0]) != 3
    exact = _head_ref(h[ok], W, b, y[ok], P, v[ok], tau, torch.float64)[0]
    torch.testing.assert_close(a[ok].double(), exact, atol=2e-6, rtol=0)


def test_fused_plan_is_what_runs():
    """plan() gives the grids the launchers use; the headline shape's forward has vocab splits and one sketch
    block, the backward equal chunks of the dz kernel + cuBLAS dh / dW."""
    from dataclasses import replace

    from hero_kernels.backends.triton import linear_grad_sketch as L

    fused = replace(L.default_sketch_config(torch.bfloat16, 90), forward_variant="fused", backward_variant="fused")
    fwd = L.plan(16384, 4096, 151936, "bf16", pass_="fwd", config=fused)
    part = next(x for x in fwd if x.name == "_sketch_fwd_partials_kernel")
    assert part.meta["splits"] > 1 and part.grid[1] == 1 and part.l2_bytes > 0
    bwd = L.plan(16384, 4096, 151936, "bf16", pass_="bwd", config=fused)
    names = [x.name for x in bwd]
    assert "_sketch_bwd_dz_kernel" in names and "cublas_dh" in names and "cublas_dw" in names
    assert L.plan(16384, 4096, 151936, "bf16", k=300, pass_="fwd", config=fused)[1].grid[1] == 3  # 3 sketch blocks
    rows = [x for x in L.plan(16384, 4096, 151936, "bf16", k=300, pass_="fwd") if x.name == "grad_sketch._fwd_kernel"]
    assert rows and all(x.grid[1] == 3 for x in rows)  # the chunked forward: 3 k blocks of the row kernel
    assert L.plan(100, 64, 1000, "bf16", pass_="bwd", need_dh=False, need_dw=False) == []


def test_sketch_designs_priced_with_torchs_tf32_flag(monkeypatch):
    """fp32 under torch's cuBLAS TF32 flag: the chunked designs' cuBLAS GEMMs run on tensor cores, so the plan
    picks each pass's design at those prices (it priced them at the FMA peak: the fused backward, modeled 2.3x
    slower than the chunked one at the headline shape); the launchers plan with the flag (fp32 only)."""
    from hero_kernels.backends.triton.linear import sketch_launch as SL
    from hero_kernels.options import RowOptions

    N, D, V = 16384, 4096, 128256
    assert SL.plan(N, D, V, "fp32", pass_="bwd").backward_variant == "fused"
    p = SL.plan(N, D, V, "fp32", pass_="bwd", tf32=True)
    assert p.backward_variant == "chunked"
    assert p.variants["backward"]["modeled_s"]["chunked"] < 0.5 * p.variants["backward"]["modeled_s"]["fused"]
    seen, real = [], SL.plan
    monkeypatch.setattr(SL, "plan", lambda *a, **k: seen.append(k.get("tf32")) or real(*a, **k))
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (True, False):
            matmul.allow_tf32 = flag
            h, W, b, y, P, v, tau = _head_case(torch.float32, True, k=16)
            seen.clear()
            a, st = SL.forward(h, W, b, y, P, RowOptions(tau), _fused_cfg())
            SL.backward(h, W, b, y, P, a, st, v, RowOptions(tau), config=_fused_cfg())
            assert seen == [flag] * 2, (flag, seen)
    finally:
        matmul.allow_tf32 = before


def test_plan_picks_the_faster_designs():
    """Pure Python: the roofline model picks the chunked forward and backward (cuBLAS fp32 logits + the row
    kernels) at the headline shape, where the fused kernels' tl.dot tiles are L2-bound; tiny shapes stay fused
    (fewer launches). The config and the environment force a design; a bad value names the variable."""
    from hero_kernels.backends.triton.linear import sketch_launch as SL

    for gpu in ("h100", "h200"):
        p = SL.plan(16384, 4096, 151936, "bf16", pass_="fwd+bwd", gpu=gpu)
        fw, bw = p.variants["forward"], p.variants["backward"]
        assert (p.forward_variant, p.backward_variant) == ("chunked", "chunked") and not fw["forced"]
        assert fw["modeled_s"]["chunked"] < 0.6 * fw["modeled_s"]["fused"]
        assert bw["modeled_s"]["chunked"] < 0.95 * bw["modeled_s"]["fused"]
        names = [x.name for x in p]
        assert "grad_sketch._bwd_kernel" in names and "_sketch_fwd_partials_kernel" not in names
    assert SL.plan(64, 64, 1000, "bf16", pass_="fwd+bwd").variants["forward"]["pick"] == "fused"
    assert SL.plan(16384, 4096, 151936, "bf16", pass_="bwd").forward_variant is None
    forced = SL.plan(16384, 4096, 151936, "bf16", config=_fused_cfg(forward_variant="fused", chunk_rows=None,
                                                                   vocab_splits=None))
    assert forced.forward_variant == "fused" and forced.variants["forward"]["forced"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SL.BACKWARD_ENV, "fused")
        assert SL.plan(16384, 4096, 151936, "bf16", pass_="bwd").backward_variant == "fused"
        mp.setenv(SL.FORWARD_ENV, "tiled")
        with pytest.raises(ValueError, match=SL.FORWARD_ENV):
            SL.plan(16384, 4096, 151936, "bf16")
    with pytest.raises(ValueError, match="backward_variant"):
        _fused_cfg(backward_variant="tiled")
    from benchmarks import roofline as RL  # the roofline row shows both designs of each pass and the picks

    row = RL.model_row("linear_grad_sketch", "triton", "fwd", 16384, 4096, 151936, "bf16", "h200")
    assert row["modeled_s"] == pytest.approx(row["variants"]["forward"]["modeled_s"]["chunked"])
    assert RL.variant_lines([row])[0].endswith("-> chunked (faster by the model)")


_NO_ORACLE_SCRIPT = r"""
import sys, torch, hero_kernels as hk
for impl in ("torch", "cpu", "triton"):
    z = torch.randn(5, 33, requires_grad=True); h = torch.randn(5, 4, requires_grad=True)
    W = torch.randn(33, 4, requires_grad=True); y = torch.tensor([1, -100, 3, 4, 32]); P = torch.randn(6, 33)
    (hk.grad_sketch(z, y, P, impl=impl).sum() + hk.linear_grad_sketch(h, W, y, P, impl=impl).sum()).backward()
import hero.omnex
assert "hero_kernels.reference" not in sys.modules, "production code imported the test oracle"
assert "transformers" not in sys.modules, "import hero.omnex loaded transformers"
print("ok")
"""


def test_production_never_imports_the_reference():
    """Both ops on every CPU backend (forward + backward), and importing hero.omnex, load neither the float64
    oracle (hero_kernels.reference) nor transformers."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _NO_ORACLE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    z, y = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="proj must be \\[k, V\\]"):
        hk.grad_sketch(z, y, torch.randn(10, 4))
    with pytest.raises(ValueError, match="proj must be \\[k, V\\]"):
        hk.grad_sketch(z, y, torch.randn(10))
    with pytest.raises(TypeError, match="proj must have dtype"):
        hk.grad_sketch(z, y, torch.ones(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        hk.grad_sketch(z, y[:3], torch.randn(3, 10))
    with pytest.raises(ValueError, match="labels out of range"):
        hk.grad_sketch(z, y + 10, torch.randn(3, 10))
    with pytest.raises(ValueError, match="temperature"):
        hk.grad_sketch(z, y, torch.randn(3, 10), temperature=0.0)
    with pytest.raises(ValueError, match="impl='cuda'"):
        hk.grad_sketch(z, y, torch.randn(3, 10), impl="cuda")
    with pytest.raises(ValueError, match="weight must be \\[V, D\\]"):
        hk.linear_grad_sketch(torch.randn(4, 6), torch.randn(10, 5), y, torch.randn(3, 10))
    with pytest.raises(ValueError, match="proj must be \\[k, V\\]"):
        hk.linear_grad_sketch(torch.randn(4, 6), torch.randn(10, 6), y, torch.randn(3, 11))
    with pytest.raises(ValueError, match="bias must be \\[V\\]"):
        hk.linear_grad_sketch(torch.randn(4, 6), torch.randn(10, 6), y, torch.randn(3, 10), bias=torch.randn(9))


# ----------------------------------------------------------------------------------------------
# GPU compile check (no GPU needed): every Triton build for sm_80 and sm_90a, aligned or not, no spills
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json
from hero_kernels.backends.triton import grad_sketch as K
from hero_kernels.gpu_compile import triton_resource_usage
rows = []
for fn, sig, const, nw, ns, desc in K.KERNEL_CONFIGS:
    for cc in (80, 90):
        for attrs in (None, K.compile_attrs(fn, sig)):  # odd V (unaligned) and LM shapes (16-divisible)
            rows.append(triton_resource_usage(fn, sig, const, cc=cc, num_warps=nw, num_stages=ns, config=desc,
                                              attrs=attrs).as_dict())
print(json.dumps(rows))
"""


def test_gpu_compile_no_spills():
    """triton.compile needs real JIT functions (TRITON_INTERPRET=1 replaces them): run in a subprocess without it."""
    require_compiler()
    from hero_kernels.backends.triton import grad_sketch as K

    rows = run_json_script(_COMPILE_SCRIPT, timeout=1200)
    assert len(rows) == 4 * len(K.KERNEL_CONFIGS)
    spills = [u for u in rows if u["local_bytes"] != 0 or u["stack_bytes"] != 0]
    assert not spills, f"local-memory spills: {spills}"


@pytest.mark.slow  # 38 builds, minutes of CPU
def test_fused_sketch_compile_no_spills():
    """Every build of the fused sketch (forward partials, merge, dz; each dtype, bias, arch it runs on) compiles
    for sm_80 / sm_90a without local-memory spills, and its bf16 GEMM kernels use wgmma on sm_90a."""
    require_compiler()
    from hero_kernels.backends.triton.linear import compile as C

    script = r"""
import json
from hero_kernels.backends.triton.linear import compile as C
from hero_kernels.gpu_compile import triton_compile, triton_resource_usage
rows = [triton_resource_usage(fn, sig, const, cc, nw, ns, config=desc, attrs=C.compile_attrs(fn, sig)).as_dict()
        for fn, sig, const, nw, ns, desc, archs in C.SKETCH_KERNEL_CONFIGS for cc in archs]
wgmma = {desc: triton_compile(fn, sig, const, 90, nw, ns, C.compile_attrs(fn, sig)).asm["ptx"].count("wgmma.mma_async")
         for fn, sig, const, nw, ns, desc, archs in C.SKETCH_KERNEL_CONFIGS
         if " bf16 bias=False " in desc and 90 in archs}
print(json.dumps({"rows": rows, "wgmma": wgmma}))
"""
    out = run_json_script(script, timeout=3000)
    rows = out["rows"]
    for u in rows:
        print(f"{u['config']:90s} {u['arch']:7s} registers={u['registers']:3d} shared={u['shared_bytes']:6d} "
              f"stack={u['stack_bytes']}")
    assert len(rows) == sum(len(e[6]) for e in C.SKETCH_KERNEL_CONFIGS)
    spills = [u for u in rows if u["local_bytes"] != 0 or u["stack_bytes"] != 0]
    assert not spills, f"local-memory spills: {spills}"
    assert {d.split()[0] for d in out["wgmma"]} == {"_sketch_fwd_partials_kernel", "_sketch_bwd_dz_kernel"}
    assert all(n > 0 for n in out["wgmma"].values()), out["wgmma"]


# ----------------------------------------------------------------------------------------------
# impl="cpu": the C++ kernel (csrc/grad_sketch_cpu.cpp) past its row block (128 rows) and vocabulary tile (1024)
# ----------------------------------------------------------------------------------------------
def _cpu_case(dtype, N=301, V=2309, k=37, seed=3):
    """Several row blocks and vocabulary tiles (odd sizes), with rows whose max moves to a later tile (the
    online rescaling), -inf columns covering a whole tile, p -> 1, a +1e3 offset, masked rows."""
    z, y, P, v = _case(N=N, V=V, k=k, dtype=torch.float32, n_masked=40, neg_inf_cols=(0, 7, 1500, V - 1), seed=seed)
    z[1] += torch.linspace(0, 30, V)  # the max moves right every tile: U rescaled each time
    z[2, :1100] = float("-inf")  # the first tile and part of the second fully masked
    z[3] += 1.0e3  # large common offset
    z[4, 2000] = 40.0  # p -> 1 on a column of the last tile...
    y[4] = 2000  # ...that is the label
    z[5, torch.isfinite(z[5])] = 0.0  # all ties
    for i in (1, 2, 3, 4, 5):
        y[i] = y[i] if y[i] != -100 else 1500 + i
    return z.to(dtype), y, P, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_cpu_kernel_blocks_tiles_and_awkward_rows(dtype, tau):
    z, y, P, v = _cpu_case(dtype)
    a, dz = _run(z, y, P, v, "cpu", temperature=tau)
    assert a.dtype == torch.float32 and dz.dtype == dtype
    _bound(a, oracle(z, y, P, tau), oracle(z, y, P, tau, dtype=torch.float32 if dtype == torch.float16 else dtype),
           2e-6)
    g_exact = oracle_grad(z, y, P, v, tau)
    zs = z.detach().clone().requires_grad_(True)
    (oracle(zs, y, P, tau, dtype=torch.float32 if dtype == torch.float16 else dtype) * v).sum().backward()
    floor = 4e-6 if dtype == torch.float32 else 2 * 2.0**-8 * g_exact.abs().max().item()
    _bound(dz, g_exact, zs.grad, floor)
    masked = y == -100
    assert (a[masked] == 0).all() and (dz[masked] == 0).all()
    assert torch.isfinite(a).all() and torch.isfinite(dz).all() and (dz[:, [0, 7, 1500, 2308]] == 0).all()
    assert (dz[2, :1100] == 0).all()
    assert a[4].abs().max() < 1e-5 and dz[4].abs().max() < 1e-5  # p -> 1: a -> 0, dz -> 0


def test_cpu_kernel_threads_agree_and_inplace():
    """One thread vs the default thread count give the same bits (rows are independent), and the backward may
    write over the logits (the fused LM-head path does)."""
    from hero_kernels.backends.cpu import grad_sketch as cpu_rows
    from hero_kernels.options import RowOptions

    z, y, P, v = _cpu_case(torch.float32)
    opts = RowOptions(0.9, -100)
    a, st = cpu_rows.forward(z, y, P, opts)
    dz = cpu_rows.backward(z, y, P, a, st, v, opts)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a1, st1 = cpu_rows.forward(z, y, P, opts)
        dz1 = cpu_rows.backward(z, y, P, a1, st1, v, opts)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, a1) and torch.equal(st, st1) and torch.equal(dz, dz1)
    zi = z.clone()
    assert cpu_rows.backward(zi, y, P, a, st, v, opts, out=zi) is zi and torch.equal(zi, dz)


def test_cpu_kernel_saves_a_split_float64_lse():
    """stats = (hi, lo) with hi + lo the float64 lse of x = z / tau (not the torch path's (m, log s)): at a +3e3
    offset the backward's p has no ulp(lse) error, so dz stays at the eager fp32 accuracy."""
    from hero_kernels.backends.cpu import grad_sketch as cpu_rows
    from hero_kernels.options import RowOptions

    z, y, P, v = _case(N=9, V=1500, k=16, n_masked=0, neg_inf_cols=())
    z = z + 3.0e3
    _, st = cpu_rows.forward(z, y, P, RowOptions(0.8, -100))
    lse = torch.logsumexp((z * 1.25).double(), -1)  # of the fp32-rounded x the kernel sees (1 / 0.8 is exact)
    # fp32 sums of e^{x - m} (~1e-7 relative on s), far below ulp(3.8e3) / 2 = 1.2e-4 of an fp32 lse
    assert ((st[:, 0].double() + st[:, 1].double()) - lse).abs().max() < 1e-6
    a, dz = _run(z, y, P, v, "cpu", temperature=0.8)
    zs = z.clone().requires_grad_(True)
    (oracle(zs, y, P, 0.8, dtype=torch.float32) * v).sum().backward()
    _bound(dz, oracle_grad(z, y, P, v, 0.8), zs.grad, 1e-6)


def test_cpu_non_finite_rows_and_bad_labels():
    """The non-finite contract: a NaN anywhere, a +inf or no finite column -> a NaN sketch row and a NaN gradient
    row; an out-of-range label (label check off) -> NaN rows, never a wild read; other rows unaffected."""
    V = 1100  # two tiles: the NaN / -inf handling must survive the tile boundary
    z, y, P, v = _case(N=10, V=V, k=9, n_masked=0, neg_inf_cols=())
    z[0, 5] = float("nan")
    z[1, 1050] = float("nan")  # NaN in the second tile only
    z[2, 9] = float("inf")
    z[3, :] = float("-inf")
    z[4, :1024] = float("-inf")
    z[4, 3] = float("nan")  # NaN inside an all -inf tile
    y[5], y[6] = V, -7
    with hk.checks(labels=False):
        a, dz = _run(z, y, P, v, "cpu")
    assert torch.isnan(a[:7]).all() and torch.isnan(dz[:7]).all()
    ok = torch.arange(7, 10)
    torch.testing.assert_close(a[ok].double(), oracle(z[ok], y[ok], P), atol=2e-6, rtol=0)
    torch.testing.assert_close(dz[ok].double(), oracle_grad(z[ok], y[ok], P, v[ok]), atol=4e-6, rtol=0)


def test_cpu_float64_vjp_matches_float64_autograd():
    """fp64 logits: the C++ kernel computes in fp64; for random upstream grads the backward agrees with float64
    autograd of the oracle (gradcheck-level; the sketch itself is returned in fp32) at several tiles / blocks."""
    z, y, P, v = _cpu_case(torch.float64, N=150, k=12)
    z.requires_grad_(True)
    a = hk.grad_sketch(z, y, P.double(), temperature=0.9, impl="cpu")
    (dz,) = torch.autograd.grad((a * v).sum(), z)
    zr = z.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad((oracle(zr, y, P.double(), 0.9) * v.float().double()).sum(), zr)
    torch.testing.assert_close(a.double(), oracle(z.detach(), y, P, 0.9), atol=1e-6, rtol=0)
    torch.testing.assert_close(dz, gr, atol=1e-12, rtol=1e-10)


def test_cpu_runs_the_cpp_kernel(monkeypatch):
    """impl="cpu" (and the cpu linear_grad_sketch) go through torch.ops.hero_kernels_cpp.grad_sketch_*, never
    the chunked torch row path."""
    from hero_kernels.backends.torch import grad_sketch as rows_torch

    def boom(*a, **k):
        raise AssertionError("impl='cpu' ran the torch path")

    for name in ("forward", "backward", "_softmax"):
        monkeypatch.setattr(rows_torch, name, boom)
    calls = []
    ops = torch.ops.hero_kernels_cpp
    for name in ("grad_sketch_fwd", "grad_sketch_bwd"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a), raising=False)
    z, y, P, v = _case(N=6, V=40, k=5, neg_inf_cols=())
    _run(z, y, P, v, "cpu")
    h = torch.randn(6, 4, requires_grad=True)
    W = torch.randn(40, 4, requires_grad=True)
    (lsketch(h, W, y, P, "cpu") * v).sum().backward()
    assert calls == ["grad_sketch_fwd", "grad_sketch_bwd"] * 2


@pytest.mark.parametrize("impl", ["torch", "cpu", "triton"])
def test_out_of_range_labels_give_nan_rows(impl):
    """Label check off: a label outside [0, V) gives a NaN sketch row and a NaN gradient row on every backend
    (never an indexing error or a plausible finite row); the other rows are unaffected."""
    V = 70
    z, y, P, v = _case(N=6, V=V, k=5, n_masked=1, neg_inf_cols=())
    y[0], y[1] = V, -7
    with hk.checks(labels=False):
        a, dz = _run(z, y, P, v, impl)
    assert torch.isnan(a[:2]).all() and torch.isnan(dz[:2]).all()
    ok = torch.arange(2, 6)
    ref = oracle(z[ok], y[ok], P)
    assert torch.isfinite(a[ok]).all()
    torch.testing.assert_close(a[ok].double(), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl,fwd,bwd", [("torch", "", ""), ("cpu", "", ""), ("triton", "fused", "fused"),
                                           ("triton", "chunked", "chunked"), ("triton", "fused", "chunked")])
def test_linear_out_of_range_labels_give_nan_rows(impl, fwd, bwd, monkeypatch):
    """The fused head's label guard: out-of-range labels (checks off) -> NaN sketch rows and NaN dh rows, and
    dW / db NaN (they sum over rows); in-range rows match the op with the bad rows masked instead."""
    g = torch.Generator().manual_seed(3)
    N, D, V, k = 7, 12, 53, 6
    h = torch.randn(N, D, generator=g, requires_grad=True)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    P = torch.randn(k, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[1], y[4] = V + 2, -3
    if fwd:  # both Triton designs (plan() picks per shape; force each)
        monkeypatch.setenv("HERO_KERNELS_SKETCH_FORWARD", fwd)
        monkeypatch.setenv("HERO_KERNELS_SKETCH_BACKWARD", bwd)
    with hk.checks(labels=False):
        a = hk.linear_grad_sketch(h, W, y, P, impl=impl)
        dh, dW = torch.autograd.grad(a.sum(), (h, W))
    assert torch.isnan(a[[1, 4]]).all() and torch.isnan(dh[[1, 4]]).all() and torch.isnan(dW).any()
    ym = y.clone()
    ym[[1, 4]] = -100
    ref = hk.linear_grad_sketch(h.detach(), W.detach(), ym, P, impl="torch")
    ok = [0, 2, 3, 5, 6]
    torch.testing.assert_close(a[ok], ref[ok], atol=1e-5, rtol=1e-5)
