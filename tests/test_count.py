"""Counting cells in masks: watershed splitting, border rule, exact synthetic counts, `bloodseg count`."""
from __future__ import annotations

import csv
import subprocess
import sys

import cv2
import numpy as np
import pytest

from bloodseg.count import (COUNT_COLUMNS, count_cells, count_errors, estimate_red_radius, split_touching,
                            write_counts_csv)
from bloodseg.errors import DataError
from bloodseg.synthetic import make_smear, smear_counts


def discs(shape, centres, radius, value=2):
    mask = np.zeros(shape, np.uint8)
    for cx, cy in centres:
        cv2.circle(mask, (int(cx), int(cy)), int(radius), int(value), -1)
    return mask


def test_empty_mask_counts_zero():
    c = count_cells(np.zeros((64, 80), np.uint8))
    assert (c["n_white"], c["n_red"]) == (0, 0)
    assert c["white_fraction"] == 0 and c["red_fraction"] == 0
    labels, n, _ = split_touching(np.zeros((10, 10), bool))
    assert n == 0 and not labels.any()


def test_two_touching_discs_are_split_into_two():
    mask = discs((120, 160), [(55, 60), (93, 60)], 20)        # centres 38 px apart, radius 20: they touch
    from scipy import ndimage
    assert ndimage.label(mask == 2)[1] == 1                     # one connected blob ...
    c = count_cells(mask, return_labels=True)
    assert c["n_red"] == 2                                      # ... two cells
    assert set(np.unique(c["red_labels"])) == {0, 1, 2}
    assert abs(c["red_radius_px"] - 20) < 3


def test_overlapping_chain_and_single_disc():
    chain = discs((140, 260), [(40, 70), (72, 70), (104, 70), (136, 70)], 20)   # spacing 0.8 (r1 + r2)
    assert count_cells(chain)["n_red"] == 4
    assert count_cells(discs((100, 100), [(50, 50)], 25))["n_red"] == 1


def test_split_follows_the_neck_between_unequal_cells():
    # radii 18 and 28, overlapping (centres 0.8 (r1 + r2) apart), and a lone flat-topped ellipse:
    # each watershed segment is its cell (the neck is the cut), with no fragment inside a cell
    mask = np.zeros((120, 240), np.uint8)
    cv2.circle(mask, (50, 60), 18, 2, -1)
    cv2.circle(mask, (50 + 37, 60), 28, 2, -1)
    cv2.ellipse(mask, (185, 60), (30, 22), 0, 0, 360, 2, -1)
    labels, n, _ = split_touching(mask == 2, radius=22)
    assert n == 3
    yy, xx = np.mgrid[:120, :240]        # the neck: the chord through the two circles' crossings
    near = (xx - 50) ** 2 + (yy - 60) ** 2 - 18 ** 2 < (xx - 87) ** 2 + (yy - 60) ** 2 - 28 ** 2
    small, big = (mask == 2) & near & (xx < 140), (mask == 2) & ~near & (xx < 140)
    for cell in (small, big, (mask == 2) & (xx >= 140)):
        ids, k = np.unique(labels[cell], return_counts=True)
        seg = labels == ids[np.argmax(k)]
        assert (seg & cell).sum() / (seg | cell).sum() > 0.95


def test_pale_centres_do_not_split_a_cell():
    mask = discs((100, 100), [(50, 50)], 25)
    cv2.circle(mask, (50, 50), 8, 0, -1)                        # central pallor left as background
    assert count_cells(mask)["n_red"] == 1


def test_cells_cut_by_the_border_count_when_mostly_visible():
    r = 20
    interior = [(60, 60), (140, 60), (60, 140), (140, 140)]
    mostly_in = discs((200, 220), interior + [(214, 100)], r)    # 14 of 40 px cut off: mostly visible
    mostly_out = discs((200, 220), interior + [(226, 100)], r)   # only 14 px of 40 visible
    assert count_cells(mostly_in)["n_red"] == 5
    assert count_cells(mostly_out)["n_red"] == 4


def test_white_cells_are_components_and_specks_are_dropped():
    mask = discs((200, 300), [(40, 40), (200, 40), (40, 160), (200, 160)], 18)   # red cells, r = 18
    cv2.circle(mask, (120, 100), 35, 1, -1)                     # one white cell
    cv2.circle(mask, (260, 110), 3, 1, -1)                      # a purple speck (platelet-sized)
    c = count_cells(mask)
    assert c["n_white"] == 1 and c["n_red"] == 4


def test_split_white_separates_two_overlapping_white_cells():
    mask = discs((200, 300), [(40, 40), (260, 40), (40, 170), (260, 170)], 18)
    cv2.circle(mask, (110, 100), 40, 1, -1)
    cv2.circle(mask, (180, 100), 40, 1, -1)                     # centres 70 apart, radius 40
    assert count_cells(mask)["n_white"] == 1                    # connected components merge them
    assert count_cells(mask, split_white=True)["n_white"] == 2


def test_counts_of_exact_synthetic_masks_are_close_to_the_exact_counts():
    # measured on seeds 1000-1005 (519x775): red MAE 4.2 cells (2.7 %, bias -3.2: cells mostly
    # covered by a neighbour merge with it); white MAE 0.5 with
    # connected components (three smears hold two overlapping white cells, which merge into one
    # component) and 0 with split_white=True
    pred_red, true_red, pred_white, split_white, true_white = [], [], [], [], []
    for seed in range(1000, 1006):
        _, mask, exact = make_smear(seed, return_counts=True)
        c = count_cells(mask)
        pred_red.append(c["n_red"]), true_red.append(exact["n_red"])
        pred_white.append(c["n_white"]), true_white.append(exact["n_white"])
        split_white.append(count_cells(mask, split_white=True)["n_white"])
    red, white = count_errors(pred_red, true_red), count_errors(pred_white, true_white)
    assert red["mape"] < 4.0 and red["mae"] < 5.0, red
    assert white["mae"] <= 0.5 and white["bias"] <= 0, white        # merges only ever undercount
    assert count_errors(split_white, true_white)["mae"] == 0


def test_smear_counts_define_what_is_counted():
    image, mask = make_smear(7, size=(160, 240))
    image2, mask2, counts = make_smear(7, size=(160, 240), return_counts=True)
    assert (image == image2).all() and (mask == mask2).all()          # counting changes nothing
    assert counts == smear_counts(7, size=(160, 240))
    assert 0 < counts["n_red"] <= counts["n_red_drawn"]                # cut-off cells are drawn, not counted
    assert counts["n_white"] <= counts["n_white_drawn"]


def test_radius_estimate_and_errors():
    assert abs(estimate_red_radius(discs((100, 100), [(50, 50)], 30) == 2) - 30) <= 1.5
    assert estimate_red_radius(np.zeros((100, 60), bool)) == 3.0       # fallback: min side / 20
    e = count_errors([10, 12, 0], [10, 10, 2])
    assert e["mae"] == pytest.approx(4 / 3) and e["bias"] == 0 and e["mape"] == pytest.approx(40.0)
    with pytest.raises(DataError):
        count_errors([1, 2], [1])
    with pytest.raises(DataError):
        count_cells(np.full((4, 4), 7, np.uint8))


def test_write_counts_csv(tmp_path):
    rows = [{"image": "a.png", **count_cells(discs((60, 60), [(30, 30)], 15))}]
    path = write_counts_csv(rows, tmp_path / "sub" / "counts.csv")
    got = list(csv.DictReader(open(path)))
    assert list(got[0]) == list(COUNT_COLUMNS) and got[0]["n_red"] == "1"


def test_cli_count_writes_a_csv(tmp_path):
    from bloodseg.models import build_model
    from bloodseg.checkpoint import save_checkpoint
    import torch
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", build_model("unet", width=4))
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(90, 130), (64, 64)]):
        cv2.imwrite(str(images / f"smear_{i}.png"), make_smear(i, size=size)[0])
    out = tmp_path / "counts.csv"
    proc = subprocess.run([sys.executable, "-m", "bloodseg.cli", "count", str(images), "--ckpt", str(ckpt),
                           "--out", str(out), "--masks", str(tmp_path / "masks")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out)))
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["smear_0.png", "smear_1.png"]
    assert all(int(r["n_white"]) >= 0 and int(r["n_red"]) >= 0 for r in rows)
    assert (tmp_path / "masks" / "smear_0.png").is_file() and (tmp_path / "masks" / "smear_1_overlay.png").is_file()
    assert "image,n_white,n_red" in proc.stdout
