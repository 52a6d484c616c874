"""Quantised transformers experts through cutlass_moe on a GPU.

The tiny FP8 / packed-FP4 models of tests/test_transformers_quantized.py (fine-grained FP8
``FP8Experts``) on CUDA with the compiled fp8 / mxfp4 weight-only kernels: the experts against
``reference_moe`` on the dequantised weights (transformers' own ``Fp8Dequantize``), the logits
against the same model with the dequantised bf16 experts (what ``dequantize=True`` loads) within
the op tests' bf16 bound, and ``prepare``. Then 16-bit Mixtral / Qwen3-MoE experts quantised by
``prepare(model, weights="int4" | "fp8" | "mxfp4")`` (tests/test_transformers_prepare_quantize.py
on CPU): the buffers made on the GPU equal the CPU quantisation written in that test, the experts
against ``reference_moe`` on the dequantised weights (bf16 and fp16 bounds), the logits against
the eager model holding the dequantised weights, and the memory released. Not yet run on a GPU.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.finegrained_fp8")

import cutlass_moe.integrations.transformers as tx
from _helpers import record_error, rel_l2
from cutlass_moe import reference_moe
from test_transformers_prepare_quantize import (
    GROUP,
    dequantised_model,
    expected_buffers,
    model_of,
)
from test_transformers_prepare_quantize import routing as routing_e
from test_transformers_quantized import (  # noqa: F401 (_fresh_warnings: the autouse fixture)
    H,
    _fresh_warnings,
    fp8_experts,
    kernel_dequantize,
    quantized_model,
    routing,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
#: bf16 bound of the op tests (tests/test_fused_moe_gpu.py).
BF16_TOL = 1e-2
#: The op tests' bounds per activation dtype, against float32 math on the same weights.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_against_the_reference(fmt, tokens, dtype):
    module = fp8_experts(expert_dtype=fmt, seed=tokens).to(DEVICE)
    module.config._experts_implementation = "cutlass_moe"
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen).to(DEVICE, dtype)
    ids, weights = routing(tokens, seed=tokens)
    ids, weights = ids.to(DEVICE), weights.to(DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        out = module(x, ids, weights)
    converted = tx.convert_experts(module)
    w1, w2 = (w.to(dtype) for w in kernel_dequantize(converted))  # the kernels' rounding
    expected = reference_moe(x, ids, weights, w1, w2, converted.activation_type,
                             compute_dtype=torch.float32)
    assert rel_l2(out.float(), expected.float()) <= BF16_TOL


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_logits_against_the_dequantized_model(fmt):
    model, reference = quantized_model(fmt)
    model, reference = model.to(DEVICE), reference.to(DEVICE)
    model.set_experts_implementation("cutlass_moe")
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        out = model(tokens).logits.float()
        expected = reference(tokens).logits.float()
    assert rel_l2(out, expected) <= BF16_TOL


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_prepare_frees_the_checkpoint_tensors(fmt):
    model, _ = quantized_model(fmt)
    model = model.to(DEVICE)
    tokens = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(DEVICE)
    model.set_experts_implementation("cutlass_moe")
    with torch.no_grad():
        lazy = model(tokens).logits
    tx.clear_converted_weights(model)
    kernel = "fp8" if fmt == "fp8" else "mxfp4"
    tx.prepare(model, weights=kernel)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        prepared = model(tokens).logits
    assert torch.equal(lazy, prepared)


# ------------------------------------------------------------------------------------------
# 16-bit experts quantised by prepare(model, weights="int4" | "fp8" | "mxfp4")
# ------------------------------------------------------------------------------------------

QUANTIZERS = ["int4", "fp8", "mxfp4"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("weights", QUANTIZERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepared_experts_against_the_reference(family, weights, dtype):
    """The buffers quantised on the GPU equal the CPU quantisation of the test (bytes), and
    the experts (1, 7, 300 tokens) match reference_moe on the dequantised weights."""
    model = model_of(family, dtype, inter=64)
    source = model_of(family, dtype, inter=64)
    _, src = tx.experts_modules(source)[0]
    want, (w1, w2) = expected_buffers(src, weights, GROUP[weights])
    model = model.to(DEVICE)
    tx.prepare(model, weights=weights, group_size=GROUP[weights])
    _, module = tx.experts_modules(model)[0]
    for name, t in want.items():
        got = getattr(module, "cutlass_moe_" + name).cpu()
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8),
                                                    t.view(torch.uint8)), name
    w1, w2 = w1.to(DEVICE), w2.to(DEVICE)
    for tokens in (1, 7, 300):
        gen = torch.Generator().manual_seed(tokens)
        x = (torch.randn(tokens, 64, generator=gen) * 2).to(DEVICE, dtype)
        ids, scales = (t.to(DEVICE) for t in routing_e(tokens, 4, seed=tokens))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
            out = module(x, ids, scales)
        expected = reference_moe(x, ids, scales, w1, w2, tx.convert_experts(
            src).activation_type, compute_dtype=torch.float32)
        err = record_error(f"transformers_prepare_{weights}_{str(dtype)[6:]}_vs_dequantized",
                           rel_l2(out.float(), expected.float()))
        assert err <= TOLERANCE[dtype], (tokens, err)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("weights", QUANTIZERS)
def test_prepared_logits_against_the_dequantized_model(family, weights):
    """One MoE layer (the router sees the same input in both runs), bf16: the logits of the
    prepared model against the eager model holding the dequantised weights."""
    model = model_of(family, inter=64).to(DEVICE)
    reference = dequantised_model(model_of(family, inter=64), weights, GROUP[weights])
    reference = reference.to(DEVICE)
    tx.prepare(model, weights=weights, group_size=GROUP[weights])
    tokens = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        out = model(tokens).logits.float()
    with torch.no_grad():
        expected = reference(tokens).logits.float()
    err = record_error(f"transformers_prepare_{weights}_logits_vs_dequantized_eager",
                       rel_l2(out, expected))
    assert err <= BF16_TOL


@pytest.mark.parametrize("weights", QUANTIZERS)
def test_prepare_quantised_releases_memory(weights):
    """Default group (128): int4 and mxfp4 keep about a quarter of the bf16 expert bytes,
    fp8 about a half."""
    model = model_of("qwen3_moe", hidden=128, inter=128).to(DEVICE)
    gc.collect()
    before = torch.cuda.memory_allocated()
    expert_bytes = sum(p.nbytes for _, m in tx.experts_modules(model)
                       for p in m.parameters(recurse=False))
    report = tx.prepare(model, weights=weights)
    gc.collect()
    after = torch.cuda.memory_allocated()
    assert all(f"{weights} weights" in v for v in report.values())
    assert after <= before - (0.4 if weights == "fp8" else 0.65) * expert_bytes
    _, module = tx.experts_modules(model)[0]
    assert module.cutlass_moe_fc1.device.type == "cuda"
    assert module.cutlass_moe_fc1.shape == (4, 256, 64 if weights != "fp8" else 128)
