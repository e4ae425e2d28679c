"""Several hosts, simulated with separate supervisors on TCP 127.0.0.1 (docs/cluster.md).

The head "host" is a supervisor (in this process) for the coordinator, the real learner, the
stopper and the fake critic, with ``cluster.roles`` naming them; each sampler "host" is its own
``python run.py --join HEAD/join.json --roles sampler --host-name NAME`` process with its own
supervisor and its own run folder. Sampler host A leaves mid-run while it holds work (its
supervisor and its actors are SIGKILLed: the host is gone, nobody tells the head); the head's
coordinator notices the silence after ``transport.heartbeat_timeout_s`` and issues A's work again.
Host C joins afterwards and gets work. Training finishes; the hosts that are left end their runs
by themselves (the learner's end-of-training broadcast). Every wait is on an event or a
condition with a timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from espo_async.config import ConfigError
from run import main as run_main
from tests.reliability.system_run import SystemRun
from tests.reliability.test_faults import assert_each_sample_trained_once
from tests.runtime.system import fake_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 6.0  # transport.heartbeat_timeout_s: how long a silent sampler host may be silent


def head_config():
    return fake_config(
        run={"name": "multihost", "total_steps": 5},
        task={"eval_problems": 0},
        actors={"sampler": {"count": 1, "options": {"max_concurrency": 3, "tokens_per_s": 40, "p_bad": 0.5}}},
        transport={
            "kind": "tcp",
            "host": "127.0.0.1",
            "heartbeat_interval_s": 0.25,
            "heartbeat_timeout_s": TIMEOUT_S,
            "startup_timeout_s": 240,
            "restart_backoff_s": 0.3,
        },
        cluster={"roles": ["coordinator", "learner", "stopper", "critic"]},
    )


def join(head_dir: Path, host: str, run_dir: Path, *sets: str) -> subprocess.Popen:
    """A sampler host: run.py with its own supervisor, in its own process group."""
    args = [sys.executable, "run.py", "--join", str(head_dir / "join.json"), "--roles", "sampler",
            "--host-name", host, "--run-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{host}.out", "ab") as out:
        return subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)


def vanish(proc: subprocess.Popen) -> None:
    """The host is gone: SIGKILL its supervisor and every actor it started (each actor leads its
    own process group), with no chance to say goodbye."""
    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(proc.pid).children(recursive=True)
    for pid in [proc.pid, *(c.pid for c in children)]:
        for kill in (os.killpg, os.kill):  # its group (an actor leads one), and itself
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def owned(run: SystemRun, name: str) -> float:
    """Requests the head's coordinator says sampler ``name`` holds (in flight or unacknowledged)."""
    return run.counters("coordinator").get(f"owned.{name}", 0.0)


async def test_sampler_hosts_leave_and_join_nothing_lost(tmp_path, tiny_model_dir):
    cfg = head_config()
    head_dir = tmp_path / "head"
    hosts: dict[str, subprocess.Popen] = {}
    try:
        async with SystemRun(cfg, head_dir) as run:
            await run.wait(lambda: (head_dir / "join.json").is_file(), 30, "the head's join.json")
            # Host A: quick; host B: one slow slot, so that the run cannot end before C joined.
            hosts["hostA"] = join(head_dir, "hostA", tmp_path / "hostA")
            hosts["hostB"] = join(head_dir, "hostB", tmp_path / "hostB", "actors.sampler.options.max_concurrency=1",
                                  "actors.sampler.options.tokens_per_s=12")
            await run.wait(
                lambda: run.counters("learner").get("step", 0) >= 1 and owned(run, "sampler-0@hostA") >= 1
                and owned(run, "sampler-0@hostB") >= 1,
                120, "both sampler hosts at work and a first learner step",
            )
            # Host A leaves while it holds work.
            await run.wait(lambda: owned(run, "sampler-0@hostA") >= 2, 30, "host A holding work")
            vanish(hosts.pop("hostA"))
            # Host C joins after A left (its start-up overlaps the head's wait for A's silence).
            hosts["hostC"] = join(head_dir, "hostC", tmp_path / "hostC", "actors.sampler.options.tokens_per_s=150")
            await run.wait(
                lambda: run.counters("coordinator").get("samplers_silent", 0) >= 1
                and run.counters("coordinator").get("reissued_after_loss", 0) >= 1,
                TIMEOUT_S + 20, "the head to give host A up and issue its work again",
            )
            assert owned(run, "sampler-0@hostA") == 0
            assert run.counters("learner")["step"] < cfg.run.total_steps
            await run.wait(lambda: owned(run, "sampler-0@hostC") >= 1, 60, "host C at work")
            result = await run.finish(90)
        assert result.exit_code == 0, result.reason
        # The hosts that are left end their runs by themselves when training is over.
        for name, proc in hosts.items():
            rc = await asyncio.to_thread(proc.wait, 60)
            assert rc == 0, (name, (tmp_path / f"{name}.out").read_text()[-3000:])
    finally:
        for proc in hosts.values():
            if proc.poll() is None:
                vanish(proc)

    coord = result.actors["coordinator"].counters
    assert coord["reissued_after_loss"] >= 1 and coord["samplers_silent"] >= 1, coord
    trajs = assert_each_sample_trained_once(head_dir, cfg)  # nothing trained twice, every group complete
    by_host = {t.sampler_id.rpartition("@")[2] for t in trajs}
    assert {"hostB", "hostC"} <= by_host, by_host
    assert any(t.attempt >= 1 for t in trajs), "host A's work was issued again and trained on"
    # Each host has its own run folder (config, logs) and its own supervisor.
    for name in ("hostB", "hostC"):
        assert (tmp_path / name / "logs" / f"sampler-0@{name}.log").is_file()
        assert not (tmp_path / name / "join.json").exists()


def test_join_needs_roles_and_a_join_file(tmp_path, capsys):
    """Quick checks of the command line (no process is started)."""
    with pytest.raises(SystemExit):
        run_main(["--join", str(tmp_path / "join.json")])  # no --roles
    assert run_main(["--join", str(tmp_path / "nothing.json"), "--roles", "sampler"]) == 2
    assert "cannot read the head's join file" in capsys.readouterr().err
    assert run_main(["--config", str(REPO / "configs/fake.yaml"), "--roles", "sampler,nobody", "--check"]) == 2
    with pytest.raises(ConfigError):
        from run import parse_roles

        parse_roles("")
