"""Making ODE-blocks cheap (issues #16 "Fast NODEs-UNet" and #18 "solvers as an experiment").

An ODE-block costs ``NFE x cost(f)``: every evaluation of f is two 3x3 convolutions over the
block's feature map, and an adaptive solver at the paper's tolerances evaluates f tens of times per
forward. Three records answer how cheap the trained networks of the study can be made, each with
its provenance (commit, command, device and its load, torch, date, wall time):

* :func:`bench_options` -> ``speed/bench.json``: one side-by-side bench, in one process with one
  thread, of every way to run the study's networks on the same 20 test patches: U-Net, ResNet
  U-Net, the single-block ODE-UNet (position 5), NODEs-UNet with dopri5 at its trained tolerances,
  the same network with the fixed-grid solver that calibration picks on the *validation* patches
  (:func:`calibration_pick`), its ONNX export (:mod:`bloodseg.export`; held against the U-Net's own
  ONNX export, so that the goal compares like with like), the narrow-f NODEs-UNet
  (``nodes-unet-h16``), and the RNODE-regularised NODEs-UNet with its unregularised twin when
  :mod:`bloodseg.paper.regularise` has trained them; then the ways to run the same weights faster
  (:func:`variant_options`): NODEs-UNet's dopri5 solved by torchode instead of torchdiffeq, the
  calibrated solver as an unrolled loop instead of torchdiffeq's fixed grid
  (:mod:`bloodseg.odesolve`), ``channels_last`` and ``torch.compile`` (inductor) of the U-Net and of
  the calibrated NODEs-UNet, each also held against the option it varies (``ratio_to_base``, same
  rounds) and kept only where that interval lies below 1 (``pays``). Rounds are interleaved (each round times every
  option on the 20 images, the order rotating), so that load from other processes falls on all of
  them alike; per option: the time for 20 images (median over rounds), the ratio to the U-Net's
  time *in the same round* (median over rounds, bootstrap interval over rounds), forward NFE,
  multiply-accumulates (MACs) actually executed, parameters, and the test MIoU on all test patches.
* :func:`blocks_learned` -> ``speed/blocks_learned.json``: what the trained ODE-blocks compute.
  For each trained ODE model (the study's units and the shipped checkpoint): the calibration pick,
  the NFE at the trained tolerance, and :func:`flow_measures` of every block on a few test images:
  ``||f(t, h(t))|| / ||h(t)||`` along the dopri5 trajectory, how far one Euler step
  ``h0 + f(0, h0)`` lands from the solution ``h(1)``, and how much h still moves between t = 0.5
  and t = 1. A block whose f is small next to h and whose solution one Euler step reproduces is a
  residual block in all but name.
* :func:`solver_experiment` -> ``speed/solvers.json``: the same network trained with its blocks
  solved by one Euler step (a residual network), by rk4 with 2 steps, and by dopri5 at the trained
  tolerances (the study's unit, reused): test MIoU, NFE, training time, inference time, and every
  trained network solved with every solver (does a network trained as a residual network improve
  when its blocks are solved accurately?).

``python -m bloodseg.paper.cheap record-bench|record-blocks|record-solvers`` writes them; the
chapter "Making ODE-blocks cheap" reads them. The study's trained units are read from
``--study-root`` (``$BLOODSEG_STUDY_ROOT``, default ``/tmp/study-wt``: ``runs/reproduce/train/study``
for the checkpoints, ``book/results/table{1,2}/study`` for their records); a unit is used only when
its record exists (it finished), and its ``best.pt`` is copied to a temporary folder first.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..calibrate import SOLVER_GRID, apply_solver, calibrate, check_solver, nominal_nfe, solver_label, trained_solver
from ..checkpoint import load_model
from ..errors import BloodsegError, SolverError
from ..io import write_bytes
from ..models import build_model, count_parameters
from ..ode import ADAPTIVE_METHODS, FIXED_GRID_METHODS, ODEBlock, ode_blocks, set_backend
from ..odesolve import UNROLLED_METHODS
from ..segmenter import Segmenter
from ..train import evaluate, fit
from . import stats
from .reproduce import git_commit, prepare_data, scale_recipe

__all__ = ["GOAL_RATIO", "FIXED_GRID", "FLOW_TIMES", "RECORD_BENCH", "RECORD_BLOCKS", "RECORD_SOLVERS",
           "study_root", "find_units", "copy_units", "load_record", "provenance_line", "count_macs",
           "calibration_pick", "test_scores", "interleaved_times", "ratio_summary", "flow_measures",
           "block_inputs", "variant_options", "bench_options", "blocks_learned", "solver_experiment", "bench_frame",
           "bench_findings", "bench_summary", "variants_frame", "variants_repeat_frame", "RECORD_BENCH_REPEAT", "variants_findings", "study_units_frame",
           "blocks_frame", "solvers_frame", "plot_frontier", "plot_flow", "plot_calibration",
           "plot_solvers", "plot_macs", "plot_regularisation", "floor_table", "plot_floor", "cross_frame",
           "plot_cross", "model_name", "blocks_summary_frame", "main"]

#: Issue #16's goal: NODEs-UNet at most 1.3x the U-Net's inference time.
GOAL_RATIO = 1.3
#: Calibration candidates: the fixed-grid settings of :data:`bloodseg.calibrate.SOLVER_GRID`, cheapest first.
FIXED_GRID = tuple(s for s in SOLVER_GRID if s["method"] in FIXED_GRID_METHODS)
#: Times (fractions of t1) at which the flow is measured along the dopri5 trajectory.
FLOW_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Records, relative to the results folder (``book/results`` from a clone's root).
RECORD_BENCH = "speed/bench.json"
#: The same bench command run again, later and at another load: how stable the variants' verdicts are.
RECORD_BENCH_REPEAT = "speed/bench-repeat.json"
RECORD_BLOCKS = "speed/blocks_learned.json"
RECORD_SOLVERS = "speed/solvers.json"
#: Where :mod:`bloodseg.paper.regularise` trains its two arms (``<arm>-seed<k>/best.pt`` + ``unit.json``).
REGULARISE_WORK = Path("runs/regularise")
#: Where :func:`solver_experiment` trains (``<arm>-seed<k>``); resumed when killed.
SOLVERS_WORK = Path("runs/cheap/solvers")
#: The arms of the solver experiment that are trained here (dopri5 is the study's unit).
SOLVER_ARMS = {"euler-1": {"method": "euler", "steps": 1}, "rk4-2": {"method": "rk4", "steps": 2}}


# ----------------------------------------------------------------------------- records and units

def _results_dir() -> Path:
    from .report import RESULTS_DIR
    return Path(RESULTS_DIR)


def load_record(name: str) -> dict | None:
    """A record under the results folder (e.g. :data:`RECORD_BENCH`), or None when not written yet."""
    path = _results_dir() / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def provenance_line(record: dict) -> str:
    """One line: when, which commit, device (and its load), torch, wall time, the command (from the
    record's ``provenance``, or its top level for records that keep them there)."""
    p = record.get("provenance") or record
    return (f"recorded {str(p.get('date', '?'))[:16].replace('T', ' ')} UTC, commit {str(p.get('git_commit', '?'))[:18]}, "
            f"{p.get('device', '?')}, torch {p.get('torch', '?')}, {p.get('wall_s', '?')} s, by `{p.get('command', '?')}`")


def _provenance(t0: float, command: str | None, extra: dict | None = None) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch thread(s); shared with other jobs, load average {load:.1f} at the end)")
    return {"git_commit": git_commit(), "command": command or shlex.join([Path(sys.executable).name] + sys.argv),
            "device": device, "torch": str(torch.__version__), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t0, 1), **(extra or {})}


def _write(record: dict, out) -> None:
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, (json.dumps(record, indent=1, default=_jsonable) + "\n").encode())


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return float(x)


def study_root(root=None) -> Path:
    """``root``, else ``$BLOODSEG_STUDY_ROOT``, else ``/tmp/study-wt`` (the study's work tree)."""
    return Path(root or os.environ.get("BLOODSEG_STUDY_ROOT") or "/tmp/study-wt")


def find_units(labels: Sequence[str], seeds: Sequence[int] = (0,), root=None, scale: str = "study") -> dict:
    """The finished study units among ``labels`` x ``seeds``: ``{"<label>-seed<k>": dict(label, seed,
    ckpt, record, test_miou, train_s, params, git_commit)}``. A unit counts when its record
    (``book/results/table1|table2/<scale>/<label>-seed<k>.json``) and its ``best.pt``
    (``runs/reproduce/train/<scale>/<label>-seed<k>/``) both exist."""
    root = study_root(root)
    out = {}
    for label in labels:
        for seed in seeds:
            name = f"{label}-seed{seed}"
            ckpt = root / "runs" / "reproduce" / "train" / scale / name / "best.pt"
            for table in ("table2", "table1"):
                rec_path = root / "book" / "results" / table / scale / f"{name}.json"
                if rec_path.is_file() and ckpt.is_file():
                    rec = json.loads(rec_path.read_text())
                    out[name] = dict(label=label, seed=int(seed), ckpt=str(ckpt), record=str(rec_path),
                                     test_miou=rec["test"]["miou"], train_s=rec.get("train_s"),
                                     params=rec.get("params"), git_commit=rec.get("git_commit"),
                                     history=rec.get("history"),
                                     per_image_miou=[p["miou"] for p in rec.get("per_image", [])])
                    break
    return out


def regularise_units(work=REGULARISE_WORK, seeds: Sequence[int] = (0,)) -> dict:
    """The finished units of :mod:`bloodseg.paper.regularise` (``unit.json`` and ``best.pt``):
    ``{"<arm>-seed<k>": dict(arm, seed, ckpt, unit, ode_reg, epochs, test_miou, test_nfe)}``."""
    out = {}
    for arm in ("plain", "regularised"):
        for seed in seeds:
            d = Path(work) / f"{arm}-seed{seed}"
            try:
                unit = json.loads((d / "unit.json").read_text())
            except (OSError, ValueError):
                continue
            if (d / "best.pt").is_file():
                out[f"{arm}-seed{seed}"] = dict(arm=arm, seed=int(seed), ckpt=str(d / "best.pt"), unit=str(d / "unit.json"),
                                                ode_reg=unit.get("ode_reg"), epochs=unit["recipe"]["train"]["epochs"],
                                                test_miou=unit.get("test_miou"), test_nfe=unit.get("test_nfe"),
                                                train_s=unit.get("train_s"))
    return out


def copy_units(units: dict, dest) -> dict:
    """Copy every unit's ``ckpt`` into ``dest`` (units still being written elsewhere are left
    alone); returns the units with ``ckpt`` pointing at the copies and ``source`` at the originals."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, unit in units.items():
        target = dest / f"{name}.pt"
        shutil.copyfile(unit["ckpt"], target)
        out[name] = dict(unit, ckpt=str(target), source=unit.get("source", unit["ckpt"]))
    return out


# ----------------------------------------------------------------------------- measuring

def count_macs(model: nn.Module, x: torch.Tensor) -> dict:
    """Multiply-accumulates one forward of ``model`` on ``x`` executes, per image, in millions.

    Every ``nn.Conv2d`` call is counted (output elements x input channels / groups x kernel area),
    inside the ODE-blocks once per evaluation of f. Returns ``dict(total_mmacs, backbone_mmacs,
    blocks={name: dict(nfe, f_mmacs_per_eval, mmacs)})``: what an option costs is the backbone plus
    NFE x cost(f) per block (GroupNorm, activations and the solver's own arithmetic come on top)."""
    blocks = ode_blocks(model)
    owner = {}
    for b in blocks:
        for m in b.func.modules():
            if isinstance(m, nn.Conv2d):
                owner[id(m)] = b
    spent = {id(b): 0 for b in blocks}
    total = [0]
    n = x.shape[0]

    def hook(m, inputs, out):
        macs = out.numel() // n * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total[0] += macs
        if id(m) in owner:
            spent[id(owner[id(m)])] += macs

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    rows = {}
    for i, b in enumerate(blocks):
        nfe = int(b.nfe_forward)
        rows[b.name or f"block {i}"] = dict(nfe=nfe, mmacs=spent[id(b)] / 1e6,
                                            f_mmacs_per_eval=spent[id(b)] / max(nfe, 1) / 1e6)
    in_blocks = sum(spent.values())
    return dict(total_mmacs=total[0] / 1e6, backbone_mmacs=(total[0] - in_blocks) / 1e6, blocks=rows)


def _nfe_of(model) -> dict:
    return {b.name or f"block {i}": int(b.nfe_forward) for i, b in enumerate(ode_blocks(model))}


def calibration_pick(model: nn.Module, val_samples, max_drop_pp: float = 0.3, grid=FIXED_GRID,
                     log: Callable | None = None) -> dict:
    """Calibrate ``model`` on VALIDATION samples (:func:`bloodseg.calibrate.calibrate`, raw network
    masks, MIoU) and pick the cheapest fixed-grid setting of ``grid`` (fewest f-evaluations per
    block, :func:`~bloodseg.calibrate.nominal_nfe`; ties: the earlier in ``grid``) whose score is
    within ``max_drop_pp`` percentage points of the trained solver's; None (the trained solver)
    when none is. The rule counts evaluations, not measured seconds, so the pick does not depend
    on the load of a shared machine; calibrate's own time-based choice is kept as
    ``calibrate_time_pick``. The model's solver is left as trained."""
    seg = Segmenter(model)
    result = calibrate(seg, list(val_samples), max_drop_pp=max_drop_pp, grid=grid, time_images=0, warmup=1,
                       log=log)
    apply_solver(model, None, seg.trained)
    rows = [dict(label=r["label"], solver=r["solver"], score=r["score"], drop_pp=r["drop_pp"], ok=r["ok"],
                 nfe_per_block=r["nfe_per_block"], nfe_total=float(sum(r["nfe_per_block"].values())),
                 nominal_nfe_per_block=None if r["solver"] is None else nominal_nfe(r["solver"]),
                 seconds_per_image=r["pass_seconds_per_image"], error=r["error"])
            for r in result["rows"]]
    eligible = [r for r in rows[1:] if r["ok"] and r["drop_pp"] is not None and r["drop_pp"] <= max_drop_pp + 1e-9]
    best = min(eligible, key=lambda r: r["nominal_nfe_per_block"]) if eligible else None
    return dict(pick=None if best is None else best["solver"], pick_label="trained" if best is None else best["label"],
                pick_drop_pp=0.0 if best is None else best["drop_pp"], reference_score=result["reference"]["score"],
                reference_nfe_per_block=result["reference"]["nfe_per_block"], max_drop_pp=float(max_drop_pp),
                n_images=result["n_images"], calibrate_time_pick=result["chosen_label"], rows=rows,
                rule=f"cheapest fixed-grid setting (f-evaluations per block) within {max_drop_pp:g} pp of the trained "
                     "solver's validation MIoU (raw network masks); trained solver when none is")


def test_scores(model: nn.Module, test_set, n_boot: int = 2000, batch_size: int = 4) -> dict:
    """MIoU and PA of one confusion matrix over every test patch (as the study's records), the
    per-image MIoU and its mean with a bootstrap interval over images."""
    s = evaluate(model, test_set, n_timed=0, per_image=True, batch_size=batch_size)
    per = [float(p["miou"]) for p in s["per_image"]]
    ci = stats.mean_ci(np.array(per)[None, :], n_boot=n_boot)
    return dict(miou=float(s["miou"]), pa=float(s["pa"]), per_image_miou=per, mean_image_miou=ci["mean"],
                mean_image_miou_ci=list(ci["ci"]), n_images=len(per))


def interleaved_times(nets: dict, images: Sequence[torch.Tensor], rounds: int = 7, warmup: int = 1) -> dict:
    """Seconds for all ``images`` (passed one at a time) of each network in ``nets`` ({label:
    module}), in ``rounds`` rounds: every round times every network once, the order rotating by one
    each round, so that a burst of load from another process falls on all of them alike. Returns
    ``dict(times={label: [s per round]}, nfe={label: {block: mean forward NFE per image}})``."""
    labels = list(nets)
    times = {label: [] for label in labels}
    nfe = {label: {} for label in labels}
    with torch.inference_mode():
        for label in labels:
            for x in images[:warmup]:
                nets[label](x)
        for r in range(rounds):
            k = r % len(labels)
            for label in labels[k:] + labels[:k]:
                net, spent = nets[label], 0.0
                for x in images:
                    t0 = time.perf_counter()
                    net(x)
                    spent += time.perf_counter() - t0
                    if r == 0:
                        for name, v in _nfe_of(net).items():
                            nfe[label][name] = nfe[label].get(name, 0.0) + v / len(images)
                times[label].append(spent)
    return dict(times=times, nfe=nfe)


def _median_ci(values: np.ndarray, n_boot: int, seed: int = 0, level: float = 0.95) -> list:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    meds = np.median(values[idx], axis=1)
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(meds, [tail, 100 - tail])]


def ratio_summary(times: dict, reference: str, n_images: int, n_boot: int = 5000) -> dict:
    """Per label: time for ``n_images`` (median over rounds and all rounds), and the ratio to
    ``reference``'s time of the same round: its median over rounds and a bootstrap 95% interval
    of that median (rounds resampled)."""
    ref = np.asarray(times[reference], dtype=float)
    out = {}
    for label, t in times.items():
        t = np.asarray(t, dtype=float)
        ratios = t / ref
        out[label] = dict(time_s_median=float(np.median(t)), time_s_rounds=[float(v) for v in t],
                          time_per_image_s=float(np.median(t)) / n_images, ratio_median=float(np.median(ratios)),
                          ratio_ci=_median_ci(ratios, n_boot), ratio_rounds=[float(v) for v in ratios])
    return out


def block_inputs(model: nn.Module, run: Callable[[], object]) -> dict:
    """The input of every ODE-block of ``model`` while ``run()`` runs (its last call): {name: tensor}."""
    seen, hooks = {}, []
    for i, b in enumerate(ode_blocks(model)):
        name = b.name or f"block {i}"
        hooks.append(b.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach().clone())))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def flow_measures(block: ODEBlock, h0: torch.Tensor, times: Sequence[float] = FLOW_TIMES) -> dict:
    """What the flow of ``block`` does to ``h0`` (``N x C x H x W``; each sample measured alone,
    then averaged over the N samples). The trajectory is solved by dopri5 at the block's own
    tolerances (at rtol = atol = 1e-5 when the block is fixed-grid), read at ``times`` x t1 (they
    must include 0, 0.5 and 1).

    * ``f_ratio``: ``{t: ||f(t, h(t))|| / ||h(t)||}``, how fast h moves, relative to its size;
    * ``change``: ``||h(1) - h(0)|| / ||h(0)||``, how much the block changes its input at all;
    * ``late_change``: ``||h(1) - h(0.5)|| / ||h(0.5)||``, how much h still moves in the second half;
    * ``euler_diff``: ``||h(1) - (h0 + f(0, h0))|| / ||h(1)||``, how far one Euler step (the residual
      block with the same f) lands from the solution, relative to the solution;
    * ``euler_diff_of_change``: the same distance relative to ``||h(1) - h(0)||``: the share of the
      block's effect that one Euler step gets wrong (nan when h moves by less than 1e-6 of its norm,
      i.e. by rounding alone: dopri5 reads h at the requested times by interpolation).
    Norms are Frobenius norms over a sample's whole feature map."""
    times = [float(t) for t in times]
    for need in (0.0, 0.5, 1.0):
        if need not in times:
            raise BloodsegError(f"flow_measures needs t = {need} among its times; got {times}")
    if times != sorted(times):
        raise BloodsegError(f"flow_measures needs increasing times; got {times}")
    from torchdiffeq import odeint
    func, t1 = block.func, block.t1
    adaptive = block.method in ADAPTIVE_METHODS
    rtol, atol = (block.rtol, block.atol) if adaptive else (1e-5, 1e-5)
    with torch.inference_mode():
        t = torch.tensor(times, dtype=h0.dtype, device=h0.device) * t1
        traj = odeint(func, h0, t, rtol=rtol, atol=atol, method="dopri5",
                      options=dict(max_num_steps=block.max_steps))
        at = {tt: traj[i] for i, tt in enumerate(times)}
        ratio = {tt: (_norms(func(t[i], traj[i])) / _norms(traj[i]).clamp_min(1e-30)) for i, tt in enumerate(times)}
        h_start, h_half, h_end = at[0.0], at[0.5], at[1.0]
        euler = h_start + t1 * func(torch.zeros((), dtype=h0.dtype, device=h0.device), h_start)
        moved = _norms(h_end - h_start)
        miss = _norms(h_end - euler)
        change = moved / _norms(h_start).clamp_min(1e-30)
        late = _norms(h_end - h_half) / _norms(h_half).clamp_min(1e-30)
        euler_diff = miss / _norms(h_end).clamp_min(1e-30)
        still = moved <= 1e-6 * _norms(h_start)        # moved by rounding only (the solver's interpolation)
        of_change = torch.where(still, torch.full_like(moved, float("nan")), miss / moved.clamp_min(1e-30))
    mean = lambda v: float(v.double().mean())   # noqa: E731
    return dict(f_ratio={f"{tt:g}": mean(v) for tt, v in ratio.items()}, change=mean(change), late_change=mean(late),
                euler_diff=mean(euler_diff), euler_diff_of_change=mean(of_change),
                solver=dict(method="dopri5", rtol=rtol, atol=atol), n_samples=int(h0.shape[0]),
                per_sample=dict(euler_diff=[float(v) for v in euler_diff], change=[float(v) for v in change]))


# ----------------------------------------------------------------------------- 1. the side-by-side bench

def _load(ckpt) -> nn.Module:
    torch.manual_seed(0)
    return load_model(ckpt, device="cpu").eval()


class _ChannelsLast(nn.Module):
    """``net`` with its weights in channels_last memory format; the NCHW input a caller passes is
    converted inside, so the conversion is part of the time."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


def _dynamo_counts() -> dict:
    """dynamo's running totals of captured graphs and graph breaks (internal counters: empty when
    this torch does not keep them)."""
    try:
        from torch._dynamo.utils import counters
        return dict(graphs=int(counters["stats"]["unique_graphs"]), graph_breaks=int(sum(counters["graph_break"].values())))
    except Exception:        # noqa: BLE001
        return {}


def _compile_alone(net: nn.Module, backend: str):
    """``torch.compile`` of ``net`` through a function with a code object of its own, static shapes.

    dynamo keeps its compiled code per code object: two networks of one class (the U-Net and
    NODEs-UNet are both ``UNet``) compiled in one process share ``UNet.forward``'s cache, and every
    call of one then first checks the other's guards (about 2 ms a call, measured: a compiled U-Net
    slower than the eager one). A process that compiles one network does not pay that; a call
    through its own function is what this bench times for each."""
    space = {"net": net}
    exec(compile("def forward(x):\n    return net(x)\n", f"<bloodseg: compiled network {id(net):x}>", "exec"), space)
    return torch.compile(space["forward"], backend=backend, dynamic=False)


class _Compiled(nn.Module):
    """``net`` called through :func:`_compile_alone`; a module still (its parameters, its ODE-blocks'
    NFE counters, ``eval()``), whose forward is the compiled one."""

    def __init__(self, net: nn.Module, backend: str):
        super().__init__()
        self.net = net
        self._forward = _compile_alone(net, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


class _InductorCache:
    """``TORCHINDUCTOR_CACHE_DIR`` = ``folder`` inside the block (a fresh folder: a cold compile,
    not one read back from an earlier run's cache), restored afterwards."""

    def __init__(self, folder):
        self.folder, self.before = folder, None

    def __enter__(self):
        self.before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if self.folder is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder)

    def __exit__(self, *exc):
        if self.folder is None:
            return
        if self.before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.before


def variant_options(fresh: dict, pick: dict | None, pick_label: str, example: torch.Tensor,
                    compile_backend: str | None = "inductor", compile_cache=None,
                    log: Callable = print) -> tuple[dict, dict]:
    """The ways to run the same trained weights faster: ``({label: dict(net, base, meta)}, notes)``.

    ``fresh``: ``{"unet": make, "nodes-unet": make}``, each ``make()`` a new copy of that trained
    network in evaluation mode; ``pick``: NODEs-UNet's calibrated solver (``pick_label``, e.g.
    ``euler-1``; None: no calibrated variants). Variants: ``nodes-unet torchode`` (the trained dopri5
    solved by torchode), ``<calibrated> unrolled`` (the calibrated fixed grid as a plain loop), and for
    the U-Net and the calibrated NODEs-UNet ``channels_last`` and ``compiled`` (``torch.compile`` with
    ``compile_backend``; None: none). A compiled network is compiled here by one call on ``example``
    (its ``compile_s``, kept out of the bench's times), counting the graphs dynamo captured and the
    graph breaks between them; each through a function of its own (:func:`_compile_alone`), with
    inductor's cache in ``compile_cache`` (a fresh folder: a cold compile; None: inductor's own). ``base`` is the option each varies; ``notes`` say, per variant that
    could not run, why (the error's text)."""
    out, notes = {}, {}
    cal = f"nodes-unet {pick_label}" if pick is not None else None

    def calibrated():
        net = fresh["nodes-unet"]()
        apply_solver(net, pick)
        return net

    if "nodes-unet" in fresh:
        try:
            import torchode  # noqa: F401  (an optional backend: say so when it is missing)
            net = fresh["nodes-unet"]()
            set_backend(net, "torchode")
            out["nodes-unet torchode"] = dict(net=net, base="nodes-unet", meta=dict(
                name="NODEs-UNet, dopri5 by torchode", backend="torchode", variant="torchode"))
        except (ImportError, BloodsegError) as exc:
            notes["nodes-unet torchode"] = f"{type(exc).__name__}: {exc}"
        if pick is not None and pick["method"] in UNROLLED_METHODS:
            net = calibrated()
            set_backend(net, "unrolled")
            out[f"{cal} unrolled"] = dict(net=net, base=cal, meta=dict(
                name="NODEs-UNet, calibrated, unrolled loop", backend="unrolled", variant="unrolled"))
        elif pick is not None:
            notes[f"{cal} unrolled"] = f"the unrolled loop solves {', '.join(UNROLLED_METHODS)} only"
    makers = [("unet", fresh.get("unet"), "U-Net")]
    if cal is not None and "nodes-unet" in fresh:
        makers.append((cal, calibrated, "NODEs-UNet, calibrated"))
    for base, make, name in makers:
        if make is None:
            continue
        out[f"{base} channels_last"] = dict(net=_ChannelsLast(make()), base=base, meta=dict(
            name=f"{name}, channels_last", variant="channels_last"))
        if not compile_backend:
            continue
        import logging
        quiet = logging.getLogger("torch._dynamo")
        level = quiet.level
        quiet.setLevel(logging.ERROR)       # one graph-break warning per break: counted below instead
        try:
            log(f"{base}: torch.compile (backend {compile_backend}) ...")
            before = _dynamo_counts()
            with torch.inference_mode(), _InductorCache(compile_cache):
                compiled = _Compiled(make(), compile_backend)
                t0 = time.perf_counter()
                compiled(example)
                compile_s = time.perf_counter() - t0
            after = _dynamo_counts()
            out[f"{base} compiled"] = dict(net=compiled, base=base, meta=dict(
                name=f"{name}, torch.compile", variant="compiled", compile_backend=compile_backend,
                compile_s=compile_s, compile_cache="cold" if compile_cache is not None else "inductor's default",
                **{k: after[k] - before[k] for k in after}))
        except Exception as exc:       # noqa: BLE001 -- inductor's failures are many; the record keeps the text
            notes[f"{base} compiled"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        finally:
            quiet.setLevel(level)
    return out, notes


def bench_options(units: dict | None = None, scale: str = "study", seed: int = 0, n_images: int = 20, rounds: int = 7,
                  max_drop_pp: float = 0.3, regularise_work=REGULARISE_WORK, onnx: bool = True, root=None,
                  width: int | None = None, variants: bool = True, compile_backend: str | None = "inductor",
                  notes: str = "", out=None, command: str | None = None, log: Callable = print) -> dict:
    """The side-by-side bench of every option (see the module docstring); the record, also
    written to ``out`` (JSON) when given.

    ``units``: ``{label: unit}`` with at least ``unet`` (the reference of the ratios) and any of
    ``resunet``, ``ode-unet-5``, ``nodes-unet``, ``nodes-unet-h16`` (a unit is a dict with ``ckpt``,
    or a checkpoint path); default: the study's finished units of ``seed`` (:func:`find_units`),
    copied to a temporary folder. ``regularise_work``: the folder of
    :mod:`bloodseg.paper.regularise`'s units (its ``plain``/``regularised`` arms of ``seed`` are
    added when both finished; None: never). ``variants``: add :func:`variant_options` (torchode,
    unrolled, channels_last, and ``torch.compile`` with ``compile_backend`` unless it is None).
    ``width`` overrides the recipe's (tests); ``notes`` is stored in the record."""
    t_start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    recipe = scale_recipe(scale)
    if width is not None:
        recipe = recipe.replace(**{"model.width": width})
    tmp = Path(tempfile.mkdtemp(prefix="bloodseg-cheap-"))
    try:
        if units is None:
            units = {u["label"]: u for u in find_units(["unet", "resunet", "ode-unet-5", "nodes-unet", "nodes-unet-h16"],
                                                       (seed,), root, scale).values()}
        units = {k: (v if isinstance(v, dict) else dict(ckpt=str(v))) for k, v in units.items()}
        if "unet" not in units:
            raise BloodsegError("bench_options needs a trained U-Net unit (the reference of the ratios)")
        reg = regularise_units(regularise_work, (seed,)) if regularise_work else {}
        if len(reg) < 2:
            reg = {}
        units = copy_units(units, tmp / "study")
        reg = copy_units(reg, tmp / "regularise") if reg else {}
        log(f"preparing the {scale} data ...")
        data = prepare_data(recipe)
        val, test = data["val"].samples, data["test"]
        images = [test[i][0][None] for i in range(min(n_images, len(test)))]
        options: dict = {}   # label -> dict(net, meta)

        def add(label, net, **meta):
            options[label] = dict(net=net, meta=meta)

        names = {"unet": "U-Net", "resunet": "ResNet U-Net", "ode-unet-5": "ODE-UNet (block 5)",
                 "nodes-unet": "NODEs-UNet", "nodes-unet-h16": "NODEs-UNet, narrow f (hidden 16)"}
        calibrations = {}
        for label in ("unet", "resunet", "ode-unet-5", "nodes-unet", "nodes-unet-h16"):
            if label not in units:
                continue
            u = units[label]
            net = _load(u["ckpt"])
            has_ode = bool(ode_blocks(net))
            add(label, net, model=label, name=names[label], unit=u.get("source", u["ckpt"]), solver="trained"
                if has_ode else None, trained_solver=trained_solver(net) if has_ode else None, runtime="torch",
                study_record_miou=u.get("test_miou"))
            if onnx and label == "unet":       # the reference of the ONNX options: the same runtime
                from ..export import OnnxNetwork, export_onnx
                path = export_onnx(Segmenter(net), tmp / "unet.onnx")
                add("unet onnx", OnnxNetwork(path, threads=torch.get_num_threads()), model=label,
                    name=f"{names[label]}, ONNX", unit=u.get("source", u["ckpt"]), solver=None, runtime="onnxruntime",
                    macs_from="unet", params_from="unet", nfe_nominal={})
            if has_ode:
                log(f"{label}: calibrating on {len(val)} validation patches ...")
                cal = calibration_pick(net, val, max_drop_pp)
                calibrations[label] = cal
                log(f"  pick {cal['pick_label']} (drop {cal['pick_drop_pp']:.3f} pp; calibrate's time pick "
                    f"{cal['calibrate_time_pick']})")
                if cal["pick"] is not None:
                    cnet = _load(u["ckpt"])
                    apply_solver(cnet, cal["pick"])
                    add(f"{label} {cal['pick_label']}", cnet, model=label, name=f"{names[label]}, calibrated",
                        unit=u.get("source", u["ckpt"]), solver=cal["pick_label"], spec=cal["pick"], runtime="torch",
                        calibrated=True)
                    if onnx and label == "nodes-unet":
                        from ..export import OnnxNetwork, export_onnx
                        path = export_onnx(Segmenter(cnet, solver=cal["pick"]), tmp / "nodes-unet.onnx")
                        add(f"{label} {cal['pick_label']} onnx", OnnxNetwork(path, threads=torch.get_num_threads()),
                            model=label, name=f"{names[label]}, calibrated, ONNX", unit=u.get("source", u["ckpt"]),
                            solver=cal["pick_label"], spec=cal["pick"], runtime="onnxruntime", calibrated=True,
                            macs_from=f"{label} {cal['pick_label']}", params_from=f"{label} {cal['pick_label']}",
                            nfe_nominal={b.name: nominal_nfe(cal["pick"]) for b in ode_blocks(cnet)})
        variant_notes = {} if torch.cuda.is_available() else {
            "bf16 on CUDA": "not measured: this bench runs on a CPU, and this machine has no CUDA device"}
        if variants:
            fresh = {k: (lambda c=units[k]["ckpt"]: _load(c)) for k in ("unet", "nodes-unet") if k in units}
            cal = calibrations.get("nodes-unet", {})
            found, more = variant_options(fresh, cal.get("pick"), cal.get("pick_label", "trained"), images[0],
                                          compile_backend=compile_backend, compile_cache=tmp / "inductor", log=log)
            variant_notes.update(more)
            for label, v in found.items():
                add(label, v["net"], **{**options[v["base"]]["meta"], **v["meta"], "base": v["base"],
                                        "macs_from": v["base"], "params_from": v["base"]})
        for name, u in reg.items():
            add(f"nodes-unet {u['arm']} {u['epochs']}ep", _load(u["ckpt"]), model="nodes-unet",
                name=f"NODEs-UNet, {u['epochs']} epochs, " + ("RNODE-regularised" if u["arm"] == "regularised" else "unregularised"),
                unit=u["source"], solver="trained", runtime="torch", ode_reg=u["ode_reg"], epochs=u["epochs"],
                regularise_unit_miou=u["test_miou"])
        log(f"timing {len(options)} options, {rounds} rounds of {len(images)} images ...")
        timing = interleaved_times({k: v["net"] for k, v in options.items()}, images, rounds=rounds)
        summary = ratio_summary(timing["times"], "unet", len(images))
        by_reference = {"unet": summary}

        def same_runtime(label, meta):     # the U-Net run the option's way: ONNX, channels_last, compiled
            ref = ("unet onnx" if meta["runtime"] == "onnxruntime" else f"unet {meta['variant']}"
                   if meta.get("variant") in ("channels_last", "compiled") else "unet")
            ref = ref if ref in timing["times"] else "unet"
            if ref not in by_reference:
                by_reference[ref] = ratio_summary(timing["times"], ref, len(images))
            return ref, by_reference[ref][label]
        rows = []
        for label, o in options.items():
            meta, net = o["meta"], o["net"]
            log(f"{label}: test scores and MACs ...")
            # a compiled network sees the shape it was compiled for (one patch): no recompilation
            scores = test_scores(net, test, batch_size=1 if meta.get("variant") == "compiled" else 4)
            macs_net = options[meta["macs_from"]]["net"] if "macs_from" in meta else net
            macs = count_macs(macs_net, images[0])
            nfe = meta.get("nfe_nominal") or timing["nfe"][label]
            params = count_parameters(options[meta["params_from"]]["net"] if "params_from" in meta else net)
            s = summary[label]
            same_ref, s_same = same_runtime(label, meta)
            base = ratio_summary(timing["times"], meta["base"], len(images))[label] if "base" in meta else None
            meta.setdefault("backend", ("torchdiffeq" if nfe and meta["runtime"] == "torch" else None))
            row = dict(option=label, **{k: v for k, v in meta.items() if k not in ("macs_from", "params_from", "nfe_nominal")},
                       params=params, nfe_forward=nfe, nfe_total=float(sum(nfe.values())),
                       **{f"time_{len(images)}_s": s["time_s_median"]}, time_s_rounds=s["time_s_rounds"],
                       time_per_image_s=s["time_per_image_s"], ratio_to_unet=s["ratio_median"],
                       ratio_ci=s["ratio_ci"], ratio_rounds=s["ratio_rounds"],
                       ratio_same_runtime=s_same["ratio_median"], ratio_same_runtime_ci=s_same["ratio_ci"],
                       same_runtime_reference=same_ref,
                       within_goal=("holds" if s_same["ratio_ci"][1] <= GOAL_RATIO else "does not hold"
                                    if s_same["ratio_ci"][0] > GOAL_RATIO else "inconclusive"),
                       ratio_to_base=None if base is None else base["ratio_median"],
                       ratio_to_base_ci=None if base is None else base["ratio_ci"],
                       pays=None if base is None else _pays(base["ratio_ci"]),
                       mmacs=macs["total_mmacs"], backbone_mmacs=macs["backbone_mmacs"], macs_blocks=macs["blocks"],
                       test_miou=scores["miou"], test_pa=scores["pa"], mean_image_miou=scores["mean_image_miou"],
                       mean_image_miou_ci=scores["mean_image_miou_ci"], per_image_miou=scores["per_image_miou"])
            rows.append(row)
        ref = next(r for r in rows if r["option"] == "unet")
        for r in rows:
            r["macs_ratio_to_unet"] = r["mmacs"] / ref["mmacs"]
            d = stats.paired_bootstrap(np.array(ref["per_image_miou"])[None], np.array(r["per_image_miou"])[None], n_boot=2000)
            r["miou_diff_to_unet_pp"] = dict(diff=100 * d["diff"], ci=[100 * c for c in d["ci"]])
        record = dict(
            what=f"every way to run the {scale} study's trained networks (seed {seed}), side by side in one process "
                 f"with {torch.get_num_threads()} thread(s): time for {len(images)} test patches "
                 f"({tuple(images[0].shape[-2:])} px) passed one at a time, {rounds} interleaved rounds (the order "
                 "rotating); ratio_to_unet = the option's time / the (PyTorch) U-Net's time in the same round, median "
                 "over rounds, 95% bootstrap interval over rounds; ratio_same_runtime = the same against the U-Net in "
                 "the option's own runtime (same_runtime_reference: an ONNX option against the ONNX U-Net, a channels_last "
                 "or compiled variant against the U-Net in channels_last or compiled); NFE = forward evaluations of f "
                 "per block per image; MACs = "
                 "multiply-accumulates of the convolutions executed for one patch; test MIoU = one confusion "
                 f"matrix over all {len(test)} test patches (per-image mean with a 95% interval over images); the "
                 f"calibrated solver is picked on the {len(val)} validation patches only",
            goal=f"NODEs-UNet at most {GOAL_RATIO}x the U-Net's inference time (issue #16); 'within_goal' compares "
                 "the interval of ratio_same_runtime with it (holds: all of it below, does not hold: all above)",
            variants="a variant (torchode, unrolled, channels_last, compiled) runs the weights of its 'base' option; "
                     "ratio_to_base = its time / the base's time in the same round (median over rounds, 95% bootstrap "
                     "interval); pays: 'yes' when all of that interval is below 1, 'no' when all of it is above 1, "
                     "'no difference measured' otherwise; compile_s (the first call, compilation included) is not in "
                     "the times; test MIoU of a compiled option is scored one patch at a time (the compiled shape)",
            scale=scale, seed=seed, n_images=len(images), rounds=rounds, image_size=list(images[0].shape[-2:]),
            n_test=len(test), n_val=len(val), calibration=calibrations, rows=rows, variant_notes=variant_notes,
            notes=notes,
            compile_backend=compile_backend if variants else None,
            units={k: dict(source=v.get("source"), record=v.get("record"), git_commit=v.get("git_commit"))
                   for k, v in {**units, **reg}.items()},
            recipe=recipe.to_dict())
        load_end = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
        record["provenance"] = _provenance(t_start, command, {"threads": torch.get_num_threads(),
                                                              "load_average_1_5_15_min": dict(start=load_start, end=load_end)})
        _write(record, out)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pays(ci) -> str:
    return "yes" if ci[1] < 1 else "no" if ci[0] > 1 else "no difference measured"


def bench_frame(record: dict):
    """The bench as a table (pandas), one row per option."""
    import pandas as pd
    n = record["n_images"]
    rows = [{"option": r["option"], "runtime": r["runtime"] if not r.get("backend") else f"{r['runtime']} ({r['backend']})",
             "solver": r["solver"] or "-", "params": r["params"], "NFE": r["nfe_total"], "MMACs": r["mmacs"],
             f"time {n} img (s)": r[f"time_{n}_s"], "x U-Net": r["ratio_to_unet"],
             "x U-Net 95%": f"{r['ratio_ci'][0]:.2f}-{r['ratio_ci'][1]:.2f}",
             "x U-Net same runtime": r.get("ratio_same_runtime", r["ratio_to_unet"]),
             f"<= {GOAL_RATIO}x": r["within_goal"],
             "x base (95%)": "" if r.get("ratio_to_base") is None else
             f"{r['ratio_to_base']:.2f} ({r['ratio_to_base_ci'][0]:.2f}-{r['ratio_to_base_ci'][1]:.2f})",
             "pays": r.get("pays") or "", "test MIoU": r["test_miou"]}
            for r in record["rows"]]
    return pd.DataFrame(rows).set_index("option")


def _x(r: dict, key: str = "ratio_to_unet", ci: str = "ratio_ci") -> str:
    return f"{r[key]:.2f}x ({r[ci][0]:.2f}-{r[ci][1]:.2f})"


_GOAL = {"holds": "is met (the whole interval lies below {g}x)", "does not hold": "is missed (the whole interval lies "
         "above {g}x)", "inconclusive": "is undecided (the interval contains {g}x)"}
_PAYS = {"yes": "it pays (the whole interval lies below 1)", "no": "it costs time (the whole interval lies above 1)",
         "no difference measured": "no difference the rounds can resolve (the interval contains 1)"}


def bench_findings(record: dict) -> str:
    """What the bench says about the options (variants apart), as Markdown bullets; every number is
    the record's."""
    rows = {r["option"]: r for r in record["rows"]}
    goal = lambda r: _GOAL[r["within_goal"]].format(g=GOAL_RATIO)   # noqa: E731
    time_key = f"time_{record['n_images']}_s"
    out = []
    d = rows.get("nodes-unet")
    pick = record["calibration"].get("nodes-unet", {}).get("pick_label")
    c = rows.get(f"nodes-unet {pick}")
    if d:
        out.append(f"**dopri5 at the trained tolerances** ({d['nfe_total']:.0f} evaluations of $f$ per patch) makes "
                   f"NODEs-UNet take {_x(d)} the U-Net's time, for {d['macs_ratio_to_unet']:.1f}x its MACs.")
        n = rows.get("nodes-unet-h16")
        if n:
            out[-1] += (f" The narrow $f$ (`nodes-unet-h16`) cuts the MACs to {n['macs_ratio_to_unet']:.1f}x and the "
                        f"time to {_x(n)}, at {n['nfe_total']:.0f} evaluations.")
    if d and c:
        out.append(f"**The calibrated solver** ({pick}, chosen on the validation patches, next section) scores "
                   f"{100 * c['test_miou']:.2f}% test MIoU against dopri5's {100 * d['test_miou']:.2f}% and runs "
                   f"{d[time_key] / c[time_key]:.1f} times faster: "
                   f"{_x(c)} the U-Net's time, so the {GOAL_RATIO}x goal {goal(c)}.")
    co, uo = rows.get(f"nodes-unet {pick} onnx"), rows.get("unet onnx")
    if co and uo:
        out.append(f"**Exported to ONNX** the calibrated network takes {_x(co)} the PyTorch U-Net's time, but "
                   f"onnxruntime speeds up the U-Net too ({_x(uo)}); like with like, against the ONNX U-Net, it takes "
                   f"{_x(co, 'ratio_same_runtime', 'ratio_same_runtime_ci')}: the goal {goal(co)}. Its MACs are "
                   f"{co['macs_ratio_to_unet']:.2f}x the U-Net's, a floor that no runtime goes under.")
    ode = [r for r in record["rows"] if r["nfe_total"] > 0 and not r.get("variant")]
    for verdict, words in (("holds", "meet the goal"), ("inconclusive", "are undecided about it")):
        those = [f"`{r['option']}` ({r.get('ratio_same_runtime', r['ratio_to_unet']):.2f}x)" for r in ode
                 if r["within_goal"] == verdict]
        if those:
            out.append(f"Options with ODE-blocks that {words}: " + ", ".join(those) + ".")
    out.append("The test MIoU differences between the networks are those of one seed; chapter 6 showed that "
               "seed-to-seed differences in this study are as large as any difference here.")
    return "\n".join(f"- {line}" for line in out)


def variants_frame(record: dict):
    """The variants of the bench (same weights, run another way), one row each, against their base."""
    import pandas as pd
    base = {r["option"]: r for r in record["rows"]}
    rows = []
    for r in record["rows"]:
        if not r.get("variant"):
            continue
        b = base[r["base"]]
        rows.append({"variant": r["option"], "of": r["base"], "x base": r["ratio_to_base"],
                     "x base 95%": f"{r['ratio_to_base_ci'][0]:.2f}-{r['ratio_to_base_ci'][1]:.2f}", "pays": r["pays"],
                     "x U-Net": r["ratio_to_unet"], "NFE": r["nfe_total"], "NFE of base": b["nfe_total"],
                     "test MIoU": r["test_miou"], "MIoU - base (pp)": 100 * (r["test_miou"] - b["test_miou"]),
                     "compile s": r.get("compile_s"), "graph breaks": r.get("graph_breaks")})
    return pd.DataFrame(rows).set_index("variant") if rows else None


def variants_repeat_frame(record: dict, repeat: dict):
    """Each variant's ratio to its base in ``record`` and in ``repeat`` (the same command run again),
    with both verdicts: a verdict that the load of a shared machine can flip is not a finding."""
    import pandas as pd
    again = {r["option"]: r for r in repeat["rows"]}
    rows = []
    for r in record["rows"]:
        if not r.get("variant") or r["option"] not in again:
            continue
        a = again[r["option"]]
        rows.append({"variant": r["option"], "x base": r["ratio_to_base"],
                     "95%": f"{r['ratio_to_base_ci'][0]:.2f}-{r['ratio_to_base_ci'][1]:.2f}", "pays": r["pays"],
                     "x base, repeat": a["ratio_to_base"],
                     "95%, repeat": f"{a['ratio_to_base_ci'][0]:.2f}-{a['ratio_to_base_ci'][1]:.2f}", "pays, repeat": a["pays"]})
    return pd.DataFrame(rows).set_index("variant") if rows else None


def _kept(record: dict, repeat: dict | None) -> tuple[list, list, list]:
    """Variants that pay (in ``record`` and, when given, in ``repeat`` too), that pay in one run only,
    and the rest."""
    again = {r["option"]: r for r in (repeat or {}).get("rows", [])}
    kept, once, rest = [], [], []
    for r in record["rows"]:
        if not r.get("variant"):
            continue
        other = again.get(r["option"])
        if r["pays"] == "yes" and (repeat is None or (other is not None and other["pays"] == "yes")):
            kept.append(r)
        elif r["pays"] == "yes" or (other is not None and other["pays"] == "yes"):
            once.append(r)
        else:
            rest.append(r)
    return kept, once, rest


def variants_findings(record: dict, repeat: dict | None = None) -> str:
    """What each variant of the bench does against its base, what is kept (it pays in ``record`` and,
    when given, in ``repeat``, the same command run again), and what could not be measured, as
    Markdown bullets; every number is the records'."""
    rows = {r["option"]: r for r in record["rows"]}
    out = []
    for r in record["rows"]:
        v = r.get("variant")
        if not v:
            continue
        b = rows[r["base"]]
        paid = f"{_x(r, 'ratio_to_base', 'ratio_to_base_ci')} the time of `{r['base']}`: {_PAYS[r['pays']]}"
        if v == "torchode":
            out.append(f"**torchode** solves the trained dopri5 with {r['nfe_total']:.0f} evaluations of $f$ per patch "
                       f"(torchdiffeq: {b['nfe_total']:.0f}), test MIoU {100 * r['test_miou']:.2f}% (torchdiffeq: "
                       f"{100 * b['test_miou']:.2f}%), and takes {paid}.")
        elif v == "unrolled":
            same = "the same masks, bit for bit" if r["test_miou"] == b["test_miou"] else "not the same masks"
            out.append(f"**The unrolled loop** ({r['base'].split()[-1]} as plain Python) gives {same} (test MIoU "
                       f"{100 * r['test_miou']:.2f}%) and takes {paid}.")
        elif v == "channels_last":
            out.append(f"**channels_last** for `{r['base']}` takes {paid}.")
        elif v == "compiled":
            breaks = r.get("graph_breaks")
            graph = "" if breaks is None else f", {r.get('graphs')} graph(s) with {breaks} graph break(s)"
            out.append(f"**torch.compile** ({r.get('compile_backend')}) of `{r['base']}`: compiled in "
                       f"{r['compile_s']:.0f} s (the first call, outside the times){graph}; it takes {paid}.")
        ref = r.get("same_runtime_reference", "unet")
        if ref != "unet" and r["base"] != "unet":
            out[-1] += (f" Like with like, against `{ref}`, it takes {_x(r, 'ratio_same_runtime', 'ratio_same_runtime_ci')}: "
                        f"the {GOAL_RATIO}x goal {_GOAL[r['within_goal']].format(g=GOAL_RATIO)}.")
    kept, once, rest = _kept(record, repeat)
    names = lambda rs: ", ".join(f"`{r['option']}`" for r in rs) or "none"   # noqa: E731
    both = " in both runs" if repeat is not None else ""
    out.append(f"Kept, because they pay{both}: {names(kept)}."
               + (f" Faster in one run, unresolved in the other: {names(once)}." if once else "")
               + f" Not kept: {names(rest)}.")
    for what, note in (record.get("variant_notes") or {}).items():
        out.append(f"**{what}**: {note if len(note) < 300 else note[:300] + ' ...'}")
    return "\n".join(f"- {line}" for line in out)


def bench_summary(record: dict, repeat: dict | None = None) -> str:
    """Two summary bullets (Markdown) from the bench: the calibrated NODEs-UNet against the goal, and
    which variants paid (in ``repeat`` too, when given); every number is the records'."""
    rows = {r["option"]: r for r in record["rows"]}
    time_key = f"time_{record['n_images']}_s"
    pick = record["calibration"].get("nodes-unet", {}).get("pick_label")
    d, c, co = rows.get("nodes-unet"), rows.get(f"nodes-unet {pick}"), rows.get(f"nodes-unet {pick} onnx")
    out = []
    if d and c:
        line = (f"Calibrated ({pick}), NODEs-UNet is {d[time_key] / c[time_key]:.1f} times faster than with dopri5 "
                f"({d['nfe_total']:.0f} evaluations of $f$) and scores {100 * c['test_miou']:.2f}% against "
                f"{100 * d['test_miou']:.2f}%; it takes {_x(c)} the U-Net's time in PyTorch (the {GOAL_RATIO}x goal "
                f"{_GOAL[c['within_goal']].split(' (')[0].format(g=GOAL_RATIO)})")
        if co:
            line += (f" and {_x(co, 'ratio_same_runtime', 'ratio_same_runtime_ci')} the ONNX U-Net's in ONNX (the goal "
                     f"{_GOAL[co['within_goal']].split(' (')[0].format(g=GOAL_RATIO)})")
        out.append(line + f"; its MACs floor is {c['macs_ratio_to_unet']:.2f}x.")
        held = [f"`{r['option']}`" for r in record["rows"] if r["nfe_total"] > 0 and r["within_goal"] == "holds"]
        if held:
            out[-1] += " Meeting the goal: " + ", ".join(held) + "."
    if any(r.get("variant") for r in record["rows"]):
        kept, once, rest = _kept(record, repeat)
        names = lambda rs: ", ".join(f"`{r['option']}` ({r['ratio_to_base']:.2f}x its base)" for r in rs)  # noqa: E731
        both = " in both runs" if repeat is not None else ""
        out.append("Backends, layouts and compilers, measured on the same weights in the same rounds: "
                   + (f"kept where they pay{both}: {names(kept)}" if kept else f"none pays{both}")
                   + (f"; faster in one run only: {names(once)}" if once else "")
                   + (f"; not kept: {names(rest)}" if rest else "") + "."
                   + (" bf16 on CUDA was not measured (no CUDA device)." if "bf16 on CUDA" in (record.get("variant_notes") or {})
                      else ""))
    return "\n".join(f"- {line}" for line in out)


def study_units_frame(record: dict):
    """The bench's units against the chapter-6 records of the same label and seed (test MIoU): the
    study's checkpoints were not kept, and units re-trained with the same recipe differ."""
    import pandas as pd
    rows = []
    for r in record["rows"]:
        if r.get("variant") or r["runtime"] != "torch" or r["model"] not in ("unet", "resunet", "ode-unet-5", "nodes-unet",
                                                                             "nodes-unet-h16") or r.get("ode_reg") is not None:
            continue
        if r.get("calibrated"):
            continue
        label = r["model"] if r["option"] != "nodes-unet-h16" else "nodes-unet-h16"
        table = "table1" if label == "ode-unet-5" else "table2"
        study = load_record(f"{table}/{record['scale']}/{label}-seed{record['seed']}.json")
        unit = (record.get("units") or {}).get(label, {})
        rows.append({"network": label, "bench test MIoU": r["test_miou"],
                     "chapter 6 record": None if study is None else study["test"]["miou"],
                     "difference (pp)": None if study is None else 100 * (r["test_miou"] - study["test"]["miou"]),
                     "trained at": str(unit.get("git_commit") or "?")[:8], "unit": unit.get("source")})
    return pd.DataFrame(rows).set_index("network") if rows else None


# ----------------------------------------------------------------------------- 2. what the blocks learned

def _shipped_blocks(n_images: int, times, log) -> dict:
    from ..bccd import bccd_sample_dir
    from ..io import read_image
    from ..segmenter import shipped_checkpoint
    seg = Segmenter.load(shipped_checkpoint(), device="cpu", exact=True)
    files = sorted((bccd_sample_dir() / "images").glob("*.jpg"))[:n_images]
    blocks = ode_blocks(seg.model)
    inputs, nfe = {}, {}
    for f in files:
        image = read_image(f)
        got = block_inputs(seg.model, lambda: seg.predict(image, postprocess=False))
        for name, h in got.items():
            inputs.setdefault(name, []).append(h)
        for name, v in _nfe_of(seg.model).items():
            nfe[name] = nfe.get(name, 0.0) + v / len(files)
    cal = load_record("calibration/shipped.json")
    if cal is not None:
        calibration = dict(pick=cal["chosen"], pick_label=cal["chosen_label"], source="calibration/shipped.json",
                           rows=[dict(label=r["label"], score=r["score"], drop_pp=r["drop_pp"],
                                      nfe_total=float(sum(r["nfe_per_block"].values())))
                                 for r in cal["validation"]["rows"]],
                           rule=cal.get("what", ""))
    else:
        calibration = dict(pick=seg.solver, pick_label=solver_label(seg.solver), source="the checkpoint's stored solver")
    rows = []
    for i, b in enumerate(blocks):
        name = b.name or f"block {i}"
        log(f"  shipped {name}: flow on {len(files)} photographs ...")
        per = [flow_measures(b, h, times) for h in inputs[name]]
        rows.append(_block_row(b, name, nfe.get(name), per))
    return dict(model="shipped", label=f"shipped ({Path(str(shipped_checkpoint())).name})", seed=None,
                images=[f.name for f in files], image_kind="vendored BCCD photographs (network input at the "
                "checkpoint's input scale)", calibration=calibration, blocks=rows)


def _block_row(b: ODEBlock, name: str, nfe, per: list[dict]) -> dict:
    avg = lambda key: float(np.mean([p[key] for p in per]))   # noqa: E731
    keys = per[0]["f_ratio"].keys()
    return dict(name=name, channels=b.func.channels, hidden=b.func.hidden,
                trained=dict(method=b.method, rtol=b.rtol, atol=b.atol), nfe_forward=nfe,
                f_ratio={k: float(np.mean([p["f_ratio"][k] for p in per])) for k in keys},
                change=avg("change"), late_change=avg("late_change"), euler_diff=avg("euler_diff"),
                euler_diff_of_change=float(np.nanmean([p["euler_diff_of_change"] for p in per])),
                euler_diff_per_image=[p["euler_diff"] for p in per], n_images=len(per))


def blocks_learned(units: dict | None = None, scale: str = "study", seeds: Sequence[int] = (0, 1, 2, 3, 4),
                   n_images: int = 4, times: Sequence[float] = FLOW_TIMES, max_drop_pp: float = 0.3,
                   shipped: bool = True, shipped_images: int = 2, regularise_work=REGULARISE_WORK, root=None,
                   control: bool = True, width: int | None = None, out=None, command: str | None = None,
                   log: Callable = print) -> dict:
    """What every trained ODE model's blocks compute (see the module docstring); the record.

    ``units``: ``{name: unit}`` (dict with ``ckpt`` and optionally ``label``/``seed``, or a path);
    default: the study's finished ODE units (``nodes-unet``, ``nodes-unet-h16``, ``ode-unet-1..9``
    on ``seeds``) and the finished units of :mod:`bloodseg.paper.regularise`. The flow is measured
    on the first ``n_images`` test patches; the calibration runs on the validation patches.
    ``control``: also measure an untrained NODEs-UNet (seed 0, the recipe's width), to tell what
    training made of the flow from what the architecture gives anyway."""
    t_start = time.perf_counter()
    recipe = scale_recipe(scale)
    if width is not None:
        recipe = recipe.replace(**{"model.width": width})
    tmp = Path(tempfile.mkdtemp(prefix="bloodseg-blocks-"))
    try:
        if units is None:
            labels = ["nodes-unet", "nodes-unet-h16"] + [f"ode-unet-{p}" for p in range(1, 10)]
            units = find_units(labels, seeds, root, scale)
            for name, u in (regularise_units(regularise_work, seeds) if regularise_work else {}).items():
                units[f"nodes-unet-{name}"] = dict(u, label=f"nodes-unet {u['arm']} {u['epochs']}ep")
        units = copy_units({k: (v if isinstance(v, dict) else dict(ckpt=str(v))) for k, v in units.items()}, tmp)
        log(f"preparing the {scale} data ...")
        data = prepare_data(recipe)
        val, test = data["val"].samples, data["test"]
        x = torch.stack([test[i][0] for i in range(min(n_images, len(test)))])
        models = []
        if control:
            torch.manual_seed(0)
            init = build_model("nodes-unet", width=recipe.model.width).eval()
            units = {"nodes-unet-untrained": dict(net=init, label="nodes-unet untrained (control)", seed=0), **units}
        for name, u in units.items():
            log(f"{name} ...")
            net = u["net"] if "net" in u else _load(u["ckpt"])
            blocks = ode_blocks(net)
            if not blocks:
                continue
            per_image_inputs: dict = {}
            nfe: dict = {}
            for i in range(len(x)):
                got = block_inputs(net, lambda i=i: net(x[i:i + 1]))
                for k, h in got.items():
                    per_image_inputs.setdefault(k, []).append(h)
                for k, v in _nfe_of(net).items():
                    nfe[k] = nfe.get(k, 0.0) + v / len(x)
            rows = []
            for i, b in enumerate(blocks):
                bname = b.name or f"block {i}"
                per = [flow_measures(b, h, times) for h in per_image_inputs[bname]]
                rows.append(_block_row(b, bname, nfe[bname], per))
            cal = calibration_pick(net, val, max_drop_pp) if "net" not in u else dict(
                pick=None, pick_label="-", rows=[], rule="not calibrated: untrained")
            models.append(dict(model=name, label=u.get("label", name), seed=u.get("seed"), unit=u.get("source"),
                               study_record_miou=u.get("test_miou"), params=count_parameters(net),
                               images=f"first {len(x)} {scale} test patches", calibration=cal, blocks=rows))
            log(f"  NFE {({k: round(v, 1) for k, v in nfe.items()})}, pick {cal['pick_label']}, euler_diff "
                f"{[round(r['euler_diff'], 4) for r in rows]}")
        if shipped:
            log("shipped checkpoint ...")
            models.append(_shipped_blocks(shipped_images, times, log))
        record = dict(
            what="what the trained ODE-blocks compute: per block, forward NFE at the trained tolerance (mean over "
                 "images), and along the dopri5 trajectory at the trained tolerance: f_ratio = ||f(t,h(t))|| / "
                 "||h(t)|| at t in " + ", ".join(f"{t:g}" for t in times) + "; change = ||h(1)-h(0)||/||h(0)||; "
                 "late_change = ||h(1)-h(0.5)||/||h(0.5)||; euler_diff = ||h(1) - (h0 + f(0,h0))|| / ||h(1)|| (one "
                 "Euler step, i.e. the residual block with the same f, against the solution); euler_diff_of_change = "
                 "the same over ||h(1)-h(0)||; Frobenius norms per image, means over images. Calibration: "
                 f"{calibration_rule(max_drop_pp)} on the {len(val)} {scale} validation patches",
            scale=scale, times=list(times), n_images=len(x), models=models,
            units={k: dict(source=v.get("source"), record=v.get("record"), git_commit=v.get("git_commit"))
                   for k, v in units.items() if "net" not in v})
        record["provenance"] = _provenance(t_start, command, {"threads": torch.get_num_threads()})
        _write(record, out)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def calibration_rule(max_drop_pp: float = 0.3) -> str:
    return (f"cheapest fixed-grid setting ({', '.join(solver_label(s) for s in FIXED_GRID)}) within {max_drop_pp:g} pp "
            "of the trained solver's MIoU")


def blocks_frame(record: dict):
    """One row per (model, block): NFE, calibration pick, and the flow measures."""
    import pandas as pd
    rows = []
    for m in record["models"]:
        for b in m["blocks"]:
            rows.append({"model": model_name(m), "block": b["name"].replace("ODE-block at position ", "pos "),
                         "channels": b["channels"], "rtol": b["trained"]["rtol"], "NFE": b["nfe_forward"],
                         "pick": m["calibration"]["pick_label"],
                         "|f|/|h| t=0": b["f_ratio"].get("0"), "|f|/|h| t=1": b["f_ratio"].get("1"),
                         "change": b["change"], "late change": b["late_change"], "Euler diff": b["euler_diff"],
                         "Euler diff / change": b["euler_diff_of_change"]})
    return pd.DataFrame(rows)


def blocks_summary_frame(record: dict):
    """One row per model: its blocks' total NFE, the calibration pick, and the flow measures over
    its blocks (|f|/|h| at t = 0 and change: means; Euler diff: the largest)."""
    import pandas as pd
    rows = []
    for m in record["models"]:
        bs = m["blocks"]
        rows.append({"model": model_name(m), "blocks": ", ".join(b["name"].rsplit(" ", 1)[-1] for b in bs),
                     "NFE": sum(b["nfe_forward"] for b in bs), "pick": m["calibration"]["pick_label"],
                     "|f|/|h| t=0": float(np.mean([b["f_ratio"]["0"] for b in bs])),
                     "change": float(np.mean([b["change"] for b in bs])),
                     "Euler diff (largest)": max(b["euler_diff"] for b in bs)})
    return pd.DataFrame(rows).set_index("model")


# ----------------------------------------------------------------------------- 3. the solver experiment

def _train_arm(arm: str, spec: dict, model_name: str, recipe, data: dict, work: Path, log) -> dict:
    """Train ``model_name`` with every block solved by ``spec`` (resumed from ``last.pt``; a finished
    unit with the same recipe and spec is read back from its ``unit.json``)."""
    fp = json.loads(json.dumps(dict(arm=arm, spec=spec, model=model_name, recipe=recipe.to_dict())))
    try:
        done = json.loads((work / "unit.json").read_text())
    except (OSError, ValueError):
        done = None
    if isinstance(done, dict) and done.get("fingerprint") == fp and (work / "best.pt").is_file():
        log(f"  {work.name}: done before, reused")
        return done
    try:
        old = json.loads((work / "fingerprint.json").read_text())
    except (OSError, ValueError):
        old = None
    if work.exists() and old != fp:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    torch.manual_seed(recipe.train.seed)
    method = spec["method"] if spec else "dopri5"
    model = build_model(model_name, width=recipe.model.width, method=method, **recipe.model.options)
    if spec:
        apply_solver(model, spec)     # step_size is not a build option: it is set on the blocks
    t0 = time.perf_counter()
    history = fit(model, data["train"], data["val"], work, recipe, device="cpu",
                  on_epoch=lambda r: log(f"  {work.name} epoch {r['epoch']}: loss {r['loss']:.4f} val_miou "
                                         f"{r['val_miou']:.4f} nfe/step {r['nfe_forward']:.1f} ({r['time_s']:.0f} s)"))
    unit = dict(fingerprint=fp, arm=arm, spec=spec, seed=recipe.train.seed, history=history,
                train_s=float(sum(r["time_s"] for r in history)), wall_s=time.perf_counter() - t0,
                best_epoch=min(history, key=lambda r: r["val_loss"])["epoch"], ckpt=str(work / "best.pt"))
    (work / "unit.json").write_text(json.dumps(unit, indent=1, default=float))
    return unit


def _train_step_times(models: dict, data: dict, batch: int, steps: int = 4, lr: float = 1e-4) -> dict:
    """Seconds per training step (forward, cross-entropy, backward, Adam) of each model, taking
    turns step by step on the same batches; the median of ``steps`` after one warm-up step. Works
    on copies: the models are left as they are."""
    import copy
    import torch.nn.functional as F
    ds = data["train"]
    xs = [torch.stack([ds[(s * batch + j) % len(ds)][0] for j in range(batch)]) for s in range(steps + 1)]
    ys = [torch.stack([ds[(s * batch + j) % len(ds)][1] for j in range(batch)]) for s in range(steps + 1)]
    copies = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in copies.items()}
    times = {k: [] for k in copies}
    labels = list(copies)
    for s in range(steps + 1):
        k0 = s % len(labels)
        for k in labels[k0:] + labels[:k0]:
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(copies[k](xs[s]), ys[s]).backward()
            opts[k].step()
            if s:
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def solver_experiment(scale: str = "study", seeds: Sequence[int] = (0,), model: str = "nodes-unet",
                      arms: dict | None = None, epochs: int | None = None, work=SOLVERS_WORK, reference: dict | None = None,
                      root=None, width: int | None = None, n_images: int = 20, rounds: int = 5, step_batch: int | None = None,
                      cross: bool = True, cross_max_steps: int = 200, out=None, command: str | None = None,
                      notes: str = "", log: Callable = print) -> dict:
    """Issue #18: ``model`` trained with its blocks solved by each of ``arms`` (default
    :data:`SOLVER_ARMS`: one Euler step, rk4 with 2 steps) and by dopri5 at the trained tolerances.

    The dopri5 arm is the study's unit of each seed (``reference``: ``{seed: ckpt path or unit
    dict}``; default :func:`find_units`), not retrained; a seed without one is trained here when
    ``reference`` is ``"train"``, else left out. Per arm and seed: test MIoU (all test patches),
    forward NFE, training time (sum of the epochs' times, from the unit's own run) and the best
    epoch; then, in one process: inference time on the first ``n_images`` test patches
    (``rounds`` interleaved rounds), seconds per training step side by side, and (``cross``) each
    trained network's test MIoU with every arm's solver (adaptive solves capped at
    ``cross_max_steps`` steps). ``epochs`` shortens the recipe (the record says so)."""
    t_start = time.perf_counter()
    arms = dict(SOLVER_ARMS if arms is None else arms)
    base = scale_recipe(scale)
    if width is not None:
        base = base.replace(**{"model.width": width})
    if epochs is not None:
        base = base.replace(**{"train.epochs": int(epochs)})
    base = base.replace(**{"train.progress": False})
    log(f"preparing the {scale} data ...")
    data = prepare_data(base)
    test = data["test"]
    tmp = Path(tempfile.mkdtemp(prefix="bloodseg-solvers-"))
    try:
        if reference is None:
            found = find_units([model], seeds, root, scale)
            reference = {u["seed"]: u for u in found.values()}
        units: dict = {}   # (arm, seed) -> dict(ckpt, spec, train_s, ...)
        for seed in seeds:
            recipe = base.replace(**{"train.seed": int(seed)})
            ref = reference.get(seed) if isinstance(reference, dict) else None
            if ref is not None:
                ref = ref if isinstance(ref, dict) else dict(ckpt=str(ref))
                ref = copy_units({f"dopri5-seed{seed}": ref}, tmp)[f"dopri5-seed{seed}"]
                hist = ref.get("history")
                units[("dopri5", seed)] = dict(ckpt=ref["ckpt"], spec=None, source=ref.get("source"),
                                               record=ref.get("record"), train_s=ref.get("train_s"),
                                               best_epoch=(min(hist, key=lambda r: r["val_loss"])["epoch"] if hist else None),
                                               epochs=len(hist) if hist else None, trained_here=False,
                                               nfe_train_step=hist[-1]["nfe_forward"] if hist else None)
            elif reference == "train":
                log(f"dopri5 seed {seed}: training (no study unit) ...")
                u = _train_arm("dopri5", None, model, recipe, data, Path(work) / f"dopri5-seed{seed}", log)
                units[("dopri5", seed)] = dict(ckpt=u["ckpt"], spec=None, train_s=u["train_s"], best_epoch=u["best_epoch"],
                                               epochs=len(u["history"]), trained_here=True,
                                               nfe_train_step=u["history"][-1]["nfe_forward"])
            for arm, spec in arms.items():
                spec = check_solver(spec)
                log(f"{arm} seed {seed}: training ...")
                u = _train_arm(arm, spec, model, recipe, data, Path(work) / f"{arm}-seed{seed}", log)
                units[(arm, seed)] = dict(ckpt=u["ckpt"], spec=spec, train_s=u["train_s"], best_epoch=u["best_epoch"],
                                          epochs=len(u["history"]), trained_here=True,
                                          nfe_train_step=u["history"][-1]["nfe_forward"])
        arm_names = ["dopri5"] + list(arms)
        nets, trained_settings = {}, {}
        for (arm, seed), u in units.items():
            net = _load(u["ckpt"])
            if u["spec"] is not None:
                apply_solver(net, u["spec"])    # the checkpoint rebuilds the method, not its steps
            nets[(arm, seed)] = net
            trained_settings[(arm, seed)] = trained_solver(net)
        rows = []
        for (arm, seed), net in nets.items():
            log(f"{arm} seed {seed}: test scores ...")
            s = test_scores(net, test)
            u = units[(arm, seed)]
            rows.append(dict(arm=arm, seed=seed, solver=solver_label(u["spec"]) if u["spec"] else "dopri5 (trained tolerances)",
                             spec=u["spec"], trained_solver=trained_settings[(arm, seed)], test_miou=s["miou"],
                             test_pa=s["pa"], mean_image_miou=s["mean_image_miou"],
                             mean_image_miou_ci=s["mean_image_miou_ci"], per_image_miou=s["per_image_miou"],
                             train_s=u["train_s"], epochs=u["epochs"], best_epoch=u["best_epoch"],
                             nfe_train_step=u["nfe_train_step"], trained_here=u["trained_here"],
                             unit=u.get("source") or u["ckpt"], params=count_parameters(net)))
        images = [test[i][0][None] for i in range(min(n_images, len(test)))]
        log(f"timing inference, {rounds} rounds ...")
        timing = interleaved_times({f"{a}-seed{s}": n for (a, s), n in nets.items()}, images, rounds=rounds)
        first = next(iter(nets))
        summary = ratio_summary(timing["times"], f"{first[0]}-seed{first[1]}", len(images))
        log("timing training steps side by side ...")
        steps = _train_step_times({f"{a}-seed{s}": n for (a, s), n in nets.items() if s == seeds[0]}, data,
                                  step_batch or base.train.batch_size)
        for r in rows:
            key = f"{r['arm']}-seed{r['seed']}"
            r.update(nfe_forward=timing["nfe"][key], nfe_total=float(sum(timing["nfe"][key].values())),
                     time_per_image_s=summary[key]["time_per_image_s"], time_s_rounds=summary[key]["time_s_rounds"],
                     train_step_s=steps.get(key))
        # paired differences to dopri5 over seeds and images
        diffs = {}
        ref_rows = {r["seed"]: r for r in rows if r["arm"] == "dopri5"}
        for arm in arms:
            both = [s for s in seeds if s in ref_rows and any(r["arm"] == arm and r["seed"] == s for r in rows)]
            if not both:
                continue
            a = np.array([ref_rows[s]["per_image_miou"] for s in both])
            b = np.array([next(r for r in rows if r["arm"] == arm and r["seed"] == s)["per_image_miou"] for s in both])
            d = stats.paired_bootstrap(100 * a, 100 * b)
            diffs[arm] = dict(diff_pp=d["diff"], ci=list(d["ci"]), n_seeds=d["n_seeds"], n_images=d["n_images"],
                              of=f"{arm} - dopri5, per-image test MIoU, pp")
        cross_rows = []
        if cross:
            solve_with = {"dopri5": None, **{a: check_solver(s) for a, s in arms.items()}}
            for (arm, seed), net in nets.items():
                ref_settings = trained_settings.get(("dopri5", seed)) or (
                    [dict(s, method="dopri5", step_size=None) for s in
                     trained_solver(build_model(model, width=base.model.width))])
                for solve_arm, spec in solve_with.items():
                    if spec is None:
                        apply_solver(net, None, ref_settings)     # dopri5 at the trained tolerances
                    else:
                        apply_solver(net, spec)
                    for b in ode_blocks(net):
                        b.max_steps = cross_max_steps
                    log(f"  trained {arm} seed {seed}, solved {solve_arm} ...")
                    t0 = time.perf_counter()
                    try:
                        s = evaluate(net, test, n_timed=1, warmup=0)
                        cross_rows.append(dict(trained=arm, seed=seed, solved=solve_arm, test_miou=float(s["miou"]),
                                               nfe=float(s["nfe_forward"]), seconds=time.perf_counter() - t0, error=None))
                    except SolverError as exc:
                        cross_rows.append(dict(trained=arm, seed=seed, solved=solve_arm, test_miou=None, nfe=None,
                                               seconds=time.perf_counter() - t0, error=str(exc)[:300]))
                apply_solver(net, None, trained_settings[(arm, seed)])
        record = dict(
            what=f"{model} (width {base.model.width}, {scale} recipe) trained with every ODE-block solved by "
                 + ", ".join(f"{a} ({solver_label(check_solver(s))})" for a, s in arms.items())
                 + " and by dopri5 at the trained tolerances (the study's unit, not retrained); test MIoU over all "
                 f"{len(test)} test patches; NFE = forward evaluations of f per block per test patch; train_s = the "
                 "sum of the unit's epoch times in its own run (the machine's load differs between runs); "
                 "train_step_s = median seconds per training step, the arms taking turns on the same batches in one "
                 f"process; inference time on {len(images)} test patches, {rounds} interleaved rounds; cross = every "
                 "trained network solved with every arm's solver",
            model=model, width=base.model.width, scale=scale, seeds=list(seeds), arms=arm_names,
            epochs=base.train.epochs, epochs_reduced=epochs is not None and epochs != scale_recipe(scale).train.epochs,
            rows=rows, miou_diff_to_dopri5=diffs, cross=cross_rows, n_images=len(images), rounds=rounds,
            notes=notes, recipe=base.to_dict())
        record["provenance"] = _provenance(t_start, command, {"threads": torch.get_num_threads()})
        _write(record, out)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def solvers_frame(record: dict):
    """One row per (arm, seed) of the solver experiment."""
    import pandas as pd
    rows = [{"trained with": r["solver"], "seed": r["seed"], "test MIoU": r["test_miou"], "NFE": r["nfe_total"],
             "train s": r["train_s"], "s / train step": r["train_step_s"], "ms / image": 1000 * r["time_per_image_s"],
             "best epoch": r["best_epoch"]} for r in record["rows"]]
    return pd.DataFrame(rows).set_index(["trained with", "seed"])


# ----------------------------------------------------------------------------- figures

def _short(option: str) -> str:
    return (option.replace("nodes-unet", "NODEs").replace("ode-unet-", "ODE-").replace("resunet", "ResUNet")
            .replace("unet", "U-Net").replace("regularised", "RNODE"))


def _plain_ticks(ax, axis: str = "both") -> None:
    """Log axes labelled 2, 3, 5, 10 instead of 2x10^0 (readable at the book's size)."""
    import math as _math

    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lead = round(v / 10 ** _math.floor(_math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if lead in (2, 5) else ""

    for which in ("x", "y") if axis == "both" else (axis,):
        a = ax.xaxis if which == "x" else ax.yaxis
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.set_minor_formatter(FuncFormatter(minor))


def model_name(m: dict) -> str:
    """A blocks_learned model's display name: its label, with the seed when it has one."""
    label = m["label"]
    if m.get("seed") is not None and "seed" not in label and "untrained" not in label:
        return f"{label} s{m['seed']}"
    return label


_VARIANT_MARKERS = {"torchode": "X", "unrolled": "P", "channels_last": "v", "compiled": "^"}


def plot_frontier(record: dict, ax=None):
    """Every option of the bench: time over the U-Net's in the same runtime (an ONNX option over the
    ONNX U-Net; median and 95% interval over rounds; log axis) against test MIoU, with issue #16's
    goal (1.3x the U-Net) as a line. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8.4, 4.6))
    for i, r in enumerate(record["rows"]):
        x, y = r.get("ratio_same_runtime", r["ratio_to_unet"]), 100 * r["test_miou"]
        lo, hi = r.get("ratio_same_runtime_ci", r["ratio_ci"])
        colour = "k" if r["nfe_total"] == 0 else "C3" if r["solver"] == "trained" else "C2"
        marker = ("s" if r["runtime"] == "onnxruntime" else "D" if r.get("ode_reg") is not None else
                  _VARIANT_MARKERS.get(r.get("variant"), "o"))
        if r.get("variant"):    # hollow, no interval (the variants' table has it): beside its base, legible
            ax.plot([x], [y], marker, mfc="none", mec=colour, ms=10, mew=1.6)
        else:
            ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt=marker, color=colour, ms=6, capsize=3, lw=1)
        if r["option"] != "unet onnx" and not r.get("variant"):   # a variant: its marker, beside its base
            text = "U-Net (PyTorch and ONNX)" if r["option"] == "unet" else _short(r["option"])
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 6 - 18 * (i % 2)), fontsize=8)
    ax.axvline(GOAL_RATIO, color="C0", ls="--", lw=1, label=f"goal: {GOAL_RATIO}x the U-Net's time")
    ax.set_xscale("log")
    _plain_ticks(ax, "x")
    ax.set_xlabel("inference time / U-Net's in the same runtime and round (log scale)")
    ax.set_ylabel("test MIoU (%)")
    ax.set_title("The frontier: black = no ODE-block, red = dopri5 (trained tolerances), green = calibrated "
                 "fixed grid;\nsquare = ONNX, diamond = 6-epoch regularisation pair; hollow: the same weights by torchode (x), "
                 "an unrolled loop (+),\nin channels_last (v) or compiled (^), against the U-Net run the same way", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    return fig


def plot_flow(record: dict, models: Sequence[str] | None = None):
    """Left: ||f||/||h|| along the trajectory for every block of the chosen models; right: how far
    one Euler step lands from the solution (euler_diff), per block. Returns the figure."""
    import matplotlib.pyplot as plt
    ms = [m for m in record["models"] if models is None or model_name(m) in models or m["model"] in models]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names, diffs, colours = [], [], []
    for j, m in enumerate(ms):
        for b in m["blocks"]:
            ts = [float(t) for t in b["f_ratio"]]
            axes[0].plot(ts, list(b["f_ratio"].values()), "o-", color=f"C{j % 10}", lw=1, ms=3,
                         label=model_name(m) if b is m["blocks"][0] else None)
            names.append(f"{_short(model_name(m))} {b['name'].replace('ODE-block at position ', 'p')}")
            diffs.append(b["euler_diff"])
            colours.append(f"C{j % 10}")
    axes[0].set_yscale("log")
    _plain_ticks(axes[0], "y")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("||f(t, h)|| / ||h||")
    axes[0].set_title("How fast each block's state moves", fontsize=10)
    axes[0].set_ylim(0.06, None)
    axes[0].legend(fontsize=7, ncol=2, loc="lower left")
    axes[0].grid(alpha=0.3)
    axes[1].barh(range(len(diffs)), diffs, color=colours)
    axes[1].set_yticks(range(len(diffs)), names, fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set_xscale("log")
    _plain_ticks(axes[1], "x")
    axes[1].set_xlabel("||h(1) - Euler step|| / ||h(1)||")
    axes[1].set_title("One Euler step against the dopri5 solution", fontsize=10)
    axes[1].grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_calibration(cal: dict, title: str = "", ax=None):
    """A calibration: validation MIoU drop (pp) against f-evaluations per forward for every
    solver, with the allowed drop and the pick marked. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7.5, 3.4))
    groups: dict = {}
    for r in cal["rows"]:
        if r.get("drop_pp") is None:
            continue
        picked = r["label"] == cal.get("pick_label")
        ax.plot(r["nfe_total"], r["drop_pp"], "o" if r["label"] != "trained" else "s",
                color="C2" if picked else "C3" if r["label"] == "trained" else "C0", ms=8 if picked else 5)
        groups.setdefault(round(r["nfe_total"], 1), []).append(r)
    for k, (nfe, rs) in enumerate(sorted(groups.items())):
        ax.annotate("\n".join(r["label"] for r in rs), (nfe, max(r["drop_pp"] for r in rs)), textcoords="offset points",
                    xytext=(0, 8), ha="center", va="bottom", fontsize=7)
    ax.axhline(cal.get("max_drop_pp", 0.3), color="C1", ls="--", lw=1, label=f"allowed drop {cal.get('max_drop_pp', 0.3):g} pp")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log")
    _plain_ticks(ax, "x")
    ax.set_xlabel("f-evaluations per forward, all blocks (log)")
    ax.set_ylabel("validation MIoU drop (pp)")
    ax.set_title(title or f"calibration: pick {cal.get('pick_label')} (large marker)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_solvers(record: dict):
    """The solver experiment: test MIoU, forward NFE, seconds per training step and ms per image,
    one bar per trained arm (seeds as points). Returns the figure."""
    import matplotlib.pyplot as plt
    arms = record["arms"]
    fig, axes = plt.subplots(1, 4, figsize=(10, 3.0))
    for ax, key, scale, label in ((axes[0], "test_miou", 100, "test MIoU (%)"), (axes[1], "nfe_total", 1, "forward NFE"),
                                  (axes[2], "train_step_s", 1, "s / training step"),
                                  (axes[3], "time_per_image_s", 1000, "ms / test patch")):
        for i, arm in enumerate(arms):
            vals = [scale * r[key] for r in record["rows"] if r["arm"] == arm and r.get(key) is not None]
            if vals:
                ax.bar(i, np.mean(vals), color=f"C{i}", alpha=0.7)
                ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    lo = min(100 * r["test_miou"] for r in record["rows"])
    axes[0].set_ylim(max(0, lo - 5), 100)
    fig.suptitle(f"{record['model']} trained with each solver (points: seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_macs(rows: list[dict], ax=None):
    """Stacked bars: MACs of the backbone and of the ODE-blocks (NFE x cost of f) per option, with
    the U-Net's total and 1.3x it as lines. ``rows``: bench rows (``mmacs``, ``backbone_mmacs``)."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(9, 3.4))
    labels = [_short(r["option"]) for r in rows]
    back = [r["backbone_mmacs"] for r in rows]
    ode = [r["mmacs"] - r["backbone_mmacs"] for r in rows]
    x = np.arange(len(rows))
    ax.bar(x, back, color="C7", label="backbone (everything outside the ODE-blocks)")
    ax.bar(x, ode, bottom=back, color="C3", label="ODE-blocks: NFE x MACs of f")
    unet = next((r["mmacs"] for r in rows if r["option"] == "unet"), None)
    if unet:
        ax.axhline(unet, color="k", lw=1, label="U-Net")
        ax.axhline(GOAL_RATIO * unet, color="C0", ls="--", lw=1, label=f"{GOAL_RATIO}x U-Net")
    ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("million MACs per patch")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def floor_table(width: int = 8, size: int = 128, model: str = "nodes-unet", nfe_totals=(3, 6, 12, 24, 48, 66)) -> dict:
    """The arithmetic floor of ``model`` against the U-Net at ``width`` on one ``size`` x ``size``
    patch (:func:`count_macs` on random weights; MACs do not depend on the weights, NFE does):
    ``dict(unet_mmacs, backbone_mmacs, f_mmacs_per_eval={block: ..}, rows=[dict(nfe_total,
    mmacs, ratio_to_unet)], nfe_at_goal)``. A row spreads ``nfe_total`` evenly over the blocks;
    ``nfe_at_goal`` is the total NFE at which the MACs reach :data:`GOAL_RATIO` x the U-Net's."""
    x = torch.rand(1, 3, size, size)
    torch.manual_seed(0)
    unet = count_macs(build_model("unet", width=width).eval(), x)
    torch.manual_seed(0)
    net = build_model(model, width=width, method="euler").eval()
    macs = count_macs(net, x)
    per_eval = {k: v["f_mmacs_per_eval"] for k, v in macs["blocks"].items()}
    mean_f = float(np.mean(list(per_eval.values())))
    rows = [dict(nfe_total=int(n), mmacs=macs["backbone_mmacs"] + n * mean_f,
                 ratio_to_unet=(macs["backbone_mmacs"] + n * mean_f) / unet["total_mmacs"]) for n in nfe_totals]
    at_goal = (GOAL_RATIO * unet["total_mmacs"] - macs["backbone_mmacs"]) / mean_f
    return dict(width=width, size=size, model=model, unet_mmacs=unet["total_mmacs"], backbone_mmacs=macs["backbone_mmacs"],
                f_mmacs_per_eval=per_eval, rows=rows, nfe_at_goal=at_goal)


def plot_floor(floor: dict, bench: dict | None = None, ax=None):
    """MACs over the U-Net's against the total forward NFE (the floor, a line), with the bench's
    measured time ratios of the NODEs-UNet options as points, and the 1.3x goal."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3.6))
    n = np.geomspace(1, 100, 60)
    mean_f = float(np.mean(list(floor["f_mmacs_per_eval"].values())))
    ax.plot(n, (floor["backbone_mmacs"] + n * mean_f) / floor["unet_mmacs"], "k-", lw=1.5,
            label="MACs / U-Net MACs (the arithmetic floor)")
    if bench:
        for r in bench["rows"]:
            if r["model"] in ("nodes-unet", "nodes-unet-h16", "ode-unet-5") and r["nfe_total"] > 0 and not r.get("variant"):
                y = r.get("ratio_same_runtime", r["ratio_to_unet"])
                pair = r.get("ode_reg") is not None
                ax.plot(r["nfe_total"], y, "s" if r["runtime"] == "onnxruntime" else "D" if pair else "o",
                        color="C2" if r.get("calibrated") else "C3", ms=6)
                if not pair:
                    right = r["nfe_total"] < 10
                    ax.annotate(_short(r["option"]), (r["nfe_total"], y), textcoords="offset points",
                                xytext=(6 if right else -6, 4 if r["runtime"] == "torch" else -10), fontsize=7,
                                ha="left" if right else "right")
    ax.axhline(GOAL_RATIO, color="C0", ls="--", lw=1, label=f"goal {GOAL_RATIO}x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax)
    ax.set_xlabel("forward NFE, all blocks together (log)")
    ax.set_ylabel("cost / U-Net's (log)")
    ax.set_title(f"Width {floor['width']}, {floor['size']} px. Points: measured time / U-Net's in the same runtime "
                 "(red dopri5, green fixed grid, square ONNX)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def cross_frame(record: dict):
    """The solver experiment's cross table: test MIoU of each trained network (rows) solved with
    each solver (columns), mean over seeds."""
    import pandas as pd
    df = pd.DataFrame(record["cross"])
    return df.pivot_table(index="trained", columns="solved", values="test_miou", aggfunc="mean").reindex(
        index=record["arms"], columns=record["arms"])


def plot_cross(record: dict, ax=None):
    """The cross table as a heat map (test MIoU, %), trained solver down, test-time solver across."""
    import matplotlib.pyplot as plt
    table = cross_frame(record)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.6, 3.4))
    values = 100 * table.to_numpy(dtype=float)
    im = ax.imshow(values, cmap="viridis", vmin=np.floor(np.nanmin(values)) - 2, vmax=np.ceil(np.nanmax(values)) + 2)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, "fail" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}", ha="center", va="center",
                    color="w" if np.isnan(values[i, j]) or values[i, j] < np.nanmean(values) + 1 else "k", fontsize=9)
    ax.set_xticks(range(len(table.columns)), table.columns, fontsize=8)
    ax.set_yticks(range(len(table.index)), table.index, fontsize=8)
    ax.set_xlabel("solved at test time with")
    ax.set_ylabel("trained with")
    ax.set_title("test MIoU (%)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def plot_regularisation(record: dict):
    """The RNODE record: NFE per training step and test MIoU, plain against regularised, per seed."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, arm in enumerate(("plain", "regularised")):
        per = record["summary"][arm]["per_seed"]
        axes[0].plot([p["seed"] for p in per], [p["nfe_train_step"] for p in per], "o-", color=f"C{i}", label=arm)
        axes[1].plot([p["seed"] for p in per], [100 * p["test_miou"] for p in per], "o-", color=f"C{i}", label=arm)
    axes[0].set_ylabel("forward NFE per training step (last epoch)")
    axes[1].set_ylabel("test MIoU (%)")
    for ax in axes:
        ax.set_xlabel("seed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- command line

def run_record(args, command: str) -> None:
    """``bloodseg record cheap-bench|cheap-blocks|cheap-solvers [options]``."""
    import functools
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    log = functools.partial(print, flush=True)
    results = _results_dir()
    if args.what == "cheap-bench":      # --work: the folder of the regularisation pair (default runs/regularise)
        bench_options(scale=args.scale, seed=seeds[0], n_images=args.images or 20, rounds=args.rounds or 7, root=args.study_root,
                      regularise_work=Path(args.work) if args.work else REGULARISE_WORK, notes=args.notes,
                      out=args.out or results / RECORD_BENCH, command=command, log=log)
    elif args.what == "cheap-blocks":
        blocks_learned(scale=args.scale, seeds=seeds, n_images=args.images or 4, root=args.study_root,
                       out=args.out or results / RECORD_BLOCKS, command=command, log=log)
    else:
        solver_experiment(scale=args.scale, seeds=seeds, epochs=args.epochs, rounds=args.rounds or 5, root=args.study_root,
                          notes=args.notes, out=args.out or results / RECORD_SOLVERS, command=command, log=log)


if __name__ == "__main__":      # the records' commands `python -m bloodseg.paper.cheap record-bench|record-blocks|record-solvers` run `bloodseg record ...`
    import runpy
    import sys
    sys.argv = ["bloodseg", "record", "cheap-" + sys.argv[1].removeprefix("record-"), *sys.argv[2:]]
    runpy.run_module("bloodseg.cli", run_name="__main__")
