"""Asset checks of the SFT stages: each re-reads the artefact from disk and tests one promise.

(The per-source ``rows_valid`` checks run inside the ``sft_sources/<id>`` steps themselves, see
``pipeline.assets.sft``: eleven extra check processes would cost more than the checks.)
Both ``sft_mixture`` checks share one step (``multi_asset_check``) for the same reason.
"""

import json
from collections.abc import Iterator

import dagster as dg
import numpy as np
import polars as pl

from pipeline.assets.sft import sft_mixture, sft_weights
from pipeline.resources import Paths, Profile
from pipeline.text.decontam import NgramIndex
from pipeline.text.sft_mix import MixConfig, check_consistent, normalise

MIXTURE_CLEAN = dg.AssetCheckSpec(
    "sft_mixture_clean",
    asset=sft_mixture,
    blocking=True,
    description="No evaluation-prompt overlap and no conversation in both train and val.",
)
MIXTURE_TRAINABLE = dg.AssetCheckSpec(
    "sft_mixture_trainable",
    asset=sft_mixture,
    blocking=True,
    description="Rows add up per source, and every conversation keeps a supervised token "
    "after truncation to the model's context.",
)


def _key(frame: pl.DataFrame) -> pl.Series:
    """Normalised text of a conversation (every turn), as the dedup stage compares them."""
    content = pl.element().struct.field("content")
    return frame.select(normalise(pl.col("messages").list.eval(content).list.join("\n")))[
        "messages"
    ]


@dg.multi_asset_check(specs=[MIXTURE_CLEAN, MIXTURE_TRAINABLE])
def sft_mixture_checks(paths: Paths, profile: Profile) -> Iterator[dg.AssetCheckResult]:
    """Re-check the written mixture: decontamination, split leakage, accounting, truncation."""
    from llm_core.sft import encode_conversations
    from llm_core.tokenizer import load_tokenizer

    p = profile.load()
    cfg = MixConfig.from_profile(p.get("sft") or {}, int(p.get("seed", 1337)))
    train = pl.read_parquet(paths.require("sft_mixture", "train.parquet"))
    val = pl.read_parquet(paths.require("sft_mixture", "val.parquet"))
    both = pl.concat([train, val])
    prompts = pl.read_parquet(paths.require("eval_sets", "prompts.parquet"))
    index = NgramIndex.build(
        prompts,
        min_n=cfg.decontam_min_n,
        max_n=cfg.decontam_max_n,
        min_words=cfg.decontam_min_words,
    )
    content = pl.element().struct.field("content")
    text = both.select(pl.col("messages").list.eval(content).list.join("\n")).to_series()
    dirty = index.match(text)
    leaked = set(_key(train)) & set(_key(val))
    yield dg.AssetCheckResult(
        check_name=MIXTURE_CLEAN.name,
        passed=bool(dirty.is_null().all()) and not leaked,
        metadata={
            "contaminated_rows": int(dirty.is_not_null().sum()),
            "by_eval_set": dg.MetadataValue.json(
                {k: int(v) for k, v in dirty.drop_nulls().value_counts().iter_rows()}
            ),
            "rows_in_train_and_val": len(leaked),
        },
    )

    stats = json.loads(paths.require("sft_mixture", "stats.json").read_text())
    problems = check_consistent(stats)
    tok = load_tokenizer(paths.require("bpe_tokenizer", "tokenizer.json"))
    context = int(p["context_length"])
    data = encode_conversations(tok, both["messages"].to_list(), max_tokens=context + 1)
    starts = data.offsets[:-1]
    # Supervised *targets*: the first token of a row is never predicted.
    targets = data.mask.copy()
    targets[starts[data.lengths() > 0]] = False
    unsupervised = int((np.add.reduceat(targets.astype(np.int64), starts) == 0).sum())
    too_long = int((both["n_tokens"] > cfg.max_tokens).sum())
    yield dg.AssetCheckResult(
        check_name=MIXTURE_TRAINABLE.name,
        passed=not problems and unsupervised == 0 and too_long == 0,
        metadata={
            "accounting_problems": dg.MetadataValue.json(problems),
            "rows_without_supervised_token": unsupervised,
            "rows_over_max_tokens": too_long,
            "truncated_to_context": data.truncated,
        },
    )


@dg.asset_check(asset=sft_weights, description="SFT lowered the loss on assistant tokens.")
def sft_beats_pretrained(paths: Paths) -> dg.AssetCheckResult:
    """Validation loss on assistant tokens is lower after SFT than for the pretrained model, and
    the saved weights load (safetensors + config) with finite values."""
    from llm_core.checkpoint import load_weights

    out = paths.require("sft_weights", "model.safetensors").parent
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics.get("val_loss_before"), metrics.get("val_loss_after")
    model = load_weights(out)
    finite = all(bool(t.isfinite().all()) for t in model.state_dict().values())
    improved = before is not None and after is not None and after < before
    return dg.AssetCheckResult(
        passed=finite and improved,
        metadata={
            "val_loss_pretrained": before,
            "val_loss_sft": after,
            "weights_finite": finite,
            "params": model.num_params(),
        },
    )


SFT_CHECKS = [sft_mixture_checks, sft_beats_pretrained]
