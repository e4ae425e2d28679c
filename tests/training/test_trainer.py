"""PPOTrainer on the tiny model: updates, algorithm options, weights export, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from espo_async.config import parse_config
from espo_async.training.trainer import PPOTrainer, TrainSample
from tests.numerics import assert_reordered_close, reorder_tol

pytest.importorskip("deepspeed")


def make_cfg(**algo):
    base = {"lr": 1e-3, "critic_lr": 1e-3}
    base.update(algo)
    return parse_config({"algo": base, "rollout": {"max_tokens": 48}})


def make_trainer(tiny_dir, tmp_path, name="t", **kw):
    algo = {k: v for k, v in kw.items() if k != "micro_batch_tokens"}
    return PPOTrainer(make_cfg(**algo), str(tiny_dir), str(tiny_dir), critic_from_policy=True,
                      work_dir=tmp_path / name, micro_batch_tokens=kw.get("micro_batch_tokens"))


def make_batch(seed=0, n_groups=4, per_group=4, max_prompt=12, max_resp=40, endings=None, rewards=None):
    rng = np.random.default_rng(seed)
    out = []
    kinds = endings or ["finished", "absorbed", "truncated", "finished"]
    for g in range(n_groups):
        prompt = rng.integers(4, 60, size=int(rng.integers(2, max_prompt + 1))).astype(np.int32)
        for j in range(per_group):
            i = g * per_group + j
            t = int(rng.integers(3, max_resp + 1))
            out.append(TrainSample(
                prompt_ids=prompt,
                response_ids=rng.integers(4, 60, size=t).astype(np.int32),
                behaviour_logprobs=rng.uniform(-5, -3, size=t).astype(np.float32),
                versions=np.full(t, max(0, i % 3 - 1), np.int32),
                ending=kinds[i % len(kinds)],
                task_reward=float(rewards[i]) if rewards is not None else float(j % 2),
                group_id=f"g{g}",
            ))
    return out


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def seq_logprob(trainer, s):
    from espo_async.training.batch import pack_responses

    out = trainer._rollout_pass([s], pack_responses([s]))
    return float(out["logp"].sum()), out["values"][0, : len(s.response_ids)]


# -------------------------------------------------------------------------------------- basics
def test_train_step_finite_and_updates_both_models(tiny_dir, tmp_path):
    tr = make_trainer(tiny_dir, tmp_path, epochs=2, minibatches=2, micro_batch_tokens=256)
    batch = make_batch()
    p0, c0 = params(tr.policy.lm), params(tr.critic)
    m = tr.train_step(batch, step=1, learner_version=2)
    for key in ("policy_loss", "value_loss", "critic_loss", "kl", "entropy", "clipfrac", "adv_mean", "adv_std",
                "value_mean", "return_mean", "grad_norm", "critic_grad_norm", "n_samples", "n_tokens",
                "groups_dropped", "staleness_mean", "staleness_max", "is_weight_mean", "step_seconds"):
        assert key in m, key
        assert np.isfinite(m[key]), (key, m[key])
    assert m["n_samples"] == 16 and m["n_tokens"] == sum(len(s.response_ids) for s in batch)
    assert m["staleness_max"] == 2 and 0 < m["staleness_mean"] <= 2
    assert 0 < m["is_weight_mean"] <= 2.0  # capped at behaviour_is_cap
    assert m["grad_norm"] > 0 and m["critic_grad_norm"] > 0
    assert changed(p0, tr.policy.lm) and changed(c0, tr.critic)
    # a response of length 0 is skipped, not an error
    empty = TrainSample(np.array([5], np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32),
                        np.zeros(0, np.int32), "truncated", 0.0, "g9")
    m = tr.train_step(batch[:4] + [empty], step=2, learner_version=2)
    assert m["n_skipped"] == 1 and m["n_samples"] == 4


def test_sign_rewarded_response_gains_and_critic_tracks_returns(tiny_dir, tmp_path):
    # gamma = lam = 1: the returns are the Monte-Carlo outcome, whatever the critic says
    tr = make_trainer(tiny_dir, tmp_path, lam=1.0, behaviour_is_cap=None, value_clip=None)
    rewards = [0.0] * 8
    rewards[3] = 1.0
    batch = make_batch(seed=1, n_groups=2, endings=["finished"], rewards=rewards)
    good, bad = batch[3], batch[4]
    lp0, v0 = seq_logprob(tr, good)
    lpb0, _ = seq_logprob(tr, bad)
    err0 = float(((v0 - 1.0) ** 2).mean())
    for step in range(1, 7):
        tr.train_step(batch, step=step, learner_version=step - 1)
    lp1, v1 = seq_logprob(tr, good)
    lpb1, _ = seq_logprob(tr, bad)
    assert lp1 > lp0 + 1.0, (lp0, lp1)
    assert lp1 - lp0 > lpb1 - lpb0
    assert float(((v1 - 1.0) ** 2).mean()) < err0


# ----------------------------------------------------------------------------- algorithm options
def test_grpo_dapo_dynamic_sampling(tiny_dir, tmp_path):
    tr = make_trainer(tiny_dir, tmp_path, advantage="grpo", dynamic_sampling=True, overlong_buffer=8,
                      clip_high=0.28, loss_agg="token")
    rewards = [1.0] * 4 + [0.0, 1.0, 0.0, 1.0] + [0.0] * 4 + [1.0, 0.0, 0.0, 0.0]
    batch = make_batch(seed=2, endings=["finished"], rewards=rewards)
    m = tr.train_step(batch, step=1, learner_version=0)
    assert m["groups_dropped"] == 2 and m["samples_dropped"] == 8 and m["n_samples"] == 8
    assert np.isfinite(m["policy_loss"]) and np.isfinite(m["grad_norm"])
    # every group uniform: nothing to train on, reported as such
    m = tr.train_step(make_batch(seed=3, endings=["finished"], rewards=[1.0] * 16), step=2, learner_version=1)
    assert m["n_samples"] == 0 and m["groups_dropped"] == 4


def test_entropy_is_loss_with_kl_and_entropy_bonus(tiny_dir, tmp_path):
    tr = make_trainer(tiny_dir, tmp_path, policy_loss="entropy_is", kl_coef=0.05, entropy_coef=0.01,
                      epochs=2, advantage="grpo")
    p0 = params(tr.policy.lm)
    batch = make_batch(seed=4)
    m = tr.train_step(batch, step=1, learner_version=0)
    assert np.isfinite(m["policy_loss"]) and np.isfinite(m["kl"]) and m["kl"] >= 0
    assert changed(p0, tr.policy.lm)
    ref = tr.ref.lm.state_dict()
    assert all(torch.equal(p0[k], ref[k]) for k in p0)  # the reference stays frozen


def _capture_grads(trainer):
    """Record each optimiser step's accumulated gradients (Adam would hide small differences)."""
    grads: list[dict[str, torch.Tensor]] = []
    orig = trainer._step

    def step(eng):
        grads.append({n: p.grad.detach().clone() for n, p in eng.module.named_parameters() if p.grad is not None})
        return orig(eng)

    trainer._step = step
    return grads


def test_micro_batching_equals_one_big_batch(tiny_dir, tmp_path):
    """Gradient accumulation over micro-batches gives the one-batch gradient. The two sum the
    same per-token terms in another order (and through other oneDNN kernel shapes), so they agree
    to float32 reordering error, not bit for bit: the tolerance is derived from the number of
    summed terms (tests/numerics.py), not from one CPU's output. A micro-batch weighted by the
    wrong share moves entries by a fraction of their scale and fails it by orders of magnitude."""
    kw = dict(loss_agg="seq", kl_coef=0.1, entropy_coef=0.01, minibatches=2)
    big = make_trainer(tiny_dir, tmp_path, "big", micro_batch_tokens=10**6, **kw)
    small = make_trainer(tiny_dir, tmp_path, "small", micro_batch_tokens=64, **kw)
    gb, gs = _capture_grads(big), _capture_grads(small)
    batch = make_batch(seed=5)
    mb = big.train_step(batch, step=1, learner_version=0)
    ms = small.train_step(batch, step=1, learner_version=0)
    # every gradient entry and loss is a sum over (at most) all the batch's positions
    n = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)
    # whitened advantages, ratio 1 and returns in [-1, 1]: the loss terms are O(1)
    for key in ("policy_loss", "critic_loss"):
        assert abs(ms[key] - mb[key]) <= reorder_tol(n, 1.0), key
    assert abs(ms["grad_norm"] - mb["grad_norm"]) <= reorder_tol(n, mb["grad_norm"])
    assert len(gb) == len(gs) == 4  # 2 minibatches x (policy, critic)
    for a, b in zip(gb, gs):
        assert a.keys() == b.keys()
        for k in a:
            assert_reordered_close(a[k], b[k], n_terms=n, what=k)


# ------------------------------------------------------------------------------ weights, resume
def test_saved_weights_reload_with_identical_outputs(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from espo_async.models.value_model import ValueModel, load_value_weights

    tr = make_trainer(tiny_dir, tmp_path)
    tr.train_step(make_batch(seed=6), step=1, learner_version=0)
    x = torch.randint(4, 60, (2, 17))

    sha, nbytes = tr.save_policy_weights(tmp_path / "w" / "policy.safetensors")
    assert len(sha) == 64 and nbytes == (tmp_path / "w" / "policy.safetensors").stat().st_size
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "w" / "policy.safetensors")), strict=True)
    with torch.no_grad():
        expected = tr.policy.lm(x).logits
        assert torch.equal(fresh(x).logits, expected)

    tr.export_hf(tmp_path / "final")
    tr.export_hf(tmp_path / "final")  # overwriting is an atomic swap
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".final")]

    tr.save_critic_weights(tmp_path / "w" / "critic.safetensors")
    vm = ValueModel.from_pretrained(str(tiny_dir), seed=123).eval()
    load_value_weights(vm, tmp_path / "w" / "critic.safetensors")
    with torch.no_grad():
        assert torch.equal(vm(x, torch.ones_like(x)), tr.critic(x, torch.ones_like(x)))

    # what the collective weight transfer broadcasts: the file's tensors, copied out of the model
    tensors, saved = tr.policy_tensors(), load_file(str(tmp_path / "w" / "policy.safetensors"))
    assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], saved[k]) for k in saved)
    live = tr.policy.lm.state_dict()
    assert all(tensors[k].data_ptr() != live[k].data_ptr() for k in tensors)


def test_checkpoint_resume_matches_uninterrupted(tiny_dir, tmp_path):
    kw = dict(epochs=2, minibatches=2, kl_coef=0.05)
    b1, b2 = make_batch(seed=7), make_batch(seed=8)
    a = make_trainer(tiny_dir, tmp_path, "a", **kw)
    a.train_step(b1, step=1, learner_version=0)
    a.save_checkpoint(tmp_path / "ckpt")
    a.save_checkpoint(tmp_path / "ckpt")  # a second save replaces the first atomically
    a.train_step(b2, step=2, learner_version=1)

    c = make_trainer(tiny_dir, tmp_path, "c", **kw)
    c.load_checkpoint(tmp_path / "ckpt")
    assert c.global_step == 1
    c.train_step(b2, step=2, learner_version=1)
    for x, y in ((a.policy.lm, c.policy.lm), (a.critic, c.critic)):
        sx, sy = x.state_dict(), y.state_dict()
        for k in sx:
            assert torch.allclose(sx[k], sy[k], atol=1e-6, rtol=0), k
    # the optimiser state came back too (not only the weights)
    sa = a.policy_engine.optimizer.state_dict()["state"]
    sc = c.policy_engine.optimizer.state_dict()["state"]
    assert sa.keys() == sc.keys()
    assert torch.allclose(sa[0]["exp_avg_sq"], sc[0]["exp_avg_sq"], atol=1e-9)


def test_zero2_bf16_separate_critic_backbone(tiny_dir, tmp_path):
    """ZeRO stage 2, bf16 weights, and a critic loaded from another checkpoint (new head)."""
    from espo_async.models.tiny import build_tiny_model

    critic_dir = build_tiny_model(None, seed=1)
    cfg = parse_config({"algo": {"lr": 1e-3, "critic_lr": 1e-3}, "model": {"dtype": "bfloat16"},
                        "deepspeed": {"zero_stage": 2}})
    tr = PPOTrainer(cfg, str(tiny_dir), str(critic_dir), critic_from_policy=False, work_dir=tmp_path / "z2")
    assert next(tr.policy.lm.parameters()).dtype == torch.bfloat16
    c0 = params(tr.critic)
    m = tr.train_step(make_batch(seed=9), step=1, learner_version=0)
    assert np.isfinite(m["policy_loss"]) and np.isfinite(m["critic_loss"]) and np.isfinite(m["grad_norm"])
    assert changed(c0, tr.critic)
    tr.export_hf(tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).config.vocab_size == tr.vocab_size


def test_lr_warmup_rises_linearly_and_resumes(tiny_dir, tmp_path):
    """algo.lr_warmup_steps = 4: optimiser step k (from 0) runs at lr * (k + 1) / 4, then lr; the
    schedule's position survives a checkpoint (a resumed run does not warm up again)."""
    lr = 1e-3

    def current(tr):
        return tr.policy_engine.optimizer.param_groups[0]["lr"]

    a = make_trainer(tiny_dir, tmp_path, "a", lr=lr, lr_warmup_steps=4, minibatches=2)
    assert current(a) == pytest.approx(lr / 4)
    a.train_step(make_batch(seed=10), step=1, learner_version=0)  # two optimiser steps
    assert current(a) == pytest.approx(lr * 3 / 4)
    a.save_checkpoint(tmp_path / "ckpt")
    b = make_trainer(tiny_dir, tmp_path, "b", lr=lr, lr_warmup_steps=4, minibatches=2)
    b.load_checkpoint(tmp_path / "ckpt")
    assert current(b) == pytest.approx(lr * 3 / 4)
    b.train_step(make_batch(seed=11), step=2, learner_version=1)
    assert current(b) == pytest.approx(lr)
    plain = make_trainer(tiny_dir, tmp_path, "c", lr=lr)
    assert current(plain) == pytest.approx(lr)


def test_critic_warmup_trains_only_the_critic(tiny_dir, tmp_path):
    """algo.critic_warmup_steps = 1: step 1 leaves the policy untouched and trains the critic;
    step 2 trains both."""
    tr = make_trainer(tiny_dir, tmp_path, lr=1e-3, critic_warmup_steps=1)
    p0, c0 = params(tr.policy.lm), params(tr.critic)
    m1 = tr.train_step(make_batch(seed=12), step=1, learner_version=0)
    assert not changed(p0, tr.policy.lm) and changed(c0, tr.critic)
    assert np.isnan(m1["policy_loss"]) and np.isfinite(m1["critic_loss"])
    tr.train_step(make_batch(seed=13), step=2, learner_version=0)
    assert changed(p0, tr.policy.lm)


def test_adam_eps_reaches_the_optimisers(tiny_dir, tmp_path):
    tr = make_trainer(tiny_dir, tmp_path, adam_eps=1e-3)
    assert tr.policy_engine.optimizer.param_groups[0]["eps"] == 1e-3
    assert tr.critic_engine.optimizer.param_groups[0]["eps"] == 1e-3
