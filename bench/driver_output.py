"""What a prune driver (``llmcompressor_driver.py``, ``original_driver.py``) hands back: the pruned
decoder weights as safetensors and a JSON report, each written to a temp path and renamed.

Imports only torch and safetensors, so llm-compressor's own venv can run it; the drivers import it
from their folder (``sys.path[0]`` when run as scripts)."""

from __future__ import annotations

import json
import os


def write_outputs(model, out: str, report_path: str, report: dict) -> None:
    """Decoder-block tensors of ``model`` (names holding ``.layers.``) -> ``out``; ``report`` -> JSON."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".layers." in k}
    save_file(state, out + ".tmp")
    os.replace(out + ".tmp", out)
    with open(report_path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(report_path + ".tmp", report_path)
