"""Colour rules for stained smears: purple and pink masks, and the colour-threshold baseline.

In a stained blood smear, nuclei (and platelets) are purple and red cells pink. Two rules
on the CLAHE'd image in Lab (:func:`stain_masks`) find them without any training. They make BCCD's
silver red-cell labels (:mod:`bloodseg.bccd`), measure the red cells' size (:mod:`bloodseg.scale`),
and, cleaned up with morphology, the non-learned floor a trained network has to beat
(:func:`colour_threshold_baseline`). Images are OpenCV BGR ``uint8 HxWx3``.
"""
from __future__ import annotations

import cv2
import numpy as np

from .classes import RED_CELL, WHITE_CELL
from .postprocess import fill_small_holes, remove_small
from .preprocess import clahe_on_luma


def stain_masks(image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour rules shared by the baseline and BCCD's silver labels: ``(purple, pink)`` boolean masks.

    BGR ``uint8 HxWx3`` in. Works on the CLAHE'd image in OpenCV's 8-bit Lab (128 = neutral):
    purple (nuclei, platelets) = b* more than 12 below the image's median b*, i.e. clearly bluer
    than the plasma and red cells that fill most of a smear; pink (red cells) = a* above an Otsu
    threshold computed on the other pixels, so the cut adapts to each image's stain.
    """
    lab = cv2.cvtColor(clahe_on_luma(image_bgr), cv2.COLOR_BGR2Lab)
    a, b = lab[..., 1], lab[..., 2]
    purple = b.astype(np.int16) < int(np.median(b)) - 12
    rest = a[~purple]
    if rest.size == 0:
        return purple, np.zeros_like(purple)
    cut, _ = cv2.threshold(np.ascontiguousarray(rest).reshape(1, -1), 0, 255,
                           cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return purple, (a > cut) & ~purple


def colour_threshold_baseline(image_bgr: np.ndarray) -> np.ndarray:
    """A non-learned segmenter: purple → white cell, pink → red cell, else background.

    BGR ``uint8 HxWx3`` in, ``uint8 HxW`` mask in {0, 1, 2} out. Uses :func:`stain_masks` on the
    CLAHE'd image, fills small holes (pale red-cell centres), drops specks, and grows the purple
    regions a little to take in some of the pale cytoplasm around a nucleus. It cannot tell a
    platelet from a nucleus, nor pale cytoplasm from plasma: that is the floor a network must beat.
    """
    h, w = image_bgr.shape[:2]
    scale = h * w / (519 * 775)
    purple, pink = stain_masks(image_bgr)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    pink = cv2.morphologyEx(pink.astype(np.uint8), cv2.MORPH_OPEN, disc).astype(bool)
    pink = remove_small(fill_small_holes(pink, int(800 * scale) + 1), int(80 * scale) + 1)
    purple = cv2.morphologyEx(purple.astype(np.uint8), cv2.MORPH_OPEN,
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    purple = cv2.dilate(purple, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))).astype(bool)
    mask = np.zeros((h, w), np.uint8)
    mask[pink] = RED_CELL
    mask[purple] = WHITE_CELL
    return mask
