"""cutlass_fused_moe's argument checks and the default tactic heuristic (CPU, no extension).

Every check here runs before the extension is touched: the tests replace the extension by
"missing", so a check that reached it would raise its RuntimeError instead of the expected error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import pathlib
import random
import sys

import pytest
import torch

from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, tactics, validation
from cutlass_moe.quantization import quantize_int8_per_channel
from cutlass_moe.tactics import default_tactic

E, H, I, K, T = 4, 16, 8, 2, 5
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _no_extension(monkeypatch):
    """No extension, and no check of CUDA availability unless a test asks for it."""
    monkeypatch.delenv(validation.CHECK_INPUTS_ENV, raising=False)
    with _ext._replaced_extension(None):
        yield


def _args(activation=ActivationType.Swiglu, dtype=BF16, t=T, e=E, h=H, i=I, k=K):
    gen = torch.Generator().manual_seed(0)
    n1 = 2 * i if activation in (ActivationType.Swiglu, ActivationType.Geglu) else i
    return {
        "input": torch.randn(t, h, generator=gen).to(dtype),
        "token_selected_experts": torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32),
        "token_final_scales": torch.rand(t, k, generator=gen),
        "fc1_expert_weights": (torch.randn(e, n1, h, generator=gen) / 4).to(dtype),
        "fc2_expert_weights": (torch.randn(e, h, i, generator=gen) / 3).to(dtype),
        "output_dtype": dtype,
        "activation_type": activation,
    }


def _call(**overrides):
    args = _args(overrides.pop("activation_type", ActivationType.Swiglu))
    args.update(overrides)
    return cutlass_fused_moe(**args)


def _expect(exc, match, **overrides):
    with pytest.raises(exc, match=match):
        _call(**overrides)


# -------------------------------------------------------------------- unsupported modes


@pytest.mark.parametrize(
    "flag",
    [
        "enable_alltoall",
        "use_deepseek_fp8_block_scale",
        "use_mxfp8_act_scaling",
        "min_latency_mode",
        "use_packed_weights",
        "use_wfp4afp8_humming",
    ],
)
def test_unsupported_flags(flag):
    _expect(NotImplementedError, f"{flag}=True is not supported; cutlass_moe supports "
            "float16/bfloat16 MoE with weights of the activation dtype or int8", **{flag: True})


def test_unsupported_quantization_inputs():
    _expect(NotImplementedError, "quant_scales without use_int8_woq_per_channel=True or "
            "use_w4_group_scaling=True is not supported", quant_scales=[torch.ones(1)])
    _expect(NotImplementedError, "input_sf", input_sf=torch.ones(1))
    _expect(NotImplementedError, "cluster_size=2", cluster_size=2)
    _expect(NotImplementedError, "tactics=", profile_ids=[0, 3])


def test_flashinfer_compatible_no_op_arguments_pass_validation(monkeypatch):
    """quant_scales=[] / None, profile_ids of -1, enable_pdl etc. reach the device check."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _expect(RuntimeError, "no CUDA device", quant_scales=[], profile_ids=[-1, -1],
            enable_pdl=False, use_fused_finalize=False, swizzled_input_sf=False,
            tune_max_num_tokens=256)


@pytest.mark.parametrize("activation", [ActivationType.InvalidType, 11, "InvalidType"])
def test_unsupported_activation(activation):
    with pytest.raises(NotImplementedError, match="InvalidType is not supported.*Swiglu, Geglu, "
                       "Gelu, Relu, Silu, Identity, SwigluBias, Relu2, SwigluStep, GegluTanh, "
                       "Situ, ClampedRelu2"):
        _call(activation_type=activation)


def test_unknown_activation():
    _expect(ValueError, "activation_type", activation_type=99)


def test_activation_from_foreign_enum_and_int(monkeypatch):
    """Members of another ActivationType enum (e.g. FlashInfer's) are matched by name."""
    import enum

    class OtherActivationType(enum.IntEnum):
        Identity = 7  # older FlashInfer value

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _args(ActivationType.Identity)
    args["activation_type"] = OtherActivationType.Identity
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cutlass_fused_moe(**args)
    args["activation_type"] = int(ActivationType.Identity)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cutlass_fused_moe(**args)


# -------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.int8])
def test_unsupported_input_dtype(dtype):
    args = _args()
    args["input"] = args["input"].float().to(dtype)
    with pytest.raises(NotImplementedError, match="float16 or bfloat16 activations"):
        cutlass_fused_moe(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_or_unsupported_weight_dtype(dtype):
    args = _args()
    args["fc1_expert_weights"] = args["fc1_expert_weights"].float().to(dtype)
    with pytest.raises(NotImplementedError, match="fc1_expert_weights dtype.*same dtype"):
        cutlass_fused_moe(**args)
    args = _args()
    args["fc2_expert_weights"] = args["fc2_expert_weights"].float().to(dtype)
    with pytest.raises(NotImplementedError, match="fc2_expert_weights dtype"):
        cutlass_fused_moe(**args)


def test_output_dtype():
    _expect(NotImplementedError, "output_dtype torch.float16.*float32", output_dtype=torch.float16)
    _expect(NotImplementedError, "output_dtype", output_dtype=torch.float8_e4m3fn)


def test_ids_and_scales_dtypes():
    args = _args()
    _expect(ValueError, "token_selected_experts must be int32",
            token_selected_experts=args["token_selected_experts"].float())
    _expect(ValueError, "token_selected_experts must be int32",
            token_selected_experts=args["token_selected_experts"].to(torch.int16))
    _expect(ValueError, "token_final_scales must be float32",
            token_final_scales=args["token_final_scales"].double())
    _expect(ValueError, "token_final_scales must be float32",
            token_final_scales=args["token_final_scales"].to(torch.int32))


# -------------------------------------------------------------------- shapes


def test_input_shape():
    _expect(ValueError, r"input must be 2-D \[T, H\], got shape \[1, 5, 16\]",
            input=torch.randn(1, T, H).to(BF16))


def test_ids_shape():
    _expect(ValueError, r"token_selected_experts must be \[T, k\] with T=5.*got \[4, 2\]",
            token_selected_experts=torch.zeros(T - 1, K, dtype=torch.int32))
    _expect(ValueError, r"got \[5\]", token_selected_experts=torch.zeros(T, dtype=torch.int32))
    _expect(ValueError, "k >= 1", token_selected_experts=torch.zeros(T, 0, dtype=torch.int32),
            token_final_scales=torch.zeros(T, 0))


def test_scales_shape():
    _expect(ValueError, r"token_final_scales must have the shape.*\[5, 2\], got \[5, 3\]",
            token_final_scales=torch.rand(T, 3))


def test_fc1_shape_gated_and_plain():
    _expect(ValueError, r"fc1_expert_weights must be \[E, 2\*I, H\].*\[4, 16, 16\].*Swiglu.*"
            r"got \[4, 8, 16\]", fc1_expert_weights=torch.randn(E, I, H).to(BF16))
    with pytest.raises(ValueError, match=r"\[E, I, H\] = \[4, 8, 16\] for activation Relu"):
        args = _args(ActivationType.Relu)
        args["fc1_expert_weights"] = torch.randn(E, 2 * I, H).to(BF16)
        cutlass_fused_moe(**args)
    _expect(ValueError, "fc1_expert_weights must be 3-D",
            fc1_expert_weights=torch.randn(2 * I, H).to(BF16))
    _expect(ValueError, r"fc1_expert_weights must be.*got \[4, 16, 24\]",
            fc1_expert_weights=torch.randn(E, 2 * I, H + 8).to(BF16))


def test_fc2_shape():
    _expect(ValueError, r"fc2_expert_weights must be \[E=4, H=16, I\].*got \[4, 24, 8\]",
            fc2_expert_weights=torch.randn(E, H + 8, I).to(BF16))
    _expect(ValueError, r"fc2_expert_weights must be \[E=4.*got \[3, 16, 8\]",
            fc2_expert_weights=torch.randn(E - 1, H, I).to(BF16))
    _expect(ValueError, "fc2_expert_weights must be 3-D",
            fc2_expert_weights=torch.randn(H, I).to(BF16))


def test_hidden_and_inter_alignment():
    with pytest.raises(ValueError, match="H=12.*multiples of 8"):
        cutlass_fused_moe(**_args(h=12))
    with pytest.raises(ValueError, match="I=12.*multiples of 8"):
        cutlass_fused_moe(**_args(i=12))


@pytest.mark.parametrize("h,i,bad", [(0, 8, "H=0"), (16, 0, "I=0")])
def test_zero_hidden_or_inter_size_is_refused_in_python(h, i, bad):
    """H = 0 or I = 0 passes `% 8`; the shape rule refuses it before any extension call."""
    with pytest.raises(ValueError, match=f"positive multiples of 8.*{bad} is not"):
        cutlass_fused_moe(**_args(h=h, i=i))


def test_expert_ids_beyond_int32_are_refused():
    """ep_rank * E_local (the first expert id of a rank) must fit the int32 ids: a huge
    ep_size is a ValueError, not a TypeError from the binding."""
    with pytest.raises(ValueError, match=r"E_local\*ep_size=4\*1073741824=4294967296 .*int32"):
        cutlass_fused_moe(**_args(), ep_size=2**30, ep_rank=2**30 - 1)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_experts": 4, "hidden_size": 16, "inter_size": 8, "top_k": 2}, None),
    ({"num_experts": 0, "hidden_size": 16, "inter_size": 8, "top_k": 1}, "at least one expert"),
    ({"num_experts": 4, "hidden_size": 16, "inter_size": 8, "top_k": 0}, "top_k must be >= 1"),
    ({"num_experts": 4, "hidden_size": 16, "inter_size": 8, "top_k": 1, "ep_size": 0},
     "ep_size must be >= 1"),
    ({"num_experts": 4, "hidden_size": 24, "inter_size": 16, "top_k": 1, "weights": "int8"},
     "int8 weights need hidden size H=24"),
    ({"num_experts": 4, "hidden_size": 32, "inter_size": 16, "top_k": 1, "weights": "int4"},
     (r"int4 weights need hidden size H=32 and intermediate size I=16 to be multiples of 32 "
      r"\(16-byte loads of packed int4 weights\); I=16 is not")),
    ({"num_experts": 4, "hidden_size": 64, "inter_size": 32, "top_k": 1, "weights": "int4"},
     None),
    ({"num_experts": 4, "hidden_size": 32, "inter_size": 16, "top_k": 1, "weights": "int2"},
     "weights must be one of"),
    ({"num_experts": 2, "hidden_size": 16, "inter_size": 8, "top_k": 5, "ep_size": 2},
     r"top_k=5 exceeds .*2\*2=4"),
])
def test_check_layer_shape(kwargs, match):
    """The one shape rule that the op, the tuner and the command line share."""
    if match is None:
        validation.check_layer_shape(**kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            validation.check_layer_shape(**kwargs)


def test_top_k_larger_than_total_experts():
    with pytest.raises(ValueError, match=r"top_k=5 exceeds.*4\*1=4"):
        cutlass_fused_moe(**_args(k=5))


def test_bias_shapes_and_dtypes():
    _expect(ValueError, r"fc1_expert_biases must be \[4, 16\], got \[4, 8\]",
            fc1_expert_biases=torch.zeros(E, I, dtype=BF16))
    _expect(ValueError, r"fc2_expert_biases must be \[4, 16\], got \[4, 8\]",
            fc2_expert_biases=torch.zeros(E, I, dtype=BF16))
    _expect(ValueError, "fc2_expert_biases must have the input dtype",
            fc2_expert_biases=torch.zeros(E, H))


def test_swiglu_parameters():
    with pytest.raises(ValueError, match="only valid with ActivationType.Swiglu.*Geglu"):
        _call(activation_type=ActivationType.Geglu, swiglu_limit=torch.ones(E))
    _expect(ValueError, r"swiglu_alpha must be \[E_local=4\], got \[3\]",
            swiglu_alpha=torch.ones(E - 1))
    _expect(ValueError, "swiglu_beta must be float32",
            swiglu_beta=torch.ones(E, dtype=torch.int32))


# -------------------------------------------------------------------- devices and layouts


def test_tensors_on_different_devices_are_named():
    _expect(ValueError, "all tensors must be on input's device cpu.*fc2_expert_weights on meta",
            fc2_expert_weights=torch.empty(E, H, I, dtype=BF16, device="meta"))
    _expect(ValueError, "token_final_scales on meta, fc1_expert_biases on meta",
            token_final_scales=torch.empty(T, K, device="meta"),
            fc1_expert_biases=torch.empty(E, 2 * I, dtype=BF16, device="meta"))


def test_weights_must_be_contiguous():
    strided = torch.randn(E, 2 * I, 2 * H).to(BF16)[:, :, :H]
    _expect(ValueError, "fc1_expert_weights must be contiguous", fc1_expert_weights=strided)
    strided2 = torch.randn(E, I, H).to(BF16).transpose(1, 2)
    _expect(ValueError, "fc2_expert_weights must be contiguous", fc2_expert_weights=strided2)


def test_output_checks():
    _expect(ValueError, r"output must be \[5, 16\] of dtype torch.bfloat16, got \[5, 8\]",
            output=torch.empty(T, I, dtype=BF16))
    _expect(ValueError, "output must be.*got.*torch.float32",
            output=torch.empty(T, H))
    _expect(ValueError, "output on meta", output=torch.empty(T, H, dtype=BF16, device="meta"))
    _expect(ValueError, "output must be contiguous",
            output=torch.empty(H, T, dtype=BF16).t())


def test_workspace_buffer_checks():
    _expect(ValueError, "workspace_buffer must be a contiguous 1-D uint8",
            workspace_buffer=torch.empty(16, dtype=torch.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tp_size": 0}, "tp_size must be >= 1"),
        ({"ep_size": 0}, "ep_size must be >= 1"),
        ({"tp_size": 2, "tp_rank": 2}, r"tp_rank must be in \[0, tp_size=2\), got 2"),
        ({"ep_size": 2, "ep_rank": 2}, r"ep_rank must be in \[0, ep_size=2\), got 2"),
        ({"ep_rank": -1}, "ep_rank must be in"),
        ({"cluster_rank": 1}, "cluster_rank must be 0"),
        ({"tune_max_num_tokens": 0}, "tune_max_num_tokens"),
        ({"tactics": ("only_one",)}, "tactics must be"),
        ({"tactics": "ab"}, "tactics must be"),
    ],
)
def test_parallel_sizes_and_options(kwargs, match):
    _expect(ValueError, match, **kwargs)


# -------------------------------------------------------------------- check_inputs


def test_check_inputs_names_bad_ids():
    ids = torch.zeros(T, K, dtype=torch.int32)
    ids[0, 1] = 4
    ids[2, 0] = -3
    ids[4, 1] = 1000
    with pytest.raises(ValueError, match=r"has 3 entries outside \[0, 4\): -3, 4, 1000 "
                                         r"\(3 distinct values; the first at \[0, 1\]\)$"):
        _call(token_selected_experts=ids, check_inputs=True)


def test_check_expert_ids_counts_entries_and_distinct_values():
    """Entries and distinct values are counted apart: 7 bad entries holding 5 values."""
    ids = torch.zeros(6, 2, dtype=torch.int64)
    for pos, value in zip([(0, 0), (0, 1), (1, 0), (2, 1), (3, 0), (4, 0), (5, 1)],
                          [9, 9, -1, 9, 4, 5, 6]):
        ids[pos] = value
    with pytest.raises(ValueError) as info:
        validation.check_expert_ids(ids, 4)
    assert str(info.value) == ("token_selected_experts has 7 entries outside [0, 4): -1, 4, 5, "
                               "6, 9 (5 distinct values; the first at [0, 0])")
    ids.zero_()
    ids[3, 1] = 4
    with pytest.raises(ValueError) as info:
        validation.check_expert_ids(ids, 4)
    assert str(info.value) == "token_selected_experts has 1 entry outside [0, 4): 4 (at [3, 1])"
    ids[5, 0] = 4
    with pytest.raises(ValueError, match=r"has 2 entries outside \[0, 4\): 4 \(1 distinct "
                                         r"value; the first at \[3, 1\]\)"):
        validation.check_expert_ids(ids, 4)
    validation.check_expert_ids(ids.clamp(0, 3), 4)  # nothing to report


def test_check_inputs_uses_global_expert_count_under_ep(monkeypatch):
    """Ids of other EP ranks are valid ids; only ids outside [0, E*ep_size) are reported."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ids = torch.full((T, K), 7, dtype=torch.int32)  # rank 1's expert with E=4, ep_size=2
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _call(token_selected_experts=ids, check_inputs=True, ep_size=2, ep_rank=0)
    ids[0, 0] = 8
    with pytest.raises(ValueError, match=r"outside \[0, 8\): 8"):
        _call(token_selected_experts=ids, check_inputs=True, ep_size=2, ep_rank=0)


def test_check_inputs_lists_first_few():
    ids = torch.arange(100, 100 + T * K, dtype=torch.int64).view(T, K)
    with pytest.raises(ValueError, match=r"100, 101, .*107 and 2 more \(10 distinct"):
        _call(token_selected_experts=ids, check_inputs=True)


def test_check_inputs_from_environment(monkeypatch):
    ids = torch.full((T, K), E, dtype=torch.int32)
    monkeypatch.setenv(validation.CHECK_INPUTS_ENV, "1")
    with pytest.raises(ValueError, match="outside"):
        _call(token_selected_experts=ids)
    monkeypatch.setenv(validation.CHECK_INPUTS_ENV, "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _call(token_selected_experts=ids)


# -------------------------------------------------------------------- the CUDA check


def test_no_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _expect(RuntimeError, "no CUDA device is available")


def test_cpu_tensors_with_cuda_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _expect(ValueError, "needs CUDA tensors, got tensors on cpu")


def test_lenient_inputs_pass_validation(monkeypatch):
    """Non-contiguous input, int64 ids, fp16/bf16 scales are converted silently."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _args()
    _expect(RuntimeError, "no CUDA device",
            input=torch.randn(H, T).to(BF16).t(),
            token_selected_experts=args["token_selected_experts"].long(),
            token_final_scales=args["token_final_scales"].to(BF16))
    _expect(RuntimeError, "no CUDA device", output=torch.empty(T, H, dtype=BF16),
            output_dtype=BF16)
    _expect(RuntimeError, "no CUDA device", output_dtype=torch.float32)


def test_zero_tokens_is_validated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _args(t=0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cutlass_fused_moe(**args)
    args["fc2_expert_weights"] = torch.randn(E, H + 8, I).to(BF16)
    with pytest.raises(ValueError, match="fc2_expert_weights"):
        cutlass_fused_moe(**args)


# -------------------------------------------------------------------- normalisation


def _prepared(**overrides):
    args = _args(overrides.pop("activation_type", ActivationType.Swiglu))
    args.update(overrides)
    defaults = {
        "quant_scales": None, "fc1_expert_biases": None, "fc2_expert_biases": None, "input_sf": None,
        "swiglu_alpha": None, "swiglu_beta": None, "swiglu_limit": None, "tp_size": 1, "tp_rank": 0,
        "ep_size": 1, "ep_rank": 0, "cluster_size": 1, "cluster_rank": 0, "output": None,
        "enable_alltoall": False, "use_deepseek_fp8_block_scale": False, "use_w4_group_scaling": False,
        "use_int8_woq_per_channel": False, "use_mxfp8_act_scaling": False, "min_latency_mode": False,
        "use_packed_weights": False, "use_wfp4afp8_humming": False, "tune_max_num_tokens": 8192,
        "profile_ids": None, "workspace_buffer": None, "tactics": None,
    }
    defaults.update(args)
    return validation.prepare_call(**defaults)


def test_prepare_tp_bias_rule_and_expert_start():
    b2 = torch.randn(E, H).to(BF16)
    rank0 = _prepared(fc2_expert_biases=b2, tp_size=2, tp_rank=0, ep_size=3, ep_rank=2)
    rank1 = _prepared(fc2_expert_biases=b2, tp_size=2, tp_rank=1, ep_size=3, ep_rank=2)
    assert rank0.fc2_expert_biases is not None and rank1.fc2_expert_biases is None
    assert rank0.expert_start == 2 * E and rank0.num_experts_total == 3 * E


def test_prepare_converts_ids_without_aliasing():
    ids = torch.tensor([[0, 2**32 + 1]] * T, dtype=torch.int64)
    ids[1, 0] = -(2**40)
    call = _prepared(token_selected_experts=ids)
    assert call.token_selected_experts.dtype == torch.int32
    converted = call.token_selected_experts
    assert converted[0, 0] == 0
    assert not (0 <= int(converted[0, 1]) < E) and not (0 <= int(converted[1, 0]) < E)


def test_prepare_fills_clamped_swiglu_defaults():
    call = _prepared(swiglu_limit=torch.full((E,), 7.0, dtype=BF16))
    assert call.swiglu_limit.dtype == torch.float32 and torch.all(call.swiglu_limit == 7)
    assert torch.all(call.swiglu_alpha == 1) and torch.all(call.swiglu_beta == 0)
    plain = _prepared()
    assert plain.swiglu_alpha is None and plain.swiglu_limit is None


def test_prepare_makes_inputs_contiguous_and_float32_scales():
    call = _prepared(input=torch.randn(H, T).to(BF16).t(),
                     token_final_scales=torch.rand(T, K).to(torch.float16))
    assert call.input.is_contiguous()
    assert call.token_final_scales.dtype == torch.float32


# -------------------------------------------------------------------- default_tactic


def _descs(tile_ms=(16, 32, 64, 128), stages=(2, 3, 4), tile_ns=(128, 256)):
    return [
        {"name": f"t_m{m}_n{n}_s{s}", "gemm": 1, "tile_m": m, "tile_n": n, "tile_k": 64, "warp_m": 32,
             "warp_n": 64, "warp_k": 64, "stages": s, "smem_bytes": 0, "threads": 128, "runnable": True}
        for m in tile_ms for n in tile_ns for s in stages
    ]


@pytest.mark.parametrize(
    "rows,expected",
    # rows <= 8: 16-row tiles; <= 16: 32 rows, 3 stages (compiled here: exact match);
    # <= 48: 64 rows (5 stages not compiled here: most stages); beyond: 128 rows, 3 stages.
    [(0, "t_m16_n128_s4"), (0.1, "t_m16_n128_s4"), (1, "t_m16_n128_s4"), (8, "t_m16_n128_s4"),
     (9, "t_m32_n128_s3"), (16, "t_m32_n128_s3"), (17, "t_m64_n128_s4"), (48, "t_m64_n128_s4"),
     (49, "t_m128_n128_s3"), (100, "t_m128_n128_s3"), (5000, "t_m128_n128_s3")],
)
def test_default_tactic_tile_m(rows, expected):
    descs = _descs()
    assert default_tactic(descs, rows) == expected
    for seed in range(5):  # never simply the first: order does not matter
        shuffled = list(descs)
        random.Random(seed).shuffle(shuffled)
        assert default_tactic(shuffled, rows) == expected
        assert default_tactic(list(reversed(shuffled)), rows) == expected


def test_default_tactic_when_no_tile_is_large_or_small_enough():
    assert default_tactic(_descs(tile_ms=(64, 128)), 1) == "t_m64_n128_s4"
    assert default_tactic(_descs(tile_ms=(16, 32)), 1000) == "t_m32_n128_s4"
    assert default_tactic(_descs(tile_ms=(256,)), 1000) == "t_m256_n128_s4"


def test_default_tactic_never_picks_a_decode_tactic():
    """Weight-streaming decode tactics (tile_m of 1-8 rows, no K tile) are chosen by the tuner
    only: a table row for 1 row per expert must not fall through to them."""
    descs = _descs(tile_ms=(16, 32))
    decode = [dict(d, name=f"decode_m{m}", tile_m=m, tile_k=0, decode=True, stages=9)
              for m in (1, 2, 4, 8) for d in descs[:1]]
    for rows in (0.5, 1, 8, 100):
        assert default_tactic(descs + decode, rows) == default_tactic(descs, rows)
    with pytest.raises(RuntimeError, match="no runnable tactic"):
        default_tactic(decode, 1)


def test_default_tactic_never_picks_an_architecture_specific_tactic():
    """Tactics with ``required_cc`` (the Hopper sm90_* family of a CUTLASS_MOE_SM90_TACTICS=ON
    build, not yet verified on a GPU) are never a default, even when their tile is the table's;
    only the tuner (or tactics=) runs them."""
    descs = _descs(tile_ms=(32, 128))
    sm90 = [dict(d, name=f"sm90_{d['name']}", required_cc=90) for d in _descs(tile_ms=(16, 64))]
    for rows in (0, 1, 8, 30, 100):
        assert default_tactic(descs + sm90, rows) == default_tactic(descs, rows)
        assert not default_tactic(sm90 + descs, rows).startswith("sm90_")
    with pytest.raises(RuntimeError, match="no runnable tactic"):
        default_tactic(sm90, 1)


def test_default_tactic_prefers_more_stages_and_skips_unrunnable():
    descs = _descs(tile_ms=(64,), stages=(2, 3, 5), tile_ns=(128,))
    assert default_tactic(descs, 50) == "t_m64_n128_s5"
    for d in descs:
        if d["stages"] == 5:
            d["runnable"] = False
    assert default_tactic(descs, 50) == "t_m64_n128_s3"
    for d in descs:
        d["runnable"] = False
    with pytest.raises(RuntimeError, match="no runnable tactic"):
        default_tactic(descs, 50)
    with pytest.raises(RuntimeError, match="no runnable tactic"):
        default_tactic([], 50)


def test_supports_activation():
    swiglu, relu = ActivationType.Swiglu, ActivationType.Relu
    plain = {"name": "t", "tile_m": 16}
    assert tactics.supports_activation(plain, swiglu) and tactics.supports_activation(plain, relu)
    fused = {"name": "t_swiglu", "activations": frozenset({swiglu})}
    assert tactics.supports_activation(fused, swiglu)
    assert not tactics.supports_activation(fused, relu)


def test_descriptor_activations_are_converted_at_the_boundary(monkeypatch):
    """The binding lists a gated tactic's activations as C++ values; _ext.tactics hands them
    on as ActivationType members (the one form above the extension boundary)."""
    from _fake_ext import FakeMoeRunner, make_fake_extension

    gated = {"name": "g", "gemm": 1, "tile_m": 16, "tile_n": 64, "tile_k": 64, "stages": 4,
             "runnable": True, "gated": True, "split_k": 1,
             "activations": [_ext.activation_to_enum(ActivationType.Swiglu),
                             _ext.activation_to_enum(ActivationType.Geglu)]}
    monkeypatch.setattr(FakeMoeRunner, "tactics", lambda self, gemm: [gated])
    monkeypatch.setattr(_ext, "device_guard", lambda device: contextlib.nullcontext())
    with _ext._replaced_extension(make_fake_extension()):
        (desc,) = _ext.tactics(torch.bfloat16, torch.bfloat16, torch.bfloat16, 1,
                               torch.device("cpu"))
    # C++ Swiglu also runs FlashInfer's SwigluBias (the clamped SwiGLU's name there).
    assert desc["activations"] == frozenset({ActivationType.Swiglu, ActivationType.SwigluBias,
                                             ActivationType.Geglu})
    assert tactics.supports_activation(desc, ActivationType.Geglu)
    assert not tactics.supports_activation(desc, ActivationType.Silu)


# -------------------------------------------------------------------- int8 weight-only mode

I8 = 16  # int8 needs K = H and K = I to be multiples of 16


def _int8_args(activation=ActivationType.Swiglu, dtype=BF16, h=H, i=I8, **overrides):
    """Valid W8A16 arguments: int8 weights (any alignment; the op checks it) and scales."""
    args = _args(activation, dtype, h=h, i=i)
    q1, s1 = quantize_int8_per_channel(args["fc1_expert_weights"])
    q2, s2 = quantize_int8_per_channel(args["fc2_expert_weights"])
    args.update(fc1_expert_weights=q1, fc2_expert_weights=q2, quant_scales=[s1, s2],
                use_int8_woq_per_channel=True)
    args.update(overrides)
    return args


def _expect_int8(exc, match, **overrides):
    args = _int8_args(overrides.pop("activation_type", ActivationType.Swiglu))
    args.update(overrides)
    with pytest.raises(exc, match=match):
        cutlass_fused_moe(**args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [ActivationType.Swiglu, ActivationType.Relu])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_int8_arguments_pass_validation(monkeypatch, dtype, activation, out_dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _int8_args(activation, dtype)
    args["output_dtype"] = out_dtype or dtype
    args["quant_scales"] = tuple(args["quant_scales"])  # a tuple is fine too
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cutlass_fused_moe(**args)


def test_int8_flag_needs_int8_weights():
    args = _int8_args()
    bf16 = _args(i=I8)
    _expect_int8(ValueError, r"use_int8_woq_per_channel=True needs int8 fc1_expert_weights, got "
                 r"torch.bfloat16 \[4, 32, 16\]", fc1_expert_weights=bf16["fc1_expert_weights"])
    _expect_int8(ValueError, "needs int8 fc2_expert_weights, got torch.bfloat16",
                 fc2_expert_weights=bf16["fc2_expert_weights"])
    # uint8 is packed int4: never int8 weights, and the message says what uint8 needs.
    _expect_int8(ValueError, "fc1_expert_weights is uint8 .*packed int4 weights need "
                 "use_w4_group_scaling=True",
                 fc1_expert_weights=args["fc1_expert_weights"].to(torch.uint8))


def test_int8_weights_need_the_flag():
    args = _int8_args()
    for flag_args in ({"quant_scales": None}, {}):  # with or without the scales
        call = {**args, "use_int8_woq_per_channel": False, **flag_args}
        with pytest.raises(ValueError, match=r"fc1_expert_weights is int8 \[4, 32, 16\]: int8 "
                           "weight-only quantization needs use_int8_woq_per_channel=True"):
            cutlass_fused_moe(**call)
    bf16 = _args(i=I8)
    bf16["fc2_expert_weights"] = args["fc2_expert_weights"]
    with pytest.raises(ValueError, match="fc2_expert_weights is int8"):
        cutlass_fused_moe(**bf16)


@pytest.mark.parametrize("quant_scales,exc,match", [
    (None, ValueError,
     r"needs quant_scales=\[fc31_scale \[4, 32\], fc2_scale \[4, 16\]\].*got None"),
    ([], ValueError, r"got 0 tensor\(s\)"),
    ("three", ValueError, r"got 3 tensor\(s\)"),
    ("one", ValueError, r"got 1 tensor\(s\)"),
    ("tensor", TypeError, "got Tensor"),
    ("dict", TypeError, "got dict"),
    ("not_a_tensor", TypeError,
     r"quant_scales\[1\] \(fc2_scale\) must be a torch.Tensor, got float"),
])
def test_int8_quant_scales_must_be_two_tensors(quant_scales, exc, match):
    s1, s2 = _int8_args()["quant_scales"]
    named = {"three": [s1, s2, s2], "one": [s1], "tensor": s1, "dict": {"fc1": s1, "fc2": s2},
             "not_a_tensor": [s1, 1.0]}
    value = named[quant_scales] if isinstance(quant_scales, str) else quant_scales
    _expect_int8(exc, match, quant_scales=value)


def test_int8_scale_shapes():
    s1, s2 = _int8_args()["quant_scales"]
    _expect_int8(ValueError, r"quant_scales\[0\] \(fc31_scale\) must be \[4, 32\] \(one scale "
                 r"per output row of the int8 weights\), got \[4, 16\]",
                 quant_scales=[s1[:, :I8], s2])
    _expect_int8(ValueError, r"quant_scales\[0\] \(fc31_scale\) must be \[4, 32\].*got \[32\]",
                 quant_scales=[s1[0], s2])
    _expect_int8(ValueError, r"quant_scales\[1\] \(fc2_scale\) must be \[4, 16\].*got \[3, 16\]",
                 quant_scales=[s1, s2[:3]])
    _expect_int8(ValueError, r"quant_scales\[1\] \(fc2_scale\) must be \[4, 16\].*got \[4, 16, 1\]",
                 quant_scales=[s1, s2.unsqueeze(-1)])
    # Not gated: fc31_scale has I rows per expert.
    relu = _int8_args(ActivationType.Relu)
    relu["quant_scales"] = [s1, s2]
    with pytest.raises(ValueError, match=r"fc31_scale\) must be \[4, 16\].*got \[4, 32\]"):
        cutlass_fused_moe(**relu)


def test_int8_scale_dtypes():
    s1, s2 = _int8_args()["quant_scales"]
    _expect_int8(ValueError, r"quant_scales\[0\] \(fc31_scale\) must have the activation dtype "
                 "torch.bfloat16, got torch.float32; quantize with .*scale_dtype=",
                 quant_scales=[s1.float(), s2])
    _expect_int8(ValueError, r"quant_scales\[1\] \(fc2_scale\) must have the activation dtype "
                 "torch.bfloat16, got torch.float16", quant_scales=[s1, s2.half()])


@pytest.mark.parametrize("h,i,activation,match", [
    # K (the contiguous dimension) must be a multiple of 16: H for fc1, I for fc2.
    (24, 16, ActivationType.Swiglu,
     r"int8 fc1_expert_weights \[E, N, K\] = \[4, 32, 24\]: K=24 .*multiple of 16"),
    (16, 24, ActivationType.Swiglu,
     r"int8 fc2_expert_weights \[E, N, K\] = \[4, 16, 24\]: K=24 .*multiple of 16"),
    (16, 8, ActivationType.Swiglu,
     r"int8 fc2_expert_weights \[E, N, K\] = \[4, 16, 8\]: K=8 .*multiple of 16"),
    # N must be a multiple of 8: fc1's N is 2I (gated) or I, fc2's is H.
    (16, 12, ActivationType.Relu,
     r"int8 fc1_expert_weights \[E, N, K\] = \[4, 12, 16\]: N=12 must be a multiple of 8"),
    (20, 16, ActivationType.Swiglu,
     r"int8 fc2_expert_weights \[E, N, K\] = \[4, 20, 16\]: N=20 must be a multiple of 8"),
])
def test_int8_alignment(h, i, activation, match):
    with pytest.raises(ValueError, match=match):
        cutlass_fused_moe(**_int8_args(activation, h=h, i=i))


def test_int8_unsupported_combinations():
    _expect_int8(ValueError, "use_w4_group_scaling=True .* and use_int8_woq_per_channel=True "
                 ".* exclude each other", use_w4_group_scaling=True)
    args = _int8_args()
    args["input"] = args["input"].float()
    with pytest.raises(NotImplementedError, match="input dtype torch.float32"):
        cutlass_fused_moe(**args)
    _expect_int8(NotImplementedError, "output_dtype torch.float16",
                 output_dtype=torch.float16)


def test_int8_scales_on_another_device_are_named():
    s1, s2 = _int8_args()["quant_scales"]
    _expect_int8(ValueError, r"all tensors must be on input's device cpu; found quant_scales\[1\] "
                 r"\(fc2_scale\) on meta", quant_scales=[s1, s2.to("meta")])


def test_int8_weights_must_be_contiguous():
    q1 = _int8_args()["fc1_expert_weights"]
    strided = torch.zeros(E, 2 * I8, 2 * H, dtype=torch.int8)[:, :, :H]
    strided.copy_(q1)
    _expect_int8(ValueError, "fc1_expert_weights must be contiguous", fc1_expert_weights=strided)


def test_prepare_int8_call():
    args = _int8_args()
    s1, s2 = args["quant_scales"]
    strided = torch.empty(E, 2 * 2 * I8, dtype=BF16)[:, ::2]
    strided.copy_(s1)
    args["quant_scales"] = (strided, s2)
    del args["output_dtype"]
    call = _prepared(**args, output_dtype=BF16)
    assert call.fc1_expert_weights.dtype == torch.int8
    assert call.fc1_weight_scales.is_contiguous() and torch.equal(call.fc1_weight_scales, s1)
    assert call.fc2_weight_scales is s2
    plain = _prepared()
    assert plain.fc1_weight_scales is None and plain.fc2_weight_scales is None


# -------------------------------------------------------------------- int8 default tactics


def _generator_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "generate_kernels.py"
    if not path.is_file():
        pytest.skip("tools/generate_kernels.py is not in this checkout")
    name = "_cutlass_moe_generate_kernels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


#: Shared memory opt-in limit of sm_86/89: tactics above it are not runnable there.
_SM86_SMEM_OPTIN = 99 * 1024


def _int8_descs(fast: bool, act: str = "bf16", smem_limit: int | None = None):
    generator = _generator_module()
    descs = []
    for t in generator.tactics(fast=fast):
        if t.weight != "int8" or t.dtype != act or t.split_k > 1:  # GEMM1's int8 tactics
            continue
        warps = (t.tile_m // t.warp_m) * (t.tile_n // t.warp_n)
        # A 16-bit A tile and an int8 B tile per stage: the sizes the generator's comment lists
        # (16x128 s3: 30736 bytes ... 256x128 s3: 122896).
        smem = t.stages * (t.tile_m * t.tile_k * 2 + t.tile_n * t.tile_k) + 16
        descs.append({"name": t.name, "gemm": 1, "tile_m": t.tile_m, "tile_n": t.tile_n,
                      "tile_k": t.tile_k, "warp_m": t.warp_m, "warp_n": t.warp_n,
                      "warp_k": t.warp_k, "stages": t.stages, "smem_bytes": smem,
                      "threads": 32 * warps, "act_dtype": act, "weight_dtype": "int8",
                      "decode": t.decode, "gated": t.gated,
                      "runnable": smem_limit is None or smem <= smem_limit})
    return descs


@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("smem_limit", [None, _SM86_SMEM_OPTIN])
@pytest.mark.parametrize("rows,expected", [
    # The int8 table's rows all have an exact counterpart in the full list: decode (<= 8 rows
    # per expert) streams weights with 16-row tiles and 4 stages; 32-row tiles up to 64 rows;
    # then 128x256 with 3 stages (96 KB: fits sm_86/89).
    (0, "m16n128k64_w16x32x64_s4"), (1, "m16n128k64_w16x32x64_s4"),
    (8, "m16n128k64_w16x32x64_s4"), (9, "m32n128k64_w32x32x64_s3"),
    (16, "m32n128k64_w32x32x64_s3"), (48, "m32n128k64_w32x32x64_s3"),
    (64, "m32n128k64_w32x32x64_s3"), (65, "m128n256k64_w64x64x64_s3"),
    (8192, "m128n256k64_w64x64x64_s3"),
])
def test_default_tactic_on_int8_tactics(act, smem_limit, rows, expected):
    descs = _int8_descs(fast=False, act=act, smem_limit=smem_limit)
    assert len([d for d in descs if not d["decode"]]) == 17  # and the decode ones, never default
    descs = [d for d in descs if not d["gated"]]  # GEMM1 of an ungated activation
    assert default_tactic(descs, rows) == f"sm80_{act}_int8_{expected}"


@pytest.mark.parametrize("rows,expected", [
    (1, "m16n128k64_w16x32x64_s4"), (8, "m16n128k64_w16x32x64_s4"),
    (9, "m128n128k64_w64x32x64_s3"), (1000, "m128n128k64_w64x32x64_s3"),
])
def test_default_tactic_on_the_fast_int8_build(rows, expected):
    assert default_tactic(_int8_descs(fast=True), rows) == f"sm80_bf16_int8_{expected}"


def _int4_descs(fast: bool, act: str = "bf16", weight: str = "int4"):
    """The generator's tactics of one group-scaled weight format (int4 by default) and
    activation dtype as GEMM1 descriptors (decode ones too, gated ones included)."""
    generator = _generator_module()
    return [
        {"name": t.name, "gemm": 1, "tile_m": t.tile_m, "tile_n": t.tile_n, "tile_k": t.tile_k,
         "warp_m": t.warp_m, "warp_n": t.warp_n, "warp_k": t.warp_k, "stages": t.stages,
         "smem_bytes": 0, "threads": 128, "act_dtype": act, "weight_dtype": weight,
         "decode": t.decode, "gated": t.gated, "split_k": t.split_k, "runnable": True}
        for t in generator.tactics(fast=fast) if t.weight == weight and t.dtype == act
    ]


_INT4_M1N8 = "decode_{act}_int4_m1n8_c2x4_u4"
_INT4_SMALL = "{act}_int4_m16n128k64_w16x32x64_s4"
_INT4_MID, _INT4_PREFILL = "{act}_int4_m32n128k64_w32x32x64_s4", "{act}_int4_m128n128k64_w64x64x64_s3"


@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("rows,tactic", [
    # DEFAULT_DECODE's int4 row names a tactic of the full list: up to half a row per expert the
    # FMA decode m1n8 (GEMM1, gated or not, and GEMM2); then the int4 table: the 16x128 tile up
    # to 8, the 32-row tile up to 64, then the 128x128 prefill tile. The tensor-core decode
    # tactics (sm80_decode_mma*) are never a default.
    (0, _INT4_M1N8), (0.25, _INT4_M1N8), (0.5, _INT4_M1N8),
    (0.6, _INT4_SMALL), (1, _INT4_SMALL), (4, _INT4_SMALL), (8, _INT4_SMALL),
    (9, _INT4_MID), (16, _INT4_MID), (64, _INT4_MID),
    (65, _INT4_PREFILL), (8192, _INT4_PREFILL),
])
def test_default_tactic_on_int4_tactics(act, rows, tactic):
    descs = _int4_descs(fast=False, act=act)
    if not descs:
        pytest.skip("tools/generate_kernels.py has no int4 tactics in this checkout")
    assert any(d["decode"] for d in descs)
    assert any(d["name"].startswith("sm80_decode_mma_") for d in descs)
    assert not any(d["split_k"] > 1 or (d["gated"] and not d["decode"]) for d in descs)
    expected = "sm80_" + tactic.format(act=act)
    assert default_tactic(descs, rows) == expected
    # GEMM2 and an ungated activation's GEMM1 (no gated decode tactic) take the same one.
    assert default_tactic([d for d in descs if not d["gated"]], rows) == expected
    # Decode tactics off (CUTLASS_MOE_DECODE_TACTICS=0): the int4 table alone.
    table = "m16n128k64_w16x32x64_s4" if rows <= 8 else (
        "m32n128k64_w32x32x64_s4" if rows <= 64 else "m128n128k64_w64x64x64_s3")
    assert default_tactic([d for d in descs if not d["decode"]], rows) == (
        f"sm80_{act}_int4_{table}")
    # Without the m1n8 decode tactic (the fast build's case) the table decides too.
    without = [d for d in descs if d["name"] != f"sm80_decode_{act}_int4_m1n8_c2x4_u4"]
    assert default_tactic(without, rows) == f"sm80_{act}_int4_{table}"


_NARROW = "m16n64k64_w16x32x64_s4"


@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("weight", ["fp8", "mxfp4"])
@pytest.mark.parametrize("rows,tile", [
    (0, None), (0.25, None), (0.26, None), (0.5, None), (0.6, _NARROW), (1, _NARROW),
    (8, _NARROW), (9, "m32n128k64_w32x32x64_s4"),
    (64, "m32n128k64_w32x32x64_s4"), (65, "m128n128k64_w64x64x64_s3"),
])
def test_default_tactic_on_fp8_and_mxfp4_tactics(act, weight, rows, tile):
    """DEFAULT_DECODE's fp8 / mxfp4 rows name tactics of the full list: fp8 up to a quarter row
    per expert the gated m1n4 for a gated GEMM1 and m1n8 otherwise, up to half a row m2n8;
    mxfp4 up to half a row m1n8 (a gated GEMM1 too). Then the format's table: 16x64 up to 8
    rows, 32x128 up to 64, then 128x128."""
    descs = _int4_descs(fast=False, act=act, weight=weight)
    if not descs:
        pytest.skip(f"tools/generate_kernels.py has no {weight} tactics in this checkout")
    plain = [d for d in descs if not d["gated"]]
    if tile is None:
        if weight == "mxfp4":
            gated_name = plain_name = f"sm80_decode_{act}_mxfp4_m1n8_c2x4_u4"
        elif rows <= 0.25:
            gated_name = f"sm80_decode_gated_{act}_fp8_m1n4_c1x4_u4"
            plain_name = f"sm80_decode_{act}_fp8_m1n8_c2x4_u4"
        else:
            gated_name = plain_name = f"sm80_decode_{act}_fp8_m2n8_c2x4_u4"
        assert default_tactic(descs, rows) == gated_name
        assert default_tactic(plain, rows) == plain_name
        # Decode tactics off: the table's 16x64 tile.
        assert default_tactic([d for d in descs if not d["decode"]], rows) == (
            f"sm80_{act}_{weight}_{_NARROW}")
    else:
        assert default_tactic(descs, rows) == default_tactic(plain, rows) == (
            f"sm80_{act}_{weight}_{tile}")


@pytest.mark.parametrize("weight", ["int4", "fp8", "mxfp4"])
@pytest.mark.parametrize("rows,expected", [
    (0.25, "m16n128k64_w16x32x64_s4"), (0.5, "m16n128k64_w16x32x64_s4"),
    (1, "m16n128k64_w16x32x64_s4"), (8, "m16n128k64_w16x32x64_s4"),
    (9, "m128n128k64_w64x64x64_s3"), (1000, "m128n128k64_w64x64x64_s3"),
])
def test_default_tactic_on_the_fast_group_scaled_build(weight, rows, expected):
    """The fast build's decode tactics (m2n8 and gated m2n4 per format, int4's first tensor-core
    decode ones) include one of DEFAULT_DECODE's names only for fp8: m2n8, its default from a
    quarter to half a row per expert. Otherwise the table decides, on the fast build's two
    tiles."""
    descs = _int4_descs(fast=True, weight=weight)
    if not descs:
        pytest.skip(f"tools/generate_kernels.py has no {weight} tactics in this checkout")
    assert any(d["decode"] for d in descs)
    if weight == "fp8" and 0.25 < rows <= 0.5:
        expected_name = "sm80_decode_bf16_fp8_m2n8_c2x4_u4"
    else:
        expected_name = f"sm80_bf16_{weight}_{expected}"
    assert default_tactic(descs, rows) == expected_name


def _gemm1_descs_16bit(fast):
    """GEMM1 descriptors of the generator's bf16 build: plain and fused gated tactics."""
    generator = _generator_module()
    return [
        {"name": t.name, "gemm": 1, "tile_m": t.tile_m, "tile_n": t.tile_n, "tile_k": t.tile_k,
         "warp_m": t.warp_m, "warp_n": t.warp_n, "warp_k": t.warp_k, "stages": t.stages,
         "smem_bytes": 0, "threads": t.threads, "act_dtype": "bf16", "weight_dtype": "bf16",
         "gated": t.gated, "decode": t.decode, "runnable": True}
        for t in generator.tactics(fast=fast)
        if t.weight is None and t.dtype == "bf16" and t.gemms & 1
    ]


@pytest.mark.parametrize("rows,expected", [
    # A gated activation's GEMM1: fused up to 16 rows per expert, then the plain table.
    (0, "sm80_gated_bf16_bf16_m16n64k64_w16x32x64_s5"),
    (8, "sm80_gated_bf16_bf16_m16n64k64_w16x32x64_s5"),
    (9, "sm80_gated_bf16_bf16_m32n64k64_w32x32x64_s4"),
    (16, "sm80_gated_bf16_bf16_m32n64k64_w32x32x64_s4"),
    (17, "sm80_bf16_bf16_m64n128k64_w32x64x64_s5"),
    (48, "sm80_bf16_bf16_m64n128k64_w32x64x64_s5"),
    (49, "sm80_bf16_bf16_m128n128k64_w64x64x64_s3"),
    (8192, "sm80_bf16_bf16_m128n128k64_w64x64x64_s3"),
])
def test_default_gemm1_of_a_gated_activation(rows, expected):
    descs = _gemm1_descs_16bit(fast=False)
    assert any(d["gated"] for d in descs) and not all(d["gated"] for d in descs)
    assert default_tactic(descs, rows) == expected
    # Only gated tactics (e.g. the plain ones filtered out): the last gated row serves all rows.
    gated = [d for d in descs if d["gated"]]
    assert default_tactic(gated, rows).startswith("sm80_gated_")


@pytest.mark.parametrize("rows,expected", [
    (1, "sm80_gated_bf16_bf16_m16n64k64_w16x32x64_s4"),
    (16, "sm80_gated_bf16_bf16_m16n64k64_w16x32x64_s4"),
    (17, "sm80_bf16_bf16_m128n128k64_w64x64x64_s3"),
])
def test_default_gemm1_of_a_gated_activation_fast_build(rows, expected):
    assert default_tactic(_gemm1_descs_16bit(fast=True), rows) == expected


@pytest.mark.parametrize("weights", ["16bit", "int8", "int4", "int4-gemm2", "fp8", "fp8-gemm2",
                                     "mxfp4", "gated"])
def test_default_choice_cached_per_bound_matches_the_rows(weights):
    """Default choices are cached per table bound: the bound must pick what the rows pick."""
    from cutlass_moe.tactics import tile_m_target as _tile_m_target

    descs = {"int8": lambda: _int8_descs(fast=False), "16bit": _descs,
             "int4": lambda: _int4_descs(fast=False),
             "int4-gemm2": lambda: [d for d in _int4_descs(fast=False) if not d["gated"]],
             "fp8": lambda: _int4_descs(fast=False, weight="fp8"),
             "fp8-gemm2": lambda: [d for d in _int4_descs(fast=False, weight="fp8")
                                   if not d["gated"]],
             "mxfp4": lambda: _int4_descs(fast=False, weight="mxfp4"),
             "gated": lambda: _gemm1_descs_16bit(fast=False)}[weights]()
    if not descs:
        pytest.skip(f"tools/generate_kernels.py has no {weights} tactics in this checkout")
    for rows in [0, 0.1, 0.25, 0.26, 0.5, 0.51, 0.6, 1, 3, 4, 4.5, 7.9, 8, 8.1, 12, 16, 16.5,
                 30, 48, 49, 60, 64, 64.5, 100, 5000]:
        assert default_tactic(descs, _tile_m_target(rows)) == default_tactic(descs, rows), rows


def test_tile_m_target_has_the_decode_bounds():
    assert [tactics.tile_m_target(rows) for rows in (0, 0.1, 0.25, 0.26, 0.5, 0.6, 1, 4, 4.5, 8,
                                                     9, 16, 17, 48, 64, 65)] == [
        0.25, 0.25, 0.25, 0.5, 0.5, 8.0, 8.0, 8.0, 8.0, 8.0, 16.0, 16.0, 48.0, 48.0, 64.0,
        math.inf]
    bounds = {row[0] for rows in tactics.DEFAULT_DECODE.values() for row in rows}
    assert all(tactics.tile_m_target(bound) == bound for bound in bounds)


def _candidates_under(monkeypatch, weight):
    """The context that installs a fake extension whose runners list one tensor-core tactic and
    one decode tactic of ``weight`` (descriptors' weight_dtype)."""
    from _fake_ext import FakeMoeRunner, make_fake_extension

    plain = {"name": "plain", "gemm": 2, "tile_m": 16, "tile_n": 128, "tile_k": 64, "stages": 4,
             "runnable": True, "split_k": 1, "weight_dtype": weight}
    decode = dict(plain, name="decode", tile_m=2, tile_k=0, decode=True)
    monkeypatch.setattr(FakeMoeRunner, "tactics", lambda self, gemm: [plain, decode])
    monkeypatch.setattr(_ext, "device_guard", lambda device: contextlib.nullcontext())
    return _ext._replaced_extension(make_fake_extension())


@pytest.mark.parametrize("weight,auto", [("bf16", False), ("fp16", False), ("int8", False),
                                         ("int4", True), ("fp8", True), ("mxfp4", True)])
def test_decode_tactic_candidates_per_setting(monkeypatch, weight, auto):
    """CUTLASS_MOE_DECODE_TACTICS unset or empty: the decode tactics of the group-scaled
    formats (int4, fp8, mxfp4) are candidates, those of 16-bit and int8 weights are not; 1 (true,
    yes, on): every one; 0 (false, no, off): none. include_decode overrides it, and a forced name
    is accepted in every case."""
    dtypes, cpu, swiglu = (BF16,) * 3, torch.device("cpu"), ActivationType.Swiglu
    both = ["plain", "decode"]
    with _candidates_under(monkeypatch, weight):
        for value, expected in [(None, both if auto else ["plain"]),
                                ("", both if auto else ["plain"]),
                                ("  ", both if auto else ["plain"]),
                                ("Auto", both if auto else ["plain"]),
                                ("1", both), ("true", both), ("YES", both), (" on ", both),
                                ("0", ["plain"]), ("false", ["plain"]), ("No", ["plain"]),
                                ("off", ["plain"])]:
            if value is None:
                monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
            else:
                monkeypatch.setenv(tactics.DECODE_ENV, value)
            assert tactics.candidate_names(dtypes, 2, swiglu, cpu, 8) == expected, value
            assert tactics.decode_enabled() == (value is not None and value.strip() in (
                "1", "true", "YES", "on")), value
            assert tactics.candidate_names(dtypes, 2, swiglu, cpu, 8, include_decode=True) == both
            assert tactics.candidate_names(dtypes, 2, swiglu, cpu, 8,
                                           include_decode=False) == ["plain"]
            assert tactics.resolve(dtypes, 2, swiglu, cpu, "decode", 8) == "decode"
            # "decode" is none of DEFAULT_DECODE's names: never a default.
            assert tactics.default_for(dtypes, 2, swiglu, cpu, 0.1) == "plain"


@pytest.mark.parametrize("value", ["2", "maybe", "enabled", "1,0"])
def test_bad_decode_setting_raises(monkeypatch, value):
    monkeypatch.setenv(tactics.DECODE_ENV, value)
    match = (rf"CUTLASS_MOE_DECODE_TACTICS={value!r} is not a valid setting: leave it unset, "
             r"empty or auto .* 1/true/yes/on .* 0/false/no/off")
    with pytest.raises(ValueError, match=match):
        tactics.decode_mode()
    with pytest.raises(ValueError, match=match):
        tactics.decode_enabled()
    dtypes, cpu = (BF16,) * 3, torch.device("cpu")
    with _candidates_under(monkeypatch, "int4"), pytest.raises(ValueError, match=match):
        tactics.candidate_names(dtypes, 2, ActivationType.Swiglu, cpu, 8)
