"""Validation of the MoE layer's arguments: one home for every rule an entry point checks.

- :func:`check_layer_shape`: the shape rule (``H`` and ``I`` positive multiples of 8, of 16
  with int8 weights; ``1 <= top_k <= E*ep_size < 2**31``), shared by ``cutlass_fused_moe``,
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
    "supported: float16 or bfloat16 activations with weights of the same dtype, or int8 weights "
    "with use_int8_woq_per_channel=True"
)
_SUPPORTED_MODES_TEXT = (
    "cutlass_moe supports float16/bfloat16 MoE with weights of the activation dtype or int8 "
    "weight-only per-channel quantization (use_int8_woq_per_channel=True), with tp/ep "
    "parallelism, cluster_size=1 and no all-to-all"
)
# GEMM operands and the output are read and written with 16-byte vector accesses.
ALIGN_BYTES = 16
ALIGN_ELEMS = 8
# int8 weights: K in steps of 16 elements (16-byte int8 loads).
INT8_ALIGN_ELEMS = 16
# Expert ids and offsets are 32-bit on the device.
MAX_EXPERTS_TOTAL = 2**31 - 1
_MAX_BAD_IDS_SHOWN = 8
#: ``weights`` values of :func:`check_layer_shape`.
WEIGHT_KINDS = ("16bit", "int8")


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
    ``weights="int8"``: 16-byte int8 loads along K), ``1 <= top_k <= num_experts*ep_size`` and
    ``num_experts*ep_size < 2**31`` (ids are int32). ValueError saying which part fails."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    if num_experts < 1:
        raise ValueError(f"the layer needs at least one expert, got E_local={num_experts}")
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    align = INT8_ALIGN_ELEMS if weights == "int8" else ALIGN_ELEMS
    for label, size in (("H", hidden_size), ("I", inter_size)):
        if size < 1 or size % ALIGN_ELEMS != 0:
            raise ValueError(
                f"hidden size H={hidden_size} and intermediate size I={inter_size} must be "
                f"positive multiples of {ALIGN_ELEMS} (16-byte aligned GEMM rows); {label}={size} "
                "is not"
            )
        if size % align != 0:
            raise ValueError(
                f"int8 weights need hidden size H={hidden_size} and intermediate size "
                f"I={inter_size} to be multiples of {align} (16-byte int8 loads); {label}={size} "
                "is not"
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


class MoeCall(NamedTuple):
    """The op's arguments after validation (tensors contiguous, ids int32, scales float32)."""

    input: torch.Tensor
    token_selected_experts: torch.Tensor
    token_final_scales: torch.Tensor
    fc1_expert_weights: torch.Tensor
    fc2_expert_weights: torch.Tensor
    fc1_weight_scales: torch.Tensor | None  # int8 weights: fc31_scale [E, N1], activation dtype
    fc2_weight_scales: torch.Tensor | None  # int8 weights: fc2_scale [E, H], activation dtype
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
    if input_sf is not None:
        raise NotImplementedError(f"input_sf (quantized activations) is not supported; "
                                  f"{_SUPPORTED_MODES_TEXT}")
    flags = {
        "use_deepseek_fp8_block_scale": use_deepseek_fp8_block_scale,
        "use_w4_group_scaling": use_w4_group_scaling,
        "use_mxfp8_act_scaling": use_mxfp8_act_scaling,
        "use_wfp4afp8_humming": use_wfp4afp8_humming,
        "min_latency_mode": min_latency_mode,
        "enable_alltoall": enable_alltoall,
        "use_packed_weights": use_packed_weights,
    }
    for flag, value in flags.items():
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
    if input.dtype not in ACT_DTYPES:
        raise NotImplementedError(f"input dtype {input.dtype} is not supported; "
                                  f"{_SUPPORTED_DTYPES_TEXT}")
    int8 = bool(use_int8_woq_per_channel)
    for name in ("fc1_expert_weights", "fc2_expert_weights"):
        w = tensors[name]
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
    if not int8 and not _no_quant_scales(quant_scales):
        raise NotImplementedError(
            f"quant_scales without use_int8_woq_per_channel=True is not supported (FlashInfer's "
            f"other quantization modes are not implemented); {_SUPPORTED_MODES_TEXT}"
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
    if fc2_expert_weights.shape[0] != num_experts or fc2_expert_weights.shape[1] != hidden_size:
        raise ValueError(
            f"fc2_expert_weights must be [E={num_experts}, H={hidden_size}, I] to match "
            f"fc1_expert_weights {_shape(fc1_expert_weights)} and input {_shape(input)}, got "
            f"{_shape(fc2_expert_weights)}"
        )
    inter_size = fc2_expert_weights.shape[2]
    gated = is_gated(act)
    expected_fc1 = [num_experts, 2 * inter_size if gated else inter_size, hidden_size]
    if [num_experts, fc1_rows, fc1_cols] != expected_fc1:
        layout = "[E, 2*I, H] (rows: up, then gate)" if gated else "[E, I, H]"
        raise ValueError(
            f"fc1_expert_weights must be {layout} = {expected_fc1} for activation {act.name} "
            f"with fc2_expert_weights {_shape(fc2_expert_weights)} and input {_shape(input)}, "
            f"got {_shape(fc1_expert_weights)}"
        )
    if int8:
        check_int8_alignment(("int8 fc1_expert_weights", fc1_expert_weights),
                             ("int8 fc2_expert_weights", fc2_expert_weights))
    check_layer_shape(num_experts, hidden_size, inter_size, top_k, ep_size,
                      "int8" if int8 else "16bit")
    num_experts_total = num_experts * ep_size

    # optional tensors
    n1 = expected_fc1[1]
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
    fc1_weight_scales, fc2_weight_scales = (
        _int8_scales(quant_scales, input.dtype, [num_experts, n1], [num_experts, hidden_size])
        if int8 else (None, None)
    )
    swiglu_alpha = _float32_vector("swiglu_alpha", swiglu_alpha, num_experts)
    swiglu_beta = _float32_vector("swiglu_beta", swiglu_beta, num_experts)
    swiglu_limit = _float32_vector("swiglu_limit", swiglu_limit, num_experts)

    # devices
    device = input.device
    named: dict[str, torch.Tensor | None] = {
        **tensors,
        "quant_scales[0] (fc31_scale)": fc1_weight_scales,
        "quant_scales[1] (fc2_scale)": fc2_weight_scales,
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
    return {
        "input": call.input,
        "token_selected_experts": call.token_selected_experts,
        "token_final_scales": call.token_final_scales,
        "fc1_expert_weights": call.fc1_expert_weights,
        "fc2_expert_weights": call.fc2_expert_weights,
        "quant_scales[0] (fc31_scale)": call.fc1_weight_scales,
        "quant_scales[1] (fc2_scale)": call.fc2_weight_scales,
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
                     "fc2_weight_scales", "fc1_expert_biases", "fc2_expert_biases", "output",
                     "workspace_buffer")


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
    fc1_expert_weights: torch.Tensor  # [E, N1, H], input dtype or int8
    fc2_expert_weights: torch.Tensor  # [E, H, I], as fc1
    fc1_weight_scales: torch.Tensor | None  # int8 only: [E, N1], input dtype
    fc2_weight_scales: torch.Tensor | None  # int8 only: [E, H], input dtype
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
    num_experts, inter_size = fc1_expert_weights.shape[0], fc2_expert_weights.shape[2]
    weight_dtype = fc1_expert_weights.dtype
    if weight_dtype not in (act_dtype, torch.int8):
        raise ValueError(f"fc1_expert_weights must be {act_dtype} or int8, got {weight_dtype}")
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
                      "int8" if int8 else "16bit")
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
    _expect("fc1_expert_weights", fc1_expert_weights, [num_experts, fc1_rows, hidden_size],
            weight_dtypes)
    _expect("fc2_expert_weights", fc2_expert_weights, [num_experts, hidden_size, inter_size],
            weight_dtypes)
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
    elif fc1_weight_scales is not None or fc2_weight_scales is not None:
        raise ValueError("fc1_weight_scales and fc2_weight_scales are only for int8 weights")
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


