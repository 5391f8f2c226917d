"""The measurements behind chapters 1-3 (bloodseg.paper.foundations, bloodseg.paper.data_study): they must
measure what they claim."""
import math
import time

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bloodseg.paper import data_study  # noqa: E402
from bloodseg.paper import foundations as studies  # noqa: E402
from bloodseg.datasets import synthetic_splits  # noqa: E402
from bloodseg.errors import BloodsegError, SolverError  # noqa: E402
from bloodseg.ode import ODEBlock  # noqa: E402
from bloodseg.synthetic import make_smear  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def test_euler_error_on_the_papers_example_equals_the_step():
    # dh/dt = 2t from h(0) = 0: Euler sums 2·k·h·h for k < n = 1/h, i.e. 1 - h, so the error is h
    rows = studies.solver_study("paper", steps=(1, 1 / 2, 1 / 4, 1 / 8, 1 / 16), tolerances=())
    for row in rows:
        assert row["error"] == pytest.approx(row["step_size"], abs=1e-12)
        assert row["nfe"] == round(1 / row["step_size"])
        assert row["exact"] == 1.0


def test_euler_error_falls_linearly_on_a_nonpolynomial_example():
    rows = studies.solver_study("growth", steps=(1 / 16, 1 / 32, 1 / 64, 1 / 128), tolerances=())
    errors = [r["error"] for r in rows]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), ratios  # first order: half the step, half the error


def test_dopri5_is_exact_on_a_polynomial_and_tolerance_controlled_otherwise():
    for row in studies.solver_study("paper", steps=(), tolerances=(1e-2, 1e-6)):
        assert row["error"] < 1e-12           # order 5 integrates t^2 exactly
    rows = studies.solver_study("growth", steps=(), tolerances=(1e-2, 1e-4, 1e-6, 1e-8))
    nfes = [r["nfe"] for r in rows]
    errors = [r["error"] for r in rows]
    assert nfes == sorted(nfes) and nfes[-1] > nfes[0]
    assert errors == sorted(errors, reverse=True)
    for r in rows:   # the global error stays within a small multiple of the tolerance times |h|
        assert r["error"] < 10 * r["rtol"] * math.e
    with pytest.raises(BloodsegError):
        studies.solve_example("nope")


def test_residual_block_is_euler_step_one_and_euler_converges_to_dopri5():
    torch.manual_seed(0)
    block = ODEBlock(4)
    x = studies.seeded_feature_map(4, 8, seed=1)
    assert torch.equal(x, studies.seeded_feature_map(4, 8, seed=1))
    assert studies.residual_vs_euler(block, x) < 1e-6
    reference, rows = studies.euler_convergence(block.func, x, steps=(1 / 4, 1 / 8, 1 / 16))
    assert reference.shape == x.shape and rows[0]["method"] == "dopri5" and rows[0]["nfe"] > 0
    diffs = [r["max_abs_diff"] for r in rows[1:]]
    assert [r["nfe"] for r in rows[1:]] == [4, 8, 16]
    assert all(1.7 < a / b < 2.3 for a, b in zip(diffs, diffs[1:])), diffs
    paths = studies.euler_trajectories(block.func, x, steps=(1 / 2, 1 / 4), index=(0, 1, 2, 3), points=9)
    t_ref, h_ref = paths["dopri5"]
    assert len(t_ref) == 9 and h_ref[-1] == pytest.approx(float(reference[0, 1, 2, 3]), abs=1e-4)
    assert [len(paths[s][0]) for s in (0.5, 0.25)] == [3, 5]
    assert all(paths[s][1][0] == pytest.approx(float(x[0, 1, 2, 3])) for s in (0.5, 0.25))


def test_nfe_grows_as_tolerance_tightens_and_tolerance_is_restored():
    torch.manual_seed(0)
    block = ODEBlock(4, rtol=1e-3)
    x = studies.seeded_feature_map(4, 8)
    rows = studies.nfe_vs_tolerance(block, x, tolerances=(1e-1, 1e-3, 1e-5, 1e-6))
    nfes = [r["nfe"] for r in rows]
    assert nfes == sorted(nfes) and nfes[-1] > nfes[0]
    assert rows[-1]["change"] == 0.0 and rows[0]["change"] > rows[-2]["change"]
    assert block.rtol == 1e-3 and block.atol == 1e-3


def test_adjoint_and_direct_gradients_agree():
    out = studies.gradient_agreement(channels=2, size=4, rtol=1e-7)
    assert out["max_rel_diff"] < 1e-4
    assert out["nfe_direct"][0] == out["nfe_direct"][1] > 0   # direct: backward walks the forward graph
    assert out["nfe_adjoint"][1] > 0                          # adjoint: a real backward solve


def test_exploding_dynamics_hit_the_step_cap_quickly():
    block = ODEBlock(1, func=studies.ExplodingFunc(50.0), max_steps=40, name="demo block")
    start = time.perf_counter()
    with pytest.raises(SolverError, match="demo block"):
        block(torch.ones(2))
    assert time.perf_counter() - start < 5


def test_block_step_cost_direct_memory_grows_with_nfe_adjoint_stays_flat():
    rows = studies.block_step_cost(channels=4, size=16, batch=2, tolerances=(1e-2, 1e-5))
    assert len(rows) == 4
    direct = [r for r in rows if not r["adjoint"]]
    adjoint = [r for r in rows if r["adjoint"]]
    assert direct[1]["nfe_forward"] > direct[0]["nfe_forward"]
    # what autograd keeps grows with the number of f evaluations; the adjoint keeps ~ the endpoints
    assert direct[1]["saved_mb"] > 1.2 * direct[0]["saved_mb"]
    assert adjoint[0]["saved_mb"] == adjoint[1]["saved_mb"] < 0.2 * direct[0]["saved_mb"]
    for r in rows:
        assert r["seconds"] > 0 and r["nfe_backward"] > 0
    if rows[0]["peak_mb"] is not None:    # Linux: measured peak RSS of the child process
        assert direct[1]["peak_mb"] > adjoint[1]["peak_mb"]
        assert direct[1]["peak_mb"] > direct[0]["peak_mb"]


def test_nfe_during_training_logs_every_step():
    rows = studies.nfe_during_training(channels=4, size=8, batch=2, steps=4)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["nfe_forward"] > 0 and r["nfe_backward"] == r["nfe_forward"] for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_clahe_histograms_and_figures():
    image, mask = make_smear(0, size=(96, 128))
    hist = data_study.luma_histogram(image)
    assert hist.shape == (256,) and hist.sum() == pytest.approx(1.0)
    fig = data_study.plot_clahe(image, clip_limit=3.0, tile_grid=(4, 4))
    assert len(fig.axes) == 3
    # CLAHE spreads the luma: the histogram after it is wider
    from bloodseg.preprocess import clahe_on_luma
    bins = np.arange(256)

    def spread(h):
        mean = (bins * h).sum()
        return math.sqrt(((bins - mean) ** 2 * h).sum())
    assert spread(data_study.luma_histogram(clahe_on_luma(image, 3.0))) > spread(hist)
    fig2 = data_study.plot_pairs([(image, mask)], titles=["s"], overlay_alpha=0.4)
    assert len(fig2.axes) == 3
    fig3 = data_study.plot_gallery([(image, mask)] * 3, titles=["a", "b", "c"])
    assert len(fig3.axes) == 6
    import matplotlib.pyplot as plt
    plt.close("all")


def test_luma_contrast_is_the_std_of_the_luma_and_clahe_raises_it():
    flat = np.full((32, 48, 3), 200, np.uint8)
    assert data_study.luma_contrast(flat) == 0.0
    halves = flat.copy()
    halves[:, 24:] = 100                       # grey: luma = the grey level; two equal halves 100 apart
    assert data_study.luma_contrast(halves) == pytest.approx(50.0)
    smear = make_smear(0, size=(96, 128))[0]
    out = data_study.clahe_contrast({"smear": smear, "halves": halves}, clip_limit=3.0, tile_grid=(4, 4))
    smear_row = out["images"][0]
    assert [r["image"] for r in out["images"]] == ["smear", "halves"]
    assert smear_row["contrast_before"] == pytest.approx(data_study.luma_contrast(smear))
    assert smear_row["contrast_after"] > smear_row["contrast_before"]     # a smear's narrow luma spreads
    assert smear_row["ratio"] == pytest.approx(smear_row["contrast_after"] / smear_row["contrast_before"])
    assert out["contrast_before"] == pytest.approx(np.mean([r["contrast_before"] for r in out["images"]]))
    assert out["contrast_after"] == pytest.approx(np.mean([r["contrast_after"] for r in out["images"]]))
    assert (out["clip_limit"], out["tile_grid"]) == (3.0, [4, 4])
    with pytest.raises(BloodsegError):
        data_study.clahe_contrast({})


def test_class_balance_of_splits_and_baseline_scores():
    splits = synthetic_splits("smoke")
    rows = data_study.split_balance(splits)
    assert [r["split"] for r in rows] == ["train", "val", "test"]
    for r in rows:
        assert r["samples"] == len(splits[r["split"]])
        assert r["background"] + r["white cell"] + r["red cell"] == pytest.approx(1.0)
    fractions = data_study.class_fractions([np.array([[0, 1], [2, 2]])])
    assert fractions.tolist() == [0.25, 0.25, 0.5]
    fig = data_study.plot_split_balance(rows)
    assert fig.axes
    import matplotlib.pyplot as plt
    plt.close("all")
    out = data_study.baseline_scores([make_smear(s, size=(160, 240)) for s in range(2)])
    assert 0.3 < out["miou"] < 1.0 and len(out["per_image_miou"]) == 2
