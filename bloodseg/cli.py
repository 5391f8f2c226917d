"""The ``bloodseg`` command. Each subcommand is a thin layer over a library function.

Errors a user can cause print one clear line (no traceback) and exit with status 2. ``predict``
and ``count`` report an image they cannot read or predict, skip it, do the others, and exit with
status 1 ("N written, K failed" on stderr).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .bccd import prepare_bccd, prepare_cached
from .calibrate import check_solver, solver_label, white_iou_score
from .count import write_counts_csv
from .datasets import SegmentationDataset, training_splits
from .distributed import cleanup_distributed, setup_distributed
from .download import download_bccd
from .errors import BloodsegError
from .export import export_onnx
from .io import load_folder
from .models import MODEL_NAMES, build_model
from .ode import FIXED_GRID_METHODS, check_regularise, set_tolerance
from .recipe import Recipe, get_recipe
from .segmenter import Segmenter, shipped_checkpoint
from .synthetic import write_synthetic
from .train import evaluate, fit

# bloodseg.paper (training recipes of the BCCD checkpoint, the bench) is imported inside the
# commands that use it: it pulls in pandas and the plotting code, which `predict` and `count`
# do not need at start-up. The core never imports bloodseg.paper.


def _given(value, default):
    """``value`` unless the option was left out (None): 0 or a negative number is kept, so that
    validation reports it instead of silently using the profile's value."""
    return default if value is None else value


def _dump(obj, path: str | None) -> None:
    text = json.dumps(obj, indent=1, default=float)
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        except OSError as exc:
            raise BloodsegError(f"cannot write {path}: {exc.strerror or exc}. Choose a file in a "
                                "folder you can write to.") from None
    print(text)


# --------------------------------------------------------------------------- subcommands

def cmd_synth(args) -> int:
    size = tuple(args.size) if args.size else (519, 775)
    t0 = time.perf_counter()
    pairs = write_synthetic(args.out, args.n, seed=args.seed, size=size)
    print(f"wrote {len(pairs)} image/mask pairs ({size[1]}x{size[0]}) to {args.out}/images and "
          f"{args.out}/masks in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_download_bccd(args) -> int:
    folder = download_bccd(args.out, mirror=args.mirror, progress=True)
    print(f"BCCD in {folder} (every file checked against its SHA-256); use it with "
          f"`export BLOODSEG_BCCD={Path(folder).resolve()}` or --src {folder}")
    return 0


def cmd_prepare_bccd(args) -> int:
    report = prepare_bccd(args.src, args.out, limit=args.limit)
    _dump(report, None)
    return 0


def _ode_reg_arg(text: str) -> dict:
    """``kinetic=0.01,jacobian=0.01`` (either term optional) as ``{"kinetic": 0.01, "jacobian": 0.01}``."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        try:
            weights[key.strip().lower()] = float(value) if eq else None
        except ValueError:
            weights[key.strip().lower()] = value.strip()
    if not weights or any(not isinstance(w, float) for w in weights.values()):
        raise BloodsegError(f"--ode-reg {text!r}: give NAME=WEIGHT pairs separated by commas, e.g. "
                            "kinetic=0.01,jacobian=0.01 (weights are numbers >= 0)")
    return check_regularise(weights)


def recipe_from_args(args) -> Recipe:
    """The one place where command-line flags become a :class:`~bloodseg.recipe.Recipe`: the
    profile's preset with every flag the user gave applied (0 or a negative number is kept, so
    that validation reports it)."""
    base = get_recipe(getattr(args, "profile", None))
    if args.width is not None and args.width < 1:
        raise BloodsegError(f"--width must be a positive number of channels; got {args.width}")
    options = {}
    if args.rtol is not None:
        options["rtol"] = args.rtol
    if args.adjoint:
        options["adjoint"] = True
    r = base.replace(**{
        "model.name": args.model, "model.width": _given(args.width, base.model.width), "model.options": options,
        "train.epochs": _given(args.epochs, base.train.epochs),
        "train.batch_size": _given(args.batch_size, base.train.batch_size),
        "train.lr": _given(args.lr, base.train.lr), "train.optimizer": args.optimizer,
        "train.weight_decay": args.weight_decay, "train.seed": args.seed,
        "train.checkpoint_every": args.checkpoint_every, "train.bf16": args.bf16,
        "train.scale_lr": args.scale_lr, "train.sync_bn": not args.no_sync_bn,
        "train.schedule": args.schedule, "train.max_minutes": args.max_minutes,
        "train.ode_reg": _ode_reg_arg(args.ode_reg) if args.ode_reg else {}})
    r.train.validate()  # before any data is built: a bad number fails at once
    return r


def cmd_train(args) -> int:
    recipe = recipe_from_args(args)
    info = setup_distributed()
    torch.manual_seed(args.seed)
    model = build_model(recipe.model.name, width=recipe.model.width, **recipe.model.options)
    splits = training_splits(args.data, recipe, seed=args.seed)
    cfg = recipe.train
    if info.is_main:
        lr = cfg.lr * (info.world_size if cfg.scale_lr else 1)
        print(f"profile {recipe.name}: {len(splits['train'])} train / {len(splits['val'])} val / "
              f"{len(splits['test'])} test patches, model {args.model} width {recipe.model.width} "
              f"{recipe.model.options}, world size {info.world_size}, batch {cfg.batch_size} per process x "
              f"{info.world_size} = {cfg.batch_size * info.world_size}, lr {lr:g}", flush=True)
    history = fit(model, SegmentationDataset(splits["train"]), SegmentationDataset(splits["val"]),
                  args.out, recipe, resume=not args.restart,
                  on_epoch=lambda r: print(json.dumps(r), flush=True))
    if info.is_main and splits["test"]:
        best = Segmenter.load(Path(args.out) / "best.pt")
        metrics = evaluate(best.model, SegmentationDataset(splits["test"]))
        metrics["epochs_trained"] = len(history)
        _dump(metrics, str(Path(args.out) / "metrics.json"))
    cleanup_distributed()
    return 0


def cmd_train_bccd(args) -> int:
    import dataclasses

    from .paper.bccd import CPU_PLAN, train_bccd_checkpoint
    fields = {"width": "width", "scale": "scale", "patch": "patch", "epochs": "epochs", "batch_size": "batch_size",
              "lr": "lr", "finetune_lr": "finetune_lr", "pretrain_smears": "pretrain_smears",
              "pretrain_epochs": "pretrain_epochs", "crops": "crops_per_image", "augment": "augment"}
    changes = {}
    for arg, field in fields.items():
        value = getattr(args, arg)
        if value is None:
            continue
        if not value > 0:
            raise BloodsegError(f"--{arg.replace('_', '-')} must be positive; got {value}")
        changes[field] = value
    if args.stain is not None:
        if not 0 <= args.stain <= 1:
            raise BloodsegError(f"--stain must be a strength from 0 (off) to 1; got {args.stain}")
        changes["stain"] = args.stain
    if args.val_images is not None:
        if args.val_images < 0:
            raise BloodsegError(f"--val-images must be 0 (all) or positive; got {args.val_images}")
        changes["val_images"] = args.val_images or None
    plan = dataclasses.replace(CPU_PLAN, name="cli", **changes)
    options = {"schedule": args.schedule}
    if args.max_minutes:
        options["max_minutes"] = args.max_minutes
    metrics = train_bccd_checkpoint(args.out, model=args.model, plan=plan, src=args.src, seed=args.seed,
                                    pretrain=not args.no_pretrain, train_options=options, init=args.init,
                                    log=lambda m: print(m, flush=True))
    _dump(metrics, None)
    return 0


def cmd_tune_cleanup(args) -> int:
    from .paper.bccd import tune_checkpoint_cleanup
    result = tune_checkpoint_cleanup(args.ckpt, src=args.src, out=args.out, work=args.work,
                                     log=lambda m: print(m, flush=True))
    print(f"wrote {result['checkpoint']} with postprocess {result['tuning']['chosen']}")
    return 0


def _segmenter(args) -> Segmenter:
    # --exact, and --rtol (a tolerance of the trained solver), use the trained solver even when a
    # calibrated one is stored in the checkpoint
    exact = bool(getattr(args, "exact", False)) or getattr(args, "rtol", None) is not None
    seg = Segmenter.load(args.ckpt, exact=exact,
                         **({"rtol": args.rtol} if getattr(args, "rtol", None) is not None else {}))
    if getattr(args, "rtol", None) is not None:
        set_tolerance(seg.model, args.rtol)   # checks the value even for a network without ODE-blocks
    if len(seg.class_names) != 3 or seg.model.options.get("classes", 3) != 3:
        raise BloodsegError(f"{args.ckpt} predicts {seg.model.options.get('classes')} classes, but 3 are "
                            "needed here (masks hold 0/1/2). Use a checkpoint trained with the same classes.")
    if getattr(args, "tile", None) is not None:
        seg = seg.replace(tile=args.tile, overlap=args.overlap)
    return seg


def cmd_calibrate(args) -> int:
    if (args.data is None) == (args.bccd_src is None):
        raise BloodsegError("give exactly one of --data DIR (images/ and masks/) and --bccd-src DIR "
                            "(raw BCCD: its validation photographs are used, scored by gold white-cell IoU)")
    seg = Segmenter.load(args.ckpt, exact=True)
    score, what = None, "MIoU (one confusion matrix over all images)"
    if args.data is not None:
        samples = load_folder(args.data)
    else:
        prepare_cached(args.bccd_src, Path(args.work) / "bccd")
        samples = load_folder(Path(args.work) / "bccd" / "val")
        score, what = white_iou_score, "gold white-cell IoU over all images"
    out = Path(args.out) if args.out else Path(Path(args.ckpt).stem + "-calibrated.pt")
    print(f"calibrating on {len(samples)} validation images ({what}), max drop {args.max_drop} pp", flush=True)
    new = seg.calibrate(samples, max_drop_pp=args.max_drop, score=score,
                        log=lambda m: print(m, flush=True))
    table = new.metrics["calibration"]
    print(f"{'solver':>18} {'score':>8} {'drop pp':>8} {'s/image':>8}  NFE per block")
    for r in table["rows"]:
        sc = "failed" if r["score"] is None else f"{r['score']:.4f}"
        dp = "" if r["drop_pp"] is None else f"{r['drop_pp']:+.2f}"
        print(f"{r['label']:>18} {sc:>8} {dp:>8} {r['seconds_per_image']:8.4f}  "
              f"{' '.join(f'{v:g}' for v in r['nfe_per_block'].values())}")
    new.save(out)   # atomic; the input is overwritten only when --out names it
    print(f"chosen: {solver_label(table['chosen'])}; wrote {out}")
    return 0


def _solver_arg(text: str) -> dict:
    """``euler:1``, ``rk4:2`` (a fixed-grid method:steps) or ``dopri5:1e-3`` (an adaptive method:rtol)."""
    method, _, value = text.strip().lower().partition(":")
    spec = {"method": method}
    if value:
        fixed = method in FIXED_GRID_METHODS
        try:
            spec["steps" if fixed else "rtol"] = int(value) if fixed else float(value)
        except ValueError:
            raise BloodsegError(f"--solver {text!r}: give METHOD:STEPS for a fixed-grid method (euler:1, "
                                "rk4:2) or METHOD:RTOL for an adaptive one (dopri5:1e-3)") from None
    return check_solver(spec)


def cmd_export(args) -> int:
    seg = Segmenter.load(args.ckpt, device="cpu")
    solver = _solver_arg(args.solver) if args.solver else None
    out = export_onnx(seg, args.onnx, solver=solver)
    label = solver_label(solver if solver is not None else seg.solver)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, ODE solver {label}); run it with "
          "bloodseg.export.load_onnx(path).predict(image)")
    return 0


def cmd_evaluate(args) -> int:
    seg = _segmenter(args)
    splits = training_splits(args.data, get_recipe(getattr(args, "profile", None)), seed=args.seed)
    metrics = evaluate(seg.model, SegmentationDataset(splits[args.split]), per_image=args.per_image)
    metrics.update({"checkpoint": str(args.ckpt), "data": str(args.data), "split": args.split})
    _dump(metrics, args.json)
    return 0


def _batch_options(args) -> dict:
    if args.pixel_size_um is not None and args.instances is None:
        raise BloodsegError("--pixel-size-um gives the cells' areas in µm² in the --instances tables; "
                            "add --instances DIR")
    return dict(skip_existing=args.skip_existing, progress=True if args.progress else None,
                instances=args.instances, pixel_size_um=args.pixel_size_um,
                save_probabilities=args.save_probabilities)


def _scale_arg(text: str):
    """``--scale``: "auto" or a positive number (a fixed resize factor)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"--scale takes 'auto' or a positive number; got {text!r}")
    return value


def _batch_segmenter(args) -> Segmenter:
    seg = _segmenter(args)
    scale = getattr(args, "scale", None)
    if getattr(args, "exact", False):   # exactly the trained pipeline: the stored fixed input_scale too
        if scale == "auto":
            raise BloodsegError("--exact runs the trained pipeline at its fixed input_scale; drop --scale auto")
        seg = seg.replace(scale="fixed")
    if scale == "auto":
        seg = seg.replace(scale="auto")
    elif scale is not None:
        seg = seg.replace(scale="fixed", input_scale=scale)
    return seg.replace(tta=True) if args.tta else seg


def _summary(command: str, rows, done: str) -> int:
    """Print the "N written, K failed" line on stderr; exit status 1 when an image failed."""
    failed = [r for r in rows if "error" in r]
    skipped = sum(1 for r in rows if r.get("skipped"))
    line = f"bloodseg {command}: {len(rows) - len(failed) - skipped} {done}, {len(failed)} failed"
    if skipped:
        line += f", {skipped} skipped (their outputs were already there)"
    print(line, file=sys.stderr)
    for r in failed:
        print(f"  failed: {r['image']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_predict(args) -> int:
    rows = _batch_segmenter(args).predict_files(args.images, args.out, overlays=not args.no_overlay,
                                                postprocess=False if args.raw else None, **_batch_options(args))
    for r in rows:
        if "error" not in r:
            print(f"{r['image']} -> {r['mask']}" + (" (kept)" if r.get("skipped") else ""))
    return _summary("predict", rows, "written")


def cmd_reproduce(args) -> int:
    from .paper.reproduce import reproduce
    reproduce(args.experiment, scale=args.scale, seeds=args.seeds, max_minutes=args.max_minutes,
              out=args.out, progress=True if args.progress else None)
    return 0


#: ``bloodseg record WHAT``: the chapters' records beyond ``reproduce``, and the paper module that writes each.
RECORDS = {"bccd-training": "bccd", "bccd-shipped": "bccd", "ddp-throughput": "ddp_scaling", "stain": "robustness",
           "cheap-bench": "cheap", "cheap-blocks": "cheap", "cheap-solvers": "cheap"}


def cmd_record(args) -> int:
    import importlib
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 bloodseg " + shlex.join(sys.argv[1:])
    importlib.import_module(f".paper.{RECORDS[args.what]}", __package__).run_record(args, command)
    return 0


def cmd_bench(args) -> int:
    from .paper.bench import format_bench, run_bench
    result = run_bench(models=args.models, width=args.width, size=args.size, n_images=args.n_images,
                       batch=args.batch, device=args.device, ckpt_dir=args.ckpt_dir,
                       train=not args.no_train, adjoint=not args.no_adjoint, repeats=args.repeats,
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_bench(result))
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
        except OSError as exc:
            raise BloodsegError(f"cannot write {args.json}: {exc.strerror or exc}. Choose a file in a "
                                "folder you can write to.") from None
        print(f"wrote {args.json}")
    return 0


def cmd_count(args) -> int:

    if args.ckpt is None:
        args.ckpt = shipped_checkpoint()
    if args.skip_existing and args.masks is None:
        raise BloodsegError("--skip-existing needs --masks DIR: the counts are made again from the saved masks")
    rows = _batch_segmenter(args).count_files(args.images, red_radius=args.red_radius, masks_out=args.masks,
                                              postprocess=False if args.raw else None, **_batch_options(args))
    counted = [r for r in rows if "error" not in r]
    print("image,n_white,n_red")
    for r in counted:
        print(f"{r['image']},{r['n_white']},{r['n_red']}")
    if args.out:
        print(f"wrote {write_counts_csv(counted, args.out)}")
    return _summary("count", rows, "counted")


def cmd_ddp_bench(args) -> int:
    from .paper.ddp_scaling import bench_command
    bench_command(args.model, args.width, args.patch, args.batch_size, args.steps, args.warmup,
                  args.profile, args.bf16, json_path=args.json)
    return 0


def cmd_ddp_gradcheck(args) -> int:
    from .paper.ddp_scaling import gradcheck_command
    gradcheck_command(args.configs, args.width, args.size, args.batch, args.out)
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bloodseg", description=(
        "Blood smear segmentation (background / white cell / red cell) with U-Nets and neural "
        "ODE blocks, after Li et al. 2021 (NODEs-UNet)."))
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("synth", help="write synthetic smears with exact masks")
    s.add_argument("--out", required=True, help="folder; gets images/ and masks/")
    s.add_argument("-n", type=int, default=10, help="number of smears (default 10)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default 519 775")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("download-bccd", help="fetch the full BCCD (367 photographs) with checksums")
    s.add_argument("--out", required=True, help="folder for the data (files already there and intact are kept)")
    s.add_argument("--mirror", default=None,
                   help="base URL or local folder with the same layout (default: the pinned upstream "
                        "repositories, or $BLOODSEG_BCCD_MIRROR)")
    s.set_defaults(func=cmd_download_bccd)

    s = sub.add_parser("prepare-bccd", help="turn the BCCD dataset into 3-class masks per split")
    s.add_argument("--src", required=True, help="BCCD folder (images/, wbc_masks/, annotations/, splits/)")
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    s.set_defaults(func=cmd_prepare_bccd)

    s = sub.add_parser("train", help="train a model; writes best.pt, last.pt, history.json, metrics.json",
                       epilog="Several processes (GPUs, machines): torchrun --nproc-per-node=N -m "
                              "bloodseg.cli train ... (or torchrun ... --no-python bloodseg train ...); "
                              "--batch-size is per process.")
    s.add_argument("--model", required=True, choices=MODEL_NAMES)
    s.add_argument("--data", default="synthetic",
                   help="'synthetic' (default), a folder with images/ + masks/, a prepare-bccd "
                        "output (train/ val/ test/), or a folder of LabelMe .json files")
    s.add_argument("--out", required=True, help="run folder (resumes if it holds last.pt)")
    s.add_argument("--profile", choices=("smoke", "quick", "full"))
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--width", type=int, help="channels of the first level (paper: 32)")
    s.add_argument("--rtol", type=float, help="ODE tolerance for ode-unet-K (paper: 1e-3)")
    s.add_argument("--adjoint", action="store_true", help="adjoint backprop through ODE-blocks")
    s.add_argument("--optimizer", choices=("adam", "adamw"), default="adam")
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    s.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    s.add_argument("--scale-lr", action="store_true", help="multiply lr by the number of processes")
    s.add_argument("--no-sync-bn", action="store_true",
                   help="under torchrun: per-process BatchNorm statistics instead of global-batch ones")
    s.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate: constant, or cosine decay to 0 over --epochs")
    s.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no epoch that would end after this many minutes (0: no limit)")
    s.add_argument("--ode-reg", metavar="kinetic=A,jacobian=B",
                   help="regularise the ODE-blocks' dynamics (Finlay et al. 2020): add A x kinetic energy and "
                        "B x Jacobian Frobenius norm (Hutchinson estimate), integrated over each solve, to the loss")
    s.add_argument("--restart", action="store_true", help="ignore an existing last.pt")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("train-bccd", help="train a model on BCCD photographs and score it on the whole "
                                          "test split (the recipe of the shipped checkpoint)",
                       description="Pretrain on BCCD-like synthetic smears, fine-tune on BCCD training "
                                   "patches, keep the epoch with the lowest validation loss, and score it "
                                   "on every BCCD test photograph (gold white-cell IoU/Dice, silver "
                                   "3-class scores). Writes OUT/bccd-MODEL-wWIDTH.pt and OUT/metrics.json. "
                                   "Options left out take the shipped checkpoint's recipe.")
    s.add_argument("--src", required=True, help="raw BCCD folder (images/, wbc_masks/, annotations/, splits/)")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--model", choices=MODEL_NAMES, default="nodes-unet")
    s.add_argument("--width", type=int, help="first-level channels (default: 8)")
    s.add_argument("--scale", type=float, help="resize factor of the photographs (default: 0.5)")
    s.add_argument("--patch", type=int, help="training patch side in px (default: 128)")
    s.add_argument("--crops", type=int, help="patches per training photograph (default: 4)")
    s.add_argument("--augment", type=int, help="flip/rotate/colour copies per patch (default: 1)")
    s.add_argument("--val-images", type=int, help="validation photographs; 0 = all (default: 40)")
    s.add_argument("--stain", type=float, help="stain/camera shifts of the training patches, strength 0-1 "
                                               "(bloodseg.stain.random_stain; default: 0, none)")
    s.add_argument("--epochs", type=int, help="epochs on BCCD (default: 5)")
    s.add_argument("--batch-size", type=int, help="(default: 8)")
    s.add_argument("--lr", type=float, help="learning rate of the synthetic pretraining (default: 2e-3)")
    s.add_argument("--finetune-lr", type=float, help="learning rate on BCCD (default: 1e-3)")
    s.add_argument("--pretrain-smears", type=int, help="synthetic smears to pretrain on (default: 16)")
    s.add_argument("--pretrain-epochs", type=int, help="(default: 2)")
    s.add_argument("--no-pretrain", action="store_true", help="train on BCCD from scratch")
    s.add_argument("--init", help="continue from this checkpoint (same model and width) instead of pretraining")
    s.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    s.add_argument("--max-minutes", type=float, default=0.0, help="time limit of the BCCD training (0: none)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_train_bccd)

    s = sub.add_parser("tune-cleanup", help="choose a BCCD checkpoint's white-cell cleanup on the validation "
                                            "photographs and store it in the checkpoint",
                       description="Try removing white components below N px (and filling holes in white "
                                   "cells) on BCCD's validation photographs, keep the best setting, score the "
                                   "test photographs with and without it, and write the checkpoint with "
                                   "'postprocess' set; predict and count then apply it (unless --raw).")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--src", required=True, help="raw BCCD folder (images/, wbc_masks/, annotations/, splits/)")
    s.add_argument("--out", help="write the checkpoint here (default: in place)")
    s.add_argument("--work", default="runs/tune-cleanup", help="folder for the prepared BCCD masks")
    s.set_defaults(func=cmd_tune_cleanup)

    s = sub.add_parser("calibrate", help="choose a cheaper ODE solver on validation images and store it in "
                                         "a copy of the checkpoint",
                       description="Score and time the trained ODE solver and cheaper ones (Euler, midpoint, "
                                   "RK4 with 1-4 steps, dopri5 at loose tolerances) on VALIDATION images, keep "
                                   "the fastest within --max-drop percentage points of the trained solver, and "
                                   "write the checkpoint with it; predict and count then use it (unless --exact).")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--data", help="validation folder with images/ and masks/ (score: MIoU)")
    s.add_argument("--bccd-src", help="raw BCCD folder: calibrate on its validation photographs (score: gold "
                                      "white-cell IoU)")
    s.add_argument("--work", default="runs/calibrate", help="folder for the prepared BCCD masks")
    s.add_argument("--out", help="write the checkpoint here (default: <ckpt name>-calibrated.pt in the current folder)")
    s.add_argument("--max-drop", type=float, default=0.3, help="largest score drop allowed, in percentage points")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("export", help="write a checkpoint's network as an ONNX file (fixed-grid ODE solver)",
                       description="Export the network to ONNX (dynamic batch, height and width) with its use "
                                   "settings stored in the file; bloodseg.export.load_onnx runs it with "
                                   "onnxruntime. An adaptive solver (dopri5) is not a static graph and is refused.")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--onnx", required=True, help="the ONNX file to write (atomically)")
    s.add_argument("--solver", metavar="METHOD:STEPS",
                   help="fixed-grid ODE solver, e.g. euler:1 or rk4:2 (default: the checkpoint's calibrated one)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("evaluate", help="PA / CPA / MIoU and time of a checkpoint on a split")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--data", default="synthetic")
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--profile", choices=("smoke", "quick", "full"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rtol", type=float, help="test-time ODE tolerance")
    s.add_argument("--per-image", action="store_true")
    s.add_argument("--json", help="also write the metrics to this file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("predict", help="masks and overlays for images of any size")
    s.add_argument("--ckpt", required=True)
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--out", required=True)
    s.add_argument("--no-overlay", action="store_true")
    _add_batch_flags(s)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("count", help="count white and red cells per image (CSV)",
                       description="Predict each image, then count white cells (connected components) "
                                   "and red cells (distance-transform watershed splits touching cells). "
                                   "Cells cut by the border count when most of the cell is visible.")
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--ckpt", help="checkpoint (default: the BCCD checkpoint shipped with bloodseg)")
    s.add_argument("--out", help="write the counts as CSV here (image, n_white, n_red, ...)")
    s.add_argument("--masks", help="also write the predicted masks and overlays to this folder")
    s.add_argument("--red-radius", type=float, help="typical red-cell radius in px (default: measured)")
    _add_batch_flags(s)
    s.set_defaults(func=cmd_count)

    s = sub.add_parser("bench", help="parameters, memory, inference time, NFE and training-step cost "
                                     "of every model (paper Tables 1-2)")
    s.add_argument("--models", default=",".join(MODEL_NAMES),
                   help="comma-separated model names (default: all; unet is always added as the reference)")
    s.add_argument("--width", type=int, default=32, help="channels of the first level (paper: 32)")
    s.add_argument("--size", type=int, default=256, help="image side, a multiple of 16 (paper: 256)")
    s.add_argument("--n-images", type=int, default=20, help="images timed one at a time (paper: 20)")
    s.add_argument("--batch", type=int, default=2, help="batch of the measured training step")
    s.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    s.add_argument("--ckpt-dir", help="folder with <model>/best.pt: bench trained weights instead of random ones")
    s.add_argument("--repeats", type=int, default=1, help="training steps timed per model (the fastest is kept)")
    s.add_argument("--no-train", action="store_true", help="skip the training-step measurements")
    s.add_argument("--no-adjoint", action="store_true", help="skip the adjoint training step")
    s.add_argument("--json", help="also write the full results to this file")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("record", help="write one of the chapters' JSON records (with provenance); slow")
    s.add_argument("what", choices=sorted(RECORDS))
    s.add_argument("--out", help="the JSON record (default: its place under book/results/)")
    s.add_argument("--work", help="prepared data, runs and scratch files (default: per record, under runs/)")
    s.add_argument("--bccd-src", help="raw BCCD folder (bccd-*, stain; default $BLOODSEG_BCCD)")
    s.add_argument("--profile", default="quick", help="bccd-training: the chapter's plan (quick or full)")
    s.add_argument("--repeats", type=int, default=3, help="ddp-throughput: interleaved rounds")
    s.add_argument("--limit", type=int, help="stain: the first N test photographs only (a quick check)")
    s.add_argument("--study-root", help="cheap-*: the study's work tree (default $BLOODSEG_STUDY_ROOT, else .)")
    s.add_argument("--scale", default="study", help="cheap-*: the reproduce scale whose trained units are used")
    s.add_argument("--seeds", default="0", help="cheap-*: comma-separated seeds")
    s.add_argument("--rounds", type=int, help="cheap-bench/-solvers: timing rounds (default 7 / 5)")
    s.add_argument("--images", type=int, help="cheap-bench/-blocks: images (default 20 / 4)")
    s.add_argument("--epochs", type=int, help="cheap-solvers: shorten the recipe (the record says so)")
    s.add_argument("--notes", default="", help="cheap-solvers: a note stored in the record")
    s.set_defaults(func=cmd_record)

    s = sub.add_parser("reproduce", help="train every model of a paper experiment on several seeds; one "
                                         "JSON record per (model, seed) with provenance, resumable")
    s.add_argument("experiment", choices=("table1", "table2", "tolerance", "adjoint-memory", "timing", "all"))
    s.add_argument("--scale", default="quick", choices=("quick", "study", "full", "smoke"),
                   help="the recipe: quick (chapters' CPU ablation), study (width 8, 15 cosine epochs: the CPU "
                        "scale that decides the relative claims), full (the paper's); smoke is for tests")
    s.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every model (default 3)")
    s.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no unit that would end after this many minutes (0: no limit); run "
                        "again to continue")
    s.add_argument("--out", default="book/results", help="records go to OUT/EXPERIMENT/SCALE/ (default book/results)")
    s.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    s.set_defaults(func=cmd_reproduce)

    # Hidden (no help=, so not listed): the workers that bloodseg.paper.ddp_scaling launches under torchrun.
    s = sub.add_parser("ddp-bench", description="Throughput of training steps in this process; run it under torchrun.")
    s.add_argument("--model", default="nodes-unet")
    s.add_argument("--width", type=int, default=8)
    s.add_argument("--patch", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--profile", choices=("smoke", "quick", "full"))
    s.add_argument("--bf16", action="store_true")
    s.add_argument("--json", help="rank 0 writes the result here")
    s.set_defaults(func=cmd_ddp_bench)

    s = sub.add_parser("ddp-gradcheck", description="DDP gradients against one process; run it under torchrun.")
    s.add_argument("--configs", required=True, help="JSON list of model configurations")
    s.add_argument("--width", type=int, default=4)
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_ddp_gradcheck)
    return p


def _add_batch_flags(s) -> None:
    """Flags shared by predict and count (see Segmenter.predict_files)."""
    s.add_argument("--tile", type=int, default=512)
    s.add_argument("--overlap", type=int, default=64)
    s.add_argument("--raw", action="store_true",
                   help="the network's masks as they are, without the checkpoint's white-cell cleanup")
    s.add_argument("--exact", action="store_true",
                   help="exactly the trained pipeline: the trained ODE solver even when the checkpoint stores a "
                        "calibrated one, and its fixed input_scale (no automatic scale)")
    s.add_argument("--scale", type=_scale_arg, metavar="auto|X",
                   help="auto: resize each photograph so its red cells have the size the network was trained "
                        "on (the default when the checkpoint knows it); X: resize every photograph by X")
    s.add_argument("--skip-existing", action="store_true",
                   help="keep images whose outputs are already there and decode (continue an interrupted run)")
    s.add_argument("--instances", metavar="DIR",
                   help="also write <stem>_instances.png (16-bit, one id per cell) and <stem>_cells.csv here")
    s.add_argument("--pixel-size-um", type=float, metavar="X",
                   help="side of one pixel in micrometres: cell areas in µm² in the --instances tables")
    s.add_argument("--save-probabilities", action="store_true",
                   help="also write <stem>_probs.npz (class probabilities, float16, compressed)")
    s.add_argument("--tta", action="store_true", help="average the predictions over flips (slower)")
    s.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal")
    s.epilog = ("An image that cannot be read or predicted is reported and skipped; the others are written. "
                "Exit status 0: all done; 1: some images failed; 2: nothing could be done (bad "
                "checkpoint, output folder, options).")


def _version() -> str:
    return __version__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BloodsegError as exc:
        print(f"bloodseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
