"""A full disk, simulated with ``RLIMIT_FSIZE`` in a subprocess (``SIGXFSZ`` ignored there, so an
oversized write fails with ``EFBIG`` instead of killing the process).

Each test writes a good file first (no limit), then lets a child process try to overwrite it under
a file-size limit smaller than the new file. Asserted: the child gets a clear
:class:`~bloodseg.errors.BloodsegError` (not a raw ``OSError``) naming the file, the previous good
file is byte-identical, and no temporary file is left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bloodseg.checkpoint import save_checkpoint
from bloodseg.io import write_image
from bloodseg.models import build_model
from bloodseg.recipe import TrainRecipe
from bloodseg.train import fit
from conftest import ColourBlobs

TESTS = Path(__file__).resolve().parent

CHILD = r'''
import json, resource, signal, sys, traceback
sys.path.insert(0, TESTS)
import numpy as np, torch
from bloodseg.checkpoint import save_checkpoint
from bloodseg.io import write_image
from bloodseg.models import build_model
from bloodseg.recipe import TrainRecipe
from bloodseg.train import fit
from conftest import ColourBlobs

what, target, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(1)
model = build_model("unet", width=4)
image = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)   # incompressible
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    if what == "checkpoint":
        save_checkpoint(target, model, epoch=2)
    elif what == "image":
        write_image(target, image)
    elif what == "fit":
        torch.manual_seed(0)
        fit(build_model("unet", width=4), ColourBlobs(8), ColourBlobs(4, 1), target,
            TrainRecipe(epochs=2, batch_size=4, lr=1e-2, seed=3, progress=False), device="cpu")
    result = {"error": None}
except BaseException as exc:
    result = {"error": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
              "message": str(exc), "traceback": traceback.format_exc()}
print("RESULT " + json.dumps(result), flush=True)
'''.replace("TESTS", repr(str(TESTS)))


def run_full_disk(tmp_path: Path, what: str, target: Path, limit: int) -> dict:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), what, str(target), str(limit)], env=env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    torch.manual_seed(0)
    good = save_checkpoint(out / "last.pt", build_model("unet", width=4), epoch=1)
    before = snapshot(out)
    result = run_full_disk(tmp_path, "checkpoint", good, limit=4096)
    assert result["error"] == "CheckpointError", result
    assert "BloodsegError" in result["mro"]
    assert str(good) in result["message"] and "previous last.pt is kept" in result["message"]
    assert "File too large" in result["message"]              # EFBIG, said in words
    assert snapshot(out) == before                             # byte-identical, no temporary file


def test_a_new_checkpoint_on_a_full_disk_says_none_was_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    result = run_full_disk(tmp_path, "checkpoint", out / "best.pt", limit=4096)
    assert result["error"] == "CheckpointError" and "no best.pt was written" in result["message"], result
    assert list(out.iterdir()) == []


def test_predicted_mask_on_a_full_disk_keeps_the_previous_file(tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    good = write_image(out / "smear.png", np.zeros((200, 200), np.uint8))
    before = snapshot(out)
    assert len(before["smear.png"]) < 2048
    result = run_full_disk(tmp_path, "image", good, limit=4096)
    assert result["error"] == "DataError" and "BloodsegError" in result["mro"], result
    assert str(good) in result["message"] and "free space" in result["message"]
    assert snapshot(out) == before


def test_training_on_a_full_disk_names_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    torch.manual_seed(0)
    fit(build_model("unet", width=4), ColourBlobs(8), ColourBlobs(4, 1), out,
        TrainRecipe(epochs=1, batch_size=4, lr=1e-2, seed=3, progress=False), device="cpu")
    before = snapshot(out)
    assert {"last.pt", "best.pt", "history.json"} <= set(before)
    # epoch 2 resumes from last.pt, then cannot write its checkpoints: each is larger than 4 KiB
    result = run_full_disk(tmp_path, "fit", out, limit=4096)
    assert result["error"] == "CheckpointError", result
    message = result["message"]
    assert f"The last good checkpoint is {out / 'last.pt'}" in message, message
    assert "is kept unchanged" in message and "resume" in message and "Free disk space" in message
    assert snapshot(out) == before                             # last.pt, best.pt, history.json intact
    assert sorted(p.name for p in out.iterdir()) == sorted(before)   # no temporary files, no .lock
