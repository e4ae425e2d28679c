"""experiments/stop_controller.py: the stop controller's view of a run, on hand-made rows."""

from __future__ import annotations

import json
import math

import pytest

from experiments.stop_controller import controller_view, correlation, read_run


def test_correlation_is_pearsons_r_and_nan_when_undefined():
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3])) and math.isnan(correlation([1, 2], [1, 2]))


def test_a_stop_rate_that_swings_against_the_critic_and_false_positives_by_phase():
    # four steps: the critic's values fall as stops rise (the value gate's feedback)
    metrics = [
        {"step": 1, "stop_rate": 0.0, "beta": 7.0, "value_mean": 0.6},
        {"step": 2, "stop_rate": 0.5, "beta": 7.5, "value_mean": 0.1},
        {"step": 3, "stop_rate": 0.25, "beta": 7.2, "value_mean": 0.3},
        {"step": 4, "stop_rate": 0.02, "beta": 6.8, "value_mean": 0.5},
    ]
    shadows = [{"step": 2, "score": 1.0}, {"step": 2, "score": 0.0}, {"step": 2, "score": 0.0},
               {"step": 3, "score": 0.0}, {"step": 9, "score": 1.0}]  # step 9: not in metrics
    v = controller_view(metrics, shadows)
    assert v["steps"] == 4 and v["mean_stop_rate"] == pytest.approx(0.1925)
    assert v["share_steps_stop_below_0.05"] == 0.5 and v["share_steps_stop_above_0.4"] == 0.25
    assert (v["beta_min"], v["beta_max"]) == (6.8, 7.5)
    assert v["corr_value_mean_stop_rate"] < -0.9
    assert v["false_positive_rate"] == pytest.approx(2 / 5)
    by = v["false_positive_rate_by_phase"]
    assert by["high"] == {"shadows": 3, "rate": pytest.approx(1 / 3)}
    assert by["middle"] == {"shadows": 1, "rate": 0.0}
    assert by["low"]["shadows"] == 0 and math.isnan(by["low"]["rate"])


def test_read_run_reads_a_run_folder_and_refuses_one_without_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "stop_rate": 0.25, "beta": 7.0})
                                                      for s in (1, 2, 3)) + "\n")
    v = read_run(tmp_path)  # no shadow.jsonl: no false-positive rate
    assert v["steps"] == 3 and v["shadows"] == 0 and math.isnan(v["false_positive_rate"])
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        read_run(tmp_path / "missing")
