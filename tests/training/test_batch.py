"""Packing, value positions and the advantage computation of the trainer (no DeepSpeed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from espo_async.config import AlgoConfig
from espo_async.core.losses import entropy_groups
from espo_async.training.batch import (
    TrainSample,
    compute_advantages,
    filter_samples,
    loss_units,
    pack_inputs,
    pack_responses,
    plan_micro_batches,
)


def sample(p, r, ending="finished", reward=0.0, group="g", versions=None, blp=None):
    r = np.asarray(r, np.int32)
    return TrainSample(
        prompt_ids=np.asarray(p, np.int32),
        response_ids=r,
        behaviour_logprobs=np.full(len(r), -1.0, np.float32) if blp is None else np.asarray(blp, np.float32),
        versions=np.zeros(len(r), np.int32) if versions is None else np.asarray(versions, np.int32),
        ending=ending,
        task_reward=reward,
        group_id=group,
    )


# ------------------------------------------------------------------------------------ packing
def test_pack_inputs_layout():
    s = [sample([5, 6, 7], [8, 9]), sample([10], [11, 12, 13, 14])]
    ids, att, pos, p, t = pack_inputs(s, pad_id=0)
    assert (p, t) == (3, 4)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0, 0], [0, 0, 10, 11, 12, 13, 14]]
    assert att.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert pos[1, 2:].tolist() == [0, 1, 2, 3, 4]
    assert pos[0, :5].tolist() == [0, 1, 2, 3, 4]
    # every prompt ends at column P-1; response token t sits at column P + t
    assert ids[:, p].tolist() == [8, 11]


def test_pack_responses_pads_and_repairs_lengths():
    s = [sample([1], [4, 5, 6], blp=[-1, -2]), sample([1], [7], versions=[3])]
    rb = pack_responses(s, default_version=9)
    assert rb.mask.tolist() == [[True, True, True], [True, False, False]]
    assert rb.lengths.tolist() == [3, 1]
    assert torch.isnan(rb.behaviour_logprobs[0, 2])  # missing logprob -> NaN (weight 1 later)
    assert rb.versions[1, 0] == 3
    assert rb.n_tokens == 4


def test_plan_micro_batches_covers_rows_within_budget():
    rng = np.random.default_rng(0)
    pl = rng.integers(1, 20, size=30)
    ln = rng.integers(1, 50, size=30)
    plan = plan_micro_batches(range(30), pl, ln, max_tokens=200)
    assert sorted(r for mb in plan for r in mb) == list(range(30))
    for mb in plan:
        cost = len(mb) * (max(pl[r] for r in mb) + max(ln[r] for r in mb))
        assert cost <= 200 or len(mb) == 1


def test_loss_units_entropy_is_matches_groups():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    high = entropy_groups(torch.rand(3, 6), mask, 0.2)
    expected = int((high.sum(-1) > 0).sum() + ((mask & ~high).sum(-1) > 0).sum())
    assert loss_units(mask, "entropy_is", top_frac=0.2) == expected == 3
    assert loss_units(mask, "token") == 6
    assert loss_units(mask, "seq") == 2


# ------------------------------------------------------------------------------------ filters
def test_filter_skips_empty_and_drops_uniform_groups():
    s = [
        sample([1], [4, 5], reward=1.0, group="a"), sample([1], [4], reward=1.0, group="a"),  # uniform
        sample([1], [4, 5], reward=1.0, group="b"), sample([1], [6], reward=0.0, group="b"),
        sample([1], [], ending="truncated", group="b"),  # empty: skipped
        # an absorbed sample counts as r_fail: group c is not uniform
        sample([1], [4], reward=0.0, group="c"), sample([1], [4], ending="absorbed", group="c"),
    ]
    kept, n_empty, groups_dropped, samples_dropped = filter_samples(s, r_fail=-1.0, dynamic_sampling=True)
    assert n_empty == 1 and groups_dropped == 1 and samples_dropped == 2
    assert [x.group_id for x in kept] == ["b", "b", "c", "c"]
    kept, n_empty, groups_dropped, _ = filter_samples(s, r_fail=-1.0, dynamic_sampling=False)
    assert len(kept) == 6 and groups_dropped == 0


# ---------------------------------------------------------------------------------- advantages
def _batch(endings, lengths, rewards, T=4):
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    values = torch.full((len(lengths), T), 0.5) * mask
    boot = torch.full((len(lengths),), 0.7)
    return mask, values, boot, list(endings), torch.tensor(rewards, dtype=torch.float64)


def test_absorbed_gets_r_fail_and_no_bootstrap():
    mask, values, boot, endings, task = _batch(["absorbed", "finished", "truncated", "incomplete"],
                                               [3, 4, 4, 2], [1.0, 1.0, 1.0, 1.0])
    algo = AlgoConfig(gamma=1.0, lam=1.0, whiten_advantages=False, truncation="bootstrap")
    a = compute_advantages(values, boot, mask, endings, task, ["g"] * 4, algo=algo, r_fail=-1.0, max_tokens=4)
    # absorbed: r_fail on the stop token (index l-1 = 2), nothing bootstrapped after it
    assert a.rewards[0].tolist() == [0.0, 0.0, -1.0, 0.0]
    assert a.last_values[0] == 0.0
    assert a.returns[0, :3].tolist() == pytest.approx([-1.0, -1.0, -1.0])  # gamma = lam = 1: MC return
    assert a.advantages[0, 2] == pytest.approx(-1.0 - 0.5)  # one big negative TD error at the stop
    # finished: task reward, no bootstrap; truncated (bootstrap mode): 0 reward + V(s_T)
    assert a.rewards[1, 3] == 1.0 and a.last_values[1] == 0.0
    assert a.rewards[2].abs().sum() == 0.0 and a.last_values[2] == pytest.approx(0.7)
    assert a.returns[2, 0] == pytest.approx(0.7)
    # incomplete (T-PPO): V(s_l) := V(s_{l-1}); not in the critic's loss
    assert a.last_values[3] == pytest.approx(0.5)
    assert not a.critic_mask[3].any() and a.policy_mask[3, :2].all()
    assert a.returns[~mask].abs().sum() == 0.0


def test_truncated_terminal_mode_and_whitening():
    mask, values, boot, endings, task = _batch(["truncated", "finished"], [4, 2], [0.25, 1.0])
    algo = AlgoConfig(truncation="terminal", whiten_advantages=True)
    a = compute_advantages(values, boot, mask, endings, task, ["g", "g"], algo=algo, r_fail=-1.0, max_tokens=8)
    assert a.rewards[0, 3] == pytest.approx(0.25) and a.last_values[0] == 0.0
    w = a.advantages[mask]
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(w.std()) == pytest.approx(1.0, abs=1e-3)
    # returns use the raw (unwhitened) advantages
    assert torch.allclose(a.returns, (a.raw_advantages + values) * mask, atol=1e-6)


def test_grpo_absorbed_counts_as_r_fail_and_broadcasts():
    mask, values, boot, endings, task = _batch(["finished", "finished", "absorbed", "incomplete"],
                                               [2, 3, 1, 2], [1.0, 0.0, 1.0, 1.0])
    algo = AlgoConfig(advantage="grpo")
    a = compute_advantages(values, boot, mask, endings, task, ["g"] * 4, algo=algo, r_fail=-1.0, max_tokens=8)
    assert a.outcome[:3].tolist() == [1.0, 0.0, -1.0] and torch.isnan(a.outcome[3])
    r = torch.tensor([1.0, 0.0, -1.0])
    expected = (r - r.mean()) / (r.std() + 1e-6)
    for i in range(3):
        assert torch.allclose(a.advantages[i][mask[i]], expected[i].expand(int(mask[i].sum())), atol=1e-5)
    assert not a.policy_mask[3].any()  # no outcome yet: not in the policy loss
    assert a.advantages[~a.policy_mask].abs().sum() == 0.0


def test_overlong_shaping_on_last_token():
    mask, values, boot, endings, task = _batch(["finished", "finished", "absorbed"], [2, 4, 4], [1.0, 1.0, 0.0])
    algo = AlgoConfig(overlong_buffer=2, overlong_penalty=0.5, whiten_advantages=False)
    a = compute_advantages(values, boot, mask, endings, task, ["g"] * 3, algo=algo, r_fail=-1.0, max_tokens=4)
    assert a.rewards[0, 1] == pytest.approx(1.0)  # l = 2 <= 4 - 2: no penalty
    assert a.rewards[1, 3] == pytest.approx(1.0 - 0.5)  # l = L_max: full penalty
    assert a.rewards[2, 3] == pytest.approx(-1.0)  # absorbed: r_fail only


# ------------------------------------------------------------------------ model positions
def test_value_and_logprob_positions_match_unpadded_prefixes(tiny_dir):
    """V(s_t) from the packed (left-padded) batch equals the value of the prefix prompt +
    response[:t] run alone; the policy's logprob of token t equals log_softmax of the unpadded
    model's logits at the previous position."""
    from transformers import AutoModelForCausalLM

    from espo_async.training.trainer import PolicyLogprobs
    from espo_async.training.value_model import ValueModel

    torch.manual_seed(0)
    vm = ValueModel.from_pretrained(tiny_dir, seed=1).eval()
    with torch.no_grad():
        vm.head.weight.normal_()  # make values informative
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    pol = PolicyLogprobs(lm)
    s = [sample([5, 6, 7, 8], [9, 10, 11]), sample([12], [13, 14, 15, 16, 17])]
    ids, att, pos, p, t = pack_inputs(s)
    with torch.no_grad():
        v = vm(ids, att, pos)[:, p - 1:]  # [B, T+1]: V(s_0) .. V(s_T)
        v_nopos = vm(ids, att)[:, p - 1:]  # position ids derived from the mask
        resp = pack_responses(s).response_ids
        logp, ent = pol(ids, att, pos, resp, True)
        for b, x in enumerate(s):
            full = torch.tensor(np.concatenate([x.prompt_ids, x.response_ids]), dtype=torch.long)[None]
            n = len(x.response_ids)
            for tt in range(n + 1):
                prefix = full[:, : len(x.prompt_ids) + tt]
                ref = vm(prefix, torch.ones_like(prefix))[0, -1]
                assert v[b, tt] == pytest.approx(float(ref), abs=1e-5)
                assert v_nopos[b, tt] == pytest.approx(float(ref), abs=1e-5)
            lref = torch.log_softmax(lm(full).logits[0].float(), -1)
            pl = len(x.prompt_ids)
            expected = lref[pl - 1: pl - 1 + n].gather(-1, full[0, pl:, None])[:, 0]
            assert torch.allclose(logp[b, :n], expected, atol=1e-5)
        assert torch.isfinite(ent).all()
