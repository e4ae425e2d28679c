"""A sampler backed by vLLM's async engine (CPU build here, CUDA build on GPU machines).

``VLLMGeneration`` adapts ``espo_async.engines.vllm_engine.VLLMEngine`` to the sampler's
``GenerationEngine`` interface; ``VLLMSampler`` is the shared ``Sampler`` shell with this engine.
Per-token policy versions come from vLLM's own weight-version spans (exact even when an update
lands in the middle of a request).

Options (``actors.sampler.options``):

====================  ========  ==================================================================
option                default   meaning
====================  ========  ==================================================================
max_num_seqs          8         concurrent sequences (the sampler's slots)
max_model_len         0         context length; 0 = longest prompt + rollout.max_tokens (from data)
kv_cache_gib          1.0       KV-cache size in GiB (CPU); on CUDA the engine uses
                                gpu_memory_utilization unless this is set
gpu_memory_utilization 0.85     CUDA only
enforce_eager         null      null: eager on CPU, CUDA graphs on GPU
seeded                false     pass a per-request seed (reproducible sampling, slower in vLLM)
stop_on_eos           true      stop at the tokenizer's EOS token
ignore_eos            false     never stop at EOS: every rollout runs to max_tokens (fixed-length
                                benchmarks and tests)
engine_args           {}        extra vLLM engine arguments, passed through unchanged
====================  ========  ==================================================================
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.samplers.base import EngineChunk, Sampler


class VLLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(8, ge=1)
    max_model_len: int = Field(0, ge=0)
    kv_cache_gib: float | None = Field(1.0, gt=0)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool | None = None
    seeded: bool = False
    stop_on_eos: bool = True
    ignore_eos: bool = False
    # On a weight reload, drop the KV cache of the requests in flight and recompute it under the
    # new weights when they resume (exact: every token after the reload is sampled from the new
    # policy given the whole prefix). False keeps their old-weight KV (the prefix was computed by
    # the old policy; cheaper, as PipelineRL's in-flight updates): tokens are still tagged with the
    # version that sampled them and PPO's ratio uses the recorded logprobs either way.
    recompute_kv: bool = True
    # Niceness added to vLLM's engine-core and worker processes (every thread) once started, so
    # that on a shared core the sampler's own process (streaming tokens, acting on cancels) runs
    # as soon as it has work and the engine takes the rest. 0: as started.
    engine_nice: int = Field(0, ge=0, le=19)
    engine_args: dict[str, Any] = Field(default_factory=dict)


def versions_from_spans(spans: list[tuple[str, int, int]] | None, n: int, default: int) -> np.ndarray | None:
    """Per-token versions from vLLM's [(version, start, end)] spans (None if it gave none)."""
    if not spans:
        return None
    out = np.full(n, default, dtype=np.int32)
    for version, start, end in spans:
        try:
            v = int(version)
        except (TypeError, ValueError):
            v = default
        out[max(start, 0) : min(end, n)] = v
    return out


class VLLMGeneration:
    """``GenerationEngine`` over VLLMEngine."""

    def __init__(self, model_dir: str, options: VLLMOptions, *, max_model_len: int, dtype: str, seed: int):
        self.model_dir = model_dir
        self.opts = options
        self.max_concurrency = options.max_num_seqs
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.seed = seed
        self.engine = None
        self.eos: list[int] = []

    async def start(self) -> None:
        import os

        from espo_async.engines.vllm_engine import VLLMEngine

        o = self.opts
        # vLLM's CPU build binds its OpenMP threads to cores; keep them on this actor's cores.
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and hasattr(os, "sched_getaffinity"):
            mine = sorted(os.sched_getaffinity(0))
            if len(mine) < (os.cpu_count() or len(mine)):
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
        self.engine = await VLLMEngine.create(
            self.model_dir,
            max_num_seqs=o.max_num_seqs,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            seed=self.seed,
            kv_cache_gib=o.kv_cache_gib,
            enforce_eager=o.enforce_eager,
            gpu_memory_utilization=o.gpu_memory_utilization,
            **o.engine_args,
        )
        if o.engine_nice:
            from espo_async.runtime.placement import renice

            renice(self.engine.pids(), o.engine_nice)
        tok = self.engine.tokenizer
        if o.stop_on_eos and tok is not None and tok.eos_token_id is not None:
            self.eos = [int(tok.eos_token_id)]

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: np.ndarray,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        context: dict,
    ) -> AsyncIterator[EngineChunk]:
        n = 0
        version = int(context.get("version", 0))
        async for chunk in self.engine.generate(
            request_id,
            prompt_token_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed if self.opts.seeded else None,
            stop_token_ids=None if self.opts.ignore_eos else (self.eos or None),
            ignore_eos=self.opts.ignore_eos,
            # No text while streaming: the trajectory's text is decoded once at its end, and vLLM's
            # per-token detokenizing (incl. the logprob tokens) was ~20% of this process's CPU
            # (py-spy, docs/performance.md). Stops are by token id, in the engine core.
            detokenize=False,
        ):
            n += len(chunk)
            exact = None
            if chunk.finish_reason is not None:
                exact = versions_from_spans(chunk.weight_versions, n, version)
            yield EngineChunk(
                token_ids=chunk.token_ids.astype(np.int32, copy=False),
                logprobs=chunk.logprobs.astype(np.float32, copy=False),
                top1_logprobs=chunk.top1_logprobs.astype(np.float32, copy=False),
                finish_reason=chunk.finish_reason,
                versions=exact,
            )

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def load_weights(self, path: Path, version: int) -> float:
        return await self.engine.update_weights(path, version, recompute_kv=self.opts.recompute_kv)

    # the collective weight transfer (weights.transport: collective, espo_async/weights/collective.py)
    async def join_weight_group(self, spec: dict) -> dict:
        return await self.engine.join_weight_group(spec)

    async def receive_weights(self, spec: dict, version: int, tensors: list) -> float:
        return await self.engine.receive_weights(spec, version, tensors, recompute_kv=self.opts.recompute_kv)

    def decode(self, token_ids: np.ndarray) -> str:
        return self.engine.decode(token_ids)

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()


class VLLMSampler(Sampler):
    OPTIONS = VLLMOptions

    def make_engine(self) -> VLLMGeneration:
        opts = VLLMOptions(**self.options)
        max_len = opts.max_model_len or self.cfg.rollout.max_tokens + self.max_prompt_tokens()
        dtype = self.cfg.model.dtype
        return VLLMGeneration(
            self.assets.policy_dir, opts, max_model_len=max_len, dtype=dtype, seed=self.cfg.run.seed + self.ctx.index
        )

    def max_prompt_tokens(self) -> int:
        """The longest prompt of the task (train and eval), in tokens, plus a margin."""
        from transformers import AutoTokenizer

        from espo_async.tasks.registry import make_task

        tok = AutoTokenizer.from_pretrained(self.assets.policy_dir)
        task = make_task(self.cfg.task.name, **self.cfg.task.options)
        problems = task.train_problems() + task.eval_problems()
        longest = max(len(tok.encode(task.format_prompt(p))) for p in problems) if problems else 0
        return longest + 8
