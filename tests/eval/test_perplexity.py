import math

import pytest
import torch
import torch.nn.functional as F

from sparsekit.eval import perplexity_of_ids
from tests.conftest import tiny_model


def test_perplexity_is_exp_of_mean_token_nll_over_windows():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 70))
    result = perplexity_of_ids(model, ids, seqlen=16, batch_size=3)
    assert result.windows == 4 and result.tokens == 4 * 15  # the 6 leftover tokens are dropped
    nll = []
    with torch.no_grad():
        for w in ids[0, :64].view(4, 16):
            logits = model(w[None]).logits[0, :-1]
            nll.append(F.cross_entropy(logits, w[1:], reduction="none"))
    expected = torch.cat(nll).mean().item()
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_perplexity_needs_one_window():
    with pytest.raises(ValueError, match="at least seqlen=32"):
        perplexity_of_ids(tiny_model("llama"), torch.zeros(1, 10, dtype=torch.long), seqlen=32)
