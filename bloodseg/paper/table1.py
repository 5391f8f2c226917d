"""Table 1 (paper §3.3): where to put one ODE-block — the placement ablation of chapter 5.

Our Table 1 next to the paper's (:func:`table1_frame`), its two findings computed from the numbers
(:func:`position_summary`, :func:`position_statement`: "deeper is faster", "accuracy about flat"),
the cost of one evaluation of f per position (:func:`f_cost_table`) and the figure (:func:`plot_positions`).
"""
from __future__ import annotations

import math

import numpy as np

from ..models import position_channels, position_scale
from .reference import PAPER_TABLE1
from .runs import paper_row, scores_row


#: Threshold used to call Table 1's accuracy "about flat": spread of MIoU over the 9 positions.
FLAT_SPREAD_PP = 2.0
#: Spearman correlation between depth (U-Net level) and time at or below which "deeper is faster".
DEEPER_FASTER_RHO = -0.7
#: Position → U-Net level (0 = full resolution, 4 = the bottom), from models.position_scale.
POSITION_LEVEL = {p: int(round(math.log2(position_scale(p)))) for p in range(1, 10)}


def table1_frame(results: dict):
    """Our Table 1 next to the paper's: a DataFrame with a (source, column) header."""
    import pandas as pd
    ours, paper = [], []
    ref = results["unet"]["time_20_s"]
    for name in PAPER_TABLE1:
        if name not in results:
            continue
        r = results[name]
        row = scores_row(name, r)
        row.update({"time 20 img (s)": r["time_20_s"], "x U-Net": r["time_20_s"] / ref,
                    "NFE fwd": r["nfe_forward_total"] or float("nan")})
        ours.append(row)
        p = paper_row(name, PAPER_TABLE1[name])
        p.update({"time 20 img (s)": PAPER_TABLE1[name]["time_s"],
                  "x U-Net": PAPER_TABLE1[name]["time_s"] / PAPER_TABLE1["unet"]["time_s"],
                  "NFE fwd": float("nan")})
        paper.append(p)
    a = pd.DataFrame(ours).set_index("model")
    b = pd.DataFrame(paper).set_index("model")
    return pd.concat({"ours": a, "paper": b}, axis=1)


def _ranks(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):           # average ranks for ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _positions_summary(times: dict, mious: dict, unet_time: float, unet_miou: float) -> dict:
    pos = [p for p in range(1, 10) if p in times]
    levels = [POSITION_LEVEL[p] for p in pos]
    t = [times[p] for p in pos]
    m = [mious[p] for p in pos]
    return dict(positions=pos, rho_depth_time=spearman(levels, t),
                fastest_position=pos[int(np.argmin(t))], slowest_position=pos[int(np.argmax(t))],
                time_ratio=[x / unet_time for x in t], min_ratio=min(t) / unet_time,
                max_ratio=max(t) / unet_time, miou_spread_pp=max(m) - min(m),
                n_better_than_unet=sum(x > unet_miou for x in m), mean_gain_pp=float(np.mean(m)) - unet_miou)


def position_summary(results: dict, noise: dict | None = None) -> dict:
    """Table 1's two findings, ours and the paper's, computed from the numbers.

    "Deeper is faster": Spearman correlation between the U-Net level of a position (0 at full
    resolution, 4 at the bottom) and its time ≤ :data:`DEEPER_FASTER_RHO`. "Accuracy about flat":
    MIoU spread over the 9 positions ≤ :data:`FLAT_SPREAD_PP` percentage points.
    """
    ours = _positions_summary({p: results[f"ode-unet-{p}"]["time_20_s"] for p in range(1, 10)
                               if f"ode-unet-{p}" in results},
                              {p: 100 * results[f"ode-unet-{p}"]["miou"] for p in range(1, 10)
                               if f"ode-unet-{p}" in results},
                              results["unet"]["time_20_s"], 100 * results["unet"]["miou"])
    paper = _positions_summary({p: PAPER_TABLE1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)},
                               {p: PAPER_TABLE1[f"ode-unet-{p}"]["miou"] for p in range(1, 10)},
                               PAPER_TABLE1["unet"]["time_s"], PAPER_TABLE1["unet"]["miou"])
    for s in (ours, paper):
        s["deeper_is_faster"] = bool(s["rho_depth_time"] <= DEEPER_FASTER_RHO)
        s["accuracy_flat"] = bool(s["miou_spread_pp"] <= FLAT_SPREAD_PP)
    mious = [100 * results[f"ode-unet-{p}"]["miou"] for p in ours["positions"]]
    ours["position_std_pp"] = float(np.std(mious, ddof=1)) if len(mious) > 1 else float("nan")
    if noise:
        ours["seed_std_pp"] = noise["std_pp"]
        # positions differ by no more than seeds do: their spread is within twice the seed spread
        ours["within_seed_noise"] = bool(ours["position_std_pp"] <= 2 * noise["std_pp"])
    return dict(ours=ours, paper=paper, noise=noise,
                thresholds=dict(rho=DEEPER_FASTER_RHO, spread_pp=FLAT_SPREAD_PP))


def position_statement(summary: dict) -> str:
    """A plain sentence per finding, built from :func:`position_summary`."""
    o, p = summary["ours"], summary["paper"]
    both = o["deeper_is_faster"] and o["accuracy_flat"]
    lines = [
        f"Deeper is faster: Spearman rho(depth, time) = {o['rho_depth_time']:+.2f} here "
        f"(paper {p['rho_depth_time']:+.2f}; threshold {DEEPER_FASTER_RHO:+.1f}) -> "
        f"{'holds' if o['deeper_is_faster'] else 'does not hold'}; fastest position {o['fastest_position']} "
        f"(paper {p['fastest_position']}), slowest {o['slowest_position']}; time {o['min_ratio']:.1f}x to "
        f"{o['max_ratio']:.1f}x the U-Net's (paper {p['min_ratio']:.1f}x to {p['max_ratio']:.1f}x).",
        f"Accuracy about flat: MIoU spread over the 9 positions {o['miou_spread_pp']:.2f} pp "
        f"(paper {p['miou_spread_pp']:.2f} pp; threshold {FLAT_SPREAD_PP:.1f} pp) -> "
        f"{'holds' if o['accuracy_flat'] else 'does not hold'}; {o['n_better_than_unet']} of "
        f"{len(o['positions'])} positions beat the U-Net's MIoU (paper {p['n_better_than_unet']} of 9), "
        f"mean gain {o['mean_gain_pp']:+.2f} pp (paper {p['mean_gain_pp']:+.2f} pp).",
        f"Together, 'deeper is faster, accuracy about flat' {'holds' if both else 'does not hold'} here.",
    ]
    if summary.get("noise"):
        n = summary["noise"]
        lines.append(
            f"Seed noise: the U-Net retrained with seeds {n['seeds']} scores MIoU "
            f"{', '.join(f'{v:.2f}' for v in n['miou_pp'])}% (std {n['std_pp']:.2f} pp); the 9 positions have "
            f"std {o['position_std_pp']:.2f} pp -> the differences between positions "
            f"{'are' if o['within_seed_noise'] else 'are NOT'} within twice the seed-to-seed noise.")
    return "\n".join(lines)


def f_cost_table(width: int, size: int) -> list[dict]:
    """What one evaluation of f costs at each position for a ``size x size`` input: multiply-adds
    of its two 3x3 convolutions (each sees one extra time channel) and the size of its feature map.
    The multiply-adds are the same at every level (channels double when the side halves); the
    feature map, which the element-wise work (GroupNorm, softplus, concatenating t) scales with,
    halves at every level down."""
    rows = []
    for p in range(1, 10):
        c, side = position_channels(p, width), size // position_scale(p)
        macs = 2 * 9 * (c + 1) * c * side * side
        rows.append(dict(position=p, channels=c, side=side, mmacs_per_eval=macs / 1e6,
                         activation_k=c * side * side / 1e3))
    return rows


def plot_positions(results: dict, noise: dict | None = None):
    """Table 1 as two panels: time vs position (ours and the paper's, / U-Net) and MIoU vs position
    (with the U-Net's seed-to-seed range as a band when ``noise`` from :func:`seed_noise` is given)."""
    import matplotlib.pyplot as plt
    pos = [p for p in range(1, 10) if f"ode-unet-{p}" in results]
    ours = [results[f"ode-unet-{p}"]["time_20_s"] / results["unet"]["time_20_s"] for p in pos]
    paper = [PAPER_TABLE1[f"ode-unet-{p}"]["time_s"] / PAPER_TABLE1["unet"]["time_s"] for p in pos]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(pos, ours, "o-", label="ours")
    axes[0].plot(pos, paper, "s--", label="paper (Table 1)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("time for 20 images / U-Net's")
    axes[0].set_title("time vs ODE-block position")
    m_ours = [100 * results[f"ode-unet-{p}"]["miou"] for p in pos]
    m_paper = [PAPER_TABLE1[f"ode-unet-{p}"]["miou"] for p in pos]
    axes[1].plot(pos, m_ours, "o-", label="ours")
    axes[1].axhline(100 * results["unet"]["miou"], color="C0", ls=":", label="our U-Net")
    if noise:
        axes[1].axhspan(min(noise["miou_pp"]), max(noise["miou_pp"]), color="C0", alpha=0.12,
                        label=f"our U-Net, seeds {noise['seeds']}")
    axes[1].plot(pos, m_paper, "s--", color="C1", label="paper")
    axes[1].axhline(PAPER_TABLE1["unet"]["miou"], color="C1", ls=":", label="paper's U-Net")
    axes[1].set_ylabel("MIoU (%)")
    axes[1].set_title("MIoU vs ODE-block position")
    for ax in axes:
        ax.set_xlabel("position (1-4 encoder, 5 bottom, 6-9 decoder)")
        ax.set_xticks(range(1, 10))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
