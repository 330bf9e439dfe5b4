"""Build the embedded text excerpt shipped in ``sparsecore/data/`` for the language-model job.

The source is the Jargon File 4.4.7 as Debian's ``jargon-text`` package installs it
(``/usr/share/doc/jargon-text/jargon.txt.gz``), which its authors placed in the public domain.
The excerpt keeps the prose: chapters 1-11 (hacker slang and culture, writing and speech style)
and appendices A-B (folklore, a portrait of J. Random Hacker), then lexicon entries from the
start of the lexicon until about ``--chars`` characters. Table rows (box-drawing lines) are
dropped and typographic characters written in ASCII (``sparsecore.text.normalise``).

    python benchmarks/make_embedded_text.py [--source /usr/share/doc/jargon-text/jargon.txt.gz]

The output is deterministic for a given input file and arguments.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

from sparsecore.text import DEBIAN_JARGON_FILE, EMBEDDED_TEXT, normalise

OUT = Path(__file__).resolve().parents[1] / "sparsecore" / "data" / EMBEDDED_TEXT
_BOX = set("─│┼├┤┬┴┌┐└┘")


def _section(lines: list[str], start: str, end: str) -> list[str]:
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next(i for i in range(first + 1, len(lines)) if lines[i].startswith(end))
    return lines[first:last]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(DEBIAN_JARGON_FILE))
    parser.add_argument("--chars", type=int, default=300_000)
    args = parser.parse_args()
    raw = gzip.decompress(Path(args.source).read_bytes()).decode("utf-8")
    lines = raw.replace("\u00a0", " ").splitlines()
    prose = _section(lines, "Chapter 1. ", "Chapter 12. ")
    prose += _section(lines, "Appendix A. ", "Appendix C. ")
    lexicon = _section(lines, "Chapter 12. ", "Appendix A. ")
    kept = [line for line in prose if not _BOX.intersection(line)]
    size = sum(len(line) + 1 for line in kept)
    for line in lexicon:
        if size >= args.chars:
            break
        if not _BOX.intersection(line):
            kept.append(line)
            size += len(line) + 1
    text = normalise("\n".join(kept) + "\n")
    OUT.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    print(f"wrote {OUT} ({len(text)} characters, {OUT.stat().st_size} bytes compressed)")


if __name__ == "__main__":
    main()
