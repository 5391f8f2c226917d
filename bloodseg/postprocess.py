"""Cleaning a predicted mask: white-cell specks removed, holes in white cells filled.

A white cell in a blood smear is one large solid blob (nucleus and cytoplasm). A network's
white-cell class also fires on small purple things that are not white cells (platelets, stain
debris, the edge of a red cell that took up stain) and sometimes leaves a pale gap inside a cell.
:func:`clean_white_cells` repairs both with two rules:

* a white component (8-connected) smaller than ``min_area`` pixels becomes the most probable of
  the other classes (background or red cell) when the class probabilities are given, else
  background;
* with ``fill_holes``, pixels enclosed by a white cell become white.

``min_area`` is in pixels of the mask, i.e. of the photograph at its own magnification. For the
shipped BCCD checkpoint it was chosen on BCCD's validation photographs, never on the test ones
(:func:`bloodseg.realdata.tune_white_cleanup`), and it travels in the checkpoint
(``"postprocess"``), so :func:`bloodseg.predict_image` applies it unless told not to. The spec
also records the model's ``input_scale`` it was chosen at; a model run at another scale (e.g.
``input_scale = 1`` for images at half BCCD's magnification) gets the area scaled alike
(:func:`min_area_at`), so the rule keeps meaning "smaller than this many square micrometres".
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .classes import WHITE_CELL
from .errors import BloodsegError

__all__ = ["clean_white_cells", "keep_crop_cell", "touches_border", "check_postprocess", "min_area_at", "POSTPROCESS_KEYS"]

POSTPROCESS_KEYS = ("white_min_area", "fill_white_holes")
_EIGHT = np.ones((3, 3), bool)


def check_postprocess(spec) -> dict:
    """A post-processing spec ``{"white_min_area": px >= 0, "fill_white_holes": bool}`` checked
    and normalised (extra keys, e.g. how it was chosen, are kept). Raises a clear error otherwise."""
    if not isinstance(spec, dict):
        raise BloodsegError(f"postprocess must be a dict with {POSTPROCESS_KEYS}, got {type(spec).__name__}")
    missing = [k for k in POSTPROCESS_KEYS if k not in spec]
    if missing:
        raise BloodsegError(f"postprocess is missing {missing}; give e.g. "
                            "{'white_min_area': 4000, 'fill_white_holes': True}")
    area = spec["white_min_area"]
    if isinstance(area, bool) or not isinstance(area, (int, float)) or not area >= 0:
        raise BloodsegError(f"postprocess white_min_area must be a number of pixels >= 0; got {area!r}")
    scale = spec.get("input_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise BloodsegError(f"postprocess input_scale must be a positive number; got {scale!r}")
    return {**spec, "white_min_area": float(area), "fill_white_holes": bool(spec["fill_white_holes"])}


def min_area_at(spec: dict, input_scale: float = 1.0) -> float:
    """``spec["white_min_area"]`` for a model that now runs at ``input_scale``: the area was chosen
    at ``spec["input_scale"]`` (if recorded), and an image shown to the network at twice that scale
    has cells of a quarter the area in its own pixels, so the area scales by
    ``(spec["input_scale"] / input_scale) ** 2``."""
    tuned = spec.get("input_scale")
    area = float(spec["white_min_area"])
    return area if tuned is None else area * (float(tuned) / float(input_scale)) ** 2


def clean_white_cells(mask: np.ndarray, probs=None, min_area: float = 0.0, fill_holes: bool = True) -> np.ndarray:
    """A copy of the class mask ``uint8 HxW`` with small white components removed and white holes filled.

    ``probs``: class probabilities ``C x H x W`` (numpy or torch) of the same image; a removed
    white pixel takes the most probable non-white class there. Without them it becomes
    background (0). ``min_area`` in pixels (0: keep every component).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BloodsegError(f"clean_white_cells wants a 2-D class mask, got shape {mask.shape}")
    out = mask.copy()
    white = mask == WHITE_CELL
    if min_area > 0 and white.any():
        labels, n = ndimage.label(white, structure=_EIGHT)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = (sizes < min_area)[labels] & white
        if small.any():
            if probs is None:
                out[small] = 0
            else:
                p = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
                if p.ndim != 3 or p.shape[1:] != mask.shape:
                    raise BloodsegError(f"probs must be C x {mask.shape[0]} x {mask.shape[1]}, got {p.shape}")
                rest = p[:, small].copy()
                rest[WHITE_CELL] = -np.inf
                out[small] = rest.argmax(0).astype(mask.dtype)
            white = out == WHITE_CELL
    if fill_holes and white.any():
        out[ndimage.binary_fill_holes(white) & ~white] = WHITE_CELL
    return out


def keep_crop_cell(mask: np.ndarray) -> np.ndarray:
    """A crop's mask with the white cells its border cuts removed, except the crop's own cell.

    A single-cell crop (ALL-IDB2, a CellaVision export, a cell cut out for a classifier) is framed
    on one white cell; parts of neighbouring white cells that the frame cuts are not what it shows,
    and they cannot be measured or classified. Of the white components (8-connected) that touch the
    border, every one but the crop's own cell becomes background (0); the crop's own cell is the
    white component nearest the crop's centre (the smallest distance from the centre to any of its
    pixels; on a tie the larger component, then the first in raster order), kept whether it touches
    the border or not. White components inside the frame are kept. A copy; ``mask`` is unchanged.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BloodsegError(f"keep_crop_cell wants a 2-D class mask, got shape {mask.shape}")
    out = mask.copy()
    labels, n = ndimage.label(mask == WHITE_CELL, structure=_EIGHT)
    if n < 2:
        return out
    h, w = mask.shape
    yy, xx = np.ogrid[:h, :w]
    d2 = (2 * yy - (h - 1)) ** 2 + (2 * xx - (w - 1)) ** 2          # 4 x squared distance, exact integers
    index = np.arange(1, n + 1)
    near = np.asarray(ndimage.minimum(d2, labels, index))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    own = int(np.lexsort((index, -areas, near))[0]) + 1
    cut = touches_border(labels, n)
    cut[own] = False
    out[cut[labels]] = 0
    return out


def touches_border(labels: np.ndarray, n: int) -> np.ndarray:
    """``bool[n + 1]``: whether label ``i`` of ``labels`` (0..n, 0 the background) has a pixel on the
    image border (False for the background)."""
    edge = np.zeros(n + 1, bool)
    for strip in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        edge[np.unique(strip)] = True
    edge[0] = False
    return edge


def fill_small_holes(binary: np.ndarray, max_area: int) -> np.ndarray:
    """Fill holes up to ``max_area`` px (a red cell's pale centre) but not larger enclosed plasma."""
    holes = ndimage.binary_fill_holes(binary) & ~binary
    if not holes.any():
        return binary
    labels, n = ndimage.label(holes)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes <= max_area
    small[0] = False
    return binary | small[labels]


def remove_small(binary: np.ndarray, min_area: int) -> np.ndarray:
    labels, n = ndimage.label(binary)
    if n == 0:
        return binary
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]
