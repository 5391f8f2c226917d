"""The claims ledger: every quantitative claim of the paper, and the book's own goals, judged by one rule.

**The rule.** Each row has our estimate, its 95% interval, and a threshold with a side ("greater
than", "less than", "within"). The verdict is :func:`bloodseg.paper.stats.verdict` of the interval:

* **holds** — the whole interval is on the claimed side of the threshold;
* **does not hold** — the whole interval is on the other side;
* **inconclusive** — the interval contains the threshold: more seeds or images could decide it;
* **untestable** — the number belongs to the paper's data (MISP01) or hardware; ours is shown for scale;
* **not measured yet** — the record it needs has not been made (the note says which).

Where the numbers come from: the relative claims read the records of ``bloodseg reproduce``
(``<results>/<experiment>/<scale>/*.json``, each with its commit, command, device and date), the best
scale available (``full``, else ``study``, else ``quick``); intervals bootstrap seeds and test images
together (:mod:`bloodseg.paper.stats`). Deterministic numbers (parameter counts, a residual block vs an
Euler step, saved single measurements) have a zero-width interval and say so in their note. Timing
claims are judged with the spread of their own repeated, interleaved measurements (``reproduce timing``).
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np

from . import stats
from .reference import PAPER_PARAM_MEMORY_RATIO, PAPER_TABLE1, PAPER_TABLE2, paper_gain
from .report import RESULTS_DIR, load_results
from .reproduce import cm_stack, has_counts, load_records, per_image_matrix
from .table1 import DEEPER_FASTER_RHO, FLAT_SPREAD_PP, POSITION_LEVEL, spearman

from .stats import FAILS, HOLDS, INCONCLUSIVE, NOT_YET, UNTESTABLE, VERDICTS, source_line  # noqa: F401
from .stats import VERDICT_COLOURS as COLOURS
#: Scales in the order the ledger prefers them.
EVIDENCE_SCALES = ("full", "study", "quick")
POSITIONS = tuple(range(1, 10))
#: A ``bloodseg bench --device cuda`` result recorded on a GPU host (chapter 5 shows it).
CUDA_BENCH = ("05_placement_ablation", "bench_cuda_h100.json")
SHORT = {"nodes-unet": "NODEs-UNet", "resunet": "ResNet", "unet": "U-Net", "pa": "PA", "miou": "MIoU"}


_Missing = stats.MissingEvidence


# ----------------------------------------------------------------------------- evidence

def evidence(experiment: str) -> tuple[str, list[dict]]:
    """``(scale, records)`` of ``experiment`` at the best scale that has records."""
    for scale in EVIDENCE_SCALES:
        folder = Path(RESULTS_DIR) / experiment / scale
        records = load_records(folder) if folder.is_dir() else []
        if records:
            return scale, records
    raise _Missing(f"`bloodseg reproduce {experiment} --scale study`")


def _common_seeds(records, labels) -> list[int]:
    sets = [{r["seed"] for r in records if r.get("label") == lab and "per_image" in r} for lab in labels]
    seeds = sorted(set.intersection(*sets)) if sets else []
    if not seeds:
        raise _Missing("records of " + ", ".join(labels))
    return seeds


def _scores(records, label, seeds, key="miou") -> np.ndarray:
    return 100 * per_image_matrix(records, label, seeds, key)


def _chapter(chapter: str, name: str, profile=None):
    try:
        saved = load_results(chapter, name, profile=profile)
    except FileNotFoundError:
        raise _Missing(f"{chapter}/{name}.json (execute that chapter)") from None
    p = saved.get("provenance") or {}
    return saved["data"], f"{p.get('profile')} | {p.get('device')} | {p.get('date')} | chapter {chapter}"


def _json(*parts):
    path = Path(RESULTS_DIR).joinpath(*parts)
    if not path.is_file():
        raise _Missing(str(path))
    d = json.loads(path.read_text())
    p = d.get("provenance") or {}
    return d, " | ".join(str(p[k]) for k in ("device", "date", "git_commit", "commit") if p.get(k)) or str(path)


def _point(value: float) -> tuple:
    return (float(value), float(value))


# ----------------------------------------------------------------------------- estimators
# Each returns (estimate, (lo, hi), source); they raise _Missing when their evidence is absent.

def _diff(recs, ref, label, key="miou"):
    """``label`` minus ``ref`` in pp with its interval: pooled scores when the records keep per-image
    confusion matrices (the paper's metric), else the mean of per-image scores."""
    seeds = _common_seeds(recs, [ref, label])
    if has_counts(recs):
        p = stats.pooled_bootstrap(cm_stack(recs, [ref, label], seeds), key=key)
        return p["diff"][1], p["diff_ci"][1]
    d = stats.paired_bootstrap(_scores(recs, ref, seeds, key), _scores(recs, label, seeds, key))
    return d["diff"], d["ci"]


def _gain(a, b, key):
    scale, recs = evidence("table2")
    diff, ci = _diff(recs, b, a, key)
    seeds = _common_seeds(recs, [a, b])       # the source names the records this pair was judged on
    return diff, ci, source_line(scale, [r for r in recs if r["label"] in (a, b) and r["seed"] in seeds])


def _positions_beating_unet():
    scale, recs = evidence("table1")
    labels = [f"ode-unet-{p}" for p in POSITIONS]
    _common_seeds(recs, ["unet", *labels])
    diffs = [_diff(recs, "unet", lab) for lab in labels]
    better = sum(ci[0] > 0 for _, ci in diffs)
    worse = sum(ci[1] < 0 for _, ci in diffs)
    return float(sum(d > 0 for d, _ in diffs)), (float(better), float(len(diffs) - worse)), source_line(scale, recs)


def _position_spread():
    scale, recs = evidence("table1")
    labels = [f"ode-unet-{p}" for p in POSITIONS]
    seeds = _common_seeds(recs, labels)
    if has_counts(recs):
        r = stats.pooled_stat(cm_stack(recs, labels, seeds), np.ptp)
    else:
        r = stats.bootstrap_stat(np.stack([_scores(recs, lab, seeds) for lab in labels]), np.ptp)
    return r["value"], r["ci"], source_line(scale, recs)


def _timing(stat, labels):
    """``stat`` of the mean inference times of ``labels`` (seeds x rounds resampled together)."""
    scale, recs = evidence("timing")
    times = [r["timing"]["time_per_image_s"] for r in sorted(recs, key=lambda r: r["seed"])]
    if any(lab not in t for t in times for lab in labels):
        raise _Missing("timing records of " + ", ".join(labels))
    stack = np.stack([np.array([t[lab] for t in times]) for lab in labels])    # models x seeds x rounds
    r = stats.bootstrap_stat(stack, stat)
    return r["value"], r["ci"], source_line(scale, recs)


POS_LABELS = [f"ode-unet-{p}" for p in POSITIONS]


def _rho_depth_time():
    levels = [POSITION_LEVEL[p] for p in POSITIONS]
    return _timing(lambda m: spearman(levels, m), POS_LABELS)


def _fastest_is_bottom():       # time of position 5 / the fastest other position (< 1: 5 is fastest)
    return _timing(lambda m: m[4] / np.delete(m, 4).min(), POS_LABELS)


def _slowest_over_unet():
    return _timing(lambda m: m[1:].max() / m[0], ["unet", *POS_LABELS])


def _nodes_over_unet():
    return _timing(lambda m: m[1] / m[0], ["unet", "nodes-unet"])


def _tolerance(fn):
    """``fn(tight_row, loose_row)`` per seed of the tolerance records; mean over seeds and interval."""
    scale, recs = evidence("tolerance")
    values = []
    for r in recs:
        rows = sorted(r["tolerance_curve"], key=lambda x: x["rtol"])
        values.append(fn(rows[0], rows[-1]))
    ci = stats.mean_ci(values)
    return ci["mean"], ci["ci"], source_line(scale, recs)


def _adjoint_ratio():
    scale, recs = evidence("adjoint-memory")
    ratios = []
    for rec in recs:
        peak = {r["backprop"]: r.get("peak_mb") for r in rec["adjoint_memory"] if r["model"] == "nodes-unet"}
        if peak.get("adjoint") and peak.get("direct"):
            ratios.append(peak["adjoint"] / peak["direct"])
    if not ratios:
        raise _Missing("adjoint-memory records with both peaks")
    ci = stats.mean_ci(ratios)
    return ci["mean"], ci["ci"], source_line(scale, recs)


def _absolute(model, key):
    scale, recs = evidence("table2")
    seeds = sorted(r["seed"] for r in recs if r["label"] == model and "per_image" in r)
    if not seeds:
        raise _Missing(f"table2 records of {model}")
    if has_counts(recs):
        p = stats.pooled_bootstrap(cm_stack(recs, [model], seeds), key=key)
        return p["value"][0], p["ci"][0], source_line(scale, recs)
    ci = stats.mean_ci([100 * r["test"][key] for r in recs if r["label"] == model])
    return ci["mean"], ci["ci"], source_line(scale, recs)


def _param_ratio():
    from .table2 import param_memory_table                  # parameters of the models: exact, counted now
    rows = param_memory_table(width=32, hidden=(None,))
    r = next(r for r in rows if r["model"] == "nodes-unet")
    return 100 * r["ratio_to_resunet"], _point(100 * r["ratio_to_resunet"]), "counted from the models (width 32)"


def bench_depth_rho(where=CUDA_BENCH) -> float:
    """Spearman correlation between the U-Net level of the nine single-block positions and their
    time in a recorded ``bloodseg bench`` JSON (``(chapter, file name)`` under the results folder)."""
    d, _ = _json(*where)
    ratio = {r["model"]: r["ratio_to_unet"] for r in d["models"]}
    pos = [p for p in POSITIONS if f"ode-unet-{p}" in ratio]
    return spearman([POSITION_LEVEL[p] for p in pos], [ratio[f"ode-unet-{p}"] for p in pos])


def _cuda_rho():
    rho = bench_depth_rho(CUDA_BENCH)
    return rho, _point(rho), _json(*CUDA_BENCH)[1]


def _chapter_value(chapter, name, fn, profile=None):
    data, src = _chapter(chapter, name, profile)
    v = float(fn(data))
    return v, _point(v), src


def _find(obj, *keys):
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            return obj[k]
    raise _Missing("/".join(keys))


def _calibration():
    d, src = _json("calibration", "shipped.json")
    t = d["test"]
    v = 100 * (t["calibrated"]["white_iou_raw"] - t["trained"]["white_iou_raw"])
    return v, _point(v), src


def _calibration_time():
    d, src = _json("calibration", "shipped.json")
    t = d["test"]
    v = t["calibrated"]["predict_s_per_photo_raw"] / t["trained"]["predict_s_per_photo_raw"]
    return v, _point(v), src


def _auto_scale():
    d, src = _json("scale", "bccd_resized.json")
    v = min(r["auto_minus_native_pp"] for r in d["rows"])
    return v, _point(v), src


# ----------------------------------------------------------------------------- the claims

_row = stats.ledger_row


def _claims(profile=None) -> list[dict]:
    P1, P2 = PAPER_TABLE1, PAPER_TABLE2
    paper_rho = round(spearman([POSITION_LEVEL[p] for p in POSITIONS],
                               [P1[f"ode-unet-{p}"]["time_s"] for p in POSITIONS]), 2)
    rows = []
    for a, b in (("nodes-unet", "unet"), ("nodes-unet", "resunet"), ("resunet", "unet")):
        for key in ("pa", "miou"):
            rows.append(_row("paper", f"{SHORT[a]} {SHORT[key]} gain over {SHORT[b]} (Table 2)", "pp",
                             paper_gain(P2, a, b, key), lambda a=a, b=b, key=key: _gain(a, b, key),
                             "greater", 0.0, "06_nodes_unet", "gain > 0"))
    rows += [
        _row("paper", "An ODE-block at every position beats the U-Net's MIoU (Table 1)", "positions of 9",
             sum(P1[f"ode-unet-{p}"]["miou"] > P1["unet"]["miou"] for p in POSITIONS), _positions_beating_unet,
             "greater", 8.5, "05_placement_ablation", "all 9 paired intervals > 0",
             "interval: positions whose gain is surely > 0, and 9 minus those surely < 0"),
        _row("paper", "Table 1's accuracy is about flat across positions (MIoU spread)", "pp",
             round(max(P1[f"ode-unet-{p}"]["miou"] for p in POSITIONS)
                   - min(P1[f"ode-unet-{p}"]["miou"] for p in POSITIONS), 2), _position_spread,
             "less", FLAT_SPREAD_PP, "05_placement_ablation", f"spread < {FLAT_SPREAD_PP:g} pp"),
        _row("paper", "Time falls toward the bottom of the U and rises again (Spearman: depth vs time)", "rho",
             paper_rho, _rho_depth_time, "less", DEEPER_FASTER_RHO, "05_placement_ablation",
             f"rho < {DEEPER_FASTER_RHO:g}", "trained study models on the 2-core CPU, interleaved timing rounds"),
        _row("paper", "... the same on a GPU (H100 `bloodseg bench`, 256 px, width 32, random weights)", "rho",
             paper_rho, _cuda_rho, "less", DEEPER_FASTER_RHO, "05_placement_ablation",
             f"rho < {DEEPER_FASTER_RHO:g}", "one recorded run, no repeats: its interval has zero width"),
        _row("paper", "The fastest single-block position is the bottom of the U (position 5)",
             "time(5) / fastest other", 1.0 if min(POSITIONS, key=lambda p: P1[f"ode-unet-{p}"]["time_s"]) == 5
             else float("nan"), _fastest_is_bottom, "less", 1.0, "05_placement_ablation", "ratio < 1"),
        _row("paper", "An ODE-block costs more time than the U-Net (slowest position / U-Net)", "x",
             round(max(P1[f"ode-unet-{p}"]["time_s"] for p in POSITIONS) / P1["unet"]["time_s"], 1),
             _slowest_over_unet, "greater", 1.0, "05_placement_ablation", "ratio > 1"),
        _row("paper", "Tighter tolerance -> more function evaluations ('tolerance acts like depth')",
             "x NFE (tightest/loosest)", None,
             lambda: _tolerance(lambda t, lo: t["nfe_forward"] / max(lo["nfe_forward"], 1)),
             "greater", 1.0, "06_nodes_unet", "ratio > 1"),
        _row("paper", "A looser test-time tolerance segments faster", "x time (loosest/tightest)", None,
             lambda: _tolerance(lambda t, lo: lo["time_20_s"] / t["time_20_s"]),
             "less", 1.0, "06_nodes_unet", "ratio < 1"),
        _row("paper", "... at some cost in accuracy", "pp MIoU (loosest - tightest)", None,
             lambda: _tolerance(lambda t, lo: 100 * (lo["miou"] - t["miou"])),
             "less", 0.0, "06_nodes_unet", "difference < 0"),
        _row("paper", "NODEs-UNet's parameter memory is 46% of ResNet's (width 32)", "%",
             100 * PAPER_PARAM_MEMORY_RATIO, _param_ratio, "within", (36.0, 56.0), "06_nodes_unet",
             "within 46 +- 10 %", "depends on the ResNet and the f we chose"),
        _row("paper", "NODEs-UNet 'reduces the computational cost' (abstract): time vs U-Net", "x",
             None, _nodes_over_unet, "less", 1.0, "06_nodes_unet", "ratio < 1"),
        _row("paper", "NODEs-UNet pixel accuracy (abstract, Table 2)", "%", P2["nodes-unet"]["pa"],
             lambda: _absolute("nodes-unet", "pa"), None, None, "06_nodes_unet", "MISP01 only",
             "MISP01 is not available; ours is on synthetic smears"),
        _row("paper", "NODEs-UNet MIoU (abstract, Table 2)", "%", P2["nodes-unet"]["miou"],
             lambda: _absolute("nodes-unet", "miou"), None, None, "06_nodes_unet", "MISP01 only",
             "MISP01 is not available; ours is on synthetic smears"),
        _row("paper", "U-Net MIoU (Table 1: 88.58; Table 2: 88.43, the paper's two U-Net rows)", "%",
             P2["unet"]["miou"], lambda: _absolute("unet", "miou"), None, None, "04_unet_baseline",
             "MISP01 only", "the paper does not say why its two U-Net rows differ"),
        _row("paper", "U-Net time for 20 images (Table 1)", "s", P1["unet"]["time_s"],
             lambda: _timing(lambda m: 20 * m[0], ["unet"]), None, None, "05_placement_ablation",
             "hardware", "the paper's 4 GTX 1080 Ti at 256 px; ours a 2-core CPU at 128 px"),
        # the book's own goals
        _row("goal", "Adjoint training step needs at most half the memory of direct backprop (NODEs-UNet)", "x",
             None, _adjoint_ratio, "less", 0.5, "06_nodes_unet", "ratio < 0.5"),
        _row("goal", "NODEs-UNet inference at most 3x the U-Net's time (trained tolerances)", "x", None,
             _nodes_over_unet, "less", 3.0, "06_nodes_unet", "ratio < 3"),
        _row("goal", "A residual block is one Euler step of size 1 (§4.2)", "max |diff|", None,
             lambda: _chapter_value("01_odes_and_euler", "residual_vs_euler",
                                    lambda d: _find(d, "max_abs_diff", "max_abs_difference", "difference"), profile),
             "less", 1e-5, "01_odes_and_euler", "< 1e-5"),
        _row("goal", "Tighter tolerance -> more function evaluations, one ODE-block", "x NFE (tightest/loosest)",
             None, lambda: _chapter_value("01_odes_and_euler", "nfe_vs_tolerance", lambda d: (
                 lambda nfe: nfe[-1] / max(nfe[0], 1))([r["nfe"] for r in sorted(d, key=lambda r: -r["rtol"])]),
                 profile), "greater", 1.0, "01_odes_and_euler", "ratio > 1"),
        _row("goal", "Adjoint memory about constant as NFE grows, one ODE-block", "x peak (tightest/loosest)",
             None, lambda: _chapter_value("02_ode_blocks", "training_step_cost", lambda d: (
                 lambda rs: rs[-1]["peak_mb"] / rs[0]["peak_mb"])(
                     sorted((r for r in d["rows"] if r["adjoint"]), key=lambda r: -r["rtol"])), profile),
             "less", 1.2, "02_ode_blocks", "ratio < 1.2"),
        _row("goal", "CLAHE on the luma raises contrast (§2)", "x contrast (after/before)", None,
             lambda: _chapter_value("03_data_and_preprocessing", "clahe", lambda d: float(
                 _find(d, "contrast_after", "luma_std_after", "std_after"))
                 / float(_find(d, "contrast_before", "luma_std_before", "std_before")), profile),
             "greater", 1.0, "03_data_and_preprocessing", "ratio > 1"),
        _row("goal", "Calibrated solver keeps the shipped checkpoint's BCCD white-cell IoU", "pp (calibrated - dopri5)",
             None, _calibration, "greater", -0.3, "08_real_smears", "> -0.3 pp",
             "72 BCCD test photographs; solver chosen on validation photographs"),
        _row("goal", "... at no more than 0.35x the predict time", "x time", None, _calibration_time,
             "less", 0.35, "08_real_smears", "ratio < 0.35"),
        _row("goal", "Automatic scale within 2 pp of the native size (resized x0.5-2.0)", "pp (worst factor)",
             None, _auto_scale, "greater", -2.0, "08_real_smears", "> -2 pp"),
    ]
    # chapter 10: Table 2 on real smears and the title's claim (the robustness study's records)
    from .robust_report import ledger_rows, table2_ledger_rows
    return rows + table2_ledger_rows() + ledger_rows()


def _verdict(side, threshold, ci) -> str:
    if side is None:
        return UNTESTABLE
    if side == "within":
        lo, hi = threshold
        if lo <= ci[0] and ci[1] <= hi:
            return HOLDS
        return FAILS if ci[1] < lo or ci[0] > hi else INCONCLUSIVE
    return stats.verdict(ci, threshold, side)


def claims_ledger(profile: str | None = None) -> list[dict]:
    """Every row: ``table`` ("paper" or "goal"), ``claim``, ``unit``, ``paper``, ``ours``, ``ci``,
    ``rule``, ``verdict``, ``where`` (chapter), ``source`` (provenance) and ``note``."""
    out = []
    for c in _claims(profile):
        try:
            ours, ci, source = c["estimate"]()
            ours, ci = float(ours), (float(ci[0]), float(ci[1]))
            if not (math.isfinite(ours) and all(math.isfinite(x) for x in ci)):
                raise _Missing("a finite estimate")
            verdict, note = _verdict(c["side"], c["threshold"], ci), c["note"]
        except _Missing as e:
            ours, ci, source = None, None, ""
            verdict = UNTESTABLE if c["side"] is None else NOT_YET     # untestable whatever we measure
            note = c["note"] if c["side"] is None else f"needs {e}" + (f"; {c['note']}" if c["note"] else "")
        out.append(dict(table=c["table"], claim=c["claim"], unit=c["unit"], paper=c["paper"], ours=ours, ci=ci,
                        rule=c["rule"], verdict=verdict, where=c["where"], source=source, note=note,
                        side=c["side"], threshold=c["threshold"]))
    return out


def _seed_cost_hours(experiment: str) -> float | None:
    """CPU hours that one more seed of the whole ``experiment`` costs (every model of it): per model,
    the mean wall time of its recorded units, summed over the models (the records' own machine and load)."""
    try:
        if experiment == "robust":      # chapter 10's study: one unit per (model, seed), the same fields
            from .robust_report import evidence as robust_evidence
            _, recs = robust_evidence()
        else:
            _, recs = evidence(experiment)
    except (_Missing, FileNotFoundError):
        return None
    per_label: dict = {}
    for r in recs:
        per_label.setdefault(r["label"], []).append(float(r["wall_s"]))
    return float(sum(np.mean(v) for v in per_label.values()) / 3600)


def seeds_to_decide(rows: list[dict], target_pp: float = 0.5) -> list[dict]:
    """For every inconclusive difference (unit pp) measured over seeds: how many seeds would bring the
    95% interval's half-width to ``target_pp``, and how many would exclude the threshold if the
    estimate stayed where it is. Both assume the half-width falls as 1/sqrt(seeds), which holds when
    the seed-to-seed spread dominates it (it does here: the test images are shared by all seeds);
    the cost is :func:`_seed_cost_hours` per seed, so an estimate, not a measurement."""
    out = []
    for r in rows:
        m = re.search(r"(\d+) seed\(s\)", r.get("source") or "")
        if r["verdict"] != INCONCLUSIVE or r["unit"] != "pp" or not m or not isinstance(r.get("threshold"), (int, float)):
            continue
        n = int(m.group(1))
        half = (r["ci"][1] - r["ci"][0]) / 2
        gap = abs(r["ours"] - r["threshold"])
        to_target = math.ceil(n * (half / target_pp) ** 2)
        to_decide = math.ceil(n * (half / gap) ** 2) if gap > 0 else None
        cost = _seed_cost_hours("robust" if r["table"] in ("paper-real", "robustness")
                                else "table2" if "Table 2" in r["claim"] else "table1")
        out.append(dict(claim=r["claim"], seeds=n, half_width_pp=half, estimate_pp=r["ours"],
                        seeds_for_target=to_target, seeds_to_decide=to_decide, target_pp=target_pp,
                        cpu_hours_per_seed=cost,
                        cpu_hours_for_target=None if cost is None else cost * max(to_target - n, 0)))
    return out


def plot_seeds_to_decide(table: list[dict]):
    """Seeds recorded, seeds for a half-width of ``target_pp``, seeds to exclude the threshold."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(table) + 1.9))
    y = np.arange(len(table))
    ax.barh(y - 0.25, [t["seeds"] for t in table], 0.25, color="#6e7781", label="recorded")
    ax.barh(y, [t["seeds_for_target"] for t in table], 0.25, color="C0",
            label=f"for a ±{table[0]['target_pp'] if table else 0.5:g} pp interval")
    ax.barh(y + 0.25, [t["seeds_to_decide"] or 0 for t in table], 0.25, color="C1",
            label="to exclude the threshold (estimate unchanged)")
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels([t["claim"].replace(" (Table 2)", "") for t in table], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seeds per model (log scale)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def verdict_counts(rows: list[dict], table: str = "paper") -> dict:
    return {v: sum(r["verdict"] == v for r in rows if r["table"] == table) for v in VERDICTS}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&mdash;"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.2f}"
    return html.escape(str(v))


def ledger_html(rows: list[dict], table: str | None = None) -> str:
    """The rows of ``table`` ("paper", "goal" or all) as an HTML table linking each row to its chapter."""
    head = "".join(f"<th>{h}</th>" for h in ("claim", "unit", "paper", "ours (95% CI)", "rule", "verdict",
                                              "measured in", "source", "note"))
    body = []
    for r in rows:
        if table and r["table"] != table:
            continue
        ours = _fmt(r["ours"])
        if r["ci"] is not None and r["ci"][0] != r["ci"][1]:
            ours += f" ({_fmt(r['ci'][0])}, {_fmt(r['ci'][1])})"
        cells = [html.escape(r["claim"]), html.escape(r["unit"]), _fmt(r["paper"]), ours, html.escape(r["rule"]),
                 f"<b style='color:{COLOURS[r['verdict']]}'>{r['verdict']}</b>",
                 f'<a href="{r["where"]}.html">{r["where"]}</a>', html.escape(r["source"]), html.escape(r["note"])]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<div style='overflow-x:auto; font-size:0.82em'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def plot_ledger(rows: list[dict]):
    """Left: verdict counts of each table (the paper's claims, the book's goals, and chapter 10's
    Table 2 on real smears and robustness rows). Right: every judged
    difference claim of Table 2 as our estimate with its interval next to the paper's number."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw=dict(width_ratios=[1, 1.6]))
    ax = axes[0]
    tables = [t for t in ("paper", "goal", "paper-real", "robustness") if any(r["table"] == t for r in rows)]
    for k, table in enumerate(tables):
        counts = verdict_counts(rows, table)
        left = 0
        for v in VERDICTS:
            ax.barh(k, counts[v], left=left, color=COLOURS[v], label=v if k == 0 else None)
            if counts[v]:
                ax.text(left + counts[v] / 2, k, str(counts[v]), ha="center", va="center", color="white", fontsize=9)
            left += counts[v]
    ax.set_yticks(range(len(tables)))
    ax.set_yticklabels([{"paper": "paper's claims", "goal": "book's goals", "paper-real": "Table 2, real smears",
                         "robustness": "robustness (ch. 10)"}[t] for t in tables])
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("verdicts")
    ax = axes[1]
    gains = [r for r in rows if r["table"] == "paper" and r["unit"] == "pp" and "gain" in r["claim"]]
    y = np.arange(len(gains))
    for i, r in enumerate(gains):
        ax.plot(r["paper"], i, "D", color="#6e7781", label="paper" if i == 0 else None)
        if r["ours"] is not None:
            ax.errorbar(r["ours"], i, xerr=[[r["ours"] - r["ci"][0]], [r["ci"][1] - r["ours"]]], fmt="o",
                        color=COLOURS[r["verdict"]], capsize=3, label="ours (95% CI)" if i == 0 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([r["claim"].replace(" (Table 2)", "") for r in gains], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("gain (percentage points); colour = verdict")
    ax.set_title("Table 2's gains: paper vs ours")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _glance_more(rows: list[dict]) -> str:
    """The sentence on chapter 10's rows: Table 2 on real smears and the title's robustness claim."""
    parts = []
    for table, what in (("paper-real", "Table 2 on real BCCD smears"), ("robustness", "the title's robustness claim")):
        c = verdict_counts(rows, table)
        n = sum(c.values())
        if n:
            parts.append(f"{what} ({n} rows: {c[HOLDS]} hold, {c[FAILS]} do not, {c[INCONCLUSIVE]} inconclusive"
                         + (f", {c[NOT_YET]} not measured yet" if c[NOT_YET] else "") + ")")
    return (" Chapter 10 adds " + " and ".join(parts) + ".") if parts else ""


def glance_markdown(rows: list[dict]) -> str:
    """The "Results at a glance" of the intro: counts, then the paper's claims one line each."""
    c, g = verdict_counts(rows, "paper"), verdict_counts(rows, "goal")
    lines = [f"Of the paper's {sum(c.values())} quantitative claims, **{c[HOLDS]} hold**, **{c[FAILS]} do not "
             f"hold**, **{c[INCONCLUSIVE]} are inconclusive** (the 95% interval contains the threshold), "
             f"{c[UNTESTABLE]} are untestable here (MISP01 or the paper's GPUs) and {c[NOT_YET]} are not "
             f"measured yet. Of the book's own {sum(g.values())} goals, {g[HOLDS]} hold and {g[FAILS]} do not."
             + _glance_more(rows), "",
             "| claim | paper | ours (95% CI) | verdict |", "|---|---|---|---|"]
    for r in rows:
        if r["table"] != "paper":
            continue
        ours = "—" if r["ours"] is None else f"{r['ours']:.3g}" + (
            f" ({r['ci'][0]:.3g}, {r['ci'][1]:.3g})" if r["ci"] and r["ci"][0] != r["ci"][1] else "")
        paper = "—" if r["paper"] is None or (isinstance(r["paper"], float) and math.isnan(r["paper"])) \
            else f"{r['paper']:g}"
        lines.append(f"| {r['claim']} [{r['unit']}] | {paper} | {ours} | {r['verdict']} |")
    return "\n".join(lines)
