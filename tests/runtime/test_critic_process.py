"""A real (fake-model) critic process; the test plays the samplers and the stopper."""

from __future__ import annotations

import numpy as np
import zmq
import zmq.asyncio

import protocols as P
from espo_async.config import parse_config
from espo_async.runtime.harness import ActorHarness


def config():
    return parse_config({
        "actors": {"critic": {"class": "actors.critics.fake:FakeCritic", "options": {"value": 0.5, "decay": 0.5}}},
        "transport": {"heartbeat_interval_s": 0.1},
    })


def step_batch(rids: list[str], start: int, n: int) -> P.TokenBatch:
    """Tokens start .. start+n-1 of every stream (with the prompt when start is 0)."""
    z = np.zeros(n, np.float32)
    return P.TokenBatch.from_chunks([
        P.TokenChunk(request_id=rid, sampler_id="sampler-0", start=start,
                     token_ids=np.arange(start, start + n, dtype=np.int32) + 4, logprobs=z, top1_logprobs=z,
                     versions=np.zeros(n, np.int32), prompt_token_ids=np.array([1, 5, 6], np.int32) if start == 0 else None)
        for rid in rids
    ])


async def test_one_token_batch_is_one_value_model_call_for_all_its_streams(tmp_path, tiny_model_dir):
    assets = {"policy_dir": tiny_model_dir, "critic_dir": tiny_model_dir, "critic_from_policy": True}
    async with ActorHarness(config(), tmp_path, "critic", binds=["stopper_stream", "broadcast"], assets=assets) as h:
        await h.start()
        push = zmq.asyncio.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(h.addresses["critic_stream"])
        try:
            rids = [f"r{i}" for i in range(8)]
            values: dict[str, dict[int, float]] = {rid: {} for rid in rids}
            for step, (start, n) in enumerate([(0, 2), (2, 1)]):
                await push.send(P.encode(step_batch(rids, start, n)))
                for _ in rids:  # one ValueChunk per stream: the states the step's tokens made known
                    msg = await h.recv("stopper_stream", timeout=30)
                    assert isinstance(msg, P.ValueChunk)
                    values[msg.request_id].update(zip(msg.positions.tolist(), msg.values.tolist()))
                hb = await h.wait_heartbeat(lambda hb, k=step + 1: hb.counters.get("value_batches", 0) >= k)
                assert hb.counters["value_batches"] == step + 1  # the whole batch in one model call
            for rid in rids:  # V(s_t) = 0.5 * 0.5**t for t = 0 .. 3, each state once
                assert values[rid] == {t: 0.5 * 0.5**t for t in range(4)}
            for rid in rids:
                await push.send(P.encode(P.StreamEnd(request_id=rid, sampler_id="sampler-0", ending="finished", n_tokens=3)))
            hb = await h.wait_heartbeat(lambda hb: hb.counters.get("live_streams") == 0)
            assert hb.counters.get("end_unknown", 0) == 0 and hb.counters.get("handler_errors", 0) == 0
        finally:
            push.close()


async def test_a_stream_of_a_batch_the_critic_cannot_embed_breaks_alone(tmp_path, tiny_model_dir):
    """A batch whose entries include a prompt and tokens outside the vocabulary (the HF critic):
    those two streams get no values; the others of the same batch do, with no model error."""
    cfg = parse_config({
        "actors": {"critic": {"class": "actors.critics.hf:HFCritic", "options": {"max_batch": 8}}},
        "transport": {"heartbeat_interval_s": 0.1},
    })
    assets = {"policy_dir": tiny_model_dir, "critic_dir": tiny_model_dir, "critic_from_policy": True}
    async with ActorHarness(cfg, tmp_path, "critic", binds=["stopper_stream", "broadcast"], assets=assets) as h:
        await h.start(timeout=120)
        push = zmq.asyncio.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(h.addresses["critic_stream"])
        try:
            chunks = list(step_batch(["good-a", "bad-prompt", "bad-tokens", "good-b"], 0, 3).chunks())
            chunks[1].prompt_token_ids = np.array([1, 10**6, 5], np.int32)
            chunks[2].token_ids = np.array([4, -3, 6], np.int32)
            await push.send(P.encode(P.TokenBatch.from_chunks(chunks)))
            got = {}
            for _ in range(2):
                msg = await h.recv("stopper_stream", timeout=60)
                got[msg.request_id] = msg.positions.tolist()
                assert np.isfinite(msg.values).all()
            assert got == {"good-a": [0, 1, 2, 3], "good-b": [0, 1, 2, 3]}
            hb = await h.wait_heartbeat(lambda hb: hb.counters.get("tokens_out_of_vocab") == 2
                                        and hb.counters.get("value_batches") == 1)
            assert hb.counters.get("value_errors", 0) == 0 and hb.counters.get("handler_errors", 0) == 0
        finally:
            push.close()
