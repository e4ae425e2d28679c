"""The weight-transfer seam: how a new policy (or critic) version goes from the learner into the
engines that use it.

* The learner calls only a ``WeightPublisher``: ``publish`` makes one model's weights of one
  version available and returns the ``WeightsAnnounced`` to broadcast (its ``uri`` says where and
  how to fetch them); ``retire`` frees versions no load can still want.
* A sampler or the critic calls only a ``WeightLoader``: ``load`` brings the announced version into
  its engine. ``loader_for(uri)`` (espo_async/weights/__init__.py) picks the loader by the URI's
  scheme.

The default transfer is a safetensors file per version (``file://``, espo_async/weights/files.py);
``weights.transport: collective`` broadcasts the policy through a gloo/NCCL process group
(``collective://``, espo_async/weights/collective.py), with files as its fallback. Another
transfer (CUDA IPC handles) is one new module with a publisher and a loader for its own URI
scheme, registered in espo_async/weights/__init__.py.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import protocols as P

Model = Literal["policy", "critic"]


class WeightSource(Protocol):
    """Where a publisher takes the weights from (the learner's trainer): each ``save_*`` writes
    one model as a safetensors file and returns (sha256 or "", bytes written); the collective
    transfer also calls ``policy_tensors()`` (the policy's {HF name: tensor}, as in the file)."""

    def save_policy_weights(self, path: Path, *, digest: bool = True, durable: bool = True) -> tuple[str, int]: ...

    def save_critic_weights(self, path: Path, *, digest: bool = True, durable: bool = True) -> tuple[str, int]: ...


class WeightEngine(Protocol):
    """What a loader hands the weights to: a sampler's engine (``async``, returns seconds) or the
    critic's value model (blocking; the loader runs it in a worker thread)."""

    def load_weights(self, path: Path, version: int): ...


class WeightPublisher(abc.ABC):
    """Learner side of a weight transfer."""

    @abc.abstractmethod
    def publish(self, source: WeightSource, model: Model, version: int, *, step: int, epoch: str) -> P.WeightsAnnounced:
        """Make ``model``'s current weights available as ``version``; the announcement to send."""

    def retire(self, version: int) -> None:  # noqa: B027 - optional
        """``version`` was just published: free older versions no load can still want."""

    def close(self) -> None:  # noqa: B027 - optional
        """The learner stops: release what the transfer holds (a process group, threads)."""


class WeightLoader(abc.ABC):
    """Engine side of a weight transfer."""

    def __init__(self, engine: WeightEngine) -> None:
        self.engine = engine

    @abc.abstractmethod
    async def load(self, msg: P.WeightsAnnounced) -> float:
        """Bring the announced weights into the engine; returns the seconds the engine took
        (raises if they cannot be loaded: the caller keeps its weights)."""

    async def _load_file(self, path: Path, version: int) -> float:
        """Load the safetensors file ``path`` as ``version`` into the engine: the seconds the engine
        reports, else the seconds the call took."""
        t0 = time.perf_counter()
        seconds = await self._call_engine(path, version)
        return float(seconds) if seconds is not None else time.perf_counter() - t0

    async def _call_engine(self, *args):
        """The engine's ``load_weights(*args)``: awaited, or in a worker thread if it blocks."""
        fn = self.engine.load_weights
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        return await asyncio.to_thread(fn, *args)
