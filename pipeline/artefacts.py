"""Where every asset's files live under the data root: the one place their names are spelled.

``$SCRIPTORIUM_DATA`` is read here and nowhere else (:func:`data_root`). Each asset owns
``<root>/<asset_key>/``; :class:`Artefacts` names the files other code reads from those folders,
and :meth:`Artefacts.stage_inputs` says which of them each training stage starts from, for the
assets and for ``scriptorium train`` alike. Plain Python: no Dagster, no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "SCRIPTORIUM_DATA"
DEFAULT_DATA = "data"
# The files of every weights folder (as llm_core.checkpoint and the chat stages write them).
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.json"

# The asset each training stage materialises (``rlhf_weights`` for every alignment method).
STAGE_ASSETS = {
    "pretrain": "pretrained_weights",
    "sft": "sft_weights",
    "reward": "reward_model",
    "dpo": "rlhf_weights",
    "grpo": "rlhf_weights",
    "best_of_n": "rlhf_weights",
    "rrhf": "rlhf_weights",
    "weighted": "rlhf_weights",
    "classify": "spam_classifier",
    "classify_multi": "text_classifier",
}


RLHF_PREFIX = "rlhf"  # each alignment method's own aligned model: the asset rlhf/<method>


def rlhf_method_key(method: str) -> str:
    """The asset (and folder under the data root) of one method's aligned model."""
    return f"{RLHF_PREFIX}/{method}"


def data_root(env: Mapping[str, str] | None = None) -> Path:
    """``$SCRIPTORIUM_DATA`` (default ``./data``), resolved."""
    env = os.environ if env is None else env
    return Path(env.get(DATA_ENV) or DEFAULT_DATA).expanduser().resolve()


@dataclass(frozen=True)
class Artefacts:
    """The file layout under one data root."""

    root: Path

    def dir(self, key: str) -> Path:
        """``<root>/<key>`` for ``gutenberg_books`` or ``sft_sources/alpaca`` alike."""
        return self.root / key

    def require(self, key: str, filename: str) -> Path:
        """An upstream artefact, with an error that says which asset to materialise first."""
        return self.existing(self.dir(key) / filename)

    def existing(self, path: Path) -> Path:
        """``path`` (one of the files named here), checked to exist; the error names the asset
        that writes it (the folder it lies in)."""
        if not path.exists():
            key = path.parent.relative_to(self.root).as_posix()
            raise FileNotFoundError(f"{path} is missing: materialise the `{key}` asset first")
        return path

    @property
    def tokenizer(self) -> Path:
        return self.dir("bpe_tokenizer") / TOKENIZER

    @property
    def books(self) -> Path:
        return self.dir("cleaned_books") / "books.parquet"

    @property
    def shards(self) -> Path:
        return self.dir("token_shards")

    @property
    def shards_manifest(self) -> Path:
        return self.shards / "manifest.json"

    @property
    def eval_sets(self) -> Path:
        return self.dir("eval_sets")

    @property
    def eval_prompts(self) -> Path:
        """The prompts of every evaluation set, which training data must not contain."""
        return self.eval_sets / "prompts.parquet"

    def sft_split(self, split: str) -> Path:
        return self.dir("sft_mixture") / f"{split}.parquet"

    @property
    def mixture_stats(self) -> Path:
        return self.dir("sft_mixture") / "stats.json"

    def pairs_split(self, split: str) -> Path:
        return self.dir("preference_pairs") / f"{split}.parquet"

    @property
    def report(self) -> Path:
        return self.dir("evaluation_report") / "report.json"

    def weights(self, key: str) -> Path:
        """The weights file of a training asset (``pretrained_weights``, ``reward_model`` …)."""
        return self.dir(key) / WEIGHTS

    def trained(self, key: str) -> Path | None:
        """The weights folder of training asset ``key``; None until it has been materialised."""
        return self.dir(key) if self.weights(key).is_file() else None

    def metrics(self, key: str) -> Path:
        """The ``metrics.json`` a training asset writes beside its weights."""
        return self.dir(key) / METRICS

    def tokenizer_beside(self, weights_dir: Path) -> Path:
        """The tokenizer saved beside ``weights_dir`` (a chat stage's, an imported model's own),
        else ``bpe_tokenizer``'s."""
        beside = weights_dir / TOKENIZER
        return beside if beside.is_file() else self.existing(self.tokenizer)

    def chat_tokenizer(self) -> Path:
        """The chat model's tokenizer: the one SFT saved beside its weights (an imported model's
        own), else ``bpe_tokenizer``'s."""
        return self.tokenizer_beside(self.dir("sft_weights"))

    def stage_inputs(self, stage: str, init_weights: Path | None = None) -> dict[str, Path]:
        """The input paths of training ``stage``, each checked to exist (naming the asset)."""
        if stage == "pretrain":
            return {
                "shards_dir": self.existing(self.shards_manifest).parent,
                "tokenizer": self.existing(self.tokenizer),
            }
        if stage == "sft":
            init = init_weights or self.existing(self.weights("pretrained_weights")).parent
            return {
                "train_path": self.existing(self.sft_split("train")),
                "val_path": self.existing(self.sft_split("val")),
                "init_weights": init,
                "tokenizer": init / TOKENIZER if init_weights else self.existing(self.tokenizer),
            }
        if stage in ("classify", "classify_multi"):
            init = init_weights or self.existing(self.weights("pretrained_weights")).parent
            inputs = {
                "spam_data": self.existing(self.dir("sms_spam") / "labels.json").parent,
                "init_weights": init,
                "tokenizer": self.tokenizer_beside(init),
            }
            if stage == "classify_multi":
                labels = self.dir("language_paragraphs") / "labels.json"
                inputs["language_data"] = self.existing(labels).parent
            return inputs
        inputs = {
            "train_path": self.existing(self.pairs_split("train")),
            "val_path": self.existing(self.pairs_split("val")),
            "init_weights": self.existing(self.weights("sft_weights")).parent,
            "tokenizer": self.chat_tokenizer(),
        }
        if stage != "reward":
            inputs["reward_model"] = self.existing(self.weights("reward_model")).parent
        return inputs

    def stage_out(self, stage: str) -> Path:
        return self.dir(STAGE_ASSETS[stage])
