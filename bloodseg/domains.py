"""Labelled photographs from any microscope: masks in any colours, and the real domains we test on.

A laboratory that wants to know how well bloodseg works on its own photographs labels a few of
them in whatever tool it has. The masks then come in that tool's colours: ALL-IDB2's experts
painted the nucleus cyan, the cytoplasm blue and everything else white; a binary mask is 0/255.
:func:`parse_mask_colours` reads a small text that says which colour is which class, and
:func:`load_labelled` reads a folder of images with a folder of such masks as
:class:`~bloodseg.io.Sample` s. When no colour stands for red cells, the masks do not label them
(red cells are part of "background"): ``red_labelled`` is False and only white cells are scored
(:mod:`bloodseg.evaluate`).

The real domains of the book:

* **BCCD** (:mod:`bloodseg.bccd`): whole 640x480 fields, the training domain;
* **ALL-IDB2** (:func:`load_allidb2`): 260 crops of 257x257 px around one white cell, another
  microscope and camera (Labati et al. 2011; masks by Loddo & Putzu). It is for evaluation and
  for choosing settings only, never for training: the odd-numbered crops choose, the
  even-numbered crops report. Found at ``$BLOODSEG_ALLIDB2``, else beside a project checkout
  (``../shared/data/allidb2``), else not at all (:func:`allidb2_dir` returns None).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .classes import BACKGROUND, RED_CELL, WHITE_CELL
from .errors import DataError
from .io import IMAGE_EXTENSIONS, Sample, _decode, _read_bytes, read_image, read_mask

__all__ = ["CLASS_WORDS", "MASK_PRESETS", "parse_mask_colours", "masks_in_colours", "load_labelled",
           "allidb2_dir", "load_allidb2", "half_of"]

#: Words (and ids) a mask-colour text may use for each class.
CLASS_WORDS = {"background": BACKGROUND, "bg": BACKGROUND, "0": BACKGROUND, "white": WHITE_CELL,
               "wbc": WHITE_CELL, "1": WHITE_CELL, "red": RED_CELL, "rbc": RED_CELL, "2": RED_CELL}

#: Named mask-colour texts (colours as R,G,B, as an image editor shows them; V for grey values).
MASK_PRESETS = {
    "allidb2": "255,255,255=background; 0,255,255=white; 0,0,255=white",   # nucleus cyan, cytoplasm blue
    "binary": "0=background; 255=white",                                    # white cells 255, the rest 0
    "bccd-wbc": "0=background; 155=white; 255=white",                       # Banik et al.'s grey masks
}


def parse_mask_colours(text: str) -> dict:
    """``{colour: class}`` from a text such as ``"255,255,255=background; 0,255,255=white"``.

    Items are separated by ``;``; each is ``R,G,B=CLASS`` (a colour as an image editor shows it)
    or ``V=CLASS`` (a grey value); CLASS is background, white or red (or 0, 1, 2). A name of
    :data:`MASK_PRESETS` (``allidb2``, ``binary``, ``bccd-wbc``) stands for its text. Keys of the
    result are ``(B, G, R)`` tuples (OpenCV order) or ints (grey).
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError("mask colours: give items like '255,255,255=background; 0,255,255=white' or a preset "
                        f"({', '.join(MASK_PRESETS)})")
    text = MASK_PRESETS.get(text.strip().lower(), text)
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        colour, eq, word = item.partition("=")
        cls = CLASS_WORDS.get(word.strip().lower())
        values = [v.strip() for v in colour.split(",")]
        ok = eq and cls is not None and len(values) in (1, 3) and all(re.fullmatch(r"\d{1,3}", v) for v in values)
        if not ok or any(int(v) > 255 for v in values):
            raise DataError(f"mask colours: cannot read {item!r}; write R,G,B=CLASS or V=CLASS with values 0-255 "
                            "and CLASS one of background, white, red (e.g. '0,255,255=white')")
        key = int(values[0]) if len(values) == 1 else (int(values[2]), int(values[1]), int(values[0]))
        if key in out and out[key] != cls:
            raise DataError(f"mask colours: {colour.strip()} is given two classes")
        out[key] = cls
    if WHITE_CELL not in out.values():
        raise DataError(f"mask colours {text!r} name no colour for white cells; add e.g. '255=white'")
    return out


def masks_in_colours(raw: np.ndarray, colours: dict, where: str) -> np.ndarray:
    """A mask image (grey ``HxW`` or BGR ``HxWx3``, 8-bit) as class ids by ``colours``
    (:func:`parse_mask_colours`); a pixel of any other colour is a :class:`DataError` naming it."""
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[..., :3]
    grey_keys = {k: v for k, v in colours.items() if isinstance(k, int)}
    rgb_keys = {k: v for k, v in colours.items() if isinstance(k, tuple)}
    if raw.ndim == 3 and raw.shape[2] == 3 and not rgb_keys and (raw == raw[..., :1]).all():
        raw = raw[..., 0]                               # grey stored as three equal channels
    if raw.ndim == 2:
        keys, codes = grey_keys, raw.astype(np.int64)
        name = lambda c: str(int(c))  # noqa: E731
    elif raw.ndim == 3 and raw.shape[2] == 3:
        keys = {(k, k, k) if isinstance(k, int) else k: v for k, v in colours.items()}
        keys = {(b << 16) | (g << 8) | r: v for (b, g, r), v in keys.items()}
        flat = raw.astype(np.int64)
        codes = (flat[..., 0] << 16) | (flat[..., 1] << 8) | flat[..., 2]
        name = lambda c: f"R,G,B {int(c) & 255},{(int(c) >> 8) & 255},{int(c) >> 16}"  # noqa: E731
    else:
        raise DataError(f"mask {where} has layout {raw.shape}; expected a grey or RGB image")
    out = np.full(codes.shape, 255, np.uint8)
    for code, cls in keys.items():
        out[codes == code] = cls
    if (out == 255).any():
        bad = np.unique(codes[out == 255])[:4]
        raise DataError(f"mask {where} has colour(s) {', '.join(map(name, bad))} that the mask colours do not "
                        "name; add them (e.g. --mask-colours '...; 128=white'), or save the masks without "
                        "anti-aliasing (a lossless PNG or TIFF)")
    return out


def _by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder.absolute()}")
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            if f.stem in found:
                raise DataError(f"two files share the name {f.stem!r} in {folder.absolute()}: "
                                f"{found[f.stem].name} and {f.name}; keep one")
            found[f.stem] = f
    return found


def load_labelled(images, masks, mask_colours=None, names=None) -> tuple[list[Sample], bool]:
    """``(samples, red_labelled)`` for the images in folder ``images`` and their masks (same file
    stem) in folder ``masks``.

    ``mask_colours``: None for bloodseg's own masks (0/1/2 or the class palette,
    :func:`bloodseg.io.read_mask`; red cells are labelled), else a text or dict for
    :func:`parse_mask_colours`. ``red_labelled`` is False when no colour stands for red cells.
    ``names``: only these stems (in this order). Every image needs its mask, of the same size.
    """
    images, masks = Path(images), Path(masks)
    ims, mks = _by_stem(images), _by_stem(masks)
    if not ims:
        raise DataError(f"no images in {images.absolute()} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    colours = None if mask_colours is None else (
        mask_colours if isinstance(mask_colours, dict) else parse_mask_colours(mask_colours))
    stems = list(ims) if names is None else list(names)
    samples = []
    for stem in stems:
        if stem not in ims:
            raise DataError(f"image {stem!r} not found in {images.absolute()}")
        if stem not in mks:
            raise DataError(f"image {ims[stem].absolute()} has no mask in {masks.absolute()} (same file name, "
                            f"any of {' '.join(IMAGE_EXTENSIONS)}); add it or move the image out")
        image = read_image(ims[stem])
        if colours is None:
            mask = read_mask(mks[stem])
        else:
            where = str(mks[stem].absolute())
            raw = _decode(_read_bytes(mks[stem], "mask"), where)
            if raw.dtype != np.uint8:
                raise DataError(f"mask {where} is {raw.dtype}; mask colours are 8-bit values")
            mask = masks_in_colours(raw, colours, where)
        if mask.shape != image.shape[:2]:
            raise DataError(f"size mismatch: image {ims[stem].absolute()} is {image.shape[1]}x{image.shape[0]} "
                            f"but its mask is {mask.shape[1]}x{mask.shape[0]}")
        samples.append(Sample(stem, image, mask, stem))
    return samples, colours is None or RED_CELL in colours.values()


def allidb2_dir() -> Path | None:
    """The ALL-IDB2 folder (``images/`` and ``masks/``): ``$BLOODSEG_ALLIDB2``, else
    ``../shared/data/allidb2`` beside the project checkout this package runs from; None when
    neither holds it."""
    env = os.environ.get("BLOODSEG_ALLIDB2")
    checkout = Path(__file__).resolve().parent.parent
    for cand in ([Path(env)] if env else []) + [checkout.parent / "shared" / "data" / "allidb2"]:
        if (cand / "images").is_dir() and (cand / "masks").is_dir():
            return cand
    return None


def half_of(stem: str) -> str:
    """``"odd"`` or ``"even"``: the half of ALL-IDB2 a crop ``ImNNN_L`` belongs to (by NNN)."""
    m = re.fullmatch(r"Im(\d+)_[01]", stem)
    if not m:
        raise DataError(f"{stem!r} is not an ALL-IDB2 crop name (ImNNN_L)")
    return "odd" if int(m.group(1)) % 2 else "even"


def load_allidb2(half: str = "even", root=None, limit: int | None = None) -> list[Sample]:
    """ALL-IDB2's crops of ``half`` ("odd": to choose settings; "even": to report; "all") with
    their masks as class ids (1 white cell = nucleus + cytoplasm, 0 the rest; red cells are not
    labelled). ``root``: the folder (default :func:`allidb2_dir`); ``limit``: the first N only."""
    if half not in ("odd", "even", "all"):
        raise DataError(f"half must be 'odd' (choose), 'even' (report) or 'all'; got {half!r}")
    root = Path(root) if root is not None else allidb2_dir()
    if root is None:
        raise DataError("ALL-IDB2 not found: set $BLOODSEG_ALLIDB2 to a folder with images/ and masks/ "
                        "(ALL-IDB2 crops with Loddo & Putzu's masks)")
    stems = sorted(_by_stem(Path(root) / "images"))
    stems = [s for s in stems if half == "all" or half_of(s) == half][:limit]
    samples, _ = load_labelled(Path(root) / "images", Path(root) / "masks", "allidb2", names=stems)
    return samples
