"""Weight transfer from the learner to the engines (the seam: espo_async/weights/base.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from espo_async.weights.base import Model, WeightEngine, WeightLoader, WeightPublisher, WeightSource
from espo_async.weights.files import FileLoader, FilePublisher

if TYPE_CHECKING:  # pragma: no cover
    from espo_async.config import Config

__all__ = ["Model", "WeightEngine", "WeightLoader", "WeightPublisher", "WeightSource", "make_publisher",
           "loader_for", "LOADERS"]

#: URI scheme of an announcement -> the loader class that fetches it.
LOADERS: dict[str, type[WeightLoader]] = {"file": FileLoader}


def make_publisher(cfg: Config, run_dir: Path) -> WeightPublisher:
    """The learner's publisher for this run (safetensors files in ``weights.dir``)."""
    from espo_async.runtime.weight_files import weight_files_dir

    return FilePublisher(weight_files_dir(cfg, run_dir), keep_versions=cfg.weights.keep_versions)


def loader_for(uri: str, engine: WeightEngine) -> WeightLoader:
    """The loader that brings the weights behind ``uri`` into ``engine`` (by the URI's scheme)."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    try:
        cls = LOADERS[scheme]
    except KeyError:
        raise ValueError(f"no weight loader for {uri[:200]!r} (known schemes: {sorted(LOADERS)})") from None
    return cls(engine)
