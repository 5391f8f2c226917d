"""Measuring cost: time, memory, and a fresh process to measure in. One harness for the package.

* :func:`sync` waits for CUDA (the one place that does); :func:`interleaved_times` is the one
  timing loop: rounds in which several functions take turns on the same items, the order rotating,
  so that load from other processes falls on all of them alike; :func:`time_inference` times a
  model on images passed one at a time, after warm-up, with its NFE per ODE-block.
* :class:`PeakMemory` measures the peak memory of a block of work: CUDA's allocator peak, or on a
  CPU the kernel's peak resident set size of this process (see below).
* :func:`run_isolated` runs a function in a fresh Python process and returns its JSON result, so
  that a CPU peak belongs to one measurement alone (``bloodseg bench`` and the chapter studies use it).
* :func:`count_saved_bytes` counts the bytes autograd saves for backward while it is active (an exact,
  allocator-independent measure of activation memory): every tensor autograd packs is keyed by its
  storage, so a storage saved by several operations counts once.
* :func:`reset_peak_rss`, :func:`rss_bytes` and :func:`peak_rss_bytes` read the kernel's resident set
  size of this process (Linux ``/proc/self``): reset the peak (``VmHWM``) by writing ``5`` to
  ``/proc/self/clear_refs``, then peak = ``peak_rss_bytes()`` after the work − ``rss_bytes()`` before it.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import import_module
from typing import Callable

import torch

from .errors import BloodsegError
from .ode import nfe_report


class SavedBytes:
    """Running total of the distinct storages autograd saved; read ``nbytes`` after the forward."""

    def __init__(self):
        self.nbytes = 0
        self._seen: set = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        except (RuntimeError, NotImplementedError):   # tensors without a plain storage
            key = (id(t), t.numel() * t.element_size())
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += key[1]
        return t


@contextmanager
def count_saved_bytes():
    """Count the bytes autograd saves for backward inside the ``with`` block.

    Yields a :class:`SavedBytes`; its ``nbytes`` is the total size of the distinct storages saved
    (a view saved twice, or two views of one storage, count once). Tensors are kept as they are, so
    backward works as usual; under ``torch.no_grad`` nothing is saved and ``nbytes`` stays 0.
    """
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter


def status_kib(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``); ``OSError`` if absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``); False where that is not possible (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        status_kib("VmHWM")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes (0 where it cannot be read)."""
    try:
        return status_kib("VmRSS") * 1024
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss`, in bytes."""
    return status_kib("VmHWM") * 1024


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on a CPU): timings need it on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict, items, rounds: int = 1, warmup: int = 0, *, device=None,
                      order: Callable[[int, list], list] | None = None, warmup_each_round: bool = False,
                      after: Callable[[str, int, object], None] | None = None) -> dict[str, list[float]]:
    """The package's one timing loop: seconds of each function of ``fns`` (``{label: fn(item)}``) on
    ``items``, in ``rounds`` rounds. Returns ``{label: [seconds of each round]}``.

    Every round calls every function once on every item of the round (``items``, or ``items(r)``
    when it is a callable), each call timed alone (CUDA synchronised around it when ``device`` is
    a CUDA device) and the times summed. The functions take turns in an order that rotates by one
    each round (``order(r, labels)`` for another), so that a burst of load from another process
    falls on all of them alike. ``warmup``: untimed calls on the first items of a round, for every
    function before the first round (``warmup_each_round``: before each of its timed runs).
    ``after(label, r, item)`` runs after each timed call, outside the time (e.g. to read NFE)."""
    labels = list(fns)
    device = torch.device(device) if device is not None else None
    times: dict[str, list[float]] = {label: [] for label in labels}
    round_items = (lambda r: list(items(r))) if callable(items) else (lambda r, fixed=list(items): fixed)
    if warmup and not warmup_each_round and rounds:
        for label in labels:
            for x in round_items(0)[:warmup]:
                fns[label](x)
    for r in range(rounds):
        now = round_items(r)
        k = r % max(len(labels), 1)
        for label in (order(r, labels) if order is not None else labels[k:] + labels[:k]):
            fn, spent = fns[label], 0.0
            if warmup_each_round:
                for x in now[:warmup]:
                    fn(x)
            for x in now:
                if device is not None:
                    sync(device)
                t0 = time.perf_counter()
                fn(x)
                if device is not None:
                    sync(device)
                spent += time.perf_counter() - t0
                if after is not None:
                    after(label, r, x)
            times[label].append(spent)
    return times


def time_inference(model: torch.nn.Module, images: list[torch.Tensor], warmup: int = 2,
                   device=None) -> dict:
    """Time ``model`` on ``images`` passed one at a time (after ``warmup`` untimed passes): one round
    of :func:`interleaved_times`.

    Returns ``dict(time_s, time_per_image_s, n_images, nfe_forward)`` where ``nfe_forward`` maps each
    ODE-block to its mean forward NFE over the timed images (empty for models without blocks).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    images = [im.to(device) for im in images]
    nfe_sum: dict[str, float] = {}

    def count(label, r, x):
        for block, (fwd, _) in nfe_report(model).items():
            nfe_sum[block] = nfe_sum.get(block, 0) + fwd

    with torch.inference_mode():
        elapsed = interleaved_times({"model": model}, images, 1, warmup, device=device, after=count)["model"][0]
    n = max(len(images), 1)
    return dict(time_s=elapsed, time_per_image_s=elapsed / n, n_images=len(images),
                nfe_forward={k: v / n for k, v in nfe_sum.items()})


class PeakMemory:
    """Peak memory of the work between :meth:`start` and :meth:`stop`, in MiB (``mb``).

    CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before (tensors only).
    CPU: the peak resident set size (``VmHWM``, reset at start) minus the RSS before, when the
    kernel lets us reset the peak; else ``ru_maxrss`` minus the RSS at construction (a fresh
    process, :func:`run_isolated`, makes that meaningful). ``how`` says which was used.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.can_reset = self.device.type == "cpu" and reset_peak_rss()
        self.rss_start = rss_bytes()
        self.mb: float | None = None

    @property
    def how(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the step minus allocated before (tensors only)"
        if self.can_reset:
            return ("peak RSS of a fresh process (VmHWM reset before the step, minus VmRSS before it; "
                    "glibc mmap threshold 64 KiB)")
        return "ru_maxrss of a fresh process minus its RSS before the first step"

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.can_reset:
            self.before = rss_bytes()
            reset_peak_rss()
        else:
            self.before = self.rss_start
        return self

    def stop(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.can_reset:
            peak = peak_rss_bytes() - self.before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before
        self.mb = peak / 2 ** 20
        return self.mb


_TAG = "BLOODSEG_MEASURED "


def _child() -> None:  # pragma: no cover - runs in the measuring subprocess
    job = json.loads(sys.stdin.read())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    module, _, name = job["target"].partition(":")
    try:
        out = getattr(import_module(module), name)(job["cfg"])
    except BloodsegError as exc:
        out = dict(error=str(exc))
    print(_TAG + json.dumps(out), flush=True)


def run_isolated(target: str, cfg: dict, threads: int | None = None, timeout: float = 1800):
    """``module:function`` called with ``cfg`` in a fresh Python process; its JSON result.

    The child gets glibc's mmap threshold at 64 KiB (large buffers go back to the kernel when
    freed, so the RSS follows the tensors) and ``threads`` intra-op threads. A
    :class:`BloodsegError` in the child comes back as ``{"error": message}``; any other failure
    raises here with the child's stderr.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    job = dict(target=target, cfg=cfg, threads=threads)
    proc = subprocess.run([sys.executable, "-c", "from bloodseg.measure import _child; _child()"],
                          input=json.dumps(job), capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    if proc.returncode != 0 or not lines:
        raise BloodsegError(f"the measuring process for {target} failed (exit {proc.returncode}):\n"
                            f"{proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(_TAG):])
