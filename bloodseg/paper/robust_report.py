"""Chapter 10's numbers from the robustness study's records: Table 2 on real smears, curves, drops,
attacks, ALL-IDB2, the ledger's rows, and their figures.

Every interval resamples **seeds and photographs together** (a two-level paired bootstrap, as
:mod:`bloodseg.paper.stats`): each resample draws the seeds with replacement and, independently,
the photographs of each photograph set (BCCD perturbation photographs, attack photographs, all test
photographs, ALL-IDB2 crops), the same draws for every model. A model's score on one seed is the
white-cell IoU **pooled** over the (resampled) photographs (one sum of pixels, the book's
convention); over seeds it is the mean of the per-seed scores.

* **drop** (pp) of a family: clean IoU minus the mean IoU over the family's non-zero strengths, on
  the same photographs (the area between the flat clean line and the curve, per unit strength:
  ``1 - normalised area under the curve``); of a group (noise, blur/JPEG, colour/stain, scale): the
  mean of its families' drops; adversarial: the mean over the budgets of clean IoU minus the IoU
  under the **strongest attack**, per photograph the attack (white-box FGSM or PGD, or a transferred
  one) that leaves it the lowest IoU; other microscope: IoU on the 72 BCCD test photographs minus
  IoU on ALL-IDB2's report half (the product's colour and scale rules, the same for every model).
* "A is more robust than B" for a group: ``drop(B) - drop(A) > 0``, judged by the ledger's one rule
  (:func:`bloodseg.paper.stats.verdict` of the 95 % interval).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import stats
from .perturb import FAMILIES, GROUPS
from .reference import PAPER_TABLE2
from .robust import LABELS, load_robust_records

__all__ = ["MODELS", "TITLES", "evidence", "Boot", "summarize", "table2_rows", "family_rows", "group_rows",
           "adversarial_rows", "allidb2_rows", "ledger_rows", "table2_ledger_rows", "judge", "seeds_needed", "records_frame",
           "plot_table2", "plot_curves", "plot_groups", "plot_adversarial", "plot_convergence", "show_attack",
           "as_jpeg", "plot_allidb2", "plot_units", "plot_families", "seeds_by_group"]

MODELS = tuple(LABELS)
TITLES = {"unet": "U-Net", "resunet": "ResNet U-Net", "nodes-unet-euler1": "NODEs-UNet, Euler-1",
          "nodes-unet": "NODEs-UNet (dopri5)"}
COLOURS = {"unet": "#1f77b4", "resunet": "#2ca02c", "nodes-unet-euler1": "#ff7f0e", "nodes-unet": "#d62728"}
GROUP_NAMES = ("noise", "blur/JPEG", "colour/stain", "scale", "adversarial", "other microscope")
#: Yan et al. (2020)'s claim is tested at the strongest noise of the study.
YAN_SIGMA = FAMILIES["noise"].levels[-1]


def evidence(scale: str | None = None, results=None) -> tuple[str, list[dict]]:
    """``(scale, records)``: the study's records (``study``, else ``smoke`` when asked for)."""
    from .report import RESULTS_DIR
    root = Path(results or RESULTS_DIR) / "robust"
    for s in ([scale] if scale else ["study"]):
        folder = root / s
        recs = load_robust_records(folder) if folder.is_dir() else []
        if recs:
            return s, recs
    raise FileNotFoundError(f"no robustness records under {root}/{scale or 'study'}: run "
                            "`bloodseg reproduce robust --scale study --seeds 5`")


def _seeds(records) -> list[int]:
    """Seeds every model has a record of."""
    sets = [{r["seed"] for r in records if r["label"] == m} for m in MODELS]
    return sorted(set.intersection(*sets)) if all(sets) else []


class Boot:
    """Shared draws: ``ws`` (boot x seeds) and, per photograph set, ``wi`` (boot x photographs)."""

    def __init__(self, n_seeds: int, n_boot: int = stats.N_BOOT, seed: int = 0):
        self.rng, self.s, self.n = np.random.default_rng(seed), n_seeds, n_boot
        self.ws = self.rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot).astype(np.float64)
        self.wi: dict = {}

    def iou(self, counts, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(value (M,), boot (B, M))`` pooled IoU (%) of ``counts`` (M x seeds x photos x 3)."""
        c = np.asarray(counts, np.float64)
        n = c.shape[2]
        if key not in self.wi:
            self.wi[key] = self.rng.multinomial(n, np.full(n, 1 / n), size=self.n).astype(np.float64)
        wi = self.wi[key]
        tp = np.einsum("msi,bi->bms", c[..., 0], wi)
        tot = np.einsum("msi,bi->bms", c.sum(-1), wi)
        per_seed = 100 * tp / np.maximum(tot, 1)
        boot = np.einsum("bms,bs->bm", per_seed, self.ws) / self.s
        value = (100 * c[..., 0].sum(2) / np.maximum(c.sum((2, 3)), 1)).mean(1)
        return value, boot


def _ci(boot) -> list[float]:
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return [float(lo), float(hi)]


def _by(records, seeds) -> dict:
    return {(r["label"], r["seed"]): r for r in records if r["seed"] in seeds}


def _stack(by, seeds, get) -> np.ndarray:
    return np.array([[get(by[(m, k)]) for k in seeds] for m in MODELS], dtype=np.float64)


def _worst(cands: list[np.ndarray]) -> np.ndarray:
    """Per photograph (last-but-one axis), the counts of the candidate with the lowest IoU."""
    c = np.stack(cands)                                         # A x ... x photos x 3
    union = c.sum(-1)
    iou = np.where(union > 0, c[..., 0] / np.maximum(union, 1), 1.0)
    pick = iou.argmin(0)
    return np.take_along_axis(c, pick[None, ..., None], 0)[0]


def _attack_sets(rec) -> dict:
    """``{eps: {attack: counts (photos x 3)}}`` of one record."""
    counts = rec["adversarial"]["counts"]
    return {e: {a: np.asarray(v[e]) for a, v in counts.items() if a != "clean"} for e in rec["adversarial"]["eps"]}


def summarize(records: list[dict], n_boot: int = stats.N_BOOT, seed: int = 0) -> dict:
    """Every number of the chapter: levels, curves, drops and differences with intervals (see the
    module's docstring). Models are :data:`MODELS`; seeds are those every model has."""
    seeds = _seeds(records)
    if not seeds:
        raise FileNotFoundError("no seed has a record of every model of the study")
    by, boot = _by(records, seeds), Boot(len(seeds), n_boot, seed)
    r0 = by[(MODELS[0], seeds[0])]
    pert_names = r0["perturbations"]["photos"]
    out = dict(seeds=seeds, n_seeds=len(seeds), models=list(MODELS), n_test=len(r0["clean"]["photos"]),
               n_perturb=len(pert_names), n_adv=len(r0["adversarial"]["photos"]), families={}, groups={},
               plan=r0["plan"], recipe=r0["recipe"])
    # clean: all test photographs; and the perturbation photographs' clean IoU (drops are measured on them)
    v, b = boot.iou(_stack(by, seeds, lambda r: r["clean"]["white"]), "test")
    out["clean"] = dict(value=v, boot=b)
    fam_drop = {}
    for fam, f in FAMILIES.items():
        lv = r0["perturbations"]["families"].get(fam, {}).get("levels")
        if not lv:
            continue
        curve = [boot.iou(_stack(by, seeds, lambda r, k=k: r["perturbations"]["families"][fam]["counts"][k]), "pert")
                 for k in range(len(lv))]
        nonzero = [k for k, s in enumerate(lv) if s != 0]
        zero = lv.index(0)
        drop_b = curve[zero][1] - np.mean([curve[k][1] for k in nonzero], 0)
        drop_v = curve[zero][0] - np.mean([curve[k][0] for k in nonzero], 0)
        strongest = max(nonzero, key=lambda k: abs(lv[k]))
        fam_drop[fam] = (drop_v, drop_b)
        out["families"][fam] = dict(levels=lv, title=f.title, unit=f.unit,
                                    iou=[c[0] for c in curve], iou_ci=[[_ci(c[1][:, m]) for m in range(len(MODELS))]
                                                                       for c in curve],
                                    drop=drop_v, drop_boot=drop_b, strongest=lv[strongest],
                                    drop_strongest=curve[zero][0] - curve[strongest][0],
                                    drop_strongest_boot=curve[zero][1] - curve[strongest][1])
    for g, fams in GROUPS.items():
        have = [f for f in fams if f in fam_drop]
        if have:
            out["groups"][g] = (np.mean([fam_drop[f][0] for f in have], 0), np.mean([fam_drop[f][1] for f in have], 0))
    # attacks
    eps = r0["adversarial"]["eps"]
    adv = dict(eps=eps, attacks={}, strongest=[], strongest_ci=[], wins={})
    clean_adv = boot.iou(_stack(by, seeds, lambda r: r["adversarial"]["counts"]["clean"]), "adv")
    adv["clean"] = clean_adv[0]
    drops_v, drops_b = [], []
    for e in eps:
        worst = np.array([[_worst(list(_attack_sets(by[(m, k)])[e].values())) for k in seeds] for m in MODELS])
        wv, wb = boot.iou(worst, "adv")
        adv["strongest"].append(wv)
        adv["strongest_ci"].append([_ci(wb[:, m]) for m in range(len(MODELS))])
        drops_v.append(clean_adv[0] - wv)
        drops_b.append(clean_adv[1] - wb)
        for m in MODELS:
            for a in _attack_sets(by[(m, seeds[0])])[e]:
                c = np.array([[_attack_sets(by[(m, k)])[e][a] for k in seeds]])
                adv["attacks"].setdefault(m, {}).setdefault(a, []).append(float(boot.iou(c, "adv")[0][0]))
    out["adversarial"] = adv
    out["groups"]["adversarial"] = (np.mean(drops_v, 0), np.mean(drops_b, 0))
    # ALL-IDB2 (the product's colour and scale rules) against all BCCD test photographs
    if all(by[(m, k)]["allidb2"].get("available") for m in MODELS for k in seeds):
        a = {}
        for mode in ("product", "fixed"):
            a[mode] = boot.iou(_stack(by, seeds, lambda r, mode=mode: r["allidb2"][mode]), "allidb2")
        out["allidb2"] = dict(n=len(r0["allidb2"]["photos"]), product=a["product"][0], fixed=a["fixed"][0],
                              product_ci=[_ci(a["product"][1][:, m]) for m in range(len(MODELS))],
                              fixed_ci=[_ci(a["fixed"][1][:, m]) for m in range(len(MODELS))])
        out["groups"]["other microscope"] = (out["clean"]["value"] - a["product"][0], out["clean"]["boot"] - a["product"][1])
    # Yan et al.: noise at the strongest sigma
    if "noise" in out["families"]:
        f = out["families"]["noise"]
        out["yan"] = (f["drop_strongest"], f["drop_strongest_boot"])
    out["cms"] = np.array([[np.asarray(by[(m, k)]["clean"]["cm"]) for k in seeds] for m in MODELS], dtype=np.float64)
    return out


def _idx(m: str) -> int:
    return MODELS.index(m)


def diff(s: dict, group: str, better: str, ref: str) -> dict:
    """``drop(ref) - drop(better)`` of a group (pp; > 0: ``better`` loses less), interval, verdict.
    ``group="yan", ref="cnns"``: the drop at the strongest noise, against the CNN that drops less
    (``min`` over U-Net and ResNet U-Net, per resample)."""
    v, b = s["groups"][group] if group != "yan" else s["yan"]
    if group == "yan" and ref == "cnns":      # than every CNN: the smaller of the two advantages
        d = min(v[_idx("unet")], v[_idx("resunet")]) - v[_idx(better)]
        db = np.minimum(b[:, _idx("unet")], b[:, _idx("resunet")]) - b[:, _idx(better)]
    else:
        d, db = v[_idx(ref)] - v[_idx(better)], b[:, _idx(ref)] - b[:, _idx(better)]
    ci = _ci(db)
    return dict(diff=float(d), ci=ci, verdict=stats.verdict(ci))


def table2_rows(s: dict) -> list[dict]:
    """Table 2 on real smears: per model, gold white-cell IoU and silver PA / MIoU (%, pooled over the
    72 test photographs, mean over seeds, 95 % intervals), the difference to the U-Net, and the
    paper's PA / MIoU (MISP01) where it has the model."""
    pa = stats.pooled_bootstrap(s["cms"], key="pa")
    mi = stats.pooled_bootstrap(s["cms"], key="miou")
    rows = []
    for m in MODELS:
        k = _idx(m)
        d = s["clean"]["boot"][:, k] - s["clean"]["boot"][:, 0]
        paper = PAPER_TABLE2.get(m if m != "nodes-unet-euler1" else "", {})
        rows.append(dict(model=TITLES[m], white_iou=float(s["clean"]["value"][k]), white_iou_ci=_ci(s["clean"]["boot"][:, k]),
                         silver_pa=pa["value"][k], silver_pa_ci=list(pa["ci"][k]),
                         silver_miou=mi["value"][k], silver_miou_ci=list(mi["ci"][k]),
                         white_iou_vs_unet=float(s["clean"]["value"][k] - s["clean"]["value"][0]),
                         white_iou_vs_unet_ci=_ci(d) if k else [0.0, 0.0],
                         miou_vs_unet=mi["diff"][k], miou_vs_unet_ci=list(mi["diff_ci"][k]),
                         paper_pa=paper.get("pa"), paper_miou=paper.get("miou")))
    return rows


def family_rows(s: dict) -> list[dict]:
    """Per family and model: clean IoU, IoU at the strongest strength, mean drop with interval."""
    rows = []
    for fam, f in s["families"].items():
        zero = f["levels"].index(0)
        strongest = f["levels"].index(f["strongest"])
        for m in MODELS:
            k = _idx(m)
            rows.append(dict(family=fam, model=TITLES[m], clean=float(f["iou"][zero][k]),
                             strongest=f"{f['strongest']:g} ({f['unit']})", iou_strongest=float(f["iou"][strongest][k]),
                             drop=float(f["drop"][k]), drop_ci=_ci(f["drop_boot"][:, k])))
    return rows


def group_rows(s: dict) -> list[dict]:
    """Per group: each model's drop (pp, interval) and NODEs-UNet's and the Euler-1 twin's differences."""
    rows = []
    for g in GROUP_NAMES:
        if g not in s["groups"]:
            continue
        v, b = s["groups"][g]
        row = dict(group=g, **{f"drop {TITLES[m]}": float(v[_idx(m)]) for m in MODELS})
        row.update({f"drop {TITLES[m]} ci": _ci(b[:, _idx(m)]) for m in MODELS})
        for ref in ("unet", "resunet"):
            row[f"NODEs vs {TITLES[ref]}"] = diff(s, g, "nodes-unet", ref)
        row["dopri5 vs Euler-1"] = diff(s, g, "nodes-unet", "nodes-unet-euler1")
        rows.append(row)
    return rows


def adversarial_rows(s: dict) -> list[dict]:
    """Per model and budget: clean IoU on the attack photographs, each attack's IoU, the strongest
    (per photograph) with its interval, and which attack is the strongest in pooled IoU."""
    a, rows = s["adversarial"], []
    for m in MODELS:
        k = _idx(m)
        for j, e in enumerate(a["eps"]):
            attacks = {name: vals[j] for name, vals in a["attacks"][m].items()}
            rows.append(dict(model=TITLES[m], eps=e, clean=float(a["clean"][k]), **{f"IoU {n}": v for n, v in attacks.items()},
                             strongest=float(a["strongest"][j][k]), strongest_ci=a["strongest_ci"][j][k],
                             strongest_single=min(attacks, key=attacks.get)))
    return rows


def allidb2_rows(s: dict) -> list[dict]:
    if "allidb2" not in s:
        return []
    a = s["allidb2"]
    return [dict(model=TITLES[m], bccd=float(s["clean"]["value"][_idx(m)]), allidb2=float(a["product"][_idx(m)]),
                 allidb2_ci=a["product_ci"][_idx(m)], allidb2_fixed=float(a["fixed"][_idx(m)]),
                 allidb2_fixed_ci=a["fixed_ci"][_idx(m)], n=a["n"]) for m in MODELS]


# ----------------------------------------------------------------------------- the ledger

def _claims_spec() -> list[tuple]:
    """``(claim, group, better, ref, rule note)`` of every robustness row."""
    out = []
    for g in GROUP_NAMES:
        for ref in ("unet", "resunet"):
            out.append((f"NODEs-UNet is more robust than the {TITLES[ref]}: {g}", g, "nodes-unet", ref))
    out.append((f"ODE networks are more robust to Gaussian noise than CNNs (Yan et al. 2020): NODEs-UNet vs "
                f"the more robust of U-Net and ResNet U-Net at sigma = {YAN_SIGMA:g}", "yan", "nodes-unet", "cnns"))
    for g in ("noise", "blur/JPEG", "colour/stain", "scale", "adversarial"):
        out.append((f"Solving the blocks exactly (dopri5) rather than by one Euler step makes NODEs-UNet more "
                    f"robust: {g}", g, "nodes-unet", "nodes-unet-euler1"))
    return out


_row = stats.ledger_row


def ledger_rows(scale: str | None = None, results=None) -> list[dict]:
    """The robustness rows of the claims ledger (``table`` "robustness"), shaped as
    :func:`bloodseg.paper.stats.ledger_row` makes them: estimate = ``drop(ref) - drop(NODEs-UNet)`` in pp
    with its paired seeds x photographs interval, judged "greater than 0"."""
    cache: dict = {}

    def estimate(group, better, ref):
        def run():
            if "s" not in cache:
                try:
                    sc, recs = evidence(scale, results)
                except FileNotFoundError:
                    raise stats.MissingEvidence("`bloodseg reproduce robust --scale study --seeds 5`") from None
                cache["s"], cache["src"] = summarize(recs), stats.source_line(sc, [r for r in recs
                                                                                   if r["seed"] in _seeds(recs)])
            s = cache["s"]
            if group != "yan" and group not in s["groups"]:
                raise stats.MissingEvidence(f"records with the {group} scores")
            d = diff(s, group, better, ref)
            return d["diff"], tuple(d["ci"]), cache["src"]
        return run

    rows = []
    for claim, group, better, ref in _claims_spec():
        note = {"adversarial": "strongest of FGSM, PGD-10 and transferred attacks per photograph, mean over "
                               "eps = 1, 2, 4 /255",
                "other microscope": "BCCD test IoU minus ALL-IDB2 (report half) IoU, colour and scale rules on",
                "yan": "IoU drop at the strongest noise, against the CNN that drops less; Yan et al. classify "
                       "images, we segment"}.get(
            group, "mean IoU drop over the family's graded strengths")
        rows.append(_row("robustness", claim, "pp", None, estimate(group, better, ref), "greater", 0.0,
                                "10_is_it_robust", "drop difference > 0", note))
    return rows


def table2_ledger_rows(scale: str | None = None, results=None) -> list[dict]:
    """Table 2 on real smears as ledger rows (``table`` "paper-real"): the paper's gains (PA, MIoU)
    of NODEs-UNet over the U-Net and the ResNet U-Net, and of the ResNet U-Net over the U-Net, next to
    ours on the 72 BCCD test photographs (silver red cells, gold white cells; the study's seeds),
    with paired seeds x photographs intervals; judged "greater than 0" as the paper's own rows."""
    from .reference import paper_gain
    cache: dict = {}

    def estimate(better, ref, key):
        def run():
            if "boot" not in cache:          # once for the six rows
                try:
                    sc, recs = evidence(scale, results)
                except FileNotFoundError:
                    raise stats.MissingEvidence("`bloodseg reproduce robust --scale study --seeds 5`") from None
                s = summarize(recs)
                boots = {k: stats.pooled_bootstrap(s["cms"], key=k) for k in ("pa", "miou")}
                cache["boot"] = {k: b["boot"] for k, b in boots.items()}
                cache["value"] = {k: b["value"] for k, b in boots.items()}
                cache["src"] = stats.source_line(sc, [r for r in recs if r["seed"] in _seeds(recs)])
            v, b = cache["value"][key], cache["boot"][key]
            d = b[:, _idx(better)] - b[:, _idx(ref)]
            return v[_idx(better)] - v[_idx(ref)], tuple(_ci(d)), cache["src"]
        return run

    short = {"unet": "U-Net", "resunet": "ResNet", "nodes-unet": "NODEs-UNet", "pa": "PA", "miou": "MIoU"}
    rows = []
    for better, ref in (("nodes-unet", "unet"), ("nodes-unet", "resunet"), ("resunet", "unet")):
        for key in ("pa", "miou"):
            rows.append(_row("paper-real", f"{short[better]} {short[key]} gain over {short[ref]} (Table 2 on "
                                    "real BCCD smears)", "pp", paper_gain(PAPER_TABLE2, better, ref, key),
                                    estimate(better, ref, key), "greater", 0.0, "10_is_it_robust", "gain > 0",
                                    "3 classes: gold white cells, silver red cells (boxes), background; "
                                    "the paper's numbers are on MISP01"))
    return rows


def judge(rows: list[dict]) -> list[dict]:
    """The rows as :func:`bloodseg.paper.claims.claims_ledger` returns its own (``ours``, ``ci``,
    ``verdict``, ``source``), by its one rule (:func:`bloodseg.paper.stats.verdict`)."""
    out = []
    for c in rows:
        try:
            ours, ci, source = c["estimate"]()
            ci = (float(ci[0]), float(ci[1]))
            verdict, note = stats.verdict(ci, c["threshold"], c["side"]), c["note"]
        except stats.MissingEvidence as e:
            ours, ci, source, verdict, note = None, None, "", stats.NOT_YET, f"needs {e}"
        out.append(dict(table=c["table"], claim=c["claim"], unit=c["unit"], paper=c["paper"], ours=ours, ci=ci,
                        rule=c["rule"], verdict=verdict, where=c["where"], source=source, note=note,
                        side=c["side"], threshold=c["threshold"]))
    return out


def seeds_by_group(need: list[dict]) -> dict:
    """``{(group, reference label): seeds to decide}`` of :func:`seeds_needed`'s rows (for :func:`plot_groups`)."""
    refs = {"the U-Net": "unet", "the ResNet U-Net": "resunet", "Euler step": "nodes-unet-euler1", "CNNs": None}
    out = {}
    for n in need:
        group = n["claim"].split(": ")[-1]
        ref = next((v for k, v in refs.items() if k in n["claim"]), None)
        if ref and n["seeds_to_decide"]:
            out[(group, ref)] = n["seeds_to_decide"]
    return out


def seeds_needed(rows: list[dict], records: list[dict], target_pp: float = 0.5) -> list[dict]:
    """:func:`bloodseg.paper.claims.seeds_to_decide`'s estimate for the inconclusive rows, with this
    study's cost: one more seed = every model's mean recorded wall time (CPU hours)."""
    per_label: dict = {}
    for r in records:
        per_label.setdefault(r["label"], []).append(float(r["wall_s"]))
    cost = sum(np.mean(v) for v in per_label.values()) / 3600
    out = []
    for r in rows:
        if r["verdict"] != "inconclusive" or r["ci"] is None:
            continue
        n = len({x["seed"] for x in records})
        half = (r["ci"][1] - r["ci"][0]) / 2
        gap = abs(r["ours"] - r["threshold"])
        to_decide = math.ceil(n * (half / gap) ** 2) if gap > 0 else None
        out.append(dict(claim=r["claim"], seeds=n, estimate_pp=r["ours"], half_width_pp=half,
                        seeds_to_decide=to_decide, seeds_for_target=math.ceil(n * (half / target_pp) ** 2),
                        target_pp=target_pp,
                        cpu_hours_per_seed=cost,
                        cpu_hours_to_decide=None if to_decide is None else cost * max(to_decide - n, 0)))
    return out


def records_frame(records: list[dict]):
    """One row per (model, seed): clean white IoU and silver MIoU (72 photographs), each family's mean
    drop, the strongest attack's IoU at each budget, ALL-IDB2 IoU, epochs, wall and CPU time."""
    import pandas as pd
    rows = []
    for r in sorted(records, key=lambda r: (MODELS.index(r["label"]) if r["label"] in MODELS else 9, r["seed"])):
        w = np.sum(r["clean"]["white"], 0)
        row = {"model": TITLES.get(r["label"], r["label"]), "seed": r["seed"],
               "white IoU": 100 * w[0] / max(1, w.sum()),
               "silver MIoU": float(100 * stats.pooled_scores(np.sum(r["clean"]["cm"], 0))["miou"])}
        for fam, f in r["perturbations"]["families"].items():
            ious = [100 * np.sum(c, 0)[0] / max(1, np.sum(c)) for c in f["counts"]]
            zero = f["levels"].index(0)
            row[f"{fam} drop"] = ious[zero] - np.mean([v for k, v in enumerate(ious) if k != zero])
        for e, sets in _attack_sets(r).items():
            c = _worst(list(sets.values()))
            row[f"attack {e}"] = 100 * c[:, 0].sum() / max(1, c.sum())
        if r["allidb2"].get("available"):
            a = np.sum(r["allidb2"]["product"], 0)
            row["ALL-IDB2"] = 100 * a[0] / max(1, a.sum())
        row.update({"epochs": len(r["history"]), "best epoch": r.get("best_epoch"),
                    "wall s": r["wall_s"], "CPU s": r.get("cpu_s")})
        rows.append(row)
    return pd.DataFrame(rows).round(2)


# ----------------------------------------------------------------------------- figures

def plot_table2(rows: list[dict], allidb2: list[dict] | None = None):
    """Table 2 on real smears: our three scores per model with intervals, the paper's PA / MIoU (MISP01)
    beside; with ``allidb2`` (:func:`allidb2_rows`) a fourth group, the zero-shot ALL-IDB2 white-cell IoU."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.4))
    keys = [("white_iou", "gold white IoU"), ("silver_pa", "silver PA"), ("silver_miou", "silver MIoU")]
    if allidb2:
        keys.append(("allidb2", "ALL-IDB2 white IoU\n(zero-shot, rules on)"))
        rows = [{**r, "allidb2": a["allidb2"], "allidb2_ci": a["allidb2_ci"]} for r, a in zip(rows, allidb2)]
    w = 0.8 / (len(rows) + 1)
    for i, r in enumerate(rows):
        x = np.arange(len(keys)) + (i - len(rows) / 2) * w
        vals = [r[k] for k, _ in keys]
        err = np.array([[v - r[f"{k}_ci"][0], r[f"{k}_ci"][1] - v] for (k, _), v in zip(keys, vals)]).T
        ax.bar(x, vals, w, yerr=err, capsize=2, label=r["model"],
               color=COLOURS[MODELS[[TITLES[m] for m in MODELS].index(r["model"])]])
        if r["paper_pa"] is not None:
            ax.plot(x[1:], [r["paper_pa"], r["paper_miou"]], "kD", ms=4, label="paper (MISP01)" if i == 0 else None)
    ax.set_xticks(np.arange(len(keys)) - w / 2)
    ax.set_xticklabels([t for _, t in keys])
    ax.set_ylim(50, 100)
    ax.set_ylabel("%")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(s: dict):
    """IoU against strength for every family, one line per model with its 95 % band."""
    import matplotlib.pyplot as plt
    fams = list(s["families"])
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(fams) / cols), cols, figsize=(8.6, 2.0 * math.ceil(len(fams) / cols)),
                             squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        f = s["families"][fam]
        order = np.argsort(f["levels"])
        x = np.array(f["levels"])[order]
        for m in MODELS:
            k = _idx(m)
            y = np.array([f["iou"][j][k] for j in order])
            lo = np.array([f["iou_ci"][j][k][0] for j in order])
            hi = np.array([f["iou_ci"][j][k][1] for j in order])
            ax.plot(x, y, "o-", ms=3, color=COLOURS[m], label=TITLES[m])
            ax.fill_between(x, lo, hi, color=COLOURS[m], alpha=0.12)
        ax.set_title(f["title"], fontsize=9)
        ax.set_xlabel(f["unit"], fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(fams):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("white-cell IoU (%)")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_groups(s: dict, seeds: dict | None = None):
    """Per group: NODEs-UNet's advantage in drop over the U-Net, the ResNet U-Net and its Euler-1 twin
    (pp, 95 %); ``seeds``: ``{(group, ref): seeds to decide}`` written beside inconclusive points."""
    import matplotlib.pyplot as plt
    VC = stats.VERDICT_COLOURS
    groups = [g for g in GROUP_NAMES if g in s["groups"]]
    refs = [("unet", "vs U-Net", "o"), ("resunet", "vs ResNet U-Net", "s"), ("nodes-unet-euler1", "vs Euler-1 twin", "^")]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(groups) + 1.6))
    for j, (ref, lab, mk) in enumerate(refs):
        for i, g in enumerate(groups):
            d = diff(s, g, "nodes-unet", ref)
            y = i + (j - 1) * 0.22
            ax.errorbar(d["diff"], y, xerr=[[d["diff"] - d["ci"][0]], [d["ci"][1] - d["diff"]]], fmt=mk,
                        color=VC[d["verdict"]], capsize=2, ms=5, label=lab if i == 0 else None, mfc="white" if j else None)
            n = (seeds or {}).get((g, ref))
            if n:
                ax.text(d["ci"][1], y, f"  ~{n} seeds", fontsize=6, va="center", color=VC[d["verdict"]])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups)
    ax.invert_yaxis()
    ax.set_xlabel("drop(other) - drop(NODEs-UNet), pp: > 0 = NODEs-UNet more robust (colour = verdict)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_adversarial(s: dict):
    """White-cell IoU against the attack budget: the strongest attack per photograph (band: 95 %)
    and, dotted, white-box PGD alone."""
    import matplotlib.pyplot as plt
    a = s["adversarial"]
    x = [0] + [float(e.split("/")[0]) for e in a["eps"]]
    fig, ax = plt.subplots(figsize=(5.6, 2.9))
    for m in MODELS:
        k = _idx(m)
        y = [a["clean"][k]] + [a["strongest"][j][k] for j in range(len(a["eps"]))]
        lo = [a["clean"][k]] + [a["strongest_ci"][j][k][0] for j in range(len(a["eps"]))]
        hi = [a["clean"][k]] + [a["strongest_ci"][j][k][1] for j in range(len(a["eps"]))]
        ax.plot(x, y, "o-", color=COLOURS[m], label=TITLES[m])
        ax.fill_between(x, lo, hi, color=COLOURS[m], alpha=0.12)
        ax.plot(x, [a["clean"][k]] + a["attacks"][m]["pgd"], ":", color=COLOURS[m])
    ax.set_xlabel("eps (grey levels of 255, L-infinity, on the network's input)")
    ax.set_ylabel("white-cell IoU (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_convergence(records: list[dict]):
    """Validation loss per epoch of each trained model: the mean over its seeds, the band their range."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 2.9))
    for m in ("unet", "resunet", "nodes-unet"):
        hs = [r["history"] for r in records if r["label"] == m and r["history"]]
        if not hs:
            continue
        n = min(len(h) for h in hs)
        v = np.array([[e["val_loss"] for e in h[:n]] for h in hs])
        ep = np.arange(1, n + 1)
        ax.plot(ep, v.mean(0), "o-", ms=3, color=COLOURS[m], label=f"{TITLES[m]} ({len(hs)} seeds)")
        ax.fill_between(ep, v.min(0), v.max(0), color=COLOURS[m], alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def show_attack(seg, sample, eps: float = 4 / 255, steps: int = 10, seed: int = 0):
    """One photograph attacked by PGD on ``seg``: the network's input, the perturbation x50, the
    attacked input, the gold mask, the clean and the attacked masks (with their white-cell IoU)."""
    import matplotlib.pyplot as plt
    from ..classes import colourise_mask
    from . import perturb as P
    P.use_solver(seg)
    x, hw = P.network_input(seg, sample.image)
    target = P.white_target(sample.mask, hw, tuple(x.shape[-2:]))
    delta, losses = P.pgd(seg.model, x, target, eps, steps, seed=seed)
    clean = P.mask_from_input(seg.model, x, hw, sample.mask.shape)
    attacked = P.mask_from_input(seg.model, x + delta, hw, sample.mask.shape)

    def iou(m):
        c = np.array([((m == 1) & (sample.mask == 1)).sum(), ((m == 1) ^ (sample.mask == 1)).sum()])
        return 100 * c[0] / max(1, c.sum())
    img = lambda t: t[0, :, :hw[0], :hw[1]].permute(1, 2, 0).numpy()  # noqa: E731
    panels = [(img(x), "network input (CLAHE, x%.2g)" % (hw[0] / sample.image.shape[0])),
              (0.5 + 50 * img(delta), f"perturbation x50 (eps {eps * 255:g}/255)"),
              (img(x + delta), "attacked input"), (colourise_mask(sample.mask)[..., ::-1], "gold white cell (+ silver red)"),
              (colourise_mask(clean)[..., ::-1], f"clean: IoU {iou(clean):.1f}%"),
              (colourise_mask(attacked)[..., ::-1], f"PGD-{steps}: IoU {iou(attacked):.1f}%")]
    fig, axes = plt.subplots(1, 6, figsize=(13, 2.4))
    for ax, (im, t) in zip(axes, panels):
        ax.imshow(np.clip(im, 0, 1) if im.dtype != np.uint8 else im)
        ax.set_title(t, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig, dict(losses=losses, clean_iou=iou(clean), attacked_iou=iou(attacked),
                     max_abs_delta=float(delta.abs().max()))


def as_jpeg(fig, quality: int = 60, max_width: int = 760):
    """A photograph panel as a small JPEG (``max_width`` px, ``quality``); closes ``fig``."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image as Picture
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt.close(fig)
    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, optimize=True)
    return Picture(data=out.getvalue(), format="jpeg")


def plot_allidb2(rows: list[dict]):
    """White-cell IoU on BCCD's test photographs and, zero-shot, on ALL-IDB2 (fixed scale and product rules)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 2.9))
    x = np.arange(len(rows))
    for j, (key, lab, hatch) in enumerate((("bccd", "BCCD test (72)", ""), ("allidb2_fixed", "ALL-IDB2, fixed scale", "//"),
                                           ("allidb2", "ALL-IDB2, colour + scale rules", ""))):
        vals = [r[key] for r in rows]
        err = None
        if key != "bccd":
            err = np.array([[r[key] - r[f"{key}_ci"][0], r[f"{key}_ci"][1] - r[key]] for r in rows]).T
        ax.bar(x + (j - 1) * 0.27, vals, 0.27, yerr=err, capsize=2, label=lab, hatch=hatch,
               color=["#8c959f", "#d0d7de", "#57606a"][j])
    ax.set_xticks(x)
    ax.set_xticklabels([r["model"] for r in rows], fontsize=8)
    ax.set_ylim(50, 100)
    ax.set_ylabel("white-cell IoU (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_units(records: list[dict]):
    """Per model and seed: the clean white-cell IoU (left) and the unit's CPU time (right)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.6))
    for i, m in enumerate(MODELS):
        mine = sorted((r for r in records if r["label"] == m), key=lambda r: r["seed"])
        iou = [100 * np.sum(r["clean"]["white"], 0)[0] / max(1, np.sum(r["clean"]["white"])) for r in mine]
        axes[0].plot([i] * len(iou), iou, "o", color=COLOURS[m], alpha=0.7)
        axes[1].bar([i + (k - len(mine) / 2) * 0.15 for k in range(len(mine))], [r.get("cpu_s", 0) / 60 for r in mine],
                    0.14, color=COLOURS[m])
    for ax, t in zip(axes, ("clean white-cell IoU (%), one dot per seed", "CPU minutes per unit (one bar per seed)")):
        ax.set_xticks(range(len(MODELS)))
        ax.set_xticklabels([TITLES[m] for m in MODELS], fontsize=7)
        ax.set_title(t, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_families(image: np.ndarray, mask: np.ndarray, width: int = 240):
    """The centre of one photograph, clean and under every family at its largest strength."""
    import cv2
    import matplotlib.pyplot as plt
    panels = [("clean", image)]
    for fam, f in FAMILIES.items():
        s = max(f.levels)
        panels.append((f"{f.title}\n{f.unit} = {s:g}", perturb_image(fam, s, image, mask)))
    h0, w0 = image.shape[:2]
    fig, axes = plt.subplots(2, 4, figsize=(10, 4.1))
    for ax, (t, im) in zip(axes.flat, panels):
        h, w = im.shape[:2]                   # the centre, as large as half the clean photograph
        crop = im[(h - h0 // 2) // 2:(h + h0 // 2) // 2, (w - w0 // 2) // 2:(w + w0 // 2) // 2]
        small = cv2.resize(crop, (width, max(1, round(crop.shape[0] * width / crop.shape[1]))),
                           interpolation=cv2.INTER_AREA)
        ax.imshow(small[..., ::-1])
        ax.set_title(t, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def perturb_image(family: str, strength: float, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from .perturb import perturb
    return perturb(family, strength, image, mask, seed=0)[0]
