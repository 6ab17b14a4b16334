"""Family x method coverage on tiny random models built from transformers' own config classes.

Every cell prunes a fresh copy of one family's tiny model (4 blocks, hidden 64) through the user
surface (``sparsekit.prune``, ``sparsekit.save`` / ``load``, ``export_dense``, ``save_pretrained``
/ ``from_pretrained``) and checks the result against an independent reference:
- unstructured / N:M: every block linear at its target sparsity (each N:M group holding N),
  logits finite, greedy decoding with the KV cache equal to decoding without it;
- depth: logits equal to the dense model with the removed blocks replaced by the identity (a
  forward hook, not sparsekit's code), and cached decoding equal to uncached;
- width: logits equal to the dense model with the removed heads' and channels' input columns of
  the output projections zeroed (columns matched by value) plus any compensation bias;
- checkpoints: the reloaded model's logits equal the in-memory model's.
A cell is OK, or the refusal's message (a ``ValueError`` / ``UnsupportedArchitecture`` raised
before any work), or FAIL with the error. ``python bench/coverage.py`` writes the table.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekit.models import UnsupportedArchitecture, describe, linear_weight

log = logging.getLogger(__name__)

FAMILIES = (
    "llama mistral ministral3 qwen2 qwen3 qwen3_5_text gemma gemma2 gemma3_text gemma4_text phi phi3 olmo2 "
    "olmo3 granite cohere cohere2 starcoder2 stablelm gpt_neox gpt2 opt falcon smollm3 glm4 exaone4 seed_oss "
    "helium ernie4_5 lfm2"
).split()

# per-family settings a tiny model needs (sizes the defaults make huge, or a hybrid schedule)
_OVERRIDES: dict[str, dict] = {
    # per-layer inputs of 8 (4 blocks x 8 = 32): at 16 the model-level projection would be [64, 64], a
    # square hidden-to-hidden shape no real Gemma-4 has (E2B: 1536 -> 35 x 256)
    "gemma4_text": dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, global_head_dim=32),
    "lfm2": dict(full_attn_idxs=[1, 3]),  # convolution blocks 0 and 2
    "qwen3_5_text": dict(  # linear-attention blocks 0-2, full attention in block 3
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16
    ),
    "gpt2": dict(n_positions=128),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
}


def tiny_config(model_type: str, layers: int = 4, **extra):
    """A tiny config of ``model_type`` from transformers' config class (no downloads)."""
    from transformers import AutoConfig

    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(_OVERRIDES.get(model_type, {}))
    kwargs.update(extra)
    if model_type in ("falcon", "gpt2", "opt"):  # head_dim follows hidden_size / heads
        del kwargs["head_dim"]
    return AutoConfig.for_model(model_type, **kwargs)


MOE_FAMILIES = (
    "mixtral qwen2_moe qwen3_moe qwen3_5_moe_text olmoe gpt_oss glm4_moe deepseek_v3 llama4_text granitemoe "
    "phimoe minimax_m2"
).split()

# a tiny MoE: 8 experts of 32 channels, top-2; DeepSeek / GLM: 2 groups and a leading dense block
_MOE = dict(
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)


def tiny_moe_config(model_type: str, layers: int = 4):
    """A tiny MoE config of ``model_type``: the MoE settings its config class knows, set small."""
    config = tiny_config(model_type, layers, **({"head_dim": 8} if model_type == "deepseek_v3" else {}))
    for key, value in _MOE.items():
        if hasattr(config, key):
            setattr(config, key, value)
    return config


def tiny_model(model_type: str, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight model of ``model_type`` (biases randomised so their handling shows;
    a MoE family's routers and experts drawn wider so routing differs between tokens)."""
    from transformers import AutoModelForCausalLM

    moe = model_type in MOE_FAMILIES
    config = tiny_moe_config(model_type, layers) if moe else tiny_config(model_type, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.dim() == 1:
                p.normal_(0, 0.1)
            elif moe and (p.dim() == 3 or name.endswith(("gate.weight", "router.weight"))):
                p.normal_(0, 0.5)
    return model


def calib_ids(n: int = 4, length: int = 16, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


class CellFailure(AssertionError):
    """A cell ran but its result is wrong."""


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    if not err <= tol:
        raise CellFailure(f"{what}: relative error {err:.3g}")


def _greedy_matches_cache(model, ids: torch.Tensor, steps: int = 3) -> None:
    """Greedy decoding with the KV cache gives the tokens decoding without it gives."""
    prompt = ids[:1, :6]
    with torch.no_grad():
        cached = model.generate(
            prompt, max_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=0
        )[0, 6:]
        seq = prompt
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    if not torch.equal(cached, seq[0, 6 : 6 + len(cached)]):  # generate stops early at an EOS
        raise CellFailure(f"decoding with the KV cache {cached.tolist()} != without {seq[0, 6:].tolist()}")


# ----------------------------------------------------------------------------- checks
def check_sparsity(model, sparsity: str | float) -> None:
    """Every block linear at the target: N per group of M, or the fraction (within rounding)."""
    for block in describe(model):
        for name, linear in block.prunable().items():
            w = linear_weight(linear).detach()
            if isinstance(sparsity, str) and ":" in sparsity:
                n, m = (int(x) for x in sparsity.split(":"))
                kept = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
                if kept.max() > n:
                    raise CellFailure(f"block {block.index} {name}: a group keeps {int(kept.max())} > {n}")
            else:
                got = (w == 0).float().mean().item()
                if abs(got - float(sparsity)) > 0.05:
                    raise CellFailure(f"block {block.index} {name}: sparsity {got:.3f}, wanted {sparsity}")


def skipped_reference(dense, removed: list[int]):
    """The dense model with the given blocks replaced by the identity (forward hooks)."""
    ref = copy.deepcopy(dense)
    blocks = describe(ref).blocks

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for i in removed:
        blocks[i].register_forward_hook(identity, with_kwargs=True)
    return ref


def _kept_cols(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    found = []
    for col in pruned.T:
        match = (original.T == col).all(1).nonzero()
        if len(match) == 0:
            raise CellFailure("a kept column of an output projection is not a column of the dense one")
        found.append(int(match[0]))
    return found


def zeroed_reference(dense, pruned):
    """The dense model with the input columns of removed heads and channels of the attention and
    MLP output projections zeroed, and the pruned model's output biases (compensation)."""
    ref = copy.deepcopy(dense)
    for d, p in zip(describe(ref), describe(pruned), strict=True):
        parts = [(d.attention.o, p.attention.o)] if d.attention else []
        parts += [(d.mlp.down, p.mlp.down)] if d.mlp else []
        for d_name, p_name in parts:
            dw, pw = linear_weight(d.linear(d_name)), linear_weight(p.linear(p_name))
            gone = sorted(set(range(dw.shape[1])) - set(_kept_cols(dw, pw)))
            with torch.no_grad():
                dw[:, gone] = 0
                bias = p.linear(p_name).bias
                if bias is not None:
                    d.linear(d_name).bias = torch.nn.Parameter(bias.detach().clone())
    return ref


# ----------------------------------------------------------------------------- cells
def _prune(model, method: str, sparsity, **kw):
    import sparsekit

    return sparsekit.prune(
        model, method=method, sparsity=sparsity, calib=calib_ids(), show_progress=False, **kw
    )


def _unstructured(method: str, sparsity, **kw) -> Callable:
    def cell(dense, tmp: Path) -> None:
        model = copy.deepcopy(dense)
        _prune(model, method, sparsity, **kw)
        target = "2:4" if sparsity == "2:4" else (None if kw.get("allocation") else sparsity)
        if target is not None:
            check_sparsity(model, target)
        if not torch.isfinite(logits(model, calib_ids(2, 12))).all():
            raise CellFailure("non-finite logits after pruning")
        _greedy_matches_cache(model, calib_ids())

    return cell


def _depth(method: str, **kw) -> Callable:
    def cell(dense, tmp: Path) -> None:
        model = copy.deepcopy(dense)
        report = _prune(model, method, None, remove_layers=1, **kw)
        ids = calib_ids(2, 12)
        if not kw.get("repair"):
            _close(
                logits(model, ids), logits(skipped_reference(dense, report.removed_blocks), ids), "vs skipped"
            )
        elif not torch.isfinite(logits(model, ids)).all():
            raise CellFailure("non-finite logits after the repair")
        _greedy_matches_cache(model, calib_ids())

    return cell


def _width(method: str, **kw) -> Callable:
    def cell(dense, tmp: Path) -> None:
        model = copy.deepcopy(dense)
        report = _prune(model, method, 0.2, **kw)
        if report.params_after >= report.params_before:
            raise CellFailure("nothing was removed")
        ids = calib_ids(2, 12)
        _close(logits(model, ids), logits(zeroed_reference(dense, model), ids), "vs zeroed dense")
        _greedy_matches_cache(model, calib_ids())

    return cell


def _stacking(dense, tmp: Path) -> None:
    import sparsekit

    model = copy.deepcopy(dense)
    _prune(model, "flap", 0.2)
    _prune(model, "wanda", "2:4")
    check_sparsity(model, "2:4")
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    sparsekit.sparsify(model)
    sparsekit.save(model, tmp / "stacked")
    _close(logits(sparsekit.load(tmp / "stacked"), ids), want, "stacked checkpoint reloaded")


def _compressed_reload(dense, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    import sparsekit

    model = copy.deepcopy(dense)
    _prune(model, "wanda", "2:4")
    check_sparsity(model, "2:4")
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    sparsekit.sparsify(model)
    sparsekit.save(model, tmp / "compressed")
    _close(logits(sparsekit.load(tmp / "compressed"), ids), want, "sparsekit.load")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "compressed"), ids), want, "from_pretrained")


def _dense_export(dense, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    import sparsekit
    from sparsekit.hf.checkpoint import export_dense

    model = copy.deepcopy(dense)
    _prune(model, "sparsegpt", 0.5)
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    sparsekit.sparsify(model)
    sparsekit.save(model, tmp / "c")
    export_dense(tmp / "c", tmp / "dense")
    config = json.loads((tmp / "dense" / "config.json").read_text())
    left = [k for k in ("quantization_config", "sparsity_config") if k in config]
    if left:
        raise CellFailure(f"the dense export's config.json still holds {left}")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "dense"), ids), want, "exported dense")


def _plain_reload(dense, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(dense)
    report = _prune(model, "flap", 0.2)
    if not report.uniform_widths:
        raise CellFailure(f"uniform FLAP widths are not a plain config: {report.notes}")
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    _close(want, logits(zeroed_reference(dense, model), ids), "vs zeroed dense")
    model.save_pretrained(tmp / "plain")
    config = json.loads((tmp / "plain" / "config.json").read_text())
    if "quantization_config" in config or "block_widths" in config:
        raise CellFailure("a uniform width prune saved sparsekit-only config keys")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "plain"), ids), want, "plain from_pretrained")


def zeroed_subblocks_reference(dense, removed: list[dict]):
    """The dense model with each removed sub-block's output replaced by zeros (forward hooks on the
    dense attention / MLP module at the same place), the other modules untouched."""
    ref = copy.deepcopy(dense)
    anatomy = describe(ref)

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    for step in removed:
        block = anatomy[step["block"]]
        part = block.attention if step["kind"] == "attention" else block.mlp
        block.module.get_submodule(part.path).register_forward_hook(zero)
    return ref


def _subblocks(dense, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    import sparsekit

    model = copy.deepcopy(dense)
    report = _prune(model, "blockpruner", 0.3)
    if not report.removed_subblocks:
        raise CellFailure("no sub-block was removed")
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    _close(want, logits(zeroed_subblocks_reference(dense, report.removed_subblocks), ids), "vs zeroed dense")
    _greedy_matches_cache(model, calib_ids())
    sparsekit.save(model, tmp / "subblocks")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "subblocks"), ids), want, "from_pretrained")


def _two_stage(dense, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    import sparsekit

    model = copy.deepcopy(dense)
    report = _prune(model, "2ssp", 0.5)
    if report.params_after >= report.params_before:
        raise CellFailure("nothing was removed")
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    if not torch.isfinite(want).all():
        raise CellFailure("non-finite logits")
    _greedy_matches_cache(model, calib_ids())
    sparsekit.save(model, tmp / "2ssp")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "2ssp"), ids), want, "from_pretrained")


def _minitron(dense, tmp: Path) -> None:
    """Hidden size, MLP channels and heads cut at 30%; decodes with the cache as without; a plain
    checkpoint with the same logits. Where the family ties head width to the hidden size, the cut
    removes whole heads with it: one query head per KV group where the tiny model has a single KV
    head (heads="query"), and 50% where one unit is more than a quarter of the tiny hidden size."""
    from transformers import AutoModelForCausalLM

    from sparsekit.models import describe, hidden_map
    from sparsekit.pruning.structured import StructuredConfig
    from sparsekit.pruning.structured.minitron import heads_follow_hidden, tied_units

    model = copy.deepcopy(dense)
    kw: dict = {"axes": "hidden,mlp,heads"}
    anatomy, hmap = describe(model), hidden_map(model)
    if not hmap.problems and heads_follow_hidden(model, anatomy, hmap):
        if min(b.attention.kv_heads for b in anatomy if b.attention is not None) == 1:
            kw["heads"] = "query"
        step, _ = tied_units(anatomy, hmap, StructuredConfig(sparsity=0.3, **kw))
        sparsity = 0.5 if step > hmap.size / 4 else 0.3
    else:
        sparsity = 0.3
    report = _prune(model, "minitron", sparsity, **kw)
    if report.hidden_size is None or report.hidden_size[1] >= report.hidden_size[0]:
        raise CellFailure(f"the hidden size was not cut: {report.hidden_size}")
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    if not torch.isfinite(want).all():
        raise CellFailure("non-finite logits")
    _greedy_matches_cache(model, calib_ids())
    model.save_pretrained(tmp / "minitron")
    config = json.loads((tmp / "minitron" / "config.json").read_text())
    if "quantization_config" in config or "block_widths" in config:
        raise CellFailure("a uniform minitron cut saved sparsekit-only config keys")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "minitron"), ids), want, "from_pretrained")


CELLS: dict[str, Callable] = {
    "magnitude 50%": _unstructured("magnitude", 0.5),
    "wanda 2:4": _unstructured("wanda", "2:4"),
    "sparsegpt 50%": _unstructured("sparsegpt", 0.5),
    "sparsegpt+admm 2:4": _unstructured("sparsegpt", "2:4", update="admm"),
    "wanda+owl 70%": _unstructured("wanda", 0.7, allocation="owl"),
    "shortgpt": _depth("shortgpt"),
    "angular+repair": _depth("angular", repair=True),
    "blockpruner": _subblocks,
    "2ssp": _two_stage,
    "wanda-sp": _width("wanda-sp"),
    "flap uniform": _width("flap"),
    "flap adaptive": _width("flap", widths="adaptive"),
    "llm-pruner": _width("llm-pruner"),
    "minitron": _minitron,
    "stacking": _stacking,
    "compressed reload": _compressed_reload,
    "dense export": _dense_export,
    "plain-HF reload": _plain_reload,
}


# ----------------------------------------------------------------------------- MoE cells
def _moe_blocks(model):
    return [b for b in describe(model) if b.experts is not None]


def _expert_tensors(block) -> dict[str, torch.Tensor]:
    """The fused expert tensors and the router's per-expert rows of one MoE block, by name."""
    ex = block.experts
    experts, router = block.module.get_submodule(ex.experts), block.module.get_submodule(ex.router)
    out = {f"experts.{n}": p for n, p in experts.named_parameters(recurse=False)}
    out |= {f"router.{n}": getattr(router, n) for n in ex.router_rows}
    return out


def _expert_removal(method: str) -> Callable:
    def cell(dense, tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        model = copy.deepcopy(dense)
        report = _prune(model, method, 0.5)
        for d, p, info in zip(_moe_blocks(dense), _moe_blocks(model), report.experts, strict=True):
            kept = torch.tensor(info["kept"])
            if p.experts.num_experts != len(kept) or len(kept) != d.experts.num_experts // 2:
                raise CellFailure(f"block {p.index}: {p.experts.num_experts} experts left, wanted half")
            for name, tensor in _expert_tensors(p).items():  # by value: the kept slices of the dense ones
                if not torch.equal(tensor, _expert_tensors(d)[name][kept]):
                    raise CellFailure(f"block {p.index} {name} is not the dense tensor's kept experts")
        ids = calib_ids(2, 12)
        want = logits(model, ids)
        model.save_pretrained(tmp / "experts")
        _close(
            logits(AutoModelForCausalLM.from_pretrained(tmp / "experts"), ids), want, "plain from_pretrained"
        )
        _greedy_matches_cache(model, calib_ids())

    return cell


def _inside_experts(dense, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    import sparsekit

    model = copy.deepcopy(dense)
    report = _prune(model, "wanda", "2:4")
    check_sparsity(model, "2:4")
    for d, p in zip(_moe_blocks(dense), _moe_blocks(model), strict=True):
        n = 0
        for name, linear in p.prunable().items():
            if name.startswith(f"{p.experts.experts}."):
                kept = (linear_weight(linear) != 0).reshape(linear.out_features, -1, 4).sum(-1)
                if kept.max() > 2:
                    raise CellFailure(f"block {p.index} {name}: not 2:4")
                n += 1
        if n != 2 * p.experts.num_experts:
            raise CellFailure(f"block {p.index}: {n} expert matrices pruned of {2 * p.experts.num_experts}")
        router = p.experts.router
        if not torch.equal(p.module.get_submodule(router).weight, d.module.get_submodule(router).weight):
            raise CellFailure("the router was pruned (routers stay dense by default)")
    if not report.experts or not all(sum(e["tokens"]) > 0 for e in report.experts):
        raise CellFailure("the report does not count routed tokens per expert")
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    sparsekit.sparsify(model)
    sparsekit.save(model, tmp / "inside")
    qc = json.loads((tmp / "inside" / "config.json").read_text())["quantization_config"]
    stored = qc.get("experts", {})
    if len(stored) != 2 * len(_moe_blocks(dense)) or {v["format"] for v in stored.values()} != {"2:4"}:
        raise CellFailure(f"fused expert tensors not stored as 2:4: {sorted(stored)[:2]}")
    _close(logits(sparsekit.load(tmp / "inside"), ids), want, "sparsekit.load")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "inside"), ids), want, "from_pretrained")


def _routed_differs(dense, tmp: Path) -> None:
    """Routed statistics are not the all-token ones: the masks of some expert differ."""
    masks = []
    for tokens in ("routed", "all"):
        model = copy.deepcopy(dense)
        _prune(model, "wanda", 0.5, expert_tokens=tokens)
        block = _moe_blocks(model)[0]
        prefix = f"{block.experts.experts}."
        masks.append([linear_weight(m) != 0 for n, m in block.prunable().items() if n.startswith(prefix)])
    if all(torch.equal(a, b) for a, b in zip(*masks, strict=True)):
        raise CellFailure("routed and all-token statistics gave the same expert masks")


def _stacked_experts(dense, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(dense)
    _prune(model, "reap", 0.25)
    _prune(model, "wanda", 0.5)
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    model.save_pretrained(tmp / "stacked")
    _close(logits(AutoModelForCausalLM.from_pretrained(tmp / "stacked"), ids), want, "plain from_pretrained")


MOE_CELLS: dict[str, Callable] = {
    "reap 50%": _expert_removal("reap"),
    "ean 50%": _expert_removal("ean"),
    "frequency 50%": _expert_removal("frequency"),
    "wanda 2:4 in experts": _inside_experts,
    "routed vs all tokens": _routed_differs,
    "reap 25% + wanda 50%": _stacked_experts,
}


@dataclass
class Cell:
    family: str
    column: str
    status: str  # "OK" | "refused" | "FAIL"
    detail: str = ""
    seconds: float = 0.0


def run_cell(family: str, column: str, dense=None) -> Cell:
    """One family x column cell (a fresh tiny model unless ``dense`` is given)."""
    started = time.perf_counter()
    try:
        dense = dense if dense is not None else tiny_model(family)
        with tempfile.TemporaryDirectory() as tmp:
            (MOE_CELLS | CELLS)[column](dense, Path(tmp))
        status, detail = "OK", ""
    except CellFailure as exc:
        status, detail = "FAIL", str(exc)
    except (UnsupportedArchitecture, ValueError) as exc:
        status, detail = "refused", str(exc).splitlines()[0]
    except Exception as exc:  # noqa: BLE001 - the table records every failure
        status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        log.debug("%s / %s\n%s", family, column, traceback.format_exc())
    return Cell(family, column, status, detail, time.perf_counter() - started)


def run_coverage(families=FAMILIES, columns=tuple(CELLS), progress: bool = True) -> list[Cell]:
    from tqdm.auto import tqdm

    cells = []
    bar = tqdm(total=len(families) * len(columns), desc="coverage", disable=not progress)
    for family in families:
        try:
            dense = tiny_model(family)
        except Exception as exc:  # noqa: BLE001 - a family this transformers cannot build
            cells += [Cell(family, c, "FAIL", f"model: {type(exc).__name__}: {exc}") for c in columns]
            bar.update(len(columns))
            continue
        for column in columns:
            cells.append(run_cell(family, column, dense))
            bar.update(1)
    bar.close()
    return cells


def coverage_table(cells: list[Cell]) -> str:
    """Markdown: a row per family, a column per cell (OK / refused / FAIL), then the reasons."""
    columns = list(dict.fromkeys(c.column for c in cells))
    families = list(dict.fromkeys(c.family for c in cells))
    by = {(c.family, c.column): c for c in cells}
    marks = {"OK": "OK", "refused": "refused*", "FAIL": "**FAIL**"}
    lines = ["| family | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(marks[by[f, c].status] for c in columns) + " |")
    ok = sum(c.status == "OK" for c in cells)
    lines += ["", f"{ok} of {len(cells)} cells OK ({100 * ok / max(len(cells), 1):.1f}%)."]
    notes = [c for c in cells if c.status != "OK"]
    if notes:
        lines += ["", "Not OK:", ""]
        lines += [f"- {c.family} / {c.column} ({c.status}): {c.detail[:300]}" for c in notes]
    return "\n".join(lines)
