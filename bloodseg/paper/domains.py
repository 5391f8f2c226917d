"""Every microscope we have: the domain table, and the one rule that changes a default.

A segmenter trained on one microscope's photographs meets others. The book has two real domains
with expert white-cell masks and one synthetic one:

* **BCCD** (the training domain): whole 640x480 fields; its validation split chooses, its test
  split reports;
* **ALL-IDB2** (:func:`bloodseg.domains.load_allidb2`): 257x257 crops around one white cell from
  another microscope and camera; the odd-numbered crops choose, the even-numbered ones report;
  never trained on;
* **synthetic** smears (:func:`bloodseg.synthetic.make_smear`, held-out seeds), exact labels, at
  half BCCD's magnification.

:func:`domain_table` scores a :class:`~bloodseg.Segmenter` on each domain as ``bloodseg predict``
runs it, and with each of its rules switched off (:data:`SETTINGS`): pooled gold white-cell IoU
with a 95 % interval over images. Every later decision reads it.

:func:`judge` is the one adoption rule (:data:`ADOPTION_RULE`), written before any run: a new
network or default replaces the shipped one only if the worst choosing domain's white-cell IoU
rises by at least 1 point and no choosing domain drops by more than 0.3 points. ``bloodseg record
domains`` writes the table (``book/results/domains/table.json``); every attempt, adopted or not,
is a record under ``book/results/domains/attempts/``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import stain as S
from ..classes import WHITE_CELL
from ..datasets import prepared_photographs
from ..domains import allidb2_dir, load_allidb2
from ..errors import DataError
from ..io import Sample, load_folder
from ..scale import CROP_SIDE, is_crop
from ..scoring import evaluate_photos, pooled_iou_ci, white_counts, white_scores
from ..stain import background_colour, match_background
from ..synthetic import make_smear
from .records import load_record, provenance, write_record

__all__ = ["CHOOSE", "REPORT", "SETTINGS", "FIXED", "ADOPTION_RULE", "domain_samples", "score", "domain_table",
           "judge", "plot_crop_rule", "ATTEMPTS", "RETRAIN_PLANS", "COLOUR_SHIFTS", "CROP_SIDE", "carried_rows", "confident_factor", "crops_unmatched_prepare", "choose_scores", "attempt_record", "table_frame", "plot_table", "attempts_frame", "plot_attempts", "load_attempts", "run_record"]

#: The choosing halves (the adoption rule reads these) and the reporting ones.
CHOOSE = ("bccd-val", "allidb2-odd")
REPORT = ("bccd-test", "allidb2-even", "synthetic")

#: Fixed scales tried for "the best fixed scale" (an oracle: the best of them on the same images).
FIXED = (0.35, 0.5, 0.7, 1.0, 1.4)

#: name -> Segmenter.replace arguments: the pipeline as shipped, and each rule switched off.
SETTINGS = {"default": {}, "scale fixed (trained)": {"scale": "fixed"}, "colour none": {"colour": "none"},
            "crop cells all": {"crop_cells": "all"},
            **{f"fixed {f:g}": {"scale": "fixed", "input_scale": f} for f in FIXED}}

#: Segmenter settings that act on crops only (bloodseg.scale.is_crop): on a domain of whole fields
#: they change nothing, so a row that differs from another only in them is that row.
CROP_ONLY = ("crop_cells",)

ADOPTION_RULE = ("adopt only if the worst choosing domain's pooled white-cell IoU (BCCD validation, ALL-IDB2 odd "
                 "half) rises by >= 1 point and no choosing domain drops by more than 0.3 points")

#: Held-out synthetic smears of the domain table (seeds 20000, 20001, ...).
SYNTHETIC_SEEDS, SYNTHETIC_SIZE = 20_000, (480, 640)


def domain_samples(name: str, limit: int | None = None) -> tuple[list[Sample], bool]:
    """``(samples, red_labelled)`` of a domain: ``bccd-val``, ``bccd-test`` (the BCCD copy of
    ``$BLOODSEG_BCCD``, else the vendored sample), ``allidb2-odd``, ``allidb2-even`` or
    ``synthetic`` (24 smears); ``limit``: the first N only."""
    if name in ("bccd-val", "bccd-test"):
        return load_folder(prepared_photographs("bccd") / name.split("-")[1])[:limit], True
    if name in ("allidb2-odd", "allidb2-even"):
        return load_allidb2(name.split("-")[1], limit=limit), False
    if name == "synthetic":
        out = []
        for i in range(24 if limit is None else limit):
            image, mask = make_smear(SYNTHETIC_SEEDS + i, size=SYNTHETIC_SIZE)
            out.append(Sample(f"synthetic_{SYNTHETIC_SEEDS + i}", image, mask, f"synthetic_{SYNTHETIC_SEEDS + i}"))
        return out, True
    raise DataError(f"unknown domain {name!r}: choose from {', '.join(CHOOSE + REPORT)}")


def score(seg, samples, red_labelled: bool = False, factor: Callable | None = None,
          prepare: Callable | None = None) -> dict:
    """Pooled white-cell IoU of ``seg`` (a Segmenter, run by :meth:`~bloodseg.Segmenter.segment`) on
    ``samples``: ``{"white_iou", "ci", "counts" (per image), "factors", "seconds"}``. ``factor``: a
    function of the colour-matched photograph giving the scale (a candidate scale rule) instead of
    the Segmenter's own; ``prepare``: a candidate colour rule instead of :meth:`~bloodseg.Segmenter.prepare`."""
    t0 = time.perf_counter()
    if factor is None and prepare is None:
        r = evaluate_photos(seg, samples, red_labelled=red_labelled)
        counts, factors = [row["counts"] for row in r["per_image"]], r["factors"]
    else:
        counts, factors = [], []
        for s in samples:
            image = (prepare or seg.prepare)(s.image)
            f = float((factor or seg.scale_for)(image))
            counts.append(white_counts(seg.segment(image, input_scale=f, prepared=True).mask, s.mask).tolist())
            factors.append(f)
    c = np.asarray(counts, np.int64).reshape(-1, 3)
    return {"white_iou": float(c[:, 0].sum() / max(c.sum(), 1)), "ci": pooled_iou_ci(c), "counts": c.tolist(),
            "factors": [round(f, 4) for f in factors], "seconds": round(time.perf_counter() - t0, 1)}


def _whole_field_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in CROP_ONLY}


def carried_rows(reuse: dict | None, seg, domain: str, samples, limit) -> list[dict]:
    """The rows of ``domain`` that a table made of the same settings (``reuse``, a domain-table
    record) already holds and that cannot have changed since: every photograph of the domain is a
    whole field (the crop rules of the Segmenter never run on it) and the record was made with
    ``seg``'s settings, save those that act on crops only (:data:`CROP_ONLY`), on as many
    photographs. Each is marked ``carried_from``; a setting the record lacks that changes crop-only
    settings alone is the record's default row, marked ``same_as: "default"``."""
    if (not reuse or any(is_crop(s.image) for s in samples)
            or _whole_field_settings(reuse.get("settings") or {}) != _whole_field_settings(json_safe(seg.settings()))):
        return []
    held = {r["setting"]: dict(r, carried_from=reuse["path"]) for r in reuse["rows"]
            if r["domain"] == domain and r["n_images"] == len(samples)}
    rows = []
    for name, change in SETTINGS.items():
        if name in held:
            rows.append(held[name])
        elif "default" in held and change and set(change) <= set(CROP_ONLY):
            rows.append(dict(held["default"], setting=name, same_as="default"))
        else:
            return []
    return rows + [held[k] for k in held if k not in SETTINGS]


def domain_table(seg, domains=REPORT, settings=SETTINGS, limit: int | None = None,
                 log: Callable[[str], None] | None = None, reuse: dict | None = None) -> list[dict]:
    """One row per (domain, setting): the domain, the setting, images, pooled white-cell IoU and its
    95 % interval over images, the median scale factor; plus a row "best fixed scale" per domain
    (the best of the ``fixed *`` rows on the same images: an oracle, not a rule). ``reuse``: an
    earlier table whose rows :func:`carried_rows` may carry instead of scoring them again."""
    rows = []
    for d in domains:
        if d.startswith("allidb2") and allidb2_dir() is None:
            if log:
                log(f"{d}: ALL-IDB2 not found ($BLOODSEG_ALLIDB2); skipped")
            continue
        samples, red = domain_samples(d, limit)
        carried = carried_rows(reuse, seg, d, samples, limit) if settings is SETTINGS else []
        if carried:
            rows += carried
            if log:
                log(f"{d}: every photograph a whole field; {len(carried)} rows carried from {reuse['path']}")
            continue
        for name, change in settings.items():
            r = score(seg.replace(**change) if change else seg, samples, red)
            rows.append({"domain": d, "setting": name, "n_images": len(samples), **r})
            if log:
                log(f"{d:>13} {name:>22}: {r['white_iou']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}], "
                    f"median factor {np.median(r['factors']):.2f} ({r['seconds']} s)")
        fixed = [r for r in rows if r["domain"] == d and r["setting"].startswith("fixed ")]
        if fixed:
            best = max(fixed, key=lambda r: r["white_iou"])
            rows.append({**best, "setting": "best fixed scale", "best_of": best["setting"]})
    return rows


def _paired_diff_ci(a, b, n_boot: int = 2000, seed: int = 0) -> list:
    """95 % interval of pooled IoU(b) - IoU(a) in points, images resampled together (paired)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(a), np.full(len(a), 1.0 / len(a)), size=n_boot).astype(np.float64)
    iou = lambda c: (w @ c[:, 0]) / np.maximum(w @ c.sum(1), 1)  # noqa: E731
    lo, hi = np.percentile(100 * (iou(b) - iou(a)), [2.5, 97.5])
    return [float(lo), float(hi)]


def judge(incumbent: dict, candidate: dict, rise_pp: float = 1.0, drop_pp: float = 0.3) -> dict:
    """The adoption rule on two ``{domain: score()}`` results over the choosing domains: per domain
    the IoUs, the difference (points) and its paired 95 % interval; the worst domain's rise; and
    ``adopt`` (True only when the worst rises by >= ``rise_pp`` and no domain drops by > ``drop_pp``)."""
    per = {}
    for d in incumbent:
        a, b = incumbent[d], candidate[d]
        per[d] = {"incumbent": a["white_iou"], "candidate": b["white_iou"],
                  "diff_pp": 100 * (b["white_iou"] - a["white_iou"]), "diff_pp_ci": _paired_diff_ci(a["counts"], b["counts"])}
    worst_inc = min(v["incumbent"] for v in per.values())
    worst_cand = min(v["candidate"] for v in per.values())
    rise = 100 * (worst_cand - worst_inc)
    worst_drop = min(v["diff_pp"] for v in per.values())
    adopt = rise >= rise_pp and worst_drop >= -drop_pp
    why = (f"worst domain {worst_inc:.4f} -> {worst_cand:.4f} ({rise:+.2f} points, needs >= +{rise_pp:g}); largest "
           f"drop {worst_drop:+.2f} points (allowed down to -{drop_pp:g})")
    return {"rule": ADOPTION_RULE, "domains": per, "worst_rise_pp": rise, "largest_drop_pp": worst_drop,
            "adopt": bool(adopt), "why": why}


def table_frame(record: dict):
    """The domain table as a DataFrame: rows = settings, columns = domains (IoU %, [interval])."""
    import pandas as pd
    rows = {}
    for r in record["rows"]:
        cell = f"{100 * r['white_iou']:.1f} [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]"
        if r["setting"] == "best fixed scale":
            cell += f" ({r['best_of']})"
        rows.setdefault(r["setting"], {})[f"{r['domain']} ({r['n_images']})"] = cell
    return pd.DataFrame(rows).T


def plot_table(record: dict, title: str = ""):
    """Pooled white-cell IoU of each setting on each domain with 95 % intervals (one panel per domain)."""
    import matplotlib.pyplot as plt
    domains = list(dict.fromkeys(r["domain"] for r in record["rows"]))
    fig, axes = plt.subplots(1, len(domains), figsize=(3.6 * len(domains), 3.4), squeeze=False, sharey=False)
    for ax, d in zip(axes[0], domains):
        rows = [r for r in record["rows"] if r["domain"] == d and r["setting"] != "best fixed scale"]
        y = 100 * np.array([r["white_iou"] for r in rows])
        ci = 100 * np.array([r["ci"] for r in rows])
        colours = ["C0" if r["setting"] == "default" else "C1" if not r["setting"].startswith("fixed") else "0.6"
                   for r in rows]
        ax.errorbar(range(len(rows)), y, yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="none", ecolor="k", lw=0.8)
        ax.scatter(range(len(rows)), y, c=colours, zorder=3)
        ax.set_xticks(range(len(rows)), [r["setting"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{d} ({rows[0]['n_images']} images)", fontsize=9)
        ax.axhline(y[0], color="C0", lw=0.7, ls=":")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("white-cell IoU % (pooled, 95% interval)")
    fig.suptitle(title or "The pipeline on every domain (blue: default; orange: a rule off; grey: fixed scales)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_crop_rule(seg, names=("Im113_1", "Im007_1", "Im091_1")):
    """The crop-cell rule at work, live: ALL-IDB2 crops of the choosing half segmented by ``seg``
    with every white cell kept and with the rule (``crop_cells``), false white pixels red, missed
    ones blue, the white-cell IoU of each in its title. None (with a line saying why) without ALL-IDB2."""
    import matplotlib.pyplot as plt
    if allidb2_dir() is None:
        print("ALL-IDB2 not found ($BLOODSEG_ALLIDB2 or ../shared/data/allidb2): no picture of the crop rule")
        return None
    crops = {s.name: s for s in load_allidb2("odd")}
    missing = [n for n in names if n not in crops]
    if missing:
        raise DataError(f"no ALL-IDB2 choosing crop named {missing}; the names are like Im001_1")
    fig, axes = plt.subplots(2, len(names), figsize=(2.9 * len(names), 6.0), squeeze=False)
    for j, name in enumerate(names):
        s = crops[name]
        for i, rule in enumerate(("all", "centre")):
            mask = seg.replace(crop_cells=rule).segment(s.image).mask
            pred, truth = mask == WHITE_CELL, s.mask == WHITE_CELL
            shown = s.image[..., ::-1].astype(np.float32)
            shown[pred & ~truth] = 0.45 * shown[pred & ~truth] + [140, 0, 0]
            shown[~pred & truth] = 0.45 * shown[~pred & truth] + [0, 0, 140]
            iou = white_scores(*white_counts(mask, s.mask))["iou"]
            ax = axes[i][j]
            ax.imshow(shown.clip(0, 255).astype(np.uint8))
            ax.set_title(f"{name}, crop_cells={rule!r}\nwhite-cell IoU {100 * iou:.1f} %", fontsize=8)
            ax.axis("off")
    fig.suptitle("The crop rule on ALL-IDB2 choosing crops (red: white where the expert drew none; "
                 "blue: the expert's white cell missed)", fontsize=9)
    fig.tight_layout()
    return fig


def attempts_frame(attempts: list[dict]):
    """One row per recorded attempt: what changed, each choosing domain before/after, the rule's verdict."""
    import pandas as pd
    rows = []
    for a in attempts:
        j = a["judgement"]
        row = {"attempt": a["name"], "what": a["what"][:90]}
        for d, v in j["domains"].items():
            row[f"{d} before"] = round(100 * v["incumbent"], 2)
            row[f"{d} after"] = round(100 * v["candidate"], 2)
        row.update({"worst rise (pp)": round(j["worst_rise_pp"], 2), "largest drop (pp)": round(j["largest_drop_pp"], 2),
                    "adopted": "yes" if j["adopt"] else "no"})
        rows.append(row)
    return pd.DataFrame(rows).set_index("attempt")


def plot_attempts(attempts: list[dict]):
    """Per attempt and choosing domain: the IoU difference (points) with its paired interval, the
    +1 point the worst domain must gain and the -0.3 point floor."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(attempts) + 1.6))
    for i, a in enumerate(attempts):
        for k, (d, v) in enumerate(a["judgement"]["domains"].items()):
            yy = i + (k - 0.5) * 0.3
            lo, hi = v["diff_pp_ci"]
            ax.plot([lo, hi], [yy, yy], color=f"C{k}", lw=2)
            ax.plot(v["diff_pp"], yy, "o", color=f"C{k}", label=d if i == 0 else None)
    ax.axvline(1.0, color="green", ls="--", lw=1, label="worst domain must gain 1 pp")
    ax.axvline(-0.3, color="red", ls="--", lw=1, label="no domain may lose 0.3 pp")
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(range(len(attempts)), [a["name"] for a in attempts], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("white-cell IoU change on the choosing domains (points, paired 95% interval)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


#: Every attempt to change a default, written down (here, committed) before it runs: name -> (what
#: changes, how the candidate pipeline is built from the incumbent Segmenter). ``retrain-*`` attempts
#: take the new checkpoint from ``--ckpt`` and keep the incumbent's defaults.
ATTEMPTS = {
    "scale-crops-confidence": ("automatic scale: a whole field as shipped (red cells measured); a crop (shorter side "
                               f"below {CROP_SIDE} px) at the factor among 1, 1.4 and 2 x the trained 0.5 at which the "
                               "network is most confident (mean largest class probability)",
                               lambda seg: {"seg": seg, "factor": confident_factor(seg)}),
    "colour-fields-unsaturated": ("colour matching only on whole fields (shorter side at least "
                                  f"{CROP_SIDE} px) whose background is not saturated in any channel (>= 250); "
                                  "crops and saturated photographs keep their own colours",
                                  lambda seg: {"seg": seg, "prepare": crops_unmatched_prepare(seg)}),
    "crop-centre-cell": ("on a crop (shorter side below "
                         f"{CROP_SIDE} px), the white cells cut by its border are dropped except the crop's own "
                         "cell, the white component nearest its centre (bloodseg.postprocess.keep_crop_cell, "
                         "Segmenter crop_cells='centre'); whole fields unchanged. Planned after looking at the "
                         "ALL-IDB2 odd crops: most of their false white pixels are neighbouring white cells cut by "
                         "the frame, which single-cell crops do not label",
                         lambda seg: {"seg": seg.replace(crop_cells="centre")}),
}


#: Retraining attempts, each planned (and committed) before its run: name -> the plan.
RETRAIN_PLANS = {
    "retrain-1": ("fine-tune the shipped NODEs-UNet (width 16) for domain shift on the 208 BCCD training photographs, "
                  "one Euler step per ODE-block (its calibrated solver) during training: patches drawn afresh every "
                  "epoch (bloodseg.shift, strength 0.7) at magnification x0.53-1.9 around the trained 0.5 "
                  "(log-uniform), half centred on a white cell, HED stain / white balance / gamma / blur / JPEG "
                  "(bloodseg.stain.random_stain), hue and saturation, a pink or yellow plasma tint up to 21 % per "
                  "channel, Gaussian noise up to 4.2 grey levels; learning rate 2e-4 with a cosine schedule over 4 "
                  "epochs of 1664 patches, batch 8, best epoch by the loss on 87 validation patches; then the "
                  "background colour and red-cell size measured again and the cleanup chosen again on the "
                  "validation photographs (bloodseg.shipping); no epoch started that would end after 100 minutes "
                  "(one CPU thread, a machine shared with other jobs). Judged with the defaults shipped at its "
                  "judging. Command: OMP_NUM_THREADS=1 bloodseg train-bccd --out runs/retrain-1 --init "
                  "bloodseg/data/checkpoints/bccd-nodes-unet-w16.pt --width 16 --model-option method=euler --shift "
                  "0.7 --finetune-lr 2e-4 --schedule cosine --epochs 4 --crops 8 --augment 1 --batch-size 8 "
                  "--val-images 0 --steps background,scale,cleanup --max-minutes 100"),
}


def run_record(args, command: str) -> dict:
    """``bloodseg record domains [--ckpt C] [--limit N] [--out PATH]``: the domain table of a
    checkpoint (default: the shipped one) on the reporting domains. ``bloodseg record domain-attempt
    --name NAME [--ckpt C]``: one attempt of :data:`ATTEMPTS` (or ``retrain-*`` with the new
    checkpoint ``--ckpt``) judged on the choosing domains against the shipped pipeline."""
    from ..segmenter import Segmenter, shipped_checkpoint
    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.what == "domain-attempt":
        shipped = Segmenter.load(shipped_checkpoint(), device="cpu")
        if args.name in ATTEMPTS:
            what, build = ATTEMPTS[args.name]
            candidate = build(shipped)
        elif args.name in RETRAIN_PLANS and args.ckpt:
            what, candidate = RETRAIN_PLANS[args.name], {"seg": Segmenter.load(args.ckpt, device="cpu")}
        else:
            raise DataError(f"--name must be one of {', '.join(ATTEMPTS)}, or one of {', '.join(RETRAIN_PLANS)} with --ckpt")
        log(f"{args.name}: {what}\nincumbent (the shipped pipeline):")
        inc = choose_scores({"seg": shipped}, args.limit, log=log)
        log("candidate:")
        cand = choose_scores(candidate, args.limit, log=log)
        rec = attempt_record(args.name, what, f"{what}. Rule, fixed before the run: {ADOPTION_RULE}.", inc, cand,
                             command, t0, candidate_settings=json_safe(candidate["seg"].settings()))
        log(f"{'ADOPT' if rec['judgement']['adopt'] else 'not adopted'}: {rec['judgement']['why']}")
        return rec
    ckpt = args.ckpt or shipped_checkpoint()
    seg = Segmenter.load(ckpt, device="cpu")
    reuse = None
    if getattr(args, "reuse", None):
        reuse = load_record(args.reuse)
        if reuse is None:
            raise DataError(f"--reuse {args.reuse}: no such record under book/results/ (e.g. domains/table_before.json)")
        reuse["path"] = str(args.reuse)
    rows = domain_table(seg, REPORT, limit=args.limit, log=log, reuse=reuse)
    record = {"what": (f"the domain table of {Path(ckpt).name}: pooled gold white-cell IoU (95% interval over images) "
                       "on each reporting domain, as `bloodseg predict` runs it and with each rule off; 'best fixed "
                       "scale' is the best fixed factor on the same images (an oracle)"),
              "settings": json_safe(seg.settings()), "rows": rows, "provenance": provenance(command, t0)}
    print(f"wrote {write_record(record, Path(args.out) if args.out else 'domains/table.json')}")
    return record


def json_safe(x):
    """``x`` as plain JSON values (tuples to lists, numpy numbers to floats)."""
    return json.loads(json.dumps(x, default=float))


def load_attempts() -> list[dict]:
    """Every recorded attempt under ``domains/attempts/`` (oldest first)."""
    from .records import results_path
    folder = results_path("domains/attempts")
    found = [load_record(f"domains/attempts/{p.name}") for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return sorted(found, key=lambda a: a["provenance"]["date"])


# ----------------------------------------------------------------------------- candidate defaults

def confident_factor(seg, candidates=(1.0, 1.4, 2.0)) -> Callable:
    """Candidate scale rule: a whole field as shipped (its red cells measured); a crop (shorter side
    below :data:`CROP_SIDE`), where red cells are few and cut by the border, at the factor among
    ``candidates`` x ``input_scale`` at which the network is most confident (the highest mean of its
    largest class probability over the picture; a tie goes to the smaller factor)."""
    def factor(image):
        if min(image.shape[:2]) >= CROP_SIDE:
            return seg.scale_for(image)
        best, best_conf = None, -1.0
        for c in candidates:
            f = c * seg.input_scale
            conf = float(seg.segment(image, False, probabilities=True, input_scale=f, prepared=True)
                         .probs.max(0).values.mean())
            if conf > best_conf + 1e-9:
                best, best_conf = f, conf
        return best
    return factor


def crops_unmatched_prepare(seg, level: float = 250.0) -> Callable:
    """Candidate colour rule: the background matching only where the background can be read: a whole
    field (shorter side at least :data:`CROP_SIDE`; on a crop the brightest pixels are as often cell as
    plasma) whose background is not saturated in any channel (>= ``level`` grey levels); otherwise
    the photograph's own colours."""
    def prepare(image):
        if (seg.colour == "none" or min(image.shape[:2]) < CROP_SIDE
                or np.any(background_colour(image) >= level)):
            return image
        return match_background(image, seg.background)
    return prepare


#: Constructed colour shifts of the BCCD validation photographs, reported beside every attempt (not judged):
#: a yellow plasma with saturated red and green, a pink plasma, a dim photograph.
COLOUR_SHIFTS = {"yellow, saturated": ("white_balance", {"gains": (0.7, 1.3, 1.35)}),
                 "pink": ("white_balance", {"gains": (1.05, 0.85, 1.12)}),
                 "dim": ("gamma", {"g": 1.8})}


def shifted(samples, name: str) -> list[Sample]:
    """``samples`` under the constructed colour shift ``name`` of :data:`COLOUR_SHIFTS`."""
    fn, kw = COLOUR_SHIFTS[name]
    return [Sample(s.name, getattr(S, fn)(s.image, **kw), s.mask, s.source) for s in samples]


def choose_scores(entry: dict, limit: int | None = None, shifts: bool = True,
                  log: Callable[[str], None] | None = None) -> dict:
    """``{domain: score()}`` of a pipeline ``entry`` (``{"seg", "factor"?, "prepare"?}``) on the
    choosing domains, and, with ``shifts``, on the BCCD validation photographs under each
    :data:`COLOUR_SHIFTS` (keys ``"bccd-val: <shift>"``)."""
    out = {}
    for d in CHOOSE:
        samples, red = domain_samples(d, limit)
        out[d] = score(entry["seg"], samples, red, entry.get("factor"), entry.get("prepare"))
        if log:
            log(f"  {d}: {out[d]['white_iou']:.4f} ({out[d]['seconds']} s)")
        if shifts and d == "bccd-val":
            for name in COLOUR_SHIFTS:
                out[f"{d}: {name}"] = score(entry["seg"], shifted(samples, name), red, entry.get("factor"),
                                            entry.get("prepare"))
                if log:
                    log(f"  {d}: {name}: {out[f'{d}: {name}']['white_iou']:.4f}")
    return out


def attempt_record(name: str, what: str, plan: str, incumbent: dict, candidate: dict, command: str,
                   started: float, **extra) -> dict:
    """Judge ``candidate`` against ``incumbent`` (both :func:`choose_scores`) by :func:`judge` on
    the choosing domains and write ``domains/attempts/<name>.json`` (the plan, both scores, the
    judgement, the constructed colour shifts for the record, provenance), adopted or not."""
    judgement = judge({d: incumbent[d] for d in CHOOSE}, {d: candidate[d] for d in CHOOSE})
    others = {k: {"incumbent": incumbent[k]["white_iou"], "candidate": candidate[k]["white_iou"]}
              for k in incumbent if k not in CHOOSE and k in candidate}
    record = {"name": name, "what": what, "plan": plan, "rule": ADOPTION_RULE, "judgement": judgement,
              "colour_shifts": others, "incumbent": incumbent, "candidate": candidate, **extra,
              "provenance": provenance(command, started)}
    write_record(json_safe(record), f"domains/attempts/{name}.json")
    return record
