"""Fail fast on a model name that cannot load: checked before transformers would wait on the network.

``check_model_source(name)`` accepts an existing folder, or a Hugging Face hub id (``owner/name`` or ``name``)
that is in the local cache, or one the hub can be asked about (not offline and the endpoint answers a TCP
connect within a few seconds). Anything else raises ``HeroUserError`` at once, naming the value and the fix,
instead of a transformers "Repo id" error after ~25 s of retries.
"""
from __future__ import annotations

import os
import re
import socket
from typing import Sequence
from urllib.parse import urlparse

from hero.errors import HeroUserError

__all__ = ["check_model_source", "hub_offline"]

#: owner/name or name: letters, digits, "-", "_", "." (the hub's own rule, without its length limits)
_HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library rejects is "not cached"
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_source(name: str, key: str = "model.name", known: Sequence[str] = ()) -> None:
    """Raise HeroUserError unless ``name`` is a folder or a hub id that can be loaded (see module docstring).

    key: how the message names the setting (``model.name``, ``--model``); known: registered names to suggest.
    """
    also = f" (or one of the registered names: {', '.join(known)})" if known else ""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise HeroUserError(f"{key} {name!r} is a file; give the model's folder (with config.json){also}")
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_like_path or not _HUB_ID_RE.match(name):
        raise HeroUserError(f"{key} {name!r}: no such folder, and not a hub id (owner/name); "
                            f"give a model folder or a hub id{also}")
    if _in_cache(name):
        return
    if hub_offline():
        raise HeroUserError(f"{key} {name!r} is not a local folder and not in the Hugging Face cache, and "
                            f"HF_HUB_OFFLINE is set; download it first or give a local folder{also}")
    if not _hub_reachable():
        raise HeroUserError(f"{key} {name!r} is not a local folder, not in the Hugging Face cache, and the hub "
                            f"cannot be reached (offline?); give a local folder{also}")
