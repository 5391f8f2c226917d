"""Training on several processes: GPUs of one machine, several machines, or CPU cores.

The paper trained on four GPUs with Keras' ``multi_gpu_model`` (§4.1): one copy of the model per
GPU, each batch cut into four slices, the four outputs concatenated on the host. bloodseg uses
PyTorch's own engine instead, ``torchrun`` + ``DistributedDataParallel`` (DDP): one *process* per
device, each with a full replica of the model and its own shard of the data; after each backward
the gradients are averaged across processes (an all-reduce), so every replica takes the same
optimizer step. :func:`bloodseg.train.fit` does this by itself when it runs under ``torchrun``;
this module holds what goes around it, in reading order:

* :class:`SyncBatchNorm2d`, :func:`convert_sync_batchnorm`, :func:`revert_sync_batchnorm` — batch
  statistics of the *global* batch. ``torch.nn.SyncBatchNorm`` does this on CUDA but refuses CPU
  tensors (torch 2.13: "SyncBatchNorm expected input tensor to be on GPU"), so for gloo on CPU
  bloodseg has a small pure-PyTorch version built on a differentiable all-reduce.
* :func:`torchrun_command`, :func:`slurm_script` — the command lines for one machine, several
  machines, and a SLURM cluster; :func:`launch` runs one from Python or a notebook.
* :func:`benchmark` / :func:`measure_throughput` — images per second of training steps against
  the number of processes (``python -m bloodseg.cli ddp-bench`` under ``torchrun``).
* :func:`gradient_check` — do N processes compute the gradients one process computes on the
  whole batch? (``python -m bloodseg.cli ddp-gradcheck`` under ``torchrun``.)
* :func:`batch_and_lr` and the ``plot_*`` helpers of the book's chapter "Multi-GPU training".
* :func:`record_throughput` — the CPU throughput the chapter reads instead of measuring it at every
  build (``python -m bloodseg.paper.ddp_scaling record-throughput``, a JSON record with provenance:
  commit, command, device, load average, torch, date, wall time); :func:`~bloodseg.paper.records.load_record` reads it back.

Effective batch and learning rate: ``TrainConfig.batch_size`` is per process, so ``N`` processes
train with a global batch of ``batch_size * N``, and one epoch takes ``N`` times fewer steps. With
``scale_lr=True`` the learning rate is multiplied by ``N`` (the linear scaling rule of Goyal et
al. 2017); without it the global batch grows and the learning rate stays.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..datasets import SegmentationDataset, extract_patches, synthetic_splits
from ..distributed import (
    convert_sync_batchnorm,
    ddp_options,
    default_device,
    setup_distributed,
)
from ..errors import BloodsegError
from ..measure import sync
from ..models import build_model
from ..ode import nfe_report
from .records import load_record, provenance, provenance_line, write_record

__all__ = [
    "torchrun_command",
    "slurm_script",
    "launch",
    "LaunchResult",
    "cpu_cores",
    "benchmark",
    "measure_throughput",
    "bench_command",
    "gradient_check",
    "gradcheck_command",
    "GRADCHECK_CONFIGS",
    "batch_and_lr",
    "plot_batch_and_lr",
    "plot_gradient_check",
    "plot_history",
    "plot_throughput",
    "CPU_SETTINGS",
    "CPU_BENCH",
    "THROUGHPUT_RECORD",
    "record_throughput",
    "load_record",
    "provenance_line",
]


# --------------------------------------------------------------------------- synchronised BatchNorm



# --------------------------------------------------------------------------- command lines

def torchrun_command(args, nproc_per_node: int | str = 1, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, node_rank: int | str | None = None,
                     rdzv_id: str | None = None, module: str | None = "bloodseg.cli") -> list[str]:
    """The ``torchrun`` command line that runs ``python -m <module> <args>`` on every process
    (``module=None``: ``args[0]`` is a Python script).

    * one machine (``nnodes=1``, no endpoint): ``--standalone`` (torchrun picks a free port);
    * several machines with ``node_rank`` given: static rendezvous, run the same command on every
      machine with its own ``--node-rank`` (0 on the machine at ``rdzv_endpoint``);
    * several machines without ``node_rank``: the c10d rendezvous (one identical command on
      every machine, ranks are handed out when they meet; ``rdzv_id`` names the job).

    ``nproc_per_node`` is a number, or ``"gpu"`` (one process per visible GPU).
    """
    cmd = ["torchrun", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.insert(1, "--standalone")
    else:
        if not rdzv_endpoint:
            raise BloodsegError("several machines need rdzv_endpoint='host:port' (the machine that "
                                "hosts the rendezvous, reachable from all of them)")
        cmd.insert(1, f"--nnodes={nnodes}")
        if node_rank is not None:
            cmd += [f"--node-rank={node_rank}", f"--rdzv-endpoint={rdzv_endpoint}"]
        else:
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                    f"--rdzv-id={rdzv_id or 'bloodseg'}"]
    return cmd + (["-m", module] if module else []) + [str(a) for a in args]


def slurm_script(args, nodes: int = 2, gpus_per_node: int = 4, cpus_per_task: int = 16,
                 time_limit: str = "04:00:00", job_name: str = "bloodseg", port: int = 29500,
                 venv: str = ".venv") -> str:
    """An ``sbatch`` script: one ``torchrun`` per node started by ``srun``, c10d rendezvous on the
    first node of the allocation, one process per GPU."""
    train = shlex.join(str(a) for a in args)
    return f"""#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
# one task per node: a torchrun, which starts one process per GPU
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time_limit}
#SBATCH --output=%x-%j.out
set -euo pipefail
source {venv}/bin/activate
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK >= {gpus_per_node} ? SLURM_CPUS_PER_TASK / {gpus_per_node} : 1 ))
srun torchrun \\
    --nnodes="$SLURM_NNODES" --nproc-per-node={gpus_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$head:{port}" --rdzv-id="$SLURM_JOB_ID" \\
    -m bloodseg.cli {train}
"""


@dataclasses.dataclass
class LaunchResult:
    command: list[str]
    returncode: int
    output: str
    wall_s: float


def launch(args, nproc: int = 2, threads_per_process: int | None = None, module: str | None = "bloodseg.cli",
           echo: bool = True, timeout: float | None = None, env: dict | None = None,
           check: bool = True, cwd=None) -> LaunchResult:
    """Run ``torchrun --standalone --nproc-per-node=nproc -m module args`` on this machine
    (``module=None``: ``args[0]`` is a script).

    Uses the running interpreter (``python -m torch.distributed.run`` is ``torchrun``), so it works
    from a notebook inside a virtual environment. ``threads_per_process`` sets ``OMP_NUM_THREADS``
    (default: the CPU cores divided by ``nproc``, at least 1). Output (stdout and stderr) is echoed
    line by line when ``echo`` and returned. ``check``: raise BloodsegError on a non-zero exit.
    ``cwd``: the working directory of the processes (relative paths in ``args`` start there).
    ``MKL_NUM_THREADS`` is set to the same number (an inherited ``MKL_NUM_THREADS=1`` would otherwise
    cap the threads).
    """
    cmd = torchrun_command(args, nproc_per_node=nproc, module=module)
    run_env = dict(os.environ, **(env or {}))
    threads = threads_per_process or max(1, cpu_cores() // nproc)
    run_env["OMP_NUM_THREADS"] = str(threads)
    run_env["MKL_NUM_THREADS"] = str(threads)     # an inherited MKL_NUM_THREADS=1 caps torch at one thread
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    argv = [sys.executable, "-m", "torch.distributed.run"] + cmd[1:]
    t0 = time.perf_counter()
    lines = []
    # its own session, so that a timeout or an interrupt ends torchrun *and* the workers it started
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=run_env, start_new_session=True, cwd=cwd)
    timer = threading.Timer(timeout, _stop, (proc,)) if timeout else None
    try:
        if timer:
            timer.start()
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        if timer:
            timer.cancel()
        proc.stdout.close()
    if timer and time.perf_counter() - t0 >= timeout:
        lines.append(f"[bloodseg] stopped after the {timeout:g} s timeout\n")
    result = LaunchResult(cmd, proc.returncode, "".join(lines), time.perf_counter() - t0)
    if check and result.returncode != 0:
        tail = "".join(lines[-15:])
        raise BloodsegError(f"`{shlex.join(cmd)}` failed with exit status {result.returncode}:\n{tail}")
    return result


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the launched process group (torchrun passes it on to its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- throughput

def benchmark(model: str = "nodes-unet", width: int = 8, patch: int = 64, batch_size: int = 4,
              steps: int = 5, warmup: int = 2, profile: str | None = None, bf16: bool = False,
              seed: int = 0) -> dict:
    """Time ``steps`` training steps (forward, backward, gradient all-reduce, Adam) in this process.

    Run it under ``torchrun`` (``python -m bloodseg.cli ddp-bench``): each process trains on
    its own batches of ``batch_size`` real synthetic patches (cut from the profile's smears to
    ``patch`` px), exactly as :func:`bloodseg.train.fit` does: DDP, synchronised BatchNorm,
    cross-entropy. The data are turned into tensors before the clock starts, so the number is the
    training step itself. Returns (on every rank) the global images per second:
    ``world_size * batch_size * steps / slowest rank's time``.
    """

    info = setup_distributed()
    device = default_device(info)
    torch.manual_seed(seed)
    net = build_model(model, width=width).to(device)
    if info.world_size > 1:
        convert_sync_batchnorm(net, device)
        ddp = nn.parallel.DistributedDataParallel(net, **ddp_options(device, sync_buffers=False))
    else:
        ddp = net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    samples = synthetic_splits(profile)["train"]
    if samples[0].mask.shape[0] != patch:
        samples = extract_patches(samples, patch, 1, seed)
    data = SegmentationDataset(samples)
    need = (warmup + steps) * batch_size
    idx = [(info.rank * need + i) % len(data) for i in range(need)]
    xs = torch.stack([data[i][0] for i in idx]).to(device)
    ys = torch.stack([data[i][1] for i in idx]).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    net.train()
    nfe = []

    def step(k):
        x, y = xs[k * batch_size:(k + 1) * batch_size], ys[k * batch_size:(k + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = ddp(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        nfe.append(sum(f for f, _ in nfe_report(net).values()))

    for k in range(warmup):
        step(k)
    sync(device)
    if info.world_size > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    sync(device)
    elapsed = torch.tensor([time.perf_counter() - t0, sum(nfe[warmup:]) / steps], dtype=torch.float64)
    if info.world_size > 1:
        per_rank = [torch.zeros_like(elapsed) for _ in range(info.world_size)]
        dist.all_gather(per_rank, elapsed.to(device) if device.type == "cuda" else elapsed)
        per_rank = torch.stack([t.cpu() for t in per_rank])
    else:
        per_rank = elapsed[None]
    seconds = float(per_rank[:, 0].max())
    return {"model": model, "width": width, "patch": patch, "processes": info.world_size,
            "device": device.type, "threads_per_process": torch.get_num_threads(),
            "batch_per_process": batch_size, "global_batch": batch_size * info.world_size,
            "steps": steps, "seconds": seconds,
            "images_per_s": batch_size * info.world_size * steps / seconds,
            "nfe_forward_per_rank": [round(float(v), 1) for v in per_rank[:, 1]]}


def measure_throughput(nprocs=(1, 2), model: str = "nodes-unet", width: int = 8, patch: int = 64,
                       batch_size: int = 4, steps: int = 5, warmup: int = 2,
                       profile: str | None = None, out_dir="runs/throughput", echo: bool = False,
                       timeout: float | None = 600) -> list[dict]:
    """Images per second of training steps for each entry of ``nprocs``, one ``torchrun`` launch
    each, run one after the other.

    An entry is a process count ``n`` or a pair ``(n, threads per process)``. A bare ``n`` on CPU
    shares the machine's cores out (``cores // n`` threads per process, so one process may use
    every core: the fair baseline); on CUDA each process has its own GPU. Each row is
    :func:`benchmark`'s result plus ``speedup`` (images/s against the fastest setting with the
    fewest processes) and ``efficiency`` (speedup per process added: 1 is linear scaling).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in nprocs:
        n, threads = (entry if isinstance(entry, (tuple, list)) else (entry, None))
        path = out_dir / f"bench-{model}-{n}x{threads or 'auto'}.json"
        if path.exists():
            path.unlink()
        args = ["ddp-bench", "--model", model, "--width", width, "--patch", patch, "--batch-size",
                batch_size, "--steps", steps, "--warmup", warmup, "--json", path]
        if profile:
            args += ["--profile", profile]
        launch(args, nproc=n, threads_per_process=threads, module="bloodseg.cli",
               echo=echo, timeout=timeout)
        rows.append(json.loads(path.read_text()))
    base = _baseline(rows)
    for r in rows:
        r["speedup"] = r["images_per_s"] / base["images_per_s"]
        r["efficiency"] = r["speedup"] * base["processes"] / r["processes"]
    return rows


def _baseline(rows: list[dict]) -> dict:
    """The fastest row among those with the fewest processes."""
    fewest = min(r["processes"] for r in rows)
    return max((r for r in rows if r["processes"] == fewest), key=lambda r: r["images_per_s"])


# --------------------------------------------------------------------------- gradient check

#: What :func:`gradient_check` compares by default, each with and without the adjoint: a
#: fixed-grid solver (the same steps whatever the batch) with GroupNorm and with synchronised
#: BatchNorm; the adaptive dopri5 with BatchNorm at a tight tolerance in float64; and dopri5 at the
#: paper's single-block tolerance 1e-3 in float32, where each process's steps differ visibly.
GRADCHECK_CONFIGS = tuple(
    dict(model="ode-unet-5", **setting, adjoint=adjoint)
    for setting in (dict(method="rk4"), dict(method="rk4", norm="batch"),
                    dict(method="dopri5", rtol=1e-6, norm="batch", dtype="float64"),
                    dict(method="dopri5", rtol=1e-3))
    for adjoint in (False, True))


def _config_label(cfg: dict) -> str:
    parts = [cfg.get("model", "ode-unet-5"), cfg.get("norm", "group") + "norm",
             cfg.get("method", "dopri5")]
    if "rtol" in cfg:
        parts.append(f"rtol={cfg['rtol']:g}")
    parts.append("adjoint" if cfg.get("adjoint") else "direct")
    parts.append(cfg.get("dtype", "float32"))
    return " ".join(parts)


def _running_stats(net: nn.Module) -> torch.Tensor:
    stats = [b.reshape(-1).double() for n, b in net.named_buffers() if "running" in n]
    return torch.cat(stats) if stats else torch.zeros(0, dtype=torch.float64)


def _global_batch(batch: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), torch.randint(0, 3, (batch, size, size), generator=g)


def _flat_grads(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in net.parameters()])


def _gradcheck_worker(configs: list[dict], width: int, size: int, batch: int, out: str) -> None:
    """Under torchrun: one training step's gradients with DDP (each rank its slice of the global
    batch) and, on rank 0, without (the whole batch in one process, plain BatchNorm)."""
    info = setup_distributed(backend="gloo")
    if batch % info.world_size:
        raise BloodsegError(f"the global batch ({batch}) must split evenly over {info.world_size} processes")
    x, y = _global_batch(batch, size)
    per = batch // info.world_size
    mine = slice(info.rank * per, (info.rank + 1) * per)
    results = []
    for cfg in configs:
        opts = {k: v for k, v in cfg.items() if k not in ("model", "dtype")}
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        torch.manual_seed(0)
        net = build_model(cfg.get("model", "ode-unet-5"), width=width, **opts).to(dtype)
        n_sync = convert_sync_batchnorm(net, "cpu")
        ddp = nn.parallel.DistributedDataParallel(net, **ddp_options(torch.device("cpu"), False))
        F.cross_entropy(ddp(x[mine].to(dtype)), y[mine]).backward()
        grads = _flat_grads(net)
        nfe = torch.tensor([sum(f for f, _ in nfe_report(net).values()),
                            sum(b for _, b in nfe_report(net).values())], dtype=torch.float64)
        gathered = [torch.zeros_like(grads) for _ in range(info.world_size)]
        dist.all_gather(gathered, grads)
        nfes = [torch.zeros_like(nfe) for _ in range(info.world_size)]
        dist.all_gather(nfes, nfe)
        running = _running_stats(net)
        if info.is_main:
            torch.manual_seed(0)
            ref = build_model(cfg.get("model", "ode-unet-5"), width=width, **opts).to(dtype)
            F.cross_entropy(ref(x.to(dtype)), y).backward()
            results.append({
                "label": _config_label(cfg), "config": dict(cfg), "n_sync_bn": n_sync,
                "ddp": torch.stack(gathered).double(), "single": _flat_grads(ref).double(),
                "nfe_ddp": torch.stack(nfes), "nfe_single": [sum(f for f, _ in nfe_report(ref).values()),
                                                             sum(b for _, b in nfe_report(ref).values())],
                "running_ddp": running,
                "running_single": _running_stats(ref)})
    if info.is_main:
        torch.save({"world_size": info.world_size, "batch": batch, "size": size, "width": width,
                    "results": results}, out)


def gradient_check(configs=GRADCHECK_CONFIGS, nproc: int = 2, width: int = 4, size: int = 32,
                   batch: int = 4, out_dir="runs/gradcheck", echo: bool = False,
                   timeout: float | None = 600) -> list[dict]:
    """Do ``nproc`` DDP processes compute the gradients one process computes on the whole batch?

    Launches ``torchrun`` (gloo, CPU) with ``python -m bloodseg.cli ddp-gradcheck``: for every
    model configuration in ``configs`` (``model`` name plus :func:`~bloodseg.models.build_model`
    options), one training step on a seeded global batch of ``batch`` images ``size`` px, split
    over the processes, against the same step in one process. Returns one row per configuration:
    the largest absolute gradient difference, the largest gradient, the difference between the
    ranks' gradients after the all-reduce, the NFE (forward, backward) of every rank and of the
    single process, and the largest difference of the BatchNorm running statistics. The raw
    gradients stay in ``out_dir/gradcheck.pt``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gradcheck.pt"
    if path.exists():
        path.unlink()
    launch(["ddp-gradcheck", "--configs", json.dumps(list(configs)), "--width", width, "--size", size,
            "--batch", batch, "--out", path], nproc=nproc, module="bloodseg.cli",
           threads_per_process=1, echo=echo, timeout=timeout)
    raw = torch.load(path, weights_only=True)
    rows = []
    for r in raw["results"]:
        ddp, single = r["ddp"], r["single"]
        rows.append({
            "config": r["label"],
            "max_abs_diff": float((ddp[0] - single).abs().max()),
            "max_abs_grad": float(single.abs().max()),
            "rank_diff": float((ddp - ddp[0]).abs().max()),
            "nfe_ranks": [[int(v) for v in row] for row in r["nfe_ddp"]],
            "nfe_single": [int(v) for v in r["nfe_single"]],
            "batchnorm_layers": int(r["n_sync_bn"]),
            "running_stats_diff": float((r["running_ddp"] - r["running_single"]).abs().max())
                                  if len(r["running_ddp"]) else 0.0,
        })
    return rows


# --------------------------------------------------------------------------- tables and figures

def batch_and_lr(batch_size: int, lr: float, n_train: int, world_sizes=(1, 2, 4, 8)) -> list[dict]:
    """Effective batch, steps per epoch and learning rate (with and without ``scale_lr``) for
    each number of processes: what :func:`bloodseg.train.fit` does with a ``TrainConfig``."""
    rows = []
    for n in world_sizes:
        per_rank = -(-n_train // n)  # epoch_order pads to equal shards
        rows.append({"processes": n, "batch_per_process": batch_size, "global_batch": batch_size * n,
                     "steps_per_epoch": -(-per_rank // batch_size), "lr": lr, "lr_scale_lr": lr * n})
    return rows


def plot_batch_and_lr(rows: list[dict]):
    import matplotlib.pyplot as plt
    n = [r["processes"] for r in rows]
    from matplotlib.ticker import NullFormatter, NullLocator
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8))
    a.plot(n, [r["steps_per_epoch"] for r in rows], "o-", label="steps per epoch")
    a.plot(n, [r["global_batch"] for r in rows], "s-", label="global batch")
    a.set(xlabel="processes", xscale="log", yscale="log", title="one epoch")
    a.set_xticks(n, [str(v) for v in n])
    a.legend(fontsize=8)
    b.plot(n, [r["lr"] for r in rows], "o-", label="lr (default)")
    b.plot(n, [r["lr_scale_lr"] for r in rows], "s-", label="lr with scale_lr")
    b.set(xlabel="processes", xscale="log", yscale="log", title="learning rate")
    b.set_xticks(n, [str(v) for v in n])
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    return fig


def plot_gradient_check(rows: list[dict]):
    """Bars: largest gradient difference, DDP vs one process, per configuration (log scale)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    labels = [r["config"].replace("ode-unet-5 ", "") for r in rows]
    diffs = [max(r["max_abs_diff"], 1e-17) for r in rows]
    ax.barh(range(len(rows)), diffs, color=["C0" if "rk4" in l else "C1" for l in labels])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("max |grad(2 processes) - grad(1 process)|")
    ax.axvline(max(r["max_abs_grad"] for r in rows), color="grey", ls=":", label="largest gradient")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_history(history: list[dict], title: str = ""):
    """Loss, validation MIoU and NFE per epoch of a ``fit`` history."""
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    axes[0].plot(ep, [h["loss"] for h in history], "o-", label="train")
    axes[0].plot(ep, [h["val_loss"] for h in history], "s-", label="validation")
    axes[0].set(title="cross-entropy", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, [h["val_miou"] for h in history], "o-")
    axes[1].set(title="validation MIoU", xlabel="epoch")
    axes[2].plot(ep, [h["nfe_forward"] for h in history], "o-", label="forward")
    axes[2].plot(ep, [h["nfe_backward"] for h in history], "s-", label="backward")
    axes[2].set(title="NFE per step (all blocks)", xlabel="epoch")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(ep)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_throughput(rows: list[dict]):
    """Images per second against processes, with linear scaling of the fastest setting with the
    fewest processes as a dotted line."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    n = [r["processes"] for r in rows]
    ips = [r["images_per_s"] for r in rows]
    base = _baseline(rows)
    per = base["images_per_s"] / base["processes"]
    ax.plot(sorted(set(n)), [per * v for v in sorted(set(n))], ":", color="grey",
            label="linear scaling of the fastest one-process setting" if base["processes"] == 1
            else "linear scaling")
    for r in rows:
        ax.plot(r["processes"], r["images_per_s"], "o", ms=8,
                label=f"{r['processes']} process(es) x {r['threads_per_process']} thread(s)"
                if r["device"] == "cpu" else f"{r['processes']} GPU(s)")
    ax.set(xlabel="processes", ylabel="images / s", title=f"training steps, {rows[0]['model']}",
           ylim=(0, 1.15 * max(ips + [per * max(n)])))
    ax.set_xticks(sorted(set(n)))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def bench_command(model: str = "nodes-unet", width: int = 8, patch: int = 64, batch_size: int = 4,
                  steps: int = 5, warmup: int = 2, profile: str | None = None, bf16: bool = False,
                  json_path: str | None = None) -> dict:
    """``bloodseg ddp-bench`` under ``torchrun``: :func:`benchmark` in this process; rank 0 prints
    the result as JSON and writes it to ``json_path``. The process group is closed afterwards."""
    try:
        result = benchmark(model, width, patch, batch_size, steps, warmup, profile, bf16)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
            if json_path:
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        _close_process_group()
    return result


def gradcheck_command(configs: str, width: int = 4, size: int = 32, batch: int = 4, out: str = "gradcheck.pt") -> None:
    """``bloodseg ddp-gradcheck`` under ``torchrun``: :func:`_gradcheck_worker` for the model
    configurations in ``configs`` (a JSON list). The process group is closed afterwards."""
    try:
        _gradcheck_worker(json.loads(configs), width, size, batch, out)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- records

#: On a CPU, what the chapter's throughput section compares: (processes, threads per process) —
#: one process using every core through intra-op threads, one process with one thread, and two
#: processes with one thread each.
CPU_SETTINGS = ((1, None), (1, 1), (2, 1))

#: The training steps timed on a CPU: NODEs-UNet of width 8 on 64 px patches of the quick
#: profile's smears, batch 4 per process, 5 timed steps after 2 warm-up steps.
CPU_BENCH = dict(model="nodes-unet", width=8, patch=64, batch_size=4, steps=5, warmup=2, profile="quick")

#: Where :func:`record_throughput` writes by default, relative to the results folder
#: (``book/results``): the chapter reads it on a machine without GPUs.
THROUGHPUT_RECORD = "07_multi_gpu/record_throughput.json"


def record_throughput(out=None, settings=CPU_SETTINGS, repeats: int = 3, out_dir="runs/throughput-record",
                      command: str | None = None, log=print, **bench) -> dict:
    """Measure :func:`measure_throughput` ``repeats`` times and write a JSON record to ``out``
    (default ``book/results/`` + :data:`THROUGHPUT_RECORD`).

    Every round runs every setting of ``settings`` once (the order reversed every other round, so
    that no setting always runs first); ``bench`` overrides :data:`CPU_BENCH`. The record holds
    every round's rows and ``rows``: one row per setting with the median images per second and
    seconds over the rounds (``images_per_s_rounds`` keeps them all; ``speedup`` and
    ``efficiency`` recomputed from the medians), the format of :func:`measure_throughput`, so
    :func:`plot_throughput` draws it. ``{"what", "data", "provenance"}``, as ``run.save`` writes.
    """
    import statistics
    t0 = time.perf_counter()
    cfg = {**CPU_BENCH, **bench}
    settings = [tuple(s) if isinstance(s, (tuple, list)) else (s, None) for s in settings]
    rounds = []
    for k in range(repeats):
        order = settings if k % 2 == 0 else settings[::-1]
        by_setting = dict(zip(order, measure_throughput(order, out_dir=out_dir, **cfg)))   # rows come in order
        rows = [by_setting[s] for s in settings]
        rounds.append(rows)
        if log:
            log(f"round {k + 1}/{repeats}: " + ", ".join(
                f"{r['processes']}x{r['threads_per_process']} {r['images_per_s']:.2f} img/s" for r in rows))
    summary = []
    for i in range(len(settings)):
        per = [rnd[i] for rnd in rounds]
        row = dict(per[0])
        row["images_per_s_rounds"] = [r["images_per_s"] for r in per]
        row["seconds_rounds"] = [r["seconds"] for r in per]
        row["images_per_s"] = statistics.median(row["images_per_s_rounds"])
        row["seconds"] = statistics.median(row["seconds_rounds"])
        summary.append(row)
    base = _baseline(summary)
    for r in summary:
        r["speedup"] = r["images_per_s"] / base["images_per_s"]
        r["efficiency"] = r["speedup"] * base["processes"] / r["processes"]
    record = {
        "what": (f"images per second of training steps ({cfg['model']} width {cfg['width']}, {cfg['patch']} px "
                 f"patches of the '{cfg['profile']}' smears, batch {cfg['batch_size']} per process, {cfg['steps']} "
                 f"timed steps after {cfg['warmup']} warm-up) under torchrun, for each (processes, threads per "
                 f"process); {repeats} rounds, settings interleaved; rows: medians over the rounds"),
        "data": {"settings": [list(s) for s in settings], "bench": cfg, "repeats": repeats, "rounds": rounds,
                 "rows": summary},
        "provenance": provenance(command, t0,
                                 threads_note="threads per setting as in the rows"),
    }
    write_record(record, Path(out) if out is not None else THROUGHPUT_RECORD)
    return record


def run_record(args, command: str) -> None:
    """``bloodseg record ddp-throughput [--repeats N] [--out PATH] [--work DIR]``."""
    record = record_throughput(args.out, repeats=args.repeats, out_dir=args.work or "runs/throughput-record",
                               command=command)
    print(json.dumps([{k: r[k] for k in ("processes", "threads_per_process", "images_per_s", "speedup")}
                      for r in record["data"]["rows"]], indent=1))


if __name__ == "__main__":      # the records' commands `python -m bloodseg.paper.ddp_scaling record-throughput` run `bloodseg record ...`
    import runpy
    import sys
    sys.argv = ["bloodseg", "record", "ddp-throughput", *sys.argv[2:]]
    runpy.run_module("bloodseg.cli", run_name="__main__")
