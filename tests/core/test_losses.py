import math

import pytest
import torch

from espo_async.core.losses import (
    KL_CLAMP,
    LOG_RATIO_CLAMP,
    aggregate,
    entropy_from_logits,
    entropy_groups,
    entropy_is_policy_loss,
    kl_penalty,
    ppo_policy_loss,
    value_loss,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def test_ppo_hand_computed_and_clip_gradients():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    ratios = t([[1.1, 1.5, 0.5, 0.9]])
    logp = torch.log(ratios).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    # per token: -min(rA, clip(r)A): -1.1, -1.3 (clipped high), +0.8 (clipped low), +0.9
    assert loss.item() == pytest.approx((-1.1 - 1.3 + 0.8 + 0.9) / 4)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.9) / 4)
    loss.backward()
    # d/dlogp of -r*A/4 = -r*A/4 where unclipped; 0 where clipped
    assert logp.grad.tolist()[0] == pytest.approx([-1.1 / 4, 0.0, 0.0, 0.9 / 4])


def test_ppo_clip_is_one_sided():
    # ratio below 1 - eps with positive advantage is NOT clipped (min picks r*A)
    logp = torch.log(t([[0.5, 2.0]])).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, t([[0.0, 0.0]]), t([[1.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    assert stats["clipfrac"] == 0.0
    assert logp.grad.tolist()[0] == pytest.approx([-0.5 / 2, 2.0 / 2])


def test_ppo_token_vs_seq_aggregation():
    # row 0: 1 token with loss -1 (A=1, r=1); row 1: 3 tokens with loss -3 each (A=3)
    logp = torch.zeros(2, 3, dtype=D)
    adv = t([[1.0, 7.0, 7.0], [3.0, 3.0, 3.0]])
    mask = t([[1, 0, 0], [1, 1, 1]])
    tok, _ = ppo_policy_loss(logp, logp, adv, mask, agg="token")
    seq, _ = ppo_policy_loss(logp, logp, adv, mask, agg="seq")
    assert tok.item() == pytest.approx((-1 - 9) / 4)
    assert seq.item() == pytest.approx((-1 + -3) / 2)
    # equal lengths: identical
    full = torch.ones(2, 3)
    a = ppo_policy_loss(logp, logp, adv, full, agg="token")[0]
    b = ppo_policy_loss(logp, logp, adv, full, agg="seq")[0]
    assert a.item() == pytest.approx(b.item())
    with pytest.raises(ValueError):
        aggregate(logp, mask, "bogus")


def test_ppo_padding_garbage_and_is_weights():
    logp = t([[0.1, float("nan")]]).requires_grad_(True)
    old = t([[0.0, float("inf")]])
    adv = t([[2.0, float("nan")]])
    mask = t([[1, 0]])
    w = t([[0.5, float("nan")]])
    loss, _ = ppo_policy_loss(logp, old, adv, mask, is_weights=w)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5 * 2.0 * math.exp(0.1))
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    # [B] advantages broadcast over tokens
    l2, _ = ppo_policy_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    assert l2.item() == pytest.approx(0.0)


def test_ppo_log_ratio_clamp_keeps_loss_and_gradient_finite_in_float32():
    # old log-prob -100 (underflowed), logp 0, A = 0: exp(100) is inf in float32 and inf * 0 = NaN
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.tensor([[-100.0, 0.0]])
    adv = torch.tensor([[0.0, 1.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert loss.item() == pytest.approx(-0.5)
    assert math.isfinite(stats["ratio_mean"]) and math.isfinite(stats["approx_kl"])
    assert stats["approx_kl"] == pytest.approx(0.5 * LOG_RATIO_CLAMP ** 2 / 2)
    # the clamp is symmetric and leaves log-ratios inside +-20 untouched
    lp = torch.tensor([[-30.0, 19.0]], dtype=D, requires_grad=True)
    loss2, s2 = ppo_policy_loss(lp, torch.zeros(1, 2, dtype=D), t([[-1.0, 1.0]]), torch.ones(1, 2),
                                clip_low=0.99999, clip_high=1e9)
    assert s2["ratio_mean"] == pytest.approx((math.exp(-20.0) + math.exp(19.0)) / 2)
    loss2.backward()
    assert lp.grad[0, 0].item() == 0.0  # beyond the clamp: no gradient
    assert lp.grad[0, 1].item() == pytest.approx(-math.exp(19.0) / 2)


def test_ppo_dual_clip_caps_negative_advantage_loss():
    # ratios 5 and 2 with A = -1: plain PPO loss 5 and 2; dual clip c = 3 caps the first at 3
    logp = torch.log(t([[5.0, 2.0, 5.0]])).requires_grad_(True)
    old = torch.zeros(1, 3, dtype=D)
    adv = t([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    plain, s0 = ppo_policy_loss(logp, old, adv, mask)
    assert "clipfrac_dual" not in s0  # off by default: the loss and stats are as before
    assert plain.item() == pytest.approx((5.0 + 2.0 - 1.2) / 3)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    assert stats["clipfrac_dual"] == pytest.approx(1 / 3)
    loss.backward()
    # capped token: constant loss, zero gradient; the others as plain PPO (r*|A|/3, clipped: 0)
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 2.0 / 3, 0.0])
    with pytest.raises(ValueError):
        ppo_policy_loss(logp, old, adv, mask, clip_ratio_c=1.0)


def test_clip_ratio_c_config_option_is_off_by_default():
    from espo_async.config import AlgoConfig

    assert AlgoConfig().clip_ratio_c is None
    assert AlgoConfig(clip_ratio_c=3.0).clip_ratio_c == 3.0
    with pytest.raises(ValueError):
        AlgoConfig(clip_ratio_c=0.5)


def test_value_clipfrac_ignores_float32_rounding_ties():
    # |V - V_old| = 0.106 < 0.2: nothing is clipped, but in float32 V_old + (V - V_old) is one ulp
    # away from V, and that ulp made the clipped error the larger one
    v = torch.tensor([[0.014007841236889362]])
    old = torch.tensor([[0.1203518658876419]])
    ret = torch.tensor([[-0.02336009219288826]])
    v_clip = old + torch.clamp(v - old, -0.2, 0.2)
    assert v_clip.item() != v.item() and ((v_clip - ret) ** 2 > (v - ret) ** 2).all()  # the tie exists
    loss, stats = value_loss(v, old, ret, torch.ones(1, 1), clip=0.2)
    assert stats["vf_clipfrac"] == 0.0
    assert loss.item() == pytest.approx(0.5 * (v - ret).item() ** 2, rel=1e-5)
    # a real clip still counts
    _, s2 = value_loss(torch.tensor([[1.0]]), old, torch.tensor([[2.0]]), torch.ones(1, 1), clip=0.2)
    assert s2["vf_clipfrac"] == 1.0


def test_value_loss_hand_computed():
    v = t([[1.0, 0.5, 0.0]]).requires_grad_(True)
    old = t([[0.5, 0.5, 0.5]])
    ret = t([[2.0, 0.0, 0.0]])
    mask = torch.ones(1, 3)
    loss, stats = value_loss(v, old, ret, mask, clip=0.2)
    # tok0: v=1 clipped to 0.7: max(1, 1.69) = 1.69; tok1: 0.25; tok2: v=0 clipped to 0.3: max(0, .09)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.25 + 0.09) / 3)
    assert stats["vf_clipfrac"] == pytest.approx(2 / 3)
    loss.backward()
    # the clipped branch is constant in v where it dominates: zero gradient there
    assert v.grad.tolist()[0] == pytest.approx([0.0, 0.5 / 3, 0.0])
    l2, _ = value_loss(t([[1.0]]), t([[0.0]]), t([[3.0]]), torch.ones(1, 1), clip=None)
    assert l2.item() == pytest.approx(2.0)


def test_kl_estimators():
    logp = t([-1.0, -2.0])
    ref = t([-1.5, -1.0])
    x = logp - ref
    assert torch.allclose(kl_penalty(logp, ref, "k1"), x)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * x ** 2)
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.exp(-x) - 1 + x)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")
    # k3 is an unbiased estimator of KL(pi || ref) under samples from pi
    p = t([0.7, 0.2, 0.1])
    q = t([0.3, 0.3, 0.4])
    exact = (p * (p / q).log()).sum()
    est = (p * kl_penalty(p.log(), q.log(), "k3")).sum()
    assert est.item() == pytest.approx(exact.item())


def test_kl_estimators_are_clamped():
    assert KL_CLAMP == 10.0
    logp = t([-5.0, 5.0, 1.0, -2.0, 30.0])
    ref = torch.zeros(5, dtype=D)
    k3 = kl_penalty(logp, ref, "k3")
    # k3 at log-ratio -5 is e^5 - 6 = 142 unclamped; the references (verl, OpenRLHF) give 10
    assert k3.tolist() == pytest.approx([10.0, math.exp(-5) + 4, math.exp(-1), math.exp(2) - 3, 10.0])
    k2 = kl_penalty(logp, ref, "k2")
    assert k2.tolist() == pytest.approx([10.0, 10.0, 0.5, 2.0, 10.0])
    assert torch.isfinite(kl_penalty(t([-1000.0]), t([0.0]), "k3")).all()
    # the bound stops the gradient; inside it the gradient is the estimator's
    x = t([-5.0, 1.0]).requires_grad_(True)
    kl_penalty(x, torch.zeros(2, dtype=D), "k3").sum().backward()
    assert x.grad.tolist() == pytest.approx([0.0, 1 - math.exp(-1)])
    assert kl_penalty(logp, ref, "k1").tolist() == logp.tolist()  # k1 is not clamped


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(4, dtype=D)).item() == pytest.approx(math.log(4))
    logits = torch.randn(3, 7, dtype=D)
    p = torch.softmax(logits, -1)
    assert torch.allclose(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    assert entropy_from_logits(torch.tensor([0.0, -1e9])).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ entropy importance sampling
def test_entropy_group_split_proportion():
    gen = torch.Generator().manual_seed(0)
    ent = torch.rand(4, 50, generator=gen, dtype=D)
    lengths = torch.tensor([50, 10, 11, 1])
    mask = torch.arange(50)[None] < lengths[:, None]
    high = entropy_groups(ent, mask, 0.2)
    assert high.sum(-1).tolist() == [10, 2, 3, 1]  # ceil(0.2 * n)
    assert not (high & ~mask).any()
    for b in range(4):
        L = int(lengths[b])
        row = ent[b, :L]
        hi = row[high[b, :L]]
        lo = row[~high[b, :L]]
        if len(lo):
            assert hi.min() > lo.max()  # exactly the highest-entropy tokens
    # ties: earlier positions first, exact count
    tie = entropy_groups(torch.ones(1, 10, dtype=D), torch.ones(1, 10), 0.2)
    assert tie[0].tolist() == [True, True] + [False] * 8


def eis_case(seed=0, B=3, T=12):
    gen = torch.Generator().manual_seed(seed)
    old_logp = -torch.rand(B, T, generator=gen, dtype=D) * 2
    logp = (old_logp + 0.001 * torch.randn(B, T, generator=gen, dtype=D)).requires_grad_(True)
    ent = torch.rand(B, T, generator=gen, dtype=D) * 3
    lengths = torch.tensor([T, T - 4, 5])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=D)[:B]
    return logp, old_logp, ent, adv, mask


def test_eis_s_tau_is_geometric_mean_and_gradient_is_per_token():
    logp, old_logp, ent, adv, mask = eis_case()
    V = 1000
    alpha = 0.02
    loss, stats = entropy_is_policy_loss(logp, old_logp, ent, adv, mask, top_frac=0.25,
                                         alpha=alpha, vocab_size=V)
    loss.backward()
    high = entropy_groups(ent, mask, 0.25)
    groups = []
    for b in range(3):
        for g in (high[b], mask[b] & ~high[b]):
            if g.any():
                groups.append((b, g))
    expect_grad = torch.zeros_like(logp)
    expect_loss = 0.0
    s_list = []
    for b, g in groups:
        ratio_tok = torch.exp(logp[b, g] - old_logp[b, g]).detach()
        s = torch.prod(ratio_tok) ** (1.0 / int(g.sum()))  # geometric mean
        s_list.append(s.item())
        eps = alpha / math.log(V) * ent[b, g].mean().item()
        assert abs(s.item() - 1) < eps  # small perturbation: nothing clipped
        expect_loss += -(s * adv[b]).item()
        # d/dlogp_t of -(1/|g|) * s * A, averaged over groups
        expect_grad[b, g] = -s * adv[b] / int(g.sum()) / len(groups)
    assert loss.item() == pytest.approx(expect_loss / len(groups))
    assert stats["s_tau_mean"] == pytest.approx(sum(s_list) / len(s_list))
    assert stats["clipfrac"] == 0.0
    assert torch.allclose(logp.grad, expect_grad, atol=1e-12)
    assert torch.all(logp.grad[~mask] == 0)


def test_eis_clipping_range():
    # one response, 5 tokens, top_frac 0.2 -> high group = the single highest-entropy token
    V = math.e ** 2  # log|V| = 2
    alpha = 0.5
    ent = t([[0.1, 0.2, 2.0, 0.3, 0.2]])  # high group {2}: eps = 0.5/2 * 2.0 = 0.5
    mask = torch.ones(1, 5, dtype=torch.bool)  # low group eps = 0.25 * mean(.1,.2,.3,.2) = 0.05
    old = torch.zeros(1, 5, dtype=D)
    # low group ratios e^{0.1} each -> s = e^{0.1} = 1.105 > 1.05: clipped for A > 0
    # high group ratio e^{0.3} = 1.35 < 1.5: not clipped
    logp = t([[0.1, 0.1, 0.3, 0.1, 0.1]]).requires_grad_(True)
    loss, stats = entropy_is_policy_loss(logp, old, ent, t([1.0]), mask, top_frac=0.2, alpha=alpha,
                                         vocab_size=V)
    assert stats["eps_tau_mean"] == pytest.approx((0.5 + 0.05) / 2)
    assert loss.item() == pytest.approx((-math.exp(0.3) - 1.05) / 2)
    assert stats["clipfrac"] == pytest.approx(4 / 5)
    loss.backward()
    g = logp.grad[0].tolist()
    assert g[2] == pytest.approx(-math.exp(0.3) / 2)
    assert g[0] == g[1] == g[3] == g[4] == 0.0
    # with a negative advantage the low group is not clipped on the upper side
    logp2 = logp.detach().clone().requires_grad_(True)
    loss2, stats2 = entropy_is_policy_loss(logp2, old, ent, t([-1.0]), mask, top_frac=0.2,
                                           alpha=alpha, vocab_size=V)
    loss2.backward()
    assert stats2["clipfrac"] == 0.0
    assert logp2.grad[0, 0].item() == pytest.approx(math.exp(0.1) / 4 / 2)
    # below the lower bound with A < 0: clipped
    logp3 = t([[-0.1, -0.1, 0.0, -0.1, -0.1]]).requires_grad_(True)
    loss3, _ = entropy_is_policy_loss(logp3, old, ent, t([-1.0]), mask, top_frac=0.2, alpha=alpha,
                                      vocab_size=V)
    loss3.backward()
    assert logp3.grad[0, 0].item() == 0.0
    assert loss3.item() == pytest.approx((0.95 + 1.0) / 2)


def test_eis_on_policy_equals_group_mean_of_advantage():
    logp, _, ent, adv, mask = eis_case(seed=4)
    loss, stats = entropy_is_policy_loss(logp, logp.detach(), ent, adv, mask, vocab_size=50)
    # r = 1 everywhere: loss = -mean over groups of A
    n_groups = [2, 2, 2]
    assert loss.item() == pytest.approx(-(adv * torch.tensor(n_groups)).sum().item() / 6)
    assert stats["s_tau_mean"] == pytest.approx(1.0)
    assert stats["high_entropy_frac"] == pytest.approx((3 + 2 + 1) / (12 + 8 + 5))
