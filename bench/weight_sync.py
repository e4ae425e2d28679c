"""Weight sync: from the end of a learner step to every sampler serving the new version, for
SmolLM2-135M on CPU.

    python bench/weight_sync.py            # full: 4 steps, 2 vLLM samplers, weights.dir run then shm
    python bench/weight_sync.py --quick    # 2 steps, 2 samplers
    python bench/weight_sync.py --samplers 1 --modes shm
    python bench/weight_sync.py --transport both --modes shm   # files against the collective broadcast

The real system of configs/short-chain.yaml with ``model.policy smollm2-135m`` (converted once into
the cache, fp32, 538 MB), the critic a copy of the policy with a value head, a small batch (1
prompt x 2 samples, 16 tokens: a 135M learner step at batch 64 takes minutes on 2 cores), no
stopping, no evaluation, and ``--samplers`` vLLM samplers (default 2), all pinned to core 0 like
the default run's sampler (learner, critic, stopper, coordinator on core 1).

Per version v >= 1 (one per learner step):

* sync latency = max over samplers of ``loaded_at`` (RUN_DIR/logs/<sampler>.weights.jsonl: after
  the engine's hot reload returned and the sampler switched to v) - ``step_end_time`` of step v
  (metrics.jsonl: the optimizer step finished);
* split into learner publish + delivery (step end -> the sampler started loading: writing the
  safetensors file(s), announcing, the broadcast) and the engine load (``load_s``: pause, read,
  load into vLLM, resume).

Target: <= 1 s.

``--transport both`` runs the same system twice per ``--modes`` value: ``weights.transport=files``
and ``weights.transport=collective`` (the learner broadcasts the policy through a gloo group with
the samplers' engine workers, espo_async/weights/collective.py). In the collective run the first
version(s) go as files while the group forms (the samplers join when they load their first
version); each row says which path it took (``via``, from the learner's log line "version N
broadcast to ..."), its ``broadcast_s`` is the learner's broadcast of that version, and the
summary of the collective run counts only the broadcast versions.

    python bench/weight_sync.py --profile 20   # where one engine reload's time goes

``--profile N`` runs no system: it starts one vLLM engine as the sampler does (same options and
core), hot-reloads SmolLM2-135M's own weights from /dev/shm ``--loads`` times and prints the N
functions of the last reload inside the worker by cumulative time (cProfile in the worker,
``WeightSyncExtension.espo_load_weights(profile_top=N)``) next to the whole reload's time.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import numpy as np

import common as C

NAME = "weight_sync"


def overrides(steps: int, samplers: int, max_tokens: int) -> list[str]:
    return [f"run.total_steps={steps}", "run.checkpoint_every=0", "task.eval_problems=0", "task.eval_every=0",
            "model.policy=smollm2-135m", "model.critic=policy", "model.sft_steps=0",
            "rollout.prompts_per_batch=1", "rollout.samples_per_prompt=2", f"rollout.max_tokens={max_tokens}",
            "stop.policy=none", f"actors.sampler.count={samplers}", "actors.sampler.options.max_num_seqs=4",
            "transport.startup_timeout_s=900"]


BROADCAST = re.compile(r"version (\d+) broadcast to (\d+) engine workers in ([0-9.]+) s")


def learner_log(run_dir: Path) -> str:
    log = run_dir / "logs" / "learner.log"
    return log.read_text(errors="replace") if log.exists() else ""


def broadcasts(log_text: str) -> dict[int, float]:
    """Versions the learner broadcast through the weight group -> seconds (from its log)."""
    return {int(m.group(1)): float(m.group(3)) for m in BROADCAST.finditer(log_text)}


def group_failures(log_text: str) -> list[str]:
    """The learner's "weight group ... broken" lines (the run then fell back to files)."""
    return [line for line in log_text.splitlines() if "weight group" in line and "broken" in line]


def analyse(run_dir: Path, log_text: str) -> list[dict]:
    sent = broadcasts(log_text)
    mets = {int(m["step"]): m for m in C.metrics(run_dir)}
    logs = C.sampler_logs(run_dir, "weights")
    rows = []
    for step, m in sorted(mets.items()):
        loads = {s: next((w for w in ws if int(w["version"]) == step), None) for s, ws in logs.items()}
        if not loads or any(w is None for w in loads.values()):
            continue  # a sampler never loaded this version (the run ended first)
        end = m["step_end_time"]
        last = max(loads.values(), key=lambda w: w["loaded_at"])
        rows.append({
            "version": step,
            "via": "collective" if step in sent else "file",
            "broadcast_s": sent.get(step),
            "sync_s": last["loaded_at"] - end,
            "publish_and_deliver_s": min(w["received_at"] for w in loads.values()) - end,
            "engine_load_s": float(np.mean([w["load_s"] for w in loads.values()])),
            "train_s": m.get("train_seconds"),
            "per_sampler": {s: {"received_after_s": w["received_at"] - end, "loaded_after_s": w["loaded_at"] - end,
                                "load_s": w["load_s"]} for s, w in loads.items()},
        })
    return rows


def summary(rows: list[dict]) -> dict:
    return {"sync_s": C.stats([r["sync_s"] for r in rows]),
            "publish_and_deliver_s": C.stats([r["publish_and_deliver_s"] for r in rows]),
            "engine_load_s": C.stats([r["engine_load_s"] for r in rows]), "target_s": 1.0}


async def run_mode(args, steps: int, weights_dir: str, transport: str = "files") -> dict:
    cfg = C.bench_config(overrides(steps, args.samplers, args.max_tokens)
                         + [f"weights.dir={weights_dir}", f"weights.transport={transport}"] + args.set)
    run_dir = C.run_dir_for(f"weights-{transport}-{weights_dir}", args.keep)
    print(f"[{NAME}] weights.transport={transport} weights.dir={weights_dir} ... (load {C.loadavg()})",
          file=sys.stderr, flush=True)
    run = await C.run_system(cfg, run_dir, timeout=3600)
    label = weights_dir if transport == "files" else f"{transport}/{weights_dir}"
    log_text = learner_log(run_dir)
    rows = [{"weights_dir": weights_dir, "transport": transport, "run": label, **r}
            for r in analyse(run_dir, log_text)]
    final = list((run_dir / "final").glob("*.safetensors"))
    counted = [r for r in rows if r["via"] == "collective"] if transport == "collective" else rows
    res = {"weights_dir": weights_dir, "transport": transport, "label": label, "rows": rows,
           "policy_bytes": int(sum(f.stat().st_size for f in final)), "run_wall_s": run["wall_s"],
           "loadavg": C.loadavg(), "counters": C.counters(run["result"]), "group_failures": group_failures(log_text),
           "summary": summary(counted) if counted else {}}
    C.remove_run(run_dir, args.keep)
    return res


async def main_async(args) -> dict:
    """The per-step files in the run folder (on disk) against /dev/shm (memory), side by side; with
    ``--transport both`` each also against the collective broadcast."""
    steps = args.steps or (2 if args.quick else 4)
    transports = ["files", "collective"] if args.transport == "both" else [args.transport]
    runs = [await run_mode(args, steps, mode, t) for t in transports for mode in args.modes]
    return {"samplers": args.samplers, "steps": steps, "transports": transports, "runs": runs,
            "rows": [r for run in runs for r in run["rows"]],
            "policy_bytes": max(run["policy_bytes"] for run in runs),
            "summary": {run["label"]: run["summary"] for run in runs}}


async def profile_reload(args) -> dict:
    """One engine, SmolLM2-135M, ``args.loads`` reloads from /dev/shm; the last one profiled."""
    import os
    import shutil

    from actors.samplers.vllm import VLLMGeneration, VLLMOptions
    from espo_async.assets import resolve_model
    from espo_async.runtime.placement import pin_process

    cfg = C.bench_config(overrides(1, 1, args.max_tokens) + args.set)
    model_dir = resolve_model(cfg.model.policy, cfg)
    if cfg.actors.sampler.cpus:
        pin_process(set(cfg.actors.sampler.cpus))  # the sampler's core, as in a run
    src = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(C.run_dir_for("profile", False))
    path = src / f"espo-profile-{os.getpid()}.safetensors"
    shutil.copyfile(Path(model_dir) / "model.safetensors", path)
    gen = VLLMGeneration(str(model_dir), VLLMOptions(**cfg.actors.sampler.options), max_model_len=256,
                         dtype=cfg.model.dtype, seed=cfg.run.seed)
    await gen.start()
    loads = []
    try:
        for i in range(args.loads):
            last = i == args.loads - 1
            total = await gen.engine.update_weights(path, i + 1, profile_top=args.profile if last else 0)
            report = gen.engine.last_load_reports[0]
            loads.append({"load": i + 1, "total_s": total, "worker_read_s": report["read_s"],
                          "worker_reload_s": report["load_s"]})
    finally:
        await gen.shutdown()
        path.unlink(missing_ok=True)
    return {"model": str(cfg.model.policy), "bytes": Path(model_dir, "model.safetensors").stat().st_size,
            "loads": loads, "profile": report["profile"], "note": "the last load ran under cProfile (slower)"}


def main_profile(args, meta) -> int:
    res = asyncio.run(profile_reload(args))
    C.print_table(res["loads"], [("load", "load", "d"), ("total_s", "update_weights s", ".3f"),
                                 ("worker_read_s", "worker: open file s", ".3f"),
                                 ("worker_reload_s", "worker: reload_weights s", ".3f")])
    whole = res["loads"][-1]["worker_reload_s"]
    rows = [{**r, "share": r["cumulative_s"] / whole} for r in res["profile"]]
    print(f"\nthe last reload's reload_weights ({whole:.3f} s under cProfile), by cumulative time:")
    C.print_table(rows, [("function", "function", "s"), ("calls", "calls", "d"), ("self_s", "self s", ".3f"),
                         ("cumulative_s", "cumulative s", ".3f"), ("share", "share", ".0%")])
    C.finish(f"{NAME}-profile", args, res, meta)
    return 0


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--samplers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["run", "shm"], choices=["run", "shm"],
                    help="weights.dir values to compare, in this order")
    ap.add_argument("--transport", default="files", choices=["files", "collective", "both"],
                    help="weights.transport to measure (both: files, then collective, for each --modes)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile one engine's reload instead (no system run): print the top N functions")
    ap.add_argument("--loads", type=int, default=4, help="reloads with --profile (the last is profiled)")
    args = ap.parse_args(argv)
    meta = C.begin(args)
    if args.profile:
        return main_profile(args, meta)
    res = asyncio.run(main_async(args))
    C.print_table(res["rows"], [("run", "run", "s"), ("version", "version", "d"), ("via", "via", "s"),
                                ("sync_s", "step end -> all serving s", ".3f"),
                                ("publish_and_deliver_s", "publish+deliver s", ".3f"),
                                ("engine_load_s", "engine load s", ".3f"), ("broadcast_s", "broadcast s", ".3f"),
                                ("train_s", "train step s", ".1f")])
    for run in res["runs"]:
        for line in run["group_failures"]:
            print(f"{run['label']}: {line}")
    for mode, s in res["summary"].items():
        if not s:
            print(f"weight sync, {mode}: no version went through the group (see the rows)")
            continue
        print(f"weight sync, {mode} ({res['policy_bytes'] / 1e6:.0f} MB policy, {res['samplers']} "
              f"samplers): median {s['sync_s']['p50']:.3f}s, max {s['sync_s']['max']:.3f}s (target <= 1 s)")
    C.finish(NAME, args, res, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
