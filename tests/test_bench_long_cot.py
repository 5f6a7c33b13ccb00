"""benchmarks.bench_long_cot: row format, budget fits, and one tiny end-to-end child run."""
import json

import pytest

from benchmarks.bench_long_cot import _row_lengths, longest_fit, main


def test_longest_fit_takes_the_longest_ok_row_under_budget():
    rows = [{"trainer": "trl", "completion_len": 1024, "peak_mb": 3000.0, "status": "ok"},
            {"trainer": "trl", "completion_len": 2048, "peak_mb": 6000.0, "status": "ok"},
            {"trainer": "trl", "completion_len": 8192, "peak_mb": None, "status": "oom"},
            {"trainer": "hero", "completion_len": 1024, "peak_mb": 300.0, "status": "ok"},
            {"trainer": "hero", "completion_len": 8192, "peak_mb": 900.0, "status": "ok"},
            {"trainer": "x", "completion_len": 1024, "peak_mb": 9000.0, "status": "ok"}]
    assert longest_fit(rows, 4096) == {"trl": 1024, "hero": 8192, "x": None}


@pytest.mark.slow  # a fresh child process with a 128k-vocabulary model (~1 min on 2 shared cores)
def test_end_to_end_hero_row(tmp_path):
    out = tmp_path / "lc.json"
    assert main(["--trainers", "hero", "--lengths", "16", "--json", str(out), "--budget-gb", "4", "--threads", "1"]) == 0
    d = json.loads(out.read_text())
    (row,) = d["rows"]
    assert row["trainer"] == "hero" and row["completion_len"] == 16 and row["status"] == "ok", row
    assert row["peak_mb"] >= 0 and row["step_s"] > 0 and row["checkpointing"] is True
    assert d["longest_fit"] == {"hero": 16}


def test_mixed_lengths_and_their_errors():
    assert _row_lengths(64) == [64, 56] and _row_lengths(64, "16, 40,9") == [16, 40, 9]
    with pytest.raises(SystemExit, match="comma-separated integers"):
        main(["--mixed", "16,x"])
    with pytest.raises(SystemExit, match=">= 8"):
        main(["--mixed", "4,16"])


@pytest.mark.slow  # two fresh child processes with a 128k-vocabulary model (~1 min on 2 shared cores)
def test_end_to_end_mixed_lengths_packed_and_padded_agree(tmp_path):
    out = tmp_path / "mixed.json"
    assert main(["--trainers", "hero,hero_packed", "--mixed", "16,40,9", "--json", str(out), "--threads", "1"]) == 0
    d = json.loads(out.read_text())
    padded, packed = d["rows"]
    assert d["config"]["mixed_lengths"] == [16, 40, 9] and d["config"]["G"] == 3
    assert (padded["trainer"], packed["trainer"]) == ("hero", "hero_packed")
    assert padded["status"] == packed["status"] == "ok" and padded["completion_len"] == 40
    assert packed["lengths"] == [16, 40, 9] and packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
