"""The implementations the benchmarks compare, per op.

Every implementation is an ``Impl``: ``check(op, device, dtype)`` returns None when it can run here or the
reason it cannot (the suite records it as skipped with that reason); ``build(op, inputs)`` returns a
``Built``: a zero-argument ``fn`` returning a dict of output tensors plus the leaf tensors whose ``.grad``
the harness clears. Output keys: ``logp`` and ``H`` (per-token [N], backward seeds them with the case's
random upstream gradients g and k), ``loss`` (HERO-weighted scalar) or ``loss_grpo`` (an anchor's plain
GRPO scalar, no entropy weighting), each seeded with 1; ``sketch`` ([N, k] grad_sketch, seeded with the case's
random [N, k] upstream v). The harness compares shared keys against eager.

kinds: "ours" (hero_kernels, one per backend), "baseline" (eager PyTorch and torch.compile of the same
code), "anchor" (other libraries: the published baselines), each used only when importable.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .common import LINEAR_OPS, LOSS_OPS, OPS, SKETCH_K, SKETCH_OPS, Case

__all__ = ["Impl", "Built", "Inputs", "IMPLS", "make_inputs", "get_impls", "impl_names", "OURS_PREFERENCE",
           "run_backward", "make_call"]

#: order in which an "ours" impl is picked as the primary one for ratios, per device type
OURS_PREFERENCE = {"cuda": ("ours:triton", "ours:cuda", "ours:torch"), "cpu": ("ours:cpu", "ours:torch")}

#: backend module of each op (hero_loss runs on top of the fused ops)
_OP_MODULE = {
    "entropy_logprob": "entropy_logprob",
    "linear_entropy_logprob": "linear_entropy_logprob",
    "hero_loss": "entropy_logprob",
    "linear_hero_loss": "linear_entropy_logprob",
    "grad_sketch": "grad_sketch",
    "linear_grad_sketch": "linear_grad_sketch",
}

#: HERO / GRPO options shared by every loss implementation (the design's defaults)
LOSS_OPTS = {"eps_low": 0.2, "eps_high": 0.2, "kappa": 1.0, "beta": 0.0, "temperature": 1.0}


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """One case's tensors. x: logits [N, V] (logits ops) or hidden [N, D] (fused LM-head ops).

    x and weight require grad (the fwd pass runs under no_grad). g, k: fixed random upstream gradients [N]
    (fp32) of logp and H. Loss ops view x / labels as [B, T, ...] responses with advantages [B].
    """

    case: Case
    x: Tensor
    labels: Tensor
    g: Tensor
    k: Tensor
    weight: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    proj: Optional[Tensor] = None  # [k, V] (grad_sketch ops)
    v: Optional[Tensor] = None  # [N, k] upstream gradient of the sketch (grad_sketch ops)

    @property
    def leaves(self) -> List[Tensor]:
        return [t for t in (self.x, self.weight) if t is not None]

    def x3(self) -> Tensor:
        c = self.case
        return self.x.view(c.B, c.T, self.x.shape[-1])

    def labels2(self) -> Tensor:
        c = self.case
        return self.labels.view(c.B, c.T)


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs on ``device`` (never zeros): logits ~ 2 N(0, 1) (entropies well inside (0, log V)),
    hidden ~ N(0, 1) and weight ~ 2 N(0, 1/D) so that logits = hidden @ weight.T have the same scale."""
    gen = torch.Generator(device=device).manual_seed(seed)
    N, V, D = case.N, case.V, case.D
    if case.op in LINEAR_OPS:
        x = torch.randn(N, D, device=device, dtype=dtype, generator=gen)
        weight = torch.randn(V, D, device=device, dtype=dtype, generator=gen).mul_(2.0 / math.sqrt(D))
        weight.requires_grad_(True)
    else:
        x = torch.randn(N, V, device=device, dtype=dtype, generator=gen).mul_(2.0)
        weight = None
    x.requires_grad_(True)
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    g = torch.randn(N, device=device, generator=gen)
    k = torch.randn(N, device=device, generator=gen)
    adv = torch.randn(case.B, device=device, generator=gen) if case.op in LOSS_OPS else None
    inp = Inputs(case, x, labels, g, k, weight, adv)
    if case.op in SKETCH_OPS:
        inp.proj = torch.randn(SKETCH_K, V, device=device, generator=gen) / math.sqrt(SKETCH_K)
        inp.v = torch.randn(N, SKETCH_K, device=device, generator=gen)
    return inp


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
@dataclass
class Built:
    fn: Callable[[], Dict[str, Tensor]]
    leaves: List[Tensor] = field(default_factory=list)


@dataclass
class Impl:
    name: str
    kind: str  # "ours" | "baseline" | "anchor"
    ops: Tuple[str, ...]
    check: Callable[[str, torch.device, torch.dtype], Optional[str]]
    build: Callable[[str, Inputs], Built]
    notes: Dict[str, str] = field(default_factory=dict)  # op -> what exactly is called / caveats
    detail: Optional[Callable[[str], Optional[str]]] = None  # op -> how it was loaded (after check)


# ---- eager PyTorch (what users write) ---------------------------------------------------------
def eager_entropy_logprob(logits: Tensor, labels: Tensor, temperature: float = 1.0, ignore_index: int = -100):
    """log_softmax + entropy + gather in fp32: the baseline every RL trainer has (materializes [N, V] fp32)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    H = -(lp.exp() * lp).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(valid, logp, zero), torch.where(valid, H, zero)


def eager_linear_entropy_logprob(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0):
    """``(hidden @ W.T).float()`` then the eager entropy/log-prob: materializes the [N, V] logits."""
    return eager_entropy_logprob((hidden @ weight.t()).float(), labels, temperature)


def eager_hero_loss(logp: Tensor, H: Tensor, labels: Tensor, advantages: Tensor, ignore_index: int = -100):
    """HERO loss from [B, T] logp / H in plain PyTorch: w = L_s softmax(-H/kappa) per response (detached),
    clipped ratio objective, seq-mean-token-mean. The per-token objective is reference.grpo_token_loss."""
    from hero_kernels import reference

    o = LOSS_OPTS
    mask = labels != ignore_index
    count = mask.sum(1, keepdim=True)
    neg = torch.where(mask, -H.detach() / o["kappa"], torch.full_like(H, -math.inf))
    w = torch.softmax(neg, dim=1).nan_to_num(0.0) * count
    A = advantages.float().unsqueeze(1).expand_as(logp)
    loss_tok, _, _, _ = reference.grpo_token_loss(logp, A, weights=w, eps_low=o["eps_low"], eps_high=o["eps_high"])
    per_seq = torch.where(mask, loss_tok, torch.zeros_like(loss_tok)).sum(1) / count.squeeze(1).clamp(min=1)
    return per_seq.sum() / (count.squeeze(1) > 0).sum().clamp(min=1)


def eager_grad_sketch(logits: Tensor, labels: Tensor, proj: Tensor) -> Tensor:
    """(proj[:, y] - proj softmax(logits.float())) per row: materializes the fp32 [N, V] probabilities."""
    p = torch.softmax(logits.float(), dim=-1)
    return proj.t()[labels] - p @ proj.t()


def _eager_fn(op: str) -> Callable:
    if op in SKETCH_OPS:
        def f(x, w, labels, proj):
            return {"sketch": eager_grad_sketch(x @ w.t() if op in LINEAR_OPS else x, labels, proj)}
    elif op == "entropy_logprob":
        def f(x, w, labels, adv):
            logp, H = eager_entropy_logprob(x, labels)
            return {"logp": logp, "H": H}
    elif op == "linear_entropy_logprob":
        def f(x, w, labels, adv):
            logp, H = eager_linear_entropy_logprob(x, w, labels)
            return {"logp": logp, "H": H}
    elif op == "hero_loss":
        def f(x, w, labels, adv):
            B, T, V = x.shape
            logp, H = eager_entropy_logprob(x.reshape(B * T, V), labels.reshape(-1))
            return {"loss": eager_hero_loss(logp.view(B, T), H.view(B, T), labels, adv)}
    else:
        def f(x, w, labels, adv):
            B, T, D = x.shape
            logp, H = eager_linear_entropy_logprob(x.reshape(B * T, D), w, labels.reshape(-1))
            return {"loss": eager_hero_loss(logp.view(B, T), H.view(B, T), labels, adv)}
    return f


def _args(op: str, inp: Inputs):
    if op in SKETCH_OPS:
        return inp.x, inp.weight, inp.labels, inp.proj
    if op in LOSS_OPS:
        return inp.x3(), inp.weight, inp.labels2(), inp.advantages
    return inp.x, inp.weight, inp.labels, None


def _always(op, device, dtype):
    return None


def _eager_build(op: str, inp: Inputs) -> Built:
    f = _eager_fn(op)
    args = _args(op, inp)
    return Built(lambda: f(*args), inp.leaves)


_COMPILED: Dict[str, Callable] = {}


def _compile_check(op, device, dtype):
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton"
    return None


def _compile_build(op: str, inp: Inputs) -> Built:
    # dynamic=True: one compilation per op (and grad mode) serves every N / V / D of the sweep, so the
    # compile warm-up is paid once per op instead of once per shape.
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(_eager_fn(op), dynamic=True)
    f = _COMPILED[op]
    args = _args(op, inp)
    return Built(lambda: f(*args), inp.leaves)


# ---- ours ----------------------------------------------------------------------------------------
def _ours_check(impl: str):
    def check(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if impl in ("triton", "cuda") and device.type != "cuda":
            extra = " (the Triton interpreter on CPU is a correctness mode, not timed)" if impl == "triton" else ""
            return f"needs CUDA{extra}"
        if impl == "cpu" and device.type != "cpu":
            return f"runs on CPU tensors; this run is on {device.type}"
        try:
            import hero_kernels
            from hero_kernels.dispatch import resolve_impl
        except ImportError as e:
            return f"hero_kernels not importable: {e}"
        if op in LOSS_OPS and not hasattr(hero_kernels, "hero_loss"):
            try:
                importlib.import_module("hero_kernels.loss")
            except ImportError as e:
                return f"hero_kernels.hero_loss not importable: {e}"
        mod = f"hero_kernels.backends.{impl}.{_OP_MODULE[op]}"
        try:
            if importlib.util.find_spec(mod) is None:
                return f"backend module {mod} not found"
        except ImportError as e:
            return f"backend module {mod} not importable: {e}"
        try:
            resolve_impl(impl, device, dtype, "hidden" if op in LINEAR_OPS else "logits")
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - the reason is the report
            return f"{type(e).__name__}: {e}"
        return None

    return check


def _ours_build(impl: str):
    def build(op: str, inp: Inputs) -> Built:
        import hero_kernels as hk

        if op == "grad_sketch":
            def fn():
                return {"sketch": hk.grad_sketch(inp.x, inp.labels, inp.proj, impl=impl)}
        elif op == "linear_grad_sketch":
            def fn():
                return {"sketch": hk.linear_grad_sketch(inp.x, inp.weight, inp.labels, inp.proj, impl=impl)}
        elif op == "entropy_logprob":
            def fn():
                logp, H = hk.entropy_logprob(inp.x, inp.labels, impl=impl)
                return {"logp": logp, "H": H}
        elif op == "linear_entropy_logprob":
            def fn():
                logp, H = hk.linear_entropy_logprob(inp.x, inp.weight, inp.labels, impl=impl)
                return {"logp": logp, "H": H}
        else:
            from hero_kernels.loss import hero_loss

            o = LOSS_OPTS
            x3, labels2 = inp.x3(), inp.labels2()
            w = inp.weight

            def fn():
                loss, _ = hero_loss(x3, labels2, inp.advantages, weight=w, eps_low=o["eps_low"],
                                    eps_high=o["eps_high"], kappa=o["kappa"], beta=o["beta"],
                                    temperature=o["temperature"], loss_agg="seq-mean-token-mean", impl=impl)
                return {"loss": loss}
        return Built(fn, inp.leaves)

    return build


# ---- anchors -------------------------------------------------------------------------------------
def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising something else
        return f"{module} not importable ({type(e).__name__}: {e})"
    return None


def _needs_cuda(device) -> Optional[str]:
    return None if device.type == "cuda" else "needs CUDA (Triton kernels)"


def _liger_check(op, device, dtype):
    mod = {
        "linear_entropy_logprob": "liger_kernel.ops.fused_linear_scaled_cross_entropy",
        "hero_loss": "liger_kernel.transformers.grpo_loss",
        "linear_hero_loss": "liger_kernel.chunked_loss",
    }[op]
    err = _import_error(mod)
    if err:
        return err
    if op == "hero_loss":
        return _needs_cuda(device)
    if op == "linear_entropy_logprob":
        _LIGER_DETAIL.pop(op, None)
        if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
            # Liger dispatches H100/H200 to its CuTe DSL kernel (needs nvidia-cutlass-dsl, whose CUDA-libs wheel
            # is ~90 MB). Without it, time Liger's own chunked PyTorch fallback and say so.
            err = _import_error("liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90")
            if err:
                _LIGER_DETAIL[op] = f"chunked PyTorch fallback timed: the SM90 CuTe path is unavailable ({err})"
            else:
                _LIGER_DETAIL[op] = "SM90 CuTe DSL kernel"
        else:
            _LIGER_DETAIL[op] = "chunked PyTorch fallback (Liger's path for this device)"
    return None


_LIGER_DETAIL: Dict[str, str] = {}


def _liger_detail(op: str) -> Optional[str]:
    return _LIGER_DETAIL.get(op)


def _liger_build(op: str, inp: Inputs) -> Built:
    c = inp.case
    o = LOSS_OPTS
    if op == "linear_entropy_logprob":
        from liger_kernel.ops import fused_linear_scaled_cross_entropy as M

        if _LIGER_DETAIL.get(op, "").startswith("chunked"):
            def fn():
                nll, H = M._FusedLinearPPOFallbackFunction.apply(inp.x, inp.weight, inp.labels, o["temperature"], -100,
                                                                 True)
                return {"logp": -nll, "H": H}
        else:
            def fn():
                nll, H = M.LigerFusedLinearScaledCrossEntropyFunction.apply(inp.x, inp.weight, inp.labels,
                                                                            o["temperature"], -100, 1, True)
                return {"logp": -nll, "H": H}

        return Built(fn, inp.leaves)
    if op == "hero_loss":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        # Liger wants logits for T + 1 positions ([B, T+1, V]) and drops the last one: copy into that layout
        # once, outside the timed region. inplace=True (its default) writes dlogits into that buffer.
        V = c.V
        buf = torch.empty(c.B, c.T + 1, V, dtype=inp.x.dtype, device=inp.x.device)
        with torch.no_grad():
            buf[:, : c.T].copy_(inp.x3())
            buf[:, c.T].normal_()
        buf.requires_grad_(True)
        labels2 = inp.labels2()
        mask = torch.ones_like(labels2, dtype=torch.int32)

        def fn():
            loss, _ = triton_grpo_loss(buf, None, None, labels2, inp.advantages, mask, temperature=o["temperature"],
                                       beta=0.0, eps_low=o["eps_low"], eps_high=o["eps_high"], inplace=True,
                                       loss_type="grpo", reduce=True)
            return {"loss_grpo": loss}

        return Built(fn, [buf])
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # compiled=True (Liger's default, torch.compile of its chunk step) on GPU; eager chunks on CPU so the CI
    # run does not pay a second compile.
    loss_mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                        compiled=inp.x.device.type == "cuda", epsilon_low=o["eps_low"],
                                        epsilon_high=o["eps_high"], temperature=o["temperature"])
    x3, labels2 = inp.x3(), inp.labels2()
    mask = torch.ones_like(labels2, dtype=torch.int64)

    def fn():
        out = loss_mod(x3, inp.weight, labels2, mask, inp.advantages)
        return {"loss_grpo": out[0] if isinstance(out, tuple) else out}

    return Built(fn, inp.leaves)


def _cce_check(op, device, dtype):
    return _import_error("cut_cross_entropy") or _needs_cuda(device)


def _cce_build(op: str, inp: Inputs) -> Built:
    from cut_cross_entropy import linear_cross_entropy

    def fn():
        nll = linear_cross_entropy(inp.x, inp.weight, inp.labels, reduction="none")
        return {"logp": -nll}

    return Built(fn, inp.leaves)


_VERL_HOW: Dict[str, object] = {}  # "how": how it was loaded, "fn": the loaded function


def _load_verl():
    """verl's linear_cross_entropy. Its package __init__ imports ray, tensordict and omegaconf (a large install
    a GPU box without internet rarely has); when that import fails and the package files are present, the
    kernel modules (which need only torch, triton, packaging) are loaded with placeholder parent packages
    so ``verl/__init__.py`` does not run. Only this benchmark process is affected."""
    if "fn" in _VERL_HOW:
        return _VERL_HOW["fn"]
    name = "verl.utils.kernel.linear_cross_entropy"
    try:
        mod = importlib.import_module(name)
        _VERL_HOW["how"] = "import verl.utils.kernel.linear_cross_entropy"
        _VERL_HOW["fn"] = mod.linear_cross_entropy
        return mod.linear_cross_entropy
    except Exception as first:  # noqa: BLE001
        for k in [k for k in sys.modules if k == "verl" or k.startswith("verl.")]:
            sys.modules.pop(k, None)
        spec = importlib.util.find_spec("verl")  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"verl not importable ({type(first).__name__}: {first})") from first
        root = list(spec.submodule_search_locations)[0]
        for pkg, path in (("verl", root), ("verl.utils", os.path.join(root, "utils"))):
            m = types.ModuleType(pkg)
            m.__path__ = [path]
            sys.modules[pkg] = m
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            raise ImportError(f"verl kernel modules not loadable ({type(e).__name__}: {e}); "
                              f"plain import failed with {type(first).__name__}: {first}") from e
        _VERL_HOW["how"] = (f"kernel modules loaded without verl/__init__ (plain import failed: "
                            f"{type(first).__name__}: {str(first)[:80]})")
        _VERL_HOW["fn"] = mod.linear_cross_entropy
        return mod.linear_cross_entropy


def _verl_check(op, device, dtype):
    if importlib.util.find_spec("verl") is None:
        return "verl not importable (ModuleNotFoundError: No module named 'verl')"
    err = _needs_cuda(device)
    if err:
        return err
    try:
        _load_verl()
    except ImportError as e:
        return str(e)
    return None


def _verl_build(op: str, inp: Inputs) -> Built:
    lce = _load_verl()

    def fn():
        logp, H = lce(inp.x, inp.weight, inp.labels, float(LOSS_OPTS["temperature"]), "none")
        return {"logp": logp, "H": H}

    return Built(fn, inp.leaves)


def run_backward(out: Dict[str, Tensor], inp: Inputs) -> None:
    """Backpropagate an impl's outputs with the case's fixed upstream gradients (logp <- g, H <- k, loss* <- 1)."""
    ts, gs = [], []
    for key, v in out.items():
        if not isinstance(v, Tensor) or not v.requires_grad:
            continue
        if key == "logp":
            gs.append(inp.g.view(v.shape).to(v.dtype))
        elif key == "H":
            gs.append(inp.k.view(v.shape).to(v.dtype))
        elif key == "sketch":
            gs.append(inp.v.to(v.dtype))
        elif key.startswith("loss"):
            gs.append(torch.ones_like(v))
        else:
            continue
        ts.append(v)
    if not ts:
        raise RuntimeError("no differentiable output to backpropagate")
    torch.autograd.backward(ts, gs)


def make_call(built: Built, inp: Inputs, pass_: str, sync_device: Optional[torch.device] = None) -> Callable:
    """The measured call: "fwd" = forward under no_grad (returns the outputs); "fwd+bwd" = clear the leaves'
    grads, forward, backward (returns None). ``sync_device``: synchronize CUDA at the end (wall-clock timers)."""
    dev_sync = sync_device is not None and sync_device.type == "cuda"

    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                out = built.fn()
            if dev_sync:
                torch.cuda.synchronize(sync_device)
            return out
    elif pass_ == "fwd+bwd":
        def call():
            for t in built.leaves:
                t.grad = None
            run_backward(built.fn(), inp)
            if dev_sync:
                torch.cuda.synchronize(sync_device)
    else:
        raise ValueError(f"pass must be 'fwd' or 'fwd+bwd', got {pass_!r}")
    return call


def _ours(impl: str) -> Impl:
    return Impl(f"ours:{impl}", "ours", OPS, _ours_check(impl), _ours_build(impl),
                {op: f"hero_kernels public op, impl={impl!r}" for op in OPS})


IMPLS: Tuple[Impl, ...] = (
    _ours("triton"),
    _ours("cuda"),
    _ours("cpu"),
    _ours("torch"),
    Impl("eager", "baseline", OPS, _always, _eager_build, {
        "entropy_logprob": "eager PyTorch: log_softmax(logits.float()) + gather + entropy -(p*logp).sum",
        "linear_entropy_logprob": "eager PyTorch: (hidden @ W.T).float() then log_softmax + gather + entropy",
        "hero_loss": "eager PyTorch entropy/logp, softmax(-H) weights per response, clipped objective",
        "linear_hero_loss": "eager PyTorch: (hidden @ W.T).float() then the eager HERO loss",
        "grad_sketch": "eager PyTorch: proj[:, y] - softmax(logits.float()) @ proj.T (fp32 [N, V] probabilities)",
        "linear_grad_sketch": "eager PyTorch: (hidden @ W.T) then the eager grad_sketch",
    }),
    Impl("compile", "baseline", OPS, _compile_check, _compile_build,
         {op: "torch.compile(eager, dynamic=True): one compile per op and grad mode, warm-up not timed" for op in OPS}),
    Impl("liger", "anchor", ("linear_entropy_logprob", "hero_loss", "linear_hero_loss"), _liger_check, _liger_build, {
        "linear_entropy_logprob": "Liger LigerFusedLinearScaledCrossEntropyFunction(return_entropy=True): CuTe SM90 "
                                  "kernel on H100/H200 (bf16 entropy), its chunked PyTorch fallback elsewhere or "
                                  "when nvidia-cutlass-dsl is missing (see 'detail')",
        "hero_loss": "Liger triton_grpo_loss (loss_type='grpo', inplace=True, no entropy weighting; "
                     "logits copied to its [B, T+1, V] layout outside the timing)",
        "linear_hero_loss": "Liger LigerFusedLinearGRPOLoss (loss_type='grpo', no entropy weighting; "
                            "compiled=True on GPU, False on CPU)",
    }, _liger_detail),
    Impl("cce", "anchor", ("linear_entropy_logprob",), _cce_check, _cce_build, {
        "linear_entropy_logprob": "Cut Cross-Entropy linear_cross_entropy(reduction='none', filter_eps='high'): "
                                  "log-prob only, NO entropy (does less work than ours)",
    }),
    Impl("verl", "anchor", ("linear_entropy_logprob",), _verl_check, _verl_build, {
        "linear_entropy_logprob": "verl linear_cross_entropy(hidden, W, labels, 1.0, 'none') -> (logp, entropy)",
    }, lambda op: verl_how()),
)


def impl_names() -> List[str]:
    return [i.name for i in IMPLS]


def get_impls(names: Optional[List[str]] = None) -> List[Impl]:
    """Impls by name, in registry order. Names: 'ours' selects every ours:* backend."""
    if not names:
        return list(IMPLS)
    wanted = set()
    for n in names:
        if n == "ours":
            wanted |= {i.name for i in IMPLS if i.kind == "ours"}
        elif n in impl_names():
            wanted.add(n)
        else:
            raise ValueError(f"unknown impl {n!r}; choose from {['ours'] + impl_names()}")
    return [i for i in IMPLS if i.name in wanted]


def verl_how() -> Optional[str]:
    return _VERL_HOW.get("how")
