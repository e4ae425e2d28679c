"""Answer extraction and checking (math_verify wrapper): correctness, safety, threads, asyncio."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_async.tasks import verify as verify_mod
from espo_async.tasks.verify import (
    answers_match,
    extract_boxed,
    extract_final_answer,
    is_sympy_safe,
    math_verify_available,
    math_verify_equal,
    normalize_answer,
)

needs_mv = pytest.mark.skipif(not math_verify_available(), reason="math_verify is not installed")


@pytest.fixture(scope="module", autouse=True)
def _warm_worker():
    """Start the math_verify worker once, so timing assertions do not include its start-up."""
    answers_match("x^2+1", "1+x^2")
    yield



# -- extraction ------------------------------------------------------------------------------------


def test_extract_boxed():
    assert extract_boxed("so \\boxed{18}.") == "18"
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{\\text{(A)}}") == "\\text{(A)}"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed 5.") == "5"
    assert extract_boxed("\\boxed{3} and \\boxed{4") == "3"  # last *complete* box
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{") is None


def test_extract_final_answer_fallbacks():
    assert extract_final_answer("... \\boxed{42}") == "42"
    assert extract_final_answer("work\n#### 1,080") == "1,080"
    assert extract_final_answer("The answer is 18. Done") == "18"
    assert extract_final_answer("The final answer is $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_final_answer("the answer is 3.5") == "3.5"
    assert extract_final_answer("I don't know") is None
    assert extract_final_answer("\\boxed{}") is None
    assert extract_final_answer(None) is None  # type: ignore[arg-type]


def test_normalize_answer():
    assert normalize_answer("\\$1,080.") == "1080"
    assert normalize_answer("90^\\circ") == "90"
    assert normalize_answer("\\left( 3, \\dfrac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("\\text{Evelyn}") == "Evelyn"
    assert normalize_answer("10,\\!080") == "10080"


# -- correctness -----------------------------------------------------------------------------------

EQUAL = [
    ("18", "18"),
    ("18", "18.00"),
    ("18", "\\$18"),
    ("18", "18 dollars"),
    ("1080", "1,080"),
    ("-50", "-50"),
    ("0.5", "\\frac12"),
    ("0.5", "1/2"),
    ("\\frac{14}{3}", "14/3"),
    ("\\frac{14}{3}", "\\dfrac{14}{3}"),
    ("90^\\circ", "90"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\$32,\\!348", "32348"),
]
EQUAL_MV = [
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("3\\sqrt{13}", "\\sqrt{117}"),
    ("1,-2", "-2, 1"),
    ("p - q", "-q+p"),
    ("x=5", "5"),
    ("5", "2+3"),
    ("\\frac{14}{3}", "4.666667"),
]
DIFFERENT = [
    ("18", "17"),
    ("18", "18 x"),
    ("18", ""),
    ("\\frac{14}{3}", "4.67"),
    ("3\\sqrt{13}", "\\sqrt{118}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi)"),
    ("p - q", "q - p"),
]


@pytest.mark.parametrize("gold,pred", EQUAL)
def test_equal(gold, pred):
    assert answers_match(gold, pred)


@needs_mv
@pytest.mark.parametrize("gold,pred", EQUAL_MV)
def test_equal_via_math_verify(gold, pred):
    assert answers_match(gold, pred)
    assert not answers_match(gold, pred, use_math_verify=False)


@pytest.mark.parametrize("gold,pred", DIFFERENT)
def test_different(gold, pred):
    assert not answers_match(gold, pred)


def test_non_strings():
    assert not answers_match("1", None)
    assert not answers_match(None, "1")  # type: ignore[arg-type]
    assert not answers_match("1", 1)  # type: ignore[arg-type]


# -- safety: hostile inputs ------------------------------------------------------------------------

HOSTILE = [
    "10^{10^{10}}",
    "9^{9^{9^{9}}}",
    "2^{2^{100}}",
    "9**9**9**9",
    "(10^{10})!",
    "(x+1)^{100000}",
    "x^{99999999}+1",
    "\\binom{10^{8}}{5*10^7}",
    "100000!",
    "\\sqrt{2}^{10^{9}}",
    "\\sum_{k=1}^{10^{9}} k",
    "(" * 30 + "1" + ")" * 30,
    "{" * 20 + "1" + "}" * 20,
    "\\frac{1}{" * 20 + "2" + "}" * 20,
    "1}+\\boxed{18",
    "1" * 5000,
    "\\frac{1}{0}",
    "\x00\ufffd\\",
    "123!!",
    "(5!)!",
    "(x+1)^{200}",
    "(e+\\pi)^{5000}",
]


@pytest.mark.parametrize("pred", HOSTILE)
def test_hostile_inputs_are_fast_and_false(pred):
    t0 = time.perf_counter()
    assert not answers_match("18", pred)
    assert not answers_match("\\frac{1}{2}", pred)
    assert time.perf_counter() - t0 < 2.0
    assert not is_sympy_safe(pred) or len(pred) < 30


@needs_mv
@pytest.mark.skipif(verify_mod.os.name != "posix", reason="the worker process is POSIX-only")
def test_worker_process_lifecycle(monkeypatch):
    worker = verify_mod._WORKER
    worker.close()
    # 1. started from a pool thread, it outlives that thread (PR_SET_PDEATHSIG is per thread)
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(math_verify_equal, "2x", "x+x").result() is True
    time.sleep(0.2)
    proc = worker._proc
    assert proc is not None and proc.poll() is None
    # 2. killed from outside: replaced, and the answer is not lost
    proc.kill()
    proc.wait()
    assert math_verify_equal("3x", "x+2x") is True
    # 3. the hard limit: this passes the guard, but sympy expands 2^11 terms for seconds
    default_timeout = verify_mod.HARD_TIMEOUT_S
    monkeypatch.setattr(verify_mod, "HARD_TIMEOUT_S", 0.5)
    slow = "(a+b)(c+d)(e+f)(g+h)(k+l)(m+n)(o+p)(q+r)(s+t)(u+v)(w+z)"
    assert is_sympy_safe(slow)
    restarts = worker.restarts
    t0 = time.perf_counter()
    assert not answers_match("x^2+1", slow)
    assert time.perf_counter() - t0 < 0.5 + 1.5
    assert worker.restarts == restarts + 1 and worker._proc is None
    # a fresh worker answers again (with the default limit: starting one on a loaded machine can
    # take longer than the 0.5 s above)
    monkeypatch.setattr(verify_mod, "HARD_TIMEOUT_S", default_timeout)
    assert answers_match("x^2+1", "x^2+2-1")


@needs_mv
def test_inline_mode(monkeypatch):
    monkeypatch.setattr(verify_mod, "HARD_TIMEOUT_S", None)
    verify_mod._cached_equal.cache_clear()
    try:
        assert math_verify_equal("3\\sqrt{13}", "\\sqrt{117}") is True
        with ThreadPoolExecutor(max_workers=2) as pool:
            assert all(pool.map(lambda gp: answers_match(*gp), EQUAL_MV))
    finally:
        verify_mod._cached_equal.cache_clear()


def test_hostile_completion_is_fast():
    completion = ("\\boxed{" * 3000) + "x" * 100_000 + "The answer is 10^{10^{10}}"
    t0 = time.perf_counter()
    ans = extract_final_answer(completion)
    assert not answers_match("18", ans)
    assert time.perf_counter() - t0 < 2.0


_LATEXISH = st.lists(
    st.sampled_from(
        ["\\frac", "{", "}", "(", ")", "[", "]", "^", "_", "!", "\\sqrt", "\\pi", "\\boxed{", "x", "y", "=", ",", "-",
         "+", "*", "/", ".", " ", "\\left(", "\\right)", "\\text{", "\\infty", "\\cdot", "i", "e", "0", "1", "2", "9",
         "99", "12345", "\\\\", "$", "\\binom", "\\circ", "%", "\\in", "\\cup", "<", "\\le"]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=100)
@given(gold=st.sampled_from(["18", "\\frac{1}{2}", "3\\sqrt{13}", "(3,\\frac{\\pi}{2})", "x^2+1", "\\text{Evelyn}"]),
       pred=st.one_of(st.text(max_size=200), _LATEXISH))
def test_never_raises_on_garbage(gold, pred):
    t0 = time.perf_counter()
    assert answers_match(gold, pred) in (True, False)
    assert extract_final_answer(pred) is None or isinstance(extract_final_answer(pred), str)
    assert answers_match(gold, extract_final_answer("\\boxed{" + pred + "}")) in (True, False)
    assert time.perf_counter() - t0 < 10.0  # never hangs (a worker restart on a loaded machine takes seconds)


# -- threads, asyncio, signals ---------------------------------------------------------------------

CHECKS = EQUAL + EQUAL_MV + DIFFERENT


def _expected() -> list[bool]:
    return [answers_match(g, p) for g, p in CHECKS]


@needs_mv
def test_works_from_threads():
    expected = _expected()
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            assert list(pool.map(lambda gp: answers_match(*gp), CHECKS)) == expected
    # a plain non-main thread as well
    out: list = []
    t = threading.Thread(target=lambda: out.append(math_verify_equal("3\\sqrt{13}", "\\sqrt{117}")))
    t.start()
    t.join()
    assert out == [True]


@needs_mv
async def test_works_inside_event_loop():
    expected = _expected()
    assert [answers_match(g, p) for g, p in CHECKS] == expected  # directly on the loop thread
    loop = asyncio.get_running_loop()
    got = await asyncio.gather(*(loop.run_in_executor(None, answers_match, g, p) for g, p in CHECKS))
    assert list(got) == expected


@needs_mv
@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX timers only")
def test_does_not_touch_sigalrm():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        for g, p in EQUAL_MV:
            assert answers_match(g, p)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert remaining > 0, "someone cancelled our ITIMER_REAL (signal.alarm)"
        assert signal.getsignal(signal.SIGALRM) is not old
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired
