"""Launchers that place one espo-async run on a cluster manager's nodes (docs/cluster.md):
``python -m espo_async.launch.slurm`` (a SLURM batch job) and ``python -m
espo_async.launch.ray_cluster`` (Ray actors). Each starts the same ``run.py`` processes a person
would start by hand; ZeroMQ and the per-host supervisors do the rest."""

from espo_async.config import ROLES

#: What a launcher starts on the head node by default: every role but the samplers, which the
#: other nodes' ``run.py --join`` start.
HEAD_ROLES: tuple[str, ...] = tuple(r for r in ROLES if r != "sampler")
