"""The experiments of the paper (§3.2, §3.3, §4; Tables 1–2), reusable by the book's chapters.

Read top to bottom:

* **The paper's numbers** — :data:`PAPER_TABLE1`, :data:`PAPER_TABLE2` and the other constants
  below, copied once from Li et al. 2021 (Comput. Math. Methods Med., doi:10.1155/2021/5590180).
  Chapters and the claims ledger quote them from here; nothing else retypes them.
* **Budgets** — recipes (:class:`bloodseg.recipe.Recipe`) from :func:`baseline_budget` / :func:`ablation_budget`: what a
  profile can afford (width, epochs, patch size, subset). One function per experiment, so the
  settings a chapter states are the settings it ran.
* **Runs** — :func:`prepare_data` and :func:`train_and_evaluate`: train a list of models with
  identical data, seed and budget, evaluate each on the test split, and cache every run under
  ``runs/<chapter>/<profile>/<label>/`` (``best.pt``, ``last.pt``, ``history.json``,
  ``result.json``). Re-running a chapter reuses finished runs whose settings are unchanged and
  resumes interrupted ones; a run whose settings changed is started over. Timings are measured
  again at every call (``retime=True``), so the numbers printed belong to this execution.
* **Analyses** — tables (pandas), the position summary of Table 1, the tolerance curve, the
  inference "levers", the adjoint memory measurement, and figures (matplotlib, imported lazily).
* **The claims ledger** — :func:`claims_ledger`: every quantitative claim of the paper, our number
  read back from the chapters' saved JSON, and a verdict computed from the numbers.

Scores are stored as fractions (0..1) like :func:`bloodseg.metrics.scores`; tables show percent.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..recipe import Recipe, get_recipe
from ..classes import colourise_mask
from ..datasets import SegmentationDataset, extract_patches, synthetic_splits
from ..measure import time_inference
from ..models import build_model, count_parameters, parameter_memory_mb, position_channels, position_scale
from ..ode import ode_blocks, set_tolerance
from ..preprocess import clahe_on_luma, image_to_tensor
from ..checkpoint import load_model
from ..train import evaluate, fit
from .bench import training_step_cost
from .reference import (CPA_COLUMNS, PAPER, PAPER_NODES_UNET_RTOLS, PAPER_PARAM_MEMORY_RATIO, PAPER_SETTINGS,
                        PAPER_TABLE1, PAPER_TABLE1_RTOL, PAPER_TABLE2, paper_gain)
from .report import RESULTS_DIR, load_results


#: Where trained runs are cached: ``$BLOODSEG_RUNS``, else ``runs/`` under the working directory.
RUNS_DIR = Path(os.environ.get("BLOODSEG_RUNS", "runs"))
EXPERIMENT_FORMAT = 1   # bump to invalidate every cached run



#: Threshold used to call Table 1's accuracy "about flat": spread of MIoU over the 9 positions.
FLAT_SPREAD_PP = 2.0
#: Spearman correlation between depth (U-Net level) and time at or below which "deeper is faster".
DEEPER_FASTER_RHO = -0.7
#: Extra seeds of the U-Net in chapter 5, to measure how much MIoU moves from seed to seed alone.
NOISE_SEEDS = (1, 2)
#: Position → U-Net level (0 = full resolution, 4 = the bottom), from models.position_scale.
POSITION_LEVEL = {p: int(round(math.log2(position_scale(p)))) for p in range(1, 10)}


# =============================================================================== budgets

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


# =============================================================================== data and runs

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
    return dict(format=EXPERIMENT_FORMAT, model=spec["model"], options=spec["options"],
                budget=budget.to_dict(), data=data["description"])


def run_dir(chapter: str, budget: Recipe, label: str) -> Path:
    """Where a run lives: ``runs/<chapter>/<profile>/<label>/``."""
    return RUNS_DIR / chapter / budget.name / label


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _timed_images(dataset, n: int) -> list[torch.Tensor]:
    return [dataset[i % len(dataset)][0][None] for i in range(n)] if len(dataset) else []


def measure_time(model, dataset, n: int, warmup: int = 2) -> dict:
    """The paper's "time for n images": test images one at a time (cycled), after warm-up."""
    out = time_inference(model, _timed_images(dataset, n), warmup=warmup)
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
            candidate = _read_json(run_dir(ch, budget, label) / "result.json")
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
            if _read_json(folder / "fingerprint.json") != fp and folder.exists():
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


# =============================================================================== tables

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


def table1_frame(results: dict):
    """Our Table 1 next to the paper's: a DataFrame with a (source, column) header."""
    import pandas as pd
    ours, paper = [], []
    ref = results["unet"]["time_20_s"]
    for name in PAPER_TABLE1:
        if name not in results:
            continue
        r = results[name]
        row = scores_row(name, r)
        row.update({"time 20 img (s)": r["time_20_s"], "x U-Net": r["time_20_s"] / ref,
                    "NFE fwd": r["nfe_forward_total"] or float("nan")})
        ours.append(row)
        p = paper_row(name, PAPER_TABLE1[name])
        p.update({"time 20 img (s)": PAPER_TABLE1[name]["time_s"],
                  "x U-Net": PAPER_TABLE1[name]["time_s"] / PAPER_TABLE1["unet"]["time_s"],
                  "NFE fwd": float("nan")})
        paper.append(p)
    a = pd.DataFrame(ours).set_index("model")
    b = pd.DataFrame(paper).set_index("model")
    return pd.concat({"ours": a, "paper": b}, axis=1)


def table2_frame(results: dict, param_mb_32: dict | None = None):
    """Our Table 2 next to the paper's (percent; parameter memory in MiB)."""
    import pandas as pd
    ours, paper = [], []
    for name in PAPER_TABLE2:
        if name not in results:
            continue
        r = results[name]
        row = scores_row(name, r)
        row["param MB"] = r["param_mb"]
        if param_mb_32:
            row["param MB (width 32)"] = param_mb_32[name]
        row["time 20 img (s)"] = r["time_20_s"]
        ours.append(row)
        paper.append(paper_row(name, PAPER_TABLE2[name]))
    return pd.concat({"ours": pd.DataFrame(ours).set_index("model"),
                      "paper": pd.DataFrame(paper).set_index("model")}, axis=1)


# =============================================================================== Table 1 analysis

def _ranks(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):           # average ranks for ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _positions_summary(times: dict, mious: dict, unet_time: float, unet_miou: float) -> dict:
    pos = [p for p in range(1, 10) if p in times]
    levels = [POSITION_LEVEL[p] for p in pos]
    t = [times[p] for p in pos]
    m = [mious[p] for p in pos]
    return dict(positions=pos, rho_depth_time=spearman(levels, t),
                fastest_position=pos[int(np.argmin(t))], slowest_position=pos[int(np.argmax(t))],
                time_ratio=[x / unet_time for x in t], min_ratio=min(t) / unet_time,
                max_ratio=max(t) / unet_time, miou_spread_pp=max(m) - min(m),
                n_better_than_unet=sum(x > unet_miou for x in m), mean_gain_pp=float(np.mean(m)) - unet_miou)


def seed_noise(results: dict, budget: Recipe, chapter: str, data: dict, model: str = "unet",
               seeds=NOISE_SEEDS) -> dict:
    """Train ``model`` again with other seeds (same data, same budget) and return how much its test
    MIoU moves: ``dict(seeds, miou_pp, std_pp, range_pp)`` (seed ``budget.train.seed`` from ``results``)."""
    mious = {budget.train.seed: 100 * results[model]["miou"]}
    pas = {budget.train.seed: 100 * results[model]["pa"]}
    for seed in seeds:
        b = dataclasses.replace(budget, seed=seed)
        r = train_and_evaluate([dict(label=f"{model}-seed{seed}", model=model)], chapter, b, data, retime=False)
        mious[seed] = 100 * r[f"{model}-seed{seed}"]["miou"]
        pas[seed] = 100 * r[f"{model}-seed{seed}"]["pa"]
    values, pa = list(mious.values()), list(pas.values())
    return dict(model=model, seeds=list(mious), miou_pp=values, std_pp=float(np.std(values, ddof=1)),
                range_pp=max(values) - min(values), pa_pp=pa, pa_std_pp=float(np.std(pa, ddof=1)))


def position_summary(results: dict, noise: dict | None = None) -> dict:
    """Table 1's two findings, ours and the paper's, computed from the numbers.

    "Deeper is faster": Spearman correlation between the U-Net level of a position (0 at full
    resolution, 4 at the bottom) and its time ≤ :data:`DEEPER_FASTER_RHO`. "Accuracy about flat":
    MIoU spread over the 9 positions ≤ :data:`FLAT_SPREAD_PP` percentage points.
    """
    ours = _positions_summary({p: results[f"ode-unet-{p}"]["time_20_s"] for p in range(1, 10)
                               if f"ode-unet-{p}" in results},
                              {p: 100 * results[f"ode-unet-{p}"]["miou"] for p in range(1, 10)
                               if f"ode-unet-{p}" in results},
                              results["unet"]["time_20_s"], 100 * results["unet"]["miou"])
    paper = _positions_summary({p: PAPER_TABLE1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)},
                               {p: PAPER_TABLE1[f"ode-unet-{p}"]["miou"] for p in range(1, 10)},
                               PAPER_TABLE1["unet"]["time_s"], PAPER_TABLE1["unet"]["miou"])
    for s in (ours, paper):
        s["deeper_is_faster"] = bool(s["rho_depth_time"] <= DEEPER_FASTER_RHO)
        s["accuracy_flat"] = bool(s["miou_spread_pp"] <= FLAT_SPREAD_PP)
    mious = [100 * results[f"ode-unet-{p}"]["miou"] for p in ours["positions"]]
    ours["position_std_pp"] = float(np.std(mious, ddof=1)) if len(mious) > 1 else float("nan")
    if noise:
        ours["seed_std_pp"] = noise["std_pp"]
        # positions differ by no more than seeds do: their spread is within twice the seed spread
        ours["within_seed_noise"] = bool(ours["position_std_pp"] <= 2 * noise["std_pp"])
    return dict(ours=ours, paper=paper, noise=noise,
                thresholds=dict(rho=DEEPER_FASTER_RHO, spread_pp=FLAT_SPREAD_PP))


def position_statement(summary: dict) -> str:
    """A plain sentence per finding, built from :func:`position_summary`."""
    o, p = summary["ours"], summary["paper"]
    both = o["deeper_is_faster"] and o["accuracy_flat"]
    lines = [
        f"Deeper is faster: Spearman rho(depth, time) = {o['rho_depth_time']:+.2f} here "
        f"(paper {p['rho_depth_time']:+.2f}; threshold {DEEPER_FASTER_RHO:+.1f}) -> "
        f"{'holds' if o['deeper_is_faster'] else 'does not hold'}; fastest position {o['fastest_position']} "
        f"(paper {p['fastest_position']}), slowest {o['slowest_position']}; time {o['min_ratio']:.1f}x to "
        f"{o['max_ratio']:.1f}x the U-Net's (paper {p['min_ratio']:.1f}x to {p['max_ratio']:.1f}x).",
        f"Accuracy about flat: MIoU spread over the 9 positions {o['miou_spread_pp']:.2f} pp "
        f"(paper {p['miou_spread_pp']:.2f} pp; threshold {FLAT_SPREAD_PP:.1f} pp) -> "
        f"{'holds' if o['accuracy_flat'] else 'does not hold'}; {o['n_better_than_unet']} of "
        f"{len(o['positions'])} positions beat the U-Net's MIoU (paper {p['n_better_than_unet']} of 9), "
        f"mean gain {o['mean_gain_pp']:+.2f} pp (paper {p['mean_gain_pp']:+.2f} pp).",
        f"Together, 'deeper is faster, accuracy about flat' {'holds' if both else 'does not hold'} here.",
    ]
    if summary.get("noise"):
        n = summary["noise"]
        lines.append(
            f"Seed noise: the U-Net retrained with seeds {n['seeds']} scores MIoU "
            f"{', '.join(f'{v:.2f}' for v in n['miou_pp'])}% (std {n['std_pp']:.2f} pp); the 9 positions have "
            f"std {o['position_std_pp']:.2f} pp -> the differences between positions "
            f"{'are' if o['within_seed_noise'] else 'are NOT'} within twice the seed-to-seed noise.")
    return "\n".join(lines)


# =============================================================================== NODEs-UNet analyses

def tolerance_curve(model, dataset, tolerances=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6), n_timed: int = 20) -> list[dict]:
    """Test-time tolerance (paper §4.2): scores, time and NFE of a trained model for each rtol.

    Every ODE-block gets the same rtol = atol (:func:`bloodseg.set_tolerance`); the model's own
    tolerances are restored afterwards. Rows ``dict(rtol, pa, miou, time_20_s, nfe_forward)``.
    """
    blocks = ode_blocks(model)
    saved = [(b.rtol, b.atol) for b in blocks]
    rows = []
    try:
        for tol in tolerances:
            set_tolerance(model, tol)
            s = evaluate(model, dataset, n_timed=0)
            t = measure_time(model, dataset, n_timed)
            rows.append(dict(rtol=float(tol), pa=s["pa"], miou=s["miou"], time_20_s=t["time_per_image_s"] * 20,
                             nfe_forward=t["nfe_forward_total"]))
    finally:
        for b, (r, a) in zip(blocks, saved):
            b.set_tolerance(r, a)
    return rows


def ode_time_share(model, dataset, n: int = 5) -> dict:
    """Share of inference time spent inside the ODE-blocks (forward hooks with a clock)."""
    blocks = ode_blocks(model)
    spent, starts = [0.0], {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - starts.pop(id(mod))

    images = _timed_images(dataset, n)
    handles = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    model = model.eval()
    try:
        with torch.inference_mode():
            model(images[0])                       # warm-up
            spent[0] = 0.0
            t0 = time.perf_counter()
            for im in images:
                model(im)
            total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return dict(total_s=total, ode_s=spent[0], share=spent[0] / total if total else float("nan"))


class _QuietStderr:
    """Send file descriptor 2 to /dev/null for a moment (the profiler's C++ start/stop chatter)."""

    def __enter__(self):
        try:
            self.saved = os.dup(2)
            self.null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self.null, 2)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
            os.close(self.null)
        return False


def profile_forward(model, image: torch.Tensor, top: int = 8):
    """torch.profiler summary of one forward: the ``top`` ops by self CPU time (a DataFrame)."""
    import pandas as pd
    from torch.profiler import ProfilerActivity, profile
    model = model.eval()
    with torch.inference_mode():
        model(image)
        with _QuietStderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(image)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(({"op": e.key, "calls": e.count, "self CPU ms": e.self_cpu_time_total / 1000,
                    "share (%)": 100 * e.self_cpu_time_total / total} for e in events),
                  key=lambda r: -r["self CPU ms"])[:top]
    return pd.DataFrame(rows).set_index("op")


def _time_pair(model, reference, dataset, n: int, prepare=None) -> tuple[float, float]:
    """Time ``model`` and ``reference`` back to back (reference before and after, averaged)."""
    r1 = measure_time(reference, dataset, n)["time_per_image_s"] * 20
    images = _timed_images(dataset, n)
    if prepare is not None:
        images = [prepare(im) for im in images]
    t = time_inference(model, images)["time_per_image_s"] * 20
    r2 = measure_time(reference, dataset, n)["time_per_image_s"] * 20
    return t, (r1 + r2) / 2


def inference_levers(nodes, unet, dataset, n_timed: int = 20, loose_rtol: float = 1e-3,
                     narrow: tuple | None = None, try_compile: bool = False) -> list[dict]:
    """What each known lever buys for NODEs-UNet's inference time relative to the U-Net's.

    Rows ``dict(lever, time_20_s, unet_time_20_s, ratio, miou, param_mb, note)``: the model as
    trained; test-time tolerance ``loose_rtol``; channels_last memory format; ``torch.compile`` of
    every f (only with ``try_compile``, the compile time is reported); a narrower f (``narrow`` =
    ``(label, trained model)``, e.g. trained with ``ode_hidden``), alone and with ``loose_rtol``.
    The U-Net is timed right before and after each lever, so a busy machine affects both alike.
    """
    rows = []

    def add(lever, model, note="", prepare=None, miou=None):
        t, ref = _time_pair(model, unet, dataset, n_timed, prepare)
        if miou is None:
            miou = evaluate(model, dataset, n_timed=0)["miou"]
        rows.append(dict(lever=lever, time_20_s=t, unet_time_20_s=ref, ratio=t / ref, miou=miou,
                         param_mb=parameter_memory_mb(model), note=note))

    tols = "/".join(f"{b.rtol:g}" for b in ode_blocks(nodes))
    add("as trained", nodes, f"rtol {tols}")
    loose = copy.deepcopy(nodes)
    set_tolerance(loose, loose_rtol)
    add(f"test-time rtol {loose_rtol:g}", loose, "every block")
    cl = copy.deepcopy(nodes).to(memory_format=torch.channels_last)
    add("channels_last", cl, "model and input in NHWC",
        prepare=lambda im: im.contiguous(memory_format=torch.channels_last))
    if try_compile:
        comp = copy.deepcopy(nodes)
        t0 = time.perf_counter()
        try:
            for b in ode_blocks(comp):
                b.func = torch.compile(b.func)
            with torch.inference_mode():
                comp(_timed_images(dataset, 1)[0])
            add("torch.compile(f)", comp, f"compile + first call {time.perf_counter() - t0:.0f} s; "
                "MIoU of the same weights run eagerly", miou=rows[0]["miou"])
        except Exception as exc:  # noqa: BLE001 - report, don't fail the chapter
            rows.append(dict(lever="torch.compile(f)", time_20_s=float("nan"), unet_time_20_s=float("nan"),
                             ratio=float("nan"), miou=float("nan"), param_mb=float("nan"),
                             note=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
    else:
        rows.append(dict(lever="torch.compile(f)", time_20_s=float("nan"), unet_time_20_s=float("nan"),
                         ratio=float("nan"), miou=float("nan"), param_mb=float("nan"),
                         note="not tried in this profile (set BLOODSEG_TRY_COMPILE=1): compiling costs "
                              "more time than it saves at this size on a small CPU"))
    if narrow is not None:
        label, model = narrow
        add(label, model, "retrained with the same budget")
        both = copy.deepcopy(model)
        set_tolerance(both, loose_rtol)
        add(f"{label} + rtol {loose_rtol:g}", both, "")
    return rows


def param_memory_table(width: int = 32, hidden=(None, 256, 128, 64, 32)) -> list[dict]:
    """Parameter memory of U-Net, ResNet U-Net and NODEs-UNet (for several ``ode_hidden``) at ``width``."""
    res = parameter_memory_mb(build_model("resunet", width=width))
    rows = [dict(model="unet", ode_hidden=None, param_mb=parameter_memory_mb(build_model("unet", width=width))),
            dict(model="resunet", ode_hidden=None, param_mb=res)]
    for h in hidden:
        rows.append(dict(model="nodes-unet", ode_hidden=h,
                         param_mb=parameter_memory_mb(build_model("nodes-unet", width=width, ode_hidden=h))))
    for r in rows:
        r["ratio_to_resunet"] = r["param_mb"] / res
        r["width"] = width
    return rows


def adjoint_memory(ckpt: str | None, width: int, size: int, batch: int = 2, rtol: float = 1e-6,
                   unet_ckpt: str | None = None) -> list[dict]:
    """Training-step time and peak memory of NODEs-UNet with direct backprop and with the adjoint,
    every block at ``rtol``, plus the U-Net for reference (see :mod:`bloodseg.bench` for how)."""
    rows = []
    base = training_step_cost("unet", width, size, batch, adjoint=None, ckpt=unet_ckpt)
    rows.append(dict(model="unet", backprop="direct", rtol=None, **_cost(base)))
    for adj in (False, True):
        c = training_step_cost("nodes-unet", width, size, batch, adjoint=adj, ckpt=ckpt, options=dict(rtol=rtol))
        rows.append(dict(model="nodes-unet", backprop="adjoint" if adj else "direct", rtol=rtol, **_cost(c)))
    return rows


def ode_memory_table(model, size: int, batch: int) -> list[dict]:
    """Per ODE-block of ``model``: the state the adjoint carries (``batch x C x side x side``) next
    to the parameters of f, in MB of float32.

    torchdiffeq's adjoint integrates an augmented state backwards: the block's state, its adjoint,
    and the adjoint of *every parameter of f*; each Runge-Kutta stage holds all of them. Direct
    backprop instead keeps the activations of every evaluation of f (about NFE x a few states).
    So the adjoint saves most where the feature map is large and f small (high resolution, top of
    the U) and little where f's parameters outweigh its feature map (the bottom of the U).
    """
    rows = []
    for name, module in model.named_modules():
        if module.__class__.__name__ == "ODEBlock":
            pos = int(module.name.rsplit(" ", 1)[-1]) if module.name.split()[-1].isdigit() else None
            side = size // position_scale(pos) if pos else None
            ch = getattr(module.func, "channels", None)
            state = batch * ch * side * side * 4 / 2 ** 20 if (side and ch) else float("nan")
            fparams = sum(p.numel() for p in module.func.parameters()) * 4 / 2 ** 20
            rows.append(dict(block=module.name or name, channels=ch, side=side, state_mb=state,
                             f_params_mb=fparams, params_per_state=fparams / state if state else float("nan")))
    return rows


def _cost(c: dict) -> dict:
    return {k: c.get(k) for k in ("step_s", "peak_mb", "saved_mb", "nfe_forward", "nfe_backward", "memory_how", "error")}


def performance_goals(table2: dict, adjoint_rows: list[dict]) -> list[dict]:
    """Chapter 6's goals, measured vs goal: NODEs-UNet inference <= 3x the U-Net's time (same width),
    its MIoU >= the U-Net's, and adjoint peak training memory <= 0.5x direct backprop (rtol 1e-6)."""
    n, u = table2["nodes-unet"], table2["unet"]
    ratio = n["time_20_s"] / u["time_20_s"]
    direct = next(r for r in adjoint_rows if r["model"] == "nodes-unet" and r["backprop"] == "direct")
    adj = next(r for r in adjoint_rows if r["model"] == "nodes-unet" and r["backprop"] == "adjoint")
    mem = (adj["peak_mb"] / direct["peak_mb"]) if adj.get("peak_mb") and direct.get("peak_mb") else float("nan")
    return [
        dict(goal="NODEs-UNet inference time <= 3x U-Net's (same width)", goal_value=3.0, measured=ratio,
             met=bool(ratio <= 3)),
        dict(goal="NODEs-UNet MIoU - U-Net MIoU >= 0 (pp)", goal_value=0.0,
             measured=100 * (n["miou"] - u["miou"]), met=bool(n["miou"] >= u["miou"])),
        dict(goal="adjoint / direct peak training memory <= 0.5 (rtol 1e-6)", goal_value=0.5, measured=mem,
             met=bool(mem <= 0.5)),
    ]


def f_cost_table(width: int, size: int) -> list[dict]:
    """What one evaluation of f costs at each position for a ``size x size`` input: multiply-adds
    of its two 3x3 convolutions (each sees one extra time channel) and the size of its feature map.
    The multiply-adds are the same at every level (channels double when the side halves); the
    feature map, which the element-wise work (GroupNorm, softplus, concatenating t) scales with,
    halves at every level down."""
    rows = []
    for p in range(1, 10):
        c, side = position_channels(p, width), size // position_scale(p)
        macs = 2 * 9 * (c + 1) * c * side * side
        rows.append(dict(position=p, channels=c, side=side, mmacs_per_eval=macs / 1e6,
                         activation_k=c * side * side / 1e3))
    return rows


def lever_verdict(levers: list[dict], unet_miou: float, max_ratio: float = 3.0) -> dict | None:
    """The fastest lever that meets both inference goals (<= ``max_ratio`` x U-Net, MIoU >= U-Net's)."""
    ok = [r for r in levers if r["ratio"] <= max_ratio and r["miou"] >= unet_miou]
    return min(ok, key=lambda r: r["ratio"]) if ok else None


# =============================================================================== figures

def _rgb(image_bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_bgr[..., ::-1])


def plot_history(histories: dict, title: str = ""):
    """Loss, validation loss and validation MIoU per epoch for one or more runs."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for label, hist in histories.items():
        ep = [r["epoch"] for r in hist]
        axes[0].plot(ep, [r["loss"] for r in hist], "o-", label=label)
        axes[1].plot(ep, [r["val_loss"] for r in hist], "o-", label=label)
        axes[2].plot(ep, [100 * r["val_miou"] for r in hist], "o-", label=label)
    for ax, name in zip(axes, ("training loss", "validation loss", "validation MIoU (%)")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if len(histories) > 1:
        axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_score_bars(frames: dict, columns=None, title: str = "", ylim=None):
    """Grouped bars: one group per score column, one bar per row of each frame (percent).

    ``frames``: ``{series label: DataFrame indexed by model}`` or a single DataFrame."""
    import matplotlib.pyplot as plt
    import pandas as pd
    if isinstance(frames, pd.DataFrame):
        frames = {"": frames}
    series = [(f"{k} {m}".strip(), df.loc[m]) for k, df in frames.items() for m in df.index]
    columns = columns or [c for c in next(iter(frames.values())).columns if c.endswith("(%)")]
    x = np.arange(len(columns))
    w = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(columns) + 0.3 * len(series)), 3.6))
    for i, (label, row) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [row[c] for c in columns], w, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace(" (%)", "") for c in columns], fontsize=9)
    ax.set_ylabel("%")
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def predict_masks(model, samples) -> list[np.ndarray]:
    """Argmax masks of ``model`` for ``samples`` (one at a time, CLAHE as in training)."""
    model = model.eval()
    with torch.inference_mode():
        return [model(image_to_tensor(s.image)[None]).argmax(1)[0].numpy().astype(np.uint8) for s in samples]


def prediction_grid(samples, predictions: dict, height: float = 2.2):
    """The paper's Fig. 7/8: per sample, original, CLAHE, label, then one column per model."""
    import matplotlib.pyplot as plt
    cols = ["original", "CLAHE (Y of YUV)", "label"] + list(predictions)
    fig, axes = plt.subplots(len(samples), len(cols), figsize=(height * len(cols), height * len(samples)),
                             squeeze=False)
    for i, s in enumerate(samples):
        panels = [_rgb(s.image), _rgb(clahe_on_luma(s.image)), _rgb(colourise_mask(s.mask))]
        panels += [_rgb(colourise_mask(predictions[k][i])) for k in predictions]
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(cols[j], fontsize=9)
    fig.tight_layout()
    return fig


def plot_positions(results: dict, noise: dict | None = None):
    """Table 1 as two panels: time vs position (ours and the paper's, / U-Net) and MIoU vs position
    (with the U-Net's seed-to-seed range as a band when ``noise`` from :func:`seed_noise` is given)."""
    import matplotlib.pyplot as plt
    pos = [p for p in range(1, 10) if f"ode-unet-{p}" in results]
    ours = [results[f"ode-unet-{p}"]["time_20_s"] / results["unet"]["time_20_s"] for p in pos]
    paper = [PAPER_TABLE1[f"ode-unet-{p}"]["time_s"] / PAPER_TABLE1["unet"]["time_s"] for p in pos]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].plot(pos, ours, "o-", label="ours")
    axes[0].plot(pos, paper, "s--", label="paper (Table 1)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("time for 20 images / U-Net's")
    axes[0].set_title("time vs ODE-block position")
    m_ours = [100 * results[f"ode-unet-{p}"]["miou"] for p in pos]
    m_paper = [PAPER_TABLE1[f"ode-unet-{p}"]["miou"] for p in pos]
    axes[1].plot(pos, m_ours, "o-", label="ours")
    axes[1].axhline(100 * results["unet"]["miou"], color="C0", ls=":", label="our U-Net")
    if noise:
        axes[1].axhspan(min(noise["miou_pp"]), max(noise["miou_pp"]), color="C0", alpha=0.12,
                        label=f"our U-Net, seeds {noise['seeds']}")
    axes[1].plot(pos, m_paper, "s--", color="C1", label="paper")
    axes[1].axhline(PAPER_TABLE1["unet"]["miou"], color="C1", ls=":", label="paper's U-Net")
    axes[1].set_ylabel("MIoU (%)")
    axes[1].set_title("MIoU vs ODE-block position")
    for ax in axes:
        ax.set_xlabel("position (1-4 encoder, 5 bottom, 6-9 decoder)")
        ax.set_xticks(range(1, 10))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_per_image(results: dict, labels=None):
    """Paper Figs. 9–10: PA and MIoU of every test image, one line per model."""
    import matplotlib.pyplot as plt
    labels = labels or list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    for label in labels:
        per = results[label]["per_image"]
        idx = np.arange(1, len(per) + 1)
        axes[0].plot(idx, [100 * s["pa"] for s in per], "o-", ms=3, label=label)
        axes[1].plot(idx, [100 * s["miou"] for s in per], "o-", ms=3, label=label)
    for ax, name in zip(axes, ("PA (%) per test image (paper Fig. 9)", "MIoU (%) per test image (paper Fig. 10)")):
        ax.set_xlabel("test image")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_tolerance_curve(rows: list[dict], unet_miou: float | None = None, unet_time: float | None = None):
    """MIoU, time and NFE against the test-time rtol."""
    import matplotlib.pyplot as plt
    tol = [r["rtol"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    axes[0].plot(tol, [100 * r["miou"] for r in rows], "o-")
    axes[1].plot(tol, [r["time_20_s"] for r in rows], "o-")
    axes[2].plot(tol, [r["nfe_forward"] for r in rows], "o-")
    if unet_miou is not None:
        axes[0].axhline(100 * unet_miou, color="grey", ls=":", label="U-Net")
        axes[0].legend(fontsize=8)
    if unet_time is not None:
        axes[1].axhline(unet_time, color="grey", ls=":", label="U-Net")
        axes[1].axhline(3 * unet_time, color="red", ls="--", label="goal: 3x U-Net")
        axes[1].legend(fontsize=8)
    for ax, name in zip(axes, ("MIoU (%)", "time for 20 images (s)", "forward NFE (all blocks)")):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("test-time rtol (tighter →)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_goals(goals: list[dict]):
    """One small panel per goal: the measured value as a bar, the goal as a red line."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(goals), figsize=(3.8 * len(goals), 3.2), squeeze=False)
    for ax, g in zip(axes[0], goals):
        ax.bar([0], [g["measured"]], color="#1a7f37" if g["met"] else "#cf222e", width=0.5)
        ax.axhline(g["goal_value"], color="red", ls="--", label="goal")
        ax.set_xticks([])
        ax.set_title(g["goal"], fontsize=8, wrap=True)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlabel("met" if g["met"] else "missed")
    fig.tight_layout()
    return fig


def plot_bars(labels, values, ylabel: str, title: str = "", ref: float | None = None, ref_label: str = ""):
    """One simple bar chart (used for memory, levers and parameter tables)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.4))
    vals = [float("nan") if v is None else v for v in values]
    ax.bar(range(len(labels)), vals, color=[f"C{i % 10}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ref is not None:
        ax.axhline(ref, color="red", ls="--", label=ref_label)
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# =============================================================================== claims ledger

CHAPTERS = {
    "01_odes_and_euler": "01_odes_and_euler",
    "02_ode_blocks": "02_ode_blocks",
    "03_data_and_preprocessing": "03_data_and_preprocessing",
    "04_unet_baseline": "04_unet_baseline",
    "05_placement_ablation": "05_placement_ablation",
    "06_nodes_unet": "06_nodes_unet",
}

HOLDS, FAILS, UNTESTABLE, NOT_YET = "holds", "does not hold", "not testable here", "not measured yet"


class _Missing(Exception):
    pass


def _load(chapter: str, name: str, profile: str | None = None) -> dict:
    try:
        return load_results(chapter, name, profile=profile)
    except FileNotFoundError:
        raise _Missing(f"{chapter}/{name}") from None


def _data(chapter, name, profile=None):
    return _load(chapter, name, profile)["data"]


def _find(obj, *keys):
    """The first of ``keys`` present in dict ``obj`` (chapters 1–3 are written by others)."""
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            return obj[k]
    raise _Missing("/".join(keys))


def _gain(table, a, b, key):
    return 100 * (table[a][key] - table[b][key])


#: A ``bloodseg bench --device cuda`` result recorded on a GPU host (chapter 5 shows it).
CUDA_BENCH = ("05_placement_ablation", "bench_cuda_h100.json")


def bench_depth_rho(where=CUDA_BENCH) -> float:
    """Spearman correlation between the U-Net level of the nine single-block positions and their
    time in a recorded ``bloodseg bench`` JSON (``(chapter, file name)`` under the results folder)."""
    path = Path(RESULTS_DIR) / where[0] / where[1]
    if not path.is_file():
        raise _Missing(str(path))
    ratio = {r["model"]: r["ratio_to_unet"] for r in json.loads(path.read_text())["models"]}
    pos = [p for p in range(1, 10) if f"ode-unet-{p}" in ratio]
    return spearman([POSITION_LEVEL[p] for p in pos], [ratio[f"ode-unet-{p}"] for p in pos])


def _claims(profile=None) -> list[dict]:
    """Each claim: text, the paper's value (from the constants above), how to measure ours, where."""
    P1, P2 = PAPER_TABLE1, PAPER_TABLE2
    t2 = lambda: _data("06_nodes_unet", "table2", profile)  # noqa: E731
    t1 = lambda: _data("05_placement_ablation", "table1", profile)  # noqa: E731

    def seed_std(key):
        try:
            n = _data("05_placement_ablation", "position_summary", profile).get("noise") or {}
        except _Missing:
            return None
        return n.get("pa_std_pp" if key == "pa" else "std_pp")

    def direction(key):         # a gain claim: the sign, unless seed noise alone could explain it
        def verdict(value):
            std = seed_std(key)
            if std is not None and abs(value) < 2 * std:
                return UNTESTABLE, (f"within 2x the seed-to-seed std of the U-Net's {'PA' if key == 'pa' else 'MIoU'} "
                                    f"({std:.2f} pp, chapter 5)")
            return HOLDS if value > 0 else FAILS
        return verdict

    def absolute(value):        # a MISP01 number: our data are synthetic smears
        return UNTESTABLE

    def ps():
        return _data("05_placement_ablation", "position_summary", profile)["ours"]

    def tol():
        return _data("06_nodes_unet", "tolerance_curve", profile)

    def pmem():
        return _data("06_nodes_unet", "param_memory", profile)

    def adj():
        return _data("06_nodes_unet", "adjoint_memory", profile)

    def adjoint_ratio():
        rows = adj()
        d = next(r for r in rows if r["model"] == "nodes-unet" and r["backprop"] == "direct")
        a = next(r for r in rows if r["model"] == "nodes-unet" and r["backprop"] == "adjoint")
        return a["peak_mb"] / d["peak_mb"]

    def nfe_monotone():
        rows = sorted(tol(), key=lambda r: -r["rtol"])   # loose → tight
        nfe = [r["nfe_forward"] for r in rows]
        return nfe[-1] / max(nfe[0], 1), all(b >= a for a, b in zip(nfe, nfe[1:]))

    def loose_vs_tight():
        rows = sorted(tol(), key=lambda r: r["rtol"])    # tight first
        tight, loose = rows[0], rows[-1]
        return tight, loose

    def first_of(*where):       # (chapter, name) pairs: chapters 1-3 are written by others
        for ch, name in where:
            if _exists(ch, name, profile):
                return _data(ch, name, profile)
        raise _Missing(" or ".join(f"{c}/{n}" for c, n in where))

    def residual_euler():
        d = first_of(("01_odes_and_euler", "residual_vs_euler"), ("02_ode_blocks", "residual_vs_euler"))
        return float(_find(d, "max_abs_diff", "max_abs_difference", "difference", "max_diff"))

    def clahe_contrast():
        d = first_of(("03_data_and_preprocessing", "clahe"), ("03_data_and_preprocessing", "contrast"))
        before = float(_find(d, "contrast_before", "luma_std_before", "std_before"))
        after = float(_find(d, "contrast_after", "luma_std_after", "std_after"))
        return before, after

    def single_block_nfe():     # chapter 1: one ODE-block, NFE against rtol
        rows = sorted(_data("01_odes_and_euler", "nfe_vs_tolerance", profile), key=lambda r: -r["rtol"])
        nfe = [r["nfe"] for r in rows]
        return nfe[-1] / max(nfe[0], 1), all(b >= a for a, b in zip(nfe, nfe[1:]))

    def block_memory():         # chapter 2: one ODE-block, peak memory of a training step against rtol
        rows = _data("02_ode_blocks", "training_step_cost", profile)["rows"]
        out = {}
        for adjoint in (False, True):
            rs = sorted((r for r in rows if r["adjoint"] == adjoint), key=lambda r: -r["rtol"])
            out[adjoint] = rs[-1]["peak_mb"] / rs[0]["peak_mb"]
        return out

    paper_rho = round(spearman([POSITION_LEVEL[p] for p in range(1, 10)],
                               [P1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)]), 2)

    def gain_claim(a, b, key):  # Table 2: model a's PA or MIoU gain over model b, in percentage points
        label = {"nodes-unet": "NODEs-UNet", "resunet": "ResNet", "unet": "U-Net", "pa": "PA", "miou": "MIoU"}
        return dict(claim=f"{label[a]} {label[key]} gain over {label[b]}", unit="pp", paper=paper_gain(P2, a, b, key),
                    ours=lambda: _gain(t2(), a, b, key), verdict=direction(key), where="06_nodes_unet",
                    note="holds if ours > 0, unless within seed noise")

    def param_ratio_32():
        rows = pmem()
        r = next(r for r in rows if r["model"] == "nodes-unet" and r["ode_hidden"] is None)
        return r["ratio_to_resunet"]

    claims = [
        dict(claim="NODEs-UNet pixel accuracy on the test set (abstract, Table 2)", unit="%",
             paper=P2["nodes-unet"]["pa"], ours=lambda: 100 * t2()["nodes-unet"]["pa"], verdict=absolute,
             where="06_nodes_unet", note="MISP01 is not available here; ours is on synthetic smears"),
        dict(claim="NODEs-UNet MIoU on the test set (abstract, Table 2)", unit="%",
             paper=P2["nodes-unet"]["miou"], ours=lambda: 100 * t2()["nodes-unet"]["miou"], verdict=absolute,
             where="06_nodes_unet", note="MISP01 is not available here; ours is on synthetic smears"),
        *(gain_claim(a, b, key) for a, b in (("nodes-unet", "unet"), ("nodes-unet", "resunet"), ("resunet", "unet"))
          for key in ("pa", "miou")),
        dict(claim="An ODE-block at any position beats the U-Net's MIoU (Table 1)", unit="positions of 9",
             paper=sum(P1[f"ode-unet-{p}"]["miou"] > P1["unet"]["miou"] for p in range(1, 10)),
             ours=lambda: ps()["n_better_than_unet"], verdict=lambda v: HOLDS if v == 9 else FAILS,
             where="05_placement_ablation", note="holds only if all 9 positions beat the U-Net"),
        dict(claim="Table 1 accuracy about flat across positions (MIoU spread)", unit="pp",
             paper=round(max(P1[f"ode-unet-{p}"]["miou"] for p in range(1, 10))
                         - min(P1[f"ode-unet-{p}"]["miou"] for p in range(1, 10)), 2),
             ours=lambda: ps()["miou_spread_pp"], verdict=lambda v: HOLDS if v <= FLAT_SPREAD_PP else FAILS,
             where="05_placement_ablation", note=f"holds if spread <= {FLAT_SPREAD_PP:g} pp"),
        dict(claim="Time falls toward the bottom of the U and rises again (Spearman depth vs time)", unit="rho",
             paper=paper_rho,
             ours=lambda: ps()["rho_depth_time"], verdict=lambda v: HOLDS if v <= DEEPER_FASTER_RHO else FAILS,
             where="05_placement_ablation", note=f"holds if rho <= {DEEPER_FASTER_RHO:g}"),
        dict(claim="... the same on a GPU (H100, `bloodseg bench`, 256x256, width 32, random weights)", unit="rho",
             paper=paper_rho,
             ours=lambda: bench_depth_rho(CUDA_BENCH), verdict=lambda v: HOLDS if v <= DEEPER_FASTER_RHO else FAILS,
             where="05_placement_ablation",
             note="a recorded bench run (not re-run by the book); one image at a time keeps a GPU waiting on "
                  "kernel launches, so time follows the NFE more than the map size"),
        dict(claim="Fastest single-block position is the bottom of the U (5)", unit="position",
             paper=min(range(1, 10), key=lambda p: P1[f"ode-unet-{p}"]["time_s"]),
             ours=lambda: ps()["fastest_position"], verdict=lambda v: HOLDS if v == 5 else FAILS,
             where="05_placement_ablation", note=""),
        dict(claim="An ODE-block costs much more time than the U-Net (slowest position / U-Net)", unit="x",
             paper=round(max(P1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)) / P1["unet"]["time_s"], 1),
             ours=lambda: ps()["max_ratio"], verdict=lambda v: HOLDS if v > 1 else FAILS,
             where="05_placement_ablation", note="holds if > 1x; the size of the factor depends on hardware"),
        dict(claim="Tighter tolerance -> more function evaluations ('like depth')", unit="x NFE (tightest/loosest)",
             paper=None, ours=lambda: nfe_monotone()[0],
             verdict=lambda v: HOLDS if nfe_monotone()[1] and v > 1 else FAILS, where="06_nodes_unet",
             note="holds if NFE never falls as rtol tightens"),
        dict(claim="Tighter tolerance -> more function evaluations, one ODE-block", unit="x NFE (tightest/loosest)",
             paper=None, ours=lambda: single_block_nfe()[0],
             verdict=lambda v: HOLDS if single_block_nfe()[1] and v > 1 else FAILS, where="01_odes_and_euler",
             note="holds if NFE never falls as rtol tightens"),
        dict(claim="Adjoint: approximately constant memory as NFE grows, one ODE-block",
             unit="x peak (tightest/loosest rtol)", paper=None, ours=lambda: block_memory()[True],
             verdict=lambda v: HOLDS if v <= 1.2 and block_memory()[False] > 1.2 else FAILS,
             where="02_ode_blocks", note="holds if the adjoint's peak grows <= 1.2x while direct backprop's grows more"),
        dict(claim="Looser test-time tolerance segments faster (time loosest/tightest)", unit="x time",
             paper=None, ours=lambda: loose_vs_tight()[1]["time_20_s"] / loose_vs_tight()[0]["time_20_s"],
             verdict=lambda v: HOLDS if v < 1 else FAILS, where="06_nodes_unet", note="holds if < 1"),
        dict(claim="... at some cost in accuracy (MIoU loosest - tightest)", unit="pp", paper=None,
             ours=lambda: 100 * (loose_vs_tight()[1]["miou"] - loose_vs_tight()[0]["miou"]),
             verdict=lambda v: HOLDS if v < 0 else FAILS, where="06_nodes_unet",
             note="the paper gives no number; holds if MIoU drops"),
        dict(claim="NODEs-UNet parameter memory is 46% of ResNet's (width 32)", unit="%",
             paper=100 * PAPER_PARAM_MEMORY_RATIO, ours=lambda: 100 * param_ratio_32(),
             verdict=lambda v: HOLDS if abs(v - 100 * PAPER_PARAM_MEMORY_RATIO) <= 10 else FAILS,
             where="06_nodes_unet", note="holds if within 10 pp; ours depends on the ResNet and f we chose"),
        dict(claim="Adjoint halves the peak memory of a NODEs-UNet training step (adjoint / direct, rtol 1e-6)",
             unit="x",
             paper=None, ours=adjoint_ratio, verdict=lambda v: HOLDS if v <= 0.5 else FAILS,
             where="06_nodes_unet", note="whole NODEs-UNet training step, trained weights; holds if <= 0.5x"),
        dict(claim="NODEs-UNet 'reduces the computational cost' (abstract): time vs U-Net", unit="x",
             paper=None, ours=lambda: t2()["nodes-unet"]["time_20_s"] / t2()["unet"]["time_20_s"],
             verdict=lambda v: HOLDS if v < 1 else FAILS, where="06_nodes_unet",
             note="holds if faster than the U-Net"),
        dict(claim="A residual block is one Euler step of size 1 (§4.2)", unit="max |diff|", paper=None,
             ours=residual_euler, verdict=lambda v: HOLDS if v < 1e-5 else FAILS,
             where="01_odes_and_euler", note="same f, same input; holds if max |diff| < 1e-5"),
        dict(claim="CLAHE on Y enhances contrast (§2)", unit="luma contrast after/before", paper=None,
             ours=lambda: clahe_contrast()[1] / clahe_contrast()[0],
             verdict=lambda v: HOLDS if v > 1 else FAILS, where="03_data_and_preprocessing",
             note="holds if contrast rises"),
        dict(claim="U-Net time for 20 images (Table 1)", unit="s", paper=P1["unet"]["time_s"],
             ours=lambda: t1()["unet"]["time_20_s"], verdict=absolute, where="05_placement_ablation",
             note="hardware: paper GPU at 256x256, ours CPU at the profile's size"),
    ]
    return claims


def _exists(chapter: str, name: str, profile: str | None = None) -> bool:
    try:
        _load(chapter, name, profile)
        return True
    except _Missing:
        return False


def claims_ledger(profile: str | None = None) -> list[dict]:
    """Every claim with the paper's value, ours (read from the chapters' saved JSON) and a verdict.

    A claim whose measurement is not saved yet gets ``ours=None`` and verdict "not measured yet".
    """
    rows = []
    for c in _claims(profile):
        note = c["note"]
        try:
            ours = float(c["ours"]())
            verdict = c["verdict"](ours)
            if isinstance(verdict, tuple):      # (verdict, why)
                verdict, note = verdict[0], verdict[1]
        except (_Missing, KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError):
            ours, verdict = None, NOT_YET
        rows.append(dict(claim=c["claim"], unit=c["unit"], paper=c["paper"], ours=ours, verdict=verdict,
                         where=c["where"], note=note,
                         provenance="" if verdict == NOT_YET else _provenance(c["where"], profile)))
    return rows


def _provenance(chapter: str, profile=None) -> str:
    """Profile, device and date of a chapter's saved results ("" when it saved none)."""
    files = sorted((RESULTS_DIR / chapter).glob("*.json"))
    real = [f for f in files if not f.name.endswith(".smoke.json")]
    smoke = [f for f in files if f.name.endswith(".smoke.json")]
    for f in (smoke + real if profile == "smoke" else real + smoke):
        p = (_read_json(f) or {}).get("provenance")
        if p:
            return f"{p.get('profile')} | {p.get('device')} | {p.get('date')}"
    return ""


def ledger_html(rows: list[dict]) -> str:
    """The ledger as an HTML table whose "where" column links to the chapter."""
    import html

    def fmt(v):
        if v is None:
            return "&mdash;"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.2f}"
        return html.escape(str(v))

    colour = {HOLDS: "#1a7f37", FAILS: "#cf222e", UNTESTABLE: "#6e7781", NOT_YET: "#9a6700"}
    head = "".join(f"<th>{h}</th>" for h in ("claim", "unit", "paper", "ours", "verdict", "measured in", "note"))
    body = []
    for r in rows:
        link = f'<a href="{r["where"]}.html">{r["where"]}</a>'
        body.append("<tr>" + "".join([
            f"<td>{html.escape(r['claim'])}</td>", f"<td>{html.escape(r['unit'])}</td>",
            f"<td>{fmt(r['paper'])}</td>", f"<td>{fmt(r['ours'])}</td>",
            f"<td style='color:{colour.get(r['verdict'], '#000')}'><b>{r['verdict']}</b></td>",
            f"<td>{link}</td>", f"<td>{html.escape(r['note'])}</td>"]) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def plot_headline(profile: str | None = None):
    """Paper vs ours for the headline numbers (Table 2 PA/MIoU and the gains), from saved JSON.

    Missing results are drawn as empty bars labelled "not measured yet"."""
    import matplotlib.pyplot as plt
    try:
        t2 = _data("06_nodes_unet", "table2", profile)
    except _Missing:
        t2 = None
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    models = list(PAPER_TABLE2)
    x = np.arange(len(models))
    name = {"pa": "PA", "miou": "MIoU"}
    short = {"nodes-unet": "NODEs-UNet", "resunet": "ResNet", "unet": "U-Net"}
    for k, key in enumerate(("pa", "miou")):
        ax = axes[0]
        off = (k - 0.5) * 0.4
        ax.bar(x + off - 0.1, [PAPER_TABLE2[m][key] for m in models], 0.2, color=f"C{k}", alpha=0.45,
               label=f"paper {name[key]}")
        ours = [100 * t2[m][key] if t2 and m in t2 else np.nan for m in models]
        ax.bar(x + off + 0.1, ours, 0.2, color=f"C{k}", label=f"ours {name[key]}")
    axes[0].set_xticks(x)
    axes[0].set_xticklabels([short[m] for m in models])
    axes[0].set_ylabel("%")
    axes[0].set_ylim(50, 100)
    axes[0].set_title("Table 2: PA and MIoU" + ("" if t2 else " (ours: not measured yet)"))
    axes[0].legend(fontsize=8, ncol=2)
    try:
        noise = _data("05_placement_ablation", "position_summary", profile).get("noise") or {}
    except _Missing:
        noise = {}
    pairs = [("nodes-unet", "unet"), ("nodes-unet", "resunet"), ("resunet", "unet")]
    labels, paper, ours, err = [], [], [], []
    for a, b in pairs:
        for key in ("pa", "miou"):
            labels.append(f"{short[a]}\nvs {short[b]}\n{name[key]}")
            paper.append(paper_gain(PAPER_TABLE2, a, b, key))
            ours.append(_gain(t2, a, b, key) if t2 else np.nan)
            err.append(2 * noise.get("pa_std_pp" if key == "pa" else "std_pp", np.nan))
    x = np.arange(len(labels))
    axes[1].bar(x - 0.2, paper, 0.4, label="paper", alpha=0.6)
    has_err = bool(noise) and not all(np.isnan(err))
    axes[1].bar(x + 0.2, ours, 0.4, label="ours" + (" (bars: 2x seed std, ch. 5)" if has_err else ""),
                yerr=err if has_err else None, capsize=3)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, fontsize=7)
    axes[1].set_ylabel("gain (percentage points)")
    axes[1].set_title("gains claimed in §4.2")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
