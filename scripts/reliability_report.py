"""Print the table of `make reliability` from its results file (JSON lines written by
tests/reliability and its fuzz-count plugin): per fault, jobs submitted / terminal / lost /
duplicated and webhooks delivered; then the fuzz case counts.

Usage: python scripts/reliability_report.py var/reliability/results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FAULT_COLUMNS = (
    ("fault", "fault"),
    ("jobs_submitted", "jobs submitted"),
    ("jobs_terminal", "jobs terminal"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("webhooks_delivered", "webhooks delivered"),
)


def _describe(row: dict[str, Any]) -> str:
    """The fault's name with what the scenario measured on the side (kills, outage length...)."""
    notes = []
    kills = row.get("kills")
    if kills:
        notes.append(f"{kills['child']} child + {kills['worker']} whole-worker kills")
    if "messages_lost_with_redis" in row:
        notes.append(f"{row['messages_lost_with_redis']} queued messages lost")
    if row.get("batches_completed"):
        notes.append(f"{row['batches_completed']} batch completed once")
    if row.get("in_flight_at_outage"):
        notes.append(f"{row['in_flight_at_outage']} jobs in flight")
    if "refused_during_outage" in row:
        notes.append(f"{row['refused_during_outage']} requests answered 503")
    if "outage_s" in row:
        notes.append(f"{row['outage_s']} s down, {row['retried_deliveries']} events retried")
    return row["fault"] + (f" ({'; '.join(notes)})" if notes else "")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (it reads as plain text too)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )


def report(lines: list[dict[str, Any]]) -> str:
    """The two tables as text."""
    faults = [r for r in lines if "fault" in r]
    fuzz = [r for r in lines if "fuzz" in r]
    out = []
    if faults:
        rows = [
            [_describe(r)] + [str(r.get(key, "")) for key, _ in FAULT_COLUMNS[1:]]
            for r in sorted(faults, key=lambda r: str(r["fault"]))
        ]
        totals = ["total"] + [
            str(sum(int(r.get(key, 0)) for r in faults)) for key, _ in FAULT_COLUMNS[1:]
        ]
        out.append(table([title for _, title in FAULT_COLUMNS], rows + [totals]))
    else:
        out.append("no fault scenario ran")
    if fuzz:
        rows = [[r["fuzz"], str(r["cases"]), "yes" if r.get("passed") else "NO"] for r in fuzz]
        out.append(table(["fuzz suite", "cases", "passed"], rows))
    return "\n\n".join(out)


def main(argv: list[str]) -> int:
    """Print the report of the results file named on the command line."""
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    path = Path(argv[1])
    if not path.is_file():
        print(f"no results at {path}", file=sys.stderr)
        return 1
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    print(report(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
