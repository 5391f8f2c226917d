"""Choosing a network's white-cell cleanup on validation photographs, and storing it.

A segmentation network leaves a few false white specks (a platelet, a dark red cell) and holes in
white cells. :func:`bloodseg.postprocess.clean_white_cells` removes white components smaller than
``white_min_area`` px and fills the holes; this module chooses its one number on labelled
photographs that the network will NOT be scored on (the validation split): every area of
:data:`WHITE_AREA_GRID` with holes filled or kept, scored by the pooled gold white-cell IoU of
the photographs as :meth:`~bloodseg.Segmenter.segment` runs them (colour rule, scale rule), from
one pass of the network per photograph. :func:`tune_white_cleanup` is the search, and the
product pipeline (:mod:`bloodseg.shipping`, ``bloodseg tune``) stores its choice in a checkpoint.
"""
from __future__ import annotations

import math
import time

import numpy as np
from scipy import ndimage

from .classes import WHITE_CELL
from .errors import DataError
from .postprocess import clean_white_cells, min_area_at
from .scoring import white_counts, white_scores
from .segmenter import Segmenter

__all__ = ["WHITE_AREA_GRID", "white_components", "tune_white_cleanup", "cleanup_rows"]

#: Candidate ``white_min_area`` values (px of the photograph) :func:`tune_white_cleanup` tries.
WHITE_AREA_GRID = (0, 100, 250, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 7000, 8000, 10000)

_EIGHT = np.ones((3, 3), bool)


def white_components(pred: np.ndarray, truth: np.ndarray) -> dict:
    """The white components (8-connected) of a predicted mask and of its labels: ``{"predicted":
    [[area px, touches a labelled white cell (0/1)], ...], "true_cells": [area px, ...]}``."""
    labels, n = ndimage.label(pred == WHITE_CELL, structure=_EIGHT)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    hits = np.bincount(labels[truth == WHITE_CELL], minlength=n + 1)[1:] > 0
    tl, tn = ndimage.label(truth == WHITE_CELL, structure=_EIGHT)
    return {"predicted": [[int(a), int(h)] for a, h in zip(areas, hits)],
            "true_cells": [int(a) for a in np.bincount(tl.ravel(), minlength=tn + 1)[1:]]}


def _segmenter(model):
    """A Segmenter as it is; a bare network as a Segmenter with the default settings."""
    return model if isinstance(model, Segmenter) else Segmenter(model)


def tune_white_cleanup(model, samples, areas=WHITE_AREA_GRID, fills=(False, True), tile: int = 1024,
                       tta: bool = False, chosen_on: str = "") -> dict:
    """Choose the white-cell cleanup of ``model`` (a :class:`~bloodseg.Segmenter`, or a bare network
    at input_scale 1) on ``samples``, which must NOT be the photographs it will be scored on.

    Every ``(white_min_area, fill_white_holes)`` of ``areas`` x ``fills`` is scored by the gold
    white-cell IoU pooled over all samples. The rule: the fill setting with the highest IoU; then,
    of the areas that reach that IoU exactly (a plateau: every area between the largest false
    speck and the smallest true cell removes the same pixels), the one nearest the plateau's
    geometric middle (the smaller of two equally near), so the choice keeps the widest margin on
    both sides. Areas are px of the photograph at the Segmenter's ``input_scale``; at another
    factor (the automatic scale) they are rescaled as in prediction (:func:`min_area_at`).
    Returns ``{"rows": [{"white_min_area", "fill_white_holes", "iou", "dice", ...}], "raw": argmax
    scores, "chosen": postprocess dict, "plateau": [lo, hi], "components": :func:`white_components`
    of the raw masks pooled, "n_images", "seconds"}``.
    """
    if not samples:
        raise DataError("tune_white_cleanup needs at least one labelled photograph")
    areas = sorted({float(a) for a in areas})
    seg = _segmenter(model).replace(tile=tile)
    t0 = time.perf_counter()
    totals = {(a, f): np.zeros(3, np.int64) for a in areas for f in fills}
    raw = np.zeros(3, np.int64)
    components = {"predicted": [], "true_cells": []}
    for s in samples:
        p = seg.segment(s.image, False, tta, probabilities=True)
        raw += white_counts(p.mask, s.mask)
        for k, v in white_components(p.mask, s.mask).items():
            components[k] += v
        for a in areas:
            spec = {"white_min_area": a, "input_scale": seg.input_scale}
            for f in fills:
                totals[(a, f)] += white_counts(clean_white_cells(p.mask, p.probs, min_area_at(spec, p.factor), f),
                                               s.mask)
    rows = [{"white_min_area": a, "fill_white_holes": f, **white_scores(int(tp), int(fp), int(fn))}
            for (a, f), (tp, fp, fn) in totals.items()]
    best_iou = {f: max(r["iou"] for r in rows if r["fill_white_holes"] == f) for f in fills}
    fill = max(fills, key=lambda f: (best_iou[f], f))
    tied = [r["white_min_area"] for r in rows if r["fill_white_holes"] == fill and r["iou"] >= best_iou[fill] - 1e-12]
    lo, hi = min(tied), max(tied)
    middle = math.sqrt(max(lo, 1.0) * max(hi, 1.0))
    area = min(tied, key=lambda a: (round(abs(math.log(max(a, 1.0) / middle)), 9), a))   # a tie: the smaller
    chosen = {"white_min_area": area, "fill_white_holes": bool(fill), "input_scale": seg.input_scale,
              "chosen_on": chosen_on or f"{len(samples)} labelled photographs", "tuned_iou": round(best_iou[fill], 4)}
    return {"rows": rows, "raw": white_scores(*map(int, raw)), "chosen": chosen, "plateau": [lo, hi],
            "components": components, "n_images": len(samples), "seconds": time.perf_counter() - t0}


def cleanup_rows(model, samples, areas=WHITE_AREA_GRID, fills=(False, True), tile: int = 1024) -> list[dict]:
    """The rows of :func:`tune_white_cleanup` for other photographs (to show, never to choose by)."""
    return tune_white_cleanup(model, samples, areas, fills, tile)["rows"]
