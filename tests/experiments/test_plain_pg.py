"""The plain reference loop's pieces that can be checked without a model run."""

from __future__ import annotations

import math

import pytest

from experiments.plain_pg import pass_at_k


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    # 1 - C(n-c, k) / C(n, k): with n=8, c=2, k=4, 1 - C(6,4)/C(8,4) = 1 - 15/70
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)
    assert all(pass_at_k(16, c, 8) <= pass_at_k(16, c + 1, 8) for c in range(16))
    assert not math.isnan(pass_at_k(4, 1, 8))  # k > n: 1 if any is correct
