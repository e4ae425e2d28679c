"""The learner's training engine: PPO / ESPO (GAE + critic), GRPO and DAPO updates with DeepSpeed.

``PPOTrainer`` is synchronous (the learner actor calls it from a worker thread). One
``train_step`` on a batch of trajectories:

1. drops unusable samples (empty response / prompt) and, with DAPO dynamic sampling, every
   prompt group whose outcomes are all equal; packs the rest (prompts left-padded, responses
   right-padded: see ``batch.py`` for the exact column layout);
2. without gradients: pi_old log-probs and per-token entropy of the response tokens under the
   current policy, V(s_t) for t = 0..T (T+1 values: the last one is the bootstrap V(s_T)) under
   the current critic, and reference log-probs when ``algo.kl_coef > 0`` (a frozen copy of the
   initial policy);
3. rewards and advantages with the pure ``compute_advantages`` (shape_rewards per ending,
   GAE or GRPO, DAPO overlong shaping); critic returns R = A_gae + V;
4. truncated importance weights for off-policy tokens when ``algo.behaviour_is_cap`` is set:
   w_t = min(pi_old(y_t) / pi_behaviour(y_t), cap), detached (AReaL's decoupled PPO: the
   clipped ratio is taken against the proximal policy pi_old, the weight corrects for the
   sampler's older policy; also absorbs sampler/learner numeric mismatch). Tokens without a
   finite behaviour log-prob get w = 1. For ``policy_loss="entropy_is"`` (which takes no weights)
   w multiplies the advantage, which is the same thing for w >= 0;
5. ``epochs`` x ``minibatches`` optimiser steps on shuffled rows, each minibatch split into
   micro-batches of at most ``micro_batch_tokens`` padded tokens with exact gradient
   accumulation (each micro-batch loss is weighted by its share of the minibatch's loss terms),
   policy and critic in two DeepSpeed engines with their own AdamW and learning rates;
6. returns float metrics.

Several ranks (``deepspeed.world_size`` > 1, ``data_parallel.py``): every rank holds the whole
batch and computes steps 1, 3 and 4 on it (GAE whitening and GRPO groups stay batch-wide); the
model passes of steps 2 and 5 are split by rows, and each rank's loss is scaled so that the
gradient DeepSpeed averages over ranks is the one-rank gradient (see "data parallel" below).

Other choices: dropout is off (models stay in eval mode, so pi_old and pi_theta are the same
function at the first update); logits are divided by ``rollout.temperature`` (the sampling
distribution; 1.0 by default), so samplers must report log-probs of the same distribution;
AdamW has no weight decay.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from espo_async.config import Config
from espo_async.core.advantages import masked_mean
from espo_async.core.losses import (
    aggregate,
    entropy_from_logits,
    entropy_is_policy_loss,
    kl_penalty,
    ppo_policy_loss,
    value_loss,
)
from espo_async.models.value_model import VALUE_FORMAT, ValueModel, quiet_loading
from espo_async.training.batch import (
    Advantages,
    CriticTargets,
    ResponseBatch,
    TrainSample,
    compute_advantages,
    filter_samples,
    loss_units,
    pack_inputs,
    pack_responses,
    plan_micro_batches,
)
from espo_async.utils import atomic_dir

__all__ = ["PPOTrainer", "TrainSample", "PolicyLogprobs", "ValueModel", "compute_advantages",
           "init_distributed", "DEFAULT_MICRO_BATCH_TOKENS"]

log = logging.getLogger(__name__)

#: Padded tokens per micro-batch (rows x (prompt + response columns)). SmolLM2-135M, fp32, CPU:
#: ~1 MB of activations per token without gradient checkpointing, on top of ~4.3 GB of weights,
#: gradients and Adam states of policy + critic: peak ~7 GB at 2048.
DEFAULT_MICRO_BATCH_TOKENS = 2048
CHECKPOINT_FORMAT = 1
_TAG = "state"


# ---------------------------------------------------------------------------------- plumbing
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(*, backend: str = "gloo", timeout_s: float | None = None) -> None:
    """The process group DeepSpeed trains in (it needs torch.distributed; no MPI).

    Already initialised (the data-parallel learner, espo_async/training/data_parallel.py, sets
    its group up first): nothing to do. Started by a launcher (``deepspeed``, ``torchrun``:
    ``WORLD_SIZE`` > 1 and ``RANK`` in the environment): joins that group through ``env://``,
    leaving RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK as the launcher set them
    (every rank must then call ``train_step`` with the same batch). Otherwise a one-process group
    (rank 0, world size 1)."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    skip_shm_comm_op()
    timeout = datetime.timedelta(seconds=float(timeout_s)) if timeout_s else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, init_method="env://", **({"timeout": timeout} if timeout else {}))
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its ``deepspeed_shm_comm`` C++ op
    (minutes on a fresh 2-core machine): it only serves DeepSpeed's *inference* all-reduce, which
    training never calls, at any world size. The backend treats an op marked incompatible as
    absent (``build_shm_op`` returns None); CUDA builds have no such op."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError):
        pass


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for good (config probabilities and nn.Dropout modules), so that train mode
    (needed by HF gradient checkpointing) computes the same function as eval mode."""
    cfgs = [m.config for m in model.modules() if hasattr(m, "config")]
    for cfg in cfgs:
        for key, value in list(vars(cfg).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(cfg, key, 0.0)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# ------------------------------------------------------------------------------------ modules
class PolicyLogprobs(nn.Module):
    """Wraps a HF causal LM: log-probs (and optionally entropies) of the response tokens.

    Inputs follow ``batch.pack_inputs`` (prompt ends at column P-1, L = P + T): the logits of
    the last T+1 columns are computed (``logits_to_keep``), the last one dropped, so column
    P-1+t predicts response token t. Only those positions go through the LM head.
    """

    def __init__(self, lm: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.lm = lm
        self.temperature = float(temperature) if temperature and temperature > 0 else 1.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                response_ids: torch.Tensor, with_entropy: bool = False):
        t = int(response_ids.shape[1])
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, logits_to_keep=t + 1)
        logits = out.logits[:, :-1].float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logp = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        ent = entropy_from_logits(logits) if with_entropy else None
        return logp, ent


class _Inputs:
    """Model inputs of a set of rows (a micro-batch), cut to their own P and T."""

    def __init__(self, samples: list[TrainSample], rows: list[int], pad_id: int, device: torch.device):
        ids, att, pos, p, t = pack_inputs([samples[r] for r in rows], pad_id=pad_id)
        self.rows = torch.tensor(rows, dtype=torch.int64)
        self.input_ids, self.attention_mask, self.position_ids = ids.to(device), att.to(device), pos.to(device)
        self.p, self.t = p, t

    def response_ids(self, resp: ResponseBatch, device) -> torch.Tensor:
        return resp.response_ids[self.rows, : self.t].to(device)


# ------------------------------------------------------------------------------------ trainer
class PPOTrainer:
    """See the module docstring. ``micro_batch_tokens`` bounds memory (padded tokens per forward);
    ``gradient_checkpointing`` trades compute for activation memory on large models."""

    def __init__(self, cfg: Config, policy_dir: str, critic_dir: str, *, critic_from_policy: bool,
                 work_dir: Path, device: str = "cpu", micro_batch_tokens: int | None = None,
                 gradient_checkpointing: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.algo = cfg.algo
        self.policy_dir = str(policy_dir)
        self.critic_dir = str(policy_dir if critic_from_policy else critic_dir)
        self.critic_from_policy = bool(critic_from_policy)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.model.dtype)
        self.micro_batch_tokens = int(micro_batch_tokens or DEFAULT_MICRO_BATCH_TOKENS)
        self.zero_stage = int(cfg.deepspeed.zero_stage)
        self.global_step = 0
        self.seed = int(cfg.run.seed)
        temperature = cfg.rollout.temperature

        import torch.distributed as dist

        init_distributed(backend="nccl" if self.device.type == "cuda" else "gloo",
                         timeout_s=cfg.deepspeed.timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.device.type == "cuda" and self.device.index is None and self.world_size > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # (set_device needs an index: plain "cuda" is the current one)
        # collectives of this class (gathers of the no-grad pass, metrics) run where the backend can
        self._comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        # world_size > 1 with a command loop (data_parallel.py): rank 0 tells the workers which
        # operation to run before it runs it itself (see _op); None on workers and with one rank
        self.commands = None
        self._op_lock = threading.RLock()
        self._op_depth = 0
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        with contextlib.suppress(Exception):
            from deepspeed.utils import logger as ds_logger

            ds_logger.setLevel(logging.WARNING)

        with quiet_loading():
            lm = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=self.dtype).to(self.device)
        lm.config.use_cache = False
        disable_dropout(lm)
        lm.eval()
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.vocab_size = int(lm.get_output_embeddings().weight.shape[0])
        self.pad_id = int(lm.config.pad_token_id if getattr(lm.config, "pad_token_id", None) is not None else 0)

        # the reference: a frozen copy of the initial policy, only when a KL penalty is used
        self.ref: PolicyLogprobs | None = None
        if self.algo.kl_coef > 0:
            ref_lm = copy.deepcopy(lm)
            ref_lm.requires_grad_(False)
            ref_lm.eval()
            self.ref = PolicyLogprobs(ref_lm, temperature).to(self.device)

        self.policy = PolicyLogprobs(lm, temperature)
        self.policy_engine = self._engine(self.policy, self.algo.lr, deepspeed, warmup=self.algo.lr_warmup_steps)

        # the critic: needed for GAE, and whenever a critic actor streams values (the stop rule)
        self.has_critic = self.algo.advantage == "gae" or cfg.actors.critic is not None
        self.critic: ValueModel | None = None
        self.critic_engine = None
        if self.has_critic:
            critic = ValueModel.from_pretrained(self.critic_dir, dtype=self.dtype, seed=self.seed).to(self.device)
            disable_dropout(critic)
            critic.eval()
            if gradient_checkpointing:
                critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.critic = critic
            self.critic_engine = self._engine(critic, self.algo.critic_lr, deepspeed)

    # -- setup helpers -------------------------------------------------------------------------
    def _ds_config(self, lr: float) -> dict[str, Any]:
        base: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(self.algo.max_grad_norm),
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.cfg.model.dtype == "bfloat16"},
            "fp16": {"enabled": False},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        out = _deep_merge(base, dict(self.cfg.deepspeed.extra))
        if "optimizer" in out:  # a DeepSpeed-built optimiser: keep each engine's own lr
            out["optimizer"] = _deep_merge(out["optimizer"], {"params": {"lr": float(lr)}})
        return out

    def _engine(self, module: nn.Module, lr: float, deepspeed, warmup: int = 0):
        """A DeepSpeed engine for ``module``. ``warmup`` > 0: the learning rate rises linearly to
        ``lr`` over that many optimiser steps (a LambdaLR that DeepSpeed steps with the optimiser
        and keeps in its checkpoints)."""
        ds_cfg = self._ds_config(lr)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in ds_cfg:
            optimizer = torch.optim.AdamW(params, lr=float(lr), betas=(0.9, 0.999), eps=float(self.algo.adam_eps),
                                          weight_decay=0.0)
        scheduler = None
        if warmup > 0 and "scheduler" not in ds_cfg:
            def scheduler(opt):
                return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
        engine, *_ = deepspeed.initialize(model=module, model_parameters=params if optimizer is None else None,
                                          optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
                                          dist_init_required=False)
        return engine

    @contextlib.contextmanager
    def _full_params(self, module: nn.Module):
        """Full (unpartitioned) parameters readable inside (ZeRO-3 gathers them)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    # -- data parallel (world_size > 1; with one rank every helper is the identity) ---------------
    # Every rank holds the whole batch (rank 0 broadcasts it, data_parallel.py) and computes the
    # same filtering, packing, advantages (GAE whitening and GRPO groups are batch-wide) and
    # minibatch order. Only model passes are split: each rank runs its share of the rows
    # (_shard), the no-grad pass is gathered back (_all_reduce of zero-filled tensors: every row
    # belongs to one rank), and each rank's loss is its rows' share of the *global* minibatch
    # loss (loss units counted over the whole minibatch) times world_size, because DeepSpeed
    # averages gradients over ranks: the averaged gradient is then exactly the gradient of the
    # one-rank loss. Metrics are summed over ranks (_sum_metrics), so every rank returns the
    # one-rank metrics (up to float rounding).
    @contextlib.contextmanager
    def _op(self, name: str, *, collective: bool = True, **payload):
        """One public operation. On rank 0 of a command loop it first tells the workers to run the
        same operation (``commands.send``) so that every rank enters the same collectives in the
        same order; ``collective=False``: the workers have no part in it (rank 0 alone). Nested
        operations and workers send nothing. A failure with several ranks breaks the group: it is
        re-raised as a ``DataParallelError`` naming the ranks' state."""
        with self._op_lock:
            self._op_depth += 1
            try:
                if self.commands is not None and self._op_depth == 1 and collective:
                    self.commands.send(name, payload)
                yield
            except Exception as exc:
                if self.commands is not None and self._op_depth == 1:
                    raise self.commands.broken(name, exc) from exc
                raise
            finally:
                self._op_depth -= 1

    def _all_reduce(self, t: torch.Tensor, *, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        x = t.to(self._comm_device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return x.to(t.device)

    def _barrier(self) -> None:
        self._all_reduce(torch.zeros(1))

    def _shard(self, rows, resp: ResponseBatch) -> list[int]:
        """This rank's rows: ``rows`` sorted by padded length, dealt round-robin (balanced tokens)."""
        rows = list(rows)
        if self.world_size == 1:
            return rows
        order = sorted(rows, key=lambda r: (int(resp.prompt_lengths[r]) + int(resp.lengths[r]), r))
        return order[self.rank::self.world_size]

    def _rank_plan(self, rows, resp: ResponseBatch) -> tuple[list[list[int] | None], list[int]]:
        """(this rank's micro-batches over its share of ``rows``, a dummy row). The plan is padded
        with ``None`` to as many micro-batches as the busiest rank has: ZeRO-3 gathers parameters
        in every forward and ZeRO-2 reduces gradients in every backward, both collectively, so
        every rank must make the same calls. A ``None`` entry runs the model on the dummy row (the
        shortest of ``rows``) and throws the result away (no-grad pass) or backpropagates zero."""
        rows = list(rows)
        mine = self._shard(rows, resp)
        plan: list[list[int] | None] = list(plan_micro_batches(mine, resp.prompt_lengths, resp.lengths,
                                                               max_tokens=self.micro_batch_tokens)) if mine else []
        dummy = [min(rows, key=lambda r: (int(resp.prompt_lengths[r]) + int(resp.lengths[r]), r))] if rows else []
        if self.world_size > 1:
            n = int(self._all_reduce(torch.tensor([len(plan)], dtype=torch.int64), op="max")[0])
            plan += [None] * (n - len(plan))
        return plan, dummy

    def _sum_metrics(self, st: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
        """Per-rank shares of minibatch metrics -> their sums over ranks (keys any rank had)."""
        if self.world_size == 1:
            return st
        extra = set(st) - set(keys)
        assert not extra, f"metrics {sorted(extra)} are not reduced over ranks"
        v = torch.tensor([st.get(k, 0.0) for k in keys] + [float(k in st) for k in keys], dtype=torch.float64)
        v = self._all_reduce(v)
        n = len(keys)
        return {k: float(v[i]) for i, k in enumerate(keys) if float(v[n + i]) > 0}

    def close(self) -> None:
        """With a command loop: stop the worker ranks (they exit) and wait for them. Idempotent;
        nothing to do with one rank."""
        if self.commands is not None:
            with self._op_lock:
                self.commands.close()

    # -- the step ------------------------------------------------------------------------------
    def train_step(self, samples: list[TrainSample], *, step: int, learner_version: int) -> dict[str, float]:
        """One PPO/GRPO step on ``samples`` (see the module docstring); returns float metrics.
        With several ranks every rank gets the whole batch and returns the same metrics."""
        with self._op("train_step", samples=samples, step=step, learner_version=learner_version):
            return self._train_step(samples, step=step, learner_version=learner_version)

    def _train_step(self, samples: list[TrainSample], *, step: int, learner_version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        algo = self.algo
        kept, n_empty, groups_dropped, samples_dropped = filter_samples(
            samples, r_fail=self.cfg.stop.r_fail, dynamic_sampling=algo.dynamic_sampling)
        metrics: dict[str, float] = {
            "n_samples": float(len(kept)),
            "n_skipped": float(n_empty),
            "groups_dropped": float(groups_dropped),
            "samples_dropped": float(samples_dropped),
        }
        self.global_step = int(step)
        if not kept:
            nan = float("nan")
            metrics.update(n_tokens=0.0, policy_loss=nan, value_loss=nan, critic_loss=nan,
                           step_seconds=time.perf_counter() - t0)
            return metrics

        resp = pack_responses(kept, default_version=learner_version)
        n_rows, t_max = resp.mask.shape
        old = self._rollout_pass(kept, resp)

        values = old["values"]
        zeros = torch.zeros(n_rows, t_max + 1)
        vals = values if values is not None else zeros
        adv = compute_advantages(vals[:, :t_max], vals.gather(1, resp.lengths[:, None])[:, 0], resp.mask,
                                 resp.endings, resp.task_rewards, resp.group_ids, algo=algo,
                                 r_fail=self.cfg.stop.r_fail, max_tokens=self.cfg.rollout.max_tokens)
        if self.cfg.rollout.window_tokens > 0:
            # T-PPO: rows are segments; the critic trains on complete responses only, with
            # Monte-Carlo returns, on its own schedule (training/tppo.py: train_critic_mc)
            adv.critic_mask = torch.zeros_like(adv.critic_mask)

        # truncated importance weights pi_old / pi_behaviour (stale or mismatched tokens)
        blp = resp.behaviour_logprobs
        finite = torch.isfinite(blp) & resp.mask
        log_w = torch.where(finite, old["logp"] - torch.nan_to_num(blp), torch.zeros_like(blp))
        is_w = None
        if algo.behaviour_is_cap is not None:
            is_w = torch.exp(log_w).clamp(max=float(algo.behaviour_is_cap))
            is_w = torch.where(resp.mask, is_w, torch.zeros_like(is_w))

        upd = self._update(kept, resp, old, adv, is_w)

        m = resp.mask
        pm = adv.policy_mask
        stale = (learner_version - resp.versions).to(torch.float64)
        metrics.update(upd)
        metrics.update(
            n_tokens=float(m.sum()),
            n_policy_tokens=float(pm.sum()),
            entropy=float(masked_mean(old["entropy"], m)),
            adv_mean=float(masked_mean(adv.raw_advantages, pm)),
            adv_std=float(_masked_std(adv.raw_advantages, pm)),
            reward_mean=float(adv.rewards.sum(-1).mean()),
            value_mean=float(masked_mean(vals[:, :t_max], m)) if values is not None else 0.0,
            return_mean=float(masked_mean(adv.returns, adv.critic_mask)),
            staleness_mean=float(masked_mean(stale, m)),
            staleness_max=float(stale[m].max()) if bool(m.any()) else 0.0,
            is_weight_mean=float(masked_mean(is_w, pm)) if is_w is not None else 1.0,
            is_weight_capped_frac=(float(masked_mean((torch.exp(log_w) > algo.behaviour_is_cap).float(), finite))
                                   if is_w is not None else 0.0),
            behaviour_logp_diff=float(masked_mean(log_w.abs(), finite)),
            mean_response_length=float(resp.lengths.float().mean()),
            step_seconds=time.perf_counter() - t0,
        )
        if "critic_loss" not in metrics:
            metrics["critic_loss"] = metrics["value_loss"] = float("nan")
        return {k: float(v) for k, v in metrics.items()}

    # -- step 2: no-grad pass ------------------------------------------------------------------
    def _rollout_pass(self, samples: list[TrainSample], resp: ResponseBatch, *,
                      policy: bool = True) -> dict[str, torch.Tensor | None]:
        """pi_old log-probs, entropies, values V(s_0..s_T) and reference log-probs of every row
        (``policy=False``: values only). With several ranks each computes its share of the rows
        and the results are gathered, so every rank returns the whole batch's tensors."""
        n_rows, t_max = resp.mask.shape
        logp = torch.zeros(n_rows, t_max)
        ent = torch.zeros(n_rows, t_max)
        values = torch.zeros(n_rows, t_max + 1) if self.critic_engine is not None else None
        ref = torch.zeros(n_rows, t_max) if self.ref is not None and policy else None
        plan, dummy = self._rank_plan(range(n_rows), resp)
        # engines: no_grad (DeepSpeed hooks may touch parameters); the frozen reference: inference_mode
        with torch.no_grad():
            for rows in plan:
                real = rows is not None
                x = _Inputs(samples, rows if real else dummy, self.pad_id, self.device)
                r_ids = x.response_ids(resp, self.device)
                if policy:
                    lp, en = self.policy_engine(x.input_ids, x.attention_mask, x.position_ids, r_ids, True)
                    if real:
                        logp[x.rows, : x.t] = lp.float().cpu()
                        ent[x.rows, : x.t] = en.float().cpu()
                if values is not None:
                    v = self.critic_engine(x.input_ids, x.attention_mask, x.position_ids)
                    if real:
                        values[x.rows, : x.t + 1] = v[:, x.p - 1:].float().cpu()
                if ref is not None and real:
                    with torch.inference_mode():
                        rlp, _ = self.ref(x.input_ids, x.attention_mask, x.position_ids, r_ids, False)
                        rlp = rlp.float().cpu()
                    ref[x.rows, : x.t] = rlp.clone()
        if self.world_size > 1:  # every row was computed by exactly one rank, zeros elsewhere
            logp, ent = self._all_reduce(logp), self._all_reduce(ent)
            values = self._all_reduce(values) if values is not None else None
            ref = self._all_reduce(ref) if ref is not None else None
        zero = lambda t: torch.where(resp.mask, t, torch.zeros_like(t))  # noqa: E731
        out = {"logp": zero(logp), "entropy": zero(ent), "values": values,
               "ref_logp": zero(ref) if ref is not None else None}
        return out

    # -- step 5: updates -------------------------------------------------------------------------
    def _update(self, samples, resp: ResponseBatch, old, adv: Advantages, is_w) -> dict[str, float]:
        algo = self.algo
        n_rows = resp.mask.shape[0]
        pg_kind = "entropy_is" if algo.policy_loss == "entropy_is" else algo.loss_agg
        aux_agg = "token" if algo.policy_loss == "entropy_is" else algo.loss_agg
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)

        # critic warm-up (algo.critic_warmup_steps): the critic learns the current policy's values
        # before they steer the policy; the policy is not updated meanwhile (its weights, version
        # and rollouts are unchanged, so every step of it is on-policy data for the critic)
        policy_frozen = self.critic_engine is not None and self.global_step <= algo.critic_warmup_steps

        def minibatch(rows: list[int]) -> dict[str, float]:
            out = {} if policy_frozen else self._policy_minibatch(samples, resp, old, adv, is_w, rows, pg_kind, aux_agg)
            if self.critic_engine is not None:
                out = {**out, **self._critic_minibatch(samples, resp, old, adv, rows)}
            return out

        out = self.run_minibatches(n_rows, gen, minibatch)
        if "policy_loss" not in out:
            out["policy_loss"] = float("nan")
        if "kl" not in out:
            out["kl"] = out.get("approx_kl", float("nan"))
        if "critic_loss" in out:
            out["value_loss"] = out["critic_loss"]
        return out

    def run_minibatches(self, n_rows: int, gen: torch.Generator, minibatch) -> dict[str, float]:
        """``algo.epochs`` passes over ``n_rows`` rows in ``algo.minibatches`` shuffled minibatches
        (``gen`` orders them); ``minibatch(rows)`` updates on the sorted row indices and returns its
        metrics. Returns each metric's mean over the minibatches."""
        algo = self.algo
        acc: dict[str, list[float]] = {}
        # HF gradient checkpointing only acts in train mode (dropout is off: the same function)
        self._set_train(self.gradient_checkpointing)
        try:
            for _epoch in range(algo.epochs):
                perm = torch.randperm(n_rows, generator=gen)
                for mb in torch.tensor_split(perm, min(algo.minibatches, n_rows)):
                    rows = sorted(mb.tolist())
                    if rows:
                        for k, v in minibatch(rows).items():
                            acc.setdefault(k, []).append(float(v))
        finally:
            self._set_train(False)
        return {k: float(np.mean(v)) for k, v in acc.items()}

    def train_critic_mc(self, samples: list[TrainSample]) -> dict[str, float]:
        """T-PPO windows (espo_async/training/tppo.py): one critic update on complete responses
        with Monte-Carlo returns: ``algo.epochs`` x ``algo.minibatches`` optimiser steps with the
        clipped value loss (clipped around the values before the update), micro-batched like every
        other pass. Returns float metrics (``critic_loss`` among them). With several ranks
        (data_parallel.py) every rank runs it on the same samples and takes its share of the rows,
        as in ``train_step``."""
        from espo_async.training.tppo import monte_carlo_returns

        with self._op("train_critic_mc", samples=samples):
            kept = [s for s in samples if len(s.response_ids) > 0 and len(s.prompt_ids) > 0]
            if not kept or self.critic_engine is None:
                return {"critic_rollouts": 0.0}
            algo = self.algo
            resp = pack_responses(kept)
            n_rows, t_max = resp.mask.shape
            values = self._rollout_pass(kept, resp, policy=False)["values"]
            boot = values.gather(1, resp.lengths[:, None])[:, 0]
            ret = monte_carlo_returns(values[:, :t_max], boot, resp.mask, resp.endings, resp.task_rewards,
                                      gamma=algo.gamma, r_fail=self.cfg.stop.r_fail, truncation=algo.truncation)
            ret = torch.where(resp.mask, ret, torch.zeros_like(ret)).to(torch.float32)
            targets = CriticTargets(returns=ret, critic_mask=resp.mask)
            old = {"values": values}
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step + 500_009)
            out = self.run_minibatches(n_rows, gen, lambda rows: self._critic_minibatch(kept, resp, old, targets, rows))
            out.update(
                critic_rollouts=float(n_rows),
                critic_tokens=float(resp.mask.sum()),
                critic_return_mean=float(masked_mean(ret, resp.mask)),
                critic_value_mean=float(masked_mean(values[:, :t_max], resp.mask)),
            )
            if "critic_loss" in out:
                out["value_loss"] = out["critic_loss"]
            return out

    def _set_train(self, mode: bool) -> None:
        self.policy.train(mode)
        if self.critic is not None:
            self.critic.train(mode)

    def _policy_minibatch(self, samples, resp, old, adv, is_w, rows, pg_kind, aux_agg) -> dict[str, float]:
        algo = self.algo
        eng = self.policy_engine
        r = torch.tensor(rows)
        pmask = adv.policy_mask[r]
        units = loss_units(pmask, pg_kind, top_frac=algo.entropy_is_top_frac)
        aux_units = loss_units(pmask, aux_agg)
        tok_units = max(int(pmask.sum()), 1)
        if units == 0:  # (counted over the whole minibatch: every rank takes the same branch)
            return {}
        plan, dummy = self._rank_plan(rows, resp)
        need_ent = algo.entropy_coef > 0
        st: dict[str, float] = {}
        for i, mrows in enumerate(plan):
            eng.set_gradient_accumulation_boundary(i == len(plan) - 1)
            if mrows is None:  # this rank has no rows left: a zero gradient keeps it in step
                x = _Inputs(samples, dummy, self.pad_id, self.device)
                logp, _ = eng(x.input_ids, x.attention_mask, x.position_ids, x.response_ids(resp, self.device), False)
                eng.backward(logp.sum() * 0.0)
                continue
            x = _Inputs(samples, mrows, self.pad_id, self.device)
            sl = (x.rows, slice(0, x.t))
            mask = adv.policy_mask[sl].to(self.device)
            logp, ent = eng(x.input_ids, x.attention_mask, x.position_ids, x.response_ids(resp, self.device), need_ent)
            old_lp = old["logp"][sl].to(self.device)
            a = adv.advantages[sl].to(self.device)
            w = is_w[sl].to(self.device) if is_w is not None else None
            if algo.policy_loss == "entropy_is":
                a_eff = a * w if w is not None else a
                pg, s = entropy_is_policy_loss(logp, old_lp, old["entropy"][sl].to(self.device), a_eff, mask,
                                               top_frac=algo.entropy_is_top_frac, alpha=algo.entropy_is_alpha,
                                               vocab_size=self.vocab_size)
            else:
                pg, s = ppo_policy_loss(logp, old_lp, a, mask, clip_low=algo.clip_low, clip_high=algo.clip_high,
                                        agg=algo.loss_agg, is_weights=w, clip_ratio_c=algo.clip_ratio_c)
            frac = loss_units(mask, pg_kind, top_frac=algo.entropy_is_top_frac) / units
            aux_frac = loss_units(mask, aux_agg) / max(aux_units, 1)
            loss = pg * frac
            if self.ref is not None:
                kl = aggregate(kl_penalty(logp, old["ref_logp"][sl].to(self.device), algo.kl_kind), mask, aux_agg)
                loss = loss + algo.kl_coef * aux_frac * kl
                st["kl"] = st.get("kl", 0.0) + aux_frac * float(kl.detach())
            if need_ent:
                e = aggregate(ent, mask, aux_agg)
                loss = loss - algo.entropy_coef * aux_frac * e
            eng.backward(loss * self.world_size if self.world_size > 1 else loss)  # DeepSpeed averages over ranks
            st["policy_loss"] = st.get("policy_loss", 0.0) + frac * float(pg.detach())
            tok_frac = int(mask.sum()) / tok_units
            for key in ("clipfrac", "approx_kl"):
                if key in s:
                    st[key] = st.get(key, 0.0) + tok_frac * s[key]
        st = self._sum_metrics(st, ("policy_loss", "kl", "clipfrac", "approx_kl"))
        st["grad_norm"] = self._step(eng)
        return st

    def _critic_minibatch(self, samples, resp, old, adv, rows) -> dict[str, float]:
        algo = self.algo
        eng = self.critic_engine
        r = torch.tensor(rows)
        units = int(adv.critic_mask[r].sum())
        if units == 0:
            return {}
        plan, dummy = self._rank_plan(rows, resp)
        st: dict[str, float] = {}
        for i, mrows in enumerate(plan):
            eng.set_gradient_accumulation_boundary(i == len(plan) - 1)
            if mrows is None:  # as in _policy_minibatch
                x = _Inputs(samples, dummy, self.pad_id, self.device)
                eng.backward(eng(x.input_ids, x.attention_mask, x.position_ids).sum() * 0.0)
                continue
            x = _Inputs(samples, mrows, self.pad_id, self.device)
            sl = (x.rows, slice(0, x.t))
            mask = adv.critic_mask[sl].to(self.device)
            v = eng(x.input_ids, x.attention_mask, x.position_ids)[:, x.p - 1: x.p - 1 + x.t]
            vl, s = value_loss(v, old["values"][sl].to(self.device), adv.returns[sl].to(self.device), mask,
                               clip=algo.value_clip, agg="token")
            frac = int(mask.sum()) / units
            eng.backward(vl * (algo.value_coef * frac * self.world_size))  # DeepSpeed averages over ranks
            st["critic_loss"] = st.get("critic_loss", 0.0) + frac * float(vl.detach())
            st["vf_clipfrac"] = st.get("vf_clipfrac", 0.0) + frac * s["vf_clipfrac"]
        st = self._sum_metrics(st, ("critic_loss", "vf_clipfrac"))
        st["critic_grad_norm"] = self._step(eng)
        return st

    def _step(self, eng) -> float:
        """Optimizer step at the accumulation boundary; returns the pre-clip gradient norm."""
        own = None
        if self.zero_stage == 0:
            grads = [p.grad.detach().float() for p in eng.module.parameters() if p.grad is not None]
            own = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        eng.step()
        gn = eng.get_global_grad_norm()
        if gn is None:
            return own if own is not None else float("nan")
        return float(gn)

    # -- weights -------------------------------------------------------------------------------
    # With several ranks only rank 0 writes files. Under ZeRO-3 the full weights exist only
    # inside GatheredParameters, a collective: every rank enters it (the workers then drop what
    # they gathered); under stages 0-2 every rank holds full weights and rank 0 writes alone
    # (``collective=False``: the workers are not told). DeepSpeed's save_checkpoint and
    # load_checkpoint are collective at every stage (each rank writes/reads its own ZeRO
    # partition of the optimiser states), so every rank takes part in those.
    def _policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's HF state dict (cloned out of the gather under ZeRO-3); {} on ranks > 0."""
        from espo_async.engines.weights import to_state_dict

        lm = self.policy.lm
        with self._full_params(lm):
            if self.rank != 0:
                return {}
            return {k: v.clone() for k, v in to_state_dict(lm).items()} if self.zero_stage == 3 else to_state_dict(lm)

    def save_policy_weights(self, path: Path, *, digest: bool = True, durable: bool = True) -> tuple[str, int]:
        """The policy as one safetensors file with HF parameter names (tied ``lm_head.weight``
        dropped), in the training dtype; atomic (see ``publish_safetensors``: the per-step weight
        sync passes ``digest=False, durable=False``). Returns (sha256 or "", nbytes); ("", 0) on
        ranks > 0, which write nothing."""
        from espo_async.engines.weights import publish_safetensors

        with self._op("save_policy_weights", collective=self.zero_stage == 3, path=str(path), digest=digest,
                      durable=durable):
            sd = self._policy_state_dict()
            if self.rank != 0:
                return "", 0
            return publish_safetensors(sd, path, durable=durable, digest=digest,
                                       metadata={"format": "pt", "step": str(self.global_step)})

    def policy_tensors(self) -> dict[str, torch.Tensor]:
        """The policy's tensors as ``save_policy_weights`` writes them (HF names, training dtype),
        copied (the next step changes the live ones), on the training device: what the collective
        weight transfer broadcasts (espo_async/weights/collective.py). {} on ranks > 0."""
        with self._op("policy_tensors", collective=self.zero_stage == 3):
            sd = self._policy_state_dict()
            if self.rank != 0:
                return {}
            return {k: v.detach().clone() for k, v in sd.items()}

    def save_critic_weights(self, path: Path, *, digest: bool = True, durable: bool = True) -> tuple[str, int]:
        """The value model (``backbone.*`` + ``head.*``, see value_model.py) as safetensors; atomic."""
        if self.critic is None:
            raise RuntimeError("this run has no critic (advantage 'grpo' and no critic actor)")
        from espo_async.engines.weights import publish_safetensors, to_state_dict

        with self._op("save_critic_weights", collective=self.zero_stage == 3, path=str(path), digest=digest,
                      durable=durable), self._full_params(self.critic):
            if self.rank != 0:
                return "", 0
            sd = to_state_dict(self.critic)
            if self.zero_stage == 3:
                sd = {k: v.clone() for k, v in sd.items()}
            return publish_safetensors(sd, path, durable=durable, digest=digest, metadata={
                "format": VALUE_FORMAT, "step": str(self.global_step),
                "hidden_size": str(self.critic.config.hidden_size)})

    def export_hf(self, dir: Path) -> None:  # noqa: A002 - the brief's name
        """The current policy as a HF checkpoint directory (config, generation config, tokenizer,
        safetensors) loadable by transformers and vLLM; written atomically (by rank 0)."""
        from transformers import AutoTokenizer

        with self._op("export_hf", collective=self.zero_stage == 3, dir=str(dir)):
            if self.rank != 0:
                self._policy_state_dict()  # ZeRO-3: its part of the gather
                return
            lm = self.policy.lm
            with atomic_dir(Path(dir)) as tmp:
                sd = self._policy_state_dict()
                lm.save_pretrained(tmp, state_dict=sd)
                with quiet_loading():
                    AutoTokenizer.from_pretrained(self.policy_dir).save_pretrained(tmp)
                src_gen = Path(self.policy_dir) / "generation_config.json"
                if src_gen.is_file() and not (tmp / "generation_config.json").is_file():
                    shutil.copy2(src_gen, tmp / "generation_config.json")

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, dir: Path, extra: dict | None = None) -> None:  # noqa: A002
        """Both DeepSpeed engines (module, optimiser, lr scheduler), step counter, RNG states,
        the reference weights (if any) and an optional JSON-able ``extra``; atomic swap. With
        several ranks: called on rank 0, every rank writes its ZeRO partitions into rank 0's
        temporary folder (which must be on storage all ranks see: one host, or shared)."""
        if self.rank != 0:
            raise RuntimeError("save_checkpoint is called on rank 0 (the workers run write_checkpoint)")
        with self._op_lock, atomic_dir(Path(dir)) as tmp:
            with self._op("write_checkpoint", dir=str(tmp)):
                self.write_checkpoint(tmp, extra)

    def write_checkpoint(self, dir: Path, extra: dict | None = None) -> None:  # noqa: A002
        """The checkpoint's files into an existing folder (every rank; ``save_checkpoint`` swaps it in)."""
        from safetensors.torch import save_file

        tmp = Path(dir)
        client = {"global_step": self.global_step}
        self.policy_engine.save_checkpoint(str(tmp / "policy"), tag=_TAG, client_state=client)
        if self.critic_engine is not None:
            self.critic_engine.save_checkpoint(str(tmp / "critic"), tag=_TAG, client_state=client)
        if self.world_size > 1:
            self._barrier()  # every rank's partition is written before rank 0 swaps the folder in
        if self.rank != 0:
            return
        if self.ref is not None:
            save_file({k: v.contiguous() for k, v in self.ref.lm.state_dict().items()
                       if not (k == "lm_head.weight" and self.ref.lm.config.tie_word_embeddings)},
                      str(tmp / "reference.safetensors"))
        torch.save({
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }, tmp / "rng_state.pt")
        state = {
            "format": CHECKPOINT_FORMAT,
            "global_step": self.global_step,
            "has_critic": self.critic_engine is not None,
            "has_reference": self.ref is not None,
            "zero_stage": self.zero_stage,
            "world_size": self.world_size,
            "dtype": self.cfg.model.dtype,
            "extra": extra,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

    def load_checkpoint(self, dir: Path) -> dict | None:  # noqa: A002
        """Restore a ``save_checkpoint`` directory (every rank); returns the ``extra`` it was saved with."""
        with self._op("load_checkpoint", dir=str(dir)):
            return self._load_checkpoint(Path(dir))

    def _load_checkpoint(self, d: Path) -> dict | None:
        from safetensors.torch import load_file

        state = json.loads((d / "trainer_state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{d}: unsupported trainer checkpoint format {state.get('format')}")
        saved_ranks = int(state.get("world_size", 1))
        if saved_ranks != self.world_size and int(state.get("zero_stage", 0)) > 0:
            raise ValueError(
                f"{d}: saved by {saved_ranks} rank(s) with ZeRO stage {state.get('zero_stage')}, this learner has "
                f"{self.world_size}: DeepSpeed keeps one optimiser partition per rank and cannot load them into "
                "another number of ranks (resume with the same deepspeed.world_size)")
        path, _ = self.policy_engine.load_checkpoint(str(d / "policy"), tag=_TAG)
        if path is None:
            raise FileNotFoundError(f"{d / 'policy'}: no DeepSpeed checkpoint")
        if self.critic_engine is not None:
            if not state.get("has_critic"):
                raise ValueError(f"{d}: the checkpoint has no critic but this trainer has one")
            path, _ = self.critic_engine.load_checkpoint(str(d / "critic"), tag=_TAG)
            if path is None:
                raise FileNotFoundError(f"{d / 'critic'}: no DeepSpeed checkpoint")
        if self.ref is not None and (d / "reference.safetensors").is_file():
            self.ref.lm.load_state_dict(load_file(str(d / "reference.safetensors")), strict=False)
        rng = torch.load(d / "rng_state.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.global_step = int(state["global_step"])
        return state.get("extra")


def _masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    if int(m.sum()) < 2:
        return torch.zeros(())
    mean = masked_mean(x, m)
    return torch.sqrt(masked_mean((x - mean) ** 2, m))

