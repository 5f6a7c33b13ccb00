"""HERO loss from hidden states + LM head in three GEMMs: the gradients are computed in the forward pass.

``hero_loss(hidden, labels, A, weight=W)`` takes this path when autograd will need the gradient of the LM head
or of the hidden states and the loss is the final objective (``entropy_grad=False``, the default: the weights
are detached coefficients). The generic fused op (``linear_entropy_logprob``) cannot know the loss, so its
backward recomputes every [C, V] logits chunk: 4 GEMMs. Here each row chunk is seen once:

    z  = h_c @ W^T (+ b)                    GEMM 1 -> [C, V] buffer (memory budget: ``chunk_rows``)
    logp, H, lse = rows_forward(z)          the backend's fused row kernel
    s_i = dLoss/dlogp_i                     per token: clipped ratio, k3 KL, HERO weight, aggregation
    dz = s_i (onehot - softmax(z/tau))/tau  rows_backward, in place (grad_logp = s, grad_H = 0)
    dh_c = dz @ W                           GEMM 2
    dW += dz^T h_c  (fp32 / fp64)           GEMM 3 (and db += sum_rows dz)

and the backward only scales the stored (dh, dW, db) by the upstream scalar.

The one coupling across rows is HERO's weight w_i = L_s exp(x_i - m_s) / Z_s with x = -H / kappa,
Z_s = sum_{j in s} exp(x_j - m_s): it needs every entropy of response s. The loss is
sum_i c_i (w_i pg_i + beta kl_i) (c_i: the aggregation's coefficient), so

    s_i = alpha_i / Z_s + b_i,   alpha_i = c_i L_s exp(x_i - m) pg'_i  (weighted tokens),
                                 b_i     = c_i (beta kl'_i + [token not weighted] pg'_i)

and the weighted part of the response's gradient is linear in 1/Z_s. Rows are visited grouped by response
(a stable sort of the valid rows by response) and chunks end on response boundaries whenever a whole
response fits, so a chunk is either made of whole responses (everything known: plain 3 GEMMs) or of rows of
ONE response longer than the chunk ("open"). For an open response the weighted part goes, unscaled, into
one extra fp32 [V, D] accumulator X (``X += dz^T (alpha * h)`` with dz = onehot - p, a GEMM of the same
size), the unweighted part straight into dW, and its dh rows are kept unscaled; when the response's last
chunk is done, dW += X exp(m_X - m_s) / Z_s and the dh rows get their final s_i. m_X, X's reference shift,
follows the running max of x only when it grows by more than ``_RESCALE_AT`` (so X is rarely rescaled and
never overflows). No GEMM is recomputed; the price is X (allocated only when some response is longer than a
chunk) and, for 16-bit hidden states, one extra rounding of the open responses' dh rows.

The loss value and metrics are NOT computed here: ``hero_loss`` computes them from the (detached) logp and
H exactly as on the other paths and then calls ``attach``. The per-token derivatives pg', kl' come from
autograd of the loss's own elementwise token function on each chunk's [C] log-probs (elementwise, so exactly what the
4-GEMM path's autograd computes), and c_i from autograd of the caller's (linear) aggregation.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import _checks
from .backends import UpstreamGrads, gemm
from .backends.plan import KernelLaunch
from .dispatch import auto_linear_impl, backend_module, device_guard, resolve_impl
from .linear_entropy_logprob import prepare_inputs
from .options import RowOptions
from .weights import Segments

__all__ = ["TokenObjective", "applies", "run", "attach", "chunk_rows", "chunk_plan", "chunks_for", "plan",
           "CHUNK_BYTES"]

#: Memory budget of the [C, V] chunk buffers (logits, plus fp32 dlogits for 16-bit logits on CPU) per device
#: type. CPU: every chunk streams W (GEMMs 1, 2) and dW (GEMM 3) once, so C should not be tiny; measured on a
#: 2-core x86 at V = 128256, D = 256, the GEMM time per row is flat from C = 64 up (and ~1.4x higher at
#: C = 32), so 32 MiB (C = 65 there) keeps the peak at two [V, D] fp32 buffers + 32 MiB. CUDA (impl "cuda" and
#: "triton" alike, by the tensors' device): as the chunked CUDA backend.
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}

#: Backends whose row kernels this path can drive (the GEMMs are torch's: cuBLAS on a GPU). "triton" is what
#: impl="auto" resolves to on CUDA: its row kernels with cuBLAS GEMMs (the Triton fused head is not used here).
IMPLS = ("cpu", "torch", "cuda", "triton")

#: False sends every call to the recomputing 4-GEMM op (benchmarks and tests compare the two paths).
ENABLED = True

# X (the open response's unscaled weighted dW) is rescaled only when the running max of -H/kappa grows by
# more than this: exp(20) ~ 5e8 keeps every fp32 partial sum far from overflow.
_RESCALE_AT = 20.0


@dataclass
class TokenObjective:
    """What the per-token gradient needs, flat over the N tokens of ``labels`` (float32 [N] unless said).

    A: advantages (0 on masked tokens); old, ref: behaviour / reference log-probs or None (values on masked
    tokens are never read); beta, eps_low, eps_high, kappa: float32 0-dim tensors; weight_on: "all" |
    "negative"; entropy_weighting: False -> w = 1; segs: the response structure (valid tokens, segment ids,
    counts); token_loss: the loss's elementwise token function ``(logp, A, old_logp=, ref_logp=, eps_low=,
    eps_high=) -> (loss, pg, kl, ratio)``, differentiated by autograd; aggregate: the loss as a LINEAR
    function of per-token losses [N] -> 0-dim (masking included).
    """

    A: Tensor
    old: Optional[Tensor]
    ref: Optional[Tensor]
    beta: Tensor
    eps_low: Tensor
    eps_high: Tensor
    kappa: Tensor
    weight_on: str
    entropy_weighting: bool
    segs: Segments
    token_loss: Callable[..., Tuple[Tensor, Tensor, Tensor, Tensor]]
    aggregate: Callable[[Tensor], Tensor]


def applies(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], impl: str, entropy_grad: bool,
            others=()) -> bool:
    """Take the 3-GEMM path? Only when autograd will ask for dh / dW / db and for nothing else (``others``:
    advantages, old/ref log-probs, tensor options), eagerly (not under torch.compile, whose graph needs the
    static-shape 4-GEMM op), and on a backend with a chunk loop. Not for float16 hidden states: this path
    forms the dlogits in the forward, before any upstream gradient (a GradScaler's scale) multiplies them,
    and fp16 flushes them to zero at LM vocabularies (p_j ~ 1/V times a 1/tokens coefficient: dh ~10x eager's
    error at V = 32000 under a 2**16 scale); the op's backward forms them from the scaled upstream gradient."""
    if not ENABLED or entropy_grad or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        return False  # let the fused op raise its argument errors
    if hidden.dtype == torch.float16:
        return False
    if not any(isinstance(t, Tensor) and t.requires_grad for t in (hidden, weight, bias)):
        return False
    if any(isinstance(t, Tensor) and t.requires_grad for t in others):
        return False
    try:
        return resolve_impl(impl, hidden.device, hidden.dtype, "hidden") in IMPLS
    except (ValueError, TypeError, RuntimeError):
        return False  # the fused op raises the same error with its own message


def chunk_rows(V: int, elem_bytes: int, device_type: str, budget: Optional[int] = None) -> int:
    """Rows C per chunk so that the [C, V] buffers (``elem_bytes`` per element in all) fit the budget."""
    b = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) if budget is None else budget
    return max(1, b // max(V * elem_bytes, 1))


def chunk_plan(run_starts: List[int], C: int, open_runs: bool) -> List[Tuple[int, int, bool]]:
    """[(p0, p1, open)] over sorted rows [0, M); run_starts: first sorted position of each response, then M.

    A chunk ends on the last response boundary within C rows; when even the first response does not end
    within C rows the chunk is C rows of that one response and ``open`` (its weights are not known yet).
    Every two consecutive chunks hold more than C rows. open_runs=False (no entropy weighting): plain C cuts.
    """
    M = run_starts[-1]
    plan, p0 = [], 0
    while p0 < M:
        limit = min(p0 + C, M)
        if not open_runs:
            plan.append((p0, limit, False))
        else:
            b = run_starts[bisect.bisect_right(run_starts, limit) - 1]
            plan.append((p0, b, False) if b > p0 else (p0, limit, True))
        p0 = plan[-1][1]
    return plan


def _wide_dz(impl: str, compute_dtype: torch.dtype) -> bool:
    """16-bit logits: dlogits in a separate fp32 buffer on CPU (GEMM 3 sees unrounded values); in place on
    the GPU backends, whose dW GEMM takes 16-bit inputs with an fp32 output (and whose row backward writes
    ``out`` in the logits dtype only: the Triton launcher refuses an fp32 ``out`` for 16-bit logits)."""
    return impl not in ("cuda", "triton") and compute_dtype not in (torch.float32, torch.float64)


def chunk_elem_bytes(compute_dtype: torch.dtype, wide: bool) -> int:
    """Bytes per element of a chunk's [C, V] buffers: the logits (+ the fp32 dlogits when ``wide``)."""
    return torch.empty((), dtype=compute_dtype).element_size() + (4 if wide else 0)


def chunks_for(run_starts: List[int], V: int, elem_bytes: int, device_type: str, entropy_weighting: bool
               ) -> Tuple[int, List[Tuple[int, int, bool]]]:
    """(C, [(p0, p1, open)]): the chunk rows (``chunk_rows``) and the chunks (``chunk_plan``) that ``run``
    visits, for sorted rows with responses starting at ``run_starts`` (then M). ``plan`` calls the same."""
    C = chunk_rows(V, elem_bytes, device_type)
    return C, chunk_plan(run_starts, C, entropy_weighting)


class _Engine:
    """The backend pieces one chunk needs: logits GEMM, row kernels, dW accumulation."""

    def __init__(self, impl: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
        self.rows = backend_module(impl, "entropy_logprob")
        self.acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if impl == "torch":  # the reference math in fp32 (fp64 for fp64 inputs), on an upcast weight
            self.cd = self.acc
            self.w, self.b = weight.to(self.cd), (None if bias is None else bias.to(self.cd))
        else:
            self.cd = hidden.dtype
            self.w, self.b = weight, bias
        self.wide = _wide_dz(impl, self.cd)

    def elem_bytes(self) -> int:
        return chunk_elem_bytes(self.cd, self.wide)

    def logits(self, h: Tensor) -> Tensor:
        h = h.to(self.cd)
        return torch.addmm(self.b, h, self.w.t()) if self.b is not None else h @ self.w.t()

    def dz_buffer(self, z: Tensor) -> Tensor:
        return torch.empty(z.shape, dtype=torch.float32, device=z.device) if self.wide else z

    def dh(self, dz: Tensor) -> Tensor:
        return (dz if dz.dtype == self.w.dtype else dz.to(self.w.dtype)) @ self.w

    @staticmethod
    def add_dw(dW: Tensor, dz: Tensor, h: Tensor) -> None:
        """dW += dz^T h with partial sums in dW's dtype (fp32 / fp64); 16-bit dz: 16-bit GEMM, fp32 output."""
        gemm.accumulate_dw(dW, dz, h if dz.dtype == dW.dtype else h.to(dz.dtype))


class _Grads:
    """dh [N, D] (hidden.dtype), dW [V, D] and db [V] (fp32 / fp64 accumulators) or None, handed over once."""

    def __init__(self, dh: Optional[Tensor], dW: Optional[Tensor], db: Optional[Tensor], weight: Tensor,
                 bias: Optional[Tensor]):
        self.bufs = (dh, dW, db)
        self.dtypes = (None, weight.dtype, None if bias is None else bias.dtype)

    def take(self, g: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Scale by the upstream gradient g (in place: no second [V, D] buffer) and cast to the input dtypes."""
        if self.bufs is None:
            raise RuntimeError("hero_loss's 3-GEMM path hands its gradients over once; to backpropagate through "
                               "the same loss twice (retain_graph=True), call hero_loss with entropy_grad=True "
                               "or under torch.compile, which keep the recomputing op")
        bufs, self.bufs = self.bufs, None
        unit = g.device.type == "cpu" and float(g) == 1.0  # loss.backward(): nothing to scale
        out = []
        for t, dt in zip(bufs, self.dtypes):
            if t is not None:
                cast = dt is not None and t.dtype != dt
                if cast:
                    # fp32 accumulator -> weight dtype: the scale rides on the cast (one pass over [V, D], the
                    # product in fp32 and rounded once, bit-identical to scaling in place and then casting).
                    r = torch.empty_like(t, dtype=dt)
                    t = r.copy_(t) if unit else torch.mul(t, g.to(t.dtype), out=r)
                elif not unit and t.dtype in (torch.float32, torch.float64):
                    t.mul_(g.to(t.dtype))
                elif not unit:
                    # 16-bit dh: multiplied in fp32, rounded once. g cast to fp16 is inf at 2**16 (GradScaler's
                    # first scale); cast to bf16 it is rounded.
                    t.copy_(t.float().mul_(g.float()))
            out.append(t)
        return tuple(out)


class _Attach(torch.autograd.Function):
    """loss (computed from detached logp / H) -> the same value, whose backward returns the stored gradients."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grads):
        ctx.grads = grads
        ctx.hidden_shape = hidden.shape
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        dh, dW, db = ctx.grads.take(g)
        return None, (None if dh is None else dh.view(ctx.hidden_shape)), dW, db, None


def attach(loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], grads: _Grads) -> Tensor:
    """The loss value with the gradients ``run`` computed attached (w.r.t. hidden, weight, bias)."""
    return _Attach.apply(loss, hidden, weight, bias, grads)


def _token_grads(token_loss, lp: Tensor, A: Tensor, old: Optional[Tensor], ref: Optional[Tensor], eps_low: Tensor,
                 eps_high: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """(d pg / d logp, d kl / d logp) per token [C], by autograd of the same elementwise code the loss runs."""
    with torch.enable_grad():
        x = lp.detach().requires_grad_(True)
        _, pg, kl, _ = token_loss(x, A, old_logp=old, ref_logp=ref, eps_low=eps_low, eps_high=eps_high)
        dpg = torch.autograd.grad(pg.sum(), x, retain_graph=ref is not None)[0]
        dkl = None if ref is None else torch.autograd.grad(kl.sum(), x)[0]
    return dpg, dkl


def _agg_coef(aggregate: Callable[[Tensor], Tensor], N: int, device) -> Tensor:
    """c [N] = d aggregate / d loss_tok: the aggregation is linear, so its gradient is its coefficients."""
    with torch.enable_grad():
        lt = torch.zeros(N, dtype=torch.float32, device=device, requires_grad=True)
        c = torch.autograd.grad(aggregate(lt), lt, allow_unused=True)[0]
    return torch.zeros(N, dtype=torch.float32, device=device) if c is None else c.detach()


def _merge_max(m: Tensor, Z: Tensor, seg: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Online per-segment softmax normalizer: fold a chunk's x [C] (segments ``seg``) into (max m, Z) [S]."""
    m_new = m.scatter_reduce(0, seg, x, reduce="amax", include_self=True)
    keep = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(Z), torch.exp(m - m_new))
    Z_new = (Z * keep).index_add(0, seg, torch.exp(x - m_new[seg]))
    return m_new, Z_new


class _Rows:
    """The valid tokens grouped by response (a stable sort by segment id) and their per-token terms."""

    def __init__(self, obj: TokenObjective, N: int, device):
        segs = obj.segs
        vidx = torch.nonzero(segs.valid).flatten()
        seg_v = segs.seg.index_select(0, vidx)
        order = torch.argsort(seg_v, stable=True)
        self.idx, self.seg = vidx.index_select(0, order), seg_v.index_select(0, order)
        self.M = M = self.idx.numel()
        change = (torch.nonzero(self.seg[1:] != self.seg[:-1]).flatten() + 1).tolist() if M > 1 else []
        self.run_starts = [0] + change + [M] if M else [0]

        def pick(t):
            return None if t is None else t.reshape(-1).to(torch.float32).index_select(0, self.idx)

        self.A, self.old, self.ref = pick(obj.A), pick(obj.old), pick(obj.ref)
        self.c = _agg_coef(obj.aggregate, N, device).index_select(0, self.idx)
        self.count = segs.count.index_select(0, self.seg)
        if obj.weight_on == "negative":
            self.weighted = self.A < 0
        else:
            self.weighted = torch.ones(M, dtype=torch.bool, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.logp, self.H = torch.empty(M, **f32), torch.empty(M, **f32)
        self.dpg, self.dkl = torch.empty(M, **f32), (None if self.ref is None else torch.empty(M, **f32))


class _Run:
    """State of one forward: the per-segment normalizers, the accumulators and the open response's X."""

    def __init__(self, eng: _Engine, rows: _Rows, obj: TokenObjective, h: Tensor, y: Tensor, opts: RowOptions,
                 need_dh: bool, need_w: bool, need_b: bool):
        self.eng, self.rows, self.obj, self.h, self.y, self.opts = eng, rows, obj, h, y, opts
        N, D = h.shape
        V = eng.w.shape[0]
        dev = h.device
        S = obj.segs.S
        self.m = torch.full((S,), float("-inf"), dtype=torch.float32, device=dev)
        self.Z = torch.zeros(S, dtype=torch.float32, device=dev)
        self.dh = torch.zeros((N, D), dtype=h.dtype, device=dev) if need_dh else None
        # dW and X start unwritten: their first GEMM writes them (beta = 0), so no [V, D] zero-fill pass
        self.dW = torch.empty((V, D), dtype=eng.acc, device=dev) if need_w else None
        self.fresh = {"dW": True, "X": True}
        self.db = torch.zeros(V, dtype=eng.acc, device=dev) if need_b else None
        self.X = self.Xb = None  # the open response's unscaled weighted dW / db, in units of exp(x - m_X)
        self.open_seg: Optional[int] = None
        self.m_X = 0.0
        self.deferred: List[Tuple[int, int]] = []  # sorted-row ranges whose dh rows still need s_i
        # b_i (the unweighted part) can be non-zero on weighted responses only with a KL term or weight_on="negative"
        self.b_possible = obj.ref is not None or obj.weight_on == "negative"

    def x(self, sl: slice) -> Tensor:
        return -self.rows.H[sl] / self.obj.kappa

    def coef(self, sl: slice) -> Tensor:
        """s_i = dLoss/dlogp_i of sorted rows ``sl`` whose responses are complete (m, Z final)."""
        r, o = self.rows, self.obj
        g = r.dpg[sl]
        if o.entropy_weighting:
            seg = r.seg[sl]
            w = r.count[sl] * torch.exp(self.x(sl) - self.m[seg]) / self.Z[seg]
            g = torch.where(r.weighted[sl], w, torch.ones_like(w)) * g
        if r.dkl is not None:
            g = g + o.beta * r.dkl[sl]
        return r.c[sl] * g

    def chunk(self, p0: int, p1: int, is_open: bool) -> None:
        r, eng, o = self.rows, self.eng, self.obj
        sl = slice(p0, p1)
        idx = r.idx[sl]
        hc, yc = self.h.index_select(0, idx), self.y.index_select(0, idx)
        z = eng.logits(hc)  # GEMM 1
        saved = eng.rows.forward(z, yc, self.opts)
        lp = saved.logp
        r.logp[sl], r.H[sl] = lp, saved.H
        dpg, dkl = _token_grads(o.token_loss, lp, r.A[sl], None if r.old is None else r.old[sl],
                                None if r.ref is None else r.ref[sl], o.eps_low, o.eps_high)
        r.dpg[sl] = dpg
        if dkl is not None:
            r.dkl[sl] = dkl
        if o.entropy_weighting:
            self.m, self.Z = _merge_max(self.m, self.Z, r.seg[sl], self.x(sl))
        zero = torch.zeros_like(lp)
        scale = torch.ones_like(lp) if is_open else self.coef(sl)
        dz = eng.rows.backward(z, yc, saved, UpstreamGrads(scale, zero), self.opts, out=eng.dz_buffer(z))
        del z
        if self.dh is not None:  # GEMM 2
            self.dh.index_copy_(0, idx, eng.dh(dz).to(self.dh.dtype))
            if is_open:
                self.deferred.append((p0, p1))
        if is_open:
            self._open_grads(sl, dz, hc)
            return
        if self.open_seg is not None:
            self._fold()
        if self.dW is not None:  # GEMM 3
            self._gemm_into("dW", dz, hc)
        if self.db is not None:
            self.db += dz.sum(0, dtype=self.db.dtype)

    def _open_grads(self, sl: slice, u: Tensor, hc: Tensor) -> None:
        """Rows ``sl`` of one response longer than a chunk; u = onehot - p (grad_logp = 1)."""
        r, o, eng = self.rows, self.obj, self.eng
        seg = int(r.seg[sl.start])
        m_seg = float(self.m[seg])
        if self.open_seg is not None and self.open_seg != seg:
            self._fold()
        if self.open_seg is None:  # first chunk of this response: X restarts at its running max
            self.open_seg, self.m_X = seg, m_seg
            self.fresh["X"] = True
            if self.Xb is not None:
                self.Xb.zero_()
        elif m_seg > self.m_X + _RESCALE_AT:
            for t in (None if self.fresh["X"] else self.X, self.Xb):
                if t is not None:
                    t.mul_(math.exp(self.m_X - m_seg))
            self.m_X = m_seg
        if self.dW is None and self.db is None:
            return  # dh only: its rows are scaled in finish()
        acc = eng.acc
        e = r.count[sl] * torch.exp(self.x(sl) - self.m_X)
        alpha = r.c[sl] * torch.where(r.weighted[sl], e, torch.zeros_like(e)) * r.dpg[sl]
        if self.dW is not None:
            if self.X is None:
                self.X = torch.empty_like(self.dW)
            self._gemm_into("X", u, alpha[:, None].to(acc) * hc.to(acc))
        if self.db is not None:
            if self.Xb is None:
                self.Xb = torch.zeros_like(self.db)
            self.Xb.addmv_(u.t().to(acc), alpha.to(acc))
        if not self.b_possible:
            return
        b = torch.where(r.weighted[sl], torch.zeros_like(alpha), r.dpg[sl])
        if r.dkl is not None:
            b = b + o.beta * r.dkl[sl]
        b = r.c[sl] * b
        if bool((b != 0).any()):  # KL term or unweighted (A >= 0 with weight_on="negative") tokens
            if self.dW is not None:
                self._gemm_into("dW", u, b[:, None].to(acc) * hc.to(acc))
            if self.db is not None:
                self.db.addmv_(u.t().to(acc), b.to(acc))

    def _fold(self) -> None:
        """The open response is complete: dW += X exp(m_X - m_s) / Z_s (and db likewise)."""
        seg, self.open_seg = self.open_seg, None
        f = math.exp(self.m_X - float(self.m[seg])) / float(self.Z[seg])
        if self.X is not None and not self.fresh["X"]:
            if self.fresh["dW"]:
                torch.mul(self.X, f, out=self.dW)
                self.fresh["dW"] = False
            else:
                self.dW.add_(self.X, alpha=f)
        if self.Xb is not None:
            self.db.add_(self.Xb, alpha=f)

    def _gemm_into(self, name: str, dz: Tensor, h: Tensor) -> None:
        """dW or X (+)= dz^T h: the first GEMM into an unwritten accumulator writes it (no zero-fill)."""
        t = getattr(self, name)
        if self.fresh[name]:
            # one operand dtype: dz's (fp32 dz from a CPU backend's wide buffer or the torch backend comes
            # with the 16-bit hidden rows; mm_into, unlike accumulate_mm, does not cast b)
            gemm.mm_into(dz.t(), h if h.dtype == dz.dtype else h.to(dz.dtype), t)
            self.fresh[name] = False
        else:
            self.eng.add_dw(t, dz, h)

    def finish(self) -> None:
        if self.open_seg is not None:
            self._fold()
        if self.dW is not None and self.fresh["dW"]:  # nothing reached dW (e.g. every weight zero)
            self.dW.zero_()
        self.X = self.Xb = None
        for p0, p1 in self.deferred:  # open responses' dh rows: s_i now that their Z_s is known
            idx = self.rows.idx[p0:p1]
            s = self.coef(slice(p0, p1))
            self.dh.index_copy_(0, idx, (self.dh.index_select(0, idx) * s[:, None]).to(self.dh.dtype))


def run(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
        ignore_index: int, impl: str, obj: TokenObjective) -> Tuple[Tensor, Tensor, _Grads]:
    """(logp, H) shaped like labels (float32, detached; 0 off the responses) and the loss's gradients.

    hidden [..., D], weight [V, D], bias [V] | None, labels [...]: as ``linear_entropy_logprob``. impl "auto"
    on a CUDA device: the Triton row kernels, or the CUDA extension's where this path's plan models faster
    (``dispatch.auto_linear_impl``); the GEMMs are cuBLAS either way.
    """
    h, w, b, y, opts, resolved = prepare_inputs(hidden, weight, labels, bias, temperature, ignore_index, impl)
    if impl == "auto" and resolved == "triton" and h.device.type == "cuda":
        resolved = auto_linear_impl(h.shape[0], h.shape[1], w.shape[0], h.dtype, h.device, b is not None,
                                    op="linear_hero_loss")
    impl = resolved
    _checks.check_label_values(y, w.shape[0], opts.ignore_index)
    _checks.check_finite(hidden=h, weight=w, bias=b)
    need_b = bias is not None and bias.requires_grad
    N = h.shape[0]
    with torch.no_grad(), device_guard(h):
        eng = _Engine(impl, h, w, b)
        rows = _Rows(obj, N, h.device)
        st = _Run(eng, rows, obj, h, y, opts, hidden.requires_grad, weight.requires_grad, need_b)
        _, chunks = chunks_for(rows.run_starts, w.shape[0], eng.elem_bytes(), h.device.type, obj.entropy_weighting)
        for p0, p1, is_open in chunks:
            st.chunk(p0, p1, is_open)
        st.finish()
        f32 = dict(dtype=torch.float32, device=h.device)
        logp = torch.zeros(N, **f32).index_copy_(0, rows.idx, rows.logp)
        H = torch.zeros(N, **f32).index_copy_(0, rows.idx, rows.H)
    return logp.view(labels.shape), H.view(labels.shape), _Grads(st.dh, st.dW, st.db, weight, bias)


# ----------------------------------------------------------------------------------------------
# launch plan of the GPU path (impl "cuda" or "triton"), for benchmarks/roofline.py and impl="auto"
# (hero_kernels.backends.plan's conventions)
# ----------------------------------------------------------------------------------------------
#: Small [C]-sized torch ops per chunk beyond the GEMMs, the row kernels, the [C, D] row gathers / stores and
#: the host syncs: the token derivatives by autograd (``_token_grads``), the online normalizer (``_merge_max``),
#: s_i (``coef``) and the per-row buffer stores. Counted with a TorchDispatchMode over one chunk of the CPU
#: impl with the engine's calls excluded (~70 ops less those entries); each is one launch-bound kernel.
TOKEN_OPS = 64
#: Response length the plan assumes when none is given (a common GRPO completion budget).
DEFAULT_RESPONSE_TOKENS = 1024
# Per valid row: the sorted index / segment / count (int64), A, old, ref, c, logp, H, dpg, dkl (fp32), weighted.
_ROW_BYTES = 3 * 8 + 8 * 4 + 1


def _chunk_kinds(lengths: List[int], chunks: List[Tuple[int, int, bool]]) -> dict:
    """{(rows, open, fold_before, x_start): count}: which work each chunk of ``run`` does. fold_before: an
    open response is folded into dW first (``_fold``); x_start: the first chunk of an open response (X is
    allocated once; its first GEMM writes it). Also the key "end_fold" (0 / 1) and "deferred" (dh rows
    rescaled in ``finish``)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    kinds: dict = {}
    open_seg, deferred = None, 0
    for p0, p1, is_open in chunks:
        seg = bisect.bisect_right(starts, p0) - 1
        fold = open_seg is not None and (not is_open or open_seg != seg)
        x_start = is_open and (open_seg is None or open_seg != seg)
        open_seg = seg if is_open else None
        deferred += (p1 - p0) if is_open else 0
        key = (p1 - p0, is_open, fold, x_start)
        kinds[key] = kinds.get(key, 0) + 1
    kinds["end_fold"], kinds["deferred"] = int(open_seg is not None), deferred
    return kinds


def plan(N: int, D: int, V: int, dtype, *, pass_: str = "fwd+bwd", lengths: Optional[List[int]] = None,
         entropy_weighting: bool = True, kl: bool = False, weight_on: str = "all", has_bias: bool = False,
         need_dh: bool = True, need_dw: bool = True, impl: str = "cuda") -> List[KernelLaunch]:
    """Launches of the GPU 3-GEMM path (``impl`` "cuda" or "triton": whose row kernels) for N valid tokens in
    responses of ``lengths`` valid tokens each (default: ``DEFAULT_RESPONSE_TOKENS``-token responses), as
    ``run`` visits them: the chunk rows and chunks from ``chunks_for`` (the budget ``CHUNK_BYTES["cuda"]``).
    pass_ "fwd": the forward (all three GEMMs per chunk: the gradients are made there); "bwd": the hand-over
    (``_Grads.take``: scale by the upstream gradient, cast dW); "fwd+bwd": both. kl (a reference policy with
    beta > 0) or weight_on="negative": an open chunk may also run the unweighted part's dW GEMM (assumed it
    does). Per chunk: cuBLAS logits, the ``impl`` backend's row forward and backward (in place on the chunk:
    that row op's own ``plan``), cuBLAS dh and dW (open chunks: into the fp32 X instead), the row gathers /
    dh stores and ``TOKEN_OPS`` token-sized ops. ``live_bytes``: the [C, V] chunk, the chunk's hidden rows and dh product,
    the fp32 dW [V, D] (held from the forward to the hand-over), X [V, D] once an open response appears,
    the per-row buffers; the hand-over: fp32 dW beside its returned cast (and a 16-bit dh's fp32 copy while
    it is scaled)."""
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_!r}")
    if impl not in ("cuda", "triton"):
        raise ValueError(f"impl must be 'cuda' or 'triton' (the GPU row kernels), got {impl!r}")
    _rows = backend_module(impl, "entropy_logprob")  # the row op's plan (imports no extension)
    tdt = gemm.as_dtype(dtype)
    e = torch.finfo(tdt).bits // 8
    if lengths is None:
        L = DEFAULT_RESPONSE_TOKENS
        lengths = [L] * (N // L) + ([N % L] if N % L else [])
    lengths = [int(n) for n in lengths if n > 0]
    if sum(lengths) != N:
        raise ValueError(f"lengths must sum to N = {N} valid tokens, got {sum(lengths)}")
    run_starts = [0]
    for n in lengths:
        run_starts.append(run_starts[-1] + n)
    C, chunks = chunks_for(run_starts, V, chunk_elem_bytes(tdt, _wide_dz(impl, tdt)), "cuda", entropy_weighting)
    kinds = _chunk_kinds(lengths, chunks)
    VD = V * D
    acc = 4 * VD if (need_dw and e != 4) else 0  # the fp32 dW beyond the returned weight-dtype gradient
    x_bytes = 4 * VD if (need_dw and any(k[1] for k in kinds if isinstance(k, tuple))) else 0
    small = _ROW_BYTES * N + (8 * V if has_bias else 0)
    loop_mem = C * V * e + 2 * C * D * e + 6 * C * D + acc + x_bytes + small
    note = "cuBLAS: operands streamed once per GEMM; the [C, V] chunk does not fit in 50 MB of L2"
    ext = dict(external=True, live_bytes=loop_mem)

    def stream(name, nbytes, why, reps, **kw):
        return KernelLaunch(name, (), "stream", 0.0, float(nbytes), why, repeats=reps, **dict(ext, **kw))

    def gemm_(name, c, nbytes, reps, why=note, is_open=False):
        return KernelLaunch(name, (), "gemm", 2.0 * c * D * V, float(nbytes), why, repeats=reps,
                            meta={"chunk_rows": c, "open": is_open}, **ext)

    def row_kernel(c, which, reps):
        (k,) = _rows.plan(c, V, tdt, pass_=which, inplace_backward=which == "bwd")
        return dataclasses.replace(k, meta=dict(k.meta, chunk_rows=c), repeats=reps, live_bytes=loop_mem)

    out: List[KernelLaunch] = []
    if pass_ in ("fwd", "fwd+bwd"):
        out += [stream("group_rows", 64 * N, "nonzero / stable sort by response / per-row gathers ([N] vectors); "
                       "nonzero and the response starts' .tolist() sync the host", 2, host_sync=True),
                stream("zero_grads", N * D * e if need_dh else 0, "zero-filled dh (masked rows stay 0; the fp32 "
                       "dW is written by its first GEMM)", 1)]
        out += _chunk_launches(kinds, C, D, V, e, stream, gemm_, row_kernel, has_bias=has_bias, need_dh=need_dh,
                               need_dw=need_dw, extra_open_gemm=kl or weight_on == "negative")
        if kinds["end_fold"]:
            out.append(stream("fold_x", 12 * VD if need_dw else 0, "dW += X exp(m_X - m_s) / Z_s; m, Z read "
                              "back (host sync)", 1, host_sync=True))
        if kinds["deferred"] and need_dh:
            out += [stream("deferred_dh", 20 * kinds["deferred"] * D, "open responses' dh rows times s_i "
                           "(gather, fp32 product, cast, store)", 1),
                    stream("token_ops", 0, "s_i of the deferred rows", TOKEN_OPS // 4)]
        out.append(stream("scatter_outputs", 16 * N, "logp, H back to the token order", 2))
    if pass_ in ("bwd", "fwd+bwd"):
        hand = dict(live_bytes=acc)
        dh_bytes = (2 * N * D * e if e == 4 else N * D * (2 * e + 12)) if need_dh else 0
        # fp32 weights: dW scaled in place; 16-bit: the scale rides on dW's cast (one pass, ``_Grads.take``).
        out += [stream("scale_grads", (0 if acc or not need_dw else 8 * VD) + dh_bytes, "dh (and an fp32 dW) "
                       "times the upstream gradient, in place (16-bit dh: through an fp32 copy, 3 passes)", 1,
                       live_bytes=acc + (4 * N * D if need_dh and e != 4 else 0))]
        if acc:
            out.append(stream("dw_cast", VD * (4 + e), "fp32 dW times the upstream gradient, cast to the weight "
                              "dtype in one pass", 1, **hand))
    return out


def _chunk_launches(kinds, C, D, V, e, stream, gemm_, row_kernel, *, has_bias, need_dh, need_dw,
                    extra_open_gemm) -> list:
    """The per-chunk entries of ``plan``, one group per kind of chunk (``_chunk_kinds``), repeats = count."""
    VD = V * D
    out = []
    for key, reps in kinds.items():
        if not isinstance(key, tuple):
            continue
        c, is_open, fold, x_start = key
        cv = c * V * e
        out += [stream("gather_rows", 2 * c * D * e + 24 * c, "the chunk's hidden rows and labels", reps),
                gemm_("cublas_logits", c, c * D * e + VD * e + cv, reps, is_open=is_open),
                row_kernel(c, "fwd", reps),
                stream("token_ops", 0, "per-token derivatives, normalizer, s_i ([C] vectors)", reps * TOKEN_OPS),
                row_kernel(c, "bwd", reps)]
        if need_dh:
            out += [gemm_("cublas_dh", c, cv + VD * e + c * D * e, reps, is_open=is_open),
                    stream("dh_store", 2 * c * D * e + 8 * c, "index_copy of the chunk's dh rows", reps)]
        if is_open:
            syncs = 2 + int(extra_open_gemm)
            out.append(stream("open_sync", 0, "segment id, running max (and the unweighted check) read back",
                              reps * syncs, host_sync=True))
            gemms = (1 + int(extra_open_gemm)) if need_dw else 0
            for g in range(gemms):
                out += [stream("open_rows", 20 * c * D, "alpha * h in fp32, cast for the GEMM", reps),
                        gemm_("cublas_x" if g == 0 else "cublas_dw", c, cv + c * D * e + 8 * VD, reps,
                              _open_note(g), is_open=True)]
            if has_bias:
                out.append(stream("db_open", cv * (1 + int(extra_open_gemm)), "Xb += u^T alpha (GEMV)", reps))
            continue
        if fold:
            out.append(stream("fold_x", 12 * VD if need_dw else 0, "dW += X exp(m_X - m_s) / Z_s; m, Z read back "
                              "(host sync)", reps, host_sync=True))
        if need_dw:
            out.append(gemm_("cublas_dw", c, cv + c * D * e + 8 * VD, reps,
                             "cuBLAS, fp32 dW read and written in its epilogue (beta = 1); the [C, V] chunk does "
                             "not fit in 50 MB of L2"))
            if has_bias:
                out.append(stream("db_sum", cv + 8 * V, "column sums of the chunk", reps))
    return out


def _open_note(g: int) -> str:
    """l2_note of an open chunk's g-th dW-sized GEMM."""
    return ("cuBLAS into the fp32 X [V, D] (beta = 1): the open response's weighted part, unscaled" if g == 0 else
            "cuBLAS into dW (beta = 1): the open response's unweighted part (KL / unweighted tokens)")
