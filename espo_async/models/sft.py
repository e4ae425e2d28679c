"""Supervised warm-up of the tiny model on a task's gold step-by-step solutions.

RL needs a policy that is sometimes right: the randomly initialised tiny model never is. This
trains it with teacher forcing on ``prompt + solution + EOS`` (loss on the solution and EOS
only) for ``model.sft_steps`` steps, then caches the result under the cache folder, keyed by a
hash of everything that affects it (base model, task and its options, steps, hyper-parameters,
seed), so later runs start at once. The warm-up is deterministic for a given key and thread
count (``model.sft_threads``; on another thread count it agrees to rounding).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import torch

from espo_async.utils import atomic_dir

SFT_VERSION = 1
SFT_META = "espo_sft.json"


def _key(base_dir: Path, config) -> dict:
    base_meta = base_dir / "espo_tiny_spec.json"
    return {
        "sft_version": SFT_VERSION,
        "base": json.loads(base_meta.read_text()).get("spec_hash") if base_meta.is_file() else str(base_dir),
        "task": config.task.name,
        "task_options": config.task.options,
        "steps": config.model.sft_steps,
        "batch": config.model.sft_batch,
        "lr": config.model.sft_lr,
        "seed": config.model_seed,
        # only when set: the warm-ups cached before this option keep their keys
        **({"label_smoothing": config.model.sft_label_smoothing} if config.model.sft_label_smoothing else {}),
    }


def warm_up(base_dir: str | os.PathLike, config, *, log=print) -> Path:
    """The warmed-up model directory for ``config`` (trained now, or taken from the cache)."""
    from espo_async.models.tiny import default_cache_dir

    base_dir = Path(base_dir)
    key = _key(base_dir, config)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out = default_cache_dir() / "models" / f"sft-{digest}"
    if (out / SFT_META).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # another process finished first: keep theirs
    with atomic_dir(out, keep=lambda d: (d / SFT_META).is_file()) as tmp:
        report = train_sft(base_dir, tmp, config, log=log)
        (tmp / SFT_META).write_text(json.dumps({"key": key, **report}, indent=1))
    return out


def _batches(task, tokenizer, batch_size: int, rng: random.Random):
    problems = task.train_problems()
    eos = tokenizer.eos_token_id
    while True:
        rows = []
        for p in rng.sample(problems, min(batch_size, len(problems))):
            prompt = tokenizer.encode(task.format_prompt(p), add_special_tokens=False)
            target = tokenizer.encode(task.solution(p), add_special_tokens=False) + [eos]
            rows.append((prompt, target))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (a, b) in enumerate(rows):
            seq = a + b
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(a) : len(seq)] = torch.tensor(b)
            mask[i, : len(seq)] = 1
        yield ids, mask, labels


def greedy_accuracy(model, tokenizer, task, problems, max_new_tokens: int) -> float:
    """Exact-answer accuracy of greedy decoding (left-padded batch)."""
    if not problems:
        return float("nan")
    scores = greedy_scores(model, tokenizer, task, problems, max_new_tokens)
    return sum(scores) / len(scores)


@torch.no_grad()
def greedy_scores(model, tokenizer, task, problems, max_new_tokens: int) -> list[float]:
    """Each problem's score under greedy decoding (one left-padded batch)."""
    prompts = [tokenizer.encode(task.format_prompt(p), add_special_tokens=False) for p in problems]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [float(task.score(p, t)) for p, t in zip(problems, texts)]


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` [B, L, V] against ``labels`` [B, L] (-100: not
    scored), the mean over scored tokens. With ``label_smoothing`` s each target keeps 1 - s of
    its probability mass and s is spread evenly over the vocabulary (``model.sft_label_smoothing``)."""
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, label_smoothing=label_smoothing)


def warm_up_threads(requested: int) -> int:
    """``model.sft_threads``, capped at the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(requested, cpus))


def train_sft(base_dir: Path, out_dir: Path, config, *, log=print) -> dict:
    m = config.model
    threads = torch.get_num_threads()
    torch.set_num_threads(warm_up_threads(m.sft_threads))
    try:
        return _train(base_dir, out_dir, config, m, log)
    finally:
        torch.set_num_threads(threads)


def _train(base_dir: Path, out_dir: Path, config, m, log) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_async.tasks.registry import make_task

    torch.manual_seed(config.model_seed)
    rng = random.Random(config.model_seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    task = make_task(config.task.name, **config.task.options)
    opt = torch.optim.AdamW(model.parameters(), lr=m.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=m.sft_lr, total_steps=m.sft_steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    batches = _batches(task, tokenizer, m.sft_batch, rng)
    every = max(1, m.sft_steps // 10)
    loss_value = float("nan")
    log(f"supervised warm-up of the tiny model: {m.sft_steps} steps (cached afterwards)")
    for step in range(1, m.sft_steps + 1):
        ids, mask, labels = next(batches)
        loss = sft_loss(model(input_ids=ids, attention_mask=mask).logits, labels, m.sft_label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if step % every == 0 or step == m.sft_steps:
            log(f"  sft step {step}/{m.sft_steps}: loss {loss_value:.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    eval_problems = task.eval_problems()[:64]
    max_new = max(len(task.solution(p)) for p in eval_problems) + 8 if eval_problems else 32
    accuracy = greedy_accuracy(model, tokenizer, task, eval_problems, max_new)
    log(f"  sft done in {time.time() - t0:.0f}s: greedy held-out accuracy {accuracy:.3f} on {len(eval_problems)} problems")
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {"final_loss": loss_value, "greedy_eval_accuracy": accuracy, "seconds": time.time() - t0}
