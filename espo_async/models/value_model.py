"""The critic: a scalar value head on a transformer backbone (the base model, no LM head).

Positions (docs/architecture.md): ``values[t]`` is V(s_t), the value of the state in which
response token ``t`` is chosen, i.e. the prompt plus response tokens ``0..t-1``. A causal
backbone's hidden state at sequence position ``j`` summarises tokens ``0..j``, so

    V(s_t) = head(hidden[P + t - 1])        (P = prompt length; position P-1 = last prompt token)
    V(s_T) = head(hidden[P + T - 1])        (the bootstrap value: the last token of the sequence)

``ValueModel.forward`` returns one value per input position (the value of the prefix ending at
that position); callers pick positions ``P-1 .. P-1+T``. The prompt therefore needs at least
one token.

Saved weights (``state_dict`` / ``save_critic_weights``) are named ``backbone.<HF base-model
name>`` and ``head.weight`` / ``head.bias``; :func:`load_value_weights` reads them back into a
``ValueModel`` built from the same backbone directory.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from torch import nn

VALUE_FORMAT = "espo-value-model/1"
HEAD_INIT_STD = 0.01  # V(s) ~ N(0, HEAD_INIT_STD^2) at start (hidden states have ~unit RMS)

__all__ = ["ValueModel", "load_value_weights", "position_ids_from_mask", "quiet_loading", "VALUE_FORMAT"]


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' per-load report and progress bar (loading a causal LM checkpoint
    as a base model always "reports" the unused ``lm_head.weight``)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class ValueModel(nn.Module):
    """``forward(input_ids, attention_mask) -> values [B, L]`` (float32)."""

    def __init__(self, backbone: nn.Module, *, head_init_std: float = HEAD_INIT_STD,
                 seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = int(backbone.config.hidden_size)
        dtype = next(backbone.parameters()).dtype
        self.head = nn.Linear(hidden, 1, bias=True, dtype=dtype)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            w = torch.randn(1, hidden, generator=g, dtype=torch.float32) * (head_init_std / math.sqrt(hidden))
            self.head.weight.copy_(w.to(dtype))
            self.head.bias.zero_()

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        seed: int = 0, head_init_std: float = HEAD_INIT_STD) -> ValueModel:
        """Backbone of any HF checkpoint (a causal LM's ``model.*`` weights load as the base
        model) plus a fresh small-init head."""
        from transformers import AutoModel

        with quiet_loading():
            backbone = AutoModel.from_pretrained(str(model_dir), dtype=dtype)
        return cls(backbone, seed=seed, head_init_std=head_init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        return self.head(out.last_hidden_state).squeeze(-1).float()


def load_value_weights(model: ValueModel, source: str | os.PathLike | bytes, *,
                       strict: bool = True) -> None:
    """Load ``save_critic_weights`` output (a file path or a safetensors blob) into ``model``."""
    from safetensors.torch import load, load_file

    sd = load(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else load_file(str(Path(source)))
    model.load_state_dict(sd, strict=strict)
