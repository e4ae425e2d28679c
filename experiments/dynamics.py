"""How a run's training went, window by window: does the policy learn, drift or collapse?

    python experiments/dynamics.py runs/evidence-long-240 --methods espo ppo --seeds 0 2 \
        --window 20 --match-step 100 --out docs/results/long240/dynamics.json

For each ``RUN/<method>/seed-<s>`` run folder (experiments/evidence.py's layout): from its
metrics.jsonl, per window of ``--window`` learner steps, the training accuracy, mean response
length, the share of rollouts cut at T_max (``truncated_rate``), per-token entropy and the stop
rate; from eval.jsonl, held-out accuracy with its standard error at every evaluation. And the
cumulative rollout tokens of each method at ``--match-step`` (a step before any collapse), divided
by the first method's: token counts after a collapse compare a rambling policy, not a stop rule.
With ``--eos``, also from learner/trajectories.log (every trained rollout): per window of policy
versions, the probability the policy gave the EOS it sampled, in right and in wrong rollouts
that ended with EOS (does the end of an answer lose probability before rollouts stop ending?).
With ``--slips``, per window of versions: how often a sampled token was not the policy's top-1,
in right and wrong rollouts (do wrong answers come from sampling the low-probability tail?).
Prints the tables and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from espo_async.utils import read_jsonl, write_json

COLUMNS = ("accuracy", "mean_length", "truncated_rate", "entropy", "stop_rate")


def scored_rollouts(run_dir: Path) -> list:
    """Every trained rollout of a run (learner/trajectories.log), with whether its answer is right
    under the run's own task: (trajectory, right) pairs."""
    from espo_async.config import load_config
    from espo_async.runtime.trajectory_log import replay
    from espo_async.tasks.registry import make_task
    from espo_async.tasks.reward import TaskReward

    cfg = load_config(run_dir / "config.yaml")
    reward = TaskReward(make_task(cfg.task.name, **cfg.task.options))
    return [(t, reward(t.prompt_id, t.text) == 1.0) for t in replay(run_dir / "learner" / "trajectories.log")
            if t.purpose == "train"]


def start_model_eos(run_dir: Path) -> int:
    """The EOS token id of the run's start model (assets.json's policy_dir)."""
    from transformers import AutoTokenizer

    from espo_async.assets import load_assets

    return int(AutoTokenizer.from_pretrained(load_assets(run_dir).policy_dir).eos_token_id)


def _by_version(rollouts, width: int) -> dict[int, list]:
    """The non-empty rollouts grouped by window of ``width`` policy versions (a rollout's newest)."""
    out: dict[int, list] = {}
    for t, right in rollouts:
        if len(t.token_ids):
            out.setdefault(int(max(t.versions)) // width, []).append((t, right))
    return dict(sorted(out.items()))


def eos_windows(rollouts, eos: int, width: int) -> list[dict]:
    """Per window of ``width`` policy versions, over the ``rollouts`` (scored_rollouts) that ended
    with ``eos``: how many were right and wrong, and the mean probability of the sampled EOS in
    each (exp of its behaviour log-prob)."""
    out = []
    for k, group in _by_version(rollouts, width).items():
        p = {True: [], False: []}
        for t, right in group:
            if int(t.token_ids[-1]) == eos:
                p[right].append(math.exp(float(t.logprobs[-1])))
        out.append({"first_version": k * width, "rollouts": len(group),
                    "ended_with_eos": (len(p[True]) + len(p[False])) / len(group),
                    "right": len(p[True]), "p_eos_right": sum(p[True]) / len(p[True]) if p[True] else None,
                    "wrong": len(p[False]), "p_eos_wrong": sum(p[False]) / len(p[False]) if p[False] else None})
    return out


def slip_windows(rollouts, width: int, margin: float = 1e-3) -> list[dict]:
    """Per window of ``width`` policy versions of the ``rollouts`` (scored_rollouts): how often a
    sampled token was not the policy's most likely one (its log-prob below the streamed top-1
    log-prob by more than ``margin``), per token over every kept token (a stopped rollout's up to
    its stop) and per right and wrong rollout among those not stopped, and the mean probability of
    those tokens. If wrong rollouts nearly all hold such a token and right ones seldom do, the
    policy fails by sampling its low-probability tail ("slips"), which greedy decoding would
    avoid; the per-token rate is what RL has to push down."""
    import numpy as np

    out = []
    for k, group in _by_version(rollouts, width).items():
        tokens = off = 0
        with_slip = {True: 0, False: 0}
        n = {True: 0, False: 0}
        p_off: list[float] = []
        for t, right in group:
            lp = np.asarray(t.logprobs, dtype=float)
            slip = lp < np.asarray(t.top1_logprobs, dtype=float) - margin
            tokens += len(lp)
            off += int(slip.sum())
            p_off.extend(np.exp(lp[slip]).tolist())
            if t.ending == "absorbed":
                continue  # no answer to score
            n[right] += 1
            with_slip[right] += bool(slip.any())
        out.append({"first_version": k * width, "rollouts": n[True] + n[False],
                    "off_top1_per_token": off / tokens if tokens else None,
                    "p_off_top1_mean": float(np.mean(p_off)) if p_off else None,
                    "right": n[True], "right_with_slip": with_slip[True] / n[True] if n[True] else None,
                    "wrong": n[False], "wrong_with_slip": with_slip[False] / n[False] if n[False] else None})
    return out


def windows(metrics: list[dict], width: int) -> list[dict]:
    """Means of COLUMNS over consecutive windows of ``width`` learner steps."""
    out = []
    for i in range(0, len(metrics), width):
        rows = metrics[i : i + width]
        row = {"first_step": rows[0]["step"], "last_step": rows[-1]["step"]}
        for key in COLUMNS:
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            row[key] = sum(values) / len(values) if values else None
        out.append(row)
    return out


def tokens_at(metrics: list[dict], step: int) -> float | None:
    """Cumulative rollout tokens after learner step ``step`` (None if the run is shorter)."""
    for row in metrics:
        if row["step"] >= step:
            return float(row["cumulative_tokens"])
    return None


def analyse(run_dir: Path, width: int, match_step: int, eos: bool = False, slips: bool = False) -> dict:
    metrics = sorted(read_jsonl(run_dir / "metrics.jsonl"), key=lambda r: r["step"])
    evals = sorted(read_jsonl(run_dir / "eval.jsonl"), key=lambda r: r["step"])
    if not metrics:
        raise SystemExit(f"{run_dir}: no metrics.jsonl rows")
    rollouts = scored_rollouts(run_dir) if eos or slips else []  # one pass over the trajectory log
    return {
        "run": str(run_dir),
        "windows": windows(metrics, width),
        **({"eos": eos_windows(rollouts, start_model_eos(run_dir), width)} if eos else {}),
        **({"slips": slip_windows(rollouts, width)} if slips else {}),
        "eval": [{"step": e["step"], "accuracy": e["accuracy"], "se": e.get("accuracy_se")} for e in evals],
        "tokens_at_match_step": tokens_at(metrics, match_step),
        "tokens_total": float(metrics[-1]["cumulative_tokens"]),
    }


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="the sweep's --out folder (RUN/<method>/seed-<s>)")
    ap.add_argument("--methods", nargs="+", default=["espo", "ppo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--window", type=int, default=20, help="learner steps per window")
    ap.add_argument("--match-step", type=int, default=100, help="compare cumulative tokens at this step")
    ap.add_argument("--eos", action="store_true", help="also the sampled EOS's probability per window (reads "
                    "learner/trajectories.log: slower)")
    ap.add_argument("--slips", action="store_true", help="also how often sampled tokens were not the policy's "
                    "top-1, in right and wrong rollouts (reads learner/trajectories.log: slower)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    a = ap.parse_args(argv)
    if a.window < 1 or a.match_step < 1:
        ap.error("--window and --match-step must be at least 1")

    result: dict = {"window": a.window, "match_step": a.match_step, "runs": {}}
    for method in a.methods:
        for seed in a.seeds:
            run_dir = a.root / method / f"seed-{seed}"
            if not (run_dir / "metrics.jsonl").is_file():
                print(f"{run_dir}: no metrics.jsonl, skipped")
                continue
            r = result["runs"].setdefault(method, {})[str(seed)] = analyse(run_dir, a.window, a.match_step, a.eos, a.slips)
            print(f"\n{method} seed {seed}: held-out "
                  + ", ".join(f"{e['step']}: {e['accuracy']:.3f} ± {_f(e['se'])}" for e in r["eval"]))
            print("steps      " + "  ".join(f"{c:>14}" for c in COLUMNS))
            for w in r["windows"]:
                print(f"{w['first_step']:>4}-{w['last_step']:<4} " + "  ".join(f"{_f(w[c]):>14}" for c in COLUMNS))
            for w in r.get("eos", []):
                print(f"  versions {w['first_version']:>4}+: ended with EOS {w['ended_with_eos']:.3f}; p(EOS) "
                      f"right {_f(w['p_eos_right'], 4)} ({w['right']}), wrong {_f(w['p_eos_wrong'], 4)} ({w['wrong']})")
            for w in r.get("slips", []):
                print(f"  versions {w['first_version']:>4}+: off-top-1 tokens {_f(w['off_top1_per_token'], 4)} "
                      f"(mean p {_f(w['p_off_top1_mean'])}); rollouts with one: right {_f(w['right_with_slip'])} "
                      f"({w['right']}), wrong {_f(w['wrong_with_slip'])} ({w['wrong']})")
    ratios: dict = {}
    base = a.methods[0]
    for method, per_seed in result["runs"].items():
        for seed, r in per_seed.items():
            ref = result["runs"].get(base, {}).get(seed, {}).get("tokens_at_match_step")
            if ref and r["tokens_at_match_step"]:
                ratios.setdefault(method, {})[seed] = r["tokens_at_match_step"] / ref
    result["tokens_vs_first_method_at_match_step"] = ratios
    print(f"\ncumulative rollout tokens at step {a.match_step}, relative to {base}: {json.dumps(ratios)}")
    if a.out:
        print(f"written: {write_json(a.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
