"""Async against sync: wall-clock of the same number of training steps, the async pipeline
against a synchronous generate-then-train loop of the same system.

    python bench/async_vs_sync.py            # full: 20 steps each, order sync, async, async, sync
    python bench/async_vs_sync.py --quick    # 3 steps each, order sync, async

Both runs are configs/short-chain.yaml (vLLM sampler on core 0; critic, stopper, coordinator and
DeepSpeed learner on core 1; 64 rollouts per step; ESPO stopping) with evaluation rounds off, and
differ only in ``rollout.synchronous``: true makes batch i's rollouts start only after step i
finished and the sampler loaded its weights (generate, then train, then sync weights, repeat);
false is the normal pipeline (staleness 1: generation of the next batch overlaps training).

Wall-clock = first rollout started .. step N's training finished (``step_end_time`` in
metrics.jsonl); start-up (engine build, DeepSpeed init) is before it and the same for both.
Also reported: steady-state seconds per step (median gap between consecutive step ends, step 2
onwards), the whole run including start-up, and for the async run how much of the learner's
training time overlapped generation (rollouts in flight).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np

import common as C

NAME = "async_vs_sync"


def overrides(steps: int, synchronous: bool) -> list[str]:
    return [f"run.total_steps={steps}", "run.checkpoint_every=0", "task.eval_problems=0", "task.eval_every=0",
            f"rollout.synchronous={'true' if synchronous else 'false'}"]


def analyse(run_dir: Path, run: dict, steps: int) -> dict:
    trajs = C.trajectories(run_dir)
    mets = C.metrics(run_dir)
    t0 = min(t.started_at for t in trajs)
    ends = [m["step_end_time"] for m in mets]
    train = [(m["step_end_time"] - m["train_seconds"], m["step_end_time"]) for m in mets]
    gen = [(t.started_at, t.ended_at) for t in trajs]
    gaps = np.diff(ends)
    gen_busy = C.interval_union(gen)
    train_total = float(sum(b - a for a, b in train))
    return {
        "steps": len(mets),
        "wall_s": ends[-1] - t0,
        "run_wall_s": run["wall_s"],
        "startup_s": t0 - run["t_start"],
        "s_per_step_steady": float(np.median(gaps[1:])) if len(gaps) > 1 else float(gaps[0]) if len(gaps) else None,
        "step_gaps_s": [float(g) for g in gaps],
        "first_step_s": ends[0] - t0,
        "train_s_total": train_total,
        "train_s_mean": train_total / max(len(train), 1),
        "generation_busy_s": gen_busy,
        "train_overlapping_generation_s": C.overlap(train, gen),
        "tokens_generated": float(sum(t.tokens_generated for t in trajs)),
        "stop_rate": float(np.mean([m.get("stop_rate", 0.0) for m in mets])),
        "step_end_times": [e - t0 for e in ends],
    }


async def one(args, steps: int, synchronous: bool) -> dict:
    cfg = C.bench_config(overrides(steps, synchronous) + args.set)
    run_dir = C.run_dir_for("sync" if synchronous else "async", args.keep)
    run = await C.run_system(cfg, run_dir)
    res = {"mode": "sync" if synchronous else "async", **analyse(run_dir, run, steps), "loadavg": C.loadavg()}
    C.remove_run(run_dir, args.keep)
    return res


async def main_async(args) -> dict:
    steps = args.steps or (3 if args.quick else 20)
    order = args.order or (["sync", "async"] if args.quick else ["sync", "async", "async", "sync"])
    runs = []
    for mode in order:
        print(f"[{NAME}] {mode} ... (load {C.loadavg()})", file=sys.stderr, flush=True)
        runs.append(await one(args, steps, mode == "sync"))
        print(f"[{NAME}] {mode}: {runs[-1]['wall_s']:.1f}s", file=sys.stderr, flush=True)
    med = {m: float(np.median([r["wall_s"] for r in runs if r["mode"] == m])) for m in ("sync", "async")}
    step = {m: float(np.median([r["s_per_step_steady"] for r in runs if r["mode"] == m])) for m in ("sync", "async")}
    return {"runs": runs, "summary": {"steps": steps, "wall_s_median": med, "s_per_step_median": step,
                                       "speedup": med["sync"] / med["async"],
                                       "speedup_steady": step["sync"] / step["async"], "target": 1.5}}


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--order", nargs="+", choices=["sync", "async"], default=None)
    args = ap.parse_args(argv)
    meta = C.begin(args)
    res = asyncio.run(main_async(args))
    C.print_table(res["runs"], [("mode", "mode", ""), ("steps", "steps", "d"), ("wall_s", "wall s", ".1f"),
                                ("s_per_step_steady", "s/step", ".2f"), ("first_step_s", "first step s", ".2f"),
                                ("train_s_mean", "train s/step", ".2f"), ("generation_busy_s", "gen busy s", ".1f"),
                                ("train_overlapping_generation_s", "train||gen s", ".1f"),
                                ("run_wall_s", "run incl. start s", ".1f"), ("loadavg", "load", "")])
    s = res["summary"]
    print(f"async vs sync, {s['steps']} steps: sync {s['wall_s_median']['sync']:.1f}s / async "
          f"{s['wall_s_median']['async']:.1f}s = {s['speedup']:.2f}x (steady state {s['speedup_steady']:.2f}x; "
          f"target >= {s['target']})")
    C.finish(NAME, args, res, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
