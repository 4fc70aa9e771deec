"""The bfloat16 GEMM kernel against float32 products of the same bfloat16 values, and where matmul uses it."""

import pytest
import torch

from common.checkpoint import param_targets
from common.config import cpu_has_native_bf16
from common.kernels import bf16_gemm, strips
from common.model import linear
from common.model.linear import Linear, matmul, pack

needs_kernel = pytest.mark.skipif(
    not bf16_gemm.available(), reason="the kernel needs AVX-512 or AVX2 and a compiler"
)


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 4, 6, 9, 32, 130])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (7, 15), (16, 16), (33, 17), (512, 160), (100, 513)])
def test_matches_float32_products_of_the_bfloat16_values(m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(k, n, generator=gen).bfloat16()
    # float32 rounding of sums in another order: a few ulps of terms whose size grows with k
    torch.testing.assert_close(bf16_gemm.mm(x, w), x @ w.float(), rtol=1e-5, atol=2e-6 * k)


@needs_kernel
def test_is_the_same_on_any_thread_count():
    """Each output element is summed in the same order whichever thread owns its columns."""
    x, w = torch.randn(6, 300), torch.randn(300, 700).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_gemm.mm(x, w)
        torch.set_num_threads(2)
        two = bf16_gemm.mm(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_a_row_gets_the_same_bits_whatever_rows_it_comes_with():
    """Batch invariance: a sequence's logits do not depend on how many others share its step."""
    x, w = torch.randn(70, 300), torch.randn(300, 200).bfloat16()
    alone = torch.cat([bf16_gemm.mm(x[i : i + 1], w) for i in range(0, 70, 23)])
    assert torch.equal(bf16_gemm.mm(x, w)[::23], alone)


@needs_kernel
def test_takes_bfloat16_and_strided_rows_and_answers_in_their_dtype():
    """x [..., K] of any layout with unit stride in K; the result comes back in x's dtype and shape."""
    x, w = torch.randn(2, 5, 200)[:, :, :96].bfloat16(), torch.randn(96, 40).bfloat16()
    out = bf16_gemm.mm(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 40)
    torch.testing.assert_close(out, (x.float() @ w.float()).bfloat16())  # within bfloat16 rounding
    assert torch.equal(out, bf16_gemm.mm(x.float(), w).bfloat16())  # the kernel rounds as torch does


@needs_kernel
def test_batched_matches_one_product_per_entry():
    """MLA's absorbed products: one weight per head, the heads' rows in a transposed view."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 8, 64, generator=gen).transpose(0, 1)  # [H=8, T=7, K]
    w = torch.randn(8, 64, 130, generator=gen).bfloat16()
    torch.testing.assert_close(bf16_gemm.bmm(x, w), x @ w.float(), rtol=1e-5, atol=2e-6 * 64)


@needs_kernel
def test_rejects_what_it_cannot_multiply():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="do not match"):
        bf16_gemm.mm(x, torch.randn(9, 4).bfloat16())
    with pytest.raises(ValueError, match="must be bfloat16"):
        bf16_gemm.mm(x, torch.randn(8, 4))
    with pytest.raises(ValueError, match="must be float32 or bfloat16"):
        bf16_gemm.mm(x.double(), torch.randn(8, 4).bfloat16())
    with pytest.raises(ValueError, match="do not match"):
        bf16_gemm.bmm(torch.randn(3, 2, 8), torch.randn(2, 8, 4).bfloat16())


@pytest.mark.parametrize("rows", [1, bf16_gemm.ROW_MAJOR_MAX_ROWS, bf16_gemm.ROW_MAJOR_MAX_ROWS + 1])
def test_matmul_takes_the_kernel_up_to_max_rows(rows):
    """A weight kept [in, out]: the kernel up to ROW_MAJOR_MAX_ROWS (a packed one's limit, MAX_ROWS, is
    test_a_packed_weight_gives_the_same_bits')."""
    x, w = torch.randn(rows, 64).bfloat16(), torch.randn(64, 48).bfloat16()
    used = bf16_gemm.available() and rows <= bf16_gemm.ROW_MAJOR_MAX_ROWS
    if used:
        want = bf16_gemm.mm(x, w)
    elif cpu_has_native_bf16() or rows == 1:
        want = x @ w
    else:
        want = (x.float() @ w.float()).bfloat16()
    assert torch.equal(matmul(x, w), want)
    assert bf16_gemm.suits(x, w, rows) == used
    assert not bf16_gemm.suits(x.float(), w.float(), rows)  # float32 stays with MKL


@pytest.mark.parametrize("rows", [1, 7, 40, 200, bf16_gemm.MAX_ROWS + 1])
def test_a_packed_weight_gives_the_same_bits(rows):
    """pack's strip order (csrc/gemm_strips.h): strips for a few rows, panels widened from the strips for
    more, torch's GEMM on the weight made row-major again past MAX_ROWS (kept so where the CPU has bfloat16
    units); every sum in the same order as [in, out]. In tile order (AMX), the unit's order: the same
    products up to the rounding of the outputs."""
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=gen).bfloat16(), torch.randn(96, 160, generator=gen).bfloat16()
    packed = pack(w)
    assert strips.in_strip_order(packed) == bf16_gemm.available()
    kept = getattr(packed, "rows_major", None)
    assert (kept is not None) == (bf16_gemm.available() and cpu_has_native_bf16())
    assert kept is None or torch.equal(kept, w)
    if strips.in_tile_order(packed):
        torch.testing.assert_close(matmul(x, packed), matmul(x, w), rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(matmul(x, packed), matmul(x, w))
    assert pack(w[:, :150]).shape == (96, 150)  # not a whole number of strips: kept as it is
    assert pack(w.float()).dtype == torch.float32 and pack(w.float()).dim() == 2


@needs_kernel
@pytest.mark.parametrize("rows", [1, 7, 40, 257])
def test_packed_weights_per_head_give_the_same_bits(rows):
    """MLA's absorbed products (a weight per head) in strip order: the heads as the grouped product's experts,
    each sum in the same order as [in, out]; one head is a projection's packed weight. In tile order (AMX)
    the unit sums in its own order: the same products up to the rounding of the outputs."""
    gen = torch.Generator().manual_seed(rows)
    for heads in (4, 1):
        x = torch.randn(rows, heads, 64, generator=gen).bfloat16().transpose(0, 1)  # as MLA's queries come
        w = torch.randn(heads, 64, 96, generator=gen).bfloat16()
        packed = pack(w)
        if strips.in_tile_order(packed):
            assert packed.shape == (heads, 3, 32, 64)
            torch.testing.assert_close(matmul(x, packed), matmul(x, w), rtol=1e-2, atol=1e-2)
        else:
            assert packed.shape == (heads, 3, 64, 32)
            assert torch.equal(matmul(x, packed), matmul(x, w))


@needs_kernel
def test_a_packed_linear_takes_no_checkpoint_tensor():
    layer = Linear(96, 64)
    layer.weight_t.data = torch.randn(96, 64).bfloat16()
    assert layer.weight.shape == (64, 96)
    layer.pack()
    with pytest.raises(ValueError, match="packed in strip order"):
        layer.weight  # noqa: B018
    with pytest.raises(ValueError, match="packed in strip order"):
        list(param_targets(torch.nn.ModuleDict({"o_proj": layer}), "model.layers.0.self_attn"))


@pytest.mark.parametrize("shape", [(17, 64), (2, 50, 64), (64, 64), (3, 130, 64)])
def test_row_buckets_give_the_product_of_the_rows_asked(shape):
    """Zero rows pad x to a multiple of ROW_BUCKET; what comes back is x @ w, shaped as x."""
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen).bfloat16()
    per_head = len(shape) == 3 and shape[0] == 3  # a weight per head: [H, T, K] @ [H, K, N]
    w = torch.randn(*((3,) if per_head else ()), 64, 48, generator=gen).bfloat16()
    got = linear.in_row_buckets(x, w, per_head)
    assert got.shape == (*shape[:-1], 48)
    torch.testing.assert_close(got.float(), (x.float() @ w.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1, bf16_gemm.MAX_ROWS + 1, 200])
def test_half_products_go_to_row_buckets_on_bfloat16_units_only(monkeypatch, rows):
    calls = []
    bucketed = linear.in_row_buckets
    monkeypatch.setattr(linear, "in_row_buckets", lambda *a: calls.append(a) or bucketed(*a))
    x, w = torch.randn(rows, 64).bfloat16(), torch.randn(64, 40).bfloat16()  # 40 columns: never packed
    matmul(x, w)
    assert len(calls) == (cpu_has_native_bf16() and not bf16_gemm.suits(x, w, rows))
    matmul(x.float(), w.float())
    assert len(calls) == (cpu_has_native_bf16() and not bf16_gemm.suits(x, w, rows))
