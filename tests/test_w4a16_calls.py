"""int4 group-wise weight-only calls (W4A16, ``use_w4_group_scaling=True``) on CPU: validation,
the raw op, the runner key, tactics, the tuner's keys and profiling arguments, the cache, the
benchmark's bytes and the command line.

The fake extension (tests/_fake_ext.py) dequantises packed int4 weights itself (not with
cutlass_moe.int4), so comparing its output with ``reference_moe`` on ``dequantize_int4``'d weights
checks the pointers, group sizes and zero points the Python layer passes as well as the layout
both sides read.
"""

from __future__ import annotations

import types

import pytest
import torch

from _fake_ext import INT4_ENUM, FakeMoeRunner
from _helpers import random_routing, random_weights, rel_l2
from cutlass_moe import (
    ActivationType,
    _ext,
    autotuner,
    cutlass_fused_moe,
    dequantize_int4,
    quantize_moe_weights_int4,
    reference_moe,
    tactics,
    timing,
    tuning_cache,
    validation,
)
from cutlass_moe.tuning_cache import ShapeKey, TuningKey

BF16 = torch.bfloat16
CPU = torch.device("cpu")
E, H, I, K, T = 4, 64, 32, 2, 9
INT4_DTYPES = (BF16, _ext.INT4, BF16)
SMALL_M = "sm80_bf16_int4_m16n128k64_w16x32x64_s4"
MID_M = "sm80_bf16_int4_m32n128k64_w32x32x64_s4"
PREFILL = "sm80_bf16_int4_m128n128k64_w64x64x64_s3"
DECODE = "sm80_decode_bf16_int4_m2n8_c2x4_u4"
DECODE_GATED = "sm80_decode_gated_bf16_int4_m2n8_c2x4_u4"
# The FMA decode tactic that tactics.DEFAULT_DECODE names for int4 weights (both GEMMs, up to
# half a row per expert).
M1N8 = "sm80_decode_bf16_int4_m1n8_c2x4_u4"
# Tensor-core decode tactics: candidates, never a default.
MMA_GATED = "sm80_decode_mma_gated_bf16_int4_m8n16_k4_u2"
MMA_8 = "sm80_decode_mma_bf16_int4_m8n32_k4_u2"
MMA_16 = "sm80_decode_mma_bf16_int4_m16n32_k4_u2"


def _problem(t=T, e=E, h=H, i=I, k=K, activation=ActivationType.Swiglu, group_size=32,
             symmetric=True, seed=0):
    """x, ids, scales, packed fc1/fc2, quant_scales and the dequantised fc1/fc2 (bf16)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(BF16)
    ids, router = random_routing(t, e, k, generator=gen)
    gated = activation in (ActivationType.Swiglu, ActivationType.Geglu)
    w1, w2 = random_weights(e, h, i, gated, BF16, generator=gen)
    p1, p2, quant_scales = quantize_moe_weights_int4(w1, w2, group_size, symmetric)
    zeros = (None, None) if symmetric else (quant_scales[2], quant_scales[3])
    d1 = dequantize_int4(p1, quant_scales[0], zeros[0], BF16)
    d2 = dequantize_int4(p2, quant_scales[1], zeros[1], BF16)
    return x, ids, router, p1, p2, quant_scales, d1, d2


def _scales(symmetric=True, **kwargs):
    """quant_scales of a problem: ``[s1, s2]`` or ``[s1, s2, z1, z2]``."""
    return _problem(symmetric=symmetric, **kwargs)[5]


def _runner(out=BF16):
    return _ext.get_runner(BF16, _ext.INT4, out)


# ------------------------------------------------------------------ validation (no extension)


@pytest.fixture
def no_extension(monkeypatch):
    """No extension and no GPU: a call that passes validation ends in "no CUDA device"."""
    monkeypatch.delenv(validation.CHECK_INPUTS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with _ext._replaced_extension(None):
        yield


def _call_args(**overrides):
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(
        activation=overrides.pop("activation_type", ActivationType.Swiglu))
    args = {"input": x, "token_selected_experts": ids, "token_final_scales": router,
            "fc1_expert_weights": p1, "fc2_expert_weights": p2, "output_dtype": BF16,
            "quant_scales": quant_scales, "use_w4_group_scaling": True}
    args.update(overrides)
    return args


def _expect(exc, match, **overrides):
    with pytest.raises(exc, match=match):
        cutlass_fused_moe(**_call_args(**overrides))


def test_a_valid_call_passes_validation(no_extension):
    _expect(RuntimeError, "no CUDA device")
    s1, s2 = _call_args()["quant_scales"]
    _expect(RuntimeError, "no CUDA device", quant_scales=(s1, s2, None, None))  # symmetric


def _prepared(**overrides):
    args = _call_args(**overrides)
    names = ("input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
             "fc2_expert_weights", "output_dtype", "quant_scales", "use_w4_group_scaling")
    defaults = {
        "fc1_expert_biases": None, "fc2_expert_biases": None, "input_sf": None,
        "swiglu_alpha": None, "swiglu_beta": None, "swiglu_limit": None, "tp_size": 1,
        "tp_rank": 0, "ep_size": 1, "ep_rank": 0, "cluster_size": 1, "cluster_rank": 0,
        "output": None, "enable_alltoall": False, "use_deepseek_fp8_block_scale": False,
        "use_int8_woq_per_channel": False, "use_mxfp8_act_scaling": False,
        "min_latency_mode": False, "use_packed_weights": False, "use_wfp4afp8_humming": False,
        "tune_max_num_tokens": 8192, "activation_type": ActivationType.Swiglu,
        "profile_ids": None, "workspace_buffer": None, "tactics": None,
    }
    return validation.prepare_call(**{n: args.pop(n) for n in names}, **{**defaults, **args})


def test_prepared_call_carries_the_int4_arguments(no_extension):
    _, _, _, p1, p2, (s1, s2, z1, z2), _, _ = _problem(symmetric=False)
    call = _prepared(fc1_expert_weights=p1, fc2_expert_weights=p2, quant_scales=[s1, s2, z1, z2])
    assert call.weight_format == "int4"
    assert call.fc1_expert_weights is p1 and call.fc2_expert_weights is p2
    assert call.fc1_weight_scales is s1 and call.fc2_weight_scales is s2
    assert call.fc1_weight_zeros is z1 and call.fc2_weight_zeros is z2
    symmetric = _prepared()
    assert symmetric.fc1_weight_zeros is None and symmetric.fc2_weight_zeros is None
    plain = _prepared(use_w4_group_scaling=False, quant_scales=None,
                      fc1_expert_weights=torch.zeros(E, 2 * I, H, dtype=BF16),
                      fc2_expert_weights=torch.zeros(E, H, I, dtype=BF16))
    assert plain.weight_format == "" and plain.fc1_weight_zeros is None


def test_int8_tensors_are_read_as_the_packed_bytes(no_extension):
    p1 = _call_args()["fc1_expert_weights"]
    call = _prepared(fc1_expert_weights=p1.view(torch.int8))
    assert call.fc1_expert_weights.dtype == torch.uint8
    assert call.fc1_expert_weights.data_ptr() == p1.data_ptr()


def test_flags_exclude_each_other(no_extension):
    _expect(ValueError, "use_w4_group_scaling=True .* and use_int8_woq_per_channel=True .* "
            "exclude each other", use_int8_woq_per_channel=True)


def test_w4a8_is_refused_with_the_convention(no_extension):
    x = _call_args()["input"]
    _expect(ValueError, "use_w4_group_scaling=True with input dtype torch.float8_e4m3fn: "
            "cutlass_moe serves W4A16 only .*W4A8 mode .* is not served",
            input=x.float().to(torch.float8_e4m3fn))
    s1, s2 = _call_args()["quant_scales"]
    act_scale, alpha = torch.ones(1), torch.ones(E)
    w4a8 = [s1, s2, act_scale, act_scale, None, None, alpha, alpha]
    _expect(ValueError, r"needs quant_scales=\[fc31_scales \[E=4, H/G1, N1=64\], fc2_scales "
            r"\[E=4, I/G2, H=64\]\] .*W4A8 mode .*not served; got 8 tensor\(s\)",
            quant_scales=w4a8)


@pytest.mark.parametrize("value,exc,match", [
    (None, ValueError, "needs quant_scales=.*; got None"),
    ([], ValueError, r"got 0 tensor\(s\)"),
    ("three", ValueError, r"got 3 tensor\(s\)"),
    ("tensor", TypeError, "got Tensor"),
    ("not_a_tensor", TypeError,
     r"quant_scales\[1\] \(fc2_scales\) must be a torch.Tensor, got float"),
])
def test_quant_scales_list(no_extension, value, exc, match):
    s1, s2 = _call_args()["quant_scales"]
    named = {"three": [s1, s2, s2], "tensor": s1, "not_a_tensor": [s1, 1.0]}
    _expect(exc, match, quant_scales=named.get(value, value) if isinstance(value, str) else value)


def test_weights_must_be_packed_bytes(no_extension):
    w = torch.zeros(E, 2 * I, H // 2, dtype=BF16)
    _expect(ValueError, r"use_w4_group_scaling=True needs packed int4 fc1_expert_weights "
            r"\(uint8 \[E, N, K/2\].*got torch.bfloat16 \[4, 64, 32\]", fc1_expert_weights=w)
    _expect(ValueError, "needs packed int4 fc2_expert_weights",
            fc2_expert_weights=torch.zeros(E, H, I // 2, dtype=torch.int16))


def test_uint8_weights_need_the_flag(no_extension):
    _expect(ValueError, r"fc1_expert_weights is uint8 \[4, 64, 32\]: packed int4 weights need "
            r"use_w4_group_scaling=True and quant_scales=\[fc31_scales \[E, H/G, N1\]",
            use_w4_group_scaling=False)
    # ... also with the quant_scales but no flag (no silent 16-bit call on the bytes)
    _expect(ValueError, "packed int4 weights need use_w4_group_scaling=True",
            use_w4_group_scaling=False, quant_scales=None)


def test_unpacked_weight_shapes(no_extension):
    p1, p2 = (_call_args()[n] for n in ("fc1_expert_weights", "fc2_expert_weights"))
    unpacked = torch.zeros(E, 2 * I, H, dtype=torch.uint8)  # one byte per weight: not packed
    _expect(ValueError, r"fc1_expert_weights must be \[E, 2\*I, H/2\] \(rows: up, then gate\) = "
            r"\[4, 64, 32\] \(packed int4: two weights per byte\) .*got \[4, 64, 64\]",
            fc1_expert_weights=unpacked)
    _expect(ValueError, r"fc2_expert_weights must be \[E=4, H=64, I/2\]",
            fc2_expert_weights=p2[:, :32])
    relu = _call_args(activation_type=ActivationType.Relu)
    relu["fc1_expert_weights"] = p1  # 2I rows where Relu has I
    with pytest.raises(ValueError, match=r"fc1_expert_weights must be \[E, I, H/2\] = "
                       r"\[4, 32, 32\]"):
        cutlass_fused_moe(**relu, activation_type=ActivationType.Relu)


@pytest.mark.parametrize("h,i,match", [
    (48, 32, r"int4 fc1_expert_weights \[E, N, K/2\] = \[4, 64, 24\]: K=H=48 must be a multiple"),
    (64, 16, r"int4 fc2_expert_weights \[E, N, K/2\] = \[4, 64, 8\]: K=I=16 must be a multiple"),
    (64, 40, r"int4 fc2_expert_weights .*K=I=40 must be a multiple of 32"),
])
def test_alignment(no_extension, h, i, match):
    """K (H for fc1, I for fc2) in steps of 32; built by hand: quantisation refuses these."""
    n1 = 2 * i
    args = _call_args()
    args["input"] = torch.randn(T, h).to(BF16)
    args["fc1_expert_weights"] = torch.zeros(E, n1, h // 2, dtype=torch.uint8)
    args["fc2_expert_weights"] = torch.zeros(E, h, i // 2, dtype=torch.uint8)
    args["quant_scales"] = [torch.ones(E, 1, n1, dtype=BF16), torch.ones(E, 1, h, dtype=BF16)]
    with pytest.raises(ValueError, match=match):
        cutlass_fused_moe(**args)


def test_scale_shapes(no_extension):
    s1, s2 = _call_args()["quant_scales"]  # [4, 2, 64] (G1 = 32), [4, 1, 64] (G2 = 32)
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must be \[E=4, H/G, N1=64\] \(one "
            r"row of 64 scales per group of G elements along H=64\), got \[4, 64, 2\] \(it "
            r"looks transposed", quant_scales=[s1.transpose(1, 2).contiguous(), s2])
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must be .*got \[3, 2, 64\]",
            quant_scales=[s1[:3], s2])
    _expect(ValueError, r"quant_scales\[1\] \(fc2_scales\) must be \[E=4, I/G, H=64\].*got "
            r"\[4, 1, 32\]", quant_scales=[s1, s2[..., :32]])
    _expect(ValueError, r"quant_scales\[1\] \(fc2_scales\) must be .*got \[1, 64\]",
            quant_scales=[s1, s2[0]])


@pytest.mark.parametrize("rows,match", [
    # H = 64: 4 rows would be G = 16 (not a multiple of 32), 3 rows do not divide H.
    (4, (r"quant_scales\[0\] \(fc31_scales\) has 4 group rows along H=64: the group size G = "
         r"H / rows must be a multiple of 32 that divides H \(got G = 64/4 = 16\); valid here: "
         r"32 \(2 rows\) or 64 \(1 row\)$")),
    (3, r"has 3 group rows along H=64: .*\(got G = 64/3 = 21.3333\)"),
    (0, r"has 0 group rows along H=64"),
])
def test_group_size_rule(no_extension, rows, match):
    s2 = _call_args()["quant_scales"][1]
    _expect(ValueError, match, quant_scales=[torch.ones(E, rows, 2 * I, dtype=BF16), s2])


def test_per_channel_and_different_group_sizes_pass(no_extension):
    s1 = torch.ones(E, 1, 2 * I, dtype=BF16)  # G1 = H (per-channel)
    s2 = torch.ones(E, 1, H, dtype=BF16)  # G2 = I = 32
    _expect(RuntimeError, "no CUDA device", quant_scales=[s1, s2])
    _expect(RuntimeError, "no CUDA device",
            quant_scales=[torch.ones(E, 2, 2 * I, dtype=BF16), s2])  # G1 = 32


def test_scale_and_zero_dtypes(no_extension):
    s1, s2, z1, z2 = _scales(symmetric=False)
    _expect(ValueError, r"quant_scales\[0\] \(fc31_scales\) must have the activation dtype "
            r"torch.bfloat16, got torch.float32", quant_scales=[s1.float(), s2])
    _expect(ValueError, r"quant_scales\[1\] \(fc2_scales\) must have the activation dtype .*got "
            "torch.float16", quant_scales=[s1, s2.half()])
    _expect(ValueError, r"quant_scales\[3\] \(fc2_zeros\) must have the activation dtype .*got "
            "torch.uint8", quant_scales=[s1, s2, z1, z2.to(torch.uint8)])


def test_zero_points(no_extension):
    s1, s2, z1, z2 = _scales(symmetric=False)
    _expect(RuntimeError, "no CUDA device", quant_scales=[s1, s2, z1, z2])
    _expect(ValueError, r"quant_scales has fc31_zeros but no fc2_zeros: zero points are given "
            "for both GEMMs or for neither", quant_scales=[s1, s2, z1, None])
    _expect(ValueError, "quant_scales has fc2_zeros but no fc31_zeros",
            quant_scales=[s1, s2, None, z2])
    _expect(ValueError, r"quant_scales\[2\] \(fc31_zeros\) must have the shape of its scales "
            r"\[4, 2, 64\] .*got \[4, 1, 64\]", quant_scales=[s1, s2, z1[:, :1], z2])
    _expect(TypeError, r"quant_scales\[3\] \(fc2_zeros\) must be a torch.Tensor",
            quant_scales=[s1, s2, z1, 8])


def test_devices_and_layouts_are_named(no_extension):
    s1, s2, z1, z2 = _scales(symmetric=False)
    _expect(ValueError, r"all tensors must be on input's device cpu; found quant_scales\[1\] "
            r"\(fc2_scales\) on meta", quant_scales=[s1, s2.to("meta")])
    _expect(ValueError, r"found quant_scales\[3\] \(fc2_zeros\) on meta",
            quant_scales=[s1, s2, z1, z2.to("meta")])
    strided = torch.zeros(E, 2 * I, H, dtype=torch.uint8)[:, :, : H // 2]
    _expect(ValueError, "fc1_expert_weights must be contiguous", fc1_expert_weights=strided)
    _expect(NotImplementedError, "output_dtype torch.float16", output_dtype=torch.float16)


def test_output_must_not_overlap_the_zeros(no_extension):
    s1, s2, z1, z2 = _scales(symmetric=False)
    buffer = torch.zeros(T * H + z2.numel(), dtype=BF16)
    shared = buffer[: z2.numel()].view(z2.shape)
    shared.copy_(z2)
    output = buffer[: T * H].view(T, H)
    _expect(ValueError, r"output overlaps quant_scales\[3\] \(fc2_zeros\)",
            quant_scales=[s1, s2, z1, shared], output=output)


def test_scales_are_made_contiguous(no_extension):
    s1, s2 = _call_args()["quant_scales"]
    strided = torch.empty(E, 2, 2 * 2 * I, dtype=BF16)[..., ::2]
    strided.copy_(s1)
    call = _prepared(quant_scales=[strided, s2])
    assert call.fc1_weight_scales.is_contiguous() and torch.equal(call.fc1_weight_scales, s1)


# ------------------------------------------------------------------ the raw op


def _op_args(symmetric=False, **overrides):
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(symmetric=symmetric, seed=5)
    zeros = (None, None) if symmetric else (quant_scales[2], quant_scales[3])
    args = {
        "output": torch.empty(T, H, dtype=BF16), "input": x, "token_selected_experts": ids,
        "token_final_scales": router, "fc1_expert_weights": p1, "fc2_expert_weights": p2,
        "fc1_weight_scales": quant_scales[0], "fc2_weight_scales": quant_scales[1],
        "fc1_expert_biases": None, "fc2_expert_biases": None, "swiglu_alpha": None,
        "swiglu_beta": None, "swiglu_limit": None, "workspace_buffer": None,
        "activation": int(ActivationType.Swiglu), "expert_start": 0, "num_experts_total": E,
        "tune_max_num_tokens": 8192, "tactic1": "", "tactic2": "", "enable_pdl": True,
        "clamped_relu2_limit": None, "situ_beta": None, "situ_linear_beta": None,
        "fc1_weight_zeros": zeros[0], "fc2_weight_zeros": zeros[1], "weight_format": "int4",
    }
    args.update(overrides)
    return args


def _run_op(args):
    torch.ops.cutlass_moe.fused_moe(*args.values())


@pytest.mark.parametrize("symmetric", [True, False])
def test_raw_op_runs_int4(fake_cpu, symmetric):
    args = _op_args(symmetric)
    _run_op(args)
    (call,) = _runner().calls
    assert (call["fc1_group_size"], call["fc2_group_size"]) == (32, 32)
    assert call["inter_size"] == I
    assert call["fc1_zeros"] == (0 if symmetric else args["fc1_weight_zeros"].data_ptr())


@pytest.mark.parametrize("overrides,match", [
    (lambda a: {"weight_format": ""},
     (r"fc1_expert_weights must be torch.bfloat16 or int8, got torch.uint8 \(packed uint8 int4 "
      r"weights need weight_format='int4', MXFP4 ones 'mxfp4'\)")),
    (lambda a: {"weight_format": "nvfp4"},
     r"weight_format must be one of \('', 'int4', 'fp8', 'mxfp4'\)"),
    (lambda a: {"fc1_expert_weights": a["fc1_expert_weights"].view(torch.int8)},
     "weight_format 'int4' needs packed uint8 fc1_expert_weights"),
    (lambda a: {"fc2_weight_scales": None},
     "int4 expert weights need fc1_weight_scales and fc2_weight_scales"),
    (lambda a: {"fc1_weight_scales": torch.ones(E, 4, 2 * I, dtype=BF16)},
     "fc1_weight_scales has 4 group rows along H=64"),
    (lambda a: {"fc2_weight_scales": torch.ones(E, 1, H, dtype=torch.float32)},
     r"fc2_weight_scales must be \[4, 1, 64\] of torch.bfloat16"),
    (lambda a: {"fc2_weight_scales": torch.ones(E, 1, H)[:1]}, r"fc2_weight_scales must be"),
    (lambda a: {"fc2_weight_zeros": None}, "given for both GEMMs or for neither"),
    (lambda a: {"fc1_weight_zeros": a["fc1_weight_zeros"][:, :1].contiguous()},
     r"fc1_weight_zeros must be \[4, 2, 64\]"),
    (lambda a: {"fc2_expert_weights": a["fc2_expert_weights"][:, :, :8].contiguous()},
     "int4 weights need hidden size H=64 and intermediate size I=16 to be multiples of 32"),
    (lambda a: {"fc1_weight_zeros": a["output"].view(-1)[: E * 2 * 2 * I].view(E, 2, 2 * I)},
     "output overlaps fc1_weight_zeros"),
])
def test_raw_op_refuses_inconsistent_int4_arguments(fake_cpu, overrides, match):
    args = _op_args()
    args.update(overrides(args))
    with pytest.raises(ValueError, match=match):
        _run_op(args)
    assert FakeMoeRunner.constructed == []  # nothing reached a runner


def test_raw_op_refuses_zeros_without_int4(fake_cpu):
    x, ids, router = torch.randn(T, H).to(BF16), *random_routing(T, E, K)
    w1, w2 = random_weights(E, H, I, True, BF16)
    args = _op_args(input=x, token_selected_experts=ids, token_final_scales=router,
                    fc1_expert_weights=w1, fc2_expert_weights=w2, fc1_weight_scales=None,
                    fc2_weight_scales=None, weight_format="")
    with pytest.raises(ValueError, match="fc1_weight_zeros and fc2_weight_zeros are only for "
                       "int4 weights"):
        _run_op(args)


def test_opcheck_int4(fake_cpu):
    """torch.library.opcheck with int4 weights, scales and zeros (the new schema arguments)."""
    args = _op_args()
    torch.library.opcheck(torch.ops.cutlass_moe.fused_moe.default, tuple(args.values()))


# ------------------------------------------------------------------ calls through the runner


@pytest.mark.parametrize("activation", [ActivationType.Swiglu, ActivationType.Relu,
                                        ActivationType.Geglu])
@pytest.mark.parametrize("group_size,symmetric", [(32, True), (32, False), (64, True),
                                                  (None, False)])
def test_call_matches_the_dequantised_reference(fake_cpu, activation, group_size, symmetric,
                                                out_dtype=BF16):
    i = 64 if group_size == 64 else I  # G must divide I too
    x, ids, router, p1, p2, quant_scales, d1, d2 = _problem(
        i=i, activation=activation, group_size=group_size, symmetric=symmetric, seed=1)
    out = cutlass_fused_moe(x, ids, router, p1, p2, out_dtype, quant_scales=quant_scales,
                            use_w4_group_scaling=True, activation_type=activation)[0]
    ref = reference_moe(x, ids, router, d1, d2, activation)
    assert out.dtype == out_dtype
    assert rel_l2(out.float(), ref) <= 1e-2
    assert FakeMoeRunner.constructed == [(1, INT4_ENUM, _ext.dtype_to_enum(out_dtype))]
    (call,) = _runner(out_dtype).calls
    groups = (H, i) if group_size is None else (group_size, group_size)
    assert (call["fc1_group_size"], call["fc2_group_size"]) == groups
    assert (call["hidden_size"], call["inter_size"], call["num_experts"]) == (H, i, E)
    assert call["fc1_weights"] == p1.data_ptr() and call["fc2_weights"] == p2.data_ptr()
    assert call["fc1_scales"] == quant_scales[0].data_ptr()
    assert call["fc2_scales"] == quant_scales[1].data_ptr()
    if symmetric:
        assert call["fc1_zeros"] == call["fc2_zeros"] == 0
    else:
        assert call["fc1_zeros"] == quant_scales[2].data_ptr()
        assert call["fc2_zeros"] == quant_scales[3].data_ptr()
    names = {d["name"] for gemm in (1, 2) for d in _runner(out_dtype).all_tactics(gemm)}
    assert call["tactic1"] in names and call["tactic2"] in names


def test_float32_output(fake_cpu):
    test_call_matches_the_dequantised_reference(fake_cpu, ActivationType.Swiglu, 32, False,
                                                torch.float32)


def test_different_group_sizes_per_gemm(fake_cpu):
    x, ids, router, _, _, _, _, _ = _problem()
    w1, w2 = random_weights(E, H, I, True, BF16, generator=torch.Generator().manual_seed(3))
    p1, p2, quant_scales = quantize_moe_weights_int4(w1, w2, (None, 32), symmetric=False)
    out = cutlass_fused_moe(x, ids, router, p1, p2, BF16, quant_scales=quant_scales,
                            use_w4_group_scaling=True)[0]
    (call,) = _runner().calls
    assert (call["fc1_group_size"], call["fc2_group_size"]) == (H, 32)
    ref = reference_moe(x, ids, router, dequantize_int4(p1, quant_scales[0], quant_scales[2], BF16),
                        dequantize_int4(p2, quant_scales[1], quant_scales[3], BF16))
    assert rel_l2(out.float(), ref) <= 1e-2


def test_int8_typed_bytes_give_the_same_call(fake_cpu):
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(seed=2)
    a = cutlass_fused_moe(x, ids, router, p1, p2, BF16, quant_scales=quant_scales,
                          use_w4_group_scaling=True)[0]
    b = cutlass_fused_moe(x, ids, router, p1.view(torch.int8), p2.view(torch.int8), BF16,
                          quant_scales=quant_scales, use_w4_group_scaling=True)[0]
    assert torch.equal(a, b)
    first, second = _runner().calls
    assert second["fc1_weights"] == first["fc1_weights"] == p1.data_ptr()


@pytest.mark.parametrize("t,e,expected", [
    (1, 8, M1N8), (1, 4, M1N8), (3, 10, SMALL_M), (2, 4, SMALL_M), (16, 4, SMALL_M),
    (17, 4, MID_M), (128, 4, MID_M), (129, 4, PREFILL),
])
def test_default_tactics(fake_cpu, fresh_tuner, monkeypatch, t, e, expected):
    """By rows per expert T*k/E (k=2): up to half a row DEFAULT_DECODE's int4 row (the FMA
    decode m1n8 on both GEMMs, a gated activation's GEMM1 included), then the int4 table (up to
    8 rows the 16x128 tile, up to 64 the 32-row tile, then the prefill tile). The tensor-core
    decode tactics are candidates but never a default."""
    monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(t=t, e=e, seed=3)
    cutlass_fused_moe(x, ids, router, p1, p2, BF16, quant_scales=quant_scales,
                      use_w4_group_scaling=True)
    (call,) = _runner().calls
    assert (call["tactic1"], call["tactic2"]) == (expected, expected)
    assert fresh_tuner.last_selection(1).source == "default"
    assert {MMA_GATED, MMA_8, MMA_16} <= set(
        tactics.candidate_names(INT4_DTYPES, 1, ActivationType.Swiglu, CPU))
    # Every decode tactic a candidate: int4's defaults are the same.
    monkeypatch.setenv(tactics.DECODE_ENV, "1")
    assert tactics.default_tactics(INT4_DTYPES, ActivationType.Swiglu, CPU, t, K, e) == (
        expected, expected)


@pytest.mark.parametrize("t,e,expected", [(1, 8, M1N8), (1, 4, M1N8), (3, 10, SMALL_M),
                                          (2, 4, SMALL_M), (16, 4, SMALL_M), (17, 4, MID_M)])
def test_default_gemm1_of_an_ungated_activation(fake_cpu, monkeypatch, t, e, expected):
    """The gated decode tactics serve gated activations only; the named m1n8 is a plain one, so
    an ungated GEMM1 takes what a gated one and GEMM2 take."""
    monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
    assert tactics.default_tactics(INT4_DTYPES, ActivationType.Relu, CPU, t, K, e) == (
        expected, expected)


@pytest.mark.parametrize("gemm", [1, 2])
def test_default_without_the_named_decode_tactic(gemm):
    """A build without the m1n8 decode tactic (the fast build) falls back to the int4 table's
    16x128 tile at decode sizes, not to another decode tactic."""
    from _fake_ext import int4_tactic_descriptors

    descs = int4_tactic_descriptors(gemm)
    assert tactics.default_tactic(descs, 0.5) == M1N8
    without = [d for d in descs if d["name"] != M1N8]
    assert [tactics.default_tactic(without, rows) for rows in (0, 0.25, 0.5, 1)] == [SMALL_M] * 4


@pytest.mark.parametrize("t,expected", [(1, SMALL_M), (16, SMALL_M), (17, MID_M), (128, MID_M),
                                        (129, PREFILL)])
def test_default_tactics_with_decode_tactics_off(fake_cpu, fresh_tuner, monkeypatch, t,
                                                 expected):
    """CUTLASS_MOE_DECODE_TACTICS=0: no decode tactic is a candidate, so the int4 table alone
    decides (<= 8 rows per expert small-M, <= 64 the 32-row tile, then the prefill tile)."""
    monkeypatch.setenv(tactics.DECODE_ENV, "0")
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(t=t, seed=3)
    cutlass_fused_moe(x, ids, router, p1, p2, BF16, quant_scales=quant_scales,
                      use_w4_group_scaling=True)
    (call,) = _runner().calls
    assert (call["tactic1"], call["tactic2"]) == (expected, expected)
    # The defaults are cached per decode mode: back to auto, the decode default returns.
    monkeypatch.delenv(tactics.DECODE_ENV)
    assert tactics.default_tactics(INT4_DTYPES, ActivationType.Swiglu, CPU, t, K, E) == (
        (M1N8, M1N8) if t * K / E <= 0.5 else (expected, expected))


def test_candidates_and_decode_tactics(fake_cpu, monkeypatch):
    """int4 decode tactics are candidates unless CUTLASS_MOE_DECODE_TACTICS=0; =1 adds no
    other int4 one."""
    monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
    decode = {DECODE, DECODE_GATED, M1N8, MMA_GATED, MMA_8, MMA_16}
    names = tactics.candidate_names(INT4_DTYPES, 1, ActivationType.Swiglu, CPU)
    assert decode <= set(names)
    assert "sm80_bf16_int4_m128n256k64_w64x64x64_s3" not in names  # not runnable
    for value in ("1", "on"):
        monkeypatch.setenv(tactics.DECODE_ENV, value)
        assert tactics.candidate_names(INT4_DTYPES, 1, ActivationType.Swiglu, CPU) == names
    for value in ("", "1"):
        monkeypatch.setenv(tactics.DECODE_ENV, value)
        relu = tactics.candidate_names(INT4_DTYPES, 1, ActivationType.Relu, CPU)
        # the gated ones fuse the activation
        assert {DECODE, M1N8, MMA_8, MMA_16} <= set(relu)
        assert not {DECODE_GATED, MMA_GATED} & set(relu)
        gemm2 = tactics.candidate_names(INT4_DTYPES, 2, ActivationType.Swiglu, CPU)
        assert {DECODE, M1N8, MMA_8, MMA_16} <= set(gemm2)
        assert not {DECODE_GATED, MMA_GATED} & set(gemm2)
        assert all(d["weight_dtype"] == "int4" and d["split_k"] == 1
                   for d in tactics.candidates(INT4_DTYPES, 2, ActivationType.Swiglu, CPU))
    for value in ("0", "off"):
        monkeypatch.setenv(tactics.DECODE_ENV, value)
        for gemm in (1, 2):
            names = tactics.candidate_names(INT4_DTYPES, gemm, ActivationType.Swiglu, CPU)
            assert names and all(n.startswith("sm80_bf16_int4_") for n in names)
    # include_decode overrides the environment.
    assert decode <= set(tactics.candidate_names(INT4_DTYPES, 1, ActivationType.Swiglu, CPU,
                                                 include_decode=True))
    monkeypatch.delenv(tactics.DECODE_ENV)
    assert not decode & set(tactics.candidate_names(INT4_DTYPES, 1, ActivationType.Swiglu, CPU,
                                                    include_decode=False))


def test_bad_decode_setting_fails_the_call(fake_cpu, monkeypatch):
    monkeypatch.setenv(tactics.DECODE_ENV, "maybe")
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(seed=3)
    with pytest.raises(ValueError, match="CUTLASS_MOE_DECODE_TACTICS='maybe' is not a valid"):
        cutlass_fused_moe(x, ids, router, p1, p2, BF16, quant_scales=quant_scales,
                          use_w4_group_scaling=True)


def test_forced_tactics(fake_cpu, monkeypatch):
    monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
    x, ids, router, p1, p2, quant_scales, d1, d2 = _problem(seed=4)
    kwargs = {"quant_scales": quant_scales, "use_w4_group_scaling": True}
    out = cutlass_fused_moe(x, ids, router, p1, p2, BF16, tactics=(DECODE_GATED, DECODE),
                            **kwargs)[0]
    (call,) = _runner().calls
    assert (call["tactic1"], call["tactic2"]) == (DECODE_GATED, DECODE)
    assert rel_l2(out.float(), reference_moe(x, ids, router, d1, d2)) <= 1e-2
    # A 16-bit runner's tactic is no int4 tactic: the message lists the int4 candidates.
    with pytest.raises(ValueError, match=r"tactic 'fake_g1_m16n128k64_s4' is not a runnable "
                       r"GEMM1 tactic for dtypes \('torch.bfloat16', 'int4', 'torch.bfloat16'\)"
                       r".*available: .*sm80_bf16_int4_m16n64k64"):
        cutlass_fused_moe(x, ids, router, p1, p2, BF16, tactics=("fake_g1_m16n128k64_s4", MID_M),
                          **kwargs)


class _Int4Block(torch.nn.Module):
    def __init__(self, p1, p2, quant_scales):
        super().__init__()
        self.register_buffer("p1", p1)
        self.register_buffer("p2", p2)
        for index, t in enumerate(quant_scales):
            self.register_buffer(f"q{index}", t)
        self.count = len(quant_scales)

    def forward(self, x, ids, router):
        quant_scales = [getattr(self, f"q{index}") for index in range(self.count)]
        out = cutlass_fused_moe(x, ids, router, self.p1, self.p2, x.dtype,
                                quant_scales=quant_scales, use_w4_group_scaling=True)[0]
        return x + out


@pytest.mark.parametrize("symmetric", [True, False])
def test_torch_compile_fullgraph(fake_cpu, symmetric):
    torch._dynamo.reset()
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(t=12, symmetric=symmetric, seed=6)
    block = _Int4Block(p1, p2, quant_scales)
    with torch.no_grad():
        eager = block(x, ids, router)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, ids, router)
    torch.testing.assert_close(compiled, eager)


# ------------------------------------------------------------------ runner keys


def test_runner_key_of_int4_is_its_own(fake_cpu):
    assert _ext.dtype_to_enum(_ext.INT4) == 4
    assert _ext.PACKED_WEIGHT_FORMATS == {"int4": 4, "fp8": 5, "mxfp4": 6}
    assert _ext.runner_key(BF16, "int4", BF16) == (1, 4, 1)
    assert _ext.runner_key(torch.float16, "int4", torch.float32) == (0, 4, 2)
    int4 = _ext.get_runner(BF16, "int4", BF16)
    assert int4 is _ext.get_runner(BF16, _ext.INT4, BF16)
    assert int4 is not _ext.get_runner(BF16, torch.int8, BF16)
    assert FakeMoeRunner.constructed == [(1, 4, 1), (1, 3, 1)]
    assert [d["weight_dtype"] for d in _ext.tactics(BF16, "int4", BF16, 1, CPU)] == [
        "int4"] * len(_ext.tactics(BF16, "int4", BF16, 1, CPU))
    assert [_ext.weight_type_name(w) for w in (BF16, torch.float16, torch.int8, "int4")] == [
        "bf16", "fp16", "int8", "int4"]


def test_uint8_storage_is_not_a_weight_type():
    """uint8 holds int4 today and other packed formats later: it never keys a runner."""
    with pytest.raises(NotImplementedError, match=r"uint8 is the storage of packed weight "
                       r"formats: name the format, e.g. 'int4'"):
        _ext.runner_key(BF16, torch.uint8, BF16)
    with pytest.raises(NotImplementedError, match="weight format 'nvfp4' has no cutlass_moe "
                       "kernel type; packed formats: 'int4', 'fp8', 'mxfp4'"):
        _ext.dtype_to_enum("nvfp4")
    with pytest.raises(NotImplementedError):
        _ext.weight_type_name(torch.uint8)


# ------------------------------------------------------------------ tuner keys and profiling


def test_shape_key_carries_format_group_size_and_zeros():
    def key(group_sizes=(128, 128), zeros=False, dtypes=INT4_DTYPES):
        return autotuner.shape_key(dtypes, ActivationType.Swiglu, 8, 2048, 768, 2, 1,
                                   group_sizes=group_sizes, zeros=zeros)

    assert key() == ShapeKey("bf16_int4_bf16", "int4_g128", 8, 2048, 768, 2, "Swiglu", 1)
    assert key(zeros=True).quant == "int4_g128_asym"
    assert key((64, 64)).quant == "int4_g64"
    assert key((2048, 768)).quant == "int4_g2048_g768"  # per-channel: G = K of each GEMM
    assert len({key(), key(zeros=True), key((64, 64)), key((128, 64)),
                key(dtypes=(BF16, torch.int8, BF16)), key(dtypes=(BF16,) * 3)}) == 6
    assert key(dtypes=(BF16, torch.int8, BF16)).quant == "int8_per_channel"
    assert key(dtypes=(BF16,) * 3).quant == "none"  # group sizes ignored without int4
    with pytest.raises(ValueError, match="int4 group sizes must be >= 1"):
        key((0, 0))
    assert tuning_cache.quant_int4((32, 32), True) == "int4_g32_asym"
    assert tuning_cache.dtype_tag(INT4_DTYPES) == "bf16_int4_bf16"


def test_calls_use_their_group_sizes_cache_entry(fake_cpu, fresh_tuner):
    x, ids, router, p1, p2, quant_scales, _, _ = _problem(seed=7)  # G = 32, symmetric, T = 9
    shape = autotuner.shape_key(INT4_DTYPES, ActivationType.Swiglu, E, H, I, K, 1,
                                group_sizes=(32, 32))
    device = autotuner.device_id(CPU)
    bucket = autotuner.bucket_for(T, 8192)
    fresh_tuner.record(TuningKey(1, shape, device, bucket), PREFILL, 1.0)
    fresh_tuner.record(TuningKey(2, shape, device, bucket), MID_M, 1.0)
    # Entries of the same layer with another group size or with zero points are not this call's.
    for other in (autotuner.shape_key(INT4_DTYPES, ActivationType.Swiglu, E, H, I, K, 1,
                                      group_sizes=(64, 64)),
                  autotuner.shape_key(INT4_DTYPES, ActivationType.Swiglu, E, H, I, K, 1,
                                      group_sizes=(32, 32), zeros=True)):
        for gemm in (1, 2):
            fresh_tuner.record(TuningKey(gemm, other, device, bucket), DECODE, 1.0)
    cutlass_fused_moe(x, ids, router, p1, p2, BF16, quant_scales=quant_scales,
                      use_w4_group_scaling=True)
    (call,) = _runner().calls
    assert (call["tactic1"], call["tactic2"]) == (PREFILL, MID_M)
    assert fresh_tuner.last_selection(1).source == "cache"


@pytest.fixture
def cpu_profiling(monkeypatch):
    """profile_gemm on host tensors: CUDA streams, events and the L2 flush stubbed, times
    made up per tactic (the 32-row tactic is the fastest)."""
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


def test_tuning_an_int4_call_passes_weights_scales_zeros_and_group_sizes(
        fake_cpu, fresh_tuner, cpu_profiling):
    x, ids, router, _, _, _, _, _ = _problem(seed=8)
    w1, w2 = random_weights(E, H, I, True, BF16, generator=torch.Generator().manual_seed(9))
    p1, p2, quant_scales = quantize_moe_weights_int4(w1, w2, (64, 32), symmetric=False)
    s1, s2, z1, z2 = quant_scales
    with autotuner.autotune():
        cutlass_fused_moe(x, ids, router, p1, p2, BF16, quant_scales=quant_scales,
                          use_w4_group_scaling=True)
    runner = _runner()
    prepared = [args for kind, args in runner.profile_calls if kind == "prepare"]
    ran = [args for kind, args in runner.profile_calls if kind == "run"]
    assert {(a["gemm"], a["weights"], a["scales"], a["zeros"], a["group_size"])
            for a in prepared} == {(1, p1.data_ptr(), s1.data_ptr(), z1.data_ptr(), 64),
                                   (2, p2.data_ptr(), s2.data_ptr(), z2.data_ptr(), 32)}
    assert len(prepared) == 2 * len(autotuner.PROFILE_SEEDS)
    assert {(a["gemm"], a["group_size"]) for a in ran} == {(1, 64), (2, 32)}
    assert all(a["hidden_size"] == H and a["inter_size"] == I for a in prepared + ran)
    assert {a["tactic"] for a in ran} == {
        n for gemm in (1, 2) for n in tactics.candidate_names(INT4_DTYPES, gemm,
                                                              ActivationType.Swiglu, CPU)}
    entries = fresh_tuner.entries()
    assert {(key.gemm, key.shape.dtypes, key.shape.quant) for key in entries} == {
        (1, "bf16_int4_bf16", "int4_g64_g32_asym"), (2, "bf16_int4_bf16", "int4_g64_g32_asym")}
    assert fresh_tuner.last_selection(1).source == "tuned"
    assert fresh_tuner.last_selection(2).source == "tuned"
    (call,) = runner.calls  # the call itself ran the tuned tactics
    assert (call["tactic1"], call["tactic2"]) == tuple(
        entries[key][0] for key in sorted(entries, key=lambda key: key.gemm))
