"""Measurements behind the first chapters of the book: solvers and ODE-blocks.

Each function does one study and returns plain rows (lists of dicts) that a notebook turns into a
table and a figure; plotting helpers import matplotlib lazily, so ``import bloodseg`` stays light.

Chapter 1 (ODEs and Euler steps)
    :class:`PaperExample` / :class:`GrowthExample` – the paper's f'(x) = 2x (§3.1) as dh/dt = 2t,
    and dh/dt = 2t·h, whose solution is not a polynomial; :func:`solve_example`,
    :func:`solver_study` (Euler at several step sizes, dopri5 at several tolerances → error, NFE);
    :func:`residual_vs_euler`, :func:`euler_convergence`, :func:`euler_trajectories`,
    :func:`nfe_vs_tolerance` on an ODE-block.
Chapter 2 (ODE-blocks)
    :func:`gradient_agreement` (adjoint vs direct backprop), :func:`block_step_cost` (peak
    memory and time of one training step of a single ODE-block against tolerance), :func:`nfe_during_training`,
    :class:`ExplodingFunc` (dynamics that blow up, to show the step cap); :func:`adjoint_solve`
    (the adjoint method written out) on :class:`ToyDynamics` (:func:`adjoint_toy`);
    :func:`source_listing` (code shown from its source); :func:`solve_photograph` (the shipped
    NODEs-UNet re-solved with another solver, :data:`EXPLORER_SPECS`).
Chapter 3 (data) is :mod:`bloodseg.paper.data_study`.

How memory is measured (:func:`block_step_cost`, with :class:`bloodseg.measure.PeakMemory` and
:func:`bloodseg.measure.run_isolated`, the harness ``bloodseg bench`` uses too). On CUDA: ``torch.cuda.max_memory_allocated``
minus the memory allocated before the step (tensors only, exact). On a CPU there is no allocator
counter, so the step runs in a fresh Python process and we read the kernel's peak resident set size
(``VmHWM`` in ``/proc/self/status``, Linux), reset before every step by writing ``5`` to
``/proc/self/clear_refs``: peak = VmHWM after the step − VmRSS before it. For that to track live
tensors, the child starts with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every block of
64 KiB or more with its own mmap and returns it to the kernel when freed, instead of keeping freed
memory around for reuse (which would hide a later step's peak), and ``MALLOC_TRIM_THRESHOLD_=0``
gives freed heap tops back at once. What is left is a few MB of noise
(small allocations, thread stacks). As an exact cross-check we also count the bytes autograd saves
for backward (``torch.autograd.graph.saved_tensors_hooks``): the activation memory that direct
backprop keeps for every evaluation of f, and that the adjoint avoids.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn

from ..errors import BloodsegError, SolverError
from ..measure import PeakMemory, count_saved_bytes, interleaved_times, run_isolated, sync
from ..ode import ODEBlock, ResidualBlock


__all__ = [
    "PaperExample", "GrowthExample", "EXAMPLES", "solve_example", "solver_study",
    "seeded_feature_map", "residual_vs_euler", "euler_convergence", "euler_trajectories", "nfe_vs_tolerance",
    "ExplodingFunc", "gradient_agreement", "STEP_COST_SIZES", "block_step_cost", "nfe_during_training",
    "ToyDynamics", "adjoint_solve", "adjoint_toy", "source_listing", "EXPLORER_SPECS", "solve_photograph",
]


# ============================================================================ chapter 1: ODEs

class PaperExample(nn.Module):
    """The paper's example f'(x) = 2x (§3.1) as an initial value problem: dh/dt = 2t, h(0) = 0.

    Its solution is h(t) = t² (the general solution t² + C with C fixed by h(0) = 0).
    """

    def forward(self, t, h):
        return 2 * t * torch.ones_like(h)


class GrowthExample(nn.Module):
    """dh/dt = 2t·h, h(0) = 1: the same 2t, now scaled by the state; h(t) = exp(t²).

    Unlike t², exp(t²) is no polynomial, so an adaptive solver cannot integrate it exactly and its
    tolerance decides how many steps it takes.
    """

    def forward(self, t, h):
        return 2 * t * h


#: name → (f module class, h(0), exact h(t))
EXAMPLES = {
    "paper": (PaperExample, 0.0, lambda t: t * t),
    "growth": (GrowthExample, 1.0, lambda t: math.exp(t * t)),
}


def _example(name: str):
    if name not in EXAMPLES:
        raise BloodsegError(f"unknown example {name!r}: choose one of {', '.join(EXAMPLES)}")
    return EXAMPLES[name]


def solve_example(example: str = "paper", method: str = "euler", step_size: float | None = None,
                  rtol: float = 1e-3, t1: float = 1.0) -> dict:
    """Solve an :data:`EXAMPLES` problem from 0 to ``t1`` with an :class:`ODEBlock` (float64).

    Returns ``dict(method, step_size, rtol, value, exact, error, nfe)``; ``error`` = |h(t1) − exact|,
    ``nfe`` = evaluations of f. ``rtol`` (= atol) matters for adaptive methods only, ``step_size``
    for fixed-grid ones.
    """
    func_cls, h0, exact = _example(example)
    block = ODEBlock(1, rtol=rtol, method=method, step_size=step_size, t1=t1, func=func_cls(),
                     max_steps=100_000)
    with torch.no_grad():
        value = float(block(torch.full((1,), h0, dtype=torch.float64))[0])
    truth = exact(t1)
    return dict(method=method, step_size=step_size, rtol=rtol if method != "euler" else None,
                value=value, exact=truth, error=abs(value - truth), nfe=int(block.nfe_forward))


def solver_study(example: str = "paper", steps=(1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128),
                 tolerances=(1e-2, 1e-4, 1e-6, 1e-8, 1e-10)) -> list[dict]:
    """Euler at each step size and dopri5 at each tolerance on one example: rows of :func:`solve_example`."""
    rows = [solve_example(example, "euler", step_size=float(h)) for h in steps]
    rows += [solve_example(example, "dopri5", rtol=float(tol)) for tol in tolerances]
    return rows


def seeded_feature_map(channels: int = 16, size: int = 32, batch: int = 1, seed: int = 0,
                       dtype=torch.float32) -> torch.Tensor:
    """A fixed random feature map ``batch x channels x size x size`` (standard normal, seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)


def residual_vs_euler(block_or_func, x: torch.Tensor) -> float:
    """Max |ResidualBlock(f)(x) − ODEBlock(f, euler, step 1)(x)| with the same f (weights shared).

    The paper's §4.2 argument: a residual block h + f(h) is one Euler step of size 1.
    """
    func = block_or_func.func if isinstance(block_or_func, ODEBlock) else block_or_func
    euler = ODEBlock(1, method="euler", step_size=1.0, func=func)
    with torch.no_grad():
        return float((ResidualBlock(func)(x) - euler(x)).abs().max())


def euler_convergence(func: nn.Module, x: torch.Tensor, steps=(1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32),
                      reference_rtol: float = 1e-7) -> tuple[torch.Tensor, list[dict]]:
    """Euler with shrinking steps against a tight dopri5 solve of the same f (an ODE-block's f).

    Returns ``(reference, rows)``: the dopri5 solution and one row per step size with ``step``,
    ``nfe`` and ``max_abs_diff`` / ``rel_diff`` (max |Euler − reference| and its ratio to
    max |reference|); plus a first row for dopri5 itself (its NFE, difference 0).
    """
    with torch.no_grad():
        ref_block = ODEBlock(1, rtol=reference_rtol, func=func, max_steps=10_000)
        reference = ref_block(x)
        scale = float(reference.abs().max())
        rows = [dict(method="dopri5", step=None, nfe=int(ref_block.nfe_forward), max_abs_diff=0.0, rel_diff=0.0)]
        for h in steps:
            block = ODEBlock(1, method="euler", step_size=float(h), func=func)
            diff = float((block(x) - reference).abs().max())
            rows.append(dict(method="euler", step=float(h), nfe=int(block.nfe_forward),
                             max_abs_diff=diff, rel_diff=diff / scale))
    return reference, rows


def euler_trajectories(func: nn.Module, x: torch.Tensor, steps=(1, 1 / 2, 1 / 4, 1 / 8),
                       index=(0, 0, 0, 0), points: int = 65, reference_rtol: float = 1e-7) -> dict:
    """h(t) of one entry (``index``) of the state for Euler at each step size and for dopri5.

    Returns ``{"dopri5": (t, h), step: (t, h), ...}`` with numpy arrays: Euler at its grid points
    (the polygon it walks), dopri5 at ``points`` evenly spaced times from 0 to 1.
    """
    from torchdiffeq import odeint

    out = {}
    with torch.no_grad():
        t = torch.linspace(0.0, 1.0, points, dtype=x.dtype)
        h = odeint(func, x, t, rtol=reference_rtol, atol=reference_rtol, method="dopri5")
        out["dopri5"] = (t.numpy(), h[(slice(None),) + tuple(index)].numpy())
        for step in steps:
            n = int(round(1 / float(step)))
            grid = torch.linspace(0.0, 1.0, n + 1, dtype=x.dtype)
            h = odeint(func, x, grid, method="euler", options=dict(step_size=1.0 / n))
            out[float(step)] = (grid.numpy(), h[(slice(None),) + tuple(index)].numpy())
    return out


def nfe_vs_tolerance(block: ODEBlock, x: torch.Tensor, tolerances=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
                     repeats: int = 1) -> list[dict]:
    """Forward NFE and time of ``block`` at each tolerance (rtol = atol), without gradients.

    ``seconds`` is the fastest of ``repeats`` forwards. ``change`` is max |h(1) − h(1) at the
    tightest tolerance|: how far the output moves when the tolerance is relaxed. The block's own
    tolerance is restored afterwards.
    """
    saved = (block.rtol, block.atol)
    rows, outputs = [], []
    try:
        with torch.no_grad():
            for tol in tolerances:
                block.set_tolerance(float(tol))
                last = []
                times = interleaved_times({"block": lambda _: last.append(block(x))}, [None], max(1, int(repeats)))
                outputs.append(last[-1])
                rows.append(dict(rtol=float(tol), nfe=int(block.nfe_forward), seconds=min(times["block"])))
    finally:
        block.set_tolerance(*saved)
    tightest = outputs[int(np.argmin([r["rtol"] for r in rows]))]
    for row, out in zip(rows, outputs):
        row["change"] = float((out - tightest).abs().max())
    return rows


# ============================================================================ chapter 2: ODE-blocks

class ExplodingFunc(nn.Module):
    """dh/dt = rate·h³: from h(0) = 1 the solution 1/sqrt(1 − 2·rate·t) blows up at t = 1/(2·rate).

    Stands in for f of a network whose training went wrong: no solver can reach t = 1.
    """

    def __init__(self, rate: float = 50.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, t, h):
        return self.rate * h ** 3


def gradient_agreement(channels: int = 4, size: int = 8, rtol: float = 1e-7, seed: int = 0,
                       method: str = "dopri5", step_size: float | None = None) -> dict:
    """Gradients of one ODE-block by direct backprop and by the adjoint, in float64.

    Same weights, same input, loss = mean(h(1)²). Returns ``max_rel_diff`` (max over the input and
    every parameter of max|g_adj − g_direct| / max|g_direct|), and both NFE pairs
    ``nfe_direct`` / ``nfe_adjoint`` as (forward, backward). ``method`` / ``step_size`` choose the
    solver of both passes (a fixed-grid method takes ``step_size``; ``rtol`` is then unused).
    """
    grads, nfe = {}, {}
    for adjoint in (False, True):
        torch.manual_seed(seed)
        block = ODEBlock(channels, rtol=rtol, adjoint=adjoint, method=method, step_size=step_size).double()
        x = seeded_feature_map(channels, size, batch=2, seed=seed, dtype=torch.float64).requires_grad_(True)
        (block(x) ** 2).mean().backward()
        grads[adjoint] = [x.grad] + [p.grad for p in block.parameters()]
        nfe[adjoint] = (int(block.nfe_forward), int(block.nfe_backward))
    rel = 0.0
    for direct, adj in zip(grads[False], grads[True]):
        scale = float(direct.abs().max())
        if scale > 1e-12:   # conv biases before a GroupNorm have a true gradient of 0: skip them
            rel = max(rel, float((adj - direct).abs().max()) / scale)
    return dict(max_rel_diff=rel, nfe_direct=nfe[False], nfe_adjoint=nfe[True])


#: Size of the single-ODE-block training step of chapter 2, per profile: channels, side, batch.
STEP_COST_SIZES = {
    "smoke": dict(channels=8, size=16, batch=2, tolerances=(1e-2, 1e-3, 1e-4)),
    "quick": dict(channels=16, size=64, batch=2, tolerances=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)),
    "full": dict(channels=64, size=64, batch=8, tolerances=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)),
}


def _one_step(block, x, target, opt, device):
    """One training step: forward, MSE loss, backward, SGD step. Returns (seconds, saved bytes)."""
    sync(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with count_saved_bytes() as saved:
        out = block(x)
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    opt.step()
    sync(device)
    return time.perf_counter() - start, saved.nbytes


def _step_cost_configs(cfg: dict) -> list[dict]:
    """Run in the measuring process: every (adjoint, tolerance) of ``cfg``, one step each."""
    device = torch.device(cfg["device"])
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    shape = (cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])
    x = torch.randn(*shape, generator=gen).to(device)
    target = torch.randn(*shape, generator=gen).to(device)
    memory = PeakMemory(device)
    measurable = device.type == "cuda" or memory.can_reset   # else: no way to reset the peak RSS, time only
    rows = []
    for adjoint in cfg["adjoint"]:
        torch.manual_seed(int(cfg["seed"]))
        block = ODEBlock(cfg["channels"], adjoint=adjoint, max_steps=cfg["max_steps"]).to(device)
        init = {k: v.clone() for k, v in block.state_dict().items()}
        opt = torch.optim.SGD(block.parameters(), lr=1e-3)
        block.set_tolerance(max(cfg["tolerances"]))
        _one_step(block, x, target, opt, device)     # warm-up: thread pools, kernels, first allocations
        for tol in cfg["tolerances"]:
            block.load_state_dict(init)              # every tolerance starts from the same weights
            block.set_tolerance(float(tol))
            row = dict(adjoint=bool(adjoint), rtol=float(tol))
            if measurable:
                memory.start()
            seconds, saved = _one_step(block, x, target, opt, device)
            row["peak_mb"] = memory.stop() if measurable else None
            times = [seconds]
            for _ in range(int(cfg["repeats"]) - 1):
                block.load_state_dict(init)
                times.append(_one_step(block, x, target, opt, device)[0])
            row.update(seconds=min(times), saved_mb=saved / 2 ** 20,
                       nfe_forward=int(block.nfe_forward), nfe_backward=int(block.nfe_backward))
            rows.append(row)
    return rows


def block_step_cost(channels: int = 8, size: int = 16, batch: int = 2,
                       tolerances=(1e-2, 1e-3, 1e-4), adjoint=(False, True), device=None,
                       repeats: int = 1, seed: int = 0, max_steps: int = 1000,
                       threads: int = 1, timeout: float = 600) -> list[dict]:
    """Peak memory and time of one training step of a single ODE-block (not a whole network: for
    that see :func:`bloodseg.paper.bench.training_step_cost`), per (adjoint, tolerance).

    The block (``ODEBlock(channels)``, dopri5) maps a seeded ``batch x channels x size x size``
    feature map; the step is forward, MSE loss against a seeded random target, backward and an
    SGD update, always from the same initial weights. One warm-up step per mode runs first.

    Returns rows ``dict(adjoint, rtol, nfe_forward, nfe_backward, peak_mb, saved_mb, seconds,
    how)``: ``peak_mb`` is the step's peak memory above what was allocated before it (see the
    module docstring for how; ``None`` where it cannot be measured), ``saved_mb`` the bytes
    autograd saved for backward during the forward, ``seconds`` the fastest of ``repeats`` steps.

    On CPU the work runs in a fresh Python process (:func:`bloodseg.measure.run_isolated`) so that
    the peak RSS belongs to this measurement alone, with ``threads`` intra-op threads (default 1: on a shared
    machine several OpenMP threads wait for each other and time the crowd, not the step); on
    CUDA it runs in this process.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    cfg = dict(channels=int(channels), size=int(size), batch=int(batch), seed=int(seed),
               tolerances=[float(t) for t in tolerances], adjoint=[bool(a) for a in adjoint],
               device=str(device), repeats=int(repeats), max_steps=int(max_steps),
               threads=int(threads))
    if device.type == "cuda":
        rows, how = _step_cost_configs(cfg), "torch.cuda.max_memory_allocated (tensors only)"
    else:
        rows = run_isolated(f"{__name__}:_step_cost_configs", cfg, threads=cfg["threads"], timeout=timeout)
        if isinstance(rows, dict):      # a BloodsegError (e.g. the solver gave up) in the child
            raise BloodsegError(f"the measuring process failed: {rows.get('error')}")
        how = "peak RSS of a fresh process (VmHWM, reset per step; glibc mmap threshold 64 KiB)"
    for row in rows:
        row["how"] = how if row["peak_mb"] is not None else "not measurable here"
    return rows


def nfe_during_training(channels: int = 8, size: int = 16, batch: int = 4, steps: int = 40,
                        lr: float = 0.05, rtol: float = 1e-3, weight_decay: float = 0.0,
                        seed: int = 0, max_steps: int = 1000) -> list[dict]:
    """Train one ODE-block to map a seeded feature map to a harder target; log NFE every step.

    The target is the input passed through a fixed random 3x3 convolution and scaled by 3, so the
    block has to learn stronger dynamics than it starts with: the effect behind torchdiffeq
    issue 153 (NFE grows as training goes on). Returns rows ``dict(step, loss, nfe_forward,
    nfe_backward)``; stops early (row ``error`` set) if the solver gives up.
    """

    torch.manual_seed(seed)
    block = ODEBlock(channels, rtol=rtol, max_steps=max_steps)
    x = seeded_feature_map(channels, size, batch, seed)
    mix = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    with torch.no_grad():
        target = 3.0 * mix(x)
    opt = torch.optim.Adam(block.parameters(), lr=lr, weight_decay=weight_decay)
    rows = []
    for step in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        try:
            loss = torch.nn.functional.mse_loss(block(x), target)
            loss.backward()
        except SolverError as err:
            rows.append(dict(step=step, loss=None, nfe_forward=None, nfe_backward=None, error=str(err)))
            break
        opt.step()
        rows.append(dict(step=step, loss=float(loss.detach()), nfe_forward=int(block.nfe_forward),
                         nfe_backward=int(block.nfe_backward)))
    return rows


# ---------------------------------------------------------------------------- the adjoint, written out

class ToyDynamics(nn.Module):
    """A 2-D f(h, t, θ) = tanh(A·h + b) with θ = (A, b): small enough to draw, nonlinear enough
    that ∂f/∂h changes along the path (so the backward solve must reconstruct h)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, -2.0], [2.0, -0.1]], dtype=dtype))
        self.b = nn.Parameter(torch.tensor([0.3, -0.2], dtype=dtype))

    def forward(self, t, h):
        return torch.tanh(h @ self.A.T + self.b)


def adjoint_solve(func: nn.Module, h1: torch.Tensor, a1: torch.Tensor,
                  t0: float = 0.0, t1: float = 1.0, rtol: float = 1e-8,
                  atol: float = 1e-8, points: int = 41):
    """The adjoint method of Chen et al. (2018), written out: one solve of
    the augmented state [h, a, g] backward in time, from t1 to t0.

        dh/dt = f(h, t, θ)     h(t1) given: h is rebuilt backwards
        da/dt = -a·∂f/∂h       a(t1) = dL/dh(t1)  ->  a(t0) = dL/dh(t0)
        dg/dt = -a·∂f/∂θ       g(t1) = 0          ->  g(t0) = dL/dθ

    Returns ``(times, h, a, g, nfe)``: the times from t1 down to t0, the
    three parts of the state at each (``g``: one tensor per parameter of
    ``func``), and the number of evaluations of f.
    """
    from torchdiffeq import odeint

    params = [p for p in func.parameters() if p.requires_grad]
    nfe = [0]

    def augmented(t, state):
        h, a = state[0], state[1]
        nfe[0] += 1
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            f = func(t, h)
            # a·∂f/∂h and a·∂f/∂θ: vector-Jacobian products,
            # one backward pass through one evaluation of f
            vjp = torch.autograd.grad(f, [h] + params, grad_outputs=a,
                                      allow_unused=True)
        vjp = [torch.zeros_like(x) if v is None else v
               for v, x in zip(vjp, [h] + params)]
        return (f.detach(), -vjp[0], *[-v for v in vjp[1:]])

    state = (h1.detach(), a1.detach(), *[torch.zeros_like(p) for p in params])
    times = torch.linspace(t1, t0, points, dtype=h1.dtype)
    out = odeint(augmented, state, times, rtol=rtol, atol=atol, method="dopri5")
    return times, out[0], out[1], list(out[2:]), nfe[0]


def adjoint_toy(t1: float = 2.0, rtol: float = 1e-8, points: int = 41) -> dict:
    """:class:`ToyDynamics` from h(0) = (1, 0) to t1, loss L = ½|h(t1) − target|²: the forward
    trajectory, the backward adjoint solve (:func:`adjoint_solve`), and the gradients it gives
    next to those of direct backprop through the forward solve (autograd through torchdiffeq).

    Returns numpy arrays ``t_forward``, ``h_forward`` (points x 2), ``t_backward`` (t1 → 0),
    ``h_backward``, ``a_backward``, ``g_backward`` (points x 6: A row by row, then b); ``names`` of
    the 6 parameters; ``grad_adjoint`` / ``grad_direct`` (dL/dh(0) then dL/dθ, 8 numbers each),
    ``max_rel_diff`` between them, and the NFE of both solves.
    """
    from torchdiffeq import odeint

    func = ToyDynamics()
    h0 = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.4, -0.6], dtype=torch.float64)
    t_fwd = torch.linspace(0.0, t1, points, dtype=torch.float64)
    calls = [0]

    def counted(t, h):
        calls[0] += 1
        return func(t, h)

    h_fwd = odeint(counted, h0, t_fwd, rtol=rtol, atol=rtol, method="dopri5")
    loss = 0.5 * ((h_fwd[-1] - target) ** 2).sum()
    direct = torch.autograd.grad(loss, [h0, func.A, func.b])          # direct backprop
    a1 = (h_fwd[-1] - target).detach()                               # dL/dh(t1)
    t_bwd, h_bwd, a_bwd, g_bwd, nfe_bwd = adjoint_solve(func, h_fwd[-1], a1, 0.0, t1, rtol, rtol, points)
    adjoint = [a_bwd[-1]] + [g[-1] for g in g_bwd]
    flat = lambda xs: torch.cat([x.reshape(-1) for x in xs]).detach().numpy()
    grad_direct, grad_adjoint = flat(direct), flat(adjoint)
    rel = float(np.abs(grad_adjoint - grad_direct).max() / np.abs(grad_direct).max())
    return dict(t_forward=t_fwd.numpy(), h_forward=h_fwd.detach().numpy(), target=target.numpy(),
                t_backward=t_bwd.numpy(), h_backward=h_bwd.numpy(), a_backward=a_bwd.numpy(),
                g_backward=torch.cat([g.reshape(len(t_bwd), -1) for g in g_bwd], dim=1).numpy(),
                names=["A11", "A12", "A21", "A22", "b1", "b2"], loss=float(loss.detach()),
                grad_direct=grad_direct.tolist(), grad_adjoint=grad_adjoint.tolist(), max_rel_diff=rel,
                nfe_forward=calls[0], nfe_backward=nfe_bwd)


def source_listing(obj, title: str | None = None):
    """The source of a function, class or method as a Markdown code listing (``inspect.getsource``,
    so the book shows the code that runs, never a copy), headed by where it lives."""
    import inspect
    import textwrap

    from IPython.display import Markdown

    lines, start = inspect.getsourcelines(obj)
    path = inspect.getsourcefile(obj) or ""
    rel = path[path.rfind("bloodseg/"):] if "bloodseg/" in path else path
    name = title or f"{obj.__module__}.{obj.__qualname__}"
    code = textwrap.dedent("".join(lines)).rstrip()
    return Markdown(f"`{name}` ({rel}, lines {start}–{start + len(lines) - 1}):\n\n```python\n{code}\n```")


# ---------------------------------------------------------------------------- a trained network, re-solved

#: The static grid of the solver explorer: solver specs of :mod:`bloodseg.calibrate`, cheapest
#: first; None is the trained solver (dopri5 at the trained tolerances), the reference.
EXPLORER_SPECS = ({"method": "euler", "steps": 1}, {"method": "euler", "steps": 4},
                  {"method": "rk4", "steps": 1}, {"method": "dopri5", "rtol": 1e-1},
                  {"method": "dopri5", "rtol": 1e-3}, {"method": "dopri5", "rtol": 1e-5}, None)


def solve_photograph(segmenter, image_bgr: np.ndarray, spec, reference: np.ndarray | None = None,
                     repeats: int = 1) -> dict:
    """Segment one photograph with every ODE-block of ``segmenter`` solved by ``spec`` (a
    :mod:`bloodseg.calibrate` spec; None = the trained solver).

    Returns ``dict(solver, spec, mask, nfe, nfe_total, seconds, ode_seconds, agreement)``: the
    network's argmax mask (no post-processing), the forward NFE of each block, the fastest of
    ``repeats`` predictions (whole photograph) and the time spent inside the ODE-blocks in it, and
    the share of pixels equal to ``reference`` (None without one).
    """
    from ..calibrate import solver_label
    from ..ode import nfe_report, ode_blocks

    seg = segmenter.replace(solver=spec)
    spent = [0.0]
    starts = {}

    def pre(module, inputs):
        starts[id(module)] = time.perf_counter()

    def post(module, inputs, output):
        spent[0] += time.perf_counter() - starts.pop(id(module))

    hooks = [h for b in ode_blocks(seg.model)
             for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    masks, inside = [], []

    def predict(_):
        spent[0] = 0.0
        masks.append(seg.predict(image_bgr, postprocess=False))

    try:
        times = interleaved_times({"predict": predict}, [None], max(1, int(repeats)),
                                  after=lambda label, r, _: inside.append(spent[0]))["predict"]
        best = min(zip(times, inside))
        mask = masks[-1]
    finally:
        for h in hooks:
            h.remove()
        segmenter.replace()._use_solver()      # the shared network gets its own solver back
    nfe = {name: fwd for name, (fwd, _) in nfe_report(seg.model).items()}
    return dict(solver=solver_label(spec), spec=spec, mask=mask, nfe=nfe, nfe_total=sum(nfe.values()),
                seconds=best[0], ode_seconds=best[1],
                agreement=None if reference is None else float((mask == reference).mean()))
