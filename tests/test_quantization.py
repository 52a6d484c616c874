"""cutlass_moe.quantization: int8 per-channel quantisation, the kernel layout, dequantisation
(CPU; one GPU-marked check that the GPU gives the same bits)."""

from __future__ import annotations

import pytest
import torch

from cutlass_moe import swap_w13_to_w31
from cutlass_moe.quantization import (
    INT8_MAX,
    dequantize,
    from_int8_kernel_layout,
    quantize_int8_per_channel,
    quantize_moe_weights_int8,
    to_int8_kernel_layout,
)


def _weights(shape, dtype, seed=0, scale=None):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * (scale or shape[-1] ** -0.5)
    return w.to(dtype)


def _assert_round_trip(w, q, scale):
    """|w - q*scale| <= scale/2 element-wise (exact products in float64; float32 division
    may be off by one ulp at a tie)."""
    assert q.dtype == torch.int8 and q.shape == w.shape and q.is_contiguous()
    assert scale.shape == w.shape[:-1]
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert int(q.min()) >= -INT8_MAX and int(q.max()) <= INT8_MAX
    s = scale.double().unsqueeze(-1)
    err = (w.double() - q.double() * s).abs()
    bound = s / 2 * (1 + 1e-6)
    worst = (err / s).max().item()
    assert (err <= bound).all(), f"worst |w - deq| / scale = {worst}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 64, 128), (3, 2 * 1408, 32), (48, 16), (2, 3, 8, 16)])
def test_round_trip_error_bound(dtype, shape):
    w = _weights(shape, dtype)
    q, scale = quantize_int8_per_channel(w)
    assert scale.dtype == dtype  # default: w's dtype
    _assert_round_trip(w, q, scale)
    # Every row uses the full range: its largest element maps to +-127.
    assert torch.equal(q.abs().amax(-1), torch.full_like(scale, INT8_MAX, dtype=torch.int8))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_float32_weights_with_activation_dtype_scales(scale_dtype):
    """float32 weights keep float32 scales by default; asking for the activation dtype rounds
    the scale first and quantises against the rounded one (the bound still holds)."""
    w = _weights((4, 32, 256), torch.float32, seed=1)
    _, s32 = quantize_int8_per_channel(w)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32, w.abs().amax(-1) / INT8_MAX, rtol=0, atol=0)
    q, scale = quantize_int8_per_channel(w, scale_dtype=scale_dtype)
    assert scale.dtype == scale_dtype
    _assert_round_trip(w, q, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_is_max_over_127_rounded_to_nearest(dtype):
    w = _weights((8, 64, 96), dtype, seed=2, scale=3.0)
    _, scale = quantize_int8_per_channel(w)
    assert torch.equal(scale, (w.float().abs().amax(-1) / INT8_MAX).to(dtype))


def test_subnormal_scale_is_raised_to_keep_the_bound():
    """An fp16 scale of 1.4 subnormal steps rounds to 1 step, which would map the row's maximum
    to ~178: the scale is raised to 2 steps instead."""
    step = 2.0**-24  # the smallest fp16 subnormal
    w = torch.tensor([[127 * 1.4 * step, -50 * step, 3 * step, 0.0]] * 8 + [[1.0, 0.5, 0, 0]] * 8)
    q, scale = quantize_int8_per_channel(w, scale_dtype=torch.float16)
    assert scale[0].item() == 2 * step and scale[8].item() == (torch.tensor(1 / 127).half()
                                                               .item())
    _assert_round_trip(w, q, scale)
    assert q[0, 0].item() == 89


def test_exact_values_and_round_to_nearest():
    w = torch.tensor([[127.0, -63.0, 0.4, 0.6, -0.4, 2.5], [0.0] * 6, [1.27, 0.0, 0.0, 0.0, 0.0,
                     -1.27]])
    q, scale = quantize_int8_per_channel(w)
    assert scale[0].item() == 1.0
    assert q[0].tolist() == [127, -63, 0, 1, 0, 2]  # ties go to even (2.5 -> 2)
    assert scale[1].item() == 1.0 and q[1].tolist() == [0] * 6  # all-zero row: scale 1
    assert q[2].tolist() == [127, 0, 0, 0, 0, -127]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_and_tiny_rows_give_finite_scales(dtype):
    w = _weights((2, 16, 32), dtype, seed=3)
    w[0, 3] = 0
    w[1] = 0  # a whole expert
    tiny = torch.finfo(dtype).tiny
    w[0, 5] = torch.linspace(-tiny, tiny, 32).to(dtype)  # subnormal-sized values
    w[0, 6, 0] = torch.finfo(dtype).max / 2  # and a huge one
    q, scale = quantize_int8_per_channel(w)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (scale[0, 3] == 1).item() and (scale[1] == 1).all()
    assert (q[0, 3] == 0).all() and (q[1] == 0).all()
    _assert_round_trip(w, q, scale)
    assert torch.isfinite(dequantize(q, scale)).all()


def test_non_contiguous_input():
    w = _weights((4, 64, 32), torch.bfloat16, seed=4).transpose(1, 2)  # [4, 32, 64], strided
    q, scale = quantize_int8_per_channel(w)
    q_ref, scale_ref = quantize_int8_per_channel(w.contiguous())
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_chunked_quantization_is_identical(monkeypatch):
    """Rows are quantised in chunks (to bound temporaries); chunk edges change nothing."""
    from cutlass_moe import quantization

    w = _weights((3, 100, 64), torch.bfloat16, seed=11)
    whole = quantize_int8_per_channel(w)
    monkeypatch.setattr(quantization, "_CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk
    chunked = quantize_int8_per_channel(w)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("w,scale_dtype,match", [
    (torch.zeros(4, 16, 16, dtype=torch.int8), None,
     "float16/bfloat16/float32/float64 weights, got torch.int8"),
    (torch.zeros(16), None, r"\[\.\.\., N, K\] with K >= 1, got shape \[16\]"),
    (torch.zeros(4, 0), None, r"got shape \[4, 0\]"),
    (torch.zeros(4, 16), torch.int8, "scale_dtype must be"),
    ([[1.0]], None, "got list"),
])
def test_quantize_errors(w, scale_dtype, match):
    with pytest.raises(ValueError, match=match):
        quantize_int8_per_channel(w, scale_dtype=scale_dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf"),
                                        (float("-inf"), "inf")])
def test_non_finite_rows_are_refused(dtype, value, word):
    """A NaN or inf weight would quantise its row to zeros with a NaN/inf scale: refused,
    naming the expert and row (the first one in order) and how many more there are."""
    w = _weights((4, 16, 32), dtype, seed=11)
    w[2, 5, 7] = value
    with pytest.raises(ValueError, match=rf"expert 2, row 5 of weights \[E, N, K\] = "
                                         rf"\[4, 16, 32\] holds {word}; int8 weights need "
                                         "finite values"):
        quantize_int8_per_channel(w)
    w[3, 0, 0] = value
    w[3, 1, 0] = value
    with pytest.raises(ValueError, match=r"expert 2, row 5 .* holds \w+ \(and 2 more rows\)"):
        quantize_int8_per_channel(w)


def test_non_finite_rows_other_ranks():
    w = torch.ones(8, 16)
    w[6, 0] = float("nan")
    with pytest.raises(ValueError, match=r"row 6 of weights \[N, K\] = \[8, 16\] holds NaN"):
        quantize_int8_per_channel(w)
    w = torch.ones(2, 3, 4, 16)
    w[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match=r"row weights\[1, 2, 3, :\] of shape "
                                         r"\[2, 3, 4, 16\] holds inf"):
        quantize_int8_per_channel(w)


def test_non_finite_rows_name_the_tensor():
    fc1 = _weights((2, 32, 64), torch.float16, seed=12)
    fc2 = _weights((2, 64, 16), torch.float16, seed=13)
    fc2[1, 9, 0] = float("nan")
    with pytest.raises(ValueError, match=r"expert 1, row 9 of fc2_expert_weights \[E, N, K\]"):
        quantize_moe_weights_int8(fc1, fc2)


def test_scale_overflowing_its_dtype_is_refused():
    w = torch.ones(2, 8, 16)
    w[1, 3, 2] = 1e30  # / 127 is far beyond float16's range
    with pytest.raises(ValueError, match=r"the scale of expert 1, row 3 .* overflows "
                                         r"torch.float16; pass a wider scale_dtype"):
        quantize_int8_per_channel(w, scale_dtype=torch.float16)
    _, scale = quantize_int8_per_channel(w)  # float32 scales hold it
    assert torch.isfinite(scale).all()


def test_dequantize():
    w = _weights((2, 16, 32), torch.bfloat16, seed=5)
    q, scale = quantize_int8_per_channel(w)
    deq = dequantize(q, scale)
    assert deq.dtype == torch.bfloat16 and deq.shape == w.shape
    exact = dequantize(q, scale, torch.float64)
    assert torch.equal(exact, q.double() * scale.double().unsqueeze(-1))
    assert torch.equal(deq, exact.to(torch.bfloat16))
    assert dequantize(q, scale, torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="needs int8 weights, got torch.bfloat16"):
        dequantize(w, scale)
    with pytest.raises(ValueError, match=r"scale \[\.\.\., N\] = \[2, 16\].*got \[2, 32\]"):
        dequantize(q, torch.ones(2, 32))


# ------------------------------------------------------------------ the kernel layout


def test_layout_helper_is_invertible():
    gen = torch.Generator().manual_seed(6)
    ordinary = torch.randint(-127, 128, (3, 48, 64), generator=gen, dtype=torch.int8)
    kernel = to_int8_kernel_layout(ordinary)
    assert kernel.dtype == torch.int8 and kernel.shape == (3, 48, 64) and kernel.is_contiguous()
    assert kernel.stride() == (48 * 64, 64, 1)  # [E, N, K] row-major: K contiguous
    back = from_int8_kernel_layout(kernel)
    assert torch.equal(back, ordinary)
    assert torch.equal(to_int8_kernel_layout(from_int8_kernel_layout(kernel)), kernel)
    # Non-contiguous ordinary weights ([E, K, N] storage viewed as [E, N, K]) come out contiguous.
    strided = ordinary.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    kernel2 = to_int8_kernel_layout(strided)
    assert kernel2.is_contiguous() and torch.equal(kernel2, kernel)
    assert torch.equal(from_int8_kernel_layout(kernel2), ordinary)


@pytest.mark.parametrize("w,match", [
    (torch.zeros(2, 16, 24, dtype=torch.int8),
     r"\[2, 16, 24\]: K=24 \(the contiguous dimension\) must be a multiple of 16"),
    (torch.zeros(2, 12, 32, dtype=torch.int8),
     r"int8 weights \[E, N, K\] = \[2, 12, 32\]: N=12 must be a multiple of 8"),
    (torch.zeros(16, 32, dtype=torch.int8), r"needs int8 weights \[E, N, K\], got shape \[16, 32\]"),
    (torch.zeros(2, 16, 32, dtype=torch.uint8), "needs int8 weights .*got torch.uint8"),
    (torch.zeros(2, 16, 32), "got torch.float32"),
])
def test_layout_helper_checks(w, match):
    with pytest.raises(ValueError, match=match):
        to_int8_kernel_layout(w)


def test_from_kernel_layout_checks():
    with pytest.raises(ValueError, match="from_int8_kernel_layout needs int8 weights"):
        from_int8_kernel_layout(torch.zeros(2, 16, 32))


def test_quantize_moe_weights_int8():
    fc1 = _weights((4, 2 * 48, 64), torch.float16, seed=7)
    fc2 = _weights((4, 64, 48), torch.float16, seed=8)
    q1, q2, (s1, s2) = quantize_moe_weights_int8(fc1, fc2)
    assert (q1.shape, q2.shape, s1.shape, s2.shape) == ((4, 96, 64), (4, 64, 48), (4, 96),
                                                         (4, 64))
    assert q1.is_contiguous() and q2.is_contiguous() and s1.dtype == s2.dtype == torch.float16
    _assert_round_trip(fc1, q1, s1)
    _assert_round_trip(fc2, q2, s2)
    _, _, (b1, _) = quantize_moe_weights_int8(fc1.float(), fc2.float(), torch.bfloat16)
    assert b1.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="K=40"):
        quantize_moe_weights_int8(fc1[:, :, :40], fc2)


def test_swap_w13_to_w31_with_int8_weights_and_scales():
    """Weights swap along dim=-2, fc31 scales along dim=-1; quantising commutes with it."""
    w13 = _weights((4, 2 * 32, 64), torch.bfloat16, seed=9)
    q13, s13 = quantize_int8_per_channel(w13)
    q31, s31 = swap_w13_to_w31(q13), swap_w13_to_w31(s13, dim=-1)
    q_ref, s_ref = quantize_int8_per_channel(swap_w13_to_w31(w13))
    assert torch.equal(q31, q_ref) and torch.equal(s31, s_ref)
    assert torch.equal(dequantize(q31, s31), swap_w13_to_w31(dequantize(q13, s13)))
    assert torch.equal(swap_w13_to_w31(s31, dim=-1), s13)  # its own inverse
    with pytest.raises(ValueError, match="even size along dim -1"):
        swap_w13_to_w31(torch.ones(4, 7), dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_matches_cpu(dtype):
    w = _weights((4, 256, 512), dtype, seed=10)
    w[0, 3] = 0
    q_cpu, s_cpu = quantize_int8_per_channel(w, scale_dtype=torch.bfloat16)
    q_gpu, s_gpu = quantize_int8_per_channel(w.cuda(), scale_dtype=torch.bfloat16)
    assert q_gpu.is_cuda and s_gpu.is_cuda
    assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
    assert torch.equal(dequantize(q_gpu, s_gpu).cpu(), dequantize(q_cpu, s_cpu))
    assert torch.equal(to_int8_kernel_layout(q_gpu).cpu(), q_cpu)
