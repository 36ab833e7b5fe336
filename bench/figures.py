"""Figures with their targets, and the table and JSON that show them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One measured number; ``target`` like ``">= 30000"`` (None: shown for information)."""

    group: str
    key: str
    label: str
    value: float | None
    unit: str
    target: str | None = None
    note: str = ""

    @property
    def ok(self) -> bool | None:
        """Whether the value meets the target (None without a target or a value)."""
        if self.target is None or self.value is None:
            return None
        op, _, number = self.target.partition(" ")
        limit = float(number)
        return {
            ">=": self.value >= limit,
            "<=": self.value <= limit,
            "==": self.value == limit,
        }[op]

    def as_json(self) -> dict[str, Any]:
        """The figure as a JSON object, with ``ok``."""
        return {**asdict(self), "label": self.label.strip(), "ok": self.ok}


_FRACTIONAL = frozenset({"ms", "s", "µs", "x", "%", "MiB"})


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    whole = value == int(value) and unit not in _FRACTIONAL
    if whole or abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def table(figures: Sequence[Figure], header: str = "") -> str:
    """A plain-text table: label, value, target and verdict, grouped."""
    rows = [("figure", "value", "target", "")]
    group = None
    groups: list[int] = []
    for f in figures:
        if f.group != group:
            group = f.group
            groups.append(len(rows))
        verdict = {True: "ok", False: "MISSED", None: ""}[f.ok]
        target = f"{f.target} {f.unit}".rstrip() if f.target else ""
        rows.append((f.label, _number(f.value, f.unit), target, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [header] if header else []
    for i, row in enumerate(rows):
        if i in groups and i > 1:
            lines.append("")
        label, value, target, verdict = row
        line = f"{label:<{widths[0]}}  {value:>{widths[1]}}  {target:<{widths[2]}}  {verdict}"
        lines.append(line.rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 6))
    notes = [f"  {f.label.strip()}: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def write_json(path: Path, figures: Sequence[Figure], environment: dict[str, Any]) -> None:
    """Write the figures and the run's environment as JSON."""
    data = {"environment": environment, "figures": [f.as_json() for f in figures]}
    path.write_text(json.dumps(data, indent=2) + "\n")
