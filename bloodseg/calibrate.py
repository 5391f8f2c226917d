"""Solver calibration: choose a cheaper ODE solver for a trained network on validation data.

A trained NODEs-UNet keeps the solver it was trained with (dopri5 at tight tolerances). Its
blocks often learn near-trivial flows, so a much cheaper solver (one Euler step per block) gives
the same masks at a fraction of the time. This module makes that a measured choice:

* a *solver spec* is a small dict: ``{"method": "euler", "steps": 1}`` (a fixed-grid method,
  ``steps`` equal steps over [0, t1]) or ``{"method": "dopri5", "rtol": 1e-2}`` (an adaptive
  method; ``atol`` defaults to ``rtol``). :func:`check_solver` validates and normalises one;
* :func:`trained_solver` reads every block's own settings, :func:`apply_solver` sets a spec on
  every ODE-block (``None`` with the trained settings restores them exactly);
* :data:`SOLVER_GRID` lists the candidates in order of nominal cost (f-evaluations per block);
* :func:`calibrate` scores the trained solver and every candidate on *validation* samples, times
  them, and picks the cheapest (by measured time) within ``max_drop_pp`` percentage points of the
  trained solver's score. Pass validation samples only: the test data must play no part in it.

:class:`bloodseg.Segmenter` stores the chosen spec as its ``solver`` setting.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import BloodsegError, SolverError
from .measure import interleaved_times
from .metrics import ConfusionMatrix
from .ode import ADAPTIVE_METHODS, FIXED_GRID_METHODS, ode_blocks

__all__ = ["SOLVER_GRID", "check_solver", "solver_label", "nominal_nfe", "trained_solver",
           "apply_solver", "miou_score", "white_iou_score", "calibrate"]

#: f-evaluations per step of the fixed-grid methods (torchdiffeq 0.2.5).
_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}

#: Candidates, cheapest first: fixed-grid methods by f-evaluations per block (stages x steps),
#: then dopri5 at loose tolerances (at least 8 evaluations, more as the flow asks), loosest first.
SOLVER_GRID: tuple = tuple(
    [{"method": m, "steps": n} for m, n in sorted(
        [(m, n) for m in ("euler", "midpoint", "rk4") for n in (1, 2, 4)],
        key=lambda mn: (_STAGES[mn[0]] * mn[1], _STAGES[mn[0]]))]
    + [{"method": "dopri5", "rtol": 1e-2}, {"method": "dopri5", "rtol": 1e-3}])


def check_solver(spec) -> dict:
    """A valid solver spec as a normalised plain dict, or :class:`BloodsegError` saying what is wrong.

    Fixed-grid: ``{"method": one of FIXED_GRID_METHODS, "steps": int >= 1}`` (steps default 1).
    Adaptive: ``{"method": one of ADAPTIVE_METHODS, "rtol": > 0, "atol": > 0}`` (atol default rtol).
    """
    if not isinstance(spec, Mapping):
        raise BloodsegError(f"a solver spec is a dict such as {{'method': 'euler', 'steps': 1}}, not {spec!r:.80}")
    method = spec.get("method")
    if method in FIXED_GRID_METHODS:
        steps = spec.get("steps", 1)
        if set(spec) - {"method", "steps"} or not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise BloodsegError(f"fixed-grid solver spec {dict(spec)!r:.120}: only 'method' and 'steps' "
                                "(a whole number >= 1) are allowed")
        return {"method": method, "steps": steps}
    if method in ADAPTIVE_METHODS:
        out = {"method": method}
        for key in ("rtol", "atol"):
            value = spec.get(key, out.get("rtol"))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise BloodsegError(f"adaptive solver spec {dict(spec)!r:.120}: {key} must be a positive number")
            out[key] = float(value)
        if set(spec) - {"method", "rtol", "atol"}:
            raise BloodsegError(f"adaptive solver spec {dict(spec)!r:.120}: only 'method', 'rtol', 'atol' are allowed")
        return out
    raise BloodsegError(f"unknown solver method {method!r:.40} in {dict(spec)!r:.120}: choose one of "
                        f"{', '.join(FIXED_GRID_METHODS + ADAPTIVE_METHODS)}")


def solver_label(spec) -> str:
    """A short name: ``"trained"`` for None, ``"euler-1"``, ``"dopri5-rtol0.01"``."""
    if spec is None:
        return "trained"
    spec = check_solver(spec)
    if "steps" in spec:
        return f"{spec['method']}-{spec['steps']}"
    atol = "" if spec["atol"] == spec["rtol"] else f"-atol{spec['atol']:g}"
    return f"{spec['method']}-rtol{spec['rtol']:g}{atol}"


def nominal_nfe(spec) -> float:
    """f-evaluations per block a spec costs: stages x steps (fixed grid); 8, dopri5's least
    (first-step choice + one step), for adaptive methods, which may take many more."""
    spec = check_solver(spec)
    return _STAGES[spec["method"]] * spec["steps"] if "steps" in spec else 8.0


def trained_solver(model: torch.nn.Module) -> list[dict]:
    """Each ODE-block's current settings ``{"method", "step_size", "rtol", "atol"}``, in module order.
    Read it on a freshly built network (as :class:`~bloodseg.Segmenter` does) to get the trained ones."""
    return [{"method": b.method, "step_size": b.step_size, "rtol": b.rtol, "atol": b.atol}
            for b in ode_blocks(model)]


def apply_solver(model: torch.nn.Module, spec, trained: Sequence[dict] | None = None) -> int:
    """Set every ODE-block of ``model`` to ``spec``; returns the number of blocks.

    ``spec=None`` leaves the trained solver: with ``trained`` (from :func:`trained_solver`) each
    block gets its recorded settings back exactly; without it nothing changes. Validates first, so
    a bad spec changes nothing. Fixed grid: ``step_size = t1 / steps`` (``None`` for one step).
    """
    blocks = ode_blocks(model)
    if spec is None:
        if trained is not None:
            if len(trained) != len(blocks):
                raise BloodsegError(f"{len(trained)} recorded block settings for {len(blocks)} ODE-blocks")
            for block, s in zip(blocks, trained):
                block.method, block.step_size = s["method"], s["step_size"]
                block.rtol, block.atol = s["rtol"], s["atol"]
        return len(blocks)
    spec = check_solver(spec)
    for block in blocks:
        block.method = spec["method"]
        if "steps" in spec:
            block.step_size = None if spec["steps"] == 1 else block.t1 / spec["steps"]
        else:
            block.step_size = None
            block.set_tolerance(spec["rtol"], spec["atol"])
    return len(blocks)


def miou_score(preds: Sequence[np.ndarray], samples) -> float:
    """The default score: MIoU of ONE confusion matrix over all samples (3 classes)."""
    cm = ConfusionMatrix(3)
    for pred, s in zip(preds, samples):
        cm.update(torch.as_tensor(pred), torch.as_tensor(s.mask))
    return float(cm.scores()["miou"])


def white_iou_score(preds: Sequence[np.ndarray], samples) -> float:
    """Gold white-cell (class 1) IoU over all samples pooled, as :func:`bloodseg.paper.bccd.evaluate_bccd`."""
    tp = fp = fn = 0
    for pred, s in zip(preds, samples):
        pw, tw = np.asarray(pred) == 1, np.asarray(s.mask) == 1
        tp, fp, fn = tp + int((pw & tw).sum()), fp + int((pw & ~tw).sum()), fn + int((~pw & tw).sum())
    return tp / (tp + fp + fn) if tp + fp + fn else math.nan


def _run(seg, samples, postprocess, warmup: int) -> tuple[list, float, dict]:
    """Masks of every sample, seconds per image (after ``warmup`` untimed images), mean NFE per block
    (one round of :func:`~bloodseg.measure.interleaved_times`)."""
    device = next(seg.model.parameters()).device
    preds, nfe = [], {}

    def count(label, r, s):
        for b in ode_blocks(seg.model):   # the last forward of this image (one, unless it was tiled)
            key = b.name or "ODE-block"
            nfe[key] = nfe.get(key, 0) + int(b.nfe_forward)

    predict = lambda s: preds.append(seg.predict(s.image, postprocess=postprocess))   # noqa: E731
    elapsed = interleaved_times({"run": predict}, samples, 1, warmup, device=device, after=count)["run"][0]
    del preds[:min(warmup, len(samples))]      # the warm-up's masks
    n = max(len(samples), 1)
    return preds, elapsed / n, {k: v / n for k, v in nfe.items()}


def _interleaved_times(segs: dict, samples, postprocess) -> dict:
    """Seconds per image of each Segmenter in ``segs`` ({label: seg}), timed round-robin image by
    image (:func:`~bloodseg.measure.interleaved_times`, one image a round, the order rotating), so
    that load from other processes falls on all of them alike."""
    device = next(next(iter(segs.values())).model.parameters()).device
    fns = {label: (lambda s, seg=seg: seg.predict(s.image, postprocess=postprocess)) for label, seg in segs.items()}
    times = interleaved_times(fns, lambda r: [samples[r]], len(samples), device=device)
    return {label: sum(t) / max(len(samples), 1) for label, t in times.items()}


def calibrate(segmenter, samples, max_drop_pp: float = 0.3, score: Callable | None = None,
              grid: Sequence[dict] = SOLVER_GRID, postprocess=False, warmup: int = 1, time_images: int = 16,
              timings: Mapping[str, float] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Score and time the trained solver and every ``grid`` spec on VALIDATION ``samples``.

    ``segmenter``: a :class:`~bloodseg.Segmenter` (its ``solver`` is put back afterwards; the
    reference is always its trained solver). ``samples``: :class:`~bloodseg.io.Sample` list with
    gold masks, never the test data. ``score(preds, samples) -> float`` (higher is better, in
    [0, 1]; default :func:`miou_score`). ``postprocess``: as in ``Segmenter.predict`` (default
    False: the network's own masks, where the solver shows). ``timings``: seconds per image by
    :func:`solver_label`, used instead of the measured times (to test the choice rule).

    Time: each solver's scoring pass is timed (``pass_seconds_per_image``); the time the choice uses,
    ``seconds_per_image``, comes from a second pass over the first ``time_images`` samples in which
    the solvers take turns image by image (0: use the scoring passes' times), so that a burst of
    load from another process does not make one solver look slow.

    Rule: among the trained solver and the specs whose score is at least the trained score minus
    ``max_drop_pp`` percentage points (and that did not fail), the one with the least time per
    image; ``chosen`` is None when that is the trained solver. Returns ``{"rows": [{"label",
    "solver", "score", "drop_pp", "seconds_per_image", "pass_seconds_per_image", "nfe_per_block",
    "ok", "error"}],
    "chosen", "chosen_label", "reference", "max_drop_pp", "n_images", "seconds"}``.
    """
    samples = list(samples)
    if not samples:
        raise BloodsegError("calibrate needs at least one validation sample (image + gold mask)")
    if isinstance(max_drop_pp, bool) or not isinstance(max_drop_pp, (int, float)) or not max_drop_pp >= 0:
        raise BloodsegError(f"max_drop_pp must be a number >= 0 (percentage points), got {max_drop_pp!r}")
    score = miou_score if score is None else score
    specs = [None] + [check_solver(s) for s in grid]
    t_start, rows = time.perf_counter(), []
    try:
        for spec in specs:
            label = solver_label(spec)
            row = {"label": label, "solver": spec, "ok": True, "error": None}
            try:
                preds, secs, nfe = _run(segmenter.replace(solver=spec), samples, postprocess, warmup)
                row.update(score=float(score(preds, samples)), nfe_per_block=nfe)
            except SolverError as exc:
                row.update(ok=False, error=str(exc), score=None, nfe_per_block={})
                secs = math.nan
            row["pass_seconds_per_image"] = row["seconds_per_image"] = secs
            rows.append(row)
            if log:
                log(f"{label:>18}: score {row['score']}, {secs:.4f} s/image, NFE {nfe if row['ok'] else '-'}")
        ok = {r["label"]: segmenter.replace(solver=r["solver"]) for r in rows if r["ok"]}
        if time_images and not timings:
            for label, secs in _interleaved_times(ok, samples[:time_images], postprocess).items():
                next(r for r in rows if r["label"] == label)["seconds_per_image"] = secs
        for r in rows:
            if timings and r["label"] in timings:
                r["seconds_per_image"] = float(timings[r["label"]])
    finally:
        segmenter.replace()   # puts the segmenter's own solver back on the shared network
    ref = rows[0]
    if not ref["ok"]:
        raise BloodsegError(f"the trained solver failed on the validation samples: {ref['error']}")
    for r in rows:
        r["drop_pp"] = None if r["score"] is None else 100.0 * (ref["score"] - r["score"])
    eligible = [r for r in rows if r["ok"] and r["drop_pp"] <= max_drop_pp + 1e-9
                and math.isfinite(r["seconds_per_image"])]
    best = min(eligible, key=lambda r: r["seconds_per_image"])   # ties: the earlier (cheaper) entry
    return {"rows": rows, "chosen": best["solver"], "chosen_label": best["label"],
            "reference": {"label": "trained", "solver": trained_solver_of(segmenter), "score": ref["score"],
                          "seconds_per_image": ref["seconds_per_image"], "nfe_per_block": ref["nfe_per_block"]},
            "max_drop_pp": float(max_drop_pp), "n_images": len(samples),
            "seconds": time.perf_counter() - t_start}


def trained_solver_of(segmenter) -> list[dict]:
    """The trained per-block settings a Segmenter recorded (or the network's current ones)."""
    recorded = getattr(segmenter, "trained", None)
    return [dict(s) for s in recorded] if recorded is not None else trained_solver(segmenter.model)
