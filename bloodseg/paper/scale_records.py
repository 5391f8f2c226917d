"""The records of the shipped checkpoint's automatic scale and calibrated solver (chapter 8, the
checkpoint's README), each a ``bloodseg record`` entry on the BCCD photographs (``--bccd-src``,
default ``$BLOODSEG_BCCD``, else the vendored sample), prepared under ``--work``:

* ``scale-calibration`` -> ``scale/calibration.json`` (:func:`scale_calibration`): the red-cell
  diameter (:func:`bloodseg.scale.red_cell_diameter`) of the prepared photographs of each split at
  full size; the training split's median times the checkpoint's ``input_scale`` is the diameter
  the automatic scale aims for.
* ``scale-resized`` -> ``scale/bccd_resized.json`` (:func:`scale_resized`): the shipped checkpoint
  on the test photographs resized by each of :data:`FACTORS`, with its stored ``input_scale``
  (fixed) and with the automatic scale, as :meth:`~bloodseg.Segmenter.segment` runs them.
* ``calibration-shipped`` -> ``calibration/shipped.json`` (:func:`calibration_shipped`): the
  checkpoint's ODE solver calibrated on the validation photographs (gold white-cell IoU of the raw
  masks), then the trained and the calibrated solver scored and timed side by side on the test
  photographs. The shipped checkpoint is never written; the calibrated copy goes to ``--work``.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from ..errors import BloodsegError
from ..measure import interleaved_times
from ..ode import ode_blocks
from ..scale import red_cell_diameter
from ..scoring import white_counts, white_scores
from .records import provenance, write_record

__all__ = ["FACTORS", "SHIPPED_GOAL", "scale_calibration", "scale_resized", "calibration_shipped", "run_record"]

#: Resize factors of the test photographs in ``scale/bccd_resized.json``.
FACTORS = (0.5, 0.7, 1.0, 1.4, 2.0)
#: The calibration's goal: gold white-cell IoU of the raw masks within 0.3 pp of the trained
#: solver's recorded 0.8969, in at most 0.35 x its time.
SHIPPED_GOAL = {"iou_raw_reference": 0.8969, "max_drop_pp": 0.3, "max_time_ratio": 0.35}
_RECORDS = {"scale-calibration": "scale/calibration.json", "scale-resized": "scale/bccd_resized.json",
            "calibration-shipped": "calibration/shipped.json"}


def _quantiles(values) -> dict:
    ok = np.array([x for x in values if x is not None], dtype=float)
    return {"median": float(np.median(ok)), "q10": float(np.quantile(ok, .1)), "q90": float(np.quantile(ok, .9)),
            "q25": float(np.quantile(ok, .25)), "q75": float(np.quantile(ok, .75)),
            "n_none": sum(x is None for x in values)}


def scale_calibration(folders: dict, input_scale: float, log=print) -> dict:
    """``red_cell_diameter`` of every photograph of each split (``{split: samples}``) at full size:
    ``{"splits": {split: {n_images, n_none, median_px, q10_px, q90_px, iqr_px}}, "input_scale",
    "target_diameter_network_px"}`` (the training split's median x ``input_scale``)."""
    out = {}
    for split, samples in folders.items():
        q = _quantiles([red_cell_diameter(s.image) for s in samples])
        out[split] = {"n_images": len(samples), "n_none": q["n_none"], "median_px": q["median"], "q10_px": q["q10"],
                      "q90_px": q["q90"], "iqr_px": [q["q25"], q["q75"]]}
        log(f"{split} {out[split]}")
    return {"input_scale": input_scale, "target_diameter_network_px": input_scale * out["train"]["median_px"],
            "splits": out}


def _resize(image: np.ndarray, f: float) -> np.ndarray:
    return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def scale_resized(seg, samples, factors=FACTORS, log=print) -> dict:
    """``seg`` (automatic scale) and the same with its stored ``input_scale`` (fixed) on ``samples``
    resized by each factor (cv2 INTER_AREA down, INTER_LINEAR up; gold masks nearest): gold
    white-cell IoU pooled over the photographs, the measured red-cell diameters and the factors the
    automatic scale chose; each row's difference to the native (factor 1) fixed score."""
    if seg.scale != "auto":
        raise BloodsegError(f"scale_resized needs a Segmenter with scale='auto'; it has {seg.scale!r}")
    fixed = seg.replace(scale="fixed")
    rows = []
    for f in factors:
        t0 = time.perf_counter()
        counts = {"fixed": np.zeros(3, np.int64), "auto": np.zeros(3, np.int64)}
        diameters, used = [], []
        for s in samples:
            image = _resize(s.image, f)
            gold = cv2.resize(s.mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
            diameters.append(red_cell_diameter(image))
            auto = seg.segment(image)
            used.append(auto.factor)
            pf = auto.mask if auto.factor == fixed.input_scale else fixed.segment(image).mask
            counts["fixed"] += white_counts(pf, gold)
            counts["auto"] += white_counts(auto.mask, gold)
        q = _quantiles(diameters)
        row = {"factor": f, "n_images": len(samples),
               "white_iou_fixed": white_scores(*map(int, counts["fixed"]))["iou"],
               "white_iou_auto": white_scores(*map(int, counts["auto"]))["iou"],
               "diameter_px": {"median": q["median"], "q10": q["q10"], "q90": q["q90"],
                               "median_over_factor": q["median"] / f, "n_none": q["n_none"]},
               "auto_factor": {"median": float(np.median(used)), "min": float(min(used)), "max": float(max(used)),
                               f"share_at_trained_{fixed.input_scale:g}": float(np.mean([u == fixed.input_scale
                                                                                         for u in used]))},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        log(row)
    native = next(r for r in rows if r["factor"] == 1.0)["white_iou_fixed"]
    for r in rows:
        r["auto_minus_native_pp"] = round(100 * (r["white_iou_auto"] - native), 2)
        r["fixed_minus_native_pp"] = round(100 * (r["white_iou_fixed"] - native), 2)
    return {"target_red_diameter_network_px": seg.red_cell_diameter, "native_white_iou": native, "rows": rows}


def calibration_shipped(val, test, out_ckpt, max_drop_pp: float = SHIPPED_GOAL["max_drop_pp"], log=print) -> dict:
    """Calibrate the shipped checkpoint on ``val`` (gold white-cell IoU of the raw masks; the copy
    is saved to ``out_ckpt``), then score the trained and the calibrated solver on ``test`` side by
    side: raw and cleaned masks, each predict timed (:func:`bloodseg.measure.interleaved_times`,
    one photograph a round, which solver goes first alternating), NFE per block, and whether the
    calibrated copy loaded with ``exact=True`` gives the trained solver's masks bit for bit."""
    from ..calibrate import white_iou_score
    from ..segmenter import Segmenter, shipped_checkpoint

    shipped = Segmenter.load(shipped_checkpoint())            # the default path (no solver stored)
    cal = shipped.calibrate(val, max_drop_pp=max_drop_pp, score=white_iou_score, log=log)
    cal.save(out_ckpt)
    calibration = cal.metrics["calibration"]
    log(f"chosen: {calibration['chosen_label']}")
    runs = {"trained": Segmenter.load(shipped_checkpoint()), "calibrated": Segmenter.load(out_ckpt)}
    exact = Segmenter.load(out_ckpt, exact=True)
    for seg in runs.values():                                  # warm-up, untimed
        seg.predict(test[0].image, postprocess=False)
    acc = {k: {"raw": np.zeros(3, np.int64), "cleaned": np.zeros(3, np.int64), "nfe": {}} for k in runs}
    last, same = {}, [True]

    def job(name, postprocess):
        def run(s):
            last["pred"] = runs[name].predict(s.image, postprocess=postprocess)
        return run

    def score(label, i, s):
        name, kind = label.split()
        a, pred = acc[name], last["pred"]
        a[kind] += white_counts(pred, s.mask)
        if kind == "raw":
            for b in ode_blocks(runs[name].model):
                a["nfe"][b.name] = a["nfe"].get(b.name, 0) + int(b.nfe_forward)
            if name == "trained" and i < 8:   # the --exact path of the calibrated copy: bit-identical?
                same[0] &= bool(np.array_equal(pred, exact.predict(s.image, postprocess=False)))

    jobs = {f"{name} {kind}": job(name, pp) for name in runs for kind, pp in (("raw", False), ("cleaned", None))}
    turns = lambda i, labels: labels if i % 2 == 0 else labels[2:] + labels[:2]   # noqa: E731
    times = interleaved_times(jobs, lambda i: [test[i]], len(test), order=turns, after=score)
    n = len(test)
    results = {k: {"white_iou_raw": white_scores(*map(int, a["raw"]))["iou"],
                   "white_iou_cleaned": white_scores(*map(int, a["cleaned"]))["iou"],
                   "predict_s_per_photo_raw": sum(times[f"{k} raw"]) / n,
                   "predict_s_per_photo_cleaned": sum(times[f"{k} cleaned"]) / n,
                   "nfe_per_block": {b: v / n for b, v in a["nfe"].items()}} for k, a in acc.items()}
    t, c = results["trained"], results["calibrated"]
    ratio_raw = c["predict_s_per_photo_raw"] / t["predict_s_per_photo_raw"]
    goal = {**SHIPPED_GOAL, "iou_ok": abs(c["white_iou_raw"] - SHIPPED_GOAL["iou_raw_reference"])
            <= SHIPPED_GOAL["max_drop_pp"] / 100 + 1e-12, "time_ok": ratio_raw <= SHIPPED_GOAL["max_time_ratio"],
            "time_ratio_raw": ratio_raw,
            "time_ratio_cleaned": c["predict_s_per_photo_cleaned"] / t["predict_s_per_photo_cleaned"]}
    goal["met"] = goal["iou_ok"] and goal["time_ok"]
    return {"what": f"ODE-solver calibration of the shipped checkpoint ({shipped_checkpoint().name}): chosen on the "
                    f"{len(val)} BCCD validation photographs by gold white-cell IoU of the raw masks (max drop "
                    f"{max_drop_pp} pp), then the {n} BCCD test photographs scored with the trained solver and the "
                    "calibrated one side by side in one process",
            "chosen": calibration["chosen"], "chosen_label": calibration["chosen_label"], "validation": calibration,
            "test": results, "goal": goal, "exact_path_bit_identical_first_8_test_photos": same[0],
            "calibrated_checkpoint": str(out_ckpt)}


def run_record(args, command: str) -> dict:
    """``bloodseg record scale-calibration|scale-resized|calibration-shipped [--bccd-src DIR] [--work
    DIR] [--limit N] [--out PATH]``: prepare the BCCD photographs, measure, write the record."""
    from ..bccd import bccd_source, prepare_cached
    from ..io import load_folder
    from ..segmenter import Segmenter, shipped_checkpoint

    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)     # noqa: E731
    work = Path(args.work or ("runs/calibration" if args.what == "calibration-shipped" else "runs/scale"))
    src, kind = bccd_source(args.bccd_src)
    prepare_cached(src, work / "bccd")
    split = lambda name: load_folder(work / "bccd" / name)[: args.limit]   # noqa: E731
    bccd = f"{src} ({kind})"
    if args.what == "scale-calibration":
        seg = Segmenter.load(shipped_checkpoint())
        record = {"what": "red_cell_diameter (bloodseg.scale) of the prepared BCCD photographs, at full size "
                          "(640x480)", "bccd": bccd,
                  **scale_calibration({s: split(s) for s in ("train", "val", "test")}, seg.input_scale, log)}
    elif args.what == "scale-resized":
        seg = Segmenter.load(shipped_checkpoint())
        record = {"what": "shipped checkpoint (calibrated solver, its colour matching when stored, its white-cell "
                          "cleanup) on the BCCD test photographs resized by each factor (cv2 INTER_AREA down / "
                          "INTER_LINEAR up; gold masks nearest); gold white-cell IoU pooled over the images; fixed = "
                          f"stored input_scale {seg.input_scale:g}, auto = Segmenter scale='auto'", "bccd": bccd,
                  "goal": "auto within 2 pp of the native score at every factor", **scale_resized(seg, split("test"),
                                                                                                  log=log)}
    elif args.what == "calibration-shipped":
        record = calibration_shipped(split("val"), split("test"), work / f"{shipped_checkpoint().stem}-calibrated.pt",
                                     log=log)
        record["bccd"] = bccd
    else:
        raise BloodsegError(f"scale_records writes {', '.join(_RECORDS)}; not {args.what!r}")
    record["provenance"] = provenance(command, t0)
    write_record(record, Path(args.out) if args.out else _RECORDS[args.what])
    return record

