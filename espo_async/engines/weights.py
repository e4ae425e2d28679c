"""Serialising model weights for hot updates of inference engines.

* ``state_dict_to_bytes(sd)`` -> a safetensors blob (in memory; for small models / sockets).
* ``save_weights_safetensors(sd_or_model, path)`` -> atomic write (tmp file + fsync + rename)
  and returns the file's sha256.

Names are HF checkpoint names (what ``model.state_dict()`` gives for a transformers model),
which is what vLLM's ``load_weights`` expects. For a model with tied input/output embeddings
``lm_head.weight`` is dropped (vLLM skips it anyway and safetensors refuses shared storage).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def _is_tied(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False))


def to_state_dict(
    obj: Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """A plain ``{name: contiguous CPU tensor}`` dict ready for safetensors.

    Accepts a state dict or an ``nn.Module``. Tensors sharing storage are cloned so that
    safetensors accepts them; ``dtype`` (if given) casts floating tensors.
    """
    if isinstance(obj, torch.nn.Module):
        sd = dict(obj.state_dict())
        if _is_tied(obj):
            sd.pop("lm_head.weight", None)
    else:
        sd = dict(obj)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: not a tensor ({type(t).__name__})")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        elif t.numel():
            # a view into a larger storage (or shared) would be saved whole: clone to be safe
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


def state_dict_to_bytes(
    obj: Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Serialise a state dict (or model) to an in-memory safetensors blob."""
    from safetensors.torch import save

    return save(to_state_dict(obj, dtype=dtype), metadata=metadata)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_weights_safetensors(
    obj: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Atomically and durably save a state dict (or model) as one safetensors file; return its
    sha256."""
    sha, _ = publish_safetensors(to_state_dict(obj, dtype=dtype), path, metadata=metadata, durable=True, digest=True)
    return sha


def publish_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    durable: bool = False,
    digest: bool = False,
) -> tuple[str, int]:
    """Write a state dict as one safetensors file for readers that poll by name (weight sync):
    straight to a temp file in the same folder (no in-memory copy of the whole blob), then an
    atomic rename, so a reader never sees a partial file. ``durable`` fsyncs before the rename
    (checkpoints; per-step weights are re-created from the checkpoint after a crash and skip
    it); ``digest`` returns the file's sha256, else "". Returns (sha256 or "", nbytes)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=metadata)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return (sha256_file(path) if digest else ""), path.stat().st_size


def load_safetensors(source: bytes | str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inverse of the above: a blob or a file path -> state dict (CPU tensors)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        from safetensors.torch import load

        return load(bytes(source))
    from safetensors.torch import load_file

    return load_file(str(source))


def safetensors_keys(source: bytes | bytearray | memoryview | str | os.PathLike) -> set[str]:
    """Tensor names in a safetensors blob or file, read from the header only (cheap)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        mv = memoryview(source)
        n = int.from_bytes(bytes(mv[:8]), "little")
        header = json.loads(bytes(mv[8 : 8 + n]))
    else:
        with open(source, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return set(header)


def checkpoint_keys(model_dir: str | os.PathLike) -> set[str]:
    """Tensor names of a HF safetensors checkpoint directory (single file or sharded)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for f in sorted(d.glob("*.safetensors")):
        keys |= safetensors_keys(f)
    return keys
