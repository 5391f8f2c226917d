"""bloodseg.paper.study: the chapters' tables and figures of recorded scales, on real smoke records."""
import matplotlib
import numpy as np
import pytest

from bloodseg.paper import claims, study
from bloodseg.paper import reproduce as rp

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    kw = dict(out=out, work=out.parent / "work", progress=False, log=lambda *a: None, changes={"model.width": 4})
    for experiment in ("table2", "tolerance", "timing"):
        rp.run_experiment(experiment, "smoke", 2, **kw)
    return out


@pytest.fixture()
def results(recorded, monkeypatch):
    monkeypatch.setattr(study, "RESULTS_DIR", recorded)
    monkeypatch.setattr(claims, "RESULTS_DIR", recorded)
    return recorded


def test_table_frame_matches_the_paired_summary(results):
    assert study.scales_recorded("table2") == ["smoke"] or study.scales_recorded("table2") == []
    frame = study.table_frame("table2", "smoke")
    assert list(frame.index) == ["unet", "resunet", "nodes-unet", "nodes-unet-h8"]
    rows = {r["model"]: r for r in rp.summarize(rp.load_records(results / "table2" / "smoke"))}
    assert frame.loc["nodes-unet", "MIoU %"] == pytest.approx(rows["nodes-unet"]["miou"])
    assert frame.loc["nodes-unet", "vs U-Net pp"] == pytest.approx(rows["nodes-unet"]["diff"])
    assert frame.loc["unet", "paper MIoU %"] == pytest.approx(88.43) and np.isnan(frame.loc["unet", "vs U-Net pp"])
    assert frame.loc["nodes-unet", "paper vs U-Net pp"] == pytest.approx(90.61 - 88.43)
    assert (frame["seeds"] == 2).all()
    assert "table2 at scale smoke | 2 seed(s)" in study.provenance("table2", "smoke")


def test_timing_and_tolerance_frames(results):
    t = study.timing_frame("smoke")
    assert t.loc["unet", "x U-Net"] == pytest.approx(1.0) and (t["CI low"] <= t["x U-Net"] + 1e-12).all()
    assert t.loc["ode-unet-5", "paper x U-Net"] == pytest.approx(0.61 / 0.15)
    assert t.loc["nodes-unet", "NFE fwd"] > 0 == t.loc["unet", "NFE fwd"]
    tol = study.tolerance_frame("smoke")
    assert list(tol.index) == sorted(tol.index, reverse=True) and (tol["seeds"] == 2).all()


def test_figures_draw(results):
    import matplotlib.pyplot as plt
    for fig in (study.plot_table("table2", "smoke"), study.plot_convergence("table2", "smoke"),
                study.plot_timing("smoke"), study.plot_tolerance("smoke")):
        assert fig.axes
        plt.close(fig)
