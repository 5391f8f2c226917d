"""Procedural blood smears with exact 3-class masks: the embedded default dataset.

The paper trains on MISP smears (775x519) labelled by hand in LabelMe. Those images
cannot ship with the package, so :func:`make_smear` paints look-alikes whose labels
are exact by construction: every pixel's class is the class of the topmost shape
that covers at least half of it, and the image is rendered from the same shapes.

How a smear is painted (a thin film seen in transmitted light, so colours add up as
optical densities, Beer-Lambert):

* plasma: a pale grey-green film under uneven, low-frequency illumination;
* red cells (class 2): pink discs of varied size and ellipticity, thicker at the rim
  than in the centre (the central pallor can come close to plasma), touching,
  overlapping (overlaps look darker, as in a real smear) and cut by the border;
* white cells (class 1, 1-3 per image, drawn over red cells): a pale, granular
  lilac or bluish cytoplasm that is barely darker than plasma, around a purple
  nucleus with 2-5 lobes (neutrophil-like), one round nucleus (lymphocyte-like) or
  two large lobes (monocyte-like);
* platelets (class 0): small purple dots stained like a nucleus, the hard negatives;
* then the camera: optical blur, shot + read noise, a per-image stain/white-balance
  jitter (hue, saturation, brightness) and a JPEG round trip.

Images are OpenCV BGR ``uint8 HxWx3``; masks are ``uint8 HxW`` with 0 background,
1 white cell, 2 red cell. The non-learned floor a trained network has to beat,
:func:`~bloodseg.colour.colour_threshold_baseline`, lives in :mod:`bloodseg.colour` (and is
importable from here too, where the chapters have always taken it).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from .classes import BACKGROUND, RED_CELL, WHITE_CELL
from .colour import colour_threshold_baseline, stain_masks  # noqa: F401 (also importable from here)
from .errors import DataError
from .io import write_image
from .shapes import Blob, full_area, on_image, region, smooth_noise, wobble


@dataclasses.dataclass(frozen=True)
class SmearSpec:
    """Knobs of :func:`make_smear`. A ``(low, high)`` pair is drawn uniformly per image or per cell."""
    rbc_cover: tuple = (0.55, 0.85)       # summed red-cell area / image area (overlaps count twice)
    rbc_radius: tuple = (20.0, 29.0)      # px, semi-major axis
    rbc_ellipticity: tuple = (0.78, 1.0)  # minor / major axis
    rbc_spacing: tuple = (0.74, 1.04)     # min centre distance / (r1 + r2); below 1 cells overlap
    rbc_pallor: tuple = (0.1, 0.8)        # thickness at the centre relative to the rim (low = pale)
    n_wbc: tuple = (1, 3)
    wbc_radius: tuple = (36.0, 50.0)      # px, neutrophil size; lymphocytes are drawn smaller
    n_platelets: tuple = (6, 22)
    platelet_radius: tuple = (2.5, 5.0)   # px
    blur_sigma: tuple = (0.6, 1.4)        # px, optical blur
    read_noise: tuple = (1.0, 3.0)        # grey levels, gaussian
    shot_noise: tuple = (0.15, 0.45)      # grey levels per sqrt(grey level)
    jpeg_quality: tuple = (55, 92)
    stain_jitter: float = 1.0             # scales every stain / colour jitter; 0 = the mean stain


# Mean optical densities (B, G, R) of the stains, measured on BCCD smears (plasma ~ BGR 200,202,200,
# red cell ~ 160,153,178, cytoplasm ~ 200,170,190, nucleus ~ 213,115,145 under ~235 grey light).
_PLASMA_OD = np.array([0.070, 0.066, 0.070], np.float32)
_RBC_OD = np.array([0.100, 0.125, 0.050], np.float32)          # added on top of plasma
_CYTO_OD = np.array([0.075, 0.120, 0.090], np.float32)         # replaces what lies below
_CYTO_BLUE_OD = np.array([0.070, 0.105, 0.125], np.float32)    # lymphocyte cytoplasm
_NUCLEUS_OD = np.array([0.045, 0.270, 0.180], np.float32)


def _spec(overrides: dict) -> SmearSpec:
    names = {f.name for f in dataclasses.fields(SmearSpec)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DataError(f"unknown smear option(s) {', '.join(unknown)}; "
                        f"make_smear accepts {', '.join(sorted(names))}")
    return SmearSpec(**overrides)


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise DataError(f"size must be (height, width); got {size!r}") from None
    if h < 32 or w < 32:
        raise DataError(f"a smear must be at least 32x32 pixels; got size=(height {h}, width {w})")
    return h, w


def _uniform(rng, pair):
    return float(rng.uniform(pair[0], pair[1]))


def _place_red_cells(rng, h, w, cfg, white):
    """Random sequential placement: a new cell keeps a drawn minimum distance to the others.

    A spacing factor below 1 lets neighbours overlap; centres may lie outside the image so
    cells are cut by the border. Stops at the drawn cover or after a fixed number of tries.
    """
    target = _uniform(rng, cfg.rbc_cover) * h * w
    # centres (x, y, radius) of everything placed so far; white cells count with a smaller
    # radius so red cells may slip under their rims
    placed = np.zeros((len(white) + 4000, 3), np.float64)
    for i, c in enumerate(white):
        placed[i] = (c.cx, c.cy, 0.6 * c.a)
    n = len(white)
    cells, area = [], 0.0
    for _ in range(4000):
        if area >= target:
            break
        r = _uniform(rng, cfg.rbc_radius)
        cx, cy = rng.uniform(-0.5 * r, w + 0.5 * r), rng.uniform(-0.5 * r, h + 0.5 * r)
        spacing = _uniform(rng, cfg.rbc_spacing)
        other = placed[:n]
        if n and np.any(np.hypot(other[:, 0] - cx, other[:, 1] - cy) < spacing * (other[:, 2] + r)):
            continue
        b = r * _uniform(rng, cfg.rbc_ellipticity)
        # most cells are smooth discs; one in eight is visibly deformed
        harmonics = wobble(rng, 0.10 if rng.random() < 0.125 else 0.025, ks=(2, 3))
        cells.append((Blob(cx, cy, r, b, float(rng.uniform(0, np.pi)), harmonics),
                      _uniform(rng, cfg.rbc_pallor), float(rng.uniform(0.65, 1.2))))
        placed[n] = (cx, cy, r)
        n += 1
        area += np.pi * r * b
    return cells


def _white_cell(rng, h, w, cfg):
    """One white cell: the cell outline, its nucleus lobes and its cytoplasm colour."""
    kind = rng.choice(["neutrophil", "lymphocyte", "monocyte"], p=[0.55, 0.3, 0.15])
    R = _uniform(rng, cfg.wbc_radius) * (rng.uniform(0.62, 0.8) if kind == "lymphocyte" else 1.0)
    cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
    cell = Blob(cx, cy, R, R * rng.uniform(0.88, 1.0), float(rng.uniform(0, np.pi)), wobble(rng, 0.05))
    lobes = []
    if kind == "neutrophil":          # 2-5 lobes along an arc
        n = int(rng.integers(2, 6))
        phi, step = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.3)
        for i in range(n):
            t = phi + (i - (n - 1) / 2) * step
            d = R * rng.uniform(0.3, 0.45)
            la = R * rng.uniform(0.26, 0.36)
            lobes.append(Blob(cx + d * np.cos(t), cy + d * np.sin(t), la, la * rng.uniform(0.65, 0.95),
                               float(t + np.pi / 2 + rng.normal(0, 0.3)), wobble(rng, 0.08)))
    elif kind == "lymphocyte":        # one big round nucleus, a thin cytoplasm rim
        off, t = R * rng.uniform(0, 0.12), rng.uniform(0, 2 * np.pi)
        ln = R * rng.uniform(0.68, 0.82)
        lobes.append(Blob(cx + off * np.cos(t), cy + off * np.sin(t), ln, ln * rng.uniform(0.85, 1.0),
                           float(rng.uniform(0, np.pi)), wobble(rng, 0.06)))
    else:                             # monocyte: a kidney shape from two large overlapping lobes
        t = rng.uniform(0, 2 * np.pi)
        for sign in (-1, 1):
            tt = t + sign * 0.7
            la = R * rng.uniform(0.38, 0.48)
            lobes.append(Blob(cx + 0.3 * R * np.cos(tt), cy + 0.3 * R * np.sin(tt), la, la * 0.8,
                               float(tt + np.pi / 2), wobble(rng, 0.06)))
    cyto = _CYTO_BLUE_OD if kind == "lymphocyte" else _CYTO_OD
    return cell, lobes, cyto


def _stain(rng, jitter):
    """Per-image stain: every optical density scaled and tinted a little (batch-to-batch variation)."""
    def vary(od, scale, tint):
        s = 1 + jitter * rng.uniform(-scale, scale)
        t = 1 + jitter * rng.normal(0, tint, 3)
        return (od * s * t).astype(np.float32).clip(0.005, None)
    return dict(plasma=vary(_PLASMA_OD, 0.3, 0.1), rbc=vary(_RBC_OD, 0.3, 0.12),
                cyto=vary(np.ones(3, np.float32), 0.25, 0.08), nucleus=vary(_NUCLEUS_OD, 0.25, 0.1))


def _illumination(rng, h, w, jitter):
    """Lamp brightness x colour cast x smooth uneven field x vignetting, per pixel and channel."""
    level = rng.uniform(222, 250) * (1 + jitter * rng.normal(0, 0.015, 3))
    coarse = rng.uniform(-1, 1, (3, 4)).astype(np.float32) * rng.uniform(0.02, 0.08)
    field = 1 + cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.ogrid[-1:1:complex(0, h), -1:1:complex(0, w)]
    field *= (1 - rng.uniform(0, 0.12) * (yy * yy + xx * xx) / 2).astype(np.float32)
    return field[..., None] * level.astype(np.float32)


def _visible_cells(mask: np.ndarray, red: list, white: list):
    """``(class name, slices, the cell's pixels labelled with its class, counted?)`` for every cell
    with a pixel in the image, in painting order. A cell counts when at least half of its whole
    shape is labelled with its class (see :func:`make_smear`, ``return_counts``)."""
    h, w = mask.shape
    for key, cls, group in (("red", RED_CELL, red), ("white", WHITE_CELL, white)):
        for (blob, *_), sl, _, _, cov, _ in on_image(group, h, w):
            own = cov >= 0.5
            if own.any():
                visible = own & (mask[sl] == cls)
                yield key, sl, visible, int(visible.sum()) >= 0.5 * full_area(blob)


def _visible_counts(mask: np.ndarray, red: list, white: list) -> dict:
    """Exact cell counts of a painted smear (see :func:`make_smear`, ``return_counts``)."""
    counts = {"n_white": 0, "n_red": 0, "n_white_drawn": 0, "n_red_drawn": 0}
    for key, _, _, counted in _visible_cells(mask, red, white):
        counts[f"n_{key}_drawn"] += 1
        counts[f"n_{key}"] += int(counted)
    return counts


def _instance_map(mask: np.ndarray, red: list, white: list) -> dict:
    """Exact cell instances of a painted smear (see :func:`make_smear`, ``return_instances``)."""
    labels = np.zeros(mask.shape, np.int32)
    cells = []
    for key, sl, visible, counted in _visible_cells(mask, red, white):
        cells.append({"id": len(cells) + 1, "class": key, "counted": counted})
        labels[sl][visible] = len(cells)     # the topmost cell of its class keeps a pixel
    return {"labels": labels, "cells": cells}


def smear_counts(seed: int, size=(519, 775), **spec) -> dict:
    """Exact cell counts of ``make_smear(seed, size, **spec)``: ``make_smear(..., return_counts=True)[2]``."""
    return make_smear(seed, size=size, return_counts=True, **spec)[2]


def make_smear(seed: int, size=(519, 775), return_counts: bool = False, return_instances: bool = False, **spec):
    """Paint one synthetic blood smear; return ``(image, mask)``, or ``(image, mask, counts)``.

    ``image`` is OpenCV BGR ``uint8 HxWx3``; ``mask`` is ``uint8 HxW`` with 0 background
    (plasma and platelets), 1 white cell (nucleus and cytoplasm), 2 red cell. ``size`` is
    (height, width), the paper's MISP smears are 519x775. ``spec`` overrides fields of
    :class:`SmearSpec`. The same ``seed`` gives byte-identical output.

    With ``return_counts=True`` a third item gives the exact number of cells, for counting
    experiments: ``n_white`` / ``n_red`` count a cell when at least half of its whole shape is
    visible in the mask, i.e. lies inside the image and is labelled with its class there (not
    hidden under a white cell or a platelet, not cut off by the border); overlapping red cells
    stay visible, each of them. ``n_white_drawn`` / ``n_red_drawn`` count every cell with at
    least one pixel in the image. Image and mask are the same either way.

    With ``return_instances=True`` one more item (last) gives the exact cells: ``{"labels": int32
    HxW, "cells": [{"id", "class" ("white"/"red"), "counted"}]}``; a pixel of class 1 or 2 holds the
    id of the topmost cell of that class drawn there (0 elsewhere), and ``counted`` says whether the
    cell counts in ``n_white``/``n_red``.
    """
    cfg = _spec(spec)
    h, w = _check_size(size)
    rng = np.random.default_rng(int(seed))
    stain = _stain(rng, cfg.stain_jitter)
    fine = smooth_noise(rng, h, w, 1.0)    # granules, chromatin grain
    mid = smooth_noise(rng, h, w, 3.0)     # uneven cell surface, nuclear texture

    od = np.empty((h, w, 3), np.float32)
    od[:] = stain["plasma"]
    od *= (1 + 0.05 * mid)[..., None]
    mask = np.zeros((h, w), np.uint8)

    white = [_white_cell(rng, h, w, cfg) for _ in range(int(rng.integers(cfg.n_wbc[0], cfg.n_wbc[1] + 1)))]
    red = _place_red_cells(rng, h, w, cfg, [cell for cell, _, _ in white])

    # Red cells add their density (overlaps darken); the rim is thicker than the centre.
    for (_, pallor, strength), sl, _, _, cov, rn in on_image(red, h, w):
        thickness = pallor + (1.0 - pallor) * np.exp(-((rn - 0.8) / 0.3) ** 2)
        thickness *= 1 + 0.08 * mid[sl]
        od[sl] += (cov * thickness * strength)[..., None] * stain["rbc"]
        mask[sl][cov >= 0.5] = RED_CELL

    # White cells cover what lies below them: cytoplasm first, then the nucleus.
    for (_, lobes, cyto), sl, ys, xs, cov, _ in on_image(white, h, w):
        nuc = np.zeros_like(cov)
        for lobe in lobes:
            nuc = np.maximum(nuc, lobe.coverage(ys, xs)[0])
        nuc = np.minimum(nuc, cov)     # the nucleus stays inside the cell
        local = od[sl]
        cyto_od = (cyto * stain["cyto"])[None, None] * (1 + 0.18 * fine[sl])[..., None]
        local += cov[..., None] * (cyto_od - local)
        nuc_od = stain["nucleus"][None, None] * (1 + 0.2 * mid[sl] + 0.1 * fine[sl])[..., None]
        local += nuc[..., None] * (nuc_od - local)
        mask[sl][cov >= 0.5] = WHITE_CELL

    # Platelets: nucleus-coloured dots, mostly in plasma, never on a white cell; labelled background.
    n_plt = int(rng.integers(cfg.n_platelets[0], cfg.n_platelets[1] + 1))
    placed, tries = 0, 0
    while placed < n_plt and tries < 50 * (n_plt + 1):
        tries += 1
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        under = mask[int(cy), int(cx)]
        if under == WHITE_CELL or any(np.hypot(c.cx - cx, c.cy - cy) < c.extent() + 8 for c, _, _ in white):
            continue
        if under == RED_CELL and rng.random() < 0.75:
            continue
        for k in range(1 + (int(rng.integers(1, 4)) if rng.random() < 0.25 else 0)):   # some clump
            r = _uniform(rng, cfg.platelet_radius)
            px, py = cx + (rng.normal(0, 5) if k else 0), cy + (rng.normal(0, 5) if k else 0)
            blob = Blob(px, py, r, r * rng.uniform(0.6, 1.0), float(rng.uniform(0, np.pi)), wobble(rng, 0.3))
            reg = region(blob, h, w)
            if reg is None:
                continue
            sl, ys, xs = reg
            cov, _ = blob.coverage(ys, xs)
            m = mask[sl]
            cov[m == WHITE_CELL] = 0          # a clump member must not bite into a white cell
            dens = stain["nucleus"][None, None] * rng.uniform(0.85, 1.3) * (1 + 0.2 * fine[sl])[..., None]
            local = od[sl]
            local += cov[..., None] * (dens - local)
            m[cov >= 0.5] = BACKGROUND
        placed += 1

    # Camera: transmitted light, optical blur, shot + read noise.
    image = _illumination(rng, h, w, cfg.stain_jitter) * np.power(10.0, -od, dtype=np.float32)
    image = cv2.GaussianBlur(image, (0, 0), _uniform(rng, cfg.blur_sigma))
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += noise * (_uniform(rng, cfg.shot_noise) * np.sqrt(np.clip(image, 0, None)) + _uniform(rng, cfg.read_noise))
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    # White balance / stain jitter in HSV, then JPEG artefacts.
    j = cfg.stain_jitter
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + j * rng.uniform(-3, 3), 180)
    hsv[..., 1] *= 1 + j * rng.uniform(-0.2, 0.25)
    hsv[..., 2] *= 1 + j * rng.uniform(-0.08, 0.06)
    hsv = np.clip(hsv + 0.5, 0, [179, 255, 255]).astype(np.uint8)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    quality = int(rng.integers(int(cfg.jpeg_quality[0]), int(cfg.jpeg_quality[1]) + 1))
    _, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    out = (image, mask)
    if return_counts:
        out += (_visible_counts(mask, red, white),)
    if return_instances:
        out += (_instance_map(mask, red, white),)
    return out


# ----------------------------------------------------------------------------- files

def write_synthetic(out_dir, n: int, seed: int = 0, size=(519, 775)) -> list[Path]:
    """Write ``n`` smears as ``out_dir/images/smear_0000.png`` + ``out_dir/masks/smear_0000.png``.

    Image ``i`` uses seed ``seed + i``; images are 3-channel PNG (BGR on disk as OpenCV writes it,
    i.e. a normal colour PNG), masks single-channel PNG with values 0/1/2. Returns the image paths;
    each mask has the same file name under ``masks/``. Writes nothing else.
    """
    out = Path(out_dir)
    if int(n) < 0:
        raise DataError(f"n must be >= 0; got {n}")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output folders under {out.resolve()} ({exc.strerror or exc}); "
                        "choose a folder you can write to") from None
    paths = []
    for i in range(int(n)):
        image, mask = make_smear(seed + i, size=size)
        name = f"smear_{i:04d}.png"
        for folder, array in (("images", image), ("masks", mask)):
            target = out / folder / name
            write_image(target, array)
        paths.append(out / "images" / name)
    return paths


