"""ESPO stop rule (steps 2-4): streaming per trajectory and vectorised replay.

    gn_t = clip((g_t - mu) / sqrt(var + delta), -c, c)
    z_t  = a_s * z_{t-1} + (1 - a_s) * gn_t,          z_{-1} = 0  (the paper's z_0 = 0)
    stop at the first t with  z_t > beta * max(V(s_t), eps)

Everything in float64. The streaming rule and the replay compute gn_t and the threshold with
identical elementwise arithmetic; z_t differs only by float rounding of the summation order
(sequential vs log-depth scan), so the two stop indices agree unless z_t and the threshold are
within ~1e-13 of each other.

A missing value (None in streaming, NaN in replay) means "no critic estimate for this state
yet": z_t is still updated but no decision is taken at t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .normalizer import normalize_regret
from .scan import linear_scan

__all__ = ["StopStream", "replay_stop", "first_stop", "smoothed_regret", "stop_threshold"]


def stop_threshold(v, beta: float, eps: float):
    """The value gate beta * max(V, eps), the one place it is computed.

    A tensor V: elementwise, NaN kept (no value at t: NaN > x is False, so nothing fires).
    A number V: None or NaN -> None (no decision yet)."""
    if isinstance(v, torch.Tensor):
        return beta * torch.where(v > eps, v, torch.where(torch.isnan(v), v, torch.full_like(v, eps)))
    if v is None:
        return None
    v = float(v)
    if v != v:
        return None
    return beta * (v if v > eps else eps)


@dataclass
class StopStream:
    """Streaming stop rule of one trajectory under a frozen snapshot.

    Parameters (mu, var, c, delta, alpha_s, beta, eps) are frozen for the stream's life; the
    mutable state is z (smoothed normalised regret) and t (index of the next token). `push`
    fires at most once; `stop_index` is the token index at which it fired.
    """

    mu: float
    var: float
    c: float
    delta: float
    alpha_s: float
    beta: float
    eps: float
    z: float = 0.0
    t: int = 0
    stop_index: int | None = None

    @classmethod
    def from_snapshot(cls, snap) -> "StopStream":
        """Build from any object with the StopSnapshot fields (mu, var, c, delta, alpha_s, beta, eps)."""
        return cls(
            mu=float(snap.mu), var=float(snap.var), c=float(snap.c), delta=float(snap.delta),
            alpha_s=float(snap.alpha_s), beta=float(snap.beta), eps=float(snap.eps),
        )

    @property
    def stopped(self) -> bool:
        return self.stop_index is not None

    def update(self, g: float) -> float:
        """z_t = a_s z_{t-1} + (1 - a_s) gn_t; advances t. Returns z_t."""
        gn = normalize_regret(float(g), mu=self.mu, var=self.var, c=self.c, delta=self.delta)
        a = float(self.alpha_s)
        self.z = a * self.z + (1.0 - a) * gn
        self.t += 1
        return self.z

    def push(self, g: float, v: float | None) -> bool:
        """Feed token t's regret g_t and V(s_t); True iff the rule fires at this token (once)."""
        if self.stop_index is not None:
            return False
        t = self.t
        z = self.update(g)
        thr = stop_threshold(v, float(self.beta), float(self.eps))
        if thr is not None and z > thr:
            self.stop_index = t
            return True
        return False


def smoothed_regret(regret: torch.Tensor, mask: torch.Tensor | None = None, *,
                    mu: float, var: float, c: float, delta: float, alpha_s: float) -> torch.Tensor:
    """z[..., t] for all t by a log-depth scan (float64). Masked-out positions carry z unchanged."""
    gn = normalize_regret(torch.as_tensor(regret), mu=mu, var=var, c=c, delta=delta)
    a = float(alpha_s)
    b = (1.0 - a) * gn
    coef = torch.full_like(b, a)
    if mask is not None:
        m = torch.as_tensor(mask, device=b.device).bool()
        b = torch.where(m, b, torch.zeros_like(b))
        coef = torch.where(m, coef, torch.ones_like(coef))
    return linear_scan(coef, b)


def _first_true(fire: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, -1 where none (int64)."""
    if fire.shape[-1] == 0:
        return torch.full(fire.shape[:-1], -1, dtype=torch.int64, device=fire.device)
    idx = fire.to(torch.int8).argmax(dim=-1)
    return torch.where(fire.any(dim=-1), idx, torch.full_like(idx, -1))


def replay_stop(regret: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor | None = None, *,
                mu: float, var: float, c: float, delta: float, alpha_s: float, beta: float,
                eps: float) -> torch.Tensor:
    """First stop index per row of recorded trajectories ([T] -> 0-d, [B, T] -> [B]; -1 = none).

    values: V(s_t) with the shape of regret (NaN = no decision at t); None replays the
    regret-only rule z_t > beta * eps. mask: 1 = real token (padding never fires).
    """
    regret = torch.as_tensor(regret)
    z = smoothed_regret(regret, mask, mu=mu, var=var, c=c, delta=delta, alpha_s=alpha_s)
    beta = float(beta)
    eps = float(eps)
    if values is None:
        fire = z > beta * eps
    else:
        v = torch.as_tensor(values, device=z.device).to(torch.float64)
        fire = z > stop_threshold(v, beta, eps)
    if mask is not None:
        fire = fire & torch.as_tensor(mask, device=z.device).bool()
    return _first_true(fire)


def first_stop(regret, values, *, mu, var, c, delta, alpha_s, beta, eps) -> int | None:
    """First index t of a 1-D trajectory where z_t > beta * max(V(s_t), eps); None if never."""
    regret = torch.as_tensor(regret, dtype=torch.float64)
    if regret.dim() != 1:
        raise ValueError("first_stop takes one 1-D trajectory")
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.shape != regret.shape:
        raise ValueError("regret and values must have the same length")
    i = int(replay_stop(regret, values, mu=mu, var=var, c=c, delta=delta,
                        alpha_s=alpha_s, beta=beta, eps=eps))
    return None if i < 0 else i

