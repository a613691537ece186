"""Decoding: UTF-8 (BOM), counted legacy fallbacks, NFC and newline normalisation, binary."""

from __future__ import annotations

import codecs
import gzip
from pathlib import Path

import pytest

from pipeline.text.encoding import DecodeError, decode_bytes, decode_text, normalize_text
from tests.conftest import MirrorBooks


def test_utf8_bom_is_stripped_and_reported() -> None:
    d = decode_text(codecs.BOM_UTF8 + "Café ünïcode\r\n".encode())
    assert (d.text, d.encoding, d.had_bom) == ("Café ünïcode\n", "utf-8", True)


def test_plain_ascii_is_utf8_without_bom() -> None:
    d = decode_text(b"plain text\n")
    assert (d.text, d.encoding, d.had_bom) == ("plain text\n", "utf-8", False)


def test_windows_1252_fallback_keeps_curly_quotes() -> None:
    d = decode_text(b"caf\xe9 \x93quoted\x94 \x97 dash")
    assert d.encoding == "cp1252"
    assert d.text == "café “quoted” — dash"


def test_latin1_when_cp1252_has_undefined_bytes() -> None:
    d = decode_text(b"na\xefve \x81")
    assert d.encoding == "latin-1"
    assert d.text == "naïve \x81"


def test_declared_code_page_wins_over_cp1252() -> None:
    # ISO-8859-2 (Polish): 0xB1 is "ą", which cp1252 would read as "±".
    data = b"Character set encoding: ISO-8859-2\n\nb\xb1d\xbc"
    d = decode_text(data)
    assert d.encoding == "iso8859-2"
    assert d.text.endswith("bądź")


def test_declared_latin1_still_prefers_cp1252() -> None:
    d = decode_text(b"Character set encoding: ISO-8859-1\n\n\x93hi\x94")
    assert d.encoding == "cp1252" and d.text.endswith("“hi”")


def test_utf16_with_bom() -> None:
    d = decode_text("Hello\r\nWörld".encode("utf-16"))
    assert (d.text, d.encoding) == ("Hello\nWörld", "utf-16")


@pytest.mark.parametrize(
    "raw, expected",
    [("a\r\nb\rc\n", "a\nb\nc\n"), ("e\u0301t\u00e9", "\u00e9t\u00e9"), ("A\u030a", "\u00c5")],
)
def test_normalize_newlines_and_nfc(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected
    assert decode_text(raw.encode()).text == expected


@pytest.mark.parametrize(
    "payload", [b"text\x00with NUL", gzip.compress(b"hello"), b"PK\x03\x04zipdata"]
)
def test_binary_payloads_raise(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_bytes(payload)


@pytest.mark.mirror
def test_mirror_files_are_utf8_and_normalised(mirror_dir: Path, mirror_books: MirrorBooks) -> None:
    files = sorted((mirror_dir / "gutenberg" / "cache" / "epub").glob("*/pg*.txt"))
    # One file per catalog row, and no file the catalog does not list.
    assert sorted(int(f.parent.name) for f in files) == sorted(mirror_books.catalog)
    boms = set()
    for f in files:
        raw = f.read_bytes()
        d = decode_text(raw)
        assert d.encoding == "utf-8", f
        assert "\r" not in d.text and "\ufeff" not in d.text[:1]
        assert d.had_bom == raw.startswith(codecs.BOM_UTF8), f
        if d.had_bom:
            boms.add(int(f.parent.name))
    # Per the mirror README: most UTF-8 sources start with a BOM, these five do not.
    assert boms and not boms & {35, 147, 1524, 1952, 6130}
