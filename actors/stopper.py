"""The stopper: runs the stop rule on every live stream and cancels the ones that went wrong.

A thin shell around ``espo_async.core.stop_policies``. Per live request it keeps the stream's
stop state (smoothed regret ``z``), the regrets of tokens not decided yet, and the values the
critic sent. Token ``t`` is decided once its regret is known and, for rules that use the
critic, once V(s_t') arrived for ``t' = t - t mod value_interval``; the stopper never guesses a
value it does not have. Each stream uses the stop snapshot in force when its first token
arrived (the learner broadcasts a new one at every batch boundary), so a rollout never sees
statistics of its own batch and its decision can be replayed exactly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch
import zmq

import protocols as P
from espo_async.core import StopSnapshot, make_stop_policy, surrogate_regret
from espo_async.runtime.actor import Actor

NEEDS_VALUES = {"espo", "value_only"}


def snapshot_from_params(params: P.StopParams) -> StopSnapshot:
    return StopSnapshot.from_dict(msgspec.structs.asdict(params))


def params_from_snapshot(snap: StopSnapshot) -> P.StopParams:
    return P.StopParams(**snap.to_dict())


def initial_snapshot(cfg) -> StopSnapshot:
    """The snapshot before the first batch boundary (what the learner starts from)."""
    from espo_async.training.stop_state import make_stop_controller

    return make_stop_controller(cfg).snapshot()


@dataclass
class StreamState:
    sampler_id: str
    policy: object
    stream: object
    needs_values: bool
    interval: int
    regrets: list[float] = field(default_factory=list)  # g_t for t in [0, n)
    values: dict[int, float] = field(default_factory=dict)
    next_t: int = 0  # first undecided token
    n: int = 0  # tokens received
    broken: bool = False
    decided: bool = False
    last_activity: float = field(default_factory=time.monotonic)


class Stopper(Actor):
    ROLE = "stopper"

    async def setup(self) -> None:
        t = self.transport
        self.inbox = t.socket(zmq.PULL, "stopper_stream", bind=True)
        self.cancels = t.socket(zmq.ROUTER, "stopper_cancel", bind=True)
        self.broadcast = t.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        self.snapshot = initial_snapshot(self.cfg)
        self.interval = self.cfg.stop.value_interval
        self.streams: dict[str, StreamState] = {}
        # values that arrive before the stream's first token (the critic can be faster)
        self.early_values: dict[str, dict[int, float]] = {}

    async def main(self) -> None:
        await asyncio.gather(
            self._stream_loop(), self._broadcast_loop(), self.expire_idle_streams(self.streams, self.early_values.pop)
        )

    def heartbeat_counters(self) -> dict[str, float]:
        out = super().heartbeat_counters()
        out["live_streams"] = float(len(self.streams))
        out["beta"] = float(self.snapshot.beta)
        out["stopping_enabled"] = float(self.snapshot.enabled)
        return out

    async def _broadcast_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.broadcast, "learner")
            if isinstance(msg, P.BatchBoundary):
                snap = snapshot_from_params(msg.stop)
                if snap.step >= self.snapshot.step:
                    self.snapshot = snap
            elif isinstance(msg, P.Shutdown):
                self.on_shutdown(msg)

    async def _stream_loop(self) -> None:
        handlers = {P.TokenChunk: self.on_tokens, P.ValueChunk: self.on_values, P.StreamEnd: self.on_end}
        while True:
            msg = await self.transport.recv(self.inbox, "streams")
            if msg is None:
                continue
            handler = handlers.get(type(msg))
            if handler is None:
                self.counters["unexpected_messages"] += 1
                continue
            with self.guard(type(msg).__name__):
                handler(msg)

    # -- handlers (synchronous: the decision path never awaits) --------------------------------

    def on_tokens(self, msg: P.TokenChunk) -> None:
        st = self.streams.get(msg.request_id)
        if st is None:
            if msg.start != 0:
                self.counters["streams_joined_late"] += 1
                return  # we missed its beginning (stopper restarted): never judge it
            policy = make_stop_policy(self.snapshot)
            st = StreamState(
                sampler_id=msg.sampler_id,
                policy=policy,
                stream=policy.new_stream(msg.request_id),
                needs_values=self.snapshot.enabled and self.snapshot.kind in NEEDS_VALUES,
                interval=self.interval,
            )
            st.values.update(self.early_values.pop(msg.request_id, {}))
            self.streams[msg.request_id] = st
            self.counters["streams"] += 1
        if st.broken or st.decided:
            return
        if msg.start != st.n:
            st.broken = True  # a chunk was lost: the stream can no longer be judged exactly
            self.counters["streams_with_gaps"] += 1
            return
        g = surrogate_regret(
            sampled_logprob=torch.from_numpy(np.asarray(msg.logprobs, np.float64)),
            top1_logprob=torch.from_numpy(np.asarray(msg.top1_logprobs, np.float64)),
        ).numpy()
        if not np.all(np.isfinite(g)):
            self.counters["non_finite_logprobs"] += int((~np.isfinite(g)).sum())
            g = np.where(np.isfinite(g), g, 0.0)  # no evidence is no regret
        st.regrets.extend(g.tolist())
        st.n += len(g)
        self.counters["tokens"] += len(g)
        st.last_activity = time.monotonic()
        self._advance(msg.request_id, st)

    def on_values(self, msg: P.ValueChunk) -> None:
        values = np.asarray(msg.values, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            self.counters["non_finite_values"] += int((~finite).sum())
        pairs = {int(p): float(v) for p, v, ok in zip(msg.positions, values, finite) if ok}
        st = self.streams.get(msg.request_id)
        if st is None:
            if len(self.early_values) < 100_000:
                self.early_values.setdefault(msg.request_id, {}).update(pairs)
            return
        st.values.update(pairs)
        st.last_activity = time.monotonic()
        self.counters["values"] += len(pairs)
        self._advance(msg.request_id, st)

    def on_end(self, msg: P.StreamEnd) -> None:
        self.streams.pop(msg.request_id, None)
        self.early_values.pop(msg.request_id, None)

    def _advance(self, request_id: str, st: StreamState) -> None:
        while st.next_t < st.n and not st.decided:
            t = st.next_t
            v = None
            if st.needs_values:
                v = st.values.get(t - t % st.interval)
                if v is None:
                    return  # wait for the critic
            elif st.values:
                v = st.values.get(t - t % st.interval)
            fired = st.policy.push(st.stream, st.regrets[t], v)
            st.next_t += 1
            if fired:
                st.decided = True
                self._cancel(request_id, st, t)

    def _cancel(self, request_id: str, st: StreamState, t: int) -> None:
        stream = st.stream
        z = float(getattr(stream, "z", 0.0))
        snap = st.policy.snapshot
        v = st.values.get(t - t % st.interval)
        threshold = float(snap.beta) * max(v if v is not None else 0.0, float(snap.eps))
        cancel = P.Cancel(
            request_id=request_id,
            sampler_id=st.sampler_id,
            stop_index=t,
            reason=snap.kind,
            z=z,
            threshold=threshold,
            decided_at=time.time(),
        )
        if self.transport.send_to(self.cancels, st.sampler_id, cancel):
            self.counters["cancels_sent"] += 1
        else:
            self.counters["cancels_unroutable"] += 1
        st.regrets.clear()
        st.values.clear()
