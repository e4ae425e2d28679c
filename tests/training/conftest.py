"""Fixtures of the training tests (in-process trainers on the tiny model)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """Every training test module runs with one torch thread (tests/conftest.py; MASTER_PORT,
    which an in-process trainer sets, is restored there too)."""


@pytest.fixture(scope="package")
def tiny_dir():
    from espo_async.models.tiny import build_tiny_model

    return build_tiny_model(None)
