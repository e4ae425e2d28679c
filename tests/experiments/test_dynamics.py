"""experiments/dynamics.py on synthetic run folders: windows, matched-step token ratios, output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.dynamics import main, tokens_at, windows


def _run(root: Path, method: str, seed: int, steps: int, tokens_per_step: float, truncated_after: int) -> None:
    d = root / method / f"seed-{seed}"
    d.mkdir(parents=True)
    rows = [{"step": s, "accuracy": 0.5, "mean_length": 80.0 + (40 if s > truncated_after else 0),
             "truncated_rate": 1.0 if s > truncated_after else 0.0, "entropy": 0.1, "stop_rate": 0.0,
             "cumulative_tokens": tokens_per_step * s} for s in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text(json.dumps({"step": 0, "accuracy": 0.3, "accuracy_se": 0.02}) + "\n")


def test_windows_average_each_column_and_skip_missing_values():
    rows = [{"step": 1, "accuracy": 0.2, "entropy": float("nan")}, {"step": 2, "accuracy": 0.4},
            {"step": 3, "accuracy": 1.0, "entropy": 0.3}]
    w = windows(rows, 2)
    assert [(x["first_step"], x["last_step"]) for x in w] == [(1, 2), (3, 3)]
    assert w[0]["accuracy"] == pytest.approx(0.3) and w[0]["entropy"] is None and w[1]["entropy"] == 0.3
    assert tokens_at([{"step": 5, "cumulative_tokens": 7}], 3) == 7.0
    assert tokens_at([{"step": 5, "cumulative_tokens": 7}], 6) is None


def test_tokens_are_compared_at_the_matched_step_not_at_the_end(tmp_path, capsys):
    _run(tmp_path, "ppo", 0, 40, tokens_per_step=100.0, truncated_after=20)  # rambles after step 20
    _run(tmp_path, "espo", 0, 40, tokens_per_step=80.0, truncated_after=99)
    out = tmp_path / "d.json"
    assert main([str(tmp_path), "--methods", "ppo", "espo", "--seeds", "0", "--window", "10",
                 "--match-step", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens_vs_first_method_at_match_step"]["espo"]["0"] == pytest.approx(0.8)
    assert [w["truncated_rate"] for w in result["runs"]["ppo"]["0"]["windows"]] == [0.0, 0.0, 1.0, 1.0]
    assert "0: 0.300 ± 0.020" in capsys.readouterr().out


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--window", "0"])
