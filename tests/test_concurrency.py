"""Two processes at once on the same output folder.

* Two ``bloodseg predict`` runs (same checkpoint, same images, same ``--out``): while they write,
  every PNG that exists decodes; at the end every output equals the single-run output and no
  temporary file is left (``write_image`` writes a temporary file, then ``os.replace``).
* Two trainings into one run folder: the second is refused with a BloodsegError naming the first
  one's pid (``out_dir/.lock``); the lock is released at the end, and a stale lock (its process is
  gone) is taken over.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bloodseg import cli
from bloodseg.errors import BloodsegError
from bloodseg.models import build_model
from bloodseg.recipe import TrainRecipe
from bloodseg.segmenter import Segmenter
from bloodseg.synthetic import make_smear
from bloodseg.train import fit
from conftest import ColourBlobs

TESTS = Path(__file__).resolve().parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))


def _decoded(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.png")):
        image = cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None, f"{p} does not decode: a torn write"
        out[p.name] = image
    return out


def test_two_predict_runs_into_one_folder_never_leave_a_corrupt_png(tmp_path):
    torch.manual_seed(0)
    ckpt = Segmenter(build_model("unet", width=4)).save(tmp_path / "tiny.pt")
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(4):
        cv2.imwrite(str(images / f"smear{seed}.png"), make_smear(seed, size=(96, 128))[0])
    assert cli.main(["predict", "--ckpt", str(ckpt), str(images), "--out", str(tmp_path / "single")]) == 0
    reference = _decoded(tmp_path / "single")
    assert len(reference) == 8                                  # 4 masks + 4 overlays

    shared = tmp_path / "shared"
    for _ in range(2):                                          # the second round overwrites
        procs = [subprocess.Popen([sys.executable, "-m", "bloodseg.cli", "predict", "--ckpt", str(ckpt),
                                   str(images), "--out", str(shared)], env=ENV, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            while any(p.poll() is None for p in procs):        # read while they write
                if shared.is_dir():
                    _decoded(shared)
                time.sleep(0.01)
            for p in procs:
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        result = _decoded(shared)
        assert result.keys() == reference.keys()
        for name, array in reference.items():
            assert np.array_equal(result[name], array), name
        assert sorted(p.name for p in shared.iterdir()) == sorted(reference)   # no temporary files


TRAINER = r'''
import sys, time
from conftest import ColourBlobs
from bloodseg.models import build_model
from bloodseg.recipe import TrainRecipe
from bloodseg.train import fit


class Slow(ColourBlobs):
    def __getitem__(self, i):
        time.sleep(0.05)
        return super().__getitem__(i)


fit(build_model("unet", width=4), Slow(40), ColourBlobs(4, 1), sys.argv[1],
    TrainRecipe(epochs=2, batch_size=4, lr=1e-2, seed=3, progress=False), device="cpu")
print("finished", flush=True)
'''

CFG = TrainRecipe(epochs=1, batch_size=4, lr=1e-2, seed=3, progress=False)


def test_a_second_training_into_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    first = subprocess.Popen([sys.executable, str(script), str(run)], env=ENV, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".lock").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        assert (run / ".lock").read_text().strip() == str(first.pid)
        with pytest.raises(BloodsegError, match=rf"another training run \(pid {first.pid}\) is writing to"):
            fit(build_model("unet", width=4), ColourBlobs(8), ColourBlobs(4, 1), run, CFG, device="cpu")
        assert first.poll() is None, "the refused run must not have disturbed the first"
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0 and "finished" in out, err
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert not (run / ".lock").exists()                        # released at the end of fit
    # the folder is free again: a later run resumes it
    history = fit(build_model("unet", width=4), ColourBlobs(40), ColourBlobs(4, 1), run, CFG, device="cpu",
                  epochs=3)
    assert len(history) == 3 and not (run / ".lock").exists()


def test_a_stale_lock_is_taken_over_and_a_failed_run_releases_its_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                                 # a pid that is not alive any more
    (run / ".lock").write_text(f"{gone.pid}\n")
    fit(build_model("unet", width=4), ColourBlobs(8), ColourBlobs(4, 1), run, CFG, device="cpu")
    assert (run / "last.pt").exists() and not (run / ".lock").exists()

    class Broken(ColourBlobs):
        def __getitem__(self, i):
            raise RuntimeError("a broken sample")
    with pytest.raises(RuntimeError, match="a broken sample"):
        fit(build_model("unet", width=4), Broken(8), ColourBlobs(4, 1), run, CFG, device="cpu", epochs=2)
    assert not (run / ".lock").exists()                        # released in a finally
