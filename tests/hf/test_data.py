import json

import pytest
import torch

from sparsekit.hf.data import calibration_ids, corpus_texts, evaluation_ids


class CharTokenizer:
    """One token per character: enough to test windowing without a real tokenizer."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_wiki_offline_calibration_and_evaluation_never_share_a_document():
    calib = set(corpus_texts("wiki-offline", "calib"))
    held_out = set(corpus_texts("wiki-offline", "eval"))
    assert len(calib) > 8000 and len(held_out) > 800
    assert not calib & held_out


def test_calibration_windows_are_seeded_and_deterministic():
    tok = CharTokenizer()
    a = calibration_ids(tok, "wiki-offline", nsamples=4, seqlen=32, seed=0)
    b = calibration_ids(tok, "wiki-offline", nsamples=4, seqlen=32, seed=0)
    c = calibration_ids(tok, "wiki-offline", nsamples=4, seqlen=32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_local_files_load_and_split(tmp_path, suffix):
    docs = [f"document number {i} " * 5 for i in range(60)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    else:
        path.write_text(json.dumps(docs))
    calib, held_out = list(corpus_texts(str(path), "calib")), list(corpus_texts(str(path), "eval"))
    assert calib and held_out and len(calib) + len(held_out) == 60
    ids = calibration_ids(CharTokenizer(), str(path), nsamples=3, seqlen=20)
    assert ids.shape == (3, 20)
    assert evaluation_ids(CharTokenizer(), str(path), max_tokens=50).shape == (1, 50)


def test_list_of_texts_is_calibration_data():
    ids = calibration_ids(CharTokenizer(), ["hello world " * 20], nsamples=2, seqlen=16)
    assert ids.shape == (2, 16)


def test_bad_specs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'wikitext3'"):
        list(corpus_texts("wikitext3", "calib"))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_ids(CharTokenizer(), ["short"], nsamples=2, seqlen=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": 3}))
    with pytest.raises(ValueError, match="'text' field"):
        list(corpus_texts(str(bad), "calib")) + list(corpus_texts(str(bad), "eval"))
