"""Runs for the chapters: recipes, data, training with a cache, seed noise and score rows.

* **Recipes** — :func:`baseline_budget` / :func:`ablation_budget` return a
  :class:`bloodseg.recipe.Recipe`: what a profile can afford (width, epochs, patch size, subset). One
  function per experiment, so the settings a chapter states are the settings it ran.
* **Runs** — :func:`prepare_data` and :func:`train_and_evaluate`: train a list of models with
  identical data, seed and budget, evaluate each on the test split, and cache every run under
  ``runs/<chapter>/<profile>/<label>/`` (``best.pt``, ``last.pt``, ``history.json``,
  ``result.json``). Re-running a chapter reuses finished runs whose settings are unchanged and
  resumes interrupted ones; a run whose settings changed is started over. Timings are measured
  again at every call (``retime=True``), so the numbers printed belong to this execution.
* **Score rows** — :func:`scores_row`, :func:`paper_row`, :func:`scores_frame`: tables in the paper's
  layout. Scores are stored as fractions (0..1) like :func:`bloodseg.metrics.scores`; tables show percent.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..datasets import SegmentationDataset, extract_patches, synthetic_splits
from ..measure import time_inference
from ..models import build_model, count_parameters, parameter_memory_mb
from ..recipe import Recipe, get_recipe
from ..train import evaluate, fit
from .reference import CPA_COLUMNS


#: Where trained runs are cached: ``$BLOODSEG_RUNS``, else ``runs/`` under the working directory.
RUNS_DIR = Path(os.environ.get("BLOODSEG_RUNS", "runs"))
EXPERIMENT_FORMAT = 1   # bump to invalidate every cached run

#: Extra seeds of the U-Net in chapter 5, to measure how much MIoU moves from seed to seed alone.
NOISE_SEEDS = (1, 2)


#: What chapters 5 and 6 change in a profile's recipe so that ten (chapter 5) or three (chapter 6)
#: models train at one identical budget:
#:
#: * full – the paper's setting as it is (width 32, 256 px patches, 50 epochs).
#: * quick – what a 2-core CPU affords for ten models in a few minutes: width 16, training and
#:   validation on one random 64x64 crop of each 128 px patch (a quarter of the pixels per step),
#:   3 epochs of batch 4; the test split stays the quick profile's 128 px patches. Measured while
#:   choosing (one thread): at 64 px a training step of an ODE-UNet at position 1 or 9 (full
#:   resolution, the expensive ones) costs about 4-5x a U-Net step, position 5 about 2x; with
#:   batch 8 (half the updates for the same pixels) the ODE-UNets were still far from converged
#:   after 3 epochs (test MIoU of ODE-UNet-9 0.69 vs 0.84 with batch 4).
#: * smoke – seconds: the smoke profile, 1 epoch on 8 training patches, 3 timed images.
ABLATION_CHANGES = {
    "full": {},
    "quick": {"train.epochs": 3, "train.batch_size": 4, "data.train_patch": 64, "data.crops_per_patch": 1},
    "smoke": {"data.max_train": 8, "data.max_val": 3, "measure.n_timed": 3},
}


def baseline_budget(profile=None) -> Recipe:
    """Chapter 4's U-Net: the profile's own recipe (quick: width 16, 128 px patches, 6 epochs)."""
    return get_recipe(profile)


def ablation_budget(profile=None) -> Recipe:
    """Chapters 5 and 6: the profile's recipe with :data:`ABLATION_CHANGES` applied."""
    r = get_recipe(profile)
    return r.replace(**ABLATION_CHANGES[r.name])


def nodes_settings(profile=None) -> dict:
    """Chapter 6's extra measurements, from the recipe's ``measure`` section: the test-time
    tolerances of the curve, the inner width of the narrower f (``ode_hidden``, twice the width),
    the size of the adjoint-vs-direct training step, and whether ``torch.compile`` is tried
    (the full recipe, or ``BLOODSEG_TRY_COMPILE=1``: on a 2-core CPU, compiling the three f's
    took about as long as the rest of the chapter's measurements, for a small gain)."""
    b = ablation_budget(profile)
    m = b.measure
    try_compile = m.try_compile or os.environ.get("BLOODSEG_TRY_COMPILE") == "1"
    return dict(tolerances=tuple(m.tolerances), hidden=2 * b.model.width, mem_size=m.mem_size,
                mem_batch=m.mem_batch, try_compile=try_compile, loose_rtol=m.loose_rtol)


def _subset(samples: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(samples):
        return list(samples)
    keep = sorted(np.random.default_rng(seed).permutation(len(samples))[:n].tolist())
    return [samples[i] for i in keep]


def prepare_data(budget: Recipe) -> dict:
    """``{"train", "val", "test"}`` sample lists for ``budget`` plus ``"description"`` (sizes)."""
    splits = synthetic_splits(budget.name)
    train, val, test = splits["train"], splits["val"], splits["test"]
    if budget.data.train_patch:
        train = extract_patches(train, budget.data.train_patch, budget.data.crops_per_patch, seed=budget.train.seed)
        val = extract_patches(val, budget.data.train_patch, budget.data.crops_per_patch, seed=budget.train.seed + 1)
    train = _subset(train, budget.data.max_train, budget.train.seed)
    val = _subset(val, budget.data.max_val, budget.train.seed + 1)
    side = lambda ss: (f"{ss[0].mask.shape[1]}x{ss[0].mask.shape[0]}" if ss else "-")  # noqa: E731
    description = dict(n_train=len(train), n_val=len(val), n_test=len(test), train_size=side(train),
                       val_size=side(val), test_size=side(test), profile=budget.name)
    return dict(train=train, val=val, test=test, description=description)


def describe_data(data: dict) -> str:
    d = data["description"]
    return (f"{d['n_train']} train patches ({d['train_size']}), {d['n_val']} validation ({d['val_size']}), "
            f"{d['n_test']} test ({d['test_size']}); synthetic smears of the '{d['profile']}' profile")


def _spec(item) -> dict:
    if isinstance(item, str):
        return dict(label=item, model=item, options={})
    spec = dict(item)
    spec.setdefault("options", {})
    spec.setdefault("label", spec["model"])
    return spec


def _fingerprint(spec: dict, budget: Recipe, data: dict) -> dict:
    fp = dict(format=EXPERIMENT_FORMAT, model=spec["model"], options=spec["options"],
              budget=budget.to_dict(), data=data["description"])
    return json.loads(json.dumps(fp))   # as read back from result.json (tuples become lists)


def run_dir(chapter: str, budget: Recipe, label: str) -> Path:
    """Where a run lives: ``runs/<chapter>/<profile>/<label>/``."""
    return RUNS_DIR / chapter / budget.name / label


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def timed_images(dataset, n: int) -> list[torch.Tensor]:
    return [dataset[i % len(dataset)][0][None] for i in range(n)] if len(dataset) else []


def measure_time(model, dataset, n: int, warmup: int = 2) -> dict:
    """The paper's "time for n images": test images one at a time (cycled), after warm-up."""
    out = time_inference(model, timed_images(dataset, n), warmup=warmup)
    out["nfe_forward_total"] = sum(out["nfe_forward"].values())
    return out


def _evaluate(model, test_set, budget: Recipe, per_image: bool) -> dict:
    metrics = evaluate(model, test_set, n_timed=0, per_image=per_image)
    for k in ("time_s", "n_timed", "nfe_forward"):
        metrics.pop(k, None)
    if per_image:
        metrics["per_image"] = [dict(pa=s["pa"], miou=s["miou"]) for s in metrics["per_image"]]
    return metrics


def _epoch_line(label: str, epochs: int):
    def show(r: dict) -> None:
        nfe = f", NFE fwd {r['nfe_forward']:.0f}" if r.get("nfe_forward") else ""
        print(f"  {label} epoch {r['epoch']}/{epochs}: loss {r['loss']:.3f}, val loss {r['val_loss']:.3f}, "
              f"val MIoU {100 * r['val_miou']:.1f}%{nfe} ({r['time_s']:.1f} s)", flush=True)
    return show


def train_and_evaluate(specs, chapter: str, budget: Recipe, data: dict | None = None,
                       per_image: bool = False, reuse_from=(), retime: bool = True,
                       verbose: bool = True) -> dict[str, dict]:
    """Train every model of ``specs`` with identical data, seed and budget; evaluate on the test split.

    ``specs``: model names (``"unet"``, ``"ode-unet-5"`` …) or dicts ``dict(label=..., model=...,
    options={...})`` for variants (e.g. ``ode_hidden``). Every model is built right after
    ``torch.manual_seed(budget.train.seed)``, so the U-Net parts of all models start from the same weights.

    Each run lives in :func:`run_dir`; a finished run with the same settings (model, options, budget,
    data) is reused, also from the chapters in ``reuse_from``. Returns ``{label: result}`` where a
    result holds the test scores (``pa, cpa, recall, iou, miou`` as fractions), ``params``,
    ``param_mb``, ``time_s`` for ``budget.measure.n_timed`` images, ``time_20_s``, ``nfe_forward`` per
    block, the training ``history``, ``train_s``, ``best_epoch``, ``run_dir`` and ``cached``.
    """

    data = data or prepare_data(budget)
    train_set, val_set = SegmentationDataset(data["train"]), SegmentationDataset(data["val"])
    test_set = SegmentationDataset(data["test"])
    results = {}
    for item in specs:
        spec = _spec(item)
        label, fp = spec["label"], _fingerprint(spec, budget, data)
        folder = run_dir(chapter, budget, label)
        result, source = None, None
        for ch in (chapter, *reuse_from):
            candidate = read_json(run_dir(ch, budget, label) / "result.json")
            if candidate and candidate.get("fingerprint") == fp and \
                    (run_dir(ch, budget, label) / "best.pt").is_file():
                result, source = candidate, ch
                break
        if result is not None:
            result["cached"] = True
            result["run_dir"] = str(run_dir(source, budget, label))
            if verbose:
                where = "" if source == chapter else f" (from chapter {source})"
                print(f"{label}: reusing the finished run in {result['run_dir']}{where}", flush=True)
        else:
            if read_json(folder / "fingerprint.json") != fp and folder.exists():
                shutil.rmtree(folder)            # settings changed: start over
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "fingerprint.json").write_text(json.dumps(fp, indent=1))
            torch.manual_seed(budget.train.seed)
            model = build_model(spec["model"], width=budget.model.width, **spec["options"])
            cfg = budget.replace(**{"train.progress": False})
            if verbose:
                print(f"{label}: training ({count_parameters(model):,} parameters) ...", flush=True)
            history = fit(model, train_set, val_set, folder, cfg,
                          on_epoch=_epoch_line(label, budget.train.epochs) if verbose else None)
            best_epoch = min(history, key=lambda r: r["val_loss"])["epoch"]
            best = load_model(folder / "best.pt")
            result = dict(label=label, model=spec["model"], options=spec["options"],
                          params=count_parameters(best), param_mb=parameter_memory_mb(best),
                          history=history, train_s=sum(r["time_s"] for r in history),
                          best_epoch=best_epoch, fingerprint=fp)
            result.update(_evaluate(best, test_set, budget, per_image))
            result.update(_time_fields(best, test_set, budget))
            (folder / "result.json").write_text(json.dumps(result, indent=1, default=float))
            result["cached"] = False
            result["run_dir"] = str(folder)
        if result["cached"]:
            if per_image and "per_image" not in result:
                result.update(_evaluate(load_run_model(result), test_set, budget, True))
            if retime:   # timings belong to this execution, not to the one that trained
                result.update(_time_fields(load_run_model(result), test_set, budget))
        results[label] = result
    return results


def _time_fields(model, test_set, budget: Recipe) -> dict:
    t = measure_time(model, test_set, budget.measure.n_timed)
    return dict(time_s=t["time_s"], n_timed=t["n_images"], time_20_s=t["time_per_image_s"] * 20,
                nfe_forward=t["nfe_forward"], nfe_forward_total=t["nfe_forward_total"],
                timed_size=list(test_set[0][0].shape[1:]) if len(test_set) else None)


def load_run_model(result: dict, **overrides):
    """The best checkpoint of a run (a result of :func:`train_and_evaluate`), in eval mode on CPU."""
    return load_model(Path(result["run_dir"]) / "best.pt", device="cpu", **overrides)


def strip_for_saving(results: dict, keep_history: bool = True) -> dict:
    """Results without bulky/volatile fields, ready for ``run.save``."""
    out = {}
    for label, r in results.items():
        r = {k: v for k, v in r.items() if k not in ("fingerprint", "run_dir")}
        if not keep_history:
            r.pop("history", None)
        out[label] = r
    return out


def seed_noise(results: dict, budget: Recipe, chapter: str, data: dict, model: str = "unet",
               seeds=NOISE_SEEDS) -> dict:
    """Train ``model`` again with other seeds (same data, same budget) and return how much its test
    MIoU moves: ``dict(seeds, miou_pp, std_pp, range_pp)`` (seed ``budget.train.seed`` from ``results``)."""
    mious = {budget.train.seed: 100 * results[model]["miou"]}
    pas = {budget.train.seed: 100 * results[model]["pa"]}
    for seed in seeds:
        b = budget.replace(**{"train.seed": seed})
        r = train_and_evaluate([dict(label=f"{model}-seed{seed}", model=model)], chapter, b, data, retime=False)
        mious[seed] = 100 * r[f"{model}-seed{seed}"]["miou"]
        pas[seed] = 100 * r[f"{model}-seed{seed}"]["pa"]
    values, pa = list(mious.values()), list(pas.values())
    return dict(model=model, seeds=list(mious), miou_pp=values, std_pp=float(np.std(values, ddof=1)),
                range_pp=max(values) - min(values), pa_pp=pa, pa_std_pp=float(np.std(pa, ddof=1)))


def _pct(x) -> float:
    return float("nan") if x is None else 100.0 * float(x)


def scores_row(label: str, r: dict) -> dict:
    """One table row in the paper's layout (percent): PA, CPA x3 (paper's order), MIoU."""
    row = {"model": label, "PA (%)": _pct(r["pa"])}
    for name, idx in CPA_COLUMNS:
        row[f"CPA {name} (%)"] = _pct(r["cpa"][idx])
    row["MIoU (%)"] = _pct(r["miou"])
    return row


def paper_row(label: str, p: dict) -> dict:
    row = {"model": label, "PA (%)": p["pa"]}
    for name, _ in CPA_COLUMNS:
        row[f"CPA {name} (%)"] = p["cpa"][name]
    row["MIoU (%)"] = p["miou"]
    return row


def scores_frame(results: dict):
    """Test scores of several runs as a DataFrame (percent)."""
    import pandas as pd
    return pd.DataFrame([scores_row(k, r) for k, r in results.items()]).set_index("model")
