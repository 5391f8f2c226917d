"""The speed records of the chapter "Making ODE-blocks cheap": bloodseg.paper.speed (the side-by-side
bench), bloodseg.paper.blocks (what the ODE-blocks learned), bloodseg.paper.solvers (the solver
experiment), bloodseg.paper.units (what they share) and bloodseg.paper.figures_speed.

The flow measures are checked on blocks whose f is known (zero, a scalar and a matrix linear
field, solved exactly by the matrix exponential); the three record functions on a smoke setup
(width 4, the smoke recipe, random or briefly trained weights) for the fields they document; the
tables, prose and figures of the committed records against what they were before the split of
bloodseg.paper.cheap (tests/data/speed_views_before_split.json)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from bloodseg.checkpoint import save_checkpoint
from bloodseg.models import build_model
from bloodseg.ode import ODEBlock, ode_blocks
from bloodseg.paper import blocks, figures_speed, solvers, speed, units


pytestmark = pytest.mark.usefixtures("one_thread")


class Zero(nn.Module):
    def forward(self, t, h):
        return torch.zeros_like(h)


class Scalar(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, t, h):
        return self.a * h


class Matrix(nn.Module):
    """f(t, h) = A h over the channels (a 1x1 convolution without bias)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = A

    def forward(self, t, h):
        return torch.einsum("ij,njhw->nihw", self.A, h)


def _block(func, channels=3, rtol=1e-7):
    return ODEBlock(channels, rtol=rtol, func=func)


def test_flow_of_a_zero_field_is_still():
    h0 = torch.randn(2, 3, 4, 4)
    m = blocks.flow_measures(_block(Zero()), h0)
    assert set(m["f_ratio"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert all(v == 0 for v in m["f_ratio"].values())
    # h stays h0 up to the rounding of dopri5's interpolation at the requested times
    assert m["change"] == pytest.approx(0, abs=1e-6) and m["late_change"] == pytest.approx(0, abs=1e-6)
    assert m["euler_diff"] == pytest.approx(0, abs=1e-6)
    assert math.isnan(m["euler_diff_of_change"])   # nothing moved: no share of a change to get wrong
    assert m["n_samples"] == 2 and len(m["per_sample"]["euler_diff"]) == 2


@pytest.mark.parametrize("a", [0.3, -0.5, 1.0])
def test_flow_of_a_scalar_linear_field_matches_the_exponential(a):
    h0 = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    m = blocks.flow_measures(_block(Scalar(a)).double(), h0)
    for v in m["f_ratio"].values():          # ||a h|| / ||h|| = |a| everywhere on the trajectory
        assert v == pytest.approx(abs(a), rel=1e-9)
    assert m["change"] == pytest.approx(abs(math.exp(a) - 1), rel=1e-5)
    assert m["late_change"] == pytest.approx(abs(math.exp(a / 2) - 1), rel=1e-5)
    # h(1) = e^a h0, one Euler step (1 + a) h0
    assert m["euler_diff"] == pytest.approx(abs(math.exp(a) - 1 - a) / math.exp(a), rel=1e-5)
    assert m["euler_diff_of_change"] == pytest.approx(abs(math.exp(a) - 1 - a) / abs(math.exp(a) - 1), rel=1e-5)


def test_flow_of_a_matrix_linear_field_matches_the_matrix_exponential():
    g = torch.Generator().manual_seed(0)
    A = 0.6 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    m = blocks.flow_measures(_block(Matrix(A)), h0)
    E = torch.linalg.matrix_exp(A)
    exact = torch.einsum("ij,njhw->nihw", E, h0)
    euler = h0 + torch.einsum("ij,njhw->nihw", A, h0)
    want = ((exact - euler).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).mean()
    assert m["euler_diff"] == pytest.approx(float(want), rel=1e-5)
    change = ((exact - h0).flatten(1).norm(dim=1) / h0.flatten(1).norm(dim=1)).mean()
    assert m["change"] == pytest.approx(float(change), rel=1e-5)


def test_flow_measures_need_the_times_they_report():
    from bloodseg.errors import BloodsegError
    with pytest.raises(BloodsegError, match="0.5"):
        blocks.flow_measures(_block(Zero()), torch.zeros(1, 3, 2, 2), times=(0.0, 1.0))


def test_count_macs_separates_nfe_times_the_cost_of_f():
    torch.manual_seed(0)
    model = build_model("nodes-unet", width=4, method="euler").eval()
    x = torch.rand(1, 3, 64, 64)
    macs = units.count_macs(model, x)
    assert set(macs["blocks"]) == {b.name for b in ode_blocks(model)}
    for b in ode_blocks(model):
        row = macs["blocks"][b.name]
        c = b.func.channels
        side = {4: 8, 5: 4, 6: 8}[int(b.name.rsplit(" ", 1)[1])]
        assert row["nfe"] == 1
        assert row["f_mmacs_per_eval"] * 1e6 == pytest.approx(2 * 9 * (c + 1) * c * side * side)
    inside = sum(r["mmacs"] for r in macs["blocks"].values())
    assert macs["total_mmacs"] == pytest.approx(macs["backbone_mmacs"] + inside)
    # the same network without blocks costs the backbone
    unet = build_model("unet", width=4).eval()
    assert units.count_macs(unet, x)["total_mmacs"] == pytest.approx(macs["backbone_mmacs"])


def test_ratio_summary_is_per_round_and_has_an_interval():
    times = {"unet": [1.0, 2.0, 1.0, 1.0, 1.0], "slow": [3.0, 6.0, 3.0, 3.3, 2.7]}
    s = units.ratio_summary(times, "unet", n_images=20)
    assert s["unet"]["ratio_median"] == 1.0 and s["unet"]["ratio_ci"] == [1.0, 1.0]
    assert s["slow"]["ratio_median"] == pytest.approx(3.0)       # the slow round 2 is slow for both
    lo, hi = s["slow"]["ratio_ci"]
    assert lo <= 3.0 <= hi
    assert s["slow"]["time_per_image_s"] == pytest.approx(3.0 / 20)


# ----------------------------------------------------------------------------- the records, smoke-sized

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units")
    out = {}
    for label, name, opts in [("unet", "unet", {}), ("resunet", "resunet", {}), ("nodes-unet", "nodes-unet", {}),
                              ("nodes-unet-h16", "nodes-unet", {"ode_hidden": 16}), ("ode-unet-5", "ode-unet-5", {})]:
        torch.manual_seed(0)
        out[label] = str(save_checkpoint(folder / f"{label}.pt", build_model(name, width=4, **opts)))
    return out


def test_bench_options_smoke(ckpts, tmp_path):
    out = tmp_path / "bench.json"
    # compile_backend="eager": dynamo traces (graph breaks counted) without inductor's minutes of C++
    r = speed.bench_options(ckpts, scale="smoke", width=4, n_images=2, rounds=2, regularise_work=None, out=out,
                            compile_backend="eager", command="test", log=lambda m: None)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(r["rows"], default=float))
    for key in ("git_commit", "command", "device", "torch", "date", "wall_s"):
        assert key in r["provenance"]
    load = r["provenance"]["load_average_1_5_15_min"]
    assert len(load["start"]) == len(load["end"]) == 3 and min(load["start"] + load["end"]) >= 0
    rows = {row["option"]: row for row in r["rows"]}
    assert rows["unet"]["ratio_to_unet"] == 1.0 and rows["unet"]["nfe_total"] == 0
    for row in rows.values():
        for key in ("params", "nfe_forward", "nfe_total", "time_2_s", "ratio_to_unet", "ratio_ci", "within_goal",
                    "mmacs", "macs_ratio_to_unet", "test_miou", "mean_image_miou_ci", "miou_diff_to_unet_pp",
                    "runtime", "solver"):
            assert key in row, (row["option"], key)
        assert len(row["time_s_rounds"]) == 2 and row["ratio_ci"][0] <= row["ratio_ci"][1]
        assert 0 <= row["test_miou"] <= 1
        assert row["within_goal"] in ("holds", "does not hold", "inconclusive")
    assert rows["nodes-unet"]["solver"] == "trained" and rows["nodes-unet"]["nfe_total"] > 3
    cal = r["calibration"]["nodes-unet"]
    assert cal["pick_label"] != "trained", "every fixed-grid setting keeps a random network's score here"
    calibrated = rows[f"nodes-unet {cal['pick_label']}"]
    nominal = {"euler": 1, "midpoint": 2, "rk4": 4}[cal["pick"]["method"]] * cal["pick"]["steps"]
    assert calibrated["nfe_total"] == 3 * nominal
    onnx = rows[f"nodes-unet {cal['pick_label']} onnx"]
    assert onnx["runtime"] == "onnxruntime" and onnx["nfe_total"] == calibrated["nfe_total"]
    assert onnx["params"] == calibrated["params"] and onnx["mmacs"] == calibrated["mmacs"]
    assert abs(onnx["test_miou"] - calibrated["test_miou"]) < 0.01
    # an ONNX option is held against the ONNX U-Net, a PyTorch one against the PyTorch U-Net
    assert rows["unet onnx"]["ratio_same_runtime"] == 1.0 and rows["unet onnx"]["nfe_total"] == 0
    assert rows["nodes-unet"]["ratio_same_runtime"] == rows["nodes-unet"]["ratio_to_unet"]
    assert onnx["ratio_same_runtime"] != onnx["ratio_to_unet"]
    # the pick follows the rule: the cheapest eligible fixed-grid setting
    eligible = [x for x in cal["rows"][1:] if x["ok"] and x["drop_pp"] <= cal["max_drop_pp"] + 1e-9]
    assert cal["pick_label"] == min(eligible, key=lambda x: x["nominal_nfe_per_block"])["label"]
    assert "nodes-unet-h16" in rows and "ode-unet-5" in rows and "resunet" in rows
    frame = speed.bench_frame(r)
    assert list(frame.index) == list(rows)
    # the variants: the same weights run another way, each held against its base in the same rounds
    pick = f"nodes-unet {cal['pick_label']}"
    variants = {k: v for k, v in rows.items() if v.get("variant")}
    assert set(variants) == {"nodes-unet torchode", f"{pick} unrolled", "unet channels_last", f"{pick} channels_last",
                             "unet compiled", f"{pick} compiled"}
    for label, row in variants.items():
        base = rows[row["base"]]
        assert row["params"] == base["params"] and row["mmacs"] == base["mmacs"], label
        assert row["ratio_to_base_ci"][0] <= row["ratio_to_base"] <= row["ratio_to_base_ci"][1]
        assert row["pays"] == speed._pays(row["ratio_to_base_ci"])
        assert abs(row["test_miou"] - base["test_miou"]) < 0.01, label
    assert all(v.get("ratio_to_base") is None for k, v in rows.items() if k not in variants)
    tode = rows["nodes-unet torchode"]
    assert tode["backend"] == "torchode" and tode["solver"] == "trained" and tode["nfe_total"] > 3
    assert rows["nodes-unet"]["backend"] == "torchdiffeq" and rows["unet"]["backend"] is None
    unrolled = rows[f"{pick} unrolled"]          # torchdiffeq's fixed grid, bit for bit: the same masks
    assert unrolled["backend"] == "unrolled" and unrolled["test_miou"] == calibrated["test_miou"]
    assert unrolled["nfe_total"] == calibrated["nfe_total"] == rows[f"{pick} compiled"]["nfe_total"]
    for label in ("unet compiled", f"{pick} compiled"):
        assert rows[label]["compile_s"] > 0 and rows[label]["compile_backend"] == "eager"
        assert rows[label]["graphs"] >= 1
    assert rows["unet compiled"]["graph_breaks"] == 0 < rows[f"{pick} compiled"]["graph_breaks"]
    # like with like: a channels_last or compiled variant against the U-Net run the same way
    for v in ("channels_last", "compiled"):
        assert rows[f"unet {v}"]["ratio_same_runtime"] == 1.0 and rows[f"{pick} {v}"]["same_runtime_reference"] == f"unet {v}"
    assert rows[f"{pick} unrolled"]["same_runtime_reference"] == "unet" == tode["same_runtime_reference"]
    assert rows[f"{pick} unrolled"]["ratio_same_runtime"] == rows[f"{pick} unrolled"]["ratio_to_unet"]
    assert r["compile_backend"] == "eager"
    # the chapter's text is made from the record
    text = speed.variants_findings(r)
    assert "**torchode**" in text and "**The unrolled loop**" in text and "the same masks, bit for bit" in text
    assert f"{100 * tode['test_miou']:.2f}%" in text and "Kept, because they pay:" in text
    assert len(speed.variants_frame(r)) == len(variants)
    findings = speed.bench_findings(r)
    assert f"{rows['nodes-unet']['ratio_to_unet']:.2f}x" in findings and "variant" not in findings
    summary = speed.bench_summary(r)
    assert summary.count("\n- ") == 1 and f"{calibrated['ratio_to_unet']:.2f}x" in summary
    assert list(speed.study_units_frame(r).index) == ["unet", "resunet", "ode-unet-5", "nodes-unet", "nodes-unet-h16"]
    # a repeat run: kept only what pays in both
    a, b = json.loads(json.dumps(r, default=float)), json.loads(json.dumps(r, default=float))
    for row in a["rows"]:
        row["pays"] = "yes" if row.get("variant") else None
    for row in b["rows"]:
        row["pays"] = ("yes" if row["option"] == "nodes-unet torchode" else "no") if row.get("variant") else None
    kept, once, rest = speed._kept(a, b)
    assert [k["option"] for k in kept] == ["nodes-unet torchode"] and len(once) == 5 and rest == []
    assert "pay in both runs: `nodes-unet torchode`." in speed.variants_findings(a, b)
    assert "pay in both runs: `nodes-unet torchode` (" in speed.bench_summary(a, b)
    frame = speed.variants_repeat_frame(a, b)
    assert len(frame) == 6 and (frame["pays, repeat"] == "yes").sum() == 1
    if not torch.cuda.is_available():
        assert "no CUDA" in r["variant_notes"]["bf16 on CUDA"]


def test_a_variant_that_cannot_run_is_a_note_with_its_error():
    def make(name):
        torch.manual_seed(0)
        return build_model(name, width=4).eval()

    fresh = {"unet": lambda: make("unet"), "nodes-unet": lambda: make("nodes-unet")}
    found, notes = speed.variant_options(fresh, {"method": "heun3", "steps": 1}, "heun3-1", torch.rand(1, 3, 32, 32),
                                         compile_backend="no-such-backend", log=lambda m: None)
    assert set(found) == {"nodes-unet torchode", "unet channels_last", "nodes-unet heun3-1 channels_last"}
    assert "no-such-backend" in notes["unet compiled"] and "no-such-backend" in notes["nodes-unet heun3-1 compiled"]
    assert "euler, midpoint, rk4 only" in notes["nodes-unet heun3-1 unrolled"]
    found, notes = speed.variant_options({"unet": fresh["unet"]}, None, "trained", torch.rand(1, 3, 32, 32),
                                         compile_backend=None, log=lambda m: None)
    assert set(found) == {"unet channels_last"} and notes == {}
    with torch.inference_mode():             # channels_last changes the layout, not the numbers (to rounding)
        x = torch.rand(1, 3, 32, 32)
        net = found["unet channels_last"]["net"]
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        assert torch.allclose(net(x), fresh["unet"]()(x), atol=1e-5)


def test_pays_reads_the_interval_of_the_ratio_to_the_base():
    assert speed._pays([0.8, 0.95]) == "yes" and speed._pays([1.02, 1.3]) == "no"
    assert speed._pays([0.9, 1.1]) == "no difference measured"


def test_blocks_learned_smoke(ckpts):
    ode_units = {k: v for k, v in ckpts.items() if k in ("nodes-unet", "ode-unet-5")}
    r = blocks.blocks_learned(ode_units, scale="smoke", width=4, n_images=2, shipped_images=1, log=lambda m: None)
    labels = [m["label"] for m in r["models"]]
    assert labels[0] == "nodes-unet untrained (control)" and labels[-1].startswith("shipped")
    assert "nodes-unet" in labels and "ode-unet-5" in labels
    assert "provenance" in r and r["times"] == list(blocks.FLOW_TIMES)
    for m in r["models"]:
        assert "calibration" in m and "pick_label" in m["calibration"]
        for b in m["blocks"]:
            for key in ("nfe_forward", "f_ratio", "change", "late_change", "euler_diff", "euler_diff_of_change",
                        "trained", "channels"):
                assert key in b
            assert set(b["f_ratio"]) == {"0", "0.25", "0.5", "0.75", "1"}
            assert b["nfe_forward"] >= 8 and b["euler_diff"] >= 0
    assert len(blocks.blocks_frame(r)) == sum(len(m["blocks"]) for m in r["models"])


def test_solver_experiment_smoke(tmp_path):
    r = solvers.solver_experiment(scale="smoke", width=4, seeds=(0,), reference="train", work=tmp_path / "work",
                                n_images=2, rounds=2, log=lambda m: None)
    assert r["arms"] == ["dopri5", "euler-1", "rk4-2"] and r["epochs"] == 1 and not r["epochs_reduced"]
    rows = {row["arm"]: row for row in r["rows"]}
    assert rows["euler-1"]["nfe_forward"] and all(v == 1 for v in rows["euler-1"]["nfe_forward"].values())
    assert all(v == 8 for v in rows["rk4-2"]["nfe_forward"].values())   # 4 stages x 2 steps
    assert rows["dopri5"]["nfe_total"] >= 3 * 8
    for row in rows.values():
        for key in ("test_miou", "per_image_miou", "train_s", "train_step_s", "time_per_image_s", "best_epoch",
                    "trained_solver", "nfe_train_step"):
            assert row[key] is not None, key
    # the rk4-trained checkpoint is solved with rk4-2 again after loading (step_size is set on the blocks)
    assert all(s["method"] == "rk4" and s["step_size"] == 0.5 for s in rows["rk4-2"]["trained_solver"])
    assert len(r["cross"]) == 9 and {c["solved"] for c in r["cross"]} == {"dopri5", "euler-1", "rk4-2"}
    assert set(r["miou_diff_to_dopri5"]) == {"euler-1", "rk4-2"}
    # a second call reuses the trained units
    again = solvers.solver_experiment(scale="smoke", width=4, seeds=(0,), reference="train", work=tmp_path / "work",
                                    n_images=1, rounds=1, cross=False, log=lambda m: None)
    assert [x["train_s"] for x in again["rows"]] == [x["train_s"] for x in r["rows"]]
    assert len(solvers.solvers_frame(r)) == 3


def test_units_are_read_only_when_their_record_exists(tmp_path):
    root = tmp_path / "study"
    ckpt = root / "runs/reproduce/train/study/nodes-unet-seed0/best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    (root / "runs/reproduce/train/study/nodes-unet-seed1").mkdir()
    (root / "runs/reproduce/train/study/nodes-unet-seed1/best.pt").write_bytes(b"x")   # still training
    rec = root / "book/results/table2/study/nodes-unet-seed0.json"
    rec.parent.mkdir(parents=True)
    rec.write_text(json.dumps({"test": {"miou": 0.8}, "train_s": 10, "per_image": [{"miou": 0.8}]}))
    found = units.find_units(["nodes-unet"], (0, 1), root)
    assert list(found) == ["nodes-unet-seed0"] and found["nodes-unet-seed0"]["test_miou"] == 0.8
    copied = units.copy_units(found, tmp_path / "copy")
    assert copied["nodes-unet-seed0"]["source"] == str(ckpt)
    assert np.frombuffer(open(copied["nodes-unet-seed0"]["ckpt"], "rb").read(), np.uint8).tolist() == [ord("x")]


def test_command_line_lists_the_three_records(capsys):
    from bloodseg import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["record", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "cheap-bench" in out and "cheap-blocks" in out and "cheap-solvers" in out


# ----------------------------------------------------------------------------- one timing loop

def test_interleaved_times_rotates_the_order_and_warms_up_once():
    from bloodseg.measure import interleaved_times
    calls = []
    fns = {k: (lambda x, k=k: calls.append((k, x))) for k in "abc"}
    times = interleaved_times(fns, [1, 2], rounds=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[:3] == [("a", 1), ("b", 1), ("c", 1)]                       # the warm-up, before the rounds
    order = [k for k, x in calls[3:] if x == 1]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]            # rotating by one each round
    calls.clear()
    seen = []
    interleaved_times(fns, lambda r: [10 * r], rounds=2, warmup=1, warmup_each_round=True,
                      order=lambda r, labels: labels[::-1], after=lambda label, r, x: seen.append((label, r)))
    assert calls == [(k, 10 * r) for r in range(2) for k in "cba" for _ in range(2)]   # a warm-up call before each
    assert seen == [(k, r) for r in range(2) for k in "cba"]


def test_network_times_reads_nfe_in_the_first_round():
    torch.manual_seed(0)
    net = build_model("nodes-unet", width=4, method="euler").eval()
    r = units.network_times({"n": net, "u": build_model("unet", width=4).eval()}, [torch.rand(1, 3, 32, 32)] * 2,
                            rounds=2)
    assert len(r["times"]["n"]) == len(r["times"]["u"]) == 2
    assert r["nfe"]["u"] == {} and set(r["nfe"]["n"].values()) == {1.0}


# ----------------------------------------------------------------------------- the committed records, before and after

BEFORE = Path(__file__).parent / "data" / "speed_views_before_split.json"


def test_tables_prose_and_floor_of_the_committed_records_are_unchanged_by_the_split():
    """What chapter 9 shows from the committed speed records is, to the character, what
    bloodseg.paper.cheap gave before it was split into speed, blocks, solvers, units and
    figures_speed (saved from that code: tests/data/speed_views_before_split.json)."""
    from bloodseg.paper.records import load_record, results_path
    if not results_path("speed/bench.json").is_file():
        pytest.skip("the committed records are not under the results folder")
    before = json.loads(BEFORE.read_text())
    bench, repeat = load_record("speed/bench.json"), load_record("speed/bench-repeat.json")
    blocks_rec, solvers_rec = load_record("speed/blocks_learned.json"), load_record("speed/solvers.json")
    fr = lambda df: None if df is None else df.to_json(orient="split", default_handler=str)   # noqa: E731
    now = {"bench_frame": fr(speed.bench_frame(bench)), "variants_frame": fr(speed.variants_frame(bench)),
           "variants_repeat_frame": fr(speed.variants_repeat_frame(bench, repeat)),
           "study_units_frame": fr(speed.study_units_frame(bench)), "bench_findings": speed.bench_findings(bench),
           "variants_findings": speed.variants_findings(bench, repeat), "variants_findings_1": speed.variants_findings(bench),
           "bench_summary": speed.bench_summary(bench, repeat), "bench_summary_1": speed.bench_summary(bench),
           "blocks_frame": fr(blocks.blocks_frame(blocks_rec)),
           "blocks_summary_frame": fr(blocks.blocks_summary_frame(blocks_rec)),
           "solvers_frame": fr(solvers.solvers_frame(solvers_rec)), "cross_frame": fr(solvers.cross_frame(solvers_rec)),
           "calibration_rule": units.calibration_rule(0.3),
           "ratio_summary": units.ratio_summary({"a": [1.0, 2.0, 3.0, 2.5], "b": [2.0, 2.0, 7.0, 3.0],
                                                 "c": [0.5, 1.5, 1.0, 2.0]}, "a", 20, n_boot=500),
           "floor_table": speed.floor_table(width=4, size=32), "floor_table_default": speed.floor_table(width=8, size=128)}
    assert json.loads(json.dumps(now, sort_keys=True, default=str)) == before


def test_the_figures_draw_from_the_committed_records():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bloodseg.paper.records import load_record, results_path
    if not results_path("speed/bench.json").is_file():
        pytest.skip("the committed records are not under the results folder")
    bench, solvers_rec = load_record("speed/bench.json"), load_record("speed/solvers.json")
    figs = [figures_speed.plot_frontier(bench), figures_speed.plot_macs(bench["rows"]),
            figures_speed.plot_calibration(bench["calibration"]["nodes-unet"]),
            figures_speed.plot_floor(speed.floor_table(width=8, size=64), bench),
            figures_speed.plot_flow(load_record("speed/blocks_learned.json")), figures_speed.plot_solvers(solvers_rec),
            figures_speed.plot_cross(solvers_rec), figures_speed.plot_regularisation(load_record("speed/regularisation.json"))]
    assert all(f.axes for f in figs)
    plt.close("all")
