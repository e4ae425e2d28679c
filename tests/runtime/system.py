"""Helpers to run the whole actor system in-process (supervisor) and read what it produced."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from espo_async.assets import prepare_assets
from espo_async.config import Config, merge_config, parse_config
from espo_async.runtime.supervisor import RunResult, Supervisor
from espo_async.runtime.trajectory_log import replay

FAKE = {
    "run": {"name": "test", "total_steps": 3, "tensorboard": False, "progress": False},
    "model": {"policy": "tiny"},
    "task": {"name": "arithmetic", "options": {"n_steps": 3}},
    "rollout": {"samples_per_prompt": 4, "prompts_per_batch": 2, "max_tokens": 48, "staleness": 1},
    "stop": {"policy": "espo", "warmup": {"enabled": False}},
    "algo": {"lr": 1e-4, "critic_lr": 1e-3},
    "actors": {
        "sampler": {
            "class": "actors.samplers.fake:FakeSampler",
            "count": 2,
            "options": {"max_concurrency": 3, "tokens_per_s": 300, "p_bad": 0.5},
        },
        "critic": {"class": "actors.critics.fake:FakeCritic", "options": {"value": 0.1}},
    },
    "transport": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 120, "startup_timeout_s": 400},
}


def fake_config(**sections) -> Config:
    return parse_config(merge_config(FAKE, sections))


async def run_system(cfg: Config, run_dir: Path, timeout: float = 600.0) -> RunResult:
    await asyncio.to_thread(prepare_assets, cfg, run_dir, log=lambda *_: None)
    sup = Supervisor(cfg, run_dir, progress=False)
    return await asyncio.wait_for(sup.run(), timeout)


def received(run_dir: Path) -> list:
    """Every trajectory the learner received (its write-ahead log), in arrival order."""
    return list(replay(Path(run_dir) / "learner" / "trajectories.log"))


def learner_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "checkpoint" / "learner_state.json").read_text())
