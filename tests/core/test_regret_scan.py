import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_async.core.regret import surrogate_regret, surrogate_regret_from_logits
from espo_async.core.scan import linear_scan


def test_surrogate_regret_floats():
    assert surrogate_regret(-2.5, -0.5) == pytest.approx(2.0)
    assert surrogate_regret(-0.5, -0.5) == 0.0
    # rounding that puts the sampled token above the "top-1" is clamped to 0
    assert surrogate_regret(-0.4999999, -0.5) == 0.0
    assert isinstance(surrogate_regret(-1.0, -0.1), float)
    assert math.isnan(surrogate_regret(float("nan"), -0.1))


def test_surrogate_regret_tensors():
    s = torch.tensor([-1.0, -0.2, -3.0])
    m = torch.tensor([-0.2, -0.2, -0.1])
    out = surrogate_regret(s, m)
    assert torch.allclose(out, torch.tensor([0.8, 0.0, 2.9]))
    # mixed float / tensor
    assert torch.allclose(surrogate_regret(s, -0.1), torch.tensor([0.9, 0.1, 2.9]))


def test_regret_from_logits_matches_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    actions = torch.randint(0, 11, (3, 5))
    lp = torch.log_softmax(logits, -1)
    expect = lp.max(-1).values - lp.gather(-1, actions[..., None])[..., 0]
    got = surrogate_regret_from_logits(logits, actions)
    assert torch.allclose(got, expect)
    # temperature scales logits before the softmax
    lp2 = torch.log_softmax(logits / 0.7, -1)
    expect2 = lp2.max(-1).values - lp2.gather(-1, actions[..., None])[..., 0]
    assert torch.allclose(surrogate_regret_from_logits(logits, actions, temperature=0.7), expect2)
    # the mode has regret exactly 0
    mode = logits.argmax(-1)
    assert torch.all(surrogate_regret_from_logits(logits, mode) == 0)


def _seq_scan(a, b, reverse=False):
    a = torch.broadcast_to(torch.as_tensor(a, dtype=b.dtype), b.shape)
    out = torch.zeros_like(b)
    n = b.shape[-1]
    x = torch.zeros(b.shape[:-1], dtype=b.dtype)
    rng = range(n - 1, -1, -1) if reverse else range(n)
    for t in rng:
        x = a[..., t] * x + b[..., t]
        out[..., t] = x
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), rows=st.integers(1, 3), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_scan_matches_loop(n, rows, reverse, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(rows, n, generator=g, dtype=torch.float64)
    a = torch.rand(rows, n, generator=g, dtype=torch.float64) * 1.5
    assert torch.allclose(linear_scan(a, b, reverse=reverse), _seq_scan(a, b, reverse), atol=1e-10)
    assert torch.allclose(linear_scan(0.9, b, reverse=reverse), _seq_scan(0.9, b, reverse), atol=1e-10)


def test_linear_scan_long_is_stable():
    b = torch.ones(8192, dtype=torch.float64)
    x = linear_scan(0.9, b)
    assert torch.allclose(x[-1], torch.tensor(10.0, dtype=torch.float64))
    assert torch.isfinite(x).all()
