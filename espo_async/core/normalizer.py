"""Regret normaliser with statistics frozen inside a batch (ESPO step 2).

At training-batch boundaries only:
    mu  <- a_ema * mu  + (1 - a_ema) * mean_batch(g)
    var <- a_ema * var + (1 - a_ema) * Var_batch(g)          (population variance)
Applied to every token, with the frozen (mu, var):
    gn_t = clip((g_t - mu) / sqrt(var + delta), -c, c)

All of it in float64 (Python floats / torch.float64) so the streaming stop rule and the
vectorised replay compute bit-identical gn_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from espo_async import constants as K
from espo_async.constants import CLIP_C as DEFAULT_CLIP_C  # c (espo_async/constants.py)
from espo_async.constants import VAR_FLOOR_DELTA as DEFAULT_VAR_FLOOR_DELTA  # delta

__all__ = [
    "DEFAULT_CLIP_C",
    "DEFAULT_VAR_FLOOR_DELTA",
    "NormalizerState",
    "RegretNormalizer",
    "normalize_regret",
]


def _inv_std(var: float, delta: float) -> float:
    # One Python-float reciprocal, then elementwise multiplication: identical on every device
    # (a tensor divided by a scalar may be turned into a multiplication by the reciprocal on GPU).
    return 1.0 / math.sqrt(float(var) + float(delta))


def normalize_regret(g, *, mu: float, var: float, c: float, delta: float):
    """gn = clip((g - mu) / sqrt(var + delta), -c, c). Float -> float, tensor -> float64 tensor."""
    inv = _inv_std(var, delta)
    mu = float(mu)
    c = float(c)
    if isinstance(g, torch.Tensor):
        return torch.clamp((g.to(torch.float64) - mu) * inv, min=-c, max=c)
    x = (float(g) - mu) * inv
    if x != x:  # NaN stays NaN (as torch.clamp does)
        return x
    return min(max(x, -c), c)


@dataclass(frozen=True)
class NormalizerState:
    """Frozen normaliser statistics: mean, variance, number of boundary updates so far."""

    mu: float = 0.0
    var: float = 1.0
    count: int = 0

    def to_dict(self) -> dict:
        return {"mu": float(self.mu), "var": float(self.var), "count": int(self.count)}

    @classmethod
    def from_dict(cls, d: dict) -> "NormalizerState":
        return cls(mu=float(d["mu"]), var=float(d["var"]), count=int(d["count"]))


class RegretNormalizer:
    """EMA normaliser of the surrogate regret; state changes only in `update_at_boundary`.

    alpha_ema: EMA weight a_ema (paper: 0.99). c: clip of gn. delta: variance floor.
    mu0, var0: initial statistics. init_from_first_batch: the first boundary update sets
    mu, var to the first batch's mean and variance instead of blending with (mu0, var0).
    """

    def __init__(
        self,
        alpha_ema: float = K.ALPHA_EMA,
        c: float = DEFAULT_CLIP_C,
        delta: float = DEFAULT_VAR_FLOOR_DELTA,
        mu0: float = 0.0,
        var0: float = 1.0,
        init_from_first_batch: bool = True,
    ) -> None:
        if not 0.0 <= alpha_ema <= 1.0:
            raise ValueError("alpha_ema must be in [0, 1]")
        if c <= 0 or delta < 0 or var0 < 0:
            raise ValueError("need c > 0, delta >= 0, var0 >= 0")
        self.alpha_ema = float(alpha_ema)
        self.c = float(c)
        self.delta = float(delta)
        self.init_from_first_batch = bool(init_from_first_batch)
        self._state = NormalizerState(mu=float(mu0), var=float(var0), count=0)

    @property
    def state(self) -> NormalizerState:
        return self._state

    def normalize(self, g):
        """gn = clip((g - mu)/sqrt(var + delta), -c, c) with the frozen state. Never mutates."""
        s = self._state
        return normalize_regret(g, mu=s.mu, var=s.var, c=self.c, delta=self.delta)

    def update_at_boundary(self, batch_regrets) -> NormalizerState:
        """mu <- a mu + (1-a) mean(g);  var <- a var + (1-a) Var(g)  over the batch's tokens.

        Non-finite regrets are ignored; an empty batch leaves the state unchanged. If
        `init_from_first_batch` and no update happened yet, the batch sets (mu, var) directly.
        """
        g = torch.as_tensor(batch_regrets, dtype=torch.float64).reshape(-1)
        g = g[torch.isfinite(g)]
        if g.numel() == 0:
            return self._state
        mean = float(g.mean())
        var_b = float(((g - mean) ** 2).mean())
        s = self._state
        a = self.alpha_ema
        if self.init_from_first_batch and s.count == 0:
            mu, var = mean, var_b
        else:
            mu = a * s.mu + (1.0 - a) * mean
            var = a * s.var + (1.0 - a) * var_b
        self._state = NormalizerState(mu=mu, var=var, count=s.count + 1)
        return self._state

    def load_state(self, state: NormalizerState) -> None:
        self._state = NormalizerState(mu=float(state.mu), var=float(state.var), count=int(state.count))

    def state_dict(self) -> dict:
        return self._state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        self.load_state(NormalizerState.from_dict(d))
