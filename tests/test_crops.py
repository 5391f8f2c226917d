"""Single-cell crops (bloodseg.paper.crops): the crop geometry, the scores against scoring
Segmenter.predict directly, and the committed record the chapter reads."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from bloodseg.classes import RED_CELL, WHITE_CELL  # noqa: E402
from bloodseg.io import load_folder  # noqa: E402
from bloodseg.models import build_model  # noqa: E402
from bloodseg.paper import crops  # noqa: E402
from bloodseg.segmenter import Segmenter  # noqa: E402

RECORD = Path(__file__).resolve().parents[1] / "book" / "results" / "robustness" / "crops.json"


def blob_mask(h=120, w=200, box=(40, 70, 60, 100)):
    m = np.zeros((h, w), np.uint8)
    m[10:20, 10:20] = RED_CELL
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = WHITE_CELL
    return m


def test_crop_is_a_square_around_the_largest_white_cell():
    mask = blob_mask()
    mask[100:104, 150:154] = WHITE_CELL                     # a speck: not the cell cropped around
    image = np.dstack([mask * 50] * 3).astype(np.uint8)
    im, m = crops.crop_around_white_cell(image, mask, 2.0)
    assert im.shape[:2] == m.shape == (80, 80)              # 2 x the box's longer side (40)
    ys, xs = np.nonzero(m == WHITE_CELL)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 54, 20, 59)   # the whole 30x40 cell, centred
    assert np.array_equal(im[..., 0], m * 50)               # image and mask cut alike


def test_crop_moves_inside_the_photograph_and_is_capped_by_it():
    mask = blob_mask(box=(0, 30, 170, 200))                 # the cell touches the top-right corner
    im, m = crops.crop_around_white_cell(np.zeros(mask.shape + (3,), np.uint8), mask, 2.5)
    assert m.shape == (75, 75) and (m == WHITE_CELL).sum() == 900
    im, m = crops.crop_around_white_cell(np.zeros(mask.shape + (3,), np.uint8), mask, 10.0)
    assert m.shape == (120, 120)                            # never larger than the shorter side
    assert crops.crop_around_white_cell(im, np.zeros((50, 50), np.uint8), 2.0) is None


def test_make_crops_zoom_resizes_image_and_mask_together():
    class S:  # a sample: image + mask
        def __init__(self, image, mask):
            self.image, self.mask = image, mask
    mask = blob_mask()
    samples = [S(np.full(mask.shape + (3,), 180, np.uint8), mask), S(np.zeros((60, 60, 3), np.uint8), np.zeros((60, 60), np.uint8))]
    out = crops.make_crops(samples, 2.0, 1.5)
    assert len(out) == 1                                    # the sample without a white cell is left out
    im, m = out[0]
    assert im.shape[:2] == m.shape == (120, 120) and set(np.unique(m)) <= {0, 1, 2}
    assert abs((m == WHITE_CELL).sum() - 1.5 ** 2 * 1200) < 60


def test_crop_scores_match_predict_and_intervals_hold_the_estimate(prepared_bccd):
    out, _ = prepared_bccd
    test = load_folder(Path(out) / "test")[:3]
    torch.manual_seed(0)
    seg = Segmenter(build_model("unet", width=4), input_scale=0.5, red_cell_diameter=39.0, background=(200, 200, 200))
    rows = crops.crop_scores(seg, test, settings=[(2.0, 1.5)], n_boot=200)
    assert [r["variant"] for r in rows] == list(crops.VARIANTS)
    made = crops.make_crops(test, 2.0, 1.5)
    c = np.zeros(3, np.int64)
    for im, m in made:                                       # the default is `bloodseg predict` as it runs
        p, g = seg.predict(im) == WHITE_CELL, m == WHITE_CELL
        c += [(p & g).sum(), (p & ~g).sum(), (~p & g).sum()]
    assert rows[0]["white_iou_pooled"] == pytest.approx(c[0] / c.sum())
    assert rows[0]["n_crops"] == len(made) and len(rows[0]["scale_factors"]) == len(made)
    assert all(f == 0.5 for f in rows[1]["scale_factors"])  # fixed scale
    for r in rows[1:]:
        lo, hi = r["minus_default_pp_ci"]
        assert r["minus_default_pp"] == pytest.approx(100 * (r["white_iou_pooled"] - rows[0]["white_iou_pooled"]))
        assert lo - 1e-9 <= r["minus_default_pp"] <= hi + 1e-9


def test_committed_record_has_provenance_and_draws():
    record = json.loads(RECORD.read_text())
    assert {"git_commit", "command", "device", "torch", "date", "wall_s"} <= set(record["provenance"])
    assert record["n_photographs"] == 72
    frame = crops.crops_frame(record)
    assert len(frame) == len(record["settings"]) and "default IoU (%)" in frame.columns
    fig = crops.plot_crops(record)
    assert len(fig.axes[0].patches) == len(record["rows"])
    # the automatic scale follows the magnification where the crop shows red cells
    by = {(r["k"], r["zoom"], r["variant"]): r for r in record["rows"]}
    assert np.median(by[(2.5, 2.0, "default")]["scale_factors"]) < 0.35
    assert np.median(by[(2.5, 0.6, "default")]["scale_factors"]) > 0.65
