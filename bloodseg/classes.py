"""The three classes of the paper, in one place: ids, names and the colours of figures and masks.

Every mask in bloodseg is ``uint8 HxW`` with 0 background, 1 white cell, 2 red cell (the paper's
labels). Colours are OpenCV BGR, like every image in the package.
"""
from __future__ import annotations

import cv2
import numpy as np

from .errors import DataError

BACKGROUND, WHITE_CELL, RED_CELL = 0, 1, 2
CLASS_NAMES = ("background", "white cell", "red cell")

# Colours of the three classes in figures, overlays and colour masks, OpenCV BGR order.
# read_mask accepts masks painted in exactly these colours.
#   0 background  black          (RGB   0,   0,   0)
#   1 white cell  violet/blue    (RGB 140,  60, 200)
#   2 red cell    red            (RGB 220,  60,  60)
PALETTE_BGR = np.array([[0, 0, 0], [200, 60, 140], [60, 60, 220]], dtype=np.uint8)
PALETTE_BGR.setflags(write=False)


def check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"a mask must be 2-D (HxW class ids); got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 2):
        bad = sorted(set(np.unique(mask).tolist()) - {0, 1, 2})[:5]
        raise DataError(f"mask value(s) {bad} found; masks hold 0 background, 1 white cell, 2 red cell")
    return mask.astype(np.intp)


def colourise_mask(mask: np.ndarray) -> np.ndarray:
    """Class mask ``HxW`` → BGR ``uint8 HxWx3`` in :data:`PALETTE_BGR` (for figures and colour masks)."""
    return PALETTE_BGR[check_mask(mask)]


#: Outline colours of overlays (OpenCV BGR), chosen to stand out against each class's own stain
#: rather than to match it: yellow around the purple white cells, cyan around the pink red cells.
OUTLINE_BGR = np.array([[0, 0, 0], [0, 230, 255], [255, 220, 0]], dtype=np.uint8)
OUTLINE_BGR.setflags(write=False)


def overlay(image_bgr: np.ndarray, mask: np.ndarray, alpha: float = 0.15, outline: int = 2) -> np.ndarray:
    """The photograph with every cell outlined: each class's outline (``outline`` px wide, inside
    the cell) in :data:`OUTLINE_BGR`, a colour that contrasts with the cell's stain, and its area
    faintly tinted (``alpha``) in :data:`PALETTE_BGR`; background pixels stay as they are.
    BGR ``uint8 HxWx3`` in and out."""
    m = check_mask(mask)
    if image_bgr.shape[:2] != m.shape:
        raise DataError(f"image {image_bgr.shape[:2]} and mask {m.shape} differ in size; "
                        "pass the mask predicted for this image")
    out = image_bgr.astype(np.float32)
    cells = m > 0
    out[cells] = (1 - alpha) * out[cells] + alpha * PALETTE_BGR[m[cells]]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if outline > 0:
        kernel = np.ones((3, 3), np.uint8)
        for cls in (WHITE_CELL, RED_CELL):
            inside = (m == cls).astype(np.uint8)
            edge = inside.astype(bool) & ~cv2.erode(inside, kernel, iterations=int(outline),
                                                    borderType=cv2.BORDER_REPLICATE).astype(bool)
            out[edge] = OUTLINE_BGR[cls]
    return out
