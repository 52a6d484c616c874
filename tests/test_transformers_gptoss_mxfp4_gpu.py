"""gpt-oss with exactly-MXFP4 expert weights, end to end on a GPU.

The route for gpt-oss MXFP4 checkpoints: transformers loads them dequantised to bf16
(``Mxfp4Config(dequantize=True)``, or forced where it cannot run MXFP4), and
``prepare(model, weights="mxfp4")`` re-quantises the experts, recovering the checkpoint's
codes. Here a tiny ``GptOssForCausalLM`` (bf16, 2 layers, 4 experts, top-2) whose expert
weights are the bf16 values of random MXFP4 codes and scales (as transformers' dequantiser
makes them): the prepared buffers equal the generated codes (blocks whose largest magnitude is
4 or 6 and that hold no -0 code: byte for byte; every block: the same values), and the logits
of the prepared model (the mxfp4 kernels) are compared with transformers' eager forward on the
bf16 weights and with the 16-bit kernels on the same weights. The same through a tiny MXFP4
checkpoint written to disk and loaded with ``Mxfp4Config(dequantize=True)``. Not yet run on a
GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cutlass_moe.integrations.transformers as tx
from _helpers import record_error, rel_l2
from test_transformers_prepare_quantize import (  # noqa: F401 (_fresh_warnings: autouse)
    E2M1,
    _fresh_warnings,
    kernel_codes,
    load_dequantised,
    make_config,
    mxfp4_values,
    pack,
    unpack,
    write_mxfp4_checkpoint,
)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
#: Logits of the 2-layer bf16 model: the mxfp4 kernels against eager bf16 on the same weights.
LOGITS_TOL = 2e-2
HIDDEN, INTER, EXPERTS, LAYERS = 128, 64, 4, 2


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def random_mxfp4(n: int, k: int, gen: torch.Generator):
    """Codes ``[E, N, K]`` (0..15) and scale bytes ``[E, N, K/32]`` like a gpt-oss
    checkpoint's: half the blocks normalised (largest magnitude 4 or 6, no -0 code), the others
    unconstrained (smaller maxima, -0), a few all-zero; scales 2^-8 .. 2^-3."""
    codes = torch.randint(0, 16, (EXPERTS, n, k), generator=gen)
    blocks = codes.view(EXPERTS, n, k // 32, 32)
    normalised = torch.rand(blocks.shape[:-1], generator=gen) < 0.5
    top = 6 + torch.randint(0, 2, blocks.shape[:-1], generator=gen)
    top = top + 8 * torch.randint(0, 2, blocks.shape[:-1], generator=gen)
    fixed = torch.where(blocks == 8, torch.zeros_like(blocks), blocks)
    fixed[..., 0] = top
    blocks.copy_(torch.where(normalised.unsqueeze(-1), fixed, blocks))
    zero = torch.rand(blocks.shape[:-1], generator=gen) < 0.02
    blocks.masked_fill_(zero.unsqueeze(-1) & ~normalised.unsqueeze(-1), 0)
    x = torch.randint(119, 125, (EXPERTS, n, k // 32), generator=gen)
    return codes.to(torch.uint8), x.to(torch.uint8)


def dequantise(codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bf16 ``e2m1(code) * 2^(x - 127)`` ``[E, N, K]`` (exact in bf16)."""
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float64)
    values = table[codes.long()] * torch.exp2(x.double() - 127).repeat_interleave(32, dim=-1)
    out = values.to(torch.bfloat16)
    assert torch.equal(out.double(), values)
    return out


def normalised_blocks(codes: torch.Tensor) -> torch.Tensor:
    """``[.., N, K/32]``: blocks whose largest magnitude code is 4 or 6 and with no -0."""
    blocks = codes.view(*codes.shape[:-1], -1, 32).long()
    magnitude = blocks & 7
    return ((magnitude.amax(-1) >= 6) & ~(blocks == 8).any(-1))


def gpt_oss_with_mxfp4_experts(seed: int = 0):
    """The model (bf16, eager experts, on the GPU) and per layer the generated
    ``(gate_up codes [E, 2I, H], bytes, down codes [E, H, I], bytes)`` in the checkpoint's
    layout (rows = output features; gate_up rows interleaved gate/up)."""
    cfg = make_config("gpt_oss", hidden=HIDDEN, inter=INTER, layers=LAYERS)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation="eager").to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(seed)
    generated = []
    with torch.no_grad():
        for _, module in tx.experts_modules(model):
            gate_up, gate_up_x = random_mxfp4(2 * INTER, HIDDEN, gen)
            down, down_x = random_mxfp4(HIDDEN, INTER, gen)
            # transformers' dequantiser gives [E, N, K] and transposes: [E, H, 2I], [E, I, H].
            module.gate_up_proj.copy_(dequantise(gate_up, gate_up_x).transpose(1, 2))
            module.down_proj.copy_(dequantise(down, down_x).transpose(1, 2))
            module.gate_up_proj_bias.copy_(torch.randn(module.gate_up_proj_bias.shape,
                                                       generator=gen) * 0.1)
            module.down_proj_bias.copy_(torch.randn(module.down_proj_bias.shape,
                                                    generator=gen) * 0.1)
            generated.append((gate_up, gate_up_x, down, down_x))
    return model.to(DEVICE), generated


def check_buffers(module, layer_codes) -> None:
    gate_up, gate_up_x, down, down_x = layer_codes
    for name, (codes, x, gated) in (("fc1", (gate_up, gate_up_x, True)),
                                    ("fc2", (down, down_x, False))):
        want_packed, want_scales = kernel_codes(codes, x, gated)
        got_packed = getattr(module, f"cutlass_moe_{name}").cpu()
        got_scales = getattr(module, f"cutlass_moe_{name}_scale").cpu()
        assert got_packed.dtype == got_scales.dtype == torch.uint8
        assert got_packed.shape == want_packed.shape and got_scales.shape == want_scales.shape
        # Every block: the same values.
        assert torch.equal(mxfp4_values(got_packed, got_scales),
                           mxfp4_values(want_packed, want_scales)), name
        # Normalised blocks: the checkpoint's codes and scale bytes themselves.
        keep = normalised_blocks(unpack(want_packed))  # [E, N, K/32]
        assert bool(keep.any())
        got_codes = unpack(got_packed).view(*keep.shape, 32)
        want_codes = unpack(want_packed).view(*keep.shape, 32)
        assert torch.equal(got_codes[keep], want_codes[keep]), name
        assert torch.equal(got_scales.transpose(1, 2)[keep],
                           want_scales.transpose(1, 2)[keep]), name


def test_gpt_oss_mxfp4_end_to_end():
    model, generated = gpt_oss_with_mxfp4_experts()
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(DEVICE)
    with torch.no_grad():
        eager = model(tokens).logits.float()
        model.set_experts_implementation("cutlass_moe")
        with warnings.catch_warnings():
            warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
            sixteen_bit = model(tokens).logits.float()  # the bf16 kernels, same weights
    tx.clear_converted_weights(model)
    report = tx.prepare(model, weights="mxfp4")
    assert all(v.endswith("mxfp4 weights") for v in report.values()), report
    for (_, module), layer_codes in zip(tx.experts_modules(model), generated, strict=True):
        check_buffers(module, layer_codes)
        assert not list(module.parameters(recurse=False))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        prepared = model(tokens).logits.float()
    err = record_error("transformers_gpt_oss_mxfp4_logits_vs_eager_bf16", rel_l2(prepared, eager))
    assert err <= LOGITS_TOL
    err16 = record_error("transformers_gpt_oss_mxfp4_logits_vs_bf16_kernels",
                         rel_l2(prepared, sixteen_bit))
    assert err16 <= LOGITS_TOL
    assert rel_l2(sixteen_bit, eager) <= LOGITS_TOL


def test_gpt_oss_mxfp4_checkpoint_loaded_dequantised(tmp_path):
    """A tiny MXFP4 checkpoint on disk, loaded with Mxfp4Config(dequantize=True) and moved to
    the GPU, then prepared: the first layer's (normalised) blocks byte for byte, the logits
    against the eager model of the same load."""
    pytest.importorskip("safetensors")
    generated = write_mxfp4_checkpoint(str(tmp_path), hidden=HIDDEN, inter=INTER,
                                       layers=LAYERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_dequantised(str(tmp_path)).to(DEVICE)
        reference = load_dequantised(str(tmp_path)).to(DEVICE)
    assert type(tx.experts_modules(model)[0][1]).__name__ == "GptOssExperts"
    tx.prepare(model, weights="mxfp4")
    _, module = tx.experts_modules(model)[0]
    gate_up, gate_up_x, down, down_x = generated[0]
    for name, (codes, x, gated) in (("fc1", (gate_up, gate_up_x, True)),
                                    ("fc2", (down, down_x, False))):
        want_packed, want_scales = kernel_codes(codes, x, gated)
        assert torch.equal(getattr(module, f"cutlass_moe_{name}").cpu(), want_packed)
        assert torch.equal(getattr(module, f"cutlass_moe_{name}_scale").cpu(), want_scales)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", tx.CutlassMoeFallbackWarning)
        out = model(tokens).logits.float()
    with torch.no_grad():
        expected = reference(tokens).logits.float()
    err = record_error("transformers_gpt_oss_mxfp4_checkpoint_logits_vs_eager_bf16",
                       rel_l2(out, expected))
    assert err <= LOGITS_TOL


def test_generated_blocks_are_exact_mxfp4():
    """The generator's own check: packing, normalised-block detection."""
    codes, _ = random_mxfp4(32, 64, torch.Generator().manual_seed(5))
    assert torch.equal(unpack(pack(codes)), codes)
    keep = normalised_blocks(codes)
    assert 0.3 < float(keep.float().mean()) < 0.8
