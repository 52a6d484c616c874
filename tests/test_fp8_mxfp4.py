"""cutlass_moe.fp8 and cutlass_moe.mxfp4: the e4m3, e2m1 and e8m0 codes, dequantisation, the
quantisers (group-wise and 128x128-block FP8, OCP MXFP4) and layer checks (CPU; one GPU-marked
check that the GPU gives the same bits).

Expected values are written out here from the format definitions (Python floats, tables typed
in from the OCP MX v1.0 spec), never computed with the library's code.
"""

from __future__ import annotations

import math

import pytest
import torch

from cutlass_moe import fp8, mxfp4
from cutlass_moe.fp8 import (
    FP8_E4M3_MAX,
    check_fp8_layer,
    check_no_fp8_nan,
    dequantize_fp8,
    e4m3_to_float,
    expand_block_scales,
    quantize_fp8_blockwise,
    quantize_fp8_groupwise,
    quantize_moe_weights_fp8,
)
from cutlass_moe.int4 import pack_int4, unpack_int4
from cutlass_moe.mxfp4 import (
    check_mxfp4_layer,
    dequantize_mxfp4,
    e2m1_to_float,
    e8m0_to_float,
    quantize_moe_weights_mxfp4,
    quantize_mxfp4,
)

F8 = torch.float8_e4m3fn
#: OCP MX v1.0, table 5 (FP4 E2M1): codes 0b0000..0b0111; 0b1xxx are the negatives.
OCP_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _weights(shape, dtype, seed=0, scale=None):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * (scale or shape[-1] ** -0.5)
    return w.to(dtype)


def _fp8_codes(shape, seed):
    """Random e4m3 codes without the NaN codes 0x7F/0xFF, as float8_e4m3fn."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 254, shape, generator=gen, dtype=torch.int32)
    codes = torch.where(codes >= 0x7F, codes + 1, codes)  # skip 0x7F; 0xFF is never drawn
    return codes.to(torch.uint8).view(F8)


def _e4m3_by_formula(code):
    """The e4m3fn value of one byte, from the definition (s eeee mmm, bias 7)."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * (m / 8) * 2.0**-6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def _per_element(t, group, k):
    """``[.., K/G, N]`` group values -> ``[.., N, K]`` per element (float64)."""
    return t.double().transpose(-1, -2).repeat_interleave(group, dim=-1)[..., :k]


# ------------------------------------------------------------------ e4m3


def test_constants():
    assert (fp8.FP8_K_ALIGNMENT, fp8.FP8_N_ALIGNMENT, fp8.FP8_GROUP_MULTIPLE) == (32, 8, 32)
    assert FP8_E4M3_MAX == 448.0 and fp8.DEEPSEEK_BLOCK == (128, 128)
    assert (mxfp4.MXFP4_BLOCK, mxfp4.MXFP4_K_ALIGNMENT, mxfp4.MXFP4_N_ALIGNMENT) == (32, 32, 16)
    assert (mxfp4.E8M0_BIAS, mxfp4.E8M0_NAN, mxfp4.E2M1_EMAX) == (127, 255, 2)
    assert list(mxfp4.E2M1_VALUES) == OCP_E2M1


def test_e4m3_every_code():
    """All 256 codes: the bit-level decoder, torch's float8_e4m3fn conversion and the formula
    agree on the 254 finite ones; 0x7F and 0xFF are NaN."""
    codes = torch.arange(256, dtype=torch.uint8)
    ours = e4m3_to_float(codes)
    torchs = codes.view(F8).to(torch.float32)
    assert ours.dtype == torch.float32
    nan = torch.isnan(torchs)
    assert nan.nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert torch.isnan(ours[nan]).all()
    assert torch.equal(ours[~nan], torchs[~nan])
    for code in range(256):
        expected = _e4m3_by_formula(code)
        if math.isnan(expected):
            assert code in (0x7F, 0xFF)
        else:
            assert ours[code].item() == expected, hex(code)
    # Landmarks: max 448, min normal 2^-6, min subnormal 2^-9, 1.0, -0.
    assert [ours[c].item() for c in (0x7E, 0x08, 0x01, 0x38, 0xFE)] == [448.0, 2.0**-6,
                                                                        2.0**-9, 1.0, -448.0]
    assert ours[0x80].item() == 0.0 and math.copysign(1, ours[0x80].item()) == -1
    # float8 input is read as its bytes.
    assert torch.equal(e4m3_to_float(codes.view(F8))[~nan], ours[~nan])


def test_e4m3_to_float_errors():
    with pytest.raises(ValueError, match="codes must be uint8 .* or float8_e4m3fn, got "
                                         "torch.float32"):
        e4m3_to_float(torch.zeros(3))


def test_check_no_fp8_nan():
    w = _fp8_codes((4, 64), seed=1)
    check_no_fp8_nan(w, "ok")
    bad = w.view(torch.uint8).clone()
    bad[2, 7], bad[3, 0] = 0x7F, 0xFF
    with pytest.raises(ValueError, match=r"up\.weight \[4, 64\] holds the e4m3 NaN code "
                                         r"\(0x7F/0xFF\) at \[2, 7\] and 1 more places"):
        check_no_fp8_nan(bad.view(F8), "up.weight")
    with pytest.raises(ValueError, match=r"w must be float8_e4m3fn, got uint8 \[4, 64\]"):
        check_no_fp8_nan(bad, "w")


# ------------------------------------------------------------------ FP8 dequantisation


def test_dequantize_fp8_by_hand():
    """N = 2, K = 64, G = 32: every element is v * s in Python floats (exact here)."""
    v = _fp8_codes((2, 64), seed=2)
    scales = torch.tensor([[0.5, -0.25], [0.125, 3.0]])  # [K/G, N] float32
    got = dequantize_fp8(v, scales)
    assert got.dtype == torch.float32 and got.shape == (2, 64)
    for n in range(2):
        for k in range(64):
            value = _e4m3_by_formula(int(v.view(torch.uint8)[n, k]))
            assert got[n, k].item() == value * float(scales[k // 32, n])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("groups", [1, 3, 5])
def test_dequantize_fp8_product_then_one_rounding(dtype, groups):
    """[E, N, K] with float32 scales that need all 24 bits: the float32 product (as the kernels
    form it) rounded to the dtype; float64 results are the exact products."""
    e, n, k = 3, 16, 32 * groups
    v = _fp8_codes((e, n, k), seed=3)
    gen = torch.Generator().manual_seed(3)
    scales = torch.rand(e, groups, n, generator=gen) * 1e-2 + 1e-4
    vf = torch.tensor([[[_e4m3_by_formula(int(c)) for c in row] for row in ex]
                       for ex in v.view(torch.uint8).tolist()], dtype=torch.float64)
    s = _per_element(scales, 32, k)
    product32 = (vf.float() * s.float())  # one float32 rounding, elementwise
    assert torch.equal(dequantize_fp8(v, scales, dtype), product32.to(dtype))
    assert torch.equal(dequantize_fp8(v, scales, torch.float64), vf * s)
    assert not torch.equal(product32.double(), vf * s)  # the float32 product does round here


def test_dequantize_fp8_per_channel_and_2d():
    v = _fp8_codes((8, 96), seed=4)
    scales = torch.rand(1, 8) + 0.5
    got = dequantize_fp8(v, scales, torch.float64)
    assert torch.equal(got, v.double() * scales.double().t())
    assert dequantize_fp8(v, scales.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("weights,scales,match", [
    (torch.zeros(8, 32), torch.ones(1, 8), "weights must be float8_e4m3fn, got torch.float32"),
    (torch.zeros(32, dtype=F8), torch.ones(1, 8),
     r"weights must be \[N, K\] or \[E, N, K\], got shape \[32\]"),
    (torch.zeros(8, 32, dtype=F8), torch.ones(1, 16),
     r"scales must be \[K/G, N\] = \[K/G, 8\] for weights \[8, 32\], got \[1, 16\]"),
    (torch.zeros(2, 8, 32, dtype=F8), torch.ones(3, 1, 8),
     r"scales must be \[E, K/G, N\] = \[2, K/G, 8\] .*got \[3, 1, 8\]"),
    (torch.zeros(8, 64, dtype=F8), torch.ones(4, 8), "G = 16 is not supported for K = 64"),
    (torch.zeros(8, 32, dtype=F8), torch.ones(1, 8, dtype=torch.uint8),
     r"scales must be a float tensor \(float32\), got torch.uint8"),
])
def test_dequantize_fp8_errors(weights, scales, match):
    with pytest.raises(ValueError, match=rf"dequantize_fp8: .*{match}"):
        dequantize_fp8(weights, scales)


# ------------------------------------------------------------------ FP8 group-wise quantiser


def _assert_fp8_bound(w, q, scales, group):
    """|w - v * s| <= 2^-4 |w| + 2^-10 s (e4m3 keeps 4 significant bits; subnormal step 2^-9),
    exact products in float64 (a tie of the float32 division may land an ulp either side)."""
    k = w.shape[-1]
    assert q.dtype == F8 and q.shape == w.shape and q.is_contiguous()
    assert scales.shape == (*w.shape[:-2], k // group, w.shape[-2]) and scales.is_contiguous()
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert not ((q.view(torch.uint8) & 0x7F) == 0x7F).any(), "a NaN code was produced"
    s = _per_element(scales, group, k)
    err = (w.double() - q.double() * s).abs()
    bound = (w.double().abs() * 2.0**-4 + 2.0**-10 * s) * (1 + 1e-6)
    assert (err <= bound).all(), f"worst err / bound = {(err / bound).max().item()}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,group", [
    ((4, 64, 256), 32), ((4, 64, 256), 128), ((2, 40, 384), 128), ((3, 24, 160), None),
    ((48, 96), 32), ((2, 16, 160), 32), ((2, 8, 96), 96),
])
def test_fp8_round_trip_error_bound(dtype, shape, group):
    w = _weights(shape, dtype, seed=sum(shape), scale=3.0)
    q, scales = quantize_fp8_groupwise(w, group)
    g = shape[-1] if group is None else group
    assert scales.dtype == torch.float32
    _assert_fp8_bound(w, q, scales, g)
    # Every group reaches the top of the e4m3 range without clipping: its largest |v| is 448
    # or 416 (the value below), whichever is nearer to max|w| / s.
    top = q.float().abs().view(*shape[:-1], shape[-1] // g, g).amax(-1)
    assert ((top == 448) | (top == 416)).all()


def test_fp8_scale_rule():
    """s = max|w| / 448 rounded to nearest float32, raised one ulp where it fell below."""
    w = _weights((4, 32, 128), torch.float32, seed=5, scale=3.0)
    amax = w.double().abs().view(4, 32, 4, 32).amax(-1)
    nearest = (amax / 448).float()
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    expected = torch.where(nearest.double() * 448 < amax, up, nearest)
    assert (expected != nearest).any() and (expected == nearest).any()  # both cases occur
    _, scales = quantize_fp8_groupwise(w, 32)
    assert torch.equal(scales, expected.transpose(1, 2))


def test_fp8_exact_values_and_ties():
    """max|w| = 448 gives s = 1: values are rounded to e4m3 by round-to-nearest-even."""
    row = [448.0, -448.0, 1.0625, 1.1875, 17.0, 0.0, 2.0**-10, 3 * 2.0**-10, 1e-5]
    w = torch.tensor([row + [0.0] * (32 - len(row))])
    q, scales = quantize_fp8_groupwise(w, 32)
    assert scales.tolist() == [[1.0]]
    # 1.0625 is halfway between 1 and 1.125 (even: 1); 1.1875 between 1.125 and 1.25 (even:
    # 1.25); 17 between 16 and 18 (even: 16); 2^-10 halfway to 2^-9 (even: 0); 3 * 2^-10 (even:
    # 2 * 2^-9).
    assert q.float()[0, :9].tolist() == [448.0, -448.0, 1.0, 1.25, 16.0, 0.0, 0.0,
                                         2 * 2.0**-9, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_zero_and_tiny_groups(dtype):
    w = _weights((2, 16, 64), dtype, seed=6)
    w[0, 3] = 0  # a whole row
    w[1, :, 32:] = 0  # one group of every row of an expert
    tiny = torch.finfo(dtype).tiny
    w[0, 5, :32] = torch.linspace(-tiny, tiny, 32).to(dtype)
    w[0, 6, 0] = torch.finfo(dtype).max / 16
    q, scales = quantize_fp8_groupwise(w, 32)
    assert (scales[0, :, 3] == 1).all() and (scales[1, 1] == 1).all()
    deq = dequantize_fp8(q, scales, torch.float64)
    assert (deq[0, 3] == 0).all() and (deq[1, :, 32:] == 0).all()
    _assert_fp8_bound(w, q, scales, 32)


def test_fp8_subnormal_float32_scale_is_raised():
    """A group whose exact scale underflows float32 to 0 gets the smallest subnormal instead
    (never 0, never a saturated group)."""
    w = torch.zeros(2, 32, dtype=torch.float64)
    w[0, 0] = 448 * 2.0**-150  # exact scale 2^-150: rounds to 0 in float32 (tie to even)
    w[1, 0] = 448 * 1.4 * 2.0**-149  # rounds down to 2^-149: 1.4 * 448 would saturate
    q, scales = quantize_fp8_groupwise(w, 32)
    assert scales.flatten().tolist() == [2.0**-149, 2 * 2.0**-149]
    assert q.float()[:, 0].tolist() == [224.0, 320.0]  # 448 / 2 and 448 * 1.4 / 2 (313.6)


def test_fp8_float64_weights_and_scale_dtypes():
    w = _weights((2, 16, 128), torch.float64, seed=7)
    q, s = quantize_fp8_groupwise(w, 64, scale_dtype=torch.float64)
    assert s.dtype == torch.float64
    _assert_fp8_bound(w, q, s, 64)
    q, s = quantize_fp8_groupwise(w.float(), 64, scale_dtype=torch.bfloat16)
    assert s.dtype == torch.bfloat16
    _assert_fp8_bound(w.float(), q, s, 64)


def test_fp8_chunked_quantization_is_identical(monkeypatch):
    w = _weights((3, 100, 96), torch.bfloat16, seed=8)
    whole = quantize_fp8_groupwise(w, 32)
    monkeypatch.setattr(fp8, "_CHUNK_ELEMENTS", 96 * 7)
    chunked = quantize_fp8_groupwise(w, 32)
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == F8 else a,
                           b.view(torch.uint8) if b.dtype == F8 else b)
               for a, b in zip(whole, chunked))
    strided = _weights((2, 64, 32), torch.float32, seed=9).transpose(1, 2)
    got, ref = quantize_fp8_groupwise(strided, 32), quantize_fp8_groupwise(strided.contiguous(),
                                                                           32)
    assert torch.equal(got[0].view(torch.uint8), ref[0].view(torch.uint8))
    assert torch.equal(got[1], ref[1])


@pytest.mark.parametrize("w,kwargs,match", [
    (torch.zeros(4, 64, dtype=torch.int8), {}, "weights must be float16/.* got torch.int8"),
    (torch.zeros(64), {}, r"\[N, K\] or \[E, N, K\] with N, K >= 1, got shape \[64\]"),
    (torch.zeros(4, 0), {}, r"got shape \[4, 0\]"),
    (torch.zeros(4, 64), {"group_size": 16}, "G = 16 is not supported for K = 64"),
    (torch.zeros(4, 96), {"group_size": 64}, "G = 64 is not supported for K = 96"),
    (torch.zeros(4, 64), {"group_size": 0}, "group_size must be a positive int or None"),
    (torch.zeros(4, 64), {"group_size": True}, "got True"),
    (torch.zeros(4, 64), {"group_size": 32, "scale_dtype": torch.int8}, "scale_dtype must be"),
])
def test_fp8_quantize_errors(w, kwargs, match):
    with pytest.raises(ValueError, match=rf"quantize_fp8_groupwise: .*{match}"):
        quantize_fp8_groupwise(w, **kwargs)


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf"),
                                        (float("-inf"), "inf")])
def test_fp8_non_finite_groups_are_refused(value, word):
    w = _weights((4, 16, 128), torch.bfloat16, seed=10)
    w[2, 5, 70] = value
    with pytest.raises(ValueError, match=rf"quantize_fp8_groupwise: expert 2, row 5, k 64\.\.95 "
                                         rf"of weights \[E, N, K\] = \[4, 16, 128\] holds {word}; "
                                         "FP8 weights need finite values"):
        quantize_fp8_groupwise(w, 32)
    w[3, 0, 0] = value
    fc1 = _weights((4, 32, 128), torch.float16, seed=11)
    with pytest.raises(ValueError, match=r"expert 2, row 5, .* of fc2_expert_weights .*\(and 1 "
                                         r"more row\)"):
        quantize_moe_weights_fp8(fc1, w, 32)  # fc2 is refused before any shape check


def test_fp8_scale_overflow_is_refused():
    w = torch.ones(2, 8, 64)
    w[1, 3, 40] = 1e30
    with pytest.raises(ValueError, match=r"the scale of expert 1, row 3, k 32\.\.63 of weights "
                                         r".* overflows torch.float16; pass a wider scale_dtype"):
        quantize_fp8_groupwise(w, 32, scale_dtype=torch.float16)


# ------------------------------------------------------------------ FP8 block scales


def _block_scales_by_hand(scale_inv, n, k, group, bn=128, bk=128):
    """out[g, n] = scale_inv[n // bn, (g * G) // bk], by loops."""
    return torch.tensor([[float(scale_inv[col // bn, (g * group) // bk]) for col in range(n)]
                         for g in range(k // group)])


@pytest.mark.parametrize("n,k", [(200, 256), (96, 384), (320, 128), (128, 512), (8, 128)])
def test_expand_block_scales(n, k):
    rows, cols = -(-n // 128), -(-k // 128)
    gen = torch.Generator().manual_seed(n + k)
    scale_inv = torch.rand(rows, cols, generator=gen) + 0.1
    got = expand_block_scales(scale_inv, n, k)
    assert got.dtype == torch.float32 and got.shape == (k // 128, n) and got.is_contiguous()
    assert torch.equal(got, _block_scales_by_hand(scale_inv, n, k, 128))
    # Batched [E, rows, cols], 16-bit input, and a finer group size: the same weights.
    batched = torch.stack([scale_inv, 2 * scale_inv]).to(torch.bfloat16)
    got = expand_block_scales(batched, n, k, group_size=32)
    assert got.shape == (2, k // 32, n)
    assert torch.equal(got[1], _block_scales_by_hand(batched[1].float(), n, k, 32))


def test_expand_block_scales_k_not_a_multiple_of_128():
    scale_inv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"expand_block_scales: scale_inv \(128x128 blocks\) of a "
                                         r"\[200, 160\] weight: the kernels' group size G = 128 "
                                         r"must be a multiple of 32 dividing both the block width "
                                         r"128 and K = 160 \(K must be a multiple of 128 for the "
                                         r"default G = 128\); group_size=32 expresses the same"):
        expand_block_scales(scale_inv, 200, 160)
    got = expand_block_scales(scale_inv, 200, 160, group_size=32)
    assert torch.equal(got, _block_scales_by_hand(scale_inv, 200, 160, 32))
    assert got[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 2.0] and got[:, 199].tolist()[-1] == 4.0
    with pytest.raises(ValueError, match="no multiple of 32 divides both"):
        expand_block_scales(torch.ones(1, 2), 8, 144)  # gcd(128, 144) = 16
    with pytest.raises(ValueError, match="G = 64 must be a multiple of 32 dividing both the "
                                         "block width 128 and K = 160"):
        expand_block_scales(scale_inv, 200, 160, group_size=64)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.ones(2, 1), 200, 256), {}, (r"scale_inv must be \[\.\.\., ceil\(N/128\), "
                                        r"ceil\(K/128\)\] = \[\.\.\., 2, 2\] for a "
                                        r"\[200, 256\] weight, got \[2, 1\]")),
    ((torch.ones(2, 3), 200, 256), {}, r"= \[\.\.\., 2, 2\] .*got \[2, 3\]"),
    ((torch.ones(3), 200, 256), {}, r"got \[3\]"),
    ((torch.ones(2, 2, dtype=torch.int32), 200, 256), {}, "must be a float tensor"),
    ((torch.ones(2, 2), 0, 256), {}, "n must be a positive int, got 0"),
    ((torch.ones(2, 2), 200, 256), {"block": (128,)}, "block must be a pair of positive ints"),
    ((torch.ones(1, 2), 200, 256), {"block": (256, 128)}, None),  # valid: 256-row blocks
    ((torch.ones(2, 1), 200, 256), {"name": "up.weight_scale_inv"},
     r"up\.weight_scale_inv must be"),
])
def test_expand_block_scales_errors(args, kwargs, match):
    if match is None:
        assert expand_block_scales(*args, **kwargs).shape == (2, 200)
        return
    with pytest.raises(ValueError, match=match):
        expand_block_scales(*args, **kwargs)


@pytest.mark.parametrize("shape", [(200, 384), (3, 136, 160), (96, 128), (2, 256, 256)])
def test_quantize_fp8_blockwise(shape):
    """DeepSeek's storage: per 128x128 block (partial at the edges) s = max|w| / 448, and
    W = v * s of the block; through expand_block_scales the kernel layout gives the same."""
    w = _weights(shape, torch.bfloat16, seed=sum(shape), scale=2.0)
    q, scale_inv = quantize_fp8_blockwise(w)
    *lead, n, k = shape
    rows, cols = -(-n // 128), -(-k // 128)
    assert q.dtype == F8 and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (*lead, rows, cols)
    w3, q3, s3 = (t.reshape(-1, *t.shape[-2:]) for t in (w, q, scale_inv))
    for e in range(w3.shape[0]):
        for r in range(rows):
            for c in range(cols):
                block = w3[e, r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].double()
                amax = block.abs().max().item()
                s = s3[e, r, c].item()
                assert s * 448 >= amax and s == pytest.approx(amax / 448, rel=2**-23)
                v = q3[e, r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].double()
                err = (block - v * s).abs()
                assert (err <= (block.abs() * 2.0**-4 + 2.0**-10 * s) * (1 + 1e-6)).all()
    if k % 128 == 0:
        kernel = expand_block_scales(scale_inv, n, k)
        deq = dequantize_fp8(q, kernel, torch.float64)
        by_block = q.double() * scale_inv.double().repeat_interleave(128, -2)[..., :n, :] \
            .repeat_interleave(128, -1)[..., :k]
        assert torch.equal(deq, by_block)


def test_quantize_fp8_blockwise_errors():
    w = torch.ones(2, 130, 256)
    w[1, 129, 3] = float("nan")
    with pytest.raises(ValueError, match=r"quantize_fp8_blockwise: expert 1, row 129, k 3\.\.3 of "
                                         r"up \[E, N, K\] = \[2, 130, 256\] holds NaN"):
        quantize_fp8_blockwise(w, name="up")
    with pytest.raises(ValueError, match="block must be a pair"):
        quantize_fp8_blockwise(torch.ones(8, 8), (0, 128))
    assert quantize_fp8_blockwise(torch.zeros(4, 32))[1].tolist() == [[1.0]]


# ------------------------------------------------------------------ FP8 layer


def test_quantize_moe_weights_fp8():
    fc1 = _weights((4, 2 * 96, 160), torch.bfloat16, seed=12)
    fc2 = _weights((4, 160, 96), torch.bfloat16, seed=13)
    q1, q2, quant = quantize_moe_weights_fp8(fc1, fc2, 32)
    assert q1.shape == fc1.shape and q2.shape == fc2.shape and len(quant) == 2
    assert quant[0].shape == (4, 5, 192) and quant[1].shape == (4, 3, 160)
    assert check_fp8_layer(q1, q2, quant) == (32, 32)
    _assert_fp8_bound(fc1, q1, quant[0], 32)
    _assert_fp8_bound(fc2, q2, quant[1], 32)
    q1, q2, quant = quantize_moe_weights_fp8(fc1, fc2, (None, 32))
    assert check_fp8_layer(q1, q2, quant) == (160, 32)
    with pytest.raises(ValueError, match="I = 48 must be a multiple of 32"):
        quantize_moe_weights_fp8(fc1[:, :96, :], fc2[:, :, :48], None)
    with pytest.raises(ValueError, match="group_size must be an int, None or a pair"):
        quantize_moe_weights_fp8(fc1, fc2, (32, 32, 32))


def _fp8_layer(e=2, n1=64, h=96, i=32, g1=32, g2=32):
    q1 = torch.zeros(e, n1, h, dtype=F8)
    q2 = torch.zeros(e, h, i, dtype=F8)
    return q1, q2, [torch.ones(e, h // g1, n1), torch.ones(e, i // g2, h)]


@pytest.mark.parametrize("args,match", [
    (_fp8_layer(h=80, g1=80), "H = 80 must be a multiple of 32"),
    (_fp8_layer(i=48, g2=48), "I = 48 must be a multiple of 32"),
    (_fp8_layer(n1=68), r"N1 \(fc1's rows\) = 68 must be a multiple of 8"),
    ((_fp8_layer()[0].view(torch.uint8), *_fp8_layer()[1:]),
     "fc1_weights must be float8_e4m3fn, got torch.uint8"),
    ((_fp8_layer()[0][0], *_fp8_layer()[1:]), r"fc1_weights \[E, N1, H\] must be 3-D"),
    ((_fp8_layer()[0], _fp8_layer()[1][:, :64], _fp8_layer()[2]),
     r"fc2_weights must be \[E, H, I\] = \[2, 96, I\]"),
    ((*_fp8_layer()[:2], [*_fp8_layer()[2], torch.ones(1)]),
     (r"quant_scales must be \[fc31_scales, fc2_scales\] \(FP8 weights have no zero "
      r"points\), got 3 tensors")),
    ((*_fp8_layer()[:2], [_fp8_layer()[2][0].half(), _fp8_layer()[2][1]]),
     "fc31_scales must be float32, got torch.float16"),
    ((*_fp8_layer()[:2], [_fp8_layer()[2][0][:, :, :8], _fp8_layer()[2][1]]),
     r"fc31_scales must be \[E, K/G, N\] = \[2, 96/G, 64\], got \[2, 3, 8\]"),
    ((*_fp8_layer()[:2], [_fp8_layer()[2][0][:, :2], _fp8_layer()[2][1]]),
     "fc31_scales .*G = 48 is not supported for K = 96"),
])
def test_check_fp8_layer_errors(args, match):
    with pytest.raises(ValueError, match=rf"check_fp8_layer: {match}"):
        check_fp8_layer(*args)


# ------------------------------------------------------------------ e2m1 and e8m0


def test_e2m1_every_code():
    codes = torch.arange(16)
    got = e2m1_to_float(codes)
    assert got.dtype == torch.float32
    assert got.tolist() == OCP_E2M1 + [-v for v in OCP_E2M1]
    assert math.copysign(1, got[8].item()) == -1  # code 8 is -0
    for dtype in (torch.uint8, torch.int8, torch.int32):
        assert torch.equal(e2m1_to_float(codes.to(dtype)), got)
    # By the bit definition s e e m.
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 3, code & 1
        value = (m / 2) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        assert got[code].item() == (-value if s else value)


@pytest.mark.parametrize("codes,match", [
    (torch.tensor([16]), "codes holds 16; e2m1 codes are 0..15"),
    (torch.tensor([-1]), "codes holds -1"),
    (torch.tensor([1.0]), "codes must be an integer tensor .*got torch.float32"),
])
def test_e2m1_errors(codes, match):
    with pytest.raises(ValueError, match=rf"e2m1_to_float: {match}"):
        e2m1_to_float(codes)


def test_e8m0_every_code():
    got = e8m0_to_float(torch.arange(256, dtype=torch.uint8))
    assert got.dtype == torch.float32
    for x in range(255):
        assert got[x].item() == 2.0 ** (x - 127), x
    assert got[0].item() == 2.0**-127 and got[254].item() == 2.0**127 and got[127].item() == 1.0
    assert math.isnan(got[255].item())
    assert torch.equal(e8m0_to_float(torch.arange(255, dtype=torch.uint8).view(torch.int8)),
                       got[:255])
    with pytest.raises(ValueError, match="e8m0_to_float: x must be a uint8 tensor of e8m0 codes"):
        e8m0_to_float(torch.arange(4))


# ------------------------------------------------------------------ MXFP4 dequantisation


def _e2m1_codes(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)


def test_dequantize_mxfp4_by_hand():
    """N = 2, K = 64: element (n, k) = OCP_E2M1 value of its code * 2^(x - 127) of its block."""
    codes = _e2m1_codes((2, 64), seed=14)
    scales = torch.tensor([[127, 0], [254, 120]], dtype=torch.uint8)  # [K/32, N]
    got = dequantize_mxfp4(pack_int4(codes), scales)
    assert got.dtype == torch.float32 and got.shape == (2, 64)
    for n in range(2):
        for k in range(64):
            c = int(codes[n, k])
            value = OCP_E2M1[c & 7] * (-1 if c & 8 else 1)
            expected = value * 2.0 ** (int(scales[k // 32, n]) - 127)
            if math.isinf(float(torch.tensor(expected, dtype=torch.float32))):
                assert math.isinf(got[n, k].item())  # 2^127 * |v| >= 2 exceeds float32
            else:
                assert got[n, k].item() == expected, (n, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dequantize_mxfp4_rounds_once(dtype):
    e, n, k = 3, 16, 96
    codes = _e2m1_codes((e, n, k), seed=15)
    gen = torch.Generator().manual_seed(15)
    scales = torch.randint(118, 134, (e, k // 32, n), generator=gen, dtype=torch.uint8)
    table = torch.tensor(OCP_E2M1 + [-v for v in OCP_E2M1], dtype=torch.float64)
    exact = table[codes.long()] * torch.pow(2.0, _per_element(scales, 32, k) - 127)
    got = dequantize_mxfp4(pack_int4(codes), scales, dtype)
    assert got.dtype == dtype and torch.equal(got, exact.to(dtype))
    assert torch.equal(dequantize_mxfp4(pack_int4(codes).view(torch.int8), scales, dtype), got)


def test_dequantize_mxfp4_nan_scale():
    got = dequantize_mxfp4(torch.full((16, 16), 0x22, dtype=torch.uint8),
                           torch.full((1, 16), 255, dtype=torch.uint8))
    assert torch.isnan(got).all()


@pytest.mark.parametrize("packed,scales,match", [
    (torch.zeros(8, 16), torch.zeros(1, 8, dtype=torch.uint8),
     "packed must be a uint8 tensor of packed e2m1 pairs"),
    (torch.zeros(8, 16, dtype=torch.uint8), torch.ones(1, 8),
     "scales must be a uint8 tensor of e8m0 codes .*got torch.float32"),
    (torch.zeros(16, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.uint8),
     r"packed must be \[N, K/2\] or \[E, N, K/2\], got shape \[16\]"),
    (torch.zeros(8, 8, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.uint8),
     r"K = 16 must be a multiple of 32"),
    (torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.uint8),
     r"scales must be \[K/32, N\] = \[2, 8\] for packed \[8, 32\], got \[1, 8\]"),
    (torch.zeros(2, 8, 16, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.uint8),
     r"scales must be \[E, K/32, N\] = \[2, 1, 8\]"),
])
def test_dequantize_mxfp4_errors(packed, scales, match):
    with pytest.raises(ValueError, match=rf"dequantize_mxfp4: .*{match}"):
        dequantize_mxfp4(packed, scales)


# ------------------------------------------------------------------ MXFP4 quantiser


def _nearest_even_e2m1(v):
    """The OCP rule for one element, by search: the nearest of the 8 magnitudes (ties to the
    even code), saturating at 6; sign kept for a nonzero result."""
    mag = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(OCP_E2M1[i] - mag), i & 1))
    return best | 8 if v < 0 and best else best


def test_quantize_mxfp4_rule_by_hand():
    """A block with max|w| = 7 has X = 2^(floor(log2 7) - 2) = 1 (x = 127): the ties of
    e2m1 go to the even code, 7 and 6.5 saturate to 6, -0.1 becomes +0."""
    row = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.1, -0.3, 6.5, -4.0, 0.2, 0.8]
    w = torch.tensor([row + [0.0] * (32 - len(row))])
    packed, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[127]]
    got = e2m1_to_float(unpack_int4(packed))[0, :len(row)].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, -0.5, 6.0, -4.0, 0.0, 1.0]
    assert unpack_int4(packed)[0, 8].item() == 0  # +0, not code 8
    # Scaled: the same block times 2^-20 gets x = 107 and the same codes.
    packed2, scales2 = quantize_mxfp4(w * 2.0**-20)
    assert scales2.tolist() == [[107]] and torch.equal(packed2, packed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 16, 64), (48, 96), (3, 32, 160)])
def test_quantize_mxfp4_matches_the_ocp_rule(dtype, shape):
    w = _weights(shape, dtype, seed=sum(shape), scale=3.0)
    packed, scales = quantize_mxfp4(w)
    k = shape[-1]
    assert packed.shape == (*shape[:-1], k // 2) and packed.dtype == torch.uint8
    assert scales.shape == (*shape[:-2], k // 32, shape[-2]) and scales.dtype == torch.uint8
    assert packed.is_contiguous() and scales.is_contiguous()
    rows = w.double().reshape(-1, k)
    codes = unpack_int4(packed).reshape(-1, k)
    x = scales.transpose(-1, -2).reshape(-1, k // 32)
    for r in range(rows.shape[0]):
        for b in range(k // 32):
            block = rows[r, 32 * b:32 * b + 32].tolist()
            amax = max(abs(v) for v in block)
            shared = math.frexp(amax)[1] - 1 - 2  # floor(log2(amax)) - emax(e2m1)
            assert int(x[r, b]) == shared + 127
            expected = [_nearest_even_e2m1(v / 2.0**shared) for v in block]
            assert codes[r, 32 * b:32 * b + 32].tolist() == expected, (r, b)
    # The error bound: at most 2X per element (half a step, or a clipped maximum).
    deq = dequantize_mxfp4(packed, scales, torch.float64)
    err = (w.double() - deq).abs()
    assert (err <= 2 * _per_element(e8m0_to_float(scales), 32, k)).all()


def test_quantize_mxfp4_zero_tiny_and_huge_blocks():
    w = torch.zeros(2, 64, dtype=torch.float64)
    w[0, 32] = 2.0**-140  # below the smallest scale 2^-127 * 0.5: clamped scale, rounds to 0
    w[1, 0] = 2.0**-125  # floor(log2) - 2 = -127: the smallest scale, exact
    packed, scales = quantize_mxfp4(w)
    assert scales.t().tolist() == [[127, 0], [0, 127]]  # all-zero blocks: scale 1
    deq = dequantize_mxfp4(packed, scales, torch.float64)
    assert deq[1, 0].item() == 2.0**-125 and (deq[0] == 0).all()
    w[0, 0] = 2.0**130
    with pytest.raises(ValueError, match=r"quantize_mxfp4: row 0, k 0\.\.31 of weights \[N, K\] "
                                         r"= \[2, 64\] holds 1\.36\d*e\+39, beyond MXFP4's range"):
        quantize_mxfp4(w)
    top = torch.zeros(1, 32)
    top[0, 0] = torch.finfo(torch.float32).max
    packed, scales = quantize_mxfp4(top)
    # float32's largest value is below 2^128: x = 127 - 2 + 127 = 252, and 6 * 2^125 is exact.
    assert scales.item() == 252 and e2m1_to_float(unpack_int4(packed))[0, 0].item() == 6.0
    assert dequantize_mxfp4(packed, scales)[0, 0].item() == 6 * 2.0**125


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_quantize_mxfp4_non_finite_refused(value, word):
    w = _weights((3, 16, 96), torch.bfloat16, seed=16)
    w[1, 4, 40] = value
    with pytest.raises(ValueError, match=rf"quantize_mxfp4: expert 1, row 4, k 32\.\.63 of "
                                         rf"weights \[E, N, K\] = \[3, 16, 96\] holds {word}; "
                                         "MXFP4 weights need finite values"):
        quantize_mxfp4(w)


@pytest.mark.parametrize("w,match", [
    (torch.zeros(4, 48), r"weights \[4, 48\]: K = 48 must be a multiple of 32"),
    (torch.zeros(4, 64, dtype=torch.int32), "weights must be float16/.* got torch.int32"),
    (torch.zeros(2, 2, 4, 64), r"got shape \[2, 2, 4, 64\]"),
])
def test_quantize_mxfp4_errors(w, match):
    with pytest.raises(ValueError, match=rf"quantize_mxfp4: .*{match}"):
        quantize_mxfp4(w)


def test_quantize_mxfp4_chunked_is_identical(monkeypatch):
    w = _weights((3, 100, 96), torch.bfloat16, seed=17)
    whole = quantize_mxfp4(w)
    monkeypatch.setattr(mxfp4, "_CHUNK_ELEMENTS", 96 * 7)
    chunked = quantize_mxfp4(w)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


# ------------------------------------------------------------------ MXFP4 layer


def test_quantize_moe_weights_mxfp4():
    fc1 = _weights((4, 2 * 96, 160), torch.bfloat16, seed=18)
    fc2 = _weights((4, 160, 96), torch.bfloat16, seed=19)
    p1, p2, quant = quantize_moe_weights_mxfp4(fc1, fc2)
    assert (p1.shape, p2.shape) == ((4, 192, 80), (4, 160, 48))
    assert quant[0].shape == (4, 5, 192) and quant[1].shape == (4, 3, 160)
    assert all(s.dtype == torch.uint8 for s in quant)
    check_mxfp4_layer(p1, p2, quant)
    assert torch.equal(quantize_mxfp4(fc1)[0], p1)
    with pytest.raises(ValueError, match=r"check_mxfp4_layer: N1 \(fc1's rows\) = 72 must be a "
                                         "multiple of 16"):
        quantize_moe_weights_mxfp4(fc1[:, :72], fc2)


def _mx_layer(e=2, n1=64, h=96, i=32):
    p1 = torch.zeros(e, n1, h // 2, dtype=torch.uint8)
    p2 = torch.zeros(e, h, i // 2, dtype=torch.uint8)
    return p1, p2, [torch.zeros(e, h // 32, n1, dtype=torch.uint8),
                    torch.zeros(e, i // 32, h, dtype=torch.uint8)]


@pytest.mark.parametrize("args,match", [
    (_mx_layer(h=80), "H = 80 must be a multiple of 32"),
    (_mx_layer(i=48), "I = 48 must be a multiple of 32"),
    (_mx_layer(n1=72), r"N1 \(fc1's rows\) = 72 must be a multiple of 16"),
    ((_mx_layer()[0].float(), *_mx_layer()[1:]), "fc1_weights must be a uint8 tensor"),
    ((_mx_layer()[0][0], *_mx_layer()[1:]), r"fc1_weights \[E, N1, H/2\] must be 3-D"),
    ((*_mx_layer()[:2], _mx_layer()[2][:1]), r"quant_scales must be \[fc31_scales, fc2_scales\]"),
    ((*_mx_layer()[:2], [_mx_layer()[2][0].half(), _mx_layer()[2][1]]),
     r"fc31_scales must be uint8 \(e8m0 codes\), got torch.float16"),
    ((*_mx_layer()[:2], [_mx_layer()[2][0], _mx_layer()[2][1][:, :, :8]]),
     r"fc2_scales must be \[E, K/32, N\] = \[2, 1, 96\], got \[2, 1, 8\]"),
])
def test_check_mxfp4_layer_errors(args, match):
    with pytest.raises(ValueError, match=rf"check_mxfp4_layer: {match}"):
        check_mxfp4_layer(*args)


# ------------------------------------------------------------------ GPU gives the same bits


@pytest.mark.gpu
def test_gpu_matches_cpu():
    w = _weights((4, 256, 512), torch.float32, seed=20, scale=3.0)
    w[0, 3] = 0
    cpu, gpu = quantize_fp8_groupwise(w, 128), quantize_fp8_groupwise(w.cuda(), 128)
    assert torch.equal(gpu[0].view(torch.uint8).cpu(), cpu[0].view(torch.uint8))
    assert torch.equal(gpu[1].cpu(), cpu[1])
    assert torch.equal(dequantize_fp8(*gpu, torch.bfloat16).cpu(),
                       dequantize_fp8(*cpu, torch.bfloat16))
    cpu, gpu = quantize_fp8_blockwise(w), quantize_fp8_blockwise(w.cuda())
    assert torch.equal(gpu[0].view(torch.uint8).cpu(), cpu[0].view(torch.uint8))
    assert torch.equal(gpu[1].cpu(), cpu[1])
    cpu, gpu = quantize_mxfp4(w), quantize_mxfp4(w.cuda())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    assert torch.equal(dequantize_mxfp4(*gpu).cpu(), dequantize_mxfp4(*cpu))
