"""Automatic scale: how big are the red cells of a photograph, and how much to resize it.

A network trained on one microscope's photographs expects red cells of a certain size in its
own pixels. Another microscope or camera gives cells of another size, and the network's white-cell
IoU drops when the photograph is shown to it at the wrong scale. Red cells are the best ruler a
smear has: they are many, and nearly all the same size in one person's blood.

:func:`red_cell_diameter` measures the typical red-cell diameter of one photograph without a
network: a granulometry of its red-cell colour mask (:func:`bloodseg.colour.stain_masks`, holes
filled). Openings by discs of growing radius (on a geometric grid, so the answer has the same
relative precision at every magnification) remove the red area cell by cell: a cell goes when the
disc no longer fits in it. The radius at which half the red area is gone is the area-weighted
median of the cells' inscribed radii (for an elliptic cell, its semi-minor axis); twice it is the
diameter returned (about 0.9x the painted diameter of synthetic round cells: the pink mask sits a
little inside a cell's outline). An opening by a disc of radius ``r`` is computed with two
Euclidean distance transforms, so each one costs the same at any radius.

:func:`auto_scale` turns it into the resize factor that brings the cells to the size the network
was trained on (``target_diameter``, in network pixels, a setting of the :class:`~bloodseg.Segmenter`,
``red_cell_diameter``). :data:`SHIPPED_RED_DIAMETER` is that size for the shipped BCCD checkpoint.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from .errors import BloodsegError
from .preprocess import _check_bgr
from .colour import stain_masks

__all__ = ["red_cell_diameter", "auto_scale", "is_crop", "CROP_SIDE", "CROP_FACTORS", "SHIPPED_RED_DIAMETER", "RATIO"]

#: A photograph whose shorter side is below this many px is a crop around a few cells (single-cell
#: pictures are 120-360 px; a microscope camera's field is 480 px or more): too few of its red cells
#: are whole to measure them, and :meth:`bloodseg.Segmenter.scale_for` lets the network's confidence
#: choose among :data:`CROP_FACTORS` x its trained scale instead.
CROP_SIDE = 384
CROP_FACTORS = (1.0, 1.4, 2.0)


def is_crop(image_bgr: np.ndarray) -> bool:
    """Whether a photograph (or its mask) is a crop (shorter side below :data:`CROP_SIDE` px), not a whole field."""
    return min(image_bgr.shape[:2]) < CROP_SIDE

#: Typical red-cell diameter (network pixels) of the shipped checkpoint's training photographs: the
#: median :func:`red_cell_diameter` of the 208 BCCD training photographs (640x480; 77.97 px, None
#: on 8), times its ``input_scale`` 0.5 (book/results/scale/calibration.json). To be stored in the
#: shipped file's settings (``red_cell_diameter``); until then Segmenter.load fills it in.
SHIPPED_RED_DIAMETER = 38.98

#: Ratio of consecutive disc radii of the granulometry (about 4% steps).
RATIO = 1.04

_MIN_RADIUS = 2.0        # px; smaller pink things are noise, not cells
_MIN_FRACTION = 0.02     # the red cells must cover at least this share of the image
_MAX_SPREAD = 2.5        # largest ratio of the radii where 25% and 75% of the red area is removed


def _opened_areas(binary: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Area of the opening of ``binary`` by a disc of each radius (erosion = distance > r,
    dilation = distance to the eroded set <= r)."""
    inside = cv2.distanceTransform(binary.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    areas = np.empty(len(radii), np.float64)
    for i, r in enumerate(radii):
        eroded = inside > r
        if not eroded.any():
            areas[i:] = 0.0
            break
        to_eroded = cv2.distanceTransform((~eroded).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        areas[i] = float(np.count_nonzero(to_eroded <= r))
    return areas


def red_cell_diameter(image_bgr: np.ndarray) -> float | None:
    """Typical red-cell diameter in pixels of one BGR ``uint8 HxWx3`` photograph, or None when it
    cannot tell (too little red-cell colour, or no size stands out). The distance transforms treat
    the photograph's border as unknown, not as background, so a cell cut through its middle by the
    border is measured whole; a smaller piece of a cell measures small."""
    _check_bgr(image_bgr)
    h, w = image_bgr.shape[:2]
    if min(h, w) < 16:
        return None
    _, pink = stain_masks(image_bgr)
    pink = ndimage.binary_fill_holes(pink)
    top = min(h, w) / 4.0
    n = int(math.floor(math.log(top / _MIN_RADIUS) / math.log(RATIO))) + 1
    if n < 3:
        return None
    radii = _MIN_RADIUS * RATIO ** np.arange(n)
    areas = _opened_areas(pink, radii)
    if areas[0] < _MIN_FRACTION * h * w:
        return None
    # the radius at which the opened area falls to a fraction q of the area that survives the
    # smallest disc (interpolated on log radius); q = 0.5: the area-weighted median cell
    def falls_to(q):
        below = np.flatnonzero(areas <= q * areas[0])
        if below.size == 0:
            return None
        j = int(below[0])
        a0, a1 = areas[j - 1], areas[j]
        t = (a0 - q * areas[0]) / (a0 - a1) if a0 > a1 else 0.0
        return float(radii[j - 1] * RATIO ** t)
    r25, r50, r75 = falls_to(0.75), falls_to(0.5), falls_to(0.25)
    if r50 is None or r25 is None or r75 is None or r75 / r25 > _MAX_SPREAD:
        return None   # no size stands out: not a smear of cells
    return 2.0 * r50


def auto_scale(image_bgr: np.ndarray, target_diameter: float, trained_scale: float,
               lo: float = 0.2, hi: float = 2.0, tolerance: float = 0.2,
               diameter: float | None = None) -> float:
    """Factor to resize ``image_bgr`` by so that its red cells are ``target_diameter`` network
    pixels across, clamped to ``[lo, hi]``. ``trained_scale`` (the network's fixed input scale)
    is returned when the diameter cannot be measured, and when the factor is within ``tolerance``
    (relative) of it: photographs like the training ones are run exactly as in training.
    ``diameter`` skips the measurement (a value from :func:`red_cell_diameter`)."""
    if not (target_diameter and target_diameter > 0 and math.isfinite(target_diameter)):
        raise BloodsegError(f"target_diameter must be a positive number of pixels; got {target_diameter!r}")
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise BloodsegError(f"need 0 < lo <= hi; got lo={lo!r}, hi={hi!r}")
    d = red_cell_diameter(image_bgr) if diameter is None else diameter
    if d is None or not d > 0:
        return float(trained_scale)
    factor = float(target_diameter) / float(d)
    if abs(factor / trained_scale - 1.0) <= tolerance:
        return float(trained_scale)
    return float(min(max(factor, lo), hi))
