"""Per-cell outputs: one id per cell, and a table with one row per cell.

:func:`instances` turns a class mask ``uint8 HxW`` in {0 background, 1 white cell, 2 red cell}
into a label image and rows, with the same cell rules as :func:`bloodseg.count.count_cells`
(it calls it): white cells are the components of class 1 with holes filled, red cells the
components of class 2 with touching cells split by the distance-transform watershed
(:func:`bloodseg.count.split_touching`); specks and small border fragments are dropped. So
``len(rows)`` is ``n_white + n_red`` of the count. White cells get ids ``1..n_white``, red cells
the ids after them. Where a filled white cell covers a red segment, the white cell keeps the pixels.

:func:`write_instances` stores ``<stem>_instances.png`` (uint16 labels, 0 = no cell) and
``<stem>_cells.csv`` (:data:`INSTANCE_COLUMNS`); :func:`write_probabilities` stores
``<stem>_probs.npz`` (``probs``: float16 ``C x H x W``, compressed). Every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from .classes import RED_CELL, WHITE_CELL
from .count import count_cells
from .errors import BloodsegError, DataError
from .io import _decode, _read_bytes, write_bytes, write_image
from .postprocess import touches_border

__all__ = ["instances", "write_instances", "read_instances", "write_probabilities", "read_probabilities",
           "INSTANCE_COLUMNS"]

#: Columns of ``<stem>_cells.csv``. ``x1``/``y1`` are exclusive (the cell lies in ``x0 <= x < x1``);
#: ``area_um2`` and ``mean_probability`` are empty without a pixel size / probabilities.
INSTANCE_COLUMNS = ("id", "class", "area_px", "area_um2", "centroid_x", "centroid_y", "x0", "y0", "x1", "y1",
                    "equivalent_diameter_px", "mean_probability", "touches_border")


def _check_pixel_size(pixel_size_um) -> float | None:
    if pixel_size_um is None:
        return None
    try:
        value = float(pixel_size_um)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BloodsegError(f"the pixel size must be a positive number of micrometres; got {pixel_size_um!r}")
    return value


def _probabilities(probs, shape) -> np.ndarray | None:
    if probs is None:
        return None
    p = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    if p.ndim != 3 or p.shape[0] < 3 or p.shape[1:] != tuple(shape):
        raise BloodsegError(f"probs must be C x {shape[0]} x {shape[1]} with C >= 3; got shape {p.shape}")
    return p


def instances(mask, probs=None, pixel_size_um=None, red_radius=None) -> tuple[np.ndarray, list[dict]]:
    """One id per cell of a class mask: ``(labels int32 HxW, rows)``, 0 = no cell.

    Each row: ``id``, ``class`` ("white"/"red"), ``area_px``, ``area_um2`` (with ``pixel_size_um``,
    the side of one pixel in µm), ``centroid_x``/``centroid_y`` (px, x = column), the bounding box
    ``x0, y0, x1, y1`` (x1, y1 exclusive), ``equivalent_diameter_px`` (of the disc of the same area),
    ``mean_probability`` (with ``probs``, ``C x H x W`` numpy or torch: the mean probability of the
    cell's class over its pixels) and ``touches_border``. ``red_radius`` as in
    :func:`~bloodseg.count.count_cells`.
    """
    pixel = _check_pixel_size(pixel_size_um)
    counted = count_cells(mask, red_radius=red_radius, return_labels=True)   # checks the mask
    white, red = counted["white_labels"], counted["red_labels"]
    n_white = int(counted["n_white"])
    labels = np.where(red > 0, red + n_white, 0).astype(np.int32)
    labels[white > 0] = white[white > 0]
    # ids that a white cell covered entirely disappear: number the rest 1..n again
    present = np.unique(labels)
    present = present[present > 0]
    if present.size and present[-1] != present.size:
        lookup = np.zeros(int(present[-1]) + 1, np.int32)
        lookup[present] = np.arange(1, present.size + 1, dtype=np.int32)
        labels = lookup[labels]
    n = int(present.size)
    kinds = np.where(present <= n_white, WHITE_CELL, RED_CELL)
    p = _probabilities(probs, labels.shape)
    if n == 0:
        return labels, []
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)
    ys, xs = np.indices(labels.shape)
    cx = np.bincount(flat, weights=xs.ravel(), minlength=n + 1)
    cy = np.bincount(flat, weights=ys.ravel(), minlength=n + 1)
    border = touches_border(labels, n)
    boxes = ndimage.find_objects(labels, max_label=n)
    mean_prob = {}
    if p is not None:
        for cls in (WHITE_CELL, RED_CELL):
            mean_prob[cls] = np.bincount(flat, weights=p[cls].ravel().astype(np.float64), minlength=n + 1)
    rows = []
    for i in range(1, n + 1):
        cls = int(kinds[i - 1])
        a = int(area[i])
        box = boxes[i - 1]
        row = {"id": i, "class": "white" if cls == WHITE_CELL else "red", "area_px": a}
        if pixel is not None:
            row["area_um2"] = round(a * pixel * pixel, 4)
        row.update(centroid_x=round(float(cx[i]) / a, 2), centroid_y=round(float(cy[i]) / a, 2),
                   x0=int(box[1].start), y0=int(box[0].start), x1=int(box[1].stop), y1=int(box[0].stop),
                   equivalent_diameter_px=round(math.sqrt(4 * a / math.pi), 2))
        if p is not None:
            row["mean_probability"] = round(float(mean_prob[cls][i] / a), 4)
        row["touches_border"] = bool(border[i])
        rows.append(row)
    return labels, rows


def _cells_csv(rows) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(INSTANCE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def instance_paths(out_dir, stem: str) -> tuple[Path, Path]:
    """``(<out_dir>/<stem>_instances.png, <out_dir>/<stem>_cells.csv)``."""
    out_dir = Path(out_dir)
    return out_dir / f"{stem}_instances.png", out_dir / f"{stem}_cells.csv"


def write_instances(labels, rows, out_dir, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>_instances.png`` (uint16 labels) and ``<stem>_cells.csv`` atomically; returns both paths."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
        raise DataError(f"{stem}: {int(labels.max())} cells do not fit a 16-bit label image (at most 65535)")
    png, table = instance_paths(out_dir, stem)
    write_image(png, labels.astype(np.uint16))
    write_bytes(table, _cells_csv(rows))
    return png, table


def read_instances(path) -> np.ndarray:
    """Read a ``<stem>_instances.png`` back as int32 ``HxW`` (raises :class:`DataError` if it does not decode)."""
    p = Path(path)
    labels = _decode(_read_bytes(p, "label image"), str(p.absolute()))
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{p.absolute()} is not a label image (16-bit single-channel PNG); got "
                        f"{labels.dtype} {labels.shape}")
    return labels.astype(np.int32)


def write_probabilities(path, probs) -> Path:
    """Write class probabilities ``C x H x W`` as ``probs`` (float16) in a compressed ``.npz``, atomically."""
    p = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    buf = io.BytesIO()
    np.savez_compressed(buf, probs=p.astype(np.float16))
    return write_bytes(path, buf.getvalue())


def read_probabilities(path) -> np.ndarray:
    """The float16 ``C x H x W`` array of a ``<stem>_probs.npz`` (raises :class:`DataError` if unreadable)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return data["probs"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(f"cannot read probabilities from {Path(path).absolute()}: {exc}") from None


def _decodes(path: Path) -> bool:
    """True when an output file of :func:`write_instances`/:func:`write_probabilities` is there and whole."""
    try:
        if path.suffix == ".png":
            read_instances(path)
        elif path.suffix == ".npz":
            read_probabilities(path)
        else:
            head = path.read_bytes()[:64]
            return head.startswith(b"id,class,")
    except (DataError, OSError):
        return False
    return True

