"""ODE-blocks: a layer whose output is the solution of dh/dt = f(h, t, θ) (paper §3.1, eq. 3–5).

An :class:`ODEBlock` takes a feature map ``x`` as the initial value ``h(0) = x`` and returns
``h(t1)`` (``t1 = 1``), computed by a torchdiffeq solver. With an adaptive solver (``dopri5``, the
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
  the block, its solver and tolerances, and what to do.
* :class:`ResidualBlock` – ``h + f(0, h)``: the ResNet view of the same f. It equals one Euler step
  of size 1 (``ODEBlock(method="euler", step_size=1.0)``) with the same weights, which is the
  paper's argument (§4.2) that a residual network is a discretised ODE.
* :func:`set_tolerance`, :func:`ode_blocks`, :func:`nfe_report` – one call for every ODE-block of
  a model (the test-time tolerance of §4.2, the NFE log of the book).
* Regularised training (Finlay et al. 2020, "How to train your neural ODE"): with
  ``block.regularise = dict(kinetic=a, jacobian=b)`` a block in training mode integrates, alongside
  h, the kinetic energy ∫ mean ||f||² dt and a Hutchinson estimate ∫ mean ||ε^T ∂f/∂h||² dt of the
  Jacobian's Frobenius norm (means over the elements of one sample, then over the batch), and
  stores ``a·E_kin + b·E_jac`` as ``block.reg_loss``; :func:`regularisation_loss` collects them for
  the training loss. Dynamics that are cheap to integrate need fewer solver steps. Unset (the
  default) the solve is exactly the plain one.

What torchdiffeq 0.2.5 does (read in its source, ``_impl/rk_common.py``): adaptive Runge–Kutta
solvers take ``options=dict(max_num_steps=N)`` and fail with ``AssertionError('max_num_steps
exceeded ...')``; a step size that vanishes fails with ``AssertionError('underflow in dt ...')``; a
non-finite state fails with ``AssertionError('non-finite values in state `y` ...')``. Fixed-grid
solvers take ``options=dict(step_size=...)`` and have no step cap. Every solver calls
``func.callback_step(t0, y0, dt)`` before each attempted step (and ``func.callback_step_adjoint``
in the adjoint's backward solve), *before* its own assertions: bloodseg does its checks there, so
that they also hold inside ``loss.backward()``, where a plain ``try``/``except`` around the solve
cannot reach.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from torchdiffeq import odeint, odeint_adjoint

from .errors import BloodsegError, SolverError

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_GRID_METHODS",
    "ConcatConv2d",
    "ODEFunc",
    "ODEBlock",
    "ResidualBlock",
    "set_tolerance",
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
    """A convolution of ``[t-plane, x]``: the time enters f as one extra constant input channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        plane = t.reshape(1, 1, 1, 1).expand(x.shape[0], 1, x.shape[2], x.shape[3])
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


class _Dynamics:
    """The callable handed to torchdiffeq for one solve: counts f-evaluations and solver steps.

    A fresh one is made at each forward. It is in phase ``"forward"`` while the forward solve runs
    and in phase ``"backward"`` afterwards: the only thing that can call it after the forward solve
    returned is the adjoint's backward solve (it is referenced by the autograd graph only), so no
    flag has to be set from outside. Each phase has its own step and evaluation caps.
    """

    def __init__(self, block: "ODEBlock", regularise: dict | None = None):
        self.block = block
        self.func = block.func
        self.regularise = regularise   # the state is then (h, E_kin, E_jac): see ``_regularised``
        self.eps = None                # Hutchinson's ε: one draw per solve, reused by the adjoint
        self.phase = "forward"
        self.calls = {"forward": 0, "backward": 0}
        self.steps = {"forward": 0, "backward": 0}
        # dopri5 costs 6 evaluations a step plus 2 to choose the first step: this cap only bites
        # when something evaluates f without taking steps; the step cap below is the usual stop.
        self.call_cap = 6 * block.max_steps + 10

    def __call__(self, t, h):
        phase = self.phase
        n = self.calls[phase] + 1
        self.calls[phase] = n
        if n > self.call_cap:
            raise self.block._solver_error(
                f"more than {self.call_cap} evaluations of f in one solve (hard cap 6*max_steps+10)", phase)
        if phase == "backward":
            self.block.nfe_backward.add_(1)
        if self.regularise:
            return self._regularised(t, h[0])
        return self.func(t, h)

    def _regularised(self, t, h):
        """``(f, d E_kin/dt, d E_jac/dt)``: mean ||f||² and mean ||ε^T ∂f/∂h||² per sample, whose
        expectation over ε (Rademacher: E[εε^T] = I) is mean ||∂f/∂h||_F² (Hutchinson)."""
        graph = torch.is_grad_enabled()    # False only in the adjoint's forward solve: values only
        with torch.enable_grad():
            if not (graph and h.requires_grad):   # no history wanted or none to lose
                h = h.detach().requires_grad_()
            f = self.func(t, h)
            kinetic = f.pow(2).flatten(1).mean(1)
            if "jacobian" in self.regularise:
                if self.eps is None:
                    self.eps = torch.randint_like(h, 2) * 2 - 1
                (vjp,) = torch.autograd.grad(f, h, self.eps, create_graph=graph)
                jacobian = vjp.pow(2).flatten(1).mean(1)
            else:
                jacobian = torch.zeros_like(kinetic)
        if not graph:
            f, kinetic, jacobian = f.detach(), kinetic.detach(), jacobian.detach()
        return f, kinetic, jacobian

    def callback_step(self, t0, y0, dt):
        """Called by torchdiffeq before every attempted step (accepted or rejected)."""
        phase = self.phase
        n = self.steps[phase] + 1
        self.steps[phase] = n
        block = self.block
        if n > block.max_steps:
            raise block._solver_error(f"more than max_steps={block.max_steps} solver steps", phase)
        states = y0 if isinstance(y0, (tuple, list)) else (y0,)
        t0 = torch.as_tensor(t0)
        dt = torch.as_tensor(dt, dtype=t0.dtype, device=t0.device)
        dt_ok = torch.isfinite(dt) & (t0 + dt != t0)
        finite = torch.stack([torch.isfinite(s).all() for s in states]).all().to(dt_ok.device)
        if bool((dt_ok & finite).item()):  # one device sync per step, as torchdiffeq's own checks
            return
        if not bool(finite.item()):
            where = "the block's input" if (phase == "forward" and n == 1) else f"step {n}"
            raise block._solver_error(
                f"non-finite values (NaN or inf) in the state at {where} (t={float(t0):.4g})", phase)
        raise block._solver_error(
            f"underflow in dt: the step size shrank to {float(dt):.3g} at t={float(t0):.4g} "
            f"after {n} steps (the dynamics are too stiff for this tolerance)", phase)

    # The adjoint's backward solve looks up ``callback_step_adjoint``; the phase tells them apart.
    callback_step_adjoint = callback_step

    def direct_backward_hook(self, grad):
        """Direct backprop: autograd walks back through the graph of every forward evaluation of
        f without calling f again; report that number as the backward NFE."""
        self.block.nfe_backward.add_(self.calls["forward"])
        return None


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
                 func: nn.Module | None = None):
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
        t = torch.tensor([0.0, self.t1], dtype=x.dtype, device=x.device)
        params = tuple(p for p in self.func.parameters() if p.requires_grad)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or len(params) > 0)
        options = self._options()
        y0, forward_options = x, options
        self.reg_loss = None
        if regularise:   # the energies start at 0; the step control looks at h alone, as unregularised
            zero = x.new_zeros(x.shape[0])
            y0 = (x, zero, zero)
            if self.method in ADAPTIVE_METHODS:
                forward_options = dict(options, norm=_norm_of_h)
        try:
            if self.adjoint and needs_grad:
                solution = odeint_adjoint(
                    dyn, y0, t, rtol=self.rtol, atol=self.atol, method=self.method, options=forward_options,
                    adjoint_options=dict(options), adjoint_params=params)
            else:
                solution = odeint(dyn, y0, t, rtol=self.rtol, atol=self.atol, method=self.method,
                                  options=forward_options)
        except AssertionError as err:  # torchdiffeq's own checks (the backstop)
            raise self._solver_error(f"torchdiffeq stopped: {err}", "forward") from err
        finally:
            dyn.phase = "backward"
        if regularise:
            solution, kinetic, jacobian = solution
            energy = {"kinetic": kinetic[-1].mean(), "jacobian": jacobian[-1].mean()}
            self.reg_loss = sum(w * energy[k] for k, w in regularise.items())
        out = solution[-1]
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
        if self._regularise:
            parts.append(f"regularise={self._regularise}")
        if self.name:
            parts.insert(0, f"name={self.name!r}")
        return ", ".join(parts)


def _norm_of_h(state) -> torch.Tensor:
    """Step-size control of a regularised solve: the RMS norm of h alone (torchdiffeq's default
    for one tensor), so the energies riding along do not change the steps taken on h."""
    return state[0].pow(2).mean().sqrt()


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


def regularisation_loss(model_or_blocks) -> torch.Tensor | None:
    """The sum of the ``reg_loss`` of every ODE-block (a model or a list of blocks) from its last
    forward, or ``None`` when none has one; the blocks' references are cleared (a stored graph
    would keep its memory alive and make the model impossible to ``deepcopy``)."""
    blocks = model_or_blocks if isinstance(model_or_blocks, (list, tuple)) else ode_blocks(model_or_blocks)
    losses = [b.reg_loss for b in blocks if b.reg_loss is not None]
    for b in blocks:
        b.reg_loss = None
    return sum(losses) if losses else None
