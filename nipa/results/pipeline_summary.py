"""The short summary the main job ends with (scripts/quickstart.sh): accuracy range of the ground truth,
NIPA's Kendall tau, the fast estimate's error and measured speedup, and where the plots are; read from
the files validate.py and wrap_error.py wrote.

    python -m nipa.results.pipeline_summary --model_name smallcnn --dataset mnist5k
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from nipa import paths
from nipa.errors import UserError


def _read_json(path: Path, command: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} does not exist: run {command} first")
    return json.loads(path.read_text())


def pipeline_summary(results_dir: Path, dataset: str) -> list[tuple[str, str]]:
    """(what, value) rows from {dataset}_nipa_summary.json, {dataset}_nipa_points.csv and
    {dataset}_wrap_summary.json in `results_dir`."""
    stem = paths.validation_stem(results_dir, dataset)
    validate = _read_json(Path(f"{stem}_summary.json"), "validate.py")
    with open(f"{stem}_points.csv") as handle:
        accuracies = [float(row["accuracy_mean"]) for row in csv.DictReader(handle)]
    overall = validate["groups"][0]
    kendall = overall["kendall"]
    low, high = kendall.get("ci_low", float("nan")), kendall.get("ci_high", float("nan"))
    rows = [
        ("hardware points (chips)", f"{validate['points']} ({validate['chips_total']})"),
        ("float model top-1", f"{validate['ideal_top1']:.2f}%" if validate.get("ideal_top1") is not None else "-"),
        ("simulated top-1 range", f"{min(accuracies):.2f}% to {max(accuracies):.2f}%"),
        ("NIPA vs simulated top-1, Kendall tau [CI]",
         f"{kendall['value']:.3f} [{low:.2f}, {high:.2f}]"),
        ("NIPA plot", f"{stem}.png"),
    ]
    wrap_stem = paths.summary_stem(results_dir / paths.records_name(dataset, "wrap"))
    wrap_path = Path(f"{wrap_stem}_summary.json")
    if wrap_path.is_file():
        wrap = json.loads(wrap_path.read_text())
        timing = wrap.get("timing") or {}
        rows += [
            ("fast estimate: mean / max absolute error", f"{wrap['mean_abs_error']:.2f} / {wrap['max_abs_error']:.2f} "
                                                         "accuracy points"),
            ("fast estimate vs simulated, Kendall tau",
             "-" if wrap.get("kendall_tau") is None else f"{wrap['kendall_tau']:.3f}"),
            ("fast estimate speedup (measured in the same run)",
             f"{timing['speedup']:.1f}x" if timing.get("speedup") else "-"),
            ("fast estimate plot", f"{wrap_stem}.png"),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    from nipa.workloads.zoo import dataset_id, model_id

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name", default="smallcnn")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--results_dir", default=None, help="default results/{model}/")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir) if args.results_dir else paths.model_dir(model_id(args.model_name))
    try:
        rows = pipeline_summary(results_dir, dataset_id(args.model_name, args.dataset))
    except UserError as exc:
        print(f"pipeline_summary: error: {exc}", file=sys.stderr)
        return 2
    width = max(len(what) for what, _ in rows)
    print(f"\nsummary: {args.model_name} on {args.dataset}")
    for what, value in rows:
        print(f"  {what:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
