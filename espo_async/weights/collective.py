"""The collective weight transfer: the learner broadcasts each new policy version to every engine
worker through a torch.distributed process group of its own (gloo on CPU, NCCL on GPU), the way
verl and OpenRLHF update running vLLM engines. Announced as
``collective://HOST:PORT/GROUP/MODEL/VERSION?world=N&backend=gloo&timeout=60&join=600&bucket=B[&file=PATH]``.

Group formation. The learner (``CollectivePublisher``) is rank 0: it hosts a ``TCPStore`` at
HOST:PORT and builds the group (``ProcessGroupGloo(store, 0, world, timeout)`` directly, never
``init_process_group``: vLLM's own default group is untouched) in a background thread. Until the
group is formed, every version is also written as a file and its URI names that file (``file=``)
plus where to join: an engine that gets such an announcement loads the file and starts joining
(``GroupMember.join``: a thread that takes the next rank from the store's counter and builds its
side of the group). ``world`` is 1 + ``weights.collective_members`` engine workers.

Per version, once formed: ``publish`` copies the policy's tensors (HF names, as in the file),
returns the announcement with their (name, dtype, shape) list (``WeightsAnnounced.tensors``) and
broadcasts them in a background thread: first a header (version, tensor count, bytes, a hash of
the list: a member out of step fails at once instead of loading wrong bytes), then the tensors
packed as raw bytes into buckets of ``weights.collective_bucket_mb``. Each member's loader
receives every bucket, then loads the tensors with ``reload_weights`` (a failed receive leaves
the engine's weights as they were).

Late joiners. The group's membership is fixed once formed. An engine that asks to join after
that (a sampler that joined late or restarted) gets a rank >= world from the store's counter:
it is outside the group, and the learner, which reads that counter at every publish, then writes
the file of every version too (``file=`` in the URI) and the outsider loads those. The one
version announced before the learner saw it is not loadable by it (a clear error; the sampler
keeps its weights and loads the next version).

Fallback. Every collective operation has a timeout (``weights.collective_timeout_s``; the
formation ``weights.collective_join_timeout_s``) and raises ``CollectiveError`` with what timed
out. A group that failed (formation timed out, a member died, a broadcast timed out or went out
of step) is broken for good: the publisher announces plain ``file://`` versions from then on, and
an engine whose receive failed loads the file if the announcement names one. The critic (an HF
model, not a vLLM engine) always gets files.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

import protocols as P
from espo_async.weights.base import Model, WeightLoader, WeightPublisher, WeightSource
from espo_async.weights.files import FilePublisher

log = logging.getLogger(__name__)

SCHEME = "collective://"
BACKENDS = ("gloo", "nccl")
ALIGN = 16  # every tensor starts at a multiple of this many bytes in a bucket (view(dtype) needs it)

TensorSpec = tuple[str, str, tuple[int, ...]]
"""(HF name, torch dtype name without ``torch.``, shape)."""


class CollectiveError(RuntimeError):
    """A collective operation failed or timed out: the group is broken (files from now on)."""


class WeightsUnavailable(RuntimeError):
    """An announced version cannot reach this engine (not a group member, and no file)."""


# ------------------------------------------------------------------------------------ addresses
@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Where and how to join one weight-update group (what the URI says)."""

    host: str
    port: int
    group: str
    world: int
    backend: str = "gloo"
    timeout_s: float = 60.0
    join_timeout_s: float = 600.0
    bucket_bytes: int = 64 << 20

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def group_uri(spec: GroupSpec, model: str, version: int, file: Path | None = None) -> str:
    """The announcement URI of ``version`` (``file``: where its safetensors file is, if written)."""
    query = {"world": spec.world, "backend": spec.backend, "timeout": spec.timeout_s, "join": spec.join_timeout_s,
             "bucket": spec.bucket_bytes}
    if file is not None:
        query["file"] = str(file)
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    return f"{SCHEME}{host}:{spec.port}/{quote(spec.group, safe='')}/{model}/{version}?{urlencode(query)}"


def parse_uri(uri: str) -> tuple[GroupSpec, str, int, Path | None]:
    """(group, model, version, file or None) of a ``collective://`` URI; ValueError if malformed."""
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a collective URI: {uri[:200]!r}")
    try:
        rest, _, query = uri.removeprefix(SCHEME).partition("?")
        netloc, group, model, version = rest.split("/")
        host, _, port = netloc.rpartition(":")
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        spec = GroupSpec(host=host.strip("[]"), port=int(port), group=unquote(group), world=int(q["world"]),
                         backend=q.get("backend", "gloo"), timeout_s=float(q.get("timeout", 60.0)),
                         join_timeout_s=float(q.get("join", 600.0)), bucket_bytes=int(q.get("bucket", 64 << 20)))
        file = Path(q["file"]) if q.get("file") else None
        return spec, model, int(version), file
    except (ValueError, KeyError) as e:
        raise ValueError(f"malformed collective URI {uri[:200]!r}: {e}") from None


def select_backend(name: str, cuda_available: bool) -> str:
    """'auto' -> 'nccl' where CUDA is available, else 'gloo'; 'nccl' without CUDA is an error."""
    if name == "auto":
        return "nccl" if cuda_available else "gloo"
    if name not in BACKENDS:
        raise ValueError(f"collective backend {name!r}: use auto, gloo or nccl")
    if name == "nccl" and not cuda_available:
        raise ValueError("collective backend 'nccl' needs CUDA (use gloo on CPU)")
    return name


def backend_device(backend: str, local_device: Any = None) -> str:
    """Where a backend's tensors live: NCCL on the worker's CUDA device, gloo on the CPU."""
    if backend == "nccl":
        return str(local_device) if local_device is not None and str(local_device).startswith("cuda") else "cuda"
    return "cpu"


# ------------------------------------------------------------------------------ tensor packing
def tensor_specs(tensors: Mapping[str, Any]) -> list[TensorSpec]:
    """The announced (name, dtype, shape) list, in the order the tensors are broadcast."""
    return [(name, str(t.dtype).removeprefix("torch."), tuple(int(d) for d in t.shape)) for name, t in tensors.items()]


def _dtype(name: str):
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dt


def spec_nbytes(spec: TensorSpec) -> int:
    return math.prod(spec[2]) * _dtype(spec[1]).itemsize


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensors (indices into ``specs``) grouped into buckets of at most
    ``bucket_bytes`` (aligned sizes); a tensor larger than that is a bucket of its own."""
    buckets: list[list[int]] = []
    size = 0
    for i, spec in enumerate(specs):
        n = _aligned(spec_nbytes(spec))
        if not buckets or (size + n > bucket_bytes and buckets[-1]):
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return buckets


def specs_hash(specs: Sequence[TensorSpec]) -> int:
    """A 62-bit hash of the tensor list (both ends compare it in the header)."""
    h = hashlib.blake2b(repr([(n, d, tuple(s)) for n, d, s in specs]).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 2


def pack_bucket(tensors: Sequence[Any], device: str):
    """One uint8 buffer holding ``tensors``' bytes, each at an ``ALIGN``-ed offset."""
    import torch

    total = sum(_aligned(t.numel() * t.element_size()) for t in tensors)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    off = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        buf[off:off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        off += _aligned(n)
    return buf


def unpack_bucket(buf: Any, specs: Sequence[TensorSpec]) -> list[tuple[str, Any]]:
    """The (name, tensor) views of a bucket packed by ``pack_bucket``."""
    out = []
    off = 0
    for name, dtype, shape in specs:
        n = spec_nbytes((name, dtype, shape))
        out.append((name, buf[off:off + n].view(_dtype(dtype)).reshape(shape)))
        off += _aligned(n)
    return out


# ------------------------------------------------------------------------------------ the group
def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def make_group(backend: str, store: Any, rank: int, world: int, timeout_s: float):
    """A process group of its own over ``store`` (blocks until all ``world`` ranks are in, at
    most ``timeout_s``). Never the default group: vLLM's stays as it is."""
    import torch.distributed as dist

    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, _timedelta(timeout_s))
    if backend == "nccl":
        # torch's NCCL group over the same store (vLLM's PyNcclCommunicator over a
        # StatelessProcessGroup would do as well); needs CUDA on every rank.
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _timedelta(timeout_s)
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    raise ValueError(f"collective backend {backend!r}: use gloo or nccl")


def _broadcast(pg: Any, tensor: Any, timeout_s: float, what: str) -> None:
    """Broadcast ``tensor`` from rank 0, or raise ``CollectiveError`` after ``timeout_s``."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    opts.timeout = _timedelta(timeout_s)
    try:
        work = pg.broadcast([tensor], opts)
        work.wait(_timedelta(timeout_s))
    except Exception as e:  # gloo: RuntimeError "Timed out ..." / "Connection closed by peer"
        raise CollectiveError(f"{what}: failed (timeout {timeout_s:g} s): {type(e).__name__}: {str(e)[:300]}") from e


def send_weights(pg: Any, tensors: Mapping[str, Any], version: int, *, timeout_s: float, bucket_bytes: int,
                 device: str = "cpu") -> int:
    """Rank 0: broadcast ``tensors`` as ``version`` (header, then the buckets). Returns bytes sent."""
    import torch

    specs = tensor_specs(tensors)
    values = list(tensors.values())
    total = sum(spec_nbytes(s) for s in specs)
    header = torch.tensor([version, len(specs), total, specs_hash(specs)], dtype=torch.int64, device=device)
    _broadcast(pg, header, timeout_s, f"version {version}: header")
    for b, idx in enumerate(plan_buckets(specs, bucket_bytes)):
        _broadcast(pg, pack_bucket([values[i] for i in idx], device), timeout_s, f"version {version}: bucket {b}")
    return total


def recv_weights(pg: Any, specs: Sequence[TensorSpec], version: int, *, timeout_s: float, bucket_bytes: int,
                 device: str = "cpu") -> list[tuple[str, Any]]:
    """A member: receive ``version`` as broadcast by ``send_weights``; its (name, tensor) list.
    Raises ``CollectiveError`` if the sender is at another version or another tensor list."""
    import torch

    specs = [(n, d, tuple(s)) for n, d, s in specs]
    total = sum(spec_nbytes(s) for s in specs)
    expected = [version, len(specs), total, specs_hash(specs)]
    header = torch.zeros(4, dtype=torch.int64, device=device)
    _broadcast(pg, header, timeout_s, f"version {version}: header")
    got = [int(x) for x in header.cpu().tolist()]
    if got != expected:
        raise CollectiveError(f"out of step: the learner broadcasts version {got[0]} ({got[1]} tensors, {got[2]} "
                              f"bytes), this engine expected version {version} ({len(specs)} tensors, {total} bytes)")
    out: list[tuple[str, Any]] = []
    for b, idx in enumerate(plan_buckets(specs, bucket_bytes)):
        bucket = [specs[i] for i in idx]
        buf = torch.empty(sum(_aligned(spec_nbytes(s)) for s in bucket), dtype=torch.uint8, device=device)
        _broadcast(pg, buf, timeout_s, f"version {version}: bucket {b}")
        out.extend(unpack_bucket(buf, bucket))
    return out


def _tcp_store(host: str, port: int, *, master: bool, timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=master, wait_for_workers=False, timeout=_timedelta(timeout_s))


def _prefixed(group: str, store: Any):
    import torch.distributed as dist

    return dist.PrefixStore(f"espo-weights/{group}", store)


# ------------------------------------------------------------------------------- engine side
class GroupMember:
    """An engine worker's side of the group (runs inside a vLLM worker, or any process).

    ``join`` returns at once: a thread takes a rank from the store's counter and builds the group
    (a rank >= world: this worker is outside the group and loads files). ``receive`` waits for the
    join (at most the group's join timeout) and receives one version. A failure breaks this
    member's group for good (later receives fail at once)."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.spec: GroupSpec | None = None
        self.state = "none"  # none | joining | member | outside | failed | broken
        self.rank: int | None = None
        self.error = ""
        self._pg = None
        self._store = None
        self._joined = threading.Event()

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "rank": self.rank, "group": self.spec.group if self.spec else None,
                "error": self.error}

    def join(self, spec: GroupSpec | Mapping[str, Any]) -> dict[str, Any]:
        """Start joining ``spec``'s group (no-op if this member already joined or is joining it)."""
        spec = spec if isinstance(spec, GroupSpec) else GroupSpec(**spec)
        if self.spec == spec and self.state != "none":
            return self.status()
        self._pg = None  # another group (e.g. a restarted learner's): the old one is dead (dropped: closed)
        self.spec, self.state, self.rank, self.error = spec, "joining", None, ""
        self._joined = joined = threading.Event()
        threading.Thread(target=self._join, args=(spec, joined), name="espo-weight-group-join", daemon=True).start()
        return self.status()

    def _join(self, spec: GroupSpec, joined: threading.Event) -> None:
        try:
            store = _prefixed(spec.group, _tcp_store(spec.host, spec.port, master=False, timeout_s=spec.join_timeout_s))
            rank = int(store.add("ranks", 1))
            if self.spec is not spec:
                return
            self.rank, self._store = rank, store
            if rank >= spec.world:
                self.state = "outside"
                return
            pg = make_group(spec.backend, store, rank, spec.world, spec.join_timeout_s)
            if self.spec is spec:
                self._pg, self.state = pg, "member"
        except Exception as e:  # the learner's store unreachable, formation timed out
            if self.spec is spec:
                self.state, self.error = "failed", f"{type(e).__name__}: {str(e)[:300]}"
                log.warning("could not join weight group %s: %s", spec.group, self.error)
        finally:
            joined.set()

    def wait_joined(self, timeout_s: float) -> str:
        """The state once the join ended (or 'joining' after ``timeout_s``)."""
        self._joined.wait(timeout_s)
        return self.state

    def receive(self, version: int, specs: Sequence[TensorSpec]) -> list[tuple[str, Any]]:
        """Receive ``version`` from the learner (``CollectiveError`` if not possible or failed)."""
        if self.spec is None:
            raise CollectiveError("not in a weight group (join first)")
        state = self.wait_joined(self.spec.join_timeout_s)
        if state != "member" or self._pg is None:
            raise CollectiveError(f"cannot receive version {version}: this worker's weight group state is {state!r}"
                                  + (f" ({self.error})" if self.error else ""))
        try:
            return recv_weights(self._pg, specs, version, timeout_s=self.spec.timeout_s,
                                bucket_bytes=self.spec.bucket_bytes,
                                device=backend_device(self.spec.backend, self.device))
        except Exception as e:
            self.error = f"{type(e).__name__}: {str(e)[:300]}"
        # Out of the except block: no traceback holds the group any more, so dropping it closes
        # its connections and the learner's broadcast fails at once instead of at its timeout
        # (gloo's abort()/shutdown() do not close them).
        self._pg, self.state = None, "broken"
        raise CollectiveError(f"version {version}: {self.error}")


# ------------------------------------------------------------------------------ learner side
class CollectivePublisher(WeightPublisher):
    """Rank 0 of the weight-update group (see the module docstring); files through ``files``."""

    def __init__(self, files: FilePublisher, *, host: str, port: int = 0, members: int, backend: str = "gloo",
                 timeout_s: float = 60.0, join_timeout_s: float = 600.0, bucket_mb: float = 64.0) -> None:
        if members < 1:
            raise ValueError(f"a weight group needs at least one engine worker, got members={members}")
        self.files = files
        self._store_master = _tcp_store(host, port, master=True, timeout_s=join_timeout_s)
        self.spec = GroupSpec(host=host, port=int(self._store_master.port),
                              group=f"{secrets.token_hex(6)}", world=members + 1, backend=backend,
                              timeout_s=float(timeout_s), join_timeout_s=float(join_timeout_s),
                              bucket_bytes=max(int(bucket_mb * (1 << 20)), ALIGN))
        self._store = _prefixed(self.spec.group, self._store_master)
        self._store.add("ranks", 0)  # the counter exists before anyone joins
        self.state = "forming"  # forming | ready | broken
        self.error = ""
        self._pg = None
        self._lock = threading.Lock()
        self._sending: threading.Thread | None = None
        self.stats: dict[str, float] = {"broadcasts": 0, "broadcast_s": 0.0, "last_broadcast_s": 0.0,
                                        "files_written": 0}
        self._forming = threading.Thread(target=self._form, name="espo-weight-group-form", daemon=True)
        self._forming.start()

    # -- the group
    def _form(self) -> None:
        s = self.spec
        try:
            pg = make_group(s.backend, self._store, 0, s.world, s.join_timeout_s)
        except Exception as e:
            self._break(f"the group was not formed within {s.join_timeout_s:g} s ({type(e).__name__}: {str(e)[:300]})")
            return
        with self._lock:
            if self.state == "forming":
                self._pg, self.state = pg, "ready"
                log.info("weight group %s formed: %d engine workers", s.group, s.world - 1)

    def _break(self, why: str) -> None:
        with self._lock:
            if self.state == "broken":
                return
            self._pg, self.state, self.error = None, "broken", why  # dropped: its connections close
        log.warning("weight group %s broken, weights go as files from now on: %s", self.spec.group, why)

    def wait_formed(self, timeout_s: float) -> str:
        """The group's state once formed or failed (or 'forming' after ``timeout_s``)."""
        self._forming.join(timeout_s)
        return self.state

    def outsiders(self) -> int:
        """Engine workers that asked to join after the group was full (they need files)."""
        try:
            return max(0, int(self._store.add("ranks", 0)) - (self.spec.world - 1))
        except Exception:  # pragma: no cover - the store is in this process
            return 0

    def wait_sent(self, timeout_s: float | None = None) -> bool:
        """Wait for the broadcast in flight (if any); False if it is still running."""
        t = self._sending
        if t is not None:
            t.join(timeout_s)
            return not t.is_alive()
        return True

    def _send(self, tensors: dict, version: int) -> None:
        t0 = time.perf_counter()
        try:
            send_weights(self._pg, tensors, version, timeout_s=self.spec.timeout_s, bucket_bytes=self.spec.bucket_bytes,
                         device=backend_device(self.spec.backend))
        except Exception as e:
            self._break(str(e))
            return
        dt = time.perf_counter() - t0
        log.info("version %d broadcast to %d engine workers in %.3f s", version, self.spec.world - 1, dt)
        self.stats["broadcasts"] += 1
        self.stats["broadcast_s"] += dt
        self.stats["last_broadcast_s"] = dt

    # -- the seam
    def publish(self, source: WeightSource, model: Model, version: int, *, step: int, epoch: str) -> P.WeightsAnnounced:
        if model != "policy":  # the critic is an HF model outside the group: files
            return self.files.publish(source, model, version, step=step, epoch=epoch)
        # the previous version's broadcast first (members receive versions in order)
        if not self.wait_sent(self.spec.timeout_s + 5.0):
            self._break(f"the broadcast of the previous version still runs after {self.spec.timeout_s:g} s")
        state = self.state
        if state == "broken":
            return self.files.publish(source, model, version, step=step, epoch=epoch)
        file = None
        nbytes = 0
        if state == "forming" or self.outsiders():
            msg = self.files.publish(source, model, version, step=step, epoch=epoch)
            file, nbytes = self.files.path(model, version), msg.nbytes
            self.stats["files_written"] += 1
        specs: list[TensorSpec] = []
        if state == "ready":
            tensors = _snapshot(source, backend_device(self.spec.backend))
            specs = tensor_specs(tensors)
            nbytes = sum(spec_nbytes(s) for s in specs)
            self._sending = threading.Thread(target=self._send, args=(tensors, version),
                                             name=f"espo-weight-broadcast-v{version}", daemon=True)
            self._sending.start()
        return P.WeightsAnnounced(model=model, version=version, uri=group_uri(self.spec, model, version, file),
                                  sha256="", nbytes=nbytes, step=step, epoch=epoch,
                                  tensors=[(n, d, list(s)) for n, d, s in specs])

    def retire(self, version: int) -> None:
        self.files.retire(version)

    def close(self) -> None:
        """Stop taking part (the broadcast in flight gets its timeout to end)."""
        self.wait_sent(self.spec.timeout_s)
        with self._lock:
            self._pg, self.state = None, "broken"


def _snapshot(source: WeightSource, device: str) -> dict:
    """A copy of the policy's tensors (the next step changes the live ones during the broadcast)."""
    tensors_of = getattr(source, "policy_tensors", None)
    if tensors_of is None:
        raise TypeError(f"{type(source).__name__} has no policy_tensors(): the collective transfer needs it")
    return {k: v.detach().to(device, copy=True).contiguous() for k, v in tensors_of().items()}


# ------------------------------------------------------------------------------- loader
class CollectiveLoader(WeightLoader):
    """Brings a ``collective://`` version into an engine: received from the group if the engine
    is a member and the version was broadcast, else its file (if the URI names one).

    An engine takes part if it has ``join_weight_group(spec)`` and ``receive_weights(spec,
    version, tensors)`` (the vLLM engine); any other engine (the fake sampler) uses the files."""

    async def load(self, msg: P.WeightsAnnounced) -> float:
        spec, _model, version, file = parse_uri(msg.uri)
        t0 = time.perf_counter()
        engine = self.engine
        state = "unsupported"
        if hasattr(engine, "join_weight_group") and hasattr(engine, "receive_weights"):
            state = str((await engine.join_weight_group(spec.as_dict())).get("state"))
            if msg.tensors and state in ("joining", "member"):
                try:
                    seconds = await engine.receive_weights(spec.as_dict(), version, [tuple(t) for t in msg.tensors])
                    return float(seconds) if seconds is not None else time.perf_counter() - t0
                except Exception as e:
                    if file is None:
                        raise
                    log.warning("version %d: collective receive failed (%s); loading its file", version, e)
        if file is not None:
            return await self._load_file(file, version)
        raise WeightsUnavailable(
            f"version {version} went to the weight group's members only and this engine is not one (state "
            f"{state!r}); the learner writes files from the next version on, which this engine loads")
