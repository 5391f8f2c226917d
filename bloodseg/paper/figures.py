"""Figures shared by the chapters: training histories, score bars, prediction grids (paper
Figs. 7-8), per-image scores (Figs. 9-10), goals and simple bars. matplotlib is imported lazily.
"""
from __future__ import annotations

import numpy as np
import torch

from ..classes import colourise_mask
from ..preprocess import clahe_on_luma, image_to_tensor


def _rgb(image_bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_bgr[..., ::-1])


def plot_history(histories: dict, title: str = ""):
    """Loss, validation loss and validation MIoU per epoch for one or more runs."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for label, hist in histories.items():
        ep = [r["epoch"] for r in hist]
        axes[0].plot(ep, [r["loss"] for r in hist], "o-", label=label)
        axes[1].plot(ep, [r["val_loss"] for r in hist], "o-", label=label)
        axes[2].plot(ep, [100 * r["val_miou"] for r in hist], "o-", label=label)
    for ax, name in zip(axes, ("training loss", "validation loss", "validation MIoU (%)")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if len(histories) > 1:
        axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_score_bars(frames: dict, columns=None, title: str = "", ylim=None):
    """Grouped bars: one group per score column, one bar per row of each frame (percent).

    ``frames``: ``{series label: DataFrame indexed by model}`` or a single DataFrame."""
    import matplotlib.pyplot as plt
    import pandas as pd
    if isinstance(frames, pd.DataFrame):
        frames = {"": frames}
    series = [(f"{k} {m}".strip(), df.loc[m]) for k, df in frames.items() for m in df.index]
    columns = columns or [c for c in next(iter(frames.values())).columns if c.endswith("(%)")]
    x = np.arange(len(columns))
    w = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(columns) + 0.3 * len(series)), 3.6))
    for i, (label, row) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [row[c] for c in columns], w, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace(" (%)", "") for c in columns], fontsize=9)
    ax.set_ylabel("%")
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def predict_masks(model, samples) -> list[np.ndarray]:
    """Argmax masks of ``model`` for ``samples`` (one at a time, CLAHE as in training)."""
    model = model.eval()
    with torch.inference_mode():
        return [model(image_to_tensor(s.image)[None]).argmax(1)[0].numpy().astype(np.uint8) for s in samples]


def prediction_grid(samples, predictions: dict, height: float = 2.2):
    """The paper's Fig. 7/8: per sample, original, CLAHE, label, then one column per model."""
    import matplotlib.pyplot as plt
    cols = ["original", "CLAHE (Y of YUV)", "label"] + list(predictions)
    fig, axes = plt.subplots(len(samples), len(cols), figsize=(height * len(cols), height * len(samples)),
                             squeeze=False)
    for i, s in enumerate(samples):
        panels = [_rgb(s.image), _rgb(clahe_on_luma(s.image)), _rgb(colourise_mask(s.mask))]
        panels += [_rgb(colourise_mask(predictions[k][i])) for k in predictions]
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(cols[j], fontsize=9)
    fig.tight_layout()
    return fig


def plot_per_image(results: dict, labels=None):
    """Paper Figs. 9–10: PA and MIoU of every test image, one line per model."""
    import matplotlib.pyplot as plt
    labels = labels or list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    for label in labels:
        per = results[label]["per_image"]
        idx = np.arange(1, len(per) + 1)
        axes[0].plot(idx, [100 * s["pa"] for s in per], "o-", ms=3, label=label)
        axes[1].plot(idx, [100 * s["miou"] for s in per], "o-", ms=3, label=label)
    for ax, name in zip(axes, ("PA (%) per test image (paper Fig. 9)", "MIoU (%) per test image (paper Fig. 10)")):
        ax.set_xlabel("test image")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_goals(goals: list[dict]):
    """One small panel per goal: the measured value as a bar, the goal as a red line."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(goals), figsize=(3.8 * len(goals), 3.2), squeeze=False)
    for ax, g in zip(axes[0], goals):
        ax.bar([0], [g["measured"]], color="#1a7f37" if g["met"] else "#cf222e", width=0.5)
        ax.axhline(g["goal_value"], color="red", ls="--", label="goal")
        ax.set_xticks([])
        ax.set_title(g["goal"], fontsize=8, wrap=True)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlabel("met" if g["met"] else "missed")
    fig.tight_layout()
    return fig


def plot_bars(labels, values, ylabel: str, title: str = "", ref: float | None = None, ref_label: str = ""):
    """One simple bar chart (used for memory, levers and parameter tables)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.4))
    vals = [float("nan") if v is None else v for v in values]
    ax.bar(range(len(labels)), vals, color=[f"C{i % 10}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ref is not None:
        ax.axhline(ref, color="red", ls="--", label=ref_label)
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
