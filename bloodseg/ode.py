"""ODE-blocks: a layer whose output is the solution of dh/dt = f(h, t, θ) (paper §3.1, eq. 3–5).

An :class:`ODEBlock` takes a feature map ``x`` as the initial value ``h(0) = x`` and returns
``h(t1)`` (``t1 = 1``), computed by a torchdiffeq solver (or another backend, below). With an adaptive solver (``dopri5``, the
default) the error tolerance decides how many times f is evaluated (the NFE): a tighter tolerance
means more evaluations, which the paper reads as a deeper network with the same parameters.

Pieces, in reading order:

* :class:`ConcatConv2d` – a 3x3 convolution that also sees the time ``t`` as an extra constant
  input channel, so f can depend on t as eq. (3) asks.
* :class:`ODEFunc` – f itself: GroupNorm → activation → t-conv → GroupNorm → activation → t-conv →
  GroupNorm, the shape of Chen et al.'s ``ODEfunc``, with a smooth activation (softplus or tanh)
  so the adaptive solver sees no ReLU kinks, and no in-place op anywhere (in-place ops break the
  adjoint, torchdiffeq issue 72).
* :class:`ODEBlock` – solves the ODE, counts evaluations of f in two buffers (``nfe_forward`` and
  ``nfe_backward``), and never hangs: a step cap goes to torchdiffeq *and* is enforced by bloodseg
  itself, in the forward solve and in the adjoint's backward solve, and every failure ("max steps",
  "underflow in dt", non-finite state) becomes a :class:`~bloodseg.errors.SolverError` that names
  the block, its solver and tolerances, and what to do. How the solve runs (the counting dynamics,
  torchdiffeq's checks, the ``backend``: torchdiffeq, torchode or an unrolled loop) is in
  :mod:`bloodseg.odesolve`.
* :class:`ResidualBlock` – ``h + f(0, h)``: the ResNet view of the same f. It equals one Euler step
  of size 1 (``ODEBlock(method="euler", step_size=1.0)``) with the same weights, which is the
  paper's argument (§4.2) that a residual network is a discretised ODE.
* :func:`set_tolerance`, :func:`set_backend`, :func:`ode_blocks`, :func:`nfe_report` – one call for
  every ODE-block of a model (the test-time tolerance of §4.2, the NFE log of the book).
* Regularised training (Finlay et al. 2020, RNODE): ``block.regularise = dict(kinetic=a,
  jacobian=b)``; the penalties are in :mod:`bloodseg.regularise` (:func:`check_regularise` and
  :func:`regularisation_loss` are re-exported here).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .errors import BloodsegError, SolverError
from .odesolve import BACKENDS, Dynamics as _Dynamics, check_backend, solve
from .regularise import REGULARISERS, check_regularise, regularisation_loss

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_GRID_METHODS",
    "ConcatConv2d",
    "ODEFunc",
    "ODEBlock",
    "ResidualBlock",
    "BACKENDS",
    "set_tolerance",
    "set_backend",
    "ode_blocks",
    "nfe_report",
    "REGULARISERS",
    "check_regularise",
    "regularisation_loss",
]

#: Solvers with an error estimate: the tolerance decides the number of steps.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: Solvers on a fixed grid of ``step_size`` (the whole interval in one step when it is ``None``).
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
# torchdiffeq's Adams and scipy solvers are left out: they do not report their steps through
# ``callback_step`` the same way, so bloodseg could not bound them.

_ACTIVATIONS = {"softplus": nn.Softplus, "tanh": nn.Tanh}


def _groups(channels: int) -> int:
    """The largest number of GroupNorm groups that is at most 8 and divides ``channels``."""
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


def _check_tolerance(name: str, value) -> float:
    """Return ``value`` as a float if it is a usable solver tolerance, else raise BloodsegError."""
    if isinstance(value, bool):
        raise BloodsegError(f"{name} must be a positive number such as 1e-3, not {value!r}")
    try:
        tol = float(value)
    except (TypeError, ValueError):
        raise BloodsegError(f"{name} must be a positive number such as 1e-3, not {value!r}") from None
    if not math.isfinite(tol) or tol <= 0:
        raise BloodsegError(
            f"{name} must be a positive, finite number such as 1e-3 (the paper uses 1e-3 for a single "
            f"block, 1e-4 and 1e-6 for NODEs-UNet); got {value!r}")
    return tol


class ConcatConv2d(nn.Module):
    """A convolution of ``[t-plane, x]``: the time enters f as one extra constant input channel
    (``t`` a scalar, or one time per sample as torchode passes it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        plane = t.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return self.conv(torch.cat([plane, x], dim=1))


class ODEFunc(nn.Module):
    """f(t, h): GroupNorm → act → t-conv → GroupNorm → act → t-conv → GroupNorm.

    ``hidden`` (default ``channels``) is the width between the two convolutions: a narrower f is
    cheaper per evaluation and has fewer parameters. ``activation`` is ``"softplus"`` (default, a
    smooth ReLU) or ``"tanh"``. GroupNorm uses the largest group count ≤ 8 that divides the width.
    """

    def __init__(self, channels: int, hidden: int | None = None, activation: str = "softplus"):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise BloodsegError(f"ODEFunc channels must be a positive integer, got {channels!r}")
        hidden = channels if hidden is None else hidden
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise BloodsegError(f"ODEFunc hidden width must be a positive integer or None, got {hidden!r}")
        if activation not in _ACTIVATIONS:
            raise BloodsegError(
                f"unknown activation {activation!r}: choose one of {', '.join(_ACTIVATIONS)} "
                "(smooth activations only, so the adaptive solver sees no kinks)")
        self.channels, self.hidden, self.activation = channels, hidden, activation
        act = _ACTIVATIONS[activation]
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.act1 = act()
        self.conv1 = ConcatConv2d(channels, hidden)
        self.norm2 = nn.GroupNorm(_groups(hidden), hidden)
        self.act2 = act()
        self.conv2 = ConcatConv2d(hidden, channels)
        self.norm3 = nn.GroupNorm(_groups(channels), channels)

    def forward(self, t, h: torch.Tensor) -> torch.Tensor:
        out = self.conv1(t, self.act1(self.norm1(h)))
        out = self.conv2(t, self.act2(self.norm2(out)))
        return self.norm3(out)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is active for ``device_type`` (torch >= 2.4 API, older CUDA-only form)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return device_type == "cuda" and torch.is_autocast_enabled()


class ODEBlock(nn.Module):
    """h(t1) where dh/dt = f(t, h), h(0) = x (paper §3.1, Fig. 4): an ODE-block.

    Args:
        channels: feature channels of ``x`` (input and output have the same shape).
        rtol, atol: solver tolerances; ``atol=None`` means ``atol = rtol`` (the paper gives one
            "error tolerance" per block).
        method: a torchdiffeq solver, one of :data:`ADAPTIVE_METHODS` or :data:`FIXED_GRID_METHODS`.
        step_size: step of a fixed-grid method (``None``: one step over the whole interval).
        adjoint: backpropagate with the adjoint method (memory O(1) in the number of steps, but an
            extra backward solve: it saves memory, not time).
        max_steps: cap on solver steps (attempted, rejected ones included) per solve, forward or
            backward; past it a :class:`SolverError` is raised instead of running on.
        t1: end time of the integration (from 0).
        hidden: inner width of the default f (see :class:`ODEFunc`).
        name: how errors and :func:`nfe_report` call this block, e.g. ``"ODE-block at position 5"``.
        func: another f(t, h) module to use instead of ``ODEFunc(channels, hidden)``.
        backend: where the solve runs, one of :data:`BACKENDS` (see :mod:`bloodseg.odesolve`):
            ``"torchdiffeq"`` (default: every method, the adjoint, regularisation), ``"torchode"``
            (dopri5, a step size per sample) or ``"unrolled"`` (euler, midpoint, rk4 as a plain loop,
            the same numbers as torchdiffeq's). Not stored in checkpoints: a run-time choice.

    Regularised training: ``block.regularise = dict(kinetic=a, jacobian=b)`` (see the module
    docstring and :func:`check_regularise`); in training mode with gradients on, each forward then
    sets ``block.reg_loss`` (a scalar with grad, else ``None``) for the loss to add.

    Buffers (``persistent=False``: they follow ``.to(device)`` and DDP but stay out of
    ``state_dict``, so checkpoints do not depend on them):
        nfe_forward: evaluations of f in the last forward solve (reset at each forward).
        nfe_backward: evaluations of f during backward since the last forward. With the adjoint
            these are real calls of f in the backward solve. With direct backprop torchdiffeq does
            not call f again; we report the number of f-evaluation graphs backpropagated through,
            i.e. the forward NFE, added when the gradient actually reaches the block's output.
    """

    def __init__(self, channels: int, rtol: float = 1e-3, atol: float | None = None,
                 method: str = "dopri5", step_size: float | None = None, adjoint: bool = False,
                 max_steps: int = 1000, t1: float = 1.0, hidden: int | None = None, name: str = "",
                 func: nn.Module | None = None, backend: str = "torchdiffeq"):
        super().__init__()
        if method not in ADAPTIVE_METHODS + FIXED_GRID_METHODS:
            raise BloodsegError(
                f"unknown ODE solver method {method!r}: choose an adaptive one "
                f"({', '.join(ADAPTIVE_METHODS)}) or a fixed-grid one ({', '.join(FIXED_GRID_METHODS)})")
        if step_size is not None:
            if method in ADAPTIVE_METHODS:
                raise BloodsegError(
                    f"step_size applies to fixed-grid methods ({', '.join(FIXED_GRID_METHODS)}) only; "
                    f"{method} chooses its own steps from rtol/atol")
            step_size = _check_tolerance("step_size", step_size)
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise BloodsegError(f"max_steps must be a positive integer, got {max_steps!r}")
        t1 = _check_tolerance("t1 (the end time of the integration)", t1)
        self.func = ODEFunc(channels, hidden) if func is None else func
        self.method = method
        self.step_size = step_size
        self.adjoint = bool(adjoint)
        self.max_steps = max_steps
        self.t1 = t1
        self.backend = check_backend(backend, method, self.adjoint)
        self.name = str(name)
        self.rtol = self.atol = 0.0
        self.set_tolerance(rtol, atol)
        self.register_buffer("nfe_forward", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("nfe_backward", torch.zeros((), dtype=torch.long), persistent=False)
        self._regularise: dict = {}
        self.reg_loss: torch.Tensor | None = None

    @property
    def regularise(self) -> dict:
        """Weights of the training penalties, ``{"kinetic": a, "jacobian": b}``; ``{}``: none."""
        return dict(self._regularise)

    @regularise.setter
    def regularise(self, value) -> None:
        self._regularise = check_regularise(value)

    def set_tolerance(self, rtol: float, atol: float | None = None) -> None:
        """Change the solver tolerances (``atol=None``: ``atol = rtol``); takes effect next forward."""
        label = f" of {self.name}" if self.name else ""
        rtol = _check_tolerance(f"rtol{label}", rtol)
        atol = rtol if atol is None else _check_tolerance(f"atol{label}", atol)
        self.rtol, self.atol = rtol, atol

    def _options(self) -> dict:
        if self.method in ADAPTIVE_METHODS:
            # +1: bloodseg's own check in callback_step fires first with a clearer message;
            # torchdiffeq's assertion stays as a backstop.
            return dict(max_num_steps=self.max_steps + 1)
        return {} if self.step_size is None else dict(step_size=self.step_size)

    def _solver_error(self, what: str, phase: str) -> SolverError:
        who = self.name or "ODE-block"
        return SolverError(
            f"{who} could not finish its {phase} solve ({self.method}, rtol={self.rtol:g}, "
            f"atol={self.atol:g}, max_steps={self.max_steps}): {what}. What to do: raise the "
            "tolerance (bloodseg.ode.set_tolerance(model, 1e-3)), lower the learning rate, add weight "
            "decay, or raise max_steps.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) or _autocast_on(x.device.type):
            # Mixed precision (TrainConfig.bf16): an adaptive solver cannot meet rtol 1e-4..1e-6
            # with 8 bits of mantissa in f or in the state; it shrinks its steps instead (NODEs-UNet's
            # bottom block: ~30x the NFE under bf16 autocast). The solve runs in float32.
            with torch.autocast(x.device.type, enabled=False):
                return self._solve(x.float())
        return self._solve(x)

    def _solve(self, x: torch.Tensor) -> torch.Tensor:
        regularise = self._regularise if self.training and torch.is_grad_enabled() else None
        dyn = _Dynamics(self, regularise)
        params = tuple(p for p in self.func.parameters() if p.requires_grad)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or len(params) > 0)
        self.reg_loss = None
        out = solve(self, dyn, x, needs_grad, params)
        if regularise:
            out, kinetic, jacobian = out
            energy = {"kinetic": kinetic.mean(), "jacobian": jacobian.mean()}
            self.reg_loss = sum(w * energy[k] for k, w in regularise.items())
        if not bool(torch.isfinite(out).all()):
            raise self._solver_error("non-finite values (NaN or inf) in the state at the end time", "forward")
        self.nfe_forward.fill_(dyn.calls["forward"])
        self.nfe_backward.zero_()
        if not self.adjoint and out.requires_grad:
            out.register_hook(dyn.direct_backward_hook)
        return out

    def extra_repr(self) -> str:
        parts = [f"method={self.method!r}", f"rtol={self.rtol:g}", f"atol={self.atol:g}",
                 f"max_steps={self.max_steps}", f"adjoint={self.adjoint}"]
        if self.step_size is not None:
            parts.append(f"step_size={self.step_size:g}")
        if self.t1 != 1.0:
            parts.append(f"t1={self.t1:g}")
        if self.backend != "torchdiffeq":
            parts.append(f"backend={self.backend!r}")
        if self._regularise:
            parts.append(f"regularise={self._regularise}")
        if self.name:
            parts.insert(0, f"name={self.name!r}")
        return ", ".join(parts)


class ResidualBlock(nn.Module):
    """``h + f(0, h)``: the residual (ResNet) view of an ODE function ``f``.

    With the same ``func`` this is exactly one Euler step of size 1 from t = 0, i.e. what
    ``ODEBlock(method="euler", step_size=1.0)`` computes (paper §4.2).
    """

    def __init__(self, func: Callable):
        super().__init__()
        self.func = func

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t0 = torch.zeros((), dtype=h.dtype, device=h.device)
        return h + self.func(t0, h)


def ode_blocks(model: nn.Module) -> list[ODEBlock]:
    """Every :class:`ODEBlock` inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ODEBlock)]


def set_tolerance(model: nn.Module, rtol: float, atol: float | None = None) -> int:
    """Set ``rtol``/``atol`` (``atol=None``: = rtol) of every ODE-block in ``model``.

    Used at test time (paper §4.2: a looser tolerance evaluates f fewer times and segments
    faster). Validates first, so a bad value changes nothing. Returns the number of blocks set.
    """
    rtol = _check_tolerance("rtol", rtol)
    atol = rtol if atol is None else _check_tolerance("atol", atol)
    blocks = ode_blocks(model)
    for block in blocks:
        block.set_tolerance(rtol, atol)
    return len(blocks)


def set_backend(model: nn.Module, backend: str) -> int:
    """Solve every ODE-block of ``model`` with ``backend`` (one of :data:`BACKENDS`); returns the
    number of blocks. Validates first (against each block's method and adjoint), so a backend that
    cannot solve one of the blocks changes nothing."""
    blocks = ode_blocks(model)
    for block in blocks:
        check_backend(backend, block.method, block.adjoint)
    for block in blocks:
        block.backend = backend
    return len(blocks)


def nfe_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{block name: (forward NFE, backward NFE)}`` for every ODE-block of ``model``.

    A block without a name is listed under its module path. Read it after a training step (or a
    forward pass); the values are those of the last forward/backward of each block.
    """
    report = {}
    for path, module in model.named_modules():
        if isinstance(module, ODEBlock):
            key = module.name or path or "ODE-block"
            report[key] = (int(module.nfe_forward), int(module.nfe_backward))
    return report
