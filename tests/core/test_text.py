"""The language-model job's text: a fixed character alphabet, the embedded public-domain excerpt,
the Debian package's file when installed, any plain-text file, and windows of next characters."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from sparsecore import text


def test_fixed_alphabet_round_trip_and_unknown_characters():
    s = "Hello, world!\n\t~ caf\u00e9 \u201cquoted\u201d \u2014 done"
    tokens = text.encode(s)
    assert tokens.dtype == np.uint8 and tokens.max() < text.VOCAB_SIZE == 97
    assert text.decode(tokens) == 'Hello, world!\n    ~ caf? "quoted" -- done'
    assert text.encode("\n")[0] == 0 and text.encode(" ")[0] == 1 and text.encode("~")[0] == 95


def test_embedded_excerpt_is_english_prose_split_90_10():
    data = text.load_embedded_text()
    total = data.train_tokens.size + data.valid_tokens.size
    assert 250_000 < total < 400_000
    assert data.valid_tokens.size == pytest.approx(total * 0.1, abs=1)
    sample = text.decode(data.train_tokens[:2000])
    assert "hacker" in sample and sample.count(" ") > 200
    assert (data.train_tokens == text.VOCAB_SIZE - 1).mean() < 0.001  # almost no unknowns
    assert data.fingerprint == text.load_embedded_text().fingerprint


def test_windows_pair_each_character_with_the_next():
    data = text.TextDataset("t", "t", text.encode("abcdefghij" * 3), text.encode("xyz"))
    x, y = data.windows(4, "train")
    assert x.shape == y.shape == (7, 4) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(x[1:, 0], y[:-1, -1])
    with pytest.raises(ValueError, match="fewer than one window"):
        data.windows(4, "valid")


def test_files_plain_or_gzip_and_the_default_search(tmp_path, monkeypatch):
    body = "It was the best of times, it was the worst of times. " * 20
    plain, packed = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    plain.write_text(body)
    packed.write_bytes(gzip.compress(body.encode()))
    a, b = text.load_text(plain), text.load_text(packed)
    assert a.fingerprint == b.fingerprint and a.source == str(plain.resolve())
    with pytest.raises(FileNotFoundError):
        text.load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="needs more"):
        (tmp_path / "short.txt").write_text("short")
        text.load_text(tmp_path / "short.txt")
    monkeypatch.setattr(text, "DEBIAN_JARGON_FILE", tmp_path / "absent.txt.gz")
    assert text.find_text(None).source.startswith("embedded:")
    monkeypatch.setattr(text, "DEBIAN_JARGON_FILE", packed)
    assert text.find_text(None).fingerprint == b.fingerprint
    assert text.find_text("embedded").source.startswith("embedded:")
