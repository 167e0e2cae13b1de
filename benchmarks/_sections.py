"""Generated sections of a markdown page: each script owns the text between its two markers
(``<!-- name:start -->`` and ``<!-- name:end -->``) and rewrites only that."""

from __future__ import annotations

from pathlib import Path


def splice(doc: Path, section: str) -> None:
    """Replace, in ``doc``, the section whose markers are ``section``'s first and last lines
    (or append it when ``doc`` has none)."""
    lines = section.strip("\n").splitlines()
    start, end = lines[0], lines[-1]
    text = doc.read_text() if doc.is_file() else ""
    if start in text and end in text:
        text = text[: text.index(start)] + section.rstrip("\n") + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text if text.endswith("\n") else text + "\n")
