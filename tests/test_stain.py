"""Stain and camera shifts (bloodseg.stain) and their use in the training data (DataRecipe.stain)."""
from __future__ import annotations

import numpy as np
import pytest

from bloodseg import stain as S
from bloodseg.datasets import augment, training_splits
from bloodseg.errors import BloodsegError
from bloodseg.io import Sample, read_image
from bloodseg.bccd import bccd_sample_dir
from bloodseg.recipe import Recipe, get_recipe
from bloodseg.synthetic import make_smear


@pytest.fixture(scope="module")
def photo():
    """A real BCCD photograph (vendored sample), cropped to keep the tests fast."""
    path = sorted((bccd_sample_dir() / "images").glob("*.jpg"))[0]
    return read_image(path)[100:300, 150:450].copy()


def test_hed_round_trip_within_two_grey_levels(photo):
    smear = make_smear(3, size=(120, 160))[0]
    every = np.stack(np.meshgrid(np.arange(256), np.arange(256), [0, 37, 128, 255]), -1).reshape(-1, 16, 3)
    for image in (photo, smear, every.astype(np.uint8)):
        back = S.from_hed(S.to_hed(image))
        assert back.dtype == np.uint8 and back.shape == image.shape
        assert np.abs(back.astype(int) - image).max() <= 2
    assert np.array_equal(S.hed_jitter(photo), S.from_hed(S.to_hed(photo)))


def test_zero_strength_is_identity(photo):
    for seed in range(3):
        assert np.array_equal(S.random_stain(photo, np.random.default_rng(seed), 0.0), photo)
    assert np.array_equal(S.white_balance(photo), photo) and np.array_equal(S.gamma(photo, 1.0), photo)
    assert np.array_equal(S.blur(photo, 0), photo)


@pytest.mark.parametrize("name, fn", [
    ("hed H", lambda x: S.hed_jitter(x, (1.25, 1, 1), (0.05, 0, 0))),
    ("hed E", lambda x: S.hed_jitter(x, (1, 0.75, 1), (0, -0.05, 0))),
    ("warm", lambda x: S.white_balance(x, (0.9, 1.0, 1.1))),
    ("gamma", lambda x: S.gamma(x, 1.35)),
    ("jpeg", lambda x: S.jpeg(x, 30)),
    ("blur", lambda x: S.blur(x, 1.5)),
    ("random", lambda x: S.random_stain(x, np.random.default_rng(0), 1.0)),
])
def test_each_transform_changes_the_image_keeps_type_and_leaves_input(photo, name, fn):
    before = photo.copy()
    out = fn(photo)
    assert out.dtype == np.uint8 and out.shape == photo.shape, name
    assert 0 <= out.min() and out.max() <= 255
    assert np.abs(out.astype(int) - photo).mean() > 0.5, name
    assert np.array_equal(photo, before), name        # the argument is never written


def test_same_seed_same_output_other_seed_other_output(photo):
    a = S.random_stain(photo, np.random.default_rng(7), 0.6)
    b = S.random_stain(photo, np.random.default_rng(7), 0.6)
    c = S.random_stain(photo, np.random.default_rng(8), 0.6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_arguments_are_clear_errors(photo):
    rng = np.random.default_rng(0)
    for bad in (-0.1, 1.5, float("nan"), "x", True):
        with pytest.raises(BloodsegError, match="strength"):
            S.random_stain(photo, rng, bad)
    with pytest.raises(BloodsegError, match="BGR uint8"):
        S.to_hed(photo.astype(np.float32))
    with pytest.raises(BloodsegError, match="quality"):
        S.jpeg(photo, 0)
    with pytest.raises(BloodsegError, match="gains"):
        S.white_balance(photo, (1, 0, 1))


def test_augment_with_stain_keeps_geometry_and_names():
    image, mask = make_smear(1, size=(64, 64))
    plain = augment([Sample("s", image, mask, "s")], factor=4, seed=2)
    shifted = augment([Sample("s", image, mask, "s")], factor=4, seed=2, stain=0.8)
    assert [s.name for s in plain] == [s.name for s in shifted]
    assert all(np.array_equal(p.mask, q.mask) for p, q in zip(plain, shifted))
    assert all(not np.array_equal(p.image, q.image) for p, q in zip(plain, shifted))
    again = augment([Sample("s", image, mask, "s")], factor=4, seed=2, stain=0.8)
    assert all(np.array_equal(p.image, q.image) for p, q in zip(again, shifted))


def test_training_splits_shift_training_samples_only():
    base = get_recipe("smoke")
    plain = training_splits("synthetic", base)
    shifted = training_splits("synthetic", base.replace(**{"data.stain": 0.7}))
    for split in ("val", "test"):
        assert [s.name for s in plain[split]] == [s.name for s in shifted[split]]
        assert all(np.array_equal(p.image, q.image) for p, q in zip(plain[split], shifted[split])), split
    assert [s.name for s in plain["train"]] == [s.name for s in shifted["train"]]
    changed = [not np.array_equal(p.image, q.image) for p, q in zip(plain["train"], shifted["train"])]
    assert np.mean(changed) > 0.9


def test_old_recipes_without_stain_still_load():
    d = get_recipe("smoke").to_dict()
    del d["data"]["stain"]
    r = Recipe.from_dict(d)
    assert r.data.stain == 0.0 and r == get_recipe("smoke")
    assert Recipe.from_dict(get_recipe("smoke").replace(**{"data.stain": 0.5}).to_dict()).data.stain == 0.5


class _Thresholds:
    """A stand-in Segmenter: white cell where the image is much bluer than red (fast, no network)."""

    def scale_for(self, image):
        return 1.0

    def prepare(self, image):
        return image

    def predict(self, image, input_scale=None, prepared=False):
        b, r = image[..., 0].astype(int), image[..., 2].astype(int)
        return np.where(b - r > 15, 1, 0).astype(np.uint8)

    def segment(self, image, *a, **kw):
        from bloodseg.segmenter import Prediction
        return Prediction(mask=self.predict(image), factor=self.scale_for(image))


def test_stain_shift_scores_rows_and_paired_drops():
    from bloodseg.paper.robustness import SHIFTS, apply_shift, stain_shift_scores
    samples = []
    for seed in range(3):
        image, mask = make_smear(seed, size=(96, 128))
        samples.append(Sample(f"s{seed}", image, mask, f"s{seed}"))
    assert apply_shift(samples[0].image, "none") is samples[0].image
    assert set(SHIFTS) >= {"hed_h+", "hed_h-", "hed_e+", "hed_e-", "warm", "cool", "jpeg_30", "blur_1.5"}
    rows = stain_shift_scores(_Thresholds(), samples, shifts=["warm", "jpeg_30"], n_boot=200)
    assert list(rows) == ["none", "warm", "jpeg_30"]
    base = rows["none"]
    assert len(base["per_photo_iou"]) == 3 and 0 <= base["white_iou_pooled"] <= 1
    for name in ("warm", "jpeg_30"):
        r = rows[name]
        assert r["drop_pp"] == pytest.approx(100 * (base["white_iou_pooled"] - r["white_iou_pooled"]))
        lo, hi = r["drop_pp_ci"]
        assert lo <= hi and r["within_goal"] == (r["drop_pp"] <= 2.0)
        assert r["mean_drop_pp"] == pytest.approx(100 * (base["white_iou_mean"] - r["white_iou_mean"]))
        assert r["goal_verdict"] in ("holds", "does not hold", "inconclusive")


def test_strong_shifts_change_the_photograph_and_stay_images(photo):
    from bloodseg.paper.robustness import SHIFTS, STRONG_SHIFTS, apply_shift
    assert not set(SHIFTS) & set(STRONG_SHIFTS)
    for name in STRONG_SHIFTS:
        out = apply_shift(photo, name)
        assert out.shape == photo.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - photo).mean() > 2, name
    # beyond the training range: a stronger cast than the strongest of SHIFTS
    assert (np.abs(apply_shift(photo, "wb_cool_0.2").astype(int) - photo).mean()
            > np.abs(apply_shift(photo, "cool").astype(int) - photo).mean())
