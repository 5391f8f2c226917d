"""bloodseg.paper.reproduce: resumable (model, seed) units with provenance, time box, summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_after_first_record

from bloodseg.errors import BloodsegError
from bloodseg.paper import reproduce as rp
from bloodseg.paper import stats

#: The smoke scale made tinier still: width 4, 4 training patches, loose ODE tolerance, 1 epoch.
TINY = {"model.width": 4, "data.max_train": 4, "data.max_val": 2, "model.options": {"rtol": 0.1}}
SCRIPT = ("from bloodseg.paper.reproduce import reproduce\n"
          f"reproduce('table2', 'smoke', 2, out='res', work='work', progress=False, changes={TINY!r})\n")


def _scores(folder: Path) -> dict:
    return {p.name: (json.loads(p.read_text())["test"], [d["miou"] for d in json.loads(p.read_text())["per_image"]])
            for p in sorted(folder.glob("*.json"))}


def test_a_killed_run_continues_where_it_stopped(tmp_path):
    env = {**os.environ, "BLOODSEG_PROFILE": "smoke", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    folder = run_dir / "res" / "table2" / "smoke"
    first = folder / "unet-seed0.json"
    kill_after_first_record(SCRIPT, run_dir, env, first)
    done_before = sorted(p.name for p in folder.glob("*.json"))
    assert len(done_before) < 8, "the run finished before it could be killed"
    kept = first.read_bytes()
    stamp = first.stat().st_mtime_ns

    again = subprocess.run([sys.executable, "-c", SCRIPT], cwd=run_dir, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{8 - len(done_before)} unit(s) run, {len(done_before)} already done" in again.stdout
    assert first.read_bytes() == kept and first.stat().st_mtime_ns == stamp

    # the same experiment uninterrupted, in this process
    result = rp.run_experiment("table2", "smoke", 2, out=tmp_path / "whole", work=tmp_path / "work2",
                               progress=False, changes=TINY)
    assert len(result["ran"]) == 8 and not result["skipped"]
    resumed, whole = _scores(folder), _scores(tmp_path / "whole" / "table2" / "smoke")
    assert sorted(resumed) == sorted(whole) == sorted(
        f"{m}-seed{k}.json" for m in ("unet", "resunet", "nodes-unet", "nodes-unet-h8") for k in (0, 1))
    assert resumed == whole

    records = rp.load_records(folder)
    assert all(r["git_commit"] and r["recipe"]["model"]["width"] == 4 and r["date"].endswith("+00:00")
               and len(r["history"]) == 1 and r["threads"] >= 1 and r["cpu"] for r in records)
    # a second call finds everything done and runs nothing
    again = rp.run_experiment("table2", "smoke", 2, out=run_dir / "res", work=run_dir / "work",
                              progress=False, changes=TINY)
    assert not again["ran"] and len(again["skipped"]) == 8


def test_max_minutes_below_one_unit_starts_nothing(tmp_path):
    logged = []
    r = rp.run_experiment("table2", "smoke", 2, max_minutes=1e-6, out=tmp_path / "res", work=tmp_path / "w",
                          progress=False, log=logged.append, changes=TINY)
    assert r["ran"] == [] and len(r["not_started"]) == 8 and r["records"] == []
    assert not list((tmp_path / "res").rglob("*.json"))
    assert "8 unit(s) not started" in logged[0] and "run the same command again" in logged[0]


def test_a_record_without_provenance_is_refused(tmp_path):
    good = {k: "x" for k in rp.PROVENANCE}
    (tmp_path / "unet-seed0.json").write_text(json.dumps(good))
    assert len(rp.load_records(tmp_path)) == 1
    (tmp_path / "unet-seed1.json").write_text(json.dumps({"test": {"miou": 0.9}, "git_commit": "abc"}))
    with pytest.raises(BloodsegError, match=r"unet-seed1\.json lacks provenance \(command, recipe"):
        rp.load_records(tmp_path)
    (tmp_path / "unet-seed1.json").write_text("{not json")
    with pytest.raises(BloodsegError, match=r"unet-seed1\.json is not a readable JSON record"):
        rp.load_records(tmp_path)


def test_summary_paired_interval_is_stats_paired_bootstrap(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, size=(3, 10))
    other = base + rng.normal(0.02, 0.01, size=base.shape)
    records = [dict(label=label, seed=k, test=dict(miou=float(m[k].mean())),
                    per_image=[dict(miou=float(v)) for v in m[k]])
               for label, m in (("unet", base), ("nodes-unet", other)) for k in range(3)]
    rows = {r["model"]: r for r in rp.summarize(records, n_boot=3000, seed=5)}
    expected = stats.paired_bootstrap(100 * base, 100 * other, n_boot=3000, seed=5)
    assert rows["nodes-unet"]["diff"] == pytest.approx(expected["diff"])
    assert rows["nodes-unet"]["diff_ci"] == pytest.approx(expected["ci"])
    assert rows["nodes-unet"]["verdict"] == stats.verdict(expected["ci"]) == "holds"
    assert rows["unet"]["miou"] == pytest.approx(100 * base.mean())
    assert "verdict" not in rows["unet"]
    text = rp.format_summary(list(rows.values()))
    assert "nodes-unet" in text and "holds" in text


def test_scales_and_experiments():
    assert rp.scale_recipe("quick").train.epochs == 3
    assert rp.scale_recipe("full").model.width == 32 and rp.scale_recipe("full").train.epochs == 50
    study = rp.scale_recipe("study")
    assert study.name == "study" and study.train.schedule == "cosine" and study.data.n_test == 168
    assert study.model.width == 8
    labels = [s["label"] for s in rp.experiment_specs("table1", study)]
    assert labels == ["unet"] + [f"ode-unet-{p}" for p in range(1, 10)]
    t2 = rp.experiment_specs("table2", study)
    assert t2[-1] == dict(label="nodes-unet-h16", model="nodes-unet", options=dict(ode_hidden=16))
    with pytest.raises(BloodsegError, match="unknown scale"):
        rp.scale_recipe("huge")
    with pytest.raises(BloodsegError, match="unknown experiment"):
        rp.experiment_specs("table3", study)


def test_models_restricts_the_units_and_names_the_known_ones(tmp_path):
    logged = []
    r = rp.run_experiment("table2", "smoke", 2, max_minutes=1e-6, out=tmp_path / "res", work=tmp_path / "w",
                          progress=False, log=logged.append, changes=TINY, models="unet, resunet")
    assert sorted(p.name for p in r["not_started"]) == ["resunet-seed0.json", "resunet-seed1.json",
                                                         "unet-seed0.json", "unet-seed1.json"]
    with pytest.raises(BloodsegError, match="no model nodes-net.*its models are: unet, resunet, nodes-unet"):
        rp.run_experiment("table2", "smoke", 1, out=tmp_path / "res", models=["unet", "nodes-net"])
    with pytest.raises(BloodsegError, match="one experiment"):
        rp.reproduce("all", "smoke", 1, out=tmp_path / "res", models="unet")


def test_cli_reproduce_options(monkeypatch):
    from bloodseg import cli
    seen = {}
    monkeypatch.setattr(rp, "reproduce", lambda experiment, **kw: seen.update(kw, experiment=experiment))
    assert cli.main(["reproduce", "table2", "--scale", "study", "--seeds", "5", "--max-minutes", "90",
                     "--out", "elsewhere"]) == 0
    assert seen == dict(experiment="table2", scale="study", seeds=5, max_minutes=90.0, out="elsewhere",
                        progress=None, models=None)
    assert cli.main(["reproduce", "table2", "--models", "unet,resunet"]) == 0
    assert seen["models"] == "unet,resunet"
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "table9"])


def test_convergence_reads_the_validation_loss():
    flat = [dict(val_loss=v) for v in (1.0, 0.5, 0.4, 0.395, 0.394, 0.394)]
    falling = [dict(val_loss=v) for v in (1.0, 0.8, 0.6, 0.5, 0.4, 0.3)]
    assert rp.convergence(flat)["converged"] is True and rp.convergence(flat)["gain"] < 0.02
    assert rp.convergence(falling)["converged"] is False
    assert rp.convergence(falling)["gain"] == pytest.approx((0.5 - 0.3) / 0.5)
    assert rp.convergence(flat[:2])["converged"] is None


@pytest.fixture(scope="module")
def table2_trained(tmp_path_factory):
    """Table 2 trained once (smoke, width 4, seed 0): the keyword arguments that reach its records and units."""
    root = tmp_path_factory.mktemp("table2")
    kw = dict(out=root / "res", work=root / "work", progress=False, log=lambda *a: None, changes={"model.width": 4})
    rp.run_experiment("table2", "smoke", 1, **kw)
    return root, kw


def test_experiments_share_trained_units(table2_trained):
    """Table 1's U-Net is table 2's: the second experiment trains nothing new for it."""
    tmp_path, kw = table2_trained
    unet = tmp_path / "work" / "train" / "smoke" / "unet-seed0" / "best.pt"
    stamp = unet.stat().st_mtime_ns
    rp.run_experiment("tolerance", "smoke", 1, **kw)
    assert unet.stat().st_mtime_ns == stamp
    t2 = json.loads((tmp_path / "res" / "table2" / "smoke" / "nodes-unet-seed0.json").read_text())
    tol = json.loads((tmp_path / "res" / "tolerance" / "smoke" / "nodes-unet-seed0.json").read_text())
    assert tol["test"] == t2["test"] and tol["history"] == t2["history"] and "tolerance_curve" in tol


def test_timing_unit_times_every_trained_model_side_by_side(table2_trained):
    tmp_path, kw = table2_trained
    trained = tmp_path / "work" / "train" / "smoke" / "nodes-unet-seed0" / "best.pt"
    stamp = trained.stat().st_mtime_ns
    rec = rp.run_experiment("timing", "smoke", 1, **kw)["records"][0]
    assert trained.stat().st_mtime_ns == stamp              # table 2's units reused, not retrained
    t = rec["timing"]
    labels = ["unet"] + [f"ode-unet-{p}" for p in range(1, 10)] + ["resunet", "nodes-unet", "nodes-unet-h8"]
    assert sorted(t["time_per_image_s"]) == sorted(labels)
    assert all(len(v) == rp.TIMING_ROUNDS and min(v) > 0 for v in t["time_per_image_s"].values())
    assert t["nfe_forward"]["unet"] == 0 and t["nfe_forward"]["nodes-unet"] > 0
    assert all(k in rec for k in rp.PROVENANCE)


def test_a_recipe_field_added_later_does_not_void_records(tmp_path):
    kw = dict(out=tmp_path / "res", work=tmp_path / "work", progress=False, log=lambda *a: None,
              changes={"model.width": 4})
    first = rp.run_experiment("table2", "smoke", 1, **kw)
    assert len(first["ran"]) == 4
    for path in first["ran"]:                    # records written before a field existed:
        rec = json.loads(path.read_text())
        del rec["recipe"]["train"]["seed"]           # a missing field reads as its default (0) ...
        path.write_text(json.dumps(rec))
    again = rp.run_experiment("table2", "smoke", 1, **kw)
    assert again["ran"] == [] and len(again["skipped"]) == 4
    rec = json.loads(first["ran"][0].read_text())
    rec["recipe"]["train"]["epochs"] = 99                 # ... but a different value is another recipe
    first["ran"][0].write_text(json.dumps(rec))
    assert len(rp.run_experiment("table2", "smoke", 1, **kw)["ran"]) == 1


def test_full_scale_time_boxes_every_unit_to_fit_the_limit():
    """`reproduce all --scale full --max-minutes 9` plans the GPU call: 13 trained models x seeds."""
    full = rp.scale_recipe("full")
    assert full.model.width == 32 and full.train.bf16 and full.train.batch_size == 16
    per = rp.unit_minutes(list(rp.EXPERIMENTS), 3, 9.0)
    assert per == pytest.approx(0.7 * 9 / (13 * 3))
    assert rp.unit_minutes(["table2"], 3, 9.0) == pytest.approx(0.7 * 9 / 12)
    seen = []
    rp.reproduce("adjoint-memory", "full", 1, max_minutes=1e-6, out="/nonexistent", log=seen.append,
                 progress=False)
    assert any("every unit trains for at most" in str(m) for m in seen)


def test_cli_record_dispatches_to_the_paper_module(monkeypatch):
    """`bloodseg record WHAT` is the one command line of every chapter record (no argparse in paper/)."""
    import importlib
    from bloodseg import cli
    seen = {}
    for what, module in cli.RECORDS.items():
        mod = importlib.import_module(f"bloodseg.paper.{module}")
        monkeypatch.setattr(mod, "run_record", lambda args, command, m=module: seen.update({args.what: (m, command)}))
    for what in cli.RECORDS:
        assert cli.main(["record", what, "--seeds", "0,1"]) == 0
    assert {w: m for w, (m, _) in seen.items()} == cli.RECORDS
    assert all(c.startswith("OMP_NUM_THREADS=1 bloodseg ") for _, c in seen.values())


def test_command_line_names_the_cli_without_machine_paths(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/home/me/env/lib/bloodseg/cli.py", "reproduce", "table2", "--models", "a b"])
    assert rp.command_line() == "bloodseg reproduce table2 --models 'a b'"
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/bloodseg", "reproduce", "all"])
    assert rp.command_line() == "bloodseg reproduce all"
    monkeypatch.setattr(sys, "argv", ["/tmp/x/run_it.py", "--fast"])
    assert rp.command_line() == "run_it.py --fast"
