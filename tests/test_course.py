"""The book as a course (chapters 1-3): the adjoint written out, the architecture read from the
model, code listings from the source, the solver explorer, and plotting code kept out of sight."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bloodseg.models import NODES_UNET_BLOCKS, build_model, position_channels, position_scale  # noqa: E402
from bloodseg.ode import ODEFunc, ode_blocks  # noqa: E402
from bloodseg.paper import figures, foundations  # noqa: E402

BOOK = Path(__file__).resolve().parents[1] / "book"
FOUNDATIONS = ["01_odes_and_euler", "02_ode_blocks", "03_data_and_preprocessing"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_adjoint_written_out_gives_the_gradients_of_direct_backprop():
    toy = foundations.adjoint_toy(t1=1.0, rtol=1e-7, points=11)
    assert toy["max_rel_diff"] < 1e-5
    assert len(toy["grad_direct"]) == len(toy["grad_adjoint"]) == 8
    # the backward solve runs from t1 to t0 and rebuilds the forward trajectory
    assert toy["t_backward"][0] == toy["t_forward"][-1] and toy["t_backward"][-1] == toy["t_forward"][0]
    assert np.abs(toy["h_backward"][::-1] - toy["h_forward"]).max() < 1e-5
    assert toy["g_backward"].shape == (11, 6) and np.all(toy["g_backward"][0] == 0)
    assert toy["nfe_backward"] > 0 and toy["nfe_forward"] > 0


def test_adjoint_solve_is_approximate_at_a_loose_tolerance():
    tight = foundations.adjoint_toy(t1=1.0, rtol=1e-8, points=3)["max_rel_diff"]
    loose = foundations.adjoint_toy(t1=1.0, rtol=1e-2, points=3)["max_rel_diff"]
    assert loose > tight


def test_gradient_agreement_with_a_fixed_grid_solver_is_first_order():
    coarse = foundations.gradient_agreement(channels=2, size=4, method="euler", step_size=0.5)
    fine = foundations.gradient_agreement(channels=2, size=4, method="euler", step_size=0.125)
    assert fine["nfe_direct"] == (8, 8)
    assert fine["max_rel_diff"] < coarse["max_rel_diff"]


def test_unet_layout_is_read_from_the_model():
    model = build_model("nodes-unet", width=8).train()
    layout = figures.unet_layout(model)
    slots = [e for e in layout["events"] if e["kind"] == "slot"]
    assert [e["position"] for e in slots] == list(range(1, 10))
    for e in slots:
        assert e["channels"] == position_channels(e["position"], 8)
        assert e["scale"] == position_scale(e["position"])
        assert (e["block"] is not None) == (e["position"] in NODES_UNET_BLOCKS)
        if e["block"]:
            assert e["block"]["rtol"] == NODES_UNET_BLOCKS[e["position"]]
    stages = [e for e in layout["events"] if e["kind"] in ("encoder", "decoder")]
    assert [e["out_channels"] for e in stages] == [8, 16, 32, 64, 128, 64, 32, 16, 8]
    # the model is left as it was: no patched method, no hooks, training mode kept
    assert "_slot" not in vars(model) and model.training
    assert not any(m._forward_hooks for m in model.modules())


def test_architecture_figure_of_a_plain_unet():
    fig = figures.plot_architecture("unet", width=8)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "blocks at none" in fig.axes[0].get_title()
    assert not any(t.startswith("ODE-block") for t in texts)
    fig = figures.plot_architecture("ode-unet-3", width=8)
    assert "ODE-block 3" in " ".join(t.get_text() for t in fig.axes[0].texts)


def test_source_listing_shows_the_installed_source():
    listing = foundations.source_listing(ODEFunc).data
    assert "```python\nclass ODEFunc(nn.Module):" in listing and "bloodseg/ode.py" in listing
    method = foundations.source_listing(__import__("bloodseg").ODEBlock._solve).data
    assert "\ndef _solve(self" in method     # dedented


def test_solve_photograph_reports_nfe_time_agreement_and_restores_the_solver():
    from bloodseg.segmenter import Segmenter
    from bloodseg.synthetic import make_smear
    torch.manual_seed(0)
    seg = Segmenter(build_model("nodes-unet", width=4, blocks={5: 1e-3}))
    image, _ = make_smear(0, size=(64, 64))
    ref = foundations.solve_photograph(seg, image, None)
    assert ref["agreement"] is None and ref["nfe_total"] >= 8
    row = foundations.solve_photograph(seg, image, {"method": "euler", "steps": 2}, reference=ref["mask"])
    assert row["nfe"] == {"ODE-block at position 5": 2} and 0 <= row["agreement"] <= 1
    assert 0 < row["ode_seconds"] < row["seconds"]
    assert [b.method for b in ode_blocks(seg.model)] == ["dopri5"]
    fig = figures.plot_solver_grid(image, [row, ref], ref["mask"])
    assert len(fig.axes) == 3


def test_interactive_figure_draws_nothing_until_a_control_changes():
    ipywidgets = pytest.importorskip("ipywidgets")
    calls = []
    slider = ipywidgets.IntSlider(value=1, min=1, max=4)
    box = figures.interactive_figure(lambda steps: calls.append(steps), dict(steps=slider))
    assert calls == [] and isinstance(box, ipywidgets.VBox)
    slider.value = 3
    assert calls == [3]


@pytest.mark.parametrize("name", FOUNDATIONS)
def test_plotting_cells_are_hidden(name):
    nb = json.loads((BOOK / f"{name}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or "hide-input" in cell["metadata"].get("tags", []):
            continue
        source = "".join(cell["source"])
        assert "plt.subplots(" not in source and "plt.show()" not in source, \
            f"{name}: a visible cell that plots (tag it hide-input): {source[:80]!r}"


@pytest.mark.parametrize("name", ["02_ode_blocks", "03_data_and_preprocessing"])
def test_saved_widget_state_is_small(name):
    nb = json.loads((BOOK / f"{name}.ipynb").read_text())
    assert len(json.dumps(nb["metadata"].get("widgets", {}))) < 40_000


def test_as_png_keeps_line_drawings_small():
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    ax.plot([0, 1], [0, 1])
    picture = figures.as_png(fig)
    assert picture.format == "png" and len(picture.data) * 4 / 3 < 45_000
    assert not plt.fignum_exists(fig.number)
