"""Chapter 10's robustness study: perturbations, attacks, a resumable study, records with provenance."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kill_after_first_record

from bloodseg.errors import BloodsegError
from bloodseg.models import build_model
from bloodseg.paper import perturb as P
from bloodseg.paper import robust as R
from bloodseg.paper import robust_report as RR
from bloodseg.paper.records import write_record
from bloodseg.segmenter import Segmenter
from bloodseg.synthetic import make_smear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smear():
    image, mask = make_smear(3, size=(96, 128))
    return image, mask


@pytest.mark.parametrize("family", list(P.FAMILIES))
def test_strength_zero_is_the_identity_and_others_change_the_photograph(family, smear):
    image, mask = smear
    f = P.FAMILIES[family]
    assert f.levels[0] == 0 and len(set(f.levels)) == len(f.levels)
    out, m = P.perturb(family, 0, image, mask, seed=1)
    assert np.array_equal(out, image) and np.array_equal(m, mask)
    for s in f.levels[1:]:
        out, m = P.perturb(family, s, image, mask, seed=1)
        assert out.dtype == np.uint8 and out.ndim == 3 and m.shape == out.shape[:2]
        assert out.shape != image.shape or np.abs(out.astype(int) - image).mean() > 0.05, (family, s)
    assert np.array_equal(P.perturb(family, f.levels[1], image, mask, seed=1)[0],
                          P.perturb(family, f.levels[1], image, mask, seed=1)[0])      # deterministic


def test_noise_sigma_is_measured_back():
    grey = np.full((200, 200, 3), 128, np.uint8)
    for sigma in (4, 16, 32):
        d = P.add_noise(grey, sigma, seed=0).astype(np.float64) - 128
        assert abs(d.std() - sigma) < 0.03 * sigma and abs(d.mean()) < 0.3


def test_magnification_resizes_image_and_mask_alike(smear):
    image, mask = smear
    out, m = P.perturb("magnification", -1.0, image, mask)
    assert out.shape[:2] == m.shape == (48, 64) and set(np.unique(m)) <= set(np.unique(mask))


def test_unknown_family_is_refused(smear):
    with pytest.raises(BloodsegError, match="unknown perturbation family"):
        P.perturb("fog", 1, *smear)


@pytest.fixture(scope="module")
def tiny_seg():
    torch.manual_seed(0)
    return Segmenter(build_model("unet", width=4), input_scale=0.5, crop_cells="all")   # as robust.segmenter


def test_the_attack_path_gives_the_segmenters_own_mask(tiny_seg, smear):
    image, mask = smear
    x, hw = P.network_input(tiny_seg, image)
    assert x.shape[-2] % 16 == 0 and x.shape[-1] % 16 == 0 and hw == (48, 64)
    assert np.array_equal(P.mask_from_input(tiny_seg.model, x, hw, mask.shape), tiny_seg.segment(image).mask)


def test_fgsm_and_pgd_stay_within_eps_and_pgd_raises_the_loss(tiny_seg, smear):
    image, mask = smear
    x, hw = P.network_input(tiny_seg, image)
    target = P.white_target(mask, hw, tuple(x.shape[-2:]))
    eps = 2 / 255
    with torch.no_grad():
        before = float(P.white_loss(tiny_seg.model(x), target))
    d_f = P.fgsm(tiny_seg.model, x, target, eps)
    d_p, losses = P.pgd(tiny_seg.model, x, target, eps, steps=10, seed=0)
    for d in (d_f, d_p):
        assert float(d.abs().max()) <= eps + 1e-7
        assert float((x + d).min()) >= 0 and float((x + d).max()) <= 1
    with torch.no_grad():
        after_f = float(P.white_loss(tiny_seg.model(x + d_f), target))
        after_p = float(P.white_loss(tiny_seg.model(x + d_p), target))
    assert after_f > before and after_p > before and after_p >= max(losses) - 1e-6
    assert len(losses) == 11


def test_white_loss_ignores_padding_and_balances_the_classes():
    logits = torch.zeros(1, 3, 4, 4)
    t = torch.zeros(4, 4, dtype=torch.int8)
    t[0, 0] = 1
    t[3] = -1
    # uniform probabilities: -log(1/3) on white pixels, -log(2/3) on the rest, averaged with equal weight
    assert float(P.white_loss(logits, t)) == pytest.approx((np.log(3) + np.log(1.5)) / 2, rel=1e-5)


SCRIPT = ("import torch; torch.set_num_threads(1)\n"
          "from bloodseg.paper.robust import run_robust\n"
          "run_robust('smoke', 1, out='res', work='work', models='unet,nodes-unet-euler1', log=lambda m: None)\n")


def test_the_study_continues_after_a_kill_and_refuses_records_without_provenance(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "BLOODSEG_BCCD"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    folder = tmp_path / "res" / "robust" / "smoke"
    first = folder / "unet-seed0.json"
    kill_after_first_record(SCRIPT, tmp_path, env, first)
    assert not (folder / "nodes-unet-euler1-seed0.json").exists(), "the run finished before it was killed"
    kept, stamp = first.read_bytes(), first.stat().st_mtime_ns

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BLOODSEG_BCCD", raising=False)
    result = R.run_robust("smoke", 1, out="res", work="work", models="unet,nodes-unet-euler1", log=lambda m: None)
    assert [p.name for p in result["skipped"]] == ["unet-seed0.json"]
    assert [p.name for p in result["ran"]] == ["nodes-unet-euler1-seed0.json"]
    assert first.read_bytes() == kept and first.stat().st_mtime_ns == stamp
    rec = json.loads((folder / "nodes-unet-euler1-seed0.json").read_text())
    assert rec["solver"] == R.EULER1 and rec["git_commit"] and rec["command"] and rec["cpu_s"] >= 0
    assert "unet/pgd" in rec["adversarial"]["counts"]           # transferred from the U-Net of the seed
    fams = rec["perturbations"]["families"]
    assert set(fams) == set(P.FAMILIES) and all(f["counts"][0] == [rec["clean"]["white"][i] for i in range(
        0, len(rec["clean"]["white"]), R.study_plan("smoke")["perturb_every"])] for f in fams.values())
    again = R.run_robust("smoke", 1, out="res", work="work", models="unet,nodes-unet-euler1", log=lambda m: None)
    assert not again["ran"] and len(again["skipped"]) == 2

    # a record without provenance is neither written nor read
    bare = {k: v for k, v in rec.items() if k not in ("git_commit", "command", "date")}
    with pytest.raises(BloodsegError, match="without provenance"):
        write_record(bare, folder / "bare.json")
    (folder / "zz-bare.json").write_text(json.dumps(bare))
    with pytest.raises(BloodsegError, match="lacks provenance"):
        R.load_robust_records(folder)


def test_summary_intervals_and_ledger_rows_from_constructed_records(tmp_path):
    """Two seeds of four models where NODEs-UNet loses nothing to noise and the others lose a lot."""
    rng = np.random.default_rng(0)
    plan = R.study_plan("smoke")
    # NODEs-UNet confuses no pixels, the others 2 in 12 of two classes: its MIoU and PA are higher
    cm_of = {m: [[10, 2, 0], [2, 10, 0], [0, 0, 10]] for m in R.LABELS}
    cm_of["nodes-unet"] = [[10, 0, 0], [0, 10, 0], [0, 0, 10]]
    for seed in (0, 1):
        for label in R.LABELS:
            clean = [[900 + int(rng.integers(0, 50)), 50, 50] for _ in range(4)]
            pert_clean = clean[::2]
            lose = 0 if label == "nodes-unet" else 400
            fams = {f: dict(levels=lv, counts=[pert_clean, [[c[0] - lose, c[1], c[2] + lose] for c in pert_clean]])
                    for f, lv in plan["levels"].items()}
            adv = dict(photos=["a"], eps=["2/255"], pgd_steps=2, pgd_losses={},
                       counts={"clean": clean[:1], "fgsm": {"2/255": [[500, 100, 400]]}, "pgd": {"2/255": [[300, 100, 600]]}})
            rec = dict(format=1, experiment="robust", scale="smoke", label=label, seed=seed, recipe={}, plan=plan,
                       git_commit="x", command="c", device="cpu", torch="t", date="2026-01-01", wall_s=10.0,
                       clean=dict(photos=list("abcd"), white=clean, cm=[cm_of[label]] * 4),
                       perturbations=dict(photos=["a", "c"], families=fams), adversarial=adv,
                       allidb2=dict(available=False), history=[])
            write_record(rec, R.record_path(tmp_path, "smoke", label, seed))
    s = RR.summarize(R.load_robust_records(tmp_path / "robust" / "smoke"), n_boot=200)
    d = RR.diff(s, "noise", "nodes-unet", "unet")
    assert d["diff"] == pytest.approx(s["groups"]["noise"][0][0]) and d["diff"] > 30 and d["verdict"] == "holds"
    assert RR.diff(s, "adversarial", "nodes-unet", "unet")["verdict"] == "inconclusive"     # all alike
    rows = RR.ledger_rows("smoke", tmp_path)
    assert {r["table"] for r in rows} == {"robustness"} and len(rows) == 18
    est, ci, src = rows[0]["estimate"]()
    assert est > 30 and ci[0] > 0 and "2 seed(s)" in src
    assert "other microscope" not in s["groups"]
    real = {r["claim"]: r for r in RR.table2_ledger_rows("smoke", tmp_path)}
    assert len(real) == 6 and {r["table"] for r in real.values()} == {"paper-real"}
    gain, ci, _ = real["NODEs-UNet MIoU gain over U-Net (Table 2 on real BCCD smears)"]["estimate"]()
    miou_others = 100 * np.mean([10 / 14, 10 / 14, 1.0])           # IoU per class: 10 / (10 + 2 + 2)
    assert gain == pytest.approx(100 - miou_others) and ci[0] > 0
    same, ci, _ = real["ResNet MIoU gain over U-Net (Table 2 on real BCCD smears)"]["estimate"]()
    assert same == pytest.approx(0) and ci == (0.0, 0.0)


def test_the_module_runs_as_bloodseg_reproduce_robust():
    """`python -m bloodseg.paper.robust ...` (the command of the first records) is `bloodseg reproduce
    robust ...`: the same arguments, the same checks."""
    proc = subprocess.run([sys.executable, "-m", "bloodseg.paper.robust", "--scale", "quick"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "bloodseg reproduce: error: reproduce robust has the scales study, smoke" \
        in proc.stderr, proc.stderr
