"""Does ESPO's stop rate settle at tau, and what moves it?

    python experiments/stop_controller.py runs/evidence-long-240-kl/espo/seed-0 ... [--json OUT]

For each run folder with stopping: from metrics.jsonl, the stop rate per learner step, how often
it sits near 0 (< 0.05) or far above tau (> 0.4), beta's range, and the correlation between the
critic's mean value on the batch (``value_mean``) and the stop rate. The value gate stops at
z_t > beta * max(V(s_t), eps) (ESPO.md, step 4), and a stop is scored r_fail = -1, so many stops
lower the critic's values, which lowers the threshold, which makes more stops: a strongly
negative correlation says the stop rate follows the critic rather than beta. From shadow.jsonl
(half of the stopped rollouts continued, never trained on): the false-positive rate (a
continuation that ended right) in steps of low, middle and high stop rate, to tell whether the
swings cost false positives.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espo_async.utils import read_jsonl, write_json  # noqa: E402

LOW, HIGH = 0.05, 0.4  # a step's stop rate "near 0" / "far above tau = 0.25"


def correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson's r (NaN when either side is constant or there are fewer than 3 points)."""
    if len(xs) < 3:
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    sxx, syy = sum((a - mx) ** 2 for a in xs), sum((b - my) ** 2 for b in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def phase(stop_rate: float) -> str:
    return "low" if stop_rate < LOW else ("high" if stop_rate > HIGH else "middle")


def controller_view(metrics: list[dict], shadows: list[dict]) -> dict:
    """The stop controller's behaviour over one run (``metrics``: metrics.jsonl rows; ``shadows``:
    shadow.jsonl rows, each a continued stopped rollout with the step it was stopped in)."""
    rows = [m for m in metrics if "stop_rate" in m]
    stop = [float(m["stop_rate"]) for m in rows]
    beta = [float(m["beta"]) for m in rows if "beta" in m]
    paired = [(float(m["value_mean"]), float(m["stop_rate"])) for m in rows if "value_mean" in m]
    by_step = {int(m["step"]): phase(float(m["stop_rate"])) for m in rows}
    fp: dict[str, list[int]] = {"low": [0, 0], "middle": [0, 0], "high": [0, 0]}
    for s in shadows:
        p = by_step.get(int(s["step"]))
        if p is not None:
            fp[p][0] += 1
            fp[p][1] += float(s["score"]) > 0
    n = len(stop)
    return {
        "steps": n,
        "mean_stop_rate": sum(stop) / n if n else math.nan,
        "share_steps_stop_below_0.05": sum(x < LOW for x in stop) / n if n else math.nan,
        "share_steps_stop_above_0.4": sum(x > HIGH for x in stop) / n if n else math.nan,
        "beta_min": min(beta) if beta else math.nan,
        "beta_max": max(beta) if beta else math.nan,
        "corr_value_mean_stop_rate": correlation([v for v, _ in paired], [s for _, s in paired]),
        "shadows": len(shadows),
        "false_positive_rate": sum(float(s["score"]) > 0 for s in shadows) / len(shadows) if shadows else math.nan,
        "false_positive_rate_by_phase": {k: {"shadows": c, "rate": (r / c if c else math.nan)} for k, (c, r) in fp.items()},
    }


def read_run(run_dir: Path) -> dict:
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise SystemExit(f"{run_dir}: no metrics.jsonl (not a run folder?)")
    return controller_view(metrics, read_jsonl(run_dir / "shadow.jsonl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    out = {str(r): read_run(r) for r in args.runs}
    for run, v in out.items():
        fp = v["false_positive_rate_by_phase"]
        print(f"{run}: {v['steps']} steps, stop rate {v['mean_stop_rate']:.3f} (steps < {LOW}: "
              f"{v['share_steps_stop_below_0.05']:.2f}, > {HIGH}: {v['share_steps_stop_above_0.4']:.2f}), beta "
              f"{v['beta_min']:.2f}..{v['beta_max']:.2f}, corr(value_mean, stop rate) {v['corr_value_mean_stop_rate']:+.2f}, "
              f"false positives {v['false_positive_rate']:.3f} (low/middle/high stop rate: "
              + " / ".join(f"{fp[k]['rate']:.3f}" for k in ("low", "middle", "high")) + ")")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
