"""Batch runs a user can trust: a folder with some bad files, continuing a run, flat memory.

``bloodseg predict`` / ``count`` on a folder stream one image at a time, report and skip an image
that cannot be read (exit 1, "N written, K failed"), keep going for the rest, and with
``--skip-existing`` predict only what is missing.
"""
from __future__ import annotations

import csv
import time

import cv2
import numpy as np
import pytest
import torch

from bloodseg import cli
from bloodseg.io import read_mask
from bloodseg.measure import rss_bytes
from bloodseg.models import build_model
from bloodseg.segmenter import Segmenter

N_IMAGES, H, W = 200, 48, 64
#: the five bad files and a fragment of the reason each must be reported with
BAD = {"empty.png": "empty (0 bytes)", "truncated.png": "truncated or corrupt",
       "noise.jpg": "is it an image?", "notes.png": "is it an image?", "cut.jpg": "truncated or corrupt"}


def _png(path, array):
    ok, buf = cv2.imencode(path.suffix, array)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return Segmenter(build_model("unet", width=4)).save(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """195 good images (one of them 1x1) and the 5 bad files of :data:`BAD`."""
    root = tmp_path_factory.mktemp("batch") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES - len(BAD)):
        image = rng.integers(0, 256, (1, 1, 3) if i == 7 else (H, W, 3), dtype=np.uint8)
        _png(root / f"img_{i:03d}.png", image)
    whole_png = (root / "img_000.png").read_bytes()
    whole_jpg = cv2.imencode(".jpg", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))[1].tobytes()
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(whole_png[: len(whole_png) // 2])
    (root / "noise.jpg").write_bytes(rng.bytes(3000))
    (root / "notes.png").write_text("these are my notes, not a picture\n")
    (root / "cut.jpg").write_bytes(whole_jpg[: len(whole_jpg) * 2 // 3])
    assert len(list(root.iterdir())) == N_IMAGES
    return root


def _counting(seg):
    """Wrap ``seg.segment`` (the one per-photograph path) so that its calls are counted."""
    calls = []
    plain = seg.segment

    def segment(image, *a, **kw):
        calls.append(image.shape)
        return plain(image, *a, **kw)
    seg.segment = segment
    return calls


def test_a_folder_with_five_bad_files_writes_the_rest_and_exits_1(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "masks"
    t0 = time.perf_counter()
    rc = cli.main(["predict", "--ckpt", str(ckpt), str(folder), "--out", str(out), "--no-overlay"])
    seconds = time.perf_counter() - t0
    stdout, stderr = capsys.readouterr()
    assert rc == 1, stderr
    masks = sorted(p.name for p in out.iterdir())
    assert len(masks) == N_IMAGES - len(BAD) and not any(n.startswith(".") for n in masks)
    assert read_mask(out / "img_007.png").shape == (1, 1)         # a 1x1 image is fine
    assert all(read_mask(out / n).shape in ((H, W), (1, 1)) for n in masks)
    for name, reason in BAD.items():
        line = next((ln for ln in stderr.splitlines() if ln.startswith(f"skipped {name}:")), None)
        assert line is not None and reason in line and str(folder / name) in line, (name, stderr)
        assert not (out / f"{name.rsplit('.', 1)[0]}.png").exists()
    assert "bloodseg predict: 195 written, 5 failed" in stderr
    assert "Traceback" not in stderr
    assert stdout.count(" -> ") == N_IMAGES - len(BAD)
    print(f"\n200 files (5 bad) predicted in {seconds:.1f} s")


def test_skip_existing_predicts_only_what_is_missing(ckpt, folder, tmp_path, capsys):
    seg = Segmenter.load(ckpt)
    out = tmp_path / "masks"
    good = sorted(p for p in folder.iterdir() if p.name not in BAD)[:12]
    calls = _counting(seg)
    rows = seg.predict_files(good, out, progress=False)
    assert len(calls) == 12 and all("error" not in r and not r.get("skipped") for r in rows)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # an interrupted run: one mask torn (does not decode), one overlay missing
    (out / "img_003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (out / "img_005_overlay.png").unlink()
    calls.clear()
    rows = seg.predict_files(good, out, skip_existing=True, progress=False)
    assert len(calls) == 2 and sum(bool(r.get("skipped")) for r in rows) == 10
    assert read_mask(out / "img_003.png").shape == (H, W) and (out / "img_005_overlay.png").is_file()
    calls.clear()
    rows = seg.predict_files(good, out, skip_existing=True, progress=False)
    assert calls == [] and all(r["skipped"] for r in rows)
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    redone = ("img_003", "img_005")       # both outputs of an image that was predicted again
    assert {n: t for n, t in after.items() if not n.startswith(redone)} == \
        {n: t for n, t in mtimes.items() if not n.startswith(redone)}
    # the same through the CLI on the whole folder: 195 kept, 5 still failing
    cli_out = tmp_path / "cli"
    assert cli.main(["predict", "--ckpt", str(ckpt), str(folder), "--out", str(cli_out)]) == 1
    before = {p.name: p.stat().st_mtime_ns for p in cli_out.iterdir()}
    capsys.readouterr()
    assert cli.main(["predict", "--ckpt", str(ckpt), str(folder), "--out", str(cli_out), "--skip-existing"]) == 1
    _, stderr = capsys.readouterr()
    assert "0 written, 5 failed, 195 skipped" in stderr
    assert {p.name: p.stat().st_mtime_ns for p in cli_out.iterdir()} == before


def test_count_reports_failures_and_keeps_them_out_of_the_csv(ckpt, folder, tmp_path, capsys):
    files = [folder / "img_001.png", folder / "empty.png", folder / "img_002.png"]
    rc = cli.main(["count", "--ckpt", str(ckpt), *map(str, files), "--out", str(tmp_path / "c.csv"),
                   "--masks", str(tmp_path / "m")])
    stdout, stderr = capsys.readouterr()
    assert rc == 1 and "bloodseg count: 2 counted, 1 failed" in stderr and "skipped empty.png:" in stderr
    with open(tmp_path / "c.csv") as fh:
        assert [r["image"] for r in csv.DictReader(fh)] == [str(files[0]), str(files[2])]
    rc = cli.main(["count", "--ckpt", str(ckpt), *map(str, files), "--masks", str(tmp_path / "m"),
                   "--skip-existing"])
    stdout2, stderr = capsys.readouterr()
    assert rc == 1 and "0 counted, 1 failed, 2 skipped" in stderr
    assert stdout2.splitlines()[:3] == stdout.splitlines()[:3]   # the same counts, from the saved masks


def test_errors_that_stop_everything_still_exit_2(ckpt, folder, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "other").mkdir()
    _png(tmp_path / "other" / "img_001.jpg", np.zeros((H, W, 3), np.uint8))
    for argv, fragment in (
            (["predict", "--ckpt", str(tmp_path / "missing.pt"), str(folder), "--out", str(tmp_path / "o")],
             "checkpoint not found"),
            (["predict", "--ckpt", str(ckpt), str(folder), "--out", str(a_file / "sub")], "cannot write to the output"),
            (["predict", "--ckpt", str(ckpt), str(folder / "img_001.png"), str(tmp_path / "other" / "img_001.jpg"),
              "--out", str(tmp_path / "o")], "share the name"),
            (["count", "--ckpt", str(ckpt), str(folder), "--skip-existing"], "needs --masks"),
            (["predict", "--ckpt", str(ckpt), str(folder), "--out", str(tmp_path / "o"), "--pixel-size-um", "0.1"],
             "add --instances")):
        rc = cli.main(argv)
        _, stderr = capsys.readouterr()
        assert rc == 2 and fragment in stderr and "Traceback" not in stderr, (argv, stderr)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_memory_stays_flat_over_200_images(ckpt, tmp_path):
    """RSS after image 20 and after image 200 of one run; images of 256x256 so that keeping every
    image, mask and overlay (about 0.45 MB each) would grow the process by ~80 MB."""
    src = _png(tmp_path / "one.png", np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(200):
        (inputs / f"s{i:03d}.png").symlink_to(src)
    seg = Segmenter.load(ckpt)
    plain, rss = seg.segment, {}

    def segment(image, *a, **kw):
        result = plain(image, *a, **kw)
        rss[len(rss) + 1] = rss_bytes()
        return result
    seg.segment = segment
    rows = seg.predict_files([inputs], tmp_path / "out", progress=False)
    assert len(rows) == 200 and len(rss) == 200
    growth = (rss[200] - rss[20]) / 2 ** 20
    print(f"\nRSS after image 20: {rss[20] / 2 ** 20:.1f} MiB, after image 200: {rss[200] / 2 ** 20:.1f} MiB, "
          f"growth {growth:+.1f} MiB")
    assert growth < 30, growth


def test_progress_bar_on_stderr_with_images_per_second(ckpt, folder, tmp_path, capsys):
    files = [str(folder / f"img_{i:03d}.png") for i in range(10, 16)]
    assert cli.main(["predict", "--ckpt", str(ckpt), *files, "--out", str(tmp_path / "a")]) == 0
    assert "image/s" not in capsys.readouterr().err            # not a terminal: no bar
    assert cli.main(["predict", "--ckpt", str(ckpt), *files, "--out", str(tmp_path / "b"), "--progress"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "image/s" in stderr and "6/6" in stderr and "image/s" not in stdout
    assert "bloodseg predict: 6 written, 0 failed" in stderr


def test_an_image_the_network_cannot_predict_is_skipped_too(ckpt, folder, tmp_path, capsys):
    from bloodseg.errors import SolverError
    seg = Segmenter.load(ckpt)
    plain = seg.segment

    def segment(image, *a, **kw):
        if image.shape == (1, 1, 3):
            raise SolverError("the ODE solver reached its step cap on this image")
        return plain(image, *a, **kw)
    seg.segment = segment
    files = [folder / "img_006.png", folder / "img_007.png", folder / "img_008.png"]
    rows = seg.predict_files(files, tmp_path / "o", progress=False)
    assert [("error" in r) for r in rows] == [False, True, False]
    assert rows[1] == {"image": str(files[1]), "error": "the ODE solver reached its step cap on this image"}
    assert "skipped img_007.png: the ODE solver reached its step cap" in capsys.readouterr().err
