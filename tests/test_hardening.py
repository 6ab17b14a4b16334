"""Careless or unlucky use: bad arguments fail before the model loads, damaged weights and data
get errors naming the problem, failed prunes say what they changed, killed saves leave no debris."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch

import sparsekit
from sparsekit import cli
from sparsekit._io import OWNER_FILE, atomic_dir, check_can_create
from sparsekit.pruning import PruneConfig, PruningMethod, prune_model, sparsegpt_prune
from sparsekit.pruning.engine import PartialPruneError
from sparsekit.pruning.method import LayerResult
from tests.cli_errors import CASES, case_id
from tests.conftest import tiny_model


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the argument check")

    monkeypatch.setattr(cli, "load_any", refuse)


@pytest.fixture
def binary_and_folder(tmp_path) -> dict[str, str]:
    """What the error table's {bin} and {tmp} stand for."""
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "empty").mkdir()
    return {"bin": str(tmp_path / "bin.txt"), "tmp": str(tmp_path / "empty")}


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[case_id(c) for c in CASES])
def test_cli_errors_come_before_the_model_loads(no_model_load, binary_and_folder, capsys, argv, message):
    """Every case of tests/cli_errors.py: exit code 2 and the message, nothing loaded (tests/test_wheel.py
    runs the same table from an installed wheel)."""
    assert cli.main([a.format(**binary_and_folder) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_existing_or_uncreatable_out_is_refused_before_loading(no_model_load, tmp_path, capsys):
    assert cli.main(["prune", "smollm2", "--out", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["prune", "smollm2", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "not a writable folder" in capsys.readouterr().err


def test_a_mistyped_relative_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    from sparsekit.hf.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no model folder out/typo"):
        resolve_model("out/typo")
    assert time.perf_counter() - started < 1


def test_a_folder_with_config_and_no_weights_is_a_one_line_error(tmp_path, capsys):
    tiny_model("llama").config.save_pretrained(tmp_path / "m")
    assert cli.main(["eval", str(tmp_path / "m"), "--max-tokens", "64", "--seqlen", "32"]) == 2
    assert "error" in capsys.readouterr().err


def test_calibration_longer_than_the_position_table_is_refused():
    model = tiny_model("llama")  # max_position_embeddings 64
    ids = torch.randint(0, 128, (2, 100))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 64"):
        sparsekit.prune(model, method="wanda", sparsity=0.5, calib=ids, show_progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        sparsekit.perplexity(model, torch.randint(0, 128, (1, 400)), seqlen=100)


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    from sparsekit.hf.data import corpus_texts

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"c.jsonl, line 2: not a JSON record"):
        list(corpus_texts(str(path), "calib")) + list(corpus_texts(str(path), "eval"))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "flap", "shortgpt"])
def test_non_finite_weights_are_refused_up_front_naming_the_layer(method):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3, 5] = float("inf")
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 128, (4, 16))
    kw = {"remove_layers": 1} if method == "shortgpt" else {}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj has 1 NaN/Inf weights"):
        sparsekit.prune(model, method=method, sparsity=0.5, calib=ids, show_progress=False, **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was touched


class _FailsOnBlock1(PruningMethod):
    name = "fails-on-block-1"

    def __init__(self):
        self.calls = 0

    def prune(self, weight, stat, config):
        self.calls += 1
        if self.calls > 7:  # the 7 linears of block 0 succeed
            raise RuntimeError("boom")
        return LayerResult(weight * 0, torch.zeros_like(weight, dtype=torch.bool))


def test_a_prune_that_fails_midway_says_which_blocks_changed():
    model = tiny_model("llama")
    with pytest.raises(PartialPruneError, match="blocks 0-0 are already pruned in place.*reload the model"):
        prune_model(model, None, PruneConfig(method=_FailsOnBlock1(), sparsity=0.5, show_progress=False))


def test_prune_config_rejects_bad_numbers():
    for bad in ({"blocksize": 0}, {"percdamp": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            PruneConfig(**bad)


def test_sparsegpt_refuses_a_hessian_that_is_not_x_t_x():
    weight = torch.randn(8, 16)
    x = torch.randn(64, 16)
    good = 2 / 64 * x.T @ x
    sparsegpt_prune(weight, good, 0.5)
    skew = good.clone()
    skew[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        sparsegpt_prune(weight, skew, 0.5)
    neg = good.clone()
    neg[2, 2] = -1.0
    with pytest.raises(ValueError, match="negative diagonal"):
        sparsegpt_prune(weight, neg, 0.5)
    with pytest.raises(ValueError, match="blocksize must be >= 1"):
        sparsegpt_prune(weight, good, 0.5, blocksize=0)
    with pytest.raises(ValueError, match="percdamp must be >= 0"):
        sparsegpt_prune(weight, good, 0.5, percdamp=-0.01)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_save_leaves_debris_that_the_next_save_removes(tmp_path):
    stale = tmp_path / ".ck.tmp-killed"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(str(_dead_pid()))
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    busy = tmp_path / ".ck.tmp-busy"  # another save still writing: left alone
    busy.mkdir()
    (busy / OWNER_FILE).write_text(str(os.getpid()))
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "f").write_text("ok")
    assert not stale.exists() and busy.exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["f"]  # no owner file in the output


def test_check_can_create(tmp_path):
    check_can_create(tmp_path / "new" / "deeper")
    with pytest.raises(FileExistsError):
        check_can_create(tmp_path)


def test_sparse_linear_refuses_inputs_of_the_wrong_width():
    from sparsekit.nn import SparseLinear

    layer = SparseLinear.from_linear(torch.nn.Linear(10, 4), format="bitmap")
    with pytest.raises(ValueError, match=r"expects inputs \[..., 10\]"):
        layer(torch.randn(2, 12))


def test_sparsify_warns_when_a_format_makes_the_model_larger(caplog):
    from sparsekit.nn import sparsify

    with caplog.at_level("WARNING"):
        report = sparsify(tiny_model("llama"), format="bitmap")  # dense weights: bitmap is larger
    assert report.layer_bytes_after > report.layer_bytes_before
    assert "makes these layers larger" in caplog.text


# ----------------------------------------------------------------------------- one check, CLI and API
@pytest.mark.parametrize(
    ("argv", "kwargs"),
    [
        (
            ["--method", "flap", "--sparsity", "0.2", "--allocation", "owl"],
            dict(method="flap", sparsity=0.2, allocation="owl"),
        ),
        (["--method", "shortgpt"], dict(method="shortgpt")),
        (["--sparsity", "0"], dict(sparsity=0)),
        (["--method", "wanda", "--blocksize", "64"], dict(method="wanda", blocksize=64)),
        (["--method", "magnitude", "--nsamples", "16"], dict(method="magnitude", nsamples=16)),
        (["--method", "wanda", "--remove-layers", "1"], dict(method="wanda", remove_layers=1)),
        (["--device", "tpu9"], dict(device="tpu9")),
        (["--method", "magnitude", "--passes", "two"], dict(method="magnitude", sequential=False)),
        (["--method", "shortgpt", "--passes", "one"], dict(method="shortgpt", sequential=True)),
    ],
)
def test_the_cli_and_the_api_refuse_with_the_same_check(no_model_load, capsys, argv, kwargs):
    """The same function (sparsekit._checks.check_prune_request) refuses both, with the same words;
    the API before it tokenizes or touches the model."""
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as api_error:
        sparsekit.prune(model, calib="wiki-offline", tokenizer=_NoTokenizer(), show_progress=False, **kwargs)
    assert cli.main(["prune", "smollm2", *argv]) == 2
    assert str(api_error.value) in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _NoTokenizer:
    """A tokenizer that fails the test if calibration text is tokenized."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("calibration started before the check")


def test_api_refuses_options_its_method_does_not_use():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (4, 16))
    cases = [
        (dict(method="flap", sparsity=0.2, refine="dsnot"), "refine (--refine) does nothing with flap"),
        (dict(method="angular", sparsity=0.5, remove_layers=2), "not both (they disagree: round(0.5 x 2"),
        (dict(method="angular", sparsity=0.0, remove_layers=0), "remove_layers 0 removes nothing"),
        (dict(method="wanda", sparsity=0.5, nsamples=8), "calib is token ids [n, L] already"),
        (dict(method="wanda", sparsity=0.5, owl_m=3.0), "only tunes allocation='owl'"),
        (dict(method="wanda", sparsity=0.5, typo_option=1), "unknown option(s) typo_option"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as error:
            sparsekit.prune(model, calib=ids, show_progress=False, **kwargs)
        assert message in str(error.value), (kwargs, str(error.value))
    # what is used passes: sparsity and remove_layers agreeing, OWL tuned under allocation='owl'
    sparsekit.prune(
        copy.deepcopy(model), "angular", sparsity=0.5, remove_layers=1, calib=ids, show_progress=False
    )
    report = sparsekit.prune(
        copy.deepcopy(model), "wanda", sparsity=0.5, calib=ids, allocation="owl", owl_lambda=0.05,
        show_progress=False,
    )  # fmt: skip
    assert max(report.block_sparsities) - min(report.block_sparsities) <= 0.1 + 1e-6


def test_per_layer_methods_default_to_half_and_structured_ones_need_an_amount():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (4, 16))
    report = sparsekit.prune(copy.deepcopy(model), "magnitude", show_progress=False)
    assert report.sparsity == "0.5"
    with pytest.raises(ValueError, match=r"angular needs an explicit amount.*--remove-layers"):
        sparsekit.prune(copy.deepcopy(model), "angular", calib=ids, show_progress=False)


# ----------------------------------------------------------------------------- devices
def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(monkeypatch, free_bytes: int = 80 * 2**30) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 141 * 2**30))


def test_device_parses_has_a_backend_and_exists(monkeypatch):
    from sparsekit.hf.resources import available_devices, check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'tpu9' is not a device name \(Invalid device string"):
        check_device("tpu9")
    with pytest.raises(ValueError, match="holds no data"):
        check_device("meta")
    _no_cuda(monkeypatch)
    with pytest.raises(ValueError, match=r"device 'cuda': .*CUDA.*; available here: cpu$"):
        check_device("cuda")
    _one_gpu(monkeypatch)
    assert available_devices()[:2] == ["cpu", "cuda:0"]
    assert check_device("cuda") == torch.device("cuda")
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(
        ValueError, match=r"device 'cuda:1': there is only 1 cuda device here; available here: cpu, cuda:0"
    ):
        check_device("cuda:1")


def test_cuda_without_cuda_is_refused_before_the_model_loads(no_model_load, monkeypatch, capsys):
    _no_cuda(monkeypatch)
    assert cli.main(["prune", "smollm2", "--device", "cuda"]) == 2
    assert "device 'cuda'" in capsys.readouterr().err
    assert cli.main(["eval", "smollm2", "--device", "cuda"]) == 2
    assert "available here: cpu" in capsys.readouterr().err


def test_api_checks_the_device_before_any_work(monkeypatch):
    _no_cuda(monkeypatch)
    model = tiny_model("llama")
    for device in ("cuda", "tpu9"):
        with pytest.raises(ValueError, match=f"device '{device}'"):
            sparsekit.prune(model, "wanda", calib="wiki-offline", tokenizer=_NoTokenizer(), device=device)


# ----------------------------------------------------------------------------- memory
def _host_free(monkeypatch, free_bytes: int) -> None:
    from sparsekit.hf import resources

    monkeypatch.setattr(resources, "host_available_bytes", lambda meminfo="/proc/meminfo": free_bytes)


def test_calibration_memory_estimate_counts_states_statistics_and_the_token_pool():
    from sparsekit.hf.resources import CalibrationPlan, ModelShape, calibration_memory

    smollm2 = ModelShape(hidden=576, layers=30, intermediate=1536, attention_width=576, kv_width=192)
    plan = CalibrationPlan(
        nsamples=100_000, seqlen=64, batch_size=8, copies=3, forward_bytes=2, model_bytes=4, gram=True
    )
    (cpu,) = calibration_memory(smollm2, plan, torch.device("cpu"))
    states = cpu.parts["block inputs/outputs (3 x 100000 x 64 x 576 x 2 bytes)"]
    assert states == 3 * 100_000 * 64 * 576 * 2  # 22 GB: what made memory pass 10 GB and keep growing
    assert cpu.parts["one block's Gram statistics (float64)"] == (3 * 576**2 + 1536**2) * 12
    assert cpu.parts["tokenized text pool (4x the tokens)"] == 4 * 6_400_000 * 44
    device, host = calibration_memory(smollm2, plan, torch.device("cuda:0"))
    assert device.where == "cuda:0" and states in device.parts.values()
    assert (
        host.where == "host"
        and host.total
        == cpu.parts["calibration token ids"] + cpu.parts["tokenized text pool (4x the tokens)"]
    )
    wanda = calibration_memory(smollm2, CalibrationPlan(128, 2048, 8, 3, 2, 4), torch.device("cpu"))[0]
    assert wanda.parts["one block's statistics"] < 2**20  # vectors, not Gram matrices


def test_whole_model_criteria_count_logits_activations_and_gradients():
    from sparsekit.hf.resources import CalibrationPlan, ModelShape, calibration_memory

    shape = ModelShape(576, 30, 1536, 576, 192, vocab=49152, params=134_515_008)
    cpu = torch.device("cpu")
    blockwise = calibration_memory(shape, CalibrationPlan(32, 512, 4, 2, 4, 4), cpu)[0]
    forward = calibration_memory(shape, CalibrationPlan(32, 512, 4, 2, 4, 4, whole_model="forward"), cpu)[0]
    backward = calibration_memory(shape, CalibrationPlan(32, 512, 4, 2, 4, 4, whole_model="backward"), cpu)[0]
    logits = forward.total - blockwise.total
    assert logits == 4 * 512 * 49152 * 4 * 2  # a batch's fp32 logits and their log-softmax: 805 MB
    # block by block (passes.block_gradients): one block's activations and gradients on the device,
    # every block's input for one batch and the gradient sums over all blocks on the host
    assert backward.parts["one block's weight gradients"] == shape.block_params * 4
    assert (
        backward.parts["one block's activations for its backward"]
        == 4 * 512 * (3 * 1536 + 6 * 576 + 2 * 576) * 4
    )
    assert backward.parts["gradient sums of every block (float64)"] == shape.block_params * 30 * 8
    assert backward.parts["every block's input for one batch"] == 4 * 512 * 576 * 31 * 4
    moved = CalibrationPlan(32, 512, 4, 2, 4, 4, whole_model="forward", model_on_device=True)
    (gpu, _host) = calibration_memory(shape, moved, torch.device("cuda:0"))
    assert gpu.parts["the whole model's weights"] == 134_515_008 * 4


def test_a_whole_model_criterion_too_large_for_the_host_is_refused(monkeypatch):
    model = tiny_model("llama")
    from sparsekit.hf.resources import HEADROOM, CalibrationPlan, ModelShape, calibration_memory

    ids = torch.randint(0, model.config.vocab_size, (8, 64))
    shape = ModelShape.from_model(model)
    assert shape.vocab == model.config.vocab_size
    assert shape.params == sum(p.numel() for p in model.parameters())

    def total(whole: str) -> int:
        plan = CalibrationPlan(8, 64, 8, 2, 4, 4, tokenize=False, whole_model=whole)
        return calibration_memory(shape, plan, torch.device("cpu"))[0].total

    assert total("backward") > 1.5 * total("")
    _host_free(monkeypatch, int((total("") + total("backward")) / 2 / HEADROOM))  # block-wise parts fit
    with pytest.raises(ValueError, match="gradient sums of every block"):
        sparsekit.prune(copy.deepcopy(model), "shortened-taylor", calib=ids, sparsity=0.25, batch_size=8)
    sparsekit.prune(copy.deepcopy(model), "shortgpt", calib=ids, sparsity=0.25, batch_size=8)


def test_host_memory_is_read_from_meminfo(tmp_path):
    from sparsekit.hf.resources import host_available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    assert host_available_bytes(str(meminfo)) == 20_000_000 * 1024
    assert host_available_bytes(str(tmp_path / "none")) is None


def test_calibration_too_large_for_the_host_is_refused_before_it_starts(monkeypatch):
    _host_free(monkeypatch, 256 * 2**20)
    model = tiny_model("llama")
    with pytest.raises(ValueError) as error:
        sparsekit.prune(
            model, "sparsegpt", calib="wiki-offline", tokenizer=_NoTokenizer(), nsamples=100_000, seqlen=64
        )
    message = str(error.value)
    assert (
        "calibration would hold about" in message
        and "on cpu, but 256.0 MiB is free there (MemAvailable" in message
    )
    assert "block inputs/outputs (3 x 100000 x 64 x 64" in message and "Gram statistics" in message
    fit = int(message.split("at most ")[1].split()[0])
    assert 100 < fit < 100_000
    # the advice holds: that many samples pass the check (the tokenizer then proves calibration started)
    with pytest.raises(AssertionError, match="calibration started"):
        sparsekit.prune(
            model, "sparsegpt", calib="wiki-offline", tokenizer=_NoTokenizer(), nsamples=fit, seqlen=64
        )


def test_calibration_too_large_for_the_gpu_is_refused_with_the_free_memory(monkeypatch):
    _one_gpu(monkeypatch, free_bytes=64 * 2**20)
    _host_free(monkeypatch, 64 * 2**30)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"on cuda, but 64.0 MiB is free there \(torch.cuda.mem_get_info"):
        sparsekit.prune(
            model, "wanda", calib="wiki-offline", tokenizer=_NoTokenizer(), nsamples=100_000, seqlen=64,
            device="cuda", forward_dtype="fp32",
        )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.tiny_folder import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_cli_refuses_100000_samples_before_calibrating(tiny_folder, monkeypatch, capsys):
    from sparsekit import api

    _host_free(monkeypatch, 512 * 2**20)
    monkeypatch.setattr(api, "calibration_ids", _NoTokenizer())
    argv = ["prune", str(tiny_folder), "--nsamples", "100000", "--seqlen", "64", "--device", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "calibration would hold about" in err and "free there (MemAvailable" in err
    assert "fewer samples (nsamples / --nsamples: at most" in err and "shorter sequences" in err


# ----------------------------------------------------------------------------- calibration text
class _WordTokenizer:
    """One token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_a_binary_calibration_file_is_named(tmp_path):
    from sparsekit.hf.data import calibration_ids, check_corpus

    for name in ("calib.txt", "calib.jsonl", "calib.json"):
        path = tmp_path / name
        path.write_bytes(b'{"text": "\xd0\xd1\xff"}\n' * 10)
        with pytest.raises(ValueError, match=f"{name} is not UTF-8 text or JSONL .*byte 0x"):
            calibration_ids(_WordTokenizer(), str(path), nsamples=2, seqlen=4)
        with pytest.raises(ValueError, match=f"{name} is not UTF-8 text or JSONL"):
            check_corpus(str(path))
    (tmp_path / "nul.txt").write_bytes(b"text\x00\x01\x02" * 100)
    with pytest.raises(ValueError, match="holds NUL bytes"):
        check_corpus(str(tmp_path / "nul.txt"))


def test_short_calibration_text_says_how_many_tokens_it_has_and_needs(tmp_path, tiny_folder, capsys):
    from sparsekit.hf.data import calibration_ids

    path = tmp_path / "one.txt"
    path.write_text("hello")
    needs = (
        r"has [01] tokens, fewer than one window: calibration needs at least seqlen \+ 1 = 33 tokens, and "
        r"nsamples x seqlen = 128"
    )
    with pytest.raises(ValueError, match=needs):
        calibration_ids(_WordTokenizer(), str(path), nsamples=4, seqlen=32)
    with pytest.raises(ValueError, match=r"the 2 calibration texts has 4 tokens"):
        calibration_ids(_WordTokenizer(), ["a b", "c d"], nsamples=4, seqlen=32)
    assert (
        cli.main(["prune", str(tiny_folder), "--calib", str(path), "--nsamples", "4", "--seqlen", "32"]) == 2
    )
    err = capsys.readouterr().err
    assert f"the calibration part of {path}" in err and "seqlen + 1 = 33" in err and "Traceback" not in err


def test_a_compressed_model_is_decompressed_and_pruned_further(tmp_path):
    """Pruning a loaded compressed checkpoint (SparseLinear blocks) prunes it further instead of
    refusing it or skipping its layers."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    sparsekit.prune(model, method="wanda", sparsity=0.5, calib=ids, show_progress=False)
    sparsekit.sparsify(model)
    sparsekit.save(model, tmp_path / "c")
    loaded = sparsekit.load(tmp_path / "c")
    report = sparsekit.prune(loaded, method="wanda", sparsity=0.7, calib=ids, show_progress=False)
    assert report.overall_sparsity == pytest.approx(0.7, abs=0.02)  # floor(K x 0.7) per row of 64 or 128
    assert not any(isinstance(m, sparsekit.SparseLinear) for m in loaded.modules())


def test_every_prune_config_field_reaches_the_config_or_is_refused():
    """A PruneConfig keyword that no option list names would pass the checks and then be dropped
    (sparsekit.prune(..., sequential=False) once was): every field is routed."""
    import dataclasses

    from sparsekit import _checks
    from sparsekit.pruning import PruneConfig

    routed = {*_checks.PER_LAYER_OPTIONS, *_checks.COMMON_OPTIONS, *_checks.FORWARD_OPTIONS}
    fields = {f.name for f in dataclasses.fields(PruneConfig)} - {"method", "sparsity"}
    assert fields <= routed, fields - routed
    request = _checks.check_prune_request("wanda", 0.5, {"sequential": False, "batch_size": 3})
    assert request.config.sequential is False and request.config.batch_size == 3
