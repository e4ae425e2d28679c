"""T-PPO windows: segmenting (sampler side), assembly into training rows (learner side), flow
control, metrics and Monte-Carlo critic targets. Pure: no processes, no models."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import protocols as P
from espo_async.config import ConfigError, parse_config
from espo_async.training.tppo import (
    WindowBook,
    monte_carlo_returns,
    window_metrics,
)
from protocols.trajectory import segment_trajectory

PROMPT = np.array([1, 2, 3], np.int32)


def work(pid="g0/p", sample=0, attempt=0, group=2):
    return P.PromptWork(request_id=f"{pid}#{sample}", prompt_id=pid, sample_index=sample, group_size=group,
                        prompt_token_ids=PROMPT, max_tokens=64, attempt=attempt)


def rollout(n, seed=0, version_every=5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 50, size=n).astype(np.int32)
    lps = -rng.uniform(0, 2, size=n).astype(np.float32)
    top1 = np.zeros(n, np.float32)
    vers = (np.arange(n) // version_every).astype(np.int32)  # weights change mid-rollout
    return ids, lps, top1, vers


def final(w, ids, lps, top1, vers, ending="finished", stop_index=-1, generated=None, text="final text"):
    return P.Trajectory(request_id=w.request_id, prompt_id=w.prompt_id, sample_index=w.sample_index,
                        group_size=w.group_size, sampler_id="s", prompt_token_ids=w.prompt_token_ids,
                        token_ids=ids, logprobs=lps, top1_logprobs=top1, versions=vers, ending=ending,
                        finish_reason="stop", stop_index=stop_index,
                        tokens_generated=len(ids) if generated is None else generated,
                        attempt=w.attempt, text=text)


def segments(w, arrays, n, window):
    """What the sampler sends for a rollout that reached n tokens: one segment per full window."""
    ids, lps, top1, vers = arrays
    return [segment_trajectory(w, ids, lps, top1, vers, s, s + window, sampler_id="s")
            for s in range(0, n - window + 1, window)]


# ----------------------------------------------------------------------------- sampler side
def test_segment_carries_prefix_offset_and_versions():
    w = work()
    ids, lps, top1, vers = rollout(20)
    seg = segment_trajectory(w, ids, lps, top1, vers, 8, 16, sampler_id="s0")
    assert seg.ending == "incomplete" and seg.offset == 8 and seg.finish_reason == "window"
    assert seg.prompt_token_ids.tolist() == PROMPT.tolist() + ids[:8].tolist()
    assert seg.token_ids.tolist() == ids[8:16].tolist()
    assert seg.versions.tolist() == vers[8:16].tolist() == [1, 1, 2, 2, 2, 2, 2, 3]
    assert seg.tokens_generated == 8 and seg.stop_index == -1
    assert P.decode(P.encode(seg)).offset == 8  # travels on the wire
    with pytest.raises(ValueError):
        segment_trajectory(w, ids, lps, top1, vers, 16, 24, sampler_id="s0")


def test_trajectory_offset_only_on_incomplete_segments():
    w = work()
    ids, lps, top1, vers = rollout(4)
    with pytest.raises(ValueError, match="offset"):
        P.Trajectory(**{**_fields(final(w, ids, lps, top1, vers)), "offset": 2})
    with pytest.raises(ValueError, match="offset"):  # the prefix must hold the prompt and the offset tokens
        P.Trajectory(**{**_fields(final(w, ids, lps, top1, vers)), "ending": "incomplete", "offset": 3})


def _fields(t):
    import msgspec

    return msgspec.structs.asdict(t)


# ----------------------------------------------------------------------------- learner side
def test_rows_cover_each_rollout_once_with_the_right_prefixes():
    book = WindowBook(group_size=2, max_tokens=64)
    arrays = {0: rollout(21, seed=1), 1: rollout(8, seed=2)}  # 2 full windows + 5 tokens; exactly one window
    w0, w1 = work(sample=0), work(sample=1)
    for seg in segments(w0, arrays[0], 21, 8):
        assert book.accept(seg)
    assert book.accept(final(w0, *arrays[0]))
    # a rollout that ends exactly at a window boundary sends no segment for its last window
    assert book.accept(final(w1, *arrays[1], ending="truncated"))
    rows, completed = book.take(10)
    assert [(r.offset, r.end, r.ending, r.final) for r in rows] == [
        (0, 8, "incomplete", False), (8, 16, "incomplete", False), (16, 21, "finished", True), (0, 8, "truncated", True)]
    ids0 = arrays[0][0]
    for r in rows[:3]:
        assert r.prompt_token_ids.tolist() == PROMPT.tolist() + ids0[: r.offset].tolist()
        assert r.token_ids.tolist() == ids0[r.offset: r.end].tolist()
        assert r.versions.tolist() == arrays[0][3][r.offset: r.end].tolist()
    assert rows[2].text == "final text" and rows[0].text == ""  # the last row is scored on the whole response
    assert rows[2].full is not None and len(rows[2].full.token_ids) == 21
    assert completed == ["g0/p"] and book.groups_consumed == 1 and book.in_flight == 0
    assert [len(t.token_ids) for t in book.take_critic(2)] == [21, 8] and book.take_critic(1) == []


def test_duplicates_late_segments_and_overlaps_are_never_trained_twice():
    book = WindowBook(group_size=1, max_tokens=64)
    w = work(group=1)
    arrays = rollout(30, seed=3)
    s0, s1, s2 = segments(w, arrays, 30, 8)[:3]
    assert book.accept(s0) and not book.accept(s0)  # a duplicate brings nothing
    # a segment overlapping what is queued is cut to its new tokens
    ids, lps, top1, vers = arrays
    overlap = segment_trajectory(w, ids, lps, top1, vers, 4, 12, sampler_id="s")
    assert book.accept(overlap)
    assert book.queue[-1].offset == 8 and book.queue[-1].end == 12
    assert book.accept(s1)  # [8, 16) -> only [12, 16) is new
    assert (book.queue[-1].offset, book.queue[-1].end) == (12, 16)
    assert book.accept(final(w, *arrays))
    assert not book.accept(s2)  # after the final: late
    assert not book.accept(final(w, *arrays))  # a second final of the same sample
    rows, _ = book.take(100)
    covered = [t for r in rows for t in range(r.offset, r.end)]
    assert covered == list(range(30))
    assert book.counters["window_duplicate_segments"] == 1 and book.counters["window_segments_after_final"] == 1


def test_a_reissued_attempt_starts_over_and_the_abandoned_one_is_dropped():
    book = WindowBook(group_size=1, max_tokens=64)
    old, new = work(group=1, attempt=0), work(group=1, attempt=1)
    a_old, a_new = rollout(20, seed=4), rollout(12, seed=5)
    assert book.accept(segments(old, a_old, 20, 8)[0])  # the first attempt's sampler died after one window
    assert book.accept(segments(new, a_new, 12, 8)[0])  # the re-issue starts from token 0 (new tokens)
    assert book.accept(final(new, *a_new))
    assert not book.accept(segments(old, a_old, 20, 8)[1])  # the abandoned attempt, late
    rows, completed = book.take(10)
    assert [(r.attempt, r.offset, r.end, r.final) for r in rows] == [(0, 0, 8, False), (1, 0, 8, False), (1, 8, 12, True)]
    assert completed == ["g0/p"]


def test_a_stop_inside_queued_tokens_leaves_a_final_row_without_new_tokens():
    book = WindowBook(group_size=1, max_tokens=64)
    w = work(group=1)
    ids, lps, top1, vers = rollout(16, seed=6)
    for seg in segments(w, (ids, lps, top1, vers), 16, 8):
        book.accept(seg)
    stopped = final(w, ids[:16], lps[:16], top1[:16], vers[:16], ending="absorbed", stop_index=15, generated=17)
    assert book.accept(stopped)
    rows, completed = book.take(10)
    assert len(rows[-1].token_ids) == 0 and rows[-1].final and rows[-1].ending == "absorbed"
    assert rows[-1].tokens_generated == 1  # the token generated after the stop
    assert completed == ["g0/p"]
    assert [len(t.token_ids) for t in book.take_critic(1)] == [16]  # the critic still learns the failure


def test_groups_consumed_is_the_ceiling_of_ended_rollouts_over_the_group_size():
    book = WindowBook(group_size=4, max_tokens=64)
    for s in range(3):
        book.accept(final(work(sample=s, group=4), *rollout(5, seed=s)))
    book.take(2)
    assert book.finals_trained == 2 and book.groups_consumed == 1
    book.take(1)
    assert book.groups_consumed == 1
    book.accept(final(work(sample=3, group=4), *rollout(5, seed=9)))
    _, completed = book.take(1)
    assert completed == ["g0/p"] and book.groups_consumed == 1


def test_checkpoint_and_log_replay_train_nothing_twice():
    """A learner restart: the checkpoint's book plus the write-ahead log's replay queue exactly
    the tokens not trained before the checkpoint, and the critic's waiting responses come back."""
    log: list[P.Trajectory] = []
    book = WindowBook(group_size=2, max_tokens=64)
    a0, a1 = rollout(20, seed=7), rollout(17, seed=8)
    w0, w1 = work(sample=0), work(sample=1)
    for t in [*segments(w0, a0, 20, 8), final(w0, *a0), *segments(w1, a1, 17, 8)[:1]]:
        assert book.accept(t)
        log.append(t)
    trained, _ = book.take(4)  # [0,8) [8,16) [16,20)final of sample 0, [0,8) of sample 1
    state = book.state_dict()
    for t in [*segments(w1, a1, 17, 8)[1:], final(w1, *a1)]:  # arrive after the checkpoint
        book.accept(t)
        log.append(t)
    restarted = WindowBook(group_size=2, max_tokens=64)
    restarted.load_state_dict(state)
    queued = [t for t in log if restarted.accept(t)]
    rows, completed = restarted.take(100)
    assert [(r.sample_index, r.offset, r.end) for r in rows] == [(1, 8, 16), (1, 16, 17)]
    assert completed == ["g0/p"] and restarted.groups_consumed == 1 and len(queued) == 2
    # sample 0's response waited for the critic at the checkpoint: the replay hands it back
    assert sorted((t.sample_index, len(t.token_ids)) for t in restarted.take_critic(1)) == [(0, 20), (1, 17)]


def test_window_metrics_are_over_rollouts_that_ended():
    book = WindowBook(group_size=2, max_tokens=48)
    ids, lps, top1, vers = rollout(20, seed=1)
    for seg in segments(work(), (ids, lps, top1, vers), 20, 8):
        book.accept(seg)
    book.accept(final(work(), ids[:18], lps[:18], top1[:18], vers[:18], ending="absorbed", stop_index=17, generated=20))
    book.accept(final(work(sample=1), *rollout(30, seed=2)))
    rows, _ = book.take(10)
    m = window_metrics(rows, [0.0, 0.0, 0.0, 1.0], r_fail=-1.0, max_tokens=48)
    assert m["window_rows"] == 4 and m["window_finals"] == 2 and m["window_incomplete_rows"] == 2
    assert m["stop_rate"] == m["controller_stop_rate"] == 0.5 and m["accuracy"] == 0.5 and m["reward"] == 0.0
    assert m["mean_length"] == 24.0 and m["tokens_saved_est"] == 10.0  # 30 - 20 generated
    none = window_metrics(rows[:2], [0.0, 0.0], r_fail=-1.0, max_tokens=48)
    assert none["window_finals"] == 0 and np.isnan(none["controller_stop_rate"]) and none["stop_rate"] == 0.0


def test_flow_control_never_deadlocks_and_bounds_rollouts_in_flight():
    """A discrete simulation of the coordinator's staleness bound (groups_started <
    groups_consumed + (K+1) * prompts_per_batch, groups_consumed from the book), engines with a
    few slots generating rollouts of random lengths in windows, and a learner taking B rows per
    step: every step fills, and rollouts in flight stay below (K+1)*B + group size."""
    rng = random.Random(0)
    for group, prompts, staleness, slots, window in [(4, 2, 0, 3, 8), (3, 2, 1, 16, 4), (1, 3, 0, 2, 8), (8, 1, 0, 5, 16)]:
        b = group * prompts
        book = WindowBook(group_size=group, max_tokens=48)
        pending: list[P.PromptWork] = []
        live: dict[str, list] = {}
        started = steps = 0
        for _ in range(20_000):
            if steps == 25:
                break
            while not pending and started < book.groups_consumed + (staleness + 1) * prompts:
                pending += [work(pid=f"g{started}/p", sample=i, group=group) for i in range(group)]
                started += 1
            while pending and len(live) < slots:
                w = pending.pop(0)
                live[w.request_id] = [w, rollout(rng.randint(1, 48), seed=rng.randrange(1 << 30)), 0]
            assert started * group - book.finals_trained <= (staleness + 1) * b + group
            if len(book.queue) >= b:
                book.take(b)
                steps += 1
                continue
            assert live, "deadlock: no step can fill and nothing is generating"
            rid = rng.choice(sorted(live))
            w, arrays, emitted = live[rid]
            n = len(arrays[0])
            if n - emitted > window:  # one more window, then it goes on
                book.accept(segment_trajectory(w, *arrays, emitted, emitted + window, sampler_id="s"))
                live[rid][2] = emitted + window
            else:
                book.accept(final(w, *arrays))
                del live[rid]
        assert steps == 25


# -------------------------------------------------------------------------------- critic targets
def test_monte_carlo_returns_per_ending():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    values = torch.tensor([[0.3, 0.1, 0.9], [0.2, 0.4, 0.0], [0.5, 0.5, 0.5]])
    boot = torch.tensor([0.0, 0.0, 0.8])
    ret = monte_carlo_returns(values, boot, mask, ["finished", "absorbed", "truncated"], torch.tensor([1.0, 1.0, 1.0]),
                              gamma=0.5, r_fail=-1.0, truncation="bootstrap")
    expect = torch.tensor([[0.25, 0.5, 1.0], [-0.5, -1.0, 0.0], [0.1, 0.2, 0.4]], dtype=torch.float64)
    assert torch.allclose(ret, expect)  # independent of V except the truncated row's bootstrap
    with pytest.raises(ValueError):
        monte_carlo_returns(values, boot, mask, ["incomplete"] * 3, torch.zeros(3), gamma=1.0, r_fail=-1.0)


# ---------------------------------------------------------------------------------------- config
def test_window_config_is_validated():
    cfg = parse_config({"rollout": {"window_tokens": 16, "max_tokens": 64}, "algo": {"tppo_critic_rollouts": 8}})
    assert cfg.rollout.window_tokens == 16 and cfg.algo.tppo_critic_rollouts == 8
    for bad, words in [
        ({"rollout": {"window_tokens": 64, "max_tokens": 64}}, "must be < rollout.max_tokens"),
        ({"rollout": {"window_tokens": 8}, "algo": {"advantage": "grpo"}}, "needs algo.advantage 'gae'"),
        ({"rollout": {"window_tokens": 8, "synchronous": True}}, "synchronous"),
        ({"rollout": {"window_tokens": 8}, "algo": {"dynamic_sampling": True}}, "dynamic_sampling"),
        ({"rollout": {"window_tokens": 8}, "algo": {"overlong_buffer": 4}}, "overlong_buffer"),
        ({"rollout": {"window_tokens": -1}}, "window_tokens"),
        ({"algo": {"tppo_critic_rollouts": 0}}, "tppo_critic_rollouts"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_config(bad)


def test_entropy_is_loss_runs_from_config():
    """The entropy-grouped IS loss as a method row: GRPO outcome advantages, no critic."""
    from espo_async.runtime.entry import validate_actors

    cfg = parse_config({"algo": {"policy_loss": "entropy_is", "advantage": "grpo"}, "stop": {"policy": "none"},
                        "actors": {"critic": None, "stopper": None}})
    validate_actors(cfg)
    assert cfg.algo.policy_loss == "entropy_is" and cfg.algo.entropy_is_top_frac == 0.2
