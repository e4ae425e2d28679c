"""A short real end-to-end run: vLLM sampler, streaming HF critic, stopper, DeepSpeed learner.

After training, the final checkpoint must load in transformers and in vLLM, and both must
reproduce the greedy answers the samplers gave in the last evaluation round (which ran on the
engine after its last hot weight update)."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from espo_async.runtime.metrics import read_metrics
from espo_async.tasks.registry import make_task
from tests.runtime.system import fake_config, received, run_system

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TASK = {"name": "arithmetic", "options": {"n_steps": 3}}


def real_config():
    return fake_config(
        run={"total_steps": 2},
        task={**TASK, "eval_problems": 6, "eval_temperature": 0.0},
        rollout={"samples_per_prompt": 4, "prompts_per_batch": 2, "max_tokens": 24},
        stop={"policy": "espo", "warmup": {"enabled": False}},
        algo={"lr": 1e-3, "critic_lr": 1e-3},
        actors={
            "sampler": {
                "class": "actors.samplers.vllm:VLLMSampler",
                "count": 1,
                "options": {"max_num_seqs": 8, "kv_cache_gib": 1.0, "max_model_len": 128},
            },
            "critic": {"class": "actors.critics.hf:HFCritic", "options": {}},
        },
        transport={"heartbeat_timeout_s": 180, "startup_timeout_s": 300},
    )


def greedy_hf(model_dir, prompts, max_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


async def greedy_vllm(model_dir, prompts, max_tokens):
    from transformers import AutoTokenizer

    from espo_async.engines.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = await VLLMEngine.create(model_dir, max_num_seqs=4, max_model_len=128, kv_cache_gib=1.0)
    try:
        texts = []
        for i, p in enumerate(prompts):
            ids = []
            async for chunk in engine.generate(f"final-{i}", tok.encode(p), max_tokens=max_tokens, temperature=0.0,
                                               stop_token_ids=[tok.eos_token_id]):
                ids.extend(chunk.token_ids.tolist())
            texts.append(tok.decode(ids, skip_special_tokens=True))
        return texts
    finally:
        await engine.shutdown()


async def test_short_real_run_and_its_checkpoint(tmp_path):
    cfg = real_config()
    result = await run_system(cfg, tmp_path, timeout=900)
    assert result.exit_code == 0, result.reason
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["critic_loss"] == r["critic_loss"] for r in rows)  # finite, not NaN

    trajs = received(tmp_path)
    keys = [(t.prompt_id, t.sample_index) for t in trajs]
    assert len(keys) == len(set(keys))
    assert collections.Counter(t.ending for t in trajs)  # real endings from a real engine
    assert result.actors["critic"].counters.get("values", 0) > 0  # the critic streamed values
    assert result.actors["stopper"].counters.get("tokens", 0) > 0

    # The last evaluation ran on vLLM after its last hot weight update (version 2).
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["policy_version"] for e in evals] == [0, 2]
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    last = sorted((s for s in samples if s["round"] == 2), key=lambda s: s["prompt_id"])
    task = make_task(TASK["name"], **TASK["options"])
    problems = {p.id: p for p in task.eval_problems()}
    prompts = [task.format_prompt(problems[s["prompt_id"].split("/", 1)[1]]) for s in last]
    engine_texts = [s["text"] for s in last]

    final = str(tmp_path / "final")
    assert greedy_hf(final, prompts, cfg.rollout.max_tokens) == engine_texts
    assert await greedy_vllm(final, prompts, cfg.rollout.max_tokens) == engine_texts
