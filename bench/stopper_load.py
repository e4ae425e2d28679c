"""Stopper load: 10,000 concurrent streams through the real stopper process, bounded memory.

    python bench/stopper_load.py            # 10,000 streams x 32 tokens, 2 waves
    python bench/stopper_load.py --quick    # 2,000 streams x 16 tokens, 2 waves

The stopper is the real actor process (``python -m espo_async.runtime.entry``, configs/short-chain.yaml
with the warm-up gate off, so the ESPO rule judges every token); this process plays the samplers
and the critic over real ZeroMQ sockets: a PUSH into the stopper's stream socket (blocking sends:
backpressure at the HWM, nothing dropped) carrying fake ``TokenChunk``s (``--chunk`` tokens each,
the prompt with the first) and ``ValueChunk``s (V(s_t) for every token, as the critic sends at
value_interval 1), and a DEALER with the samplers' routing id that receives the cancels.

Each wave opens ``--streams`` streams and feeds them round-robin, one chunk per stream per
round, so all of them are live at once (the stopper's ``live_streams`` reaches ``--streams``);
``--bad-fraction`` of them turn bad half-way (regret ~ Exp(3)) and must be cancelled. Then every
stream ends (``StreamEnd``) and the stopper must forget them (``live_streams`` 0). A second wave
with new request ids shows that memory is reused, not accumulated.

Measured (psutil on the stopper's pid, sampled every 0.1 s; counters from its heartbeats):
* RSS idle, peak RSS per wave, RSS after each wave's streams ended;
* per-chunk throughput: messages (token + value chunks) the stopper processed / the time from
  the wave's first send to the heartbeat that shows every message processed (wall clock: on a
  shared machine the sender, the stopper and everything else compete for the cores);
* the stopper's own CPU time per message (user + system, psutil): its cost per chunk, and
  so its capacity in chunks per CPU-second, whatever else runs on the machine;
* cancels received for the bad streams (all of them, none for good ones).
"""

from __future__ import annotations

import asyncio
import sys
import time

import common as C

NAME = "stopper_load"
MIB = 2**20


def overrides(args) -> list[str]:
    return ["stop.warmup.enabled=false", "stop.value_interval=1", "transport.heartbeat_interval_s=0.25",
            f"rollout.max_tokens={max(args.tokens, 16)}", "transport.stream_ttl_s=3600", *args.set]


class Feeder:
    """The samplers and the critic: token and value chunks in, cancels out."""

    def __init__(self, addresses: dict[str, str], chunk: int):
        import numpy as np
        import zmq
        import zmq.asyncio

        self.np, self.zmq = np, zmq
        self.ctx = zmq.asyncio.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 1000)
        self.push.connect(addresses["stopper_stream"])
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.ROUTING_ID, b"sampler-0")
        self.dealer.connect(addresses["stopper_cancel"])
        self.cancels: dict[str, int] = {}
        self.chunk = chunk
        self.sent = 0
        self._recv = asyncio.ensure_future(self._cancel_loop())

    async def _cancel_loop(self) -> None:
        import protocols as P

        while True:
            msg = P.decode(await self.dealer.recv())
            self.cancels[msg.request_id] = msg.stop_index

    async def wave(self, ids: list[str], bad: set[str], tokens: int, seed: int) -> dict:
        """Feed every stream ``tokens`` tokens, round-robin; returns counts and the send time."""
        import protocols as P

        np = self.np
        rng = np.random.default_rng(seed)
        n_rounds = -(-tokens // self.chunk)
        prompt = rng.integers(4, 20, 12).astype(np.int32)
        good_lp = (-0.05 - rng.exponential(0.02, (n_rounds, self.chunk))).astype(np.float32)
        bad_lp = (-0.05 - rng.exponential(3.0, (n_rounds, self.chunk))).astype(np.float32)
        top1 = np.full(self.chunk, -0.05, np.float32)
        vals = np.full(self.chunk, 0.1, np.float32)
        zeros = np.zeros(self.chunk, np.int32)
        token_ids = rng.integers(4, 20, self.chunk).astype(np.int32)
        msgs = 0
        t0 = time.perf_counter()
        for r in range(n_rounds):
            start = r * self.chunk
            n = min(self.chunk, tokens - start)
            positions = np.arange(start, start + n, dtype=np.int32)
            late = r >= n_rounds // 2
            for rid in ids:
                lp = bad_lp[r] if (late and rid in bad) else good_lp[r]
                tc = P.TokenChunk(request_id=rid, sampler_id="sampler-0", start=start, token_ids=token_ids[:n],
                                  logprobs=lp[:n], top1_logprobs=top1[:n], versions=zeros[:n],
                                  prompt_token_ids=prompt if start == 0 else None)
                vc = P.ValueChunk(request_id=rid, positions=positions, values=vals[:n], critic_version=0)
                await self.push.send(P.encode(tc), copy=False)  # blocking: backpressure, no drops
                await self.push.send(P.encode(vc), copy=False)
                msgs += 2
        sent_s = time.perf_counter() - t0
        self.sent += msgs
        return {"messages": msgs, "token_chunks": msgs // 2, "value_chunks": msgs // 2, "send_s": sent_s,
                "t0": t0}

    async def end(self, ids: list[str], tokens: int) -> None:
        import protocols as P

        for rid in ids:
            await self.push.send(P.encode(P.StreamEnd(request_id=rid, sampler_id="sampler-0", ending="truncated",
                                                      n_tokens=tokens)))

    def close(self) -> None:
        self._recv.cancel()
        self.push.close()
        self.dealer.close()
        self.ctx.destroy(linger=0)


async def measure(args) -> dict:
    import psutil

    from espo_async.runtime.harness import ActorHarness

    cfg = C.bench_config(overrides(args))
    run_dir = C.run_dir_for(NAME, args.keep)
    samples: list[tuple[float, int]] = []
    result: dict = {"streams": args.streams, "tokens_per_stream": args.tokens, "chunk_tokens": args.chunk,
                    "bad_fraction": args.bad_fraction, "waves": []}
    try:
        async with ActorHarness(cfg, run_dir, "stopper", binds=["broadcast"], assets={}) as h:
            await h.start(timeout=300)
            proc = psutil.Process(h.proc.pid)

            async def sample_rss():
                while True:
                    try:
                        samples.append((time.perf_counter(), proc.memory_info().rss))
                    except psutil.Error:
                        return
                    await asyncio.sleep(0.1)  # sampling period

            sampler = asyncio.create_task(sample_rss())
            feeder = Feeder(h.addresses, args.chunk)
            try:
                hb = await h.wait_heartbeat(lambda hb: True, fresh_only=True)
                result["rss_idle_mib"] = proc.memory_info().rss / MIB
                base = hb.counters.get("stream_messages", 0.0)
                for w in range(args.waves):
                    ids = [f"w{w}/g{k // 8}/arith-{k:06d}#{k % 8}" for k in range(args.streams)]
                    n_bad = int(round(args.bad_fraction * args.streams))
                    bad = set(ids[:: max(1, args.streams // max(n_bad, 1))][:n_bad]) if n_bad else set()
                    print(f"[{NAME}] wave {w}: {args.streams} streams x {args.tokens} tokens "
                          f"(load {C.loadavg()})", file=sys.stderr, flush=True)
                    mark = len(samples)
                    cpu0, own0 = proc.cpu_times(), time.process_time()
                    sent = await feeder.wave(ids, bad, args.tokens, seed=w)
                    own_s = time.process_time() - own0
                    # Everything processed: the stopper handled every message of the wave.
                    want = base + sent["messages"]
                    hb = await h.wait_heartbeat(lambda hb: hb.counters.get("stream_messages", 0) >= want,
                                                timeout=1800)
                    done = time.perf_counter()
                    cpu1 = proc.cpu_times()
                    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
                    live_peak = hb.counters.get("live_streams", 0)
                    base = want + args.streams  # and the StreamEnds that follow
                    elapsed = done - sent["t0"]
                    peak_wave = max((r for _, r in samples[mark:]), default=proc.memory_info().rss)
                    await feeder.end(ids, args.tokens)
                    hb = await h.wait_heartbeat(lambda hb: hb.counters.get("live_streams", 1) == 0, timeout=600,
                                                fresh_only=True)
                    await h.wait_heartbeat(lambda hb: True, fresh_only=True)
                    rss_after = proc.memory_info().rss
                    got = {rid for rid in feeder.cancels if rid.startswith(f"w{w}/")}
                    wave = {
                        "wave": w,
                        "live_streams_at_peak": live_peak,
                        "messages": sent["messages"],
                        "tokens": args.streams * args.tokens,
                        "send_s": sent["send_s"],
                        "processed_s": elapsed,
                        "chunks_per_s": sent["messages"] / elapsed,
                        "tokens_per_s": args.streams * args.tokens / elapsed,
                        "us_per_chunk": 1e6 * elapsed / sent["messages"],
                        # the stopper's own CPU per message: its capacity on one free core
                        "stopper_cpu_s": cpu_s,
                        "stopper_cpu_us_per_chunk": 1e6 * cpu_s / sent["messages"],
                        "stopper_capacity_chunks_per_cpu_s": sent["messages"] / cpu_s if cpu_s else None,
                        "stopper_cpu_utilisation": cpu_s / elapsed,
                        "sender_cpu_s": own_s,
                        "peak_rss_mib": peak_wave / MIB,
                        "rss_after_end_mib": rss_after / MIB,
                        "bad_streams": len(bad),
                        "cancels_for_bad": len(got & bad),
                        "cancels_for_good": len(got - bad),
                        "live_streams_after_end": hb.counters.get("live_streams"),
                        "loadavg": C.loadavg(),
                    }
                    result["waves"].append(wave)
                    print(f"[{NAME}] wave {w}: {wave['chunks_per_s']:.0f} chunks/s, peak RSS "
                          f"{wave['peak_rss_mib']:.0f} MiB, after end {wave['rss_after_end_mib']:.0f} MiB",
                          file=sys.stderr, flush=True)
                final = (await h.wait_heartbeat(lambda hb: True, fresh_only=True)).counters
                result["stopper_counters"] = {k: v for k, v in final.items()
                                              if k in ("streams", "stream_messages", "tokens", "values", "cancels_sent",
                                                       "cancels_unroutable", "handler_errors", "wire.bad_frames",
                                                       "streams_with_gaps", "live_streams")}
            finally:
                feeder.close()
                sampler.cancel()
            result["peak_rss_mib"] = max(r for _, r in samples) / MIB
            result["stopper_exit_code"] = await h.stop()
    finally:
        C.remove_run(run_dir, args.keep)
    waves = result["waves"]
    result["rss_growth_between_waves_mib"] = (
        waves[-1]["rss_after_end_mib"] - waves[0]["rss_after_end_mib"] if len(waves) > 1 else None)
    result["bytes_per_live_stream"] = (
        (waves[0]["peak_rss_mib"] - result["rss_idle_mib"]) * MIB / args.streams if waves else None)
    return result


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--streams", type=int, default=None, help="concurrent streams per wave (default 10,000)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per stream (default 32; quick 16)")
    ap.add_argument("--chunk", type=int, default=2, help="tokens per TokenChunk (vLLM streams 1 per step)")
    ap.add_argument("--waves", type=int, default=2)
    ap.add_argument("--bad-fraction", type=float, default=0.1)
    args = ap.parse_args(argv)
    args.streams = args.streams or (2000 if args.quick else 10_000)
    args.tokens = args.tokens or (16 if args.quick else 32)
    meta = C.begin(args)
    res = asyncio.run(measure(args))
    rows = [{"wave": w["wave"], "live": w["live_streams_at_peak"], "msgs": w["messages"],
             "cps": w["chunks_per_s"], "tps": w["tokens_per_s"], "us": w["us_per_chunk"],
             "cpu_us": w["stopper_cpu_us_per_chunk"], "cap": w["stopper_capacity_chunks_per_cpu_s"],
             "util": w["stopper_cpu_utilisation"],
             "peak": w["peak_rss_mib"], "after": w["rss_after_end_mib"], "live_after": w["live_streams_after_end"],
             "bad": f"{w['cancels_for_bad']}/{w['bad_streams']}", "good": w["cancels_for_good"], "load": w["loadavg"]}
            for w in res["waves"]]
    C.print_table(rows, [("wave", "wave", "d"), ("live", "live streams", ".0f"), ("msgs", "chunks", "d"),
                         ("cps", "chunks/s", ".0f"), ("tps", "tokens/s", ".0f"), ("us", "us/chunk", ".1f"),
                         ("cpu_us", "stopper CPU us/chunk", ".1f"), ("cap", "chunks/CPU-s", ".0f"),
                         ("util", "stopper CPU util", ".2f"),
                         ("peak", "peak RSS MiB", ".1f"), ("after", "RSS after end MiB", ".1f"),
                         ("live_after", "live after end", ".0f"), ("bad", "bad cancelled", ""),
                         ("good", "good cancelled", "d"), ("load", "load", "")])
    print(f"idle RSS {res['rss_idle_mib']:.1f} MiB; peak RSS {res['peak_rss_mib']:.1f} MiB; "
          f"~{res['bytes_per_live_stream'] / 1024:.1f} KiB per live stream; RSS growth wave 1 -> last "
          f"{res['rss_growth_between_waves_mib']} MiB")
    C.finish(NAME, args, res, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
