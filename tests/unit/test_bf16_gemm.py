"""The bfloat16 GEMM kernel against float32 products of the same bfloat16 values, and where matmul uses it."""

import itertools

import pytest
import torch

from common.config import cpu_has_native_bf16
from common.kernels import bf16_gemm
from common.model.linear import matmul

needs_kernel = pytest.mark.skipif(
    not bf16_gemm.available(), reason="the kernel needs AVX-512 without bfloat16 units, and a compiler"
)


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 4, 9, 32])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (7, 15), (16, 16), (33, 17), (512, 160), (100, 513)])
def test_matches_float32_products_of_the_bfloat16_values(m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(k, n, generator=gen).bfloat16()
    # float32 rounding of sums in another order: a few ulps of terms whose size grows with k
    torch.testing.assert_close(bf16_gemm.mm(x, w), x @ w.float(), rtol=1e-5, atol=2e-6 * k)


@needs_kernel
def test_writes_into_a_row_slice_and_is_the_same_on_any_thread_count():
    """Each output element is summed in the same order whichever thread owns its columns."""
    x, w = torch.randn(6, 300), torch.randn(300, 700).bfloat16()
    out = torch.full((10, 700), float("nan"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_gemm.mm(x, w)
        torch.set_num_threads(2)
        bf16_gemm.mm(x, w, out=out[2:8])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[2:8], one)
    assert out[:2].isnan().all() and out[8:].isnan().all()


@needs_kernel
def test_grouped_matches_one_product_per_expert():
    """Experts with no rows, one row and many; every expert's rows times its own weight."""
    rows = [0, 3, 1, 0, 40, 2]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(rows), 96, generator=gen)
    w = torch.randn(len(rows), 96, 130, generator=gen).bfloat16()
    offsets = torch.tensor([0, *itertools.accumulate(rows)])
    want = torch.cat([x[a:b] @ w[e].float() for e, (a, b) in enumerate(itertools.pairwise(offsets.tolist()))])
    torch.testing.assert_close(bf16_gemm.grouped_mm(x, w, offsets), want, rtol=1e-5, atol=2e-6 * 96)


@needs_kernel
def test_grouped_rejects_offsets_that_do_not_cover_the_rows():
    x, w = torch.randn(5, 8), torch.randn(2, 8, 16).bfloat16()
    for bad in ([0, 2, 4], [0, 4, 2], [1, 2, 5], [0, 5]):
        with pytest.raises(RuntimeError, match="offsets"):
            bf16_gemm.grouped_mm(x, w, torch.tensor(bad))


@needs_kernel
def test_rejects_what_it_cannot_multiply():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="do not match"):
        bf16_gemm.mm(x, torch.randn(9, 4).bfloat16())
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        bf16_gemm.mm(x, torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="out must be"):
        bf16_gemm.mm(x, torch.randn(8, 4).bfloat16(), out=torch.empty(3, 4))


@pytest.mark.parametrize("rows", [1, bf16_gemm.MAX_ROWS, bf16_gemm.MAX_ROWS + 1])
def test_matmul_takes_the_kernel_up_to_max_rows(rows):
    x, w = torch.randn(rows, 64).bfloat16(), torch.randn(64, 48).bfloat16()
    used = bf16_gemm.available() and rows <= bf16_gemm.MAX_ROWS
    if used:
        want = bf16_gemm.mm(x, w).bfloat16()
    elif cpu_has_native_bf16() or rows == 1:
        want = x @ w
    else:
        want = (x.float() @ w.float()).bfloat16()
    assert torch.equal(matmul(x, w), want)
    assert bf16_gemm.suits(x, w, rows) == used
    assert not bf16_gemm.suits(x.float(), w.float(), rows)  # float32 stays with MKL
