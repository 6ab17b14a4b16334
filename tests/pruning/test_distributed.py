"""Pruning on 2 processes (torch.distributed, Gloo on the CPU) against 1: the same masks and
weights, only rank 0 writes, and a failing rank stops the other with a clear error."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsekit.pruning.distributed import World, assign, shard

ROOT = Path(__file__).resolve().parents[2]
STRUCTURED = ("reap", "flap", "wanda-sp", "minitron", "shortgpt", "angular", "shortened-ppl", "blockpruner")

# one process of the group: prune the tiny model and save what it has (every rank saves)
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from tests.conftest import tiny_model
    from tests.pruning.test_distributed import STRUCTURED
    from sparsekit.pruning import PruneConfig, prune_model
    from sparsekit.pruning import distributed

    method, sparsity, out, fail_rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    world = distributed.init(timeout_s=float(os.environ.get("TIMEOUT", "60")))
    family = os.environ.get("FAMILY", "qwen2")
    if family == "qwen2":
        model = tiny_model("qwen2")
    else:  # a tiny MoE: experts pruned on their routed tokens, statistics summed over the ranks
        from sparsekit.bench.coverage import tiny_model as tiny_family
        model = tiny_family(family)
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    if world.rank == fail_rank:
        import sparsekit.pruning.engine as engine
        def boom(*a, **k):
            raise RuntimeError("injected failure")
        engine._prune_linear = boom
    if method in STRUCTURED:  # sums over the ranks
        import sparsekit
        report = sparsekit.prune(model, method=method, sparsity=float(sparsity), calib=ids, batch_size=2,
                                 widths=os.environ.get("WIDTHS", "uniform"), show_progress=False)
    else:
        report = prune_model(model, ids, PruneConfig(method=method, sparsity=sparsity, batch_size=2,
                                                     blocksize=16, show_progress=False))
    torch.save(model.state_dict(), f"{{out}}/rank{{world.rank}}.pt")
    if world.main:
        json.dump(report.to_dict(), open(f"{{out}}/report.json", "w"))
    distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(
    tmp_path: Path,
    method: str,
    sparsity: str,
    fail_rank: int = -1,
    timeout: float = 60,
    family: str = "qwen2",
    widths: str = "uniform",
):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TIMEOUT": str(timeout),
            "OMP_NUM_THREADS": "1",
            "FAMILY": family,
            "WIDTHS": widths,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), method, sparsity, str(tmp_path), str(fail_rank)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=timeout + 120)[0] for p in procs]
    return [p.returncode for p in procs], outs


def _single(method: str, sparsity: str, family: str = "qwen2"):
    from sparsekit.bench.coverage import tiny_model as tiny_family
    from sparsekit.pruning import PruneConfig, prune_model
    from tests.conftest import tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("qwen2") if family == "qwen2" else tiny_family(family)
        ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
        report = prune_model(
            model,
            ids,
            PruneConfig(method=method, sparsity=sparsity, batch_size=2, blocksize=16, show_progress=False),
        )
    finally:
        torch.set_num_threads(threads)
    return model.state_dict(), report


@pytest.mark.parametrize(
    ("method", "sparsity", "family"),
    [
        ("wanda", "0.5", "qwen2"),
        ("magnitude", "2:4", "qwen2"),
        ("sparsegpt", "2:4", "qwen2"),
        ("sparsegpt", "0.5", "qwen2_moe"),  # experts: routed statistics summed over the ranks
    ],
)
def test_two_ranks_reproduce_one_process(tmp_path, method, sparsity, family):
    codes, outs = _run_group(tmp_path, method, sparsity, family=family)
    assert codes == [0, 0], outs
    single, single_report = _single(method, sparsity, family)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, ref in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank holds the same model
        if "layers" in name and (name.endswith("proj.weight") or ".experts." in name):
            assert torch.equal(ranks[0][name] != 0, ref != 0), name  # identical masks
            torch.testing.assert_close(ranks[0][name], ref, rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and len(report["rank_timings_s"]) == 2
    assert report["nsamples"] == 8 and report["overall_sparsity"] == pytest.approx(
        single_report.overall_sparsity
    )
    if method != "magnitude":
        assert "communication" in report["timings_s"]
        assert report["block_rel_errors"] == pytest.approx(single_report.block_rel_errors, rel=1e-4)


def _single_structured(model, method: str, sparsity: float, widths: str):
    """(model, report) of one process pruning ``model`` with the workers' calibration ids, 1 thread."""
    import sparsekit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
        report = sparsekit.prune(
            model,
            method=method,
            sparsity=sparsity,
            calib=ids,
            batch_size=2,
            widths=widths,
            show_progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return model, report


@pytest.mark.parametrize("widths", ["uniform", "adaptive"])
def test_two_ranks_remove_the_same_experts_as_one_process(tmp_path, widths):
    from sparsekit.bench.coverage import tiny_model as tiny_family

    codes, outs = _run_group(tmp_path, "reap", "0.5", family="qwen3_moe", widths=widths)
    assert codes == [0, 0], outs
    model, single = _single_structured(tiny_family("qwen3_moe"), "reap", 0.5, widths)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [b["kept"] for b in report["experts"]] == [b["kept"] for b in single.experts]
    assert [b["tokens"] for b in report["experts"]] == [b["tokens"] for b in single.experts]  # all 8 x 24
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, ref in model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]) and torch.equal(ranks[0][name], ref), name


@pytest.mark.parametrize(
    ("method", "widths"),
    [("flap", "adaptive"), ("wanda-sp", "uniform"), ("minitron", "uniform"), ("shortgpt", "uniform"),
     ("angular", "uniform"), ("shortened-ppl", "uniform"), ("blockpruner", "uniform")],
)  # fmt: skip
def test_two_ranks_cut_the_same_structure_as_one_process(tmp_path, method, widths):
    """Width pruning's channel statistics (Minitron's too), the depth criteria's token means and the
    calibration perplexities of Shortened-LLM and BlockPruner are sums: each rank runs its share of
    the calibration chunks and the sums are all-reduced, so the cut (FLAP's compensation bias,
    Minitron's norm gains, the removed blocks and sub-blocks) is one process's."""

    from tests.conftest import tiny_model

    codes, outs = _run_group(tmp_path, method, "0.3", widths=widths)
    assert codes == [0, 0], outs
    model, single = _single_structured(tiny_model("qwen2"), method, 0.3, widths)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["widths"] == single.widths and report["nsamples"] == 8
    assert report["removed_blocks"] == single.removed_blocks
    assert report["block_scores"] == pytest.approx(single.block_scores, rel=1e-6)
    removed = [(r["block"], r["kind"]) for r in report["removed_subblocks"]]
    assert removed == [(r["block"], r["kind"]) for r in single.removed_subblocks]
    assert report.get("hidden_size") == (list(single.hidden_size) if single.hidden_size else None)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, ref in model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], ref, rtol=1e-5, atol=1e-6)


def test_a_failing_rank_stops_the_other_with_an_error(tmp_path):
    codes, outs = _run_group(tmp_path, "sparsegpt", "0.5", fail_rank=1, timeout=20)
    assert codes[0] != 0 and codes[1] != 0, outs
    assert "injected failure" in outs[1]
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "rank0.pt").exists()


def test_shard_and_assign():
    assert [list(shard(5, World(r, 2))) for r in range(2)] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="at least one"):
        shard(1, World(0, 2))
    owner = assign([("a", 9.0), ("b", 5.0), ("c", 4.0), ("d", 1.0)], 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0}  # loads 10 and 9
    assert assign([("x", 1.0), ("y", 1.0)], 2) == {"x": 0, "y": 1}


def _launch(argv: list[str], procs: int, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """``python -m sparsekit ARGV`` as torchrun would start it on ``procs`` ranks (1: no group)."""
    port = _free_port()
    running = []
    for rank in range(procs):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if procs > 1:
            env |= {"RANK": str(rank), "WORLD_SIZE": str(procs), "LOCAL_RANK": str(rank)}
            env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        running.append(
            subprocess.Popen(
                [sys.executable, "-m", "sparsekit", *argv],
                env=env,
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in running]


def test_cli_under_two_ranks_prunes_an_offloaded_model_like_one_process(saved_llama):
    """`python -m sparsekit prune` on 2 ranks (as torchrun starts it) with disk offload: rank 0
    alone writes, each rank offloads into its own folder, and the result equals 1 process."""
    from transformers import AutoModelForCausalLM

    _, tmp = saved_llama
    calib = tmp / "calib.txt"
    calib.write_text(("the cat sat on the mat and the dog " * 200 + "\n") * 8)
    common = ["prune", str(tmp / "dense"), "--method", "wanda", "--sparsity", "2:4", "--calib", str(calib)]
    common += ["--nsamples", "4", "--seqlen", "16", "--batch-size", "2", "--save-format", "dense"]
    common += ["--max-cpu-memory", "64KB", "--dist-timeout", "60"]
    ((code, out),) = _launch([*common, "--offload-folder", str(tmp / "off1"), "--out", str(tmp / "one")], 1)
    assert code == 0, out
    results = _launch([*common, "--offload-folder", str(tmp / "off2"), "--out", str(tmp / "two")], 2)
    assert [c for c, _ in results] == [0, 0], results
    assert "pruned 14 linear layers" in results[0][1] and "pruned" not in results[1][1]  # rank 0 prints
    assert "rank 1 of 2" in results[0][1]
    assert (tmp / "off2" / "rank0").is_dir() and (tmp / "off2" / "rank1").is_dir()
    one, two = (AutoModelForCausalLM.from_pretrained(tmp / name).state_dict() for name in ("one", "two"))
    for name, w in one.items():
        assert torch.equal(w != 0, two[name] != 0), name
        torch.testing.assert_close(w, two[name], rtol=1e-5, atol=1e-6)


def test_cli_composed_recipe_on_two_ranks_equals_one_process(saved_llama):
    """--permute --refine dsnot --update admm from the CLI: the ADMM solves are spread over the
    ranks by cost and broadcast, the permutations are computed on every rank alike; the saved
    model equals one process's and keeps 2:4 in storage order."""
    from transformers import AutoModelForCausalLM

    from sparsekit.formats import parse_sparsity
    from sparsekit.formats.masks import check_mask

    _, tmp = saved_llama
    calib = tmp / "calib.txt"
    calib.write_text(("the cat sat on the mat and the dog " * 200 + "\n") * 8)
    common = ["prune", str(tmp / "dense"), "--method", "ria", "--sparsity", "2:4", "--calib", str(calib)]
    common += ["--nsamples", "4", "--seqlen", "16", "--batch-size", "2", "--save-format", "dense"]
    common += ["--permute", "--refine", "dsnot", "--update", "admm", "--dist-timeout", "60"]
    ((code, out),) = _launch([*common, "--out", str(tmp / "one")], 1)
    assert code == 0, out
    assert "with ria+permute+dsnot+admm" in out
    results = _launch([*common, "--out", str(tmp / "two")], 2)
    assert [c for c, _ in results] == [0, 0], results
    one, two = (AutoModelForCausalLM.from_pretrained(tmp / name).state_dict() for name in ("one", "two"))
    for name, w in one.items():
        assert torch.equal(w != 0, two[name] != 0), name
        torch.testing.assert_close(w, two[name], rtol=1e-5, atol=1e-6)
        if "layers" in name and (name.endswith("proj.weight") or ".experts." in name):
            check_mask(w != 0, parse_sparsity("2:4"))
    report = json.loads((tmp / "two" / "prune_report.json").read_text())
    assert report["recipe"] == "ria+permute+dsnot+admm"
