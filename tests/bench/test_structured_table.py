"""The structured table script's variant grammar and its choice of what to distil."""

from __future__ import annotations

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture(scope="module")
def table():
    return bench_script("structured_table")


def test_every_preset_variant_parses(table):
    for preset in table.PRESETS.values():
        for variant in preset.split(","):
            table.steps_of(variant)
    assert table.steps_of("minitron-35-all") == [("minitron", "0.35", {"axes": "hidden,mlp,heads"})]
    with pytest.raises(ValueError, match="minitron suffixes"):
        table.steps_of("minitron-20-depth")


def test_distil_choice_takes_the_best_of_each_size_and_the_named(table):
    rows = [
        {"variant": "dense", "removed": 0.0, "ppl": 15},
        {"variant": "a-20", "removed": 0.2, "ppl": 30},
        {"variant": "b-20", "removed": 0.2, "ppl": 25},
        {"variant": "c-20", "removed": 0.21, "ppl": 40},
        {"variant": "a-35", "removed": 0.333, "ppl": 90},
        {"variant": "b-35", "removed": 0.35, "ppl": 60},
    ]
    chosen = [r["variant"] for r in table.distil_choice(rows, 1, "c-20,dense")]
    assert chosen == ["c-20", "b-20", "b-35"]
    assert [r["variant"] for r in table.distil_choice(rows, 2, "")] == ["b-20", "a-20", "b-35", "a-35"]


def test_stacked_and_repair_variants_parse(table):
    assert table.steps_of("angular-3-rw+flap-28-adaptive-refit") == [
        ("angular", "0", {"remove_layers": 3, "repair": True, "repair_fit": "weights"}),
        ("flap", "0.28", {"widths": "adaptive", "refit": True, "forward_dtype": "model"}),
    ]
    assert table.steps_of("shortgpt-6-r") == [("shortgpt", "0", {"remove_layers": 6, "repair": True})]
    # unrepaired cosine criteria keep the fp32 forwards the tables ran with; shortened-ppl casts none
    assert table.steps_of("shortgpt-6")[0][2] == {
        "remove_layers": 6,
        "repair": False,
        "forward_dtype": "model",
    }
    assert "forward_dtype" not in table.steps_of("shortened-ppl-6")[0][2]
    assert table.steps_of("flap-20+2:4")[-1] == ("sparsegpt", "2:4", {})
    with pytest.raises(ValueError, match="suffixes are -r and -rw"):
        table.steps_of("angular-6-x")
    assert table.steps_of("wanda-sp-35-bias")[0][2]["bias_compensation"] is True
    assert table.steps_of("flap-35-nobias")[0][2]["bias_compensation"] is False
    assert "bias_compensation" not in table.steps_of("flap-35")[0][2]  # the method's default
    with pytest.raises(ValueError, match="one of -bias / -nobias"):
        table.steps_of("flap-35-bias-nobias")


def _args(table, tmp_path, **over):
    base = {name: 1 for name in table.PROTOCOL} | {"rounds": 0, "distill_steps": 0, "out": str(tmp_path)}
    return type("Args", (), base | {"models": None} | over)()


def test_resume_keeps_rows_of_the_same_protocol_only(table, tmp_path):
    import json

    args = _args(table, tmp_path)
    assert table.resumed_state(args) == {}  # nothing written yet
    protocol = {k: getattr(args, k) for k in table.PROTOCOL}
    rows = [{"variant": "dense", "ppl": 15.0}, {"variant": "flap-20", "ppl": 31.6}]
    (tmp_path / "structured.partial.json").write_text(json.dumps({"protocol": protocol, "rows": rows}))
    assert table.resumed_state(args)["rows"] == {"dense": rows[0], "flap-20": rows[1]}
    with pytest.raises(SystemExit, match="was written with"):
        table.resumed_state(_args(table, tmp_path, nsamples=2))


def test_resume_with_timing_or_distillation_needs_saved_models(table, tmp_path):
    with pytest.raises(SystemExit, match="add --models DIR"):
        table.check_resume(_args(table, tmp_path, rounds=5))
    with pytest.raises(SystemExit, match="add --models DIR"):
        table.check_resume(_args(table, tmp_path, distill_steps=10))
    table.check_resume(_args(table, tmp_path, rounds=5, models=str(tmp_path / "m")))
    table.check_resume(_args(table, tmp_path))  # rows only: nothing to load


def test_a_models_folder_serves_one_protocol(table, tmp_path):
    folder = str(tmp_path / "models")
    table.claim_models_dir(_args(table, tmp_path, models=folder))
    table.claim_models_dir(_args(table, tmp_path, models=folder))  # the same protocol again
    with pytest.raises(SystemExit, match="give another --models folder"):
        table.claim_models_dir(_args(table, tmp_path, models=folder, seqlen=7))
    assert table.model_dir(folder, "sparsegpt-2:4").name == "sparsegpt-2_4"


class _TinyProtocol:
    """What main() measures with, on a tiny random Llama (no tokenizer, no zero-shot tasks)."""

    def __init__(self, args) -> None:
        import torch

        from sparsekit.pruning.structured import block_param_count
        from tests.conftest import tiny_model

        torch.manual_seed(0)
        self.dense = tiny_model("llama").eval()
        vocab = self.dense.config.vocab_size
        self.calib = torch.randint(0, vocab, (args.nsamples, args.seqlen))
        self.eval_ids = torch.randint(0, vocab, (1, args.eval_tokens))
        self.prompts, self.prompt_source = torch.randint(0, vocab, (1, args.prompt_len)), "random"
        self.train_ids = torch.randint(0, vocab, (8, args.distill_seqlen))
        self.tasks, self.manager, self.tokenizer = (), None, None
        self.dense_block_params = block_param_count(self.dense)

    def accuracy(self, model, items):
        return {}


def test_a_stopped_run_resumes_and_times_and_distils_the_saved_models(table, tmp_path, monkeypatch):
    """First run: stopped while pruning its second row. The same command again keeps the first row,
    prunes the second, times both from their saved checkpoints in one process and distils the
    best; a third run keeps everything and only writes the report."""
    import json
    import sys

    monkeypatch.setattr(table, "Protocol", _TinyProtocol)
    out, models = tmp_path / "out", tmp_path / "models"
    argv = ["structured_table.py", "--variants", "dense,shortgpt-1-r", "--nsamples", "4", "--seqlen", "16",
            "--eval-tokens", "64", "--eval-seqlen", "16", "--prompt-len", "8", "--new-tokens", "3",
            "--rounds", "1", "--distill-steps", "2", "--distill-best", "1", "--distill-seqlen", "16",
            "--models", str(models), "--resume", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    prune_row = table.prune_row

    def stopped(variant, *a):
        if variant != "dense":
            raise KeyboardInterrupt
        return prune_row(variant, *a)

    monkeypatch.setattr(table, "prune_row", stopped)
    with pytest.raises(KeyboardInterrupt):
        table.main()
    partial = json.loads((out / "structured.partial.json").read_text())
    assert [r["variant"] for r in partial["rows"]] == ["dense"] and (models / "dense").is_dir()

    calls = []
    monkeypatch.setattr(table, "prune_row", lambda v, *a: calls.append(v) or prune_row(v, *a))
    table.main()
    assert calls == ["shortgpt-1-r"]  # the dense row was kept
    report = json.loads((out / "structured.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["shortgpt-1-r"]["layers"] == rows["dense"]["layers"] - 1
    assert (models / "shortgpt-1-r").is_dir()
    assert set(report["timing"]["results"]) == {"dense", "shortgpt-1-r"}
    assert rows["shortgpt-1-r"]["distilled"]["settings"]["distill_steps"] == 2
    assert rows["dense"]["run"]["commit"] == rows["shortgpt-1-r"]["run"]["commit"]
    assert rows["shortgpt-1-r"]["distilled"]["run"]["commit"] == rows["dense"]["run"]["commit"]
    assert "distillation of shortgpt-1-r: commit" in (out / "structured.md").read_text()

    calls.clear()
    monkeypatch.setattr(table, "distil", lambda *a: pytest.fail("distilled again"))
    monkeypatch.setattr(table, "time_generation_interleaved", lambda *a, **k: pytest.fail("timed again"))
    table.main()
    assert calls == []
    again = json.loads((out / "structured.json").read_text())
    assert again["rows"] == report["rows"] and again["timing"] == report["timing"]

    # another list of rows (no timing, no distillation) leaves the rows it does not name in the file
    subset = argv[:2] + ["dense,shortgpt-1"] + argv[3:]
    subset[subset.index("--rounds") + 1], subset[subset.index("--distill-steps") + 1] = "0", "0"
    monkeypatch.setattr(sys, "argv", subset)
    table.main()
    assert calls == ["shortgpt-1"]
    listed = [r["variant"] for r in json.loads((out / "structured.json").read_text())["rows"]]
    assert listed == ["dense", "shortgpt-1"]
    kept = json.loads((out / "structured.partial.json").read_text())
    assert [r["variant"] for r in kept["rows"]] == ["dense", "shortgpt-1", "shortgpt-1-r"]
