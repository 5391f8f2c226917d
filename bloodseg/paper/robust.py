"""Is NODEs-UNet robust? The study of chapter 10: three networks trained alike on BCCD, five seeds,
scored clean, under graded perturbations, under adversarial attacks, and on another microscope.

``bloodseg reproduce robust --scale study --seeds 5`` runs
:func:`run_robust`. The unit of work is one (model, seed); its record is
``<out>/robust/<scale>/<label>-seed<k>.json`` with provenance at its top level (as
:mod:`bloodseg.paper.reproduce`'s records), written atomically by
:func:`bloodseg.paper.records.write_record`, which refuses a record without provenance;
:func:`load_robust_records` refuses one too. A unit whose record is complete (same recipe and
plan) is skipped, so a killed run continues; training resumes from its ``last.pt``.

The models (:data:`LABELS`), in the order a seed runs them:

* ``unet``, ``resunet`` — trained;
* ``nodes-unet-euler1`` — NODEs-UNet's trained weights, every ODE-block solved by one Euler step
  (chapter 9: a residual network in all but name); its unit trains the NODEs-UNet when needed;
* ``nodes-unet`` — the same weights solved as trained (dopri5, rtol = atol = 1e-4 / 1e-6 / 1e-4).

All are trained from scratch with one recipe (:func:`study_recipe`) on BCCD (gold white cells, silver
red cells; ``training_splits("bccd")``: the training photographs at half size, 128 px patches;
validation patches pick the best epoch) and used as :class:`~bloodseg.Segmenter` s at that fixed
scale, network argmax, no cleanup, no colour or scale rule (except on ALL-IDB2, below). Each unit:

1. **clean** — every test photograph: white-cell counts (tp, fp, fn) and the 3-class confusion matrix;
2. **perturbations** — every third test photograph (24 of 72) under each family of
   :data:`bloodseg.paper.perturb.FAMILIES` at each strength (noise seeded by the photograph's index,
   the same for every model);
3. **attacks** — every ninth test photograph (8 of 72): FGSM and PGD (``pgd_steps``) at each ``eps`` on the
   white-cell loss, white-box; the ODE models also get the perturbations made on the U-Net of the
   same seed, and ``nodes-unet`` those made on its Euler-1 twin (transfer attacks: gradients through
   an adaptive solver can mislead an attack). Perturbations are kept (float16) in the work folder;
4. **ALL-IDB2** (when present; :func:`bloodseg.domains.load_allidb2`, the report half, never trained
   on): white-cell counts with the network's fixed scale, and with the product's two
   model-independent rules (colour matched to, and red cells scaled to, the BCCD training photographs).

:mod:`bloodseg.paper.robust_report` turns the records into Table 2 on real smears, curves,
intervals and the ledger's rows.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..classes import WHITE_CELL
from ..datasets import SegmentationDataset, prepared_photographs, training_splits
from ..errors import BloodsegError
from ..io import load_folder
from ..metrics import confusion_matrix
from ..ode import nfe_report, ode_blocks
from ..recipe import REAL_PRESETS, Recipe
from ..registry import build_variant
from ..segmenter import Segmenter
from ..train import fit
from . import perturb as P
from .records import REQUIRED, command_line, provenance, write_record
from .reproduce import _read, load_records

__all__ = ["LABELS", "TRAINED", "EULER1", "SCALES", "study_recipe", "study_plan", "run_robust", "record_path",
           "load_robust_records", "convergence", "reproduce_command"]

RECORD_FORMAT = 1
EXPERIMENT = "robust"
#: Evaluated models, in the order a seed runs them: label -> (trained network, solver at test time).
EULER1 = {"method": "euler", "steps": 1}
LABELS: dict[str, tuple[str, dict | None]] = {"unet": ("unet", None), "resunet": ("resunet", None),
                                              "nodes-unet-euler1": ("nodes-unet", EULER1),
                                              "nodes-unet": ("nodes-unet", None)}
TRAINED = ("unet", "resunet", "nodes-unet")
#: Transfer attacks: target label -> the labels whose white-box perturbations it is also attacked with.
TRANSFERS = {"nodes-unet-euler1": ("unet",), "nodes-unet": ("unet", "nodes-unet-euler1")}
SCALES = ("study", "smoke")
DATA_SEED = 0          # the patches cut from the photographs: the same for every seed and model
FIELDS = ("clean", "perturbations", "adversarial", "allidb2", "history")


def study_recipe(scale: str) -> Recipe:
    """The training recipe of a scale.

    * ``study`` — width 8 (a quarter of the paper's 32), BCCD photographs at half size (cells of the
      size the networks are built for), 2 random 128 px patches per training photograph (410 a
      epoch), all 87 validation photographs (one patch each) to pick the best epoch, batch 8,
      Adam lr 2e-3 with a cosine schedule to 0 over 8 epochs, from scratch (no synthetic
      pretraining: nothing that one model could use better than another), no augmentation (the
      robustness measured is the networks' own, not an augmentation's). Test: all 72 photographs.
    * ``smoke`` — the 16-photograph sample at quarter size, width 4, one epoch: seconds, for tests.
    """
    if scale == "study":
        return REAL_PRESETS["quick"].replace(name="robust-study", **{
            "data.patch": 128, "data.crops_per_image": 2, "data.augment": 1, "data.scale": 0.5, "data.stain": 0.0,
            "model.width": 8, "train.epochs": 8, "train.batch_size": 8, "train.lr": 2e-3,
            "train.schedule": "cosine", "real.val_images": None, "real.eval_images": None})
    if scale == "smoke":
        return REAL_PRESETS["smoke"].replace(name="robust-smoke", **{
            "data.patch": 64, "data.crops_per_image": 1, "data.augment": 1, "data.scale": 0.25, "data.stain": 0.0,
            "model.width": 4, "train.epochs": 1, "train.batch_size": 4, "real.val_images": None,
            "real.eval_images": None})
    raise BloodsegError(f"unknown robust scale {scale!r}: choose one of {', '.join(SCALES)}")


def study_plan(scale: str) -> dict:
    """What a unit measures besides training: which test photographs get the perturbations
    (``perturb_every``: every k-th) and the attacks (``adv_every``), the strengths of each family,
    the attack budgets, PGD's steps, how many ALL-IDB2 crops (None: the whole report half) and
    which training photographs (every ``rules_every``-th) measure the product's colour and scale rules."""
    levels = {name: list(f.levels) for name, f in P.FAMILIES.items()}
    if scale == "smoke":
        return dict(perturb_every=2, adv_every=4, levels={k: v[:2] for k, v in levels.items()},
                    eps=[2 / 255], pgd_steps=2, allidb2=2, rules_every=8)
    if scale == "study":
        return dict(perturb_every=3, adv_every=9, levels=levels, eps=list(P.EPSILONS), pgd_steps=10, allidb2=None,
                    rules_every=4)
    raise BloodsegError(f"unknown robust scale {scale!r}: choose one of {', '.join(SCALES)}")


def record_path(out, scale: str, label: str, seed: int) -> Path:
    return Path(out) / EXPERIMENT / scale / f"{label}-seed{seed}.json"


def _same_recipe(stored, recipe: Recipe) -> bool:
    """``stored`` (a record's or fingerprint's recipe dict) is ``recipe``; a field added to the recipe
    since it was stored counts as its default, so a new option does not void finished units."""
    try:
        return Recipe.from_dict(stored).to_dict() == recipe.to_dict()
    except Exception:       # noqa: BLE001 - an unreadable recipe is simply not this one
        return False


def _complete(rec, recipe: Recipe, plan: dict, seed: int) -> bool:
    return (isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT and rec.get("seed") == seed
            and all(k in rec for k in (*REQUIRED, *FIELDS)) and _same_recipe(rec.get("recipe"), recipe)
            and rec.get("plan") == json.loads(json.dumps(plan)))


def convergence(history: list[dict], tail: float = 1 / 3, tol: float = 0.02) -> dict:
    """The relative drop of the best validation loss in the last third of the epochs (``gain``);
    ``converged`` when below 2 % (as :func:`bloodseg.paper.reproduce.convergence`)."""
    from .reproduce import convergence as conv
    return conv(history, tail, tol)


# ----------------------------------------------------------------------------- training

def _trained(model: str, recipe: Recipe, seed: int, data: dict, work: Path) -> tuple[torch.nn.Module, list]:
    """The best epoch of ``model`` trained on ``seed`` in ``work`` (trained, resumed, or read back)."""
    fp = json.loads(json.dumps(dict(format=RECORD_FORMAT, model=model, seed=seed, recipe=recipe.to_dict())))
    old = _read(work / "fingerprint.json")
    same = (isinstance(old, dict) and {k: old.get(k) for k in ("format", "model", "seed")} ==
            {k: fp[k] for k in ("format", "model", "seed")} and _same_recipe(old.get("recipe"), recipe))
    if not same and work.exists():
        shutil.rmtree(work)                       # other settings: start over
    work.mkdir(parents=True, exist_ok=True)
    (work / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    torch.manual_seed(seed)
    net = build_variant(model, width=recipe.model.width, **recipe.model.options)
    r = recipe.replace(**{"model.name": model, "train.seed": seed, "train.progress": False})
    history = fit(net, data["train"], data["val"], work, r, device="cpu", resume=True)
    return load_model(work / "best.pt", device="cpu"), history


def segmenter(label: str, recipe: Recipe, seed: int, data: dict, work: Path) -> tuple[Segmenter, list]:
    """``(Segmenter, history)`` of ``label`` (:data:`LABELS`) for ``seed``: its network at the fixed
    ``data.scale``, argmax, no cleanup and every white cell kept (``crop_cells="all"``: the study's
    half-size photographs are smaller than a whole field, and it measures networks, not the crop
    rule), with the label's solver, tiles of 1024 px (the network sees every photograph whole,
    twice-magnified ones included)."""
    model, solver = LABELS[label]
    net, history = _trained(model, recipe, seed, data, work / f"seed{seed}" / model)
    return Segmenter(net, input_scale=recipe.data.scale, solver=solver, tile=1024, crop_cells="all"), history


def prepare(scale, data="bccd") -> dict:
    """The training patches, validation patches and test photographs of ``scale`` (a name of
    :data:`SCALES` or a recipe; every seed's): BCCD (``data``: ``"bccd"``, or a BCCD folder)."""
    recipe = scale if isinstance(scale, Recipe) else study_recipe(scale)
    splits = training_splits(data, recipe, DATA_SEED)
    return dict(train=SegmentationDataset(splits["train"]), val=SegmentationDataset(splits["val"]),
                test=splits["test"], n_train=len(splits["train"]), n_val=len(splits["val"]))


# ----------------------------------------------------------------------------- scoring

def _counts(pred: np.ndarray, truth: np.ndarray) -> list[int]:
    pw, tw = pred == WHITE_CELL, truth == WHITE_CELL
    return [int((pw & tw).sum()), int((pw & ~tw).sum()), int((~pw & tw).sum())]


def _nfe(seg) -> float:
    return float(sum(f for f, _ in nfe_report(seg.model).values()))


def check_path(seg, image) -> None:
    """The study scores through :func:`bloodseg.paper.perturb.predict_mask` (the Segmenter's path
    without its slow whole-photograph argmax); refuse to go on if it differs from ``seg.segment``."""
    if seg.postprocess or seg.tta or seg.scale != "fixed" or not np.array_equal(
            P.predict_mask(seg, image), seg.segment(image).mask):
        raise BloodsegError("the study's scoring path differs from Segmenter.segment for this segmenter")


def score_clean(seg, photos) -> dict:
    """White-cell counts and 3-class confusion matrices of every photograph, time and NFE per photograph."""
    white, cms, nfe, t0 = [], [], [], time.perf_counter()
    for s in photos:
        mask = P.predict_mask(seg, s.image)
        nfe.append(_nfe(seg))
        white.append(_counts(mask, s.mask))
        cms.append(confusion_matrix(mask, s.mask, 3).tolist())
    return dict(photos=[s.name for s in photos], white=white, cm=cms,
                seconds_per_photo=(time.perf_counter() - t0) / max(1, len(photos)),
                nfe_forward_per_photo=float(np.mean(nfe)) if nfe else 0.0)


def score_perturbations(seg, photos, levels: dict, clean: list) -> dict:
    """Per family and strength, the white-cell counts of every photograph (strength 0: ``clean``)."""
    out = {}
    for fam, lv in levels.items():
        counts = []
        for strength in lv:
            if strength == 0:
                counts.append(clean)
                continue
            row = []
            for i, s in enumerate(photos):
                image, mask = P.perturb(fam, strength, s.image, s.mask, seed=i)
                row.append(_counts(P.predict_mask(seg, image), mask))
            counts.append(row)
        out[fam] = dict(levels=list(lv), counts=counts)
    return out


def _eps_key(eps: float) -> str:
    return f"{round(eps * 255, 3):g}/255"


def _delta_file(work: Path, seed: int, label: str) -> Path:
    return work / f"seed{seed}" / "attacks" / f"{label}.pt"


def white_box(seg, photos, eps_list, steps: int, seed: int) -> tuple[dict, dict, dict]:
    """``(counts, deltas, losses)``: FGSM and PGD at every ``eps`` on every photograph: white-cell
    counts ``{attack: {eps: [[tp, fp, fn] per photo]}}`` (and ``"clean"``), the perturbations
    ``{photo: {"fgsm@eps": tensor}}`` and PGD's losses per step ``{eps: [[...] per photo]}``."""
    P.use_solver(seg)
    counts = {"clean": [], "fgsm": {}, "pgd": {}}
    deltas, losses = {}, {}
    for i, s in enumerate(photos):
        x, hw = P.network_input(seg, s.image)
        target = P.white_target(s.mask, hw, tuple(x.shape[-2:]))
        counts["clean"].append(_counts(P.mask_from_input(seg.model, x, hw, s.mask.shape), s.mask))
        deltas[s.name] = {}
        for eps in eps_list:
            k = _eps_key(eps)
            d_f = P.fgsm(seg.model, x, target, eps)
            d_p, loss = P.pgd(seg.model, x, target, eps, steps, seed=1000 * seed + i)
            for name, d in (("fgsm", d_f), ("pgd", d_p)):
                counts[name].setdefault(k, []).append(_counts(P.mask_from_input(seg.model, x + d, hw, s.mask.shape),
                                                              s.mask))
                deltas[s.name][f"{name}@{k}"] = d.half()
            losses.setdefault(k, []).append(loss)
    return counts, deltas, losses


def transferred(seg, photos, deltas: dict) -> dict:
    """White-cell counts of ``seg`` on ``photos`` perturbed by another network's ``deltas``:
    ``{attack: {eps: [[tp, fp, fn] per photo]}}``."""
    P.use_solver(seg)
    out = {}
    for s in photos:
        x, hw = P.network_input(seg, s.image)
        for key, d in deltas[s.name].items():
            name, eps = key.split("@")
            pert = (x + d.float()).clamp(0, 1)
            out.setdefault(name, {}).setdefault(eps, []).append(
                _counts(P.mask_from_input(seg.model, pert, hw, s.mask.shape), s.mask))
    return out


def _source_deltas(source: str, recipe, plan, seed, data, work, photos) -> dict:
    """The white-box perturbations of ``source`` on ``photos`` (from its unit's file, else made now)."""
    path = _delta_file(work, seed, source)
    if path.is_file():
        d = torch.load(path, weights_only=True)
        if set(d) == {s.name for s in photos}:
            return d
    seg, _ = segmenter(source, recipe, seed, data, work)
    _, deltas, _ = white_box(seg, photos, plan["eps"], plan["pgd_steps"], seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(deltas, path)
    return deltas


def product_rules(scale_recipe: Recipe, work: Path, every: int = 1) -> dict:
    """The two model-independent settings of the product (chapter 8), measured once on every
    ``every``-th BCCD training photograph: their background colour and red-cell diameter (network
    pixels; :func:`bloodseg.shipping.measure_photographs`, ~2 s a photograph)."""
    from ..shipping import measure_photographs
    cache = work / "product_rules.json"
    prepared = str(prepared_photographs("bccd"))
    old = _read(cache)
    if isinstance(old, dict) and old.get("prepared") == prepared and old.get("input_scale") == scale_recipe.data.scale \
            and old.get("every") == every:
        return old
    photos = load_folder(Path(prepared) / "train")[::every]
    m = measure_photographs([p.image for p in photos], scale_recipe.data.scale)
    out = dict(prepared=prepared, input_scale=scale_recipe.data.scale, every=every, background=m["background"],
               red_cell_diameter=m["red_cell_diameter"], n_photographs=m["n_photographs"])
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def score_allidb2(seg, plan: dict, rules: dict) -> dict:
    """White-cell counts on ALL-IDB2's report half: the network at its fixed scale, and with the
    product's colour and scale rules (``rules``; the crop-cell rule, adopted after the study's records
    were made, stays off so that the records can be re-made); ``{"available": False}`` without the data."""
    from ..domains import allidb2_dir, load_allidb2
    if allidb2_dir() is None:
        return dict(available=False, why="ALL-IDB2 not found ($BLOODSEG_ALLIDB2 or ../shared/data/allidb2)")
    crops = load_allidb2("even", limit=plan["allidb2"])
    product = seg.replace(background=tuple(rules["background"]), red_cell_diameter=rules["red_cell_diameter"],
                          colour="background", scale="auto")
    out = dict(available=True, half="even", photos=[c.name for c in crops], fixed=[], product=[], product_factors=[])
    for c in crops:
        out["fixed"].append(_counts(seg.segment(c.image).mask, c.mask))
        p = product.segment(c.image)
        out["product"].append(_counts(p.mask, c.mask))
        out["product_factors"].append(round(float(p.factor), 4))
    return out


def measure_unit(label: str, recipe: Recipe, plan: dict, seed: int, data: dict, work: Path,
                 rules: dict | None) -> dict:
    """Everything one unit records (see the module's docstring), without the provenance."""
    seg, history = segmenter(label, recipe, seed, data, work)
    test = data["test"]
    check_path(seg, test[0].image)
    t0 = time.perf_counter()
    clean = score_clean(seg, test)
    by_name = dict(zip(clean["photos"], clean["white"]))
    pert_photos = test[::plan["perturb_every"]]
    pert = dict(photos=[s.name for s in pert_photos],
                families=score_perturbations(seg, pert_photos, plan["levels"], [by_name[s.name] for s in pert_photos]))
    t1 = time.perf_counter()
    adv_photos = test[::plan["adv_every"]]
    counts, deltas, losses = white_box(seg, adv_photos, plan["eps"], plan["pgd_steps"], seed)
    path = _delta_file(work, seed, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(deltas, path)
    for source in TRANSFERS.get(label, ()):
        src = _source_deltas(source, recipe, plan, seed, data, work, adv_photos)
        for name, by_eps in transferred(seg, adv_photos, src).items():
            counts[f"{source}/{name}"] = by_eps
    t2 = time.perf_counter()
    allidb2 = score_allidb2(seg, plan, rules) if rules is not None else dict(available=False, why="not scored")
    t3 = time.perf_counter()
    return dict(clean=clean, perturbations=pert,
                adversarial=dict(photos=[s.name for s in adv_photos], eps=[_eps_key(e) for e in plan["eps"]],
                                 pgd_steps=plan["pgd_steps"], counts=counts, pgd_losses=losses),
                allidb2=allidb2, history=history,
                best_epoch=min(history, key=lambda r: r["val_loss"])["epoch"] if history else None,
                train_s=sum(r["time_s"] for r in history), params=sum(p.numel() for p in seg.model.parameters()),
                ode_blocks=len(ode_blocks(seg.model)), solver=seg.solver,
                seconds=dict(clean_and_perturbations=round(t1 - t0, 1), attacks=round(t2 - t1, 1),
                             allidb2=round(t3 - t2, 1)))


# ----------------------------------------------------------------------------- the study

def run_robust(scale: str = "study", seeds: int = 5, max_minutes: float = 0.0, out="book/results", work=None,
               command: str | None = None, log=print, models=None) -> dict:
    """Run every missing (model, seed) unit; ``dict(records, ran, skipped, not_started)``.

    ``models``: only these labels of :data:`LABELS`. ``max_minutes``: start no unit whose expected
    wall time (the mean of the finished units of its label, else of any) would pass the limit."""
    if not (isinstance(seeds, int) and seeds >= 1):
        raise BloodsegError(f"seeds must be a whole number >= 1; got {seeds!r}")
    labels = list(LABELS) if models is None else [m.strip() for m in (models.split(",") if isinstance(models, str)
                                                                      else models)]
    unknown = [m for m in labels if m not in LABELS]
    if unknown:
        raise BloodsegError(f"robust has no model {', '.join(unknown)}; its models are {', '.join(LABELS)}")
    recipe, plan = study_recipe(scale), study_plan(scale)
    work = Path(work) if work is not None else Path("runs") / "robust" / scale
    command = command or command_line()
    units = [(k, lab) for k in range(seeds) for lab in LABELS if lab in labels]
    started, ran, skipped, not_started, walls = time.perf_counter(), [], [], [], {}
    data = rules = None
    for seed, label in units:
        rec = _read(record_path(out, scale, label, seed))
        if _complete(rec, recipe, plan, seed):
            walls.setdefault(label, []).append(rec["wall_s"])
    for n, (seed, label) in enumerate(units):
        path = record_path(out, scale, label, seed)
        if _complete(_read(path), recipe, plan, seed):
            skipped.append(path)
            continue
        if max_minutes:
            known = walls.get(label) or [w for ws in walls.values() for w in ws]
            expected = float(np.mean(known)) if known else 0.0
            if time.perf_counter() - started + expected > 60 * max_minutes:
                not_started = [record_path(out, scale, lab, k) for k, lab in units[n:]
                               if not _complete(_read(record_path(out, scale, lab, k)), recipe, plan, k)]
                log(f"robust ({scale}): max_minutes={max_minutes:g} reached; {len(not_started)} unit(s) not "
                    "started; run the same command again to continue")
                break
        if data is None:
            data = prepare(scale)
            rules = product_rules(recipe, work, plan["rules_every"])
            log(f"robust ({scale}): {data['n_train']} train / {data['n_val']} val patches, "
                f"{len(data['test'])} test photographs")
        t0, c0 = time.perf_counter(), time.process_time()
        result = measure_unit(label, recipe, plan, seed, data, work, rules)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        model, solver = LABELS[label]
        record = dict(format=RECORD_FORMAT, experiment=EXPERIMENT, scale=scale, label=label, model=model,
                      seed=seed, recipe=recipe.to_dict(), plan=plan, data=dict(n_train=data["n_train"],
                                                                               n_val=data["n_val"]),
                      **{**provenance(command, t0, threads_note=f"{torch.get_num_threads()} torch thread(s)"),
                         "wall_s": round(wall, 1)}, cpu_s=round(cpu, 1), **result)
        record["solver"] = solver
        write_record(record, path)
        walls.setdefault(label, []).append(wall)
        ran.append(path)
        g = record["clean"]
        tp, fp, fn = np.sum(g["white"], 0)
        log(f"{label} seed {seed}: clean white IoU {tp / max(1, tp + fp + fn):.4f}, {wall:.0f} s "
            f"({cpu:.0f} s CPU); wrote {path}")
    return dict(records=load_robust_records(Path(out) / EXPERIMENT / scale), ran=ran, skipped=skipped,
                not_started=not_started)


def load_robust_records(folder) -> list[dict]:
    """Every record in ``folder`` (sorted by name); a record without provenance is an error
    (:func:`bloodseg.paper.reproduce.load_records`)."""
    return load_records(folder, rerun="bloodseg reproduce robust")


def reproduce_command(args) -> int:
    """``bloodseg reproduce robust``: :func:`run_robust` with the ``reproduce`` subcommand's arguments
    (``--scale study`` or ``smoke``, ``--seeds``, ``--models``, ``--max-minutes``, ``--out``)."""
    if args.scale not in SCALES:
        raise BloodsegError(f"reproduce robust has the scales {', '.join(SCALES)}; got --scale {args.scale}")
    run_robust(args.scale, args.seeds, args.max_minutes, args.out, None,
               f"OMP_NUM_THREADS={torch.get_num_threads()} bloodseg " + shlex.join(sys.argv[1:]),
               log=lambda m: print(m, flush=True), models=args.models)
    return 0


if __name__ == "__main__":      # the records' command `python -m bloodseg.paper.robust ...` = `bloodseg reproduce robust ...`
    from ..cli import main
    torch.set_num_threads(1)
    sys.argv = ["bloodseg", "reproduce", "robust", *sys.argv[1:]]     # the command the records name
    raise SystemExit(main(sys.argv[1:]))
