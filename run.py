"""Start a whole espo-async run from a YAML file in configs/.

    python run.py --config configs/fake.yaml            # fake samplers, seconds
    python run.py --config configs/default.yaml         # the real CPU run (vLLM + DeepSpeed)
    python run.py --config configs/fake.yaml --set run.total_steps=3 --set stop.policy=none
    python run.py --explain-config                      # every option, its default, what it does

The run folder (``<run.output_dir>/<run.name>-<timestamp>`` unless ``--run-dir``) receives the
validated config, the logs of every actor, metrics.jsonl, TensorBoard events, checkpoints and
the final model. Re-running with the same ``--run-dir`` resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from espo_async.config import ConfigError, explain, load_config
from espo_async.runtime.entry import validate_actors


def summarize(run_dir: Path) -> str:
    from espo_async.runtime.metrics import read_metrics

    rows = read_metrics(run_dir)
    lines = [f"run folder: {run_dir}"]
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        for key, label in (("eval_before", "held-out accuracy before"), ("eval_after", "held-out accuracy after")):
            if key in summary:
                lines.append(f"{label}: {summary[key]['accuracy']:.3f} ({summary[key]['n']} samples)")
        lines.append(f"final model: {summary.get('final_checkpoint')}")
    if rows:
        total_generated = sum(r.get("tokens_generated", 0) for r in rows)
        saved = sum(r.get("tokens_saved_est", 0) for r in rows)
        absorbed = sum(r.get("stop_rate", 0) * r.get("n_samples", 0) for r in rows)
        n = sum(r.get("n_samples", 0) for r in rows)
        last = rows[-1]
        lines += [
            f"learner steps: {last['step']}",
            f"rollout tokens generated: {int(total_generated)}",
            f"stop rate: {absorbed / max(n, 1):.3f} ({int(absorbed)} of {int(n)} rollouts stopped early)",
            f"tokens saved by stopping (estimate): {int(saved)}",
            f"last step: reward {last.get('reward', float('nan')):.3f}, accuracy {last.get('accuracy', float('nan')):.3f}, "
            f"beta {last.get('beta', float('nan')):.2f}",
        ]
    lines += [
        f"metrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})",
        f"logs: {run_dir / 'logs'}",
    ]
    plots = sorted(run_dir.glob("plots/*.png"))
    if plots:
        lines.append(f"plots: {', '.join(str(p) for p in plots)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--run-dir", type=Path, help="run folder (resumes if it holds a checkpoint)")
    parser.add_argument("--explain-config", action="store_true", help="print every option and exit")
    parser.add_argument("--check", action="store_true", help="validate the config and actor classes, then exit")
    args = parser.parse_args(argv)

    if args.explain_config:
        print("\n".join(explain()))
        return 0
    if args.config is None:
        parser.error("--config is required")
    try:
        cfg = load_config(args.config, args.set)
        validate_actors(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK")
        return 0

    run_dir = args.run_dir or Path(cfg.run.output_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    print(f"[espo] run folder: {run_dir}", flush=True)

    from espo_async.assets import prepare_assets
    from espo_async.runtime.supervisor import Supervisor

    t0 = time.time()
    prepare_assets(cfg, run_dir, log=lambda msg: print(f"[espo] {msg}", flush=True))
    print(f"[espo] assets ready in {time.time() - t0:.1f}s; starting actors", flush=True)
    supervisor = Supervisor(cfg, run_dir)
    try:
        import uvloop

        result = uvloop.run(supervisor.run())
    except ImportError:
        result = asyncio.run(supervisor.run())
    print(f"[espo] {'finished' if result.exit_code == 0 else 'FAILED'}: {result.reason} ({time.time() - t0:.1f}s)")
    try:
        from espo_async.report import plot_run

        plot_run(run_dir)
    except Exception as exc:  # plots are a convenience; never hide the run's result behind them
        print(f"[espo] could not draw plots: {exc}", file=sys.stderr)
    print(summarize(run_dir))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
