"""Final-answer extraction and checking for GSM8K / MATH-style completions.

``answers_match(gold, pred)`` decides whether an extracted answer equals the gold answer:

1. normalised strings equal (whitespace, ``\\left``/``\\right``, ``\\dfrac``, ``$``, ``\\%``,
   ``^\\circ``, thousands separators, ``\\text{..}`` wrappers, trailing ``.``) -> correct;
2. both plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``): equal -> correct,
   two different integers -> wrong (a numeric gold also accepts ``18 dollars``);
3. otherwise the real ``math_verify`` package: ``parse`` both (each wrapped in ``\\boxed{..}``,
   LaTeX extraction) and ``verify(gold, pred)`` (symbolic / numeric equivalence, sets,
   intervals, matrices, ...);
4. if math_verify is unavailable, fails, times out, or the input is outside the guard below ->
   wrong (the string compare of step 1 already failed).

Safety (this is reward code: it runs on arbitrary model output):

* It never raises: every ``Exception`` (and math_verify's ``TimeoutException``) means "wrong".
* It never touches signals. math_verify's own timeout is ``signal.alarm``-based: with its
  defaults it raises ``ValueError`` in any non-main thread (even with ``raise_on_error=False``),
  and in the main thread it swaps the SIGALRM handler and calls ``signal.alarm(0)`` afterwards,
  which cancels any other ``ITIMER_REAL`` timer of the process (pytest-timeout's, say). A signal
  cannot stop C-level big-integer arithmetic either (``10^{10^{10}}``, ``123!!``), so it would
  not prevent the real hangs. We pass ``parsing_timeout=None`` / ``timeout_seconds=None``.
* Hard time limit: by default math_verify runs in a child Python process (started on first use,
  only ``math_verify`` imported there) and each comparison gets :data:`HARD_TIMEOUT_S` seconds
  of wall-clock time; on timeout the child is killed (and restarted on the next call) and the
  answer counts as wrong. The child also has an address-space limit
  (:data:`WORKER_MEMORY_LIMIT`) and dies with its parent (Linux ``PR_SET_PDEATHSIG``; it is
  started from a dedicated daemon thread since that signal follows the starting *thread*).
  ``configure(hard_timeout_s=None)`` runs math_verify inline instead (no hard limit).
* A cheap guard (:func:`is_sympy_safe`) keeps known-expensive inputs away from sympy so the
  hard limit is rarely hit: at most ``MAX_SYMPY_CHARS`` characters, bracket nesting at most
  ``MAX_BRACKET_DEPTH`` (the ANTLR LaTeX parser costs ~0.1 s per level), no power towers,
  integer exponents at most ``MAX_EXPONENT`` (``MAX_GROUP_EXPONENT`` on a bracketed base:
  ``(x+1)^{200}`` takes seconds to expand), factorials only of literals <= ``MAX_FACTORIAL``
  (``123!!`` hangs), no sums/products/integrals/limits. Only the tail
  (``MAX_COMPLETION_CHARS``) of a completion is searched for an answer.
* Results for (gold, pred) pairs are cached (LRU), and calls are serialised by a lock.

All functions are synchronous and thread-safe. Inside an asyncio program call them directly for
a few answers, or through ``loop.run_in_executor`` for many (a comparison can take up to
``HARD_TIMEOUT_S`` in the worst case; typical ones take 1-10 ms, plain numbers microseconds).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

#: Only the last this-many characters of a completion are searched for the final answer.
MAX_COMPLETION_CHARS = 16_000
#: Extracted answers longer than this are compared as strings only (and truncated for that).
MAX_ANSWER_CHARS = 512
#: math_verify/sympy only sees answers up to this many characters...
MAX_SYMPY_CHARS = 128
#: ...with bracket nesting ((, [, {) at most this deep...
MAX_BRACKET_DEPTH = 4
#: ...integer literals in exponents at most this large (on a bracketed base: MAX_GROUP_EXPONENT)...
MAX_EXPONENT = 1_000
MAX_GROUP_EXPONENT = 24
#: ...and factorials / binomials of literals at most this large.
MAX_FACTORIAL = 1_000

#: Wall-clock limit (s) for one math_verify comparison in the worker process (None: inline).
HARD_TIMEOUT_S: float | None = 3.0
#: Address-space limit of the worker process (bytes; 0: none).
WORKER_MEMORY_LIMIT = 4 << 30
#: How long the worker may take to start (import math_verify) before we give up on it.
WORKER_START_TIMEOUT_S = 60.0

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer is\s*:?\s*([^\n]+)", re.IGNORECASE)
_INT_RE = re.compile(r"\d+")
_UNSAFE_CMD_RE = re.compile(r"\\(?:sum|prod|int|iint|iiint|oint|lim|limsup|liminf|coprod|bigcup|bigcap)(?![a-zA-Z])")
_FACT_RE = re.compile(r"(?<!\\)!|binom|choose")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}")
_SLASH_RE = re.compile(r"([-+]?\d+)/([-+]?\d+)")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# number + words (whitespace already removed); one character class, so no backtracking blow-up
_NUMBER_WITH_UNITS_RE = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))([A-Za-z][A-Za-z.]+)")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|textnormal|operatorname)\s*\{([^{}]*)\}")


# ---------------------------------------------------------------------------------------------
# extraction


def _match_brace(text: str, open_pos: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``open_pos``, or -1."""
    depth = 0
    for i in range(open_pos, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``), or None."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_COMPLETION_CHARS:]
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for pos in reversed(starts[-32:]):
        j = pos
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _match_brace(text, j)
            if end >= 0:
                return text[j + 1 : end].strip()
        elif j > pos:  # "\boxed 5": up to whitespace or '$'
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                return m.group().rstrip(".")
    return None


def _clean_inline(ans: str) -> str:
    ans = ans.strip()
    m = re.match(r"\$([^$]+)\$", ans) or re.match(r"\\\((.+?)\\\)", ans)
    if m:
        return m.group(1).strip()
    # cut at the end of the sentence ("18. So ..."), but not inside a decimal number
    ans = re.split(r"\.(?:\s|$)", ans, maxsplit=1)[0]
    return ans.strip().strip("$").strip()


def extract_final_answer(completion: str) -> str | None:
    """The final answer of a free-form solution, or None.

    In order: the last complete ``\\boxed{...}``; else the last ``#### <answer>`` line (GSM8K
    style); else the last ``answer is <answer>`` (up to the end of the sentence or line).
    """
    if not isinstance(completion, str):
        return None
    text = completion[-MAX_COMPLETION_CHARS:]
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed or None
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        last = None
        for last in pattern.finditer(text):
            pass
        if last is not None:
            ans = _clean_inline(last.group(1))[:MAX_ANSWER_CHARS]
            if ans:
                return ans
    return None


# ---------------------------------------------------------------------------------------------
# normalisation and plain numbers


def normalize_answer(s: str) -> str:
    """Light, conservative normalisation used for the string compare."""
    s = s.strip()[:MAX_ANSWER_CHARS]
    for _ in range(3):  # nested wrappers
        s = _TEXT_WRAP_RE.sub(lambda m: m.group(1), s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = re.sub(r"\\(?:!|,|;|:| |displaystyle(?![a-zA-Z]))", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return s


def parse_number(s: str) -> Fraction | None:
    """A normalised answer as an exact rational if it is a plain number (``-3``, ``2.50``,
    ``7/2``, ``\\frac{7}{2}``, ``-\\frac{7}{2}``), else None."""
    try:
        if _NUMBER_RE.fullmatch(s):
            return Fraction(s)
        m = _FRAC_RE.fullmatch(s)
        if m:
            f = Fraction(int(m.group(2)), int(m.group(3)))
            return -f if m.group(1) == "-" else f
        m = _SLASH_RE.fullmatch(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


# ---------------------------------------------------------------------------------------------
# the guard in front of sympy


def _bracket_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth = max(0, depth - 1)
    return best


def _braces_balanced(s: str) -> bool:
    depth = 0
    for c in s:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _exponents(s: str) -> list[tuple[bool, str]]:
    """``(base_is_bracketed, argument)`` for every ``^`` / ``**`` in ``s``."""
    out = []
    for m in re.finditer(r"\^|\*\*", s):
        i = m.start() - 1
        while i >= 0 and s[i] == " ":
            i -= 1
        grouped = i >= 0 and s[i] in ")]}|"
        j = m.end()
        while j < len(s) and s[j] == " ":
            j += 1
        if j >= len(s):
            continue
        if s[j] in "{(":
            close = "}" if s[j] == "{" else ")"
            depth, k = 0, j
            while k < len(s):
                if s[k] == s[j]:
                    depth += 1
                elif s[k] == close:
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            out.append((grouped, s[j : k + 1]))
        else:
            t = re.match(r"\d+|\\?[A-Za-z]+|.", s[j:])
            out.append((grouped, t.group() if t else s[j]))
    return out


def is_sympy_safe(s: str) -> bool:
    """Whether ``s`` is small and tame enough to hand to math_verify/sympy (see module doc)."""
    if not s or len(s) > MAX_SYMPY_CHARS or _bracket_depth(s) > MAX_BRACKET_DEPTH:
        return False
    if not _braces_balanced(s) or _BOXED_RE.search(s):
        return False  # would change meaning once wrapped in \\boxed{...}
    if _UNSAFE_CMD_RE.search(s):
        return False
    for grouped, arg in _exponents(s):
        if "^" in arg or "**" in arg or "!" in arg or "binom" in arg:
            return False  # power tower / factorial in an exponent
        limit = MAX_GROUP_EXPONENT if grouped else MAX_EXPONENT
        if any(int(n) > limit for n in _INT_RE.findall(arg)):
            return False
    if _FACT_RE.search(s):
        if "^" in s or "**" in s or any(int(n) > MAX_FACTORIAL for n in _INT_RE.findall(s)):
            return False
        for m in re.finditer(r"(?<!\\)!", s):  # n! of a literal only: no (..)!, x!, 5!!
            before = s[m.start() - 1] if m.start() else ""
            after = s[m.end()] if m.end() < len(s) else ""
            if not before.isdigit() or after == "!":
                return False
    return True


# ---------------------------------------------------------------------------------------------
# math_verify, inline


class _DropTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return "Timeout is disabled" not in record.getMessage()


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    """The math_verify module (imported lazily: ~0.4 s), or None if it is not installed."""
    try:
        import math_verify
        from math_verify import LatexExtractionConfig
    except Exception:  # noqa: BLE001
        return None
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutWarning())
    math_verify._espo_config = [LatexExtractionConfig(boxed_match_priority=0)]  # type: ignore[attr-defined]
    return math_verify


def math_verify_available() -> bool:
    """Whether the ``math_verify`` package can be imported."""
    return _math_verify() is not None


_INLINE_LOCK = threading.Lock()


def _inline_equal(gold: str, pred: str) -> bool | None:
    """math_verify in this process, no signals, no time limit; None if undecided."""
    mv = _math_verify()
    if mv is None:
        return None
    try:
        with _INLINE_LOCK:
            cfg = mv._espo_config
            g = mv.parse("\\boxed{" + gold + "}", extraction_config=cfg, parsing_timeout=None)
            p = mv.parse("\\boxed{" + pred + "}", extraction_config=cfg, parsing_timeout=None)
            if not g or not p:
                return None
            return bool(mv.verify(g, p, timeout_seconds=None))
    except BaseException as e:  # noqa: BLE001 - TimeoutException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        return None


# ---------------------------------------------------------------------------------------------
# math_verify, in a worker process with a hard time limit

# Runs in the child: reads {"g": gold, "p": pred} lines, answers "1" / "0" / "-" (undecided).
_WORKER_CODE = r"""
import json, os, signal, sys
parent, mem = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:  # die with the parent (Linux)
    import ctypes
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != parent:
    sys.exit(0)
if mem > 0:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    except Exception:
        pass
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
import logging
logging.disable(logging.CRITICAL)
from math_verify import LatexExtractionConfig, parse, verify
cfg = [LatexExtractionConfig(boxed_match_priority=0)]
out.write("ready\n"); out.flush()
for line in sys.stdin:
    try:
        req = json.loads(line)
        g = parse("\\boxed{" + req["g"] + "}", extraction_config=cfg, parsing_timeout=None)
        p = parse("\\boxed{" + req["p"] + "}", extraction_config=cfg, parsing_timeout=None)
        res = "-" if not g or not p else ("1" if verify(g, p, timeout_seconds=None) else "0")
    except BaseException:
        res = "-"
    out.write(res + "\n"); out.flush()
"""

_UNAVAILABLE = object()


_EOF = "<eof>"


class _Spawner:
    """Starts processes from one long-lived daemon thread.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that started the child exits, so a worker
    started from a short-lived thread (a ThreadPoolExecutor being shut down) would be killed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Any, list, threading.Event]] | None = None

    def run(self, fn: Any) -> Any:
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._loop, args=(self._queue,), name="math-verify-spawner", daemon=True).start()
            q = self._queue
        box: list = []
        done = threading.Event()
        q.put((fn, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    @staticmethod
    def _loop(q: queue.SimpleQueue) -> None:
        while True:
            fn, box, done = q.get()
            try:
                box.append(fn())
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.append(e)
            done.set()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._queue = None


class _Worker:
    """One child process running math_verify; killed on timeout and restarted on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spawner = _Spawner()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._failed = False  # the worker could not start: use inline math_verify
        self.restarts = 0

    def _start(self) -> bool:
        args = [sys.executable, "-c", _WORKER_CODE, str(os.getpid()), str(WORKER_MEMORY_LIMIT)]
        try:
            proc = self._spawner.run(
                lambda: subprocess.Popen(
                    args,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    close_fds=True,
                    bufsize=0,
                )
            )
        except OSError:
            return False
        self._proc, self._buf = proc, b""
        if self._readline(WORKER_START_TIMEOUT_S) != "ready":
            self._kill()
            return False
        return True

    def _kill(self) -> None:
        proc, self._proc, self._buf = self._proc, None, b""
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001
                pass

    def _readline(self, timeout: float) -> str | None:
        """The next reply line; None on timeout, ``_EOF`` if the worker died."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return _EOF
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def _ask(self, gold: str, pred: str, timeout: float) -> str | None | object:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            if not self._start():
                self._failed = True
                log.warning("math_verify worker process could not start; checking answers inline")
                return _UNAVAILABLE
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps({"g": gold, "p": pred}) + "\n").encode())
        except OSError:
            return _EOF
        return self._readline(timeout)

    def check(self, gold: str, pred: str, timeout: float) -> bool | None | object:
        """True / False / None (undecided or timed out), or _UNAVAILABLE (use inline)."""
        with self._lock:
            if self._failed:
                return _UNAVAILABLE
            reply = self._ask(gold, pred, timeout)
            if reply is _EOF:  # the worker died under us (killed from outside?): one retry
                self._kill()
                self.restarts += 1
                reply = self._ask(gold, pred, timeout)
            if reply is _UNAVAILABLE:
                return _UNAVAILABLE
            if reply not in ("0", "1", "-"):
                self._kill()  # timed out, died or garbled: restart on the next call
                self.restarts += 1
                return None
            return None if reply == "-" else reply == "1"

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _after_fork_in_child(self) -> None:
        # The parent's worker (and its pipes) must not be shared: start our own when needed.
        self._lock = threading.Lock()
        self._spawner.reset()
        self._proc, self._buf = None, b""


_WORKER = _Worker()
atexit.register(_WORKER.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKER._after_fork_in_child)


def configure(*, hard_timeout_s: float | None = 3.0, memory_limit: int = 4 << 30) -> None:
    """Set the per-comparison hard time limit (None: run math_verify inline, no limit) and the
    worker's address-space limit, and clear the result cache."""
    global HARD_TIMEOUT_S, WORKER_MEMORY_LIMIT
    if hard_timeout_s is not None and not hard_timeout_s > 0:
        raise ValueError("hard_timeout_s must be > 0 or None")
    HARD_TIMEOUT_S = hard_timeout_s
    WORKER_MEMORY_LIMIT = int(memory_limit)
    _WORKER.close()
    _cached_equal.cache_clear()


@lru_cache(maxsize=65_536)
def _cached_equal(gold: str, pred: str) -> bool | None:
    timeout = HARD_TIMEOUT_S
    if timeout is not None and os.name == "posix" and math_verify_available():
        res = _WORKER.check(gold, pred, timeout)
        if res is not _UNAVAILABLE:
            return res  # type: ignore[return-value]
    return _inline_equal(gold, pred)


def math_verify_equal(gold: str, pred: str) -> bool | None:
    """``math_verify.verify(parse(gold), parse(pred))``, safely: None if it could not decide
    (package missing, input outside :func:`is_sympy_safe`, nothing parsed, error or timeout)."""
    if not isinstance(gold, str) or not isinstance(pred, str):
        return None
    gold, pred = gold.strip(), pred.strip()
    if not is_sympy_safe(gold) or not is_sympy_safe(pred):
        return None
    try:
        return _cached_equal(gold, pred)
    except Exception:  # noqa: BLE001
        return None


def answers_match(gold: str, pred: str | None, *, use_math_verify: bool = True) -> bool:
    """Whether ``pred`` (an extracted final answer) equals ``gold``. Never raises."""
    try:
        if not isinstance(gold, str) or not isinstance(pred, str):
            return False
        ng, np_ = normalize_answer(gold), normalize_answer(pred)
        if not np_:
            return False
        if ng == np_:
            return True
        fg, fp = parse_number(ng), parse_number(np_)
        if fg is not None and fp is None:
            # a numeric gold and "18 dollars", "\\text{18 apples}", "5cm": drop the words
            m = _NUMBER_WITH_UNITS_RE.fullmatch(np_)
            if m:
                pred, fp = m.group(1), parse_number(m.group(1))
        if fg is not None and fp is not None:
            if fg == fp:
                return True
            if fg.denominator == 1 and fp.denominator == 1:
                return False  # distinct integers: nothing more to ask math_verify
            # otherwise math_verify decides (e.g. it accepts 4.666667 for 14/3, 6-decimal rounding)
        if use_math_verify:
            res = math_verify_equal(gold.strip(), pred.strip())
            if res is not None:
                return res
        return False
    except Exception:  # noqa: BLE001
        return False
