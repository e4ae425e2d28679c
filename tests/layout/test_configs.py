"""Every shipped configuration loads, and the main job's is a real ESPO run."""

from pathlib import Path

import pytest

from espo_async.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_in_configs_loads(path):
    load_config(path)


def test_the_main_job_is_real_espo_with_a_start_model_to_improve():
    cfg = load_config(next(p for p in CONFIGS if p.name == "default.yaml"))
    assert cfg.stop.policy == "espo"
    assert cfg.actors.sampler.cls == "actors.samplers.vllm:VLLMSampler"
    assert cfg.model.sft_steps > 0 and cfg.task.eval_problems * cfg.task.eval_samples >= 512
