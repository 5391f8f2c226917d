"""Fault injection: SIGKILL during training and during checkpoint writes; solvers that cannot finish.

* A real ``fit`` process (ODE-block model, 32x32 inputs, a checkpoint every step) is killed with
  SIGKILL in the middle of its second epoch, resumed by a new process from ``last.pt``, and must
  end with weights bit-identical to an uninterrupted run (CPU, one thread, same seed).
* A process that rewrites ``last.pt`` in a tight loop is killed at random moments: every time
  ``load_checkpoint`` must read a complete checkpoint; only hidden ``.last.pt.tmp-<pid>`` files
  may be left over.
* ODE dynamics that blow up stop at the step cap with a :class:`SolverError` naming the block, in
  bounded time: in a model's forward, inside ``fit``, and inside the adjoint's backward solve.

The ``time.monotonic`` bounds are correctness bounds (no hang), not benchmarks.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from bloodseg import CheckpointError, SolverError, build_model, fit
from bloodseg.checkpoint import load_checkpoint, save_checkpoint
from bloodseg.recipe import TrainRecipe

TMP_NAME = re.compile(r"^\.(last|best)\.pt\.tmp-\d+$")
RUN_FILES = {"last.pt", "best.pt", "history.json"}

# A training run as a separate process. argv: out_dir, seconds to sleep per sample (to give the
# test time to kill it between checkpoints). The sleep changes timing only, never the numbers.
TRAIN_CHILD = r'''
import sys, time
import torch
torch.set_num_threads(1)
from bloodseg import build_model, fit
from bloodseg.recipe import TrainRecipe
from conftest import ColourBlobs    # tests/ is on PYTHONPATH


class Blobs(ColourBlobs):
    """The colour blobs of conftest, ``sleep`` seconds per item read."""

    def __init__(self, n, seed, sleep=0.0):
        super().__init__(n, seed)
        self.sleep = sleep

    def __getitem__(self, i):
        if self.sleep:
            time.sleep(self.sleep)
        return super().__getitem__(i)


out, sleep = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
model = build_model("ode-unet-5", width=4)
cfg = TrainRecipe(epochs=2, batch_size=2, lr=1e-2, seed=3, checkpoint_every=1, progress=False)
history = fit(model, Blobs(12, 0, sleep), Blobs(4, 1), out, cfg)
print("finished", len(history), "epochs", flush=True)
'''
STEPS_PER_EPOCH = 6  # 12 samples, batch 2


def _peek(path: Path):
    """The checkpoint at ``path`` or None while there is none yet."""
    try:
        return load_checkpoint(path)
    except CheckpointError:
        return None


def _leftovers(folder: Path, expected: set[str]) -> list[str]:
    """Names in ``folder`` besides ``expected``; each must be a hidden temporary checkpoint."""
    extra = sorted(set(os.listdir(folder)) - expected)
    assert all(TMP_NAME.match(name) for name in extra), extra
    return extra


def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path):
    script = tmp_path / "train_child.py"
    script.write_text(TRAIN_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # bit-exact: CPU
               PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p))
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"

    def start(out, sleep):
        return subprocess.Popen([sys.executable, str(script), str(out), str(sleep)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = start(ref_dir, 0)
    victim = start(run_dir, 0.15)          # ~0.3 s per step more: room to kill between checkpoints
    try:
        deadline = time.monotonic() + 180
        while True:                         # kill once epoch 2 has written its 2nd step checkpoint
            ckpt = _peek(run_dir / "last.pt")
            if ckpt is not None and ckpt["epoch"] == 1 and ckpt["step"] >= 2:
                break
            assert victim.poll() is None, f"the run ended before it could be killed: {victim.communicate()}"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
            time.sleep(0.03)
        os.kill(victim.pid, signal.SIGKILL)
        out, _ = victim.communicate(timeout=60)
        assert victim.returncode == -signal.SIGKILL and "finished" not in out

        killed = load_checkpoint(run_dir / "last.pt")
        assert killed["epoch"] == 1 and 2 <= killed["step"] < STEPS_PER_EPOCH   # really inside epoch 2
        assert len(killed["history"]) == 1 and killed["partial"] is not None
        # a killed run leaves its lock (pid of a dead process): the resumed run takes it over
        _leftovers(run_dir, RUN_FILES | {".lock"})

        resumed = subprocess.run([sys.executable, str(script), str(run_dir), "0"], env=env, text=True,
                                 capture_output=True, timeout=180)
        assert resumed.returncode == 0, resumed.stderr
        ref_out, ref_err = reference.communicate(timeout=180)
        assert reference.returncode == 0, ref_err
        assert "finished 2 epochs" in resumed.stdout and "finished 2 epochs" in ref_out
    finally:                                # never leave a child running
        for proc in (victim, reference):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    a, b = load_checkpoint(ref_dir / "last.pt"), load_checkpoint(run_dir / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert a["model_state"].keys() == b["model_state"].keys()
    assert any("ode." in k for k in a["model_state"])                 # the ODE-block's weights too
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    for key in ("loss", "val_loss", "nfe_forward"):                  # the epoch records as well
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]], key
    assert a["history"][0]["nfe_forward"] > 0


def _write_forever(path: Path, model: nn.Module, big: torch.Tensor, base: int) -> None:
    """Child process: rewrite ``path`` as fast as possible, steps ``base``, ``base + 1``, ..."""
    k = 0
    while True:
        save_checkpoint(path, model, step=base + k, tag=torch.tensor(base + k), big=big)
        k += 1


def _signature(path: Path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_sigkill_while_writing_never_leaves_a_corrupt_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    big = torch.randn(2_000_000)          # 8 MB: a write takes long enough to be hit by a kill
    path = save_checkpoint(tmp_path / "last.pt", model, step=0, tag=torch.tensor(0), big=big)
    ctx = multiprocessing.get_context("fork")   # the parent has torch loaded: no import per child
    rng = random.Random(20240611)
    step, hit_mid_write = 0, 0
    for round_ in range(1, 7):
        child = ctx.Process(target=_write_forever, args=(path, model, big, 1000 * round_), daemon=True)
        before = _signature(path)
        child.start()
        tmp = path.with_name(f".last.pt.tmp-{child.pid}")
        try:
            deadline = time.monotonic() + 60
            while not (tmp.exists() or _signature(path) != before):   # the child is writing
                assert child.is_alive() and time.monotonic() < deadline, child.exitcode
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.2))
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
        finally:
            if child.is_alive():
                child.kill()
                child.join()
        assert child.exitcode == -signal.SIGKILL

        ckpt = load_checkpoint(path)          # never a half file
        assert ckpt["step"] == int(ckpt["tag"])
        assert ckpt["step"] == step or ckpt["step"] >= 1000 * round_   # the old one or a newer whole one
        assert ckpt["step"] >= step
        assert torch.equal(ckpt["big"], big)
        for k, v in model.state_dict().items():
            assert torch.equal(ckpt["model_state"][k], v), k
        step = ckpt["step"]
        hit_mid_write += tmp.exists()
        leftovers = _leftovers(tmp_path, {"last.pt"})
        assert all(name.startswith(".last.pt.tmp-") for name in leftovers)
    assert step > 0                           # the children did replace the file
    assert hit_mid_write >= 1                 # and at least one kill landed inside a write
    # the leftovers are ignored: the next save and load work next to them
    save_checkpoint(path, model, step=-5, tag=torch.tensor(-5), big=big)
    assert load_checkpoint(path)["step"] == -5


# ----------------------------------------------------------------------------- solver guards

class Exploding(nn.Module):
    """dh/dt = 60 w h: h grows by e^60 over [0, 1]; dopri5 at rtol 1e-3 would need hundreds of
    steps (a cubic f blows up so fast that the step size underflows instead: tests/test_ode.py)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, t, h):
        return 60 * self.w * h


class BackwardBomb(nn.Module):
    """Harmless forward (dh/dt = w h); in the adjoint's backward solve, the only place where
    torchdiffeq evaluates f with gradients enabled, it becomes the exploding 60 w h."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, t, h):
        rate = 60 if torch.is_grad_enabled() else 1
        return rate * self.w * h


class Tiny(Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(n)
        self.x = torch.rand(n, 3, 32, 32, generator=g) * 4
        self.y = torch.randint(0, 3, (n, 32, 32), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def exploding_model(func, **options):
    torch.manual_seed(0)
    model = build_model("ode-unet-5", width=4, max_steps=30, **options)
    model.ode["5"].func = func
    return model


def test_exploding_dynamics_hit_the_step_cap_in_a_model_forward():
    model = exploding_model(Exploding()).eval()
    start = time.monotonic()
    with pytest.raises(SolverError) as err, torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 4)
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "ODE-block at position 5 could not finish its forward solve" in msg
    assert "more than max_steps=30 solver steps" in msg and "dopri5" in msg
    assert "raise the tolerance" in msg and "raise max_steps" in msg


def test_a_solver_error_inside_fit_names_the_block(tmp_path):
    start = time.monotonic()
    with pytest.raises(SolverError) as err:
        fit(exploding_model(Exploding()), Tiny(4), Tiny(2), tmp_path, TrainRecipe(epochs=1, batch_size=2, progress=False))
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "ODE-block at position 5 could not finish its forward solve" in msg
    assert "more than max_steps=30 solver steps" in msg
    assert not (tmp_path / "last.pt").exists()


def test_a_solver_error_in_the_adjoint_backward_solve_inside_fit(tmp_path):
    model = exploding_model(BackwardBomb(), adjoint=True)
    with torch.no_grad():                     # the forward alone is fine
        model(torch.rand(1, 3, 32, 32))
    start = time.monotonic()
    with pytest.raises(SolverError) as err:
        fit(model, Tiny(4), Tiny(2), tmp_path, TrainRecipe(epochs=1, batch_size=2, progress=False))
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "ODE-block at position 5 could not finish its backward solve" in msg
    assert "more than max_steps=30 solver steps" in msg and "raise max_steps" in msg
    assert int(model.ode["5"].nfe_backward) > 0
