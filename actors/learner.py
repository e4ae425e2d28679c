"""The learner: pulls trajectories, trains PPO on complete prompt groups, publishes new weights.

* Every received trajectory is deduplicated by (prompt id, sample) and appended to a
  write-ahead log before anything else, so a crash loses nothing it received; a restart replays
  the log and trains on whatever the last checkpoint had not consumed.
* A batch is ``prompts_per_batch`` complete groups, in completion order. The training step runs
  in a worker thread (the event loop keeps receiving meanwhile).
* It owns the stop controller (normaliser, beta, warm-up gate): after each step it updates it
  from the batch just trained on and broadcasts the frozen snapshot for the next rollouts.
* After each step it writes the new policy (and critic) weights and announces them; announces
  are repeated periodically so actors that (re)join late catch up.
* One JSON line of metrics per step (metrics.jsonl) and TensorBoard events.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

import protocols as P
from espo_async.assets import load_assets
from espo_async.core.regret import surrogate_regret
from espo_async.eval_stats import accuracy_se, paired_difference, per_problem_means
from espo_async.ids import problem_id_of, tag_ok
from espo_async.runtime.actor import Actor
from espo_async.runtime.keys import run_key
from espo_async.runtime.metrics import MetricsWriter
from espo_async.runtime.trajectory_log import TrajectoryLog, replay
from espo_async.stop_state import make_stop_controller, params_from_snapshot
from espo_async.tasks.registry import make_task
from espo_async.tasks.reward import TaskReward
from espo_async.training.windows import WindowLearning
from espo_async.weights import make_publisher
from protocols.messages import Received


@dataclass
class EvalRound:
    request: P.EvalRequest
    expected: int
    scores: dict[tuple[str, int], float] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    finished: int = 0
    versions: set[int] = field(default_factory=set)  # the policy versions that sampled its tokens
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Group:
    size: int
    members: dict[int, P.Trajectory] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.members) == self.size


def batch_regrets(trajs: list[P.Trajectory]) -> np.ndarray:
    """g_t = top1 - sampled logprob over every token of the batch (finite values only)."""
    if not trajs:
        return np.zeros(0)
    lp = np.concatenate([np.asarray(t.logprobs, np.float64) for t in trajs])
    top1 = np.concatenate([np.asarray(t.top1_logprobs, np.float64) for t in trajs])
    ok = np.isfinite(lp) & np.isfinite(top1)
    return surrogate_regret(lp[ok], top1[ok])


class Learner(Actor):
    ROLE = "learner"

    async def setup(self) -> None:
        t = self.transport
        self.results = t.socket(zmq.PULL, "results", bind=True)
        self.pub = t.socket(zmq.PUB, "broadcast", bind=True, hwm=10_000)
        self.assets = load_assets(self.run_dir)
        self.task = make_task(self.cfg.task.name, **self.cfg.task.options)
        self.reward = TaskReward(self.task)
        self.controller = make_stop_controller(self.cfg)
        self.step = 0
        self.version = 0
        self.groups_consumed = 0
        self.cumulative_tokens = 0
        self.consumed_groups: set[str] = set()
        self.seen: set[tuple[str, int]] = set()
        self.groups: dict[str, Group] = {}
        self.ready: deque[str] = deque()
        self.ready_event = asyncio.Event()
        self.last_boundary: P.BatchBoundary | None = None
        self.evals: dict[int, EvalRound] = {}  # by round (= the learner step it evaluates)
        self.shadow_scores: list[float] = []  # shadow continuations scored since the last step
        self.last_weights: dict[str, P.WeightsAnnounced] = {}
        self.trainer_lock = threading.Lock()
        self.publisher = make_publisher(self.cfg, self.run_dir)  # the weight transfer (espo_async/weights/)
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.key = run_key(self.run_dir)  # work tags: only work the coordinator issued is taken
        # T-PPO windows: rows are segments of rollouts (espo_async/training/windows.py, espo_async/training/tppo.py)
        self.windows = WindowLearning(self) if self.cfg.rollout.window_tokens > 0 else None
        # This process's id on the broadcast: peers see a restart (the version may go back).
        self.epoch = f"{os.getpid():x}-{time.time_ns():x}"
        self.trainer = await asyncio.to_thread(self._make_trainer)
        await asyncio.to_thread(self._load_checkpoint)
        self._replay_log()
        await asyncio.to_thread(self._publish_weights)  # v0 gives the critic its initial head
        self.wal = TrajectoryLog(self.run_dir / "learner" / "trajectories.log")
        self.metrics = MetricsWriter(self.run_dir, tensorboard=self.cfg.run.tensorboard)
        self.last_step_time = time.time()
        self.last_metrics: dict[str, float] = {}

    def _make_trainer(self):
        """The trainer; with ``deepspeed.world_size`` > 1 (or under a launcher) this process is rank
        0 of a data-parallel group whose other ranks follow its every trainer call
        (espo_async/training/data_parallel.py); nothing else here changes."""
        import torch

        from espo_async.training.data_parallel import make_trainer

        device = self.cfg.model.learner_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return make_trainer(
            self.cfg,
            self.assets.policy_dir,
            self.assets.critic_dir,
            critic_from_policy=self.assets.critic_from_policy,
            work_dir=self.run_dir / "learner",
            device=device,
            micro_batch_tokens=self.cfg.algo.micro_batch_tokens,
            gradient_checkpointing=self.cfg.algo.gradient_checkpointing,
            log_dir=self.run_dir / "logs",
        )

    def heartbeat_counters(self) -> dict[str, float]:
        out = super().heartbeat_counters()
        out.update(step=float(self.step), total_steps=float(self.cfg.run.total_steps), policy_version=float(self.version))
        for key in ("reward", "accuracy", "stop_rate", "beta", "tokens_per_s"):
            if key in self.last_metrics:
                out[key] = float(self.last_metrics[key])
        out["buffered_groups"] = float(len(self.groups))
        out["eval_pending"] = float(sum(not r.done.is_set() for r in self.evals.values()))
        out["eval_scored"] = float(sum(len(r.scores) for r in self.evals.values()))
        return out

    # -- resume ------------------------------------------------------------------------------

    def _checkpoint_to_load(self) -> tuple[Path, dict] | None:
        """The newest complete checkpoint. ``_save_checkpoint`` swaps folders by renames; a kill
        between them leaves the new one in checkpoint.tmp (complete once its state file parses)
        or only the previous one in checkpoint.old."""
        for folder in (self.ckpt_dir, self.run_dir / "checkpoint.tmp", self.run_dir / "checkpoint.old"):
            try:
                state = json.loads((folder / "learner_state.json").read_text())
            except (OSError, ValueError):
                continue
            if folder != self.ckpt_dir:
                self.log.warning("no complete checkpoint/ (killed while saving?): resuming from %s", folder)
            return folder, state
        return None

    def _load_checkpoint(self) -> bool:
        """Load the last checkpoint, if any (worker thread: no event-loop objects touched)."""
        found = self._checkpoint_to_load()
        if found is None:
            return False
        folder, state = found
        self.trainer.load_checkpoint(folder / "trainer")
        self.controller.load_state_dict(state["controller"])
        self.step = state["step"]
        self.version = state["version"]
        self.groups_consumed = state["groups_consumed"]
        self.cumulative_tokens = state["cumulative_tokens"]
        self.consumed_groups = set(state["consumed_groups"])
        if self.windows is not None:
            self.windows.load_state_dict(state.get("windows"))
        self.log.info("resumed from step %d (policy version %d)", self.step, self.version)
        return True

    def _replay_log(self) -> None:
        """Received-but-untrained trajectories come back from the write-ahead log."""
        replayed = sum(self._accept(t, log=False) for t in replay(self.run_dir / "learner" / "trajectories.log"))
        if replayed:
            self.log.info("replayed %d received-but-untrained trajectories from the log", replayed)

    def _save_checkpoint(self) -> None:
        with self.trainer_lock:
            tmp = self.run_dir / "checkpoint.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.trainer.save_checkpoint(tmp / "trainer")
            state = {
                "step": self.step,
                "version": self.version,
                "groups_consumed": self.groups_consumed,
                "cumulative_tokens": self.cumulative_tokens,
                "consumed_groups": sorted(self.consumed_groups),
                "controller": self.controller.state_dict(),
                "windows": self.windows.state_dict() if self.windows is not None else None,
            }
            (tmp / "learner_state.json").write_text(json.dumps(state))
            old = self.run_dir / "checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.ckpt_dir.exists():
                self.ckpt_dir.rename(old)
            tmp.rename(self.ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)

    # -- intake ------------------------------------------------------------------------------

    def _accept(self, traj: P.Trajectory, *, log: bool = True) -> bool:
        if traj.purpose == "eval":
            self._accept_eval(traj)
            return False
        if traj.purpose == "shadow":
            self._accept_shadow(traj)
            return False
        if traj.purpose != "train":
            self.counters["unexpected_purpose"] += 1
            return False
        if self.windows is not None:
            return self.windows.accept(traj, log=log)
        key = (traj.prompt_id, traj.sample_index)
        if key in self.seen or traj.prompt_id in self.consumed_groups:
            self.counters["duplicates"] += 1
            return False
        self.seen.add(key)
        if log:
            self.wal.append(traj)
        group = self.groups.setdefault(traj.prompt_id, Group(traj.group_size))
        group.members[traj.sample_index] = traj
        # Bounded by the staleness bound: at most (K + 1) batches of groups are ever in flight.
        self.counters["max_buffered_groups"] = max(self.counters["max_buffered_groups"], len(self.groups))
        if group.complete:
            self.ready.append(traj.prompt_id)
            self.ready_event.set()
        self.counters["received"] += 1
        return True

    def _accept_shadow(self, traj: P.Trajectory) -> None:
        """A stopped rollout continued as if it had not been stopped: would it have been right?"""
        score = self.reward(traj.prompt_id, traj.text)
        self.shadow_scores.append(score)
        self.counters["shadow_received"] += 1
        with (self.run_dir / "shadow.jsonl").open("a") as f:
            f.write(json.dumps({"step": self.step, "prompt_id": traj.prompt_id, "sample": traj.sample_index,
                                "score": score, "tokens": len(traj.token_ids), "ending": traj.ending}) + "\n")

    # -- evaluation ----------------------------------------------------------------------------

    def _request_eval(self) -> EvalRound | None:
        """Ask for an evaluation of the current policy (round id = current step)."""
        t = self.cfg.task
        n = min(t.eval_problems, len(self.task.eval_problems()))
        if n == 0 or self.step in self.evals:
            return None
        req = P.EvalRequest(
            round=self.step,
            policy_version=self.version,
            n_problems=n,
            samples=t.eval_samples,
            temperature=t.eval_temperature,
            max_tokens=self.cfg.rollout.max_tokens,
        )
        self.evals[self.step] = rnd = EvalRound(req, expected=n * t.eval_samples)
        self._announce()
        return rnd

    def _accept_eval(self, traj: P.Trajectory) -> None:
        head = traj.prompt_id.partition("/")[0]
        digits = head[1:]  # ASCII digits only, and few: int() of "e²" or of 5,000 digits raises
        rnd = self.evals.get(int(digits)) if 0 < len(digits) <= 18 and digits.isascii() and digits.isdigit() else None
        key = (traj.prompt_id, traj.sample_index)
        if rnd is None:
            self.counters["eval_unexpected"] += 1
            return
        if key in rnd.scores:  # issued again (a restarted coordinator, a stall): scored once
            self.counters["eval_duplicates"] += 1
            return
        rnd.scores[key] = score = self.reward(traj.prompt_id, traj.text)
        with (self.run_dir / "eval_samples.jsonl").open("a") as f:
            f.write(json.dumps({"round": rnd.request.round, "prompt_id": traj.prompt_id, "sample": traj.sample_index,
                                "text": traj.text, "score": score, "ending": traj.ending,
                                "versions": sorted(set(traj.versions.tolist())),
                                "token_ids": traj.token_ids.tolist()}) + "\n")
        rnd.lengths.append(len(traj.token_ids))
        rnd.finished += traj.ending == "finished"
        rnd.versions.update(int(v) for v in np.unique(traj.versions))
        if len(rnd.scores) == rnd.expected:
            result = self._eval_result(rnd)
            with (self.run_dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
            self.metrics.write_scalars(rnd.request.round, {"eval/accuracy": result["accuracy"]})
            self.log.info("evaluation round %d: accuracy %.3f", rnd.request.round, result["accuracy"])
            rnd.done.set()

    def _eval_result(self, rnd: EvalRound) -> dict:
        n = len(rnd.scores)
        _, se = accuracy_se(rnd.scores)
        return {
            "round": rnd.request.round,
            "step": rnd.request.round,
            "policy_version": rnd.request.policy_version,
            "accuracy": sum(rnd.scores.values()) / max(n, 1),
            "accuracy_se": se,  # over problems (espo_async/eval_stats.py)
            # keyed by the problem (prompt ids are e<round>/<problem>), so rounds pair up
            "per_problem": per_problem_means((problem_id_of(pid), s) for (pid, _), s in rnd.scores.items()),
            "n": n,
            "problems": rnd.request.n_problems,
            "samples": rnd.request.samples,
            "temperature": rnd.request.temperature,
            "mean_length": float(np.mean(rnd.lengths)) if rnd.lengths else 0.0,
            "finished_rate": rnd.finished / max(n, 1),
            # [first, last] policy version that sampled the round: a round asked for at step s while
            # training goes on is a mix of versions s.. (the start-policy round is not: see main)
            "sampled_versions": [min(rnd.versions), max(rnd.versions)] if rnd.versions else [],
        }

    async def _intake_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.results, "samplers")
            if isinstance(msg, P.Trajectory):
                with self.guard("trajectory"):
                    problem = self._invalid(msg)
                    if problem is not None:
                        self.counters["rejected_trajectories"] += 1
                        self.log.warning("rejected trajectory %r: %s", msg.request_id[:200], problem)
                        continue
                    self._accept(msg)
                    # Written down (or already held): the coordinator may forget the request.
                    # (A T-PPO segment is not the request's end: only its final trajectory is.)
                    if msg.ending != "incomplete":
                        self.transport.try_send(self.pub, Received(request_ids=[msg.request_id], epoch=self.epoch))
            elif msg is not None:
                self.counters["unexpected_messages"] += 1

    def _invalid(self, traj: P.Trajectory) -> str | None:
        """Why a decodable trajectory cannot be taken (it must never reach the log): its tag does
        not prove that this run's coordinator issued its work, or it is impossible to train on."""
        r = self.cfg.rollout
        prompt_len = len(traj.prompt_token_ids) - traj.offset  # a T-PPO segment's prefix holds response tokens
        if prompt_len > r.max_prompt_tokens:
            return f"{prompt_len} prompt tokens > rollout.max_prompt_tokens {r.max_prompt_tokens}"
        if len(traj.token_ids) > r.max_tokens:  # every purpose: evaluation asks for rollout.max_tokens too
            return f"{len(traj.token_ids)} tokens > rollout.max_tokens {r.max_tokens}"
        shadow = traj.purpose == "shadow"  # a stopped training rollout's continuation: its work's tag
        rid = traj.request_id.removesuffix("~shadow") if shadow else traj.request_id
        if (shadow and rid == traj.request_id) or not tag_ok(
            self.key, traj.tag, request_id=rid, prompt_id=traj.prompt_id, sample_index=traj.sample_index,
            group_size=traj.group_size, attempt=traj.attempt, purpose="train" if shadow else traj.purpose,
            prompt_token_ids=traj.prompt_token_ids[:prompt_len],
        ):
            self.counters["unissued_trajectories"] += 1
            return "not work this run's coordinator issued (its tag does not match)"
        if traj.purpose != "train":
            return None
        if not 0 <= traj.sample_index < traj.group_size:
            return f"sample_index {traj.sample_index} not in [0, {traj.group_size})"
        if traj.group_size != self.cfg.rollout.samples_per_prompt:
            return f"group_size {traj.group_size} != rollout.samples_per_prompt {self.cfg.rollout.samples_per_prompt}"
        vocab = self.trainer.vocab_size
        for name in ("token_ids", "prompt_token_ids"):
            ids = getattr(traj, name)
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                return f"{name} outside the vocabulary [0, {vocab})"
        bad = int((~np.isfinite(traj.logprobs)).sum())
        if bad:  # the trainer masks them (importance weight 1); count, do not reject
            self.counters["non_finite_logprobs"] += bad
        return None

    async def _rebroadcast_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.transport.heartbeat_interval_s)  # periodic re-announce
            self._announce()

    def _announce(self) -> None:
        for msg in self.last_weights.values():
            self.transport.try_send(self.pub, msg)
        if self.last_boundary is not None:
            self.transport.try_send(self.pub, self.last_boundary)
        for rnd in self.evals.values():  # until its result is in: a restarted coordinator must hear it again
            if not rnd.done.is_set():
                self.transport.try_send(self.pub, rnd.request)

    # -- training ----------------------------------------------------------------------------

    async def _take_batch(self) -> list[P.Trajectory]:
        if self.windows is not None:  # T-PPO: the oldest B rows (segments), finished or not
            return await self.windows.take_batch()
        need = self.cfg.rollout.prompts_per_batch
        while len(self.ready) < need:
            self.ready_event.clear()
            await self.ready_event.wait()
        batch: list[P.Trajectory] = []
        for _ in range(need):
            gid = self.ready.popleft()
            group = self.groups.pop(gid)
            self.consumed_groups.add(gid)
            batch.extend(group.members[i] for i in sorted(group.members))
        return batch

    async def main(self) -> None:
        await self.started.wait()
        intake = asyncio.create_task(self._intake_loop())
        rebroadcast = asyncio.create_task(self._rebroadcast_loop())
        self._close_batch(None, {})
        self._announce()
        start_eval = self._request_eval()  # the policy before training (or at the resumed step)
        if start_eval is not None:
            # Train only once it is sampled. Otherwise the first step's weights reach the engine
            # while most of its samples are still to come, and "before" is mostly version 1 (seen:
            # 440 of 512 samples of the round). Its samples go ahead of training work anyway, so
            # this costs the run about one round's sampling time, once.
            await start_eval.done.wait()
        try:
            while self.step < self.cfg.run.total_steps:
                batch = await self._take_batch()
                # Once its batch is taken (its groups counted as consumed), a step runs to its end
                # even if the run is stopped meanwhile (SIGTERM cancels main): teardown waits for
                # it, so a checkpoint never holds a batch's groups without the step trained on them.
                self._step_task = asyncio.ensure_future(self._train(batch))
                await asyncio.shield(self._step_task)
                every = self.cfg.task.eval_every
                if every and self.step % every == 0 and self.step < self.cfg.run.total_steps:
                    self._request_eval()
            self._request_eval()  # the final policy
            pending = [r.done.wait() for r in self.evals.values() if not r.done.is_set()]
            if pending:
                self.log.info("waiting for %d evaluation round(s)", len(pending))
                await asyncio.gather(*pending)
            await asyncio.to_thread(self._finish_run)
            # Every actor and every host's supervisor hears that training is over (hosts without
            # the learner end their runs on it: docs/cluster.md). Repeated over 0.4 s, not in one
            # instant: PUB/SUB drops what a subscriber reconnecting just then (a loaded host, a TCP
            # or CURVE re-handshake; ZeroMQ retries every 0.1 s) cannot take.
            await self._say_finished()
            # Returning ends this process with code 0; the supervisor then stops everyone else.
        finally:
            intake.cancel()
            rebroadcast.cancel()

    async def _say_finished(self, times: int = 3) -> None:
        """The end-of-training ``Shutdown``, ``times`` times, 0.2 s apart (at most one heartbeat
        interval): longer than ZeroMQ's 0.1 s reconnect interval."""
        for i in range(times):
            if i:
                await asyncio.sleep(min(0.2, self.cfg.transport.heartbeat_interval_s))
            self.transport.try_send(self.pub, P.Shutdown(reason="training finished", source="learner"))

    async def _train(self, batch: list[P.Trajectory]) -> None:
        from espo_async.training.trainer import TrainSample

        rewards = [self.reward(t.prompt_id, t.text) for t in batch]
        samples = [
            TrainSample(
                prompt_ids=t.prompt_token_ids,
                response_ids=t.token_ids,
                behaviour_logprobs=t.logprobs,
                versions=t.versions,
                ending=t.ending,
                task_reward=r,
                group_id=t.prompt_id,
            )
            for t, r in zip(batch, rewards)
        ]
        step = self.step + 1
        t0 = time.time()
        with_lock = self._locked(self.windows.train_step if self.windows is not None else self.trainer.train_step)
        train_metrics = await asyncio.to_thread(with_lock, samples, step=step, learner_version=self.version)
        step_end_time = time.time()
        train_seconds = step_end_time - t0
        self.step = step
        self.version += 1
        if self.windows is not None:  # T-PPO: ceil(rollouts ended and trained / samples_per_prompt)
            self.groups_consumed = self.windows.groups_consumed
        else:
            self.groups_consumed += self.cfg.rollout.prompts_per_batch
        await asyncio.to_thread(self._publish_weights, asyncio.get_running_loop())
        self._announce()
        metrics = self._batch_metrics(batch, rewards)
        if self.windows is not None:  # rollout outcomes over the rollouts that ended in this step
            metrics.update(self.windows.metrics(batch, rewards))
        metrics.update(train_metrics)
        if self.shadow_scores:  # false-positive stops: stopped rollouts that would have been correct
            metrics["shadow_n"] = float(len(self.shadow_scores))
            metrics["false_positive_rate"] = float(np.mean(self.shadow_scores))
            self.shadow_scores.clear()
        metrics["train_seconds"] = train_seconds
        metrics["step_end_time"] = step_end_time  # weight-sync latency is measured from here
        self._close_batch(batch, metrics)
        self._record_trained(step, batch)
        self.metrics.write(step, metrics)  # on disk before anyone hears that the step ended
        self._announce()
        self.last_metrics = metrics
        every = self.cfg.run.checkpoint_every
        if every and step % every == 0 and step < self.cfg.run.total_steps:
            await asyncio.to_thread(self._save_checkpoint)

    def _record_trained(self, step: int, batch: list[P.Trajectory]) -> None:
        """RUN/trained.jsonl: per step, the (prompt id, sample index, attempt) of every row trained
        on (T-PPO: and the segment's offset). A restarted learner trains the steps after its
        checkpoint again: the last line of a step is the one that counts."""
        rows = [[t.prompt_id, t.sample_index, t.attempt] + ([t.offset] if self.windows is not None else [])
                for t in batch]
        with (self.run_dir / "trained.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "epoch": self.epoch, "time": time.time(), "samples": rows}) + "\n")

    def _locked(self, fn):
        def call(*args, **kwargs):
            with self.trainer_lock:
                return fn(*args, **kwargs)

        return call

    def _batch_metrics(self, batch: list[P.Trajectory], rewards: list[float]) -> dict[str, float]:
        n = len(batch)
        endings = [t.ending for t in batch]
        absorbed = [t for t in batch if t.ending == "absorbed"]
        others = [len(t.token_ids) for t in batch if t.ending != "absorbed"]
        generated = sum(t.tokens_generated for t in batch)
        kept = sum(len(t.token_ids) for t in batch)
        # Tokens saved by stopping (estimate): an absorbed rollout would have run as long as the
        # batch's other rollouts do on average (max_tokens if every rollout was stopped).
        counterfactual = float(np.mean(others)) if others else float(self.cfg.rollout.max_tokens)
        saved = sum(max(0.0, counterfactual - t.tokens_generated) for t in absorbed)
        self.cumulative_tokens += generated
        now = time.time()
        elapsed = max(now - self.last_step_time, 1e-9)
        self.last_step_time = now
        snap = self.controller.snapshot()
        outcome = [
            self.cfg.stop.r_fail if t.ending == "absorbed" else r for t, r in zip(batch, rewards)
        ]
        staleness = [self.version - 1 - int(np.min(t.versions)) for t in batch if len(t.versions)]
        return {
            "reward": float(np.mean(outcome)),
            "accuracy": float(np.mean(rewards)),
            "stop_rate": len(absorbed) / n,
            "finished_rate": endings.count("finished") / n,
            "truncated_rate": endings.count("truncated") / n,
            "tokens_generated": float(generated),
            "tokens_kept": float(kept),
            "tokens_after_stop": float(sum(t.tokens_generated - len(t.token_ids) for t in absorbed)),
            "tokens_saved_est": float(saved),
            "cumulative_tokens": float(self.cumulative_tokens),
            "mean_length": kept / n,
            "tokens_per_s": generated / elapsed,
            "samples_per_s": n / elapsed,
            "beta": float(snap.beta),
            "norm_mu": float(snap.mu),
            "norm_var": float(snap.var),
            "stopping_enabled": float(snap.enabled),
            "staleness_max": float(max(staleness, default=0)),
            "policy_version": float(self.version),
        }

    def _close_batch(self, batch: list[P.Trajectory] | None, metrics: dict[str, float]) -> None:
        """The batch boundary: the stop controller's update (its next state goes into ``metrics``)
        and the BatchBoundary message the next ``_announce`` broadcasts."""
        if batch is None:
            snap = self.controller.snapshot()
            regrets = np.zeros(0)
            stop_rate = 0.0
        else:
            regrets = batch_regrets(batch)
            stop_rate = metrics.get("controller_stop_rate", metrics["stop_rate"])  # T-PPO: NaN keeps beta
            snap = self.controller.on_batch_boundary(
                self.step, regrets, stop_rate, metrics.get("critic_loss", float("nan"))
            )
            metrics.update(
                next_beta=float(snap.beta), next_mu=float(snap.mu), next_var=float(snap.var), next_enabled=float(snap.enabled)
            )
        self.last_boundary = P.BatchBoundary(
            step=self.step,
            policy_version=self.version,
            total_steps=self.cfg.run.total_steps,
            stop=params_from_snapshot(snap),
            n_trajectories=0 if batch is None else len(batch),
            stop_rate=stop_rate,
            regret_mean=float(regrets.mean()) if len(regrets) else 0.0,
            regret_var=float(regrets.var()) if len(regrets) else 0.0,
            regret_count=int(len(regrets)),
            critic_loss=float(metrics.get("critic_loss", float("nan"))),
            groups_consumed=self.groups_consumed,
            epoch=self.epoch,
        )

    def _publish_weights(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Publish the current weights through the weight transfer (espo_async/weights/; runs in a
        worker thread: sockets are touched only through ``loop``, which announces the policy as
        soon as it is published, so the samplers load it while the critic's is written)."""
        version = self.version
        with self.trainer_lock:
            self.last_weights["policy"] = policy = self.publisher.publish(
                self.trainer, "policy", version, step=self.step, epoch=self.epoch)
            if loop is not None:
                loop.call_soon_threadsafe(self.transport.try_send, self.pub, policy)
            if self.cfg.actors.critic is not None:
                self.last_weights["critic"] = self.publisher.publish(
                    self.trainer, "critic", version, step=self.step, epoch=self.epoch)
        self.publisher.retire(version)

    def _finish_run(self) -> None:
        self._save_checkpoint()
        with self.trainer_lock:
            self.trainer.export_hf(self.run_dir / "final")
        rounds = sorted(self.evals)
        summary = {
            "steps": self.step,
            "policy_version": self.version,
            "cumulative_tokens": self.cumulative_tokens,
            "final_checkpoint": str(self.run_dir / "final"),
            "last_metrics": self.last_metrics,
            "evaluations": [self._eval_result(self.evals[r]) for r in rounds if self.evals[r].done.is_set()],
        }
        if summary["evaluations"]:
            summary["eval_before"] = first = summary["evaluations"][0]
            summary["eval_after"] = last = summary["evaluations"][-1]
            if len(summary["evaluations"]) > 1:
                d, d_se, n_problems = paired_difference(first["per_problem"], last["per_problem"])
                summary["eval_gain"] = {"accuracy": d, "se": d_se, "problems": n_problems}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))

    async def teardown(self) -> None:
        """Stopped before the end (SIGTERM, Ctrl-C): make the run resumable. The step in flight
        (if any) finishes first (the trainer lock); the log keeps what was received since."""
        if hasattr(self, "wal"):
            self.wal.close()
        step_ok = True
        step_task = getattr(self, "_step_task", None)
        if step_task is not None and not step_task.done():
            self.log.info("stopping: waiting for the training step in progress to end")
            try:
                await step_task
            except Exception:
                step_ok = False  # its groups are consumed but not trained: keep the last checkpoint
                self.log.exception("the step in flight failed while stopping; no checkpoint saved")
        try:
            if (step_ok and self.status != "failed" and 0 < self.step < self.cfg.run.total_steps
                    and hasattr(self, "trainer")):
                await asyncio.to_thread(self._save_checkpoint)
                self.log.info("checkpoint saved at step %d; rerun with --run-dir to resume", self.step)
        finally:
            if hasattr(self, "publisher"):  # e.g. the collective transfer's process group
                await asyncio.to_thread(self.publisher.close)
            if hasattr(self, "trainer"):  # the worker ranks (deepspeed.world_size > 1) exit
                await asyncio.to_thread(self.trainer.close)
        if hasattr(self, "metrics"):
            self.metrics.close()
