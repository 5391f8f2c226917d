"""Regularised training of ODE-blocks (Finlay et al. 2020, "How to train your neural ODE", RNODE).

With ``block.regularise = dict(kinetic=a, jacobian=b)`` an :class:`~bloodseg.ode.ODEBlock` in
training mode integrates, alongside h, the kinetic energy ∫ mean ||f||² dt and a Hutchinson
estimate ∫ mean ||ε^T ∂f/∂h||² dt of the Jacobian's Frobenius norm (means over the elements of one
sample, then over the batch), and stores ``a·E_kin + b·E_jac`` as ``block.reg_loss``;
:func:`regularisation_loss` collects them for the training loss. Dynamics that are cheap to
integrate need fewer solver steps. Unset (the default) the solve is exactly the plain one.

Pieces: :func:`check_regularise` (the weights), :func:`regularised_f` (f and the two energy rates
at one point of the solve), :func:`norm_of_h` (the step control of a regularised solve) and
:func:`regularisation_loss`. This module does not import :mod:`bloodseg.ode`, which uses it.
"""
from __future__ import annotations

import math

import torch

from .errors import BloodsegError

__all__ = ["REGULARISERS", "check_regularise", "regularised_f", "norm_of_h", "regularisation_loss"]

#: The penalties of regularised training (RNODE): ∫ mean ||f||² dt and ∫ mean ||∂f/∂h||_F² dt.
REGULARISERS = ("kinetic", "jacobian")


def check_regularise(value) -> dict:
    """``value`` (``{"kinetic": a, "jacobian": b}``, either key optional; ``None`` or ``{}``: off) as
    a dict of float weights without the zero ones; a bad key or weight is a BloodsegError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BloodsegError(f"ODE regularisation must be a dict such as {{'kinetic': 0.01, 'jacobian': 0.01}}, "
                            f"not {value!r}")
    unknown = sorted(set(map(str, value)) - set(REGULARISERS))
    if unknown:
        raise BloodsegError(f"unknown ODE regulariser(s) {', '.join(unknown)}: choose from {', '.join(REGULARISERS)}")
    for key, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise BloodsegError(f"the weight of the {key} regulariser must be a number >= 0, not {weight!r}")
    return {key: float(w) for key, w in value.items() if w > 0}


def regularised_f(func, t, h: torch.Tensor, weights: dict, eps: torch.Tensor | None):
    """``((f, d E_kin/dt, d E_jac/dt), eps)`` at ``(t, h)``: mean ||f||² and mean ||ε^T ∂f/∂h||² per
    sample, whose expectation over ε (Rademacher: E[εε^T] = I) is mean ||∂f/∂h||_F² (Hutchinson).

    ``eps``: Hutchinson's ε of this solve (None: drawn here, and returned for the caller to keep, so
    that one solve, the adjoint's backward solve included, uses one draw)."""
    graph = torch.is_grad_enabled()    # False only in the adjoint's forward solve: values only
    with torch.enable_grad():
        if not (graph and h.requires_grad):   # no history wanted or none to lose
            h = h.detach().requires_grad_()
        f = func(t, h)
        kinetic = f.pow(2).flatten(1).mean(1)
        if "jacobian" in weights:
            if eps is None:
                eps = torch.randint_like(h, 2) * 2 - 1
            (vjp,) = torch.autograd.grad(f, h, eps, create_graph=graph)
            jacobian = vjp.pow(2).flatten(1).mean(1)
        else:
            jacobian = torch.zeros_like(kinetic)
    if not graph:
        f, kinetic, jacobian = f.detach(), kinetic.detach(), jacobian.detach()
    return (f, kinetic, jacobian), eps


def norm_of_h(state) -> torch.Tensor:
    """Step-size control of a regularised solve: the RMS norm of h alone (torchdiffeq's default
    for one tensor), so the energies riding along do not change the steps taken on h."""
    return state[0].pow(2).mean().sqrt()


def regularisation_loss(model_or_blocks) -> torch.Tensor | None:
    """The sum of the ``reg_loss`` of every ODE-block (a model, whose modules with a ``reg_loss``
    attribute are its ODE-blocks, or a list of blocks) from its last forward, or ``None`` when none
    has one; the blocks' references are cleared (a stored graph would keep its memory alive and make
    the model impossible to ``deepcopy``)."""
    if isinstance(model_or_blocks, (list, tuple)):
        blocks = model_or_blocks
    else:
        blocks = [m for m in model_or_blocks.modules() if hasattr(m, "reg_loss")]
    losses = [b.reg_loss for b in blocks if b.reg_loss is not None]
    for b in blocks:
        b.reg_loss = None
    return sum(losses) if losses else None
