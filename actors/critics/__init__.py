"""Critic actors: one shell (``Critic``), several value models."""
