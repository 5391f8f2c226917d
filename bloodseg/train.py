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

CHECKPOINT_FORMAT = "bloodseg-checkpoint/1"


# --------------------------------------------------------------------------- config

@dataclasses.dataclass
class TrainConfig:
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

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise BloodsegError(f"epochs and batch_size must be >= 1; got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BloodsegError(f"learning rate must be a positive number; got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise BloodsegError(f"optimizer must be 'adam' or 'adamw'; got {self.optimizer!r}")


# --------------------------------------------------------------------------- distributed

@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL on CUDA, gloo on CPU. Without ``WORLD_SIZE`` > 1 this is a no-op (one process).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


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
        **state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(payload, path)
    return path


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
                              "were asked for. Use a checkpoint trained with the same classes.")
    opts.update(option_overrides)
    model = build_model(ckpt["model_name"], **opts)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(f"the weights in {path} do not fit a '{ckpt['model_name']}' model "
                              f"with options {opts}: {' '.join(first)}") from None
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

    Like ``DistributedSampler``: one seeded permutation per epoch, padded to a multiple of the
    world size, then dealt out round-robin so ranks see disjoint shards.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if info.world_size > 1:
        pad = (-len(order)) % info.world_size
        order = order + order[:pad]
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
    """Mean pixel cross-entropy and the confusion-matrix scores over ``dataset`` (sharded by rank)."""
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
    stopped. Under ``torchrun`` the model is wrapped in DDP; only rank 0 writes files.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    cfg.validate()
    info = setup_distributed()
    device = torch.device(device) if device is not None else default_device(info)
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
        if ckpt["model_name"] != net.name:
            raise CheckpointError(f"{last_path} belongs to a '{ckpt['model_name']}' run, not "
                                  f"'{net.name}'. Use another --out folder or resume=False.")
        net.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step"]
        history, best = list(ckpt["history"]), ckpt["best_val_loss"]
        partial = ckpt.get("partial")  # running sums of an interrupted epoch
        _set_rng_state(ckpt["rng"])

    if info.world_size > 1:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(net, **ddp_kw)
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

    for epoch in range(start_epoch, cfg.epochs):
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
                raise TrainingError(
                    f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"training stopped. The last good checkpoint is kept in {last_path} "
                    f"(best: {best_path}). Lower the learning rate (now {lr:g}), add weight "
                    "decay, or tighten the ODE tolerance, then resume.")
            loss.backward()
            optimizer.step()
            step += 1
            nf, nb = _sum_nfe(model)
            sums += torch.tensor([loss.item() * len(x), len(x), nf, nb], dtype=torch.float64)
            if show:
                bar.set_postfix(loss=f"{loss.item():.4f}", nfe=nf)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, step, partial=sums.tolist())
        sums = _all_reduce_sum(sums.to(device), info).cpu()
        n_steps_total = max(1, -(-len(order) // cfg.batch_size)) * info.world_size
        val = validate(model, val_set, device, cfg.batch_size, info, classes)
        record = {
            "epoch": epoch + 1,
            "loss": float(sums[0] / sums[1].clamp(min=1)),
            "val_loss": val["loss"],
            "val_miou": val["miou"],
            "val_pa": val["pa"],
            "nfe_forward": float(sums[2] / n_steps_total),
            "nfe_backward": float(sums[3] / n_steps_total),
            "time_s": time.perf_counter() - t0,
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
