"""The pure logic of bench/compare.py: which way each metric is better, medians over
rounds, ratios new/old, verdicts and the table. No I/O (tests/test_bench_compare.py)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import attrs

CLEAR_MARGIN = 0.05  # a verdict needs the medians this far apart, as well as no overlap


@attrs.frozen
class Metric:
    """One number read from a benchmark's JSON. ``lower_is_better`` is None for a
    figure that is neither (a count to look at, a setting)."""

    name: str
    unit: str
    lower_is_better: bool | None


@attrs.frozen
class Row:
    """One metric of one benchmark, over every round of both sides."""

    benchmark: str
    metric: Metric
    new: tuple[float | None, ...]
    old: tuple[float | None, ...]
    new_median: float | None
    old_median: float | None
    ratio: float | None  # new / old
    verdict: str  # "better", "worse", "~" (not clear), "" (no direction), "n/a"


def median(values: Sequence[float | None]) -> float | None:
    """Median of the finite values; None if there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def ratio_of(new: float | None, old: float | None) -> float | None:
    """``new / old``, or None when either is missing or old is 0."""
    if new is None or old is None or old == 0:
        return None
    return new / old


def verdict(metric: Metric, new: Sequence[float | None], old: Sequence[float | None]) -> str:
    """ "better" / "worse" when every new value is on the same side of every old value and
    the medians differ by at least CLEAR_MARGIN; "~" when it is not that clear; "" for a
    metric without a direction; "n/a" when a side has no value."""
    if metric.lower_is_better is None:
        return ""
    news = [v for v in new if v is not None and math.isfinite(v)]
    olds = [v for v in old if v is not None and math.isfinite(v)]
    if not news or not olds:
        return "n/a"
    r = ratio_of(median(news), median(olds))
    if r is None or abs(r - 1) < CLEAR_MARGIN:
        return "~"
    if max(news) < min(olds):
        return "better" if metric.lower_is_better else "worse"
    if min(news) > max(olds):
        return "worse" if metric.lower_is_better else "better"
    return "~"


def compare_rows(
    benchmark: str,
    metrics: Sequence[Metric],
    new_runs: Sequence[Mapping[str, float | None]],
    old_runs: Sequence[Mapping[str, float | None]],
) -> list[Row]:
    """One Row per metric (in ``metrics`` order) from the values each run produced
    (``{metric name: value}``; a missing name counts as None)."""
    rows = []
    for m in metrics:
        new = tuple(run.get(m.name) for run in new_runs)
        old = tuple(run.get(m.name) for run in old_runs)
        new_median, old_median = median(new), median(old)
        rows.append(
            Row(
                benchmark,
                m,
                new,
                old,
                new_median,
                old_median,
                ratio_of(new_median, old_median),
                verdict(m, new, old),
            )
        )
    return rows


def fmt_value(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def render_table(rows: Sequence[Row], new_label: str, old_label: str) -> str:
    """A Markdown table: metric, both medians (and every value), new/old, verdict."""
    lines = [
        f"| benchmark | metric | new {new_label} | old {old_label} | new/old | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:

        def cell(med: float | None, values: Sequence[float | None]) -> str:
            spread = " / ".join(fmt_value(v) for v in values)
            return f"{fmt_value(med)} ({spread})" if len(values) > 1 else fmt_value(med)

        unit = f" ({row.metric.unit})" if row.metric.unit else ""
        direction = {True: " ↓", False: " ↑", None: ""}[row.metric.lower_is_better]
        r = "-" if row.ratio is None else f"{row.ratio:.3f}"
        lines.append(
            f"| {row.benchmark} | {row.metric.name}{unit}{direction} | "
            f"{cell(row.new_median, row.new)} | {cell(row.old_median, row.old)} | "
            f"{r} | {row.verdict} |"
        )
    return "\n".join(lines)
