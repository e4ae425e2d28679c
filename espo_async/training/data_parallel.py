"""The learner on several ranks: data-parallel DeepSpeed training (ZeRO 0-3) behind one actor.

Rank 0 is the learner actor: it alone has ZeroMQ sockets, assembles batches, writes metrics,
checkpoints and weight files. Ranks 1..N-1 are worker processes that run this module: they join
the process group, get their trainer's construction arguments from rank 0, and then loop::

    command = wait for rank 0          # train_step(batch) / save ... / ping / stop
    run the same PPOTrainer method     # their share of the rows, their part of the collectives

Commands travel over their own gloo process group (CPU, even when DeepSpeed trains with NCCL on
GPUs): a msgpack document (numpy arrays as raw bytes in the protocols' array extension, no
pickle) in a uint8 tensor, broadcast from rank 0 after its length. Every rank then runs the same
``PPOTrainer`` method on the same arguments; how a step is split over ranks (each rank's rows,
gathered no-grad pass, loss scaled so that the averaged gradient is the one-rank gradient,
metrics summed) is in trainer.py ("data parallel"). Rank 0 sends the command from inside the
operation (``PPOTrainer._op``), so the learner calls its trainer exactly as with one rank.

Two ways to start the ranks (docs/cluster.md, "A learner on several ranks"):

* **The learner starts its workers** (``deepspeed.world_size: N``, one host): ``make_trainer``
  starts N-1 processes ``python -m espo_async.training.data_parallel`` with MASTER_ADDR,
  MASTER_PORT (a free port on 127.0.0.1), RANK, WORLD_SIZE and LOCAL_RANK set; their output goes
  to ``<log_dir>/learner-rank<r>.log``. On GPUs rank r uses ``cuda:<r>`` of the devices the
  learner sees; ``deepspeed.worker_cpus`` pins them.
* **A launcher starts every rank** (``deepspeed --hostfile H --module
  espo_async.training.data_parallel <run.py arguments>`` or ``torchrun ... -m ...``): RANK,
  WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK are the launcher's (never overwritten).
  Rank 0 runs ``run.py`` with the arguments given, for the learner role only and without actor
  restarts; every other rank becomes a worker and ignores the arguments.

Failures. A worker exits when rank 0 does: its parent-death signal and a watchdog (workers the
learner started), the closed connections of the command group (any rank 0 that died), or the
collective timeout ``deepspeed.timeout_s`` (a rank 0 that hangs: while idle, rank 0 pings its
workers every ``min(30 s, timeout_s / 4)``). A worker that fails logs its traceback and exits
with code 1; rank 0 then fails the operation in progress (or the next one) with a
``DataParallelError`` naming the rank, its exit status and the end of its log. The learner
actor fails with it, its supervisor starts a new learner (with new workers), which resumes from
its last checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

from espo_async.training.batch import TrainSample
from espo_async.utils import describe_exit, set_parent_death_signal, tail
from protocols.codec import ARRAY_EXT, array_from_payload, array_payload

__all__ = ["DataParallelError", "make_trainer", "serve", "encode", "decode", "main"]

log = logging.getLogger("espo.data_parallel")

#: Environment of a worker rank (set by the learner for the workers it starts; under a launcher
#: ESPO_DP_TIMEOUT_S and ESPO_DP_BACKEND may be exported by the user).
ENV_PARENT = "ESPO_DP_PARENT"  # pid of the learner that started this worker
ENV_TIMEOUT = "ESPO_DP_TIMEOUT_S"  # collective timeout (deepspeed.timeout_s)
ENV_BACKEND = "ESPO_DP_BACKEND"  # gloo | nccl (default: nccl where CUDA is available)
ENV_CPUS = "ESPO_DP_CPUS"  # comma-separated CPU ids
ENV_THREADS = "ESPO_DP_THREADS"  # torch intra-op threads
DEFAULT_TIMEOUT_S = 600.0
STOP_WAIT_S = 30.0  # how long close() waits for the workers to exit after "stop"

# Operations a worker runs on command (PPOTrainer methods).
_METHODS = ("train_step", "train_critic_mc", "save_policy_weights", "save_critic_weights", "policy_tensors",
            "export_hf", "write_checkpoint", "load_checkpoint")


class DataParallelError(RuntimeError):
    """A rank of the data-parallel learner failed or vanished: the group cannot go on (the
    learner fails; its supervisor starts a new one, which resumes from its checkpoint)."""


# ------------------------------------------------------------------------------------- codec
# msgpack documents; a numpy array is the protocol codec's ARRAY_EXT extension (protocols/codec.py
# array_payload, the one place that encodes arrays for msgpack), a TrainSample a tagged map.
def _default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return msgpack.ExtType(ARRAY_EXT, array_payload(o))
    if isinstance(o, TrainSample):
        return {"__ts__": {f.name: getattr(o, f.name) for f in fields(TrainSample)}}
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot send a {type(o).__name__} to the worker ranks")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise ValueError(f"unknown msgpack extension type {code}")
    return array_from_payload(data, copy=True)  # writeable: the trainer may change it in place


def _hook(d: dict) -> Any:
    if "__ts__" in d and len(d) == 1:
        return TrainSample(**d["__ts__"])
    return d


def encode(obj: Any) -> bytes:
    """msgpack with numpy arrays (protocols.codec's array extension) and TrainSample; no pickle."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_hook, ext_hook=_ext_hook, raw=False, strict_map_key=False)


# ----------------------------------------------------------------------------- the channel
class Channel:
    """Byte messages broadcast from rank 0 over a gloo group: the length, then the bytes."""

    def __init__(self, group) -> None:
        self.group = group

    def send(self, data: bytes) -> None:
        import torch
        import torch.distributed as dist

        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), src=0, group=self.group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self.group)

    def recv(self) -> bytes:
        import torch
        import torch.distributed as dist

        n = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(n, src=0, group=self.group)
        if int(n[0]) == 0:
            return b""
        buf = torch.empty(int(n[0]), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.group)
        return buf.numpy().tobytes()


def _join_group(backend: str, timeout_s: float) -> Channel:
    """init_process_group (env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for DeepSpeed,
    then the command group (gloo). Collective: every rank calls it."""
    import torch.distributed as dist

    from espo_async.training.trainer import skip_shm_comm_op

    skip_shm_comm_op()
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    return Channel(dist.new_group(backend="gloo", timeout=timeout))


# ------------------------------------------------------------------- workers started by rank 0
def _tail(path: Path, n: int = 12) -> str:
    return textwrap.indent(tail(path, n), "    ")


@dataclass
class Worker:
    rank: int
    proc: subprocess.Popen
    log_path: Path


def spawn_workers(world_size: int, *, log_dir: Path, backend: str, timeout_s: float,
                  cpus: list[list[int]] | None) -> list[Worker]:
    """Start ranks 1..world_size-1 on this host; sets this process's own rank-0 environment."""
    import torch

    from espo_async.training.trainer import free_port

    port = free_port()
    root = str(Path(__file__).resolve().parents[2])  # the folder holding espo_async/
    base = dict(os.environ)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size), PYTHONUNBUFFERED="1")
    base[ENV_PARENT] = str(os.getpid())
    base[ENV_TIMEOUT] = str(float(timeout_s))
    base[ENV_BACKEND] = backend
    base[ENV_THREADS] = str(torch.get_num_threads())
    base["PYTHONPATH"] = os.pathsep.join([root] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p])
    base.pop(ENV_CPUS, None)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    workers: list[Worker] = []
    try:
        for rank in range(1, world_size):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            if cpus:
                env[ENV_CPUS] = ",".join(map(str, cpus[rank - 1]))
            path = log_dir / f"learner-rank{rank}.log"
            with path.open("ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "espo_async.training.data_parallel"], env=env,
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            workers.append(Worker(rank, proc, path))
    except BaseException:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
        raise
    # rank 0 itself (DeepSpeed reads LOCAL_RANK; env:// reads the rest)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    return workers


def _watched(workers: list[Worker], fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` (which blocks until every rank joined) in a thread, failing at once if one of
    ``workers`` exits meanwhile (instead of waiting for the rendezvous timeout)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name=f"dp-{what}", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
        dead = [w for w in workers if w.proc.poll() is not None]
        if dead and t.is_alive():
            raise DataParallelError(f"data-parallel learner: {what}: " + _describe_workers(dead))
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _describe_workers(workers: list[Worker]) -> str:
    parts = []
    for w in workers:
        rc = w.proc.poll()
        state = "running" if rc is None else describe_exit(rc)
        tail = _tail(w.log_path)
        parts.append(f"rank {w.rank} (pid {w.proc.pid}): {state}; its log {w.log_path}"
                     + (f" ends with:\n{tail}" if tail else " is empty"))
    return "; ".join(parts)


# ------------------------------------------------------------------------- rank 0: commands
class Commands:
    """Rank 0's side of the command loop (``PPOTrainer.commands``)."""

    def __init__(self, channel: Channel, world_size: int, workers: list[Worker] | None, timeout_s: float) -> None:
        self.channel = channel
        self.world_size = world_size
        self.workers = workers or []
        self.timeout_s = float(timeout_s)
        self.failure: str | None = None
        self.closed = threading.Event()
        self.last_send = time.monotonic()
        self.lock: threading.RLock | None = None
        self._threads: list[threading.Thread] = []

    def start(self, lock: threading.RLock) -> None:
        """Keep-alive pings (under the trainer's operation lock) and, for workers this process
        started, a watch on their processes."""
        self.lock = lock
        self._threads = [threading.Thread(target=self._ping_loop, name="dp-ping", daemon=True)]
        if self.workers:
            self._threads.append(threading.Thread(target=self._watch_loop, name="dp-watch", daemon=True))
        for t in self._threads:
            t.start()

    # -- sending ---------------------------------------------------------------------------
    def _send(self, op: str, args: dict | None = None) -> None:
        self.channel.send(encode({"op": op, "args": args or {}}))
        self.last_send = time.monotonic()

    def send(self, op: str, args: dict | None = None) -> None:
        """Tell the workers to run ``op`` (called by rank 0 inside the operation, under its lock)."""
        if self.closed.is_set():
            raise DataParallelError(f"data-parallel learner: {op} after close()")
        if self.failure is not None:
            raise DataParallelError(f"data-parallel learner (world size {self.world_size}) cannot run {op}: "
                                    f"{self.failure}" + self._worker_report(wait=False))
        self._send(op, args)

    def _ping_loop(self) -> None:
        interval = min(30.0, self.timeout_s / 4)
        while not self.closed.wait(interval / 2):
            assert self.lock is not None
            with self.lock:  # never between an operation's command and its collectives
                if self.closed.is_set() or self.failure is not None:
                    return
                if time.monotonic() - self.last_send < interval:
                    continue
                try:
                    self._send("ping")
                except Exception as exc:  # noqa: BLE001 - the next operation reports it
                    self.failure = f"a keep-alive ping failed: {exc}"
                    log.error("data-parallel learner: %s", self.failure)
                    return

    def _watch_loop(self) -> None:
        while not self.closed.wait(0.5):
            dead = [w for w in self.workers if w.proc.poll() is not None]
            if dead and not self.closed.is_set():
                if self.failure is None:
                    self.failure = "worker " + ", ".join(
                        f"rank {w.rank} (pid {w.proc.pid}) {describe_exit(w.proc.returncode)}" for w in dead)
                log.error("data-parallel learner: %s", _describe_workers(dead))
                return

    def _worker_report(self, *, wait: bool = True) -> str:
        if not self.workers:
            return " (ranks started by a launcher: see their logs)"
        # a worker that failed on its own exits within moments: let its status show
        deadline = time.monotonic() + (3.0 if wait else 0.0)
        while time.monotonic() < deadline and all(w.proc.poll() is None for w in self.workers):
            time.sleep(0.1)
        return ". Workers: " + _describe_workers(self.workers)

    def broken(self, op: str, exc: BaseException) -> DataParallelError:
        """An operation failed with several ranks: the group is unusable from now on."""
        if isinstance(exc, DataParallelError):
            if self.failure is None:
                self.failure = str(exc)
            return exc
        if self.failure is None:
            self.failure = f"{op} failed on rank 0: {type(exc).__name__}: {exc}"
        return DataParallelError(f"data-parallel learner (world size {self.world_size}): {op} failed on rank 0 "
                                 f"({type(exc).__name__}: {exc})" + self._worker_report())

    # -- the end -----------------------------------------------------------------------------
    def close(self) -> list[int | None]:
        """Stop the workers ("stop" if the group is healthy, else signals) and wait for them;
        returns their exit codes (None: launcher-started). Idempotent."""
        if self.closed.is_set():
            return [w.proc.returncode for w in self.workers]
        healthy = self.failure is None
        self.closed.set()
        if healthy:
            try:
                self._send("stop")
            except Exception as exc:  # noqa: BLE001
                log.warning("data-parallel learner: could not send stop to the workers: %s", exc)
                healthy = False
        if healthy:
            deadline = time.monotonic() + STOP_WAIT_S
            for w in self.workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # still running after "stop", or a broken group (a worker may hang in a collective or be
        # stopped): nothing of theirs is worth waiting for
        for sig, wait in (((signal.SIGTERM, 5.0),) if healthy else ()) + ((signal.SIGKILL, 5.0),):
            alive = [w for w in self.workers if w.proc.poll() is None]
            for w in alive:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)
            for w in alive:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=wait)
        if healthy:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        return [w.proc.returncode for w in self.workers]


# -------------------------------------------------------------------------- building trainers
def _launched() -> bool:
    """Started by a launcher (or as a spawned worker): the environment names this rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def make_trainer(cfg, policy_dir: str, critic_dir: str, *, critic_from_policy: bool, work_dir: Path,
                 device: str = "cpu", micro_batch_tokens: int | None = None, gradient_checkpointing: bool = False,
                 log_dir: Path | None = None):
    """The learner's trainer: a plain ``PPOTrainer`` with one rank; with ``deepspeed.world_size``
    N > 1 (or under a launcher) rank 0's ``PPOTrainer`` with N-1 workers following it."""
    from espo_async.training.trainer import PPOTrainer

    kwargs = dict(critic_from_policy=bool(critic_from_policy), work_dir=str(work_dir),
                  micro_batch_tokens=micro_batch_tokens, gradient_checkpointing=bool(gradient_checkpointing))
    launched = _launched()
    world = int(os.environ["WORLD_SIZE"]) if launched else int(cfg.deepspeed.world_size)
    if world == 1:
        return PPOTrainer(cfg, str(policy_dir), str(critic_dir), device=device, **kwargs)
    if launched and int(os.environ["RANK"]) != 0:
        raise RuntimeError(f"the learner actor must be rank 0, not rank {os.environ['RANK']} (ranks > 0 run "
                           "python -m espo_async.training.data_parallel)")
    if launched and cfg.deepspeed.world_size not in (1, world):
        log.warning("deepspeed.world_size %d ignored: the launcher started %d ranks", cfg.deepspeed.world_size, world)
    import torch

    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if launched else 0)
        torch.cuda.set_device(dev)
    timeout_s = float(cfg.deepspeed.timeout_s)
    workers: list[Worker] = []
    if not launched:
        workers = spawn_workers(world, log_dir=Path(log_dir or work_dir), backend=backend, timeout_s=timeout_s,
                                cpus=cfg.deepspeed.worker_cpus)
        log.info("data-parallel learner: %d ranks (ZeRO stage %d, %s); workers %s", world, cfg.deepspeed.zero_stage,
                 backend, ", ".join(f"rank {w.rank} pid {w.proc.pid}" for w in workers))
    else:
        log.info("data-parallel learner: rank 0 of %d ranks started by a launcher (ZeRO stage %d, %s, master %s:%s)",
                 world, cfg.deepspeed.zero_stage, backend, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    commands: Commands | None = None
    try:
        channel = _watched(workers, lambda: _join_group(backend, timeout_s), "joining the process group")
        commands = Commands(channel, world, workers, timeout_s)
        init = dict(kwargs, config=cfg.model_dump(mode="json", by_alias=True), policy_dir=str(policy_dir),
                    critic_dir=str(critic_dir), device_type=dev.type)
        commands.send("init", init)
        trainer = PPOTrainer(cfg, str(policy_dir), str(critic_dir), device=str(dev), **kwargs)
    except BaseException as exc:
        err = commands.broken("init", exc) if commands is not None and isinstance(exc, Exception) else exc
        if commands is not None:
            commands.close()
        else:
            for w in workers:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
        if err is exc:
            raise
        raise err from exc
    trainer.commands = commands
    commands.start(trainer._op_lock)
    return trainer


# ----------------------------------------------------------------------------- worker ranks
def serve(trainer, channel: Channel) -> None:
    """A worker's loop: run rank 0's commands until "stop"."""
    while True:
        cmd = decode(channel.recv())
        op, args = cmd["op"], cmd.get("args") or {}
        if op == "stop":
            return
        if op == "ping":
            continue
        if op in _METHODS:
            getattr(trainer, op)(**args)
        else:
            raise DataParallelError(f"unknown command {op!r} from rank 0")


def _watch_parent() -> None:
    """A worker the learner started dies with it (no orphans): the kernel's parent-death signal,
    and a watchdog in case the signal was tied to a thread that ended."""
    parent = os.environ.get(ENV_PARENT)
    if not parent:
        return
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != int(parent):
                log.error("the learner (rank 0, pid %s) is gone: exiting", parent)
                logging.shutdown()
                os._exit(1)

    threading.Thread(target=watch, name="dp-parent", daemon=True).start()


def worker_main() -> int:
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("ESPO_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s [learner rank {rank}] %(name)s: %(message)s")
    _watch_parent()
    if os.environ.get(ENV_CPUS) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in os.environ[ENV_CPUS].split(",")})
    import torch
    import torch.distributed as dist

    if os.environ.get(ENV_THREADS):
        torch.set_num_threads(int(os.environ[ENV_THREADS]))
    backend = os.environ.get(ENV_BACKEND) or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout_s = float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)
    try:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        channel = _join_group(backend, timeout_s)
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "any"
        log.info("joined: rank %d of %d (%s, CPUs %s, %d threads), waiting for rank 0", rank, dist.get_world_size(),
                 backend, cpus, torch.get_num_threads())
        init = decode(channel.recv())
        if init.get("op") != "init":
            raise DataParallelError(f"expected init from rank 0, got {init.get('op')!r}")
        trainer = _build(init["args"], local_rank)
        log.info("trainer ready (ZeRO stage %d)", trainer.zero_stage)
        serve(trainer, channel)
    except BaseException:  # noqa: BLE001 - every failure ends this rank loudly
        log.exception("learner rank %d failed", rank)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)  # no collective teardown: rank 0 sees the closed connections at once
    log.info("stopped by rank 0")
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return 0


def _build(args: dict, local_rank: int):
    from espo_async.config import parse_config
    from espo_async.training.trainer import PPOTrainer

    cfg = parse_config(args["config"], source="rank 0")
    device = f"cuda:{local_rank}" if args["device_type"] == "cuda" else "cpu"
    return PPOTrainer(cfg, args["policy_dir"], args["critic_dir"], critic_from_policy=args["critic_from_policy"],
                      work_dir=Path(args["work_dir"]), device=device, micro_batch_tokens=args["micro_batch_tokens"],
                      gradient_checkpointing=args["gradient_checkpointing"])


# ------------------------------------------------------------------------------- entry point
def _strip_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher appends ``--local_rank=N`` (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(a)
    return out


def rank0_main(argv: list[str]) -> int:
    """Rank 0 under a launcher: ``run.py`` with these arguments for the learner role only; no
    actor restarts (a new learner would find no workers: the launcher's job ends and is started
    again, and the learner resumes from its checkpoint)."""
    import importlib.util

    if "--roles" in argv:
        roles = argv[argv.index("--roles") + 1] if argv.index("--roles") + 1 < len(argv) else ""
        if roles.replace(" ", "") != "learner":
            print(f"error: under a launcher rank 0 runs the learner role only, not --roles {roles}", file=sys.stderr)
            return 2
    else:
        argv = [*argv, "--roles", "learner"]
    argv = [*argv, "--set", "transport.restart_actors=false"]
    path = Path(__file__).resolve().parents[2] / "run.py"
    spec = importlib.util.spec_from_file_location("espo_run", path)
    if spec is None or spec.loader is None:
        print(f"error: cannot load {path}", file=sys.stderr)
        return 2
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return int(run.main(argv))


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not _launched():
        print("usage: started by the learner (deepspeed.world_size > 1) or by a launcher that sets RANK and "
              "WORLD_SIZE > 1, e.g. deepspeed --hostfile H --module espo_async.training.data_parallel "
              "--join RUN/join.json --run-dir DIR", file=sys.stderr)
        return 2
    if int(os.environ["RANK"]) == 0:
        return rank0_main(argv)
    return worker_main()


if __name__ == "__main__":
    sys.exit(main())
