"""The first weight transfer: one safetensors file per model and version, announced by its
``file://`` URI. The folder is ``weights.dir`` (espo_async/runtime/weight_files.py: the run
folder, reachable by every host on a shared filesystem, or /dev/shm on a single host).

Per-step files are transient (the checkpoint is what survives a crash): no fsync and no digest
(sha256 "") on this path. The last ``weights.keep_versions`` versions of each model stay, since a
load of an older one may still be in flight.
"""

from __future__ import annotations

from pathlib import Path

import protocols as P
from espo_async.weights.base import Model, WeightLoader, WeightPublisher, WeightSource

SCHEME = "file://"


def file_path(uri: str) -> Path:
    """The local path of a ``file://`` URI."""
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a file URI: {uri[:200]!r}")
    return Path(uri.removeprefix(SCHEME))


class FilePublisher(WeightPublisher):
    def __init__(self, folder: Path, *, keep_versions: int) -> None:
        self.folder = Path(folder)
        self.keep_versions = int(keep_versions)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, model: Model, version: int) -> Path:
        return self.folder / f"{model}-v{version}.safetensors"

    def publish(self, source: WeightSource, model: Model, version: int, *, step: int, epoch: str) -> P.WeightsAnnounced:
        path = self.path(model, version)
        save = source.save_policy_weights if model == "policy" else source.save_critic_weights
        sha, nbytes = save(path, digest=False, durable=False)
        return P.WeightsAnnounced(model=model, version=version, uri=f"{SCHEME}{path}", sha256=sha, nbytes=nbytes,
                                  step=step, epoch=epoch)

    def retire(self, version: int) -> None:
        for old in self.folder.glob("*-v*.safetensors"):
            if int(old.stem.rsplit("-v", 1)[1]) <= version - self.keep_versions:  # loads may be in flight
                old.unlink(missing_ok=True)


class FileLoader(WeightLoader):
    async def load(self, msg: P.WeightsAnnounced) -> float:
        return await self._load_file(file_path(msg.uri), msg.version)
