"""The reward for verifiable answers: the task's verifier applied to a trajectory's text.

The problem of a trajectory is found from its prompt id (``espo_async.ids``) in the task's train
and eval splits. A trajectory whose problem is unknown scores 0 and is counted.
"""

from __future__ import annotations

from espo_async.ids import problem_id_of
from espo_async.tasks.base import Problem, Task


class TaskReward:
    def __init__(self, task: Task):
        self.task = task
        self.problems: dict[str, Problem] = {p.id: p for p in task.train_problems()}
        self.problems.update({p.id: p for p in task.eval_problems()})
        self.unknown = 0

    def problem_of(self, prompt_id: str) -> Problem | None:
        return self.problems.get(problem_id_of(prompt_id))

    def __call__(self, prompt_id: str, text: str) -> float:
        problem = self.problem_of(prompt_id)
        if problem is None:
            self.unknown += 1
            return 0.0
        return float(self.task.score(problem, text))
