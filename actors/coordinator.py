"""The coordinator: turns the dataset into prompt work and hands it to samplers that ask.

* Every training prompt becomes ``samples_per_prompt`` work items (one per sample) with ids
  ``<prompt_id>#<sample>``; the dataset is walked in a seeded order, epoch after epoch.
* Work goes only to a sampler that asked for it (credit = its free slots), so nothing queues
  inside a busy sampler and the coordinator always knows which sampler owns which request.
* Staleness bound: a new prompt group is started only while
  ``groups_started < groups_consumed + min(K + 1, steps left) * prompts_per_batch``, where
  ``groups_consumed`` comes from the learner's batch-boundary broadcast. No rollout therefore starts for a batch
  more than K policy versions ahead of the learner. Each work item carries the learner version
  at issue time, and the sampler waits until its weights reach it.
* A request that failed in its engine is issued again (same sample, next attempt).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq

import protocols as P
from actors.ids import eval_prompt_id, prompt_id, request_id
from espo_async.assets import load_assets
from espo_async.runtime.actor import Actor
from espo_async.tasks.registry import make_task


@dataclass
class Outstanding:
    work: P.PromptWork
    sampler: bytes


class Coordinator(Actor):
    ROLE = "coordinator"

    async def setup(self) -> None:
        from transformers import AutoTokenizer

        t = self.transport
        self.work_sock = t.socket(zmq.ROUTER, "work", bind=True)
        self.broadcast = t.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        assets = load_assets(self.run_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(assets.policy_dir)
        self.task = make_task(self.cfg.task.name, **self.cfg.task.options)
        self.problems = self.task.train_problems()
        if not self.problems:
            raise RuntimeError(f"task {self.cfg.task.name!r} has no training problems")
        self.rng = random.Random(self.cfg.run.seed)
        self.order: list[int] = []
        self.epoch = 0
        self.credits: dict[bytes, int] = {}
        self.queue: deque[P.PromptWork] = deque()  # issued-but-not-sent items (incl. re-issues)
        self.priority: deque[P.PromptWork] = deque()  # evaluation work goes before training work
        self.eval_rounds: set[int] = set()
        self.outstanding: dict[str, Outstanding] = {}
        self.learner_version = 0
        self.groups_consumed = 0
        self.groups_started = 0
        self.prompt_cache: dict[str, np.ndarray] = {}

    def heartbeat_counters(self) -> dict[str, float]:
        out = super().heartbeat_counters()
        out["groups_started"] = float(self.groups_started)
        out["groups_consumed"] = float(self.groups_consumed)
        out["outstanding"] = float(len(self.outstanding))
        out["learner_version"] = float(self.learner_version)
        out["epoch"] = float(self.epoch)
        return out

    async def main(self) -> None:
        await self.started.wait()
        await asyncio.gather(self._work_loop(), self._broadcast_loop())

    # -- dataset -----------------------------------------------------------------------------

    def _next_problem(self):
        if not self.order:
            self.order = list(range(len(self.problems)))
            self.rng.shuffle(self.order)
            self.epoch += 1
        return self.problems[self.order.pop()]

    def _prompt_ids(self, problem) -> np.ndarray:
        ids = self.prompt_cache.get(problem.id)
        if ids is None:
            text = self.task.format_prompt(problem)
            ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=True), dtype=np.int32)
            if len(self.prompt_cache) < 100_000:
                self.prompt_cache[problem.id] = ids
        return ids

    def may_start_group(self) -> bool:
        """The staleness bound, and no group beyond the last training step. Synchronous mode:
        the groups of batch i start only once the learner has finished step i (version i)."""
        p = self.cfg.rollout.prompts_per_batch
        if self.cfg.rollout.synchronous:
            return self.groups_started < min(self.learner_version + 1, self.cfg.run.total_steps) * p
        ahead = min(self.cfg.rollout.staleness + 1, self.cfg.run.total_steps - self.learner_version)
        return self.groups_started < self.groups_consumed + ahead * p

    def _start_group(self) -> None:
        problem = self._next_problem()
        r = self.cfg.rollout
        group = self.groups_started
        self.groups_started += 1
        prompt_ids = self._prompt_ids(problem)
        pid = prompt_id(group, problem.id)
        for i in range(r.samples_per_prompt):
            self.queue.append(
                P.PromptWork(
                    request_id=request_id(pid, i),
                    prompt_id=pid,
                    sample_index=i,
                    group_size=r.samples_per_prompt,
                    prompt_token_ids=prompt_ids,
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    issued_at_version=self.learner_version,
                )
            )

    # -- dispatch ----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            sampler = max(self.credits, key=self.credits.__getitem__, default=None)
            if sampler is None or self.credits[sampler] <= 0:
                return
            if self.priority:
                work = self.priority.popleft()
            else:
                if not self.queue:
                    if not self.may_start_group():
                        return
                    self._start_group()
                work = self.queue.popleft()
            if work.purpose == "train" and work.issued_at_version < self.learner_version and work.attempt == 0:
                work = _with_version(work, self.learner_version)
            self.credits[sampler] -= 1
            self.outstanding[work.request_id] = Outstanding(work, sampler)
            await self.work_sock.send_multipart([sampler, P.encode(work)])
            self.counters["work_sent"] += 1

    async def _work_loop(self) -> None:
        while True:
            ident, msg = await self.transport.recv_routed(self.work_sock, "samplers")
            if isinstance(msg, P.WorkRequest):
                self.credits[ident] = self.credits.get(ident, 0) + msg.free_slots
            elif isinstance(msg, P.WorkDone):
                self.on_done(msg)
            elif msg is not None:
                self.counters["unexpected_messages"] += 1
            await self._dispatch()

    def on_done(self, msg: P.WorkDone) -> None:
        out = self.outstanding.pop(msg.request_id, None)
        if out is None:
            self.counters["done_unknown"] += 1
            return
        if msg.ending is None:  # the engine failed it: issue it again
            self.counters["reissued"] += 1
            self.log.warning("re-issuing %s after engine error: %s", msg.request_id, msg.error)
            again = _with_attempt(out.work, out.work.attempt + 1)
            (self.queue if again.purpose == "train" else self.priority).appendleft(again)
        else:
            self.counters[f"done.{msg.ending}"] += 1

    async def _broadcast_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.broadcast, "learner")
            if isinstance(msg, P.BatchBoundary):
                if msg.policy_version >= self.learner_version:
                    self.learner_version = msg.policy_version
                    self.groups_consumed = max(self.groups_consumed, msg.groups_consumed)
                    await self._dispatch()
            elif isinstance(msg, P.EvalRequest):
                if msg.round not in self.eval_rounds:
                    self.eval_rounds.add(msg.round)
                    self._start_eval(msg)
                    await self._dispatch()
            elif isinstance(msg, P.Shutdown):
                self.on_shutdown(msg)

    def _start_eval(self, req: P.EvalRequest) -> None:
        """Queue one evaluation round: the first n held-out problems, ``samples`` each."""
        problems = self.task.eval_problems()[: req.n_problems]
        for problem in problems:
            pid = eval_prompt_id(req.round, problem.id)
            ids = self._prompt_ids(problem)
            for i in range(req.samples):
                self.priority.append(
                    P.PromptWork(
                        request_id=request_id(pid, i),
                        prompt_id=pid,
                        sample_index=i,
                        group_size=req.samples,
                        prompt_token_ids=ids,
                        max_tokens=req.max_tokens,
                        temperature=req.temperature,
                        top_p=1.0,
                        issued_at_version=req.policy_version,
                        purpose="eval",
                    )
                )
        self.counters["eval_rounds"] += 1
        self.log.info("evaluation round %d: %d problems x %d at version %d", req.round, len(problems), req.samples, req.policy_version)


def _with_attempt(work: P.PromptWork, attempt: int) -> P.PromptWork:
    return msgspec.structs.replace(work, attempt=attempt)


def _with_version(work: P.PromptWork, version: int) -> P.PromptWork:
    return msgspec.structs.replace(work, issued_at_version=version)
