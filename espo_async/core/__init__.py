"""Pure ESPO mathematics (torch only): regret, normaliser, stop rule, controllers, stop policies,
advantages and losses. See docs/algorithms.md for the formulas as implemented."""

from .advantages import (
    Ending,
    dynamic_sampling_mask,
    gae,
    gae_batched,
    grpo_advantages,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    overlong_penalty,
    shape_rewards,
)
from .controllers import (
    DEFAULT_BETA_MAX,
    DEFAULT_BETA_MIN,
    BetaController,
    HazardController,
    WarmupGate,
    hazard_for_rate,
)
from .losses import (
    aggregate,
    entropy_from_logits,
    entropy_groups,
    entropy_is_policy_loss,
    kl_penalty,
    ppo_policy_loss,
    value_loss,
)
from .normalizer import (
    DEFAULT_CLIP_C,
    DEFAULT_VAR_FLOOR_DELTA,
    NormalizerState,
    RegretNormalizer,
    normalize_regret,
)
from .regret import surrogate_regret, surrogate_regret_from_logits
from .scan import linear_scan
from .stop_policies import (
    DEFAULT_VALUE_REF,
    STOP_KINDS,
    EspoStop,
    NoStop,
    RandomStop,
    RegretOnlyStop,
    StopController,
    StopPolicy,
    StopSnapshot,
    ValueOnlyStop,
    key_to_u32,
    make_stop_policy,
    stream_uniform,
)
from .stop_rule import StopStream, first_stop, replay_stop, smoothed_regret, stop_threshold

__all__ = [
    # regret
    "surrogate_regret", "surrogate_regret_from_logits",
    # normaliser
    "NormalizerState", "RegretNormalizer", "normalize_regret", "DEFAULT_CLIP_C",
    "DEFAULT_VAR_FLOOR_DELTA",
    # stop rule
    "StopStream", "stop_threshold", "replay_stop", "first_stop", "smoothed_regret",
    # controllers
    "BetaController", "WarmupGate", "HazardController", "hazard_for_rate", "DEFAULT_BETA_MIN",
    "DEFAULT_BETA_MAX",
    # stop policies
    "STOP_KINDS", "DEFAULT_VALUE_REF", "StopSnapshot", "StopPolicy", "EspoStop", "NoStop",
    "RandomStop", "RegretOnlyStop", "ValueOnlyStop", "make_stop_policy", "StopController",
    "stream_uniform", "key_to_u32",
    # advantages
    "Ending", "gae", "gae_batched", "shape_rewards", "grpo_advantages", "dynamic_sampling_mask",
    "overlong_penalty", "masked_sum", "masked_mean", "masked_var", "masked_whiten",
    # losses
    "aggregate", "ppo_policy_loss", "value_loss", "kl_penalty", "entropy_from_logits",
    "entropy_groups", "entropy_is_policy_loss",
    # scan
    "linear_scan",
]
