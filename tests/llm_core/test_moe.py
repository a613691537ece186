"""Mixture of Experts: routing, the auxiliary losses, training metrics, KV-cache decoding, the
Mixtral export (transformers logits, round trip) and the config's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm_core.checkpoint import load_weights, save_weights
from llm_core.config import ModelConfig, MoEConfig
from llm_core.data import TokenShards
from llm_core.data.lm import RandomWindowSampler
from llm_core.generate import generate
from llm_core.interop import HFImportError, config_from_hf, export_hf, import_hf
from llm_core.model import Transformer
from llm_core.moe import MoE, active_params, load_balancing_loss, pop_router_losses
from llm_core.objectives import LMObjective
from llm_core.tokenizer import train_bpe
from llm_core.tracking import MlflowTracker, default_tracking_uri
from llm_core.trainer import Trainer
from tests.llm_core.training_helpers import SEQ, make_shards, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 320


def moe_config(**moe: object) -> ModelConfig:
    spec: dict[str, object] = {"n_experts": 4, "top_k": 2, "aux_loss_coef": 0.01, **moe}
    return ModelConfig(
        vocab_size=VOCAB, context_length=48, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
        ffn_hidden=24, rope_theta=5000.0, norm_eps=1e-6, moe=spec,  # type: ignore[arg-type]
    )  # fmt: skip


def perturbed(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose norms and router are not at their init (so routing is not near-uniform)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def reference_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, the definition: softmax, top-k, renormalise, weighted sum of experts."""
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        probs = F.softmax(F.linear(tok, layer.router.weight).float(), dim=-1)
        w, idx = probs.topk(layer.top_k)
        w = w / w.sum()
        e = layer.experts
        out.append(sum(wi * e[int(i)].down(F.silu(e[int(i)].gate(tok)) * e[int(i)].up(tok))
                       for wi, i in zip(w, idx, strict=True)))  # fmt: skip
    return torch.stack(out).reshape(x.shape)


def test_routing_matches_the_per_token_definition() -> None:
    layer = perturbed(moe_config(n_experts=5, top_k=2)).blocks[0].mlp
    assert isinstance(layer, MoE)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        fast = layer(x)
        one = layer(x[:1, :3])  # the decoding path (few tokens, no autograd)
    ref = reference_moe(layer, x)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert torch.allclose(one, ref[:1, :3], atol=1e-5)
    _, w, idx = layer.route(x.reshape(-1, 32))
    assert torch.allclose(w.sum(-1), torch.ones(21)) and idx.shape == (21, 2)


def test_load_balancing_loss_is_one_when_balanced_and_grows_when_not() -> None:
    n, e = 64, 4
    uniform = torch.full((n, e), 1 / e)
    round_robin = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], dim=1)
    aux, load = load_balancing_loss(uniform, round_robin, e)
    assert aux.item() == pytest.approx(1.0) and torch.allclose(load, torch.full((e,), 1 / e))
    peaked = F.softmax(torch.tensor([8.0, 0.0, 0.0, 0.0]).expand(n, e), dim=-1)
    aux, load = load_balancing_loss(peaked, torch.zeros(n, 1, dtype=torch.long), e)
    assert aux.item() > 3.9 and load.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_objective_adds_weighted_router_losses_with_gradient_to_the_router() -> None:
    model = perturbed(moe_config(aux_loss_coef=0.5, z_loss_coef=0.1)).train()
    x = torch.randint(0, VOCAB, (2, 16))
    y = torch.randint(0, VOCAB, (2, 16))
    loss, metrics = LMObjective()(model, (x, y))
    expected = 0.5 * (metrics["moe_aux_l0"] + metrics["moe_aux_l1"]) + 0.1 * 2 * metrics["moe_z"]
    assert loss.item() == pytest.approx(metrics["loss"].item() + expected.item(), rel=1e-5)
    assert metrics["moe_aux_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    for i in (0, 1):
        assert metrics[f"moe_load_max_l{i}"] >= 1.0 >= metrics[f"moe_load_min_l{i}"]
    # The task loss alone gives the router no gradient through the load term; the total does.
    loss.backward()
    assert all(b.mlp.router.weight.grad.abs().sum() > 0 for b in model.blocks)
    assert pop_router_losses(model) == (None, {})  # collected once, then cleared
    with torch.no_grad():
        model(x)
    assert pop_router_losses(model)[0] is None  # nothing recorded without autograd
    dense = Transformer(ModelConfig(VOCAB, 48, 1, 4, 32, 64))
    _, dense_metrics = LMObjective()(dense, (x, y))
    assert set(dense_metrics) == {"loss"}


def test_trainer_logs_expert_load_and_aux_loss_to_mlflow(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    cfg = tiny_train_config(steps=4, log_every=2, eval_every=4, checkpoint_every=4)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(64, SEQ, 2, 2, 32, 32, n_kv_head=1, moe=MoEConfig(n_experts=4, top_k=2))
    )
    sampler = RandomWindowSampler(TokenShards(shards, "train"), cfg.batch_size, SEQ, seed=1)
    tracker = MlflowTracker(default_tracking_uri(tmp_path / "store"), "moe")
    with tracker.start_run("moe-run"):
        Trainer(model, LMObjective(), cfg, sampler, callbacks=[tracker.callback()]).fit()
        run_id = tracker.run_id
    assert run_id is not None
    logged = tracker.client.get_run(run_id).data.metrics
    assert {"moe_aux", "moe_aux_l0", "moe_aux_l1", "moe_load_max_l1", "moe_load_min_l0"} <= set(
        logged
    )
    assert 0.99 < logged["moe_aux"] < 4.0 and logged["moe_load_max_l0"] >= 1.0


def test_kv_cache_decoding_equals_the_full_forward() -> None:
    model = perturbed(moe_config())
    prompts = [[5, 9, 33, 7, 100, 2], [44, 3]]
    out = generate(model, prompts, max_new_tokens=10, temperature=0.0)
    for prompt, reply in zip(prompts, out, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert list(reply) == ids[len(prompt) :]
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(2)
        steps = [model(x[:, :12], kv_cache=cache)]
        steps += [model(x[:, t : t + 1], kv_cache=cache) for t in range(12, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


def test_active_parameters_and_flops_count_top_k_experts_only() -> None:
    moe = Transformer(moe_config(n_experts=4, top_k=1))
    dense = Transformer(ModelConfig(VOCAB, 48, 2, 4, 32, 24, n_kv_head=2))
    expert = 3 * 32 * 24
    assert moe.num_params() - dense.num_params() == 2 * (3 * expert + 4 * 32)
    assert active_params(moe) == dense.num_params() + 2 * 4 * 32  # plus the routers
    assert moe.flops_per_token() == dense.flops_per_token() + 6 * 2 * 4 * 32


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = "The old ship rode at anchor in the grey bay, and the sailors sang. " * 40
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([text + "介绍一下中国。世界上最大的动物是什么？" * 10], vocab_size=VOCAB).save(
        str(path)
    )
    return path


def test_mixtral_export_matches_transformers_and_round_trips(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    model = perturbed(moe_config(n_experts=4, top_k=2, aux_loss_coef=0.02))
    save_weights(model, tmp_path / "w")
    export_hf(tmp_path / "w", tokenizer_path, tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["MixtralForCausalLM"] and hf_cfg["num_local_experts"] == 4
    assert hf_cfg["num_experts_per_tok"] == 2 and hf_cfg["router_aux_loss_coef"] == 0.02
    cfg, state = import_hf(tmp_path / "hf")
    assert cfg == model.config
    ref = model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model(x)).abs().max().item() <= 1e-4
    # Saved by transformers 5 (fused expert tensors), it imports as the same model.
    hf.save_pretrained(tmp_path / "resaved")
    cfg2, state2 = import_hf(tmp_path / "resaved")
    assert cfg2.moe == model.config.moe
    assert all(torch.allclose(state2[k], ref[k]) for k in ref)
    again = load_weights(tmp_path / "w")
    assert isinstance(again.blocks[0].mlp, MoE)


def test_configs_we_cannot_run_are_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="unknown model.moe keys"):
        moe_config(experts=3)
    with pytest.raises(ValueError, match="arch 'llama'"):
        ModelConfig(VOCAB, 48, 1, 4, 32, 64, arch="gpt2", moe={"n_experts": 2})
    hf = {
        "model_type": "mixtral", "vocab_size": VOCAB, "max_position_embeddings": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "hidden_size": 32,
        "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2,
    }  # fmt: skip
    assert config_from_hf(hf).moe == MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.01)
    with pytest.raises(HFImportError, match="sliding_window"):
        config_from_hf({**hf, "sliding_window": 4096})
    with pytest.raises(HFImportError, match="router_jitter_noise"):
        config_from_hf({**hf, "router_jitter_noise": 0.1})


def test_demo_moe_profile_has_demo_active_parameters() -> None:
    from llm_core.config import load_profile, model_config_from_profile

    demo = Transformer(model_config_from_profile(load_profile("demo")))
    moe = Transformer(model_config_from_profile(load_profile("demo-moe")))
    assert abs(active_params(moe) - demo.num_params()) / demo.num_params() < 0.002  # the routers
    assert moe.num_params() > 2.5 * demo.num_params()
