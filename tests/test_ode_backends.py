"""ODE-block backends (bloodseg.odesolve): the default is torchdiffeq, unchanged; torchode's dopri5
agrees with torchdiffeq's within the tolerance; the unrolled loop is torchdiffeq's fixed grid, bit
for bit; a backend that cannot do what a block asks says so."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torchdiffeq import odeint

from bloodseg.calibrate import apply_solver
from bloodseg.errors import BloodsegError, SolverError
from bloodseg.models import build_model
from bloodseg.ode import BACKENDS, ConcatConv2d, ODEBlock, ODEFunc, ode_blocks, set_backend

pytestmark = pytest.mark.usefixtures("one_thread")


class Decay(nn.Module):
    """dh/dt = -k h: h(t) = h(0) e^{-k t} (k may differ per channel)."""

    def __init__(self, k=1.0):
        super().__init__()
        self.k = k

    def forward(self, t, h):
        return -self.k * h


def test_the_default_backend_is_torchdiffeq_and_its_output_is_odeint_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for method, step_size in (("dopri5", None), ("euler", None), ("rk4", 0.25)):
        block = ODEBlock(4, rtol=1e-4, method=method, step_size=step_size).eval()
        assert block.backend == "torchdiffeq" and "backend" not in repr(block)
        options = dict(max_num_steps=block.max_steps + 1) if method == "dopri5" else (
            {} if step_size is None else dict(step_size=step_size))
        with torch.no_grad():
            want = odeint(block.func, x, torch.tensor([0.0, 1.0]), rtol=1e-4, atol=1e-4, method=method,
                          options=options)[-1]
            assert torch.equal(block(x), want), method


def test_torchode_solves_exponential_decay_to_its_tolerance():
    h0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    k = torch.tensor([0.5, 2.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    exact = h0 * torch.exp(-k)
    for backend in ("torchdiffeq", "torchode"):
        block = ODEBlock(2, rtol=1e-7, atol=1e-9, func=Decay(k), backend=backend)
        with torch.no_grad():
            got = block(h0)
        assert got.shape == h0.shape and got.dtype == torch.float64
        assert torch.allclose(got, exact, rtol=1e-5, atol=1e-8), backend
        assert int(block.nfe_forward) >= 8     # 2 to pick the first step, 6 per dopri5 step


def test_torchode_agrees_with_torchdiffeq_on_an_ode_block():
    torch.manual_seed(1)
    x = torch.randn(3, 8, 8, 8, dtype=torch.float64)
    block = ODEBlock(8, rtol=1e-6).double().eval()
    with torch.no_grad():
        a = block(x)
        block.backend = "torchode"
        b = block(x)
    assert "backend='torchode'" in repr(block)
    scale = a.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * scale
    assert not torch.equal(a, b)        # a different solver: different steps, not the same numbers


def test_torchode_steps_each_sample_on_its_own():
    """A sample solved in a batch is the sample solved alone (its own step sizes and time),
    which torchdiffeq (one step size for the batch) does not give."""
    torch.manual_seed(2)
    block = ODEBlock(4, rtol=1e-5, backend="torchode").double().eval()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64) * torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)[:, None, None, None]
    with torch.no_grad():
        batch = block(x)
        alone = torch.cat([block(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batch, alone, rtol=0, atol=1e-12)


def test_concat_conv_takes_one_time_per_sample():
    torch.manual_seed(3)
    conv = ConcatConv2d(3, 5)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0.25, 0.75])
    per_sample = torch.cat([conv(t[i], x[i:i + 1]) for i in range(2)])
    assert torch.allclose(conv(t, x), per_sample, rtol=0, atol=1e-6)     # a batched conv rounds its own way
    assert torch.equal(conv(torch.tensor(0.5), x), conv(torch.tensor([0.5, 0.5]), x))


@pytest.mark.parametrize("spec", [{"method": "euler", "steps": 1}, {"method": "midpoint", "steps": 3},
                                  {"method": "rk4", "steps": 2}])
def test_the_unrolled_loop_is_torchdiffeqs_fixed_grid_bit_for_bit(spec):
    torch.manual_seed(4)
    model = build_model("nodes-unet", width=4)
    apply_solver(model, spec)
    x = torch.rand(2, 3, 32, 32)
    outs, grads, nfe = {}, {}, {}
    for backend in ("torchdiffeq", "unrolled"):
        assert set_backend(model, backend) == 3
        model.zero_grad()
        y = model(x)
        y.square().mean().backward()
        outs[backend], nfe[backend] = y.detach(), [int(b.nfe_forward) for b in ode_blocks(model)]
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.equal(outs["torchdiffeq"], outs["unrolled"])
    assert torch.equal(grads["torchdiffeq"], grads["unrolled"])
    per_step = {"euler": 1, "midpoint": 2, "rk4": 4}[spec["method"]]
    assert nfe["torchdiffeq"] == nfe["unrolled"] == [per_step * spec["steps"]] * 3


def test_the_unrolled_loop_follows_torchdiffeqs_grid_when_the_step_does_not_divide_t1():
    torch.manual_seed(5)
    func = ODEFunc(3)
    x = torch.randn(1, 3, 5, 5)
    for step in (0.3, 0.1, 0.7):
        a = ODEBlock(3, method="euler", step_size=step, func=func).eval()
        b = ODEBlock(3, method="euler", step_size=step, func=func, backend="unrolled").eval()
        with torch.no_grad():
            assert torch.equal(a(x), b(x)), step
        assert int(b.nfe_forward) <= int(a.nfe_forward) <= int(b.nfe_forward) + 1   # torchdiffeq may step past t1


def test_one_unrolled_euler_step_is_the_residual_block():
    torch.manual_seed(6)
    block = ODEBlock(4, method="euler", backend="unrolled").eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(block(x), x + 1.0 * block.func(torch.zeros(()), x))


def test_backends_refuse_what_they_cannot_do():
    with pytest.raises(BloodsegError, match="unknown ODE backend"):
        ODEBlock(2, backend="scipy")
    with pytest.raises(BloodsegError, match="unrolled backend solves euler, midpoint, rk4 only"):
        ODEBlock(2, backend="unrolled")                     # dopri5
    with pytest.raises(BloodsegError, match="torchode backend solves dopri5 only"):
        ODEBlock(2, method="euler", backend="torchode")
    with pytest.raises(BloodsegError, match="no the adjoint|has no the adjoint method"):
        ODEBlock(2, adjoint=True, backend="torchode")
    # a method changed after the backend was set is checked at the solve
    block = ODEBlock(2, method="euler", backend="unrolled")
    block.method = "heun3"
    with pytest.raises(BloodsegError, match="euler, midpoint, rk4 only"):
        block(torch.zeros(1, 2, 3, 3))
    # regularised training needs torchdiffeq
    block = ODEBlock(2, method="euler", backend="unrolled")
    block.regularise = {"kinetic": 0.1}
    with pytest.raises(BloodsegError, match="no regularised training"):
        block.train()(torch.zeros(1, 2, 3, 3))
    with torch.no_grad():                # in evaluation (no penalty to integrate) it solves
        block.eval()(torch.zeros(1, 2, 3, 3))


def test_set_backend_validates_every_block_first():
    model = build_model("nodes-unet", width=4)      # dopri5 blocks
    with pytest.raises(BloodsegError, match="unrolled"):
        set_backend(model, "unrolled")
    assert [b.backend for b in ode_blocks(model)] == ["torchdiffeq"] * 3
    assert set_backend(model, "torchode") == 3 and BACKENDS == ("torchdiffeq", "torchode", "unrolled")


def test_torchode_failures_become_solver_errors():
    stiff = ODEBlock(1, rtol=1e-9, max_steps=3, func=Decay(50.0), backend="torchode", name="stiff").double()
    with pytest.raises(SolverError, match="stiff.*max_steps=3"):
        with torch.no_grad():
            stiff(torch.ones(2, 1, dtype=torch.float64))
    bad = ODEBlock(1, func=Decay(1.0), backend="torchode")
    with pytest.raises(SolverError, match="non-finite"):
        with torch.no_grad():
            bad(torch.full((1, 1), math.nan))


def test_torchode_backpropagates_directly():
    torch.manual_seed(7)
    block = ODEBlock(3, rtol=1e-5, backend="torchode").double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert int(block.nfe_backward) == int(block.nfe_forward) > 0
