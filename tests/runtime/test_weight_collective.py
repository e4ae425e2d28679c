"""The collective weight transfer (espo_async/weights/collective.py): gloo between the learner's
publisher (this process, rank 0) and engine-side loaders in other processes; the URI, the
packing, the backend choice and the fallbacks to files."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest
import torch

import protocols as P
from espo_async import weights as W
from espo_async.engines.weights import load_safetensors, publish_safetensors
from espo_async.weights import collective as C
from espo_async.weights.files import FilePublisher

WAIT_S = 60.0  # generous: the CI machines are small and shared


def tensors_of(version: int) -> dict[str, torch.Tensor]:
    """Version ``version`` of a small model: every dtype the packing must keep apart."""
    return {"w": torch.full((4, 3), float(version)), "b": torch.arange(5) + version,
            "h": torch.full((3,), version / 2, dtype=torch.bfloat16), "s": torch.tensor(float(-version))}


def as_lists(tensors) -> dict[str, list]:
    return {k: v.float().tolist() for k, v in dict(tensors).items()}


class Source:
    """Stands in for the trainer (a WeightSource with ``policy_tensors``)."""

    def __init__(self) -> None:
        self.version = 0

    def policy_tensors(self):
        return tensors_of(self.version)

    def save_policy_weights(self, path, *, digest=True, durable=True):
        return publish_safetensors(tensors_of(self.version), path, digest=digest, durable=durable)

    save_critic_weights = save_policy_weights


class LocalEngine:
    """An engine that takes part in the group the way a vLLM worker does (``GroupMember``)."""

    def __init__(self) -> None:
        self.member = C.GroupMember()
        self.loaded: list[tuple[int, str, dict]] = []

    async def join_weight_group(self, spec):
        return self.member.join(spec)

    async def receive_weights(self, spec, version, tensors):
        got = await asyncio.to_thread(self.member.receive, version, tensors)
        self.loaded.append((version, "collective", as_lists(got)))
        return 0.0

    async def load_weights(self, path, version):
        self.loaded.append((version, "file", as_lists(load_safetensors(Path(path)))))
        return 0.0


def serve_member(conn) -> None:
    """A member process: load every announcement it is sent (msgpack frames), report each."""
    engine = LocalEngine()

    async def load(msg):
        await W.loader_for(msg.uri, engine).load(msg)

    while (frame := conn.recv()) is not None:
        msg = P.decode(frame)
        try:
            asyncio.run(load(msg))
            conn.send(("ok", *engine.loaded[-1]))
        except Exception as e:
            conn.send(("error", msg.version, type(e).__name__, str(e)))


def ask(conns, msg) -> list[tuple]:
    for c in conns:
        c.send(P.encode(msg))
    out = []
    for c in conns:
        assert c.poll(WAIT_S), "a member did not answer"
        out.append(c.recv())
    return out


@pytest.fixture
def members():
    ctx = mp.get_context("spawn")
    pairs = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=serve_member, args=(child,), daemon=True) for _, child in pairs]
    for p in procs:
        p.start()
    yield [parent for parent, _ in pairs], procs
    for (parent, _), p in zip(pairs, procs):
        if p.is_alive():
            parent.send(None)
        p.join(WAIT_S)
        if p.is_alive():  # pragma: no cover
            p.kill()


def test_broadcast_late_joiner_and_broken_group_across_processes(tmp_path, members):
    conns, procs = members
    pub = C.CollectivePublisher(FilePublisher(tmp_path, keep_versions=2), host="127.0.0.1", members=2,
                                timeout_s=20, join_timeout_s=WAIT_S, bucket_mb=64 / (1 << 20))  # 64-byte buckets
    src = Source()
    try:
        # v0, the group forming: a file, and where to join; both members load it and join
        m0 = pub.publish(src, "policy", 0, step=0, epoch="e")
        assert m0.uri.startswith("collective://") and "file=" in m0.uri and m0.tensors == []
        assert ask(conns, m0) == [("ok", 0, "file", as_lists(tensors_of(0)))] * 2
        assert pub.wait_formed(WAIT_S) == "ready"

        # v1 through the group only: no file written
        src.version = 1
        m1 = pub.publish(src, "policy", 1, step=1, epoch="e")
        assert "file=" not in m1.uri and [t[0] for t in m1.tensors] == ["w", "b", "h", "s"]
        assert m1.tensors[2] == ("h", "bfloat16", [3]) and m1.nbytes == 4 * 12 + 8 * 5 + 2 * 3 + 4
        assert P.decode(P.encode(m1)) == m1  # the list travels on our wire
        assert ask(conns, m1) == [("ok", 1, "collective", as_lists(tensors_of(1)))] * 2
        assert pub.wait_sent(WAIT_S) and pub.stats["broadcasts"] == 1
        assert not (tmp_path / "policy-v1.safetensors").exists()

        # a late joiner (here in this process) is outside the group: from the next version on
        # the learner also writes files, which it loads; the members still receive
        late = LocalEngine()
        with pytest.raises(C.CollectiveError, match="state is 'outside'"):
            asyncio.run(W.loader_for(m1.uri, late).load(m1))
        assert late.member.wait_joined(WAIT_S) == "outside" and pub.outsiders() == 1
        src.version = 2
        m2 = pub.publish(src, "policy", 2, step=2, epoch="e")
        assert "file=" in m2.uri and m2.tensors
        assert ask(conns, m2) == [("ok", 2, "collective", as_lists(tensors_of(2)))] * 2
        asyncio.run(W.loader_for(m2.uri, late).load(m2))
        assert late.loaded == [(2, "file", as_lists(tensors_of(2)))]

        # a member dies: the broadcast fails (no hang), the other member falls back to the file,
        # and the learner announces plain files from then on
        conns[1].send(None)
        procs[1].join(WAIT_S)
        src.version = 3
        m3 = pub.publish(src, "policy", 3, step=3, epoch="e")
        assert pub.wait_sent(WAIT_S) and pub.state == "broken" and "version 3" in pub.error
        assert ask(conns[:1], m3) == [("ok", 3, "file", as_lists(tensors_of(3)))]
        src.version = 4
        m4 = pub.publish(src, "policy", 4, step=4, epoch="e")
        assert m4.uri.startswith("file://") and m4.tensors == []
        assert ask(conns[:1], m4) == [("ok", 4, "file", as_lists(tensors_of(4)))]
    finally:
        pub.close()


def test_formation_timeout_falls_back_to_files(tmp_path):
    pub = C.CollectivePublisher(FilePublisher(tmp_path, keep_versions=2), host="127.0.0.1", members=1,
                                timeout_s=1, join_timeout_s=0.5)
    try:
        assert pub.wait_formed(WAIT_S) == "broken" and "not formed within 0.5 s" in pub.error
        msg = pub.publish(Source(), "policy", 1, step=1, epoch="e")
        assert msg.uri == f"file://{tmp_path / 'policy-v1.safetensors'}"
        assert pub.publish(Source(), "critic", 1, step=1, epoch="e").uri.startswith("file://")  # always files
    finally:
        pub.close()


def test_out_of_step_member_fails_clearly_and_at_once():
    """A member that expects another version than the learner sends raises, drops its group, and
    the learner's broadcast then fails at once (both sides)."""
    store = C._tcp_store("127.0.0.1", 0, master=True, timeout_s=WAIT_S)
    groups = [None, None]

    def build(rank):  # each rank its own store client (one client serialises its waits)
        client = C._tcp_store("127.0.0.1", store.port, master=False, timeout_s=WAIT_S)
        groups[rank] = C.make_group("gloo", C._prefixed("g", client), rank, 2, WAIT_S)

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    sent: list[BaseException] = []
    sender = threading.Thread(target=lambda: sent.append(_try(C.send_weights, groups[0], tensors_of(5), 5,
                                                             timeout_s=20, bucket_bytes=1 << 20)))
    sender.start()
    member = C.GroupMember()  # rank 1 as an engine worker holds it, expecting version 4
    member.spec = C.GroupSpec(host="127.0.0.1", port=store.port, group="g", world=2, timeout_s=20)
    member._pg, member.state, groups[1] = groups[1], "member", None
    member._joined.set()
    with pytest.raises(C.CollectiveError, match="out of step: the learner broadcasts version 5"):
        member.receive(4, C.tensor_specs(tensors_of(4)))
    assert member.state == "broken" and member._pg is None
    t0 = time.monotonic()
    sender.join(WAIT_S)  # the member dropped its group: the sender's next bucket fails at once, not at 20 s
    assert sent and isinstance(sent[0], C.CollectiveError) and "version 5: bucket 0" in str(sent[0])
    assert time.monotonic() - t0 < 15


def _try(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


# ------------------------------------------------------------------------------- pure parts
def test_uri_round_trip():
    spec = C.GroupSpec(host="10.0.0.1", port=29555, group="a/b c", world=5, backend="nccl", timeout_s=30,
                       join_timeout_s=900, bucket_bytes=1 << 20)
    uri = C.group_uri(spec, "policy", 12, Path("/dev/shm/x y/policy-v12.safetensors"))
    assert C.parse_uri(uri) == (spec, "policy", 12, Path("/dev/shm/x y/policy-v12.safetensors"))
    assert C.parse_uri(C.group_uri(spec, "policy", 3)) == (spec, "policy", 3, None)
    v6 = C.GroupSpec(host="::1", port=1, group="g", world=2)
    assert C.parse_uri(C.group_uri(v6, "policy", 0))[0] == v6
    with pytest.raises(ValueError, match="malformed"):
        C.parse_uri("collective://h:1/g/policy?world=2")
    assert isinstance(W.loader_for(C.group_uri(spec, "policy", 3), object()), C.CollectiveLoader)


def test_backend_selection():
    assert C.select_backend("auto", cuda_available=False) == "gloo"
    assert C.select_backend("auto", cuda_available=True) == "nccl"
    assert C.select_backend("gloo", cuda_available=True) == "gloo"
    assert C.select_backend("nccl", cuda_available=True) == "nccl"
    with pytest.raises(ValueError, match="needs CUDA"):
        C.select_backend("nccl", cuda_available=False)
    with pytest.raises(ValueError, match="use auto, gloo or nccl"):
        C.select_backend("mpi", cuda_available=False)
    assert C.backend_device("gloo", "cuda:1") == "cpu"
    assert C.backend_device("nccl", "cuda:1") == "cuda:1" and C.backend_device("nccl", None) == "cuda"


def test_make_publisher_picks_the_transport(tmp_path):
    from espo_async.config import parse_config

    cfg = parse_config({"weights": {"dir": "run"}})
    assert cfg.weights.transport == "files" and isinstance(W.make_publisher(cfg, tmp_path), FilePublisher)
    cfg = parse_config({"weights": {"dir": "run", "transport": "collective", "collective_join_timeout_s": 0.2}})
    for cuda, backend in ((False, "gloo"), (True, "nccl")):
        pub = W.make_publisher(cfg, tmp_path, cuda_available=cuda)
        try:
            assert isinstance(pub, C.CollectivePublisher) and pub.spec.backend == backend
            assert pub.spec.world == 1 + cfg.actors.sampler.count and pub.spec.host == "127.0.0.1"
            assert pub.files.folder == tmp_path / "weights"
        finally:
            pub.close()
    cfg = parse_config({"weights": {"transport": "collective", "collective_members": 4,
                                    "collective_host": "10.1.2.3"}})
    assert W.collective_host(cfg) == "10.1.2.3" and cfg.weights.collective_members == 4


def test_explain_config_shows_the_transport():
    from espo_async.config import explain

    text = "\n".join(explain())
    assert "weights.transport" in text and "collective" in text and "weights.collective_timeout_s" in text


def test_buckets_pack_and_unpack_every_dtype():
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, dtype=torch.bfloat16),
               "d": torch.randn(1, 3, dtype=torch.float16), "e": torch.tensor(True)}
    specs = C.tensor_specs(tensors)
    assert specs[2] == ("c", "bfloat16", (2,)) and specs[4] == ("e", "bool", ())
    for cap in (1, 40, 1 << 20):
        buckets = C.plan_buckets(specs, cap)
        assert sorted(i for b in buckets for i in b) == list(range(5))
        assert cap > 1 << 10 or len(buckets) > 1
        got = {}
        for idx in buckets:
            got.update(C.unpack_bucket(C.pack_bucket([tensors[specs[i][0]] for i in idx], "cpu"), [specs[i] for i in idx]))
        assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert C.specs_hash(specs) != C.specs_hash(specs[:4]) and C.specs_hash(specs) == C.specs_hash(list(specs))


def test_loader_without_group_support_uses_the_file(tmp_path):
    """An engine that cannot take part (the fake sampler) loads the file, or says why not."""
    path = tmp_path / "policy-v2.safetensors"
    publish_safetensors(tensors_of(2), path)
    spec = C.GroupSpec(host="127.0.0.1", port=1, group="g", world=2)

    class FileOnly:
        loaded = None

        async def load_weights(self, p, version):
            self.loaded = (Path(p), version)

    eng = FileOnly()
    with_file = P.WeightsAnnounced(model="policy", version=2, uri=C.group_uri(spec, "policy", 2, path), sha256="",
                                   nbytes=0, tensors=[("w", "float32", [4, 3])])
    asyncio.run(W.loader_for(with_file.uri, eng).load(with_file))
    assert eng.loaded == (path, 2)
    no_file = P.WeightsAnnounced(model="policy", version=3, uri=C.group_uri(spec, "policy", 3), sha256="", nbytes=0,
                                 tensors=[("w", "float32", [4, 3])])
    with pytest.raises(C.WeightsUnavailable, match="'unsupported'"):
        asyncio.run(W.loader_for(no_file.uri, eng).load(no_file))
