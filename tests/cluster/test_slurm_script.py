"""The SLURM launcher's batch script as text (espo_async/launch/slurm.py): no SLURM needed.

The script is run for real on a one-machine cluster in tests/cluster/test_slurm.py."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from espo_async.launch import slurm
from espo_async.launch.slurm import LaunchError, Layout, batch_script, check_layout

REPO = Path(__file__).resolve().parents[2]


def layout(**changes) -> Layout:
    base = Layout(config=Path("/shared/cfg/run.yaml"), run_dir=Path("/shared/runs/r1"), sampler_nodes=3,
                  python="/shared/venv/bin/python", repo=Path("/shared/espo"))
    return dataclasses.replace(base, **changes)


def sbatch_options(text: str) -> dict[str, str]:
    return dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in text.splitlines()
                if line.startswith("#SBATCH --"))


def test_header_allocates_head_plus_sampler_nodes_and_asks_for_sigterm_before_the_limit():
    text = batch_script(layout(partition="gpu", time="12:00:00", gpus_per_node=8, grace_s=300,
                               sbatch_args=("--account=proj",)))
    assert text.startswith("#!/bin/bash\n")
    opts = sbatch_options(text)
    assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "1"
    assert opts["signal"] == "TERM@300"  # the job steps (run.py), not the batch shell
    assert "requeue" in opts and opts["open-mode"] == "append" and "exclusive" in opts
    assert opts["partition"] == "gpu" and opts["time"] == "12:00:00" and opts["gpus-per-node"] == "8"
    assert opts["account"] == "proj" and opts["chdir"] == "/shared/espo"
    assert opts["output"] == "/shared/runs/r1/slurm-%j.out"
    # No option can come after the first command (sbatch stops reading #SBATCH lines there).
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in text.splitlines()[first_command:])


def test_optional_header_lines_are_left_out():
    opts = sbatch_options(batch_script(layout(grace_s=0, exclusive=False)))
    assert not {"signal", "exclusive", "partition", "time", "gpus-per-node"} & set(opts)


def test_requeue_only_after_a_time_limit_stop():
    text = batch_script(layout())
    assert "REQUEUE_ON_TIME_LIMIT=1" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert '[ "$HEAD_RC" = 143 ] && [ "$CANCELLED" = 0 ]' in text  # stopped by --signal, not by scancel
    assert "REQUEUE_ON_TIME_LIMIT=0" in batch_script(layout(requeue_on_time_limit=False))


def test_head_samplers_keys_and_ports():
    text = batch_script(layout(sets=("run.total_steps=5", "run.name=a b"), sampler_sets=("actors.sampler.count=4",),
                               base_port=30000))
    assert 'HEAD=${NODES[0]}' in text and 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert "BASE_PORT=30000" in text
    assert "SETS=(--set run.total_steps=5 --set 'run.name=a b')" in text  # shell-quoted
    assert "SAMPLER_SETS=(--set actors.sampler.count=4)" in text
    assert '-m espo_async.runtime.keys gen "$RUN/curve"' in text  # once: guarded by the key file
    assert '--set "transport.curve.keys_dir=$RUN/curve"' in text and "transport.kind=tcp" in text
    head = next(line for line in text.splitlines() if "run.py --config" in line)
    assert head.startswith("srun --nodes=1 --ntasks=1") and '-w "$HEAD"' in head
    assert '--run-dir "$RUN" --roles "$HEAD_ROLES" &' in head
    assert "HEAD_ROLES=coordinator,learner,stopper,critic" in text
    assert 'rm -f "$RUN/join.json"' in text and text.index("rm -f") < text.index("run.py --config")
    assert text.index('until [ -f "$RUN/join.json" ]') < text.index("run.py --join")
    join = text[text.index("run.py --join"):].split("&\n")[0]
    assert '--roles sampler' in join and '--host-name "$node"' in join and '--run-dir "$RUN/hosts/$node"' in join
    assert "torch.distributed.run" not in text


def test_learner_ranks_run_under_torchrun_on_the_head_node():
    text = batch_script(layout(learner_ranks_per_node=4))
    assert "HEAD_ROLES=coordinator,stopper,critic" in text
    assert '--set "cluster.role_hosts.learner=$HEAD_ADDR"' in text
    line = next(line for line in text.splitlines() if "torch.distributed.run" in line)
    assert line.startswith("srun ") and '-w "$HEAD"' in line and "--nproc-per-node 4" in line
    assert '--master-addr "$HEAD_ADDR"' in line and "--master-port $((BASE_PORT + 8))" in line
    assert ('-m espo_async.training.data_parallel --join "$RUN/join.json" --run-dir "$RUN/learner" '
            "--host-name learner &") in line
    assert text.index("torch.distributed.run") > text.index('until [ -f "$RUN/join.json" ]')
    assert '"$RUN/learner"/summary.json' in text  # the learner's run folder holds the summary


def test_the_script_is_valid_bash():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    for lay in (layout(), layout(learner_ranks_per_node=2, time="1-00:00:00")):
        done = subprocess.run(["bash", "-n"], input=batch_script(lay), text=True, capture_output=True, check=False)
        assert done.returncode == 0, done.stderr


def test_the_script_is_a_pure_function_of_the_layout():
    assert batch_script(layout()) == batch_script(layout())
    assert batch_script(layout()) != batch_script(layout(sampler_nodes=2))


@pytest.mark.parametrize("changes, message", [
    ({"sampler_nodes": 0}, "--sampler-nodes 0"),
    ({"learner_ranks_per_node": 0}, "--learner-ranks-per-node 0"),
    ({"head_roles": ("learner", "stopper")}, "must include the coordinator"),
    ({"head_roles": ("coordinator", "critic")}, "nothing would run it"),
    ({"head_roles": ("coordinator", "learner", "nobody")}, "subset of"),
    ({"base_port": 0}, "--base-port 0"),
    ({"time": "soon"}, "--time 'soon'"),
    ({"run_dir": Path("runs/r1")}, "absolute"),
    ({"sets": ("no-equals",)}, "section.key=value"),
    ({"partition": "a;rm -rf /"}, "--partition"),
])
def test_bad_layouts_are_refused_with_a_clear_message(changes, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        check_layout(layout(**changes))


def test_command_line_errors(tmp_path, capsys, monkeypatch):
    config = str(REPO / "configs" / "fake.yaml")
    run = ["--run-dir", str(tmp_path / "run")]
    assert slurm.main(["--config", str(tmp_path / "nope.yaml"), *run, "--sampler-nodes", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert slurm.main(["--config", config, *run, "--sampler-nodes", "-1"]) == 2
    assert "--sampler-nodes -1" in capsys.readouterr().err
    assert slurm.main(["--config", config, *run, "--sampler-nodes", "1", "--set", "run.total_steps=-3"]) == 2
    assert "run.total_steps" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert slurm.main(["--config", config, *run, "--sampler-nodes", "1", "--submit"]) == 2
    assert "no sbatch on PATH" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_print_writes_nothing(tmp_path, capsys):
    config = str(REPO / "configs" / "fake.yaml")
    assert slurm.main(["--config", config, "--run-dir", str(tmp_path / "run"), "--sampler-nodes", "2", "--print"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=3" in out and f"RUN={tmp_path / 'run'}" in out
    assert not (tmp_path / "run").exists()
