"""bloodseg.experiments: paper constants, budgets, cached runs, analyses and the claims ledger."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bloodseg.report as report
from bloodseg import experiments as ex
from bloodseg.datasets import SegmentationDataset
from bloodseg.models import build_model
from bloodseg.ode import ode_blocks


# ----------------------------------------------------------------------------- the paper's numbers

def test_paper_constants_reproduce_the_gains_quoted_in_the_text():
    t2 = ex.PAPER_TABLE2
    # §4.2 / abstract: +0.88 / +2.18 over U-Net, +0.46 / +1.13 over ResNet, ResNet +0.42 / +1.05
    assert ex.paper_gain(t2, "nodes-unet", "unet", "pa") == pytest.approx(0.88)
    assert ex.paper_gain(t2, "nodes-unet", "unet", "miou") == pytest.approx(2.18)
    assert ex.paper_gain(t2, "nodes-unet", "resunet", "pa") == pytest.approx(0.46)
    assert ex.paper_gain(t2, "nodes-unet", "resunet", "miou") == pytest.approx(1.13)
    assert ex.paper_gain(t2, "resunet", "unet", "pa") == pytest.approx(0.42)
    assert ex.paper_gain(t2, "resunet", "unet", "miou") == pytest.approx(1.05)
    assert set(ex.PAPER_TABLE1) == {"unet"} | {f"ode-unet-{p}" for p in range(1, 10)}


def test_paper_table1_shows_the_trends_the_text_describes():
    times = {p: ex.PAPER_TABLE1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)}
    assert min(times, key=times.get) == 5
    levels = [ex.POSITION_LEVEL[p] for p in range(1, 10)]
    assert levels == [0, 1, 2, 3, 4, 3, 2, 1, 0]
    assert ex.spearman(levels, [times[p] for p in range(1, 10)]) < -0.9


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    x = [0, 1, 2, 3, 4, 3, 2, 1, 0]
    y = rng.normal(size=9)
    assert ex.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(ex.spearman([1, 1, 1], [1, 2, 3]))


# ----------------------------------------------------------------------------- budgets and data

@pytest.mark.parametrize("name", ["smoke", "quick", "full"])
def test_budgets_per_profile(name):
    b = ex.ablation_budget(name)
    assert b.profile == name and b.epochs >= 1 and b.width >= 1
    assert "epoch" in b.describe() and f"width {b.width}" in b.describe()
    if name == "quick":
        assert b.train_patch == 64 and b.width == 16
    if name == "full":
        assert (b.width, b.epochs, b.train_patch) == (32, 50, None)
    base = ex.baseline_budget(name)
    assert base.epochs == ex.get_profile(name).epochs
    s = ex.nodes_settings(name)
    assert s["hidden"] == 2 * b.width and len(s["tolerances"]) >= 2


def test_prepare_data_crops_train_and_val_but_keeps_test_whole():
    b = ex.Budget(profile="smoke", width=4, epochs=1, batch_size=4, lr=1e-3, train_patch=32,
                  crops_per_patch=2, max_train=10, max_val=3, n_timed=2)
    data = ex.prepare_data(b)
    assert len(data["train"]) == 10 and len(data["val"]) == 3
    assert {s.mask.shape for s in data["train"] + data["val"]} == {(32, 32)}
    assert {s.mask.shape for s in data["test"]} == {(64, 64)}
    d = data["description"]
    assert (d["n_train"], d["train_size"], d["test_size"]) == (10, "32x32", "64x64")
    assert "10 train patches" in ex.describe_data(data)


# ----------------------------------------------------------------------------- cached runs

TINY = ex.Budget(profile="smoke", width=4, epochs=1, batch_size=4, lr=1e-3, max_train=4, max_val=2, n_timed=2)


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "RUNS_DIR", tmp_path / "runs")
    return tmp_path / "runs"


def test_train_and_evaluate_trains_caches_and_reuses(runs, capsys):
    data = ex.prepare_data(TINY)
    first = ex.train_and_evaluate(["unet", "ode-unet-5"], "chap", TINY, data, per_image=True)
    assert list(first) == ["unet", "ode-unet-5"]
    for label, r in first.items():
        assert r["cached"] is False
        assert (runs / "chap" / "smoke" / label / "best.pt").is_file()
        assert (runs / "chap" / "smoke" / label / "result.json").is_file()
        for key in ("pa", "cpa", "iou", "miou", "params", "param_mb", "time_s", "time_20_s", "n_timed",
                    "nfe_forward", "history", "train_s", "best_epoch", "per_image"):
            assert key in r, key
        assert r["n_timed"] == 2 and len(r["per_image"]) == len(data["test"])
        assert 0 <= r["miou"] <= 1
    assert first["unet"]["nfe_forward"] == {} and first["ode-unet-5"]["nfe_forward_total"] > 0
    # identical U-Net weights at the start: the ODE-block is the only difference
    a = build_model("unet", width=4).state_dict()
    torch.manual_seed(TINY.seed)
    u = build_model("unet", width=4).state_dict()
    torch.manual_seed(TINY.seed)
    o = build_model("ode-unet-5", width=4).state_dict()
    assert all(torch.equal(u[k], o[k]) for k in u) and a.keys() <= o.keys()

    capsys.readouterr()
    again = ex.train_and_evaluate(["unet"], "chap", TINY, data)
    assert again["unet"]["cached"] is True and "reusing" in capsys.readouterr().out
    assert again["unet"]["history"] == first["unet"]["history"]
    assert again["unet"]["miou"] == pytest.approx(first["unet"]["miou"])

    other = ex.train_and_evaluate(["unet"], "other", TINY, data, reuse_from=["chap"])
    assert other["unet"]["cached"] is True and "chap" in other["unet"]["run_dir"]

    changed = ex.train_and_evaluate(["unet"], "chap", ex.Budget(**{**TINY.__dict__, "lr": 2e-3}), data)
    assert changed["unet"]["cached"] is False, "a run whose settings changed is trained again"


def test_variant_specs_get_their_own_label(runs):
    data = ex.prepare_data(TINY)
    spec = dict(label="nodes-unet-h4", model="nodes-unet", options=dict(ode_hidden=4))
    out = ex.train_and_evaluate([spec], "chap", TINY, data, verbose=False)
    r = out["nodes-unet-h4"]
    model = ex.load_run_model(r)
    assert model.options["ode_hidden"] == 4 and len(ode_blocks(model)) == 3
    assert r["param_mb"] < ex.parameter_memory_mb(build_model("nodes-unet", width=4))


# ----------------------------------------------------------------------------- analyses

def _fake(miou, time_20_s, pa=0.9):
    return dict(pa=pa, cpa=[0.9, 0.8, 0.85], recall=[0.9, 0.8, 0.85], iou=[0.8, 0.7, 0.75], miou=miou,
                time_20_s=time_20_s, nfe_forward_total=14.0, param_mb=1.0, per_image=[dict(pa=pa, miou=miou)])


def _fake_table1(times=None, mious=None):
    times = times or {p: 10.0 / (1 + ex.POSITION_LEVEL[p]) for p in range(1, 10)}
    mious = mious or {p: 0.80 + 0.001 * p for p in range(1, 10)}
    results = {"unet": _fake(0.79, 1.0)}
    results.update({f"ode-unet-{p}": _fake(mious[p], times[p]) for p in range(1, 10)})
    return results


def test_position_summary_decides_from_the_numbers():
    s = ex.position_summary(_fake_table1())
    assert s["ours"]["deeper_is_faster"] and s["ours"]["accuracy_flat"]
    assert s["ours"]["fastest_position"] == 5 and s["ours"]["n_better_than_unet"] == 9
    assert s["paper"]["deeper_is_faster"] and s["paper"]["accuracy_flat"]
    text = ex.position_statement(s)
    assert "'deeper is faster, accuracy about flat' holds here" in text
    flat_time = ex.position_summary(_fake_table1(times={p: 2.0 + 0.01 * p for p in range(1, 10)},
                                                 mious={p: 0.7 + 0.01 * p for p in range(1, 10)}))
    assert not flat_time["ours"]["deeper_is_faster"] and not flat_time["ours"]["accuracy_flat"]
    assert "does not hold here" in ex.position_statement(flat_time)


def test_tables_put_ours_next_to_the_papers():
    t1 = ex.table1_frame(_fake_table1())
    assert list(t1.index) == list(ex.PAPER_TABLE1)
    assert t1[("paper", "MIoU (%)")]["ode-unet-4"] == ex.PAPER_TABLE1["ode-unet-4"]["miou"]
    assert t1[("ours", "x U-Net")]["unet"] == 1.0
    assert t1[("ours", "CPA red (%)")]["unet"] == pytest.approx(85.0)   # class 2 is the red cell
    t2 = ex.table2_frame({"unet": _fake(0.8, 1), "resunet": _fake(0.81, 1), "nodes-unet": _fake(0.82, 2)},
                         {"unet": 1.0, "resunet": 2.0, "nodes-unet": 1.5})
    assert t2[("paper", "PA (%)")]["nodes-unet"] == ex.PAPER_TABLE2["nodes-unet"]["pa"]
    assert t2[("ours", "param MB (width 32)")]["resunet"] == 2.0


def test_f_cost_is_flat_in_arithmetic_and_halves_in_memory():
    rows = {r["position"]: r for r in ex.f_cost_table(width=16, size=128)}
    assert rows[1]["side"] == 128 and rows[5]["side"] == 8 and rows[5]["channels"] == 256
    assert rows[1]["activation_k"] == pytest.approx(2 * rows[2]["activation_k"])
    assert rows[1]["mmacs_per_eval"] == pytest.approx(rows[5]["mmacs_per_eval"], rel=0.07)


def test_param_memory_table_and_ode_hidden():
    rows = ex.param_memory_table(width=8, hidden=(None, 16))
    by = {(r["model"], r["ode_hidden"]): r for r in rows}
    assert by[("resunet", None)]["ratio_to_resunet"] == 1.0
    assert by[("nodes-unet", 16)]["param_mb"] < by[("nodes-unet", None)]["param_mb"]


def test_goals_and_lever_verdict():
    table2 = {"unet": _fake(0.80, 1.0), "nodes-unet": _fake(0.81, 4.0)}
    adj = [dict(model="nodes-unet", backprop="direct", peak_mb=100.0),
           dict(model="nodes-unet", backprop="adjoint", peak_mb=40.0)]
    goals = ex.performance_goals(table2, adj)
    assert [g["met"] for g in goals] == [False, True, True]
    assert goals[0]["measured"] == pytest.approx(4.0) and goals[2]["measured"] == pytest.approx(0.4)
    levers = [dict(lever="a", ratio=4.0, miou=0.85), dict(lever="b", ratio=2.5, miou=0.79),
              dict(lever="c", ratio=2.8, miou=0.81), dict(lever="d", ratio=float("nan"), miou=float("nan"))]
    assert ex.lever_verdict(levers, 0.80)["lever"] == "c"
    assert ex.lever_verdict(levers[:2], 0.80) is None


@pytest.fixture()
def tiny_test_set(small_samples):
    return SegmentationDataset([s for s in small_samples[:2]])


def test_tolerance_curve_restores_the_models_tolerances(tiny_test_set):
    torch.manual_seed(0)
    model = build_model("nodes-unet", width=4).eval()
    before = [b.rtol for b in ode_blocks(model)]
    rows = ex.tolerance_curve(model, tiny_test_set, tolerances=(1e-2, 1e-5), n_timed=2)
    assert [r["rtol"] for r in rows] == [1e-2, 1e-5]
    assert rows[1]["nfe_forward"] >= rows[0]["nfe_forward"] > 0
    assert [b.rtol for b in ode_blocks(model)] == before


def test_levers_time_share_and_profile(tiny_test_set):
    torch.manual_seed(0)
    nodes = build_model("nodes-unet", width=4).eval()
    unet = build_model("unet", width=4).eval()
    narrow = build_model("nodes-unet", width=4, ode_hidden=4).eval()
    rows = ex.inference_levers(nodes, unet, tiny_test_set, n_timed=2, narrow=("ode_hidden=4", narrow))
    names = [r["lever"] for r in rows]
    assert names == ["as trained", "test-time rtol 0.001", "channels_last", "torch.compile(f)",
                     "ode_hidden=4", "ode_hidden=4 + rtol 0.001"]
    for r in rows:
        if r["lever"] != "torch.compile(f)":
            assert r["ratio"] == pytest.approx(r["time_20_s"] / r["unet_time_20_s"])
    assert rows[2]["miou"] == pytest.approx(rows[0]["miou"], abs=1e-3), "channels_last changes no prediction"
    assert np.isnan(rows[3]["ratio"]) and "not tried" in rows[3]["note"]
    share = ex.ode_time_share(nodes, tiny_test_set, n=2)
    assert 0 < share["share"] <= 1
    prof = ex.profile_forward(nodes, tiny_test_set[0][0][None], top=5)
    assert len(prof) == 5 and prof["share (%)"].sum() <= 100.0001


# ----------------------------------------------------------------------------- claims ledger

@pytest.fixture()
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"


def _save(results_dir, chapter, name, data, profile="quick"):
    folder = results_dir / chapter
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(
        {"provenance": {"profile": profile, "device": "cpu (test)", "date": "today"}, "data": data}))


def test_ledger_without_any_results_says_not_measured_yet(results_dir):
    rows = ex.claims_ledger()
    assert len(rows) >= 20
    assert {r["verdict"] for r in rows} == {ex.NOT_YET}
    assert all(r["ours"] is None for r in rows)
    html = ex.ledger_html(rows)
    assert '<a href="06_nodes_unet.html">' in html and "not measured yet" in html


def test_ledger_computes_verdicts_from_saved_results(results_dir):
    _save(results_dir, "06_nodes_unet", "table2", {
        "unet": _fake(0.80, 1.0, pa=0.90), "resunet": _fake(0.82, 1.2, pa=0.91),
        "nodes-unet": _fake(0.81, 5.0, pa=0.92)})
    _save(results_dir, "06_nodes_unet", "tolerance_curve", [
        dict(rtol=1e-1, miou=0.80, time_20_s=1.0, nfe_forward=42),
        dict(rtol=1e-6, miou=0.81, time_20_s=3.0, nfe_forward=90)])
    _save(results_dir, "06_nodes_unet", "param_memory", ex.param_memory_table(width=8, hidden=(None,)))
    _save(results_dir, "06_nodes_unet", "adjoint_memory", [
        dict(model="nodes-unet", backprop="direct", peak_mb=100.0),
        dict(model="nodes-unet", backprop="adjoint", peak_mb=30.0)])
    _save(results_dir, "05_placement_ablation", "position_summary", ex.position_summary(_fake_table1()))
    rows = {r["claim"]: r for r in ex.claims_ledger()}
    gain = rows["NODEs-UNet PA gain over U-Net"]
    assert gain["ours"] == pytest.approx(2.0) and gain["verdict"] == ex.HOLDS and gain["paper"] == 0.88
    assert rows["NODEs-UNet MIoU gain over ResNet"]["verdict"] == ex.FAILS
    assert rows["NODEs-UNet pixel accuracy on the test set (abstract, Table 2)"]["verdict"] == ex.UNTESTABLE
    assert rows["Table 1 accuracy about flat across positions (MIoU spread)"]["verdict"] == ex.HOLDS
    assert rows["Looser test-time tolerance segments faster (time loosest/tightest)"]["ours"] == pytest.approx(1 / 3)
    assert rows["... at some cost in accuracy (MIoU loosest - tightest)"]["verdict"] == ex.HOLDS
    mem = rows["Adjoint halves the peak memory of a NODEs-UNet training step (adjoint / direct, rtol 1e-6)"]
    assert mem["ours"] == pytest.approx(0.3) and mem["verdict"] == ex.HOLDS
    assert rows["A residual block is one Euler step of size 1 (§4.2)"]["verdict"] == ex.NOT_YET
    assert "cpu (test)" in gain["provenance"]
    assert rows["U-Net time for 20 images (Table 1)"]["verdict"] == ex.NOT_YET  # no table1 saved


def test_headline_figure_draws_with_and_without_results(results_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.close(ex.plot_headline())
    _save(results_dir, "06_nodes_unet", "table2", {
        "unet": _fake(0.80, 1.0), "resunet": _fake(0.82, 1.2), "nodes-unet": _fake(0.81, 5.0)})
    plt.close(ex.plot_headline())


def test_gains_within_seed_noise_are_not_judged(results_dir):
    _save(results_dir, "06_nodes_unet", "table2", {
        "unet": _fake(0.80, 1.0, pa=0.90), "resunet": _fake(0.90, 1.2, pa=0.905),
        "nodes-unet": _fake(0.81, 5.0, pa=0.95)})
    noise = dict(seeds=[0, 1, 2], miou_pp=[78.0, 81.0, 84.0], std_pp=3.0, range_pp=6.0,
                 pa_pp=[90.0, 90.5, 91.0], pa_std_pp=0.5)
    summary = ex.position_summary(_fake_table1(), noise)
    assert summary["ours"]["within_seed_noise"] is True and "Seed noise" in ex.position_statement(summary)
    _save(results_dir, "05_placement_ablation", "position_summary", summary)
    rows = {r["claim"]: r for r in ex.claims_ledger()}
    small = rows["NODEs-UNet MIoU gain over U-Net"]          # +1 pp < 2 x 3 pp
    assert small["verdict"] == ex.UNTESTABLE and "seed" in small["note"]
    assert rows["ResNet MIoU gain over U-Net"]["verdict"] == ex.HOLDS        # +10 pp
    assert rows["NODEs-UNet PA gain over U-Net"]["verdict"] == ex.HOLDS      # +5 pp > 2 x 0.5 pp
    assert rows["NODEs-UNet MIoU gain over ResNet"]["verdict"] == ex.FAILS   # -9 pp


def test_seed_noise_retrains_with_other_seeds(runs):
    data = ex.prepare_data(TINY)
    results = ex.train_and_evaluate(["unet"], "chap", TINY, data, verbose=False)
    noise = ex.seed_noise(results, TINY, "chap", data, seeds=(1,))
    assert noise["seeds"] == [0, 1] and len(noise["miou_pp"]) == 2 and noise["std_pp"] >= 0
    assert (runs / "chap" / "smoke" / "unet-seed1" / "best.pt").is_file()


def test_bench_depth_rho_reads_a_recorded_bench(tmp_path, monkeypatch):
    import json as _json
    import bloodseg.report
    from bloodseg.experiments import POSITION_LEVEL, _Missing, bench_depth_rho
    monkeypatch.setattr(bloodseg.report, "RESULTS_DIR", tmp_path)
    with pytest.raises(_Missing):
        bench_depth_rho(("ch", "bench.json"))
    (tmp_path / "ch").mkdir()
    for sign, expected in ((-1, -1.0), (1, 1.0)):      # time falling / rising with depth
        models = [{"model": f"ode-unet-{p}", "ratio_to_unet": 2.0 ** (sign * POSITION_LEVEL[p])} for p in range(1, 10)]
        (tmp_path / "ch" / "bench.json").write_text(_json.dumps({"models": models}))
        assert bench_depth_rho(("ch", "bench.json")) == pytest.approx(expected)
