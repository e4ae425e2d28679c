"""Hypothesis strategies that build a valid instance of every message type."""

from __future__ import annotations

import typing

import numpy as np
from hypothesis import strategies as st

import protocols as P
from protocols.messages import ActorDown, ActorUp, Received

ids = st.text(min_size=1, max_size=24)
nonneg = st.integers(min_value=0, max_value=2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
endings = st.sampled_from(typing.get_args(P.Ending))


def int_array(n: int) -> st.SearchStrategy[np.ndarray]:
    return st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n).map(
        lambda xs: np.asarray(xs, dtype=np.int32)
    )


def float_array(n: int) -> st.SearchStrategy[np.ndarray]:
    return st.lists(st.floats(width=32, allow_nan=True), min_size=n, max_size=n).map(
        lambda xs: np.asarray(xs, dtype=np.float32)
    )


@st.composite
def token_arrays(draw, min_size: int = 0, max_size: int = 40):
    n = draw(st.integers(min_size, max_size))
    return dict(
        token_ids=draw(int_array(n)),
        logprobs=draw(float_array(n)),
        top1_logprobs=draw(float_array(n)),
        versions=draw(int_array(n)),
    )


@st.composite
def prompt_work(draw):
    group = draw(st.integers(1, 64))
    return P.PromptWork(
        request_id=draw(ids),
        prompt_id=draw(ids),
        sample_index=draw(st.integers(0, group - 1)),
        group_size=group,
        prompt_token_ids=draw(st.integers(1, 50).flatmap(int_array)),
        max_tokens=draw(st.integers(1, 10**6)),
        temperature=draw(st.floats(0, 2)),
        top_p=draw(st.floats(0, 1)),
        attempt=draw(st.integers(0, 10)),
        issued_at_version=draw(nonneg),
        purpose=draw(st.sampled_from(["train", "eval", "shadow"])),
    )


@st.composite
def token_chunk(draw):
    prompt = draw(st.none() | st.integers(0, 30).flatmap(int_array))
    return P.TokenChunk(
        request_id=draw(ids), sampler_id=draw(ids), start=draw(nonneg), prompt_token_ids=prompt, **draw(token_arrays())
    )


@st.composite
def token_batch(draw, max_requests: int = 8):
    """A valid batch: 1..max_requests requests of 1..6 tokens, some with their prompt."""
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=max_requests))
    k, n = len(lengths), sum(lengths)
    prompt_lengths = draw(st.lists(st.sampled_from([0, 0, 1, 5, 12]), min_size=k, max_size=k))
    return P.TokenBatch(
        sampler_id=draw(ids),
        request_ids=draw(st.lists(ids, min_size=k, max_size=k)),
        starts=np.asarray(draw(st.lists(nonneg, min_size=k, max_size=k)), np.int32),
        lengths=np.asarray(lengths, np.int32),
        token_ids=draw(int_array(n)),
        logprobs=draw(float_array(n)),
        top1_logprobs=draw(float_array(n)),
        versions=draw(int_array(n)),
        prompt_lengths=np.asarray(prompt_lengths, np.int32),
        prompt_token_ids=draw(int_array(sum(prompt_lengths))),
    )


@st.composite
def value_chunk(draw):
    n = draw(st.integers(0, 40))
    return P.ValueChunk(
        request_id=draw(ids), positions=draw(int_array(n)), values=draw(float_array(n)), critic_version=draw(nonneg)
    )


@st.composite
def trajectory(draw):
    ending = draw(endings)
    arrays = draw(token_arrays(min_size=1 if ending == "absorbed" else 0))
    n = len(arrays["token_ids"])
    group = draw(st.integers(1, 64))
    return P.Trajectory(
        request_id=draw(ids),
        prompt_id=draw(ids),
        sample_index=draw(st.integers(0, group - 1)),
        group_size=group,
        sampler_id=draw(ids),
        prompt_token_ids=draw(st.integers(1, 30).flatmap(int_array)),
        ending=ending,
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
        stop_index=n - 1 if ending == "absorbed" else -1,
        tokens_generated=n + draw(st.integers(0, 5)),
        attempt=draw(st.integers(0, 3)),
        started_at=draw(st.floats(0, 2e9)),
        ended_at=draw(st.floats(0, 2e9)),
        text=draw(st.text(max_size=60)),
        purpose=draw(st.sampled_from(["train", "eval", "shadow"])),
        **arrays,
    )


stop_params = st.builds(
    P.StopParams,
    kind=st.sampled_from(typing.get_args(P.messages.StopKind)),
    enabled=st.booleans(),
    mu=floats,
    var=floats,
    c=floats,
    delta=floats,
    alpha_s=floats,
    beta=floats,
    eps=floats,
    hazard=floats,
    value_ref=floats,
    seed=nonneg,
    step=nonneg,
)

STRATEGIES = {
    P.WorkRequest: st.builds(P.WorkRequest, sampler=ids, free_slots=nonneg, policy_version=nonneg,
                             session=st.text(max_size=16), intent=st.sampled_from(typing.get_args(P.WorkIntent))),
    P.SlotsQuery: st.builds(P.SlotsQuery, sampler=ids, reason=st.text(max_size=20)),
    P.PromptWork: prompt_work(),
    P.WorkDone: st.builds(P.WorkDone, sampler_id=ids, request_id=ids, ending=st.none() | endings, n_tokens=nonneg, error=st.text(max_size=20)),
    P.TokenChunk: token_chunk(),
    P.TokenBatch: token_batch(),
    P.StreamEnd: st.builds(P.StreamEnd, request_id=ids, sampler_id=ids, ending=endings, n_tokens=nonneg),
    P.ValueChunk: value_chunk(),
    P.Cancel: st.builds(P.Cancel, request_id=ids, sampler_id=ids, stop_index=nonneg, reason=st.text(max_size=10), z=floats, threshold=floats, decided_at=floats),
    P.Trajectory: trajectory(),
    P.StopParams: stop_params,
    P.BatchBoundary: st.builds(
        P.BatchBoundary,
        step=nonneg,
        policy_version=nonneg,
        total_steps=nonneg,
        stop=stop_params,
        n_trajectories=nonneg,
        stop_rate=floats,
        regret_mean=floats,
        regret_var=floats,
        regret_count=nonneg,
        critic_loss=floats,
        groups_consumed=nonneg,
        epoch=st.text(max_size=16),
    ),
    P.EvalRequest: st.builds(
        P.EvalRequest,
        round=nonneg,
        policy_version=nonneg,
        n_problems=nonneg,
        samples=nonneg,
        temperature=st.floats(0, 2),
        max_tokens=nonneg,
    ),
    P.WeightsAnnounced: st.builds(
        P.WeightsAnnounced,
        model=st.sampled_from(["policy", "critic"]),
        version=nonneg,
        uri=st.text(max_size=40),
        sha256=st.text(max_size=64),
        nbytes=nonneg,
        step=nonneg,
        epoch=st.text(max_size=16),
        tensors=st.lists(st.tuples(st.text(max_size=20), st.sampled_from(["float32", "bfloat16"]),
                                   st.lists(nonneg, max_size=3)), max_size=3),
    ),
    P.Heartbeat: st.builds(
        P.Heartbeat,
        actor=ids,
        role=ids,
        pid=nonneg,
        seq=nonneg,
        time=floats,
        status=st.sampled_from(["starting", "ready", "running", "stopping", "failed"]),
        counters=st.dictionaries(st.text(max_size=8), floats, max_size=5),
    ),
    P.Start: st.builds(P.Start, actors=st.lists(ids, max_size=5)),
    P.Shutdown: st.builds(P.Shutdown, reason=st.text(max_size=20), source=st.text(max_size=10)),
    ActorDown: st.builds(ActorDown, actor=ids, role=ids, incarnation=nonneg, reason=st.text(max_size=20)),
    ActorUp: st.builds(ActorUp, actor=ids, role=ids, incarnation=nonneg, pid=nonneg),
    Received: st.builds(Received, request_ids=st.lists(ids, max_size=8), epoch=st.text(max_size=16)),
}

MESSAGES = st.one_of(*STRATEGIES.values())
