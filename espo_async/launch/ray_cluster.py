"""Place one espo-async run on a Ray cluster (docs/cluster.md, "On a Ray cluster").

    python -m espo_async.launch.ray_cluster --config configs/X.yaml --address auto \\
        --run-dir /shared/runs/r1 --sampler-hosts 4 --sampler-gpus 1 --learner-gpus 1

Ray places and starts; our own supervisors run the actors. The head roles (coordinator,
learner, stopper, critic) are one Ray actor that runs ``run.py --config ... --roles ...`` as a
subprocess on its node (transport tcp on that node's IP, CURVE keys in RUN/curve unless the
config names its own); each of the N sampler hosts is one Ray actor that runs ``run.py --join
RUN/join.json --roles sampler --host-name NAME --run-dir RUN/hosts/NAME`` on its node. ZeroMQ
carries every message, exactly as with hosts started by hand; restarts of single actors stay
with each host's supervisor. A sampler host whose node dies (or whose run.py exits with an
error) is replaced by a new one, with a new name, on a node that has the resources; it joins
late and the head's coordinator issues the lost host's work again. The driver prints every
host's output, returns the head's exit code, and never waits silently: a head that cannot be
placed ends the launch after ``--placement-timeout`` seconds naming the missing resources.

Ray is optional: it is imported only here, and only when a launch runs. Every node needs the
repository at the same path (``--workdir``) and the run folder on shared storage.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from espo_async.launch import HEAD_ROLES
from espo_async.utils import set_parent_death_signal

REPO = Path(__file__).resolve().parents[2]
EXIT_CONFIG = 2  # bad arguments or config, no cluster, code missing on a node
EXIT_UNPLACEABLE = 3  # the head could not be placed in time
EXIT_HEAD_LOST = 4  # the head's node or Ray actor died
POLL_S = 2.0  # how long one output call waits for lines (the driver's loop tick)
MAX_LINES = 2000  # lines per output call
HEAD_NOTE_S = 15.0  # while the head waits to be placed, say so this often


# -- pure helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """What one Ray actor asks for: CPUs, GPUs and custom resources."""

    cpus: float = 1.0
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``ActorClass.options``."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "resources": dict(self.custom)}

    def resources(self) -> dict[str, float]:
        """The demand as Ray names resources (only those asked for)."""
        out = {"CPU": self.cpus, "GPU": self.gpus, **self.custom}
        return {k: v for k, v in out.items() if v > 0}


def parse_resource(item: str) -> tuple[str, float]:
    """``NAME=AMOUNT`` (or ``NAME``: 1) of a ``--head-resource`` / ``--sampler-resource`` flag."""
    name, sep, amount = item.partition("=")
    name = name.strip()
    try:
        value = float(amount) if sep else 1.0
    except ValueError:
        value = -1.0
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", name) or value <= 0 or name in ("CPU", "GPU"):
        raise ValueError(f"resource {item!r}: use NAME=AMOUNT with AMOUNT > 0 (CPUs and GPUs have their own flags)")
    return name, value


def describe(resources: dict[str, float]) -> str:
    """``CPU=1, GPU=2``."""
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"


def missing_resources(demand: dict[str, float], nodes: list[dict]) -> str | None:
    """Why no alive node can ever hold ``demand`` (``ray.nodes()`` rows), or None if one can
    (it may still be busy). Names the resources no node has enough of, or says that no single
    node has them together."""
    alive = [n for n in nodes if n.get("Alive")]
    if not alive:
        return "the cluster has no alive node"
    totals = [n.get("Resources") or {} for n in alive]
    if any(all(t.get(k, 0.0) >= v for k, v in demand.items()) for t in totals):
        return None
    short = {k: max(t.get(k, 0.0) for t in totals) for k, v in demand.items()
             if all(t.get(k, 0.0) < v for t in totals)}
    if short:
        return "no node has enough " + ", ".join(
            f"{k} (needs {demand[k]:g}, the most any node has is {have:g})" for k, have in sorted(short.items()))
    return f"no single node has {describe(demand)} together ({len(alive)} alive nodes)"


def head_overrides(node_ip: str, *, curve_enabled: bool, allow_insecure: bool, base_port: int | None) -> list[str]:
    """The ``--set`` items that put the head's endpoints on its node: tcp on the node's IP, and
    CURVE keys made for the run (RUN/curve, on shared storage) unless the config has its own."""
    from espo_async.config import is_loopback_host

    sets = ["transport.kind=tcp", f"transport.host={node_ip}"]
    if base_port is not None:
        sets.append(f"transport.base_port={base_port}")
    if not is_loopback_host(node_ip) and not curve_enabled and not allow_insecure:
        sets.append("transport.curve.auto=true")
    return sets


def head_command(python: str, config: Path, sets: list[str], run_dir: Path, roles: str) -> list[str]:
    """run.py for the head roles under their own supervisor."""
    argv = [python, "run.py", "--config", str(config)]
    for item in sets:
        argv += ["--set", item]
    return argv + ["--run-dir", str(run_dir), "--roles", roles]


def sampler_command(python: str, join_file: Path, host_name: str, run_dir: Path, sets: list[str]) -> list[str]:
    """run.py for one sampler host that joins the head's run."""
    argv = [python, "run.py", "--join", str(join_file), "--roles", "sampler", "--host-name", host_name,
            "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    return argv


def sampler_host_name(prefix: str, slot: int, generation: int, node_id: str) -> str:
    """``ray-s1-3fa2c1``, then ``ray-s1r1-<node>`` for its first replacement: unique per
    incarnation (two processes under one name would look like one sampler restarting)."""
    again = f"r{generation}" if generation else ""
    return f"{prefix}{slot}{again}-{node_id[:6]}"


def ray_error(exc: BaseException) -> str:
    """A Ray error in one line: its type and its first line (e.g. OutOfMemoryError: Task was
    killed due to the node running low on memory.)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def split_output(buffer: bytes) -> tuple[list[str], bytes]:
    """Complete lines (ended by \\n or \\r: a progress bar's updates are lines too) and the rest."""
    parts = re.split(rb"[\r\n]", buffer)
    rest = parts.pop()
    return [p.decode(errors="replace").rstrip() for p in parts if p.strip()], rest


# -- on the nodes: one run.py per Ray actor ----------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it (and so the Ray
    worker) dies: a node that dies takes its run.py with it, as a real host would."""
    set_parent_death_signal(signal.SIGKILL)


class HostProcess:
    """A Ray actor that runs one run.py (a host of the run) on its node and keeps its output.

    The process is started by a thread of its own that lives exactly as long as the process
    (``PR_SET_PDEATHSIG`` fires when the starting *thread* exits), reads its output and reaps it.
    Methods never block for long; ``output`` waits at most its timeout (the actor is threaded).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._rc: int | None = None
        self._proc: subprocess.Popen | None = None

    def where(self) -> dict:
        """This node: Ray node id, IP, host name, Python, the GPUs Ray gave this actor."""
        import socket

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "python": sys.executable,
                "gpus": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def wait_for_file(self, path: str, timeout: float) -> bool:
        """Whether ``path`` exists within ``timeout`` s (or the process ended). A file on shared
        storage has no event to wait on: it is looked at every 0.2 s."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self._rc is not None or time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def start(self, argv: list[str], cwd: str, env: dict[str, str]) -> int:
        """Start ``argv`` in ``cwd``; returns its pid (raises if it cannot be started)."""
        box: list = []
        started = threading.Event()
        threading.Thread(target=self._own, args=(argv, cwd, env, box, started), name="espo-host", daemon=True).start()
        started.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _own(self, argv, cwd, env, box, started) -> None:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:
            box.append(exc)
            started.set()
            return
        self._proc = proc
        box.append(proc.pid)
        started.set()
        rest = b""
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            lines, rest = split_output(rest + chunk)
            if lines:
                with self._cond:
                    self._lines += lines
                    self._cond.notify_all()
        rc = proc.wait()
        with self._cond:
            if rest.strip():
                self._lines.append(rest.decode(errors="replace").rstrip())
            self._rc = rc
            self._cond.notify_all()

    def output(self, timeout: float = POLL_S) -> tuple[list[str], int | None]:
        """New output lines (waiting up to ``timeout`` s for some), and the exit code once the
        process has ended and every line was handed out."""
        with self._cond:
            self._cond.wait_for(lambda: self._lines or self._rc is not None, timeout)
            lines, self._lines = self._lines[:MAX_LINES], self._lines[MAX_LINES:]
            return lines, (self._rc if not self._lines else None)

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (run.py's supervisor then stops its actors), SIGKILL after ``grace`` s."""
        proc = self._proc
        if proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return proc.poll()


# -- the driver --------------------------------------------------------------------------------


@dataclass
class Host:
    """One Ray actor of the launch: the head or a sampler host."""

    role: str  # "head" or "sampler"
    slot: int
    generation: int
    actor: Any
    demand: Demand
    created: float
    name: str = "head"
    node_id: str = ""
    ip: str = ""
    python: str = ""  # the Ray worker's Python on that node (runs run.py there)
    state: str = "placing"  # placing -> placed -> running -> finished | lost
    rc: int | None = None
    warned_at: float = 0.0

    @property
    def label(self) -> str:
        return self.name if self.role == "head" else f"{self.name or f'sampler host {self.slot}'}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m espo_async.launch.ray_cluster",
                                     description="Place one espo-async run on a Ray cluster (docs/cluster.md).")
    parser.add_argument("--config", type=Path, required=True, help="the run's YAML file (as for run.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--address", default="auto", help="Ray cluster: auto (this node's cluster) or HOST:PORT")
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="the head's run folder, on storage every node mounts at the same path (resumes if it "
                        "holds a checkpoint); sampler hosts get RUN/hosts/NAME")
    parser.add_argument("--sampler-hosts", type=int, default=1, metavar="N", help="sampler hosts to keep running")
    parser.add_argument("--samplers-per-host", type=int, metavar="K", help="actors.sampler.count on each sampler host")
    parser.add_argument("--sampler-gpus", type=float, default=0.0, metavar="G", help="GPUs of each sampler host")
    parser.add_argument("--sampler-cpus", type=float, default=1.0, metavar="C", help="CPUs of each sampler host")
    parser.add_argument("--sampler-resource", action="append", default=[], metavar="NAME=AMOUNT",
                        help="a custom Ray resource each sampler host needs (repeatable)")
    parser.add_argument("--sampler-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a host-local override for the sampler hosts (e.g. actors.sampler.options.max_concurrency=8)")
    parser.add_argument("--learner-gpus", type=float, default=0.0, metavar="G", help="GPUs of the head (its learner)")
    parser.add_argument("--head-cpus", type=float, default=1.0, metavar="C", help="CPUs of the head actor")
    parser.add_argument("--head-resource", action="append", default=[], metavar="NAME=AMOUNT",
                        help="a custom Ray resource the head needs (repeatable)")
    parser.add_argument("--head-roles", default=",".join(HEAD_ROLES),
                        help=f"roles of the head (default {','.join(HEAD_ROLES)})")
    parser.add_argument("--base-port", type=int, help="transport.base_port of the head (default: the config's)")
    parser.add_argument("--placement-timeout", type=float, default=120.0, metavar="S",
                        help="give up if the head is not placed within S seconds (sampler hosts: a warning every S)")
    parser.add_argument("--max-replacements", type=int, default=8,
                        help="sampler hosts started in place of lost ones, at most (all slots together)")
    parser.add_argument("--end-grace", type=float, default=60.0, metavar="S",
                        help="after the head ended, how long sampler hosts may take to end by themselves")
    parser.add_argument("--workdir", type=Path, default=REPO,
                        help="the repository (holding run.py) on every node (default: this one's path)")
    parser.add_argument("--name-prefix", default="ray-s", help="sampler host names: PREFIX<slot>[r<n>]-<node>")
    return parser


class RayLaunch:
    """Places the head and the sampler hosts, relays their output, replaces lost sampler hosts.

    ``run()`` blocks until the head has ended and returns its exit code. Other threads may read
    ``hosts`` and wait on ``changed`` (notified on every line and state change), or call ``stop``.
    """

    def __init__(self, args: argparse.Namespace, *, out: Callable[[str], None] | None = None):
        self.args = args
        self.out = out or (lambda line: print(line, flush=True))
        self.run_dir = Path(args.run_dir).resolve()
        self.config = Path(args.config).resolve()
        self.join_file = self.run_dir / "join.json"
        self.hosts: list[Host] = []
        self.head: Host | None = None
        self.joinable = False
        self.replaced = 0
        self.changed = threading.Condition()
        self._stop_asked: str | None = None
        self._stop_sent = False  # the head was asked to stop
        self._fatal: int | None = None  # an exit code that ends the launch now
        self._pending: dict[Any, tuple[str, Host]] = {}
        self._actor_class = None
        self._cfg = None
        self.head_demand = Demand(args.head_cpus, args.learner_gpus, dict(map(parse_resource, args.head_resource)))
        self.sampler_demand = Demand(args.sampler_cpus, args.sampler_gpus,
                                     dict(map(parse_resource, args.sampler_resource)))

    # -- public ------------------------------------------------------------------------------

    def stop(self, reason: str = "stopped") -> None:
        """End the launch: the head is asked to stop (SIGTERM to its run.py), then the rest."""
        self._stop_asked = reason
        self._notify()

    def sampler_hosts(self, state: str = "running") -> list[Host]:
        return [h for h in self.hosts if h.role == "sampler" and h.state == state]

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``predicate()`` holds (re-checked on every change, at least every 0.5 s);
        TimeoutError naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"waited {timeout:.0f}s for {what}")
                self.changed.wait(min(left, 0.5))

    def run(self) -> int:
        import ray

        try:
            self._cfg = self._validate()
        except ValueError as exc:
            self.out(f"[ray] error: {exc}")
            return EXIT_CONFIG
        started_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=self.args.address, namespace="espo", log_to_driver=False,
                         logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                self.out(f"[ray] error: cannot connect to the Ray cluster at --address {self.args.address}: {exc}")
                return EXIT_CONFIG
            started_ray = True
        self._actor_class = ray.remote(HostProcess)
        try:
            return self._launch(ray)
        except KeyboardInterrupt:
            self.out("[ray] interrupted: stopping the run (re-run the same command to resume)")
            self._end_all(ray, grace=20.0)
            return 130
        finally:
            self._kill_all(ray)
            if started_ray:
                ray.shutdown()

    # -- steps -------------------------------------------------------------------------------

    def _validate(self):
        """The config with the launcher's transport (fail before anything is placed)."""
        from espo_async.config import ConfigError, load_config

        a = self.args
        if a.sampler_hosts < 0:
            raise ValueError("--sampler-hosts must be >= 0")
        if not (a.workdir / "run.py").is_file():
            raise ValueError(f"--workdir {a.workdir}: no run.py there (the repository, at the same path on every node)")
        try:
            return load_config(a.config, [*a.set, "transport.kind=tcp"])
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def _launch(self, ray) -> int:
        a = self.args
        self.out(f"[ray] cluster: {describe(ray.cluster_resources())} on {sum(n['Alive'] for n in ray.nodes())} nodes")
        self.head = self._create("head", 0, 0, self.head_demand)
        for slot in range(a.sampler_hosts):
            self._create("sampler", slot, 0, self.sampler_demand)
        end_by: float | None = None
        while True:
            now = time.monotonic()
            if self._fatal is not None:
                self._end_all(ray, grace=10.0)
                return self._fatal
            if self._stop_asked and self.head.state in ("placing", "placed"):
                self.out(f"[ray] stopped before the head started: {self._stop_asked}")
                return 1
            if self._stop_asked and self.head.state == "running" and not self._stop_sent:
                self.out(f"[ray] stopping the head: {self._stop_asked}")
                self._stop_sent = True
                self._pending[self.head.actor.stop.remote(20.0)] = ("stopped", self.head)
            rc = self._check_placement(ray, now)
            if rc is not None:
                return rc
            if self.head.state == "lost":
                self.out(f"[ray] the head was lost ({self.head.ip or 'unplaced'}): the run cannot go on; re-run the "
                         "same command to resume from its last checkpoint")
                self._end_all(ray, grace=10.0)
                return EXIT_HEAD_LOST
            if self.head.state == "finished":
                if end_by is None:  # after training, they end by themselves (the learner's broadcast)
                    end_by = now + (a.end_grace if self.head.rc == 0 else 0.0)
                    self._stop_placing(ray)
                busy = [h for h in self.hosts if h.role == "sampler" and h.state == "running"]
                if not busy:
                    return self.head.rc
                if now >= end_by:
                    self.out("[ray] stopping the sampler hosts still running: " + ", ".join(h.name for h in busy))
                    for host in busy:  # why they did not end: their supervisors' last events
                        self.out(f"[ray] {host.name}'s last events: {self._last_events(host)}")
                    self._end_all(ray, grace=10.0)
                    return self.head.rc
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=POLL_S) if self._pending else ([], [])
            if not self._pending:  # nothing to hear from (cannot last: the loop's checks end the launch)
                with self.changed:
                    self.changed.wait(POLL_S)
            for ref in ready:
                what, host = self._pending.pop(ref)
                self._handle(ray, what, host, ref)
            self._notify()

    def _create(self, role: str, slot: int, generation: int, demand: Demand) -> Host:
        options = dict(demand.options(), max_concurrency=4, max_restarts=0)
        if role == "sampler":
            options["scheduling_strategy"] = "SPREAD"
        actor = self._actor_class.options(**options).remote()
        host = Host(role, slot, generation, actor, demand, time.monotonic())
        self.hosts.append(host)
        self._pending[actor.where.remote()] = ("placed", host)
        return host

    def _check_placement(self, ray, now: float) -> int | None:
        """The head not placed within ``--placement-timeout`` ends the launch (a note every
        HEAD_NOTE_S before that); a sampler host not placed, a note every ``--placement-timeout``
        (it is placed as soon as a node with the resources joins)."""
        timeout = self.args.placement_timeout
        for host in self.hosts:
            if host.state != "placing":
                continue
            waited = now - host.created
            every = min(HEAD_NOTE_S, timeout) if host.role == "head" else timeout
            if now - max(host.created, host.warned_at) < every and not (host.role == "head" and waited >= timeout):
                continue
            host.warned_at = now
            why = missing_resources(host.demand.resources(), ray.nodes()) or (
                "a node has them, but they are in use (by other actors or jobs)")
            what = "the head" if host.role == "head" else f"sampler host {host.slot}"
            msg = f"{what} needs {describe(host.demand.resources())}, not placed after {waited:.0f}s: {why}"
            if host.role == "head" and waited >= timeout:
                self.out(f"[ray] error: {msg} (--placement-timeout {timeout:g})")
                return EXIT_UNPLACEABLE
            self.out(f"[ray] waiting: {msg}")
        return None

    def _handle(self, ray, what: str, host: Host, ref) -> None:
        try:
            value = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            if what == "output" and host.state == "running":  # transient: ask again
                self._pending[host.actor.output.remote(POLL_S)] = ("output", host)
                return
            self._lost(ray, host, "its Ray actor is unavailable")
            return
        except ray.exceptions.RayError as exc:  # the actor died, or Ray killed its worker (e.g. out of memory)
            self._lost(ray, host, f"its Ray actor died ({ray_error(exc)})")
            return
        if what == "stopped":  # its exit code comes with its last output
            return
        if what == "placed":
            self._placed(ray, host, value)
        elif what == "joinable":
            if value and not self.joinable:
                self.joinable = True
                self.out(f"[ray] the head wrote {self.join_file}: starting sampler hosts")
                for other in self.hosts:
                    if other.role == "sampler" and other.state == "placed":
                        self._start_sampler(ray, other)
            elif not value and host.state == "running":
                self._pending[host.actor.wait_for_file.remote(str(self.join_file), 10.0)] = ("joinable", host)
        elif what == "output":
            lines, rc = value
            for line in lines:
                self.out(f"[{host.label}] {line}")
            if rc is None:
                self._pending[host.actor.output.remote(POLL_S)] = ("output", host)
            else:
                self._ended(ray, host, rc)

    def _placed(self, ray, host: Host, where: dict) -> None:
        host.node_id, host.ip, host.python = where["node_id"], where["ip"], where["python"]
        if host.role == "sampler":
            host.name = sampler_host_name(self.args.name_prefix, host.slot, host.generation, host.node_id)
        host.state = "placed"
        gpus = f", GPUs {','.join(where['gpus'])}" if where["gpus"] else ""
        self.out(f"[ray] {host.label} placed on {where['hostname']} ({host.ip}, node {host.node_id[:8]}{gpus})")
        ok, found = self._ask(ray, host, host.actor.exists.remote(str(self.args.workdir / "run.py")))
        if not ok:
            return
        if not found:
            msg = (f"no {self.args.workdir / 'run.py'} on node {host.ip}: the repository must be at the same path "
                   "on every node (--workdir)")
            if host.role == "head":
                self.out(f"[ray] error: {msg}")
                self._fatal = EXIT_CONFIG
            else:
                self._lost(ray, host, msg)
            return
        if host.role == "head":
            self._start_head(ray, host)
        elif self.joinable:
            self._start_sampler(ray, host)

    def _start_head(self, ray, host: Host) -> None:
        t = self._cfg.transport
        sets = [*self.args.set, *head_overrides(host.ip, curve_enabled=t.curve.enabled,
                                                allow_insecure=t.allow_insecure, base_port=self.args.base_port)]
        argv = head_command(host.python, self.config, sets, self.run_dir, self.args.head_roles)
        if not self._ask(ray, host, host.actor.remove.remote(str(self.join_file)))[0]:  # a resumed run writes it anew
            return
        if not self._start(ray, host, argv):
            return
        self._pending[host.actor.wait_for_file.remote(str(self.join_file), 10.0)] = ("joinable", host)

    def _start_sampler(self, ray, host: Host) -> None:
        sets = list(self.args.sampler_set)
        if self.args.samplers_per_host is not None:
            sets.append(f"actors.sampler.count={self.args.samplers_per_host}")
        argv = sampler_command(host.python, self.join_file, host.name, self.run_dir / "hosts" / host.name, sets)
        self._start(ray, host, argv)

    def _start(self, ray, host: Host, argv: list[str]) -> bool:
        ok, pid = self._ask(ray, host, host.actor.start.remote(argv, str(self.args.workdir), {}), "could not start run.py")
        if not ok:
            return False
        host.state = "running"
        self.out(f"[ray] {host.label} started (pid {pid}): {' '.join(argv[1:])}")
        self._pending[host.actor.output.remote(POLL_S)] = ("output", host)
        return True

    def _ask(self, ray, host: Host, ref, what: str = "its Ray actor died") -> tuple[bool, Any]:
        """(True, the value) of a quick call on ``host``'s actor; (False, None), and the host
        lost, if the actor is gone, failed or did not answer within a minute."""
        try:
            return True, ray.get(ref, timeout=60.0)
        except ray.exceptions.RayError as exc:
            self._lost(ray, host, f"{what} ({ray_error(exc)})")
            return False, None

    def _ended(self, ray, host: Host, rc: int) -> None:
        from espo_async.utils import describe_exit

        if host.role == "head":
            host.state, host.rc = "finished", rc
            self.out(f"[ray] the head {describe_exit(rc)}")
        elif rc == 0:
            host.state, host.rc = "finished", rc
            self.out(f"[ray] {host.label} finished")
        else:
            self._lost(ray, host, f"its run.py {describe_exit(rc)}")

    def _lost(self, ray, host: Host, why: str) -> None:
        """A host is gone. The head's loss ends the launch (the loop sees it); a sampler host
        is replaced while the head runs and the replacement budget lasts."""
        if host.state in ("lost", "finished"):
            return
        host.state = "lost"
        self._forget(host)
        self.out(f"[ray] {host.label} lost: {why}")
        _kill(ray, host.actor)
        if host.role != "sampler" or self.head.state not in ("placing", "placed", "running") or self._stop_asked:
            return
        if self.replaced >= self.args.max_replacements:
            self.out(f"[ray] not replacing {host.label}: --max-replacements {self.args.max_replacements} used up")
            return
        self.replaced += 1
        new = self._create("sampler", host.slot, host.generation + 1, host.demand)
        self.out(f"[ray] replacing {host.label} (sampler host {new.slot}, replacement {self.replaced} of at most "
                 f"{self.args.max_replacements}): placing it on a node with {describe(new.demand.resources())}")

    def _forget(self, host: Host) -> None:
        for ref in [r for r, (_, h) in self._pending.items() if h is host]:
            del self._pending[ref]

    def _last_events(self, host: Host, n: int = 3) -> str:
        """The last ``n`` lines of ``host``'s RUN/hosts/NAME/events.jsonl (shared storage), or why not."""
        try:
            lines = (self.run_dir / "hosts" / host.name / "events.jsonl").read_text().splitlines()
        except OSError as exc:
            return f"none readable ({type(exc).__name__})"
        return " | ".join(lines[-n:]) or "none yet"

    def _stop_placing(self, ray) -> None:
        """The head ended: sampler hosts not started yet are not needed any more."""
        for host in self.hosts:
            if host.role == "sampler" and host.state in ("placing", "placed"):
                host.state = "finished"
                self._forget(host)
                _kill(ray, host.actor)

    def _end_all(self, ray, grace: float) -> None:
        """Stop every running host (SIGTERM, then SIGKILL after ``grace`` s)."""
        running = [h for h in self.hosts if h.state == "running"]
        refs = [h.actor.stop.remote(grace) for h in running]
        try:
            ray.get(refs, timeout=grace + 15.0)
        except Exception as exc:  # a host whose node is gone cannot answer; killing it below suffices
            self.out(f"[ray] while stopping hosts: {type(exc).__name__}")
        for host in running:
            host.state = "finished"

    def _kill_all(self, ray) -> None:
        for host in self.hosts:
            _kill(ray, host.actor)
        self._pending.clear()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


def _kill(ray, actor) -> None:
    """End a Ray actor (and so its run.py, which dies with it); one already gone is fine."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - gone already, or its node is
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        launch = RayLaunch(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        import ray  # noqa: F401
    except ImportError:
        print("error: Ray is not installed (pip install -e '.[ray]', or the pins in requirements/ray.lock)",
              file=sys.stderr)
        return EXIT_CONFIG
    return launch.run()


if __name__ == "__main__":
    sys.exit(main())
