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


def _trajectory_run(tmp_path: Path, model_dir: str):
    """A run folder with a config, assets and an empty trajectory log; returns (log, gold answer,
    EOS id, make) where make(i, version, text, token_ids, logprobs, top1, ending) builds a rollout."""
    import numpy as np
    from transformers import AutoTokenizer

    from espo_async.config import parse_config
    from espo_async.runtime.trajectory_log import TrajectoryLog
    from espo_async.tasks.registry import make_task
    from protocols import messages as P

    cfg = parse_config({"task": {"name": "arithmetic", "options": {"n_steps": 3}}})
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    (tmp_path / "assets.json").write_text(json.dumps(
        {"policy_dir": model_dir, "critic_dir": model_dir, "critic_from_policy": True}))
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    problem = make_task("arithmetic", n_steps=3).train_problems()[0]
    gold = make_task("arithmetic", n_steps=3).solution(problem)
    (tmp_path / "learner").mkdir()

    def make(i, version, text, token_ids, logprobs, top1, ending):
        n = len(token_ids)
        return P.Trajectory(
            request_id=f"r{i}", prompt_id=f"g{i}/{problem.id}", sample_index=0, group_size=1, sampler_id="s",
            prompt_token_ids=np.array([1, 5], np.int32), token_ids=np.array(token_ids, np.int32),
            logprobs=np.array(logprobs, np.float32), top1_logprobs=np.array(top1, np.float32),
            versions=np.full(n, version, np.int32), ending=ending,
            finish_reason={"finished": "stop", "truncated": "length", "absorbed": "abort"}[ending],
            stop_index=n - 1 if ending == "absorbed" else -1, tokens_generated=n, text=text)

    return TrajectoryLog(tmp_path / "learner" / "trajectories.log"), gold, eos, make


def test_eos_probability_is_split_by_right_and_wrong_answers(tmp_path, tiny_model_dir):
    import math

    from experiments.dynamics import eos_windows, scored_rollouts, start_model_eos

    log, gold, eos, make = _trajectory_run(tmp_path, tiny_model_dir)

    def traj(i: int, version: int, text: str, last: int, p_last: float):
        return make(i, version, text, [7, 8, last], [-0.1, -0.1, math.log(p_last)], [0, 0, 0],
                    "finished" if last == eos else "truncated")

    log.append(traj(0, 0, gold, eos, 0.9))   # right, version 0
    log.append(traj(1, 1, "1+1=5.", eos, 0.5))  # wrong
    log.append(traj(2, 1, "1+1=5", 7, 0.5))  # cut at T_max: no EOS
    log.append(traj(3, 12, gold, eos, 0.2))  # right, the second window
    log.close()
    assert start_model_eos(tmp_path) == eos
    w = eos_windows(scored_rollouts(tmp_path), eos, 10)
    assert [x["first_version"] for x in w] == [0, 10]
    assert w[0]["rollouts"] == 3 and w[0]["ended_with_eos"] == pytest.approx(2 / 3)
    assert (w[0]["right"], w[0]["wrong"]) == (1, 1)
    assert w[0]["p_eos_right"] == pytest.approx(0.9) and w[0]["p_eos_wrong"] == pytest.approx(0.5)
    assert w[1]["p_eos_right"] == pytest.approx(0.2) and w[1]["p_eos_wrong"] is None


def test_slips_count_sampled_tokens_below_the_top1_in_right_and_wrong_rollouts(tmp_path, tiny_model_dir):
    import math

    from experiments.dynamics import scored_rollouts, slip_windows

    log, gold, eos, make = _trajectory_run(tmp_path, tiny_model_dir)
    top = [math.log(0.99)] * 4
    log.append(make(0, 0, gold, [7, 8, 9, eos], top, top, "finished"))  # right, every token the top-1
    log.append(make(1, 0, "1+1=5.", [7, 8, 9, eos], [top[0], math.log(0.004), top[0], top[0]], top,
                    "finished"))  # wrong: one slip of p 0.004
    log.append(make(2, 1, "1+1", [7, 8], [math.log(0.002), top[0]], top[:2], "absorbed"))  # stopped: tokens only
    log.append(make(3, 1, "1+1=5.", [7, 8, 9, eos], top, top, "finished"))  # wrong without a slip
    log.close()
    (w,) = slip_windows(scored_rollouts(tmp_path), 10)
    assert w["rollouts"] == 3 and (w["right"], w["wrong"]) == (1, 2)
    assert w["off_top1_per_token"] == pytest.approx(2 / 14)
    assert w["p_off_top1_mean"] == pytest.approx(0.003, rel=1e-3)
    assert w["right_with_slip"] == 0.0 and w["wrong_with_slip"] == 0.5
