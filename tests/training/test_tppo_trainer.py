"""T-PPO window mode on the real trainer (tiny model, DeepSpeed): the policy step trains the
policy on segments and leaves the critic alone; the critic learns Monte-Carlo returns of
complete responses in its own update."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from espo_async.config import parse_config
from espo_async.training.tppo import train_critic_mc
from espo_async.training.trainer import PPOTrainer, TrainSample

pytest.importorskip("deepspeed")


def sample(rng, ending, reward=0.0, prompt_len=6, n=12):
    return TrainSample(
        prompt_ids=rng.integers(4, 60, size=prompt_len).astype(np.int32),
        response_ids=rng.integers(4, 60, size=n).astype(np.int32),
        behaviour_logprobs=rng.uniform(-5, -3, size=n).astype(np.float32),
        versions=np.zeros(n, np.int32),
        ending=ending,
        task_reward=reward,
        group_id="g0",
    )


def test_window_mode_policy_step_and_monte_carlo_critic(tiny_dir, tmp_path):
    cfg = parse_config({"algo": {"lr": 1e-3, "critic_lr": 3e-3, "minibatches": 1},
                        "rollout": {"max_tokens": 48, "window_tokens": 8}})
    tr = PPOTrainer(cfg, str(tiny_dir), str(tiny_dir), critic_from_policy=True, work_dir=tmp_path / "t")
    rng = np.random.default_rng(0)
    # a step's rows: segments (prefix = prompt + earlier tokens) and last rows of rollouts
    rows = [sample(rng, "incomplete", prompt_len=6 + 8 * k, n=8) for k in range(3)]
    rows += [sample(rng, "finished", 1.0, prompt_len=14, n=5), sample(rng, "absorbed", 0.0, prompt_len=22, n=3)]
    critic0 = {k: v.clone() for k, v in tr.critic.state_dict().items()}
    policy0 = {k: v.clone() for k, v in tr.policy.lm.state_dict().items()}
    m = tr.train_step(rows, step=1, learner_version=0)
    assert m["n_samples"] == 5 and np.isfinite(m["policy_loss"]) and np.isnan(m["critic_loss"])
    assert all(torch.equal(critic0[k], v) for k, v in tr.critic.state_dict().items()), "the policy step moved the critic"
    assert any(not torch.equal(policy0[k], v) for k, v in tr.policy.lm.state_dict().items())

    # complete responses: half finished with reward 1, half stopped (absorbed, r_fail = -1)
    full = [sample(rng, "finished", 1.0, n=20) for _ in range(3)] + [sample(rng, "absorbed", 0.0, n=20) for _ in range(3)]
    losses = [train_critic_mc(tr, full)["critic_loss"] for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    out = train_critic_mc(tr, full)
    assert out["critic_rollouts"] == 6 and out["critic_tokens"] == 120 and out["critic_return_mean"] == 0.0
    assert any(not torch.equal(critic0[k], v) for k, v in tr.critic.state_dict().items())
    assert train_critic_mc(tr, []) == {"critic_rollouts": 0.0}
