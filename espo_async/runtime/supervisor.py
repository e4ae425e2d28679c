"""The supervisor: starts every actor as its own process, watches them, restarts the lost ones.

It owns the two control endpoints (heartbeats in, start/shutdown out), shows progress from the
learner's heartbeats, and detects dead or hung actors by name: an actor whose process exited, or
that sent no heartbeat for ``transport.heartbeat_timeout_s`` (its process is then killed), is
*lost*. Once the run has started, a lost actor is restarted under the same name after
``transport.restart_backoff_s`` (doubling per restart), at most ``transport.max_restarts`` times
per ``transport.restart_window_s``; every other actor is told (``ActorDown`` while it is down,
``ActorUp`` once its new process is ready) so that, e.g., the coordinator issues a dead sampler's
work again. A loss before the run started, a loss beyond the restart budget, or any loss with
``transport.restart_actors: false`` ends the run. The learner exiting with code 0 ends the run
(training finished).

Several hosts (docs/cluster.md): each host runs its own supervisor for the roles it starts
(``cluster.roles``) and restarts only those. A supervisor whose host does not run the learner
ends its run when the learner says training is over (``Shutdown`` from ``learner`` on its
broadcast, which every supervisor subscribes to), or when the learner, after its last step, has
been silent for ``transport.startup_timeout_s`` (time enough for a learner restart). The head
host (the one that does not join) writes ``join.json`` (addresses and config) for the others
(``run.py --join``).

No process of the run outlives the supervisor: each actor leads its own process group (so
terminal Ctrl-C reaches only the supervisor, and engine subprocesses are killed with their
actor), and the kernel sends SIGTERM to an actor whose supervisor dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

import protocols as P
from espo_async.config import Config
from espo_async.runtime import keys
from espo_async.runtime.entry import actor_instances, validate_actors
from espo_async.runtime.placement import pin_process
from espo_async.runtime.transport import Transport, cleanup_ipc, is_local_address, resolve_addresses
from espo_async.runtime.weight_files import remove_transient
from espo_async.utils import describe_exit, tail
from protocols.messages import ActorDown, ActorUp

log = logging.getLogger("espo.supervisor")

MAX_BACKOFF_S = 60.0
CLEAN_EXIT_GRACE_S = 2.0  # an actor that exited with code 0 is called lost only after this
UP_REPEATS = 6  # ActorUp is re-sent on this many watch ticks (PUB/SUB may drop one)


@dataclass
class ActorState:
    name: str
    role: str
    proc: subprocess.Popen | None = None
    status: str = "starting"  # as reported, plus "down" while waiting for a restart
    last_seen: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    returncode: int | None = None
    incarnation: int = 0  # 0 = the first process; +1 per restart
    restarts: list[float] = field(default_factory=list)  # monotonic times of restarts (window)
    restart_at: float | None = None  # when a lost actor is due to be started again
    spawned_at: float = 0.0
    down_reason: str = ""
    up_repeats: int = 0  # ActorUp messages still to send
    clean_exit_at: float | None = None  # when its exit with code 0 was first seen (grace)
    beats: int = 0  # heartbeats received from it (all incarnations)


@dataclass
class Event:
    """Something that happened to an actor (for logs, tests and RunResult)."""

    kind: str  # "lost" | "restarting" | "up" | "gave_up" | "stalled"
    actor: str
    role: str
    incarnation: int
    detail: str
    time: float


@dataclass
class RunResult:
    exit_code: int
    reason: str
    run_dir: Path
    actors: dict[str, ActorState]
    events: list[Event] = field(default_factory=list)


def supervisor_cpus(cfg: Config, available: set[int]) -> set[int] | None:
    """Where the supervisor process runs (``actors.supervisor_cpus``); None: where it is.

    'auto' keeps it off the CPUs this host's samplers are pinned to, unless that leaves none."""
    want = cfg.actors.supervisor_cpus
    if want is None:
        return None
    if want != "auto":
        if not set(want) & set(available):
            raise ValueError(f"actors.supervisor_cpus {list(want)}: none of them is one of this process's "
                             f"CPUs {sorted(available)}")
        return set(want) & set(available)
    spec = cfg.actors.sampler
    if not spec.cpus or not cfg.cluster.runs("sampler"):
        return None
    rest = set(available) - set(spec.cpus)
    return rest or None


def curve_keys_for_run(cfg: Config, run_dir: Path) -> Config:
    """``transport.curve.auto``: CURVE keys made for this run in RUN/curve (kept on resume), and
    the config every actor reads (RUN/config.yaml, join.json) names them."""
    curve = cfg.transport.curve
    if not curve.auto or curve.keys_dir:
        return cfg
    folder = (run_dir / "curve").resolve()
    if not (folder / "server.key_secret").is_file():
        keys.generate(folder, force=True)
    keys.load(folder)  # unusable (e.g. readable by others): fail now, naming it
    curve = curve.model_copy(update={"keys_dir": str(folder)})
    return cfg.model_copy(update={"transport": cfg.transport.model_copy(update={"curve": curve})})


class Supervisor:
    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        addresses: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        progress: bool | None = None,
        joining: bool = False,
        run_key: bytes | None = None,
    ):
        validate_actors(config)  # fail here, naming the key, not in a child process later
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = config = curve_keys_for_run(config, self.run_dir)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        tcfg = config.transport
        self.addresses = addresses or resolve_addresses(
            tcfg.kind, str(self.run_dir.resolve()), host=tcfg.host, base_port=tcfg.base_port,
            role_hosts=dict(config.cluster.role_hosts),
        )
        #: This host joins a run another host (the head) started: no join.json, actors rejoin.
        self.joining = joining
        #: The secret the coordinator's work tags are made with (RUN/run.key; the head's, when joining).
        self.run_key = keys.run_key(self.run_dir, value=run_key)
        self._counters_at = 0.0  # when counters.jsonl was last written
        self._stalls_seen = (0, 0.0)  # (coordinator incarnation, stalls it reported)
        self.env = dict(env or {})
        self.progress = config.run.progress if progress is None else progress
        self.actors: dict[str, ActorState] = {
            name: ActorState(name, role) for name, role, _ in actor_instances(config, local=True)
        }
        if not self.actors:
            raise ValueError(f"cluster.roles {config.cluster.roles} names no configured actor: nothing to start")
        self.started = False
        self.changed = asyncio.Event()  # pulses whenever an actor's state changes (for tests)
        self.events: list[Event] = []
        self.counters: Counter[str] = Counter()
        self.transport: Transport | None = None
        self._stop_reason: tuple[int, str] | None = None
        self._bar = None
        # A run folder that already holds a checkpoint is being resumed: every actor rejoins.
        self._resuming = (self.run_dir / "checkpoint").is_dir() or joining
        self._learner_local = any(s.role == "learner" for s in self.actors.values())
        #: Set once the learner said training is over (its Shutdown broadcast), or its last step
        #: was followed by silence: then no actor is restarted and the run ends with code 0.
        self.learner_finished = False
        self._learner_last_step = -1
        self._learner_heard = 0.0  # monotonic time of its last broadcast
        self._cpus_before: set[int] | None = None  # this process's CPUs before run() placed it

    # -- public ------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        (self.run_dir / "addresses.json").write_text(json.dumps(self.addresses, indent=1))
        if not self.joining:
            self._write_join_file()
        transport = self.transport = Transport.from_config(self.addresses, self.cfg.transport, hwm=10_000)
        inbox = transport.socket(zmq.PULL, "control_in", bind=True, hwm=10_000)
        outbox = transport.socket(zmq.PUB, "control_out", bind=True, hwm=10_000)
        learner_sub = transport.socket(zmq.SUB, "broadcast", bind=False, subscribe=True, hwm=10_000)
        loop = asyncio.get_running_loop()
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            loop.add_signal_handler(sig, self.stop, code, f"received {signal.Signals(sig).name}")
        exit_code, reason = 1, "supervisor failed"
        try:
            self._place_self()
            self._spawn_all()
            receivers = [
                asyncio.create_task(self._receive(transport, inbox)),
                asyncio.create_task(self._hear_learner(transport, learner_sub)),
            ]
            try:
                exit_code, reason = await self._watch(transport, outbox)
            finally:
                for receiver in receivers:
                    receiver.cancel()
                await asyncio.gather(*receivers, return_exceptions=True)
            self._write_counters(final=True)  # the last counters each actor reported
            self._append("events.jsonl", {"time": time.time(), "kind": "run_ended", "exit_code": exit_code,
                                          "reason": reason})
            await self._shutdown_all(transport, outbox, reason)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self._kill_all(signal.SIGKILL)
            transport.close()
            if self._cpus_before:
                pin_process(self._cpus_before)
            cleanup_ipc(self.addresses)
            if self.cfg.cluster.runs("learner"):
                remove_transient(self.cfg, self.run_dir)  # weight files in /dev/shm (weights.dir)
            if self._bar is not None:
                self._bar.close()
        return RunResult(exit_code, reason, self.run_dir, self.actors, self.events)

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

    def kill_actor(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send a signal to one actor's process group (fault tests); returns the pid signalled."""
        proc = self.actors[name].proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)
            return proc.pid
        return None

    def _write_join_file(self) -> None:
        """``join.json``: what another host needs to join this run (``run.py --join``): the
        addresses of the bound endpoints and the run's config. Written atomically."""
        data = {
            "run_dir": str(self.run_dir.resolve()),
            "addresses": self.addresses,
            "config": self.cfg.model_dump(mode="json", by_alias=True),
            "local_only": all(is_local_address(a) for a in self.addresses.values()),
            "run_key": self.run_key.hex(),  # work tags (a secret: the file is 0600)
        }
        tmp = self.run_dir / "join.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1))
        os.replace(tmp, self.run_dir / "join.json")

    async def _hear_learner(self, transport: Transport, sock) -> None:
        """Follow the learner's broadcast: its end-of-training ``Shutdown`` ends every host's run."""
        while True:
            msg = await transport.recv(sock, "learner")
            if msg is None:
                continue
            self._learner_heard = time.monotonic()
            if isinstance(msg, P.BatchBoundary):
                self._learner_last_step = max(self._learner_last_step, int(msg.step))
            elif isinstance(msg, P.Shutdown) and msg.source == "learner" and not self.learner_finished:
                log.info("the learner says: %s", msg.reason)
                self.learner_finished = True
                self._pulse()

    def _learner_done(self, now: float) -> bool:
        """Training is over (for a host without the learner): the learner said so, or it trained
        its last step and then went silent for transport.startup_timeout_s (a restarted learner
        would have been back by then)."""
        if self.learner_finished:
            return True
        if self._learner_local or self._learner_last_step < self.cfg.run.total_steps:
            return False
        if now - self._learner_heard > self.cfg.transport.startup_timeout_s:
            self.learner_finished = True
            log.warning("the learner finished its last step and has been silent since: ending this host's run")
        return self.learner_finished

    def events_of(self, name: str, kind: str | None = None) -> list[Event]:
        return [e for e in self.events if e.actor == name and (kind is None or e.kind == kind)]

    # -- processes ---------------------------------------------------------------------------

    def _spawn_all(self) -> None:
        for name, state in self.actors.items():
            self._start(state)

    def _start(self, state: ActorState) -> None:
        state.proc = self._spawn(state.name, state.incarnation)
        state.status = "starting"
        state.spawned_at = state.last_seen = time.monotonic()
        state.returncode = None
        state.restart_at = None
        state.clean_exit_at = None
        state.counters = {}

    def _place_self(self) -> None:
        """Pin this process to ``actors.supervisor_cpus`` (restored when the run ends)."""
        if not hasattr(os, "sched_setaffinity"):
            return
        self._cpus_before = os.sched_getaffinity(0)
        mine = supervisor_cpus(self.cfg, self._cpus_before)
        if mine and mine != self._cpus_before:
            pin_process(mine)

    def _spawn(self, name: str, incarnation: int = 0) -> subprocess.Popen:
        role = self.actors[name].role
        spec = getattr(self.cfg.actors, role)
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=str(spec.threads),
            MKL_NUM_THREADS=str(spec.threads),
            TOKENIZERS_PARALLELISM="false",
            ESPO_INCARNATION=str(incarnation),
            ESPO_REJOINING="1" if (incarnation > 0 or self._resuming) else "0",
        )
        env.update(spec.env)  # e.g. CUDA_VISIBLE_DEVICES: which GPUs this role sees
        env.update(self.env)
        cpus = spec.cpus
        if cpus:
            env["ESPO_CPUS"] = ",".join(map(str, cpus))
        # An unpinned actor gets the CPUs the supervisor started with, not the ones it moved to.
        affinity = cpus or (sorted(self._cpus_before) if self._cpus_before else None)
        nice = spec.nice

        def place() -> None:  # in the child, before exec: every thread it starts inherits both
            if affinity:
                os.sched_setaffinity(0, affinity)
            if nice:
                os.nice(nice)

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
                preexec_fn=place if (affinity or nice) else None,
            )
        finally:
            out.close()

    def _kill_all(self, sig: int) -> None:
        for state in self.actors.values():
            if state.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(state.proc.pid, sig)  # the actor and anything it started

    def _kill(self, state: ActorState) -> None:
        """SIGKILL an actor's process group and reap it (a hung actor: it cannot clean up)."""
        if state.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            state.returncode = state.proc.wait(timeout=5.0)

    # -- loop --------------------------------------------------------------------------------

    def _pulse(self) -> None:
        self.changed.set()

    def _event(self, kind: str, state: ActorState, detail: str) -> None:
        event = Event(kind, state.name, state.role, state.incarnation, detail, time.time())
        self.events.append(event)
        self.counters[f"actor_{kind}"] += 1
        record = {"time": event.time, "kind": kind, "actor": state.name, "role": state.role,
                  "incarnation": state.incarnation, "detail": detail}
        if kind == "lost":  # why: hung (no heartbeat, or not ready in time) or died (its exit)
            record["cause"] = "hung" if detail.startswith("is hung") else "died"
        self._append("events.jsonl", record)
        self._pulse()

    def _append(self, name: str, record: dict) -> None:
        """One JSON line in RUN/<name> (the run folder is the record: docs/reliability.md)."""
        try:
            with (self.run_dir / name).open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk must not stop supervision
            self.counters["record_errors"] += 1
            log.warning("could not write %s: %s", name, exc)

    def _write_counters(self, final: bool = False) -> None:
        """RUN/counters.jsonl: every actor's last reported counters, and the supervisor's own."""
        self._counters_at = time.monotonic()
        self._append("counters.jsonl", {
            "time": time.time(), "final": final, "supervisor": dict(self.counters),
            "wire": dict(self.transport.errors) if self.transport is not None else {},
            "actors": {name: {"status": s.status, "incarnation": s.incarnation, "counters": s.counters}
                       for name, s in self.actors.items()},
        })

    def _on_coordinator(self, state: ActorState) -> None:
        """The coordinator reported a stall (run.stall_timeout_s): show what the run waits for;
        if it gave up (run.stall_reissues), end the run naming it."""
        stalls = state.counters.get("stalls", 0.0)
        seen_incarnation, seen = self._stalls_seen
        if seen_incarnation != state.incarnation:  # a restarted coordinator counts from 0 again
            seen = 0.0
        if not (math.isfinite(stalls) and stalls > seen):
            return
        self._stalls_seen = (state.incarnation, stalls)
        summary = self._stall_summary()
        log.error("the run is stalled: %s", summary)
        self._event("stalled", state, summary)
        if state.counters.get("stall_gave_up", 0.0) > 0:
            self.stop(1, f"the run stalled and could not recover (run.stall_reissues="
                         f"{self.cfg.run.stall_reissues}): {summary}")

    def _stall_summary(self) -> str:
        try:
            report = json.loads((self.run_dir / "stall.json").read_text())
        except (OSError, ValueError):
            return "(no stall.json)"
        missing = [m for g in report.get("groups", []) for m in g.get("missing", [])]
        missing += [m for r in report.get("eval_rounds", []) for m in r.get("missing", [])]

        def one(m: dict) -> str:
            where = m.get("state", "?")
            if "to" in m:
                where += f" to {m['to']}, {m.get('issued_s_ago', '?')}s ago"
            return f"{m.get('request_id')} ({where})"

        shown = "; ".join(one(m) for m in missing[:8]) + (f"; and {len(missing) - 8} more" if len(missing) > 8 else "")
        return (f"no learner step and no trajectory acknowledged for {report.get('stalled_for_s')}s "
                f"(run.stall_timeout_s={self.cfg.run.stall_timeout_s:g}) at step {report.get('learner_step')}; "
                f"waiting for {len(missing)} sample(s): {shown}; {report.get('action')} "
                f"(details: {self.run_dir / 'stall.json'})")

    async def _receive(self, transport: Transport, inbox) -> None:
        while True:
            msg = await transport.recv(inbox, "control_in")
            if msg is None:
                continue
            if not isinstance(msg, P.Heartbeat):
                self.counters["unexpected_control_messages"] += 1
                continue
            try:
                self._on_heartbeat(msg)
            except Exception:  # a hostile heartbeat must not stop the supervisor from listening
                self.counters["bad_heartbeats"] += 1
                log.exception("could not handle a heartbeat from %r (ignored)", msg.actor)

    def _on_heartbeat(self, msg: P.Heartbeat) -> None:
        state = self.actors.get(msg.actor)
        if state is None:
            self.counters["heartbeats_unknown_actor"] += 1
            if self.counters["heartbeats_unknown_actor"] <= 10:
                log.warning("heartbeat from unknown actor %r (ignored)", msg.actor[:100])
            return
        if state.proc is None or msg.pid != state.proc.pid:
            # From a process we already gave up on (in flight when it was killed), or forged.
            self.counters["heartbeats_stale_pid"] += 1
            return
        state.last_seen = time.monotonic()
        state.beats += 1
        state.counters = {str(k): float(v) for k, v in msg.counters.items()}
        if state.status != msg.status:
            log.info("%s: %s -> %s", msg.actor, state.status, msg.status)
            if state.incarnation > 0 and msg.status in ("ready", "running") and state.status == "starting":
                state.up_repeats = UP_REPEATS
                log.warning("%s is back (incarnation %d, pid %d)", state.name, state.incarnation, msg.pid)
                self._event("up", state, f"pid {msg.pid}")
        state.status = msg.status
        if msg.role == "learner":
            self._show_progress(state.counters)
        elif msg.role == "coordinator":
            self._on_coordinator(state)
        self._pulse()

    def _lost(self, state: ActorState, why: str, outbox, transport: Transport) -> tuple[int, str] | None:
        """An actor died or hung. Schedule its restart, or say why the run must end."""
        tcfg = self.cfg.transport
        detail = tail(self.run_dir / "logs" / f"{state.name}.out")
        message = f"actor {state.name} ({state.role}) {why}"
        log.error("%s", message)
        self._event("lost", state, why)
        full = message + (f"; last output:\n{detail}" if detail else "")
        if not self.started:
            return 1, full
        if not tcfg.restart_actors:
            return 1, full + "\n(transport.restart_actors is false)"
        now = time.monotonic()
        state.restarts = [t for t in state.restarts if now - t < tcfg.restart_window_s]
        if len(state.restarts) >= tcfg.max_restarts:
            self._event("gave_up", state, why)
            return 1, (
                f"{message}; it was restarted {len(state.restarts)} times in the last {tcfg.restart_window_s:.0f}s "
                f"(transport.max_restarts={tcfg.max_restarts})" + (f"; last output:\n{detail}" if detail else "")
            )
        delay = min(tcfg.restart_backoff_s * 2 ** len(state.restarts), MAX_BACKOFF_S)
        state.restarts.append(now)
        state.proc = None
        state.status = "down"
        state.down_reason = why
        state.restart_at = now + delay
        state.up_repeats = 0
        self._event("restarting", state, f"in {delay:.1f}s (restart {len(state.restarts)} of {tcfg.max_restarts})")
        log.warning("restarting %s in %.1fs (%d of %d)", state.name, delay, len(state.restarts), tcfg.max_restarts)
        self._send_down(state, transport, outbox)
        return None

    def _send_down(self, state: ActorState, transport: Transport, outbox) -> None:
        transport.try_send(
            outbox, ActorDown(actor=state.name, role=state.role, incarnation=state.incarnation, reason=state.down_reason)
        )

    async def _watch(self, transport: Transport, outbox) -> tuple[int, str]:
        tcfg = self.cfg.transport
        t0 = time.monotonic()
        while True:
            if self._stop_reason is not None:
                return self._stop_reason
            now = time.monotonic()
            if not self._learner_local and self._learner_done(now):
                return 0, "training finished (the learner's broadcast)"
            for state in self.actors.values():
                if state.proc is None:  # lost: tell everyone until it is back, then start it
                    if state.restart_at is not None and now >= state.restart_at:
                        state.incarnation += 1
                        log.warning("starting %s again (incarnation %d)", state.name, state.incarnation)
                        self._start(state)
                        self._pulse()
                    else:
                        self._send_down(state, transport, outbox)
                    continue
                rc = state.proc.poll()
                if rc is not None:
                    state.returncode = rc
                    self._pulse()
                    if state.role == "learner" and rc == 0:
                        return 0, "training finished"
                    if rc == 0 and self.started and not self.learner_finished:
                        # A clean exit: the learner's end-of-training broadcast reached the actor
                        # before us? Give it a moment before calling the actor lost.
                        if state.clean_exit_at is None:
                            state.clean_exit_at = now
                        if now - state.clean_exit_at < CLEAN_EXIT_GRACE_S:
                            continue
                    if self.learner_finished:
                        continue  # training is over: nothing is restarted; the learner's exit (or ours) ends the run
                    ended = self._lost(state, describe_exit(rc), outbox, transport)
                    if ended is not None:
                        return ended
                    continue
                silent = now - state.last_seen
                if state.status == "starting":
                    # (Re)starting: setup may block the event loop (model loading); allow the start-up time.
                    if self.started and now - state.spawned_at > tcfg.startup_timeout_s:
                        why = f"is hung: not ready {now - state.spawned_at:.0f}s after (re)start (transport.startup_timeout_s={tcfg.startup_timeout_s:g})"
                        self._kill(state)
                        ended = self._lost(state, why, outbox, transport)
                        if ended is not None:
                            return ended
                elif self.started and silent > tcfg.heartbeat_timeout_s:
                    why = (
                        # rounded up: the reported silence is never below the timeout it exceeded
                        f"is hung: no heartbeat for {math.ceil(silent * 100) / 100:.2f}s (transport.heartbeat_timeout_s="
                        f"{tcfg.heartbeat_timeout_s:g}); killed it"
                    )
                    self._kill(state)
                    ended = self._lost(state, why, outbox, transport)
                    if ended is not None:
                        return ended
                if state.up_repeats > 0 and state.proc is not None:
                    state.up_repeats -= 1
                    transport.try_send(
                        outbox,
                        ActorUp(actor=state.name, role=state.role, incarnation=state.incarnation, pid=state.proc.pid),
                    )
            if not self.started:
                if all(s.status in ("ready", "running") for s in self.actors.values()):
                    self.started = True
                    log.info("all %d actors ready after %.1fs", len(self.actors), now - t0)
                    self._pulse()
                elif now - t0 > tcfg.startup_timeout_s:
                    waiting = [s.name for s in self.actors.values() if s.status not in ("ready", "running")]
                    return 1, f"actors not ready after {tcfg.startup_timeout_s:.0f}s: {', '.join(waiting)}"
            if self.started:
                transport.try_send(outbox, P.Start(actors=list(self.actors)))
                every = self.cfg.run.counters_every_s
                if every and now - self._counters_at >= every:
                    self._write_counters()
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
        total, step = counters.get("total_steps", 0.0), counters.get("step", 0.0)
        if not (math.isfinite(total) and math.isfinite(step)) or total <= 0:
            return
        total, step = int(total), int(step)
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="learner steps", unit="step", dynamic_ncols=True, file=sys.stderr)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        post = {k: f"{counters[k]:.3g}" for k in ("reward", "stop_rate", "beta", "tokens_per_s") if k in counters}
        if post:
            self._bar.set_postfix(post, refresh=False)
