"""Held-out accuracy statistics (espo_async/eval_stats.py): errors over problems, paired gains."""

import math

import pytest

from espo_async.eval_stats import accuracy_se, mean_ci95, mean_se, paired_difference, per_problem_means, t95


def test_standard_error_is_over_problems_not_samples():
    # two problems, 4 samples each: one always solved, one never. Pooled binomial error of 8
    # samples at p = 0.5 would be 0.177; over the 2 problem means (1, 0) it is 0.5.
    scores = {("a", i): 1.0 for i in range(4)} | {("b", i): 0.0 for i in range(4)}
    acc, se = accuracy_se(scores)
    assert acc == 0.5 and se == pytest.approx(0.5)
    # one sample per problem: the binomial error with the n - 1 variance
    single = {(f"p{i}", 0): float(i % 2) for i in range(100)}
    acc, se = accuracy_se(single)
    assert acc == 0.5 and se == pytest.approx(math.sqrt(0.25 * 100 / 99 / 100))


def test_paired_difference_removes_problem_difficulty():
    before = per_problem_means({("a", 0): 1.0, ("a", 1): 1.0, ("b", 0): 0.0, ("b", 1): 0.0, ("c", 0): 0.0})
    after = {"a": 1.0, "b": 0.5, "d": 1.0}  # c and d are not in both: left out
    d, se, n = paired_difference(before, after)
    assert n == 2 and d == pytest.approx(0.25) and se == pytest.approx(0.25)


def test_confidence_interval_uses_student_t():
    assert t95(2) == pytest.approx(12.706) and t95(3) == pytest.approx(4.303) and t95(1000) == 1.96
    m, half = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(mean_ci95([1.0])[1]) and math.isnan(mean_se([])[0])
    assert mean_ci95([1.0, float("nan"), 3.0])[0] == 2.0  # missing runs are skipped
