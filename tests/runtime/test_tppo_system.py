"""T-PPO windows through the whole actor system: real processes and ZeroMQ sockets, fake samplers
and critic, the real DeepSpeed learner, ESPO stopping on."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from espo_async.runtime.metrics import read_metrics
from tests.runtime.system import fake_config, learner_state, received, run_system

pytestmark = pytest.mark.slow

W = 8


async def test_windows_train_segments_once_and_compose_with_espo(tmp_path, tiny_model_dir):
    cfg = fake_config(
        run={"total_steps": 4},
        task={"name": "arithmetic", "options": {"n_steps": 3}, "eval_problems": 4},
        rollout={"window_tokens": W},
        actors={"sampler": {"class": "actors.samplers.fake:FakeSampler", "count": 2,
                            "options": {"max_concurrency": 3, "tokens_per_s": 80, "p_bad": 0.5}}},
    )
    result = await run_system(cfg, tmp_path)
    assert result.exit_code == 0, result.reason
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    b = cfg.rollout.prompts_per_batch * cfg.rollout.samples_per_prompt
    assert all(r["window_rows"] == b for r in rows)
    assert sum(r["window_incomplete_rows"] for r in rows) > 0 and sum(r["window_finals"] for r in rows) > 0
    # the critic trains on complete responses only, on its own schedule
    assert any(r.get("critic_rollouts", 0) > 0 and np.isfinite(r["critic_loss"]) for r in rows)

    trajs = received(tmp_path)
    segs = [t for t in trajs if t.ending == "incomplete"]
    finals = {(t.prompt_id, t.sample_index, t.attempt): t for t in trajs if t.ending != "incomplete"}
    assert segs and finals
    assert len(finals) == len({(t.prompt_id, t.sample_index) for t in finals.values()})
    by_rollout = collections.defaultdict(list)
    for s in segs:
        by_rollout[(s.prompt_id, s.sample_index, s.attempt)].append(s)
    for key, ss in by_rollout.items():
        # windows of exactly W tokens, in order, each with the prompt + earlier tokens as prefix
        assert [s.offset for s in ss] == [W * i for i in range(len(ss))], key
        assert all(len(s.token_ids) == W for s in ss)
        f = finals.get(key)
        if f is None:
            continue  # still generating when the run ended
        assert len(f.token_ids) >= ss[-1].offset + W  # a stop never reaches back into a handed-over window
        for s in ss:
            assert s.prompt_token_ids.tolist() == f.prompt_token_ids.tolist() + f.token_ids[: s.offset].tolist()
            assert s.token_ids.tolist() == f.token_ids[s.offset: s.offset + W].tolist()
            assert s.versions.tolist() == f.versions[s.offset: s.offset + W].tolist()
        assert (np.diff(f.versions) >= 0).all()
    # rollouts keep generating under the weights the engine loads next
    assert any(len(set(f.versions.tolist())) > 1 for f in finals.values())
    # ESPO composes: rollouts stopped in a later window end absorbed, after incomplete segments
    later_stops = [k for k, f in finals.items() if f.ending == "absorbed" and f.stop_index >= W and by_rollout.get(k)]
    assert later_stops, collections.Counter(f.ending for f in finals.values())

    # nothing trained twice: the learner's per-step row log has disjoint token ranges per rollout,
    # and every rollout whose last row was trained had [0, length) trained exactly once
    trained = [json.loads(line) for line in (tmp_path / "learner" / "window_rows.jsonl").read_text().splitlines()]
    assert [t["step"] for t in trained] == [1, 2, 3, 4]
    spans = collections.defaultdict(list)
    ended = set()
    for step in trained:
        for pid, sample, attempt, start, end, ending, final in step["rows"]:
            spans[(pid, sample, attempt)].append((start, end))
            if final:
                ended.add((pid, sample, attempt))
    for key, ranges in spans.items():
        tokens = [t for a, b in ranges for t in range(a, b)]
        assert len(tokens) == len(set(tokens)), f"{key} trained a token twice: {ranges}"
        if key in ended:
            assert sorted(tokens) == list(range(max(len(finals[key].token_ids), max(b for _, b in ranges)))), key
    state = learner_state(tmp_path)
    assert state["windows"]["finals_trained"] == len(ended)
    assert state["groups_consumed"] == -(-len(ended) // cfg.rollout.samples_per_prompt)
    assert result.actors["learner"].counters.get("window_segments", 0) > 0
