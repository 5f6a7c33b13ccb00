"""JSONL format for ``hero diagnose`` on real data, with a loader and a writer.

Format: UTF-8, one JSON object per line (blank lines are skipped)::

    {"image": "images/0001.png", "question": "Is there a dog in the image?", "answer": "yes",
     "split": "adversarial", "id": "coco-42"}

* ``image`` (required, str): path to an image file PIL can open; relative paths are resolved against the
  folder that contains the JSONL file, absolute paths are used as is. A non-empty list of such paths is a
  row with several images (the trainer's vision-language adapter places them, see ``hero.models.hf_vlm``).
* ``question`` (required, str).
* ``answer`` (required, str): "yes"/"no" for POPE-style scoring (case-insensitive, normalized to lower
  case), or any free text for other tasks.
* ``split`` (optional, str): e.g. "random" / "popular" / "adversarial"; default "default".
* ``id`` (optional, str): default ``"line<N>"`` (1-based line number); ids must be unique.
* any other field is kept as is (e.g. ``digits`` for the digits task).

Loaded examples are dicts with the same keys plus ``image`` = uint8 array ([H, W] for grayscale files,
[H, W, 3] otherwise, or per ``mode``; a list of them for a list of paths) and ``image_path`` = the resolved
absolute path (or list of paths).
Errors raise ``JSONLFormatError`` naming the file and line number (or, with ``on_bad_line="skip"``, warn once
per bad line and leave it out).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ..errors import HeroUserError
from ..io import atomic_write_bytes, json_safe

__all__ = ["JSONLFormatError", "load_jsonl", "write_jsonl", "load_image", "save_image_png"]


class JSONLFormatError(HeroUserError, ValueError):
    """A malformed line or an unloadable image in a JSONL dataset (message names file and line); ``hero train``
    exits with code 3 on it (a bad data row with ``on_bad_row: stop``)."""

    exit_code = 3


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pillow is in the [train]/[test] extras
        raise ImportError("reading/writing JSONL images needs pillow: pip install pillow") from e
    return Image


def load_image(path: str, mode: Optional[str] = None) -> np.ndarray:
    """Open an image as a uint8 array. mode None: grayscale ("L") files stay [H, W], everything else is
    converted to RGB [H, W, 3]; otherwise any PIL mode ("L", "RGB")."""
    Image = _pil()
    with Image.open(path) as im:
        im.load()
        if mode is None:
            mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
        if im.mode != mode:
            im = im.convert(mode)
        return np.asarray(im, dtype=np.uint8).copy()


def load_jsonl(path: str, *, load_images: bool = True, mode: Optional[str] = None, limit: Optional[int] = None,
               required: Sequence[str] = ("image", "question", "answer"), image_field: str = "image",
               on_bad_line: str = "raise") -> List[dict]:
    """Load a JSONL dataset (format in the module docstring).

    load_images: False keeps the image field as the resolved path (still checked to exist).
    mode: PIL mode for loaded images (None: gray stays gray, else RGB).
    limit: stop after this many examples.
    required: fields every line must have as a non-empty string (the trainer passes its data.required_fields).
    image_field: the field holding an image path ("" = none); resolved against the file's folder when present.
    on_bad_line: "raise" (JSONLFormatError) or "skip" (one warning naming file, line and reason per bad line).
    """
    if on_bad_line not in ("raise", "skip"):
        raise ValueError(f"on_bad_line must be 'raise' or 'skip', got {on_bad_line!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise JSONLFormatError(f"no such JSONL file: {path}")
    out: List[dict] = []
    seen_ids: dict = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                ex = _parse_line(line, path, lineno, required, image_field, load_images, mode)
                if ex["id"] in seen_ids:
                    raise JSONLFormatError(f"{path}, line {lineno}: duplicate id {ex['id']!r} "
                                           f"(first on line {seen_ids[ex['id']]})")
            except JSONLFormatError as e:
                if on_bad_line == "raise":
                    raise
                warnings.warn(f"{e} -- line skipped (on_bad_row=skip)", stacklevel=2)
                continue
            seen_ids[ex["id"]] = lineno
            out.append(ex)
    return out


def _parse_line(line: str, path: str, lineno: int, required: Sequence[str], image_field: str, load_images: bool,
                mode: Optional[str]) -> dict:
    """One JSONL line -> example dict; JSONLFormatError naming file, line and reason."""
    where = f"{path}, line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise JSONLFormatError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise JSONLFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in required:
        if field not in obj:
            raise JSONLFormatError(f"{where}: missing required field '{field}'")
        if field == image_field and isinstance(obj[field], list):
            continue  # several images: _resolve_images checks the list
        if not isinstance(obj[field], str) or not obj[field].strip():
            raise JSONLFormatError(f"{where}: field '{field}' must be a non-empty string")
    for field in ("split", "id"):
        if field in obj and not isinstance(obj[field], str):
            raise JSONLFormatError(f"{where}: field '{field}' must be a string")
    ex = dict(obj)
    if isinstance(ex.get("answer"), str):
        ans = ex["answer"].strip()
        ex["answer"] = ans.lower() if ans.lower() in ("yes", "no") else ans
    ex.setdefault("split", "default")
    ex.setdefault("id", f"line{lineno}")
    if image_field and isinstance(ex.get(image_field), (str, list)):  # other values stay as they are
        ex[image_field] = ex["image_path"] = _resolve_images(ex[image_field], where, path, image_field)
        if load_images:
            paths = ex[image_field]
            loaded = [_load_line_image(p, where, mode) for p in (paths if isinstance(paths, list) else [paths])]
            ex[image_field] = loaded if isinstance(paths, list) else loaded[0]
    return ex


def _resolve_images(value, where: str, path: str, image_field: str):
    """A path or a non-empty list of paths -> absolute path(s); JSONLFormatError for anything else or a missing file."""
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, str) for p in paths):
        raise JSONLFormatError(f"{where}: field '{image_field}' must be an image path or a non-empty list of paths")
    root = os.path.dirname(os.path.abspath(path))
    resolved = [os.path.normpath(os.path.join(root, p)) for p in paths]  # an absolute path stays as is
    for img_path in resolved:
        if not os.path.isfile(img_path):
            raise JSONLFormatError(f"{where}: image file not found: {img_path}")
    return resolved if isinstance(value, list) else resolved[0]


def _load_line_image(img_path: str, where: str, mode: Optional[str]) -> np.ndarray:
    try:
        return load_image(img_path, mode)
    except ImportError:
        raise
    except Exception as e:  # PIL raises several types for corrupt/unsupported files
        raise JSONLFormatError(f"{where}: cannot load image {img_path}: {e}") from None


def save_image_png(image: np.ndarray, path: str) -> None:
    """Write a uint8 [H, W] or [H, W, 3] array as PNG atomically (temp file + os.replace)."""
    import io

    Image = _pil()
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"image must be uint8 [H, W] or [H, W, C], got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_jsonl(examples: Iterable[dict], path: str, image_dir: Optional[str] = None) -> str:
    """Dump examples (e.g. ``build_digits_pope(...)``) to the JSONL format, images as PNG files.

    image_dir: folder for the PNGs (default ``<jsonl stem>_images`` next to the JSONL file); image paths in
    the JSONL are relative to the JSONL's folder when possible. Each PNG and the JSONL itself are written
    atomically (temp file, then os.replace), so a crash never leaves a half-written file.
    Extra fields (digits, subset, query, sigma, ...) are written too; ``image`` arrays are replaced by paths.
    Returns the JSONL path.
    """
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(root, exist_ok=True)
    if image_dir is None:
        image_dir = os.path.join(root, os.path.splitext(os.path.basename(path))[0] + "_images")
    os.makedirs(image_dir, exist_ok=True)
    lines = []
    seen = set()
    for i, ex in enumerate(examples):
        for field in ("image", "question", "answer"):
            if field not in ex:
                raise ValueError(f"examples[{i}] is missing field '{field}'")
        ex_id = str(ex.get("id", f"ex{i:06d}"))
        if ex_id in seen:
            raise ValueError(f"examples[{i}] has a duplicate id {ex_id!r}")
        seen.add(ex_id)
        img = ex["image"]
        if isinstance(img, (str, os.PathLike)):
            img_path = os.path.abspath(os.fspath(img))
        else:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in ex_id)
            img_path = os.path.join(os.path.abspath(image_dir), f"{safe}.png")
            save_image_png(img, img_path)
        rel = os.path.relpath(img_path, root)
        rec = {"image": rel if not rel.startswith("..") else img_path, "question": ex["question"], "answer": ex["answer"]}
        rec["id"] = ex_id
        for key, v in ex.items():
            if key not in rec and key not in ("image", "image_path"):
                rec[key] = v
        lines.append(json.dumps(json_safe(rec), ensure_ascii=False, allow_nan=False))
    atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return path
