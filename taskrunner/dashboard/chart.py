"""The throughput chart: an inline SVG drawn on the server (no script, no build step).

One bar per minute over the last hour, stacked: succeeded (bottom), failed, then the
other final outcomes (aborted, rejected, dead). Each bar has a ``<title>`` tooltip.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from taskrunner.admin import MinuteCounts

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 760, 170, 40, 22, 10
COLORS = {"succeeded": "#2e9d5b", "failed": "#d64545", "other": "#9aa0a6"}


def svg(minutes: Sequence[MinuteCounts]) -> str:
    """The chart of ``minutes`` (oldest first) as an SVG element."""
    peak = max([m.finished for m in minutes] + [1])
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    step = (WIDTH - PAD_LEFT) / max(1, len(minutes))
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="jobs finished per minute over the last hour" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{PAD_LEFT}" y1="{PAD_TOP + plot_h}" x2="{WIDTH}" y2="{PAD_TOP + plot_h}" '
        'class="axis"/>',
        f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + 8}" text-anchor="end" class="label">{peak}</text>',
        f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + plot_h}" text-anchor="end" class="label">0</text>',
    ]
    for index, minute in enumerate(minutes):
        x = PAD_LEFT + index * step
        parts.append(_bar(minute, x, step * 0.8, plot_h, peak))
    for index, label in (
        (0, f"-{len(minutes)} min"),
        (len(minutes) // 2, ""),
        (len(minutes) - 1, "now"),
    ):
        if label and minutes:
            x = PAD_LEFT + index * step
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 6}" class="label">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bar(minute: MinuteCounts, x: float, width: float, plot_h: float, peak: int) -> str:
    other = minute.aborted + minute.rejected + minute.dead
    stack = (("succeeded", minute.succeeded), ("failed", minute.failed), ("other", other))
    when = minute.minute.strftime("%H:%M UTC")
    tip = (
        f"{when}: {minute.succeeded} succeeded, {minute.failed} failed, {minute.aborted} "
        f"aborted, {minute.rejected} rejected, {minute.dead} dead"
    )
    y = PAD_TOP + plot_h
    rects = []
    for kind, count in stack:
        if count <= 0:
            continue
        h = plot_h * count / peak
        y -= h
        rects.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{h:.1f}" '
            f'fill="{COLORS[kind]}" class="bar-{kind}"/>'
        )
    hit = (
        f'<rect x="{x:.1f}" y="{PAD_TOP}" width="{width:.1f}" height="{plot_h:.1f}" '
        'fill="transparent"/>'
    )
    return f"<g><title>{escape(tip)}</title>{hit}{''.join(rects)}</g>"
