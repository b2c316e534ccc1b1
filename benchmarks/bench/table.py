"""The printed table: one ``Figure`` per row, grouped by section, with PASS/MISS per target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Figure:
    section: str
    name: str
    value: float | None
    unit: str = ""
    bound: float | None = None
    bound_text: str = ""
    ratio: float | None = None
    target: str = ""
    verdict: str = ""  # PASS, MISS, or "" for figures without a target
    note: str = ""

    def row(self) -> list[str]:
        return [
            self.name,
            fmt(self.value, self.unit),
            self.bound_text or (fmt(self.bound, self.unit) if self.bound is not None else ""),
            "" if self.ratio is None else f"{self.ratio:.2f}",
            self.target,
            self.verdict or "-",
        ]


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value * 100:.2f}%"
    if unit == "yes/no":
        return "yes" if value else "no"
    text = (
        f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if value < 1 else f"{value:.1f}"
    )
    return f"{text} {unit}".strip()


def pass_or_miss(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    appendix: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)


def render(report: Report, out: TextIO) -> None:
    headers = ["figure", "measured", "bound / target", "ratio", "target", "result"]
    rows_by_section: dict[str, list[list[str]]] = {}
    for f in report.figures:
        rows_by_section.setdefault(f.section, []).append(f.row())
    all_rows = [r for rows in rows_by_section.values() for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in all_rows)) if all_rows else len(h)
        for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(headers), file=out)
    print("-" * len(line(headers)), file=out)
    for section, rows in rows_by_section.items():
        print(f"{section}", file=out)
        for r in rows:
            print(line(["  " + r[0], *r[1:]]), file=out)
    misses = [f for f in report.figures if f.verdict == "MISS"]
    passes = [f for f in report.figures if f.verdict == "PASS"]
    print(f"\ntargets: {len(passes)} PASS, {len(misses)} MISS", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    if report.appendix:
        print("", file=out)
        print("\n".join(report.appendix), file=out)
