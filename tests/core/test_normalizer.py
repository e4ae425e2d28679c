import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_async.core.normalizer import (
    DEFAULT_CLIP_C,
    NormalizerState,
    RegretNormalizer,
    normalize_regret,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def test_defaults_respect_paper_constraint():
    # z_t <= c must be able to exceed the initial threshold beta0 * eps = 7 * 0.2
    assert DEFAULT_CLIP_C > 7.0 * 0.2
    n = RegretNormalizer()
    assert n.alpha_ema == 0.99 and n.state == NormalizerState(0.0, 1.0, 0)


def test_normalize_hand_computed():
    n = RegretNormalizer(c=2.0, delta=0.0, mu0=1.0, var0=4.0, init_from_first_batch=False)
    assert n.normalize(3.0) == pytest.approx(1.0)  # (3-1)/2
    assert n.normalize(9.0) == 2.0  # clipped at c
    assert n.normalize(-9.0) == -2.0
    out = n.normalize(torch.tensor([1.0, 2.0, 100.0]))
    assert out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64))
    # delta is a variance floor inside the square root
    assert normalize_regret(1.0, mu=0.0, var=0.0, c=1e9, delta=0.25) == pytest.approx(2.0)


def test_update_hand_computed():
    n = RegretNormalizer(alpha_ema=0.9, mu0=0.0, var0=1.0, init_from_first_batch=False)
    s = n.update_at_boundary(torch.tensor([1.0, 3.0]))  # mean 2, population var 1
    assert s.mu == pytest.approx(0.1 * 2.0)
    assert s.var == pytest.approx(0.9 * 1.0 + 0.1 * 1.0)
    assert s.count == 1
    s = n.update_at_boundary([0.0, 0.0, 0.0])
    assert s.mu == pytest.approx(0.9 * 0.2)
    assert s.var == pytest.approx(0.9 * 1.0)
    assert s.count == 2


def test_first_batch_initialises():
    n = RegretNormalizer(alpha_ema=0.99)
    s = n.update_at_boundary(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert s.mu == pytest.approx(3.0) and s.var == pytest.approx(3.5)
    s2 = n.update_at_boundary(torch.tensor([3.0]))  # then EMA
    assert s2.mu == pytest.approx(3.0) and s2.var == pytest.approx(0.99 * 3.5)


def test_empty_and_nonfinite_batches():
    n = RegretNormalizer()
    before = n.state
    assert n.update_at_boundary(torch.tensor([])) == before
    assert n.update_at_boundary([float("nan"), float("inf")]) == before
    s = n.update_at_boundary([float("inf"), 2.0, 4.0])  # non-finite entries ignored
    assert s.mu == pytest.approx(3.0) and s.var == pytest.approx(1.0)


def test_load_state_and_dict_roundtrip():
    n = RegretNormalizer()
    n.update_at_boundary(torch.tensor([0.5, 1.5, 0.0]))
    d = n.state_dict()
    assert all(isinstance(v, (int, float)) for v in d.values())
    m = RegretNormalizer()
    m.load_state_dict(d)
    assert m.state == n.state
    m2 = RegretNormalizer()
    m2.load_state(n.state)
    assert m2.normalize(0.7) == n.normalize(0.7)


@settings(max_examples=30, deadline=None)
@given(
    batches=st.lists(st.lists(finite, min_size=0, max_size=20), min_size=1, max_size=4),
    probes=st.lists(st.lists(finite, min_size=1, max_size=10), min_size=1, max_size=5),
)
def test_normalize_never_changes_state(batches, probes):
    n = RegretNormalizer()
    for batch in batches:
        before = n.state
        for p in probes:
            n.normalize(torch.tensor(p, dtype=torch.float64))
            for x in p:
                n.normalize(x)
            assert n.state == before  # frozen between boundaries
        n.update_at_boundary(torch.tensor(batch, dtype=torch.float64))
        if batch:
            assert n.state.count == before.count + 1
        else:
            assert n.state == before


@settings(max_examples=30, deadline=None)
@given(g=st.lists(finite, min_size=1, max_size=30), mu=finite, var=st.floats(0, 100), c=st.floats(0.1, 10))
def test_float_and_tensor_paths_identical(g, mu, var, c):
    t = normalize_regret(torch.tensor(g, dtype=torch.float64), mu=mu, var=var, c=c, delta=1e-4)
    f = [normalize_regret(x, mu=mu, var=var, c=c, delta=1e-4) for x in g]
    assert t.tolist() == f  # bit-identical
    assert all(-c <= x <= c for x in f)
    assert all(math.isfinite(x) for x in f)
