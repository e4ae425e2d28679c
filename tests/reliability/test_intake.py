"""What a stranger on the run's sockets can no longer do (docs/reliability.md, "Strangers"):

* take work and sit on it: work is reclaimed from any peer on the work socket that goes silent,
  known or not (the run used to stall forever);
* have the learner train what the coordinator never issued: a trajectory is taken only if its
  tag proves that this run's coordinator issued its work (forged groups, complete or not, used
  to take the place of real ones and stayed in the write-ahead log for good);
* make the learner's evaluation intake raise with a hostile round id.

Real actor processes over real sockets; every wait has a timeout, nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json

import msgspec
import numpy as np
import zmq
import zmq.asyncio

import protocols as P
from espo_async.config import parse_config
from espo_async.runtime.harness import ActorHarness
from tests.reliability.test_bad_input import (
    assets,
    broadcast_until,
    first_work_after_boundary,
    learner_config,
    no_crash,
    tagged,
    tokenizer,  # noqa: F401 - fixture
    trajectory,
    until,
)
from tests.runtime.system import received


def coordinator_config(timeout_s: float):
    return parse_config({
        "task": {"name": "arithmetic", "options": {"n_steps": 3}},
        "run": {"total_steps": 5},
        "rollout": {"samples_per_prompt": 2, "prompts_per_batch": 1, "max_tokens": 40, "staleness": 1},
        "transport": {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": timeout_s},
    })


async def test_a_strangers_work_request_is_reclaimed_when_it_goes_silent(tmp_path, tiny_model_dir):
    """One work request from a peer nobody started gets work; the peer never answers again. The
    coordinator calls it lost after transport.heartbeat_timeout_s and issues its work again to a
    real sampler (next attempt). Before: the work was never issued again and the run stalled."""
    timeout_s = 1.5
    async with ActorHarness(coordinator_config(timeout_s), tmp_path, "coordinator", binds=["broadcast"],
                            assets=assets(tiny_model_dir)) as h:
        await h.start()
        ctx = zmq.asyncio.Context()
        stranger = ctx.socket(zmq.DEALER)  # no routing id of its own: libzmq makes one up
        sampler = ctx.socket(zmq.DEALER)
        sampler.setsockopt(zmq.ROUTING_ID, b"sampler-0")
        for s in (stranger, sampler):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(h.addresses["work"])
        alive = None
        try:
            await stranger.send(P.encode(P.WorkRequest(sampler="not-a-sampler", free_slots=2, policy_version=0)))
            first = await first_work_after_boundary(h, stranger)  # the learner speaks: work flows to the stranger
            async with asyncio.timeout(10):
                second = P.decode(await stranger.recv())
            taken = {first.request_id, second.request_id}
            assert all(isinstance(m, P.PromptWork) and m.attempt == 0 for m in (first, second))

            # A real sampler: asks for work, keeps saying it is alive (as every sampler does).
            async def keep_alive():
                while True:
                    await sampler.send(P.encode(P.WorkRequest(sampler="sampler-0", free_slots=0, policy_version=0)))
                    await asyncio.sleep(0.1)  # the sampler's periodic liveness request, not synchronisation

            await sampler.send(P.encode(P.WorkRequest(sampler="sampler-0", free_slots=4, policy_version=0)))
            alive = asyncio.create_task(keep_alive())
            got: dict[str, P.PromptWork] = {}
            async with asyncio.timeout(timeout_s + 30):
                while not taken <= set(got):
                    msg = P.decode(await sampler.recv())
                    if isinstance(msg, P.PromptWork):
                        got[msg.request_id] = msg
            for rid in taken:  # the stranger's work, issued again
                assert got[rid].attempt == 1 and got[rid].tag != first.tag
            hb = await until(h, lambda c: c.get("samplers_silent", 0) >= 1 and c.get("reissued_after_loss", 0) >= 2,
                             "the stranger called lost")
            no_crash(h, hb)
        finally:
            if alive is not None:
                alive.cancel()
            ctx.destroy(linger=0)


async def test_the_learner_takes_only_work_the_coordinator_issued(tmp_path, tiny_model_dir, tokenizer):
    """Forged trajectories (untagged, a tag from another run, a real tag on altered identity or
    prompt), a forged complete group and a forged incomplete one, an over-long prompt, and
    evaluation trajectories with hostile round ids: each dropped and counted, none in the
    write-ahead log; the one issued group is trained, and trained.jsonl names exactly it."""
    base = learner_config()
    # A frame under transport.max_frame_bytes can claim more prompt than the run allows.
    cfg = base.model_copy(update={"rollout": base.rollout.model_copy(update={"max_prompt_tokens": 256})})
    async with ActorHarness(cfg, tmp_path, "learner", binds=[], assets=assets(tiny_model_dir)) as h:
        await h.start(timeout=240)
        ctx = zmq.asyncio.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(h.addresses["results"])
        try:
            real = [tagged(tmp_path, trajectory(tokenizer, i)) for i in range(2)]
            other_run = msgspec.structs.replace(real[0], tag=bytes(32))
            forged = [
                trajectory(tokenizer, 0, request_id="g7/x#0", prompt_id="g7/x"),  # a complete group, untagged
                trajectory(tokenizer, 1, request_id="g7/x#1", prompt_id="g7/x"),
                trajectory(tokenizer, 0, request_id="g8/y#0", prompt_id="g8/y"),  # an incomplete group
                other_run,  # a tag, but not this run's
                msgspec.structs.replace(real[1], attempt=5),  # a real tag on another attempt
                msgspec.structs.replace(real[1], prompt_token_ids=real[1].prompt_token_ids[::-1].copy()),  # altered prompt
                msgspec.structs.replace(real[1], prompt_id="g9/z", request_id="g9/z#1"),  # a real tag, another group
            ]
            hostile_eval = [
                trajectory(tokenizer, 0, purpose="eval", prompt_id="e\u00b2/x", request_id="e\u00b2/x#0"),
                trajectory(tokenizer, 0, purpose="eval", prompt_id="e" + "9" * 5000 + "/x",
                           request_id="e" + "9" * 5000 + "/x#0"),
            ]
            too_long = tagged(tmp_path, trajectory(tokenizer, 0, prompt_token_ids=np.ones(
                cfg.rollout.max_prompt_tokens + 1, np.int32)))
            for t in (*forged, *hostile_eval, too_long):
                await push.send(P.encode(t))
            # The hostile evaluation ids, tagged (a coordinator would never issue them): no exception either.
            for t in hostile_eval:
                await push.send(P.encode(tagged(tmp_path, t)))
            n_bad = len(forged) + 2 * len(hostile_eval) + 1
            hb = await until(h, lambda c: c.get("rejected_trajectories", 0) == len(forged) + len(hostile_eval) + 1
                             and c.get("eval_unexpected", 0) == len(hostile_eval), f"{n_bad} bad trajectories dropped")
            assert hb.counters["unissued_trajectories"] == len(forged) + len(hostile_eval)
            assert hb.counters.get("received", 0) == 0 and hb.counters["buffered_groups"] == 0
            no_crash(h, hb)
            for t in real:
                await push.send(P.encode(t))
            hb = await until(h, lambda c: c.get("step", 0) >= 1, "learner step 1", timeout=240)
            no_crash(h, hb)
            assert hb.counters["received"] == 2
        finally:
            push.close()
            ctx.destroy(linger=0)
    assert [(t.prompt_id, t.sample_index) for t in received(tmp_path)] == [(t.prompt_id, t.sample_index) for t in real]
    steps = [json.loads(line) for line in (tmp_path / "trained.jsonl").read_text().splitlines()]
    assert steps[0]["step"] == 1
    assert sorted(map(tuple, steps[0]["samples"])) == [(real[0].prompt_id, 0, 0), (real[0].prompt_id, 1, 0)]
