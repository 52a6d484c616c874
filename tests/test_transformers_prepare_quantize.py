"""``prepare(model, weights="int4" | "fp8" | "mxfp4")`` on 16-bit transformers experts (CPU).

What is tested: the buffers against quantisations written here from the formats' descriptions
(int4: symmetric round-to-nearest ``s = max(max(w) / 7, -min(w) / 8)`` in the weights' dtype,
``q + 8`` packed low nibble first; fp8: e4m3 of ``w / s`` with ``s = max|w| / 448`` per row and
group; mxfp4: the OCP rule ``2^(floor(log2(max|w|)) - 2)``, e2m1 round to nearest even), with
exact bytes for a hand-made int4 group; the arguments the op receives (flags, scale dtypes and
shapes, biases, activation parameters); the originals' storages freed; the argument errors
(bad group sizes, kinds that take none, re-preparing differently) leaving the model unchanged;
the fallback on CPU (the eager forward on the dequantised weights, bit for bit) and the layer
through the fake extension, for gated, ungated, biased and clamped activations; and the claim
that MXFP4 re-quantisation of gpt-oss loaded dequantised to bf16 is lossless, on random blocks
and through a tiny MXFP4 checkpoint loaded with ``Mxfp4Config(dequantize=True)``.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cutlass_moe.integrations.transformers as tx
from _helpers import rel_l2
from cutlass_moe.mxfp4 import quantize_mxfp4
from test_transformers import fallback_warnings, no_fallback, routing

#: bf16 bound of the op tests, per comparison with float32 math.
BF16_TOL = 1e-2
E = 4
#: e2m1 magnitudes of codes 0..7 (codes 8..15: the same, negative).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    tx._warned.clear()
    yield
    tx._warned.clear()


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def make_config(family: str, hidden: int = 64, inter: int = 64, layers: int = 1, **extra):
    common = {"vocab_size": 64, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **extra}
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=inter,
                                          num_local_experts=E, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=2 * inter,
                                           moe_intermediate_size=inter, num_experts=E,
                                           num_experts_per_tok=2, decoder_sparse_step=1)
    if family == "gpt_oss":
        return transformers.GptOssConfig(**common, intermediate_size=inter,
                                         num_local_experts=E, num_experts_per_tok=2)
    raise KeyError(family)


def model_of(family: str, dtype=torch.bfloat16, seed: int = 0, **kwargs):
    """A tiny random model (eager experts) whose expert tensors, biases included, are random."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        make_config(family, **kwargs), experts_implementation="eager").to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in tx.experts_modules(model):
            for p in module.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def two_copies(family: str, **kwargs):
    return model_of(family, **kwargs), model_of(family, **kwargs)


class Holder(torch.nn.Module):
    """A container for a lone experts module (prepare takes any module holding them)."""

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.experts = experts


def lone_experts(kind: str, dtype=torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """Experts modules of other activations: tanh-GELU and exact-GELU gated (Mixtral with
    another ``hidden_act``) and ungated ReLU^2 (Nemotron-H)."""
    if kind == "nemotron_h":
        from transformers.models.nemotron_h import modeling_nemotron_h
        cfg = transformers.NemotronHConfig(hidden_size=64, moe_intermediate_size=32,
                                           n_routed_experts=E, num_experts_per_tok=2)
        module = modeling_nemotron_h.NemotronHExperts(cfg)
    else:
        from transformers.models.mixtral import modeling_mixtral
        module = modeling_mixtral.MixtralExperts(make_config("mixtral", hidden_act=kind))
    module = module.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    module.config._experts_implementation = "cutlass_moe"
    return module


# ------------------------------------------------------------------------------------------
# The layout and the formats, written here from their descriptions
# ------------------------------------------------------------------------------------------


def kernel_layout(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fc1 ``[E, N1, H]`` rows ``[up; gate]`` (or ``up_proj``), fc2 ``[E, H, I]`` and the fc1
    bias ordered like fc1's rows, from transformers' tensors (gpt-oss: transposed, gate/up
    interleaved)."""
    if not module.has_gate:
        return module.up_proj.detach(), module.down_proj.detach(), None
    w1, w2 = module.gate_up_proj.detach(), module.down_proj.detach()
    b1 = getattr(module, "gate_up_proj_bias", None)
    if module.is_transposed:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    if module.is_concatenated:
        gate, up = w1.chunk(2, dim=1)
        bias = None if b1 is None else torch.cat(b1.detach().chunk(2, dim=1)[::-1], dim=1)
    else:
        gate, up = w1[:, 0::2], w1[:, 1::2]
        bias = None if b1 is None else torch.cat((b1[:, 1::2], b1[:, 0::2]), dim=1).detach()
    return torch.cat((up, gate), dim=1).contiguous(), w2.contiguous(), bias


def hf_layout(module, fc1: torch.Tensor, fc2: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of kernel_layout for the weights: transformers' names and layout."""
    if not module.has_gate:
        return {"up_proj": fc1, "down_proj": fc2}
    up, gate = fc1.chunk(2, dim=1)
    if module.is_concatenated:
        w1 = torch.cat((gate, up), dim=1)
    else:
        w1 = torch.stack((gate, up), dim=2).flatten(1, 2)
    if module.is_transposed:
        w1, fc2 = w1.transpose(1, 2), fc2.transpose(1, 2)
    return {"gate_up_proj": w1.contiguous(), "down_proj": fc2.contiguous()}


def pack(q: torch.Tensor) -> torch.Tensor:
    """Nibbles ``[.., K]`` two per byte: ``k = 2j`` in the low half of byte ``j``."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def int4_quantize(w: torch.Tensor, group: int):
    """Symmetric int4, round to nearest even: ``s = max(max(w) / 7, -min(w) / 8)`` per group
    (0 counts as neither) rounded to w's dtype (1 for an all-zero group),
    ``q = clamp(round(w / s), -8, 7) + 8``. Returns packed ``[E, N, K/2]``, scales
    ``[E, K/G, N]`` and the dequantised weights ``(q - 8) * s`` in w's dtype."""
    e, n, k = w.shape
    g = w.double().reshape(e, n, k // group, group)
    pos, neg = g.amax(-1).clamp_min(0), (-g.amin(-1)).clamp_min(0)
    exact = torch.maximum(pos / 7, neg / 8)
    s = exact.to(w.dtype).double()
    # Normal scales map the extremes to at most 7.03 / 8.04: no rounding step up needed here.
    assert bool(((s * 7.5 >= pos) & (s * 8.5 >= neg)).all())
    s = torch.where(exact == 0, torch.ones_like(s), s)
    q = ((g / s.unsqueeze(-1)).round().clamp(-8, 7) + 8).reshape(e, n, k)
    dequantised = ((q.reshape(e, n, k // group, group) - 8) * s.unsqueeze(-1)).reshape(e, n, k)
    return pack(q), s.to(w.dtype).transpose(1, 2).contiguous(), dequantised.to(w.dtype)


def fp8_quantize(w: torch.Tensor, group: int):
    """e4m3 per row and group: ``s = max|w| / 448`` as float32 (one step up where it rounded
    below, 1 for zeros), ``v = e4m3(w / s)`` (float32 division, round to nearest even).
    Returns the codes, float32 scales ``[E, K/G, N]`` and ``v * s`` in w's dtype."""
    e, n, k = w.shape
    g = w.reshape(e, n, k // group, group)
    amax = g.double().abs().amax(-1)
    s = (amax / 448).float()
    s = torch.where(s.double() * 448 < amax, torch.nextafter(s, torch.tensor(float("inf"))), s)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    v = (g.float() / s.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    dequantised = (v.float() * s.unsqueeze(-1)).reshape(e, n, k).to(w.dtype)
    return v.reshape(e, n, k), s.transpose(1, 2).contiguous(), dequantised


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each value (ties to the even code, magnitudes beyond 6 to 6,
    results of 0 as +0)."""
    magnitudes = torch.tensor(E2M1, dtype=torch.float64)
    distance = (scaled.abs().unsqueeze(-1) - magnitudes).abs()
    distance = distance + torch.tensor([0.0, 1e-9] * 4, dtype=torch.float64)  # ties: even code
    index = distance.argmin(-1)
    return torch.where((scaled < 0) & (index > 0), index + 8, index)


def mxfp4_quantize(w: torch.Tensor):
    """OCP MXFP4: per 32 along K, ``X = 2^(floor(log2(max|w|)) - 2)`` (e8m0 byte
    ``log2(X) + 127``, 127 for an all-zero block), codes of ``w / X``. Returns packed
    ``[E, N, K/2]`` and e8m0 bytes ``[E, K/32, N]``."""
    e, n, k = w.shape
    g = w.double().reshape(e, n, k // 32, 32)
    amax = g.abs().amax(-1)
    shared = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax))
    shared = shared.clamp(-127, 127)
    codes = e2m1_codes(g / torch.exp2(shared).unsqueeze(-1)).reshape(e, n, k)
    return pack(codes), (shared + 127).to(torch.uint8).transpose(1, 2).contiguous()


def mxfp4_values(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 ``e2m1 * 2^(x - 127)`` of packed ``[.., N, K/2]`` and bytes ``[.., K/32, N]``."""
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float64)
    values = table[unpack(packed).long()]
    scale = torch.exp2(scales.double() - 127).transpose(-1, -2).repeat_interleave(32, dim=-1)
    return values * scale


def expected_buffers(module, weights: str, group: int | None):
    """``{buffer suffix: tensor}`` and the dequantised fc1/fc2 for one module."""
    fc1, fc2, _ = kernel_layout(module)
    out, dequantised = {}, []
    for name, w in (("fc1", fc1), ("fc2", fc2)):
        if weights == "int4":
            out[name], out[name + "_scale"], d = int4_quantize(w, group)
        elif weights == "fp8":
            out[name], out[name + "_scale"], d = fp8_quantize(w, group)
        else:
            out[name], out[name + "_scale"] = mxfp4_quantize(w)
            d = mxfp4_values(out[name], out[name + "_scale"]).to(w.dtype)
        dequantised.append(d)
    return out, dequantised


def dequantised_model(model, weights: str, group: int | None):
    """``model`` with every experts module's weights replaced (in place) by their
    quantisation's dequantised values, in transformers' layout."""
    with torch.no_grad():
        for _, module in tx.experts_modules(model):
            _, (d1, d2) = expected_buffers(module, weights, group)
            for name, t in hf_layout(module, d1, d2).items():
                getattr(module, name).copy_(t)
    return model


def assert_same_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape,
                                                                  want.dtype, want.shape)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), what


GROUP = {"int4": 32, "fp8": 32, "mxfp4": None}
SCALE_DTYPE = {"int4": torch.bfloat16, "fp8": torch.float32, "mxfp4": torch.uint8}
WEIGHT_DTYPE = {"int4": torch.uint8, "fp8": torch.float8_e4m3fn, "mxfp4": torch.uint8}
FLAG = {"int4": "use_w4_group_scaling", "fp8": "use_fp8_woq_group_scaling",
        "mxfp4": "use_w4_group_scaling"}


# ------------------------------------------------------------------------------------------
# The buffers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("weights", ["int4", "fp8", "mxfp4"])
def test_buffers_equal_an_independent_quantisation(weights, family):
    inter = 32 if family == "gpt_oss" else 64
    model, original = two_copies(family, inter=inter)
    group = GROUP[weights]
    report = tx.prepare(model, weights=weights, group_size=group)
    form = {"gpt_oss": "Swiglu (swiglu_alpha=1.702, swiglu_beta=1, swiglu_limit=7), gate/up "
                       "interleaved"}.get(family, "Swiglu")
    described = f"cutlass_moe: {form}, {weights} weights" + (
        f" (group {group})" if group else "")
    assert set(report.values()) == {described}
    pairs = list(zip(tx.experts_modules(model), tx.experts_modules(original), strict=True))
    for (_, module), (_, source) in pairs:
        want, _ = expected_buffers(source, weights, group)
        for name, t in want.items():
            assert_same_bytes(getattr(module, "cutlass_moe_" + name), t, f"{family} {name}")
        h, i = source.down_proj.shape[1:] if not source.is_transposed else (
            source.down_proj.shape[2], source.down_proj.shape[1])
        g = group or 32
        assert module.cutlass_moe_fc1_scale.shape == (E, h // g, 2 * i)
        assert module.cutlass_moe_fc2_scale.shape == (E, i // g, h)
        assert module.cutlass_moe_fc1.dtype == WEIGHT_DTYPE[weights]
        assert module.cutlass_moe_fc1_scale.dtype == SCALE_DTYPE[weights]
        if family == "gpt_oss":  # biases stay 16-bit, reordered like fc1's rows
            _, _, bias = kernel_layout(source)
            assert torch.equal(module.cutlass_moe_fc1_bias, bias)
            assert torch.equal(module.cutlass_moe_fc2_bias, source.down_proj_bias)
        # convert_experts makes the same quantisation.
        converted = tx.convert_experts(source, weights=weights, group_size=group)
        assert converted.weight_format == weights
        assert_same_bytes(converted.fc1_expert_weights, module.cutlass_moe_fc1, "convert")


def test_int4_bytes_and_scale_of_a_known_group():
    """Exact values: one fc1 row holding 0.7 at k = 0, -0.8 at k = 1 and zeros: the scale is
    -min / 8 = 0.80078125 / 8 (bf16(0.8) / 8, above bf16(0.7) / 7), k = 0 gives
    round(6.985) + 8 = 15 in the LOW nibble of byte 0, k = 1 gives -8 + 8 = 0 in its high
    nibble, zeros give 8 (byte 0x88)."""
    model = model_of("mixtral")
    _, module = tx.experts_modules(model)[0]
    inter = module.down_proj.shape[2]
    with torch.no_grad():
        module.gate_up_proj[0, inter, :32] = 0  # up row 0 (transformers: gate rows first)
        module.gate_up_proj[0, inter, 0] = 0.7
        module.gate_up_proj[0, inter, 1] = -0.8
    tx.prepare(model, weights="int4", group_size=32)
    fc1, scale = module.cutlass_moe_fc1, module.cutlass_moe_fc1_scale
    assert fc1[0, 0, 0].item() == 0x0F
    assert fc1[0, 0, 1:16].tolist() == [0x88] * 15
    assert scale[0, 0, 0].item() == 0.80078125 / 8 == 0.10009765625
    assert scale.dtype == torch.bfloat16


def test_default_group_is_128():
    model, original = two_copies("mixtral", hidden=128, inter=128)
    report = tx.prepare(model, weights="int4")
    assert set(report.values()) == {"cutlass_moe: Swiglu, int4 weights (group 128)"}
    _, module = tx.experts_modules(model)[0]
    assert module.cutlass_moe_fc1_scale.shape == (E, 1, 256)
    want, _ = expected_buffers(tx.experts_modules(original)[0][1], "int4", 128)
    assert_same_bytes(module.cutlass_moe_fc1, want["fc1"], "fc1")
    model = model_of("mixtral", hidden=128, inter=256)
    tx.prepare(model, weights="fp8")
    _, module = tx.experts_modules(model)[0]
    assert module.cutlass_moe_fc1_scale.shape == (E, 1, 512)
    assert module.cutlass_moe_fc2_scale.shape == (E, 2, 128)


# ------------------------------------------------------------------------------------------
# What the op receives, memory, errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("weights", ["int4", "fp8", "mxfp4"])
def test_the_op_receives_the_format_arguments(weights, family, fake_cpu, monkeypatch):
    model = model_of(family, inter=32)
    tx.prepare(model, weights=weights, group_size=GROUP[weights])
    _, module = tx.experts_modules(model)[0]
    seen = {}

    def op(x, ids, scales, fc1, fc2, out_dtype, **kwargs):
        seen.update(kwargs, fc1=fc1, fc2=fc2, out_dtype=out_dtype)
        return (torch.zeros_like(x),)

    monkeypatch.setattr(tx, "cutlass_fused_moe", op)
    with torch.no_grad(), no_fallback():
        module(torch.randn(3, 64, dtype=torch.bfloat16), *routing(3, E))
    assert seen[FLAG[weights]] is True
    others = {"use_int8_woq_per_channel", "use_w4_group_scaling", "use_fp8_woq_group_scaling"}
    assert not any(seen.get(flag) for flag in others - {FLAG[weights]})
    assert seen["fc1"] is module.cutlass_moe_fc1 and seen["fc2"] is module.cutlass_moe_fc2
    s1, s2 = seen["quant_scales"]
    assert s1 is module.cutlass_moe_fc1_scale and s2 is module.cutlass_moe_fc2_scale
    assert s1.dtype == s2.dtype == SCALE_DTYPE[weights]
    assert seen["out_dtype"] == torch.bfloat16
    if family == "gpt_oss":
        assert seen["fc1_expert_biases"] is module.cutlass_moe_fc1_bias
        assert seen["fc2_expert_biases"].dtype == torch.bfloat16
        assert seen["swiglu_alpha"].dtype == torch.float32
        assert torch.equal(seen["swiglu_limit"], torch.full((E,), 7.0))
    else:
        assert seen["fc1_expert_biases"] is None


@pytest.mark.parametrize("weights", ["int4", "fp8", "mxfp4"])
def test_prepare_frees_the_originals(weights):
    model = model_of("qwen3_moe", inter=32)
    storages = [weakref.ref(p.untyped_storage()) for _, m in tx.experts_modules(model)
                for p in m.parameters(recurse=False)]
    before = sum(p.nbytes for _, m in tx.experts_modules(model)
                 for p in m.parameters(recurse=False))
    tx.prepare(model, weights=weights, group_size=GROUP[weights])
    gc.collect()
    assert all(ref() is None for ref in storages)
    for _, module in tx.experts_modules(model):
        assert not list(module.parameters(recurse=False))
    after = sum(b.nbytes for _, m in tx.experts_modules(model) for b in m.buffers(recurse=False))
    assert after < (0.6 if weights == "fp8" else 0.35) * before


def _untouched(model) -> bool:
    return all(hasattr(m, "gate_up_proj") and tx._PLAN_ATTR not in m.__dict__
               for _, m in tx.experts_modules(model))


def test_argument_errors_change_nothing():
    model = model_of("mixtral", hidden=64, inter=96)
    bad_groups = {48: "multiple of 32", 0: "multiple of 32", -32: "multiple of 32",
                  True: "multiple of 32", 32.0: "multiple of 32",
                  64: r"divide both H=64 and I=96.*group_size=32 does",
                  128: "divide both"}
    for weights in ("int4", "fp8"):
        for group, message in bad_groups.items():
            with pytest.raises(ValueError, match=message):
                tx.prepare(model, weights=weights, group_size=group)
    for weights, group in (("bf16", 32), ("int8", 128), ("mxfp4", 64)):
        with pytest.raises(ValueError, match="group_size applies to"):
            tx.prepare(model, weights=weights, group_size=group)
    with pytest.raises(ValueError, match="divide both"):
        tx.prepare(model, weights="int4")  # the default 128 does not divide 64 or 96
    with pytest.raises(ValueError, match="float32"):
        tx.prepare(model_of("mixtral", torch.float32), weights="int4", group_size=32)
    with pytest.raises(ValueError, match="multiples of 32"):
        tx.prepare(model_of("mixtral", inter=48), weights="mxfp4")
    nan = model_of("mixtral")
    with torch.no_grad():
        nan.model.layers[0].mlp.experts.down_proj[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        tx.prepare(nan, weights="fp8", group_size=32)
    assert _untouched(nan)
    with pytest.raises(ValueError, match="group_size applies"):
        tx.convert_experts(tx.experts_modules(model)[0][1], weights="mxfp4", group_size=64)
    assert _untouched(model)


def test_reprepare_differently_raises():
    model = model_of("mixtral")
    first = tx.prepare(model, weights="int4", group_size=32)
    assert tx.prepare(model, weights="int4", group_size=32) == first  # the same: nothing to do
    for weights, group in (("int4", 64), ("int4", None), ("fp8", 32), ("mxfp4", None),
                           ("int8", None), ("bf16", None)):
        with pytest.raises(ValueError, match="already prepared"):
            tx.prepare(model, weights=weights, group_size=group)
    model = model_of("mixtral")
    tx.prepare(model, weights="mxfp4", group_size=32)  # 32: MXFP4's own group
    assert tx.prepare(model, weights="mxfp4") == tx.prepare(model, weights="mxfp4")
    with pytest.raises(ValueError, match="already prepared"):
        tx.prepare(model, weights="int4", group_size=32)


# ------------------------------------------------------------------------------------------
# The forward: fallback on the dequantised weights, and the layer through the fake extension
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("weights", ["int4", "fp8", "mxfp4"])
def test_fallback_runs_the_eager_forward_on_the_dequantised_weights(weights, family):
    """On CPU (no CUDA) a prepared model falls back: its logits equal, bit for bit, those of
    the original model whose expert weights were replaced by the dequantised ones."""
    model, reference = two_copies(family, inter=32, layers=2)
    group = GROUP[weights]
    dequantised_model(reference, weights, group)
    tx.prepare(model, weights=weights, group_size=group)
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model(tokens).logits
        expected = reference(tokens).logits
    assert "CUDA" in fallback_warnings(record)[0]
    assert torch.equal(out, expected)
    _, module = tx.experts_modules(model)[0]
    assert not hasattr(module, "gate_up_proj")  # lent for the call only


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("weights", ["int4", "fp8", "mxfp4"])
def test_logits_through_the_fake_extension(weights, family, fake_cpu):
    model, reference = two_copies(family, inter=32, layers=2)
    group = GROUP[weights]
    dequantised_model(reference, weights, group)
    tx.prepare(model, weights=weights, group_size=group)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), no_fallback():
        out = model(tokens).logits.float()
    with torch.no_grad():
        expected = reference(tokens).logits.float()
    # Same weights; the fake computes in float32, eager in bf16: the op tests' bf16 bound.
    assert rel_l2(out, expected) <= BF16_TOL
    from _fake_ext import ENUM_TO_FORMAT, FakeMoeRunner
    assert weights in {ENUM_TO_FORMAT.get(w) for _, w, _ in FakeMoeRunner.constructed}


@pytest.mark.parametrize("activation,form", [("gelu_pytorch_tanh", "GegluTanh"),
                                             ("gelu", "Geglu"), ("nemotron_h", "Relu2")])
@pytest.mark.parametrize("weights", ["int4", "fp8", "mxfp4"])
def test_other_activations(weights, activation, form, fake_cpu, monkeypatch):
    """Gated GELU variants and ungated ReLU^2 (Nemotron-H): through the fake extension, and in
    the fallback, against the eager experts on the dequantised weights."""
    module = lone_experts(activation)
    reference = lone_experts(activation)
    group = GROUP[weights]
    dequantised_model(Holder(reference), weights, group)
    holder = Holder(module)
    report = tx.prepare(holder, weights=weights, group_size=group)
    assert report["experts"].startswith(f"cutlass_moe: {form}, {weights} weights")
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(9, 64, generator=gen) * 2).to(torch.bfloat16)
    ids, scales = routing(9, E)
    with torch.no_grad():
        expected = tx._eager_forward(reference)(reference, x, ids, scales.to(torch.bfloat16))
        with no_fallback():
            out = module(x, ids, scales)
        assert rel_l2(out.float(), expected.float()) <= BF16_TOL
        def no_cuda(device):
            raise RuntimeError("needs CUDA")

        monkeypatch.setattr(tx.validation, "require_cuda", no_cuda)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            fallback = module(x, ids, scales.to(torch.bfloat16))
    assert torch.equal(fallback, expected)


# ------------------------------------------------------------------------------------------
# gpt-oss: MXFP4 re-quantisation of the bf16 weights transformers dequantised is lossless
# ------------------------------------------------------------------------------------------


def random_blocks(rows_per_case: int = 64, scale_bytes=(100, 141), seed: int = 0):
    """Random MXFP4 blocks ``codes [R, 32]`` (0..15) and scale bytes ``[R]``: for each largest
    magnitude 0.5, 1, 1.5, 2, 3, 4, 6 ``rows_per_case`` blocks whose codes do not exceed it and
    hold it once (either sign), plus all-zero blocks (+0 and -0 codes) and unconstrained ones."""
    gen = torch.Generator().manual_seed(seed)
    codes, largest = [], []
    for top in range(1, 8):
        c = torch.randint(0, top + 1, (rows_per_case, 32), generator=gen)
        c = torch.where(torch.rand(c.shape, generator=gen) < 0.5, c, c + 8)
        position = torch.randint(0, 32, (rows_per_case,), generator=gen)
        sign = torch.randint(0, 2, (rows_per_case,), generator=gen) * 8
        c[torch.arange(rows_per_case), position] = top + sign
        codes.append(c)
        largest += [top] * rows_per_case
    codes.append(torch.randint(0, 2, (rows_per_case, 32), generator=gen) * 8)  # +-0
    largest += [0] * rows_per_case
    codes.append(torch.randint(0, 16, (rows_per_case, 32), generator=gen))
    largest += [-1] * rows_per_case
    codes = torch.cat(codes)
    x = torch.randint(scale_bytes[0], scale_bytes[1], (codes.shape[0],), generator=gen)
    return codes.to(torch.uint8), x.to(torch.uint8), torch.tensor(largest)


def values_of(codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 ``e2m1(code) * 2^(x - 127)`` of unpacked codes ``[R, 32]`` and bytes ``[R]``."""
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float64)
    return table[codes.long()] * torch.exp2(x.double() - 127).unsqueeze(-1)


@pytest.mark.parametrize("dtype,scale_bytes", [(torch.bfloat16, (100, 141)),
                                               (torch.bfloat16, (0, 253)),
                                               (torch.float16, (127 - 23, 127 + 14))])
def test_mxfp4_requantisation_of_dequantised_blocks_is_lossless(dtype, scale_bytes):
    codes, x, largest = random_blocks(scale_bytes=scale_bytes)
    exact = values_of(codes, x)
    loaded = exact.to(dtype)
    assert torch.equal(loaded.double(), exact)  # the dequantisation is exact in this dtype
    # ... and is what transformers' own gpt-oss dequantiser gives ([.., G, 16] blocks).
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    hf = convert_moe_packed_tensors(pack(codes).view(1, 1, -1, 16), x.view(1, 1, -1),
                                    dtype=dtype)  # [1, K, 1] (transposed)
    assert torch.equal(hf.view(-1), loaded.view(-1))
    packed, scales = quantize_mxfp4(loaded)  # [R, 16], [1, R]
    again = values_of(unpack(packed), scales.view(-1))
    assert torch.equal(again, exact)  # identical values (-0 and +0 compare equal)
    # Where the largest code is 4 or 6 the scale and the codes are the checkpoint's (-0 as +0);
    # with a smaller one the scale is 2^1..2^3 smaller, clamped at byte 0.
    new_x, new_codes = scales.view(-1).long(), unpack(packed).long()
    plain = torch.where(codes == 8, torch.zeros_like(codes), codes).long()
    big = (largest == 6) | (largest == 7)
    assert torch.equal(new_x[big], x.long()[big]) and torch.equal(new_codes[big], plain[big])
    for top, step in ((1, 3), (2, 2), (3, 2), (4, 1), (5, 1)):
        rows = largest == top
        assert torch.equal(new_x[rows], (x.long()[rows] - step).clamp_min(0)), top
    zero = largest == 0
    assert bool((new_x[zero] == 127).all()) and bool((new_codes[zero] == 0).all())


def test_mxfp4_overflowing_bf16_is_refused():
    """Scale byte 254 times code 6 overflows bf16 at load (inf): prepare raises and changes
    nothing."""
    model = model_of("gpt_oss", inter=32)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[0, 0, 0] = values_of(
            torch.tensor([[7]]), torch.tensor([254])).to(torch.bfloat16).item()
    assert torch.isinf(model.model.layers[0].mlp.experts.down_proj[0, 0, 0])
    with pytest.raises(ValueError, match="NaN or inf"):
        tx.prepare(model, weights="mxfp4")
    assert _untouched(model)


def write_mxfp4_checkpoint(path: str, hidden: int = 64, inter: int = 64, layers: int = 2,
                           seed: int = 0):
    """A tiny gpt-oss checkpoint in the MXFP4 format (``*_proj_blocks`` uint8
    ``[E, N, K/32, 16]``, ``*_proj_scales`` uint8 ``[E, N, K/32]``, ``quant_method: mxfp4``).
    Layer 0's blocks are normalised (largest magnitude 4 or 6, no -0 code) so that re-quantised
    codes must equal them byte for byte; the other layers' codes are unconstrained. Returns
    ``{layer: (gate_up codes [E, 2I, H], gate_up bytes [E, 2I, H/32], down codes, down
    bytes)}``."""
    from safetensors.torch import save_file

    cfg = make_config("gpt_oss", hidden=hidden, inter=inter, layers=layers)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    tensors, generated = {}, {}

    def codes_of(n, k, normalised):
        c = torch.randint(0, 16, (E, n, k), generator=gen)
        if normalised:
            c = torch.where(c == 8, torch.zeros_like(c), c)
            blocks = c.view(E, n, k // 32, 32)
            top = 6 + torch.randint(0, 2, blocks.shape[:-1], generator=gen)  # 4 or 6
            top = top + 8 * torch.randint(0, 2, blocks.shape[:-1], generator=gen)
            blocks[..., 0] = top
        return c.to(torch.uint8)

    for key, value in model.state_dict().items():
        if key.endswith(("gate_up_proj", "down_proj")) and ".experts." in key:
            layer = int(key.split(".")[2])
            n, k = (2 * inter, hidden) if key.endswith("gate_up_proj") else (hidden, inter)
            c = codes_of(n, k, layer == 0)
            x = torch.randint(112, 130, (E, n, k // 32), generator=gen).to(torch.uint8)
            tensors[key + "_blocks"] = pack(c).view(E, n, k // 32, 16).contiguous()
            tensors[key + "_scales"] = x
            generated.setdefault(layer, []).extend((c, x))
        elif key.endswith("bias") and ".experts." in key:
            tensors[key] = (torch.randn(value.shape, generator=gen) * 0.3).to(value.dtype)
        else:
            tensors[key] = value.contiguous()
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    model.config.quantization_config = {"quant_method": "mxfp4"}
    model.config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return generated


def load_dequantised(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, experts_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()


def kernel_codes(codes: torch.Tensor, x: torch.Tensor, gated: bool):
    """A checkpoint's codes ``[E, N, K]`` and bytes ``[E, N, K/32]`` in the kernel layout:
    packed ``[E, N, K/2]`` (gate_up rows interleaved gate/up -> ``[up; gate]``) and scales
    ``[E, K/32, N]``."""
    if gated:
        codes = torch.cat((codes[:, 1::2], codes[:, 0::2]), dim=1)
        x = torch.cat((x[:, 1::2], x[:, 0::2]), dim=1)
    return pack(codes), x.transpose(1, 2).contiguous()


def test_gpt_oss_mxfp4_checkpoint_loaded_dequantised_prepares_losslessly(tmp_path, fake_cpu):
    pytest.importorskip("safetensors")
    if "dequantize" not in transformers.Mxfp4Config.__init__.__code__.co_varnames:
        pytest.skip("this transformers' Mxfp4Config has no dequantize")
    generated = write_mxfp4_checkpoint(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, reference = load_dequantised(str(tmp_path)), load_dequantised(str(tmp_path))
    experts = [m for _, m in tx.experts_modules(model)]
    assert all(type(m).__name__ == "GptOssExperts" for m in experts)
    assert experts[0].gate_up_proj.dtype == torch.bfloat16
    report = tx.prepare(model, weights="mxfp4")
    assert all("mxfp4 weights" in v for v in report.values())
    for layer, module in enumerate(experts):
        gate_up, gate_up_x, down, down_x = generated[layer]
        for name, (c, x, gated) in (("fc1", (gate_up, gate_up_x, True)),
                                    ("fc2", (down, down_x, False))):
            want_packed, want_scales = kernel_codes(c, x, gated)
            got_packed = getattr(module, f"cutlass_moe_{name}")
            got_scales = getattr(module, f"cutlass_moe_{name}_scale")
            if layer == 0:  # normalised blocks: the checkpoint's bytes themselves
                assert torch.equal(got_packed, want_packed) and torch.equal(
                    got_scales, want_scales), name
            else:  # any blocks: the same values
                assert torch.equal(mxfp4_values(got_packed, got_scales),
                                   mxfp4_values(want_packed, want_scales)), name
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), no_fallback():
        out = model(tokens).logits.float()
    with torch.no_grad():
        expected = reference(tokens).logits.float()
    assert rel_l2(out, expected) <= BF16_TOL


def test_mxfp4_gpt_oss_error_names_the_dequantize_route():
    from transformers.integrations import mxfp4 as hf_mxfp4
    cfg = make_config("gpt_oss")
    message = str(tx._mxfp4_error())
    assert "Mxfp4Config(dequantize=True)" in message and "weights='mxfp4'" in message
    # The names the message gives exist in this transformers.
    assert transformers.Mxfp4Config(dequantize=True).dequantize is True
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.model.layers[0].mlp.experts = hf_mxfp4.Mxfp4GptOssExperts(cfg)
    with pytest.raises(NotImplementedError, match=r"Mxfp4Config\(dequantize=True\)"):
        tx.prepare(model, weights="mxfp4")


@pytest.mark.parametrize("weights", ["fp8", "mxfp4"])
def test_fp8_and_mxfp4_take_any_16bit_activations_without_biases(weights, fake_cpu,
                                                                 monkeypatch):
    """fp8/mxfp4 scales are float32/e8m0: float16 activations also run the unbiased experts of
    a bf16-prepared model; with biases (gpt-oss) the activations must have the biases' dtype
    (other ones fall back, naming the dtypes)."""
    plain, biased = model_of("mixtral", inter=32), model_of("gpt_oss", inter=32)
    for model in (plain, biased):
        tx.prepare(model, weights=weights, group_size=GROUP[weights])
    calls = []

    def op(x, *args, **kwargs):
        calls.append(x.dtype)
        return (torch.zeros_like(x),)

    monkeypatch.setattr(tx, "cutlass_fused_moe", op)
    x = torch.randn(2, 64, dtype=torch.float16)
    with torch.no_grad(), no_fallback():
        tx.experts_modules(plain)[0][1](x, *routing(2, E))
    assert calls == [torch.float16]
    calls.clear()
    module = tx.experts_modules(biased)[0][1]
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            module(x, *routing(2, E))
        except RuntimeError:  # the eager forward itself mixes float16 and bfloat16
            pass
    assert calls == []
    assert "converted weights torch.bfloat16" in fallback_warnings(record)[0]
