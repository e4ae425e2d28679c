"""The supervised warm-up's loss and cache key (espo_async/models/sft.py)."""

import math
from pathlib import Path

import torch

from espo_async.config import load_config
from espo_async.models import sft

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def test_sft_loss_without_smoothing_is_the_shifted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 1, 0], [-100, 2, 2, -100, -100]])
    scored = [(b, t) for b in range(2) for t in range(1, 5) if labels[b, t] != -100]
    want = -sum(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b, t in scored) / len(scored)
    assert math.isclose(float(sft.sft_loss(logits, labels)), float(want), rel_tol=1e-5)


def test_label_smoothing_moves_the_optimum_off_certainty():
    """A nearly certain correct prediction costs almost nothing unsmoothed, and more with s > 0:
    smoothing's optimum leaves s of the mass on the other tokens (what makes sampling slip)."""
    logits = torch.zeros(1, 2, 10)
    logits[0, 0, 4] = 30.0
    labels = torch.tensor([[-100, 4]])
    assert float(sft.sft_loss(logits, labels)) < 1e-6
    assert float(sft.sft_loss(logits, labels, 0.05)) > 1.0
    # at the smoothed optimum the target has 1 - s + s/V of the mass
    s, v = 0.05, 10
    opt = torch.full((1, 2, v), math.log(s / v))
    opt[0, 0, 4] = math.log(1 - s + s / v)
    worse = opt.clone()
    worse[0, 0, 4] += 1.0
    assert float(sft.sft_loss(opt, labels, s)) < float(sft.sft_loss(worse, labels, s))


def test_cache_key_keeps_old_warm_ups_and_separates_smoothed_ones(tmp_path):
    plain = sft._key(tmp_path, load_config(DEFAULT, overrides=["model.sft_label_smoothing=0"]))
    assert "label_smoothing" not in plain  # warm-ups cached before the option keep their key
    smoothed = sft._key(tmp_path, load_config(DEFAULT, overrides=["model.sft_label_smoothing=0.02"]))
    assert smoothed["label_smoothing"] == 0.02 and {k: v for k, v in smoothed.items() if k != "label_smoothing"} == plain


def test_model_seed_keeps_one_start_model_while_the_run_seed_varies(tmp_path):
    from espo_async.config import parse_config
    from espo_async.models.sft import _key
    from espo_async.models.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "m", "0123456789+-*=;A.", seed=0)
    same = parse_config({"run": {"seed": 3}, "model": {"seed": 0, "sft_steps": 10}})
    seed0 = parse_config({"run": {"seed": 0}, "model": {"sft_steps": 10}})
    seed3 = parse_config({"run": {"seed": 3}, "model": {"sft_steps": 10}})
    assert same.model_seed == 0 and seed3.model_seed == 3  # model.seed unset: the run's seed
    assert _key(base, same) == _key(base, seed0)  # the cached warm-up of seed 0 is reused
    assert _key(base, seed3) != _key(base, seed0)


def test_warm_up_threads_are_capped_at_the_cpus_this_process_may_use():
    import os

    allowed = len(os.sched_getaffinity(0))
    assert sft.warm_up_threads(1) == 1
    assert sft.warm_up_threads(10_000) == allowed
    assert load_config(DEFAULT).model.sft_threads >= 1
