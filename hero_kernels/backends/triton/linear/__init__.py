"""Fused LM head on Triton: design, and the numbers behind it (API: ``..linear_entropy_logprob``).

Modules: ``kernels.py`` (the Triton kernels), ``config.py`` (tiles, vocab splits), ``launch.py`` (``plan``
and the launchers; every grid, split and chunk size comes from ``plan``), ``chunked.py`` (the chunked design of
each pass: cuBLAS logits + the Triton row kernels of ``entropy_logprob``, the vocab slice's label column
by ``..slice_label``), ``compile.py`` (compile metadata derived from the kernels' own argument lists). The fused gradient sketch (``linear_grad_sketch``) reuses the
logits tile, vocab splits and chunked backward: ``sketch_kernels.py`` and ``sketch_launch.py`` (its ``plan``). The chunked backward's GEMM half is shared with the CUDA
backend in ``hero_kernels.backends.gemm``.

Numbers below: N = 16384 tokens, D = 4096, V = 128256, bf16, H100 SXM (3.35 TB/s, 989 TFLOP/s bf16,
50 MB L2) / H200 (4.8 TB/s); floor = 8 N D V FLOPs = 6.9e13 = 69.6 ms at the datasheet peak (forward GEMM,
logits recompute, dh GEMM, dW GEMM). Modeled = ``plan(...)`` through ``hero_kernels.backends.plan``'s model:
tensor cores at 0.75 (H100) / 0.80 (H200) of the peak for every GEMM, our tl.dot tiles' L2 -> SM operand
traffic at 6 TB/s, HBM at 0.9 of the datasheet (constants and sources in ``GpuSpec``).

Forward (``_fwd_partials_kernel`` + ``_merge_partials_kernel``)
----------------------------------------------------------------
Every program sweeps one vocab split of one 128-row block. The old (row blocks, splits) grid ran the 132
co-resident programs on 132 different row blocks: each re-read its own 1 MB hidden block per vocab tile
with a 132 MB working set, ~134 GB of HBM traffic (~40 ms) against a 17.4 ms compute floor. Now the grid
is 1-D and split-fastest with S = 12 splits (8..16, ~sqrt(SMs)): a wave is 11 row blocks x 12 splits, the
11 hidden blocks (11 MB) stay in L2 and each W tile is shared by 11 programs, so W is streamed 12 times:
12.7 GB of HBM, not the bound. The bound is L2 -> SM: a BN x BV x 64 tile (no TMA multicast) pulls
(BN + BV) x 64 x 2 bytes per 2 x BN x BV x 64 FLOPs. On sm_90 the tile is 128 x 256 (8 warps = two
consumer warpgroups, 128 fp32 accumulator registers per thread, as CUTLASS runs it): 85 FLOP/B, 202 GB at
the flagship shape, 33.6 ms at 6 TB/s (512 TFLOP/s) against 23.2 ms of tensor-core time at 0.75: modeled
1.93 x the 2 N D V floor (128 x 128, sm_80's tile: 64 FLOP/B, 44.8 ms, 2.58 x). It fits in registers
(255, no spill on sm_90a) because the epilogue is lean (``kernels._online_update``): exp2, one int32
compare of the label's column per row against the tile's column index, and the select pass (column mask,
label logit taken out of the tile and added back per row) only on tiles holding a label or padded
columns; ~12 SASS per element on the other tiles (~30 on every tile before, when every larger tile
spilled 470-740 B). The merge kernel (fixed split order) reads 5 S N fp32 partials (3.9 MB). No [N, V]
anywhere.

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
    Tiles per architecture (``config.default_config(dtype, arch)``; the launchers pass their device's,
    ``plan`` models sm_90's by default): on sm_90 the dz kernel runs 128 x 256 x 64 (8 warps, 3 stages;
    85 FLOP/B; spill-free on sm_90a: 198 registers, 144 KB of shared memory, wgmma), elsewhere the
    forward's 128 x 128 (that tile spills 80-96 B on sm_80). Modeled on an H100: ``_bwd_dz_kernel``
    L2-bound at 33.7 ms (44.9 ms at 128 x 128), cuBLAS dh + dW 46.5 ms at 0.75 of the peak; fwd + bwd
    115.3 ms = 1.66 x the floor on an H100, 112.3 ms = 1.61 x on an H200 (the 128 x 256 forward included).
    Loop order and memory (``gemm.backward_order``, the plan's ``live_bytes``): chunks of rows over the
    whole vocabulary need an fp32 dW [V, D] across chunks (2.1 GB) and its cast (1.05 GB): 2.5 GB = 12 %
    of eager's lower bound beyond the returned gradients. So where n < V the loop runs over vocab SLICES
    of Vc columns outside ("vocab" order): dz [n, Vc] (the dz kernel on W[slice] with the slice's label
    offset, like a vocab shard; launched in the row chunks above so each launch's hidden rows stay in
    L2), then dW[slice] = dz^T h as ONE cuBLAS GEMM over all rows (fp32 accumulation inside it, written
    once in bf16) and dh += dz W[slice] into an fp32 [n, D] (268 MB, cast once at the end). Vc = 4608
    from the rest of the budget: 0.42 GB = 2.0 %. Same 6 N D V FLOPs; the dh GEMM's fp32 epilogue moves
    8 n D per slice (15 GB in all, compute-bound at Vc >= 1280) instead of dW's 8 V D per row chunk.
    Rejected: casting the fp32 dW down in place into the front half of its own storage. The returned
    grad (kept by AccumulateGrad through the optimizer step) would own a storage twice its size, and
    shrinking it does not help: ``untyped_storage().resize_()`` on CUDA allocates the new block and
    copies before it frees the old one (ATen ``resize_bytes_cuda``), a 6 V D peak again.
(b) fused in the style of Cut Cross-Entropy: one kernel per (row tile, vocab tile), dz in registers,
    dh += dz W and dW += dz^T h through fp32 atomics, grouped program order so the tiles being added to
    stay in L2. Same 6 N D V FLOPs, but 4 N V D (1/BV + 1/BN) = 538 GB of fp32 atomics into L2 at
    128 x 128 tiles (>= ~100 ms at ~5.5 TB/s of L2 bandwidth, before atomic throughput limits), and not
    deterministic. A deterministic (b) needs a program to own dh [BN, D] / dW [BV, D] (1-2 MB of fp32,
    beyond registers and shared memory): per-tile read-modify-write again, or a D split that recomputes
    the logits D / BD times. So (a) is the default; (b) stays as ``deterministic=False``
    (``_bwd_atomic_kernel``, grouped order, relaxed atomics), its plan stating the unmodeled L2 atomics.
Which logits the backward uses: those the forward's lse / H came from. The fused forward's are fp32 (registers),
the chunked forward's are rounded once to the 16-bit input dtype (as eager PyTorch and the CUDA path). Mixing
them breaks the sum of the probabilities: dz from rounded logits against the lse of fp32 ones had grad_bias
5.8e-2 vs eager bf16 PyTorch's 2.0e-2 (the tests' N=37, D=96, V=1003 bf16 problem, tau = 1.3), and refreshing
lse / H from the chunk costs three more passes over it. So ``plan`` derives the forward's design for the
backward (the backend API does not carry it: the same shape, dtype, bias, config and environment give the
same pick, ``DesignPlan.backward_logits``): after a fused forward ``_bwd_dz_kernel`` keeps fp32 register logits
and the chunked backward fp32 logits beside its dz; after a chunked 16-bit forward ``_bwd_dz_kernel`` (and the
atomic kernel) rounds its register logits to the input dtype (``ROUND_LOGITS``, a convert pair per element,
spill-free on sm_90a at 128 x 256: 202-204 registers) and the chunked backward writes dz in place over 16-bit
logits. Every pairing, bf16 and fp16, stays within ~1x eager's error against float64 on the tests' problems
(interpreter: the kernels round bf16 to nearest on the bits there, ``kernels._round_to_input``, since the
interpreter's own casts truncate).

Each pass: the fused design above or the chunked one, whichever the model prices faster
-------------------------------------------------------------------------------------------
``plan`` prices both designs of each pass and runs the faster (``DesignPlan.variants``, printed by
``python -m benchmarks.roofline``; the config's forward_variant / backward_variant or
``HERO_KERNELS_LINEAR_FORWARD`` / ``_BACKWARD=fused|chunked`` force one). Chunked (``chunked.py``): the forward
writes bf16 logits of C = 1504 rows per cuBLAS GEMM (0.39 GB = 1.8 % of eager's bound) and streams them once
through the Triton row forward: 23.3 ms of GEMM at 0.75 of the peak + 1.4 ms of HBM = 24.7 ms vs the fused
33.6 ms on an H100 (22.9 ms on an H200). The backward runs the same loop orders; its dz producer is one cuBLAS
GEMM of bf16 logits [n, Vc] per vocab slice (all rows), ``slice_label.py``'s label kernel, the Triton row
backward writing dz in place over them, and the label-column fix from the forward's logp: Vc = 4608 (28 slices,
0.42 GB = 2.0 %) as the fused backward's: 73.2 ms vs the fused 81.6 ms (68.0 vs 78.7 ms on an H200). Fwd + bwd
97.9 ms = 1.41 x the floor on an H100 (90.9 ms = 1.31 x on an H200), the CUDA path's 97.9 / 90.8 ms. (After a
fused forward the chunked backward keeps fp32 logits beside its dz: Vc = 1536, 76.1 ms.) Small shapes stay
fused (fewer launches).

Non-finite inputs: -inf logits (masked vocabulary) may fill whole tiles and whole splits, even the first
ones (finite stand-in max, one select per row and tile); their p is 0 in the backward. NaN in a row's
hidden, or in any weight row / bias entry, makes that row's logp and H NaN.
"""
