"""Automatic scale: the red-cell diameter of a photograph, measured without a network, and the
resize factor a Segmenter with scale="auto" derives from it."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from bloodseg.checkpoint import load_checkpoint
from bloodseg.errors import BloodsegError
from bloodseg.io import write_image
from bloodseg.models import build_model
from bloodseg.scale import auto_scale, is_crop, red_cell_diameter
from bloodseg.segmenter import Segmenter
from bloodseg.synthetic import make_smear

ROUND = {"rbc_ellipticity": (1.0, 1.0)}


def tiny():
    torch.manual_seed(0)
    return build_model("unet", width=4).eval()


@pytest.fixture(scope="module")
def smears():
    """Round red cells of radius 12 and 24 px (diameters 24 and 48), two seeds each."""
    return {r: [make_smear(seed, size=(240, 320), rbc_radius=(r, r), **ROUND)[0] for seed in (0, 1)]
            for r in (12, 24)}


def _resize(image, f):
    return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


@pytest.mark.parametrize("radius", [12, 24])
def test_diameter_within_15_percent_of_the_painted_cells(smears, radius):
    for image in smears[radius]:
        d = red_cell_diameter(image)
        assert d is not None and abs(d / (2 * radius) - 1) < 0.15, (radius, d)


def test_diameter_of_varied_cells_is_near_their_typical_minor_axis():
    """Default smears: semi-major axis 20-29 px, minor/major 0.78-1: typical minor axis ~ 2*24.5*0.89."""
    d = red_cell_diameter(make_smear(3)[0])
    assert d is not None and abs(d / (2 * 24.5 * 0.89) - 1) < 0.15, d


def test_diameter_scales_with_the_photograph(smears):
    image = smears[24][0]
    d = red_cell_diameter(image)
    for f in (0.5, 2.0):
        ratio = red_cell_diameter(_resize(image, f)) / d
        assert abs(ratio / f - 1) < 0.06, (f, ratio)


def test_no_diameter_without_red_cells():
    assert red_cell_diameter(np.full((200, 300, 3), 225, np.uint8)) is None
    rng = np.random.default_rng(0)
    assert red_cell_diameter(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)) is None
    assert red_cell_diameter(np.full((8, 8, 3), 225, np.uint8)) is None


def test_auto_scale_brings_cells_to_the_target_clamps_and_falls_back(smears):
    image = smears[24][0]
    d = red_cell_diameter(image)
    assert auto_scale(image, 24.0, 1.0, diameter=d) == pytest.approx(24.0 / d)
    assert auto_scale(image, 24.0, 1.0) == pytest.approx(24.0 / d)              # measured itself
    assert auto_scale(image, 1000.0, 0.5, diameter=d) == 2.0                     # clamped high
    assert auto_scale(image, 1.0, 0.5, diameter=d) == 0.2                        # clamped low
    assert auto_scale(image, 3.0, 0.5, diameter=d, lo=0.1, hi=4) == pytest.approx(0.1)
    blank = np.full((200, 300, 3), 225, np.uint8)
    assert auto_scale(blank, 24.0, 0.5) == 0.5                                  # cannot tell
    assert auto_scale(image, 0.58 * d, 0.5, diameter=d) == 0.5                  # within 20%: as trained
    with pytest.raises(BloodsegError):
        auto_scale(image, 0.0, 0.5)


def test_segmenter_scale_setting_defaults_and_checks():
    assert Segmenter(tiny()).scale == "fixed"
    assert Segmenter(tiny(), red_cell_diameter=20.0).scale == "auto"
    assert Segmenter(tiny(), red_cell_diameter=20.0, scale="fixed").scale == "fixed"
    with pytest.raises(BloodsegError):
        Segmenter(tiny(), scale="auto")                                          # no diameter known
    with pytest.raises(BloodsegError):
        Segmenter(tiny(), red_cell_diameter=20.0, scale="sometimes")
    with pytest.raises(BloodsegError):
        Segmenter(tiny(), red_cell_diameter=-1.0)


def test_auto_segmenter_reports_per_image_scales_and_round_trips(tmp_path):
    # whole fields (shorter side >= CROP_SIDE, 384): their red cells are measured; crops take _crop_scale
    smears = {r: [make_smear(0, size=(400, 520), rbc_radius=(r, r), **ROUND)[0]] for r in (12, 24)}
    assert not any(is_crop(s[0]) for s in smears.values())
    seg = Segmenter(tiny(), input_scale=0.5, red_cell_diameter=24.0, tile=64, overlap=16)
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "a_small.png", smears[12][0])
    write_image(folder / "b_large.png", smears[24][0])
    rows = seg.predict_files([folder], tmp_path / "masks", overlays=False)
    scales = [r["scale"] for r in rows]
    expected = [seg.scale_for(smears[12][0]), seg.scale_for(smears[24][0])]
    assert scales == pytest.approx(expected)
    assert scales[0] > 1.5 * scales[1] and scales[1] == pytest.approx(0.5, rel=0.2)
    mask = seg.predict(smears[12][0])
    assert mask.shape == smears[12][0].shape[:2]
    assert np.array_equal(mask, seg.predict(smears[12][0], input_scale=scales[0]))
    counts = seg.count_files([folder])
    assert [r["scale"] for r in counts] == pytest.approx(expected)
    fixed = seg.replace(scale="fixed")
    assert [r["scale"] for r in fixed.predict_files([folder], tmp_path / "fixed", overlays=False)] == [0.5, 0.5]

    path = seg.save(tmp_path / "auto.pt")
    stored = load_checkpoint(path)["segmenter"]
    assert stored["scale"] == "auto" and stored["red_cell_diameter"] == 24.0
    again = Segmenter.load(path, device="cpu")
    assert (again.scale, again.red_cell_diameter) == ("auto", 24.0)
    assert Segmenter.load(fixed.save(tmp_path / "fixed.pt"), device="cpu").scale == "fixed"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bloodseg.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_scale_flags_and_exact_gives_the_fixed_pipeline(tmp_path, smears):
    ckpt = Segmenter(tiny(), input_scale=0.5, red_cell_diameter=24.0, tile=64, overlap=16).save(tmp_path / "a.pt")
    image = smears[12][0]
    write_image(tmp_path / "smear.png", image)
    fixed = Segmenter.load(ckpt, device="cpu").replace(scale="fixed")
    auto = Segmenter.load(ckpt, device="cpu")
    assert auto.scale_for(image) != 0.5

    def mask_of(*flags):
        proc = _cli("predict", "--ckpt", ckpt, tmp_path / "smear.png", "--out", tmp_path / "out", "--no-overlay", "--tile", 64, "--overlap", 16,
                    *flags)
        assert proc.returncode == 0, proc.stderr
        return cv2.imread(str(tmp_path / "out" / "smear.png"), cv2.IMREAD_UNCHANGED)

    assert np.array_equal(mask_of("--exact"), fixed.predict(image))
    assert np.array_equal(mask_of("--crop-cells", "all"), auto.replace(crop_cells="all").predict(image))
    assert np.array_equal(mask_of(), auto.predict(image))
    assert np.array_equal(mask_of("--scale", "auto"), auto.predict(image))
    assert np.array_equal(mask_of("--scale", "0.7"), fixed.predict(image, input_scale=0.7))
    assert _cli("predict", "--ckpt", ckpt, tmp_path / "smear.png", "--out", tmp_path / "o",
                "--exact", "--scale", "auto").returncode != 0
    proc = _cli("count", "--ckpt", ckpt, tmp_path / "smear.png", "--scale", "zero")
    assert proc.returncode != 0 and "--scale" in proc.stderr
