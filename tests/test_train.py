"""fit / checkpoints / resume / evaluate: behaviour on tiny, fast problems."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from bloodseg.errors import CheckpointError, TrainingError
from bloodseg.models import build_model
from bloodseg.checkpoint import load_checkpoint, load_model, save_checkpoint
from bloodseg.distributed import DistInfo
from bloodseg.recipe import TrainRecipe
from bloodseg.train import epoch_order, evaluate, fit
from conftest import ColourBlobs


def tiny(name="unet", **kw):
    torch.manual_seed(0)
    return build_model(name, width=4, **kw)


CFG = TrainRecipe(epochs=2, batch_size=4, lr=1e-2, seed=3, progress=False)


def test_fit_learns_and_keeps_the_best_checkpoint(tmp_path):
    model = tiny()
    history = fit(model, ColourBlobs(24), ColourBlobs(8, seed=1), tmp_path, CFG, epochs=6)
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] < history[0]["loss"]
    for key in ("loss", "val_loss", "val_miou", "nfe_forward", "nfe_backward", "time_s"):
        assert key in history[0]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best_val_loss"] == pytest.approx(min(h["val_loss"] for h in history))
    # the best checkpoint is the epoch with the lowest validation loss
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert best["epoch"] == best_epoch
    assert json.loads((tmp_path / "history.json").read_text()) == history
    scores = evaluate(load_model(tmp_path / "best.pt", device="cpu"), ColourBlobs(8, seed=2), n_timed=3)
    assert scores["miou"] > 0.6 and 0 < scores["time_s"] and scores["n_timed"] == 3


def test_resume_from_epoch_gives_identical_weights(tmp_path):
    # on the CPU: cuDNN's default kernels are not bit-reproducible, even without a resume
    full = tiny()
    fit(full, ColourBlobs(20), ColourBlobs(4, 1), tmp_path / "a", CFG, device="cpu", epochs=3)
    part = tiny()
    fit(part, ColourBlobs(20), ColourBlobs(4, 1), tmp_path / "b", CFG, device="cpu", epochs=1)
    resumed = tiny()  # a fresh process would start from scratch weights; last.pt must win
    history = fit(resumed, ColourBlobs(20), ColourBlobs(4, 1), tmp_path / "b", CFG, device="cpu", epochs=3)
    assert len(history) == 3
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_mid_epoch_gives_identical_weights(tmp_path, monkeypatch):
    full = tiny("ode-unet-5")
    fit(full, ColourBlobs(20), ColourBlobs(4, 1), tmp_path / "a", CFG, device="cpu", epochs=2)

    import bloodseg.train as train_mod
    real_save, calls = train_mod.save_checkpoint, {"n": 0}

    def crash_after_third_save(*a, **k):  # simulate a kill right after a mid-epoch checkpoint
        real_save(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_third_save)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny("ode-unet-5"), ColourBlobs(20), ColourBlobs(4, 1), tmp_path / "b", CFG, device="cpu",
            checkpoint_every=2)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["step"] > 0  # really stopped inside an epoch
    resumed = tiny("ode-unet-5")
    history = fit(resumed, ColourBlobs(20), ColourBlobs(4, 1), tmp_path / "b", CFG, device="cpu", checkpoint_every=2)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert history[-1]["nfe_forward"] > 0


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainRecipe(epochs=2, batch_size=4, lr=1e-2, seed=3, progress=False)
    model = tiny()
    fit(model, ColourBlobs(8), ColourBlobs(4, 1), tmp_path, cfg, epochs=1)
    good = load_checkpoint(tmp_path / "last.pt")
    bad_data = ColourBlobs(8)
    bad_data.images[5] = float("nan")   # one all-NaN image
    with pytest.raises(TrainingError) as err:
        fit(tiny(), bad_data, ColourBlobs(4, 1), tmp_path, cfg)
    msg = str(err.value)
    assert "nan" in msg.lower() and "epoch 2" in msg and "last.pt" in msg and "learning rate" in msg
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == good["epoch"] == 1
    for k, v in kept["model_state"].items():
        assert torch.equal(v, good["model_state"][k])


def test_epoch_order_is_seeded_and_sharded():
    a = epoch_order(10, seed=1, epoch=0, info=DistInfo())
    assert sorted(a) == list(range(10)) and a == epoch_order(10, 1, 0, DistInfo())
    assert a != epoch_order(10, 1, 1, DistInfo())
    r0 = epoch_order(10, 1, 0, DistInfo(rank=0, world_size=3))
    r1 = epoch_order(10, 1, 0, DistInfo(rank=1, world_size=3))
    r2 = epoch_order(10, 1, 0, DistInfo(rank=2, world_size=3))
    assert len(r0) == len(r1) == len(r2) == 4
    assert set(r0 + r1 + r2) == set(range(10))


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    model = tiny("nodes-unet")
    path = save_checkpoint(tmp_path / "m.pt", model, epoch=0)
    again = load_model(path, device="cpu")
    assert again.name == "nodes-unet" and again.options == model.options
    x = torch.rand(1, 3, 32, 32)
    model.eval()
    assert torch.allclose(model(x), again(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary files left behind


def test_a_crash_while_writing_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    path = save_checkpoint(tmp_path / "last.pt", model, epoch=1)
    before = path.read_bytes()

    def broken_save(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="disk full"):     # the OSError, reported as a CheckpointError
        save_checkpoint(path, model, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(os.urandom(512))
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "bloodseg-checkpoint/1", "payload": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match="refused to load .*could run code"):
        load_checkpoint(evil)
    # a newer pickle protocol is refused too (as unreadable), and still runs nothing
    torch.save({"payload": _Exploit()}, tmp_path / "evil5.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil5.pt")
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    # the file really is an exploit: an unsafe load would have run it
    torch.load(evil, weights_only=False)
    assert (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_checkpoint_of_another_model_or_class_count(tmp_path):
    path = save_checkpoint(tmp_path / "u.pt", tiny(), epoch=0)
    with pytest.raises(CheckpointError, match="holds a 'unet' model, not 'resunet'"):
        load_model(path, name="resunet")
    with pytest.raises(CheckpointError, match="predicts 3 classes, but 2"):
        load_model(path, classes=2)
    ckpt = load_checkpoint(path)
    ckpt["model_name"] = "resunet"  # weights of a U-Net labelled as a ResUNet
    torch.save(ckpt, tmp_path / "lie.pt")
    with pytest.raises(CheckpointError, match="do not fit a 'resunet' model"):
        load_model(tmp_path / "lie.pt")
    torch.save({"just": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bloodseg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_resuming_into_another_model_is_refused(tmp_path):
    fit(tiny(), ColourBlobs(8), ColourBlobs(4, 1), tmp_path, CFG, epochs=1)
    with pytest.raises(CheckpointError, match="belongs to a 'unet' run"):
        fit(tiny("resunet"), ColourBlobs(8), ColourBlobs(4, 1), tmp_path, CFG)


def test_unwritable_output_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    from bloodseg.errors import BloodsegError
    with pytest.raises(BloodsegError, match="cannot write to the output folder"):
        fit(tiny(), ColourBlobs(8), ColourBlobs(4, 1), target / "run", CFG, epochs=1)
