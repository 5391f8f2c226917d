"""Calibrate the shipped checkpoint's ODE solver on BCCD validation photographs, then score the
trained solver and the calibrated one side by side on the 72 BCCD test photographs.

    OMP_NUM_THREADS=1 .venv/bin/python book/results/calibration/measure_shipped.py \
        --bccd-src "$BLOODSEG_BCCD" --work /tmp/bloodseg-calib \
        --out-ckpt /tmp/bloodseg-calib/bccd-nodes-unet-w16-calibrated.pt \
        --json book/results/calibration/shipped.json

The choice uses the validation photographs only (gold white-cell IoU of the network's own masks);
the test photographs are scored after it. The shipped checkpoint is never written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bloodseg.bccd import prepare_cached
from bloodseg.calibrate import solver_label, white_iou_score
from bloodseg.io import load_folder
from bloodseg.ode import ode_blocks
from bloodseg.segmenter import Segmenter, shipped_checkpoint


def _git(*args) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bccd-src", required=True)
    p.add_argument("--work", default="/tmp/bloodseg-calib")
    p.add_argument("--out-ckpt", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--max-drop", type=float, default=0.3)
    p.add_argument("--limit", type=int, help="first N photographs of each split (a quick check only)")
    args = p.parse_args()
    t_all = time.perf_counter()
    commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "bloodseg"))   # at the start
    prepare_cached(args.bccd_src, Path(args.work) / "bccd")
    val = load_folder(Path(args.work) / "bccd" / "val")
    test = load_folder(Path(args.work) / "bccd" / "test")
    if args.limit:
        val, test = val[:args.limit], test[:args.limit]

    shipped = Segmenter.load(shipped_checkpoint())            # the default path (no solver stored)
    cal = shipped.calibrate(val, max_drop_pp=args.max_drop, score=white_iou_score,
                            log=lambda m: print(m, flush=True))
    cal.save(args.out_ckpt)
    calibration = cal.metrics["calibration"]
    print("chosen:", calibration["chosen_label"], flush=True)

    # Side by side on the test photographs: the same process, alternating which solver goes first.
    trained = Segmenter.load(shipped_checkpoint())
    calibrated = Segmenter.load(args.out_ckpt)
    exact = Segmenter.load(args.out_ckpt, exact=True)
    runs = {"trained": trained, "calibrated": calibrated}
    for seg in runs.values():                                  # warm-up, untimed
        seg.predict(test[0].image, postprocess=False)
    acc = {k: {"raw": np.zeros(3, np.int64), "cleaned": np.zeros(3, np.int64), "t_raw": 0.0, "t_clean": 0.0,
               "nfe": {}} for k in runs}
    exact_identical = True
    for i, s in enumerate(test):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            seg, a = runs[name], acc[name]
            for kind, pp, tkey in (("raw", False, "t_raw"), ("cleaned", None, "t_clean")):
                t0 = time.perf_counter()
                pred = seg.predict(s.image, postprocess=pp)
                a[tkey] += time.perf_counter() - t0
                pw, tw = pred == 1, s.mask == 1
                a[kind] += [(pw & tw).sum(), (pw & ~tw).sum(), (~pw & tw).sum()]
                if kind == "raw":
                    for b in ode_blocks(seg.model):
                        a["nfe"][b.name] = a["nfe"].get(b.name, 0) + int(b.nfe_forward)
                    if name == "trained" and i < 8:   # the --exact path of the calibrated copy: bit-identical?
                        exact_identical &= bool(np.array_equal(pred, exact.predict(s.image, postprocess=False)))
    n = len(test)
    iou = lambda c: float(c[0] / c.sum())  # noqa: E731
    results = {k: {"white_iou_raw": iou(a["raw"]), "white_iou_cleaned": iou(a["cleaned"]),
                   "predict_s_per_photo_raw": a["t_raw"] / n, "predict_s_per_photo_cleaned": a["t_clean"] / n,
                   "nfe_per_block": {b: v / n for b, v in a["nfe"].items()}} for k, a in acc.items()}
    t, c = results["trained"], results["calibrated"]
    ratio_raw = c["predict_s_per_photo_raw"] / t["predict_s_per_photo_raw"]
    ratio_clean = c["predict_s_per_photo_cleaned"] / t["predict_s_per_photo_cleaned"]
    goal = {"iou_raw_reference": 0.8969, "max_drop_pp": 0.3, "max_time_ratio": 0.35,
            "iou_ok": abs(c["white_iou_raw"] - 0.8969) <= 0.003 + 1e-12,
            "time_ok": ratio_raw <= 0.35, "time_ratio_raw": ratio_raw, "time_ratio_cleaned": ratio_clean}
    goal["met"] = goal["iou_ok"] and goal["time_ok"]
    record = {
        "what": "ODE-solver calibration of the shipped checkpoint (bccd-nodes-unet-w16.pt): chosen on the "
                f"{len(val)} BCCD validation photographs by gold white-cell IoU of the raw masks (max drop "
                f"{args.max_drop} pp), then the {n} BCCD test photographs scored with the trained solver and the "
                "calibrated one side by side in one process",
        "chosen": calibration["chosen"], "chosen_label": calibration["chosen_label"],
        "validation": calibration, "test": results, "goal": goal,
        "exact_path_bit_identical_first_8_test_photos": exact_identical,
        "calibrated_checkpoint": args.out_ckpt,
        "provenance": {
            "git_commit": commit, "git_dirty": dirty,
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch threads {torch.get_num_threads()}, shared with other jobs; load average "
                      f"{os.getloadavg()[0]:.1f} at the end)",
            "torch": str(torch.__version__), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t_all, 1)},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(json.dumps({"test": results, "goal": goal, "exact_identical": exact_identical}, indent=1))


if __name__ == "__main__":
    main()
