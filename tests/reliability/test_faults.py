"""Faults with real processes: kill -9 an actor in the middle of a run, or let one hang.

A dead or hung actor must cost seconds, never the run, and never a wrong batch: the supervisor
names it, kills what is left of it, restarts it, and tells the others; the run goes on. Each
test waits on supervisor state changes (heartbeats every 0.25 s) with timeouts; none sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math

import psutil
import pytest
import zmq
import zmq.asyncio

import protocols as P
from espo_async.runtime.metrics import read_metrics
from tests.reliability.system_run import Listener, SystemRun, faults_config
from tests.runtime.system import learner_state, received

pytestmark = pytest.mark.slow

SAMPLERS = ("sampler-0", "sampler-1")


def resumable_state(run_dir) -> dict:
    """The learner state a restart resumes from (see Learner._checkpoint_to_load)."""
    for folder in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        try:
            return json.loads((run_dir / folder / "learner_state.json").read_text())
        except (OSError, ValueError):
            continue
    raise AssertionError("no checkpoint to resume from")


def assert_each_sample_trained_once(run_dir, cfg) -> list:
    """The learner's log holds one trajectory per (prompt, sample); every group it trained on is
    complete. Returns the log."""
    trajs = received(run_dir)
    keys = [(t.prompt_id, t.sample_index) for t in trajs]
    dupes = [k for k, n in collections.Counter(keys).items() if n > 1]
    assert not dupes, f"trajectories accepted twice: {dupes[:5]}"
    members = collections.defaultdict(set)
    for t in trajs:
        members[t.prompt_id].add(t.sample_index)
    consumed = learner_state(run_dir)["consumed_groups"]
    assert consumed
    for gid in consumed:
        assert members[gid] == set(range(cfg.rollout.samples_per_prompt)), gid
    return trajs


async def test_sampler_killed_mid_rollout_work_is_issued_again(tmp_path, tiny_model_dir):
    cfg = faults_config(actors={"sampler": {"options": {"tokens_per_s": 100}}})
    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(
            lambda: run.counters("sampler-1").get("active", 0) >= 1
            and run.counters("sampler-1").get("tokens_generated", 0) > 0
            and run.counters("learner").get("step", 0) >= 1,
            240, "sampler-1 in the middle of rollouts",
        )
        run.sup.kill_actor("sampler-1")
        lost = await run.wait_event("sampler-1", "lost", 10)
        assert "SIGKILL" in lost.detail
        step_at_kill = run.counters("learner")["step"]
        await run.wait_event("sampler-1", "up", 120)
        # Training goes on, with the restarted sampler generating again.
        await run.wait(
            lambda: run.counters("learner").get("step", 0) >= step_at_kill + 3
            and run.counters("sampler-1").get("tokens_generated", 0) > 0
            and run.counters("coordinator").get("reissued_after_loss", 0) >= 1,
            120, "three more learner steps",
        )
        result = await run.stop()
    assert result.exit_code == 0, result.reason
    coord = result.actors["coordinator"].counters
    assert coord["samplers_lost"] == 1 and coord["reissued_after_loss"] >= 1, coord
    trajs = assert_each_sample_trained_once(tmp_path, cfg)
    # The in-flight work of the dead sampler was issued again (next attempt) and trained on.
    assert any(t.attempt >= 1 for t in trajs)
    assert [e.kind for e in result.events if e.actor == "sampler-1"] == ["lost", "restarting", "up"]


async def test_stopper_killed_samplers_go_on_without_stops_and_stopping_resumes(tmp_path, tiny_model_dir):
    cfg = faults_config(transport={"restart_backoff_s": 4.0})
    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(lambda: run.total("cancels", "sampler") >= 2 and run.counters("learner").get("step", 0) >= 1,
                       240, "the first stops")
        run.sup.kill_actor("stopper")
        await run.wait_event("stopper", "lost", 10)
        before = await run.fresh([*SAMPLERS, "learner"])  # cancels in flight have arrived by now
        cancels = sum(before[s].get("cancels", 0) for s in SAMPLERS)
        tokens = sum(before[s].get("tokens_generated", 0) for s in SAMPLERS)
        step = before["learner"]["step"]
        await run.wait(
            lambda: run.total("tokens_generated", "sampler") > tokens + 300 and run.counters("learner")["step"] > step,
            60, "generation and training while the stopper is down",
        )
        assert not run.sup.events_of("stopper", "up"), "the outage must still be on"
        assert run.total("cancels", "sampler") == cancels, "something was stopped while the stopper was down"
        await run.wait_event("stopper", "up", 120)
        await run.wait(lambda: run.total("cancels", "sampler") > cancels, 60, "stops after the stopper came back")
        result = await run.stop()
    assert result.exit_code == 0, result.reason
    assert result.actors["stopper"].incarnation == 1
    assert_each_sample_trained_once(tmp_path, cfg)


async def test_critic_killed_no_stop_without_a_value_then_recovers(tmp_path, tiny_model_dir):
    cfg = faults_config(transport={"restart_backoff_s": 4.0})
    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(lambda: run.counters("stopper").get("cancels_sent", 0) >= 2, 240, "the first stops")
        run.sup.kill_actor("critic")
        await run.wait_event("critic", "lost", 10)
        before = (await run.fresh(["stopper"]))["stopper"]
        await run.wait(lambda: run.counters("stopper").get("tokens", 0) > before.get("tokens", 0) + 300, 60,
                       "tokens reaching the stopper while the critic is down")
        assert not run.sup.events_of("critic", "up"), "the outage must still be on"
        now = run.counters("stopper")
        # The stopper judged nothing it had no value for: no value arrived, nothing was stopped.
        assert now.get("values", 0) == before.get("values", 0)
        assert now.get("cancels_sent", 0) == before.get("cancels_sent", 0)
        await run.wait_event("critic", "up", 120)
        await run.wait(
            lambda: run.counters("stopper").get("values", 0) > now.get("values", 0)
            and run.counters("stopper").get("cancels_sent", 0) > now.get("cancels_sent", 0),
            60, "values and stops after the critic came back",
        )
        result = await run.stop()
    assert result.exit_code == 0, result.reason
    assert_each_sample_trained_once(tmp_path, cfg)


async def test_learner_killed_resumes_from_its_checkpoint_and_loses_nothing(tmp_path, tiny_model_dir):
    cfg = faults_config(
        run={"total_steps": 9, "checkpoint_every": 2},
        stop={"warmup": {"enabled": True, "force_fraction": 0.2}},
    )
    async with SystemRun(cfg, tmp_path) as run:
        listener = Listener(run.sup.addresses["broadcast"])
        try:
            # Kill right after an odd step ends: its groups were received and trained, but the last
            # checkpoint (every 2 steps) is a step older, so they must come back from the
            # write-ahead log. (Killed just after an even step, nothing may be pending: a flaky
            # precondition in one fresh-clone CI run.)
            old = await listener.until(
                lambda m: isinstance(m, P.BatchBoundary) and m.step >= 3 and m.step % 2 == 1, 240
            )
            run.sup.kill_actor("learner")  # no teardown: the last checkpoint is a periodic one
            await run.wait_event("learner", "lost", 10)
            state = resumable_state(tmp_path)
            at_kill = received(tmp_path)
            new = await listener.until(lambda m: isinstance(m, P.BatchBoundary) and m.epoch != old.epoch, 180)
            result = await run.finish(240)
        finally:
            listener.close()
    assert result.exit_code == 0, result.reason
    assert state["step"] >= 2 and state["step"] % 2 == 0
    # The restarted learner resumes with the checkpoint's step, version, consumed groups, and stop
    # state (normaliser, beta, warm-up gate): exactly what its first broadcast says.
    assert (new.step, new.policy_version, new.groups_consumed) == (state["step"], state["version"], state["groups_consumed"])
    snap = state["controller"]["snapshot"]
    for key in ("mu", "var", "beta", "enabled", "step", "c", "eps", "hazard"):
        assert getattr(new.stop, key) == snap[key], key
    assert (snap["mu"], snap["var"]) != (0.0, 1.0), "the normaliser should have moved by then"
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == cfg.run.total_steps
    trajs = assert_each_sample_trained_once(tmp_path, cfg)
    # Nothing received is lost: every group complete in the log at the kill and not in the
    # checkpoint was trained after the restart (it came back from the write-ahead log).
    members = collections.defaultdict(set)
    for t in at_kill:
        members[t.prompt_id].add(t.sample_index)
    complete = {g for g, m in members.items() if len(m) == cfg.rollout.samples_per_prompt}
    pending = complete - set(state["consumed_groups"])
    assert pending, "the kill should leave received-but-untrained groups"
    assert pending <= set(learner_state(tmp_path)["consumed_groups"])
    assert len(trajs) >= len(at_kill)
    coord = result.actors["coordinator"].counters
    assert coord["learner_restarts"] == 1


async def test_hung_actor_is_named_killed_and_restarted(tmp_path, tiny_model_dir):
    """A sampler that stops answering (event loop blocked) is found within heartbeat_timeout_s,
    named, killed and restarted; it hangs again, and past transport.max_restarts the run ends
    naming it. Forged heartbeats and garbage on the supervisor's socket change nothing."""
    timeout_s = 3.0
    cfg = faults_config(
        actors={"sampler": {"count": 1, "options": {"hang_after_tokens": 40, "tokens_per_s": 200}}},
        transport={"heartbeat_timeout_s": timeout_s, "max_restarts": 1},
    )
    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(lambda: run.sup.started, 240, "the run to start")
        first_pid = run.sup.actors["sampler-0"].proc.pid
        ctx = zmq.asyncio.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(run.sup.addresses["control_in"])

        async def forge():  # a stranger pretending the hung sampler is fine
            while True:
                for frame in (
                    b"\x93garbage",
                    P.encode(P.Heartbeat(actor="sampler-0", role="sampler", pid=1, seq=1, time=0.0, status="running",
                                         counters={"step": math.nan})),
                    P.encode(P.Heartbeat(actor="nobody", role="x", pid=1, seq=1, time=0.0, status="running")),
                ):
                    await push.send(frame)
                await asyncio.sleep(0.2)  # a periodic background nuisance, not synchronisation

        forger = asyncio.create_task(forge())
        try:
            first = await run.wait_event("sampler-0", "lost", 60)
            assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
            await run.wait_event("sampler-0", "up", 120)
            second = await run.wait_event("sampler-0", "lost", 60, count=2)
            result = await run.finish(60)
        finally:
            forger.cancel()
            push.close()
            ctx.term()
    for event in (first, second):
        assert event.detail.startswith("is hung: no heartbeat for"), event.detail
        silent = float(event.detail.split("for ")[1].split("s")[0])
        assert timeout_s < silent <= timeout_s + 1.5, event.detail
    assert result.exit_code == 1
    assert "sampler-0 (sampler) is hung" in result.reason and "transport.max_restarts=1" in result.reason
    assert [e.kind for e in result.events if e.actor == "sampler-0"] == ["lost", "restarting", "up", "lost", "gave_up"]
    wire = run.sup.transport.errors
    assert wire["bad_frames"] > 0
    assert run.sup.counters["heartbeats_stale_pid"] > 0 and run.sup.counters["heartbeats_unknown_actor"] > 0
    assert run.sup.counters["bad_heartbeats"] == 0


async def test_coordinator_killed_run_goes_on(tmp_path, tiny_model_dir):
    cfg = faults_config(run={"total_steps": 10})
    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(lambda: run.counters("learner").get("step", 0) >= 2, 240, "learner step 2")
        run.sup.kill_actor("coordinator")
        await run.wait_event("coordinator", "lost", 10)
        await run.wait_event("coordinator", "up", 120)
        result = await run.finish(240)
    assert result.exit_code == 0, result.reason
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == cfg.run.total_steps
    assert_each_sample_trained_once(tmp_path, cfg)
