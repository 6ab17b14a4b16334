import json

import pytest
import torch

from sparsekit.bench.e2e import run_e2e, time_generation, write_e2e_report
from sparsekit.models import model_bytes
from tests.conftest import tiny_model

SPARSE = "sparse (2:4, magnitude)"
# the variants of quantize=("int8",) with quantize_head, in report order
INT8_HEAD_ROWS = [
    "dense",
    SPARSE,
    "dense + int8",
    f"{SPARSE} + int8",
    "dense + int8 (head too)",
    f"{SPARSE} + int8 (head too)",
]


def _prompt(length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def test_tpot_excludes_prefill(monkeypatch):
    from types import SimpleNamespace

    from sparsekit.bench import timing

    model = tiny_model("llama")
    # the timer reads a clock that only the forward advances, 1 ms per input token: prefill
    # (60 tokens) is 60 ms and a decode step 1 ms exactly, whatever else runs on the machine;
    # generate(N)/N would give (60 + 3) / 4 = 15.75 ms
    clock = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def advance(module, args, kwargs):
        clock[0] += 1e-3 * args[0].shape[1]

    model.register_forward_pre_hook(advance, with_kwargs=True)
    t = time_generation(model, _prompt(60), new_tokens=4, repeats=2)
    assert t["cache"] == "static"
    assert t["ttft_ms"] == pytest.approx(60) and t["tpot_ms"] == pytest.approx(1)
    assert t["peak_bytes"] > 0


def test_time_generation_needs_a_decode_step():
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        time_generation(tiny_model("llama"), _prompt(8), new_tokens=1)


def test_static_cache_matches_plain_greedy():
    from sparsekit.bench.e2e import _Generator

    model = tiny_model("llama")
    prompt = _prompt(10)
    _, steps, tokens = _Generator(model, 16, compile=False).run(prompt, 5)
    assert len(steps) == 4
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(tokens, ids[:, 10:])


def test_run_e2e_dense_vs_sparse(tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_e2e(
        model,
        input_ids=_prompt(40, batch=2),
        new_tokens=4,
        eval_ids=_prompt(256),
        eval_seqlen=64,
        repeats=1,
        model_label="tiny-llama",
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left unchanged
    dense, sparse = result.rows
    # no tokenizer to calibrate the default Wanda: magnitude, and the report says so
    assert dense.variant == "dense" and sparse.variant == "sparse (2:4, magnitude)"
    assert any("magnitude" in n for n in sparse.notes) and result.config["method"] == "magnitude"
    assert sparse.sparsify["layers_swapped"] == 14 and sparse.sparsify["formats"] == {"2:4": 14}
    assert sparse.model_bytes < dense.model_bytes == model_bytes(model)
    assert dense.decode_speedup == 1.0 and sparse.decode_speedup == pytest.approx(
        dense.tpot_ms / sparse.tpot_ms
    )
    for r in result.rows:
        assert r.ttft_ms > 0 and r.tpot_ms > 0 and r.decode_tok_s == pytest.approx(2 / (r.tpot_ms * 1e-3))
        assert r.ppl is not None and r.ppl > 1 and r.env["device"] == "cpu"
        # the floor counts what a step streams: an untied input table is read one row a token
        table = 0 if model.config.tie_word_embeddings else model.get_input_embeddings().weight.nbytes
        assert r.step_bytes == r.model_bytes - table
        assert r.floor_ms == pytest.approx(r.step_bytes / (result.config["read_gbps"] * 1e9) * 1e3)
    paths = write_e2e_report(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["env"]["commit"] and data["config"]["batch"] == 2 and data["config"]["prompt_len"] == 40
    assert "TTFT" in paths["md"].read_text() and "floor" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    # the report names the ISA level the CPU kernels ran at (SPARSEKIT_CPU_ISA changes the numbers)
    from sparsekit.kernels import cpu_ext

    isa = cpu_ext.resolve_isa(None).value if cpu_ext.extension() is not None else None
    assert data["config"]["cpu_isa"] == isa
    assert (f"CPU kernels at {isa})" in paths["md"].read_text()) == (isa is not None)


def test_sparse_checkpoint_is_the_sparse_variant():
    from sparsekit.api import prune
    from sparsekit.nn import sparsify

    model = tiny_model("llama")
    prune(model, method="magnitude", sparsity="2:4")
    sparsify(model)
    result = run_e2e(model, input_ids=_prompt(12), new_tokens=3, eval_ids=None, eval_tokens=0, repeats=1)
    assert [r.variant for r in result.rows] == ["dense", "sparse (checkpoint)"]
    assert result.rows[1].model_bytes < result.rows[0].model_bytes


def test_interleaved_timing_runs_every_model_in_each_round_and_sees_their_cost():
    import time

    from sparsekit.bench.e2e import time_generation_interleaved

    fast, slow = tiny_model("llama"), tiny_model("llama")
    order = []
    fast.register_forward_pre_hook(lambda m, a, k: order.append("fast"), with_kwargs=True)
    slow.register_forward_pre_hook(lambda m, a, k: order.append("slow") or time.sleep(0.01), with_kwargs=True)
    out = time_generation_interleaved(
        {"fast": fast, "slow": slow}, _prompt(8), new_tokens=3, rounds=3, show_progress=False
    )
    assert set(out) == {"fast", "slow"} and out["fast"]["rounds"] == 3
    assert out["slow"]["tpot_ms"] >= 10 > out["fast"]["tpot_ms"]
    assert out["slow"]["ttft_p20_ms"] <= out["slow"]["ttft_ms"] <= out["slow"]["ttft_p80_ms"]
    timed = order[2 * 3 :]  # after one warm-up generation (3 forwards) of each
    assert timed == (["fast"] * 3 + ["slow"] * 3) * 3  # interleaved by round, not one model after the other


def test_run_e2e_every_dtype_with_calibrated_pruning():
    """dtypes: dense and sparse rows per dtype, each sparse row compared with the dense of its dtype;
    with calibration ids the default Wanda prunes."""
    model = tiny_model("llama")
    result = run_e2e(
        model,
        input_ids=_prompt(12),
        new_tokens=3,
        eval_ids=None,
        eval_tokens=0,
        repeats=2,
        calib_ids=_prompt(16, batch=4),
        dtypes=(torch.float32, torch.bfloat16),
        show_progress=False,
    )
    names = [r.variant for r in result.rows]
    assert names == ["dense fp32", "sparse (2:4, wanda) fp32", "dense bf16", "sparse (2:4, wanda) bf16"]
    assert [r.dtype for r in result.rows] == ["fp32", "fp32", "bf16", "bf16"]
    by = {r.variant: r for r in result.rows}
    assert by["dense bf16"].model_bytes < by["dense fp32"].model_bytes
    for dt in ("fp32", "bf16"):
        dense, sparse = by[f"dense {dt}"], by[f"sparse (2:4, wanda) {dt}"]
        assert dense.decode_speedup == 1.0
        assert sparse.decode_speedup == pytest.approx(dense.tpot_ms / sparse.tpot_ms)
        assert sparse.sparsify["method"] == "wanda" and sparse.model_bytes < dense.model_bytes


def test_run_e2e_adds_quantized_dense_and_sparse_variants():
    model = tiny_model("llama").to(torch.bfloat16)
    result = run_e2e(
        model,
        input_ids=_prompt(12),
        new_tokens=3,
        eval_ids=_prompt(128),
        eval_seqlen=64,
        repeats=1,
        quantize=("int8", "int4"),
    )
    rows = {r.variant: r for r in result.rows}
    assert list(rows) == [
        "dense",
        "sparse (2:4, magnitude)",
        "dense + int8",
        "sparse (2:4, magnitude) + int8",
        "dense + int4",
    ]  # no "sparse + int4": int4's zero points would fill the pruned zeros in
    assert rows["sparse (2:4, magnitude) + int8"].sparsify["2:4-int8"]["layers_swapped"] == 14
    assert rows["dense + int8"].sparsify["int8"]["layers_swapped"] == 14
    # bytes: int4 < 2:4-int8 < int8 < 2:4 < dense
    order = [
        "dense + int4",
        "sparse (2:4, magnitude) + int8",
        "dense + int8",
        "sparse (2:4, magnitude)",
        "dense",
    ]
    sizes = [rows[v].model_bytes for v in order]
    assert sizes == sorted(sizes)
    assert abs(rows["dense + int8"].ppl / rows["dense"].ppl - 1) < 0.05  # int8 barely moves ppl
    assert result.config["quantize"] == ["int8", "int4"]
    with pytest.raises(ValueError, match="unknown quantization int3"):
        run_e2e(model, input_ids=_prompt(12), eval_tokens=0, quantize=("int3",))


def test_run_e2e_quantize_head_adds_head_quantized_twins_of_the_quantized_variants():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2
    model.config.tie_word_embeddings = True
    result = run_e2e(
        model,
        input_ids=_prompt(12),
        new_tokens=3,
        eval_tokens=0,
        repeats=1,
        quantize=("int8",),
        quantize_head=True,
    )
    rows = {r.variant: r for r in result.rows}
    assert list(rows) == INT8_HEAD_ROWS
    table = model.model.embed_tokens.weight.nbytes
    for name in ("dense", "sparse (2:4, magnitude)", "dense + int8", "sparse (2:4, magnitude) + int8"):
        assert rows[name].step_bytes == rows[name].model_bytes  # the tied table is the head: streamed
    for name in ("dense + int8 (head too)", "sparse (2:4, magnitude) + int8 (head too)"):
        assert rows[name].sparsify["head"] == {
            **rows[name].sparsify["head"],
            "format": "int8",
            "untied": True,
        }
        assert rows[name].step_bytes == rows[name].model_bytes - table  # the float table: one row a step
    assert "head" not in rows["dense + int8"].sparsify
    assert rows["dense + int8 (head too)"].step_bytes < rows["dense + int8"].step_bytes
    assert result.config["quantize_head"] is True
    assert (
        model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    )  # unchanged
    with pytest.raises(ValueError, match="give quantize too"):
        run_e2e(model, input_ids=_prompt(12), eval_tokens=0, quantize_head=True)


def test_run_e2e_adds_rule_twins_of_the_sparse_variants(monkeypatch):
    """``cpu_rule_twins``: every variant with SparseLinear layers gets a twin under the rule; the
    dense one does not; a twin whose layers went dense counts their copies in its bytes."""
    from sparsekit.nn import cpu_rule

    monkeypatch.setattr(cpu_rule, "_DECISIONS", {})
    monkeypatch.setattr(  # every measured class goes dense (no timing in a unit test)
        "sparsekit.nn.sparse_linear.dense_wins",
        lambda key, *args, **kw: cpu_rule._DECISIONS.setdefault(key, True),
    )
    model = tiny_model("llama")
    result = run_e2e(
        model, input_ids=_prompt(20), new_tokens=2, eval_ids=None, eval_tokens=0, repeats=1,
        method="magnitude", cpu_rule_twins=True,
    )  # fmt: skip
    rows = {r.variant: r for r in result.rows}
    assert set(rows) == {"dense", "sparse (2:4, magnitude)", "sparse (2:4, magnitude), rule fastest"}
    twin, sparse = rows["sparse (2:4, magnitude), rule fastest"], rows["sparse (2:4, magnitude)"]
    assert twin.model_bytes > sparse.model_bytes  # the 20-token prefill made dense copies
    assert result.config["cpu_rule_twins"] and result.config["cpu_rule_default"] == "sparse"


def test_rule_twins_are_refused_off_the_cpu():
    """The rule acts on CPU layers only: off the CPU the twins would be plain copies, so the option
    is refused (the CLI checks it before loading the model)."""
    from sparsekit.bench.e2e import check_cpu_rule_twins

    with pytest.raises(ValueError, match="runs on cuda; drop the option, or run with --device cpu"):
        check_cpu_rule_twins(True, "cuda")
    check_cpu_rule_twins(True, "cpu")
    check_cpu_rule_twins(False, "cuda")
