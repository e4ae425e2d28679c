"""Verifiable tasks: synthetic multi-step arithmetic, GSM8K and MATH-500, and answer checking.

Typical use::

    from espo_async.tasks import make_task
    task = make_task("arithmetic", n_steps=4, seed=0)
    p = task.train_problems()[0]
    text = task.format_prompt(p)            # what the model sees
    reward = task.score(p, completion)      # 1.0 / 0.0

See docs/tasks.md.
"""

from .arithmetic import ALPHABET, END, SEP, ArithmeticTask
from .base import Problem, Task
from .dapo_math import DapoMathTask
from .gsm8k import GSM8KTask
from .math500 import Math500Task
from .registry import TASKS, make_task, task_names, task_options
from .verify import answers_match, extract_boxed, extract_final_answer

__all__ = [
    "ALPHABET",
    "END",
    "SEP",
    "TASKS",
    "ArithmeticTask",
    "DapoMathTask",
    "GSM8KTask",
    "Math500Task",
    "Problem",
    "Task",
    "answers_match",
    "extract_boxed",
    "extract_final_answer",
    "make_task",
    "task_names",
    "task_options",
]
