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
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

import protocols as P
from espo_async.constants import VALUE_STOP_KINDS
from espo_async.core import StopSnapshot, make_stop_policy, stop_threshold, surrogate_regret
from espo_async.runtime.actor import Actor
from espo_async.stop_state import make_stop_controller, snapshot_from_params

#: Streams whose values arrived before their first token, remembered at most (oldest forgotten).
MAX_EARLY_STREAMS = 10_000
#: Decided tokens after which a stream's decided regrets and values are dropped (amortised).
TRIM_EVERY = 32


def _finite_params(p: P.StopParams) -> bool:
    return all(np.isfinite([p.mu, p.var, p.c, p.delta, p.alpha_s, p.beta, p.eps, p.hazard, p.value_ref]))


def initial_snapshot(cfg) -> StopSnapshot:
    """The snapshot before the first batch boundary (what the learner starts from)."""
    return make_stop_controller(cfg).snapshot()


@dataclass
class StreamState:
    sampler_id: str
    policy: object
    stream: object
    needs_values: bool
    interval: int
    regrets: list[float] = field(default_factory=list)  # g_t for t in [base, n): undecided tokens only
    values: dict[int, float] = field(default_factory=dict)  # V(s_t) for t >= the last decided value slot
    next_t: int = 0  # first undecided token
    base: int = 0  # token index of regrets[0] (decided regrets are dropped: memory ~ lag, not length)
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
        # A restarted stopper (or a resumed run) judges nothing before the learner's snapshot.
        self.have_snapshot = not self.rejoining
        self.learner_epoch: str | None = None
        self.interval = self.cfg.stop.value_interval
        self.streams: dict[str, StreamState] = {}
        # values that arrive before the stream's first token (the critic can be faster); bounded
        self.early_values: OrderedDict[str, dict[int, float]] = OrderedDict()
        # Memory per stream is bounded: a response has at most rollout.max_tokens tokens and
        # states s_0 .. s_max_tokens; anything beyond is a broken or hostile peer.
        self.max_tokens = self.cfg.rollout.max_tokens

    async def main(self) -> None:
        await asyncio.gather(
            self._stream_loop(),
            self._broadcast_loop(),
            self.expire_idle_streams(self.streams, lambda rid: self.early_values.pop(rid, None)),
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
                if not _finite_params(msg.stop):
                    self.counters["bad_snapshots"] += 1
                    self.log.warning("ignored a stop snapshot with non-finite parameters: %s", msg.stop)
                    continue
                snap = snapshot_from_params(msg.stop)
                # A restarted learner (new epoch) goes back to its checkpoint's step: follow it.
                if snap.step >= self.snapshot.step or msg.epoch != self.learner_epoch:
                    self.snapshot = snap
                    self.learner_epoch = msg.epoch
                    self.have_snapshot = True
            elif isinstance(msg, P.Shutdown):
                self.on_shutdown(msg)

    async def _stream_loop(self) -> None:
        handlers = {P.TokenBatch: self.on_token_batch, P.TokenChunk: self.on_tokens, P.ValueChunk: self.on_values,
                    P.StreamEnd: self.on_end}
        while True:
            msg = await self.transport.recv(self.inbox, "streams")
            if msg is None:
                continue
            self.counters["stream_messages"] += 1
            handler = handlers.get(type(msg))
            if handler is None:
                self.counters["unexpected_messages"] += 1
                continue
            with self.guard(type(msg).__name__):
                handler(msg)

    # -- handlers (synchronous: the decision path never awaits) --------------------------------

    def on_tokens(self, msg: P.TokenChunk) -> None:
        self.on_stream_tokens(msg.request_id, msg.sampler_id, msg.start, self._regrets(msg.logprobs, msg.top1_logprobs))

    def on_token_batch(self, msg: P.TokenBatch) -> None:
        """Each request of the batch exactly as its own chunk (regrets computed once for all)."""
        g = self._regrets(msg.logprobs, msg.top1_logprobs)
        for e in msg.entries():
            with self.guard("TokenBatch entry"):  # one stream's failure leaves the others judged
                self.on_stream_tokens(e.request_id, msg.sampler_id, e.start, g[e.lo : e.hi])

    @staticmethod
    def _regrets(logprobs: np.ndarray, top1_logprobs: np.ndarray) -> np.ndarray:
        """Surrogate regrets g_t of tokens (non-finite where the logprobs are)."""
        return surrogate_regret(
            sampled_logprob=torch.from_numpy(np.asarray(logprobs, np.float64)),
            top1_logprob=torch.from_numpy(np.asarray(top1_logprobs, np.float64)),
        ).numpy()

    def on_stream_tokens(self, request_id: str, sampler_id: str, start: int, g: np.ndarray) -> None:
        """Tokens ``start ..`` of one stream, as their regrets ``g``: the per-request core of
        ``TokenChunk`` and ``TokenBatch``."""
        st = self.streams.get(request_id)
        if st is None:
            if start != 0:
                self.counters["streams_joined_late"] += 1
                return  # we missed its beginning (stopper restarted): never judge it
            if not self.have_snapshot:
                self.counters["streams_before_snapshot"] += 1
                return  # restarted, no stop state from the learner yet: never judge it
            policy = make_stop_policy(self.snapshot)
            st = StreamState(
                sampler_id=sampler_id,
                policy=policy,
                stream=policy.new_stream(request_id),
                needs_values=self.snapshot.enabled and self.snapshot.kind in VALUE_STOP_KINDS,
                interval=self.interval,
            )
            st.values.update(self.early_values.pop(request_id, {}))
            self.streams[request_id] = st
            self.counters["streams"] += 1
        if st.broken or st.decided:
            return
        if start != st.n:
            st.broken = True  # a chunk was lost: the stream can no longer be judged exactly
            self.counters["streams_with_gaps"] += 1
            return
        if st.n + len(g) > self.max_tokens:
            st.broken = True  # longer than any response can be: never judged, memory stays bounded
            st.regrets.clear()
            st.values.clear()
            self.counters["streams_too_long"] += 1
            self.log.warning("stream %r passed rollout.max_tokens=%d tokens; no longer judged",
                             request_id[:200], self.max_tokens)
            return
        if not np.all(np.isfinite(g)):
            self.counters["non_finite_logprobs"] += int((~np.isfinite(g)).sum())
            g = np.where(np.isfinite(g), g, 0.0)  # no evidence is no regret
        st.regrets.extend(g.tolist())
        st.n += len(g)
        self.counters["tokens"] += len(g)
        st.last_activity = time.monotonic()
        self._advance(request_id, st)

    def on_values(self, msg: P.ValueChunk) -> None:
        values = np.asarray(msg.values, dtype=np.float64)
        positions = np.asarray(msg.positions, dtype=np.int64)
        finite = np.isfinite(values)
        if not finite.all():  # no value is better than a wrong one: that state is never judged
            self.counters["non_finite_values"] += int((~finite).sum())
        in_range = (positions >= 0) & (positions <= self.max_tokens)
        if not in_range.all():
            self.counters["values_out_of_range"] += int((~in_range).sum())
        keep = finite & in_range
        pairs = dict(zip(positions[keep].tolist(), values[keep].tolist()))
        st = self.streams.get(msg.request_id)
        if st is None:
            self.counters["values_before_stream"] += 1
            early = self.early_values.get(msg.request_id)
            if early is None:
                early = self.early_values[msg.request_id] = {}
                while len(self.early_values) > MAX_EARLY_STREAMS:
                    self.early_values.popitem(last=False)
                    self.counters["early_values_forgotten"] += 1
            early.update(pairs)
            return
        st.values.update(pairs)
        st.last_activity = time.monotonic()
        self.counters["values"] += len(pairs)
        self._advance(msg.request_id, st)

    def on_end(self, msg: P.StreamEnd) -> None:
        st = self.streams.pop(msg.request_id, None)
        early = self.early_values.pop(msg.request_id, None)
        if st is None and early is None:
            self.counters["end_unknown"] += 1  # never started here, already expired, or repeated

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
            fired = st.policy.push(st.stream, st.regrets[t - st.base], v)
            st.next_t += 1
            if fired:
                st.decided = True
                self._cancel(request_id, st, t)
                return
        if st.next_t - st.base >= TRIM_EVERY:
            self._trim(st)

    @staticmethod
    def _trim(st: StreamState) -> None:
        """Forget what no later decision reads: regrets of decided tokens and values of states
        before the value slot of the first undecided token."""
        del st.regrets[: st.next_t - st.base]
        st.base = st.next_t
        floor = st.next_t - st.next_t % st.interval
        for k in [k for k in st.values if k < floor]:
            del st.values[k]

    def _cancel(self, request_id: str, st: StreamState, t: int) -> None:
        stream = st.stream
        z = float(getattr(stream, "z", 0.0))
        snap = st.policy.snapshot
        v = st.values.get(t - t % st.interval)
        threshold = stop_threshold(v if v is not None else -math.inf, float(snap.beta), float(snap.eps))
        threshold = math.nan if threshold is None else threshold  # a NaN value
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
