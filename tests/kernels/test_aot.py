"""Every registered kernel compiles for sm_80 and sm_90 without spills, GEMMs on tensor cores.

Runs ``python -m sparsekit.kernels.aot`` in a subprocess without TRITON_INTERPRET (the
interpreter's kernels cannot be compiled); no GPU needed. About 10-15 s on 2 CPU cores.
This compile is also the bf16 check of the GEMM kernels (the interpreter's bf16 tl.dot is
broken, triton-lang/triton#11584).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekit.kernels import aot

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not aot._ptxas().exists(), reason="triton's ptxas-blackwell is missing")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "sparsekit.kernels.aot", "--arch", "80", "90", "--out", str(out)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (out / "report.md").exists(), res.stdout + res.stderr
    return res, json.loads((out / "report.json").read_text()), out


def test_command_succeeds(reports):
    res, _, _ = reports
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def test_every_case_and_arch_compiled(reports):
    _, rows, out = reports
    names = {c.name for c in aot.collect_cases()}
    assert {(r["case"], r["arch"]) for r in rows} == {(n, a) for n in names for a in ("sm_80", "sm_90")}
    for r in rows:
        assert not r.get("error"), f"{r['case']} {r['arch']}: {r['error']}"
        arch_dir = out / r["arch"]
        assert (arch_dir / f"{r['case']}.ptx").stat().st_size > 0
        assert (arch_dir / f"{r['case']}.cubin").stat().st_size > 0


def test_no_spills(reports):
    _, rows, _ = reports
    spilled = [(r["case"], r["arch"], r["spill_stores_bytes"]) for r in rows if r["spill_stores_bytes"]]
    spilled += [(r["case"], r["arch"], r["spill_loads_bytes"]) for r in rows if r["spill_loads_bytes"]]
    assert not spilled, f"register spills: {spilled}"
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_gemms_use_tensor_cores(reports):
    _, rows, _ = reports
    missing = [(r["case"], r["arch"]) for r in rows if r["is_gemm"] and not r["tensor_cores"]]
    assert not missing, f"GEMMs without mma/wgmma in the PTX: {missing}"
    assert all(r["mma_sync"] > 0 for r in rows if r["is_gemm"] and r["arch"] == "sm_80")


def test_registry_is_one_line_per_module():
    assert aot.MODULES == sorted(set(aot.MODULES), key=aot.MODULES.index)
    cases = aot.collect_cases()
    assert len({c.name for c in cases}) == len(cases), "AOT case names must be unique"
    assert all(isinstance(c, aot.AotCase) for c in cases)


def test_problems_flag_spills_and_missing_tensor_cores():
    row = {"spill_stores_bytes": 8, "spill_loads_bytes": 8, "is_gemm": True, "tensor_cores": False}
    assert len(aot.problems(row)) == 2
