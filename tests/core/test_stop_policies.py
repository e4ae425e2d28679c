import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_async.core.controllers import BetaController, HazardController, WarmupGate
from espo_async.core.normalizer import RegretNormalizer
from espo_async.core.stop_policies import (
    STOP_KINDS,
    EspoStop,
    NoStop,
    RandomStop,
    RegretOnlyStop,
    StopController,
    StopPolicy,
    StopSnapshot,
    ValueOnlyStop,
    _hash32,
    _mul32,
    key_to_u32,
    make_stop_policy,
    stream_uniform,
)
from espo_async.core.stop_rule import first_stop


def stream_indices(policy, regret, values, keys):
    out = []
    for b in range(regret.shape[0]):
        s = policy.new_stream(keys[b])
        idx = -1
        for t in range(regret.shape[1]):
            v = float(values[b, t])
            if policy.push(s, float(regret[b, t]), None if math.isnan(v) else v):
                assert idx == -1
                idx = t
        out.append(idx)
    return out


def test_snapshot_roundtrip_plain_types():
    s = StopSnapshot(kind="random", enabled=True, mu=0.1, var=2.0, beta=6.5, hazard=1e-3, seed=7, step=12)
    d = s.to_dict()
    assert all(type(v) in (int, float, str, bool) for v in d.values())
    assert StopSnapshot.from_dict(d) == s
    with pytest.raises(ValueError):
        StopSnapshot.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        StopSnapshot(kind="sometimes")
    # missing keys take defaults (older senders)
    assert StopSnapshot.from_dict({"kind": "none"}).kind == "none"


def test_make_stop_policy_kinds_and_disabled():
    expect = {"espo": EspoStop, "none": NoStop, "random": RandomStop,
              "regret_only": RegretOnlyStop, "value_only": ValueOnlyStop}
    for kind in STOP_KINDS:
        p = make_stop_policy(StopSnapshot(kind=kind, enabled=True))
        assert type(p) is expect[kind]
        assert isinstance(p, StopPolicy)
        q = make_stop_policy(StopSnapshot(kind=kind, enabled=False))
        assert type(q) is NoStop


def test_disabled_never_stops():
    g = torch.full((3, 50), 100.0, dtype=torch.float64)
    v = torch.zeros(3, 50, dtype=torch.float64)
    for kind in STOP_KINDS:
        snap = StopSnapshot(kind=kind, enabled=False, hazard=0.5, beta=0.1)
        p = make_stop_policy(snap)
        assert stream_indices(p, g, v, [0, 1, 2]) == [-1, -1, -1]
        assert p.replay(g, v, keys=[0, 1, 2]).tolist() == [-1, -1, -1]


def test_value_only_and_regret_only_hand_computed():
    snap = StopSnapshot(kind="value_only", enabled=True, beta=4.0, eps=0.2, value_ref=2.0)
    p = make_stop_policy(snap)
    s = p.new_stream("a")
    # fire iff 4 * max(V, 0.2) < 2  <=> V < 0.5; regret is ignored
    assert not p.push(s, 100.0, 0.9)
    assert not p.push(s, 100.0, 0.5)
    assert not p.push(s, 0.0, None)
    assert p.push(s, 0.0, 0.49) and s.stop_index == 3
    snap = StopSnapshot(kind="regret_only", enabled=True, mu=0.0, var=1.0, delta=0.0, c=5.0,
                        alpha_s=0.0, beta=4.0, eps=0.2)
    p = make_stop_policy(snap)
    s = p.new_stream("b")
    # fire iff z > 0.8 regardless of V
    assert not p.push(s, 0.8, 0.0)
    assert p.push(s, 0.81, 100.0)


def test_espo_policy_matches_first_stop():
    snap = StopSnapshot(kind="espo", enabled=True, mu=0.2, var=0.3, beta=3.0)
    p = make_stop_policy(snap)
    gen = torch.Generator().manual_seed(5)
    g = torch.rand(4, 200, generator=gen, dtype=torch.float64) * 3
    v = torch.rand(4, 200, generator=gen, dtype=torch.float64) * 0.7
    rep = p.replay(g, v).tolist()
    assert rep == stream_indices(p, g, v, ["a", "b", "c", "d"])
    for b in range(4):
        fs = first_stop(g[b], v[b], mu=0.2, var=0.3, c=snap.c, delta=snap.delta,
                        alpha_s=snap.alpha_s, beta=3.0, eps=snap.eps)
        assert (fs if fs is not None else -1) == rep[b]


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(STOP_KINDS), seed=st.integers(0, 2**40), n=st.integers(0, 80),
       rows=st.integers(1, 4), beta=st.floats(0.5, 10), hazard=st.floats(0, 0.2),
       data_seed=st.integers(0, 2**31))
def test_every_policy_streaming_equals_replay(kind, seed, n, rows, beta, hazard, data_seed):
    snap = StopSnapshot(kind=kind, enabled=True, mu=0.5, var=1.0, beta=beta, hazard=hazard,
                        seed=seed, value_ref=2.0)
    p = make_stop_policy(snap)
    gen = torch.Generator().manual_seed(data_seed)
    g = torch.rand(rows, n, generator=gen, dtype=torch.float64) * 6
    v = torch.rand(rows, n, generator=gen, dtype=torch.float64)
    v[torch.rand(rows, n, generator=gen) < 0.1] = float("nan")
    keys = [f"req-{data_seed}-{i}" for i in range(rows)]
    assert p.replay(g, v, keys=keys).tolist() == stream_indices(p, g, v, keys)


def test_hash_python_and_torch_agree():
    xs = [0, 1, 2, 0xFFFF, 0x10000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    t = torch.tensor(xs, dtype=torch.int64)
    assert _hash32(t).tolist() == [_hash32(x) for x in xs]
    assert _mul32(t, 0x846CA68B).tolist() == [(x * 0x846CA68B) & 0xFFFFFFFF for x in xs]
    assert key_to_u32("abc") == key_to_u32("abc") != key_to_u32("abd")
    assert 0 <= key_to_u32(-5) < 2**32 and 0 <= key_to_u32(2**70) < 2**32
    u = stream_uniform(3, "k", torch.arange(1000))
    assert u.dtype == torch.float64
    assert u.tolist() == [stream_uniform(3, "k", i) for i in range(1000)]
    assert 0.45 < float(u.mean()) < 0.55


def test_random_stop_rate_and_reproducibility():
    h, n_tok, rows = 0.01, 60, 4000
    snap = StopSnapshot(kind="random", enabled=True, hazard=h, seed=11)
    p = make_stop_policy(snap)
    g = torch.zeros(rows, n_tok, dtype=torch.float64)
    keys = [f"req{i}" for i in range(rows)]
    idx = p.replay(g, None, keys=keys)
    rate = float((idx >= 0).double().mean())
    predicted = 1 - (1 - h) ** n_tok  # 0.4528
    sd = math.sqrt(predicted * (1 - predicted) / rows)
    assert abs(rate - predicted) < 4 * sd
    # per-position hazard: P(stop at t | not before) ~= h
    counts = torch.bincount(idx[idx >= 0], minlength=n_tok).double()
    at_risk = rows - torch.cat([torch.zeros(1), counts.cumsum(0)[:-1]])
    assert abs(float(counts.sum() / at_risk.sum()) - h) < 0.1 * h
    # reproducible per (seed, key), independent of batch composition and order
    again = p.replay(g.flip(0), None, keys=keys[::-1])
    assert again.flip(0).tolist() == idx.tolist()
    other_seed = make_stop_policy(StopSnapshot(kind="random", enabled=True, hazard=h, seed=12))
    assert other_seed.replay(g, None, keys=keys).tolist() != idx.tolist()
    # streaming reproduces the replay
    assert stream_indices(p, g[:50], torch.zeros(50, n_tok), keys[:50]) == idx[:50].tolist()


def make_controller(kind="espo", **kw):
    return StopController(
        kind,
        normalizer=RegretNormalizer(),
        beta=BetaController(beta0=7.0, eta=0.1, tau=0.25),
        gate=WarmupGate(patience=3, total_steps=100),
        hazard=HazardController(hazard0=1e-3, eta=2.0, target=0.25),
        **kw,
    )


def test_controller_causality_and_gate():
    c = make_controller()
    s0 = c.snapshot()
    assert not s0.enabled and s0.beta == 7.0 and s0.mu == 0.0 and s0.var == 1.0
    batch = torch.tensor([0.0, 0.0, 1.0, 3.0])
    s1 = c.on_batch_boundary(1, batch, stop_rate=0.0, critic_loss=0.1)
    # normaliser statistics of batch 1 are in the snapshot for batch 2, never in batch 1's
    assert s0.mu == 0.0 and s1.mu == pytest.approx(1.0) and s1.step == 1
    assert s1.beta == 7.0  # gate was closed for batch 1: beta not adapted
    assert c.snapshot() is s1
    c.on_batch_boundary(2, batch, 0.0, 0.1)
    s3 = c.on_batch_boundary(3, batch, 0.0, 0.1)
    assert s3.enabled
    s4 = c.on_batch_boundary(4, batch, stop_rate=0.75, critic_loss=0.1)
    assert s4.beta == pytest.approx(7.05)  # batch 4 was collected with stopping on


def test_controller_random_adapts_hazard_only():
    c = make_controller("random")
    c.gate = WarmupGate.always_on()
    c._snapshot = c._build(0)
    s = c.on_batch_boundary(1, torch.tensor([1.0]), stop_rate=0.75, critic_loss=None)
    assert s.hazard == pytest.approx(1e-3 * math.exp(-1.0))
    assert s.beta == 7.0 and s.kind == "random"


def test_controller_state_roundtrip():
    c = make_controller(seed=3)
    for step in range(1, 8):
        c.on_batch_boundary(step, torch.rand(50, dtype=torch.float64), 0.4, 0.2)
    d = c.state_dict()
    c2 = make_controller(seed=3)
    c2.load_state_dict(d)
    assert c2.snapshot() == c.snapshot()
    assert c2.state_dict() == d
    nxt = torch.tensor([0.3, 0.9])
    assert c.on_batch_boundary(8, nxt, 0.1, 0.2) == c2.on_batch_boundary(8, nxt, 0.1, 0.2)
    with pytest.raises(ValueError):
        make_controller("random").load_state_dict(d)


def test_controller_closed_loop_hits_target_rate():
    """ESPO stopper + controller on synthetic rollouts: the realised stop rate approaches tau."""
    gen = torch.Generator().manual_seed(0)
    c = StopController("espo", gate=WarmupGate.always_on(),
                       beta=BetaController(beta0=7.0, eta=2.0, tau=0.25))
    rates = []
    for step in range(1, 41):
        snap = c.snapshot()
        g = torch.distributions.Exponential(torch.tensor(1.0)).sample((256, 200)) * (
            torch.rand(256, 200, generator=gen) < 0.3)
        g = g.double()
        v = torch.rand(256, 1, generator=gen, dtype=torch.float64).expand(256, 200)
        idx = make_stop_policy(snap).replay(g, v)
        rate = float((idx >= 0).double().mean())
        rates.append(rate)
        c.on_batch_boundary(step, g.reshape(-1), rate, 0.1)
    assert abs(sum(rates[-10:]) / 10 - 0.25) < 0.08
