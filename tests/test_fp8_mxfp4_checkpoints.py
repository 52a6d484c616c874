"""cutlass_moe.fp8_checkpoints and cutlass_moe.mxfp4_checkpoints: DeepSeek-V3/Qwen3-FP8 block,
compressed-tensors FP8 and gpt-oss MXFP4 importers (CPU).

Each checkpoint is written here from the format's description (e4m3 and e2m1 values from their
bit definitions, block scales indexed by hand, gpt-oss's bytes built nibble by nibble with gate
and up rows interleaved), never with the library's code; the imported weights must dequantise
EXACTLY to the values the test chose. Optional tests cross-check with the real
compressed-tensors library and with transformers' own gpt-oss dequantiser when installed.
"""

from __future__ import annotations

import math

import pytest
import torch

from cutlass_moe.fp8 import dequantize_fp8
from cutlass_moe.fp8_checkpoints import (
    Fp8Experts,
    compressed_tensors_to_fp8,
    fp8_block_to_fp8,
    load_fp8_experts,
)
from cutlass_moe.mxfp4 import dequantize_mxfp4
from cutlass_moe.mxfp4_checkpoints import Mxfp4Experts, load_mxfp4_experts

F8 = torch.float8_e4m3fn
PREFIX = "model.layers.3.mlp.experts"


def _e4m3(code):
    """The e4m3fn value of one byte from its definition (s eeee mmm, bias 7)."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 0x7
    return sign * ((m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


#: Value of every byte (the NaN codes 0x7F/0xFF are never drawn).
E4M3 = torch.tensor([0.0 if c & 0x7F == 0x7F else _e4m3(c) for c in range(256)],
                    dtype=torch.float64)
#: OCP MX v1.0 FP4 (E2M1) values of codes 0..15.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)


def _codes(shape, seed):
    """Random e4m3 bytes without NaN codes: (float8 tensor, their values in float64)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 254, shape, generator=gen)
    raw = torch.where(raw >= 0x7F, raw + 1, raw)
    return raw.to(torch.uint8).view(F8), E4M3[raw]


def _per_block(scale_inv, n, k, bn=128, bk=128):
    """[N, K] float64 with element (n, k) = scale_inv[n // bn, k // bk]."""
    rows = (torch.arange(n) // bn)[:, None]
    cols = (torch.arange(k) // bk)[None, :]
    return scale_inv.double()[rows, cols]


# ------------------------------------------------------------------ DeepSeek-V3 / Qwen3-FP8


@pytest.mark.parametrize("n,k,group", [(256, 256, None), (200, 384, None), (96, 128, None),
                                       (136, 160, 32), (512, 192, 64), (72, 256, 32)])
def test_fp8_block(n, k, group):
    """Block scales [ceil(N/128), ceil(K/128)], N and K not multiples of 128 (a finer kernel
    group size where K needs one): exact weights."""
    weight, values = _codes((n, k), seed=n + k)
    gen = torch.Generator().manual_seed(n * k)
    scale_inv = torch.rand(-(-n // 128), -(-k // 128), generator=gen) * 1e-2 + 1e-4
    layer = fp8_block_to_fp8(weight, scale_inv, group_size=group)
    g = group or 128
    assert layer.weights.dtype == F8 and torch.equal(layer.weights.view(torch.uint8),
                                                     weight.view(torch.uint8))
    assert layer.scales.dtype == torch.float32 and layer.scales.shape == (k // g, n)
    assert layer.group_size == g
    expected = values * _per_block(scale_inv, n, k)
    assert torch.equal(dequantize_fp8(*layer, dtype=torch.float64), expected)
    # The kernels' float32 product rounded to bf16 equals the same computed here.
    assert torch.equal(dequantize_fp8(*layer, dtype=torch.bfloat16),
                       (values.float() * _per_block(scale_inv, n, k).float()).bfloat16())


def test_fp8_block_by_hand():
    """N = 130 (two block rows, the second of 2 rows), K = 256: column 129 takes block row 1."""
    weight = torch.full((130, 256), 0x38, dtype=torch.uint8).view(F8)  # every value 1.0
    scale_inv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    layer = fp8_block_to_fp8(weight, scale_inv, name="w")
    assert layer.scales.tolist() == [[1.0] * 128 + [3.0] * 2, [2.0] * 128 + [4.0] * 2]
    deq = dequantize_fp8(*layer)
    assert deq[127, 127] == 1 and deq[127, 128] == 2 and deq[128, 0] == 3 and deq[129, 255] == 4


def test_fp8_block_scale_dtypes_and_per_tensor():
    weight, values = _codes((64, 128), seed=1)
    bf16 = torch.tensor([[0.375]], dtype=torch.bfloat16)
    layer = fp8_block_to_fp8(weight, bf16)
    assert layer.scales.dtype == torch.float32
    assert torch.equal(dequantize_fp8(*layer, dtype=torch.float64), values * 0.375)
    if hasattr(torch, "float8_e8m0fnu"):  # transformers' scale_fmt="ue8m0"
        e8m0 = torch.tensor([[2.0**-7]]).to(torch.float8_e8m0fnu)
        layer = fp8_block_to_fp8(weight, e8m0)
        assert torch.equal(dequantize_fp8(*layer, dtype=torch.float64), values * 2.0**-7)
    layer = fp8_block_to_fp8(weight, torch.tensor(0.5))  # 0-d: per-tensor
    assert layer.scales.shape == (1, 64) and layer.group_size == 128
    assert torch.equal(dequantize_fp8(*layer, dtype=torch.float64), values * 0.5)


@pytest.mark.parametrize("change,match", [
    (lambda t: {**t, "weight": t["weight"].view(torch.uint8)},
     r"up\.weight must be float8_e4m3fn \[N, K\], got uint8 \[200, 256\]"),
    (lambda t: {**t, "weight": t["weight"][0]}, (r"up\.weight must be float8_e4m3fn \[N, K\], got "
                                                r"float8_e4m3fn \[256\]")),
    (lambda t: {**t, "weight_scale_inv": t["weight_scale_inv"][:1]},
     (r"up\.weight_scale_inv must be \[\.\.\., ceil\(N/128\), ceil\(K/128\)\] = \[\.\.\., 2, 2\] "
     r"for a \[200, 256\] weight, got \[1, 2\]")),
    (lambda t: {**t, "weight_scale_inv": t["weight_scale_inv"].to(torch.int32)},
     r"up\.weight_scale_inv must be a floating-point tensor \(float32\), got int32"),
    (lambda t: {**t, "weight_scale_inv": torch.tensor([[1.0, float("inf")], [1.0, 1.0]])},
     r"up\.weight_scale_inv \[2, 2\] holds inf at \[0, 1\]; scales must be finite"),
    (lambda t: {**t, "weight": t["weight"][:, :160], "weight_scale_inv": torch.ones(2, 2)},
     (r"up\.weight_scale_inv \(128x128 blocks\) of a \[200, 160\] weight: .*K must be a multiple "
     r"of 128 for the default G = 128\); group_size=32 expresses the same weights")),
    (lambda t: {**t, "weight": _nan_at(t["weight"], 7, 9)},
     r"up\.weight \[200, 256\] holds the e4m3 NaN code \(0x7F/0xFF\) at \[7, 9\]"),
])
def test_fp8_block_errors(change, match):
    weight, _ = _codes((200, 256), seed=2)
    tensors = {"weight": weight, "weight_scale_inv": torch.ones(2, 2), "name": "up"}
    with pytest.raises(ValueError, match=match):
        fp8_block_to_fp8(**change(tensors))


def _nan_at(weight, row, col, code=0x7F):
    raw = weight.view(torch.uint8).clone()
    raw[row, col] = code
    return raw.view(F8)


# ------------------------------------------------------------------ compressed-tensors


@pytest.mark.parametrize("strategy", ["tensor", "tensor-0d", "channel", "group32", "group64",
                                      "block"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_fp8(strategy, scale_dtype):
    n, k = 200, 256
    weight, values = _codes((n, k), seed=3)
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return (torch.rand(*shape, generator=gen) * 1e-2 + 1e-4).to(scale_dtype)

    if strategy in ("tensor", "tensor-0d"):
        scale = rand(1) if strategy == "tensor" else rand(1)[0]
        full = scale.double().reshape(1, 1).expand(n, k)
        group = k
    elif strategy == "channel":
        scale = rand(n, 1)
        full, group = scale.double().expand(n, k), k
    elif strategy.startswith("group"):
        group = int(strategy[5:])
        scale = rand(n, k // group)  # [N, K/G]
        full = scale.double().repeat_interleave(group, dim=1)
    else:
        scale = rand(2, 2)  # [ceil(200/128), 256/128]
        full, group = _per_block(scale, n, k), 128
    layer = compressed_tensors_to_fp8(weight, scale)
    assert layer.scales.dtype == torch.float32 and layer.group_size == group
    assert torch.equal(dequantize_fp8(*layer, dtype=torch.float64), values * full)
    # A stored zero point of zeros is accepted (symmetric), a nonzero one refused.
    zp = torch.zeros(scale.shape, dtype=F8)
    assert torch.equal(compressed_tensors_to_fp8(weight, scale, zp).scales, layer.scales)
    with pytest.raises(ValueError, match=r"l\.weight_zero_point must be all zeros"):
        compressed_tensors_to_fp8(weight, scale, torch.ones(scale.shape), name="l")


@pytest.mark.parametrize("scale,kwargs,match", [
    (torch.ones(3, 2), {}, (r"l\.weight_scale must be \[1\] \(tensor\), \[N, 1\] = \[200, 1\] "
                           r"\(channel\), \[N, K/G\] = \[200, K/G\] \(group\) or "
                           r"\[ceil\(N/128\), ceil\(K/128\)\] = \[2, 2\] \(block, "
                           r"block_structure=\(128, 128\)\) for weight \[200, 256\], got \[3, 2\]")),
    (torch.ones(200, 16), {}, (r"l\.weight_scale \[N, K/G\] \(transposed\) .*G = 16 is not "
                              "supported for K = 256")),
    (torch.ones(2, 2, 2), {}, r"l\.weight_scale must be \[1\], \[N, 1\], \[N, K/G\] or block"),
    (torch.ones(4, 4), {"block_structure": (64, 64)}, None),  # 64x64 blocks: valid
    (torch.ones(2, 2, dtype=torch.int8), {}, "must be a floating-point tensor"),
])
def test_compressed_tensors_fp8_errors(scale, kwargs, match):
    weight, _ = _codes((200, 256), seed=4)
    if match is None:
        assert compressed_tensors_to_fp8(weight, scale, **kwargs).scales.shape == (4, 200)
        return
    with pytest.raises(ValueError, match=match):
        compressed_tensors_to_fp8(weight, scale, name="l", **kwargs)


def _ct_quantize(w, strategy, group_size=None):
    """compressed-tensors' own FP8 quantisation of ``w [N, K]`` (skip without the library):
    (weight, weight_scale, weight_zero_point, its own dequantisation in float32)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    extra = ({"block_structure": [128, 128]} if strategy == "block"
             else {"group_size": group_size} if strategy == "group" else {})
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, **extra)
    n, k = w.shape
    if strategy == "tensor":
        lo, hi = w.min().reshape(1), w.max().reshape(1)
    elif strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif strategy == "group":
        lo, hi = (w.view(n, k // group_size, group_size).amin(-1),
                  w.view(n, k // group_size, group_size).amax(-1))
    else:
        rows = -(-n // 128)
        padded = torch.nn.functional.pad(w, (0, 0, 0, rows * 128 - n))
        blocks = padded.view(rows, 128, k // 128, 128)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    scale, zero_point = calculate_qparams(lo, hi, args)
    q = quantize(w, scale, zero_point, args, dtype=F8)
    return q, scale, zero_point, dequantize(q, scale, zero_point, args, dtype=torch.float32)


@pytest.mark.parametrize("strategy,group", [("tensor", None), ("channel", None), ("group", 64),
                                            ("block", None)])
def test_compressed_tensors_library(strategy, group):
    """The real library's quantize/dequantize (skipped when it is not installed): our import
    dequantises to its float32 weights exactly."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(200, 256, generator=gen)
    q, scale, zero_point, ref = _ct_quantize(w, strategy, group)
    layer = compressed_tensors_to_fp8(q, scale, zero_point)
    assert torch.equal(dequantize_fp8(*layer, dtype=torch.float32), ref)


# ------------------------------------------------------------------ load_fp8_experts

H, I = 256, 128


def _fp8_checkpoint(fmt, num_experts=3, names=("gate_proj", "up_proj", "down_proj"), h=H, i=I,
                    scale_dtype=torch.float32):
    """A state dict of ``num_experts`` experts; returns it and the chosen (values, scale per
    element) of each (expert, projection)."""
    gate, up, down = names
    state, chosen = {}, {}
    gen = torch.Generator().manual_seed(7)
    for e in range(num_experts):
        for proj, (n, k) in ((gate, (i, h)), (up, (i, h)), (down, (h, i))):
            weight, values = _codes((n, k), seed=100 * e + len(proj) + n)
            key = f"{PREFIX}.{e}.{proj}"
            if fmt == "fp8-block":
                scale = (torch.rand(-(-n // 128), -(-k // 128), generator=gen) + 0.5) / 64
                full = _per_block(scale, n, k)
                state[f"{key}.weight_scale_inv"] = scale.to(scale_dtype)
            else:  # compressed-tensors, channel strategy
                scale = ((torch.rand(n, 1, generator=gen) + 0.5) / 64).to(scale_dtype)
                full = scale.double().expand(n, k)
                state[f"{key}.weight_scale"] = scale
                state[f"{key}.input_scale"] = torch.ones(1)  # W8A8 static act scale: ignored
            state[f"{key}.weight"] = weight
            chosen[e, proj] = values * full.to(scale_dtype).double()
    return state, chosen


def _check_fp8_experts(experts, chosen, num_experts, names=("gate_proj", "up_proj",
                                                            "down_proj")):
    gate, up, down = names
    assert isinstance(experts, Fp8Experts)
    assert experts.quant_scales == [experts.fc1_scales, experts.fc2_scales]
    assert experts.fc1_weights.dtype == F8 and experts.fc1_scales.dtype == torch.float32
    deq1 = dequantize_fp8(experts.fc1_weights, experts.fc1_scales, torch.float64)
    deq2 = dequantize_fp8(experts.fc2_weights, experts.fc2_scales, torch.float64)
    assert deq1.shape[0] == num_experts
    for e in range(num_experts):
        assert torch.equal(deq1[e], torch.cat([chosen[e, up], chosen[e, gate]]))  # [up; gate]
        assert torch.equal(deq2[e], chosen[e, down])


@pytest.mark.parametrize("fmt", ["fp8-block", "compressed-tensors"])
def test_load_fp8_experts(fmt):
    state, chosen = _fp8_checkpoint(fmt)
    experts = load_fp8_experts(state, PREFIX, 3, fmt)
    _check_fp8_experts(experts, chosen, 3)
    expected_groups = (128, 128) if fmt == "fp8-block" else (H, I)
    assert (experts.fc1_group_size, experts.fc2_group_size) == expected_groups
    assert experts.fc1_weights.shape == (3, 2 * I, H) and experts.fc2_scales.shape[2] == H


def test_load_fp8_names_aliases_and_bf16_scales():
    names = ("w1", "w3", "w2")
    state, chosen = _fp8_checkpoint("fp8-block", names=names, scale_dtype=torch.bfloat16)
    for fmt in ("fp8-block", "fp8", "deepseek"):
        experts = load_fp8_experts(state, PREFIX + ".", 3, fmt, gate="w1", up="w3", down="w2")
        _check_fp8_experts(experts, chosen, 3, names)
    state, chosen = _fp8_checkpoint("compressed-tensors")
    for fmt in ("compressed_tensors", "float-quantized", "naive-quantized"):
        _check_fp8_experts(load_fp8_experts(state, PREFIX, 3, fmt), chosen, 3)


def test_load_fp8_partial_blocks_need_a_finer_group():
    """I = 96: gate/up have 96 rows (one partial block row) and down has K = 96: G = 128 cannot
    serve it, G = 32 can (exactly)."""
    state, chosen = _fp8_checkpoint("fp8-block", h=256, i=96)
    with pytest.raises(ValueError, match=rf"{PREFIX}\.0\.down_proj\.weight_scale_inv \(128x128 "
                                         r"blocks\) of a \[256, 96\] weight: .*group_size=32"):
        load_fp8_experts(state, PREFIX, 3)
    experts = load_fp8_experts(state, PREFIX, 3, group_size=32)
    assert (experts.fc1_group_size, experts.fc2_group_size) == (32, 32)
    _check_fp8_experts(experts, chosen, 3)


def test_load_fp8_non_gated_and_fewer_experts():
    state, chosen = _fp8_checkpoint("fp8-block")
    experts = load_fp8_experts(state, PREFIX, 2, gate=None)
    assert experts.fc1_weights.shape == (2, I, H)
    for e in range(2):
        assert torch.equal(dequantize_fp8(experts.fc1_weights[e], experts.fc1_scales[e],
                                          torch.float64), chosen[e, "up_proj"])


def test_load_fp8_missing_tensors():
    state, _ = _fp8_checkpoint("fp8-block")
    with pytest.raises(KeyError, match=r"experts\.3\.up_proj\.weight' is missing"):
        load_fp8_experts(state, PREFIX, 4)
    del state[f"{PREFIX}.1.down_proj.weight_scale_inv"]
    with pytest.raises(KeyError, match=rf"'{PREFIX}\.1\.down_proj\.weight_scale_inv' is missing "
                                       r"from the state dict \(fp8-block layers need weight, "
                                       r"weight_scale_inv\)"):
        load_fp8_experts(state, PREFIX, 3)
    with pytest.raises(KeyError, match=r"no key starts with 'model\.layers\.7\.experts\.' "
                                       r"\(check the prefix\)"):
        load_fp8_experts(state, "model.layers.7.experts", 3)
    ct, _ = _fp8_checkpoint("compressed-tensors")
    with pytest.raises(KeyError, match=r"0\.up_proj\.weight_scale_inv' is missing .*; it has "
                                       r"weight_scale: a compressed-tensors checkpoint\? "
                                       r"\(fmt='compressed-tensors'\)"):
        load_fp8_experts(ct, PREFIX, 3, "fp8-block")
    block, _ = _fp8_checkpoint("fp8-block")
    with pytest.raises(KeyError, match=r"it has weight_scale_inv: a DeepSeek-style checkpoint\? "
                                       r"\(fmt='fp8-block'\)"):
        load_fp8_experts(block, PREFIX, 3, "compressed-tensors")


def test_load_fp8_bad_tensors_are_named():
    state, _ = _fp8_checkpoint("fp8-block")
    state[f"{PREFIX}.2.gate_proj.weight"] = _nan_at(state[f"{PREFIX}.2.gate_proj.weight"], 5, 6,
                                                    0xFF)
    with pytest.raises(ValueError, match=rf"{PREFIX}\.2\.gate_proj\.weight \[128, 256\] holds the "
                                         r"e4m3 NaN code \(0x7F/0xFF\) at \[5, 6\]"):
        load_fp8_experts(state, PREFIX, 3)
    state, _ = _fp8_checkpoint("fp8-block")
    other, _ = _codes((64, H), seed=9)
    state[f"{PREFIX}.1.up_proj.weight"] = other
    state[f"{PREFIX}.1.up_proj.weight_scale_inv"] = torch.ones(1, 2)
    with pytest.raises(ValueError, match=rf"{PREFIX}\.1\.up_proj has weights \[64, 256\] \(kernel "
                                         rf"layout\) but {PREFIX}\.0\.up_proj has \[128, 256\]: "
                                         "up_proj and gate_proj of every expert must have one"):
        load_fp8_experts(state, PREFIX, 3)
    state, _ = _fp8_checkpoint("compressed-tensors", num_experts=1)
    state[f"{PREFIX}.0.down_proj.weight_scale"] = torch.ones(256, 2)  # G = 64 for fc2 ...
    experts = load_fp8_experts(state, PREFIX, 1, "compressed-tensors")
    assert (experts.fc1_group_size, experts.fc2_group_size) == (H, 64)  # ... per GEMM
    state[f"{PREFIX}.0.gate_proj.weight_scale"] = torch.ones(I, 4)  # gate G = 64, up per-channel
    with pytest.raises(ValueError, match=r"0\.gate_proj has scales \[4, 128\] .* but "
                                         r".*0\.up_proj has \[1, 128\]"):
        load_fp8_experts(state, PREFIX, 1, "compressed-tensors")


def test_load_fp8_alignment_is_checked():
    state = {}
    for proj, (n, k) in (("gate_proj", (48, 128)), ("up_proj", (48, 128)),
                         ("down_proj", (128, 48))):
        weight, _ = _codes((n, k), seed=n)
        state.update({f"p.0.{proj}.weight": weight, f"p.0.{proj}.weight_scale": torch.ones(n, 1)})
    with pytest.raises(ValueError, match=r"the experts under 'p' do not make an FP8 MoE layer: "
                                         r"check_fp8_layer: I = 48 must be a multiple of 32"):
        load_fp8_experts(state, "p", 1, "compressed-tensors")


@pytest.mark.parametrize("kwargs,match", [
    ({"fmt": "gptq"}, "fmt must be one of 'fp8-block', 'compressed-tensors', got 'gptq'"),
    ({"num_experts": 0}, "num_experts must be a positive int, got 0"),
    ({"num_experts": 2.0}, "num_experts must be a positive int, got 2.0"),
    ({"block": (128, 0)}, "block must be a pair of positive ints"),
])
def test_load_fp8_argument_errors(kwargs, match):
    state, _ = _fp8_checkpoint("fp8-block", num_experts=1)
    args = {"num_experts": 1, "fmt": "fp8-block", **kwargs}
    with pytest.raises(ValueError, match=match):
        load_fp8_experts(state, PREFIX, args.pop("num_experts"), args.pop("fmt"), **args)


# ------------------------------------------------------------------ gpt-oss MXFP4

GPT_OSS = "model.layers.0.mlp.experts"


def _gpt_oss_bytes(codes):
    """gpt-oss blocks [E, N, K/32, 16] of e2m1 codes [E, N, K]: byte j of block b holds
    element 32b + 2j in its low nibble and 32b + 2j + 1 in its high nibble."""
    e, n, k = codes.shape
    c = codes.to(torch.int32).view(e, n, k // 32, 16, 2)
    return (c[..., 0] + 16 * c[..., 1]).to(torch.uint8)


def _gpt_oss_checkpoint(num_experts=3, hidden=96, inter=64, seed=0, bias=True):
    """gpt-oss's tensors of one layer, from chosen gate/up/down codes and scales: gate_up rows
    interleaved (row 2i = gate row i, row 2i + 1 = up row i). Returns the state dict and the
    chosen per-projection (codes [E, N, K], e8m0 [E, N, K/32], bias [E, N])."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n, k):
        codes = torch.randint(0, 16, (num_experts, n, k), generator=gen, dtype=torch.uint8)
        scales = torch.randint(110, 135, (num_experts, n, k // 32), generator=gen,
                               dtype=torch.uint8)
        b = torch.randn(num_experts, n, generator=gen).to(torch.bfloat16)
        return codes, scales, b

    chosen = {"gate": draw(inter, hidden), "up": draw(inter, hidden),
              "down": draw(hidden, inter)}
    interleaved = []
    for t in range(3):  # codes, scales, bias: gate_up row 2i = gate i, 2i + 1 = up i
        rows = []
        for i in range(inter):
            rows += [chosen["gate"][t][:, i], chosen["up"][t][:, i]]
        interleaved.append(torch.stack(rows, dim=1))
    state = {f"{GPT_OSS}.gate_up_proj_blocks": _gpt_oss_bytes(interleaved[0]),
             f"{GPT_OSS}.gate_up_proj_scales": interleaved[1],
             f"{GPT_OSS}.down_proj_blocks": _gpt_oss_bytes(chosen["down"][0]),
             f"{GPT_OSS}.down_proj_scales": chosen["down"][1]}
    if bias:
        state[f"{GPT_OSS}.gate_up_proj_bias"] = interleaved[2]
        state[f"{GPT_OSS}.down_proj_bias"] = chosen["down"][2]
    return state, chosen


def _mx_values(codes, scales):
    """Element (e, n, k) = E2M1[code] * 2^(scale[e, n, k // 32] - 127), float64."""
    return E2M1[codes.long()] * torch.pow(2.0, scales.double() - 127).repeat_interleave(32, -1)


def test_gpt_oss_interleave_by_hand():
    """Scales tag the rows (gate_up row r has e8m0 100 + r): fc1 columns must be the odd rows
    (up) then the even rows (gate); biases reordered alike; fc2 untouched but transposed."""
    e, hidden, inter = 1, 32, 32
    gate_up_scales = (100 + torch.arange(2 * inter, dtype=torch.uint8)).view(1, 2 * inter, 1)
    state = {f"{GPT_OSS}.gate_up_proj_blocks": torch.zeros(e, 2 * inter, 1, 16, dtype=torch.uint8),
             f"{GPT_OSS}.gate_up_proj_scales": gate_up_scales,
             f"{GPT_OSS}.gate_up_proj_bias": torch.arange(2 * inter, dtype=torch.float32)[None],
             f"{GPT_OSS}.down_proj_blocks": torch.zeros(e, hidden, 1, 16, dtype=torch.uint8),
             f"{GPT_OSS}.down_proj_scales": (10 + torch.arange(hidden, dtype=torch.uint8))
             .view(1, hidden, 1)}
    # One byte by hand: 0x2F = low nibble 0xF (-6, element 0), high 0x2 (+1.0, element 1).
    state[f"{GPT_OSS}.gate_up_proj_blocks"][0, 3, 0, 0] = 0x2F
    experts = load_mxfp4_experts(state, GPT_OSS)
    assert isinstance(experts, Mxfp4Experts)
    up_rows = list(range(1, 2 * inter, 2))
    gate_rows = list(range(0, 2 * inter, 2))
    assert experts.fc1_scales[0, 0].tolist() == [100 + r for r in up_rows + gate_rows]
    assert experts.fc1_bias[0].tolist() == [float(r) for r in up_rows + gate_rows]
    assert experts.fc2_scales[0, 0].tolist() == [10 + n for n in range(hidden)]
    assert experts.fc2_bias is None
    # gate_up row 3 is up row 1: fc1 row 1.
    assert experts.fc1_weights[0, 1, 0].item() == 0x2F
    deq = dequantize_mxfp4(experts.fc1_weights, experts.fc1_scales, torch.float64)
    assert deq[0, 1, :2].tolist() == [-6 * 2.0 ** (103 - 127), 1.0 * 2.0 ** (103 - 127)]
    assert deq[0].count_nonzero().item() == 2


@pytest.mark.parametrize("hidden,inter", [(96, 64), (64, 32), (160, 96)])
def test_gpt_oss_exact(hidden, inter):
    state, chosen = _gpt_oss_checkpoint(hidden=hidden, inter=inter, seed=hidden + inter)
    experts = load_mxfp4_experts(state, GPT_OSS)
    assert experts.fc1_weights.shape == (3, 2 * inter, hidden // 2)
    assert experts.fc1_scales.shape == (3, hidden // 32, 2 * inter)
    assert experts.fc2_weights.shape == (3, hidden, inter // 2)
    assert experts.fc2_scales.shape == (3, inter // 32, hidden)
    assert experts.quant_scales == [experts.fc1_scales, experts.fc2_scales]
    assert all(t.is_contiguous() for t in (experts.fc1_weights, experts.fc1_scales,
                                            experts.fc2_weights, experts.fc2_scales))
    up, gate, down = (_mx_values(*chosen[p][:2]) for p in ("up", "gate", "down"))
    deq1 = dequantize_mxfp4(experts.fc1_weights, experts.fc1_scales, torch.float64)
    deq2 = dequantize_mxfp4(experts.fc2_weights, experts.fc2_scales, torch.float64)
    assert torch.equal(deq1, torch.cat([up, gate], dim=1))
    assert torch.equal(deq2, down)
    assert torch.equal(experts.fc1_bias, torch.cat([chosen["up"][2], chosen["gate"][2]], dim=1))
    assert torch.equal(experts.fc2_bias, chosen["down"][2])
    assert experts.fc1_bias.dtype == torch.bfloat16
    converted = load_mxfp4_experts(state, GPT_OSS + ".", bias_dtype=torch.float32)
    assert converted.fc1_bias.dtype == torch.float32
    assert torch.equal(converted.fc1_bias, experts.fc1_bias.float())


def test_gpt_oss_matches_transformers():
    """transformers' own gpt-oss dequantiser (skipped without it): its [E, K, N] weights with
    gate = columns 0::2 and up = columns 1::2 (GptOssExperts._apply_gate) are our fc1 [up; gate]
    transposed, and its down_proj our fc2 transposed."""
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    state, _ = _gpt_oss_checkpoint(hidden=96, inter=64, seed=11)
    experts = load_mxfp4_experts(state, GPT_OSS)
    gate_up = mx.convert_moe_packed_tensors(state[f"{GPT_OSS}.gate_up_proj_blocks"],
                                            state[f"{GPT_OSS}.gate_up_proj_scales"],
                                            dtype=torch.float32)  # [E, H, 2I]
    down = mx.convert_moe_packed_tensors(state[f"{GPT_OSS}.down_proj_blocks"],
                                         state[f"{GPT_OSS}.down_proj_scales"],
                                         dtype=torch.float32)  # [E, I, H]
    assert gate_up.shape == (3, 96, 128) and down.shape == (3, 64, 96)
    deq1 = dequantize_mxfp4(experts.fc1_weights, experts.fc1_scales)
    deq2 = dequantize_mxfp4(experts.fc2_weights, experts.fc2_scales)
    expected1 = torch.cat([gate_up[..., 1::2], gate_up[..., 0::2]], dim=2).transpose(1, 2)
    assert torch.equal(deq1, expected1)
    assert torch.equal(deq2, down.transpose(1, 2))
    bias = state[f"{GPT_OSS}.gate_up_proj_bias"]
    assert torch.equal(experts.fc1_bias, torch.cat([bias[:, 1::2], bias[:, 0::2]], dim=1))


def test_gpt_oss_missing_tensors():
    state, _ = _gpt_oss_checkpoint()
    for key in ("gate_up_proj_scales", "down_proj_blocks"):
        partial = {k: v for k, v in state.items() if not k.endswith(key)}
        proj = key.rsplit("_", 1)[0]
        with pytest.raises(KeyError, match=rf"'{GPT_OSS}\.{key}' is missing from the state dict "
                                           rf"\(gpt-oss MXFP4 experts need {proj}_blocks and "
                                           rf"{proj}_scales\)"):
            load_mxfp4_experts(partial, GPT_OSS)
    with pytest.raises(KeyError, match=r"no key starts with 'model\.layers\.1\.mlp\.experts\.' "
                                       r"\(check the prefix\)"):
        load_mxfp4_experts(state, "model.layers.1.mlp.experts")
    no_bias, _ = _gpt_oss_checkpoint(bias=False)
    experts = load_mxfp4_experts(no_bias, GPT_OSS)
    assert experts.fc1_bias is None and experts.fc2_bias is None


def _replace(key, make):
    def change(state):
        state[f"{GPT_OSS}.{key}"] = make(state[f"{GPT_OSS}.{key}"])
        return state
    return change


def _nan_scale(t):
    t = t.clone()
    t[1, 5, 2] = 255
    return t


@pytest.mark.parametrize("change,match", [
    (_replace("gate_up_proj_blocks", lambda t: t.to(torch.int8)),
     r"gate_up_proj_blocks must be uint8 \[E, N, K/32, 16\] .*got int8 \[3, 128, 3, 16\]"),
    (_replace("gate_up_proj_blocks", lambda t: t.reshape(3, 128, 48)),
     r"gate_up_proj_blocks must be uint8 \[E, N, K/32, 16\]"),
    (_replace("gate_up_proj_scales", lambda t: t[:, :, :2]),
     (r"gate_up_proj_scales must be uint8 e8m0 \[E, N, K/32\] = \[3, 128, 3\] for "
     r".*gate_up_proj_blocks \[3, 128, 3, 16\], got uint8 \[3, 128, 2\]")),
    (_replace("gate_up_proj_scales", _nan_scale),
     r"gate_up_proj_scales holds the e8m0 NaN code 255 at \[1, 5, 2\]"),
    (_replace("down_proj_blocks", lambda t: t[:, :64]),
     (r"down_proj_blocks \[E, N, K/32, 16\] = \[3, 64, 2, 16\] must be \[E, H, I/32, 16\] with "
      r"H = 96 \(the gate_up input size\) and I = 64 \(half its rows\)")),
    (_replace("down_proj_blocks", lambda t: t[:, :, :1]), r"= \[3, 96, 1, 16\] must be"),
    (_replace("down_proj_blocks", lambda t: t[:2]),
     "down_proj_blocks has 2 experts but gate_up_proj_blocks has 3"),
    (_replace("down_proj_bias", lambda t: t[:, :10]),
     r"down_proj_bias must be a float \[3, 96\] tensor, got bfloat16 \[3, 10\]"),
    (_replace("gate_up_proj_bias", lambda t: t.to(torch.int32)),
     r"gate_up_proj_bias must be a float \[3, 128\] tensor, got int32"),
])
def test_gpt_oss_bad_tensors_are_named(change, match):
    state, _ = _gpt_oss_checkpoint()
    with pytest.raises(ValueError, match=match):
        load_mxfp4_experts(change(state), GPT_OSS)


def test_gpt_oss_alignment_and_arguments():
    """gpt-oss's format implies the kernels' alignment (K in whole MX blocks, I = 32 * blocks,
    2I rows a multiple of 64): a layer that breaks it is refused by the checks above or, for
    a gate_up whose row count disagrees with down, here."""
    state, _ = _gpt_oss_checkpoint()
    short = dict(state)
    short[f"{GPT_OSS}.gate_up_proj_blocks"] = state[f"{GPT_OSS}.gate_up_proj_blocks"][:, :96]
    short[f"{GPT_OSS}.gate_up_proj_scales"] = state[f"{GPT_OSS}.gate_up_proj_scales"][:, :96]
    with pytest.raises(ValueError, match=r"down_proj_blocks .* must be \[E, H, I/32, 16\] with "
                                         r"H = 96 .* and I = 48"):
        load_mxfp4_experts(short, GPT_OSS)
    state, _ = _gpt_oss_checkpoint()
    with pytest.raises(ValueError, match="bias_dtype must be float16"):
        load_mxfp4_experts(state, GPT_OSS, bias_dtype=torch.int8)
    odd = dict(state)
    odd[f"{GPT_OSS}.gate_up_proj_blocks"] = state[f"{GPT_OSS}.gate_up_proj_blocks"][:, :127]
    odd[f"{GPT_OSS}.gate_up_proj_scales"] = state[f"{GPT_OSS}.gate_up_proj_scales"][:, :127]
    with pytest.raises(ValueError, match="has 127 rows: gate and up interleaved need an even"):
        load_mxfp4_experts(odd, GPT_OSS)


def test_gpt_oss_names():
    state, chosen = _gpt_oss_checkpoint(num_experts=2)
    renamed = {k.replace("gate_up_proj", "mlp1").replace("down_proj", "mlp2"): v
               for k, v in state.items()}
    experts = load_mxfp4_experts(renamed, GPT_OSS, gate_up="mlp1", down="mlp2")
    deq2 = dequantize_mxfp4(experts.fc2_weights, experts.fc2_scales, torch.float64)
    assert torch.equal(deq2, _mx_values(*chosen["down"][:2]))
    assert not math.isnan(deq2.sum().item())
