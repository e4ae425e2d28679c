"""Cost of streaming values: HFValueModel incremental (KV cache) vs recompute (full prefix).

Replays one fixed arrival schedule against every configuration, side by side in one process:
``--streams`` concurrent streams (default 8) of ``--tokens`` response tokens (default 128), each
starting with a random prompt, tokens arriving in chunks of 1..``--max-chunk`` (default 4) per
stream per round; one ``values()`` call per round holds every stream with new tokens (what the
critic actor does when the model keeps up). Value interval k: only states at positions that are
multiples of k are needed (the critic sends only those); with ``lazy`` the model runs for a
stream only when such a state arrives, and the incremental cache still ingests every token.

    python bench/critic_cost.py                          # tiny model
    python bench/critic_cost.py --model smollm2-135m     # SmolLM2-135M (converted once, cached)
    python bench/critic_cost.py --model tiny smollm2-135m --repeats 3

Prints a table and writes JSON to ``--out`` (default bench/results/critic_cost.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from actors.critics.base import ValueRequest
from actors.critics.hf import HFValueModel, HFValueOptions

TINY_ALPHABET = "0123456789+-*=;.AQ"

# (label, mode, lazy): lazy only matters for interval > 1
VARIANTS = [("incremental", "incremental", True), ("recompute", "recompute", True),
            ("incremental-eager", "incremental", False)]


def model_dir(spec: str) -> str:
    if spec == "tiny":
        from espo_async.models.tiny import build_tiny_model

        return str(build_tiny_model(None, TINY_ALPHABET))
    from espo_async.models.loading import resolve_model

    return str(resolve_model(spec))


def schedule(n_streams: int, n_tokens: int, prompt_len: int, max_chunk: int, vocab: int, seed: int):
    """Per stream: prompt, tokens, and the chunk sizes; rounds are implicit (one chunk per round)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_streams):
        p = int(rng.integers(max(1, prompt_len // 2), prompt_len * 3 // 2 + 1))
        sizes, left = [], n_tokens
        while left:
            sizes.append(min(left, int(rng.integers(1, max_chunk + 1))))
            left -= sizes[-1]
        out.append((rng.integers(4, vocab, p), rng.integers(4, vocab, n_tokens), sizes))
    return out


def replay(model: HFValueModel, streams, interval: int) -> dict:
    """One pass over the schedule; returns timing and the needed values (for cross-checks)."""
    cursors = [0] * len(streams)
    rounds = max(len(s[2]) for s in streams)
    got: list[list[float]] = [[] for _ in streams]
    f0, t0_tokens = model.stats["forwards"], model.stats["tokens_in"]
    call_s = []
    for r in range(rounds):
        batch, owners = [], []
        for k, (prompt, toks, sizes) in enumerate(streams):
            if r >= len(sizes):
                continue
            a = cursors[k]
            n = sizes[r]
            batch.append(ValueRequest(f"s{k}", prompt if r == 0 else None, toks[a : a + n], len(got[k])))
            owners.append(k)
            cursors[k] = a + n
        t0 = time.perf_counter()
        res = model.values(batch)
        call_s.append(time.perf_counter() - t0)
        for k, vals in zip(owners, res):
            got[k].extend(vals.tolist())
        for k, (_, _, sizes) in enumerate(streams):
            if r == len(sizes) - 1:
                model.end(f"s{k}")
    needed = [np.asarray(g)[np.arange(len(g)) % interval == 0] for g in got]
    return {
        "total_s": float(sum(call_s)),
        "calls": len(call_s),
        "forwards": model.stats["forwards"] - f0,
        "tokens_in": model.stats["tokens_in"] - t0_tokens,
        "values_needed": int(sum(len(n) for n in needed)),
        "max_call_ms": 1e3 * max(call_s),
        "needed": needed,
    }


def bench_model(spec: str, args) -> list[dict]:
    path = model_dir(spec)
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    prompt_len = args.prompt_len or (32 if spec == "tiny" else 64)
    streams = schedule(args.streams, args.tokens, prompt_len, args.max_chunk, vocab, args.seed)
    models = {}
    for label, mode, lazy in VARIANTS:
        for k in args.intervals:
            if label == "incremental-eager" and k == 1:
                continue  # identical to lazy at interval 1
            if label not in args.variants:
                continue
            key = (label, k)
            models[key] = HFValueModel(path, HFValueOptions(mode=mode, lazy=lazy, max_batch=args.max_batch),
                                       value_interval=k)
    # warm-up (allocator, lazy imports) on a short schedule
    warm = schedule(2, 8, 8, args.max_chunk, vocab, args.seed + 1)
    for m in models.values():
        replay(m, warm, m.interval)
    runs: dict[tuple, list[dict]] = {key: [] for key in models}
    for rep in range(args.repeats):  # interleaved: every configuration sees the same machine state
        for key, m in models.items():
            runs[key].append(replay(m, streams, key[1]))
            print(f"  [{spec}] repeat {rep + 1}/{args.repeats} {key[0]:>17} k={key[1]}: "
                  f"{runs[key][-1]['total_s']:.2f}s", file=sys.stderr, flush=True)
    rows = []
    for (label, k), rs in runs.items():
        ref = runs.get(("incremental", k), rs)[0]["needed"]
        diff = max(float(np.nanmax(np.abs(a - b), initial=0.0)) for a, b in zip(rs[0]["needed"], ref))
        total = statistics.median(r["total_s"] for r in rs)
        first = rs[0]
        rows.append({
            "model": spec, "variant": label, "interval": k, "streams": args.streams, "tokens": args.tokens,
            "prompt_tokens": int(sum(len(s[0]) for s in streams)), "repeats": args.repeats,
            "total_s": total, "total_s_all": [r["total_s"] for r in rs],
            "ms_per_value": 1e3 * total / first["values_needed"],
            "ms_per_token": 1e3 * total / (args.streams * args.tokens),
            "values_needed": first["values_needed"], "calls": first["calls"], "forwards": first["forwards"],
            "tokens_in": first["tokens_in"], "max_call_ms": max(r["max_call_ms"] for r in rs),
            "max_abs_diff_vs_incremental": diff,
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["tiny"], help="tiny and/or smollm2-135m (or a model path)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=None, help="mean prompt tokens (default 32 tiny, 64 others)")
    ap.add_argument("--max-chunk", type=int, default=4)
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS])
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the actor spawner sets these in a run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/critic_cost.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for spec in args.model:
        rows += bench_model(spec, args)

    head = f"{'model':<14}{'variant':<19}{'k':>3}{'total s':>10}{'ms/value':>10}{'ms/token':>10}" \
           f"{'values':>8}{'calls':>7}{'fwds':>6}{'tok in':>8}{'max diff':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<14}{r['variant']:<19}{r['interval']:>3}{r['total_s']:>10.3f}{r['ms_per_value']:>10.3f}"
              f"{r['ms_per_token']:>10.3f}{r['values_needed']:>8}{r['calls']:>7}{r['forwards']:>6}"
              f"{r['tokens_in']:>8}{r['max_abs_diff_vs_incremental']:>10.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": __import__("os").cpu_count(), "args": vars(args),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
