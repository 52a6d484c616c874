"""FlashInfer 0.7's activations on a GPU: Relu2, ClampedRelu2, GegluTanh, SwigluStep,
Situ and SwigluBias through every tactic that can run them, against reference_moe (float32) and
against the explicit formulas of tests/_activation_formulas.py (float64), with per-expert (and
model-wide) parameters, fp16 and bf16, NaN-poisoned outputs; docs/architecture.md,
"Correctness" and "Activations".

Tactics: every plain GEMM1 tactic (followed by the activation kernel), every fused gated GEMM1
tactic (``sm80_gated_*``, gated activations) and every decode GEMM1 tactic (``desc["decode"]``)
that tactics.candidates offers for the activation, each with the default GEMM2.
"""

from __future__ import annotations

import functools

import pytest
import torch

from _activation_formulas import FLASHINFER_GATED, NEW, naive_layer
from _helpers import random_tokens, record_error, rel_l2
from cutlass_moe import (
    ActivationType,
    _ext,
    autotune,
    cutlass_fused_moe,
    reference_moe,
    tactics,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


@functools.lru_cache(maxsize=2)
def _weights(num_experts, hidden, inter, gated, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    n1 = 2 * inter if gated else inter
    fc1 = torch.randn(num_experts, n1, hidden, device=DEVICE, dtype=dtype, generator=gen)
    fc2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=dtype, generator=gen)
    return fc1.mul_(hidden**-0.5), fc2.mul_(inter**-0.5)


def _params(name, num_experts, seed):
    """Per-expert parameters that differ by expert and from FlashInfer's defaults, small enough
    that the clamps bite on N(0, ~1) GEMM1 outputs; ClampedRelu2's model-wide limit."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def draw(low, span):
        return torch.rand(num_experts, device=DEVICE, generator=gen) * span + low

    if name == "SwigluStep":
        return {"swiglu_limit": draw(0.5, 1.0)}
    if name == "Situ":
        return {"situ_beta": draw(0.5, 1.0), "situ_linear_beta": draw(1.0, 2.0)}
    if name == "ClampedRelu2":
        return {"clamped_relu2_limit": torch.tensor([0.75], device=DEVICE)}
    if name == "SwigluBias":
        return {"swiglu_alpha": draw(1.0, 1.0), "swiglu_beta": draw(0.0, 1.0),
                "swiglu_limit": draw(0.5, 1.0)}
    return {}


def _run(x, ids, scales, fc1, fc2, **kwargs):
    output = torch.full_like(x, float("nan"))
    result = cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, output=output, **kwargs)
    assert result[0] is output
    assert not output.isnan().any(), "some output elements were not written"
    return output


def _check(x, ids, scales, fc1, fc2, name, **kwargs):
    out = _run(x, ids, scales, fc1, fc2, activation_type=ActivationType[name], **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("tactics", "tune_max_num_tokens")}
    ref = reference_moe(x, ids, scales, fc1, fc2, ActivationType[name], **ref_kwargs)
    err = record_error(x.dtype, rel_l2(out.float(), ref))
    assert err <= TOLERANCE[x.dtype], f"{name} {kwargs.get('tactics')}: relative L2 {err:.3g}"
    return out, ref


def _gemm1_candidates(dtype, act, rows):
    return tactics.candidates((dtype, dtype, dtype), 1, act, torch.device(DEVICE), rows)


def _default_gemm2(dtype, act, num_tokens, top_k, num_experts):
    descs = tactics.candidates((dtype, dtype, dtype), 2, act, torch.device(DEVICE),
                               num_tokens * top_k)
    return tactics.default_tactic(descs, num_tokens * top_k / num_experts)


# ------------------------------------------------------------------ every tactic


_CASES = ["defaults", "params", "bias-params"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("case", _CASES)
@pytest.mark.parametrize("num_tokens", [1, 333])
def test_every_gemm1_tactic_matches_reference(dtype, name, case, num_tokens):
    """Shapes with K and N residues in every tile (H=2056, I=776) and uneven experts; each
    GEMM1 tactic that serves the activation, with the default GEMM2."""
    if name == "ClampedRelu2" and case == "defaults":
        pytest.skip("ClampedRelu2 has no default limit")
    num_experts, hidden, inter, top_k = 12, 2056, 776, 3
    gated = name in FLASHINFER_GATED
    act = ActivationType[name]
    fc1, fc2 = _weights(num_experts, hidden, inter, gated, dtype, seed=31)
    x, ids, scales = random_tokens(num_tokens, hidden, num_experts, top_k, dtype, 32, DEVICE)
    x = x * 2  # so that clamps and saturations are reached
    kwargs = {} if case == "defaults" else _params(name, num_experts, seed=33)
    if "bias" in case:
        gen = torch.Generator(device=DEVICE).manual_seed(34)
        kwargs["fc1_expert_biases"] = (
            torch.randn(fc1.shape[:2], device=DEVICE, generator=gen) * 0.5).to(dtype)
    descs = _gemm1_candidates(dtype, act, num_tokens * top_k)
    assert descs, f"no GEMM1 tactic serves {name}"
    if gated:
        assert any(d.get("gated") for d in descs), f"no fused gated GEMM1 tactic offers {name}"
    else:
        assert not any(d.get("gated") for d in descs)
    gemm2 = _default_gemm2(dtype, act, num_tokens, top_k, num_experts)
    outs = {}
    for desc in descs:
        outs[desc["name"]], _ = _check(x, ids, scales, fc1, fc2, name,
                                       tactics=(desc["name"], gemm2), **kwargs)
    # Every path rounds the same intermediates: they agree with each other within the bound.
    first = next(iter(outs.values()))
    for tactic, out in outs.items():
        assert rel_l2(out.float(), first.float()) <= TOLERANCE[dtype], tactic
    if case != "defaults" and name in ("SwigluStep", "Situ", "ClampedRelu2"):
        # The parameters were used: the output moved away from the defaults' (or Relu2's).
        other = ActivationType.Relu2 if name == "ClampedRelu2" else act
        plain = reference_moe(x, ids, scales, fc1, fc2, other,
                              fc1_expert_biases=kwargs.get("fc1_expert_biases"))
        assert rel_l2(first.float(), plain) > 0.05, "the parameters had no effect"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NEW)
def test_decode_tactics_serve_the_gated_activations(dtype, name):
    """Decode GEMM1 tactics (weight-streaming kernels, activation_math::gated in their
    epilogue when gated) at decode sizes, each checked on its own."""
    num_experts, hidden, inter, top_k, num_tokens = 8, 1024, 512, 2, 4
    act = ActivationType[name]
    descs = [d for d in _gemm1_candidates(dtype, act, num_tokens * top_k) if d.get("decode")]
    if not descs:
        pytest.skip("no decode GEMM1 tactic in this build")
    fc1, fc2 = _weights(num_experts, hidden, inter, name in FLASHINFER_GATED, dtype, seed=35)
    x, ids, scales = random_tokens(num_tokens, hidden, num_experts, top_k, dtype, 36, DEVICE)
    x = x * 2
    kwargs = _params(name, num_experts, seed=37)
    gemm2 = _default_gemm2(dtype, act, num_tokens, top_k, num_experts)
    for desc in descs:
        _check(x, ids, scales, fc1, fc2, name, tactics=(desc["name"], gemm2), **kwargs)


# ------------------------------------------------------------------ the explicit formulas


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("num_tokens", [3, 40])
def test_default_tactics_match_the_explicit_formulas(dtype, name, num_tokens):
    """The GPU result against the float64 per-token loop of the explicit formulas
    (tests/_activation_formulas.py), with biases and per-expert parameters."""
    num_experts, hidden, inter, top_k = 4, 256, 128, 2
    fc1, fc2 = _weights(num_experts, hidden, inter, name in FLASHINFER_GATED, dtype, seed=41)
    x, ids, scales = random_tokens(num_tokens, hidden, num_experts, top_k, dtype, 42, DEVICE)
    x = x * 2
    gen = torch.Generator(device=DEVICE).manual_seed(43)
    b1 = (torch.randn(fc1.shape[:2], device=DEVICE, generator=gen) * 0.5).to(dtype)
    b2 = (torch.randn(fc2.shape[:2], device=DEVICE, generator=gen) * 0.5).to(dtype)
    params = _params(name, num_experts, seed=44)
    out = _run(x, ids, scales, fc1, fc2, activation_type=ActivationType[name],
               fc1_expert_biases=b1, fc2_expert_biases=b2, **params)
    expected = naive_layer(x, ids, scales, fc1, fc2, name, b1, b2, **params)
    err = record_error(dtype, rel_l2(out.cpu().double(), expected))
    assert err <= TOLERANCE[dtype], f"relative L2 error {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flashinfer_integer_10_runs_situ(dtype):
    fc1, fc2 = _weights(8, 1024, 512, True, dtype, seed=45)
    x, ids, scales = random_tokens(16, 1024, 8, 2, dtype, 46, DEVICE)
    out = _run(x, ids, scales, fc1, fc2, activation_type=10)
    ref = reference_moe(x, ids, scales, fc1, fc2, ActivationType.Situ)
    assert rel_l2(out.float(), ref) <= TOLERANCE[dtype]


# ------------------------------------------------------------------ runner and tuner


def test_runner_refuses_clamped_relu2_without_its_limit():
    dtype = torch.bfloat16
    runner = _ext.get_runner(dtype, dtype, dtype)
    fc1, fc2 = _weights(8, 256, 128, False, dtype, seed=47)
    x, ids, scales = random_tokens(4, 256, 8, 2, dtype, 48, DEVICE)
    act = _ext.activation_to_enum(ActivationType.ClampedRelu2)
    size = int(runner.workspace_size(4, 256, 128, 8, 2, act))
    workspace = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    out = torch.empty_like(x)
    tactic1 = next(d["name"] for d in runner.tactics(1) if not d.get("gated"))
    tactic2 = next(d["name"] for d in runner.tactics(2) if int(d["split_k"]) == 1)
    with pytest.raises(ValueError, match="ClampedRelu2 needs clamped_relu2_limit"):
        runner.run_moe(4, 256, 128, 8, 2, 0, act, x.data_ptr(), ids.data_ptr(),
                       scales.data_ptr(), fc1.data_ptr(), fc2.data_ptr(), 0, 0, 0, 0, 0,
                       out.data_ptr(), workspace.data_ptr(), size, tactic1, tactic2,
                       torch.cuda.current_stream().cuda_stream)


def test_fused_gated_tactics_list_the_new_gated_activations():
    dtype = torch.bfloat16
    runner = _ext.get_runner(dtype, dtype, dtype)
    gated = [_ext.descriptor(d) for d in runner.tactics(1) if d.get("gated")]
    assert gated
    wanted = {ActivationType[n] for n in FLASHINFER_GATED}
    for desc in gated:
        assert desc["activations"] == wanted, desc["name"]


@pytest.mark.parametrize("name", NEW)
def test_tuning_profiles_the_new_activations(fresh_tuner, name):
    """autotune() times every candidate with the activation (ClampedRelu2's timing run has no
    limit: the kernel then uses 1), then runs the chosen tactics correctly."""
    dtype = torch.bfloat16
    num_experts = 8
    fc1, fc2 = _weights(num_experts, 1024, 512, name in FLASHINFER_GATED, dtype, seed=49)
    x, ids, scales = random_tokens(24, 1024, num_experts, 2, dtype, 50, DEVICE)
    kwargs = _params(name, num_experts, seed=51)
    with autotune():
        _run(x, ids, scales, fc1, fc2, activation_type=ActivationType[name],
             tune_max_num_tokens=64, **kwargs)
    _check(x, ids, scales, fc1, fc2, name, tune_max_num_tokens=64, **kwargs)
