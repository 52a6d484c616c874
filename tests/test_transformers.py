"""``experts_implementation="cutlass_moe"`` for Hugging Face transformers (CPU).

What is tested: the conversion of each family's experts module (weights, layout, activation)
against the family's own eager experts forward, through ``reference_moe`` in float64; the whole
experts function end to end through the fake extension (tests/_fake_ext.py computes the layer
with reference_moe on host memory); every fallback; the registration; the cache of converted
weights; and ``prepare`` (originals really freed, int8, argument errors; int4, fp8 and
mxfp4 in tests/test_transformers_prepare_quantize.py).

Skipped when transformers is not installed; CI installs it (``.[test]``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap
import warnings
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.integrations import moe as hf_moe

import cutlass_moe.integrations.transformers as tx
from _helpers import record_error, rel_l2
from cutlass_moe import _ext, reference_moe, validation
from cutlass_moe.quantization import dequantize

#: bf16 bound of the op tests (tests/test_fused_moe_gpu.py), per comparison with float32 math.
BF16_TOL = 1e-2

_COMMON = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0}

#: Tiny random configs: hidden sizes multiples of 16, several experts, top-k 2, biases where the
#: family has them (gpt-oss), the family's own activation and gate.
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(
        **_COMMON, head_dim=16, intermediate_size=32, num_local_experts=4,
        num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_COMMON, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 2}, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16),
    "gpt_oss": lambda: transformers.GptOssConfig(
        **_COMMON, head_dim=16, intermediate_size=32, num_local_experts=4,
        num_experts_per_tok=2),
    "olmoe": lambda: transformers.OlmoeConfig(
        **_COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2),
}

#: What each family maps to (``ConvertedExperts.description``).
EXPECTED_FORM = {
    "mixtral": "Swiglu",
    "qwen2_moe": "Swiglu",
    "qwen3_moe": "Swiglu",
    "deepseek_v3": "Swiglu",
    "gpt_oss": "Swiglu (swiglu_alpha=1.702, swiglu_beta=1, swiglu_limit=7), gate/up interleaved",
    "olmoe": "Swiglu",
}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees its fallback warnings (they are issued once per class and reason)."""
    tx._warned.clear()
    yield
    tx._warned.clear()


def fake_calls(dtype=torch.bfloat16) -> int:
    return len(_ext.get_runner(dtype, dtype, dtype).calls)


def randomize_experts(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Every expert tensor (biases included) random, so that no mapping hides behind zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in tx.experts_modules(model):
            for p in module.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def one_moe_layer(family: str) -> dict:
    """Config overrides for a model whose only MoE layer is its last: everything before the
    experts is then computed identically whatever the experts implementation, so the router
    picks the same experts and the logits differ by the experts' rounding only."""
    return ({"num_hidden_layers": 2, "first_k_dense_replace": 1} if family == "deepseek_v3"
            else {"num_hidden_layers": 1})


def tiny_model(family: str, dtype=torch.bfloat16, implementation="eager", seed=0, **overrides):
    config = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation=implementation).to(dtype).eval()
    randomize_experts(model, seed=seed)
    return model


def routing(tokens: int, experts: int, k: int = 2, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1).to(dtype)
    return ids, weights


def eager_experts(module, x, ids, weights):
    return tx._eager_forward(module)(module, x, ids, weights)


def reference_of(converted: tx.ConvertedExperts, x, ids, weights, compute_dtype=torch.float64):
    kwargs = converted.fused_moe_kwargs()
    activation = kwargs.pop("activation_type")
    fc1, fc2 = converted.fc1_expert_weights, converted.fc2_expert_weights
    if kwargs.pop("use_int8_woq_per_channel", False):
        s1, s2 = kwargs.pop("quant_scales")
        fc1, fc2 = dequantize(fc1, s1), dequantize(fc2, s2)
    return reference_moe(x, ids, weights, fc1, fc2, activation, compute_dtype=compute_dtype,
                         **kwargs)


@contextlib.contextmanager
def no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        yield


def logits_three_ways(model, tokens):
    """``(cutlass_moe, eager, float32)`` logits of ``model`` for ``tokens``: with the cutlass_moe
    experts (no fallback allowed), with transformers' eager experts, and the same eager model in
    float32. Leaves the model on eager experts, in float32."""
    with torch.no_grad(), no_fallback():
        out = model(tokens).logits.float()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        eager = model(tokens).logits.float()
        exact = model.float()(tokens).logits
    return out, eager, exact


def fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category,
                                                         tx.CutlassMoeFallbackWarning)]


# ------------------------------------------------------------------------------------------
# The conversion, family by family, against the family's own eager experts (float64)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_matches_the_family_eager_experts(family):
    model = tiny_model(family, torch.float64)
    modules = tx.experts_modules(model)
    assert modules
    for index, (_, module) in enumerate(modules):
        converted = tx.convert_experts(module)
        assert converted.description == EXPECTED_FORM[family]
        num_experts = converted.fc1_expert_weights.shape[0]
        gen = torch.Generator().manual_seed(index)
        # x * 4: GEMM1 outputs well beyond gpt-oss's limit 7, so the clamps are exercised.
        x = torch.randn(13, 32, generator=gen, dtype=torch.float64) * 4
        ids, weights = routing(13, num_experts, seed=index, dtype=torch.float64)
        expected = eager_experts(module, x, ids, weights)
        got = reference_of(converted, x, ids, weights)
        # float64 throughout, except the per-expert activation parameters (float32 in the op).
        assert rel_l2(got, expected) <= 1e-7, family
    if family == "gpt_oss":
        up, gate = converted.fc1_expert_weights.chunk(2, dim=1)
        w = module.gate_up_proj.detach()  # [E, H, 2I], gate/up interleaved
        torch.testing.assert_close(up, w[:, :, 1::2].transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(gate, w[:, :, 0::2].transpose(1, 2), rtol=0, atol=0)
        assert converted.fc1_expert_biases is not None and converted.fc2_expert_biases is not None
    else:
        up, gate = converted.fc1_expert_weights.chunk(2, dim=1)
        gate_hf, up_hf = module.gate_up_proj.detach().chunk(2, dim=1)
        assert torch.equal(up, up_hf) and torch.equal(gate, gate_hf)
        assert converted.fc1_expert_biases is None


def test_gpt_oss_gate_parameters_are_read_from_the_module():
    model = tiny_model("gpt_oss", torch.float64)
    _, module = tx.experts_modules(model)[0]
    module.alpha, module.limit = 1.25, 3.0
    converted = tx.convert_experts(module)
    assert converted.description == ("Swiglu (swiglu_alpha=1.25, swiglu_beta=1, swiglu_limit=3), "
                                     "gate/up interleaved")
    assert converted.swiglu_alpha.dtype == torch.float32 and converted.swiglu_alpha.shape == (4,)
    x = torch.randn(11, 32, dtype=torch.float64) * 4
    ids, weights = routing(11, 4, dtype=torch.float64)
    assert rel_l2(reference_of(converted, x, ids, weights),
                  eager_experts(module, x, ids, weights)) <= 1e-7


QUICK_GELU = "Swiglu (swiglu_alpha=1.702, swiglu_beta=0, swiglu_limit=inf)"


@pytest.mark.parametrize("hidden_act,form", [("gelu", "Geglu"), ("gelu_pytorch_tanh", "GegluTanh"),
                                             ("gelu_new", "GegluTanh"), ("silu", "Swiglu"),
                                             ("quick_gelu", QUICK_GELU)])
def test_activation_functions_map_to_their_kernel_activation(hidden_act, form):
    model = tiny_model("mixtral", torch.float64, hidden_act=hidden_act)
    _, module = tx.experts_modules(model)[0]
    converted = tx.convert_experts(module)
    assert converted.description == form
    x = torch.randn(9, 32, dtype=torch.float64) * 2
    ids, weights = routing(9, 4, dtype=torch.float64)
    assert rel_l2(reference_of(converted, x, ids, weights),
                  eager_experts(module, x, ids, weights)) <= 1e-6


def _decorated_experts_classes() -> list[tuple[str, str]]:
    """(family, class name) of every @use_experts_implementation class of the installed
    transformers."""
    root = os.path.dirname(transformers.models.__file__)
    found = []
    for info in pkgutil.iter_modules([root]):
        path = os.path.join(root, info.name, f"modeling_{info.name}.py")
        if not info.ispkg or not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as source:
            text = source.read()
        if "@use_experts_implementation" not in text:
            continue
        module = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__
                    and issubclass(cls, torch.nn.Module)
                    and getattr(cls.forward, "__wrapped__", None) is not None
                    and "get_interface" in cls.forward.__code__.co_names):
                found.append((info.name, name))
    return sorted(found)


_TINY = {"hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 16,
         "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
         "moe_latent_size": None, "moe_hidden_size": 32, "num_experts_per_tok": 2}


def _tiny_experts(family: str, class_name: str) -> torch.nn.Module:
    """The experts module of one family built from its default config made tiny; skips
    when no config of the family builds it."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    configuration = importlib.import_module(
        f"transformers.models.{family}.configuration_{family}")
    cls = getattr(modeling, class_name)
    configs = [c for c in vars(configuration).values()
               if inspect.isclass(c) and issubclass(c, transformers.PretrainedConfig)
               and c.__module__ == configuration.__name__]
    errors = []
    for config_class in configs:
        try:
            config = config_class()
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
            continue
        candidates = [config] + [getattr(config, key) for key in getattr(config, "sub_configs", {})
                                 if isinstance(getattr(config, key, None),
                                               transformers.PretrainedConfig)]
        for candidate in candidates:
            for key, value in _TINY.items():
                with contextlib.suppress(Exception):  # some configs refuse even hasattr
                    if hasattr(candidate, key):
                        setattr(candidate, key, value)
            extra = ({"intermediate_size": 16}  # Ernie-4.5-VL: per-modality sizes in a list
                     if "intermediate_size" in inspect.signature(cls.__init__).parameters else {})
            try:
                return cls(candidate, **extra)
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
    pytest.skip(f"no config of {family} builds {class_name}: {errors[:2]}")


EXPERTS_CLASSES = _decorated_experts_classes()


@pytest.mark.parametrize("family,class_name", EXPERTS_CLASSES,
                         ids=[f"{f}-{c}" for f, c in EXPERTS_CLASSES])
def test_every_installed_family_maps_exactly_or_falls_back(family, class_name):
    """Every experts class of the installed transformers either converts to something that
    computes exactly its eager forward (float64) or is refused with a reason: never a
    silently different result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = _tiny_experts(family, class_name).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    try:
        converted = tx.convert_experts(module)
    except tx.UnsupportedExperts as exc:
        assert str(exc)
        if family == "muse_spark":
            assert "has_post_expert_norm" in str(exc)
        return
    num_experts = converted.fc1_expert_weights.shape[0]
    hidden = converted.fc2_expert_weights.shape[1]
    x = torch.randn(9, hidden, generator=gen, dtype=torch.float64) * 3
    ids, weights = routing(9, num_experts, dtype=torch.float64)
    expected = eager_experts(module, x, ids, weights).double()
    assert rel_l2(reference_of(converted, x, ids, weights), expected) <= 1e-6, (
        f"{family}: {converted.description}")


# ------------------------------------------------------------------------------------------
# End to end through the fake extension
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_through_the_fake_extension(fake_cpu, family):
    model = tiny_model(family, torch.bfloat16, "cutlass_moe")
    layers = len(tx.experts_modules(model))
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), no_fallback():
        out = model(tokens).logits.float()
        again = model(tokens).logits.float()
    assert layers >= 1 and fake_calls() == 2 * layers  # every call ran the (fake) kernel path
    assert torch.equal(out, again)

    # Against eager (bf16) and the same weights in float32, on a model with one MoE layer (no
    # routing flip between the runs: the bound is the experts' bf16 rounding).
    model = tiny_model(family, torch.bfloat16, "cutlass_moe", **one_moe_layer(family))
    out, eager, exact = logits_three_ways(model, tokens)
    assert rel_l2(out, eager) <= BF16_TOL
    assert rel_l2(out, exact) <= BF16_TOL
    record_error("transformers_logits_bfloat16_vs_float32_model", rel_l2(out, exact))


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_function_through_the_fake_extension(fake_cpu, family):
    """The experts function's output is the fake kernel's (reference_moe in float32 on the
    converted weights) to bf16 rounding; the converted weights are what convert_experts gives."""
    model = tiny_model(family, torch.bfloat16, "cutlass_moe")
    _, module = tx.experts_modules(model)[0]
    num_experts = module.down_proj.shape[0]
    x = torch.randn(10, 32).to(torch.bfloat16)
    ids, weights = routing(10, num_experts, dtype=torch.bfloat16)
    with torch.no_grad(), no_fallback():
        out = module(x, ids, weights)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    expected = reference_of(tx.convert_experts(module), x, ids, weights, torch.float32)
    assert rel_l2(out.float(), expected) <= 4e-3
    exact = eager_experts(module.double(), x.double(), ids, weights.double())
    assert rel_l2(out.float(), exact) <= BF16_TOL


def test_no_tokens_and_three_dimensional_hidden_states(fake_cpu):
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe")
    _, module = tx.experts_modules(model)[0]
    with torch.no_grad(), no_fallback():
        empty = module(torch.empty(0, 32, dtype=torch.bfloat16),
                       torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2))
        assert empty.shape == (0, 32)
        x = torch.randn(2, 3, 32).to(torch.bfloat16)
        ids, weights = routing(6, 4)
        out = module(x, ids.view(2, 3, 2), weights.view(2, 3, 2))
        assert out.shape == (2, 3, 32)
        assert torch.equal(out.view(6, 32), module(x.view(6, 32), ids, weights))


def test_generate_with_a_compiled_static_cache_decode_step(fake_cpu):
    """generate() with a static cache and a compiled (fullgraph) decode step: the cached
    conversion is traced into the graph and the tokens equal those of eager cutlass_moe."""
    model = tiny_model("qwen3_moe", torch.bfloat16, "cutlass_moe")
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    with no_fallback():
        plain = model.generate(prompt, max_new_tokens=8, do_sample=False)
        calls = fake_calls()
        config = transformers.CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
        config._compile_all_devices = True
        compiled = model.generate(prompt, max_new_tokens=8, do_sample=False,
                                  cache_implementation="static", compile_config=config)
    assert torch.equal(plain, compiled)
    assert fake_calls() == 2 * calls


def test_torch_compile_fullgraph_of_the_experts(fake_cpu):
    model = tiny_model("gpt_oss", torch.bfloat16, "cutlass_moe")
    _, module = tx.experts_modules(model)[0]
    x = torch.randn(5, 32).to(torch.bfloat16)
    ids, weights = routing(5, 4)
    with torch.no_grad():
        first = torch.compile(module, backend="aot_eager")(x, ids, weights)  # builds, graph break
        torch._dynamo.reset()
        eager = module(x, ids, weights)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(x, ids, weights)
    assert torch.equal(first, eager) and torch.equal(compiled, eager)


def test_expert_parallel_sentinels_map_exactly(fake_cpu):
    """Under transformers' expert parallelism the experts see local ids and ids >= E for
    choices of other ranks; the kernel drops those as the eager forward does."""
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe")
    _, module = tx.experts_modules(model)[0]
    has_ep = hasattr(module, "_is_expert_parallel")  # transformers >= 5.20
    module._is_expert_parallel = True
    x = torch.randn(8, 32).to(torch.bfloat16)
    ids, weights = routing(8, 4)
    ids[::2, 1] = 4  # the sentinel: another rank's expert
    with torch.no_grad(), no_fallback():
        out = module(x, ids, weights)
    kept = ids < 4  # the dropped choices: weight 0 on any local expert gives the same sum
    dropped = reference_of(tx.convert_experts(module), x, torch.where(kept, ids, 0),
                           torch.where(kept, weights, 0), torch.float32)
    assert rel_l2(out.float(), dropped) <= 4e-3
    if has_ep:  # the eager forward of this transformers knows the sentinel too
        exact = eager_experts(module.double(), x.double(), ids, weights.double())
        assert rel_l2(out.float(), exact) <= BF16_TOL


# ------------------------------------------------------------------------------------------
# Fallbacks: transformers' eager experts, one warning naming the reason, the eager result
# ------------------------------------------------------------------------------------------


def _falls_back(module, x, ids, weights, match: str) -> torch.Tensor:
    with torch.no_grad():
        expected = eager_experts(module, x, ids, weights)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = module(x, ids, weights)
            again = module(x, ids, weights)
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    assert match in messages[0] and type(module).__name__ in messages[0]
    assert torch.equal(out, expected) and torch.equal(again, expected)
    return out


def _bf16_call(model, tokens=6, seed=0):
    _, module = tx.experts_modules(model)[0]
    num_experts = module.down_proj.shape[0]
    dtype = module.down_proj.dtype
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ids, weights = routing(tokens, num_experts, seed=seed)
    return module, x, ids, weights


def test_post_expert_norm_falls_back(fake_cpu):
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)
    module.has_post_expert_norm = True
    _falls_back(module, x, ids, weights, "has_post_expert_norm")
    assert fake_calls() == 0


def test_unknown_activation_falls_back(fake_cpu):
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe", hidden_act="mish")
    module, x, ids, weights = _bf16_call(model)
    _falls_back(module, x, ids, weights, "MishActivation")
    with pytest.raises(tx.UnsupportedExperts, match="matches none"):
        tx.convert_experts(module)


def test_unknown_gate_falls_back(fake_cpu):
    model = tiny_model("gpt_oss", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)

    def softcapped(gate_up):  # not a kernel activation
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        return torch.tanh(gate / 5) * 5 * torch.sigmoid(gate) * (up + 1)

    module._apply_gate = softcapped
    _falls_back(module, x, ids, weights, "_apply_gate")


def test_float32_hidden_states_fall_back(fake_cpu):
    model = tiny_model("qwen3_moe", torch.float32, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)
    _falls_back(module, x, ids, weights, "torch.float32")
    assert not any(name.startswith("cutlass_moe_") for name, _ in module.named_buffers())


def test_cpu_tensors_without_the_fake_fall_back():
    """Real use on CPU tensors (no CUDA device here): the eager forward, nothing converted."""
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)
    _falls_back(module, x, ids, weights, "CUDA")
    assert tx.converted_weight_bytes(model) == 0
    tokens = torch.randint(0, 64, (1, 5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", tx.CutlassMoeFallbackWarning)
        out = model(tokens).logits
        model.set_experts_implementation("eager")
        assert torch.equal(out, model(tokens).logits)


def test_missing_extension_falls_back(monkeypatch):
    monkeypatch.setattr(validation, "require_cuda", lambda device: None)
    model = tiny_model("olmoe", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)
    with _ext._replaced_extension(None):
        _falls_back(module, x, ids, weights, "not built")


def test_calls_that_need_gradients_fall_back(fake_cpu):
    model = tiny_model("qwen2_moe", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)
    assert module.down_proj.requires_grad
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = module(x, ids, weights)
    assert "gradients" in fallback_warnings(record)[0]
    assert out.requires_grad  # the eager forward: autograd works
    assert fake_calls() == 0


def test_unknown_parameters_fall_back(fake_cpu):
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)
    module.register_parameter("expert_scale", torch.nn.Parameter(torch.ones(4)))
    _falls_back(module, x, ids, weights, "expert_scale")


def test_shapes_the_kernels_refuse_fall_back(fake_cpu):
    model = tiny_model("olmoe", torch.bfloat16, "cutlass_moe", intermediate_size=12)
    module, x, ids, weights = _bf16_call(model)
    _falls_back(module, x, ids, weights, "multiples of 8")


def test_one_warning_per_class_and_reason():
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe")
    tokens = torch.randint(0, 64, (1, 5))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(tokens)
        model(tokens)
    assert len(fallback_warnings(record)) == 1  # two layers, two calls, one reason


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------


def test_registered_in_the_experts_interface():
    assert hf_moe.ALL_EXPERTS_FUNCTIONS["cutlass_moe"] is tx.cutlass_moe_experts_forward
    config = FAMILIES["qwen3_moe"]()
    model = transformers.AutoModelForCausalLM.from_config(config,
                                                          experts_implementation="cutlass_moe")
    assert model.config._experts_implementation == "cutlass_moe"
    model.set_experts_implementation("eager")
    model.set_experts_implementation("cutlass_moe")
    assert model.config._experts_implementation == "cutlass_moe"
    tx.register()  # idempotent
    tx.register("cutlass_moe_second_name")
    try:
        model.set_experts_implementation("cutlass_moe_second_name")
        assert model.config._experts_implementation == "cutlass_moe_second_name"
    finally:
        hf_moe.ExpertsInterface._global_mapping.pop("cutlass_moe_second_name", None)


def test_transformers_that_cannot_take_registered_names_get_a_clear_error(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.6.0")
    with pytest.raises(RuntimeError, match=r">= 5\.7, found 5\.6\.0"):
        tx.register("cutlass_moe_old")
    monkeypatch.setattr(transformers, "__version__", "5.24.0")

    def fixed_list(self, requested):  # what transformers 5.0-5.6 do
        if requested not in ("eager", "grouped_mm", "batched_mm", "deepgemm"):
            raise ValueError(f"Specified experts_implementation={requested!r} is not supported")
        return requested

    monkeypatch.setattr(transformers.PreTrainedModel, "get_correct_experts_implementation",
                        fixed_list)
    with pytest.raises(RuntimeError, match="fixed list"):
        tx.register("cutlass_moe_old")
    assert "cutlass_moe_old" not in hf_moe.ALL_EXPERTS_FUNCTIONS


def test_importing_cutlass_moe_does_not_import_transformers():
    script = textwrap.dedent(
        """
        import sys
        import cutlass_moe, cutlass_moe.integrations
        assert "transformers" not in sys.modules, "cutlass_moe imported transformers"
        print("ok")
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------
# The cache of converted weights
# ------------------------------------------------------------------------------------------


def test_converted_weights_are_made_once_and_reused(fake_cpu, monkeypatch):
    model = tiny_model("mixtral", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)
    made = []
    convert = tx._convert
    monkeypatch.setattr(tx, "_convert", lambda *a, **k: made.append(1) or convert(*a, **k))
    with torch.no_grad(), no_fallback():
        module(x, ids, weights)
        fc1 = module.cutlass_moe_fc1
        module(x, ids, weights)
        module(x[:3], ids[:3], weights[:3])
    assert len(made) == 1 and module.cutlass_moe_fc1 is fc1
    # Not part of the checkpoint: state_dict() has the parameters only.
    assert not any("cutlass_moe" in key for key in model.state_dict())


def test_converted_weights_are_rebuilt_when_a_parameter_changes(fake_cpu):
    model = tiny_model("gpt_oss", torch.bfloat16, "cutlass_moe")
    module, x, ids, weights = _bf16_call(model)

    def check():
        with torch.no_grad(), no_fallback():
            out = module(x, ids, weights)
        expected = reference_of(tx.convert_experts(module), x, ids, weights, torch.float32)
        assert rel_l2(out.float(), expected) <= 4e-3
        return out

    first = check()
    with torch.no_grad():
        module.down_proj.mul_(2)  # in place: the version changes
    second = check()
    assert not torch.equal(first, second)
    module.gate_up_proj_bias = torch.nn.Parameter(torch.zeros_like(module.gate_up_proj_bias))
    third = check()  # another tensor
    assert not torch.equal(second, third)
    module.down_proj.data = module.down_proj.data.clone() * 0.5  # new storage, same object
    assert not torch.equal(third, check())


def test_memory_cost_of_the_conversion(fake_cpu):
    """Standard layout: one copy of gate_up_proj, down_proj used as it is; gpt-oss
    (transposed): both weights and the fc1 bias copied."""
    for family, copied in (("mixtral", ("gate_up_proj",)),
                           ("gpt_oss", ("gate_up_proj", "down_proj", "gate_up_proj_bias"))):
        model = tiny_model(family, torch.bfloat16, "cutlass_moe")
        with torch.no_grad(), no_fallback():
            model(torch.randint(0, 64, (1, 4)))
        expected = 0
        for _, module in tx.experts_modules(model):
            expected += sum(getattr(module, n).nbytes for n in copied)
            expected += sum(getattr(module, "cutlass_moe_" + n).nbytes
                            for n in ("swiglu_alpha", "swiglu_beta", "swiglu_limit")
                            if hasattr(module, "cutlass_moe_" + n))
            if family == "mixtral":
                assert (module.cutlass_moe_fc2.untyped_storage().data_ptr()
                        == module.down_proj.untyped_storage().data_ptr())
        assert tx.converted_weight_bytes(model) == expected
        assert tx.clear_converted_weights(model) == expected
        assert tx.converted_weight_bytes(model) == 0
        assert not any(n.startswith("cutlass_moe_") for _, m in tx.experts_modules(model)
                       for n, _ in m.named_buffers())


# ------------------------------------------------------------------------------------------
# prepare()
# ------------------------------------------------------------------------------------------


def _expert_bytes(model) -> int:
    seen, total = set(), 0
    for _, module in tx.experts_modules(model):
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_prepare_bf16_converts_in_place_and_frees_the_originals(fake_cpu, family):
    model = tiny_model(family, torch.bfloat16)
    lazy = tiny_model(family, torch.bfloat16, "cutlass_moe")
    before = _expert_bytes(model)
    storages = {}
    for name, module in tx.experts_modules(model):
        for pname, p in module.named_parameters(recurse=False):
            storages[f"{name}.{pname}"] = weakref.ref(p.untyped_storage())
    report = tx.prepare(model, weights="bf16")
    gc.collect()
    assert set(report.values()) == {"cutlass_moe: " + EXPECTED_FORM[family]}
    assert model.config._experts_implementation == "cutlass_moe"
    for name, module in tx.experts_modules(model):
        assert not list(module.parameters(recurse=False))  # the originals are gone ...
        for key in ("gate_up_proj", "down_proj"):
            alive = storages[f"{name}.{key}"]()
            if family == "mixtral" and key == "down_proj":
                # ... and their memory too, except down_proj [E, H, I], which is already the
                # kernel's layout: the converted fc2 *is* that storage (no copy was made).
                assert alive is not None
                assert alive.data_ptr() == module.cutlass_moe_fc2.untyped_storage().data_ptr()
            else:
                assert alive is None, key
    assert _expert_bytes(model) <= before + 1024  # + the float32 activation parameters
    tokens = torch.randint(0, 64, (2, 5))
    with torch.no_grad(), no_fallback():
        assert torch.equal(model(tokens).logits, lazy(tokens).logits)


def test_prepare_int8_quantises_with_the_library_quantizer(fake_cpu):
    model = tiny_model("qwen3_moe", torch.bfloat16)
    original = tiny_model("qwen3_moe", torch.bfloat16)
    before = _expert_bytes(model)
    storages = [weakref.ref(p.untyped_storage()) for _, m in tx.experts_modules(model)
                for p in m.parameters(recurse=False)]
    report = tx.prepare(model, weights="int8")
    gc.collect()
    assert set(report.values()) == {"cutlass_moe: Swiglu, int8 weights"}
    assert all(ref() is None for ref in storages)
    assert _expert_bytes(model) < 0.6 * before
    (_, module), (_, source) = tx.experts_modules(model)[0], tx.experts_modules(original)[0]
    assert module.cutlass_moe_fc1.dtype == torch.int8
    assert module.cutlass_moe_fc1_scale.dtype == torch.bfloat16
    x = torch.randn(7, 32).to(torch.bfloat16)
    ids, weights = routing(7, 4)
    with torch.no_grad(), no_fallback():
        out = module(x, ids, weights)
    quantized = tx.convert_experts(source, weights="int8")
    assert torch.equal(quantized.fc1_expert_weights, module.cutlass_moe_fc1)
    assert rel_l2(out.float(), reference_of(quantized, x, ids, weights, torch.float32)) <= 4e-3
    exact = eager_experts(source.double(), x.double(), ids, weights.double())
    assert rel_l2(out.float(), exact) <= 3e-2  # int8 weights


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_prepared_model_falls_back_on_rebuilt_weights(family):
    """A prepared model on CPU (no CUDA): the eager forward runs on weights rebuilt from the
    converted buffers, which equal the originals exactly."""
    model = tiny_model(family, torch.bfloat16)
    original = tiny_model(family, torch.bfloat16)
    tx.prepare(model, weights="bf16")
    tokens = torch.randint(0, 64, (2, 5))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model(tokens).logits
    assert "CUDA" in fallback_warnings(record)[0]
    with torch.no_grad():
        assert torch.equal(out, original(tokens).logits)
    _, module = tx.experts_modules(model)[0]
    assert not hasattr(module, "gate_up_proj")  # lent for the call only


def test_prepare_arguments():
    model = tiny_model("mixtral", torch.bfloat16)
    with pytest.raises(ValueError, match="must divide both H=32 and I=32"):
        tx.prepare(model, weights="int4", group_size=128)
    with pytest.raises(ValueError, match="group_size"):
        tx.prepare(model, weights="int8", group_size=128)
    with pytest.raises(ValueError, match="weights must be"):
        tx.prepare(model, weights="fp4")
    with pytest.raises(ValueError, match="must divide both"):  # fp8's default group: 128
        tx.prepare(model, weights="fp8")
    with pytest.raises(ValueError, match=r"torch\.bfloat16.*dtype=torch\.float16"):
        tx.prepare(model, weights="fp16")
    with pytest.raises(ValueError, match="float32"):
        tx.prepare(tiny_model("mixtral", torch.float32), weights="int8")
    with pytest.raises(ValueError, match="multiples of 16"):
        tx.prepare(tiny_model("olmoe", torch.bfloat16, intermediate_size=24), weights="int8")
    with pytest.raises(ValueError, match="no transformers experts"):
        tx.prepare(torch.nn.Linear(4, 4))
    # Nothing was changed by the refused calls.
    assert all(hasattr(m, "gate_up_proj") for _, m in tx.experts_modules(model))
    tx.prepare(model, weights="bf16")
    tx.prepare(model, weights="bf16")  # again: nothing to do
    with pytest.raises(ValueError, match="already prepared"):
        tx.prepare(model, weights="int8")


def test_prepare_leaves_modules_it_cannot_map(fake_cpu):
    model = tiny_model("mixtral", torch.bfloat16, hidden_act="mish")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = tx.prepare(model)
    assert all(value.startswith("eager: ") for value in report.values())
    assert len(fallback_warnings(record)) == 1
    assert all(hasattr(m, "gate_up_proj") for _, m in tx.experts_modules(model))
    assert model.config._experts_implementation == "cutlass_moe"
    tokens = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        out = model(tokens).logits
        model.set_experts_implementation("eager")
        assert torch.equal(out, model(tokens).logits)
