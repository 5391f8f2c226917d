"""Adjoint vs direct backprop (paper §4.2): time and peak memory of a NODEs-UNet training step,
and what the adjoint carries per ODE-block.
"""
from __future__ import annotations

from ..models import position_scale
from .bench import training_step_cost


def adjoint_memory(ckpt: str | None, width: int, size: int, batch: int = 2, rtol: float = 1e-6,
                   unet_ckpt: str | None = None) -> list[dict]:
    """Training-step time and peak memory of NODEs-UNet with direct backprop and with the adjoint,
    every block at ``rtol``, plus the U-Net for reference (see :mod:`bloodseg.paper.bench` for how)."""
    rows = []
    base = training_step_cost("unet", width, size, batch, adjoint=None, ckpt=unet_ckpt)
    rows.append(dict(model="unet", backprop="direct", rtol=None, **_cost(base)))
    for adj in (False, True):
        c = training_step_cost("nodes-unet", width, size, batch, adjoint=adj, ckpt=ckpt, options=dict(rtol=rtol))
        rows.append(dict(model="nodes-unet", backprop="adjoint" if adj else "direct", rtol=rtol, **_cost(c)))
    return rows


def _cost(c: dict) -> dict:
    return {k: c.get(k) for k in ("step_s", "peak_mb", "saved_mb", "nfe_forward", "nfe_backward", "memory_how", "error")}


def ode_memory_table(model, size: int, batch: int) -> list[dict]:
    """Per ODE-block of ``model``: the state the adjoint carries (``batch x C x side x side``) next
    to the parameters of f, in MB of float32.

    torchdiffeq's adjoint integrates an augmented state backwards: the block's state, its adjoint,
    and the adjoint of *every parameter of f*; each Runge-Kutta stage holds all of them. Direct
    backprop instead keeps the activations of every evaluation of f (about NFE x a few states).
    So the adjoint saves most where the feature map is large and f small (high resolution, top of
    the U) and little where f's parameters outweigh its feature map (the bottom of the U).
    """
    rows = []
    for name, module in model.named_modules():
        if module.__class__.__name__ == "ODEBlock":
            pos = int(module.name.rsplit(" ", 1)[-1]) if module.name.split()[-1].isdigit() else None
            side = size // position_scale(pos) if pos else None
            ch = getattr(module.func, "channels", None)
            state = batch * ch * side * side * 4 / 2 ** 20 if (side and ch) else float("nan")
            fparams = sum(p.numel() for p in module.func.parameters()) * 4 / 2 ** 20
            rows.append(dict(block=module.name or name, channels=ch, side=side, state_mb=state,
                             f_params_mb=fparams, params_per_state=fparams / state if state else float("nan")))
    return rows
