"""Several processes: the process group, the device of each process, synchronised BatchNorm.

The paper trained on four GPUs with Keras' ``multi_gpu_model`` (§4.1). bloodseg uses PyTorch's
own engine, ``torchrun`` + ``DistributedDataParallel`` (DDP): one process per device, each with a
full replica of the model and its own shard of the data; gradients are averaged across processes
after each backward. :func:`bloodseg.train.fit` does this by itself when it runs under
``torchrun``; this module holds the pieces it uses:

* :func:`setup_distributed` / :func:`cleanup_distributed` / :func:`default_device` — join the
  group ``torchrun`` describes (NCCL on CUDA, gloo on CPU) and pick this process's device;
* :class:`SyncBatchNorm2d`, :func:`convert_sync_batchnorm`, :func:`revert_sync_batchnorm` — batch
  statistics of the *global* batch. ``torch.nn.SyncBatchNorm`` does this on CUDA but refuses CPU
  tensors (torch 2.13), so for gloo on CPU bloodseg has a small pure-PyTorch version built on a
  differentiable all-reduce;
* :func:`ddp_options` — the DDP wrapper's options.

Launching, throughput and the gradient check of the book's chapter live in
:mod:`bloodseg.paper.ddp_scaling`.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import BloodsegError
from .ode import ODEBlock


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


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all processes; the backward pass sums the incoming gradients the same way.

    Why the backward is an all-reduce too: every process's loss depends on the global sum, so the
    gradient of the sum of all losses with respect to one process's contribution is the sum over
    processes of each one's gradient with respect to the global value.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _world(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all processes.

    A drop-in for ``nn.BatchNorm2d`` (same parameters, buffers and ``state_dict`` keys). In
    training mode under a process group of more than one process, the per-channel mean and variance
    are computed from all processes' samples (two all-reduces forward, two backward); otherwise
    (one process, or eval mode, which uses the running statistics) it is plain ``BatchNorm2d``.
    Works with every backend on every device, gloo on CPU included; on CUDA
    :func:`convert_sync_batchnorm` prefers ``torch.nn.SyncBatchNorm`` (fused kernels).

    Both passes are collectives: every process must call every such layer the same number of
    times per step. That is why BatchNorm must never sit inside an ODE function f: an adaptive
    solver evaluates f a different number of times on each process.
    """

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world(self.process_group) <= 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, 2, 3]
        group = self.process_group or dist.group.WORLD
        local_count = x.new_full((1,), x.numel() // c)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), local_count]), group)
        count = total[c].detach()
        mean = total[:c] / count
        centred = x - mean.view(1, c, 1, 1)
        # two passes (mean first, then squared deviations) rather than E[x^2] - E[x]^2: no
        # cancellation, so the result agrees with single-process BatchNorm to float rounding
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / count
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return out


def _inside_ode_function(path: str, ode_paths: list[str]) -> bool:
    return any(path.startswith(p + ".") for p in ode_paths)


def _swap_batchnorm(model: nn.Module, make) -> int:
    """Replace BatchNorm modules by ``make(old)`` (sharing parameters and buffers), in place."""
    ode_paths = [p for p, m in model.named_modules() if isinstance(m, ODEBlock)]
    swaps = []
    for path, module in model.named_modules():
        if not path or _inside_ode_function(path, ode_paths):
            continue
        new = make(module)
        if new is not None:
            swaps.append((path, new))
    for path, new in swaps:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)
    return len(swaps)


def _rebuild(cls, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # the same Parameter objects: optimizers keep them
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Make every ``BatchNorm2d`` of ``model`` use global-batch statistics; returns how many.

    In place, sharing the parameters and buffers (an optimizer built before keeps working, and
    ``state_dict`` keys do not change). CUDA: ``torch.nn.SyncBatchNorm``; any other device:
    :class:`SyncBatchNorm2d`. BatchNorm inside an ODE-block's function is left alone (see
    :class:`SyncBatchNorm2d`). Undo with :func:`revert_sync_batchnorm`.
    """
    if device is None:
        device = next(model.parameters()).device
    cls = nn.SyncBatchNorm if torch.device(device).type == "cuda" else SyncBatchNorm2d

    def make(m):
        if isinstance(m, nn.BatchNorm2d) and type(m) is not cls:
            return _rebuild(cls, m)
        return None
    return _swap_batchnorm(model, make)


def ddp_options(device: torch.device, sync_buffers: bool = True) -> dict:
    """Keyword arguments for ``DistributedDataParallel`` on ``device``.

    ``sync_buffers=False``: do not copy rank 0's buffers to every process at each forward. Right
    when BatchNorm is synchronised (its running statistics are then identical everywhere) and for
    the ODE-blocks' NFE counters, which are per process by design: each process's adaptive solver
    picks its own steps for its own samples. (torch 2.13 renamed ``broadcast_buffers`` to
    ``forward_sync_buffers``; both still sync once at construction, which is harmless here.)
    """
    import inspect
    kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    if not sync_buffers:
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        kw["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return kw


def revert_sync_batchnorm(model: nn.Module) -> int:
    """Turn the layers :func:`convert_sync_batchnorm` made back into ``nn.BatchNorm2d``."""
    def make(m):
        if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d)):
            return _rebuild(nn.BatchNorm2d, m)
        return None
    return _swap_batchnorm(model, make)
