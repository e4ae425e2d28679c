"""Synthetic multi-step arithmetic: a chain of operations evaluated strictly left to right.

Built for a tiny character-level model that is SFT-warmed on gold step-by-step solutions and
then RL-trained. Every step uses the previous step's result, so one early mistake dooms the
final answer (which is what early stopping should learn to detect).

Text format (all within :data:`ALPHABET`)::

    prompt      Q:17+5*3-8;                       (format_prompt; Problem.prompt is "17+5*3-8")
    solution    17+5=22;22*3=66;66-8=58;A=58.     (one "a<op>b=c" step per operation, then the answer)

* The chain is evaluated left to right, with no operator precedence: ``17+5*3-8`` means
  ``((17+5)*3)-8``.
* Steps are separated by ``;`` (:data:`SEP`); the completion ends with ``.`` (:data:`END`),
  which samplers may use as a stop string (the scorer accepts the completion with or without it;
  anything after the first ``.`` is ignored).
* Only non-negative integers appear, written in canonical decimal (no sign, no leading zeros).
* Bounded mode (default): the operation and operand of each step are drawn among those that keep
  the running value in ``[0, max_value]`` (``-`` never goes below 0, ``*`` never exceeds
  ``max_value``, ``/`` is exact division only). Modulus mode (``modulus=m``): every result is
  reduced mod ``m`` (``17*8=36`` with ``m=100``); operators ``+-*`` only.
* ``*`` and ``/`` always use operands >= 2 (no ``*0``, which would erase an earlier mistake,
  and no ``*1``/``/1`` no-op steps); in modulus mode ``*`` never uses a multiple of ``m``. In
  bounded mode every step is injective in the previous value, so a wrong intermediate result
  (followed by correct arithmetic) always gives a wrong final answer; in modulus mode this
  holds when ``m`` is prime.

Train/eval split: a problem belongs to the eval split iff a keyed hash of its expression falls
below ``eval_fraction``, independently of the seed, so no expression can ever be in both
splits. Eval problems are distinct; train problems are i.i.d. draws and may repeat.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import cached_property

from .base import Problem, Task, stable_seed

#: Every prompt, solution and answer of this task is made of these characters only.
ALPHABET = "0123456789+-*/=;:.AQ"
#: Separator between steps.
SEP = ";"
#: End-of-completion marker (also the task's stop string).
END = "."
#: Prompt prefix and suffix: ``format_prompt(p) == PROMPT_PREFIX + p.prompt + PROMPT_SUFFIX``.
PROMPT_PREFIX = "Q:"
PROMPT_SUFFIX = SEP
#: The final segment of a completion: ``A=<answer>``.
ANSWER_PREFIX = "A="

OPERATORS = "+-*/"

_ANSWER_RE = re.compile(r"A=([0-9]{1,40})")
_TERM_RE = re.compile(r"([+\-*/])([0-9]+)")
_SPLIT_KEY = b"espo-async/arithmetic/split/v1"


def _divisors_in(n: int, lo: int, hi: int) -> list[int]:
    """Sorted divisors of ``n > 0`` within ``[lo, hi]``."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return [d for d in small + large[::-1] if lo <= d <= hi]


def eval_bucket(expr: str) -> float:
    """Deterministic number in [0, 1) for an expression; ``< eval_fraction`` means eval split."""
    h = hashlib.blake2b(expr.encode(), digest_size=8, key=_SPLIT_KEY)
    return int.from_bytes(h.digest(), "big") / 2**64


class ArithmeticTask(Task):
    """Multi-step left-to-right integer arithmetic with step-by-step gold solutions.

    Options (all keyword):
        n_steps: number of operations per problem (the difficulty), >= 1.
        n_steps_max: if given, each problem draws its number of steps uniformly from
            ``[n_steps, n_steps_max]`` (a mixed-difficulty curriculum).
        operand_min, operand_max: range of the first number and of every operand.
        max_value: bounded mode: every intermediate result stays in ``[0, max_value]``.
        modulus: if given, modulus mode instead: results are reduced mod ``modulus``.
        operators: subset of ``"+-*/"`` (``/`` is exact division; not allowed with a modulus).
        n_train, n_eval: sizes of the two splits.
        eval_fraction: fraction of the expression space reserved for eval (hash-based).
        seed: seed of the training problems; eval_seed (default: seed) of the eval problems.
    """

    name = "arithmetic"
    alphabet = ALPHABET
    stop_strings = (END,)

    def __init__(
        self,
        *,
        n_steps: int = 3,
        n_steps_max: int | None = None,
        operand_min: int = 1,
        operand_max: int = 20,
        max_value: int = 99,
        modulus: int | None = None,
        operators: str = "+-*",
        n_train: int = 10_000,
        n_eval: int = 128,
        eval_fraction: float = 0.2,
        seed: int = 0,
        eval_seed: int | None = None,
    ) -> None:
        def _int(name: str, value: object, lo: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"arithmetic: {name} must be an integer >= {lo}, got {value!r}")
            return value

        self.n_steps = _int("n_steps", n_steps, 1)
        self.n_steps_max = self.n_steps if n_steps_max is None else _int("n_steps_max", n_steps_max, self.n_steps)
        self.operand_min = _int("operand_min", operand_min, 0)
        self.operand_max = _int("operand_max", operand_max, self.operand_min)
        self.max_value = _int("max_value", max_value, 1)
        self.modulus = None if modulus is None else _int("modulus", modulus, 2)
        if not isinstance(operators, str) or not operators or len(set(operators)) != len(operators):
            raise ValueError(f"arithmetic: operators must be a non-empty string of distinct characters from {OPERATORS!r}")
        if set(operators) - set(OPERATORS):
            raise ValueError(f"arithmetic: unknown operators {sorted(set(operators) - set(OPERATORS))}; allowed: {OPERATORS!r}")
        if self.modulus is not None and "/" in operators:
            raise ValueError("arithmetic: '/' is not allowed together with a modulus")
        if ("*" in operators or "/" in operators) and self.operand_max < 2:
            raise ValueError("arithmetic: '*' and '/' use operands >= 2, so they need operand_max >= 2")
        if self.modulus is None and self.operand_min > self.max_value:
            raise ValueError("arithmetic: operand_min must be <= max_value")
        self.operators = "".join(op for op in OPERATORS if op in operators)  # canonical order
        # modulus mode: multipliers that are not multiples of the modulus (x*b must depend on x)
        self._mod_mul_operands: list[int] = []
        if self.modulus is not None and "*" in self.operators:
            lo = max(self.operand_min, 2)
            if self.operand_max - lo > 100_000:
                raise ValueError("arithmetic: operand range too large for modulus mode (at most 100,000 values)")
            self._mod_mul_operands = [b for b in range(lo, self.operand_max + 1) if b % self.modulus]
            if not self._mod_mul_operands:
                raise ValueError("arithmetic: with this modulus every '*' operand is a multiple of it")
        self.n_train = _int("n_train", n_train, 0)
        self.n_eval = _int("n_eval", n_eval, 0)
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
            raise ValueError(f"arithmetic: eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.eval_fraction = float(eval_fraction)
        self.seed = _int("seed", seed, -(2**63))
        self.eval_seed = self.seed if eval_seed is None else _int("eval_seed", eval_seed, -(2**63))

    # -- generation -----------------------------------------------------------------------------

    def _apply(self, a: int, op: str, b: int) -> int:
        if op == "+":
            r = a + b
        elif op == "-":
            r = a - b
        elif op == "*":
            r = a * b
        else:
            r = a // b
        return r % self.modulus if self.modulus is not None else r

    def _operands(self, cur: int, op: str) -> tuple[int, int] | list[int] | None:
        """Operands allowed for ``cur op b``: an inclusive range, an explicit list, or None."""
        lo, hi = self.operand_min, self.operand_max
        if op in "*/":
            lo = max(lo, 2)  # no *0 (erases earlier mistakes), no *1 or /1 (no-op steps)
        if self.modulus is not None:
            if op == "*":
                return self._mod_mul_operands or None
            return (lo, hi) if lo <= hi else None
        if op == "+":
            hi = min(hi, self.max_value - cur)
        elif op == "-":
            hi = min(hi, cur)
        elif op == "*":
            if cur > 0:
                hi = min(hi, self.max_value // cur)
        elif op == "/" and cur > 0:
            return _divisors_in(cur, lo, hi) or None
        return (lo, hi) if lo <= hi else None

    def _draw(self, rng: random.Random) -> str | None:
        """One random expression, or None on a dead end (no operation keeps values in bounds)."""
        n = rng.randint(self.n_steps, self.n_steps_max)
        hi0 = self.operand_max if self.modulus is not None else min(self.operand_max, self.max_value)
        cur = rng.randint(self.operand_min, hi0)
        parts = [str(cur)]
        for _ in range(n):
            choices = [(op, spec) for op in self.operators if (spec := self._operands(cur, op)) is not None]
            if not choices:
                return None
            op, spec = choices[rng.randrange(len(choices))]
            b = rng.choice(spec) if isinstance(spec, list) else rng.randint(*spec)
            cur = self._apply(cur, op, b)
            parts.append(f"{op}{b}")
        return "".join(parts)

    def _is_eval(self, expr: str) -> bool:
        return eval_bucket(expr) < self.eval_fraction

    def _generate(self, split: str, count: int, seed: int) -> list[Problem]:
        # The generator options are part of the seed: tasks of different difficulty draw
        # unrelated streams instead of sharing prefixes.
        params = (self.n_steps, self.n_steps_max, self.operand_min, self.operand_max, self.max_value, self.modulus, self.operators)
        rng = random.Random(stable_seed("arithmetic", split, seed, *params))
        want_eval = split == "eval"
        problems: list[Problem] = []
        seen: set[str] = set()
        budget = 10_000 + int(50 * count / (self.eval_fraction if want_eval else 1 - self.eval_fraction))
        for _ in range(budget):
            if len(problems) == count:
                break
            expr = self._draw(rng)
            if expr is None or self._is_eval(expr) != want_eval:
                continue
            if want_eval:
                if expr in seen:
                    continue
                seen.add(expr)
            problems.append(self.make_problem(expr, f"arith-{split}-{len(problems):06d}", split=split))
        if len(problems) < count:
            raise ValueError(
                f"arithmetic: could only generate {len(problems)} of {count} {split} problems with these options "
                f"(the problem space is too small or dead ends are too frequent); lower n_{split}, raise "
                "eval_fraction/operand_max/n_steps, or add operators"
            )
        return problems

    def make_problem(self, expr: str, problem_id: str = "", *, split: str = "") -> Problem:
        """A :class:`Problem` for an explicit chain such as ``"17+5*3-8"`` (useful in tests)."""
        steps = self._steps(expr)
        answer = str(steps[-1][3])
        return Problem(
            id=problem_id or "arith-" + expr.replace("/", "d"),  # no "/" in ids
            prompt=expr,
            answer=answer,
            meta={"expr": expr, "n_steps": len(steps), "values": [s[3] for s in steps], "split": split},
        )

    @cached_property
    def _train(self) -> list[Problem]:
        return self._generate("train", self.n_train, self.seed)

    @cached_property
    def _eval(self) -> list[Problem]:
        return self._generate("eval", self.n_eval, self.eval_seed)

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    # -- text -----------------------------------------------------------------------------------

    def _steps(self, expr: str) -> list[tuple[int, str, int, int]]:
        """``[(a, op, b, result), ...]`` for a chain ``expr``, evaluated left to right."""
        m = re.match(r"[0-9]+", expr)
        if m is None:
            raise ValueError(f"arithmetic: not a chain expression: {expr!r}")
        cur = int(m.group())
        steps = []
        pos = m.end()
        for t in _TERM_RE.finditer(expr, pos):
            if t.start() != pos:
                break
            op, b = t.group(1), int(t.group(2))
            if op == "/" and (b == 0 or cur % b):
                raise ValueError(f"arithmetic: inexact division in {expr!r}")
            new = self._apply(cur, op, b)
            steps.append((cur, op, b, new))
            cur, pos = new, t.end()
        if pos != len(expr) or not steps:
            raise ValueError(f"arithmetic: not a chain expression: {expr!r}")
        return steps

    def _gold_segments(self, problem: Problem) -> list[str]:
        segs = [f"{a}{op}{b}={r}" for a, op, b, r in self._steps(problem.prompt)]
        segs.append(f"{ANSWER_PREFIX}{problem.answer}")
        return segs

    def format_prompt(self, problem: Problem) -> str:
        return f"{PROMPT_PREFIX}{problem.prompt}{PROMPT_SUFFIX}"

    def solution(self, problem: Problem) -> str:
        """Gold completion, e.g. ``17+5=22;22*3=66;66-8=58;A=58.`` (ends with :data:`END`)."""
        return SEP.join(self._gold_segments(problem)) + END

    # -- checking -------------------------------------------------------------------------------

    def extract_answer(self, completion: str) -> str | None:
        """Digits of the last segment before the first END if it reads ``A=<digits>``, else None."""
        if not isinstance(completion, str):
            return None
        cut = completion.find(END)
        text = completion if cut < 0 else completion[:cut]
        last = text[text.rfind(SEP) + 1 :]
        m = _ANSWER_RE.fullmatch(last)
        return m.group(1) if m else None

    def is_correct(self, problem: Problem, answer: str) -> bool:
        """Exact string match with the canonical gold answer (``"058"`` is not ``"58"``)."""
        return answer == problem.answer

    def first_error_position(self, problem: Problem, completion: str) -> int | None:
        """Index of the first character that deviates from the gold solution, or None.

        The completion is cut after its first END. ``None`` means the completion is the gold
        solution or a prefix of it (with or without the END): nothing written so far is wrong.
        With a character-level tokenizer this is also the index of the first wrong token.
        """
        gold = self.solution(problem)
        cut = completion.find(END)
        text = completion if cut < 0 else completion[: cut + 1]
        for i, (c, g) in enumerate(zip(text, gold)):
            if c != g:
                return i
        return len(gold) if len(text) > len(gold) else None

    def step_errors(self, problem: Problem, completion: str) -> int | None:
        """Index of the first wrong step of ``completion``, or None if no step is wrong so far.

        Steps are numbered ``0 .. n_steps-1`` for the operations and ``n_steps`` for the final
        ``A=<answer>`` segment. The completion (cut after its first END) is split at ``;``:

        * a finished segment (followed by ``;`` or END) is wrong if it differs from the gold
          segment, e.g. ``22*3=65`` or ``17+5=221``;
        * ending too early (END after step ``k < n_steps``) is an error in step ``k+1`` (the step
          that is missing); anything after the answer segment other than END is an error in the
          answer step;
        * the unfinished last segment is wrong only if it is not a prefix of the gold segment:
          a completion cut off mid-step that matches the gold so far has no error (None), which
          is what an early stop that did *not* hit a real failure looks like.
        """
        gold = self._gold_segments(problem)
        last = len(gold) - 1
        cut = completion.find(END)
        ended = cut >= 0
        text = completion[:cut] if ended else completion
        pieces = text.split(SEP)
        for i, piece in enumerate(pieces):
            if i > last:
                return last  # more segments after the answer
            finished = i < len(pieces) - 1 or ended
            if not finished:
                return None if gold[i].startswith(piece) else i
            if piece != gold[i]:
                return i
            if i < len(pieces) - 1 and i == last:
                return last  # "A=58;" instead of "A=58."
            if i == len(pieces) - 1 and ended and i < last:
                return i + 1  # END before the answer: the next step is missing
        return None
