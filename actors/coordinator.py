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
* Nothing is lost to a dead process (docs/reliability.md): a request stays *outstanding* until
  the learner acknowledges its trajectory (``Received``), not merely until its sampler says it
  sent it. When a sampler is lost (``ActorDown`` from the supervisor) everything it owned that the
  learner has not acknowledged is issued again (next attempt); when the learner restarts (a new
  ``epoch`` in its BatchBoundary) everything delivered but unacknowledged is issued again, and the
  coordinator takes the learner's word for its version and consumed groups even if they went
  back. The learner deduplicates by (prompt, sample), so a re-issue never trains twice.
* A (re)started coordinator hands out no training work before it heard the learner, and then
  continues the group numbering and the dataset order at the learner's consumed-group count.
* Samplers on other hosts (docs/cluster.md) have no supervisor that would tell this one about
  their loss. They say they are alive on the work socket (a 0-slot ``WorkRequest`` every
  ``transport.heartbeat_interval_s``) and name their process in every request: ``sampler_id`` =
  ``<name>#<session>``, ``<name>#<session>#hello`` on its first request, ``...#slots`` on an
  answer to "how many slots are free?". One silent for ``transport.heartbeat_timeout_s`` is lost
  exactly as on ``ActorDown`` (``samplers_silent``); a new session under a known name is a
  restart: the old process's work is issued again (``samplers_restarted``). A sampler whose
  session is unknown here without a hello (this coordinator restarted, or it had called the
  sampler lost) is asked for its free slots with an ``ActorDown`` naming it on the work socket
  (``samplers_asked_for_slots``); until the answer arrives it gets no work and its requests'
  slots are not counted (the answer, sent after them on the same ordered pipe, counts them), and
  the answer sets its credit.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq

import protocols as P
from espo_async.ids import eval_prompt_id, prompt_id, request_id
from espo_async.assets import load_assets
from espo_async.runtime.actor import Actor
from espo_async.tasks.registry import make_task
from protocols.messages import ActorDown, Received

MAX_CREDITS = 4096  # per sampler: a peer cannot claim more slots than this
MAX_DELIVERED = 100_000  # delivered-but-unacknowledged requests remembered (acks lost: bounded)


@dataclass
class Outstanding:
    work: P.PromptWork
    sampler: bytes
    delivered: bool = False  # the sampler reported it sent the trajectory; not yet acknowledged


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
        self.learner_epoch: str | None = None  # None until the first BatchBoundary arrived
        self.recently_acked: OrderedDict[str, None] = OrderedDict()
        self.losses_seen: set[tuple[str, int]] = set()  # (actor, incarnation) of ActorDown handled
        # Samplers on other hosts: when each was last heard (liveness), and its process's session.
        self.alive: dict[bytes, float] = {}
        self.sessions: dict[bytes, str] = {}
        self.asked: dict[bytes, float] = {}  # asked for their free slots (when), no answer yet
        self.delivered = 0

    def heartbeat_counters(self) -> dict[str, float]:
        out = super().heartbeat_counters()
        out["groups_started"] = float(self.groups_started)
        out["groups_consumed"] = float(self.groups_consumed)
        out["outstanding"] = float(len(self.outstanding))
        out["learner_version"] = float(self.learner_version)
        out["epoch"] = float(self.epoch)
        out["unacknowledged"] = float(self.delivered)
        out["samplers_with_credit"] = float(sum(1 for c in self.credits.values() if c > 0))
        out["samplers_remote_alive"] = float(len(self.alive))
        owned: dict[bytes, int] = {}
        for o in self.outstanding.values():  # per sampler: work it holds (in flight or unacknowledged)
            owned[o.sampler] = owned.get(o.sampler, 0) + 1
        for ident, n in owned.items():
            out[f"owned.{ident.decode(errors='replace')[:100]}"] = float(n)
        return out

    async def main(self) -> None:
        await self.started.wait()
        await asyncio.gather(self._work_loop(), self._broadcast_loop(), self._liveness_loop())

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
        the groups of batch i start only once the learner has finished step i (version i).
        Nothing starts before the learner said where it stands."""
        if self.learner_epoch is None:
            return False
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

    def _dispatch(self) -> None:
        """Hand queued work to samplers with credit (synchronous: sends never block)."""
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
            if work.purpose == "train" and work.issued_at_version != self.learner_version:
                # The version at issue time, also for re-issues and after the learner went back.
                work = _with_version(work, self.learner_version)
            if not self.transport.send_to(self.work_sock, sampler, work):
                # The sampler is gone (or not yet back): its credit is void, the work goes back.
                self.credits.pop(sampler, None)
                self._requeue(work)
                self.counters["dispatch_unroutable"] += 1
                continue
            self.credits[sampler] -= 1
            self.outstanding[work.request_id] = Outstanding(work, sampler)
            self.counters["work_sent"] += 1

    def _requeue(self, work: P.PromptWork) -> None:
        (self.queue if work.purpose == "train" else self.priority).appendleft(work)

    def _reissue(self, which, why: str) -> int:
        """Issue again (next attempt, first in line) every outstanding request ``which`` selects."""
        lost = [rid for rid, out in self.outstanding.items() if which(out)]
        for rid in reversed(lost):
            out = self.outstanding.pop(rid)
            self.delivered -= out.delivered
            self._requeue(_with_attempt(out.work, out.work.attempt + 1))
        if lost:
            self.counters["reissued_after_loss"] += len(lost)
            self.log.warning("issuing %d request(s) again: %s", len(lost), why)
        return len(lost)

    def _lose_sampler(self, ident: bytes, why: str) -> int:
        """A sampler is gone: its credit is void, everything it holds is issued again."""
        self.credits.pop(ident, None)
        self.counters["samplers_lost"] += 1
        return self._reissue(lambda o: o.sampler == ident, why)

    def _remote_request(self, ident: bytes, msg: P.WorkRequest) -> int | None:
        """A work request from a sampler on another host (``sampler_id`` = ``name#session[#tag]``).
        Returns the slots to add to its credit, or None when its credit was set here."""
        name, _, rest = msg.sampler_id.partition("#")
        session, _, tag = rest.partition("#")
        known = self.sessions.get(ident)
        self.sessions[ident] = session
        if known is not None and known != session:
            # A new process under that name: the old one is gone, and so is its work.
            self.counters["samplers_restarted"] += 1
            self._lose_sampler(ident, f"{name[:100]} restarted (new process) or another process uses its name")
            self.asked.pop(ident, None)
        if tag == "hello":  # a new process: its first request holds all its free slots
            self.asked.pop(ident, None)
            self.credits[ident] = 0
            return msg.free_slots
        if known != session:
            self._ask_slots(ident)  # alive, but its free slots are unknown here
            return 0
        if ident in self.asked:
            if tag == "slots":
                del self.asked[ident]
                self.credits[ident] = min(msg.free_slots, MAX_CREDITS)
                return None
            if time.monotonic() - self.asked[ident] > 2 * self.cfg.transport.heartbeat_interval_s:
                self._ask_slots(ident)  # the question or its answer got lost: ask again
            return 0  # counted by the answer, which comes after this on the same pipe
        if tag == "slots":  # an answer we no longer wait for (asked twice): already counted
            self.counters["slot_answers_ignored"] += 1
            return 0
        return msg.free_slots

    def _ask_slots(self, ident: bytes) -> None:
        self.counters["samplers_asked_for_slots"] += 1
        self.credits[ident] = 0
        asked = self.transport.send_to(
            self.work_sock, ident,
            ActorDown(actor=ident.decode(errors="replace"), role="sampler", incarnation=0,
                      reason="the coordinator does not know this sampler's free slots"),
        )
        if asked:
            self.asked[ident] = time.monotonic()
        else:
            self.sessions.pop(ident, None)  # unroutable: ask on its next request

    async def _liveness_loop(self) -> None:
        """Samplers on other hosts that were silent for transport.heartbeat_timeout_s are lost."""
        tcfg = self.cfg.transport
        while True:
            await asyncio.sleep(min(tcfg.heartbeat_interval_s, tcfg.heartbeat_timeout_s / 4))  # periodic check
            now = time.monotonic()
            for ident in [i for i, t in self.alive.items() if now - t > tcfg.heartbeat_timeout_s]:
                silent = now - self.alive.pop(ident)
                self.sessions.pop(ident, None)
                self.asked.pop(ident, None)
                self.counters["samplers_silent"] += 1
                name = ident.decode(errors="replace")[:100]
                self.log.warning("sampler %s was silent for %.1fs (transport.heartbeat_timeout_s=%g): lost",
                                 name, silent, tcfg.heartbeat_timeout_s)
                with self.guard("silent sampler"):
                    self._lose_sampler(ident, f"{name} was silent for {silent:.1f}s")
            self._dispatch()

    async def _work_loop(self) -> None:
        while True:
            ident, msg = await self.transport.recv_routed(self.work_sock, "samplers")
            with self.guard(type(msg).__name__):
                if msg is not None and (ident in self.alive or (
                        isinstance(msg, P.WorkRequest) and "#" in msg.sampler_id)):
                    self.alive[ident] = time.monotonic()  # a sampler on another host is alive
                if isinstance(msg, P.WorkRequest):
                    slots = self._remote_request(ident, msg) if "#" in msg.sampler_id else msg.free_slots
                    credit = self.credits.get(ident, 0) + (slots or 0)
                    if credit > MAX_CREDITS:
                        self.counters["credits_capped"] += 1
                        self.log.warning("%r claims %d free slots; capped at %d", ident[:64], credit, MAX_CREDITS)
                        credit = MAX_CREDITS
                    self.credits[ident] = credit
                elif isinstance(msg, P.WorkDone):
                    self.on_done(ident, msg)
                elif msg is not None:
                    self.counters["unexpected_messages"] += 1
                self._dispatch()

    def on_done(self, ident: bytes, msg: P.WorkDone) -> None:
        out = self.outstanding.get(msg.request_id)
        if out is None:
            if msg.request_id in self.recently_acked:  # the learner's ack overtook the sampler's report
                self.counters[f"done.{msg.ending}"] += 1
            else:
                self.counters["done_unknown"] += 1
                self.log.info("work done for unknown request %r (ignored)", msg.request_id[:200])
            return
        if out.sampler != ident:  # issued again elsewhere meanwhile; the other attempt counts
            self.counters["done_by_previous_owner"] += 1
            return
        if msg.ending is None:  # the engine failed it: issue it again
            self.outstanding.pop(msg.request_id)
            self.delivered -= out.delivered
            self.counters["reissued"] += 1
            self.log.warning("re-issuing %s after engine error: %s", msg.request_id, msg.error[:500])
            self._requeue(_with_attempt(out.work, out.work.attempt + 1))
        elif not out.delivered:
            out.delivered = True
            self.delivered += 1
            self.counters[f"done.{msg.ending}"] += 1
            if self.delivered > MAX_DELIVERED:
                self._forget_oldest_delivered()
        else:
            self.counters["done_duplicate"] += 1  # the same report again: changes nothing

    def _forget_oldest_delivered(self) -> None:
        """Acknowledgements were lost (they should not be): keep the memory bounded."""
        drop = [rid for rid, out in self.outstanding.items() if out.delivered][: MAX_DELIVERED // 10]
        for rid in drop:
            del self.outstanding[rid]
        self.delivered -= len(drop)
        self.counters["unacknowledged_forgotten"] += len(drop)
        self.log.warning("forgot %d delivered requests the learner never acknowledged", len(drop))

    def on_received(self, msg: Received) -> None:
        """The learner holds these trajectories: the requests are finished for good."""
        for rid in msg.request_ids:
            out = self.outstanding.pop(rid, None)
            if out is not None:
                self.delivered -= out.delivered
                self.counters["acknowledged"] += 1
            self.recently_acked[rid] = None
        while len(self.recently_acked) > 20_000:
            self.recently_acked.popitem(last=False)

    def on_boundary(self, msg: P.BatchBoundary) -> None:
        total_groups = self.cfg.run.total_steps * self.cfg.rollout.prompts_per_batch
        if not (0 <= msg.step <= self.cfg.run.total_steps and msg.policy_version >= 0
                and 0 <= msg.groups_consumed <= total_groups):
            self.counters["implausible_boundaries"] += 1
            self.log.warning("ignored an implausible batch boundary: step %d, version %d, %d groups consumed",
                             msg.step, msg.policy_version, msg.groups_consumed)
            return
        if self.learner_epoch is None:
            self.learner_epoch = msg.epoch
            self.learner_version = msg.policy_version
            self.groups_consumed = msg.groups_consumed
            self.log.info("learner at step %d, version %d, %d groups consumed", msg.step, msg.policy_version,
                          msg.groups_consumed)
        elif msg.epoch != self.learner_epoch:
            # The learner restarted from its last checkpoint: take its word, even if it went back.
            self.log.warning(
                "the learner restarted: now at step %d, version %d, %d groups consumed (was version %d, %d groups)",
                msg.step, msg.policy_version, msg.groups_consumed, self.learner_version, self.groups_consumed,
            )
            self.counters["learner_restarts"] += 1
            self.learner_epoch = msg.epoch
            self.learner_version = msg.policy_version
            self.groups_consumed = msg.groups_consumed
            # What the old learner may have lost in flight (it acknowledges what it wrote down).
            self._reissue(lambda o: o.delivered and o.work.purpose == "train", "the learner restarted")
            # Its evaluation rounds start over: the new learner asks again for what it needs.
            self.eval_rounds.clear()
            self.priority = deque(w for w in self.priority if w.purpose != "eval")
        elif msg.policy_version >= self.learner_version:
            self.learner_version = msg.policy_version
            self.groups_consumed = max(self.groups_consumed, msg.groups_consumed)
        if self.groups_started < self.groups_consumed:
            self._fast_forward(self.groups_consumed)

    def _fast_forward(self, groups: int) -> None:
        """A (re)started coordinator continues where the learner is: same group numbers and dataset
        order as if it had never stopped (groups the learner already has are not issued again)."""
        self.log.info("continuing at group %d (the learner consumed %d groups)", groups, self.groups_consumed)
        for _ in range(groups - self.groups_started):
            self._next_problem()
        self.groups_started = groups

    async def on_control(self, msg: P.Message) -> None:
        if isinstance(msg, ActorDown) and msg.role == "sampler":
            key = (msg.actor, msg.incarnation)
            if key in self.losses_seen:
                return  # repeated while it is down
            self.losses_seen.add(key)
            ident = msg.actor.encode()
            self._lose_sampler(ident, f"{msg.actor} was lost ({msg.reason})")
            self._dispatch()

    async def _broadcast_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.broadcast, "learner")
            with self.guard(type(msg).__name__):
                if isinstance(msg, Received):
                    self.on_received(msg)
                elif isinstance(msg, P.BatchBoundary):
                    self.on_boundary(msg)
                    self._dispatch()
                elif isinstance(msg, P.EvalRequest):
                    if msg.round not in self.eval_rounds and len(self.eval_rounds) < 100_000:
                        self.eval_rounds.add(msg.round)
                        self._start_eval(msg)
                        self._dispatch()
                elif isinstance(msg, P.Shutdown):
                    self.on_shutdown(msg)

    def _start_eval(self, req: P.EvalRequest) -> None:
        """Queue one evaluation round: the first n held-out problems, ``samples`` each."""
        if not (1 <= req.samples <= 1024 and req.max_tokens >= 1 and 0 <= req.temperature < float("inf")):
            self.counters["eval_requests_rejected"] += 1
            self.log.warning("ignored an evaluation request with samples=%d, max_tokens=%d, temperature=%r",
                             req.samples, req.max_tokens, req.temperature)
            return
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
