import base64
import csv
import json

import cv2
import numpy as np
import pytest
import torch

from bloodseg.bccd import prepare_bccd
from bloodseg.classes import colourise_mask
from bloodseg.datasets import SegmentationDataset, augment, extract_patches, make_splits, synthetic_splits
from bloodseg.errors import DataError
from bloodseg.io import Sample, load_folder, load_splits, read_image, read_mask
from bloodseg.labelme import labelme_to_mask, load_labelme_folder


def write(path, array, ext=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(ext or path.suffix, array)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def colour_image(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- read_image

def test_read_image_missing_file(tmp_path):
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "nope.png")
    msg = str(err.value)
    assert "not found" in msg and str(tmp_path / "nope.png") in msg and "check the path" in msg


def test_read_image_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "empty.jpg")
    msg = str(err.value)
    assert "empty (0 bytes)" in msg and str(tmp_path / "empty.jpg") in msg and "re-export" in msg


def test_read_image_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("these are my notes, not a picture")
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "notes.png")
    msg = str(err.value)
    assert "cannot decode" in msg and "is it an image?" in msg and "re-export it as PNG/JPEG" in msg
    assert str(tmp_path / "notes.png") in msg


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_read_image_truncated(tmp_path, ext):
    good = write(tmp_path / f"good{ext}", colour_image(120, 160))
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert read_image(good).shape == (120, 160, 3)
    with pytest.raises(DataError, match="cannot decode .*cut"):
        read_image(cut)


def test_read_image_converts_grey_rgba_and_16bit(tmp_path):
    grey = np.arange(40 * 50, dtype=np.uint32).reshape(40, 50).astype(np.uint8)
    out = read_image(write(tmp_path / "grey.png", grey))
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], grey) for c in range(3))

    bgr = colour_image()
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 7, np.uint8)])
    assert np.array_equal(read_image(write(tmp_path / "rgba.png", bgra)), bgr)   # alpha dropped

    deep = (bgr.astype(np.uint16) << 8) | 0xAB
    assert np.array_equal(read_image(write(tmp_path / "deep.png", deep)), bgr)   # 16-bit >> 8
    deep_grey = (grey.astype(np.uint16) << 8) | 3
    assert np.array_equal(read_image(write(tmp_path / "deep_grey.tif", deep_grey))[..., 1], grey)


def test_read_image_refuses_float_pixels(tmp_path):
    path = write(tmp_path / "float.tiff", np.random.default_rng(0).random((20, 20, 3), dtype=np.float32))
    with pytest.raises(DataError, match="unsupported pixel type float32 .*float.tiff.*8-bit or 16-bit"):
        read_image(path)


def test_read_image_real_bccd_jpeg(bccd_sample):
    image = read_image(bccd_sample / "images" / "BloodImage_00000.jpg")
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8


# ----------------------------------------------------------------------------- read_mask

def test_read_mask_plain_classes(tmp_path):
    mask = np.random.default_rng(1).integers(0, 3, (30, 40), dtype=np.uint8)
    got = read_mask(write(tmp_path / "m.png", mask))
    assert got.dtype == np.uint8 and np.array_equal(got, mask)
    assert np.array_equal(read_mask(write(tmp_path / "m3.png", np.dstack([mask] * 3))), mask)


def test_read_mask_foreign_value_is_named(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[2, 2] = 7
    path = write(tmp_path / "bad.png", mask)
    with pytest.raises(DataError) as err:
        read_mask(path)
    msg = str(err.value)
    assert "mask value 7 found" in msg and str(path) in msg
    assert "0 background, 1 white cell, 2 red cell" in msg and "Convert" in msg


def test_read_mask_binary_255_gets_a_hint(tmp_path):
    path = write(tmp_path / "binary.png", np.array([[0, 255]], np.uint8))
    with pytest.raises(DataError, match="mask value 255 found.*0/255 binary mask"):
        read_mask(path)


def test_palette_colour_mask_round_trips(tmp_path):
    mask = np.random.default_rng(2).integers(0, 3, (30, 40), dtype=np.uint8)
    assert np.array_equal(read_mask(write(tmp_path / "colour.png", colourise_mask(mask))), mask)
    rgba = np.dstack([colourise_mask(mask), np.full(mask.shape, 255, np.uint8)])
    assert np.array_equal(read_mask(write(tmp_path / "colour_rgba.png", rgba)), mask)


def test_colour_mask_with_foreign_colour_is_refused(tmp_path):
    colour = colourise_mask(np.ones((10, 10), np.uint8))
    colour[0, 0] = (0, 255, 0)
    path = write(tmp_path / "green.png", colour)
    with pytest.raises(DataError) as err:
        read_mask(path)
    msg = str(err.value)
    assert "BGR(0,255,0)" in msg and str(path) in msg and "palette" in msg and "PNG" in msg


def test_unreadable_mask(tmp_path):
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot decode .*m.png"):
        read_mask(tmp_path / "m.png")


# ----------------------------------------------------------------------------- load_folder

def test_load_folder_matches_by_stem(tmp_path):
    mask = np.random.default_rng(3).integers(0, 3, (40, 50), dtype=np.uint8)
    write(tmp_path / "images" / "b.jpg", colour_image())
    write(tmp_path / "images" / "a.png", colour_image(seed=1))
    write(tmp_path / "masks" / "a.png", mask)
    write(tmp_path / "masks" / "b.png", colourise_mask(mask))
    samples = load_folder(tmp_path)
    assert [s.name for s in samples] == ["a", "b"] and [s.source for s in samples] == ["a", "b"]
    assert np.array_equal(samples[0].image, colour_image(seed=1))
    assert all(np.array_equal(s.mask, mask) for s in samples)


def test_load_folder_errors(tmp_path):
    with pytest.raises(DataError, match="folder not found: .*images"):
        load_folder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no images in .*images"):
        load_folder(tmp_path)

    write(tmp_path / "images" / "cell.jpg", colour_image())
    with pytest.raises(DataError) as err:
        load_folder(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "images" / "cell.jpg") in msg and str(tmp_path / "masks" / "cell.png") in msg
    assert "has no mask" in msg

    write(tmp_path / "masks" / "cell.png", np.zeros((41, 50), np.uint8))
    with pytest.raises(DataError) as err:
        load_folder(tmp_path)
    msg = str(err.value)
    assert "50x40" in msg and "50x41" in msg and "cell.jpg" in msg and "cell.png" in msg


def test_load_splits(prepared_bccd):
    out, _ = prepared_bccd
    splits = load_splits(out)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 4, "test": 4}
    with pytest.raises(DataError, match="lacks the split folder"):
        load_splits(out / "train")


# ----------------------------------------------------------------------------- LabelMe

def labelme_doc(shapes, h=40, w=50, image=None, path=None):
    doc = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imageHeight": h, "imageWidth": w,
           "imagePath": path, "imageData": None}
    if image is not None:
        doc["imageData"] = base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()
    return doc


def shape(label, points, kind="polygon"):
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}


def save(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_labelme_rasterises_polygon_rectangle_circle(tmp_path):
    image = colour_image()
    doc = labelme_doc([
        shape("RBC", [[2, 2], [20, 2], [20, 20], [2, 20]]),                 # square polygon
        shape("red cell", [[30, 25], [45, 35]], "rectangle"),
        shape("WBC", [[15, 15], [15, 22]], "circle"),                       # radius 7, over the square
    ], image=image)
    got_image, mask = labelme_to_mask(save(tmp_path / "a.json", doc))
    assert np.array_equal(got_image, image)
    assert mask.dtype == np.uint8 and mask.shape == (40, 50)
    assert mask[3, 3] == 2 and mask[20, 2] == 2 and mask[21, 2] == 0          # polygon incl. its edge
    assert mask[25, 30] == 2 and mask[35, 45] == 2 and mask[36, 45] == 0 and mask[25, 46] == 0
    assert mask[15, 15] == 1 and mask[15, 21] == 1 and mask[15, 23] != 1      # circle, white on top
    assert mask[4, 4] == 2                                                     # square outside circle
    assert mask[1, 1] == 0 and mask[39, 0] == 0


def test_labelme_image_from_relative_path_and_label_map(tmp_path):
    image = colour_image(seed=4)
    write(tmp_path / "ds" / "imgs" / "x.png", image)
    doc = labelme_doc([shape("Neutrophil", [[1, 1], [10, 1], [10, 10]])], path="imgs\\x.png")
    got, mask = labelme_to_mask(save(tmp_path / "ds" / "x.json", doc), label_map={"neutrophil": 1})
    assert np.array_equal(got, image) and mask[2, 8] == 1


def test_labelme_refuses_paths_outside_its_folder(tmp_path):
    write(tmp_path / "outside.png", colour_image())
    for bad in ("../outside.png", str(tmp_path / "outside.png")):
        path = save(tmp_path / "ds" / "a.json", labelme_doc([], path=bad))
        with pytest.raises(DataError) as err:
            labelme_to_mask(path)
        msg = str(err.value)
        assert "outside the dataset folder" in msg and str(path) in msg and "imageData" in msg


def test_labelme_unknown_label_names_it_and_the_fix(tmp_path):
    path = save(tmp_path / "a.json", labelme_doc([shape("Platelet", [[1, 1], [9, 1], [9, 9]])],
                                                 image=colour_image()))
    with pytest.raises(DataError) as err:
        labelme_to_mask(path)
    msg = str(err.value)
    assert "'Platelet'" in msg and str(path) in msg and "wbc" in msg and "label_map=" in msg
    _, mask = labelme_to_mask(path, label_map={"PLATELET": 0})
    assert not mask.any()


@pytest.mark.parametrize("bad_shape, expected", [
    (shape("rbc", [[1, 1], [5, 5]]), "malformed polygon"),
    (shape("rbc", [[1, 1], ["a", 5], [3, 3]]), "malformed polygon"),
    (shape("rbc", [[1, 1]], "circle"), "malformed circle"),
    (shape("rbc", [[1, 1], [5, 5]], "line"), "unsupported shape type 'line'"),
])
def test_labelme_bad_shapes(tmp_path, bad_shape, expected):
    path = save(tmp_path / "a.json", labelme_doc([bad_shape], image=colour_image()))
    with pytest.raises(DataError) as err:
        labelme_to_mask(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_labelme_missing_image_and_size_mismatch(tmp_path):
    path = save(tmp_path / "a.json", labelme_doc([], path="gone.png"))
    with pytest.raises(DataError, match="not found: .*gone.png.*imageData"):
        labelme_to_mask(path)
    path = save(tmp_path / "b.json", labelme_doc([], h=41, image=colour_image()))
    with pytest.raises(DataError, match="size mismatch .*says 50x41.*image is 50x40"):
        labelme_to_mask(path)


def test_load_labelme_folder(tmp_path):
    for name in ("one", "two"):
        save(tmp_path / f"{name}.json", labelme_doc([shape("rbc", [[1, 1], [9, 1], [9, 9]])], image=colour_image()))
    samples = load_labelme_folder(tmp_path)
    assert [s.name for s in samples] == ["one", "two"] and samples[0].mask.max() == 2
    with pytest.raises(DataError, match="LabelMe folder not found"):
        load_labelme_folder(tmp_path / "one.json")               # a file is not a folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no LabelMe .json files"):
        load_labelme_folder(tmp_path / "empty")


# ----------------------------------------------------------------------------- BCCD

def test_prepare_bccd_on_the_vendored_sample(prepared_bccd, bccd_sample):
    out, report = prepared_bccd
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        images = sorted((out / split / "images").glob("*.png"))
        masks = sorted((out / split / "masks").glob("*.png"))
        assert len(images) == n and [p.name for p in images] == [p.name for p in masks]
        for m in masks:
            mask = cv2.imread(str(m), cv2.IMREAD_UNCHANGED)
            assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 1, 2}
            number = m.stem.rsplit("_", 1)[1]
            gold = cv2.imread(str(bccd_sample / "wbc_masks" / f"BloodImage_Mask_{number}.png"),
                              cv2.IMREAD_GRAYSCALE) > 100
            assert np.array_equal(mask == 1, gold)           # white cells are exactly the gold mask
            assert 0.15 < (mask == 2).mean() < 0.7           # silver red cells: a big share
    assert json.loads((out / "bccd_report.json").read_text()) == report
    for split in ("train", "val", "test", "overall"):
        for key in ("box_coverage", "pixels_in_boxes"):
            assert 0 <= report[split][key] <= 1
    assert report["overall"]["box_coverage"] > 0.7           # measured 0.84 on this sample
    assert report["overall"]["pixels_in_boxes"] > 0.4        # measured 0.60 (many RBCs unboxed)
    with open(out / "boxes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and all(int(r["n_rbc_boxes"]) > 0 for r in rows)
    assert sum(int(r["n_wbc_boxes"]) for r in rows) >= 16


def test_prepare_bccd_limit(bccd_sample, tmp_path):
    report = prepare_bccd(bccd_sample, tmp_path, limit=1)
    assert [report[s]["images"] for s in ("train", "val", "test")] == [1, 1, 1]


def test_prepare_bccd_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as err:
        prepare_bccd(tmp_path, tmp_path / "out")
    assert "wbc_masks/" in str(err.value) and str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------- patches, augmentation, splits

def test_extract_patches(small_samples):
    patches = extract_patches(small_samples, size=48, per_image=3, seed=1)
    assert len(patches) == 18
    assert all(p.image.shape == (48, 48, 3) and p.mask.shape == (48, 48) for p in patches)
    assert [p.source for p in patches[:3]] == ["small_0"] * 3 and patches[0].name == "small_0_p00"
    again = extract_patches(small_samples, size=48, per_image=3, seed=1)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(patches, again))
    with pytest.raises(DataError, match="'small_0' is 128x96 .*smaller than the 100x100 patch"):
        extract_patches(small_samples, size=100)


def rule_sample(seed=0, h=24, w=32):
    """An image made from its mask by a rule (class → grey level) on a mask with no symmetry."""
    rng = np.random.default_rng(seed)
    mask = cv2.resize(rng.integers(0, 3, (6, 8)).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    grey = np.array([30, 128, 230], np.uint8)[mask]
    return Sample("rule", np.dstack([grey] * 3), mask, "rule")


def test_augment_keeps_image_and_mask_aligned():
    sample = rule_sample()
    out = augment([sample], factor=8, seed=3)
    assert len(out) == 8 and out[0] is sample and {s.source for s in out} == {"rule"}
    seen = set()
    for s in out:
        grey = s.image.astype(int).mean(axis=2)
        recovered = np.digitize(grey, [80, 180])            # the rule, tolerant to mild jitter
        assert np.array_equal(recovered, s.mask)
        seen.add(s.mask.tobytes())
    assert len(seen) == 8                                   # all 8 flips/rotations are used
    again = augment([sample], factor=8, seed=3)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(out, again))
    with pytest.raises(DataError, match="whole number >= 1"):
        augment([sample], factor=0)


def test_make_splits_hold_out_by_source(small_samples):
    patches = extract_patches(small_samples, size=48, per_image=4, seed=0)   # 6 sources x 4
    splits = make_splits(patches, n_test=8, val_ratio=0.25, seed=0, factor=3)
    src = {k: {s.source for s in v} for k, v in splits.items()}
    assert not src["test"] & (src["train"] | src["val"]) and not src["train"] & src["val"]
    assert len(splits["test"]) == 8                          # two whole sources, not augmented
    assert len(splits["val"]) == 4 * 3 and len(splits["train"]) == 12 * 3   # 1 and 3 sources, x3
    with pytest.raises(DataError, match="leaves nothing to train on"):
        make_splits(patches, n_test=100)


def test_synthetic_splits_smoke_profile():
    splits = synthetic_splits("smoke")
    assert all(len(splits[k]) > 0 for k in ("train", "val", "test"))
    src = {k: {s.source for s in v} for k, v in splits.items()}
    assert not src["test"] & (src["train"] | src["val"]) and not src["train"] & src["val"]
    assert all(s.image.shape == (64, 64, 3) for v in splits.values() for s in v)
    assert synthetic_splits("smoke")["train"][0] is splits["train"][0]      # cached


def test_segmentation_dataset(small_samples):
    ds = SegmentationDataset(small_samples[:2])
    image, mask = ds[1]
    assert len(ds) == 2
    assert image.dtype == torch.float32 and image.shape == (3, 96, 128)
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert mask.dtype == torch.int64 and mask.shape == (96, 128)
    assert torch.equal(mask, torch.from_numpy(small_samples[1].mask.astype(np.int64)))
    bad = Sample("bad", small_samples[0].image, small_samples[0].mask[:10], "bad")
    with pytest.raises(DataError, match="'bad'"):
        SegmentationDataset([bad])
