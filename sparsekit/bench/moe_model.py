"""MoEfication: a real-weight MoE built from a dense LLaMA-style model, without training.

No mixture-of-experts model ships offline and random weights cannot show quality, so this module
turns the embedded dense model (SmolLM2-135M) into a ``transformers.MixtralForCausalLM`` or, with a
shared expert, a ``transformers.Qwen2MoeForCausalLM`` (Zhang et al. 2022, "MoEfication"; the shared
expert as in Qwen2-MoE / DeepSeek-MoE):

- attention, norms, embeddings and ``lm_head`` copy over exactly (both families' attention is
  LLaMA's; Qwen2-MoE's q/k/v biases are switched off);
- ``shared`` > 0: the ``shared`` MLP channels with the largest mean contribution to the output
  (mean |a_c| * ||down[:, c]||, ``shared_channels``) form a shared expert every token uses; its
  gate ``shared_expert_gate`` is zero (sigmoid 0.5) and its down projection doubled to undo it;
- the other channels (rows of gate/up, columns of down) are split into ``E`` routed experts of
  equal size by balanced k-means over the channels' activation-magnitude profiles on
  calibration tokens (``partition_channels``): channels that fire on the same tokens share an
  expert, so a token's activation mass concentrates in few experts;
- a linear router without bias is fitted by ridge regression from the MLP input (the
  ``post_attention_layernorm`` output) to each routed expert's output norm (``fit_router``), and
  scaled so its logits have a small spread (``temperature``, the RMS deviation of a token's
  logits from their mean): top-k ranks by the fitted scores while the renormalised top-k
  weights stay ~1/top_k;
- every routed expert's down projection is multiplied by ``top_k`` to undo those weights, so the
  MoE output is ~ the shared expert plus the sum of the selected experts' outputs; with a zero
  router and top_k = E it is the dense MLP exactly (up to fp32 rounding).

Routers are fitted on the dense model's hidden states (each block sees what the dense model
feeds it), so one build serves every top_k: ``set_top_k`` changes k and rescales the experts.
Routing (transformers 5.x ``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter`` with
``norm_topk_prob``): softmax over the E logits, top-k of the probabilities, renormalised to sum
1; output = sum_k w_k * expert_k(x) (+ the shared expert), expert(x) = down(silu(gate x) * up x)
with ``gate_up_proj [E, 2R/E, H]`` (gate rows, then up rows) and ``down_proj [E, H, R/E]``.

What it gives on SmolLM2-135M (docs/results.md, "A real-weight MoE from SmolLM2"): SiLU-gated
activations are dense and co-activate weakly, so without a shared expert only top_k close to E
stays near dense; the shared expert holding the channels every token needs is what makes a
top_k of half the routed experts usable.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsekit.models import model_device
from sparsekit.pruning.capture import capture_block_inputs

if TYPE_CHECKING:
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1e-3
ROUTER_TARGETS = ("norm", "abs")
PARTITIONS = ("kmeans", "random")
_SUPPORTED = ("llama", "mistral")
STAT_TOKENS = 4096  # at most this many calibration tokens (strided) for LayerStats' recall / rel_error


@dataclass
class LayerStats:
    """What one block's MoEfication did, measured in-sample on (at most ``STAT_TOKENS`` of) the
    calibration tokens.

    ``recall``: per k, the fraction of each token's k experts with the largest true output norm
    that the router's top-k holds (chance: k / E). ``rel_error``: per k, ||MLP_topk - MLP|| /
    ||MLP|| over the tokens, the top-k experts' outputs summed with uniform weights (what the
    near-uniform router gives). ``kmeans_gain``: the partition's mean within-expert cosine
    similarity of activation profiles, k-means over its random balanced start.
    """

    layer: int
    recall: dict[int, float]
    rel_error: dict[int, float]
    kmeans_gain: float
    router_r2: float
    seconds: float


def check_dense_model(model: nn.Module, num_experts: int, top_k: int, shared: int = 0) -> None:
    """Refuse what the conversion cannot copy exactly (ValueError): not a LLaMA / Mistral, a bias,
    another activation, routed channels (the MLP width less ``shared``) not divisible by
    ``num_experts``, ``top_k`` outside 1..E."""
    cfg = model.config
    if cfg.model_type not in _SUPPORTED:
        raise ValueError(f"MoEfication copies LLaMA / Mistral models; got model_type {cfg.model_type!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("MoEfication needs bias-free attention and MLP (Mixtral has no biases)")
    if cfg.hidden_act != "silu":
        raise ValueError(f"MoEfication needs a SiLU-gated MLP, got hidden_act {cfg.hidden_act!r}")
    if not 0 <= shared < cfg.intermediate_size:
        raise ValueError(f"shared channels must be in 0..{cfg.intermediate_size - 1}, got {shared}")
    routed = cfg.intermediate_size - shared
    if num_experts < 1 or routed % num_experts:
        raise ValueError(
            f"the {routed} routed channels (intermediate_size {cfg.intermediate_size} - {shared} shared) "
            f"must split into {num_experts} equal experts"
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")


def mixtral_config(dense_config, num_experts: int, top_k: int) -> MixtralConfig:
    """A ``MixtralConfig`` with the dense config's attention, norms, RoPE, vocabulary and token ids,
    and ``num_experts`` experts of ``intermediate_size / num_experts`` channels."""
    from transformers import MixtralConfig

    d = dense_config
    head_dim = getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads
    return MixtralConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size // num_experts,
        num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings,
        initializer_range=d.initializer_range,
        rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters),
        sliding_window=getattr(d, "sliding_window", None),
        attention_dropout=getattr(d, "attention_dropout", 0.0),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        tie_word_embeddings=bool(getattr(d, "tie_word_embeddings", False)),
        bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
    )


def qwen2_moe_config(dense_config, num_experts: int, top_k: int, shared: int) -> Qwen2MoeConfig:
    """A ``Qwen2MoeConfig``: the dense config's attention (no q/k/v bias), norms, RoPE, vocabulary and
    token ids; a shared expert of ``shared`` channels and ``num_experts`` routed experts of
    ``(intermediate_size - shared) / num_experts`` channels in every block, top-k weights
    renormalised (``norm_topk_prob``)."""
    from transformers import Qwen2MoeConfig

    d = dense_config
    return Qwen2MoeConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings,
        initializer_range=d.initializer_range,
        rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters),
        use_sliding_window=False,
        attention_dropout=getattr(d, "attention_dropout", 0.0),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=(d.intermediate_size - shared) // num_experts,
        shared_expert_intermediate_size=shared,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        qkv_bias=False,
        tie_word_embeddings=bool(getattr(d, "tie_word_embeddings", False)),
        bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
    )


def num_experts_of(config) -> int:
    """The routed expert count under the key the family uses."""
    return getattr(config, "num_local_experts", None) or config.num_experts


def shared_channels(acts: torch.Tensor, down: torch.Tensor, count: int) -> torch.Tensor:
    """acts [T, I], down weight [H, I] -> LongTensor [count], sorted: the channels with the largest
    mean contribution to the MLP output, mean_t |a_tc| * ||down[:, c]||, the ones every token needs."""
    score = acts.abs().mean(0) * down.norm(dim=0)
    return score.topk(count).indices.sort().values


def channel_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """x [T, H], gate / up weights [I, H] -> a [T, I] = silu(x gate^T) * (x up^T)."""
    return F.silu(x @ gate.T) * (x @ up.T)


def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """sim [I, E] -> LongTensor [I]: each item's group, every group exactly ``size`` items (I = E size).

    Greedy on the flattened similarities, largest first: an item takes the best group that still
    has room.
    """
    items, groups = sim.shape
    if items != groups * size:
        raise ValueError(f"{items} items do not fill {groups} groups of {size}")
    order = torch.argsort(sim.flatten(), descending=True).tolist()
    assign = [-1] * items
    room = [size] * groups
    left = items
    for flat in order:
        item, group = divmod(flat, groups)
        if assign[item] < 0 and room[group]:
            assign[item] = group
            room[group] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(assign, dtype=torch.long, device=sim.device)


def _groups_of(assign: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.stack([torch.nonzero(assign == e).flatten() for e in range(num_experts)])


def _profiles(acts: torch.Tensor) -> torch.Tensor:
    """acts [T, I] -> [I, T]: each channel's |activation| over the tokens, unit L2 norm."""
    prof = acts.abs().T.contiguous()
    return prof / prof.norm(dim=1, keepdim=True).clamp_min(1e-12)


def partition_channels(
    acts: torch.Tensor, num_experts: int, iters: int = 30, seed: int = 0, method: str = "kmeans"
) -> torch.Tensor:
    """acts [T, I] -> LongTensor [E, I/E]: disjoint equal channel sets covering 0..I-1, each sorted.

    ``kmeans``: balanced spherical k-means over the channels' activation-magnitude profiles
    (|a_c| over the T tokens, unit norm): centroids are the groups' mean profiles, channels are
    reassigned to the most similar centroid under the equal-size constraint (``balanced_assign``)
    until nothing moves or ``iters`` rounds. Starts from a seeded random balanced split, which is
    also what ``random`` returns (the ablation).
    """
    if method not in PARTITIONS:
        raise ValueError(f"partition method must be one of {PARTITIONS}, got {method!r}")
    channels = acts.shape[1]
    if num_experts < 1 or channels % num_experts:
        raise ValueError(f"{channels} channels do not split into {num_experts} equal experts")
    assign = _random_split(channels, num_experts, seed)
    if method == "kmeans" and num_experts > 1:
        assign = _balanced_kmeans(_profiles(acts.float()), assign.to(acts.device), num_experts, iters)
    return _groups_of(assign, num_experts)


def _random_split(channels: int, num_experts: int, seed: int) -> torch.Tensor:
    """[I]: a seeded random balanced assignment of channels to experts."""
    return torch.randperm(channels, generator=torch.Generator().manual_seed(seed)) % num_experts


def _balanced_kmeans(prof: torch.Tensor, assign: torch.Tensor, num_experts: int, iters: int) -> torch.Tensor:
    """prof [I, T] unit rows, assign [I] (balanced start) -> [I] after balanced spherical k-means."""
    size = prof.shape[0] // num_experts
    for _ in range(iters):
        new = balanced_assign(prof @ _centroids(prof, assign, num_experts).T, size)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def _centroids(prof: torch.Tensor, assign: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, T]: each group's mean profile, unit norm."""
    cent = torch.zeros(num_experts, prof.shape[1], dtype=prof.dtype, device=prof.device)
    cent.index_add_(0, assign, prof)
    return cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _cohesion(prof: torch.Tensor, assign: torch.Tensor, num_experts: int) -> float:
    """Mean cosine similarity of a channel's profile to its group's centroid."""
    return (prof * _centroids(prof, assign, num_experts)[assign]).sum(1).mean().item()


def expert_output_norms(acts: torch.Tensor, down: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """acts [T, I], down weight [H, I], groups [E, I/E] -> [T, E]: the L2 norm of each expert's share
    of the MLP output (the shares sum to acts @ down^T), one expert at a time."""
    return torch.stack([(acts[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)


def router_targets(acts: torch.Tensor, down: torch.Tensor, groups: torch.Tensor, target: str) -> torch.Tensor:
    """[T, E]: what the router learns to predict per token and expert. ``norm``: the L2 norm of the
    expert's output; ``abs``: the sum of its channels' |activation| (MoEfication's choice)."""
    if target == "norm":
        return expert_output_norms(acts, down, groups)
    if target == "abs":
        return torch.stack([acts[:, g].abs().sum(1) for g in groups], dim=1)
    raise ValueError(f"router target must be one of {ROUTER_TARGETS}, got {target!r}")


def fit_router(x: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Ridge least squares, no bias: x [T, H], targets [T, E] -> (W [E, H], R^2).

    W minimises ||x W^T - targets||^2 + lam ||W||^2 with lam = ``ridge`` * mean(diag(x^T x));
    solved in float64. R^2 is of the targets' per-token deviations from their mean over experts,
    the part that ranks experts (a softmax ignores a shift shared by all logits).
    """
    x64, y64 = x.double(), targets.double()
    gram = x64.T @ x64
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    w = torch.linalg.solve(gram, x64.T @ y64).T  # [E, H]
    pred = x64 @ w.T
    dev = y64 - y64.mean(1, keepdim=True)
    res = dev - (pred - pred.mean(1, keepdim=True))
    r2 = 1.0 - (res.pow(2).sum() / dev.pow(2).sum().clamp_min(1e-300)).item()
    return w.to(x.dtype), r2


def logit_spread(logits: torch.Tensor) -> float:
    """logits [T, E] -> RMS deviation of each token's logits from their mean (what ``temperature`` sets)."""
    return (logits - logits.mean(1, keepdim=True)).pow(2).mean().sqrt().item()


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [T, E] -> [T, E] float, 1 where the expert is among the token's k highest."""
    return F.one_hot(scores.topk(k, dim=1).indices, scores.shape[1]).sum(1).to(scores.dtype)


def _routing_stats(
    acts: torch.Tensor,
    down: torch.Tensor,
    groups: torch.Tensor,
    scores: torch.Tensor,
    truth: torch.Tensor,
    ks: list[int],
    shared: torch.Tensor | None = None,
) -> tuple[dict[int, float], dict[int, float]]:
    """Router recall@k against ``truth`` [T, E] (output norms) and the top-k relative output error
    (uniform weights) of the whole MLP output (the ``shared`` channels always on), accumulating one
    expert's output [T, H] at a time."""
    recall = {}
    kept = {}
    masks = {}
    for k in ks:
        masks[k] = _topk_mask(scores, k)
        best = _topk_mask(truth, k)
        recall[k] = ((masks[k] * best).sum() / best.sum()).item()
        kept[k] = torch.zeros(acts.shape[0], down.shape[0], dtype=acts.dtype, device=acts.device)
        if shared is not None:
            kept[k] += acts[:, shared] @ down[:, shared].T
    full = acts @ down.T
    for e, g in enumerate(groups):
        out = acts[:, g] @ down[:, g].T
        for k in ks:
            kept[k].addcmul_(out, masks[k][:, e : e + 1])
    norm = full.norm().clamp_min(1e-12)
    return recall, {k: ((kept[k] - full).norm() / norm).item() for k in ks}


@torch.no_grad()
def moefy_mlp(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    num_experts: int,
    top_k: int,
    temperature: float,
    target: str = "norm",
    partition: str = "kmeans",
    ridge: float = 1e-3,
    seed: int = 0,
    layer: int = 0,
    shared: int = 0,
) -> tuple[dict[str, torch.Tensor], LayerStats]:
    """One MLP to experts: x [T, H] (its inputs), gate / up [I, H], down [H, I] ->
    ({"gate.weight" [E, H], "experts.gate_up_proj" [E, 2R/E, H], "experts.down_proj" [E, H, R/E]},
    stats), R = I - ``shared``. ``shared`` > 0 also gives a Qwen2-MoE shared expert of the
    ``shared_channels`` (``shared_expert.*_proj.weight``, its down doubled to undo the zero
    ``shared_expert_gate``'s sigmoid of 0.5). ``temperature`` 0 gives a zero router (uniform weights)."""
    start = time.perf_counter()
    acts = channel_activations(x, gate, up)  # [T, I]
    always = shared_channels(acts, down, shared) if shared else None
    routed = torch.ones(acts.shape[1], dtype=torch.bool, device=acts.device)
    if always is not None:
        routed[always] = False
    routed = routed.nonzero().flatten()  # [R]: the routed experts' channels
    channels = routed.numel()
    if channels % num_experts:
        raise ValueError(f"{channels} channels do not split into {num_experts} equal experts")
    assign = _random_split(channels, num_experts, seed + layer).to(acts.device)
    gain = 0.0
    if num_experts > 1:
        prof = _profiles(acts[:, routed])
        before = _cohesion(prof, assign, num_experts)
        if partition == "kmeans":
            assign = _balanced_kmeans(prof, assign, num_experts, iters=30)
        gain = _cohesion(prof, assign, num_experts) - before
        del prof
    groups = routed[_groups_of(assign, num_experts)]  # [E, R/E] channel indices
    truth = expert_output_norms(acts, down, groups)  # [T, E]
    goal = truth if target == "norm" else router_targets(acts, down, groups, target)
    w, r2 = fit_router(x, goal, ridge)
    scores = x @ w.T
    spread = logit_spread(scores)
    scale = temperature / spread if spread > 0 else 0.0
    every = max(1, acts.shape[0] // STAT_TOKENS)  # the statistics on a strided subsample
    recall, rel_error = _routing_stats(
        acts[::every], down, groups, scores[::every], truth[::every], _stat_ks(num_experts), always
    )
    del acts
    weights = {
        "gate.weight": (w * scale).contiguous(),
        "experts.gate_up_proj": torch.stack([torch.cat([gate[g], up[g]]) for g in groups]).contiguous(),
        "experts.down_proj": torch.stack([down[:, g] * top_k for g in groups]).contiguous(),
    }
    if always is not None:
        weights |= {
            "shared_expert.gate_proj.weight": gate[always].contiguous(),
            "shared_expert.up_proj.weight": up[always].contiguous(),
            "shared_expert.down_proj.weight": (down[:, always] * 2).contiguous(),
            "shared_expert_gate.weight": torch.zeros(1, x.shape[1], dtype=gate.dtype, device=gate.device),
        }
    stats = LayerStats(layer, recall, rel_error, gain, r2, time.perf_counter() - start)
    return weights, stats


def _stat_ks(num_experts: int) -> list[int]:
    return [k for k in (1, 2, 4) if k < num_experts]


def _run_block_capturing_mlp_input(block: nn.Module, chunks: list, index: int) -> torch.Tensor:
    """Run decoder block ``index`` on every calibration chunk (its outputs become the chunks' hidden
    states) and return the MLP input it computed: x [N L, H] float32."""
    xs: list[torch.Tensor] = []
    hook = block.post_attention_layernorm.register_forward_hook(
        lambda mod, args, out: xs.append(out.detach().reshape(-1, out.shape[-1]).float())
    )
    try:
        for chunk in chunks:
            chunk.hidden = chunk.run(block, index)
    finally:
        hook.remove()
    return torch.cat(xs)


def _dense_mlp_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = block.mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


@torch.no_grad()
def moefy(
    model: nn.Module,
    calib_ids: torch.Tensor,
    num_experts: int = 8,
    top_k: int = 2,
    temperature: float = DEFAULT_TEMPERATURE,
    *,
    target: str = "norm",
    partition: str = "kmeans",
    ridge: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
    shared: int = 0,
    stats: list[LayerStats] | None = None,
    show_progress: bool = True,
) -> MixtralForCausalLM | nn.Module:
    """Dense LLaMA / Mistral ``model`` + calibration ids [N, L] -> a ``MixtralForCausalLM``, or with
    ``shared`` > 0 channels a ``Qwen2MoeForCausalLM`` whose shared expert holds them (eval mode, the
    model's dtype and device). ``model`` is not changed.

    Per block, on the dense model's hidden states: capture the MLP input x [N L, H] (the
    ``post_attention_layernorm`` output), partition the channels (``partition_channels``), fit
    the router to ``target`` (``fit_router``), scale it so the logits' spread is ``temperature``
    (0: a zero router), multiply the experts' down projections by ``top_k``. ``stats`` (a list)
    receives one ``LayerStats`` per block.
    """
    from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM

    check_dense_model(model, num_experts, top_k, shared)
    if target not in ROUTER_TARGETS:
        raise ValueError(f"router target must be one of {ROUTER_TARGETS}, got {target!r}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition method must be one of {PARTITIONS}, got {partition!r}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be [N, L], got {tuple(calib_ids.shape)}")
    device, dtype = model_device(model), next(model.parameters()).dtype
    blocks = model.model.layers
    was_training = model.training
    model.eval()
    try:
        chunks = capture_block_inputs(model, blocks, calib_ids, batch_size, device)
        state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
        for index, block in enumerate(tqdm(blocks, desc="moefy", disable=not show_progress)):
            x = _run_block_capturing_mlp_input(block, chunks, index)
            gate, up, down = (w.float() for w in _dense_mlp_weights(block))
            weights, layer_stats = moefy_mlp(
                x, gate, up, down, num_experts, top_k, temperature,
                target=target, partition=partition, ridge=ridge, seed=seed, layer=index, shared=shared,
            )  # fmt: skip
            del x
            for name, value in weights.items():
                state[f"model.layers.{index}.mlp.{name}"] = value.to(dtype)
            log.info(
                "block %d: router recall@k %s, top-k rel. error %s, R^2 %.3f, %.1f s",
                index,
                {k: round(v, 3) for k, v in layer_stats.recall.items()},
                {k: round(v, 3) for k, v in layer_stats.rel_error.items()},
                layer_stats.router_r2,
                layer_stats.seconds,
            )
            if stats is not None:
                stats.append(layer_stats)
        del chunks
    finally:
        model.train(was_training)
    if shared:
        config, build = qwen2_moe_config(model.config, num_experts, top_k, shared), Qwen2MoeForCausalLM
    else:
        config, build = mixtral_config(model.config, num_experts, top_k), MixtralForCausalLM
    config.moefication = {
        "source": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "partition": partition,
        "router_target": target,
        "temperature": temperature,
        "down_scale": top_k,
        "shared_channels": shared,
        "calibration_tokens": int(calib_ids.numel()),
        "note": "every expert's down_proj is multiplied by down_scale (= num_experts_per_tok): to route "
        "to k experts instead, multiply them by k / down_scale (sparsekit.bench.moe_model.set_top_k)",
    }
    config.dtype = dtype
    moe = build(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"MoE state mismatch: missing {missing}, unexpected {unexpected}")
    return moe.to(device=device, dtype=dtype).eval()


def set_top_k(moe: nn.Module, top_k: int) -> None:
    """Route each token to ``top_k`` experts, in place: rescales every expert's down projection from
    the old k to the new one (the renormalised top-k weights are ~1/k each) and updates the
    config, the routers and the MoE blocks."""
    cfg = moe.config
    if not 1 <= top_k <= num_experts_of(cfg):
        raise ValueError(f"top_k must be in 1..{num_experts_of(cfg)}, got {top_k}")
    old = cfg.num_experts_per_tok
    for layer in moe.model.layers:
        layer.mlp.experts.down_proj.data.mul_(top_k / old)
        if hasattr(layer.mlp, "top_k"):
            layer.mlp.top_k = top_k
        layer.mlp.gate.top_k = top_k
    cfg.num_experts_per_tok = top_k
    if isinstance(getattr(cfg, "moefication", None), dict):
        cfg.moefication["down_scale"] = top_k


def set_temperature(moe: nn.Module, temperature: float) -> None:
    """Rescale every router so its logits' spread on calibration tokens is ``temperature`` (> 0);
    needs a model built by ``moefy`` with a non-zero temperature."""
    info = getattr(moe.config, "moefication", None) or {}
    old = info.get("temperature", 0.0)
    if temperature == old:
        return
    if not old or temperature <= 0:
        raise ValueError(f"can rescale a fitted router only from and to a temperature > 0 (now {old})")
    for layer in moe.model.layers:
        layer.mlp.gate.weight.data.mul_(temperature / old)
    info["temperature"] = temperature


def parameter_counts(moe: nn.Module) -> dict[str, int]:
    """Total parameters (tied counted once), routed expert and router parameters, and those a token
    uses at the current top_k (``active``: all but the unselected routed experts; the shared expert
    is active)."""
    cfg = moe.config
    total = sum(p.numel() for p in moe.parameters())
    experts = sum(layer.mlp.experts.down_proj.numel() * 3 for layer in moe.model.layers)
    router = sum(layer.mlp.gate.weight.numel() for layer in moe.model.layers)
    count = num_experts_of(cfg)
    unused = experts * (count - cfg.num_experts_per_tok) // count
    return {"total": total, "experts": experts, "router": router, "active": total - unused}


def stats_summary(stats: list[LayerStats]) -> dict:
    """Means over blocks of the per-block statistics, and the per-block rows."""
    if not stats:
        return {"blocks": []}
    ks = list(stats[0].recall)
    mean = lambda values: sum(values) / len(values)
    return {
        "mean_recall": {k: mean([s.recall[k] for s in stats]) for k in ks},
        "mean_rel_error": {k: mean([s.rel_error[k] for s in stats]) for k in ks},
        "mean_router_r2": mean([s.router_r2 for s in stats]),
        "mean_kmeans_gain": mean([s.kmeans_gain for s in stats]),
        "blocks": [asdict(s) for s in stats],
    }


# --- router fine-tuning: peaked gates, as a trained MoE has -----------------------------------------


def teacher_topk(
    dense: nn.Module, ids: torch.Tensor, k: int = 64, batch: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's ``k`` largest next-token logits for ``ids`` [N, L] -> (values fp32, indices
    int32), each [N, L, k]: the distillation targets of ``train_routers``."""
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            logits = dense(ids[start : start + batch].to(model_device(dense)), use_cache=False).logits
            top = logits.float().topk(k, dim=-1)
            values.append(top.values.cpu())
            indices.append(top.indices.to(torch.int32).cpu())
    return torch.cat(values), torch.cat(indices)


def routers_of(moe: nn.Module) -> list[nn.Parameter]:
    """Every MoE block's router weight [E, H]."""
    return [layer.mlp.gate.weight for layer in moe.model.layers]


def train_routers(
    moe: nn.Module,
    ids: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    batch: int = 4,
    seed: int = 0,
) -> list[float]:
    """Fine-tune only the routers, in place, by distillation from the dense model's top-k logits
    (``teacher_topk``; ``ids`` [N, L] the same rows): AdamW on the router weights, everything else
    frozen, ``batch`` random rows per step. A trained MoE's gates weight its experts unequally; a
    fitted router scaled to a small spread (``moefy``) gives every selected expert ~1/top_k. The
    top-k choice follows the logits; the gradient reaches the routers through the renormalised
    top-k weights. Returns the loss of every step. Marks the config's ``moefication`` (temperature
    None: ``set_temperature`` no longer applies)."""
    if steps < 1 or batch < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch >= 1, lr > 0; got {steps}, {batch}, {lr}")
    values, indices = targets
    if values.shape[:2] != ids.shape or indices.shape != values.shape:
        raise ValueError(
            f"targets must be [N, L, k] for ids {tuple(ids.shape)}, got {tuple(values.shape)} / "
            f"{tuple(indices.shape)}"
        )
    from sparsekit.hf.trainer import topk_distill_loss

    routers = routers_of(moe)
    saved = {p: p.requires_grad for p in moe.parameters()}
    for p in moe.parameters():
        p.requires_grad_(False)
    for p in routers:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(routers, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = model_device(moe)
    losses = []
    try:
        for _ in tqdm(range(steps), desc="router steps", unit="step"):
            rows = torch.randperm(ids.shape[0], generator=generator)[:batch]
            logits = moe(ids[rows].to(device), use_cache=False).logits
            loss = topk_distill_loss(logits, values[rows].to(device), indices[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    info = getattr(moe.config, "moefication", None)
    if isinstance(info, dict):
        info["temperature"] = None
        info["router_training"] = {"steps": steps, "lr": lr, "batch": batch, "seed": seed}
    log.info("router training: loss %.4f -> %.4f over %d steps", losses[0], losses[-1], steps)
    return losses


def gate_weights(moe: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The renormalised top-k gate weights every block gives every token of ``ids`` [N, L], sorted
    descending -> [blocks, N * L, top_k] fp32 (uniform gates: every entry 1 / top_k)."""
    seen: list[torch.Tensor] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, out: seen.append(out[1].detach().float().cpu()))
        for layer in moe.model.layers
    ]
    blocks = len(moe.model.layers)
    try:
        with torch.no_grad():
            for row in ids:
                moe(row[None].to(model_device(moe)), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    per_block = [torch.cat(seen[b::blocks]) for b in range(blocks)]
    return torch.stack(per_block).sort(dim=-1, descending=True).values
