"""ONNX export (bloodseg.export, `bloodseg export`): the shipped checkpoint with its fixed-grid solver
exports to a static graph whose masks, run by onnxruntime, agree with PyTorch's on the vendored BCCD
photographs; an adaptive solver is refused; a failed export leaves no half-written file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bloodseg import io as bio                                   # noqa: E402
from bloodseg.bccd import bccd_sample_dir                        # noqa: E402
from bloodseg.cli import main                                    # noqa: E402
from bloodseg.errors import BloodsegError, DataError             # noqa: E402
from bloodseg.export import export_onnx, load_onnx               # noqa: E402
from bloodseg.io import read_image                               # noqa: E402
from bloodseg.ode import ode_blocks                              # noqa: E402
from bloodseg.segmenter import Segmenter, shipped_checkpoint     # noqa: E402

EULER1 = {"method": "euler", "steps": 1}


@pytest.fixture(scope="module")
def seg():
    return Segmenter.load(shipped_checkpoint(), device="cpu")


@pytest.fixture(scope="module")
def exported(seg, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "shipped.onnx"
    assert export_onnx(seg, path) == path
    return path


@pytest.fixture(scope="module")
def photos():
    """Three of the 16 vendored BCCD photographs, at full size (640x480)."""
    return [read_image(f) for f in sorted((bccd_sample_dir() / "images").glob("*.jpg"))[:3]]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return float((a == b).mean())


def test_onnx_masks_agree_with_pytorch_on_bccd_photographs(seg, exported, photos):
    onnx_seg = load_onnx(exported, threads=1)
    # the ONNX file carries the checkpoint's use settings and the solver it was exported with
    assert seg.solver == EULER1 and onnx_seg.solver == EULER1
    for key in ("input_scale", "postprocess", "clahe", "tile", "overlap", "red_cell_diameter", "scale",
                "class_names", "background", "colour"):
        assert getattr(onnx_seg, key) == getattr(seg, key), key
    for image in photos:
        torch_mask = seg.predict(image)
        assert set(np.unique(torch_mask)) <= {0, 1, 2} and (torch_mask == 1).any()   # a real segmentation
        assert _agreement(onnx_seg.predict(image), torch_mask) >= 0.999
        assert _agreement(onnx_seg.predict(image, postprocess=False), seg.predict(image, postprocess=False)) >= 0.999


def test_onnx_graph_has_dynamic_batch_height_width(seg, exported):
    net = load_onnx(exported, threads=1).model
    seg._use_solver()
    x = torch.rand(2, 3, 96, 144)          # the export traced 1 x 3 x 64 x 64
    with torch.inference_mode():
        ref = seg.model(x)
    out = net(x)
    assert out.shape == ref.shape == (2, 3, 96, 144)
    assert float((out - ref).abs().max()) < 1e-3


def test_adaptive_solver_is_refused_and_nothing_is_written(seg, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    before = [b.method for b in ode_blocks(seg.model)]
    with pytest.raises(BloodsegError, match=r"adaptive ODE solver dopri5.*not a static graph.*fixed-grid"):
        export_onnx(seg, target, solver={"method": "dopri5", "rtol": 1e-3})
    exact = Segmenter.load(shipped_checkpoint(), device="cpu", exact=True)   # the trained solver: dopri5
    with pytest.raises(BloodsegError, match=r"dopri5 \(trained\).*--solver euler:1"):
        export_onnx(exact, target)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert [b.method for b in ode_blocks(seg.model)] == before == ["euler"] * 3   # the caller's solver is back


def test_failed_write_leaves_the_old_file_and_no_temporary(seg, tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bio.os, "replace", no_space)
    with pytest.raises(DataError, match="No space left on device"):
        export_onnx(seg, target)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_load_onnx_refuses_files_it_cannot_use(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load the ONNX file"):
        load_onnx(junk)


def test_cli_export_round_trip(seg, photos, tmp_path, capsys):
    out = tmp_path / "midpoint.onnx"
    assert main(["export", "--ckpt", str(shipped_checkpoint()), "--onnx", str(out), "--solver", "midpoint:2"]) == 0
    assert "midpoint-2" in capsys.readouterr().out
    onnx_seg = load_onnx(out, threads=1)
    assert onnx_seg.solver == {"method": "midpoint", "steps": 2}
    meta = onnx_seg.model.meta
    assert json.loads(meta["bloodseg.model"])["name"] == "nodes-unet" and json.loads(meta["bloodseg.solver"]) == "midpoint-2"
    assert _agreement(onnx_seg.predict(photos[0]), seg.replace(solver={"method": "midpoint", "steps": 2}).predict(photos[0])) >= 0.999


def test_cli_export_errors(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["export", "--ckpt", str(tmp_path / "nope.pt"), "--onnx", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(shipped_checkpoint()), "--onnx", str(out), "--solver", "dopri5:1e-3"]) == 2
    assert "not a static graph" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(shipped_checkpoint()), "--onnx", str(out), "--solver", "euler:x"]) == 2
    assert "METHOD:STEPS" in capsys.readouterr().err
    assert not out.exists()


def test_export_bench_record(tmp_path):
    """bloodseg.paper.bench.export_bench on one photograph: the record's fields (times never asserted)."""
    from bloodseg.paper.bench import export_bench
    out = tmp_path / "speed" / "export.json"
    record = export_bench(out, repeats=1, n_images=1, command="test")
    assert json.loads(out.read_text()) == json.loads(json.dumps(record, default=float))
    assert record["solver"] == EULER1 and len(record["images"]) == 1
    row = record["images"][0]
    assert row["network_input"] == [1, 3, 240, 320] and row["pixel_agreement"] >= 0.999
    assert row["eager_ms"] > 0 and row["onnx_ms"] > 0 and row["max_abs_logit_diff"] < 1e-3
    assert record["summary"]["pixel_agreement_min"] == row["pixel_agreement"]
    for key in ("git_commit", "command", "device", "torch", "onnxruntime", "date"):
        assert record["provenance"][key]
