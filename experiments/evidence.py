"""The evidence sweep: ESPO against PPO, DAPO, GRPO and the paper's ablations, several seeds.

    python experiments/evidence.py                      # the full sweep (real engines, ~2 h on 2 cores)
    python experiments/evidence.py --quick              # small version (real engines, <= 10 min)
    python experiments/evidence.py --quick --fake       # the pipeline on fake samplers (the CI test)
    python experiments/evidence.py --report-only        # rebuild docs/results.md from finished runs

Every method trains the same model on the same task with the same seeds (so the same data
order), batch, T_max and evaluation; methods differ only by the overrides in ``METHODS``. All
methods run the same number of learner steps (the paper's protocol); cumulative rollout tokens
are measured, and accuracy is plotted against them. Runs are separate ``run.py`` processes in
``<out>/<method>/seed-<s>``; a finished run (its summary.json exists) is not run again, so an
interrupted sweep resumes. The random-stop ablation stops at ESPO's stop rate measured in the
same sweep (so ESPO runs first).

Outputs: ``<report>`` (docs/results.md: the table in the paper's format with spread over seeds,
the plots, the commands), ``<report dir>/results/evidence.json`` (every number the table and
plots show, per run and aggregated) and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

from espo_async.config import merge_config, parse_config
from espo_async.eval_stats import t95
from espo_async.runtime.entry import validate_actors
from espo_async.utils import read_jsonl as _read_jsonl

# method -> (label, overrides of the base config). "${espo_stop_rate}" is filled in at run time.
NO_CRITIC = {"actors": {"critic": None, "stopper": None}}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "espo": ("ESPO", {"stop": {"policy": "espo"}}),
    "ppo": ("PPO (no stopping)", {"stop": {"policy": "none", "shadow_fraction": 0.0}, "actors": {"stopper": None}}),
    "dapo": (
        "DAPO",
        {
            "stop": {"policy": "none", "shadow_fraction": 0.0},
            "algo": {
                "advantage": "grpo",
                "clip_low": 0.2,
                "clip_high": 0.28,
                "loss_agg": "token",
                "dynamic_sampling": True,
                "overlong_buffer": 16,
            },
            **NO_CRITIC,
        },
    ),
    "grpo": (
        "GRPO",
        {"stop": {"policy": "none", "shadow_fraction": 0.0}, "algo": {"advantage": "grpo", "loss_agg": "seq"}, **NO_CRITIC},
    ),
    "random": ("random stop (ESPO's rate)", {"stop": {"policy": "random", "random_rate": "${espo_stop_rate}"}}),
    "value_only": ("value-only stop", {"stop": {"policy": "value_only"}}),
    "regret_only": ("regret-only stop", {"stop": {"policy": "regret_only"}}),
    "espo_no_warmup": ("ESPO, no warm-up", {"stop": {"policy": "espo", "warmup": {"enabled": False}}}),
    "espo_no_penalty": ("ESPO, no terminal penalty", {"stop": {"policy": "espo", "r_fail": 0.0}}),
    # T-PPO (windows of W = 16 of T_max = 64 tokens, like the paper's 8K of 24K): a step trains on
    # 64 rows of at most 16 tokens, so compare on the accuracy-vs-tokens curve.
    "tppo": (
        "T-PPO (16-token windows)",
        {"rollout": {"window_tokens": 16}, "stop": {"policy": "none", "shadow_fraction": 0.0}, "actors": {"stopper": None}},
    ),
    "espo_tppo": ("ESPO + T-PPO windows", {"rollout": {"window_tokens": 16}, "stop": {"policy": "espo"}}),
    "entropy_is": (
        "entropy-grouped IS loss (GRPO advantages)",
        {"stop": {"policy": "none", "shadow_fraction": 0.0}, "algo": {"advantage": "grpo", "policy_loss": "entropy_is"},
         **NO_CRITIC},
    ),
}

FAKE_ACTORS = {
    "actors": {
        "sampler": {
            "class": "actors.samplers.fake:FakeSampler",
            "cpus": None,
            "options": {"max_concurrency": 8, "tokens_per_s": 0, "p_bad": 0.4},
        },
        "critic": {"class": "actors.critics.fake:FakeCritic", "cpus": None, "options": {"value": 0.1}},
        "stopper": {"class": "actors.stopper:Stopper", "cpus": None},
        "coordinator": {"class": "actors.coordinator:Coordinator", "cpus": None},
        "learner": {"class": "actors.learner:Learner", "cpus": None},
    },
    "model": {"sft_steps": 0, "tiny_hidden": 64},
}


merge = merge_config


def fill(tree: Any, values: dict[str, Any]) -> Any:
    if isinstance(tree, dict):
        return {k: fill(v, values) for k, v in tree.items()}
    if isinstance(tree, str) and tree.startswith("${") and tree.endswith("}"):
        return values[tree[2:-1]]
    return tree


def method_config(base: dict, method: str, seed: int, values: dict[str, Any], extra: dict) -> dict:
    _, over = METHODS[method]
    cfg = merge(merge(base, fill(over, values)), extra)
    cfg["run"]["seed"] = seed
    cfg["run"]["name"] = f"{method}-s{seed}"
    cfg["run"]["progress"] = False
    validate_actors(parse_config(cfg, source=f"method {method}"))  # fail before running anything
    return cfg


# -- running ------------------------------------------------------------------------------


def run_one(cfg: dict, run_dir: Path, log) -> dict:
    summary = run_dir / "summary.json"
    if summary.is_file():
        log(f"  {run_dir.relative_to(run_dir.parents[1])}: done before, skipped")
        return json.loads((run_dir / "wallclock.json").read_text()) if (run_dir / "wallclock.json").is_file() else {}
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run starts over (same seed, same data)
    run_dir.mkdir(parents=True)
    (run_dir / "experiment.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(run_dir / "experiment.yaml"), "--run-dir", str(run_dir)],
        cwd=ROOT,
        stdout=(run_dir / "run.out").open("w"),
        stderr=subprocess.STDOUT,
    )
    wall = {"wallclock_s": time.time() - t0, "exit_code": proc.returncode}
    (run_dir / "wallclock.json").write_text(json.dumps(wall))
    if proc.returncode != 0:
        tail = "\n".join((run_dir / "run.out").read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{run_dir} failed with exit code {proc.returncode}:\n{tail}")
    log(f"  {run_dir.relative_to(run_dir.parents[1])}: {wall['wallclock_s']:.0f}s")
    return wall


# -- reading results -------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return _read_jsonl(path)


def run_result(run_dir: Path) -> dict:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    shadows = read_jsonl(run_dir / "shadow.jsonl")
    wall = json.loads((run_dir / "wallclock.json").read_text()) if (run_dir / "wallclock.json").is_file() else {}
    cum = {0: 0.0, **{r["step"]: r.get("cumulative_tokens", 0.0) for r in rows}}
    # wall-clock of training: seconds from the first learner step's record (start-up and warm-up
    # excluded, they are the same for every method)
    t_first = rows[0].get("time", math.nan) if rows else math.nan
    secs = {0: 0.0, **{r["step"]: r.get("time", math.nan) - t_first for r in rows}}
    # rollouts that ended in the step (in T-PPO window mode n_samples counts window rows)
    ended = [r.get("window_finals", r.get("n_samples", 0)) for r in rows]
    n = sum(ended)
    stopped = sum(r.get("stop_rate", 0) * e for r, e in zip(rows, ended) if e and not math.isnan(r.get("stop_rate", 0)))
    return {
        "final_accuracy": evals[-1]["accuracy"] if evals else math.nan,
        # the last three evaluation points: one point's standard error is ~0.03 at 256 samples
        "late_accuracy": sum(e["accuracy"] for e in evals[-3:]) / len(evals[-3:]) if evals else math.nan,
        "initial_accuracy": evals[0]["accuracy"] if evals else math.nan,
        "cumulative_tokens": rows[-1]["cumulative_tokens"] if rows else math.nan,
        "stop_rate": stopped / n if n else math.nan,
        "false_positive_rate": (sum(s["score"] for s in shadows) / len(shadows)) if shadows else math.nan,
        "shadow_n": len(shadows),
        "entropy_final": rows[-1].get("entropy", math.nan) if rows else math.nan,
        "wallclock_s": wall.get("wallclock_s", math.nan),  # the whole run.py, start-up and warm-up included
        # from the first learner step's record to the last: the time the methods differ in (a seed's
        # first run also builds its warm-up model, which the runs after it take from the cache)
        "train_s": secs[rows[-1]["step"]] if rows else math.nan,
        "steps": rows[-1]["step"] if rows else 0,
        "curve": [{"step": e["step"], "tokens": cum.get(e["step"], math.nan), "seconds": secs.get(e["step"], math.nan),
                   "accuracy": e["accuracy"]} for e in evals],
        "series": {
            key: [r.get(key, math.nan) for r in rows]
            for key in ("stop_rate", "beta", "entropy", "cumulative_tokens", "reward", "critic_loss")
        },
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan  # 1 seed: no spread
    return m, sd


# -- report ----------------------------------------------------------------------------------


def ci95(sd: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean over ``n`` seeds with standard
    deviation ``sd`` (Student's t; NaN for one seed)."""
    return t95(n) * sd / math.sqrt(n) if n > 1 and not math.isnan(sd) else math.nan


def fmt(m: float, sd: float, digits: int = 3, scale: float = 1.0, n: int | None = None) -> str:
    """``mean ± spread``: the 95% interval's half-width when ``n`` (seeds) is given, else ``sd``."""
    if math.isnan(m):
        return "-"
    spread = ci95(sd, n) if n is not None else sd
    if math.isnan(spread):
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {spread * scale:.{digits}f}"


def write_report(results: dict, report: Path, command: str, base_cfg: Path, out_dir: Path | None = None) -> None:
    """The report (markdown) and, in ``out_dir`` (default: ``results/`` beside it), evidence.json
    and the plots it shows."""
    out_dir = out_dir or report.parent / "results"
    data_rel = Path(os.path.relpath(out_dir, report.parent)).as_posix()
    cfg_link = Path(os.path.relpath(base_cfg, report.parent)).as_posix()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evidence.json").write_text(json.dumps(results, indent=1))
    plots = draw(results, out_dir)
    agg = results["aggregate"]
    ppo_tokens = agg.get("ppo", {}).get("cumulative_tokens", [math.nan])[0]
    lines = [
        "# Evidence: ESPO against PPO, DAPO, GRPO and the paper's ablations",
        "",
        f"Generated by `{command}` on {results['date']} ({results['machine']}).",
        f"Base configuration: [`{base_cfg.relative_to(ROOT)}`]({cfg_link}); seeds {results['seeds']};"
        f" {results['steps']} learner steps per run; raw numbers: [{data_rel}/evidence.json]({data_rel}/evidence.json).",
        "",
        "| method | seeds | held-out accuracy (pass@1), final | mean of the last 3 evaluations | Δ final vs start | cumulative rollout tokens | tokens vs PPO | stop rate | false-positive stops | final entropy | training wall-clock (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, (label, _) in METHODS.items():
        a = agg.get(method)
        if a is None:
            continue
        tok_m = a["cumulative_tokens"][0]
        rel = f"{(tok_m / ppo_tokens - 1) * 100:+.1f}%" if ppo_tokens == ppo_tokens and ppo_tokens else "-"
        n = a.get("seeds", 1)
        lines.append(
            f"| {label} | {n} | {fmt(*a['final_accuracy'], n=n)} | {fmt(*a.get('late_accuracy', (math.nan, math.nan)), n=n)} | "
            f"{fmt(*a['delta_accuracy'], digits=3, n=n)} | "
            f"{fmt(*a['cumulative_tokens'], digits=0, n=n)} | {rel} | {fmt(*a['stop_rate'], n=n)} | "
            f"{fmt(*a['false_positive_rate'], n=n)} | {fmt(*a['entropy_final'], n=n)} | {fmt(*a.get('train_s', a['wallclock_s']), digits=0, n=n)} |"
        )
    lines += ["", "Values are the mean over seeds ± the half-width of its 95% confidence interval (Student's t over "
              "seeds; no interval for a single seed). evidence.json keeps each column's [mean, standard deviation]. "
              "Training wall-clock runs from the first learner step to the last (start-up and the warm-up, the same "
              "for every method, excluded; `wallclock_s` in evidence.json is the whole run).", ""]
    for p in plots:
        lines.append(f"![{p.stem}]({data_rel}/{p.name})")
    lines.append("")
    report.write_text("\n".join(lines) + "\n" + results.get("notes", ""))


def _accuracy_plot(plt, results: dict, style: dict, x: str, *, relative: bool, xlabel: str, ylabel: str,
                   path: Path) -> Path:
    """Held-out accuracy (mean over seeds; minus each run's step-0 accuracy if ``relative``)
    against the evaluation curve's ``x`` (tokens or seconds), one line per method."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, (label, _) in METHODS.items():
        curves = [r["curve"] for r in results["runs"].get(method, {}).values() if r["curve"]]
        curves = [c for c in curves if all(x in p for p in c)]  # runs reported before the key existed
        if not curves:
            continue
        k = min(len(c) for c in curves)
        xs = [sum(c[i][x] for c in curves) / len(curves) for i in range(k)]
        ys = [sum(c[i]["accuracy"] - (c[0]["accuracy"] if relative else 0.0) for c in curves) / len(curves)
              for i in range(k)]
        colour, line = style[method]
        ax.plot(xs, ys, marker="o", markersize=3, color=colour, linestyle=line, label=f"{label} ({len(curves)})")
    if relative:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, title="method (seeds)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour and line style per method (12 methods: tab20's pairs would look alike)
    colours = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]
    style = {m: (colours[i % len(colours)], ("-", "--", ":")[i // 10 % 3]) for i, m in enumerate(METHODS)}
    paths = [
        # each run against its own step-0 evaluation (seeds start from different warm-ups)
        _accuracy_plot(plt, results, style, "tokens", relative=True, xlabel="cumulative rollout tokens",
                       ylabel="held-out accuracy − step-0 accuracy\n(pass@1, mean over seeds)",
                       path=out_dir / "accuracy_vs_tokens.png"),
        _accuracy_plot(plt, results, style, "seconds", relative=False, xlabel="seconds since the first learner step",
                       ylabel="held-out accuracy (pass@1, mean over seeds)", path=out_dir / "accuracy_vs_wallclock.png"),
    ]

    for key, title in (("stop_rate", "stop rate"), ("beta", "beta"), ("entropy", "policy entropy (nats/token)")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, (label, _) in METHODS.items():
            runs = results["runs"].get(method)
            if not runs:
                continue
            series = [r["series"][key] for r in runs.values() if r["series"][key]]
            if not series:
                continue
            k = min(map(len, series))
            ys = [sum(s[i] for s in series) / len(series) for i in range(k)]
            if all(y != y for y in ys):
                continue
            colour, line = style[method]
            ax.plot(range(1, k + 1), ys, color=colour, linestyle=line, label=label)
        ax.set_xlabel("learner step")
        ax.set_title(f"{title} (mean over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"{key}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def collect(out: Path, methods: list[str], seeds: list[int]) -> dict:
    runs: dict[str, dict[str, dict]] = {}
    for m in methods:
        for s in seeds:
            d = out / m / f"seed-{s}"
            if (d / "summary.json").is_file():
                runs.setdefault(m, {})[str(s)] = run_result(d)
    aggregate = {}
    for m, by_seed in runs.items():
        rs = list(by_seed.values())
        aggregate[m] = {
            key: mean_std([r[key] for r in rs])
            for key in ("final_accuracy", "late_accuracy", "cumulative_tokens", "stop_rate", "false_positive_rate", "entropy_final", "wallclock_s", "train_s")
        }
        aggregate[m]["delta_accuracy"] = mean_std([r["final_accuracy"] - r["initial_accuracy"] for r in rs])
        aggregate[m]["seeds"] = len(rs)
    return {"runs": runs, "aggregate": aggregate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "evidence.yaml")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, help="learner steps per run (default: the config's)")
    ap.add_argument("--quick", action="store_true", help="small version: 1 seed, few steps, small evaluation")
    ap.add_argument("--fake", action="store_true", help="fake samplers and critic (tests the pipeline in seconds)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base config")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "evidence")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="where evidence.json and the plots go (default: results/ beside --report)")
    args = ap.parse_args()
    args.config = args.config.resolve()  # the report names it relative to the repository

    from espo_async.config import apply_override

    base = yaml.safe_load(args.config.read_text())
    for item in args.set:
        apply_override(base, item)
    extra: dict[str, Any] = {}
    if args.quick:
        args.seeds = args.seeds if "--seeds" in sys.argv else [0]
        extra = merge(extra, {"run": {"total_steps": args.steps or 6},
                              "task": {"eval_problems": 16, "eval_samples": 2, "eval_every": 3},
                              "rollout": {"prompts_per_batch": 4, "max_tokens": 48}})
    if args.steps:
        extra = merge(extra, {"run": {"total_steps": args.steps}})
    if args.fake:
        extra = merge(extra, FAKE_ACTORS)
    steps = merge(base, extra)["run"]["total_steps"]
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    methods = list(args.methods)
    if "random" in methods and "espo" not in methods:
        methods.insert(0, "espo")
    methods.sort(key=lambda m: 0 if m == "espo" else 1)  # random stop needs ESPO's measured rate
    t0 = time.time()
    if not args.report_only:
        for m in methods:
            values = {}
            if m == "random":
                espo = collect(args.out, ["espo"], args.seeds)["aggregate"].get("espo")
                values["espo_stop_rate"] = round(float(espo["stop_rate"][0]), 4) if espo else 0.25
                log(f"random stop at ESPO's measured stop rate: {values['espo_stop_rate']}")
            for s in args.seeds:
                cfg = method_config(base, m, s, values, extra)
                log(f"[{m} seed {s}] {METHODS[m][0]}")
                run_one(cfg, args.out / m / f"seed-{s}", log)
    results = collect(args.out, methods, args.seeds)
    import platform

    results.update(
        date=time.strftime("%Y-%m-%d"),
        machine=f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, no GPU",
        seeds=args.seeds,
        steps=steps,
        sweep_seconds=time.time() - t0,
    )
    notes_file = args.report.with_suffix(".notes.md")
    if notes_file.is_file():
        results["notes"] = notes_file.read_text()
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]])
    write_report(results, args.report, command, args.config, args.data_dir)
    log(f"report: {args.report} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
