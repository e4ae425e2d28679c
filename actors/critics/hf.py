"""The real critic: the learner's value model (HF backbone + linear head) served incrementally.

``HFValueModel`` computes exactly what ``espo_async.models.value_model.ValueModel`` computes for
the same prefix and weights: V(s_t) = head(hidden[P + t - 1]) (docs/architecture.md), but with a
KV cache per live request, so each token goes through the backbone once.

Batching scheme (``mode: incremental``). All requests of one ``values`` call that need the model
go through the backbone together, split into forwards of at most ``max_batch`` requests and
``max_batch_tokens`` padded input tokens (requests are sorted by input length so that one long
prompt does not pad many one-token increments). Inside a forward, request ``b`` has ``c_b``
cached positions and ``n_b`` new tokens:

* the cached keys/values are *left*-padded to the longest past ``Lp`` and handed to the backbone as
  a ``transformers.DynamicCache`` (``DynamicCache(ddp_cache_data=...)``, the documented way to
  build a cache from tensors in transformers 5);
* the new tokens are *right*-padded to ``Ln``; a 2D ``attention_mask`` of length ``Lp + Ln``
  marks row ``b``'s real keys (the last ``c_b`` past columns and its first ``n_b`` new ones);
* ``position_ids = c_b + arange(Ln)`` give every row its own RoPE positions (the cached keys were
  stored already rotated at their true positions, so the left padding changes nothing).

This is the padding scheme of ``generate()`` (left-padded batch + explicit positions), so it
uses only public, version-stable inputs (no custom attention, no private cache internals beyond
``DynamicCache.layers[i].keys/values``). A real query never sees a padded key: past padding is
masked, and right padding lies after every real query (causal). Padded queries see at least
their row's real tokens, so no attention row is empty. The new keys/values of each row are then
copied out of the cache into the request's own growable buffer ``[layers, 2, kv_heads, cap,
head_dim]``.

Each request keeps its token history (prompt + response), so a cache can always be rebuilt:
least-recently-used caches beyond ``max_cached`` are dropped (recompute on the next call), a
request longer than ``max_cache_len`` is served uncached, and a weight update drops every cache
(the keys were computed with the old weights; ``keep_cache_on_update`` trades that exactness for
speed). Cache memory is bounded by ``(max_cached + requests in one call) * max_cache_len``
positions (eviction runs after each call); token histories (8 bytes a token) are freed by
``end`` and capped at ``max_streams`` streams for ends that never arrive.

``mode: recompute`` keeps no cache: every call runs the full prefix of each request (batched,
right-padded), for comparison and as a fallback.

With ``value_interval`` k > 1 (set by ``HFCritic`` from ``stop.value_interval``) and ``lazy``,
the model runs for a request only when one of its new states is at a position that is a multiple
of k (the only values the critic actor sends); the other returned values are NaN and never leave
the actor. The cache still ingests every token (later, in one larger forward).

Options (``actors.critic.options``): see ``HFValueOptions``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from actors.critics.base import Critic, ValueRequest

log = logging.getLogger(__name__)

__all__ = ["HFValueOptions", "HFValueModel", "HFCritic"]


class HFValueOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["incremental", "recompute"] = Field(
        "incremental", description="'incremental': KV cache per request; 'recompute': full prefix every call.")
    max_batch: int = Field(16, ge=1, description="Requests per backbone forward.")
    max_batch_tokens: int = Field(
        4096, ge=1, description="Padded input tokens per forward (a longer single request still runs, alone).")
    max_cached: int = Field(64, ge=0, description="Requests whose KV cache is kept (least recently used evicted).")
    max_cache_len: int | None = Field(
        None, ge=1, description="Positions per cache; longer requests run uncached. Default: the model's max_position_embeddings.")
    max_streams: int = Field(
        65536, ge=1, description="Token histories kept (LRU) for streams whose end was never seen.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lazy: bool = Field(True, description="With value_interval > 1, run the model only when a needed value arrives.")
    keep_cache_on_update: bool = Field(
        False, description="Keep KV caches across weight updates (faster, but no longer the learner's exact values).")
    device: str = Field("cpu", description="Where the value model runs: 'cpu', 'cuda' or 'cuda:N' (untested on GPU here).")


@dataclass
class _Stream:
    prompt_len: int
    tokens: np.ndarray  # growable buffer: prompt + response tokens
    n: int  # valid length of ``tokens``
    kv: torch.Tensor | None = None  # [layers, 2, kv_heads, cap, head_dim]
    n_kv: int = 0  # positions cached (0 .. n_kv-1)

    def append(self, new: np.ndarray) -> None:
        need = self.n + len(new)
        if need > len(self.tokens):
            buf = np.empty(max(need, 2 * len(self.tokens)), dtype=np.int64)
            buf[: self.n] = self.tokens[: self.n]
            self.tokens = buf
        self.tokens[self.n : need] = new
        self.n = need


@dataclass
class _Job:
    index: int  # position in the call's batch
    rid: str
    st: _Stream
    start: int  # first sequence position fed (= cached positions used)
    stop: int  # sequence length after this call
    want: np.ndarray  # sequence positions whose values are needed
    store: bool  # keep the new keys/values


class HFValueModel:
    """The ``ValueModel`` protocol (actors/critics/base.py) on ``espo_async.models.value_model.ValueModel``."""

    def __init__(self, model_dir: str | Path, options: HFValueOptions | None = None, *, seed: int = 0,
                 value_interval: int = 1, device: str = "cpu") -> None:
        from espo_async.models.value_model import ValueModel

        self.opts = options or HFValueOptions()
        self.device = torch.device(device)
        self.model = ValueModel.from_pretrained(model_dir, dtype=getattr(torch, self.opts.dtype), seed=seed)
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.pad_id = int(getattr(cfg, "pad_token_id", None) or 0)
        self.vocab_size = int(self.model.backbone.get_input_embeddings().num_embeddings)
        limit = self.opts.max_cache_len or int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        self.max_cache_len = int(limit)
        self.interval = max(1, int(value_interval))
        self.version = 0
        self.streams: OrderedDict[str, _Stream] = OrderedDict()  # LRU order (last = most recent)
        self.cached: OrderedDict[str, None] = OrderedDict()  # requests holding a KV cache, LRU order
        self.stats = {"forwards": 0, "tokens_in": 0, "padded_tokens_in": 0, "cache_misses": 0,
                      "evictions": 0, "unknown_streams": 0, "uncached_calls": 0}

    # -- protocol ---------------------------------------------------------------------------------
    def values(self, batch: list[ValueRequest]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        jobs: list[_Job] = []
        incremental = self.opts.mode == "incremental"
        for i, req in enumerate(batch):
            new = self._ids(req.request_id, req.new_token_ids)
            first = req.prompt_token_ids is not None
            if first:
                prompt = self._ids(req.request_id, req.prompt_token_ids)
                if len(prompt) == 0:
                    raise ValueError(f"{req.request_id}: the prompt needs at least one token")
                self._drop(req.request_id)
                st = _Stream(prompt_len=len(prompt), tokens=np.empty(len(prompt) + max(len(new), 64), np.int64), n=0)
                st.append(prompt)
                self.streams[req.request_id] = st
            else:
                st = self.streams.get(req.request_id)
                if st is None:  # history lost (max_streams) or never started: nothing to compute from
                    self.stats["unknown_streams"] += 1
                    out.append(np.zeros(0, np.float32))
                    continue
                self.streams.move_to_end(req.request_id)
            first_state = st.n - st.prompt_len + (0 if first else 1)  # index t of the first returned state
            st.append(new)
            n_states = len(new) + (1 if first else 0)
            vals = np.full(n_states, np.nan, np.float32)
            out.append(vals)
            if n_states == 0:
                continue
            t = np.arange(first_state, first_state + n_states)
            need = t % self.interval == 0 if (self.opts.lazy and self.interval > 1) else np.ones(n_states, bool)
            if not need.any():
                continue  # lazy: tokens recorded; the cache catches up when a needed value arrives
            want = st.prompt_len - 1 + t[need]
            cacheable = incremental and st.n <= self.max_cache_len and self.opts.max_cached > 0
            if not cacheable and st.kv is not None:
                self._free(req.request_id)
            start = st.n_kv if (cacheable and st.kv is not None) else 0
            if incremental and start == 0 and not first:
                self.stats["cache_misses" if cacheable else "uncached_calls"] += 1
            jobs.append(_Job(i, req.request_id, st, start, st.n, want, cacheable))
        if jobs:
            with torch.inference_mode():
                for group in self._groups(jobs):
                    self._forward(group, out)
            for job in jobs:  # most recently used last
                if job.store and job.rid in self.cached:
                    self.cached.move_to_end(job.rid)
            self._evict()
        while len(self.streams) > self.opts.max_streams:  # streams whose end was lost
            self._drop(next(iter(self.streams)))
        return out

    def end(self, request_id: str) -> None:
        self._drop(request_id)

    def load_weights(self, path: Path, version: int) -> None:
        from espo_async.models.value_model import load_value_weights

        with torch.no_grad():
            load_value_weights(self.model, path)
        self.version = int(version)
        if not self.opts.keep_cache_on_update:
            for rid in list(self.cached):
                self._free(rid)

    # -- internals --------------------------------------------------------------------------------
    def _ids(self, rid: str, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{rid}: token id out of the critic's vocabulary (size {self.vocab_size}): "
                             "the policy and the critic must share a tokenizer")
        return ids

    def _drop(self, rid: str) -> None:
        self._free(rid)
        self.streams.pop(rid, None)

    def _free(self, rid: str) -> None:
        self.cached.pop(rid, None)
        st = self.streams.get(rid)
        if st is not None:
            st.kv, st.n_kv = None, 0

    def _evict(self) -> None:
        while len(self.cached) > self.opts.max_cached:
            self._free(next(iter(self.cached)))
            self.stats["evictions"] += 1

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Forwards of at most max_batch requests / max_batch_tokens padded tokens, longest first;
        a job joins a group only if the group stays at least half real tokens."""
        groups: list[list[_Job]] = []
        cur: list[_Job] = []
        ln = real = 0
        for job in sorted(jobs, key=lambda j: j.stop - j.start, reverse=True):
            n = job.stop - job.start
            if cur and (len(cur) >= self.opts.max_batch or (len(cur) + 1) * ln > self.opts.max_batch_tokens
                        or 2 * (real + n) < (len(cur) + 1) * ln):
                groups.append(cur)
                cur = []
            if not cur:
                ln, real = n, 0
            cur.append(job)
            real += n
        if cur:
            groups.append(cur)
        return groups

    def _forward(self, group: list[_Job], out: list[np.ndarray]) -> None:
        from transformers import DynamicCache

        B = len(group)
        n_in = [j.stop - j.start for j in group]
        Ln = max(n_in)
        Lp = max(j.start for j in group)
        ids = torch.full((B, Ln), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, Lp + Ln), dtype=torch.long)
        pos = torch.empty((B, Ln), dtype=torch.long)
        ar = torch.arange(Ln)
        for b, (job, n) in enumerate(zip(group, n_in)):
            ids[b, :n] = torch.from_numpy(job.st.tokens[job.start : job.stop])
            mask[b, Lp - job.start : Lp + n] = 1
            pos[b] = job.start + ar.clamp(max=n - 1)  # padded queries reuse the last position
        cache = None
        if self.opts.mode == "incremental":
            if Lp > 0:
                nl, _, kvh, _, hd = next(j.st.kv.shape for j in group if j.start > 0)
                past = torch.empty((nl, 2, B, kvh, Lp, hd), dtype=self.model.head.weight.dtype, device=self.device)
                for b, job in enumerate(group):
                    if job.start:
                        past[:, :, b, :, Lp - job.start :] = job.st.kv[:, :, :, : job.start]
                    if job.start < Lp:  # masked, but must be finite: NaN * 0 attention weight is NaN
                        past[:, :, b, :, : Lp - job.start] = 0
                cache = DynamicCache(ddp_cache_data=[(past[i, 0], past[i, 1]) for i in range(nl)])
            else:
                cache = DynamicCache()
        hidden = self.model.backbone(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
            past_key_values=cache, use_cache=cache is not None,
        ).last_hidden_state
        vals = self.model.head(hidden).squeeze(-1).float().cpu().numpy()  # [B, Ln]
        self.stats["forwards"] += 1
        self.stats["tokens_in"] += sum(n_in)
        self.stats["padded_tokens_in"] += B * Ln
        for b, job in enumerate(group):
            res = out[job.index]  # states at sequence positions stop - len(res) .. stop - 1
            res[job.want - (job.stop - len(res))] = vals[b, job.want - job.start]
        if cache is not None:
            self._store(group, cache, Lp)

    def _store(self, group: list[_Job], cache, Lp: int) -> None:
        if not any(j.store for j in group):
            return
        layers = cache.layers
        new = torch.stack([torch.stack((layer.keys[:, :, Lp:], layer.values[:, :, Lp:])) for layer in layers])
        # new: [layers, 2, B, kv_heads, Ln, head_dim]
        for b, job in enumerate(group):
            if not job.store:
                continue
            st, n = job.st, job.stop - job.start
            if st.kv is None or st.kv.shape[3] < job.stop:
                cap = min(self.max_cache_len, max(64, 1 << (job.stop - 1).bit_length()))
                shape = (new.shape[0], 2, new.shape[3], cap, new.shape[5])
                buf = torch.empty(shape, dtype=new.dtype, device=new.device)
                if st.kv is not None and job.start:
                    buf[:, :, :, : job.start] = st.kv[:, :, :, : job.start]
                st.kv = buf
            st.kv[:, :, :, job.start : job.stop] = new[:, :, b, :, :n]
            st.n_kv = job.stop
            self.cached[job.rid] = None


class HFCritic(Critic):
    """The critic actor on ``HFValueModel``. The backbone comes from ``assets.critic_dir`` (the
    policy's directory when ``assets.critic_from_policy``); the head is initialised with the run
    seed, exactly as the learner initialises its critic, and is replaced by the learner's weights
    at each ``WeightsAnnounced(critic)``."""

    OPTIONS = HFValueOptions

    def make_value_model(self) -> HFValueModel:
        options = HFValueOptions(**self.options)
        return HFValueModel(
            self.assets.critic_dir, options, seed=int(self.cfg.run.seed),
            value_interval=int(self.interval), device=options.device,
        )

    def heartbeat_counters(self) -> dict[str, float]:
        out = super().heartbeat_counters()
        model = getattr(self, "model", None)
        if isinstance(model, HFValueModel):
            out.update({f"critic_{k}": float(v) for k, v in model.stats.items()})
            out["critic_cached"] = float(len(model.cached))
        return out
