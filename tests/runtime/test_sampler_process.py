"""A real sampler process over real sockets; the test plays coordinator, stopper, critic, learner."""

from __future__ import annotations

import numpy as np
import pytest

import protocols as P
from espo_async.config import parse_config
from espo_async.tasks.registry import make_task
from espo_async.runtime.harness import ActorHarness

BINDS = ["work", "stopper_stream", "critic_stream", "stopper_cancel", "results", "broadcast"]
TASK = {"name": "arithmetic", "options": {"n_steps": 3}}


def config(prefetch: int = 0, **sampler_options):
    opts = {"max_concurrency": 2, "chunk_tokens": 1}
    opts.update(sampler_options)
    return parse_config(
        {
            "task": TASK,
            "rollout": {"max_tokens": 40, "samples_per_prompt": 2, "prefetch": prefetch},
            "actors": {"sampler": {"class": "actors.samplers.fake:FakeSampler", "options": opts}},
            "transport": {"heartbeat_interval_s": 0.1},
        }
    )


def work_for(tokenizer, problem_index=0, sample=0, *, version=0, max_tokens=40):
    task = make_task(TASK["name"], **TASK["options"])
    problem = task.train_problems()[problem_index]
    ids = np.asarray(tokenizer.encode(task.format_prompt(problem)), dtype=np.int32)
    return (
        P.PromptWork(
            request_id=f"g0/{problem.id}#{sample}",
            prompt_id=f"g0/{problem.id}",
            sample_index=sample,
            group_size=2,
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            issued_at_version=version,
        ),
        task,
        problem,
    )


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def started(h: ActorHarness, slots: int = 2) -> bytes:
    await h.start()
    ident, msg = await h.recv_routed("work", timeout=30)
    assert isinstance(msg, P.WorkRequest) and msg.free_slots == slots
    return ident


async def announce_v1_until_a_result(h: ActorHarness) -> P.Message:
    """Announce policy version 1 until the sampler hands over a result (PUB/SUB may drop the
    first announcements; the learner repeats them too); that first result."""
    weights = P.WeightsAnnounced(model="policy", version=1, uri="file:///dev/null", sha256="", nbytes=0)
    while True:
        await h.send("broadcast", weights)
        try:
            return await h.recv("results", timeout=0.5)
        except TimeoutError:
            pass


def token_chunks(frames: list[P.Message]) -> list[P.TokenChunk]:
    """The per-request chunks of the token frames a sampler sent (each one a TokenBatch)."""
    assert all(isinstance(m, P.TokenBatch) for m in frames), [type(m).__name__ for m in frames]
    return [c for m in frames for c in m.chunks()]


async def test_good_rollout_streams_every_token_and_finishes(tmp_path, tiny_model_dir, tokenizer):
    async with ActorHarness(config(p_bad=0.0), tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir)) as h:
        ident = await started(h)
        work, task, problem = work_for(tokenizer)
        await h.send_to("work", ident, work)
        traj = await h.recv("results", timeout=30)
        assert isinstance(traj, P.Trajectory)
        assert traj.ending == "finished" and traj.finish_reason == "stop"
        assert traj.text == task.solution(problem)
        assert task.score(problem, traj.text) == 1.0
        assert traj.token_ids[-1] == tokenizer.eos_token_id
        assert (traj.versions == 0).all() and traj.stop_index == -1
        # Both streams got every token exactly once, in order, the prompt with the first chunk.
        for endpoint in ("stopper_stream", "critic_stream"):
            end, frames = await h.recv_until(endpoint, lambda m: isinstance(m, P.StreamEnd))
            chunks = token_chunks(frames)
            assert chunks[0].prompt_token_ids.tolist() == work.prompt_token_ids.tolist()
            assert all(c.prompt_token_ids is None for c in chunks[1:])
            assert [c.start for c in chunks] == list(np.cumsum([0] + [len(c.token_ids) for c in chunks[:-1]]))
            streamed = np.concatenate([c.token_ids for c in chunks])
            assert streamed.tolist() == traj.token_ids.tolist()
            assert end.ending == "finished" and end.n_tokens == len(traj.token_ids)
        # The slot comes back to the coordinator after the trajectory was handed over.
        msgs = [await h.recv_routed("work"), await h.recv_routed("work")]
        kinds = sorted(type(m).__name__ for _, m in msgs)
        assert kinds == ["WorkDone", "WorkRequest"]


async def test_cancel_aborts_in_flight_keeps_tokens_up_to_the_stop_and_frees_the_slot(
    tmp_path, tiny_model_dir, tokenizer
):
    cfg = config(p_bad=1.0, tokens_per_s=50.0, fail_at=(0.0, 0.0))
    async with ActorHarness(cfg, tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir)) as h:
        ident = await started(h)
        work, _, _ = work_for(tokenizer, max_tokens=40)
        await h.send_to("work", ident, work)
        seen = 0
        while seen < 10:
            (chunk,) = token_chunks([await h.recv("stopper_stream")])
            seen += len(chunk.token_ids)
        owner = chunk.sampler_id.encode()
        await h.send_to(
            "stopper_cancel", owner, P.Cancel(request_id=work.request_id, sampler_id=chunk.sampler_id, stop_index=5)
        )
        traj = await h.recv("results", timeout=10)
        assert traj.ending == "absorbed" and traj.stop_index == 5
        assert len(traj.token_ids) == 6 and traj.finish_reason == "abort"
        # The engine stopped within about one token of the cancel (at 50 tok/s, 40 would take 0.8 s).
        assert seen <= traj.tokens_generated <= seen + 2
        assert traj.tokens_generated < work.max_tokens
        (_, done), _ = await h.recv_until("work", lambda m: isinstance(m, P.WorkDone), routed=True)
        assert done.ending == "absorbed"
        (_, again), _ = await h.recv_until("work", lambda m: isinstance(m, P.WorkRequest), routed=True)
        assert again.free_slots == 1
        hb = await h.wait_heartbeat(lambda hb: hb.counters.get("cancels") == 1 and hb.counters.get("active") == 0)
        assert hb.counters["max_concurrency"] == 2

        # A second cancel of the same request, and one for a request nobody knows, are counted.
        await h.send_to("stopper_cancel", owner, P.Cancel(request_id=work.request_id, sampler_id="sampler-0", stop_index=5))
        await h.send_to("stopper_cancel", owner, P.Cancel(request_id="nope", sampler_id="sampler-0", stop_index=0))
        await h.wait_heartbeat(
            lambda hb: hb.counters.get("cancel_after_end") == 1 and hb.counters.get("cancel_unknown") == 1
        )


def test_token_buffer_makes_one_batch_of_its_requests_in_order():
    from actors.samplers.base import TokenBuffer

    buf = TokenBuffer()
    assert not buf and buf.take("sampler-0") is None
    f32, i32 = np.float32, np.int32
    buf.add("a", 0, np.array([7, 8], i32), np.array([-1, -2], f32), np.array([-.5, -.5], f32), np.array([3, 3], i32),
            np.array([1, 2, 3], i32))
    buf.add("b", 5, np.array([9], i32), np.array([-3], f32), np.array([-.5], f32), np.array([4], i32))
    assert "a" in buf and "b" in buf and "c" not in buf
    with pytest.raises(ValueError, match="already has tokens"):
        buf.add("a", 2, np.array([1], i32), np.zeros(1, f32), np.zeros(1, f32), np.zeros(1, i32))
    batch = P.decode(P.encode(buf.take("sampler-0")))
    assert not buf and "a" not in buf and buf.take("sampler-0") is None  # taken: empty again
    a, b = batch.chunks()
    assert (a.request_id, a.start, a.token_ids.tolist(), a.prompt_token_ids.tolist()) == ("a", 0, [7, 8], [1, 2, 3])
    assert a.logprobs.tolist() == [-1, -2] and a.versions.tolist() == [3, 3]
    assert (b.request_id, b.start, b.token_ids.tolist(), b.prompt_token_ids) == ("b", 5, [9], None)
    assert b.logprobs.tolist() == [-3] and b.versions.tolist() == [4]
    # Arrays that cannot make a batch: a ValueError, and the buffer is empty for the next step.
    buf.add("c", 0, np.array([1, 2], i32), np.zeros(1, f32), np.zeros(2, f32), np.zeros(2, i32))
    with pytest.raises(ValueError, match="equal lengths"):
        buf.take("sampler-0")
    assert not buf and "c" not in buf


async def test_one_token_batch_per_engine_step_for_many_concurrent_streams(tmp_path, tiny_model_dir, tokenizer):
    """16 streams generating in lockstep (the fake engine: one token per request per loop pass,
    all released at once by the weights they wait for): every engine step leaves as ONE frame
    per destination holding one token of every stream, and each StreamEnd follows its tokens."""
    n_streams, n_tokens = 16, 12
    cfg = config(max_concurrency=n_streams, p_bad=1.0)  # p_bad 1: no EOS, every stream runs to max_tokens
    async with ActorHarness(cfg, tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir)) as h:
        ident = await started(h, slots=n_streams)
        works = [work_for(tokenizer, i // 2, i % 2, version=1, max_tokens=n_tokens)[0] for i in range(n_streams)]
        for w in works:
            await h.send_to("work", ident, w)
        await h.wait_heartbeat(lambda hb: hb.counters.get("active") == n_streams)  # all waiting for v1
        first = await announce_v1_until_a_result(h)
        trajs = {t.request_id: t for t in [first] + [await h.recv("results", timeout=30) for _ in range(n_streams - 1)]}
        rids = [w.request_id for w in works]
        assert sorted(trajs) == sorted(rids)
        assert all(t.ending == "truncated" and len(t.token_ids) == n_tokens for t in trajs.values())
        for endpoint in ("stopper_stream", "critic_stream"):
            frames = [await h.recv(endpoint) for _ in range(n_tokens + n_streams)]
            batches, ends = frames[:n_tokens], frames[n_tokens:]
            # One frame per engine step; the StreamEnds after the last step's frame.
            assert all(isinstance(b, P.TokenBatch) for b in batches), [type(m).__name__ for m in frames]
            assert all(isinstance(e, P.StreamEnd) and e.n_tokens == n_tokens for e in ends)
            assert sorted(e.request_id for e in ends) == sorted(rids)
            for step, batch in enumerate(batches):
                assert batch.sampler_id == "sampler-0"
                assert sorted(batch.request_ids) == sorted(rids)  # every stream, once
                assert batch.starts.tolist() == [step] * n_streams and batch.lengths.tolist() == [1] * n_streams
                assert batch.prompt_lengths.all() if step == 0 else not batch.prompt_lengths.any()
            prompts = {c.request_id: c.prompt_token_ids for c in batches[0].chunks()}
            for w in works:
                assert prompts[w.request_id].tolist() == w.prompt_token_ids.tolist()
            for rid, traj in trajs.items():
                streamed = [c for c in token_chunks(batches) if c.request_id == rid]
                assert np.concatenate([c.token_ids for c in streamed]).tolist() == traj.token_ids.tolist()
                assert np.concatenate([c.logprobs for c in streamed]).tolist() == traj.logprobs.tolist()
                assert (np.concatenate([c.versions for c in streamed]) == 1).all()
        hb = await h.wait_heartbeat(lambda hb: hb.counters.get("trajectories") == n_streams)
        assert hb.counters["stream_batches"] == n_tokens and hb.counters.get("wire.stream_dropped", 0) == 0


async def test_rollout_that_hits_max_tokens_is_truncated(tmp_path, tiny_model_dir, tokenizer):
    async with ActorHarness(config(p_bad=1.0), tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir)) as h:
        ident = await started(h)
        work, _, _ = work_for(tokenizer, max_tokens=20)
        await h.send_to("work", ident, work)
        traj = await h.recv("results", timeout=30)
        assert traj.ending == "truncated" and traj.finish_reason == "length"
        assert len(traj.token_ids) == 20 == traj.tokens_generated


async def test_request_waits_for_the_version_it_was_issued_at(tmp_path, tiny_model_dir, tokenizer):
    async with ActorHarness(config(p_bad=0.0), tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir)) as h:
        ident = await started(h)
        work, _, _ = work_for(tokenizer, version=1)
        await h.send_to("work", ident, work)
        # It accepted the request but generates nothing while its weights are at version 0.
        hb = await h.wait_heartbeat(lambda hb: hb.counters.get("active") == 1)
        assert hb.counters.get("tokens_generated", 0) == 0 and hb.counters["policy_version"] == 0
        traj = await announce_v1_until_a_result(h)
        assert (traj.versions == 1).all()
        await h.wait_heartbeat(lambda hb: hb.counters.get("policy_version") == 1)


async def test_sigterm_stops_the_process_cleanly(tmp_path, tiny_model_dir):
    h = ActorHarness(config(), tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir))
    async with h:
        await started(h)
        code = await h.stop()
    assert code == 0, h.output()[-2000:]


def _assets(model_dir: str) -> dict:
    return {"policy_dir": model_dir, "critic_dir": model_dir, "critic_from_policy": True}


async def test_prefetch_holds_more_work_than_slots_and_runs_it_all(tmp_path, tiny_model_dir, tokenizer):
    """rollout.prefetch: the sampler asks for slots + prefetch items; the extra ones wait in the
    engine's queue and run as slots free; every item ends in a trajectory and frees one credit."""
    cfg = config(prefetch=2, max_concurrency=1, p_bad=0.0)
    async with ActorHarness(cfg, tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir)) as h:
        ident = await started(h, slots=3)
        works = [work_for(tokenizer, problem_index=i)[0] for i in range(3)]
        for w in works:
            await h.send_to("work", ident, w)
        got = [await h.recv("results", timeout=30) for _ in works]
        assert sorted(t.request_id for t in got) == sorted(w.request_id for w in works)
        assert all(t.ending == "finished" for t in got)
        credits = []
        while len(credits) < len(works):
            _, msg = await h.recv_routed("work", timeout=30)
            if isinstance(msg, P.WorkRequest):
                credits.append(msg.free_slots)
        assert credits == [1, 1, 1]


async def test_a_remote_sampler_names_its_session_and_answers_a_slots_query(tmp_path, tiny_model_dir):
    """On a host without the coordinator (cluster.roles) every work request names the process's
    session: the first one says hello, the periodic 0-slot ones are ordinary, and a SlotsQuery
    naming the sampler is answered with its free slots (intent slots). An ActorDown on the work
    socket asks nothing."""
    from protocols.messages import ActorDown

    cfg = parse_config(
        {
            "task": TASK,
            "rollout": {"max_tokens": 40, "samples_per_prompt": 2},
            "actors": {"sampler": {"class": "actors.samplers.fake:FakeSampler",
                                   "options": {"max_concurrency": 2, "chunk_tokens": 1}}},
            "transport": {"heartbeat_interval_s": 0.1},
            "cluster": {"roles": ["sampler"]},
        }
    )
    async with ActorHarness(cfg, tmp_path, "sampler-0", binds=BINDS, assets=_assets(tiny_model_dir)) as h:
        await h.start()
        ident, hello = await h.recv_routed("work", timeout=30)
        assert isinstance(hello, P.WorkRequest) and (hello.sampler, hello.intent, hello.free_slots) == ("sampler-0", "hello", 2)
        assert hello.session
        (_, alive), _ = await h.recv_until("work", lambda m: isinstance(m, P.WorkRequest), routed=True)
        assert (alive.intent, alive.session, alive.free_slots) == ("ordinary", hello.session, 0)
        await h.send_to("work", ident, ActorDown(actor="sampler-0", role="sampler", incarnation=0))
        await h.send_to("work", ident, P.SlotsQuery(sampler="sampler-1", reason="not this one"))
        await h.send_to("work", ident, P.SlotsQuery(sampler="sampler-0", reason="the coordinator restarted"))
        (_, answer), _ = await h.recv_until(
            "work", lambda m: isinstance(m, P.WorkRequest) and m.intent == "slots", routed=True)
        assert (answer.sampler, answer.session, answer.free_slots) == ("sampler-0", hello.session, 2)
        hb = await h.wait_heartbeat(lambda hb: hb.counters.get("coordinator_resyncs") == 1)
        assert hb.counters.get("unexpected_messages") == 2  # the ActorDown and the query for another sampler
