"""What the prune drivers (``llmcompressor_driver.py``, ``original_driver.py``) share: their common
arguments, the calibration ids they read, and what they hand back (the pruned decoder weights as
safetensors and a JSON report, each written to a temp path and renamed).

Imports only torch and safetensors, so llm-compressor's own venv can run it; the drivers import it
from their folder (``sys.path[0]`` when run as scripts)."""

from __future__ import annotations

import argparse
import json
import os


def driver_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every driver takes (``vs_llmcompressor.py`` passes them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="a Hugging Face folder (fp32 safetensors)")
    p.add_argument("--calib", required=True, help="a tensor file of calibration token ids [n, L]")
    p.add_argument("--method", required=True)
    p.add_argument("--sparsity", required=True, help="a fraction or N:M")
    p.add_argument("--out", required=True, help="the pruned decoder weights (safetensors)")
    p.add_argument("--report", required=True, help="a JSON report (prune time, versions)")
    p.add_argument("--threads", type=int, default=2)
    return p


def load_calibration_ids(path: str):
    """Integer token ids [n, L] from ``path`` (``weights_only=True``), checked before any prune."""
    import torch

    ids = torch.load(path, weights_only=True)
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        raise SystemExit(f"{path} must hold integer token ids [n, L]")
    return ids


def write_outputs(model, out: str, report_path: str, report: dict) -> None:
    """Decoder-block tensors of ``model`` (names holding ``.layers.``) -> ``out``; ``report`` -> JSON."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".layers." in k}
    save_file(state, out + ".tmp")
    os.replace(out + ".tmp", out)
    with open(report_path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(report_path + ".tmp", report_path)
