"""The hub corpora (wikitext2, C4, dolly) through a stand-in ``datasets`` module: no network here,
so these check what sparsekit asks the hub for and how it turns the rows into text."""

import sys
import types

import pytest

from sparsekit.hf.data import calibration_ids, corpus_texts, evaluation_ids
from tests.hf.test_data import CharTokenizer


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, data_files=None, streaming=False):
        calls.append(dict(path=path, name=name, split=split, data_files=data_files, streaming=streaming))
        if path == "wikitext":
            return {"text": [f" = {split} article = \n", f"{split} body text " * 10]}
        if path == "allenai/c4":
            return iter({"text": f"c4 doc {i} " * 30} for i in range(1000))
        if path == "databricks/databricks-dolly-15k":
            return iter(
                {"instruction": f"question {i}?", "context": "", "response": f"answer {i} " * 20}
                for i in range(200)
            )
        raise AssertionError(path)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    module.config = types.ModuleType("datasets.config")  # offline_if_unreachable sets HF_HUB_OFFLINE here
    module.config.HF_HUB_OFFLINE = False
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setitem(sys.modules, "datasets.config", module.config)
    return calls


def test_wikitext2_uses_the_official_split(fake_datasets):
    (train,) = corpus_texts("wikitext2", "calib")
    (test,) = corpus_texts("wikitext2", "eval")
    assert "train body" in train and "test body" in test
    assert [c["split"] for c in fake_datasets] == ["train", "test"]
    assert fake_datasets[0]["name"] == "wikitext-2-raw-v1"


def test_c4_streams_one_shard_and_stops_early(fake_datasets):
    ids = calibration_ids(CharTokenizer(), "c4", nsamples=2, seqlen=64)
    assert ids.shape == (2, 64)
    call = fake_datasets[0]
    assert call["streaming"] and "c4-train.00000-of-01024" in call["data_files"]["data"]
    evaluation_ids(CharTokenizer(), "c4", max_tokens=100)
    assert "c4-validation" in fake_datasets[1]["data_files"]["data"]


def test_dolly_joins_instruction_and_response_and_holds_out_documents(fake_datasets):
    calib = list(corpus_texts("dolly", "calib"))
    held_out = list(corpus_texts("dolly", "eval"))
    assert calib[0].startswith("question") and "answer" in calib[0]
    assert held_out and not set(calib) & set(held_out)


def test_unreachable_hub_names_the_offline_alternative(monkeypatch):
    module = types.ModuleType("datasets")

    def offline(*args, **kwargs):
        raise OSError("no network")

    module.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(ConnectionError, match="wiki-offline"):
        list(corpus_texts("wikitext2", "calib"))
