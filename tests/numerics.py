"""Tolerances for comparing float32 results that were computed in a different order.

Micro-batching, data-parallel ranks and different batch shapes (which make oneDNN/MKL pick
other kernels and blockings) sum the same terms in another order. Float32 addition is not
associative, so the two results differ in their last bits, by an amount that depends on the CPU
(AVX-512 and AVX2 kernels block sums differently) and the thread count. A tolerance read off one
machine's output encodes that machine; these are derived from the arithmetic instead.

The bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 4.2): a
float32 sum of ``n`` terms in any order is within ``(n - 1) * u * sum |x_i|`` of the exact sum,
``u = eps / 2``; two orders are therefore within ``(n - 1) * eps * sum |x_i|`` of each other. A
gradient entry or a loss is such a sum over the batch's tokens, and ``sum |x_i|`` of one entry is
not observable, so the scale used is the largest magnitude in the whole tensor: an entry that
happens to be near zero (the terms cancel) gets the same absolute allowance as its neighbours,
which is what a relative tolerance cannot give it. The bound is a worst case (errors of random
sign grow like sqrt(n)); a mistake in the arithmetic under test (a micro-batch weighted wrongly,
a rank's gradient dropped) moves entries by a fraction of the scale, orders of magnitude above it.
"""

from __future__ import annotations

import torch

EPS32 = float(torch.finfo(torch.float32).eps)


def reorder_tol(n_terms: int, scale: float) -> float:
    """Largest difference two float32 summation orders of ``n_terms`` terms of magnitude up to
    ``scale`` can produce: ``(n - 1) * eps * n_scale``, with the terms' absolute sum bounded by the
    result's own scale (see the module docstring)."""
    return max(n_terms - 1, 1) * EPS32 * float(scale)


def assert_reordered_close(a: torch.Tensor, b: torch.Tensor, *, n_terms: int, what: str = "") -> None:
    """``a`` and ``b`` are the same float32 sums of ``n_terms`` terms taken in different orders:
    every entry agrees within :func:`reorder_tol` at the tensor's own scale."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) if a.numel() else 0.0
    tol = reorder_tol(n_terms, scale)
    worst = float((a - b).abs().max()) if a.numel() else 0.0
    assert worst <= tol, f"{what}: max |a - b| = {worst:.3g} > {tol:.3g} (n_terms {n_terms}, scale {scale:.3g})"
