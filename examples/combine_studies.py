"""Combine ``results.json`` files of one protocol (methods or seeds run separately) into one table and figures.

    python examples/combine_studies.py runs/converged_a/results.json runs/converged_b/results.json --out runs/converged

Writes ``results.json``, ``table.md``, ``success.png`` and ``outcomes.png`` to ``--out``; refuses files whose
settings differ (steps, switch, data, p, w, the pretrained VLM...) or that hold the same (arch, method, seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apt_studies.combine import combine_studies, read_study
from apt_studies.report import format_outcome_table, format_table, plot_outcomes, plot_success


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files written by apt_study.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        study = combine_studies([read_study(path) for path in args.results], names=[str(p) for p in args.results])
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(study, indent=1))
    table = format_table(study["summary"], fmt="markdown")
    outcomes = format_outcome_table(study["summary"], fmt="markdown")
    (args.out / "table.md").write_text(f"{table}\n\nCounterfactual episodes, where they ended:\n\n{outcomes}\n")
    plot_success(study["summary"], args.out / "success.png")
    plot_outcomes(study["summary"], args.out / "outcomes.png")
    print(format_table(study["summary"], fmt="text"))
    print(f"\nWrote {args.out}/results.json, table.md, success.png, outcomes.png")
    return study


if __name__ == "__main__":
    main()
