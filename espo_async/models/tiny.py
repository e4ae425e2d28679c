"""A tiny, randomly initialised Llama-architecture causal LM with a character-level tokenizer.

It exists so that the whole system (vLLM sampling, critics, learner) can run end to end on a
2-core CPU in seconds. Architecture notes:

* LlamaForCausalLM, not Qwen2ForCausalLM: both run on vLLM CPU and CUDA builds, but
  transformers 5 lists ``qwen2`` in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`` and so
  ``AutoTokenizer`` (also used by vLLM) loads any qwen2 checkpoint as ``Qwen2Tokenizer``, which
  rebuilds a byte-level BPE from the vocab: a character tokenizer then silently drops ``\n``.
  For ``llama`` the saved ``tokenizer.json`` is loaded as is (``TokenizersBackend``). Llama is
  also SmolLM2's architecture, so the tiny model and the real one share vLLM code paths.
* The vLLM CPU attention backend supports head sizes 32, 64, 80, ... only, so the defaults are
  ``hidden=64, heads=2, kv_heads=1`` (head_dim 32). ``head_dim`` may be given explicitly
  (Llama supports ``heads * head_dim != hidden``); a head_dim < 32 is rejected.
* The tokenizer maps every character of ``alphabet`` to one token. Special tokens come first:
  ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the alphabet in order. Nothing is
  added automatically when encoding (no BOS): callers prepend ``bos_token_id`` themselves if
  they want it. The decoder is ``Fuse`` so decoding concatenates characters without spaces
  (vLLM's incremental detokenizer reproduces the text exactly).
* Weights are saved in fp32 safetensors. The build is deterministic for a given spec (seed
  included) and cached: a directory holding a complete build of the same spec hash is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from espo_async.utils import atomic_dir

# Bump when the build procedure changes in a way that changes the output.
BUILD_VERSION = 2
SPEC_FILE = "espo_tiny_spec.json"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

#: Default alphabet: digits, arithmetic, ASCII letters, punctuation, space and newline.
DEFAULT_ALPHABET = (
    "0123456789+-*/=()<>.,:;?!%^'\"#_ \n"
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

MIN_HEAD_DIM = 32  # vLLM CPU attention: supported head sizes start at 32


def default_cache_dir() -> Path:
    """``$ESPO_CACHE`` if set, else ``~/.cache/espo-async``."""
    env = os.environ.get("ESPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "espo-async"


def tiny_spec(
    alphabet: str,
    *,
    n_layers: int = 2,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int | None = None,
    intermediate: int | None = None,
    max_position: int = 512,
    seed: int = 0,
    tie_embeddings: bool = False,
    initializer_range: float = 0.02,
) -> dict[str, Any]:
    """The canonical spec dictionary (validated) that identifies a tiny build."""
    if not alphabet:
        raise ValueError("alphabet must not be empty")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has duplicate characters")
    for s in SPECIAL_TOKENS:
        if s in alphabet:  # pragma: no cover - multi-char strings can't be in a char set
            raise ValueError(f"alphabet must not contain {s!r}")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    if head_dim < MIN_HEAD_DIM or head_dim % 8:
        raise ValueError(
            f"head_dim = {head_dim}: the vLLM CPU attention backend needs >= {MIN_HEAD_DIM} "
            "(and a multiple of 8); use fewer heads, a larger hidden size or an explicit head_dim"
        )
    return {
        "build_version": BUILD_VERSION,
        "alphabet": alphabet,
        "n_layers": int(n_layers),
        "hidden": int(hidden),
        "heads": int(heads),
        "kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "intermediate": int(intermediate if intermediate is not None else 4 * hidden),
        "max_position": int(max_position),
        "seed": int(seed),
        "tie_embeddings": bool(tie_embeddings),
        "initializer_range": float(initializer_range),
    }


def spec_hash(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_complete_build(out_dir: str | os.PathLike, expected_hash: str | None = None) -> bool:
    """True if ``out_dir`` holds a finished build (optionally of the given spec hash)."""
    p = Path(out_dir) / SPEC_FILE
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    if expected_hash is not None and meta.get("spec_hash") != expected_hash:
        return False
    return all((Path(out_dir) / f).exists() for f in meta.get("files", []))


def build_char_tokenizer(alphabet: str):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``alphabet``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=None,
    )
    return fast


def _write_build(tmp: Path, spec: dict[str, Any], h: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer(spec["alphabet"])
    vocab_size = len(tokenizer)
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["n_layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        head_dim=spec["head_dim"],
        max_position_embeddings=spec["max_position"],
        initializer_range=spec["initializer_range"],
        tie_word_embeddings=spec["tie_embeddings"],
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        rms_norm_eps=1e-6,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"

    # Deterministic init: seed a private generator for the global RNG during construction.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        do_sample=True,
    ).save_pretrained(tmp)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    meta = {"spec": spec, "spec_hash": h, "files": files, "vocab_size": vocab_size,
            "special_token_ids": ids}
    (tmp / SPEC_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def build_tiny_model(
    out_dir: str | os.PathLike | None,
    alphabet: str = DEFAULT_ALPHABET,
    *,
    n_layers: int = 2,
    hidden: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int | None = None,
    intermediate: int | None = None,
    max_position: int = 512,
    seed: int = 0,
    tie_embeddings: bool = False,
    initializer_range: float = 0.02,
    force: bool = False,
) -> Path:
    """Build (or reuse) a tiny Llama-architecture model directory loadable by transformers and vLLM.

    ``out_dir=None`` puts it under ``default_cache_dir()/models/tiny-<spec hash>``.
    The directory is written to a temporary sibling and renamed into place, so concurrent
    builders and interrupted builds never leave a half-written model behind.
    """
    spec = tiny_spec(
        alphabet,
        n_layers=n_layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        max_position=max_position,
        seed=seed,
        tie_embeddings=tie_embeddings,
        initializer_range=initializer_range,
    )
    h = spec_hash(spec)
    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "models" / f"tiny-{h}"
    out = out.expanduser().resolve()
    if not force and is_complete_build(out, h):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # someone else finished first: keep theirs
    with atomic_dir(out, keep=lambda d: not force and is_complete_build(d, h)) as tmp:
        _write_build(tmp, spec, h)
    return out


def load_spec(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata written by ``build_tiny_model`` (None for other model directories)."""
    try:
        return json.loads((Path(model_dir) / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None
