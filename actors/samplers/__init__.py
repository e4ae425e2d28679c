"""Sampler actors: one shell (``Sampler``), several generation engines."""
