"""Memory: peak resident memory of each actor in the default run.

    python bench/memory.py            # configs/short-chain.yaml, 30 learner steps (with evaluation rounds)
    python bench/memory.py --quick    # 5 steps

The real system of configs/short-chain.yaml (vLLM sampler, HF critic, stopper, coordinator, DeepSpeed
learner, pinned as there); a sampler polls every actor's process tree every 0.25 s (psutil):

* peak RSS of the actor's whole process tree (the vLLM sampler has an engine-core child process;
  PyTorch/DeepSpeed may start helpers), and of the actor's own process;
* peak PSS (proportional set size, shared pages split between the processes that map them),
  every 8th sample: RSS counts the shared libraries (torch alone maps ~0.5 GB) once per process,
  so the sum of RSS over actors overstates what the run needs; the sum of PSS does not.

The supervisor runs inside this script's process: its row is that process alone (supervisor plus
the benchmark's own bookkeeping, an upper bound), without the actors it started.
"""

from __future__ import annotations

import asyncio
import sys

import common as C

NAME = "memory"
MB = 1 << 20


async def main_async(args) -> dict:
    steps = args.steps or (5 if args.quick else 30)
    cfg = C.bench_config([f"run.total_steps={steps}", "run.checkpoint_every=0", *args.set])
    run_dir = C.run_dir_for(NAME, args.keep)
    print(f"[{NAME}] {steps} steps of configs/short-chain.yaml ... (load {C.loadavg()})", file=sys.stderr, flush=True)
    run = await C.run_system(cfg, run_dir, timeout=3600, memory=True)
    peaks = run["memory"]
    rows = []
    for name, p in sorted(peaks.items()):
        rows.append({
            "actor": name,
            "peak_rss_mb": p["peak_rss"] / MB,
            "peak_self_rss_mb": p["peak_self_rss"] / MB,
            "peak_pss_mb": (p["peak_pss"] or 0) / MB,
            "processes": p["n_procs_at_peak"],
            "children_at_peak_mb": {k: v / MB for k, v in p["children_at_peak"].items()},
        })
    res = {
        "steps": steps,
        "rows": rows,
        "run_wall_s": run["wall_s"],
        "loadavg": C.loadavg(),
        "summary": {
            "sum_peak_rss_mb": sum(r["peak_rss_mb"] for r in rows),
            "sum_peak_pss_mb": sum(r["peak_pss_mb"] for r in rows),
        },
    }
    C.remove_run(run_dir, args.keep)
    return res


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    meta = C.begin(args)
    res = asyncio.run(main_async(args))
    C.print_table(res["rows"], [("actor", "actor", "s"), ("peak_rss_mb", "peak RSS MB (tree)", ".0f"),
                                ("peak_self_rss_mb", "peak RSS MB (own)", ".0f"),
                                ("peak_pss_mb", "peak PSS MB (tree)", ".0f"), ("processes", "processes", "d")])
    s = res["summary"]
    print(f"sum of peak PSS: {s['sum_peak_pss_mb']:.0f} MB (sum of peak RSS {s['sum_peak_rss_mb']:.0f} MB "
          "counts shared libraries once per process)")
    C.finish(NAME, args, res, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
