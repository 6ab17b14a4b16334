"""Zero-shot through lm-evaluation-harness, checked against an independent scorer on tiny models
(dense, with SparseLinear layers, structurally pruned), plus the error paths."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra sparsekit[eval]; make setup installs it")

from sparsekit.eval import wiki_tasks  # noqa: E402
from sparsekit.eval.zero_shot import (  # noqa: E402
    TaskUnavailableError,
    ZeroShotResult,
    _scores,
    check_tasks_available,
    parse_tasks,
    task_manager,
    zero_shot,
)

LIMIT = 6


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on a few held-out articles (no downloads)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    texts = [" ".join(a.sentences) for a in wiki_tasks.held_out_articles()[:200]]
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def _tiny_llama(vocab: int):
    import transformers

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.vocab_size = vocab
    config.max_position_embeddings = 512
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(len(tokenizer))


def _logprobs(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum log p(continuation | context) and whether every continuation token is the argmax,
    tokenized as the harness documents it (encode the whole, split at the context's length)."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    cont = whole[len(ctx) :]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1].double(), dim=-1)
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def _reference(model, tokenizer, limit: int) -> dict[str, dict[str, float]]:
    lam = wiki_tasks.lambada_items()[:limit]
    scored = [_logprobs(model, tokenizer, r["context"], r["target"]) for r in lam]
    lambada = {
        "acc": sum(greedy for _, greedy in scored) / limit,
        "perplexity": math.exp(-sum(lp for lp, _ in scored) / limit),
    }
    acc = acc_norm = 0
    for row in wiki_tasks.continuation_items()[:limit]:
        lps = [_logprobs(model, tokenizer, row["context"], " " + e)[0] for e in row["endings"]]
        acc += max(range(4), key=lambda i: lps[i]) == row["label"]
        acc_norm += max(range(4), key=lambda i: lps[i] / len(row["endings"][i])) == row["label"]
    return {"wiki_lambada": lambada, "wiki_continuation": {"acc": acc / limit, "acc_norm": acc_norm / limit}}


def _check_against_reference(result: ZeroShotResult, reference: dict) -> None:
    for task, metrics in reference.items():
        score = result.scores[task]
        assert score.items == LIMIT and score.items_total > LIMIT
        for name, value in metrics.items():
            assert score.metrics[name][0] == pytest.approx(value, rel=1e-4), (task, name)


def _variants(model):
    from sparsekit.api import prune
    from sparsekit.nn import sparsify
    from sparsekit.pruning.structured.depth import remove_blocks

    sparse = copy.deepcopy(model)
    prune(sparse, method="magnitude", sparsity="2:4", show_progress=False)
    sparsify(sparse, format="2:4")
    shallow = copy.deepcopy(model)
    remove_blocks(shallow, [1])
    return {"dense": model, "sparse-2:4": sparse, "one block removed": shallow}


@pytest.mark.parametrize("variant", ["dense", "sparse-2:4", "one block removed"])
def test_harness_scores_match_an_independent_scorer(model, tokenizer, variant):
    m = _variants(model)[variant]
    result = zero_shot(m, "wiki_lambada,wiki_continuation", tokenizer, limit=LIMIT, batch_size=4)
    _check_against_reference(result, _reference(m, tokenizer, LIMIT))
    assert result.env["lm_eval"] and result.scores["wiki_lambada"].version is not None
    assert result.to_dict()["scores"]["wiki_continuation"]["items"] == LIMIT


def test_parse_tasks():
    assert parse_tasks(" a, b ,a,,") == ["a", "b"]
    assert parse_tasks(["x"]) == ["x"]
    with pytest.raises(ValueError, match="no task given"):
        parse_tasks(" , ")


def test_unknown_task_names_the_task_and_suggests():
    with pytest.raises(ValueError, match=r"'wiki_lambda'.*did you mean.*wiki_lambada"):
        task_manager(["wiki_lambda"])


def test_include_path_must_be_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder of task YAMLs"):
        task_manager(["wiki_lambada"], tmp_path / "missing")


def test_unreachable_dataset_fails_naming_the_task(monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    manager = task_manager(["boolq"])
    with pytest.raises(TaskUnavailableError, match=r"task 'boolq'.*--include-path"):
        check_tasks_available(manager, ["boolq"])


def test_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="--limit"):
        zero_shot(model, "wiki_lambada", tokenizer, limit=0)
    with pytest.raises(ValueError, match="--batch-size"):
        zero_shot(model, "wiki_lambada", tokenizer, batch_size=0)


def test_scores_reads_the_harness_record():
    raw = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "perplexity,none": 3.0,
                "perplexity_stderr,none": "N/A",
            }
        },
        "n-samples": {"t": {"original": 10, "effective": 4}},
        "versions": {"t": 1.0},
        "n-shot": {"t": 0},
    }
    score = _scores(raw)["t"]
    assert score.metrics == {"acc": (0.5, 0.1), "perplexity": (3.0, None)}
    assert (score.items, score.items_total, score.main) == (4, 10, ("acc", 0.5, 0.1))
