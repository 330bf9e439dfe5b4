"""Plain English text for the language-model job: where it is found, and how it becomes tokens.

Character level with a fixed alphabet: the newline, the 95 printable ASCII characters and one
symbol for anything else (:data:`VOCAB_SIZE` = 97 classes), so a model's size does not depend on
the text it reads and any UTF-8 file can be used. Common typographic characters (curly quotes,
dashes, no-break spaces) are first written as their ASCII equivalents.

Sources, in the order the job looks for them when ``--data`` is not given:

* the Jargon File as the Debian package ``jargon-text`` installs it
  (``/usr/share/doc/jargon-text/jargon.txt.gz``, about 1.7 MB of English prose, public domain),
  read at run time;
* the embedded excerpt shipped in ``sparsecore/data`` (about 300 KB of the same public-domain
  text, built by ``benchmarks/make_embedded_text.py``).

``--data PATH`` reads any plain-text file (``.gz`` compressed or not). The last
``validation_fraction`` of the text (10%) is held out for validation; the rest is cut into
windows of ``context + 1`` characters, one training example each (inputs and their next
characters).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEBIAN_JARGON_FILE",
    "EMBEDDED_TEXT",
    "VOCAB_SIZE",
    "TextDataset",
    "decode",
    "encode",
    "find_text",
    "load_embedded_text",
    "load_text",
]

#: The Jargon File as Debian's ``jargon-text`` installs it (public domain).
DEBIAN_JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
#: The embedded excerpt's file name inside ``sparsecore/data``.
EMBEDDED_TEXT = "jargon_file_excerpt.txt.gz"

_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
_UNKNOWN = len(_ALPHABET)  # one class for every other character
#: Number of token classes: the alphabet plus the unknown symbol.
VOCAB_SIZE = len(_ALPHABET) + 1
_ASCII_FOR = {
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--",
    "\u2013": "-", "\u00a0": " ", "\u2026": "...", "\u2192": "->", "\u2022": "*", "\t": "    ",
}  # fmt: skip
_TABLE = np.full(128, _UNKNOWN, dtype=np.uint8)
for _i, _ch in enumerate(_ALPHABET):
    _TABLE[ord(_ch)] = _i


def normalise(text: str) -> str:
    """``text`` with typographic characters written in ASCII and Windows line ends removed."""
    text = text.replace("\r\n", "\n")
    return "".join(_ASCII_FOR.get(c, c) for c in text) if not text.isascii() else text


def encode(text: str) -> np.ndarray:
    """Token ids (uint8) of ``text`` after :func:`normalise`; unknown characters map to 96."""
    text = normalise(text)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    out = np.full(codes.shape, _UNKNOWN, dtype=np.uint8)
    ascii_ = codes < 128
    out[ascii_] = _TABLE[codes[ascii_]]
    return out


def decode(tokens: Any) -> str:
    """The text of token ids (the unknown symbol as ``"?"``)."""
    return "".join(_ALPHABET[int(t)] if int(t) < _UNKNOWN else "?" for t in tokens)


@dataclass(frozen=True)
class TextDataset:
    """A tokenised text split into training and validation tokens.

    ``source``: where it was read (a path, or ``"embedded:<file>"``). ``fingerprint``: the
    SHA-256 of the tokens and their split, which a resumed run checks.
    """

    name: str
    source: str
    train_tokens: np.ndarray
    valid_tokens: np.ndarray

    @property
    def num_classes(self) -> int:
        return VOCAB_SIZE

    @property
    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        digest.update(self.train_tokens.tobytes())
        digest.update(b"|")
        digest.update(self.valid_tokens.tobytes())
        return {
            "sha256": digest.hexdigest(),
            "train_chars": int(self.train_tokens.size),
            "valid_chars": int(self.valid_tokens.size),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "train_size": int(self.train_tokens.size),
            "test_size": int(self.valid_tokens.size),
            "vocab_size": VOCAB_SIZE,
        }

    def windows(self, context: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Non-overlapping windows of the ``split`` (``"train"`` or ``"valid"``) tokens:
        inputs ``(n, context)`` and their next characters ``(n, context)``, int64."""
        tokens = self.train_tokens if split == "train" else self.valid_tokens
        n = (tokens.size - 1) // context
        if n < 1:
            raise ValueError(
                f"the {split} part of {self.source} has {tokens.size} characters, fewer than "
                f"one window of {context + 1}"
            )
        x = tokens[: n * context].reshape(n, context).astype(np.int64)
        y = tokens[1 : n * context + 1].reshape(n, context).astype(np.int64)
        return x, y


def _split(name: str, source: str, text: str, validation_fraction: float) -> TextDataset:
    tokens = encode(text)
    if tokens.size < 100:
        raise ValueError(f"{source} holds {tokens.size} characters; a language model needs more")
    cut = int(round(tokens.size * (1.0 - validation_fraction)))
    return TextDataset(name, source, tokens[:cut].copy(), tokens[cut:].copy())


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def load_text(path: str | Path, validation_fraction: float = 0.1) -> TextDataset:
    """The plain-text file at ``path`` (gzip-compressed or not, UTF-8), tokenised and split."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--data for a language model is a text file, got the folder {p}")
    if not p.is_file():
        raise FileNotFoundError(f"no text file at {p}")
    name = "Jargon File" if p.resolve() == DEBIAN_JARGON_FILE.resolve() else p.name
    return _split(name, str(p.resolve()), _read(p), validation_fraction)


def load_embedded_text(validation_fraction: float = 0.1) -> TextDataset:
    """The public-domain excerpt of the Jargon File shipped with sparsecore."""
    data = resources.files("sparsecore").joinpath("data", EMBEDDED_TEXT).read_bytes()
    text = gzip.decompress(data).decode("utf-8")
    return _split(
        "Jargon File (embedded excerpt)", f"embedded:{EMBEDDED_TEXT}", text, validation_fraction
    )


def find_text(data: str | None) -> TextDataset:
    """``--data``: a text file, ``"embedded"``, or None (the Debian package's Jargon File when
    installed, else the embedded excerpt)."""
    if data == "embedded":
        return load_embedded_text()
    if data is not None:
        return load_text(data)
    if DEBIAN_JARGON_FILE.is_file():
        return load_text(DEBIAN_JARGON_FILE)
    return load_embedded_text()
