"""Models from the Hugging Face Hub: ``scriptorium import --hub org/name[@rev]`` and the
``imported_weights`` asset.

Files come through ``huggingface_hub.snapshot_download`` (its cache, pinned revisions and error
types), from ``$HF_ENDPOINT`` when set (the project's mirror serves ``hf/models/<org>/<name>/``,
:mod:`pipeline.sources.hub_mirror`), with ``$HF_TOKEN`` only where :func:`hub_token` allows it.
Only the config, safetensors weights and tokenizer files are fetched: pickled weights
(``pytorch_model.bin``) are never downloaded, and a repository that has no safetensors is refused
by name. The folder is then converted exactly as ``scriptorium import --hf DIR`` converts a local
one (:func:`convert_hf_folder`): Llama or GPT-2 blocks, the tokenizer given the chat tokens.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.sources.hub import hub_endpoint, hub_token

if TYPE_CHECKING:
    from llm_core.model import Transformer

log = logging.getLogger(__name__)

# What a causal LM needs, and nothing executable or pickled.
MODEL_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
NEVER = ("*.py", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack")
_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class ModelRef:
    """``org/name`` at a revision (branch, tag or commit sha; default ``main``)."""

    repo_id: str
    revision: str = "main"

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        m = _REF.match(ref.strip())
        if m is None:
            raise ValueError(f"{ref!r} is not a Hub model reference (org/name or org/name@rev)")
        return cls(m["repo"], m["rev"] or "main")

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def download_model(
    ref: ModelRef,
    cache_dir: Path | str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
) -> Path:
    """The snapshot folder of ``ref`` in the ``huggingface_hub`` cache (read-only paths), with
    the files of :data:`MODEL_PATTERNS`. Raises the library's errors (``RepositoryNotFoundError``
    ...) as they are, and ``FileNotFoundError`` naming the repository when it has no config or
    no safetensors weights."""
    from huggingface_hub import snapshot_download

    url = hub_endpoint(endpoint)
    log.info("fetching model %s from %s", ref, url or "huggingface.co")
    snapshot = Path(
        snapshot_download(
            ref.repo_id,
            repo_type="model",
            revision=ref.revision,
            cache_dir=str(cache_dir),
            allow_patterns=list(MODEL_PATTERNS),
            ignore_patterns=list(NEVER),
            endpoint=url,
            token=hub_token(url, token),
        )
    )
    if not (snapshot / "config.json").is_file():
        raise FileNotFoundError(f"model {ref}: the repository has no config.json")
    if not any(snapshot.glob("*.safetensors")):
        raise FileNotFoundError(
            f"model {ref}: no *.safetensors weights (pickled weights are never downloaded: "
            "unpickling can run arbitrary code)"
        )
    return snapshot


def convert_hf_folder(src: Path, out: Path) -> Transformer:
    """A Hugging Face Llama/GPT-2 folder -> llm_core weights (and ``tokenizer.json`` with the
    chat tokens, the embedding grown to match) in ``out``. Errors are ``OSError`` /
    ``ValueError`` / ``SafetensorError`` naming the file."""
    from tokenizers import Tokenizer

    from llm_core.checkpoint import save_weights
    from llm_core.hf_tokenizer import add_chat_tokens
    from llm_core.interop import load_hf_model
    from pipeline.io import atomic_write_text

    model = load_hf_model(src)
    tok_file = src / "tokenizer.json"
    tok = None
    if tok_file.is_file():
        try:
            raw = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{tok_file}: not a readable tokenizer ({exc})") from None
        tok, model = add_chat_tokens(raw, model)
    save_weights(model, out)
    if tok is not None:
        atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    return model


def import_hub_model(
    ref: ModelRef,
    out: Path,
    cache_dir: Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Download ``ref`` and convert it into ``out``; returns what was imported (for metadata)."""
    snapshot = download_model(ref, cache_dir, endpoint=endpoint, token=token)
    model = convert_hf_folder(snapshot, out)
    return {
        "repo": ref.repo_id,
        "revision": ref.revision,
        "commit": snapshot.name,  # the cache names a snapshot by its commit sha
        "endpoint": hub_endpoint(endpoint) or "https://huggingface.co",
        "files": sorted(p.name for p in snapshot.iterdir()),
        "arch": model.config.arch,
        "params": model.num_params(),
        "has_tokenizer": (out / "tokenizer.json").is_file(),
    }
