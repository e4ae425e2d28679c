"""The SLURM launcher (espo_async/launch/slurm.py) on a real one-machine SLURM cluster.

A session fixture starts munged, slurmctld and two slurmd daemons (nodes n1 and n2, both on
this machine, each on its own port) in a temporary folder with its own slurm.conf, and stops
them afterwards. Each test submits a short fake-engine run through the launcher's ``--submit``:
the head (coordinator, learner, stopper, critic) on n1, the samplers on n2 (``run.py --join``),
TCP with CURVE on fixed ports. One runs to the end; one is cancelled with ``scancel`` after a
checkpoint exists, stops with a checkpoint, and resumes from it when the same batch script is
submitted again. Every wait polls a condition with a deadline.

SLURM is installed by ``scripts/install_slurm.sh`` (the test set-up, not pytest, calls it). Without
SLURM, or without root (the daemons run as root here), the tests are skipped, naming why.
The script's text itself is unit-tested in tests/cluster/test_slurm_script.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from espo_async.config import load_config
from tests.reliability.test_faults import assert_each_sample_trained_once

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
NODES = ("n1", "n2")
JOB_TIMEOUT_S = 240  # one short fake run, start-up included, on a busy 2-core machine
FAKE_SETS = ("task.eval_problems=0", "run.progress=false", "run.tensorboard=false")


def find(cmd: str) -> str | None:
    """A SLURM or munge program (daemons live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(cmd) or next((str(p) for p in (Path("/usr/sbin") / cmd,) if os.access(p, os.X_OK)), None)


def free_ports(n: int, start: int = 20000, span: int = 5000) -> int:
    """``n`` consecutive TCP ports that can be bound on 127.0.0.1 now (the first of them), between
    ``start`` and ``start + span``, from an offset that differs between concurrent sessions."""
    offset = (os.getpid() * 7919) % span
    for i in range(0, span, n + 1):
        base = start + (offset + i) % (span - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll ``predicate`` until it returns something true; its value. TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        time.sleep(poll)  # polling a condition with a deadline (no event exists for it)


def slurm_conf(folder: Path, ports: dict[str, int]) -> str:
    """A one-machine cluster: slurmctld and one slurmd per node, all on 127.0.0.1. KillWait (from
    SIGTERM to SIGKILL on scancel) is SLURM's default: the learner must checkpoint within it."""
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 CPUs=2 Port={ports[n]}" for n in NODES)
    return f"""ClusterName=espotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports['ctld']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
SlurmctldTimeout=5
SlurmdTimeout=30
MessageTimeout=5
InactiveLimit=0
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A running one-machine SLURM cluster: its environment (SLURM_CONF) and client calls."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"), PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []

    def call(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([find(args[0]) or args[0], *args[1:]], capture_output=True, text=True,
                              env=self.env, timeout=30, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's record of a job (kept MinJobAge seconds after it ended)."""
        out = self.call("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def ended(self, job_id: str) -> dict[str, str] | None:
        """The job's record once it ended and its processes are gone, else None. (A cancelled
        job's state is CANCELLED at once; squeue lists it, as CG, until its steps have ended.)"""
        record = self.job(job_id)
        if record.get("JobState") in (None, "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                                      "SUSPENDED"):
            return None
        if self.call("squeue", "-h", "-j", job_id, check=False).strip():
            return None
        return record

    def start(self, *args: str, log: str) -> None:
        with open(self.folder / log, "ab") as out:
            self.procs.append(subprocess.Popen([find(args[0]), *args[1:]], stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=self.env))

    def stop(self) -> None:
        """Cancel what is left, then end the daemons this fixture started (by their pids)."""
        with contextlib.suppress(Exception):
            self.call("scancel", "--user=root", check=False)
            wait_until(lambda: not self.call("squeue", "-h", check=False).strip(), 60, "every job gone")
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = [cmd for cmd in DAEMONS + CLIENTS if find(cmd) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): run scripts/install_slurm.sh as root")
    if os.geteuid() != 0:
        pytest.skip("the one-machine SLURM cluster runs its daemons as root; run the tests as root")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "munge", *(f"spool/{n}" for n in NODES)):
        (folder / sub).mkdir(parents=True)
    (folder / "munge").chmod(0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ctld, *slurmd_ports = (free_ports(1, start=p) for p in (21000, 22000, 23000))
    ports = {"ctld": ctld, **dict(zip(NODES, slurmd_ports, strict=True))}
    (folder / "slurm.conf").write_text(slurm_conf(folder, ports))
    cluster = Cluster(folder)
    conf = str(folder / "slurm.conf")
    try:
        cluster.start("munged", "--foreground", "--force", f"--socket={folder}/munge/munge.sock",
                      f"--key-file={key}", f"--pid-file={folder}/munge/munged.pid",
                      f"--seed-file={folder}/munge/seed", f"--log-file={folder}/munge/munged.log", log="munged.out")
        wait_until(lambda: (folder / "munge" / "munge.sock").exists(), 15, "munged's socket")
        cluster.start("slurmctld", "-D", "-i", "-f", conf, log="slurmctld.out")
        for node in NODES:
            cluster.start("slurmd", "-D", "-N", node, "-f", conf, log=f"slurmd-{node}.out")
        wait_until(lambda: cluster.call("sinfo", "-h", "-o", "%T", check=False).split() == ["idle"], 60,
                   "both nodes idle (see slurmctld.log, slurmd-n*.log in " + str(folder) + ")")
        yield cluster
    finally:
        cluster.stop()


def submit(slurm: Cluster, run_dir: Path, base_port: int, *sets: str) -> str:
    """Submit a fake run through the launcher: head on n1, samplers on n2 (one CPU of each: two
    jobs fit at once). The job id."""
    cmd = [sys.executable, "-m", "espo_async.launch.slurm", "--config", str(REPO / "configs/fake.yaml"),
           "--run-dir", str(run_dir), "--sampler-nodes", "1", "--base-port", str(base_port), "--time", "10:00",
           "--grace-s", "0", "--shared-nodes", "--job-name", run_dir.name, "--sampler-set", "actors.sampler.count=1",
           "--submit"]
    for item in (*FAKE_SETS, *sets):
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "scancel" in done.stdout and (run_dir / "slurm.sbatch").is_file()
    return done.stdout.split()[-1]


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text() if path.is_file() else "(no job output)"


def wait_job(slurm: Cluster, run_dir: Path, job_id: str) -> dict[str, str]:
    try:
        return wait_until(lambda: slurm.ended(job_id), JOB_TIMEOUT_S, f"job {job_id} to end")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{job_log(run_dir, job_id)[-4000:]}") from None


def metric_steps(run_dir: Path) -> list[int]:
    """The step of every line of metrics.jsonl, in order (a restarted run would repeat steps)."""
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check_finished(run_dir: Path, total_steps: int) -> None:
    """Trained to the end on the sampler node's work, nothing lost, nothing trained twice."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == total_steps
    cfg = load_config(run_dir / "config.yaml")
    trajs = assert_each_sample_trained_once(run_dir, cfg)  # every trained group complete, no duplicates
    assert {t.sampler_id.rpartition("@")[2] for t in trajs} == {"n2"}  # the samplers ran on node n2
    assert (run_dir / "hosts" / "n2" / "logs" / "sampler-0@n2.log").is_file()
    assert cfg.transport.kind == "tcp" and cfg.transport.curve.enabled


# "resume" is cancelled at its first checkpoint; the cancel reaches the run a few seconds later
# (scancel -> slurmctld -> slurmd -> SIGTERM), and a fake step takes about a second, so 4 steps
# could all be done by then (seen once under load): 10 leave the cancel mid-run.
TOTAL_STEPS = {"finish": 2, "resume": 10}


@pytest.fixture(scope="module")
def first_jobs(slurm, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Both tests' first jobs, submitted at once so that their start-ups overlap (the tests take
    minutes otherwise): name -> (run folder, job id). Their ports differ. The scancel test comes
    first in this file: it must find its job before the end; the other job ends meanwhile."""
    folder = tmp_path_factory.mktemp("runs")
    jobs = {}
    # Below Linux's ephemeral range (32768-60999 by default): there, an outgoing connection of any
    # process may take a port between this check and the job's bind (seen in a CI run: "Address
    # already in use" on 127.0.0.1:34156 when these ranges began at 31000 and 41000).
    for name, start in (("finish", 26000), ("resume", 29500)):
        sets = [f"run.total_steps={TOTAL_STEPS[name]}"] + (["run.checkpoint_every=1"] if name == "resume" else [])
        jobs[name] = (folder / name, submit(slurm, folder / name, free_ports(9, start=start, span=3000), *sets))
    return jobs


def test_scancel_checkpoints_and_the_same_script_resumes(slurm, first_jobs):
    run_dir, job = first_jobs["resume"]
    total = TOTAL_STEPS["resume"]
    state = run_dir / "checkpoint" / "learner_state.json"
    try:
        wait_until(state.is_file, JOB_TIMEOUT_S, "a first checkpoint")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{job_log(run_dir, job)[-4000:]}") from None
    slurm.call("scancel", job)
    record = wait_job(slurm, run_dir, job)
    log = job_log(run_dir, job)
    assert record["JobState"] == "CANCELLED", log[-4000:]
    assert "[slurm] cancelled" in log and "received SIGTERM" in log
    # Stopped cleanly: the head's supervisor ended on SIGTERM, the learner saved a checkpoint.
    ended = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert ended[-1]["kind"] == "run_ended" and ended[-1]["reason"] == "received SIGTERM"
    stopped_at = json.loads(state.read_text())["step"]
    assert 1 <= stopped_at < total, stopped_at
    assert f"checkpoint saved at step {stopped_at}" in (run_dir / "logs" / "learner.log").read_text()
    assert not (run_dir / "summary.json").exists()

    # The same batch script again: the run resumes from the checkpoint and finishes.
    again = slurm.call("sbatch", "--parsable", str(run_dir / "slurm.sbatch")).strip().split(";")[0]
    record = wait_job(slurm, run_dir, again)
    log = job_log(run_dir, again)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-4000:]
    assert f"resumed from step {stopped_at}" in (run_dir / "logs" / "learner.log").read_text()
    steps = metric_steps(run_dir)
    assert steps == list(range(1, total + 1)), steps  # continued after the checkpoint, never from step 1 again
    check_finished(run_dir, total)


def test_a_job_runs_to_the_end(slurm, first_jobs):
    run_dir, job = first_jobs["finish"]
    record = wait_job(slurm, run_dir, job)
    log = job_log(run_dir, job)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-4000:]
    assert "[slurm] training finished" in log
    assert log.count("[espo] finished: training finished") == 2, log[-4000:]  # the head and the sampler host
    assert metric_steps(run_dir) == [1, 2]
    check_finished(run_dir, 2)
