"""Data-parallel training (torchrun + DDP, gloo on CPU, 2 processes): bloodseg.distributed and
bloodseg.paper.ddp_scaling.

The multi-process tests start real ``torchrun`` launches on loopback (``--standalone`` picks a
free port), one thread per process. Run as a script under torchrun, this file is also the worker
of the fit tests: ``torchrun --nproc-per-node=2 tests/test_ddp.py fit OUT EPOCHS ...``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bloodseg.checkpoint import load_checkpoint
from bloodseg.distributed import (DistInfo, SyncBatchNorm2d, cleanup_distributed, convert_sync_batchnorm,
                                  ddp_options, revert_sync_batchnorm)
from bloodseg.errors import BloodsegError, CheckpointError
from bloodseg.models import build_model
from bloodseg.ode import ODEBlock, nfe_report
from bloodseg.paper.ddp_scaling import (GRADCHECK_CONFIGS, gradient_check, launch, measure_throughput,
                                        slurm_script, torchrun_command)
from bloodseg.recipe import TrainRecipe
from bloodseg.train import epoch_order, fit
from conftest import ColourBlobs

RUN_FILES = {"best.pt", "last.pt", "history.json"}


# --------------------------------------------------------------------------- worker (torchrun)

class Blobs(ColourBlobs):
    """The colour blobs of conftest; ``stop_after`` raises after that many item reads, the same
    step on every rank: a simulated crash."""

    def __init__(self, n, seed=0, stop_after=None):
        super().__init__(n, seed)
        self.stop_after, self.reads = stop_after, 0

    def __getitem__(self, i):
        self.reads += 1
        if self.stop_after is not None and self.reads > self.stop_after:
            raise _Crash()
        return super().__getitem__(i)


class _Crash(Exception):
    pass


CFG = TrainRecipe(batch_size=4, lr=1e-2, seed=3, progress=False, checkpoint_every=1)


def _worker_fit(out: str, epochs: int, stop_after: int | None) -> None:
    """One fit under torchrun; every rank saves its final weights and history next to ``out``."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("ode-unet-5", width=4, norm="batch")
    try:  # 18 training samples: 9 per rank, steps of 4 + 4 + 1
        history = fit(model, Blobs(18, stop_after=stop_after), Blobs(5, seed=1), out, CFG,
                      device="cpu", epochs=epochs)
    except _Crash:
        print(f"rank {dist.get_rank()}: simulated crash", flush=True)
        return
    rank = dist.get_rank()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    torch.save({"state": state, "history": history, "norm_types": kinds}, f"{out}-rank{rank}.pt")


def _fit2(*jobs):
    """One 2-process torchrun launch running the fits ``(out, epochs, stop_after)`` in turn."""
    args = [__file__, "fit"] + [str(v) for job in jobs for v in job]
    return launch(args, nproc=2, module=None, threads_per_process=1, echo=False, timeout=300)


# --------------------------------------------------------------------------- (a) gradients

def test_two_process_gradients_equal_single_process_gradients(tmp_path):
    """One step of ode-unet-5 (width 4, 32x32, global batch 4): DDP over 2 processes vs 1 process."""
    rows = {r["config"]: r for r in gradient_check(GRADCHECK_CONFIGS[:6], nproc=2, out_dir=tmp_path)}
    assert len(rows) == 6
    for label, r in rows.items():
        assert r["rank_diff"] == 0.0, label             # the all-reduce leaves identical gradients
        assert r["max_abs_grad"] > 1e-3, label          # a real gradient, not zeros
        if "rk4" in label:   # a fixed grid: the same steps whatever the batch -> float rounding only
            assert r["max_abs_diff"] < 1e-6, (label, r["max_abs_diff"])
        else:                # adaptive dopri5, rtol 1e-6, float64: each rank picks its own steps
            assert r["max_abs_diff"] < 1e-5, (label, r["max_abs_diff"])
        if "batchnorm" in label:  # synchronised BatchNorm: global statistics, same running stats
            assert r["batchnorm_layers"] > 0 and r["running_stats_diff"] < 1e-6, label
    assert {"adjoint" in k for k in rows} == {True, False}
    assert any("dopri5" in k for k in rows) and any("batchnorm" in k for k in rows)


# --------------------------------------------------------------------------- (b) fit, checkpoints, resume

def test_two_process_fit_writes_one_checkpoint_set_and_resumes_bit_for_bit(tmp_path):
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    # whole: 3 epochs. part: epoch 1, then a crash in epoch 2 after two of its three steps
    # (9 + 8 reads per rank), the same launch
    crashed = _fit2((whole, 3, None), (part, 3, 17))
    assert crashed.output.count("simulated crash") == 2
    for folder in (whole, part):
        assert {p.name for p in Path(folder).iterdir()} == RUN_FILES  # rank 0 only, no temp files
    ckpt = load_checkpoint(Path(part) / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"]) == (1, 2, 2)

    # a mid-epoch checkpoint of 2 processes is refused by 1 process (its shards would differ)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(Path(part) / "last.pt", single / "last.pt")
    with pytest.raises(CheckpointError, match="2 process"):
        fit(build_model("ode-unet-5", width=4, norm="batch"), Blobs(18), Blobs(5, seed=1), single, CFG,
            device="cpu", epochs=3)

    _fit2((part, 3, None))  # a second 2-process run continues from last.pt
    a = [torch.load(f"{whole}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    b = [torch.load(f"{part}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert a[0]["norm_types"] == ["BatchNorm2d", "GroupNorm"]  # SyncBN converted back after fit
    for run in (a, b):   # both ranks end with the same weights and BatchNorm statistics
        for k, v in run[0]["state"].items():
            assert torch.equal(v, run[1]["state"][k]), k
    for k, v in a[0]["state"].items():  # resumed == uninterrupted, bit for bit
        assert torch.equal(v, b[0]["state"][k]), k
    ha, hb = a[0]["history"], b[0]["history"]
    assert [h["epoch"] for h in hb] == [1, 2, 3]
    for x, y in zip(ha, hb):
        for key in ("loss", "val_loss", "val_miou", "nfe_forward", "nfe_backward"):
            assert y[key] == pytest.approx(x[key], rel=1e-12, abs=1e-12), key
    assert ha[-1]["loss"] < ha[0]["loss"]
    assert all(h["nfe_forward"] > 0 for h in ha)
    assert json.loads((Path(whole) / "history.json").read_text())[-1]["epoch"] == 3


@pytest.fixture
def cpu_only(monkeypatch):
    """These launches test the gloo (CPU) path: on a GPU host, hide the GPUs from the workers
    (two processes on a one-GPU machine would otherwise ask NCCL for GPU 1)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_cli_train_under_torchrun(tmp_path, cpu_only):
    out = tmp_path / "run"
    res = launch(["train", "--model", "ode-unet-5", "--profile", "smoke", "--width", "4",
                  "--epochs", "1", "--out", out], nproc=2, echo=False, timeout=300)
    assert res.output.count("profile smoke") == 1          # rank 0 prints, once
    assert "world size 2, batch 4 per process x 2 = 8" in res.output
    assert {p.name for p in out.iterdir()} == RUN_FILES | {"metrics.json"}
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 1


def test_throughput_is_measured_for_each_process_count(tmp_path, cpu_only):
    rows = measure_throughput((1, 2), model="unet", width=4, patch=32, batch_size=2, steps=2,
                              warmup=1, profile="smoke", out_dir=tmp_path)
    assert [r["processes"] for r in rows] == [1, 2]
    assert [r["global_batch"] for r in rows] == [2, 4]
    assert all(r["images_per_s"] > 0 and len(r["nfe_forward_per_rank"]) == r["processes"] for r in rows)
    assert all(r["threads_per_process"] >= 1 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0


# --------------------------------------------------------------------------- in-process pieces

def test_sync_batchnorm_conversion_round_trip():
    torch.manual_seed(0)
    model = build_model("ode-unet-5", width=4, norm="batch")
    block = model.ode["5"]
    block.func.extra = nn.BatchNorm2d(4)  # BatchNorm inside f must stay per process
    params = {id(p) for p in model.parameters()}
    keys = list(model.state_dict())
    n = convert_sync_batchnorm(model, "cpu")
    assert n == sum(isinstance(m, SyncBatchNorm2d) for m in model.modules()) > 0
    assert type(block.func.extra) is nn.BatchNorm2d
    assert {id(p) for p in model.parameters()} == params and list(model.state_dict()) == keys
    del block.func.extra
    params = {id(p) for p in model.parameters()}
    x = torch.rand(2, 3, 32, 32)
    reference = build_model("ode-unet-5", width=4, norm="batch")
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), reference(x))  # one process: plain BatchNorm
    assert revert_sync_batchnorm(model) == n
    assert not any(isinstance(m, SyncBatchNorm2d) for m in model.modules())
    assert {id(p) for p in model.parameters()} == params


def test_epoch_order_pads_to_equal_shards():
    for n, world in ((18, 2), (5, 2), (1, 4), (7, 3)):
        shards = [epoch_order(n, 0, 1, DistInfo(r, world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert set(sum(shards, [])) == set(range(n))
    assert epoch_order(10, 0, 1, DistInfo()) != epoch_order(10, 0, 2, DistInfo())  # reshuffled


def test_ddp_options():
    assert ddp_options(torch.device("cpu")) == {}
    assert list(ddp_options(torch.device("cpu"), sync_buffers=False).values()) == [False]
    assert ddp_options(torch.device("cuda", 1))["device_ids"] == [1]


def test_command_lines():
    train = ["train", "--model", "nodes-unet", "--out", "runs/x"]
    one = torchrun_command(train, nproc_per_node=4)
    assert one[:3] == ["torchrun", "--standalone", "--nproc-per-node=4"]
    assert one[3:5] == ["-m", "bloodseg.cli"] and one[5:] == train
    static = torchrun_command(train, 4, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500")
    assert "--nnodes=2" in static and "--node-rank=1" in static and "--rdzv-endpoint=node0:29500" in static
    elastic = torchrun_command(train, "gpu", nnodes=3, rdzv_endpoint="node0:29500", rdzv_id="job7")
    assert "--rdzv-backend=c10d" in elastic and "--rdzv-id=job7" in elastic and "--nproc-per-node=gpu" in elastic
    with pytest.raises(BloodsegError, match="rdzv_endpoint"):
        torchrun_command(train, 4, nnodes=2)
    script = slurm_script(train, nodes=2, gpus_per_node=4)
    assert "#SBATCH --nodes=2" in script and "srun torchrun" in script and "$SLURM_JOB_ID" in script
    assert "-m bloodseg.cli train --model nodes-unet --out runs/x" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_python_m_bloodseg_cli_runs():
    res = subprocess.run([sys.executable, "-m", "bloodseg.cli", "train", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "torchrun" in res.stdout and "--scale-lr" in res.stdout



def test_ddp_workers_are_hidden_cli_subcommands():
    """ddp_scaling launches `bloodseg ddp-bench` / `ddp-gradcheck`; `bloodseg --help` does not list them."""
    from bloodseg.cli import build_parser
    assert "ddp-bench" not in build_parser().format_help() and "ddp-gradcheck" not in build_parser().format_help()
    args = build_parser().parse_args(["ddp-bench", "--model", "unet", "--width", "4", "--json", "x.json"])
    assert (args.command, args.model, args.width, args.json) == ("ddp-bench", "unet", 4, "x.json")
    args = build_parser().parse_args(["ddp-gradcheck", "--configs", "[]", "--out", "g.pt"])
    assert (args.command, args.configs, args.out) == ("ddp-gradcheck", "[]", "g.pt")

def test_bf16_autocast_keeps_the_ode_solve_in_float32():
    """Under bf16 autocast an adaptive solve at rtol 1e-6 would take ~30x the steps."""
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    torch.manual_seed(0)
    model = build_model("ode-unet-5", width=4, rtol=1e-6)
    F.cross_entropy(model(x), y).backward()
    nfe32 = nfe_report(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    assert nfe_report(model) == nfe32
    block = [m for m in model.modules() if isinstance(m, ODEBlock)][0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(torch.rand(1, 64, 2, 2)).dtype == torch.float32


if __name__ == "__main__":  # the torchrun worker of the fit tests
    if sys.argv[1] == "fit":
        rest = sys.argv[2:]
        for i in range(0, len(rest), 3):
            out, epochs, stop = rest[i:i + 3]
            _worker_fit(out, int(epochs), None if stop == "None" else int(stop))
        cleanup_distributed()
