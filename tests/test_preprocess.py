import numpy as np
import pytest
import cv2
import torch

from bloodseg.errors import DataError
from bloodseg.preprocess import clahe_on_luma, image_to_tensor


def low_contrast_smear(seed=0, h=128, w=160):
    """Pale plasma with faint pink discs: everything squeezed into a narrow band of luma."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (200, 196, 205), np.uint8)
    for _ in range(25):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(8, 16)), (185, 170, 215), -1)
    noise = rng.normal(0, 2, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def test_clahe_raises_luma_contrast():
    img = low_contrast_smear()
    out = clahe_on_luma(img, clip_limit=3.0)
    y_in = cv2.cvtColor(img, cv2.COLOR_BGR2YUV)[..., 0].astype(float)
    y_out = cv2.cvtColor(out, cv2.COLOR_BGR2YUV)[..., 0].astype(float)
    spread = lambda y: np.percentile(y, 95) - np.percentile(y, 5)
    assert spread(y_out) > 1.5 * spread(y_in)
    assert y_out.std() > 1.5 * y_in.std()


def test_clahe_leaves_chroma_untouched():
    img = low_contrast_smear(1)
    out = clahe_on_luma(img)
    # Y changes, U and V do not (up to the rounding of a uint8 round trip through BGR)
    yuv_in = cv2.cvtColor(img, cv2.COLOR_BGR2YUV).astype(int)
    yuv_out = cv2.cvtColor(out, cv2.COLOR_BGR2YUV).astype(int)
    assert np.abs(yuv_in[..., 0] - yuv_out[..., 0]).mean() > 2
    assert np.abs(yuv_in[..., 1:] - yuv_out[..., 1:]).mean() < 1.5
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.shares_memory(out, img)


def test_stronger_clip_limit_means_more_contrast():
    img = low_contrast_smear(2)
    stds = [cv2.cvtColor(clahe_on_luma(img, clip_limit=c), cv2.COLOR_BGR2YUV)[..., 0].std()
            for c in (1.0, 2.0, 4.0)]
    assert stds[0] < stds[1] < stds[2]


@pytest.mark.parametrize("bad, words", [
    (np.zeros((10, 10), np.uint8), "shape (10, 10)"),
    (np.zeros((10, 10, 4), np.uint8), "shape (10, 10, 4)"),
    (np.zeros((10, 10, 3), np.float32), "dtype float32"),
    (np.zeros((10, 10, 3), np.uint16), "dtype uint16"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_input_says_what_it_got(bad, words):
    with pytest.raises(DataError) as err:
        clahe_on_luma(bad)
    assert words in str(err.value)
    assert "uint8 HxWx3" in str(err.value)


def test_bad_clahe_options():
    img = low_contrast_smear()
    with pytest.raises(DataError, match="clip_limit"):
        clahe_on_luma(img, clip_limit=0)
    with pytest.raises(DataError, match="tile_grid"):
        clahe_on_luma(img, tile_grid=(0, 8))


def test_image_to_tensor_is_rgb_unit_range():
    img = np.zeros((16, 32, 3), np.uint8)
    img[..., 0] = 255  # blue in BGR
    t = image_to_tensor(img, clahe=False)
    assert t.shape == (3, 16, 32) and t.dtype == torch.float32
    assert torch.all(t[2] == 1.0) and torch.all(t[0] == 0.0)  # blue lands in the last RGB channel
    t2 = image_to_tensor(low_contrast_smear(), clahe=True)
    assert 0.0 <= float(t2.min()) and float(t2.max()) <= 1.0
