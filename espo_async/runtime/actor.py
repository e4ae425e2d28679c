"""The actor base class: one OS process, one asyncio (uvloop) event loop, sockets only.

An actor subclass implements ``setup`` (open sockets, load models) and ``main`` (its loop);
this base class adds what every actor needs: heartbeats to the supervisor, the shutdown
broadcast, SIGTERM/SIGINT handling, death of the parent process, counters and logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import zmq

import protocols as P
from espo_async.config import Config
from espo_async.runtime.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class ActorContext:
    """Everything an actor process is started with."""

    name: str  # unique in the run, e.g. "sampler-1"
    role: str  # coordinator | sampler | critic | stopper | learner
    index: int  # instance number within its role
    config: Config
    addresses: dict[str, str]
    run_dir: Path
    options: dict[str, Any] = field(default_factory=dict)


class LoopLagProbe:
    """How long a process's event loop is busy with other work: a timer of period T fires
    ``lag`` late when callbacks held the loop, and every message handler (a cancel, a heartbeat)
    can wait that long. Counts go into ``counters`` (reported with the heartbeats): one per
    sample in ``loop_lag.le_<ms>ms`` (the first bucket bound >= the lag) or ``loop_lag.gt_<ms>ms``,
    ``loop_lag.samples`` and ``loop_lag.max_ms`` (docs/performance.md uses them)."""

    BUCKETS_MS: ClassVar[tuple[float, ...]] = (1, 2, 5, 10, 20, 50)

    def __init__(self, period_s: float, counters: Counter) -> None:
        self.period = period_s
        self.counters = counters
        self.sampled = asyncio.Event()  # set after every sample (tests)
        self._keys = [(b, f"loop_lag.le_{b:g}ms") for b in self.BUCKETS_MS]
        self._over = f"loop_lag.gt_{self.BUCKETS_MS[-1]:g}ms"

    def record(self, lag_ms: float) -> None:
        self.counters["loop_lag.samples"] += 1
        self.counters[next((key for bound, key in self._keys if lag_ms <= bound), self._over)] += 1
        if lag_ms > self.counters.get("loop_lag.max_ms", 0.0):
            self.counters["loop_lag.max_ms"] = round(lag_ms, 3)
        self.sampled.set()

    async def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.period)  # the probe itself: how late does this timer fire?
            self.record(max(time.perf_counter() - t0 - self.period, 0.0) * 1e3)


class Actor:
    """Base of every actor. Subclasses set ``ROLE`` and override ``setup``/``main``/``teardown``."""

    ROLE: ClassVar[str] = ""
    #: pydantic model of ``actors.<role>.options``; run.py validates the options before start.
    OPTIONS: ClassVar[type | None] = None
    #: Seconds ``main`` may take to end by itself after a stop request before it is cancelled.
    STOP_GRACE_S: ClassVar[float] = 0.0

    def __init__(self, ctx: ActorContext):
        self.ctx = ctx
        self.name = ctx.name
        self.cfg = ctx.config
        self.run_dir = ctx.run_dir
        self.options = dict(ctx.options)
        self.transport = Transport.from_config(ctx.addresses, self.cfg.transport)
        #: 0 for the first process of this actor in the run, n after its n-th restart.
        self.incarnation = int(os.environ.get("ESPO_INCARNATION", "0") or 0)
        #: True if this process joins a run already under way (a restart, or a resumed run folder):
        #: state it would otherwise assume from the config must come from its peers.
        self.rejoining = self.incarnation > 0 or os.environ.get("ESPO_REJOINING") == "1"
        self.counters: Counter[str] = Counter()
        self.status: str = "starting"
        self.stop_event = asyncio.Event()
        self.started = asyncio.Event()  # set when the supervisor broadcasts Start
        self._seq = 0
        self._heartbeat_sock: zmq.asyncio.Socket | None = None
        self.log = logging.getLogger(f"espo.{ctx.name}")

    # -- to override -------------------------------------------------------------------------

    async def setup(self) -> None:
        """Open sockets, load models. Runs before the actor reports ready."""

    async def main(self) -> None:
        """The actor's work. Return (or get cancelled) when ``stop_event`` is set."""
        await self.stop_event.wait()

    async def teardown(self) -> None:
        """Release resources (engines, files). Sockets are closed by the base class."""

    def heartbeat_counters(self) -> dict[str, float]:
        """Numbers reported with every heartbeat (shown by the supervisor)."""
        counters = {k: float(v) for k, v in self.counters.items()}
        counters.update({f"wire.{k}": float(v) for k, v in self.transport.errors.items()})
        return counters

    @contextlib.contextmanager
    def guard(self, what: str):
        """Handle one piece of external input: a failure is logged and counted, never fatal."""
        try:
            yield
        except Exception:
            self.counters["handler_errors"] += 1
            self.log.exception("error while handling %s (ignored)", what)

    def on_shutdown(self, msg: P.Shutdown) -> None:
        if not self.stop_event.is_set():  # (repeated: supervisor and learner both send it)
            self.log.info("shutdown requested by %s: %s", msg.source or "?", msg.reason)
        self.request_stop()

    async def on_control(self, msg: P.Message) -> None:
        """Other supervisor broadcasts (``ActorDown``, ``ActorUp``): repeated, so idempotent."""

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self.stop_event.is_set():
            self.status = "stopping"
            self.stop_event.set()

    async def run(self) -> int:
        """Run the actor to completion; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._heartbeat_sock = self.transport.socket(zmq.PUSH, "control_in", bind=False, hwm=100)
        control = self.transport.socket(zmq.SUB, "control_out", bind=False, subscribe=True)
        background = [
            asyncio.create_task(self._heartbeats(), name="heartbeats"),
            asyncio.create_task(self._control(control), name="control"),
            asyncio.create_task(self._watch_parent(), name="watch-parent"),
        ]
        if self.cfg.transport.loop_probe_interval_s > 0:
            background.append(asyncio.create_task(self._probe_loop_lag(), name="loop-lag"))
        code = 0
        main_task: asyncio.Task | None = None
        try:
            await self.setup()
            self.status = "ready"
            self._send_heartbeat()
            main_task = asyncio.create_task(self.main(), name="main")
            stop_wait = asyncio.create_task(self.stop_event.wait())
            done, _ = await asyncio.wait({main_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if main_task in done:
                main_task.result()  # re-raise a failure
            else:
                await self._end_main(main_task)
        except Exception:
            self.log.exception("actor %s failed", self.name)
            self.status = "failed"
            self._send_heartbeat()
            code = 1
        finally:
            if main_task is not None and not main_task.done():
                await self._end_main(main_task)
            self.status = "stopping" if code == 0 else "failed"
            with contextlib.suppress(Exception):
                await self.teardown()
            self._send_heartbeat()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self.transport.close(linger_ms=200)
        return code

    async def _end_main(self, task: asyncio.Task) -> None:
        """Give ``main`` up to STOP_GRACE_S to end by itself after stop_event, then cancel it."""
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.STOP_GRACE_S)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            self.log.exception("main of %s failed while stopping", self.name)

    def _send_heartbeat(self) -> None:
        if self._heartbeat_sock is None:
            return
        self._seq += 1
        try:
            counters = self.heartbeat_counters()
        except Exception:  # e.g. during setup, before the subclass set its attributes
            counters = Actor.heartbeat_counters(self)
        hb = P.Heartbeat(
            actor=self.name,
            role=self.ROLE,
            pid=os.getpid(),
            seq=self._seq,
            time=time.time(),
            status=self.status,
            counters=counters,
        )
        self.transport.try_send(self._heartbeat_sock, hb, counter="heartbeats_dropped")

    async def _probe_loop_lag(self) -> None:
        await LoopLagProbe(self.cfg.transport.loop_probe_interval_s, self.counters).run()

    async def _heartbeats(self) -> None:
        interval = self.cfg.transport.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)  # periodic timer, not synchronisation
            if self.status == "ready" and self.started.is_set():
                self.status = "running"
            self._send_heartbeat()

    async def _control(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            msg = await self.transport.recv(sock, "supervisor")
            if isinstance(msg, P.Start):
                self.started.set()
            elif isinstance(msg, P.Shutdown):
                self.on_shutdown(msg)
            elif msg is not None and self.status in ("ready", "running"):
                with self.guard(type(msg).__name__):
                    await self.on_control(msg)

    async def expire_idle_streams(self, streams: dict, on_expire=None) -> None:
        """Forget streams (values with a ``last_activity`` monotonic time) idle longer than
        ``transport.stream_ttl_s``: their end message was lost; memory must stay bounded."""
        ttl = self.cfg.transport.stream_ttl_s
        while True:
            await asyncio.sleep(min(ttl / 4, 30.0))  # periodic sweep
            cutoff = time.monotonic() - ttl
            for key in [k for k, st in streams.items() if st.last_activity < cutoff]:
                streams.pop(key, None)
                self.counters["streams_expired"] += 1
                if on_expire is not None:
                    on_expire(key)

    async def _watch_parent(self) -> None:
        """Exit if the supervisor dies without telling us (no orphans)."""
        parent = os.getppid()
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                self.log.error("supervisor (pid %d) is gone; stopping", parent)
                self.request_stop()
                return
