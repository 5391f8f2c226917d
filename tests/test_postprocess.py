"""White-cell cleanup: the rule itself, how checkpoints carry it, how predict applies it, how it is tuned."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bloodseg.checkpoint import load_checkpoint, save_checkpoint, update_checkpoint
from bloodseg.classes import WHITE_CELL as WHITE
from bloodseg.errors import BloodsegError, CheckpointError
from bloodseg.infer import predict_image
from bloodseg.io import Sample
from bloodseg.models import build_model
from bloodseg.paper import bccd as rd
from bloodseg.postprocess import check_postprocess, clean_white_cells, min_area_at
from bloodseg.segmenter import Segmenter, shipped_checkpoint

RED = 2


def _scene():
    """A 96x96 mask: one white cell (30x30, with a 4x4 hole) and a red cell; two white specks,
    one of 4x4 inside the red cell, one of 10x10 on the background."""
    mask = np.zeros((96, 96), np.uint8)
    mask[60:90, 50:90] = RED
    mask[10:40, 10:40] = WHITE
    mask[23:27, 23:27] = 0                                           # hole
    mask[70:74, 70:74] = WHITE                                       # 16 px speck in the red cell
    mask[60:70, 10:20] = WHITE                                       # 100 px speck on the background
    return mask


def _probs_for(mask: np.ndarray) -> np.ndarray:
    """Probabilities that agree with ``mask``; where the red cell is, red is second most likely."""
    p = np.full((3, *mask.shape), 0.05, np.float32)
    p[RED, 60:90, 50:90] = 0.3
    for c in range(3):
        p[c][mask == c] = 0.9
    return p


def test_small_white_components_take_the_next_class_and_holes_fill():
    mask = _scene()
    before = mask.copy()
    out = clean_white_cells(mask, _probs_for(mask), min_area=200, fill_holes=True)
    assert np.array_equal(mask, before)                              # the input is not changed
    assert out[71, 71] == RED                                        # speck inside the red cell -> red
    assert out[65, 15] == 0                                          # speck on the background -> background
    assert out[24, 24] == WHITE                                      # hole filled
    assert (out == WHITE).sum() == 900                               # the whole 30x30 cell, nothing else
    # without probabilities every removed pixel becomes background
    plain = clean_white_cells(mask, None, min_area=200, fill_holes=False)
    assert plain[71, 71] == 0 and plain[24, 24] == 0 and (plain == WHITE).sum() == 900 - 16
    # the threshold is "smaller than": a 100 px speck survives min_area=100, goes at 101
    assert clean_white_cells(mask, None, 100, False)[65, 15] == WHITE
    assert clean_white_cells(mask, None, 101, False)[65, 15] == 0
    # nothing to do: identical mask back
    assert np.array_equal(clean_white_cells(mask, None, 0, False), mask)
    # torch probabilities work the same as numpy ones
    assert np.array_equal(clean_white_cells(mask, torch.from_numpy(_probs_for(mask)), 200, True), out)


def test_bad_masks_probabilities_and_specs_are_refused():
    mask = _scene()
    with pytest.raises(BloodsegError, match="2-D class mask"):
        clean_white_cells(mask[None], None, 10)
    with pytest.raises(BloodsegError, match=r"probs must be C x 96 x 96"):
        clean_white_cells(mask, np.zeros((3, 10, 10)), 200)
    with pytest.raises(BloodsegError, match="missing"):
        check_postprocess({"white_min_area": 10})
    with pytest.raises(BloodsegError, match=">= 0"):
        check_postprocess({"white_min_area": -5, "fill_white_holes": True})
    with pytest.raises(BloodsegError, match=">= 0"):
        check_postprocess({"white_min_area": True, "fill_white_holes": True})
    with pytest.raises(BloodsegError, match="must be a dict"):
        check_postprocess(4000)
    spec = check_postprocess({"white_min_area": 4000, "fill_white_holes": 1, "chosen_on": "val"})
    assert spec == {"white_min_area": 4000.0, "fill_white_holes": True, "chosen_on": "val"}


class PatternModel(torch.nn.Module):
    """Logits that reproduce a fixed class mask at the top-left of any input (a stand-in network
    whose argmax is known exactly)."""

    name = "pattern"

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.options = {"classes": 3}
        self.logits = torch.from_numpy(np.log(_probs_for(mask)))

    def forward(self, x):
        h, w = x.shape[-2:]
        out = torch.full((x.shape[0], 3, h, w), -10.0)
        ph, pw = min(h, self.logits.shape[1]), min(w, self.logits.shape[2])
        out[:, :, :ph, :pw] = self.logits[:, :ph, :pw]
        return out + self.anchor


def test_predict_image_applies_the_models_own_cleanup_unless_told_not_to():
    mask = _scene()
    model = Segmenter(PatternModel(mask))
    image = np.zeros((96, 96, 3), np.uint8)
    assert np.array_equal(model.predict(image), mask)                # no cleanup carried: the argmax
    with pytest.raises(BloodsegError, match="carries no post-processing"):
        model.predict(image, postprocess=True)
    spec = {"white_min_area": 200, "fill_white_holes": True}
    cleaned = clean_white_cells(mask, _probs_for(mask), 200, True)
    assert np.array_equal(model.predict(image, postprocess=spec), cleaned)
    model = model.replace(postprocess=check_postprocess(spec))
    assert np.array_equal(model.predict(image), cleaned)              # default: the model's own
    assert np.array_equal(model.predict(image, postprocess=True), cleaned)
    assert np.array_equal(model.predict(image, postprocess=False), mask)
    assert model._postprocess(False) is None
    with pytest.raises(BloodsegError, match=">= 0"):
        model.predict(image, postprocess={"white_min_area": -1, "fill_white_holes": False})


def test_the_area_follows_the_scale_the_network_runs_at():
    spec = {"white_min_area": 400, "fill_white_holes": False, "input_scale": 0.5}
    assert min_area_at(spec, 0.5) == 400 and min_area_at(spec, 1.0) == 100 and min_area_at(spec, 0.25) == 1600
    assert min_area_at({"white_min_area": 400, "fill_white_holes": False}, 1.0) == 400   # no scale recorded
    with pytest.raises(BloodsegError, match="input_scale must be a positive number"):
        check_postprocess({**spec, "input_scale": 0})
    # chosen at scale 0.5 as 400 px, run at scale 1 (PatternModel): 100 px, so the 100 px speck stays
    mask = _scene()
    got = predict_image(PatternModel(mask), np.zeros((96, 96, 3), np.uint8), postprocess=spec)
    assert got[65, 15] == WHITE and got[71, 71] == RED


def test_checkpoints_carry_the_cleanup_and_update_keeps_the_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    plain = save_checkpoint(tmp_path / "plain.pt", model)
    assert Segmenter.load(plain, device="cpu").postprocess is None
    spec = {"white_min_area": 3000.0, "fill_white_holes": True, "chosen_on": "test fixture"}
    updated = update_checkpoint(plain, out=tmp_path / "tuned.pt", postprocess=spec, metrics={"note": 1})
    assert "postprocess" not in load_checkpoint(plain)              # the original is left as it was
    tuned = Segmenter.load(updated, device="cpu")
    assert tuned.postprocess == spec and load_checkpoint(updated)["metrics"] == {"note": 1}
    for a, b in zip(model.state_dict().values(), tuned.model.state_dict().values()):
        assert torch.equal(a, b)
    # saving a model that carries a cleanup keeps it
    again = tuned.save(tmp_path / "again.pt")
    assert Segmenter.load(again, device="cpu").postprocess == spec
    # in place, and no temporary files left behind
    update_checkpoint(again, postprocess={"white_min_area": -1, "fill_white_holes": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pt", "plain.pt", "tuned.pt"]
    with pytest.raises(CheckpointError, match="invalid 'postprocess'"):
        Segmenter.load(again, device="cpu")


def test_tuning_picks_the_middle_of_the_plateau_and_reports_every_setting():
    truth = np.zeros((96, 96), np.uint8)
    truth[10:40, 10:40] = WHITE                                      # the one true white cell, 900 px
    truth[60:90, 50:90] = RED
    model = PatternModel(_scene())                                   # predicts it with a hole and two specks
    samples = [Sample(f"s{i}", np.zeros((96, 96, 3), np.uint8), truth, f"s{i}") for i in range(2)]
    areas = (0, 10, 150, 300, 600, 3000)
    tuning = rd.tune_white_cleanup(model, samples, areas=areas, chosen_on="two fixtures")
    assert len(tuning["rows"]) == 2 * len(areas) and tuning["n_images"] == 2
    by = {(r["white_min_area"], r["fill_white_holes"]): r["iou"] for r in tuning["rows"]}
    assert tuning["raw"]["iou"] == pytest.approx(by[(0.0, False)]) == pytest.approx((900 - 16) / (900 + 116))
    assert by[(150.0, True)] == by[(300.0, True)] == by[(600.0, True)] == 1.0   # specks gone, hole filled
    assert by[(3000.0, True)] == 0.0                                 # the true cell removed too
    assert tuning["plateau"] == [150.0, 600.0]
    assert tuning["chosen"] == {"white_min_area": 300.0, "fill_white_holes": True, "input_scale": 1.0,
                                "chosen_on": "two fixtures", "tuned_iou": 1.0}
    assert sorted(map(tuple, tuning["components"]["predicted"])) == [(16, 0), (16, 0), (100, 0), (100, 0),
                                                                      (884, 1), (884, 1)]
    assert tuning["components"]["true_cells"] == [900, 900]
    assert len(rd.plot_white_components(tuning["components"], 300).axes[0].patches) > 0
    fig = rd.plot_cleanup_tuning(tuning, test_rows=tuning["rows"])
    assert len(fig.axes[0].lines) >= 5                               # 2 fills x 2 sets, chosen line, goal
    with pytest.raises(BloodsegError, match="at least one"):
        rd.tune_white_cleanup(model, [])


def test_cli_tune_cleanup_then_predict_with_and_without_it(bccd_sample, tmp_path, capsys):
    from bloodseg import cli
    from bloodseg.io import read_image, read_mask
    shipped = shipped_checkpoint()
    out = tmp_path / "tuned.pt"
    assert cli.main(["tune-cleanup", "--ckpt", str(shipped), "--src", str(bccd_sample), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cleanup chosen on 4 validation photographs" in printed and f"wrote {out} (cleanup)" in printed
    ckpt = load_checkpoint(out)
    tune = ckpt["metrics"]["tune"]
    assert ckpt["postprocess"]["chosen_on"] == "validation split, 4 photographs"
    assert ckpt["postprocess"]["white_min_area"] in rd.WHITE_AREA_GRID
    assert tune["steps"] == ["cleanup"] and tune["val_images"] == 4 and tune["test_images"] == 4
    assert len(tune["cleanup"]["rows"]) == 2 * len(rd.WHITE_AREA_GRID)
    assert 0 < tune["test_before"]["gold white IoU"] <= 1 and 0 < tune["test_after"]["gold white IoU"] <= 1
    for a, b in zip(load_checkpoint(shipped)["model_state"].values(), ckpt["model_state"].values()):
        assert torch.equal(a, b)                                     # same weights, only the cleanup changed
    # the settings it did not touch stay as they were (solver, scale, colour)
    before, after = Segmenter.load(shipped).settings(), Segmenter.load(out).settings()
    assert {k: v for k, v in before.items() if k != "postprocess"} == {k: v for k, v in after.items() if k != "postprocess"}

    model = Segmenter.load(out, device="cpu")
    photo = sorted((bccd_sample / "images").iterdir())[0]
    for flag, folder, postprocess in (([], "clean", None), (["--raw"], "raw", False)):
        assert cli.main(["predict", "--ckpt", str(out), str(photo), "--out", str(tmp_path / folder),
                         "--no-overlay"] + flag) == 0
        expected = model.predict(read_image(photo), postprocess=postprocess)
        assert np.array_equal(read_mask(tmp_path / folder / f"{photo.stem}.png"), expected)


def test_every_model_gets_its_own_cleanup_chosen_on_val_and_scored_on_test():
    truth = np.zeros((96, 96), np.uint8)
    truth[10:40, 10:40] = WHITE
    truth[60:90, 50:90] = RED
    clean_pred = truth.copy()                                        # a network that is already right
    val = [Sample("v", np.zeros((96, 96, 3), np.uint8), truth, "v")]
    test = [Sample("t", np.zeros((96, 96, 3), np.uint8), truth, "t")]
    rows = rd.compare_cleanup({"specky": PatternModel(_scene()), "clean": PatternModel(clean_pred)}, val, test)
    specky, clean = rows
    assert specky["model"] == "specky" and specky["white_min_area"] == 250.0 and specky["holes filled"] is True
    assert specky["test IoU raw"] == pytest.approx(884 / 1016, abs=1e-4) and specky["test IoU cleaned"] == 1.0
    assert specky["test gain"] == pytest.approx(1 - 884 / 1016, abs=1e-4)
    assert specky["test precision raw"] == pytest.approx(884 / 1000, abs=1e-4) and specky["test recall cleaned"] == 1.0
    assert clean["test IoU raw"] == clean["test IoU cleaned"] == 1.0 and clean["test gain"] == 0.0
    fig = rd.plot_cleanup_comparison(rows)
    assert len(fig.axes[0].patches) == 4
    with pytest.raises(BloodsegError, match="no score row"):
        rd.cleanup_summary("x", rd.tune_white_cleanup(PatternModel(_scene()), val), [])



def _disc(mask, cy, cx, r, value):
    yy, xx = np.ogrid[:mask.shape[0], :mask.shape[1]]
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def test_a_crop_keeps_its_own_cell_and_drops_the_ones_its_border_cuts():
    from bloodseg.postprocess import keep_crop_cell
    mask = np.zeros((120, 160), np.uint8)
    _disc(mask, 20, 20, 12, RED)               # a red cell cut by the corner: not a white cell, kept
    _disc(mask, 60, 0, 18, WHITE)              # a neighbour cut by the left border
    _disc(mask, 119, 140, 15, WHITE)           # a neighbour cut by the bottom border
    expected = mask.copy()
    expected[expected == WHITE] = 0            # ... both become background
    for m in (mask, expected):
        _disc(m, 60, 80, 25, WHITE)            # the crop's own cell, at its centre
        _disc(m, 20, 135, 8, WHITE)            # a whole small white cell inside the frame
    before = mask.copy()
    out = keep_crop_cell(mask)
    assert np.array_equal(out, expected)
    assert np.array_equal(mask, before)        # a copy

    tight = np.zeros((100, 100), np.uint8)
    _disc(tight, 50, 50, 60, WHITE)            # the crop's own cell fills the frame, touching every border
    _disc(tight, 0, 0, 6, RED)
    assert np.array_equal(keep_crop_cell(tight), tight)
    two = np.zeros((101, 101), np.uint8)
    _disc(two, 50, 5, 10, WHITE)               # two cells cut by the borders, both 35 px from the centre:
    _disc(two, 50, 97, 12, WHITE)              # the larger is the crop's own cell, the other goes
    out = keep_crop_cell(two)
    assert out[50, 90] == WHITE and out[50, 5] == 0
    assert np.array_equal(keep_crop_cell(two[:, ::-1]), out[:, ::-1])    # not the first in raster order
    one = np.where(two == WHITE, 0, two)
    _disc(one, 50, 5, 10, WHITE)
    assert np.array_equal(keep_crop_cell(one), one)                     # a lone cell is the crop's own
    with pytest.raises(BloodsegError, match="2-D class mask"):
        keep_crop_cell(np.zeros((4, 4, 3), np.uint8))
