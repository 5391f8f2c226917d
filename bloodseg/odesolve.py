"""How an ODE-block's solve runs: the dynamics handed to a solver, and the solver backends.

* :class:`Dynamics` – the callable a solver evaluates: f itself, counting its evaluations and the
  solver's steps, with bloodseg's own caps and checks (see below).
* Backends (``ODEBlock(backend=...)``, :data:`BACKENDS`), each measured in the book, not assumed:

  - ``"torchdiffeq"`` (the default): ``odeint`` / ``odeint_adjoint`` of torchdiffeq 0.2.5, every
    method of :data:`~bloodseg.ode.ADAPTIVE_METHODS` and :data:`~bloodseg.ode.FIXED_GRID_METHODS`,
    the adjoint and regularised training (:mod:`bloodseg.regularise`).
  - ``"torchode"``: dopri5 of torchode 1.0.1 (Lienen & Günnemann 2022). torchode solves a
    ``(batch, features)`` state with its own step size and time per sample, so the block's
    ``(N, C, H, W)`` state is flattened per sample to ``(N, C·H·W)`` and f sees a time per sample
    (torchdiffeq takes one step for the whole batch: its hardest sample sets it). Its integral
    step-size controller has torchdiffeq's constants (safety 0.9, factors 0.2..10) and the same
    error bound ``atol + rtol·max(|y0|, |y1|)``, with the RMS norm per sample. Direct backprop only
    (no adjoint), no regularisation; the step cap becomes torchode's ``max_steps``.
  - ``"unrolled"``: a fixed-grid method (euler, midpoint, rk4) as a plain Python loop, on the grid
    torchdiffeq builds and with its arithmetic (one Euler step of size 1 is ``h + 1·f(0, h)``), so the
    output is torchdiffeq's, bit for bit; what it leaves out is torchdiffeq's machinery around the
    steps (input checks, wrappers, the solution buffer). Direct backprop only, no regularisation.

What torchdiffeq 0.2.5 does (read in its source, ``_impl/rk_common.py``): adaptive Runge–Kutta
solvers take ``options=dict(max_num_steps=N)`` and fail with ``AssertionError('max_num_steps
exceeded ...')``; a step size that vanishes fails with ``AssertionError('underflow in dt ...')``; a
non-finite state fails with ``AssertionError('non-finite values in state `y` ...')``. Fixed-grid
solvers take ``options=dict(step_size=...)`` and have no step cap. Every solver calls
``func.callback_step(t0, y0, dt)`` before each attempted step (and ``func.callback_step_adjoint``
in the adjoint's backward solve), *before* its own assertions: bloodseg does its checks there, so
that they also hold inside ``loss.backward()``, where a plain ``try``/``except`` around the solve
cannot reach. The unrolled loop calls the same ``callback_step``; torchode reports its own status.
"""
from __future__ import annotations

import torch
from torchdiffeq import odeint, odeint_adjoint

from .errors import BloodsegError
from .regularise import norm_of_h, regularised_f

__all__ = ["BACKENDS", "UNROLLED_METHODS", "TORCHODE_METHODS", "Dynamics", "check_backend", "solve"]

#: Where an ODE-block's solve can run (see the module docstring).
BACKENDS = ("torchdiffeq", "torchode", "unrolled")
#: Fixed-grid methods the unrolled loop implements (torchdiffeq's step functions).
UNROLLED_METHODS = ("euler", "midpoint", "rk4")
#: Methods solved by torchode.
TORCHODE_METHODS = ("dopri5",)
# torchode's status codes (torchode.status_codes): 2 dt below dt_min, 3 max_steps, 4 non-finite error
_TORCHODE_STATUS = {1: "torchode stopped with a general error", 2: "the step size fell below its minimum",
                    3: "more than max_steps={} solver steps", 4: "non-finite values (NaN or inf) in the state"}


def check_backend(backend, method: str | None = None, adjoint: bool = False, regularise: bool = False) -> str:
    """``backend`` if it can solve with ``method`` (None: not checked), ``adjoint`` and
    ``regularise``; else a BloodsegError that says which backend can."""
    if backend not in BACKENDS:
        raise BloodsegError(f"unknown ODE backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torchdiffeq":
        return backend
    methods = UNROLLED_METHODS if backend == "unrolled" else TORCHODE_METHODS
    if method is not None and method not in methods:
        raise BloodsegError(f"the {backend} backend solves {', '.join(methods)} only, not {method}; use "
                            "backend='torchdiffeq' (every method)")
    if adjoint or regularise:
        what = "the adjoint method" if adjoint else "regularised training"
        raise BloodsegError(f"the {backend} backend has no {what}; use backend='torchdiffeq'")
    return backend


class Dynamics:
    """The callable handed to the solver for one solve: counts f-evaluations and solver steps.

    A fresh one is made at each forward. It is in phase ``"forward"`` while the forward solve runs
    and in phase ``"backward"`` afterwards: the only thing that can call it after the forward solve
    returned is the adjoint's backward solve (it is referenced by the autograd graph only), so no
    flag has to be set from outside. Each phase has its own step and evaluation caps.
    """

    def __init__(self, block, regularise: dict | None = None):
        self.block = block
        self.func = block.func
        self.regularise = regularise   # the state is then (h, E_kin, E_jac): see ``regularised_f``
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
            out, self.eps = regularised_f(self.func, t, h[0], self.regularise, self.eps)
            return out
        return self.func(t, h)

    def callback_step(self, t0, y0, dt):
        """Called by torchdiffeq (and the unrolled loop) before every attempted step."""
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


def solve(block, dyn: Dynamics, x: torch.Tensor, needs_grad: bool, params: tuple):
    """``h(t1)`` of ``block`` from ``h(0) = x`` with its backend (``(h, E_kin, E_jac)`` at t1 when
    ``dyn`` is regularised); the forward phase of ``dyn`` ends here."""
    check_backend(block.backend, block.method, block.adjoint and needs_grad, bool(dyn.regularise))
    t = torch.tensor([0.0, block.t1], dtype=x.dtype, device=x.device)
    try:
        if block.backend == "unrolled":
            return _unrolled(block, dyn, x, t)
        if block.backend == "torchode":
            return _torchode(block, dyn, x)
        return _torchdiffeq(block, dyn, x, t, needs_grad, params)
    finally:
        dyn.phase = "backward"


def _torchdiffeq(block, dyn, x, t, needs_grad, params):
    options = block._options()
    y0, forward_options = x, options
    if dyn.regularise:   # the energies start at 0; the step control looks at h alone, as unregularised
        zero = x.new_zeros(x.shape[0])
        y0 = (x, zero, zero)
        if "max_num_steps" in options:     # adaptive
            forward_options = dict(options, norm=norm_of_h)
    try:
        if block.adjoint and needs_grad:
            solution = odeint_adjoint(
                dyn, y0, t, rtol=block.rtol, atol=block.atol, method=block.method, options=forward_options,
                adjoint_options=dict(options), adjoint_params=params)
        else:
            solution = odeint(dyn, y0, t, rtol=block.rtol, atol=block.atol, method=block.method,
                              options=forward_options)
    except AssertionError as err:  # torchdiffeq's own checks (the backstop)
        raise block._solver_error(f"torchdiffeq stopped: {err}", "forward") from err
    if dyn.regularise:
        return tuple(s[-1] for s in solution)
    return solution[-1]


def _unrolled(block, dyn, x, t):
    """torchdiffeq's fixed-grid solve (``FixedGridODESolver.integrate``) without its machinery."""
    if block.step_size is None:
        grid = t
    else:                      # torchdiffeq's _grid_constructor_from_step_size, op for op
        n = torch.ceil((t[-1] - t[0]) / block.step_size + 1).item()
        grid = torch.arange(0, n, dtype=t.dtype, device=t.device) * block.step_size + t[0]
        grid[-1] = t[-1]
    h, end = x, t[-1]
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        dyn.callback_step(t0, h, dt)
        f0 = dyn(t0, h)
        if block.method == "euler":
            dh = dt * f0
        elif block.method == "midpoint":
            half_dt = 0.5 * dt
            dh = dt * dyn(t0 + half_dt, h + f0 * half_dt)
        else:                  # rk4: torchdiffeq's rk4_alt_step_func (the 3/8 rule)
            k2 = dyn(t0 + dt * (1 / 3), h + dt * f0 * (1 / 3))
            k3 = dyn(t0 + dt * (2 / 3), h + dt * (k2 - f0 * (1 / 3)))
            k4 = dyn(t1, h + dt * (f0 - k2 + k3))
            dh = (f0 + 3 * (k2 + k3) + k4) * dt * 0.125
        h1 = h + dh
        if t1 >= end:          # torchdiffeq reads h(t1) here (linear interpolation past it) and
            return h1 if t1 == end else h + (end - t0) / (t1 - t0) * (h1 - h)   # steps on unused
        h = h1
    return h


def _torchode(block, dyn, x):
    """dopri5 of torchode on the per-sample flattened state ``(N, C·H·W)``."""
    import torchode
    shape, n = x.shape, x.shape[0]
    term = torchode.ODETerm(lambda t, y: dyn(t, y.view(shape)).reshape(n, -1), with_stats=False)
    controller = torchode.IntegralController(atol=block.atol, rtol=block.rtol, term=term)
    # torchode flags a solve that has taken max_steps steps, finished or not: +1 allows max_steps
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller, max_steps=block.max_steps + 1)
    t_start = torch.zeros(n, dtype=x.dtype, device=x.device)
    problem = torchode.InitialValueProblem(y0=x.reshape(n, -1), t_start=t_start, t_end=t_start + block.t1)
    solution = solver.solve(problem)
    status = int(solution.status.max())
    if status:
        what = _TORCHODE_STATUS.get(status, f"torchode status {status}").format(block.max_steps)
        raise block._solver_error(what, "forward")
    return solution.ys[:, -1].view(shape)
