"""A real stopper process; the test plays the samplers, the critic and the learner."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest
import torch
import zmq

import protocols as P
from espo_async.config import parse_config
from espo_async.core import first_stop
from espo_async.runtime.harness import ActorHarness

BINDS = ["broadcast"]


def config(**stop):
    stop = {"policy": "espo", "warmup": {"enabled": False}, **stop}
    return parse_config({"stop": stop, "transport": {"heartbeat_interval_s": 0.1}})


def chunk(rid, start, regrets, sampler="sampler-0", prompt=True):
    n = len(regrets)
    top1 = np.full(n, -0.05, np.float32)
    return P.TokenChunk(
        request_id=rid,
        sampler_id=sampler,
        start=start,
        token_ids=np.arange(start, start + n, dtype=np.int32) % 20 + 4,
        logprobs=(top1 - np.asarray(regrets, np.float32)).astype(np.float32),
        top1_logprobs=top1,
        versions=np.zeros(n, np.int32),
        prompt_token_ids=np.array([1, 5, 6], np.int32) if (prompt and start == 0) else None,
    )


class Peers:
    """The test's side: a sampler DEALER (receives cancels) and a PUSH into the stopper."""

    def __init__(self, h: ActorHarness, sampler="sampler-0"):
        self.ctx = zmq.asyncio.Context.instance()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(h.addresses["stopper_stream"])
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, sampler.encode())
        self.dealer.connect(h.addresses["stopper_cancel"])
        for s in (self.push, self.dealer):
            s.setsockopt(zmq.LINGER, 0)

    async def send(self, msg):
        await self.push.send(P.encode(msg))

    async def cancel(self, timeout=10.0) -> P.Cancel:
        async with asyncio.timeout(timeout):
            return P.decode(await self.dealer.recv())

    def close(self):
        self.push.close()
        self.dealer.close()


@pytest.fixture
async def stopper(tmp_path, tiny_model_dir):
    assets = {"policy_dir": tiny_model_dir, "critic_dir": tiny_model_dir, "critic_from_policy": True}
    async with ActorHarness(config(), tmp_path, "stopper", binds=BINDS, assets=assets) as h:
        await h.start()
        peers = Peers(h)
        yield h, peers
        peers.close()


async def test_stops_at_the_index_the_pure_rule_gives_and_waits_for_values(stopper):
    h, peers = stopper
    rng = np.random.default_rng(0)
    regrets = np.concatenate([rng.exponential(0.05, 8), rng.exponential(3.0, 40)])
    values = np.full(len(regrets), 0.1)
    expected = first_stop(
        torch.tensor(regrets, dtype=torch.float32).double(), torch.tensor(values), mu=0.0, var=1.0,
        c=5.0, delta=1e-4, alpha_s=0.9, beta=7.0, eps=0.2,
    )
    assert expected is not None
    # All tokens first, no values: the stopper must not decide anything yet.
    await peers.send(chunk("r1", 0, regrets.astype(np.float32)))
    await h.wait_heartbeat(lambda hb: hb.counters.get("tokens", 0) == len(regrets))
    # Then the values: now it decides, at exactly the pure rule's index.
    await peers.send(P.ValueChunk(request_id="r1", positions=np.arange(len(values), dtype=np.int32),
                                  values=values.astype(np.float32), critic_version=0))
    cancel = await peers.cancel()
    assert cancel.request_id == "r1" and cancel.stop_index == expected
    assert cancel.z > cancel.threshold


async def test_missing_values_mean_no_stop_and_garbage_is_counted(stopper):
    h, peers = stopper
    await peers.send(chunk("r2", 0, np.full(30, 5.0, np.float32)))
    await peers.push.send(b"\x00garbage")
    await peers.send(chunk("r2", 40, np.full(5, 5.0, np.float32)))  # a gap: the stream can't be judged
    hb = await h.wait_heartbeat(
        lambda hb: hb.counters.get("wire.bad_frames") == 1 and hb.counters.get("streams_with_gaps") == 1
    )
    assert hb.counters.get("cancels_sent", 0) == 0
    assert hb.counters["live_streams"] == 1
    await peers.send(P.StreamEnd(request_id="r2", sampler_id="sampler-0", ending="truncated", n_tokens=35))
    hb = await h.wait_heartbeat(lambda hb: hb.counters["live_streams"] == 0 and hb.counters.get("loop_lag.samples"))
    # Every actor reports its event loop's lag: each probe sample in exactly one bucket.
    buckets = [v for k, v in hb.counters.items() if k.startswith(("loop_lag.le_", "loop_lag.gt_"))]
    assert sum(buckets) == hb.counters["loop_lag.samples"] > 0


async def test_stop_parameters_come_from_the_learners_batch_boundary(stopper):
    h, peers = stopper
    # The learner turns stopping off (e.g. warm-up): a clearly failing stream is left alone.
    params = P.StopParams(kind="espo", enabled=False, mu=0.0, var=1.0, c=5.0, delta=1e-4, alpha_s=0.9,
                          beta=7.0, eps=0.2, step=1)
    boundary = P.BatchBoundary(step=1, policy_version=1, total_steps=10, stop=params, n_trajectories=8,
                               stop_rate=0.0, regret_mean=0.0, regret_var=1.0, regret_count=100, critic_loss=1.0)
    while True:  # PUB/SUB: repeat until it has been applied (as the learner does)
        await h.send("broadcast", boundary)
        hb = await h.wait_heartbeat(lambda hb: True, fresh_only=True)
        if hb.counters.get("stopping_enabled") == 0.0:
            break
    await peers.send(chunk("r3", 0, np.full(30, 5.0, np.float32)))
    await peers.send(P.ValueChunk(request_id="r3", positions=np.arange(30, dtype=np.int32),
                                  values=np.zeros(30, np.float32), critic_version=0))
    hb = await h.wait_heartbeat(lambda hb: hb.counters.get("values", 0) >= 30)
    assert hb.counters.get("cancels_sent", 0) == 0


async def test_long_streams_stop_where_the_pure_rule_does_with_sparse_values(tmp_path, tiny_model_dir):
    """Streams much longer than the stopper's trimming window (it forgets decided regrets and
    old values), values every 4 tokens, chunks of several tokens, values lagging behind: the
    stop index is still exactly the vectorised rule's."""
    assets = {"policy_dir": tiny_model_dir, "critic_dir": tiny_model_dir, "critic_from_policy": True}
    cfg = parse_config({"stop": {"policy": "espo", "warmup": {"enabled": False}, "value_interval": 4},
                        "rollout": {"max_tokens": 256}, "transport": {"heartbeat_interval_s": 0.1}})
    async with ActorHarness(cfg, tmp_path, "stopper", binds=BINDS, assets=assets) as h:
        await h.start()
        peers = Peers(h)
        try:
            rng = np.random.default_rng(3)
            for rid, calm in (("long-a", 150), ("long-b", 97)):
                regrets = np.concatenate([rng.exponential(0.05, calm), rng.exponential(3.0, 256 - calm)])
                v_slots = rng.uniform(0.05, 0.3, 64)
                per_token = np.repeat(v_slots, 4)  # V(s_t) = V at t - t mod 4
                expected = first_stop(torch.tensor(regrets.astype(np.float32)).double(), torch.tensor(per_token),
                                      mu=0.0, var=1.0, c=5.0, delta=1e-4, alpha_s=0.9, beta=7.0, eps=0.2)
                assert expected is not None and expected > 64
                start = 0
                while start < 256:
                    n = int(rng.integers(1, 9))
                    await peers.send(chunk(rid, start, regrets[start : start + n].astype(np.float32)))
                    # values arrive a few tokens late, in a few chunks
                    pos = np.arange(0, max(start - 6, 0), 4)
                    pos = pos[pos >= max(start - 6 - 16, 0)]
                    if len(pos):
                        await peers.send(P.ValueChunk(request_id=rid, positions=pos.astype(np.int32),
                                                      values=v_slots[pos // 4].astype(np.float32), critic_version=0))
                    start += n
                pos = np.arange(0, 256, 4)
                await peers.send(P.ValueChunk(request_id=rid, positions=pos.astype(np.int32),
                                              values=v_slots[pos // 4].astype(np.float32), critic_version=0))
                cancel = await peers.cancel(timeout=30)
                assert cancel.request_id == rid and cancel.stop_index == expected
        finally:
            peers.close()


async def test_a_token_batch_triggers_the_same_cancels_as_its_chunks(stopper):
    """The same streams sent once as one TokenChunk per request per step and once as one
    TokenBatch per step (request ids prefixed "b-"): the same cancels, at the same indices, which
    are the pure rule's; the streams that never go wrong are never cancelled."""
    h, peers = stopper
    rng = np.random.default_rng(7)
    n_tokens, calm = 40, {"s0": 5, "s1": 12, "s2": 40, "s3": 20, "s4": 40, "s5": 2}  # 40: never goes wrong
    regrets = {rid: np.concatenate([rng.exponential(0.05, c), rng.exponential(3.0, n_tokens - c)]).astype(np.float32)
               for rid, c in calm.items()}
    expected = {}
    for rid, g in regrets.items():
        t = first_stop(torch.tensor(g).double(), torch.full((n_tokens,), 0.1, dtype=torch.float64), mu=0.0, var=1.0,
                       c=5.0, delta=1e-4, alpha_s=0.9, beta=7.0, eps=0.2)
        if t is not None:
            expected[rid] = t
    assert set(expected) == {"s0", "s1", "s3", "s5"}
    # Steps of 1 to 3 tokens per stream (streams of one step differ in length).
    steps, pos = [], dict.fromkeys(calm, 0)
    while any(p < n_tokens for p in pos.values()):
        step = []
        for rid, p in pos.items():
            if p < n_tokens:
                n = min(int(rng.integers(1, 4)), n_tokens - p)
                step.append(chunk(rid, p, regrets[rid][p : p + n]))
                pos[rid] = p + n
        steps.append(step)
    sent = 0
    for prefix in ("", "b-"):
        for rid in calm:
            await peers.send(P.ValueChunk(request_id=prefix + rid, positions=np.arange(n_tokens, dtype=np.int32),
                                          values=np.full(n_tokens, 0.1, np.float32), critic_version=0))
            sent += 1
    for step in steps:
        for c in step:
            await peers.send(c)
        await peers.send(P.TokenBatch.from_chunks([msgspec.structs.replace(c, request_id="b-" + c.request_id)
                                                   for c in step]))
        sent += len(step) + 1
    cancels = [await peers.cancel() for _ in range(2 * len(expected))]
    got_chunks = {c.request_id: c.stop_index for c in cancels if not c.request_id.startswith("b-")}
    got_batches = {c.request_id.removeprefix("b-"): c.stop_index for c in cancels if c.request_id.startswith("b-")}
    assert got_chunks == expected and got_batches == expected
    # Everything was handled and nothing else fired.
    hb = await h.wait_heartbeat(lambda hb: hb.counters.get("stream_messages") == sent)
    assert hb.counters["cancels_sent"] == 2 * len(expected) and hb.counters["streams"] == 2 * len(calm)
    assert hb.counters.get("handler_errors", 0) == 0 and hb.counters.get("streams_with_gaps", 0) == 0
