"""The sampler's side of T-PPO windows, without processes: segments handed over while the
rollout generates, and a stop decided inside a handed-over segment."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import numpy as np

import protocols as P
from actors.samplers.base import EngineChunk, LiveRequest, Sampler

W = 4


class Recorder:
    def __init__(self):
        self.sent: list[P.Message] = []

    async def send(self, sock, msg):
        self.sent.append(msg)


class Engine:
    def __init__(self):
        self.aborted: list[str] = []

    async def abort(self, rid):
        self.aborted.append(rid)

    def decode(self, ids):
        return " ".join(map(str, ids))


def sampler() -> Sampler:
    s = Sampler.__new__(Sampler)  # no sockets, no engine process: only the request bookkeeping
    s.name = "sampler-0"
    s.cfg = SimpleNamespace(rollout=SimpleNamespace(window_tokens=W))
    s.counters = Counter()
    s.log = logging.getLogger("test")
    s.transport = Recorder()
    s.results = None
    s.engine = Engine()
    s.live = {}
    s.recently_ended = {}
    return s


def grow(req: LiveRequest, n: int, version: int) -> None:
    ids = np.arange(req.n, req.n + n, dtype=np.int32) + 10
    chunk = EngineChunk(ids, np.full(n, -0.5, np.float32), np.zeros(n, np.float32))
    req.token_ids.append(chunk.token_ids)
    req.logprobs.append(chunk.logprobs)
    req.top1.append(chunk.top1_logprobs)
    req.versions.append(np.full(n, version, np.int32))
    req.n += n


def work() -> P.PromptWork:
    return P.PromptWork(request_id="g0/p#0", prompt_id="g0/p", sample_index=0, group_size=1,
                        prompt_token_ids=np.array([1, 2], np.int32), max_tokens=32)


async def test_segments_are_handed_over_every_window_with_versions():
    s = sampler()
    req = LiveRequest(work())
    grow(req, 3, version=0)
    await s._emit_segments(req)
    assert s.transport.sent == []
    grow(req, 6, version=1)  # 9 tokens: two windows, the second one generated under new weights
    await s._emit_segments(req)
    segs = s.transport.sent
    assert [(t.offset, t.token_ids.tolist(), t.versions.tolist()) for t in segs] == [
        (0, [10, 11, 12, 13], [0, 0, 0, 1]), (4, [14, 15, 16, 17], [1, 1, 1, 1])]
    assert segs[1].prompt_token_ids.tolist() == [1, 2, 10, 11, 12, 13]
    assert req.emitted == 8 and s.counters["segments"] == 2


async def test_a_stop_inside_a_handed_over_segment_moves_to_the_first_token_not_handed_over():
    s = sampler()
    req = LiveRequest(work())
    s.live[req.work.request_id] = req
    grow(req, 10, version=0)
    await s._emit_segments(req)  # tokens 0..7 handed over
    await s.on_cancel(P.Cancel(request_id="g0/p#0", sampler_id="sampler-0", stop_index=6))
    assert req.stop_index == 8 and s.counters["cancel_moved_past_segment"] == 1 and s.engine.aborted
    grow(req, 3, version=0)
    await s._emit_segments(req)  # nothing more once a stop was decided
    assert len(s.transport.sent) == 2
    traj = s._trajectory(req, "abort")
    assert traj.ending == "absorbed" and traj.stop_index == 8 and len(traj.token_ids) == 9


async def test_a_stop_right_after_a_handover_keeps_the_last_token():
    s = sampler()
    req = LiveRequest(work())
    s.live[req.work.request_id] = req
    grow(req, 8, version=0)
    await s._emit_segments(req)  # everything generated so far went out
    await s.on_cancel(P.Cancel(request_id="g0/p#0", sampler_id="sampler-0", stop_index=2))
    assert req.stop_index == 7  # the last token generated: the final has no new token, the critic learns the stop


async def test_without_windows_a_stop_is_where_the_stopper_put_it():
    s = sampler()
    s.cfg.rollout.window_tokens = 0
    req = LiveRequest(work())
    s.live[req.work.request_id] = req
    grow(req, 8, version=0)
    await s.on_cancel(P.Cancel(request_id="g0/p#0", sampler_id="sampler-0", stop_index=2))
    assert req.stop_index == 2 and s.counters["cancel_moved_past_segment"] == 0
