"""The converted-GGUF cache: keyed by the file, refused when incomplete, and (on the real model) the
same weights and tokenizer as a fresh conversion."""

import json
import os

import pytest
import torch

from sparsekit.hf import models
from sparsekit.hf.models import ModelSource, gguf_cache_dir, load_model


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_GGUF_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    return ModelSource(str(tmp_path), "m.gguf")


def test_the_key_follows_the_file(fake_gguf, tmp_path):
    first = gguf_cache_dir(fake_gguf)
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    assert gguf_cache_dir(fake_gguf) == first
    os.utime(tmp_path / "m.gguf", ns=(1, 1))  # a replaced file (pip reinstall) gets a new copy
    assert gguf_cache_dir(fake_gguf) != first


def test_no_cache_when_off_too_large_or_not_gguf(fake_gguf, tmp_path, monkeypatch):
    assert gguf_cache_dir(ModelSource(str(tmp_path))) is None
    monkeypatch.setattr(models, "GGUF_CACHE_MAX_FILE", 10)
    assert gguf_cache_dir(fake_gguf) is None
    monkeypatch.setattr(models, "GGUF_CACHE_MAX_FILE", 2**20)
    monkeypatch.setenv("SPARSEKIT_GGUF_CACHE", "0")
    assert gguf_cache_dir(fake_gguf) is None


def test_a_copy_counts_only_with_its_marker_naming_the_file(fake_gguf, tmp_path):
    folder = gguf_cache_dir(fake_gguf)
    folder.mkdir(parents=True)
    assert not models._cached(folder, fake_gguf)  # weights without the marker: an unfinished copy
    marker = folder / models._CACHE_MARKER
    marker.write_text(json.dumps({"gguf": str(tmp_path / "other.gguf")}))
    assert not models._cached(folder, fake_gguf)
    marker.write_text("{not json")
    assert not models._cached(folder, fake_gguf)
    marker.write_text(json.dumps({"gguf": str((tmp_path / "m.gguf").resolve())}))
    assert models._cached(folder, fake_gguf)


@pytest.mark.real
def test_the_cached_model_equals_a_fresh_conversion(smollm2):
    cached, cached_tok = smollm2  # the session model comes through the cache
    assert os.environ["SPARSEKIT_GGUF_CACHE"] in cached.config._name_or_path
    fresh, fresh_tok = load_model("smollm2", gguf_cache=False)
    a, b = fresh.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert getattr(fresh.config, "quantization_config", None) is None
    text = "The Eiffel Tower, in Paris, was finished in 1889 — 330 m tall.\n<|im_start|>user\nhi"
    assert fresh_tok(text).input_ids == cached_tok(text).input_ids
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template", "all_special_tokens"):
        assert getattr(fresh_tok, attr) == getattr(cached_tok, attr), attr
    ids = torch.tensor([cached_tok(text).input_ids])
    with torch.no_grad():
        assert fresh(ids).logits.equal(cached(ids).logits)
