"""Identifiers the actors agree on.

A prompt group is one dataset problem sampled ``samples_per_prompt`` times in one place of the
run: ``prompt_id = "g<group number>/<problem id>"``; one sample of it is
``request_id = "<prompt_id>#<sample index>"``. The group number makes a problem drawn twice
(a second epoch) two different groups. Evaluation rounds use ``"e<round>/<problem id>"``.
"""

from __future__ import annotations


def prompt_id(group: int, problem_id: str) -> str:
    return f"g{group}/{problem_id}"


def eval_prompt_id(round_: int, problem_id: str) -> str:
    return f"e{round_}/{problem_id}"


def request_id(prompt: str, sample: int) -> str:
    return f"{prompt}#{sample}"


def problem_id_of(prompt: str) -> str:
    """The dataset problem id inside a prompt id (the id itself if it has no group prefix)."""
    head, sep, rest = prompt.partition("/")
    return rest if sep and head[:1] in ("g", "e") and head[1:].isdigit() else prompt


def group_of(prompt: str) -> int | None:
    """The group number of a prompt id, or None if it has none."""
    head, sep, _ = prompt.partition("/")
    if sep and head.startswith("g") and head[1:].isdigit():
        return int(head[1:])
    return None


def work_tag(key: bytes, *, request_id: str, prompt_id: str, sample_index: int, group_size: int, attempt: int,
             purpose: str, prompt_token_ids) -> bytes:
    """The coordinator's proof that it issued one work item: HMAC-SHA256 (under the run's key,
    ``espo_async.runtime.keys.run_key``) of the item's identity, attempt, purpose and prompt tokens.
    A sampler copies it into its trajectory; the learner recomputes it and drops a trajectory whose
    tag does not match (forged, from another run, or its identity or prompt altered)."""
    import hashlib
    import hmac

    import numpy as np

    prompt = np.ascontiguousarray(np.asarray(prompt_token_ids, dtype=np.int64))
    head = "\x1f".join((request_id, prompt_id, str(int(sample_index)), str(int(group_size)), str(int(attempt)), purpose))
    mac = hmac.new(key, head.encode("utf-8", "surrogatepass"), hashlib.sha256)
    mac.update(b"\x1e")
    mac.update(prompt.tobytes())
    return mac.digest()


def tag_ok(key: bytes, tag: bytes, **identity) -> bool:
    """Whether ``tag`` is the coordinator's tag of the work ``identity`` names (constant time)."""
    import hmac

    return len(tag) == 32 and hmac.compare_digest(tag, work_tag(key, **identity))
