"""Validation of the MoE layer's arguments: one home for every rule an entry point checks.

- :func:`check_layer_shape`: the shape rule (``H`` and ``I`` positive multiples of 8, of 16
  with int8 weights, of 32 with int4 weights; ``1 <= top_k <= E*ep_size < 2**31``), shared by
  ``cutlass_fused_moe``,
  the raw op, :func:`cutlass_moe.autotuner.tune_model` and the command line.
- :func:`prepare_call`: everything :func:`cutlass_moe.cutlass_fused_moe` checks and normalises
  before it touches a device (FlashInfer modes, dtypes, shapes, ranks, devices, layouts,
  overlaps); returns the op's arguments.
- :func:`check_op_arguments`: the same rules on the arguments of the registered op
  ``torch.ops.cutlass_moe.fused_moe`` as they arrive (already normalised), for callers that
  reach the op without ``cutlass_fused_moe``; also run by the op's fake kernel under
  ``torch.compile``.
- :func:`check_expert_ids` (host-side id check, synchronises), :func:`check_alignment` and
  :func:`require_cuda`.
- int4 group-wise weight-only weights (W4A16, ``use_w4_group_scaling=True``):
  :func:`int4_group_size` (the group-size rule), :func:`check_int4_alignment`,
  :func:`op_weight_type` / :func:`op_group_sizes` / :func:`op_inter_size` (what the op's kernel
  derives from its arguments). The kernel layout and the call convention are in
  docs/architecture.md and :func:`cutlass_moe.cutlass_fused_moe`'s docstring.
- FP8 (e4m3) and MXFP4 weight-only weights, the two other formats of the group-scaled
  mainloop: FP8 with ``use_fp8_woq_group_scaling=True`` (float8_e4m3fn ``[E, N, K]``, float32
  scales ``[E, K/G, N]``), MXFP4 with ``use_w4_group_scaling=True`` and uint8 (e8m0) scales
  ``[E, K/32, N]`` (the scales' dtype tells it from int4); :func:`check_fp8_alignment`,
  :func:`check_mxfp4_alignment`, :func:`check_group_size`. No zero points for either.

Messages name the argument, its shape or dtype, and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from .activation import (
    ACTIVATION_PARAMETERS,
    ActivationType,
    is_gated,
    normalize_activation,
    require_supported,
)
from .quantization import check_int8_alignment

#: Env var that turns on the host-side expert id check for every call (it synchronises).
CHECK_INPUTS_ENV = "CUTLASS_MOE_CHECK_INPUTS"

ACT_DTYPES = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES_TEXT = (
    "supported: float16 or bfloat16 activations with weights of the same dtype, int8 weights "
    "with use_int8_woq_per_channel=True, packed int4 or MXFP4 weights (uint8) with "
    "use_w4_group_scaling=True, or float8_e4m3fn weights with use_fp8_woq_group_scaling=True"
)
_SUPPORTED_MODES_TEXT = (
    "cutlass_moe supports float16/bfloat16 MoE with weights of the activation dtype or int8 "
    "weight-only per-channel quantization (use_int8_woq_per_channel=True) or int4 group-wise "
    "weight-only quantization (use_w4_group_scaling=True, W4A16; MXFP4 weights with uint8 e8m0 "
    "scales under the same flag) or FP8 (e4m3) group-wise weight-only quantization "
    "(use_fp8_woq_group_scaling=True), with tp/ep parallelism, cluster_size=1 and no all-to-all"
)
#: Why FlashInfer's DeepSeek FP8 block-scale mode is refused, and what serves its weights.
_DEEPSEEK_FP8_TEXT = (
    "FlashInfer's DeepSeek FP8 block-scale mode quantises the activations to fp8 too, which "
    "cutlass_moe does not serve. Its fp8 weights run weight-only: keep float16/bfloat16 input, "
    "pass the float8_e4m3fn weights with use_fp8_woq_group_scaling=True and "
    "quant_scales=[fc31_scales, fc2_scales] float32 [E, K/128, N], the 128x128 block scales "
    "(weight_scale_inv) expanded per column with cutlass_moe.fp8.expand_block_scales"
)
# GEMM operands and the output are read and written with 16-byte vector accesses.
ALIGN_BYTES = 16
ALIGN_ELEMS = 8
# int8 weights: K in steps of 16 elements (16-byte int8 loads).
INT8_ALIGN_ELEMS = 16
#: int4 weights: K (H and I) in steps of 32 elements (16-byte loads of packed nibbles); the
#: group size G is a multiple of it too (int4_spec: 32, 64, 128, or G = K per channel).
INT4_ALIGN_ELEMS = 32
INT4_GROUP_STEP = 32
#: The group sizes documented for int4 weights (any multiple of 32 dividing K works, and K).
INT4_DOCUMENTED_GROUP_SIZES = (32, 64, 128)
#: FP8 and MXFP4 weights: K (H and I) in steps of 32 elements, like int4 (fp8_spec).
FP8_ALIGN_ELEMS = 32
MXFP4_ALIGN_ELEMS = 32
#: MXFP4 scales' N in steps of 16 (16-byte rows of uint8 e8m0 scales).
MXFP4_N_ALIGN_ELEMS = 16
#: MXFP4's group size: one e8m0 scale per 32 elements along K, always (OCP microscaling).
MXFP4_GROUP_SIZE = 32
#: The op's ``weight_format`` of weights whose storage dtype does not say the format (uint8
#: holds int4 and mxfp4; float8_e4m3fn weights are the group-scaled fp8 format), so the op is
#: told; "" = the weights' dtype says it (the input dtype or int8).
WEIGHT_FORMAT_INT4 = "int4"
WEIGHT_FORMAT_FP8 = "fp8"
WEIGHT_FORMAT_MXFP4 = "mxfp4"
WEIGHT_FORMATS = ("", WEIGHT_FORMAT_INT4, WEIGHT_FORMAT_FP8, WEIGHT_FORMAT_MXFP4)
#: The weight formats with group-wise scales ``[E, K/G, N]`` (the group-scaled mainloop).
GROUP_SCALED_FORMATS = (WEIGHT_FORMAT_INT4, WEIGHT_FORMAT_FP8, WEIGHT_FORMAT_MXFP4)
#: The formats stored two per byte along K (``[E, N, K/2]``).
PACKED_FORMATS = (WEIGHT_FORMAT_INT4, WEIGHT_FORMAT_MXFP4)
#: The dtypes of MXFP4's e8m0 scales: uint8, and torch's float8_e8m0fnu where it exists (read
#: as the same bytes).
MXFP4_SCALE_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None))
                           if d is not None)
# Expert ids and offsets are 32-bit on the device.
MAX_EXPERTS_TOTAL = 2**31 - 1
_MAX_BAD_IDS_SHOWN = 8
#: ``weights`` values of :func:`check_layer_shape`.
WEIGHT_KINDS = ("16bit", "int8", "int4", "fp8", "mxfp4")
_KIND_ALIGN = {"16bit": ALIGN_ELEMS, "int8": INT8_ALIGN_ELEMS, "int4": INT4_ALIGN_ELEMS,
               "fp8": FP8_ALIGN_ELEMS, "mxfp4": MXFP4_ALIGN_ELEMS}
_KIND_WHY = {"int8": "16-byte int8 loads", "int4": "16-byte loads of packed int4 weights",
             "fp8": "32-element K slices of the group-scaled fp8 mainloop",
             "mxfp4": "16-byte loads of packed e2m1 weights"}


def check_layer_shape(
    num_experts: int,
    hidden_size: int,
    inter_size: int,
    top_k: int,
    ep_size: int = 1,
    weights: str = "16bit",
) -> None:
    """The layer-shape rule of every entry point: ``num_experts`` (this rank's experts) and
    ``ep_size`` at least 1, ``hidden_size`` and ``inter_size`` positive multiples of 8 (16 for
    ``weights="int8"``: 16-byte int8 loads along K; 32 for ``weights="int4"``, ``"fp8"`` and
    ``"mxfp4"``: the group-scaled mainloop's 32-element K slices),
    ``1 <= top_k <= num_experts*ep_size`` and
    ``num_experts*ep_size < 2**31`` (ids are int32). ValueError saying which part fails."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    if num_experts < 1:
        raise ValueError(f"the layer needs at least one expert, got E_local={num_experts}")
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    align = _KIND_ALIGN[weights]
    for label, size in (("H", hidden_size), ("I", inter_size)):
        if size < 1 or size % ALIGN_ELEMS != 0:
            raise ValueError(
                f"hidden size H={hidden_size} and intermediate size I={inter_size} must be "
                f"positive multiples of {ALIGN_ELEMS} (16-byte aligned GEMM rows); {label}={size} "
                "is not"
            )
        if size % align != 0:
            raise ValueError(
                f"{weights} weights need hidden size H={hidden_size} and intermediate size "
                f"I={inter_size} to be multiples of {align} ({_KIND_WHY[weights]}); "
                f"{label}={size} is not"
            )
    num_experts_total = num_experts * ep_size
    if num_experts_total > MAX_EXPERTS_TOTAL:
        raise ValueError(
            f"E_local*ep_size={num_experts}*{ep_size}={num_experts_total} experts exceed the "
            f"int32 expert ids (at most {MAX_EXPERTS_TOTAL})"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_k > num_experts_total:
        raise ValueError(
            f"top_k={top_k} exceeds the total number of experts E_local*ep_size="
            f"{num_experts}*{ep_size}={num_experts_total}"
        )


class _RefusedFlashInferMode(NotImplementedError, ValueError):
    """A FlashInfer mode that cutlass_moe refuses although part of it is served another way
    (``use_deepseek_fp8_block_scale``): both a ``NotImplementedError`` (like every refused
    FlashInfer mode) and a ``ValueError`` (fp8_spec: a bad argument of the call)."""


class MoeCall(NamedTuple):
    """The op's arguments after validation (tensors contiguous, ids int32, scales float32)."""

    input: torch.Tensor
    token_selected_experts: torch.Tensor
    token_final_scales: torch.Tensor
    fc1_expert_weights: torch.Tensor
    fc2_expert_weights: torch.Tensor
    # int8 weights: fc31_scale [E, N1] and fc2_scale [E, H] (activation dtype); int4, fp8 and
    # mxfp4 weights: group-wise scales [E, H/G1, N1] and [E, I/G2, H] (int4: activation dtype,
    # fp8: float32, mxfp4: uint8 e8m0 with G = 32).
    fc1_weight_scales: torch.Tensor | None
    fc2_weight_scales: torch.Tensor | None
    fc1_weight_zeros: torch.Tensor | None  # int4 with zero points: [E, H/G1, N1]
    fc2_weight_zeros: torch.Tensor | None  # int4 with zero points: [E, I/G2, H]
    # "" (the weights' dtype says it), "int4" or "mxfp4" (packed uint8 weights) or "fp8"
    # (float8_e4m3fn weights with group-wise float32 scales)
    weight_format: str
    fc1_expert_biases: torch.Tensor | None
    fc2_expert_biases: torch.Tensor | None
    swiglu_alpha: torch.Tensor | None
    swiglu_beta: torch.Tensor | None
    swiglu_limit: torch.Tensor | None
    clamped_relu2_limit: torch.Tensor | None  # [1] float32, ClampedRelu2 only
    situ_beta: torch.Tensor | None  # [E] float32, Situ only
    situ_linear_beta: torch.Tensor | None  # [E] float32, Situ only
    output: torch.Tensor | None
    workspace_buffer: torch.Tensor | None
    output_dtype: torch.dtype
    activation: ActivationType
    expert_start: int
    num_experts_total: int
    tactic1: str
    tactic2: str
    raw_token_selected_experts: torch.Tensor


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_unsupported_modes(
    input_sf: torch.Tensor | None,
    cluster_size: int,
    enable_alltoall: bool,
    use_deepseek_fp8_block_scale: bool,
    use_w4_group_scaling: bool,
    use_mxfp8_act_scaling: bool,
    min_latency_mode: bool,
    use_packed_weights: bool,
    use_wfp4afp8_humming: bool,
    profile_ids: Sequence[int] | None,
) -> None:
    # use_w4_group_scaling is served (W4A16); its rules are prepare_call's.
    del use_w4_group_scaling
    if input_sf is not None:
        raise NotImplementedError(f"input_sf (quantized activations) is not supported; "
                                  f"{_SUPPORTED_MODES_TEXT}")
    flags = {
        "use_deepseek_fp8_block_scale": use_deepseek_fp8_block_scale,
        "use_mxfp8_act_scaling": use_mxfp8_act_scaling,
        "use_wfp4afp8_humming": use_wfp4afp8_humming,
        "min_latency_mode": min_latency_mode,
        "enable_alltoall": enable_alltoall,
        "use_packed_weights": use_packed_weights,
    }
    for flag, value in flags.items():
        if value and flag == "use_deepseek_fp8_block_scale":
            raise _RefusedFlashInferMode(f"{flag}=True is not supported; {_SUPPORTED_MODES_TEXT}. "
                                         f"{_DEEPSEEK_FP8_TEXT}")
        if value:
            raise NotImplementedError(f"{flag}=True is not supported; {_SUPPORTED_MODES_TEXT}")
    if cluster_size != 1:
        raise NotImplementedError(
            f"cluster_size={cluster_size} is not supported; {_SUPPORTED_MODES_TEXT}"
        )
    if profile_ids is not None and any(int(p) != -1 for p in profile_ids):
        raise NotImplementedError(
            "profile_ids (FlashInfer tactic indices) are not supported: cutlass_moe names its "
            "tactics; force them with tactics=(gemm1_name, gemm2_name)"
        )


def _check_backend(backend: Any) -> None:
    """FlashInfer 0.7's ``backend``: "cutlass" (this library); its "cake" (a prepared TP8 SiTU
    NVFP4 call) is not implemented; anything else is no backend (ValueError, as FlashInfer)."""
    if backend == "cutlass":
        return
    if backend == "cake":
        raise NotImplementedError(
            "backend='cake' (FlashInfer's prepared TP8-local SiTU NVFP4 call) is not supported; "
            "cutlass_moe implements backend='cutlass' (Situ included: "
            "activation_type=ActivationType.Situ)"
        )
    raise ValueError(f"unsupported fused MoE backend {backend!r}; cutlass_moe implements "
                     "backend='cutlass'")


def _allowed_text(name: str) -> str:
    names = [a.name for a in ACTIVATION_PARAMETERS[name]]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"ActivationType.{listed}"


def check_activation_parameters(
    activation: ActivationType, parameters: Mapping[str, torch.Tensor | None]
) -> None:
    """The per-activation arguments (``swiglu_alpha/beta/limit``, ``situ_beta``,
    ``situ_linear_beta``, ``clamped_relu2_limit``) are accepted only with the activations of
    :data:`~cutlass_moe.activation.ACTIVATION_PARAMETERS`, and ``ClampedRelu2`` needs its
    ``clamped_relu2_limit``: ValueError naming the argument otherwise."""
    for name, tensor in parameters.items():
        if tensor is not None and activation not in ACTIVATION_PARAMETERS[name]:
            raise ValueError(
                f"{name} is only valid with {_allowed_text(name)}, got activation_type "
                f"{activation.name}"
            )
    if activation == ActivationType.ClampedRelu2 and parameters.get("clamped_relu2_limit") is None:
        raise ValueError(
            "activation_type ClampedRelu2 needs clamped_relu2_limit: the model-wide clamp L of "
            "(L * tanh(relu(x) / L))^2 as a one-element float32 tensor on the input's device"
        )


def _exact_float32(name: str, t: Any, shape: list[int], what: str) -> torch.Tensor | None:
    """An optional per-activation tensor of FlashInfer's exact shape and dtype (float32)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _shape(t) != shape or t.dtype != torch.float32:
        raise ValueError(f"{name} must be {what} float32 tensor of shape {shape}, got "
                         f"{_shape(t)} of {t.dtype}")
    return t.contiguous()


def _check_parallel(
    tp_size: int, tp_rank: int, ep_size: int, ep_rank: int, cluster_rank: int
) -> None:
    for name, value in (("tp_size", tp_size), ("ep_size", ep_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, ep_size={ep_size}), got {ep_rank}")
    if cluster_rank != 0:
        raise ValueError(f"cluster_rank must be 0 with cluster_size=1, got {cluster_rank}")


def _float32_vector(
    name: str, t: torch.Tensor | None, num_experts: int
) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] != num_experts:
        raise ValueError(f"{name} must be [E_local={num_experts}], got {_shape(t)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    return t.to(torch.float32).contiguous()


def _no_quant_scales(quant_scales: Any) -> bool:
    """FlashInfer passes None or an empty list for unquantized weights."""
    return quant_scales is None or (
        isinstance(quant_scales, (list, tuple)) and len(quant_scales) == 0
    )


def _int8_scales(
    quant_scales: Any,
    act_dtype: torch.dtype,
    fc1_expected: list[int],
    fc2_expected: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant_scales = [fc31_scale [E, N1], fc2_scale [E, H]]`` of the int8 mode, checked."""
    usage = (
        f"use_int8_woq_per_channel=True needs quant_scales=[fc31_scale {fc1_expected}, "
        f"fc2_scale {fc2_expected}] (per-output-channel scales in the activation dtype "
        f"{act_dtype}; fc31_scale's rows are ordered like fc1's: up, then gate)"
    )
    if quant_scales is None:
        raise ValueError(f"{usage}; got None")
    if not isinstance(quant_scales, (list, tuple)):
        raise TypeError(f"{usage}; got {type(quant_scales).__name__}")
    if len(quant_scales) != 2:
        raise ValueError(f"{usage}; got {len(quant_scales)} tensor(s)")
    checked = []
    for index, (name, scale, expected) in enumerate((
        ("fc31_scale", quant_scales[0], fc1_expected),
        ("fc2_scale", quant_scales[1], fc2_expected),
    )):
        label = f"quant_scales[{index}] ({name})"
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(scale).__name__}")
        if _shape(scale) != expected:
            raise ValueError(
                f"{label} must be {expected} (one scale per output row of the int8 weights), "
                f"got {_shape(scale)}"
            )
        if scale.dtype != act_dtype:
            raise ValueError(
                f"{label} must have the activation dtype {act_dtype}, got {scale.dtype}; "
                "quantize with cutlass_moe.quantization.quantize_int8_per_channel(w, "
                "scale_dtype=<activation dtype>)"
            )
        checked.append(scale)
    return checked[0], checked[1]


# --------------------------------------------------------------------------------------------
# int4 group-wise weight-only weights (W4A16). Kernel layout (int4_spec, docs/architecture.md):
# weights uint8 [E, N, K/2] (byte j of a row holds k = 2j in its low nibble, 2j+1 in its high
# one), scales [E, K/G, N] and optional zeros [E, K/G, N] in the activation dtype; the weight is
# (q - z) * s with z = 8 without zeros. G is never passed: it is K / scales.shape[1].
# --------------------------------------------------------------------------------------------

#: How FlashInfer/TensorRT-LLM's other use_w4_group_scaling mode differs (said in messages).
_W4A8_TEXT = (
    "cutlass_moe serves W4A16 only (float16/bfloat16 activations, int4 weights with group-wise "
    "scales); FlashInfer/TensorRT-LLM's W4A8 mode (fp8 activations, with activation scales and "
    "alphas in quant_scales) is not served"
)


def int4_group_size(label: str, groups: int, k: int, k_name: str) -> int:
    """The group size ``G = K / groups`` of int4 scales with ``groups`` rows along ``K`` (named
    ``k_name``, "H" or "I"): ValueError naming ``label`` unless ``groups`` divides ``K`` and ``G``
    is a multiple of 32 (32, 64, 128, ..., or ``G = K``: per-channel scales ``[E, 1, N]``)."""
    if groups < 1 or k % groups != 0 or (k // groups) % INT4_GROUP_STEP != 0:
        fits = [g for g in INT4_DOCUMENTED_GROUP_SIZES if k % g == 0]
        options = [f"{g} ({k // g} row{'s' if k // g > 1 else ''})" for g in fits]
        if k not in fits:
            options.append(f"per-channel {k} (1 row)")
        valid = options[0] if len(options) == 1 else (", ".join(options[:-1]) + " or "
                                                      + options[-1])
        got = f"G = {k}/{groups} = {k / groups:g}" if groups >= 1 else f"{groups} rows"
        raise ValueError(
            f"{label} has {groups} group rows along {k_name}={k}: the group size G = "
            f"{k_name} / rows must be a multiple of {INT4_GROUP_STEP} that divides {k_name} "
            f"(got {got}); valid here: {valid}"
        )
    return k // groups


def check_int4_group_size(group_size: Any, hidden_size: int, inter_size: int) -> None:
    """One int4 group size ``G`` for both GEMMs of a layer (``cutlass-moe tune/bench
    --group-size``, ``tune_model``): an integer, a multiple of 32, dividing ``H`` and ``I``.
    ValueError saying which part fails and which group sizes the shape allows."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    fits = [g for g in INT4_DOCUMENTED_GROUP_SIZES
            if hidden_size % g == 0 and inter_size % g == 0]
    allowed = (f"; documented group sizes that fit H={hidden_size} and I={inter_size}: "
               + (", ".join(map(str, fits)) if fits else "none of 32, 64, 128"))
    if group_size % INT4_GROUP_STEP != 0:
        raise ValueError(f"group_size={group_size} must be a multiple of {INT4_GROUP_STEP}"
                         f"{allowed}")
    for label, size in (("H", hidden_size), ("I", inter_size)):
        if size % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide the hidden size H="
                             f"{hidden_size} and the intermediate size I={inter_size} (the "
                             f"K of both GEMMs): {label}={size} is not a multiple of "
                             f"{group_size}{allowed}")


def check_int4_alignment(*weights: tuple[str, torch.Tensor, str]) -> None:
    """The int4 kernels' alignment rule for packed weights ``[E, N, K/2]``, given as
    ``(label, tensor, k_name)``: every ``K = 2 * shape[2]`` a multiple of 32, then every ``N``
    a multiple of 8. ValueError naming the first weight that breaks it."""
    for label, w, k_name in weights:
        k = 2 * w.shape[2]
        if k % INT4_ALIGN_ELEMS != 0:
            raise ValueError(
                f"{label} [E, N, K/2] = {_shape(w)}: K={k_name}={k} must be a multiple of "
                f"{INT4_ALIGN_ELEMS} (16-byte loads of packed int4 weights)"
            )
    for label, w, _ in weights:
        if w.shape[1] % ALIGN_ELEMS != 0:
            raise ValueError(
                f"{label} [E, N, K/2] = {_shape(w)}: N={w.shape[1]} must be a multiple of "
                f"{ALIGN_ELEMS}"
            )


def _int4_usage(act_dtype: torch.dtype, fc1_expected: str, fc2_expected: str) -> str:
    return (
        f"use_w4_group_scaling=True needs quant_scales=[fc31_scales {fc1_expected}, fc2_scales "
        f"{fc2_expected}] (symmetric) or [fc31_scales, fc2_scales, fc31_zeros, fc2_zeros] "
        f"(zero points shaped like the scales), all in the activation dtype {act_dtype}; "
        "G is a multiple of 32 dividing K, or K (per-channel); see "
        "cutlass_moe.quantize_int4_groupwise (MXFP4 weights: uint8 e8m0 scales [E, K/32, N], "
        f"see cutlass_moe.quantize_moe_weights_mxfp4). {_W4A8_TEXT}"
    )


def _int4_scale_tensor(
    label: str, t: Any, num_experts: int, n: int, k: int, k_name: str, n_name: str,
    act_dtype: torch.dtype, like: torch.Tensor | None = None,
) -> int:
    """One int4 scales (or zeros, ``like`` its scales) tensor ``[E, K/G, N]``: its group size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    layout = f"[E={num_experts}, {k_name}/G, {n_name}={n}]"
    if like is not None and _shape(t) != _shape(like):
        raise ValueError(
            f"{label} must have the shape of its scales {_shape(like)} (one zero point per "
            f"scale, {layout}), got {_shape(t)} of {t.dtype}"
        )
    if t.dim() != 3 or t.shape[0] != num_experts or t.shape[2] != n:
        hint = ""
        if t.dim() == 3 and t.shape[0] == num_experts and t.shape[1] == n:
            hint = f" (it looks transposed: the kernel layout is [E, {k_name}/G, {n_name}], N " \
                   "contiguous)"
        raise ValueError(
            f"{label} must be {layout} (one row of {n} scales per group of G elements along "
            f"{k_name}={k}), got {_shape(t)}{hint}"
        )
    group = int4_group_size(label, t.shape[1], k, k_name)
    if t.dtype != act_dtype:
        raise ValueError(
            f"{label} must have the activation dtype {act_dtype}, got {t.dtype}; quantize with "
            "cutlass_moe.quantize_int4_groupwise and convert the scales (and zeros) to the "
            "activation dtype"
        )
    return group


def _int4_scales(
    quant_scales: Any,
    act_dtype: torch.dtype,
    num_experts: int,
    hidden_size: int,
    inter_size: int,
    fc1_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``quant_scales`` of the int4 mode, checked: ``(s1, s2, z1, z2)`` (zeros None when
    symmetric). ``[s1, s2, None, None]`` is symmetric too."""
    fc1_expected = f"[E={num_experts}, H/G1, N1={fc1_rows}]"
    fc2_expected = f"[E={num_experts}, I/G2, H={hidden_size}]"
    usage = _int4_usage(act_dtype, fc1_expected, fc2_expected)
    if quant_scales is None:
        raise ValueError(f"{usage}; got None")
    if not isinstance(quant_scales, (list, tuple)):
        raise TypeError(f"{usage}; got {type(quant_scales).__name__}")
    if len(quant_scales) not in (2, 4):
        raise ValueError(f"{usage}; got {len(quant_scales)} tensor(s)")
    entries = list(quant_scales) + [None] * (4 - len(quant_scales))
    s1, s2, z1, z2 = entries
    _int4_scale_tensor("quant_scales[0] (fc31_scales)", s1, num_experts, fc1_rows, hidden_size,
                       "H", "N1", act_dtype)
    _int4_scale_tensor("quant_scales[1] (fc2_scales)", s2, num_experts, hidden_size, inter_size,
                       "I", "H", act_dtype)
    if (z1 is None) != (z2 is None):
        given, missing = ("fc31_zeros", "fc2_zeros") if z2 is None else ("fc2_zeros",
                                                                         "fc31_zeros")
        raise ValueError(
            f"quant_scales has {given} but no {missing}: zero points are given for both GEMMs "
            f"or for neither. {usage}"
        )
    if z1 is not None:
        _int4_scale_tensor("quant_scales[2] (fc31_zeros)", z1, num_experts, fc1_rows,
                           hidden_size, "H", "N1", act_dtype, like=s1)
        _int4_scale_tensor("quant_scales[3] (fc2_zeros)", z2, num_experts, hidden_size,
                           inter_size, "I", "H", act_dtype, like=s2)
    return s1, s2, z1, z2


# --------------------------------------------------------------------------------------------
# FP8 (e4m3) and MXFP4 weight-only weights (fp8_spec): the group-scaled mainloop's other two
# formats. FP8: float8_e4m3fn [E, N, K] with float32 scales [E, K/G, N] (G as int4's rule);
# MXFP4: uint8 [E, N, K/2] (two e2m1 codes per byte, low nibble first) with uint8 e8m0 scales
# [E, K/32, N]. No zero points for either.
# --------------------------------------------------------------------------------------------

_FP8_NOT_E4M3 = (torch.float8_e5m2, getattr(torch, "float8_e4m3fnuz", None),
                 getattr(torch, "float8_e5m2fnuz", None))


def check_group_size(group_size: Any, hidden_size: int, inter_size: int,
                     weights: str = "int4") -> None:
    """One group size ``G`` for both GEMMs of a layer with ``weights`` ``"int4"`` or ``"fp8"``
    (``cutlass-moe tune/bench --group-size``, ``tune_model``): an integer, a multiple of 32,
    dividing ``H`` and ``I``; ``"mxfp4"``: exactly 32. ValueError saying which part fails."""
    if weights == WEIGHT_FORMAT_MXFP4:
        if group_size != MXFP4_GROUP_SIZE or isinstance(group_size, bool):
            raise ValueError(f"group_size={group_size!r}: MXFP4 weights have one e8m0 scale per "
                             f"{MXFP4_GROUP_SIZE} elements along K, always (G = "
                             f"{MXFP4_GROUP_SIZE})")
        return
    check_int4_group_size(group_size, hidden_size, inter_size)


def _check_k_n_alignment(kind: str, k_align: int, n_align: int, pack: int,
                         weights: Sequence[tuple[str, torch.Tensor, str]], why: str) -> None:
    layout = "[E, N, K/2]" if pack == 2 else "[E, N, K]"
    for label, w, k_name in weights:
        k = pack * w.shape[2]
        if k % k_align != 0:
            raise ValueError(f"{label} {layout} = {_shape(w)}: K={k_name}={k} must be a multiple "
                             f"of {k_align} ({why})")
    for label, w, _ in weights:
        if w.shape[1] % n_align != 0:
            raise ValueError(f"{label} {layout} = {_shape(w)}: N={w.shape[1]} must be a multiple "
                             f"of {n_align} ({kind} weights)")


def check_fp8_alignment(*weights: tuple[str, torch.Tensor, str]) -> None:
    """The fp8 kernels' alignment rule for weights ``[E, N, K]``, given as ``(label, tensor,
    k_name)``: every ``K`` a multiple of 32, then every ``N`` a multiple of 8."""
    _check_k_n_alignment("fp8", FP8_ALIGN_ELEMS, ALIGN_ELEMS, 1, weights,
                         _KIND_WHY[WEIGHT_FORMAT_FP8])


def check_mxfp4_alignment(*weights: tuple[str, torch.Tensor, str]) -> None:
    """The mxfp4 kernels' alignment rule for packed weights ``[E, N, K/2]``, given as
    ``(label, tensor, k_name)``: every ``K = 2 * shape[2]`` a multiple of 32, then every ``N`` a
    multiple of 16 (16-byte rows of uint8 scales)."""
    _check_k_n_alignment("mxfp4", MXFP4_ALIGN_ELEMS, MXFP4_N_ALIGN_ELEMS, 2, weights,
                         _KIND_WHY[WEIGHT_FORMAT_MXFP4])


def _is_mxfp4_scale(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in MXFP4_SCALE_DTYPES


def mxfp4_scales_given(quant_scales: Any) -> bool:
    """Whether ``quant_scales`` of a ``use_w4_group_scaling=True`` call hold MXFP4's uint8
    (e8m0) scales (either of its first two entries), which select MXFP4 over int4 (whose scales
    have the activation dtype)."""
    return isinstance(quant_scales, (list, tuple)) and any(
        _is_mxfp4_scale(t) for t in list(quant_scales)[:2])


def _fp8_usage(fc1_expected: str, fc2_expected: str) -> str:
    return (
        f"use_fp8_woq_group_scaling=True needs quant_scales=[fc31_scales {fc1_expected}, "
        f"fc2_scales {fc2_expected}] float32 (one row of N scales per group of G elements along "
        "K; G a multiple of 32 dividing K, or K: per-channel) and no zero points; see "
        "cutlass_moe.fp8.quantize_moe_weights_fp8 (per-tensor scales: expand them to [E, 1, N]; "
        "128x128 block scales: cutlass_moe.fp8.expand_block_scales)"
    )


def _mxfp4_usage(fc1_expected: str, fc2_expected: str) -> str:
    return (
        f"use_w4_group_scaling=True with uint8 (e8m0) scales selects MXFP4 and needs "
        f"quant_scales=[fc31_scales {fc1_expected}, fc2_scales {fc2_expected}] uint8 (one e8m0 "
        f"scale per {MXFP4_GROUP_SIZE} elements along K) and no zero points; see "
        "cutlass_moe.mxfp4.quantize_moe_weights_mxfp4 (int4 weights take scales of the "
        "activation dtype)"
    )


def _scale_list(quant_scales: Any, usage: str, fmt: str) -> tuple[Any, Any]:
    """The two scales of an fp8/mxfp4 ``quant_scales``: ``[s1, s2]`` (or ``[s1, s2, None,
    None]``); zero points are refused (ValueError naming them)."""
    if quant_scales is None:
        raise ValueError(f"{usage}; got None")
    if not isinstance(quant_scales, (list, tuple)):
        raise TypeError(f"{usage}; got {type(quant_scales).__name__}")
    if len(quant_scales) not in (2, 4):
        raise ValueError(f"{usage}; got {len(quant_scales)} tensor(s)")
    for index, name in ((2, "fc31_zeros"), (3, "fc2_zeros")):
        if index < len(quant_scales) and quant_scales[index] is not None:
            raise ValueError(f"quant_scales[{index}] ({name}): {fmt} weights have no zero "
                             f"points. {usage}")
    return quant_scales[0], quant_scales[1]


def _group_scale_tensor(
    label: str, t: Any, num_experts: int, n: int, k: int, k_name: str, n_name: str,
    fmt: str,
) -> int:
    """One fp8 (float32) or mxfp4 (uint8 e8m0) scales tensor ``[E, K/G, N]``: its group size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    mxfp4 = fmt == WEIGHT_FORMAT_MXFP4
    rows = f"{k_name}/{MXFP4_GROUP_SIZE}={k // MXFP4_GROUP_SIZE}" if mxfp4 else f"{k_name}/G"
    layout = f"[E={num_experts}, {rows}, {n_name}={n}]"
    if t.dim() != 3 or t.shape[0] != num_experts or t.shape[2] != n or (
            mxfp4 and t.shape[1] != k // MXFP4_GROUP_SIZE):
        hint = ""
        if t.dim() == 3 and t.shape[0] == num_experts and t.shape[1] == n and t.shape[2] != n:
            hint = (f" (it looks transposed: the kernel layout is [E, {rows}, {n_name}], N "
                    "contiguous)")
        elif not mxfp4 and t.numel() == num_experts:
            hint = (f" (per-tensor scales: expand them to per-channel [E, 1, {n_name}], e.g. "
                    f"s.reshape({num_experts}, 1, 1).expand({num_experts}, 1, {n}).contiguous())")
        elif not mxfp4 and t.dim() == 3 and t.shape[0] == num_experts and \
                (t.shape[1], t.shape[2]) == (-(-n // 128), -(-k // 128)):
            hint = (" (it looks like 128x128 block scales [E, ceil(N/128), ceil(K/128)]: expand "
                    "them per column with cutlass_moe.fp8.expand_block_scales)")
        elif mxfp4 and t.dim() == 3 and t.shape[0] == num_experts and t.shape[2] == n:
            hint = (f" (MXFP4's group size is fixed at {MXFP4_GROUP_SIZE}: {k_name}={k} needs "
                    f"{k // MXFP4_GROUP_SIZE} rows)")
        raise ValueError(
            f"{label} must be {layout} (one row of {n} scales per group of "
            f"{MXFP4_GROUP_SIZE if mxfp4 else 'G'} elements along {k_name}={k}), got "
            f"{_shape(t)}{hint}"
        )
    if mxfp4:
        return MXFP4_GROUP_SIZE
    group = int4_group_size(label, t.shape[1], k, k_name)
    if t.dtype != torch.float32:
        hint = (" (uint8 e8m0 scales are MXFP4's, with use_w4_group_scaling=True)"
                if t.dtype in MXFP4_SCALE_DTYPES else "")
        raise ValueError(f"{label} must be float32 (fp8 weight-only scales), got {t.dtype}{hint}")
    return group


def _fp8_mxfp4_scales(
    quant_scales: Any,
    fmt: str,
    num_experts: int,
    hidden_size: int,
    inter_size: int,
    fc1_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant_scales`` of the fp8 or mxfp4 mode (``fmt``), checked: ``(s1, s2)``; mxfp4
    scales of torch's float8_e8m0fnu are returned as their uint8 bytes."""
    mxfp4 = fmt == WEIGHT_FORMAT_MXFP4
    g = str(MXFP4_GROUP_SIZE) if mxfp4 else ""
    fc1_expected = f"[E={num_experts}, H/{g or 'G1'}, N1={fc1_rows}]"
    fc2_expected = f"[E={num_experts}, I/{g or 'G2'}, H={hidden_size}]"
    usage = (_mxfp4_usage if mxfp4 else _fp8_usage)(fc1_expected, fc2_expected)
    s1, s2 = _scale_list(quant_scales, usage, "MXFP4" if mxfp4 else "fp8")
    if mxfp4:
        for label, t in (("quant_scales[0] (fc31_scales)", s1),
                         ("quant_scales[1] (fc2_scales)", s2)):
            if isinstance(t, torch.Tensor) and t.dtype not in MXFP4_SCALE_DTYPES:
                raise ValueError(
                    f"{label} is {t.dtype} {_shape(t)} while the other GEMM's scales are uint8 "
                    "(e8m0, MXFP4): the two GEMMs' weights must have one format (MXFP4: uint8 "
                    "e8m0 scales for both; int4: scales of the activation dtype for both)"
                )
    _group_scale_tensor("quant_scales[0] (fc31_scales)", s1, num_experts, fc1_rows, hidden_size,
                        "H", "N1", fmt)
    _group_scale_tensor("quant_scales[1] (fc2_scales)", s2, num_experts, hidden_size,
                        inter_size, "I", "H", fmt)
    if mxfp4:
        s1, s2 = (s if s.dtype == torch.uint8 else s.view(torch.uint8) for s in (s1, s2))
    return s1, s2


def prepare_call(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    output_dtype: torch.dtype | None,
    quant_scales: Any,
    fc1_expert_biases: torch.Tensor | None,
    fc2_expert_biases: torch.Tensor | None,
    input_sf: torch.Tensor | None,
    swiglu_alpha: torch.Tensor | None,
    swiglu_beta: torch.Tensor | None,
    swiglu_limit: torch.Tensor | None,
    tp_size: int,
    tp_rank: int,
    ep_size: int,
    ep_rank: int,
    cluster_size: int,
    cluster_rank: int,
    output: torch.Tensor | None,
    enable_alltoall: bool,
    use_deepseek_fp8_block_scale: bool,
    use_w4_group_scaling: bool,
    use_int8_woq_per_channel: bool,
    use_mxfp8_act_scaling: bool,
    min_latency_mode: bool,
    use_packed_weights: bool,
    use_wfp4afp8_humming: bool,
    tune_max_num_tokens: int,
    activation_type: Any,
    profile_ids: Sequence[int] | None,
    workspace_buffer: torch.Tensor | None,
    tactics: Sequence[str] | None,
    clamped_relu2_limit: torch.Tensor | None = None,
    situ_beta: torch.Tensor | None = None,
    situ_linear_beta: torch.Tensor | None = None,
    backend: str = "cutlass",
    use_fp8_woq_group_scaling: bool = False,
) -> MoeCall:
    """Every check that needs no device and no extension; returns the op's arguments."""
    _check_backend(backend)
    _check_unsupported_modes(
        input_sf,
        cluster_size,
        enable_alltoall,
        use_deepseek_fp8_block_scale,
        use_w4_group_scaling,
        use_mxfp8_act_scaling,
        min_latency_mode,
        use_packed_weights,
        use_wfp4afp8_humming,
        profile_ids,
    )
    act = require_supported(normalize_activation(activation_type))
    _check_parallel(tp_size, tp_rank, ep_size, ep_rank, cluster_rank)
    if tune_max_num_tokens < 1:
        raise ValueError(f"tune_max_num_tokens must be >= 1, got {tune_max_num_tokens}")

    tensors = {
        "input": input,
        "token_selected_experts": token_selected_experts,
        "token_final_scales": token_final_scales,
        "fc1_expert_weights": fc1_expert_weights,
        "fc2_expert_weights": fc2_expert_weights,
    }
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")

    # dtypes
    int8 = bool(use_int8_woq_per_channel)
    w4 = bool(use_w4_group_scaling)
    fp8 = bool(use_fp8_woq_group_scaling)
    if int8 and w4:
        raise ValueError(
            "use_w4_group_scaling=True (int4 weights, W4A16) and use_int8_woq_per_channel=True "
            "(int8 weights, W8A16) exclude each other: pass the flag of your weights' format"
        )
    if fp8 and (int8 or w4):
        other = "use_int8_woq_per_channel=True (int8 weights)" if int8 else (
            "use_w4_group_scaling=True (int4 or MXFP4 weights)")
        raise ValueError(
            f"use_fp8_woq_group_scaling=True (float8_e4m3fn weights) and {other} exclude each "
            "other: pass the flag of your weights' format"
        )
    # MXFP4 shares int4's flag and packed uint8 weights: its uint8 (e8m0) scales tell it.
    mxfp4 = w4 and mxfp4_scales_given(quant_scales)
    int4 = w4 and not mxfp4
    if input.dtype not in ACT_DTYPES:
        if fp8:
            raise ValueError(
                f"use_fp8_woq_group_scaling=True with input dtype {input.dtype}: FP8 weight-only "
                "needs float16 or bfloat16 input (fp8 activations, FlashInfer's "
                "use_deepseek_fp8_block_scale mode, are not served)")
        if mxfp4:
            raise ValueError(
                f"use_w4_group_scaling=True with MXFP4 (uint8 e8m0) scales and input dtype "
                f"{input.dtype}: MXFP4 weight-only needs float16 or bfloat16 input (fp8/mxfp8 "
                "activations are not served)")
        if int4:
            raise ValueError(f"use_w4_group_scaling=True with input dtype {input.dtype}: "
                             f"{_W4A8_TEXT}; pass float16 or bfloat16 input")
        raise NotImplementedError(f"input dtype {input.dtype} is not supported; "
                                  f"{_SUPPORTED_DTYPES_TEXT}")
    for name in ("fc1_expert_weights", "fc2_expert_weights"):
        w = tensors[name]
        if fp8:
            if w.dtype != torch.float8_e4m3fn:
                other = (" (only e4m3fn: convert e5m2/fnuz weights through float32 and "
                         "requantise)" if w.dtype in _FP8_NOT_E4M3 else "")
                raise ValueError(
                    f"use_fp8_woq_group_scaling=True needs float8_e4m3fn {name} ([E, N, K], K "
                    f"contiguous), got {w.dtype} {_shape(w)}{other}; quantize them once with "
                    "cutlass_moe.fp8.quantize_moe_weights_fp8"
                )
            continue
        if mxfp4:
            if w.dtype not in (torch.uint8, torch.int8):
                raise ValueError(
                    f"use_w4_group_scaling=True with uint8 (e8m0) scales selects MXFP4 and needs "
                    f"packed {name} (uint8 [E, N, K/2], two e2m1 codes per byte, low nibble "
                    f"first; int8 is read as the same bytes), got {w.dtype} {_shape(w)}; "
                    "quantize them once with cutlass_moe.mxfp4.quantize_moe_weights_mxfp4"
                )
            continue
        if w.dtype == torch.float8_e4m3fn:
            raise ValueError(
                f"{name} is float8_e4m3fn {_shape(w)}: FP8 weight-only weights need "
                "use_fp8_woq_group_scaling=True and quant_scales=[fc31_scales [E, H/G, N1], "
                "fc2_scales [E, I/G, H]] float32"
            )
        if int4:
            if w.dtype not in (torch.uint8, torch.int8):
                raise ValueError(
                    f"use_w4_group_scaling=True needs packed int4 {name} (uint8 [E, N, K/2], two "
                    f"weights per byte, low nibble first; int8 is read as the same bytes), got "
                    f"{w.dtype} {_shape(w)}; quantize them once with "
                    "cutlass_moe.quantize_int4_groupwise"
                )
            continue
        if w.dtype == torch.uint8:
            raise ValueError(
                f"{name} is uint8 {_shape(w)}: packed int4 weights need "
                "use_w4_group_scaling=True and quant_scales=[fc31_scales [E, H/G, N1], "
                "fc2_scales [E, I/G, H]] in the activation dtype (packed MXFP4 weights: the "
                "same flag with uint8 e8m0 scales [E, K/32, N])"
            )
        if int8 and w.dtype != torch.int8:
            raise ValueError(
                f"use_int8_woq_per_channel=True needs int8 {name}, got {w.dtype} "
                f"{_shape(w)}; quantize them once with "
                "cutlass_moe.quantization.quantize_moe_weights_int8"
            )
        if not int8 and w.dtype == torch.int8:
            raise ValueError(
                f"{name} is int8 {_shape(w)}: int8 weight-only quantization needs "
                "use_int8_woq_per_channel=True and quant_scales=[fc31_scale [E, N1], "
                "fc2_scale [E, H]] in the activation dtype"
            )
        if not int8 and w.dtype != input.dtype:
            raise NotImplementedError(
                f"{name} dtype {w.dtype} with input dtype {input.dtype} is not supported; "
                f"{_SUPPORTED_DTYPES_TEXT}"
            )
    if int4 or mxfp4:
        # int8 tensors holding the packed bytes are read as those bytes (a view, no copy).
        fc1_expert_weights, fc2_expert_weights = (
            w.view(torch.uint8) if w.dtype == torch.int8 else w
            for w in (fc1_expert_weights, fc2_expert_weights))
        tensors["fc1_expert_weights"] = fc1_expert_weights
        tensors["fc2_expert_weights"] = fc2_expert_weights
    if not int8 and not w4 and not fp8 and not _no_quant_scales(quant_scales):
        raise NotImplementedError(
            f"quant_scales without use_int8_woq_per_channel=True or use_w4_group_scaling=True is "
            f"not supported, nor without use_fp8_woq_group_scaling=True (FlashInfer's other "
            f"quantization modes are not implemented); {_SUPPORTED_MODES_TEXT}"
        )
    if output_dtype is None:
        output_dtype = input.dtype
    if output_dtype not in (input.dtype, torch.float32):
        raise NotImplementedError(
            f"output_dtype {output_dtype} is not supported with input dtype {input.dtype}; "
            f"supported: the input dtype or torch.float32"
        )

    # shapes
    if input.dim() != 2:
        raise ValueError(f"input must be 2-D [T, H], got shape {_shape(input)}")
    num_tokens, hidden_size = input.shape
    if token_selected_experts.dim() != 2 or token_selected_experts.shape[0] != num_tokens:
        raise ValueError(
            f"token_selected_experts must be [T, k] with T={num_tokens} (input {_shape(input)}), "
            f"got {_shape(token_selected_experts)}"
        )
    top_k = token_selected_experts.shape[1]
    if top_k < 1:
        raise ValueError(f"token_selected_experts must have k >= 1 columns, got "
                         f"{_shape(token_selected_experts)}")
    if token_selected_experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"token_selected_experts must be int32 (int64 is converted), got "
            f"{token_selected_experts.dtype}"
        )
    if token_final_scales.shape != token_selected_experts.shape:
        raise ValueError(
            f"token_final_scales must have the shape of token_selected_experts "
            f"{_shape(token_selected_experts)}, got {_shape(token_final_scales)}"
        )
    if token_final_scales.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"token_final_scales must be float32 (float16/bfloat16 are converted), got "
            f"{token_final_scales.dtype}"
        )
    if fc1_expert_weights.dim() != 3:
        raise ValueError(
            f"fc1_expert_weights must be 3-D [E, N1, H], got {_shape(fc1_expert_weights)}"
        )
    if fc2_expert_weights.dim() != 3:
        raise ValueError(
            f"fc2_expert_weights must be 3-D [E, H, I], got {_shape(fc2_expert_weights)}"
        )
    num_experts, fc1_rows, fc1_cols = fc1_expert_weights.shape
    if num_experts < 1:
        raise ValueError(f"fc1_expert_weights has no experts: {_shape(fc1_expert_weights)}")
    # int4 and mxfp4 weights are packed two per byte along K: [E, N, K/2].
    pack, k_text = (2, "/2") if int4 or mxfp4 else (1, "")
    if fc2_expert_weights.shape[0] != num_experts or fc2_expert_weights.shape[1] != hidden_size:
        raise ValueError(
            f"fc2_expert_weights must be [E={num_experts}, H={hidden_size}, I{k_text}] to match "
            f"fc1_expert_weights {_shape(fc1_expert_weights)} and input {_shape(input)}, got "
            f"{_shape(fc2_expert_weights)}"
        )
    inter_size = fc2_expert_weights.shape[2] * pack
    gated = is_gated(act)
    n1 = 2 * inter_size if gated else inter_size
    if [num_experts, fc1_rows, fc1_cols * pack] != [num_experts, n1, hidden_size]:
        layout = (f"[E, 2*I, H{k_text}] (rows: up, then gate)" if gated
                  else f"[E, I, H{k_text}]")
        expected_fc1 = [num_experts, n1, hidden_size // pack if hidden_size % pack == 0
                        else hidden_size / pack]
        packed = (" (packed int4: two weights per byte)" if int4 else
                  " (packed MXFP4: two e2m1 codes per byte)" if mxfp4 else "")
        raise ValueError(
            f"fc1_expert_weights must be {layout} = {expected_fc1}{packed} for activation "
            f"{act.name} with fc2_expert_weights {_shape(fc2_expert_weights)} and input "
            f"{_shape(input)}, got {_shape(fc1_expert_weights)}"
        )
    if int8:
        check_int8_alignment(("int8 fc1_expert_weights", fc1_expert_weights),
                             ("int8 fc2_expert_weights", fc2_expert_weights))
    if int4:
        check_int4_alignment(("int4 fc1_expert_weights", fc1_expert_weights, "H"),
                             ("int4 fc2_expert_weights", fc2_expert_weights, "I"))
    if fp8:
        check_fp8_alignment(("fp8 fc1_expert_weights", fc1_expert_weights, "H"),
                            ("fp8 fc2_expert_weights", fc2_expert_weights, "I"))
    if mxfp4:
        check_mxfp4_alignment(("mxfp4 fc1_expert_weights", fc1_expert_weights, "H"),
                              ("mxfp4 fc2_expert_weights", fc2_expert_weights, "I"))
    weight_format = (WEIGHT_FORMAT_INT4 if int4 else WEIGHT_FORMAT_FP8 if fp8
                     else WEIGHT_FORMAT_MXFP4 if mxfp4 else "")
    check_layer_shape(num_experts, hidden_size, inter_size, top_k, ep_size,
                      "int8" if int8 else weight_format or "16bit")
    num_experts_total = num_experts * ep_size

    # optional tensors
    for name, bias, expected in (
        ("fc1_expert_biases", fc1_expert_biases, [num_experts, n1]),
        ("fc2_expert_biases", fc2_expert_biases, [num_experts, hidden_size]),
    ):
        if bias is None:
            continue
        if _shape(bias) != expected:
            raise ValueError(f"{name} must be {expected}, got {_shape(bias)}")
        if bias.dtype != input.dtype:
            raise ValueError(f"{name} must have the input dtype {input.dtype}, got {bias.dtype}")
    check_activation_parameters(act, {
        "swiglu_alpha": swiglu_alpha, "swiglu_beta": swiglu_beta, "swiglu_limit": swiglu_limit,
        "situ_beta": situ_beta, "situ_linear_beta": situ_linear_beta,
        "clamped_relu2_limit": clamped_relu2_limit,
    })
    # Swiglu (and SwigluBias) with any of the three is the clamped SwiGLU: the op gets all three.
    clamped = act in (ActivationType.Swiglu, ActivationType.SwigluBias) and any(
        t is not None for t in (swiglu_alpha, swiglu_beta, swiglu_limit))
    situ_beta = _exact_float32("situ_beta", situ_beta, [num_experts], "a per-expert (E_local)")
    situ_linear_beta = _exact_float32("situ_linear_beta", situ_linear_beta, [num_experts],
                                      "a per-expert (E_local)")
    clamped_relu2_limit = _exact_float32("clamped_relu2_limit", clamped_relu2_limit, [1],
                                         "a model-wide one-element")
    fc1_weight_zeros = fc2_weight_zeros = None
    if int4:
        fc1_weight_scales, fc2_weight_scales, fc1_weight_zeros, fc2_weight_zeros = _int4_scales(
            quant_scales, input.dtype, num_experts, hidden_size, inter_size, n1)
        scale_names = ("quant_scales[0] (fc31_scales)", "quant_scales[1] (fc2_scales)")
    elif fp8 or mxfp4:
        fc1_weight_scales, fc2_weight_scales = _fp8_mxfp4_scales(
            quant_scales, weight_format, num_experts, hidden_size, inter_size, n1)
        scale_names = ("quant_scales[0] (fc31_scales)", "quant_scales[1] (fc2_scales)")
    else:
        fc1_weight_scales, fc2_weight_scales = (
            _int8_scales(quant_scales, input.dtype, [num_experts, n1], [num_experts, hidden_size])
            if int8 else (None, None)
        )
        scale_names = ("quant_scales[0] (fc31_scale)", "quant_scales[1] (fc2_scale)")
    swiglu_alpha = _float32_vector("swiglu_alpha", swiglu_alpha, num_experts)
    swiglu_beta = _float32_vector("swiglu_beta", swiglu_beta, num_experts)
    swiglu_limit = _float32_vector("swiglu_limit", swiglu_limit, num_experts)

    # devices
    device = input.device
    named: dict[str, torch.Tensor | None] = {
        **tensors,
        scale_names[0]: fc1_weight_scales,
        scale_names[1]: fc2_weight_scales,
        "quant_scales[2] (fc31_zeros)": fc1_weight_zeros,
        "quant_scales[3] (fc2_zeros)": fc2_weight_zeros,
        "fc1_expert_biases": fc1_expert_biases,
        "fc2_expert_biases": fc2_expert_biases,
        "swiglu_alpha": swiglu_alpha,
        "swiglu_beta": swiglu_beta,
        "swiglu_limit": swiglu_limit,
        "situ_beta": situ_beta,
        "situ_linear_beta": situ_linear_beta,
        "clamped_relu2_limit": clamped_relu2_limit,
        "output": output,
        "workspace_buffer": workspace_buffer,
    }
    elsewhere = [
        f"{name} on {t.device}" for name, t in named.items() if t is not None and t.device != device
    ]
    if elsewhere:
        raise ValueError(
            f"all tensors must be on input's device {device}; found " + ", ".join(elsewhere)
        )

    for name in ("fc1_expert_weights", "fc2_expert_weights"):
        if not tensors[name].is_contiguous():
            raise ValueError(
                f"{name} must be contiguous (stride {list(tensors[name].stride())} for shape "
                f"{_shape(tensors[name])}); call .contiguous() once at load time"
            )

    if output is not None:
        expected_out = [num_tokens, hidden_size]
        if _shape(output) != expected_out or output.dtype != output_dtype:
            raise ValueError(
                f"output must be {expected_out} of dtype {output_dtype}, got {_shape(output)} of "
                f"{output.dtype}"
            )
        if not output.is_contiguous():
            raise ValueError(f"output must be contiguous, got stride {list(output.stride())}")
    if workspace_buffer is not None and (
        workspace_buffer.dtype not in (torch.uint8, torch.int8)
        or workspace_buffer.dim() != 1
        or not workspace_buffer.is_contiguous()
    ):
        raise ValueError(
            f"workspace_buffer must be a contiguous 1-D uint8 tensor, got {workspace_buffer.dtype} "
            f"{_shape(workspace_buffer)}"
        )

    if tactics is None:
        tactic1, tactic2 = "", ""
    else:
        if isinstance(tactics, str) or len(tactics) != 2:
            raise ValueError(f"tactics must be (gemm1_name, gemm2_name), got {tactics!r}")
        tactic1, tactic2 = (str(t) for t in tactics)

    # normalisation (no host synchronisation)
    raw_ids = token_selected_experts
    if token_selected_experts.dtype == torch.int64:
        # Keep out-of-range ids out of range when narrowing (they must contribute zero).
        token_selected_experts = token_selected_experts.clamp(-1, num_experts_total).to(
            torch.int32
        )
    if token_final_scales.dtype != torch.float32:
        token_final_scales = token_final_scales.to(torch.float32)
    if clamped:
        if swiglu_alpha is None:
            swiglu_alpha = torch.full((num_experts,), 1.0, dtype=torch.float32, device=device)
        if swiglu_beta is None:
            swiglu_beta = torch.full((num_experts,), 0.0, dtype=torch.float32, device=device)
        if swiglu_limit is None:
            swiglu_limit = torch.full(
                (num_experts,), torch.finfo(torch.float32).max, dtype=torch.float32, device=device
            )

    call = MoeCall(
        input=input.contiguous(),
        token_selected_experts=token_selected_experts.contiguous(),
        token_final_scales=token_final_scales.contiguous(),
        fc1_expert_weights=fc1_expert_weights,
        fc2_expert_weights=fc2_expert_weights,
        fc1_weight_scales=None if fc1_weight_scales is None else fc1_weight_scales.contiguous(),
        fc2_weight_scales=None if fc2_weight_scales is None else fc2_weight_scales.contiguous(),
        fc1_weight_zeros=None if fc1_weight_zeros is None else fc1_weight_zeros.contiguous(),
        fc2_weight_zeros=None if fc2_weight_zeros is None else fc2_weight_zeros.contiguous(),
        weight_format=weight_format,
        fc1_expert_biases=None if fc1_expert_biases is None else fc1_expert_biases.contiguous(),
        # Tensor parallelism: every rank computes a partial sum, b2 is added once (rank 0).
        fc2_expert_biases=(
            fc2_expert_biases.contiguous()
            if fc2_expert_biases is not None and tp_rank == 0
            else None
        ),
        swiglu_alpha=swiglu_alpha,
        swiglu_beta=swiglu_beta,
        swiglu_limit=swiglu_limit,
        clamped_relu2_limit=clamped_relu2_limit,
        situ_beta=situ_beta,
        situ_linear_beta=situ_linear_beta,
        output=output,
        workspace_buffer=workspace_buffer,
        output_dtype=output_dtype,
        activation=act,
        expert_start=ep_rank * num_experts,
        num_experts_total=num_experts_total,
        tactic1=tactic1,
        tactic2=tactic2,
        raw_token_selected_experts=raw_ids,
    )
    if not torch.compiler.is_compiling():  # traced tensors have no memory to compare
        check_overlaps(call.output, call.workspace_buffer, _read_tensors(call))
    return call


def _read_tensors(call: MoeCall) -> dict[str, torch.Tensor | None]:
    """The tensors a call reads, by argument name (what output and workspace must not hit)."""
    scales = "scales" if call.weight_format in GROUP_SCALED_FORMATS else "scale"
    return {
        "input": call.input,
        "token_selected_experts": call.token_selected_experts,
        "token_final_scales": call.token_final_scales,
        "fc1_expert_weights": call.fc1_expert_weights,
        "fc2_expert_weights": call.fc2_expert_weights,
        f"quant_scales[0] (fc31_{scales})": call.fc1_weight_scales,
        f"quant_scales[1] (fc2_{scales})": call.fc2_weight_scales,
        "quant_scales[2] (fc31_zeros)": call.fc1_weight_zeros,
        "quant_scales[3] (fc2_zeros)": call.fc2_weight_zeros,
        "fc1_expert_biases": call.fc1_expert_biases,
        "fc2_expert_biases": call.fc2_expert_biases,
        "swiglu_alpha": call.swiglu_alpha,
        "swiglu_beta": call.swiglu_beta,
        "swiglu_limit": call.swiglu_limit,
        "clamped_relu2_limit": call.clamped_relu2_limit,
        "situ_beta": call.situ_beta,
        "situ_linear_beta": call.situ_linear_beta,
    }


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` bytes a tensor's elements span in its device's memory."""
    if t.numel() == 0:
        return (0, 0)
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    first = t.data_ptr()
    return first, first + span * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < a1 and b0 < b1 and a0 < b1 and b0 < a1


def check_overlaps(
    output: torch.Tensor | None,
    workspace: torch.Tensor | None,
    read: Mapping[str, torch.Tensor | None],
) -> None:
    """ValueError when ``output`` or ``workspace`` shares memory with a tensor the call reads
    (finalize writes the output while it still reads ids, router weights and biases; the
    workspace is written from the first kernel on), or with each other."""
    for label, written in (("output", output), ("workspace_buffer", workspace)):
        if written is None:
            continue
        for name, tensor in read.items():
            if tensor is not None and _overlap(written, tensor):
                raise ValueError(
                    f"{label} overlaps {name} in memory: the call writes {label} while it "
                    f"still reads {name}; pass separate tensors"
                )
    if output is not None and workspace is not None and _overlap(output, workspace):
        raise ValueError(
            "output overlaps workspace_buffer in memory: the call uses the workspace while it "
            "writes the output; pass separate tensors"
        )


#: Op arguments the kernels read or write with 16-byte vector accesses.
ALIGNED_ARGUMENTS = ("input", "fc1_expert_weights", "fc2_expert_weights", "fc1_weight_scales",
                     "fc2_weight_scales", "fc1_weight_zeros", "fc2_weight_zeros",
                     "fc1_expert_biases", "fc2_expert_biases", "output", "workspace_buffer")


def check_alignment(args: OpArguments) -> None:
    """ValueError for a tensor of :data:`ALIGNED_ARGUMENTS` whose data does not start on a
    16-byte boundary."""
    for name in ALIGNED_ARGUMENTS:
        tensor = getattr(args, name)
        if tensor is not None and tensor.data_ptr() % ALIGN_BYTES != 0:
            raise ValueError(
                f"{name} must be {ALIGN_BYTES}-byte aligned (data_ptr {tensor.data_ptr():#x}); "
                "pass a tensor that does not start at an odd offset into its storage"
            )


def _expect(name: str, t: torch.Tensor | None, shape: Sequence[int],
            dtypes: Sequence[torch.dtype]) -> None:
    """One op argument: a contiguous tensor of ``shape`` and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _shape(t) != list(shape) or t.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must be {list(shape)} of {wanted}, got {_shape(t)} of {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got stride {list(t.stride())}")


class OpArguments(NamedTuple):
    """The arguments of the registered op ``cutlass_moe::fused_moe``, in its schema's order
    (the one definition of that list besides the schema string in ``ops``)."""

    output: torch.Tensor  # [T, H], input dtype or float32; written
    input: torch.Tensor  # [T, H] float16/bfloat16
    token_selected_experts: torch.Tensor  # [T, k] int32 global expert ids
    token_final_scales: torch.Tensor  # [T, k] float32 router weights
    # [E, N1, H], input dtype or int8 (fp8: float8_e4m3fn); int4/mxfp4: uint8 [E, N1, H/2]
    fc1_expert_weights: torch.Tensor
    fc2_expert_weights: torch.Tensor  # [E, H, I], as fc1; int4/mxfp4: uint8 [E, H, I/2]
    # int8: [E, N1] and [E, H], input dtype; int4/fp8/mxfp4: [E, H/G1, N1] and [E, I/G2, H]
    # (int4: input dtype, fp8: float32, mxfp4: uint8 e8m0 with G = 32)
    fc1_weight_scales: torch.Tensor | None
    fc2_weight_scales: torch.Tensor | None
    fc1_expert_biases: torch.Tensor | None  # [E, N1], input dtype
    fc2_expert_biases: torch.Tensor | None  # [E, H], input dtype
    swiglu_alpha: torch.Tensor | None  # [E] float32: all three clamp tensors, or none
    swiglu_beta: torch.Tensor | None
    swiglu_limit: torch.Tensor | None
    workspace_buffer: torch.Tensor | None  # 1-D uint8; written
    activation: int  # an ActivationType value
    expert_start: int  # this rank's first global expert id
    num_experts_total: int  # E * ep_size
    tune_max_num_tokens: int
    tactic1: str  # tactic names; "" for the AutoTuner's choice
    tactic2: str
    enable_pdl: bool = True
    # FlashInfer 0.7's per-activation tensors (after enable_pdl, so that positional callers of
    # the older schema keep working): accepted only with their activation.
    clamped_relu2_limit: torch.Tensor | None = None  # [1] float32, required with ClampedRelu2
    situ_beta: torch.Tensor | None = None  # [E] float32, Situ (default 4)
    situ_linear_beta: torch.Tensor | None = None  # [E] float32, Situ (default 25)
    # int4 group-wise weight-only (after the above, for the same reason): optional zero points
    # shaped like the scales (both or neither; int4 only), and the weight format ("int4" or
    # "mxfp4" for packed uint8 weights, "fp8" for float8_e4m3fn ones; "" when the weights'
    # dtype says it: the input dtype or int8).
    fc1_weight_zeros: torch.Tensor | None = None  # int4: [E, H/G1, N1], input dtype
    fc2_weight_zeros: torch.Tensor | None = None  # int4: [E, I/G2, H], input dtype
    weight_format: str = ""


def op_weight_type(args: OpArguments) -> torch.dtype | str:
    """The weight entry of the op's runner triple: the weights' dtype, or the op's
    ``weight_format`` tag (``"int4"``, ``"fp8"``, ``"mxfp4"``; see :mod:`cutlass_moe._ext`)."""
    return args.weight_format or args.fc1_expert_weights.dtype


def op_inter_size(args: OpArguments) -> int:
    """``I`` of the op's call (fc2's ``K``; packed int4/mxfp4 weights hold two per byte)."""
    pack = 2 if args.weight_format in PACKED_FORMATS else 1
    return args.fc2_expert_weights.shape[2] * pack


def op_group_sizes(args: OpArguments) -> tuple[int, int]:
    """``(G1, G2)`` of int4 and fp8 weights: ``H / fc1_weight_scales.shape[1]`` and
    ``I / fc2_weight_scales.shape[1]``; ``(32, 32)`` for mxfp4; ``(0, 0)`` for other weights.
    Arguments checked."""
    if args.weight_format == WEIGHT_FORMAT_MXFP4:
        return MXFP4_GROUP_SIZE, MXFP4_GROUP_SIZE
    if args.weight_format not in (WEIGHT_FORMAT_INT4, WEIGHT_FORMAT_FP8):
        return 0, 0
    hidden_size, inter_size = args.input.shape[1], op_inter_size(args)
    return (hidden_size // args.fc1_weight_scales.shape[1],
            inter_size // args.fc2_weight_scales.shape[1])


def op_activation(activation: int) -> ActivationType:
    """The ``ActivationType`` of the op's ``activation`` argument (ValueError for another
    value)."""
    try:
        return ActivationType(activation)
    except ValueError:
        raise ValueError(f"activation {activation} is not an ActivationType value") from None


def check_op_arguments(args: OpArguments, *, traced: bool = False) -> None:
    """Every rule of the registered op ``cutlass_moe::fused_moe`` on its arguments as they
    arrive (already normalised: ids int32, router weights float32, tensors contiguous), so that
    nothing inconsistent reaches the kernels. ``traced``: fake tensors under ``torch.compile``,
    whose memory cannot be compared (overlaps are then left to the run)."""
    (output, input, token_selected_experts, token_final_scales, fc1_expert_weights,
     fc2_expert_weights, fc1_weight_scales, fc2_weight_scales, fc1_expert_biases,
     fc2_expert_biases, swiglu_alpha, swiglu_beta, swiglu_limit, workspace_buffer, _,
     expert_start, num_experts_total, tune_max_num_tokens, *_) = args
    activation = op_activation(args.activation)
    if not isinstance(input, torch.Tensor) or input.dim() != 2:
        raise ValueError("input must be a 2-D [T, H] tensor")
    if input.dtype not in ACT_DTYPES:
        raise ValueError(f"input must be float16 or bfloat16, got {input.dtype}")
    num_tokens, hidden_size = input.shape
    act_dtype = input.dtype
    if not isinstance(fc1_expert_weights, torch.Tensor) or fc1_expert_weights.dim() != 3 or \
            not isinstance(fc2_expert_weights, torch.Tensor) or fc2_expert_weights.dim() != 3:
        raise ValueError("fc1_expert_weights and fc2_expert_weights must be 3-D [E, N, K]")
    weight_format = args.weight_format
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    int4 = weight_format == WEIGHT_FORMAT_INT4
    fp8 = weight_format == WEIGHT_FORMAT_FP8
    mxfp4 = weight_format == WEIGHT_FORMAT_MXFP4
    packed_format = weight_format in PACKED_FORMATS
    num_experts = fc1_expert_weights.shape[0]
    inter_size = fc2_expert_weights.shape[2] * (2 if packed_format else 1)
    weight_dtype = fc1_expert_weights.dtype
    if packed_format and weight_dtype != torch.uint8:
        raise ValueError(f"weight_format {weight_format!r} needs packed uint8 fc1_expert_weights "
                         f"[E, N1, H/2], got {weight_dtype}")
    if fp8 and weight_dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight_format 'fp8' needs float8_e4m3fn fc1_expert_weights "
                         f"[E, N1, H], got {weight_dtype}")
    if not weight_format and weight_dtype not in (act_dtype, torch.int8):
        packed = (" (packed uint8 int4 weights need weight_format='int4', MXFP4 ones 'mxfp4')"
                  if weight_dtype == torch.uint8 else
                  " (float8_e4m3fn weights need weight_format='fp8')"
                  if weight_dtype == torch.float8_e4m3fn else "")
        raise ValueError(f"fc1_expert_weights must be {act_dtype} or int8, got "
                         f"{weight_dtype}{packed}")
    int8 = weight_dtype == torch.int8
    if not isinstance(token_selected_experts, torch.Tensor) or \
            token_selected_experts.dim() != 2:
        raise ValueError("token_selected_experts must be a 2-D [T, k] tensor")
    top_k = token_selected_experts.shape[1]
    if expert_start < 0 or num_experts_total < 1 or \
            expert_start + num_experts > num_experts_total:
        raise ValueError(
            f"expert_start={expert_start} and num_experts_total={num_experts_total} must "
            f"hold this rank's {num_experts} experts: 0 <= expert_start and expert_start + "
            "E_local <= num_experts_total"
        )
    ep_size = max(1, num_experts_total // num_experts)
    check_layer_shape(num_experts, hidden_size, inter_size, 1, ep_size,
                      "int8" if int8 else weight_format or "16bit")
    if num_experts_total > MAX_EXPERTS_TOTAL:
        raise ValueError(f"num_experts_total={num_experts_total} exceeds the int32 expert ids")
    if not 1 <= top_k <= num_experts_total:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts_total={num_experts_total}]")
    if tune_max_num_tokens < 1:
        raise ValueError(f"tune_max_num_tokens must be >= 1, got {tune_max_num_tokens}")
    require_supported(activation)
    fc1_rows = 2 * inter_size if is_gated(activation) else inter_size
    weight_dtypes = (weight_dtype,)
    _expect("input", input, [num_tokens, hidden_size], ACT_DTYPES)
    _expect("token_selected_experts", token_selected_experts, [num_tokens, top_k],
            (torch.int32,))
    _expect("token_final_scales", token_final_scales, [num_tokens, top_k], (torch.float32,))
    pack = 2 if packed_format else 1
    _expect("fc1_expert_weights", fc1_expert_weights,
            [num_experts, fc1_rows, hidden_size // pack], weight_dtypes)
    _expect("fc2_expert_weights", fc2_expert_weights,
            [num_experts, hidden_size, inter_size // pack], weight_dtypes)
    _expect("output", output, [num_tokens, hidden_size], (act_dtype, torch.float32))
    if int8:
        check_int8_alignment(("int8 fc1_expert_weights", fc1_expert_weights),
                             ("int8 fc2_expert_weights", fc2_expert_weights))
        if fc1_weight_scales is None or fc2_weight_scales is None:
            raise ValueError("int8 expert weights need fc1_weight_scales and fc2_weight_scales "
                             "(per-output-channel scales in the input dtype)")
        _expect("fc1_weight_scales", fc1_weight_scales, [num_experts, fc1_rows], (act_dtype,))
        _expect("fc2_weight_scales", fc2_weight_scales, [num_experts, hidden_size],
                (act_dtype,))
    elif int4:
        if fc1_weight_scales is None or fc2_weight_scales is None:
            raise ValueError("int4 expert weights need fc1_weight_scales and fc2_weight_scales "
                             "(group-wise scales [E, H/G1, N1] and [E, I/G2, H] in the input "
                             "dtype)")
        for name, t, n, k, k_name in (
                ("fc1_weight_scales", fc1_weight_scales, fc1_rows, hidden_size, "H"),
                ("fc2_weight_scales", fc2_weight_scales, hidden_size, inter_size, "I")):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D [E, {k_name}/G, N] tensor")
            _expect(name, t, [num_experts, t.shape[1], n], (act_dtype,))
            int4_group_size(name, t.shape[1], k, k_name)
        zeros = (args.fc1_weight_zeros, args.fc2_weight_zeros)
        if (zeros[0] is None) != (zeros[1] is None):
            raise ValueError("fc1_weight_zeros and fc2_weight_zeros are given for both GEMMs or "
                             "for neither")
        if zeros[0] is not None:
            _expect("fc1_weight_zeros", zeros[0], _shape(fc1_weight_scales), (act_dtype,))
            _expect("fc2_weight_zeros", zeros[1], _shape(fc2_weight_scales), (act_dtype,))
    elif fp8 or mxfp4:
        what = ("group-wise float32 scales [E, H/G1, N1] and [E, I/G2, H]" if fp8 else
                f"uint8 e8m0 scales [E, H/{MXFP4_GROUP_SIZE}, N1] and "
                f"[E, I/{MXFP4_GROUP_SIZE}, H]")
        if fc1_weight_scales is None or fc2_weight_scales is None:
            raise ValueError(f"{weight_format} expert weights need fc1_weight_scales and "
                             f"fc2_weight_scales ({what})")
        for name, t, n, k, k_name in (
                ("fc1_weight_scales", fc1_weight_scales, fc1_rows, hidden_size, "H"),
                ("fc2_weight_scales", fc2_weight_scales, hidden_size, inter_size, "I")):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D [E, {k_name}/G, N] tensor")
            if fp8:
                _expect(name, t, [num_experts, t.shape[1], n], (torch.float32,))
                int4_group_size(name, t.shape[1], k, k_name)
            else:
                _expect(name, t, [num_experts, k // MXFP4_GROUP_SIZE, n], (torch.uint8,))
    elif fc1_weight_scales is not None or fc2_weight_scales is not None:
        raise ValueError("fc1_weight_scales and fc2_weight_scales are only for int8 or int4 "
                         "weights (or fp8 / mxfp4 ones with their weight_format)")
    if not int4 and (args.fc1_weight_zeros is not None or args.fc2_weight_zeros is not None):
        raise ValueError("fc1_weight_zeros and fc2_weight_zeros are only for int4 weights "
                         "(weight_format='int4')")
    if fc1_expert_biases is not None:
        _expect("fc1_expert_biases", fc1_expert_biases, [num_experts, fc1_rows], (act_dtype,))
    if fc2_expert_biases is not None:
        _expect("fc2_expert_biases", fc2_expert_biases, [num_experts, hidden_size],
                (act_dtype,))
    clamp = {"swiglu_alpha": swiglu_alpha, "swiglu_beta": swiglu_beta,
             "swiglu_limit": swiglu_limit}
    situ = {"situ_beta": args.situ_beta, "situ_linear_beta": args.situ_linear_beta}
    check_activation_parameters(
        activation, {**clamp, **situ, "clamped_relu2_limit": args.clamped_relu2_limit})
    if activation in (ActivationType.Swiglu, ActivationType.SwigluBias) and \
            any(t is not None for t in clamp.values()):
        for name, t in clamp.items():
            if t is None:
                raise ValueError(f"{name} is required when any of swiglu_alpha/beta/limit is")
    for name, t in {**clamp, **situ}.items():
        if t is not None:
            _expect(name, t, [num_experts], (torch.float32,))
    if args.clamped_relu2_limit is not None:
        _expect("clamped_relu2_limit", args.clamped_relu2_limit, [1], (torch.float32,))
    if workspace_buffer is not None:
        _expect("workspace_buffer", workspace_buffer, [workspace_buffer.numel()],
                (torch.uint8, torch.int8))
    named = {name: t for name, t in args._asdict().items() if isinstance(t, torch.Tensor)}
    elsewhere = [f"{name} on {t.device}" for name, t in named.items()
                 if t is not None and t.device != input.device]
    if elsewhere:
        raise ValueError(f"all tensors must be on input's device {input.device}; found "
                         + ", ".join(elsewhere))
    if not traced:
        read = {k: v for k, v in named.items() if k not in ("output", "workspace_buffer")}
        check_overlaps(output, workspace_buffer, read)


def check_expert_ids(token_selected_experts: torch.Tensor, num_experts_total: int) -> None:
    """Raises ``ValueError`` when ids fall outside ``[0, num_experts_total)``: how many entries
    do, the first few distinct values, how many distinct values there are and where the first
    bad entry is (``[token, choice]``).

    Synchronises with the host (it reads the ids back); not for CUDA graph capture.
    """
    ids = token_selected_experts
    mask = (ids < 0) | (ids >= num_experts_total)
    bad = ids[mask]
    count = bad.numel()
    if count == 0:
        return
    values = torch.unique(bad).cpu().tolist()
    shown = ", ".join(str(v) for v in values[:_MAX_BAD_IDS_SHOWN])
    hidden = len(values) - _MAX_BAD_IDS_SHOWN
    more = f" and {hidden} more" if hidden > 0 else ""
    where = "[" + ", ".join(str(i) for i in torch.nonzero(mask)[0].tolist()) + "]"
    if count == 1:
        detail = f"at {where}"
    else:
        distinct = len(values)
        detail = (f"{distinct} distinct value{'s' if distinct > 1 else ''}; the first at "
                  f"{where}")
    raise ValueError(
        f"token_selected_experts has {count} {'entry' if count == 1 else 'entries'} outside "
        f"[0, {num_experts_total}): {shown}{more} ({detail})"
    )


def check_inputs_from_env() -> bool:
    return os.environ.get(CHECK_INPUTS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def require_cuda(device: torch.device) -> None:
    if device.type == "cuda":  # a CUDA tensor exists, so CUDA is available
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            "no CUDA device is available: cutlass_moe's fused MoE runs on NVIDIA GPUs "
            "(sm_80 or newer) and this process sees none (check the driver and "
            "CUDA_VISIBLE_DEVICES)"
        )
    if device.type != "cuda":
        raise ValueError(f"cutlass_fused_moe needs CUDA tensors, got tensors on {device}")


