"""Peer: samples per second and seconds per PPO step, espo-async against TRL's PPO trainer, on
the same model, task, batch size and generation length, on CPU.

    python bench/peer_trl.py --trl-python /tmp/trl-venv/bin/python          # full: 10 steps each
    python bench/peer_trl.py --trl-python /tmp/trl-venv/bin/python --quick  # 2 steps each

TRL is not a dependency of the project. The last TRL release with a PPO trainer is 1.12.0
(``trl.experimental.ppo``; 1.13 removed PPO); it runs with the project's transformers 5.19 and
torch 2.13. Install it in a throwaway venv that sees the project's packages (docs/performance.md):

    python3.11 -m venv /tmp/trl-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/trl-venv/lib/python3.11/site-packages/espo.pth
    pip freeze --exclude-editable > /tmp/espo-constraints.txt   # with .venv active
    /tmp/trl-venv/bin/pip install trl==1.12.0 datasets -c /tmp/espo-constraints.txt

Both sides, one invocation (order: espo, trl):

* **espo-async**: configs/short-chain.yaml (vLLM sampler on core 0; critic, stopper, coordinator,
  DeepSpeed learner on core 1; 8 prompts x 8 samples = 64 rollouts per step, 64 tokens max, the
  embedded tiny model after its supervised warm-up, ESPO stopping on), evaluation rounds off.
  s/step = median gap between consecutive ``step_end_time``s (steady state, step 2 onwards);
  samples/s = 64 / that.
* **TRL**: ``trl.experimental.ppo.PPOTrainer`` on the same checkpoint (policy, a reference copy,
  and a value model = ``AutoModelForSequenceClassification`` of the same checkpoint with a fresh
  1-output head), the same task prompts, 64 rollouts per step (``per_device_train_batch_size``
  64, 1 mini-batch, 1 PPO epoch, as espo-async's ``algo`` defaults), ``response_length`` 64,
  temperature 1, EOS stop, the same learning rates; CPU, torch on both cores. TRL's PPO scores
  with a reward *model*; here the reward model is a stub whose score is the task's verifier on
  the decoded response (``get_reward`` is patched for that one module; the value model goes
  through TRL's own code). s/step = median gap between consecutive ``on_step_end`` callbacks
  (step 2 onwards); samples/s = 64 / that.

ratio = espo samples/s / TRL samples/s (target >= 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common as C

NAME = "peer_trl"


# ------------------------------------------------------------------------------------ TRL side
def trl_worker(spec_path: Path) -> None:
    """Runs inside the TRL venv."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from espo_async.tasks.reward import TaskReward
    from espo_async.tasks.registry import make_task

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    policy_dir = spec["policy_dir"]
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    task = make_task(spec["task"], **spec["task_options"])
    reward = TaskReward(task)
    problems = task.train_problems()[: spec["n_prompts"]]
    prompt_of = {}
    rows = []
    for p in problems:
        text = task.format_prompt(p)
        ids = tok.encode(text, add_special_tokens=True)
        prompt_of[tuple(ids)] = p.id
        rows.append({"input_ids": ids})
    dataset = Dataset.from_list(rows)

    class TaskRewardStub(torch.nn.Module):
        """Stands for TRL's reward model: the task verifier on the decoded response."""

        base_model_prefix = "stub"

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    stub = TaskRewardStub()
    original_get_reward = ppo_mod.get_reward
    n_scored = [0, 0.0]

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is not stub:
            return original_get_reward(model, query_responses, pad_token_id, context_length)
        scores = []
        for row in query_responses.tolist():
            q = [t for t in row[:context_length] if t != pad_token_id]
            r = [t for t in row[context_length:] if t != pad_token_id]
            pid = prompt_of.get(tuple(q))
            s = reward(pid, tok.decode(r, skip_special_tokens=True)) if pid is not None else 0.0
            scores.append(s)
        n_scored[0] += len(scores)
        n_scored[1] += sum(scores)
        score = torch.tensor(scores, dtype=torch.float32)
        return None, score, None

    ppo_mod.get_reward = get_reward

    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    for m in (policy, ref):
        m.generation_config.pad_token_id = tok.pad_token_id
    value.config.pad_token_id = tok.pad_token_id

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.time())

    steps, batch = spec["steps"], spec["batch"]
    cfg = PPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=1, total_episodes=batch * steps, response_length=spec["max_tokens"],
        temperature=spec["temperature"], stop_token="eos", learning_rate=spec["lr"],
        local_rollout_forward_batch_size=batch, num_sample_generations=0, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
        missing_eos_penalty=None, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=1.0,
    )
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=stub,
                         train_dataset=dataset, value_model=value, callbacks=[Clock()])
    t0 = time.time()
    trainer.train()
    t1 = time.time()
    out = {"trl_version": trl.__version__, "torch_threads": torch.get_num_threads(), "t_train": t1 - t0,
           "callback_times": times, "scored": n_scored[0], "mean_score": n_scored[1] / max(n_scored[0], 1),
           "log_history": trainer.state.log_history}
    Path(str(spec_path) + ".out").write_text(json.dumps(out, default=str))


def run_trl(args, policy_dir: str, cfg, steps: int) -> dict:
    job = C.run_dir_for("trl", False)
    batch = cfg.rollout.prompts_per_batch * cfg.rollout.samples_per_prompt
    spec = {"policy_dir": policy_dir, "task": cfg.task.name, "task_options": cfg.task.options, "steps": steps,
            "batch": batch, "max_tokens": cfg.rollout.max_tokens, "temperature": cfg.rollout.temperature,
            "lr": cfg.algo.lr, "threads": args.trl_threads, "n_prompts": batch * steps * 2,
            "output_dir": str(job / "out")}
    (job / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(C.REPO), OMP_NUM_THREADS=str(args.trl_threads), TRL_EXPERIMENTAL_SILENCE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    proc = subprocess.run([args.trl_python, str(Path(__file__).resolve()), "--trl-worker", str(job / "spec.json")],
                          env=env, cwd=C.REPO, capture_output=True, text=True, timeout=7200)
    out = job / "spec.json.out"
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"TRL worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    C.remove_run(job, False)
    ts = res["callback_times"]
    gaps = np.diff(ts)  # gaps[0]: train begin -> step 1 end
    res.update(batch=batch, steps=len(ts) - 1, step_gaps_s=[float(g) for g in gaps],
               s_per_step=float(np.median(gaps[1:])) if len(gaps) > 1 else float(gaps[0]),
               first_step_s=float(gaps[0]))
    res["samples_per_s"] = batch / res["s_per_step"]
    return res


# ------------------------------------------------------------------------------------ espo side
async def run_espo(args, steps: int) -> tuple[dict, str, object]:
    import async_vs_sync as A

    cfg = C.bench_config(A.overrides(steps, False) + args.set)
    run_dir = C.run_dir_for("peer-espo", args.keep)
    run = await C.run_system(cfg, run_dir)
    res = A.analyse(run_dir, run, steps)
    from espo_async.assets import load_assets

    policy_dir = load_assets(run_dir).policy_dir
    C.remove_run(run_dir, args.keep)
    batch = cfg.rollout.prompts_per_batch * cfg.rollout.samples_per_prompt
    res.update(batch=batch, s_per_step=res["s_per_step_steady"], samples_per_s=batch / res["s_per_step_steady"])
    return res, policy_dir, cfg


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="training steps per side (default 10, quick 2)")
    ap.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", "/tmp/trl-venv/bin/python"),
                    help="python of a venv with trl==1.12.0 (see the module docstring)")
    ap.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    meta = C.begin(args)
    steps = args.steps or (3 if args.quick else 10)
    print(f"[{NAME}] espo-async ... (load {C.loadavg()})", file=sys.stderr, flush=True)
    espo, policy_dir, cfg = asyncio.run(run_espo(args, steps))
    espo["loadavg"] = C.loadavg()
    print(f"[{NAME}] TRL PPO ... (load {C.loadavg()})", file=sys.stderr, flush=True)
    trl = run_trl(args, policy_dir, cfg, steps)
    trl["loadavg"] = C.loadavg()
    rows = [{"system": "espo-async", "batch": espo["batch"], "steps": espo["steps"], "s_per_step": espo["s_per_step"],
             "samples_per_s": espo["samples_per_s"], "load": espo["loadavg"]},
            {"system": f"TRL {trl['trl_version']} PPOTrainer", "batch": trl["batch"], "steps": trl["steps"],
             "s_per_step": trl["s_per_step"], "samples_per_s": trl["samples_per_s"], "load": trl["loadavg"]}]
    C.print_table(rows, [("system", "system", ""), ("batch", "rollouts/step", "d"), ("steps", "steps", "d"),
                         ("s_per_step", "s/step", ".2f"), ("samples_per_s", "samples/s", ".1f"), ("load", "load", "")])
    ratio = espo["samples_per_s"] / trl["samples_per_s"]
    print(f"espo-async / TRL PPO: {ratio:.2f}x samples/s (target >= 3)")
    trl.pop("log_history", None) if not args.keep else None
    C.finish(NAME, args, {"espo": espo, "trl": trl, "ratio": ratio, "target": 3.0, "policy_dir": policy_dir}, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
