"""Real data helpers: BCCD source and preparation, gold/silver scores, fine-tuning, the shipped checkpoint."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from bloodseg import realdata as rd
from bloodseg.errors import CheckpointError
from bloodseg.infer import predict_image
from bloodseg.synthetic import colour_threshold_baseline
from bloodseg.train import load_checkpoint, load_model

TINY = dataclasses.replace(rd.REAL_PLANS["smoke"], width=4, patch=64, crops_per_image=1, val_images=2,
                           eval_images=2, pretrain_smears=2, pretrain_crops=2, epochs=1, pretrain_epochs=1)


@pytest.fixture(scope="module")
def prepared(bccd_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    return out, rd.prepare_cached(bccd_sample, out)


def test_smoke_always_uses_the_vendored_sample(monkeypatch, tmp_path):
    folder, kind = rd.bccd_source("smoke")
    assert kind == "sample" and (folder / "images").is_dir()
    monkeypatch.setenv("BLOODSEG_BCCD", str(tmp_path / "nowhere"))
    assert rd.bccd_source("quick")[1] == "sample"                   # no full copy there: the sample


def test_prepare_cached_reuses_its_output(prepared, bccd_sample):
    out, report = prepared
    assert report["reused"] is False and report["overall"]["images"] == 16
    again = rd.prepare_cached(bccd_sample, out)
    assert again["reused"] is True and again["overall"] == report["overall"]


def test_splits_resize_training_images_and_keep_test_images_whole(prepared):
    out, _ = prepared
    splits = rd.bccd_splits(out, TINY)
    assert len(splits["train"]) == 8 and len(splits["val"]) == 2 and len(splits["test"]) == 2
    assert splits["train"][0].image.shape == (64, 64, 3)
    assert splits["test"][0].image.shape == (480, 640, 3)           # full size, scored at full size
    small = rd.resize_sample(splits["test"][0], 0.5)
    assert small.image.shape == (240, 320, 3) and set(np.unique(small.mask)) <= {0, 1, 2}


def test_gold_and_silver_scores(prepared):
    out, _ = prepared
    test = rd.bccd_splits(out, TINY)["test"]
    truth = {id(s.image): s.mask for s in test}
    oracle = rd.evaluate_bccd(lambda image: truth[id(image)], test)     # predicts the labels exactly
    assert oracle["gold"]["iou"] == 1.0 and oracle["gold"]["dice"] == 1.0
    assert oracle["silver"]["miou"] == 1.0 and oracle["silver"]["pa"] == 1.0
    base = rd.evaluate_bccd(colour_threshold_baseline, test)
    assert 0.3 < base["gold"]["iou"] < 0.95                         # a floor, far from perfect
    g = base["gold"]
    assert g["dice"] == pytest.approx(2 * g["iou"] / (1 + g["iou"]))  # Dice and IoU of one count
    row = rd.score_row("colour", base)
    assert row["gold white IoU"] == round(g["iou"], 4) and row["images"] == 2
    worst = rd.failure_cases(base, k=1)
    assert base["per_image"][worst[0]]["white_iou"] == min(r["white_iou"] for r in base["per_image"])


def test_counts_against_boxes(prepared):
    out, _ = prepared
    test = rd.bccd_splits(out, TINY)["test"]
    boxes = rd.read_box_counts(out)
    assert len(boxes) == 16 and all(b["n_wbc_boxes"] >= 0 for b in boxes.values())
    res = rd.count_vs_boxes([s.mask for s in test], [s.name for s in test], boxes)
    assert len(res["rows"]) == 2
    assert res["white"]["mae"] <= 0.5                               # gold masks: one white cell, one box
    assert 0 <= res["red"]["at_least_boxes"] <= 1


def test_synthetic_counting_oracle_is_close():
    res = rd.synthetic_counting(2, size=(240, 320))
    assert res["oracle"]["white"]["mae"] <= 0.5 and res["oracle"]["red"]["mape"] < 15


def test_train_pretrain_and_finetune(tmp_path, prepared):
    out, _ = prepared
    pre = rd.train_model("unet", rd.synthetic_pretraining_splits(TINY), tmp_path / "pre", TINY)
    assert pre.init == "scratch" and len(pre.history) == 1 and pre.checkpoint.is_file()
    splits = rd.bccd_splits(out, TINY)
    tuned = rd.train_model("unet", splits, tmp_path / "tuned", TINY, init=pre.checkpoint, input_scale=0.5)
    assert tuned.init == "synthetic" and "pretrained" in tuned.label
    assert load_checkpoint(tuned.checkpoint)["input_scale"] == 0.5
    assert load_model(tuned.checkpoint).input_scale == 0.5
    assert predict_image(tuned.model, splits["test"][0].image).shape == (480, 640)
    with pytest.raises(CheckpointError, match="width"):
        rd.train_model("unet", splits, tmp_path / "bad", dataclasses.replace(TINY, width=8), init=pre.checkpoint)


def test_input_scale_resizes_at_prediction():
    from bloodseg.models import build_model
    torch.manual_seed(0)
    model = build_model("unet", width=4).eval()
    image = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    model.input_scale = 0.5
    assert predict_image(model, image).shape == (90, 130)


def test_shipped_checkpoint_loads_and_documents_itself():
    path = rd.shipped_checkpoint()
    assert path.stat().st_size < 20 * 2 ** 20
    assert (path.parent / "README.md").is_file()
    ckpt = load_checkpoint(path)
    assert ckpt["model_name"] == "nodes-unet" and ckpt.get("optimizer_state") is None
    metrics = ckpt["metrics"]
    assert metrics["data"]["kind"] == "full" and metrics["data"]["test_images"] == 72
    # it must clearly beat the colour baseline on the gold white cells
    assert metrics["model"]["gold white IoU"] > metrics["colour_baseline"]["gold white IoU"] + 0.05
    readme = (path.parent / "README.md").read_text()
    assert f"{metrics['model']['gold white IoU']:.3f}" in readme
    model = load_model(path, device="cpu")
    assert model.input_scale == ckpt["input_scale"]
    assert not math.isnan(json.loads(json.dumps(metrics))["model"]["silver MIoU"])
