"""Segmentation scores from one confusion matrix: PA, CPA, MIoU (paper §4.2, Tables 1–2).

Everything starts from a confusion matrix ``cm`` (rows = truth, columns = prediction) with
``cm[i, j]`` = number of pixels of true class i predicted as class j. For class c,
TP = cm[c, c], FP = column sum − TP, FN = row sum − TP.

* PA, pixel accuracy = trace / total.
* CPA, class pixel accuracy, per class = TP / (TP + FP), i.e. the *precision* of class c: of the
  pixels predicted as c, the fraction that are c. This is the usual "CPA" of the Chinese
  segmentation literature that the authors follow (its mean is the "MPA"); the recall
  TP / (TP + FN) is returned as well, under ``recall``, for readers who expect the other reading.
* IoU per class = TP / (TP + FP + FN); MIoU = their mean over classes. A class absent from both the
  truth and the prediction has 0/0 = nan and is skipped by the mean (a nan-mean), so a test set
  without white cells is not punished for correctly predicting none.

Dataset-level scores are computed, as in the paper, from ONE matrix accumulated over all test
images (:class:`ConfusionMatrix`), not as a mean of per-image scores. :func:`per_image_scores` gives
the per-image numbers of the paper's Figures 9–10.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .classes import CLASS_NAMES
from .errors import DataError

__all__ = ["CLASS_NAMES", "confusion_matrix", "ConfusionMatrix", "scores", "per_image_scores"]



def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if torch.is_tensor(x):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception:
        raise DataError(f"{what} must be a tensor or an array, got {type(x).__name__}") from None


def _labels(pred_or_logits, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A label map shaped like ``target``: logits/probabilities (one more axis, the class axis 1,
    or axis 0 for a single image) are reduced with argmax; integer labels pass through."""
    pred = _as_tensor(pred_or_logits, "prediction")
    if pred.dim() == target.dim() + 1:
        if pred.dim() >= 2 and pred.shape[1] == num_classes and pred.shape[:1] + pred.shape[2:] == target.shape:
            return pred.argmax(dim=1)
        if pred.shape[0] == num_classes and pred.shape[1:] == target.shape:
            return pred.argmax(dim=0)
    if pred.is_floating_point():
        if pred.shape == target.shape and torch.all(pred == pred.round()):
            return pred.long()
        raise DataError(
            f"got floating-point predictions of shape {tuple(pred.shape)} for targets of shape "
            f"{tuple(target.shape)}: pass logits N x {num_classes} x H x W (they are argmax-ed) or "
            "integer label maps shaped like the targets")
    return pred


def confusion_matrix(pred, target, num_classes: int = 3, ignore_index: int | None = None) -> torch.Tensor:
    """``num_classes x num_classes`` int64 matrix, rows = truth, columns = prediction.

    ``pred``: integer labels shaped like ``target`` (any batch shape), or logits with a class axis
    (``N x C x H x W`` for targets ``N x H x W``, or ``C x H x W`` for ``H x W``), which are
    argmax-ed. Tensors or numpy arrays. Pixels whose target equals ``ignore_index`` are left out;
    any other label outside ``0..num_classes-1`` is an error.
    """
    target_t = _as_tensor(target, "target")
    if target_t.is_floating_point():
        if not torch.all(target_t == target_t.round()):
            raise DataError("target must hold integer class labels, got non-integer values")
    target_t = target_t.long()
    pred_t = _labels(pred, target_t, num_classes).long().to(target_t.device)
    if pred_t.shape != target_t.shape:
        raise DataError(
            f"prediction shape {tuple(pred_t.shape)} does not match target shape {tuple(target_t.shape)}")
    pred_t, target_t = pred_t.reshape(-1), target_t.reshape(-1)
    if ignore_index is not None:
        keep = target_t != ignore_index
        pred_t, target_t = pred_t[keep], target_t[keep]
    for what, t in (("target", target_t), ("prediction", pred_t)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise DataError(
                f"{what} labels must lie in 0..{num_classes - 1} (0 background, 1 white cell, 2 red "
                f"cell); found values from {int(t.min())} to {int(t.max())}. Pass ignore_index= for a "
                "'don't care' label.")
    counts = torch.bincount(target_t * num_classes + pred_t, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


class ConfusionMatrix:
    """Accumulates one confusion matrix over a whole data set (the paper's test-set scores).

    >>> cm = ConfusionMatrix(3)
    >>> for images, masks in loader:          # doctest: +SKIP
    ...     cm.update(model(images), masks)   # logits are argmax-ed
    >>> scores(cm.compute())                  # doctest: +SKIP
    """

    def __init__(self, num_classes: int = 3, ignore_index: int | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, logits_or_pred, target) -> "ConfusionMatrix":
        self.matrix += confusion_matrix(logits_or_pred, target, self.num_classes, self.ignore_index)
        return self

    def compute(self) -> torch.Tensor:
        """A copy of the accumulated matrix (rows = truth, columns = prediction)."""
        return self.matrix.clone()

    def scores(self) -> dict:
        """:func:`scores` of the accumulated matrix."""
        return scores(self.matrix)

    def reset(self) -> None:
        self.matrix.zero_()


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def scores(cm) -> dict:
    """PA, CPA (= precision), recall, IoU and MIoU from a confusion matrix (see module docstring).

    Returns ``dict(pa, cpa, recall, iou, miou)`` with floats in [0, 1] (nan where undefined):
    ``cpa``, ``recall`` and ``iou`` are lists indexed by class.
    """
    m = _as_tensor(cm, "confusion matrix").to(torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise DataError(f"a confusion matrix must be square, got shape {tuple(m.shape)}")
    tp = torch.diagonal(m)
    predicted = m.sum(dim=0)  # TP + FP
    actual = m.sum(dim=1)     # TP + FN
    total = float(m.sum())
    cpa = [_ratio(float(a), float(b)) for a, b in zip(tp, predicted)]
    recall = [_ratio(float(a), float(b)) for a, b in zip(tp, actual)]
    iou = [_ratio(float(a), float(p + t - a)) for a, p, t in zip(tp, predicted, actual)]
    return dict(pa=_ratio(float(tp.sum()), total), cpa=cpa, recall=recall, iou=iou, miou=_nanmean(iou))


def per_image_scores(preds: Iterable, targets: Iterable, num_classes: int = 3) -> list[dict]:
    """:func:`scores` of each image on its own (paper Figures 9–10: PA and MIoU per test image),
    with the image's confusion matrix as ``cm`` (nested lists), so that pooled scores of any set of
    images (a bootstrap resample, say) are sums of these.

    ``preds`` and ``targets`` are sequences of equal length (or batched tensors/arrays, iterated
    along the first axis): label maps, or logits ``C x H x W`` which are argmax-ed.
    """
    preds, targets = list(preds), list(targets)
    if len(preds) != len(targets):
        raise DataError(f"got {len(preds)} predictions for {len(targets)} targets")
    out = []
    for p, t in zip(preds, targets):
        cm = confusion_matrix(p, t, num_classes)
        out.append({**scores(cm), "cm": cm.tolist()})     # the counts too: pooled scores over any subset
    return out
