"""Random layers and inputs: what the demo, the benchmark and the tuner run on.

- :func:`random_expert_weights`: expert weights of any shape, ``randn`` scaled by
  ``1/sqrt(fan_in)`` (so activations keep unit scale through both GEMMs).
- :func:`make_layer`: a model preset's SwiGLU expert weights; :func:`swiglu_clamp` its
  clamped-SwiGLU parameters as the per-expert tensors ``cutlass_fused_moe`` takes.
- :func:`make_tokens`: activations and router-like routing (softmax, top-k).
- :func:`make_routing`: benchmark routing, ``k`` distinct experts per token drawn uniformly or
  Zipf-skewed.
- :func:`quantize_layer_int4`: a layer's weights quantised to int4 group-wise weights (W4A16,
  the kernel layout of :mod:`cutlass_moe.int4`) for the tuner and the benchmark;
  :func:`quantize_layer_fp8` and :func:`quantize_layer_mxfp4` the same for FP8 (e4m3) and MXFP4
  weight-only weights (:mod:`cutlass_moe.fp8`, :mod:`cutlass_moe.mxfp4`).

Every function draws from a ``torch.Generator`` seeded by its caller, so results repeat.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .fp8 import quantize_moe_weights_fp8
from .int4 import quantize_moe_weights_int4
from .mxfp4 import quantize_moe_weights_mxfp4
from .presets import ModelPreset

#: Expert popularity of ``routing="zipf"``: p(expert of rank r) ~ 1 / r**ZIPF_EXPONENT.
ZIPF_EXPONENT = 1.0
#: The ``routing`` values of :func:`make_routing`.
ROUTINGS = ("uniform", "zipf")


def random_expert_weights(
    num_experts: int,
    hidden_size: int,
    inter_size: int,
    fc1_rows: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random expert weights ``(w1 [E, fc1_rows, H], w2 [E, H, I])`` of ``dtype`` on
    ``device``, each ``randn`` scaled by ``1/sqrt(fan_in)`` (``H`` for w1, ``I`` for w2).

    ``fc1_rows`` is GEMM1's output width: ``2*I`` for gated activations (``[up | gate]``),
    ``I`` otherwise. Drawn from a generator on ``device`` seeded with ``seed``, w1 first."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w1 = torch.randn(num_experts, fc1_rows, hidden_size, device=device, dtype=dtype,
                     generator=gen) * hidden_size**-0.5
    w2 = torch.randn(num_experts, hidden_size, inter_size, device=device, dtype=dtype,
                     generator=gen) * inter_size**-0.5
    return w1, w2


def make_layer(
    preset: ModelPreset, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random SwiGLU expert weights ``([E, 2I, H], [E, H, I])`` of a preset's shape
    (:func:`random_expert_weights`)."""
    return random_expert_weights(preset.num_experts, preset.hidden_size, preset.inter_size,
                                 preset.fc1_rows, dtype, device, seed=seed)


def swiglu_clamp(preset: ModelPreset, device: torch.device) -> dict[str, torch.Tensor]:
    """The preset's clamped-SwiGLU parameters as ``cutlass_fused_moe`` / ``reference_moe``
    keyword arguments: float32 ``[E]`` tensors named ``swiglu_alpha``, ``swiglu_beta`` and
    ``swiglu_limit`` (only those the preset sets; empty for plain SwiGLU)."""
    values = (("swiglu_alpha", preset.swiglu_alpha), ("swiglu_beta", preset.swiglu_beta),
              ("swiglu_limit", preset.swiglu_limit))
    return {name: torch.full((preset.num_experts,), value, dtype=torch.float32, device=device)
            for name, value in values if value is not None}


def make_tokens(
    preset: ModelPreset, num_tokens: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``x [T, H]`` and softmax/top-k routing ``(ids int32 [T, k], scales f32 [T, k])``
    (scales renormalised over the ``k`` choices), as a model's router produces them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, preset.hidden_size, device=device, dtype=dtype, generator=gen)
    logits = torch.randn(num_tokens, preset.num_experts, device=device, generator=gen)
    scales, ids = torch.softmax(logits, dim=-1).topk(preset.top_k, dim=-1)
    scales = scales / scales.sum(dim=-1, keepdim=True)
    return x, ids.to(torch.int32), scales.to(torch.float32)


def make_routing(num_tokens: int, num_experts: int, top_k: int, routing: str,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random routing ``(ids int32 [T, k], scales float32 [T, k])`` on the generator's device:
    ``k`` distinct experts per token, drawn uniformly (``"uniform"``) or with popularity
    ``1 / rank**ZIPF_EXPONENT`` over a random ranking of the experts (``"zipf"``); scales are
    a softmax over the ``k`` choices."""
    device = generator.device
    if routing == "uniform":
        probs = torch.ones(num_experts, device=device)
    elif routing == "zipf":
        ranks = torch.randperm(num_experts, generator=generator, device=device) + 1
        probs = ranks.double().pow(-ZIPF_EXPONENT).float()
    else:
        raise ValueError(f"routing must be one of {', '.join(map(repr, ROUTINGS))}, got "
                         f"{routing!r}")
    ids = torch.multinomial(probs.expand(num_tokens, num_experts).contiguous(), top_k,
                            replacement=False, generator=generator)
    scales = torch.softmax(torch.randn(num_tokens, top_k, generator=generator, device=device),
                           dim=-1)
    return ids.to(torch.int32), scales.to(torch.float32)


class Int4Layer(NamedTuple):
    """A layer's int4 group-wise weights in the kernel layout (:mod:`cutlass_moe.int4`)."""

    weights: tuple[torch.Tensor, torch.Tensor]  # packed uint8 [E, N1, H/2], [E, H, I/2]
    scales: tuple[torch.Tensor, torch.Tensor]  # [E, H/G, N1], [E, I/G, H]
    zeros: tuple[torch.Tensor | None, torch.Tensor | None]  # like scales, or None (symmetric)
    group_size: int

    @property
    def quant_scales(self) -> list[torch.Tensor]:
        """``cutlass_fused_moe``'s ``quant_scales`` (with ``use_w4_group_scaling=True``)."""
        if self.zeros[0] is None:
            return list(self.scales)
        return [*self.scales, *self.zeros]


def quantize_layer_int4(
    w1: torch.Tensor, w2: torch.Tensor, group_size: int = 128, asymmetric: bool = False
) -> Int4Layer:
    """``w1 [E, N1, H]`` and ``w2 [E, H, I]`` quantised group-wise to int4 with ``group_size``
    for both GEMMs, with zero points when ``asymmetric``
    (:func:`cutlass_moe.int4.quantize_moe_weights_int4`; scales in the weights' dtype)."""
    p1, p2, quant_scales = quantize_moe_weights_int4(w1, w2, group_size,
                                                     symmetric=not asymmetric)
    zeros = (quant_scales[2], quant_scales[3]) if asymmetric else (None, None)
    return Int4Layer((p1, p2), (quant_scales[0], quant_scales[1]), zeros, group_size)


class GroupScaledLayer(NamedTuple):
    """A layer's FP8 (e4m3) or MXFP4 weight-only weights in their kernel layout
    (:mod:`cutlass_moe.fp8`, :mod:`cutlass_moe.mxfp4`); shaped like :class:`Int4Layer` (no zero
    points) so that callers treat the three formats alike."""

    weights: tuple[torch.Tensor, torch.Tensor]  # fp8: [E, N1, H], [E, H, I]; mxfp4: uint8 K/2
    scales: tuple[torch.Tensor, torch.Tensor]  # [E, H/G, N1], [E, I/G, H]: fp32 / uint8 e8m0
    zeros: tuple[None, None]
    group_size: int
    weight_format: str  # "fp8" or "mxfp4"

    @property
    def quant_scales(self) -> list[torch.Tensor]:
        """``cutlass_fused_moe``'s ``quant_scales`` (with ``use_fp8_woq_group_scaling=True``
        for fp8, ``use_w4_group_scaling=True`` for mxfp4)."""
        return list(self.scales)

    @property
    def call_flags(self) -> dict[str, bool]:
        """The ``cutlass_fused_moe`` flag that selects the format."""
        if self.weight_format == "fp8":
            return {"use_fp8_woq_group_scaling": True}
        return {"use_w4_group_scaling": True}


def quantize_layer_fp8(w1: torch.Tensor, w2: torch.Tensor, group_size: int = 128
                       ) -> GroupScaledLayer:
    """``w1 [E, N1, H]`` and ``w2 [E, H, I]`` quantised group-wise to float8_e4m3fn with
    ``group_size`` for both GEMMs (:func:`cutlass_moe.fp8.quantize_moe_weights_fp8`; float32
    scales)."""
    q1, q2, (s1, s2) = quantize_moe_weights_fp8(w1, w2, group_size=group_size)
    return GroupScaledLayer((q1, q2), (s1, s2), (None, None), group_size, "fp8")


def quantize_layer_mxfp4(w1: torch.Tensor, w2: torch.Tensor) -> GroupScaledLayer:
    """``w1 [E, N1, H]`` and ``w2 [E, H, I]`` quantised to MXFP4
    (:func:`cutlass_moe.mxfp4.quantize_moe_weights_mxfp4`; uint8 e8m0 scales, group size 32)."""
    p1, p2, (s1, s2) = quantize_moe_weights_mxfp4(w1, w2)
    return GroupScaledLayer((p1, p2), (s1, s2), (None, None), 32, "mxfp4")
