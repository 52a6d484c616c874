"""FP8 (e4m3) and MXFP4 weight-only calls on CPU: validation of every argument, the raw op, the
runner keys, tactics, the tuner's keys and profiling arguments, the cache, the benchmark's bytes
and the command line (fp8_spec).

FP8 runs with ``use_fp8_woq_group_scaling=True`` (float8_e4m3fn weights, float32 scales
``[E, K/G, N]``); MXFP4 with ``use_w4_group_scaling=True`` and uint8 (e8m0) scales ``[E, K/32,
N]``. The fake extension (tests/_fake_ext.py) decodes e4m3 and e2m1/e8m0 from their bit fields
itself (not with cutlass_moe.fp8 / cutlass_moe.mxfp4), so comparing its output with
``reference_moe`` on ``dequantize_fp8``'d / ``dequantize_mxfp4``'d weights checks the pointers,
group sizes and layouts the Python layer passes as well as the layout both sides read.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from _fake_ext import FP8_ENUM, MXFP4_ENUM, FakeMoeRunner, make_fake_extension
from _helpers import random_routing, random_weights, rel_l2
from cutlass_moe import (
    ActivationType,
    _ext,
    autotuner,
    bench,
    cli,
    cutlass_fused_moe,
    dequantize_fp8,
    dequantize_mxfp4,
    quantize_moe_weights_fp8,
    quantize_moe_weights_mxfp4,
    reference_moe,
    synthetic,
    tactics,
    timing,
    tuning_cache,
    validation,
)
from cutlass_moe.presets import MODEL_PRESETS
from cutlass_moe.tuning_cache import ShapeKey, TuningKey

BF16 = torch.bfloat16
CPU = torch.device("cpu")
E, H, I, K, T = 4, 64, 32, 2, 9
FP8_DTYPES = (BF16, _ext.FP8, BF16)
MXFP4_DTYPES = (BF16, _ext.MXFP4, BF16)
FLAGS = {"fp8": {"use_fp8_woq_group_scaling": True}, "mxfp4": {"use_w4_group_scaling": True}}
FORMATS = ("fp8", "mxfp4")


def _name(fmt, tile="m16n128k64_w16x32x64_s4", act="bf16"):
    return f"sm80_{act}_{fmt}_{tile}"


SMALL_M, MID_M, PREFILL = ("m16n128k64_w16x32x64_s4", "m32n128k64_w32x32x64_s4",
                           "m128n128k64_w64x64x64_s3")


def _problem(fmt="fp8", t=T, e=E, h=H, i=I, k=K, activation=ActivationType.Swiglu,
             group_size=32, seed=0):
    """A call's tensors: x, ids, router, q1, q2, quant_scales, and the dequantised d1, d2 (bf16,
    by the library's own dequantisers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(BF16)
    ids, router = random_routing(t, e, k, generator=gen)
    gated = activation in (ActivationType.Swiglu, ActivationType.Geglu)
    w1, w2 = random_weights(e, h, i, gated, BF16, generator=gen)
    if fmt == "fp8":
        q1, q2, scales = quantize_moe_weights_fp8(w1, w2, group_size=group_size)
        d1, d2 = (dequantize_fp8(q, s, BF16) for q, s in zip((q1, q2), scales))
    else:
        q1, q2, scales = quantize_moe_weights_mxfp4(w1, w2)
        d1, d2 = (dequantize_mxfp4(q, s, BF16) for q, s in zip((q1, q2), scales))
    return types.SimpleNamespace(x=x, ids=ids, router=router, q1=q1, q2=q2, scales=scales,
                                 d1=d1, d2=d2, w1=w1, w2=w2)


def _runner(fmt="fp8", out=BF16):
    return _ext.get_runner(BF16, fmt, out)


# ------------------------------------------------------------------ validation (no extension)


@pytest.fixture
def no_extension(monkeypatch):
    """No extension and no GPU: a call that passes validation ends in "no CUDA device"."""
    monkeypatch.delenv(validation.CHECK_INPUTS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with _ext._replaced_extension(None):
        yield


def _call_args(fmt="fp8", **overrides):
    p = _problem(fmt, activation=overrides.pop("activation_type", ActivationType.Swiglu))
    args = {"input": p.x, "token_selected_experts": p.ids, "token_final_scales": p.router,
            "fc1_expert_weights": p.q1, "fc2_expert_weights": p.q2, "output_dtype": BF16,
            "quant_scales": p.scales, **FLAGS[fmt]}
    args.update(overrides)
    return args


def _expect(exc, match, fmt="fp8", **overrides):
    with pytest.raises(exc, match=match):
        cutlass_fused_moe(**_call_args(fmt, **overrides))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_valid_call_passes_validation(no_extension, fmt):
    _expect(RuntimeError, "no CUDA device", fmt)
    s1, s2 = _call_args(fmt)["quant_scales"]
    _expect(RuntimeError, "no CUDA device", fmt, quant_scales=(s1, s2, None, None))


def _prepared(fmt="fp8", **overrides):
    args = _call_args(fmt, **overrides)
    names = ("input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
             "fc2_expert_weights", "output_dtype", "quant_scales")
    defaults = {
        "fc1_expert_biases": None, "fc2_expert_biases": None, "input_sf": None,
        "swiglu_alpha": None, "swiglu_beta": None, "swiglu_limit": None, "tp_size": 1,
        "tp_rank": 0, "ep_size": 1, "ep_rank": 0, "cluster_size": 1, "cluster_rank": 0,
        "output": None, "enable_alltoall": False, "use_deepseek_fp8_block_scale": False,
        "use_w4_group_scaling": False, "use_int8_woq_per_channel": False,
        "use_mxfp8_act_scaling": False, "min_latency_mode": False, "use_packed_weights": False,
        "use_wfp4afp8_humming": False, "tune_max_num_tokens": 8192,
        "activation_type": ActivationType.Swiglu, "profile_ids": None, "workspace_buffer": None,
        "tactics": None,
    }
    return validation.prepare_call(**{n: args.pop(n) for n in names}, **{**defaults, **args})


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepared_call_carries_the_format(no_extension, fmt):
    p = _problem(fmt)
    call = _prepared(fmt, fc1_expert_weights=p.q1, fc2_expert_weights=p.q2,
                     quant_scales=p.scales)
    assert call.weight_format == fmt
    assert call.fc1_expert_weights is p.q1 and call.fc2_expert_weights is p.q2
    assert call.fc1_weight_scales is p.scales[0] and call.fc2_weight_scales is p.scales[1]
    assert call.fc1_weight_zeros is None and call.fc2_weight_zeros is None


def test_the_new_keyword_is_keyword_only_next_to_int8():
    import inspect

    params = inspect.signature(cutlass_fused_moe).parameters
    flag = params["use_fp8_woq_group_scaling"]
    assert flag.kind == flag.KEYWORD_ONLY and flag.default is False
    names = list(params)
    assert names.index("use_fp8_woq_group_scaling") == names.index("use_int8_woq_per_channel") + 1
    assert "use_fp8_woq_group_scaling" in cutlass_fused_moe.__doc__
    assert "MXFP4" in cutlass_fused_moe.__doc__


def test_flags_exclude_each_other(no_extension):
    _expect(ValueError, r"use_fp8_woq_group_scaling=True \(float8_e4m3fn weights\) and "
            r"use_int8_woq_per_channel=True .*exclude each other", use_int8_woq_per_channel=True)
    _expect(ValueError, r"use_fp8_woq_group_scaling=True .* and use_w4_group_scaling=True .*"
            "exclude each other", use_w4_group_scaling=True)


def test_deepseek_block_scale_mode_points_to_the_weight_only_mode(no_extension):
    for exc in (ValueError, NotImplementedError):
        _expect(exc, r"use_deepseek_fp8_block_scale=True is not supported; .*activations to "
                r"fp8 too.*use_fp8_woq_group_scaling=True .*cutlass_moe\.fp8\.expand_block_scales",
                use_deepseek_fp8_block_scale=True)


@pytest.mark.parametrize("fmt,match", [
    ("fp8", (r"use_fp8_woq_group_scaling=True with input dtype torch.float8_e4m3fn: FP8 "
            r"weight-only needs float16 or bfloat16 input")),
    ("mxfp4", (r"use_w4_group_scaling=True with MXFP4 \(uint8 e8m0\) scales and input dtype "
              r"torch.float8_e4m3fn")),
])
def test_fp8_activations_are_refused(no_extension, fmt, match):
    x = _call_args(fmt)["input"]
    _expect(ValueError, match, fmt, input=x.float().to(torch.float8_e4m3fn))


@pytest.mark.parametrize("name", ["fc1_expert_weights", "fc2_expert_weights"])
@pytest.mark.parametrize("dtype", [BF16, torch.float8_e5m2, torch.uint8])
def test_fp8_weights_must_be_e4m3fn(no_extension, name, dtype):
    w = _call_args()[name]
    bad = w.float().to(dtype) if dtype.is_floating_point else w.view(torch.uint8)
    _expect(ValueError, f"use_fp8_woq_group_scaling=True needs float8_e4m3fn {name} "
            rf"\(\[E, N, K\], K contiguous\), got {dtype}", **{name: bad})
    if dtype == torch.float8_e5m2:
        _expect(ValueError, "only e4m3fn", **{name: bad})


def test_fp8_weights_need_the_flag(no_extension):
    _expect(ValueError, r"fc1_expert_weights is float8_e4m3fn \[4, 64, 64\]: FP8 weight-only "
            r"weights need use_fp8_woq_group_scaling=True", use_fp8_woq_group_scaling=False)
    _expect(ValueError, "fc1_expert_weights is float8_e4m3fn", use_fp8_woq_group_scaling=False,
            quant_scales=None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value,exc,match", [
    (None, ValueError, "needs quant_scales=.*; got None"),
    ([], ValueError, r"got 0 tensor\(s\)"),
    ("three", ValueError, r"got 3 tensor\(s\)"),
    ("not_a_tensor", TypeError,
     r"quant_scales\[1\] \(fc2_scales\) must be a torch.Tensor, got float"),
])
def test_quant_scales_list(no_extension, fmt, value, exc, match):
    s1, s2 = _call_args(fmt)["quant_scales"]
    named = {"three": [s1, s2, s2], "not_a_tensor": [s1, 1.0]}
    if fmt == "mxfp4" and value is None:
        match = r"needs quant_scales=.*MXFP4 weights: uint8 e8m0 scales \[E, K/32, N\]"
    _expect(exc, match, fmt, quant_scales=named.get(value, value) if isinstance(value, str)
            else value)


def test_fp8_quant_scales_must_be_a_list(no_extension):
    s1 = _call_args()["quant_scales"][0]
    _expect(TypeError, r"use_fp8_woq_group_scaling=True needs quant_scales=\[fc31_scales "
            r"\[E=4, H/G1, N1=64\], fc2_scales \[E=4, I/G2, H=64\]\] float32.*got Tensor",
            quant_scales=s1)


@pytest.mark.parametrize("fmt,label", [("fp8", "fp8"), ("mxfp4", "MXFP4")])
def test_zero_points_are_refused(no_extension, fmt, label):
    s1, s2 = _call_args(fmt)["quant_scales"]
    zeros = torch.zeros_like(s1, dtype=BF16)
    _expect(ValueError, rf"quant_scales\[2\] \(fc31_zeros\): {label} weights have no zero "
            "points", fmt, quant_scales=[s1, s2, zeros, None])
    _expect(ValueError, rf"quant_scales\[3\] \(fc2_zeros\): {label} weights have no zero "
            "points", fmt, quant_scales=[s1, s2, None, torch.zeros_like(s2, dtype=BF16)])


def test_fp8_scale_dtypes(no_extension):
    s1, s2 = _call_args()["quant_scales"]
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must be float32 \(fp8 weight-only "
            r"scales\), got torch.bfloat16", quant_scales=[s1.to(BF16), s2])
    _expect(ValueError, r"quant_scales\[1\] \(fc2_scales\) must be float32 .*got torch.uint8 "
            r"\(uint8 e8m0 scales are MXFP4's", quant_scales=[s1, s2.to(torch.uint8)])


def test_fp8_scale_shapes(no_extension):
    s1, s2 = _call_args()["quant_scales"]  # [4, 2, 64] (G1 = 32), [4, 1, 64] (G2 = 32)
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must be \[E=4, H/G, N1=64\] \(one "
            r"row of 64 scales per group of G elements along H=64\), got \[4, 64, 2\] \(it "
            "looks transposed", quant_scales=[s1.transpose(1, 2).contiguous(), s2])
    _expect(ValueError, r"quant_scales\[1\] \(fc2_scales\) must be \[E=4, I/G, H=64\].*got "
            r"\[4, 1, 32\]", quant_scales=[s1, s2[..., :32]])
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must be .*got \[4\] \(per-tensor "
            r"scales: expand them to per-channel \[E, 1, N1\]", quant_scales=[torch.ones(E), s2])
    _expect(ValueError, r"got \[4, 1, 1\] \(per-tensor scales", quant_scales=[
        torch.ones(E, 1, 1), s2])
    # DeepSeek-style block scales [E, ceil(N/128), ceil(K/128)] = [4, 1, 1] for fc1 here; use a
    # layer where they differ from per-tensor ones: fc2's [E, ceil(H/128), ceil(I/128)] = same.
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must be .*got \[4, 2, 64, 1\]",
            quant_scales=[s1.unsqueeze(-1), s2])


def test_fp8_block_scales_hint(no_extension):
    """[E, ceil(N/128), ceil(K/128)] scales (DeepSeek-V3 weight_scale_inv per expert) point to
    expand_block_scales."""
    p = _problem(h=256, i=384, group_size=128)  # N1 = 768, H = 256, I = 384
    args = {"input": p.x, "token_selected_experts": p.ids, "token_final_scales": p.router,
            "fc1_expert_weights": p.q1, "fc2_expert_weights": p.q2, "output_dtype": BF16,
            "use_fp8_woq_group_scaling": True,
            "quant_scales": [torch.ones(E, 6, 2), p.scales[1]]}
    with pytest.raises(ValueError, match=r"quant_scales\[0\] \(fc31_scales\) must be .*got "
                       r"\[4, 6, 2\] \(it looks like 128x128 block scales .*"
                       r"cutlass_moe.fp8.expand_block_scales"):
        cutlass_fused_moe(**args)


@pytest.mark.parametrize("rows,match", [
    (4, (r"quant_scales\[0\] \(fc31_scales\) has 4 group rows along H=64: the group size G = "
        r"H / rows must be a multiple of 32 that divides H \(got G = 64/4 = 16\)")),
    (3, r"has 3 group rows along H=64"),
])
def test_fp8_group_size_rule(no_extension, rows, match):
    s2 = _call_args()["quant_scales"][1]
    _expect(ValueError, match, quant_scales=[torch.ones(E, rows, 2 * I), s2])


def test_fp8_per_channel_and_different_group_sizes_pass(no_extension):
    s2 = torch.ones(E, 1, H)
    _expect(RuntimeError, "no CUDA device", quant_scales=[torch.ones(E, 1, 2 * I), s2])
    _expect(RuntimeError, "no CUDA device", quant_scales=[torch.ones(E, 2, 2 * I), s2])


def test_mxfp4_weights_must_be_packed_bytes(no_extension):
    w = torch.zeros(E, 2 * I, H // 2, dtype=BF16)
    _expect(ValueError, r"use_w4_group_scaling=True with uint8 \(e8m0\) scales selects MXFP4 "
            r"and needs packed fc1_expert_weights \(uint8 \[E, N, K/2\], two e2m1 codes per "
            r"byte.*got torch.bfloat16 \[4, 64, 32\]", "mxfp4", fc1_expert_weights=w)
    _expect(ValueError, "selects MXFP4 and needs packed fc2_expert_weights", "mxfp4",
            fc2_expert_weights=torch.zeros(E, H, I // 2, dtype=torch.float8_e4m3fn))


def test_mxfp4_int8_typed_bytes_are_read_as_uint8(no_extension):
    q1 = _call_args("mxfp4")["fc1_expert_weights"]
    call = _prepared("mxfp4", fc1_expert_weights=q1.view(torch.int8))
    assert call.fc1_expert_weights.dtype == torch.uint8
    assert call.fc1_expert_weights.data_ptr() == q1.data_ptr()


def test_mxfp4_unpacked_weight_shapes(no_extension):
    _expect(ValueError, r"fc1_expert_weights must be \[E, 2\*I, H/2\] \(rows: up, then gate\) = "
            r"\[4, 64, 32\] \(packed MXFP4: two e2m1 codes per byte\)", "mxfp4",
            fc1_expert_weights=torch.zeros(E, 2 * I, H, dtype=torch.uint8))


def test_mxfp4_scales_have_one_row_per_32(no_extension):
    s1, s2 = _call_args("mxfp4")["quant_scales"]  # [4, 2, 64], [4, 1, 64]
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must be \[E=4, H/32=2, N1=64\] .*got "
            r"\[4, 1, 64\] \(MXFP4's group size is fixed at 32: H=64 needs 2 rows\)", "mxfp4",
            quant_scales=[s1[:, :1].contiguous(), s2])
    _expect(ValueError, r"quant_scales\[1\] \(fc2_scales\) must be \[E=4, I/32=1, H=64\].*got "
            r"\[4, 64, 1\] \(it looks transposed", "mxfp4",
            quant_scales=[s1, s2.transpose(1, 2).contiguous()])


@pytest.mark.parametrize("index", [0, 1])
def test_formats_mixed_between_the_gemms(no_extension, index):
    """One GEMM's scales uint8 (MXFP4), the other's 16-bit (int4): a ValueError naming it."""
    scales = list(_call_args("mxfp4")["quant_scales"])
    scales[index] = torch.ones_like(scales[index], dtype=BF16)
    name = ("fc31_scales", "fc2_scales")[index]
    _expect(ValueError, rf"quant_scales\[{index}\] \({name}\) is torch.bfloat16 .* while the "
            r"other GEMM's scales are uint8 \(e8m0, MXFP4\): the two GEMMs' weights must have "
            "one format", "mxfp4", quant_scales=scales)
    # fp8: one GEMM's weights fp8, the other's packed bytes.
    q2 = _call_args("mxfp4")["fc2_expert_weights"]
    _expect(ValueError, "needs float8_e4m3fn fc2_expert_weights", fc2_expert_weights=q2)


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="no float8_e8m0fnu in torch")
def test_mxfp4_float8_e8m0fnu_scales_are_read_as_bytes(no_extension):
    s1, s2 = _call_args("mxfp4")["quant_scales"]
    call = _prepared("mxfp4", quant_scales=[s1.view(torch.float8_e8m0fnu), s2])
    assert call.weight_format == "mxfp4" and call.fc1_weight_scales.dtype == torch.uint8
    assert call.fc1_weight_scales.data_ptr() == s1.data_ptr()


@pytest.mark.parametrize("fmt,h,i,match", [
    ("fp8", 48, 32, (r"fp8 fc1_expert_weights \[E, N, K\] = \[4, 64, 48\]: K=H=48 must be a "
                    "multiple of 32")),
    ("fp8", 64, 40, (r"fp8 fc2_expert_weights \[E, N, K\] = \[4, 64, 40\]: K=I=40 must be a "
                    "multiple of 32")),
    ("mxfp4", 48, 32, (r"mxfp4 fc1_expert_weights \[E, N, K/2\] = \[4, 64, 24\]: K=H=48 must "
                      "be a multiple of 32")),
    ("mxfp4", 64, 16, r"mxfp4 fc2_expert_weights .*K=I=16 must be a multiple of 32"),
])
def test_alignment(no_extension, fmt, h, i, match):
    """K (H for fc1, I for fc2) in steps of 32; built by hand: the quantisers refuse these."""
    n1, pack = 2 * i, 2 if fmt == "mxfp4" else 1
    wdtype = torch.uint8 if fmt == "mxfp4" else torch.float8_e4m3fn
    sdtype = torch.uint8 if fmt == "mxfp4" else torch.float32
    args = _call_args(fmt)
    args["input"] = torch.randn(T, h).to(BF16)
    args["fc1_expert_weights"] = torch.zeros(E, n1, h // pack, dtype=wdtype)
    args["fc2_expert_weights"] = torch.zeros(E, h, i // pack, dtype=wdtype)
    args["quant_scales"] = [torch.ones(E, 1, n1).to(sdtype), torch.ones(E, 1, h).to(sdtype)]
    with pytest.raises(ValueError, match=match):
        cutlass_fused_moe(**args)


def test_mxfp4_n_alignment_rule():
    """N % 16 (16-byte rows of uint8 scales): unreachable through a call (H and I are multiples
    of 32), checked by the rule itself."""
    validation.check_mxfp4_alignment(("w", torch.zeros(1, 16, 16, dtype=torch.uint8), "H"))
    with pytest.raises(ValueError, match=r"w \[E, N, K/2\] = \[1, 8, 16\]: N=8 must be a "
                       r"multiple of 16 \(mxfp4 weights\)"):
        validation.check_mxfp4_alignment(("w", torch.zeros(1, 8, 16, dtype=torch.uint8), "H"))
    validation.check_fp8_alignment(("w", torch.zeros(1, 8, 32), "H"))
    with pytest.raises(ValueError, match="N=4 must be a multiple of 8"):
        validation.check_fp8_alignment(("w", torch.zeros(1, 4, 32), "H"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_devices_and_layouts_are_named(no_extension, fmt):
    s1, s2 = _call_args(fmt)["quant_scales"]
    _expect(ValueError, r"all tensors must be on input's device cpu; found quant_scales\[1\] "
            r"\(fc2_scales\) on meta", fmt, quant_scales=[s1, s2.to("meta")])
    w = _call_args(fmt)["fc1_expert_weights"]
    strided = torch.empty(w.shape[0], w.shape[1], 2 * w.shape[2], dtype=w.dtype)[..., ::2]
    _expect(ValueError, "fc1_expert_weights must be contiguous", fmt, fc1_expert_weights=strided)
    _expect(NotImplementedError, "output_dtype torch.float16", fmt, output_dtype=torch.float16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_must_not_overlap_the_scales(no_extension, fmt):
    s1, s2 = _call_args(fmt)["quant_scales"]
    buffer = torch.zeros(T * H * 2 + s2.numel() * s2.element_size(), dtype=torch.uint8)
    shared = buffer[: s2.numel() * s2.element_size()].view(s2.dtype).view(s2.shape)
    shared.copy_(s2)
    output = buffer[: T * H * 2].view(BF16).view(T, H)
    _expect(ValueError, r"output overlaps quant_scales\[1\] \(fc2_scales\)", fmt,
            quant_scales=[s1, shared], output=output)


# ------------------------------------------------------------------ the raw op


def _op_args(fmt="fp8", **overrides):
    p = _problem(fmt, seed=5)
    args = {
        "output": torch.empty(T, H, dtype=BF16), "input": p.x, "token_selected_experts": p.ids,
        "token_final_scales": p.router, "fc1_expert_weights": p.q1, "fc2_expert_weights": p.q2,
        "fc1_weight_scales": p.scales[0], "fc2_weight_scales": p.scales[1],
        "fc1_expert_biases": None, "fc2_expert_biases": None, "swiglu_alpha": None,
        "swiglu_beta": None, "swiglu_limit": None, "workspace_buffer": None,
        "activation": int(ActivationType.Swiglu), "expert_start": 0, "num_experts_total": E,
        "tune_max_num_tokens": 8192, "tactic1": "", "tactic2": "", "enable_pdl": True,
        "clamped_relu2_limit": None, "situ_beta": None, "situ_linear_beta": None,
        "fc1_weight_zeros": None, "fc2_weight_zeros": None, "weight_format": fmt,
    }
    args.update(overrides)
    return args


def _run_op(args):
    torch.ops.cutlass_moe.fused_moe(*args.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_op_runs(fake_cpu, fmt):
    args = _op_args(fmt)
    _run_op(args)
    (call,) = _runner(fmt).calls
    assert (call["fc1_group_size"], call["fc2_group_size"]) == (32, 32)
    assert call["inter_size"] == I and call["fc1_zeros"] == call["fc2_zeros"] == 0
    assert call["fc1_scales"] == args["fc1_weight_scales"].data_ptr()


@pytest.mark.parametrize("fmt,overrides,match", [
    ("fp8", lambda a: {"weight_format": ""},
     (r"fc1_expert_weights must be torch.bfloat16 or int8, got torch.float8_e4m3fn \("
     r"float8_e4m3fn weights need weight_format='fp8'\)")),
    ("fp8", lambda a: {"weight_format": "mxfp4"},
     "weight_format 'mxfp4' needs packed uint8 fc1_expert_weights"),
    ("mxfp4", lambda a: {"weight_format": "fp8"},
     "weight_format 'fp8' needs float8_e4m3fn fc1_expert_weights"),
    ("fp8", lambda a: {"fc2_weight_scales": None},
     "fp8 expert weights need fc1_weight_scales and fc2_weight_scales"),
    ("fp8", lambda a: {"fc1_weight_scales": torch.ones(E, 4, 2 * I)},
     "fc1_weight_scales has 4 group rows along H=64"),
    ("fp8", lambda a: {"fc2_weight_scales": torch.ones(E, 1, H, dtype=BF16)},
     r"fc2_weight_scales must be \[4, 1, 64\] of torch.float32"),
    ("fp8", lambda a: {"fc1_weight_zeros": torch.zeros(E, 2, 2 * I, dtype=BF16),
                       "fc2_weight_zeros": torch.zeros(E, 1, H, dtype=BF16)},
     "fc1_weight_zeros and fc2_weight_zeros are only for int4 weights"),
    ("mxfp4", lambda a: {"fc1_weight_scales": torch.ones(E, 1, 2 * I, dtype=torch.uint8)},
     r"fc1_weight_scales must be \[4, 2, 64\] of torch.uint8"),
    ("mxfp4", lambda a: {"fc2_weight_scales": torch.ones(E, 1, H, dtype=BF16)},
     r"fc2_weight_scales must be \[4, 1, 64\] of torch.uint8"),
    ("mxfp4", lambda a: {"fc2_weight_zeros": torch.zeros(E, 1, H, dtype=BF16),
                         "fc1_weight_zeros": torch.zeros(E, 2, 2 * I, dtype=BF16)},
     "only for int4 weights"),
    ("mxfp4", lambda a: {"weight_format": "int4"},
     r"fc1_weight_scales must be \[4, 2, 64\] of torch.bfloat16"),
    ("mxfp4", lambda a: {"fc1_weight_scales": a["output"].view(-1).view(torch.uint8)
                         [: E * 2 * 2 * I].view(E, 2, 2 * I)}, "output overlaps fc1_weight_scales"),
])
def test_raw_op_refuses_inconsistent_arguments(fake_cpu, fmt, overrides, match):
    args = _op_args(fmt)
    args.update(overrides(args))
    with pytest.raises(ValueError, match=match):
        _run_op(args)
    assert FakeMoeRunner.constructed == []  # nothing reached a runner


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fake_cpu, fmt):
    # opcheck's schema test compares tensors with arithmetic that CPU float8 tensors lack
    # ("mul_cpu_reduced_float" not implemented): fp8 runs the other checks.
    utils = (("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if fmt == "fp8" else None)
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.cutlass_moe.fused_moe.default, tuple(_op_args(fmt).values()),
                          **kwargs)


# ------------------------------------------------------------------ calls through the runner


@pytest.mark.parametrize("activation", [ActivationType.Swiglu, ActivationType.Relu])
@pytest.mark.parametrize("fmt,group_size", [("fp8", 32), ("fp8", 64), ("fp8", None),
                                            ("mxfp4", 32)])
def test_call_matches_the_dequantised_reference(fake_cpu, activation, fmt, group_size,
                                                out_dtype=BF16):
    i = 64 if group_size == 64 else I  # G must divide I too
    p = _problem(fmt, i=i, activation=activation, group_size=group_size, seed=1)
    out = cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, out_dtype, quant_scales=p.scales,
                            activation_type=activation, **FLAGS[fmt])[0]
    ref = reference_moe(p.x, p.ids, p.router, p.d1, p.d2, activation)
    assert out.dtype == out_dtype
    assert rel_l2(out.float(), ref) <= 1e-2
    # ... and close to the unquantised layer (the quantisers' error, a sanity bound)
    assert rel_l2(out.float(), reference_moe(p.x, p.ids, p.router, p.w1, p.w2, activation)) < 0.2
    enum = FP8_ENUM if fmt == "fp8" else MXFP4_ENUM
    assert FakeMoeRunner.constructed == [(1, enum, _ext.dtype_to_enum(out_dtype))]
    (call,) = _runner(fmt, out_dtype).calls
    groups = (H, i) if group_size is None else (group_size, group_size)
    assert (call["fc1_group_size"], call["fc2_group_size"]) == groups
    assert (call["hidden_size"], call["inter_size"], call["num_experts"]) == (H, i, E)
    assert call["fc1_weights"] == p.q1.data_ptr() and call["fc2_weights"] == p.q2.data_ptr()
    assert call["fc1_scales"] == p.scales[0].data_ptr()
    assert call["fc2_scales"] == p.scales[1].data_ptr()
    assert call["fc1_zeros"] == call["fc2_zeros"] == 0
    names = {d["name"] for gemm in (1, 2) for d in _runner(fmt, out_dtype).all_tactics(gemm)}
    assert call["tactic1"] in names and call["tactic2"] in names
    assert call["tactic1"].startswith(f"sm80_bf16_{fmt}_")


@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_output(fake_cpu, fmt):
    test_call_matches_the_dequantised_reference(fake_cpu, ActivationType.Swiglu, fmt, 32,
                                                torch.float32)


def test_fp8_different_group_sizes_per_gemm(fake_cpu):
    p = _problem(seed=3)
    q1, q2, scales = quantize_moe_weights_fp8(p.w1, p.w2, group_size=(None, 32))
    out = cutlass_fused_moe(p.x, p.ids, p.router, q1, q2, BF16, quant_scales=scales,
                            use_fp8_woq_group_scaling=True)[0]
    (call,) = _runner().calls
    assert (call["fc1_group_size"], call["fc2_group_size"]) == (H, 32)
    ref = reference_moe(p.x, p.ids, p.router, dequantize_fp8(q1, scales[0], BF16),
                        dequantize_fp8(q2, scales[1], BF16))
    assert rel_l2(out.float(), ref) <= 1e-2


def test_mxfp4_int8_typed_bytes_give_the_same_call(fake_cpu):
    p = _problem("mxfp4", seed=2)
    a = cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, BF16, quant_scales=p.scales,
                          use_w4_group_scaling=True)[0]
    b = cutlass_fused_moe(p.x, p.ids, p.router, p.q1.view(torch.int8), p.q2.view(torch.int8),
                          BF16, quant_scales=p.scales, use_w4_group_scaling=True)[0]
    assert torch.equal(a, b)


def test_int4_and_mxfp4_share_the_flag_but_not_the_runner(fake_cpu):
    """The scales' dtype picks the runner: bf16 scales int4 (DType 4), uint8 mxfp4 (DType 6)."""
    from cutlass_moe import quantize_moe_weights_int4

    p = _problem("mxfp4", seed=4)
    cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, BF16, quant_scales=p.scales,
                      use_w4_group_scaling=True)
    i1, i2, int4_scales = quantize_moe_weights_int4(p.w1, p.w2, 32)
    cutlass_fused_moe(p.x, p.ids, p.router, i1, i2, BF16, quant_scales=int4_scales,
                      use_w4_group_scaling=True)
    assert FakeMoeRunner.constructed == [(1, MXFP4_ENUM, 1), (1, 4, 1)]


class _Block(torch.nn.Module):
    def __init__(self, q1, q2, scales, flags):
        super().__init__()
        self.register_buffer("q1", q1)
        self.register_buffer("q2", q2)
        self.register_buffer("s1", scales[0])
        self.register_buffer("s2", scales[1])
        self.flags = flags

    def forward(self, x, ids, router):
        return x + cutlass_fused_moe(x, ids, router, self.q1, self.q2, x.dtype,
                                     quant_scales=[self.s1, self.s2], **self.flags)[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_compile_fullgraph(fake_cpu, fmt):
    torch._dynamo.reset()
    p = _problem(fmt, t=12, seed=6)
    block = _Block(p.q1, p.q2, p.scales, FLAGS[fmt])
    with torch.no_grad():
        eager = block(p.x, p.ids, p.router)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(p.x, p.ids,
                                                                               p.router)
    torch.testing.assert_close(compiled, eager)


# ------------------------------------------------------------------ runner keys and tactics


def test_runner_keys_are_their_own(fake_cpu):
    assert _ext.PACKED_WEIGHT_FORMATS == {"int4": 4, "fp8": 5, "mxfp4": 6}
    assert (_ext.FP8, _ext.MXFP4) == ("fp8", "mxfp4")
    assert _ext.runner_key(BF16, "fp8", BF16) == (1, 5, 1)
    assert _ext.runner_key(torch.float16, "mxfp4", torch.float32) == (0, 6, 2)
    runners = {fmt: _ext.get_runner(BF16, fmt, BF16) for fmt in ("fp8", "mxfp4", "int4")}
    assert len({id(r) for r in runners.values()}) == 3
    assert [_ext.weight_type_name(w) for w in ("fp8", "mxfp4")] == ["fp8", "mxfp4"]
    for fmt in FORMATS:
        descs = _ext.tactics(BF16, fmt, BF16, 1, CPU)
        assert descs and {d["weight_dtype"] for d in descs} == {fmt}
    with pytest.raises(NotImplementedError, match="float8_e4m3fn weight-only weights are the "
                       "weight format 'fp8'"):
        _ext.dtype_to_enum(torch.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="name the format, e.g. 'int4' or 'mxfp4'"):
        _ext.dtype_to_enum(torch.uint8)


#: The 16x64 tile that the fp8 and mxfp4 tables take up to 8 rows per expert.
NARROW_M = "m16n64k64_w16x32x64_s4"


def _decode_defaults(fmt, rows, act="bf16"):
    """DEFAULT_DECODE's fp8 / mxfp4 choice at ``rows`` rows per expert (at most half a row):
    (a gated GEMM1's, GEMM2's and an ungated GEMM1's). fp8: up to a quarter row the gated m1n4
    and the plain m1n8, up to half a row m2n8; mxfp4: m1n8 (no gated decode default)."""
    if fmt == "mxfp4":
        plain = f"sm80_decode_{act}_mxfp4_m1n8_c2x4_u4"
        return plain, plain
    if rows <= 0.25:
        return f"sm80_decode_gated_{act}_fp8_m1n4_c1x4_u4", f"sm80_decode_{act}_fp8_m1n8_c2x4_u4"
    plain = f"sm80_decode_{act}_fp8_m2n8_c2x4_u4"
    return plain, plain


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t,e,tile", [(1, 8, None), (1, 4, None), (3, 10, NARROW_M),
                                      (2, 4, NARROW_M), (16, 4, NARROW_M), (17, 4, MID_M),
                                      (128, 4, MID_M), (129, 4, PREFILL)])
def test_default_tactics(fake_cpu, fresh_tuner, monkeypatch, fmt, t, e, tile):
    """By rows per expert T*k/E (k=2): up to half a row DEFAULT_DECODE's decode tactics (fp8 up
    to a quarter row the gated m1n4 for a gated activation's GEMM1 and m1n8 otherwise, then
    m2n8; mxfp4 m1n8), then the format's table: <= 8 the 16x64 tile, <= 64 the 32-row tile,
    then the prefill tile; the names carry the format."""
    monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
    p = _problem(fmt, t=t, e=e, seed=3)
    cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, BF16, quant_scales=p.scales,
                      **FLAGS[fmt])
    (call,) = _runner(fmt).calls
    rows = t * K / e
    expected = (_decode_defaults(fmt, rows) if tile is None
                else (_name(fmt, tile), _name(fmt, tile)))
    assert (call["tactic1"], call["tactic2"]) == expected
    assert fresh_tuner.last_selection(1).source == "default"
    dtypes = (BF16, fmt, BF16)
    if tile is None:
        plain = _decode_defaults(fmt, rows)[1]
        # An ungated GEMM1 takes the plain decode tactic, as GEMM2 does.
        assert tactics.default_tactics(dtypes, ActivationType.Relu, CPU, t, K, e) == (plain,
                                                                                        plain)
        # Decode tactics off: the table's 16x64 tile.
        monkeypatch.setenv(tactics.DECODE_ENV, "0")
        assert tactics.default_tactics(dtypes, ActivationType.Swiglu, CPU, t, K, e) == (
            _name(fmt, NARROW_M), _name(fmt, NARROW_M))
    monkeypatch.setenv(tactics.DECODE_ENV, "1")
    assert tactics.default_tactics(dtypes, ActivationType.Swiglu, CPU, t, K, e) == expected


def test_tables():
    for table in (tactics.DEFAULT_TABLE_FP8, tactics.DEFAULT_TABLE_MXFP4):
        assert table[0] == (8.0, 16, 64, 4)
        assert table[1:] == tactics.DEFAULT_TABLE_INT4[1:]
    assert tactics.DEFAULT_DECODE["fp8"] == (
        (0.25, ("sm80_decode_gated_{act}_fp8_m1n4_c1x4_u4", "sm80_decode_{act}_fp8_m1n8_c2x4_u4")),
        (0.5, ("sm80_decode_{act}_fp8_m2n8_c2x4_u4",)))
    assert tactics.DEFAULT_DECODE["mxfp4"] == ((0.5, (
        "sm80_decode_{act}_mxfp4_m1n8_c2x4_u4",)),)
    # The fast build lacks the 16x64 tile: the 16-row tile it has.
    fast_build = [{"name": _name("fp8", tile), "tile_m": m, "tile_n": 128, "stages": s,
                   "weight_dtype": "fp8"} for tile, m, s in ((SMALL_M, 16, 4), (PREFILL, 128, 3))]
    assert [tactics.default_tactic(fast_build, rows)
            for rows in (0.25, 0.5, 1, 8, 9, 64, 65, 4096)] == [
        _name("fp8", SMALL_M)] * 4 + [_name("fp8", PREFILL)] * 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_defaults_fall_back_to_the_table(fmt):
    """Without the names of DEFAULT_DECODE's row for the rows among the descriptors (the fast
    build has only fp8's m2n8 of them), the table decides; a gated GEMM1 without the gated name
    takes the plain one."""
    tensor_core = [{"name": _name(fmt, tile), "tile_m": m, "tile_n": n, "stages": 4,
                    "weight_dtype": fmt} for tile, m, n in ((NARROW_M, 16, 64), (MID_M, 32, 128))]
    other = f"sm80_decode_bf16_{fmt}_m4n4_c1x4_u2"  # a decode tactic that no row names

    def decode(name, is_gated=False):
        return {"name": name, "tile_m": 1, "tile_n": 8, "stages": 4, "weight_dtype": fmt,
                "decode": True, "gated": is_gated}

    narrow = _name(fmt, NARROW_M)
    for rows in (0, 0.25, 0.5):
        gated, plain = _decode_defaults(fmt, rows)
        assert tactics.default_tactic(tensor_core + [decode(other)], rows) == narrow
        assert tactics.default_tactic(tensor_core + [decode(other), decode(plain)], rows) == plain
        assert tactics.default_tactic(
            tensor_core + [decode(plain), decode(gated, gated != plain)], rows) == gated
        # A decode tactic that is not runnable is no default either.
        assert tactics.default_tactic(tensor_core + [dict(decode(plain), runnable=False)],
                                      rows) == narrow
    every = {name for rows in (0.25, 0.5) for name in _decode_defaults(fmt, rows)}
    named = tensor_core + [decode(name, "gated" in name) for name in sorted(every)]
    assert tactics.default_tactic(named, 0.6) == narrow
    if fmt == "fp8":
        # From a quarter to half a row only m2n8 is named: m1n8 and the gated m1n4 are not.
        quarter = tensor_core + [decode(name, "gated" in name)
                                 for name in _decode_defaults(fmt, 0.25)]
        assert tactics.default_tactic(quarter, 0.26) == narrow


@pytest.mark.parametrize("fmt", FORMATS)
def test_candidates_and_decode_tactics(fake_cpu, monkeypatch, fmt):
    """fp8 / mxfp4 decode tactics are candidates unless CUTLASS_MOE_DECODE_TACTICS=0."""
    dtypes = (BF16, fmt, BF16)
    decode = f"sm80_decode_bf16_{fmt}_m2n8_c2x4_u4"
    gated = f"sm80_decode_gated_bf16_{fmt}_m2n8_c2x4_u4"
    defaults = set(_decode_defaults(fmt, 0.25)) | set(_decode_defaults(fmt, 0.5))
    monkeypatch.setenv(tactics.DECODE_ENV, "0")
    for gemm in (1, 2):
        descs = tactics.candidates(dtypes, gemm, ActivationType.Swiglu, CPU)
        assert descs and all(d["name"].startswith(f"sm80_bf16_{fmt}_") and not d["decode"]
                             and d["split_k"] == 1 and not d["gated"] for d in descs)
        names = [d["name"] for d in descs]
        assert _name(fmt, "m128n256k64_w64x64x64_s3") not in names  # not runnable here
        assert {_name(fmt, t) for t in (NARROW_M, SMALL_M, MID_M, PREFILL)} <= set(names)
    for value in (None, "1"):
        if value is None:
            monkeypatch.delenv(tactics.DECODE_ENV)
        else:
            monkeypatch.setenv(tactics.DECODE_ENV, value)
        gemm1 = tactics.candidate_names(dtypes, 1, ActivationType.Swiglu, CPU)
        assert {decode, gated} | defaults <= set(gemm1)
        relu = tactics.candidate_names(dtypes, 1, ActivationType.Relu, CPU)
        assert decode in relu and gated not in relu
        gemm2 = tactics.candidate_names(dtypes, 2, ActivationType.Swiglu, CPU)
        assert decode in gemm2 and gated not in gemm2
        # ... and the measured decode defaults at a quarter and half a row per expert (T=1,
        # E=8 and E=4)
        assert tactics.default_tactics(dtypes, ActivationType.Swiglu, CPU, 1, K, 8) == (
            _decode_defaults(fmt, 0.25))
        assert tactics.default_tactics(dtypes, ActivationType.Swiglu, CPU, 1, K, 4) == (
            _decode_defaults(fmt, 0.5))


@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_decode_tactics(fake_cpu, monkeypatch, fmt):
    monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
    p = _problem(fmt, seed=10)
    forced = (f"sm80_decode_gated_bf16_{fmt}_m2n8_c2x4_u4", f"sm80_decode_bf16_{fmt}_m2n8_c2x4_u4")
    out = cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, BF16, quant_scales=p.scales,
                            tactics=forced, **FLAGS[fmt])[0]
    (call,) = _runner(fmt).calls
    assert (call["tactic1"], call["tactic2"]) == forced
    assert rel_l2(out.float(), reference_moe(p.x, p.ids, p.router, p.d1, p.d2)) <= 1e-2


@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_tactics(fake_cpu, fmt):
    p = _problem(fmt, seed=4)
    kwargs = {"quant_scales": p.scales, **FLAGS[fmt]}
    forced = (_name(fmt, PREFILL), _name(fmt, SMALL_M))
    out = cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, BF16, tactics=forced, **kwargs)[0]
    (call,) = _runner(fmt).calls
    assert (call["tactic1"], call["tactic2"]) == forced
    assert rel_l2(out.float(), reference_moe(p.x, p.ids, p.router, p.d1, p.d2)) <= 1e-2
    int4_name = "sm80_bf16_int4_m16n128k64_w16x32x64_s4"
    with pytest.raises(ValueError, match=rf"tactic '{int4_name}' is not a runnable GEMM1 tactic "
                       rf"for dtypes \('torch.bfloat16', '{fmt}', 'torch.bfloat16'\).*available: "
                       rf".*sm80_bf16_{fmt}_m16n64k64"):
        cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, BF16, tactics=(int4_name, forced[1]),
                          **kwargs)


# ------------------------------------------------------------------ tuner keys and profiling


def test_shape_keys():
    def key(dtypes, group_sizes=(128, 128), zeros=False):
        return autotuner.shape_key(dtypes, ActivationType.Swiglu, 8, 2048, 768, 2, 1,
                                   group_sizes=group_sizes, zeros=zeros)

    assert key(FP8_DTYPES) == ShapeKey("bf16_fp8_bf16", "fp8_g128", 8, 2048, 768, 2, "Swiglu", 1)
    assert key(FP8_DTYPES, (64, 64)).quant == "fp8_g64"
    assert key(FP8_DTYPES, (2048, 768)).quant == "fp8_g2048_g768"
    assert key(FP8_DTYPES, zeros=True).quant == "fp8_g128"  # no zero points for fp8
    assert key(MXFP4_DTYPES, (32, 32)) == ShapeKey("bf16_mxfp4_bf16", "mxfp4", 8, 2048, 768, 2,
                                                   "Swiglu", 1)
    int4 = key((BF16, _ext.INT4, BF16))
    assert len({key(FP8_DTYPES), key(FP8_DTYPES, (64, 64)), key(MXFP4_DTYPES, (32, 32)),
                int4}) == 4
    with pytest.raises(ValueError, match="fp8 group sizes must be >= 1"):
        key(FP8_DTYPES, (0, 0))
    assert tuning_cache.quant_fp8((128, 64)) == "fp8_g128_g64"
    assert tuning_cache.QUANT_MXFP4 == "mxfp4"
    assert tuning_cache.WEIGHT_MODES["fp8"] == "fp8"
    assert tuning_cache.WEIGHT_MODES["mxfp4"] == "mxfp4"


@pytest.mark.parametrize("fmt", FORMATS)
def test_calls_use_their_cache_entry(fake_cpu, fresh_tuner, fmt):
    p = _problem(fmt, seed=7)  # G = 32
    dtypes = (BF16, fmt, BF16)
    shape = autotuner.shape_key(dtypes, ActivationType.Swiglu, E, H, I, K, 1,
                                group_sizes=(32, 32))
    device, bucket = autotuner.device_id(CPU), autotuner.bucket_for(T, 8192)
    fresh_tuner.record(TuningKey(1, shape, device, bucket), _name(fmt, PREFILL), 1.0)
    fresh_tuner.record(TuningKey(2, shape, device, bucket), _name(fmt, MID_M), 1.0)
    # The same layer in another format or (fp8) with another group size is not this call's.
    others = [autotuner.shape_key((BF16, _ext.INT4, BF16), ActivationType.Swiglu, E, H, I, K, 1,
                                  group_sizes=(32, 32))]
    if fmt == "fp8":
        others.append(autotuner.shape_key(dtypes, ActivationType.Swiglu, E, H, I, K, 1,
                                          group_sizes=(64, 64)))
    for other in others:
        for gemm in (1, 2):
            fresh_tuner.record(TuningKey(gemm, other, device, bucket), _name(fmt, SMALL_M), 1.0)
    cutlass_fused_moe(p.x, p.ids, p.router, p.q1, p.q2, BF16, quant_scales=p.scales,
                      **FLAGS[fmt])
    (call,) = _runner(fmt).calls
    assert (call["tactic1"], call["tactic2"]) == (_name(fmt, PREFILL), _name(fmt, MID_M))
    assert fresh_tuner.last_selection(1).source == "cache"


@pytest.fixture
def cpu_profiling(monkeypatch):
    """profile_gemm on host tensors: CUDA streams, events and the L2 flush stubbed."""
    stream = types.SimpleNamespace(cuda_stream=0x5EED)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(timing, "l2_flusher", lambda device: None)
    monkeypatch.setattr(autotuner.AutoTuner, "_can_profile", staticmethod(lambda device: True))

    def sample_us(fns, warmup, repeats, flush, stream):
        for fn in fns:
            fn()
        return [5.0]

    monkeypatch.setattr(timing, "sample_us", sample_us)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tuning_passes_weights_scales_and_group_sizes(fake_cpu, fresh_tuner, cpu_profiling,
                                                      fmt):
    p = _problem(fmt, seed=8)
    if fmt == "fp8":
        q1, q2, scales = quantize_moe_weights_fp8(p.w1, p.w2, group_size=(64, 32))
        groups, quant = (64, 32), "fp8_g64_g32"
    else:
        q1, q2, scales = p.q1, p.q2, p.scales
        groups, quant = (32, 32), "mxfp4"
    with autotuner.autotune():
        cutlass_fused_moe(p.x, p.ids, p.router, q1, q2, BF16, quant_scales=scales,
                          **FLAGS[fmt])
    runner = _runner(fmt)
    prepared = [args for kind, args in runner.profile_calls if kind == "prepare"]
    ran = [args for kind, args in runner.profile_calls if kind == "run"]
    assert {(a["gemm"], a["weights"], a["scales"], a["zeros"], a["group_size"])
            for a in prepared} == {(1, q1.data_ptr(), scales[0].data_ptr(), 0, groups[0]),
                                   (2, q2.data_ptr(), scales[1].data_ptr(), 0, groups[1])}
    assert len(prepared) == 2 * len(autotuner.PROFILE_SEEDS)
    assert {(a["gemm"], a["group_size"]) for a in ran} == {(1, groups[0]), (2, groups[1])}
    dtypes = (BF16, fmt, BF16)
    assert {a["tactic"] for a in ran} == {
        n for gemm in (1, 2)
        for n in tactics.candidate_names(dtypes, gemm, ActivationType.Swiglu, CPU)}
    entries = fresh_tuner.entries()
    assert {(key.gemm, key.shape.dtypes, key.shape.quant) for key in entries} == {
        (1, f"bf16_{fmt}_bf16", quant), (2, f"bf16_{fmt}_bf16", quant)}
    assert fresh_tuner.last_selection(1).source == "tuned"


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": "fp8", "group_size": 48}, "group_size=48 must be a multiple of 32"),
    ({"weights": "fp8", "group_size": 256}, r"group_size=256 must divide .* I=128"),
    ({"weights": "fp8", "asymmetric": True}, "asymmetric .* applies to int4 weights only"),
    ({"weights": "mxfp4", "group_size": 64}, "MXFP4 weights have one e8m0 scale per 32"),
    ({"weights": "mxfp4", "hidden_size": 48},
     "mxfp4 weights need hidden size H=48 and intermediate size I=128 to be multiples of 32"),
    ({"weights": "fp8", "inter_size": 40}, "fp8 weights need .* multiples of 32"),
    ({"weights": "nvfp4"}, "weights must be one of '16bit', 'int8', 'int4', 'fp8', 'mxfp4'"),
])
def test_tune_model_argument_checks(monkeypatch, kwargs, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = {"num_experts": 8, "hidden_size": 256, "inter_size": 128, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        autotuner.tune_model(**args)


def test_check_group_size():
    validation.check_group_size(64, 128, 256, "fp8")
    validation.check_group_size(32, 128, 256, "mxfp4")
    with pytest.raises(ValueError, match="G = 32"):
        validation.check_group_size(128, 128, 256, "mxfp4")
    with pytest.raises(ValueError, match="must divide"):
        validation.check_group_size(256, 128, 256, "fp8")


# ------------------------------------------------------------------ the cache file


def _entry(key, tactic):
    return {**key.to_json(), "tactic": tactic, "time_us": 3.5}


def test_old_cache_entries_stay_readable_next_to_new_ones(fake_cpu, tmp_path):
    """A version-1 file written before fp8/mxfp4 (16-bit, int8 and int4 entries) loads as it
    did; fp8 and mxfp4 entries round-trip through the same file."""
    def shape(dtypes, quant):
        return ShapeKey(dtypes, quant, 8, 2048, 768, 2, "Swiglu", 1)

    old = {
        TuningKey(1, shape("bf16_bf16_bf16", "none"), "GPU/1", 8): "fake_g1_m16n128k64_s4",
        TuningKey(2, shape("bf16_int8_bf16", "int8_per_channel"), "GPU/1", 8):
            "fake_g2_m32n128k64_s3",
        TuningKey(1, shape("bf16_int4_bf16", "int4_g128_asym"), "GPU/1", 8):
            "sm80_bf16_int4_m16n128k64_w16x32x64_s4",
    }
    document = {"schema": tuning_cache.CACHE_SCHEMA, "version": 1,
                "build_id": tuning_cache.build_id(),
                "devices": {"GPU/1": [_entry(k, t) for k, t in old.items()]}}
    path = tmp_path / "cache.json"
    path.write_text(json.dumps(document))
    kept = tuning_cache.read_cache(path)
    assert {k: v[0] for k, v in kept.items()} == old
    new = {
        TuningKey(1, shape("bf16_fp8_bf16", "fp8_g128"), "GPU/1", 8): _name("fp8", SMALL_M),
        TuningKey(2, shape("bf16_mxfp4_bf16", "mxfp4"), "GPU/1", 8): _name("mxfp4", PREFILL),
    }
    tuning_cache.write_cache(path, {k: (t, 2.0) for k, t in new.items()})
    merged = tuning_cache.read_cache(path)
    assert {k: v[0] for k, v in merged.items()} == {**old, **new}
    written = json.loads(path.read_text())
    assert written["version"] == 1
    assert {e["quant"] for e in written["devices"]["GPU/1"]} == {
        "none", "int8_per_channel", "int4_g128_asym", "fp8_g128", "mxfp4"}


def test_fp8_and_mxfp4_tactics_are_known(fake_cpu):
    names = tuning_cache.known_tactics()
    assert {_name("fp8", SMALL_M), _name("mxfp4", PREFILL, "fp16")} <= names


# ------------------------------------------------------------------ synthetic layers and bench


def test_synthetic_layers_call_through(fake_cpu):
    p = _problem(seed=9)
    for layer in (synthetic.quantize_layer_fp8(p.w1, p.w2, 32),
                  synthetic.quantize_layer_mxfp4(p.w1, p.w2)):
        assert layer.zeros == (None, None) and len(layer.quant_scales) == 2
        cutlass_fused_moe(p.x, p.ids, p.router, *layer.weights, BF16,
                          quant_scales=layer.quant_scales, **layer.call_flags)
    assert synthetic.quantize_layer_mxfp4(p.w1, p.w2).group_size == 32
    assert FakeMoeRunner.constructed == [(1, FP8_ENUM, 1), (1, MXFP4_ENUM, 1)]


def test_bench_bytes():
    preset = MODEL_PRESETS["mixtral-8x7b"]
    n1, h, i = preset.fc1_rows, preset.hidden_size, preset.inter_size
    count = n1 * h + h * i
    assert bench.expert_weight_bytes(preset, "fp8", 2, 128) == count + count // 128 * 4
    assert bench.expert_weight_bytes(preset, "fp8", 2, 64) == count + count // 64 * 4
    assert bench.expert_weight_bytes(preset, "mxfp4", 2) == count // 2 + count // 32
    assert bench.expert_weight_bytes(preset, "mxfp4", 2, 128) == count // 2 + count // 32
    with pytest.raises(ValueError, match="group_size=96 must divide"):
        bench.expert_weight_bytes(preset, "fp8", 2, 96)
    row = bench.make_row("m", preset, "bf16", "fp8", 1, "cutlass_moe_tuned", False, 10.0, 2.0,
                         bench.Ceilings("bf16", 3.0, 700.0, 600.0, "t", 1 << 20),
                         group_size=128)
    expected = bench.bytes_touched(preset, 1, 2.0, "fp8", 2, 2, 128)
    assert expected == 2.0 * (count + count // 128 * 4) + 1 * h * 4
    assert row.bytes_touched == expected
    config = bench.BenchConfig(models=[], weights="mxfp4", group_size=32)
    assert config.to_json()["group_size"] == 32 and "asymmetric" not in config.to_json()


# ------------------------------------------------------------------ command line


@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    """A GPU that exists, the fake extension, no cache file; tune_model and run_bench replaced
    by recorders."""
    from test_cli import FakeTuner, fake_result

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(tuning_cache.CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    tuner = FakeTuner()
    monkeypatch.setattr(autotuner, "tune_model", tuner.tune_model)
    monkeypatch.setattr(autotuner, "save_tuning_cache", tuner.save)
    monkeypatch.setattr(autotuner, "load_tuning_cache", tuner.load)
    benched = []
    monkeypatch.setattr(bench, "run_bench",
                        lambda config, ceilings=None: benched.append(config) or
                        fake_result(config))
    with _ext._replaced_extension(make_fake_extension()):
        yield types.SimpleNamespace(tuner=tuner, benched=benched)


def _cli(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("json_output", [False, True])
def test_tune_fp8(capsys, cli_env, json_output):
    status, out, _ = _cli(capsys, "tune", "--model", "qwen3-30b-a3b", "--weights", "fp8",
                          "--group-size", "64", *(["--json"] if json_output else []))
    assert status == 0
    (args, kwargs), = cli_env.tuner.calls
    assert args == (128, 2048, 768, 8)
    assert (kwargs["weights"], kwargs["group_size"], kwargs["asymmetric"]) == ("fp8", 64, False)
    if json_output:
        document = json.loads(out)
        assert (document["weights"], document["group_size"]) == ("fp8", 64)
        assert "asymmetric" not in document
    else:
        assert "bf16 x fp8 weights (group 64), Swiglu" in out.splitlines()[0]


def test_tune_defaults_per_format(capsys, cli_env):
    assert _cli(capsys, "tune", "--model", "mixtral-8x7b", "--weights", "fp8")[0] == 0
    assert _cli(capsys, "tune", "--model", "gpt-oss-20b", "--weights", "mxfp4")[0] == 0
    assert _cli(capsys, "tune", "--model", "gpt-oss-20b", "--weights", "mxfp4",
                "--group-size", "32")[0] == 0
    assert [(kw["weights"], kw["group_size"]) for _, kw in cli_env.tuner.calls] == [
        ("fp8", bench.DEFAULT_FP8_GROUP_SIZE), ("mxfp4", 32), ("mxfp4", 32)]
    assert bench.DEFAULT_FP8_GROUP_SIZE == 128


def test_bench_fp8_and_mxfp4(capsys, cli_env):
    status, out, _ = _cli(capsys, "bench", "--model", "gpt-oss-20b", "--weights", "mxfp4",
                          "--tokens", "1")
    assert status == 0
    status, out2, _ = _cli(capsys, "bench", "--model", "mixtral-8x7b", "--weights", "fp8",
                           "--group-size", "64", "--tokens", "1", "--json")
    assert status == 0
    first, second = cli_env.benched
    assert (first.weights, first.group_size, first.asymmetric) == ("mxfp4", 32, False)
    assert (second.weights, second.group_size) == ("fp8", 64)
    assert "bf16 x mxfp4 weights (group 32), uniform routing" in out
    assert json.loads(out2)["config"]["group_size"] == 64


@pytest.mark.parametrize("command", ["tune", "bench"])
@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gpt-oss-20b", "--weights", "mxfp4", "--group-size", "64"],
     "--group-size 64: --weights mxfp4 has a fixed group size of 32"),
    (["--model", "mixtral-8x7b", "--weights", "fp8", "--asym"],
     "--asym applies to --weights int4 only (got --weights fp8)"),
    (["--model", "mixtral-8x7b", "--weights", "mxfp4", "--asym"],
     "--asym applies to --weights int4 only (got --weights mxfp4)"),
    (["--model", "mixtral-8x7b", "--weights", "fp8", "--group-size", "48"],
     ("--group-size 48 does not fit mixtral-8x7b (--hidden 4096, --inter 14336): must be a "
     "multiple of 32")),
    (["--model", "gpt-oss-20b", "--weights", "fp8"],
     "--group-size 128 does not fit gpt-oss-20b (--hidden 2880, --inter 2880)"),
    (["--experts", "8", "--hidden", "144", "--inter", "256", "--top-k", "2", "--weights", "fp8"],
     "--weights fp8 needs --hidden (144) and --inter (256) to be multiples of 32"),
    (["--experts", "8", "--hidden", "128", "--inter", "48", "--top-k", "2", "--weights",
      "mxfp4"], "--weights mxfp4 needs --hidden (128) and --inter (48) to be multiples of 32"),
])
def test_usage_errors(capsys, cli_env, command, argv, message):
    status, out, err = _cli(capsys, command, *argv)
    assert status == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_weights_choices_and_builds(capsys, monkeypatch):
    assert {"fp8", "mxfp4"} <= set(cli.WEIGHT_CHOICES)
    info = {"extension_available": True,
            "tactics": {"bf16_bf16_bf16": {}, "bf16_fp8_bf16": {}, "fp16_mxfp4_fp16": {}}}
    assert cli.supported_weight_types("bf16", info) == ["bf16", "fp8"]
    assert cli.supported_weight_types("fp16", info) == ["mxfp4"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ext = make_fake_extension()
    build = ext.build_info()
    del build["tactics"]["bf16_mxfp4_bf16"]
    ext.build_info = lambda: build
    with _ext._replaced_extension(ext):
        status, _, err = _cli(capsys, "tune", "--model", "gpt-oss-20b", "--weights", "mxfp4")
    assert status == 2
    assert ("--weights mxfp4 is not supported by this build: it supports --weights bf16, fp8, "
            "int4 or int8 with --dtype bf16 (it was built without mxfp4 weight-only kernels for "
            "--dtype bf16)") in err
