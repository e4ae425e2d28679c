"""The critic actor: streams V(s_t) for the prefixes the samplers are generating.

One class serves every value model; ``FakeCritic`` and ``HFCritic`` differ only in
``make_value_model``. The critic receives the same token batches (or chunks) as the stopper.
V(s_t) is the value of the prompt plus response tokens ``0..t-1``, so V(s_0) is computable as
soon as a stream starts and V(s_{t+1}) as soon as token ``t`` arrives: values run at most one
model call behind generation. Every pass batches all streams that have new tokens; the model runs in a
worker thread so the event loop keeps receiving tokens meanwhile. Only positions that are a
multiple of ``stop.value_interval`` are sent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import zmq

import protocols as P
from espo_async.assets import load_assets
from espo_async.runtime.actor import Actor
from espo_async.weights import loader_for


@dataclass
class ValueRequest:
    """New work for one stream: compute V(s_t) for t in [first, first + len(new_tokens) + ...)."""

    request_id: str
    prompt_token_ids: np.ndarray | None  # set on the stream's first call only
    new_token_ids: np.ndarray  # tokens appended since the previous call
    first_position: int  # response position of the first value this call returns


@runtime_checkable
class ValueModel(Protocol):
    """Incremental values: a call returns one value per new state. On a stream's first call
    (prompt given) the states are s_0 .. s_n (n = len(new_token_ids)); on later calls they are
    the states after each new token."""

    def values(self, batch: list[ValueRequest]) -> list[np.ndarray]: ...

    def end(self, request_id: str) -> None: ...

    def load_weights(self, path: Path, version: int) -> None: ...


@dataclass
class CriticStream:
    prompt: np.ndarray | None
    pending: list[np.ndarray] = field(default_factory=list)
    n_tokens: int = 0  # tokens received
    n_values: int = 0  # states valued so far (s_0 .. s_{n_values-1})
    started: bool = False
    broken: bool = False
    last_activity: float = field(default_factory=time.monotonic)


class Critic(Actor):
    ROLE = "critic"

    def make_value_model(self) -> ValueModel:
        raise NotImplementedError

    async def setup(self) -> None:
        t = self.transport
        self.assets = load_assets(self.run_dir)
        self.inbox = t.socket(zmq.PULL, "critic_stream", bind=True)
        self.out = t.socket(zmq.PUSH, "stopper_stream", bind=False) if self.cfg.actors.stopper else None
        self.broadcast = t.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        self.interval = self.cfg.stop.value_interval
        self.version = -1  # no learner weights yet: the v0 announcement must load too
        self.learner_epoch: str | None = None  # a restarted learner (new epoch) may go back in version
        self.streams: dict[str, CriticStream] = {}
        self.ended: list[str] = []
        self.work = asyncio.Event()
        self.model = self.make_value_model()
        self.model_lock = asyncio.Lock()

    async def main(self) -> None:
        await asyncio.gather(
            self._recv_loop(), self._broadcast_loop(), self._compute_loop(),
            self.expire_idle_streams(self.streams, self.ended.append),
        )

    def heartbeat_counters(self) -> dict[str, float]:
        out = super().heartbeat_counters()
        out["live_streams"] = float(len(self.streams))
        out["critic_version"] = float(max(self.version, 0))
        return out

    async def _recv_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.inbox, "samplers")
            if isinstance(msg, P.TokenBatch):
                self.on_token_batch(msg)
            elif isinstance(msg, P.TokenChunk):
                with self.guard("tokens"):
                    self.on_tokens(msg)
            elif isinstance(msg, P.StreamEnd):
                if self.streams.pop(msg.request_id, None) is not None:
                    self.ended.append(msg.request_id)  # released by the compute loop, not here:
                    self.work.set()  # the model may be busy in its worker thread
                else:
                    self.counters["end_unknown"] += 1
            elif msg is not None:
                self.counters["unexpected_messages"] += 1

    def on_tokens(self, msg: P.TokenChunk) -> None:
        self.on_stream_tokens(msg.request_id, msg.start, msg.token_ids, msg.prompt_token_ids)

    def on_token_batch(self, msg: P.TokenBatch) -> None:
        """Each request of the batch exactly as its own chunk. The vocabulary is checked once for
        the whole batch (per request only if that finds a bad id); the compute loop then values
        every stream of the batch in one model call, as it does for chunks of one engine step."""
        ids, prompts = msg.token_ids, msg.prompt_token_ids
        checked = self._all_in_vocabulary(ids) and self._all_in_vocabulary(prompts)
        for e in msg.entries():
            with self.guard("tokens"):  # one stream's failure leaves the others valued
                prompt = prompts[e.prompt_lo : e.prompt_hi] if e.prompt_hi > e.prompt_lo else None
                self.on_stream_tokens(e.request_id, e.start, ids[e.lo : e.hi], prompt, checked=checked)

    def on_stream_tokens(self, request_id: str, start: int, token_ids: np.ndarray, prompt: np.ndarray | None,
                         *, checked: bool = False) -> None:
        """Tokens ``start ..`` of one stream (``prompt`` with its first ones): the per-request core
        of ``TokenChunk`` and ``TokenBatch``. ``checked``: every id is known to be in the vocabulary."""
        st = self.streams.get(request_id)
        if st is None:
            if start != 0 or prompt is None:
                self.counters["streams_joined_late"] += 1
                return
            st = self.streams[request_id] = CriticStream(prompt=np.asarray(prompt))
            if not checked and not self._in_vocabulary(st.prompt, request_id):
                st.broken = True
        if st.broken:
            return
        if start != st.n_tokens:
            st.broken = True
            self.counters["streams_with_gaps"] += 1
            return
        if st.n_tokens + len(token_ids) > self.cfg.rollout.max_tokens:
            st.broken, st.pending = True, []  # longer than any response: bounded memory, no values
            self.counters["streams_too_long"] += 1
            return
        if not checked and not self._in_vocabulary(token_ids, request_id):
            st.broken, st.pending = True, []
            return
        st.pending.append(np.asarray(token_ids))
        st.n_tokens += len(token_ids)
        st.last_activity = time.monotonic()
        self.work.set()

    def _all_in_vocabulary(self, ids: np.ndarray) -> bool:
        vocab = getattr(self.model, "vocab_size", None)
        return vocab is None or not len(ids) or (int(ids.min()) >= 0 and int(ids.max()) < vocab)

    def _in_vocabulary(self, ids: np.ndarray, request_id: str) -> bool:
        """Token ids the value model cannot embed break only their own stream (checked here, not
        in the model's batch, where one bad stream would cost every stream of the batch)."""
        if self._all_in_vocabulary(ids):
            return True
        self.counters["tokens_out_of_vocab"] += 1
        self.log.warning("stream %r has token ids outside the critic's vocabulary [0, %d): no values for it",
                         request_id[:200], self.model.vocab_size)
        return False

    async def _broadcast_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.broadcast, "learner")
            if isinstance(msg, P.WeightsAnnounced) and msg.model == "critic" and (
                msg.version > self.version or self.learner_epoch not in (None, msg.epoch)
            ):
                async with self.model_lock:
                    t0 = time.perf_counter()
                    try:
                        await loader_for(msg.uri, self.model).load(msg)
                    except Exception:  # keep the weights we have; the announcement is repeated
                        self.counters["weight_load_errors"] += 1
                        self.log.exception("could not load critic weights v%d from %r", msg.version, msg.uri[:300])
                        continue
                    self.version = msg.version
                    self.learner_epoch = msg.epoch
                    self.work.set()  # streams held back until the learner's weights arrived
                    self.counters["weight_updates"] += 1
                    self.counters["weight_update_s"] = time.perf_counter() - t0
            elif isinstance(msg, P.Shutdown):
                self.on_shutdown(msg)

    async def _compute_loop(self) -> None:
        while True:
            await self.work.wait()
            self.work.clear()
            if self.version < 0 and self.rejoining:
                continue  # restarted: the initial head is not the learner's; wait for its weights
            async with self.model_lock:
                for rid in self.ended:
                    self.model.end(rid)
                self.ended.clear()
            batch: list[ValueRequest] = []
            for rid, st in self.streams.items():
                if st.broken or (st.started and not st.pending):
                    continue
                new = np.concatenate(st.pending) if st.pending else np.zeros(0, np.int32)
                st.pending.clear()
                batch.append(
                    ValueRequest(
                        request_id=rid,
                        prompt_token_ids=None if st.started else st.prompt,
                        new_token_ids=new,
                        first_position=st.n_values,
                    )
                )
                st.started = True
                st.n_values += len(new) + (1 if batch[-1].prompt_token_ids is not None else 0)
            if not batch:
                continue
            async with self.model_lock:
                t0 = time.perf_counter()
                try:
                    results = await asyncio.to_thread(self.model.values, batch)
                except Exception:
                    # A model error must not end the critic: these streams get no more values
                    # (so the stopper never stops them); every other stream goes on.
                    self.counters["value_errors"] += 1
                    self.log.exception("value model failed on %d streams; they get no values", len(batch))
                    for req in batch:
                        if req.request_id in self.streams:
                            self.streams[req.request_id].broken = True
                    continue
                self.counters["value_batches"] += 1
                self.counters["value_batch_s"] += time.perf_counter() - t0
            for req, vals in zip(batch, results):
                self._send(req, np.asarray(vals, dtype=np.float32))

    def _send(self, req: ValueRequest, vals: np.ndarray) -> None:
        positions = np.arange(req.first_position, req.first_position + len(vals), dtype=np.int32)
        keep = positions % self.interval == 0
        self.counters["values"] += int(len(vals))
        if self.out is None or not keep.any():
            return
        msg = P.ValueChunk(
            request_id=req.request_id, positions=positions[keep], values=vals[keep], critic_version=max(self.version, 0)
        )
        self.transport.try_send(self.out, msg, counter="values_dropped")
