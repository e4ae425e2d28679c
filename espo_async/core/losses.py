"""Policy and value losses on padded [B, T] tensors with a mask (1 = real token).

PPO / DAPO clipped surrogate, r_t = pi(y_t) / pi_old(y_t):
    L = agg( max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)) )
Clipped value loss:
    L_V = agg( 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )
Entropy Importance Sampling PO (group tau = top-entropy tokens / the rest of one response):
    s_tau = exp(mean_{t in tau}(log pi - log pi_old)),  r_t = sg[s_tau] * exp(log pi_t - sg[log pi_t])
    eps_tau = alpha / log|V| * mean_{t in tau} H_old(t)
    L = mean_tau mean_{t in tau} -min(r_t A_t, clip(r_t, 1 - eps_tau, 1 + eps_tau) A_t)

Numerical guards (as in verl / OpenRLHF): the policy loss clamps the log-ratio to
+-LOG_RATIO_CLAMP before exp (so a token whose old log-prob underflowed cannot give inf * 0 = NaN);
the k2 / k3 KL estimators are clamped to at most KL_CLAMP; an optional dual clip (clip_ratio_c,
verl's default 3) caps the loss of a negative-advantage token at clip_ratio_c * |A|.

Aggregation: "token" = mean over all valid tokens of the batch (DAPO token-level);
"seq" = mean over each sequence's tokens, then over sequences (rows without tokens skipped).
Every loss returns (scalar loss, dict of float statistics).
"""

from __future__ import annotations

import math

import torch

from .advantages import masked_mean, masked_sum

__all__ = [
    "LOG_RATIO_CLAMP",
    "KL_CLAMP",
    "masked_mean",
    "aggregate",
    "ppo_policy_loss",
    "value_loss",
    "kl_penalty",
    "entropy_from_logits",
    "entropy_groups",
    "entropy_is_policy_loss",
]


LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| before exp in the PPO ratio (verl, OpenRLHF: 20)
KL_CLAMP = 10.0  # upper bound of the k2 / k3 estimators per token (verl low_var_kl, OpenRLHF: 10)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token") -> torch.Tensor:
    """token: sum(loss*mask)/sum(mask); seq: mean over rows with tokens of the per-row token mean."""
    m = mask.bool()
    if agg == "token":
        return masked_mean(loss, m)
    if agg == "seq":
        per_row = masked_mean(loss, m, dim=-1)
        has = m.any(dim=-1)
        return masked_mean(per_row, has)
    raise ValueError("agg must be 'token' or 'seq'")


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


def _clean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Zero the padding so garbage there (NaN, inf) reaches neither the loss nor the gradients."""
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                    agg: str = "token", is_weights: torch.Tensor | None = None,
                    clip_ratio_c: float | None = None):
    """Clipped surrogate; clip_high > clip_low is DAPO's clip-higher. `advantages` is [B, T] or [B].

    is_weights (optional, detached) multiply the per-token loss, e.g. a truncated importance
    correction for sampler/learner mismatch. The log-ratio is clamped to +-LOG_RATIO_CLAMP.
    clip_ratio_c (> 1, optional): dual clip; where A < 0 the per-token loss is at most
    clip_ratio_c * |A| (its gradient is zero there). None: off.
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    m = mask.bool()
    adv = advantages if advantages.dim() == logp.dim() else advantages.unsqueeze(-1)
    adv = _clean(adv.detach().expand_as(logp), m)
    log_ratio = torch.clamp(_clean(logp, m) - _clean(old_logp.detach(), m), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_tok = torch.maximum(pg1, pg2)
    dual = None
    if clip_ratio_c is not None:
        pg3 = -adv * clip_ratio_c
        dual = (adv < 0) & (per_tok > pg3)
        per_tok = torch.where(adv < 0, torch.minimum(per_tok, pg3), per_tok)
    if is_weights is not None:
        per_tok = per_tok * _clean(is_weights.detach(), m)
    loss = aggregate(per_tok, m, agg)
    with torch.no_grad():
        stats = {
            "pg_loss": _f(loss),
            "clipfrac": _f(masked_mean((pg2 > pg1).to(logp.dtype), m)),
            "approx_kl": _f(masked_mean(0.5 * log_ratio ** 2, m)),
            "ratio_mean": _f(masked_mean(ratio, m)),
        }
        if dual is not None:
            stats["clipfrac_dual"] = _f(masked_mean(dual.to(logp.dtype), m))
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, *, clip: float | None = 0.2, agg: str = "token"):
    """0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2); clip=None -> 0.5 (V - R)^2."""
    m = mask.bool()
    values = _clean(values, m)
    old_values = _clean(old_values.detach(), m)
    returns = _clean(returns.detach(), m)
    err = (values - returns) ** 2
    if clip is None:
        per_tok = 0.5 * err
        clipped = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clip = (v_clip - returns) ** 2
        per_tok = 0.5 * torch.maximum(err, err_clip)
        # Clipped only where the clamp moved V: inside the range old + (V - old) can differ from V
        # by an ulp, and that rounding must not count.
        clipped = (err_clip > err) & ((values - old_values).abs() > clip)
    loss = aggregate(per_tok, m, agg)
    with torch.no_grad():
        stats = {
            "vf_loss": _f(loss),
            "vf_clipfrac": _f(masked_mean(clipped.to(values.dtype), m)),
            "value_mean": _f(masked_mean(values, m)),
        }
    return loss, stats


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators with x = log pi - log pi_ref (samples from pi):
    k1 = x;  k2 = x^2 / 2;  k3 = exp(-x) - 1 + x  (unbiased, >= 0).

    k2 and k3 are clamped to at most KL_CLAMP (= 10, as verl's low_var_kl and OpenRLHF): one token
    far off the reference (k3 at x = -5 is 142) cannot dominate the batch; the gradient is zero
    beyond the bound. Inside it (|x| < 4.47 for k2, x in (-2.61, 11.0) for k3) the value is exact.
    k1 (signed, linear) is not clamped."""
    x = logp - ref_logp
    if kind == "k1":
        return x
    if kind == "k2":
        return torch.clamp(0.5 * x * x, max=KL_CLAMP)
    if kind == "k3":
        x = torch.clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # no inf from exp before the clamp
        return torch.clamp(torch.expm1(-x) + x, max=KL_CLAMP)
    raise ValueError("kind must be 'k1', 'k2' or 'k3'")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(l) - sum_a softmax(l)_a l_a, per position ([..., V] -> [...])."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    p = torch.softmax(x, dim=-1)
    return torch.logsumexp(x, dim=-1) - (p * x).sum(dim=-1)


def entropy_groups(old_entropy: torch.Tensor, mask: torch.Tensor, top_frac: float) -> torch.Tensor:
    """Boolean [B, T]: the ceil(top_frac * n_b) highest-old-entropy valid tokens of each row
    (ties broken by position, earlier first). The other group is mask & ~result."""
    m = mask.bool()
    n = m.sum(dim=-1)
    k = torch.ceil(n.to(torch.float64) * float(top_frac) - 1e-9).clamp_min(0).to(torch.int64)
    k = torch.minimum(k, n)
    key = torch.where(m, old_entropy.to(torch.float64), torch.full_like(old_entropy, -math.inf,
                                                                          dtype=torch.float64))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return m & (rank < k[:, None])


def entropy_is_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, old_entropy: torch.Tensor,
                           advantages: torch.Tensor, mask: torch.Tensor, *, top_frac: float = 0.2,
                           alpha: float = 0.02, vocab_size: int):
    """Entropy Importance Sampling PO loss (see module docstring). `advantages`: [B] or [B, T]."""
    m = mask.bool()
    adv = advantages if advantages.dim() == logp.dim() else advantages.unsqueeze(-1)
    adv = _clean(adv.detach().expand_as(logp), m)
    logp = _clean(logp, m)
    old_logp = _clean(old_logp.detach(), m)
    old_entropy = _clean(old_entropy.detach(), m)
    high = entropy_groups(old_entropy, m, top_frac)
    groups = torch.stack([high, m & ~high], dim=0)  # [2, B, T]
    log_ratio = logp - old_logp
    size = groups.sum(dim=-1)  # [2, B]
    nonempty = size > 0
    # log s_tau = mean over the group of log(pi/pi_old)  (length-normalised geometric mean)
    log_s = masked_mean(log_ratio.expand_as(groups), groups, dim=-1)  # [2, B]
    s = torch.exp(log_s.detach())
    ent = old_entropy.to(logp.dtype)
    eps_tau = (float(alpha) / math.log(vocab_size)) * masked_mean(ent.expand_as(groups), groups, dim=-1)
    s_tok = (s[..., None] * groups).sum(0)          # s_tau of each token's group, [B, T]
    eps_tok = (eps_tau[..., None] * groups).sum(0)  # eps_tau of each token's group
    ratio = s_tok * torch.exp(logp - logp.detach())  # value s_tau, d ratio / d logp_t = s_tau
    clipped_ratio = torch.maximum(torch.minimum(ratio, 1.0 + eps_tok), 1.0 - eps_tok)
    per_tok = -torch.minimum(ratio * adv, clipped_ratio * adv)
    per_group = masked_mean(per_tok.expand_as(groups), groups, dim=-1)  # [2, B]
    loss = masked_mean(per_group, nonempty)
    with torch.no_grad():
        clipped = (clipped_ratio * adv < ratio * adv) & m
        stats = {
            "pg_loss": _f(loss),
            "clipfrac": _f(masked_mean(clipped.to(logp.dtype), m)),
            "s_tau_mean": _f(masked_mean(torch.exp(log_s), nonempty)),
            "eps_tau_mean": _f(masked_mean(eps_tau, nonempty)),
            "high_entropy_frac": _f(masked_sum(high.to(logp.dtype), m) / m.sum().clamp_min(1)),
            "approx_kl": _f(masked_mean(0.5 * log_ratio ** 2, m)),
        }
    return loss, stats
