"""Intervals for the held-out figures every script reports: a normal 95% interval of a mean over
independent units (prompts, questions, prefixes), of a paired difference between two arms scored on
the same units, and Wilson's interval of a rate, each kept inside the range the quantity can take;
and a log's columns in a few numbers (means and worst cases)."""

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


def win_rate(outcomes: Sequence[float]) -> dict:
    """Pairwise comparisons, each 1 (win), 1/2 (tie) or 0 (loss), or a probability between: the
    win rate (their mean) with its 95% interval, mean +- 1.96 sd / sqrt(n) within [0, 1], and the
    wins, ties and losses. sd is Bessel-corrected, and 0 for a single comparison (an interval of
    width 0 where mean_interval would give NaN)."""
    n = len(outcomes)
    mean = sum(outcomes) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / max(n - 1, 1))
    low, high = bounded_interval(mean, Z95 * sd / math.sqrt(n))
    return {
        "win_rate": mean,
        "interval_low": low,
        "interval_high": high,
        "wins": sum(x > 0.5 for x in outcomes),
        "ties": sum(x == 0.5 for x in outcomes),
        "losses": sum(x < 0.5 for x in outcomes),
        "compared": n,
    }


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


def wilson(mean: float, n: int, z: float = Z95) -> list[float]:
    """Wilson's score interval of a rate from n 0/1 values: (mean + z^2/2n) / (1 + z^2/n) +- z
    sqrt(mean (1 - mean) / n + z^2/4n^2) / (1 + z^2/n); inside [0, 1] and not of zero width at 0 or
    1 (Wilson 1927; Brown, Cai & DasGupta 2001)."""
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def column_summary(rows: list[dict], columns: Sequence[str], minima: Sequence[str] = ()) -> dict:
    """A log of many rows in a few numbers: {col_mean, col_max} for each of `columns`, then
    {col_min} for each of `minima`, over the rows that have the column (one no row has is left
    out)."""
    out = {}
    for col in columns:
        vals = [r[col] for r in rows if col in r]
        if vals:
            out[f"{col}_mean"], out[f"{col}_max"] = sum(vals) / len(vals), max(vals)
    for col in minima:
        vals = [r[col] for r in rows if col in r]
        if vals:
            out[f"{col}_min"] = min(vals)
    return out
