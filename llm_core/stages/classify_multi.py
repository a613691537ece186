"""Multi-task classification: one backbone, a dict of named heads, trained jointly.

The same :func:`llm_core.stages.classify.run` as the spam classifier, with two task inputs: SMS
spam/ham (``spam_data``) and the language of a book paragraph (``language_data``, labels from
the Gutenberg catalog's ``Language``, split by book). Each step takes a batch of every task
through one forward; the loss is ``spam_weight * CE_spam + language_weight * CE_language``, and
every metric is reported per task. Its own profile section (``classify_multi``) and asset
(``text_classifier``) keep the single-task spam model, which is what exports to
``LlamaForSequenceClassification``, unchanged by the multi-task settings.

    python -m llm_core.stages.classify_multi --profile tiny --spam-data data/sms_spam \
        --language-data data/language_paragraphs --init-weights data/pretrained_weights \
        --tokenizer data/bpe_tokenizer/tokenizer.json --out /tmp/multi
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_core.stages import classify
from llm_core.stages.base import StageResult, module_main


@dataclass(frozen=True, kw_only=True)
class Config(classify.Config):
    """Profile section ``classify_multi``: the spam and paragraph-language heads."""

    SECTION = "classify_multi"
    INPUTS = ("spam_data", "language_data", "init_weights", "tokenizer")

    language_data: Path
    language_split: str = ""  # the data's only split: by_book
    language_weight: float = 1.0


def run(config: Config, callbacks: Sequence[Any] = ()) -> StageResult:
    """:func:`llm_core.stages.classify.run` on both tasks."""
    return classify.run(config, callbacks)


main = module_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
