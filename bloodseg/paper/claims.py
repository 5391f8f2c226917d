"""The claims ledger: every quantitative claim of the paper, our number read back from the
chapters' saved JSON, and a verdict computed from the numbers (:func:`claims_ledger`).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .reference import PAPER_PARAM_MEMORY_RATIO, PAPER_TABLE1, PAPER_TABLE2, paper_gain
from .report import RESULTS_DIR, load_results
from .runs import read_json
from .table1 import DEEPER_FASTER_RHO, FLAT_SPREAD_PP, POSITION_LEVEL, spearman


CHAPTERS = {
    "01_odes_and_euler": "01_odes_and_euler",
    "02_ode_blocks": "02_ode_blocks",
    "03_data_and_preprocessing": "03_data_and_preprocessing",
    "04_unet_baseline": "04_unet_baseline",
    "05_placement_ablation": "05_placement_ablation",
    "06_nodes_unet": "06_nodes_unet",
}

HOLDS, FAILS, UNTESTABLE, NOT_YET = "holds", "does not hold", "not testable here", "not measured yet"


class _Missing(Exception):
    pass


def _load(chapter: str, name: str, profile: str | None = None) -> dict:
    try:
        return load_results(chapter, name, profile=profile)
    except FileNotFoundError:
        raise _Missing(f"{chapter}/{name}") from None


def _data(chapter, name, profile=None):
    return _load(chapter, name, profile)["data"]


def _find(obj, *keys):
    """The first of ``keys`` present in dict ``obj`` (chapters 1–3 are written by others)."""
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            return obj[k]
    raise _Missing("/".join(keys))


def _gain(table, a, b, key):
    return 100 * (table[a][key] - table[b][key])


#: A ``bloodseg bench --device cuda`` result recorded on a GPU host (chapter 5 shows it).
CUDA_BENCH = ("05_placement_ablation", "bench_cuda_h100.json")


def bench_depth_rho(where=CUDA_BENCH) -> float:
    """Spearman correlation between the U-Net level of the nine single-block positions and their
    time in a recorded ``bloodseg bench`` JSON (``(chapter, file name)`` under the results folder)."""
    path = Path(RESULTS_DIR) / where[0] / where[1]
    if not path.is_file():
        raise _Missing(str(path))
    ratio = {r["model"]: r["ratio_to_unet"] for r in json.loads(path.read_text())["models"]}
    pos = [p for p in range(1, 10) if f"ode-unet-{p}" in ratio]
    return spearman([POSITION_LEVEL[p] for p in pos], [ratio[f"ode-unet-{p}"] for p in pos])


def _claims(profile=None) -> list[dict]:
    """Each claim: text, the paper's value (from :mod:`bloodseg.paper.reference`), how to measure ours, where."""
    P1, P2 = PAPER_TABLE1, PAPER_TABLE2
    t2 = lambda: _data("06_nodes_unet", "table2", profile)  # noqa: E731
    t1 = lambda: _data("05_placement_ablation", "table1", profile)  # noqa: E731

    def seed_std(key):
        try:
            n = _data("05_placement_ablation", "position_summary", profile).get("noise") or {}
        except _Missing:
            return None
        return n.get("pa_std_pp" if key == "pa" else "std_pp")

    def direction(key):         # a gain claim: the sign, unless seed noise alone could explain it
        def verdict(value):
            std = seed_std(key)
            if std is not None and abs(value) < 2 * std:
                return UNTESTABLE, (f"within 2x the seed-to-seed std of the U-Net's {'PA' if key == 'pa' else 'MIoU'} "
                                    f"({std:.2f} pp, chapter 5)")
            return HOLDS if value > 0 else FAILS
        return verdict

    def absolute(value):        # a MISP01 number: our data are synthetic smears
        return UNTESTABLE

    def ps():
        return _data("05_placement_ablation", "position_summary", profile)["ours"]

    def tol():
        return _data("06_nodes_unet", "tolerance_curve", profile)

    def pmem():
        return _data("06_nodes_unet", "param_memory", profile)

    def adj():
        return _data("06_nodes_unet", "adjoint_memory", profile)

    def adjoint_ratio():
        rows = adj()
        d = next(r for r in rows if r["model"] == "nodes-unet" and r["backprop"] == "direct")
        a = next(r for r in rows if r["model"] == "nodes-unet" and r["backprop"] == "adjoint")
        return a["peak_mb"] / d["peak_mb"]

    def nfe_monotone():
        rows = sorted(tol(), key=lambda r: -r["rtol"])   # loose → tight
        nfe = [r["nfe_forward"] for r in rows]
        return nfe[-1] / max(nfe[0], 1), all(b >= a for a, b in zip(nfe, nfe[1:]))

    def loose_vs_tight():
        rows = sorted(tol(), key=lambda r: r["rtol"])    # tight first
        tight, loose = rows[0], rows[-1]
        return tight, loose

    def first_of(*where):       # (chapter, name) pairs: chapters 1-3 are written by others
        for ch, name in where:
            if _exists(ch, name, profile):
                return _data(ch, name, profile)
        raise _Missing(" or ".join(f"{c}/{n}" for c, n in where))

    def residual_euler():
        d = first_of(("01_odes_and_euler", "residual_vs_euler"), ("02_ode_blocks", "residual_vs_euler"))
        return float(_find(d, "max_abs_diff", "max_abs_difference", "difference", "max_diff"))

    def clahe_contrast():
        d = first_of(("03_data_and_preprocessing", "clahe"), ("03_data_and_preprocessing", "contrast"))
        before = float(_find(d, "contrast_before", "luma_std_before", "std_before"))
        after = float(_find(d, "contrast_after", "luma_std_after", "std_after"))
        return before, after

    def single_block_nfe():     # chapter 1: one ODE-block, NFE against rtol
        rows = sorted(_data("01_odes_and_euler", "nfe_vs_tolerance", profile), key=lambda r: -r["rtol"])
        nfe = [r["nfe"] for r in rows]
        return nfe[-1] / max(nfe[0], 1), all(b >= a for a, b in zip(nfe, nfe[1:]))

    def block_memory():         # chapter 2: one ODE-block, peak memory of a training step against rtol
        rows = _data("02_ode_blocks", "training_step_cost", profile)["rows"]
        out = {}
        for adjoint in (False, True):
            rs = sorted((r for r in rows if r["adjoint"] == adjoint), key=lambda r: -r["rtol"])
            out[adjoint] = rs[-1]["peak_mb"] / rs[0]["peak_mb"]
        return out

    paper_rho = round(spearman([POSITION_LEVEL[p] for p in range(1, 10)],
                               [P1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)]), 2)

    def gain_claim(a, b, key):  # Table 2: model a's PA or MIoU gain over model b, in percentage points
        label = {"nodes-unet": "NODEs-UNet", "resunet": "ResNet", "unet": "U-Net", "pa": "PA", "miou": "MIoU"}
        return dict(claim=f"{label[a]} {label[key]} gain over {label[b]}", unit="pp", paper=paper_gain(P2, a, b, key),
                    ours=lambda: _gain(t2(), a, b, key), verdict=direction(key), where="06_nodes_unet",
                    note="holds if ours > 0, unless within seed noise")

    def param_ratio_32():
        rows = pmem()
        r = next(r for r in rows if r["model"] == "nodes-unet" and r["ode_hidden"] is None)
        return r["ratio_to_resunet"]

    claims = [
        dict(claim="NODEs-UNet pixel accuracy on the test set (abstract, Table 2)", unit="%",
             paper=P2["nodes-unet"]["pa"], ours=lambda: 100 * t2()["nodes-unet"]["pa"], verdict=absolute,
             where="06_nodes_unet", note="MISP01 is not available here; ours is on synthetic smears"),
        dict(claim="NODEs-UNet MIoU on the test set (abstract, Table 2)", unit="%",
             paper=P2["nodes-unet"]["miou"], ours=lambda: 100 * t2()["nodes-unet"]["miou"], verdict=absolute,
             where="06_nodes_unet", note="MISP01 is not available here; ours is on synthetic smears"),
        *(gain_claim(a, b, key) for a, b in (("nodes-unet", "unet"), ("nodes-unet", "resunet"), ("resunet", "unet"))
          for key in ("pa", "miou")),
        dict(claim="An ODE-block at any position beats the U-Net's MIoU (Table 1)", unit="positions of 9",
             paper=sum(P1[f"ode-unet-{p}"]["miou"] > P1["unet"]["miou"] for p in range(1, 10)),
             ours=lambda: ps()["n_better_than_unet"], verdict=lambda v: HOLDS if v == 9 else FAILS,
             where="05_placement_ablation", note="holds only if all 9 positions beat the U-Net"),
        dict(claim="Table 1 accuracy about flat across positions (MIoU spread)", unit="pp",
             paper=round(max(P1[f"ode-unet-{p}"]["miou"] for p in range(1, 10))
                         - min(P1[f"ode-unet-{p}"]["miou"] for p in range(1, 10)), 2),
             ours=lambda: ps()["miou_spread_pp"], verdict=lambda v: HOLDS if v <= FLAT_SPREAD_PP else FAILS,
             where="05_placement_ablation", note=f"holds if spread <= {FLAT_SPREAD_PP:g} pp"),
        dict(claim="Time falls toward the bottom of the U and rises again (Spearman depth vs time)", unit="rho",
             paper=paper_rho,
             ours=lambda: ps()["rho_depth_time"], verdict=lambda v: HOLDS if v <= DEEPER_FASTER_RHO else FAILS,
             where="05_placement_ablation", note=f"holds if rho <= {DEEPER_FASTER_RHO:g}"),
        dict(claim="... the same on a GPU (H100, `bloodseg bench`, 256x256, width 32, random weights)", unit="rho",
             paper=paper_rho,
             ours=lambda: bench_depth_rho(CUDA_BENCH), verdict=lambda v: HOLDS if v <= DEEPER_FASTER_RHO else FAILS,
             where="05_placement_ablation",
             note="a recorded bench run (not re-run by the book); one image at a time keeps a GPU waiting on "
                  "kernel launches, so time follows the NFE more than the map size"),
        dict(claim="Fastest single-block position is the bottom of the U (5)", unit="position",
             paper=min(range(1, 10), key=lambda p: P1[f"ode-unet-{p}"]["time_s"]),
             ours=lambda: ps()["fastest_position"], verdict=lambda v: HOLDS if v == 5 else FAILS,
             where="05_placement_ablation", note=""),
        dict(claim="An ODE-block costs much more time than the U-Net (slowest position / U-Net)", unit="x",
             paper=round(max(P1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)) / P1["unet"]["time_s"], 1),
             ours=lambda: ps()["max_ratio"], verdict=lambda v: HOLDS if v > 1 else FAILS,
             where="05_placement_ablation", note="holds if > 1x; the size of the factor depends on hardware"),
        dict(claim="Tighter tolerance -> more function evaluations ('like depth')", unit="x NFE (tightest/loosest)",
             paper=None, ours=lambda: nfe_monotone()[0],
             verdict=lambda v: HOLDS if nfe_monotone()[1] and v > 1 else FAILS, where="06_nodes_unet",
             note="holds if NFE never falls as rtol tightens"),
        dict(claim="Tighter tolerance -> more function evaluations, one ODE-block", unit="x NFE (tightest/loosest)",
             paper=None, ours=lambda: single_block_nfe()[0],
             verdict=lambda v: HOLDS if single_block_nfe()[1] and v > 1 else FAILS, where="01_odes_and_euler",
             note="holds if NFE never falls as rtol tightens"),
        dict(claim="Adjoint: approximately constant memory as NFE grows, one ODE-block",
             unit="x peak (tightest/loosest rtol)", paper=None, ours=lambda: block_memory()[True],
             verdict=lambda v: HOLDS if v <= 1.2 and block_memory()[False] > 1.2 else FAILS,
             where="02_ode_blocks", note="holds if the adjoint's peak grows <= 1.2x while direct backprop's grows more"),
        dict(claim="Looser test-time tolerance segments faster (time loosest/tightest)", unit="x time",
             paper=None, ours=lambda: loose_vs_tight()[1]["time_20_s"] / loose_vs_tight()[0]["time_20_s"],
             verdict=lambda v: HOLDS if v < 1 else FAILS, where="06_nodes_unet", note="holds if < 1"),
        dict(claim="... at some cost in accuracy (MIoU loosest - tightest)", unit="pp", paper=None,
             ours=lambda: 100 * (loose_vs_tight()[1]["miou"] - loose_vs_tight()[0]["miou"]),
             verdict=lambda v: HOLDS if v < 0 else FAILS, where="06_nodes_unet",
             note="the paper gives no number; holds if MIoU drops"),
        dict(claim="NODEs-UNet parameter memory is 46% of ResNet's (width 32)", unit="%",
             paper=100 * PAPER_PARAM_MEMORY_RATIO, ours=lambda: 100 * param_ratio_32(),
             verdict=lambda v: HOLDS if abs(v - 100 * PAPER_PARAM_MEMORY_RATIO) <= 10 else FAILS,
             where="06_nodes_unet", note="holds if within 10 pp; ours depends on the ResNet and f we chose"),
        dict(claim="Adjoint halves the peak memory of a NODEs-UNet training step (adjoint / direct, rtol 1e-6)",
             unit="x",
             paper=None, ours=adjoint_ratio, verdict=lambda v: HOLDS if v <= 0.5 else FAILS,
             where="06_nodes_unet", note="whole NODEs-UNet training step, trained weights; holds if <= 0.5x"),
        dict(claim="NODEs-UNet 'reduces the computational cost' (abstract): time vs U-Net", unit="x",
             paper=None, ours=lambda: t2()["nodes-unet"]["time_20_s"] / t2()["unet"]["time_20_s"],
             verdict=lambda v: HOLDS if v < 1 else FAILS, where="06_nodes_unet",
             note="holds if faster than the U-Net"),
        dict(claim="A residual block is one Euler step of size 1 (§4.2)", unit="max |diff|", paper=None,
             ours=residual_euler, verdict=lambda v: HOLDS if v < 1e-5 else FAILS,
             where="01_odes_and_euler", note="same f, same input; holds if max |diff| < 1e-5"),
        dict(claim="CLAHE on Y enhances contrast (§2)", unit="luma contrast after/before", paper=None,
             ours=lambda: clahe_contrast()[1] / clahe_contrast()[0],
             verdict=lambda v: HOLDS if v > 1 else FAILS, where="03_data_and_preprocessing",
             note="holds if contrast rises"),
        dict(claim="U-Net time for 20 images (Table 1)", unit="s", paper=P1["unet"]["time_s"],
             ours=lambda: t1()["unet"]["time_20_s"], verdict=absolute, where="05_placement_ablation",
             note="hardware: paper GPU at 256x256, ours CPU at the profile's size"),
    ]
    return claims


def _exists(chapter: str, name: str, profile: str | None = None) -> bool:
    try:
        _load(chapter, name, profile)
        return True
    except _Missing:
        return False


def claims_ledger(profile: str | None = None) -> list[dict]:
    """Every claim with the paper's value, ours (read from the chapters' saved JSON) and a verdict.

    A claim whose measurement is not saved yet gets ``ours=None`` and verdict "not measured yet".
    """
    rows = []
    for c in _claims(profile):
        note = c["note"]
        try:
            ours = float(c["ours"]())
            verdict = c["verdict"](ours)
            if isinstance(verdict, tuple):      # (verdict, why)
                verdict, note = verdict[0], verdict[1]
        except (_Missing, KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError):
            ours, verdict = None, NOT_YET
        rows.append(dict(claim=c["claim"], unit=c["unit"], paper=c["paper"], ours=ours, verdict=verdict,
                         where=c["where"], note=note,
                         provenance="" if verdict == NOT_YET else _provenance(c["where"], profile)))
    return rows


def _provenance(chapter: str, profile=None) -> str:
    """Profile, device and date of a chapter's saved results ("" when it saved none)."""
    files = sorted((RESULTS_DIR / chapter).glob("*.json"))
    real = [f for f in files if not f.name.endswith(".smoke.json")]
    smoke = [f for f in files if f.name.endswith(".smoke.json")]
    for f in (smoke + real if profile == "smoke" else real + smoke):
        p = (read_json(f) or {}).get("provenance")
        if p:
            return f"{p.get('profile')} | {p.get('device')} | {p.get('date')}"
    return ""


def ledger_html(rows: list[dict]) -> str:
    """The ledger as an HTML table whose "where" column links to the chapter."""
    def fmt(v):
        if v is None:
            return "&mdash;"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.2f}"
        return html.escape(str(v))

    colour = {HOLDS: "#1a7f37", FAILS: "#cf222e", UNTESTABLE: "#6e7781", NOT_YET: "#9a6700"}
    head = "".join(f"<th>{h}</th>" for h in ("claim", "unit", "paper", "ours", "verdict", "measured in", "note"))
    body = []
    for r in rows:
        link = f'<a href="{r["where"]}.html">{r["where"]}</a>'
        body.append("<tr>" + "".join([
            f"<td>{html.escape(r['claim'])}</td>", f"<td>{html.escape(r['unit'])}</td>",
            f"<td>{fmt(r['paper'])}</td>", f"<td>{fmt(r['ours'])}</td>",
            f"<td style='color:{colour.get(r['verdict'], '#000')}'><b>{r['verdict']}</b></td>",
            f"<td>{link}</td>", f"<td>{html.escape(r['note'])}</td>"]) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def plot_headline(profile: str | None = None):
    """Paper vs ours for the headline numbers (Table 2 PA/MIoU and the gains), from saved JSON.

    Missing results are drawn as empty bars labelled "not measured yet"."""
    import matplotlib.pyplot as plt
    try:
        t2 = _data("06_nodes_unet", "table2", profile)
    except _Missing:
        t2 = None
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    models = list(PAPER_TABLE2)
    x = np.arange(len(models))
    name = {"pa": "PA", "miou": "MIoU"}
    short = {"nodes-unet": "NODEs-UNet", "resunet": "ResNet", "unet": "U-Net"}
    for k, key in enumerate(("pa", "miou")):
        ax = axes[0]
        off = (k - 0.5) * 0.4
        ax.bar(x + off - 0.1, [PAPER_TABLE2[m][key] for m in models], 0.2, color=f"C{k}", alpha=0.45,
               label=f"paper {name[key]}")
        ours = [100 * t2[m][key] if t2 and m in t2 else np.nan for m in models]
        ax.bar(x + off + 0.1, ours, 0.2, color=f"C{k}", label=f"ours {name[key]}")
    axes[0].set_xticks(x)
    axes[0].set_xticklabels([short[m] for m in models])
    axes[0].set_ylabel("%")
    axes[0].set_ylim(50, 100)
    axes[0].set_title("Table 2: PA and MIoU" + ("" if t2 else " (ours: not measured yet)"))
    axes[0].legend(fontsize=8, ncol=2)
    try:
        noise = _data("05_placement_ablation", "position_summary", profile).get("noise") or {}
    except _Missing:
        noise = {}
    pairs = [("nodes-unet", "unet"), ("nodes-unet", "resunet"), ("resunet", "unet")]
    labels, paper, ours, err = [], [], [], []
    for a, b in pairs:
        for key in ("pa", "miou"):
            labels.append(f"{short[a]}\nvs {short[b]}\n{name[key]}")
            paper.append(paper_gain(PAPER_TABLE2, a, b, key))
            ours.append(_gain(t2, a, b, key) if t2 else np.nan)
            err.append(2 * noise.get("pa_std_pp" if key == "pa" else "std_pp", np.nan))
    x = np.arange(len(labels))
    axes[1].bar(x - 0.2, paper, 0.4, label="paper", alpha=0.6)
    has_err = bool(noise) and not all(np.isnan(err))
    axes[1].bar(x + 0.2, ours, 0.4, label="ours" + (" (bars: 2x seed std, ch. 5)" if has_err else ""),
                yerr=err if has_err else None, capsize=3)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, fontsize=7)
    axes[1].set_ylabel("gain (percentage points)")
    axes[1].set_title("gains claimed in §4.2")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
