"""Log-depth scan for first-order linear recurrences.

    x_t = a_t * x_{t-1} + b_t,   x_{-1} = 0          (forward)
    x_t = a_t * x_{t+1} + b_t,   x_T   = 0          (reverse)

Both the ESPO smoothing z_t = a_s z_{t-1} + (1 - a_s) gn_t and the GAE recursion
A_t = delta_t + gamma*lambda*A_{t+1} are of this form. The scan is Hillis-Steele: ceil(log2 T)
steps, each one vectorised over all tokens, so there is no Python loop over tokens. Pairs
(a, b) compose as (a1, b1) then (a2, b2) = (a1*a2, a2*b1 + b2). Multiplications and additions
are separate elementwise ops (no fused multiply-add), so results do not depend on the device's
FMA contraction; they differ from a sequential loop only by float rounding (association order).
"""

from __future__ import annotations

import torch

__all__ = ["linear_scan"]


def linear_scan(a: torch.Tensor | float, b: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """Solve x_t = a_t x_{t-1} + b_t along the last dim (x_{-1} = 0); `reverse` runs from the end.

    `a` is a scalar or a tensor broadcastable to `b`. Returns a tensor shaped like `b`.
    """
    b = torch.as_tensor(b)
    if b.dim() == 0:
        raise ValueError("linear_scan needs at least one dimension")
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, float(a))
    else:
        a = torch.broadcast_to(a.to(b.dtype), b.shape)
    if reverse:
        a = a.flip(-1)
        b = b.flip(-1)
    n = b.shape[-1]
    A, B = a, b
    d = 1
    while d < n:
        # positions t >= d absorb the already-composed prefix ending at t - d
        B = torch.cat([B[..., :d], B[..., d:] + A[..., d:] * B[..., :-d]], dim=-1)
        if 2 * d < n:  # A is not needed after the last step
            A = torch.cat([A[..., :d], A[..., d:] * A[..., :-d]], dim=-1)
        d *= 2
    return B.flip(-1) if reverse else B
