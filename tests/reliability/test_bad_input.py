"""Bad input fed to real actor processes over real ZeroMQ sockets: each is counted (and logged),
never a crash, and the actor goes on doing its job afterwards.

tests/runtime already shows: garbage and stream gaps at the stopper
(test_stopper_process.py::test_missing_values_mean_no_stop_and_garbage_is_counted), a cancel
for an unknown request and a second cancel after an absorbed end at the sampler
(test_sampler_process.py::test_cancel_aborts_in_flight_...). This file covers the rest of
docs/reliability.md's bad-input table. Every wait has a timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio

import msgpack
import msgspec
import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

import protocols as P
from espo_async.config import parse_config
from espo_async.core import first_stop
from espo_async.runtime.metrics import read_metrics
from protocols.messages import Received
from espo_async.runtime.harness import ActorHarness
from tests.runtime.test_sampler_process import BINDS as SAMPLER_BINDS
from tests.runtime.test_sampler_process import _assets, work_for
from tests.runtime.test_stopper_process import Peers, chunk

MAX_FRAME = 64 * 1024  # transport.max_frame_bytes in these tests: a bigger frame is "oversized"

# Frames no decoder accepts, each a different way to be wrong.
GARBAGE = {
    "malformed msgpack": b"\xc1\xc1\xc1",
    "truncated envelope": b"\x93\x01",
    "wrong schema version": msgpack.packb([P.SCHEMA_VERSION + 98, "stream_end", ["r", "s", "finished", 3]]),
    "unknown kind": msgpack.packb([P.SCHEMA_VERSION, "reboot", []]),
    "invalid body": msgpack.packb([P.SCHEMA_VERSION, "token_chunk", ["r"]]),
}


def assets(model_dir: str) -> dict:
    return {"policy_dir": model_dir, "critic_dir": model_dir, "critic_from_policy": True}


def oversized_frame() -> bytes:
    return P.encode(P.Shutdown(reason="x" * (MAX_FRAME + 1)))


async def until(h: ActorHarness, predicate, what: str, timeout: float = 60.0) -> P.Heartbeat:
    try:
        return await h.wait_heartbeat(lambda hb: predicate(hb.counters), timeout)
    except TimeoutError:
        last = h.heartbeats[-1].counters if h.heartbeats else {}
        raise AssertionError(f"timed out waiting for {what}; last counters: {last}") from None


async def broadcast_until(h: ActorHarness, msg: P.Message, predicate, what: str, timeout: float = 60.0) -> P.Heartbeat:
    """PUB/SUB may lose a message sent before the subscription is in place: re-send (as the
    learner does) until a heartbeat shows its effect."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await h.send("broadcast", msg)
                hb = await h.wait_heartbeat(lambda hb: True, fresh_only=True)
                if predicate(hb.counters):
                    return hb
    except TimeoutError:
        last = h.heartbeats[-1].counters if h.heartbeats else {}
        raise AssertionError(f"timed out waiting for {what}; last counters: {last}") from None


async def first_work_after_boundary(h: ActorHarness, sock, timeout: float = 60.0) -> P.Message:
    """The learner's first BatchBoundary, re-sent (PUB/SUB may lose it, as the learner knows)
    until the coordinator's first frame reaches ``sock``; returns that frame."""
    async with asyncio.timeout(timeout):
        while True:
            await h.send("broadcast", boundary(step=0, version=0, groups=0))
            try:
                async with asyncio.timeout(0.3):
                    return P.decode(await sock.recv())
            except TimeoutError:
                continue


def no_crash(h: ActorHarness, hb: P.Heartbeat) -> None:
    assert h.proc.poll() is None, h.output()[-3000:]
    assert hb.status == "running"
    assert hb.counters.get("handler_errors", 0) == 0, h.output()[-3000:]


# -- stopper ----------------------------------------------------------------------------------


def stopper_config():
    return parse_config({
        "stop": {"policy": "espo", "warmup": {"enabled": False}},
        "rollout": {"max_tokens": 64},
        "transport": {"heartbeat_interval_s": 0.1, "max_frame_bytes": MAX_FRAME, "stream_ttl_s": 4.0},
    })


def values(rid: str, positions, vals) -> P.ValueChunk:
    return P.ValueChunk(request_id=rid, positions=np.asarray(positions, np.int32),
                        values=np.asarray(vals, np.float32), critic_version=0)


async def test_stopper_counts_every_bad_input_and_still_stops_exactly(tmp_path, tiny_model_dir):
    async with ActorHarness(stopper_config(), tmp_path, "stopper", binds=["broadcast"],
                            assets=assets(tiny_model_dir)) as h:
        await h.start()
        peers = Peers(h)
        try:
            # Undecodable frames of every kind, and a valid message that has no business here.
            for frame in GARBAGE.values():
                await peers.push.send(frame)
            await peers.send(P.Heartbeat(actor="x", role="x", pid=1, seq=1, time=0.0, status="running"))
            await until(h, lambda c: c.get("wire.bad_frames") == len(GARBAGE) and c.get("unexpected_messages") == 1,
                        "bad frames counted")

            # A stop snapshot with non-finite parameters from the broadcast: ignored, the old one stays.
            nan_snapshot = boundary(step=1, version=1, groups=0)
            nan_snapshot.stop = msgspec.structs.replace(nan_snapshot.stop, beta=float("nan"), mu=float("inf"))
            hb = await broadcast_until(h, nan_snapshot, lambda c: c.get("bad_snapshots", 0) >= 1, "the NaN snapshot")
            assert hb.counters["beta"] == 7.0

            # An oversized frame: libzmq drops the sender's connection before reading it.
            big = peers.ctx.socket(zmq.PUSH)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(h.addresses["stopper_stream"])
            await big.send(oversized_frame())
            await until(h, lambda c: c.get("wire.peer_disconnects", 0) >= 1, "the oversized frame's sender dropped")
            big.close()

            # NaN / inf logprobs: counted; no evidence is no regret, so no stop on them.
            bad = chunk("nan-logprobs", 0, np.full(20, 5.0, np.float32))
            bad.logprobs[:10] = np.nan
            bad.logprobs[10:] = -np.inf  # regret +inf
            bad.top1_logprobs[15:] = np.inf  # and inf - inf = nan
            await peers.send(bad)
            await peers.send(values("nan-logprobs", range(20), np.zeros(20)))
            # NaN / inf values: counted and dropped; a state without a value is never judged.
            await peers.send(chunk("nan-values", 0, np.full(20, 5.0, np.float32)))  # would stop at once
            await peers.send(values("nan-values", range(20), [np.nan] * 10 + [np.inf] * 5 + [-np.inf] * 5))
            # Unknown request ids: an end nobody started (twice), values for a stream never seen.
            for _ in range(2):
                await peers.send(P.StreamEnd(request_id="ghost", sampler_id="sampler-0", ending="finished", n_tokens=3))
            await peers.send(values("phantom", [0, 1], [0.1, 0.1]))
            # Out-of-range values, a stream longer than rollout.max_tokens, a chunk of a stream whose
            # beginning we never saw.
            await peers.send(chunk("long", 0, np.zeros(40, np.float32)))
            await peers.send(values("long", [-5, 65, 10_000], [0.1, 0.1, 0.1]))
            await peers.send(chunk("long", 40, np.zeros(40, np.float32)))
            await peers.send(chunk("late", 7, np.zeros(3, np.float32)))
            hb = await until(h, lambda c: c.get("values_out_of_range") == 3 and c.get("streams_too_long") == 1
                             and c.get("non_finite_values") == 20 and c.get("end_unknown") == 2
                             and c.get("values_before_stream") == 1 and c.get("streams_joined_late") == 1,
                             "every bad input counted")
            assert hb.counters["non_finite_logprobs"] == 20
            assert hb.counters.get("cancels_sent", 0) == 0, "a stop was decided on bad numbers"

            # A stream whose end never comes is forgotten after transport.stream_ttl_s.
            hb = await until(h, lambda c: c.get("streams_expired") == 3 and c.get("live_streams") == 0,
                             "idle streams forgotten")
            no_crash(h, hb)

            # The stopper still does its job, exactly: the pure rule's index.
            rng = np.random.default_rng(1)
            regrets = np.concatenate([rng.exponential(0.05, 8), rng.exponential(3.0, 40)])
            expected = first_stop(torch.tensor(regrets, dtype=torch.float32).double(), torch.full((48,), 0.1,
                                  dtype=torch.float64), mu=0.0, var=1.0, c=5.0, delta=1e-4, alpha_s=0.9, beta=7.0,
                                  eps=0.2)
            await peers.send(chunk("good", 0, regrets.astype(np.float32)))
            await peers.send(values("good", range(48), np.full(48, 0.1)))
            cancel = await peers.cancel(timeout=30)
            assert cancel.request_id == "good" and cancel.stop_index == expected
            # A stop for a sampler that is not connected is counted, not fatal.
            await peers.send(chunk("orphan", 0, regrets.astype(np.float32), sampler="sampler-9"))
            await peers.send(values("orphan", range(48), np.full(48, 0.1)))
            hb = await until(h, lambda c: c.get("cancels_unroutable") == 1, "the unroutable cancel counted")
            no_crash(h, hb)
        finally:
            peers.close()
        assert await h.stop() == 0, h.output()[-3000:]


# -- sampler ----------------------------------------------------------------------------------


def sampler_config(**options):
    opts = {"max_concurrency": 2, "chunk_tokens": 1, **options}
    return parse_config({
        "task": {"name": "arithmetic", "options": {"n_steps": 3}},
        "rollout": {"max_tokens": 40, "samples_per_prompt": 2},
        "actors": {"sampler": {"class": "actors.samplers.fake:FakeSampler", "options": opts}},
        "transport": {"heartbeat_interval_s": 0.1, "max_frame_bytes": MAX_FRAME},
    })


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def test_sampler_rejects_bad_work_and_bad_cancels_and_goes_on(tmp_path, tiny_model_dir, tokenizer):
    cfg = sampler_config(p_bad=1.0, tokens_per_s=40.0, fail_at=(0.0, 0.0))
    async with ActorHarness(cfg, tmp_path, "sampler-0", binds=SAMPLER_BINDS, assets=_assets(tiny_model_dir)) as h:
        await h.start()
        ident, msg = await h.recv_routed("work", timeout=30)
        assert isinstance(msg, P.WorkRequest) and msg.free_slots == 2
        # Garbage where work and cancels come from.
        for frame in GARBAGE.values():
            await h.socks["work"].send_multipart([ident, frame])
            await h.socks["stopper_cancel"].send_multipart([ident, frame])
        await until(h, lambda c: c.get("wire.bad_frames") == 2 * len(GARBAGE), "bad frames counted")

        # Decodable but impossible work: never generated, the slot is given back at once.
        work, _, _ = work_for(tokenizer, 0, 0)
        for bad in (
            P.PromptWork(**{**_fields(work), "request_id": "too-long", "max_tokens": 10_000}),
            P.PromptWork(**{**_fields(work), "request_id": "nan-temp", "temperature": float("nan")}),
            P.PromptWork(**{**_fields(work), "request_id": "zero-top-p", "top_p": 0.0}),
        ):
            await h.send_to("work", ident, bad)
        for _ in range(3):
            (_, again), _ = await h.recv_until("work", lambda m: isinstance(m, P.WorkRequest), routed=True, timeout=30)
            assert again.free_slots == 1
        await until(h, lambda c: c.get("work_rejected") == 3 and c.get("tokens_generated", 0) == 0, "work rejected")

        # Duplicate cancels of a live request, and one past the tokens that exist: the first
        # valid cancel wins, the others are counted.
        await h.send_to("work", ident, work)
        seen = 0
        while seen < 8:
            c = await h.recv("stopper_stream", timeout=30)
            seen += len(c.token_ids)
        owner = c.sampler_id.encode()
        cancel = P.Cancel(request_id=work.request_id, sampler_id="sampler-0", stop_index=3)
        await h.send_to("stopper_cancel", owner, P.Cancel(request_id=work.request_id, sampler_id="sampler-0",
                                                          stop_index=39))
        await h.send_to("stopper_cancel", owner, cancel)
        await h.send_to("stopper_cancel", owner, P.Cancel(request_id=work.request_id, sampler_id="sampler-0",
                                                          stop_index=1))
        traj = await h.recv("results", timeout=30)
        assert traj.ending == "absorbed" and traj.stop_index == 3 and len(traj.token_ids) == 4
        await until(h, lambda c: c.get("cancels") == 1 and c.get("cancel_duplicate") == 1
                    and c.get("cancel_out_of_range") == 1, "duplicate and out-of-range cancels counted")

        # A cancel that arrives after the request finished by itself: the trajectory keeps the
        # ending that really happened; nothing is sent twice.
        short, _, _ = work_for(tokenizer, 1, 1, max_tokens=5)
        await h.send_to("work", ident, short)
        traj = await h.recv("results", timeout=30)
        assert traj.request_id == short.request_id and traj.ending == "truncated" and traj.stop_index == -1
        await h.send_to("stopper_cancel", owner, P.Cancel(request_id=short.request_id, sampler_id="sampler-0",
                                                          stop_index=2))
        hb = await until(h, lambda c: c.get("cancel_after_end") == 1, "the late cancel counted")
        with pytest.raises(TimeoutError):
            await h.recv("results", timeout=1.0)
        no_crash(h, hb)

        # Still working: a good request runs to its natural end.
        good, _, _ = work_for(tokenizer, 2, 0, max_tokens=6)
        await h.send_to("work", ident, good)
        traj = await h.recv("results", timeout=30)
        assert traj.request_id == good.request_id and len(traj.token_ids) == 6
        assert await h.stop() == 0, h.output()[-3000:]


def _fields(msg) -> dict:
    return {f: getattr(msg, f) for f in msg.__struct_fields__}


# -- coordinator ------------------------------------------------------------------------------


def coordinator_config():
    return parse_config({
        "task": {"name": "arithmetic", "options": {"n_steps": 3}},
        "run": {"total_steps": 5},
        "rollout": {"samples_per_prompt": 2, "prompts_per_batch": 1, "max_tokens": 40, "staleness": 1},
        "transport": {"heartbeat_interval_s": 0.1, "max_frame_bytes": MAX_FRAME},
    })


def boundary(step: int, version: int, groups: int, epoch: str = "e1", **stop) -> P.BatchBoundary:
    params = P.StopParams(kind="espo", enabled=True, mu=0.0, var=1.0, c=5.0, delta=1e-4, alpha_s=0.9, beta=7.0,
                          eps=0.2, step=step, **stop)
    return P.BatchBoundary(step=step, policy_version=version, total_steps=5, stop=params, n_trajectories=0,
                           stop_rate=0.0, regret_mean=0.0, regret_var=1.0, regret_count=0, critic_loss=0.0,
                           groups_consumed=groups, epoch=epoch)


async def test_coordinator_ignores_bad_reports_and_keeps_handing_out_work(tmp_path, tiny_model_dir):
    async with ActorHarness(coordinator_config(), tmp_path, "coordinator", binds=["broadcast"],
                            assets=assets(tiny_model_dir)) as h:
        await h.start()
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, b"sampler-0")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(h.addresses["work"])
        try:
            async def send(msg):
                await dealer.send(msg if isinstance(msg, bytes) else P.encode(msg))

            # A sampler that claims a million free slots is capped.
            await send(P.WorkRequest(sampler="sampler-0", free_slots=1_000_000, policy_version=0))
            await until(h, lambda c: c.get("credits_capped") == 1, "the credit claim capped")
            # An implausible learner boundary is ignored (no work before a plausible one).
            hb = await broadcast_until(h, boundary(step=10**6, version=3, groups=10**9),
                                       lambda c: c.get("implausible_boundaries", 0) >= 1, "the implausible boundary")
            assert hb.counters["outstanding"] == 0 and hb.counters["learner_version"] == 0

            # Then the learner speaks (re-sent: PUB/SUB), and work flows.
            first = await first_work_after_boundary(h, dealer)
            assert isinstance(first, P.PromptWork)

            # Garbage, wrong versions, a 3-part message, an oversized frame.
            for frame in GARBAGE.values():
                await send(frame)
            await dealer.send_multipart([b"a", b"b"])  # the ROUTER sees three parts
            await until(h, lambda c: c.get("wire.bad_frames") == len(GARBAGE) + 1, "bad frames counted")
            big = ctx.socket(zmq.DEALER)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(h.addresses["work"])
            await big.send(oversized_frame())
            await until(h, lambda c: c.get("wire.peer_disconnects", 0) >= 1, "the oversized frame's sender dropped")
            big.close()

            # Reports about requests nobody issued, twice; a report from a sampler that does not
            # own the request; a duplicate report; an evaluation request with NaN temperature.
            for _ in range(2):
                await send(P.WorkDone(sampler_id="sampler-0", request_id="g99/nope#0", ending="finished", n_tokens=3))
            other = ctx.socket(zmq.DEALER)
            other.setsockopt(zmq.ROUTING_ID, b"sampler-7")
            other.setsockopt(zmq.LINGER, 0)
            other.connect(h.addresses["work"])
            await other.send(P.encode(P.WorkDone(sampler_id="sampler-7", request_id=first.request_id,
                                                 ending="finished", n_tokens=3)))
            for _ in range(2):
                await send(P.WorkDone(sampler_id="sampler-0", request_id=first.request_id, ending="finished",
                                      n_tokens=3))
            await broadcast_until(h, P.EvalRequest(round=1, policy_version=0, n_problems=2, samples=1,
                                                   temperature=float("nan"), max_tokens=10),
                                  lambda c: c.get("eval_requests_rejected") == 1, "the NaN evaluation request")
            hb = await until(h, lambda c: c.get("done_unknown") == 2 and c.get("done_by_previous_owner") == 1
                             and c.get("done_duplicate") == 1 and c.get("done.finished") == 1, "bad reports counted")
            no_crash(h, hb)
            other.close()

            # The learner acknowledges: the request is finished for good; more work flows.
            hb = await broadcast_until(h, Received(request_ids=[first.request_id, "never-issued"], epoch="e1"),
                                       lambda c: c.get("acknowledged") == 1, "the acknowledgement")
            assert hb.counters["unacknowledged"] == 0
            await send(P.WorkRequest(sampler="sampler-0", free_slots=1, policy_version=0))
            async with asyncio.timeout(30):
                nxt = P.decode(await dealer.recv())
            assert isinstance(nxt, P.PromptWork) and nxt.request_id != first.request_id
        finally:
            dealer.close()
            ctx.destroy(linger=0)
        assert await h.stop() == 0, h.output()[-3000:]


# -- learner ----------------------------------------------------------------------------------


def learner_config():
    return parse_config({
        "run": {"name": "t", "total_steps": 2, "tensorboard": False, "progress": False},
        "model": {"policy": "tiny"},
        "task": {"name": "arithmetic", "options": {"n_steps": 3}, "eval_problems": 0},
        "rollout": {"samples_per_prompt": 2, "prompts_per_batch": 1, "max_tokens": 16},
        "stop": {"policy": "espo", "warmup": {"enabled": False}},
        "actors": {"critic": {"class": "actors.critics.fake:FakeCritic", "options": {"value": 0.1}}},
        "transport": {"heartbeat_interval_s": 0.1, "max_frame_bytes": MAX_FRAME},
    })


def tagged(run_dir, traj: P.Trajectory) -> P.Trajectory:
    """``traj`` with the tag this run's coordinator would have given its work (the test plays the
    coordinator: the learner takes only issued work)."""
    from espo_async.ids import work_tag
    from espo_async.runtime.keys import run_key

    tag = work_tag(run_key(run_dir), request_id=traj.request_id, prompt_id=traj.prompt_id,
                   sample_index=traj.sample_index, group_size=traj.group_size, attempt=traj.attempt,
                   purpose=traj.purpose, prompt_token_ids=traj.prompt_token_ids[:len(traj.prompt_token_ids) - traj.offset])
    return msgspec.structs.replace(traj, tag=tag)


def trajectory(tokenizer, sample: int, *, logprobs=None, **over) -> P.Trajectory:
    from espo_async.tasks.registry import make_task

    task = make_task("arithmetic", n_steps=3)
    problem = task.train_problems()[0]
    prompt = np.asarray(tokenizer.encode(task.format_prompt(problem)), np.int32)
    ids = np.asarray(tokenizer.encode(task.solution(problem), add_special_tokens=False)[:8], np.int32)
    n = len(ids)
    lp = np.full(n, -0.5, np.float32) if logprobs is None else np.asarray(logprobs, np.float32)
    fields = dict(request_id=f"g0/{problem.id}#{sample}", prompt_id=f"g0/{problem.id}", sample_index=sample,
                  group_size=2, sampler_id="sampler-0", prompt_token_ids=prompt, token_ids=ids, logprobs=lp,
                  top1_logprobs=np.full(n, -0.1, np.float32), versions=np.zeros(n, np.int32), ending="truncated",
                  finish_reason="length", tokens_generated=n, text="")
    fields.update(over)
    return P.Trajectory(**fields)


async def test_learner_rejects_impossible_trajectories_and_trains_through_nan_logprobs(
    tmp_path, tiny_model_dir, tokenizer
):
    async with ActorHarness(learner_config(), tmp_path, "learner", binds=[], assets=assets(tiny_model_dir)) as h:
        await h.start(timeout=240)
        ctx = zmq.asyncio.Context()
        push = ctx.socket(zmq.PUSH)
        sub = ctx.socket(zmq.SUB)
        for s in (push, sub):
            s.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        push.connect(h.addresses["results"])
        sub.connect(h.addresses["broadcast"])
        try:
            for frame in GARBAGE.values():
                await push.send(frame)
            await push.send(P.encode(P.Shutdown(reason="not from a sampler")))  # wrong kind here: ignored
            n = 8
            for bad in (
                trajectory(tokenizer, 5),  # sample index outside its group
                trajectory(tokenizer, 0, group_size=3, sample_index=0),  # group size differs from the config
                trajectory(tokenizer, 0, token_ids=np.full(n, 10**7, np.int32)),  # outside the vocabulary
            ):
                await push.send(P.encode(tagged(tmp_path, bad)))
            await until(h, lambda c: c.get("rejected_trajectories") == 3 and c.get("wire.bad_frames") == len(GARBAGE)
                        and c.get("unexpected_messages") == 1, "bad trajectories rejected", timeout=60)
            # A complete group with NaN and infinite behaviour logprobs: counted, trained on (the
            # trainer gives those tokens importance weight 1); the same sample twice is taken once.
            lp = np.array([np.nan, -np.inf, np.inf, -0.5, -0.5, -0.5, -0.5, -0.5], np.float32)
            for sample in (0, 0, 1):
                await push.send(P.encode(tagged(tmp_path, trajectory(tokenizer, sample, logprobs=lp))))
            hb = await until(h, lambda c: c.get("step", 0) >= 1, "learner step 1", timeout=240)
            assert hb.counters["non_finite_logprobs"] == 9  # 3 per trajectory received (the duplicate too)
            assert hb.counters["duplicates"] == 1 and hb.counters["received"] == 2
            no_crash(h, hb)
            async with asyncio.timeout(30):
                while True:
                    msg = P.decode(await sub.recv())
                    if isinstance(msg, P.BatchBoundary) and msg.step == 1:
                        break
            assert np.isfinite([msg.stop.mu, msg.stop.var, msg.stop.beta]).all()
            rows = read_metrics(tmp_path)
            assert rows and all(np.isfinite(rows[-1][k]) for k in ("policy_loss", "critic_loss", "kl"))
        finally:
            push.close()
            sub.close()
            ctx.destroy(linger=0)


# -- critic -----------------------------------------------------------------------------------


def critic_config():
    return parse_config({
        "actors": {"critic": {"class": "actors.critics.hf:HFCritic", "options": {"max_batch": 8}}},
        "rollout": {"max_tokens": 32},
        "stop": {"value_interval": 1},
        "transport": {"heartbeat_interval_s": 0.1, "max_frame_bytes": MAX_FRAME},
    })


async def test_critic_isolates_a_stream_it_cannot_embed(tmp_path, tiny_model_dir):
    """Token ids outside the critic's vocabulary break only their own stream: the streams that
    share its batch still get their values."""
    async with ActorHarness(critic_config(), tmp_path, "critic", binds=["stopper_stream", "broadcast"],
                            assets=assets(tiny_model_dir)) as h:
        await h.start(timeout=120)
        ctx = zmq.asyncio.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(h.addresses["critic_stream"])
        try:
            for frame in GARBAGE.values():
                await push.send(frame)
            bad_prompt = chunk("bad-prompt", 0, np.zeros(4, np.float32))
            bad_prompt.prompt_token_ids = np.array([1, 10**6, 5], np.int32)
            bad_tokens = chunk("bad-tokens", 0, np.zeros(4, np.float32))
            bad_tokens.token_ids = np.array([4, 5, -3, 6], np.int32)
            for msg in (chunk("good", 0, np.zeros(4, np.float32)), bad_prompt, bad_tokens,
                        chunk("too-long", 0, np.zeros(30, np.float32)), chunk("too-long", 30, np.zeros(5, np.float32)),
                        chunk("good", 4, np.zeros(4, np.float32)),
                        P.StreamEnd(request_id="ghost", sampler_id="sampler-0", ending="finished", n_tokens=1)):
                await push.send(P.encode(msg))
            got: dict[str, list[int]] = {}
            async with asyncio.timeout(60):
                while len(got.get("good", [])) < 9:  # V(s_0) .. V(s_8)
                    msg = await h.recv("stopper_stream", timeout=60)
                    got.setdefault(msg.request_id, []).extend(msg.positions.tolist())
                    assert np.isfinite(msg.values).all()
            assert sorted(got["good"]) == list(range(9))
            hb = await until(h, lambda c: c.get("tokens_out_of_vocab") == 2 and c.get("streams_too_long") == 1
                             and c.get("end_unknown") == 1 and c.get("wire.bad_frames") == len(GARBAGE),
                             "bad streams counted")
            assert "bad-prompt" not in got and "bad-tokens" not in got
            assert hb.counters.get("value_errors", 0) == 0
            no_crash(h, hb)
        finally:
            push.close()
            ctx.destroy(linger=0)
        assert await h.stop() == 0, h.output()[-3000:]
