"""Segmenter: one file holds the network and how to use it; loading it is safe and attaches nothing
to the network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bloodseg.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, update_checkpoint
from bloodseg.errors import CheckpointError
from bloodseg.models import build_model
from bloodseg.postprocess import check_postprocess
from bloodseg.recipe import get_recipe
from bloodseg.segmenter import SETTINGS, Segmenter
from test_bad_inputs import _Exploit          # unpickling it runs a shell command

SPEC = {"white_min_area": 60.0, "fill_white_holes": True, "chosen_on": "a test"}


def tiny(name="unet"):
    torch.manual_seed(0)
    return build_model(name, width=4).eval()


@pytest.fixture()
def images(small_samples, full_smears):
    """Six 96x128 smears and one 200x300 crop (several tiles at tile 64)."""
    return [s.image for s in small_samples] + [np.ascontiguousarray(full_smears[0][0][:200, :300])]


def test_save_then_load_gives_the_same_settings_and_masks(tmp_path, images):
    seg = Segmenter(tiny(), input_scale=0.5, postprocess=SPEC, clahe=True, tile=64, overlap=16, tta=True,
                    recipe=get_recipe("smoke").to_dict(), metrics={"miou": 0.5})
    path = seg.save(tmp_path / "seg.pt", note="extra entry")
    ckpt = load_checkpoint(path)
    assert ckpt["segmenter"] == seg.settings() and set(ckpt["segmenter"]) == set(SETTINGS)
    assert ckpt["note"] == "extra entry"
    again = Segmenter.load(path, device="cpu")
    assert again.settings() == seg.settings()
    assert (again.input_scale, again.tile, again.overlap, again.tta, again.clahe) == (0.5, 64, 16, True, True)
    assert again.postprocess == check_postprocess(SPEC) and again.class_names == seg.class_names
    assert again.recipe == seg.recipe and again.metrics == {"miou": 0.5}
    for (k, a), b in zip(seg.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    for image in images:
        assert np.array_equal(again.predict(image), seg.predict(image))
        assert np.array_equal(again.predict(image, postprocess=False), seg.predict(image, postprocess=False))
        assert torch.equal(again.predict_proba(image), seg.predict_proba(image))
    # the stored cleanup really acts on these masks, so "identical masks" covers it too
    assert any(not np.array_equal(seg.predict(im), seg.predict(im, postprocess=False)) for im in images)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED_BY_SEGMENTER"
    net = tiny()
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": net.name, "model_options": dict(net.options),
                "model_state": net.state_dict(), "segmenter": {"postprocess": _Exploit(marker)}}, evil)
    with pytest.raises(CheckpointError, match="refused to load .*could run code"):
        Segmenter.load(evil, device="cpu")
    assert not marker.exists()
    torch.load(evil, weights_only=False)           # the file really is an exploit
    assert marker.exists()


def test_an_old_checkpoint_with_top_level_settings_loads_with_them(tmp_path, images):
    net = tiny()
    path = save_checkpoint(tmp_path / "old.pt", net, input_scale=0.5, postprocess=SPEC)
    assert "segmenter" not in load_checkpoint(path)
    seg = Segmenter.load(path, device="cpu")
    assert seg.input_scale == 0.5 and seg.postprocess == check_postprocess(SPEC)
    expected = Segmenter(net, input_scale=0.5, postprocess=SPEC)
    for image in images:
        assert np.array_equal(seg.predict(image), expected.predict(image))


def test_updating_a_setting_at_the_top_level_reaches_the_segmenter(tmp_path):
    path = Segmenter(tiny(), input_scale=0.5).save(tmp_path / "seg.pt")
    update_checkpoint(path, postprocess=SPEC)      # the way tune-cleanup and older tools write it
    seg = Segmenter.load(path, device="cpu")
    assert seg.postprocess == check_postprocess(SPEC) and seg.input_scale == 0.5


@pytest.mark.parametrize("entries, match", [
    (dict(segmenter={"input_scale": -1.0}), "input_scale"),
    (dict(segmenter={"input_scale": float("nan")}), "input_scale"),
    (dict(segmenter={"tile": 30}), "tile"),
    (dict(segmenter={"tile": 64, "overlap": 64}), "overlap"),
    (dict(segmenter={"postprocess": {"white_min_area": -1, "fill_white_holes": True}}), "postprocess"),
    (dict(segmenter={"postprocess": {"white_min_area": 10}}), "postprocess"),
    (dict(segmenter={"class_names": 3}), "segmenter settings"),
    (dict(segmenter={"flavour": "blue"}), "unknown segmenter settings"),
    (dict(segmenter={"colour": "blue"}), "segmenter settings"),
    (dict(segmenter={"background": [0, 300, 1]}), "segmenter settings"),
    (dict(input_scale=0.0), "input_scale"),                                      # an old-style checkpoint
    (dict(postprocess={"white_min_area": "big", "fill_white_holes": True}), "postprocess"),
])
def test_invalid_settings_in_a_checkpoint_are_a_checkpoint_error(tmp_path, entries, match):
    path = save_checkpoint(tmp_path / "bad.pt", tiny(), **entries)
    with pytest.raises(CheckpointError, match=match):
        Segmenter.load(path, device="cpu")


def test_nothing_is_attached_to_the_network(tmp_path, images):
    path = Segmenter(tiny("ode-unet-5"), input_scale=0.5, postprocess=SPEC).save(tmp_path / "seg.pt")
    update_checkpoint(path, input_scale=0.5, postprocess=SPEC)       # the old keys too
    seg = Segmenter.load(path, device="cpu")
    assert seg.input_scale == 0.5 and seg.postprocess is not None
    seg.predict(images[0])
    assert not hasattr(seg.model, "input_scale") and not hasattr(seg.model, "postprocess")
    # and saving it again writes the settings from the Segmenter, not from the network
    again = Segmenter.load(seg.replace(input_scale=1.0).save(tmp_path / "again.pt"), device="cpu")
    assert again.input_scale == 1.0 and not hasattr(again.model, "input_scale")


def test_the_crop_rule_acts_on_crops_only_and_never_on_the_raw_argmax(monkeypatch):
    """crop_cells='centre' drops the white cells a crop's border cuts (the network stood in for by a
    known mask), on both the fast path and the one with probabilities; 'all', a whole field and
    postprocess=False keep them."""
    import bloodseg.segmenter as S

    def scene(h, w):
        m = np.zeros((h, w), np.uint8)
        m[h // 2 - 20:h // 2 + 20, w // 2 - 20:w // 2 + 20] = 1      # the crop's own white cell
        m[10:50, :15] = 1                                            # a neighbour cut by the left border
        m[h - 30:, w - 40:w - 10] = 2                                # a red cell cut by the bottom
        return m

    def one_hot(m):
        return torch.from_numpy(np.eye(3, dtype=np.float32)[m].transpose(2, 0, 1).copy())

    monkeypatch.setattr(S, "predict_image", lambda model, image, **kw: scene(*image.shape[:2]))
    monkeypatch.setattr(S, "predict_probabilities", lambda model, image, **kw: one_hot(scene(*image.shape[:2])))
    centre, everything = Segmenter(tiny(), crop_cells="centre"), Segmenter(tiny(), crop_cells="all")
    crop, field = np.zeros((200, 257, 3), np.uint8), np.zeros((480, 640, 3), np.uint8)
    expected = scene(200, 257)
    expected[10:50, :15] = 0
    for probabilities in (False, True):
        assert np.array_equal(centre.segment(crop, probabilities=probabilities).mask, expected)
        assert np.array_equal(everything.segment(crop, probabilities=probabilities).mask, scene(200, 257))
        assert np.array_equal(centre.segment(field, probabilities=probabilities).mask, scene(480, 640))
    p = centre.segment(crop, raw=True)
    assert np.array_equal(p.raw, scene(200, 257)) and np.array_equal(p.mask, expected)
    assert np.array_equal(centre.predict(crop, postprocess=False), scene(200, 257))
    assert centre.count(crop)["n_white"] == 1
    assert centre.count(crop)["white_fraction"] < everything.count(crop)["white_fraction"]
    with pytest.raises(Exception, match="crop_cells must be one of"):
        Segmenter(tiny(), crop_cells="middle")
