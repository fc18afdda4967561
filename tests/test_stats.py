"""The gate's statistics: the seeded bootstrap (reproducible, and covering the truth at its stated rate)
and McNemar's exact paired accuracy test, checked against scipy's binomial test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from orpo.stats import bootstrap_mean, clopper_pearson, paired_accuracy_difference, proportion_interval


def test_bootstrap_is_reproducible_with_its_seed():
    values = np.random.default_rng(7).normal(0.2, 1.0, size=50)
    first = bootstrap_mean(values, seed=3)
    assert first == bootstrap_mean(values, seed=3)
    other = bootstrap_mean(values, seed=4)
    assert (other.low, other.high) != (first.low, first.high)
    assert first.estimate == pytest.approx(values.mean())
    assert first.low < first.estimate < first.high
    assert (first.n, first.seed, first.confidence) == (50, 3, 0.95)


def test_bootstrap_covers_the_true_mean_at_the_stated_rate():
    """400 simulated paired-difference samples (skewed, n=60): the 95% interval covers the true mean in
    about 95% of them. The simulation is seeded, so the count is fixed; the band is wide enough for any seed
    (binomial sd of the count is ~1.1 points) while still failing a broken interval (e.g. 80% or 100%)."""
    rng = np.random.default_rng(2024)
    true_mean = 0.5  # exponential(scale 1) - 0.5: a skewed difference with mean 0.5
    covered = 0
    trials = 400
    for trial in range(trials):
        sample = rng.exponential(1.0, size=60) - 0.5
        interval = bootstrap_mean(sample, seed=trial, n_resamples=1000)
        covered += interval.low <= true_mean <= interval.high
    assert 0.90 <= covered / trials <= 0.98, covered / trials


def test_a_narrower_confidence_gives_a_narrower_interval():
    values = np.random.default_rng(1).normal(size=40)
    wide, narrow = bootstrap_mean(values, confidence=0.99), bootstrap_mean(values, confidence=0.8)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_constant_values_give_a_zero_width_interval():
    interval = bootstrap_mean([50.0] * 12, seed=0)
    assert (interval.estimate, interval.low, interval.high) == (50.0, 50.0, 50.0)


def test_grouped_bootstrap_resamples_questions_not_turns():
    # Two turns per question, perfectly correlated: the cluster count is the n that matters.
    per_question = np.random.default_rng(0).normal(size=30)
    values = np.repeat(per_question, 2)
    groups = np.repeat(np.arange(30), 2)
    grouped = bootstrap_mean(values, groups=groups, seed=1)
    naive = bootstrap_mean(values, seed=1)
    assert grouped.n == 30 and naive.n == 60
    assert grouped.estimate == pytest.approx(naive.estimate)
    # Treating 60 correlated turns as independent understates the spread by about sqrt(2).
    assert (grouped.high - grouped.low) > 1.25 * (naive.high - naive.low)


def test_bootstrap_refuses_empty_or_failed_values():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([1.0, float("nan")])


def test_paired_accuracy_is_mcnemars_exact_test_with_agresti_min_interval():
    # 50 pairs: 10 only the first model gets right, 2 only the second, 38 the same for both.
    first = [True] * 10 + [False] * 2 + [True] * 20 + [False] * 18
    second = [False] * 10 + [True] * 2 + [True] * 20 + [False] * 18
    interval = paired_accuracy_difference(first, second)
    assert interval.estimate == pytest.approx(8 / 50)
    assert interval.n == 50 and interval.seed is None and "McNemar" in interval.test
    assert interval.p_value == pytest.approx(binomtest(10, 12).pvalue)
    # Agresti-Min by hand: cells 10.5 / 2.5 of n 52, centre 8/52, se sqrt(13 - 64/52) / 52.
    se = ((13 - 64 / 52) ** 0.5) / 52
    assert interval.low == pytest.approx(8 / 52 - 1.959964 * se, abs=1e-6)
    assert interval.high == pytest.approx(8 / 52 + 1.959964 * se, abs=1e-6)
    assert interval.low > 0  # p < 0.05 as well: both say the first model is better


def test_identical_decisions_show_no_difference():
    same = [True, False, True, True] * 10
    interval = paired_accuracy_difference(same, same)
    assert interval.estimate == 0.0 and interval.p_value == 1.0
    assert interval.low < 0.0 < interval.high


def test_paired_accuracy_interval_covers_the_truth():
    """About 95% coverage on simulated paired data (seeded, 300 samples of 80 pairs)."""
    rng = np.random.default_rng(11)
    covered, trials = 0, 300
    for _ in range(trials):
        first = rng.random(80) < 0.70
        # The second model agrees with the first 80% of the time, else is right with probability 0.5.
        second = np.where(rng.random(80) < 0.8, first, rng.random(80) < 0.5)
        truth = 0.70 - (0.8 * 0.70 + 0.2 * 0.5)
        interval = paired_accuracy_difference(first, second)
        covered += interval.low <= truth <= interval.high
    assert 0.91 <= covered / trials <= 0.99, covered / trials


def test_clopper_pearson_edges():
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    low, high = clopper_pearson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 10))
    interval = proportion_interval(7, 10)
    assert interval.estimate == 0.7 and interval.low < 0.7 < interval.high
