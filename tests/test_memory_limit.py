"""Huge images: predicting one that does not fit fails with a clear DataError before allocating;
tiled prediction holds one band of tiles, not the whole image's probabilities.

* A child process with ``RLIMIT_AS`` = its current size + 1.5 GiB predicts a 20000x20000 image
  (given as a read-only broadcast view, so the test itself allocates nothing): it gets
  :class:`bloodseg.errors.DataError` naming the size, the estimate, the limit and what to do,
  within seconds, and no MemoryError / kill.
* Under the same limit, a 1500x1700 image (several 256-px tiles) predicts, equal to the mask
  predicted without a limit.
* The banded tiled path is bit-identical to the old whole-image accumulator (kept here as the
  reference) on a 700x900 image with tile 256: probabilities, mask and cleaned mask.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bloodseg import infer
from bloodseg.errors import DataError
from bloodseg.models import build_model
from bloodseg.preprocess import image_to_tensor

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import resource, sys, time
    import numpy as np, psutil, torch
    torch.set_num_threads(1)
    from bloodseg.errors import DataError
    from bloodseg.infer import predict_image
    from bloodseg.models import build_model
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    side = int(sys.argv[1])
    rng = np.random.default_rng(0)
    small = (rng.random((1500, 1700, 3)) * 255).astype(np.uint8)
    reference = predict_image(model, small, tile=256) if side == 0 else None
    vms = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vms + int(1.5 * 2**30), resource.RLIM_INFINITY))
    t0 = time.monotonic()
    if side == 0:
        mask = predict_image(model, small, tile=256)
        print("EQUAL", bool(np.array_equal(mask, reference)), flush=True)
    else:
        image = np.broadcast_to(np.uint8(128), (side, side, 3))   # no memory behind it
        try:
            predict_image(model, image, tile=256)
            print("PREDICTED", flush=True)
        except DataError as exc:
            print("DATAERROR", f"{time.monotonic() - t0:.2f}", exc, flush=True)
''')


def _child(side: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(side)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_huge_image_fails_clearly_before_allocating():
    res = _child(20000)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MemoryError" not in res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("DATAERROR"), res.stdout + res.stderr[-3000:]
    seconds = float(line.split()[1])
    assert seconds < 5
    assert "20000x20000" in line and "GiB" in line and ("Downscale" in line or "crop" in line)


def test_image_that_fits_predicts_under_the_limit():
    res = _child(0)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "EQUAL True" in res.stdout


def test_estimate_and_limit_in_process(monkeypatch):
    monkeypatch.setattr(infer, "memory_limit_bytes", lambda: 10**9)
    with pytest.raises(DataError, match="20000x20000"):
        infer.check_memory(20000, 20000, 3, 256)
    infer.check_memory(1000, 1000, 3, 256)
    assert infer.estimate_bytes(2000, 2000, probabilities=False) <= infer.estimate_bytes(2000, 2000)


def _old_probabilities(model, image_bgr, tile, overlap, clahe=True):
    """The whole-image accumulator of bloodseg.infer before the memory change."""
    x = image_to_tensor(image_bgr, clahe=clahe)[None]
    x, (h, w) = infer._pad_to(x)
    H, W = x.shape[-2:]
    th, tw = min(tile, H), min(tile, W)
    probs, weight = torch.zeros(3, H, W), torch.zeros(1, H, W)
    win = infer._window(th, min(overlap, th // 2))[:, None] * infer._window(tw, min(overlap, tw // 2))[None, :]
    with torch.inference_mode():
        for y0 in infer._starts(H, th, th - overlap):
            for x0 in infer._starts(W, tw, tw - overlap):
                p = F.softmax(model(x[..., y0:y0 + th, x0:x0 + tw]).float(), 1)[0]
                probs[:, y0:y0 + th, x0:x0 + tw] += p * win
                weight[:, y0:y0 + th, x0:x0 + tw] += win
    return (probs / weight)[:, :h, :w]


@pytest.mark.parametrize("shape", [(700, 900), (517, 300)])
def test_banded_tiles_are_bit_identical_to_the_whole_image_accumulator(shape):
    from bloodseg.postprocess import clean_white_cells
    torch.manual_seed(0)
    model = build_model("unet", width=4).eval()
    rng = np.random.default_rng(1)
    coarse = (rng.random((shape[0] // 8 + 1, shape[1] // 8 + 1, 3)) * 255).astype(np.uint8)
    image = np.ascontiguousarray(np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:shape[0], :shape[1]])
    old = _old_probabilities(model, image, 256, 64)
    new = infer.predict_probabilities(model, image, tile=256, overlap=64)
    assert torch.equal(old, new)
    spec = {"white_min_area": 60, "fill_white_holes": True}
    mask = infer.predict_image(model, image, tile=256, overlap=64)
    assert np.array_equal(mask, old.argmax(0).numpy().astype(np.uint8))
    cleaned = infer.predict_image(model, image, tile=256, overlap=64, postprocess=spec)
    assert np.array_equal(cleaned, clean_white_cells(mask, old, 60, True))
