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


def assert_greedy_path(model, prompt_ids, tokens, logprobs=None, atol=1e-4):
    """``tokens`` is a greedy continuation of ``prompt_ids`` under ``model`` (HF): each token is an
    argmax of the model at its position up to ``atol`` (a random-init model has near-ties, so
    exact token equality would test float noise), and engine logprobs, if given, agree."""
    if not tokens:
        return
    ids = torch.tensor([list(prompt_ids) + list(tokens)])
    with torch.no_grad():
        lp = model(ids).logits[0, len(prompt_ids) - 1 : -1].float().log_softmax(-1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens)]
    gap = lp.max(-1).values - chosen
    assert float(gap.max()) <= atol, f"token {int(gap.argmax())} is {float(gap.max()):.2e} below the argmax"
    if logprobs is not None:
        assert torch.allclose(torch.tensor(logprobs, dtype=torch.float32), chosen, atol=1e-3)


async def greedy_vllm(model_dir, prompt_ids, max_tokens, eos):
    from espo_async.engines.vllm_engine import VLLMEngine

    engine = await VLLMEngine.create(model_dir, max_num_seqs=4, max_model_len=128, kv_cache_gib=1.0, dtype="float32")
    try:
        out = []
        for i, ids in enumerate(prompt_ids):
            toks, lps = [], []
            async for chunk in engine.generate(f"final-{i}", ids, max_tokens=max_tokens, temperature=0.0,
                                               stop_token_ids=[eos]):
                toks.extend(chunk.token_ids.tolist())
                lps.extend(chunk.logprobs.tolist())
            out.append((toks, lps))
        return out
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
    assert [e["sampled_versions"] for e in evals] == [[0, 0], [2, 2]]  # no weight update mid-round
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    last = sorted((s for s in samples if s["round"] == 2), key=lambda s: s["prompt_id"])
    task = make_task(TASK["name"], **TASK["options"])
    problems = {p.id: p for p in task.eval_problems()}
    prompts = [task.format_prompt(problems[s["prompt_id"].split("/", 1)[1]]) for s in last]
    engine_tokens = [s["token_ids"] for s in last]  # ids, not text: decoding drops special tokens

    final = str(tmp_path / "final")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)  # loads in transformers
    prompt_ids = [tok.encode(p) for p in prompts]
    # The samplers' last greedy round (vLLM after its last hot weight update) is greedy under
    # the exported model: the engine served exactly the learner's final weights.
    for ids, toks in zip(prompt_ids, engine_tokens):
        assert_greedy_path(model, ids, toks)
    # ...and not under the initial policy: the hot updates did change what the engine computes.
    initial = AutoModelForCausalLM.from_pretrained(json.loads((tmp_path / "assets.json").read_text())["policy_dir"])
    mismatches = 0
    for ids, toks in zip(prompt_ids, engine_tokens):
        try:
            assert_greedy_path(initial, ids, toks)
        except AssertionError:
            mismatches += 1
    assert mismatches > 0
    # The checkpoint also loads in a fresh vLLM engine, which computes the same distribution.
    for ids, (toks, lps) in zip(prompt_ids, await greedy_vllm(final, prompt_ids, cfg.rollout.max_tokens, tok.eos_token_id)):
        assert toks, "vLLM generated nothing"
        assert_greedy_path(model, ids, toks, lps)
