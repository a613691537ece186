"""Hugging Face interop: export -> transformers (logits, greedy generation, chat template),
export -> import round trip, GPT-2 checkpoints saved by transformers, pickles refused, model card.

Everything is built here: a byte-level BPE trained on a few paragraphs, a tiny model trained a few
steps on them. Tests that need ``transformers`` (an optional extra) skip without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from llm_core.checkpoint import load_weights, save_weights
from llm_core.config import ModelConfig
from llm_core.generate import generate
from llm_core.hf_card import render_model_card
from llm_core.hf_tokenizer import CHAT_TEMPLATE, add_chat_tokens
from llm_core.interop import (
    HFImportError,
    config_from_hf,
    export_hf,
    import_hf,
    load_hf_model,
)
from llm_core.model import Transformer
from llm_core.sft import ChatSpecials, encode_conversations, encode_prompt
from llm_core.tokenizer import END, render_chat, train_bpe

TEXT = """\
The sea was calm that morning, and the old ship rode at anchor in the grey bay. The captain
walked the deck and looked at the sky, and the sailors sang as they mended the nets. When the
wind rose in the afternoon the ship set out for the open water, and the gulls followed her far
from the shore. What is the capital of France? Paris is the capital of France. Give three tips
for staying healthy: eat well, sleep enough and walk every day. Once upon a time there lived a
king who had three daughters, and the youngest was the wisest of them all.
"""
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Give three tips\nfor staying healthy."},
    {"role": "assistant", "content": "Eat well, sleep enough and walk every day."},
]
VOCAB = 384
CTX = 96
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_bpe([TEXT * 20], vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _train(model: Transformer, ids: list[int], steps: int = 40) -> Transformer:
    """A few AdamW steps on random windows of ``ids``: enough for non-degenerate greedy text."""
    g = torch.Generator().manual_seed(0)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - CTX - 1, (8,), generator=g)
        x = torch.stack([data[s : s + CTX] for s in starts])
        y = torch.stack([data[s + 1 : s + CTX + 1] for s in starts])
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def _config(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=VOCAB, context_length=CTX, n_layer=2, n_head=4, n_kv_head=2, d_model=48,
        ffn_hidden=96, rope_theta=5000.0, norm_eps=1e-6,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> tuple[Path, Path]:
    """(weights folder, export folder) of a tiny GQA Llama trained a few steps on TEXT."""
    from llm_core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode(TEXT * 4).ids + encode_conversations(tok, [CONVERSATION] * 8).ids.tolist()
    torch.manual_seed(0)
    model = _train(Transformer(_config()), ids)
    root = tmp_path_factory.mktemp("trained")
    save_weights(model, root / "weights")
    card = {"model_name": "tiny-test", "eval": {"val_bpb": 2.5}, "license": "apache-2.0"}
    export_hf(root / "weights", tokenizer_path, root / "hf", card=card)
    return root / "weights", root / "hf"


# ------------------------------------------------------------------------------ with transformers
def test_transformers_logits_match(trained: tuple[Path, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    weights, hf_dir = trained
    ours = load_weights(weights).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, VOCAB, (3, CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generation_and_chat_template_match(
    trained: tuple[Path, Path], tokenizer_path: Path
) -> None:
    """32 greedy tokens for a left-padded batch of chat prompts, prompts from each side's own
    chat template: identical ids in, identical ids out."""
    transformers = pytest.importorskip("transformers")
    from llm_core.tokenizer import load_tokenizer

    weights, hf_dir = trained
    tok = load_tokenizer(tokenizer_path)
    sp = ChatSpecials.from_tokenizer(tok)
    prompts = [CONVERSATION[:2], CONVERSATION[:4]]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_tok.padding_side = "left"
    enc = hf_tok.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    ours_ids = [encode_prompt(tok, p) for p in prompts]
    for row, mask, mine in zip(enc["input_ids"], enc["attention_mask"], ours_ids, strict=True):
        assert row[mask.bool()].tolist() == mine
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model = load_weights(weights).eval()
    width = enc["input_ids"].shape[1]
    # As shipped: generation_config.json stops at <|end|> / <|endoftext|>, as llm_core's chat does.
    assert hf.generation_config.eos_token_id == [sp.end, sp.eot]
    theirs = hf.generate(**enc, max_new_tokens=32, do_sample=False)[:, width:].tolist()
    mine = generate(model, ours_ids, 32, temperature=0, pad_id=sp.pad, stop_ids=(sp.end, sp.eot))
    for t, m in zip(theirs, mine, strict=True):
        stop = next((i for i, tok in enumerate(t) if tok in (sp.end, sp.eot)), len(t))
        assert t[:stop] == m
    # Without stop tokens: 32 tokens each, identical.
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(**enc, max_new_tokens=32, do_sample=False)[:, width:].tolist()
    mine = generate(model, ours_ids, 32, temperature=0, pad_id=sp.pad)
    assert theirs == mine and all(len(r) == 32 for r in mine)
    assert all(len(set(r)) > 8 for r in mine)  # a trained model's text, not one repeated token


def test_chat_template_renders_like_render_chat(
    trained: tuple[Path, Path], tokenizer_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    from llm_core.tokenizer import load_tokenizer

    _, hf_dir = trained
    tok = load_tokenizer(tokenizer_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.chat_template == CHAT_TEMPLATE
    for gen in (False, True):
        text = hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert text == render_chat(CONVERSATION, add_generation_prompt=gen)
    full = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert list(full) == encode_conversations(tok, [CONVERSATION]).ids.tolist()
    # Tool results become user turns, as llm_core's SFT encoding has them.
    tool = [*CONVERSATION[:2], {"role": "tool", "content": '{"answer": 4}'}]
    ids = hf_tok.apply_chat_template(tool, add_generation_prompt=True, return_dict=True)
    assert list(ids["input_ids"]) == encode_prompt(tok, tool)
    with pytest.raises(Exception, match="unknown chat role"):
        hf_tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)
    assert hf_tok.model_max_length == CTX
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == (
        "<|end|>", "<|pad|>", "<|endoftext|>"
    )  # fmt: skip


def _random_gpt2(tmp_path: Path, **kw: object) -> tuple[object, Path]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CTX, n_embd=48, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0, **kw,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # biases and LayerNorm gains start at 0 and 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "gpt2")
    assert (tmp_path / "gpt2" / "model.safetensors").is_file()
    return model, tmp_path / "gpt2"


def test_gpt2_saved_by_transformers_imports_with_same_logits(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    hf, folder = _random_gpt2(tmp_path)
    ours = load_hf_model(folder).eval()
    assert ours.config.arch == "gpt2" and ours.config.ffn_hidden == 4 * 48
    x = torch.randint(0, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - ours(x)).abs().max().item() <= 1e-4  # type: ignore[operator]
    # ... and saved by llm_core it keeps working, and exports back as a GPT2LMHeadModel.
    save_weights(ours, tmp_path / "ours")
    export_hf(tmp_path / "ours", tokenizer_path, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        assert (again(input_ids=x).logits - ours(x)).abs().max().item() <= 1e-4
    prompt = x[0, :10].tolist()
    no_stop = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None)
    theirs = again.generate(x[:1, :10], generation_config=no_stop)[0, 10:].tolist()
    assert theirs == generate(ours, prompt, 16, temperature=0)[0]


def test_sharded_llama_from_transformers(tmp_path: Path) -> None:
    """A Llama saved by transformers in several safetensors shards (with an index) imports."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=20000.0,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    ours = load_hf_model(tmp_path / "llama").eval()
    assert (ours.config.rope_theta, ours.config.tie_embeddings, ours.config.kv_heads) == (
        20000.0, False, 2
    )  # fmt: skip
    x = torch.randint(0, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - ours(x)).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------ without transformers
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": False, "n_kv_head": 4},
        {"arch": "gpt2", "n_kv_head": None, "rope_theta": 1e4},
    ],
    ids=["llama-gqa-tied", "llama-mha-untied", "gpt2"],
)
def test_export_import_round_trip_is_identical(
    tmp_path: Path, tokenizer_path: Path, kw: dict[str, object]
) -> None:
    torch.manual_seed(0)
    model = Transformer(_config(**kw))
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_weights(model, tmp_path / "w")
    export_hf(tmp_path / "w", tokenizer_path, tmp_path / "hf")
    cfg, state = import_hf(tmp_path / "hf")
    assert cfg == model.config
    ref = model.state_dict()
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    # Saved again by llm_core, it is the same model (tied weights re-tied, not copied).
    save_weights(load_hf_model(tmp_path / "hf"), tmp_path / "again")
    again = load_weights(tmp_path / "again")
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    assert (again.lm_head.weight is again.tok_emb.weight) == model.config.tie_embeddings


def test_export_folder_layout_and_configs(trained: tuple[Path, Path], tokenizer_path: Path) -> None:
    weights, hf_dir = trained
    names = sorted(p.name for p in hf_dir.iterdir())
    assert names == sorted([
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ])  # fmt: skip
    cfg = json.loads((hf_dir / "config.json").read_text())
    ours = ModelConfig.load(weights / "config.json")
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["rope_theta"], cfg["rope_parameters"]["rope_theta"]) == (5000.0, 5000.0)
    assert (cfg["rms_norm_eps"], cfg["num_key_value_heads"], cfg["head_dim"]) == (1e-6, 2, 12)
    assert cfg["max_position_embeddings"] == CTX and cfg["tie_word_embeddings"] is True
    assert config_from_hf(cfg) == ours
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == ([5, 0], 1, 0)
    assert (hf_dir / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    assert not any(p.name.startswith(".") for p in hf_dir.parent.iterdir())  # no temp left


def test_model_card_is_valid_hub_metadata(trained: tuple[Path, Path]) -> None:
    """huggingface_hub parses the card's metadata; every file is a valid commit operation (what
    ``upload_folder`` builds). The mirror's Hub API is read-only, so no upload is attempted."""
    from huggingface_hub import CommitOperationAdd, ModelCard

    _, hf_dir = trained
    card = ModelCard.load(hf_dir / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and "llama" in card.data.tags
    assert card.data.pipeline_tag == "text-generation"
    assert "| val_bpb | 2.5 |" in card.text and "# tiny-test" in card.text
    for f in hf_dir.iterdir():
        op = CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f))
        assert op.upload_info.size == f.stat().st_size


def test_model_card_metadata_fields() -> None:
    card = {
        "datasets": [
            {"name": "alpaca", "id": "tatsu-lab/alpaca", "licence": "CC-BY-NC-4.0", "role": "sft"},
            {"name": "books", "url": "https://www.gutenberg.org", "licence": "public domain"},
        ],
        "stages": [{"name": "pretrain", "description": "books"}, {"name": "sft"}],
        "base_model": "openai-community/gpt2",
    }
    text = render_model_card(card, _config(arch="gpt2", n_kv_head=None), 1_234_567)
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["datasets"] == ["tatsu-lab/alpaca"]  # Hub ids only; URLs stay in the table
    assert front["base_model"] == "openai-community/gpt2" and "gpt2" in front["tags"]
    assert (front["license"], front["license_name"]) == ("other", "mixed-data-licences")
    assert "non-commercial use only" in text and "1.23M-parameter" in text
    assert "No evaluation report" in text and "1. **sft**" in text


# ------------------------------------------------------------------------------ refusals
def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    hf_dir = tmp_path / "pickled"
    hf_dir.mkdir()
    cfg = {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": 1,
           "n_head": 2}  # fmt: skip
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    torch.save({"transformer.wte.weight": torch.zeros(10, 8)}, hf_dir / "pytorch_model.bin")
    with pytest.raises(HFImportError, match=r"pytorch_model\.bin: refusing to load pickled"):
        import_hf(hf_dir)


def test_safetensors_win_over_a_pickle_that_is_never_read(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    torch.manual_seed(0)
    model = Transformer(_config(arch="gpt2", n_kv_head=None))
    save_weights(model, tmp_path / "w")
    export_hf(tmp_path / "w", tokenizer_path, tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail")
    _, state = import_hf(tmp_path / "hf")
    assert torch.equal(state["pos_emb.weight"], model.pos_emb.weight)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 16}, "head_dim=16"),
        ({"num_hidden_layers": None}, "missing 'num_hidden_layers'"),
    ],
)
def test_unsupported_llama_configs_are_refused(
    trained: tuple[Path, Path], change: dict[str, object], message: str
) -> None:
    _, hf_dir = trained
    cfg = {**json.loads((hf_dir / "config.json").read_text()), **change}
    with pytest.raises(HFImportError, match=message):
        config_from_hf(cfg)


def test_gpt2_variants_we_cannot_run_are_refused() -> None:
    base = {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": 1,
            "n_head": 2}  # fmt: skip
    assert config_from_hf(base).arch == "gpt2"
    with pytest.raises(HFImportError, match="activation_function='relu'"):
        config_from_hf({**base, "activation_function": "relu"})
    with pytest.raises(HFImportError, match="attention scaling"):
        config_from_hf({**base, "scale_attn_by_inverse_layer_idx": True})


def test_missing_and_unexpected_weights_are_named(tmp_path: Path, tokenizer_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    save_weights(Transformer(_config()), tmp_path / "w")
    export_hf(tmp_path / "w", tokenizer_path, tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(f)
    save_file({**tensors, "model.layers.0.extra.weight": torch.zeros(2)}, f)
    with pytest.raises(HFImportError, match="does not map.*extra"):
        import_hf(tmp_path / "hf")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(HFImportError, match=r"lacks weights.*k_proj"):
        import_hf(tmp_path / "hf")


def test_tokenizer_larger_than_the_model_is_refused(tmp_path: Path, tokenizer_path: Path) -> None:
    save_weights(Transformer(_config(vocab_size=300)), tmp_path / "w")
    with pytest.raises(ValueError, match="more than the model's vocab_size=300"):
        export_hf(tmp_path / "w", tokenizer_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_imported_gpt2_gets_chat_tokens_and_fine_tunes_with_the_sft_stage(tmp_path: Path) -> None:
    """The way in for an existing small model: GPT-2 weights and a tokenizer without our chat
    tokens -> add_chat_tokens -> llm_core's own SFT loop, unchanged."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import pre_tokenizers, trainers

    from llm_core.stages import sft
    from llm_core.tokenizer import EOT, SPECIAL_TOKENS, load_tokenizer, new_tokenizer
    from tests.llm_core.training_helpers import tiny_train_config

    pytest.importorskip("transformers")
    gpt2_tok = new_tokenizer()  # GPT-2's shape: byte-level BPE whose only special is EOT
    gpt2_tok.train_from_iterator(
        [TEXT] * 20,
        trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )  # fmt: skip
    _, folder = _random_gpt2(tmp_path)
    model = load_hf_model(folder).eval()
    tok, grown = add_chat_tokens(gpt2_tok, model)
    added = [tok.token_to_id(t) for t in SPECIAL_TOKENS[1:]]
    assert added == list(range(VOCAB, VOCAB + 5)) and grown.config.vocab_size == VOCAB + 5
    assert gpt2_tok.token_to_id(END) is None and model.config.vocab_size == VOCAB  # untouched
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(x)[..., :VOCAB], model(x))
        rows = grown.tok_emb.weight[added]
        torch.testing.assert_close(rows, model.tok_emb.weight.mean(0).expand_as(rows))
    assert add_chat_tokens(tok, grown) == (tok, grown)  # nothing left to add

    init = tmp_path / "imported"
    save_weights(grown, init)
    tok.save(str(init / "tokenizer.json"))
    convs = [CONVERSATION, CONVERSATION[:3]] * 4
    table = pa.table({"messages": pa.array(convs)})
    pq.write_table(table, tmp_path / "train.parquet")
    pq.write_table(table, tmp_path / "val.parquet")
    cfg = tiny_train_config(steps=6, batch_size=2, eval_every=6, checkpoint_every=6, lr=3e-3)
    config = sft.Config(
        out_dir=tmp_path / "sft",
        train=cfg,
        train_path=tmp_path / "train.parquet",
        val_path=tmp_path / "val.parquet",
        init_weights=init,
        tokenizer=init / "tokenizer.json",
    )
    run = sft.run(config)
    assert run.summary["val_loss_after"] < run.summary["val_loss_before"]
    assert run.figures["val_loss_change"] < 0 and run.train.steps == 6
    tuned = load_weights(tmp_path / "sft")
    assert (
        tuned.config == grown.config
        and load_tokenizer(tmp_path / "sft").get_vocab_size() == VOCAB + 5
    )
