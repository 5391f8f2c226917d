"""Table 2 (paper §4.2): NODEs-UNet against the U-Net and the ResNet U-Net — chapter 6.

Our Table 2 next to the paper's (:func:`table2_frame`), parameter memory (:func:`param_memory_table`),
what each known lever buys for inference time (:func:`inference_levers`, :func:`lever_verdict`) and
the chapter's goals measured against their targets (:func:`performance_goals`).
"""
from __future__ import annotations

import copy
import time

import torch

from ..calibrate import apply_solver
from ..measure import time_inference
from ..models import build_model, parameter_memory_mb
from ..ode import ode_blocks, set_tolerance
from ..train import evaluate
from .units import calibration_pick
from .reference import PAPER_TABLE2
from .runs import measure_time, paper_row, scores_row, timed_images


def table2_frame(results: dict, param_mb_32: dict | None = None):
    """Our Table 2 next to the paper's (percent; parameter memory in MiB)."""
    import pandas as pd
    ours, paper = [], []
    for name in PAPER_TABLE2:
        if name not in results:
            continue
        r = results[name]
        row = scores_row(name, r)
        row["param MB"] = r["param_mb"]
        if param_mb_32:
            row["param MB (width 32)"] = param_mb_32[name]
        row["time 20 img (s)"] = r["time_20_s"]
        ours.append(row)
        paper.append(paper_row(name, PAPER_TABLE2[name]))
    return pd.concat({"ours": pd.DataFrame(ours).set_index("model"),
                      "paper": pd.DataFrame(paper).set_index("model")}, axis=1)


def param_memory_table(width: int = 32, hidden=(None, 256, 128, 64, 32)) -> list[dict]:
    """Parameter memory of U-Net, ResNet U-Net and NODEs-UNet (for several ``ode_hidden``) at ``width``."""
    res = parameter_memory_mb(build_model("resunet", width=width))
    rows = [dict(model="unet", ode_hidden=None, param_mb=parameter_memory_mb(build_model("unet", width=width))),
            dict(model="resunet", ode_hidden=None, param_mb=res)]
    for h in hidden:
        rows.append(dict(model="nodes-unet", ode_hidden=h,
                         param_mb=parameter_memory_mb(build_model("nodes-unet", width=width, ode_hidden=h))))
    for r in rows:
        r["ratio_to_resunet"] = r["param_mb"] / res
        r["width"] = width
    return rows


def _time_pair(model, reference, dataset, n: int, prepare=None) -> tuple[float, float]:
    """Time ``model`` and ``reference`` back to back (reference before and after, averaged)."""
    r1 = measure_time(reference, dataset, n)["time_per_image_s"] * 20
    images = timed_images(dataset, n)
    if prepare is not None:
        images = [prepare(im) for im in images]
    t = time_inference(model, images)["time_per_image_s"] * 20
    r2 = measure_time(reference, dataset, n)["time_per_image_s"] * 20
    return t, (r1 + r2) / 2


def inference_levers(nodes, unet, dataset, n_timed: int = 20, loose_rtol: float = 1e-3,
                     narrow: tuple | None = None, try_compile: bool = False, val=None) -> list[dict]:
    """What each known lever buys for NODEs-UNet's inference time relative to the U-Net's.

    Rows ``dict(lever, time_20_s, unet_time_20_s, ratio, miou, param_mb, note)``: the model as
    trained; test-time tolerance ``loose_rtol``; channels_last memory format; ``torch.compile`` of
    every f (only with ``try_compile``, the compile time is reported); a narrower f (``narrow`` =
    ``(label, trained model)``, e.g. trained with ``ode_hidden``), alone and with ``loose_rtol``;
    with ``val`` (validation samples, never the test ones) the calibrated solver
    (:func:`bloodseg.paper.units.calibration_pick`: the cheapest fixed grid within 0.3 pp of the
    trained solver's validation MIoU). The U-Net is timed right before and after each lever, so a
    busy machine affects both alike.
    """
    rows = []

    def add(lever, model, note="", prepare=None, miou=None):
        t, ref = _time_pair(model, unet, dataset, n_timed, prepare)
        if miou is None:
            miou = evaluate(model, dataset, n_timed=0)["miou"]
        rows.append(dict(lever=lever, time_20_s=t, unet_time_20_s=ref, ratio=t / ref, miou=miou,
                         param_mb=parameter_memory_mb(model), note=note))

    tols = "/".join(f"{b.rtol:g}" for b in ode_blocks(nodes))
    add("as trained", nodes, f"rtol {tols}")
    if val is not None:
        cal = calibration_pick(nodes, val)
        calibrated = copy.deepcopy(nodes)
        apply_solver(calibrated, cal["pick"])
        add(f"calibrated: {cal['pick_label']}", calibrated,
            f"chosen on {cal['n_images']} validation patches: {cal['rule'].split(';')[0]}")
    loose = copy.deepcopy(nodes)
    set_tolerance(loose, loose_rtol)
    add(f"test-time rtol {loose_rtol:g}", loose, "every block")
    cl = copy.deepcopy(nodes).to(memory_format=torch.channels_last)
    add("channels_last", cl, "model and input in NHWC",
        prepare=lambda im: im.contiguous(memory_format=torch.channels_last))
    if try_compile:
        comp = copy.deepcopy(nodes)
        t0 = time.perf_counter()
        try:
            for b in ode_blocks(comp):
                b.func = torch.compile(b.func)
            with torch.inference_mode():
                comp(timed_images(dataset, 1)[0])
            add("torch.compile(f)", comp, f"compile + first call {time.perf_counter() - t0:.0f} s; "
                "MIoU of the same weights run eagerly", miou=rows[0]["miou"])
        except Exception as exc:  # noqa: BLE001 - report, don't fail the chapter
            rows.append(dict(lever="torch.compile(f)", time_20_s=float("nan"), unet_time_20_s=float("nan"),
                             ratio=float("nan"), miou=float("nan"), param_mb=float("nan"),
                             note=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
    else:
        rows.append(dict(lever="torch.compile(f)", time_20_s=float("nan"), unet_time_20_s=float("nan"),
                         ratio=float("nan"), miou=float("nan"), param_mb=float("nan"),
                         note="not tried in this profile (set BLOODSEG_TRY_COMPILE=1): compiling costs "
                              "more time than it saves at this size on a small CPU"))
    if narrow is not None:
        label, model = narrow
        add(label, model, "retrained with the same budget")
        both = copy.deepcopy(model)
        set_tolerance(both, loose_rtol)
        add(f"{label} + rtol {loose_rtol:g}", both, "")
    return rows


def lever_verdict(levers: list[dict], unet_miou: float, max_ratio: float = 3.0) -> dict | None:
    """The fastest lever that meets both inference goals (<= ``max_ratio`` x U-Net, MIoU >= U-Net's)."""
    ok = [r for r in levers if r["ratio"] <= max_ratio and r["miou"] >= unet_miou]
    return min(ok, key=lambda r: r["ratio"]) if ok else None


def performance_goals(table2: dict, adjoint_rows: list[dict]) -> list[dict]:
    """Chapter 6's goals, measured vs goal: NODEs-UNet inference <= 3x the U-Net's time (same width),
    its MIoU >= the U-Net's, and adjoint peak training memory <= 0.5x direct backprop (rtol 1e-6)."""
    n, u = table2["nodes-unet"], table2["unet"]
    ratio = n["time_20_s"] / u["time_20_s"]
    direct = next(r for r in adjoint_rows if r["model"] == "nodes-unet" and r["backprop"] == "direct")
    adj = next(r for r in adjoint_rows if r["model"] == "nodes-unet" and r["backprop"] == "adjoint")
    mem = (adj["peak_mb"] / direct["peak_mb"]) if adj.get("peak_mb") and direct.get("peak_mb") else float("nan")
    return [
        dict(goal="NODEs-UNet inference time <= 3x U-Net's (same width)", goal_value=3.0, measured=ratio,
             met=bool(ratio <= 3)),
        dict(goal="NODEs-UNet MIoU - U-Net MIoU >= 0 (pp)", goal_value=0.0,
             measured=100 * (n["miou"] - u["miou"]), met=bool(n["miou"] >= u["miou"])),
        dict(goal="adjoint / direct peak training memory <= 0.5 (rtol 1e-6)", goal_value=0.5, measured=mem,
             met=bool(mem <= 0.5)),
    ]
