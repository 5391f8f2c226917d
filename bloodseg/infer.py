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

from .classes import WHITE_CELL
from .errors import BloodsegError, DataError
from .postprocess import check_postprocess, clean_white_cells, min_area_at
from .preprocess import _check_bgr, clahe_on_luma, image_to_tensor


def memory_limit_bytes() -> int | None:
    """Bytes this process may still allocate: the smaller of the address-space limit
    (``RLIMIT_AS`` soft limit minus the current virtual size) and the memory the system has
    available; None when neither is known."""
    limits = []
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            import psutil
            limits.append(soft - psutil.Process().memory_info().vms)
    except (ImportError, OSError, ValueError):
        pass
    try:
        import psutil
        limits.append(psutil.virtual_memory().available)
    except (ImportError, OSError):
        pass
    return min(limits) if limits else None


def estimate_bytes(h: int, w: int, classes: int = 3, tile: int = 512, probabilities: bool = True) -> int:
    """Bytes that predicting one ``h x w`` image allocates beyond the image itself: the CLAHE
    and padded copies (uint8), one band of tiles' float32 accumulators, and the output: float32
    ``classes x h x w`` probabilities, or (``probabilities=False``, :func:`predict_image`) the
    uint8 mask, its runner-up class and the white-cell cleanup's labels (about 12 bytes a pixel)."""
    hp, wp = h + (-h) % 16, w + (-w) % 16
    px = h * w
    work = 3 * px * 3 + hp * wp * 3                      # CLAHE (Lab copies) + padded RGB
    band = (classes + 1) * 2 * min(tile, hp) * wp * 4    # accumulators of one band of tiles
    out = classes * px * 4 if probabilities else px * 12
    return work + band + out


def check_memory(h: int, w: int, classes: int = 3, tile: int = 512, probabilities: bool = True) -> None:
    """Raise :class:`~bloodseg.errors.DataError` before allocating anything when predicting an
    ``h x w`` image would not fit in :func:`memory_limit_bytes`."""
    need = estimate_bytes(h, w, classes, tile, probabilities)
    limit = memory_limit_bytes()
    if limit is not None and need > limit:
        raise DataError(
            f"image of {w}x{h} pixels ({h * w / 1e6:.0f} Mpx) needs about {need / 2**30:.1f} GiB to predict, "
            f"but this process may use only {max(limit, 0) / 2**30:.1f} GiB more (address-space limit / "
            "available memory). Downscale the image (e.g. cv2.resize, or a Segmenter's input_scale), or "
            "crop it into parts and predict each part.")




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
    classes = int(model.options.get("classes", 3))
    if scale == 1.0:
        if getattr(image_bgr, "ndim", 0) >= 2:
            check_memory(*image_bgr.shape[:2], classes, tile)
        return _probabilities(model, image_bgr, tile, overlap, clahe, tta)
    if not (scale > 0 and math.isfinite(scale)):
        raise BloodsegError(f"input_scale must be a positive number; got {input_scale}")
    h, w = image_bgr.shape[:2]
    check_memory(h, w, classes, tile)
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


def _check_tiling(tile: int, overlap: int) -> None:
    if tile % 16 or tile < 16:
        raise BloodsegError(f"tile must be a positive multiple of 16; got {tile}")
    if not 0 <= overlap < tile:
        raise BloodsegError(f"overlap must be in [0, tile); got {overlap} with tile {tile}")


@torch.inference_mode()
def _probabilities(model: torch.nn.Module, image_bgr: np.ndarray, tile: int, overlap: int,
                   clahe: bool, tta: bool = False) -> torch.Tensor:
    _check_tiling(tile, overlap)
    h, w = image_bgr.shape[:2] if getattr(image_bgr, "ndim", 0) >= 2 else (0, 0)
    if h + (-h) % 16 <= tile and w + (-w) % 16 <= tile:   # one tile: the whole image at once
        model.eval()
        device = next(model.parameters()).device
        x = image_to_tensor(image_bgr, clahe=clahe)[None].to(device)
        x, (h, w) = _pad_to(x)
        return _softmax(model, x, tta)[0, :, :h, :w].cpu()
    bands = list(_probability_bands(model, image_bgr, tile, overlap, clahe, tta))
    return torch.cat([p for _, p in bands], 1)


@torch.inference_mode()
def _probability_bands(model: torch.nn.Module, image_bgr: np.ndarray, tile: int, overlap: int,
                       clahe: bool, tta: bool = False):
    """``(first_row, probs C x rows x w)`` for consecutive horizontal bands of the image, top to
    bottom. Only one band of tiles' accumulators (at most about two tiles high) is held at a time,
    and each tile is converted to float on its own, so the extra memory is bounded by the tile
    size and the image width, not the image area. The sums run in the same order as a
    whole-image accumulator, so the probabilities are bit-identical to it."""
    _check_tiling(tile, overlap)
    _check_bgr(image_bgr)
    model.eval()
    device = next(model.parameters()).device
    if clahe:
        image_bgr = clahe_on_luma(image_bgr)
    h, w = image_bgr.shape[:2]
    ph, pw = (-h) % 16, (-w) % 16
    rgb = image_bgr[..., ::-1]
    if ph or pw:   # as _pad_to: reflect, replicate ("edge") for tiny images
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect" if ph < h and pw < w else "edge")
    H, W = rgb.shape[:2]
    th, tw = min(tile, H), min(tile, W)
    C = int(model.options.get("classes", 3))
    win = _window(th, min(overlap, th // 2))[:, None] * _window(tw, min(overlap, tw // 2))[None, :]

    def tensor(y0, x0):
        part = np.ascontiguousarray(rgb[y0:y0 + th, x0:x0 + tw])
        return torch.from_numpy(part).permute(2, 0, 1).float().div_(255.0)[None].to(device)

    def finished(lo, hi):   # rows [lo, hi) of the padded image, cropped to the image
        hi = min(hi, h)
        if hi > lo:
            yield lo, (probs[:, :hi - lo] / weight[:, :hi - lo])[:, :, :w]

    lo = 0
    probs, weight = torch.zeros(C, 0, W), torch.zeros(1, 0, W)
    for y0 in _starts(H, th, th - overlap):
        if y0 > lo:   # later tiles start at y0 or below: rows above y0 are final
            yield from finished(lo, y0)
            probs, weight, lo = probs[:, y0 - lo:], weight[:, y0 - lo:], y0
        grow = y0 + th - (lo + probs.shape[1])
        if grow > 0:
            probs = torch.cat([probs, torch.zeros(C, grow, W)], 1)
            weight = torch.cat([weight, torch.zeros(1, grow, W)], 1)
        for x0 in _starts(W, tw, tw - overlap):
            p = _softmax(model, tensor(y0, x0), tta)[0].cpu()
            probs[:, y0 - lo:y0 - lo + th, x0:x0 + tw] += p * win
            weight[:, y0 - lo:y0 - lo + th, x0:x0 + tw] += win
    yield from finished(lo, lo + probs.shape[1])


def predict_image(model: torch.nn.Module, image_bgr: np.ndarray, tile: int = 512, overlap: int = 64,
                  clahe: bool = True, tta: bool = False, input_scale: float = 1.0,
                  postprocess: dict | None = None) -> np.ndarray:
    """Mask ``uint8 HxW`` with classes {0 background, 1 white cell, 2 red cell}: the argmax of
    :func:`predict_probabilities`, then ``postprocess`` (a :func:`~bloodseg.postprocess.check_postprocess`
    spec, e.g. ``{"white_min_area": 4000, "fill_white_holes": True}``) when given.

    A :class:`~bloodseg.Segmenter` calls this with the settings it carries; call it directly to
    use a bare network.
    """
    h, w = image_bgr.shape[:2] if getattr(image_bgr, "ndim", 0) >= 2 else (0, 0)
    if float(input_scale) == 1.0 and (h + (-h) % 16 > tile or w + (-w) % 16 > tile):
        # several tiles: the mask band by band, never the whole image's probabilities
        check_memory(h, w, int(model.options.get("classes", 3)), tile, probabilities=False)
        mask, rest = np.empty((h, w), np.uint8), np.empty((h, w), np.uint8)
        for r0, p in _probability_bands(model, image_bgr, tile, overlap, clahe, tta):
            mask[r0:r0 + p.shape[1]] = p.argmax(0).numpy()
            # the most probable other class, for the white-cell cleanup
            rest[r0:r0 + p.shape[1]] = p.index_fill(0, torch.tensor([WHITE_CELL]), -np.inf).argmax(0).numpy()
        if postprocess:
            spec = check_postprocess(postprocess)
            # as clean_white_cells(mask, probs, ...): small white components take the runner-up class
            out = clean_white_cells(mask, None, min_area_at(spec, input_scale), False)
            changed = (mask == WHITE_CELL) & (out != WHITE_CELL)
            out[changed] = rest[changed]
            mask = clean_white_cells(out, None, 0.0, spec["fill_white_holes"])
        return mask
    probs = predict_probabilities(model, image_bgr, tile=tile, overlap=overlap, clahe=clahe, tta=tta,
                                  input_scale=input_scale)
    mask = probs.argmax(0).numpy().astype(np.uint8)
    if postprocess:
        spec = check_postprocess(postprocess)
        mask = clean_white_cells(mask, probs, min_area_at(spec, input_scale), spec["fill_white_holes"])
    return mask
