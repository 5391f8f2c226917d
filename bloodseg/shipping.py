"""The product pipeline: from labelled photographs to a :class:`~bloodseg.Segmenter` that ships.

The shipped checkpoint (``bloodseg/data/checkpoints/``) is a network plus the settings that make it
work on anyone's photographs. Every one of them is made here, from code and data alone:

1. **train** (:func:`train_model`): pretrain on BCCD-like synthetic smears
   (:func:`synthetic_pretraining_splits`), then fine-tune on the photographs' training split at the
   recipe's magnification ``data.scale`` (:func:`bloodseg.datasets.training_splits`, the one split
   path); the epoch with the lowest validation loss is kept;
2. **finish** (:func:`finish_segmenter`), on photographs it is never scored on:

   * ``background`` — the training photographs' typical plasma colour (the colour rule's target,
     :func:`bloodseg.stain.reference_background`);
   * ``red_cell_diameter`` — their median red-cell diameter (:func:`bloodseg.scale.red_cell_diameter`,
     measured as prediction measures it: on the colour-matched photograph) times ``data.scale``:
     the size in network pixels the automatic scale brings every photograph to;
   * ``postprocess`` — the white-cell cleanup chosen on the validation photographs
     (:func:`bloodseg.cleanup.tune_white_cleanup`);
   * ``solver`` — the cheapest ODE solver within 0.3 points of the trained one on the validation
     photographs (:meth:`~bloodseg.Segmenter.calibrate`);
3. **score** the test photographs (:func:`bloodseg.scoring.evaluate_photos`), network alone and the
   finished pipeline, and save one weights-only file.

``bloodseg train-bccd`` runs all of it (:func:`train_segmenter`); ``bloodseg tune`` runs step 2 on an
existing checkpoint (:func:`tune_checkpoint`) — how the shipped file's settings are re-made.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .calibrate import white_iou_score
from .checkpoint import load_checkpoint, update_checkpoint
from .cleanup import tune_white_cleanup
from .colour import colour_threshold_baseline
from .datasets import SegmentationDataset, extract_patches, make_splits, prepared_photographs, training_splits
from .errors import CheckpointError, DataError
from .io import Sample, load_folder
from .ode import ode_blocks
from .recipe import REAL_PRESETS, Recipe
from .registry import build_variant, variant
from .scale import red_cell_diameter
from .scoring import evaluate_photos
from .segmenter import Segmenter
from .shift import ShiftedPatches
from .stain import match_background, reference_background
from .synthetic import make_smear
from .train import fit

__all__ = ["FINISH_STEPS", "synthetic_pretraining_splits", "TrainedModel", "train_model", "measure_photographs",
           "finish_segmenter", "score_row", "train_segmenter", "tune_checkpoint"]

#: The settings :func:`finish_segmenter` can make, in the order it makes them.
FINISH_STEPS = ("background", "scale", "cleanup", "solver")


def synthetic_pretraining_splits(recipe: Recipe, seed: int = 0) -> dict[str, list[Sample]]:
    """Patches (``data.patch``, ``real.pretrain_crops`` per smear, ``data.augment`` copies) of
    ``real.pretrain_smears`` synthetic smears (``real.pretrain_size``, seeds 0, 1, ...) split 3:1 by
    smear. The synthetic cells have the size of BCCD's at ``data.scale`` = 0.5."""
    d, r = recipe.data, recipe.real
    smears = []
    for i in range(r.pretrain_smears):
        image, mask = make_smear(i, size=r.pretrain_size)
        smears.append(Sample(f"smear_{i:04d}", image, mask, f"smear_{i:04d}"))
    patches = extract_patches(smears, size=d.patch, per_image=r.pretrain_crops, seed=seed)
    return make_splits(patches, n_test=0, val_ratio=0.25, seed=seed, factor=d.augment)


@dataclasses.dataclass
class TrainedModel:
    """A trained network with where it came from."""
    name: str                # model label, e.g. "nodes-unet"
    init: str                # "scratch" or "synthetic" (fine-tuned from a synthetic pretraining)
    segmenter: Segmenter     # the best epoch (lowest validation loss), with its input_scale
    history: list
    seconds: float
    checkpoint: Path

    @property
    def model(self) -> torch.nn.Module:
        """The bare network (eval mode); use :attr:`segmenter` to predict on photographs."""
        return self.segmenter.model

    @property
    def label(self) -> str:
        how = {"synthetic": "synthetic-pretrained", "scratch": "from scratch"}.get(self.init, self.init)
        return f"{self.name} ({how})"


def train_model(name: str, splits: dict, out_dir, recipe: Recipe, init=None, epochs: int | None = None,
                lr: float | None = None, seed: int | None = None, init_label: str | None = None,
                input_scale: float = 1.0, train_options: dict | None = None,
                on_epoch: Callable[[dict], None] | None = None, resume: bool = False) -> TrainedModel:
    """Train ``name`` (a :mod:`bloodseg.registry` label, width ``model.width``, options
    ``model.options``) on ``splits``; fine-tune from checkpoint ``init`` if given.

    The recipe's ``train`` section, with ``epochs`` (default ``train.epochs``), ``lr`` (default
    ``real.finetune_lr`` after ``init``, else ``train.lr``) and ``seed`` (default ``train.seed``).
    ``input_scale``: the factor the training images were resized by (``data.scale`` for
    photographs, 1 for synthetic smears), saved in the checkpoints as the Segmenter's setting (and
    at the top level for older readers) so that prediction resizes alike. ``train_options``: more
    :class:`~bloodseg.recipe.TrainRecipe` fields; ``on_epoch`` gets each epoch's history record.
    ``splits["train"]`` may be a torch Dataset (e.g. :class:`bloodseg.shift.ShiftedPatches`).
    Writes ``out_dir/best.pt``, ``last.pt`` and ``history.json`` (:func:`bloodseg.train.fit`; a fresh
    run, or with ``resume`` one that continues from ``out_dir/last.pt``). Returns the best epoch as
    a :class:`TrainedModel`.
    """
    t = recipe.train
    seed = t.seed if seed is None else seed
    torch.manual_seed(seed)
    width = recipe.model.width
    model = build_variant(name, width=width, **recipe.model.options)
    settings = Segmenter(model, input_scale=input_scale).settings()   # checks input_scale
    if init is not None and not (resume and (Path(out_dir) / "last.pt").is_file()):
        state = load_checkpoint(init)
        if state["model_name"] != model.name or state["model_options"].get("width") != width:
            raise CheckpointError(f"{init} holds a '{state['model_name']}' of width "
                                  f"{state['model_options'].get('width')}, not '{name}' of width {width}")
        model.load_state_dict(state["model_state"])
    cfg = dataclasses.replace(t, epochs=epochs or t.epochs, seed=seed, progress=False,
                              lr=lr or (recipe.real.finetune_lr if init is not None else t.lr))
    cfg = dataclasses.replace(cfg, **(train_options or {}))
    t0 = time.perf_counter()
    train = splits["train"]
    train = train if isinstance(train, torch.utils.data.Dataset) else SegmentationDataset(train)
    history = fit(model, train, SegmentationDataset(splits["val"]), out_dir,
                  recipe.replace(**{"model.name": variant(name).model}, train=cfg), resume=resume, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    best = Path(out_dir) / "best.pt"
    old_keys = {"input_scale": float(input_scale)} if input_scale != 1.0 else {}
    for path in (best, Path(out_dir) / "last.pt"):
        update_checkpoint(path, segmenter=settings, **old_keys)
    return TrainedModel(name, init_label or ("synthetic" if init is not None else "scratch"),
                        Segmenter.load(best), history, seconds, best)


def measure_photographs(photos, input_scale: float, background=None) -> dict:
    """What the colour and scale rules need to know of a network's training photographs (whole, at
    full size): ``background`` (:func:`~bloodseg.stain.reference_background`, unless given) and
    ``red_cell_diameter``: the median :func:`~bloodseg.scale.red_cell_diameter` of the photographs
    brought to that background (as prediction sees them), times ``input_scale``."""
    photos = list(photos)
    if not photos:
        raise DataError("measure_photographs needs at least one training photograph")
    background = reference_background(photos) if background is None else tuple(background)
    diameters = [red_cell_diameter(match_background(p, background)) for p in photos]
    ok = [d for d in diameters if d is not None]
    if not ok:
        raise DataError(f"no red cells could be measured on any of the {len(photos)} training photographs")
    return {"background": [float(v) for v in background], "red_cell_diameter": float(np.median(ok)) * input_scale,
            "diameter_px_median": float(np.median(ok)), "n_photographs": len(photos), "n_measured": len(ok)}


def finish_segmenter(seg: Segmenter, train_photos, val_photos, steps=FINISH_STEPS,
                     log: Callable[[str], None] = print) -> tuple[Segmenter, dict]:
    """``(segmenter, report)``: ``seg`` with the settings of ``steps`` (:data:`FINISH_STEPS`) made
    on whole labelled photographs: ``train_photos`` (its training photographs) for the background
    and the red-cell size, ``val_photos`` (never the test ones) for the cleanup and the solver."""
    unknown = set(steps) - set(FINISH_STEPS)
    if unknown:
        raise DataError(f"unknown finishing step(s) {sorted(unknown)}; choose from {', '.join(FINISH_STEPS)}")
    report, train_photos, val_photos = {}, list(train_photos), list(val_photos)
    if "background" in steps or "scale" in steps:
        m = measure_photographs([p.image for p in train_photos], seg.input_scale,
                                None if "background" in steps else seg.background)
        report["measured"] = m
        if "background" in steps:
            seg = seg.replace(background=tuple(m["background"]), colour="background")
        if "scale" in steps:
            seg = seg.replace(red_cell_diameter=m["red_cell_diameter"], scale="auto")
        log(f"measured on {m['n_photographs']} training photographs: background {np.round(m['background'], 1).tolist()}, "
            f"red-cell diameter {m['diameter_px_median']:.2f} px ({m['red_cell_diameter']:.2f} network px)")
    if "cleanup" in steps:
        tuning = tune_white_cleanup(seg, val_photos, chosen_on=f"validation split, {len(val_photos)} photographs")
        report["cleanup"] = {k: tuning[k] for k in ("chosen", "plateau", "raw", "rows", "n_images", "seconds")}
        seg = seg.replace(postprocess=tuning["chosen"])
        log(f"cleanup chosen on {len(val_photos)} validation photographs: {tuning['chosen']}")
    if "solver" in steps and ode_blocks(seg.model):
        seg = seg.replace(solver=None).calibrate(val_photos, score=white_iou_score)
        report["solver"] = {"chosen": seg.solver, "rows": seg.metrics["calibration"]["rows"]}
        log(f"solver chosen on {len(val_photos)} validation photographs: {seg.metrics['calibration']['chosen_label']}")
    return seg, json.loads(json.dumps(report, default=float))


def score_row(label: str, result: dict) -> dict:
    """One flat table row (rounded) from :func:`bloodseg.scoring.evaluate_photos`'s result."""
    g = result["gold"]
    r = lambda v: round(float(v), 4)  # noqa: E731
    row = {"model": label, "gold white IoU": r(g["iou"]), "gold white Dice": r(g["dice"])}
    if "silver" in result:
        s = result["silver"]
        row.update({"silver PA": r(s["pa"]), "silver CPA bg": r(s["cpa"][0]), "silver CPA white": r(s["cpa"][1]),
                    "silver CPA red": r(s["cpa"][2]), "silver MIoU": r(s["miou"])})
    row["images"] = result["n_images"]
    return row


def _photos(src, split: str) -> list[Sample]:
    return load_folder(prepared_photographs(src) / split)


def train_segmenter(out_dir="runs/bccd_checkpoint", recipe: Recipe = REAL_PRESETS["ship"], src="bccd",
                    pretrain: bool = True, log: Callable[[str], None] = print, init=None, tta: bool = False,
                    steps=FINISH_STEPS, resume: bool = False) -> dict:
    """Make a shipped-style checkpoint from code alone: train (:func:`train_model`), finish
    (:func:`finish_segmenter`, ``steps``), score the WHOLE test split, save.

    ``src``: ``"bccd"`` (:func:`bloodseg.bccd.bccd_source`), a raw BCCD folder or a prepared one.
    ``recipe.model`` gives the label and width; the recipe's ``train`` section goes to both
    trainings except ``max_minutes`` (the photographs' training only). ``init``: continue from this
    checkpoint instead of the synthetic pretraining. ``data.shift`` > 0: the training patches are
    drawn afresh every epoch under domain shift (:class:`bloodseg.shift.ShiftedPatches`, as many
    a epoch as the fixed patches would be). ``resume``: continue an interrupted training (its
    ``last.pt``) instead of starting again. Writes ``out_dir/bccd-<label>-w<width>.pt`` and
    ``out_dir/metrics.json``; returns the metrics. Shipping it = copying the .pt into
    ``bloodseg/data/checkpoints/``.
    """
    model, seed = recipe.model.name, recipe.train.seed
    epoch_log = lambda r: log(json.dumps({k: round(v, 4) if isinstance(v, float) else v  # noqa: E731
                                          for k, v in r.items()}))
    out_dir, t0 = Path(out_dir), time.perf_counter()
    splits = training_splits(src, recipe.replace(**{"real.eval_images": None}), seed)
    log(f"data {src}: {len(splits['train'])} train / {len(splits['val'])} val patches, {len(splits['test'])} test photographs")
    init_label = None
    if init is not None:
        init_label, pretrain = f"continued from {Path(init).name}", False
    elif pretrain:
        pre = train_model(model, synthetic_pretraining_splits(recipe, seed), out_dir / "pretrain", recipe,
                          epochs=recipe.real.pretrain_epochs, lr=recipe.train.lr,
                          train_options={"max_minutes": 0.0}, on_epoch=epoch_log)
        init = pre.checkpoint
        log(f"pretrained on synthetic in {pre.seconds:.0f} s")
    if recipe.data.shift > 0:
        splits = {**splits, "train": ShiftedPatches(_photos(src, "train"), recipe.data.patch, recipe.data.scale,
                                                    len(splits["train"]), recipe.data.shift, seed)}
        log(f"training patches drawn afresh each epoch under domain shift (strength {recipe.data.shift:g})")
    tm = train_model(model, splits, out_dir / "finetune", recipe, init=init, input_scale=recipe.data.scale,
                     on_epoch=epoch_log, init_label=init_label, resume=resume)
    log(f"trained on the photographs in {tm.seconds:.0f} s: " + json.dumps(tm.history[-1]))
    val = _photos(src, "val")[: recipe.real.val_images]
    seg, report = finish_segmenter(tm.segmenter, _photos(src, "train"), val, steps, log)
    test = splits["test"]
    plain = tm.segmenter.replace(scale="fixed", colour="none", postprocess=None)
    metrics = {"model": score_row(tm.label, evaluate_photos(plain, test)),
               "pipeline": score_row(tm.label + " + its settings", evaluate_photos(seg, test)),
               "colour_baseline": score_row("colour baseline", evaluate_photos(colour_threshold_baseline, test)),
               "model_tta": (score_row(tm.label + " + flip TTA", evaluate_photos(plain.replace(tta=True), test))
                             if tta else None),
               "finish": report, "init": None if init is None else str(init),
               **({"background": {"bgr": report["measured"]["background"],
                                  "of": f"{report['measured']['n_photographs']} training photographs"}}
                  if "background" in steps else {}),
               "data": {"source": str(src), "train_patches": len(splits["train"]), "val_patches": len(splits["val"]),
                        "val_images": len(val), "test_images": len(test)},
               "split": {"data": str(src), "test": [s.name for s in test], "val": [s.name for s in val]},
               "recipe": recipe.to_dict(), "model_name": model, "pretrained": pretrain, "seed": seed,
               "device": str(next(tm.model.parameters()).device), "epochs_run": len(tm.history),
               "best_epoch": int(np.argmin([h["val_loss"] for h in tm.history]) + 1),
               "train_seconds": round(tm.seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
               "torch": str(torch.__version__)}
    metrics = json.loads(json.dumps(metrics, default=float))
    target = out_dir / f"bccd-{model}-w{recipe.model.width}.pt"
    seg.replace(recipe=recipe.to_dict(), metrics=metrics).save(
        target, split=metrics["split"], **({"input_scale": seg.input_scale} if seg.input_scale != 1.0 else {}))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"test: network alone {metrics['model']['gold white IoU']}, with its settings "
        f"{metrics['pipeline']['gold white IoU']} (gold white-cell IoU, {len(test)} photographs); wrote {target}")
    return {**metrics, "checkpoint": str(target), "size_mb": round(target.stat().st_size / 2 ** 20, 2)}


def tune_checkpoint(ckpt, src="bccd", out=None, steps=FINISH_STEPS, log: Callable[[str], None] = print) -> dict:
    """:func:`finish_segmenter` on an existing checkpoint (``steps`` of :data:`FINISH_STEPS`) with
    ``src``'s training and validation photographs; then the test photographs are scored with the
    settings it had and with the new ones. Writes the checkpoint again (``out``, default in place;
    weights unchanged) with the settings and ``metrics["tune"]``. Returns that entry."""
    seg = Segmenter.load(ckpt)
    val, test = _photos(src, "val"), _photos(src, "test")
    new, report = finish_segmenter(seg, _photos(src, "train"), val, steps, log)
    before, after = evaluate_photos(seg, test), evaluate_photos(new, test)
    report.update(steps=list(steps), source=str(src), val_images=len(val), test_images=len(test),
                  test_before=score_row("before", before), test_after=score_row("after", after),
                  torch=str(torch.__version__))
    log(f"test ({len(test)} photographs): white IoU {before['gold']['iou']:.4f} before, {after['gold']['iou']:.4f} after")
    metrics = dict(new.metrics or {})
    metrics["tune"] = json.loads(json.dumps(report, default=float))
    settings = new.settings()
    old_keys = {"input_scale": new.input_scale} if new.input_scale != 1.0 else {}
    target = update_checkpoint(ckpt, out=out, segmenter=settings, postprocess=settings["postprocess"],
                               metrics=metrics, **old_keys)
    return {**metrics["tune"], "checkpoint": str(target)}
