"""The records chapters 7 and 8 read instead of recomputing, and the helpers around them.

bloodseg.paper.bccd: evaluate_raw_and_cleaned (one pass, the numbers of evaluate_bccd twice),
record_shipped / record_training (provenance, what the chapter reads), compare_per_image, the
per-cell instance figure and the stain-shift table/figure. bloodseg.paper.ddp_scaling:
record_throughput (interleaved rounds, medians, provenance) without launching torchrun.
"""
from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from bloodseg.io import load_folder  # noqa: E402
from bloodseg.models import build_model  # noqa: E402
from bloodseg.paper import bccd as rd  # noqa: E402
from bloodseg.paper import bccd_records as rr  # noqa: E402
from bloodseg.paper import ddp_scaling  # noqa: E402
from bloodseg.segmenter import Segmenter  # noqa: E402

PROVENANCE = {"git_commit", "command", "device", "torch", "python", "date", "wall_s"}


@pytest.fixture(scope="module")
def tiny_segmenter():
    """A random width-4 U-Net that resizes by half and carries a white-cell cleanup."""
    import torch
    torch.manual_seed(0)
    return Segmenter(build_model("unet", width=4), input_scale=0.5,
                     postprocess={"white_min_area": 300, "fill_white_holes": True, "input_scale": 0.5})


def test_raw_and_cleaned_in_one_pass_equals_evaluate_bccd_twice(prepared_bccd, tiny_segmenter):
    photos = load_folder(prepared_bccd[0] / "test")[:2]
    both = rd.evaluate_raw_and_cleaned(tiny_segmenter, photos, keep_masks=True)
    raw = rd.evaluate_bccd(tiny_segmenter, photos, postprocess=False)
    cleaned = rd.evaluate_bccd(tiny_segmenter, photos)
    for one, ref in ((both["raw"], raw), (both["cleaned"], cleaned)):
        assert all(np.array_equal(a, b) for a, b in zip(one["masks"], ref["masks"]))
        assert one["gold"] == ref["gold"] and one["n_images"] == ref["n_images"] == 2
        assert np.allclose(one["silver"]["miou"], ref["silver"]["miou"])
        assert [r["name"] for r in one["per_image"]] == [s.name for s in photos]
    plain = tiny_segmenter.replace(postprocess=None)          # no stored cleanup: cleaned is raw
    none = rd.evaluate_raw_and_cleaned(plain, photos[:1])
    assert none["raw"]["gold"] == none["cleaned"]["gold"]


def test_record_shipped_on_the_sample_has_what_the_chapter_reads(bccd_sample, tmp_path, monkeypatch,
                                                                tiny_segmenter):
    monkeypatch.setattr(Segmenter, "load", classmethod(lambda cls, path, device=None, **kw: tiny_segmenter))
    monkeypatch.setattr(rr, "load_checkpoint", lambda path: {"metrics": {
        "model": {"gold white IoU": 0.5}, "colour_baseline": {}, "data": {"test_images": 2}}})
    out = tmp_path / "rs.json"
    record = rr.record_shipped(out, bccd_sample, tmp_path / "work", command="test", log=lambda m: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(record, default=float))
    assert PROVENANCE <= set(record["provenance"]) and record["provenance"]["command"] == "test"
    d = record["data"]
    n_test = len(load_folder(tmp_path / "work" / "bccd" / "test"))
    assert d["test_raw"]["images"] == d["test_cleaned"]["images"] == n_test == len(d["per_image_raw"])
    assert {"gold precision", "gold recall", "gold white IoU"} <= set(d["test_raw"])
    assert d["tuning"]["chosen"]["white_min_area"] in rd.WHITE_AREA_GRID
    assert {(r["white_min_area"], r["fill_white_holes"]) for r in d["test_rows"]} >= {(0.0, False)}
    assert set(d["counting"]) == {"labels (gold white, silver red)", "shipped NODEs-UNet (default settings)"}
    summary = rd.cleanup_summary("x", d["tuning"], d["test_rows"])         # what the chapter builds from it
    assert summary["test IoU raw"] == round(d["test_raw"]["gold white IoU"], 4)
    line = rd.provenance_line(record)
    assert "test" in line and record["provenance"]["torch"] in line


def test_record_training_smoke_on_the_sample(bccd_sample, tmp_path):
    out = tmp_path / "rt.json"
    record = rr.record_training(out, bccd_sample, tmp_path / "work", profile="smoke", command="t",
                                log=lambda m: None)
    d = json.loads(out.read_text())["data"]
    labels = [r["label"] for r in d["runs"]]
    assert labels == ["unet (from scratch)", "unet (synthetic-pretrained)", "nodes-unet (synthetic-pretrained)"]
    assert [r["model"] for r in d["scores"]] == ["colour baseline"] + labels
    assert set(d["per_image"]) == {"colour baseline", *labels}
    assert [r["model"] for r in d["cleanup_comparison"]] == labels
    assert d["recipe"] == rd.real_recipe("smoke").to_dict() and PROVENANCE <= set(record["provenance"])
    assert rd.stored_recipe(d) == rd.real_recipe("smoke")


def test_compare_per_image_matches_by_name():
    live = [{"name": "a", "white_iou": 0.5}, {"name": "b", "white_iou": 0.7}, {"name": "z", "white_iou": 0.1}]
    rec = [{"name": "b", "white_iou": 0.7001}, {"name": "a", "white_iou": 0.5}]
    c = rd.compare_per_image(live, rec)
    assert c["n"] == 2 and c["names"] == ["a", "b"] and math.isclose(c["max_abs_diff"], 1e-4, abs_tol=1e-9)
    assert math.isnan(rd.compare_per_image(live, [])["max_abs_diff"])


def test_load_record_is_none_when_absent(tmp_path, monkeypatch):
    import bloodseg.paper.report as report
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    assert rd.load_record("nothing/here.json") is None
    (tmp_path / "x.json").write_text(json.dumps({"data": 1, "provenance": {}}))
    assert rd.load_record("x.json")["data"] == 1
    assert ddp_scaling.load_record("x.json")["data"] == 1


def test_instances_figure_and_stain_table():
    labels = np.zeros((40, 60), np.int32)
    labels[5:15, 5:15], labels[20:30, 30:45] = 1, 2
    rows = [{"id": 1, "class": "white", "centroid_x": 9.5, "centroid_y": 9.5},
            {"id": 2, "class": "red", "centroid_x": 37.0, "centroid_y": 24.5}]
    fig = rd.plot_instances(np.full((40, 60, 3), 200, np.uint8), labels, rows)
    assert len(fig.axes) == 2
    record = {"summary": {"none": {"white_iou_pooled": 0.9},
                          "warm": {"white_iou_pooled": 0.89, "drop_pp": 1.0, "drop_pp_ci": [0.5, 1.5],
                                   "within_goal": True, "goal_verdict": "holds"},
                          "blur_1.5": {"white_iou_pooled": 0.85, "drop_pp": 5.0, "drop_pp_ci": [3.0, 7.0],
                                       "within_goal": False, "goal_verdict": "does not hold"}},
              "shifts": {"warm": {"transform": "bloodseg.stain.white_balance", "gains": [0.9, 1.0, 1.1]},
                         "blur_1.5": {"transform": "bloodseg.stain.blur", "sigma": 1.5}}}
    table = rd.stain_shift_frame(record)
    assert list(table.index) == ["none", "warm", "blur_1.5"]
    assert table.loc["blur_1.5", "95% CI (pp)"] == "[+3.00, +7.00]" and table.loc["none", "drop (pp)"] == 0.0
    fig = rd.plot_stain_shifts(record)
    assert len(fig.axes[0].patches) == 2
    # a shift beyond the training range is not judged; the colour-none comparison is a column and markers
    record["summary"]["wb_cool_0.2"] = {"white_iou_pooled": 0.88, "drop_pp": 2.0, "drop_pp_ci": [1.0, 3.0],
                                        "within_goal": True, "goal_verdict": "inconclusive"}
    record["strong_shifts"] = {"wb_cool_0.2": {"transform": "bloodseg.stain.white_balance", "gains": [1.2, 1.0, 0.8]}}
    record["colour_none"] = {"summary": {"none": {"white_iou_pooled": 0.9}, "wb_cool_0.2": {"white_iou_pooled": 0.75}}}
    table = rd.stain_shift_frame(record)
    assert table.loc["wb_cool_0.2", "verdict"] == "beyond training range: not judged"
    assert table.loc["wb_cool_0.2", "within 2 pp"] == "" and table.loc["warm", "verdict"] == "holds"
    assert table.loc["wb_cool_0.2", "white IoU, colour none"] == 0.75 and np.isnan(table.loc["warm", "white IoU, colour none"])
    fig = rd.plot_stain_shifts(record)
    marks = [l for l in fig.axes[0].lines if l.get_label() == "without colour matching"]
    assert len(fig.axes[0].patches) == 3 and list(marks[0].get_ydata()) == [pytest.approx(15.0)]


def test_record_throughput_interleaves_rounds_and_keeps_medians(tmp_path, monkeypatch):
    calls = []

    def fake(order, out_dir=None, **bench):
        calls.append(list(order))
        k = len(calls)
        return [{"processes": n, "threads_per_process": t or 2, "device": "cpu", "model": bench["model"],
                 "images_per_s": 10.0 * n + k, "seconds": 1.0 / k} for n, t in order]

    monkeypatch.setattr(ddp_scaling, "measure_throughput", fake)
    out = tmp_path / "t.json"
    record = ddp_scaling.record_throughput(out, repeats=3, command="cmd", log=None)
    settings = [tuple(s) for s in ddp_scaling.CPU_SETTINGS]
    assert calls == [settings, settings[::-1], settings]
    rows = record["data"]["rows"]
    assert [(r["processes"], r["images_per_s_rounds"]) for r in rows] == [
        (1, [11.0, 12.0, 13.0]), (1, [11.0, 12.0, 13.0]), (2, [21.0, 22.0, 23.0])]
    assert [r["images_per_s"] for r in rows] == [12.0, 12.0, 22.0]
    assert math.isclose(rows[2]["speedup"], 22 / 12) and math.isclose(rows[2]["efficiency"], 11 / 12)
    saved = json.loads(out.read_text())
    assert PROVENANCE <= set(saved["provenance"]) and saved["provenance"]["command"] == "cmd"
    assert "recorded" in ddp_scaling.provenance_line(saved)
