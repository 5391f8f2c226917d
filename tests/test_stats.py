"""bloodseg.paper.stats on constructed data with a known answer."""
import numpy as np
import pytest

from bloodseg.errors import BloodsegError
from bloodseg.paper import stats


def test_exact_shift_gives_that_difference_and_a_zero_width_interval():
    a = np.random.default_rng(1).uniform(0.5, 0.9, size=(3, 12))
    r = stats.paired_bootstrap(a, a + 1.0, n_boot=2000)
    assert r["diff"] == pytest.approx(1.0, abs=1e-12)
    assert r["ci"][0] == pytest.approx(1.0, abs=1e-12) and r["ci"][1] == pytest.approx(1.0, abs=1e-12)
    assert (r["n_seeds"], r["n_images"]) == (3, 12)
    assert stats.verdict(r["ci"]) == "holds"
    assert stats.verdict(r["ci"], threshold=1.5) == "does not hold"


def test_noisy_known_shift_is_covered_and_zero_is_excluded():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(10, 200))
    b = a + 0.3 + rng.normal(0.0, 0.5, size=a.shape)
    r = stats.paired_bootstrap(a, b)
    assert r["ci"][0] < 0.3 < r["ci"][1]
    assert r["ci"][0] > 0
    assert stats.verdict(r["ci"]) == "holds"
    assert stats.verdict(r["ci"], claim="less") == "does not hold"
    # the same comparison the other way round
    back = stats.paired_bootstrap(b, a)
    assert back["diff"] == pytest.approx(-r["diff"])
    assert stats.verdict(back["ci"]) == "does not hold"


def test_identical_models_are_inconclusive():
    a = np.random.default_rng(3).uniform(size=(4, 9))
    r = stats.paired_bootstrap(a, a.copy())
    assert r["diff"] == 0 and r["ci"] == (0.0, 0.0)
    assert stats.verdict(r["ci"], threshold=0.0) == "inconclusive"
    assert stats.verdict((-0.2, 0.4)) == "inconclusive"


def test_bootstrap_is_reproducible_for_a_fixed_seed():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    assert stats.paired_bootstrap(a, b, seed=7) == stats.paired_bootstrap(a, b, seed=7)
    assert stats.paired_bootstrap(a, b, seed=7)["ci"] != stats.paired_bootstrap(a, b, seed=8)["ci"]
    assert np.array_equal(stats.bootstrap_means(a, 500, 3), stats.bootstrap_means(a, 500, 3))


def test_both_levels_are_resampled():
    # one seed far off: resampling seeds must widen the interval beyond what images alone give
    a = np.zeros((5, 30))
    b = np.tile(np.linspace(-0.1, 0.1, 30), (5, 1)) + np.array([[0.0], [0.0], [0.0], [0.0], [2.0]])
    two_level = stats.paired_bootstrap(a, b)
    images_only = stats.paired_bootstrap(a[:1], b[:1])
    width = lambda r: r["ci"][1] - r["ci"][0]  # noqa: E731
    assert width(two_level) > 10 * width(images_only)


def test_mean_ci_and_seed_spread():
    x = [70.0, 72.0, 74.0]
    r = stats.mean_ci(x)
    assert r["mean"] == pytest.approx(72.0)
    assert 70.0 <= r["ci"][0] <= 72.0 <= r["ci"][1] <= 74.0
    s = stats.seed_spread(x)
    assert s == dict(n=3, mean=72.0, range=4.0, sd=pytest.approx(2.0))
    assert np.isnan(stats.seed_spread([1.0])["sd"])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(BloodsegError, match="same seeds and images"):
        stats.paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(BloodsegError, match="not finite"):
        stats.mean_ci([1.0, float("nan")])
    with pytest.raises(BloodsegError, match="lo <= hi"):
        stats.verdict((1.0, 0.0))
    with pytest.raises(BloodsegError, match="claim"):
        stats.verdict((0.0, 1.0), claim="bigger")


def test_bootstrap_stat_of_a_spread_knows_when_models_tie():
    rng = np.random.default_rng(3)
    base = rng.normal(80, 5, size=(3, 40))                  # shared per-image difficulty
    tied = np.stack([base + rng.normal(0, 0.2, size=base.shape) for _ in range(4)])
    apart = np.stack([base + 3 * k for k in range(4)])      # means 0, 3, 6, 9 pp apart
    t = stats.bootstrap_stat(tied, np.ptp, n_boot=2000)
    a = stats.bootstrap_stat(apart, np.ptp, n_boot=2000)
    assert t["ci"][1] < 1.0 and stats.verdict(t["ci"], 2.0, "less") == "holds"
    assert a["value"] == pytest.approx(9.0) and a["ci"][0] == pytest.approx(9.0)   # paired: exact spread
    with pytest.raises(BloodsegError, match="models x seeds x images"):
        stats.bootstrap_stat(base, np.ptp)


def test_pooled_bootstrap_scores_the_summed_confusion_matrix():
    from bloodseg.metrics import scores
    rng = np.random.default_rng(0)
    cms = rng.integers(0, 50, size=(2, 3, 20, 3, 3)).astype(float)
    cms[1, ..., 1, 1] += 30                                  # model 1 gets more white pixels right
    r = stats.pooled_bootstrap(cms, n_boot=2000)
    for m in range(2):                                        # value: mean over seeds of the pooled MIoU
        per_seed = [100 * scores(cms[m, s].sum(axis=0))["miou"] for s in range(3)]
        assert r["value"][m] == pytest.approx(np.mean(per_seed))
        assert r["ci"][m][0] <= r["value"][m] <= r["ci"][m][1]
    assert r["diff"][1] > 0 and r["diff_ci"][1][0] > 0 and r["diff"][0] == 0
    pa = stats.pooled_bootstrap(cms, n_boot=500, key="pa")
    assert pa["value"][0] == pytest.approx(np.mean([100 * scores(cms[0, s].sum(0))["pa"] for s in range(3)]))
    same = stats.pooled_bootstrap(np.stack([cms[0], cms[0]]), n_boot=500)
    assert same["diff_ci"][1] == (0.0, 0.0)
    with pytest.raises(BloodsegError, match="models x seeds x images"):
        stats.pooled_bootstrap(cms[0])


def test_pooled_bootstrap_sums_the_resampled_matrices_exactly_as_the_einsum_did():
    """The resampled sums are one matrix product now (faster); on whole-number counts they are the
    einsum's, bit for bit, so every interval of the claims ledger is unchanged."""
    from bloodseg.paper.stats import pooled_bootstrap, pooled_scores
    rng = np.random.default_rng(3)
    cms = rng.integers(0, 50_000, size=(3, 4, 9, 3, 3)).astype(np.int64)
    for key in ("miou", "pa"):
        got = pooled_bootstrap(cms, n_boot=500, seed=1, key=key)
        r = np.random.default_rng(1)
        ws = r.multinomial(4, np.full(4, 0.25), size=500).astype(np.float64)
        wi = r.multinomial(9, np.full(9, 1 / 9), size=500).astype(np.float64)
        per_seed = 100 * pooled_scores(np.einsum("msikl,bi->bmskl", cms.astype(np.float64), wi))[key]
        want = np.einsum("bms,bs->bm", np.nan_to_num(per_seed), ws) / 4
        assert np.array_equal(got["boot"], want)
