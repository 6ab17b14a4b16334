"""The CLI's error surface: argument lists that must end, before any model loads, with exit code 2
and a message naming the problem and the fix. tests/test_hardening.py runs them in process;
tests/test_wheel.py runs them again from the installed wheel. In an argument, ``{bin}`` is a binary
file and ``{tmp}`` an empty folder, both made by the runner."""

from __future__ import annotations

_PRUNE = [
    # numbers
    (["--nsamples", "0"], "--nsamples must be >= 1"),
    (["--seqlen", "1"], "--seqlen must be >= 2"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--blocksize", "0"], "--blocksize must be >= 1"),
    (["--percdamp", "-0.1"], "--percdamp must be >= 0"),
    (["--method", "wanda", "--wbits", "4"], "wbits quantizes inside SparseGPT's sweep"),
    (["--method", "sparsegpt", "--wgroup", "64"], "add wbits"),
    (["--method", "sparsegpt", "--wbits", "12"], "wbits must be 2..8"),
    # data
    (["--calib", "no/such/corpus.txt"], "unknown corpus"),
    (["--eval", "--eval-dataset", "nope"], "unknown corpus"),
    (["--calib", "{bin}"], "bin.txt is not UTF-8 text or JSONL"),
    # amounts
    (["--sparsity", "3:2"], "0 < N < M"),
    (["--method", "flap", "--sparsity", "2:4"], "not a fraction"),
    (["--sparsity", "0"], "sparsity 0 prunes nothing"),
    (["--method", "flap", "--sparsity", "0"], "sparsity 0 makes flap remove nothing"),
    (["--method", "shortgpt"], "shortgpt needs an explicit amount: sparsity (--sparsity"),
    (["--method", "angular"], "or remove_layers (--remove-layers"),
    (["--method", "flap"], "flap needs an explicit amount"),
    (["--method", "shortgpt", "--remove-layers", "0"], "remove_layers 0 removes nothing"),
    (["--method", "angular", "--sparsity", "0.2", "--remove-layers", "3"], "not both"),
    # devices
    (["--device", "tpu9"], "device 'tpu9' is not a device name"),
    (["--device", "cuda:99"], "available here: cpu"),
    # options that the method would not use
    (
        ["--method", "flap", "--sparsity", "0.2", "--allocation", "owl"],
        "allocation (--allocation) does nothing",
    ),
    (
        ["--method", "flap", "--sparsity", "0.2", "--refine", "dsnot"],
        "refine (--refine) does nothing with flap",
    ),
    (
        ["--method", "wanda-sp", "--sparsity", "0.2", "--percdamp", "0.1"],
        "percdamp (--percdamp) does nothing",
    ),
    (["--method", "flap", "--sparsity", "0.2", "--axes", "mlp"], "axes (--axes) does nothing with flap"),
    (["--method", "minitron", "--sparsity", "0.2", "--axes", "hidden,depth"], "subset of hidden, mlp, heads"),
    (["--method", "minitron", "--sparsity", "0.2", "--refit"], "minitron keeps uniform widths with no refit"),
    (["--method", "wanda", "--start", "prior"], "--start does nothing without --method maskllm"),
    (
        ["--method", "maskllm", "--sparsity", "2:4", "--prior", "none", "--start", "prior"],
        "--prior none has no one-shot weights",
    ),
    (
        ["--method", "maskllm", "--sparsity", "2:4", "--prior-update", "admm"],
        "--prior-update admm changes only the kept weights",
    ),
    (
        ["--method", "minitron", "--sparsity", "0.2", "--heads", "query"],
        "cuts no heads (add heads to --axes)",
    ),
    (["--method", "magnitude", "--calib", "c4"], "calib (--calib) does nothing with magnitude"),
    (["--method", "magnitude", "--nsamples", "16"], "nsamples (--nsamples) does nothing with magnitude"),
    (["--method", "magnitude", "--forward-dtype", "fp32"], "forward_dtype (--forward-dtype) does nothing"),
    (
        ["--method", "shortened-ppl", "--remove-layers", "2", "--forward-dtype", "fp32"],
        "only wanda-sp / flap / llm-pruner and shortgpt / angular run their calibration forwards in it",
    ),
    (
        ["--method", "shortgpt", "--remove-layers", "2", "--repair", "--forward-dtype", "fp32"],
        "the repair fits its maps on states in the model's dtype",
    ),
    (
        [
            "--method",
            "angular",
            "--remove-layers",
            "2",
            "--repair",
            "--then-method",
            "minitron",
            "--then-sparsity",
            "0.2",
            "--forward-dtype",
            "fp32",
        ],
        "--forward-dtype does nothing with --method angular --then-method minitron: neither step takes it",
    ),  # fmt: skip
    (["--method", "wanda", "--blocksize", "64"], "only tunes SparseGPT's solve"),
    (["--method", "wanda", "--owl-lambda", "0.1"], "only tunes allocation='owl'"),
    (
        ["--method", "wanda", "--remove-layers", "2"],
        "remove_layers (--remove-layers) does nothing with wanda",
    ),
    (["--method", "wanda", "--heads", "query"], "heads (--heads) does nothing with wanda"),
    (["--method", "shortgpt", "--remove-layers", "2", "--heads", "query"], "heads (--heads) does nothing"),
    (
        ["--method", "flap", "--sparsity", "0.2", "--tokens", "last"],
        "tokens (--tokens) does nothing with flap",
    ),
    (["--method", "wanda-sp", "--sparsity", "0.2", "--widths", "adaptive"], "is flap's global ranking"),
    (["--sparsity", "2:4", "--allocation", "owl"], "spreads an unstructured sparsity"),
    (["--sparsity", "0.5", "--permute"], "has no groups"),
    (["--method", "sparsegpt", "--update", "sparsegpt"], "solves the same mask twice"),
    # stacking
    (["--method", "wanda", "--then-method", "sparsegpt"], "--then-method stacks"),
    (["--method", "flap", "--sparsity", "0.2", "--then-method", "angular"], "a width method on a depth one"),
    (
        ["--method", "angular", "--remove-layers", "3", "--then-method", "flap", "--then-sparsity", "0.1"]
        + ["--importance", "vector"],
        "importance (--importance) does nothing with flap",
    ),
    (
        ["--method", "angular", "--remove-layers", "3", "--repair-fit", "weights"],
        "repair_fit='weights' chooses what the repair fits: add repair=True",
    ),
    (
        ["--method", "flap", "--sparsity", "0.2", "--then-method", "magnitude", "--forward-dtype", "fp32"],
        "forward_dtype (--forward-dtype) does nothing with magnitude",
    ),
    (
        ["--method", "flap", "--sparsity", "0.2", "--then-method", "wanda", "--heads", "query", "--repair"],
        "repair",
    ),
    # flags of the command itself
    (["--then-sparsity", "4:8"], "--then-sparsity does nothing without --then-method"),
    (["--eval-tokens", "1024"], "--eval-tokens does nothing without --eval"),
    (["--save-format", "dense"], "--save-format does nothing without --out"),
    (["--max-cpu-memory", "1GiB"], "--max-cpu-memory does nothing without --offload-folder"),
    (
        ["--method", "flap", "--sparsity", "0.2", "--out", "{tmp}/flap", "--save-format", "dense"],
        "--save-format does nothing when every step is structured",
    ),
    (["--out", "{tmp}"], "exists"),
]

_EVAL = [
    (["--seqlen", "0"], "--seqlen must be >= 2"),
    (["--dataset", "nope"], "unknown corpus"),
    (["--dataset", "{bin}"], "is not UTF-8 text or JSONL"),
    (["--device", "tpu9"], "device 'tpu9' is not a device name"),
    (["--tasks", "wiki_lambada", "--seqlen", "128"], "--seqlen does nothing without --ppl"),
    (["--batch-size", "4"], "--batch-size does nothing without --tasks"),
    (["--limit", "5"], "--limit does nothing without --tasks"),
    (["--max-cpu-memory", "1GiB"], "--max-cpu-memory does nothing without --offload-folder"),
]

CASES: list[tuple[list[str], str]] = [
    *((["prune", "smollm2", *argv], message) for argv, message in _PRUNE),
    *((["eval", "smollm2", *argv], message) for argv, message in _EVAL),
    (["finetune", "{tmp}/ck", "--temperature", "2"], "--temperature does nothing without --distill"),
    (["bench", "layers", "--device", "tpu9"], "device 'tpu9' is not a device name"),
]


def case_id(case: tuple[list[str], str]) -> str:
    return " ".join(case[0][:1] + case[0][2:])
