"""The weight-streaming decode tactics (sm80_decode*) on a GPU against reference_moe.

Every decode tactic of each GEMM runs with a CUTLASS default tactic on the other GEMM, over
decode-sized calls (T in {1, 2, 5, 8, 33, 64}; E in {8, 60, 128}; k in {1, 2, 8}) and the edge
cases (empty experts, all rows on one expert, ids out of range, biases, clamped SwiGLU, GeGLU),
16-bit and int8 weights, fp16 and bf16, with NaN-poisoned outputs; CUDA-graph replays and
repeated runs are bitwise equal to an eager run.
"""

from __future__ import annotations

import functools

import pytest
import torch

from _helpers import clamped_swiglu_params, descriptors, random_tokens, record_error, rel_l2
from cutlass_moe import ActivationType, _ext, cutlass_fused_moe, reference_moe, tactics
from cutlass_moe.quantization import dequantize, quantize_moe_weights_int8

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16]
# Column and K residues: H = 528 (K of GEMM1: two 256-wide steps and a tail), I = 272 (int8:
# multiples of 16); 16-bit also with N tails (H = 536, I = 264).
SHAPES = {"16bit": (536, 264), "int8": (528, 272)}
CALLS = [(8, 1), (8, 2), (60, 2), (128, 8)]  # (E, k)
TOKENS = [1, 2, 5, 8, 33, 64]


@functools.lru_cache(maxsize=16)
def _layer(num_experts, weights, dtype, gated=True):
    """``(fc1, fc2, quant_scales, fc1_ref, fc2_ref)``: the call's weights and the reference's."""
    hidden, inter = SHAPES[weights]
    gen = torch.Generator(device=DEVICE).manual_seed(num_experts)
    n1 = 2 * inter if gated else inter
    fc1 = (torch.randn(num_experts, n1, hidden, device=DEVICE, generator=gen)
           * hidden**-0.5).to(dtype)
    fc2 = (torch.randn(num_experts, hidden, inter, device=DEVICE, generator=gen)
           * inter**-0.5).to(dtype)
    if weights == "16bit":
        return fc1, fc2, None, fc1, fc2
    q1, q2, scales = quantize_moe_weights_int8(fc1, fc2)
    return q1, q2, scales, dequantize(q1, scales[0]), dequantize(q2, scales[1])


def _decode_tactics(dtype, weights, gemm):
    weight_dtype = torch.int8 if weights == "int8" else dtype
    runner = _ext.get_runner(dtype, weight_dtype, dtype)
    return [d for d in descriptors(runner, gemm) if d.get("decode")], runner


def _default(runner, gemm, activation, rows):
    return tactics.default_tactic(
        [d for d in descriptors(runner, gemm) if tactics.supports_activation(d, activation)],
        rows)


def _run(x, ids, scales, layer, names, **kwargs):
    fc1, fc2, quant, _, _ = layer
    output = torch.full_like(x, float("nan"))
    extra = {"quant_scales": quant, "use_int8_woq_per_channel": True} if quant else {}
    cutlass_fused_moe(x, ids, scales, fc1, fc2, x.dtype, output=output, tactics=names,
                      **extra, **kwargs)
    assert not output.isnan().any(), f"{names}: some output elements were not written"
    return output


def _check(x, ids, scales, layer, names, label, **kwargs):
    out = _run(x, ids, scales, layer, names, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "enable_pdl"}
    ref = reference_moe(x, ids, scales, layer[3], layer[4], **ref_kwargs)
    err = record_error(x.dtype, rel_l2(out.float(), ref))
    return [] if err <= TOLERANCE[x.dtype] else [f"{label} {names}: rel err {err:.3g}"]


@pytest.mark.parametrize("weights", ["16bit", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemm", [1, 2])
def test_every_decode_tactic_matches_the_reference(gemm, dtype, weights):
    descs, runner = _decode_tactics(dtype, weights, gemm)
    assert descs, f"no decode tactic for GEMM{gemm} {dtype} {weights}"
    failures = []
    for desc in descs:
        activations = ([ActivationType.Swiglu, ActivationType.Geglu] if desc.get("gated")
                       else [ActivationType.Swiglu, ActivationType.Relu] if gemm == 1
                       else [ActivationType.Swiglu])
        for activation in activations:
            gated = activation in (ActivationType.Swiglu, ActivationType.Geglu)
            for num_experts, top_k in CALLS:
                layer = _layer(num_experts, weights, dtype, gated)
                hidden = layer[0].shape[2]
                for num_tokens in TOKENS:
                    x, ids, scales = random_tokens(num_tokens, hidden, num_experts, top_k, dtype,
                                                   num_tokens, DEVICE)
                    other = _default(runner, 3 - gemm, activation,
                                     num_tokens * top_k / num_experts)
                    names = (desc["name"], other) if gemm == 1 else (other, desc["name"])
                    failures += _check(x, ids, scales, layer, names,
                                       f"{activation.name} E={num_experts} k={top_k} "
                                       f"T={num_tokens}", activation_type=activation)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("weights", ["16bit", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_edge_cases(dtype, weights):
    """Both GEMMs on decode tactics (gated GEMM1 where the activation is gated)."""
    gemm1, runner = _decode_tactics(dtype, weights, 1)
    gemm2, _ = _decode_tactics(dtype, weights, 2)
    num_experts = 8
    layer = _layer(num_experts, weights, dtype)
    hidden = layer[0].shape[2]
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    failures = []
    for g1 in [d for d in gemm1 if d.get("gated")]:
        for g2 in gemm2:
            names = (g1["name"], g2["name"])
            # All rows on one expert: several row chunks of one problem.
            x, ids, scales = random_tokens(33, hidden, num_experts, 2, dtype, 3, DEVICE)
            ids[:, 0] = 5
            failures += _check(x, ids, scales, layer, names, "one expert")
            # Ids out of range (negative, E, far beyond): contribute zero.
            x, ids, scales = random_tokens(9, hidden, num_experts, 2, dtype, 4, DEVICE)
            ids[0, 0], ids[1, 1], ids[2, 0] = -1, num_experts, 1000
            failures += _check(x, ids, scales, layer, names, "ids out of range")
            # Biases and the clamped SwiGLU (per-expert parameters), inputs large enough to clamp.
            x, ids, scales = random_tokens(5, hidden, num_experts, 2, dtype, 5, DEVICE)
            b1 = (torch.randn(layer[0].shape[:2], device=DEVICE, generator=gen) * 0.5).to(dtype)
            b2 = (torch.randn(num_experts, hidden, device=DEVICE, generator=gen) * 0.5).to(dtype)
            failures += _check(x * 3, ids, scales, layer, names, "biases + clamp",
                               fc1_expert_biases=b1, fc2_expert_biases=b2,
                               **clamped_swiglu_params(num_experts, gen))
            # No token at all for most experts (T=1, k=1).
            x, ids, scales = random_tokens(1, hidden, num_experts, 1, dtype, 6, DEVICE)
            failures += _check(x, ids, scales, layer, names, "one row")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("weights", ["16bit", "int8"])
def test_decode_graph_replay_and_repeats_are_bitwise_equal(weights):
    dtype = torch.bfloat16
    gemm1, _ = _decode_tactics(dtype, weights, 1)
    gemm2, _ = _decode_tactics(dtype, weights, 2)
    layer = _layer(60, weights, dtype)
    hidden = layer[0].shape[2]
    for g1 in gemm1:
        if not g1.get("gated"):
            continue
        names = (g1["name"], gemm2[0]["name"])
        x, ids, scales = random_tokens(8, hidden, 60, 4, dtype, 11, DEVICE)
        eager = _run(x, ids, scales, layer, names)
        assert torch.equal(_run(x, ids, scales, layer, names), eager)
        out = torch.full_like(x, float("nan"))
        fc1, fc2, quant, _, _ = layer
        extra = {"quant_scales": quant, "use_int8_woq_per_channel": True} if quant else {}

        def call(out=out, names=names, extra=extra):
            cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, output=out, tactics=names,
                              **extra)

        call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager), names


def test_decode_tactics_are_opt_in_and_never_the_default(monkeypatch):
    """16-bit decode tactics (within a few per cent of the tensor-core tiles on an H200) run
    only when named in tactics= or when CUTLASS_MOE_DECODE_TACTICS=1 makes them tuner
    candidates; never as the default (those of int4, fp8 and mxfp4 weights are candidates and,
    at decode sizes, defaults)."""
    dtype = torch.bfloat16
    device = torch.device(DEVICE)
    for gemm in (1, 2):
        descs = _ext.tactics(dtype, dtype, dtype, gemm, device)
        decode = {d["name"] for d in descs if d.get("decode")}
        assert decode
        for rows in (0.125, 1, 8, 64):
            assert tactics.default_for((dtype,) * 3, gemm, ActivationType.Swiglu, device,
                                       rows) not in decode
        monkeypatch.delenv(tactics.DECODE_ENV, raising=False)
        names = tactics.candidate_names((dtype,) * 3, gemm, ActivationType.Swiglu, device, 8)
        assert not decode & set(names)
        monkeypatch.setenv(tactics.DECODE_ENV, "1")
        names = tactics.candidate_names((dtype,) * 3, gemm, ActivationType.Swiglu, device, 8)
        assert decode <= set(names)
