"""Fixed vs auto scale on resized BCCD test photographs (gold white-cell IoU, pooled, with cleanup)."""
import json, platform, subprocess, sys, time
import cv2, numpy as np, torch
torch.set_num_threads(1)
from bloodseg.io import load_folder
from bloodseg.paper.bccd import _white_counts, _white_scores
from bloodseg.scale import red_cell_diameter
from bloodseg.segmenter import Segmenter, shipped_checkpoint

prepared, n = sys.argv[1], int(sys.argv[2])
t0 = time.time()
samples = load_folder(f"{prepared}/test")[:n]
auto = Segmenter.load(shipped_checkpoint(), device="cpu")
fixed = auto.replace(scale="fixed")
assert auto.scale == "auto" and fixed.input_scale == 0.5
rows = []
for f in (0.5, 0.7, 1.0, 1.4, 2.0):
    tf = time.time()
    c = {"fixed": np.zeros(3, np.int64), "auto": np.zeros(3, np.int64)}
    diams, used = [], []
    for s in samples:
        img = cv2.resize(s.image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        gold = cv2.resize(s.mask, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        d = red_cell_diameter(img)
        diams.append(d)
        k = auto.scale_for(auto.prepare(img))
        used.append(k)
        pf = fixed.predict(img)
        pa = pf if k == 0.5 else auto.predict(img, input_scale=k)
        c["fixed"] += _white_counts(pf, gold)
        c["auto"] += _white_counts(pa, gold)
    ok = np.array([x for x in diams if x is not None])
    row = {"factor": f, "n_images": len(samples),
           "white_iou_fixed": _white_scores(*map(int, c["fixed"]))["iou"],
           "white_iou_auto": _white_scores(*map(int, c["auto"]))["iou"],
           "diameter_px": {"median": float(np.median(ok)), "q10": float(np.quantile(ok, .1)),
                           "q90": float(np.quantile(ok, .9)), "median_over_factor": float(np.median(ok) / f),
                           "n_none": sum(x is None for x in diams)},
           "auto_factor": {"median": float(np.median(used)), "min": float(min(used)), "max": float(max(used)),
                           "share_at_trained_0.5": float(np.mean([u == 0.5 for u in used]))},
           "seconds": round(time.time() - tf, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)
native = next(r for r in rows if r["factor"] == 1.0)["white_iou_fixed"]
for r in rows:
    r["auto_minus_native_pp"] = round(100 * (r["white_iou_auto"] - native), 2)
    r["fixed_minus_native_pp"] = round(100 * (r["white_iou_fixed"] - native), 2)
rec = {"what": "shipped checkpoint (calibrated solver, its colour matching when stored, its white-cell cleanup) on the BCCD test photographs "
               "resized by each factor (cv2 INTER_AREA down / INTER_LINEAR up; gold masks nearest); gold "
               "white-cell IoU pooled over the images; fixed = stored input_scale 0.5, auto = Segmenter scale='auto'",
       "target_red_diameter_network_px": auto.red_cell_diameter, "native_white_iou": native,
       "goal": "auto within 2 pp of the native score at every factor",
       "rows": rows,
       "provenance": {"git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                      "note": "see the record",
                      "command": f"OMP_NUM_THREADS=1 python book/results/scale/measure.py {prepared} {n}",
                      "device": f"cpu ({platform.processor() or platform.machine()}), 1 torch thread",
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                      "wall_s": round(time.time() - t0, 1)}}
open("book/results/scale/bccd_resized.json", "w").write(json.dumps(rec, indent=1) + "\n")
print("native", native)
