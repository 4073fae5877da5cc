"""The usage chart: the period's accepted emails by day, as server-rendered SVG.

Bars are each day's emails; the line is the period's running total; dashed lines are the
plan's included emails, limits or thresholds (holder.threshold_lines), all on one scale
of emails in the period. Scales to its container (viewBox), so it fits a phone's width.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from mailmeter.portal.holder import Day

WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 16, 36
COLORS = ("#b45309", "#b91c1c", "#6d28d9", "#0f766e", "#be185d")


def _nice(value: int) -> int:
    """A round axis maximum at or above `value`."""
    if value <= 10:
        return 10
    magnitude: int = 10 ** (len(str(value)) - 1)
    for tenths in (10, 20, 25, 50, 100):
        top = tenths * magnitude // 10
        if top >= value:
            return top
    return 10 * magnitude


def _short(emails: int) -> str:
    if emails >= 1_000_000:
        return f"{emails / 1_000_000:g}M"
    if emails >= 1_000:
        return f"{emails / 1_000:g}k"
    return str(emails)


def usage_chart(days: Sequence[Day], lines: Sequence[tuple[str, int]], title: str) -> str:
    """The SVG (a string) of `days` with the labelled lines (emails in the period)."""
    top_value = _nice(int(max([d.total for d in days] + [e for _, e in lines] + [1]) * 1.08))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    count = max(len(days), 1)
    slot = plot_w / count

    def y(emails: int) -> float:
        return TOP + plot_h - plot_h * emails / top_value

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-labelledby="chart-title" class="chart" width="100%" preserveAspectRatio="xMidYMid meet">',
        f'<title id="chart-title">{escape(title)}</title>',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#d4d4d8"/>',
    ]
    for tick in range(5):
        value = top_value * tick // 4
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#f4f4f5"/>'
            f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="12" fill="#52525b">'
            f"{_short(value)}</text>"
        )
    for index, day in enumerate(days):
        x = LEFT + index * slot
        height = plot_h * day.emails / top_value
        parts.append(
            f'<rect class="day" x="{x + slot * 0.15:.1f}" y="{TOP + plot_h - height:.1f}" width="{slot * 0.7:.1f}"'
            f' height="{height:.1f}" fill="#93c5fd"><title>{day.day:%b %-d}: {day.emails:,} emails'
            f" ({day.total:,} in the period)</title></rect>"
        )
        if count <= 16 or index % max(count // 8, 1) == 0:
            parts.append(
                f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="11"'
                f' fill="#52525b">{day.day:%b %-d}</text>'
            )
    if days:
        points = " ".join(f"{LEFT + (i + 0.5) * slot:.1f},{y(d.total):.1f}" for i, d in enumerate(days))
        parts.append(f'<polyline class="total" points="{points}" fill="none" stroke="#1d4ed8" stroke-width="2.5"/>')
    for index, (label, emails) in enumerate(lines):
        color = COLORS[index % len(COLORS)]
        parts.append(
            f'<line class="limit" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(emails):.1f}" y2="{y(emails):.1f}"'
            f' stroke="{color}" stroke-width="1.5" stroke-dasharray="6 4"><title>{escape(label)}:'
            f" {emails:,} emails</title></line>"
            f'<text x="{WIDTH - RIGHT - 4}" y="{y(emails) - 4:.1f}" text-anchor="end" font-size="12"'
            f' fill="{color}">{escape(label)} {emails:,}</text>'
        )
    parts.append(
        f'<text x="{LEFT}" y="{HEIGHT - 4}" font-size="11" fill="#52525b">bars: emails per day;'
        " line: emails so far in the period</text>"
    )
    parts.append("</svg>")
    return "".join(parts)
