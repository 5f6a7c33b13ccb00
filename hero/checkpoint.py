"""Atomic checkpoints and RNG state capture for exact resume.

Layout under the run's ``output_dir``::

    checkpoint-000002/state.pt     model, optimizer, scheduler, KL controller, RNG states, data position, step,
                                   (reference model when it is a frozen copy of the initial policy)
    checkpoint-000002/config.json  the run's config (resume compares it with the new one, ``hero.config.config_diff``)
    checkpoint-000002/run.json     {"run_id": ..., "step": ...}: which run wrote it
    latest                         text file naming the newest complete checkpoint directory
    run.json                       {"run_id": ...} of the run that owns output_dir (written when it starts)
    metrics.jsonl, final/, tb/     the trainer's log, exported model, TensorBoard events

Atomicity (``hero.io``): a checkpoint is written into ``.tmp-checkpoint-...`` (files fsynced), then renamed into
place with ``os.replace`` (one atomic rename on POSIX), and only then is ``latest`` updated (temp file +
``os.replace``).
A crash at any point leaves either the previous checkpoint or the new one, never a partial one; leftover
``.tmp-*`` directories are ignored by ``find_checkpoint`` and removed by the next save.

``state.pt`` is a pickle (it holds NumPy RNG state): only load checkpoints you wrote yourself.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .io import atomic_dir, atomic_write_text, remove_stale_temp_dirs, write_json

__all__ = [
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "read_run_id",
    "write_run_id",
    "clear_run",
    "new_run_id",
]

STATE_FILE = "state.pt"
RUN_FILE = "run.json"
#: What a run writes into its output_dir besides checkpoint-N (``clear_run`` removes these).
RUN_OUTPUTS = ("latest", RUN_FILE, "metrics.jsonl", "metrics.jsonl.prev", "metrics.png", "final", "tb")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def capture_rng() -> Dict[str, Any]:
    """RNG states of python ``random``, NumPy's global generator, torch CPU and every CUDA device."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoint directories (with state.pt), oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: str, step: int, state: Dict[str, Any], config: Optional[dict] = None,
                    keep: int = 0, run_id: str = "") -> str:
    """Write ``state`` (anything torch.save can pickle) as checkpoint ``step`` atomically; returns its path.

    keep > 0 deletes the oldest complete checkpoints beyond ``keep`` (never the one just written).
    run_id: recorded in the checkpoint's run.json (resume checks that it matches the output_dir's run).
    """
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # leftovers of a crashed save
        if name.startswith(".tmp-checkpoint-") or ".old-" in name:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    name = f"checkpoint-{step:06d}"
    final = os.path.join(output_dir, name)
    with atomic_dir(final) as tmp:  # .tmp-checkpoint-...: files fsynced, then renamed into place
        with open(os.path.join(tmp, STATE_FILE), "wb") as f:
            torch.save(state, f)
        if config is not None:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=1)
        if run_id:
            write_json(os.path.join(tmp, RUN_FILE), {"run_id": run_id, "step": step})
    atomic_write_text(os.path.join(output_dir, "latest"), name + "\n")
    if keep > 0:
        ckpts = [p for p in list_checkpoints(output_dir) if os.path.abspath(p) != os.path.abspath(final)]
        for p in ckpts[: max(0, len(ckpts) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def find_checkpoint(output_dir: str) -> Optional[str]:
    """Newest complete checkpoint: the one ``latest`` names if it is complete, else the highest step."""
    latest = os.path.join(output_dir, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            cand = os.path.join(output_dir, f.read().strip())
        if os.path.isfile(os.path.join(cand, STATE_FILE)):
            return cand
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint directory (or its state.pt) written by save_checkpoint."""
    f = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"no checkpoint state at {f}")
    # weights_only=False: the state holds NumPy/python RNG states; these files are our own.
    return torch.load(f, map_location=map_location, weights_only=False)


def new_run_id() -> str:
    """A fresh run id: UTC start time + random suffix (sorts by time, unique across machines)."""
    import secrets
    import time

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def read_run_id(folder: str) -> str:
    """The run id in ``folder/run.json`` (an output_dir or a checkpoint directory); "" when there is none."""
    try:
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as f:
            rid = json.load(f).get("run_id", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return rid if isinstance(rid, str) else ""


def write_run_id(output_dir: str, run_id: str) -> None:
    """Record that ``output_dir`` belongs to run ``run_id``."""
    write_json(os.path.join(output_dir, RUN_FILE), {"run_id": run_id})


def clear_run(output_dir: str) -> List[str]:
    """Delete an earlier run's files from ``output_dir`` (checkpoints and RUN_OUTPUTS; temp folders of dead
    writers), leaving anything else there alone. Returns what was removed."""
    removed = remove_stale_temp_dirs(output_dir)
    for p in list_checkpoints(output_dir) + [os.path.join(output_dir, n) for n in RUN_OUTPUTS]:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)
        else:
            continue
        removed.append(p)
    return removed
