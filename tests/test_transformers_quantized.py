"""``experts_implementation="cutlass_moe"`` for quantised transformers experts (CPU).

transformers 5.x has one experts hook for quantised checkpoints: the fine-grained FP8 experts
(``transformers.integrations.finegrained_fp8.FP8Experts``), which dispatch through their own
``FP8ExpertsInterface``. Tested here: the registration there, the routing decision (fp8, packed
FP4 as mxfp4, or a fallback with one warning naming the reason), the conversion (exact values
against transformers' own dequantisation, ``Fp8Dequantize``, of the module's tensors), the
experts function end to end through the fake extension, ``prepare`` and the fallback on
rebuilt tensors. gpt-oss's MXFP4 experts (``Mxfp4GptOssExperts``) have no hook: they raise
NotImplementedError.

FP8Experts' own forward needs a GPU kernel (Triton finegrained-fp8 or DeepGEMM); where a test
runs it (the fallbacks), ``fp8_linear`` is replaced by a dequantising stand-in.
"""

from __future__ import annotations

import inspect
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")

from transformers.integrations import mxfp4 as hf_mxfp4
from transformers.integrations.moe import use_experts_implementation

import cutlass_moe.integrations.transformers as tx
from cutlass_moe import reference_moe

E8M0 = getattr(torch, "float8_e8m0fnu", None)
H, I, E = 64, 64, 4


@pytest.fixture(autouse=True)
def _fresh_warnings():
    tx._warned.clear()
    yield
    tx._warned.clear()


def config(**overrides):
    values = {"vocab_size": 64, "hidden_size": H, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
              "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": 2,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    values.update(overrides)
    return transformers.MixtralConfig(**values)


def hf_dequantize(weight, scale, dtype):
    """transformers' own dequantisation of FP8Experts' tensors (what ``dequantize=True``
    loads): float32 products rounded once to ``dtype``."""
    return hf_fp8.Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=dtype)


def fp8_quantize(w, block, scale_fmt="float"):
    """transformers' own FP8 quantiser (``Fp8Quantize``): e4m3 weights and ``weight_scale_inv``."""
    quant_config = transformers.FineGrainedFP8Config(weight_block_size=block,
                                                     scale_fmt=scale_fmt)
    op = hf_fp8.Fp8Quantize(types.SimpleNamespace(quantization_config=quant_config))
    out = op._quantize_one("x.proj", w.float())
    return out["x.proj"], out["x.proj_scale_inv"]


def fp8_experts(cfg=None, block=(32, 32), scale_fmt="float", expert_dtype="fp8",
                has_gate=True, activation_scheme="dynamic", seed=0, scale_dtype=None):
    """An FP8Experts module made as transformers' loader makes it (decorated with
    ``use_experts_implementation`` on FP8ExpertsInterface), holding random quantised weights:
    block-quantised by transformers' ``Fp8Quantize`` (``block=None``: per-tensor scales of the
    gate and up halves, stacked ``[E, 2, 1]`` as FP8Experts allocates them), or random packed
    FP4 with power-of-two scales ``[E, N, K/32]`` for ``expert_dtype="fp4"``."""
    cfg = cfg or config()
    cls = use_experts_implementation(experts_class=hf_fp8.FP8Experts,
                                     experts_interface=hf_fp8.ALL_FP8_EXPERTS_FUNCTIONS,
                                     has_bias=False, has_gate=has_gate)
    # Older transformers' FP8Experts take fewer options: pass what this one accepts, and skip a
    # test that needs an option it lacks (e.g. the fp4 variant).
    wanted = {"block_size": block, "activation_scheme": activation_scheme,
              "scale_fmt": scale_fmt, "has_bias": False, "has_gate": has_gate,
              "expert_dtype": expert_dtype}
    defaults = {"scale_fmt": "float", "has_bias": False, "has_gate": True, "expert_dtype": "fp8"}
    while True:
        try:
            module = cls(config=cfg, **wanted)
            break
        except TypeError as exc:
            name = next((n for n in wanted if f"'{n}'" in str(exc)), None)
            if name is None:
                raise
            if name not in defaults or wanted[name] != defaults[name]:
                pytest.skip(f"this transformers' FP8Experts has no {name}={wanted[name]!r}")
            del wanted[name]
    gen = torch.Generator().manual_seed(seed)
    fc1 = "gate_up_proj" if has_gate else "up_proj"
    with torch.no_grad():
        for name in (fc1, "down_proj"):
            weight = getattr(module, name)
            scale = getattr(module, name + "_scale_inv")
            if expert_dtype == "fp4":
                q = torch.randint(-128, 128, weight.shape, generator=gen, dtype=torch.int8)
                exps = torch.randint(-4, 3, scale.shape, generator=gen).float()
                s = torch.exp2(exps).to(scale_dtype or scale.dtype)
            else:
                w = torch.randn(weight.shape, generator=gen) * 0.2
                if block is None and name == "gate_up_proj":
                    halves = [fp8_quantize(h, None, scale_fmt) for h in w.chunk(2, dim=1)]
                    q = torch.cat([h[0] for h in halves], dim=1)
                    s = torch.cat([h[1] for h in halves], dim=1)
                else:
                    q, s = fp8_quantize(w, block, scale_fmt)
            module._parameters[name] = torch.nn.Parameter(q, requires_grad=False)
            module._parameters[name + "_scale_inv"] = torch.nn.Parameter(
                s, requires_grad=False)
    return module


def dequantized_experts(module, dtype):
    """transformers' 16-bit experts (MixtralExperts) holding the module's dequantised weights:
    the eager forward of the same checkpoint loaded with ``dequantize=True``."""
    cfg = module.config
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    experts = MixtralExperts(cfg).to(dtype)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            experts._parameters[name] = torch.nn.Parameter(hf_dequantize(
                getattr(module, name), getattr(module, name + "_scale_inv"), dtype))
    return experts


def kernel_dequantize(converted):
    """The converted tensors' weights, dequantised here from the kernel layout (independently
    of cutlass_moe.fp8 / cutlass_moe.mxfp4): fp8 ``float32(v) * s``, mxfp4 ``e2m1 * 2^(x-127)``,
    each scale row ``[E, K/G, N]`` expanded over its group; float32 (exact for both)."""
    out = []
    for w, s in zip((converted.fc1_expert_weights, converted.fc2_expert_weights),
                    converted.quant_scales):
        if converted.weight_format == "mxfp4":
            assert w.dtype == torch.uint8 and s.dtype == torch.uint8
            lut = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
            v = torch.stack((lut[(w & 0xF).long()], lut[(w >> 4).long()]), dim=-1).flatten(2)
            scale = torch.exp2(s.float() - 127)
        else:
            assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            v, scale = w.float(), s
        group = v.shape[2] // scale.shape[1]
        out.append(v * scale.transpose(1, 2).repeat_interleave(group, dim=2))
    return out


def up_first(t):
    gate, up = t.chunk(2, dim=1)
    return torch.cat((up, gate), dim=1)


def routing(tokens, experts=E, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return ids, torch.softmax(torch.randn(tokens, k, generator=gen), -1)


@pytest.fixture
def dequantizing_fp8_linear(monkeypatch):
    """FP8Experts' eager forward on CPU: ``fp8_linear`` computed on the dequantised weights
    (transformers' GPU kernels also quantise the activations; this stand-in does not)."""
    def linear(input, weight, weight_scale_inv, block_size=None, bias=None,
               activation_scale=None, allow_deepgemm=True):
        w = hf_dequantize(weight, weight_scale_inv, input.dtype)
        return torch.nn.functional.linear(input, w, bias)

    monkeypatch.setattr(hf_fp8, "fp8_linear", linear)


def fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category,
                                                         tx.CutlassMoeFallbackWarning)]


# ------------------------------------------------------------------------------------------
# The hook
# ------------------------------------------------------------------------------------------


def test_registered_in_the_fp8_experts_interface():
    assert hf_fp8.FP8ExpertsInterface._global_mapping["cutlass_moe"] is (
        tx.cutlass_moe_experts_forward)
    assert tx.NAME in hf_fp8.ALL_FP8_EXPERTS_FUNCTIONS
    tx.register("cutlass_moe_fp8_second")
    try:
        assert "cutlass_moe_fp8_second" in hf_fp8.ALL_FP8_EXPERTS_FUNCTIONS
    finally:
        hf_fp8.FP8ExpertsInterface._global_mapping.pop("cutlass_moe_fp8_second", None)
        transformers.integrations.moe.ExpertsInterface._global_mapping.pop(
            "cutlass_moe_fp8_second", None)


def test_a_failed_registration_leaves_the_fp8_interface_clean(monkeypatch):
    def fixed_list(self, requested):
        if requested not in ("eager", "grouped_mm"):
            raise ValueError("not supported")
        return requested

    monkeypatch.setattr(transformers.PreTrainedModel, "get_correct_experts_implementation",
                        fixed_list)
    with pytest.raises(RuntimeError, match="fixed list"):
        tx.register("cutlass_moe_fp8_old")
    assert "cutlass_moe_fp8_old" not in hf_fp8.ALL_FP8_EXPERTS_FUNCTIONS


def test_fp8_experts_dispatch_to_cutlass_moe(monkeypatch):
    module = fp8_experts(seed=1)
    for _ in range(2):  # the loader decorates FP8Experts again for every module it replaces
        fp8_experts(seed=2)
    calls = []
    monkeypatch.setattr(hf_fp8.FP8ExpertsInterface, "_global_mapping", {
        **hf_fp8.FP8ExpertsInterface._global_mapping,
        "cutlass_moe": lambda *args: calls.append(args) or args[1]})
    module.config._experts_implementation = "cutlass_moe"
    x = torch.randn(3, H)
    ids, weights = routing(3)
    module(x, ids, weights)
    assert len(calls) == 1 and calls[0][0] is module
    # The class's own forward, under every layer of the decorator.
    eager = tx._eager_forward(module)
    assert eager.__code__ is not tx._dispatch_code()
    assert "self.linear(" in inspect.getsource(eager)
    assert tx._is_experts_module(module)


# ------------------------------------------------------------------------------------------
# The conversion: exact against transformers' dequantisation
# ------------------------------------------------------------------------------------------

FP8_CASES = {
    "block32x32": {"block": (32, 32)},
    "block16x64": {"block": (16, 64)},
    "per_tensor": {"block": None},  # gate_up scales [E, 2, 1]: one per half
    "ue8m0": {"block": (32, 32), "scale_fmt": "ue8m0"},
    "ungated": {"block": (32, 32), "has_gate": False},
}


@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_conversion_is_exact(case):
    kwargs = FP8_CASES[case]
    module = fp8_experts(**kwargs)
    converted = tx.convert_experts(module)
    assert converted.weight_format == "fp8"
    gated = kwargs.get("has_gate", True)
    assert converted.description == ("Swiglu" if gated else "Silu") + ", fp8 weights"
    fc1_name = "gate_up_proj" if gated else "up_proj"
    w1 = hf_dequantize(module.gate_up_proj if gated else module.up_proj,
                       getattr(module, fc1_name + "_scale_inv"), torch.float32)
    w2 = hf_dequantize(module.down_proj, module.down_proj_scale_inv, torch.float32)
    got1, got2 = kernel_dequantize(converted)
    assert torch.equal(got1, up_first(w1) if gated else w1)
    assert torch.equal(got2, w2)
    # ... and rounded to the activation dtype as transformers rounds (float32 product, once).
    for dtype in (torch.bfloat16, torch.float16):
        hf1 = hf_dequantize(getattr(module, fc1_name), getattr(module, fc1_name + "_scale_inv"),
                            dtype)
        assert torch.equal(got1.to(dtype), up_first(hf1) if gated else hf1)
    # The e4m3 codes themselves are moved, not re-quantised.
    fc1_codes = converted.fc1_expert_weights.view(torch.uint8)
    hf_codes = getattr(module, fc1_name).view(torch.uint8)
    assert torch.equal(fc1_codes, up_first(hf_codes) if gated else hf_codes)
    block = kwargs["block"]
    group = H if block is None else block[1]
    assert converted.quant_scales[0].shape == (E, H // group, (2 if gated else 1) * I)
    assert converted.quant_scales[1].shape == (E, I // (I if block is None else group), H)
    # The untransposed down_proj is the module's own tensor (no copy).
    assert converted.fc2_expert_weights.data_ptr() == module.down_proj.data_ptr()


@pytest.mark.parametrize("scale_dtype", ["ue8m0", "float32"])
def test_packed_fp4_experts_convert_to_mxfp4_exactly(scale_dtype):
    if scale_dtype == "ue8m0" and E8M0 is None:
        pytest.skip("torch without float8_e8m0fnu")
    module = fp8_experts(expert_dtype="fp4", scale_fmt="ue8m0" if scale_dtype == "ue8m0"
                         else "float")
    assert module.gate_up_proj.dtype == torch.int8
    assert module.gate_up_proj_scale_inv.shape == (E, 2 * I, H // 32)
    converted = tx.convert_experts(module)
    assert converted.weight_format == "mxfp4"
    assert converted.description == "Swiglu, mxfp4 weights"
    assert converted.quant_scales[0].shape == (E, H // 32, 2 * I)
    assert converted.quant_scales[1].shape == (E, I // 32, H)
    got1, got2 = kernel_dequantize(converted)
    w1 = hf_dequantize(module.gate_up_proj, module.gate_up_proj_scale_inv, torch.float32)
    w2 = hf_dequantize(module.down_proj, module.down_proj_scale_inv, torch.float32)
    assert torch.equal(got1, up_first(w1)) and torch.equal(got2, w2)


def test_conversion_matches_cutlass_moe_dequantisers():
    """The same converted tensors, read by the library's own fp8/mxfp4 dequantisers."""
    fp8 = pytest.importorskip("cutlass_moe.fp8")
    mxfp4 = pytest.importorskip("cutlass_moe.mxfp4")
    converted = tx.convert_experts(fp8_experts())
    mine = kernel_dequantize(converted)
    for w, s, ref in zip((converted.fc1_expert_weights, converted.fc2_expert_weights),
                         converted.quant_scales, mine):
        assert torch.equal(fp8.dequantize_fp8(w, s, torch.float32), ref)
    converted = tx.convert_experts(fp8_experts(expert_dtype="fp4"))
    mine = kernel_dequantize(converted)
    for w, s, ref in zip((converted.fc1_expert_weights, converted.fc2_expert_weights),
                         converted.quant_scales, mine):
        assert torch.equal(mxfp4.dequantize_mxfp4(w, s, torch.float32), ref)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_layer_equals_the_dequantized_checkpoint_eager_experts(fmt):
    """reference_moe on the converted tensors (dequantised to bf16) = transformers' eager
    experts of the same checkpoint loaded with dequantize=True (bf16 weights), in float64."""
    module = fp8_experts(expert_dtype=fmt, seed=3)
    converted = tx.convert_experts(module)
    experts = dequantized_experts(module, torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, H, generator=gen, dtype=torch.float64)
    ids, weights = routing(11, seed=1)
    expected = tx._eager_forward(experts)(experts, x, ids, weights.double())
    w1, w2 = kernel_dequantize(converted)
    got = reference_moe(x, ids, weights.double(), w1.double(), w2.double(),
                        converted.activation_type, compute_dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# The routing decision: run, or fall back with one warning naming the reason
# ------------------------------------------------------------------------------------------


def _set_code(module, name, index, code):
    with torch.no_grad():
        getattr(module, name).view(torch.uint8).view(-1)[index] = code


UNSUPPORTED = {
    "static activation scales": (lambda: fp8_experts(activation_scheme="static"),
                                 "activation_scheme='static'"),
    "groups of 16": (lambda: fp8_experts(block=(32, 16)), "multiples of 32"),
    "fp4 scales not powers of two": (
        lambda: _scaled(fp8_experts(expert_dtype="fp4"), 0.75), "not powers of two"),
    "e4m3 NaN codes": (lambda: _nan(fp8_experts()), "NaN codes"),
    "scale rows that do not tile": (lambda: _retiled(fp8_experts()), "whole blocks"),
}


def _retiled(module):
    """gate_up_proj's scales as 3 row blocks: 2I = 128 rows do not split into them."""
    scale = module.gate_up_proj_scale_inv
    module._parameters["gate_up_proj_scale_inv"] = torch.nn.Parameter(
        torch.ones(E, 3, scale.shape[2]), requires_grad=False)
    return module


def _scaled(module, factor):
    with torch.no_grad():
        module.down_proj_scale_inv.mul_(factor)
    return module


def _nan(module):
    _set_code(module, "down_proj", 5, 0xFF)
    return module


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_fp8_experts_fall_back_with_one_warning(case, fake_cpu,
                                                            dequantizing_fp8_linear):
    make, reason = UNSUPPORTED[case]
    try:
        module = make()
    except (ValueError, RuntimeError) as exc:  # transformers itself refuses the layout
        pytest.skip(f"transformers refuses the layout: {exc}")
    with pytest.raises(tx.UnsupportedExperts, match=reason):
        tx.convert_experts(module)
    module.config._experts_implementation = "cutlass_moe"
    x = torch.randn(5, H, dtype=torch.bfloat16)
    ids, weights = routing(5)
    try:
        with torch.no_grad():
            expected = tx._eager_forward(module)(module, x, ids, weights)
    except ValueError as exc:  # transformers' own dequantisation refuses the grid too
        expected = exc
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            if isinstance(expected, ValueError):
                for _ in range(2):
                    with pytest.raises(ValueError, match="scale grid"):
                        module(x, ids, weights)
            else:
                out = module(x, ids, weights)
                again = module(x, ids, weights)
                for got in (out, again):  # the NaN case gives NaN, as eager does
                    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    messages = fallback_warnings(record)
    assert len(messages) == 1 and reason in messages[0], messages


def test_a_cutlass_moe_without_the_fp8_path_falls_back(fake_cpu, monkeypatch,
                                                       dequantizing_fp8_linear):
    def old_op(input, token_selected_experts, token_final_scales, fc1_expert_weights,
               fc2_expert_weights, output_dtype, quant_scales=None):
        raise AssertionError("not called")

    monkeypatch.setattr(tx, "cutlass_fused_moe", old_op)
    module = fp8_experts()
    module.config._experts_implementation = "cutlass_moe"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            module(torch.randn(2, H, dtype=torch.bfloat16), *routing(2))
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "no fp8 weight-only path" in messages[0]


def test_mxfp4_gpt_oss_experts_have_no_hook():
    cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4,
                                    num_experts_per_tok=2, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                    vocab_size=64)
    module = hf_mxfp4.Mxfp4GptOssExperts(cfg)
    assert not tx._is_experts_module(module)
    with pytest.raises(NotImplementedError, match="no ExpertsInterface hook"):
        tx.convert_experts(module)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.model.layers[0].mlp.experts = module
    with pytest.raises(NotImplementedError, match="Mxfp4GptOssExperts"):
        tx.prepare(model)
    assert tx.experts_modules(model) == []


# ------------------------------------------------------------------------------------------
# End to end through the fake extension
# ------------------------------------------------------------------------------------------


def _fake_runs(fmt):
    """Whether the op and the fake extension take this weight format yet (both are being
    written alongside this integration)."""
    flag = tx._FORMAT_FLAGS[fmt]
    if flag not in inspect.signature(tx.cutlass_fused_moe).parameters:
        return False
    import _fake_ext
    return fmt in getattr(_fake_ext, "ENUM_TO_FORMAT", {}).values()


def quantized_model(expert_dtype="fp8", dtype=torch.bfloat16, seed=0, scale_fmt="float"):
    """A tiny Mixtral whose experts are FP8Experts (as transformers' FP8 loader makes them),
    and the same model with the dequantised 16-bit experts."""
    cfg = config()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation="eager").to(dtype).eval()
    reference = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation="eager").to(dtype).eval()
    reference.load_state_dict(model.state_dict())
    for index, layer in enumerate(model.model.layers):
        module = fp8_experts(model.config, expert_dtype=expert_dtype, seed=seed + index,
                             scale_fmt=scale_fmt)
        layer.mlp.experts = module
        reference.model.layers[index].mlp.experts = dequantized_experts(module, dtype)
    return model, reference


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_logits_through_the_fake_extension(fmt, fake_cpu):
    kernel = "fp8" if fmt == "fp8" else "mxfp4"
    if not _fake_runs(kernel):
        pytest.skip(f"the op or the fake extension has no {kernel} path yet")
    model, reference = quantized_model(fmt)
    model.set_experts_implementation("cutlass_moe")
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        out = model(tokens).logits.float()
        expected = reference(tokens).logits.float()
    # Same weights (bf16 dequantised), same routers; the fake computes in float32, eager in
    # bf16: the op tests' bf16 bound.
    assert (out - expected).norm() / expected.norm() < 1e-2
    plan = model.model.layers[0].mlp.experts.__dict__[tx._PLAN_ATTR]
    assert plan.reason is None and plan.weights == kernel
    from _fake_ext import ENUM_TO_FORMAT, FakeMoeRunner
    assert kernel in {ENUM_TO_FORMAT.get(weight) for _, weight, _ in FakeMoeRunner.constructed}


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_experts_function_runs_the_kernel_arguments(fmt, fake_cpu, monkeypatch):
    """Without the fake's numerics: the op receives the converted tensors and the format's
    flag (checked by intercepting cutlass_fused_moe)."""
    seen = {}

    def op(x, ids, scales, fc1, fc2, out_dtype, **kwargs):
        seen.update(kwargs, fc1=fc1, fc2=fc2)
        return (torch.zeros_like(x),)

    monkeypatch.setattr(tx, "cutlass_fused_moe", op)
    kernel = "fp8" if fmt == "fp8" else "mxfp4"
    flag = tx._FORMAT_FLAGS[kernel]
    # The stand-in takes every keyword.
    monkeypatch.setattr(tx.inspect, "signature", lambda f: types.SimpleNamespace(
        parameters={flag: None}))
    module = fp8_experts(expert_dtype=fmt)
    module.config._experts_implementation = "cutlass_moe"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        module(torch.randn(3, H, dtype=torch.bfloat16), *routing(3))
        module(torch.randn(3, H, dtype=torch.float16), *routing(3))  # any 16-bit activations
    converted = tx.convert_experts(module)
    assert seen[flag] is True
    assert torch.equal(seen["fc1"], converted.fc1_expert_weights)
    for got, want in zip(seen["quant_scales"], converted.quant_scales):
        assert torch.equal(got, want)
    assert seen["activation_type"] == converted.activation_type


# ------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_prepare_keeps_the_checkpoint_format_and_falls_back_on_rebuilt_tensors(
        fmt, scale_fmt, monkeypatch):
    if scale_fmt == "ue8m0" and E8M0 is None:
        pytest.skip("torch without float8_e8m0fnu")
    kernel = "fp8" if fmt == "fp8" else "mxfp4"
    monkeypatch.setattr(tx.inspect, "signature", lambda f: types.SimpleNamespace(
        parameters=dict.fromkeys(tx._FORMAT_FLAGS.values())))
    model, _ = quantized_model(fmt, scale_fmt=scale_fmt)
    module = model.model.layers[0].mlp.experts
    originals = {name: t.detach().clone() for name, t in module.named_parameters()}
    with pytest.raises(ValueError, match=f"weights={kernel!r}"):
        tx.prepare(model, weights="bf16")
    report = tx.prepare(model, weights=kernel)
    assert report == {"model.layers.0.mlp.experts": f"cutlass_moe: Swiglu, {kernel} weights"}
    assert not dict(module.named_parameters())  # weights and scales freed
    rebuilt = tx._hf_tensors(module, module.__dict__[tx._PLAN_ATTR])
    assert set(rebuilt) == set(originals)
    for name, t in originals.items():
        assert rebuilt[name].dtype == t.dtype and rebuilt[name].shape == t.shape, name
        assert torch.equal(rebuilt[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_prepare_refuses_to_requantise_a_checkpoint(fmt, monkeypatch):
    """A quantised checkpoint's experts are kept in their format: other kinds (int4 too) and
    a group size (its blocks are kept) are refused, before anything changes, and so is a
    second prepare with a group size."""
    kernel = "fp8" if fmt == "fp8" else "mxfp4"
    monkeypatch.setattr(tx.inspect, "signature", lambda f: types.SimpleNamespace(
        parameters=dict.fromkeys(tx._FORMAT_FLAGS.values())))
    model, _ = quantized_model(fmt)
    module = model.model.layers[0].mlp.experts
    other = "mxfp4" if kernel == "fp8" else "fp8"
    for weights, group in (("int4", None), ("int4", 32), ("int8", None), (other, None)):
        with pytest.raises(ValueError, match=f"weights={kernel!r}"):
            tx.prepare(model, weights=weights, group_size=group)
    with pytest.raises(ValueError, match="leave group_size out" if kernel == "fp8"
                       else "group_size applies"):
        tx.prepare(model, weights=kernel, group_size=64)
    assert dict(module.named_parameters()) and tx._PLAN_ATTR not in module.__dict__
    report = tx.prepare(model, weights=kernel)
    assert report == {"model.layers.0.mlp.experts": f"cutlass_moe: Swiglu, {kernel} weights"}
    assert tx.prepare(model, weights=kernel) == report
    if kernel == "fp8":
        with pytest.raises(ValueError, match="already prepared"):
            tx.prepare(model, weights=kernel, group_size=128)
