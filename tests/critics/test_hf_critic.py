"""HFValueModel / HFCritic: streamed values equal the learner's ValueModel on the full prefix."""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio
from pydantic import ValidationError

import protocols as P
from actors.critics.base import ValueModel as ValueModelProtocol
from actors.critics.base import ValueRequest
from actors.critics.hf import HFCritic, HFValueModel, HFValueOptions
from espo_async.training.value_model import ValueModel

ALPHABET = "0123456789+-*=;.AQ"
# Values from a KV-cached incremental forward against a full forward: the same float32 sums in
# another order (and other kernel shapes), so they agree to reordering error, not bit for bit.
# An absolute 1e-4 on values of magnitude <= ~1 is ~100x the float32 reordering bound of a
# hidden-128 two-layer forward (tests/numerics.py) on any CPU, and ~1000x below the difference a
# wrong cache position or head makes.
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir():
    from espo_async.models.tiny import build_tiny_model

    return str(build_tiny_model(None, ALPHABET))


def _weights(model_dir, tmp_path, name: str, seed: int, backbone_noise: float = 0.0):
    """A learner-format weights file with an O(1) head (the default head is ~1e-3, too small to
    make a 1e-4 tolerance mean anything) and optionally a perturbed backbone; and its model."""
    from safetensors.torch import save_file

    ref = ValueModel.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hidden = ref.head.weight.shape[1]
        ref.head.weight.copy_(torch.randn(ref.head.weight.shape, generator=g) * (2.0 / hidden**0.5))
        ref.head.bias.fill_(0.3)
        if backbone_noise:
            for p in ref.backbone.parameters():
                p.add_(torch.randn(p.shape, generator=g) * backbone_noise * (p.std() if p.numel() > 1 else 1.0))
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path, ref


def _reference(ref: ValueModel, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The learner's values V(s_0..s_T) on the full sequence: positions P-1 .. P-1+T."""
    ids = torch.as_tensor(np.concatenate([prompt, tokens]), dtype=torch.long)[None]
    with torch.no_grad():
        out = ref(ids, torch.ones_like(ids))[0].numpy()
    return out[len(prompt) - 1 :]


class Sim:
    """Drives a value model like the critic actor: interleaved streams, random chunk sizes,
    streams ending and new ones starting mid-way. Records what each call returned."""

    def __init__(self, model, vocab: int, seed: int, n_streams: int = 7, max_chunk: int = 5):
        self.model, self.rng, self.max_chunk = model, np.random.default_rng(seed), max_chunk
        self.specs = {}
        for k in range(n_streams):
            p = int(self.rng.integers(1, 12))
            t = int(self.rng.integers(3, 40))
            start_round = 0 if k < 3 else int(self.rng.integers(1, 12))
            self.specs[f"req-{k}"] = (self.rng.integers(4, vocab, p), self.rng.integers(4, vocab, t), start_round)
        self.fed = {r: None for r in self.specs}  # None: not started
        self.got = {r: [] for r in self.specs}
        self.ended: set[str] = set()
        self.round = 0

    def step(self, until: int | None = None) -> bool:
        """One values() call; False when everything ended."""
        batch = []
        for rid, (prompt, toks, start_round) in self.specs.items():
            if rid in self.ended or self.round < start_round:
                continue
            limit = len(toks) if until is None else min(len(toks), until)
            if self.fed[rid] is None:
                n = int(self.rng.integers(0, 4))
                n = min(n, limit)
                batch.append(ValueRequest(rid, prompt, toks[:n], 0))
                self.fed[rid] = n
            elif self.fed[rid] < limit and self.rng.random() < 0.85:  # sometimes a stream has nothing new
                a = self.fed[rid]
                n = min(int(self.rng.integers(1, self.max_chunk + 1)), limit - a)
                batch.append(ValueRequest(rid, None, toks[a : a + n], len(self.got[rid])))
                self.fed[rid] = a + n
        self.round += 1
        if batch:
            for req, vals in zip(batch, self.model.values(batch)):
                assert vals.dtype == np.float32
                assert len(vals) == len(req.new_token_ids) + (req.prompt_token_ids is not None)
                self.got[req.request_id].extend(vals.tolist())
        for rid, (_, toks, _) in self.specs.items():
            if rid not in self.ended and self.fed[rid] == len(toks) and self.rng.random() < 0.5:
                self.model.end(rid)
                self.ended.add(rid)
        return len(self.ended) < len(self.specs)

    def run(self, until: int | None = None, max_rounds: int = 500) -> None:
        for _ in range(max_rounds):
            if not self.step(until):
                return
            if until is not None and all(
                self.fed[r] is not None and self.fed[r] >= min(until, len(t)) for r, (_, t, _) in self.specs.items()
            ):
                return
        raise AssertionError("simulation did not finish")

    def check(self, ref: ValueModel, *, interval: int = 1) -> int:
        checked = 0
        for rid, (prompt, toks, _) in self.specs.items():
            got = np.asarray(self.got[rid])
            exp = _reference(ref, prompt, toks)[: len(got)]
            assert len(got) == len(exp), rid
            pos = np.arange(len(got))
            sel = pos % interval == 0
            np.testing.assert_allclose(got[sel], exp[sel], atol=TOL, rtol=0, err_msg=rid)
            checked += int(sel.sum())
        return checked


def _vocab(model_dir) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).vocab_size)


def test_protocol_and_options(model_dir):
    m = HFValueModel(model_dir)
    assert isinstance(m, ValueModelProtocol)
    assert HFCritic.OPTIONS is HFValueOptions
    with pytest.raises(ValidationError):
        HFValueOptions(max_batchh=3)
    with pytest.raises(ValidationError):
        HFValueOptions(mode="fast")


def test_incremental_matches_learner_on_random_chunks(model_dir, tmp_path):
    path, ref = _weights(model_dir, tmp_path, "w1", seed=1)
    m = HFValueModel(model_dir, HFValueOptions(max_batch=4))
    m.load_weights(path, 1)
    sim = Sim(m, _vocab(model_dir), seed=0, n_streams=8)
    sim.run()
    assert sim.check(ref) > 100
    assert m.stats["cache_misses"] == 0 and m.stats["evictions"] == 0
    assert m.stats["tokens_in"] == sum(len(p) + len(t) for p, t, _ in sim.specs.values())  # each token once
    assert not m.streams and not m.cached  # every stream ended: nothing retained


def test_initial_head_is_the_learners_seeded_head(model_dir):
    """Before any announcement the values are the learner's initial critic (same seed)."""
    m = HFValueModel(model_dir, seed=7)
    ref = ValueModel.from_pretrained(model_dir, seed=7).eval()
    sim = Sim(m, _vocab(model_dir), seed=3, n_streams=3)
    sim.run()
    for rid, (prompt, toks, _) in sim.specs.items():
        exp = _reference(ref, prompt, toks)
        np.testing.assert_allclose(sim.got[rid], exp, atol=TOL, rtol=0)


def test_one_forward_batches_requests_with_different_past_lengths(model_dir, tmp_path):
    path, ref = _weights(model_dir, tmp_path, "w1", seed=1)
    m = HFValueModel(model_dir, HFValueOptions(max_batch=16))
    m.load_weights(path, 1)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(4, 20, int(n)) for n in (1, 3, 7, 12, 5, 9)]
    toks = [rng.integers(4, 20, 12) for _ in prompts]
    m.values([ValueRequest(f"r{i}", p, t[:i % 3], 0) for i, (p, t) in enumerate(zip(prompts, toks))])
    f0 = m.stats["forwards"]
    out = m.values([ValueRequest(f"r{i}", None, t[i % 3 : i % 3 + 2], 0) for i, t in enumerate(toks)])
    assert m.stats["forwards"] == f0 + 1  # six different past lengths, one forward
    for i, (p, t) in enumerate(zip(prompts, toks)):
        exp = _reference(ref, p, t[: i % 3 + 2])
        np.testing.assert_allclose(out[i], exp[-2:], atol=TOL, rtol=0)


def test_weight_update_changes_values_and_matches_new_weights(model_dir, tmp_path):
    path1, ref1 = _weights(model_dir, tmp_path, "w1", seed=1)
    path2, ref2 = _weights(model_dir, tmp_path, "w2", seed=2, backbone_noise=0.2)
    m = HFValueModel(model_dir, HFValueOptions(max_batch=3))
    m.load_weights(path1, 1)
    sim = Sim(m, _vocab(model_dir), seed=11, n_streams=6)
    sim.run(until=10)  # every stream started and part-way through, caches warm
    before = {r: len(v) for r, v in sim.got.items()}
    assert m.cached
    m.load_weights(path2, 2)
    assert m.version == 2 and not m.cached  # caches computed with v1 weights are gone
    sim.run()
    changed = 0
    for rid, (prompt, toks, _) in sim.specs.items():
        got, k = np.asarray(sim.got[rid]), before[rid]
        np.testing.assert_allclose(got[:k], _reference(ref1, prompt, toks)[:k], atol=TOL, rtol=0)
        exp2 = _reference(ref2, prompt, toks)
        np.testing.assert_allclose(got[k:], exp2[k:], atol=TOL, rtol=0)
        changed += int(np.abs(_reference(ref1, prompt, toks)[k:] - exp2[k:]).max(initial=0) > 1e-2)
    assert changed >= 3


def test_lru_eviction_recomputes_the_same_values(model_dir, tmp_path):
    path, ref = _weights(model_dir, tmp_path, "w1", seed=1)
    m = HFValueModel(model_dir, HFValueOptions(max_cached=2, max_batch=8))
    m.load_weights(path, 1)
    sim = Sim(m, _vocab(model_dir), seed=21, n_streams=7)
    sim.run()
    sim.check(ref)
    assert m.stats["evictions"] > 0 and m.stats["cache_misses"] > 0
    assert len(m.cached) <= 2


def test_requests_longer_than_max_cache_len_run_uncached(model_dir, tmp_path):
    path, ref = _weights(model_dir, tmp_path, "w1", seed=1)
    m = HFValueModel(model_dir, HFValueOptions(max_cache_len=16))
    m.load_weights(path, 1)
    sim = Sim(m, _vocab(model_dir), seed=4, n_streams=5)
    sim.run()
    sim.check(ref)
    assert m.stats["uncached_calls"] > 0
    assert all(st.kv is None or st.kv.shape[3] <= 16 for st in m.streams.values())


def test_recompute_mode_equals_incremental(model_dir, tmp_path):
    path, _ = _weights(model_dir, tmp_path, "w1", seed=1)
    results = {}
    for mode in ("incremental", "recompute"):
        m = HFValueModel(model_dir, HFValueOptions(mode=mode, max_batch=4))
        m.load_weights(path, 1)
        sim = Sim(m, _vocab(model_dir), seed=9, n_streams=6)
        sim.run()
        results[mode] = sim.got
        if mode == "recompute":
            assert not m.cached
    for rid in results["incremental"]:
        np.testing.assert_allclose(results["recompute"][rid], results["incremental"][rid], atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["incremental", "recompute"])
def test_value_interval_computes_only_needed_values(model_dir, tmp_path, mode):
    path, ref = _weights(model_dir, tmp_path, "w1", seed=1)
    m = HFValueModel(model_dir, HFValueOptions(mode=mode), value_interval=4)
    m.load_weights(path, 1)
    sim = Sim(m, _vocab(model_dir), seed=13, n_streams=5, max_chunk=2)
    sim.run()
    sim.check(ref, interval=4)
    for rid in sim.specs:
        got = np.asarray(sim.got[rid])
        pos = np.arange(len(got))
        assert np.isfinite(got[pos % 4 == 0]).all() and np.isnan(got[pos % 4 != 0]).all()
    if mode == "incremental":  # lazily ingested, each token at most once, none after the last needed state's chunk
        total = sum(len(p) + len(t) for p, t, _ in sim.specs.values())
        assert sum(len(p) + 4 * (len(t) // 4) for p, t, _ in sim.specs.values()) <= m.stats["tokens_in"] <= total
        assert m.stats["cache_misses"] == 0


def test_unknown_stream_and_end_are_safe(model_dir):
    m = HFValueModel(model_dir)
    assert len(m.values([ValueRequest("ghost", None, np.array([5, 6]), 1)])[0]) == 0
    assert m.stats["unknown_streams"] == 1
    m.end("never-seen")
    out = m.values([ValueRequest("a", np.array([5]), np.zeros(0, np.int64), 0)])
    assert out[0].shape == (1,) and np.isfinite(out[0]).all()
    m.end("a")
    assert not m.streams and not m.cached
    with pytest.raises(ValueError, match="vocabulary"):
        m.values([ValueRequest("b", np.array([5]), np.array([m.vocab_size]), 0)])


def test_hf_critic_builds_from_assets(model_dir):
    stub = types.SimpleNamespace(
        assets=types.SimpleNamespace(critic_dir=model_dir, critic_from_policy=True, policy_dir=model_dir),
        options={"max_cached": 3, "mode": "incremental"},
        cfg=types.SimpleNamespace(run=types.SimpleNamespace(seed=5)),
        interval=8,
    )
    m = HFCritic.make_value_model(stub)
    assert isinstance(m, HFValueModel) and m.interval == 8 and m.opts.max_cached == 3
    ref = ValueModel.from_pretrained(model_dir, seed=5)
    assert torch.equal(m.model.head.weight, ref.head.weight)


# ------------------------------------------------------------------------------------ process
async def test_critic_process_streams_the_learners_values(model_dir, tmp_path):
    """The real actor: token chunks in, value chunks out; a critic weight announcement switches
    it to the learner's new weights."""
    from espo_async.config import parse_config
    from espo_async.runtime.harness import ActorHarness

    cfg = parse_config({
        "actors": {"critic": {"class": "actors.critics.hf:HFCritic", "options": {"max_batch": 4}}},
        "stop": {"value_interval": 2},
        "transport": {"heartbeat_interval_s": 0.1},
    })
    path, ref = _weights(model_dir, tmp_path, "w1", seed=1, backbone_noise=0.1)
    seeded = ValueModel.from_pretrained(model_dir, seed=int(cfg.run.seed)).eval()
    assets = {"policy_dir": model_dir, "critic_dir": model_dir, "critic_from_policy": True}
    rng = np.random.default_rng(0)
    prompt, toks = rng.integers(4, 20, 5).astype(np.int32), rng.integers(4, 20, 9).astype(np.int32)

    def chunk(rid, start, n, with_prompt):
        z = np.zeros(n, np.float32)
        return P.TokenChunk(request_id=rid, sampler_id="sampler-0", start=start, token_ids=toks[start : start + n],
                            logprobs=z, top1_logprobs=z, versions=np.zeros(n, np.int32),
                            prompt_token_ids=prompt if with_prompt else None)

    async def collect(h, rid, n_values):
        pos, vals, versions = [], [], set()
        while len(pos) < n_values:
            msg = await h.recv("stopper_stream", timeout=30)
            assert isinstance(msg, P.ValueChunk) and msg.request_id == rid
            pos += msg.positions.tolist()
            vals += msg.values.tolist()
            versions.add(msg.critic_version)
        return np.asarray(pos), np.asarray(vals), versions

    async with ActorHarness(cfg, tmp_path / "run", "critic", binds=["stopper_stream", "broadcast"], assets=assets) as h:
        await h.start()
        push = zmq.asyncio.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(h.addresses["critic_stream"])
        try:
            for rid, start, n in (("a", 0, 2), ("a", 2, 3), ("a", 5, 4)):
                await push.send(P.encode(chunk(rid, start, n, start == 0)))
            pos, vals, versions = await collect(h, "a", 5)  # states 0, 2, 4, 6, 8
            assert pos.tolist() == [0, 2, 4, 6, 8] and versions == {0}
            np.testing.assert_allclose(vals, _reference(seeded, prompt, toks)[pos], atol=TOL, rtol=0)
            await push.send(P.encode(P.StreamEnd(request_id="a", sampler_id="sampler-0", ending="finished", n_tokens=9)))

            ann = P.WeightsAnnounced(model="critic", version=1, uri=f"file://{path}", sha256="", nbytes=0)

            async def announce():
                while True:
                    await h.send("broadcast", ann)
                    await asyncio.sleep(0.1)

            task = asyncio.create_task(announce())
            try:
                await h.wait_heartbeat(lambda hb: hb.counters.get("critic_version") == 1.0, timeout=30)
            finally:
                task.cancel()
            for start, n in ((0, 4), (4, 5)):
                await push.send(P.encode(chunk("b", start, n, start == 0)))
            pos, vals, versions = await collect(h, "b", 5)
            assert versions == {1}
            np.testing.assert_allclose(vals, _reference(ref, prompt, toks)[pos], atol=TOL, rtol=0)
        finally:
            push.close()
