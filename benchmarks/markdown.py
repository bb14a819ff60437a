"""Writing a benchmark's section into a markdown results file (docs/results.md)."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the ``## `` section whose heading is ``section``'s first line; every other
    section of ``path`` is kept as it is."""
    heading = section.splitlines()[0].strip()
    lines = path.read_text().splitlines() if path.exists() else ["# Results", ""]
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        kept_before, kept_after = lines + ([""] if lines and lines[-1].strip() else []), []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        kept_before, kept_after = lines[:start], lines[end:]
    path.write_text("\n".join([*kept_before, *section.rstrip("\n").splitlines(), "", *kept_after]).rstrip("\n") + "\n")
