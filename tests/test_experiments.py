"""bloodseg.paper (runs, table1, table2, tolerance, claims): paper constants, recipes, cached runs,
analyses and the claims ledger."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bloodseg.models import parameter_memory_mb
from bloodseg.paper import claims, reference, report, runs, table1, table2, tolerance
from bloodseg.datasets import SegmentationDataset
from bloodseg.models import build_model
from bloodseg.ode import ode_blocks
from bloodseg.recipe import get_recipe


# ----------------------------------------------------------------------------- the paper's numbers

def test_paper_constants_reproduce_the_gains_quoted_in_the_text():
    t2 = reference.PAPER_TABLE2
    # §4.2 / abstract: +0.88 / +2.18 over U-Net, +0.46 / +1.13 over ResNet, ResNet +0.42 / +1.05
    assert reference.paper_gain(t2, "nodes-unet", "unet", "pa") == pytest.approx(0.88)
    assert reference.paper_gain(t2, "nodes-unet", "unet", "miou") == pytest.approx(2.18)
    assert reference.paper_gain(t2, "nodes-unet", "resunet", "pa") == pytest.approx(0.46)
    assert reference.paper_gain(t2, "nodes-unet", "resunet", "miou") == pytest.approx(1.13)
    assert reference.paper_gain(t2, "resunet", "unet", "pa") == pytest.approx(0.42)
    assert reference.paper_gain(t2, "resunet", "unet", "miou") == pytest.approx(1.05)
    assert set(reference.PAPER_TABLE1) == {"unet"} | {f"ode-unet-{p}" for p in range(1, 10)}


def test_paper_table1_shows_the_trends_the_text_describes():
    times = {p: reference.PAPER_TABLE1[f"ode-unet-{p}"]["time_s"] for p in range(1, 10)}
    assert min(times, key=times.get) == 5
    levels = [table1.POSITION_LEVEL[p] for p in range(1, 10)]
    assert levels == [0, 1, 2, 3, 4, 3, 2, 1, 0]
    assert table1.spearman(levels, [times[p] for p in range(1, 10)]) < -0.9


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    x = [0, 1, 2, 3, 4, 3, 2, 1, 0]
    y = rng.normal(size=9)
    assert table1.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(table1.spearman([1, 1, 1], [1, 2, 3]))


# ----------------------------------------------------------------------------- budgets and data

@pytest.mark.parametrize("name", ["smoke", "quick", "full"])
def test_budgets_per_profile(name):
    b = runs.ablation_budget(name)
    assert b.name == name and b.train.epochs >= 1 and b.model.width >= 1
    assert "epoch" in b.describe() and f"width {b.model.width}" in b.describe()
    if name == "quick":
        assert b.data.train_patch == 64 and b.model.width == 16
    if name == "full":
        assert (b.model.width, b.train.epochs, b.data.train_patch) == (32, 50, None)
    base = runs.baseline_budget(name)
    assert base.train.epochs == get_recipe(name).train.epochs
    s = runs.nodes_settings(name)
    assert s["hidden"] == 2 * b.model.width and len(s["tolerances"]) >= 2


def test_prepare_data_crops_train_and_val_but_keeps_test_whole():
    b = get_recipe("smoke").replace(**{"model.width": 4, "train.epochs": 1, "train.batch_size": 4, "train.lr": 1e-3,
                                       "data.train_patch": 32, "data.crops_per_patch": 2, "data.max_train": 10,
                                       "data.max_val": 3, "measure.n_timed": 2})
    data = runs.prepare_data(b)
    assert len(data["train"]) == 10 and len(data["val"]) == 3
    assert {s.mask.shape for s in data["train"] + data["val"]} == {(32, 32)}
    assert {s.mask.shape for s in data["test"]} == {(64, 64)}
    d = data["description"]
    assert (d["n_train"], d["train_size"], d["test_size"]) == (10, "32x32", "64x64")
    assert "10 train patches" in runs.describe_data(data)


# ----------------------------------------------------------------------------- cached runs

TINY = get_recipe("smoke").replace(**{"model.width": 4, "train.epochs": 1, "train.batch_size": 4, "train.lr": 1e-3,
                                      "data.max_train": 4, "data.max_val": 2, "measure.n_timed": 2})


@pytest.fixture()
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "RUNS_DIR", tmp_path / "runs")
    return tmp_path / "runs"


def test_train_and_evaluate_trains_caches_and_reuses(runs_dir, capsys):
    data = runs.prepare_data(TINY)
    first = runs.train_and_evaluate(["unet", "ode-unet-5"], "chap", TINY, data, per_image=True)
    assert list(first) == ["unet", "ode-unet-5"]
    for label, r in first.items():
        assert r["cached"] is False
        assert (runs_dir / "chap" / "smoke" / label / "best.pt").is_file()
        assert (runs_dir / "chap" / "smoke" / label / "result.json").is_file()
        for key in ("pa", "cpa", "iou", "miou", "params", "param_mb", "time_s", "time_20_s", "n_timed",
                    "nfe_forward", "history", "train_s", "best_epoch", "per_image"):
            assert key in r, key
        assert r["n_timed"] == 2 and len(r["per_image"]) == len(data["test"])
        assert 0 <= r["miou"] <= 1
    assert first["unet"]["nfe_forward"] == {} and first["ode-unet-5"]["nfe_forward_total"] > 0
    # identical U-Net weights at the start: the ODE-block is the only difference
    a = build_model("unet", width=4).state_dict()
    torch.manual_seed(TINY.train.seed)
    u = build_model("unet", width=4).state_dict()
    torch.manual_seed(TINY.train.seed)
    o = build_model("ode-unet-5", width=4).state_dict()
    assert all(torch.equal(u[k], o[k]) for k in u) and a.keys() <= o.keys()

    capsys.readouterr()
    again = runs.train_and_evaluate(["unet"], "chap", TINY, data)
    assert again["unet"]["cached"] is True and "reusing" in capsys.readouterr().out
    assert again["unet"]["history"] == first["unet"]["history"]
    assert again["unet"]["miou"] == pytest.approx(first["unet"]["miou"])

    other = runs.train_and_evaluate(["unet"], "other", TINY, data, reuse_from=["chap"])
    assert other["unet"]["cached"] is True and "chap" in other["unet"]["run_dir"]

    changed = runs.train_and_evaluate(["unet"], "chap", TINY.replace(**{"train.lr": 2e-3}), data)
    assert changed["unet"]["cached"] is False, "a run whose settings changed is trained again"


def test_variant_specs_get_their_own_label(runs_dir):
    data = runs.prepare_data(TINY)
    spec = dict(label="nodes-unet-h4", model="nodes-unet", options=dict(ode_hidden=4))
    out = runs.train_and_evaluate([spec], "chap", TINY, data, verbose=False)
    r = out["nodes-unet-h4"]
    model = runs.load_run_model(r)
    assert model.options["ode_hidden"] == 4 and len(ode_blocks(model)) == 3
    assert r["param_mb"] < parameter_memory_mb(build_model("nodes-unet", width=4))


# ----------------------------------------------------------------------------- analyses

def _fake(miou, time_20_s, pa=0.9):
    return dict(pa=pa, cpa=[0.9, 0.8, 0.85], recall=[0.9, 0.8, 0.85], iou=[0.8, 0.7, 0.75], miou=miou,
                time_20_s=time_20_s, nfe_forward_total=14.0, param_mb=1.0, per_image=[dict(pa=pa, miou=miou)])


def _fake_table1(times=None, mious=None):
    times = times or {p: 10.0 / (1 + table1.POSITION_LEVEL[p]) for p in range(1, 10)}
    mious = mious or {p: 0.80 + 0.001 * p for p in range(1, 10)}
    results = {"unet": _fake(0.79, 1.0)}
    results.update({f"ode-unet-{p}": _fake(mious[p], times[p]) for p in range(1, 10)})
    return results


def test_position_summary_decides_from_the_numbers():
    s = table1.position_summary(_fake_table1())
    assert s["ours"]["deeper_is_faster"] and s["ours"]["accuracy_flat"]
    assert s["ours"]["fastest_position"] == 5 and s["ours"]["n_better_than_unet"] == 9
    assert s["paper"]["deeper_is_faster"] and s["paper"]["accuracy_flat"]
    text = table1.position_statement(s)
    assert "'deeper is faster, accuracy about flat' holds here" in text
    flat_time = table1.position_summary(_fake_table1(times={p: 2.0 + 0.01 * p for p in range(1, 10)},
                                                 mious={p: 0.7 + 0.01 * p for p in range(1, 10)}))
    assert not flat_time["ours"]["deeper_is_faster"] and not flat_time["ours"]["accuracy_flat"]
    assert "does not hold here" in table1.position_statement(flat_time)


def test_tables_put_ours_next_to_the_papers():
    t1 = table1.table1_frame(_fake_table1())
    assert list(t1.index) == list(reference.PAPER_TABLE1)
    assert t1[("paper", "MIoU (%)")]["ode-unet-4"] == reference.PAPER_TABLE1["ode-unet-4"]["miou"]
    assert t1[("ours", "x U-Net")]["unet"] == 1.0
    assert t1[("ours", "CPA red (%)")]["unet"] == pytest.approx(85.0)   # class 2 is the red cell
    t2 = table2.table2_frame({"unet": _fake(0.8, 1), "resunet": _fake(0.81, 1), "nodes-unet": _fake(0.82, 2)},
                         {"unet": 1.0, "resunet": 2.0, "nodes-unet": 1.5})
    assert t2[("paper", "PA (%)")]["nodes-unet"] == reference.PAPER_TABLE2["nodes-unet"]["pa"]
    assert t2[("ours", "param MB (width 32)")]["resunet"] == 2.0


def test_f_cost_is_flat_in_arithmetic_and_halves_in_memory():
    rows = {r["position"]: r for r in table1.f_cost_table(width=16, size=128)}
    assert rows[1]["side"] == 128 and rows[5]["side"] == 8 and rows[5]["channels"] == 256
    assert rows[1]["activation_k"] == pytest.approx(2 * rows[2]["activation_k"])
    assert rows[1]["mmacs_per_eval"] == pytest.approx(rows[5]["mmacs_per_eval"], rel=0.07)


def test_param_memory_table_and_ode_hidden():
    rows = table2.param_memory_table(width=8, hidden=(None, 16))
    by = {(r["model"], r["ode_hidden"]): r for r in rows}
    assert by[("resunet", None)]["ratio_to_resunet"] == 1.0
    assert by[("nodes-unet", 16)]["param_mb"] < by[("nodes-unet", None)]["param_mb"]


def test_goals_and_lever_verdict():
    t2 = {"unet": _fake(0.80, 1.0), "nodes-unet": _fake(0.81, 4.0)}
    adj = [dict(model="nodes-unet", backprop="direct", peak_mb=100.0),
           dict(model="nodes-unet", backprop="adjoint", peak_mb=40.0)]
    goals = table2.performance_goals(t2, adj)
    assert [g["met"] for g in goals] == [False, True, True]
    assert goals[0]["measured"] == pytest.approx(4.0) and goals[2]["measured"] == pytest.approx(0.4)
    levers = [dict(lever="a", ratio=4.0, miou=0.85), dict(lever="b", ratio=2.5, miou=0.79),
              dict(lever="c", ratio=2.8, miou=0.81), dict(lever="d", ratio=float("nan"), miou=float("nan"))]
    assert table2.lever_verdict(levers, 0.80)["lever"] == "c"
    assert table2.lever_verdict(levers[:2], 0.80) is None


@pytest.fixture()
def tiny_test_set(small_samples):
    return SegmentationDataset([s for s in small_samples[:2]])


def test_tolerance_curve_restores_the_models_tolerances(tiny_test_set):
    torch.manual_seed(0)
    model = build_model("nodes-unet", width=4).eval()
    before = [b.rtol for b in ode_blocks(model)]
    rows = tolerance.tolerance_curve(model, tiny_test_set, tolerances=(1e-2, 1e-5), n_timed=2)
    assert [r["rtol"] for r in rows] == [1e-2, 1e-5]
    assert rows[1]["nfe_forward"] >= rows[0]["nfe_forward"] > 0
    assert [b.rtol for b in ode_blocks(model)] == before


def test_levers_time_share_and_profile(tiny_test_set):
    torch.manual_seed(0)
    nodes = build_model("nodes-unet", width=4).eval()
    unet = build_model("unet", width=4).eval()
    narrow = build_model("nodes-unet", width=4, ode_hidden=4).eval()
    rows = table2.inference_levers(nodes, unet, tiny_test_set, n_timed=2, narrow=("ode_hidden=4", narrow))
    names = [r["lever"] for r in rows]
    assert names == ["as trained", "test-time rtol 0.001", "channels_last", "torch.compile(f)",
                     "ode_hidden=4", "ode_hidden=4 + rtol 0.001"]
    for r in rows:
        if r["lever"] != "torch.compile(f)":
            assert r["ratio"] == pytest.approx(r["time_20_s"] / r["unet_time_20_s"])
    assert rows[2]["miou"] == pytest.approx(rows[0]["miou"], abs=1e-3), "channels_last changes no prediction"
    assert np.isnan(rows[3]["ratio"]) and "not tried" in rows[3]["note"]
    share = tolerance.ode_time_share(nodes, tiny_test_set, n=2)
    assert 0 < share["share"] <= 1
    prof = tolerance.profile_forward(nodes, tiny_test_set[0][0][None], top=5)
    assert len(prof) == 5 and prof["share (%)"].sum() <= 100.0001


def test_calibrated_lever_is_chosen_on_validation_and_leaves_the_model_alone(small_samples, tiny_test_set):
    torch.manual_seed(0)
    nodes = build_model("nodes-unet", width=4, rtol=0.1).eval()
    unet = build_model("unet", width=4).eval()
    before = [(b.method, b.rtol, b.step_size) for b in ode_blocks(nodes)]
    rows = table2.inference_levers(nodes, unet, tiny_test_set, n_timed=2, val=small_samples[2:4])
    cal = rows[1]
    assert cal["lever"].startswith("calibrated: ") and "validation patches" in cal["note"]
    assert [(b.method, b.rtol, b.step_size) for b in ode_blocks(nodes)] == before   # the copy was changed
    assert cal["ratio"] == pytest.approx(cal["time_20_s"] / cal["unet_time_20_s"])


# ----------------------------------------------------------------------------- claims ledger

@pytest.fixture()
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(claims, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"


def _save(results_dir, chapter, name, data, profile="quick"):
    folder = results_dir / chapter
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(
        {"provenance": {"profile": profile, "device": "cpu (test)", "date": "today"}, "data": data}))


def _record(results_dir, experiment, label, seed, scale="study", **fields):
    folder = results_dir / experiment / scale
    folder.mkdir(parents=True, exist_ok=True)
    rec = dict(format=1, experiment=experiment, scale=scale, label=label, seed=seed, git_commit="abc1234def",
               command="bloodseg reproduce", recipe={}, device="cpu", torch="2.13.0", date="2026-12-03T00:00:00",
               wall_s=1.0, **fields)
    (folder / f"{label}-seed{seed}.json").write_text(json.dumps(rec))


def _scored(results_dir, experiment, label, seed, miou, pa=0.9, n=30, spread=0.05):
    """A record whose per-image MIoU is ``miou`` + the same per-image pattern for every model."""
    pattern = spread * np.sin(np.arange(n))
    per = [dict(pa=pa + 0.1 * p, miou=miou + p, iou=[0.0]) for p in pattern]
    _record(results_dir, experiment, label, seed, per_image=per,
            test=dict(pa=pa, miou=miou, cpa=[], recall=[], iou=[]), history=[])


def test_ledger_without_any_results_says_not_measured_yet(results_dir):
    rows = claims.claims_ledger()
    assert len(rows) >= 20 and {r["table"] for r in rows} == {"paper", "goal", "paper-real", "robustness"}
    assert all(r["verdict"] == claims.NOT_YET for r in rows if r["table"] in ("paper-real", "robustness"))
    judged = [r for r in rows if r["verdict"] not in (claims.NOT_YET, claims.UNTESTABLE)]
    assert {r["claim"] for r in judged} == {"NODEs-UNet's parameter memory is 46% of ResNet's (width 32)"}
    assert sum(r["verdict"] == claims.UNTESTABLE for r in rows) == 4
    assert all(r["ours"] is None and "needs" in r["note"] for r in rows if r["verdict"] == claims.NOT_YET)
    html = claims.ledger_html(rows)
    assert '<a href="06_nodes_unet.html">' in html and "not measured yet" in html


def test_ledger_judges_every_row_by_its_interval(results_dir):
    for seed in range(3):
        jitter = 0.002 * seed
        _scored(results_dir, "table2", "unet", seed, 0.80 + jitter, pa=0.90)
        _scored(results_dir, "table2", "resunet", seed, 0.83 + jitter, pa=0.89 - jitter)   # +3 pp surely
        _scored(results_dir, "table2", "nodes-unet", seed, 0.80 + jitter + (0.01 if seed == 1 else -0.01),
                pa=0.90)                                                                      # +-1 pp: unsure
        _scored(results_dir, "table1", "unet", seed, 0.80 + jitter)
        for p in range(1, 10):
            _scored(results_dir, "table1", f"ode-unet-{p}", seed, 0.85 + 0.001 * p + jitter)
        times = {"unet": [1.0, 1.1, 0.9], "nodes-unet": [4.0, 4.2, 3.9], "resunet": [1.2] * 3}
        times.update({f"ode-unet-{p}": [10.0 / (1 + table1.POSITION_LEVEL[p]) * f for f in (1.0, 1.05, 0.95)]
                      for p in range(1, 10)})
        _record(results_dir, "timing", "timing", seed, timing=dict(time_per_image_s=times))
        _record(results_dir, "tolerance", "nodes-unet", seed, tolerance_curve=[
            dict(rtol=1e-1, miou=0.80 - 0.01 * (seed + 1), time_20_s=1.0, nfe_forward=40),
            dict(rtol=1e-6, miou=0.80, time_20_s=3.0 + seed, nfe_forward=90)])
    rows = {r["claim"]: r for r in claims.claims_ledger()}
    res = rows["ResNet MIoU gain over U-Net (Table 2)"]
    assert res["ours"] == pytest.approx(3.0) and res["ci"][0] > 0 and res["verdict"] == claims.HOLDS
    assert "study | 3 seed(s)" in res["source"] and "abc1234d" in res["source"]
    assert rows["NODEs-UNet MIoU gain over U-Net (Table 2)"]["verdict"] == claims.INCONCLUSIVE
    assert rows["NODEs-UNet MIoU gain over ResNet (Table 2)"]["verdict"] == claims.FAILS
    assert rows["ResNet PA gain over U-Net (Table 2)"]["verdict"] == claims.FAILS
    every = rows["An ODE-block at every position beats the U-Net's MIoU (Table 1)"]
    assert every["ours"] == 9 and every["ci"] == (9.0, 9.0) and every["verdict"] == claims.HOLDS
    flat = rows["Table 1's accuracy is about flat across positions (MIoU spread)"]
    assert flat["ours"] == pytest.approx(0.8) and flat["verdict"] == claims.HOLDS
    assert rows["Time falls toward the bottom of the U and rises again (Spearman: depth vs time)"]["verdict"] == claims.HOLDS
    fastest = rows["The fastest single-block position is the bottom of the U (position 5)"]
    assert fastest["ours"] == pytest.approx(10 / 5 / (10 / 4)) and fastest["verdict"] == claims.HOLDS
    cost = rows["NODEs-UNet 'reduces the computational cost' (abstract): time vs U-Net"]
    assert cost["ours"] == pytest.approx(4.0333 / 1.0, rel=1e-3) and cost["verdict"] == claims.FAILS
    assert rows["A looser test-time tolerance segments faster"]["verdict"] == claims.HOLDS
    assert rows["... at some cost in accuracy"]["ours"] == pytest.approx(-2.0)
    assert rows["NODEs-UNet MIoU (abstract, Table 2)"]["verdict"] == claims.UNTESTABLE
    assert rows["Adjoint training step needs at most half the memory of direct backprop (NODEs-UNet)"]["verdict"] \
        == claims.NOT_YET                                     # no adjoint-memory records
    counts = claims.verdict_counts(list(rows.values()))
    assert sum(counts.values()) == sum(r["table"] == "paper" for r in rows.values())
    text = claims.glance_markdown(list(rows.values()))
    assert f"**{counts[claims.HOLDS]} hold**" in text and "| ResNet MIoU gain over U-Net (Table 2) [pp] |" in text


def test_ledger_refuses_a_record_without_provenance(results_dir):
    _scored(results_dir, "table2", "unet", 0, 0.8)
    path = results_dir / "table2" / "study" / "unet-seed0.json"
    rec = json.loads(path.read_text())
    del rec["git_commit"]
    path.write_text(json.dumps(rec))
    with pytest.raises(Exception, match="provenance"):
        claims.claims_ledger()


def test_ledger_figure_draws_with_and_without_results(results_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.close(claims.plot_ledger(claims.claims_ledger()))
    for seed in range(2):
        for label, m in (("unet", 0.8), ("resunet", 0.82), ("nodes-unet", 0.81)):
            _scored(results_dir, "table2", label, seed, m + 0.01 * seed)
    plt.close(claims.plot_ledger(claims.claims_ledger()))


def test_seed_noise_retrains_with_other_seeds(runs_dir):
    data = runs.prepare_data(TINY)
    results = runs.train_and_evaluate(["unet"], "chap", TINY, data, verbose=False)
    noise = runs.seed_noise(results, TINY, "chap", data, seeds=(1,))
    assert noise["seeds"] == [0, 1] and len(noise["miou_pp"]) == 2 and noise["std_pp"] >= 0
    assert (runs_dir / "chap" / "smoke" / "unet-seed1" / "best.pt").is_file()


def test_bench_depth_rho_reads_a_recorded_bench(tmp_path, monkeypatch):
    from bloodseg.paper.claims import _Missing, bench_depth_rho
    from bloodseg.paper.table1 import POSITION_LEVEL
    monkeypatch.setattr(claims, "RESULTS_DIR", tmp_path)
    with pytest.raises(_Missing):
        bench_depth_rho(("ch", "bench.json"))
    (tmp_path / "ch").mkdir()
    for sign, expected in ((-1, -1.0), (1, 1.0)):      # time falling / rising with depth
        models = [{"model": f"ode-unet-{p}", "ratio_to_unet": 2.0 ** (sign * POSITION_LEVEL[p])} for p in range(1, 10)]
        (tmp_path / "ch" / "bench.json").write_text(json.dumps({"models": models}))
        assert bench_depth_rho(("ch", "bench.json")) == pytest.approx(expected)


def test_intro_glance_is_the_ledger_of_the_committed_results():
    """The intro includes book/results/claims/glance.md; it must say what the ledger says now."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    glance = (root / "book" / "results" / "claims" / "glance.md").read_text()
    assert "{include} results/claims/glance.md" in (root / "book" / "intro.md").read_text()
    assert glance.strip() == claims.glance_markdown(claims.claims_ledger()).strip(), \
        "the intro's Results at a glance is stale: re-execute book/claims.ipynb"
