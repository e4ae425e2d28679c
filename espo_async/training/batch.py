"""Batch preparation for the PPO trainer: samples -> padded tensors -> rewards and advantages.

Layout of a packed batch (B rows, prompts left-padded to P, responses right-padded to T):

    input_ids      [B, P + T]   pad .. pad prompt_0 .. prompt_{p-1} | resp_0 .. resp_{l-1} pad ..
    attention_mask [B, P + T]   1 on real tokens
    position_ids   [B, P + T]   cumsum(mask) - 1 (0 at each row's first real token)
    response_ids   [B, T]       right-padded, response_mask a prefix of ones (what GAE needs)

Every prompt ends at column P-1, so response token ``t`` sits at column ``P + t`` for every row:
its logit comes from column ``P - 1 + t`` and V(s_t) is the hidden state at that same column
(the last token of prompt + response[0..t-1]). V(s_l) of a row with l tokens (the bootstrap
value) is at column ``P - 1 + l``. Everything is a slice ``[:, P-1 : P+T]`` (T+1 columns), no
gather and no per-token Python loop.

The advantage computation is :func:`compute_advantages`, a pure function of packed tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from espo_async.config import AlgoConfig
from espo_async.core.advantages import (
    Ending,
    dynamic_sampling_mask,
    gae_batched,
    grpo_advantages,
    masked_whiten,
    overlong_penalty,
    shape_rewards,
)

__all__ = [
    "TrainSample",
    "ResponseBatch",
    "Advantages",
    "outcome_rewards",
    "filter_samples",
    "pack_responses",
    "pack_inputs",
    "plan_micro_batches",
    "compute_advantages",
    "loss_units",
]


@dataclass
class TrainSample:
    """One trajectory as received from a sampler."""

    prompt_ids: np.ndarray  # int32[P]
    response_ids: np.ndarray  # int32[T]  (T = 0 only for 'truncated'/'incomplete': skipped)
    behaviour_logprobs: np.ndarray  # float32[T]  logprobs the sampler's engine reported
    versions: np.ndarray  # int32[T] policy version per token
    ending: str  # 'finished' | 'absorbed' | 'truncated' | 'incomplete'
    task_reward: float  # verifier score (finished; truncated only in terminal mode)
    group_id: str  # prompt group (GRPO / dynamic sampling)


# --------------------------------------------------------------------------- outcome / filters
def outcome_rewards(endings: Sequence[str], task_rewards: Sequence[float], *, r_fail: float) -> torch.Tensor:
    """One scalar outcome per trajectory (GRPO advantages, DAPO dynamic sampling).

    finished -> task reward; absorbed -> r_fail (the absorbing failure state keeps its meaning
    under GRPO: a stopped rollout counts as a failure of value r_fail inside its group);
    truncated -> task reward (no critic to bootstrap from, so an outcome method scores the
    truncated text; usually 0); incomplete -> NaN (no outcome yet: excluded from GRPO).
    """
    out = []
    for e, r in zip(endings, task_rewards):
        e = Ending(e)
        if e is Ending.ABSORBED:
            out.append(float(r_fail))
        elif e is Ending.INCOMPLETE:
            out.append(math.nan)
        else:
            out.append(float(r))
    return torch.tensor(out, dtype=torch.float64)


def filter_samples(samples: Sequence[TrainSample], *, r_fail: float, dynamic_sampling: bool):
    """Drop unusable samples (empty response or empty prompt) and, for DAPO dynamic sampling,
    every group whose outcomes are all equal (incomplete samples never cause a drop and are
    always kept). Returns (kept samples, n_skipped_empty, groups_dropped, samples_dropped)."""
    usable = [s for s in samples if len(s.response_ids) > 0 and len(s.prompt_ids) > 0]
    n_empty = len(samples) - len(usable)
    if not dynamic_sampling or not usable:
        return usable, n_empty, 0, 0
    outcome = outcome_rewards([s.ending for s in usable], [s.task_reward for s in usable], r_fail=r_fail)
    has = ~torch.isnan(outcome)
    keep = torch.ones(len(usable), dtype=torch.bool)
    if bool(has.any()):
        idx = torch.nonzero(has).reshape(-1)
        gids = [usable[i].group_id for i in idx.tolist()]
        keep[idx] = dynamic_sampling_mask(outcome[idx], gids)
    dropped_groups = {usable[i].group_id for i in range(len(usable)) if not keep[i]}
    # a group is dropped as a whole (its incomplete members too)
    kept = [s for s, k in zip(usable, keep.tolist()) if k and s.group_id not in dropped_groups]
    return kept, n_empty, len(dropped_groups), len(usable) - len(kept)


# ------------------------------------------------------------------------------------- packing
@dataclass
class ResponseBatch:
    """Response-aligned [B, T] tensors of a whole batch (right-padded)."""

    response_ids: torch.Tensor  # int64 [B, T]
    mask: torch.Tensor  # bool [B, T]
    lengths: torch.Tensor  # int64 [B]
    prompt_lengths: torch.Tensor  # int64 [B]
    behaviour_logprobs: torch.Tensor  # float32 [B, T] (NaN where missing)
    versions: torch.Tensor  # int64 [B, T]
    endings: list[str] = field(default_factory=list)
    task_rewards: torch.Tensor | None = None  # float64 [B]
    group_ids: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def _row(x, n: int, dtype, fill) -> np.ndarray:
    a = np.asarray(x if x is not None else [], dtype=dtype).reshape(-1)
    if a.shape[0] == n:
        return a
    out = np.full(n, fill, dtype=dtype)
    k = min(n, a.shape[0])
    out[:k] = a[:k]
    return out


def pack_responses(samples: Sequence[TrainSample], *, default_version: int = 0) -> ResponseBatch:
    b = len(samples)
    lengths = np.array([len(s.response_ids) for s in samples], dtype=np.int64)
    t = int(lengths.max()) if b else 0
    ids = np.zeros((b, t), dtype=np.int64)
    blp = np.full((b, t), np.nan, dtype=np.float32)
    ver = np.full((b, t), default_version, dtype=np.int64)
    for i, s in enumerate(samples):  # rows only; tokens are copied as slices
        n = int(lengths[i])
        ids[i, :n] = np.asarray(s.response_ids, dtype=np.int64)
        blp[i, :n] = _row(s.behaviour_logprobs, n, np.float32, np.nan)
        ver[i, :n] = _row(s.versions, n, np.int64, default_version)
    mask = np.arange(t)[None, :] < lengths[:, None]
    return ResponseBatch(
        response_ids=torch.from_numpy(ids),
        mask=torch.from_numpy(mask),
        lengths=torch.from_numpy(lengths),
        prompt_lengths=torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.int64),
        behaviour_logprobs=torch.from_numpy(blp),
        versions=torch.from_numpy(ver),
        endings=[str(Ending(s.ending).value) for s in samples],
        task_rewards=torch.tensor([float(s.task_reward) for s in samples], dtype=torch.float64),
        group_ids=[s.group_id for s in samples],
    )


def pack_inputs(samples: Sequence[TrainSample], *, pad_id: int = 0):
    """Model inputs of some rows: (input_ids, attention_mask, position_ids, P, T) with the
    prompts left-padded to P and the responses right-padded to T (see the module docstring)."""
    p = max(len(s.prompt_ids) for s in samples)
    t = max(len(s.response_ids) for s in samples)
    b = len(samples)
    ids = np.full((b, p + t), pad_id, dtype=np.int64)
    att = np.zeros((b, p + t), dtype=np.int64)
    for i, s in enumerate(samples):
        pl, rl = len(s.prompt_ids), len(s.response_ids)
        ids[i, p - pl:p] = np.asarray(s.prompt_ids, dtype=np.int64)
        ids[i, p:p + rl] = np.asarray(s.response_ids, dtype=np.int64)
        att[i, p - pl:p + rl] = 1
    ids_t, att_t = torch.from_numpy(ids), torch.from_numpy(att)
    pos = (att_t.cumsum(-1) - 1).clamp_min(0)
    return ids_t, att_t, pos, p, t


def plan_micro_batches(rows: Sequence[int], prompt_lengths: Sequence[int], lengths: Sequence[int],
                       *, max_tokens: int) -> list[list[int]]:
    """Split ``rows`` into micro-batches of at most ``max_tokens`` padded tokens
    (rows x (max prompt + max response)); rows are sorted by length so padding stays small.
    A row longer than the budget gets a micro-batch of its own."""
    order = sorted(rows, key=lambda r: (int(prompt_lengths[r]) + int(lengths[r]), r))
    out: list[list[int]] = []
    cur: list[int] = []
    mp = mt = 0
    for r in order:
        np_, nt = max(mp, int(prompt_lengths[r])), max(mt, int(lengths[r]))
        if cur and (len(cur) + 1) * (np_ + nt) > max_tokens:
            out.append(cur)
            cur, np_, nt = [], int(prompt_lengths[r]), int(lengths[r])
        cur.append(r)
        mp, mt = np_, nt
    if cur:
        out.append(cur)
    return out


def loss_units(mask: torch.Tensor, kind: str, *, top_frac: float = 0.2) -> int:
    """How many terms a loss of aggregation ``kind`` averages over (for exact micro-batch
    weighting): token -> valid tokens; seq -> rows with tokens; entropy_is -> non-empty
    (entropy group, row) pairs (see core.losses.entropy_groups)."""
    m = mask.bool()
    if kind == "token":
        return int(m.sum())
    if kind == "seq":
        return int(m.any(-1).sum())
    if kind == "entropy_is":
        n = m.sum(-1).to(torch.float64)
        k = torch.minimum(torch.ceil(n * float(top_frac) - 1e-9).clamp_min(0), n)
        return int(((k > 0).sum() + ((n - k) > 0).sum()))
    raise ValueError(kind)


# ---------------------------------------------------------------------------------- advantages
@dataclass
class Advantages:
    advantages: torch.Tensor  # [B, T] what the policy loss uses (whitened GAE, or GRPO broadcast)
    raw_advantages: torch.Tensor  # [B, T] GAE advantages before whitening (GRPO: same as above)
    returns: torch.Tensor  # [B, T] critic targets = raw GAE advantages + values
    rewards: torch.Tensor  # [B, T] shaped per-token rewards (incl. overlong shaping)
    last_values: torch.Tensor  # [B] V used after each row's last token (0 = no bootstrap)
    policy_mask: torch.Tensor  # bool [B, T] tokens in the policy loss
    critic_mask: torch.Tensor  # bool [B, T] tokens in the value loss
    outcome: torch.Tensor  # [B] outcome reward per row (NaN for incomplete)


@dataclass
class CriticTargets:
    """What a critic-only update trains toward (the T-PPO critic update's part of ``Advantages``)."""

    returns: torch.Tensor  # [B, T] value targets
    critic_mask: torch.Tensor  # bool [B, T] tokens in the value loss


def compute_advantages(values: torch.Tensor, bootstrap_values: torch.Tensor, mask: torch.Tensor,
                       endings: Sequence[str], task_rewards: torch.Tensor, group_ids: Sequence[str], *,
                       algo: AlgoConfig, r_fail: float, max_tokens: int) -> Advantages:
    """Rewards, GAE/GRPO advantages and critic returns of a packed batch (pure; no model).

    * Rewards: ``shape_rewards`` per ending (finished: task reward on the last token; absorbed:
      r_fail on the stop token and V(next) = 0; truncated: bootstrap V(s_T) or terminal per
      ``algo.truncation``; incomplete: V(s_l) := V(s_{l-1})). DAPO overlong shaping (if
      ``algo.overlong_buffer``) adds ``overlong_penalty * penalty(l)`` to the last-token reward
      of finished and truncated rows (absorbed rows already carry r_fail).
    * GAE always runs (it gives the critic's returns R = A + V). advantage="gae": the policy
      uses A (whitened over the batch if ``algo.whiten_advantages``).
    * advantage="grpo": the policy uses the group-normalised outcome (``outcome_rewards`` plus
      overlong shaping) broadcast over the row's tokens; incomplete rows have no outcome and are
      left out of the policy loss.
    * The critic is trained on every row except incomplete ones (T-PPO: the value model learns
      from finished responses only; their EGAE targets are themselves a guess).
    """
    mask = torch.as_tensor(mask).bool()
    values = torch.as_tensor(values, dtype=torch.float32)
    n_rows = mask.shape[0]
    lengths = mask.sum(-1)
    task = torch.as_tensor(task_rewards, dtype=torch.float64).reshape(n_rows)
    rewards, last = shape_rewards(lengths, list(endings), task, values.to(torch.float64),
                                  torch.as_tensor(bootstrap_values, dtype=torch.float64).reshape(n_rows),
                                  r_fail=r_fail, truncation=algo.truncation)
    ends = [Ending(e) for e in endings]
    is_inc = torch.tensor([e is Ending.INCOMPLETE for e in ends], dtype=torch.bool)
    shaped_rows = torch.tensor([e in (Ending.FINISHED, Ending.TRUNCATED) for e in ends], dtype=torch.bool)
    penalty = torch.zeros(n_rows, dtype=torch.float64)
    if algo.overlong_buffer > 0:
        penalty = algo.overlong_penalty * overlong_penalty(lengths, max_len=max_tokens,
                                                           cache_len=algo.overlong_buffer).to(torch.float64)
        penalty = torch.where(shaped_rows & (lengths > 0), penalty, torch.zeros_like(penalty))
        if rewards.shape[1] > 0:
            idx = (lengths - 1).clamp_min(0)[:, None]
            rewards = rewards.scatter_add(1, idx, penalty[:, None])
    adv, ret = gae_batched(rewards, values.to(torch.float64), mask, last, gamma=algo.gamma, lam=algo.lam)
    outcome = outcome_rewards(list(endings), task.tolist(), r_fail=r_fail)
    critic_mask = mask & ~is_inc[:, None]
    if algo.advantage == "gae":
        policy_mask = mask
        pol = masked_whiten(adv, mask) if algo.whiten_advantages else adv
        raw = adv
    elif algo.advantage == "grpo":
        policy_mask = mask & ~is_inc[:, None]
        r = torch.nan_to_num(outcome, nan=0.0) + penalty
        g = torch.zeros(n_rows, dtype=torch.float64)
        has = ~is_inc
        if bool(has.any()):
            idx = torch.nonzero(has).reshape(-1)
            g[idx] = grpo_advantages(r[idx], [group_ids[i] for i in idx.tolist()],
                                     normalize_std=algo.grpo_std).to(torch.float64)
        pol = torch.where(policy_mask, g[:, None].expand_as(adv), torch.zeros_like(adv))
        raw = pol
    else:  # pragma: no cover - the config validates it
        raise ValueError(f"unknown advantage {algo.advantage!r}")
    f32 = torch.float32
    return Advantages(
        advantages=pol.to(f32), raw_advantages=raw.to(f32), returns=ret.to(f32), rewards=rewards.to(f32),
        last_values=last.to(f32), policy_mask=policy_mask, critic_mask=critic_mask, outcome=outcome,
    )
