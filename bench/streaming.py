"""Streaming overhead: generation throughput of the whole pipeline against offline vLLM.

    python bench/streaming.py            # full: 10 learner steps (640 rollouts) per pipeline run
    python bench/streaming.py --quick    # 2 steps (128 rollouts)
    python bench/streaming.py --steps 3 --set model.policy=smollm2-135m --set model.critic=policy \
        --set model.sft_steps=0 --set transport.startup_timeout_s=900     # a real 135M model
    python bench/streaming.py --variant nice5:actors.sampler.options.engine_nice=5   # A/B

Side by side in one invocation (order: pipeline, offline [, pipeline, offline ...], offline; the
first pipeline run fixes the prompts every offline run uses; with ``--variant`` every step of
that order runs once per variant, interleaved, on the same prompts):

* **pipeline**: the real system of configs/short-chain.yaml (vLLM sampler pinned to core 0; HF
  critic, stopper, coordinator and DeepSpeed learner on core 1) with ``stop.policy none``, no
  evaluation rounds, and ``rollout.staleness`` = the number of steps, so the coordinator issues
  every batch at once and generation never waits for the learner (the learner still trains,
  publishes weights after every step and the sampler hot-loads them while it generates).
  Throughput = sum of ``tokens_generated`` of every trajectory the learner received, divided by
  the generation window [first request started, last trajectory ended] (both from the learner's
  trajectory log). Start-up (engine build, model load) lies before the window; the learner's
  training overlaps it and costs the window nothing unless it competes for the sampler's core.
* **offline**: the same engine (``VLLMGeneration.start``: same model, engine arguments, KV size,
  max_model_len, seed, thread binding) in a process pinned to the sampler's cores, given the
  pipeline's exact prompts (same count, order) at once, with the same sampling parameters
  (temperature, top_p, max_tokens, EOS stop, logprobs=1, DELTA streaming, no detokenizing as
  the sampler), read by a consumer
  that only counts tokens. Throughput = tokens / (first submit .. last finish).
* ``--llm``: also vLLM's offline ``LLM.generate`` (the synchronous batch API) with the same
  engine arguments and prompts.

ratio = pipeline tokens/s / median offline tokens/s (target >= 0.90). Also where the sampler's
core went in each run's window (``C.CpuSampler``: CPU of vLLM's worker, its engine core, the
front-end process, per generated token). Also "after the first wave":
the same ratio leaving out the engine's first batch (``max_num_seqs`` requests per sampler) on
both sides, because the pipeline's first batch overlaps every actor's start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import common as C

NAME = "streaming"


# ------------------------------------------------------------------------------------ offline
def engine_spec(cfg, run_dir: Path) -> dict:
    """What VLLMSampler.make_engine would build for sampler 0 of this run."""
    from actors.samplers.vllm import VLLMOptions, VLLMSampler
    from espo_async.assets import load_assets

    assets = load_assets(run_dir)
    opts = VLLMOptions(**cfg.actors.sampler.options)
    fake = SimpleNamespace(assets=assets, cfg=cfg)
    max_len = opts.max_model_len or cfg.rollout.max_tokens + VLLMSampler.max_prompt_tokens(fake)
    return {"model_dir": assets.policy_dir, "options": opts.model_dump(), "max_model_len": max_len,
            "dtype": cfg.model.dtype, "seed": cfg.run.seed, "cpus": cfg.actors.sampler.cpus,
            "threads": cfg.actors.sampler.threads}


BURNER = """
import os, torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
while True:
    a = torch.tanh(a @ a)  # compute on the other cores, as the learner and critic do in the pipeline
"""


def start_burners(spec: dict) -> list[subprocess.Popen]:
    """One busy process per core that is not the sampler's (--busy-neighbours)."""
    mine = set(spec["cpus"] or [])
    others = [c for c in sorted(os.sched_getaffinity(0)) if c not in mine]
    return [subprocess.Popen([sys.executable, "-c", BURNER], env=dict(os.environ, OMP_NUM_THREADS="1"),
                             preexec_fn=(lambda c=c: os.sched_setaffinity(0, [c]))) for c in others]


def run_offline(spec: dict, prompts: list[list[int]], params: dict, mode: str) -> dict:
    """Run the offline worker in its own process with the sampler's pinning and environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    cpus = spec["cpus"]
    job = Path(C.run_dir_for(f"offline-{mode}", keep=False))
    (job / "spec.json").write_text(json.dumps({"spec": spec, "prompts": prompts, "params": params, "mode": mode}))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--offline-worker", str(job / "spec.json")],
        env=env, cwd=C.REPO, capture_output=True, text=True, timeout=1800,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    out = job / "spec.json.out"
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"offline worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    C.remove_run(job, keep=False)
    return res


async def _offline_async(spec: dict, prompts, params) -> dict:
    from actors.samplers.vllm import VLLMGeneration, VLLMOptions

    gen = VLLMGeneration(spec["model_dir"], VLLMOptions(**spec["options"]), max_model_len=spec["max_model_len"],
                         dtype=spec["dtype"], seed=spec["seed"])
    await gen.start()  # same engine construction as the sampler (thread binding included)
    eng = gen.engine
    try:
        counts = [0] * len(prompts)
        ends = [0.0] * len(prompts)
        firsts = [0.0] * len(prompts)

        async def one(i: int, ids: list[int]) -> None:
            async for chunk in eng.generate(f"off-{i}", ids, max_tokens=params["max_tokens"],
                                            temperature=params["temperature"], top_p=params["top_p"],
                                            stop_token_ids=gen.eos or None, detokenize=False):
                firsts[i] = firsts[i] or time.time()
                counts[i] += len(chunk)
            ends[i] = time.time()

        t0 = time.time()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        t1 = time.time()
    finally:
        await gen.shutdown()
    return {"t0": t0, "t1": t1, "tokens": int(sum(counts)), "per_request_tokens": counts,
            "per_request_end_s": [e - t0 for e in ends], "per_request_first_s": [f - t0 for f in firsts]}


def steady_rate(starts: list[float], ends: list[float], tokens: list[int], first_wave: int) -> float | None:
    """Tokens/s after the first wave: the ``first_wave`` earliest-starting requests (the engine's
    first batch, cold, and in the pipeline overlapping every actor's start-up) are left out; the
    window runs from the first start among the rest to the last end."""
    order = sorted(range(len(starts)), key=starts.__getitem__)[first_wave:]
    if not order:
        return None
    t0, t1 = min(starts[i] for i in order), max(ends[i] for i in order)
    return sum(tokens[i] for i in order) / (t1 - t0) if t1 > t0 else None


def _offline_llm(spec: dict, prompts, params) -> dict:
    """vLLM's synchronous offline API with the same engine arguments."""
    import vllm
    from vllm.inputs import TokensPrompt

    o = spec["options"]
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < (os.cpu_count() or len(mine)):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))
    kv = o.get("kv_cache_gib") or 1.0
    if float(kv).is_integer():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv))
    llm = vllm.LLM(model=spec["model_dir"], dtype=spec["dtype"], seed=spec["seed"], max_num_seqs=o["max_num_seqs"],
                   max_model_len=spec["max_model_len"], enforce_eager=True, logprobs_mode="raw_logprobs",
                   disable_log_stats=True, kv_cache_memory_bytes=int(kv * (1 << 30)), **o.get("engine_args", {}))
    tok = llm.get_tokenizer()
    eos = [int(tok.eos_token_id)] if o.get("stop_on_eos", True) and tok.eos_token_id is not None else None
    sp = vllm.SamplingParams(max_tokens=params["max_tokens"], temperature=params["temperature"], top_p=params["top_p"],
                             stop_token_ids=eos, logprobs=1, flat_logprobs=True)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    t1 = time.time()
    counts = [len(o.outputs[0].token_ids) for o in outs]
    return {"t0": t0, "t1": t1, "tokens": int(sum(counts)), "per_request_tokens": counts}


def offline_worker(path: Path) -> None:
    job = json.loads(Path(path).read_text())
    cpu = C.CpuSampler(lambda: {"offline": os.getpid()})
    cpu.start()
    try:
        if job["mode"] == "llm":
            res = _offline_llm(job["spec"], job["prompts"], job["params"])
        else:
            res = asyncio.run(_offline_async(job["spec"], job["prompts"], job["params"]))
    finally:
        cpu.stop()
    res["cpu"] = cpu.window(res["t0"], res["t1"])
    res["affinity"] = sorted(os.sched_getaffinity(0))
    Path(str(path) + ".out").write_text(json.dumps(res))


# ------------------------------------------------------------------------------------ pipeline
def pipeline_overrides(steps: int, staleness: int | None) -> list[str]:
    return [f"run.total_steps={steps}", "run.checkpoint_every=0", "task.eval_problems=0", "task.eval_every=0",
            "stop.policy=none", f"rollout.staleness={steps if staleness is None else staleness}"]


def first_wave(cfg) -> int:
    """Requests in the engine's first batch: its slots (max_num_seqs) times the samplers."""
    return int(cfg.actors.sampler.options.get("max_num_seqs", 8)) * cfg.actors.sampler.count


async def run_pipeline(args, steps: int, staleness: int | None,
                       extra: list[str] = ()) -> tuple[dict, list[list[int]], dict, object, Path]:
    cfg = C.bench_config(pipeline_overrides(steps, staleness) + args.set + list(extra))
    run_dir = C.run_dir_for("pipeline", args.keep)
    run = await C.run_system(cfg, run_dir, cpu=True)
    trajs = sorted(C.trajectories(run_dir), key=lambda t: t.started_at)
    t0 = min(t.started_at for t in trajs)
    t1 = max(t.ended_at for t in trajs)
    tokens = int(sum(t.tokens_generated for t in trajs))
    weights = C.sampler_logs(run_dir, "weights")
    loads = [w for ws in weights.values() for w in ws if t0 <= w["received_at"] <= t1]
    mets = C.metrics(run_dir)
    cnt = C.counters(run["result"])
    res = {
        "staleness": cfg.rollout.staleness,
        "steps": steps,
        "rollouts": len(trajs),
        "tokens": tokens,
        "window_s": t1 - t0,
        "tokens_per_s": tokens / (t1 - t0),
        "run_wall_s": run["wall_s"],
        "startup_s": t0 - run["t_start"],
        "weight_loads_in_window": len(loads),
        "weight_load_s_in_window": float(sum(w["load_s"] for w in loads)),
        "learner_train_s": float(sum(m.get("train_seconds", 0.0) for m in mets)),
        "stream_dropped": {n: c.get("wire.stream_dropped", 0.0) for n, c in cnt.items() if n.startswith("sampler")},
        "counters": cnt,
        "cpu": run["cpu"].window(t0, t1),
        "per_rollout": [[round(t.started_at - t0, 4), round(t.ended_at - t0, 4), int(t.tokens_generated)]
                        for t in trajs],
    }
    res["steady_tokens_per_s"] = steady_rate([r[0] for r in res["per_rollout"]], [r[1] for r in res["per_rollout"]],
                                             [r[2] for r in res["per_rollout"]], first_wave(cfg))
    prompts = [[int(x) for x in t.prompt_token_ids] for t in trajs]
    params = {"max_tokens": cfg.rollout.max_tokens, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p}
    return res, prompts, params, cfg, run_dir


async def measure(args, steps: int) -> tuple[list[dict], dict[str, dict], dict]:
    """Every variant's runs, interleaved (pipeline of each variant, then offline of each, ...) so
    that a drift of the machine's speed hits all variants alike. The first pipeline fixes the
    prompts every offline run uses; each variant's offline engine has that variant's options."""
    runs: list[dict] = []
    prompts = params = None
    specs: dict[str, dict] = {}
    order = []
    for r in range(args.repeats):
        order += ["pipeline"] + (["offline"] if r == 0 else []) + (["llm"] if args.llm and r == 0 else [])
        if args.staleness_one:
            order.append("pipeline-staleness1")
    order.append("offline")
    if args.busy_neighbours:
        order.append("offline-busy")
    for kind in order:
        for label, extra in C.variants(args):
            print(f"[{NAME}] {label} {kind} ... (load {C.loadavg()})", file=sys.stderr, flush=True)
            if kind.startswith("pipeline"):
                res, p, prm, cfg, run_dir = await run_pipeline(args, steps, 1 if kind.endswith("1") else None, extra)
                if prompts is None:
                    prompts, params = p, prm
                specs.setdefault(label, engine_spec(cfg, run_dir))
                C.remove_run(run_dir, args.keep)
                res["kind"] = kind
            else:
                spec = specs[label]
                mode = "llm" if kind == "llm" else "async"
                burners = start_burners(spec) if kind == "offline-busy" else []
                try:
                    off = await asyncio.to_thread(run_offline, spec, prompts, params, mode)
                finally:
                    for b in burners:
                        b.kill()
                        b.wait()
                res = {"kind": "offline-llm" if mode == "llm" else kind, "rollouts": len(prompts),
                       "tokens": off["tokens"], "window_s": off["t1"] - off["t0"],
                       "tokens_per_s": off["tokens"] / (off["t1"] - off["t0"]), "affinity": off["affinity"],
                       "per_request_tokens": off["per_request_tokens"], "cpu": off["cpu"]}
                if "per_request_first_s" in off:  # the async engine: when each request got its first tokens
                    res["steady_tokens_per_s"] = steady_rate(off["per_request_first_s"], off["per_request_end_s"],
                                                             off["per_request_tokens"], spec["options"]["max_num_seqs"])
            res["loadavg"] = C.loadavg()
            res["variant"] = label
            runs.append(res)
            print(f"[{NAME}] {label} {kind}: {res['tokens_per_s']:.0f} tokens/s over {res['window_s']:.1f}s",
                  file=sys.stderr)
    return runs, specs, params


def ratios(runs: list[dict]) -> dict:
    """A variant's ratios: its pipeline runs against the median of its offline runs."""
    import numpy as np

    base = float(np.median([r["tokens_per_s"] for r in runs if r["kind"] == "offline"]))
    steady_base = float(np.median([r["steady_tokens_per_s"] for r in runs if r["kind"] == "offline"
                                   and r.get("steady_tokens_per_s")] or [np.nan]))
    for r in runs:
        r["ratio_vs_offline"] = r["tokens_per_s"] / base
        if r.get("steady_tokens_per_s"):
            r["steady_ratio"] = r["steady_tokens_per_s"] / steady_base
    pipe = [r for r in runs if r["kind"] == "pipeline"]
    return {
        "steady_ratio": float(np.median([r.get("steady_ratio", np.nan) for r in pipe])),
        "steady_offline_tokens_per_s_median": steady_base,
        "offline_tokens_per_s_median": base,
        "pipeline_tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in pipe])),
        "ratio": float(np.median([r["ratio_vs_offline"] for r in pipe])),
    }


async def main_async(args) -> dict:
    steps = args.steps or (2 if args.quick else 10)
    runs, specs, params = await measure(args, steps)
    by_variant = {label: {**ratios([r for r in runs if r["variant"] == label]), "overrides": extra,
                          "engine_spec": specs[label]} for label, extra in C.variants(args)}
    summary = {**by_variant["default"], "target": 0.90, "sampling": params}
    if len(by_variant) > 1:
        summary["variants"] = by_variant
    return {"summary": summary, "runs": runs}


def cpu_row(run: dict) -> dict:
    """Where the sampler's CPU went in a run's window: share of one core held by vLLM's model
    worker, its engine core (scheduler), the front-end process (the sampler actor or the offline
    consumer: streaming, our code), everything else; and the engine's CPU per generated token."""
    cpu = run["cpu"]
    procs = cpu["process_cores"]
    root = "offline" if "offline" in run["kind"] or run["kind"] == "llm" else "sampler-0"
    part = {"worker": procs.get(f"{root}/VLLM::Worker", 0.0), "engine_core": procs.get(f"{root}/VLLM::EngineCore", 0.0),
            "front_end": procs.get(root, 0.0)}
    family = sum(part.values())
    rate = run["tokens_per_s"]
    return {"variant": run.get("variant", "default"), "kind": run["kind"], "cores_busy": cpu["core_busy"], **part,
            "others": round(sum(procs.values()) - family, 3),
            **{f"{k}_us_per_token": v / rate * 1e6 for k, v in part.items()},
            "sampler_us_per_token": family / rate * 1e6}


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="learner steps per pipeline run (default 10, quick 2)")
    ap.add_argument("--repeats", type=int, default=1, help="pipeline runs (offline runs interleave)")
    ap.add_argument("--llm", action="store_true", help="also measure vllm.LLM.generate (offline batch API)")
    ap.add_argument("--staleness-one", action="store_true",
                    help="also a pipeline run with the default staleness 1 (generation gated by the learner)")
    ap.add_argument("--busy-neighbours", action="store_true",
                    help="also offline with every other core kept busy (does the sampler's core slow down when "
                         "the learner and critic compute beside it?)")
    ap.add_argument("--offline-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.offline_worker:
        offline_worker(args.offline_worker)
        return 0
    meta = C.begin(args)
    res = asyncio.run(main_async(args))
    cols = [("variant", "variant", ""), ("kind", "run", ""), ("rollouts", "rollouts", "d"), ("tokens", "tokens", "d"), ("window_s", "window s", ".2f"),
            ("tokens_per_s", "tokens/s", ".0f"), ("ratio_vs_offline", "vs offline", ".3f"),
            ("steady_tokens_per_s", "after 1st wave tokens/s", ".0f"), ("steady_ratio", "vs offline", ".3f"),
            ("weight_loads_in_window", "weight loads", "d"), ("weight_load_s_in_window", "load s", ".2f"),
            ("loadavg", "load", "")]
    C.print_table(res["runs"], cols)
    rows = [cpu_row(r) for r in res["runs"]]
    res["summary"]["cpu"] = rows
    print("\nCPU in each run's window (share of one core; us of CPU per generated token):")
    C.print_table(rows, [("variant", "variant", ""), ("kind", "run", ""), ("cores_busy", "cores busy", ""), ("worker", "vLLM worker", ".3f"),
                         ("engine_core", "engine core", ".3f"), ("front_end", "front end", ".3f"),
                         ("others", "others (any core)", ".3f"), ("worker_us_per_token", "worker us/tok", ".0f"),
                         ("engine_core_us_per_token", "core us/tok", ".0f"),
                         ("front_end_us_per_token", "front us/tok", ".0f"),
                         ("sampler_us_per_token", "sum us/tok", ".0f")])
    s = res["summary"]
    for label, v in s.get("variants", {}).items():
        print(f"variant {label} {' '.join(v['overrides'])}: pipeline {v['pipeline_tokens_per_s_median']:.0f} / "
              f"offline {v['offline_tokens_per_s_median']:.0f} tokens/s = {v['ratio']:.3f}; "
              f"after the first wave {v['steady_ratio']:.3f}")
    print(f"streaming overhead: pipeline {s['pipeline_tokens_per_s_median']:.0f} tokens/s / offline "
          f"{s['offline_tokens_per_s_median']:.0f} tokens/s = {s['ratio']:.3f} (target >= {s['target']}); "
          f"after the first wave {s['steady_ratio']:.3f}")
    C.finish(NAME, args, res, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
