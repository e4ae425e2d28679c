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
