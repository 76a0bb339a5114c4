"""The one writer of ``BENCHMARKS.md``'s script-written sections.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` and
rewrites only that, so a run of one script never touches another's figures (or the prose
outside the markers). Imports nothing heavy: the data benchmarks' ranks use it too.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def write_section(
    name: str, body: str, path: Path | str = BENCHMARKS, *, say: bool = False
) -> None:
    """Replace section ``name``'s text in ``path`` with ``body`` (``ValueError`` naming the
    markers if the file lacks them: a section is added by hand, once, where it belongs).
    ``say``: print that it did, on stderr (a benchmark's stdout carries only its table)."""
    path = Path(path)
    text = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path} lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")
    if say:
        print(f"wrote the {name} section of {path}", file=sys.stderr)
