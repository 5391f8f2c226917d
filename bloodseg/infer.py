"""Inference at any image size: pad to a multiple of 16, tile large images with overlap.

The models only take sides that are multiples of 16 (four 2x poolings). ``predict_image``
reflect-pads smaller images and, for images larger than ``tile``, runs overlapping tiles and
blends their softmax probabilities with a smooth window so seams do not show.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import BloodsegError
from .postprocess import check_postprocess, clean_white_cells, min_area_at
from .preprocess import image_to_tensor




def _pad_to(x: torch.Tensor, multiple: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        # reflect needs pad < size; replicate is the fallback for tiny images
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def _window(size: int, overlap: int) -> torch.Tensor:
    """1-D blending weights: a linear ramp over the overlap, flat in the middle."""
    w = torch.ones(size)
    if overlap > 0:
        ramp = torch.linspace(0.05, 1.0, overlap)
        w[:overlap] = ramp
        w[-overlap:] = ramp.flip(0)
    return w


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def predict_probabilities(model: torch.nn.Module, image_bgr: np.ndarray, tile: int = 512,
                          overlap: int = 64, clahe: bool = True, tta: bool = False,
                          input_scale: float = 1.0) -> torch.Tensor:
    """Class probabilities ``C x H x W`` for one BGR uint8 image of any size.

    ``tta=True``: test-time augmentation, the mean of the probabilities of the image and of its
    horizontal, vertical and double flips (each flipped back), for 4x the inference time. The
    mean over this group of flips makes the prediction flip-equivariant.

    ``input_scale`` other than 1 (a :class:`~bloodseg.Segmenter` passes its own, e.g. 0.5 for the
    BCCD models, trained on half-size photographs): the model sees the image resized by that
    factor (``tile`` and ``overlap`` then count resized pixels); its probabilities are resized
    back bilinearly, so the mask always has the image's size.
    """
    scale = float(input_scale)
    if scale == 1.0:
        return _probabilities(model, image_bgr, tile, overlap, clahe, tta)
    if not (scale > 0 and math.isfinite(scale)):
        raise BloodsegError(f"input_scale must be a positive number; got {input_scale}")
    h, w = image_bgr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    probs = _probabilities(model, small, tile, overlap, clahe, tta)
    return F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def _softmax(model: torch.nn.Module, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Softmax of ``model(x)``; with ``tta`` averaged over the four flips of ``x`` (flipped back)."""
    if not tta:
        return F.softmax(model(x).float(), 1)
    total = 0
    for dims in ((), (-1,), (-2,), (-2, -1)):
        xf = x.flip(dims) if dims else x
        p = F.softmax(model(xf).float(), 1)
        total = total + (p.flip(dims) if dims else p)
    return total / 4


@torch.inference_mode()
def _probabilities(model: torch.nn.Module, image_bgr: np.ndarray, tile: int, overlap: int,
                   clahe: bool, tta: bool = False) -> torch.Tensor:
    if tile % 16 or tile < 16:
        raise BloodsegError(f"tile must be a positive multiple of 16; got {tile}")
    if not 0 <= overlap < tile:
        raise BloodsegError(f"overlap must be in [0, tile); got {overlap} with tile {tile}")
    model.eval()
    device = next(model.parameters()).device
    x = image_to_tensor(image_bgr, clahe=clahe)[None].to(device)
    x, (h, w) = _pad_to(x)
    H, W = x.shape[-2:]
    if H <= tile and W <= tile:
        return _softmax(model, x, tta)[0, :, :h, :w].cpu()
    th, tw = min(tile, H), min(tile, W)
    probs = torch.zeros(int(model.options.get("classes", 3)), H, W)
    weight = torch.zeros(1, H, W)
    win = _window(th, min(overlap, th // 2))[:, None] * _window(tw, min(overlap, tw // 2))[None, :]
    for y0 in _starts(H, th, th - overlap):
        for x0 in _starts(W, tw, tw - overlap):
            p = _softmax(model, x[..., y0:y0 + th, x0:x0 + tw], tta)[0].cpu()
            probs[:, y0:y0 + th, x0:x0 + tw] += p * win
            weight[:, y0:y0 + th, x0:x0 + tw] += win
    return (probs / weight)[:, :h, :w]


def predict_image(model: torch.nn.Module, image_bgr: np.ndarray, tile: int = 512, overlap: int = 64,
                  clahe: bool = True, tta: bool = False, input_scale: float = 1.0,
                  postprocess: dict | None = None) -> np.ndarray:
    """Mask ``uint8 HxW`` with classes {0 background, 1 white cell, 2 red cell}: the argmax of
    :func:`predict_probabilities`, then ``postprocess`` (a :func:`~bloodseg.postprocess.check_postprocess`
    spec, e.g. ``{"white_min_area": 4000, "fill_white_holes": True}``) when given.

    A :class:`~bloodseg.Segmenter` calls this with the settings it carries; call it directly to
    use a bare network.
    """
    probs = predict_probabilities(model, image_bgr, tile=tile, overlap=overlap, clahe=clahe, tta=tta,
                                  input_scale=input_scale)
    mask = probs.argmax(0).numpy().astype(np.uint8)
    if postprocess:
        spec = check_postprocess(postprocess)
        mask = clean_white_cells(mask, probs, min_area_at(spec, input_scale), spec["fill_white_holes"])
    return mask
