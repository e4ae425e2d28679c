"""Weight transfer from the learner to the engines (the seam: espo_async/weights/base.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from espo_async.weights.base import Model, WeightEngine, WeightLoader, WeightPublisher, WeightSource
from espo_async.weights.collective import CollectiveLoader, CollectivePublisher, select_backend
from espo_async.weights.files import FileLoader, FilePublisher

if TYPE_CHECKING:  # pragma: no cover
    from espo_async.config import Config

__all__ = ["Model", "WeightEngine", "WeightLoader", "WeightPublisher", "WeightSource", "make_publisher",
           "loader_for", "LOADERS", "collective_host"]

#: URI scheme of an announcement -> the loader class that fetches it.
LOADERS: dict[str, type[WeightLoader]] = {"file": FileLoader, "collective": CollectiveLoader}


def collective_host(cfg: Config) -> str:
    """The address engines reach the learner's weight-group store at (``weights.collective_host``)."""
    if cfg.weights.collective_host:
        return cfg.weights.collective_host
    if cfg.cluster.role_hosts.get("learner"):
        return cfg.cluster.role_hosts["learner"]
    return cfg.transport.host if cfg.transport.kind == "tcp" else "127.0.0.1"


def make_publisher(cfg: Config, run_dir: Path, *, cuda_available: bool | None = None) -> WeightPublisher:
    """The learner's publisher for this run: safetensors files in ``weights.dir`` (``weights.transport:
    files``), or the weight-update group with those files as its fallback (``collective``)."""
    from espo_async.runtime.weight_files import weight_files_dir

    w = cfg.weights
    files = FilePublisher(weight_files_dir(cfg, run_dir), keep_versions=w.keep_versions)
    if w.transport == "files":
        return files
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available() and cfg.model.learner_device != "cpu"
    return CollectivePublisher(
        files, host=collective_host(cfg), port=w.collective_port,
        members=w.collective_members or cfg.actors.sampler.count,
        backend=select_backend(w.collective_backend, cuda_available), timeout_s=w.collective_timeout_s,
        join_timeout_s=w.collective_join_timeout_s, bucket_mb=w.collective_bucket_mb)


def loader_for(uri: str, engine: WeightEngine) -> WeightLoader:
    """The loader that brings the weights behind ``uri`` into ``engine`` (by the URI's scheme)."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    try:
        cls = LOADERS[scheme]
    except KeyError:
        raise ValueError(f"no weight loader for {uri[:200]!r} (known schemes: {sorted(LOADERS)})") from None
    return cls(engine)
