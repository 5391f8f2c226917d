"""bloodseg.paper.records: the one toolkit that stamps, writes, reads and cites the book's records."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from bloodseg.errors import BloodsegError
from bloodseg.paper import records


@pytest.fixture
def results(tmp_path, monkeypatch):
    import bloodseg.paper.report as report
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"


def test_provenance_has_every_field_the_old_builders_recorded():
    t0 = time.perf_counter()
    p = records.provenance("bloodseg record x --y", t0, extra_field=3)
    for key in ("git_commit", "git_dirty", "command", "device", "cpu", "threads", "load_average", "torch", "python",
                "date", "wall_s"):
        assert key in p, key
    assert p["command"] == "bloodseg record x --y" and p["extra_field"] == 3
    assert p["git_dirty"] == p["git_commit"].endswith("-dirty")
    assert p["date"].endswith("+00:00") and 0 <= p["wall_s"] < 60
    assert p["device"].startswith(("cpu (", "cuda (")) and isinstance(p["threads"], int)
    # a note on the threads goes into the device line; extra fields may replace the defaults
    q = records.provenance(None, t0, threads_note="2 thread(s) each", threads=2)
    assert q["threads"] == 2 and q["command"] == records.command_line()
    assert "2 thread(s) each" in q["device"] or q["device"].startswith("cuda")


def test_write_record_is_atomic_and_load_record_reads_it_back(results):
    rec = {"what": "x", "rows": [np.float32(0.5), np.int64(3), np.arange(2)], "where": Path("a/b"),
           "provenance": records.provenance("test", time.perf_counter())}
    path = records.write_record(rec, "speed/x.json")                 # a name: under the results folder
    assert path == results / "speed" / "x.json"
    back = records.load_record("speed/x.json")
    assert back["rows"] == [0.5, 3, [0, 1]] and back["where"] == "a/b" and back["provenance"]["command"] == "test"
    assert path.read_text().endswith("\n")
    # a failure while serialising leaves the old record as it was, and no partial file beside it
    with pytest.raises(TypeError):
        records.write_record({**rec, "bad": object()}, "speed/x.json")
    assert records.load_record("speed/x.json") == back
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]
    # a Path is written where it says
    other = records.write_record(rec, results.parent / "elsewhere" / "y.json")
    assert other.is_file() and not (results / "elsewhere").exists()


def test_a_record_without_provenance_is_refused(results):
    with pytest.raises(BloodsegError, match="without provenance"):
        records.write_record({"what": "x", "rows": []}, "r.json")
    p = records.provenance("t", time.perf_counter())
    del p["git_commit"]
    with pytest.raises(BloodsegError, match="git_commit"):
        records.write_record({"provenance": p}, "r.json")
    assert not (results / "r.json").exists()
    # reproduce's records keep their provenance at the top level: accepted as they are
    top = {"label": "unet", **records.provenance("t", time.perf_counter())}
    assert records.write_record(top, "top.json").is_file()


def test_load_record_is_none_when_absent_and_an_error_when_unreadable(results):
    assert records.load_record("nothing/here.json") is None
    (results / "bad.json").parent.mkdir(parents=True)
    (results / "bad.json").write_text("{not json")
    with pytest.raises(BloodsegError, match="not a readable JSON record"):
        records.load_record("bad.json")


def test_provenance_line_reads_nested_and_top_level_provenance():
    p = {"git_commit": "0123456789abcdef0123-dirty", "date": "2026-12-05T13:02:22+00:00", "device": "cpu (x86_64)",
         "torch": "2.13.0+cpu", "wall_s": 12.5, "command": "bloodseg record cheap-bench"}
    line = records.provenance_line({"provenance": p})
    assert line == ("recorded 2026-12-05 13:02 UTC, commit 0123456789ab-dirty, cpu (x86_64), torch 2.13.0+cpu, "
                    "12.5 s, by `bloodseg record cheap-bench`")
    assert records.provenance_line(p) == line                              # top level (reproduce, regularise)
    clean = {**p, "git_commit": "0123456789abcdef", "git_dirty": True}     # robustness's flag
    assert "commit 0123456789ab-dirty," in records.provenance_line({"provenance": clean})
    assert records.provenance_line({}).startswith("recorded ? UTC, commit ?,")


def test_committed_records_say_where_they_came_from():
    """Every record under book/results with a provenance block gives a line with its date and command."""
    root = Path(__file__).resolve().parents[1] / "book" / "results"
    if not root.is_dir():
        pytest.skip("no committed records")
    lines = 0
    for path in sorted(root.rglob("*.json")):
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and isinstance(rec.get("provenance"), dict) and "command" in rec["provenance"]:
            line = records.provenance_line(rec)
            assert line.startswith("recorded 20") and rec["provenance"]["command"] in line, path
            lines += 1
    assert lines >= 10
    assert not list(root.rglob("*.py")), "book/results holds data only"


def test_scale_records_on_the_vendored_sample(tmp_path, monkeypatch):
    """``bloodseg record scale-calibration`` writes its record with provenance; scale_resized scores
    the automatic and the fixed scale as Segmenter.segment runs them (at factor 1 the automatic
    scale keeps the trained factor on these photographs, so both give one score)."""
    import argparse

    import bloodseg.paper.report as report
    from bloodseg.bccd import bccd_sample_dir, prepare_cached
    from bloodseg.io import load_folder
    from bloodseg.paper import scale_records
    from bloodseg.segmenter import Segmenter, shipped_checkpoint

    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    args = argparse.Namespace(what="scale-calibration", bccd_src=str(bccd_sample_dir()), work=str(tmp_path / "work"),
                              limit=2, out=None)
    rec = scale_records.run_record(args, "test")
    saved = records.load_record("scale/calibration.json")
    assert saved["provenance"]["command"] == "test" and saved["splits"] == json.loads(json.dumps(rec["splits"]))
    assert set(rec["splits"]) == {"train", "val", "test"} and rec["splits"]["train"]["n_images"] == 2
    assert rec["target_diameter_network_px"] == pytest.approx(rec["input_scale"] * rec["splits"]["train"]["median_px"])
    prepare_cached(bccd_sample_dir(), tmp_path / "work" / "bccd")
    test = load_folder(tmp_path / "work" / "bccd" / "test")[:1]
    out = scale_records.scale_resized(Segmenter.load(shipped_checkpoint()), test, factors=(1.0, 1.4), log=lambda m: None)
    native = out["rows"][0]
    assert native["factor"] == 1.0 and native["fixed_minus_native_pp"] == 0.0
    assert 0 < native["white_iou_fixed"] <= 1 and out["native_white_iou"] == native["white_iou_fixed"]
    assert {"median", "q10", "q90", "median_over_factor", "n_none"} == set(out["rows"][1]["diameter_px"])
    with pytest.raises(BloodsegError, match="scale='auto'"):
        scale_records.scale_resized(Segmenter.load(shipped_checkpoint()).replace(scale="fixed"), test)
