"""Public-layer tests: argument errors, shapes, autograd, torch.compile, impl='torch' vs the float64 spec."""
import math

import pytest
import torch

import hero_kernels as hk
from hero_kernels import reference as R


def _inputs(shape=(3, 5), V=37, dtype=torch.float32, ignore=True):
    x = (torch.randn(*shape, V) * 3).to(dtype)
    y = torch.randint(0, V, shape)
    if ignore:
        y.view(-1)[::4] = -100
    return x, y


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_impl_values_and_grads_match_reference(temperature):
    x, y = _inputs()
    x.requires_grad_(True)
    logp, H = hk.entropy_logprob(x, y, temperature, impl="torch")
    assert logp.dtype == H.dtype == torch.float32 and logp.shape == y.shape
    rl, rH, _ = R.entropy_logprob(x.detach(), y, temperature)
    torch.testing.assert_close(logp.double(), rl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(H.double(), rH, atol=1e-5, rtol=1e-5)
    g, k = torch.randn_like(logp), torch.randn_like(H)
    torch.autograd.backward((logp, H), (g, k))
    rg = R.entropy_logprob_backward(x.detach(), y, g, k, temperature)
    torch.testing.assert_close(x.grad.double(), rg, atol=1e-6, rtol=1e-5)


def test_reference_backward_matches_autograd_in_float64():
    x, y = _inputs(V=23)
    x = x.double().requires_grad_(True)
    lp, H, _ = R.entropy_logprob(x, y, 1.3)
    g, k = torch.randn_like(lp), torch.randn_like(H)
    torch.autograd.backward((lp, H), (g, k))
    torch.testing.assert_close(x.grad, R.entropy_logprob_backward(x.detach(), y, g, k, 1.3))


def test_invariants_and_masked_rows():
    x, y = _inputs(V=101)
    logp, H = hk.entropy_logprob(x, y, impl="torch")
    m = y != -100
    assert (logp[m] <= 0).all() and (H[m] >= 0).all() and (H[m] <= math.log(101) + 1e-5).all()
    assert (logp[~m] == 0).all() and (H[~m] == 0).all()


def test_partials_merge_matches_full_row():
    x = torch.randn(4, 50, dtype=torch.float64) * 5
    full = R.finalize_partials(*R.row_partials(x))
    merged = R.merge_partials(R.row_partials(x[:, :17]), R.row_partials(x[:, 17:]))
    for a, b in zip(full, R.finalize_partials(*merged)):
        torch.testing.assert_close(a, b)
    lse, H = R.finalize_partials(*R.merge_partials(R.row_partials(x), R.row_partials(x[:, :0])))
    torch.testing.assert_close(lse, full[0])


def test_empty_and_all_ignored():
    x = torch.randn(0, 9, requires_grad=True)
    lp, H = hk.entropy_logprob(x, torch.zeros(0, dtype=torch.long), impl="torch")
    assert lp.shape == (0,)
    (lp.sum() + H.sum()).backward()
    x = torch.randn(4, 9, requires_grad=True)
    lp, H = hk.entropy_logprob(x, torch.full((4,), -100), impl="torch")
    (lp.sum() + H.sum()).backward()
    assert (lp == 0).all() and (x.grad == 0).all()


def test_inplace_backward_matches():
    x, y = _inputs(V=19)
    a = x.clone().requires_grad_(True)
    lp, H = hk.entropy_logprob(a, y, 0.9, impl="torch")
    (lp.sum() + 0.5 * H.sum()).backward()
    base = (x.clone() * 1.0).requires_grad_(True)
    z = base * 1.0  # a non-leaf buffer that may be overwritten
    lp2, H2 = hk.entropy_logprob(z, y, 0.9, impl="torch", inplace_backward=True)
    (lp2.sum() + 0.5 * H2.sum()).backward()
    torch.testing.assert_close(base.grad, a.grad)


def test_torch_compile_fullgraph_matches_eager():
    x, y = _inputs(V=29)

    def f(x, y):
        lp, H = hk.entropy_logprob(x, y, 0.8, impl="torch")
        return (lp * 2 + H * H).sum()

    a = x.clone().requires_grad_(True)
    f(a, y).backward()
    b = x.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True)(b, y)
    out.backward()
    torch.testing.assert_close(out, f(x, y))
    torch.testing.assert_close(b.grad, a.grad)


# ---- errors name the argument ----------------------------------------------------------------
def test_label_out_of_range():
    x, y = _inputs(V=10)
    y.view(-1)[3] = 10
    with pytest.raises(ValueError, match=r"labels out of range: labels\[3\] = 10"):
        hk.entropy_logprob(x, y, impl="torch")
    y.view(-1)[3] = -5
    with pytest.raises(ValueError, match="labels out of range"):
        hk.entropy_logprob(x, y, impl="torch")


@pytest.mark.parametrize("t", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_temperature(t):
    x, y = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        hk.entropy_logprob(x, y, t)


def test_bad_dtypes_and_shapes():
    x, y = _inputs()
    with pytest.raises(TypeError, match="logits must have dtype"):
        hk.entropy_logprob(x.long(), y)
    with pytest.raises(TypeError, match="labels must have dtype"):
        hk.entropy_logprob(x, y.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        hk.entropy_logprob(x, y[:, :-1])
    with pytest.raises(ValueError, match="impl must be one of"):
        hk.entropy_logprob(x, y, impl="fast")
    with pytest.raises(TypeError, match="temperature must be a Python float"):
        hk.entropy_logprob(x, y, torch.tensor(1.0))


def test_triton_on_cpu_outside_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y = _inputs()
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors, but logits is on cpu"):
        hk.entropy_logprob(x, y, impl="triton")


def test_nan_check_when_enabled():
    x, y = _inputs()
    x[1, 2, 3] = float("nan")
    with hk.checks(finite=True):
        with pytest.raises(ValueError, match="logits contains 1 NaN/Inf"):
            hk.entropy_logprob(x, y, impl="torch")
    assert not hk.get_checks().finite


def test_constant_marker_matches_torch():
    # dispatch._constant_under_compile mirrors torch.compiler.assume_constant_result without importing dynamo
    fn = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(fn, "_dynamo_marked_constant", False) is True


def test_import_does_not_load_dynamo_or_triton():
    import subprocess
    import sys

    code = "import sys, hero_kernels; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], out


def test_readme_quickstart_example_runs():
    """examples/quickstart.py is the README's runnable example: it must run and match the reference."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "quickstart.py")], capture_output=True,
                       text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr[-2000:]
    errs = [float(tok) for line in r.stdout.splitlines() if "max |logp - ref|" in line
            for tok in line.replace("=", " ").split() if "e-" in tok or tok.startswith("0.")]
    assert len(errs) == 4 and max(errs) < 1e-4, r.stdout


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_dominant_label_keeps_relative_accuracy(impl):
    # 1 - p_y from 1e-2 down to ~1e-8: logp and the gradient must keep their relative accuracy (Liger #1329
    # class in fp32): 1 - p_y is the sum of the other probabilities, log p_y = -log1p(s_o / e_y).
    N, V = 6, 1003
    x = torch.randn(N, V)
    y = torch.randint(0, V, (N,))
    x[torch.arange(N), y] = x.max(-1).values + torch.tensor([8.0, 10.0, 12.0, 14.0, 16.0, 18.0])
    rl, _, _ = R.entropy_logprob(x, y)
    g, k = torch.randn(N), torch.randn(N)
    rg = R.entropy_logprob_backward(x, y, g, k)
    xx = x.clone().requires_grad_(True)
    lp, H = hk.entropy_logprob(xx, y, impl=impl)
    torch.autograd.backward((lp, H), (g, k))
    assert ((lp.double() - rl).abs() / rl.abs()).max() < 1e-5
    assert ((xx.grad.double() - rg).norm(dim=-1) / rg.norm(dim=-1)).max() < 1e-4


def test_bias_dtype_must_match_weight():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match="bias dtype"):
        hk.linear_entropy_logprob(h, w, torch.zeros(3, dtype=torch.long).clamp(0, 4), bias=torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_inplace_backward_on_expanded_rows_is_correct(impl):
    row = torch.randn(1, 11)
    y = torch.randint(0, 11, (4,))
    base = row.clone().requires_grad_(True)
    lp, H = hk.entropy_logprob(base.expand(4, 11), y, impl=impl, inplace_backward=True)
    (lp.sum() + H.sum()).backward()
    ref = R.entropy_logprob_backward(row.expand(4, 11), y, torch.ones(4), torch.ones(4)).sum(0, keepdim=True)
    torch.testing.assert_close(base.grad.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "cpu", "triton"])
def test_causal_shift_view_values_grads_and_inplace_without_copy(impl, monkeypatch):
    """logits[:, :-1] of [B, T+1, V] is not [N, V]-flattenable without a copy: the triton / cpu (and cuda)
    backends take the view in ONE launch per pass, the torch backend walks the batch."""
    if impl == "triton":
        pytest.importorskip("triton")
    from hero_kernels.dispatch import backend_module

    mod, calls = backend_module(impl, "entropy_logprob"), []
    for name in ("forward", "backward"):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    B, T, V = 3, 5, 37
    full = torch.randn(B, T + 1, V) * 2
    y = torch.randint(0, V, (B, T))
    y[1, 2] = -100
    g, k = torch.randn(B, T), torch.randn(B, T)
    rl, rH, _ = R.entropy_logprob(full[:, :-1], y, 0.9)
    rg = R.entropy_logprob_backward(full[:, :-1], y, g, k, 0.9)

    leaf = full.clone().requires_grad_(True)
    lp, H = hk.entropy_logprob(leaf[:, :-1], y, 0.9, impl=impl)
    torch.testing.assert_close(lp.double(), rl, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(H.double(), rH, atol=2e-5, rtol=2e-5)
    torch.autograd.backward((lp, H), (g, k))
    torch.testing.assert_close(leaf.grad[:, :-1].double(), rg, atol=2e-5, rtol=2e-5)
    assert (leaf.grad[:, -1] == 0).all()
    per_pass = 1 if impl in ("triton", "cpu") else B
    assert calls == ["forward"] * per_pass + ["backward"] * per_pass

    # in place: dlogits land in the caller's buffer itself (proof that no [N, V] copy was made)
    base = full.clone().requires_grad_(True)
    buf = base * 1.0  # non-leaf buffer the backward may overwrite
    last = buf[:, -1].detach().clone()
    lp2, H2 = hk.entropy_logprob(buf[:, :-1], y, 0.9, impl=impl, inplace_backward=True)
    torch.autograd.backward((lp2, H2), (g, k))
    torch.testing.assert_close(buf.detach()[:, :-1].double(), rg, atol=2e-5, rtol=2e-5)
    assert torch.equal(buf.detach()[:, -1], last)
    torch.testing.assert_close(base.grad[:, :-1], leaf.grad[:, :-1])


def test_torch_compile_with_causal_shift_view():
    full = torch.randn(2, 6, 19)
    y = torch.randint(0, 19, (2, 5))

    def f(z):
        lp, H = hk.entropy_logprob(z[:, :-1], y, impl="torch")
        return (lp + 0.5 * H).sum()

    a = full.clone().requires_grad_(True)
    f(a).backward()
    b = full.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True)(b).backward()
    torch.testing.assert_close(b.grad, a.grad)
