"""The side-by-side bench of every way to run the study's networks (issue #16 "Fast NODEs-UNet").

An ODE-block costs ``NFE x cost(f)``: every evaluation of f is two 3x3 convolutions over the
block's feature map, and an adaptive solver at the paper's tolerances evaluates f tens of times per
forward. :func:`bench_options` -> ``speed/bench.json`` (``bloodseg record cheap-bench``) benches, in
one process with one thread, every way to run the study's networks on the same 20 test patches:
U-Net, ResNet U-Net, the single-block ODE-UNet (position 5), NODEs-UNet with dopri5 at its trained
tolerances, the same network with the fixed-grid solver that calibration picks on the *validation*
patches (:func:`~bloodseg.paper.units.calibration_pick`), its ONNX export (:mod:`bloodseg.export`;
held against the U-Net's own ONNX export, so that the goal compares like with like), the narrow-f
NODEs-UNet (``nodes-unet-h16``), and the RNODE-regularised NODEs-UNet with its unregularised twin
when :mod:`bloodseg.paper.regularise` has trained them; then the ways to run the same weights
faster (:func:`variant_options`): NODEs-UNet's dopri5 solved by torchode instead of torchdiffeq,
the calibrated solver as an unrolled loop instead of torchdiffeq's fixed grid
(:mod:`bloodseg.odesolve`), ``channels_last`` and ``torch.compile`` (inductor) of the U-Net and of
the calibrated NODEs-UNet, each also held against the option it varies (``ratio_to_base``, same
rounds) and kept only where that interval lies below 1 (``pays``). Rounds are interleaved (each
round times every option on the 20 images, the order rotating), so that load from other processes
falls on all of them alike; per option: the time for 20 images (median over rounds), the ratio to
the U-Net's time *in the same round* (median over rounds, bootstrap interval over rounds), forward
NFE, multiply-accumulates (MACs) actually executed, parameters, and the test MIoU on all test
patches. The tables and the prose of the chapter come from the record (:func:`bench_frame`,
:func:`bench_findings`, :func:`variants_findings`, :func:`bench_summary`); :func:`floor_table` is
the arithmetic floor (MACs) the times are held against.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..calibrate import apply_solver, nominal_nfe, trained_solver
from ..errors import BloodsegError
from ..models import count_parameters
from ..ode import ode_blocks, set_backend
from ..odesolve import UNROLLED_METHODS
from ..registry import build_variant, title
from ..segmenter import Segmenter
from . import stats
from .records import load_record, provenance, results_path, write_record
from .reproduce import prepare_data, scale_recipe
from .units import (BENCH_LABELS, GOAL_RATIO, RECORD_BENCH, REGULARISE_WORK, calibration_pick, copy_units, count_macs,
                    find_units, load_net, network_times, ratio_summary, regularise_units, test_scores)

__all__ = ["variant_options", "bench_options", "bench_frame", "bench_findings", "variants_frame",
           "variants_repeat_frame", "variants_findings", "bench_summary", "study_units_frame", "floor_table",
           "run_record"]

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
            units = {u["label"]: u for u in find_units(BENCH_LABELS, (seed,), root, scale).values()}
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

        calibrations = {}
        for label in BENCH_LABELS:
            if label not in units:
                continue
            u = units[label]
            net = load_net(u["ckpt"])
            has_ode = bool(ode_blocks(net))
            add(label, net, model=label, name=title(label), unit=u.get("source", u["ckpt"]), solver="trained"
                if has_ode else None, trained_solver=trained_solver(net) if has_ode else None, runtime="torch",
                study_record_miou=u.get("test_miou"))
            if onnx and label == "unet":       # the reference of the ONNX options: the same runtime
                from ..export import OnnxNetwork, export_onnx
                path = export_onnx(Segmenter(net), tmp / "unet.onnx")
                add("unet onnx", OnnxNetwork(path, threads=torch.get_num_threads()), model=label,
                    name=f"{title(label)}, ONNX", unit=u.get("source", u["ckpt"]), solver=None, runtime="onnxruntime",
                    macs_from="unet", params_from="unet", nfe_nominal={})
            if has_ode:
                log(f"{label}: calibrating on {len(val)} validation patches ...")
                cal = calibration_pick(net, val, max_drop_pp)
                calibrations[label] = cal
                log(f"  pick {cal['pick_label']} (drop {cal['pick_drop_pp']:.3f} pp; calibrate's time pick "
                    f"{cal['calibrate_time_pick']})")
                if cal["pick"] is not None:
                    cnet = load_net(u["ckpt"])
                    apply_solver(cnet, cal["pick"])
                    add(f"{label} {cal['pick_label']}", cnet, model=label, name=f"{title(label)}, calibrated",
                        unit=u.get("source", u["ckpt"]), solver=cal["pick_label"], spec=cal["pick"], runtime="torch",
                        calibrated=True)
                    if onnx and label == "nodes-unet":
                        from ..export import OnnxNetwork, export_onnx
                        path = export_onnx(Segmenter(cnet, solver=cal["pick"]), tmp / "nodes-unet.onnx")
                        add(f"{label} {cal['pick_label']} onnx", OnnxNetwork(path, threads=torch.get_num_threads()),
                            model=label, name=f"{title(label)}, calibrated, ONNX", unit=u.get("source", u["ckpt"]),
                            solver=cal["pick_label"], spec=cal["pick"], runtime="onnxruntime", calibrated=True,
                            macs_from=f"{label} {cal['pick_label']}", params_from=f"{label} {cal['pick_label']}",
                            nfe_nominal={b.name: nominal_nfe(cal["pick"]) for b in ode_blocks(cnet)})
        variant_notes = {} if torch.cuda.is_available() else {
            "bf16 on CUDA": "not measured: this bench runs on a CPU, and this machine has no CUDA device"}
        if variants:
            fresh = {k: (lambda c=units[k]["ckpt"]: load_net(c)) for k in ("unet", "nodes-unet") if k in units}
            cal = calibrations.get("nodes-unet", {})
            found, more = variant_options(fresh, cal.get("pick"), cal.get("pick_label", "trained"), images[0],
                                          compile_backend=compile_backend, compile_cache=tmp / "inductor", log=log)
            variant_notes.update(more)
            for label, v in found.items():
                add(label, v["net"], **{**options[v["base"]]["meta"], **v["meta"], "base": v["base"],
                                        "macs_from": v["base"], "params_from": v["base"]})
        for name, u in reg.items():
            add(f"nodes-unet {u['arm']} {u['epochs']}ep", load_net(u["ckpt"]), model="nodes-unet",
                name=f"NODEs-UNet, {u['epochs']} epochs, " + ("RNODE-regularised" if u["arm"] == "regularised" else "unregularised"),
                unit=u["source"], solver="trained", runtime="torch", ode_reg=u["ode_reg"], epochs=u["epochs"],
                regularise_unit_miou=u["test_miou"])
        log(f"timing {len(options)} options, {rounds} rounds of {len(images)} images ...")
        timing = network_times({k: v["net"] for k, v in options.items()}, images, rounds=rounds)
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
        record["provenance"] = provenance(command, t_start,
                                          load_average_1_5_15_min=dict(start=load_start, end=load_end))
        if out is not None:
            write_record(record, Path(out))
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
        if r.get("variant") or r["runtime"] != "torch" or r["model"] not in BENCH_LABELS or r.get("ode_reg") is not None:
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


def floor_table(width: int = 8, size: int = 128, model: str = "nodes-unet", nfe_totals=(3, 6, 12, 24, 48, 66)) -> dict:
    """The arithmetic floor of ``model`` against the U-Net at ``width`` on one ``size`` x ``size``
    patch (:func:`count_macs` on random weights; MACs do not depend on the weights, NFE does):
    ``dict(unet_mmacs, backbone_mmacs, f_mmacs_per_eval={block: ..}, rows=[dict(nfe_total,
    mmacs, ratio_to_unet)], nfe_at_goal)``. A row spreads ``nfe_total`` evenly over the blocks;
    ``nfe_at_goal`` is the total NFE at which the MACs reach :data:`GOAL_RATIO` x the U-Net's."""
    x = torch.rand(1, 3, size, size)
    torch.manual_seed(0)
    unet = count_macs(build_variant("unet", width=width).eval(), x)
    torch.manual_seed(0)
    net = build_variant(model, width=width, method="euler").eval()
    macs = count_macs(net, x)
    per_eval = {k: v["f_mmacs_per_eval"] for k, v in macs["blocks"].items()}
    mean_f = float(np.mean(list(per_eval.values())))
    rows = [dict(nfe_total=int(n), mmacs=macs["backbone_mmacs"] + n * mean_f,
                 ratio_to_unet=(macs["backbone_mmacs"] + n * mean_f) / unet["total_mmacs"]) for n in nfe_totals]
    at_goal = (GOAL_RATIO * unet["total_mmacs"] - macs["backbone_mmacs"]) / mean_f
    return dict(width=width, size=size, model=model, unet_mmacs=unet["total_mmacs"], backbone_mmacs=macs["backbone_mmacs"],
                f_mmacs_per_eval=per_eval, rows=rows, nfe_at_goal=at_goal)


def run_record(args, command: str) -> None:
    """``bloodseg record cheap-bench``: the bench of the study's units of ``--seeds``' first seed;
    ``--work``: the folder of the regularisation pair (default runs/regularise)."""
    import functools
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    bench_options(scale=args.scale, seed=seeds[0], n_images=args.images or 20, rounds=args.rounds or 7,
                  root=args.study_root, regularise_work=Path(args.work) if args.work else REGULARISE_WORK,
                  notes=args.notes, out=args.out or results_path(RECORD_BENCH), command=command,
                  log=functools.partial(print, flush=True))

