"""Fixtures of the training tests (in-process trainers on the tiny model)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny matmuls: one intra-op thread is faster and more reproducible on a shared 2-core box.
    (MASTER_PORT, which an in-process trainer sets, is restored by tests/conftest.py.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="package")
def tiny_dir():
    from espo_async.models.tiny import build_tiny_model

    return build_tiny_model(None)
