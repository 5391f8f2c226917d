"""bloodseg.paper.nfe_floor: dopri5's evaluation count for the trained, constant and zero flows."""
import torch
from torch import nn

from bloodseg.ode import ODEBlock
from bloodseg.paper import nfe_floor


class Const(nn.Module):
    """f(t, h) = c: the flow the floor is measured with, as a module."""
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, t, h):
        return torch.full_like(h, self.c)


class Linear(nn.Module):
    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, t, h):
        return self.a * h


def _net(func, rtol=1e-4):
    return nn.Sequential(nn.Identity(), ODEBlock(4, rtol=rtol, func=func, name="blk"))


def test_a_constant_flow_sits_on_its_own_floor():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    rows = nfe_floor.block_floors(_net(Const(0.5)), x)
    assert len(rows) == 1 and rows[0]["block"] == "blk"
    r = rows[0]
    assert r["trained"] == r["constant"]             # the block's f is the constant flow itself
    assert r["zero"] > r["constant"]                 # f = 0: the starting rule picks a tiny first step
    # the curve: a smaller constant flow never needs more evaluations
    nfe = [c["nfe"] for c in r["constant_curve"]]
    assert [c["scale"] for c in r["constant_curve"]] == sorted(nfe_floor.VELOCITY_SCALES)
    assert all(a <= b for a, b in zip(nfe, nfe[1:])) and nfe[0] < nfe[-1]
    assert r["velocity_rms"] == torch.tensor(0.5).item()


def test_first_step_keeps_error_control_and_saves_evaluations():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    r, = nfe_floor.block_floors(_net(Linear(-0.3), rtol=1e-3), x)
    assert r["first_step"] < r["trained"]
    assert r["first_step_max_abs_diff"] < 1e-2      # both solves meet rtol = atol = 1e-3 on |h| ~ 1
    # a curved, fast flow: the one big first step is rejected and the solver steps down, not past it
    r2, = nfe_floor.block_floors(_net(Linear(-8.0), rtol=1e-6), x)
    assert r2["first_step"] > 7                      # more than one accepted step of 6 (+1) evaluations
    assert r2["first_step_max_abs_diff"] < 1e-4


def test_summary_ratios():
    rows = [dict(trained=20, constant=20, zero=44, first_step=7), dict(trained=26, constant=14, zero=44, first_step=25)]
    s = nfe_floor.summarise(rows)
    assert s["totals"] == dict(trained=46, constant=34, zero=88, first_step=32)
    assert s["max_saving_by_regularising"] == 46 / 34 and s["saving_by_first_step"] == 46 / 32


def test_record_and_figure(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    rec = nfe_floor.floor_record({"c": (_net(Const(0.2)), x, "a constant flow")}, out=tmp_path / "r.json",
                                 command="test")
    import json
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["models"]["c"]["totals"]["trained"] == rec["models"]["c"]["blocks"][0]["trained"]
    for key in ("git_commit", "device", "torch", "wall_s", "cpu", "threads"):     # bloodseg.paper.records.provenance
        assert key in back, key
    assert back["command"] == "test" and back["date"]
    fig = nfe_floor.plot_floor(back)
    assert len(fig.axes) == 1
