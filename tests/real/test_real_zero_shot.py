"""Zero-shot accuracy of the real SmolLM2 through the real lm-evaluation-harness: the offline tasks
separate a working model from a broken one, and the CLI runs offline and standard tasks."""

import copy
import json
from pathlib import Path

import pytest

import sparsekit

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra sparsekit[eval]; make setup installs it")

pytestmark = pytest.mark.real
LIMITS = {"wiki_lambada": 40, "wiki_continuation": 20}


def _accuracies(model, tokenizer) -> dict[str, float]:
    out = {}
    for task, limit in LIMITS.items():
        result = sparsekit.zero_shot(model, task, tokenizer=tokenizer, limit=limit)
        assert result.scores[task].items == limit
        out[task] = result.scores[task].main[1]
    return out


@pytest.fixture(scope="module")
def dense_acc(smollm2):
    return _accuracies(*smollm2)


def test_dense_model_is_far_above_chance(dense_acc):
    assert dense_acc["wiki_lambada"] >= 0.4  # chance: about 1 / vocabulary
    assert dense_acc["wiki_continuation"] >= 0.45  # chance: 0.25


def test_magnitude_24_is_much_closer_to_chance(smollm2, dense_acc):
    model, tokenizer = smollm2
    broken = copy.deepcopy(model)
    sparsekit.prune(broken, method="magnitude", sparsity="2:4", show_progress=False)
    acc = _accuracies(broken, tokenizer)
    assert acc["wiki_lambada"] <= dense_acc["wiki_lambada"] - 0.3
    assert acc["wiki_continuation"] <= dense_acc["wiki_continuation"] - 0.1
    assert acc["wiki_continuation"] <= 0.45


ARC_ITEMS = [
    (
        "What is the main source of energy for Earth's surface?",
        ["the Sun", "the Moon", "volcanoes", "the ocean"],
        "A",
    ),
    ("Which state of matter has a fixed shape?", ["gas", "liquid", "solid", "plasma"], "C"),
    (
        "Plants take in which gas from the air to make food?",
        ["oxygen", "carbon dioxide", "nitrogen", "helium"],
        "B",
    ),
    (
        "What force pulls objects toward the center of Earth?",
        ["magnetism", "friction", "gravity", "electricity"],
        "C",
    ),
    (
        "Which organ pumps blood through the human body?",
        ["the lungs", "the heart", "the brain", "the stomach"],
        "B",
    ),
]


def local_arc_easy(folder: Path) -> Path:
    """The harness's own arc_easy task (prompt, choices, metrics) reading ARC-format local files:
    the documented way to run a standard task where the hub is unreachable."""
    import lm_eval

    folder.mkdir()
    rows = [
        {"id": f"local-{i}", "question": q, "choices": {"text": c, "label": list("ABCD")}, "answerKey": a}
        for i, (q, c, a) in enumerate(ARC_ITEMS)
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builtin = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    (folder / "arc_easy.yaml").write_text(
        f"include: {builtin}\ntask: arc_easy\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n"
    )
    return folder


def test_cli_runs_a_standard_task_from_a_local_task_folder(tmp_path, capsys):
    from sparsekit.cli import main

    tasks = local_arc_easy(tmp_path / "tasks")
    out = tmp_path / "arc.json"
    code = main(
        [
            "eval",
            "smollm2",
            "--tasks",
            "arc_easy,wiki_lambada",
            "--limit",
            "3",
            "--include-path",
            str(tasks),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| arc_easy | acc_norm |" in printed and "| wiki_lambada | acc |" in printed
    record = json.loads(out.read_text())
    scores = record["zero_shot"]["scores"]
    assert scores["arc_easy"]["items"] == 3 and scores["arc_easy"]["items_total"] == len(ARC_ITEMS)
    assert scores["wiki_lambada"]["items"] == 3
    assert record["zero_shot"]["env"]["lm_eval"]


def test_cli_names_a_task_whose_dataset_is_unavailable(monkeypatch, tmp_path, capsys):
    import datasets.config

    from sparsekit.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    assert main(["eval", "smollm2", "--tasks", "wiki_lambada,piqa", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "task 'piqa'" in err and "--include-path" in err and "Traceback" not in err
