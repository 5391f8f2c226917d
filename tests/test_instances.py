"""Per-cell outputs (bloodseg.instances): how well the instance splitting finds the true cells of
synthetic smears, the table's columns and units, and the files it writes."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import torch

from bloodseg import cli
from bloodseg.count import count_cells
from bloodseg.errors import BloodsegError
from bloodseg.instances import (INSTANCE_COLUMNS, instances, read_instances, read_probabilities,
                                write_instances, write_probabilities)
from bloodseg.models import build_model
from bloodseg.segmenter import Segmenter
from bloodseg.synthetic import make_smear

# count.split_touching was tuned on seeds 0-9 (red F1 0.974, white 0.955); the tests score other seeds
SEEDS = range(100, 110)


def match(pred, truth, cells, cls):
    """Predicted cells of class ``cls`` matched to true ones at IoU >= 0.5.

    True cells that do not count (less than half of them visible, see ``make_smear``) are
    "don't care": a prediction matching one is neither a hit nor a false positive. Returns
    ``(tp, fp, fn, relative area errors of the matches)``."""
    true_ids = {c["id"] for c in cells if c["class"] == cls}
    counted = {c["id"] for c in cells if c["class"] == cls and c["counted"]}
    truth = np.where(np.isin(truth, list(true_ids)), truth, 0)
    true_area = np.bincount(truth.ravel())
    tp = fp = 0
    found, errors = set(), []
    for pid in np.unique(pred[pred > 0]):
        cell = pred == pid
        ids, overlap = np.unique(truth[cell], return_counts=True)
        iou = [(k / (cell.sum() + true_area[t] - k), t) for t, k in zip(ids, overlap) if t]
        best, t = max(iou, default=(0.0, None))
        if best >= 0.5 and t in counted:
            tp += 1
            found.add(t)
            errors.append((cell.sum() - true_area[t]) / true_area[t])
        elif best < 0.5:
            fp += 1
    return tp, fp, len(counted - found), errors


@pytest.fixture(scope="module")
def scores():
    totals = {"white": [0, 0, 0, []], "red": [0, 0, 0, []]}
    for seed in SEEDS:
        _, mask, inst = make_smear(seed, return_instances=True)
        labels, rows = instances(mask)
        for cls in totals:
            ids = [r["id"] for r in rows if r["class"] == cls]
            tp, fp, fn, err = match(np.where(np.isin(labels, ids), labels, 0), inst["labels"], inst["cells"], cls)
            for i, v in enumerate((tp, fp, fn)):
                totals[cls][i] += v
            totals[cls][3] += err
    out = {}
    for cls, (tp, fp, fn, err) in totals.items():
        err = np.abs(np.asarray(err))
        out[cls] = {"f1": 2 * tp / (2 * tp + fp + fn), "tp": tp, "fp": fp, "fn": fn,
                    "area_err_mean": float(err.mean()), "area_err_median": float(np.median(err))}
        print(f"\n{cls}: F1 {out[cls]['f1']:.3f} (tp {tp}, fp {fp}, fn {fn}); |area error| per matched cell: "
              f"mean {100 * out[cls]['area_err_mean']:.1f} %, median {100 * out[cls]['area_err_median']:.1f} %")
    return out


def test_white_cells_are_found_one_by_one(scores):
    # measured over seeds 100-109: F1 0.958 (23 of 25 found; the 2 misses are white cells that
    # overlap another white cell and merge with it: components, not split)
    assert scores["white"]["f1"] >= 0.95, scores["white"]
    assert scores["white"]["area_err_median"] < 0.05, scores["white"]


def test_red_cells_are_split_into_true_cells(scores):
    # measured over seeds 100-109: F1 0.968 (tp 1316, fp 20, fn 67; the misses are mostly cells
    # largely covered by a neighbour, whose visible crescent has no distance peak of its own);
    # |area error| per matched cell mean 3.3 %, median 0.8 %. With the markers and watershed
    # before (local maxima, cv2.watershed, which orders pixels by colour difference and does not
    # flood the distance) it was F1 0.771, area error mean 10.9 %, median 0.9 %.
    # The goal is 0.85; this asserts the measured level less a margin.
    assert scores["red"]["f1"] >= 0.94, scores["red"]
    assert scores["red"]["area_err_median"] < 0.03 and scores["red"]["area_err_mean"] < 0.06, scores["red"]


def test_make_smear_instances_leave_image_mask_and_counts_unchanged():
    for seed in (0, 5, 11):
        image, mask = make_smear(seed, size=(120, 160))
        i2, m2, counts, inst = make_smear(seed, size=(120, 160), return_counts=True, return_instances=True)
        i3, m3, inst3 = make_smear(seed, size=(120, 160), return_instances=True)
        assert np.array_equal(image, i2) and np.array_equal(mask, m2)
        assert np.array_equal(image, i3) and np.array_equal(mask, m3)
        assert np.array_equal(inst["labels"], inst3["labels"])
        labels, cells = inst["labels"], inst["cells"]
        assert labels.dtype == np.int32 and np.array_equal(labels > 0, mask > 0)
        kind = {c["id"]: c["class"] for c in cells}
        for cls, value in (("white", 1), ("red", 2)):
            ids = {i for i, k in kind.items() if k == cls}
            assert set(np.unique(labels[mask == value]).tolist()) <= ids
            assert sum(c["counted"] for c in cells if c["class"] == cls) == counts[f"n_{cls}"]


def test_one_row_per_counted_cell():
    for seed in (0, 1):
        _, mask = make_smear(seed, size=(200, 260))
        labels, rows = instances(mask)
        counts = count_cells(mask)
        assert [r["class"] for r in rows] == ["white"] * counts["n_white"] + ["red"] * counts["n_red"]
        assert [r["id"] for r in rows] == list(range(1, len(rows) + 1)) and labels.max() == len(rows)
        assert all(r["area_px"] == int((labels == r["id"]).sum()) for r in rows)


def _toy():
    """200x200: five red discs (r 10) inside, a white disc (r 20) inside, one cut by the left border."""
    mask = np.zeros((200, 200), np.uint8)
    for x, y in ((60, 40), (100, 40), (140, 40), (60, 160), (140, 160)):
        cv2.circle(mask, (x, y), 10, 2, -1)
    cv2.circle(mask, (100, 100), 20, 1, -1)
    cv2.circle(mask, (8, 100), 20, 1, -1)
    return mask


def test_columns_units_border_and_probabilities():
    mask = _toy()
    probs = np.zeros((3, 200, 200), np.float32)
    probs[1][mask == 1] = 0.8
    probs[2][mask == 2] = 0.6
    labels, rows = instances(mask, torch.from_numpy(probs), pixel_size_um=0.5)
    assert len(rows) == 7 and all(tuple(r) == INSTANCE_COLUMNS for r in rows)
    white = [r for r in rows if r["class"] == "white"]
    assert len(white) == 2 and [r["class"] for r in rows[2:]] == ["red"] * 5
    edge = min(white, key=lambda r: r["centroid_x"])
    inner = max(white, key=lambda r: r["centroid_x"])
    assert edge["touches_border"] and edge["x0"] == 0
    assert not inner["touches_border"] and not any(r["touches_border"] for r in rows[2:])
    assert inner["area_px"] == int((mask[70:131, 70:131] == 1).sum())
    assert (inner["x0"], inner["y0"], inner["x1"], inner["y1"]) == (80, 80, 121, 121)
    assert inner["centroid_x"] == pytest.approx(100, abs=0.01) and inner["centroid_y"] == pytest.approx(100, abs=0.01)
    assert inner["equivalent_diameter_px"] == pytest.approx(40, abs=1.5)
    for r in rows:
        assert r["area_um2"] == pytest.approx(r["area_px"] * 0.25)
        assert r["mean_probability"] == pytest.approx(0.8 if r["class"] == "white" else 0.6, abs=1e-4)
    plain = instances(mask)[1]
    assert all("area_um2" not in r and "mean_probability" not in r for r in plain)
    assert [r["area_px"] for r in plain] == [r["area_px"] for r in rows]
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(BloodsegError, match="pixel size"):
            instances(mask, pixel_size_um=bad)
    assert instances(np.zeros((30, 40), np.uint8)) [1] == []


def test_label_png_csv_and_probabilities_round_trip(tmp_path):
    labels = np.zeros((40, 50), np.int32)
    labels[1:5, 1:5], labels[10:20, 30:40], labels[30:, :3] = 1, 300, 65535
    rows = [{"id": 1, "class": "white", "area_px": 16, "touches_border": False}]
    png, table = write_instances(labels, rows, tmp_path, "smear 1")
    assert png.name == "smear 1_instances.png" and table.name == "smear 1_cells.csv"
    assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    back = read_instances(png)
    assert back.dtype == np.int32 and np.array_equal(back, labels)
    with open(table) as fh:
        read = list(csv.DictReader(fh))
    assert tuple(read[0]) == INSTANCE_COLUMNS and read[0]["id"] == "1" and read[0]["area_um2"] == ""
    with pytest.raises(BloodsegError, match="16-bit"):
        write_instances(np.full((2, 2), 70000), [], tmp_path, "big")
    probs = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)
    path = write_probabilities(tmp_path / "smear_probs.npz", torch.from_numpy(probs))
    p16 = read_probabilities(path)
    assert p16.dtype == np.float16 and np.allclose(p16, probs, atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smear 1_cells.csv", "smear 1_instances.png",
                                                          "smear_probs.npz"]


def test_cli_instances_pixel_size_probabilities_and_tta(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = Segmenter(build_model("unet", width=4)).save(tmp_path / "tiny.pt")
    (tmp_path / "in").mkdir()
    for seed in range(2):
        cv2.imwrite(str(tmp_path / "in" / f"s{seed}.png"), make_smear(seed, size=(64, 96))[0])
    for command, outs in (("predict", ["--out", str(tmp_path / "p")]), ("count", ["--masks", str(tmp_path / "m")])):
        inst = tmp_path / f"{command}_cells"
        rc = cli.main([command, "--ckpt", str(ckpt), str(tmp_path / "in"), *outs, "--instances", str(inst),
                       "--pixel-size-um", "0.25", "--save-probabilities", "--tta"])
        assert rc == 0, capsys.readouterr().err
        assert "2 " in capsys.readouterr().err
        folder = tmp_path / ("p" if command == "predict" else "m")
        for seed in range(2):
            labels = read_instances(inst / f"s{seed}_instances.png")
            with open(inst / f"s{seed}_cells.csv") as fh:
                rows = list(csv.DictReader(fh))
            assert labels.shape == (64, 96) and labels.max() == len(rows)
            assert all(float(r["area_um2"]) == pytest.approx(int(r["area_px"]) / 16) for r in rows)
            assert all(0 <= float(r["mean_probability"]) <= 1 for r in rows)
            assert read_probabilities(folder / f"s{seed}_probs.npz").shape == (3, 64, 96)
