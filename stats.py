"""Intervals for the held-out figures every script reports: a normal 95% interval of a mean over
independent units (prompts, questions, prefixes), and of a paired difference between two arms
scored on the same units, each kept inside the range the quantity can take."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

Z95 = 1.96  # two-sided 95% quantile of the normal distribution


def bounded_interval(mean: float, half: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """[mean - half, mean + half] clipped to [low, high], the values the quantity can take: a normal
    95% interval of a rate near 0 or 1 otherwise reaches below 0 or above 1 (a difference of two
    rates: low=-1, high=1). NaN (too few samples) stays NaN."""
    if math.isnan(mean) or math.isnan(half):
        return [math.nan, math.nan]
    return [max(low, mean - half), min(high, mean + half)]


def mean_interval(
    values: Sequence[float], low: float = 0.0, high: float = 1.0
) -> tuple[float, list[float]]:
    """(mean, 95% interval): mean +- 1.96 sd / sqrt(n), sd Bessel-corrected, within [low, high].
    With fewer than two values the interval is NaN: one unit says nothing about the spread."""
    n = len(values)
    mean = statistics.fmean(values) if n else math.nan
    half = Z95 * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return mean, bounded_interval(mean, half, low, high)


def paired_interval(
    a: Sequence[float], b: Sequence[float], span: float = 1.0
) -> tuple[float, float, list[float]]:
    """b - a over shared units: (mean difference, its standard error, 95% interval within
    [-span, span]). Pairing removes the units' own difficulty from the spread."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = statistics.fmean(d) if n else math.nan
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else math.nan
    return mean, se, bounded_interval(mean, Z95 * se, -span, span)
