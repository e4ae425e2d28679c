"""Launchers: start a multi-host run (docs/cluster.md) through a cluster's scheduler."""
