"""Batch-boundary controllers: beta (ESPO step 5), warm-up gate (step 6), random-stop hazard.

    beta <- clip(beta + eta_beta * (stop_rate - tau), beta_min, beta_max)
    h    <- clip(h * exp(eta_h * (target - stop_rate)), h_min, h_max)

All state is plain Python numbers and round-trips through `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import math

from espo_async import constants as K

__all__ = [
    "BetaController",
    "WarmupGate",
    "HazardController",
    "hazard_for_rate",
    "DEFAULT_BETA_MIN",
    "DEFAULT_BETA_MAX",
]

DEFAULT_BETA_MIN = K.BETA_MIN  # beta's bounds (espo_async/constants.py says why these values)
DEFAULT_BETA_MAX = K.BETA_MAX


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


class BetaController:
    """beta <- clip(beta + eta * (stop_rate - tau), beta_min, beta_max). Larger beta = fewer stops."""

    def __init__(self, beta0: float = K.BETA0, eta: float = K.ETA_BETA, tau: float = K.TAU,
                 beta_min: float = DEFAULT_BETA_MIN, beta_max: float = DEFAULT_BETA_MAX) -> None:
        if not beta_min <= beta_max:
            raise ValueError("beta_min must be <= beta_max")
        self.eta = float(eta)
        self.tau = float(tau)
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.beta = min(max(float(beta0), self.beta_min), self.beta_max)

    def update(self, stop_rate: float) -> float:
        """One boundary step; a non-finite stop_rate leaves beta unchanged. Returns beta."""
        if _finite(stop_rate):
            b = self.beta + self.eta * (float(stop_rate) - self.tau)
            self.beta = min(max(b, self.beta_min), self.beta_max)
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, d: dict) -> None:
        self.beta = min(max(float(d["beta"]), self.beta_min), self.beta_max)


class WarmupGate:
    """Stopping stays off until the critic has converged; latched on afterwards.

    A learner step qualifies if loss < loss_threshold OR |loss - previous loss| < delta_threshold
    (a NaN/inf loss never qualifies and breaks the streak). The gate opens after `patience`
    consecutive qualifying steps, or is forced open once step >= ceil(force_fraction*total_steps)
    (no forcing if total_steps or force_fraction is None). patience=0 opens it at construction
    (the "no warm-up" ablation).
    """

    def __init__(self, loss_threshold: float = K.WARMUP_LOSS_THRESHOLD,
                 delta_threshold: float = K.WARMUP_DELTA_THRESHOLD, patience: int = K.WARMUP_PATIENCE,
                 force_fraction: float | None = K.WARMUP_FORCE_FRACTION, total_steps: int | None = None) -> None:
        if patience < 0:
            raise ValueError("patience must be >= 0")
        self.loss_threshold = float(loss_threshold)
        self.delta_threshold = float(delta_threshold)
        self.patience = int(patience)
        self.force_fraction = None if force_fraction is None else float(force_fraction)
        self.total_steps = None if total_steps is None else int(total_steps)
        self._enabled = self.patience == 0
        self._streak = 0
        self._prev_loss: float | None = None
        self.enabled_at_step: int | None = None

    @classmethod
    def always_on(cls) -> "WarmupGate":
        """A gate that is open from the start (no warm-up)."""
        return cls(patience=0, force_fraction=None, total_steps=None)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def force_step(self) -> int | None:
        """ceil(force_fraction * total_steps), the step at which the gate is forced open."""
        if self.total_steps is None or self.force_fraction is None:
            return None
        return math.ceil(self.force_fraction * self.total_steps)

    def observe(self, step: int, critic_loss: float | None) -> bool:
        """Record learner step `step`'s critic loss; returns whether stopping is enabled now."""
        if self._enabled:
            return True
        if _finite(critic_loss):
            loss = float(critic_loss)
            ok = loss < self.loss_threshold or (
                self._prev_loss is not None and abs(loss - self._prev_loss) < self.delta_threshold)
            self._streak = self._streak + 1 if ok else 0
            self._prev_loss = loss
        else:
            self._streak = 0
            self._prev_loss = None
        fs = self.force_step
        if self._streak >= self.patience or (fs is not None and int(step) >= fs):
            self._enabled = True
            self.enabled_at_step = int(step)
        return self._enabled

    def state_dict(self) -> dict:
        return {"enabled": self._enabled, "streak": self._streak, "prev_loss": self._prev_loss,
                "enabled_at_step": self.enabled_at_step}

    def load_state_dict(self, d: dict) -> None:
        self._enabled = bool(d["enabled"])
        self._streak = int(d["streak"])
        self._prev_loss = None if d.get("prev_loss") is None else float(d["prev_loss"])
        eas = d.get("enabled_at_step")
        self.enabled_at_step = None if eas is None else int(eas)


def hazard_for_rate(rate: float, length: float) -> float:
    """Per-token hazard h with P(stop within `length` tokens) = rate: h = 1 - (1-rate)^(1/length)."""
    if not 0.0 <= rate < 1.0 or length <= 0:
        raise ValueError("need 0 <= rate < 1 and length > 0")
    return -math.expm1(math.log1p(-rate) / length)


class HazardController:
    """Random-stop hazard following a target stop rate (the "random stop at the same rate" ablation).

    h <- clip(h * exp(eta * (target - stop_rate)), h_min, h_max); eta = 0 keeps h fixed.
    """

    def __init__(self, hazard0: float = 1e-4, eta: float = K.RANDOM_ETA, target: float = K.RANDOM_RATE,
                 h_min: float = 1e-7, h_max: float = 0.1) -> None:
        if not 0.0 <= h_min <= h_max <= 1.0:
            raise ValueError("need 0 <= h_min <= h_max <= 1")
        self.eta = float(eta)
        self.target = float(target)
        self.h_min = float(h_min)
        self.h_max = float(h_max)
        self.hazard = min(max(float(hazard0), self.h_min), self.h_max)

    def update(self, stop_rate: float) -> float:
        if _finite(stop_rate):
            h = self.hazard * math.exp(self.eta * (self.target - float(stop_rate)))
            self.hazard = min(max(h, self.h_min), self.h_max)
        return self.hazard

    def state_dict(self) -> dict:
        return {"hazard": self.hazard}

    def load_state_dict(self, d: dict) -> None:
        self.hazard = min(max(float(d["hazard"]), self.h_min), self.h_max)
