"""Run one real actor process alone; the caller (a test, a benchmark, or you, writing a new
actor class) plays every other actor over real ZeroMQ sockets.

    async with ActorHarness(config, tmp_path, "sampler-0", binds=["work", "results", ...]) as h:
        ident, msg = await h.recv_routed("work", timeout=10)

The harness writes the run folder (config.yaml, addresses.json, assets.json), binds the
endpoints the actor connects to, starts ``python -m espo_async.runtime.entry``, answers its
heartbeats, and broadcasts Start. Every wait has a timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import zmq
import zmq.asyncio

import protocols as P
from espo_async.config import Config
from espo_async.runtime.transport import cleanup_ipc, resolve_addresses
from espo_async.runtime.weight_files import remove_transient

SOCKET_KINDS = {
    "work": zmq.ROUTER,
    "stopper_stream": zmq.PULL,
    "stopper_cancel": zmq.ROUTER,
    "critic_stream": zmq.PULL,
    "results": zmq.PULL,
    "broadcast": zmq.PUB,
}


def _be_nicer(n: int):
    def preexec() -> None:  # in the child, after setsid: its own (new) autogroup and itself
        os.nice(n)
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(n))

    return preexec


class ActorHarness:
    def __init__(self, config: Config, run_dir: Path, actor: str, *, binds: list[str], assets: dict,
                 nice: int = 0):
        """``nice``: start the actor (and every process it starts) this much below the test. The
        actor runs in a session of its own; under Linux's scheduler autogroups a session's
        processes share one weight, so the autogroup is niced too, or a busy engine in the
        actor's session would get half the machine however nice its threads are."""
        self.cfg = config
        self.nice = int(nice)
        self.run_dir = Path(run_dir)
        self.actor = actor
        self.addresses = resolve_addresses("ipc", str(self.run_dir.resolve()))
        self.ctx = zmq.asyncio.Context()
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        self.binds = binds
        self.assets = assets
        self.proc: subprocess.Popen | None = None
        self.heartbeats: list[P.Heartbeat] = []
        self.heartbeat_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> ActorHarness:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        (self.run_dir / "addresses.json").write_text(json.dumps(self.addresses))
        (self.run_dir / "assets.json").write_text(json.dumps(self.assets))
        for name in self.binds:
            sock = self.ctx.socket(SOCKET_KINDS[name])
            sock.setsockopt(zmq.LINGER, 0)
            if SOCKET_KINDS[name] == zmq.ROUTER:
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.bind(self.addresses[name])
            self.socks[name] = sock
        control_in = self.ctx.socket(zmq.PULL)
        control_in.bind(self.addresses["control_in"])
        self.control_out = self.ctx.socket(zmq.PUB)
        self.control_out.bind(self.addresses["control_out"])
        self.socks["control_in"] = control_in
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log_path = self.run_dir / "logs" / f"{self.actor}.out"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "espo_async.runtime.entry", str(self.run_dir), self.actor],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_be_nicer(self.nice) if self.nice else None,
            )
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(control_in)))
        self._tasks.append(asyncio.create_task(self._watch_exit()))
        return self

    async def _watch_exit(self) -> None:
        await asyncio.to_thread(self.proc.wait)
        self.heartbeat_event.set()  # wake waiters: the process is gone

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
            except asyncio.TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.ctx.destroy(linger=0)
        cleanup_ipc(self.addresses)
        remove_transient(self.cfg, self.run_dir)  # a learner's weight files in /dev/shm (the supervisor's job in a run)
        return self.proc.returncode if self.proc else None

    def output(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        log = self.run_dir / "logs" / f"{self.actor}.log"
        if log.exists():
            text += log.read_text(errors="replace")
        return text

    async def _heartbeat_loop(self, sock) -> None:
        while True:
            msg = P.decode(await sock.recv())
            if isinstance(msg, P.Heartbeat):
                self.heartbeats.append(msg)
                self.heartbeat_event.set()

    async def wait_heartbeat(self, predicate, timeout: float = 30.0, *, fresh_only: bool = False) -> P.Heartbeat:
        """The first heartbeat for which predicate holds: among those already received, or
        (fresh_only) only among heartbeats that arrive after this call."""
        async with asyncio.timeout(timeout):
            seen = len(self.heartbeats) if fresh_only else 0
            while True:
                for hb in self.heartbeats[seen:]:
                    if predicate(hb):
                        return hb
                seen = len(self.heartbeats)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.actor} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
                self.heartbeat_event.clear()
                await self.heartbeat_event.wait()

    async def start(self, timeout: float = 60.0) -> None:
        """Wait for the actor to be ready, then broadcast Start until it reports running."""
        await self.wait_heartbeat(lambda hb: hb.status in ("ready", "running"), timeout)

        async def keep_starting():
            while True:
                await self.control_out.send(P.encode(P.Start(actors=[self.actor])))
                await asyncio.sleep(0.1)  # re-broadcast (PUB/SUB may miss the first one)

        self._tasks.append(asyncio.create_task(keep_starting()))
        await self.wait_heartbeat(lambda hb: hb.status == "running", timeout)

    # -- messaging --------------------------------------------------------------------------

    async def recv(self, endpoint: str, timeout: float = 10.0) -> P.Message:
        async with asyncio.timeout(timeout):
            return P.decode(await self.socks[endpoint].recv())

    async def recv_routed(self, endpoint: str, timeout: float = 10.0) -> tuple[bytes, P.Message]:
        async with asyncio.timeout(timeout):
            ident, frame = await self.socks[endpoint].recv_multipart()
            return ident, P.decode(frame)

    async def recv_until(self, endpoint: str, predicate, timeout: float = 10.0, routed: bool = False):
        """Receive until a message satisfies predicate; returns (it, everything received before)."""
        before = []
        async with asyncio.timeout(timeout):
            while True:
                if routed:
                    ident, frame = await self.socks[endpoint].recv_multipart()
                    item = (ident, P.decode(frame))
                    msg = item[1]
                else:
                    item = msg = P.decode(await self.socks[endpoint].recv())
                if predicate(msg):
                    return item, before
                before.append(item)

    async def send(self, endpoint: str, msg: P.Message) -> None:
        await self.socks[endpoint].send(P.encode(msg))

    async def send_to(self, endpoint: str, ident: bytes, msg: P.Message) -> None:
        await self.socks[endpoint].send_multipart([ident, P.encode(msg)])
