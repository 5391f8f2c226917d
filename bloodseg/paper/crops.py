"""Single-cell crops: the shipped pipeline on pictures that show one white cell up close.

Many public white-cell sets are not whole smear photographs: each picture is cropped around one
leukocyte, with a few red cells at its edges, and often taken at a higher magnification than BCCD's.
Such a picture is hard for the two automatic steps of :class:`~bloodseg.Segmenter`: the automatic
scale needs red cells to measure (:mod:`bloodseg.scale`), and the colour matching needs plasma to
read the background from (:func:`bloodseg.stain.background_colour`). Neither data set is ours to
test on, so this module makes such pictures from the BCCD test photographs, where the gold masks
are exact: :func:`crop_around_white_cell` cuts a square ``k`` times the side of the largest gold
white cell's box around it, and the crop is then resized by ``zoom`` (2: twice BCCD's magnification;
0.6: a lower one). :func:`crop_scores` scores the Segmenter as ``bloodseg predict`` runs it and two
variants (fixed scale; the crop's own colours) on the same crops, with paired 95 % bootstrap
intervals over crops for the differences. ``bloodseg record crops`` writes
``book/results/robustness/crops.json``.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from ..classes import WHITE_CELL
from .records import provenance, results_path, write_record
from .robustness import _pooled_drop_ci, score_photo
from .stats import N_BOOT

__all__ = ["SETTINGS", "VARIANTS", "crop_around_white_cell", "make_crops", "crop_scores", "crops_frame",
           "plot_crops", "run_record"]

#: (k, zoom): crop side = k x the side of the white cell's box, then resized by zoom.
SETTINGS = ((1.5, 1.0), (2.5, 1.0), (1.5, 2.0), (2.5, 2.0), (2.5, 0.6))

#: name -> Segmenter.replace arguments ({}: as ``bloodseg predict`` runs it).
VARIANTS = {"default": {}, "fixed scale": {"scale": "fixed"}, "colour none": {"colour": "none"}}


def crop_around_white_cell(image: np.ndarray, mask: np.ndarray, k: float):
    """``(image, mask)`` cropped to a square of side ``k`` x the longer side of the largest white
    cell's bounding box, centred on it and moved (not shrunk) to stay inside the photograph; None
    when the mask has no white cell. The side is capped by the photograph's shorter side."""
    labels, n = ndimage.label(mask == WHITE_CELL)
    if n == 0:
        return None
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    ys, xs = np.nonzero(labels == largest)
    h, w = mask.shape
    side = min(int(round(k * max(np.ptp(ys) + 1, np.ptp(xs) + 1))), h, w)
    y0 = int(np.clip(round((ys.min() + ys.max() + 1) / 2 - side / 2), 0, h - side))
    x0 = int(np.clip(round((xs.min() + xs.max() + 1) / 2 - side / 2), 0, w - side))
    return image[y0:y0 + side, x0:x0 + side], mask[y0:y0 + side, x0:x0 + side]


def make_crops(samples, k: float, zoom: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The crops of every sample with a white cell, resized by ``zoom`` (area for shrinking,
    bilinear for enlarging the image; nearest for the mask)."""
    out = []
    for s in samples:
        c = crop_around_white_cell(s.image, s.mask, k)
        if c is None:
            continue
        im, m = c
        if zoom != 1.0:
            im = cv2.resize(im, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)
            m = cv2.resize(m, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_NEAREST)
        out.append((im, m))
    return out


def crop_scores(segmenter, samples, settings=SETTINGS, variants=None, log=None,
                n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """For each (k, zoom) of ``settings`` and each variant: pooled white-cell IoU over the crops,
    the per-crop counts, and for the default the scale factor chosen per crop. Each non-default
    variant's row has ``minus_default_pp`` (pooled IoU, variant - default) with its paired 95 %
    bootstrap interval over crops."""
    variants = VARIANTS if variants is None else variants
    rows = []
    for k, zoom in settings:
        crops = make_crops(samples, k, zoom)
        base = None
        for name, change in variants.items():
            seg = segmenter.replace(**change) if change else segmenter
            t0 = time.perf_counter()
            scored = [score_photo(seg, im, m) for im, m in crops]
            factors = [f for f, _ in scored]
            c = np.asarray([n for _, n in scored], np.int64).reshape(-1, 3)
            row = {"k": k, "zoom": zoom, "variant": name, "n_crops": len(crops),
                   "crop_side_px": int(np.median([m.shape[0] for _, m in crops])) if crops else None,
                   "white_iou_pooled": float(c[:, 0].sum() / max(c.sum(), 1)), "counts": c.tolist(),
                   "scale_factors": factors, "seconds": round(time.perf_counter() - t0, 1)}
            if base is None:
                base, base_iou = c, row["white_iou_pooled"]
            else:   # _pooled_drop_ci gives default - variant; flip it
                lo, hi = _pooled_drop_ci(base, c, n_boot, seed)
                row["minus_default_pp"] = 100 * (row["white_iou_pooled"] - base_iou)
                row["minus_default_pp_ci"] = [-hi, -lo]
            rows.append(row)
            if log:
                log(f"k {k} zoom {zoom} {name}: pooled white IoU {row['white_iou_pooled']:.4f}, "
                    f"scale median {np.median(factors):.2f} ({row['seconds']} s)")
    return rows


def crops_frame(record: dict):
    """One row per (k, zoom): crops, side, IoU of each variant (%), the median scale chosen, and
    each variant's difference to the default with its interval."""
    import pandas as pd
    out = {}
    for r in record["rows"]:
        key = (r["k"], r["zoom"])
        row = out.setdefault(key, {"crops": r["n_crops"], "side (px)": r["crop_side_px"]})
        row[f"{r['variant']} IoU (%)"] = 100 * r["white_iou_pooled"]
        if r["variant"] == "default":
            row["auto scale (median)"] = float(np.median(r["scale_factors"]))
        else:
            lo, hi = r["minus_default_pp_ci"]
            row[f"{r['variant']} - default (pp)"] = f"{r['minus_default_pp']:+.2f} ({lo:+.2f}, {hi:+.2f})"
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index = [f"{k:g}x box, zoom {z:g}" for k, z in frame.index]
    return frame


def plot_crops(record: dict):
    """Bars: white-cell IoU per (k, zoom) for each variant, the default's bar labelled with its
    median scale."""
    import matplotlib.pyplot as plt
    keys = list(dict.fromkeys((r["k"], r["zoom"]) for r in record["rows"]))
    names = list(dict.fromkeys(r["variant"] for r in record["rows"]))
    by = {(r["k"], r["zoom"], r["variant"]): r for r in record["rows"]}
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = np.arange(len(keys))
    wid = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [100 * by[(k, z, name)]["white_iou_pooled"] for k, z in keys]
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * wid, vals, wid, label=name, color=f"C{j}")
        if name == "default":
            for b, (k, z) in zip(bars, keys):
                ax.annotate(f"x{np.median(by[(k, z, name)]['scale_factors']):.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{k:g}x box\nzoom {z:g}" for k, z in keys], fontsize=8)
    lo = min(100 * r["white_iou_pooled"] for r in record["rows"])
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_ylabel("white-cell IoU (%)")
    ax.set_title("Single-cell crops of the BCCD test photographs (labels: the automatic scale's median factor)")
    ax.legend(fontsize=8, ncol=len(names), loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def run_record(args, command: str) -> dict:
    """``bloodseg record crops``: score the shipped checkpoint on single-cell crops of the BCCD test
    photographs; write the JSON record."""
    from ..bccd import bccd_source, prepare_cached
    from ..io import load_folder
    from ..segmenter import Segmenter, shipped_checkpoint

    work = Path(args.work or "runs/robustness")
    out = Path(args.out) if args.out else results_path("robustness/crops.json")
    t_all = time.perf_counter()
    src, kind = bccd_source(args.bccd_src)
    prepare_cached(src, work / "bccd")
    test = load_folder(work / "bccd" / "test")[: args.limit]
    seg = Segmenter.load(shipped_checkpoint())
    rows = crop_scores(seg, test, log=lambda m: print(m, flush=True))
    record = {
        "what": "shipped checkpoint on single-cell crops of the BCCD test photographs: a square k x the side of the "
                "largest gold white cell's box, centred on it, resized by zoom (bloodseg.paper.crops); gold "
                "white-cell IoU pooled over the crops; variants: default (as `bloodseg predict`), fixed scale "
                "(input_scale only), colour none (the crop's own colours); differences to the default with paired "
                f"95 % bootstrap intervals over crops ({N_BOOT} resamples)",
        "checkpoint": shipped_checkpoint().name, "n_photographs": len(test), "bccd": f"{src} ({kind})",
        "settings": [list(s) for s in SETTINGS], "variants": VARIANTS, "rows": rows,
        "provenance": provenance(command, t_all),
    }
    write_record(record, out)
    return record
