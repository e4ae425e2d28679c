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
    RegretNormalizer,
    StopController,
    StopSnapshot,
    WarmupGate,
)
from protocols import messages as M


def test_stop_kinds_agree():
    assert typing.get_args(StopConfig.model_fields["policy"].annotation) == K.STOP_KINDS
    assert typing.get_args(M.StopKind) == K.STOP_KINDS
    assert typing.get_args(typing.get_type_hints(M.StopParams)["kind"]) == K.STOP_KINDS
    for group in (K.VALUE_STOP_KINDS, K.REGRET_STOP_KINDS, K.BETA_STOP_KINDS, K.HAZARD_STOP_KINDS):
        assert set(group) <= set(K.STOP_KINDS)
    assert "none" not in K.BETA_STOP_KINDS + K.HAZARD_STOP_KINDS
    assert not set(K.BETA_STOP_KINDS) & set(K.HAZARD_STOP_KINDS)


def test_endings_agree():
    assert tuple(e.value for e in Ending) == K.ENDINGS
    assert typing.get_args(M.Ending) == K.ENDINGS


def test_stop_snapshot_fields_agree_with_stop_params():
    snap = [f.name for f in dataclasses.fields(StopSnapshot)]
    params = list(M.StopParams.__struct_fields__)
    assert params == snap
    # the two conversions round-trip
    s = StopSnapshot(kind="value_only", enabled=True, mu=0.5, step=3)
    assert StopSnapshot.from_dict(msgspec.structs.asdict(P.StopParams(**s.to_dict()))) == s


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
