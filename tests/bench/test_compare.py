import torch

from sparsekit.bench.compare import DENSE, compare_variants, quantized, unstructured
from tests.conftest import tiny_model


def test_quantized_variant_with_its_head_names_and_applies_it():
    """``quantized(base, fmt, head=True)``: the lm_head quantized too, named "(head too)"; on a tied
    model its float table stays beside the int8 head, so it holds more bytes than int8 alone."""
    sgpt = unstructured("magnitude", "2:4")
    assert quantized(DENSE, "int8", head=True).name == "int8 (head too)"
    assert quantized(sgpt, "int8", head=True).name == "magnitude 2:4 + int8 (head too)"
    assert not quantized(DENSE, "int8").quantize_head
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2
    model.config.tie_word_embeddings = True
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(0))
    variants = [DENSE, quantized(DENSE, "int8"), quantized(DENSE, "int8", head=True)]
    rows = {
        r.variant: r
        for r in compare_variants(model, None, variants, ids[:, :64], ids, eval_seqlen=64, tasks=(), rounds=1)
    }
    table = model.model.embed_tokens.weight.nbytes
    head_int8 = 128 * 64 + 128 * 4  # int8 codes and an fp32 scale per row
    assert rows["int8 (head too)"].bytes == rows["int8"].bytes + head_int8
    assert rows["dense"].bytes - rows["int8"].bytes > table  # the block linears shrank, the table did not
    assert abs(rows["int8 (head too)"].ppl / rows["dense"].ppl - 1) < 0.05
    assert model.config.tie_word_embeddings  # the input model is left as it was
