"""The vocabularies the config, the core and the protocols share (stop kinds, endings, stop-snapshot
fields) and the paper constants: declared once in espo_async/constants.py; every other declaration
must agree with it."""

from __future__ import annotations

import dataclasses
import typing

import msgspec

import protocols as P
from espo_async import constants as K
from espo_async.config import AlgoConfig, Config, StopConfig, WarmupConfig
from espo_async.core import (
    BetaController,
    Ending,
    HazardController,
    STOP_KINDS,
    RegretNormalizer,
    StopController,
    StopSnapshot,
    WarmupGate,
)
from protocols import messages as M


def _declarations() -> dict[str, dict[str, tuple]]:
    """Every declaration of each shared vocabulary, by vocabulary and place."""
    from espo_async.core import stop_policies

    def literal(tp) -> tuple:
        return tuple(a for a in typing.get_args(tp) if a is not type(None))

    def hint(cls, field: str) -> tuple:
        args = typing.get_args(typing.get_type_hints(cls)[field])
        return tuple(x for a in args for x in (typing.get_args(a) or (a,)) if x is not type(None))

    return {
        "stop kinds": {
            "espo_async/constants.py STOP_KINDS": K.STOP_KINDS,
            "espo_async/config.py StopConfig.policy": literal(StopConfig.model_fields["policy"].annotation),
            "espo_async/core STOP_KINDS": STOP_KINDS,
            "espo_async/core stop policy classes": tuple(stop_policies._POLICIES),
            "protocols StopKind": literal(M.StopKind),
            "protocols StopParams.kind": literal(typing.get_type_hints(M.StopParams)["kind"]),
        },
        "trajectory endings": {
            "espo_async/constants.py ENDINGS": K.ENDINGS,
            "espo_async/core Ending": tuple(e.value for e in Ending),
            "protocols Ending": literal(M.Ending),
            "protocols Trajectory.ending": hint(M.Trajectory, "ending"),
            "protocols StreamEnd.ending": hint(M.StreamEnd, "ending"),
            "protocols WorkDone.ending": hint(M.WorkDone, "ending"),
        },
        "stop-snapshot fields": {
            "espo_async/core StopSnapshot": tuple(f.name for f in dataclasses.fields(StopSnapshot)),
            "espo_async/core StopSnapshot.to_dict": tuple(StopSnapshot().to_dict()),
            "espo_async/core StopSnapshot.from_dict": tuple(stop_policies._PLAIN),
            "protocols StopParams": M.StopParams.__struct_fields__,
        },
    }


def test_every_declaration_of_a_shared_vocabulary_holds_the_same_values():
    """The stop kinds, the trajectory endings and the stop-snapshot fields are declared in the
    config, the core and the protocols: a value one place gains and another lacks fails here,
    naming both."""
    problems = []
    for vocabulary, places in _declarations().items():
        every = set().union(*map(set, places.values()))
        for place, values in places.items():
            if len(set(values)) != len(values):
                problems.append(f"{vocabulary}: {place} lists a value twice: {values}")
            if missing := every - set(values):
                having = [p for p, v in places.items() if missing & set(v)]
                problems.append(f"{vocabulary}: {place} lacks {sorted(missing)} (declared in {having})")
    assert not problems, "\n".join(problems)
    # In the same order, where the order is part of the declaration (Literals, the wire's fields).
    decl = _declarations()
    for place in ("espo_async/config.py StopConfig.policy", "protocols StopKind", "protocols StopParams.kind"):
        assert decl["stop kinds"][place] == K.STOP_KINDS, place
    assert decl["trajectory endings"]["protocols Ending"] == decl["trajectory endings"]["espo_async/core Ending"] == K.ENDINGS
    assert list(M.StopParams.__struct_fields__) == [f.name for f in dataclasses.fields(StopSnapshot)]
    # The policy groups are stop kinds.
    for group in (K.VALUE_STOP_KINDS, K.REGRET_STOP_KINDS, K.BETA_STOP_KINDS, K.HAZARD_STOP_KINDS):
        assert set(group) <= set(K.STOP_KINDS)
    assert "none" not in K.BETA_STOP_KINDS + K.HAZARD_STOP_KINDS
    assert not set(K.BETA_STOP_KINDS) & set(K.HAZARD_STOP_KINDS)
    # The two conversions of a stop snapshot round-trip.
    s = StopSnapshot(kind="value_only", enabled=True, mu=0.5, step=3)
    assert StopSnapshot.from_dict(msgspec.structs.asdict(P.StopParams(**s.to_dict()))) == s


def test_the_vocabulary_check_names_a_place_that_lacks_a_value(monkeypatch):
    """The check above is not vacuous: one place gaining a value fails it."""
    import pytest

    real = _declarations

    def one_more():
        decl = real()
        decl["stop kinds"]["protocols StopKind"] += ("early_exit",)
        return decl

    monkeypatch.setitem(globals(), "_declarations", one_more)
    with pytest.raises(AssertionError, match=r"config.py StopConfig.policy lacks \['early_exit'\]"):
        test_every_declaration_of_a_shared_vocabulary_holds_the_same_values()


def test_paper_constants_have_one_source():
    stop = StopConfig()
    assert (stop.r_fail, stop.alpha_ema, stop.alpha_s, stop.beta0, stop.eta_beta, stop.tau) == \
        (K.R_FAIL, K.ALPHA_EMA, K.ALPHA_S, K.BETA0, K.ETA_BETA, K.TAU)
    assert (stop.beta_min, stop.beta_max, stop.eps, stop.c, stop.delta, stop.value_ref) == \
        (K.BETA_MIN, K.BETA_MAX, K.EPS, K.CLIP_C, K.VAR_FLOOR_DELTA, K.VALUE_REF)
    assert (stop.random_rate, stop.random_eta) == (K.RANDOM_RATE, K.RANDOM_ETA)
    w = WarmupConfig()
    assert (w.loss_threshold, w.delta_threshold, w.patience, w.force_fraction) == (
        K.WARMUP_LOSS_THRESHOLD, K.WARMUP_DELTA_THRESHOLD, K.WARMUP_PATIENCE, K.WARMUP_FORCE_FRACTION)
    # the core's keyword defaults are the same numbers
    snap = StopSnapshot()
    assert (snap.c, snap.delta, snap.alpha_s, snap.beta, snap.eps, snap.value_ref) == \
        (K.CLIP_C, K.VAR_FLOOR_DELTA, K.ALPHA_S, K.BETA0, K.EPS, K.VALUE_REF)
    b = BetaController()
    assert (b.beta, b.eta, b.tau, b.beta_min, b.beta_max) == (K.BETA0, K.ETA_BETA, K.TAU, K.BETA_MIN, K.BETA_MAX)
    n = RegretNormalizer()
    assert (n.alpha_ema, n.c, n.delta) == (K.ALPHA_EMA, K.CLIP_C, K.VAR_FLOOR_DELTA)
    g = WarmupGate()
    assert (g.loss_threshold, g.delta_threshold, g.patience) == (
        K.WARMUP_LOSS_THRESHOLD, K.WARMUP_DELTA_THRESHOLD, K.WARMUP_PATIENCE)
    h = HazardController()
    assert (h.eta, h.target) == (K.RANDOM_ETA, K.RANDOM_RATE)
    c = StopController()
    assert (c.alpha_s, c.eps, c.value_ref) == (K.ALPHA_S, K.EPS, K.VALUE_REF)


def test_policy_facts_drive_config_checks():
    import pytest

    base = Config().model_dump()
    for kind in K.VALUE_STOP_KINDS:
        data = {**base, "stop": {**base["stop"], "policy": kind}, "actors": {**base["actors"], "critic": None}}
        with pytest.raises(ValueError, match="needs values"):
            Config.model_validate(data)
    assert AlgoConfig().clip_ratio_c is None
