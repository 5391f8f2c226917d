import json, sys, time, subprocess, numpy as np
from bloodseg.io import load_folder
from bloodseg.scale import red_cell_diameter
t0 = time.time()
out = {}
for split in ("train", "val", "test"):
    samples = load_folder(f"/tmp/scale_work/bccd/{split}")
    d = [red_cell_diameter(s.image) for s in samples]
    ok = np.array([x for x in d if x is not None])
    out[split] = {"n_images": len(samples), "n_none": sum(x is None for x in d),
                  "median_px": float(np.median(ok)), "q10_px": float(np.quantile(ok, .1)), "q90_px": float(np.quantile(ok, .9)),
                  "iqr_px": [float(np.quantile(ok, .25)), float(np.quantile(ok, .75))]}
    print(split, out[split], flush=True)
rec = {"what": "red_cell_diameter (bloodseg.scale) of the prepared BCCD photographs, at full size (640x480)",
       "input_scale": 0.5, "target_diameter_network_px": 0.5 * out["train"]["median_px"],
       "splits": out,
       "provenance": {"git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                      "command": "python /tmp/scale_work/calib.py (prepared with bloodseg.bccd.prepare_cached($BLOODSEG_BCCD, /tmp/scale_work/bccd))",
                      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "wall_s": round(time.time() - t0, 1)}}
open("book/results/scale/calibration.json", "w").write(json.dumps(rec, indent=1) + "\n")
print(rec["target_diameter_network_px"])
