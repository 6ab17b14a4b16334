"""bench/mha_head128.py's re-expression, the FLAP path of bench/original_driver.py and the counts
of bench/vs_original_structured.py."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.bench.conftest import bench_script, original_driver_command


def gqa_llama(tie: bool = True, **overrides):
    """A tiny Llama with grouped-query attention (4 query heads over 2 KV heads of 16 channels)."""
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, vocab_size=101, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, max_position_embeddings=128,
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_rotary_slots_put_each_pair_on_a_pair_of_the_same_frequency():
    mha = bench_script("mha_head128")
    assert mha.rotary_slots(4, 8).tolist() == [0, 2, 4, 6]
    assert mha.rotary_slots(4, 4).tolist() == [0, 1, 2, 3]
    assert mha.rotary_slots(64, 128)[[0, 31, 32, 63]].tolist() == [0, 62, 64, 126]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("width", [16, 32, 128])
def test_as_mha_gives_the_same_logits_with_one_kv_head_per_query_head(tie, width):
    mha = bench_script("mha_head128")
    model = gqa_llama(tie)
    wide = mha.as_mha(model, width)
    assert (wide.config.num_key_value_heads, wide.config.head_dim) == (4, width)
    assert wide.model.layers[0].self_attn.k_proj.weight.shape == (4 * width, 64)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    assert mha.max_logit_difference(model, wide, ids) < 1e-5


def test_as_mha_needs_the_rotary_slots(monkeypatch):
    """Channels copied to the first slots of a wider head turn at the wrong frequencies."""
    mha = bench_script("mha_head128")
    model = gqa_llama()
    monkeypatch.setattr(mha, "rotary_slots", lambda head_dim, width: torch.arange(head_dim))
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    assert mha.max_logit_difference(model, mha.as_mha(model, 32), ids) > 1e-3


def test_as_mha_refuses_what_it_cannot_re_express():
    mha = bench_script("mha_head128")
    scaled = gqa_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="not the default full rotation"):
        mha.as_mha(scaled, 32)
    with pytest.raises(ValueError, match="multiple of the head_dim 16"):
        mha.as_mha(gqa_llama(), 24)


def test_mha_head128_refuses_an_existing_out_before_loading(tmp_path, capsys):
    mha = bench_script("mha_head128")
    with pytest.raises(SystemExit):
        mha.main(["--out", str(tmp_path)])
    assert "exists" in capsys.readouterr().err


def test_flap_driver_refuses_a_model_its_code_cannot_run(tmp_path):
    """Before FLAP's modeling file is imported: a GQA model with 16-channel heads."""
    driver = bench_script("original_driver")
    gqa_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(SystemExit, match="4 query / 2 KV heads of 16: re-express it"):
        driver._flap_model(str(tmp_path / "dense"), torch.zeros(1, 4, dtype=torch.long))


def test_flap_shims_cast_the_mean_inputs_and_give_every_window(monkeypatch):
    driver = bench_script("original_driver")
    seen = []

    class Code:  # the attribute FLAP's lib.prune exposes
        @staticmethod
        def compress(layer, attn_mask, mlp_mask, attn_mean_inp, mlp_mean_inp, device, bias=True, unstr=False):
            seen.append((attn_mean_inp.dtype, mlp_mean_inp, unstr))

    layer = gqa_llama().model.layers[0]
    monkeypatch.setattr(torch.Tensor, "cuda", torch.Tensor.cuda)  # the shim patches it: restore after
    driver._flap_shims(Code)
    Code.compress(layer, None, None, torch.zeros(3, dtype=torch.half), None, "cpu", unstr=True)
    assert seen == [(torch.float32, None, True)]
    if not torch.cuda.is_available():
        t = torch.ones(2)
        assert t.cuda() is t
    ids = torch.arange(12).reshape(3, 4)
    windows, _ = driver._calibration_loader(ids, all_windows=True)("c4", nsamples=128)
    assert len(windows) == 3


def test_live_widths_count_a_masked_cut_and_the_biases_load():
    vs = bench_script("vs_original_structured")
    mha = bench_script("mha_head128")
    dense = mha.as_mha(gqa_llama(), 128)
    state = {k: v.clone() for k, v in dense.state_dict().items() if ".layers." in k}
    state["model.layers.1.self_attn.q_proj.weight"][128:256] = 0  # head 1 of block 1
    state["model.layers.0.mlp.up_proj.weight"][[3, 5, 7]] = 0
    state["model.layers.0.mlp.down_proj.bias"] = torch.full((64,), 0.5)
    cut = vs.with_biases(dense, state)
    assert vs.live_widths(dense) == [(4, 96), (4, 96)]
    assert vs.live_widths(cut) == [(4, 93), (3, 96)]
    assert vs.block_params(dense) - vs.block_params(cut) == 4 * 64 * 128 + 3 * 3 * 64
    mlp = cut.model.layers[0].mlp
    assert mlp.down_proj.bias[0] == 0.5 and mlp.up_proj.bias.abs().sum() == 0
    with torch.no_grad():  # the unmasked state with zero biases is the dense model
        ids = torch.randint(0, 101, (1, 16))
        same = vs.with_biases(dense, {k: v for k, v in dense.state_dict().items() if ".layers." in k})
        torch.testing.assert_close(same(ids).logits, dense(ids).logits)


@pytest.mark.parametrize(
    "rows, match",
    [(["sparsegpt/0.2"], "unknown row"), (["flap/1.5"], "ratio in"), (["flap"], "ratio in")],
    ids=["method", "ratio-high", "no-ratio"],
)
def test_vs_original_structured_refuses_bad_rows_before_any_work(tmp_path, rows, match, capsys):
    vs = bench_script("vs_original_structured")
    with pytest.raises(SystemExit):
        vs.main(["--original", str(tmp_path), "--rows", *rows])
    assert match in capsys.readouterr().err


def test_checked_mha_reports_the_gap_and_stops_above_the_tolerance():
    mha = bench_script("mha_head128")
    wide, gap = mha.checked_mha(gqa_llama(), 32)
    assert wide.config.head_dim == 32 and gap < 1e-5
    with pytest.raises(SystemExit, match="logits differ"):
        mha.checked_mha(gqa_llama(), 32, tolerance=-1.0)


def test_sizes_rows_and_report_columns():
    mod = bench_script("vs_original_structured")
    assert mod.target_sparsity("ratio", "0.2", None) == 0.2
    assert mod.target_sparsity("original", "0.2", {"removed": 0.1555}) == 0.1555
    assert mod.target_sparsity("original", "0.2", None) is None  # the original failed: nothing to match
    # every Wanda-sp counterpart at the original's size cuts MLP widths as the original (no rounding)
    assert all(
        o.get("channel_multiple") == 1 for _, o, size in mod.SPARSEKIT["wanda-sp"] if size == "original"
    )
    rows = [
        {"row": "flap/0.2", "seed": 0, "tool": "original flap@abc", "ppl": 30.0, "prune_s": 60.0,
         "removed": 0.2},
        {"row": "flap/0.2", "seed": 0, "tool": "sparsekit flap adaptive", "ppl": 29.0, "prune_s": 20.0,
         "removed": 0.2, "forward_dtype": "bfloat16", "phases_s": {"statistics": 19.5, "select+cut": 0.5}},
    ]  # fmt: skip
    text = mod._markdown("head", rows)
    assert "| flap/0.2 | 0 | original flap@abc | fp32 | 30.00 | 60.0 | - |" in text
    assert "| sparsekit flap adaptive | bf16 | 29.00 | 20.0 | statistics 19.5, select+cut 0.5 |" in text
    assert "ppl 0.967x the original's, time 0.33x" in text


# A stand-in for the ShortGPT authors' class, written here with the calls the driver's shims serve:
# the tokenizer called on a list of prompts, inputs moved with .to("cuda"), the whole model run with
# output_hidden_states, importances summed per block, and the lowest n deleted from ``layers``.
SHORTGPT_STAND_IN = """
import numpy as np
import torch


class ShortGPT:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("the driver must not run __init__ (a hub download on a GPU)")

    @torch.inference_mode()
    def eval_importance(self, prompts, stride=256, max_gen_len=0):
        assert max_gen_len == 0
        tokens = self.tokenizer(prompts, padding=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids, tokens.attention_mask
        for start in range(0, ids.shape[1], stride):
            out = self.model(
                input_ids=ids[:, start:start + stride].to("cuda"),
                attention_mask=mask[:, start:start + stride].to("cuda"),
                output_hidden_states=True,
            )
            hs = out.hidden_states
            for i in range(len(hs) - 1):
                cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
                self.importances[i] += (1 - cos).sum().item()

    def remove_layers(self):
        drop = np.argsort(np.array(self.importances))[: self.n_prune_layers].tolist()
        for i in sorted(drop, reverse=True):
            del self.layers[i]
        return drop
"""


def test_shortgpt_driver_runs_the_class_on_the_windows_and_the_result_loads(tmp_path):
    """The driver (a subprocess, as vs_original_structured runs it) on a stand-in checkout: every
    window scored, round(0.4 x 5) = 2 blocks deleted, its kept tensors equal the dense blocks, and
    ``without_blocks`` rebuilds that model (a changed tensor is refused)."""
    import json
    import subprocess

    from safetensors.torch import load_file

    vs = bench_script("vs_original_structured")
    code = tmp_path / "code"
    (code / "shortgpt").mkdir(parents=True)
    (code / "shortgpt" / "shortgpt.py").write_text(SHORTGPT_STAND_IN)
    dense = gqa_llama(num_hidden_layers=5)
    dense.save_pretrained(tmp_path / "source")
    torch.save(
        torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(2)), tmp_path / "calib.pt"
    )
    out, report = tmp_path / "o.safetensors", tmp_path / "o.json"
    command = original_driver_command(
        code, "shortgpt", tmp_path / "source", tmp_path / "calib.pt", "shortgpt", "0.4", out, report
    )
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(report.read_text())
    assert info["entry"] == "shortgpt.ShortGPT" and len(info["removed_blocks"]) == 2
    state = load_file(str(out))
    pruned = vs.without_blocks(dense, info["removed_blocks"], state)
    assert len(pruned.model.layers) == 3 and pruned.config.num_hidden_layers == 3
    kept = [i for i in range(5) if i not in info["removed_blocks"]]
    ref = dense.model.layers[kept[-1]].mlp.up_proj.weight
    assert torch.equal(pruned.model.layers[2].mlp.up_proj.weight, ref)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"] + 1
    with pytest.raises(RuntimeError, match="differ from the dense ones"):
        vs.without_blocks(dense, info["removed_blocks"], state)
    with pytest.raises(RuntimeError, match="do not fit"):
        vs.without_blocks(dense, info["removed_blocks"][:1], load_file(str(out)))
    bad = subprocess.run([*command[:13], "2:4", *command[14:]], capture_output=True, text=True)
    assert bad.returncode == 2 and "removes a ratio of structures, not 2:4" in bad.stderr


def test_shortgpt_window_tokenizer_keeps_cuda_moves_on_the_cpu():
    driver = bench_script("original_driver")
    ids = torch.arange(12).reshape(3, 4)
    tokens = driver._window_tokenizer(ids)([2], padding=True, return_tensors="pt")
    moved = tokens.input_ids[:, 1:3].to("cuda")
    assert type(moved) is torch.Tensor and moved.device.type == "cpu"
    assert moved.tolist() == [[9, 10]] and tokens.attention_mask.sum() == 4
    assert tokens.input_ids.to(torch.float32).dtype == torch.float32


def test_depth_rows_report_their_removed_blocks():
    vs = bench_script("vs_original_structured")
    assert vs.model_folder("shortgpt") == "source" and vs.model_folder("flap") == "dense"
    rows = [
        {"row": "shortgpt/0.2", "seed": 0, "tool": "original shortgpt@abc", "ppl": 50.0, "prune_s": 50.0,
         "removed": 0.2, "removed_blocks": [3, 12]},
        {"row": "shortgpt/0.2", "seed": 0, "tool": "sparsekit shortgpt", "ppl": 50.0, "prune_s": 10.0,
         "removed": 0.2, "removed_blocks": [3, 12], "forward_dtype": "bfloat16", "phases_s": {"score": 9.9}},
    ]  # fmt: skip
    text = vs._markdown("head", rows)
    assert "| 20.00% | - | - | 3 12 |" in text
    assert "ppl 1.000x the original's, time 0.20x" in text
