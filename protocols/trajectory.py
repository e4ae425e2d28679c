"""A trajectory's segmenting, beside the ``Trajectory`` type (protocols/messages.py).

With T-PPO windows (``rollout.window_tokens`` > 0) a sampler hands the learner every W new tokens
of a running rollout as an ``incomplete`` segment; espo_async/training/tppo.py explains the design.
"""

from __future__ import annotations

import numpy as np

from protocols import messages as P

__all__ = ["segment_trajectory"]


def segment_trajectory(work: P.PromptWork, token_ids: np.ndarray, logprobs: np.ndarray,
                       top1_logprobs: np.ndarray, versions: np.ndarray, start: int, end: int, *,
                       sampler_id: str, started_at: float = 0.0, ended_at: float = 0.0) -> P.Trajectory:
    """The incomplete segment of response tokens ``[start, end)`` of a rollout of ``work``
    (the arrays hold its response so far, at least ``end`` tokens)."""
    if not 0 <= start < end <= len(token_ids):
        raise ValueError(f"segment [{start}, {end}) outside a response of {len(token_ids)} tokens")
    prompt = np.asarray(work.prompt_token_ids, dtype=np.int32)
    prefix = np.concatenate([prompt, np.asarray(token_ids[:start], dtype=np.int32)])
    return P.Trajectory.answering(
        work,
        sampler_id=sampler_id,
        prompt_token_ids=prefix,
        token_ids=np.asarray(token_ids[start:end], dtype=np.int32),
        logprobs=np.asarray(logprobs[start:end], dtype=np.float32),
        top1_logprobs=np.asarray(top1_logprobs[start:end], dtype=np.float32),
        versions=np.asarray(versions[start:end], dtype=np.int32),
        ending="incomplete",
        finish_reason="window",
        tokens_generated=end - start,
        started_at=started_at,
        ended_at=ended_at,
        offset=start,
    )
