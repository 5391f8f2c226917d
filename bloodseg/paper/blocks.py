"""What the trained ODE-blocks compute (issue #16): ``speed/blocks_learned.json``.

:func:`blocks_learned` (``bloodseg record cheap-blocks``), for each trained ODE model (the study's
units and the shipped checkpoint): the calibration pick
(:func:`~bloodseg.paper.units.calibration_pick`), the NFE at the trained tolerance, and
:func:`flow_measures` of every block on a few test images: ``||f(t, h(t))|| / ||h(t)||`` along the
dopri5 trajectory, how far one Euler step ``h0 + f(0, h0)`` lands from the solution ``h(1)``, and
how much h still moves between t = 0.5 and t = 1. A block whose f is small next to h and whose
solution one Euler step reproduces is a residual block in all but name. :func:`blocks_frame` and
:func:`blocks_summary_frame` are the chapter's tables.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..calibrate import solver_label
from ..errors import BloodsegError
from ..models import count_parameters
from ..ode import ADAPTIVE_METHODS, ODEBlock, ode_blocks
from ..registry import build_variant
from ..segmenter import Segmenter
from .records import load_record, provenance, results_path, write_record
from .reproduce import prepare_data, scale_recipe
from .units import (ODE_LABELS, RECORD_BLOCKS, REGULARISE_WORK, calibration_pick, calibration_rule, copy_units,
                    find_units, load_net, nfe_of, regularise_units)

__all__ = ["FLOW_TIMES", "block_inputs", "flow_measures", "blocks_learned", "blocks_frame", "blocks_summary_frame",
           "model_name", "run_record"]

#: Times (fractions of t1) at which the flow is measured along the dopri5 trajectory.
FLOW_TIMES = (0.0, 0.25, 0.5, 0.75, 1.0)


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
        for name, v in nfe_of(seg.model).items():
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
            units = find_units(ODE_LABELS, seeds, root, scale)
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
            init = build_variant("nodes-unet", width=recipe.model.width).eval()
            units = {"nodes-unet-untrained": dict(net=init, label="nodes-unet untrained (control)", seed=0), **units}
        for name, u in units.items():
            log(f"{name} ...")
            net = u["net"] if "net" in u else load_net(u["ckpt"])
            blocks = ode_blocks(net)
            if not blocks:
                continue
            per_image_inputs: dict = {}
            nfe: dict = {}
            for i in range(len(x)):
                got = block_inputs(net, lambda i=i: net(x[i:i + 1]))
                for k, h in got.items():
                    per_image_inputs.setdefault(k, []).append(h)
                for k, v in nfe_of(net).items():
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
        record["provenance"] = provenance(command, t_start)
        if out is not None:
            write_record(record, Path(out))
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_name(m: dict) -> str:
    """A blocks_learned model's display name: its label, with the seed when it has one."""
    label = m["label"]
    if m.get("seed") is not None and "seed" not in label and "untrained" not in label:
        return f"{label} s{m['seed']}"
    return label


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


def run_record(args, command: str) -> None:
    """``bloodseg record cheap-blocks``: the blocks of the study's units of ``--seeds``."""
    import functools
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    blocks_learned(scale=args.scale, seeds=seeds, n_images=args.images or 4, root=args.study_root,
                   out=args.out or results_path(RECORD_BLOCKS), command=command, log=functools.partial(print, flush=True))

