"""The supervisor: starts every actor as its own process, watches them, stops them all.

It owns the two control endpoints (heartbeats in, start/shutdown out), shows progress from the
learner's heartbeats, detects dead or silent actors by name, and guarantees that no process of
the run outlives it: each actor leads its own process group (so terminal Ctrl-C reaches only the
supervisor, and engine subprocesses are killed with their actor), and the kernel sends SIGTERM
to an actor whose supervisor dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

import protocols as P
from espo_async.config import Config
from espo_async.runtime.entry import actor_instances, validate_actors
from espo_async.runtime.transport import Transport, cleanup_ipc, resolve_addresses

log = logging.getLogger("espo.supervisor")


@dataclass
class ActorState:
    name: str
    role: str
    proc: subprocess.Popen | None = None
    status: str = "starting"
    last_seen: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    returncode: int | None = None


@dataclass
class RunResult:
    exit_code: int
    reason: str
    run_dir: Path
    actors: dict[str, ActorState]


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class Supervisor:
    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        addresses: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        progress: bool | None = None,
    ):
        validate_actors(config)  # fail here, naming the key, not in a child process later
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        tcfg = config.transport
        self.addresses = addresses or resolve_addresses(
            tcfg.kind, str(self.run_dir.resolve()), host=tcfg.host, base_port=tcfg.base_port
        )
        self.env = dict(env or {})
        self.progress = config.run.progress if progress is None else progress
        self.actors: dict[str, ActorState] = {
            name: ActorState(name, role) for name, role, _ in actor_instances(config)
        }
        self.started = False
        self.changed = asyncio.Event()  # pulses whenever an actor's state changes (for tests)
        self._stop_reason: tuple[int, str] | None = None
        self._bar = None

    # -- public ------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        (self.run_dir / "addresses.json").write_text(json.dumps(self.addresses, indent=1))
        transport = Transport(self.addresses, hwm=10_000, max_frame_bytes=self.cfg.transport.max_frame_bytes)
        inbox = transport.socket(zmq.PULL, "control_in", bind=True, hwm=10_000)
        outbox = transport.socket(zmq.PUB, "control_out", bind=True, hwm=10_000)
        loop = asyncio.get_running_loop()
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            loop.add_signal_handler(sig, self.stop, code, f"received {signal.Signals(sig).name}")
        try:
            self._spawn_all()
            receiver = asyncio.create_task(self._receive(transport, inbox))
            try:
                exit_code, reason = await self._watch(transport, outbox)
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
            await self._shutdown_all(transport, outbox, reason)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self._kill_all(signal.SIGKILL)
            transport.close()
            cleanup_ipc(self.addresses)
            if self._bar is not None:
                self._bar.close()
        return RunResult(exit_code, reason, self.run_dir, self.actors)

    def stop(self, exit_code: int = 0, reason: str = "stopped") -> None:
        """Ask the run to end (from a signal handler, a test, or an embedding program)."""
        if self._stop_reason is None:
            self._stop_reason = (exit_code, reason)
        self._pulse()

    async def wait_for(self, predicate: Callable[[Supervisor], bool], timeout: float) -> None:
        """Wait until ``predicate(self)`` holds; raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

    def kill_actor(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one actor's process group (fault tests)."""
        proc = self.actors[name].proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)

    # -- processes ---------------------------------------------------------------------------

    def _spawn_all(self) -> None:
        for name, state in self.actors.items():
            state.proc = self._spawn(name)
            state.last_seen = time.monotonic()

    def _spawn(self, name: str) -> subprocess.Popen:
        role = self.actors[name].role
        spec = getattr(self.cfg.actors, role)
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=str(spec.threads),
            MKL_NUM_THREADS=str(spec.threads),
            TOKENIZERS_PARALLELISM="false",
        )
        env.update(self.env)
        cpus = spec.cpus
        if cpus:
            env["ESPO_CPUS"] = ",".join(map(str, cpus))
        out = open(self.run_dir / "logs" / f"{name}.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "espo_async.runtime.entry", str(self.run_dir), name],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd=os.getcwd(),
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        finally:
            out.close()

    def _kill_all(self, sig: int) -> None:
        for state in self.actors.values():
            if state.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(state.proc.pid, sig)  # the actor and anything it started

    # -- loop --------------------------------------------------------------------------------

    def _pulse(self) -> None:
        self.changed.set()

    async def _receive(self, transport: Transport, inbox) -> None:
        while True:
            msg = await transport.recv(inbox, "control_in")
            if not isinstance(msg, P.Heartbeat):
                continue
            state = self.actors.get(msg.actor)
            if state is None:
                log.warning("heartbeat from unknown actor %r", msg.actor)
                continue
            state.last_seen = time.monotonic()
            state.counters = dict(msg.counters)
            if state.status != msg.status:
                log.info("%s: %s -> %s", msg.actor, state.status, msg.status)
            state.status = msg.status
            if msg.role == "learner":
                self._show_progress(state.counters)
            self._pulse()

    async def _watch(self, transport: Transport, outbox) -> tuple[int, str]:
        tcfg = self.cfg.transport
        t0 = time.monotonic()
        while True:
            if self._stop_reason is not None:
                return self._stop_reason
            now = time.monotonic()
            for state in self.actors.values():
                rc = state.proc.poll() if state.proc else None
                if rc is not None and state.returncode is None:
                    state.returncode = rc
                    self._pulse()
                    if state.role == "learner" and rc == 0:
                        return 0, "training finished"
                    detail = tail(self.run_dir / "logs" / f"{state.name}.out")
                    return 1, f"actor {state.name} exited with code {rc}" + (f"; last output:\n{detail}" if detail else "")
            if not self.started:
                if all(s.status in ("ready", "running") for s in self.actors.values()):
                    self.started = True
                    log.info("all %d actors ready after %.1fs", len(self.actors), now - t0)
                    self._pulse()
                elif now - t0 > tcfg.startup_timeout_s:
                    waiting = [s.name for s in self.actors.values() if s.status not in ("ready", "running")]
                    return 1, f"actors not ready after {tcfg.startup_timeout_s:.0f}s: {', '.join(waiting)}"
            else:
                silent = [s.name for s in self.actors.values() if now - s.last_seen > tcfg.heartbeat_timeout_s]
                if silent:
                    return 1, f"no heartbeat for {tcfg.heartbeat_timeout_s:.0f}s from: {', '.join(silent)} (hung or dead)"
            if self.started:
                transport.try_send(outbox, P.Start(actors=list(self.actors)))
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(0.5, tcfg.heartbeat_interval_s))

    async def _shutdown_all(self, transport: Transport, outbox, reason: str) -> None:
        deadline = time.monotonic() + self.cfg.transport.shutdown_timeout_s
        msg = P.Shutdown(reason=reason.splitlines()[0], source="supervisor")
        while time.monotonic() < deadline:
            if all(s.proc is None or s.proc.poll() is not None for s in self.actors.values()):
                break
            transport.try_send(outbox, msg)
            await asyncio.sleep(0.2)  # polling child exit codes; no event exists for that
        stragglers = [s.name for s in self.actors.values() if s.proc is not None and s.proc.poll() is None]
        if stragglers:
            log.warning("terminating actors that did not stop in time: %s", ", ".join(stragglers))
            self._kill_all(signal.SIGTERM)
            end = time.monotonic() + 5.0
            while time.monotonic() < end and any(
                s.proc is not None and s.proc.poll() is None for s in self.actors.values()
            ):
                await asyncio.sleep(0.1)
        for state in self.actors.values():
            if state.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    state.returncode = state.proc.wait(timeout=0.1)

    def _show_progress(self, counters: dict[str, float]) -> None:
        if not self.progress:
            return
        total = int(counters.get("total_steps", 0))
        step = int(counters.get("step", 0))
        if total <= 0:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="learner steps", unit="step", dynamic_ncols=True, file=sys.stderr)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        post = {k: f"{counters[k]:.3g}" for k in ("reward", "stop_rate", "beta", "tokens_per_s") if k in counters}
        if post:
            self._bar.set_postfix(post, refresh=False)
