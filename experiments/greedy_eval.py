"""Greedy accuracy of a run's start and final policy: does RL raise the model's own best answer,
or only sharpen sampling toward it?

    python experiments/greedy_eval.py runs/evidence-long-240/espo/seed-0 runs/evidence-long-240/ppo/seed-0

For each run folder: the start model (assets.json's policy_dir) and the final one (final/), each
decoded greedily (transformers, no sampling) on the task's held-out problems; pass@1 of each with
its standard error over problems, and the paired difference final - start. Beside it, the run's
own sampled held-out accuracy (temperature as configured) at its first and last evaluation, from
eval.jsonl. If sampled accuracy rises toward a greedy accuracy that stays flat or falls, RL is
sharpening, not teaching.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from espo_async.eval_stats import mean_se, paired_difference  # noqa: E402
from espo_async.utils import read_jsonl, write_json  # noqa: E402


def greedy(model_dir: Path, task, problems) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from espo_async.models.sft import greedy_scores

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    max_new = max(len(tok.encode(task.solution(p), add_special_tokens=False)) for p in problems) + 8
    return greedy_scores(model, tok, task, problems, max_new)


def analyse(run_dir: Path, n_problems: int | None, start_cache: dict | None = None) -> dict:
    """One run's row. ``start_cache`` keeps the start model's scores across runs that share it
    (one start model serves every method and RL seed on it): (model, task, problems) -> scores."""
    from espo_async.assets import load_assets
    from espo_async.config import load_config
    from espo_async.tasks.registry import make_task

    cfg = load_config(run_dir / "config.yaml")
    task = make_task(cfg.task.name, **cfg.task.options)
    problems = task.eval_problems()[:n_problems] if n_problems else task.eval_problems()
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise SystemExit(f"{run_dir}: no final/ model (did the run finish?)")
    start = load_assets(run_dir).policy_dir
    key = (str(start), cfg.task.name, repr(sorted(cfg.task.options.items())), len(problems))
    cache = {} if start_cache is None else start_cache
    if key not in cache:
        cache[key] = greedy(Path(start), task, problems)
    scores = {"start": cache[key], "final": greedy(final, task, problems)}
    out: dict = {"run": str(run_dir), "problems": len(problems)}
    for k, v in scores.items():
        m, se = mean_se(v)
        out[f"greedy_{k}"] = {"accuracy": m, "se": se}
    d, se, _ = paired_difference({str(i): x for i, x in enumerate(scores["start"])},
                                 {str(i): x for i, x in enumerate(scores["final"])})
    out["greedy_gain"] = {"mean": d, "se": se}
    evals = read_jsonl(run_dir / "eval.jsonl")
    if evals:
        out["sampled_first"] = {"step": evals[0]["step"], "accuracy": evals[0]["accuracy"]}
        out["sampled_last"] = {"step": evals[-1]["step"], "accuracy": evals[-1]["accuracy"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--problems", type=int, default=None, help="the first N held-out problems (default: all)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.problems is not None and a.problems < 1:
        ap.error("--problems must be at least 1")
    start_cache: dict = {}
    rows = [analyse(r, a.problems, start_cache) for r in a.runs]
    print(f"{'run':45s} {'problems':>8s} {'greedy start':>14s} {'greedy final':>14s} {'gain':>15s} {'sampled':>13s}")
    for r in rows:
        s, f, g = r["greedy_start"], r["greedy_final"], r["greedy_gain"]
        sampled = (f"{r['sampled_first']['accuracy']:.3f}->{r['sampled_last']['accuracy']:.3f}"
                   if "sampled_first" in r else "-")
        print(f"{r['run'][-45:]:45s} {r['problems']:8d} {s['accuracy']:.3f} ± {s['se']:.3f}"
              f"  {f['accuracy']:.3f} ± {f['se']:.3f}  {g['mean']:+.3f} ± {g['se']:.3f} {sampled:>13s}")
    if a.out:
        print(f"written: {write_json(a.out, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
