"""The classifier: pooling over right-padded rows, the dict of heads, which parameters train,
the joint objective, the step-indexed sampler, the metrics and the transformers export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from llm_core.classify import (
    ClassifierModel,
    Encoded,
    TaskSampler,
    classify_texts,
    collate,
    load_classifier,
    save_classifier,
)
from llm_core.classify_export import compare_classifier_with_transformers, export_classifier_hf
from llm_core.classify_metrics import classification_metrics, confusion_png, per_class_markdown
from llm_core.config import ModelConfig
from llm_core.model import Transformer
from llm_core.objectives import ClassifyObjective

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = {"spam": ("ham", "spam"), "language": ("de", "en", "fr")}


def _model(pooling: str = "last", vocab: int = 300, seed: int = 0) -> ClassifierModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab, 32, n_layer=3, n_head=2, n_kv_head=1, d_model=32, ffn_hidden=64)
    return ClassifierModel(Transformer(cfg), TASKS, pooling)


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_padding_never_changes_a_rows_logits(pooling: str) -> None:
    model = _model(pooling).eval()
    short, long = np.array([5, 6, 7]), np.array([9, 8, 7, 6, 5, 4, 3])
    ids, lengths = collate([short, long], pad=1)
    alone, _ = collate([short], pad=1)
    with torch.no_grad():
        both = model(ids, lengths, "language")
        single = model(alone, torch.tensor([3]), "language")
    assert both.shape == (2, 3)
    torch.testing.assert_close(both[:1], single, atol=1e-5, rtol=1e-5)


def test_multi_task_forward_splits_rows_between_heads() -> None:
    model = _model().eval()
    ids, lengths = collate([np.array([5, 6]), np.array([7]), np.array([8, 9, 10])], pad=1)
    with torch.no_grad():
        spam, lang = model(ids, lengths, [("spam", 1), ("language", 2)])
        assert spam.shape == (1, 2) and lang.shape == (2, 3)
        torch.testing.assert_close(lang, model(ids, lengths, "language")[1:])
        with pytest.raises(ValueError, match="add up to 2"):
            model(ids, lengths, [("spam", 1), ("language", 1)])


def test_train_blocks_freezes_all_but_the_top() -> None:
    model = _model()
    model.freeze_all_but(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("backbone.blocks.2.", "backbone.norm.", "heads."))
    }
    assert "backbone.tok_emb.weight" not in trainable
    model.freeze_all_but(-1)
    assert model.trainable_params() == model.num_params()
    with pytest.raises(ValueError, match="train_blocks 4"):
        model.freeze_all_but(4)


def _data(n: int, seed: int, n_labels: int) -> Encoded:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n)
    # The label is written into the text: token 10 + label, then noise.
    ids = [np.array([10 + int(y), *rng.integers(20, 200, rng.integers(1, 6))]) for y in labels]
    return Encoded(ids, labels.astype(np.int64))


def test_sampler_is_step_indexed_and_resumes() -> None:
    tasks = {"spam": _data(10, 0, 2), "language": _data(7, 1, 3)}
    a = TaskSampler(tasks, 4, pad=1, seed=3)
    batches = [a.next_batch() for _ in range(6)]
    b = TaskSampler(tasks, 4, pad=1, seed=3)
    b.load_state_dict({**a.state_dict(), "step": 3})
    for want in batches[3:]:
        got = b.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # Epochs without replacement: the first 8 spam rows (two batches) are 8 distinct rows.
    rows = torch.cat([x["spam_labels"] for x in batches[:2]])
    assert rows.numel() == 8
    with pytest.raises(ValueError, match="mismatch"):
        TaskSampler({"spam": tasks["spam"]}, 4, pad=1, seed=3).load_state_dict(a.state_dict())


def test_joint_objective_learns_both_heads() -> None:
    torch.manual_seed(0)
    model = _model()
    tasks = {"spam": _data(64, 0, 2), "language": _data(64, 1, 3)}
    sampler = TaskSampler(tasks, 16, pad=1, seed=0)
    objective = ClassifyObjective({"spam": 1.0, "language": 0.5})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, metrics = objective(model, sampler.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = metrics["spam_loss"] + 0.5 * metrics["language_loss"]
    torch.testing.assert_close(metrics["loss"], expected)
    assert metrics["spam_accuracy"] > 0.9 and metrics["language_accuracy"] > 0.9


def test_metrics_known_values(tmp_path: Path) -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1, 0, 1])
    probs = np.eye(2)[pred] * 0.8 + 0.1
    m = classification_metrics(y, probs, ["ham", "spam"])
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["spam"]["precision"] == pytest.approx(4 / 5)
    assert m["per_class"]["spam"]["recall"] == pytest.approx(4 / 5)
    assert m["per_class"]["ham"]["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["loss"] == pytest.approx(-np.log(0.9) * 6 / 8 - np.log(0.1) * 2 / 8)
    table = per_class_markdown(m, "t")
    assert "| spam | 0.8000 | 0.8000 | 0.8000 | 5 |" in table and "| ham | 2 | 1 |" in table
    png = confusion_png(m, tmp_path / "cm.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows"):
        classification_metrics(np.zeros(0), np.zeros((0, 2)), ["a", "b"])


def test_save_load_and_classify_texts(tmp_path: Path, chat_tok: Tokenizer) -> None:
    model = _model(vocab=chat_tok.get_vocab_size())
    save_classifier(model, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.tasks == TASKS and loaded.config.pooling == "last"
    out = classify_texts(loaded, chat_tok, ["hello there", "banana"])
    assert set(out[0]) == {"spam", "language"}
    label, p = out[1]["language"]
    assert label in TASKS["language"] and 1 / 3 <= p <= 1


def test_export_matches_transformers(tmp_path: Path, chat_tok: Tokenizer) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(chat_tok.get_vocab_size(), 32, n_layer=2, n_head=2, n_kv_head=1,
                      d_model=32, ffn_hidden=64)  # fmt: skip
    end = chat_tok.token_to_id("<|endoftext|>")
    model = ClassifierModel(Transformer(cfg), {"spam": ("ham", "spam")}, end_token=end)
    for p in model.parameters():  # a trained-looking model: logits far from zero
        p.data.normal_(0, 0.3)
    save_classifier(model, tmp_path / "clf")
    (tmp_path / "tok.json").write_text(chat_tok.to_str())
    out = export_classifier_hf(tmp_path / "clf", tmp_path / "tok.json", tmp_path / "hf")
    import json

    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_cfg["id2label"] == {"0": "ham", "1": "spam"}
    texts = ["hi", "tell me about the sea", "a"]
    assert compare_classifier_with_transformers(out, model, chat_tok, texts) < 1e-4
    multi = _model(vocab=chat_tok.get_vocab_size())
    save_classifier(multi, tmp_path / "multi")
    with pytest.raises(ValueError, match="2 heads"):
        export_classifier_hf(tmp_path / "multi", tmp_path / "tok.json", tmp_path / "hf2")
