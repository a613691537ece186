"""Anthropic/hh-rlhf: ``chosen`` and ``rejected`` are whole transcripts, not replies.

Each field is a dialogue ``"\\n\\nHuman: …\\n\\nAssistant: …\\n\\nHuman: …\\n\\nAssistant: …"``;
the two transcripts of a row share every turn but the last Assistant one. So the prompt is the
shared prefix (up to and including the last Human turn, as ``user``/``assistant`` messages) and
the replies are the two final Assistant turns.

The transcripts are crowd-worker chats and some are damaged. A row whose structure is ambiguous
is rejected, naming the defect, rather than guessed at:

* text before the first ``Human:`` turn, or a first turn that is not Human's;
* two turns of one speaker in a row, or a last turn that is not the Assistant's;
* a turn whose text itself starts with a speaker label (``Assistant: Human: …``): the model once
  wrote the user's next line, and the turn boundaries can no longer be trusted;
* transcripts that differ before their last turn.

An empty final reply is not a parsing error: it passes through and the shared ``empty_reply``
filter names it.
"""

from __future__ import annotations

import re

import polars as pl

from pipeline.text.adapters.preference import ADAPTED_PAIR_SCHEMA

REQUIRED_COLUMNS = ("chosen", "rejected")
SPEAKERS = {"Human": "user", "Assistant": "assistant"}
_TURN = re.compile(r"\n\n(Human|Assistant):")
_LABEL_FIRST = re.compile(r"\s*(Human|Assistant):")


class TranscriptError(ValueError):
    """A transcript whose turns cannot be recovered unambiguously; the message says why."""


def parse_transcript(text: str | None) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{user: a}, {assistant: b}]`` (text stripped).

    Raises :class:`TranscriptError` for the defects listed in the module docstring.
    """
    if text is None or not text.strip():
        raise TranscriptError("empty transcript")
    parts = _TURN.split("\n\n" + text.lstrip())
    if parts[0].strip():
        raise TranscriptError("text before the first turn")
    turns = []
    for label, content in zip(parts[1::2], parts[2::2], strict=True):
        if _LABEL_FIRST.match(content):
            raise TranscriptError("speaker label inside a turn")
        turns.append({"role": SPEAKERS[label], "content": content.strip()})
    if turns[0]["role"] != "user":
        raise TranscriptError("first turn is not Human's")
    for before, after in zip(turns, turns[1:], strict=False):
        if before["role"] == after["role"]:
            raise TranscriptError(f"two {before['role']} turns in a row")
    if turns[-1]["role"] != "assistant":
        raise TranscriptError("last turn is not the Assistant's")
    return turns


def split_pair(chosen: str | None, rejected: str | None) -> tuple[list[dict[str, str]], str, str]:
    """``(prompt messages, chosen reply, rejected reply)`` of one row's two transcripts."""
    parsed = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        try:
            parsed.append(parse_transcript(text))
        except TranscriptError as exc:
            raise TranscriptError(f"{exc} ({name})") from None
    good, bad = parsed
    if good[:-1] != bad[:-1]:
        raise TranscriptError("chosen and rejected differ before the last reply")
    return good[:-1], good[-1]["content"], bad[-1]["content"]


def convert(frame: pl.DataFrame) -> pl.DataFrame:
    """One pair per row; a malformed row keeps its raw transcripts so the reject can be read."""
    prompts, chosen, rejected, reasons = [], [], [], []
    texts = zip(
        frame["chosen"].cast(pl.String).to_list(),
        frame["rejected"].cast(pl.String).to_list(),
        strict=True,
    )
    for good, bad in texts:
        try:
            prompt, reply_good, reply_bad = split_pair(good, bad)
            reason = None
        except TranscriptError as exc:
            prompt, reply_good, reply_bad = [], good, bad
            reason = f"malformed transcript: {exc}"
        prompts.append(prompt)
        chosen.append(reply_good)
        rejected.append(reply_bad)
        reasons.append(reason)
    return pl.DataFrame(
        {
            "source_id": frame["source_id"],
            "prompt": prompts,
            "chosen": chosen,
            "rejected": rejected,
            "reason": reasons,
        },
        schema=ADAPTED_PAIR_SCHEMA,
    )
