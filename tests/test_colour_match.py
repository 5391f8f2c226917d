"""Matching a photograph's background colour (bloodseg.stain.match_background) and its use by the
Segmenter (``background`` / ``colour``) and the CLI (``--colour``)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bloodseg import stain as S
from bloodseg.bccd import bccd_sample_dir
from bloodseg.checkpoint import load_checkpoint
from bloodseg.errors import BloodsegError
from bloodseg.io import read_image, read_mask, write_image
from bloodseg.models import build_model
from bloodseg.segmenter import Segmenter


@pytest.fixture(scope="module")
def photo():
    path = sorted((bccd_sample_dir() / "images").glob("*.jpg"))[1]
    return read_image(path)


def tiny():
    torch.manual_seed(0)
    return build_model("unet", width=4).eval()


def test_background_is_the_plasma_colour_of_a_real_smear(photo):
    bg = S.background_colour(photo)
    luma = photo.mean(axis=2)
    assert bg.shape == (3,)
    assert np.all(bg > np.median(photo.reshape(-1, 3), axis=0))     # brighter than the typical pixel
    assert bg.mean() < luma.max()


@pytest.mark.parametrize("gains", [(1.2, 1.0, 0.8), (0.8, 1.0, 1.2), (0.7, 0.7, 0.7), (1.1, 0.9, 1.0)])
def test_a_colour_cast_is_undone(photo, gains):
    ref = S.background_colour(photo)
    cast = S.white_balance(photo, gains)
    before = np.abs(cast.astype(int) - photo).mean()
    back = S.match_background(cast, ref)
    after = np.abs(back.astype(int) - photo).mean()
    assert after < 1.5 and after < before / 4
    assert np.allclose(S.background_colour(back), ref, atol=2.0)


def test_dark_images_and_bad_references(photo):
    dark = (photo // 10).astype(np.uint8)
    assert S.match_background(dark, (200, 200, 200)) is dark              # not a bright-field smear: as it is
    big = S.match_background(S.white_balance(photo, (0.3, 1, 1)), S.background_colour(photo))
    assert S.background_colour(big)[0] < 0.7 * S.background_colour(photo)[0]   # gains limited to 2x
    for bad in [(0, 200, 200), (200, 200), (300, 200, 200), "white"]:
        with pytest.raises(BloodsegError, match="background colour"):
            S.match_background(photo, bad)


def test_segmenter_colour_defaults_round_trip_and_predict(tmp_path, photo):
    small = photo[:128, :160].copy()
    assert Segmenter(tiny()).colour == "none"
    seg = Segmenter(tiny(), tile=64, overlap=16, background=(190.0, 200.0, 205.0))
    assert seg.colour == "background" and seg.background == (190.0, 200.0, 205.0)
    for bad in (dict(colour="background"), dict(colour="grey", background=(1, 2, 3)), dict(background=(0, 2, 3))):
        with pytest.raises(BloodsegError):
            Segmenter(tiny(), **bad)
    cast = S.white_balance(small, (1.2, 1.0, 0.8))
    plain = seg.replace(colour="none")
    matched = S.match_background(cast, seg.background)
    assert np.array_equal(seg.predict(cast), plain.predict(matched))        # prepare() runs first, once
    assert torch.equal(seg.predict_proba(cast), plain.predict_proba(matched))
    assert not np.array_equal(seg.prepare(cast), cast) and plain.prepare(cast) is cast
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png", cast)
    rows = seg.predict_files([tmp_path / "in"], tmp_path / "out", overlays=False)
    assert np.array_equal(read_mask(rows[0]["mask"]), seg.predict(cast))
    path = seg.save(tmp_path / "s.pt")
    assert load_checkpoint(path)["segmenter"]["colour"] == "background"
    again = Segmenter.load(path, device="cpu")
    assert (again.colour, again.background) == ("background", seg.background)
    assert Segmenter.load(plain.save(tmp_path / "p.pt"), device="cpu").colour == "none"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bloodseg.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_colour_flag(tmp_path, photo):
    small = S.white_balance(photo[:128, :160].copy(), (1.2, 1.0, 0.8))
    write_image(tmp_path / "a.png", small)
    with_bg = Segmenter(tiny(), tile=64, overlap=16, background=(190.0, 200.0, 205.0))
    ckpt = with_bg.save(tmp_path / "bg.pt")
    bare = Segmenter(tiny(), tile=64, overlap=16).save(tmp_path / "bare.pt")

    def run(ck, *flags):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        proc = _cli("predict", "--ckpt", ck, tmp_path / "a.png", "--out", out, "--no-overlay", "--tile", 64,
                    "--overlap", 16, *flags)
        return proc, (read_mask(out / "a.png") if proc.returncode == 0 else None)

    proc, default = run(ckpt)
    assert proc.returncode == 0 and np.array_equal(default, with_bg.predict(small))
    proc, none = run(ckpt, "--colour", "none")
    assert np.array_equal(none, with_bg.replace(colour="none").predict(small))
    proc, exact = run(ckpt, "--exact")
    assert np.array_equal(exact, none)
    proc, _ = run(ckpt, "--exact", "--colour", "background")
    assert proc.returncode == 2 and "--exact" in proc.stderr
    proc, _ = run(bare, "--colour", "background")
    assert proc.returncode == 2 and "does not store one" in proc.stderr
