"""Fixtures for the engine tests: one tiny model and ONE vLLM engine for the whole session.

Starting a vLLM engine costs ~20-30 s on the 2-core CPU machines, so every engine test shares
the session-scoped ``engine`` (pytest-asyncio 1.x: the fixture and the tests run on the
session event loop; engine test modules set
``pytestmark = pytest.mark.asyncio(loop_scope="session")``).

Tests marked ``engine_shutdown`` shut the shared engine down (to check that no process is
left behind); they are moved right after the last test that uses the engine.
"""

from __future__ import annotations

import pytest
import pytest_asyncio

#: small alphabet for the engine tests (17 characters + 4 special tokens = 21 tokens)
ALPHABET = "0123456789+-*=;A\n"
MAX_NUM_SEQS = 2
MAX_MODEL_LEN = 512


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "engine_shutdown: shuts the shared session engine down (run last)"
    )


def pytest_collection_modifyitems(session, config, items):
    """Move ``engine_shutdown`` tests right after the last test that uses the shared engine,
    so the engine (2 processes, 1 GiB KV cache) does not outlive the engine tests while the
    rest of the suite runs."""
    last = [it for it in items if it.get_closest_marker("engine_shutdown") is not None]
    if not last:
        return
    rest = [it for it in items if it.get_closest_marker("engine_shutdown") is None]
    users = [i for i, it in enumerate(rest) if "engine" in getattr(it, "fixturenames", ())]
    at = users[-1] + 1 if users else len(rest)
    items[:] = rest[:at] + last + rest[at:]


@pytest.fixture(scope="session")
def tiny_dir():
    from espo_async.models.tiny import build_tiny_model, default_cache_dir, spec_hash, tiny_spec

    h = spec_hash(tiny_spec(ALPHABET))
    return build_tiny_model(default_cache_dir() / "models" / f"tiny-{h}", ALPHABET)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    m.eval()
    return m


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_dir):
    from espo_async.engines.vllm_engine import VLLMEngine

    eng = await VLLMEngine.create(
        tiny_dir,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        seed=0,
        kv_cache_gib=1,
    )
    try:
        yield eng
    finally:
        await eng.shutdown()
