"""A fake value model: values from a closed-form function of the position, for fast tests.

Options (``actors.critic.options``): ``value`` (V at t = 0, default 0.1), ``decay`` (V(s_t) =
value * decay**t, default 1.0), ``delay_s`` (simulated compute time per call, default 0).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.critics.base import Critic, ValueRequest


class FakeValueOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: float = 0.1
    decay: float = Field(1.0, gt=0)
    delay_s: float = Field(0.0, ge=0)


class FakeValueModel:
    def __init__(self, options: FakeValueOptions):
        self.opts = options
        self.version = 0

    def values(self, batch: list[ValueRequest]) -> list[np.ndarray]:
        if self.opts.delay_s:
            time.sleep(self.opts.delay_s)  # simulated model time (runs in the critic's worker thread)
        out = []
        for req in batch:
            n = len(req.new_token_ids) + (1 if req.prompt_token_ids is not None else 0)
            t = np.arange(req.first_position, req.first_position + n, dtype=np.float64)
            out.append((self.opts.value * self.opts.decay**t).astype(np.float32))
        return out

    def end(self, request_id: str) -> None:
        return None

    def load_weights(self, path: Path, version: int) -> None:
        self.version = version


class FakeCritic(Critic):
    OPTIONS = FakeValueOptions

    def make_value_model(self) -> FakeValueModel:
        return FakeValueModel(FakeValueOptions(**self.options))
