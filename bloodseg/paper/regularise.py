"""Regularised training (issue #16): does an RNODE penalty make NODEs-UNet cheaper to solve?

Finlay et al. (2020, "How to train your neural ODE") add to the loss the kinetic energy
∫ ||f||² dt and the Jacobian's Frobenius norm ∫ ||∂f/∂h||_F² dt of each ODE-block, so that training
prefers dynamics an adaptive solver integrates in fewer steps (:attr:`bloodseg.ode.ODEBlock.regularise`,
``TrainRecipe.ode_reg``). :func:`regularisation_study` trains NODEs-UNet on the same seeds with and
without the penalty, on the study scale's data (:func:`bloodseg.paper.reproduce.scale_recipe`), and
records per seed: the NFE per training step in the last epoch, the test MIoU with per-image scores,
and the test-time NFE at the trained tolerances; then the ratios of the NFE and the paired
difference of MIoU (seeds and test images resampled, :func:`bloodseg.paper.stats.paired_bootstrap`).

Each (arm, seed) unit trains in ``work/<arm>-seed<k>`` (resumed from its ``last.pt`` if killed;
started over if its recipe changed) and leaves ``unit.json`` there, so a second call only runs the
missing units.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..ode import check_regularise
from ..registry import build_variant
from ..train import evaluate, fit
from . import stats
from .records import provenance, write_record
from .reproduce import prepare_data, scale_recipe

#: The weights of the record. A pilot (seed 0, 2 epochs of the study recipe) found test MIoU 0.798
#: unregularised, 0.804 with 0.01/0.01 and 0.821 with 0.1/0.1, and the NFE per step 66 in all three:
#: the stronger setting, which does not hurt accuracy, gives the penalty its best chance.
REGULARISE = {"kinetic": 0.1, "jacobian": 0.1}
#: What the pilot measured, stored in the record.
PILOT = ("pilot, seed 0, study recipe with 2 epochs (cosine over 2): plain NFE/step 66.0, test NFE 66, test "
         "MIoU 0.7982, epochs 21/19 s; kinetic=jacobian=0.01: 66.0, 66, 0.8040, reg_loss 0.0178, 102/68 s; "
         "kinetic=jacobian=0.1: 66.0, 66, 0.8206, reg_loss 0.1631, 87/95 s (1 thread on a shared 2-core CPU)")
#: The record, by its name under the results folder (``book/results``).
RECORD = "speed/regularisation.json"
WORK = Path("runs/regularise")
MODEL = "nodes-unet"


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_unit(recipe, data: dict, work: Path, log=print) -> dict:
    """Train NODEs-UNet with ``recipe`` (its seed and ``ode_reg``) in ``work``; measure it on the test set."""
    fingerprint = recipe.to_dict()
    done = _read(work / "unit.json")
    if isinstance(done, dict) and done.get("recipe") == fingerprint:
        return done
    if work.exists() and _read(work / "recipe.json") != fingerprint:
        shutil.rmtree(work)                   # another setting: start over
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(fingerprint, indent=1))
    seed = recipe.train.seed
    torch.manual_seed(seed)
    model = build_variant(MODEL, width=recipe.model.width, **recipe.model.options)
    t0 = time.perf_counter()
    history = fit(model, data["train"], data["val"], work, recipe, device=_device(),
                  on_epoch=lambda r: log(f"  {work.name} epoch {r['epoch']}: loss {r['loss']:.4f} "
                                         f"val_miou {r['val_miou']:.4f} nfe/step {r['nfe_forward']:.1f} "
                                         f"reg {r.get('reg_loss', 0):.4f} ({r['time_s']:.0f} s)"))
    train_s = time.perf_counter() - t0
    best = load_model(work / "best.pt", device=_device())
    s = evaluate(best, data["test"], n_timed=recipe.measure.n_timed, per_image=True)
    last = history[-1]
    unit = dict(seed=seed, ode_reg=recipe.train.ode_reg, recipe=fingerprint,
                nfe_train_step=last["nfe_forward"], nfe_backward_step=last["nfe_backward"],
                reg_loss=last.get("reg_loss"), epoch_s=[r["time_s"] for r in history], train_s=train_s,
                best_epoch=min(history, key=lambda r: r["val_loss"])["epoch"], history=history,
                test_miou=s["miou"], test_pa=s["pa"], test_nfe=s["nfe_forward"],
                test_time_per_image_s=s["time_s"] / max(s["n_timed"], 1),
                per_image_miou=[p["miou"] for p in s["per_image"]])
    (work / "unit.json").write_text(json.dumps(unit, indent=1, default=float))
    return unit


def _mean(units: list[dict], key: str) -> float:
    return float(np.mean([u[key] for u in units]))


def regularisation_study(out=RECORD, work=WORK, seeds=(0, 1, 2), regularise: dict | None = None,
                         epochs: int | None = None, scale: str = "study", command: str | None = None,
                         notes: str = PILOT, log=print) -> dict:
    """NODEs-UNet with and without ``regularise`` (default :data:`REGULARISE`) on ``seeds``; the
    record (also written to ``out``, a path or the default :data:`RECORD` under the results folder,
    unless it is None). ``epochs`` shortens the scale's recipe (the cosine schedule follows it)."""
    started = time.perf_counter()
    regularise = check_regularise(REGULARISE if regularise is None else regularise)
    base = scale_recipe(scale)
    if epochs is not None:
        base = base.replace(**{"train.epochs": epochs})
    base = base.replace(**{"train.progress": False})
    data = prepare_data(base)
    arms = {"plain": {}, "regularised": regularise}
    units = {arm: [] for arm in arms}
    for seed in seeds:                        # seed by seed: the pairs complete early
        for arm, reg in arms.items():
            recipe = base.replace(**{"train.seed": seed, "train.ode_reg": reg})
            log(f"{arm} seed {seed} ...")
            units[arm].append(train_unit(recipe, data, Path(work) / f"{arm}-seed{seed}", log))
    plain, reg = units["plain"], units["regularised"]
    a = 100 * np.array([u["per_image_miou"] for u in plain])
    b = 100 * np.array([u["per_image_miou"] for u in reg])
    diff = stats.paired_bootstrap(a, b)
    summary = {arm: dict(nfe_train_step=_mean(us, "nfe_train_step"), nfe_backward_step=_mean(us, "nfe_backward_step"),
                         test_nfe=_mean(us, "test_nfe"), test_miou=_mean(us, "test_miou"),
                         epoch_s=float(np.mean([np.mean(u["epoch_s"]) for u in us])),
                         per_seed=[dict(seed=u["seed"], nfe_train_step=u["nfe_train_step"], test_nfe=u["test_nfe"],
                                        test_miou=u["test_miou"], reg_loss=u["reg_loss"], best_epoch=u["best_epoch"])
                                   for u in us])
               for arm, us in units.items()}
    record = dict(
        what="NODEs-UNet trained with and without RNODE regularisation (Finlay et al. 2020): kinetic energy "
             "and Hutchinson Jacobian Frobenius norm, both integrated alongside each ODE-block's solve",
        model=MODEL, regularise=regularise, seeds=list(seeds), epochs=base.train.epochs,
        recipe=base.to_dict(), **{**provenance(command, started), "device": _device()}, notes=notes,
        summary=summary,
        nfe_train_ratio=summary["regularised"]["nfe_train_step"] / summary["plain"]["nfe_train_step"],
        test_nfe_ratio=summary["regularised"]["test_nfe"] / summary["plain"]["test_nfe"],
        miou_diff_pp=dict(diff=diff["diff"], ci=list(diff["ci"]), n_seeds=diff["n_seeds"],
                          n_images=diff["n_images"], of="regularised - plain, per-image test MIoU"),
        units=units)
    if out is not None:
        write_record(record, RECORD if out == RECORD else Path(out))
    return record

