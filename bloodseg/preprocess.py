"""Image preprocessing (paper §2): contrast enhancement on the luma channel only.

The paper converts a smear to YUV, equalises Y with CLAHE and converts back, so
contrast between cells and plasma rises while the stain colours (U, V) stay as
they were. Images enter as OpenCV BGR ``uint8 HxWx3`` arrays.
"""
from __future__ import annotations

import numpy as np
import torch

import cv2

from .errors import DataError


def _check_bgr(image: np.ndarray, what: str = "image") -> None:
    if not isinstance(image, np.ndarray):
        raise DataError(f"{what} must be a numpy array (uint8 HxWx3, BGR); got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(
            f"{what} must be uint8 HxWx3 (OpenCV BGR); got dtype {image.dtype} and shape "
            f"{tuple(image.shape)}. Read files with bloodseg.read_image, which converts "
            "grayscale, RGBA and 16-bit images for you.")


def clahe_on_luma(image_bgr: np.ndarray, clip_limit: float = 2.0,
                  tile_grid: tuple[int, int] = (8, 8)) -> np.ndarray:
    """CLAHE on the Y channel of YUV, U and V untouched; returns a new BGR uint8 image.

    ``clip_limit`` bounds each tile's histogram (higher = stronger contrast, more noise);
    ``tile_grid`` is (columns, rows) of contextual regions, as OpenCV takes it.
    """
    _check_bgr(image_bgr)
    if not (clip_limit > 0 and np.isfinite(clip_limit)):
        raise DataError(f"clip_limit must be a positive number; got {clip_limit!r}")
    tiles = tuple(int(t) for t in tile_grid)
    if len(tiles) != 2 or min(tiles) < 1:
        raise DataError(f"tile_grid must be two positive integers (columns, rows); got {tile_grid!r}")
    yuv = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2YUV)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=tiles)
    yuv[..., 0] = clahe.apply(np.ascontiguousarray(yuv[..., 0]))
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)


def image_to_tensor(image_bgr: np.ndarray, clahe: bool = True) -> torch.Tensor:
    """BGR uint8 HxWx3 → float32 tensor 3xHxW, RGB order, values in [0, 1].

    With ``clahe=True`` (training and inference default) :func:`clahe_on_luma` runs first,
    so every entry point of bloodseg feeds the model identically preprocessed pixels.
    """
    _check_bgr(image_bgr)
    if clahe:
        image_bgr = clahe_on_luma(image_bgr)
    rgb = np.ascontiguousarray(image_bgr[..., ::-1])
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
