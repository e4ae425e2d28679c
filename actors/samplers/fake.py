"""A fake generation engine for fast tests of the whole actor system.

It produces text that the task's verifier really scores: a *good* rollout is the task's gold
solution followed by EOS (reward 1); a *bad* rollout follows the gold solution up to a failure
point, then emits wrong tokens with high surrogate regret until EOS or ``max_tokens`` (reward 0).
The regret pattern (sampled-token logprob vs top-1 logprob) is small before the failure and
large after it, which is the signal ESPO detects. Everything is deterministic per request seed.

Options (``actors.sampler.options`` in the config):

=====================  =========  =============================================================
option                 default    meaning
=====================  =========  =============================================================
max_concurrency        4          requests generated at once (engine slots)
tokens_per_s           0          per-request generation speed; 0 = as fast as possible
chunk_tokens           1          tokens per streamed chunk
p_bad                  0.5        probability that a rollout goes wrong
fail_at                [0.1,0.5]  failure point, as a fraction of the gold solution's length
p_ramble_eos           0.0        per-token probability that a bad rollout ends with EOS
good_regret            0.05       mean regret (exponential) of tokens of a good trajectory
bad_regret             3.0        mean regret of tokens after the failure point
top1_logprob           -0.05      log-probability of the mode token
load_weights_s         0.0        simulated weight-loading time
crash_after_tokens     0          exit the process after this many tokens in total (0: never)
hang_after_tokens      0          stop producing tokens (and heartbeats) after this many
slow_prompts           ""         a prompt id prefix (e.g. "g1/"): rollouts of those prompts are
                                  generated at slow_tokens_per_s instead (groups finish out of order)
slow_tokens_per_s      1.0        their speed
never_finish           ""         a prompt id prefix (e.g. "g3/"): rollouts of those prompts stall
                                  forever after their first token (the process stays healthy)
=====================  =========  =============================================================
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from espo_async.tasks.reward import TaskReward
from actors.samplers.base import EngineChunk, Sampler
from espo_async.tasks.registry import make_task


class FakeEngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrency: int = Field(4, ge=1)
    tokens_per_s: float = Field(0.0, ge=0)
    chunk_tokens: int = Field(1, ge=1)
    p_bad: float = Field(0.5, ge=0, le=1)
    fail_at: tuple[float, float] = (0.1, 0.5)
    p_ramble_eos: float = Field(0.0, ge=0, le=1)
    good_regret: float = Field(0.05, ge=0)
    bad_regret: float = Field(3.0, ge=0)
    top1_logprob: float = Field(-0.05, le=0)
    load_weights_s: float = Field(0.0, ge=0)
    crash_after_tokens: int = Field(0, ge=0)
    hang_after_tokens: int = Field(0, ge=0)
    slow_prompts: str = ""
    slow_tokens_per_s: float = Field(1.0, gt=0)
    never_finish: str = ""


class FakeEngine:
    """Implements ``GenerationEngine`` without a model."""

    def __init__(self, options: FakeEngineOptions, tokenizer, task, eos_token_id: int):
        self.opts = options
        self.max_concurrency = options.max_concurrency
        self.tokenizer = tokenizer
        self.task = task
        self.eos = eos_token_id
        self.lookup = TaskReward(task)  # prompt id -> problem
        self.slots = asyncio.Semaphore(options.max_concurrency)
        self.running: set[str] = set()
        self.aborted: set[str] = set()
        self.total_tokens = 0
        self.version = 0
        vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
        self.vocab = np.asarray(vocab, dtype=np.int32)

    async def start(self) -> None:
        return None

    def num_running(self) -> int:
        return len(self.running)

    def _plan(self, prompt_id: str, max_tokens: int, rng: random.Random, prompt=None, shadow=False):
        """Token ids and their regrets for one rollout. A shadow continuation (the prompt ends
        with the kept tokens of a stopped rollout) finishes the gold solution if the kept tokens
        are a prefix of it (the stop was a false positive), else goes on rambling."""
        o = self.opts
        problem = self.lookup.problem_of(prompt_id)
        gold = self.tokenizer.encode(self.task.solution(problem), add_special_tokens=False) if problem else []
        if shadow and problem is not None and prompt is not None:
            head = len(self.tokenizer.encode(self.task.format_prompt(problem), add_special_tokens=True))
            kept = [int(t) for t in prompt[head:]]
            if kept == gold[: len(kept)]:
                rest = gold[len(kept) :] + [self.eos]
                return rest[:max_tokens], [0.0] * min(len(rest), max_tokens)
            n = max_tokens
            return [int(self.vocab[rng.randrange(len(self.vocab))]) for _ in range(n)], [o.bad_regret] * n
        if problem is None or rng.random() < o.p_bad:
            lo, hi = o.fail_at
            cut = int(len(gold) * rng.uniform(lo, hi))
            tokens = list(gold[:cut])
            regrets = [rng.expovariate(1 / o.good_regret) if o.good_regret else 0.0 for _ in tokens]
            while len(tokens) < max_tokens:
                if o.p_ramble_eos and rng.random() < o.p_ramble_eos:
                    tokens.append(self.eos)
                    regrets.append(0.0)
                    break
                tokens.append(int(self.vocab[rng.randrange(len(self.vocab))]))
                regrets.append(rng.expovariate(1 / o.bad_regret) if o.bad_regret else 0.0)
        else:
            tokens = list(gold) + [self.eos]
            regrets = [rng.expovariate(1 / o.good_regret) if o.good_regret else 0.0 for _ in tokens]
        return tokens[:max_tokens], regrets[:max_tokens]

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
        o = self.opts
        async with self.slots:
            self.running.add(request_id)
            try:
                rng = random.Random(seed)
                tokens, regrets = self._plan(
                    context.get("prompt_id", ""), max_tokens, rng, prompt_token_ids, bool(context.get("shadow"))
                )
                delay = o.chunk_tokens / o.tokens_per_s if o.tokens_per_s else 0.0
                if o.slow_prompts and context.get("prompt_id", "").startswith(o.slow_prompts):
                    delay = o.chunk_tokens / o.slow_tokens_per_s
                i = 0
                while i < len(tokens):
                    if request_id in self.aborted:
                        yield _chunk([], [], o.top1_logprob, "abort")
                        return
                    if delay:
                        await asyncio.sleep(delay)  # simulated generation time
                    else:
                        await asyncio.sleep(0)  # let cancels and other requests in
                    if request_id in self.aborted:
                        yield _chunk([], [], o.top1_logprob, "abort")
                        return
                    j = min(i + o.chunk_tokens, len(tokens))
                    self._count(j - i)
                    done = j == len(tokens)
                    reason = None
                    if done:
                        reason = "stop" if tokens[-1] == self.eos else "length"
                    if o.never_finish and context.get("prompt_id", "").startswith(o.never_finish):
                        reason = None
                        yield _chunk(tokens[i:j], regrets[i:j], o.top1_logprob, reason)
                        while request_id not in self.aborted:  # an unfinishable rollout (stall tests)
                            await asyncio.sleep(0.05)  # simulated engine that never ends this request
                        yield _chunk([], [], o.top1_logprob, "abort")
                        return
                    yield _chunk(tokens[i:j], regrets[i:j], o.top1_logprob, reason)
                    i = j
            finally:
                self.running.discard(request_id)
                self.aborted.discard(request_id)

    def _count(self, n: int) -> None:
        self.total_tokens += n
        o = self.opts
        if o.crash_after_tokens and self.total_tokens >= o.crash_after_tokens:
            os._exit(17)  # simulated crash: no cleanup, like kill -9
        if o.hang_after_tokens and self.total_tokens >= o.hang_after_tokens:
            time.sleep(3600)  # simulated hang: blocks the event loop, so heartbeats stop too

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)

    async def load_weights(self, path: Path, version: int) -> float:
        t0 = time.perf_counter()
        if self.opts.load_weights_s:
            await asyncio.sleep(self.opts.load_weights_s)  # simulated load time
        self.version = version
        return time.perf_counter() - t0

    def decode(self, token_ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=True)

    async def shutdown(self) -> None:
        self.aborted.update(self.running)


def _chunk(tokens: list[int], regrets: list[float], top1: float, reason: str | None) -> EngineChunk:
    top1_arr = np.full(len(tokens), top1, dtype=np.float32)
    return EngineChunk(
        token_ids=np.asarray(tokens, dtype=np.int32),
        logprobs=(top1_arr - np.asarray(regrets, dtype=np.float32)).astype(np.float32),
        top1_logprobs=top1_arr,
        finish_reason=reason,
    )


class FakeSampler(Sampler):
    """A sampler whose engine is ``FakeEngine`` (same interface as ``VLLMSampler``)."""

    OPTIONS = FakeEngineOptions

    def make_engine(self) -> FakeEngine:
        from transformers import AutoTokenizer

        opts = FakeEngineOptions(**self.options)
        tokenizer = AutoTokenizer.from_pretrained(self.assets.policy_dir)
        task = make_task(self.cfg.task.name, **self.cfg.task.options)
        return FakeEngine(opts, tokenizer, task, tokenizer.eos_token_id)
