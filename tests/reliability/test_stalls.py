"""Runs that used to stall forever, silently (docs/reliability.md, "Stalls"): each must finish,
or end with exit code 1 and a message naming what it waited for.

Whole runs: real supervisor, coordinator, fake samplers, fake critic, real stopper and the real
learner on the tiny model; heartbeats every 0.25 s. Every wait is on the supervisor's
state-change event with a timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json

import pytest

from espo_async.runtime.metrics import read_metrics
from tests.reliability.system_run import SystemRun, faults_config
from tests.reliability.test_faults import assert_each_sample_trained_once
from tests.runtime.system import learner_state

pytestmark = pytest.mark.slow


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_run_folder_is_the_record(run_dir, cfg) -> None:
    """trained.jsonl names, per step, the (prompt, sample, attempt) rows that step trained on
    (the last line of a step counts); events.jsonl and counters.jsonl exist."""
    steps = {}
    for row in lines(run_dir / "trained.jsonl"):
        steps[row["step"]] = row["samples"]
    assert sorted(steps) == list(range(1, cfg.run.total_steps + 1))
    per_step = cfg.rollout.prompts_per_batch * cfg.rollout.samples_per_prompt
    assert all(len(rows) == per_step for rows in steps.values())
    trained_groups = {r[0] for rows in steps.values() for r in rows}
    assert trained_groups == set(learner_state(run_dir)["consumed_groups"])
    counters = lines(run_dir / "counters.jsonl")
    assert counters[-1]["final"] and "coordinator" in counters[-1]["actors"]
    assert lines(run_dir / "events.jsonl")[-1]["kind"] == "run_ended"


async def test_coordinator_killed_mid_evaluation_round_the_round_finishes(tmp_path, tiny_model_dir):
    """Evaluation rounds on (before training, every 2 steps, after); the coordinator is killed
    while a round is under way (some of its samples scored, not all). Before: the learner waited
    forever for the round (it re-announced a round only while it had no result yet, and the
    restarted coordinator had forgotten the round's work)."""
    cfg = faults_config(
        run={"total_steps": 4},
        task={"eval_problems": 12, "eval_samples": 2, "eval_every": 2},
        actors={"sampler": {"options": {"tokens_per_s": 60}}},
    )
    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(
            lambda: run.counters("learner").get("eval_pending", 0) >= 1
            and run.counters("learner").get("eval_scored", 0) >= 2
            and run.counters("coordinator").get("eval_rounds", 0) >= 1,
            240, "an evaluation round under way",
        )
        scored = run.counters("learner")["eval_scored"]
        run.sup.kill_actor("coordinator")
        await run.wait_event("coordinator", "lost", 10)
        await run.wait_event("coordinator", "up", 120)
        result = await run.finish(300)
    assert result.exit_code == 0, result.reason
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == cfg.run.total_steps
    rounds = lines(tmp_path / "eval.jsonl")
    assert [r["round"] for r in rounds] == [0, 2, 4]
    assert all(r["n"] == 12 * 2 for r in rounds)
    assert 2 <= scored
    assert_each_sample_trained_once(tmp_path, cfg)
    assert_run_folder_is_the_record(tmp_path, cfg)
    kinds = [e["kind"] for e in lines(tmp_path / "events.jsonl") if e.get("actor") == "coordinator"]
    assert kinds == ["lost", "restarting", "up"]


async def test_coordinator_and_a_sampler_killed_together_every_group_is_recovered(tmp_path, tiny_model_dir):
    """Three samplers, staleness 2; the coordinator and a sampler that holds work die together
    (one host lost). Before: the restarted coordinator resumed at the learner's consumed-group
    count, above groups whose missing samples died with the sampler, and the run stalled one step
    before its end with every actor healthy."""
    cfg = faults_config(
        run={"total_steps": 8},
        rollout={"staleness": 2, "prompts_per_batch": 2, "samples_per_prompt": 2},
        # Group 1 is generated slowly: groups 2, 3, ... complete and are consumed before it, so a
        # sampler holds a sample of a group below the learner's consumed-group count.
        actors={"sampler": {"count": 3, "options": {"tokens_per_s": 100, "max_concurrency": 2,
                                                    "slow_prompts": "g1/", "slow_tokens_per_s": 2.0}}},
    )
    samplers = [f"sampler-{i}" for i in range(3)]

    def behind() -> str | None:
        """A sampler still generating for a group below the learner's consumed-group count (groups
        complete out of order): the case a count cannot recover."""
        c = run.counters("coordinator")
        for name in samplers:
            if c.get(f"oldest_group.{name}", float("inf")) < c.get("groups_consumed", 0):
                return name
        return None

    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(lambda: run.counters("learner").get("step", 0) >= 1 and behind() is not None
                       and run.counters("learner").get("step", 0) < cfg.run.total_steps - 1,
                       240, "a sampler holding a sample of a group below the consumed count")
        victim = behind()
        run.sup.kill_actor(victim)
        run.sup.kill_actor("coordinator")
        await run.wait_event("coordinator", "lost", 10)
        await run.wait_event(victim, "lost", 10)
        await run.wait_event("coordinator", "up", 120)
        result = await run.finish(300)
    assert result.exit_code == 0, result.reason
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == cfg.run.total_steps
    assert result.actors["coordinator"].counters.get("restored_requests", 0) >= 1
    trajs = assert_each_sample_trained_once(tmp_path, cfg)
    assert any(t.attempt >= 1 for t in trajs)
    assert_run_folder_is_the_record(tmp_path, cfg)


async def test_an_unfinishable_group_ends_the_run_naming_what_it_waited_for(tmp_path, tiny_model_dir):
    """Every sampler stalls on group 2 (the fake engine's never_finish: its processes stay
    healthy). After run.stall_timeout_s the run says what it waits for (console, stall.json,
    stalls.jsonl, events.jsonl), issues the missing samples again, and after
    run.stall_reissues recoveries without progress ends with exit code 1 naming them."""
    cfg = faults_config(
        run={"total_steps": 6, "stall_timeout_s": 3.0, "stall_reissues": 1, "counters_every_s": 1.0},
        actors={"sampler": {"options": {"never_finish": "g2/"}}},
    )
    async with SystemRun(cfg, tmp_path) as run:
        result = await run.finish(400)
    assert result.exit_code == 1, result.reason
    assert "stalled" in result.reason and "g2/" in result.reason and "run.stall_reissues=1" in result.reason
    report = json.loads((tmp_path / "stall.json").read_text())
    assert report["action"] == "giving up"
    (group,) = [g for g in report["groups"] if g["prompt_id"].startswith("g2/")]
    assert group["missing"] and all(m["state"] in ("issued", "queued") for m in group["missing"])
    assert any(m.get("to", "").startswith("sampler-") and m["issued_at"] > 0 for m in group["missing"])
    stalls = lines(tmp_path / "stalls.jsonl")  # (a slow learner step may add an early, recovered one)
    assert [s["action"] for s in stalls][-2:] == ["issuing the missing samples again", "giving up"]
    assert all(s["action"] == "issuing the missing samples again" for s in stalls[:-1])
    events = lines(tmp_path / "events.jsonl")
    assert len([e for e in events if e["kind"] == "stalled"]) == len(stalls)
    assert events[-1]["kind"] == "run_ended" and events[-1]["exit_code"] == 1
    assert result.actors["coordinator"].counters["stall_reissued"] >= 1
    counters = lines(tmp_path / "counters.jsonl")
    assert len(counters) >= 2 and counters[-1]["final"]
    trained = [r for row in lines(tmp_path / "trained.jsonl") for r in row["samples"]]
    assert trained and not any(r[0].startswith("g2/") for r in trained)
