"""Evidence for the paper's claims: every model of an experiment trained on several seeds, one record each.

``bloodseg reproduce EXPERIMENT --scale S --seeds N`` trains the models of ``EXPERIMENT`` (see
:data:`EXPERIMENTS`) at the recipe of scale ``S`` (:func:`scale_recipe`) on seeds ``0..N-1``. The unit
of work is one (model, seed) run; its record is one JSON file
``<out>/<experiment>/<scale>/<label>-seed<k>.json`` with provenance (:data:`PROVENANCE`), the
per-epoch history, the test scores and the per-image scores that :mod:`bloodseg.paper.stats`
bootstraps. Every model sees the same seeds, training data, data order (a function of the seed)
and test set; the seed only changes the initial weights and the order of the batches.

* A unit whose record is complete (same recipe, all fields) is skipped, so a killed or time-boxed
  run continues where it stopped; the training of an unfinished unit resumes from its ``last.pt``
  (checkpoints live under ``work/train/<scale>/<label>-seed<k>``, ``runs/reproduce/`` by default,
  not next to the records). Experiments share a trained unit when its model and recipe are the
  same: table 1's U-Net is table 2's, and the tolerance curve is measured on table 2's NODEs-UNet.
* ``max_minutes`` starts no unit whose expected duration (the mean wall time of the finished
  units of the experiment, or for the first unit an estimate from one timed training step)
  would pass the limit.
* :func:`summarize` — per model: test MIoU mean over seeds with its interval, and the paired
  difference to the U-Net (seeds and images resampled, :func:`~bloodseg.paper.stats.paired_bootstrap`)
  with its verdict.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..datasets import SegmentationDataset, extract_patches, synthetic_splits
from ..errors import BloodsegError
from ..measure import interleaved_times
from ..models import POSITIONS, build_model, count_parameters
from ..ode import nfe_report
from ..recipe import Recipe
from ..registry import variant
from ..train import evaluate, fit
from . import stats
from .records import REQUIRED, command_line, cpu_model, git_commit, provenance, write_record  # noqa: F401
from .runs import _subset, ablation_budget

RECORD_FORMAT = 1
#: Fields every record must carry; :func:`load_records` refuses a record without them.
PROVENANCE = (*REQUIRED[:2], "recipe", *REQUIRED[2:])   # the order of the error message
EXPERIMENTS = ("table2", "tolerance", "adjoint-memory", "table1", "timing")   # `all` runs them in this order
#: Timing rounds of the ``timing`` experiment: every model once per round, in the same order.
TIMING_ROUNDS = 5
SCALES = ("quick", "study", "full", "smoke")   # smoke: seconds, for the tests
DATA_SEED = 0    # crops and subsets of the training data: the same for every seed and model


def scale_recipe(scale: str) -> Recipe:
    """The recipe of a scale.

    * ``quick`` — chapters 5-6's ablation recipe of the quick preset (width 16, 3 epochs on 64 px crops).
    * ``full`` — the full preset (the paper's setting: width 32, 256 px, up to 50 epochs), batch 16
      with bf16 autocast on CUDA. With ``max_minutes``, :func:`reproduce` time-boxes every unit
      (``train.max_minutes``) so that all planned units fit: each trains the epochs that fit in its
      share, and its record's history says how many that was.
    * ``study`` — a 2-core CPU's answer to the relative claims: width 8 (a quarter of the paper's
      32), 60 synthetic smears (4 patches of 128 px each): 168 test patches held out by source (42
      smears; testing is cheap and the per-image spread is the larger part of the interval), the
      other 72 patches augmented x4 into 216 train / 72 validation patches, each trained on one
      random 64 px crop; 15 epochs of
      batch 4 with a cosine learning-rate schedule (lr 2e-3 -> 0) so that the last epochs settle.
      Whether a unit converged is read from its record (validation loss over the last epochs,
      :func:`convergence`), not assumed. Width 8 rather than 16 halves the cost of the ODE
      models (one timed training step, 1 thread, untrained weights: unet 24 ms, ode-unet-1
      210 ms, ode-unet-5 53 ms, nodes-unet 181 ms at width 8 vs 58 / 240 / 132 / 382 ms at 16).
    * ``smoke`` — the smoke preset's ablation recipe (seconds; tests only).
    """
    if scale == "quick":
        return ablation_budget("quick")
    if scale == "full":                 # bf16 autocast on CUDA (the ODE solves stay float32); ignored on a CPU
        return ablation_budget("full").replace(**{"train.bf16": True, "train.batch_size": 16})
    if scale == "smoke":
        return ablation_budget("smoke")
    if scale == "study":
        return ablation_budget("quick").replace(
            name="study", **{"data.n_source": 60, "data.n_test": 168, "train.epochs": 15,
                             "train.schedule": "cosine", "model.width": 8})
    raise BloodsegError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")


def _spec(label: str) -> dict:
    """A unit's model: the label, model name and options of :func:`bloodseg.registry.variant`."""
    v = variant(label)
    return dict(label=v.label, model=v.model, options=dict(v.options))


def experiment_specs(experiment: str, recipe: Recipe) -> list[dict]:
    """The models of an experiment: ``dict(label, model, options)``, read from :mod:`bloodseg.registry`."""
    if experiment == "table1":
        return [_spec("unet")] + [_spec(f"ode-unet-{p}") for p in POSITIONS]
    if experiment == "table2":
        hidden = 2 * recipe.model.width                  # chapter 6: runs.nodes_settings()["hidden"]
        return [_spec("unet"), _spec("resunet"), _spec("nodes-unet"), _spec(f"nodes-unet-h{hidden}")]
    if experiment == "tolerance":
        return [_spec("nodes-unet")]
    if experiment == "adjoint-memory":
        return [dict(label="adjoint-memory", model="nodes-unet", options={})]
    if experiment == "timing":                      # one unit per seed: every trained model, timed side by side
        return [dict(label="timing", model=None, options={})]
    raise BloodsegError(f"unknown experiment {experiment!r}: choose one of {', '.join(EXPERIMENTS)}, all")


def prepare_data(recipe: Recipe) -> dict:
    """Train, validation and test sets of ``recipe`` (the same for every seed and model)."""
    splits = synthetic_splits(recipe)
    train, val = splits["train"], splits["val"]
    if recipe.data.train_patch:
        train = extract_patches(train, recipe.data.train_patch, recipe.data.crops_per_patch, seed=DATA_SEED)
        val = extract_patches(val, recipe.data.train_patch, recipe.data.crops_per_patch, seed=DATA_SEED + 1)
    train = _subset(train, recipe.data.max_train, DATA_SEED)
    val = _subset(val, recipe.data.max_val, DATA_SEED + 1)
    return dict(train=SegmentationDataset(train), val=SegmentationDataset(val),
                test=SegmentationDataset(splits["test"]))


def record_path(out, experiment: str, scale: str, label: str, seed: int) -> Path:
    return Path(out) / experiment / scale / f"{label}-seed{seed}.json"


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _complete(rec, recipe: Recipe, seed: int) -> bool:
    return (isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT and rec.get("seed") == seed
            and _same_recipe(rec.get("recipe"), recipe) and all(k in rec for k in PROVENANCE)
            and ("adjoint_memory" in rec or "per_image" in rec or "timing" in rec))


def _same_recipe(stored, recipe: Recipe) -> bool:
    """``stored`` (a record's or fingerprint's recipe dict) is ``recipe``; a field added to the
    recipe since the record was written counts as its default, so new options do not void old runs."""
    try:
        return Recipe.from_dict(stored).to_dict() == recipe.to_dict()
    except Exception:       # noqa: BLE001 - an unreadable recipe is simply not this one
        return False


def _unit_recipe(recipe: Recipe, seed: int) -> Recipe:
    return recipe.replace(**{"train.seed": seed, "train.progress": False})


def _train_unit(spec: dict, recipe: Recipe, seed: int, data: dict, work: Path) -> tuple:
    """Train (or resume) one unit in ``work``; the best checkpoint and the history."""
    fp = json.loads(json.dumps(dict(format=RECORD_FORMAT, spec=spec, recipe=recipe.to_dict())))
    old = _read(work / "fingerprint.json")
    same = (isinstance(old, dict) and {k: old.get(k) for k in ("format", "spec")} == {k: fp[k] for k in ("format", "spec")}
            and _same_recipe(old.get("recipe"), recipe))
    if not same and work.exists():
        shutil.rmtree(work)                       # other settings: start over
    work.mkdir(parents=True, exist_ok=True)
    (work / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    torch.manual_seed(seed)
    model = build_model(spec["model"], width=recipe.model.width, **{**recipe.model.options, **spec["options"]})
    history = fit(model, data["train"], data["val"], work, recipe)
    return load_model(work / "best.pt"), history


def _measure_unit(experiment: str, spec: dict, recipe: Recipe, seed: int, data: dict, work: Path) -> dict:
    if experiment == "adjoint-memory":
        from .adjoint_memory import adjoint_memory
        torch.manual_seed(seed)
        m = recipe.measure
        return dict(adjoint_memory=adjoint_memory(None, recipe.model.width, m.mem_size, m.mem_batch))
    if experiment == "timing":
        return _timing_unit(recipe, seed, data, work.parent)
    best, history = _train_unit(spec, recipe, seed, data, work)
    s = evaluate(best, data["test"], n_timed=0, per_image=True)
    out = dict(history=history, best_epoch=min(history, key=lambda r: r["val_loss"])["epoch"],
               train_s=sum(r["time_s"] for r in history), params=count_parameters(best),
               test={k: s[k] for k in ("pa", "cpa", "recall", "iou", "miou")},
               per_image=[dict(pa=p["pa"], miou=p["miou"], iou=p["iou"], cm=p["cm"]) for p in s["per_image"]])
    if experiment == "tolerance":
        from .tolerance import tolerance_curve
        out["tolerance_curve"] = tolerance_curve(best, data["test"], recipe.measure.tolerances,
                                                 recipe.measure.n_timed)
    return out


def _timing_unit(recipe: Recipe, seed: int, data: dict, train_dir: Path) -> dict:
    """Inference time of every model of tables 1 and 2 trained on ``seed`` (trained here if its unit
    is missing), measured side by side: :data:`TIMING_ROUNDS` rounds, each timing every model on the
    first ``n_timed`` test images, so slow drifts of the machine fall on all models alike."""
    specs = list({s["label"]: s for name in ("table1", "table2") for s in experiment_specs(name, recipe)}.values())
    models = {s["label"]: _train_unit(s, recipe, seed, data, train_dir / f"{s['label']}-seed{seed}")[0]
              for s in specs}
    device = next(next(iter(models.values())).parameters()).device
    images = [data["test"][i][0][None].to(device) for i in range(min(recipe.measure.n_timed, len(data["test"])))]
    nfe = {label: 0.0 for label in models}

    def count(label, r, x):              # mean forward NFE per image, all blocks (the first round)
        if r == 0:
            nfe[label] += sum(f for f, _ in nfe_report(models[label]).values()) / len(images)

    with torch.inference_mode():         # every model once a round, in the same order, one warm-up image each time
        rounds = interleaved_times(models, images, TIMING_ROUNDS, 1, device=device, order=lambda r, labels: labels,
                                   warmup_each_round=True, after=count)
    times = {label: [t / max(len(images), 1) for t in ts] for label, ts in rounds.items()}
    return dict(timing=dict(n_images=len(images), rounds=TIMING_ROUNDS, time_per_image_s=times, nfe_forward=nfe,
                            threads=torch.get_num_threads()))


def convergence(history: list[dict], tail: float = 1 / 3, tol: float = 0.02) -> dict:
    """Did a run settle? The relative drop of the best validation loss during the last ``tail`` of
    the epochs (``gain``); ``converged`` when it is below ``tol`` (2 %): more epochs would have
    bought little. A run of fewer than 3 epochs cannot tell (``converged`` is None)."""
    losses = [float(r["val_loss"]) for r in history]
    if len(losses) < 3:
        return dict(gain=math.nan, converged=None)
    cut = max(1, min(len(losses) - 1, round(len(losses) * (1 - tail))))
    before, after = min(losses[:cut]), min(losses[cut:])
    gain = (before - after) / before if before > 0 else 0.0
    return dict(gain=gain, converged=bool(gain < tol))


def estimate_unit_s(spec: dict, recipe: Recipe, data: dict) -> float:
    """A first unit's expected wall time: one timed training step x the steps of the run, plus a
    third for validation and testing (a rough guess, replaced by measured units as they finish)."""
    if spec["model"] is None:                       # timing: mostly loading trained units
        return 60.0
    model = build_model(spec["model"], width=recipe.model.width, **{**recipe.model.options, **spec["options"]})
    ds, b = data["train"], recipe.train.batch_size
    x = torch.stack([ds[i % len(ds)][0] for i in range(b)])
    y = torch.stack([ds[i % len(ds)][1] for i in range(b)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    step = time.perf_counter() - t0
    return 1.33 * step * math.ceil(len(ds) / b) * recipe.train.epochs


def run_experiment(experiment: str, scale: str = "quick", seeds: int = 3, max_minutes: float = 0.0,
                   out="book/results", work=None, command: str | None = None, progress: bool | None = None,
                   log=print, changes: dict | None = None, models=None) -> dict:
    """Run every missing (model, seed) unit of ``experiment``; ``dict(records, ran, skipped, not_started)``.

    ``changes``: recipe fields changed from the scale's (``{"model.width": 4}``); they are part of
    the stored recipe, so records of other settings are not taken as finished. ``models``: only the
    units of these labels (e.g. more seeds for the two models of one paired claim); the others are
    neither run nor counted as missing."""
    if not (isinstance(seeds, int) and seeds >= 1):
        raise BloodsegError(f"seeds must be a whole number >= 1; got {seeds!r}")
    if not (max_minutes >= 0 and math.isfinite(max_minutes)):
        raise BloodsegError(f"max_minutes must be 0 (no limit) or a positive number; got {max_minutes}")
    from tqdm.auto import tqdm
    base = scale_recipe(scale).replace(**(changes or {}))
    specs = select_models(experiment, experiment_specs(experiment, base), models)
    work = Path(work) if work is not None else Path("runs") / "reproduce"
    command = command or command_line()
    units = [(k, spec) for k in range(seeds) for spec in specs]     # seed by seed: paired early
    started, ran, skipped, not_started, walls, data = time.perf_counter(), [], [], [], [], None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed, spec in units:                      # wall times of units finished before this call
        rec = _read(record_path(out, experiment, scale, spec["label"], seed))
        if _complete(rec, _unit_recipe(base, seed), seed):
            walls.append(rec["wall_s"])
    bar = tqdm(units, desc=f"{experiment} ({scale})", unit="unit", disable=None if progress is None else not progress)
    for seed, spec in bar:
        recipe, path = _unit_recipe(base, seed), record_path(out, experiment, scale, spec["label"], seed)
        if _complete(_read(path), recipe, seed):
            skipped.append(path)
            continue
        if data is None and experiment != "adjoint-memory":
            data = prepare_data(base)
        if max_minutes:
            expected = (float(np.mean(walls)) if walls else
                        estimate_unit_s(spec, recipe, data) if data else 60.0)
            if time.perf_counter() - started + expected > 60 * max_minutes:
                not_started = [record_path(out, experiment, scale, s["label"], k) for k, s in units
                               if not _complete(_read(record_path(out, experiment, scale, s["label"], k)),
                                                _unit_recipe(base, k), k)]
                log(f"{experiment} ({scale}): max_minutes={max_minutes:g} reached; {len(not_started)} unit(s) "
                    f"not started (about {expected / 60:.1f} min each); run the same command again to continue")
                break
        t0 = time.perf_counter()
        result = _measure_unit(experiment, spec, recipe, seed, data,
                               work / "train" / scale / f"{spec['label']}-seed{seed}")
        wall = time.perf_counter() - t0
        record = dict(format=RECORD_FORMAT, experiment=experiment, scale=scale, label=spec["label"],
                      model=spec["model"], options=spec["options"], seed=seed, recipe=recipe.to_dict(),
                      **{**provenance(command, t0), "device": device, "wall_s": wall}, **result)
        write_record(record, path)
        walls.append(wall)
        ran.append(path)
    bar.close()
    return dict(records=load_records(Path(out) / experiment / scale), ran=ran, skipped=skipped,
                not_started=not_started)


def load_records(folder, rerun: str = "bloodseg reproduce") -> list[dict]:
    """Every ``*.json`` record in ``folder`` (sorted by name); a record without provenance is an error
    (its message says to re-run it with ``rerun``)."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        rec = _read(path)
        if not isinstance(rec, dict):
            raise BloodsegError(f"{path} is not a readable JSON record; delete it and run the experiment again")
        missing = [k for k in PROVENANCE if k not in rec]
        if missing:
            raise BloodsegError(f"{path} lacks provenance ({', '.join(missing)}); a number without "
                                f"provenance cannot decide a claim: re-run it with `{rerun}`")
        rec["path"] = str(path)
        records.append(rec)
    return records


def per_image_matrix(records: list[dict], label: str, seeds: list[int], score: str = "miou") -> np.ndarray:
    """``seeds x images`` per-image ``score`` of model ``label``."""
    by_seed = {r["seed"]: r for r in records if r.get("label") == label}
    return np.array([[p[score] for p in by_seed[k]["per_image"]] for k in seeds], dtype=np.float64)


def has_counts(records: list[dict]) -> bool:
    """Do all scored records keep per-image confusion matrices (pooled scores can be resampled)?"""
    scored = [r for r in records if "per_image" in r]
    return bool(scored) and all("cm" in p for r in scored for p in r["per_image"])


def cm_stack(records: list[dict], labels: list[str], seeds: list[int]) -> np.ndarray:
    """``models x seeds x images x C x C`` per-image confusion matrices of ``labels`` on ``seeds``."""
    by = {(r["label"], r["seed"]): r for r in records if "per_image" in r}
    return np.array([[[p["cm"] for p in by[(lab, k)]["per_image"]] for k in seeds] for lab in labels],
                    dtype=np.float64)


def summarize(records: list[dict], reference: str = "unet", n_boot: int = stats.N_BOOT, seed: int = 0,
              key: str = "miou") -> list[dict]:
    """Per model: test ``key`` (MIoU or PA, %) over seeds (mean, interval, spread) and, on the seeds
    that both it and ``reference`` have, the paired difference to ``reference`` with its verdict for
    "beats the reference" (percentage points; the reference's own row has no difference).

    The score is the paper's: pooled over the test images (one confusion matrix per run), when the
    records keep per-image confusion matrices (``metric`` "pooled"); older records fall back to the
    mean of per-image scores ("per-image mean")."""
    scored = [r for r in records if "per_image" in r]
    pooled = has_counts(scored)
    labels = sorted(dict.fromkeys(r["label"] for r in scored), key=lambda x: (x != reference, x))
    rows = []
    for label in labels:
        mine = sorted((r for r in scored if r["label"] == label), key=lambda r: r["seed"])
        values = [100 * r["test"][key] for r in mine]
        if pooled:
            own = stats.pooled_bootstrap(cm_stack(scored, [label], [r["seed"] for r in mine]), n_boot, seed, key=key)
            ci = dict(mean=own["value"][0], ci=own["ci"][0])
        else:
            ci = stats.mean_ci(values, n_boot, seed)
        row = dict(model=label, n_seeds=len(mine), miou=ci["mean"], miou_ci=ci["ci"],
                   seed_range=stats.seed_spread(values)["range"], metric="pooled" if pooled else "per-image mean",
                   converged=sum(bool(convergence(r.get("history", []))["converged"]) for r in mine))
        common = sorted({r["seed"] for r in mine} & {r["seed"] for r in scored if r["label"] == reference})
        if label != reference and common:
            if pooled:
                p = stats.pooled_bootstrap(cm_stack(scored, [reference, label], common), n_boot, seed, key=key)
                d = dict(diff=p["diff"][1], ci=p["diff_ci"][1])
            else:
                d = stats.paired_bootstrap(100 * per_image_matrix(scored, reference, common, key),
                                           100 * per_image_matrix(scored, label, common, key), n_boot, seed)
            row.update(diff=d["diff"], diff_ci=d["ci"], verdict=stats.verdict(d["ci"]))
        rows.append(row)
    return rows


def rescore(experiment: str, scale: str, out="book/results", work=None, command: str | None = None,
            log=print) -> list[Path]:
    """Add per-image confusion matrices to records made before they were kept: each unit's trained
    ``best.pt`` is evaluated again on the same test set; its per-image MIoU must equal the recorded
    one (same weights, same data), else the record is left alone. The record gains ``rescored``
    (commit, command, date); its original provenance stays."""
    work = Path(work) if work is not None else Path("runs") / "reproduce"
    done, data = [], None
    for path in sorted((Path(out) / experiment / scale).glob("*.json")):
        rec = _read(path)
        if not isinstance(rec, dict) or "per_image" not in rec or all("cm" in p for p in rec["per_image"]):
            continue
        ckpt = work / "train" / scale / f"{rec['label']}-seed{rec['seed']}" / "best.pt"
        if not ckpt.is_file():
            log(f"{path}: no trained unit at {ckpt}; not rescored")
            continue
        if data is None:
            data = prepare_data(Recipe.from_dict(rec["recipe"]))
        s = evaluate(load_model(ckpt), data["test"], n_timed=0, per_image=True)
        again = [p["miou"] for p in s["per_image"]]
        if not np.allclose(again, [p["miou"] for p in rec["per_image"]], rtol=0, atol=1e-9, equal_nan=True):
            log(f"{path}: the re-evaluation differs from the record; not rescored")
            continue
        for p, q in zip(rec["per_image"], s["per_image"]):
            p["cm"] = q["cm"]
        rec["rescored"] = {k: v for k, v in provenance(command, time.perf_counter()).items()
                           if k in ("git_commit", "command", "date")}
        write_record(rec, path)
        done.append(path)
    return done


def format_summary(rows: list[dict], reference: str = "unet") -> str:
    lines = [f"{'model':<22}{'seeds':>6}{'settled':>8}  {'test MIoU % (95% CI)':<26}"
             f"{'vs ' + reference + ' (pp, 95% CI)':<28}verdict"]
    for r in rows:
        m = f"{r['miou']:.2f} ({r['miou_ci'][0]:.2f}, {r['miou_ci'][1]:.2f})"
        d = f"{r['diff']:+.2f} ({r['diff_ci'][0]:+.2f}, {r['diff_ci'][1]:+.2f})" if "diff" in r else "-"
        lines.append(f"{r['model']:<22}{r['n_seeds']:>6}{r.get('converged', 0):>8}  {m:<26}{d:<28}"
                     f"{r.get('verdict', '-')}")
    return "\n".join(lines)


def _adjoint_ratio(rec: dict) -> float:
    peak = {r["backprop"]: r.get("peak_mb") for r in rec["adjoint_memory"] if r["model"] == "nodes-unet"}
    return peak["adjoint"] / peak["direct"] if peak.get("adjoint") and peak.get("direct") else math.nan


def unit_minutes(names: list[str], seeds: int, max_minutes: float, share: float = 0.7) -> float:
    """Training minutes per unit so that every unit of ``names`` x ``seeds`` fits in ``max_minutes``:
    ``share`` of the time goes to training (the rest to data, evaluation and start-up), split over
    the units that train (table 1's U-Net is table 2's; timing, tolerance and adjoint-memory reuse)."""
    specs = {s["label"] for name in names if name in ("table1", "table2")
             for s in experiment_specs(name, scale_recipe("full"))}
    return max(share * max_minutes / max(1, len(specs) * seeds), 0.05)


def select_models(experiment: str, specs: list[dict], models) -> list[dict]:
    """``specs`` restricted to the labels in ``models`` (None: all); an unknown label is an error."""
    if models is None:
        return specs
    wanted = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    known = [s["label"] for s in specs]
    unknown = [m for m in wanted if m not in known]
    if unknown or not wanted:
        raise BloodsegError(f"{experiment} has no model {', '.join(unknown) or '(none given)'}; "
                            f"its models are: {', '.join(known)}")
    return [s for s in specs if s["label"] in wanted]


def reproduce(experiment: str, scale: str = "quick", seeds: int = 3, max_minutes: float = 0.0,
              out="book/results", work=None, command: str | None = None, progress: bool | None = None,
              log=print, changes: dict | None = None, models=None) -> dict:
    """:func:`run_experiment` for one experiment or ``all`` (one shared time limit); prints summaries.
    ``models`` (one experiment only): the labels to run, see :func:`run_experiment`."""
    names = list(EXPERIMENTS) if experiment == "all" else [experiment]
    if models is not None and len(names) != 1:
        raise BloodsegError("--models selects models of one experiment; name the experiment, not 'all'")
    for name in names:
        select_models(name, experiment_specs(name, scale_recipe(scale)), models)   # unknown names fail first
    if scale == "full" and max_minutes and "train.max_minutes" not in (changes or {}):
        changes = {**(changes or {}), "train.max_minutes": unit_minutes(names, seeds, max_minutes)}
        log(f"full scale in {max_minutes:g} min: every unit trains for at most "
            f"{changes['train.max_minutes']:.2f} min (the epochs that fit; its history says how many)")
    t0, results = time.perf_counter(), {}
    for name in names:
        left = max_minutes - (time.perf_counter() - t0) / 60 if max_minutes else 0.0
        if max_minutes and left <= 0:
            log(f"{name} ({scale}): not started, max_minutes={max_minutes:g} reached")
            continue
        r = run_experiment(name, scale, seeds, max(left, 1e-9) if max_minutes else 0.0, out, work,
                           command, progress, log, changes, models)
        log(f"\n{name} ({scale}): {len(r['ran'])} unit(s) run, {len(r['skipped'])} already done, "
            f"{len(r['not_started'])} not started; records in {Path(out) / name / scale}")
        rows = summarize(r["records"])
        if rows:
            log(format_summary(rows))
        ratios = [_adjoint_ratio(rec) for rec in r["records"] if "adjoint_memory" in rec]
        if ratios:
            log(f"adjoint / direct peak training memory of nodes-unet: {', '.join(f'{x:.3f}' for x in ratios)} "
                f"({len(ratios)} repeat(s))")
        r["summary"] = rows
        results[name] = r
    return results
