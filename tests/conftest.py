"""Shared test configuration."""

import os

from hypothesis import HealthCheck, settings

# Property tests: no wall-clock deadlines (CI machines are slow and shared), fixed profile.
settings.register_profile(
    "ci", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Models built by tests go to the user's cache (shared across runs): building is idempotent."""
    from espo_async.models.tiny import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny model on the arithmetic alphabet (built once, cached on disk)."""
    from espo_async.assets import resolve_model
    from espo_async.config import parse_config

    cfg = parse_config({"task": {"name": "arithmetic", "options": {"n_steps": 3}}})
    return str(resolve_model("tiny", cfg))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls and forwards are latency-bound: one intra-op thread is faster and more
    reproducible on a shared 2-core box (two OpenMP threads made the tiny critic ~100x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def _restore_master_port():
    """An in-process trainer sets MASTER_PORT for its one-process gloo group; actor processes
    started by later test modules would inherit it and fail to bind the same port. (Autouse
    fixtures run before the other fixtures of their scope: the snapshot precedes any trainer.)"""
    before = os.environ.get("MASTER_PORT")
    yield
    if before is None:
        os.environ.pop("MASTER_PORT", None)
    else:
        os.environ["MASTER_PORT"] = before
