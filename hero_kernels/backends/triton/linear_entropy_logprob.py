"""Fused LM head on Triton: entropy + log-prob of ``hidden @ weight.T + bias`` without [N, V] logits.

Math: docs/design.md section 1 (tests compare with ``hero_kernels.reference``, the float64 oracle).
Backend entry point; the code lives in ``hero_kernels/backends/triton/linear/`` (kernels.py: the Triton
kernels; config.py: tiles, splits; launch.py: ``plan`` and the launchers; compile.py: compile metadata
generated from the kernels' own argument lists). The design analysis and the modeled numbers are in that
package's docstring.

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N], opts) -> (logp, H, lse) fp32 [N]
forward_partials(...) -> per-row (m, s, t, label_x) of a vocab shard
backward(hidden, weight, bias, labels, saved: RowStats, grads: UpstreamGrads, opts, ...) -> (dh, dW, db)
plan(N, D, V, dtype, *, pass_, has_bias, need_dh, need_dw, deterministic) -> list[KernelLaunch]
"""
from __future__ import annotations

from hero_kernels.backends.triton.linear.compile import KERNEL_CONFIGS, compile_attrs, compile_resource_report
from hero_kernels.backends.triton.linear.config import LinearEntropyConfig, Tile, default_config, device_arch
from hero_kernels.backends.triton.linear.launch import backward, forward, forward_partials, plan
# Used by hero_kernels.sharded: the Triton forward's unmerged split partials, merged there like shards.
from hero_kernels.backends.triton.linear.launch import _launch_partials, _prepare  # noqa: F401

__all__ = [
    "Tile",
    "LinearEntropyConfig",
    "default_config",
    "device_arch",
    "plan",
    "forward",
    "forward_partials",
    "backward",
    "KERNEL_CONFIGS",
    "compile_attrs",
    "compile_resource_report",
]


if __name__ == "__main__":  # python -m hero_kernels.backends.triton.linear_entropy_logprob
    import json
    import sys

    for r in compile_resource_report():
        print(json.dumps(r))
    sys.stdout.flush()
