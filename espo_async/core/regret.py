"""Surrogate regret (ESPO step 1).

    g_t = max_a log pi(a | s_t) - log pi(a_t | s_t)  >= 0,   0 when the sampled token is the mode.

With an engine that returns the sampled token's logprob and the top-1 logprob (vLLM
`logprobs=1`), g_t = top1_logprob - sampled_logprob. From logits the log-partition cancels:
g_t = max_a l_a/T - l_{a_t}/T for temperature T.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["surrogate_regret", "surrogate_regret_from_logits"]


def surrogate_regret(sampled_logprob, top1_logprob):
    """g = max(top1_logprob - sampled_logprob, 0). Floats in -> float out; tensors -> tensor;
    numpy arrays -> float64 array. NaN propagates in every form.

    The clamp absorbs rounding when the sampled token is the mode (top1 == sampled up to ulp).
    """
    if isinstance(sampled_logprob, np.ndarray) or isinstance(top1_logprob, np.ndarray):
        diff = np.asarray(top1_logprob, np.float64) - np.asarray(sampled_logprob, np.float64)
        return np.maximum(diff, 0.0)  # np.maximum propagates NaN
    if isinstance(sampled_logprob, torch.Tensor) or isinstance(top1_logprob, torch.Tensor):
        s = torch.as_tensor(sampled_logprob)
        m = torch.as_tensor(top1_logprob)
        return torch.clamp(m - s, min=0.0)
    diff = float(top1_logprob) - float(sampled_logprob)
    if diff != diff:  # NaN propagates (Python's max would hide it depending on argument order)
        return diff
    return max(diff, 0.0)


def surrogate_regret_from_logits(
    logits: torch.Tensor, actions: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """g[...] = max_a log pi(a|s) - log pi(a_t|s) = (max_a l_a - l_{a_t}) / temperature.

    logits: [..., V]; actions: [...] integer token ids. Computed in at least float32.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    x = x / temperature
    top = x.max(dim=-1).values
    taken = x.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return torch.clamp(top - taken, min=0.0)
