"""The recorded scales in the chapters: tables and figures read from ``bloodseg reproduce`` records.

Chapters 4-6 train a light live demonstration and show the ``study`` (and, when it has been run on a
GPU host, the ``full``) scale from its records, each table labelled with its provenance
(:func:`bloodseg.paper.claims.source_line`). Nothing here trains: a chapter calls these functions on
records that ``bloodseg reproduce EXPERIMENT --scale SCALE`` wrote.

* :func:`scales_recorded` — which scales have records for an experiment;
* :func:`table_frame` / :func:`plot_table` — MIoU per model over seeds and the paired difference to
  the U-Net, with intervals and verdicts, next to the paper's numbers;
* :func:`plot_convergence` — the validation loss of every unit (did it settle?);
* :func:`seeds_frame` / :func:`plot_seeds` — the same paired differences from the first ``n`` seeds
  only, next to all of them: how far an interval from few seeds can be trusted;
* :func:`timing_frame` / :func:`plot_timing` — inference time relative to the U-Net, side by side;
* :func:`tolerance_frame` — the test-time tolerance curve over seeds; :func:`adjoint_frame`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BloodsegError
from ..registry import VARIANTS, variant
from . import stats
from .claims import source_line
from .reference import PAPER_TABLE1, PAPER_TABLE2
from .report import RESULTS_DIR
from .reproduce import convergence, load_records, summarize

#: The tables' order of the models: the two baselines, then the networks with ODE-blocks, by their
#: model names in :data:`bloodseg.registry.VARIANTS` (a variant such as ``nodes-unet-h16`` sorts
#: after its model, by label).
ORDER = ["unet", "resunet", *[k for k, v in VARIANTS.items() if v.model == k and k not in ("unet", "resunet")]]


def scales_recorded(experiment: str) -> list[str]:
    """The scales (``full``, ``study``, ``quick``) with at least one record of ``experiment``."""
    return [s for s in ("full", "study", "quick")
            if (Path(RESULTS_DIR) / experiment / s).is_dir() and any((Path(RESULTS_DIR) / experiment / s).glob("*.json"))]


def records(experiment: str, scale: str) -> list[dict]:
    return load_records(Path(RESULTS_DIR) / experiment / scale)


def provenance(experiment: str, scale: str) -> str:
    """``experiment (scale): <source line>; recipe: <describe>``, for the caption of a table."""
    from ..recipe import Recipe
    recs = records(experiment, scale)
    recipe = Recipe.from_dict(recs[0]["recipe"]).describe() if recs and recs[0].get("recipe") else "-"
    commands = list(dict.fromkeys(r["command"] for r in sorted(recs, key=lambda r: r["date"])))
    said = "; ".join(f"`{c}`" for c in commands)
    return f"{experiment} at scale {source_line(scale, recs)} (newest record); command{'s' if len(commands) > 1 else ''} {said}; {recipe}"


def _key(label: str):
    try:
        base = variant(label).model
    except BloodsegError:         # not a network (e.g. the timing unit)
        base = label
    return (ORDER.index(base) if base in ORDER else len(ORDER), label)


def table_frame(experiment: str, scale: str) -> pd.DataFrame:
    """Per model: seeds, settled units, test MIoU (mean and 95% CI over seeds and images), the paired
    MIoU difference to the U-Net with its CI and verdict, and the paper's MIoU and difference."""
    rows = summarize(records(experiment, scale))
    paper_table = PAPER_TABLE1 if experiment == "table1" else PAPER_TABLE2    # the paper's two U-Net rows differ
    paper_unet = paper_table["unet"]["miou"]
    out = []
    for r in sorted(rows, key=lambda r: _key(r["model"])):
        p = paper_table.get(r["model"], {}).get("miou")
        out.append({"model": r["model"], "seeds": r["n_seeds"], "settled": r.get("converged", 0),
                    "MIoU %": r["miou"], "CI low": r["miou_ci"][0], "CI high": r["miou_ci"][1],
                    "seed range pp": r["seed_range"],
                    "vs U-Net pp": r.get("diff", np.nan),
                    "diff CI": (f"({r['diff_ci'][0]:+.2f}, {r['diff_ci'][1]:+.2f})" if "diff_ci" in r else "-"),
                    "verdict": r.get("verdict", "-"),
                    "paper MIoU %": p if p is not None else np.nan,
                    "paper vs U-Net pp": (p - paper_unet) if p is not None and r["model"] != "unet" else np.nan})
    return pd.DataFrame(out).set_index("model")


def plot_table(experiment: str, scale: str, title: str | None = None):
    """Left: each model's MIoU per seed (dots) and mean with 95% CI. Right: the paired difference
    to the U-Net with its CI (coloured by verdict) and the paper's difference (grey diamond)."""
    import matplotlib.pyplot as plt
    from .claims import COLOURS
    recs = [r for r in records(experiment, scale) if "per_image" in r]
    frame = table_frame(experiment, scale)
    labels = list(frame.index)
    y = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.42 * len(labels) + 1.6), sharey=True)
    ax = axes[0]
    for i, lab in enumerate(labels):
        seeds = [100 * r["test"]["miou"] for r in recs if r["label"] == lab]
        ax.plot(seeds, [i] * len(seeds), "o", color="#8c959f", ms=4, label="one seed" if i == 0 else None)
        row = frame.loc[lab]
        ax.errorbar(row["MIoU %"], i, xerr=[[row["MIoU %"] - row["CI low"]], [row["CI high"] - row["MIoU %"]]],
                    fmt="D", color="C0", capsize=3, label="mean, 95% CI" if i == 0 else None)
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("test MIoU (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax = axes[1]
    for i, lab in enumerate(labels):
        row = frame.loc[lab]
        if np.isfinite(row["paper vs U-Net pp"]):
            ax.plot(row["paper vs U-Net pp"], i, "D", color="#6e7781", label="paper" if i == 1 else None)
        if np.isfinite(row["vs U-Net pp"]):
            lo, hi = (float(x) for x in row["diff CI"].strip("()").split(","))
            ax.errorbar(row["vs U-Net pp"], i, xerr=[[row["vs U-Net pp"] - lo], [hi - row["vs U-Net pp"]]], fmt="o",
                        color=COLOURS.get(row["verdict"], "C1"), capsize=3, label="ours, 95% CI" if i == 1 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("MIoU minus the U-Net's (pp); colour = verdict")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title or f"{experiment}, {scale} scale (recorded)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_convergence(experiment: str, scale: str):
    """Validation loss per epoch of every recorded unit, one colour per model: a settled run is flat
    at the end (:func:`bloodseg.paper.reproduce.convergence`)."""
    import matplotlib.pyplot as plt
    recs = sorted((r for r in records(experiment, scale) if r.get("history")), key=lambda r: _key(r["label"]))
    labels = list(dict.fromkeys(r["label"] for r in recs))
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for r in recs:
        k = labels.index(r["label"])
        ax.plot([h["epoch"] for h in r["history"]], [h["val_loss"] for h in r["history"]], color=f"C{k % 10}",
                lw=1, alpha=0.8, label=r["label"] if r["seed"] == min(x["seed"] for x in recs if x["label"] == r["label"])
                else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    settled = sum(bool(convergence(r["history"])["converged"]) for r in recs)
    ax.set_title(f"{experiment} ({scale}): {settled} of {len(recs)} units settled "
                 "(best validation loss < 2% lower in the last third of epochs)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def timing_frame(scale: str, labels: list[str] | None = None) -> pd.DataFrame:
    """Per model: mean time per image (ms), its ratio to the U-Net with the 95% CI (seeds and
    interleaved rounds resampled together), forward NFE, and the paper's ratio (Table 1)."""
    recs = sorted(records("timing", scale), key=lambda r: r["seed"])
    times = [r["timing"]["time_per_image_s"] for r in recs]
    labels = labels or sorted(times[0], key=_key)
    out = []
    for lab in labels:
        stack = np.stack([np.array([t["unet"] for t in times]), np.array([t[lab] for t in times])])
        r = stats.bootstrap_stat(stack, lambda m: m[1] / m[0])
        paper = PAPER_TABLE1.get(lab, {}).get("time_s")
        out.append({"model": lab, "ms / image": 1000 * float(np.mean([t[lab] for t in times])),
                    "x U-Net": r["value"], "CI low": r["ci"][0], "CI high": r["ci"][1],
                    "NFE fwd": float(np.mean([x["timing"]["nfe_forward"][lab] for x in recs])),
                    "paper x U-Net": paper / PAPER_TABLE1["unet"]["time_s"] if paper else np.nan})
    return pd.DataFrame(out).set_index("model")


def plot_timing(scale: str, title: str | None = None):
    """Time relative to the U-Net by model (log scale): ours with its CI next to the paper's."""
    import matplotlib.pyplot as plt
    f = timing_frame(scale)
    x = np.arange(len(f))
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.bar(x - 0.2, f["paper x U-Net"], 0.4, color="#8c959f", label="paper (GPU, 256 px, width 32)")
    ax.bar(x + 0.2, f["x U-Net"], 0.4, yerr=[f["x U-Net"] - f["CI low"], f["CI high"] - f["x U-Net"]], capsize=3,
           color="C0", label=f"ours ({scale}, 95% CI)")
    ax.set_yscale("log")
    ax.axhline(1, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(f.index, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("time / U-Net time")
    ax.set_title(title or f"inference time relative to the U-Net ({scale} scale, recorded)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def tolerance_frame(scale: str) -> pd.DataFrame:
    """The test-time tolerance curve of NODEs-UNet over seeds: mean and range of MIoU, NFE and time."""
    rows = []
    for r in records("tolerance", scale):
        for c in r["tolerance_curve"]:
            rows.append(dict(seed=r["seed"], rtol=c["rtol"], miou=100 * c["miou"], nfe=c["nfe_forward"],
                             time_20_s=c["time_20_s"]))
    d = pd.DataFrame(rows)
    g = d.groupby("rtol")
    out = pd.DataFrame({"seeds": g["seed"].nunique(), "MIoU %": g["miou"].mean(), "MIoU min": g["miou"].min(),
                        "MIoU max": g["miou"].max(), "NFE fwd": g["nfe"].mean(), "time 20 img (s)": g["time_20_s"].mean()})
    return out.sort_index(ascending=False)


def adjoint_frame(scale: str) -> pd.DataFrame:
    """Peak memory of a NODEs-UNet training step, adjoint vs direct backprop, per repeat."""
    rows = []
    for r in records("adjoint-memory", scale):
        peak = {x["backprop"]: x.get("peak_mb") for x in r["adjoint_memory"] if x["model"] == "nodes-unet"}
        rows.append({"seed": r["seed"], "direct MB": peak.get("direct"), "adjoint MB": peak.get("adjoint"),
                     "adjoint / direct": (peak["adjoint"] / peak["direct"]) if peak.get("direct") else np.nan})
    return pd.DataFrame(rows).set_index("seed")


def plot_tolerance(scale: str):
    """The recorded tolerance curve: MIoU (mean, min-max over seeds), NFE and time against rtol."""
    import matplotlib.pyplot as plt
    f = tolerance_frame(scale)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].fill_between(f.index, f["MIoU min"], f["MIoU max"], alpha=0.25, label="min-max over seeds")
    axes[0].plot(f.index, f["MIoU %"], "o-", label="mean")
    axes[0].set_ylabel("test MIoU (%)")
    axes[0].legend(fontsize=8)
    axes[1].plot(f.index, f["NFE fwd"], "o-")
    axes[1].set_ylabel("forward NFE per image")
    axes[2].plot(f.index, f["time 20 img (s)"], "o-")
    axes[2].set_ylabel("time for 20 images (s)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("test-time rtol")
        ax.grid(alpha=0.3)
    fig.suptitle(f"NODEs-UNet at other test-time tolerances ({scale} scale, recorded, "
                 f"{int(f['seeds'].max())} seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_adjoint(scale: str):
    """Recorded peak memory of a NODEs-UNet training step, adjoint vs direct, per repeat."""
    import matplotlib.pyplot as plt
    f = adjoint_frame(scale)
    x = np.arange(len(f))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(x - 0.2, f["direct MB"], 0.4, label="direct backprop")
    ax.bar(x + 0.2, f["adjoint MB"], 0.4, label="adjoint")
    ax.set_xticks(x)
    ax.set_xticklabels([f"repeat {s}" for s in f.index])
    ax.set_ylabel("peak memory (MB)")
    ax.set_title(f"training-step peak memory, {scale} scale (recorded)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def seeds_frame(experiment: str, scale: str, first: int) -> pd.DataFrame:
    """Per model: the paired difference to the U-Net (pp, 95 % CI, verdict) from the records of seeds
    ``0 .. first-1`` only, and from all recorded seeds, side by side; ``changed``: the verdicts differ.
    ``frame.attrs["summaries"]`` keeps both summary rows per model for :func:`plot_seeds`."""
    recs = records(experiment, scale)
    few = {r["model"]: r for r in summarize([r for r in recs if r["seed"] < first])}
    every = {r["model"]: r for r in summarize(recs)}
    out, pairs = [], []
    for label in sorted(every, key=_key):
        a, b = few.get(label), every[label]
        if "diff" not in b or a is None or "diff" not in a:
            continue
        row = {"model": label}
        for name, r in ((f"first {a['n_seeds']} seed" + "s" * (a["n_seeds"] != 1), a), (f"all {b['n_seeds']} seeds", b)):
            row.update({f"{name}: diff": r["diff"], f"{name}: CI": f"({r['diff_ci'][0]:+.2f}, {r['diff_ci'][1]:+.2f})",
                        f"{name}: verdict": r["verdict"]})
        out.append({**row, "changed": a["verdict"] != b["verdict"]})
        pairs.append((a, b))
    frame = pd.DataFrame(out).set_index("model")
    frame.attrs["summaries"] = pairs         # (first seeds, all seeds) summary rows, for plot_seeds
    return frame


def plot_seeds(frame: pd.DataFrame, title: str | None = None):
    """Each model's paired difference to the U-Net with its 95 % interval, from few seeds (hollow)
    and from all (filled); a model whose verdict changed is labelled in red."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(frame) + 1.6))
    y = np.arange(len(frame))
    for off, side, fill in ((-0.15, 0, "none"), (0.15, 1, None)):
        rows = [pair[side] for pair in frame.attrs["summaries"]]
        est = [r["diff"] for r in rows]
        err = np.array([[r["diff"] - r["diff_ci"][0] for r in rows], [r["diff_ci"][1] - r["diff"] for r in rows]])
        ax.errorbar(est, y + off, xerr=err, fmt="o", color="C0" if fill is None else "#6e7781", mfc=fill or "C0",
                    capsize=3, label=f"{rows[0]['n_seeds']} seeds")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(frame.index, fontsize=8)
    for tick, changed in zip(ax.get_yticklabels(), frame["changed"]):
        tick.set_color("C3" if changed else "k")
    ax.invert_yaxis()
    ax.set_xlabel("MIoU difference to the U-Net (pp), paired 95% interval")
    ax.set_title(title or "The same comparison from fewer seeds (red: the verdict changed)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
