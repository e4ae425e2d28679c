"""Synthetic multi-step arithmetic task."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_async.tasks import ALPHABET, END, SEP, make_task
from espo_async.tasks.arithmetic import ArithmeticTask, eval_bucket

SMALL = dict(n_train=200, n_eval=50)


def _chars_ok(text: str) -> bool:
    return set(text) <= set(ALPHABET)


# -- format ----------------------------------------------------------------------------------------


def test_worked_example():
    task = ArithmeticTask()
    p = task.make_problem("17+5*3-8")
    assert p.answer == "58"
    assert task.format_prompt(p) == "Q:17+5*3-8;"
    assert task.solution(p) == "17+5=22;22*3=66;66-8=58;A=58."
    assert p.meta["values"] == [22, 66, 58]
    assert task.stop_strings == (END,)


def test_modulus_and_division():
    mod = ArithmeticTask(modulus=100)
    p = mod.make_problem("17*8+90")
    assert mod.solution(p) == "17*8=36;36+90=26;A=26."
    div = ArithmeticTask(operators="+-*/")
    assert div.solution(div.make_problem("12/4*5")) == "12/4=3;3*5=15;A=15."
    with pytest.raises(ValueError):
        div.make_problem("12/5")  # inexact


def test_alphabet_constant():
    assert len(set(ALPHABET)) == len(ALPHABET)
    assert set("0123456789+-*/=;:.AQ") == set(ALPHABET)
    assert SEP in ALPHABET and END in ALPHABET


# -- determinism and splits ------------------------------------------------------------------------


def test_deterministic_per_seed():
    a = ArithmeticTask(n_steps=4, seed=3, **SMALL)
    b = ArithmeticTask(n_steps=4, seed=3, **SMALL)
    assert a.train_problems() == b.train_problems()
    assert a.eval_problems() == b.eval_problems()
    c = ArithmeticTask(n_steps=4, seed=4, **SMALL)
    assert [p.prompt for p in c.train_problems()] != [p.prompt for p in a.train_problems()]
    # eval_seed pins the eval set independently of the training seed
    d = ArithmeticTask(n_steps=4, seed=4, eval_seed=3, **SMALL)
    assert d.eval_problems() == a.eval_problems()


def test_golden_problems():
    """Pinned output: generation must not depend on the process (hash seed, platform) or drift
    silently between versions (seeded runs must stay reproducible). Only blake2b and
    random.Random(int) feed the generator, so these values are the same everywhere."""
    t = make_task("arithmetic", n_steps=3, seed=7, n_train=5, n_eval=3)
    assert [p.prompt for p in t.train_problems()] == ["1-1+12*5", "5+11*5-15", "13-9-4+5", "3+13+5+17", "15*4-14+12"]
    assert [p.prompt for p in t.eval_problems()] == ["16-12*19-9", "11*6+15+8", "12*2-3+11"]
    m = make_task("arithmetic", n_steps=6, modulus=97, seed=1, n_train=3, n_eval=2)
    assert [p.prompt for p in m.train_problems()] == ["4+16+2-14+9+9-4", "14+3*11-4-19-17-12", "19-12-18-12+18-20-9"]
    assert [p.answer for p in m.train_problems()] == ["22", "38", "63"]
    assert abs(eval_bucket("17+5*3-8") - 0.49944389204855233) < 1e-12


def test_split_disjoint_and_hash_based():
    task = ArithmeticTask(n_steps=2, operand_max=9, n_train=3000, n_eval=100)
    train = {p.prompt for p in task.train_problems()}
    evals = [p.prompt for p in task.eval_problems()]
    assert len(set(evals)) == len(evals) == 100  # eval problems are distinct
    assert not train & set(evals)
    assert all(eval_bucket(e) < task.eval_fraction for e in evals)
    assert all(eval_bucket(e) >= task.eval_fraction for e in train)
    # the split does not depend on the seed: another seed's train never holds these eval problems
    other = ArithmeticTask(n_steps=2, operand_max=9, n_train=3000, n_eval=10, seed=99)
    assert not {p.prompt for p in other.train_problems()} & set(evals)
    ids = [p.id for p in task.train_problems()] + [p.id for p in task.eval_problems()]
    assert len(set(ids)) == len(ids)


def test_no_trivial_or_erasing_operands():
    task = ArithmeticTask(n_steps=6, operand_min=0, operators="+-*/", n_train=2000, n_eval=10)
    for p in task.train_problems():
        for a, op, b, _ in task._steps(p.prompt):
            if op in "*/":
                assert b >= 2, p.prompt
    mod = ArithmeticTask(n_steps=6, modulus=7, operand_max=30, n_train=500, n_eval=10)
    for p in mod.train_problems():
        assert all(b % 7 for _, op, b, _ in mod._steps(p.prompt) if op == "*"), p.prompt


def test_n_steps_range_and_bounds():
    task = ArithmeticTask(n_steps=2, n_steps_max=6, max_value=50, operand_max=12, **SMALL)
    steps = {p.meta["n_steps"] for p in task.train_problems()}
    assert steps == set(range(2, 7))
    for p in task.train_problems():
        assert all(0 <= v <= 50 for v in p.meta["values"])


# -- scoring ---------------------------------------------------------------------------------------


def test_gold_scores_one_and_variants():
    task = ArithmeticTask(n_steps=5, **SMALL)
    for p in task.train_problems() + task.eval_problems():
        sol = task.solution(p)
        assert task.score(p, sol) == 1.0
        assert task.score(p, sol[:-1]) == 1.0  # stop string stripped by the sampler
        assert task.score(p, sol + "12+3=15;A=99.") == 1.0  # after the first END: ignored
        assert task.extract_answer(sol) == p.answer
        assert task.step_errors(p, sol) is None


def test_answer_must_be_exact():
    task = ArithmeticTask()
    p = task.make_problem("17+5*3-8")
    steps = "17+5=22;22*3=66;66-8=58;"
    assert task.score(p, steps + "A=58.") == 1.0
    assert task.score(p, "A=58.") == 1.0  # the reward is on the final answer only
    for bad in ("A=57.", "A=058.", "A=58;", "A=58;A=59.", "A=5 8.", "A=+58.", "A=.", "58.", "A58.", ""):
        assert task.score(p, steps + bad) == 0.0, bad
    assert task.score(p, steps + "A=59.A=58.") == 0.0
    assert task.extract_answer("garbage\x00\n;;;A=") is None


def _corrupt(task: ArithmeticTask, expr: str, k: int, delta: int) -> tuple[str, int]:
    """A self-consistent chain whose step ``k`` result is off by ``delta`` (later steps use it)."""
    steps = task._steps(expr)
    cur = steps[0][0]
    segs = []
    for i, (_, op, b, _) in enumerate(steps):
        new = task._apply(cur, op, b)
        if i == k:
            new = new + delta if new + delta >= 0 else new + abs(delta) + 1
        segs.append(f"{cur}{op}{b}={new}")
        cur = new
    return SEP.join(segs) + f"{SEP}A={cur}{END}", cur


def test_step_errors_examples():
    task = ArithmeticTask()
    p = task.make_problem("17+5*3-8")
    cases = {
        "17+5=23;23*3=69;69-8=61;A=61.": 0,
        "17+5=22;22*3=65;65-8=57;A=57.": 1,
        "17+5=22;22*3=66;66-8=57;A=57.": 2,
        "17+5=22;22*3=66;66-8=58;A=57.": 3,
        "17+5=22;22*3=66;66-8=58.": 3,  # stopped before the answer
        "17+5=22;22*3=66;66-8=58;A=58;": 3,
        "17+5=22;22*3=66;66-8=58;A=58;A=58.": 3,
        "A=58.": 0,
        "17+5=221;221*3=663;663-8=655;A=655.": 0,  # the result continues where gold has ';'
        "17+5=22*3=66;": 0,
        "17+5=22.": 1,  # ended after step 0: step 1 is missing
        ".": 0,
        "18+5=23;": 0,
        "17+5=22;22*4": 1,
        "17+5=22;22*3=66": None,  # a correct prefix: nothing wrong yet
        "17+5=22;22*3=6": None,
        "17+5=22;22*3=66;": None,
        "": None,
        "17+5=22;22*3=66;66-8=58;A=58": None,
        "17+5=22;22*3=66;66-8=58;A=58.": None,
        "17+5=22;22*3=66;66-8=58;A=58.junk": None,
    }
    for completion, expected in cases.items():
        assert task.step_errors(p, completion) == expected, completion
    assert task.first_error_position(p, "17+5=22;22*3=65") == len("17+5=22;22*3=6")
    assert task.first_error_position(p, "17+5=22;22*3=66") is None


@settings(max_examples=60)
@given(
    n_steps=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    pick=st.integers(0, 10_000),
    step_frac=st.floats(0, 0.999),
    delta=st.integers(-9, 9).filter(bool),
    modulus=st.one_of(st.none(), st.integers(7, 200)),
)
def test_corrupted_chain_fails_at_its_first_wrong_step(n_steps, seed, pick, step_frac, delta, modulus):
    task = ArithmeticTask(n_steps=n_steps, seed=seed, modulus=modulus, n_train=20, n_eval=1, eval_fraction=0.5)
    p = task.train_problems()[pick % 20]
    k = int(step_frac * n_steps)
    completion, final = _corrupt(task, p.prompt, k, delta)
    assert task.step_errors(p, completion) == k
    assert task.score(p, completion) == (1.0 if str(final) == p.answer else 0.0)
    # truncating right before the wrong step leaves no error
    good_prefix = SEP.join(task.solution(p).split(SEP)[:k])
    assert task.step_errors(p, good_prefix) is None


# -- alphabet over many seeds and difficulties (property) ------------------------------------------


@settings(max_examples=80)
@given(
    n_steps=st.integers(1, 10),
    extra_steps=st.integers(0, 3),
    operand_min=st.integers(0, 3),
    operand_span=st.integers(5, 60),
    value_span=st.integers(0, 900),
    modulus=st.one_of(st.none(), st.integers(2, 1000)),
    extra_ops=st.sampled_from(["", "*", "/", "*/"]),
    seed=st.integers(-(2**40), 2**40),
)
def test_all_text_within_alphabet(n_steps, extra_steps, operand_min, operand_span, value_span, modulus, extra_ops, seed):
    operand_max = operand_min + operand_span
    ops = "+-" + (extra_ops.replace("/", "") if modulus else extra_ops)
    task = make_task(
        "arithmetic",
        n_steps=n_steps,
        n_steps_max=n_steps + extra_steps,
        operand_min=operand_min,
        operand_max=operand_max,
        max_value=operand_max + value_span,
        modulus=modulus,
        operators=ops,
        n_train=20,
        n_eval=3,
        eval_fraction=0.5,
        seed=seed,
    )
    bound = modulus - 1 if modulus else operand_max + value_span
    for p in task.train_problems() + task.eval_problems():
        sol = task.solution(p)
        for text in (p.prompt, p.answer, task.format_prompt(p), sol):
            assert _chars_ok(text), text
        assert sol.endswith(END) and sol.count(END) == 1
        assert n_steps <= p.meta["n_steps"] <= n_steps + extra_steps
        assert all(0 <= v <= bound for v in p.meta["values"])
        assert task.score(p, sol) == 1.0
        assert task.step_errors(p, sol) is None


# -- options and speed -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(n_steps=0),
        dict(n_steps=3, n_steps_max=2),
        dict(operators="+x"),
        dict(operators=""),
        dict(operators="++"),
        dict(modulus=10, operators="+/"),
        dict(modulus=1),
        dict(operators="+*", operand_max=1),
        dict(operators="+*", modulus=2, operand_min=2, operand_max=2),
        dict(eval_fraction=1.0),
        dict(operand_min=5, operand_max=4),
        dict(n_steps=2.5),
        dict(seed="x"),
    ],
)
def test_bad_options(options):
    with pytest.raises(ValueError):
        ArithmeticTask(**options)


def test_too_small_space_is_a_clear_error():
    task = ArithmeticTask(n_steps=1, operand_min=1, operand_max=2, max_value=4, n_eval=20)
    with pytest.raises(ValueError, match="could only generate"):
        task.eval_problems()


def test_scoring_is_fast():
    task = ArithmeticTask(n_steps=8, n_train=1000, n_eval=10)
    problems = task.train_problems()
    completions = [task.solution(p) if i % 2 else task.solution(p)[:-3] + "7." for i, p in enumerate(problems)]
    t0 = time.perf_counter()
    scores = task.score_batch(problems, completions)
    steps = [task.step_errors(p, c) for p, c in zip(problems, completions)]
    elapsed = time.perf_counter() - t0
    assert sum(scores) >= 500 and steps.count(None) == sum(scores)
    assert elapsed < 1.0, elapsed
