"""Solver calibration (bloodseg.calibrate) and the Segmenter's ``solver`` setting, on a tiny NODEs-UNet."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bloodseg.calibrate import (SOLVER_GRID, apply_solver, calibrate, check_solver, nominal_nfe, solver_label,
                                trained_solver)
from bloodseg.checkpoint import load_checkpoint, update_checkpoint
from bloodseg.cli import main
from bloodseg.errors import BloodsegError, CheckpointError
from bloodseg.io import read_mask
from bloodseg.models import build_model
from bloodseg.ode import FIXED_GRID_METHODS, ode_blocks
from bloodseg.segmenter import Segmenter
from bloodseg.synthetic import write_synthetic

EULER1 = {"method": "euler", "steps": 1}


def tiny_nodes():
    torch.manual_seed(0)
    return build_model("nodes-unet", width=4).eval()


@pytest.fixture()
def seg():
    return Segmenter(tiny_nodes(), tile=128, overlap=16)


@pytest.fixture()
def samples(small_samples):
    return small_samples[:2]


def _current_label(model) -> str:
    """The solver label the blocks are set to now (all blocks alike), "trained" when at the trained settings."""
    b = ode_blocks(model)[0]
    if (b.method, b.step_size, b.rtol) == ("dopri5", None, 1e-4):
        return "trained"
    if b.method in FIXED_GRID_METHODS:
        return f"{b.method}-{1 if b.step_size is None else round(b.t1 / b.step_size)}"
    return f"{b.method}-rtol{b.rtol:g}"


def test_the_grid_is_ordered_by_cost_and_each_spec_costs_what_it_says(seg, samples):
    labels = [solver_label(s) for s in SOLVER_GRID]
    assert len(set(labels)) == len(labels) == 11
    assert {(s["method"], s.get("steps")) for s in SOLVER_GRID if "steps" in s} == \
        {(m, n) for m in ("euler", "midpoint", "rk4") for n in (1, 2, 4)}
    fixed = [s for s in SOLVER_GRID if "steps" in s]
    adaptive = SOLVER_GRID[len(fixed):]
    assert list(SOLVER_GRID[:len(fixed)]) == fixed                       # fixed grid first, then dopri5
    costs = [nominal_nfe(s) for s in fixed]
    assert costs == sorted(costs) and costs[0] == 1 and costs[-1] == 16
    assert [a["rtol"] for a in adaptive] == [1e-2, 1e-3]                 # loosest (cheapest) first
    for spec in fixed:                                                   # measured NFE = nominal
        seg.replace(solver=spec).predict(samples[0].image)
        assert {int(b.nfe_forward) for b in ode_blocks(seg.model)} == {nominal_nfe(spec)}


def test_check_solver_normalises_and_refuses(seg):
    assert check_solver({"method": "dopri5", "rtol": 1e-2}) == {"method": "dopri5", "rtol": 1e-2, "atol": 1e-2}
    assert check_solver({"method": "rk4"}) == {"method": "rk4", "steps": 1}
    before = trained_solver(seg.model)
    for bad in ("euler", {"method": "euler", "steps": 0}, {"method": "euler", "steps": 1.5},
                {"method": "euler", "rtol": 1e-3}, {"method": "dopri5", "rtol": -1}, {"method": "dopri5", "steps": 2},
                {"method": "newton"}, {"method": "dopri5", "rtol": float("nan")}):
        with pytest.raises(BloodsegError):
            apply_solver(seg.model, bad)
        with pytest.raises(BloodsegError):
            seg.replace(solver=bad)
    assert trained_solver(seg.model) == before                           # a bad spec changed nothing


def test_apply_solver_changes_every_block_and_exact_gives_the_trained_solver_back_bit_for_bit(seg, samples):
    trained = trained_solver(seg.model)
    assert [t["method"] for t in trained] == ["dopri5"] * 3 and sorted(t["rtol"] for t in trained) == [1e-6, 1e-4, 1e-4]
    images = [s.image for s in samples]
    probs = [seg.predict_proba(im) for im in images]
    masks = [seg.predict(im) for im in images]
    for spec in SOLVER_GRID:
        assert apply_solver(seg.model, spec) == 3
        for b in ode_blocks(seg.model):
            assert b.method == spec["method"]
            if "steps" in spec:
                assert b.step_size == (None if spec["steps"] == 1 else b.t1 / spec["steps"])
            else:
                assert (b.rtol, b.atol, b.step_size) == (spec["rtol"], spec["rtol"], None)
    fast = seg.replace(solver=EULER1)
    assert not torch.equal(fast.predict_proba(images[0]), probs[0])     # the solver does change the output
    exact = fast.replace(solver=None)                                   # the same network object
    assert exact.model is fast.model
    assert all(torch.equal(exact.predict_proba(im), p) for im, p in zip(images, probs))
    assert all(np.array_equal(exact.predict(im), m) for im, m in zip(images, masks))
    assert trained_solver(exact.model) == trained
    fast.predict(images[0])                                             # each copy sets its own solver again
    assert {int(b.nfe_forward) for b in ode_blocks(fast.model)} == {1}
    apply_solver(seg.model, None)                                       # None without records: no change
    assert trained_solver(seg.model)[0]["method"] == "euler"
    apply_solver(seg.model, None, seg.trained)
    assert trained_solver(seg.model) == trained


def _scored(seg, samples, table, timings, **kw):
    """calibrate with the score of each solver taken from ``table`` and the given timings."""
    return calibrate(seg, samples, score=lambda preds, s: table[_current_label(seg.model)],
                     timings=timings, warmup=0, **kw)


def test_calibrate_picks_the_cheapest_spec_within_the_threshold(seg, samples):
    grid = [EULER1, {"method": "euler", "steps": 2}, {"method": "midpoint", "steps": 1},
            {"method": "rk4", "steps": 1}, {"method": "dopri5", "rtol": 1e-2}]
    table = {"trained": 0.900, "euler-1": 0.8950, "euler-2": 0.8990, "midpoint-1": 0.8970,
             "rk4-1": 0.9000, "dopri5-rtol0.01": 0.9010}
    timings = {"trained": 1.0, "euler-1": 0.10, "euler-2": 0.25, "midpoint-1": 0.20, "rk4-1": 0.40,
               "dopri5-rtol0.01": 0.60}
    out = _scored(seg, samples, table, timings, grid=grid, max_drop_pp=0.3)
    # euler-1 drops 0.5 pp (out); midpoint-1 drops exactly 0.3 pp and is the fastest of the rest
    assert out["chosen"] == {"method": "midpoint", "steps": 1} and out["chosen_label"] == "midpoint-1"
    assert [r["label"] for r in out["rows"]] == ["trained"] + [solver_label(s) for s in grid]
    assert [round(r["drop_pp"], 6) for r in out["rows"]] == [0.0, 0.5, 0.1, 0.3, 0.0, -0.1]
    assert out["reference"]["score"] == 0.900 and out["n_images"] == 2
    assert out["reference"]["solver"] == trained_solver(Segmenter(tiny_nodes()).model)
    # a stricter threshold: euler-2 (0.1 pp) is the fastest left
    assert _scored(seg, samples, table, timings, grid=grid, max_drop_pp=0.2)["chosen_label"] == "euler-2"
    # nothing cheaper is good enough, or the trained solver is the fastest: chosen is None (keep it)
    assert _scored(seg, samples, dict(table, **{"euler-2": 0.8, "midpoint-1": 0.8, "rk4-1": 0.8,
                                                 "dopri5-rtol0.01": 0.8}), timings, grid=grid)["chosen"] is None
    assert _scored(seg, samples, table, dict(timings, trained=0.05), grid=grid)["chosen"] is None
    assert trained_solver(seg.model) == list(seg.trained)               # put back afterwards
    with pytest.raises(BloodsegError):
        calibrate(seg, samples, max_drop_pp=-1)
    with pytest.raises(BloodsegError):
        calibrate(seg, [])


def test_calibrate_measures_time_and_nfe_and_the_segmenter_keeps_the_table(seg, samples):
    grid = [EULER1, {"method": "rk4", "steps": 2}]
    new = seg.calibrate(samples, grid=grid, max_drop_pp=100.0)          # every spec is good enough
    table = new.metrics["calibration"]
    rows = {r["label"]: r for r in table["rows"]}
    assert all(r["ok"] and r["seconds_per_image"] > 0 and r["pass_seconds_per_image"] > 0 and 0 <= r["score"] <= 1
               for r in rows.values())
    assert set(rows["euler-1"]["nfe_per_block"].values()) == {1.0}
    assert set(rows["rk4-2"]["nfe_per_block"].values()) == {8.0}
    assert min(rows["trained"]["nfe_per_block"].values()) >= 8         # dopri5: >= 8 evaluations
    fastest = min(rows.values(), key=lambda r: r["seconds_per_image"])
    assert new.solver == fastest["solver"] and seg.solver is None
    assert table["chosen"] == new.solver


def test_the_solver_survives_save_and_load_and_exact_ignores_it(tmp_path, seg, samples):
    image = samples[0].image
    trained_mask = seg.predict(image)
    fast = seg.replace(solver={"method": "midpoint", "steps": 2})
    path = fast.save(tmp_path / "fast.pt")
    assert load_checkpoint(path)["segmenter"]["solver"] == {"method": "midpoint", "steps": 2}
    loaded = Segmenter.load(path, device="cpu")
    assert loaded.solver == {"method": "midpoint", "steps": 2} and loaded.settings() == fast.settings()
    assert np.array_equal(loaded.predict(image), fast.predict(image))
    assert {int(b.nfe_forward) for b in ode_blocks(loaded.model)} == {4}
    exact = Segmenter.load(path, device="cpu", exact=True)
    assert exact.solver is None and np.array_equal(exact.predict(image), trained_mask)
    # a checkpoint written before the solver setting existed: no solver, the trained one
    old = update_checkpoint(path, out=tmp_path / "old.pt",
                            segmenter={k: v for k, v in fast.settings().items() if k != "solver"})
    assert Segmenter.load(old, device="cpu").solver is None


@pytest.mark.parametrize("bad", [{"method": "euler", "steps": 0}, {"method": "nope"}, "euler", [1, 2],
                                 {"method": "dopri5", "rtol": 0.0}])
def test_an_invalid_solver_in_a_checkpoint_is_a_checkpoint_error(tmp_path, seg, bad):
    path = seg.save(tmp_path / "ok.pt")
    broken = update_checkpoint(path, out=tmp_path / "bad.pt", segmenter={**seg.settings(), "solver": bad})
    with pytest.raises(CheckpointError, match="solver"):
        Segmenter.load(broken, device="cpu")
    assert Segmenter.load(broken, device="cpu", exact=True).solver is None   # --exact still opens it


def test_cli_calibrate_then_predict_and_count_exact(tmp_path, seg, capsys):
    data = tmp_path / "val"
    write_synthetic(data, 2, seed=5, size=(64, 96))
    ckpt = seg.save(tmp_path / "tiny.pt")
    out = tmp_path / "tiny-cal.pt"
    assert main(["calibrate", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--max-drop", "100"]) == 0
    printed = capsys.readouterr().out
    assert "euler-1" in printed and "chosen:" in printed
    cal = Segmenter.load(out, device="cpu")
    assert len(cal.metrics["calibration"]["rows"]) == 1 + len(SOLVER_GRID)
    assert cal.solver == cal.metrics["calibration"]["chosen"]
    assert load_checkpoint(ckpt)["segmenter"]["solver"] is None           # the input is untouched
    # predict --exact on the calibrated copy = predict on the original, bit for bit
    for name, path, extra in (("orig", ckpt, []), ("exact", out, ["--exact"]), ("cal", out, [])):
        assert main(["predict", "--ckpt", str(path), str(data / "images"), "--out", str(tmp_path / name),
                     "--no-overlay", *extra]) == 0
    for f in sorted((data / "images").iterdir()):
        assert np.array_equal(read_mask(tmp_path / "orig" / f.name), read_mask(tmp_path / "exact" / f.name))
        assert (tmp_path / "cal" / f.name).is_file()
    assert main(["count", "--ckpt", str(out), str(data / "images"), "--exact"]) == 0
    assert main(["calibrate", "--ckpt", str(ckpt)]) == 2                 # neither --data nor --bccd-src
