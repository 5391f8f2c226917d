"""Memory accounting shared by ``bloodseg bench`` and the chapter-2 studies.

* :func:`count_saved_bytes` counts the bytes autograd saves for backward while it is active (an exact,
  allocator-independent measure of activation memory): every tensor autograd packs is keyed by its
  storage, so a storage saved by several operations counts once.
* :func:`reset_peak_rss`, :func:`rss_bytes` and :func:`peak_rss_bytes` read the kernel's resident set
  size of this process (Linux ``/proc/self``): reset the peak (``VmHWM``) by writing ``5`` to
  ``/proc/self/clear_refs``, then peak = ``peak_rss_bytes()`` after the work − ``rss_bytes()`` before it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


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
