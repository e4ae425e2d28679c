"""The learner on several ranks (espo_async/training/data_parallel.py) on CPU with gloo.

Rank 0 runs in a driver subprocess (this file run as a module: ``python -m
tests.training.test_data_parallel SPEC.json``) and starts its worker rank itself, exactly as the
learner actor does; the one-rank reference runs in the test process. Every driver run starts two
Python processes that import torch, transformers and DeepSpeed (~10-15 s each on a 2-core box).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]


def make_cfg(stage: int, world: int, timeout_s: float = 60.0, **algo):
    from espo_async.config import parse_config

    base = {"lr": 1e-3, "critic_lr": 1e-3}
    base.update(algo)
    return parse_config({"algo": base, "rollout": {"max_tokens": 48},
                         "deepspeed": {"zero_stage": stage, "world_size": world, "timeout_s": timeout_s}})


# The update of the equivalence tests: several minibatches of uneven size, micro-batches small
# enough that the two ranks' plans differ in length (dummy passes), the KL to a reference (a
# third model pass) and the entropy bonus.
ALGO = {"minibatches": 3, "kl_coef": 0.05, "entropy_coef": 0.01}
MICRO_BATCH_TOKENS = 160


def batches():
    from tests.training.test_trainer import make_batch

    # the T-PPO critic batch has a single row: rank 1 has nothing to do but keep in step
    return make_batch(seed=5), make_batch(seed=6), make_batch(seed=11, n_groups=1, per_group=1)


def _build(spec: dict):
    from espo_async.models.tiny import build_tiny_model
    from espo_async.training.data_parallel import make_trainer

    tiny = str(build_tiny_model(None))
    cfg = make_cfg(spec["stage"], spec["world"], spec.get("timeout_s", 60.0), **spec.get("algo", {}))
    work = Path(spec["work"])
    return make_trainer(cfg, tiny, tiny, critic_from_policy=True, work_dir=work / "learner",
                        micro_batch_tokens=spec.get("micro_batch_tokens"), log_dir=work / "logs")


# ------------------------------------------------------------------------------------ driver
def _driver(spec_path: str) -> None:
    """Rank 0 of a two-rank learner; writes what it saw to spec["out"] (JSON)."""
    from espo_async.training.data_parallel import DataParallelError
    from espo_async.training.tppo import train_critic_mc

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    work = Path(spec["work"])
    out: dict = {}

    def dump() -> None:
        tmp = Path(spec["out"] + ".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, spec["out"])

    t0 = time.monotonic()
    tr = _build(spec)
    out["start_seconds"] = time.monotonic() - t0
    out["workers"] = [w.proc.pid for w in tr.commands.workers]
    b1, b2, b_critic = batches()
    mode = spec["mode"]
    if mode == "equiv":
        t0 = time.monotonic()
        out["m1"] = tr.train_step(b1, step=1, learner_version=0)
        out["step_seconds"] = time.monotonic() - t0
        out["mc"] = train_critic_mc(tr, b_critic)
        tr.save_policy_weights(work / "policy1.safetensors")
        tr.save_critic_weights(work / "critic1.safetensors")
        tr.save_checkpoint(work / "ckpt")
        tr.train_step(b2, step=2, learner_version=1)
        tr.save_policy_weights(work / "policy2.safetensors")
        tr.load_checkpoint(work / "ckpt")  # every rank reads its own partitions back
        tr.train_step(b2, step=2, learner_version=1)
        tr.save_policy_weights(work / "policy2b.safetensors")
        tr.export_hf(work / "hf")
        tr.close()
        out["exit_codes"] = tr.commands.close()
    elif mode in ("kill", "hang", "idle"):
        tr.train_step(b1, step=1, learner_version=0)
        victim = tr.commands.workers[0].proc
        update = tr._update
        if mode == "idle":  # lost between two steps: rank 0's watch notices, the next step fails
            victim.kill()
            victim.wait()
            time.sleep(1.5)

        def update_after_losing_the_worker(*args, **kwargs):  # mid-step: after the gathered no-grad pass
            if mode == "kill":
                victim.kill()
                victim.wait()
            else:
                os.kill(victim.pid, signal.SIGSTOP)  # alive, silent: only the timeout can tell
            return update(*args, **kwargs)

        if mode != "idle":
            tr._update = update_after_losing_the_worker
        t0 = time.monotonic()
        try:
            tr.train_step(b2, step=2, learner_version=1)
            out["error"] = None
        except DataParallelError as exc:
            out["error"] = str(exc)
        out["error_seconds"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:  # the group is broken: the next operation fails at once
            tr.save_checkpoint(work / "ckpt")
            out["error2"] = None
        except DataParallelError as exc:
            out["error2"] = str(exc)
        out["error2_seconds"] = time.monotonic() - t0
        tr.close()
        out["exit_codes"] = tr.commands.close()
    elif mode == "orphan":
        tr.train_step(b1, step=1, learner_version=0)
        out["ready"] = True
        dump()
        time.sleep(600)  # the test kills this process
    dump()


# ------------------------------------------------------------------------------------ helpers
def run_driver(tmp_path: Path, mode: str, *, stage: int = 2, timeout: float = 240, **spec) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = {"mode": mode, "stage": stage, "world": 2, "work": str(tmp_path), "out": str(tmp_path / "out.json"), **spec}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-m", "tests.training.test_data_parallel", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_tree(proc)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    out["output"] = text
    return out


def _env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # an in-process trainer's
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [proc, *kids]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _gone(pid: int, within: float) -> bool:
    import psutil

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _assert_close(a: dict, b: dict, *, atol: float, what: str) -> None:
    """Weights after the same Adam steps on one rank and on two. The ranks sum the gradient in
    another order (float32 reordering error, tests/numerics.py); Adam's first step moves an entry
    by lr * g / (|g| + 1e-8), so an entry's reordering error reaches the weights scaled by at most
    lr * 1e-8 / (|g| + 1e-8)^2 per unit of gradient error: negligible for every gradient entry
    well above Adam's eps, and 0 for the exact zeros (padding rows). ``atol`` (2e-5 = 2% of the
    test's lr 1e-3) leaves that margin; a dropped or double-counted rank moves entries by ~lr.
    Not CPU-specific: it holds on AVX2 and AVX-512 machines alike as long as no gradient entry
    lies within a few float32 ulps of Adam's eps, which the batches here do not produce."""
    assert a.keys() == b.keys(), what
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), (what, k, worst)


# -------------------------------------------------------------------------------------- tests
def test_codec_round_trips_samples_without_pickle():
    from espo_async.training.data_parallel import decode, encode

    b1, _, _ = batches()
    msg = {"op": "train_step", "args": {"samples": b1, "step": np.int64(3), "learner_version": 2}}
    back = decode(encode(msg))
    assert back["args"]["step"] == 3 and len(back["args"]["samples"]) == len(b1)
    for x, y in zip(b1, back["args"]["samples"]):
        assert x.ending == y.ending and x.group_id == y.group_id and x.task_reward == y.task_reward
        for name in ("prompt_ids", "response_ids", "behaviour_logprobs", "versions"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype and np.array_equal(u, v) and v.flags.writeable
    with pytest.raises(TypeError):
        encode({"x": object()})


def test_config_world_size_validated():
    from espo_async.config import ConfigError, parse_config

    assert parse_config({}).deepspeed.world_size == 1
    assert parse_config({"deepspeed": {"world_size": 3, "worker_cpus": [[0], [1]]}}).deepspeed.worker_cpus == [[0], [1]]
    for bad in ({"world_size": 0}, {"world_size": 2, "worker_cpus": [[0], [1]]}, {"world_size": 2, "worker_cpus": [[]]},
                {"timeout_s": 0}):
        with pytest.raises(ConfigError):
            parse_config({"deepspeed": bad})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_update_like_one(tmp_path, stage):
    """World size 2 (ZeRO-2 / ZeRO-3, gloo): the same parameters and metrics as world size 1 on
    the same batch; the critic's T-PPO update with one row (rank 1: dummy passes only); weights
    gathered for the files (ZeRO-3), a checkpoint written and read back by both ranks, the HF
    export; the worker exits when rank 0 stops."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from espo_async.engines.weights import to_state_dict
    from espo_async.training.tppo import train_critic_mc

    out = run_driver(tmp_path / "dp", "equiv", stage=stage, algo=ALGO, micro_batch_tokens=MICRO_BATCH_TOKENS)
    assert out["exit_codes"] == [0]
    assert _gone(out["workers"][0], 5.0)

    ref = _build({"stage": stage, "world": 1, "work": str(tmp_path / "ref"), "algo": ALGO,
                  "micro_batch_tokens": MICRO_BATCH_TOKENS})
    assert ref.world_size == 1 and ref.commands is None
    b1, _, b_critic = batches()
    m1 = ref.train_step(b1, step=1, learner_version=0)
    mc = train_critic_mc(ref, b_critic)
    for key in ("n_samples", "n_tokens", "policy_loss", "critic_loss", "kl", "entropy", "clipfrac", "approx_kl",
                "grad_norm", "critic_grad_norm", "adv_mean", "adv_std", "value_mean", "return_mean"):
        assert out["m1"][key] == pytest.approx(m1[key], rel=1e-3, abs=1e-5), key
    for key in ("critic_loss", "critic_rollouts", "critic_grad_norm"):
        assert out["mc"][key] == pytest.approx(mc[key], rel=1e-3, abs=1e-5), key

    dp = tmp_path / "dp"
    with ref._full_params(ref.policy.lm):
        policy = {k: v.clone() for k, v in to_state_dict(ref.policy.lm).items()}
    with ref._full_params(ref.critic):
        critic = {k: v.clone() for k, v in to_state_dict(ref.critic).items()}
    _assert_close(load_file(str(dp / "policy1.safetensors")), policy, atol=2e-5, what="policy")
    _assert_close(load_file(str(dp / "critic1.safetensors")), critic, atol=2e-5, what="critic")

    # resumed through the command loop: both ranks load their partitions, the next step agrees
    p2, p2b = load_file(str(dp / "policy2.safetensors")), load_file(str(dp / "policy2b.safetensors"))
    assert any(not torch.equal(p2[k], load_file(str(dp / "policy1.safetensors"))[k]) for k in p2)
    _assert_close(p2, p2b, atol=1e-6, what="resume")
    state = json.loads((dp / "ckpt" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == stage
    parts = sorted(p.name for p in (dp / "ckpt" / "policy" / "state").iterdir())
    assert any("rank_1" in name for name in parts), parts  # rank 1 wrote its ZeRO partition
    hf = AutoModelForCausalLM.from_pretrained(str(dp / "hf"))
    _assert_close({k: v for k, v in hf.state_dict().items() if k in p2b}, p2b, atol=0.0, what="export")

    # a checkpoint of two ZeRO ranks does not load into one
    with pytest.raises(ValueError, match="2 rank"):
        ref.load_checkpoint(dp / "ckpt")
    assert "stopped by rank 0" in (dp / "logs" / "learner-rank1.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "idle", "hang"])
def test_lost_worker_fails_rank0_loudly(tmp_path, mode):
    """A worker SIGKILLed in the middle of a step: rank 0's next collective fails at once (the
    connection closes) with a DataParallelError naming the rank and its exit; SIGKILLed between
    steps: the next step fails before it starts; a worker that hangs (SIGSTOP) fails the step
    after deepspeed.timeout_s. Afterwards every operation fails at once."""
    timeout_s = 8.0
    out = run_driver(tmp_path, mode, timeout_s=timeout_s)
    assert out["error"] is not None, "the step did not fail"
    assert "rank 1" in out["error"] and "train_step" in out["error"], out["error"]
    if mode in ("kill", "idle"):
        assert "SIGKILL" in out["error"], out["error"]
        assert out["error_seconds"] < 10.0, out["error_seconds"]
    else:
        assert "running" in out["error"], out["error"]  # rank 1 alive, silent
        assert timeout_s - 1 <= out["error_seconds"] < timeout_s + 15, out["error_seconds"]
    assert out["error2"] is not None and out["error2_seconds"] < 5.0, out
    assert _gone(out["workers"][0], 10.0)


@pytest.mark.slow
def test_worker_dies_with_rank0(tmp_path):
    """rank 0 SIGKILLed (no chance to stop anyone): its worker exits by itself (no orphan)."""
    spec = {"mode": "orphan", "stage": 2, "world": 2, "work": str(tmp_path), "out": str(tmp_path / "out.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-m", "tests.training.test_data_parallel", str(tmp_path / "spec.json")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    worker = None
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "out.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the driver did not get ready"
            time.sleep(0.2)
        worker = json.loads((tmp_path / "out.json").read_text())["workers"][0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _gone(worker, 5.0), "the worker outlived rank 0"
    finally:
        _kill_tree(proc)
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------- the whole system
def _workers_of(pid: int) -> list[int]:
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if "espo_async.training.data_parallel" in " ".join(k.cmdline()):
                out.append(k.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
async def test_run_with_a_two_rank_learner(tmp_path, tiny_model_dir):
    """run.py's system (fake samplers and critic, configs/fake.yaml's actors) with
    deepspeed.world_size 2: the learner starts its worker, trains, checkpoints (both ranks'
    ZeRO partitions), and the worker exits with the run."""
    from espo_async.runtime.metrics import read_metrics
    from tests.runtime.system import fake_config, run_system

    cfg = fake_config(deepspeed={"world_size": 2, "zero_stage": 2, "worker_cpus": [[0]]}, task={"eval_problems": 0})
    result = await run_system(cfg, tmp_path, timeout=240)
    assert result.exit_code == 0, result.reason
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert all(np.isfinite(r["policy_loss"]) and np.isfinite(r["grad_norm"]) for r in read_metrics(tmp_path))
    log = (tmp_path / "logs" / "learner.log").read_text()
    assert "data-parallel learner: 2 ranks" in log
    pid = int(log.split("rank 1 pid ")[1].split()[0])
    assert _gone(pid, 5.0)
    worker_log = (tmp_path / "logs" / "learner-rank1.log").read_text()
    assert "stopped by rank 0" in worker_log
    assert "CPUs [0]," in worker_log  # deepspeed.worker_cpus
    parts = [p.name for p in (tmp_path / "checkpoint" / "trainer" / "policy" / "state").iterdir()]
    assert any("zero_pp_rank_1" in name for name in parts), parts
    assert (tmp_path / "final" / "config.json").is_file()


@pytest.mark.slow
async def test_worker_crash_restarts_the_learner_which_resumes(tmp_path, tiny_model_dir):
    """The learner's worker is SIGKILLed mid-run: the learner fails loudly (DataParallelError
    naming rank 1), its supervisor restarts it with a new worker, it resumes from its checkpoint
    and the run finishes."""
    from espo_async.runtime.metrics import read_metrics
    from tests.reliability.system_run import SystemRun, faults_config

    cfg = faults_config(run={"total_steps": 4, "checkpoint_every": 1},
                        deepspeed={"world_size": 2, "zero_stage": 2, "timeout_s": 60})
    async with SystemRun(cfg, tmp_path) as run:
        await run.wait(lambda: run.counters("learner").get("step", 0) >= 2, 240, "learner step 2")
        learner = run.sup.actors["learner"].proc.pid
        (old,) = _workers_of(learner)
        os.kill(old, signal.SIGKILL)
        await run.wait_event("learner", "lost", 60)
        await run.wait_event("learner", "up", 120)
        new = _workers_of(run.sup.actors["learner"].proc.pid)
        result = await run.finish(240)
    assert result.exit_code == 0, result.reason
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == cfg.run.total_steps
    log = (tmp_path / "logs" / "learner.log").read_text()
    assert "DataParallelError" in log and f"rank 1 (pid {old})" in log and "SIGKILL" in log, log[-3000:]
    assert "resumed from step" in log
    assert new and all(_gone(pid, 10.0) for pid in [old, *new])


@pytest.mark.slow
def test_launcher_starts_the_ranks(tmp_path, tiny_model_dir):
    """Path (b) on one host: a head runs every role but the learner; ``torchrun`` starts two
    ranks of ``python -m espo_async.training.data_parallel --join ...``: rank 0 becomes the
    learner (run.py, learner role), rank 1 a worker; RANK/WORLD_SIZE/MASTER_* are torchrun's."""
    from espo_async.runtime.metrics import read_metrics

    head_dir, learner_dir = tmp_path / "head", tmp_path / "learner"
    sets = ["transport.kind=tcp", "run.total_steps=2", "run.tensorboard=false", "task.eval_problems=0",
            "deepspeed.zero_stage=2"]
    head = subprocess.Popen([sys.executable, "run.py", "--config", "configs/fake.yaml",
                             *[x for kv in sets for x in ("--set", kv)],
                             "--roles", "coordinator,stopper,critic,sampler", "--run-dir", str(head_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    ranks = None
    try:
        deadline = time.monotonic() + 60
        while not (head_dir / "join.json").is_file():
            assert head.poll() is None and time.monotonic() < deadline, "the head did not start"
            time.sleep(0.2)
        torchrun = Path(sys.executable).parent / "torchrun"
        ranks = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                                  "espo_async.training.data_parallel", "--join", str(head_dir / "join.json"),
                                  "--run-dir", str(learner_dir), "--host-name", "learner"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
        out, _ = ranks.communicate(timeout=240)
        text = out.decode(errors="replace")
        assert ranks.returncode == 0, text[-4000:]
        head_out, _ = head.communicate(timeout=60)
        assert head.returncode == 0, head_out.decode(errors="replace")[-3000:]
    finally:
        for p in (head, ranks):
            if p is not None:
                _kill_tree(p)
    assert [r["step"] for r in read_metrics(learner_dir)] == [1, 2]
    assert "joined: rank 1 of 2" in text and "stopped by rank 0" in text
    assert "rank 0 of 2 ranks started by a launcher" in (learner_dir / "logs" / "learner.log").read_text()
    parts = [p.name for p in (learner_dir / "checkpoint" / "trainer" / "policy" / "state").iterdir()]
    assert any("zero_pp_rank_1" in name for name in parts), parts


if __name__ == "__main__":
    _driver(sys.argv[1])
