"""Raw book bytes -> normalised ``str``: encoding detection, NFC, LF newlines.

Project Gutenberg files come in three generations of encoding: pure ASCII, UTF-8 (often with a
BOM) and 8-bit legacy files (ISO-8859-1 / Windows-1252, sometimes another code page announced by
the header line ``Character set encoding: ...``). The header line cannot be trusted on its own
(re-encoded files keep ``ISO-8859-1`` although they are UTF-8 now), so the order is:

1. UTF-8 (strict; a BOM is stripped). Valid UTF-8 is practically never legacy text by accident.
2. The code page the header declares, if it is not Latin-1 and decodes strictly (e.g. ISO-8859-2
   for Polish or Czech, where cp1252 would silently give mojibake).
3. cp1252: a superset of Latin-1's printable range; bytes 0x80-0x9F in "ISO-8859-1" files are
   almost always Windows curly quotes and dashes, not C1 control characters.
4. Latin-1, which cannot fail.

The caller gets back which encoding was used, so the fallbacks can be counted and reported.
Binary payloads (NUL bytes, gzip or zip archives served by mistake) raise :class:`DecodeError`
instead of being turned into garbage text.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["DecodeError", "Decoded", "decode_bytes", "decode_text", "normalize_text"]

_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# Only the first few KB are searched: the declaration sits in the PG header.
_DECLARED = re.compile(rb"Character set encoding:[ \t]*([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_DECLARED_WINDOW = 8192
_LATIN1_NAMES = {"latin-1", "iso8859-1", "ascii", "cp1252", "utf-8"}
_BINARY_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"%PDF": "pdf"}


class DecodeError(ValueError):
    """The bytes are not text in any encoding we accept (binary or archive payload)."""


@dataclass(frozen=True)
class Decoded:
    """Decoded, normalised text and the codec that produced it (``utf-8``, ``cp1252``...)."""

    text: str
    encoding: str
    had_bom: bool = False


def normalize_text(text: str) -> str:
    """NFC-normalise and convert CRLF / CR newlines to LF.

    NFC makes precomposed and combining spellings of the same letter hash identically (dedup,
    tokenizer); LF-only text makes byte offsets and paragraph splitting independent of the era
    the file was produced in. ``is_normalized`` is a fast C check, so ASCII books pay nothing.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def _declared_codec(data: bytes) -> str | None:
    m = _DECLARED.search(data, 0, _DECLARED_WINDOW)
    if not m:
        return None
    try:
        return codecs.lookup(m.group(1).decode("ascii")).name
    except (LookupError, UnicodeDecodeError):
        return None


def _check_binary(data: bytes) -> None:
    for magic, kind in _BINARY_MAGIC.items():
        if data.startswith(magic):
            raise DecodeError(f"{kind} data, not text")
    if b"\x00" in data:
        raise DecodeError("NUL bytes: binary data or an unsupported UTF-16/32 file without BOM")


def decode_bytes(data: bytes) -> Decoded:
    """Decode raw bytes (see the module docstring for the order of attempts); not normalised."""
    if data.startswith(_UTF16_BOMS):
        try:
            return Decoded(data.decode("utf-16"), "utf-16", had_bom=True)
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-16: {exc}") from exc
    _check_binary(data)
    bom = data.startswith(_UTF8_BOM)
    try:
        return Decoded(data[len(_UTF8_BOM) if bom else 0 :].decode("utf-8"), "utf-8", had_bom=bom)
    except UnicodeDecodeError:
        pass
    declared = _declared_codec(data)
    if declared and declared not in _LATIN1_NAMES:
        try:
            return Decoded(data.decode(declared), declared)
        except (UnicodeDecodeError, LookupError):
            pass
    try:
        return Decoded(data.decode("cp1252"), "cp1252")
    except UnicodeDecodeError:
        # cp1252 leaves five bytes undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D): true Latin-1.
        return Decoded(data.decode("latin-1"), "latin-1")


def decode_text(data: bytes) -> Decoded:
    """:func:`decode_bytes` followed by :func:`normalize_text`: what the cleaning stage uses.

    Newlines are normalised on the bytes first when the encoding is ASCII-compatible (every
    codec we fall back to is: CR/LF bytes never occur inside a multi-byte character), which is
    several times cheaper than on the decoded string.
    """
    if b"\r" in data and not data.startswith(_UTF16_BOMS):
        data = data.replace(b"\r\n", b"\n")
        if b"\r" in data:
            data = data.replace(b"\r", b"\n")
    decoded = decode_bytes(data)
    return Decoded(normalize_text(decoded.text), decoded.encoding, decoded.had_bom)
