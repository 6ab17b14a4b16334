"""bench/quant_paths.py: --isas is checked before any timing and adds the forced 2:4-int8 kernels."""

import pytest
import torch

from tests.bench.conftest import bench_script
from tests.conftest import TOL, require_cpu_extension


def test_an_unknown_isa_is_refused_before_timing(capsys, monkeypatch):
    bench = bench_script("quant_paths")
    monkeypatch.setattr(bench, "time_cpu_interleaved", lambda *a, **k: pytest.fail("timed a path"))
    monkeypatch.setattr("sys.argv", ["quant_paths.py", "--isas", "scalar,sse9"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--isas: unknown CPU ISA 'sse9'" in capsys.readouterr().err


def test_each_isa_adds_its_forced_kernel_and_the_tiles_run():
    require_cpu_extension()
    bench = bench_script("quant_paths")
    w = torch.randn(48, 64) / 8  # N a multiple of 16: the int4 candidate packs it
    x = torch.randn(3, 64).bfloat16()
    fns = bench.candidates(w, x, ("scalar",))
    forced, tiles = fns["2:4-int8 sparsekit mm24_q8 @scalar"](), fns["2:4-int8 sparsekit mm24_q8_blas"]()
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(forced, fns["2:4-int8 decompress + GEMM"](), rtol=rtol, atol=atol)
    torch.testing.assert_close(tiles, forced, rtol=rtol, atol=atol)
