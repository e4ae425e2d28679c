"""The stop state between the config, the core and the wire: the learner-owned stop controller
built from the run's config, and the frozen snapshot (core ``StopSnapshot``) to and from its
message form (``protocols.StopParams``), as the learner sends it and the stopper reads it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

import protocols as P
from espo_async.core import (
    BetaController,
    HazardController,
    RegretNormalizer,
    StopController,
    WarmupGate,
    StopSnapshot,
    hazard_for_rate,
)

if TYPE_CHECKING:  # pragma: no cover
    from espo_async.config import Config


def make_stop_controller(cfg: Config) -> StopController:
    s = cfg.stop
    w = s.warmup
    gate = WarmupGate(
        loss_threshold=w.loss_threshold,
        delta_threshold=w.delta_threshold,
        patience=w.patience if w.enabled else 0,  # patience 0: open from the start
        force_fraction=w.force_fraction,
        total_steps=cfg.run.total_steps,
    )
    # The random-stop ablation starts at the hazard that stops `random_rate` of rollouts of half
    # the maximum length, then adapts toward that rate at batch boundaries.
    hazard0 = hazard_for_rate(min(s.random_rate, 0.999), cfg.rollout.max_tokens / 2)
    return StopController(
        s.policy,
        normalizer=RegretNormalizer(alpha_ema=s.alpha_ema, c=s.c, delta=s.delta),
        beta=BetaController(beta0=s.beta0, eta=s.eta_beta, tau=s.tau, beta_min=s.beta_min, beta_max=s.beta_max),
        gate=gate,
        hazard=HazardController(hazard0=max(hazard0, 1e-7), eta=s.random_eta, target=s.random_rate),
        alpha_s=s.alpha_s,
        eps=s.eps,
        value_ref=s.value_ref,
        seed=cfg.run.seed,
    )


def snapshot_from_params(params: P.StopParams) -> StopSnapshot:
    return StopSnapshot.from_dict(msgspec.structs.asdict(params))


def params_from_snapshot(snap: StopSnapshot) -> P.StopParams:
    return P.StopParams(**snap.to_dict())
