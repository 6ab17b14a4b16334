"""A tiny random LLaMA saved as an ordinary HF model folder with a byte-level BPE tokenizer trained
here on the offline corpus: what the CLI (or an installed wheel) loads end to end, without downloads,
in a second or two."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch


def save_tiny_model(path: Path, vocab_size: int = 400, max_positions: int = 512) -> Path:
    """Write config, weights and tokenizer of a 2-block, hidden-64 LLaMA to ``path``; return it."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from sparsekit.hf.data import corpus_texts

    texts = list(itertools.islice(corpus_texts("wiki-offline", "calib"), 200))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
