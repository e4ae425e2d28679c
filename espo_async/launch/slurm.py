"""Run on a SLURM cluster: one batch job holds the head node and the sampler nodes.

    python -m espo_async.launch.slurm --config configs/X.yaml --run-dir /shared/runs/r1 \\
        --sampler-nodes 4 --partition gpu --time 12:00:00 --submit

The batch script (``--print`` shows it; ``--submit`` writes it to RUN/slurm.sbatch and hands it
to ``sbatch``) does by hand what docs/cluster.md describes: the first node of the allocation is
the head (``run.py --config ... --roles coordinator,learner,stopper,critic``, TCP on fixed ports
``--base-port`` + 0..7, CURVE keys made once in RUN/curve), every other node joins it
(``run.py --join RUN/join.json --roles sampler --host-name NODE --run-dir RUN/hosts/NODE``).
The run folder must be on storage every node sees at the same path (weights, join.json, keys).

Stopping: ``scancel JOB`` sends SIGTERM to every ``run.py``; each supervisor stops its actors, the
learner saves a checkpoint (KillWait, 30 s by default, must cover it). ``--signal`` asks SLURM
for SIGTERM ``--grace-s`` seconds before the time limit: the run checkpoints and the job requeues
itself (``scontrol requeue``). Submitting the same script again (same run folder) resumes from
the last checkpoint.

``batch_script(layout)`` is pure (layout in, text out); the rest checks input and calls sbatch.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from espo_async.config import ROLES
from espo_async.launch import HEAD_ROLES

REPO = Path(__file__).resolve().parents[2]
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


class LaunchError(ValueError):
    """Bad input to the launcher (the message says what and how to fix it)."""


@dataclass(frozen=True)
class Layout:
    """Where everything runs. Paths are absolute (the job runs elsewhere, from another folder)."""

    config: Path
    run_dir: Path
    sampler_nodes: int
    sets: tuple[str, ...] = ()
    sampler_sets: tuple[str, ...] = ()  # --set for the sampler hosts only (e.g. actors.sampler.count)
    head_roles: tuple[str, ...] = HEAD_ROLES
    learner_ranks_per_node: int = 1
    partition: str | None = None
    time: str | None = None
    base_port: int = 29600
    grace_s: int = 120  # SIGTERM this long before the time limit
    job_name: str = "espo"
    python: str = sys.executable
    repo: Path = REPO
    gpus_per_node: int = 0
    exclusive: bool = True
    requeue_on_time_limit: bool = True
    join_timeout_s: int = 600  # the head must write join.json within this
    sampler_grace_s: int = 120  # after the head ended, sampler hosts get this long to end by themselves
    sbatch_args: tuple[str, ...] = field(default=())  # extra "#SBATCH" options, e.g. "--account=x"

    @property
    def nodes(self) -> int:
        return 1 + self.sampler_nodes

    @property
    def learner_separate(self) -> bool:
        """The learner runs as its own step (torchrun, several ranks) instead of inside the head."""
        return self.learner_ranks_per_node > 1


def check_layout(layout: Layout) -> None:
    """Raise LaunchError naming the first thing wrong with ``layout`` (no file system access)."""
    if layout.sampler_nodes < 1:
        raise LaunchError(f"--sampler-nodes {layout.sampler_nodes}: at least 1 node must run samplers "
                          "(for one node use run.py directly)")
    if layout.learner_ranks_per_node < 1:
        raise LaunchError(f"--learner-ranks-per-node {layout.learner_ranks_per_node}: must be >= 1")
    bad = [r for r in layout.head_roles if r not in ROLES]
    if bad or not layout.head_roles or len(set(layout.head_roles)) != len(layout.head_roles):
        raise LaunchError(f"--head-roles {','.join(layout.head_roles)}: a comma-separated subset of {', '.join(ROLES)}")
    if "coordinator" not in layout.head_roles:
        raise LaunchError("--head-roles must include the coordinator (the head writes join.json)")
    if "learner" not in layout.head_roles and not layout.learner_separate:
        raise LaunchError("--head-roles without the learner: nothing would run it (keep it on the head, or use "
                          "--learner-ranks-per-node > 1 to run it under torchrun on the head node)")
    if not 1024 <= layout.base_port <= 65000:
        raise LaunchError(f"--base-port {layout.base_port}: use a fixed port between 1024 and 65000 "
                          "(ports base..base+8 must be free on the head node)")
    if layout.time is not None and not TIME_RE.match(layout.time):
        raise LaunchError(f"--time {layout.time!r}: use SLURM's format, e.g. 12:00:00 or 1-00:00:00")
    if not NAME_RE.match(layout.job_name) or (layout.partition is not None and not NAME_RE.match(layout.partition)):
        raise LaunchError("--job-name and --partition: letters, digits and _.+- only")
    for path, what in ((layout.config, "--config"), (layout.run_dir, "--run-dir")):
        if not path.is_absolute():
            raise LaunchError(f"{what} {path}: must be an absolute path (the job runs on other nodes)")
    for value, what in ((layout.grace_s, "--grace-s"), (layout.join_timeout_s, "join timeout"),
                        (layout.sampler_grace_s, "sampler grace"), (layout.gpus_per_node, "--gpus-per-node")):
        if value < 0:
            raise LaunchError(f"{what} {value}: must be >= 0")
    for item in (*layout.sets, *layout.sampler_sets):
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--set {item!r}: must look like section.key=value")


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _sets(items: tuple[str, ...]) -> str:
    return " ".join(f"--set {_q(item)}" for item in items)


def sbatch_header(layout: Layout) -> list[str]:
    """The ``#SBATCH`` lines."""
    lines = [
        f"#SBATCH --job-name={layout.job_name}",
        f"#SBATCH --nodes={layout.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={layout.run_dir}/slurm-%j.out",
        "#SBATCH --open-mode=append",  # a requeued job appends to the same log
        "#SBATCH --requeue",
        f"#SBATCH --chdir={layout.repo}",
    ]
    if layout.exclusive:
        lines.append("#SBATCH --exclusive")
    if layout.grace_s:
        lines.append(f"#SBATCH --signal=TERM@{layout.grace_s}")  # the job steps, not this script
    if layout.partition:
        lines.append(f"#SBATCH --partition={layout.partition}")
    if layout.time:
        lines.append(f"#SBATCH --time={layout.time}")
    if layout.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={layout.gpus_per_node}")
    lines += [f"#SBATCH {arg}" for arg in layout.sbatch_args]
    return lines


STEP = "srun --nodes=1 --ntasks=1 --whole --overlap --kill-on-bad-exit=0"


def learner_command(layout: Layout) -> str:
    """The learner's ranks under torchrun on the head node (rank 0 joins the head, docs/cluster.md
    "A learner on several ranks"); only with --learner-ranks-per-node > 1."""
    return (f'{STEP} -w "$HEAD" "$PY" -m torch.distributed.run --nnodes 1 '
            f"--nproc-per-node {layout.learner_ranks_per_node} "
            f'--master-addr "$HEAD_ADDR" --master-port $((BASE_PORT + 8)) '
            f'-m espo_async.training.data_parallel --join "$RUN/join.json" --run-dir "$RUN/learner" '
            f"--host-name learner &")


def batch_script(layout: Layout) -> str:
    """The whole batch script for ``layout`` (pure: the same layout gives the same text)."""
    check_layout(layout)
    head_roles = [r for r in layout.head_roles if not (layout.learner_separate and r == "learner")]
    learner_host = '\nNET+=(--set "cluster.role_hosts.learner=$HEAD_ADDR")' if layout.learner_separate else ""
    start_learner = ""
    if layout.learner_separate:
        start_learner = f"""
echo "[slurm] learner: {layout.learner_ranks_per_node} ranks under torchrun on $HEAD (run folder $RUN/learner)"
{learner_command(layout)}
LEARNER_PID=$!"""
    metrics_dir = '"$RUN/learner"' if layout.learner_separate else '"$RUN"'
    return f"""#!/bin/bash
# espo-async on SLURM, written by: python -m espo_async.launch.slurm (docs/cluster.md, "SLURM").
# Submit this file again (same run folder) to resume from the run's last checkpoint.
{chr(10).join(sbatch_header(layout))}
set -uo pipefail

RUN={_q(layout.run_dir)}
PY={_q(layout.python)}
CONFIG={_q(layout.config)}
BASE_PORT={layout.base_port}
SETS=({_sets(layout.sets)})
SAMPLER_SETS=({_sets(layout.sampler_sets)})
HEAD_ROLES={_q(",".join(head_roles))}
JOIN_TIMEOUT_S={layout.join_timeout_s}
SAMPLER_GRACE_S={layout.sampler_grace_s}
REQUEUE_ON_TIME_LIMIT={int(layout.requeue_on_time_limit)}

# The head is the first node of the allocation; its address is SLURM's NodeAddr, as an IPv4 address.
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
HEAD=${{NODES[0]}}
SAMPLER_NODES=("${{NODES[@]:1}}")
HEAD_ADDR=$(scontrol show node "$HEAD" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
HEAD_ADDR=${{HEAD_ADDR:-$HEAD}}
IP=$(getent ahostsv4 "$HEAD_ADDR" | awk 'NR == 1 {{print $1}}')
HEAD_ADDR=${{IP:-$HEAD_ADDR}}
echo "[slurm] job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $(date -u +%FT%TZ): head $HEAD ($HEAD_ADDR:$BASE_PORT), sampler nodes ${{SAMPLER_NODES[*]}}, run folder $RUN"

mkdir -p "$RUN/hosts"
if [ ! -f "$RUN/curve/server.key_secret" ]; then  # once per run folder; kept when resuming
    "$PY" -m espo_async.runtime.keys gen "$RUN/curve" || exit 2
fi
rm -f "$RUN/join.json"  # a resumed head writes it again: never join the last job's head
NET=(--set transport.kind=tcp --set "transport.host=$HEAD_ADDR" --set "transport.base_port=$BASE_PORT"
     --set transport.curve.enabled=true --set "transport.curve.keys_dir=$RUN/curve"){learner_host}

CANCELLED=0  # scancel signals this script too; SLURM's time-limit warning (--signal) does not
REQUEUED=0  # scontrol requeue signals this script as well
trap 'CANCELLED=1; [ "$REQUEUED" = 1 ] || echo "[slurm] cancelled: every run.py stops its actors, the learner saves a checkpoint"' TERM INT

wait_for() {{  # a background job's exit status (a trapped signal interrupts `wait`: wait again)
    local rc
    while :; do
        wait "$1"; rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$1" 2>/dev/null; then continue; fi
        return "$rc"
    done
}}

{STEP} -w "$HEAD" "$PY" run.py --config "$CONFIG" "${{SETS[@]}}" "${{NET[@]}}" --run-dir "$RUN" --roles "$HEAD_ROLES" &
HEAD_PID=$!

deadline=$((SECONDS + JOIN_TIMEOUT_S))
until [ -f "$RUN/join.json" ]; do
    if ! kill -0 "$HEAD_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ] || [ "$CANCELLED" = 1 ]; then
        echo "[slurm] error: the head wrote no $RUN/join.json (it ended, or not within ${{JOIN_TIMEOUT_S}}s, or the job was cancelled)" >&2
        scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null
        wait_for "$HEAD_PID"; exit 1
    fi
    sleep 1
done
{start_learner}
for node in "${{SAMPLER_NODES[@]}}"; do
    {STEP} -w "$node" "$PY" run.py --join "$RUN/join.json" "${{SAMPLER_SETS[@]}}" --roles sampler \\
        --host-name "$node" --run-dir "$RUN/hosts/$node" &
done

wait_for "$HEAD_PID"; HEAD_RC=$?
echo "[slurm] the head ended with exit code $HEAD_RC"
# The sampler hosts end by themselves when training is over; otherwise they are stopped here.
deadline=$((SECONDS + SAMPLER_GRACE_S))
while [ -n "$(jobs -pr)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
if [ -n "$(jobs -pr)" ]; then
    echo "[slurm] stopping the steps still running"
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null
fi
for pid in $(jobs -p); do wait_for "$pid"; done

if [ -f {metrics_dir}/summary.json ]; then
    echo "[slurm] training finished: {metrics_dir.strip('"')}/summary.json"
    exit 0
fi
if [ "$HEAD_RC" = 143 ] && [ "$CANCELLED" = 0 ] && [ "$REQUEUE_ON_TIME_LIMIT" = 1 ]; then
    echo "[slurm] stopped before the time limit with a checkpoint: requeueing job $SLURM_JOB_ID to resume"
    REQUEUED=1
    scontrol requeue "$SLURM_JOB_ID"
    exit 0  # (scontrol may itself be ended by the requeue it asked for)
fi
echo "[slurm] the run did not finish; submit this script again to resume from its last checkpoint"
exit "$HEAD_RC"
"""


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m espo_async.launch.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the run's YAML config (configs/X.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--sampler-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a host-local value on the sampler nodes only (e.g. actors.sampler.count=4)")
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="the run folder, on storage every node sees at this path (same folder: resume)")
    parser.add_argument("--sampler-nodes", type=int, required=True, help="nodes that run samplers (besides the head)")
    parser.add_argument("--head-roles", default=",".join(HEAD_ROLES), metavar="ROLE[,ROLE]",
                        help="roles of the head node (default: %(default)s)")
    parser.add_argument("--learner-ranks-per-node", type=int, default=1,
                        help="> 1: the learner trains data-parallel on this many ranks of the head node (torchrun)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", help="time limit (HH:MM:SS or D-HH:MM:SS)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to request on every node")
    parser.add_argument("--base-port", type=int, default=29600, help="the head's first port (it uses base..base+8)")
    parser.add_argument("--grace-s", type=int, default=120,
                        help="SIGTERM this many seconds before the time limit, to checkpoint (0: none)")
    parser.add_argument("--no-requeue", action="store_true",
                        help="do not requeue the job when it stopped for its time limit")
    parser.add_argument("--shared-nodes", action="store_true", help="do not ask for whole nodes (--exclusive)")
    parser.add_argument("--job-name", default="espo")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python every node runs (default: this one; it must exist on every node)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --sbatch-arg=--account=proj")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the batch script (the default)")
    mode.add_argument("--submit", action="store_true", help="write RUN/slurm.sbatch and submit it with sbatch")
    return parser.parse_args(argv)


def layout_from_args(args: argparse.Namespace) -> Layout:
    """A checked Layout from the command line: the config must exist and load with the --set
    values (LaunchError otherwise)."""
    config = Path(args.config).expanduser().absolute()
    if not config.is_file():
        raise LaunchError(f"--config {args.config}: no such file")
    layout = Layout(
        config=config,
        run_dir=Path(args.run_dir).expanduser().absolute(),
        sampler_nodes=args.sampler_nodes,
        sets=tuple(args.set),
        sampler_sets=tuple(args.sampler_set),
        head_roles=tuple(r.strip() for r in args.head_roles.split(",") if r.strip()),
        learner_ranks_per_node=args.learner_ranks_per_node,
        partition=args.partition,
        time=args.time,
        base_port=args.base_port,
        grace_s=args.grace_s,
        job_name=args.job_name,
        python=args.python,
        gpus_per_node=args.gpus_per_node,
        exclusive=not args.shared_nodes,
        requeue_on_time_limit=not args.no_requeue,
        sbatch_args=tuple(args.sbatch_arg),
    )
    check_layout(layout)
    check_config(layout)
    return layout


def check_config(layout: Layout) -> None:
    """The config loads with the --set values and the launcher's transport (tcp, fixed ports)."""
    from espo_async.config import ConfigError, load_config

    extra = [*layout.sets, "transport.kind=tcp", f"transport.base_port={layout.base_port}"]
    try:
        load_config(layout.config, extra)
    except ConfigError as exc:
        raise LaunchError(f"--config {layout.config}: {exc}") from None


def submit(script: Path, sbatch: str) -> str:
    """``sbatch --parsable SCRIPT``; the job id (LaunchError with sbatch's message if refused)."""
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LaunchError(f"sbatch refused {script}: {(done.stderr or done.stdout).strip()}")
    return done.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        layout = layout_from_args(args)
        sbatch = shutil.which("sbatch") if args.submit else None
        if args.submit and sbatch is None:
            raise LaunchError("--submit: no sbatch on PATH (run this on a SLURM login node, or use --print)")
        text = batch_script(layout)
        if not args.submit:
            print(text, end="")
            return 0
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        script = layout.run_dir / "slurm.sbatch"
        script.write_text(text)
        script.chmod(0o755)
        job = submit(script, sbatch)
    except (LaunchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"submitted job {job}: {layout.nodes} nodes (head + {layout.sampler_nodes} sampler nodes), "
          f"run folder {layout.run_dir}\n"
          f"  watch:  squeue -j {job}; tail -f {layout.run_dir}/slurm-{job}.out\n"
          f"  stop:   scancel {job}   (every run.py stops; the learner saves a checkpoint)\n"
          f"  resume: sbatch {script}")
    print(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
