"""What the three speed records share (chapter "Making ODE-blocks cheap"): the study's trained units,
the calibrated solver, test scores, MACs and the timing rounds.

The records themselves are :mod:`bloodseg.paper.speed` (the side-by-side bench),
:mod:`bloodseg.paper.blocks` (what the trained ODE-blocks compute) and
:mod:`bloodseg.paper.solvers` (the same network trained with each solver); their figures are
:mod:`bloodseg.paper.figures_speed`. The study's trained units are read from a study root
(``--study-root``, ``$BLOODSEG_STUDY_ROOT``, default the current folder, a clone's root):
``runs/reproduce/train/<scale>`` for the checkpoints, ``book/results/table{1,2}/<scale>`` for their
records; a unit is used only when its record exists (it finished), and its ``best.pt`` is copied
to a temporary folder first.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..calibrate import SOLVER_GRID, apply_solver, calibrate, nominal_nfe, solver_label
from ..checkpoint import load_model
from ..measure import interleaved_times
from ..ode import FIXED_GRID_METHODS, ode_blocks
from ..registry import VARIANTS
from ..segmenter import Segmenter
from ..train import evaluate
from . import stats

__all__ = ["GOAL_RATIO", "FIXED_GRID", "RECORD_BENCH", "RECORD_BENCH_REPEAT", "RECORD_BLOCKS", "RECORD_SOLVERS",
           "REGULARISE_WORK", "BENCH_LABELS", "ODE_LABELS", "study_root", "find_units", "regularise_units",
           "copy_units", "load_net", "count_macs", "nfe_of", "calibration_pick", "calibration_rule", "test_scores",
           "network_times", "ratio_summary"]

#: Issue #16's goal: NODEs-UNet at most 1.3x the U-Net's inference time.
GOAL_RATIO = 1.3


#: Calibration candidates: the fixed-grid settings of :data:`bloodseg.calibrate.SOLVER_GRID`, cheapest first.
FIXED_GRID = tuple(s for s in SOLVER_GRID if s["method"] in FIXED_GRID_METHODS)

#: Records, relative to the results folder (``book/results`` from a clone's root).
RECORD_BENCH = "speed/bench.json"

#: The same bench command run again, later and at another load: how stable the variants' verdicts are.
RECORD_BENCH_REPEAT = "speed/bench-repeat.json"

RECORD_BLOCKS = "speed/blocks_learned.json"

RECORD_SOLVERS = "speed/solvers.json"

#: Where :mod:`bloodseg.paper.regularise` trains its two arms (``<arm>-seed<k>/best.pt`` + ``unit.json``).
REGULARISE_WORK = Path("runs/regularise")

#: The networks of the side-by-side bench, by their labels in :data:`bloodseg.registry.VARIANTS`
#: (the U-Net first: the reference of every ratio).
BENCH_LABELS = ("unet", "resunet", "ode-unet-5", "nodes-unet", "nodes-unet-h16")
#: The registry's variants with ODE-blocks (NODEs-UNet's first, then the single-block ODE-UNets).
ODE_LABELS = tuple([k for k, v in VARIANTS.items() if v.model == "nodes-unet"]
                   + [k for k, v in VARIANTS.items() if v.model.startswith("ode-unet")])
assert set(BENCH_LABELS) <= set(VARIANTS)


# ----------------------------------------------------------------------------- units

def study_root(root=None) -> Path:
    """``root``, else ``$BLOODSEG_STUDY_ROOT``, else the current folder (a clone's root, where
    ``bloodseg reproduce`` keeps its units)."""
    return Path(root or os.environ.get("BLOODSEG_STUDY_ROOT") or ".")


def find_units(labels: Sequence[str], seeds: Sequence[int] = (0,), root=None, scale: str = "study") -> dict:
    """The finished study units among ``labels`` x ``seeds``: ``{"<label>-seed<k>": dict(label, seed,
    ckpt, record, test_miou, train_s, params, git_commit)}``. A unit counts when its record
    (``book/results/table1|table2/<scale>/<label>-seed<k>.json``) and its ``best.pt``
    (``runs/reproduce/train/<scale>/<label>-seed<k>/``) both exist."""
    root = study_root(root)
    out = {}
    for label in labels:
        for seed in seeds:
            name = f"{label}-seed{seed}"
            ckpt = root / "runs" / "reproduce" / "train" / scale / name / "best.pt"
            for table in ("table2", "table1"):
                rec_path = root / "book" / "results" / table / scale / f"{name}.json"
                if rec_path.is_file() and ckpt.is_file():
                    rec = json.loads(rec_path.read_text())
                    out[name] = dict(label=label, seed=int(seed), ckpt=str(ckpt), record=str(rec_path),
                                     test_miou=rec["test"]["miou"], train_s=rec.get("train_s"),
                                     params=rec.get("params"), git_commit=rec.get("git_commit"),
                                     history=rec.get("history"),
                                     per_image_miou=[p["miou"] for p in rec.get("per_image", [])])
                    break
    return out


def regularise_units(work=REGULARISE_WORK, seeds: Sequence[int] = (0,)) -> dict:
    """The finished units of :mod:`bloodseg.paper.regularise` (``unit.json`` and ``best.pt``):
    ``{"<arm>-seed<k>": dict(arm, seed, ckpt, unit, ode_reg, epochs, test_miou, test_nfe)}``."""
    out = {}
    for arm in ("plain", "regularised"):
        for seed in seeds:
            d = Path(work) / f"{arm}-seed{seed}"
            try:
                unit = json.loads((d / "unit.json").read_text())
            except (OSError, ValueError):
                continue
            if (d / "best.pt").is_file():
                out[f"{arm}-seed{seed}"] = dict(arm=arm, seed=int(seed), ckpt=str(d / "best.pt"), unit=str(d / "unit.json"),
                                                ode_reg=unit.get("ode_reg"), epochs=unit["recipe"]["train"]["epochs"],
                                                test_miou=unit.get("test_miou"), test_nfe=unit.get("test_nfe"),
                                                train_s=unit.get("train_s"))
    return out


def copy_units(units: dict, dest) -> dict:
    """Copy every unit's ``ckpt`` into ``dest`` (units still being written elsewhere are left
    alone); returns the units with ``ckpt`` pointing at the copies and ``source`` at the originals."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, unit in units.items():
        target = dest / f"{name}.pt"
        shutil.copyfile(unit["ckpt"], target)
        out[name] = dict(unit, ckpt=str(target), source=unit.get("source", unit["ckpt"]))
    return out


def load_net(ckpt) -> nn.Module:
    """A trained checkpoint's network on the CPU, in evaluation mode."""
    torch.manual_seed(0)
    return load_model(ckpt, device="cpu").eval()


# ----------------------------------------------------------------------------- measuring

def count_macs(model: nn.Module, x: torch.Tensor) -> dict:
    """Multiply-accumulates one forward of ``model`` on ``x`` executes, per image, in millions.

    Every ``nn.Conv2d`` call is counted (output elements x input channels / groups x kernel area),
    inside the ODE-blocks once per evaluation of f. Returns ``dict(total_mmacs, backbone_mmacs,
    blocks={name: dict(nfe, f_mmacs_per_eval, mmacs)})``: what an option costs is the backbone plus
    NFE x cost(f) per block (GroupNorm, activations and the solver's own arithmetic come on top)."""
    blocks = ode_blocks(model)
    owner = {}
    for b in blocks:
        for m in b.func.modules():
            if isinstance(m, nn.Conv2d):
                owner[id(m)] = b
    spent = {id(b): 0 for b in blocks}
    total = [0]
    n = x.shape[0]

    def hook(m, inputs, out):
        macs = out.numel() // n * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total[0] += macs
        if id(m) in owner:
            spent[id(owner[id(m)])] += macs

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    rows = {}
    for i, b in enumerate(blocks):
        nfe = int(b.nfe_forward)
        rows[b.name or f"block {i}"] = dict(nfe=nfe, mmacs=spent[id(b)] / 1e6,
                                            f_mmacs_per_eval=spent[id(b)] / max(nfe, 1) / 1e6)
    in_blocks = sum(spent.values())
    return dict(total_mmacs=total[0] / 1e6, backbone_mmacs=(total[0] - in_blocks) / 1e6, blocks=rows)


def nfe_of(model) -> dict:
    """``{block: forward NFE of its last solve}`` of every ODE-block of ``model``."""
    return {b.name or f"block {i}": int(b.nfe_forward) for i, b in enumerate(ode_blocks(model))}


def calibration_pick(model: nn.Module, val_samples, max_drop_pp: float = 0.3, grid=FIXED_GRID,
                     log: Callable | None = None) -> dict:
    """Calibrate ``model`` on VALIDATION samples (:func:`bloodseg.calibrate.calibrate`, raw network
    masks, MIoU) and pick the cheapest fixed-grid setting of ``grid`` (fewest f-evaluations per
    block, :func:`~bloodseg.calibrate.nominal_nfe`; ties: the earlier in ``grid``) whose score is
    within ``max_drop_pp`` percentage points of the trained solver's; None (the trained solver)
    when none is. The rule counts evaluations, not measured seconds, so the pick does not depend
    on the load of a shared machine; calibrate's own time-based choice is kept as
    ``calibrate_time_pick``. The model's solver is left as trained."""
    seg = Segmenter(model)
    result = calibrate(seg, list(val_samples), max_drop_pp=max_drop_pp, grid=grid, time_images=0, warmup=1,
                       log=log)
    apply_solver(model, None, seg.trained)
    rows = [dict(label=r["label"], solver=r["solver"], score=r["score"], drop_pp=r["drop_pp"], ok=r["ok"],
                 nfe_per_block=r["nfe_per_block"], nfe_total=float(sum(r["nfe_per_block"].values())),
                 nominal_nfe_per_block=None if r["solver"] is None else nominal_nfe(r["solver"]),
                 seconds_per_image=r["pass_seconds_per_image"], error=r["error"])
            for r in result["rows"]]
    eligible = [r for r in rows[1:] if r["ok"] and r["drop_pp"] is not None and r["drop_pp"] <= max_drop_pp + 1e-9]
    best = min(eligible, key=lambda r: r["nominal_nfe_per_block"]) if eligible else None
    return dict(pick=None if best is None else best["solver"], pick_label="trained" if best is None else best["label"],
                pick_drop_pp=0.0 if best is None else best["drop_pp"], reference_score=result["reference"]["score"],
                reference_nfe_per_block=result["reference"]["nfe_per_block"], max_drop_pp=float(max_drop_pp),
                n_images=result["n_images"], calibrate_time_pick=result["chosen_label"], rows=rows,
                rule=f"cheapest fixed-grid setting (f-evaluations per block) within {max_drop_pp:g} pp of the trained "
                     "solver's validation MIoU (raw network masks); trained solver when none is")


def calibration_rule(max_drop_pp: float = 0.3) -> str:
    return (f"cheapest fixed-grid setting ({', '.join(solver_label(s) for s in FIXED_GRID)}) within {max_drop_pp:g} pp "
            "of the trained solver's MIoU")


def test_scores(model: nn.Module, test_set, n_boot: int = 2000, batch_size: int = 4) -> dict:
    """MIoU and PA of one confusion matrix over every test patch (as the study's records), the
    per-image MIoU and its mean with a bootstrap interval over images."""
    s = evaluate(model, test_set, n_timed=0, per_image=True, batch_size=batch_size)
    per = [float(p["miou"]) for p in s["per_image"]]
    ci = stats.mean_ci(np.array(per)[None, :], n_boot=n_boot)
    return dict(miou=float(s["miou"]), pa=float(s["pa"]), per_image_miou=per, mean_image_miou=ci["mean"],
                mean_image_miou_ci=list(ci["ci"]), n_images=len(per))


def network_times(nets: dict, images: Sequence[torch.Tensor], rounds: int = 7, warmup: int = 1) -> dict:
    """Seconds for all ``images`` (passed one at a time) of each network in ``nets`` ({label:
    module}), in ``rounds`` rounds of :func:`bloodseg.measure.interleaved_times` (every round times
    every network once, the order rotating by one each round, so that a burst of load from another
    process falls on all of them alike). Returns ``dict(times={label: [s per round]}, nfe={label:
    {block: mean forward NFE per image}})`` (NFE read in the first round)."""
    nfe = {label: {} for label in nets}

    def count(label, r, x):
        if r == 0:
            for name, v in nfe_of(nets[label]).items():
                nfe[label][name] = nfe[label].get(name, 0.0) + v / len(images)

    with torch.inference_mode():
        times = interleaved_times(nets, images, rounds, warmup, after=count)
    return dict(times=times, nfe=nfe)


def _median_ci(values: np.ndarray, n_boot: int, seed: int = 0, level: float = 0.95) -> list:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    meds = np.median(values[idx], axis=1)
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(meds, [tail, 100 - tail])]


def ratio_summary(times: dict, reference: str, n_images: int, n_boot: int = 5000) -> dict:
    """Per label: time for ``n_images`` (median over rounds and all rounds), and the ratio to
    ``reference``'s time of the same round: its median over rounds and a bootstrap 95% interval
    of that median (rounds resampled)."""
    ref = np.asarray(times[reference], dtype=float)
    out = {}
    for label, t in times.items():
        t = np.asarray(t, dtype=float)
        ratios = t / ref
        out[label] = dict(time_s_median=float(np.median(t)), time_s_rounds=[float(v) for v in t],
                          time_per_image_s=float(np.median(t)) / n_images, ratio_median=float(np.median(ratios)),
                          ratio_ci=_median_ci(ratios, n_boot), ratio_rounds=[float(v) for v in ratios])
    return out

