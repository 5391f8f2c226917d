"""The figures of the chapter "Making ODE-blocks cheap", drawn from its records
(:mod:`bloodseg.paper.speed`, :mod:`bloodseg.paper.blocks`, :mod:`bloodseg.paper.solvers`,
:mod:`bloodseg.paper.regularise`). The other chapters' figures are :mod:`bloodseg.paper.figures`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .blocks import model_name
from .solvers import cross_frame
from .units import GOAL_RATIO

__all__ = ["plot_frontier", "plot_flow", "plot_calibration", "plot_solvers", "plot_macs", "plot_floor", "plot_cross",
           "plot_regularisation"]

def _short(option: str) -> str:
    return (option.replace("nodes-unet", "NODEs").replace("ode-unet-", "ODE-").replace("resunet", "ResUNet")
            .replace("unet", "U-Net").replace("regularised", "RNODE"))


def _plain_ticks(ax, axis: str = "both") -> None:
    """Log axes labelled 2, 3, 5, 10 instead of 2x10^0 (readable at the book's size)."""
    import math as _math

    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lead = round(v / 10 ** _math.floor(_math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if lead in (2, 5) else ""

    for which in ("x", "y") if axis == "both" else (axis,):
        a = ax.xaxis if which == "x" else ax.yaxis
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.set_minor_formatter(FuncFormatter(minor))


_VARIANT_MARKERS = {"torchode": "X", "unrolled": "P", "channels_last": "v", "compiled": "^"}


def plot_frontier(record: dict, ax=None):
    """Every option of the bench: time over the U-Net's in the same runtime (an ONNX option over the
    ONNX U-Net; median and 95% interval over rounds; log axis) against test MIoU, with issue #16's
    goal (1.3x the U-Net) as a line. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8.4, 4.6))
    for i, r in enumerate(record["rows"]):
        x, y = r.get("ratio_same_runtime", r["ratio_to_unet"]), 100 * r["test_miou"]
        lo, hi = r.get("ratio_same_runtime_ci", r["ratio_ci"])
        colour = "k" if r["nfe_total"] == 0 else "C3" if r["solver"] == "trained" else "C2"
        marker = ("s" if r["runtime"] == "onnxruntime" else "D" if r.get("ode_reg") is not None else
                  _VARIANT_MARKERS.get(r.get("variant"), "o"))
        if r.get("variant"):    # hollow, no interval (the variants' table has it): beside its base, legible
            ax.plot([x], [y], marker, mfc="none", mec=colour, ms=10, mew=1.6)
        else:
            ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt=marker, color=colour, ms=6, capsize=3, lw=1)
        if r["option"] != "unet onnx" and not r.get("variant"):   # a variant: its marker, beside its base
            text = "U-Net (PyTorch and ONNX)" if r["option"] == "unet" else _short(r["option"])
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 6 - 18 * (i % 2)), fontsize=8)
    ax.axvline(GOAL_RATIO, color="C0", ls="--", lw=1, label=f"goal: {GOAL_RATIO}x the U-Net's time")
    ax.set_xscale("log")
    _plain_ticks(ax, "x")
    ax.set_xlabel("inference time / U-Net's in the same runtime and round (log scale)")
    ax.set_ylabel("test MIoU (%)")
    ax.set_title("The frontier: black = no ODE-block, red = dopri5 (trained tolerances), green = calibrated "
                 "fixed grid;\nsquare = ONNX, diamond = 6-epoch regularisation pair; hollow: the same weights by torchode (x), "
                 "an unrolled loop (+),\nin channels_last (v) or compiled (^), against the U-Net run the same way", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    return fig


def plot_flow(record: dict, models: Sequence[str] | None = None):
    """Left: ||f||/||h|| along the trajectory for every block of the chosen models; right: how far
    one Euler step lands from the solution (euler_diff), per block. Returns the figure."""
    import matplotlib.pyplot as plt
    ms = [m for m in record["models"] if models is None or model_name(m) in models or m["model"] in models]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names, diffs, colours = [], [], []
    for j, m in enumerate(ms):
        for b in m["blocks"]:
            ts = [float(t) for t in b["f_ratio"]]
            axes[0].plot(ts, list(b["f_ratio"].values()), "o-", color=f"C{j % 10}", lw=1, ms=3,
                         label=model_name(m) if b is m["blocks"][0] else None)
            names.append(f"{_short(model_name(m))} {b['name'].replace('ODE-block at position ', 'p')}")
            diffs.append(b["euler_diff"])
            colours.append(f"C{j % 10}")
    axes[0].set_yscale("log")
    _plain_ticks(axes[0], "y")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("||f(t, h)|| / ||h||")
    axes[0].set_title("How fast each block's state moves", fontsize=10)
    axes[0].set_ylim(0.06, None)
    axes[0].legend(fontsize=7, ncol=2, loc="lower left")
    axes[0].grid(alpha=0.3)
    axes[1].barh(range(len(diffs)), diffs, color=colours)
    axes[1].set_yticks(range(len(diffs)), names, fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set_xscale("log")
    _plain_ticks(axes[1], "x")
    axes[1].set_xlabel("||h(1) - Euler step|| / ||h(1)||")
    axes[1].set_title("One Euler step against the dopri5 solution", fontsize=10)
    axes[1].grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_calibration(cal: dict, title: str = "", ax=None):
    """A calibration: validation MIoU drop (pp) against f-evaluations per forward for every
    solver, with the allowed drop and the pick marked. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7.5, 3.4))
    groups: dict = {}
    for r in cal["rows"]:
        if r.get("drop_pp") is None:
            continue
        picked = r["label"] == cal.get("pick_label")
        ax.plot(r["nfe_total"], r["drop_pp"], "o" if r["label"] != "trained" else "s",
                color="C2" if picked else "C3" if r["label"] == "trained" else "C0", ms=8 if picked else 5)
        groups.setdefault(round(r["nfe_total"], 1), []).append(r)
    for k, (nfe, rs) in enumerate(sorted(groups.items())):
        ax.annotate("\n".join(r["label"] for r in rs), (nfe, max(r["drop_pp"] for r in rs)), textcoords="offset points",
                    xytext=(0, 8), ha="center", va="bottom", fontsize=7)
    ax.axhline(cal.get("max_drop_pp", 0.3), color="C1", ls="--", lw=1, label=f"allowed drop {cal.get('max_drop_pp', 0.3):g} pp")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log")
    _plain_ticks(ax, "x")
    ax.set_xlabel("f-evaluations per forward, all blocks (log)")
    ax.set_ylabel("validation MIoU drop (pp)")
    ax.set_title(title or f"calibration: pick {cal.get('pick_label')} (large marker)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_solvers(record: dict):
    """The solver experiment: test MIoU, forward NFE, seconds per training step and ms per image,
    one bar per trained arm (seeds as points). Returns the figure."""
    import matplotlib.pyplot as plt
    arms = record["arms"]
    fig, axes = plt.subplots(1, 4, figsize=(10, 3.0))
    for ax, key, scale, label in ((axes[0], "test_miou", 100, "test MIoU (%)"), (axes[1], "nfe_total", 1, "forward NFE"),
                                  (axes[2], "train_step_s", 1, "s / training step"),
                                  (axes[3], "time_per_image_s", 1000, "ms / test patch")):
        for i, arm in enumerate(arms):
            vals = [scale * r[key] for r in record["rows"] if r["arm"] == arm and r.get(key) is not None]
            if vals:
                ax.bar(i, np.mean(vals), color=f"C{i}", alpha=0.7)
                ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    lo = min(100 * r["test_miou"] for r in record["rows"])
    axes[0].set_ylim(max(0, lo - 5), 100)
    fig.suptitle(f"{record['model']} trained with each solver (points: seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_macs(rows: list[dict], ax=None):
    """Stacked bars: MACs of the backbone and of the ODE-blocks (NFE x cost of f) per option, with
    the U-Net's total and 1.3x it as lines. ``rows``: bench rows (``mmacs``, ``backbone_mmacs``)."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(9, 3.4))
    labels = [_short(r["option"]) for r in rows]
    back = [r["backbone_mmacs"] for r in rows]
    ode = [r["mmacs"] - r["backbone_mmacs"] for r in rows]
    x = np.arange(len(rows))
    ax.bar(x, back, color="C7", label="backbone (everything outside the ODE-blocks)")
    ax.bar(x, ode, bottom=back, color="C3", label="ODE-blocks: NFE x MACs of f")
    unet = next((r["mmacs"] for r in rows if r["option"] == "unet"), None)
    if unet:
        ax.axhline(unet, color="k", lw=1, label="U-Net")
        ax.axhline(GOAL_RATIO * unet, color="C0", ls="--", lw=1, label=f"{GOAL_RATIO}x U-Net")
    ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("million MACs per patch")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_floor(floor: dict, bench: dict | None = None, ax=None):
    """MACs over the U-Net's against the total forward NFE (the floor, a line), with the bench's
    measured time ratios of the NODEs-UNet options as points, and the 1.3x goal."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3.6))
    n = np.geomspace(1, 100, 60)
    mean_f = float(np.mean(list(floor["f_mmacs_per_eval"].values())))
    ax.plot(n, (floor["backbone_mmacs"] + n * mean_f) / floor["unet_mmacs"], "k-", lw=1.5,
            label="MACs / U-Net MACs (the arithmetic floor)")
    if bench:
        for r in bench["rows"]:
            if r["nfe_total"] > 0 and not r.get("variant"):      # the networks with ODE-blocks
                y = r.get("ratio_same_runtime", r["ratio_to_unet"])
                pair = r.get("ode_reg") is not None
                ax.plot(r["nfe_total"], y, "s" if r["runtime"] == "onnxruntime" else "D" if pair else "o",
                        color="C2" if r.get("calibrated") else "C3", ms=6)
                if not pair:
                    right = r["nfe_total"] < 10
                    ax.annotate(_short(r["option"]), (r["nfe_total"], y), textcoords="offset points",
                                xytext=(6 if right else -6, 4 if r["runtime"] == "torch" else -10), fontsize=7,
                                ha="left" if right else "right")
    ax.axhline(GOAL_RATIO, color="C0", ls="--", lw=1, label=f"goal {GOAL_RATIO}x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax)
    ax.set_xlabel("forward NFE, all blocks together (log)")
    ax.set_ylabel("cost / U-Net's (log)")
    ax.set_title(f"Width {floor['width']}, {floor['size']} px. Points: measured time / U-Net's in the same runtime "
                 "(red dopri5, green fixed grid, square ONNX)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_cross(record: dict, ax=None):
    """The cross table as a heat map (test MIoU, %), trained solver down, test-time solver across."""
    import matplotlib.pyplot as plt
    table = cross_frame(record)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.6, 3.4))
    values = 100 * table.to_numpy(dtype=float)
    im = ax.imshow(values, cmap="viridis", vmin=np.floor(np.nanmin(values)) - 2, vmax=np.ceil(np.nanmax(values)) + 2)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, "fail" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}", ha="center", va="center",
                    color="w" if np.isnan(values[i, j]) or values[i, j] < np.nanmean(values) + 1 else "k", fontsize=9)
    ax.set_xticks(range(len(table.columns)), table.columns, fontsize=8)
    ax.set_yticks(range(len(table.index)), table.index, fontsize=8)
    ax.set_xlabel("solved at test time with")
    ax.set_ylabel("trained with")
    ax.set_title("test MIoU (%)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def plot_regularisation(record: dict):
    """The RNODE record: NFE per training step and test MIoU, plain against regularised, per seed."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, arm in enumerate(("plain", "regularised")):
        per = record["summary"][arm]["per_seed"]
        axes[0].plot([p["seed"] for p in per], [p["nfe_train_step"] for p in per], "o-", color=f"C{i}", label=arm)
        axes[1].plot([p["seed"] for p in per], [100 * p["test_miou"] for p in per], "o-", color=f"C{i}", label=arm)
    axes[0].set_ylabel("forward NFE per training step (last epoch)")
    axes[1].set_ylabel("test MIoU (%)")
    for ax in axes:
        ax.set_xlabel("seed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

