"""cutlass_moe.int4: the int4 kernel layout (packing), group sizes, dequantisation and the
group-wise quantiser (CPU; one GPU-marked check that the GPU gives the same bits)."""

from __future__ import annotations

import pytest
import torch

from cutlass_moe import int4
from cutlass_moe.int4 import (
    INT4_GROUP_MULTIPLE,
    INT4_K_ALIGNMENT,
    INT4_N_ALIGNMENT,
    check_int4_layer,
    dequantize_int4,
    group_size_of,
    pack_int4,
    quantize_int4_groupwise,
    quantize_moe_weights_int4,
    unpack_int4,
)


def _weights(shape, dtype, seed=0, scale=None):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * (scale or shape[-1] ** -0.5)
    return w.to(dtype)


def _nibbles(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)


def _per_element(t, group, k):
    """``[.., K/G, N]`` group values -> ``[.., N, K]`` per element (float64)."""
    return t.double().transpose(-1, -2).repeat_interleave(group, dim=-1)[..., :k]


def _assert_bound(w, packed, scales, zeros, group):
    """|w - (q - z) * s| <= s/2 element-wise, exact products in float64 (the division is
    float32, so a tie may land one ulp either side)."""
    k = w.shape[-1]
    assert packed.dtype == torch.uint8 and packed.shape == (*w.shape[:-1], k // 2)
    assert packed.is_contiguous() and scales.is_contiguous()
    assert scales.shape == (*w.shape[:-2], k // group, w.shape[-2])
    assert torch.isfinite(scales).all() and (scales > 0).all()
    q = unpack_int4(packed).double()
    s = _per_element(scales, group, k)
    z = 8.0 if zeros is None else _per_element(zeros, group, k)
    err = (w.double() - (q - z) * s).abs()
    worst = (err / s).max().item()
    assert (err <= s / 2 * (1 + 1e-6)).all(), f"worst |w - deq| / scale = {worst}"


# ------------------------------------------------------------------ constants and packing


def test_constants():
    assert (INT4_K_ALIGNMENT, INT4_N_ALIGNMENT, INT4_GROUP_MULTIPLE) == (32, 8, 32)


def test_pack_layout_by_hand():
    q = torch.tensor([[1, 2, 15, 0, 7, 8], [0, 15, 3, 12, 9, 4]], dtype=torch.uint8)
    packed = pack_int4(q)
    # byte j = q[2j] (low nibble) | q[2j+1] << 4
    assert packed.tolist() == [[0x21, 0x0F, 0x87], [0xF0, 0xC3, 0x49]]
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("shape", [(64,), (3, 5, 64), (2, 96, 160), (0, 32), (4, 0)])
def test_pack_unpack_round_trip(shape):
    q = _nibbles(shape, seed=sum(shape))
    packed = pack_int4(q)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)
    # Every byte value decodes and re-encodes to itself.
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every)), every)


def test_pack_accepts_integer_dtypes_and_strided_input():
    q = _nibbles((6, 64), seed=3)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_int4(q.to(dtype)), pack_int4(q))
    strided = q.t().contiguous().t()
    assert not strided.is_contiguous()
    assert torch.equal(pack_int4(strided), pack_int4(q))


def test_unpack_reads_int8_as_bytes():
    packed = pack_int4(_nibbles((4, 32), seed=4))
    assert torch.equal(unpack_int4(packed.view(torch.int8)), unpack_int4(packed))


@pytest.mark.parametrize("q,match", [
    (torch.zeros(4, 8), r"pack_int4: q must be an integer tensor .* got torch.float32"),
    ([[1, 2]], "got list"),
    (torch.zeros(4, 7, dtype=torch.uint8), r"q \[\.\.\., K\] must have an even K .*\[4, 7\]"),
    (torch.tensor(3, dtype=torch.uint8), r"even K .*got shape \[\]"),
    (torch.tensor([[0, 16]], dtype=torch.uint8), r"q holds 16; int4 values must lie in 0\.\.15"),
    (torch.tensor([[-1, 3]], dtype=torch.int8), r"q holds -1; .*add 8 to signed values"),
])
def test_pack_errors(q, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(q)


def test_pack_error_names_the_argument():
    with pytest.raises(ValueError, match=r"pack_int4: up_proj holds 17"):
        pack_int4(torch.tensor([17, 0], dtype=torch.int32), name="up_proj")


@pytest.mark.parametrize("packed,match", [
    (torch.zeros(4, 8), r"unpack_int4: packed must be a uint8 tensor .*got torch.float32"),
    (torch.zeros(4, 8, dtype=torch.int32), "got torch.int32"),
    (torch.tensor(3, dtype=torch.uint8), "packed must be .*got a 0-d tensor"),
])
def test_unpack_errors(packed, match):
    with pytest.raises(ValueError, match=match):
        unpack_int4(packed)


# ------------------------------------------------------------------ group sizes


@pytest.mark.parametrize("k,groups,expected", [
    (256, 8, 32), (256, 4, 64), (256, 2, 128), (256, 1, 256), (96, 3, 32), (160, 5, 32),
    (96, 1, 96), (48, 1, 48), (192, 3, 64), (4096, 32, 128),
])
def test_group_size_of(k, groups, expected):
    assert group_size_of(k, torch.empty(groups, 8)) == expected
    assert group_size_of(k, torch.empty(3, groups, 8)) == expected  # [E, K/G, N]


@pytest.mark.parametrize("k,shape,match", [
    (64, (4, 8), r"scales \[\.\.\., K/G, N\] = \[4, 8\]: K / 4 groups: group size G = 16 is"),
    (64, (4, 8), r"G = 16 is not supported for K = 64: G must be a multiple of 32 that divides"),
    (96, (2, 8), "G = 48 is not supported for K = 96"),
    (96, (5, 8), r"\[5, 8\]: 5 groups do not divide K = 96"),
    (96, (0, 8), "0 groups do not divide K = 96"),
    (96, (8,), r"scales must be \[\.\.\., K/G, N\] .*got \[8\]"),
])
def test_group_size_of_errors(k, shape, match):
    with pytest.raises(ValueError, match=match):
        group_size_of(k, torch.empty(shape))


def test_group_size_of_names_the_argument():
    with pytest.raises(ValueError, match=r"^fc2 scales \[\.\.\., K/G, N\] = \[2, 4, 8\]"):
        group_size_of(64, torch.empty(2, 4, 8), name="fc2 scales")
    with pytest.raises(ValueError, match="fc2 scales must be .*got list"):
        group_size_of(64, [1.0], name="fc2 scales")


# ------------------------------------------------------------------ dequantisation


def test_dequantize_by_hand():
    """N = 2, K = 64, G = 32: every element written out in Python floats."""
    q = _nibbles((2, 64), seed=5)
    scales = torch.tensor([[0.5, -0.25], [0.125, 3.0]], dtype=torch.bfloat16)  # [K/G, N]
    zeros = torch.tensor([[0.0, 15.0], [7.0, 8.5]], dtype=torch.bfloat16)
    packed = pack_int4(q)
    sym = dequantize_int4(packed, scales)
    asym = dequantize_int4(packed, scales, zeros, torch.float32)
    assert sym.dtype == torch.bfloat16 and asym.dtype == torch.float32
    assert sym.shape == asym.shape == (2, 64)
    for n in range(2):
        for k in range(64):
            s, z = float(scales[k // 32, n]), float(zeros[k // 32, n])
            assert asym[n, k].item() == (int(q[n, k]) - z) * s
            assert sym[n, k].item() == (int(q[n, k]) - 8) * s  # exact in bf16 here


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3, 5])
def test_dequantize_rounds_once(dtype, groups):
    """[E, N, K/2] with scales that need every significant bit: the float64 value rounded once
    to the dtype (float32 is exact for a 5-bit integer times a 16-bit float)."""
    e, n, k = 3, 16, 32 * groups
    q = _nibbles((e, n, k), seed=6)
    gen = torch.Generator().manual_seed(6)
    scales = (torch.rand(e, groups, n, generator=gen) * 3).to(dtype)
    zeros = torch.randint(0, 16, (e, groups, n), generator=gen).to(dtype)
    exact = (q.double() - _per_element(zeros, 32, k)) * _per_element(scales, 32, k)
    packed = pack_int4(q)
    assert torch.equal(dequantize_int4(packed, scales, zeros), exact.to(dtype))
    assert torch.equal(dequantize_int4(packed, scales, zeros, torch.float64), exact)
    exact_sym = (q.double() - 8) * _per_element(scales, 32, k)
    assert torch.equal(dequantize_int4(packed, scales), exact_sym.to(dtype))
    # int8 storage is read as the same bytes; integer zeros are accepted.
    assert torch.equal(dequantize_int4(packed.view(torch.int8), scales, zeros.to(torch.uint8)),
                       exact.to(dtype))


def test_dequantize_per_channel():
    q = _nibbles((2, 8, 96), seed=7)
    scales = torch.rand(2, 1, 8).to(torch.float16)
    got = dequantize_int4(pack_int4(q), scales, dtype=torch.float64)
    assert torch.equal(got, (q.double() - 8) * scales.double().transpose(1, 2))


@pytest.mark.parametrize("packed,scales,zeros,match", [
    (torch.zeros(8, 16), torch.ones(1, 8), None, "packed must be a uint8 tensor"),
    (torch.zeros(16, dtype=torch.uint8), torch.ones(1, 8), None,
     r"packed must be \[N, K/2\] or \[E, N, K/2\], got shape \[16\]"),
    (torch.zeros(8, 16, dtype=torch.uint8), torch.ones(1, 16), None,
     r"scales must be \[K/G, N\] = \[K/G, 8\] for packed \[8, 16\], got \[1, 16\]"),
    (torch.zeros(2, 8, 16, dtype=torch.uint8), torch.ones(3, 1, 8), None,
     r"scales must be \[E, K/G, N\] = \[2, K/G, 8\] .*got \[3, 1, 8\]"),
    (torch.zeros(8, 16, dtype=torch.uint8), torch.ones(2, 8), None,
     "G = 16 is not supported for K = 32"),
    (torch.zeros(8, 16, dtype=torch.uint8), torch.ones(1, 8, dtype=torch.int32), None,
     "scales must be a float tensor, got torch.int32"),
    (torch.zeros(8, 16, dtype=torch.uint8), torch.ones(1, 8), torch.ones(8, 1),
     r"zeros must have the shape of scales \[1, 8\], got \[8, 1\]"),
])
def test_dequantize_errors(packed, scales, zeros, match):
    with pytest.raises(ValueError, match=match):
        dequantize_int4(packed, scales, zeros)


# ------------------------------------------------------------------ quantisation


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape,group", [
    ((4, 64, 256), 32), ((4, 64, 256), 64), ((2, 40, 256), 128), ((3, 24, 256), None),
    ((48, 96), 32), ((2, 16, 160), 32), ((16, 192), 64), ((2, 8, 96), 96),
])
def test_round_trip_error_bound(dtype, symmetric, shape, group):
    w = _weights(shape, dtype, seed=sum(shape))
    packed, scales, zeros = quantize_int4_groupwise(w, group, symmetric)
    g = shape[-1] if group is None else group
    assert scales.dtype == dtype  # default: w's dtype
    assert (zeros is None) == symmetric
    _assert_bound(w, packed, scales, zeros, g)
    q = unpack_int4(packed).to(torch.int64)
    if symmetric:
        # Each group reaches +7 or -8 at its extreme (the full range on the side that needs it).
        signed = (q - 8).view(*shape[:-1], shape[-1] // g, g)
        assert ((signed.amax(-1) == 7) | (signed.amin(-1) == -8)).all()
    else:
        assert zeros.dtype == dtype and zeros.shape == scales.shape and zeros.is_contiguous()
        assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
        grouped = q.view(*shape[:-1], shape[-1] // g, g)
        assert ((grouped.amin(-1) == 0) | (grouped.amax(-1) == 15)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_rules(dtype):
    """Symmetric: s = max(max/7, -min/8) rounded to nearest (normal values: never raised);
    asymmetric: s = (max(w,0) - min(w,0))/15 rounded up, and z = round(-min/s)."""
    w = _weights((4, 32, 128), dtype, seed=8, scale=3.0)
    groups = w.float().view(4, 32, 4, 32)
    hi, lo = groups.amax(-1).double(), groups.amin(-1).double()
    _, scales, _ = quantize_int4_groupwise(w, 32)
    expected = torch.maximum(hi.clamp_min(0) / 7, -lo.clamp_max(0) / 8).to(dtype)
    assert torch.equal(scales, expected.transpose(1, 2))
    _, scales, zeros = quantize_int4_groupwise(w, 32, symmetric=False)
    span = hi.clamp_min(0) - lo.clamp_max(0)
    nearest = (span / 15).to(dtype)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    expected = torch.where(nearest.double() * 15 < span, up, nearest)
    assert (expected != nearest).any() and (expected == nearest).any()  # both cases occur
    assert torch.equal(scales, expected.transpose(1, 2))
    z = (-lo.clamp_max(0) / expected.double()).round().clamp(0, 15)
    assert torch.equal(zeros, z.to(dtype).transpose(1, 2))


def test_exact_values_and_round_to_nearest():
    row = [7.0, -8.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.25] + [0.0] * 24
    w = torch.tensor([row, [-x for x in row]])
    packed, scales, zeros = quantize_int4_groupwise(w, 32)
    assert zeros is None and scales[0].tolist() == [1.0, torch.tensor(8 / 7).item()]
    signed = unpack_int4(packed).to(torch.int64) - 8
    assert signed[0, :8].tolist() == [7, -8, 0, 2, 2, 0, -2, 3]  # ties go to even
    assert signed[1, :8].tolist() == [-6, 7, 0, -1, -2, 0, 2, -3]  # 8 / (8/7) = 7: no clip
    packed, scales, zeros = quantize_int4_groupwise(w[:1], 32, symmetric=False)
    assert scales[0, 0].item() == 1.0 and zeros[0, 0].item() == 8.0
    assert (unpack_int4(packed)[0, :8].to(torch.int64) - 8).tolist() == [7, -8, 0, 2, 2, 0, -2, 3]


def test_asymmetric_one_signed_groups():
    """Only positive (or only negative) values: 0 stays representable (z = 0 or 15)."""
    w = torch.cat([torch.linspace(0.5, 3.0, 32), -torch.linspace(0.5, 3.0, 32)]).view(2, 32)
    packed, scales, zeros = quantize_int4_groupwise(w, 32, symmetric=False)
    assert zeros[0].tolist() == [0.0, 15.0]
    assert scales[0].tolist() == [torch.tensor(0.2).item()] * 2  # float32 0.2 is above 0.2
    _assert_bound(w, packed, scales, zeros, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_zero_and_tiny_groups_give_finite_scales(dtype, symmetric):
    w = _weights((2, 16, 64), dtype, seed=9)
    w[0, 3] = 0  # a whole row (both groups)
    w[1, :, 32:] = 0  # one group of every row of an expert
    tiny = torch.finfo(dtype).tiny
    w[0, 5, :32] = torch.linspace(-tiny, tiny, 32).to(dtype)  # subnormal-sized values
    w[0, 6, 0] = torch.finfo(dtype).max / 16  # and a huge one
    packed, scales, zeros = quantize_int4_groupwise(w, 32, symmetric)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert (scales[0, :, 3] == 1).all() and (scales[1, 1] == 1).all()
    deq = dequantize_int4(packed, scales, zeros, torch.float64)
    assert (deq[0, 3] == 0).all() and (deq[1, :, 32:] == 0).all()
    assert torch.isfinite(deq).all()
    _assert_bound(w, packed, scales, zeros, 32)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_subnormal_scale_is_raised_to_keep_the_bound(symmetric):
    """An fp16 scale of 1.4 subnormal steps rounds down to 1 step, which would put the group's
    maximum at 9.8 steps (clipped to 7): the scale is raised to 2 steps instead."""
    step = 2.0**-24  # the smallest fp16 subnormal
    span = 7 if symmetric else 15
    w = torch.zeros(2, 32)
    w[0, 0] = span * 1.4 * step
    w[0, 1] = 2 * step
    w[1, 0] = 0.4 * step  # the exact scale underflows to 0: raised to one step
    packed, scales, zeros = quantize_int4_groupwise(w, 32, symmetric, scale_dtype=torch.float16)
    assert scales[0].tolist() == [2 * step, step]
    _assert_bound(w, packed, scales, zeros, 32)


def test_float32_weights_keep_float32_scales_unless_asked():
    w = _weights((4, 32, 256), torch.float32, seed=10)
    _, s32, _ = quantize_int4_groupwise(w, 64)
    assert s32.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        for symmetric in (True, False):
            packed, scales, zeros = quantize_int4_groupwise(w, 64, symmetric, scale_dtype=dtype)
            assert scales.dtype == dtype and (zeros is None or zeros.dtype == dtype)
            _assert_bound(w, packed, scales, zeros, 64)


def test_symmetric_quantisation_is_idempotent():
    w = _weights((3, 32, 128), torch.bfloat16, seed=11)
    packed, scales, _ = quantize_int4_groupwise(w, 32)
    deq = dequantize_int4(packed, scales, dtype=torch.float32)  # exact
    again = quantize_int4_groupwise(deq, 32, scale_dtype=torch.bfloat16)
    assert torch.equal(again[0], packed) and torch.equal(again[1], scales)


def test_non_contiguous_input():
    w = _weights((4, 128, 64), torch.bfloat16, seed=12).transpose(1, 2)  # [4, 64, 128], strided
    for symmetric in (True, False):
        got = quantize_int4_groupwise(w, 64, symmetric)
        ref = quantize_int4_groupwise(w.contiguous(), 64, symmetric)
        assert all(a is b or torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_chunked_quantization_is_identical(monkeypatch, symmetric):
    """Rows are quantised in chunks (to bound temporaries); chunk edges change nothing."""
    w = _weights((3, 100, 96), torch.bfloat16, seed=13)
    whole = quantize_int4_groupwise(w, 32, symmetric)
    monkeypatch.setattr(int4, "_CHUNK_ELEMENTS", 96 * 7)  # 7 rows per chunk
    chunked = quantize_int4_groupwise(w, 32, symmetric)
    assert all(a is b or torch.equal(a, b) for a, b in zip(whole, chunked))


@pytest.mark.parametrize("w,kwargs,match", [
    (torch.zeros(4, 64, dtype=torch.int8), {}, "weights must be float16/.* got torch.int8"),
    ([[1.0]], {}, "got list"),
    (torch.zeros(64), {}, r"\[N, K\] or \[E, N, K\] with an even K >= 2, got shape \[64\]"),
    (torch.zeros(2, 2, 4, 64), {}, r"got shape \[2, 2, 4, 64\]"),
    (torch.zeros(4, 63), {"group_size": None}, r"got shape \[4, 63\]"),
    (torch.zeros(4, 0), {}, r"got shape \[4, 0\]"),
    (torch.zeros(4, 64), {"group_size": 16}, r"group_size for weights \[4, 64\]: the group"),
    (torch.zeros(4, 64), {"group_size": 16}, "size G = 16 is not supported for K = 64"),
    (torch.zeros(4, 96), {"group_size": 64}, "G = 64 is not supported for K = 96"),
    (torch.zeros(4, 96), {"group_size": 128}, "G = 128 is not supported for K = 96"),
    (torch.zeros(4, 64), {"group_size": 0}, "group_size must be a positive int or None"),
    (torch.zeros(4, 64), {"group_size": 32.0}, "got 32.0"),
    (torch.zeros(4, 64), {"group_size": True}, "got True"),
    (torch.zeros(4, 64), {"group_size": 32, "scale_dtype": torch.int8}, "scale_dtype must be"),
])
def test_quantize_errors(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_int4_groupwise(w, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf"),
                                        (float("-inf"), "inf")])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_non_finite_groups_are_refused(dtype, value, word, symmetric):
    """A NaN or inf weight would give its group a NaN/inf scale: refused, naming the expert, row
    and k range (the first in order) and how many more rows hold one."""
    w = _weights((4, 16, 128), dtype, seed=14)
    w[2, 5, 70] = value
    with pytest.raises(ValueError, match=rf"quantize_int4_groupwise: expert 2, row 5, k 64\.\.95 "
                                         rf"of weights \[E, N, K\] = \[4, 16, 128\] holds {word}; "
                                         "int4 weights need finite values"):
        quantize_int4_groupwise(w, 32, symmetric)
    w[3, 0, 0] = value
    w[3, 1, 127] = value
    with pytest.raises(ValueError, match=r"expert 2, row 5, .* holds \w+ \(and 2 more rows\)"):
        quantize_int4_groupwise(w, 32, symmetric)


def test_non_finite_rows_2d_and_names():
    w = torch.ones(8, 64)
    w[6, 40] = float("nan")
    with pytest.raises(ValueError, match=r"row 6, k 0\.\.63 of weights \[N, K\] = \[8, 64\] "
                                         "holds NaN"):
        quantize_int4_groupwise(w, None)
    fc1 = _weights((2, 32, 64), torch.float16, seed=15)
    fc2 = _weights((2, 64, 32), torch.float16, seed=16)
    fc2[1, 9, 0] = float("inf")
    with pytest.raises(ValueError, match=r"expert 1, row 9, k 0\.\.31 of fc2_expert_weights"):
        quantize_moe_weights_int4(fc1, fc2, 32)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_scale_overflowing_its_dtype_is_refused(symmetric):
    w = torch.ones(2, 8, 64)
    w[1, 3, 40] = 1e30
    with pytest.raises(ValueError, match=r"the scale of expert 1, row 3, k 32\.\.63 of weights "
                                         r".* overflows torch.float16; pass a wider scale_dtype"):
        quantize_int4_groupwise(w, 32, symmetric, scale_dtype=torch.float16)
    _, scales, _ = quantize_int4_groupwise(w, 32, symmetric)  # float32 scales hold it
    assert torch.isfinite(scales).all()


# ------------------------------------------------------------------ a whole layer


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_moe_weights_int4(symmetric):
    fc1 = _weights((4, 2 * 96, 160), torch.bfloat16, seed=17)
    fc2 = _weights((4, 160, 96), torch.bfloat16, seed=18)
    p1, p2, quant = quantize_moe_weights_int4(fc1, fc2, 32, symmetric)
    assert (p1.shape, p2.shape) == ((4, 192, 80), (4, 160, 48))
    assert len(quant) == (2 if symmetric else 4)
    assert quant[0].shape == (4, 5, 192) and quant[1].shape == (4, 3, 160)
    assert check_int4_layer(p1, p2, quant) == (32, 32)
    _assert_bound(fc1, p1, quant[0], None if symmetric else quant[2], 32)
    _assert_bound(fc2, p2, quant[1], None if symmetric else quant[3], 32)
    # Per GEMM group sizes: per-channel fc1, groups of 32 for fc2.
    p1, p2, quant = quantize_moe_weights_int4(fc1, fc2, (None, 32), symmetric)
    assert check_int4_layer(p1, p2, quant) == (160, 32)
    _, _, quant = quantize_moe_weights_int4(fc1.float(), fc2.float(), 32, symmetric,
                                            scale_dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in quant)


def test_quantize_moe_weights_int4_alignment():
    fc1 = _weights((2, 2 * 48, 96), torch.float16, seed=19)
    fc2 = _weights((2, 96, 48), torch.float16, seed=20)
    with pytest.raises(ValueError, match="I = 48 must be a multiple of 32"):
        quantize_moe_weights_int4(fc1, fc2, None)
    with pytest.raises(ValueError, match="group_size must be an int, None or a pair"):
        quantize_moe_weights_int4(fc1, fc2, (32, 32, 32))


def _layer(e=2, n1=64, h=96, i=32, g1=32, g2=32, dtype=torch.bfloat16, zeros=False):
    p1 = torch.zeros(e, n1, h // 2, dtype=torch.uint8)
    p2 = torch.zeros(e, h, i // 2, dtype=torch.uint8)
    s1 = torch.ones(e, h // g1, n1, dtype=dtype)
    s2 = torch.ones(e, i // g2, h, dtype=dtype)
    return p1, p2, [s1, s2] + ([s1.clone(), s2.clone()] if zeros else [])


def test_check_int4_layer():
    assert check_int4_layer(*_layer()) == (32, 32)
    assert check_int4_layer(*_layer(g1=96, zeros=True)) == (96, 32)
    p1, p2, quant = _layer(dtype=torch.float16)
    assert check_int4_layer(p1.view(torch.int8), p2.view(torch.int8), quant) == (32, 32)


def _broken(change):
    p1, p2, quant = _layer(zeros=True)
    return change(p1, p2, quant)


@pytest.mark.parametrize("args,match", [
    (_layer(h=80), "H = 80 must be a multiple of 32"),
    (_layer(i=48, g2=48), "I = 48 must be a multiple of 32"),
    (_layer(n1=68), r"N1 \(fc1's rows\) = 68 must be a multiple of 8"),
    (_layer(dtype=torch.float32), "fc31_scales must be float16/bfloat16 .*got torch.float32"),
    (_broken(lambda p1, p2, q: (p1.float(), p2, q)), "fc1_weights must be a uint8 tensor"),
    (_broken(lambda p1, p2, q: (p1[0], p2, q)), r"fc1_weights \[E, N1, H/2\] must be 3-D"),
    (_broken(lambda p1, p2, q: (p1, p2[:, :64], q)),
     r"fc2_weights must be \[E, H, I/2\] = \[2, 96, I/2\]"),
    (_broken(lambda p1, p2, q: (p1, p2, q[:3])), "quant_scales must be"),
    (_broken(lambda p1, p2, q: (p1, p2, [q[0][:, :, :8], *q[1:]])),
     r"fc31_scales must be \[E, K/G, N\] = \[2, 96/G, 64\], got \[2, 3, 8\]"),
    (_broken(lambda p1, p2, q: (p1, p2, [q[0], q[1][:, :, :, None], *q[2:]])),
     r"fc2_scales must be \[E, K/G, N\]"),
    (_broken(lambda p1, p2, q: (p1, p2, [q[0][:, :2], *q[1:]])),
     "check_int4_layer: fc31_scales .*G = 48 is not supported for K = 96"),
    (_broken(lambda p1, p2, q: (p1, p2, [q[0], q[1].half(), *q[2:]])),
     "fc2_scales is torch.float16 but fc31_scales is torch.bfloat16; use one dtype"),
    (_broken(lambda p1, p2, q: (p1, p2, [*q[:3], q[3].half()])),
     r"fc2_zeros must match fc2_scales \(torch.bfloat16 \[2, 1, 96\]\), got torch.float16"),
    (_broken(lambda p1, p2, q: (p1, p2, [*q[:2], q[2][:, :1], q[3]])),
     r"fc31_zeros must match fc31_scales .*got torch.bfloat16 \[2, 1, 64\]"),
])
def test_check_int4_layer_errors(args, match):
    with pytest.raises(ValueError, match=match):
        check_int4_layer(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gpu_matches_cpu(symmetric):
    w = _weights((4, 256, 512), torch.float32, seed=21)
    w[0, 3] = 0
    cpu = quantize_int4_groupwise(w, 128, symmetric, scale_dtype=torch.bfloat16)
    gpu = quantize_int4_groupwise(w.cuda(), 128, symmetric, scale_dtype=torch.bfloat16)
    assert gpu[0].is_cuda and gpu[1].is_cuda
    assert all(a is b or torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    assert torch.equal(dequantize_int4(*gpu).cpu(), dequantize_int4(*cpu))
    assert torch.equal(unpack_int4(gpu[0]).cpu(), unpack_int4(cpu[0]))
