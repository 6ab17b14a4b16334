"""The GPU suite's dry run on the CPU: every stage runs at toy size and writes its reports.

A GPU run cannot happen here; this checks that the command a GPU machine runs is whole (stages,
random-weight models from the shipped configs, report assembly) and that a dry run never
passes off a CPU number as a GPU one.
"""

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_report(tmp_path):
    suite = _suite()
    out = tmp_path / "gpu"
    assert suite.main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads((out / "suite.json").read_text())
    assert data["dry_run"] is True and set(data["stages"]) == {"tests", "layers", "e2e"}
    assert all("error" not in st for st in data["stages"].values()), data["stages"]
    tests = data["stages"]["tests"]["result"]
    assert tests["collected_only"] and "collected" in tests["summary"]
    assert int(tests["summary"].split()[0]) >= 100  # every kernel x dtype x shape case is there
    for name in ("layers-fp32.md", "e2e-llama-2-7b.md", "e2e-llama-3-8b.md", "kernel-tests.txt"):
        assert (out / name).is_file(), name
    results = (out / "results-gpu.md").read_text()
    assert results.startswith("# GPU suite: DRY RUN on the CPU") and "no GPU figures" in results
    assert "## e2e-llama-3-8b" in results and "## layers-fp32" in results
    e2e = json.loads((out / "e2e-llama-3-8b.json").read_text())
    assert [r["variant"] for r in e2e["rows"]] == ["dense", "sparse (2:4, magnitude)"]
    assert e2e["rows"][1]["sparsify"]["formats"] == {"2:4": 2 * 7}


def test_without_cuda_the_real_run_refuses_and_says_how_to_dry_run(tmp_path, capsys):
    if torch.cuda.is_available():
        return  # on a GPU machine the real run is the point; nothing to refuse
    assert _suite().main(["--out", str(tmp_path / "gpu")]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_random_models_have_the_shipped_shapes():
    from sparsekit.bench.layers import load_shape_config
    from sparsekit.bench.random_model import random_model, shape_config

    full = shape_config("llama-3-8b")
    cfg = load_shape_config("llama-3-8b")
    assert {
        k: full[k] for k in ("hidden_size", "intermediate_size", "num_key_value_heads", "vocab_size")
    } == {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_key_value_heads", "vocab_size")}
    small = shape_config("llama-3-8b", num_layers=2, shrink=16)
    assert small["num_attention_heads"] // small["num_key_value_heads"] == 4  # GQA ratio kept
    model = random_model("llama-3-8b", torch.float32, "cpu", num_layers=2, shrink=16)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features * 4 == attn.q_proj.out_features == small["hidden_size"]
    assert model.model.layers[0].mlp.up_proj.out_features == small["intermediate_size"]
    assert len(model.model.layers) == 2 and not model.training
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 100, (1, 6))).logits).all()
