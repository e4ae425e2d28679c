"""A plain in-process policy-gradient loop: the reference beside the actor system.

No actors, no vLLM, no DeepSpeed, no critic: the same model (built and warmed up exactly as a run
of the same config would), the same task and data, the same batch shape (prompts x samples), the
same learning rate, sampled with transformers and trained with a group-normalised outcome
advantage (GRPO / REINFORCE with a per-prompt baseline), token-level loss, AdamW. If the system
and this loop disagree on the same config, the system has a bug; if both fail to learn, the
regime or the optimisation does (docs/results.notes.md).

It also measures a regime's headroom before any training (``--steps 0``): held-out pass@1 and
pass@k at the sampling temperature, greedy accuracy, the share of problems with mixed outcomes,
per-token entropy, response length, and where the first mistake of wrong rollouts falls.

    python experiments/plain_pg.py --config configs/short-chain.yaml --steps 0 --eval-problems 128 --eval-samples 8
    python experiments/plain_pg.py --config configs/short-chain.yaml --steps 100 --lr 1e-4 --out runs/plain/default
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import torch

from espo_async.utils import write_json


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def prompt_ids(tok, task, problem) -> list[int]:
    """A problem's prompt tokens as the warm-up trained on them (no special tokens)."""
    return tok.encode(task.format_prompt(problem), add_special_tokens=False)


def start(cfg):
    """(model folder, tokenizer, task) of a run of ``cfg``: the model built and warmed up exactly
    as the run would (cached), and its task."""
    from transformers import AutoTokenizer

    from espo_async.assets import resolve_model
    from espo_async.tasks.registry import make_task

    path = resolve_model(cfg.model.policy, cfg)
    return path, AutoTokenizer.from_pretrained(str(path)), make_task(cfg.task.name, **cfg.task.options)


def sampling_temperature(cfg) -> float:
    """The temperature held-out pass@1 is measured at: the evaluation's, else the rollouts'."""
    return cfg.task.eval_temperature or cfg.rollout.temperature


def write_result(result: dict, out: str | None) -> None:
    """The result JSON at ``out`` (nothing if None)."""
    if out:
        write_json(out, result)


@torch.no_grad()
def sample(model, tok, task, problems, *, n: int, temperature: float, max_new: int, batch: int = 256):
    """``n`` completions per problem: (problem index, response token ids, text), in order."""
    pad = tok.pad_token_id or 0
    prompts = [prompt_ids(tok, task, p) for p in problems]
    flat = [(i, prompts[i]) for i in range(len(problems)) for _ in range(n)]
    out = []
    for s in range(0, len(flat), batch):
        chunk = flat[s:s + batch]
        ids, mask = _left_pad([p for _, p in chunk], pad)
        kw = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad,
                             eos_token_id=tok.eos_token_id, **kw)[:, ids.shape[1]:]
        for (i, _), row in zip(chunk, gen.tolist()):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id) + 1]
            while row and row[-1] == pad and pad != tok.eos_token_id:
                row.pop()
            out.append((i, row, tok.decode(row, skip_special_tokens=True)))
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct of n samples (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def forward(model, tok, task, problems, samples):
    """One right-padded forward of prompt + response rows: (ids [B, L], log-probs [B, L, V],
    (prompt length, response length) per row). Row b's response token k is predicted at
    position prompt_length + k - 1."""
    pad = tok.pad_token_id or 0
    rows, spans = [], []
    for i, resp, _ in samples:
        p = prompt_ids(tok, task, problems[i])
        rows.append(p + resp)
        spans.append((len(p), len(resp)))
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1), spans


@torch.no_grad()
def token_entropy(model, tok, task, problems, samples) -> float:
    """Mean per-token entropy (nats) of the policy over the sampled responses' positions."""
    total, count = 0.0, 0
    for s in range(0, len(samples), 128):
        ids, lp, spans = forward(model, tok, task, problems, samples[s:s + 128])
        ent = -(lp.exp() * lp).sum(-1)
        for b, (pl, rl) in enumerate(spans):
            if rl:
                total += float(ent[b, pl - 1:pl - 1 + rl].sum())
                count += rl
    return total / max(count, 1)


def evaluate(model, tok, task, problems, *, n: int, temperature: float, max_new: int, k: int = 8,
             entropy: bool = True) -> dict:
    """Held-out statistics of a policy: pass@1 with its standard error over n x len(problems)
    samples, pass@k, greedy accuracy, mixed-outcome share, entropy, lengths, first-mistake
    position of wrong rollouts (relative to their length)."""
    model.eval()
    samples = sample(model, tok, task, problems, n=n, temperature=temperature, max_new=max_new)
    correct = [task.score(problems[i], text) > 0 for i, _, text in samples]
    per_problem = [0] * len(problems)
    for (i, _, _), c in zip(samples, correct):
        per_problem[i] += int(c)
    p1 = sum(correct) / len(correct)
    firsts = []
    for (i, resp, text), c in zip(samples, correct):
        if not c:
            pos = task.first_error_position(problems[i], text) if hasattr(task, "first_error_position") else None
            if pos is not None and len(text):
                firsts.append(min(pos / len(text), 1.0))
    lengths = [len(r) for _, r, _ in samples]
    wrong_tokens = sum(len(r) for (_, r, _), c in zip(samples, correct) if not c)
    greedy = sample(model, tok, task, problems, n=1, temperature=0.0, max_new=max_new)
    out = {
        "pass1": p1,
        "pass1_se": math.sqrt(p1 * (1 - p1) / len(correct)),
        f"pass{k}": sum(pass_at_k(n, c, k) for c in per_problem) / len(problems) if n >= k else None,
        "greedy": sum(task.score(problems[i], t) > 0 for i, _, t in greedy) / len(problems),
        "mixed_share": sum(0 < c < n for c in per_problem) / len(problems),
        "mean_len": sum(lengths) / len(lengths),
        "truncated_share": sum(1 for L in lengths if L >= max_new) / len(lengths),
        "wrong_token_share": wrong_tokens / max(sum(lengths), 1),
        "first_mistake_rel_mean": sum(firsts) / len(firsts) if firsts else None,
        "first_mistake_first_half": sum(f < 0.5 for f in firsts) / len(firsts) if firsts else None,
        "n_samples": len(correct),
    }
    if entropy:
        out["entropy"] = token_entropy(model, tok, task, problems, samples[: min(len(samples), 512)])
    return out


def train(model, tok, task, cfg, *, steps: int, lr: float, optim: str, log, credit: str = "all",
          trainable: str | None = None, adam_eps: float = 1e-8, kl_coef: float = 0.0) -> list[dict]:
    """GRPO-style policy gradient on sampled groups; one optimiser step per batch.

    ``credit="oracle"`` (a diagnostic, not a method: it reads the gold solution) trains a wrong
    rollout only on its tokens up to and including its first mistake, so the correct steps it
    takes after the mistake (on a wrong running value) are not pushed down with it (what ESPO's
    stop approximates); ``credit="mistake"`` trains a wrong rollout only on its first mistake
    token, the credit a perfect critic's TD errors would concentrate there. ``"positive"``
    trains on the correct rollouts alone (rejection-sampling fine-tuning), a sanity check.

    ``kl_coef`` > 0 adds kl_coef x the exact per-token KL(pi || pi_ref) over the vocabulary, at
    every response position, to the start model (the system's ``algo.kl_coef`` uses the sampled
    k3 estimator of the same quantity)."""
    r = cfg.rollout
    rng = random.Random(cfg.run.seed)
    problems = task.train_problems()
    params = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        pattern = re.compile(trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(bool(pattern.search(name)))
        params = [p for p in model.parameters() if p.requires_grad]
        log(f"training {sum(p.numel() for p in params)} parameters matching {trainable!r}")
    ref = None
    if kl_coef:
        import copy
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = (torch.optim.AdamW(params, lr=lr, eps=adam_eps, weight_decay=0.0) if optim == "adam"
           else torch.optim.SGD(params, lr=lr))
    history = []
    for step in range(1, steps + 1):
        batch = rng.sample(problems, r.prompts_per_batch)
        model.eval()
        samples = sample(model, tok, task, batch, n=r.samples_per_prompt, temperature=r.temperature,
                         max_new=r.max_tokens)
        rewards = torch.tensor([task.score(batch[i], t) for i, _, t in samples], dtype=torch.float32)
        g = rewards.view(r.prompts_per_batch, r.samples_per_prompt)
        if credit == "positive":  # fine-tuning on the own correct samples (RAFT): a sanity check
            adv = (g > 0).float().view(-1)
        else:
            adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
        model.train()
        ids, lp, spans = forward(model, tok, task, batch, samples)
        tok_lp = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        w = torch.zeros_like(tok_lp)
        for b, (pl, rl) in enumerate(spans):
            start, upto = 0, rl
            if credit in ("oracle", "mistake") and rewards[b] <= 0:
                i, _, text = samples[b]
                pos = task.first_error_position(batch[i], text)
                upto = min(rl, pos + 1) if pos is not None else rl  # char-level: token index = text index
                if credit == "mistake":  # only the first mistake itself
                    start = upto - 1
            w[b, pl - 1 + start:pl - 1 + upto] = adv[b]
        n_tok = max(sum(rl for _, rl in spans), 1)
        loss = -(tok_lp * w).sum() / n_tok
        kl_value = 0.0
        if ref is not None:
            with torch.no_grad():
                _, ref_lp, _ = forward(ref, tok, task, batch, samples)
            on = torch.zeros(tok_lp.shape)
            for b, (pl, rl) in enumerate(spans):
                on[b, pl - 1:pl - 1 + rl] = 1.0
            kl = ((lp[:, :-1].exp() * (lp[:, :-1] - ref_lp[:, :-1])).sum(-1) * on).sum() / n_tok
            kl_value = float(kl)
            loss = loss + kl_coef * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.algo.max_grad_norm))
        opt.step()
        rec = {"step": step, "reward": float(rewards.mean()), "grad_norm": gn,
               "mean_len": sum(rl for _, rl in spans) / len(spans), **({"kl": kl_value} if ref is not None else {})}
        history.append(rec)
        if step % 10 == 0 or step == steps:
            log(json.dumps(rec))
    model.eval()
    return history


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from espo_async.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/short-chain.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--steps", type=int, default=0, help="policy-gradient steps (0: only measure the start)")
    ap.add_argument("--lr", type=float, default=None, help="default: the config's algo.lr")
    ap.add_argument("--optim", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--adam-eps", type=float, default=1e-8, help="Adam's epsilon")
    ap.add_argument("--kl-coef", type=float, default=0.0, help="weight of the exact per-token KL to the start model")
    ap.add_argument("--trainable", default=None, help="regex of the parameter names to train (default: all)")
    ap.add_argument("--credit", choices=("all", "oracle", "mistake", "positive"), default="all",
                    help="oracle: wrong rollouts train only up to their first mistake; mistake: only on it (diagnostics)")
    ap.add_argument("--eval-problems", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, a.set)
    torch.manual_seed(cfg.run.seed)
    t0 = time.time()
    path, tok, task = start(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    problems = task.eval_problems()[: a.eval_problems]
    ev = dict(n=a.eval_samples, temperature=sampling_temperature(cfg), max_new=cfg.rollout.max_tokens)
    result = {"config": a.config, "overrides": a.set, "argv": argv if argv is not None else sys.argv[1:],
              "model_s": time.time() - t0}
    result["before"] = evaluate(model, tok, task, problems, **ev)
    print("before", json.dumps(result["before"]), flush=True)
    if a.steps:
        t1 = time.time()
        result["history"] = train(model, tok, task, cfg, steps=a.steps, lr=a.lr or cfg.algo.lr, optim=a.optim,
                                  log=lambda s: print(s, flush=True), credit=a.credit, trainable=a.trainable,
                                  adam_eps=a.adam_eps, kl_coef=a.kl_coef)
        result["train_s"] = time.time() - t1
        result["after"] = evaluate(model, tok, task, problems, **ev)
        print("after", json.dumps(result["after"]), flush=True)
    write_result(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
