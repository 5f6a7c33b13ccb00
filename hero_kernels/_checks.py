"""Argument validation shared by the public ops. Every message names the argument at fault."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import get_checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, dtypes=None, min_dim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev0 = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev0:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {dev0}; put them on the same device")


def check_labels_shape(labels: Tensor, expected, what: str) -> None:
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(f"labels must have shape {what} = {tuple(expected)}, got {tuple(labels.shape)}")


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Data check (inside the op): every label in [0, V) or == ignore_index.

    ``checks(labels=True)`` always checks; ``labels=False`` never; the default (None) checks CPU tensors
    only: on a GPU the check would sync the host, and the kernels write a NaN row for such a label instead.
    """
    mode = get_checks().labels
    if mode is False or labels.numel() == 0 or (mode is None and labels.device.type != "cpu"):
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels out of range: labels[{i}] = {int(labels[i])}; expected 0 <= label < V = {num_classes} "
            f"or ignore_index = {ignore_index}"
        )


def check_finite(**tensors) -> None:
    """Data check (inside the op), only when ``hero_kernels.config.set_checks(finite=True)``: rejects NaN
    and +inf; -inf is accepted (masked vocabulary: logit processors, top-k / top-p, padded vocab rows)."""
    if not get_checks().finite:
        return
    for name, t in tensors.items():
        if t is not None and t.is_floating_point():
            bad = ~(t < float("inf"))  # NaN or +inf
            if bool(bad.any()):
                n = int(bad.sum())
                raise ValueError(
                    f"{name} contains {n} NaN/Inf value(s) (NaN or +inf; -inf is accepted as a mask) "
                    "(input checking is on)"
                )
