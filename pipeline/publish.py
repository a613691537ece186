"""Publishing a Hugging Face model folder to the Hub: ``scriptorium push`` and the opt-in job.

Uploads go through ``huggingface_hub`` itself (``create_repo`` + ``upload_folder``), so what the
Hub accepts is decided by the Hub's own client, and ``HF_ENDPOINT`` points it at another server
(the project's mirror in the tests: :mod:`pipeline.sources.hub_write`). Nothing is uploaded
without a token: ``HF_TOKEN`` (or ``--token-env``'s variable) must be set, and the token is only
ever handed to the client, never printed or logged (errors are re-raised without it).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PushResult", "add_push", "push_folder"]

REQUIRED_FILES = ("config.json",)


@dataclass(frozen=True)
class PushResult:
    """Where the folder went: the repository URL and the commit the upload made."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: int


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None,
    endpoint: str | None = None,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = "Upload model from Scriptorium",
) -> PushResult:
    """Create ``repo_id`` if needed (a model repository) and upload every file of ``folder``.

    Raises PermissionError without a token and FileNotFoundError/ValueError for a folder that is
    not a model export (no ``config.json``) or a malformed repository id.
    """
    from huggingface_hub import HfApi

    if not token:
        raise PermissionError("no Hub token: set HF_TOKEN to upload (nothing was uploaded)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a model export: it lacks {missing}")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--repo must be ORG/NAME, got {repo_id!r}")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
    )
    return PushResult(repo_id, revision or "main", str(info.oid), str(info.commit_url), files)


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    token = os.environ.get(args.token_env) or None
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        result = push_folder(
            Path(args.folder),
            args.repo,
            token=token,
            endpoint=endpoint,
            revision=args.revision,
            private=args.private,
            commit_message=args.message,
        )
    except PermissionError as exc:
        print(f"scriptorium push: {exc} (variable {args.token_env})", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"scriptorium push: {exc}", file=sys.stderr)
        return 2
    except HfHubHTTPError as exc:
        message = str(exc).replace(token, "***") if token else str(exc)
        print(f"scriptorium push: the Hub refused the upload: {message}", file=sys.stderr)
        return 1
    print(
        f"pushed {result.files} files to {result.repo_id}@{result.revision}: {result.commit_url}",
        flush=True,
    )
    return 0


def add_push(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = subparsers.add_parser(
        "push", help="upload a Hugging Face folder (scriptorium export) to the Hub ($HF_ENDPOINT)"
    )
    push.add_argument("--folder", required=True, help="the export folder, e.g. data/hf_export")
    push.add_argument("--repo", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--revision", default=None, help="branch to upload to (default main)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--message", default="Upload model from Scriptorium", help="commit message")
    push.add_argument(
        "--token-env", default="HF_TOKEN", help="environment variable holding the token"
    )
    push.set_defaults(func=_cmd_push)
