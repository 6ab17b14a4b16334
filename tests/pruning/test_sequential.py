"""One calibration forward per block (``PruneConfig(sequential=True)``; by default for methods that
set the kept weights) against a true-sequential reference that re-runs the whole model for every
group of linears."""

import copy
from dataclasses import replace

import pytest
import torch

import sparsekit
import sparsekit.pruning.engine as engine
from sparsekit.bench.coverage import tiny_model as coverage_model
from sparsekit.models import block_linears, describe, linear_weight
from sparsekit.pruning import PruneConfig, prune_model
from sparsekit.pruning.method import InputStat
from tests.conftest import tiny_model


def _calib(n=6, seqlen=16, vocab=128, seed=1):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _input_groups(block) -> list[list[str]]:
    """q/k/v, o, gate/up, down: the Llama-style blocks' groups by shared input, in call order."""
    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    return [attn, ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _statistic(config: PruneConfig, inputs: list[torch.Tensor]) -> InputStat:
    """The method's statistic of ``inputs`` (one tensor per calibration batch): an fp32 partial per
    batch summed in float64, the engine's own summation order."""
    statistic = config.statistic
    total = None
    for x in inputs:
        value = statistic.new(x.shape[-1], x.device)
        statistic.accumulate(x, value)
        total = value.double() if total is None else total + value.double()
    tokens = sum(x.numel() // x.shape[-1] for x in inputs)
    return InputStat(total.float(), tokens=tokens)


def _reference(model, ids, config: PruneConfig, autocast: torch.dtype | None = None):
    """GPTQ's true-sequential order the slow way: for every block, for every group, whole-model
    forwards (every earlier block and group already pruned) capture the group's input on ``ids``
    (in batches of ``config.batch_size``); the group is pruned with the method's own solve on that
    input's statistic."""
    for block in describe(model).blocks:
        linears = block_linears(block)
        for group in _input_groups(block):
            seen = []
            handle = linears[group[0]].register_forward_pre_hook(
                lambda m, a, seen=seen: seen.append(a[0].detach())
            )
            for batch in ids.split(config.batch_size):
                region = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
                with torch.no_grad(), region:
                    model(batch, use_cache=False)
            handle.remove()
            stat = _statistic(config, seen)
            for name in group:
                weight = linear_weight(linears[name]).detach()
                result = config.method.prune(weight, stat, config)
                with torch.no_grad():
                    linears[name].weight.copy_(result.weight)
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layers" in n and p.dim() == 2}


@pytest.mark.parametrize(
    ("method", "sparsity"), [("wanda", 0.5), ("wanda", "2:4"), ("sparsegpt", 0.5), ("sparsegpt", "2:4")]
)
def test_one_forward_matches_the_true_sequential_reference(method, sparsity):
    model = tiny_model("llama")
    ids = _calib()
    config = PruneConfig(
        method=method,
        sparsity=sparsity,
        batch_size=4,
        blocksize=16,
        show_progress=False,
        forward_dtype="model",
        sequential=True,
    )
    expected = _weights(_reference(copy.deepcopy(model), ids, config))
    report = prune_model(model, ids, config)
    assert not report.notes, report.notes
    got = _weights(model)
    for name, weight in expected.items():
        assert torch.equal(got[name] != 0, weight != 0), name
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_two_passes_differ_from_one_only_after_the_first_group():
    """q/k/v read the block's input either way; o_proj onwards see the pruned layers before them
    in one pass (a dense forward in two)."""
    model = tiny_model("llama")
    ids = _calib()
    results = {}
    for sequential in (True, False):
        pruned = copy.deepcopy(model)
        config = PruneConfig(
            method="wanda", sparsity=0.5, batch_size=4, show_progress=False, sequential=sequential
        )
        prune_model(pruned, ids, config)
        results[sequential] = _weights(pruned)
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(results[True][first], results[False][first])
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(results[True][down] != 0, results[False][down] != 0)


def _one_pass_wanda(forward_dtype: str) -> PruneConfig:
    return PruneConfig(
        method="wanda", sparsity=0.5, batch_size=4, show_progress=False, forward_dtype=forward_dtype,
        sequential=True,
    )  # fmt: skip


def _mask_agreement(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    agree = torch.cat([(got[n] != 0).flatten() == (w != 0).flatten() for n, w in expected.items()])
    return agree.float().mean().item()


def test_bf16_mixed_forwards_follow_the_reference():
    """Under autocast each chunk's thread opens its own region; weights cast after they are pruned."""
    model = tiny_model("llama")
    ids = _calib()
    config = _one_pass_wanda("bf16-mixed")
    expected = _weights(_reference(copy.deepcopy(model), ids, config, autocast=torch.bfloat16))
    report = prune_model(model, ids, config)
    assert report.forward_dtype == "bf16-mixed"
    assert _mask_agreement(_weights(model), expected) > 0.995


def test_a_cast_copy_runs_the_pruned_weights():
    """forward_dtype=bfloat16 runs a bf16 copy of each block: every group's pruned weights reach the
    copy before the next group's statistic, so the result follows the reference run in bf16."""
    model = tiny_model("llama")
    ids = _calib()
    config = _one_pass_wanda("bfloat16")
    expected = _weights(_reference(copy.deepcopy(model).to(torch.bfloat16), ids, config))
    prune_model(model, ids, config)
    got = _weights(model)
    assert all(w.dtype == torch.float32 for w in got.values())
    assert _mask_agreement(got, expected) > 0.98
    two = copy.deepcopy(tiny_model("llama"))
    prune_model(two, ids, replace(config, sequential=False))
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(got[down] != 0, _weights(two)[down] != 0)  # the copy saw pruned layers


def test_one_forward_is_deterministic_and_times_its_phases_apart():
    ids = _calib()
    runs = []
    for _ in range(2):
        model = tiny_model("qwen3")
        report = prune_model(
            model, ids, PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=2, show_progress=False)
        )
        runs.append(_weights(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    timings = report.timings_s
    assert timings["forward"] > 0 and timings["solve"] > 0 and timings["statistics"] > 0
    assert len(report.block_rel_errors) == 2 and all(0 < e < 1 for e in report.block_rel_errors)
    assert all(layer.output_rel_error is not None for layer in report.layers)


@pytest.mark.parametrize("case", ["permute", "memory", "moe"])
def test_blocks_one_forward_cannot_take_get_two_with_a_note(case, monkeypatch):
    ids = _calib()
    arch = "mixtral" if case == "moe" else "llama"
    options = dict(
        method="wanda", sparsity="2:4" if case == "permute" else 0.5, batch_size=4, show_progress=False
    )
    if case == "permute":  # auto picks one forward for a weight update, permute takes two
        options.update(permute=True, update="admm")
    if case == "memory":
        monkeypatch.setattr(engine, "free_bytes", lambda device: 1024)
    build = coverage_model if case == "moe" else tiny_model
    one, two = build(arch), build(arch)
    report = prune_model(one, ids, PruneConfig(**options, sequential=None if case == "permute" else True))
    prune_model(two, ids, PruneConfig(**options, sequential=False))
    assert any("two calibration forwards per block" in note for note in report.notes), report.notes
    expected = {"permute": "permute", "memory": "free", "moe": "Mixture-of-Experts"}[case]
    assert any(expected in note for note in report.notes)
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_failing_chunk_stops_the_pass_without_hanging_or_leaving_hooks():
    model = tiny_model("llama")
    o_proj = model.model.layers[0].self_attn.o_proj
    calls = []

    def fail_on_the_third_chunk(module, args):
        calls.append(1)
        if len(calls) == 4:  # the dense first-chunk forward, then chunks 0, 1, 2
            raise RuntimeError("boom in chunk 2")

    handle = o_proj.register_forward_pre_hook(fail_on_the_third_chunk)
    with pytest.raises(RuntimeError, match="boom in chunk 2"):
        prune_model(
            model,
            _calib(n=8),
            PruneConfig(method="wanda", sparsity=0.5, batch_size=2, show_progress=False, sequential=True),
        )
    handle.remove()
    for module in block_linears(model.model.layers[0]).values():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_nan_activations_are_refused_in_one_forward():
    model = tiny_model("llama")
    ids = _calib()
    with torch.no_grad():
        model.model.embed_tokens.weight[ids[0, 3]] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf activations entering model.layers.0.self_attn.q_proj"):
        prune_model(
            model, ids, PruneConfig(method="wanda", sparsity=0.5, show_progress=False, sequential=True)
        )


def test_each_layer_runs_once_per_chunk_and_once_more_on_the_first_sequence():
    """4 chunks of 2: a dense forward of the first sequence alone (the block error's reference, the
    groups), then one forward per chunk; two passes ran 8 per layer (test_statistics_stop.py)."""
    model = tiny_model("llama")
    counts, rows = {}, {}
    for index, block in enumerate(model.model.layers):
        for name, module in block_linears(block).items():
            key = f"{index}.{name}"
            counts[key], rows[key] = 0, []

            def count(m, i, o, key=key):
                counts[key] += 1
                rows[key].append(i[0].shape[0])

            module.register_forward_hook(count)
    report = prune_model(
        model,
        _calib(8),
        PruneConfig(method="wanda", sparsity=0.5, batch_size=2, show_progress=False, sequential=True),
    )
    later = {k: v for k, v in counts.items() if not k.startswith("0.")}  # block 0 ran more in capture
    assert later and set(later.values()) == {1 + 4}, later
    assert all(rows[k] == [1, 2, 2, 2, 2] for k in later), rows
    assert len(report.block_rel_errors) == 2 and all(0 < e < 1 for e in report.block_rel_errors)


def test_the_block_error_of_one_forward_is_the_first_sequences():
    """The one-forward block error compares the first sequence's dense block output with its pruned
    one (not the first chunk's): recomputed here for block 0 from a dense copy and the pruned model."""
    ids = _calib(4)
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    config = PruneConfig(
        method="wanda",
        sparsity=0.5,
        batch_size=2,
        forward_dtype="float32",
        show_progress=False,
        sequential=True,
    )
    report = prune_model(model, ids, config)
    with torch.no_grad():
        states = model(
            ids[:1], output_hidden_states=True
        ).hidden_states  # (embeddings, block 0's output, ...)
        positions = torch.arange(ids.shape[1])[None]
        rope = dense.model.rotary_emb(states[0], positions)
        reference = dense.model.layers[0](states[0], position_embeddings=rope, position_ids=positions)
    reference = reference[0] if isinstance(reference, tuple) else reference
    want = (reference - states[1]).square().sum() / reference.square().sum()
    assert report.block_rel_errors[0] == pytest.approx(want.item(), rel=1e-4)


def test_the_default_is_one_forward_where_the_weights_are_solved():
    assert (
        PruneConfig(method="sparsegpt").one_forward and PruneConfig(method="wanda", update="admm").one_forward
    )
    assert not PruneConfig(method="wanda").one_forward and not PruneConfig(method="ria").one_forward
    assert PruneConfig(method="wanda", sequential=True).one_forward
    assert not PruneConfig(method="sparsegpt", sequential=False).one_forward


def test_the_cli_passes_option_reaches_the_engine(tmp_path):
    """`sparsekit prune --passes one|two|auto` on a saved folder gives the API's weights (Wanda:
    auto is two passes)."""
    from safetensors.torch import load_file

    from sparsekit import cli
    from sparsekit.hf.models import load_model
    from tests.tiny_folder import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    args = [
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--save-format",
        "dense",
    ]
    weights = {}
    for passes in ("one", "two", "auto"):
        out = tmp_path / passes
        assert cli.main(["prune", str(folder), *args, "--passes", passes, "--out", str(out)]) == 0
        weights[passes] = load_file(out / "model.safetensors")
    for passes, sequential in (("one", True), ("two", False)):
        model, tokenizer = load_model(str(folder), dtype=torch.float32)
        sparsekit.prune(
            model, "wanda", sparsity=0.5, calib="wiki-offline", tokenizer=tokenizer, nsamples=4, seqlen=32,
            sequential=sequential, show_progress=False,
        )  # fmt: skip
        for name, param in model.named_parameters():
            if name.endswith("down_proj.weight"):
                assert torch.equal(weights[passes][name], param.detach()), (passes, name)
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(weights["one"][down] != 0, weights["two"][down] != 0)
    assert torch.equal(weights["auto"][down], weights["two"][down])


@pytest.mark.parametrize(("arch", "widest"), [("llama", 128), ("gpt2", 256)])
def test_paused_bytes_counts_every_chunk_at_its_widest_input(arch, widest):
    """Two hidden-size tensors and the widest layer input per token (GPT-2's Conv1D included)."""
    from sparsekit.pruning.capture import Chunk
    from sparsekit.pruning.sequential import paused_bytes

    block = describe(tiny_model(arch)).blocks[0]
    chunks = [Chunk(torch.zeros(2, 8, 64), []), Chunk(torch.zeros(1, 8, 64), [])]
    assert paused_bytes(chunks, block_linears(block)) == 24 * (2 * 64 + widest) * 4


def test_an_explicit_pass_count_that_cannot_apply_is_refused():
    with pytest.raises(ValueError, match="permute=True reorders"):
        PruneConfig(method="ria", sparsity="2:4", permute=True, sequential=True)
    with pytest.raises(ValueError, match="magnitude runs none per block"):
        PruneConfig(method="magnitude", sparsity=0.7, allocation="owl", sequential=False)
    assert PruneConfig(method="ria", sparsity="2:4", permute=True, sequential=False).permute
