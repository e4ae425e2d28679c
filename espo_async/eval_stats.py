"""Statistics of held-out evaluations and of results over seeds (pure Python, no torch).

Held-out accuracy is pass@1 averaged over ``samples`` completions of each of ``problems``
problems. The samples of one problem are correlated (an easy problem is solved by all of them),
so its standard error is taken over problems, not over samples: the spread of per-problem mean
scores divided by sqrt(problems). With one sample per problem that is the binomial error; with
several it is larger than the binomial error of all samples pooled, and it is the honest one.
Two evaluations of the same problems (before and after training) are compared by the paired
error of the per-problem differences, which removes the problems' own difficulty from the noise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

#: Two-sided 95% Student t quantiles by degrees of freedom (1..30); the normal 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def per_problem_means(scores: Mapping[tuple[str, int], float] | Iterable[tuple[str, float]]) -> dict[str, float]:
    """Mean score per problem from ``{(problem_id, sample): score}`` or ``(problem_id, score)`` pairs."""
    items = ((k[0], v) for k, v in scores.items()) if isinstance(scores, Mapping) else scores
    acc: dict[str, list[float]] = defaultdict(list)
    for pid, s in items:
        acc[pid].append(float(s))
    return {pid: sum(v) / len(v) for pid, v in acc.items()}


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); (nan, nan) when empty, se nan for n = 1."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    if n == 1:
        return m, math.nan
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def accuracy_se(scores: Mapping[tuple[str, int], float]) -> tuple[float, float]:
    """Held-out accuracy and its standard error over problems (module docstring)."""
    return mean_se(list(per_problem_means(scores).values()))


def paired_difference(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[float, float, int]:
    """Mean per-problem difference after - before over the problems both evaluated, its standard
    error, and the number of problems."""
    common = sorted(set(before) & set(after))
    m, se = mean_se([after[p] - before[p] for p in common])
    return m, se, len(common)


def t95(n: int) -> float:
    """Two-sided 95% t quantile for the mean of ``n`` values (n - 1 degrees of freedom)."""
    if n < 2:
        return math.nan
    return _T95[n - 2] if n - 1 <= len(_T95) else 1.96


def mean_ci95(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t over the values)."""
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    m, se = mean_se(xs)
    return m, (se * t95(len(xs)) if len(xs) > 1 else math.nan)
