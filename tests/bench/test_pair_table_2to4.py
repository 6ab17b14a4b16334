"""bench/pair_table_2to4.py: the prototype's product equals F.linear's over row, column and chunk
tails, and what it assumes is refused before it indexes anything."""

import pytest
import torch
import torch.nn.functional as F

from sparsekit.kernels import compress_24
from tests.bench.conftest import bench_script, require_avx512_bf16


def test_k_not_a_multiple_of_8_and_odd_chunks_are_refused():
    bench = bench_script("pair_table_2to4")
    with pytest.raises(ValueError, match="multiple of 8"):
        bench.check_args(torch.zeros(2, 12), 4, 16)
    with pytest.raises(ValueError, match="C an even number"):
        bench.check_args(torch.zeros(2, 16), 4, 15)


@pytest.fixture(scope="module")
def prototype():
    """(the script as a module, its compiled kernel), built once for the module."""
    require_avx512_bf16("the prototype")
    bench = bench_script("pair_table_2to4")
    return bench, bench.build()


@pytest.mark.parametrize("n,k", [(37, 72), (64, 256)])
@pytest.mark.parametrize("m", [1, 17, 70])
@pytest.mark.parametrize("h,c", [(1, 2), (2, 6), (4, 16)])
def test_the_prototype_matches_f_linear(prototype, n, k, m, h, c):
    bench, ext = prototype
    w = bench.sparse_weight(n, k, seed=n + k)
    values, meta = compress_24(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    y = bench.pair_table_mm(ext, x, values, meta, h, c)
    ref = F.linear(x.float(), w.float())  # products exact in both; sums in fp32, y rounded to bf16
    torch.testing.assert_close(y.float(), ref, rtol=1.6e-2, atol=1e-2 * ref.abs().max().item())
