"""Plots of a run (PNG) from its metrics.jsonl and eval.jsonl: what a person looks at first.

    python -m espo_async.report RUN_DIR      # writes RUN_DIR/plots/*.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from espo_async.runtime.metrics import read_metrics
from espo_async.utils import read_jsonl

PANELS = [
    ("reward", "training reward (outcome, r_fail for stopped)"),
    ("stop_rate", "stop rate (fraction of rollouts stopped early)"),
    ("beta", "beta (value-gate multiplier)"),
    ("entropy", "policy entropy (nats/token)"),
    ("critic_loss", "critic loss"),
    ("mean_length", "mean rollout length (tokens kept)"),
]


def read_evals(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "eval.jsonl")


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's plots; returns their paths (nothing if the run has no metrics yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        ys = [r.get(key) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [out / "training.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    evals = read_evals(run_dir)
    cumulative = {r["step"]: r.get("cumulative_tokens", 0) for r in rows}
    cumulative[0] = 0
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [cumulative.get(e["step"], float("nan")) for e in evals]
        ax.plot(xs, [e["accuracy"] for e in evals], marker="o")
        ax.set_xlabel("cumulative rollout tokens")
        ax.set_ylabel("held-out accuracy (pass@1)")
        ax.set_title("accuracy against rollout tokens", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "accuracy_vs_tokens.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


if __name__ == "__main__":
    for p in plot_run(Path(sys.argv[1])):
        print(p)
