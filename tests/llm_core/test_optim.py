"""Muon + AdamW: orthogonalised updates, one group per parameter, AdamW parity, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_core.checkpoint import latest_checkpoint
from llm_core.config import ModelConfig
from llm_core.data import TokenShards
from llm_core.data.lm import RandomWindowSampler
from llm_core.model import Transformer
from llm_core.objectives import LMObjective
from llm_core.optim import MuonAdamW, build_optimizer, muon_param_names, newton_schulz, param_groups
from llm_core.trainer import Trainer
from tests.llm_core.training_helpers import SEQ, make_shards, tiny_model_config, tiny_train_config


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (3, 48, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_is_near_orthogonal(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # A badly conditioned input (singular values over 2 orders of magnitude): the update must
    # still move every direction by about the same amount.
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    s = torch.logspace(0, -2, min(shape[-2:])).expand(*shape[:-2], -1)
    g = u @ torch.diag_embed(s) @ vh
    out = newton_schulz(g, steps=5, dtype=dtype)
    assert out.shape == g.shape and out.dtype == g.dtype
    sv = torch.linalg.svdvals(out)
    # the quintic maps every singular value into ~[0.7, 1.2] (exactly 1 is not needed)
    assert sv.min() > 0.6 and sv.max() < 1.3
    # and it keeps the singular vectors: out ~ U V^T
    polar = u @ vh
    cos = (out * polar).sum() / (out.norm() * polar.norm())
    assert cos > 0.95
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.ones(4))


def _models() -> dict[str, torch.nn.Module]:
    base = {"vocab_size": 64, "context_length": 16, "n_layer": 2, "n_head": 4, "d_model": 32,
            "ffn_hidden": 48}  # fmt: skip
    moe = Transformer(ModelConfig(**base, n_kv_head=2, moe={"n_experts": 2}))
    frozen = Transformer(ModelConfig(**base, n_kv_head=1))
    frozen.blocks[0].requires_grad_(False)
    return {
        "gqa": Transformer(ModelConfig(**base, n_kv_head=2)),
        "gpt2": Transformer(ModelConfig(**base, arch="gpt2", tie_embeddings=False)),
        "moe": moe,
        "frozen": frozen,
    }


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_parameter_in_exactly_one_group(optimizer: str) -> None:
    cfg = tiny_train_config(optimizer=optimizer, lr=1e-3, muon_lr=0.05)
    for kind, model in _models().items():
        groups = param_groups(model, cfg)
        ids = [id(p) for g in groups for p in g["params"]]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert len(ids) == len(set(ids)) and set(ids) == trainable, kind
        names = {id(p): n for n, p in model.named_parameters()}
        muon = {names[id(p)] for g in groups if g["kind"] == "muon" for p in g["params"]}
        if optimizer == "adamw":
            assert not muon
            continue
        assert muon == set(muon_param_names(model)) and muon, kind
        assert all(n.startswith("blocks.") and "router" not in n for n in muon)
        adam = {names[id(p)] for g in groups if g["kind"] == "adamw" for p in g["params"]}
        assert "tok_emb.weight" in adam and not any("norm" in n for n in muon)
        for g in groups:
            assert g["base_lr"] == (0.05 if g["kind"] == "muon" else 1e-3)
            if g["kind"] == "muon" and g["split"]:  # fused q/k/v: q, k, v rows
                assert all(sum(g["split"]) == p.size(0) for p in g["params"])
        if kind == "gqa":  # 4 query heads, 2 kv heads of 8: rows 32 + 16 + 16
            assert [g["split"] for g in groups if g["kind"] == "muon" and g["split"]] == [
                [32, 16, 16]
            ]


def test_muon_step_is_orthogonalised_and_adamw_matches_torch() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 16))
    v = torch.nn.Parameter(torch.randn(16))
    ref_v = torch.nn.Parameter(v.detach().clone())
    opt = MuonAdamW([
        {"params": [w], "kind": "muon", "lr": 0.1, "momentum": 0.9},
        {"params": [v], "kind": "adamw", "lr": 0.01, "weight_decay": 0.1, "betas": (0.9, 0.95)},
    ])  # fmt: skip
    ref = torch.optim.AdamW([ref_v], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        before = w.detach().clone()
        grads = torch.randn(64, 16), torch.randn(16)
        w.grad, v.grad, ref_v.grad = grads[0], grads[1], grads[1].clone()
        opt.step()
        ref.step()
        if step == 0:  # zero momentum: the step is -lr * sqrt(64/16) * NS(grad)
            sv = torch.linalg.svdvals(before - w.detach()) / (0.1 * 2.0)
            assert sv.min() > 0.6 and sv.max() < 1.3
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-6)
    # a fused q/k/v matrix (32 x 16) split into 16 + 8 + 8 rows: each part moves by its own
    # (square or wide: unscaled) orthogonal step, not by the whole matrix's sqrt(32/16)
    qkv = torch.nn.Parameter(torch.randn(32, 16))
    qkv.grad, before = torch.randn(32, 16), qkv.detach().clone()
    MuonAdamW([{"params": [qkv], "kind": "muon", "lr": 0.1, "split": [16, 8, 8]}]).step()
    for part in (before - qkv.detach()).split([16, 8, 8]):
        sv = torch.linalg.svdvals(part) / 0.1
        assert sv.min() > 0.6 and sv.max() < 1.3
    assert set(opt.state[w]) == {"momentum_buffer"} and set(opt.state[v]) >= {"exp_avg"}
    with pytest.raises(ValueError, match="matrices"):
        MuonAdamW([{"params": [v], "kind": "muon"}])


def test_build_optimizer_picks_the_recipe() -> None:
    model = Transformer(tiny_model_config())
    cpu = torch.device("cpu")
    assert isinstance(build_optimizer(model, tiny_train_config(optimizer="muon"), cpu), MuonAdamW)
    assert isinstance(build_optimizer(model, tiny_train_config(), cpu), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        tiny_train_config(optimizer="sgd")


def test_resume_restores_muon_state(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    cfg = tiny_train_config(
        steps=6, optimizer="muon", schedule="wsd", checkpoint_every=3, eval_every=0, log_every=1
    )

    def trainer(out: Path, init_seed: int, crash_at: int | None = None) -> Trainer:
        torch.manual_seed(init_seed)
        sampler = RandomWindowSampler(TokenShards(shards, "train"), 4, SEQ, seed=cfg.seed)

        class Crash:
            def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
                if step == crash_at:
                    raise KeyboardInterrupt

        model = Transformer(tiny_model_config())
        return Trainer(model, LMObjective(), cfg, sampler, out_dir=out, callbacks=[Crash()])

    unbroken = trainer(tmp_path / "a", 7)
    unbroken.fit()
    crashing = trainer(tmp_path / "b", 7, crash_at=5)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000003"
    resumed = trainer(tmp_path / "b", 123)
    assert not resumed.optimizer.state  # fresh: the momentum buffers come from the checkpoint
    resumed.fit(resume=True)
    bufs = [
        s["momentum_buffer"] for s in resumed.optimizer.state.values() if "momentum_buffer" in s
    ]
    assert bufs and all(b.abs().sum() > 0 for b in bufs)
    for a, b in zip(
        unbroken.raw_model.state_dict().values(),
        resumed.raw_model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in unbroken.history]
