"""Fused LM head on Triton: design, and the numbers behind it (API: ``..linear_entropy_logprob``).

Modules: ``kernels.py`` (the Triton kernels), ``config.py`` (tiles, vocab splits), ``launch.py`` (``plan``
and the launchers; every grid, split and chunk size comes from ``plan``), ``compile.py`` (compile metadata
derived from the kernels' own argument lists). The chunked backward's GEMM half is shared with the CUDA
backend in ``hero_kernels.backends.gemm``.

Numbers below: N = 16384 tokens, D = 4096, V = 128256, bf16, H100 SXM (3.35 TB/s, 989 TFLOP/s bf16,
50 MB L2) / H200 (4.8 TB/s); floor = 8 N D V FLOPs = 6.9e16 = 69.6 ms (forward GEMM, logits recompute,
dh GEMM, dW GEMM). Modeled = ``plan(...)`` through ``hero_kernels.backends.plan.modeled_seconds`` (peak
rates, so a GPU run will be slower by the kernels' efficiency, not by their design).

Forward (``_fwd_partials_kernel`` + ``_merge_partials_kernel``)
----------------------------------------------------------------
Every program sweeps one vocab split of one 128-row block. The old (row blocks, splits) grid ran the 132
co-resident programs on 132 different row blocks: each re-read its own 1 MB hidden block per vocab tile
with a 132 MB working set, ~134 GB of HBM traffic (~40 ms) against a 17.4 ms compute floor. Now the grid
is 1-D and split-fastest with S = 12 splits (8..16, ~sqrt(SMs)): a wave is 11 row blocks x 12 splits, the
11 hidden blocks (11 MB) stay in L2 and each W tile is shared by 11 programs, so W is streamed 12 times:
12.7 GB of HBM in 17.4 ms (0.73 TB/s, 22 % of an H100). Modeled 17.41 ms = 1.001 x its floor. The merge
kernel (fixed split order) reads 5 S N fp32 partials (3.9 MB). No [N, V] anywhere.

Backward: two designs, chosen by the model
------------------------------------------
The old deterministic kernels read-modify-wrote a program's fp32 dh (64 x D) / dW (128 x D) block for
every tile: ~0.6 TB + ~1.3 TB of traffic with a working set far past L2 (>= 570 ms), plus a second logits
recompute (10 N D V FLOPs).
(a) chunked (default, deterministic): per chunk of C rows, ``_bwd_dz_kernel`` computes the logits tile in
    fp32 registers (the forward's GEMM again) and writes dz [C, V] ONCE in bf16 (the label column from
    the forward's logp, accurate as p_y -> 1); cuBLAS then computes dh_c = dz @ W (written once) and
    dW += dz^T h_c with the fp32 dW as the GEMM's C operand (beta = 1: read + written once per chunk, in
    the epilogue; the first chunk writes it, so there is no zero-fill). C comes from a memory budget:
    <= 2 % of a LOWER bound of eager's materialized peak, N V (e + 8) bytes = 21.0 GB, and >= 1280 rows so
    the dW epilogue (8 V D = 4.2 GB per chunk) stays under the chunk's dW GEMM time on an H100
    (C >= 4 x 989 / 3.35 = 1181). Here C = 1504 (11 nearly equal chunks): the dz buffer is 386 MB = 1.8 %
    of that bound (+ the fp32 dW itself). Traffic: dz written once and read twice (12.6 GB), dW 46 GB
    inside compute-bound GEMMs (each 1.6 ms of FLOPs vs 1.37 ms of bytes on an H100). FLOPs 6 N D V.
    Modeled backward 53.3 ms; fwd + bwd 70.71 ms = 1.016 x the floor on an H100, 70.42 ms = 1.012 x on
    an H200 (the dW cast to bf16, 0.9 ms, is most of the rest).
(b) fused in the style of Cut Cross-Entropy: one kernel per (row tile, vocab tile), dz in registers,
    dh += dz W and dW += dz^T h through fp32 atomics, grouped program order so the tiles being added to
    stay in L2. Same 6 N D V FLOPs, but 4 N V D (1/BV + 1/BN) = 538 GB of fp32 atomics into L2 at
    128 x 128 tiles (>= ~100 ms at ~5.5 TB/s of L2 bandwidth, before atomic throughput limits), and not
    deterministic. A deterministic (b) needs a program to own dh [BN, D] / dW [BV, D] (1-2 MB of fp32,
    beyond registers and shared memory): per-tile read-modify-write again, or a D split that recomputes
    the logits D / BD times. So (a) is the default; (b) stays as ``deterministic=False``
    (``_bwd_atomic_kernel``, grouped order, relaxed atomics), its plan stating the unmodeled L2 atomics.
Why not the row kernel in place on a bf16 logits chunk (as the CUDA backend does): the forward's lse
comes from fp32 logits, so probabilities from the ROUNDED logits do not sum to 1 and the gradients carry a
correlated error (measured on the tests' N=37, D=96, V=1003 bf16 problem, tau = 1.3: grad_bias 5.8e-2 vs
eager bf16 PyTorch's 2.0e-2); refreshing lse / H from the chunk fixes the sum but keeps bf16 logits
(dominant-label grad_weight 3.2e-2, over the 2e-2 bound) and costs three more passes over the chunk
(row read + write, refresh read: ~3.8 ms on an H100). The dz epilogue keeps fp32 logits: grad_bias
7.4e-3, grad_hidden 9.7e-3, grad_weight 2.2e-2 vs eager's 2.0e-2 / 2.5e-2 / 8.4e-2 on that problem
(interpreter, which rounds bf16 by truncation).

Non-finite inputs: -inf logits (masked vocabulary) may fill whole tiles and whole splits, even the first
ones (finite stand-in max, one select per row and tile); their p is 0 in the backward. NaN in a row's
hidden, or in any weight row / bias entry, makes that row's logp and H NaN.
"""
