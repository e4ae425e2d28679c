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
  ``transport.heartbeat_interval_s``) and name their process in every request (``session``),
  with what the request is (``intent``): ``hello`` on its first request, ``slots`` on an answer
  to a ``SlotsQuery``, ``ordinary`` otherwise. One silent for ``transport.heartbeat_timeout_s``
  is lost exactly as on ``ActorDown`` (``samplers_silent``); a new session under a known name is
  a restart: the old process's work is issued again (``samplers_restarted``). A sampler whose
  session is unknown here without a hello (this coordinator restarted, or it had called the
  sampler lost) is asked for its free slots with a ``SlotsQuery`` on the work socket
  (``samplers_asked_for_slots``); until the answer arrives it gets no work and its requests'
  slots are not counted (the answer, sent after them on the same ordered pipe, counts them), and
  the answer sets its credit. A request without a session (a sampler this host's supervisor
  watches) counts its free slots whatever its intent.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import msgspec
import numpy as np
import zmq

import protocols as P
from espo_async.assets import load_assets
from espo_async.ids import eval_prompt_id, group_of, prompt_id, request_id, work_tag
from espo_async.runtime.actor import Actor
from espo_async.runtime.entry import actor_instances
from espo_async.runtime.keys import run_key
from espo_async.tasks.registry import make_task
from protocols.messages import ActorDown, ActorUp, Received

MAX_CREDITS = 4096  # per sampler: a peer cannot claim more slots than this
MAX_DELIVERED = 100_000  # delivered-but-unacknowledged requests remembered (acks lost: bounded)


@dataclass
class Outstanding:
    work: P.PromptWork
    sampler: bytes
    delivered: bool = False  # the sampler reported it sent the trajectory; not yet acknowledged
    issued_at: float = field(default_factory=time.time)  # unix time it was sent


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
        # The samplers this host's supervisor starts and watches (it says ActorDown when one is lost).
        self.watched = {name.encode() for name, role, _ in actor_instances(self.cfg, local=True) if role == "sampler"}
        self.key = run_key(self.run_dir)  # work tags: the learner takes only work issued here
        # What a restarted coordinator must not forget (docs/reliability.md, "coordinator state"):
        # every started group not yet wholly acknowledged, with the samples that were, and the
        # evaluation rounds likewise; written atomically to coordinator/state.json.
        self.draws = 0  # problems drawn from the dataset order so far (the cursor)
        self.open: dict[int, OpenGroup] = {}
        self.eval_open: dict[int, OpenRound] = {}
        self.state_path = self.run_dir / "coordinator" / "state.json"
        self.state_dirty = False
        self.learner_epoch_before: str | None = None  # the learner this state was written under
        self.restored = self._restore()
        self.last_progress = time.monotonic()  # a learner step, an eval result or an acknowledgement
        self.last_step = -1
        self.stalls = 0  # stall periods in a row without progress
        self.down: dict[str, int] = {}  # actors of this host the supervisor says are down (incarnation)

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
        out["open_groups"] = float(len(self.open))
        out["open_eval_rounds"] = float(len(self.eval_open))
        owned: dict[bytes, int] = {}
        oldest: dict[bytes, int] = {}
        for o in self.outstanding.values():  # per sampler: work it holds (in flight or unacknowledged)
            owned[o.sampler] = owned.get(o.sampler, 0) + 1
            g = group_of(o.work.prompt_id) if not o.delivered else None
            if g is not None:  # and the oldest group it is still generating for
                oldest[o.sampler] = min(oldest.get(o.sampler, g), g)
        for ident, n in owned.items():
            out[f"owned.{ident.decode(errors='replace')[:100]}"] = float(n)
        for ident, g in oldest.items():
            out[f"oldest_group.{ident.decode(errors='replace')[:100]}"] = float(g)
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
        self.draws += 1
        self.last_index = self.order.pop()
        return self.problems[self.last_index]

    def _seek(self, draws: int) -> None:
        """Put the dataset cursor where it was after ``draws`` draws (same seed: same order)."""
        self.rng = random.Random(self.cfg.run.seed)
        self.order, self.epoch, self.draws = [], 0, 0
        for _ in range(draws):
            self._next_problem()

    # -- persistent state ----------------------------------------------------------------------

    def _save_state(self) -> None:
        """coordinator/state.json, atomically (a kill leaves the old or the new file, never half)."""
        state = {
            "groups_started": self.groups_started,
            "draws": self.draws,
            "open": {str(g): [o.problem, sorted(o.acked)] for g, o in self.open.items()},
            "eval": {str(r): [_fields(o.request), sorted(o.acked)] for r, o in self.eval_open.items()},
            "learner_epoch": self.learner_epoch or self.learner_epoch_before,  # not heard yet: the one before
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)
        self.state_dirty = False

    def _restore(self) -> bool:
        """A restarted coordinator: every group it started and the learner has not wholly
        acknowledged is issued again (the samples not acknowledged, next attempt), and so are
        unfinished evaluation rounds; the cursor continues where it was."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            self.log.error("cannot read %s (%s): starting without it", self.state_path, exc)
            return False
        self._seek(int(state["draws"]))
        self.groups_started = int(state["groups_started"])
        self.learner_epoch_before = state.get("learner_epoch")
        lost = 0
        for g, (problem, acked) in sorted(state["open"].items(), key=lambda kv: int(kv[0])):
            group = OpenGroup(int(problem), set(acked))
            self.open[int(g)] = group
            work = self._group_work(int(g), self.problems[group.problem], attempt=1)
            for w in work:
                if w.sample_index not in group.acked:
                    self.queue.append(w)
                    lost += 1
        for r, (fields, acked) in sorted(state["eval"].items(), key=lambda kv: int(kv[0])):
            req = P.EvalRequest(**fields)
            self.eval_rounds.add(req.round)
            self._start_eval(req, acked=set(acked))
        self.counters["restored_requests"] = lost
        self.log.warning("restored from %s: %d group(s) unfinished (%d samples issued again), %d evaluation round(s); "
                         "continuing at group %d", self.state_path, len(self.open), lost, len(self.eval_open),
                         self.groups_started)
        return True

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
        r = self.cfg.rollout
        for _ in range(1000):  # a problem whose prompt is over rollout.max_prompt_tokens is skipped
            problem = self._next_problem()
            prompt_ids = self._prompt_ids(problem)
            if len(prompt_ids) <= r.max_prompt_tokens:
                break
            self.counters["prompts_too_long"] += 1
            self.log.warning("skipped problem %r: %d prompt tokens > rollout.max_prompt_tokens %d",
                             str(problem.id)[:200], len(prompt_ids), r.max_prompt_tokens)
        else:
            raise RuntimeError("1000 training problems in a row are over rollout.max_prompt_tokens")
        group = self.groups_started
        self.groups_started += 1
        self.open[group] = OpenGroup(self.last_index)
        self.queue.extend(self._group_work(group, problem))
        self._save_state()  # before any of its work leaves: a restart knows the group

    def _group_work(self, group: int, problem, attempt: int = 0) -> list[P.PromptWork]:
        r = self.cfg.rollout
        pid = prompt_id(group, problem.id)
        prompt_ids = self._prompt_ids(problem)
        return [
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
                attempt=attempt,
            )
            for i in range(r.samples_per_prompt)
        ]

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
                if self.learner_epoch is None:  # restored work waits for the learner too
                    return
                if not self.queue:
                    if not self.may_start_group():
                        return
                    self._start_group()
                work = self.queue.popleft()
            if work.purpose == "train" and work.issued_at_version != self.learner_version:
                # The version at issue time, also for re-issues and after the learner went back.
                work = _with_version(work, self.learner_version)
            work = self._tagged(work)
            if not self.transport.send_to(self.work_sock, sampler, work):
                # The sampler is gone (or not yet back): its credit is void, the work goes back.
                self.credits.pop(sampler, None)
                self._requeue(work)
                self.counters["dispatch_unroutable"] += 1
                continue
            self.credits[sampler] -= 1
            self.outstanding[work.request_id] = Outstanding(work, sampler)
            self.counters["work_sent"] += 1

    def _tagged(self, work: P.PromptWork) -> P.PromptWork:
        """The work with this run's tag for its identity and attempt (espo_async/ids.py work_tag)."""
        tag = work_tag(self.key, request_id=work.request_id, prompt_id=work.prompt_id, sample_index=work.sample_index,
                       group_size=work.group_size, attempt=work.attempt, purpose=work.purpose,
                       prompt_token_ids=work.prompt_token_ids)
        return work if tag == work.tag else msgspec.structs.replace(work, tag=tag)

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
        """A work request from a sampler on another host (one that names its ``session``).
        Returns the slots to add to its credit, or None when its credit was set here."""
        name, session = msg.sampler, msg.session
        known = self.sessions.get(ident)
        self.sessions[ident] = session
        if known is not None and known != session:
            # A new process under that name: the old one is gone, and so is its work.
            self.counters["samplers_restarted"] += 1
            self._lose_sampler(ident, f"{name[:100]} restarted (new process) or another process uses its name")
            self.asked.pop(ident, None)
        if msg.intent == "hello":  # a new process: its first request holds all its free slots
            self.asked.pop(ident, None)
            self.credits[ident] = 0
            return msg.free_slots
        if known != session:
            self._ask_slots(ident)  # alive, but its free slots are unknown here
            return 0
        if ident in self.asked:
            if msg.intent == "slots":
                del self.asked[ident]
                self.credits[ident] = min(msg.free_slots, MAX_CREDITS)
                return None
            if time.monotonic() - self.asked[ident] > 2 * self.cfg.transport.heartbeat_interval_s:
                self._ask_slots(ident)  # the question or its answer got lost: ask again
            return 0  # counted by the answer, which comes after this on the same pipe
        if msg.intent == "slots":  # an answer we no longer wait for (asked twice): already counted
            self.counters["slot_answers_ignored"] += 1
            return 0
        return msg.free_slots

    def _ask_slots(self, ident: bytes) -> None:
        self.counters["samplers_asked_for_slots"] += 1
        self.credits[ident] = 0
        asked = self.transport.send_to(
            self.work_sock, ident,
            P.SlotsQuery(sampler=ident.decode(errors="replace"),
                         reason="the coordinator does not know this sampler's free slots"),
        )
        if asked:
            self.asked[ident] = time.monotonic()
        else:
            self.sessions.pop(ident, None)  # unroutable: ask on its next request

    async def _liveness_loop(self) -> None:
        """Peers on the work socket (samplers here or on other hosts, or anyone else who asked for
        work) that were silent for transport.heartbeat_timeout_s are lost; the state file is
        written when acknowledgements changed it; a stall is reported (and recovered from)."""
        tcfg = self.cfg.transport
        while True:
            await asyncio.sleep(min(tcfg.heartbeat_interval_s, tcfg.heartbeat_timeout_s / 4))  # periodic check
            if self.state_dirty:
                with self.guard("state"):
                    self._save_state()
            with self.guard("stall check"):
                self._check_stall()
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

    # -- stalls ------------------------------------------------------------------------------

    def _waiting_for(self) -> dict:
        """What the run waits for: every open group's and evaluation round's samples the learner
        does not hold, each with where it is (issued to whom and when, queued, or nowhere)."""
        queued = {w.request_id: w for w in (*self.priority, *self.queue)}

        def where(rid: str) -> dict:
            out = self.outstanding.get(rid)
            if out is not None:
                return {"request_id": rid, "state": "delivered" if out.delivered else "issued",
                        "to": out.sampler.decode(errors="replace")[:100], "attempt": out.work.attempt,
                        "issued_at": round(out.issued_at, 3), "issued_s_ago": round(time.time() - out.issued_at, 1)}
            if rid in queued:
                return {"request_id": rid, "state": "queued", "attempt": queued[rid].attempt}
            return {"request_id": rid, "state": "nowhere"}

        groups = []
        for g, group in sorted(self.open.items()):
            pid = prompt_id(g, self.problems[group.problem].id)
            missing = [where(request_id(pid, i)) for i in range(self.cfg.rollout.samples_per_prompt)
                       if i not in group.acked]
            groups.append({"group": g, "prompt_id": pid, "held": sorted(group.acked), "missing": missing})
        rounds = [{"round": r, "held": len(o.acked), "expected": len(o.expected),
                   "missing": [where(rid) for rid in sorted(o.expected - o.acked)][:100]}
                  for r, o in sorted(self.eval_open.items())]
        return {"groups": groups, "eval_rounds": rounds}

    def _check_stall(self) -> None:
        """No learner step, no acknowledgement (hence no evaluation result) for run.stall_timeout_s
        while groups or rounds are unfinished: say what the run waits for (console via the
        supervisor, RUN/stall.json, RUN/stalls.jsonl), and issue every missing sample again; after
        run.stall_reissues such recoveries in a row without progress, give up (the supervisor ends
        the run with exit code 1 naming what was missing)."""
        limit = self.cfg.run.stall_timeout_s
        now = time.monotonic()
        if self.counters["stall_gave_up"]:
            return  # said once; the supervisor ends the run
        if not limit or self.learner_epoch is None or not (self.open or self.eval_open) or self.down:
            # Nothing unfinished that is ours (the learner trains, or the run is over), or an actor
            # is down and being restarted: not a stall (the clock starts again afterwards).
            self._progress()
            return
        idle = now - self.last_progress
        if idle <= limit:
            return
        self.stalls += 1
        waiting = self._waiting_for()
        give_up = self.stalls > self.cfg.run.stall_reissues
        missing = [m for g in waiting["groups"] for m in g["missing"]] + [m for r in waiting["eval_rounds"]
                                                                          for m in r["missing"]]
        report = {
            "time": time.time(), "stalled_for_s": round(idle, 1), "learner_step": self.last_step,
            "stall": self.stalls, "action": "giving up" if give_up else "issuing the missing samples again",
            "config": {"run.stall_timeout_s": limit, "run.stall_reissues": self.cfg.run.stall_reissues},
            **waiting,
        }
        line = json.dumps(report)
        path = self.run_dir / "stall.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
        with (self.run_dir / "stalls.jsonl").open("a") as f:
            f.write(line + "\n")
        summary = ", ".join(f"{m['request_id']} ({m['state']}" + (f" to {m['to']} {m['issued_s_ago']}s ago" if "to" in m
                                                                  else "") + ")" for m in missing[:10])
        self.log.error("stalled: no learner step and no acknowledgement for %.0fs (run.stall_timeout_s=%g); waiting "
                       "for %d sample(s): %s%s; %s", idle, limit, len(missing), summary,
                       " ..." if len(missing) > 10 else "", report["action"])
        self.counters["stalls"] += 1
        if give_up:
            self.counters["stall_gave_up"] = 1
            return
        # Recover: every missing sample is issued again, wherever it is (owner dead, stuck or a stranger).
        ids = {m["request_id"] for m in missing}
        self._reissue(lambda o: o.work.request_id in ids, "stalled")
        queued = {w.request_id for w in (*self.priority, *self.queue)}
        for g, group in self.open.items():
            for w in self._group_work(g, self.problems[group.problem], attempt=self.stalls + 1):
                if w.request_id in ids and w.request_id not in queued:
                    self.queue.appendleft(w)
        for r, rnd in self.eval_open.items():
            if any(rid not in queued for rid in rnd.expected - rnd.acked):
                self.priority = deque(w for w in self.priority if not w.prompt_id.startswith(f"e{r}/"))
                self._start_eval(rnd.request, acked=set(rnd.acked))
        self.counters["stall_reissued"] += len(ids)
        self.last_progress = time.monotonic()  # the next period starts now; self.stalls goes on counting
        self._dispatch()

    def _progress(self) -> None:
        self.last_progress = time.monotonic()
        self.stalls = 0

    async def _work_loop(self) -> None:
        while True:
            ident, msg = await self.transport.recv_routed(self.work_sock, "samplers")
            with self.guard(type(msg).__name__):
                if msg is not None and ident not in self.watched:
                    # Any peer that this host's supervisor does not watch (a sampler on another
                    # host, or a stranger) must keep saying it is alive (remote samplers send a
                    # 0-slot request every heartbeat interval); one silent for
                    # transport.heartbeat_timeout_s is lost and its work issued again.
                    self.alive[ident] = time.monotonic()
                if isinstance(msg, P.WorkRequest):
                    slots = self._remote_request(ident, msg) if msg.session else msg.free_slots
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
            self._close(rid)
        while len(self.recently_acked) > 20_000:
            self.recently_acked.popitem(last=False)

    def _close(self, rid: str) -> None:
        """An acknowledged sample of an open group or evaluation round (even one issued by this
        coordinator's previous process): a wholly acknowledged group is finished for good."""
        pid, _, sample = rid.rpartition("#")
        if not sample.isascii() or not sample.isdigit() or len(sample) > 9:
            return
        g = group_of(pid)
        if g is not None and g in self.open:
            group = self.open[g]
            if int(sample) not in group.acked and int(sample) < self.cfg.rollout.samples_per_prompt:
                group.acked.add(int(sample))
                self.state_dirty = True
                self._progress()
                if len(group.acked) == self.cfg.rollout.samples_per_prompt:
                    del self.open[g]
            return
        head = pid.partition("/")[0]
        digits = head[1:]
        if head[:1] == "e" and 0 < len(digits) <= 18 and digits.isascii() and digits.isdigit():
            rnd = self.eval_open.get(int(digits))
            if rnd is not None and rid in rnd.expected and rid not in rnd.acked:
                rnd.acked.add(rid)
                self.state_dirty = True
                self._progress()
                if len(rnd.acked) == len(rnd.expected):
                    del self.eval_open[int(digits)]

    def on_boundary(self, msg: P.BatchBoundary) -> None:
        total_groups = self.cfg.run.total_steps * self.cfg.rollout.prompts_per_batch
        if not (0 <= msg.step <= self.cfg.run.total_steps and msg.policy_version >= 0
                and 0 <= msg.groups_consumed <= total_groups):
            self.counters["implausible_boundaries"] += 1
            self.log.warning("ignored an implausible batch boundary: step %d, version %d, %d groups consumed",
                             msg.step, msg.policy_version, msg.groups_consumed)
            return
        if msg.step != self.last_step:
            self.last_step = msg.step
            self._progress()
        if self.learner_epoch is None and self.restored and msg.epoch != self.learner_epoch_before:
            # Restored state from before a learner restart we did not see: its eval rounds are void.
            self.eval_rounds.clear()
            self.eval_open.clear()
            self.priority = deque(w for w in self.priority if w.purpose != "eval")
        if self.learner_epoch is None:
            self.learner_epoch = msg.epoch
            self.state_dirty = True
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
            self.eval_open.clear()
            self.state_dirty = True
            self.priority = deque(w for w in self.priority if w.purpose != "eval")
        elif msg.policy_version >= self.learner_version:
            self.learner_version = msg.policy_version
            self.groups_consumed = max(self.groups_consumed, msg.groups_consumed)
        if self.groups_started < self.groups_consumed:
            # No state of ours says what was started (a run folder from before coordinator/state.json).
            self._fast_forward(self.groups_consumed)

    def _fast_forward(self, groups: int) -> None:
        """A (re)started coordinator continues where the learner is: same group numbers and dataset
        order as if it had never stopped (groups the learner already has are not issued again)."""
        self.log.info("continuing at group %d (the learner consumed %d groups)", groups, self.groups_consumed)
        for _ in range(groups - self.groups_started):
            self._next_problem()
        self.groups_started = groups

    async def on_control(self, msg: P.Message) -> None:
        # While an actor of this host is down (restarting), a quiet run is not a stall.
        if isinstance(msg, ActorDown):
            self.down[msg.actor] = msg.incarnation
        elif isinstance(msg, ActorUp) and self.down.get(msg.actor, -1) < msg.incarnation:
            self.down.pop(msg.actor, None)
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

    def _start_eval(self, req: P.EvalRequest, acked: set[str] | None = None) -> None:
        """Queue one evaluation round: the first n held-out problems, ``samples`` each (those not
        in ``acked``: a restored round)."""
        if not (1 <= req.samples <= 1024 and req.max_tokens >= 1 and 0 <= req.temperature < float("inf")):
            self.counters["eval_requests_rejected"] += 1
            self.log.warning("ignored an evaluation request with samples=%d, max_tokens=%d, temperature=%r",
                             req.samples, req.max_tokens, req.temperature)
            return
        problems = self.task.eval_problems()[: req.n_problems]
        rnd = self.eval_open[req.round] = OpenRound(req, set(acked or ()))
        for problem in problems:
            pid = eval_prompt_id(req.round, problem.id)
            ids = self._prompt_ids(problem)
            for i in range(req.samples):
                rnd.expected.add(request_id(pid, i))
                if request_id(pid, i) in rnd.acked:
                    continue
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
                        attempt=1 if acked is not None else 0,
                    )
                )
        if acked is None:
            self._save_state()
        self.counters["eval_rounds"] += 1
        self.log.info("evaluation round %d: %d problems x %d at version %d", req.round, len(problems), req.samples, req.policy_version)


@dataclass
class OpenGroup:
    """A started group not yet wholly acknowledged by the learner."""

    problem: int  # index into the task's training problems
    acked: set[int] = field(default_factory=set)  # sample indices the learner holds


@dataclass
class OpenRound:
    """An evaluation round not yet wholly acknowledged."""

    request: P.EvalRequest
    acked: set[str] = field(default_factory=set)  # request ids the learner holds
    expected: set[str] = field(default_factory=set)


def _fields(msg: P.Message) -> dict:
    return {f: getattr(msg, f) for f in msg.__struct_fields__}


def _with_attempt(work: P.PromptWork, attempt: int) -> P.PromptWork:
    return msgspec.structs.replace(work, attempt=attempt)


def _with_version(work: P.PromptWork, version: int) -> P.PromptWork:
    return msgspec.structs.replace(work, issued_at_version=version)
