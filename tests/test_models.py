"""The U-Net family: names, shapes, input checks, ODE-block positions, parameter counts."""
import pytest
import torch

from bloodseg.errors import BloodsegError, DataError
from bloodseg.models import (MODEL_NAMES, NODES_UNET_BLOCKS, ResUNet, UNet, build_model,
                             count_parameters, parameter_memory_mb, position_channels)
from bloodseg.ode import ODEBlock, ODEFunc, nfe_report, ode_blocks

W = 4  # tiny width: the tests check wiring, not learning


def test_model_names():
    assert MODEL_NAMES == ("unet",) + tuple(f"ode-unet-{p}" for p in range(1, 10)) + ("resunet", "nodes-unet")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_name_builds_and_returns_logits_of_the_input_size(name):
    torch.manual_seed(0)
    model = build_model(name, width=W, rtol=1e-2) if name != "nodes-unet" else build_model(name, width=W)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 3, 32, 48)
    # logits, not probabilities: softmax would sum to 1 over the class axis
    assert not torch.allclose(out.sum(dim=1), torch.ones(2, 32, 48), atol=1e-3)
    assert model.name == name.lower()


def test_input_checks_say_what_to_do():
    model = build_model("unet", width=W)
    with pytest.raises(DataError) as info:
        model(torch.randn(1, 3, 30, 32))
    msg = str(info.value)
    assert "1 x 3 x 30 x 32" in msg and "multiple of 16" in msg and "bloodseg.predict" in msg
    with pytest.raises(DataError, match="input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(DataError, match="unsqueeze"):
        model(torch.randn(3, 32, 32))
    assert isinstance(info.value, BloodsegError)


@pytest.mark.parametrize("position", range(1, 10))
def test_block_at_position_sees_the_expected_feature_map(position):
    model = build_model(f"ode-unet-{position}", width=W, rtol=1e-2).eval()
    (block,) = ode_blocks(model)
    assert block.name == f"ODE-block at position {position}"
    seen = {}
    block.register_forward_hook(lambda m, inp, out: seen.update(shape=tuple(inp[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    level = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 3, 7: 2, 8: 1, 9: 0}[position]
    side = 64 // 2 ** level
    assert seen["shape"] == (1, W * 2 ** level, side, side)
    assert position_channels(position, W) == W * 2 ** level
    assert int(block.nfe_forward) > 0


def test_nodes_unet_blocks_and_override():
    model = build_model("nodes-unet", width=W)
    tols = {b.name: b.rtol for b in ode_blocks(model)}
    assert tols == {f"ODE-block at position {p}": r for p, r in NODES_UNET_BLOCKS.items()}
    assert all(b.atol == b.rtol for b in ode_blocks(model))
    other = build_model("nodes-unet", width=W, blocks={"3": 1e-3, 7: 1e-2})  # JSON-style keys too
    assert sorted(b.name for b in ode_blocks(other)) == ["ODE-block at position 3", "ODE-block at position 7"]
    flat = build_model("nodes-unet", width=W, rtol=1e-3)  # one tolerance for every block
    assert sorted((b.name[-1], b.rtol) for b in ode_blocks(flat)) == [("4", 1e-3), ("5", 1e-3), ("6", 1e-3)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert set(nfe_report(model)) == {f"ODE-block at position {p}" for p in NODES_UNET_BLOCKS}


def test_parameter_counts():
    unet = count_parameters(build_model("unet", width=8))
    assert unet < count_parameters(build_model("resunet", width=8))
    for p in range(1, 10):
        extra = count_parameters(build_model(f"ode-unet-{p}", width=8)) - unet
        assert extra == count_parameters(ODEFunc(position_channels(p, 8)))
    # state_dict of an ODE-U-Net = the U-Net's + the ODE function's (NFE buffers stay out)
    keys = set(build_model("unet", width=8).state_dict())
    ode_keys = set(build_model("ode-unet-5", width=8).state_dict())
    assert keys < ode_keys and all(k.startswith("ode.5.func.") for k in ode_keys - keys)
    model = build_model("unet", width=8)
    assert parameter_memory_mb(model) == pytest.approx(count_parameters(model) * 4 / 2 ** 20)
    narrow = build_model("ode-unet-5", width=8, ode_hidden=8)
    assert count_parameters(narrow) < count_parameters(build_model("ode-unet-5", width=8))


def test_build_model_round_trip():
    for name, options in [("unet", dict(width=W)), ("resunet", dict(width=W, classes=2)),
                          ("ode-unet-3", dict(width=W, rtol=1e-4, method="bosh3", max_steps=50)),
                          ("nodes-unet", dict(width=W, adjoint=True, ode_hidden=4))]:
        model = build_model(name, **options)
        again = build_model(model.name, **model.options)
        assert again.name == model.name == name and again.options == model.options
        assert type(again) is type(model)
        assert again.state_dict().keys() == model.state_dict().keys()
        again.load_state_dict(model.state_dict())
    model = build_model("ode-unet-3", width=W, rtol=1e-4, method="bosh3", max_steps=50)
    assert model.options["rtol"] == 1e-4
    (block,) = ode_blocks(model)
    assert (block.method, block.max_steps, block.rtol) == ("bosh3", 50, 1e-4)
    # a directly built model names itself so that a checkpoint can rebuild it
    assert UNet(width=W, ode_blocks={4: 1e-4, 5: 1e-6, 6: 1e-4}).name == "nodes-unet"
    assert UNet(width=W, ode_blocks={2: 1e-3}).name == "ode-unet-2"
    assert ResUNet(width=W).name == "resunet"


def test_build_model_errors():
    with pytest.raises(BloodsegError) as info:
        build_model("vgg")
    assert "unet" in str(info.value) and "nodes-unet" in str(info.value)
    with pytest.raises(BloodsegError, match="colour"):
        build_model("unet", colour=True)
    with pytest.raises(BloodsegError, match="blocks"):
        build_model("unet", blocks={5: 1e-3})
    with pytest.raises(BloodsegError, match="1..9"):
        build_model("nodes-unet", blocks={10: 1e-3})
    with pytest.raises(BloodsegError):
        build_model("ode-unet-5", rtol=0.0)
    with pytest.raises(BloodsegError):
        build_model("unet", width=0)


def test_ode_unet_trains_through_the_adjoint():
    torch.manual_seed(0)
    model = build_model("ode-unet-5", width=W, adjoint=True, rtol=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    (block,) = ode_blocks(model)
    assert int(block.nfe_backward) > 0
    assert all(p.grad is not None for p in block.func.parameters())
    assert isinstance(block, ODEBlock)


def test_width_32_parameter_report():
    """The numbers of the report (paper Table 2's parameter memory), printed with -s."""
    rows = []
    for name in MODEL_NAMES:
        model = build_model(name)
        rows.append((name, count_parameters(model), parameter_memory_mb(model)))
        print(f"{name:12s} {rows[-1][1]:>11,d} params {rows[-1][2]:7.2f} MiB")
    counts = dict((n, c) for n, c, _ in rows)
    assert counts["unet"] < counts["ode-unet-1"] < counts["ode-unet-5"]
    assert counts["ode-unet-4"] == counts["ode-unet-6"] and counts["ode-unet-1"] == counts["ode-unet-9"]
    assert counts["unet"] < counts["resunet"]
