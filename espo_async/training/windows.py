"""The learner's T-PPO window mode (``rollout.window_tokens`` > 0): glue between the ``Learner``
actor and the pure bookkeeping of ``espo_async/training/tppo.py`` (whose docstring explains the
design). The learner calls it at a few points: intake, taking a batch, the training step (policy
on the rows, then the critic on complete responses), metrics and checkpoints.

It writes ``learner/window_rows.jsonl``: one line per learner step listing the rows it trained
(prompt id, sample, attempt, first and end response position, ending, last row or not), which
is what shows that no token was trained twice.

What it reads and updates of the learner is the ``WindowHost`` protocol below (the ``Learner``
actor satisfies it), so this module does not import the actor.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import protocols as P
from espo_async.training.tppo import Row, WindowBook, window_metrics

if TYPE_CHECKING:  # pragma: no cover
    from espo_async.config import Config
    from espo_async.runtime.trajectory_log import TrajectoryLog
    from espo_async.training.trainer import PPOTrainer


class WindowHost(Protocol):
    """The learner as the window mode sees it."""

    cfg: Config
    run_dir: Path
    step: int  # the last finished learner step
    trainer: PPOTrainer
    reward: Callable[[str, str], float]  # (prompt id, text) -> task reward
    consumed_groups: set[str]  # groups trained (read and extended here)
    counters: Counter  # the learner's heartbeat counters (updated here)
    ready_event: asyncio.Event  # set when a batch waits
    wal: TrajectoryLog  # the write-ahead log of received trajectories


class WindowLearning:
    def __init__(self, learner: WindowHost) -> None:
        self.learner = learner
        self.cfg = learner.cfg
        r = self.cfg.rollout
        self.book = WindowBook(group_size=r.samples_per_prompt, max_tokens=r.max_tokens)
        self.batch_rows = r.prompts_per_batch * r.samples_per_prompt
        self.critic_batch: list[P.Trajectory] = []
        self.rows_log = learner.run_dir / "learner" / "window_rows.jsonl"
        self.rows_log.parent.mkdir(parents=True, exist_ok=True)

    # -- intake (event loop) ---------------------------------------------------------------------
    def accept(self, traj: P.Trajectory, *, log: bool) -> bool:
        """A training trajectory (segment or final): queue its new tokens, log it, wake the
        step when a batch of rows waits."""
        L = self.learner
        if traj.prompt_id in L.consumed_groups:
            self.book.restore_critic(traj)
            L.counters["duplicates"] += 1
            return False
        if not self.book.accept(traj):  # duplicate, late or invalid: the book counts why
            self._sync_counters()
            return False
        if log:
            L.wal.append(traj)
        L.counters["received"] += 1
        L.counters["window_segments" if traj.ending == "incomplete" else "window_final_trajectories"] += 1
        self._sync_counters()
        if len(self.book.queue) >= self.batch_rows:
            L.ready_event.set()
        return True

    def _sync_counters(self) -> None:
        for k, v in self.book.counters.items():
            self.learner.counters[k] = v

    async def take_batch(self) -> list[Row]:
        """The next step's rows: the oldest B = prompts_per_batch x samples_per_prompt."""
        L = self.learner
        while len(self.book.queue) < self.batch_rows:
            L.ready_event.clear()
            await L.ready_event.wait()
        rows, completed = self.book.take(self.batch_rows)
        L.consumed_groups.update(completed)
        self.critic_batch = self.book.take_critic(self.cfg.algo.tppo_critic_rollouts)
        step = L.step + 1
        with self.rows_log.open("a") as f:
            f.write(json.dumps({"step": step, "rows": [[r.prompt_id, r.sample_index, r.attempt, r.offset, r.end,
                                                        r.ending, r.final] for r in rows]}) + "\n")
        return rows

    # -- the step (worker thread, under the trainer lock) -------------------------------------
    def train_step(self, samples, *, step: int, learner_version: int) -> dict[str, float]:
        """Policy on every row (the trainer leaves the critic alone in window mode), then the
        critic on the complete responses due at this step (Monte-Carlo returns)."""
        from espo_async.training.trainer import TrainSample

        trainer = self.learner.trainer
        metrics = trainer.train_step(samples, step=step, learner_version=learner_version)
        full = self.critic_batch
        self.critic_batch = []
        if full:
            reward = self.learner.reward
            critic = trainer.train_critic_mc([
                TrainSample(prompt_ids=t.prompt_token_ids, response_ids=t.token_ids, behaviour_logprobs=t.logprobs,
                            versions=t.versions, ending=t.ending, task_reward=reward(t.prompt_id, t.text),
                            group_id=t.prompt_id)
                for t in full
            ])
            metrics.update(critic)
        metrics["critic_rollouts"] = float(metrics.get("critic_rollouts", 0.0))
        return {k: float(v) for k, v in metrics.items()}

    # -- metrics, accounting, checkpoints -------------------------------------------------------
    def metrics(self, rows: list[Row], rewards: list[float]) -> dict[str, float]:
        out = window_metrics(rows, rewards, r_fail=self.cfg.stop.r_fail, max_tokens=self.cfg.rollout.max_tokens)
        out.update(
            window_queue=float(len(self.book.queue)),
            window_in_flight=float(self.book.in_flight),
            window_critic_waiting=float(len(self.book.critic_pending)),
            window_finals_trained=float(self.book.finals_trained),
        )
        return out

    @property
    def groups_consumed(self) -> int:
        return self.book.groups_consumed

    def state_dict(self) -> dict:
        return self.book.state_dict()

    def load_state_dict(self, d: dict | None) -> None:
        self.book.load_state_dict(d or {})

