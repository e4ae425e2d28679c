"""experiments/eval_agreement.py: the per-problem scoring both evaluators share."""

from experiments.eval_agreement import per_problem


class _Task:
    def score(self, problem, text):
        return 1.0 if text == problem else 0.0


def test_per_problem_averages_each_problems_completions_separately():
    problems = ["a", "b"]
    rows = [(0, "a"), (1, "x"), (0, "z"), (1, "b"), (1, "b"), (0, "a")]
    assert per_problem(_Task(), problems, rows) == [2 / 3, 2 / 3]
    assert per_problem(_Task(), problems, [(0, "a"), (1, "a")]) == [1.0, 0.0]
