"""``hf_export``: the final model as a Hugging Face folder, verified by ``transformers`` itself.

The newest trained stage is exported: ``rlhf_weights`` when it has been materialised, otherwise
``sft_weights`` (so the asset works before, or without, the alignment stage). Its dependencies are
declared by asset key only, so this module imports none of the training assets and the graph
orders it after them whichever of them the code location defines.

The check ``loads_in_transformers`` runs inside the asset's own step (one process, not two): it
loads the folder with ``AutoModelForCausalLM``/``AutoTokenizer`` and compares the logits and the
chat-template token ids with llm_core's. Without ``transformers`` installed (it is an optional
extra) the check is reported as not verified (a warning), never as passed.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from pipeline.io import dir_bytes, files_hash, sha256_file
from pipeline.model_card import card_info
from pipeline.resources import Paths, Profile

CODE_VERSION = "1"
SOURCES = ("rlhf_weights", "sft_weights")  # preferred first
LOGITS_ATOL = 1e-4
CHECK_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
)

LOADS_IN_TRANSFORMERS = dg.AssetCheckSpec(
    "loads_in_transformers",
    asset="hf_export",
    description="transformers loads the folder without remote code; its logits match llm_core's "
    f"within {LOGITS_ATOL} and its chat template gives llm_core's token ids.",
)


def pick_source(paths: Paths) -> Path:
    """The weights folder to export: ``rlhf_weights`` if materialised, else ``sft_weights``."""
    files = paths.artefacts()
    for key in SOURCES:
        if (d := files.trained(key)) is not None:
            return d
    raise FileNotFoundError(
        f"no trained weights to export under {paths.root()}: materialise `rlhf_weights` or "
        "`sft_weights` first"
    )


def verify_export(out: Path, weights: Path, tokenizer: Path) -> dg.AssetCheckResult:
    """``loads_in_transformers``: logits and chat-template ids through transformers vs llm_core."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return dg.AssetCheckResult(
            check_name=LOADS_IN_TRANSFORMERS.name,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description="not verified: transformers is not installed (pip install '.[bench]')",
        )
    from transformers import AutoTokenizer

    from llm_core.checkpoint import load_weights
    from llm_core.interop import compare_with_transformers
    from llm_core.sft import encode_prompt
    from llm_core.tokenizer import load_tokenizer

    ours_ids = encode_prompt(load_tokenizer(tokenizer), list(CHECK_CONVERSATION))
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    hf_ids = list(hf_tok.apply_chat_template(list(CHECK_CONVERSATION), add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])  # fmt: skip
    model = load_weights(weights)
    ids = ours_ids[-model.config.context_length :]
    cmp = compare_with_transformers(out, model, ids)
    same_template = hf_ids == ours_ids
    return dg.AssetCheckResult(
        check_name=LOADS_IN_TRANSFORMERS.name,
        passed=cmp["max_abs_diff"] <= LOGITS_ATOL and cmp["same_argmax"] and same_template,
        metadata={
            "max_abs_logit_diff": dg.MetadataValue.float(cmp["max_abs_diff"]),
            "same_greedy_tokens": cmp["same_argmax"],
            "chat_template_ids_match": same_template,
            "tokens_compared": cmp["tokens"],
            "hf_class": cmp["hf_class"],
            "transformers_version": cmp["transformers_version"],
        },
    )


def _files_table(out: Path) -> tuple[str, dict[str, Any]]:
    rows = ["| file | bytes | sha256 |", "|---|---:|---|"]
    listing: dict[str, Any] = {}
    for f in sorted(p for p in out.iterdir() if p.is_file()):
        digest, size = sha256_file(f), f.stat().st_size
        rows.append(f"| `{f.name}` | {size:,} | `{digest[:16]}…` |")
        listing[f.name] = {"bytes": size, "sha256": digest}
    return "\n".join(rows), listing


@dg.asset(
    group_name="export",
    code_version=CODE_VERSION,
    deps=[
        dg.AssetKey("rlhf_weights"),
        dg.AssetKey("sft_weights"),
        dg.AssetKey("evaluation_report"),
        dg.AssetKey("bpe_tokenizer"),
    ],
    check_specs=[LOADS_IN_TRANSFORMERS],
    kinds={"huggingface", "safetensors"},
)
def hf_export(
    context: dg.AssetExecutionContext, paths: Paths, profile: Profile
) -> dg.MaterializeResult:
    """The final model as a Hugging Face folder (Llama config, safetensors, tokenizer with the
    chat template, generation config, model card), ready for ``upload_folder``."""
    from llm_core.checkpoint import CONFIG_NAME
    from llm_core.hf_card import CARD_NAME
    from llm_core.interop import export_hf

    weights = pick_source(paths)
    # The tokenizer that travels with the weights (the chat stages save it there), else the
    # project's.
    tokenizer = paths.artefacts().tokenizer_beside(weights)
    stage = weights.name
    card = card_info(paths.root(), stage, profile_name=str(profile.load().get("name") or ""))
    out = export_hf(weights, tokenizer, paths.asset_dir("hf_export", create=False), card=card)
    context.log.info(f"exported {stage} from {weights} to {out}")
    check = verify_export(out, weights, tokenizer)
    table, listing = _files_table(out)
    config = (out / CONFIG_NAME).read_text()
    return dg.MaterializeResult(
        metadata={
            "source_stage": stage,
            "source_path": dg.MetadataValue.path(str(weights)),
            "tokenizer": dg.MetadataValue.path(str(tokenizer)),
            "files": dg.MetadataValue.md(table),
            "file_hashes": dg.MetadataValue.json(listing),
            "total_bytes": dg.MetadataValue.int(dir_bytes(out)),
            "licence": str(card["license"]),
            "datasets": len(card["datasets"]),
            "eval_figures": dg.MetadataValue.json(card["eval"]),
            "hf_config": dg.MetadataValue.md(f"```json\n{config}```"),
            "model_card": dg.MetadataValue.md((out / CARD_NAME).read_text()),
            "path": dg.MetadataValue.path(str(out)),
        },
        check_results=[check],
        data_version=dg.DataVersion(files_hash(p for p in out.iterdir() if p.is_file())),
    )
