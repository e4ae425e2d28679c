"""DAPO-Math-17k from a local file (the published row layout and the flat one)."""

from __future__ import annotations

import pytest

from espo_async.tasks import make_task
from espo_async.tasks.dapo_math import R1_TEMPLATE, strip_dapo_instruction, to_jsonl

WRAPPED = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{p}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def rows():
    published = [
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": WRAPPED.format(p=f"What is {i} + {i}?")}],
         "ability": "MATH", "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
         "extra_info": {"index": f"uuid-{i}"}}
        for i in range(5)
    ]
    return published + published[:2] + [{"problem": "What is 7 * 6?", "answer": "42"}]  # repeats are dropped


def test_reads_published_and_flat_rows_dedups_and_scores(tmp_path):
    path = tmp_path / "dapo.jsonl"
    to_jsonl(rows(), path)
    task = make_task("dapo_math", data_file=str(path), shuffle=False)
    train = task.train_problems()
    assert [p.prompt for p in train][:2] == ["What is 0 + 0?", "What is 1 + 1?"]
    assert len(train) == 6 and train[0].id == "dapo-uuid-0" and train[-1].answer == "42"
    assert len({p.id for p in train}) == 6 and not any("/" in p.id or "#" in p.id for p in train)
    text = task.format_prompt(train[1])
    assert text == R1_TEMPLATE.replace("{question}", "What is 1 + 1?")
    assert task.score(train[1], "<think>hmm \\boxed{3}</think> so \\boxed{2}") == 1.0
    assert task.score(train[1], "thinking...\nAnswer: 2") == 1.0
    assert task.score(train[1], "\\boxed{3}") == 0.0
    assert strip_dapo_instruction("plain") == "plain"


def test_no_data_is_a_clear_error_but_options_validate_without_it(monkeypatch):
    monkeypatch.delenv("ESPO_DAPO_MATH", raising=False)
    task = make_task("dapo_math")  # what run.py --check does: no file is read
    with pytest.raises(FileNotFoundError, match="DAPO-Math-17k"):
        task.train_problems()
    with pytest.raises(ValueError, match="prompt_template"):
        make_task("dapo_math", prompt_template="no placeholder")
