"""Measurements behind chapter 3 of the book (data and preprocessing): luma histograms and contrast,
CLAHE, galleries of photographs with their masks, class balance of the splits, and the colour
baseline's scores. Each function returns plain rows or a figure (matplotlib imported lazily).

:func:`luma_histogram`, :func:`luma_contrast`, :func:`clahe_contrast`, :func:`plot_clahe`,
:func:`plot_pairs`, :func:`plot_gallery`, :func:`class_fractions`, :func:`split_balance`,
:func:`plot_split_balance`, :func:`baseline_scores`.
"""
from __future__ import annotations

import math

import numpy as np

from ..classes import CLASS_NAMES, PALETTE_BGR, colourise_mask, overlay
from ..errors import BloodsegError
from ..metrics import ConfusionMatrix, confusion_matrix, scores
from ..preprocess import clahe_on_luma
from ..synthetic import colour_threshold_baseline

__all__ = ["luma_histogram", "luma_contrast", "clahe_contrast", "plot_clahe", "plot_pairs", "plot_gallery",
           "class_fractions", "split_balance", "plot_split_balance", "baseline_scores"]


def luma_histogram(image_bgr: np.ndarray) -> np.ndarray:
    """256-bin histogram (fractions of pixels) of the Y (luma) channel of a BGR uint8 image."""
    import cv2

    y = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2YUV)[..., 0]
    return np.bincount(y.ravel(), minlength=256).astype(np.float64) / y.size


def luma_contrast(image_bgr: np.ndarray) -> float:
    """RMS contrast of a BGR uint8 image: the standard deviation of its luma (Y of YUV, 0-255)."""
    hist = luma_histogram(image_bgr)
    bins = np.arange(256)
    mean = float((bins * hist).sum())
    return float(np.sqrt(((bins - mean) ** 2 * hist).sum()))


def clahe_contrast(images: dict, clip_limit: float = 2.0, tile_grid=(8, 8)) -> dict:
    """Luma contrast (:func:`luma_contrast`) of each image before and after :func:`~bloodseg.clahe_on_luma`.

    ``images`` maps a name to a BGR uint8 image. Returns ``dict(contrast_before, contrast_after,
    measure, clip_limit, tile_grid, images)``: the two contrasts averaged over the images, and
    ``images``, one row ``dict(image, contrast_before, contrast_after, ratio)`` per image.
    """

    if not images:
        raise BloodsegError("clahe_contrast needs at least one image")
    rows = []
    for name, image in images.items():
        before = luma_contrast(image)
        after = luma_contrast(clahe_on_luma(image, clip_limit=clip_limit, tile_grid=tuple(tile_grid)))
        rows.append(dict(image=str(name), contrast_before=before, contrast_after=after,
                         ratio=after / before if before > 0 else math.inf))
    return dict(contrast_before=float(np.mean([r["contrast_before"] for r in rows])),
                contrast_after=float(np.mean([r["contrast_after"] for r in rows])),
                measure="standard deviation of the luma (Y of YUV, 0-255), mean over the images",
                clip_limit=float(clip_limit), tile_grid=[int(t) for t in tile_grid], images=rows)


def _rgb(image_bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_bgr[..., ::-1])


def plot_clahe(image_bgr: np.ndarray, clip_limit: float = 2.0, tile_grid=(8, 8), fig=None, title: str = ""):
    """Figure: the image before and after :func:`~bloodseg.clahe_on_luma`, and both luma histograms.

    Returns the matplotlib figure (drawn into ``fig`` when given, for an interactive explorer).
    """
    import matplotlib.pyplot as plt


    after = clahe_on_luma(image_bgr, clip_limit=clip_limit, tile_grid=tuple(tile_grid))
    if fig is None:
        fig = plt.figure(figsize=(11, 3.2))
    fig.clear()
    axes = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1, 1, 1.1]))
    axes[0].imshow(_rgb(image_bgr))
    axes[0].set_title("original")
    axes[1].imshow(_rgb(after))
    axes[1].set_title(f"CLAHE on Y (clip {clip_limit:g}, tiles {tile_grid[0]}x{tile_grid[1]})")
    for ax in axes[:2]:
        ax.axis("off")
    bins = np.arange(256)
    axes[2].fill_between(bins, luma_histogram(image_bgr), step="mid", alpha=0.5, label="original")
    axes[2].fill_between(bins, luma_histogram(after), step="mid", alpha=0.5, label="after CLAHE")
    axes[2].set_xlabel("luma Y (0-255)")
    axes[2].set_ylabel("fraction of pixels")
    axes[2].legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_pairs(rows, titles=None, overlay_alpha: float | None = None, height: float = 2.6):
    """A grid with one row per ``(image BGR, mask)`` pair: the image and its colourised mask
    (and, with ``overlay_alpha``, the mask tinted over the image). Returns the figure."""
    import matplotlib.pyplot as plt


    rows = list(rows)
    ncol = 3 if overlay_alpha else 2
    first = rows[0][0]
    aspect = first.shape[1] / first.shape[0]
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * height * aspect, len(rows) * height),
                             squeeze=False)
    for i, (image, mask) in enumerate(rows):
        panels = [_rgb(image), _rgb(colourise_mask(mask))]
        names = ["image", "mask"]
        if overlay_alpha:
            panels.append(_rgb(overlay(image, mask, overlay_alpha)))
            names.append("overlay")
        for j, (panel, name) in enumerate(zip(panels, names)):
            axes[i, j].imshow(panel)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            label = f"{titles[i]}: {name}" if titles else name
            axes[i, j].set_title(label, fontsize=9)
    fig.tight_layout()
    return fig


def plot_gallery(samples, titles=None, height: float = 1.9):
    """Samples (or ``(image, mask)`` pairs) side by side: images on the top row, masks below."""
    import matplotlib.pyplot as plt


    samples = list(samples)
    fig, axes = plt.subplots(2, len(samples), figsize=(len(samples) * height, 2 * height), squeeze=False)
    for j, item in enumerate(samples):
        image, mask = (item.image, item.mask) if hasattr(item, "mask") else item
        axes[0, j].imshow(_rgb(image))
        axes[1, j].imshow(_rgb(colourise_mask(mask)))
        if titles:
            axes[0, j].set_title(titles[j], fontsize=8)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("mask")
    fig.tight_layout()
    return fig


def class_fractions(masks) -> np.ndarray:
    """Fractions of background, white-cell and red-cell pixels over masks (or Samples)."""
    counts = np.zeros(3, np.int64)
    for m in masks:
        m = getattr(m, "mask", m)
        counts += np.bincount(np.asarray(m).ravel(), minlength=3)[:3]
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def split_balance(splits: dict) -> list[dict]:
    """One row per split: ``split``, ``samples``, ``sources``, ``pixels`` and the three class fractions."""

    rows = []
    for name, samples in splits.items():
        frac = class_fractions(samples)
        row = dict(split=name, samples=len(samples), sources=len({s.source for s in samples}),
                   pixels=int(sum(s.mask.size for s in samples)))
        row.update({cls: float(f) for cls, f in zip(CLASS_NAMES, frac)})
        rows.append(row)
    return rows


def plot_split_balance(rows: list[dict], title: str = ""):
    """Grouped bar chart of :func:`split_balance` rows (class fractions per split)."""
    import matplotlib.pyplot as plt


    colours = [tuple(c / 255 for c in PALETTE_BGR[i][::-1]) for i in range(3)]
    colours[0] = (0.6, 0.6, 0.6)   # black bars are hard to read: grey for background
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.26
    for k, (cls, colour) in enumerate(zip(CLASS_NAMES, colours)):
        xs = np.arange(len(rows)) + (k - 1) * width
        ax.bar(xs, [r[cls] for r in rows], width, label=cls, color=colour)
    ax.set_xticks(np.arange(len(rows)), [f"{r['split']}\n({r['samples']} patches)" for r in rows])
    ax.set_ylabel("fraction of pixels")
    top = max(max(r[c] for c in CLASS_NAMES) for r in rows) if rows else 1.0
    ax.set_ylim(0, 1.3 * top)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def baseline_scores(pairs) -> dict:
    """Scores (:func:`bloodseg.metrics.scores`) of :func:`~bloodseg.colour_threshold_baseline` on
    ``(image BGR, mask)`` pairs (or Samples), from one confusion matrix over all of them, plus
    ``per_image_miou``."""

    cm = ConfusionMatrix(3)
    per_image = []
    for item in pairs:
        image, mask = (item.image, item.mask) if hasattr(item, "mask") else item
        pred = colour_threshold_baseline(image)
        cm.update(pred, mask)
        per_image.append(scores(confusion_matrix(pred, mask))["miou"])
    out = cm.scores()
    out["per_image_miou"] = per_image
    return out
