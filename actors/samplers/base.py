"""The sampler actor: runs one generation engine and owns its requests until they end.

One class serves every engine: ``FakeSampler`` and ``VLLMSampler`` differ only in
``make_engine``. The engine interface is ``GenerationEngine``. The sampler:

* asks the coordinator for work only when it has free slots (credit), so a slot is taken
  back only after the trajectory was handed to the learner (backpressure);
* waits until its weights are at least the version a request was issued at (staleness bound);
* streams every token (id, sampled logprob, top-1 logprob, policy version) to the stopper and
  the critic without ever blocking on them: the tokens of all its streams woken by one engine
  step go out as one ``TokenBatch`` frame (``TokenBuffer``), a stream's ``StreamEnd`` after
  its last tokens;
* on a cancel, aborts the engine request, keeps tokens ``0..stop_index`` and marks the
  trajectory absorbed; a cancel for a request that already ended is counted and ignored;
* loads new weights announced by the learner without restarting the engine.

On a host that does not run the coordinator (``cluster.roles``; docs/cluster.md) nobody tells
the coordinator when this process dies, so the sampler also says it is alive on the work socket
itself: a ``WorkRequest`` for 0 slots every ``transport.heartbeat_interval_s``, and every
request names its ``session`` (one per process, so a restart under the same name is seen; the
process's first request has intent ``hello``). A coordinator that does not know it (it
restarted, or it called this sampler lost after ``transport.heartbeat_timeout_s`` of silence)
sends a ``SlotsQuery`` naming it; the sampler answers with its free slots (intent ``slots``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import zmq

import protocols as P
from espo_async.assets import load_assets
from espo_async.runtime.actor import Actor
from espo_async.utils import stable_seed
from espo_async.weights import loader_for
from protocols.messages import ActorUp
from protocols.trajectory import segment_trajectory


@dataclass
class EngineChunk:
    """New tokens of one request, as the engine delivered them."""

    token_ids: np.ndarray  # int32[n]
    logprobs: np.ndarray  # float32[n]
    top1_logprobs: np.ndarray  # float32[n]
    finish_reason: str | None = None  # set on the last chunk: "stop" | "length" | "abort"
    # Optional, last chunk only: the exact policy version of every token of the response, for
    # engines that know it (vLLM's weight-version spans). Otherwise the sampler records the
    # version it had loaded when each chunk arrived.
    versions: np.ndarray | None = None


@runtime_checkable
class GenerationEngine(Protocol):
    """What a sampler needs from an inference engine (fake or vLLM)."""

    max_concurrency: int

    async def start(self) -> None: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: np.ndarray,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        context: dict,
    ) -> AsyncIterator[EngineChunk]: ...

    async def abort(self, request_id: str) -> None: ...

    async def load_weights(self, path: Path, version: int) -> float: ...

    def decode(self, token_ids: np.ndarray) -> str: ...

    async def shutdown(self) -> None: ...


@dataclass
class LiveRequest:
    work: P.PromptWork
    started_at: float = field(default_factory=time.time)
    token_ids: list[np.ndarray] = field(default_factory=list)
    logprobs: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    versions: list[np.ndarray] = field(default_factory=list)
    n: int = 0
    stop_index: int = -1
    exact_versions: np.ndarray | None = None
    ended: bool = False  # the engine finished this request; later cancels are late
    tokens_at_cancel: int = 0
    cancel_record: dict | None = None  # timing of the cancel (written to logs/<name>.cancels.jsonl)
    emitted: int = 0  # T-PPO windows: response tokens already handed to the learner in segments


ENDING_OF_FINISH_REASON = {"stop": "finished", "length": "truncated"}


class TokenBuffer:
    """New tokens of many requests, gathered until ``take`` makes them one ``TokenBatch``.

    At most one entry per request: a request with tokens here already must be taken first (its
    tokens would otherwise not be contiguous in the batch)."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.request_ids: list[str] = []
        self._known: set[str] = set()
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.prompt_lengths: list[int] = []
        self.arrays: tuple[list[np.ndarray], ...] = ([], [], [], [])  # token_ids, logprobs, top1, versions
        self.prompts: list[np.ndarray] = []

    def __bool__(self) -> bool:
        return bool(self.request_ids)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._known

    def add(self, request_id: str, start: int, token_ids: np.ndarray, logprobs: np.ndarray,
            top1_logprobs: np.ndarray, versions: np.ndarray, prompt: np.ndarray | None = None) -> None:
        """Tokens ``start ..`` of a request (``prompt`` with its first tokens)."""
        if request_id in self._known:
            raise ValueError(f"{request_id!r} already has tokens in this batch: take() them first")
        self._known.add(request_id)
        self.request_ids.append(request_id)
        self.starts.append(start)
        self.lengths.append(len(token_ids))
        ids, lps, top1, vers = self.arrays
        ids.append(token_ids)
        lps.append(logprobs)
        top1.append(top1_logprobs)
        vers.append(versions)
        if prompt is None:
            self.prompt_lengths.append(0)
        else:
            self.prompts.append(prompt)
            self.prompt_lengths.append(len(prompt))

    def take(self, sampler_id: str) -> P.TokenBatch | None:
        """Everything gathered as one batch (None if nothing), and an empty buffer (also when
        the batch cannot be built: ValueError, e.g. an engine chunk with fewer logprobs than ids)."""
        if not self.request_ids:
            return None
        rids, starts, lengths, prompt_lengths = self.request_ids, self.starts, self.lengths, self.prompt_lengths
        (ids, lps, top1, vers), prompts = self.arrays, self.prompts
        self._clear()
        return P.TokenBatch(
            sampler_id=sampler_id,
            request_ids=rids,
            starts=np.array(starts, np.int32),
            lengths=np.array(lengths, np.int32),
            token_ids=np.concatenate(ids).astype(np.int32, copy=False),
            logprobs=np.concatenate(lps).astype(np.float32, copy=False),
            top1_logprobs=np.concatenate(top1).astype(np.float32, copy=False),
            versions=np.concatenate(vers).astype(np.int32, copy=False),
            prompt_lengths=np.array(prompt_lengths, np.int32),
            prompt_token_ids=np.concatenate(prompts).astype(np.int32, copy=False) if prompts else np.zeros(0, np.int32),
        )


class Sampler(Actor):
    ROLE = "sampler"

    def make_engine(self) -> GenerationEngine:
        raise NotImplementedError

    async def setup(self) -> None:
        t = self.transport
        self.assets = load_assets(self.run_dir)
        self.version = 0
        self.learner_epoch: str | None = None  # the learner process whose weights we follow
        self.coordinator_incarnation = 0
        self.version_changed = asyncio.Event()
        self.live: dict[str, LiveRequest] = {}
        self.recently_ended: OrderedDict[str, str] = OrderedDict()
        self.tasks: set[asyncio.Task] = set()
        self.work = t.socket(zmq.DEALER, "work", bind=False, identity=self.name)
        self.cancels = t.socket(zmq.DEALER, "stopper_cancel", bind=False, identity=self.name)
        self.results = t.socket(zmq.PUSH, "results", bind=False)
        self.broadcast = t.socket(zmq.SUB, "broadcast", bind=False, subscribe=True)
        self.streams = []
        if self.cfg.actors.stopper is not None:
            self.streams.append(t.socket(zmq.PUSH, "stopper_stream", bind=False))
        if self.cfg.actors.critic is not None:
            self.streams.append(t.socket(zmq.PUSH, "critic_stream", bind=False))
        # Stream output of one engine step: gathered, then sent as one frame by _flush_streams.
        self.stream_buffer = TokenBuffer()
        self.stream_ends: list[bytes] = []  # StreamEnds of requests whose last tokens are in the buffer
        self.flush_handle: asyncio.Handle | None = None
        self.weights_lock = asyncio.Lock()
        # No supervisor of ours reports to the coordinator: keep it informed on the work socket.
        self.remote = not self.cfg.cluster.runs("coordinator")
        self.session = f"{os.getpid():x}-{time.time_ns():x}"
        self.engine = self.make_engine()
        await self.engine.start()

    async def main(self) -> None:
        await self.started.wait()
        loops = [self._work_loop(), self._cancel_loop(), self._broadcast_loop()]
        await self._request_work(self.capacity, intent="hello")
        if self.remote:
            loops.append(self._alive_loop())
        await asyncio.gather(*loops)

    async def teardown(self) -> None:
        for rid in list(self.live):
            with contextlib.suppress(Exception):
                await self.engine.abort(rid)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.engine.shutdown()

    def heartbeat_counters(self) -> dict[str, float]:
        out = super().heartbeat_counters()
        out["active"] = float(len(self.live))
        out["max_concurrency"] = float(self.engine.max_concurrency)
        out["policy_version"] = float(self.version)
        return out

    # -- loops -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Work items this sampler holds at most: its engine's slots plus ``rollout.prefetch``
        (those wait in the engine's queue and start as soon as a slot frees)."""
        return self.engine.max_concurrency + self.cfg.rollout.prefetch

    def _work_request(self, slots: int, intent: P.WorkIntent = "ordinary") -> P.WorkRequest:
        """A work request of this process (naming its session on a remote host)."""
        return P.WorkRequest(sampler=self.name, free_slots=slots, policy_version=self.version,
                             session=self.session if self.remote else "", intent=intent)

    async def _request_work(self, slots: int, intent: P.WorkIntent = "ordinary") -> None:
        await self.transport.send(self.work, self._work_request(slots, intent))

    async def _alive_loop(self) -> None:
        """Remote host: a 0-slot work request every heartbeat interval (the coordinator's liveness:
        it issues again the work of any peer on the work socket that no supervisor of its host
        watches and that is silent for transport.heartbeat_timeout_s)."""
        while True:
            await asyncio.sleep(self.cfg.transport.heartbeat_interval_s)  # periodic timer
            alive = self._work_request(0)
            self.transport.try_send(self.work, alive, counter="alive_dropped")

    async def _announce_again(self, msg: P.SlotsQuery) -> None:
        """The coordinator does not know our free slots (it restarted, or it gave us up for lost
        and issued our work again): tell it. Requests still live here finish as usual; each frees
        its slot with the usual request for 1."""
        self.counters["coordinator_resyncs"] += 1
        free = max(self.capacity - len(self.live), 0)
        self.log.warning("the coordinator asked for our free slots again (%s): announcing %d", msg.reason[:200], free)
        await self._request_work(free, intent="slots")

    async def _work_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.work, "coordinator")
            if isinstance(msg, P.PromptWork):
                if msg.request_id in self.live:
                    # Issued again while its first attempt still runs here (this host was cut off
                    # and came back): the running attempt answers for it; the slot goes back.
                    self.counters["duplicate_work"] += 1
                    await self._request_work(1)
                    continue
                problem = self._invalid_work(msg)
                if problem is not None:  # never generate it; give the slot back
                    self.counters["work_rejected"] += 1
                    self.log.warning("rejected work %r: %s", msg.request_id[:200], problem)
                    await self._request_work(1)
                    continue
                task = asyncio.create_task(self._serve(msg), name=msg.request_id)
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(msg, P.SlotsQuery) and self.remote and msg.sampler == self.name:
                with self.guard("resync"):
                    await self._announce_again(msg)
            elif msg is not None:
                self.counters["unexpected_messages"] += 1

    async def _cancel_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.cancels, "stopper")
            if isinstance(msg, P.Cancel):
                with self.guard("cancel"):
                    await self.on_cancel(msg)
            elif msg is not None:
                self.counters["unexpected_messages"] += 1

    async def _broadcast_loop(self) -> None:
        while True:
            msg = await self.transport.recv(self.broadcast, "learner")
            if isinstance(msg, P.WeightsAnnounced) and msg.model == "policy":
                with self.guard("weights"):  # e.g. a file that cannot be loaded: keep the old weights
                    await self.on_weights(msg)
            elif isinstance(msg, P.Shutdown):
                self.on_shutdown(msg)

    # -- handlers ----------------------------------------------------------------------------

    def _invalid_work(self, work: P.PromptWork) -> str | None:
        """Why decodable work must not be generated (the coordinator never sends such work)."""
        limit = self.cfg.rollout.max_tokens if work.purpose == "train" else 1 << 20
        if not 0 < work.max_tokens <= limit:
            return f"max_tokens {work.max_tokens} not in [1, {limit}] (rollout.max_tokens for training work)"
        if len(work.prompt_token_ids) > self.cfg.rollout.max_prompt_tokens:
            return f"{len(work.prompt_token_ids)} prompt tokens > rollout.max_prompt_tokens {self.cfg.rollout.max_prompt_tokens}"
        if not (0.0 <= work.temperature < float("inf") and 0.0 < work.top_p <= 1.0):
            return f"temperature {work.temperature!r} / top_p {work.top_p!r} out of range"
        return None

    async def on_weights(self, msg: P.WeightsAnnounced) -> None:
        async with self.weights_lock:
            if self.learner_epoch is None:
                self.learner_epoch = msg.epoch
            if msg.version <= self.version and msg.epoch == self.learner_epoch:
                return  # already have it (announcements repeat for late joiners)
            # (a restarted learner, new epoch, may go back to its checkpoint's version: follow it)
            received = time.time()
            seconds = await loader_for(msg.uri, self.engine).load(msg)
            self.version = msg.version
            self.learner_epoch = msg.epoch
            with (self.run_dir / "logs" / f"{self.name}.weights.jsonl").open("a") as f:
                f.write(json.dumps({"version": msg.version, "received_at": received, "loaded_at": time.time(),
                                    "load_s": seconds}) + "\n")
            self.counters["weight_updates"] += 1
            self.counters["weight_update_s"] = seconds
            self.version_changed.set()
            self.version_changed = asyncio.Event()
            self.log.info("policy version %d loaded in %.3fs", msg.version, seconds)

    async def on_control(self, msg: P.Message) -> None:
        """A restarted coordinator knows none of our free slots: announce them again."""
        if isinstance(msg, ActorUp) and msg.role == "coordinator" and msg.incarnation > self.coordinator_incarnation:
            self.coordinator_incarnation = msg.incarnation
            if self.started.is_set():
                await self._request_work(max(self.capacity - len(self.live), 0))

    async def on_cancel(self, msg: P.Cancel) -> None:
        req = self.live.get(msg.request_id)
        if req is None or req.ended:
            kind = "cancel_after_end" if msg.request_id in self.recently_ended else "cancel_unknown"
            self.counters[kind] += 1
            self.log.info("%s for %s ignored", kind, msg.request_id)
            return
        if req.stop_index >= 0:
            self.counters["cancel_duplicate"] += 1
            return
        if msg.stop_index >= req.n:
            self.counters["cancel_out_of_range"] += 1
            self.log.warning("cancel of %s at %d but only %d tokens exist", msg.request_id, msg.stop_index, req.n)
            return
        received = time.time()
        # T-PPO windows: tokens already handed over in segments are committed; a stop decided
        # inside them moves to the first token not handed over (or the last one generated).
        req.stop_index = max(msg.stop_index, min(req.emitted, req.n - 1))
        if req.stop_index != msg.stop_index:
            self.counters["cancel_moved_past_segment"] += 1
        req.tokens_at_cancel = req.n
        self.counters["cancels"] += 1
        await self.engine.abort(msg.request_id)
        req.cancel_record = {
            "request_id": msg.request_id,
            "stop_index": msg.stop_index,
            "decided_at": msg.decided_at,
            "received_at": received,
            "aborted_at": time.time(),
            "tokens_at_receipt": req.n,
        }

    async def _wait_for_version(self, version: int) -> None:
        while self.version < version:
            await self.version_changed.wait()

    async def _serve(self, work: P.PromptWork) -> None:
        req = LiveRequest(work)
        self.live[work.request_id] = req
        finish_reason = "abort"
        try:
            await self._wait_for_version(work.issued_at_version)
            first = True
            async for chunk in self.engine.generate(
                work.request_id,
                work.prompt_token_ids,
                max_tokens=work.max_tokens,
                temperature=work.temperature,
                top_p=work.top_p,
                seed=stable_seed(self.cfg.run.seed, work.request_id, work.attempt),
                context={"prompt_id": work.prompt_id, "sample_index": work.sample_index, "version": self.version},
            ):
                n = len(chunk.token_ids)
                if n:
                    versions = np.full(n, self.version, dtype=np.int32)
                    self._stream(req, chunk, versions, first)
                    first = False
                    req.token_ids.append(chunk.token_ids)
                    req.logprobs.append(chunk.logprobs)
                    req.top1.append(chunk.top1_logprobs)
                    req.versions.append(versions)
                    req.n += n
                    self.counters["tokens_generated"] += n
                    if self.cfg.rollout.window_tokens > 0 and chunk.finish_reason is None:
                        await self._emit_segments(req)
                if chunk.finish_reason is not None:
                    finish_reason = chunk.finish_reason
                    if chunk.versions is not None and len(chunk.versions) == req.n:
                        req.exact_versions = np.asarray(chunk.versions, dtype=np.int32)
            req.ended = True
            await self._finish(req, finish_reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The engine failed this request: hand the work back so the coordinator re-issues it.
            self.counters["request_errors"] += 1
            self.log.exception("request %s failed", work.request_id)
            await self.transport.send(
                self.work,
                P.WorkDone(sampler_id=self.name, request_id=work.request_id, ending=None, n_tokens=req.n, error=repr(exc)),
            )
            await self._request_work(1)
        finally:
            self.live.pop(work.request_id, None)
            self.recently_ended[work.request_id] = finish_reason
            while len(self.recently_ended) > 10_000:
                self.recently_ended.popitem(last=False)

    async def _emit_segments(self, req: LiveRequest) -> None:
        """T-PPO windows (espo_async/training/tppo.py): every W new tokens of a training rollout
        go to the learner as an ``incomplete`` segment while the rollout keeps generating; none
        once a stop was decided (the final trajectory then carries the rest)."""
        w = self.cfg.rollout.window_tokens
        while req.work.purpose == "train" and req.stop_index < 0 and req.n - req.emitted >= w:
            start = req.emitted
            req.emitted = start + w  # before sending: a cancel meanwhile must see it committed
            for parts in (req.token_ids, req.logprobs, req.top1, req.versions):
                if len(parts) > 1:
                    parts[:] = [np.concatenate(parts)]
            seg = segment_trajectory(req.work, req.token_ids[0], req.logprobs[0], req.top1[0], req.versions[0],
                                     start, start + w, sampler_id=self.name, started_at=req.started_at,
                                     ended_at=time.time())
            await self.transport.send(self.results, seg)  # blocks while the learner is behind
            self.counters["segments"] += 1

    def _wants_shadow(self, req: LiveRequest) -> bool:
        """A deterministic fraction of stopped training rollouts get a shadow continuation."""
        fraction = self.cfg.stop.shadow_fraction
        if fraction <= 0 or req.work.purpose != "train":
            return False
        return stable_seed("shadow", req.work.request_id) % 10_000 < fraction * 10_000

    async def _shadow(self, stopped: P.Trajectory) -> None:
        """Continue a stopped rollout from its stop point, as if the stop rule had not fired,
        with the policy it was generated by (never trained on; measures false-positive stops).
        The result goes to the learner as a ``shadow`` trajectory holding kept + new tokens."""
        budget = int(self.cfg.rollout.max_tokens) - len(stopped.token_ids)
        if budget <= 0:
            return
        rid = f"{stopped.request_id}~shadow"
        prompt = np.concatenate([stopped.prompt_token_ids, stopped.token_ids]).astype(np.int32)
        ids, lps, top1 = [stopped.token_ids], [stopped.logprobs], [stopped.top1_logprobs]
        finish = "abort"
        try:
            async for chunk in self.engine.generate(
                rid,
                prompt,
                max_tokens=budget,
                temperature=self.cfg.rollout.temperature,
                top_p=self.cfg.rollout.top_p,
                seed=stable_seed(self.cfg.run.seed, rid),
                context={"prompt_id": stopped.prompt_id, "sample_index": stopped.sample_index,
                         "version": self.version, "shadow": True},
            ):
                ids.append(chunk.token_ids)
                lps.append(chunk.logprobs)
                top1.append(chunk.top1_logprobs)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
        except Exception:
            self.counters["shadow_errors"] += 1
            self.log.exception("shadow continuation of %s failed", stopped.request_id)
            return
        if finish == "abort":
            return
        tokens = np.concatenate(ids).astype(np.int32)
        self.counters["shadow_tokens"] += len(tokens) - len(stopped.token_ids)
        shadow = P.Trajectory(
            request_id=rid,
            prompt_id=stopped.prompt_id,
            sample_index=stopped.sample_index,
            group_size=stopped.group_size,
            sampler_id=self.name,
            prompt_token_ids=stopped.prompt_token_ids,
            token_ids=tokens,
            logprobs=np.concatenate(lps).astype(np.float32),
            top1_logprobs=np.concatenate(top1).astype(np.float32),
            versions=np.full(len(tokens), stopped.versions[-1] if len(stopped.versions) else self.version, np.int32),
            ending=ENDING_OF_FINISH_REASON.get(finish, "truncated"),
            finish_reason=finish,
            tokens_generated=len(tokens),
            issued_at_version=stopped.issued_at_version,
            attempt=stopped.attempt,
            tag=stopped.tag,  # the stopped rollout's work tag (the learner checks it against that work)
            started_at=stopped.started_at,
            ended_at=time.time(),
            text=self.engine.decode(tokens),
            purpose="shadow",
        )
        await self.transport.send(self.results, shadow)

    def _log_cancel(self, record: dict) -> None:
        """One line per honoured cancel: decision, receipt and abort times and token counts."""
        with (self.run_dir / "logs" / f"{self.name}.cancels.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _stream(self, req: LiveRequest, chunk: EngineChunk, versions: np.ndarray, first: bool) -> None:
        """Queue a chunk's tokens for the stopper and the critic. The engine wakes every request
        with new tokens in one event-loop pass; the flush, scheduled with ``call_soon``, runs
        after all of them, so one engine step leaves as one frame per destination."""
        if not self.streams or req.work.purpose != "train":
            return  # evaluation and shadow rollouts are never judged by the stopper
        shapes = {a.shape for a in (chunk.token_ids, chunk.logprobs, chunk.top1_logprobs, versions)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:  # fails this request, not the step's batch
            raise ValueError(f"engine chunk of {req.work.request_id!r}: token ids, logprobs, top-1 logprobs "
                             f"and versions must be 1-D of one length, got shapes {shapes}")
        if req.work.request_id in self.stream_buffer:
            self._flush_streams()  # a second chunk in one loop pass (not vLLM's way): its own frame
        self.stream_buffer.add(req.work.request_id, req.n, chunk.token_ids, chunk.logprobs, chunk.top1_logprobs,
                               versions, req.work.prompt_token_ids if first else None)
        if self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_soon(self._flush_streams)

    def _flush_streams(self) -> None:
        """Send the gathered tokens as one TokenBatch, then the StreamEnds that wait for them."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()  # (a no-op when this is the scheduled call running)
            self.flush_handle = None
        frames: list[bytes] = []
        with self.guard("stream flush"):  # a batch that cannot be built is lost, never the next ones
            batch = self.stream_buffer.take(self.name)
            if batch is not None:
                frames.append(P.encode(batch))
                self.counters["stream_batches"] += 1
        frames += self.stream_ends
        self.stream_ends = []
        for frame in frames:
            for sock in self.streams:
                self.transport.try_send(sock, frame, counter="stream_dropped")

    def _trajectory(self, req: LiveRequest, finish_reason: str) -> P.Trajectory:
        def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        ids = cat(req.token_ids, np.int32)
        lps = cat(req.logprobs, np.float32)
        top1 = cat(req.top1, np.float32)
        vers = req.exact_versions if req.exact_versions is not None else cat(req.versions, np.int32)
        stop_index = -1
        if req.stop_index >= 0:
            ending = "absorbed"
            stop_index = req.stop_index
            keep = stop_index + 1
            ids, lps, top1, vers = ids[:keep], lps[:keep], top1[:keep], vers[:keep]
            self.counters["tokens_after_stop"] += req.n - keep
        else:
            ending = ENDING_OF_FINISH_REASON.get(finish_reason, "truncated")
        return P.Trajectory.answering(
            req.work,
            sampler_id=self.name,
            prompt_token_ids=req.work.prompt_token_ids,
            token_ids=ids,
            logprobs=lps,
            top1_logprobs=top1,
            versions=vers,
            ending=ending,
            finish_reason=finish_reason,
            stop_index=stop_index,
            tokens_generated=req.n,
            started_at=req.started_at,
            ended_at=time.time(),
            text=self.engine.decode(ids),
        )

    async def _finish(self, req: LiveRequest, finish_reason: str) -> None:
        if finish_reason == "abort" and req.stop_index < 0:
            # Aborted for a reason other than the stop rule (shutdown): nothing to hand over.
            self.counters["aborted_without_stop"] += 1
            return
        traj = self._trajectory(req, finish_reason)
        if req.stop_index >= 0:
            self.counters["absorbed"] += 1
            if req.cancel_record is not None:
                self._log_cancel({**req.cancel_record, "tokens_generated": req.n})
            if self._wants_shadow(req):
                task = asyncio.create_task(self._shadow(traj), name=f"shadow:{traj.request_id}")
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        if req.work.purpose == "train":
            end = P.encode(
                P.StreamEnd(request_id=traj.request_id, sampler_id=self.name, ending=traj.ending, n_tokens=req.n)
            )
            if traj.request_id in self.stream_buffer:
                # Its last tokens wait for this engine step's frame: the end goes right after it
                # (never before them, and the step's other streams still share one frame).
                self.stream_ends.append(end)
            else:
                for sock in self.streams:
                    self.transport.try_send(sock, end, counter="stream_dropped")
        await self.transport.send(self.results, traj)  # blocks while the learner is behind
        self.counters[f"ending.{traj.ending}"] += 1
        self.counters["trajectories"] += 1
        await self.transport.send(
            self.work,
            P.WorkDone(sampler_id=self.name, request_id=traj.request_id, ending=traj.ending, n_tokens=req.n),
        )
        await self._request_work(1)
