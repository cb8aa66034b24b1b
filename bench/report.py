"""Render benchmark rows as the BENCHMARKS.md table."""

from __future__ import annotations

import datetime as dt
from typing import Any

from bench.harness import Row


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | variant | metric | median | vs baseline | runs |", "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row.ratio:.2f}× {row.baseline}" if row.ratio is not None and row.variant != row.baseline else "baseline" if row.variant == row.baseline else ""
        note = f" ({row.note})" if row.note else ""
        lines.append(f"| {row.bench} | {row.variant} | {row.metric}{note} | {_fmt(row.median)} {row.unit} | {ratio} | {row.runs} |")
    return "\n".join(lines)


def markdown(rows: list[Row], *, machine: dict[str, Any], command: str, notes: dict[str, str], started: dt.datetime, seconds: float) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    parts = [
        "# Benchmarks",
        "",
        f"Figures from one run of `{command}` on {started:%Y-%m-%d} ({seconds / 60:.1f} min).",
        "Each figure is the median of the runs shown; ratios are against the baseline named in the row.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB RAM, "
        f"Python {machine['python']}, {machine['os']}.",
        f"Packages: {packages}.",
        "",
        table(rows),
        "",
    ]
    for title, text in notes.items():
        parts += [f"## {title}", "", text.strip(), ""]
    return "\n".join(parts)
