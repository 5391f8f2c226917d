"""Inference at any image size: pad to a multiple of 16, tile large images with overlap.

The models only take sides that are multiples of 16 (four 2x poolings). ``predict_image``
reflect-pads smaller images and, for images larger than ``tile``, runs overlapping tiles and
blends their softmax probabilities with a smooth window so seams do not show.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .datasets import read_image
from .errors import BloodsegError, DataError
from .postprocess import check_postprocess, clean_white_cells, min_area_at
from .preprocess import image_to_tensor
from .synthetic import overlay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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
                          overlap: int = 64, clahe: bool = True, tta: bool = False) -> torch.Tensor:
    """Class probabilities ``C x H x W`` for one BGR uint8 image of any size.

    ``tta=True``: test-time augmentation, the mean of the probabilities of the image and of its
    horizontal, vertical and double flips (each flipped back), for 4x the inference time. The
    mean over this group of flips makes the prediction flip-equivariant.

    A model with an ``input_scale`` attribute other than 1 (restored from its checkpoint, e.g.
    0.5 for the BCCD models, trained on half-size photographs) sees the image resized by that
    factor (``tile`` and ``overlap`` then count resized pixels); its probabilities are resized
    back bilinearly, so the mask always has the image's size.
    """
    scale = float(getattr(model, "input_scale", 1.0))
    if scale == 1.0:
        return _probabilities(model, image_bgr, tile, overlap, clahe, tta)
    if not scale > 0:
        raise BloodsegError(f"model.input_scale must be positive; got {scale}")
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


def resolve_postprocess(model: torch.nn.Module, postprocess=None) -> dict | None:
    """The post-processing :func:`predict_image` applies: ``None`` -> the model's own (restored from
    its checkpoint's ``"postprocess"``, e.g. the shipped BCCD checkpoint's white-cell cleanup), or
    none; ``False`` -> none (the network's argmax alone); a dict -> that one (checked)."""
    if postprocess is False:
        return None
    if postprocess is None or postprocess is True:
        spec = getattr(model, "postprocess", None)
        if spec is None and postprocess is True:
            raise BloodsegError("postprocess=True, but this model carries no post-processing (its "
                                "checkpoint has no 'postprocess'); pass a dict such as "
                                "{'white_min_area': 4000, 'fill_white_holes': True}")
        return None if spec is None else check_postprocess(spec)
    return check_postprocess(postprocess)


def predict_image(model: torch.nn.Module, image_bgr: np.ndarray, tile: int = 512,
                  overlap: int = 64, clahe: bool = True, tta: bool = False, postprocess=None) -> np.ndarray:
    """Mask ``uint8 HxW`` with classes {0 background, 1 white cell, 2 red cell} (``tta``: see
    :func:`predict_probabilities`).

    ``postprocess``: ``None`` (default) applies the model's own post-processing when its
    checkpoint carries one (:func:`bloodseg.postprocess.clean_white_cells` with the stored
    ``white_min_area`` / ``fill_white_holes``, the area scaled if the model's ``input_scale`` was
    changed since, :func:`bloodseg.postprocess.min_area_at`), ``False`` returns the network's
    argmax alone, a dict gives the settings (see :func:`resolve_postprocess`).
    """
    probs = predict_probabilities(model, image_bgr, tile=tile, overlap=overlap, clahe=clahe, tta=tta)
    mask = probs.argmax(0).numpy().astype(np.uint8)
    spec = resolve_postprocess(model, postprocess)
    if spec is not None:
        area = min_area_at(spec, float(getattr(model, "input_scale", 1.0)))
        mask = clean_white_cells(mask, probs, area, spec["fill_white_holes"])
    return mask


def expand_inputs(paths) -> list[Path]:
    """Files stay files; a folder becomes its image files (sorted). Missing paths are an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input not found: {p}. Give image files or folders of images.")
    if not out:
        raise DataError("no input images given")
    return out


def _writable_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"cannot write to the output folder {out_dir}: {exc.strerror}. "
                        "Choose a folder you can write to (--out).") from None
    return out_dir


def check_output_names(files: list[Path], out_dir: Path, suffixes=("", "_overlay")) -> None:
    """Raise :class:`DataError` if outputs ``<stem><suffix>.png`` in ``out_dir`` would collide with
    each other or overwrite one of the input ``files``."""
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem and by_stem[f.stem].resolve() != f.resolve():
            raise DataError(f"two inputs share the name {f.stem!r} ({by_stem[f.stem]} and {f}); their "
                            f"outputs {f.stem}.png would overwrite each other in {out_dir}. Rename one, "
                            "or predict them into different --out folders")
        by_stem[f.stem] = f
    inputs = {f.resolve() for f in files}
    for f in files:
        for suffix in suffixes:
            target = (out_dir / f"{f.stem}{suffix}.png").resolve()
            if target in inputs:
                raise DataError(f"writing {target} would overwrite the input image {target}; choose "
                                "another --out folder than the one that holds the images")


def predict_files(model: torch.nn.Module, paths, out_dir, tile: int = 512, overlap: int = 64,
                  overlays: bool = True, postprocess=None) -> list[dict]:
    """Predict every image; write ``<stem>.png`` (mask, values 0/1/2) and ``<stem>_overlay.png``.

    ``postprocess``: as in :func:`predict_image` (default: the checkpoint's own).
    Refuses (before writing anything) when two inputs share a stem, or when an output would
    overwrite an input image (e.g. ``--out`` is the input folder and an input is ``<stem>.png``).
    """
    files = expand_inputs(paths)
    out_dir = _writable_dir(out_dir)
    check_output_names(files, out_dir, ("", "_overlay") if overlays else ("",))
    results = []
    for f in files:
        image = read_image(f)
        mask = predict_image(model, image, tile=tile, overlap=overlap, postprocess=postprocess)
        mask_path = out_dir / f"{f.stem}.png"
        if not cv2.imwrite(str(mask_path), mask):
            raise DataError(f"could not write {mask_path}")
        row = {"image": str(f), "mask": str(mask_path), "height": mask.shape[0], "width": mask.shape[1],
               **{f"fraction_{k}": float((mask == i).mean())
                  for i, k in enumerate(("background", "white", "red"))}}
        if overlays:
            ov_path = out_dir / f"{f.stem}_overlay.png"
            cv2.imwrite(str(ov_path), overlay(image, mask))
            row["overlay"] = str(ov_path)
        results.append(row)
    return results
