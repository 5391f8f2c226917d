import time

import cv2
import numpy as np
import pytest

from bloodseg.classes import OUTLINE_BGR, PALETTE_BGR, colourise_mask, overlay
from bloodseg.errors import DataError
from bloodseg.io import read_image, read_mask
from bloodseg.synthetic import colour_threshold_baseline, make_smear, write_synthetic

from conftest import confusion, miou


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    a_img, a_mask = make_smear(5, size=(120, 180))
    b_img, b_mask = make_smear(5, size=(120, 180))
    c_img, c_mask = make_smear(6, size=(120, 180))
    assert a_img.tobytes() == b_img.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    assert a_img.tobytes() != c_img.tobytes() and a_mask.tobytes() != c_mask.tobytes()


def test_types_shapes_and_plausible_class_fractions(full_smears):
    for image, mask in full_smears:
        assert image.dtype == np.uint8 and image.shape == (519, 775, 3)
        assert mask.dtype == np.uint8 and mask.shape == (519, 775)
        frac = np.bincount(mask.ravel(), minlength=3) / mask.size
        assert len(frac) == 3                       # nothing but 0, 1, 2
        assert 0.25 < frac[2] < 0.75                # red cells: a big share
        assert 0.003 < frac[1] < 0.12               # white cells: small but present
        assert frac[0] > 0.2                        # plasma around them


def test_red_cells_are_cut_by_the_border(full_smears):
    _, mask = full_smears[0]
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    assert (border == 2).mean() > 0.1


def test_platelets_are_nucleus_coloured_and_labelled_background():
    def purple(image):      # clearly bluer than plasma and red cells, and darker than plasma
        lab = cv2.cvtColor(image, cv2.COLOR_BGR2Lab).astype(int)
        return (lab[..., 2] < 112) & (lab[..., 0] < 175), lab

    with_plt, without = 0, 0
    for seed in range(3):
        image, mask = make_smear(seed, size=(260, 380), n_platelets=(25, 25))
        p, lab = purple(image)
        hard = p & (mask == 0)
        with_plt += hard.sum()
        # the hard negatives look like nuclei: the platelets' cores are as blue as a typical nucleus
        nucleus_b = np.median(lab[p & (mask == 1), 2])
        assert np.percentile(lab[hard, 2], 20) < nucleus_b + 8
        image0, mask0 = make_smear(seed, size=(260, 380), n_platelets=(0, 0))
        without += (purple(image0)[0] & (mask0 == 0)).sum()
    assert with_plt > 300                   # platelets exist, and they are class 0
    assert without < 0.1 * with_plt         # ... and it is the platelets, not noise


def test_colour_baseline_is_useful_but_not_perfect(full_smears):
    cm = sum(confusion(mask, colour_threshold_baseline(image)) for image, mask in full_smears)
    score = miou(cm)
    assert 0.2 < score < 0.85, score
    # the white-cell class is where colour alone fails (pale cytoplasm, platelets)
    white_iou = cm[1, 1] / (cm[1].sum() + cm[:, 1].sum() - cm[1, 1])
    assert white_iou < 0.8


def test_baseline_output_is_a_class_mask(full_smears):
    image, _ = full_smears[1]
    pred = colour_threshold_baseline(image)
    assert pred.dtype == np.uint8 and pred.shape == image.shape[:2]
    assert set(np.unique(pred)) <= {0, 1, 2}


def test_make_smear_is_fast():
    make_smear(0)
    start = time.perf_counter()
    for seed in range(3):
        make_smear(seed)
    per_smear = (time.perf_counter() - start) / 3
    assert per_smear < 1.0      # ~0.2 s on 2 cores; loose, so a busy CI machine passes


def test_bad_options_are_refused():
    with pytest.raises(DataError, match="unknown smear option.*n_cells.*accepts"):
        make_smear(0, n_cells=3)
    with pytest.raises(DataError, match="at least 32x32"):
        make_smear(0, size=(10, 500))


def test_write_synthetic_writes_readable_pairs_and_nothing_else(tmp_path):
    paths = write_synthetic(tmp_path / "syn", 2, seed=7, size=(64, 96))
    assert [p.name for p in paths] == ["smear_0000.png", "smear_0001.png"]
    files = sorted(str(p.relative_to(tmp_path / "syn")) for p in (tmp_path / "syn").rglob("*") if p.is_file())
    assert files == ["images/smear_0000.png", "images/smear_0001.png",
                     "masks/smear_0000.png", "masks/smear_0001.png"]
    for i, p in enumerate(paths):
        image, mask = make_smear(7 + i, size=(64, 96))
        assert np.array_equal(read_image(p), image)            # PNG is lossless
        raw = cv2.imread(str(tmp_path / "syn" / "masks" / p.name), cv2.IMREAD_UNCHANGED)
        assert raw.ndim == 2 and np.array_equal(raw, mask)    # single channel, values 0/1/2
        assert np.array_equal(read_mask(tmp_path / "syn" / "masks" / p.name), mask)


def test_write_synthetic_refuses_a_folder_it_cannot_create(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises(DataError) as err:
        write_synthetic(blocker, 1, size=(64, 64))
    assert str(blocker) in str(err.value) and "choose a folder" in str(err.value)


def test_colourise_and_overlay():
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    colour = colourise_mask(mask)
    assert colour.shape == (2, 2, 3) and colour.dtype == np.uint8
    assert np.array_equal(colour[1, 0], PALETTE_BGR[2]) and np.array_equal(colour[0, 1], PALETTE_BGR[1])
    red, purple = PALETTE_BGR[2].astype(int), PALETTE_BGR[1].astype(int)
    assert red[2] > 2 * red[0] and purple[0] > purple[1]      # red is red, 1 is blue/purple (BGR)
    image = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(image, mask, alpha=0.5)
    assert np.array_equal(out[0, 0], image[0, 0])             # background untouched
    assert not np.array_equal(out[1, 0], image[1, 0])
    # a cell is outlined in a colour that contrasts with its stain, and only faintly tinted inside
    big = np.zeros((20, 20), np.uint8)
    big[4:16, 4:16] = 1
    purple = np.zeros((20, 20, 3), np.uint8)
    purple[:] = (160, 60, 120)                                  # a purple-stained cell (BGR)
    out = overlay(purple, big)
    assert np.array_equal(out[4, 8], OUTLINE_BGR[1]) and np.array_equal(out[5, 8], OUTLINE_BGR[1])
    assert np.abs(out[10, 10].astype(int) - purple[10, 10]).max() < 20      # inside: faint tint
    assert np.array_equal(out[0, 0], purple[0, 0])
    with pytest.raises(DataError, match="mask value"):
        colourise_mask(np.array([[0, 7]], np.uint8))
