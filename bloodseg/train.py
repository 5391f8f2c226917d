"""Training and evaluation: ``fit``, ``validate``, ``evaluate``.

Read top to bottom (the knobs are a :class:`~bloodseg.recipe.TrainRecipe`; checkpoints are
:mod:`bloodseg.checkpoint`; process groups :mod:`bloodseg.distributed`; the run folder's lock and
resume state :mod:`bloodseg.rundir`):

* :func:`fit` — Adam/AdamW + cross-entropy, keeps the checkpoint with the lowest validation
  loss (the paper's Keras callback), writes ``last.pt`` for resuming, runs unchanged under
  ``torchrun`` (DDP: NCCL on CUDA, gloo on CPU).
* :func:`evaluate` — one confusion matrix over a dataset → PA / CPA / MIoU, plus the paper's
  "time for 20 images" measured after warm-up.

Determinism: all randomness of epoch ``e`` (the data order) is derived from ``(seed, e)``,
so a run killed at any checkpoint and resumed ends with bit-identical weights on a CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import save_checkpoint, unwrap
from .distributed import (
    DistInfo,
    all_reduce_sum,
    convert_sync_batchnorm,
    ddp_options,
    default_device,
    revert_sync_batchnorm,
    setup_distributed,
)
from .errors import BloodsegError, CheckpointError, TrainingError
from .io import _writable_dir
from .measure import sync
from .metrics import ConfusionMatrix, per_image_scores, scores
from .ode import nfe_report, ode_blocks, regularisation_loss
from .recipe import Recipe, TrainRecipe
from .rundir import RunState, last_good, resume_state, rng_state, run_lock, stop_on_nan


def epoch_lr(cfg: TrainRecipe, base_lr: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): ``base_lr``, or its cosine decay over ``cfg.epochs``.

    A function of the epoch alone, so a resumed run continues the schedule exactly."""
    if cfg.schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return base_lr


# --------------------------------------------------------------------------- fit

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
    report = nfe_report(unwrap(model))
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
    loss_sum = all_reduce_sum(loss_sum, info)
    matrix = all_reduce_sum(cm.compute().to(device), info).cpu()
    out = scores(matrix)
    out["loss"] = float(loss_sum[0] / loss_sum[1].clamp(min=1))
    return out


def _data_parallel(net, device, cfg: TrainRecipe, info: DistInfo):
    """``(model to train, number of BatchNorm layers made synchronous)``: DDP under torchrun."""
    if info.world_size <= 1:
        return net, 0
    sync_bn = convert_sync_batchnorm(net, device) if cfg.sync_bn else 0
    # No buffer broadcast at each forward: synchronised BatchNorm keeps running statistics
    # identical, and the ODE-blocks' NFE counters are per process by design. Per-process
    # BatchNorm (sync_bn=False) gets DDP's default: rank 0's buffers copied to all.
    ddp = torch.nn.parallel.DistributedDataParallel(net, **ddp_options(device, sync_buffers=not cfg.sync_bn))
    return ddp, sync_bn


def _out_of_time(cfg: TrainRecipe, epoch: int, first: int, started: float, device, info: DistInfo) -> bool:
    """``max_minutes``: would one more epoch (at the mean pace so far) pass the limit? All
    processes decide together."""
    if not cfg.max_minutes or epoch == first:
        return False
    spent = time.perf_counter() - started
    stop = torch.tensor([float(spent + spent / (epoch - first) > 60 * cfg.max_minutes)])
    if all_reduce_sum(stop.to(device), info).item() == 0:
        return False
    if info.is_main:
        print(f"fit: stopping after epoch {epoch} of {cfg.epochs}: another epoch would pass "
              f"max_minutes={cfg.max_minutes:g} ({spent / 60:.1f} min spent)", flush=True)
    return True


def fit(model: torch.nn.Module, train_set: Dataset, val_set: Dataset, out_dir,
        recipe: "Recipe | TrainRecipe | None" = None, device=None, resume: bool = True,
        on_epoch: Callable[[dict], None] | None = None, **overrides) -> list[dict]:
    """Train ``model``; return the history (one dict per epoch).

    ``recipe``: a :class:`~bloodseg.recipe.Recipe` (its ``train`` section is used, and the whole
    recipe is stored in the checkpoints) or a :class:`~bloodseg.recipe.TrainRecipe`;
    ``overrides`` replace fields of the training section (``epochs=3``).

    Writes to ``out_dir``: ``last.pt`` (everything needed to resume, rewritten atomically at each
    epoch end and every ``checkpoint_every`` steps), ``best.pt`` (lowest validation loss so far),
    ``history.json``. With ``resume=True`` and an existing ``last.pt`` the run continues where it
    stopped.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call trains data-parallel: the model is
    wrapped in ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU or when ``device="cpu"``),
    each process trains on its shard of every epoch (:func:`epoch_order`), gradients are averaged
    across processes, BatchNorm uses global-batch statistics (``sync_bn``; the model is given
    back with plain ``BatchNorm2d`` layers), and the effective batch is ``batch_size`` times the
    number of processes (see :class:`~bloodseg.recipe.TrainRecipe` for ``scale_lr``). Loss,
    validation scores and NFE are summed over processes before they enter the history, so every
    process returns the same history. Only rank 0 writes files and calls ``on_epoch``. An
    epoch-end ``last.pt`` resumes with any number of processes; a mid-epoch one only with the
    number that wrote it.

    ``ode_reg`` in the recipe (``{"kinetic": a, "jacobian": b}``) regularises every ODE-block
    (:attr:`bloodseg.ode.ODEBlock.regularise`) during the run: the blocks' penalties are added to
    the cross-entropy, and the history gains ``reg_loss`` (the mean penalty per step; ``loss``
    stays the cross-entropy alone, comparable to ``val_loss``) next to the NFE per step.

    Resuming reproduces an uninterrupted run bit for bit on the CPU. On CUDA, cuDNN picks
    non-deterministic kernels by default, so two runs (resumed or not) agree only to rounding;
    ``torch.use_deterministic_algorithms(True)`` (with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``) makes them
    repeatable at some cost in speed.
    """
    full_recipe = recipe if isinstance(recipe, Recipe) else None
    cfg = dataclasses.replace(full_recipe.train if full_recipe else (recipe or TrainRecipe()), **overrides)
    cfg.validate()
    if len(train_set) == 0 or len(val_set) == 0:
        raise BloodsegError(f"training needs data: got {len(train_set)} training and "
                            f"{len(val_set)} validation samples")
    device = torch.device(device) if device is not None else None
    info = setup_distributed(backend="gloo" if device is not None and device.type == "cpu" else None)
    device = device if device is not None else default_device(info)
    out_dir = _writable_dir(Path(out_dir)) if info.is_main else Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    with run_lock(out_dir, info):   # one training run per folder (rank 0 holds it)
        net = unwrap(model).to(device)
        classes = int(net.options.get("classes", 3))
        blocks = ode_blocks(net)
        if cfg.ode_reg and not blocks:
            raise BloodsegError(f"ode_reg={cfg.ode_reg} regularises ODE-blocks, and model "
                                f"'{getattr(net, 'name', type(net).__name__)}' has none")
        lr = cfg.lr * (info.world_size if cfg.scale_lr else 1)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(net.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        state = resume_state(last_path, net, optimizer, info) if resume and last_path.exists() else RunState()
        model, sync_bn = _data_parallel(net, device, cfg, info)
        show = (cfg.progress if cfg.progress is not None else _default_progress()) and info.is_main
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda"
                    else contextlib.nullcontext())
        stored = full_recipe.replace(train=cfg).to_dict() if full_recipe else None

        def checkpoint(epoch, step, path=last_path, partial=None):
            if info.is_main:
                try:
                    save_checkpoint(path, net, optimizer, epoch=epoch, step=step, history=state.history,
                                    best_val_loss=state.best, rng=rng_state(), partial=partial,
                                    config=dataclasses.asdict(cfg), recipe=stored, world_size=info.world_size)
                except CheckpointError as exc:   # a full disk: say where the run can resume from
                    raise CheckpointError(f"{exc} {last_good(last_path)}") from None

        for block in blocks:   # the recipe decides; switched off again below
            block.regularise = cfg.ode_reg
        first, started = state.epoch, time.perf_counter()
        for epoch in range(first, cfg.epochs):
            if _out_of_time(cfg, epoch, first, started, device, info):
                break
            for group in optimizer.param_groups:  # the recipe decides, not the checkpoint (scale_lr, N)
                group["lr"] = epoch_lr(cfg, lr, epoch)
            model.train()
            t0 = time.perf_counter()
            if hasattr(train_set, "set_epoch"):   # patches drawn afresh each epoch (bloodseg.shift)
                train_set.set_epoch(epoch)
            order = epoch_order(len(train_set), cfg.seed, epoch, info)
            step0 = state.step if epoch == first else 0
            sums = torch.zeros(5, dtype=torch.float64)  # loss*n, n, nfe_fwd, nfe_bwd, ODE penalty
            if step0 and state.partial is not None:   # (older last.pt files hold the first 4)
                sums[:len(state.partial)] += torch.tensor(state.partial, dtype=torch.float64)
            batches = _loader(train_set, order[step0 * cfg.batch_size:], cfg.batch_size, cfg.num_workers)
            bar = _progress(batches, show, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
            step = step0
            for x, y in bar:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                penalty = regularisation_loss(blocks) if cfg.ode_reg else None
                total = loss if penalty is None else loss + penalty
                if not torch.isfinite(total):
                    stop_on_nan(total, epoch, step, lr, out_dir, last_path, best_path)
                total.backward()
                optimizer.step()
                step += 1
                nf, nb = _sum_nfe(model)
                reg = 0.0 if penalty is None else penalty.item()
                sums += torch.tensor([loss.item() * len(x), len(x), nf, nb, reg], dtype=torch.float64)
                if show:
                    bar.set_postfix(loss=f"{loss.item():.4f}", nfe=nf)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    so_far = all_reduce_sum(sums.clone().to(device), info).cpu()  # every rank calls it
                    checkpoint(epoch, step, partial=so_far.tolist())
            sums = all_reduce_sum(sums.to(device), info).cpu()
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
            if cfg.ode_reg:
                record["reg_loss"] = float(sums[4] / n_steps_total)
            state.history.append(record)
            improved = record["val_loss"] < state.best
            if improved:
                state.best = record["val_loss"]
            if info.is_main:
                if improved:
                    checkpoint(epoch + 1, 0, best_path)
                checkpoint(epoch + 1, 0)
                try:
                    (out_dir / "history.json").write_text(json.dumps(state.history, indent=1))
                except OSError as exc:
                    raise TrainingError(f"cannot write {out_dir / 'history.json'} ({exc.strerror or exc}). "
                                        f"{last_good(last_path)}") from None
                if on_epoch is not None:
                    on_epoch(record)
        for block in blocks:
            block.regularise = None
        if info.world_size > 1:
            dist.barrier()
            if sync_bn:
                revert_sync_batchnorm(net)
        return state.history


def _default_progress() -> bool:
    try:  # in a notebook kernel tqdm.auto draws a widget
        from IPython import get_ipython
        if get_ipython() is not None:
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()


# --------------------------------------------------------------------------- evaluate

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
        sync(device)
        t0 = time.perf_counter()
        for img in images:
            model(img)
            nfe += sum(int(f) for f, _ in nfe_report(model).values())
        sync(device)
        elapsed = time.perf_counter() - t0
    out = scores(cm.compute())
    out.update({"time_s": elapsed, "n_timed": n, "nfe_forward": nfe / max(n, 1),
                "n_images": len(dataset), "device": str(device)})
    if per_image:
        out["per_image"] = per_image_scores(preds, targets)
    return out
