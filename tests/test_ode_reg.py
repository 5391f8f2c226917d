"""Regularised training of ODE-blocks (Finlay et al. 2020, RNODE): the kinetic energy and the
Hutchinson estimate of the Jacobian's Frobenius norm integrated alongside the solve."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torchdiffeq import odeint

from conftest import ColourBlobs

from bloodseg import cli
from bloodseg.errors import BloodsegError
from bloodseg.models import build_model
from bloodseg.ode import ODEBlock, check_regularise, ode_blocks, regularisation_loss
from bloodseg.recipe import Recipe, TrainRecipe
from bloodseg.train import fit


class Linear(nn.Module):
    """dh/dt = a·h, h(t) = h(0)·exp(a·t)."""

    def __init__(self, a=0.7):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, t, h):
        return self.a * h


class Matrix(nn.Module):
    """dh/dt = h A^T: the Jacobian of every sample is A."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t, h):
        return h @ self.a.T


def test_kinetic_energy_of_a_linear_ode_has_its_closed_form():
    # ∫0^1 mean(a² h(0)² e^{2at}) dt = a·mean(h(0)²)·(e^{2a} - 1)/2 per sample
    block = ODEBlock(1, method="rk4", step_size=0.02, func=Linear(0.7))
    block.regularise = {"kinetic": 1.0}
    x = torch.randn(3, 5, dtype=torch.float64)
    block(x)
    exact = (0.7 * x.pow(2).mean(1) * (math.exp(1.4) - 1) / 2).mean()
    assert block.reg_loss.item() == pytest.approx(exact.item(), rel=1e-7)


def test_kinetic_energy_of_an_ode_func_matches_quadrature_along_the_trajectory():
    torch.manual_seed(0)
    block = ODEBlock(4, method="rk4", step_size=0.05).double()
    block.regularise = {"kinetic": 2.0}
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    block(x)
    # independently: the trajectory on a fine grid, then Simpson's rule of mean ||f||² per sample
    with torch.no_grad():
        t = torch.linspace(0, 1, 201, dtype=torch.float64)
        hs = odeint(block.func, x, t, method="rk4", options=dict(step_size=0.005))
        g = torch.stack([block.func(ti, h).pow(2).flatten(1).mean(1) for ti, h in zip(t, hs)])
        w = torch.ones(201, dtype=torch.float64)
        w[1:-1:2], w[2:-1:2] = 4, 2
        kinetic = (w[:, None] * g).sum(0) * (1 / 200) / 3
    assert block.reg_loss.item() == pytest.approx(2.0 * kinetic.mean().item(), rel=1e-5)


def test_hutchinson_estimate_is_unbiased_for_a_known_jacobian():
    torch.manual_seed(0)
    d = 6
    a = torch.randn(d, d, dtype=torch.float64)
    block = ODEBlock(1, method="euler", step_size=1.0, func=Matrix(a))
    block.regularise = {"jacobian": 1.0}
    x = torch.randn(32, d, dtype=torch.float64)
    estimates = []
    for _ in range(300):                       # a fresh ε every solve
        block(x)
        estimates.append(block.reg_loss.item())
    est = torch.tensor(estimates)
    exact = a.pow(2).sum().item() / d          # ||A||_F² per element of a sample
    assert est.std() > 0.01 * exact            # a random estimate, not the exact trace
    stderr = est.std().item() / math.sqrt(len(est))
    assert abs(est.mean().item() - exact) < 4 * stderr
    assert est.mean().item() == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradients_reach_every_parameter(adjoint):
    torch.manual_seed(0)
    block = ODEBlock(4, rtol=1e-3, adjoint=adjoint)
    block.regularise = {"kinetic": 1.0, "jacobian": 1.0}
    block(torch.randn(2, 4, 8, 8))
    block.reg_loss.backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adjoint_gradients_equal_direct_ones_with_regularisation():
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        block = ODEBlock(4, rtol=1e-9, adjoint=adjoint).double()
        block.regularise = {"kinetic": 1.0, "jacobian": 1.0}
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(1)                   # the same ε
        out = block(x)
        (out.pow(2).mean() + block.reg_loss).backward()
        grads.append(torch.cat([p.grad.flatten() for p in block.parameters()] + [x.grad.flatten()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_unset_regularisation_leaves_the_model_bit_identical():
    x = torch.randn(2, 3, 32, 32)

    def step(regularise):
        torch.manual_seed(0)
        model = build_model("nodes-unet", width=4).train()
        if regularise is not None:
            for block in ode_blocks(model):
                block.regularise = regularise
        out = model(x)
        nfe = [int(b.nfe_forward) for b in ode_blocks(model)]
        out.square().mean().backward()
        return out.detach(), nfe, [p.grad.clone() for p in model.parameters()], model

    plain, nfe, grads, model = step(None)
    assert all(b.regularise == {} and b.reg_loss is None for b in ode_blocks(model))
    for setting in ({}, {"kinetic": 0.0}, None):
        out, n, g, _ = step(setting)
        assert torch.equal(out, plain) and n == nfe and all(torch.equal(a, b) for a, b in zip(g, grads))
    # regularised: the same h, the same steps (the step control looks at h alone), plus a penalty
    out, n, _, model = step({"kinetic": 1.0, "jacobian": 1.0})
    assert torch.equal(out, plain) and n == nfe
    assert regularisation_loss(model) is not None and regularisation_loss(model) is None   # taken once
    model.eval()                               # no penalty outside training
    model(x)
    assert all(b.reg_loss is None for b in ode_blocks(model))


def _toy_nfe(regularise, seed, steps=30):
    """Fit one dopri5 block (tight tolerance) to a map that needs transport; its NFE afterwards."""
    torch.manual_seed(seed)
    block = ODEBlock(4, rtol=1e-5)
    block.regularise = regularise
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    target = torch.tanh(2 * x.flip(1))
    for _ in range(steps):
        opt.zero_grad()
        loss = (block(x) - target).pow(2).mean()
        penalty = regularisation_loss([block])
        (loss if penalty is None else loss + penalty).backward()
        opt.step()
    with torch.no_grad():
        block.eval()(x)
    return int(block.nfe_forward)


def test_a_strong_kinetic_penalty_makes_the_dynamics_cheaper_to_solve():
    # measured: unregularised 188 evaluations after 30 steps, kinetic=10: 128 (from 26); seed 1 gave
    # 284 / 128 and was dropped to keep `make test` within its 15 minutes
    plain, regularised = _toy_nfe({}, 0), _toy_nfe({"kinetic": 10.0}, 0)
    assert regularised < 0.85 * plain, (plain, regularised)


def test_check_regularise():
    assert check_regularise(None) == {} and check_regularise({}) == {}
    assert check_regularise({"kinetic": 1, "jacobian": 0}) == {"kinetic": 1.0}
    for bad in ({"kinetc": 1.0}, {"kinetic": -1.0}, {"kinetic": float("nan")}, {"kinetic": "1"},
                {"jacobian": True}, [("kinetic", 1.0)]):
        with pytest.raises(BloodsegError):
            check_regularise(bad)
    block = ODEBlock(2)
    with pytest.raises(BloodsegError, match="unknown ODE regulariser"):
        block.regularise = {"energy": 1.0}
    assert block.regularise == {}


def test_fit_adds_the_penalty_and_logs_it(tmp_path):
    cfg = TrainRecipe(epochs=1, batch_size=4, lr=1e-2, progress=False, ode_reg={"kinetic": 0.1, "jacobian": 0.1})
    torch.manual_seed(0)
    model = build_model("ode-unet-5", width=4)
    history = fit(model, ColourBlobs(8), ColourBlobs(4, 1), tmp_path / "reg", cfg, device="cpu")
    assert history[0]["reg_loss"] > 0 and history[0]["nfe_forward"] > 0
    assert all(b.regularise == {} and b.reg_loss is None for b in ode_blocks(model))   # switched off again
    plain = fit(build_model("ode-unet-5", width=4), ColourBlobs(8), ColourBlobs(4, 1), tmp_path / "plain",
                cfg, device="cpu", ode_reg={})
    assert "reg_loss" not in plain[0]
    with pytest.raises(BloodsegError, match="has none"):
        fit(build_model("unet", width=4), ColourBlobs(8), ColourBlobs(4, 1), tmp_path / "unet", cfg, device="cpu")


def test_recipe_field_round_trips_and_old_recipes_load():
    r = Recipe("x").replace(**{"train.ode_reg": {"kinetic": 0.01}})
    assert Recipe.from_dict(r.to_dict()) == r
    old = Recipe("x").to_dict()
    del old["train"]["ode_reg"]
    assert Recipe.from_dict(old).train.ode_reg == {}
    with pytest.raises(BloodsegError):
        TrainRecipe(ode_reg={"kinetic": -1}).validate()


def test_cli_parses_ode_reg(tmp_path, capsys):
    args = cli.build_parser().parse_args(["train", "--model", "nodes-unet", "--out", str(tmp_path),
                                          "--ode-reg", "kinetic=0.01, jacobian=2e-3"])
    assert cli.recipe_from_args(args).train.ode_reg == {"kinetic": 0.01, "jacobian": 0.002}
    for bad, what in (("kinetic", "NAME=WEIGHT"), ("kinetic=abc", "NAME=WEIGHT"), ("speed=1", "unknown ODE"),
                      ("kinetic=-1", ">= 0"), (",", "NAME=WEIGHT")):
        rc = cli.main(["train", "--model", "nodes-unet", "--out", str(tmp_path / "run"), "--ode-reg", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "bloodseg train: error:" in err and what in err, (bad, err)
    assert not (tmp_path / "run").exists()     # refused before any data or folder is made


def test_regularisation_study_records_both_arms_and_reuses_finished_units(tmp_path):
    from bloodseg.paper.regularise import regularisation_study
    kw = dict(out=tmp_path / "speed" / "regularisation.json", work=tmp_path / "work", seeds=(0,), scale="smoke",
              regularise={"kinetic": 0.1, "jacobian": 0.1}, log=lambda msg: None)
    r = regularisation_study(**kw)
    assert kw["out"].exists()
    for key in ("git_commit", "command", "recipe", "device", "torch", "date", "wall_s"):
        assert key in r
    plain, reg = r["units"]["plain"][0], r["units"]["regularised"][0]
    assert plain["reg_loss"] is None and reg["reg_loss"] > 0 and reg["recipe"]["train"]["ode_reg"] == kw["regularise"]
    assert r["nfe_train_ratio"] > 0 and r["miou_diff_pp"]["n_images"] == len(plain["per_image_miou"])
    again = regularisation_study(**kw)          # the trained units are read back, not trained again
    assert again["units"] == r["units"]
