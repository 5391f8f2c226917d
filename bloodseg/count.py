"""Counting cells in a class mask: the paper's stated future work (§5), done on our masks.

A segmentation mask says *where* the cells are; a blood count needs *how many*. From a mask
``uint8 HxW`` in {0 background, 1 white cell, 2 red cell} (a prediction or a label):

* **White cells** are few and rarely touch: each connected component of class 1 (holes filled)
  is one cell, specks below ``min_white_area`` are dropped. Two white cells that overlap merge
  into one component; ``split_white=True`` splits them with the red cells' watershed instead.
* **Red cells** touch and overlap, so their components are clumps. :func:`split_touching`
  cuts them along the "necks" between cells: the Euclidean distance transform of the red
  pixels (pale centres filled first) has one peak per cell (the distance to the outline is
  largest near a cell's centre) and a saddle where two cells meet. Every peak that rises at
  least ``0.1 r`` above the saddle to any higher peak (an h-maximum) and lies at least ``0.4 r``
  from the outline seeds a marker; markers closer than ``0.5 r`` are one cell; and a watershed
  by flooding (:func:`_flood`: the markers grow down the distance, level by level, until they
  meet) gives each cell its pixels. ``r``, the typical red-cell radius, is measured on the mask
  itself (:func:`estimate_red_radius`), so the same code counts 775x519 synthetic smears and
  640x480 BCCD photographs without tuning. (OpenCV's ``cv2.watershed`` is no flooding of a
  relief: it orders pixels by the colour difference to their neighbour, so on a distance map it
  grows markers almost evenly and cuts cells off-centre; it is not used.)
* **Cells cut by the border** are counted only when most of the cell is visible: a segment
  that touches the border must cover at least half the typical cell area (red: the median
  interior segment, or ``pi r^2`` when there are fewer than three; white: ``2.5 pi r^2``). The exact counts of :func:`bloodseg.synthetic.smear_counts` use the
  same definition (at least half of the cell visible), so the two can be compared.

All areas scale with ``r``: minimum red segment ``0.15 pi r^2`` (a sliver), minimum white cell
``0.25 pi r^2`` (a white cell is 2-3 red cells in area in both data sets; a platelet clump is
far smaller). :func:`count_cells` returns plain numbers; :func:`count_files` runs a model
over image files and :func:`write_counts_csv` writes the table the ``bloodseg count`` command
prints.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from .classes import RED_CELL, WHITE_CELL
from .errors import DataError
from .io import write_bytes
from .postprocess import fill_small_holes, touches_border


__all__ = ["estimate_red_radius", "split_touching", "label_white_cells", "count_cells",
           "count_errors", "write_counts_csv", "COUNT_COLUMNS"]

#: Columns of the CSV written by :func:`write_counts_csv` (and ``bloodseg count``).
COUNT_COLUMNS = ("image", "n_white", "n_red", "red_radius_px", "white_fraction", "red_fraction",
                 "height", "width")

_EIGHT = np.ones((3, 3), bool)


def _check(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"a mask must be 2-D (HxW class ids); got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 2):
        raise DataError("mask values must be 0 background, 1 white cell, 2 red cell; found "
                        f"{sorted(set(np.unique(mask).tolist()) - {0, 1, 2})[:5]}")
    return mask


def estimate_red_radius(red: np.ndarray, default: float | None = None) -> float:
    """Typical red-cell radius in px: the median, over connected red regions, of their largest
    distance to the outline (for a disc, its radius; for a chain of touching cells, still about
    one radius). Holes are filled first (a pale cell centre is no outline). Regions smaller than
    a 3 px disc are ignored. Returns ``default`` (or ``min(H, W) / 20``) when there are none."""
    red = np.asarray(red, bool)
    fallback = float(default) if default is not None else max(min(red.shape) / 20.0, 2.0)
    if not red.any():
        return fallback
    filled = ndimage.binary_fill_holes(red)
    labels, n = ndimage.label(filled, structure=_EIGHT)
    if n == 0:
        return fallback
    dist = ndimage.distance_transform_edt(filled)
    peaks = ndimage.maximum(dist, labels, index=np.arange(1, n + 1))
    peaks = np.asarray(peaks, float)
    peaks = peaks[peaks >= 3.0]
    return float(np.median(peaks)) if peaks.size else fallback


def _keep_mostly_visible(labels: np.ndarray, n: int, min_area: float, typical: float | None,
                         border_share: float = 0.5, fallback: float | None = None) -> tuple[np.ndarray, int]:
    """Drop segments below ``min_area`` and border segments below ``border_share * typical``
    (``typical`` None: the median interior segment area when there are three or more interior
    segments, else ``fallback``); relabel 1..k."""
    if n == 0:
        return labels, 0
    areas = np.bincount(labels.ravel(), minlength=n + 1).astype(float)
    edge = touches_border(labels, n)
    keep = areas >= min_area
    keep[0] = False
    if typical is None:
        interior = areas[1:][keep[1:] & ~edge[1:]]
        typical = float(np.median(interior)) if interior.size >= 3 else fallback
    if typical is not None:
        keep &= ~edge | (areas >= border_share * typical)
    new = np.zeros(n + 1, np.int32)
    new[keep] = np.arange(1, int(keep.sum()) + 1)
    return new[labels], int(keep.sum())


def _disc(radius: float) -> np.ndarray:
    size = 2 * max(int(round(radius)), 1) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _reconstruct(marker: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Grey-level reconstruction by dilation of ``marker`` under ``limit`` (float32, 8-connected)."""
    prev = np.minimum(marker, limit)
    while True:
        cur = np.minimum(cv2.dilate(prev, _EIGHT.astype(np.uint8)), limit)
        if np.array_equal(cur, prev):
            return cur
        prev = cur


def _h_maxima(height: np.ndarray, h: float) -> np.ndarray:
    """Pixels of the regional maxima of ``height`` whose dynamic is at least ``h`` (boolean)."""
    return (height - _reconstruct(height - np.float32(h), height)) >= h - 1e-3


def _flood(height: np.ndarray, markers: np.ndarray, allowed: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Watershed by flooding from ``markers`` (int, 0 = none) down ``height`` inside ``allowed``.

    Levels ``step`` apart, from the top: at each level the labelled regions grow, one ring of
    8-neighbours at a time, into the unlabelled allowed pixels at or above it, until they stop. A
    new pixel takes the label of its highest labelled neighbour (the way uphill), so where two
    regions meet neither gains a pixel per ring. Pixels that no marker reaches stay 0."""
    labels = np.pad(markers.astype(np.int32), 1)
    w = labels.shape[1]
    h = np.pad(height.astype(np.float32), 1, constant_values=-np.inf).ravel()
    flat = labels.ravel()                                   # a view: writing it writes labels
    todo = np.flatnonzero(np.pad(allowed & (markers == 0), 1))
    if todo.size == 0 or not flat.any():
        return labels[1:-1, 1:-1].copy()
    level = np.ceil((float(height[allowed].max()) - h[todo]) / step).astype(np.int64)
    order = np.argsort(level, kind="stable")
    todo, level = todo[order], level[order]
    cuts = np.flatnonzero(np.diff(level)) + 1
    offsets = np.array([dy * w + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])[:, None]
    pending = np.empty(0, np.int64)
    for group in np.split(todo, cuts):
        pending = np.concatenate([pending, group])
        while pending.size:
            near = pending[None, :] + offsets                # 8 x m neighbour indices
            lab = flat[near]
            reached = (lab > 0).any(0)
            if not reached.any():
                break
            up = np.where(lab[:, reached] > 0, h[near[:, reached]], -np.inf)
            flat[pending[reached]] = lab[:, reached][up.argmax(0), np.arange(int(reached.sum()))]
            pending = pending[~reached]
    return labels[1:-1, 1:-1].copy()


def split_touching(binary: np.ndarray, radius: float | None = None,
                   min_area: float | None = None) -> tuple[np.ndarray, int, float]:
    """Split touching round cells with a distance-transform watershed.

    ``binary``: boolean ``HxW`` (the red-cell pixels). ``radius``: typical cell radius in px
    (None: :func:`estimate_red_radius`). Returns ``(labels int32 HxW with 0 = none and 1..n =
    one cell each, n, radius)``. Markers are the h-maxima (``h = 0.1 r``) of the distance
    transform at least ``0.4 r`` deep, merged when closer than ``0.5 r``; a red region without
    one is one cell. Segments below ``min_area`` (default ``0.15 pi r^2``) and border segments
    below half the typical cell area are dropped (see the module docstring).
    """
    binary = np.asarray(binary, bool)
    r = float(radius) if radius is not None else estimate_red_radius(binary)
    if not binary.any():
        return np.zeros(binary.shape, np.int32), 0, r
    # the pale centre of a red cell is no outline: fill holes up to about half a cell
    solid = fill_small_holes(binary, int(math.pi * (0.7 * r) ** 2))
    dist = ndimage.distance_transform_edt(solid).astype(np.float32)
    peaks = _h_maxima(dist, 0.1 * r) & (dist >= 0.4 * r) & solid
    # peaks closer than half a radius are one cell (a flat top, an elongated cell)
    peaks = cv2.dilate(peaks.astype(np.uint8), _disc(0.25 * r)).astype(bool) & solid
    markers, n_markers = ndimage.label(peaks, structure=_EIGHT)
    labels = _flood(dist, markers, solid)
    # a red region that no marker reached is one cell
    lonely = solid & (labels == 0)
    relabel, k = ndimage.label(lonely, structure=_EIGHT)
    labels[lonely] = relabel[lonely] + n_markers
    n = n_markers + k
    min_area = 0.15 * math.pi * r * r if min_area is None else float(min_area)
    labels, n = _keep_mostly_visible(labels, n, min_area, None, fallback=math.pi * r * r)
    return labels, n, r


def label_white_cells(mask: np.ndarray, min_area: float, typical: float | None = None
                      ) -> tuple[np.ndarray, int]:
    """Connected components of the white-cell class (holes filled, 8-connected), specks below
    ``min_area`` dropped, border cells kept when they cover half of ``typical`` (None: the median
    interior cell, when there are three or more, else all border cells above ``min_area``)."""
    white = ndimage.binary_fill_holes(np.asarray(mask) == WHITE_CELL)
    labels, n = ndimage.label(white, structure=_EIGHT)
    return _keep_mostly_visible(labels.astype(np.int32), n, min_area, typical)


def count_cells(mask: np.ndarray, red_radius: float | None = None, min_white_area: float | None = None,
                split_white: bool = False, return_labels: bool = False) -> dict:
    """Count white and red cells in a class mask ``uint8 HxW`` in {0, 1, 2}.

    Returns ``{"n_white", "n_red", "red_radius_px", "white_fraction", "red_fraction", "height",
    "width"}`` (plus ``"white_labels"`` and ``"red_labels"``, int32 ``HxW``, with
    ``return_labels=True``). ``red_radius`` fixes the typical red-cell radius in px instead of
    measuring it; ``min_white_area`` (default ``0.25 pi r^2``) is the smallest white cell in px.
    White cells whose segment touches the border must cover half of a typical white cell, taken
    as ``2.5 pi r^2`` (a white cell is about 2.5 red cells in area in our synthetic smears and in
    BCCD). ``split_white=True`` splits touching white cells with the same watershed as the red
    ones (radius measured on the white pixels) instead of taking connected components: two
    overlapping white cells then count as two. An empty mask counts 0 and 0.
    """
    mask = _check(mask)
    red_labels, n_red, r = split_touching(mask == RED_CELL, radius=red_radius)
    min_white = 0.25 * math.pi * r * r if min_white_area is None else float(min_white_area)
    if split_white:
        white_labels, n_white, _ = split_touching(mask == WHITE_CELL, min_area=min_white)
    else:
        white_labels, n_white = label_white_cells(mask, min_white, typical=2.5 * math.pi * r * r)
    out = {"n_white": int(n_white), "n_red": int(n_red), "red_radius_px": round(float(r), 2),
           "white_fraction": float((mask == WHITE_CELL).mean()) if mask.size else 0.0,
           "red_fraction": float((mask == RED_CELL).mean()) if mask.size else 0.0,
           "height": int(mask.shape[0]), "width": int(mask.shape[1])}
    if return_labels:
        out.update(white_labels=white_labels, red_labels=red_labels)
    return out


def count_errors(predicted, truth) -> dict:
    """Mean absolute error and mean absolute percentage error of counts.

    ``predicted`` and ``truth`` are equal-length sequences of numbers. Returns ``{"mae",
    "mape" (in %, over items with a nonzero truth), "bias" (mean predicted - truth), "n"}``.
    """
    p, t = np.asarray(list(predicted), float), np.asarray(list(truth), float)
    if p.shape != t.shape:
        raise DataError(f"got {p.size} predicted counts for {t.size} true counts")
    if p.size == 0:
        return {"mae": math.nan, "mape": math.nan, "bias": math.nan, "n": 0}
    nz = t != 0
    mape = float(np.mean(np.abs(p[nz] - t[nz]) / t[nz]) * 100) if nz.any() else math.nan
    return {"mae": float(np.mean(np.abs(p - t))), "mape": mape, "bias": float(np.mean(p - t)),
            "n": int(p.size)}


def write_rows_csv(rows: list[dict], path, columns=None) -> Path:
    """Write ``rows`` as CSV (``columns``: default the first row's keys; floats to 5 decimals),
    atomically (a killed run leaves the old file or the new one, never half of one)."""
    columns = list(columns if columns is not None else (rows[0] if rows else {}))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}. Choose a file in a folder "
                        "you can write to (--out).") from None
    return write_bytes(path, buf.getvalue().encode())


def write_counts_csv(rows: list[dict], path) -> Path:
    """Write count rows (:func:`count_files`) as CSV with the :data:`COUNT_COLUMNS` (atomically)."""
    return write_rows_csv(rows, path, COUNT_COLUMNS)
