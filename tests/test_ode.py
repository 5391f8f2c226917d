"""ODE-blocks: the ResNet/Euler identity, accuracy against exact solutions, the adjoint, NFE
counters, step caps and tolerances."""
import math
import time

import pytest
import torch
import torch.nn as nn

from bloodseg.errors import BloodsegError, SolverError
from bloodseg.ode import (ODEBlock, ODEFunc, ResidualBlock, _Dynamics, nfe_report, ode_blocks,
                          set_tolerance)


class Linear(nn.Module):
    """dh/dt = a·h: h(t) = h(0)·exp(a·t)."""

    def __init__(self, a=2.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, t, h):
        return self.a * h


class PaperExample(nn.Module):
    """The paper's f'(x) = 2x (§3.1) as dh/dt = 2t: from h(0) = 0, h(1) = 1."""

    def forward(self, t, h):
        return 2 * t * torch.ones_like(h)


class Switchable(nn.Module):
    """dh/dt = w·h, or a blow-up once ``explode`` is set (to make a backward solve fail)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.explode = False

    def forward(self, t, h):
        # reversed in time (the adjoint's backward solve), -1000 h^3 blows up
        return -1000 * self.w * h ** 3 if self.explode else self.w * h


def test_residual_block_is_one_euler_step_of_size_one():
    torch.manual_seed(0)
    block = ODEBlock(6, method="euler", step_size=1.0)
    residual = ResidualBlock(block.func)  # the same f, the same weights
    x = torch.randn(2, 6, 8, 8)
    euler, res = block(x), residual(x)
    assert torch.allclose(euler, res, rtol=0, atol=1e-6)
    assert int(block.nfe_forward) == 1
    # and it is not the identity: f really moved the state
    assert (res - x).abs().max() > 1e-2


def test_dopri5_matches_exact_solutions_and_tighter_tolerance_costs_more():
    block = ODEBlock(1, rtol=1e-7, func=PaperExample())
    h1 = block(torch.zeros(4, dtype=torch.float64))
    assert (h1 - 1.0).abs().max() < 1e-5

    x = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    exact = x * math.exp(2.0)
    nfes = []
    for rtol in (1e-2, 1e-4, 1e-6):
        block = ODEBlock(1, rtol=rtol, func=Linear(2.0))
        block(x)
        nfes.append(int(block.nfe_forward))
    assert nfes[0] < nfes[1] < nfes[2], nfes
    block = ODEBlock(1, rtol=1e-7, func=Linear(2.0))
    assert (block(x) - exact).abs().max() < 1e-5


def test_adjoint_gradients_equal_direct_backprop():
    grads = {}
    for adjoint in (False, True):
        torch.manual_seed(0)
        block = ODEBlock(4, rtol=1e-8, adjoint=adjoint).double()
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        (block(x) ** 2).sum().backward()
        grads[adjoint] = [x.grad] + [p.grad for p in block.parameters()]
    for direct, adj in zip(grads[False], grads[True]):
        # conv biases in front of a GroupNorm have a true gradient of 0: compare absolutely too
        assert torch.allclose(adj, direct, rtol=1e-5, atol=1e-6 * (1 + direct.abs().max()))


def test_nfe_counters_reset_each_forward_and_count_backward():
    torch.manual_seed(0)
    block = ODEBlock(3, rtol=1e-4, adjoint=True, name="b")
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    block(x).sum().backward()
    fwd, bwd = int(block.nfe_forward), int(block.nfe_backward)
    assert fwd > 0 and bwd > 0
    assert nfe_report(block) == {"b": (fwd, bwd)}
    with torch.no_grad():  # a new forward resets both counters
        block(x)
    assert int(block.nfe_forward) > 0 and int(block.nfe_backward) == 0
    block.set_tolerance(1e-2)
    with torch.no_grad():
        block(x)
    assert int(block.nfe_forward) < fwd

    direct = ODEBlock(3, rtol=1e-4, adjoint=False)
    y = direct(x)
    assert int(direct.nfe_backward) == 0  # nothing backpropagated yet
    y.sum().backward()
    assert int(direct.nfe_backward) == int(direct.nfe_forward) > 0


def test_counters_are_non_persistent_buffers():
    block = ODEBlock(2)
    buffers = dict(block.named_buffers())
    assert {"nfe_forward", "nfe_backward"} <= set(buffers)
    assert buffers["nfe_forward"].dtype == torch.long
    assert not any(k.startswith("nfe") for k in block.state_dict())


def test_exploding_dynamics_raise_solver_error_quickly():
    class Cube(nn.Module):
        def forward(self, t, h):
            return 50 * h ** 3  # blows up at t = 0.01 from h(0) = 1

    block = ODEBlock(1, rtol=1e-3, func=Cube(), max_steps=50, name="ODE-block at position 5")
    start = time.perf_counter()
    with pytest.raises(SolverError) as info:
        block(torch.ones(3))
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert "ODE-block at position 5" in msg and "rtol=0.001" in msg and "dopri5" in msg
    assert "max_steps" in msg and "tolerance" in msg
    assert isinstance(info.value, RuntimeError)

    # with a generous step cap the step size underflows instead: still a SolverError
    block = ODEBlock(1, rtol=1e-3, func=Cube(), max_steps=100_000, name="blk")
    with pytest.raises(SolverError, match="underflow in dt"):
        block(torch.ones(3))


def test_non_finite_input_is_a_solver_error():
    block = ODEBlock(1, func=Linear(1.0), name="blk")
    with pytest.raises(SolverError, match="non-finite"):
        block(torch.tensor([1.0, float("nan")], dtype=torch.float64))


def test_adjoint_backward_solve_is_capped_too():
    func = Switchable()
    block = ODEBlock(1, func=func, adjoint=True, max_steps=30, name="ODE-block at position 7")
    y = block(torch.ones(3, requires_grad=True))
    func.explode = True  # the backward solve re-evaluates f: now it cannot finish
    start = time.perf_counter()
    with pytest.raises(SolverError, match="ODE-block at position 7 could not finish its backward"):
        y.sum().backward()
    assert time.perf_counter() - start < 10
    assert int(block.nfe_backward) > 0


def test_hard_cap_on_evaluations_of_f():
    block = ODEBlock(1, func=Linear(1.0), max_steps=3, name="capped")
    dyn = _Dynamics(block)
    h = torch.ones(2, dtype=torch.float64)
    t = torch.zeros((), dtype=torch.float64)
    for _ in range(6 * 3 + 10):
        dyn(t, h)
    with pytest.raises(SolverError, match="capped.*evaluations of f"):
        dyn(t, h)


def test_set_tolerance_changes_every_block_and_refuses_bad_values():
    model = nn.Sequential(ODEBlock(2, rtol=1e-3), nn.Identity(), nn.Sequential(ODEBlock(2, rtol=1e-6)))
    assert len(ode_blocks(model)) == 2
    assert set_tolerance(model, 1e-2) == 2
    assert all(b.rtol == 1e-2 and b.atol == 1e-2 for b in ode_blocks(model))
    set_tolerance(model, 1e-5, atol=1e-7)
    assert all(b.rtol == 1e-5 and b.atol == 1e-7 for b in ode_blocks(model))
    for bad in (0, -1e-3, float("nan"), float("inf"), "abc", True):
        with pytest.raises(BloodsegError):
            set_tolerance(model, bad)
        with pytest.raises(BloodsegError):
            ODEBlock(2, rtol=bad)
    with pytest.raises(BloodsegError):
        ode_blocks(model)[0].set_tolerance(1e-3, atol=-1.0)
    assert all(b.rtol == 1e-5 for b in ode_blocks(model))  # refused values changed nothing


def test_bad_solver_options_are_refused():
    with pytest.raises(BloodsegError, match="unknown ODE solver"):
        ODEBlock(2, method="rk45")
    with pytest.raises(BloodsegError, match="fixed-grid"):
        ODEBlock(2, method="dopri5", step_size=0.1)
    with pytest.raises(BloodsegError):
        ODEBlock(2, max_steps=0)


def test_odefunc_has_no_inplace_ops_and_a_narrow_hidden_width():
    func = ODEFunc(16, hidden=4)
    assert func.conv1.conv.out_channels == 4 and func.conv2.conv.in_channels == 5  # 4 + t-plane
    assert func.norm1.num_groups == 8 and ODEFunc(12).norm1.num_groups == 6
    for module in func.modules():
        assert not getattr(module, "inplace", False)
    wide = sum(p.numel() for p in ODEFunc(16).parameters())
    assert sum(p.numel() for p in func.parameters()) < wide / 2
    h = torch.randn(1, 16, 4, 4)
    # f depends on t through the t-plane
    assert not torch.allclose(func(torch.tensor(0.0), h), func(torch.tensor(1.0), h))
