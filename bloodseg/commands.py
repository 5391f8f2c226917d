"""What the library's ``bloodseg`` commands do, given the parsed command line (:mod:`bloodseg.cli`).

Each ``cmd_*`` takes the namespace :func:`bloodseg.cli.build_parser` made (``args.recipe`` is the
:class:`~bloodseg.recipe.Recipe` that :func:`bloodseg.cli.recipe_from_args` built), calls a library
function, prints what it did and returns the exit status. The paper's commands are
:mod:`bloodseg.paper.commands`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .bccd import prepare_bccd, prepare_cached
from .checkpoint import load_checkpoint, update_checkpoint
from .calibrate import check_solver, solver_label, white_iou_score
from .count import write_counts_csv, write_rows_csv
from .datasets import SegmentationDataset, split_photographs, training_splits
from .domains import load_labelled
from .distributed import cleanup_distributed, setup_distributed
from .download import download_bccd
from .errors import BloodsegError
from .export import export_onnx
from .io import load_folder
from .ode import FIXED_GRID_METHODS, set_tolerance
from .recipe import Recipe, get_recipe
from .registry import build_variant
from .scoring import evaluate_photos
from .segmenter import Segmenter, shipped_checkpoint
from .shipping import FINISH_STEPS, train_segmenter, tune_checkpoint
from .synthetic import write_synthetic
from .train import fit


def write_json(obj, path) -> None:
    """Write ``obj`` as indented JSON (numbers it cannot store as floats), or say clearly why not."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1, default=float) + "\n")
    except OSError as exc:
        raise BloodsegError(f"cannot write {path}: {exc.strerror or exc}. Choose a file in a "
                            "folder you can write to.") from None


def dump_json(obj, path: str | None = None) -> None:
    """Print ``obj`` as indented JSON, and also write it to ``path`` when given."""
    if path:
        write_json(obj, path)
    print(json.dumps(obj, indent=1, default=float))


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
    dump_json(prepare_bccd(args.src, args.out, limit=args.limit))
    return 0


def _split_names(splits: dict, data) -> dict:
    """What a checkpoint stores of its split: the data, and the test and validation images by name
    (the source photograph of each patch or whole photograph)."""
    names = lambda key: sorted({s.source for s in splits[key]})  # noqa: E731
    return {"data": str(data), "test": names("test"), "val": names("val")}


def cmd_train(args) -> int:
    recipe, cfg = args.recipe, args.recipe.train
    info = setup_distributed()
    torch.manual_seed(cfg.seed)
    model = build_variant(recipe.model.name, width=recipe.model.width, **recipe.model.options)
    splits = training_splits(args.data, recipe, seed=cfg.seed)
    if info.is_main:
        lr = cfg.lr * (info.world_size if cfg.scale_lr else 1)
        print(f"profile {recipe.name}: {len(splits['train'])} train / {len(splits['val'])} val patches / "
              f"{len(splits['test'])} test images, photographs resized by {recipe.data.scale:g}, model "
              f"{recipe.model.name} width {recipe.model.width} {recipe.model.options}, world size {info.world_size}, "
              f"batch {cfg.batch_size} per process x {info.world_size} = {cfg.batch_size * info.world_size}, "
              f"lr {lr:g}", flush=True)
    history = fit(model, SegmentationDataset(splits["train"]), SegmentationDataset(splits["val"]),
                  args.out, recipe, resume=not args.restart,
                  on_epoch=lambda r: print(json.dumps(r), flush=True))
    if info.is_main:
        # the split and the magnification travel with the weights: `bloodseg evaluate` reads them back
        settings = Segmenter(model, input_scale=recipe.data.scale).settings()
        for name in ("best.pt", "last.pt"):
            update_checkpoint(Path(args.out) / name, segmenter=settings, split=_split_names(splits, args.data))
        if splits["test"]:
            best = Segmenter.load(Path(args.out) / "best.pt")
            test = split_photographs(args.data, recipe, "test", _split_names(splits, args.data)["test"], cfg.seed)
            result = evaluate_photos(best, test, red_labelled=True)
            metrics = {"white_iou": result["gold"]["iou"], "white_iou_ci": result["gold"]["iou_ci"],
                       **result["silver"], "n_images": result["n_images"], "epochs_trained": len(history),
                       "scored": f"{len(test)} whole test images through the Segmenter (input_scale "
                                 f"{best.input_scale:g})"}
            dump_json(metrics, str(Path(args.out) / "metrics.json"))
    cleanup_distributed()
    return 0


def cmd_train_bccd(args) -> int:
    """:func:`bloodseg.shipping.train_segmenter` with the recipe :func:`bloodseg.cli.bccd_recipe_from_args` made."""
    dump_json(train_segmenter(args.out, args.recipe, src=args.src, pretrain=not args.no_pretrain, init=args.init,
                              log=lambda m: print(m, flush=True), tta=args.tta, steps=_steps(args),
                              resume=args.resume))
    return 0


def _steps(args) -> tuple:
    steps = tuple(s.strip() for s in (args.steps or ",".join(FINISH_STEPS)).split(",") if s.strip())
    bad = [s for s in steps if s not in FINISH_STEPS]
    if bad:
        raise BloodsegError(f"--steps {args.steps!r}: unknown step(s) {', '.join(bad)}; choose from "
                            f"{', '.join(FINISH_STEPS)} (comma-separated)")
    return steps


def cmd_tune(args) -> int:
    """Make a checkpoint's use settings on photographs it is not scored on (``bloodseg tune``;
    ``tune-cleanup`` is ``tune --steps cleanup``)."""
    steps = ("cleanup",) if args.command == "tune-cleanup" else _steps(args)
    result = tune_checkpoint(args.ckpt, src=args.src, out=args.out, steps=steps, log=lambda m: print(m, flush=True))
    print(f"wrote {result['checkpoint']} ({', '.join(steps)})")
    return 0


def _segmenter(args) -> Segmenter:
    if getattr(args, "ckpt", None) is None:   # predict, count, evaluate, export: the shipped checkpoint by default
        args.ckpt = shipped_checkpoint()
    # --exact, and --rtol (a tolerance of the trained solver), use the trained solver even when a
    # calibrated one is stored in the checkpoint
    rtol = getattr(args, "rtol", None)
    seg = Segmenter.load(args.ckpt, exact=bool(getattr(args, "exact", False)) or rtol is not None,
                         **({"rtol": rtol} if rtol is not None else {}))
    if rtol is not None:
        set_tolerance(seg.model, rtol)   # checks the value even for a network without ODE-blocks
    if len(seg.class_names) != 3 or seg.model.options.get("classes", 3) != 3:
        raise BloodsegError(f"{args.ckpt} predicts {seg.model.options.get('classes')} classes, but 3 are "
                            "needed here (masks hold 0/1/2). Use a checkpoint trained with the same classes.")
    if getattr(args, "tile", None) is not None:
        seg = seg.replace(tile=args.tile, overlap=args.overlap)
    return seg


def cmd_calibrate(args) -> int:
    """Score and time the trained ODE solver and cheaper ones (Euler, midpoint, RK4 with 1-4 steps,
    dopri5 at loose tolerances) on VALIDATION images, keep the fastest within --max-drop percentage
    points of the trained solver, and write the checkpoint with it; predict and count then use it
    (unless --exact)."""
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
    """Export the network to ONNX (dynamic batch, height and width) with its use settings stored in
    the file; bloodseg.export.load_onnx runs it with onnxruntime. An adaptive solver (dopri5) is not
    a static graph and is refused."""
    seg = Segmenter.load(args.ckpt, device="cpu")
    solver = _solver_arg(args.solver) if args.solver else None
    out = export_onnx(seg, args.onnx, solver=solver)
    label = solver_label(solver if solver is not None else seg.solver)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, ODE solver {label}); run it with "
          "bloodseg.export.load_onnx(path).predict(image)")
    return 0


def _evaluation_photographs(args, seg: Segmenter) -> tuple[list, bool, str]:
    """``(photographs, red_labelled, what)`` that ``bloodseg evaluate`` scores."""
    if args.images or args.masks:
        if not (args.images and args.masks):
            raise BloodsegError("give both --images DIR and --masks DIR (one mask per image, same file name)")
        samples, red = load_labelled(args.images, args.masks, args.mask_colours)
        colours = f"mask colours {args.mask_colours!r}" if args.mask_colours else "masks 0/1/2 or the class palette"
        return samples, red, f"{len(samples)} images of {args.images} ({colours})"
    if args.mask_colours:
        raise BloodsegError("--mask-colours reads the masks of --images/--masks; drop it or add the folders")
    stored = load_checkpoint(args.ckpt).get("split")
    recipe = get_recipe(Recipe.from_dict(seg.recipe) if seg.recipe else args.profile)
    data = args.data or (stored or {}).get("data") or "synthetic"
    names = stored.get(args.split) if stored and str(data) == stored.get("data") else None
    photos = split_photographs(data, recipe, args.split, names, seed=args.seed)
    how = ("the split stored in the checkpoint" if names is not None else
           f"the {args.split} split of {data} made again from the checkpoint's recipe '{recipe.name}' (seed {args.seed})")
    return photos, True, f"{len(photos)} whole {args.split} images of {data}: {how}"


def cmd_evaluate(args) -> int:
    """Score a checkpoint as ``bloodseg predict`` runs it (the Segmenter: colour rule, scale rule,
    solver, cleanup) on whole labelled images: the split stored in the checkpoint, or your own folders."""
    seg = _batch_segmenter(args)
    photos, red, what = _evaluation_photographs(args, seg)
    settings = {k: seg.settings()[k] for k in ("scale", "input_scale", "colour", "solver")}
    settings["postprocess"] = None if args.raw else seg.postprocess
    print(f"scoring {what}; settings {json.dumps(settings, default=str)}", file=sys.stderr, flush=True)
    result = evaluate_photos(seg, photos, red_labelled=red, postprocess=False if args.raw else None)
    out = {"checkpoint": str(args.ckpt), "images": what, "settings": settings, "red_labelled": red,
           "n_images": result["n_images"], "white_iou": result["gold"]["iou"], "white_iou_ci": result["gold"]["iou_ci"],
           "white_dice": result["gold"]["dice"], "white_precision": result["gold"]["precision"],
           "white_recall": result["gold"]["recall"], "seconds": result["seconds"], "per_image": result["per_image"]}
    if red:
        out.update(miou=result["silver"]["miou"], pa=result["silver"]["pa"], iou=result["silver"]["iou"])
    if args.csv:
        write_rows_csv([{k: r.get(k) for k in ("name", "white_iou", "white_dice", "factor", "silver_miou")}
                        for r in result["per_image"]], args.csv)
    if not args.per_image:
        out = {k: v for k, v in out.items() if k != "per_image"}
    dump_json(out, args.json)
    return 0


def _batch_options(args) -> dict:
    if args.pixel_size_um is not None and args.instances is None:
        raise BloodsegError("--pixel-size-um gives the cells' areas in µm² in the --instances tables; "
                            "add --instances DIR")
    return dict(skip_existing=args.skip_existing, progress=True if args.progress else None,
                instances=args.instances, pixel_size_um=args.pixel_size_um,
                save_probabilities=args.save_probabilities, postprocess=False if args.raw else None)


def _batch_segmenter(args) -> Segmenter:
    seg = _segmenter(args)
    if args.exact:   # exactly the trained pipeline: the stored fixed input_scale, colours as they are
        if args.scale == "auto" or args.colour == "background":
            raise BloodsegError("--exact runs the trained pipeline at its fixed input_scale on the photographs' "
                                "own colours; drop --scale auto / --colour background")
        seg = seg.replace(scale="fixed", colour="none")
    if args.crop_cells is not None:
        seg = seg.replace(crop_cells=args.crop_cells)
    if args.colour is not None:
        if args.colour == "background" and seg.background is None:
            raise BloodsegError(f"--colour background needs the training photographs' background colour, and "
                                f"{args.ckpt} does not store one (a checkpoint trained on synthetic smears, or "
                                "an older one); drop --colour")
        seg = seg.replace(colour=args.colour)
    if args.scale == "auto":
        seg = seg.replace(scale="auto")
    elif args.scale is not None:
        seg = seg.replace(scale="fixed", input_scale=args.scale)
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
                                                **_batch_options(args))
    for r in rows:
        if "error" not in r:
            print(f"{r['image']} -> {r['mask']}" + (" (kept)" if r.get("skipped") else ""))
    return _summary("predict", rows, "written")


def cmd_count(args) -> int:
    """Predict each image, then count white cells (connected components) and red cells
    (distance-transform watershed splits touching cells). Cells cut by the border count when most
    of the cell is visible."""
    if args.skip_existing and args.masks is None:
        raise BloodsegError("--skip-existing needs --masks DIR: the counts are made again from the saved masks")
    rows = _batch_segmenter(args).count_files(args.images, red_radius=args.red_radius, masks_out=args.masks,
                                              **_batch_options(args))
    counted = [r for r in rows if "error" not in r]
    print("image,n_white,n_red")
    for r in counted:
        print(f"{r['image']},{r['n_white']},{r['n_red']}")
    if args.out:
        print(f"wrote {write_counts_csv(counted, args.out)}")
    return _summary("count", rows, "counted")
