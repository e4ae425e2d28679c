import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_async.core.controllers import (
    DEFAULT_BETA_MAX,
    DEFAULT_BETA_MIN,
    BetaController,
    HazardController,
    WarmupGate,
    hazard_for_rate,
)
from espo_async.core.normalizer import DEFAULT_CLIP_C


def test_beta_hand_computed():
    b = BetaController(beta0=7.0, eta=0.1, tau=0.25)
    assert b.update(0.75) == pytest.approx(7.05)
    assert b.update(0.0) == pytest.approx(7.025)
    assert b.update(0.25) == pytest.approx(7.025)
    assert b.update(float("nan")) == pytest.approx(7.025)  # ignored


def test_beta_default_bounds():
    assert DEFAULT_BETA_MIN < 7.0 < DEFAULT_BETA_MAX
    # at beta_max nothing can fire: z <= c = beta_max * eps
    assert DEFAULT_BETA_MAX * 0.2 == pytest.approx(DEFAULT_CLIP_C)
    with pytest.raises(ValueError):
        BetaController(beta_min=2.0, beta_max=1.0)


@settings(max_examples=40, deadline=None)
@given(beta0=st.floats(0, 30), rates=st.lists(st.floats(0, 1), min_size=1, max_size=30),
       eta=st.floats(0.001, 5), tau=st.floats(0, 1))
def test_beta_moves_toward_target_and_stays_in_bounds(beta0, rates, eta, tau):
    b = BetaController(beta0=beta0, eta=eta, tau=tau, beta_min=1.0, beta_max=25.0)
    for r in rates:
        before = b.beta
        after = b.update(r)
        assert 1.0 <= after <= 25.0
        # rate above target -> beta up (fewer stops), below -> down, equal -> unchanged
        if r > tau:
            assert after >= before
        elif r < tau:
            assert after <= before
        else:
            assert after == before
    d = b.state_dict()
    b2 = BetaController(eta=eta, tau=tau)
    b2.load_state_dict(d)
    assert b2.beta == b.beta


def test_beta_converges_under_a_monotone_plant():
    # stop rate as a decreasing function of beta: the controller settles near tau
    b = BetaController(beta0=7.0, eta=0.5, tau=0.25)
    for _ in range(500):
        rate = 1.0 / (1.0 + math.exp(b.beta - 4.0))
        b.update(rate)
    assert 1.0 / (1.0 + math.exp(b.beta - 4.0)) == pytest.approx(0.25, abs=0.02)


def test_gate_loss_criterion():
    g = WarmupGate(patience=3, total_steps=1000)
    assert not g.enabled
    assert g.observe(1, 0.4) is False
    assert g.observe(2, 0.3) is False
    assert g.observe(3, 0.45) is True
    assert g.enabled and g.enabled_at_step == 3


def test_gate_delta_criterion_and_streak_reset():
    g = WarmupGate(loss_threshold=0.5, delta_threshold=0.1, patience=3, total_steps=1000)
    assert not g.observe(1, 5.0)   # no previous loss: does not qualify
    assert not g.observe(2, 5.05)  # |delta| 0.05 qualifies (1)
    assert not g.observe(3, 4.0)   # breaks streak
    assert not g.observe(4, 3.95)  # (1)
    assert not g.observe(5, 3.9)   # (2)
    assert g.observe(6, 3.92)      # (3) -> on


def test_gate_mixed_criteria_and_boundaries():
    g = WarmupGate(patience=3, total_steps=1000)
    assert not g.observe(1, 2.0)     # no
    assert not g.observe(2, 0.25)    # loss < 0.5 -> streak 1
    assert not g.observe(3, 0.75)    # loss >= 0.5 and |delta| = 0.5 -> reset
    assert not g.observe(4, 0.8125)  # |delta| = 0.0625 < 0.1 -> 1
    assert not g.observe(5, 0.25)    # loss -> 2
    assert not g.observe(6, 0.5)     # 0.5 is not < 0.5, |delta| = 0.25 -> reset
    assert not g.observe(7, 0.5625)  # |delta| = 0.0625 -> 1
    assert not g.observe(8, 0.4375)  # loss -> 2
    assert g.observe(9, 0.5)         # |delta| = 0.0625 -> 3 -> on


def test_gate_nan_never_qualifies():
    g = WarmupGate(patience=2, total_steps=1000)
    assert not g.observe(1, 0.1)
    assert not g.observe(2, float("nan"))  # breaks the streak
    assert not g.observe(3, 0.1)
    assert not g.observe(4, None)
    assert not g.observe(5, float("inf"))
    assert not g.observe(6, 0.1)
    assert g.observe(7, 0.1)


def test_gate_forced_and_latched():
    g = WarmupGate(patience=3, force_fraction=0.1, total_steps=95)  # ceil(9.5) = 10
    assert g.force_step == 10
    for step in range(1, 10):
        assert not g.observe(step, 100.0 * step)  # never converging
    assert g.observe(10, 1000.0)
    # latched: anything afterwards keeps it on
    assert g.observe(11, float("nan")) and g.observe(12, 1e9) and g.enabled
    assert g.enabled_at_step == 10


def test_gate_no_forcing_without_total_steps():
    g = WarmupGate(patience=3, total_steps=None)
    for step in range(1, 100):
        assert not g.observe(step, 10.0 * step)


def test_gate_no_warmup_ablation_and_state_roundtrip():
    assert WarmupGate(patience=0).enabled
    assert WarmupGate.always_on().enabled
    g = WarmupGate(patience=3, total_steps=100)
    g.observe(1, 0.1)
    g.observe(2, 0.2)
    d = g.state_dict()
    assert set(d) == {"enabled", "streak", "prev_loss", "enabled_at_step"}
    h = WarmupGate(patience=3, total_steps=100)
    h.load_state_dict(d)
    assert h.observe(3, 0.3) and g.observe(3, 0.3)


def test_hazard_controller():
    h = HazardController(hazard0=1e-3, eta=2.0, target=0.25, h_min=1e-6, h_max=0.5)
    assert h.update(0.75) == pytest.approx(1e-3 * math.exp(-1.0))
    assert h.update(0.25) == pytest.approx(1e-3 * math.exp(-1.0))
    for _ in range(100):
        h.update(0.0)
    assert h.hazard == 0.5
    fixed = HazardController(hazard0=3e-3, eta=0.0)
    assert fixed.update(1.0) == 3e-3
    h2 = HazardController()
    h2.load_state_dict(h.state_dict())
    assert h2.hazard == min(0.5, h2.h_max)


def test_hazard_for_rate():
    h = hazard_for_rate(0.25, 100)
    assert 1 - (1 - h) ** 100 == pytest.approx(0.25)
    assert hazard_for_rate(0.0, 10) == 0.0
