"""How well does the surrogate regret separate failing rollouts from correct ones in a run?

    python bench/stop_signal.py RUN_DIR [--out bench/results/stop_signal.json]

Reads every trajectory the learner received (RUN_DIR/learner/trajectories.log), scores it with
the run's task, normalises the regret with the batch statistics of the whole run, and replays
the smoothed regret z_t (the pure core's ``smoothed_regret``) for several smoothing factors
alpha_s and thresholds (the value gate beta*max(V, eps) is replaced by a constant threshold, so
this measures the regret signal alone). For each: the fraction of wrong and of correct rollouts
on which z would cross the threshold, and where (as a fraction of the rollout's length).
Also: regret percentiles and high-regret spikes per rollout, correct vs wrong.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from espo_async.tasks.reward import TaskReward
from espo_async.config import parse_config
from espo_async.core import smoothed_regret, surrogate_regret
from espo_async.runtime.trajectory_log import replay
from espo_async.tasks.registry import make_task

ALPHAS = (0.9, 0.7, 0.5, 0.3)
THRESHOLDS = (1.4, 2.0, 3.0)


def analyse(run_dir: Path, c: float, delta: float) -> dict:
    cfg = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    reward = TaskReward(make_task(cfg.task.name, **cfg.task.options))
    trajs = [t for t in replay(run_dir / "learner" / "trajectories.log") if len(t.token_ids)]
    regrets = [
        surrogate_regret(torch.tensor(t.logprobs, dtype=torch.float64), torch.tensor(t.top1_logprobs, dtype=torch.float64))
        for t in trajs
    ]
    correct = [reward(t.prompt_id, t.text) == 1.0 for t in trajs]
    g_all = torch.cat(regrets)
    mu, var = float(g_all.mean()), float(g_all.var(unbiased=False))
    spike = mu + 3 * var**0.5
    out = {
        "run": str(run_dir),
        "n_rollouts": len(trajs),
        "n_wrong": int(len(trajs) - sum(correct)),
        "regret": {"mean": mu, "var": var, **{f"p{q}": float(np.percentile(g_all, q)) for q in (50, 90, 99)}},
        "mean_length": {
            "correct": float(np.mean([len(g) for g, ok in zip(regrets, correct) if ok] or [np.nan])),
            "wrong": float(np.mean([len(g) for g, ok in zip(regrets, correct) if not ok] or [np.nan])),
        },
        "spikes_per_rollout": {
            "correct": float(np.mean([int((g > spike).sum()) for g, ok in zip(regrets, correct) if ok] or [np.nan])),
            "wrong": float(np.mean([int((g > spike).sum()) for g, ok in zip(regrets, correct) if not ok] or [np.nan])),
        },
        "replay": [],
    }
    for a_s in ALPHAS:
        zs = [smoothed_regret(g, mu=mu, var=var, c=c, delta=delta, alpha_s=a_s) for g in regrets]
        for thr in THRESHOLDS:
            fired = [(z > thr).nonzero() for z in zs]
            first = [int(f[0]) / len(z) if len(f) else None for f, z in zip(fired, zs)]
            wrong = [f for f, ok in zip(first, correct) if not ok]
            right = [f for f, ok in zip(first, correct) if ok]
            hits = [f for f in wrong if f is not None]
            out["replay"].append(
                {
                    "alpha_s": a_s,
                    "threshold": thr,
                    "fire_rate_wrong": len(hits) / max(len(wrong), 1),
                    "fire_rate_correct": sum(f is not None for f in right) / max(len(right), 1),
                    "stop_position_wrong": float(np.mean(hits)) if hits else None,
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--c", type=float, default=5.0)
    ap.add_argument("--delta", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=Path("bench/results/stop_signal.json"))
    args = ap.parse_args()
    res = analyse(args.run_dir, args.c, args.delta)
    print(f"{res['n_rollouts']} rollouts, {res['n_wrong']} wrong; regret mean {res['regret']['mean']:.3f} var {res['regret']['var']:.3f}")
    print(f"mean length: correct {res['mean_length']['correct']:.1f}, wrong {res['mean_length']['wrong']:.1f}")
    print(f"regret spikes (> mean + 3 sd) per rollout: correct {res['spikes_per_rollout']['correct']:.2f}, wrong {res['spikes_per_rollout']['wrong']:.2f}")
    print(f"{'alpha_s':>7} {'thr':>5} {'fires|wrong':>11} {'fires|correct':>13} {'stop at (frac)':>14}")
    for r in res["replay"]:
        pos = "-" if r["stop_position_wrong"] is None else f"{r['stop_position_wrong']:.2f}"
        print(f"{r['alpha_s']:7.1f} {r['threshold']:5.1f} {r['fire_rate_wrong']:11.3f} {r['fire_rate_correct']:13.3f} {pos:>14}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
