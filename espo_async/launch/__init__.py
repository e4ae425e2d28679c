"""Launchers that place one espo-async run on a cluster manager's nodes (Ray, Slurm)."""
