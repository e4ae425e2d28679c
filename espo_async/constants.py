"""The paper's constants and the vocabularies every layer shares, in one torch-free place.

The config (its defaults and Literal choices), the core (its keyword defaults and StopSnapshot)
and the protocols (tests/layout/test_vocabularies.py pins their Literals to these) all read
them from here, so a constant or a policy fact is changed once.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- stop rule (ESPO)
#: r_fail: reward on the stop token of an absorbed trajectory (paper: -1.0).
R_FAIL = -1.0
#: EMA factor of the regret normaliser, applied at batch boundaries (paper: 0.99).
ALPHA_EMA = 0.99
#: Smoothing factor of z_t inside a trajectory (paper: 0.9).
ALPHA_S = 0.9
#: Initial value-gate multiplier beta (paper: 7.0).
BETA0 = 7.0
#: Step size of the beta controller (paper: 0.1).
ETA_BETA = 0.1
#: Target stop rate of the beta controller (paper: 0.25).
TAU = 0.25
#: beta_min: below 1 a low-value trajectory's threshold beta*eps < 0.2 is inside z's normal noise.
BETA_MIN = 1.0
#: beta_max = c / eps: above it z_t <= c can never exceed beta*max(V, eps).
BETA_MAX = 25.0
#: Floor of the value in the gate beta*max(V, eps) (paper: 0.2).
EPS = 0.2
#: c, the clip of the normalised regret. Not reported by the paper; must exceed beta0*eps = 1.4.
CLIP_C = 5.0
#: delta, the variance floor inside sqrt(var + delta): a std floor of 0.01 nat.
VAR_FLOOR_DELTA = 1e-4
#: value_ref of the value-only ablation: the constant standing in for z_t. Fires iff
#: max(V, eps) < value_ref / beta, i.e. V < 2/7 at beta0 = 7; beta then adapts to the target rate.
VALUE_REF = 2.0

# --------------------------------------------------------------------------- vocabularies
#: The stop policies: ESPO, no stopping (plain PPO) and the paper's ablations.
STOP_KINDS = ("espo", "none", "random", "value_only", "regret_only")
#: Policies whose rule reads V(s_t): they need a critic, and the stopper waits for values.
VALUE_STOP_KINDS = ("espo", "value_only")
#: Policies whose rule reads the smoothed regret z_t (<= c): c must exceed beta_min * eps.
REGRET_STOP_KINDS = ("espo", "regret_only")
#: Policies whose beta adapts to the target stop rate at batch boundaries.
BETA_STOP_KINDS = ("espo", "regret_only", "value_only")
#: Policies whose per-token hazard adapts instead (the random ablation).
HAZARD_STOP_KINDS = ("random",)

#: How a trajectory ends: EOS or stop string / the stop rule / max_tokens / a T-PPO window.
ENDINGS = ("finished", "absorbed", "truncated", "incomplete")

# --------------------------------------------------------------------------- warm-up gate (ESPO step 6)
#: A learner step qualifies if its critic loss is below this...
WARMUP_LOSS_THRESHOLD = 0.5
#: ...or if its critic loss changed by less than this since the previous step.
WARMUP_DELTA_THRESHOLD = 0.1
#: Consecutive qualifying steps needed to turn stopping on.
WARMUP_PATIENCE = 3
#: Stopping is forced on at this fraction of total steps.
WARMUP_FORCE_FRACTION = 0.1

# --------------------------------------------------------------------------- random-stop ablation
#: Target fraction of trajectories stopped (the beta controller's tau by default).
RANDOM_RATE = TAU
#: Step size of the hazard controller h <- h*exp(eta*(rate_target - rate)).
RANDOM_ETA = 2.0
