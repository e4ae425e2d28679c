"""The weight-transfer seam (espo_async/weights/): the safetensors-file transfer, a stub transfer
registered beside it, and the actors calling only the interface."""

from __future__ import annotations

import ast
import asyncio
import threading
from pathlib import Path

import pytest
import torch

import protocols as P
from espo_async import weights as W
from espo_async.engines.weights import load_safetensors, publish_safetensors
from espo_async.weights.files import FileLoader, FilePublisher, file_path

REPO = Path(__file__).resolve().parents[2]


class TensorSource:
    """Stands in for the trainer: a WeightSource with fixed tensors."""

    def __init__(self):
        self.calls = []

    def _save(self, model, path, digest, durable):
        self.calls.append((model, Path(path).name, digest, durable))
        return publish_safetensors({"w": torch.full((2,), float(len(self.calls)))}, path, durable=durable, digest=digest)

    def save_policy_weights(self, path, *, digest=True, durable=True):
        return self._save("policy", path, digest, durable)

    def save_critic_weights(self, path, *, digest=True, durable=True):
        return self._save("critic", path, digest, durable)


class AsyncEngine:
    def __init__(self):
        self.loaded = []

    async def load_weights(self, path, version):
        self.loaded.append((load_safetensors(path)["w"].tolist(), version))
        return 0.25


class BlockingModel:
    def __init__(self):
        self.loaded = []
        self.thread = None

    def load_weights(self, path, version):
        self.thread = threading.current_thread()
        self.loaded.append((Path(path), version))


def test_file_transfer_publishes_loads_and_retires(tmp_path):
    publisher = FilePublisher(tmp_path / "w", keep_versions=2)
    src = TensorSource()
    msgs = []
    for v in range(4):
        msgs.append(publisher.publish(src, "policy", v, step=v, epoch="e1"))
        publisher.publish(src, "critic", v, step=v, epoch="e1")
        publisher.retire(v)
    m = msgs[-1]
    assert isinstance(m, P.WeightsAnnounced) and (m.model, m.version, m.step, m.epoch) == ("policy", 3, 3, "e1")
    assert m.uri == f"file://{tmp_path / 'w' / 'policy-v3.safetensors'}" and m.nbytes > 0 and m.sha256 == ""
    assert all(not digest and not durable for _, _, digest, durable in src.calls)  # the per-step path
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "critic-v2.safetensors", "critic-v3.safetensors", "policy-v2.safetensors", "policy-v3.safetensors"]
    # engine side: an async engine gets the path and reports its own seconds
    engine = AsyncEngine()
    loader = W.loader_for(m.uri, engine)
    assert isinstance(loader, FileLoader)
    assert asyncio.run(loader.load(m)) == 0.25
    assert engine.loaded == [([7.0, 7.0], 3)]
    # a blocking model (the critic's) is loaded in a worker thread, timed by the loader
    model = BlockingModel()
    seconds = asyncio.run(W.loader_for(m.uri, model).load(m))
    assert model.loaded == [(file_path(m.uri), 3)] and seconds >= 0
    assert model.thread is not threading.main_thread()


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="no weight loader"):
        W.loader_for("nccl://group/3", AsyncEngine())
    with pytest.raises(ValueError):
        file_path("http://x")


# ---------------------------------------------------------------- a stub transfer, as a new one would be
class StubPublisher(W.WeightPublisher):
    """Weights in memory, announced as stub://<model>/<version>."""

    store: dict[str, dict] = {}

    def publish(self, source, model, version, *, step, epoch):
        self.store[f"{model}/{version}"] = {"source": source, "step": step}
        return P.WeightsAnnounced(model=model, version=version, uri=f"stub://{model}/{version}", sha256="",
                                  nbytes=0, step=step, epoch=epoch)


class StubLoader(W.WeightLoader):
    async def load(self, msg):
        entry = StubPublisher.store[msg.uri.removeprefix("stub://")]
        self.engine.received = (entry["step"], msg.version)
        return 0.0


def test_a_stub_transfer_plugs_into_the_seam(monkeypatch):
    monkeypatch.setitem(W.LOADERS, "stub", StubLoader)
    msg = StubPublisher().publish(object(), "policy", 5, step=4, epoch="e")

    class Engine:
        received = None

        async def load_weights(self, path, version):  # pragma: no cover - not used by the stub
            raise AssertionError

    engine = Engine()
    assert asyncio.run(W.loader_for(msg.uri, engine).load(msg)) == 0.0
    assert engine.received == (4, 5)


def test_make_publisher_is_the_file_transfer_in_weights_dir(tmp_path):
    from espo_async.config import parse_config
    from espo_async.runtime.weight_files import weight_files_dir

    cfg = parse_config({"weights": {"dir": "run", "keep_versions": 4}})
    pub = W.make_publisher(cfg, tmp_path)
    assert isinstance(pub, FilePublisher)
    assert pub.folder == weight_files_dir(cfg, tmp_path) and pub.keep_versions == 4


def test_actors_call_only_the_interface():
    """The learner, the samplers and the critics name no file URI and no safetensors call: what
    a transfer is lives in espo_async/weights/."""
    for path in [REPO / "actors" / "learner.py", *(REPO / "actors" / "samplers").glob("*.py"),
                 *(REPO / "actors" / "critics").glob("*.py")]:
        tree = ast.parse(path.read_text())
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not any("file://" in s for s in strings), path
        assert not names & {"save_policy_weights", "save_critic_weights", "removeprefix"}, path
