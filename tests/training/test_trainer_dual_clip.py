"""algo.clip_ratio_c reaches the policy loss of the trainer (off by default)."""

from __future__ import annotations

import math

import pytest

import espo_async.training.trainer as trainer_module
from tests.training.test_trainer import make_batch, make_trainer

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_clip_ratio_c_is_passed_to_the_policy_loss(tiny_dir, tmp_path, monkeypatch, clip_ratio_c):
    seen = []
    real = trainer_module.ppo_policy_loss

    def spy(*args, **kw):
        seen.append(kw.get("clip_ratio_c", "absent"))
        return real(*args, **kw)

    monkeypatch.setattr(trainer_module, "ppo_policy_loss", spy)
    tr = make_trainer(tiny_dir, tmp_path, clip_ratio_c=clip_ratio_c)
    out = tr.train_step(make_batch(seed=3), step=1, learner_version=0)
    assert seen and set(seen) == {clip_ratio_c}
    assert math.isfinite(out["policy_loss"])
