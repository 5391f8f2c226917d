"""Training and evaluation: ``fit``, ``evaluate``, checkpoints, DistributedDataParallel.

Read top to bottom:

* :class:`TrainConfig` — every knob of a run, a plain dataclass.
* :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`load_model` — atomic writes,
  ``torch.load(weights_only=True)`` reads, enough metadata to rebuild the model.
* :func:`fit` — Adam/AdamW + cross-entropy, keeps the checkpoint with the lowest validation
  loss (the paper's Keras callback), writes ``last.pt`` for resuming, runs unchanged under
  ``torchrun`` (DDP: NCCL on CUDA, gloo on CPU).
* :func:`evaluate` — one confusion matrix over a dataset → PA / CPA / MIoU, plus the paper's
  "time for 20 images" measured after warm-up.

Determinism: all randomness of epoch ``e`` (the data order) is derived from ``(seed, e)``,
so a run killed at any checkpoint and resumed ends with bit-identical weights on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import BloodsegError, CheckpointError, TrainingError
from .metrics import ConfusionMatrix, per_image_scores, scores
from .models import build_model
from .ode import nfe_report
from .postprocess import check_postprocess

CHECKPOINT_FORMAT = "bloodseg-checkpoint/1"


# --------------------------------------------------------------------------- config

@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run.

    Several processes (``torchrun``, :mod:`bloodseg.distributed`): ``batch_size`` is per process,
    so N processes train with an effective (global) batch of ``batch_size * N`` and take N times
    fewer steps per epoch. ``scale_lr=True`` multiplies ``lr`` by N, the linear scaling rule of
    Goyal et al. (2017) for a batch N times larger; without it the learning rate stays ``lr``.
    ``sync_bn`` (default) computes BatchNorm statistics over the global batch, so N processes
    compute the gradients one process would on the whole batch; ``sync_bn=False`` keeps
    per-process statistics (what Keras' ``multi_gpu_model`` did) and copies rank 0's running
    statistics to all processes at every step.
    """
    epochs: int = 50
    batch_size: int = 8            # per process; the effective batch is batch_size * world size
    lr: float = 1e-3
    optimizer: str = "adam"        # "adam" or "adamw"
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0      # also write last.pt every N steps inside an epoch (0: epoch ends only)
    bf16: bool = False             # bf16 autocast on CUDA (ignored on CPU)
    num_workers: int = 0
    progress: bool | None = None   # tqdm bars; None = only when attached to a terminal/notebook
    scale_lr: bool = False         # multiply lr by the world size (linear scaling rule)
    sync_bn: bool = True           # under DDP: BatchNorm statistics of the global batch
    schedule: str = "constant"     # "constant" lr, or "cosine": lr * (1 + cos(pi * epoch / epochs)) / 2
    max_minutes: float = 0.0       # > 0: start no new epoch once this much wall time would be exceeded

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise BloodsegError(f"epochs and batch_size must be >= 1; got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BloodsegError(f"learning rate must be a positive number; got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise BloodsegError(f"optimizer must be 'adam' or 'adamw'; got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise BloodsegError(f"schedule must be 'constant' or 'cosine'; got {self.schedule!r}")
        if not (self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise BloodsegError(f"max_minutes must be 0 (no limit) or a positive number; got {self.max_minutes}")
        if self.checkpoint_every < 0 or self.num_workers < 0:
            raise BloodsegError(f"checkpoint_every and num_workers must be >= 0; got "
                                f"{self.checkpoint_every}, {self.num_workers}")


def epoch_lr(cfg: TrainConfig, base_lr: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): ``base_lr``, or its cosine decay over ``cfg.epochs``.

    A function of the epoch alone, so a resumed run continues the schedule exactly."""
    if cfg.schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return base_lr


# --------------------------------------------------------------------------- distributed

@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    ``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` for every process it starts, on one machine or many. Backend: NCCL on CUDA
    (each process on GPU ``LOCAL_RANK``), gloo on CPU; ``backend`` overrides (e.g. ``"gloo"``
    to train on CPU on a machine that has GPUs). Without ``WORLD_SIZE`` > 1 this is a no-op (one
    process). A process group that already exists is used as it is. Leave it with
    :func:`cleanup_distributed`.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        visible = torch.cuda.device_count()
        if local >= visible:
            raise BloodsegError(
                f"this process has LOCAL_RANK {local} and so needs GPU {local}, but only {visible} CUDA "
                f"device(s) are visible: start at most {visible} process(es) per machine "
                f"(torchrun --nproc-per-node={visible}), or train on the CPU with gloo by hiding the "
                "GPUs (CUDA_VISIBLE_DEVICES=)")
        torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, device_id=torch.device("cuda", local))
    else:
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def cleanup_distributed() -> None:
    """Leave the process group (if any); call once at the end of a ``torchrun`` process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def default_device(info: DistInfo | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", (info or DistInfo()).local_rank)
    return torch.device("cpu")


def _all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --------------------------------------------------------------------------- checkpoints

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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path, model, optimizer=None, **state) -> Path:
    """Save weights plus what is needed to rebuild the model and resume training."""
    net = _unwrap(model)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(payload, path)
    return path


def update_checkpoint(path, out=None, **entries) -> Path:
    """Write checkpoint ``path`` again (to ``out``, default in place, atomically) with top-level
    ``entries`` added or replaced, e.g. ``postprocess=...`` or ``metrics=...``; weights untouched."""
    ckpt = load_checkpoint(path)
    ckpt.update(entries)
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
    """Rebuild the model a checkpoint describes and load its weights.

    ``classes`` / ``name``, when given, must match the checkpoint (a clear error otherwise).
    ``option_overrides`` may change solver settings (e.g. ``rtol``) but not the architecture.
    """
    opts = dict(ckpt["model_options"])
    if name is not None and name != ckpt["model_name"]:
        raise CheckpointError(f"{path} holds a '{ckpt['model_name']}' model, not '{name}'. "
                              f"Pass the checkpoint of a '{name}' run, or drop the model name.")
    if classes is not None and opts.get("classes", 3) != classes:
        raise CheckpointError(f"{path} predicts {opts.get('classes', 3)} classes, but {classes} "
                              "are needed here. Use a checkpoint trained with the same classes.")
    opts.update(option_overrides)
    model = build_model(ckpt["model_name"], **opts)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"the weights in {path} do not fit a '{ckpt['model_name']}' model "
                              f"with options {opts}: {' '.join(first)}") from None
    if ckpt.get("input_scale", 1.0) != 1.0:
        model.input_scale = float(ckpt["input_scale"])
    if ckpt.get("postprocess") is not None:
        # the mask cleanup chosen for this network (bloodseg.postprocess), applied by predict_image
        try:
            model.postprocess = check_postprocess(ckpt["postprocess"])
        except BloodsegError as exc:
            raise CheckpointError(f"{path} has an invalid 'postprocess' entry: {exc}") from None
    return model


def load_model(path, device=None, classes: int | None = None, name: str | None = None,
               **option_overrides) -> torch.nn.Module:
    """Checkpoint file → model in eval mode on ``device`` (default: CUDA if available)."""
    model = model_from_checkpoint(load_checkpoint(path), path, classes=classes, name=name,
                                  **option_overrides)
    return model.to(device or default_device()).eval()


# --------------------------------------------------------------------------- fit

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(n: int, seed: int, epoch: int, info: DistInfo) -> list[int]:
    """This process's sample order for one epoch, the same on every machine for a given seed.

    Like ``DistributedSampler`` with ``set_epoch(epoch)``: one permutation seeded by
    ``(seed, epoch)``, so the data are reshuffled every epoch and every process draws the same
    permutation without talking to the others; it is padded (repeating its start) to a multiple
    of the world size, then dealt out round-robin so ranks see disjoint shards of equal length,
    hence the same number of steps (DDP needs that: each step is a collective).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if info.world_size > 1 and order:
        target = -(-len(order) // info.world_size) * info.world_size
        while len(order) < target:
            order = order + order[:target - len(order)]
        order = order[info.rank::info.world_size]
    return order


def _progress(iterable, enabled, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


def _loader(dataset, indices, batch_size, num_workers):
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, drop_last=False)


def _sum_nfe(model) -> tuple[int, int]:
    report = nfe_report(_unwrap(model))
    return (sum(int(f) for f, _ in report.values()), sum(int(b) for _, b in report.values()))


def validate(model, dataset, device, batch_size=8, info: DistInfo = DistInfo(),
             classes: int = 3) -> dict:
    """Mean pixel cross-entropy and the confusion-matrix scores over ``dataset`` (sharded by rank).

    Under DDP pass the plain module, not the DDP wrapper: the shards may differ in their number
    of batches, and a DDP forward can be a collective. The sums are all-reduced at the end.
    """
    model.eval()
    indices = list(range(len(dataset)))[info.rank::info.world_size]
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, pixels)
    cm = ConfusionMatrix(classes)
    with torch.no_grad():
        for x, y in _loader(dataset, indices, batch_size, 0):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            loss_sum[1] += y.numel()
            cm.update(logits, y)
    loss_sum = _all_reduce_sum(loss_sum, info)
    matrix = _all_reduce_sum(cm.compute().to(device), info).cpu()
    out = scores(matrix)
    out["loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
    return out


def fit(model: torch.nn.Module, train_set: Dataset, val_set: Dataset, out_dir,
        config: TrainConfig | None = None, device=None, resume: bool = True,
        on_epoch: Callable[[dict], None] | None = None, **overrides) -> list[dict]:
    """Train ``model``; return the history (one dict per epoch).

    Writes to ``out_dir``: ``last.pt`` (everything needed to resume, rewritten atomically at each
    epoch end and every ``checkpoint_every`` steps), ``best.pt`` (lowest validation loss so far),
    ``history.json``. With ``resume=True`` and an existing ``last.pt`` the run continues where it
    stopped.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains data-parallel: the model is
    wrapped in ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU or when ``device="cpu"``),
    each process trains on its shard of every epoch (:func:`epoch_order`), gradients are averaged
    across processes, BatchNorm uses global-batch statistics (``cfg.sync_bn``; the model is given
    back with plain ``BatchNorm2d`` layers), and the effective batch is ``batch_size`` times the
    number of processes (see :class:`TrainConfig` for ``scale_lr``). Loss, validation scores and
    NFE are summed over processes before they enter the history, so every process returns the same
    history. Only rank 0 writes files and calls ``on_epoch``. An epoch-end ``last.pt`` resumes with
    any number of processes; a mid-epoch one only with the number that wrote it.

    Resuming reproduces an uninterrupted run bit for bit on the CPU. On CUDA, cuDNN picks
    non-deterministic kernels by default, so two runs (resumed or not) agree only to rounding;
    ``torch.use_deterministic_algorithms(True)`` (with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``) makes them
    repeatable at some cost in speed.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    cfg.validate()
    device = torch.device(device) if device is not None else None
    info = setup_distributed(backend="gloo" if device is not None and device.type == "cpu" else None)
    device = device if device is not None else default_device(info)
    out_dir = Path(out_dir)
    if info.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BloodsegError(f"cannot write to the output folder {out_dir}: {exc.strerror}. "
                                "Choose a folder you can write to (--out).") from None
    if len(train_set) == 0 or len(val_set) == 0:
        raise BloodsegError(f"training needs data: got {len(train_set)} training and "
                            f"{len(val_set)} validation samples")

    net = _unwrap(model).to(device)
    classes = int(net.options.get("classes", 3))
    lr = cfg.lr * (info.world_size if cfg.scale_lr else 1)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(net.parameters(), lr=lr, weight_decay=cfg.weight_decay)

    start_epoch, start_step, history, best, partial = 0, 0, [], math.inf, None
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last_path.exists():
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
        start_epoch, start_step = ckpt["epoch"], ckpt["step"]
        history, best = list(ckpt["history"]), ckpt["best_val_loss"]
        if start_step and ckpt.get("world_size", 1) != info.world_size:
            raise CheckpointError(
                f"{last_path} was written in the middle of epoch {start_epoch + 1} by a run with "
                f"{ckpt.get('world_size', 1)} process(es); this run has {info.world_size}. The rest "
                "of that epoch is sharded for the old number: resume with the same number of "
                f"processes (at least until the epoch ends). {fresh}")
        # running sums of an interrupted epoch, already summed over processes: rank 0 carries them
        partial = ckpt.get("partial") if info.is_main else None
        _set_rng_state(ckpt["rng"])
    sync_bn = 0
    if info.world_size > 1:
        # imported here so that `python -m bloodseg.distributed` finds it not yet imported
        from .distributed import convert_sync_batchnorm, ddp_options, revert_sync_batchnorm
        if cfg.sync_bn:
            sync_bn = convert_sync_batchnorm(net, device)
        # No buffer broadcast at each forward: synchronised BatchNorm keeps running statistics
        # identical, and the ODE-blocks' NFE counters are per process by design. Per-process
        # BatchNorm (sync_bn=False) gets DDP's default: rank 0's buffers copied to all.
        model = torch.nn.parallel.DistributedDataParallel(
            net, **ddp_options(device, sync_buffers=not cfg.sync_bn))
    else:
        model = net

    show = cfg.progress if cfg.progress is not None else _default_progress()
    show = show and info.is_main
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda"
                else _nullcontext())

    def checkpoint(epoch, step, path=last_path, partial=None):
        if info.is_main:
            save_checkpoint(path, net, optimizer, epoch=epoch, step=step, history=history,
                            best_val_loss=best, rng=_rng_state(), partial=partial,
                            config=dataclasses.asdict(cfg), world_size=info.world_size)

    fit_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_minutes and epoch > start_epoch:
            spent = time.perf_counter() - fit_start
            per_epoch = spent / (epoch - start_epoch)
            stop = torch.tensor([float(spent + per_epoch > 60 * cfg.max_minutes)])
            if _all_reduce_sum(stop.to(device), info).item() > 0:  # every process stops together
                if info.is_main:
                    print(f"fit: stopping after epoch {epoch} of {cfg.epochs}: another epoch would pass "
                          f"max_minutes={cfg.max_minutes:g} ({spent / 60:.1f} min spent)", flush=True)
                break
        for group in optimizer.param_groups:  # the config decides, not the checkpoint (scale_lr, N)
            group["lr"] = epoch_lr(cfg, lr, epoch)
        model.train()
        t0 = time.perf_counter()
        order = epoch_order(len(train_set), cfg.seed, epoch, info)
        step0 = start_step if epoch == start_epoch else 0
        sums = torch.zeros(4, dtype=torch.float64)  # loss*n, n, nfe_fwd, nfe_bwd
        if step0 and partial is not None:
            sums += torch.tensor(partial, dtype=torch.float64)
        batches = _loader(train_set, order[step0 * cfg.batch_size:], cfg.batch_size, cfg.num_workers)
        bar = _progress(batches, show, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        step = step0
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                kept = (f"The last good checkpoint is kept in {last_path} (best: {best_path})"
                        if last_path.exists() else
                        f"No checkpoint was written before it (none in {out_dir})")
                raise TrainingError(
                    f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"training stopped. {kept}. Lower the learning rate (now {lr:g}), add weight "
                    "decay, or tighten the ODE tolerance, then resume.")
            loss.backward()
            optimizer.step()
            step += 1
            nf, nb = _sum_nfe(model)
            sums += torch.tensor([loss.item() * len(x), len(x), nf, nb], dtype=torch.float64)
            if show:
                bar.set_postfix(loss=f"{loss.item():.4f}", nfe=nf)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                so_far = _all_reduce_sum(sums.clone().to(device), info).cpu()  # every rank calls it
                checkpoint(epoch, step, partial=so_far.tolist())
        sums = _all_reduce_sum(sums.to(device), info).cpu()
        n_steps_total = max(1, -(-len(order) // cfg.batch_size)) * info.world_size
        val = validate(net, val_set, device, cfg.batch_size, info, classes)  # not the DDP wrapper
        record = {
            "epoch": epoch + 1,
            "loss": float(sums[0] / sums[1].clamp(min=1)),
            "val_loss": val["loss"],
            "val_miou": val["miou"],
            "val_pa": val["pa"],
            "nfe_forward": float(sums[2] / n_steps_total),
            "nfe_backward": float(sums[3] / n_steps_total),
            "time_s": time.perf_counter() - t0,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(record)
        improved = record["val_loss"] < best
        if improved:
            best = record["val_loss"]
        if info.is_main:
            if improved:
                checkpoint(epoch + 1, 0, best_path)
            checkpoint(epoch + 1, 0)
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        if on_epoch is not None and info.is_main:
            on_epoch(record)
    if info.world_size > 1:
        dist.barrier()
        if sync_bn:
            revert_sync_batchnorm(net)
    return history


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _default_progress() -> bool:
    try:  # in a notebook kernel tqdm.auto draws a widget
        from IPython import get_ipython
        if get_ipython() is not None:
            return True
    except ImportError:
        pass
    import sys
    return sys.stderr.isatty()


# --------------------------------------------------------------------------- evaluate

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: torch.nn.Module, dataset: Dataset, device=None, batch_size: int = 4,
             n_timed: int = 20, warmup: int = 2, per_image: bool = False) -> dict:
    """PA, CPA, IoU per class and MIoU from one confusion matrix over ``dataset``.

    ``time_s`` is the paper's "time for 20 images": ``n_timed`` images passed one at a time
    after ``warmup`` untimed passes, CUDA synchronised. NFE is the forward NFE summed over the
    model's ODE-blocks, averaged over the timed images.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    classes = int(getattr(model, "options", {}).get("classes", 3))
    cm, preds, targets = ConfusionMatrix(classes), [], []
    with torch.inference_mode():
        for x, y in _loader(dataset, list(range(len(dataset))), batch_size, 0):
            pred = model(x.to(device)).argmax(1).cpu()
            cm.update(pred, y)
            if per_image:
                preds.extend(pred)
                targets.extend(y)
        n = min(n_timed, len(dataset))
        images = [dataset[i % len(dataset)][0][None].to(device) for i in range(n)]
        for i in range(min(warmup, n)):
            model(images[i])
        nfe = 0
        _sync(device)
        t0 = time.perf_counter()
        for img in images:
            model(img)
            nfe += sum(int(f) for f, _ in nfe_report(model).values())
        _sync(device)
        elapsed = time.perf_counter() - t0
    out = scores(cm.compute())
    out.update({"time_s": elapsed, "n_timed": n, "nfe_forward": nfe / max(n, 1),
                "n_images": len(dataset), "device": str(device)})
    if per_image:
        out["per_image"] = per_image_scores(preds, targets)
    return out
