"""The benchmark report's picture: plain SVG text, written by hand (no plotting library).

Two panels. The upper one groups bars by measurement (JSON and streams at 16 and 64
connections), one bar per target, the median answers per second over the rounds on a
logarithmic axis: the targets span three orders of magnitude, and on a log axis equal gaps are
equal ratios, which is what the goals are stated in. The lower one shows, per target, the time
it adds to the first event of a paced stream at one client (median over the rounds of target
minus direct), on a linear axis in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH = 960
LEFT = 70  # room for the axis labels
RIGHT = 20
COLOURS = (
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
    "#2f4b7c",
)
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


@dataclass(frozen=True, slots=True)
class ChartData:
    """What the chart shows; a missing value is a target not measured there."""

    title: str
    targets: list[str]  # legend order
    slots: list[int]  # each target's colour in COLOURS: the same whichever others ran
    groups: list[str]  # measurement labels of the upper panel
    rates: dict[str, dict[str, float]]  # group -> target -> answers per second
    added_ttfb: dict[str, float]  # target -> added TTFB p50 at 1 client, ms
    notes: list[str]  # lines under the panels: what a bar does not say by itself


def _text(
    x: float, y: float, body: str, size: int = 12, anchor: str = "start", **extra: str
) -> str:
    attributes = "".join(f' {name.replace("_", "-")}="{value}"' for name, value in extra.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {FONT}'
        f"{attributes}>{escape(body)}</text>"
    )


def _rate_label(value: float) -> str:
    if value < 10_000:
        return f"{value:,.0f}"
    return f"{value / 1000:.1f}".removesuffix(".0") + "k"


def _rates_panel(data: ChartData, colour: dict[str, str], top: float) -> tuple[list[str], float]:
    """The grouped bars; returns the SVG elements and the panel's bottom edge."""
    height = 300.0
    values = [v for by_target in data.rates.values() for v in by_target.values() if v > 0]
    low = 10 ** math.floor(math.log10(min(values))) if values else 1.0
    high = 10 ** math.ceil(math.log10(max(values))) if values else 10.0
    if high <= low:
        high = low * 10

    def y_of(value: float) -> float:
        share = (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low))
        return top + height - share * height

    out = [_text(LEFT, top - 12, "Answers per second (median of the rounds; logarithmic axis)", 13)]
    decade = low
    while decade <= high * 1.001:
        for step in (1, 2, 5):
            tick = decade * step
            if tick > high * 1.001:
                break
            y = y_of(tick)
            strong = step == 1
            out.append(
                f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                f'stroke="{"#bbbbbb" if strong else "#e6e6e6"}" stroke-width="1"/>'
            )
            out.append(_text(LEFT - 6, y + 4, _rate_label(tick), 10, "end"))
        decade *= 10
    plot_width = WIDTH - LEFT - RIGHT
    group_width = plot_width / max(1, len(data.groups))
    bar = min(26.0, (group_width - 16) / max(1, len(data.targets)))
    for index, group in enumerate(data.groups):
        left = LEFT + index * group_width + (group_width - bar * len(data.targets)) / 2
        for position, target in enumerate(data.targets):
            value = data.rates.get(group, {}).get(target, float("nan"))
            x = left + position * bar
            if not value > 0:  # NaN or zero: not measured here
                out.append(_text(x + bar / 2, top + height - 4, "–", 10, "middle", fill="#999"))
                continue
            y = y_of(value)
            out.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" '
                f'height="{top + height - y:.1f}" fill="{colour[target]}">'
                f"<title>{escape(f'{target}, {group}: {value:,.0f}/s')}</title></rect>"
            )
            label_x, label_y = x + bar / 2 + 3, y - 4
            out.append(
                _text(
                    label_x,
                    label_y,
                    _rate_label(value),
                    9,
                    transform=f"rotate(-90 {label_x:.1f} {label_y:.1f})",
                )
            )
        out.append(
            _text(LEFT + (index + 0.5) * group_width, top + height + 18, group, 12, "middle")
        )
    out.append(
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{top + height:.1f}" '
        f'y2="{top + height:.1f}" stroke="#333"/>'
    )
    return out, top + height + 26


def _ttfb_panel(data: ChartData, colour: dict[str, str], top: float) -> tuple[list[str], float]:
    """Horizontal bars of added TTFB, from a zero line (a target may beat direct by noise)."""
    targets = [t for t in data.targets if t in data.added_ttfb]
    row = 20.0
    out = [
        _text(
            LEFT,
            top - 10,
            "Added time to first event, paced stream, 1 client (ms; median of target − direct)",
            13,
        )
    ]
    if not targets:
        out.append(_text(LEFT, top + 14, "not measured", 11))
        return out, top + 30
    label_width = 150.0
    values = [data.added_ttfb[t] for t in targets]
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    plot_left = LEFT + label_width
    plot_width = WIDTH - RIGHT - plot_left - 60  # room for the value after the bar

    def x_of(value: float) -> float:
        return plot_left + (value - low) / span * plot_width

    zero = x_of(0.0)
    for index, target in enumerate(targets):
        value = data.added_ttfb[target]
        y = top + index * row
        start, end = sorted((zero, x_of(value)))
        out.append(_text(plot_left - 8, y + 14, target, 11, "end"))
        out.append(
            f'<rect x="{start:.1f}" y="{y + 3:.1f}" width="{max(end - start, 1):.1f}" '
            f'height="{row - 6:.1f}" fill="{colour[target]}"/>'
        )
        out.append(_text(max(end, zero) + 5, y + 14, f"{value:+.2f} ms", 11))
    bottom = top + len(targets) * row
    out.append(
        f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="{top:.1f}" y2="{bottom:.1f}" stroke="#333"/>'
    )
    return out, bottom + 10


def render(data: ChartData) -> str:
    """The whole SVG document."""
    colour = {t: COLOURS[i % len(COLOURS)] for t, i in zip(data.targets, data.slots, strict=True)}
    body = [_text(WIDTH / 2, 24, data.title, 15, "middle", font_weight="bold")]
    x, y = float(LEFT), 48.0
    for target in data.targets:  # the legend, wrapped to the width
        width = 22 + 7.0 * len(target)
        if x + width > WIDTH - RIGHT:
            x, y = float(LEFT), y + 18
        body.append(
            f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="12" height="12" fill="{colour[target]}"/>'
        )
        body.append(_text(x + 16, y, target, 11))
        x += width + 12
    rates, bottom = _rates_panel(data, colour, y + 50)
    ttfb, bottom = _ttfb_panel(data, colour, bottom + 40)
    for note in data.notes:
        bottom += 16
        body.append(_text(LEFT, bottom, note, 11, fill="#444"))
    height = bottom + 12
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {WIDTH} {height:.0f}">',
            f'<rect width="{WIDTH}" height="{height:.0f}" fill="white"/>',
            *body,
            *rates,
            *ttfb,
            "</svg>",
            "",
        ]
    )
