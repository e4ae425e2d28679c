"""Reward shaping per ending, GAE (plain, batched, T-PPO extended), GRPO/DAPO outcome helpers.

    delta_t = r_t + gamma * V_{t+1} - V_t,     V_T := last_value (bootstrap, 0 if terminal)
    A_t     = delta_t + gamma * lambda * A_{t+1},   A_T = 0
    R_t     = A_t + V_t                         (value targets)

Endings (docs/architecture.md): finished -> task reward on the last token, no bootstrap;
absorbed -> r_fail on the stop token, no bootstrap (the absorbing failure state of ESPO);
truncated -> bootstrap from V(s_T) with reward 0, or terminal with the task reward (config);
incomplete (T-PPO window ended) -> reward 0, bootstrap V(s_l) := V(s_{l-1}).
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

import torch

from .scan import linear_scan

__all__ = [
    "Ending",
    "gae",
    "gae_batched",
    "shape_rewards",
    "grpo_advantages",
    "dynamic_sampling_mask",
    "overlong_penalty",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]


class Ending(str, Enum):
    FINISHED = "finished"
    ABSORBED = "absorbed"
    TRUNCATED = "truncated"
    INCOMPLETE = "incomplete"


# ------------------------------------------------------------------------------ masked statistics
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum of x over mask (padding may hold NaN/inf: it is never touched)."""
    m = mask.bool()
    x0 = torch.where(m, x, torch.zeros_like(x))
    return x0.sum() if dim is None else x0.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / sum(mask); 0 where the mask is empty."""
    m = mask.bool()
    n = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / n.clamp_min(1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all masked-in entries (Bessel-corrected if unbiased and n > 1)."""
    m = mask.bool()
    mean = masked_mean(x, m)
    n = m.sum()
    ss = masked_sum((x - mean) ** 2, m)
    denom = (n - 1) if (unbiased and int(n) > 1) else n.clamp_min(1)
    return ss / denom.to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the mask (mean added back if not shift_mean); padding -> 0."""
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    w = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        w = w + mean
    return torch.where(m, w, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------- GAE
def _check_prefix(mask: torch.Tensor) -> None:
    if mask.shape[-1] > 1 and bool((mask[..., 1:] & ~mask[..., :-1]).any()):
        raise ValueError("mask must be right-padded (each row a prefix of ones)")


def gae_batched(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                last_values: torch.Tensor | float, *, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE on padded [B, T] rows by a reverse log-depth scan; V_{l_b} = last_values[b] at each row's
    own length l_b. Returns (advantages, returns), both 0 on padding."""
    valid = torch.as_tensor(mask).bool()
    _check_prefix(valid)
    values = torch.as_tensor(values)
    dtype = torch.promote_types(torch.as_tensor(rewards).dtype, values.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    v = torch.where(valid, values.to(dtype), torch.zeros((), dtype=dtype))
    r = torch.where(valid, torch.as_tensor(rewards).to(dtype), torch.zeros((), dtype=dtype))
    n_rows = v.shape[0]
    last = torch.as_tensor(last_values, dtype=dtype, device=v.device).expand(n_rows).reshape(n_rows, 1)
    pad_col = torch.zeros_like(valid[:, :1])
    next_valid = torch.cat([valid[:, 1:], pad_col], dim=1)
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    v_next = torch.where(valid & ~next_valid, last, v_next)
    delta = torch.where(valid, r + gamma * v_next - v, torch.zeros((), dtype=dtype))
    adv = linear_scan(float(gamma) * float(lam), delta, reverse=True)
    adv = torch.where(valid, adv, torch.zeros((), dtype=dtype))
    ret = torch.where(valid, adv + v, torch.zeros((), dtype=dtype))
    return adv, ret


def gae(rewards: torch.Tensor, values: torch.Tensor, *, gamma: float, lam: float,
        last_value: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE of one trajectory (1-D, equal lengths); V_T = last_value. Returns (A, A + V)."""
    rewards = torch.as_tensor(rewards)
    values = torch.as_tensor(values)
    if rewards.dim() != 1 or rewards.shape != values.shape:
        raise ValueError("gae takes 1-D rewards and values of equal length")
    mask = torch.ones(1, rewards.shape[0], dtype=torch.bool, device=values.device)
    adv, ret = gae_batched(rewards[None], values[None], mask,
                           torch.as_tensor(last_value).reshape(1), gamma=gamma, lam=lam)
    return adv[0], ret[0]


def shape_rewards(lengths: torch.Tensor, endings: Sequence[Ending | str], task_rewards: torch.Tensor,
                  values: torch.Tensor, bootstrap_values: torch.Tensor | None = None, *,
                  r_fail: float, truncation: str = "bootstrap") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T] and bootstrap values [B] for each ending (see module docstring).

    lengths[b] = l_b real tokens; the "last token" is index l_b - 1 (for absorbed, the stop token).
    bootstrap_values[b] = V(s_{l_b}) is needed only for truncated rows in "bootstrap" mode.
    """
    if truncation not in ("bootstrap", "terminal"):
        raise ValueError("truncation must be 'bootstrap' or 'terminal'")
    values = torch.as_tensor(values)
    n_rows, n_tok = values.shape
    dtype = values.dtype if values.dtype.is_floating_point else torch.get_default_dtype()
    dev = values.device
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=dev).reshape(n_rows)
    if len(endings) != n_rows:
        raise ValueError("need one ending per row")
    if bool((lengths < 0).any()) or bool((lengths > n_tok).any()):
        raise ValueError("lengths must be in [0, T]")
    ends = [Ending(e) for e in endings]
    code = lambda e: torch.tensor([x is e for x in ends], dtype=torch.bool, device=dev)  # noqa: E731
    fin, absb, trunc, inc = (code(e) for e in (Ending.FINISHED, Ending.ABSORBED,
                                                Ending.TRUNCATED, Ending.INCOMPLETE))
    task = torch.as_tensor(task_rewards, dtype=dtype, device=dev).reshape(n_rows)
    zero = torch.zeros(n_rows, dtype=dtype, device=dev)
    idx = (lengths - 1).clamp_min(0)
    terminal_trunc = trunc & (truncation == "terminal")
    r_last = torch.where(fin | terminal_trunc, task, zero)
    r_last = torch.where(absb, torch.full_like(zero, float(r_fail)), r_last)
    r_last = torch.where(lengths > 0, r_last, zero)
    rewards = torch.zeros(n_rows, n_tok, dtype=dtype, device=dev)
    if n_tok > 0:
        rewards.scatter_(1, idx[:, None], r_last[:, None])
    last = zero.clone()
    if n_tok > 0:
        v_last_token = values.to(dtype).gather(1, idx[:, None])[:, 0]
        last = torch.where(inc & (lengths > 0), v_last_token, last)  # EGAE: V(s_l) := V(s_{l-1})
    boot = trunc & (truncation == "bootstrap")
    if bool(boot.any()):
        if bootstrap_values is None:
            raise ValueError("truncated rows in bootstrap mode need bootstrap_values = V(s_T)")
        bv = torch.as_tensor(bootstrap_values, dtype=dtype, device=dev).reshape(n_rows)
        last = torch.where(boot, bv, last)
    return rewards, last


# ----------------------------------------------------------------------------- outcome advantages
def _group_index(group_ids) -> torch.Tensor:
    if isinstance(group_ids, torch.Tensor):
        return torch.unique(group_ids, return_inverse=True)[1].reshape(-1)
    table: dict = {}
    return torch.tensor([table.setdefault(g, len(table)) for g in group_ids], dtype=torch.int64)


def grpo_advantages(rewards: torch.Tensor, group_ids, *, eps: float = 1e-6,
                    normalize_std: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps)  (unbiased std); groups of size 1 or
    with all-equal rewards -> 0."""
    r = torch.as_tensor(rewards)
    r = r if r.dtype.is_floating_point else r.to(torch.get_default_dtype())
    r = r.reshape(-1)
    inv = _group_index(group_ids).to(r.device)
    if inv.numel() != r.numel():
        raise ValueError("need one group id per reward")
    if r.numel() == 0:
        return r.clone()
    n_groups = int(inv.max()) + 1
    cnt = torch.zeros(n_groups, dtype=r.dtype, device=r.device).scatter_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(cnt).scatter_add_(0, inv, r) / cnt
    dev = r - mean[inv]
    if normalize_std:
        ss = torch.zeros_like(cnt).scatter_add_(0, inv, dev * dev)
        std = torch.sqrt(ss / (cnt - 1).clamp_min(1))
        dev = dev / (std[inv] + eps)
    # singleton groups and groups whose rewards are all equal carry no signal: exactly 0
    # (not rounding noise of the mean divided by a rounding-noise std)
    informative = _group_varies(r, inv, n_groups)[inv]
    return torch.where(informative, dev, torch.zeros_like(dev))


def _group_varies(r: torch.Tensor, inv: torch.Tensor, n_groups: int) -> torch.Tensor:
    big = torch.finfo(r.dtype).max
    gmax = torch.full((n_groups,), -big, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    gmin = torch.full((n_groups,), big, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    return gmax > gmin


def dynamic_sampling_mask(rewards: torch.Tensor, group_ids) -> torch.Tensor:
    """DAPO dynamic sampling: True for samples whose group's rewards are not all equal."""
    r = torch.as_tensor(rewards).reshape(-1).to(torch.float64)
    inv = _group_index(group_ids).to(r.device)
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return _group_varies(r, inv, int(inv.max()) + 1)[inv]


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 if l <= L_max - L_cache; ((L_max - L_cache) - l)/L_cache
    in between; -1 if l > L_max."""
    lengths = torch.as_tensor(lengths).to(torch.get_default_dtype())
    start = float(max_len - cache_len)
    mid = (start - lengths) / float(max(cache_len, 1))
    out = torch.where(lengths <= start, torch.zeros_like(lengths), mid)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), out)
