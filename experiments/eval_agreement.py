"""Do the two evaluators read the same model the same? transformers sampling (the plain loop's
``experiments/plain_pg.py``) against the vLLM engine (the system's samplers), on the same start
model, problems, temperature and token limit.

Each problem gets ``--samples`` completions from each; the result is pass@1 per evaluator with
its standard error over problems, and the paired difference (vLLM - HF) with its 95% interval
over problems. It also compares the response lengths and the ending (EOS or the token limit).

    python experiments/eval_agreement.py --config configs/short-chain.yaml --problems 64 --samples 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espo_async.eval_stats import mean_ci95, mean_se  # noqa: E402
from experiments.plain_pg import prompt_ids, sample, sampling_temperature, start, write_result  # noqa: E402


async def vllm_sample(model_dir: Path, prompts: list[list[int]], *, n: int, temperature: float, max_tokens: int,
                      seed: int, max_model_len: int) -> list[tuple[int, list[int]]]:
    """``n`` completions per prompt from the real engine: (prompt index, response token ids)."""
    from espo_async.engines.vllm_engine import VLLMEngine

    engine = await VLLMEngine.create(model_dir, max_num_seqs=256, max_model_len=max_model_len, dtype="float32",
                                     seed=seed)
    try:
        async def one(i: int, k: int) -> tuple[int, list[int]]:
            ids: list[int] = []
            async for chunk in engine.generate(f"p{i}-{k}", prompts[i], max_tokens=max_tokens,
                                               temperature=temperature):
                ids.extend(int(t) for t in chunk.token_ids)
            return i, ids

        return list(await asyncio.gather(*(one(i, k) for i in range(len(prompts)) for k in range(n))))
    finally:
        await engine.shutdown()


def per_problem(task, problems, rows) -> list[float]:
    """Mean score of each problem's completions: rows are (problem index, text)."""
    hits = [[] for _ in problems]
    for i, text in rows:
        hits[i].append(float(task.score(problems[i], text) > 0))
    return [sum(h) / len(h) for h in hits]


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from espo_async.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/short-chain.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(a.config, a.set)
    torch.manual_seed(cfg.run.seed)
    path, tok, task = start(cfg)
    problems = task.eval_problems()[: a.problems]
    temperature = sampling_temperature(cfg)
    max_tokens = cfg.rollout.max_tokens
    eos = tok.eos_token_id

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hf = sample(model, tok, task, problems, n=a.samples, temperature=temperature, max_new=max_tokens)
    hf_s = time.time() - t0
    prompts = [prompt_ids(tok, task, p) for p in problems]
    t0 = time.time()
    vl = asyncio.run(vllm_sample(path, prompts, n=a.samples, temperature=temperature, max_tokens=max_tokens,
                                 seed=cfg.run.seed, max_model_len=max(map(len, prompts)) + max_tokens + 8))
    vllm_s = time.time() - t0

    def summary(rows_ids, rows_text, seconds):
        acc = per_problem(task, problems, rows_text)
        lengths = [len(r) for _, r in rows_ids]
        m, se = mean_se(acc)
        return {"pass1": m, "pass1_se_problems": se, "mean_len": sum(lengths) / len(lengths),
                "eos_share": sum(bool(r) and r[-1] == eos for _, r in rows_ids) / len(rows_ids),
                "seconds": seconds}, acc

    hf_sum, hf_acc = summary([(i, r) for i, r, _ in hf], [(i, t) for i, _, t in hf], hf_s)
    vl_text = [(i, tok.decode(r, skip_special_tokens=True)) for i, r in vl]
    vl_sum, vl_acc = summary(vl, vl_text, vllm_s)
    diff, half = mean_ci95([v - h for v, h in zip(vl_acc, hf_acc)])
    result = {"argv": argv if argv is not None else sys.argv[1:], "model": path.name, "problems": len(problems),
              "samples": a.samples, "temperature": temperature, "max_tokens": max_tokens,
              "hf": hf_sum, "vllm": vl_sum, "vllm_minus_hf": [diff, half]}
    print(json.dumps(result, indent=1))
    write_result(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
