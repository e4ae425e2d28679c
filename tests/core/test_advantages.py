import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_async.core.advantages import (
    Ending,
    dynamic_sampling_mask,
    gae,
    gae_batched,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    overlong_penalty,
    shape_rewards,
)

GL = [(1.0, 1.0), (0.99, 0.95), (1.0, 0.95), (0.9, 0.0), (0.5, 1.0)]


def textbook_gae(r, v, gamma, lam, last):
    n = len(r)
    adv = [0.0] * n
    a_next = 0.0
    for t in reversed(range(n)):
        v_next = last if t == n - 1 else v[t + 1]
        delta = r[t] + gamma * v_next - v[t]
        a_next = delta + gamma * lam * a_next
        adv[t] = a_next
    return adv


def test_gae_hand_computed():
    r = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    v = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)
    # gamma = lam = 1: A_t = sum of rewards from t - V_t
    adv, ret = gae(r, v, gamma=1.0, lam=1.0)
    assert adv.tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert ret.tolist() == pytest.approx([1.0, 1.0, 1.0])
    # lam = 0: one-step TD errors with bootstrap 2.0
    adv, _ = gae(r, v, gamma=0.5, lam=0.0, last_value=2.0)
    assert adv.tolist() == pytest.approx([0.5 * 0.6 - 0.5, 0.5 * 0.7 - 0.6, 1.0 + 0.5 * 2.0 - 0.7])


@pytest.mark.parametrize("gamma,lam", GL)
def test_gae_equals_textbook(gamma, lam):
    gen = torch.Generator().manual_seed(7)
    for n in (1, 2, 5, 64, 300):
        r = torch.randn(n, generator=gen, dtype=torch.float64)
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        last = float(torch.randn(1, generator=gen))
        adv, ret = gae(r, v, gamma=gamma, lam=lam, last_value=last)
        ref = torch.tensor(textbook_gae(r.tolist(), v.tolist(), gamma, lam, last), dtype=torch.float64)
        assert torch.allclose(adv, ref, atol=1e-9)
        assert torch.allclose(ret, ref + v, atol=1e-9)


@pytest.mark.parametrize("gamma,lam", GL)
def test_gae_batched_equals_per_row(gamma, lam):
    gen = torch.Generator().manual_seed(3)
    B, T = 7, 50
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([0, 1, 2, 17, 49, 50, 33])
    mask = torch.arange(T)[None] < lengths[:, None]
    r[~mask] = float("nan")  # padding garbage must not leak
    v[~mask] = float("inf")
    last = torch.randn(B, generator=gen, dtype=torch.float64)
    adv, ret = gae_batched(r, v, mask, last, gamma=gamma, lam=lam)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            continue
        a1, r1 = gae(r[b, :L], v[b, :L], gamma=gamma, lam=lam, last_value=last[b])
        assert torch.allclose(adv[b, :L], a1, atol=1e-9)
        assert torch.allclose(ret[b, :L], r1, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=5), gamma=st.floats(0, 1),
       lam=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_gae_batched_property(lengths, gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) + 2
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    last = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    adv, _ = gae_batched(r, v, mask, last, gamma=gamma, lam=lam)
    for b, L in enumerate(lengths):
        ref = textbook_gae(r[b, :L].tolist(), v[b, :L].tolist(), gamma, lam, float(last[b]))
        assert torch.allclose(adv[b, :L], torch.tensor(ref, dtype=torch.float64), atol=1e-9)


def test_gae_batched_rejects_holes():
    with pytest.raises(ValueError):
        gae_batched(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 0, 1]]),
                    torch.zeros(1), gamma=1.0, lam=1.0)


def test_gae_float32_input():
    r = torch.zeros(2, 4)
    v = torch.ones(2, 4)
    adv, ret = gae_batched(r, v, torch.ones(2, 4), torch.zeros(2), gamma=1.0, lam=1.0)
    assert adv.dtype == torch.float32


def test_shape_rewards_each_ending():
    T = 5
    values = torch.arange(1, 16, dtype=torch.float64).reshape(3, 5) / 10  # row b: 0.1..0.5 etc
    values = torch.cat([values, values[:2]])  # 5 rows
    lengths = torch.tensor([3, 2, 5, 4, 4])
    endings = [Ending.FINISHED, "absorbed", "truncated", Ending.INCOMPLETE, "truncated"]
    task = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    boot = torch.tensor([9.0, 9.0, 0.77, 9.0, 0.33], dtype=torch.float64)
    rew, last = shape_rewards(lengths, endings, task, values, boot, r_fail=-1.0, truncation="bootstrap")
    expect = torch.zeros(5, T, dtype=torch.float64)
    expect[0, 2] = 1.0      # finished: task reward on the last token
    expect[1, 1] = -1.0     # absorbed: r_fail on the stop token
    assert torch.equal(rew, expect)  # truncated (bootstrap) and incomplete: no reward
    assert last.tolist() == pytest.approx([0.0, 0.0, 0.77, values[3, 3].item(), 0.33])
    rew, last = shape_rewards(lengths, endings, task, values, None, r_fail=-1.0, truncation="terminal")
    expect[2, 4] = 1.0
    expect[4, 3] = 0.5
    assert torch.equal(rew, expect)
    assert last.tolist() == pytest.approx([0.0, 0.0, 0.0, values[3, 3].item(), 0.0])
    with pytest.raises(ValueError):
        shape_rewards(lengths, endings, task, values, None, r_fail=-1.0, truncation="bootstrap")
    with pytest.raises(ValueError):
        shape_rewards(lengths, endings, task, values, boot, r_fail=-1.0, truncation="sometimes")
    with pytest.raises(ValueError):
        shape_rewards(lengths, ["finished"] * 4 + ["exploded"], task, values, boot, r_fail=-1.0)


def test_absorbed_trajectory_has_one_large_negative_td_error():
    # a smooth, confident critic; the rollout is stopped at token 59
    T, stop = 80, 59
    t = torch.arange(T, dtype=torch.float64)
    values = (0.6 + 0.05 * torch.sin(t / 10))[None]
    lengths = torch.tensor([stop + 1])
    rew, last = shape_rewards(lengths, ["absorbed"], torch.tensor([1.0]), values, None, r_fail=-1.0)
    mask = t[None] < stop + 1
    gamma = 1.0
    v = values[0]
    v_next = torch.cat([v[1:], last])
    delta = (rew[0] + gamma * torch.where(t == stop, last[0], v_next) - v)[: stop + 1]
    big = delta.abs() > 0.5
    assert big.sum() == 1 and bool(big[stop])
    assert float(delta[stop]) == pytest.approx(-1.0 - float(v[stop]))
    assert float(delta[:stop].abs().max()) < 0.01
    # and GAE (unchanged) propagates exactly these deltas
    adv, _ = gae_batched(rew, values, mask, last, gamma=gamma, lam=1.0)
    assert torch.allclose(adv[0, : stop + 1], delta.flip(0).cumsum(0).flip(0), atol=1e-12)
    assert float(adv[0, stop]) == pytest.approx(-1.0 - float(v[stop]))


def test_incomplete_egae_bootstraps_last_value():
    v = torch.tensor([[0.2, 0.4, 0.7, 0.0]], dtype=torch.float64)
    rew, last = shape_rewards(torch.tensor([3]), ["incomplete"], torch.tensor([0.0]), v, None, r_fail=-1.0)
    assert last.item() == 0.7
    adv, _ = gae_batched(rew, v, torch.tensor([[1, 1, 1, 0]]), last, gamma=1.0, lam=1.0)
    # delta_2 = 0 + V(s_2) - V(s_2) = 0: the last TD error vanishes
    assert adv[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 2.0, 2.0])
    gid = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    a = grpo_advantages(r, gid, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased, 0.57735
    assert a[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert a[4] == 0.0  # singleton group
    assert a[5:].tolist() == [0.0, 0.0]  # all-equal group
    a2 = grpo_advantages(r, ["p", "p", "p", "p", "q", "r", "r"], normalize_std=False)
    assert a2[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # all-equal groups are exactly 0 even with eps = 0 and inexact means
    a3 = grpo_advantages(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), [0, 0, 0], eps=0.0)
    assert a3.tolist() == [0.0, 0.0, 0.0]
    # zero-mean within each group
    assert float(a[:4].sum()) == pytest.approx(0.0, abs=1e-6)


def test_dapo_helpers():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    keep = dynamic_sampling_mask(r, [0, 0, 1, 1, 2])
    assert keep.tolist() == [True, True, False, False, False]
    p = overlong_penalty(torch.tensor([10, 80, 90, 100, 101]), max_len=100, cache_len=20)
    assert p.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_masked_stats():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=-1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_var(x, m).item() == pytest.approx(1.0)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = masked_whiten(x, m)
    assert w[~m.bool()].tolist() == [0.0, 0.0, 0.0]
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, m).item() == pytest.approx(1.0, rel=1e-4)
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0
