"""RL must make the model better: the learning check in CI.

configs/learning-check.yaml runs the real system (vLLM sampler, coordinator, DeepSpeed learner)
for 40 GRPO steps on a task with a strong learnable signal (1-step addition, a warm-up with label
smoothing that leaves sampled answers slipping where greedy ones are right). Its training reward
rose by 0.19 to 0.21 between the first and the last 10 steps on seeds 0, 1 and 2; each window
averages 640 rollouts (standard error ~0.02), so a rise below 0.08 means learning broke. A
learning assertion, not a timing one."""

from __future__ import annotations

from pathlib import Path

import pytest

from espo_async.config import load_config
from espo_async.runtime.metrics import read_metrics
from tests.runtime.system import run_system

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "learning-check.yaml"
WINDOW = 10
MIN_RISE = 0.08


async def test_grpo_raises_the_training_reward(tmp_path):
    cfg = load_config(CONFIG, ["transport.heartbeat_timeout_s=180", "transport.startup_timeout_s=300",
                               "run.tensorboard=false"])
    result = await run_system(cfg, tmp_path, timeout=900)
    assert result.exit_code == 0, result.reason
    rewards = [row["reward"] for row in read_metrics(tmp_path) if "reward" in row]
    assert len(rewards) == cfg.run.total_steps
    first = sum(rewards[:WINDOW]) / WINDOW
    last = sum(rewards[-WINDOW:]) / WINDOW
    assert last - first >= MIN_RISE, (
        f"training reward {first:.3f} over the first {WINDOW} steps, {last:.3f} over the last {WINDOW}: "
        f"rose {last - first:+.3f}, below {MIN_RISE}; per step: {[round(r, 3) for r in rewards]}")
