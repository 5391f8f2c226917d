"""Real smears: training and evaluation on BCCD, synthetic pretraining, the shipped checkpoint.

The chapter "Real smears" (book/08_real_smears.ipynb) is a sequence of calls into this module.

Data. :func:`bloodseg.bccd.bccd_source` picks the full BCCD copy (``$BLOODSEG_BCCD``, see
``bloodseg download-bccd``) when it exists and the vendored 16-image sample otherwise (the chapter
asks for the sample in the smoke profile, ``prefer_full=False``); :func:`prepare_cached` runs
:func:`bloodseg.bccd.prepare_bccd` once per source. Labels come in two grades, and every score says which:

* **gold** – the white-cell masks drawn by people (Banik et al. 2020): white-cell IoU and Dice
  (:func:`evaluate_bccd`, ``gold``) are real measurements;
* **silver** – the red-cell class is derived from colour (:func:`bloodseg.datasets.silver_red_cells`),
  so the 3-class PA / CPA / MIoU (``silver``) measure agreement with a colour rule, not with people.
  The colour baseline uses the same colour rules and is therefore flattered on the silver red class.

Scale. BCCD was photographed at about twice the magnification of the paper's MISP smears and of
our synthetic ones: a red cell is ~100 px across in BCCD (median RBC box 103 px) and ~50 px in a
synthetic smear. The BCCD models therefore work on photographs resized by ``data.scale`` = 0.5:
the cells then have the size the synthetic pretraining taught, a 128 px patch holds a whole white
cell, and every pass costs a quarter. The factor is a :class:`bloodseg.Segmenter` setting
(``input_scale``, stored in the checkpoint) and the Segmenter applies it, so masks always come out
at the photograph's size and every score below is measured against the full-size labels.

Training. A :class:`~bloodseg.recipe.Recipe` with a ``real`` section sizes everything per profile
(:func:`real_recipe`, :data:`bloodseg.recipe.REAL_PRESETS`; :func:`stored_recipe` reads the one a
record or checkpoint stored, older ``plan`` dicts included). :func:`bccd_splits` cuts (resized)
BCCD training images into patches (validation patches pick the best epoch; test images stay
whole, 640x480). :func:`synthetic_pretraining_splits` paints synthetic
smears for pretraining; :func:`train_model` trains from scratch or fine-tunes from a checkpoint.

White-cell cleanup. :func:`tune_white_cleanup` chooses the one number of
:func:`bloodseg.postprocess.clean_white_cells` (the smallest white component kept) on validation
photographs; :func:`tune_checkpoint_cleanup` (``bloodseg tune-cleanup``) stores it in a
checkpoint, and :func:`compare_cleanup` gives several networks the same treatment.

The shipped checkpoint. :func:`train_bccd_checkpoint` reproduces
``bloodseg/data/checkpoints/`` (see the README there); :func:`shipped_checkpoint` returns its path,
so ``bloodseg predict`` / ``bloodseg count`` work without training.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from ..bccd import _voc_boxes, bccd_source, prepare_cached
from ..cleanup import WHITE_AREA_GRID, cleanup_rows, tune_white_cleanup, white_components
from ..count import count_cells, count_errors
from ..datasets import photograph_splits, resize_sample
from ..errors import DataError
from ..io import Sample, read_image
from ..recipe import REAL_PRESETS, Recipe, RealDataRecipe, real_recipe
from ..scoring import evaluate_photos
from ..segmenter import Segmenter
from ..shipping import (FINISH_STEPS, TrainedModel, score_row, synthetic_pretraining_splits, train_model,
                        train_segmenter, tune_checkpoint)
from ..synthetic import make_smear
from .records import load_record, provenance_line


__all__ = ["bccd_source", "prepare_cached", "real_recipe", "PLAN_FIELDS", "recipe_from_plan", "stored_recipe",
           "resize_sample", "synthetic_pretraining_splits", "score_row", "bccd_splits", "TrainedModel", "train_model",
           "evaluate_bccd", "WHITE_AREA_GRID", "white_components", "plot_white_components", "tune_white_cleanup",
           "plot_cleanup_tuning", "cleanup_rows", "cleanup_summary", "compare_cleanup", "plot_cleanup_comparison",
           "tune_checkpoint_cleanup", "failure_cases", "read_box_counts", "rbc_boxes_at_border", "count_vs_boxes",
           "synthetic_counting", "train_bccd_checkpoint", "gpu_runs_frame",
           "plot_gpu_runs", "evaluate_raw_and_cleaned", "FINISH_STEPS", "RECORD_TRAINING", "RECORD_SHIPPED",
           "RECORD_STAIN", "load_record", "provenance_line",
           "compare_per_image", "plot_instances", "stain_shift_frame", "plot_stain_shifts"]


#: Where each field of the ``plan`` dict that records and checkpoints stored before the recipe
#: (the ``RealPlan`` dataclass) lives in a :class:`~bloodseg.recipe.Recipe`.
PLAN_FIELDS = {"width": "model.width", "scale": "data.scale", "patch": "data.patch",
               "crops_per_image": "data.crops_per_image", "augment": "data.augment", "stain": "data.stain",
               "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
               **{f.name: f"real.{f.name}" for f in dataclasses.fields(RealDataRecipe)}}


def recipe_from_plan(plan: dict) -> Recipe:
    """The :class:`~bloodseg.recipe.Recipe` of an old ``plan`` dict (see :data:`PLAN_FIELDS`)."""
    changes = {PLAN_FIELDS[k]: tuple(v) if isinstance(v, list) else v for k, v in plan.items() if k != "name"}
    return Recipe(plan["name"], real=RealDataRecipe()).replace(**changes)


def stored_recipe(stored: dict) -> Recipe:
    """The recipe a record's ``data`` or a checkpoint's ``metrics`` holds: ``recipe``, or an older
    ``plan`` with the ``model_name``, ``seed`` and ``train_options`` stored beside it."""
    if "recipe" in stored:
        return Recipe.from_dict(stored["recipe"])
    extra = {f"train.{k}": v for k, v in (stored.get("train_options") or {}).items()}
    extra.update({key: stored[k] for k, key in (("model_name", "model.name"), ("seed", "train.seed")) if k in stored})
    return recipe_from_plan(stored["plan"]).replace(**extra)


# ----------------------------------------------------------------------------- the chapter's names for the core's
# Training, scoring and the cleanup search are the product pipeline's (bloodseg.shipping, bloodseg.scoring,
# bloodseg.cleanup); the chapter calls them by these names.

def bccd_splits(prepared, recipe: Recipe, seed: int = 0) -> dict[str, list[Sample]]:
    """:func:`bloodseg.datasets.photograph_splits` of a prepared BCCD folder (the one split path)."""
    return photograph_splits(prepared, recipe, seed)


def _segmenter(model) -> Segmenter:
    """A :class:`~bloodseg.Segmenter` as it is; a bare network as a Segmenter with the default settings."""
    return model if isinstance(model, Segmenter) else Segmenter(model)


def evaluate_bccd(model_or_fn, samples: list[Sample], tile: int = 1024, keep_masks: bool = True,
                  tta: bool = False, postprocess=None) -> dict:
    """:func:`bloodseg.scoring.evaluate_photos` of a Segmenter (a bare network: default settings),
    with ``tile`` and flip ``tta``, or of a function image -> mask; BCCD labels red cells (silver)."""
    if isinstance(model_or_fn, (Segmenter, torch.nn.Module)):
        model_or_fn = _segmenter(model_or_fn).replace(tile=tile, tta=tta)
    return evaluate_photos(model_or_fn, samples, keep_masks=keep_masks, postprocess=postprocess)


def evaluate_raw_and_cleaned(segmenter: Segmenter, samples: list[Sample], tile: int = 1024,
                             keep_masks: bool = False) -> dict:
    """``{"raw": ..., "cleaned": ...}`` as :func:`evaluate_bccd` returns each, the network alone and
    with the Segmenter's own cleanup, from ONE pass of :meth:`~bloodseg.Segmenter.segment` per photograph."""
    both = evaluate_photos(segmenter, samples, keep_masks=keep_masks, raw_too=True, tile=tile)
    return {"raw": both.pop("raw"), "cleaned": both}


def tune_checkpoint_cleanup(ckpt, src=None, out=None, log: Callable[[str], None] = print) -> dict:
    """:func:`bloodseg.shipping.tune_checkpoint` with the cleanup step only (``bloodseg tune-cleanup``)."""
    return tune_checkpoint(ckpt, "bccd" if src is None else src, out, steps=("cleanup",), log=log)


def train_bccd_checkpoint(out_dir="runs/bccd_checkpoint", recipe: Recipe = REAL_PRESETS["ship"], src=None,
                          pretrain: bool = True, log: Callable[[str], None] = print, init=None,
                          tta: bool = True) -> dict:
    """:func:`bloodseg.shipping.train_segmenter` (``bloodseg train-bccd``) on BCCD."""
    return train_segmenter(out_dir, recipe, "bccd" if src is None else src, pretrain, log, init, tta)


def _predictor(model_or_fn, tile: int, tta: bool = False, postprocess=None) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(model_or_fn, (Segmenter, torch.nn.Module)):
        seg = _segmenter(model_or_fn).replace(tile=tile, tta=tta)
        return lambda image: seg.predict(image, postprocess=postprocess)
    return model_or_fn


def plot_white_components(components: dict, chosen_area: float | None = None, title: str = ""):
    """Histogram (log area) of the predicted white components that touch a labelled white cell,
    of those that touch none (false white), and of the labelled cells themselves; ``components``:
    the ``"components"`` of :func:`tune_white_cleanup`. Returns the figure."""
    import matplotlib.pyplot as plt
    pred = np.array(components["predicted"] or [[1, 0]], float).reshape(-1, 2)
    true_cells = np.array(components["true_cells"] or [1], float)
    bins = np.logspace(0, math.log10(max(pred[:, 0].max(), true_cells.max(), 10) * 1.5), 40)
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.hist(pred[pred[:, 1] == 0, 0], bins=bins, color="C3", alpha=0.8, label="predicted, touches no labelled cell")
    ax.hist(pred[pred[:, 1] == 1, 0], bins=bins, color="C2", alpha=0.6, label="predicted, touches a labelled cell")
    ax.hist(true_cells, bins=bins, histtype="step", color="k", lw=1.2, label="labelled white cells")
    if chosen_area:
        ax.axvline(chosen_area, color="k", ls="--", lw=1, label=f"chosen white_min_area {chosen_area:.0f} px")
    ax.set_xscale("log"); ax.set_xlabel("white component area (px of the photograph)"); ax.set_ylabel("components")
    ax.set_title(title, fontsize=10); ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_cleanup_tuning(tuning: dict, test_rows: list[dict] | None = None, goal: float | None = 0.90,
                        names: tuple[str, str] = ("validation", "test")):
    """Gold white-cell IoU against ``white_min_area`` (log axis) for each fill setting, on the
    tuning photographs (``tuning``: :func:`tune_white_cleanup`), optionally with the same curve
    on other photographs (``test_rows``, the same row format), the chosen area, its plateau
    (grey) and the goal; ``names``: what the two sets of photographs are. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    sets = [(names[0], tuning["rows"], "-")] + ([(names[1], test_rows, ":")] if test_rows else [])
    for label, rows, ls in sets:
        for f, colour in ((False, "C0"), (True, "C1")):
            pts = sorted((max(r["white_min_area"], 30.0), r["iou"]) for r in rows if r["fill_white_holes"] == f)
            if pts:
                ax.plot(*zip(*pts), ls, marker="o", ms=3, color=colour,
                        label=f"{label} photographs, {'holes filled' if f else 'holes kept'}")
    ch = tuning["chosen"]
    ax.axvline(max(ch["white_min_area"], 30.0), color="k", lw=1, label=f"chosen: {ch['white_min_area']:.0f} px")
    ax.axvspan(max(tuning["plateau"][0], 30.0), max(tuning["plateau"][1], 30.0), color="grey", alpha=0.15)
    if goal:
        ax.axhline(goal, color="red", ls="--", lw=1, label=f"goal {goal:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("white_min_area: smallest white component kept (px; 0 drawn at 30)")
    ax.set_ylabel("gold white-cell IoU")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _row_for(rows: list[dict], area: float, fill: bool) -> dict:
    for r in rows:
        if r["white_min_area"] == float(area) and r["fill_white_holes"] == bool(fill):
            return r
    raise DataError(f"no score row for white_min_area={area}, fill_white_holes={fill}")


def cleanup_summary(label: str, tuning: dict, test_rows: list[dict]) -> dict:
    """One table row: the cleanup ``tuning`` chose (on its photographs) and what it does on the
    other photographs' ``test_rows`` (which must hold the raw setting, area 0 without filling,
    and the chosen one)."""
    ch = tuning["chosen"]
    raw, clean = _row_for(test_rows, 0.0, False), _row_for(test_rows, ch["white_min_area"], ch["fill_white_holes"])
    r = lambda v: round(float(v), 4)  # noqa: E731
    return {"model": label, "white_min_area": ch["white_min_area"], "holes filled": ch["fill_white_holes"],
            "val IoU raw": r(tuning["raw"]["iou"]), "val IoU cleaned": r(ch["tuned_iou"]),
            "test IoU raw": r(raw["iou"]), "test IoU cleaned": r(clean["iou"]),
            "test gain": r(clean["iou"] - raw["iou"]), "test precision raw": r(raw["precision"]),
            "test precision cleaned": r(clean["precision"]), "test recall raw": r(raw["recall"]),
            "test recall cleaned": r(clean["recall"])}


def compare_cleanup(models: dict, val: list[Sample], test: list[Sample], tile: int = 1024) -> list[dict]:
    """For each ``{label: Segmenter or network}``: choose its white-cell cleanup on ``val`` (:func:`tune_white_cleanup`),
    then score ``test`` raw and cleaned; one :func:`cleanup_summary` row per model, so that
    every network gets the same treatment."""
    rows = []
    for label, model in models.items():
        tuning = tune_white_cleanup(model, val, tile=tile)
        ch = tuning["chosen"]
        test_rows = cleanup_rows(model, test, areas=(0, ch["white_min_area"]),
                                 fills=(False, ch["fill_white_holes"]), tile=tile)
        rows.append(cleanup_summary(label, tuning, test_rows))
    return rows


def plot_cleanup_comparison(rows: list[dict], goal: float | None = 0.90):
    """Bars of each model's test white-cell IoU, raw and with its own cleanup (rows of
    :func:`cleanup_summary`). Returns the figure."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.4))
    y = np.arange(len(rows))
    raw = [r["test IoU raw"] for r in rows]
    clean = [r["test IoU cleaned"] for r in rows]
    ax.barh(y + 0.2, raw, 0.4, color="C0", label="network alone")
    ax.barh(y - 0.2, clean, 0.4, color="C1", label="+ its white cleanup (chosen on validation)")
    for yy, a, b in zip(y, raw, clean):
        ax.text(a + 0.003, yy + 0.2, f"{a:.3f}", va="center", fontsize=7)
        ax.text(b + 0.003, yy - 0.2, f"{b:.3f}", va="center", fontsize=7)
    lo = max(0.0, min(raw + clean) - 0.05)
    ax.set_xlim(lo, 1.0); ax.set_yticks(y, [r["model"] for r in rows], fontsize=8); ax.invert_yaxis()
    if goal:
        ax.axvline(goal, color="red", ls="--", lw=1, label=f"goal {goal:.2f}")
    ax.set_xlabel("gold white-cell IoU, BCCD test photographs")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def failure_cases(result: dict, k: int = 4) -> list[int]:
    """Indices of the ``k`` images with the lowest white-cell IoU (images without any white cell,
    predicted or labelled, have no IoU and are skipped)."""
    ious = [(r["white_iou"], i) for i, r in enumerate(result["per_image"]) if not math.isnan(r["white_iou"])]
    return [i for _, i in sorted(ious)[:k]]


# ----------------------------------------------------------------------------- counting

def read_box_counts(prepared) -> dict[str, dict]:
    """``{image id: {"n_rbc_boxes", "n_wbc_boxes"}}`` from ``prepared/boxes.csv`` (images with a VOC file)."""
    path = Path(prepared) / "boxes.csv"
    if not path.is_file():
        raise DataError(f"{path} not found; run prepare_bccd first")
    out = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("has_boxes") == "1":
                out[row["image"]] = {"n_rbc_boxes": int(row["n_rbc_boxes"]), "n_wbc_boxes": int(row["n_wbc_boxes"])}
    return out


def rbc_boxes_at_border(src, names, margin: int = 2) -> dict:
    """How many red-cell boxes of the images ``names`` touch the image border (within ``margin``
    px), read from the raw BCCD folder ``src``: ``{"boxes", "at_border", "share"}``. BCCD boxes
    cells cut by the border too, which the counter leaves out when they are mostly outside."""
    total = edge = 0
    for name in names:
        xml = Path(src) / "annotations" / f"{name}.xml"
        if not xml.is_file():
            continue
        h, w = read_image(Path(src) / "images" / f"{name}.jpg").shape[:2]
        for x0, y0, x1, y1 in _voc_boxes(xml)["RBC"]:
            total += 1
            edge += int(x0 <= margin or y0 <= margin or x1 >= w - 1 - margin or y1 >= h - 1 - margin)
    return {"boxes": total, "at_border": edge, "share": edge / total if total else math.nan}


def count_vs_boxes(masks: list[np.ndarray], names: list[str], boxes: dict) -> dict:
    """Counts from masks against the BCCD boxes of the same images.

    White cells: boxes are complete, so MAE / % are errors. Red cells: BCCD leaves many red cells
    unboxed, so the box count is a LOWER BOUND; besides MAE we report how often the count is at
    least the box count and the mean ratio count / boxes. Returns ``{"rows", "white", "red"}``.
    """
    rows = []
    for mask, name in zip(masks, names):
        if name not in boxes:
            continue
        c = count_cells(mask)
        rows.append({"image": name, "n_white": c["n_white"], "n_wbc_boxes": boxes[name]["n_wbc_boxes"],
                     "n_red": c["n_red"], "n_rbc_boxes": boxes[name]["n_rbc_boxes"]})
    if not rows:
        return {"rows": [], "white": count_errors([], []), "red": count_errors([], [])}
    red = np.array([r["n_red"] for r in rows], float)
    rb = np.array([r["n_rbc_boxes"] for r in rows], float)
    red_stats = count_errors(red, rb)
    red_stats.update(at_least_boxes=float(np.mean(red >= rb)),
                     ratio=float(np.mean(red[rb > 0] / rb[rb > 0])) if (rb > 0).any() else math.nan)
    return {"rows": rows, "white": count_errors([r["n_white"] for r in rows], [r["n_wbc_boxes"] for r in rows]),
            "red": red_stats}


def synthetic_counting(n: int, model=None, size=(480, 640),
                       first_seed: int = 10_000) -> dict:
    """Count cells on ``n`` held-out synthetic smears (seeds ``first_seed`` ...) against exact counts.

    Counts the exact masks ("oracle": the counting step alone) and, with ``model`` (a
    :class:`~bloodseg.Segmenter` with its settings, e.g. ``seg.replace(input_scale=1.0)``, or a bare
    network), the predicted masks (segmentation and counting together). Returns ``{"rows", "oracle": {"white", "red"},
    "predicted": {...}}`` with :func:`bloodseg.count.count_errors` entries.
    """
    predict = _predictor(model, tile=1024) if model is not None else None
    rows = []
    for i in range(n):
        image, mask, exact = make_smear(first_seed + i, size=size, return_counts=True)
        row = {"seed": first_seed + i, "true_white": exact["n_white"], "true_red": exact["n_red"]}
        oracle = count_cells(mask)
        row.update(oracle_white=oracle["n_white"], oracle_red=oracle["n_red"])
        if model is not None:
            pred = count_cells(predict(image))
            row.update(pred_white=pred["n_white"], pred_red=pred["n_red"])
        rows.append(row)
    out = {"rows": rows}
    for kind in ("oracle", "pred") if model is not None else ("oracle",):
        out["predicted" if kind == "pred" else "oracle"] = {
            c: count_errors([r[f"{kind}_{c}"] for r in rows], [r[f"true_{c}"] for r in rows])
            for c in ("white", "red")}
    return out


# ----------------------------------------------------------------------------- the shipped checkpoint


# ----------------------------------------------------------------------------- recorded runs

def gpu_runs_frame(record: dict):
    """A table (pandas DataFrame, one row per run) of a record of ``bloodseg train-bccd`` runs: the
    JSON written next to chapter 8 (``runs``: each with ``scores``, optional ``scores_tta``,
    ``continues``, ``bccd_epochs_total``, ...)."""
    import pandas as pd
    rows = []
    for r in record["runs"]:
        start = (f"continues {r['continues']}" if r.get("continues") else
                 "synthetic-pretrained" if r.get("pretrained_on_synthetic") else "from scratch")
        tta = (r.get("scores_tta") or {}).get("gold white IoU", math.nan)
        rows.append({"run": r["run"], "model": r["model"], "width": r["width"], "scale": r["scale"], "start": start,
                     "BCCD epochs": r["bccd_epochs_total"], "gold white IoU": r["scores"]["gold white IoU"],
                     "... with flip TTA": tta, "gold white Dice": r["scores"]["gold white Dice"],
                     "silver MIoU": r["scores"]["silver MIoU"], "train s": r["train_seconds"],
                     "runs sharing the GPU": r["processes_sharing_gpu"]})
    return pd.DataFrame(rows).set_index("run")


def _lineage(record: dict, run: str) -> list[dict]:
    by_name = {r["run"]: r for r in record["runs"]}
    chain = []
    while run is not None:
        chain.append(by_name[run])
        run = by_name[run].get("continues")
    return chain[::-1]


def plot_gpu_runs(record: dict):
    """Left: gold white-cell IoU of every run (plain and with flip TTA) against the goal. Right:
    validation MIoU per BCCD epoch, each final run drawn with the runs it continues. Returns the figure."""
    import matplotlib.pyplot as plt
    frame = gpu_runs_frame(record)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    x = np.arange(len(frame))
    colours = ["C1" if m == "unet" else "C0" for m in frame["model"]]
    ax.bar(x - 0.2, frame["gold white IoU"], 0.4, color=colours, label="plain (orange: U-Net, blue: NODEs-UNet)")
    ax.bar(x + 0.2, frame["... with flip TTA"], 0.4, color=colours, alpha=0.45, label="with flip TTA")
    goal = record.get("goal_white_iou")
    if goal:
        ax.axhline(goal, color="red", ls="--", lw=1, label=f"goal {goal:.2f}")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{i}\n{'U-Net' if m == 'unet' else 'NODEs'} w{w}\nscale {s:g}" for i, m, w, s in
                        zip(frame.index, frame["model"], frame["width"], frame["scale"])], fontsize=7)
    low = float(np.nanmin(frame["gold white IoU"]))
    ax.set_ylim(max(0.0, low - 0.03), 1.0 if goal is None else max(goal + 0.03, frame["gold white IoU"].max() + 0.02))
    ax.set_ylabel("gold white-cell IoU (test photos)")
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    continued = {r.get("continues") for r in record["runs"]}
    for r in record["runs"]:
        if r["run"] in continued:
            continue                                  # drawn as part of the run that continues it
        chain, epochs, vals, offset = _lineage(record, r["run"]), [], [], 0
        for part in chain:
            epochs += [offset + h["epoch"] for h in part["history"]]
            vals += [h["val_miou"] for h in part["history"]]
            offset += part["epochs_run"]
        ax2.plot(epochs, vals, "-o", ms=3, label=" > ".join(p["run"] for p in chain))
    ax2.set_xlabel("BCCD epoch (continued runs carry on the count)")
    ax2.set_ylabel("validation MIoU (silver, 3 classes)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- records the chapter reads
# The chapter runs what takes seconds (data, a short training, the shipped checkpoint on a few
# photographs) and reads what takes minutes from JSON records written once by the functions below
# (:mod:`bloodseg.paper.bccd_records`: ``bloodseg record bccd-training`` / ``bccd-shipped``). Every
# record is ``{"what", "data", "provenance"}`` (:mod:`bloodseg.paper.records`).

#: Where the records lie under the results folder (``book/results``).
RECORD_TRAINING = "08_real_smears/record_training.json"
RECORD_SHIPPED = "08_real_smears/record_shipped.json"
#: Written by :mod:`bloodseg.paper.robustness` (``python -m bloodseg.paper.robustness``).
RECORD_STAIN = "robustness/stain.json"


def compare_per_image(live: list[dict], recorded: list[dict], key: str = "white_iou") -> dict:
    """Per-photograph scores measured now against a record's, matched by name: ``{"n", "names",
    "max_abs_diff"}`` (``n`` = 0 when no photograph is in both)."""
    rec = {r["name"]: r[key] for r in recorded}
    pairs = [(r[key], rec[r["name"]]) for r in live if r["name"] in rec]
    diffs = [abs(a - b) for a, b in pairs if not (math.isnan(a) and math.isnan(b))]
    return {"n": len(pairs), "names": [r["name"] for r in live if r["name"] in rec],
            "max_abs_diff": max(diffs) if diffs else (0.0 if pairs else math.nan)}


# ----------------------------------------------------------------------------- per-cell instances

def plot_instances(image: np.ndarray, labels: np.ndarray, rows: list[dict], seed: int = 0):
    """The photograph with every cell's outline (violet: white, yellow: red), and the label image
    coloured by id with each white cell's id written on it. Returns the figure."""
    import matplotlib.pyplot as plt
    white_ids = [r["id"] for r in rows if r["class"] == "white"]
    is_white = np.isin(labels, white_ids)
    pad = np.pad(labels, 1, mode="edge")
    edges = (labels > 0) & ((pad[:-2, 1:-1] != labels) | (pad[2:, 1:-1] != labels) |
                            (pad[1:-1, :-2] != labels) | (pad[1:-1, 2:] != labels))
    edges = (cv2.dilate(edges.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0) & (labels > 0)   # 2-3 px wide
    outlined = image[..., ::-1].copy()
    outlined[edges & is_white] = (170, 0, 255)
    outlined[edges & ~is_white] = (255, 220, 0)
    rng = np.random.default_rng(seed)
    palette = rng.integers(60, 256, (int(labels.max()) + 1, 3)).astype(np.uint8)
    palette[0] = 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.1))
    axes[0].imshow(outlined)
    axes[0].set_title(f"{sum(r['class'] == 'white' for r in rows)} white (violet), "
                      f"{sum(r['class'] == 'red' for r in rows)} red cells (yellow)", fontsize=9)
    axes[1].imshow(palette[labels])
    for r in rows:
        axes[1].text(r["centroid_x"], r["centroid_y"], str(r["id"]), fontsize=6 if r["class"] == "red" else 9,
                     ha="center", va="center", color="white" if r["class"] == "white" else "black",
                     fontweight="bold" if r["class"] == "white" else "normal")
    axes[1].set_title("instance ids (one colour per cell)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- stain and colour shifts

def stain_shift_frame(record: dict):
    """A table (pandas DataFrame, one row per shift) of :mod:`bloodseg.paper.robustness`'s record:
    the transform, pooled gold white-cell IoU, its drop from unshifted in pp (positive = worse)
    with the 95 % interval, and the verdict against the 2 pp goal. Shifts beyond the training range
    (``strong_shifts``) are listed as "not judged"; with a ``colour_none`` comparison, the IoU
    without colour matching is a column of its own."""
    import pandas as pd
    summary = record["summary"]
    shifts = {**record.get("shifts", {}), **record.get("strong_shifts", {})}
    strong = set(record.get("strong_shifts", {}))
    without = (record.get("colour_none") or {}).get("summary", {})
    rows = []
    for name, r in summary.items():
        t = shifts.get(name, {})
        how = ", ".join(f"{k} {v}" for k, v in t.items() if k != "transform")
        row = {"shift": name, "transform": (t.get("transform", "").replace("bloodseg.stain.", "") +
                                            (f" ({how})" if how else "")) or "none",
               "white IoU": r["white_iou_pooled"], "drop (pp)": r.get("drop_pp", 0.0),
               "95% CI (pp)": (f"[{r['drop_pp_ci'][0]:+.2f}, {r['drop_pp_ci'][1]:+.2f}]" if "drop_pp_ci" in r else ""),
               "within 2 pp": "" if name in strong else r.get("within_goal", ""),
               "verdict": "beyond training range: not judged" if name in strong else r.get("goal_verdict", "")}
        if without:
            row["white IoU, colour none"] = without.get(name, {}).get("white_iou_pooled", float("nan"))
        rows.append(row)
    return pd.DataFrame(rows).set_index("shift")


def plot_stain_shifts(record: dict, goal_pp: float = 2.0):
    """Bars: drop of the pooled gold white-cell IoU under each shift (pp, positive = worse) with its
    95 % bootstrap interval, and the goal as a dashed line; shifts beyond the training range in grey,
    and, where the record has them, the drops without colour matching as hollow diamonds."""
    import matplotlib.pyplot as plt
    strong = set(record.get("strong_shifts", {}))
    items = [(k, r) for k, r in record["summary"].items() if k != "none"]
    without = (record.get("colour_none") or {}).get("summary", {})
    drops = np.array([r["drop_pp"] for _, r in items])
    ci = np.array([r["drop_pp_ci"] for _, r in items])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    x = np.arange(len(items))
    colours = ["0.6" if k in strong else "C2" if r.get("goal_verdict") == "holds"
               else "C3" if r.get("goal_verdict") == "does not hold" else "C1" for k, r in items]
    ax.bar(x, drops, color=colours, yerr=[drops - ci[:, 0], ci[:, 1] - drops], capsize=3,
           error_kw={"lw": 1})
    top = max(goal_pp, float(ci[:, 1].max()))
    if without and "none" in without:
        base = without["none"]["white_iou_pooled"]
        pts = [(i, 100 * (base - without[k]["white_iou_pooled"])) for i, (k, _) in enumerate(items) if k in without]
        ax.plot([i for i, _ in pts], [d for _, d in pts], "D", mfc="none", color="k", ms=6,
                label="without colour matching")
        top = max(top, max(d for _, d in pts))
    ax.axhline(goal_pp, color="red", ls="--", lw=1, label=f"goal: drop below {goal_pp:g} pp")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(min(0.0, float(ci[:, 0].min())) - 0.3, top + 0.5)
    ax.set_xticks(x, [k for k, _ in items], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("white-cell IoU drop (pp)")
    ax.set_title("Shifted test photographs: drop from unshifted, 95% interval (green: holds, orange: "
                 "inconclusive, red: fails; grey: beyond the training range)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
