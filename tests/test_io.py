"""hero.io: atomic file / directory writes, permissions that follow the umask, no leftovers on failure."""
import os
import stat

import pytest

from hero.io import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask():
    """Run the test under a given umask, restoring the caller's afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _leftovers(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-") or ".old-" in n)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_file_permissions_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"x")
    assert _mode(p) == 0o666 & ~mask
    atomic_write_text(p, "y")  # replacing an existing file gives the same mode
    assert _mode(p) == 0o666 & ~mask
    with atomic_open(tmp_path / "b.txt", "w") as f:
        f.write("z")
    assert _mode(tmp_path / "b.txt") == 0o666 & ~mask


def test_dir_permissions_follow_the_umask(tmp_path, umask):
    umask(0o027)
    with atomic_dir(tmp_path / "ckpt") as d:
        atomic_write_bytes(os.path.join(d, "w.bin"), b"1")
        with open(os.path.join(d, "plain.txt"), "w") as f:
            f.write("2")
    assert _mode(tmp_path / "ckpt") == 0o777 & ~0o027
    assert _mode(tmp_path / "ckpt" / "w.bin") == 0o666 & ~0o027


def test_round_trip_bytes_and_text(tmp_path):
    data = bytes(range(256)) * 3
    assert atomic_write_bytes(tmp_path / "b.bin", data) == str(tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == data
    text = "héro ✓\nline 2\r\nno newline translation"
    atomic_write_text(tmp_path / "t.txt", text)
    assert (tmp_path / "t.txt").read_bytes() == text.encode("utf-8")
    with atomic_open(tmp_path / "o.txt", "w") as f:  # text mode defaults to UTF-8
        f.write("é")
    assert (tmp_path / "o.txt").read_bytes() == "é".encode("utf-8")
    with atomic_open(tmp_path / "o.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "o.bin").read_bytes() == b"\x00\x01"
    # missing parent folders are created; nothing else is left in the folder
    atomic_write_text(tmp_path / "sub" / "deep" / "x.json", "{}")
    assert (tmp_path / "sub" / "deep" / "x.json").read_text() == "{}"
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub" / "deep") == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_error_mid_write_keeps_the_old_file_and_no_temp(tmp_path, exc):
    p = tmp_path / "model.safetensors"
    atomic_write_bytes(p, b"old contents")
    with pytest.raises(exc):
        with atomic_open(p, "wb") as f:
            f.write(b"half of the new")
            f.flush()
            assert _leftovers(tmp_path)  # the temp file sits next to the target while writing
            raise exc("killed mid-write")
    assert p.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []
    # a failing write of a new file leaves nothing at all
    with pytest.raises(exc):
        with atomic_open(tmp_path / "new.txt", "w") as f:
            f.write("partial")
            raise exc("boom")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    with pytest.raises(ValueError, match="encoding"):
        with atomic_open(tmp_path / "x", "wb", encoding="utf-8"):
            pass
    with pytest.raises(LookupError):
        with atomic_open(tmp_path / "x", "w", encoding="no-such-codec"):
            pass
    assert os.listdir(tmp_path) == []


def test_atomic_dir_round_trip_and_replace(tmp_path):
    final = tmp_path / "checkpoint-000001"
    with atomic_dir(final) as d:
        assert os.path.dirname(d) == str(tmp_path) and os.path.basename(d).startswith(".tmp-checkpoint-000001")
        assert not final.exists()  # nothing visible until the block succeeds
        os.makedirs(os.path.join(d, "sub"))
        with open(os.path.join(d, "sub", "a.txt"), "w") as f:
            f.write("v1")
        with open(os.path.join(d, "stale.txt"), "w") as f:
            f.write("only in v1")
    assert (final / "sub" / "a.txt").read_text() == "v1"
    # a second write replaces the directory as a whole (no merge with the old files)
    with atomic_dir(final) as d:
        with open(os.path.join(d, "b.txt"), "w") as f:
            f.write("v2")
        assert (final / "sub" / "a.txt").read_text() == "v1"  # old one intact while the new one is written
    assert sorted(os.listdir(final)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000001"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_error_keeps_the_old_dir_and_no_temp(tmp_path, exc):
    final = tmp_path / "final"
    with atomic_dir(final) as d:
        with open(os.path.join(d, "w.bin"), "wb") as f:
            f.write(b"good")
    with pytest.raises(exc):
        with atomic_dir(final) as d:
            with open(os.path.join(d, "w.bin"), "wb") as f:
                f.write(b"partial")
            raise exc("killed mid-save")
    assert (final / "w.bin").read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["final"]
    # a failing first save leaves nothing behind
    with pytest.raises(exc):
        with atomic_dir(tmp_path / "other"):
            raise exc("boom")
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_atomic_dir_restores_the_old_dir_when_the_final_rename_fails(tmp_path, monkeypatch):
    final = tmp_path / "final"
    with atomic_dir(final) as d:
        with open(os.path.join(d, "w.bin"), "wb") as f:
            f.write(b"good")
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-"):
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        with atomic_dir(final) as d:
            with open(os.path.join(d, "w.bin"), "wb") as f:
                f.write(b"new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (final / "w.bin").read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_json_safe_and_write_json_use_null_for_nan_and_inf(tmp_path):
    import json

    import numpy as np

    from hero.io import json_safe, write_json

    obj = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32(2.0), "d": np.arange(2),
           "e": (np.int64(3), "x"), 4: None}
    assert json_safe(obj) == {"a": None, "b": [None, None, 1.5], "c": 2.0, "d": [0, 1], "e": [3, "x"], "4": None}
    path = write_json(tmp_path / "sub" / "r.json", obj)
    assert json.loads(open(path).read()) == json_safe(obj)
