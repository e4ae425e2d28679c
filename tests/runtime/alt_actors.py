"""Alternative actor classes, swapped in by config in the system tests."""

from __future__ import annotations

from actors.stopper import Stopper


class ObservingStopper(Stopper):
    """A different stopper: watches every stream, never cancels anything."""

    def on_stream_tokens(self, request_id: str, sampler_id: str, start: int, g) -> None:
        self.counters["observed_tokens"] += len(g)
