"""Alternative actor classes, swapped in by config in the system tests."""

from __future__ import annotations

import protocols as P
from actors.stopper import Stopper


class ObservingStopper(Stopper):
    """A different stopper: watches every stream, never cancels anything."""

    def on_tokens(self, msg: P.TokenChunk) -> None:
        self.counters["observed_tokens"] += len(msg.token_ids)
