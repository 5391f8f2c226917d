"""A worker killed inside a 2-process run: torchrun's elastic agent restarts the group, which
resumes from ``last.pt`` and ends bit-identical to an uninterrupted run.

``torchrun --standalone --nproc-per-node=2 --max-restarts=1 -m <cli> train --model unet --data
synthetic --profile smoke --width 4 --epochs 2 --batch-size 2 --checkpoint-every 1`` (gloo on CPU,
one thread per process; 12 training patches: 3 steps of 2 patches per rank and epoch). Once
``last.pt`` records a mid-epoch step (``step >= 1``) the test SIGKILLs rank 0 (the checkpoint
writer, which also holds ``out/.lock``) -- a worker, never the agent. The agent sees the dead
worker, stops the other one, and starts the whole group again ("will restart worker group" in its
log, restart count 1); the new group takes over the stale lock of the dead pid and resumes from
the mid-epoch ``last.pt`` (same world size, so the per-rank batches are the same; the running
loss sums in the checkpoint are already summed over the ranks, and the RNG state is restored).

The interrupted run uses a tiny wrapper around :mod:`bloodseg.cli` that sleeps 0.1 s per patch
read, so that a kill reliably lands between two checkpoints on a busy machine; the sleep changes
timing only, never the numbers. The reference run is the plain ``-m bloodseg.cli``.

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torch 2.13's torchrun (c10d rendezvous, used by
``--standalone``) otherwise hands the workers of every restart the *same* TCPStore without a
per-attempt prefix, so the restarted ranks read the previous attempt's gloo addresses and fail
with "Gloo connectFullMesh failed ... Connection refused" (or hang). With the variable set, rank 0
of each attempt hosts a fresh store on a new port and the restart works. (Seen with a 10-line
script that only calls ``init_process_group`` + ``all_reduce``: a torch issue, not bloodseg's.)

Result: every tensor of ``model_state`` in ``best.pt`` and ``last.pt`` is ``torch.equal`` to the
uninterrupted run's, and the loss history is equal to 1e-12.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

psutil = pytest.importorskip("psutil")

TRAIN = ["train", "--model", "unet", "--data", "synthetic", "--profile", "smoke", "--width", "4",
         "--epochs", "2", "--batch-size", "2", "--checkpoint-every", "1", "--seed", "5"]

SLOW_CLI = '''
import os, sys, time
from bloodseg.datasets import SegmentationDataset
_read = SegmentationDataset.__getitem__
def _slow(self, i):
    time.sleep(float(os.environ.get("BLOODSEG_TEST_SLEEP", "0")))
    return _read(self, i)
SegmentationDataset.__getitem__ = _slow
from bloodseg.cli import main
sys.exit(main())
'''


def _have_torchrun() -> bool:
    try:
        import torch.distributed.run  # noqa: F401
        return torch.distributed.is_available() and torch.distributed.is_gloo_available()
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _have_torchrun(), reason="torch.distributed.run / gloo not available")


def _torchrun(module: str, out: Path, cwd: Path, sleep: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               BLOODSEG_TEST_SLEEP=str(sleep), LOGLEVEL="INFO",   # the agent logs its restarts at INFO
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",   # see the module docstring
               PYTHONPATH=os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "--max-restarts=1", "--monitor-interval=0.2", "-m", module] + TRAIN + ["--out", str(out)]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _peek(path: Path):
    """``(epoch, step)`` of the checkpoint at ``path``, or None while there is none (yet)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return ckpt["epoch"], ckpt["step"]
    except Exception:   # not there yet (the file is replaced atomically, so never half-written)
        return None


def _rank_of(p) -> int | None:
    try:
        rank = p.environ().get("RANK")
        return None if rank is None else int(rank)
    except (psutil.Error, ValueError):
        return None


def _model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def test_killed_worker_is_restarted_by_torchrun_and_resumes_bit_for_bit(tmp_path):
    t0 = time.monotonic()
    (tmp_path / "slow_cli.py").write_text(SLOW_CLI)
    whole, part = tmp_path / "whole", tmp_path / "part"

    reference = _torchrun("bloodseg.cli", whole, tmp_path)
    _finish(reference)

    proc = _torchrun("slow_cli", part, tmp_path, sleep=0.1)
    agent = psutil.Process(proc.pid)
    victim, seen, deadline = None, None, time.monotonic() + 90
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        seen = _peek(part / "last.pt")
        if seen is not None and seen[1] >= 1:      # a mid-epoch checkpoint exists: kill rank 0 now
            workers = {_rank_of(c): c for c in agent.children(recursive=True)}
            victim = workers.get(0)
            if victim is not None:
                victim.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    assert victim is not None, f"never saw a mid-epoch last.pt to kill at (last seen {seen})"
    assert victim.pid != proc.pid
    log = _finish(proc)

    # the agent saw the dead worker (exit code -9) and restarted the group once
    assert "failed (exitcode: -9)" in log, log[-4000:]
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in log, log[-4000:]
    assert "restart_count=1" in log, log[-4000:]
    # the restarted group resumed (it did not start over from epoch 1)
    assert log.count("profile smoke") == 2          # rank 0 printed its banner in both attempts

    for name in ("last.pt", "best.pt"):
        a, b = _model_state(whole / name), _model_state(part / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    ha = torch.load(whole / "last.pt", weights_only=True)["history"]
    hb = torch.load(part / "last.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in hb] == [1, 2]
    for x, y in zip(ha, hb):
        for key in ("loss", "val_loss", "val_miou"):
            assert y[key] == pytest.approx(x[key], rel=1e-12, abs=1e-12), key
    assert not (part / ".lock").exists()
    assert time.monotonic() - t0 < 150
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
