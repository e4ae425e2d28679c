"""The whole actor system: real processes, real ZeroMQ sockets, fake samplers and critic,
the real DeepSpeed learner on the tiny model."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from transformers import AutoTokenizer

from espo_async.ids import group_of
from espo_async.runtime.metrics import read_metrics
from espo_async.runtime.weight_files import weight_files_dir
from tests.runtime.system import fake_config, learner_state, received, run_system

pytestmark = pytest.mark.slow


async def test_espo_run_completes_with_exactly_one_trajectory_per_sample(tmp_path, tiny_model_dir):
    cfg = fake_config(stop={"shadow_fraction": 1.0})
    result = await run_system(cfg, tmp_path)
    assert result.exit_code == 0, result.reason
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "accuracy", "stop_rate", "tokens_generated", "tokens_saved_est", "beta", "norm_mu",
                "norm_var", "policy_loss", "critic_loss", "kl", "entropy", "tokens_per_s"):
        assert key in rows[-1], key
    assert (tmp_path / "final" / "config.json").is_file()
    # Every sampler loaded the weights of every step; a one-host run keeps those files in
    # memory (weights.dir auto -> /dev/shm) and frees them at the end.
    for log in (tmp_path / "logs").glob("sampler-*.weights.jsonl"):
        loaded = [json.loads(line)["version"] for line in log.read_text().splitlines()]
        assert max(loaded) >= cfg.run.total_steps - 1, (log.name, loaded)
    transient = weight_files_dir(cfg, tmp_path)
    assert transient != tmp_path / "weights" and not (tmp_path / "weights").exists()
    assert not transient.exists(), "weight files left in /dev/shm after the run"

    trajs = received(tmp_path)
    keys = [(t.prompt_id, t.sample_index) for t in trajs]
    assert len(keys) == len(set(keys)), "a trajectory reached the learner twice"
    # Every group the learner trained on is complete: one trajectory per (prompt, sample).
    by_group = collections.defaultdict(set)
    for t in trajs:
        by_group[t.prompt_id].add(t.sample_index)
    consumed = learner_state(tmp_path)["consumed_groups"]
    assert len(consumed) == cfg.run.total_steps * cfg.rollout.prompts_per_batch
    for gid in consumed:
        assert by_group[gid] == set(range(cfg.rollout.samples_per_prompt)), gid

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    endings = collections.Counter(t.ending for t in trajs)
    assert endings["absorbed"] > 0 and endings["finished"] > 0, endings
    for t in trajs:
        if t.ending == "absorbed":  # cut at the stop token; aborted before its natural end
            # (bad fake rollouts ramble to max_tokens; how fast the abort lands is a benchmark)
            assert len(t.token_ids) == t.stop_index + 1 <= t.tokens_generated < cfg.rollout.max_tokens
        elif t.ending == "finished":
            assert t.token_ids[-1] == eos and t.tokens_generated == len(t.token_ids)
        elif t.ending == "truncated":
            assert len(t.token_ids) == cfg.rollout.max_tokens
        # Every token records the policy version that produced it; versions never go back.
        assert len(t.versions) == len(t.token_ids) and (np.diff(t.versions) >= 0).all()
        # Staleness bound: the sampler waited for the version the work was issued at, and no
        # group was started more than K versions ahead of the learner.
        if len(t.versions):
            assert t.versions[0] >= t.issued_at_version
        k, p = cfg.rollout.staleness, cfg.rollout.prompts_per_batch
        assert group_of(t.prompt_id) < (t.issued_at_version + k + 1) * p
    # Every stopped rollout was continued in a shadow request, scored, and never trained on.
    shadows = [json.loads(line) for line in (tmp_path / "shadow.jsonl").read_text().splitlines()]
    assert 0 < len(shadows) <= endings["absorbed"]
    assert all(t.purpose == "train" for t in trajs)
    assert any("false_positive_rate" in r for r in rows)
    # Backpressure: the learner never holds more than K + 1 batches of groups.
    k, p = cfg.rollout.staleness, cfg.rollout.prompts_per_batch
    assert 0 < result.actors["learner"].counters["max_buffered_groups"] <= (k + 1) * p
    # The stop rule fired on the rollouts that went wrong, not on good ones.
    from espo_async.tasks.registry import make_task
    from espo_async.tasks.reward import TaskReward

    reward = TaskReward(make_task("arithmetic", n_steps=3))
    gold_prefix_ok = [reward(t.prompt_id, t.text) for t in trajs if t.ending == "finished"]
    assert all(r == 1.0 for r in gold_prefix_ok)


async def test_swapped_stopper_class_and_on_policy_bound(tmp_path, tiny_model_dir):
    cfg = fake_config(
        run={"total_steps": 2},
        rollout={"staleness": 0},
        actors={"stopper": {"class": "tests.runtime.alt_actors:ObservingStopper"}},
    )
    result = await run_system(cfg, tmp_path)
    assert result.exit_code == 0, result.reason
    assert result.actors["stopper"].counters.get("observed_tokens", 0) > 0
    trajs = received(tmp_path)
    assert all(t.ending != "absorbed" for t in trajs)
    # K = 0: every trained rollout was generated entirely by the policy of its batch.
    for t in trajs:
        batch = group_of(t.prompt_id) // cfg.rollout.prompts_per_batch
        if len(t.versions) and t.prompt_id in learner_state(tmp_path)["consumed_groups"]:
            assert set(t.versions.tolist()) == {batch}


def test_ctrl_c_stops_every_process(tmp_path, tiny_model_dir):
    cfg_path = tmp_path / "cfg.yaml"
    cfg = fake_config(run={"total_steps": 1000})
    cfg_path.write_text(cfg.to_yaml())
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "run.py", "--config", str(cfg_path), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):  # first learner step
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no learner step within 180 s"
            time.sleep(0.2)  # polling a file another process writes; there is no event to wait on
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 5
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        output = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, output[-3000:]
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"orphans: {[p.pid for p in alive]}"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to keep the supervisor off the sampler's")
async def test_actors_placement_cpus_and_niceness(tmp_path, tiny_model_dir):
    """The supervisor keeps off the samplers' CPUs, unpinned actors get every CPU, and
    ``actors.<role>.nice`` lowers that role's priority only."""
    import asyncio

    from espo_async.assets import prepare_assets
    from espo_async.runtime.placement import thread_ids
    from espo_async.runtime.supervisor import Supervisor

    everything = os.sched_getaffinity(0)
    first = min(everything)
    cfg = fake_config(run={"total_steps": 1}, actors={"sampler": {"cpus": [first]}, "learner": {"class": "actors.learner:Learner", "nice": 5}})
    await asyncio.to_thread(prepare_assets, cfg, tmp_path, log=lambda *_: None)
    sup = Supervisor(cfg, tmp_path, progress=False)
    task = asyncio.create_task(sup.run())
    await sup.wait_for(lambda s: all(a.proc is not None for a in s.actors.values()), timeout=120)
    during = {"supervisor": set.union(*(os.sched_getaffinity(t) for t in thread_ids()))} | {
        name: os.sched_getaffinity(a.proc.pid) for name, a in sup.actors.items()}
    nice = {name: os.getpriority(os.PRIO_PROCESS, a.proc.pid) for name, a in sup.actors.items()}
    result = await asyncio.wait_for(task, 600)
    assert result.exit_code == 0, result.reason
    assert during["supervisor"] == everything - {first}  # every thread, ZeroMQ's I/O threads too
    assert during["sampler-0"] == during["sampler-1"] == {first}
    assert during["stopper"] == during["learner"] == everything  # not the supervisor's
    assert os.sched_getaffinity(0) == everything  # restored when the run ended
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice["learner"] == min(19, mine + 5)
    assert nice["stopper"] == nice["sampler-0"] == mine


async def test_summary_reports_accuracy_with_errors_and_the_paired_gain(tmp_path, tiny_model_dir):
    """summary.json: both held-out ends with their standard error over problems, and the
    before/after gain paired by problem (the rounds' prompt ids differ: e0/<id> and e2/<id>).
    "before" is sampled by the start policy alone, however slowly its round is generated."""
    # The start-policy round (prompt ids e0/...) is generated slowly, so training would race it.
    slow_eval = {"max_concurrency": 3, "tokens_per_s": 300, "slow_prompts": "e0/", "slow_tokens_per_s": 40}
    cfg = fake_config(run={"total_steps": 2}, task={"eval_problems": 8, "eval_samples": 2},
                      actors={"sampler": {"options": slow_eval}})
    result = await run_system(cfg, tmp_path)
    assert result.exit_code == 0, result.reason
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["step"] == 0 and after["step"] == 2 and before["n"] == after["n"] == 16
    # "before" is the start policy alone: training waits until its round is sampled
    assert before["sampled_versions"] == [0, 0] and after["sampled_versions"] == [2, 2]
    for e in (before, after):
        assert len(e["per_problem"]) == 8 and 0 <= e["accuracy_se"] <= 0.5
        assert sum(e["per_problem"].values()) / 8 == pytest.approx(e["accuracy"])
    gain = summary["eval_gain"]
    assert gain["problems"] == 8
    assert gain["accuracy"] == pytest.approx(after["accuracy"] - before["accuracy"])
