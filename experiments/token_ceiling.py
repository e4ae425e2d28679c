"""How many rollout tokens could early stopping save on this task at most?

    python experiments/token_ceiling.py runs/evidence/ppo/seed-0 runs/evidence/espo/seed-0

For each run folder: every training trajectory the learner received (learner/trajectories.log),
scored with the run's task. A stop can only save tokens of rollouts that fail, and only those
generated after the stop, so the share of all tokens that sit in wrong rollouts is a hard upper
bound of the saving (reached only by stopping every wrong rollout at its first token). Also: how
long wrong and correct rollouts are, and for a run with stopping, how many rollouts were absorbed
and at what length.

What stops saved, within one run with stopping: an absorbed rollout would have run as long as
the run's unstopped rollouts do on average (L), and it cost g tokens (the engine's tokens up to
the cancel, those after the stop included). With a stop rate s the share of tokens saved is about
s * (1 - g / L): the beta controller holds s near tau (paper: 0.25), so at tau = 0.25 no saving
above 25% is possible unless the stopped rollouts would have been longer than the others (as in
the paper's 8K-token reasoning, where wrong answers run long).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.dynamics import scored_rollouts  # noqa: E402


def stop_saving(generated: np.ndarray, absorbed: np.ndarray) -> dict:
    """The share of rollout tokens the stops saved: ``generated[i]`` tokens the engine produced for
    rollout i, ``absorbed[i]`` whether it was stopped. The counterfactual length of a stopped
    rollout is the mean of the unstopped ones (the learner's ``tokens_saved_est`` does the same)."""
    generated = np.asarray(generated, dtype=float)
    absorbed = np.asarray(absorbed, dtype=bool)
    if not absorbed.any() or absorbed.all():
        return {"stop_rate": float(absorbed.mean()) if len(absorbed) else 0.0, "saved_share": None}
    counterfactual = float(generated[~absorbed].mean())
    saved = float(np.maximum(counterfactual - generated[absorbed], 0.0).sum())
    return {
        "stop_rate": float(absorbed.mean()),
        "mean_generated_absorbed": float(generated[absorbed].mean()),
        "counterfactual_length": counterfactual,
        "saved_share": saved / (float(generated.sum()) + saved),
    }


def analyse(run_dir: Path) -> dict:
    scored = scored_rollouts(run_dir)
    if not scored:
        raise SystemExit(f"{run_dir}: no training trajectories in learner/trajectories.log")
    trajs = [t for t, _ in scored]
    ok = np.array([right for _, right in scored])
    length = np.array([len(t.token_ids) for t in trajs], dtype=float)
    absorbed = np.array([t.ending == "absorbed" for t in trajs])
    generated = np.array([t.tokens_generated for t in trajs], dtype=float)
    return {
        "run": str(run_dir),
        "rollouts": len(trajs),
        "wrong_fraction": float(1 - ok.mean()),
        "tokens": int(length.sum()),
        "token_share_of_wrong_rollouts": float(length[~ok].sum() / length.sum()),
        "mean_length_correct": float(length[ok].mean()) if ok.any() else None,
        "mean_length_wrong": float(length[~ok].mean()) if (~ok).any() else None,
        "absorbed_fraction": float(absorbed.mean()),
        "mean_length_absorbed": float(length[absorbed].mean()) if absorbed.any() else None,
        "stops": stop_saving(generated, absorbed),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows = [analyse(r) for r in args.runs]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'run':40s} {'rollouts':>8s} {'wrong':>6s} {'tokens in wrong':>15s} {'len ok':>7s} {'len wrong':>9s}"
          f" {'absorbed':>8s} {'len absorbed':>12s} {'saved by stops':>14s}")
    for r in rows:
        la = "-" if r["mean_length_absorbed"] is None else f"{r['mean_length_absorbed']:.1f}"
        sv = "-" if r["stops"]["saved_share"] is None else f"{r['stops']['saved_share']:.3f}"
        print(f"{r['run'][-40:]:40s} {r['rollouts']:8d} {r['wrong_fraction']:6.3f} {r['token_share_of_wrong_rollouts']:15.3f}"
              f" {r['mean_length_correct'] or float('nan'):7.1f} {r['mean_length_wrong'] or float('nan'):9.1f}"
              f" {r['absorbed_fraction']:8.3f} {la:>12s} {sv:>14s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
