"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain values: ``format``, ``model_name``,
``model_options``, ``model_state`` (the weights), and whatever the writer adds (``recipe``,
``history``, ``metrics``, the optimizer state for resuming, and a :class:`bloodseg.Segmenter`'s
use settings). Reading refuses anything that would need arbitrary Python objects to unpickle.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .distributed import default_device
from .errors import BloodsegError, CheckpointError
from .models import build_model


CHECKPOINT_FORMAT = "bloodseg-checkpoint/1"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:   # a full disk (ENOSPC, EFBIG), a read-only or vanished folder
        # torch's zip writer reports a failed write as RuntimeError ("unexpected pos ...")
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else \
            f"the write failed: {str(exc).splitlines()[0][:160]}; is the disk full?"
        kept = (f"the previous {path.name} is kept unchanged" if path.exists()
                else f"no {path.name} was written")
        raise CheckpointError(f"cannot write checkpoint {path.absolute()} ({reason}); {kept}. "
                              "Free disk space or choose another output folder, then run again.") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path, model, optimizer=None, **state) -> Path:
    """Save weights plus what is needed to rebuild the model and resume training."""
    net = unwrap(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": net.name,
        "model_options": dict(net.options),
        "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "torch_version": str(torch.__version__),
        # a model trained on resized images (realdata: BCCD at half size) keeps its scale, so that
        # predict_image resizes every image the same way (see bloodseg.infer)
        **({"input_scale": float(net.input_scale)} if getattr(net, "input_scale", 1.0) != 1.0 else {}),
        **({"postprocess": dict(net.postprocess)} if getattr(net, "postprocess", None) else {}),
        **state,
    }
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the folder {path.parent.absolute()} for checkpoint {path.name} "
                              f"({exc.strerror or exc}); choose an output folder you can write to") from None
    _atomic_torch_save(payload, path)
    return path


def update_checkpoint(path, out=None, **entries) -> Path:
    """Write checkpoint ``path`` again (to ``out``, default in place, atomically) with top-level
    ``entries`` added or replaced, e.g. ``postprocess=...`` or ``metrics=...``; weights untouched."""
    ckpt = load_checkpoint(path)
    ckpt.update(entries)
    if isinstance(ckpt.get("segmenter"), dict):   # a Segmenter's settings win over the top level: keep them in step
        for key in ("input_scale", "postprocess"):
            if key in entries and "segmenter" not in entries:
                ckpt["segmenter"] = {**ckpt["segmenter"], key: entries[key]}
    target = Path(out) if out is not None else Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(ckpt, target)
    return target


def load_checkpoint(path) -> dict:
    """Read a checkpoint safely: tensors and plain Python values only (``weights_only=True``).

    A file that would need arbitrary Python objects to load (the way a malicious pickle runs
    code) is refused, as are files that are not bloodseg checkpoints at all.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Pass the .pt file a `bloodseg train` "
                              "run wrote (best.pt or last.pt in its --out folder).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        if "GLOBAL" in str(exc):  # the pickle references a Python function or class
            raise CheckpointError(
                f"refused to load {path}: it references Python code or objects other than tensors "
                "and plain values, which could run code when unpickled. bloodseg only loads "
                "weights-only checkpoints; if you trust the file, load it yourself and re-save the "
                "weights with bloodseg.save_checkpoint.") from None
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt or not a PyTorch "
                              f"checkpoint ({type(exc).__name__}). Use a best.pt/last.pt written "
                              "by bloodseg.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a bloodseg checkpoint (no "
                              f"'format': '{CHECKPOINT_FORMAT}' entry).")
    return ckpt


def model_from_checkpoint(ckpt: dict, path="checkpoint", classes: int | None = None,
                          name: str | None = None, **option_overrides) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (the bare ``nn.Module``;
    :meth:`bloodseg.Segmenter.load` adds what is needed to use it on photographs).

    ``classes`` / ``name``, when given, must match the checkpoint (a clear error otherwise).
    ``option_overrides`` may change solver settings (e.g. ``rtol``) but not the architecture.
    """
    missing = [k for k in ("model_name", "model_options", "model_state") if k not in ckpt]
    if missing or not isinstance(ckpt["model_name"], str) or not isinstance(ckpt["model_options"], dict) \
            or not isinstance(ckpt["model_state"], dict):
        raise CheckpointError(f"{path} is damaged: " + (f"it lacks {', '.join(missing)}" if missing else
                              "model_name must be a string, model_options and model_state dicts")
                              + ". Use a best.pt/last.pt written by bloodseg.")
    opts = dict(ckpt["model_options"])
    if name is not None and name != ckpt["model_name"]:
        raise CheckpointError(f"{path} holds a '{ckpt['model_name']}' model, not '{name}'. "
                              f"Pass the checkpoint of a '{name}' run, or drop the model name.")
    if classes is not None and opts.get("classes", 3) != classes:
        raise CheckpointError(f"{path} predicts {opts.get('classes', 3)} classes, but {classes} "
                              "are needed here. Use a checkpoint trained with the same classes.")
    opts.update(option_overrides)
    try:
        model = build_model(ckpt["model_name"], **opts)
    except (BloodsegError, TypeError, ValueError, KeyError, RuntimeError) as exc:   # RuntimeError: out of memory
        raise CheckpointError(f"{path} describes a model that cannot be built ('{ckpt['model_name']}' "
                              f"with options {opts!r:.200}): {exc}. Use a best.pt/last.pt written by "
                              "bloodseg.") from None
    try:
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"the weights in {path} do not fit a '{ckpt['model_name']}' model "
                              f"with options {opts}: {' '.join(first)}") from None
    return model


def load_model(path, device=None, classes: int | None = None, name: str | None = None,
               **option_overrides) -> torch.nn.Module:
    """Checkpoint file → bare network in eval mode on ``device`` (default: CUDA if available)."""
    model = model_from_checkpoint(load_checkpoint(path), path, classes=classes, name=name,
                                  **option_overrides)
    return model.to(device or default_device()).eval()
