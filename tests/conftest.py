"""Shared fixtures: small synthetic data and the vendored BCCD sample, built once per session.

Plain helpers (``ColourBlobs``, ``confusion``, ``miou``) are imported as ``from conftest import ...``,
also by the worker processes that test_ddp.py and test_fault_injection.py start (tests/ on sys.path).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from bloodseg.bccd import bccd_sample_dir, prepare_bccd
from bloodseg.io import Sample
from bloodseg.synthetic import make_smear


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op torch thread is faster, and immune to a busy machine. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def full_smears():
    """Three full-size (519x775) synthetic smears, seeds 0-2, as (image BGR, mask) pairs."""
    return [make_smear(seed) for seed in range(3)]


@pytest.fixture(scope="session")
def small_samples():
    """Six small smears (96x128) as Samples from six different sources."""
    samples = []
    for seed in range(6):
        image, mask = make_smear(100 + seed, size=(96, 128))
        samples.append(Sample(f"small_{seed}", image, mask, f"small_{seed}"))
    return samples


@pytest.fixture(scope="session")
def bccd_sample():
    return bccd_sample_dir()


@pytest.fixture(scope="session")
def prepared_bccd(bccd_sample, tmp_path_factory):
    """The vendored BCCD sample run through prepare_bccd: (output folder, report)."""
    out = tmp_path_factory.mktemp("bccd_prepared")
    return out, prepare_bccd(bccd_sample, out)


def confusion(truth: np.ndarray, pred: np.ndarray, n: int = 3) -> np.ndarray:
    """Rows = true class, columns = predicted class (a tiny local helper, independent of metrics.py)."""
    return np.bincount(truth.ravel().astype(np.int64) * n + pred.ravel(), minlength=n * n).reshape(n, n)


def miou(cm: np.ndarray) -> float:
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]))


class ColourBlobs(Dataset):
    """``n`` 32x32 images whose class is written in the colour (deterministic by ``seed``): a
    segmentation problem a width-4 model learns in a few steps. Items: (image 3x32x32, mask 32x32).
    Fault-injecting tests subclass it and wrap ``__getitem__``."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.masks = torch.randint(0, 3, (n, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
        palette = torch.tensor([[0.9, 0.9, 0.9], [0.4, 0.2, 0.6], [0.9, 0.5, 0.5]])
        self.images = palette[self.masks].permute(0, 3, 1, 2).contiguous()
        self.images += 0.05 * torch.randn(self.images.shape, generator=g)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]


def kill_after_first_record(script: str, cwd, env: dict, first, timeout: float = 120.0) -> None:
    """Run ``python -c script`` in ``cwd`` and SIGKILL it as soon as the file ``first`` exists (a run
    killed mid-way, for the resume tests); fails if it never appears."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
