"""FlashInfer 0.7 parity of the activations, on the CPU: enum values pinned to
FlashInfer's, the reference's formulas against explicit ones, validation of the per-activation
arguments, and the call path through the fake extension (tests/_fake_ext.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

from _activation_formulas import (
    FLASHINFER_ACTIVATION_VALUES,
    FLASHINFER_GATED,
    IMPLEMENTED,
    NEW,
    explicit_activation,
    naive_layer,
)
from _helpers import random_routing, rel_l2
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, reference_moe, validation
from cutlass_moe.activation import (
    ACTIVATION_PARAMETERS,
    SUPPORTED_ACTIVATIONS,
    is_gated,
    normalize_activation,
)
from cutlass_moe.reference import apply_activation

F64 = torch.float64
T, E, K, H, I = 7, 4, 2, 16, 8

# ------------------------------------------------------------------ enum values


@pytest.mark.parametrize("name,value", list(FLASHINFER_ACTIVATION_VALUES.items()))
def test_each_name_has_flashinfers_integer(name, value):
    assert int(ActivationType[name]) == value
    assert ActivationType(value).name == name
    assert normalize_activation(value) is ActivationType[name]


def test_enum_is_exactly_flashinfers():
    assert {a.name: int(a) for a in ActivationType} == FLASHINFER_ACTIVATION_VALUES
    assert [a.name for a in ActivationType] == list(FLASHINFER_ACTIVATION_VALUES)


def test_flashinfer_integer_for_situ_means_situ():
    """10 used to be InvalidType here; it is FlashInfer's Situ."""
    assert normalize_activation(10) is ActivationType.Situ
    assert normalize_activation(11) is ActivationType.InvalidType
    assert normalize_activation(12) is ActivationType.ClampedRelu2


def test_gated_set_is_flashinfers():
    assert {a.name for a in ActivationType if is_gated(a)} == FLASHINFER_GATED


def test_every_activation_but_invalid_type_is_implemented():
    assert {a.name for a in SUPPORTED_ACTIVATIONS} == set(IMPLEMENTED)
    assert set(IMPLEMENTED) == {a.name for a in ActivationType} - {"InvalidType"}


def test_cpp_values_cover_every_implemented_activation():
    values = {a: _ext.activation_to_enum(a) for a in SUPPORTED_ACTIVATIONS}
    assert sorted(set(values.values())) == list(range(11))  # problem.h: kActivationCount = 11
    for act, value in values.items():
        back = _ext.activation_from_enum(value)
        assert back == act or (act, back) == (ActivationType.SwigluBias, ActivationType.Swiglu)
    gated_cpp = {v for a, v in values.items() if is_gated(a)}
    assert _ext.activations_of_enums(gated_cpp) == {a for a in SUPPORTED_ACTIVATIONS
                                                    if is_gated(a)}


# ------------------------------------------------------------------ formulas


def _h(rows, cols, seed, scale=4.0):
    """Random GEMM1 outputs, large enough that every clamp and saturation is reached."""
    return torch.randn(rows, cols, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


_PARAMS = {
    "SwigluStep": {"limit": 1.5},
    "Situ": {"situ_beta": 2.5, "situ_linear_beta": 3.0},
    "ClampedRelu2": {"clamped_relu2_limit": 2.0},
}


@pytest.mark.parametrize("name", [n for n in IMPLEMENTED if n != "ClampedRelu2"])
def test_apply_activation_with_defaults_matches_explicit_formula(name):
    h = _h(33, 2 * 24 if name in FLASHINFER_GATED else 24, seed=len(name))
    out = apply_activation(h, ActivationType[name])
    torch.testing.assert_close(out, explicit_activation(name, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_PARAMS))
def test_apply_activation_with_parameters_matches_explicit_formula(name):
    h = _h(33, 2 * 24 if name in FLASHINFER_GATED else 24, seed=3)
    p = _PARAMS[name]
    kwargs = {"limit": p.get("limit"), "clamped_relu2_limit": p.get("clamped_relu2_limit")}
    if "situ_beta" in p:
        kwargs.update(situ_beta=p["situ_beta"], situ_linear_beta=p["situ_linear_beta"])
    out = apply_activation(h, ActivationType[name], **kwargs)
    torch.testing.assert_close(out, explicit_activation(name, h, p), rtol=1e-12, atol=1e-12)


def test_formulas_at_chosen_points():
    """Values worked out by hand from FlashInfer's definitions."""
    up = torch.tensor([[100.0, -100.0, 0.5, 3.0]], dtype=F64)
    gate = torch.tensor([[20.0, 20.0, -1.0, 0.0]], dtype=F64)
    h = torch.cat([up, gate], dim=1)
    # SwigluStep, limit 7: min(silu(gate), 7) * clamp(up, -7, 7).
    step = apply_activation(h, ActivationType.SwigluStep)[0]
    silu_m1 = -1.0 / (1.0 + torch.e)
    torch.testing.assert_close(step, torch.tensor([49.0, -49.0, 0.5 * silu_m1, 0.0], dtype=F64),
                               rtol=1e-6, atol=1e-6)
    # Situ at its defaults (4, 25): 0 at gate 0; odd in up.
    situ = apply_activation(h, ActivationType.Situ)[0]
    assert situ[3] == 0.0
    expected0 = 4 * torch.tanh(torch.tensor(5.0, dtype=F64)) * torch.sigmoid(
        torch.tensor(20.0, dtype=F64)) * 25 * torch.tanh(torch.tensor(4.0, dtype=F64))
    torch.testing.assert_close(situ[0], expected0)
    torch.testing.assert_close(situ[1], -expected0)
    # GegluTanh: the tanh GELU, which differs from the erf one.
    x = torch.tensor([[1.0, 1.0]], dtype=F64)  # up = 1, gate = 1
    tanh_gelu = 0.5 * (1 + torch.tanh(torch.tensor((2 / torch.pi) ** 0.5 * 1.044715, dtype=F64)))
    torch.testing.assert_close(apply_activation(x, ActivationType.GegluTanh)[0, 0], tanh_gelu)
    assert abs(float(apply_activation(x, ActivationType.Geglu)[0, 0]) - float(tanh_gelu)) > 1e-5
    # Relu2 and ClampedRelu2 (limit 2): saturates at limit^2, zero for negatives.
    v = torch.tensor([[-3.0, 0.5, 1000.0]], dtype=F64)
    torch.testing.assert_close(apply_activation(v, ActivationType.Relu2)[0],
                               torch.tensor([0.0, 0.25, 1e6], dtype=F64))
    clamped = apply_activation(v, ActivationType.ClampedRelu2, clamped_relu2_limit=2.0)[0]
    assert clamped[0] == 0.0 and abs(float(clamped[2]) - 4.0) < 1e-12
    torch.testing.assert_close(clamped[1], (2 * torch.tanh(torch.tensor(0.25, dtype=F64))) ** 2)


def _layer(name, seed, num_experts=E, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen, dtype=F64) * 2
    ids, scales = random_routing(T, num_experts, K, generator=gen)
    n1 = 2 * I if name in FLASHINFER_GATED else I
    fc1 = torch.randn(num_experts, n1, H, generator=gen, dtype=F64) * H**-0.5 * 2
    fc2 = torch.randn(num_experts, H, I, generator=gen, dtype=F64) * I**-0.5
    return x.to(dtype), ids, scales, fc1.to(dtype), fc2.to(dtype)


def _params(name, num_experts=E, seed=0, device="cpu"):
    """Per-expert parameters that differ by expert and from the defaults (so a kernel falling
    back to a default, or reading another expert's value, fails)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(low, span):
        return (torch.rand(num_experts, generator=gen, device=device) * span + low).float()

    if name == "SwigluStep":
        return {"swiglu_limit": draw(0.5, 1.0)}
    if name == "Situ":
        return {"situ_beta": draw(0.5, 1.0), "situ_linear_beta": draw(1.0, 2.0)}
    if name == "ClampedRelu2":
        return {"clamped_relu2_limit": torch.tensor([0.75], device=device)}
    if name in ("Swiglu", "SwigluBias"):
        return {"swiglu_alpha": draw(1.0, 1.0), "swiglu_beta": draw(0.0, 1.0),
                "swiglu_limit": draw(0.5, 1.0)}
    return {}


@pytest.mark.parametrize("with_params", [False, True], ids=["defaults", "per-expert"])
@pytest.mark.parametrize("name", IMPLEMENTED)
def test_reference_moe_matches_explicit_loop(name, with_params):
    if name == "ClampedRelu2" and not with_params:
        pytest.skip("ClampedRelu2 has no default limit")
    x, ids, scales, fc1, fc2 = _layer(name, seed=IMPLEMENTED.index(name))
    gen = torch.Generator().manual_seed(99)
    b1 = torch.randn(fc1.shape[:2], generator=gen, dtype=F64) * 0.5
    b2 = torch.randn(fc2.shape[:2], generator=gen, dtype=F64) * 0.5
    params = _params(name) if with_params else {}
    out = reference_moe(x, ids, scales, fc1, fc2, ActivationType[name], fc1_expert_biases=b1,
                        fc2_expert_biases=b2, compute_dtype=F64, **params)
    ref = naive_layer(x, ids, scales, fc1, fc2, name, b1, b2, **params)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["SwigluStep", "Situ", "ClampedRelu2", "Swiglu"])
def test_parameters_change_the_result(name):
    """The per-expert (or model-wide) values are used: they move the output away from the
    defaults' (ClampedRelu2: from Relu2)."""
    x, ids, scales, fc1, fc2 = _layer(name, seed=5)
    x = x * 4  # so that every clamp bites
    params = _params(name)
    with_params = reference_moe(x, ids, scales, fc1, fc2, ActivationType[name],
                                compute_dtype=F64, **params)
    other = ActivationType.Relu2 if name == "ClampedRelu2" else ActivationType[name]
    default = reference_moe(x, ids, scales, fc1, fc2, other, compute_dtype=F64)
    assert rel_l2(with_params, default) > 0.05


def test_swiglu_bias_is_the_clamped_swiglu():
    x, ids, scales, fc1, fc2 = _layer("Swiglu", seed=6)
    params = _params("Swiglu")
    for kwargs in ({}, params, {"swiglu_limit": params["swiglu_limit"]}):
        torch.testing.assert_close(
            reference_moe(x, ids, scales, fc1, fc2, ActivationType.SwigluBias, compute_dtype=F64,
                          **kwargs),
            reference_moe(x, ids, scales, fc1, fc2, ActivationType.Swiglu, compute_dtype=F64,
                          **kwargs))


def test_reference_refuses_parameters_of_other_activations():
    x, ids, scales, fc1, fc2 = _layer("Swiglu", seed=7)
    with pytest.raises(ValueError, match="situ_beta is only valid with ActivationType.Situ"):
        reference_moe(x, ids, scales, fc1, fc2, ActivationType.Swiglu, situ_beta=torch.ones(E))
    with pytest.raises(ValueError, match="swiglu_alpha is only valid with.*SwigluStep"):
        reference_moe(x, ids, scales, fc1, fc2, ActivationType.SwigluStep,
                      swiglu_alpha=torch.ones(E))
    x, ids, scales, fc1, fc2 = _layer("Relu2", seed=7)
    with pytest.raises(ValueError, match="needs clamped_relu2_limit"):
        reference_moe(x, ids, scales, fc1, fc2, ActivationType.ClampedRelu2)
    with pytest.raises(ValueError, match=r"clamped_relu2_limit must be \[1\]"):
        reference_moe(x, ids, scales, fc1, fc2, ActivationType.ClampedRelu2,
                      clamped_relu2_limit=torch.ones(2))


# ------------------------------------------------------------------ signature and validation

#: FlashInfer 0.7.2's cutlass_fused_moe: positional parameters, in order, then keyword-only.
FLASHINFER_POSITIONAL = [
    "input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
    "fc2_expert_weights", "output_dtype", "quant_scales", "fc1_expert_biases",
    "fc2_expert_biases", "input_sf", "swiglu_alpha", "swiglu_beta", "swiglu_limit", "tp_size",
    "tp_rank", "ep_size", "ep_rank", "cluster_size", "cluster_rank", "output", "enable_alltoall",
    "use_deepseek_fp8_block_scale", "use_w4_group_scaling", "use_mxfp8_act_scaling",
    "min_latency_mode", "use_packed_weights", "use_wfp4afp8_humming", "tune_max_num_tokens",
    "enable_pdl", "activation_type", "swizzled_input_sf", "use_fused_finalize", "profile_ids",
    "workspace_buffer",
]
FLASHINFER_KEYWORD_ONLY = {"clamped_relu2_limit": None, "situ_beta": None,
                           "situ_linear_beta": None, "backend": "cutlass"}


def test_signature_has_every_flashinfer_argument():
    params = inspect.signature(cutlass_fused_moe).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == FLASHINFER_POSITIONAL
    for name, default in FLASHINFER_KEYWORD_ONLY.items():
        assert params[name].kind == params[name].KEYWORD_ONLY
        assert params[name].default == default


def _args(name="Swiglu", **overrides):
    """A valid small call on the CPU (cutlass_fused_moe then stops at its CUDA check)."""
    gen = torch.Generator().manual_seed(0)
    n1 = 2 * I if name in FLASHINFER_GATED else I
    args = {
        "input": torch.randn(T, H, generator=gen).to(torch.bfloat16),
        "token_selected_experts": torch.randint(0, E, (T, K), generator=gen, dtype=torch.int32),
        "token_final_scales": torch.rand(T, K, generator=gen),
        "fc1_expert_weights": torch.randn(E, n1, H, generator=gen).to(torch.bfloat16),
        "fc2_expert_weights": torch.randn(E, H, I, generator=gen).to(torch.bfloat16),
        "output_dtype": torch.bfloat16,
        "activation_type": ActivationType[name],
    }
    args.update(overrides)
    return args


def _valid(name, **overrides):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cutlass_fused_moe(**_args(name, **overrides))


def _invalid(exc, match, name, **overrides):
    with pytest.raises(exc, match=match):
        cutlass_fused_moe(**_args(name, **overrides))


@pytest.fixture
def no_cuda(monkeypatch):
    """Makes the CUDA check fail the same way on a machine with a GPU too."""
    def refuse(device):
        raise RuntimeError("no CUDA device is available (test)")

    monkeypatch.setattr(validation, "require_cuda", refuse)


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_each_activation_passes_validation(no_cuda, name):
    _valid(name, **_params(name))
    if name != "ClampedRelu2":
        _valid(name)


@pytest.mark.parametrize("argument", sorted(ACTIVATION_PARAMETERS))
@pytest.mark.parametrize("name", IMPLEMENTED)
def test_parameters_only_with_their_activation(no_cuda, name, argument):
    shape = (1,) if argument == "clamped_relu2_limit" else (E,)
    value = torch.full(shape, 1.5)
    extra = {"clamped_relu2_limit": torch.ones(1)} if (
        name == "ClampedRelu2" and argument != "clamped_relu2_limit") else {}
    if ActivationType[name] in ACTIVATION_PARAMETERS[argument]:
        _valid(name, **{argument: value}, **extra)
    else:
        _invalid(ValueError, f"{argument} is only valid with ActivationType.*got "
                 f"activation_type {name}", name, **{argument: value}, **extra)


def test_clamped_relu2_needs_its_limit(no_cuda):
    _invalid(ValueError, "ClampedRelu2 needs clamped_relu2_limit", "ClampedRelu2")


@pytest.mark.parametrize("argument,name,value,match", [
    ("clamped_relu2_limit", "ClampedRelu2", torch.ones(2),
     r"must be a model-wide one-element float32 tensor of shape \[1\], got \[2\]"),
    ("clamped_relu2_limit", "ClampedRelu2", torch.ones(()), r"got \[\] of"),
    ("clamped_relu2_limit", "ClampedRelu2", torch.ones(1, dtype=F64), "got .* torch.float64"),
    ("clamped_relu2_limit", "ClampedRelu2", torch.ones(1, dtype=torch.bfloat16),
     r"float32 tensor of shape \[1\], got \[1\] of torch.bfloat16"),
    ("situ_beta", "Situ", torch.ones(E + 1),
     r"situ_beta must be a per-expert \(E_local\) float32 tensor of shape \[4\], got \[5\]"),
    ("situ_linear_beta", "Situ", torch.ones(E, 1), r"situ_linear_beta must be .*got \[4, 1\]"),
    ("situ_beta", "Situ", torch.ones(E, dtype=torch.float16), "torch.float16"),
    ("swiglu_limit", "SwigluStep", torch.ones(E + 1), r"swiglu_limit must be \[E_local=4\]"),
])
def test_shapes_and_dtypes_are_flashinfers(no_cuda, argument, name, value, match):
    _invalid(ValueError, f"{argument}.*{match}" if not match.startswith(argument) else match,
             name, **{argument: value})


def test_parameters_on_another_device_are_named(no_cuda):
    _invalid(ValueError, "situ_beta on meta", "Situ", situ_beta=torch.ones(E, device="meta"))
    _invalid(ValueError, "clamped_relu2_limit on meta", "ClampedRelu2",
             clamped_relu2_limit=torch.ones(1, device="meta"))


def test_backend(no_cuda):
    _valid("Swiglu", backend="cutlass")
    _invalid(NotImplementedError, "backend='cake'.*not supported", "Situ", backend="cake")
    _invalid(ValueError, "unsupported fused MoE backend 'trtllm'", "Swiglu", backend="trtllm")


def test_new_arguments_are_keyword_only():
    args = _args("Situ")
    positional = [args.pop(n) for n in FLASHINFER_POSITIONAL[:6]] + [None] * 28
    del args["activation_type"]
    with pytest.raises(TypeError, match="positional argument"):
        cutlass_fused_moe(*positional, torch.ones(1), **args)


def test_invalid_type_is_not_implemented(no_cuda):
    _invalid(NotImplementedError, "InvalidType is not supported", "Swiglu",
             activation_type=ActivationType.InvalidType)


def test_activation_from_a_flashinfer_enum_member(no_cuda):
    """FlashInfer's own members are matched by name (here a stand-in enum of its values)."""
    import enum

    flashinfer_enum = enum.IntEnum("ActivationType", FLASHINFER_ACTIVATION_VALUES)
    for name in NEW:
        _valid(name, activation_type=flashinfer_enum[name], **_params(name))


# ------------------------------------------------------------------ through the fake extension


def _calls(dtype):
    return _ext.get_runner(dtype, dtype, dtype).calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NEW)
def test_new_activations_reach_the_runner(fake_cpu, name, dtype):
    x, ids, scales, fc1, fc2 = _layer(name, seed=11, dtype=dtype)
    params = _params(name)
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, activation_type=ActivationType[name],
                            **params)[0]
    ref = naive_layer(x, ids, scales, fc1, fc2, name, **params)
    assert rel_l2(out.double(), ref) <= 1e-2
    (call,) = _calls(dtype)
    assert call["activation"] == _ext.activation_to_enum(ActivationType[name])
    for key in ("situ_beta", "situ_linear_beta", "clamped_relu2_limit"):
        assert call[key] == (params[key].data_ptr() if key in params else 0)
    if name == "SwigluStep":  # the limit alone, no neutral alpha/beta
        assert call["swiglu_limit"] == params["swiglu_limit"].data_ptr()
        assert call["swiglu_alpha"] == call["swiglu_beta"] == 0


def test_flashinfer_integer_runs_situ(fake_cpu):
    x, ids, scales, fc1, fc2 = _layer("Situ", seed=12, dtype=torch.bfloat16)
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16, activation_type=10)[0]
    ref = naive_layer(x, ids, scales, fc1, fc2, "Situ")
    assert rel_l2(out.double(), ref) <= 1e-2
    (call,) = _calls(torch.bfloat16)
    assert call["activation"] == _ext.activation_to_enum(ActivationType.Situ)


def test_swiglu_bias_runs_as_clamped_swiglu(fake_cpu):
    x, ids, scales, fc1, fc2 = _layer("Swiglu", seed=13, dtype=torch.bfloat16)
    limit = torch.full((E,), 0.75)
    out = cutlass_fused_moe(x, ids, scales, fc1, fc2, torch.bfloat16,
                            activation_type=ActivationType.SwigluBias, swiglu_limit=limit)[0]
    (call,) = _calls(torch.bfloat16)
    assert call["activation"] == _ext.activation_to_enum(ActivationType.Swiglu)
    assert call["swiglu_alpha"] != 0 and call["swiglu_beta"] != 0  # neutral values filled in
    ref = naive_layer(x, ids, scales, fc1, fc2, "Swiglu", swiglu_limit=limit)
    assert rel_l2(out.double(), ref) <= 1e-2


def _op(name, dtype=torch.bfloat16, **overrides):
    x, ids, scales, fc1, fc2 = _layer(name, seed=14, dtype=dtype)
    args = validation.OpArguments(
        output=torch.empty(T, H, dtype=dtype), input=x, token_selected_experts=ids,
        token_final_scales=scales, fc1_expert_weights=fc1, fc2_expert_weights=fc2,
        fc1_weight_scales=None, fc2_weight_scales=None, fc1_expert_biases=None,
        fc2_expert_biases=None, swiglu_alpha=None, swiglu_beta=None, swiglu_limit=None,
        workspace_buffer=None, activation=int(ActivationType[name]), expert_start=0,
        num_experts_total=E, tune_max_num_tokens=8192, tactic1="", tactic2="")._asdict()
    args.update(overrides)
    return args


def test_raw_op_runs_the_new_arguments(fake_cpu):
    params = _params("Situ")
    args = _op("Situ", **params)
    torch.ops.cutlass_moe.fused_moe(**args)
    ref = naive_layer(args["input"], args["token_selected_experts"], args["token_final_scales"],
                      args["fc1_expert_weights"], args["fc2_expert_weights"], "Situ", **params)
    assert rel_l2(args["output"].double(), ref) <= 1e-2
    args = _op("ClampedRelu2", clamped_relu2_limit=torch.tensor([0.5]))
    torch.ops.cutlass_moe.fused_moe(**args)
    assert len(_calls(torch.bfloat16)) == 2


@pytest.mark.parametrize("name,overrides,match", [
    ("Swiglu", {"situ_beta": torch.ones(E)}, "situ_beta is only valid with ActivationType.Situ"),
    ("Situ", {"clamped_relu2_limit": torch.ones(1)},
     "clamped_relu2_limit is only valid with ActivationType.ClampedRelu2"),
    ("ClampedRelu2", {}, "ClampedRelu2 needs clamped_relu2_limit"),
    ("ClampedRelu2", {"clamped_relu2_limit": torch.ones(2)},
     r"clamped_relu2_limit must be \[1\] of torch.float32"),
    ("ClampedRelu2", {"clamped_relu2_limit": torch.ones(1, dtype=F64)},
     r"clamped_relu2_limit must be \[1\] of torch.float32"),
    ("Situ", {"situ_linear_beta": torch.ones(E + 1)}, r"situ_linear_beta must be \[4\]"),
    ("SwigluStep", {"swiglu_alpha": torch.ones(E)}, "swiglu_alpha is only valid with"),
    ("Relu2", {"swiglu_limit": torch.ones(E)}, "swiglu_limit is only valid with"),
    ("SwigluBias", {"swiglu_limit": torch.ones(E)}, "swiglu_alpha is required"),
])
def test_raw_op_refuses_misplaced_parameters(fake_cpu, name, overrides, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.cutlass_moe.fused_moe(**_op(name, **overrides))
    assert _calls(torch.bfloat16) == []
