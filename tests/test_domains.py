"""Labelled photographs from other microscopes: mask colours -> classes, the ALL-IDB2 reader, and
``bloodseg evaluate --images/--masks`` scoring a folder with a known answer."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from bloodseg import cli
from bloodseg.checkpoint import save_checkpoint
from bloodseg.domains import allidb2_dir, half_of, load_allidb2, load_labelled, masks_in_colours, parse_mask_colours
from bloodseg.errors import DataError
from bloodseg.models import build_model


def test_mask_colours_are_read_as_rgb_and_map_to_classes():
    colours = parse_mask_colours("255,255,255=background; 0,255,255=white; 0,0,255=wbc; 200=red")
    # R,G,B as an editor shows them; stored in OpenCV's B,G,R order
    assert colours == {(255, 255, 255): 0, (255, 255, 0): 1, (255, 0, 0): 1, 200: 2}
    assert parse_mask_colours("allidb2") == {(255, 255, 255): 0, (255, 255, 0): 1, (255, 0, 0): 1}
    raw = np.zeros((2, 3, 3), np.uint8)
    raw[:] = (255, 255, 255)
    raw[0, 0] = (255, 255, 0)       # cyan nucleus (BGR)
    raw[1, 2] = (255, 0, 0)         # blue cytoplasm (BGR)
    assert masks_in_colours(raw, parse_mask_colours("allidb2"), "m").tolist() == [[1, 0, 0], [0, 0, 1]]
    raw[0, 1] = (10, 20, 30)        # a colour nobody named: refused, named in R,G,B
    with pytest.raises(DataError, match="R,G,B 30,20,10"):
        masks_in_colours(raw, parse_mask_colours("allidb2"), "m")
    for bad in ("", "255,255=white", "1,2,3=purple", "300=white", "0=background"):
        with pytest.raises(DataError):
            parse_mask_colours(bad)


def _folder(tmp_path, masks: dict, ext=".png"):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    for name, mask in masks.items():
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), np.full((*mask.shape[:2], 3), 180, np.uint8))
        cv2.imwrite(str(tmp_path / "masks" / f"{name}{ext}"), mask)
    return tmp_path / "images", tmp_path / "masks"


def test_load_labelled_reads_folders_and_says_whether_red_cells_are_labelled(tmp_path):
    half = np.zeros((32, 32), np.uint8)
    half[:, :16] = 255
    images, masks = _folder(tmp_path, {"a": half, "b": np.zeros((32, 32), np.uint8)})
    samples, red = load_labelled(images, masks, "binary")
    assert [s.name for s in samples] == ["a", "b"] and red is False
    assert samples[0].mask[:, :16].min() == 1 and samples[0].mask[:, 16:].max() == 0
    (masks / "b.png").unlink()
    with pytest.raises(DataError, match="has no mask"):
        load_labelled(images, masks, "binary")


def _all_white_checkpoint(path):
    """A tiny U-Net whose every pixel is a white cell (zero head, bias towards class 1)."""
    torch.manual_seed(0)
    net = build_model("unet", width=4)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    return save_checkpoint(path, net, epoch=0)


def test_evaluate_scores_your_own_folder_with_a_known_iou(tmp_path, capsys):
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255                                   # a: half white -> IoU 0.5 against all-white
    images, masks = _folder(tmp_path, {"a": half, "b": np.zeros((64, 64), np.uint8)})   # b: no cell -> 0
    ckpt = _all_white_checkpoint(tmp_path / "white.pt")
    out = tmp_path / "scores.json"
    assert cli.main(["evaluate", "--ckpt", str(ckpt), "--images", str(images), "--masks", str(masks),
                     "--mask-colours", "binary", "--json", str(out), "--per-image", "--csv",
                     str(tmp_path / "per.csv")]) == 0
    got = json.loads(out.read_text())
    # pooled: tp 2048, fp 2048 + 4096, fn 0
    assert got["white_iou"] == pytest.approx(2048 / (2048 + 2048 + 4096))
    assert [r["white_iou"] for r in got["per_image"]] == pytest.approx([0.5, 0.0])
    assert got["red_labelled"] is False and "miou" not in got and got["n_images"] == 2
    assert got["white_iou_ci"][0] <= got["white_iou"] <= got["white_iou_ci"][1]
    assert (tmp_path / "per.csv").read_text().splitlines()[0] == "name,white_iou,white_dice,factor,silver_miou"
    # the same folder with 0/1/2 masks (bloodseg's own): red cells labelled, so the 3-class scores come too
    own = tmp_path / "own"
    own_images, own_masks = _folder(own, {"a": (half > 0).astype(np.uint8), "b": np.full((64, 64), 2, np.uint8)})
    capsys.readouterr()
    assert cli.main(["evaluate", "--ckpt", str(ckpt), "--images", str(own_images), "--masks", str(own_masks)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["red_labelled"] is True and got["white_iou"] == pytest.approx(0.25) and "miou" in got
    # half a pair of folders is refused with what to do
    assert cli.main(["evaluate", "--ckpt", str(ckpt), "--images", str(images)]) == 2
    assert "give both --images DIR and --masks DIR" in capsys.readouterr().err


def test_allidb2_halves_and_masks():
    if allidb2_dir() is None:
        pytest.skip("ALL-IDB2 is not here: set $BLOODSEG_ALLIDB2 (a checkout has it in ../shared/data/allidb2)")
    odd, even = load_allidb2("odd", limit=3), load_allidb2("even", limit=3)
    assert [half_of(s.name) for s in odd] == ["odd"] * 3 and [half_of(s.name) for s in even] == ["even"] * 3
    for s in odd + even:
        assert s.image.shape == (*s.mask.shape, 3) and set(np.unique(s.mask)) == {0, 1}
        assert 0.02 < (s.mask == 1).mean() < 0.8          # one white cell, not the whole crop
    with pytest.raises(DataError, match="odd"):
        load_allidb2("train")


def test_the_after_table_carries_only_rows_the_crop_rule_cannot_change():
    """`record domains --reuse`: a domain's rows are carried from an earlier table only when every
    photograph is a whole field, the settings are the same and so is the number of photographs."""
    from bloodseg.io import Sample
    from bloodseg.paper.domains import SETTINGS, carried_rows, json_safe
    from bloodseg.segmenter import Segmenter
    seg = Segmenter(build_model("unet", width=4), input_scale=0.5)
    field = Sample("f", np.zeros((480, 640, 3), np.uint8), np.zeros((480, 640), np.uint8), "f")
    crop = Sample("c", np.zeros((257, 257, 3), np.uint8), np.zeros((257, 257), np.uint8), "c")
    rows = [{"domain": "d", "setting": name, "n_images": 2, "white_iou": 0.5} for name in SETTINGS]
    old = {"settings": json_safe(seg.settings()), "rows": rows, "path": "domains/table_before.json"}
    carried = carried_rows(old, seg, "d", [field, field], None)
    assert [r["setting"] for r in carried] == list(SETTINGS)
    assert all(r["carried_from"] == "domains/table_before.json" for r in carried)
    assert carried_rows(old, seg, "d", [field, crop], None) == []                 # a crop: scored again
    assert carried_rows(old, seg, "d", [field], None) == []                       # other photographs
    assert carried_rows(old, seg.replace(tta=True), "d", [field, field], None) == []      # other settings
    assert carried_rows({**old, "rows": rows[:3]}, seg, "d", [field, field], None) == []  # rows missing
    assert carried_rows(None, seg, "d", [field, field], None) == []
    # a table made before the crop-only setting crop_cells existed: its whole-field rows still hold,
    # and the row with the crop rule off is its default row (the rule never runs on a whole field)
    older = {"settings": {k: v for k, v in old["settings"].items() if k != "crop_cells"},
             "rows": [dict(r, white_iou=0.6 if r["setting"] == "default" else 0.5) for r in rows
                      if r["setting"] != "crop cells all"] + [{"domain": "d", "setting": "best fixed scale",
                                                              "n_images": 2, "white_iou": 0.5}],
             "path": "domains/table.json"}
    carried = carried_rows(older, seg.replace(crop_cells="centre"), "d", [field, field], None)
    assert [r["setting"] for r in carried] == list(SETTINGS) + ["best fixed scale"]
    off = carried[list(SETTINGS).index("crop cells all")]
    assert off["same_as"] == "default" and off["white_iou"] == 0.6 and "same_as" not in carried[0]
    assert carried_rows(older, seg.replace(crop_cells="centre", tta=True), "d", [field, field], None) == []
    assert carried_rows(older, seg, "d", [field, crop], None) == []


def test_the_crop_rule_picture_says_why_it_is_missing_without_allidb2(monkeypatch, capsys):
    """Chapter 8's live picture of the crop rule needs ALL-IDB2; without it the chapter still runs."""
    from bloodseg.paper import domains as dom
    monkeypatch.setattr(dom, "allidb2_dir", lambda: None)
    assert dom.plot_crop_rule(object()) is None
    assert "ALL-IDB2 not found" in capsys.readouterr().out


def test_the_crop_rule_picture_shows_the_cut_neighbour_gone():
    from bloodseg.domains import allidb2_dir
    from bloodseg.paper import domains as dom
    from bloodseg.segmenter import Segmenter, shipped_checkpoint
    if allidb2_dir() is None:
        pytest.skip("ALL-IDB2 not found ($BLOODSEG_ALLIDB2 or ../shared/data/allidb2)")
    fig = dom.plot_crop_rule(Segmenter.load(shipped_checkpoint(), device="cpu"), names=("Im007_1",))
    titles = [ax.get_title() for ax in fig.axes]
    ious = [float(t.split("IoU ")[1].split(" %")[0]) for t in titles]
    assert "'all'" in titles[0] and "'centre'" in titles[1] and ious[1] > ious[0] + 10
    with pytest.raises(DataError, match="no ALL-IDB2 choosing crop named"):
        dom.plot_crop_rule(None, names=("Im002_1",))
