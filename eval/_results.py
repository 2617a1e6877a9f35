"""Results tables shared by the resumable studies in eval/: one CSV row per finished run, appended at once."""
from __future__ import annotations

import csv
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """The rows of ``path`` (none when it does not exist yet)."""
    return list(csv.DictReader(path.open())) if path.exists() else []


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """Append ``row`` to ``path`` (with the header when the file is new); a finished run is never rewritten."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        if new:
            writer.writeheader()
        writer.writerow(row)
