"""Stop policies behind one interface (ESPO and the paper's ablations) and the learner's controller.

Policies (each also has a vectorised `replay` that agrees with its streaming `push`):
    espo        fire iff z_t > beta * max(V(s_t), eps)
    none        never
    random      fire iff u(seed, key, t) < h           (per-token hazard, reproducible per key)
    regret_only fire iff z_t > beta * eps               (value gate removed)
    value_only  fire iff beta * max(V(s_t), eps) < value_ref   (regret replaced by a constant)
If the snapshot is not `enabled` (warm-up gate closed) nothing ever stops.

`StopController` is owned by the learner: at every batch boundary it updates the normaliser,
beta (or the random hazard) and the warm-up gate from the batch just trained on and returns the
frozen `StopSnapshot` for the NEXT batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Hashable, Protocol, Sequence, runtime_checkable

import torch

from espo_async import constants as K
from espo_async.constants import STOP_KINDS

from .controllers import BetaController, HazardController, WarmupGate
from .normalizer import DEFAULT_CLIP_C, DEFAULT_VAR_FLOOR_DELTA, RegretNormalizer
from .stop_rule import StopStream, _first_true, replay_stop, stop_threshold

__all__ = [
    "STOP_KINDS",
    "DEFAULT_VALUE_REF",
    "StopSnapshot",
    "StopPolicy",
    "EspoStop",
    "NoStop",
    "RandomStop",
    "RegretOnlyStop",
    "ValueOnlyStop",
    "make_stop_policy",
    "StopController",
    "stream_uniform",
    "key_to_u32",
]

DEFAULT_VALUE_REF = K.VALUE_REF  # the value-only ablation's stand-in for z_t (espo_async/constants.py)


@dataclass(frozen=True)
class StopSnapshot:
    """Everything a stopper needs for one batch; plain scalars only (sent as msgpack)."""

    kind: str = "espo"
    enabled: bool = False
    mu: float = 0.0
    var: float = 1.0
    c: float = DEFAULT_CLIP_C
    delta: float = DEFAULT_VAR_FLOOR_DELTA
    alpha_s: float = K.ALPHA_S
    beta: float = K.BETA0
    eps: float = K.EPS
    hazard: float = 1e-4
    value_ref: float = DEFAULT_VALUE_REF
    seed: int = 0
    step: int = 0  # learner step that produced it (it applies to the batch after that step)

    def __post_init__(self) -> None:
        if self.kind not in STOP_KINDS:
            raise ValueError(f"unknown stop policy kind {self.kind!r}; expected one of {STOP_KINDS}")

    def to_dict(self) -> dict:
        return {f.name: _PLAIN[f.name](getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "StopSnapshot":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown StopSnapshot fields: {sorted(unknown)}")
        return cls(**{k: _PLAIN[k](v) for k, v in d.items()})


_PLAIN = {
    "kind": str, "enabled": bool, "mu": float, "var": float, "c": float, "delta": float,
    "alpha_s": float, "beta": float, "eps": float, "hazard": float, "value_ref": float,
    "seed": int, "step": int,
}


# ---------------------------------------------------------------------------------------------
# Counter-based uniforms for the random stop: u = U(seed, key, t), identical in Python and torch.
# 32-bit integer hash (lowbias32) with multiplications split so int64 tensors never overflow.
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for 0 <= x, c < 2^32 (Python int or int64 tensor, no overflow)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c & 0xFFFF) << 16)) & _M32


def _hash32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def key_to_u32(key: Hashable) -> int:
    """Stable 32-bit id of a stream key (int or str; FNV-1a for strings, never Python's hash())."""
    if isinstance(key, bool) or not isinstance(key, (int, str, bytes)):
        key = str(key)
    if isinstance(key, int):
        k = key & 0xFFFFFFFFFFFFFFFF
        return _hash32((k ^ (k >> 32)) & _M32)
    data = key.encode("utf-8") if isinstance(key, str) else key
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & _M32
    return h


def _stream_base(seed: int, key: Hashable) -> int:
    return _hash32((_hash32(int(seed) & _M32) ^ key_to_u32(key)) & _M32)


def _uniform_from(base, t):
    h1 = _hash32(base ^ _hash32(t & _M32))
    h2 = _hash32(h1 ^ 0x9E3779B9)
    n = (h1 >> 8) * (1 << 24) + (h2 >> 8)  # 48 bits, exact in float64
    if isinstance(n, torch.Tensor):
        n = n.to(torch.float64)
    return n / float(1 << 48)


def stream_uniform(seed: int, key: Hashable, t):
    """u(seed, key, t) in [0, 1) with 48 random bits; t an int or an int64 tensor of indices."""
    base = _stream_base(seed, key)
    if isinstance(t, torch.Tensor):
        return _uniform_from(torch.as_tensor(base, dtype=torch.int64), t.to(torch.int64))
    return _uniform_from(base, int(t))


# ---------------------------------------------------------------------------------------------
@runtime_checkable
class StopPolicy(Protocol):
    """One stopper for one batch. Streams fire at most once; `replay` gives the same indices."""

    snapshot: StopSnapshot

    def new_stream(self, key: Hashable) -> Any: ...

    def push(self, stream: Any, g: float, v: float | None) -> bool: ...

    def replay(self, regret: torch.Tensor, values: torch.Tensor | None,
               mask: torch.Tensor | None = None, keys: Sequence[Hashable] | None = None) -> torch.Tensor: ...


@dataclass
class _Stream:
    """Minimal per-trajectory state of the non-ESPO policies."""

    key: Hashable = None
    t: int = 0
    z: float = 0.0
    stop_index: int | None = None
    base: int = 0  # random policy: hashed (seed, key)

    @property
    def stopped(self) -> bool:
        return self.stop_index is not None


def _rows(regret: torch.Tensor) -> tuple[torch.Tensor, bool]:
    regret = torch.as_tensor(regret)
    return (regret.unsqueeze(0), True) if regret.dim() == 1 else (regret, False)


class _Base:
    def __init__(self, snapshot: StopSnapshot) -> None:
        self.snapshot = snapshot

    def new_stream(self, key: Hashable = None):
        return _Stream(key=key)

    def _fire(self, stream, t: int) -> bool:
        stream.stop_index = t
        return True


class NoStop(_Base):
    """Never stops (plain PPO, or any policy while the warm-up gate is closed)."""

    def push(self, stream, g, v) -> bool:
        stream.t += 1
        return False

    def replay(self, regret, values, mask=None, keys=None) -> torch.Tensor:
        r, squeeze = _rows(regret)
        out = torch.full(r.shape[:-1], -1, dtype=torch.int64, device=r.device)
        return out[0] if squeeze else out


class EspoStop(_Base):
    """fire iff z_t > beta * max(V(s_t), eps)."""

    def new_stream(self, key: Hashable = None) -> StopStream:
        return StopStream.from_snapshot(self.snapshot)

    def push(self, stream: StopStream, g, v) -> bool:
        return stream.push(g, v)

    def replay(self, regret, values, mask=None, keys=None) -> torch.Tensor:
        s = self.snapshot
        if values is None:
            raise ValueError("the espo policy needs values")
        return replay_stop(regret, values, mask, mu=s.mu, var=s.var, c=s.c, delta=s.delta,
                           alpha_s=s.alpha_s, beta=s.beta, eps=s.eps)


class RegretOnlyStop(_Base):
    """fire iff z_t > beta * eps (the value gate removed; V is ignored)."""

    def new_stream(self, key: Hashable = None) -> StopStream:
        return StopStream.from_snapshot(self.snapshot)

    def push(self, stream: StopStream, g, v=None) -> bool:
        # max(V, eps) with V := -inf, i.e. the constant threshold beta * eps
        return stream.push(g, -math.inf)

    def replay(self, regret, values=None, mask=None, keys=None) -> torch.Tensor:
        s = self.snapshot
        return replay_stop(regret, None, mask, mu=s.mu, var=s.var, c=s.c, delta=s.delta,
                           alpha_s=s.alpha_s, beta=s.beta, eps=s.eps)


class ValueOnlyStop(_Base):
    """fire iff beta * max(V(s_t), eps) < value_ref (z_t replaced by the constant value_ref)."""

    def push(self, stream: _Stream, g, v) -> bool:
        if stream.stop_index is not None:
            return False
        t = stream.t
        stream.t += 1
        s = self.snapshot
        thr = stop_threshold(v, float(s.beta), float(s.eps))
        if thr is not None and float(s.value_ref) > thr:
            return self._fire(stream, t)
        return False

    def replay(self, regret, values, mask=None, keys=None) -> torch.Tensor:
        if values is None:
            raise ValueError("the value_only policy needs values")
        s = self.snapshot
        v, squeeze = _rows(torch.as_tensor(values).to(torch.float64))
        fire = float(s.value_ref) > stop_threshold(v, float(s.beta), float(s.eps))
        if mask is not None:
            m, _ = _rows(torch.as_tensor(mask, device=v.device).bool())
            fire = fire & m
        out = _first_true(fire)
        return out[0] if squeeze else out


class RandomStop(_Base):
    """fire iff u(seed, key, t) < hazard: per-token hazard, the same draws in stream and replay."""

    def new_stream(self, key: Hashable = None) -> _Stream:
        return _Stream(key=key, base=_stream_base(self.snapshot.seed, key))

    def push(self, stream: _Stream, g=None, v=None) -> bool:
        if stream.stop_index is not None:
            return False
        t = stream.t
        stream.t += 1
        if _uniform_from(stream.base, t) < float(self.snapshot.hazard):
            return self._fire(stream, t)
        return False

    def replay(self, regret, values=None, mask=None, keys=None) -> torch.Tensor:
        r, squeeze = _rows(regret)
        n_rows, n_tok = r.shape[0], r.shape[-1]
        if keys is None:
            keys = list(range(n_rows))
        if len(keys) != n_rows:
            raise ValueError("need one key per row")
        base = torch.tensor([_stream_base(self.snapshot.seed, k) for k in keys], dtype=torch.int64)
        t = torch.arange(n_tok, dtype=torch.int64)
        u = _uniform_from(base[:, None], t[None, :]).to(r.device)
        fire = u < float(self.snapshot.hazard)
        if mask is not None:
            m, _ = _rows(torch.as_tensor(mask, device=r.device).bool())
            fire = fire & m
        out = _first_true(fire)
        return out[0] if squeeze else out


_POLICIES = {"espo": EspoStop, "none": NoStop, "random": RandomStop,
             "regret_only": RegretOnlyStop, "value_only": ValueOnlyStop}


def make_stop_policy(snapshot: StopSnapshot) -> StopPolicy:
    """The policy for `snapshot.kind`, or NoStop while the warm-up gate is closed."""
    if not snapshot.enabled:
        return NoStop(snapshot)
    return _POLICIES[snapshot.kind](snapshot)


# ---------------------------------------------------------------------------------------------
class StopController:
    """Learner-owned stop state: normaliser + beta controller + warm-up gate (+ random hazard).

    `on_batch_boundary` consumes the batch just trained on and returns the snapshot for the NEXT
    batch. beta (or the hazard, for kind="random") is only adapted from batches that were
    collected with stopping enabled: while the gate is closed the stop rate is trivially 0 and
    integrating it would wind beta down before stopping ever starts.
    """

    def __init__(self, kind: str = "espo", *, normalizer: RegretNormalizer | None = None,
                 beta: BetaController | None = None, gate: WarmupGate | None = None,
                 hazard: HazardController | None = None, alpha_s: float = K.ALPHA_S, eps: float = K.EPS,
                 value_ref: float = DEFAULT_VALUE_REF, seed: int = 0) -> None:
        if kind not in STOP_KINDS:
            raise ValueError(f"unknown stop policy kind {kind!r}")
        self.kind = kind
        self.normalizer = normalizer if normalizer is not None else RegretNormalizer()
        self.beta = beta if beta is not None else BetaController()
        self.gate = gate if gate is not None else WarmupGate()
        self.hazard = hazard if hazard is not None else HazardController(target=self.beta.tau)
        self.alpha_s = float(alpha_s)
        self.eps = float(eps)
        self.value_ref = float(value_ref)
        self.seed = int(seed)
        self._snapshot = self._build(step=0)

    def _build(self, step: int) -> StopSnapshot:
        st = self.normalizer.state
        return StopSnapshot(
            kind=self.kind, enabled=self.gate.enabled, mu=st.mu, var=st.var, c=self.normalizer.c,
            delta=self.normalizer.delta, alpha_s=self.alpha_s, beta=self.beta.beta, eps=self.eps,
            hazard=self.hazard.hazard, value_ref=self.value_ref, seed=self.seed, step=int(step))

    def snapshot(self) -> StopSnapshot:
        """The snapshot currently in force (for the batch being collected)."""
        return self._snapshot

    def on_batch_boundary(self, step: int, batch_regrets, stop_rate: float | None,
                          critic_loss: float | None) -> StopSnapshot:
        """Update from the batch just trained on; return the snapshot for the next batch."""
        was_enabled = self._snapshot.enabled
        self.normalizer.update_at_boundary(batch_regrets if batch_regrets is not None else [])
        if was_enabled and stop_rate is not None:
            if self.kind in K.BETA_STOP_KINDS:
                self.beta.update(stop_rate)
            elif self.kind in K.HAZARD_STOP_KINDS:
                self.hazard.update(stop_rate)
        self.gate.observe(step, critic_loss)
        self._snapshot = self._build(step)
        return self._snapshot

    def state_dict(self) -> dict:
        return {"kind": self.kind, "normalizer": self.normalizer.state_dict(),
                "beta": self.beta.state_dict(), "gate": self.gate.state_dict(),
                "hazard": self.hazard.state_dict(), "snapshot": self._snapshot.to_dict()}

    def load_state_dict(self, d: dict) -> None:
        if d.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint is for stop policy {d['kind']!r}, not {self.kind!r}")
        self.normalizer.load_state_dict(d["normalizer"])
        self.beta.load_state_dict(d["beta"])
        self.gate.load_state_dict(d["gate"])
        self.hazard.load_state_dict(d["hazard"])
        self._snapshot = StopSnapshot.from_dict(d["snapshot"])
