"""Scoring a :class:`~bloodseg.Segmenter` on labelled photographs, whole, as ``bloodseg predict`` runs it.

Every photograph goes through :meth:`Segmenter.segment` (colour rule, scale rule, network,
cleanup), so a score here is the score of what a user gets. What is scored:

* **white cells** against the human masks: true/false positives and false negatives per
  photograph; IoU, Dice, precision and recall **pooled** over the photographs (one sum of pixels,
  the book's convention), each photograph's own IoU, and a 95 % bootstrap interval of the pooled
  IoU over photographs (:func:`pooled_iou_ci`);
* **three classes** (background, white, red) — only where red cells are labelled (BCCD's silver
  red cells, a user's own masks): one confusion matrix over all photographs (PA, CPA, IoU, MIoU).
  Masks that do not label red cells (ALL-IDB2: red cells are "background") get white-cell scores only.

:func:`evaluate_photos` is the function; ``bloodseg evaluate`` and the book's records call it.
A plain function ``image -> mask`` (e.g. the colour baseline) is scored the same way.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from .classes import WHITE_CELL
from .errors import DataError
from .metrics import confusion_matrix, scores

__all__ = ["white_counts", "white_scores", "pooled_iou_ci", "Scorer", "evaluate_photos"]

#: Bootstrap resamples of :func:`pooled_iou_ci`.
N_BOOT = 2000


def white_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[tp, fp, fn]`` of the white-cell pixels of one mask against its truth."""
    pw, tw = np.asarray(pred) == WHITE_CELL, np.asarray(truth) == WHITE_CELL
    return np.array([(pw & tw).sum(), (pw & ~tw).sum(), (~pw & tw).sum()], np.int64)


def white_scores(tp: int, fp: int, fn: int) -> dict:
    """IoU, Dice, precision and recall of white-cell pixel counts (nan where undefined)."""
    iou = tp / (tp + fp + fn) if tp + fp + fn else math.nan
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {"iou": iou, "dice": dice, "precision": tp / (tp + fp) if tp + fp else math.nan,
            "recall": tp / (tp + fn) if tp + fn else math.nan}


def pooled_iou_ci(counts, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> list:
    """95 % percentile interval of the pooled white-cell IoU, photographs resampled with
    replacement (``counts``: one ``[tp, fp, fn]`` row per photograph)."""
    c = np.asarray(counts, np.float64).reshape(-1, 3)
    if len(c) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(c), np.full(len(c), 1.0 / len(c)), size=n_boot).astype(np.float64)
    iou = (w @ c[:, 0]) / np.maximum(w @ c.sum(1), 1.0)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(iou, [tail, 100 - tail])
    return [float(lo), float(hi)]


class Scorer:
    """Sums over photographs: the white-cell counts, one 3-class confusion matrix (when
    ``red_labelled``), a row per photograph and, with ``keep_masks``, the masks."""

    def __init__(self, red_labelled: bool = True, keep_masks: bool = False):
        self.red_labelled, self.keep_masks = red_labelled, keep_masks
        self.cm = torch.zeros(3, 3, dtype=torch.long)
        self.counts, self.rows, self.masks = [], [], []

    def add(self, sample, pred: np.ndarray, **extra) -> None:
        """Score ``pred`` against ``sample.mask``; ``extra`` goes into the photograph's row."""
        if pred.shape != sample.mask.shape:
            raise DataError(f"prediction for {sample.name} is {pred.shape}, its mask {sample.mask.shape}")
        counts = white_counts(pred, sample.mask)
        self.counts.append(counts)
        one = white_scores(*map(int, counts))
        row = {"name": sample.name, "white_iou": one["iou"], "white_dice": one["dice"],
               "counts": [int(v) for v in counts], **extra}
        if self.red_labelled:
            m = confusion_matrix(pred, sample.mask, 3)
            self.cm += m
            row["silver_miou"] = scores(m)["miou"]
        self.rows.append(row)
        if self.keep_masks:
            self.masks.append(pred)

    def result(self, seconds: float) -> dict:
        total = np.sum(self.counts, 0) if self.counts else np.zeros(3, np.int64)
        gold = white_scores(*map(int, total))
        gold["iou_ci"] = pooled_iou_ci(self.counts)
        out = {"gold": gold, "per_image": self.rows, "n_images": len(self.rows), "seconds": seconds,
               "red_labelled": self.red_labelled}
        if self.red_labelled:
            out["silver"] = scores(self.cm)
        if self.keep_masks:
            out["masks"] = self.masks
        return out


def evaluate_photos(segmenter_or_fn, samples, *, red_labelled: bool = True, keep_masks: bool = False,
                    postprocess=None, raw_too: bool = False, tile: int | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Score whole photographs (``samples``: :class:`~bloodseg.io.Sample` s with their masks).

    ``segmenter_or_fn``: a :class:`~bloodseg.Segmenter` (run through
    :meth:`~bloodseg.Segmenter.segment`: its colour rule, scale rule, solver and cleanup;
    ``postprocess`` as in ``predict``) or a function ``image -> mask``. ``red_labelled``: the masks
    label red cells (3-class scores too). ``tile``: the Segmenter's tile side for this run.

    Returns ``{"gold": {iou, dice, precision, recall, iou_ci}, "silver": scores() (only with
    red_labelled), "per_image": [{name, white_iou, white_dice, counts, factor, silver_miou}],
    "n_images", "seconds", "factors"}``; with ``raw_too`` (a Segmenter) the same again under
    ``"raw"`` for the network's argmax alone, from the same pass of the network.
    """
    seg = segmenter_or_fn
    is_segmenter = hasattr(seg, "segment")
    if is_segmenter and tile is not None:
        seg = seg.replace(tile=tile)
    main, raw = Scorer(red_labelled, keep_masks), Scorer(red_labelled, keep_masks)
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        if is_segmenter:
            p = seg.segment(s.image, postprocess, raw=raw_too)
            main.add(s, p.mask, factor=p.factor)
            if raw_too:
                raw.add(s, p.raw, factor=p.factor)
        else:
            main.add(s, seg(s.image))
        if log and (i + 1) % 25 == 0:
            log(f"  {i + 1} photographs scored")
    seconds = time.perf_counter() - t0
    out = main.result(seconds)
    out["factors"] = [r.get("factor") for r in main.rows]
    if raw_too:
        out["raw"] = raw.result(seconds)
    return out
