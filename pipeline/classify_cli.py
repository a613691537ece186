"""``scriptorium classify``: label texts with a trained classifier, or export it.

    scriptorium classify --weights data/spam_classifier "WINNER!! Claim your prize now"
    cat messages.txt | scriptorium classify --weights data/text_classifier
    scriptorium classify --weights data/spam_classifier --export-hf /tmp/spam-hf

Prints one line per text: each head's label and probability, then the text. With no text
arguments the texts are read from stdin, one per line (blank lines skipped). ``--export-hf``
writes a ``transformers`` ``LlamaForSequenceClassification`` folder instead
(:mod:`llm_core.classify_export`; one head and ``last`` pooling only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _error(message: str) -> int:
    print(f"scriptorium: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify the given texts (or stdin's lines), or export the classifier."""
    from llm_core.classify import classify_texts, load_classifier
    from llm_core.tokenizer import load_tokenizer

    weights = Path(args.weights)
    tok_path = Path(args.tokenizer) if args.tokenizer else weights / "tokenizer.json"
    try:
        if args.export_hf:
            from llm_core.classify_export import export_classifier_hf

            out = export_classifier_hf(weights, tok_path, args.export_hf)
            print(f"exported {weights} as LlamaForSequenceClassification to {out}")
            return 0
        model = load_classifier(weights)
        tok = load_tokenizer(tok_path)
    except (OSError, ValueError) as exc:
        return _error(str(exc))
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for text, heads in zip(texts, classify_texts(model, tok, texts), strict=True):
        shown = "  ".join(f"{task}: {label} {p:.3f}" for task, (label, p) in heads.items())
        print(f"{shown}\t{text}")
    return 0


def add_classify(subparsers: Any) -> None:
    """Register ``scriptorium classify``."""
    cls = subparsers.add_parser("classify", help="label texts with a trained classifier")
    cls.add_argument("texts", nargs="*", metavar="TEXT", help="texts (default: stdin lines)")
    cls.add_argument("--weights", required=True, help="a spam_classifier/text_classifier folder")
    cls.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside weights)")
    cls.add_argument("--export-hf", default=None, metavar="DIR",
                     help="write a LlamaForSequenceClassification folder instead")  # fmt: skip
    cls.set_defaults(func=cmd_classify)
