"""A training run's folder: one run at a time, where it stands, and what to say when it fails.

:func:`bloodseg.train.fit` writes ``last.pt`` (everything needed to resume) and ``best.pt`` into a
run folder. This module holds what that needs besides the training loop:

* :func:`run_lock` — rank 0 holds ``.lock`` (its pid) while it trains, so a second run into the
  same folder is refused instead of overwriting ``last.pt`` under the first;
* :class:`RunState` and :func:`resume_state` — where a run stands (epoch, step, history, best
  validation loss, running sums of an interrupted epoch) and how ``last.pt`` restores it, weights,
  optimizer and random state included, so that a resumed run ends bit-identical on a CPU;
* :func:`last_good` and :func:`stop_on_nan` — error messages that say where the run can resume from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .distributed import DistInfo
from .errors import CheckpointError, TrainingError


def rng_state() -> dict:
    """The random state a resumed run needs: torch's (and every CUDA device's)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass
class RunState:
    """Where a run stands: what :func:`bloodseg.train.fit` resumes from and writes into ``last.pt``."""
    epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    best: float = math.inf
    partial: list | None = None     # running sums of an interrupted epoch (rank 0 only)


def resume_state(last_path: Path, net, optimizer, info: DistInfo) -> RunState:
    """The state stored in ``last_path`` (weights, optimizer and RNG restored in place)."""
    ckpt = load_checkpoint(last_path)
    fresh = "Use another --out folder, or start over with --restart (resume=False)."
    if ckpt["model_name"] != net.name:
        raise CheckpointError(f"{last_path} belongs to a '{ckpt['model_name']}' run, not "
                              f"'{net.name}'. {fresh}")
    missing = [k for k in ("optimizer_state", "epoch", "step", "history", "best_val_loss", "rng")
               if ckpt.get(k) is None]
    if missing:
        raise CheckpointError(f"{last_path} cannot resume a run: it lacks {', '.join(missing)} "
                              f"(it was not written by fit). {fresh}")
    try:
        net.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
    except (RuntimeError, ValueError, KeyError):
        raise CheckpointError(
            f"{last_path} holds a '{ckpt['model_name']}' model with options "
            f"{ckpt['model_options']}; its weights do not fit this model with options "
            f"{dict(net.options)}. {fresh}") from None
    if ckpt["step"] and ckpt.get("world_size", 1) != info.world_size:
        raise CheckpointError(
            f"{last_path} was written in the middle of epoch {ckpt['epoch'] + 1} by a run with "
            f"{ckpt.get('world_size', 1)} process(es); this run has {info.world_size}. The rest "
            "of that epoch is sharded for the old number: resume with the same number of "
            f"processes (at least until the epoch ends). {fresh}")
    set_rng_state(ckpt["rng"])
    # running sums of an interrupted epoch, already summed over processes: rank 0 carries them
    return RunState(ckpt["epoch"], ckpt["step"], list(ckpt["history"]), ckpt["best_val_loss"],
                    ckpt.get("partial") if info.is_main else None)


def last_good(last_path: Path) -> str:
    """Where a failed run can resume from (a sentence for an error message)."""
    if last_path.exists():
        return (f"The last good checkpoint is {last_path.absolute()}: free disk space and run again "
                "with the same output folder to resume from it.")
    return f"No checkpoint of this run was written yet (none in {last_path.parent.absolute()})."


def stop_on_nan(loss, epoch: int, step: int, lr: float, out_dir: Path, last_path: Path, best_path: Path):
    """Raise :class:`TrainingError`: the loss is not finite; what is kept and what to change."""
    kept = (f"The last good checkpoint is kept in {last_path} (best: {best_path})"
            if last_path.exists() else f"No checkpoint was written before it (none in {out_dir})")
    raise TrainingError(
        f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
        f"training stopped. {kept}. Lower the learning rate (now {lr:g}), add weight "
        "decay, or tighten the ODE tolerance, then resume.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        return True
    try:                         # a killed run its parent has not reaped yet is a zombie: gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def run_lock(out_dir: Path, info: DistInfo):
    """Rank 0 holds ``out_dir/.lock`` (its pid) while it trains: a second :func:`~bloodseg.train.fit`
    into the same folder is refused instead of overwriting ``last.pt`` under the first. A lock whose
    pid is not alive (a killed run), or is this process's own (a restarted container), is stale and
    taken over."""
    if not info.is_main:
        yield
        return
    lock = out_dir / ".lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = lock.read_text().strip()
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:      # released meanwhile: try again
                continue
            except OSError:
                text, age = "", 0.0
            pid = int(text) if text.isdigit() else None
            if (pid is not None and pid != os.getpid() and _pid_alive(pid)) or (pid is None and age < 30):
                who = f"pid {pid}" if pid is not None else "a process that is starting"
                raise TrainingError(f"another training run ({who}) is writing to {out_dir.absolute()} "
                                    f"(lock file {lock.absolute()}). Wait for it to finish or choose another "
                                    f"output folder; if no such run exists, delete {lock.absolute()}.") from None
            lock.unlink(missing_ok=True)   # stale: its process is gone
            continue
        except OSError as exc:
            raise TrainingError(f"cannot create the lock file {lock.absolute()} ({exc.strerror or exc}); "
                                "choose an output folder you can write to") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        break
    else:
        raise TrainingError(f"could not take the lock {lock.absolute()}; another run keeps taking it. "
                            "Choose another output folder.")
    try:
        yield
    finally:
        try:
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()
        except OSError:
            pass
