"""Tokens to text for a streaming reply: safe cuts and ``stop`` strings.

A byte-level BPE token may end in the middle of a UTF-8 character, and a ``stop`` string may span
several tokens. :class:`TextStream` therefore decodes the whole reply so far at each token (a reply
is at most a context window long, so this stays cheap), sends only text that can no longer change,
and holds back a tail that could still turn out to start a stop string. The pieces it sends always
concatenate to the non-streaming reply, which is what makes the two modes return the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

__all__ = ["TextStream"]


class TextStream:
    """Incremental detokenizer for one reply (``skip_special_tokens`` as the chat CLI)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded reply already handed out
        self.stopped = False  # a stop string was found: the reply ends before it
        self._final: str | None = None

    def push(self, token: int) -> str:
        """Add ``token``; returns the text that is now safe to send (often "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            self._final = text[:cut]
            return self._take(self._final, cut)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for its other bytes
            return ""
        return self._take(text, len(text) - self._held_back(text))

    def finish(self) -> str:
        """The text still held back, once the reply has ended."""
        text = self.text
        return self._take(text, len(text))

    @property
    def text(self) -> str:
        """The whole reply so far (up to a stop string, which is never included)."""
        if self._final is not None:
            return self._final
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _take(self, text: str, upto: int) -> str:
        piece = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts in ``text`` (searching only unsent text)."""
        longest = max((len(s) for s in self.stops), default=0)
        begin = max(0, self.sent - longest)
        found = [i for s in self.stops if (i := text.find(s, begin)) >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held
