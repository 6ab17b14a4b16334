"""Run one llm-compressor one-shot prune inside llm-compressor's own virtual environment.

Called by ``bench/vs_llmcompressor.py`` with that environment's python; imports nothing from
sparsekit (sparsekit's venv has a newer transformers than llm-compressor accepts).

    .venv-llmc/bin/python bench/llmcompressor_driver.py --model DIR --calib calib.pt \
        --method sparsegpt --sparsity 0.5 --out pruned.safetensors --report result.json

``--model``: a Hugging Face folder (fp32 safetensors); ``--calib``: a tensor file of calibration
token ids [n, L] (loaded with ``weights_only=True``); ``--sparsity``: a fraction or N:M. Writes the
pruned decoder weights (safetensors) and a JSON line with the prune time and versions.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version


def _modifier(method: str, sparsity: str):
    """``method``: sparsegpt | wanda, with ``+owl`` for OWL's allocation (M 5, lambda 0.08)."""
    method, _, allocation = method.partition("+")
    owl = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08} if allocation == "owl" else {}
    scope = {"targets": ["Linear"], "ignore": ["lm_head", "re:.*lm_head"]}
    if ":" in sparsity:
        n, m = (int(v) for v in sparsity.split(":"))
        fraction, structure = 1 - n / m, sparsity
    else:
        fraction, structure = float(sparsity), "0:0"
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=fraction, mask_structure=structure, **scope, **owl)
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=fraction, mask_structure=structure, **scope, **owl)
    raise SystemExit(f"unknown method {method!r}: sparsegpt or wanda")


def main() -> int:
    from driver_io import driver_arguments, load_calibration_ids, write_outputs

    args = driver_arguments(__doc__.splitlines()[0]).parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = load_calibration_ids(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier = _modifier(args.method, args.sparsity)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=modifier,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
    )
    seconds = time.perf_counter() - start
    report = {
        "prune_s": seconds,
        "llmcompressor": version("llmcompressor"),
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "modifier": repr(modifier),
    }
    write_outputs(model, args.out, args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
