"""Solvers as an experiment (issue #18): ``speed/solvers.json``.

:func:`solver_experiment` (``bloodseg record cheap-solvers``): the same network trained with its
blocks solved by one Euler step (a residual network), by rk4 with 2 steps, and by dopri5 at the
trained tolerances (the study's unit, reused): test MIoU, NFE, training time, inference time, and
every trained network solved with every solver (does a network trained as a residual network
improve when its blocks are solved accurately?). :func:`solvers_frame` and :func:`cross_frame` are
the chapter's tables. The network is any label of :data:`bloodseg.registry.VARIANTS`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..calibrate import apply_solver, check_solver, solver_label, trained_solver
from ..errors import SolverError
from ..measure import interleaved_times
from ..models import count_parameters
from ..ode import ode_blocks
from ..registry import build_variant
from ..train import evaluate, fit
from . import stats
from .records import provenance, results_path, write_record
from .reproduce import prepare_data, scale_recipe
from .units import RECORD_SOLVERS, copy_units, find_units, load_net, network_times, ratio_summary, test_scores

__all__ = ["SOLVERS_WORK", "SOLVER_ARMS", "solver_experiment", "solvers_frame", "cross_frame", "run_record"]

#: Where :func:`solver_experiment` trains (``<arm>-seed<k>``); resumed when killed.
SOLVERS_WORK = Path("runs/cheap/solvers")


#: The arms of the solver experiment that are trained here (dopri5 is the study's unit).
SOLVER_ARMS = {"euler-1": {"method": "euler", "steps": 1}, "rk4-2": {"method": "rk4", "steps": 2}}


def _train_arm(arm: str, spec: dict, model_name: str, recipe, data: dict, work: Path, log) -> dict:
    """Train ``model_name`` with every block solved by ``spec`` (resumed from ``last.pt``; a finished
    unit with the same recipe and spec is read back from its ``unit.json``)."""
    fp = json.loads(json.dumps(dict(arm=arm, spec=spec, model=model_name, recipe=recipe.to_dict())))
    try:
        done = json.loads((work / "unit.json").read_text())
    except (OSError, ValueError):
        done = None
    if isinstance(done, dict) and done.get("fingerprint") == fp and (work / "best.pt").is_file():
        log(f"  {work.name}: done before, reused")
        return done
    try:
        old = json.loads((work / "fingerprint.json").read_text())
    except (OSError, ValueError):
        old = None
    if work.exists() and old != fp:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    torch.manual_seed(recipe.train.seed)
    method = spec["method"] if spec else "dopri5"
    model = build_variant(model_name, width=recipe.model.width, method=method, **recipe.model.options)
    if spec:
        apply_solver(model, spec)     # step_size is not a build option: it is set on the blocks
    t0 = time.perf_counter()
    history = fit(model, data["train"], data["val"], work, recipe, device="cpu",
                  on_epoch=lambda r: log(f"  {work.name} epoch {r['epoch']}: loss {r['loss']:.4f} val_miou "
                                         f"{r['val_miou']:.4f} nfe/step {r['nfe_forward']:.1f} ({r['time_s']:.0f} s)"))
    unit = dict(fingerprint=fp, arm=arm, spec=spec, seed=recipe.train.seed, history=history,
                train_s=float(sum(r["time_s"] for r in history)), wall_s=time.perf_counter() - t0,
                best_epoch=min(history, key=lambda r: r["val_loss"])["epoch"], ckpt=str(work / "best.pt"))
    (work / "unit.json").write_text(json.dumps(unit, indent=1, default=float))
    return unit


def _train_step_times(models: dict, data: dict, batch: int, steps: int = 4, lr: float = 1e-4) -> dict:
    """Seconds per training step (forward, cross-entropy, backward, Adam) of each model, taking
    turns step by step on the same batches (:func:`bloodseg.measure.interleaved_times`, one step a
    round, the order rotating); the median of ``steps`` after one warm-up step (the first round).
    Works on copies: the models are left as they are."""
    import copy
    import torch.nn.functional as F
    ds = data["train"]
    xs = [torch.stack([ds[(s * batch + j) % len(ds)][0] for j in range(batch)]) for s in range(steps + 1)]
    ys = [torch.stack([ds[(s * batch + j) % len(ds)][1] for j in range(batch)]) for s in range(steps + 1)]
    copies = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in copies.items()}

    def step(k):
        def run(s):
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(copies[k](xs[s]), ys[s]).backward()
            opts[k].step()
        return run

    times = interleaved_times({k: step(k) for k in copies}, lambda s: [s], steps + 1)
    return {k: float(np.median(v[1:])) for k, v in times.items()}


def solver_experiment(scale: str = "study", seeds: Sequence[int] = (0,), model: str = "nodes-unet",
                      arms: dict | None = None, epochs: int | None = None, work=SOLVERS_WORK, reference: dict | None = None,
                      root=None, width: int | None = None, n_images: int = 20, rounds: int = 5, step_batch: int | None = None,
                      cross: bool = True, cross_max_steps: int = 200, out=None, command: str | None = None,
                      notes: str = "", log: Callable = print) -> dict:
    """Issue #18: ``model`` trained with its blocks solved by each of ``arms`` (default
    :data:`SOLVER_ARMS`: one Euler step, rk4 with 2 steps) and by dopri5 at the trained tolerances.

    The dopri5 arm is the study's unit of each seed (``reference``: ``{seed: ckpt path or unit
    dict}``; default :func:`find_units`), not retrained; a seed without one is trained here when
    ``reference`` is ``"train"``, else left out. Per arm and seed: test MIoU (all test patches),
    forward NFE, training time (sum of the epochs' times, from the unit's own run) and the best
    epoch; then, in one process: inference time on the first ``n_images`` test patches
    (``rounds`` interleaved rounds), seconds per training step side by side, and (``cross``) each
    trained network's test MIoU with every arm's solver (adaptive solves capped at
    ``cross_max_steps`` steps). ``epochs`` shortens the recipe (the record says so)."""
    t_start = time.perf_counter()
    arms = dict(SOLVER_ARMS if arms is None else arms)
    base = scale_recipe(scale)
    if width is not None:
        base = base.replace(**{"model.width": width})
    if epochs is not None:
        base = base.replace(**{"train.epochs": int(epochs)})
    base = base.replace(**{"train.progress": False})
    log(f"preparing the {scale} data ...")
    data = prepare_data(base)
    test = data["test"]
    tmp = Path(tempfile.mkdtemp(prefix="bloodseg-solvers-"))
    try:
        if reference is None:
            found = find_units([model], seeds, root, scale)
            reference = {u["seed"]: u for u in found.values()}
        units: dict = {}   # (arm, seed) -> dict(ckpt, spec, train_s, ...)
        for seed in seeds:
            recipe = base.replace(**{"train.seed": int(seed)})
            ref = reference.get(seed) if isinstance(reference, dict) else None
            if ref is not None:
                ref = ref if isinstance(ref, dict) else dict(ckpt=str(ref))
                ref = copy_units({f"dopri5-seed{seed}": ref}, tmp)[f"dopri5-seed{seed}"]
                hist = ref.get("history")
                units[("dopri5", seed)] = dict(ckpt=ref["ckpt"], spec=None, source=ref.get("source"),
                                               record=ref.get("record"), train_s=ref.get("train_s"),
                                               best_epoch=(min(hist, key=lambda r: r["val_loss"])["epoch"] if hist else None),
                                               epochs=len(hist) if hist else None, trained_here=False,
                                               nfe_train_step=hist[-1]["nfe_forward"] if hist else None)
            elif reference == "train":
                log(f"dopri5 seed {seed}: training (no study unit) ...")
                u = _train_arm("dopri5", None, model, recipe, data, Path(work) / f"dopri5-seed{seed}", log)
                units[("dopri5", seed)] = dict(ckpt=u["ckpt"], spec=None, train_s=u["train_s"], best_epoch=u["best_epoch"],
                                               epochs=len(u["history"]), trained_here=True,
                                               nfe_train_step=u["history"][-1]["nfe_forward"])
            for arm, spec in arms.items():
                spec = check_solver(spec)
                log(f"{arm} seed {seed}: training ...")
                u = _train_arm(arm, spec, model, recipe, data, Path(work) / f"{arm}-seed{seed}", log)
                units[(arm, seed)] = dict(ckpt=u["ckpt"], spec=spec, train_s=u["train_s"], best_epoch=u["best_epoch"],
                                          epochs=len(u["history"]), trained_here=True,
                                          nfe_train_step=u["history"][-1]["nfe_forward"])
        arm_names = ["dopri5"] + list(arms)
        nets, trained_settings = {}, {}
        for (arm, seed), u in units.items():
            net = load_net(u["ckpt"])
            if u["spec"] is not None:
                apply_solver(net, u["spec"])    # the checkpoint rebuilds the method, not its steps
            nets[(arm, seed)] = net
            trained_settings[(arm, seed)] = trained_solver(net)
        rows = []
        for (arm, seed), net in nets.items():
            log(f"{arm} seed {seed}: test scores ...")
            s = test_scores(net, test)
            u = units[(arm, seed)]
            rows.append(dict(arm=arm, seed=seed, solver=solver_label(u["spec"]) if u["spec"] else "dopri5 (trained tolerances)",
                             spec=u["spec"], trained_solver=trained_settings[(arm, seed)], test_miou=s["miou"],
                             test_pa=s["pa"], mean_image_miou=s["mean_image_miou"],
                             mean_image_miou_ci=s["mean_image_miou_ci"], per_image_miou=s["per_image_miou"],
                             train_s=u["train_s"], epochs=u["epochs"], best_epoch=u["best_epoch"],
                             nfe_train_step=u["nfe_train_step"], trained_here=u["trained_here"],
                             unit=u.get("source") or u["ckpt"], params=count_parameters(net)))
        images = [test[i][0][None] for i in range(min(n_images, len(test)))]
        log(f"timing inference, {rounds} rounds ...")
        timing = network_times({f"{a}-seed{s}": n for (a, s), n in nets.items()}, images, rounds=rounds)
        first = next(iter(nets))
        summary = ratio_summary(timing["times"], f"{first[0]}-seed{first[1]}", len(images))
        log("timing training steps side by side ...")
        steps = _train_step_times({f"{a}-seed{s}": n for (a, s), n in nets.items() if s == seeds[0]}, data,
                                  step_batch or base.train.batch_size)
        for r in rows:
            key = f"{r['arm']}-seed{r['seed']}"
            r.update(nfe_forward=timing["nfe"][key], nfe_total=float(sum(timing["nfe"][key].values())),
                     time_per_image_s=summary[key]["time_per_image_s"], time_s_rounds=summary[key]["time_s_rounds"],
                     train_step_s=steps.get(key))
        # paired differences to dopri5 over seeds and images
        diffs = {}
        ref_rows = {r["seed"]: r for r in rows if r["arm"] == "dopri5"}
        for arm in arms:
            both = [s for s in seeds if s in ref_rows and any(r["arm"] == arm and r["seed"] == s for r in rows)]
            if not both:
                continue
            a = np.array([ref_rows[s]["per_image_miou"] for s in both])
            b = np.array([next(r for r in rows if r["arm"] == arm and r["seed"] == s)["per_image_miou"] for s in both])
            d = stats.paired_bootstrap(100 * a, 100 * b)
            diffs[arm] = dict(diff_pp=d["diff"], ci=list(d["ci"]), n_seeds=d["n_seeds"], n_images=d["n_images"],
                              of=f"{arm} - dopri5, per-image test MIoU, pp")
        cross_rows = []
        if cross:
            solve_with = {"dopri5": None, **{a: check_solver(s) for a, s in arms.items()}}
            for (arm, seed), net in nets.items():
                ref_settings = trained_settings.get(("dopri5", seed)) or (
                    [dict(s, method="dopri5", step_size=None) for s in
                     trained_solver(build_variant(model, width=base.model.width))])
                for solve_arm, spec in solve_with.items():
                    if spec is None:
                        apply_solver(net, None, ref_settings)     # dopri5 at the trained tolerances
                    else:
                        apply_solver(net, spec)
                    for b in ode_blocks(net):
                        b.max_steps = cross_max_steps
                    log(f"  trained {arm} seed {seed}, solved {solve_arm} ...")
                    t0 = time.perf_counter()
                    try:
                        s = evaluate(net, test, n_timed=1, warmup=0)
                        cross_rows.append(dict(trained=arm, seed=seed, solved=solve_arm, test_miou=float(s["miou"]),
                                               nfe=float(s["nfe_forward"]), seconds=time.perf_counter() - t0, error=None))
                    except SolverError as exc:
                        cross_rows.append(dict(trained=arm, seed=seed, solved=solve_arm, test_miou=None, nfe=None,
                                               seconds=time.perf_counter() - t0, error=str(exc)[:300]))
                apply_solver(net, None, trained_settings[(arm, seed)])
        record = dict(
            what=f"{model} (width {base.model.width}, {scale} recipe) trained with every ODE-block solved by "
                 + ", ".join(f"{a} ({solver_label(check_solver(s))})" for a, s in arms.items())
                 + " and by dopri5 at the trained tolerances (the study's unit, not retrained); test MIoU over all "
                 f"{len(test)} test patches; NFE = forward evaluations of f per block per test patch; train_s = the "
                 "sum of the unit's epoch times in its own run (the machine's load differs between runs); "
                 "train_step_s = median seconds per training step, the arms taking turns on the same batches in one "
                 f"process; inference time on {len(images)} test patches, {rounds} interleaved rounds; cross = every "
                 "trained network solved with every arm's solver",
            model=model, width=base.model.width, scale=scale, seeds=list(seeds), arms=arm_names,
            epochs=base.train.epochs, epochs_reduced=epochs is not None and epochs != scale_recipe(scale).train.epochs,
            rows=rows, miou_diff_to_dopri5=diffs, cross=cross_rows, n_images=len(images), rounds=rounds,
            notes=notes, recipe=base.to_dict())
        record["provenance"] = provenance(command, t_start)
        if out is not None:
            write_record(record, Path(out))
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def solvers_frame(record: dict):
    """One row per (arm, seed) of the solver experiment."""
    import pandas as pd
    rows = [{"trained with": r["solver"], "seed": r["seed"], "test MIoU": r["test_miou"], "NFE": r["nfe_total"],
             "train s": r["train_s"], "s / train step": r["train_step_s"], "ms / image": 1000 * r["time_per_image_s"],
             "best epoch": r["best_epoch"]} for r in record["rows"]]
    return pd.DataFrame(rows).set_index(["trained with", "seed"])


def cross_frame(record: dict):
    """The solver experiment's cross table: test MIoU of each trained network (rows) solved with
    each solver (columns), mean over seeds."""
    import pandas as pd
    df = pd.DataFrame(record["cross"])
    return df.pivot_table(index="trained", columns="solved", values="test_miou", aggfunc="mean").reindex(
        index=record["arms"], columns=record["arms"])


def run_record(args, command: str) -> None:
    """``bloodseg record cheap-solvers``: the solver experiment on ``--seeds``."""
    import functools
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    solver_experiment(scale=args.scale, seeds=seeds, epochs=args.epochs, rounds=args.rounds or 5, root=args.study_root,
                      notes=args.notes, out=args.out or results_path(RECORD_SOLVERS), command=command,
                      log=functools.partial(print, flush=True))

