"""The whole pipeline learns: a small U-Net trained briefly on synthetic smears beats the
colour-threshold baseline clearly, on the same held-out test patches."""
import json
import subprocess
import sys

import numpy as np
import torch

from bloodseg.datasets import SegmentationDataset, synthetic_splits, training_splits
from bloodseg.metrics import ConfusionMatrix, scores
from bloodseg.checkpoint import load_model
from bloodseg.models import build_model
from bloodseg.recipe import TrainRecipe, get_recipe
from bloodseg.synthetic import colour_threshold_baseline
from bloodseg.train import evaluate, fit

# Small enough for CI (2 cores), big enough to learn: 96 px patches from 200x300 smears.
TINY = get_recipe("smoke").replace("e2e", **{"data.patch": 96, "model.width": 8, "data.n_source": 10,
                                             "data.crops_per_image": 6, "data.n_test": 12, "data.augment": 2,
                                             "data.image_size": (200, 300)})


def baseline_miou(samples):
    cm = ConfusionMatrix(3)
    for s in samples:
        cm.update(torch.from_numpy(colour_threshold_baseline(s.image)).long(),
                  torch.from_numpy(s.mask).long())
    return scores(cm.compute())["miou"]


def test_trained_unet_beats_the_colour_baseline(tmp_path):
    torch.manual_seed(0)
    splits = synthetic_splits(TINY)
    sources = lambda key: {s.source for s in splits[key]}  # noqa: E731
    assert not sources("test") & (sources("train") | sources("val"))
    model = build_model("unet", width=TINY.model.width)
    cfg = TrainRecipe(epochs=6, batch_size=8, lr=3e-3, seed=0, progress=False)
    history = fit(model, SegmentationDataset(splits["train"]), SegmentationDataset(splits["val"]),
                  tmp_path, cfg)
    best = load_model(tmp_path / "best.pt", device="cpu")
    ours = evaluate(best, SegmentationDataset(splits["test"]), n_timed=2)
    floor = baseline_miou(splits["test"])
    print(f"U-Net MIoU {ours['miou']:.3f} vs colour baseline {floor:.3f}; history {history[-1]}")
    assert ours["miou"] > floor + 0.05
    assert ours["iou"][1] > 0.3  # white cells are found, not just the easy classes


def test_cli_train_evaluate_predict_as_a_user_types_them(tmp_path):
    """`bloodseg synth`, `train`, `evaluate` and `predict` run as subprocesses and write what
    they promise (JSON a script can read, mask PNGs named after the inputs)."""
    exe = [sys.executable, "-m", "bloodseg.cli"]
    env_run = lambda *a: subprocess.run(exe + list(a), capture_output=True, text=True,  # noqa: E731
                                        timeout=600, env={"BLOODSEG_PROFILE": "smoke", "PATH": "/usr/bin:/bin",
                                                          "OMP_NUM_THREADS": "1"})
    synth = env_run("synth", "--out", str(tmp_path / "data"), "-n", "4", "--size", "160", "240")
    assert synth.returncode == 0, synth.stderr
    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    assert len(images) == 4 and len(list((tmp_path / "data" / "masks").glob("*.png"))) == 4

    run = tmp_path / "run"
    train = env_run("train", "--model", "ode-unet-5", "--data", str(tmp_path / "data"),
                    "--epochs", "1", "--out", str(run))
    assert train.returncode == 0, train.stderr
    assert {"best.pt", "last.pt", "history.json", "metrics.json"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and len(metrics["cpa"]) == 3 and 0 <= metrics["white_iou"] <= 1
    assert metrics["scored"].startswith(f"{metrics['n_images']} whole test images through the Segmenter")

    # evaluate reads the split stored in the checkpoint: the profile it runs under changes nothing
    ev = env_run("evaluate", "--ckpt", str(run / "best.pt"), "--rtol", "1e-2", "--json", str(tmp_path / "ev.json"))
    assert ev.returncode == 0, ev.stderr
    first = json.loads((tmp_path / "ev.json").read_text())
    assert "the split stored in the checkpoint" in first["images"] and "the split stored" in ev.stderr
    full = env_run("evaluate", "--ckpt", str(run / "best.pt"), "--rtol", "1e-2", "--profile", "full",
                   "--per-image", "--json", str(tmp_path / "ev_full.json"))
    assert full.returncode == 0, full.stderr
    again = json.loads((tmp_path / "ev_full.json").read_text())
    assert again["images"] == first["images"] and again["miou"] == first["miou"]
    assert again["white_iou"] == first["white_iou"] and again["settings"] == first["settings"]
    stored = torch.load(run / "best.pt", weights_only=True)["split"]
    assert [r["name"] for r in again["per_image"]] == stored["test"]          # whole source images, by name

    pred = env_run("predict", "--ckpt", str(run / "best.pt"), str(images[0]), "--out", str(tmp_path / "pred"))
    assert pred.returncode == 0, pred.stderr
    import cv2
    mask = cv2.imread(str(tmp_path / "pred" / images[0].name), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (160, 240) and set(np.unique(mask)) <= {0, 1, 2}
    assert (tmp_path / "pred" / f"{images[0].stem}_overlay.png").exists()


def test_training_splits_on_a_folder_hold_out_test_sources(tmp_path):
    from bloodseg.synthetic import write_synthetic
    write_synthetic(tmp_path, 6, seed=5, size=(160, 240))
    splits = training_splits(tmp_path, get_recipe("smoke"), seed=0)
    src = {k: {s.source for s in v} for k, v in splits.items()}
    assert splits["train"] and splits["val"] and splits["test"]
    assert not src["test"] & (src["train"] | src["val"])
    assert all(s.image.shape[:2] == (64, 64) for v in splits.values() for s in v)
