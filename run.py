"""Start a whole espo-async run from a YAML file in configs/.

    python run.py --config configs/fake.yaml            # fake samplers, seconds
    python run.py --config configs/default.yaml         # the real CPU run (vLLM + DeepSpeed)
    python run.py --config configs/fake.yaml --set run.total_steps=3 --set stop.policy=none
    python run.py --explain-config                      # every option, its default, what it does

Several hosts (docs/cluster.md): the head host starts some roles and writes ``join.json`` in its
run folder; every other host joins with it and starts its own roles under its own supervisor:

    python run.py --config configs/X.yaml --roles coordinator,learner,stopper,critic   # head
    python run.py --join HEAD_RUN_DIR/join.json --roles sampler --host-name gpu-3       # any host

The run folder (``<run.output_dir>/<run.name>-<timestamp>`` unless ``--run-dir``) receives the
validated config, the logs of every actor, metrics.jsonl, TensorBoard events, checkpoints and
the final model. Re-running with the same ``--run-dir`` resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time
from pathlib import Path

from espo_async.config import ROLES, ConfigError, apply_override, explain, load_config, parse_config
from espo_async.runtime.entry import validate_actors


def summarize(run_dir: Path, *, learner_here: bool = True) -> str:
    from espo_async.runtime.metrics import read_metrics

    rows = read_metrics(run_dir)
    lines = [f"run folder: {run_dir}"]
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        for key, label in (("eval_before", "held-out accuracy before"), ("eval_after", "held-out accuracy after")):
            if key in summary:
                e = summary[key]
                se = e.get("accuracy_se")
                err = f" +- {se:.3f} (standard error over {e.get('problems')} problems)" if se is not None else ""
                lines.append(f"{label}: {e['accuracy']:.3f}{err}, {e['n']} samples")
        if "eval_gain" in summary:
            g = summary["eval_gain"]
            lines.append(f"held-out accuracy gain: {g['accuracy']:+.3f} +- {g['se']:.3f} "
                         f"(paired standard error over {g['problems']} problems)")
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
    if learner_here:
        lines.append(f"metrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
    else:
        lines.append("no learner on this host: metrics, checkpoints and the final model are in its host's run folder")
    lines.append(f"logs: {run_dir / 'logs'}")
    plots = sorted(run_dir.glob("plots/*.png"))
    if plots:
        lines.append(f"plots: {', '.join(str(p) for p in plots)}")
    return "\n".join(lines)


def parse_roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in roles if r not in ROLES]
    if not roles or bad:
        raise ConfigError(f"--roles {text!r}: roles are a comma-separated subset of {', '.join(ROLES)}")
    return roles


def read_join_file(path: Path) -> dict:
    """The head's join.json (or the head's run folder holding it)."""
    if path.is_dir():
        path = path / "join.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--join {path}: cannot read the head's join file ({exc})") from None
    if not (isinstance(data, dict) and isinstance(data.get("addresses"), dict) and isinstance(data.get("config"), dict)):
        raise ConfigError(f"--join {path}: not a join file (addresses and config) written by the head's run.py")
    return data


def default_host_name() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]).strip("-._")[:63]
    return name or "host"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--run-dir", type=Path, help="run folder (resumes if it holds a checkpoint)")
    parser.add_argument("--explain-config", action="store_true", help="print every option and exit")
    parser.add_argument("--check", action="store_true", help="validate the config and actor classes, then exit")
    parser.add_argument("--roles", metavar="ROLE[,ROLE]", help="start only these roles on this host (cluster.roles)")
    parser.add_argument("--join", type=Path, metavar="JOIN.json",
                        help="join the run whose head wrote this file (HEAD_RUN_DIR/join.json): its config and addresses")
    parser.add_argument("--host-name", help="this host's name in the run (cluster.host_name; default with --join: hostname)")
    args = parser.parse_args(argv)

    if args.explain_config:
        print("\n".join(explain()))
        return 0
    if args.config is None and args.join is None:
        parser.error("--config is required (or --join)")
    if args.config is not None and args.join is not None:
        parser.error("--join takes the head's config from the join file: change it with --set, not --config")
    if args.join is not None and args.roles is None:
        parser.error("--join needs --roles (e.g. --roles sampler)")
    joined = None
    try:
        extra = list(args.set)
        if args.roles is not None:
            extra.append(f"cluster.roles=[{','.join(parse_roles(args.roles))}]")
        host_name = args.host_name if args.host_name is not None else (default_host_name() if args.join else None)
        if host_name is not None:
            extra.append(f"cluster.host_name={json.dumps(host_name)}")
        if args.join is not None:
            joined = read_join_file(args.join)
            data = joined["config"]
            for item in extra:
                apply_override(data, item)
            cfg = parse_config(data, source=str(args.join))
        else:
            cfg = load_config(args.config, extra)
        validate_actors(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.join or args.config}: OK")
        return 0

    host = f"-{cfg.cluster.host_name}" if joined is not None else ""
    run_dir = args.run_dir or Path(cfg.run.output_dir) / f"{cfg.run.name}{host}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    print(f"[espo] run folder: {run_dir}", flush=True)
    if joined is not None:
        print(f"[espo] joining the run of {joined.get('run_dir', args.join)} with roles "
              f"{', '.join(cfg.cluster.roles or [])} as host {cfg.cluster.host_name!r}", flush=True)
    elif cfg.transport.kind == "tcp":
        print(f"[espo] other hosts join with: python run.py --join {run_dir / 'join.json'} --roles sampler "
              "--host-name NAME", flush=True)

    from espo_async.assets import prepare_assets
    from espo_async.runtime.supervisor import Supervisor

    t0 = time.time()
    prepare_assets(cfg, run_dir, log=lambda msg: print(f"[espo] {msg}", flush=True))
    print(f"[espo] assets ready in {time.time() - t0:.1f}s; starting actors", flush=True)
    try:
        if joined is not None:
            from espo_async.runtime.transport import joined_addresses

            addresses = joined_addresses(joined["addresses"], str(run_dir))
            key = joined.get("run_key")  # the head's key for work tags (a coordinator or learner here needs it)
            supervisor = Supervisor(cfg, run_dir, addresses=addresses, joining=True,
                                    run_key=bytes.fromhex(key) if key else None)
        else:
            supervisor = Supervisor(cfg, run_dir)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        result = uvloop.run(supervisor.run())
    except ImportError:
        result = asyncio.run(supervisor.run())
    print(f"[espo] {'finished' if result.exit_code == 0 else 'FAILED'}: {result.reason} ({time.time() - t0:.1f}s)")
    try:
        from espo_async.report import plot_run

        if cfg.cluster.runs("learner"):  # metrics are written on the learner's host
            plot_run(run_dir)
    except Exception as exc:  # plots are a convenience; never hide the run's result behind them
        print(f"[espo] could not draw plots: {exc}", file=sys.stderr)
    print(summarize(run_dir, learner_here=cfg.cluster.runs("learner")))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
