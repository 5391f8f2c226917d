"""The one place where command-line flags become a :class:`~bloodseg.recipe.Recipe`.

:mod:`bloodseg.cli` parses the command line; ``train``'s flags become a recipe by
:func:`recipe_from_args` and ``train-bccd``'s by :func:`bccd_recipe_from_args` (the
:data:`BCCD_FLAGS` table), before any data is built, so a bad number fails at once with a clear error.
"""
from __future__ import annotations

from .datasets import is_photograph_data
from .errors import BloodsegError
from .ode import check_regularise
from .recipe import REAL_PRESETS, Recipe, get_recipe, real_recipe
from .registry import parse_model_options

__all__ = ["recipe_from_args", "BCCD_FLAGS", "bccd_recipe_from_args"]


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
    """The one place where ``train``'s flags become a :class:`~bloodseg.recipe.Recipe`: the
    profile's preset (for photographs with a split of their own, such as ``--data bccd``, the
    profile's photograph recipe, as ``train-bccd`` uses: same split, same magnification) with
    every flag the user gave applied (0 or a negative number is kept, not
    replaced by the profile's value, so that validation reports it)."""
    photographs = is_photograph_data(getattr(args, "data", "synthetic"))
    base = (real_recipe if photographs else get_recipe)(getattr(args, "profile", None))
    if args.width is not None and args.width < 1:
        raise BloodsegError(f"--width must be a positive number of channels; got {args.width}")
    options = parse_model_options(getattr(args, "model_option", None))
    if args.rtol is not None:
        options["rtol"] = args.rtol
    if args.adjoint:
        options["adjoint"] = True
    given = {"model.width": args.width, "train.epochs": args.epochs, "train.batch_size": args.batch_size,
             "train.lr": args.lr}
    given = {k: v for k, v in given.items() if v is not None}
    if photographs:     # scored on the whole test split, as train-bccd scores it
        given["real.eval_images"] = None
    r = base.replace(**given, **{
        "model.name": args.model, "model.options": options, "train.optimizer": args.optimizer,
        "train.weight_decay": args.weight_decay, "train.seed": args.seed,
        "train.checkpoint_every": args.checkpoint_every, "train.bf16": args.bf16,
        "train.scale_lr": args.scale_lr, "train.sync_bn": not args.no_sync_bn,
        "train.schedule": args.schedule, "train.max_minutes": args.max_minutes,
        "train.ode_reg": _ode_reg_arg(args.ode_reg) if args.ode_reg else {}})
    r.train.validate()  # before any data is built: a bad number fails at once
    return r


#: ``train-bccd``'s flags that change a field of the ``ship`` recipe (:data:`~bloodseg.recipe.REAL_PRESETS`):
#: flag -> (recipe field, type, help; ``{}`` is the ship recipe's value, the default).
BCCD_FLAGS = {
    "--width": ("model.width", int, "first-level channels (default: {})"),
    "--scale": ("data.scale", float, "resize factor of the photographs (default: {})"),
    "--patch": ("data.patch", int, "training patch side in px (default: {})"),
    "--crops": ("data.crops_per_image", int, "patches per training photograph (default: {})"),
    "--augment": ("data.augment", int, "flip/rotate/colour copies per patch (default: {})"),
    "--val-images": ("real.val_images", int, "validation photographs; 0 = all (default: {})"),
    "--stain": ("data.stain", float, "stain/camera shifts of the training patches, strength 0-1 "
                                     "(bloodseg.stain.random_stain; default: {}, none)"),
    "--shift": ("data.shift", float, "training for domain shift, strength 0-1: patches drawn afresh each epoch at "
                                     "random magnification, framing, colour, blur, noise (bloodseg.shift; default: {}, none)"),
    "--epochs": ("train.epochs", int, "epochs on BCCD (default: {})"),
    "--batch-size": ("train.batch_size", int, "(default: {})"),
    "--lr": ("train.lr", float, "learning rate of the synthetic pretraining (default: {})"),
    "--finetune-lr": ("real.finetune_lr", float, "learning rate on BCCD (default: {})"),
    "--pretrain-smears": ("real.pretrain_smears", int, "synthetic smears to pretrain on (default: {})"),
    "--pretrain-epochs": ("real.pretrain_epochs", int, "(default: {})"),
}


def bccd_recipe_from_args(args) -> Recipe:
    """The one place where ``train-bccd``'s flags become a :class:`~bloodseg.recipe.Recipe` (named
    ``cli``): the ``ship`` recipe with the model, seed, schedule, time limit and every
    :data:`BCCD_FLAGS` flag the user gave (numbers > 0; --stain 0-1; --val-images 0 = all)."""
    changes = {"model.name": args.model, "model.options": parse_model_options(getattr(args, "model_option", None)),
               "train.seed": args.seed, "train.schedule": args.schedule, "train.max_minutes": args.max_minutes}
    for flag, (field, _, _) in BCCD_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if flag in ("--stain", "--shift") and not 0 <= value <= 1:
            raise BloodsegError(f"{flag} must be a strength from 0 (off) to 1; got {value}")
        if flag == "--val-images" and value < 0:
            raise BloodsegError(f"--val-images must be 0 (all) or positive; got {value}")
        if flag not in ("--stain", "--shift", "--val-images") and not value > 0:
            raise BloodsegError(f"{flag} must be positive; got {value}")
        changes[field] = None if flag == "--val-images" and value == 0 else value
    base = REAL_PRESETS["ship"] if getattr(args, "profile", None) is None else real_recipe(args.profile)
    r = base.replace("cli", **changes)
    r.train.validate()
    return r
