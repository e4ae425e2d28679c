"""experiments/token_ceiling.py: the share of tokens stops saved, on hand-made numbers."""

from __future__ import annotations

import pytest

from experiments.token_ceiling import stop_saving


def test_stops_save_the_rest_of_an_average_rollout():
    # 3 rollouts of 90 tokens run to the end, 1 is stopped after 30: it saved 60 of 360 tokens
    r = stop_saving([90, 90, 90, 30], [False, False, False, True])
    assert r["stop_rate"] == 0.25 and r["counterfactual_length"] == 90.0
    assert r["saved_share"] == pytest.approx(60 / 360)
    # s * (1 - g / L) is the same here: at a stop rate of 0.25 no stop saves more than 25%
    assert r["saved_share"] == pytest.approx(0.25 * (1 - 30 / 90))


def test_a_stop_after_the_average_length_saves_nothing_and_no_stops_means_no_share():
    assert stop_saving([50, 50, 80], [False, False, True])["saved_share"] == 0.0
    assert stop_saving([50, 50], [False, False])["saved_share"] is None
    assert stop_saving([], [])["stop_rate"] == 0.0
