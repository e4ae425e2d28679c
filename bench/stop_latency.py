"""Stop latency: from the stopper's decision to the engine's abort, and the tokens wasted.

    python bench/stop_latency.py             # full: 10 steps, ipc and tcp (loopback) transports
    python bench/stop_latency.py --quick     # 2 steps, tcp only
    python bench/stop_latency.py --transport tcp --variant nice5:actors.sampler.options.engine_nice=5

Runs the real system of configs/short-chain.yaml (vLLM sampler, HF critic, stopper, DeepSpeed
learner; pinned as there) with a stop policy that fires often, ``stop.policy random`` at
``stop.random_rate`` 0.5 and the warm-up gate off (ESPO's rule fires rarely on this model; the
decision -> cancel -> abort path is the same for every policy: ``--policy espo`` measures the
real rule). Every honoured cancel is one sample from RUN_DIR/logs/<sampler>.cancels.jsonl:

* decision -> abort = ``aborted_at - decided_at`` (stopper's decision time, unix clock; abort
  = after ``VLLMEngine.abort`` returned in the sampler; one machine, one clock)
  split into decision -> receipt (transport + the sampler's event loop) and receipt -> abort
  (the engine's abort call);
* tokens generated after the cancel reached the sampler = ``tokens_generated - tokens_at_receipt``
  (a lower bound of tokens after the decision);
* tokens after the stop token = ``tokens_generated - (stop_index + 1)`` (everything generated
  past the kept prefix: the stopper's lag behind generation plus the above);
* the sampler's event-loop lag (``loop_lag.*`` heartbeat counters, ``transport.loop_probe_interval_s``):
  the share of 10 ms probe timers that fired more than 5 / 20 ms late, i.e. how often a cancel
  arriving at a random moment would wait that long for the loop.

Targets: p99 decision -> abort <= 5 ms on loopback (tcp 127.0.0.1), mean wasted tokens <= 1.
"""

from __future__ import annotations

import asyncio
import sys

import common as C

NAME = "stop_latency"


def overrides(steps: int, transport: str, policy: str, rate: float) -> list[str]:
    o = [f"run.total_steps={steps}", "run.checkpoint_every=0", "task.eval_problems=0", "task.eval_every=0",
         f"stop.policy={policy}", "stop.warmup.enabled=false", f"transport.kind={transport}"]
    if policy == "random":
        o.append(f"stop.random_rate={rate}")
    return o


def summarize(records: list[dict]) -> dict:
    ms = 1e3
    lat = [r["aborted_at"] - r["decided_at"] for r in records]
    recv = [r["received_at"] - r["decided_at"] for r in records]
    abort = [r["aborted_at"] - r["received_at"] for r in records]
    after_receipt = [r["tokens_generated"] - r["tokens_at_receipt"] for r in records]
    after_stop = [r["tokens_generated"] - (r["stop_index"] + 1) for r in records]
    lag_at_receipt = [r["tokens_at_receipt"] - (r["stop_index"] + 1) for r in records]
    return {
        "decision_to_abort_ms": C.stats(lat, ms),
        "decision_to_receipt_ms": C.stats(recv, ms),
        "receipt_to_abort_ms": C.stats(abort, ms),
        "tokens_after_receipt": C.stats(after_receipt),
        "tokens_after_stop_token": C.stats(after_stop),
        "tokens_past_stop_at_receipt": C.stats(lag_at_receipt),
    }


def loop_lag(counters: dict) -> dict:
    """An actor's event-loop lag histogram (its ``loop_lag.*`` heartbeat counters): the share of
    probe samples above 5 ms and above 20 ms, and the worst."""
    n = counters.get("loop_lag.samples", 0.0)
    over = {b: sum(v for k, v in counters.items() if k.startswith(("loop_lag.le_", "loop_lag.gt_"))
                   and (k.startswith("loop_lag.gt_") or float(k[12:-2]) > b)) for b in (5, 20)}
    return {"samples": n, "over_5ms": over[5] / n if n else None, "over_20ms": over[20] / n if n else None,
            "max_ms": counters.get("loop_lag.max_ms")}


async def one_run(args, steps: int, transport: str, variant: tuple[str, list[str]] = ("default", [])) -> dict:
    cfg = C.bench_config(overrides(steps, transport, args.policy, args.rate) + args.set + variant[1])
    run_dir = C.run_dir_for(f"stop-{transport}", args.keep)
    run = await C.run_system(cfg, run_dir)
    records = [r for rs in C.sampler_logs(run_dir, "cancels").values() for r in rs]
    cnt = C.counters(run["result"])
    res = {
        "variant": variant[0],
        "overrides": variant[1],
        "transport": transport,
        "policy": args.policy,
        "steps": steps,
        "cancels_honoured": len(records),
        "cancels_sent": cnt.get("stopper", {}).get("cancels_sent", 0.0),
        "cancel_after_end": sum(c.get("cancel_after_end", 0.0) for n, c in cnt.items() if n.startswith("sampler")),
        **summarize(records),
        "loop_lag": {n: loop_lag(c) for n, c in cnt.items() if n.startswith(("sampler", "stopper"))},
        "loadavg": C.loadavg(),
        "records": records,
        "run_dir": str(run_dir) if args.keep else None,
    }
    C.remove_run(run_dir, args.keep)
    return res


async def main_async(args) -> dict:
    steps = args.steps or (2 if args.quick else 10)
    transports = args.transport or (["tcp"] if args.quick else ["ipc", "tcp"])
    runs = []
    for variant in C.variants(args):
        for tr in transports:
            print(f"[{NAME}] {variant[0]} {tr} ... (load {C.loadavg()})", file=sys.stderr, flush=True)
            runs.append(await one_run(args, steps, tr, variant))
    return {"runs": runs, "targets": {"p99_ms": 5.0, "mean_wasted_tokens": 1.0}}


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--transport", nargs="+", choices=["ipc", "tcp"], default=None)
    ap.add_argument("--policy", default="random", choices=["random", "espo", "regret_only"])
    ap.add_argument("--rate", type=float, default=0.5, help="stop.random_rate for --policy random")
    args = ap.parse_args(argv)
    meta = C.begin(args)
    res = asyncio.run(main_async(args))
    rows = []
    for r in res["runs"]:
        d, rc, ab = r["decision_to_abort_ms"], r["decision_to_receipt_ms"], r["receipt_to_abort_ms"]
        rows.append({"variant": r["variant"], "transport": r["transport"], "n": r["cancels_honoured"], "p50": d["p50"], "p99": d["p99"],
                     "max": d["max"], "recv_p50": rc["p50"], "recv_p99": rc["p99"], "abort_p50": ab["p50"],
                     "abort_p99": ab["p99"], "after_receipt": r["tokens_after_receipt"]["mean"],
                     "after_stop": r["tokens_after_stop_token"]["mean"],
                     "lag5": r["loop_lag"].get("sampler-0", {}).get("over_5ms"),
                     "lag20": r["loop_lag"].get("sampler-0", {}).get("over_20ms"), "load": r["loadavg"]})
    C.print_table(rows, [("variant", "variant", ""), ("transport", "transport", ""), ("n", "cancels", "d"), ("p50", "p50 ms", ".2f"),
                         ("p99", "p99 ms", ".2f"), ("max", "max ms", ".1f"), ("recv_p50", "recv p50", ".2f"),
                         ("recv_p99", "recv p99", ".2f"), ("abort_p50", "abort p50", ".2f"),
                         ("abort_p99", "abort p99", ".2f"), ("after_receipt", "tok after receipt", ".2f"),
                         ("after_stop", "tok after stop", ".2f"), ("lag5", "sampler loop >5ms", ".3f"),
                         ("lag20", "sampler loop >20ms", ".3f"), ("load", "load", "")])
    C.finish(NAME, args, res, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
