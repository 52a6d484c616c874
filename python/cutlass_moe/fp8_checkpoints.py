"""FP8 (e4m3) checkpoint importers: DeepSeek-V3 / Qwen3-FP8 fine-grained (128x128 block) and
compressed-tensors ``float-quantized`` expert weights into the kernel layout of
:mod:`cutlass_moe.fp8`.

Each converter takes one linear layer's tensors as stored in the checkpoint and returns an
:class:`Fp8Weight` ``(weights float8_e4m3fn [N, K], scales float32 [K/G, N])`` whose
:func:`cutlass_moe.fp8.dequantize_fp8` is the weight the format defines (the fp8 bytes are
kept as they are; the scales are copied, per column and K-group, converted to float32 exactly
from 16-bit dtypes). :func:`load_fp8_experts` reads every expert of an MoE layer from a state
dict and assembles the tensors :func:`cutlass_moe.cutlass_fused_moe` takes with
``use_fp8_woq_group_scaling=True``. Weights holding the e4m3 NaN code (0x7F/0xFF) and
non-finite scales are refused, naming the tensor.

Format facts used (a linear layer ``W [N, K]``: ``N = out_features``, ``K = in_features``):

DeepSeek-V3 / R1, Qwen3-FP8 (``quantization_config``: ``quant_method: "fp8"``,
``fmt: "e4m3"``, ``weight_block_size: [128, 128]``):
    ``weight`` ``float8_e4m3fn [N, K]`` and ``weight_scale_inv`` ``float32 [ceil(N/128),
    ceil(K/128)]``; ``W[n, k] = weight[n, k] * weight_scale_inv[n // 128, k // 128]``
    (DeepSeek-V3's ``weight_dequant`` and transformers' ``FP8Linear`` multiply by it despite the
    name). The last block row/column is partial when ``N``/``K`` are not multiples of 128
    (DeepSeek's moe_intermediate_size 2048 and hidden 7168 are; any ``N`` is served, ``K`` must
    be a multiple of 128 for ``G = 128``, or of 32 with a finer ``group_size``: see
    :func:`cutlass_moe.fp8.expand_block_scales`). Activation scales are dynamic there; nothing
    else is stored per linear layer. transformers (``integrations/finegrained_fp8.py``) reads
    the same tensors: ``FP8Linear`` allocates ``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``
    (float32, or ``float8_e8m0fnu`` with ``scale_fmt="ue8m0"``; a 0-d float32 per-tensor scale
    without a block size) and ``_dequantize_fp8_weight`` multiplies block ``(n // bn, k // bk)``
    in.

compressed-tensors (``format: "float-quantized"`` or ``"naive-quantized"``, weights
``type: float, num_bits: 8``; facts from compressed-tensors 0.20's
``quantization/lifecycle/initialize.py`` (scale shapes) and ``forward_helpers._dequantize``
(``W = weight.to(scale.dtype) * weight_scale``)):
    ``weight`` ``float8_e4m3fn [N, K]`` and ``weight_scale`` by strategy: ``tensor`` ``[1]``,
    ``channel`` ``[N, 1]``, ``group`` ``[N, K/G]``, ``block`` ``[ceil(N/bn), ceil(K/bk)]``
    (the FP8_BLOCK preset: ``block_structure [128, 128]``). The scale dtype is the model's
    (bf16/fp16) or float32. Symmetric FP8 schemes store no ``weight_zero_point``; one that is
    present must be all zeros. ``input_scale`` (static FP8 activations of W8A8 schemes) is
    ignored: the weight-only kernels keep 16-bit activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._expert_tensors import read_expert_layers, stack_experts
from .fp8 import (
    DEEPSEEK_BLOCK,
    FP8_DTYPE,
    _block_pair,
    check_fp8_layer,
    check_no_fp8_nan,
    expand_block_scales,
)
from .int4 import group_size_of

#: ``fmt`` values of :func:`load_fp8_experts`.
FORMATS = ("fp8-block", "compressed-tensors")

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_E8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)


class Fp8Weight(NamedTuple):
    """One linear layer in the kernel layout of :mod:`cutlass_moe.fp8`."""

    weights: torch.Tensor  #: float8_e4m3fn [N, K]
    scales: torch.Tensor  #: float32 [K/G, N]

    @property
    def group_size(self) -> int:
        """``G = K / scales.shape[0]``."""
        return self.weights.shape[-1] // self.scales.shape[-2]


def _shape(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
    return type(t).__name__


def _fp8_matrix(name: str, weight: object) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"{name} must be float8_e4m3fn [N, K], got {_shape(weight)}")
    check_no_fp8_nan(weight, name)
    return weight


def _finite_scales(name: str, scale: object) -> torch.Tensor:
    """``scale`` as a float tensor (e8m0 ``float8_e8m0fnu`` converted to float32, exactly),
    refusing non-finite values."""
    if isinstance(scale, torch.Tensor) and scale.dtype == _E8M0_DTYPE:
        scale = scale.to(torch.float32)  # 2^(x - 127); the NaN code 255 is caught below
    if not isinstance(scale, torch.Tensor) or scale.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor (float32), got {_shape(scale)}")
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        first = [int(i) for i in torch.nonzero(bad)[0]] if scale.dim() else []
        value = float(scale[tuple(first)]) if scale.dim() else float(scale)
        raise ValueError(f"{name} {list(scale.shape)} holds {value} at {first}; scales must be "
                         "finite")
    return scale


# ------------------------------------------------------------------ DeepSeek-V3 / Qwen3-FP8


def fp8_block_to_fp8(
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    *,
    block: tuple[int, int] = DEEPSEEK_BLOCK,
    group_size: int | None = None,
    name: str = "fp8",
) -> Fp8Weight:
    """One DeepSeek-V3 / Qwen3-FP8 block-quantised linear layer in the kernel layout (format
    facts: module docstring).

    Args:
        weight: ``float8_e4m3fn [N, K]``.
        weight_scale_inv: ``[ceil(N/bn), ceil(K/bk)]``, floating point (float32 in these
            checkpoints; ``float8_e8m0fnu``, transformers' ``scale_fmt="ue8m0"``, is converted
            exactly), or 0-d: one per-tensor scale (a config without ``weight_block_size``),
            expanded per channel.
        block: ``(bn, bk)``, the ``weight_block_size`` of the config; default ``(128, 128)``.
        group_size: the kernels' ``G``; default ``bk`` (see
            :func:`cutlass_moe.fp8.expand_block_scales`).
        name: what the layer is called in error messages (e.g. its state-dict prefix).

    Returns:
        :class:`Fp8Weight` ``(weight, scales float32 [K/G, N])``.

    Raises:
        ValueError: a tensor's dtype or shape is wrong, ``weight`` holds a NaN code, a scale is
            not finite, or ``K`` is not a multiple of ``G``.
    """
    weight = _fp8_matrix(f"{name}.weight", weight)
    scale = _finite_scales(f"{name}.weight_scale_inv", weight_scale_inv)
    n, k = weight.shape
    if scale.dim() == 0:  # per-tensor (a config without weight_block_size)
        return Fp8Weight(weight.contiguous(),
                         scale.to(torch.float32).expand(1, n).contiguous())
    scales = expand_block_scales(scale, n, k, block, group_size=group_size,
                                 name=f"{name}.weight_scale_inv")
    return Fp8Weight(weight.contiguous(), scales)


# ------------------------------------------------------------------ compressed-tensors


def compressed_tensors_to_fp8(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    *,
    block_structure: tuple[int, int] = DEEPSEEK_BLOCK,
    group_size: int | None = None,
    name: str = "compressed-tensors",
) -> Fp8Weight:
    """One compressed-tensors FP8 linear layer in the kernel layout (format facts: module
    docstring). The strategy is read from ``weight_scale``'s shape: ``[1]`` (or 0-d, or
    ``[1, 1]``) per-tensor and ``[N, 1]`` per-channel (both become ``[1, N]``, ``G = K``),
    ``[N, K/G]`` group, anything else block (``[ceil(N/bn), ceil(K/bk)]`` of
    ``block_structure``).

    Args:
        weight: ``float8_e4m3fn [N, K]``.
        weight_scale: as above, floating point.
        weight_zero_point: optional; FP8 weights have none, so it must be all zeros.
        block_structure: ``(bn, bk)`` of a ``block`` strategy; default ``(128, 128)``.
        group_size: block strategy only: the kernels' ``G`` (default ``bk``).
        name: what the layer is called in error messages.

    Returns:
        :class:`Fp8Weight` ``(weight, scales float32 [K/G, N])``.

    Raises:
        ValueError: a tensor's dtype or shape, the group size, a NaN code or a non-finite scale,
            or a nonzero zero point.
    """
    weight = _fp8_matrix(f"{name}.weight", weight)
    scale = _finite_scales(f"{name}.weight_scale", weight_scale)
    n, k = weight.shape
    if weight_zero_point is not None and (
            not isinstance(weight_zero_point, torch.Tensor)
            or bool((weight_zero_point.to(torch.float64) != 0).any())):
        raise ValueError(f"{name}.weight_zero_point must be all zeros (FP8 weights are "
                         f"symmetric; the kernels take no zero points), got "
                         f"{_shape(weight_zero_point)} with nonzero values")
    shape = list(scale.shape)
    if (scale.numel() == 1 and scale.dim() <= 2) or shape == [n, 1]:
        # per-tensor or per-channel: one group per row (G = K)
        scales = scale.reshape(-1).to(torch.float32).expand(n).reshape(1, n)
    elif scale.dim() == 2 and shape[0] == n:
        scales = scale.to(torch.float32).t()
        group_size_of(k, scales, name=f"{name}.weight_scale [N, K/G] (transposed)")
    elif scale.dim() == 2:
        bn, bk = _block_pair(block_structure)
        if shape != [-(-n // bn), -(-k // bk)]:
            raise ValueError(
                f"{name}.weight_scale must be [1] (tensor), [N, 1] = [{n}, 1] (channel), "
                f"[N, K/G] = [{n}, K/G] (group) or [ceil(N/{bn}), ceil(K/{bk})] = "
                f"[{-(-n // bn)}, {-(-k // bk)}] (block, block_structure=({bn}, {bk})) for "
                f"weight [{n}, {k}], got {shape}")
        scales = expand_block_scales(scale, n, k, (bn, bk), group_size=group_size,
                                     name=f"{name}.weight_scale")
    else:
        raise ValueError(f"{name}.weight_scale must be [1], [N, 1], [N, K/G] or block scales "
                         f"[ceil(N/bn), ceil(K/bk)], got {shape}")
    return Fp8Weight(weight.contiguous(), scales.contiguous())


# ------------------------------------------------------------------ a whole MoE layer


@dataclass(frozen=True)
class Fp8Experts:
    """The FP8 tensors of one MoE layer, as :func:`cutlass_moe.cutlass_fused_moe` takes them
    with ``use_fp8_woq_group_scaling=True``: ``fc1`` rows are ``[up; gate]``."""

    fc1_weights: torch.Tensor  #: float8_e4m3fn [E, N1, H] (N1 = 2I rows up then gate, or I)
    fc2_weights: torch.Tensor  #: float8_e4m3fn [E, H, I]
    fc1_scales: torch.Tensor  #: float32 [E, H/G1, N1]
    fc2_scales: torch.Tensor  #: float32 [E, I/G2, H]
    fc1_group_size: int  #: G1
    fc2_group_size: int  #: G2

    @property
    def quant_scales(self) -> list[torch.Tensor]:
        """``[fc31_scales, fc2_scales]``."""
        return [self.fc1_scales, self.fc2_scales]


_TENSORS = {
    "fp8-block": ("weight", "weight_scale_inv"),
    "compressed-tensors": ("weight", "weight_scale", "weight_zero_point"),
}
_REQUIRED = 2
_ALIASES = {"fp8": "fp8-block", "deepseek": "fp8-block", "compressed_tensors": "compressed-tensors",
            "float-quantized": "compressed-tensors", "naive-quantized": "compressed-tensors"}


def _read(state_dict: Mapping[str, torch.Tensor], prefix: str, experts: str, fmt: str,
          block: tuple[int, int], group_size: int | None) -> Fp8Weight:
    names = _TENSORS[fmt]
    tensors = []
    for i, tensor in enumerate(names):
        key = f"{prefix}.{tensor}"
        if key in state_dict:
            tensors.append(state_dict[key])
        elif i < _REQUIRED:
            hint = ""
            if not any(str(other).startswith(experts + ".") for other in state_dict):
                hint = f"; no key starts with {experts + '.'!r} (check the prefix)"
            elif fmt == "fp8-block" and f"{prefix}.weight_scale" in state_dict:
                hint = "; it has weight_scale: a compressed-tensors checkpoint? (fmt=" \
                       "'compressed-tensors')"
            elif fmt == "compressed-tensors" and f"{prefix}.weight_scale_inv" in state_dict:
                hint = "; it has weight_scale_inv: a DeepSeek-style checkpoint? (fmt='fp8-block')"
            raise KeyError(f"load_fp8_experts: {key!r} is missing from the state dict ({fmt} "
                           f"layers need {', '.join(names[:_REQUIRED])}){hint}")
        else:
            tensors.append(None)
    if fmt == "fp8-block":
        return fp8_block_to_fp8(*tensors, block=block, group_size=group_size, name=prefix)
    return compressed_tensors_to_fp8(*tensors, block_structure=block, group_size=group_size,
                                     name=prefix)


def load_fp8_experts(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    num_experts: int,
    fmt: str = "fp8-block",
    *,
    gate: str | None = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
    block: tuple[int, int] = DEEPSEEK_BLOCK,
    group_size: int | None = None,
) -> Fp8Experts:
    """Reads the FP8 experts of one MoE layer and assembles the kernel's tensors.

    Expert ``e``'s projections are read from ``f"{prefix}.{e}.{proj}.{tensor}"``, e.g.
    ``model.layers.3.mlp.experts.5.up_proj.weight`` (``fp8-block``: ``weight``,
    ``weight_scale_inv``; ``compressed-tensors``: ``weight``, ``weight_scale``, optional
    ``weight_zero_point``), converted with :func:`fp8_block_to_fp8` or
    :func:`compressed_tensors_to_fp8`, and stacked:

    - fc1: rows ``[up; gate]`` — weights ``[E, 2I, H]``, scales ``[E, H/G1, 2I]`` (columns up
      then gate); without ``gate`` (non-gated experts) just up, ``[E, I, H]``;
    - fc2: ``down`` — weights ``[E, H, I]``, scales ``[E, I/G2, H]``.

    Args:
        state_dict: a mapping from names to tensors (a ``state_dict()``, safetensors, ...).
        prefix: the experts' prefix, without the expert index (a trailing ``.`` is ignored).
        num_experts: ``E``: experts ``0..E-1`` are read.
        fmt: ``"fp8-block"`` (DeepSeek-V3/R1, Qwen3-FP8; ``"fp8"`` and ``"deepseek"`` are
            accepted) or ``"compressed-tensors"`` (``"compressed_tensors"``,
            ``"float-quantized"`` and ``"naive-quantized"`` too).
        gate, up, down: the projections' names (Mixtral: ``gate="w1", up="w3", down="w2"``);
            ``gate=None`` for non-gated experts.
        block: the block shape of block scales (``weight_block_size`` / ``block_structure``).
        group_size: block scales only: the kernels' ``G`` (default ``block[1]``; a finer
            multiple of 32 serves a ``K`` that is not a multiple of the block width).

    Returns:
        :class:`Fp8Experts` (``.quant_scales`` is the list for ``cutlass_fused_moe``).

    Raises:
        KeyError: a required tensor is missing (the message names its key).
        ValueError: an unknown ``fmt``, a tensor's dtype, shape or values (NaN codes,
            non-finite scales, nonzero zero points), projections or experts that disagree in
            shape or group size, or a layer that breaks the kernels' alignment (H and I
            multiples of 32, N multiples of 8); each message names the tensor.
    """
    fmt = _ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    block = _block_pair(block)
    prefix = prefix.rstrip(".")
    fc1_parts = [up, gate] if gate is not None else [up]
    layers = read_expert_layers(
        "load_fp8_experts", prefix, num_experts, fc1_parts, down,
        lambda where: _read(state_dict, where, prefix, fmt, block, group_size),
        lambda layer: (("weights", layer.weights), ("scales", layer.scales)))
    fc1_weights, fc2_weights = stack_experts(layers, fc1_parts, down, lambda x: x.weights)
    fc1_scales, fc2_scales = stack_experts(layers, fc1_parts, down, lambda x: x.scales, dim=-1)
    try:
        g1, g2 = check_fp8_layer(fc1_weights, fc2_weights, [fc1_scales, fc2_scales])
    except ValueError as exc:
        raise ValueError(f"load_fp8_experts: the experts under {prefix!r} do not make an FP8 MoE "
                         f"layer: {exc}") from None
    return Fp8Experts(fc1_weights, fc2_weights, fc1_scales, fc2_scales, g1, g2)
