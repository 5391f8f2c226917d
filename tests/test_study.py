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


def test_seeds_to_decide_scales_the_interval_by_root_seeds():
    from bloodseg.paper import claims
    base = dict(table="paper", unit="pp", verdict=claims.INCONCLUSIVE, side=">", threshold=0.0, paper=1.0,
                where="06", rule="gain > 0", note="", source="study | 5 seed(s) | cpu | torch x | commit y | 2026-12-03")
    rows = [dict(base, claim="A gain (Table 2)", ours=1.0, ci=(-1.0, 3.0)),             # half-width 2 pp
            dict(base, claim="B gain (Table 2)", ours=0.0, ci=(-0.25, 0.25)),            # already within 0.5 pp
            dict(base, claim="held", ours=1.0, ci=(0.5, 1.5), verdict=claims.HOLDS),      # decided: left out
            dict(base, claim="a ratio", ours=1.0, ci=(0.5, 1.5), unit="x"),               # not pp: left out
            dict(base, claim="no seeds", ours=1.0, ci=(-1.0, 3.0), source="chapter 6 run")]
    out = claims.seeds_to_decide(rows)
    assert [r["claim"] for r in out] == ["A gain (Table 2)", "B gain (Table 2)"]
    a, b = out
    assert (a["seeds"], a["half_width_pp"], a["seeds_for_target"], a["seeds_to_decide"]) == (5, 2.0, 80, 20)
    assert b["seeds_for_target"] == 2 and b["seeds_to_decide"] is None       # estimate on the threshold
    if a["cpu_hours_per_seed"] is not None:
        assert a["cpu_hours_for_target"] == pytest.approx(75 * a["cpu_hours_per_seed"])
    fig = claims.plot_seeds_to_decide(out)
    assert len(fig.axes[0].patches) == 6


def test_seeds_frame_sets_the_first_seeds_beside_all(results):
    recs = study.records("table2", "smoke")
    few = {r["model"]: r for r in rp.summarize([r for r in recs if r["seed"] < 1])}
    every = {r["model"]: r for r in rp.summarize(recs)}
    frame = study.seeds_frame("table2", "smoke", first=1)
    assert set(frame.index) == {m for m in every if "diff" in every[m]} and "unet" not in frame.index
    for label, row in frame.iterrows():
        assert row["first 1 seed: diff"] == pytest.approx(few[label]["diff"])
        assert row["all 2 seeds: diff"] == pytest.approx(every[label]["diff"])
        assert row["changed"] == (few[label]["verdict"] != every[label]["verdict"])
    same = study.seeds_frame("table2", "smoke", first=2)     # all seeds on both sides: nothing changes
    assert not same["changed"].any() and same.shape[1] == frame.shape[1]
    assert (same["first 2 seeds: diff"] == same["all 2 seeds: diff"]).all()
    fig = study.plot_seeds(frame)
    assert len(fig.axes[0].get_yticklabels()) == len(frame)
