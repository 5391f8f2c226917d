"""Training options added for long runs: cosine learning-rate schedule, a wall-clock limit, strict
CLI numbers, and a clear error when torchrun starts more processes than there are GPUs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ColourBlobs

from bloodseg import cli
from bloodseg.errors import BloodsegError
from bloodseg.models import build_model
from bloodseg.checkpoint import load_checkpoint
from bloodseg.distributed import setup_distributed
from bloodseg.recipe import TrainRecipe
from bloodseg.train import epoch_lr, fit


def tiny():
    torch.manual_seed(0)
    return build_model("unet", width=4)


def test_cosine_schedule_values():
    cfg = TrainRecipe(epochs=4, schedule="cosine")
    lrs = [epoch_lr(cfg, 1e-3, e) for e in range(4)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[2] == pytest.approx(0.5e-3)                    # half way down at the middle epoch
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    assert [epoch_lr(TrainRecipe(epochs=4), 1e-3, e) for e in range(4)] == [1e-3] * 4


def test_fit_follows_the_schedule_and_a_resumed_run_continues_it(tmp_path):
    cfg = TrainRecipe(epochs=3, batch_size=4, lr=1e-2, seed=1, progress=False, schedule="cosine")
    whole = fit(tiny(), ColourBlobs(8), ColourBlobs(2, 50), tmp_path / "a", cfg, device="cpu")
    assert [h["lr"] for h in whole] == pytest.approx([epoch_lr(cfg, 1e-2, e) for e in range(3)])
    fit(tiny(), ColourBlobs(8), ColourBlobs(2, 50), tmp_path / "b", cfg, device="cpu", epochs=1)
    resumed = fit(tiny(), ColourBlobs(8), ColourBlobs(2, 50), tmp_path / "b", cfg, device="cpu")
    assert [h["lr"] for h in resumed] == [h["lr"] for h in whole]
    assert resumed[-1]["loss"] == whole[-1]["loss"]           # CPU: the same run, bit for bit


def test_max_minutes_stops_between_epochs_and_the_run_can_go_on(tmp_path, capsys):
    cfg = TrainRecipe(epochs=4, batch_size=4, lr=1e-2, progress=False, max_minutes=1e-6)
    history = fit(tiny(), ColourBlobs(8), ColourBlobs(2, 50), tmp_path, cfg, device="cpu")
    assert len(history) == 1                                    # the first epoch always runs
    assert "stopping after epoch 1 of 4" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    more = fit(tiny(), ColourBlobs(8), ColourBlobs(2, 50), tmp_path, cfg, device="cpu", max_minutes=0)
    assert [h["epoch"] for h in more] == [1, 2, 3, 4]


@pytest.mark.parametrize("field, value, words", [
    ("schedule", "linear", "schedule must be"), ("max_minutes", -1.0, "max_minutes"),
    ("max_minutes", math.nan, "max_minutes"), ("checkpoint_every", -1, "checkpoint_every"),
    ("epochs", 0, "epochs and batch_size")])
def test_bad_config_values_are_refused(field, value, words):
    with pytest.raises(BloodsegError, match=words):
        TrainRecipe(**{field: value}).validate()


@pytest.mark.parametrize("extra, words", [
    (["--epochs", "0"], "epochs and batch_size must be whole numbers >= 1"),
    (["--batch-size", "0"], "epochs and batch_size must be whole numbers >= 1"),
    (["--lr", "0"], "learning rate must be a positive number"),
    (["--checkpoint-every", "-1"], "checkpoint_every"),
    (["--width", "0"], "--width must be a positive"),
    (["--max-minutes", "-2"], "max_minutes")])
def test_cli_train_refuses_zero_and_negative_numbers(tmp_path, capsys, extra, words):
    """0 used to fall back silently to the profile's value (``args.x or profile.x``)."""
    code = cli.main(["train", "--model", "unet", "--profile", "smoke", "--out", str(tmp_path / "r")] + extra)
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "r" / "last.pt").exists()


def test_cli_train_takes_a_cosine_schedule(tmp_path, capsys):
    code = cli.main(["train", "--model", "unet", "--profile", "smoke", "--width", "4", "--epochs", "2",
                     "--schedule", "cosine", "--out", str(tmp_path)])
    assert code == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["lr"] < history[0]["lr"]


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(BloodsegError, match=r"LOCAL_RANK 1 .* only 1 CUDA device.*--nproc-per-node=1"):
        setup_distributed()
