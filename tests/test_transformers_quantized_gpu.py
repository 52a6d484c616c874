"""Quantised transformers experts (fine-grained FP8 ``FP8Experts``) through cutlass_moe on a GPU.

The tiny FP8 / packed-FP4 models of tests/test_transformers_quantized.py on CUDA with the
compiled fp8 / mxfp4 weight-only kernels: the experts against ``reference_moe`` on the
dequantised weights (transformers' own ``Fp8Dequantize``), the logits against the same model
with the dequantised bf16 experts (what ``dequantize=True`` loads) within the op tests' bf16
bound, and ``prepare``. Not yet run on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.finegrained_fp8")

import cutlass_moe.integrations.transformers as tx
from _helpers import rel_l2
from cutlass_moe import reference_moe
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
