"""T-PPO windows (Truncated PPO, arXiv 2506.15050): how long rollouts become training rows.

Mode: ``rollout.window_tokens = W > 0``. Everything here is pure bookkeeping (numpy, the
protocol types, torch for the Monte-Carlo returns); the learner calls it (training/windows.py),
and ``PPOTrainer.train_critic_mc`` trains the critic toward those returns.

The design, end to end
----------------------

* **Sampler** (``actors/samplers/base.py``). A training rollout keeps running in its engine from
  its first to its last token, exactly as without windows (one engine request, one token stream
  to the stopper and the critic, weights hot-loaded whenever the learner publishes them, the
  policy version of every token recorded). Every time it has produced W more tokens it hands the
  learner a *segment* (``protocols.trajectory.segment_trajectory``): a ``Trajectory`` with ending ``incomplete``
  holding response tokens ``[o, o+W)`` with their log-probs and versions, whose
  ``prompt_token_ids`` are the prompt followed by response tokens ``[0, o)`` (its prefix) and
  whose ``offset`` is ``o``. When the rollout ends it sends its usual final ``Trajectory``
  (the whole response, offset 0, the real ending: finished, absorbed or truncated). Only the
  final one frees the engine slot and reports ``WorkDone``, so the coordinator issues a new
  prompt exactly when a rollout ends: the engines stay full.
* **ESPO stopping composes** unchanged: the stopper judges the one continuous stream, so a stop
  in a later window ends the rollout ``absorbed`` with ``r_fail`` on its stop token. A segment
  once handed over is committed: if a cancel names a token that already went out in a segment
  (the stopper lagged across a window boundary), the sampler moves the stop to the first token
  not yet handed over (or the last token generated, if there is none).
* **Learner** (:class:`WindowBook`, glued in ``espo_async/training/windows.py``). Each segment becomes one
  training row, queued in arrival order. The final trajectory becomes the rollout's last row:
  the response tokens not yet queued (``[q, l)``, prefix = prompt + ``[0, q)``) with the real
  ending, scored on the *whole* response's text. Nothing is trained twice: per (prompt, sample,
  attempt) the book remembers how many response tokens it queued, and a row only ever holds
  tokens beyond that (a duplicate is dropped, an overlapping segment is cut). A re-issued
  rollout (new attempt, new tokens) starts from 0; rows of an abandoned attempt are still valid
  policy data and are trained once.
* **A learner step** trains on ``prompts_per_batch * samples_per_prompt`` rows (B), the oldest
  first, finished or not. This is T-PPO's step in an asynchronous system: T-PPO generates one
  window for each of a fixed pool of rollouts, trains on what that window produced and refills
  the pool; here the pool is every rollout in flight and a step is the next B windows' worth of
  rows (each at most W tokens), so a step costs what a T-PPO step over a pool of B rollouts costs,
  and needs no global knowledge of which rollouts are alive. The policy trains on every row
  (all generated tokens) with extended GAE: an ``incomplete`` row bootstraps with
  ``V(s_l) := V(s_{l-1})`` (``core.advantages.shape_rewards``), the last row of a rollout gets
  its real ending's reward. The policy step never trains the critic.
* **The critic** trains only on complete responses, with Monte-Carlo returns
  (:func:`monte_carlo_returns`: GAE with lambda = 1, ``R_t = sum_k gamma^k r_{t+k}``), on its
  own schedule: when a rollout's last row is trained, its whole response joins a queue; at a step
  where at least ``algo.tppo_critic_rollouts`` wait, the critic trains on all of them
  (:func:`train_critic_mc`, each response once) and the step publishes the new critic.
* **Flow control, bounded memory.** The learner reports ``groups_consumed`` = ceil(rollouts whose
  last row was trained / samples_per_prompt), and the coordinator's staleness bound stays as it
  is: it starts a group only while ``groups_started < groups_consumed + (K+1) *
  prompts_per_batch``. So at most about (K+1)*B + samples_per_prompt rollouts are in flight
  (started, last row not trained), and whenever it is blocked at least (K+1)*B >= B are, each
  owing at least one row: a step can always fill, no deadlock. Queued rows are bounded by
  in-flight rollouts x max_tokens / W. Token staleness is not bounded by K in steps any more
  (a long rollout spans many versions by design; that is T-PPO); the per-token versions and the
  behaviour importance weights (``algo.behaviour_is_cap``) handle it.
* **Restarts.** The learner's checkpoint keeps, per rollout in flight, how many tokens were
  trained, which rollouts' last rows were trained in groups not yet complete, and which complete
  responses the critic has not trained on yet; its write-ahead log replays everything else.

Not modelled: T-PPO's filtering of prompt tokens out of the *critic*'s forward pass (an
efficiency detail); the coordinator never pauses a rollout between windows (the engine keeps
generating under whatever weights it has, which is what the asynchronous system is for).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

import protocols as P

if TYPE_CHECKING:  # pragma: no cover
    from espo_async.training.batch import TrainSample

Key = tuple[str, int]  # (prompt id, sample index)

__all__ = [
    "Row",
    "row_from",
    "WindowBook",
    "window_metrics",
    "monte_carlo_returns",
    "train_critic_mc",
]


# ------------------------------------------------------------------------------ learner side
@dataclass
class Row:
    """One training row of window mode: response tokens ``[offset, offset + len(token_ids))`` of
    a rollout with the prompt and response tokens ``[0, offset)`` as ``prompt_token_ids``.
    It has the attributes of a ``Trajectory`` the learner reads (it trains and measures rows the
    way it does trajectories). ``final``: the rollout's last row (``full`` = its whole response;
    it may hold no new token, e.g. a stop inside an already queued segment)."""

    request_id: str
    prompt_id: str
    sample_index: int
    group_size: int
    attempt: int
    offset: int
    prompt_token_ids: np.ndarray
    token_ids: np.ndarray
    logprobs: np.ndarray
    top1_logprobs: np.ndarray
    versions: np.ndarray
    ending: str
    text: str
    tokens_generated: int
    final: bool
    full: P.Trajectory | None = None
    stop_index: int = -1
    purpose: str = "train"

    @property
    def end(self) -> int:
        return self.offset + len(self.token_ids)


def row_from(traj: P.Trajectory, start: int, *, final: bool) -> Row:
    """The row of ``traj``'s response tokens from absolute position ``start`` on (``start`` >=
    ``traj.offset``; tokens before it were queued already and become part of the prefix)."""
    cut = min(max(start - traj.offset, 0), len(traj.token_ids))
    prefix = np.concatenate([np.asarray(traj.prompt_token_ids, np.int32), np.asarray(traj.token_ids[:cut], np.int32)])
    return Row(
        request_id=traj.request_id,
        prompt_id=traj.prompt_id,
        sample_index=traj.sample_index,
        group_size=traj.group_size,
        attempt=traj.attempt,
        offset=traj.offset + cut,
        prompt_token_ids=prefix,
        token_ids=np.asarray(traj.token_ids[cut:], np.int32),
        logprobs=np.asarray(traj.logprobs[cut:], np.float32),
        top1_logprobs=np.asarray(traj.top1_logprobs[cut:], np.float32),
        versions=np.asarray(traj.versions[cut:], np.int32),
        ending=traj.ending,
        text=traj.text if final else "",
        # the final row also carries the tokens generated after a stop (discarded by the sampler)
        tokens_generated=max(traj.tokens_generated - max(start - traj.offset, 0), 0) if final
        else len(traj.token_ids) - cut,
        final=final,
        full=traj if final else None,
        stop_index=traj.stop_index,
        purpose=traj.purpose,
    )


class WindowBook:
    """The learner's record of T-PPO segments (see the module docstring). Not thread-safe: the
    learner calls it from its event loop only."""

    def __init__(self, group_size: int, max_tokens: int) -> None:
        self.group_size = int(group_size)
        self.max_tokens = int(max_tokens)
        self.queued: dict[Key, dict[int, int]] = {}  # rollout in flight -> attempt -> tokens queued
        self.trained: dict[Key, dict[int, int]] = {}  # ... -> tokens taken into a step (checkpointed)
        self.pending_finals: set[Key] = set()  # last row queued, not yet trained
        self.done: dict[str, set[int]] = {}  # group -> samples whose last row was trained (group incomplete)
        self.finals_trained = 0
        self.queue: deque[Row] = deque()
        self.critic_pending: list[P.Trajectory] = []  # complete responses the critic has not trained on
        self.critic_wanted: set[Key] = set()  # from a checkpoint: such responses, to pick up from the log
        self.counters: Counter[str] = Counter()

    # -- intake -------------------------------------------------------------------------------
    def _finished(self, key: Key) -> bool:
        return key in self.pending_finals or key[1] in self.done.get(key[0], ())

    def accept(self, traj: P.Trajectory) -> bool:
        """Queue the new tokens of a segment or a final trajectory; False if it brings none
        (duplicate, late, or invalid: see ``counters``)."""
        key = (traj.prompt_id, traj.sample_index)
        if traj.ending == "incomplete":
            return self._accept_segment(key, traj)
        if traj.offset != 0:
            self.counters["window_invalid"] += 1
            return False
        if self._finished(key):
            self.restore_critic(traj)
            self.counters["window_duplicate_finals"] += 1
            return False
        start = self.queued.pop(key, {}).get(traj.attempt, 0)  # other attempts are abandoned
        self.pending_finals.add(key)
        self.queue.append(row_from(traj, start, final=True))
        if start >= len(traj.token_ids):
            self.counters["window_finals_without_new_tokens"] += 1  # the critic still learns from it
        return True

    def _accept_segment(self, key: Key, traj: P.Trajectory) -> bool:
        n = len(traj.token_ids)
        end = traj.offset + n
        if n == 0 or end > self.max_tokens:
            self.counters["window_invalid"] += 1
            return False
        if self._finished(key):
            self.counters["window_segments_after_final"] += 1
            return False
        attempts = self.queued.setdefault(key, {})
        start = attempts.get(traj.attempt, 0)
        if end <= start:
            self.counters["window_duplicate_segments"] += 1
            return False
        if traj.offset > start:
            self.counters["window_gaps"] += 1  # a segment was lost; this one carries its own prefix
        attempts[traj.attempt] = end
        self.queue.append(row_from(traj, start, final=False))
        return True

    def restore_critic(self, traj: P.Trajectory) -> None:
        """A replayed final trajectory whose response the critic had not trained on yet."""
        key = (traj.prompt_id, traj.sample_index)
        if traj.ending != "incomplete" and key in self.critic_wanted:
            self.critic_wanted.discard(key)
            self.critic_pending.append(traj)

    # -- a step -------------------------------------------------------------------------------
    def take(self, n: int) -> tuple[list[Row], list[str]]:
        """The oldest ``n`` rows (fewer if fewer wait) and the prompt groups whose every rollout
        has now had its last row taken."""
        rows = [self.queue.popleft() for _ in range(min(n, len(self.queue)))]
        completed: list[str] = []
        for row in rows:
            key = (row.prompt_id, row.sample_index)
            if not row.final:
                t = self.trained.setdefault(key, {})
                t[row.attempt] = max(t.get(row.attempt, 0), row.end)
                continue
            self.pending_finals.discard(key)
            self.trained.pop(key, None)
            self.queued.pop(key, None)
            done = self.done.setdefault(row.prompt_id, set())
            done.add(row.sample_index)
            self.finals_trained += 1
            if row.full is not None:
                self.critic_pending.append(row.full)
            if len(done) >= self.group_size:
                completed.append(row.prompt_id)
                del self.done[row.prompt_id]
        return rows, completed

    def take_critic(self, min_rollouts: int) -> list[P.Trajectory]:
        """Every complete response waiting for the critic, once at least ``min_rollouts`` wait."""
        if len(self.critic_pending) < max(int(min_rollouts), 1):
            return []
        out, self.critic_pending = self.critic_pending, []
        return out

    @property
    def groups_consumed(self) -> int:
        """Group equivalents consumed: ceil(rollouts whose last row was trained / group size)."""
        return -(-self.finals_trained // self.group_size)

    @property
    def in_flight(self) -> int:
        return len(self.queued) + len(self.pending_finals)

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "trained": [[p, s, a, n] for (p, s), att in sorted(self.trained.items()) for a, n in sorted(att.items())],
            "done": {g: sorted(s) for g, s in sorted(self.done.items())},
            "finals_trained": self.finals_trained,
            "critic_pending": sorted({(t.prompt_id, t.sample_index) for t in self.critic_pending} | self.critic_wanted),
        }

    def load_state_dict(self, d: dict) -> None:
        self.trained = {}
        for p, s, a, n in d.get("trained", []):
            self.trained.setdefault((str(p), int(s)), {})[int(a)] = int(n)
        self.queued = {k: dict(v) for k, v in self.trained.items()}  # the log replays the rest
        self.done = {str(g): {int(x) for x in s} for g, s in d.get("done", {}).items()}
        self.finals_trained = int(d.get("finals_trained", 0))
        self.critic_wanted = {(str(p), int(s)) for p, s in d.get("critic_pending", [])}
        self.critic_pending = []
        self.pending_finals = set()
        self.queue.clear()


def window_metrics(rows: Sequence[Row], rewards: Sequence[float], *, r_fail: float, max_tokens: int) -> dict[str, float]:
    """Per-step metrics of window mode. Rollout outcomes (stop rate, accuracy, reward, lengths)
    are over the rollouts that ended in this step (their last rows); ``controller_stop_rate`` is
    NaN when none did (the beta controller then keeps beta)."""
    nan = float("nan")
    finals = [(r, float(x)) for r, x in zip(rows, rewards) if r.final]
    out: dict[str, float] = {
        "window_rows": float(len(rows)),
        "window_incomplete_rows": float(sum(not r.final for r in rows)),
        "window_finals": float(len(finals)),
        "window_row_tokens": float(np.mean([len(r.token_ids) for r in rows])) if rows else 0.0,
    }
    if not finals:
        out.update(stop_rate=0.0, controller_stop_rate=nan, finished_rate=nan, truncated_rate=nan, accuracy=nan,
                   reward=nan, mean_length=nan, tokens_saved_est=0.0)
        return out
    n = len(finals)
    endings = [r.ending for r, _ in finals]
    lengths = [len(r.full.token_ids) if r.full is not None else r.end for r, _ in finals]
    absorbed = [r for r, _ in finals if r.ending == "absorbed"]
    others = [x for (r, _), x in zip(finals, lengths) if r.ending != "absorbed"]
    counterfactual = float(np.mean(others)) if others else float(max_tokens)
    generated = [r.full.tokens_generated if r.full is not None else r.end for r in absorbed]
    stop_rate = len(absorbed) / n
    out.update(
        stop_rate=stop_rate,
        controller_stop_rate=stop_rate,
        finished_rate=endings.count("finished") / n,
        truncated_rate=endings.count("truncated") / n,
        accuracy=float(np.mean([x for _, x in finals])),
        reward=float(np.mean([r_fail if r.ending == "absorbed" else x for r, x in finals])),
        mean_length=float(np.mean(lengths)),
        tokens_saved_est=float(sum(max(0.0, counterfactual - g) for g in generated)),
    )
    return out


# ------------------------------------------------------------------------------------ critic
def monte_carlo_returns(values, bootstrap_values, mask, endings: Sequence[str], task_rewards, *, gamma: float,
                        r_fail: float, truncation: str = "bootstrap"):
    """Monte-Carlo returns ``R_t = sum_k gamma^k r_{t+k}`` of complete responses (rewards per
    ending as in ``shape_rewards``; a truncated response in ``bootstrap`` mode adds
    ``gamma^(l-t) V(s_l)``). This is GAE with lambda = 1, whose returns do not depend on V."""
    import torch

    from espo_async.core.advantages import gae_batched, shape_rewards

    if any(str(e) == "incomplete" for e in endings):
        raise ValueError("Monte-Carlo returns need complete responses (no 'incomplete' rows)")
    mask = torch.as_tensor(mask).bool()
    values = torch.as_tensor(values, dtype=torch.float64)
    rewards, last = shape_rewards(mask.sum(-1), list(endings), torch.as_tensor(task_rewards, dtype=torch.float64),
                                  values, torch.as_tensor(bootstrap_values, dtype=torch.float64),
                                  r_fail=r_fail, truncation=truncation)
    _, ret = gae_batched(rewards, values, mask, last, gamma=gamma, lam=1.0)
    return ret


def train_critic_mc(trainer, samples: list[TrainSample]) -> dict[str, float]:
    """The T-PPO critic update: ``PPOTrainer.train_critic_mc`` (the trainer owns its optimiser
    steps; the returns are ``monte_carlo_returns`` above)."""
    return trainer.train_critic_mc(samples)
