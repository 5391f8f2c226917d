"""`bloodseg bench`: fields, ratios and error handling at tiny sizes (timings are never asserted)."""
from __future__ import annotations

import json

import pytest

from bloodseg.paper.bench import (bench_rows, checkpoint_for, format_bench, paper_time_ratios, run_bench,
                                  training_step_cost)
from bloodseg.cli import main
from bloodseg.errors import BloodsegError
from bloodseg.paper.reference import PAPER_TABLE1
from bloodseg.models import build_model
from bloodseg.checkpoint import save_checkpoint

TINY = dict(width=4, size=32, n_images=2, batch=1)


def test_cli_bench_writes_json_with_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "ode-unet-5", "--width", "4", "--size", "32", "--n-images", "2",
               "--batch", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ode-unet-5" in printed and "paper x U-Net" in printed
    result = json.loads(out.read_text())
    cfg = result["config"]
    for key in ("width", "size", "n_images", "batch", "device", "device_name", "torch", "memory_how"):
        assert key in cfg
    assert (cfg["width"], cfg["size"], cfg["n_images"], cfg["batch"]) == (4, 32, 2, 1)
    rows = {r["model"]: r for r in result["models"]}
    assert list(rows) == ["unet", "ode-unet-5"], "the U-Net is added first as the reference"
    for r in rows.values():
        for key in ("params", "param_mb", "time_s", "time_per_image_s", "time_20_s", "ratio_to_unet",
                    "paper_ratio_to_unet", "nfe_forward", "train", "weights"):
            assert key in r
        assert r["params"] > 0 and r["param_mb"] == pytest.approx(r["params"] * 4 / 2 ** 20)
        assert r["n_images"] == 2 and r["weights"] == "random"
        assert r["train"]["direct"]["step_s"] > 0
        assert r["train"]["direct"]["peak_mb"] is not None
    assert rows["unet"]["ratio_to_unet"] == 1.0
    assert rows["unet"]["train"]["adjoint"] is None and rows["unet"]["nfe_forward"] == {}
    ode = rows["ode-unet-5"]
    assert ode["ratio_to_unet"] == pytest.approx(ode["time_per_image_s"] / rows["unet"]["time_per_image_s"])
    assert ode["paper_ratio_to_unet"] == pytest.approx(PAPER_TABLE1["ode-unet-5"]["time_s"] / PAPER_TABLE1["unet"]["time_s"])
    (block, nfe), = ode["nfe_forward"].items()
    assert "position 5" in block and nfe >= 2
    adj = ode["train"]["adjoint"]
    assert adj["nfe_backward"] > 0 and adj["saved_mb"] < ode["train"]["direct"]["saved_mb"], \
        "the adjoint saves fewer activations than direct backprop"


def test_bench_without_training_computes_ratios_for_every_model():
    result = run_bench(["resunet", "nodes-unet"], train=False, device="cpu", **TINY)
    rows = {r["model"]: r for r in result["models"]}
    assert set(rows) == {"unet", "resunet", "nodes-unet"}
    ref = rows["unet"]["time_per_image_s"]
    for r in rows.values():
        assert r["train"] is None
        assert r["ratio_to_unet"] == pytest.approx(r["time_per_image_s"] / ref)
    assert rows["nodes-unet"]["paper_ratio_to_unet"] is None  # not in the paper's Table 1
    assert len(rows["nodes-unet"]["nfe_forward"]) == 3
    text = format_bench(result)
    assert "nodes-unet" in text and "resunet" in text
    flat = bench_rows(result)
    assert [r["model"] for r in flat] == ["unet", "resunet", "nodes-unet"]


def test_paper_ratios_are_derived_from_table1():
    ratios = paper_time_ratios()
    assert ratios["unet"] == 1.0
    assert ratios["ode-unet-1"] == pytest.approx(7.35 / 0.15)
    assert min(ratios, key=ratios.get) == "unet"


def test_bench_uses_trained_checkpoints_when_present(tmp_path):
    model = build_model("unet", width=4)
    save_checkpoint(tmp_path / "unet" / "best.pt", model)
    assert checkpoint_for("unet", tmp_path).endswith("best.pt")
    assert checkpoint_for("resunet", tmp_path) is None
    result = run_bench(["resunet"], train=False, device="cpu", ckpt_dir=tmp_path, **{**TINY, "width": 8})
    rows = {r["model"]: r for r in result["models"]}
    assert rows["unet"]["weights"].endswith("best.pt") and rows["unet"]["width"] == 4
    assert rows["resunet"]["weights"] == "random" and rows["resunet"]["width"] == 8


def test_training_step_in_process_with_options():
    cost = training_step_cost("ode-unet-5", width=4, size=32, batch=1, adjoint=True, device="cpu",
                              options=dict(rtol=1e-2), subprocess_on_cpu=False)
    assert cost["step_s"] > 0 and cost["nfe_forward"] > 0 and cost["nfe_backward"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(models=["nope"]), "unknown model"),
    (dict(models=["unet"], size=40), "multiple of 16"),
    (dict(models=["unet"], n_images=0), "n_images"),
])
def test_bench_rejects_bad_arguments(kwargs, match):
    with pytest.raises(BloodsegError, match=match):
        run_bench(**{**dict(width=4, size=32, n_images=1, train=False, device="cpu"), **kwargs})


def test_cli_bench_bad_model_is_one_clear_line(capsys):
    assert main(["bench", "--models", "vgg", "--no-train", "--width", "4", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "Traceback" not in err


def test_bench_takes_any_registry_label_and_model_options(capsys, tmp_path):
    """``nodes-unet-h16`` (a variant with an option) reaches the bench, and ``--model-option`` builds
    every network with it: NODEs-UNet solved by one Euler step has 1 evaluation of f per block."""
    r = run_bench(models="nodes-unet-h16", width=4, size=32, n_images=1, train=False, device="cpu",
                  options={"method": "euler"})
    rows = {row["model"]: row for row in r["models"]}
    assert list(rows) == ["unet", "nodes-unet-h16"] and r["config"]["model_options"] == {"method": "euler"}
    assert set(rows["nodes-unet-h16"]["nfe_forward"].values()) == {1}
    wide = run_bench(models="nodes-unet", width=4, size=32, n_images=1, train=False, device="cpu")
    assert rows["nodes-unet-h16"]["params"] < {x["model"]: x for x in wide["models"]}["nodes-unet"]["params"]
    out = tmp_path / "b.json"
    assert main(["bench", "--models", "nodes-unet-h16", "--model-option", "method=euler", "--no-train", "--width", "4",
                 "--size", "32", "--n-images", "1", "--device", "cpu", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["config"]["model_options"] == {"method": "euler"}
    assert [m["model"] for m in saved["models"]] == ["unet", "nodes-unet-h16"]


def test_plot_time_ratios_draws_the_paper_and_each_result():
    import matplotlib
    matplotlib.use("Agg")
    from bloodseg.paper.bench import paper_time_ratios, plot_time_ratios
    fake = {"models": [{"model": f"ode-unet-{k}", "ratio_to_unet": float(k)} for k in range(1, 10)]}
    ax = plot_time_ratios({"fake device": fake})
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["fake device"].get_ydata()) == [float(k) for k in range(1, 10)]
    assert lines["paper (GTX 1080 Ti)"].get_ydata()[0] == pytest.approx(paper_time_ratios()["ode-unet-1"])
    assert ax.get_yscale() == "log"
