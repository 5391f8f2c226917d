"""Real data helpers: BCCD source and preparation, gold/silver scores, fine-tuning, the shipped checkpoint."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bloodseg.checkpoint import load_checkpoint
from bloodseg.errors import CheckpointError
from bloodseg.infer import predict_image
from bloodseg.io import read_image
from bloodseg.paper import bccd as rd
from bloodseg.segmenter import Segmenter, shipped_checkpoint
from bloodseg.synthetic import colour_threshold_baseline

TINY = rd.real_recipe("smoke").replace(**{
    "model.width": 4, "data.patch": 64, "data.crops_per_image": 1, "real.val_images": 2, "real.eval_images": 2,
    "real.pretrain_smears": 2, "real.pretrain_crops": 2, "train.epochs": 1, "real.pretrain_epochs": 1})


@pytest.fixture(scope="module")
def prepared(bccd_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    return out, rd.prepare_cached(bccd_sample, out)


def test_smoke_always_uses_the_vendored_sample(monkeypatch, tmp_path):
    folder, kind = rd.bccd_source(prefer_full=False)                  # what the smoke profile asks for
    assert kind == "sample" and (folder / "images").is_dir()
    monkeypatch.setenv("BLOODSEG_BCCD", str(tmp_path / "nowhere"))
    assert rd.bccd_source()[1] == "sample"                          # no full copy there: the sample


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


def test_stain_shifts_the_training_patches_only(prepared):
    out, _ = prepared
    plain = rd.bccd_splits(out, TINY)
    shifted = rd.bccd_splits(out, TINY.replace(**{"data.stain": 1.0}))
    for a, b in zip(plain["train"], shifted["train"]):
        assert np.array_equal(a.mask, b.mask)                        # same patches, same flips
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(plain["train"], shifted["train"]))
    for part in ("val", "test"):                                    # never the photographs that judge it
        assert all(np.array_equal(a.image, b.image) for a, b in zip(plain[part], shifted[part]))


def test_cli_train_bccd_refuses_a_stain_strength_outside_0_to_1(bccd_sample, tmp_path, capsys):
    from bloodseg import cli
    assert cli.main(["train-bccd", "--src", str(bccd_sample), "--out", str(tmp_path / "s"), "--stain", "1.5"]) == 2
    assert "--stain must be a strength from 0 (off) to 1; got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


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


def test_red_boxes_at_the_border(bccd_sample):
    edge = rd.rbc_boxes_at_border(bccd_sample, ["BloodImage_00007", "BloodImage_00015", "no_such_image"])
    assert edge["boxes"] == 31 and 0 < edge["at_border"] < edge["boxes"]     # BCCD boxes cut-off cells too


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
    assert Segmenter.load(tuned.checkpoint).input_scale == 0.5
    assert tuned.segmenter.predict(splits["test"][0].image).shape == (480, 640)
    # a cleanup tuned for the starting weights is not carried into the new network
    from bloodseg.checkpoint import update_checkpoint
    update_checkpoint(pre.checkpoint, postprocess={"white_min_area": 4000, "fill_white_holes": True})
    again = rd.train_model("unet", splits, tmp_path / "again", TINY, init=pre.checkpoint, input_scale=0.5)
    assert again.segmenter.postprocess is None and "postprocess" not in load_checkpoint(again.checkpoint)
    with pytest.raises(CheckpointError, match="width"):
        rd.train_model("unet", splits, tmp_path / "bad", TINY.replace(**{"model.width": 8}), init=pre.checkpoint)


def test_input_scale_resizes_at_prediction():
    from bloodseg.models import build_model
    torch.manual_seed(0)
    model = build_model("unet", width=4).eval()
    image = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    assert predict_image(model, image, input_scale=0.5).shape == (90, 130)


def test_shipped_checkpoint_loads_and_documents_itself():
    path = shipped_checkpoint()
    assert path.stat().st_size < 20 * 2 ** 20
    assert (path.parent / "README.md").is_file()
    ckpt = load_checkpoint(path)
    assert ckpt["model_name"] == "nodes-unet" and ckpt.get("optimizer_state") is None
    metrics = ckpt["metrics"]
    assert metrics["data"]["test_images"] == 72 and metrics["data"]["train_patches"] > 1000   # the full BCCD
    # it must clearly beat the colour baseline on the gold white cells
    assert metrics["model"]["gold white IoU"] > metrics["colour_baseline"]["gold white IoU"] + 0.05
    readme = (path.parent / "README.md").read_text()
    assert f"{metrics['model']['gold white IoU']:.3f}" in readme
    # its white-cell cleanup was chosen on the validation photographs; README shows what it gives
    cleanup = metrics["cleanup"]
    assert ckpt["postprocess"]["chosen_on"].startswith("BCCD validation split") and cleanup["val_images"] == 87
    assert cleanup["chosen"]["white_min_area"] == ckpt["postprocess"]["white_min_area"]
    assert cleanup["test_raw"]["gold white IoU"] == metrics["model"]["gold white IoU"]
    assert f"{cleanup['test_cleaned']['gold white IoU']:.4f}" in readme
    model = Segmenter.load(path, device="cpu")
    assert model.input_scale == ckpt["input_scale"]
    assert model.postprocess["white_min_area"] == ckpt["postprocess"]["white_min_area"]
    assert not math.isnan(json.loads(json.dumps(metrics))["model"]["silver MIoU"])


def test_cli_train_bccd_trains_scores_and_continues(bccd_sample, tmp_path, capsys):
    from bloodseg import cli
    small = ["--src", str(bccd_sample), "--width", "4", "--epochs", "1", "--crops", "1", "--patch", "64",
             "--val-images", "2", "--pretrain-smears", "2", "--pretrain-epochs", "1"]
    assert cli.main(["train-bccd", "--out", str(tmp_path / "a"), "--schedule", "cosine", "--tta"] + small) == 0
    ckpt = tmp_path / "a" / "bccd-nodes-unet-w4.pt"
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert ckpt.is_file() and metrics["epochs_run"] == 1 and metrics["pretrained"] is True
    assert metrics["model"]["images"] == metrics["data"]["test_images"] > 0
    assert 0 <= metrics["model"]["gold white IoU"] <= 1 and 0 <= metrics["model_tta"]["gold white IoU"] <= 1
    assert metrics["model_tta"]["model"].endswith("+ flip TTA") and metrics["recipe"]["train"]["schedule"] == "cosine"
    trained = Segmenter.load(ckpt, device="cpu")
    assert trained.input_scale == 0.5    # prediction will resize alike
    # and bring each photograph's background to the training photographs' (all bright plasma)
    assert trained.colour == "background" and tuple(metrics["background"]["bgr"]) == trained.background
    assert all(150 < v <= 255 for v in trained.background)
    # the finished settings, made from code alone: the red-cell size the automatic scale brings photographs
    # to (the training photographs' median, in network pixels), the cleanup and the solver chosen on validation
    measured = metrics["finish"]["measured"]
    assert trained.scale == "auto" and trained.red_cell_diameter == pytest.approx(0.5 * measured["diameter_px_median"])
    assert 20 < trained.red_cell_diameter < 60                      # BCCD's red cells: ~80 px at full size
    assert trained.postprocess["chosen_on"] == "validation split, 2 photographs"
    assert trained.solver == metrics["finish"]["solver"]["chosen"]
    assert Segmenter.load(ckpt, device="cpu").predict(bccd_photo := read_image(next(
        (bccd_sample / "images").iterdir()))).shape == bccd_photo.shape[:2]

    assert cli.main(["train-bccd", "--out", str(tmp_path / "b"), "--init", str(ckpt), "--steps", "background"]
                    + small) == 0
    cont = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert cont["model"]["model"] == "nodes-unet (continued from bccd-nodes-unet-w4.pt)"
    assert cont["init"] == str(ckpt) and cont["pretrained"] is False
    assert not (tmp_path / "b" / "pretrain").exists()
    capsys.readouterr()

    # a checkpoint of another model, and numbers that make no sense, are refused with a reason
    assert cli.main(["train-bccd", "--out", str(tmp_path / "c"), "--model", "unet", "--init", str(ckpt)] + small) == 2
    assert "holds a 'nodes-unet' of width 4, not 'unet'" in capsys.readouterr().err
    assert cli.main(["train-bccd", "--out", str(tmp_path / "d")] + small + ["--crops", "0"]) == 2
    assert "--crops must be positive; got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def _record():
    def run(name, model, cont, epochs, iou, tta=None):
        return {"run": name, "model": model, "width": 16, "scale": 0.5, "continues": cont,
                "pretrained_on_synthetic": cont is None, "bccd_epochs_total": epochs, "epochs_run": 2,
                "train_seconds": 10.0, "processes_sharing_gpu": 2,
                "scores": {"gold white IoU": iou, "gold white Dice": 2 * iou / (1 + iou), "silver MIoU": 0.9},
                "scores_tta": None if tta is None else {"gold white IoU": tta},
                "history": [{"epoch": 1, "val_miou": 0.8}, {"epoch": 2, "val_miou": 0.85}]}
    return {"goal_white_iou": 0.9, "runs": [run("a", "nodes-unet", None, 2, 0.85), run("b", "nodes-unet", "a", 4, 0.89, 0.895),
                                            run("u", "unet", None, 2, 0.88)]}


def test_gpu_runs_frame_and_figure():
    frame = rd.gpu_runs_frame(_record())
    assert list(frame.index) == ["a", "b", "u"]
    assert frame.loc["b", "start"] == "continues a" and frame.loc["a", "start"] == "synthetic-pretrained"
    assert frame.loc["b", "... with flip TTA"] == 0.895 and math.isnan(frame.loc["a", "... with flip TTA"])
    fig = rd.plot_gpu_runs(_record())
    curves = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert set(curves) == {"a > b", "u"}                       # a is drawn inside the run that continues it
    assert list(curves["a > b"].get_xdata()) == [1, 2, 3, 4]   # the epoch count carries on
    assert any(t.get_text() == "goal 0.90" for t in fig.axes[0].get_legend().get_texts())


def test_train_on_bccd_and_train_bccd_share_the_split_and_the_magnification(bccd_sample, tmp_path):
    """`bloodseg train --data BCCD` and `bloodseg train-bccd` go through the one split path: the same
    training patches, validation and test photographs, and the same magnification in the checkpoint."""
    from bloodseg import cli
    from bloodseg.datasets import training_splits
    from bloodseg.recipe import real_recipe
    assert cli.main(["train", "--model", "unet", "--data", str(bccd_sample), "--profile", "smoke", "--width", "4",
                     "--out", str(tmp_path / "train")]) == 0
    assert cli.main(["train-bccd", "--src", str(bccd_sample), "--profile", "smoke", "--model", "unet", "--width", "4",
                     "--no-pretrain", "--steps", "background", "--out", str(tmp_path / "bccd")]) == 0
    a = load_checkpoint(tmp_path / "train" / "best.pt")
    b = load_checkpoint(tmp_path / "bccd" / "bccd-unet-w4.pt")
    assert a["split"]["test"] == b["split"]["test"] and len(a["split"]["test"]) == 4     # the whole test split
    assert a["split"]["val"] == b["split"]["val"] == b["metrics"]["split"]["val"]
    assert a["segmenter"]["input_scale"] == b["segmenter"]["input_scale"] == real_recipe("smoke").data.scale == 0.5
    # and the training patches are one function's: the raw folder and its prepared copy give the same arrays
    raw = training_splits(bccd_sample, real_recipe("smoke"))["train"]
    from bloodseg.datasets import prepared_photographs
    prepared = training_splits(prepared_photographs(bccd_sample), real_recipe("smoke"))["train"]
    assert [s.name for s in raw] == [s.name for s in prepared]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(raw, prepared))
    assert raw[0].image.shape[:2] == (64, 64) and raw[0].source.startswith("BloodImage_")
