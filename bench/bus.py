"""Bus throughput: token events per second through the protocol + ZeroMQ layer, against the
engine's token rate.

    python bench/bus.py            # full: 300k token events per transport and frame shape
    python bench/bus.py --quick    # 50k token events, tcp only, and a shorter engine measurement
    python bench/bus.py --quick --tokens 5000 --engine-rate 2411 --out /tmp/bus.json   # a sanity run

Side by side in one invocation:

* **engine**: the sampler's vLLM engine (configs/short-chain.yaml: same model, engine arguments,
  pinning to core 0) generating ``--engine-prompts`` task prompts (8 samples each) submitted at
  once (the offline baseline of bench/streaming.py); its tokens/s is the rate the bus must carry.
* **bus**, chunk rows: a producer process pinned to the sampler's core does what the sampler
  did per engine output until it batched: build a ``TokenChunk`` (1 token by default: vLLM streams one token per request
  per engine step), encode it with the real codec (``protocols.encode``) and send it on a ZeroMQ
  PUSH socket made by the runtime's ``Transport`` (asyncio + uvloop, as in the actors); a
  consumer process pinned to the stopper's core receives with ``Transport.recv`` (decode and
  validation included) on a PULL socket. Sends are blocking (backpressure), so nothing is
  dropped and the rate is the sustained end-to-end rate. frames/s = frames / (first .. last
  receive at the consumer); tokens/s = token events / the same window.
* **bus**, batch rows (``--modes``): what the sampler does now, per engine step: each of
  ``--streams`` requests adds its 1 new token to the sampler's ``TokenBuffer``, which builds
  ONE ``TokenBatch`` (64 streams x 1 token: the real per-step shape), encoded and sent as one
  frame; the consumer also walks the batch's per-request entries, as the stopper and critic do.
  Both kinds of rows run in the same invocation.

``--engine-rate`` skips the engine measurement and uses the rate given (a quick sanity run of
the bus alone; the ratios are then only as good as that number).

ratio = bus token events/s / engine tokens/s (target >= 20). In a run every engine token becomes
two token events (stopper and critic sockets) and, at value_interval 1, one value event into the
stopper, so the stopper's inbox carries 2x the engine rate: the table shows that ratio too.
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

import common as C

NAME = "bus"
RID = "g{}/arith-train-{:06d}#{}"


# ------------------------------------------------------------------------------------ workers
async def _producer(addr: str, n: int, chunk: int, streams: int, prompt_len: int, mode: str = "chunk") -> dict:
    import numpy as np
    import zmq

    import protocols as P
    from espo_async.runtime.transport import Transport

    tr = Transport({"stopper_stream": addr}, hwm=1000)
    sock = tr.socket(zmq.PUSH, "stopper_stream", bind=False)
    await asyncio.sleep(0.5)  # let the connection settle
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, 20, prompt_len).astype(np.int32)
    # the engine hands the sampler fresh small arrays per output; slices of a pool stand for them
    pool = 4096
    ids_pool = rng.integers(4, 20, pool + chunk).astype(np.int32)
    lp_pool = -rng.random(pool + chunk, dtype=np.float32)
    top1_pool = np.full(pool + chunk, -0.05, np.float32)
    ver_pool = np.zeros(pool + chunk, np.int32)
    starts = [0] * streams
    rids = [RID.format(k // 8, k, k % 8) for k in range(streams)]
    t0 = time.time()
    sent = 0
    i = 0
    if mode == "batch":  # one frame per engine step: every stream's new tokens, as the sampler sends them
        from actors.samplers.base import TokenBuffer

        buffer = TokenBuffer()
        while sent < n:
            for k in range(streams):
                j = (i * streams + k) % pool
                buffer.add(rids[k], starts[k], ids_pool[j : j + chunk], lp_pool[j : j + chunk],
                           top1_pool[j : j + chunk], ver_pool[j : j + chunk], prompt if starts[k] == 0 else None)
                starts[k] += chunk
            await sock.send(P.encode(buffer.take("sampler-0")), copy=False)
            i += 1
            sent += streams * chunk
    while mode == "chunk" and sent < n:
        k = i % streams
        i += 1
        m = min(chunk, n - sent)
        j = i % pool
        msg = P.TokenChunk(
            request_id=rids[k], sampler_id="sampler-0", start=starts[k],
            token_ids=ids_pool[j : j + m], logprobs=lp_pool[j : j + m],
            top1_logprobs=top1_pool[j : j + m], versions=ver_pool[j : j + m],
            prompt_token_ids=prompt if starts[k] == 0 else None,
        )
        await sock.send(P.encode(msg), copy=False)  # what Transport.send does (blocking: no drops)
        starts[k] += m
        sent += m
    t1 = time.time()
    await asyncio.sleep(1.0)
    tr.close(linger_ms=2000)
    return {"t0": t0, "t1": t1, "events_sent": i, "tokens_sent": sent}


async def _consumer(addr: str, n_events: int) -> dict:
    import zmq

    import protocols as P
    from espo_async.runtime.transport import Transport

    tr = Transport({"stopper_stream": addr}, hwm=1000)
    sock = tr.socket(zmq.PULL, "stopper_stream", bind=True)
    got = tokens = requests = 0
    t_first = t_last = None
    gaps = []
    async with asyncio.timeout(600):  # one deadline for the whole run (no per-message timer)
        while got < n_events:
            msg = await tr.recv(sock, "bench")
            now = time.time()
            if t_first is None:
                t_first = now
            if isinstance(msg, P.TokenChunk):
                tokens += len(msg.token_ids)
                requests += 1
            elif isinstance(msg, P.TokenBatch):
                for e in msg.entries():  # the receivers' per-request walk
                    tokens += e.hi - e.lo
                    requests += 1
            got += 1
            if got % 1000 == 0:
                gaps.append(now)
            t_last = now
    tr.close()
    return {"t_first": t_first, "t_last": t_last, "events": got, "tokens": tokens, "requests": requests,
            "bad_frames": tr.errors["bad_frames"],
            "per_1000_s": [b - a for a, b in zip(gaps, gaps[1:])]}


def worker(role: str, args_json: str) -> None:
    a = json.loads(args_json)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    if role == "producer":
        res = run(_producer(a["addr"], a["n"], a["chunk"], a["streams"], a["prompt_len"], a["mode"]))
    else:
        res = run(_consumer(a["addr"], a["n_events"]))
    Path(a["out"]).write_text(json.dumps(res))


def bus_run(transport: str, n_tokens: int, chunk: int, streams: int, prod_cpus, cons_cpus, mode: str = "chunk") -> dict:
    """mode "chunk": one TokenChunk of ``chunk`` tokens per frame; "batch": one TokenBatch of
    ``streams`` requests x ``chunk`` tokens per frame (whole frames: up to a frame over n_tokens)."""
    from espo_async.runtime.transport import cleanup_ipc, resolve_addresses

    job = C.run_dir_for(f"bus-{transport}", keep=False)
    addrs = resolve_addresses(transport, str(job))
    addr = addrs["stopper_stream"]
    per_frame = chunk * (streams if mode == "batch" else 1)
    n_events = -(-n_tokens // per_frame)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def spawn(role, cpus, extra):
        spec = json.dumps({"addr": addr, "out": str(job / f"{role}.json"), **extra})
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", role, spec], env=env,
                                cwd=C.REPO, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    cons = spawn("consumer", cons_cpus, {"n_events": n_events})
    time.sleep(1.0)
    prod = spawn("producer", prod_cpus, {"n": n_tokens, "chunk": chunk, "streams": streams, "prompt_len": 24,
                                         "mode": mode})
    rc_p, rc_c = prod.wait(timeout=900), cons.wait(timeout=900)
    if rc_p or rc_c:
        raise RuntimeError(f"bus workers failed: producer {rc_p}, consumer {rc_c}")
    p = json.loads((job / "producer.json").read_text())
    c = json.loads((job / "consumer.json").read_text())
    cleanup_ipc(addrs)
    C.remove_run(job, keep=False)
    window = c["t_last"] - c["t_first"]
    return {"transport": transport, "mode": mode, "chunk_tokens": chunk,
            "requests_per_frame": streams if mode == "batch" else 1, "events": c["events"], "tokens": c["tokens"],
            "window_s": window, "events_per_s": c["events"] / window, "tokens_per_s": c["tokens"] / window,
            "producer_s": p["t1"] - p["t0"], "bad_frames": c["bad_frames"],
            "per_1000_events_s": C.stats(c["per_1000_s"]), "loadavg": C.loadavg()}


# ------------------------------------------------------------------------------------ engine
async def engine_rate(args) -> dict:
    import streaming as S
    from transformers import AutoTokenizer

    from espo_async.assets import prepare_assets
    from espo_async.tasks.registry import make_task

    cfg = C.bench_config(args.set)
    run_dir = C.run_dir_for("bus-engine", False)
    await asyncio.to_thread(prepare_assets, cfg, run_dir, log=lambda *_: None)
    spec = S.engine_spec(cfg, run_dir)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    task = make_task(cfg.task.name, **cfg.task.options)
    problems = task.train_problems()[: args.engine_prompts]
    prompts = [tok.encode(task.format_prompt(p), add_special_tokens=True)
               for p in problems for _ in range(cfg.rollout.samples_per_prompt)]
    params = {"max_tokens": cfg.rollout.max_tokens, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p}
    off = await asyncio.to_thread(S.run_offline, spec, prompts, params, "async")
    C.remove_run(run_dir, False)
    w = off["t1"] - off["t0"]
    return {"rollouts": len(prompts), "tokens": off["tokens"], "window_s": w, "tokens_per_s": off["tokens"] / w,
            "loadavg": C.loadavg(), "cpus": spec["cpus"]}


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--tokens", type=int, default=None, help="token events per bus run (default 300k, quick 50k)")
    ap.add_argument("--chunk", type=int, nargs="+", default=None, help="tokens per chunk (default 1 4; quick 1)")
    ap.add_argument("--transport", nargs="+", choices=["ipc", "tcp"], default=None)
    ap.add_argument("--modes", nargs="+", choices=["chunk", "batch"], default=["chunk", "batch"],
                    help="chunk: a TokenChunk per request per frame (rows per --chunk); batch: a TokenBatch of "
                         "--streams requests x 1 token per frame (one engine step)")
    ap.add_argument("--streams", type=int, default=64, help="concurrent request ids (the sampler's slots)")
    ap.add_argument("--engine-rate", type=float, default=None,
                    help="engine tokens/s to compare with, instead of measuring it (sanity runs of the bus alone)")
    ap.add_argument("--engine-prompts", type=int, default=None, help="prompts (x8 samples) for the engine rate")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    meta = C.begin(args)
    n = args.tokens or (50_000 if args.quick else 300_000)
    chunks = args.chunk or ([1] if args.quick else [1, 4])
    transports = args.transport or (["tcp"] if args.quick else ["ipc", "tcp"])
    args.engine_prompts = args.engine_prompts or (16 if args.quick else 48)
    cfg = C.bench_config(args.set)
    prod_cpus, cons_cpus = cfg.actors.sampler.cpus, (cfg.actors.stopper.cpus if cfg.actors.stopper else None)

    if args.engine_rate:
        engine = {"tokens_per_s": args.engine_rate, "given": True, "loadavg": C.loadavg()}
    else:
        print(f"[{NAME}] engine ... (load {C.loadavg()})", file=sys.stderr, flush=True)
        engine = asyncio.run(engine_rate(args))
    print(f"[{NAME}] engine: {engine['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    shapes = [("chunk", ch) for ch in chunks if "chunk" in args.modes] + [("batch", 1)] * ("batch" in args.modes)
    runs = []
    for tr in transports:
        for mode, ch in shapes:
            print(f"[{NAME}] bus {tr} {mode} {ch} ... (load {C.loadavg()})", file=sys.stderr, flush=True)
            r = bus_run(tr, n, ch, args.streams, prod_cpus, cons_cpus, mode)
            r["ratio_vs_engine"] = r["tokens_per_s"] / engine["tokens_per_s"]
            r["ratio_vs_2x_engine"] = r["tokens_per_s"] / (2 * engine["tokens_per_s"])
            runs.append(r)
    C.print_table([{"transport": "engine", "tokens_per_s": engine["tokens_per_s"], "load": engine["loadavg"]}] + runs,
                  [("transport", "run", ""), ("mode", "frame", ""), ("requests_per_frame", "req/frame", "d"),
                   ("chunk_tokens", "tok/req", "d"), ("events", "frames", "d"),
                   ("window_s", "window s", ".2f"), ("events_per_s", "frames/s", ".0f"),
                   ("tokens_per_s", "tokens/s", ".0f"), ("ratio_vs_engine", "x engine", ".1f"),
                   ("ratio_vs_2x_engine", "x 2*engine", ".1f"), ("loadavg", "load", "")])
    C.finish(NAME, args, {"engine": engine, "runs": runs, "target_ratio": 20.0}, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
