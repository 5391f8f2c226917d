"""The chapter "Real smears"'s slow records: BCCD training at the chapter's budget, and the shipped
checkpoint on the whole validation and test splits (``bloodseg record bccd-training`` /
``bccd-shipped``). The chapter runs what takes seconds and reads what takes minutes from these
records; :mod:`bloodseg.paper.records` stamps, writes and reads them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..checkpoint import load_checkpoint
from ..colour import colour_threshold_baseline
from ..io import load_folder
from ..recipe import Recipe, real_recipe
from ..segmenter import Segmenter, shipped_checkpoint
from .bccd import (RECORD_SHIPPED, RECORD_TRAINING, bccd_source, bccd_splits, cleanup_rows, compare_cleanup,
                   count_vs_boxes, evaluate_bccd, evaluate_raw_and_cleaned, prepare_cached, rbc_boxes_at_border,
                   read_box_counts, score_row, synthetic_pretraining_splits, train_model, tune_white_cleanup)
from .records import provenance, write_record

__all__ = ["training_runs", "record_training", "record_shipped", "run_record"]


def training_runs(recipe: Recipe) -> list[tuple[str, str]]:
    """The (model, start) pairs the chapter compares: U-Net from scratch and synthetic-pretrained,
    NODEs-UNet synthetic-pretrained; the full profile adds NODEs-UNet from scratch."""
    runs = [("unet", "scratch"), ("unet", "synthetic"), ("nodes-unet", "synthetic")]
    return runs + [("nodes-unet", "scratch")] if recipe.name == "full" else runs







def _gold_extra(r: dict) -> dict:
    return {"gold precision": round(float(r["gold"]["precision"]), 4),
            "gold recall": round(float(r["gold"]["recall"]), 4)}


def record_training(out=None, src=None, work="runs/08_real_smears/record", profile="quick",
                    command: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the chapter's networks (:func:`training_runs`) with ``profile``'s :func:`real_recipe`, score
    them, give each its own white-cell cleanup, and write the record (default ``book/results/`` +
    :data:`RECORD_TRAINING`).

    Exactly what the chapter did live before it read this record: BCCD (``src``, default
    :func:`bccd_source`) prepared into ``work/bccd``; synthetic pretraining, then fine-tuning (or
    training from scratch) on :func:`bccd_splits`; every network and the colour baseline scored on
    the recipe's test photographs (:func:`evaluate_bccd`, the network's argmax); then
    :func:`compare_cleanup` on ALL validation and test photographs. ``data``: ``recipe``, ``splits``
    (sizes), ``runs`` (label, model, start, history, seconds, best epoch), ``scores`` (score rows),
    ``per_image`` ({label: rows}), ``cleanup_comparison`` (rows of :func:`cleanup_summary`).
    """
    t0 = time.perf_counter()
    recipe = real_recipe(profile)
    src, kind = bccd_source() if src is None else bccd_source(src)
    work = Path(work)
    prepare_cached(src, work / "bccd")
    splits = bccd_splits(work / "bccd", recipe)
    pre_splits = synthetic_pretraining_splits(recipe)
    log(f"{recipe.name}: {len(splits['train'])} train / {len(splits['val'])} val patches, "
        f"{len(splits['test'])} test photographs; {len(pre_splits['train'])} synthetic patches")
    trained, pretrained, runs = {}, {}, []
    for name, init in training_runs(recipe):
        ckpt = None
        if init == "synthetic":
            if name not in pretrained:
                pretrained[name] = train_model(name, pre_splits, work / f"pretrain-{name}", recipe,
                                               epochs=recipe.real.pretrain_epochs, lr=recipe.train.lr)
            ckpt = pretrained[name].checkpoint
        tm = train_model(name, splits, work / f"{name}-{init}", recipe, init=ckpt, input_scale=recipe.data.scale)
        trained[tm.label] = tm
        runs.append({"label": tm.label, "model": name, "init": init, "history": tm.history,
                     "seconds": round(tm.seconds, 1),
                     "pretrain_seconds": round(pretrained[name].seconds, 1) if init == "synthetic" else None,
                     "best_epoch": int(np.argmin([h["val_loss"] for h in tm.history])) + 1})
        log(f"{tm.label}: {tm.seconds:.0f} s, best epoch {runs[-1]['best_epoch']} of {len(tm.history)}")
    results = {"colour baseline": evaluate_bccd(colour_threshold_baseline, splits["test"], keep_masks=False)}
    for label, tm in trained.items():
        results[label] = evaluate_bccd(tm.segmenter, splits["test"], keep_masks=False)
    val_all, test_all = load_folder(work / "bccd" / "val"), load_folder(work / "bccd" / "test")
    comparison = compare_cleanup({label: tm.segmenter for label, tm in trained.items()}, val_all, test_all)
    log("cleanup compared: " + json.dumps(comparison))
    record = {
        "what": (f"the chapter's BCCD training at the '{recipe.name}' budget ({', '.join(trained)}), scored on the "
                 f"first {len(splits['test'])} test photographs (network argmax; gold white-cell and silver "
                 f"3-class scores), then each network's white-cell cleanup chosen on all {len(val_all)} validation "
                 f"photographs and scored on all {len(test_all)} test photographs"),
        "data": {"source": kind, "bccd": str(src), "recipe": recipe.to_dict(),
                 "splits": {"train_patches": len(splits["train"]), "val_patches": len(splits["val"]),
                            "test_images": len(splits["test"]), "pretrain_patches": len(pre_splits["train"]),
                            "cleanup_val_images": len(val_all), "cleanup_test_images": len(test_all)},
                 "runs": runs,
                 "scores": [score_row(label, r) for label, r in results.items()],
                 "per_image": {label: r["per_image"] for label, r in results.items()},
                 "cleanup_comparison": comparison},
        "provenance": provenance(command or f"bloodseg record bccd-training --profile {profile}", t0),
    }
    log(f"wrote {write_record(record, Path(out) if out is not None else RECORD_TRAINING)}")
    return record


def record_shipped(out=None, src=None, work="runs/08_real_smears/record",
                   command: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The shipped checkpoint (its stored settings: calibrated solver, scale, white-cell cleanup) on
    the whole BCCD validation and test splits; writes the record (default ``book/results/`` +
    :data:`RECORD_SHIPPED`).

    ``data``: ``settings`` (the Segmenter's), ``stored`` (the scores stored in the checkpoint),
    ``test_raw`` / ``test_cleaned`` (score rows with gold precision and recall, from
    :func:`evaluate_raw_and_cleaned`), ``per_image_raw`` / ``per_image_cleaned``, ``tuning`` (the
    cleanup search of :func:`tune_white_cleanup` on the validation photographs: rows, raw, chosen,
    plateau, components), ``test_rows`` (the same grid on the test photographs, shown, never chosen
    by), ``counting`` (:func:`count_vs_boxes` of the label masks and of the default predictions)
    and ``border`` (:func:`rbc_boxes_at_border`).
    """
    t0 = time.perf_counter()
    src, kind = bccd_source() if src is None else bccd_source(src)
    prep = Path(work) / "bccd"
    prepare_cached(src, prep)
    val, test = load_folder(prep / "val"), load_folder(prep / "test")
    seg = Segmenter.load(shipped_checkpoint(), device="cpu")
    seg.predict(test[0].image)                                   # warm-up, untimed
    both = evaluate_raw_and_cleaned(seg, test, keep_masks=True)
    log(f"test: raw {both['raw']['gold']['iou']:.4f}, cleaned {both['cleaned']['gold']['iou']:.4f} "
        f"({both['raw']['seconds']:.0f} s)")
    tuning = tune_white_cleanup(seg, val, chosen_on=f"BCCD validation split, {len(val)} photographs")
    log(f"tuning: {tuning['chosen']} ({tuning['seconds']:.0f} s)")
    test_rows = cleanup_rows(seg, test)
    boxes, names = read_box_counts(prep), [s.name for s in test]
    counting = {"labels (gold white, silver red)": count_vs_boxes([s.mask for s in test], names, boxes),
                "shipped NODEs-UNet (default settings)": count_vs_boxes(both["cleaned"]["masks"], names, boxes)}
    meta = load_checkpoint(shipped_checkpoint())["metrics"]
    label = f"shipped {seg.model.name} w{seg.model.options.get('width')}"
    record = {
        "what": (f"the shipped checkpoint ({shipped_checkpoint().name}) with its stored settings on all {len(test)} "
                 f"BCCD test photographs (network alone and with its white-cell cleanup, one pass each), its "
                 f"cleanup search repeated on all {len(val)} validation photographs, the same grid on the test "
                 "photographs, and cell counts against the BCCD boxes"),
        "data": {"source": kind, "bccd": str(src), "checkpoint": shipped_checkpoint().name,
                 "settings": json.loads(json.dumps(seg.settings(), default=float)),
                 "stored": {"model": meta["model"], "colour_baseline": meta["colour_baseline"],
                            "test_images": meta["data"]["test_images"], "device_name": meta.get("device_name"),
                            "epochs_run": meta.get("epochs_run"), "train_seconds": meta.get("train_seconds")},
                 "test_raw": {**score_row(label + " (network alone)", both["raw"]), **_gold_extra(both["raw"])},
                 "test_cleaned": {**score_row(label + " + white cleanup", both["cleaned"]),
                                  **_gold_extra(both["cleaned"])},
                 "seconds_per_photo": both["raw"]["seconds"] / max(1, len(test)),
                 "per_image_raw": both["raw"]["per_image"], "per_image_cleaned": both["cleaned"]["per_image"],
                 "tuning": {k: tuning[k] for k in ("rows", "raw", "chosen", "plateau", "components", "n_images",
                                                   "seconds")},
                 "test_rows": test_rows,
                 "counting": {k: {"rows": v["rows"], "white": v["white"], "red": v["red"]} for k, v in counting.items()},
                 "border": rbc_boxes_at_border(src, names)},
        "provenance": provenance(command or "bloodseg record bccd-shipped", t0),
    }
    log(f"wrote {write_record(record, Path(out) if out is not None else RECORD_SHIPPED)}")
    return record


def run_record(args, command: str) -> None:
    """``bloodseg record bccd-training|bccd-shipped [--bccd-src DIR] [--work DIR] [--out PATH]``
    (the command line lives in :mod:`bloodseg.cli`)."""
    args.work = args.work or "runs/08_real_smears/record"
    if args.what == "bccd-training":
        record_training(args.out, args.bccd_src, args.work, args.profile, command=command)
    else:
        record_shipped(args.out, args.bccd_src, args.work, command=command)
