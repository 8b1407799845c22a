"""The table "what each fix changes": mean simulated accuracy per hardware point under each --compat
setting, from one results file per setting (scripts/compat_table.sh writes them).

    python -m nipa.results.compat_report none=results/.../none.jsonl original=results/.../original.jsonl [--out t.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from nipa.errors import UserError
from nipa.results.correlation import group_records
from nipa.results.records import read_records


def compat_table(files: dict[str, Path]) -> str:
    """A markdown table: one row per hardware point, one column per setting (mean top-1 over the chips
    +- their standard error, and the chip count), the float model's accuracy in the caption."""
    columns: dict[str, dict[str, tuple[str, float, float, int]]] = {}
    ideal = None
    for name, path in files.items():
        grouped = group_records(read_records(path))
        if not grouped.points:
            raise UserError(f"{path}: no simulated point; run main.py for the setting {name!r} first")
        ideal = grouped.ideal_top1 if ideal is None else ideal
        cells = {}
        for point in grouped.points:
            chips = [v for v in point.top1 if v is not None]
            spread = statistics.stdev(chips) / len(chips) ** 0.5 if len(chips) > 1 else 0.0
            cells[point.config.key()] = (point.config.describe(), statistics.fmean(chips), spread, len(chips))
        columns[name] = cells
    keys = list(next(iter(columns.values())))
    header = "| point | " + " | ".join(columns) + " |"
    lines = [f"float model: {ideal:.2f}% top-1; mean top-1 (%) over the chips +- standard error (chips)" if ideal
             is not None else "mean top-1 (%) over the chips +- standard error (chips)", "",
             header, "| --- |" + " --- |" * len(columns)]
    for key in keys:
        described = next(c[key][0] for c in columns.values() if key in c)
        row = [f"{c[key][1]:.2f} +- {c[key][2]:.2f} ({c[key][3]})" if key in c else "-" for c in columns.values()]
        lines.append(f"| {described} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="NAME=RECORDS", help="a setting's name and its results file")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    try:
        files = dict(item.split("=", 1) for item in args.files)
        table = compat_table({name: Path(path) for name, path in files.items()})
    except (UserError, ValueError) as exc:
        print(f"compat_report: error: {exc}", file=sys.stderr)
        return 2
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
