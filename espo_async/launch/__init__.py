"""Launchers that place one espo-async run on a cluster manager's nodes (docs/cluster.md):
``python -m espo_async.launch.slurm`` (a SLURM batch job) and ``python -m
espo_async.launch.ray_cluster`` (Ray actors). Each starts the same ``run.py`` processes a person
would start by hand; ZeroMQ and the per-host supervisors do the rest."""
