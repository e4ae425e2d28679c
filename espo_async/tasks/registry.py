"""``make_task(name, **options)``: build a task by name, validating its options.

Names: ``"arithmetic"``, ``"gsm8k"``, ``"math500"``, ``"dapo_math"``. The options are the keyword arguments of
the task class's ``__init__``; an unknown name or option raises ``ValueError`` listing what is
allowed (with defaults), and a bad value raises ``ValueError`` from the task itself.
"""

from __future__ import annotations

import inspect
from typing import Any

from .arithmetic import ArithmeticTask
from .base import Task
from .dapo_math import DapoMathTask
from .gsm8k import GSM8KTask
from .math500 import Math500Task

TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    GSM8KTask.name: GSM8KTask,
    Math500Task.name: Math500Task,
    DapoMathTask.name: DapoMathTask,
}


def task_names() -> list[str]:
    """Registered task names."""
    return sorted(TASKS)


def task_options(name: str) -> dict[str, Any]:
    """The options of task ``name`` and their defaults."""
    cls = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _lookup(name: str) -> type[Task]:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return TASKS[name]


def make_task(name: str, **options: Any) -> Task:
    """Build task ``name`` with ``options`` (e.g. ``make_task("arithmetic", n_steps=4, seed=1)``)."""
    cls = _lookup(name)
    allowed = task_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in allowed.items())
        raise ValueError(f"task {name!r}: unknown option(s) {', '.join(unknown)}; allowed options (defaults): {listing}")
    return cls(**options)
