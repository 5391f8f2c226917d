"""Paired statistics for "model B beats model A": bootstrap confidence intervals and verdicts.

Scores are arrays of shape ``(seeds, images)``: one number (MIoU, PA ...) per training seed and
per test image, for models trained on the same seeds and tested on the same images. Both sources
of noise are resampled (a two-level bootstrap): the seeds with replacement, and the test images
with replacement, the same draws for both models (the comparison is *paired*). The interval is
the 2.5th to 97.5th percentile of the resampled means (a percentile interval).

* :func:`paired_bootstrap` — mean of ``b - a`` and its 95% interval;
* :func:`mean_ci` — the same for one model's scores (1-D: one value per seed);
* :func:`bootstrap_stat` — any statistic of several models' means (a spread, a ratio, a rank
  correlation) under the same paired resampling, and its interval;
* :func:`pooled_bootstrap` — the same paired resampling for scores pooled over images (the paper's
  PA and MIoU come from one confusion matrix summed over the test set, not from a mean of per-image
  scores), from per-image confusion matrices;
* :func:`seed_spread` — how far a number moves over seeds alone (range and sd);
* :func:`verdict` — "holds", "does not hold" or "inconclusive" (the interval contains the threshold).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import BloodsegError

#: Resamples by default; the 2.5/97.5 percentiles of 10,000 resamples move by ~1% of their width.
N_BOOT = 10_000
LEVEL = 0.95


def _matrix(x, what: str) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[:, None]                      # one value per seed: resample the seeds only
    if m.ndim != 2 or m.size == 0:
        raise BloodsegError(f"{what} must be a non-empty (seeds x images) array; got shape {m.shape}")
    if not np.isfinite(m).all():
        raise BloodsegError(f"{what} holds {int((~np.isfinite(m)).sum())} value(s) that are not finite "
                            "(nan or inf); drop or score those images before comparing")
    return m


def bootstrap_means(x, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``n_boot`` means of ``x`` (seeds x images) with seeds and images resampled with replacement.

    A resample's mean is ``w_s @ x @ w_i / (S * I)`` with multinomial counts ``w_s`` over the S seeds
    and ``w_i`` over the I images, so no resampled matrix is ever built."""
    m = _matrix(x, "scores")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise BloodsegError(f"n_boot must be a whole number >= 1; got {n_boot!r}")
    s, i = m.shape
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for lo in range(0, n_boot, 2000):        # chunks: memory stays O(2000 x (S + I))
        k = min(2000, n_boot - lo)
        ws = rng.multinomial(s, np.full(s, 1.0 / s), size=k).astype(np.float64)
        wi = rng.multinomial(i, np.full(i, 1.0 / i), size=k).astype(np.float64)
        out[lo:lo + k] = np.einsum("bs,si,bi->b", ws, m, wi) / (s * i)
    return out


def bootstrap_stat(stack, stat, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """``stat`` of the per-model means and its interval, models resampled together (paired).

    ``stack``: ``models x seeds x images`` scores (every model on the same seeds and images); each
    resample draws seeds and images with replacement, the same draws for every model, and
    ``stat(means)`` maps the vector of the models' resampled means to one number (e.g.
    ``np.ptp`` for a spread). Returns ``dict(value, ci)``: ``value`` on the data as they are."""
    m = np.asarray(stack, dtype=np.float64)
    if m.ndim != 3 or m.size == 0:
        raise BloodsegError(f"bootstrap_stat needs a non-empty models x seeds x images array; got shape {m.shape}")
    if not np.isfinite(m).all():
        raise BloodsegError("bootstrap_stat: scores hold values that are not finite (nan or inf)")
    _, s, i = m.shape
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)
    wi = rng.multinomial(i, np.full(i, 1.0 / i), size=n_boot).astype(np.float64)
    means = np.einsum("bs,msi,bi->bm", ws, m, wi) / (s * i)
    values = np.array([stat(row) for row in means])
    return dict(value=float(stat(m.mean(axis=(1, 2)))), ci=_interval(values, level))


def pooled_scores(cm: np.ndarray) -> dict:
    """PA and MIoU of confusion matrices ``(..., C, C)`` (rows: truth); a class absent from truth and
    prediction is left out of the mean, as in :func:`bloodseg.metrics.scores`."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    union = cm.sum(-1) + cm.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
        pa = tp.sum(-1) / cm.sum((-2, -1))
    return dict(pa=pa, miou=np.nanmean(iou, axis=-1))


def pooled_bootstrap(cms, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL, key: str = "miou") -> dict:
    """Pooled ``key`` ("miou" or "pa", in %) of each model, and of each model minus the first, with intervals.

    ``cms``: ``models x seeds x images x C x C`` per-image confusion matrices (every model on the same
    seeds and images). A model's pooled score on one seed sums that seed's matrices over the images;
    over seeds it is the mean of the per-seed scores (one training run = one test-set score, as a
    paper reports it). Each resample draws seeds and images with replacement, the same draws for
    every model. Returns ``dict(value, ci, diff, diff_ci)`` (lists over models; ``diff[0]`` is 0)."""
    m = np.asarray(cms, dtype=np.float64)
    if m.ndim != 5 or m.shape[-1] != m.shape[-2] or m.size == 0:
        raise BloodsegError(f"pooled_bootstrap needs models x seeds x images x C x C counts; got shape {m.shape}")
    if key not in ("miou", "pa"):
        raise BloodsegError(f"key must be 'miou' or 'pa'; got {key!r}")
    _, s, i = m.shape[:3]
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)
    wi = rng.multinomial(i, np.full(i, 1.0 / i), size=n_boot).astype(np.float64)
    # the images' matrices summed with each resample's weights: one matrix product (the counts and
    # weights are whole numbers, so the sums are exact in any order: the same as an einsum, faster)
    n_models, _, _, c, _ = m.shape
    summed = (wi @ m.transpose(2, 0, 1, 3, 4).reshape(i, -1)).reshape(n_boot, n_models, s, c, c)
    per_seed = 100 * pooled_scores(summed)[key]                                        # boot x models x seeds
    boot = np.einsum("bms,bs->bm", np.nan_to_num(per_seed), ws) / s
    value = (100 * pooled_scores(m.sum(axis=2))[key]).mean(axis=1)
    diff = boot - boot[:, :1]
    return dict(value=value.tolist(), ci=[_interval(boot[:, k], level) for k in range(m.shape[0])],
                diff=(value - value[0]).tolist(), diff_ci=[_interval(diff[:, k], level) for k in range(m.shape[0])],
                boot=boot)


def pooled_stat(cms, stat, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL, key: str = "miou") -> dict:
    """``stat`` of the models' pooled scores (e.g. ``np.ptp``: their spread) and its interval, under
    the paired resampling of :func:`pooled_bootstrap`: ``dict(value, ci)``."""
    r = pooled_bootstrap(cms, n_boot, seed, level, key)
    values = np.array([stat(row) for row in r["boot"]])
    return dict(value=float(stat(np.array(r["value"]))), ci=_interval(values, level))


def _interval(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_ci(x, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """Mean of ``x`` and its bootstrap interval: ``dict(mean, ci=(lo, hi), n_seeds, n_images)``.

    ``x``: one value per seed (1-D) or ``seeds x images``. With a single seed and 1-D ``x`` the
    interval has zero width: one run says nothing about seed noise (see :func:`seed_spread`)."""
    m = _matrix(x, "scores")
    means = bootstrap_means(m, n_boot, seed)
    return dict(mean=float(m.mean()), ci=_interval(means, level), n_seeds=m.shape[0], n_images=m.shape[1])


def paired_bootstrap(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """How much ``b`` beats ``a``: mean of ``b - a`` over seeds and images and its 95% interval.

    ``a`` and ``b``: scores of two models, ``seeds x images`` (or one value per seed), on the same
    seeds and images in the same order. Returns ``dict(diff, ci=(lo, hi), n_seeds, n_images)``.
    """
    ma, mb = _matrix(a, "scores of a"), _matrix(b, "scores of b")
    if ma.shape != mb.shape:
        raise BloodsegError(f"paired scores need the same seeds and images: a is {ma.shape[0]}x{ma.shape[1]}, "
                            f"b is {mb.shape[0]}x{mb.shape[1]}")
    r = mean_ci(mb - ma, n_boot, seed, level)
    return dict(diff=r["mean"], ci=r["ci"], n_seeds=r["n_seeds"], n_images=r["n_images"])


def seed_spread(values) -> dict:
    """How much a number moves over seeds: ``dict(n, mean, range, sd)`` (sd with ddof=1; nan for one seed)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise BloodsegError("seed_spread needs at least one value")
    return dict(n=int(v.size), mean=float(v.mean()), range=float(v.max() - v.min()),
                sd=float(v.std(ddof=1)) if v.size > 1 else math.nan)


#: The ledger's verdicts (:func:`verdict` gives the first three) and their colours in tables and figures.
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
UNTESTABLE, NOT_YET = "untestable", "not measured yet"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNTESTABLE, NOT_YET)
VERDICT_COLOURS = {HOLDS: "#1a7f37", FAILS: "#cf222e", INCONCLUSIVE: "#9a6700", UNTESTABLE: "#6e7781",
                   NOT_YET: "#8c959f"}


class MissingEvidence(Exception):
    """A ledger row's estimate cannot be made yet: the message says what to run."""


def ledger_row(table, claim, unit, paper, estimate, side, threshold, where, rule, note="") -> dict:
    """One claim of the ledger before it is judged: ``estimate()`` gives ``(value, interval, source)``
    or raises :class:`MissingEvidence`; ``side`` and ``threshold`` are the claim; ``where`` the chapter."""
    return dict(table=table, claim=claim, unit=unit, paper=paper, estimate=estimate, side=side,
                threshold=threshold, where=where, rule=rule, note=note)


def source_line(scale: str, records: list[dict]) -> str:
    """One line of provenance for a set of records: scale, seeds, device, torch, commit, date."""
    r = max(records, key=lambda r: r["date"])
    seeds = sorted({x["seed"] for x in records})
    return (f"{scale} | {len(seeds)} seed(s) | {r['device']} | torch {r['torch']} | "
            f"commit {str(r['git_commit'])[:8]} | {r['date'][:10]}")


def verdict(ci, threshold: float = 0.0, claim: str = "greater") -> str:
    """The claim "the quantity is greater (or less) than ``threshold``" against an interval ``ci``.

    "holds" when the whole interval is on the claimed side, "does not hold" when the whole interval
    is on the other side, "inconclusive" when the interval contains the threshold (ends included)."""
    lo, hi = (float(c) for c in ci)
    if not (lo <= hi):
        raise BloodsegError(f"a confidence interval needs lo <= hi; got ({lo}, {hi})")
    if claim not in ("greater", "less"):
        raise BloodsegError(f"claim must be 'greater' or 'less'; got {claim!r}")
    above, below = lo > threshold, hi < threshold
    if claim == "less":
        above, below = below, above
    return HOLDS if above else FAILS if below else INCONCLUSIVE
