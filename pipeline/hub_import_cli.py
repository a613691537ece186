"""``scriptorium import --hub org/name[@rev] --out DIR``: a Hub model as llm_core weights.

The download and conversion are :mod:`pipeline.sources.hub_models`'; this is only the command's
error handling and report. ``$HF_ENDPOINT`` picks the Hub (or the project's mirror) and
``$HF_TOKEN`` authenticates where it is safe to send it (:func:`pipeline.sources.hub.hub_token`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def hub_import_cli(args: argparse.Namespace) -> int:
    """Run the command; exit status 2 with one line naming the repository on any refusal."""
    from huggingface_hub.errors import HfHubHTTPError
    from safetensors import SafetensorError

    from pipeline.artefacts import data_root
    from pipeline.sources.hub_models import ModelRef, import_hub_model

    cache = Path(args.cache_dir) if args.cache_dir else data_root() / "hf_cache"
    try:
        ref = ModelRef.parse(args.hub)
        info = import_hub_model(ref, Path(args.out), cache)
    except (OSError, ValueError, SafetensorError, HfHubHTTPError) as exc:
        print(f"scriptorium: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(
        f"imported {ref} (commit {info['commit'][:12]}, {info['arch']}, "
        f"{info['params'] / 1e6:.2f}M parameters) from {info['endpoint']} to {args.out}"
    )
    return 0
