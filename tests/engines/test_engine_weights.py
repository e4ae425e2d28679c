"""Weight serialisation and the engine's log-prob parsing (no engine: fast)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from espo_async.engines.vllm_engine import _fill_dict_logprobs, _parse_logprobs
from espo_async.engines.weights import (
    atomic_write_bytes,
    checkpoint_keys,
    load_safetensors,
    save_weights_safetensors,
    sha256_bytes,
    sha256_file,
    safetensors_keys,
    state_dict_to_bytes,
    to_state_dict,
)


def test_roundtrip_bytes_and_file(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.float32)}
    blob = state_dict_to_bytes(sd)
    back = load_safetensors(blob)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    p = tmp_path / "sub" / "w.safetensors"
    sha = save_weights_safetensors(sd, p)
    assert sha == sha256_file(p) == sha256_bytes(p.read_bytes())
    back = load_safetensors(p)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert [f.name for f in p.parent.iterdir()] == ["w.safetensors"]  # no temp file left


def test_safetensors_keys_from_header(tmp_path):
    sd = {"a.weight": torch.randn(2, 2), "b": torch.zeros(3)}
    blob = state_dict_to_bytes(sd, metadata={"format": "pt"})
    assert safetensors_keys(blob) == {"a.weight", "b"}
    save_weights_safetensors(sd, tmp_path / "model.safetensors")
    assert safetensors_keys(tmp_path / "model.safetensors") == {"a.weight", "b"}
    assert checkpoint_keys(tmp_path) == {"a.weight", "b"}


def test_shared_and_view_tensors_and_dtype():
    base = torch.randn(4, 4)
    sd = {"x": base, "y": base, "z": base[1:3], "i": torch.arange(3)}
    out = to_state_dict(sd, dtype=torch.bfloat16)
    assert out["x"].dtype == torch.bfloat16 and out["i"].dtype == torch.int64
    assert out["x"].data_ptr() != out["y"].data_ptr()
    back = load_safetensors(state_dict_to_bytes(sd))
    assert torch.equal(back["z"], base[1:3])


def test_tied_model_drops_lm_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    sd = to_state_dict(m)
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    load_safetensors(state_dict_to_bytes(m))  # safetensors accepts it


def test_atomic_write_replaces(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.bin"]


# ----------------------------------------------------------------------------- log-probs
@dataclass
class _Lp:  # what vllm.logprobs.Logprob looks like
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class _Flat:  # what vllm.logprobs.FlatLogprobs looks like
    start_indices: list
    end_indices: list
    token_ids: list
    logprobs: list
    ranks: list


def test_parse_flat_logprobs():
    # position 0: sampled 5 (rank 3) + top-1 7; position 1: sampled 7 IS top-1 (2 entries)
    flat = _Flat([0, 2], [2, 4], [5, 7, 7, 7], [-2.0, -0.5, -0.1, -0.1], [3, 1, 1, 1])
    s, t, tid, r = _parse_logprobs(flat, 2)
    np.testing.assert_array_equal(s, [-2.0, -0.1])
    np.testing.assert_array_equal(t, [-0.5, -0.1])
    np.testing.assert_array_equal(tid, [7, 7])
    np.testing.assert_array_equal(r, [3, 1])
    with pytest.raises(RuntimeError):
        _parse_logprobs(flat, 3)  # a token without log-probs is an error, never dropped


def test_parse_dict_logprobs_single_entry_when_sampled_is_top1():
    lps = [{5: _Lp(-2.0, 3), 7: _Lp(-0.5, 1)}, {7: _Lp(-0.1, 1)}]
    s, t, tid, r = _parse_logprobs(lps, 2)
    _fill_dict_logprobs(lps, [5, 7], s, t, tid, r)
    np.testing.assert_array_equal(s, [-2.0, -0.1])
    np.testing.assert_array_equal(t, [-0.5, -0.1])
    np.testing.assert_array_equal(tid, [7, 7])
    np.testing.assert_array_equal(r, [3, 1])
