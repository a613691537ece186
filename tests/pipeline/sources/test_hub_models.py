"""``scriptorium import --hub`` against the mirror server's read-only ``hf/models`` route.

A small GPT-2 that ``transformers`` writes (safetensors, plus a pickled ``pytorch_model.bin`` that
must never be downloaded) lies in a temporary mirror folder; the real server serves it, the real
``huggingface_hub`` client fetches it through ``$HF_ENDPOINT``, and the imported llm_core model
must give ``transformers``' logits on the same folder within 1e-4, and chat.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.sources.mirror import MirrorServer

transformers = pytest.importorskip("transformers")

REPO_ID = "test-org/tiny-gpt2"
SCRIPTORIUM = Path(sys.executable).parent / "scriptorium"


def _tokenizer(out: Path) -> int:
    """A byte-level BPE without the chat tokens (like GPT-2's), saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the cat likes milk. the dog likes bones. " * 50], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def hub_mirror(tmp_path_factory: pytest.TempPathFactory):
    """(server URL, the model folder) of a temporary mirror holding one GPT-2 model repo."""
    root = tmp_path_factory.mktemp("mirror")
    (root / "hf" / "datasets").mkdir(parents=True)
    folder = root / "hf" / "models" / REPO_ID
    folder.mkdir(parents=True)
    vocab = _tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    torch.save({"not": "to be fetched"}, folder / "pytorch_model.bin")
    with MirrorServer(root) as server:
        yield server.url, folder


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTORIUM), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_import_hub_matches_transformers_and_chats(hub_mirror, tmp_path: Path, monkeypatch) -> None:
    import os

    from llm_core.checkpoint import load_weights
    from llm_core.tokenizer import SPECIAL_TOKENS, load_tokenizer

    url, folder = hub_mirror
    out, cache = tmp_path / "imported", tmp_path / "cache"
    env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": "hf_secret_never_sent"}
    proc = _run("import", "--hub", f"{REPO_ID}@main", "--out", str(out), "--cache-dir", str(cache),
                env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"imported {REPO_ID}@main" in proc.stdout and url in proc.stdout
    snapshot = next((cache / "models--test-org--tiny-gpt2" / "snapshots").iterdir())
    fetched = sorted(p.name for p in snapshot.iterdir())
    assert "model.safetensors" in fetched and "tokenizer.json" in fetched
    assert "pytorch_model.bin" not in fetched  # pickles are never downloaded

    ours = load_weights(out).eval()
    assert ours.config.arch == "gpt2"
    tok = load_tokenizer(out)  # the chat tokens were added
    assert all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    ids = tok.encode("the cat likes bones.", add_special_tokens=False).ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
        mine = ours(x)[..., : theirs.shape[-1]]
    assert (theirs - mine).abs().max().item() <= 1e-4

    chat = subprocess.run(
        [str(SCRIPTORIUM), "chat", "--weights", str(out), "--max-new-tokens", "5"],
        input="hello cat\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip(), "chat printed no reply"


def test_import_hub_refusals(hub_mirror, tmp_path: Path) -> None:
    import os

    url, _ = hub_mirror
    env = {**os.environ, "HF_ENDPOINT": url}
    cache = ["--cache-dir", str(tmp_path / "cache")]
    missing = _run("import", "--hub", "test-org/absent", "--out", str(tmp_path / "o"), *cache,
                   env=env)  # fmt: skip
    assert missing.returncode == 2 and "test-org/absent" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = _run("import", "--hub", "not a repo", "--out", str(tmp_path / "o"), *cache, env=env)
    assert bad.returncode == 2 and "not a Hub model reference" in bad.stderr


def test_imported_weights_asset(hub_mirror, tmp_path: Path) -> None:
    """The asset imports the profile's model through the ``hub`` resource, and ``sft_weights``
    starts from it when the profile says ``start_sft``."""
    import dagster as dg

    from llm_core.checkpoint import load_weights
    from pipeline.assets.imported import imported_weights_asset, sft_deps, sft_start
    from pipeline.resources import HubSource, Paths, Profile

    url, _ = hub_mirror
    profile_file = tmp_path / "hubtest.yaml"
    profile_file.write_text(
        f"name: hubtest\nvocab_size: 300\ncontext_length: 64\nimported_weights:\n  hub: {REPO_ID}@main\n  start_sft: true\n"
    )
    paths = Paths(data_root=str(tmp_path / "data"))
    resources = {
        "paths": paths,
        "profile": Profile(name=str(profile_file)),
        "hub": HubSource(endpoint=url, cache_dir=str(tmp_path / "cache")),
    }
    result = dg.materialize([imported_weights_asset()], resources=resources)
    assert result.success
    meta = result.asset_materializations_for_node("imported_weights")[0].metadata
    assert meta["repo"].value == REPO_ID and meta["arch"].value == "gpt2"
    assert "pytorch_model.bin" not in meta["files"].value
    out = tmp_path / "data" / "imported_weights"
    assert load_weights(out).config.arch == "gpt2" and (out / "tokenizer.json").is_file()
    profile = Profile(name=str(profile_file)).load()
    assert sft_start(profile, paths) == out
    assert sft_deps(profile) == [dg.AssetKey("imported_weights")]
    assert sft_start({"name": "x"}, paths) is None and sft_deps({}) == []
