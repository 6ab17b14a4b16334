"""Fixtures shared by the pruning tests."""

import pytest

from tests.conftest import tiny_model


@pytest.fixture
def saved_llama(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama").eval()
    model.save_pretrained(tmp_path / "dense")
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path / "dense")
    return model, tmp_path
