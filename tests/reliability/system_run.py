"""Drive a whole run (real processes, fake samplers and critic, the real learner) while a test
injects faults: kill -9 an actor, wait for what the supervisor saw, read everyone's counters.

Every wait is on the supervisor's state-change event with a timeout (heartbeats arrive every
``transport.heartbeat_interval_s``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.asyncio

import protocols as P
from espo_async.assets import prepare_assets
from espo_async.config import Config, merge_config
from espo_async.runtime.supervisor import RunResult, Supervisor
from tests.runtime.system import fake_config

# Fast supervision for tests: heartbeats every 0.25 s, restarts after 0.3 s.
FAULTS = {
    "run": {"total_steps": 1000},  # tests end the run themselves once they have their evidence
    "task": {"eval_problems": 0},
    "transport": {
        "heartbeat_interval_s": 0.25,
        "heartbeat_timeout_s": 60,
        "startup_timeout_s": 240,
        "restart_backoff_s": 0.3,
        "shutdown_timeout_s": 20,
    },
}


def faults_config(**sections) -> Config:
    """tests/runtime/system.py's FAKE run, then FAULTS, then ``sections`` (deep-merged)."""
    return fake_config(**merge_config(FAULTS, sections))


class SystemRun:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.sup: Supervisor | None = None
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> SystemRun:
        await asyncio.to_thread(prepare_assets, self.cfg, self.run_dir, log=lambda *_: None)
        self.sup = Supervisor(self.cfg, self.run_dir, progress=False)
        self.task = asyncio.create_task(self.sup.run())
        return self

    async def __aexit__(self, *exc) -> None:
        if self.task is not None and not self.task.done():
            self.sup.stop(1, "test ended")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 60)

    # -- observing ---------------------------------------------------------------------------

    def counters(self, name: str) -> dict[str, float]:
        return self.sup.actors[name].counters

    def total(self, key: str, role: str) -> float:
        return sum(s.counters.get(key, 0.0) for s in self.sup.actors.values() if s.role == role)

    async def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``predicate()`` holds; fails with ``what`` on timeout or if the run ended."""
        sup = self.sup
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self.task.done():
                        result = self.task.result()
                        raise AssertionError(f"the run ended while waiting for {what}: {result.reason}")
                    sup.changed.clear()
                    changed = asyncio.ensure_future(sup.changed.wait())
                    await asyncio.wait({changed, self.task}, return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; events: {sup.events}") from None

    async def wait_event(self, actor: str, kind: str, timeout: float, count: int = 1):
        await self.wait(lambda: len(self.sup.events_of(actor, kind)) >= count, timeout, f"{kind} event of {actor}")
        return self.sup.events_of(actor, kind)[count - 1]

    async def fresh(self, names: list[str], timeout: float = 30.0) -> dict[str, dict[str, float]]:
        """Counters from heartbeats that all ``names`` sent after this call."""
        marks = {n: self.sup.actors[n].beats for n in names}
        await self.wait(lambda: all(self.sup.actors[n].beats > marks[n] for n in names), timeout,
                        f"fresh heartbeats of {names}")
        return {n: dict(self.sup.actors[n].counters) for n in names}

    async def finish(self, timeout: float = 240.0) -> RunResult:
        """Wait for the run to end by itself."""
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def stop(self, timeout: float = 60.0) -> RunResult:
        self.sup.stop(0, "test done")
        return await asyncio.wait_for(self.task, timeout)


class Listener:
    """A subscriber to the learner's broadcast (what every actor hears)."""

    def __init__(self, address: str):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(address)

    async def until(self, predicate, timeout: float) -> P.Message:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    msg = P.decode(await self.sock.recv())
                except P.ProtocolError:
                    continue
                if predicate(msg):
                    return msg

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
