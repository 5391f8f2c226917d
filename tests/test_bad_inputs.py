"""Bad inputs through the public API and the ``bloodseg`` command.

Every case asserts the message a person gets: what was wrong, which file, what to do. The CLI
must print one ``bloodseg <command>: error: ...`` line, no traceback, and exit with status 2.

Two kinds of CLI calls:

* real subprocesses of the installed ``bloodseg`` entry point (``cli_runs`` below): they start in
  parallel once per module, because each pays ~2-3 s for importing torch;
* ``bloodseg.cli.main([...])`` in this process with ``capsys``: cheap, used for the long tail.

The reader-level checks of ``tests/test_datasets.py`` (every decoder error, LabelMe shapes) are not
repeated here; these tests drive the same files through the commands a user types.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bloodseg import BloodsegError, DataError, ODEBlock, build_model, training_splits
from bloodseg.checkpoint import load_checkpoint, save_checkpoint
from bloodseg.infer import predict_image
from bloodseg.labelme import load_labelme_folder
from bloodseg.ode import set_tolerance
from bloodseg.cli import main

CLI_TIMEOUT_S = 120


# ----------------------------------------------------------------------------- helpers

def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, array)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def picture(h=80, w=80, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def dataset(root: Path, n=3, h=80, w=80) -> Path:
    """``root/images`` + ``root/masks`` with ``n`` valid pairs ``s0..``; big enough for the smoke patch (64)."""
    rng = np.random.default_rng(7)
    for i in range(n):
        png(root / "images" / f"s{i}.png", picture(h, w, seed=i))
        png(root / "masks" / f"s{i}.png", rng.integers(0, 3, (h, w), dtype=np.uint8))
    return root


def labelme(folder: Path, shapes, image=True, image_path=None, name="a.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imageHeight": 80, "imageWidth": 80,
           "imagePath": image_path, "imageData": None}
    if image:
        doc["imageData"] = base64.b64encode(cv2.imencode(".png", picture())[1].tobytes()).decode()
    (folder / name).write_text(json.dumps(doc))
    return folder / name


def polygon(label, points):
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}


def tiny_checkpoint(path: Path, name="unet", **options) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(name, width=4, **options), epoch=0)


class _Exploit:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc, err, command, *fragments):
    """Exit 2, one 'bloodseg <command>: error:' message, no traceback, every fragment present."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert f"bloodseg {command}: error: " in err, err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def train_args(data, out, *extra):
    return ("train", "--model", "unet", "--width", "4", "--profile", "smoke", "--data", data,
            "--out", out, *extra)


# ----------------------------------------------------------------------------- real subprocesses

def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("bloodseg")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bloodseg.cli"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run every subprocess case once, four at a time; ``{case: (rc, stdout, stderr, folder)}``."""
    base = tmp_path_factory.mktemp("cli_runs")
    good = tiny_checkpoint(base / "good.pt")
    ode = tiny_checkpoint(base / "ode.pt", "ode-unet-5")
    image = png(base / "smear.png", picture(40, 56))
    (base / "noise.pt").write_bytes(np.random.default_rng(0).bytes(600))
    (base / "a_file").write_text("a regular file, not a folder")
    torch.save({"format": "bloodseg-checkpoint/1", "payload": _Exploit(base / "PWNED")}, base / "evil.pt")
    # accepted and converted: grey, RGBA, 16-bit colour
    grey = png(base / "converted" / "grey.png", picture(36, 52)[..., 0])
    rgba = png(base / "converted" / "rgba.png", np.dstack([picture(33, 47), np.full((33, 47), 9, np.uint8)]))
    deep = png(base / "converted" / "deep16.png", picture(40, 45).astype(np.uint16) * 257)
    png(base / "outside.png", picture())
    escape = base / "labelme_escape"
    labelme(escape, [polygon("rbc", [[1, 1], [9, 1], [9, 9]])], image=False, image_path="../outside.png")

    cases = {
        "predict_missing_ckpt": ["predict", "--ckpt", base / "missing.pt", base / "x.png", "--out", base / "o1"],
        "train_missing_data": ["train", "--model", "unet", "--data", "/nonexistent", "--out", base / "o2"],
        "evaluate_negative_rtol": ["evaluate", "--ckpt", ode, "--rtol", "-1"],
        "predict_evil_ckpt": ["predict", "--ckpt", base / "evil.pt", image, "--out", base / "o3"],
        "predict_converted": ["predict", "--ckpt", good, grey, rgba, deep, "--out", base / "o4", "--no-overlay"],
        "predict_out_under_file": ["predict", "--ckpt", good, image, "--out", base / "a_file" / "masks"],
        "train_labelme_escape": ["train", "--model", "unet", "--data", escape, "--out", base / "o5"],
        "predict_random_bytes_ckpt": ["predict", "--ckpt", base / "noise.pt", image, "--out", base / "o6"],
    }
    env = dict(os.environ, BLOODSEG_PROFILE="smoke", OMP_NUM_THREADS="1")

    def run(argv):
        p = subprocess.run(_entry_point() + [str(a) for a in argv], cwd=base, env=env, text=True,
                           capture_output=True, timeout=CLI_TIMEOUT_S)
        return p.returncode, p.stdout, p.stderr, base

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {k: pool.submit(run, argv) for k, argv in cases.items()}
        return {k: f.result() for k, f in futures.items()}


def test_cli_predict_with_a_missing_checkpoint(cli_runs):
    rc, out, err, base = cli_runs["predict_missing_ckpt"]
    assert_clean_error(rc, err, "predict", f"checkpoint not found: {base / 'missing.pt'}",
                       "best.pt or last.pt")
    assert not (base / "o1").exists()


def test_cli_train_with_a_missing_data_folder(cli_runs):
    rc, out, err, base = cli_runs["train_missing_data"]
    assert_clean_error(rc, err, "train", "data folder not found: /nonexistent",
                       "Pass 'synthetic', 'bccd', a folder with images/ and masks/")
    assert not (base / "o2").exists()


def test_cli_evaluate_with_a_negative_tolerance(cli_runs):
    rc, out, err, _ = cli_runs["evaluate_negative_rtol"]
    assert_clean_error(rc, err, "evaluate", "rtol", "must be a positive, finite number such as 1e-3",
                       "got -1.0")


def test_cli_predict_refuses_a_checkpoint_that_would_run_code(cli_runs):
    rc, out, err, base = cli_runs["predict_evil_ckpt"]
    assert_clean_error(rc, err, "predict", f"refused to load {base / 'evil.pt'}", "could run code",
                       "weights-only")
    assert not (base / "PWNED").exists()
    assert not (base / "o3").exists()          # refused before anything was written
    # the file is a real exploit: an unsafe load runs it (so the refusal above was not vacuous)
    torch.load(base / "evil.pt", weights_only=False)
    assert (base / "PWNED").exists()


def test_cli_predict_accepts_grey_rgba_and_16bit_images(cli_runs):
    rc, out, err, base = cli_runs["predict_converted"]
    assert rc == 0, err
    assert "Traceback" not in err
    for stem, (h, w) in (("grey", (36, 52)), ("rgba", (33, 47)), ("deep16", (40, 45))):
        assert f"{stem}.png -> " in out
        mask = cv2.imread(str(base / "o4" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and mask.max() <= 2


def test_cli_predict_into_a_folder_that_cannot_be_created(cli_runs):
    rc, out, err, base = cli_runs["predict_out_under_file"]
    assert_clean_error(rc, err, "predict", f"cannot write to the output folder {base / 'a_file' / 'masks'}",
                       "Not a directory", "--out")


def test_cli_train_refuses_a_labelme_image_path_outside_the_folder(cli_runs):
    rc, out, err, base = cli_runs["train_labelme_escape"]
    assert_clean_error(rc, err, "train", "imagePath '../outside.png'", str(base / "labelme_escape" / "a.json"),
                       "points outside the dataset folder", "imageData")
    assert not (base / "o5" / "last.pt").exists()


def test_cli_predict_with_random_bytes_as_checkpoint(cli_runs):
    rc, out, err, base = cli_runs["predict_random_bytes_ckpt"]
    assert_clean_error(rc, err, "predict", f"cannot read checkpoint {base / 'noise.pt'}",
                       "corrupt or not a PyTorch checkpoint", "written by bloodseg")


# ----------------------------------------------------------------------------- data folders via `bloodseg train`

def test_train_on_a_corrupt_png(tmp_path, capsys):
    root = dataset(tmp_path / "ds")
    (root / "images" / "s1.png").write_text("a text file saved with a .png name")
    rc, _, err = cli(capsys, *train_args(root, tmp_path / "run"))
    assert_clean_error(rc, err, "train", f"cannot decode {root / 'images' / 's1.png'}", "is it an image?",
                       "re-export it as PNG/JPEG")


def test_train_on_an_image_mask_size_mismatch(tmp_path, capsys):
    root = dataset(tmp_path / "ds")
    png(root / "masks" / "s2.png", np.zeros((70, 80), np.uint8))
    rc, _, err = cli(capsys, *train_args(root, tmp_path / "run"))
    assert_clean_error(rc, err, "train", "size mismatch", str(root / "images" / "s2.png"), "80x80",
                       str(root / "masks" / "s2.png"), "80x70", "a mask must have the size of its image")


def test_train_on_a_mask_value_of_7(tmp_path, capsys):
    root = dataset(tmp_path / "ds")
    mask = np.ones((80, 80), np.uint8)
    mask[10, 20] = 7
    png(root / "masks" / "s0.png", mask)
    rc, _, err = cli(capsys, *train_args(root, tmp_path / "run"))
    assert_clean_error(rc, err, "train", "mask value 7", str(root / "masks" / "s0.png"),
                       "0 background, 1 white cell, 2 red cell", "Convert the mask")


def test_train_on_an_image_without_mask(tmp_path, capsys):
    root = dataset(tmp_path / "ds")
    (root / "masks" / "s1.png").unlink()
    rc, _, err = cli(capsys, *train_args(root, tmp_path / "run"))
    assert_clean_error(rc, err, "train", f"image {root / 'images' / 's1.png'} has no mask",
                       f"expected {root / 'masks' / 's1.png'}", "add it or move the image out")


def test_train_and_predict_on_empty_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, *train_args(tmp_path / "empty", tmp_path / "run"))
    assert_clean_error(rc, err, "train", str(tmp_path / "empty"), "holds neither images/ + masks/",
                       "bloodseg train --help")
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "masks").mkdir()
    rc, _, err = cli(capsys, *train_args(tmp_path / "ds", tmp_path / "run"))
    assert_clean_error(rc, err, "train", f"no images in {tmp_path / 'ds' / 'images'}", ".png .jpg",
                       "put the smear images there")
    ckpt = tiny_checkpoint(tmp_path / "u.pt")
    rc, _, err = cli(capsys, "predict", "--ckpt", ckpt, tmp_path / "empty", "--out", tmp_path / "o")
    assert_clean_error(rc, err, "predict", "no images (.png, .jpg", f"in folder {tmp_path / 'empty'}")


def test_train_on_images_smaller_than_the_patch(tmp_path, capsys):
    root = dataset(tmp_path / "ds", h=48, w=60)
    rc, _, err = cli(capsys, *train_args(root, tmp_path / "run"))
    assert_clean_error(rc, err, "train", "image 's0'", str(root), "60x48", "64x64 training patch",
                       "'smoke' recipe", "--profile", "smoke 64")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["unknown label", "malformed polygon", "missing image", "absolute path"])
def test_train_on_bad_labelme_files(tmp_path, capsys, case):
    folder = tmp_path / "lm"
    png(tmp_path / "elsewhere.png", picture())
    labelme(folder, [polygon("rbc", [[1, 1], [30, 1], [30, 30]])], name="fine.json")
    if case == "unknown label":
        bad = labelme(folder, [polygon("Platelet", [[1, 1], [9, 1], [9, 9]])])
        expected = ["unknown label 'Platelet' (shape 0)", str(bad), "known labels: wbc", "label_map="]
    elif case == "malformed polygon":
        bad = labelme(folder, [polygon("wbc", [[1, 1], [9, 1]])])
        expected = ["malformed polygon (shape 0, label 'wbc')", str(bad), "at least 3 numeric [x, y] points",
                    "fix or delete the shape"]
    elif case == "missing image":
        bad = labelme(folder, [], image=False, image_path="scan_17.png")
        expected = [f"image for {bad} not found", str(folder / "scan_17.png"), "imageData embedded"]
    else:
        bad = labelme(folder, [], image=False, image_path=str(tmp_path / "elsewhere.png"))
        expected = [f"imagePath '{tmp_path / 'elsewhere.png'}'", str(bad), "points outside the dataset folder"]
    rc, _, err = cli(capsys, *train_args(folder, tmp_path / "run"))
    assert_clean_error(rc, err, "train", *expected)


def test_labelme_paths_cannot_escape_the_dataset_folder(tmp_path):
    secret = png(tmp_path / "private" / "secret.png", picture(seed=5))
    folder = tmp_path / "ds"
    for path in ("../../private/secret.png", "..\\..\\private\\secret.png", str(secret),
                 "sub/../../../private/secret.png", "link.png"):
        shutil.rmtree(folder / "only", ignore_errors=True)
        labelme(folder / "only", [], image=False, image_path=path)
        if path == "link.png":
            (folder / "only" / "link.png").symlink_to(secret)
        with pytest.raises(DataError) as err:
            load_labelme_folder(folder / "only")
        msg = str(err.value)
        assert "points outside the dataset folder" in msg and str(folder / "only" / "a.json") in msg, path
        assert "for safety" in msg and "imageData" in msg
    # the same file *inside* the folder is read
    png(folder / "inside" / "img" / "s.png", picture(seed=5))
    labelme(folder / "inside", [], image=False, image_path="img/./s.png")
    sample, = load_labelme_folder(folder / "inside")
    assert np.array_equal(sample.image, picture(seed=5))


def test_a_labelme_json_linked_from_outside_the_folder_is_refused(tmp_path):
    outside = labelme(tmp_path / "elsewhere", [polygon("rbc", [[1, 1], [30, 1], [30, 30]])])
    folder = tmp_path / "ds"
    labelme(folder, [polygon("wbc", [[1, 1], [30, 1], [30, 30]])], name="fine.json")
    assert len(load_labelme_folder(folder)) == 1
    (folder / "linked.json").symlink_to(outside)
    with pytest.raises(DataError) as err:
        load_labelme_folder(folder)
    msg = str(err.value)
    assert str(folder / "linked.json") in msg and str(outside) in msg and "outside the LabelMe folder" in msg
    assert "for safety" in msg and "Copy the file" in msg
    (folder / "linked.json").unlink()                     # a link that stays inside the folder is fine
    (folder / "again.json").symlink_to(folder / "fine.json")
    assert len(load_labelme_folder(folder)) == 2


def test_grey_rgba_and_16bit_training_images_are_converted(tmp_path):
    root = dataset(tmp_path / "ds")
    png(root / "images" / "s0.png", picture(seed=0)[..., 1])                          # grey
    png(root / "images" / "s1.png", np.dstack([picture(seed=1), np.zeros((80, 80), np.uint8)]))  # RGBA
    png(root / "images" / "s2.png", picture(seed=2).astype(np.uint16) << 8)           # 16-bit
    splits = training_splits(root, "smoke", seed=0)
    samples = [s for split in splits.values() for s in split]
    assert samples and all(s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3) for s in samples)
    grey = [s for s in samples if s.source == "s0" and s.name.endswith("_p00")]
    assert grey and all(np.array_equal(s.image[..., 0], s.image[..., 2]) for s in grey)


# ----------------------------------------------------------------------------- images at `bloodseg predict`

def test_predict_on_truncated_zero_byte_and_missing_images(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "u.pt")
    whole = png(tmp_path / "whole.jpg", picture(120, 160))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    (tmp_path / "zero.png").write_bytes(b"")
    # an unreadable image is reported (file + reason) and skipped: the others are written, exit 1
    for image, fragments in (
            (cut, [f"cannot decode {cut}", "truncated or corrupt", "re-export"]),
            (tmp_path / "zero.png", [f"image file is empty (0 bytes): {tmp_path / 'zero.png'}", "re-export"])):
        (tmp_path / "masks" / "whole.png").unlink(missing_ok=True)
        rc, out, err = cli(capsys, "predict", "--ckpt", ckpt, whole, image, "--out", tmp_path / "masks")
        assert rc == 1 and "Traceback" not in err and f"skipped {image.name}:" in err
        assert all(f in err for f in fragments), err
        assert (tmp_path / "masks" / "whole.png").exists() and not (tmp_path / "masks" / f"{image.stem}.png").exists()
    # a missing input stops the run before anything is predicted (exit 2)
    rc, out, err = cli(capsys, "predict", "--ckpt", ckpt, whole, tmp_path / "nope.png", "--out", tmp_path / "m2")
    assert_clean_error(rc, err, "predict", f"input not found: {tmp_path / 'nope.png'}", "Give image files or folders")
    rc, out, err = cli(capsys, "predict", "--ckpt", ckpt, whole, "--out", tmp_path / "masks")
    assert rc == 0 and (tmp_path / "masks" / "whole.png").exists()


def test_images_smaller_than_a_tile_or_a_patch_are_padded_at_prediction():
    torch.manual_seed(0)
    model = build_model("unet", width=4).eval()
    for h, w in ((5, 7), (1, 1), (17, 33)):
        mask = predict_image(model, picture(h, w))
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and mask.max() <= 2


# ----------------------------------------------------------------------------- checkpoints via the CLI

def test_checkpoint_of_another_class_count_or_architecture(tmp_path, capsys):
    two = tiny_checkpoint(tmp_path / "two.pt", classes=2)
    image = png(tmp_path / "x.png", picture(32, 32))
    rc, _, err = cli(capsys, "predict", "--ckpt", two, image, "--out", tmp_path / "o")
    assert_clean_error(rc, err, "predict", f"{two} predicts 2 classes, but 3 are needed",
                       "trained with the same classes")
    rc, _, err = cli(capsys, "evaluate", "--ckpt", two, "--profile", "smoke")
    assert_clean_error(rc, err, "evaluate", "predicts 2 classes, but 3")
    lie = load_checkpoint(tiny_checkpoint(tmp_path / "u.pt"))
    lie["model_name"] = "resunet"          # U-Net weights labelled as a ResUNet
    torch.save(lie, tmp_path / "lie.pt")
    rc, _, err = cli(capsys, "predict", "--ckpt", tmp_path / "lie.pt", image, "--out", tmp_path / "o")
    assert_clean_error(rc, err, "predict", f"the weights in {tmp_path / 'lie.pt'} do not fit a 'resunet'")
    assert not (tmp_path / "o").exists()


def _resumable(path, name="unet", width=4):
    model = build_model(name, width=width)
    opt = torch.optim.Adam(model.parameters())
    return save_checkpoint(path, model, opt, epoch=1, step=0, history=[], best_val_loss=1.0,
                           rng={"torch": torch.get_rng_state()})


def test_resuming_a_run_of_another_model_or_width(tmp_path, capsys):
    _resumable(tmp_path / "run" / "last.pt", "unet", width=4)
    rc, _, err = cli(capsys, "train", "--model", "resunet", "--width", "4", "--profile", "smoke",
                     "--out", tmp_path / "run")
    assert_clean_error(rc, err, "train", f"{tmp_path / 'run' / 'last.pt'} belongs to a 'unet' run, not 'resunet'",
                       "another --out folder", "--restart")
    rc, _, err = cli(capsys, "train", "--model", "unet", "--width", "8", "--profile", "smoke",
                     "--out", tmp_path / "run")
    assert_clean_error(rc, err, "train", f"{tmp_path / 'run' / 'last.pt'} holds a 'unet' model",
                       "'width': 4", "'width': 8", "do not fit", "--restart")
    tiny_checkpoint(tmp_path / "bare" / "last.pt")   # weights only: nothing to resume from
    rc, _, err = cli(capsys, "train", "--model", "unet", "--width", "4", "--profile", "smoke",
                     "--out", tmp_path / "bare")
    assert_clean_error(rc, err, "train", "cannot resume a run: it lacks optimizer_state", "--restart")


# ----------------------------------------------------------------------------- tolerances

@pytest.mark.parametrize("bad", [-1.0, float("nan"), 0.0, float("inf")])
def test_bad_tolerances_are_refused_with_the_valid_range(bad):
    with pytest.raises(BloodsegError) as err:
        ODEBlock(4, rtol=bad, name="ODE-block at position 5")
    msg = str(err.value)
    assert "rtol of ODE-block at position 5" in msg and "positive, finite number such as 1e-3" in msg
    assert f"got {bad!r}" in msg
    model = build_model("nodes-unet", width=4)
    with pytest.raises(BloodsegError, match=r"rtol must be a positive, finite number.*got"):
        set_tolerance(model, bad)
    with pytest.raises(BloodsegError, match=r"atol must be a positive, finite number"):
        set_tolerance(model, 1e-3, atol=bad)
    assert sorted(b.rtol for b in model.ode.values()) == [1e-6, 1e-4, 1e-4]   # nothing changed


def test_cli_nan_or_negative_tolerance(tmp_path, capsys):
    ode = tiny_checkpoint(tmp_path / "ode.pt", "ode-unet-5")
    rc, _, err = cli(capsys, "evaluate", "--ckpt", ode, "--rtol", "nan", "--profile", "smoke")
    assert_clean_error(rc, err, "evaluate", "must be a positive, finite number", "got nan")
    unet = tiny_checkpoint(tmp_path / "u.pt")    # no ODE-block: the value is still checked
    rc, _, err = cli(capsys, "evaluate", "--ckpt", unet, "--rtol", "-0.5", "--profile", "smoke")
    assert_clean_error(rc, err, "evaluate", "rtol must be a positive, finite number", "got -0.5")
    rc, _, err = cli(capsys, "train", "--model", "ode-unet-5", "--rtol", "-1", "--width", "4",
                     "--profile", "smoke", "--out", tmp_path / "run")
    assert_clean_error(rc, err, "train", "rtol of ODE-block at position 5 must be a positive", "got -1.0")
    assert not (tmp_path / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------- outputs that cannot be written

def test_outputs_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected")
    rc, _, err = cli(capsys, "train", "--model", "unet", "--width", "4", "--profile", "smoke",
                     "--out", blocker / "run")
    assert_clean_error(rc, err, "train", f"cannot write to the output folder {blocker / 'run'}",
                       "Choose a folder you can write to (--out)")
    ckpt = tiny_checkpoint(tmp_path / "u.pt")
    rc, out, err = cli(capsys, "evaluate", "--ckpt", ckpt, "--profile", "smoke", "--json", blocker / "m.json")
    assert_clean_error(rc, err, "evaluate", f"cannot write {blocker / 'm.json'}", "folder you can write to")
    rc, _, err = cli(capsys, "synth", "--out", blocker / "smears", "-n", "1", "--size", "32", "32")
    assert_clean_error(rc, err, "synth", str(blocker / "smears"), "choose a folder you can write to")


# ----------------------------------------------------------------------------- a NaN loss at the CLI

def test_cli_nan_loss_stops_and_says_what_was_kept(tmp_path, capsys):
    common = ("train", "--model", "unet", "--width", "4", "--profile", "smoke", "--lr", "1e30")
    rc, _, err = cli(capsys, *common, "--out", tmp_path / "a", "--checkpoint-every", "1")
    assert_clean_error(rc, err, "train", "the training loss became nan at epoch 1, step 2",
                       f"last good checkpoint is kept in {tmp_path / 'a' / 'last.pt'}", "Lower the learning rate")
    kept = load_checkpoint(tmp_path / "a" / "last.pt")
    assert (kept["epoch"], kept["step"]) == (0, 1)
    assert all(torch.isfinite(v).all() for v in kept["model_state"].values() if v.is_floating_point())
    rc, _, err = cli(capsys, *common, "--out", tmp_path / "b")
    assert_clean_error(rc, err, "train", "became nan", f"No checkpoint was written before it (none in {tmp_path / 'b'})")
    assert not (tmp_path / "b" / "last.pt").exists()
