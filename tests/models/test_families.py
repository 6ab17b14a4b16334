"""Every family the issue lists, on tiny random models from transformers' own config classes: one
unstructured, one depth and one width method, compressed and plain-HF save/reload, each checked
against an independent reference (sparsekit.bench.coverage says how). The whole family x method
matrix is ``python bench/coverage.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparsekit.bench.coverage import FAMILIES, calib_ids, logits, run_cell, tiny_model

# one unstructured method with its compressed save/reload (wanda 2:4: every group checked), one depth
# method (against the dense model with the block skipped, cached decoding), one width method with its
# plain-transformers save/reload (against the dense model with the cut structure zeroed)
CI_COLUMNS = ("compressed reload", "shortgpt", "plain-HF reload")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_saves_and_reloads(family):
    dense = tiny_model(family)
    results = [run_cell(family, column, dense) for column in CI_COLUMNS]
    bad = [f"{c.column}: {c.status} {c.detail}" for c in results if c.status != "OK"]
    assert not bad, "\n".join(bad)


def test_structured_checkpoints_load_in_plain_transformers_without_sparsekit(tmp_path):
    """Width- and depth-pruned models saved with save_pretrained load in a fresh process that never
    imports sparsekit, with the logits the pruned model had in memory."""
    import sparsekit

    expected = {}
    for family in ("gpt_neox", "phi3", "gemma3_text", "qwen3_5_text"):
        model = tiny_model(family)
        sparsekit.prune(model, method="flap", sparsity=0.2, calib=calib_ids(), show_progress=False)
        sparsekit.prune(model, method="shortgpt", remove_layers=1, calib=calib_ids(), show_progress=False)
        model.save_pretrained(tmp_path / family)
        expected[family] = logits(model, calib_ids(2, 12)).sum(-1).tolist()
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))\n"
        "out = {}\n"
        f"for fam in {list(expected)!r}:\n"
        f"    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + fam).eval()\n"
        "    with torch.no_grad(): out[fam] = m(ids, use_cache=False).logits.float().sum(-1).tolist()\n"
        "assert 'sparsekit' not in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for family, want in expected.items():
        torch.testing.assert_close(torch.tensor(got[family]), torch.tensor(want), rtol=1e-4, atol=1e-3)
