"""How much of one batch's policy gradient is signal: a measurement behind docs/results.notes.md.

Draws ``--batches`` independent batches of ``prompts x samples`` rollouts from the warmed-up
model of a config, computes each batch's GRPO policy gradient (group-normalised outcome
advantage, token-mean loss: what experiments/plain_pg.py trains with) and prints the cosine
between every pair. Independent estimates of the same expected gradient have cosine
~ |mean|^2 / (|mean|^2 + noise^2): near 0 means one batch's step is almost all noise.

It also perturbs the model by isotropic random steps of given norms and re-evaluates, to
compare the damage of a random direction with that of the gradient's noise directions.

    python experiments/gradient_snr.py --config configs/short-chain.yaml --set task.options.n_steps=9 \
        --set rollout.max_tokens=128 --set model.sft_steps=450
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from plain_pg import evaluate, forward, sample  # the sibling script (experiments/ is on sys.path when run)


def batch_gradient(model, tok, task, problems, *, samples: int, temperature: float, max_new: int) -> torch.Tensor:
    out = sample(model, tok, task, problems, n=samples, temperature=temperature, max_new=max_new)
    r = torch.tensor([task.score(problems[i], t) for i, _, t in out], dtype=torch.float32).view(len(problems), samples)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
    model.zero_grad(set_to_none=True)
    ids, lp, spans = forward(model, tok, task, problems, out)
    tok_lp = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    w = torch.zeros_like(tok_lp)
    for b, (pl, rl) in enumerate(spans):
        w[b, pl - 1:pl - 1 + rl] = adv[b]
    (-(tok_lp * w).sum() / max(sum(rl for _, rl in spans), 1)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_async.assets import resolve_model
    from espo_async.config import load_config
    from espo_async.tasks.registry import make_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/short-chain.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--norms", type=float, nargs="*", default=[0.3, 1.0], help="random-step norms to evaluate")
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(a.config, a.set)
    path = resolve_model(cfg.model.policy, cfg)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    task = make_task(cfg.task.name, **cfg.task.options)
    rng = random.Random(a.seed)
    torch.manual_seed(a.seed)
    r = cfg.rollout
    grads = [batch_gradient(model, tok, task, rng.sample(task.train_problems(), r.prompts_per_batch),
                            samples=r.samples_per_prompt, temperature=r.temperature, max_new=r.max_tokens)
             for _ in range(a.batches)]
    cos = [float(torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0))
           for i in range(len(grads)) for j in range(i + 1, len(grads))]
    result = {"config": a.config, "overrides": a.set, "cosines": cos, "grad_norms": [float(g.norm()) for g in grads]}
    problems = task.eval_problems()[: a.eval_problems]
    ev = dict(n=a.eval_samples, temperature=r.temperature, max_new=r.max_tokens, entropy=False)
    theta = [p.detach().clone() for p in model.parameters()]
    result["param_norm"] = float(torch.sqrt(sum((t ** 2).sum() for t in theta)))
    result["base"] = evaluate(model, tok, task, problems, **ev)
    result["random_steps"] = {}
    for norm in a.norms:
        d = [torch.randn_like(t) for t in theta]
        scale = norm / float(torch.sqrt(sum((x ** 2).sum() for x in d)))
        with torch.no_grad():
            for p, t, x in zip(model.parameters(), theta, d):
                p.copy_(t + x * scale)
        result["random_steps"][str(norm)] = evaluate(model, tok, task, problems, **ev)
    print(json.dumps({k: result[k] for k in ("cosines", "grad_norms", "param_norm")}))
    print("base pass1 %.3f greedy %.3f" % (result["base"]["pass1"], result["base"]["greedy"]))
    for norm, e in result["random_steps"].items():
        print("random step of norm %s: pass1 %.3f greedy %.3f" % (norm, e["pass1"], e["greedy"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
