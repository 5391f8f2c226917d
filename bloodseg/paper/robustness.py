"""Stain and camera shifts at test time: how much white-cell IoU the shipped checkpoint loses.

A smear photographed in another laboratory differs in stain (more or less haematoxylin- or
eosin-like dye), lamp colour, camera tone curve, compression and focus. :data:`SHIFTS` names a
fixed set of such shifts, each one transform of :mod:`bloodseg.stain` with fixed parameters:

* ``hed_h+`` / ``hed_h-`` — haematoxylin optical density x1.25 + 0.05 / x0.75 - 0.05;
* ``hed_e+`` / ``hed_e-`` — the same on eosin (on BCCD's Giemsa-like stain eosin moves the pink of
  red cells and cytoplasm, haematoxylin the purple of nuclei and the blue tint);
* ``warm`` / ``cool`` — white-balance gains (B, G, R) = (0.9, 1, 1.1) / (1.1, 1, 0.9);
* ``gamma_0.74`` / ``gamma_1.35`` — tone curve ``255 (x/255) ** g`` (brighter / darker mid-tones);
* ``jpeg_30`` — JPEG re-compression at quality 30;
* ``blur_1.5`` — Gaussian blur, sigma 1.5 px at the photograph's native resolution (640x480).

The shifts are as large as :func:`bloodseg.stain.random_stain` draws at strength 1, so a model
trained with ``DataRecipe.stain = 1`` has seen each of them. :data:`STRONG_SHIFTS` go beyond that
range (a 20 % colour cast, haematoxylin x1.5, eosin x0.5, gamma 1.6, heavy blur with JPEG 20); they
are reported beside the goal, not judged by it.

:func:`stain_shift_scores` runs a :class:`~bloodseg.Segmenter` exactly as ``bloodseg predict``
does (``Segmenter.predict`` with its defaults: calibrated solver, automatic scale, its white-cell
cleanup) on every photograph unshifted and under every shift, and scores the gold white-cell
masks: IoU pooled over the photographs (the book's convention), per-photograph IoU, the drop from
unshifted in percentage points, and 95 % bootstrap intervals of the paired drop over photographs
(:func:`bloodseg.paper.stats.paired_bootstrap` for the mean per-photograph drop; the pooled drop
with the same resampling of photographs). :func:`run_record` (``bloodseg record stain``, or ``python -m bloodseg.paper.robustness``)
writes ``book/results/robustness/stain.json`` on the 72 BCCD test photographs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import stain as S
from ..classes import WHITE_CELL
from .records import provenance, results_path, write_record
from .stats import LEVEL, N_BOOT, paired_bootstrap, verdict

__all__ = ["SHIFTS", "STRONG_SHIFTS", "apply_shift", "score_photo", "stain_shift_scores", "GOAL_PP", "run_record"]

#: The issue's goal: white-cell IoU within this many percentage points of unshifted, per shift.
GOAL_PP = 2.0

#: name -> (function of :mod:`bloodseg.stain`, keyword arguments)
SHIFTS: dict[str, tuple[str, dict]] = {
    "hed_h+": ("hed_jitter", {"scale": (1.25, 1.0, 1.0), "shift": (0.05, 0.0, 0.0)}),
    "hed_h-": ("hed_jitter", {"scale": (0.75, 1.0, 1.0), "shift": (-0.05, 0.0, 0.0)}),
    "hed_e+": ("hed_jitter", {"scale": (1.0, 1.25, 1.0), "shift": (0.0, 0.05, 0.0)}),
    "hed_e-": ("hed_jitter", {"scale": (1.0, 0.75, 1.0), "shift": (0.0, -0.05, 0.0)}),
    "warm": ("white_balance", {"gains": (0.9, 1.0, 1.1)}),
    "cool": ("white_balance", {"gains": (1.1, 1.0, 0.9)}),
    "gamma_0.74": ("gamma", {"g": 0.74}),
    "gamma_1.35": ("gamma", {"g": 1.35}),
    "jpeg_30": ("jpeg", {"quality": 30}),
    "blur_1.5": ("blur", {"sigma": 1.5}),
}

#: Shifts beyond the training augmentation's range (reported, not part of the goal).
STRONG_SHIFTS: dict[str, tuple[str, dict]] = {
    "wb_cool_0.2": ("white_balance", {"gains": (1.2, 1.0, 0.8)}),
    "wb_warm_0.2": ("white_balance", {"gains": (0.8, 1.0, 1.2)}),
    "hed_h_x1.5": ("hed_jitter", {"scale": (1.5, 1.0, 1.0), "shift": (0.1, 0.0, 0.0)}),
    "hed_e_x0.5": ("hed_jitter", {"scale": (1.0, 0.5, 1.0), "shift": (0.0, -0.1, 0.0)}),
    "gamma_1.6": ("gamma", {"g": 1.6}),
    "blur3+jpeg20": (None, {"sigma": 3.0, "quality": 20}),
}


def apply_shift(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` under the shift ``name`` of :data:`SHIFTS` ("none": unchanged)."""
    if name == "none":
        return image
    fn, kwargs = SHIFTS[name] if name in SHIFTS else STRONG_SHIFTS[name]
    if fn is None:          # blur, then JPEG
        return S.jpeg(S.blur(image, kwargs["sigma"]), kwargs["quality"])
    return getattr(S, fn)(image, **kwargs)


def _counts(pred: np.ndarray, truth: np.ndarray) -> list[int]:
    pw, tw = pred == WHITE_CELL, truth == WHITE_CELL
    return [int((pw & tw).sum()), int((pw & ~tw).sum()), int((~pw & tw).sum())]


def score_photo(segmenter, image: np.ndarray, truth: np.ndarray) -> tuple[float, list[int]]:
    """``(scale factor, [tp, fp, fn] of the white cells)`` of ``segmenter.predict`` on one image, run
    as ``bloodseg predict`` runs it: colour matched and scale measured once, then predicted."""
    p = segmenter.segment(image)
    return p.factor, _counts(p.mask, truth)


def _pooled_drop_ci(base: np.ndarray, shifted: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Bootstrap interval of pooled IoU(base) - IoU(shifted), photographs resampled (paired)."""
    rng = np.random.default_rng(seed)
    n = len(base)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    iou = lambda c: (w @ c[:, 0]) / (w @ c.sum(1))  # noqa: E731
    d = 100 * (iou(base) - iou(shifted))
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(d, [tail, 100 - tail])
    return float(lo), float(hi)


def stain_shift_scores(segmenter, samples, shifts=None, log: Callable[[str], None] | None = None,
                       n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Gold white-cell IoU of ``segmenter.predict`` on ``samples`` unshifted and under each shift.

    Returns ``{"none": row, shift: row, ...}``; a row holds ``white_iou_pooled``, ``white_iou_mean``
    (mean of per-photograph IoUs), ``per_photo_iou``, ``counts`` (tp, fp, fn per photograph),
    ``scale_factors`` (the automatic scale per photograph) and ``seconds``; a shift's row adds
    ``drop_pp`` (pooled, unshifted minus shifted, in pp; positive = worse), ``drop_pp_ci``, and
    ``mean_drop_pp`` / ``mean_drop_pp_ci`` (per-photograph IoUs, :func:`paired_bootstrap`), and
    ``within_goal`` (pooled drop <= :data:`GOAL_PP`) and ``goal_verdict`` (does the whole interval of
    the pooled drop lie below the goal: "holds" / "does not hold" / "inconclusive").
    A photograph with neither gold nor predicted white pixels has IoU 1.
    """
    names = ["none"] + list(SHIFTS if shifts is None else shifts)
    out = {}
    for name in names:
        t0 = time.perf_counter()
        counts, factors = [], []
        for s in samples:
            factor, c = score_photo(segmenter, apply_shift(s.image, name), s.mask)
            factors.append(factor)
            counts.append(c)
        c = np.asarray(counts, np.int64)
        union = c.sum(1)
        per_photo = np.where(union > 0, c[:, 0] / np.maximum(union, 1), 1.0)
        row = {"white_iou_pooled": float(c[:, 0].sum() / c.sum()), "white_iou_mean": float(per_photo.mean()),
               "per_photo_iou": [float(v) for v in per_photo], "counts": c.tolist(),
               "scale_factors": factors, "seconds": round(time.perf_counter() - t0, 1)}
        if name != "none":
            base = out["none"]
            b = np.asarray(base["counts"], np.int64)
            row["drop_pp"] = 100 * (base["white_iou_pooled"] - row["white_iou_pooled"])
            row["drop_pp_ci"] = _pooled_drop_ci(b, c, n_boot, seed)
            paired = paired_bootstrap(per_photo, np.asarray(base["per_photo_iou"]), n_boot, seed)
            row["mean_drop_pp"] = 100 * paired["diff"]
            row["mean_drop_pp_ci"] = [100 * v for v in paired["ci"]]
            row["within_goal"] = bool(row["drop_pp"] <= GOAL_PP)
            row["goal_verdict"] = verdict(row["drop_pp_ci"], GOAL_PP, claim="less")
        out[name] = row
        if log:
            extra = (f", drop {row['drop_pp']:+.2f} pp [{row['drop_pp_ci'][0]:+.2f}, {row['drop_pp_ci'][1]:+.2f}]"
                     if name != "none" else "")
            log(f"{name}: pooled white IoU {row['white_iou_pooled']:.4f}{extra} ({row['seconds']} s)")
    return out


def run_record(args, command: str) -> dict:
    """``bloodseg record stain``: score the shipped checkpoint on the BCCD test photographs under
    the shifts; write the JSON record."""
    from ..bccd import bccd_source, prepare_cached
    from ..io import load_folder
    from ..segmenter import Segmenter, shipped_checkpoint

    args.work = args.work or "runs/robustness"
    args.json = args.out or results_path("robustness/stain.json")
    t_all = time.perf_counter()
    src, kind = bccd_source(args.bccd_src)
    prepare_cached(src, Path(args.work) / "bccd")
    test = load_folder(Path(args.work) / "bccd" / "test")[: args.limit]
    seg = Segmenter.load(shipped_checkpoint())
    seg.predict(test[0].image)                                  # warm-up, untimed
    rows = stain_shift_scores(seg, test, list(SHIFTS) + list(STRONG_SHIFTS), log=lambda m: print(m, flush=True))
    compare = None
    if seg.colour != "none":    # what the colour matching does: the same photographs with colour="none"
        print("the same with colour='none':", flush=True)
        compare = stain_shift_scores(seg.replace(colour="none"), test, list(STRONG_SHIFTS) + ["warm", "cool"],
                                     log=lambda m: print(m, flush=True))
    summary = {k: {"white_iou_pooled": round(r["white_iou_pooled"], 4), "white_iou_mean": round(r["white_iou_mean"], 4),
                   **({"drop_pp": round(r["drop_pp"], 2), "drop_pp_ci": [round(v, 2) for v in r["drop_pp_ci"]],
                       "mean_drop_pp": round(r["mean_drop_pp"], 2),
                       "mean_drop_pp_ci": [round(v, 2) for v in r["mean_drop_pp_ci"]],
                       "within_goal": r["within_goal"], "goal_verdict": r["goal_verdict"]} if k != "none" else {})}
               for k, r in rows.items()}
    record = {
        "what": f"shipped checkpoint ({shipped_checkpoint().name}, default settings as `bloodseg predict`: "
                "calibrated solver, automatic scale, colour matched to the training photographs' background "
                "when the checkpoint stores it, its white-cell cleanup) on the BCCD test photographs, "
                "unshifted and under fixed stain/camera shifts (bloodseg.paper.robustness.SHIFTS); gold "
                "white-cell IoU pooled over the photographs; drop = unshifted - shifted in pp (positive = "
                f"worse); 95 % paired bootstrap intervals over photographs ({N_BOOT} resamples)",
        "n_photographs": len(test), "bccd": f"{src} ({kind})",
        "shifts": {k: {"transform": f"bloodseg.stain.{fn}", **kw} for k, (fn, kw) in SHIFTS.items()},
        "goal": f"pooled white-cell IoU within {GOAL_PP} pp of unshifted for each shift",
        "strong_shifts": {k: ({"transform": f"bloodseg.stain.{fn}", **kw} if fn else
                              {"transform": "bloodseg.stain.blur then bloodseg.stain.jpeg", **kw})
                          for k, (fn, kw) in STRONG_SHIFTS.items()},
        "colour": seg.colour, "background": seg.background,
        "passed": [k for k, r in summary.items() if k in SHIFTS and r.get("within_goal")],
        "failed": [k for k, r in summary.items() if k in SHIFTS and not r["within_goal"]],
        "summary": summary, "rows": rows,
        "colour_none": None if compare is None else {
            "what": "the same checkpoint and photographs with colour='none' (the photographs' own colours)",
            "summary": {k: {"white_iou_pooled": round(r["white_iou_pooled"], 4),
                            **({"drop_pp": round(r["drop_pp"], 2)} if k != "none" else {})} for k, r in compare.items()},
            "rows": compare},
        "provenance": provenance(command, t_all),
    }
    write_record(record, Path(args.json))
    print(json.dumps(summary, indent=1))
    return record


if __name__ == "__main__":      # the records' commands `python -m bloodseg.paper.robustness` run `bloodseg record ...`
    import runpy
    import sys
    sys.argv = ["bloodseg", "record", "stain", *sys.argv[1:]]
    runpy.run_module("bloodseg.cli", run_name="__main__")
