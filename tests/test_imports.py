"""The package imports lazily: lower layers never pull in transformers; the quantizer still registers."""

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_kernel_and_pruning_layers_do_not_import_transformers():
    code = (
        "import sys, sparsekit.kernels, sparsekit.formats.weight, sparsekit.models, sparsekit.pruning, "
        "sparsekit.nn; print('transformers' in sys.modules)"
    )
    assert _run(code) == "False"


def test_quantizer_registers_when_transformers_comes_after_sparsekit():
    code = (
        "import sparsekit; from transformers import AutoModelForCausalLM; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
        "print('sparsekit' in AUTO_QUANTIZER_MAPPING)"
    )
    assert _run(code) == "True"


def test_quantizer_registers_when_transformers_came_first():
    code = (
        "import transformers, sparsekit; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
        "print('sparsekit' in AUTO_QUANTIZER_MAPPING)"
    )
    assert _run(code) == "True"


def test_lazy_names_resolve_and_unknown_names_fail():
    assert _run("import sparsekit; print(sparsekit.prune.__module__, sparsekit.SparseLinear.__name__)") == (
        "sparsekit.api SparseLinear"
    )
    code = "import sparsekit\ntry:\n    sparsekit.nope\nexcept AttributeError as e:\n    print('ok')"
    assert _run(code) == "ok"
