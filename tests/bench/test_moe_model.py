"""MoEfication (sparsekit.bench.moe_model): a dense LLaMA into a real-weight Mixtral."""

import pytest
import torch
import transformers

from sparsekit.bench.moe_model import (
    balanced_assign,
    check_dense_model,
    expert_output_norms,
    fit_router,
    gate_weights,
    moefy,
    moefy_mlp,
    parameter_counts,
    partition_channels,
    set_temperature,
    set_top_k,
    teacher_topk,
    train_routers,
)

E = 8


def _tiny_llama(tied: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["kmeans", "random"])
def test_partition_gives_equal_disjoint_sets_covering_all_channels(method):
    acts = torch.randn(300, 128)
    groups = partition_channels(acts, E, method=method)
    assert groups.shape == (E, 128 // E) and groups.dtype == torch.long
    assert torch.equal(groups.flatten().sort().values, torch.arange(128))
    assert all(torch.equal(g, g.sort().values) for g in groups)


def test_kmeans_partition_recovers_planted_coactivation_groups():
    # 4 groups of 16 channels; each group fires on its own quarter of the tokens, plus noise;
    # the channels are shuffled so a contiguous split cannot find the groups by accident
    torch.manual_seed(1)
    tokens, channels = 400, 64
    planted = torch.randperm(channels).view(4, 16)
    acts = 0.05 * torch.randn(tokens, channels)
    for g, members in enumerate(planted):
        on = torch.arange(tokens) % 4 == g
        acts[on.nonzero(), members] += torch.randn(int(on.sum()), 16).abs() + 1
    found = partition_channels(acts, 4)
    assert {tuple(g.tolist()) for g in found} == {tuple(sorted(g.tolist())) for g in planted}
    # the random split (kmeans' start) does not
    assert {tuple(g.tolist()) for g in partition_channels(acts, 4, method="random")} != {
        tuple(sorted(g.tolist())) for g in planted
    }


def test_balanced_assign_fills_every_group_exactly():
    sim = torch.zeros(12, 3)
    sim[:, 0] = 1.0  # everyone prefers group 0
    assign = balanced_assign(sim, 4)
    assert torch.bincount(assign, minlength=3).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="do not fill"):
        balanced_assign(sim, 5)


@pytest.mark.parametrize("tied", [False, True])
def test_zero_router_with_all_experts_is_the_dense_model(tied):
    dense = _tiny_llama(tied)
    moe = moefy(dense, _ids(4, 32, 0), E, E, temperature=0.0, show_progress=False)
    assert isinstance(moe, transformers.MixtralForCausalLM)
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (E, 2 * 128 // E, 64)
    assert moe.model.layers[0].mlp.experts.down_proj.shape == (E, 64, 128 // E)
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tied
    ids = _ids(2, 24, 1)
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shared", [32, 64])
def test_shared_expert_model_with_all_experts_is_the_dense_model(shared, tmp_path):
    dense = _tiny_llama(tied=True)
    moe = moefy(dense, _ids(4, 32, 0), 4, 4, temperature=0.0, shared=shared, show_progress=False)
    assert isinstance(moe, transformers.Qwen2MoeForCausalLM)
    mlp = moe.model.layers[0].mlp
    routed = (128 - shared) // 4
    assert mlp.experts.gate_up_proj.shape == (4, 2 * routed, 64)
    assert mlp.shared_expert.down_proj.weight.shape == (64, shared)
    ids = _ids(2, 24, 1)
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), rtol=1e-4, atol=1e-4)
    # the shared channels are the ones with the largest mean contribution, disjoint from the experts'
    dmlp = dense.model.layers[0].mlp
    x = _mlp_inputs(dense, _ids(4, 32, 0), 0)
    acts = torch.nn.functional.silu(x @ dmlp.gate_proj.weight.T) * (x @ dmlp.up_proj.weight.T)
    contribution = acts.abs().mean(0) * dmlp.down_proj.weight.norm(dim=0)
    chosen = {row.tolist().__str__() for row in mlp.shared_expert.gate_proj.weight.detach()}
    best = contribution.detach().topk(shared).indices
    assert chosen == {row.tolist().__str__() for row in dmlp.gate_proj.weight.detach()[best]}
    # top_k < E drops routed experts only; saved, it reloads in plain transformers
    set_top_k(moe, 1)
    assert not torch.allclose(_logits(moe, ids), _logits(dense, ids), rtol=1e-4, atol=1e-4)
    moe.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, transformers.Qwen2MoeForCausalLM) and reloaded.config.num_experts_per_tok == 1
    torch.testing.assert_close(_logits(reloaded, ids), _logits(moe, ids), rtol=1e-5, atol=1e-5)


def test_set_top_k_rescales_the_experts():
    dense = _tiny_llama()
    moe = moefy(dense, _ids(4, 32, 0), E, 2, temperature=0.0, show_progress=False)
    ids = _ids(2, 24, 1)
    assert not torch.allclose(_logits(moe, ids), _logits(dense, ids), rtol=1e-4, atol=1e-4)
    set_top_k(moe, E)
    assert moe.config.num_experts_per_tok == E and moe.model.layers[1].mlp.gate.top_k == E
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="top_k must be in"):
        set_top_k(moe, E + 1)


def test_dense_model_is_not_changed():
    dense = _tiny_llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moefy(dense, _ids(2, 16, 0), E, 2, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_saved_folder_loads_with_plain_from_pretrained(tmp_path):
    moe = moefy(_tiny_llama(tied=True), _ids(4, 32, 0), E, 2, temperature=1e-2, show_progress=False)
    moe.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, transformers.MixtralForCausalLM)
    assert reloaded.config.num_experts_per_tok == 2 and reloaded.config.num_local_experts == E
    assert reloaded.config.moefication["temperature"] == 1e-2
    ids = _ids(2, 24, 1)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(moe, ids), rtol=1e-5, atol=1e-5)


def _mlp_inputs(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    xs = []
    hook = model.model.layers[layer].post_attention_layernorm.register_forward_hook(
        lambda mod, args, out: xs.append(out.reshape(-1, out.shape[-1]))
    )
    _logits(model, ids)
    hook.remove()
    return xs[0]


def test_fitted_router_picks_the_largest_experts_more_often_than_chance():
    dense = _tiny_llama()
    mlp = dense.model.layers[1].mlp
    gate, up, down = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
    train = _mlp_inputs(dense, _ids(16, 64, 0), 1)
    held_out = _mlp_inputs(dense, _ids(8, 64, 99), 1)
    weights, stats = moefy_mlp(train, gate, up, down, E, top_k=2, temperature=1e-2)
    # the experts as the MoE holds them: gate rows, then up rows; down columns scaled by top_k
    gate_up, expert_down = weights["experts.gate_up_proj"], weights["experts.down_proj"] / 2
    half = gate_up.shape[1] // 2
    acts = torch.cat(
        [torch.nn.functional.silu(held_out @ g[:half].T) * (held_out @ g[half:].T) for g in gate_up], 1
    )
    groups = torch.arange(128).view(E, -1)
    truth = expert_output_norms(acts, torch.cat(list(expert_down), 1), groups)  # [T, E]
    picked = (held_out @ weights["gate.weight"].T).argmax(1)
    hit_rate = (picked == truth.argmax(1)).float().mean().item()
    assert hit_rate > 2.0 / E, hit_rate  # chance: 1 / E
    assert stats.recall[1] > 2.0 / E
    # the experts together are the dense MLP
    torch.testing.assert_close(
        sum(torch.cat(list(expert_down), 1)[:, g] @ acts[:, g].T for g in groups).T,
        mlp(held_out).detach(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_fit_router_solves_a_linear_problem():
    x = torch.randn(500, 16)
    w_true = torch.randn(4, 16)
    w, r2 = fit_router(x, x @ w_true.T, ridge=1e-9)
    torch.testing.assert_close(w, w_true, rtol=1e-4, atol=1e-4)
    assert r2 > 0.999


def test_temperature_sets_the_router_logit_spread():
    dense = _tiny_llama()
    calib = _ids(4, 32, 0)
    moe = moefy(dense, calib, E, 2, temperature=1e-2, show_progress=False)
    before = moe.model.layers[0].mlp.gate.weight.clone()
    set_temperature(moe, 1e-1)
    torch.testing.assert_close(moe.model.layers[0].mlp.gate.weight, before * 10)
    zero = moefy(dense, calib, E, 2, temperature=0.0, show_progress=False)
    assert not zero.model.layers[0].mlp.gate.weight.any()
    with pytest.raises(ValueError, match="temperature > 0"):
        set_temperature(zero, 1e-2)


def test_parameter_counts():
    moe = moefy(_tiny_llama(tied=True), _ids(2, 16, 0), E, 2, show_progress=False)
    counts = parameter_counts(moe)
    assert counts["total"] == sum(p.numel() for p in moe.parameters())
    assert counts["experts"] == 2 * 3 * 64 * 128 and counts["router"] == 2 * E * 64
    assert counts["active"] == counts["total"] - counts["experts"] * 6 // 8


def test_refuses_what_it_cannot_convert():
    dense = _tiny_llama()
    with pytest.raises(ValueError, match="equal experts"):
        check_dense_model(dense, 3, 1)
    with pytest.raises(ValueError, match="top_k must be in"):
        check_dense_model(dense, E, E + 1)
    with pytest.raises(ValueError, match="shared channels"):
        check_dense_model(dense, E, 2, shared=128)
    with pytest.raises(ValueError, match="routed channels"):
        check_dense_model(dense, 8, 2, shared=4)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    )
    with pytest.raises(ValueError, match="LLaMA / Mistral"):
        moefy(gpt2, _ids(1, 8, 0), E, 2, show_progress=False)


@pytest.mark.real
def test_real_smollm2_moe(smollm2):
    """SmolLM2-135M into 8 experts from 8 x 128 calibration tokens: with a zero router and all
    experts it is the dense model; the fitted routers pick the largest expert well above chance."""
    from sparsekit.hf.data import calibration_ids, evaluation_ids

    model, tok = smollm2
    calib = calibration_ids(tok, "wiki-offline", nsamples=8, seqlen=128, seed=0)
    stats: list = []
    moe = moefy(model, calib, E, E, temperature=0.0, stats=stats, show_progress=False)  # ~10 s, 1 thread
    assert moe.config.tie_word_embeddings and moe.lm_head.weight is moe.model.embed_tokens.weight
    ids = evaluation_ids(tok, "wiki-offline", max_tokens=64)
    torch.testing.assert_close(_logits(moe, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert len(stats) == 30
    assert sum(s.recall[1] for s in stats) / 30 > 3.0 / E
    assert all(s.rel_error[4] < s.rel_error[2] < s.rel_error[1] for s in stats)


def test_train_routers_changes_only_the_routers_and_lowers_the_distillation_loss():
    from sparsekit.hf.trainer import topk_distill_loss

    dense = _tiny_llama(tied=True)
    moe = moefy(dense, _ids(8, 32, 0), 4, 2, temperature=1e-3, shared=32, show_progress=False)
    ids = _ids(8, 32, 2)
    targets = teacher_topk(dense, ids, k=16)
    assert targets[0].shape == (8, 32, 16) and targets[1].dtype == torch.int32
    # the teacher's top-16 are the dense model's largest logits
    torch.testing.assert_close(targets[0], _logits(dense, ids).topk(16, dim=-1).values)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    gates_before = gate_weights(moe, ids[:2])
    assert gates_before.shape == (2, 64, 2)
    torch.testing.assert_close(gates_before, torch.full_like(gates_before, 0.5), atol=5e-3, rtol=0)

    def loss() -> float:
        return float(topk_distill_loss(_logits(moe, ids), *targets))

    start = loss()
    losses = train_routers(moe, ids, targets, steps=30, lr=3e-2, batch=8)
    assert len(losses) == 30 and loss() < start - 1e-3  # a broken gradient path leaves it unchanged
    changed = {n for n, p in moe.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert all(not p.requires_grad or p.grad is None for p in moe.parameters())
    assert gate_weights(moe, ids[:2])[..., 0].mean() > 0.55  # the gates are no longer uniform
    assert moe.config.moefication["temperature"] is None
    with pytest.raises(ValueError, match="from and to a temperature"):
        set_temperature(moe, 1e-2)
    with pytest.raises(ValueError, match="targets must be"):
        train_routers(moe, ids[:4], targets, steps=1)
