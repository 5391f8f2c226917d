"""Why a regulariser cannot halve NODEs-UNet's NFE (issue #16): the adaptive solver's own floor.

dopri5 (torchdiffeq) does not take one step over [0, t1] even for the simplest flow. It first
chooses a step size from the norms of h and f (Hairer, Nørsett & Wanner's starting-step rule: two
evaluations of f), and then lets the step grow by at most a factor of 10 per accepted step (six
evaluations each, the seventh reused). So a block's NFE has a floor set by the step controller,
whatever the learned dynamics are: a constant velocity f(t, h) = v, the easiest flow there is,
still costs a fixed number of evaluations, and a flow that is exactly zero costs *more* (the
starting rule then picks a tiny first step).

:func:`block_floors` measures, for every ODE-block of a trained model on real activations:

* ``trained``: NFE of the block's own f at its tolerances (what the model pays);
* ``constant``: NFE of the constant flow ``v = f(0, x)`` (the block's own initial velocity, frozen):
  the floor that any regularisation of f can approach but not pass;
* ``zero``: NFE of ``f = 0``;
* ``constant_curve``: NFE of the constant flow ``s * v`` for the factors :data:`VELOCITY_SCALES`
  (how much smaller f would have to be before the solver took fewer steps);
* ``first_step``: NFE of the block's own f when the solver starts with one step over the whole
  interval (torchdiffeq's ``first_step`` option), with the largest absolute difference of the
  result from the default solve — the controller still rejects a step whose error estimate is
  over the tolerance, so this keeps dopri5's error control and drops only the cautious start.

:func:`floor_record` applies it to the models named in the record and states the bound: the most
NFE that a regulariser can save on this solver is trained / constant.
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import torch
from torchdiffeq import odeint

from ..bccd import bccd_sample_dir
from ..checkpoint import load_model
from ..io import read_image
from ..ode import ode_blocks
from ..preprocess import image_to_tensor
from ..registry import build_variant
from ..segmenter import Segmenter, shipped_checkpoint
from .blocks import block_inputs
from .records import provenance, write_record
from .reproduce import prepare_data, scale_recipe
from .units import REGULARISE_WORK, regularise_units

#: The record, by its name under the results folder (``book/results``).
RECORD = "speed/nfe_floor.json"
#: Factors on the block's initial velocity for the constant-flow curve: how small would f have to be
#: for dopri5 to need fewer evaluations?
VELOCITY_SCALES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0)


def _nfe(func, x: torch.Tensor, block, **options) -> tuple[int, torch.Tensor]:
    calls = [0]

    def counted(t, h):
        calls[0] += 1
        return func(t, h)

    t = torch.tensor([0.0, block.t1], dtype=x.dtype, device=x.device)
    out = odeint(counted, x, t, rtol=block.rtol, atol=block.atol, method="dopri5", options=options)
    return calls[0], out[-1]


@torch.no_grad()
def block_floors(model: torch.nn.Module, images: torch.Tensor) -> list[dict]:
    """For each ODE-block of ``model`` (eval mode), run ``model(images)`` once to capture the block's
    input, then count dopri5's evaluations of f for the trained, constant and zero flows and with
    ``first_step`` = t1 (see the module docstring). Blocks are solved one by one on their own input."""
    model.eval()
    inputs = block_inputs(model, lambda: model(images))
    rows = []
    for i, block in enumerate(ode_blocks(model)):
        name = block.name or f"block {i}"
        x = inputs[name]
        v = block.func(torch.zeros((), dtype=x.dtype), x)
        trained, h_default = _nfe(block.func, x, block)
        constant, _ = _nfe(lambda t, h: v, x, block)
        zero, _ = _nfe(lambda t, h: torch.zeros_like(h), x, block)
        first, h_first = _nfe(block.func, x, block, first_step=float(block.t1))
        curve = [dict(scale=s, nfe=_nfe(lambda t, h, s=s: s * v, x, block)[0]) for s in VELOCITY_SCALES]
        rows.append(dict(block=name, rtol=block.rtol, atol=block.atol, trained=trained,
                         constant=constant, zero=zero, first_step=first, constant_curve=curve,
                         velocity_rms=float(v.pow(2).mean().sqrt()),
                         first_step_max_abs_diff=float((h_first - h_default).abs().max()),
                         state_rms=float(x.pow(2).mean().sqrt())))
    return rows


def summarise(rows: list[dict]) -> dict:
    """Totals over a model's blocks and the two ratios the record reports."""
    tot = {k: sum(r[k] for r in rows) for k in ("trained", "constant", "zero", "first_step")}
    return dict(totals=tot, max_saving_by_regularising=tot["trained"] / tot["constant"],
                saving_by_first_step=tot["trained"] / tot["first_step"])


def floor_record(models: dict, out=RECORD, command: str | None = None) -> dict:
    """``models``: ``{label: (model, images, what)}``; measures each and writes the record to ``out``
    (a path, or the default :data:`RECORD` under the results folder; None: not written)."""
    t0 = time.perf_counter()
    result = {}
    for label, (model, images, what) in models.items():
        rows = block_floors(model, images)
        result[label] = dict(what=what, input_shape=list(images.shape), blocks=rows, **summarise(rows))
    record = dict(
        what="dopri5 (torchdiffeq) evaluations of f per ODE-block on real activations: the trained flow, "
             "the constant flow v = f(0, x) (the controller's floor), f = 0, and the trained flow with "
             "first_step = t1; the same rtol/atol as the block",
        models=result, **provenance(command, t0))
    if out is not None:
        write_record(record, RECORD if out == RECORD else Path(out))
    return record


def record_default(out=RECORD, scale: str = "study", n_images: int = 2, command: str | None = None,
                   regularise_work=None, log=print) -> dict:
    """The record the book reads: an untrained NODEs-UNet (control), the regularisation pair of
    :mod:`bloodseg.paper.regularise` (seed 0, where trained) on the first ``n_images`` test patches
    of ``scale``, and the shipped checkpoint on ``n_images`` vendored BCCD photographs at its scale."""
    recipe = scale_recipe(scale)
    test = prepare_data(recipe)["test"]
    x = torch.stack([test[i][0] for i in range(n_images)])
    torch.manual_seed(0)
    models = {"untrained": (build_variant("nodes-unet", width=recipe.model.width).eval(), x,
                            f"NODEs-UNet, width {recipe.model.width}, untrained (seed 0): the control")}
    for name, u in regularise_units(regularise_work or REGULARISE_WORK, (0,)).items():
        models[name] = (load_model(u["ckpt"]).eval(), x,
                        f"NODEs-UNet, width {recipe.model.width}, {scale} recipe, {u['epochs']} epochs, "
                        f"{u['arm']} (ode_reg {u['ode_reg']}), seed 0: {u['unit']}")
    seg = Segmenter.load(shipped_checkpoint(), exact=True)
    photos = sorted((bccd_sample_dir() / "images").glob("*.jpg"))[:n_images]
    ims = [cv2.resize(read_image(p), None, fx=seg.input_scale, fy=seg.input_scale, interpolation=cv2.INTER_AREA)
           for p in photos]
    models["shipped"] = (seg.model.eval(), torch.stack([image_to_tensor(im, clahe=seg.clahe) for im in ims]),
                         f"the shipped checkpoint (BCCD, width 16), {len(photos)} vendored photographs at its input "
                         f"scale {seg.input_scale}: " + ", ".join(p.name for p in photos))
    for label in models:
        log(f"{label} ...")
    return floor_record(models, out=out, command=command)


def plot_floor(record: dict):
    """Per block: dopri5's NFE for a constant flow against the size of the flow (the curve), with
    the trained flow's NFE at its own size (a marker); one panel per model."""
    import matplotlib.pyplot as plt
    models = record["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.0), sharey=True, squeeze=False)
    for ax, (label, m) in zip(axes[0], models.items()):
        for i, b in enumerate(m["blocks"]):
            s = [c["scale"] for c in b["constant_curve"]]
            ax.step(s, [c["nfe"] for c in b["constant_curve"]], where="mid", color=f"C{i}", ls=("-", "--", ":")[i % 3],
                    label=b["block"].replace("ODE-block at position ", "position "))
            ax.plot([1.0], [b["trained"]], "o", color=f"C{i}", ms=7, mfc="none")
            ax.plot([1.0], [b["first_step"]], "x", color=f"C{i}", ms=7)
        ax.set_xscale("log")
        ax.set_xlabel("size of a constant flow\n(x the block's own f(0, x))")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dopri5 evaluations of f")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("line: constant flow; o: the trained f; x: the trained f with first_step = t1", fontsize=9)
    fig.tight_layout()
    return fig
