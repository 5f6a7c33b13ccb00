"""The numerics contract of ``entropy_logprob`` on every backend, against an oracle written from the math.

Contract (README "Numerics"):
* ``-inf`` logits are masked vocabulary: partial rows, a row masked except the label, and the label itself
  masked (logp = -inf, H and every gradient finite).
* A row with NaN anywhere, a ``+inf``, or no finite column gives NaN logp AND NaN H, and a NaN gradient row;
  the other rows are unaffected.
* A label outside [0, V) that is not ``ignore_index`` gives a NaN row (no out-of-bounds read) when the
  host-side label check is off; ``checks(finite=True)`` rejects NaN / +inf and accepts -inf.
* p(label) -> 1 keeps the relative accuracy of logp, H and the label gradient; x = z / tau is rounded the
  same way in the forward and the backward (a one-hot row has p_argmax = 1, not exp(rounding residue)).

The oracle below is float64 and deliberately NOT hero_kernels.reference: it takes log p_j straight from
log p_j = -log sum_i e^{x_i - x_j} (log1p form around the row's argmax), masks -inf columns explicitly and
sums H = -sum p log p as a sum of non-negative terms.
Backends: torch, cpu (compiled extension), triton (the interpreter on CPU, TRITON_INTERPRET=1 from
conftest.py), cuda (when a GPU and the extension are present).
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import hero_kernels as hk
from hero_kernels import _cpp_build

# The interpreter evaluates both sides of every tl.where in numpy: masked (-inf) and valid inputs must not
# warn (no overflow, no inf * 0 even in a discarded branch); NaN / +inf inputs may.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _backends():
    out = ["torch"]
    if _cpp_build.cpu_available():
        out.append("cpu")
    try:
        import triton  # noqa: F401

        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            out.append("triton")
    except ImportError:
        pass
    if torch.cuda.is_available() and _cpp_build.cuda_available():
        out.append("cuda")
    return out


BACKENDS = _backends()
DEV = {"torch": "cpu", "cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu", "cuda": "cuda"}
NAN = float("nan")
INF = float("inf")


# ----------------------------------------------------------------------------------------------
# oracle (float64, from the math)
# ----------------------------------------------------------------------------------------------
def oracle(z: torch.Tensor, y: torch.Tensor, tau: float, g: torch.Tensor, k: torch.Tensor, ignore_index=-100):
    """(logp [N], H [N], dz [N, V]) in float64 for logits z [N, V] (any dtype: its values are taken as is)."""
    x = z.double().cpu() / tau
    y = y.cpu()
    g, k = g.double().cpu(), k.double().cpu()
    N, V = x.shape
    logp = torch.zeros(N, dtype=torch.float64)
    H = torch.zeros(N, dtype=torch.float64)
    dz = torch.zeros(N, V, dtype=torch.float64)
    for i in range(N):
        yi = int(y[i])
        if yi == ignore_index:
            continue
        row = x[i]
        if not (0 <= yi < V) or torch.isnan(row).any() or (row == INF).any() or not (row > -INF).any():
            logp[i], H[i] = NAN, NAN
            dz[i] = NAN
            continue
        live = row > -INF
        a = int(torch.where(live, row, torch.full_like(row, -INF)).argmax())
        # log p_j = (x_j - x_a) - log1p(sum_{i != a} e^{x_i - x_a}): no rounding of a large lse in between
        e = torch.where(live, torch.exp(row - row[a]), torch.zeros_like(row))
        rest = torch.cat([e[:a], e[a + 1:]]).sum()  # e[a] == 1 kept apart: log1p of the small rest
        logq = torch.where(live, (row - row[a]) - torch.log1p(rest), torch.full_like(row, -INF))
        p = torch.exp(logq)
        ent = -torch.where(live, p * logq, torch.zeros_like(p)).sum()
        # 1 - p_y: the sum of the other probabilities (accurate as p_y -> 1)
        one_minus_py = torch.cat([p[:yi], p[yi + 1:]]).sum()
        logp[i], H[i] = logq[yi], ent
        plogp_h = torch.where(live, p * (logq + ent), torch.zeros_like(p))
        d = -g[i] * p - k[i] * plogp_h
        d[yi] = g[i] * one_minus_py - k[i] * plogp_h[yi]
        dz[i] = d / tau
    return logp, H, dz


def run(impl, z, y, tau=1.0, g=None, k=None, inplace=False, view=None):
    """(logp, H, dlogits, g, k) of the public op on ``impl``; g / k: upstream grads [N] (random by default).

    ``view`` maps the leaf (a copy of ``z``) to the op's input (e.g. a strided slice); dlogits is the leaf's
    grad after ``view``. In place, the op gets ``leaf * 1`` (a non-leaf buffer) under the same view.
    """
    N = y.numel()
    g = torch.randn(N, dtype=torch.float64) if g is None else g
    k = torch.randn(N, dtype=torch.float64) if k is None else k
    dev = DEV[impl]
    view = view or (lambda t: t)
    leaf = z.detach().to(dev).clone().requires_grad_(True)
    src = view(leaf * 1 if inplace else leaf)
    logp, H = hk.entropy_logprob(src, y.to(dev), tau, impl=impl, inplace_backward=inplace)
    gd, kd = g.to(dev).float().view(y.shape), k.to(dev).float().view(y.shape)
    ((logp * gd).sum() + (H * kd).sum()).backward()
    return logp.detach().double().cpu(), H.detach().double().cpu(), view(leaf.grad).double().cpu(), g, k


def close(a, b, rtol, atol, what):
    a, b = a.double(), b.double()
    same_nan = torch.isnan(a) == torch.isnan(b)
    assert bool(same_nan.all()), f"{what}: NaN pattern differs\n{a}\n{b}"
    same_inf = (a == b) | torch.isnan(a) | torch.isfinite(b)
    assert bool(same_inf.all()), f"{what}: inf differs\n{a}\n{b}"
    fin = torch.isfinite(b)
    err = (a[fin] - b[fin]).abs()
    bound = atol + rtol * b[fin].abs()
    assert bool((err <= bound).all()), f"{what}: max err {float((err - bound).max()):.3g} over bound\n{a}\n{b}"


_TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (1e-2, 1e-3), torch.float16: (2e-3, 2e-4)}


def check_against_oracle(impl, z, y, tau=1.0, dtype=torch.float32, inplace=False, grad_atol=None):
    logp, H, dz, g, k = run(impl, z, y, tau, inplace=inplace)
    r_logp, r_H, r_dz = oracle(z, y, tau, g, k)
    rtol, atol = _TOL[dtype]
    atol = atol if grad_atol is None else grad_atol
    close(logp, r_logp, 2e-5, 2e-5 * (1 + r_logp.abs().nan_to_num(0, 0, 0).max()), f"{impl} logp")
    close(H, r_H, 2e-5, 2e-5, f"{impl} H")
    gscale = float(r_dz.nan_to_num(0, 0, 0).abs().max()) + 1e-30
    close(dz, r_dz, rtol, atol * gscale, f"{impl} dlogits")
    return logp, H, dz


# ----------------------------------------------------------------------------------------------
# -inf = masked vocabulary
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_masked_vocabulary(impl, tau):
    V = 301
    z = torch.randn(6, V) * 3
    y = torch.randint(0, V, (6,))
    z[0, torch.randperm(V)[:150]] = -INF  # partial row
    z[1] = -INF  # masked except the label
    z[1, y[1]] = 2.0
    z[2, y[2]] = -INF  # the label itself masked
    z[3, :257] = -INF  # a whole leading tile (and more) masked
    y[4] = -100  # ignored row
    y[3] = 280
    logp, H, dz = check_against_oracle(impl, z, y, tau)
    assert logp[2] == -INF and torch.isfinite(H[2]) and bool(torch.isfinite(dz[2]).all())
    assert logp[1] == 0 and H[1] == 0
    assert bool((dz[4] == 0).all()) and logp[4] == 0 and H[4] == 0


@pytest.mark.parametrize("impl", BACKENDS)
def test_masked_label_with_zero_upstream_grads_is_finite(impl):
    V = 40
    z = torch.randn(2, V)
    y = torch.tensor([3, 7])
    z[:, 3] = -INF
    z[1, 7] = -INF
    zero = torch.zeros(2, dtype=torch.float64)
    logp, H, dz, _, _ = run(impl, z, y, 1.3, g=zero, k=zero)
    assert bool((logp == -INF).all()) and bool(torch.isfinite(H).all())
    assert bool(torch.isfinite(dz).all()) and bool((dz == 0).all())


# ----------------------------------------------------------------------------------------------
# NaN / +inf / no finite column: NaN logp AND NaN H, NaN gradient row; other rows untouched
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_rows(impl, dtype):
    V = 77
    z = torch.randn(8, V).to(dtype)
    y = torch.randint(0, V, (8,))
    z[0, 5] = NAN
    z[1, y[1]] = NAN  # NaN at the label
    z[2, :] = NAN
    z[3, 9] = INF
    z[4, y[4]] = INF  # +inf at the label: still NaN (one behaviour, whatever the label)
    z[5, :] = -INF  # no finite column
    z[6, 0], z[6, 1] = -INF, NAN  # NaN among -inf only
    with warnings.catch_warnings():  # NaN / +inf inputs may warn in the interpreter (inf - inf, inf * 0)
        warnings.simplefilter("ignore", RuntimeWarning)
        logp, H, dz, g, k = run(impl, z, y)
    for i in range(7):
        assert math.isnan(logp[i]) and math.isnan(H[i]), (i, logp[i], H[i])
        assert bool(torch.isnan(dz[i]).all()), (i, dz[i])
    r_logp, r_H, r_dz = oracle(z, y, 1.0, g, k)
    assert math.isfinite(logp[7]) and abs(logp[7] - r_logp[7]) < 2e-5 * (1 + abs(r_logp[7]))
    assert abs(H[7] - r_H[7]) < 2e-5 * (1 + r_H[7])


@pytest.mark.parametrize("impl", BACKENDS)
def test_out_of_range_label_gives_nan_row_when_unchecked(impl):
    V = 50
    z = torch.randn(5, V)
    y = torch.tensor([V, 10**9, -5, 3, -100])
    with hk.checks(labels=False):
        logp, H, dz, g, k = run(impl, z, y)
    for i in range(3):
        assert math.isnan(logp[i]) and math.isnan(H[i]) and bool(torch.isnan(dz[i]).all())
    r_logp, r_H, r_dz = oracle(z, y, 1.0, g, k)
    close(logp[3:], r_logp[3:], 2e-5, 2e-5, "valid rows")
    close(dz[3:], r_dz[3:], 2e-5, 1e-6, "valid rows' grads")
    with hk.checks(labels=True):
        with pytest.raises(ValueError, match="labels out of range"):
            hk.entropy_logprob(z.to(DEV[impl]), y.to(DEV[impl]), impl=impl)


def test_default_label_check_is_on_for_cpu_tensors():
    z = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"labels out of range: labels\[1\] = 10"):
        hk.entropy_logprob(z, torch.tensor([0, 10, 2]), impl="torch")


@pytest.mark.parametrize("impl", BACKENDS)
def test_finite_check_accepts_minus_inf_rejects_nan_and_plus_inf(impl):
    z = torch.randn(3, 20)
    y = torch.tensor([1, 2, 3])
    z[0, 5] = -INF
    dev = DEV[impl]
    with hk.checks(finite=True):
        logp, H = hk.entropy_logprob(z.to(dev), y.to(dev), impl=impl)
        assert bool(torch.isfinite(logp).all())
        for bad in (NAN, INF):
            zb = z.clone()
            zb[2, 7] = bad
            with pytest.raises(ValueError, match="logits contains 1 NaN/Inf"):
                hk.entropy_logprob(zb.to(dev), y.to(dev), impl=impl)


# ----------------------------------------------------------------------------------------------
# p(label) -> 1, rounding consistency, large offsets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dominant_label_keeps_relative_accuracy(impl, dtype):
    """V = 151936, label logit 40 (30) over N(0, 1): logp ~ -1e-12 (-2e-8) and H to relative accuracy."""
    V = 151936
    z = torch.randn(2, V).to(dtype)
    y = torch.tensor([123, 150000])
    z[0, 123] = 40.0
    z[1, 150000] = 30.0
    g = torch.tensor([1.0, -0.5], dtype=torch.float64)
    k = torch.tensor([0.3, 2.0], dtype=torch.float64)
    logp, H, dz, _, _ = run(impl, z, y, g=g, k=k)
    r_logp, r_H, r_dz = oracle(z, y, 1.0, g, k)
    assert bool((r_logp < 0).all()) and bool((r_logp > -1e-6).all())
    close(logp, r_logp, 1e-4, 0.0, f"{impl} logp")
    close(H, r_H, 1e-3, 0.0, f"{impl} H")
    # the label column: g (1 - p_y) - k p_y (log p_y + H), both terms tiny; relative accuracy of the
    # output dtype (bf16 out: 2^-8, plus the interpreter's truncating cast)
    lab = torch.stack([dz[0, 123], dz[1, 150000]])
    r_lab = torch.stack([r_dz[0, 123], r_dz[1, 150000]])
    close(lab, r_lab, 1e-4 if dtype == torch.float32 else 1.6e-2, 0.0, f"{impl} label grad")


@pytest.mark.parametrize("impl", BACKENDS)
def test_backward_rounds_x_like_the_forward(impl):
    """One-hot rows at |x| ~ 3e4 (logits ~ N(0,1) * 1e4, tau = 0.3): p_argmax must be 1, so with g = 1, k = 0
    the argmax column of a row whose label is elsewhere gets exactly -1/tau (an FMA-contracted backward
    gave -1.0046/tau)."""
    tau = 0.3
    N, V = 16, 203
    z = torch.randn(N, V) * 1e4
    a = z.argmax(1)
    y = (a + 1) % V
    g = torch.ones(N, dtype=torch.float64)
    k = torch.zeros(N, dtype=torch.float64)
    logp, H, dz, _, _ = run(impl, z, y, tau, g=g, k=k)
    got = dz[torch.arange(N), a]
    assert bool((got == -1 / torch.tensor(tau, dtype=torch.float32).double()).all()) or \
        float((got * tau + 1).abs().max()) < 1e-6, got * tau
    # and with the label at the argmax: 1 - p_y = 0 and no NaN
    logp, H, dz, _, _ = run(impl, z, a, tau, g=g, k=torch.ones(N, dtype=torch.float64))
    assert bool((logp == 0).all()) and bool((H == 0).all()) and bool(torch.isfinite(dz).all())


@pytest.mark.parametrize("impl", BACKENDS)
def test_large_common_offset(impl):
    z = torch.randn(4, 333) * 2 + 1e3
    y = torch.randint(0, 333, (4,))
    # fp32 math: x - lse carries ulp(1e3) / 2 = 3e-5 of absolute error, so p_j is good to ~3e-5 relative
    check_against_oracle(impl, z, y, 1.0, grad_atol=1e-4)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_backward_at_large_offset_has_no_lse_rounding(impl, tau):
    """Logits ~ N(0,1) + 3e3 (ulp = 2.4e-4) with a temperature that rounds nothing (x = z / tau exact): the
    only error left is how the backward forms p. Recomputing p = exp(x - lse) from an fp32 lse puts up to
    ulp(lse)/2 = 1.2e-4 of relative error on every p (many times eager fp32's); the saved lse must carry
    more than fp32 (split hi + lo). Yardstick: eager fp32 log_softmax against the same float64 oracle."""
    gen = torch.Generator().manual_seed(7)
    N, V = 8, 517
    z = torch.randn(N, V, generator=gen) + 3e3
    y = torch.randint(0, V, (N,), generator=gen)
    g, k = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)
    _, _, dz, _, _ = run(impl, z, y, tau, g=g, k=k)
    _, _, r_dz = oracle(z, y, tau, g, k)
    leaf = z.clone().requires_grad_(True)
    lq = torch.log_softmax(leaf / tau, -1)
    ((lq.gather(1, y[:, None])[:, 0] * g.float()).sum() - ((lq.exp() * lq).sum(-1) * k.float()).sum()).backward()
    err, eager = (dz - r_dz).abs().max().item(), (leaf.grad.double() - r_dz).abs().max().item()
    assert err <= 2 * eager + 1e-7, (err, eager)


@pytest.mark.parametrize("impl", BACKENDS)
def test_strided_batch_view_and_inplace(impl):
    """[B, T, V] view that does not flatten (the causal shift) with masked columns, in and out of place."""
    B, T, V = 3, 5, 130
    base = torch.randn(B, T + 1, V)
    base[:, :, :7] = -INF
    y = torch.randint(7, V, (B, T))
    y[0, 2] = -100
    z = base[:, :-1].reshape(-1, V)
    for inplace in (False, True):
        logp, H, dz, g, k = run(impl, base, y, 0.9, inplace=inplace, view=lambda t: t[:, :-1])
        r_logp, r_H, r_dz = oracle(z, y.reshape(-1), 0.9, g, k)
        close(logp.reshape(-1), r_logp, 2e-5, 2e-5, f"{impl} logp")
        close(H.reshape(-1), r_H, 2e-5, 2e-5, f"{impl} H")
        close(dz.reshape(-1, V), r_dz, 2e-5, 1e-6, f"{impl} dlogits inplace={inplace}")


# ----------------------------------------------------------------------------------------------
# unsafe opt-ins stay safe
# ----------------------------------------------------------------------------------------------
def test_inplace_backward_on_leaf_requiring_grad_raises():
    z = torch.randn(4, 10, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite logits, a leaf"):
        hk.entropy_logprob(z, y, impl="torch", inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite logits, a leaf"):
        hk.entropy_logprob(z[:, :], y, impl="torch", inplace_backward=True)
    hk.entropy_logprob(z * 2, y, impl="torch", inplace_backward=True)  # a non-leaf is fine


# ----------------------------------------------------------------------------------------------
# fused LM head (cpu / torch backends; the Triton head has its own tests)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [b for b in BACKENDS if b in ("torch", "cpu")])
def test_fused_head_non_finite_and_masked_bias(impl):
    N, D, V = 6, 16, 700
    h = torch.randn(N, D)
    w = torch.randn(V, D) / 4
    b = torch.randn(V)
    b[:300] = -INF  # a whole leading vocab tile masked
    y = torch.randint(300, V, (N,))
    h[1] = NAN  # a NaN hidden row: NaN logp AND NaN H (it gave H = 0 on cpu: the most confident value)
    y[2] = 5  # the label on a masked column
    logp, H = hk.linear_entropy_logprob(h, w, y, bias=b, impl=impl)
    assert math.isnan(logp[1]) and math.isnan(H[1])
    assert logp[2] == -INF and math.isfinite(H[2])
    z = h.double() @ w.double().t() + b.double()
    r_logp, r_H, _ = oracle(z, y, 1.0, torch.zeros(N), torch.zeros(N))
    keep = torch.tensor([0, 3, 4, 5])
    close(logp[keep].double(), r_logp[keep], 1e-4, 1e-4, f"{impl} fused logp")
    close(H[keep].double(), r_H[keep], 1e-4, 1e-4, f"{impl} fused H")


@pytest.mark.parametrize("impl", [b for b in BACKENDS if b in ("torch", "cpu", "triton")])
def test_fused_head_out_of_range_label_gives_nan_row_when_unchecked(impl):
    """Label checks off (the GPU default): a label outside [0, V) that is not ignore_index gives a NaN row
    (logp, H and its grad_hidden row), never the value of a label whose logit is 0; other rows unaffected."""
    N, D, V = 6, 16, 37
    h, w, b = torch.randn(N, D), torch.randn(V, D) / 4, torch.randn(V)
    y = torch.tensor([3, V, -100, -5, 10**9, V - 1])
    dev = DEV[impl]
    leaf = h.to(dev).requires_grad_(True)
    with hk.checks(labels=False):
        logp, H = hk.linear_entropy_logprob(leaf, w.to(dev), y.to(dev), bias=b.to(dev), impl=impl)
        (logp.nan_to_num().sum() + H.nan_to_num().sum()).backward()
    logp, H, dh = logp.detach().cpu(), H.detach().cpu(), leaf.grad.cpu()
    for i in (1, 3, 4):
        assert math.isnan(logp[i]) and math.isnan(H[i]) and bool(torch.isnan(dh[i]).any()), i
    assert logp[2] == 0 and H[2] == 0 and bool((dh[2] == 0).all())
    z = h.double() @ w.double().t() + b.double()
    r_logp, r_H, _ = oracle(z, y.clamp(0, V - 1), 1.0, torch.zeros(N), torch.zeros(N))
    keep = torch.tensor([0, 5])
    close(logp[keep].double(), r_logp[keep], 1e-4, 1e-4, f"{impl} fused logp")
    close(H[keep].double(), r_H[keep], 1e-4, 1e-4, f"{impl} fused H")
    assert torch.isfinite(dh[keep]).all()


@pytest.mark.parametrize("impl", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("case", ["plus_inf_bias", "nan_bias", "all_masked_bias"])
def test_fused_head_undefined_rows_are_nan(impl, case):
    """A +inf or NaN bias entry puts it in every row, and a bias of all -inf leaves no distribution: NaN logp,
    NaN H and NaN gradient rows on every backend (the torch head gave logp -inf / H 0, a confident row)."""
    N, D, V = 3, 16, 64
    h, w, b = torch.randn(N, D), torch.randn(V, D) / 4, torch.randn(V)
    b[7] = {"plus_inf_bias": INF, "nan_bias": NAN, "all_masked_bias": -INF}[case]
    if case == "all_masked_bias":
        b[:] = -INF
    y = torch.tensor([7, 40, 63])
    hh = h.clone().requires_grad_(True)
    with warnings.catch_warnings():  # non-finite inputs may warn (inf - inf)
        warnings.simplefilter("ignore", RuntimeWarning)
        logp, H = hk.linear_entropy_logprob(hh, w, y, bias=b, impl=impl)
        (logp.sum() + H.sum()).backward()
    assert bool(torch.isnan(logp).all()) and bool(torch.isnan(H).all()), (logp, H)
    assert bool(torch.isnan(hh.grad).all()), hh.grad


def exact_offset_head(seed: int = 11, N: int = 6, D: int = 16, V: int = 301):
    """(h [N, D], w [V, D], b [V] fp32, y [N], g, k float64 [N], z float64 [N, V]): fused-head inputs at a +3e3
    bias on a grid (h in 1/4, w in 1/8, b in 1/32 steps) that makes every logit z = h w^T + b exact in fp32."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (N, D), generator=gen).float() / 4
    w = torch.randint(-4, 5, (V, D), generator=gen).float() / 8
    b = 3e3 + torch.randint(-64, 65, (V,), generator=gen).float() / 32
    y = torch.randint(0, V, (N,), generator=gen)
    g, k = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)
    z = h.double() @ w.double().t() + b.double()
    assert torch.equal((h @ w.t() + b).double(), z)  # exact logits: no GEMM rounding in the comparison
    return h, w, b, y, g, k, z


@pytest.mark.parametrize("impl", BACKENDS)
def test_fused_head_backward_at_large_offset_has_no_lse_rounding(impl):
    """Fused head with a +3e3 bias and values on a grid that makes every logit exact in fp32 (h in 1/4, W in
    1/8, b in 1/32 steps): the only error left is the backward's p. An fp32 lse would put ulp(lse)/2 of
    relative error on every p; the saved lse is float64, split into hi + lo. Yardstick: eager fp32."""
    h, w, b, y, g, k, z = exact_offset_head()
    _, _, r_dz = oracle(z, y, 1.0, g, k)

    def dh_of(fn):
        hh = h.to(DEV[impl]).clone().requires_grad_(True)
        logp, H = fn(hh)
        ((logp * g.float().to(logp.device)).sum() + (H * k.float().to(H.device)).sum()).backward()
        return hh.grad.double().cpu()

    def eager(hh):
        lq = torch.log_softmax(hh @ w.t() + b, -1)
        return lq.gather(1, y[:, None])[:, 0], -(lq.exp() * lq).sum(-1)

    ref = r_dz @ w.double()
    wd, bd, yd = w.to(DEV[impl]), b.to(DEV[impl]), y.to(DEV[impl])
    err = (dh_of(lambda hh: hk.linear_entropy_logprob(hh, wd, yd, bias=bd, impl=impl)) - ref).abs().max().item()
    yard = (dh_of(eager) - ref).abs().max().item()
    assert err <= 2 * yard + 1e-7, (err, yard)


def test_backend_modules_satisfy_the_protocols():
    import importlib
    import inspect

    from hero_kernels.backends import LinearBackend, RowBackend, RowStats

    def params(fn):
        ps = inspect.signature(fn).parameters.values()
        return ([p.name for p in ps if p.kind == p.POSITIONAL_OR_KEYWORD],
                [p.name for p in ps if p.kind == p.KEYWORD_ONLY])

    for impl in ("torch", "cpu", "cuda", "triton"):
        if impl == "triton" and "triton" not in BACKENDS:
            continue
        rows = importlib.import_module(f"hero_kernels.backends.{impl}.entropy_logprob")
        head = importlib.import_module(f"hero_kernels.backends.{impl}.linear_entropy_logprob")
        assert isinstance(rows, RowBackend) and isinstance(head, LinearBackend)
        # Protocol isinstance checks only names: the backward signatures are checked here (the saved
        # RowStats and the UpstreamGrads travel as two arguments; backend extras only after opts / out).
        assert params(rows.backward)[0][:6] == ["logits", "labels", "saved", "grads", "opts", "out"], impl
        positional, keyword = params(head.backward)
        assert positional[:7] == ["hidden", "weight", "bias", "labels", "saved", "grads", "opts"], impl
        assert {"need_dh", "need_dw"} <= set(keyword), impl
    from hero_kernels.backends.torch import entropy_logprob as tb
    from hero_kernels.options import RowOptions

    out = tb.forward(torch.randn(2, 5), torch.tensor([0, 1]), RowOptions())
    assert isinstance(out, RowStats) and out.logp.shape == (2,)
