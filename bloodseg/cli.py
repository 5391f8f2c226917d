"""The ``bloodseg`` command line: the parser (flags become a recipe in :mod:`bloodseg.flags`).

What each command does is :mod:`bloodseg.commands` (the library's) or :mod:`bloodseg.paper.commands`
(the paper's experiments), each a thin layer over a library function; ``main`` dispatches to it.
Errors a user can cause print one clear line (no traceback) and exit with status 2. ``predict``
and ``count`` report an image they cannot read or predict, skip it, do the others, and exit with
status 1 ("N written, K failed" on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

import torch

from . import __version__, commands
from .errors import BloodsegError
from .flags import BCCD_FLAGS, bccd_recipe_from_args, recipe_from_args
from .models import MODEL_NAMES
from .recipe import REAL_PRESETS
from .registry import variant, variant_names


def _model_arg(text: str) -> str:
    """``--model``: a label of :mod:`bloodseg.registry` (checked; its canonical spelling)."""
    try:
        return variant(text).label
    except BloodsegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_flags(s, required: bool, default=None) -> None:
    s.add_argument("--model", required=required, default=default, type=_model_arg, metavar="LABEL",
                   help=f"the network: {', '.join(variant_names())}, or nodes-unet-hN (bloodseg.registry)"
                        + (f"; default {default}" if default else ""))
    s.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="a build option of the network on top of the label's, e.g. ode_hidden=16 or method=euler "
                        "(repeatable)")


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


def _paper(name: str):
    """The command ``name`` of :mod:`bloodseg.paper.commands`, imported only when it runs: bloodseg.paper
    pulls in pandas and the plotting code, which ``predict`` and ``count`` do not need at start-up."""
    def run(args) -> int:
        from .paper import commands as paper_commands
        return getattr(paper_commands, name)(args)
    return run


#: ``bloodseg record WHAT``: the chapters' records beyond ``reproduce``, and the paper module that writes each.
RECORDS = {"bccd-training": "bccd_records", "bccd-shipped": "bccd_records", "ddp-throughput": "ddp_scaling", "stain": "robustness", "crops": "crops",
           "cheap-bench": "speed", "cheap-blocks": "blocks", "cheap-solvers": "solvers", "scale-resized": "scale_records",
           "scale-calibration": "scale_records", "calibration-shipped": "scale_records", "domains": "domains",
           "domain-attempt": "domains", "tryit": "tryit"}


def cmd_record(args) -> int:
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 bloodseg " + shlex.join(sys.argv[1:])
    importlib.import_module(f".paper.{RECORDS[args.what]}", __package__).run_record(args, command)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bloodseg", description=(
        "Blood smear segmentation (background / white cell / red cell) with U-Nets and neural "
        "ODE blocks, after Li et al. 2021 (NODEs-UNet)."))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("synth", help="write synthetic smears with exact masks")
    s.add_argument("--out", required=True, help="folder; gets images/ and masks/")
    s.add_argument("-n", type=int, default=10, help="number of smears (default 10)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default 519 775")
    s.set_defaults(func=commands.cmd_synth)

    s = sub.add_parser("download-bccd", help="fetch the full BCCD (367 photographs) with checksums")
    s.add_argument("--out", required=True, help="folder for the data (files already there and intact are kept)")
    s.add_argument("--mirror", default=None,
                   help="base URL or local folder with the same layout (default: the pinned upstream "
                        "repositories, or $BLOODSEG_BCCD_MIRROR)")
    s.set_defaults(func=commands.cmd_download_bccd)

    s = sub.add_parser("prepare-bccd", help="turn the BCCD dataset into 3-class masks per split")
    s.add_argument("--src", required=True, help="BCCD folder (images/, wbc_masks/, annotations/, splits/)")
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    s.set_defaults(func=commands.cmd_prepare_bccd)

    s = sub.add_parser("train", help="train a model; writes best.pt, last.pt, history.json, metrics.json",
                       epilog="Several processes (GPUs, machines): torchrun --nproc-per-node=N -m "
                              "bloodseg.cli train ... (or torchrun ... --no-python bloodseg train ...); "
                              "--batch-size is per process.")
    _add_model_flags(s, required=True)
    s.add_argument("--data", default="synthetic",
                   help="'synthetic' (default), 'bccd' (the BCCD copy of $BLOODSEG_BCCD, else the vendored "
                        "sample), a BCCD folder (raw, or a prepare-bccd output), a folder with images/ + masks/, "
                        "or a folder of LabelMe .json files")
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
    s.set_defaults(func=commands.cmd_train, recipe_of=recipe_from_args)

    s = sub.add_parser("train-bccd", help="train a model on BCCD photographs and score it on the whole "
                                          "test split (the recipe of the shipped checkpoint)",
                       description="The product pipeline (bloodseg.shipping): pretrain on BCCD-like synthetic "
                                   "smears, fine-tune on BCCD training patches, keep the epoch with the lowest "
                                   "validation loss; then measure the training photographs' background colour and "
                                   "red-cell size, choose the white-cell cleanup and the ODE solver on the "
                                   "validation photographs, and score every BCCD test photograph (gold white-cell "
                                   "IoU/Dice, silver 3-class scores). Writes OUT/bccd-MODEL-wWIDTH.pt (a complete "
                                   "Segmenter, like the shipped one) and OUT/metrics.json. Options left out take "
                                   "the shipped checkpoint's recipe.")
    s.add_argument("--src", default="bccd", help="raw BCCD folder (images/, wbc_masks/, annotations/, splits/) or "
                                                 "a prepared one; default 'bccd': $BLOODSEG_BCCD, else the vendored sample")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--profile", choices=("smoke", "quick", "full"),
                   help="start from this profile's photograph recipe instead of the shipped checkpoint's ('ship')")
    _add_model_flags(s, required=False, default="nodes-unet")
    ship = REAL_PRESETS["ship"].to_dict()
    for flag, (field, kind, text) in BCCD_FLAGS.items():
        section, _, name = field.partition(".")
        s.add_argument(flag, type=kind, help=text.format(f"{ship[section][name]:g}"))
    s.add_argument("--no-pretrain", action="store_true", help="train on BCCD from scratch")
    s.add_argument("--init", help="continue from this checkpoint (same model and width) instead of pretraining")
    s.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    s.add_argument("--max-minutes", type=float, default=0.0, help="time limit of the BCCD training (0: none)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", help="settings made after training on the training and validation photographs, "
                                   "comma-separated (default: background,scale,cleanup,solver: all)")
    s.add_argument("--tta", action="store_true", help="also score the network with flip test-time augmentation")
    s.add_argument("--resume", action="store_true", help="continue an interrupted training from OUT/finetune/last.pt")
    s.set_defaults(func=commands.cmd_train_bccd, recipe_of=bccd_recipe_from_args)

    for name in ("tune", "tune-cleanup"):
        cleanup_only = name == "tune-cleanup"
        s = sub.add_parser(name, help=("choose a checkpoint's white-cell cleanup on the validation photographs and "
                                       "store it in the checkpoint" if cleanup_only else
                                       "make a checkpoint's use settings (background colour, red-cell size, cleanup, "
                                       "solver) on its training and validation photographs and store them"),
                           description=("bloodseg tune --steps cleanup: try removing white components below N px "
                                        "(and filling holes) on the validation photographs, keep the best, score the "
                                        "test photographs before and after, write the checkpoint." if cleanup_only else
                                        "Measure the training photographs' background colour and red-cell diameter, "
                                        "choose the white-cell cleanup and the ODE solver on the validation "
                                        "photographs (bloodseg.shipping.finish_segmenter), score the test photographs "
                                        "before and after, and write the checkpoint (weights unchanged)."))
        s.add_argument("--ckpt", required=True)
        s.add_argument("--src", default="bccd", help="raw or prepared BCCD folder (default 'bccd': $BLOODSEG_BCCD, "
                                                     "else the vendored sample)")
        s.add_argument("--out", help="write the checkpoint here (default: in place)")
        if not cleanup_only:
            s.add_argument("--steps", help="comma-separated, of background,scale,cleanup,solver (default: all)")
        s.set_defaults(func=commands.cmd_tune)

    s = sub.add_parser("calibrate", help="choose a cheaper ODE solver on validation images and store it in "
                                         "a copy of the checkpoint",
                       description=commands.cmd_calibrate.__doc__)
    s.add_argument("--ckpt", required=True)
    s.add_argument("--data", help="validation folder with images/ and masks/ (score: MIoU)")
    s.add_argument("--bccd-src", help="raw BCCD folder: calibrate on its validation photographs (score: gold "
                                      "white-cell IoU)")
    s.add_argument("--work", default="runs/calibrate", help="folder for the prepared BCCD masks")
    s.add_argument("--out", help="write the checkpoint here (default: <ckpt name>-calibrated.pt in the current folder)")
    s.add_argument("--max-drop", type=float, default=0.3, help="largest score drop allowed, in percentage points")
    s.set_defaults(func=commands.cmd_calibrate)

    s = sub.add_parser("export", help="write a checkpoint's network as an ONNX file (fixed-grid ODE solver)",
                       description=commands.cmd_export.__doc__)
    s.add_argument("--ckpt", required=True)
    s.add_argument("--onnx", required=True, help="the ONNX file to write (atomically)")
    s.add_argument("--solver", metavar="METHOD:STEPS",
                   help="fixed-grid ODE solver, e.g. euler:1 or rk4:2 (default: the checkpoint's calibrated one)")
    s.set_defaults(func=commands.cmd_export)

    s = sub.add_parser("evaluate", help="score a checkpoint as predict runs it on whole labelled images: its "
                                        "stored test split, or your own --images/--masks",
                       description=commands.cmd_evaluate.__doc__ + " Writes white-cell IoU (pooled, with a 95% "
                                   "interval over images, and per image) and, where red cells are labelled, "
                                   "PA / IoU / MIoU.")
    s.add_argument("--ckpt", help="checkpoint (default: the BCCD checkpoint shipped with bloodseg)")
    s.add_argument("--images", help="a folder of your own labelled images ...")
    s.add_argument("--masks", help="... and their masks (same file names)")
    s.add_argument("--mask-colours", metavar="SPEC",
                   help="how the masks' colours map to classes: 'R,G,B=CLASS; V=CLASS; ...' (CLASS: background, "
                        "white, red) or a preset: allidb2, binary (0/255), bccd-wbc. Default: masks hold 0/1/2 or "
                        "the class palette. Without a red class, only white cells are scored")
    s.add_argument("--data", help="score a split of this data instead (default: the data stored in the checkpoint)")
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--profile", choices=("smoke", "quick", "full"),
                   help="only for old checkpoints without a stored recipe; the split is never re-made from it")
    s.add_argument("--seed", type=int, default=0, help="only for old checkpoints without a stored split")
    s.add_argument("--rtol", type=float, help="test-time ODE tolerance")
    s.add_argument("--per-image", action="store_true", help="per-image scores in the JSON too")
    s.add_argument("--csv", help="write per-image scores (name, white_iou, white_dice, factor, silver_miou) here")
    s.add_argument("--json", help="also write the scores to this file")
    _add_batch_flags(s, batch=False)
    s.set_defaults(func=commands.cmd_evaluate)

    s = sub.add_parser("predict", help="masks and overlays for images of any size")
    s.add_argument("--ckpt", help="checkpoint (default: the BCCD checkpoint shipped with bloodseg)")
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--out", required=True)
    s.add_argument("--no-overlay", action="store_true")
    _add_batch_flags(s)
    s.set_defaults(func=commands.cmd_predict)

    s = sub.add_parser("count", help="count white and red cells per image (CSV)",
                       description=commands.cmd_count.__doc__)
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--ckpt", help="checkpoint (default: the BCCD checkpoint shipped with bloodseg)")
    s.add_argument("--out", help="write the counts as CSV here (image, n_white, n_red, ...)")
    s.add_argument("--masks", help="also write the predicted masks and overlays to this folder")
    s.add_argument("--red-radius", type=float, help="typical red-cell radius in px (default: measured)")
    _add_batch_flags(s)
    s.set_defaults(func=commands.cmd_count)

    s = sub.add_parser("bench", help="parameters, memory, inference time, NFE and training-step cost "
                                     "of every model (paper Tables 1-2)")
    s.add_argument("--models", default=",".join(MODEL_NAMES),
                   help="comma-separated labels of bloodseg.registry (default: the paper's models; unet is added)")
    s.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="a build option of every network, e.g. method=euler or ode_hidden=16 (repeatable)")
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
    s.set_defaults(func=_paper("cmd_bench"))

    s = sub.add_parser("record", help="write one of the chapters' JSON records (with provenance); slow")
    s.add_argument("what", choices=sorted(RECORDS))
    s.add_argument("--out", help="the JSON record (default: its place under book/results/)")
    s.add_argument("--work", help="prepared data, runs and scratch files (default: per record, under runs/)")
    s.add_argument("--bccd-src", help="raw BCCD folder of the BCCD records (default $BLOODSEG_BCCD)")
    s.add_argument("--profile", default="quick", help="bccd-training: the chapter's recipe (quick or full)")
    s.add_argument("--repeats", type=int, default=3, help="ddp-throughput: interleaved rounds")
    s.add_argument("--limit", type=int, help="BCCD records: the first N photographs of each split only (a check)")
    s.add_argument("--study-root", help="cheap-*: the study's work tree (default $BLOODSEG_STUDY_ROOT, else .)")
    s.add_argument("--scale", default="study", help="cheap-*: the reproduce scale whose trained units are used")
    s.add_argument("--seeds", default="0", help="cheap-*: comma-separated seeds")
    s.add_argument("--rounds", type=int, help="cheap-bench/-solvers: timing rounds (default 7 / 5)")
    s.add_argument("--images", type=int, help="cheap-bench/-blocks: images (default 20 / 4)")
    s.add_argument("--epochs", type=int, help="cheap-solvers: shorten the recipe (the record says so)")
    s.add_argument("--notes", default="", help="cheap-solvers: a note stored in the record")
    s.add_argument("--ckpt", help="domains, domain-attempt: the checkpoint (default: the shipped one)")
    s.add_argument("--name", help="domain-attempt: which attempt (bloodseg.paper.domains.ATTEMPTS)")
    s.add_argument("--reuse", help="domains: an earlier domain table whose rows on whole fields (unchanged "
                                   "by the crop rule) are carried, marked as such")
    s.set_defaults(func=cmd_record)

    s = sub.add_parser("reproduce", help="train every model of a paper experiment on several seeds; one "
                                         "JSON record per (model, seed) with provenance, resumable")
    s.add_argument("experiment", choices=("table1", "table2", "tolerance", "adjoint-memory", "timing", "all",
                                          "robust"), help="robust: chapter 10's study (scales study and smoke)")
    s.add_argument("--scale", default="quick", choices=("quick", "study", "full", "smoke"),
                   help="the recipe: quick (chapters' CPU ablation), study (width 8, 15 cosine epochs: the CPU "
                        "scale that decides the relative claims; robust: its own study recipe), full (the "
                        "paper's); smoke is for tests")
    s.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every model (default 3)")
    s.add_argument("--models", default=None, help="only these models of the experiment, comma-separated "
                                                  "labels (e.g. unet,resunet: more seeds for one paired claim)")
    s.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no unit that would end after this many minutes (0: no limit); run "
                        "again to continue")
    s.add_argument("--out", default="book/results", help="records go to OUT/EXPERIMENT/SCALE/ (default book/results)")
    s.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    s.set_defaults(func=_paper("cmd_reproduce"))

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
    s.set_defaults(func=_paper("cmd_ddp_bench"))

    s = sub.add_parser("ddp-gradcheck", description="DDP gradients against one process; run it under torchrun.")
    s.add_argument("--configs", required=True, help="JSON list of model configurations")
    s.add_argument("--width", type=int, default=4)
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_paper("cmd_ddp_gradcheck"))
    return p


def _add_batch_flags(s, batch: bool = True) -> None:
    """Flags shared by predict and count (see Segmenter.predict_files); ``batch=False``: only those
    that choose the pipeline (evaluate)."""
    s.add_argument("--tile", type=int, default=512)
    s.add_argument("--overlap", type=int, default=64)
    s.add_argument("--raw", action="store_true",
                   help="the network's masks as they are, without the checkpoint's white-cell cleanup")
    s.add_argument("--exact", action="store_true",
                   help="exactly the trained pipeline: the trained ODE solver even when the checkpoint stores a "
                        "calibrated one, its fixed input_scale (no automatic scale), the photographs' own colours "
                        "(the cleanup and the crop rule stay: --raw, --crop-cells all)")
    s.add_argument("--scale", type=_scale_arg, metavar="auto|X",
                   help="auto: resize each photograph so its red cells have the size the network was trained "
                        "on (the default when the checkpoint knows it); X: resize every photograph by X")
    s.add_argument("--colour", choices=("background", "none"), help="background (the default when the checkpoint "
                   "knows the training photographs' background): undo a colour cast; none: colours as they are")
    s.add_argument("--crop-cells", choices=("centre", "all"),
                   help="on a crop (shorter side below 384 px): centre (the default) keeps its own white cell, the one "
                        "nearest its centre, and drops the white cells its border cuts; all: keep every white cell")
    s.add_argument("--tta", action="store_true", help="average the predictions over flips (slower)")
    if not batch:
        return
    s.add_argument("--skip-existing", action="store_true",
                   help="keep images whose outputs are already there and decode (continue an interrupted run)")
    s.add_argument("--instances", metavar="DIR",
                   help="also write <stem>_instances.png (16-bit, one id per cell) and <stem>_cells.csv here")
    s.add_argument("--pixel-size-um", type=float, metavar="X",
                   help="side of one pixel in micrometres: cell areas in µm² in the --instances tables")
    s.add_argument("--save-probabilities", action="store_true",
                   help="also write <stem>_probs.npz (class probabilities, float16, compressed)")
    s.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal")
    s.epilog = ("An image that cannot be read or predicted is reported and skipped; the others are written. Exit "
                "status 0: all done; 1: some images failed; 2: nothing could be done (bad checkpoint, output folder, options).")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "recipe_of"):   # train, train-bccd: the flags as a recipe, checked before any work
            args.recipe = args.recipe_of(args)
        return args.func(args)
    except BloodsegError as exc:
        print(f"bloodseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
