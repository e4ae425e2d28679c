"""The run configuration: one YAML file in configs/ describes a whole run.

Every constant from the papers is a named option here, with the paper's value (espo_async/constants.py) as default and a
description (``python run.py --explain-config`` prints them all). Unknown keys, wrong types and
values out of range fail at start with a message naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from espo_async import constants as K
from espo_async.constants import STOP_KINDS


class ConfigError(ValueError):
    """The configuration is invalid; the message names every bad key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ---------------------------------------------------------------------------------------------
# The stop rule (ESPO, arXiv 2605.29860)


class WarmupConfig(_Section):
    """Stopping stays off until the critic has converged (ESPO.md, step 6)."""

    enabled: bool = Field(True, description="False turns stopping on from the first batch (the 'no warm-up' ablation).")
    loss_threshold: float = Field(K.WARMUP_LOSS_THRESHOLD, gt=0, description="A learner step qualifies if its critic loss is below this.")
    delta_threshold: float = Field(
        K.WARMUP_DELTA_THRESHOLD, ge=0, description="...or if its critic loss changed by less than this since the previous step."
    )
    patience: int = Field(K.WARMUP_PATIENCE, ge=1, description="Consecutive qualifying steps needed to turn stopping on.")
    force_fraction: float = Field(
        K.WARMUP_FORCE_FRACTION, ge=0, le=1, description="Stopping is forced on at this fraction of total steps."
    )


class StopConfig(_Section):
    """ESPO's stop rule and its ablations. Defaults are the paper's reported values."""

    policy: Literal[STOP_KINDS] = Field(
        "espo", description="Which stop rule runs: ESPO, no stopping (plain PPO), or an ablation."
    )
    r_fail: float = Field(K.R_FAIL, description="Reward on the stop token of an absorbed trajectory (paper: -1.0).")
    alpha_ema: float = Field(
        K.ALPHA_EMA, ge=0, lt=1, description="EMA factor of the regret normaliser, applied at batch boundaries (paper: 0.99)."
    )
    alpha_s: float = Field(K.ALPHA_S, ge=0, lt=1, description="Smoothing factor of z_t inside a trajectory (paper: 0.9).")
    beta0: float = Field(K.BETA0, gt=0, description="Initial value-gate multiplier beta (paper: 7.0).")
    eta_beta: float = Field(K.ETA_BETA, ge=0, description="Step size of the beta controller (paper: 0.1).")
    tau: float = Field(K.TAU, ge=0, le=1, description="Target stop rate of the beta controller (paper: 0.25).")
    beta_min: float = Field(
        K.BETA_MIN, gt=0, description="Lower bound of beta (not reported; ours: below it beta*eps is inside z's noise)."
    )
    beta_max: float = Field(
        K.BETA_MAX, gt=0, description="Upper bound of beta (not reported; ours: c/eps, above which nothing can ever fire)."
    )
    eps: float = Field(K.EPS, gt=0, description="Floor of the value in the gate: beta*max(V, eps) (paper: 0.2).")
    c: float = Field(
        K.CLIP_C, gt=0, description="Clip of the normalised regret (not reported; must exceed beta0*eps = 1.4 to ever stop)."
    )
    delta: float = Field(K.VAR_FLOOR_DELTA, gt=0, description="Variance floor in the normaliser: sqrt(var + delta) (not reported).")
    value_interval: int = Field(
        1, ge=1, description="The critic sends V(s_t) every this many tokens; the stopper uses V at t - t mod k."
    )
    random_rate: float = Field(
        K.RANDOM_RATE, ge=0, le=1, description="Random-stop ablation: target fraction of trajectories stopped."
    )
    random_eta: float = Field(
        K.RANDOM_ETA, ge=0, description="Random-stop ablation: the per-token hazard h <- h*exp(eta*(rate_target - rate)) at boundaries."
    )
    value_ref: float = Field(
        K.VALUE_REF, gt=0, description="Value-only ablation: fire iff beta*max(V, eps) < value_ref (z_t replaced by this constant)."
    )
    shadow_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of stopped rollouts continued from the stop point in a shadow request (never "
        "trained on) to measure false-positive stops: how often a stopped rollout would have been correct.",
    )
    warmup: WarmupConfig = WarmupConfig()

    @model_validator(mode="after")
    def _check(self) -> StopConfig:
        if self.beta_min > self.beta_max:
            raise ValueError(f"beta_min ({self.beta_min}) must be <= beta_max ({self.beta_max})")
        if not self.beta_min <= self.beta0 <= self.beta_max:
            raise ValueError(f"beta0 ({self.beta0}) must lie in [beta_min, beta_max] = [{self.beta_min}, {self.beta_max}]")
        if self.policy in K.REGRET_STOP_KINDS and self.c <= self.beta_min * self.eps:
            raise ValueError(
                f"c ({self.c}) must exceed beta_min*eps ({self.beta_min * self.eps}): z_t <= c, so the rule could never fire"
            )
        return self


# ---------------------------------------------------------------------------------------------
# PPO and its baselines


class AlgoConfig(_Section):
    """The learner's update. PPO (GAE + critic) by default; GRPO and DAPO are baselines."""

    advantage: Literal["gae", "grpo"] = Field("gae", description="GAE with the critic (PPO/ESPO) or GRPO's group-normalised outcome.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (not reported; 1.0 is standard for LLM RL).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (not reported).")
    truncation: Literal["bootstrap", "terminal"] = Field(
        "terminal",
        description="A rollout cut at max_tokens without EOS: terminal (the verifier scores the cut text, usually 0; "
        "the default, as in verl and OpenRLHF) or bootstrap from V(s_T). max_tokens also bounds evaluation, so the "
        "cut is part of the task, and bootstrapping pays a rollout that rambles to the cut V(s_T) > 0 where a "
        "finished wrong answer gets 0 (docs/results.notes.md).",
    )
    clip_low: float = Field(0.2, gt=0, description="PPO ratio clip below 1.")
    clip_high: float = Field(0.2, gt=0, description="PPO ratio clip above 1 (DAPO clip-higher: 0.28).")
    clip_ratio_c: float | None = Field(
        None, gt=1, description="Dual clip (verl: 3): a negative-advantage token's policy loss is at most clip_ratio_c*|A| (None: off)."
    )
    loss_agg: Literal["token", "seq"] = Field("token", description="Average the policy loss over all tokens (DAPO) or per sequence first.")
    policy_loss: Literal["ppo", "entropy_is"] = Field("ppo", description="Clipped PPO or entropy-grouped importance sampling.")
    entropy_is_top_frac: float = Field(0.2, gt=0, lt=1, description="Entropy-IS: fraction of highest-entropy tokens in the first group.")
    entropy_is_alpha: float = Field(0.02, gt=0, description="Entropy-IS: clip range alpha/log|V| * mean group entropy.")
    value_clip: float | None = Field(0.2, description="Value-loss clip around the old values (None: unclipped).")
    value_coef: float = Field(1.0, ge=0, description="Weight of the value loss (critic trained by its own optimiser).")
    kl_coef: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference policy (0 disables it).")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    whiten_advantages: bool = Field(True, description="Normalise GAE advantages over the batch.")
    grpo_std: bool = Field(True, description="GRPO: divide by the group's reward std (False: Dr.GRPO).")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal.")
    overlong_buffer: int = Field(0, ge=0, description="DAPO overlong shaping: penalty ramps over the last this many tokens (0: off).")
    overlong_penalty: float = Field(1.0, ge=0, description="DAPO overlong shaping: maximum penalty.")
    epochs: int = Field(1, ge=1, description="PPO epochs over each batch.")
    minibatches: int = Field(1, ge=1, description="Minibatches per epoch.")
    lr: float = Field(1e-6, gt=0, description="Policy learning rate (paper: 1e-6).")
    critic_warmup_steps: int = Field(
        0,
        ge=0,
        description="Learner steps 1..N train only the critic (the policy is not updated), so GAE's per-token "
        "credit comes from a critic that already knows the policy's values (verl: critic_warmup). 0: off. "
        "Ignored without a critic (GRPO).",
    )
    adam_eps: float = Field(
        1e-8,
        gt=0,
        description="AdamW's epsilon (policy and critic). Far below a parameter's gradient RMS, Adam rescales a "
        "noise-dominated gradient to a full ~lr step; near it, parameters with small gradients move in proportion "
        "(docs/results.notes.md: positive-only fine-tuning collapsed at 1e-8 and learned at 1e-3).",
    )
    lr_warmup_steps: int = Field(
        0,
        ge=0,
        description="The policy's learning rate rises linearly from lr/N to lr over its first N optimiser steps "
        "(epochs x minibatches per learner step); 0: constant. Adam's first steps move every parameter by ~lr "
        "whatever its gradient, which on a sharp warmed-up model is mostly noise (docs/results.notes.md).",
    )
    critic_lr: float = Field(1e-5, gt=0, description="Critic learning rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    micro_batch_tokens: int = Field(2048, ge=1, description="Learner micro-batch size in padded tokens (gradient accumulation; memory).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, slower).")
    behaviour_is_cap: float | None = Field(
        2.0, description="Truncated importance weight pi_prox/pi_behaviour for tokens sampled by an older policy (None: off)."
    )
    tppo_critic_rollouts: int = Field(
        1,
        ge=1,
        description="T-PPO (rollout.window_tokens > 0): the critic trains on complete rollouts only, with Monte-Carlo "
        "returns, at a learner step once at least this many complete rollouts wait (all of them are used, each once).",
    )


# ---------------------------------------------------------------------------------------------
# Rollouts, model, task


class RolloutConfig(_Section):
    samples_per_prompt: int = Field(8, ge=1, description="Rollouts per prompt (paper: 8).")
    prompts_per_batch: int = Field(8, ge=1, description="Prompts per training batch; batch = prompts x samples (paper: 64 rollouts).")
    max_tokens: int = Field(256, ge=1, description="T_max: generation limit per rollout (paper: 8192).")
    max_prompt_tokens: int = Field(
        32768, ge=1, description="Longest prompt (tokens) a sampler generates for and the learner accepts: a "
        "frame claiming more is rejected at intake (what one frame may cost). Training problems whose prompt is "
        "longer are skipped by the coordinator (counted: prompts_too_long).",
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    staleness: int = Field(
        1, ge=0, description="K: no rollout starts more than K policy versions ahead of the learner (0: on-policy)."
    )
    prefetch: int = Field(
        0,
        ge=0,
        description="Work items each sampler holds beyond its engine's slots. They wait in the engine's own queue, "
        "so a slot freed by a finished rollout restarts in the next engine step instead of after a round trip "
        "through the coordinator (docs/performance.md, streaming). 0: exactly one item per slot.",
    )
    synchronous: bool = Field(
        False,
        description="Generate-then-train: a batch's rollouts start only after the previous step finished "
        "(no overlap of generation and training; the baseline of the async benchmark).",
    )
    window_tokens: int = Field(
        0,
        ge=0,
        description="T-PPO windows (0: off): a training rollout hands the learner a segment (ending 'incomplete') "
        "every this many tokens and keeps generating under newer weights; a learner step trains on "
        "prompts_per_batch x samples_per_prompt segments (see espo_async/training/tppo.py). Must be < max_tokens.",
    )


class ModelConfig(_Section):
    policy: str = Field("tiny", description="'tiny' (built by the project), 'smollm2-135m', or a local HF checkpoint path.")
    critic: str = Field("policy", description="'policy': a scalar head on a copy of the policy; or a model spec like policy.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype for engines and training.")
    learner_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the learner trains ('auto': CUDA if visible).")
    sft_steps: int = Field(0, ge=0, description="Supervised warm-up steps on the task's gold solutions before RL (tiny model).")
    sft_batch: int = Field(64, ge=1, description="Supervised warm-up batch size.")
    sft_lr: float = Field(3e-3, gt=0, description="Supervised warm-up peak learning rate (one-cycle schedule).")
    sft_label_smoothing: float = Field(
        0.0, ge=0, lt=1,
        description="Supervised warm-up label smoothing: each target keeps 1 - s of its probability and s is "
        "spread over the vocabulary. s > 0 leaves the greedy answer intact but makes sampling at temperature 1 "
        "slip (a low-probability token, a regret spike), which RL can remove (docs/results.notes.md).",
    )
    sft_threads: int = Field(
        2, ge=1,
        description="torch threads of the supervised warm-up (at most the CPUs this process may use). It runs "
        "before any actor starts, so it has the machine to itself: on 2 cores, 2 threads take 0.57x the time "
        "of 1 (600 steps of the 10-step chain, ~3 min instead of ~5). Not part of the cache key.",
    )
    seed: int | None = Field(
        None, ge=0,
        description="Seed of the tiny model's initialisation and supervised warm-up (None: run.seed). Set it to "
        "keep one start model while run.seed varies the RL run alone (seeds that differ only in RL).",
    )
    tiny_layers: int = Field(2, ge=1, description="Tiny model: layers.")
    tiny_hidden: int = Field(64, ge=32, description="Tiny model: hidden size (head size is 32: vLLM's CPU kernels need >= 32).")


class TaskConfig(_Section):
    name: str = Field("arithmetic", description="'arithmetic', 'gsm8k' or 'math500'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the task's constructor.")
    eval_problems: int = Field(64, ge=0, description="Held-out problems evaluated before and after training (0: no evaluation).")
    eval_samples: int = Field(1, ge=1, description="Samples per held-out problem (pass@1 averaged over them).")
    eval_temperature: float = Field(0.0, ge=0, description="Sampling temperature of evaluation rollouts (0: greedy).")
    eval_every: int = Field(0, ge=0, description="Also evaluate every this many learner steps (0: only before and after).")


class DeepSpeedConfig(_Section):
    """The learner's DeepSpeed setup. ``world_size > 1``: data-parallel training over that many
    ranks (processes): rank 0 is the learner actor, ranks 1..N-1 are worker processes it starts
    on its own host (espo_async/training/data_parallel.py; docs/cluster.md, "A learner on several
    ranks"). Under a launcher (``deepspeed``/``torchrun``) the launcher's RANK/WORLD_SIZE win."""

    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Merged into the generated DeepSpeed config.")
    world_size: int = Field(
        1, ge=1, le=1024,
        description="Learner ranks (data parallel). 1: one process (no workers). N > 1: the learner (rank 0) "
        "starts N-1 worker processes on its host; on GPUs rank r uses the r-th device the learner sees "
        "(actors.learner.env.CUDA_VISIBLE_DEVICES must list N), on CPU they train with gloo.",
    )
    worker_cpus: list[list[int]] | None = Field(
        None,
        description="CPU ids each worker rank (1..N-1) is pinned to, one list per worker (Linux); null: the "
        "workers inherit the learner's CPUs (actors.learner.cpus).",
    )
    timeout_s: float = Field(
        600.0, gt=0,
        description="With world_size > 1: how long a rank waits in a collective inside a step or a save "
        "(and for the workers to start) before it fails; a dead rank is usually noticed at once (its "
        "connections close), a hung one after this.",
    )

    @model_validator(mode="after")
    def _check_ranks(self) -> DeepSpeedConfig:
        if self.worker_cpus is not None:
            if len(self.worker_cpus) != self.world_size - 1:
                raise ValueError(f"worker_cpus needs one CPU list per worker rank: {self.world_size - 1} "
                                 f"(world_size {self.world_size}), got {len(self.worker_cpus)}")
            for i, cpus in enumerate(self.worker_cpus):
                if not cpus or any(c < 0 for c in cpus):
                    raise ValueError(f"worker_cpus[{i}] (rank {i + 1}): a non-empty list of CPU ids >= 0, got {cpus}")
        return self


# ---------------------------------------------------------------------------------------------
# Actors and transport


class ActorSpec(_Section):
    cls: str = Field(alias="class", description="Import path 'package.module:ClassName' of the actor class.")
    count: int = Field(1, ge=1, description="How many processes of this actor to start.")
    threads: int = Field(1, ge=1, description="torch intra-op threads in this process.")
    cpus: list[int] | None = Field(
        None, description="Pin the process(es) to these CPU ids (Linux); null: any CPU. vLLM binds its threads to them."
    )
    nice: int = Field(
        0, ge=0, le=19,
        description="Niceness of the process(es) (Linux; higher runs later). On shared cores, a throughput "
        "actor (learner) given a higher value leaves the latency-bound ones (stopper, critic) the CPU as soon as "
        "they have work.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the actor class (validated there).")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables of this role's processes, e.g. {CUDA_VISIBLE_DEVICES: '1'} (which GPUs it sees).",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        """``CUDA_VISIBLE_DEVICES: 1`` (YAML reads a number) is the string '1'."""
        if isinstance(v, dict):
            return {k: str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for k, x in v.items()}
        return v

    @field_validator("cls")
    @classmethod
    def _import_path(cls, v: str) -> str:
        module, sep, name = v.partition(":")
        if not sep or not module or not name.isidentifier():
            raise ValueError(f"'{v}' is not an import path of the form 'package.module:ClassName'")
        return v


class ActorsConfig(_Section):
    coordinator: ActorSpec = ActorSpec(cls="actors.coordinator:Coordinator")
    sampler: ActorSpec = ActorSpec(cls="actors.samplers.fake:FakeSampler")
    critic: ActorSpec | None = ActorSpec(cls="actors.critics.fake:FakeCritic")
    stopper: ActorSpec | None = ActorSpec(cls="actors.stopper:Stopper")
    learner: ActorSpec = ActorSpec(cls="actors.learner:Learner")
    supervisor_cpus: list[int] | Literal["auto"] | None = Field(
        "auto",
        description="CPUs of run.py's supervisor process (heartbeats, progress, restarts). 'auto': the CPUs "
        "this host's samplers are not pinned to, so it never takes time from an engine (it uses ~10% of a "
        "core in the default run, bench/streaming.py); any CPU if the samplers are unpinned or use them all. "
        "null: leave it as started.",
    )

    @field_validator("supervisor_cpus")
    @classmethod
    def _cpu_ids(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(c < 0 for c in v)):
            raise ValueError(f"supervisor_cpus: 'auto', null or a non-empty list of CPU ids >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _single(self) -> ActorsConfig:
        for role in ("coordinator", "learner", "stopper", "critic"):
            spec = getattr(self, role)
            if spec is not None and spec.count != 1:
                raise ValueError(f"{role}.count must be 1 (only samplers scale out), got {spec.count}")
        return self


LOOPBACK_HOSTS = ("localhost", "::1")


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost never leave the machine."""
    import ipaddress

    host = host.strip("[]")
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CURVE_KEY_FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret")


class CurveConfig(_Section):
    """ZeroMQ CURVE: every socket authenticates its peer and encrypts every frame."""

    enabled: bool = Field(False, description="Use CURVE on every socket (required for a non-loopback transport.host).")
    auto: bool = Field(
        False,
        description="The one switch for a shared machine: CURVE on every socket (loopback tcp and ipc too) with keys "
        "made for this run in RUN/curve (0700, secret keys 0600; kept when the run is resumed); implies enabled. "
        "With several hosts, RUN/curve must be at the same path on every host (shared storage), or use keys_dir.",
    )
    keys_dir: str | None = Field(
        None,
        description="Folder made by 'python -m espo_async.runtime.keys gen DIR': server.key(_secret), "
        "client.key(_secret) and authorized/ (client public keys allowed to connect).",
    )

    @model_validator(mode="before")
    @classmethod
    def _auto(cls, data):
        if isinstance(data, dict) and data.get("auto") is True:
            data = {**data, "enabled": True}
        return data

    @model_validator(mode="after")
    def _keys(self) -> CurveConfig:
        if not self.enabled or (self.auto and not self.keys_dir):  # auto: the supervisor makes them
            return self
        if not self.keys_dir:
            raise ValueError("curve.enabled needs curve.keys_dir (make one with: python -m espo_async.runtime.keys gen DIR)")
        folder = Path(self.keys_dir)
        missing = [f for f in CURVE_KEY_FILES if not (folder / f).is_file()]
        if not (folder / "authorized").is_dir():
            missing.append("authorized/")
        if missing:
            raise ValueError(
                f"curve.keys_dir {str(folder)!r} lacks {', '.join(missing)} "
                "(make the keys with: python -m espo_async.runtime.keys gen DIR)"
            )
        return self


class TransportConfig(_Section):
    kind: Literal["ipc", "tcp"] = Field("ipc", description="ipc:// sockets in the run directory, or tcp:// ports.")
    host: str = Field("127.0.0.1", description="tcp: the host actors bind and connect to.")
    base_port: int = Field(0, ge=0, le=65000, description="tcp: first port (0: pick free ports).")
    hwm: int = Field(1000, ge=1, description="ZeroMQ high-water mark (messages) on stream and result sockets.")
    max_frame_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Frames larger than this are rejected.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="How often each actor reports that it is alive.")
    heartbeat_timeout_s: float = Field(30.0, gt=0, description="An actor silent this long is reported as hung or dead.")
    startup_timeout_s: float = Field(300.0, gt=0, description="All actors must report ready within this time.")
    shutdown_timeout_s: float = Field(20.0, gt=0, description="Grace period before stragglers are killed.")
    stream_ttl_s: float = Field(
        600.0, gt=0, description="Stopper/critic forget a stream idle this long (its end message was lost)."
    )
    restart_actors: bool = Field(
        True, description="Restart an actor that died or hung once the run started (False: such a loss ends the run)."
    )
    max_restarts: int = Field(
        5, ge=0, description="Restarts allowed per actor within restart_window_s; one more loss ends the run."
    )
    restart_window_s: float = Field(3600.0, gt=0, description="The window over which max_restarts counts.")
    restart_backoff_s: float = Field(
        1.0, ge=0, description="Delay before a restart; doubles with each restart in the window (at most 60 s)."
    )
    loop_probe_interval_s: float = Field(
        0.01, ge=0, description="Every actor measures its event loop's lag (how late a timer of this period fires: "
        "time its loop spent on other work) and reports loop_lag.* counters in its heartbeats; 0: off."
    )
    curve: CurveConfig = CurveConfig()
    allow_insecure: bool = Field(
        False, description="Allow a non-loopback tcp host without CURVE (anyone on the network could inject frames)."
    )

    @model_validator(mode="after")
    def _secure(self) -> TransportConfig:
        if self.kind == "tcp" and not is_loopback_host(self.host) and not self.curve.enabled and not self.allow_insecure:
            raise ValueError(
                f"host {self.host!r} is not a loopback address and curve.enabled is false: set "
                "transport.curve.enabled: true with transport.curve.keys_dir (python -m espo_async.runtime.keys gen DIR), "
                "use a loopback host (127.0.0.1, ::1, localhost), or set transport.allow_insecure: true"
            )
        return self


class WeightsConfig(_Section):
    """How the learner hands new weights to the samplers and the critic after each step: a
    safetensors file per step whose ``file://`` URI it announces (docs/architecture.md), or a
    broadcast through a weight-update process group (``transport: collective``)."""

    dir: str = Field(
        "auto",
        description="Where the per-step weight files go. 'run': RUN_DIR/weights (a shared filesystem reaches every "
        "host). 'shm': /dev/shm/espo-async/<run> (memory: no disk write; single host only; removed when the run "
        "ends). 'auto': 'shm' when the run cannot span hosts (transport.kind ipc, or a loopback tcp host, with every "
        "role on this host) and /dev/shm exists, else 'run'. Or an absolute path.",
    )
    keep_versions: int = Field(
        3, ge=2, description="Per-step files kept per model (older ones are deleted; a load may still be in flight)."
    )
    transport: Literal["files", "collective"] = Field(
        "files",
        description="How the policy goes to the vLLM samplers. 'files': a safetensors file per step (above). "
        "'collective': the learner broadcasts it through a process group of its own with every sampler's engine "
        "workers (gloo on CPU, NCCL on GPU; espo_async/weights/collective.py); files stay its fallback: before the "
        "group is formed, for engines outside it (late joiners, restarts), for the critic, and for the rest of the "
        "run once the group failed (docs/cluster.md).",
    )
    collective_members: int = Field(
        0, ge=0, description="collective: engine workers in the group (world size - 1; one per sampler, more with "
        "tensor parallelism). 0: actors.sampler.count."
    )
    collective_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="collective: the group's backend; auto: nccl where the learner has CUDA, else gloo."
    )
    collective_host: str = Field(
        "", description="collective: the address engines reach the learner's group store at; '': the learner's host "
        "(cluster.role_hosts.learner, else transport.host on tcp, else 127.0.0.1)."
    )
    collective_port: int = Field(
        0, ge=0, le=65535, description="collective: the learner's group store port (0: a free port, named in the "
        "announced URI)."
    )
    collective_timeout_s: float = Field(
        60.0, gt=0, description="collective: every broadcast operation fails after this long (the group is then "
        "broken and weights go as files)."
    )
    collective_join_timeout_s: float = Field(
        600.0, gt=0, description="collective: the group must be formed (every member joined) within this long after "
        "the learner starts, else the run uses files."
    )
    collective_bucket_mb: float = Field(
        64.0, gt=0, description="collective: tensors are broadcast packed into buffers of at most this size."
    )

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str) -> str:
        if v not in ("auto", "run", "shm") and not Path(v).is_absolute():
            raise ValueError(f"dir {v!r}: use 'auto', 'run', 'shm' or an absolute path")
        return v


Role = Literal["coordinator", "learner", "stopper", "critic", "sampler"]
ROLES: tuple[str, ...] = ("coordinator", "learner", "stopper", "critic", "sampler")


class ClusterConfig(_Section):
    """Several hosts, one run (docs/cluster.md). Each host runs ``run.py`` with its own supervisor
    for the roles it starts; the head host's ``join.json`` (addresses and config) lets others join."""

    roles: list[Role] | None = Field(
        None, description="Roles this host starts (null: all). E.g. [sampler] on a sampler host (run.py --roles)."
    )
    host_name: str = Field(
        "",
        description="This host's name in the run (run.py --host-name): its samplers are named sampler-<i>@<host_name>. "
        "Must differ between hosts that run samplers; '' on the head (plain sampler-<i>).",
    )
    role_hosts: dict[Role, str] = Field(
        default_factory=dict,
        description="Address whose interface a role's bound endpoints use when that role runs on another host than "
        "transport.host (e.g. {learner: 10.0.0.2}); needs transport.kind tcp and a fixed transport.base_port.",
    )

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("roles must name at least one role (null: all roles)")
            if len(set(v)) != len(v):
                raise ValueError(f"roles lists a role twice: {v}")
        return v

    @field_validator("host_name")
    @classmethod
    def _host_name(cls, v: str) -> str:
        import re

        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError(f"host_name {v!r}: use letters, digits, '_', '.', '-' (at most 63, no '/', '#', '@')")
        return v

    def runs(self, role: str) -> bool:
        """Whether this host starts ``role``."""
        return self.roles is None or role in self.roles


class RunConfig(_Section):
    name: str = Field("run", description="Run name; the output folder is <output_dir>/<name>-<timestamp>.")
    output_dir: str = Field("runs", description="Where run folders go (ignored by git).")
    seed: int = Field(0, description="Seed of everything random in the run.")
    total_steps: int = Field(10, ge=1, description="Learner steps (training batches).")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every this many steps (0: at the end only).")
    tensorboard: bool = Field(True, description="Write TensorBoard event files beside metrics.jsonl.")
    progress: bool = Field(True, description="Show a progress bar on the console.")
    stall_timeout_s: float = Field(
        1800.0, ge=0, description="A stall: no learner step and no trajectory acknowledged for this long while "
        "prompt groups or evaluation rounds are unfinished and no actor is down. The coordinator then writes what the run waits for "
        "(each missing sample: issued to whom and when, queued, or nowhere) to RUN/stall.json and RUN/stalls.jsonl, "
        "the supervisor shows it on the console, and the missing samples are issued again. Must exceed the longest "
        "learner step plus the longest rollout. 0: off.",
    )
    stall_reissues: int = Field(
        2, ge=0, description="Recoveries (issuing the missing samples again) from stalls in a row without progress; "
        "at the next stall the run ends with exit code 1 and a message naming what it waited for.",
    )
    counters_every_s: float = Field(
        30.0, ge=0, description="How often the supervisor appends every actor's counters to RUN/counters.jsonl "
        "(also once at the end). 0: only at the end.",
    )


class Config(_Section):
    """A whole run."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    stop: StopConfig = StopConfig()
    algo: AlgoConfig = AlgoConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    actors: ActorsConfig = ActorsConfig()
    transport: TransportConfig = TransportConfig()
    cluster: ClusterConfig = ClusterConfig()
    weights: WeightsConfig = WeightsConfig()

    @model_validator(mode="after")
    def _cross(self) -> Config:
        for role in self.cluster.roles or ():
            if role in ("stopper", "critic") and getattr(self.actors, role) is None:
                raise ValueError(f"cluster.roles names {role!r} but actors.{role} is null")
        t = self.transport
        elsewhere = {r: h for r, h in self.cluster.role_hosts.items() if h != t.host}
        if elsewhere and t.kind != "tcp":
            raise ValueError(f"cluster.role_hosts places {sorted(elsewhere)} on other hosts: needs transport.kind tcp")
        if elsewhere and not t.base_port:
            raise ValueError(
                f"cluster.role_hosts places {sorted(elsewhere)} on other hosts: set transport.base_port "
                "(free ports can only be found on the head host)"
            )
        for role, host in elsewhere.items():
            if not is_loopback_host(host) and not t.curve.enabled and not t.allow_insecure:
                raise ValueError(
                    f"cluster.role_hosts.{role} {host!r} is not a loopback address and transport.curve.enabled is "
                    "false: enable CURVE (python -m espo_async.runtime.keys gen DIR) or set transport.allow_insecure"
                )
        if self.stop.policy != "none" and self.actors.stopper is None:
            raise ValueError(f"stop.policy is '{self.stop.policy}' but actors.stopper is null: set stop.policy: none")
        if self.stop.policy in K.VALUE_STOP_KINDS and self.actors.critic is None:
            raise ValueError(f"stop.policy '{self.stop.policy}' needs values: actors.critic must be set")
        if self.algo.advantage == "grpo" and self.rollout.samples_per_prompt < 2:
            raise ValueError("algo.advantage 'grpo' needs rollout.samples_per_prompt >= 2")
        if self.rollout.window_tokens > 0:
            _check_windows(self)
        return self

    @property
    def model_seed(self) -> int:
        """The seed of the tiny start model, its initialisation and warm-up: ``model.seed``, else ``run.seed``."""
        return self.run.seed if self.model.seed is None else self.model.seed

    @property
    def batch_trajectories(self) -> int:
        return self.rollout.prompts_per_batch * self.rollout.samples_per_prompt

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _check_windows(cfg: Config) -> None:
    """T-PPO windows (rollout.window_tokens > 0) and the options they cannot work with."""
    r, a = cfg.rollout, cfg.algo
    w = r.window_tokens
    if w >= r.max_tokens:
        raise ValueError(f"rollout.window_tokens ({w}) must be < rollout.max_tokens ({r.max_tokens}) (0 turns windows off)")
    if a.advantage != "gae":
        raise ValueError(
            f"rollout.window_tokens > 0 (T-PPO) needs algo.advantage 'gae', got '{a.advantage}': an unfinished "
            "segment has no outcome reward, only the critic's extended-GAE bootstrap"
        )
    if r.synchronous:
        raise ValueError("rollout.window_tokens > 0 (T-PPO) cannot be combined with rollout.synchronous")
    if a.dynamic_sampling:
        raise ValueError("rollout.window_tokens > 0 (T-PPO) cannot be combined with algo.dynamic_sampling (a step's "
                         "rows are segments, not complete prompt groups)")
    if a.overlong_buffer > 0:
        raise ValueError("rollout.window_tokens > 0 (T-PPO) cannot be combined with algo.overlong_buffer (a segment's "
                         "length is not its response's length)")


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _model_at(err["loc"][:-1])
            if parent is not None:
                msg += f" (allowed here: {', '.join(sorted(parent.model_fields))})"
        elif err["type"] == "literal_error":
            msg = f"got {err.get('input')!r}; {msg.lower()}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def parse_config(data: dict[str, Any] | None, *, source: str = "<dict>") -> Config:
    """Validate a config mapping; raises ConfigError naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration ({source}): the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    for item in overrides or []:
        apply_override(data, item)
    return parse_config(data, source=str(path))


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base`` (raw YAML mappings). An actor spec whose
    ``class`` changes is replaced as a whole: the old class's options do not carry over."""
    import copy

    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        both = isinstance(value, dict) and isinstance(old, dict)
        new_actor = both and "class" in value and value["class"] != old.get("class")
        out[key] = merge_config(old, value) if both and not new_actor else copy.deepcopy(value)
    return out


def apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def explain(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per option: dotted key, default and description (for --explain-config)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None and not (isinstance(ann, type) and issubclass(ann, ActorSpec)):
            lines.extend(explain(sub, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(by_alias=True)
        desc = field.description or ""
        lines.append(f"{key} = {default!r}  # {desc}" if desc else f"{key} = {default!r}")
    return lines
