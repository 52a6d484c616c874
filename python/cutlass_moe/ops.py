"""``cutlass_fused_moe``: validation, allocation, tactic choice and the ``cutlass_moe::fused_moe``
operator.

One code path: the public function validates and normalises its arguments (device-independent
checks first, then the CUDA check), allocates the output and calls the dispatcher op
``torch.ops.cutlass_moe.fused_moe``, whose kernel picks the tactics, allocates the workspace from
torch's caching allocator and calls ``_C.MoeRunner.run_moe`` on the current stream. The op
mutates ``output`` (and ``workspace_buffer`` when given) and returns nothing; with its fake
kernel it traces under ``torch.compile(fullgraph=True)``, and it is capturable in a CUDA graph:
nothing on the run path synchronises with the host unless ``check_inputs`` is on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from . import _ext, autotuner
from .activation import ActivationType, is_gated, normalize_activation, require_supported

#: Env var that turns on the host-side expert id check for every call (it synchronises).
CHECK_INPUTS_ENV = "CUTLASS_MOE_CHECK_INPUTS"

_ACT_DTYPES = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES_TEXT = (
    "supported: float16 or bfloat16 activations with weights of the same dtype, or int8 weights "
    "with use_int8_woq_per_channel=True"
)
_SUPPORTED_MODES_TEXT = (
    "cutlass_moe supports float16/bfloat16 MoE with weights of the activation dtype or int8 "
    "weight-only per-channel quantization (use_int8_woq_per_channel=True), with tp/ep "
    "parallelism, cluster_size=1 and no all-to-all"
)
# int8 weights: K (the contiguous dimension) in steps of 16 elements (16-byte int8 loads),
# N in steps of 8 (16-byte scale and output accesses).
_INT8_K_ALIGN = 16
_INT8_N_ALIGN = 8
# GEMM operands and the output are read and written with 16-byte vector accesses.
_ALIGN_BYTES = 16
_ALIGN_ELEMS = 8
_MAX_BAD_IDS_SHOWN = 8


# --------------------------------------------------------------------------------------------
# Default tactic heuristic (an autotuner replaces it; keep it small and order-independent).
# --------------------------------------------------------------------------------------------


# The heuristic default: (largest expected rows per expert, preferred tile_m, tile_n, stages).
# Measured with `cutlass-moe tune` on an H100 running the Sm80 kernels (Mixtral-8x7B and
# Qwen3-30B-A3B shapes, bf16): up to 8 rows the weight stream dominates and 16-row tiles with a
# deep pipeline win; from 16 rows, 16-row tiles lose 13-32 % to 32/64-row tiles; past ~48 rows
# the 128x128 tile wins, with 3 stages (98 KB, two blocks per SM where the device allows)
# beating 4 (1.1-1.6x at 64-2048 rows).
_DEFAULT_TABLE = (
    (8.0, 16, 128, 5),
    (16.0, 32, 128, 3),
    (48.0, 64, 128, 5),
    (math.inf, 128, 128, 3),
)
# int8 weights (W8A16), measured the same way: the upcast makes 32-row tiles the better choice
# up to 64 rows (1.3-1.46x over 64/128-row tiles on Qwen3 shapes), beyond which the 128x256
# tile is fastest for GEMM1 at every bucket of both models.
_DEFAULT_TABLE_INT8 = (
    (8.0, 16, 128, 4),
    (64.0, 32, 128, 3),
    (math.inf, 128, 256, 3),
)


# Fused gated GEMM1 tactics (gather + both halves + activation in one kernel; tile N counts
# output columns), the default GEMM1 of a gated activation up to _GATED_DEFAULT_MAX_ROWS rows per
# expert. Measured on the five presets (H100, bf16, GEMM1 + activation kernel against the fused
# kernel): up to 16 rows the two are within 0.95-1.05x of each other and the fused call also
# saves the gather and activation launches; from 32 rows the plain GEMM1 (64x64 warp tiles)
# wins by 2-19 %, the dual-accumulator kernel being limited to 64x32 warp tiles.
_DEFAULT_TABLE_GATED = (
    (8.0, 16, 64, 5),
    (16.0, 32, 64, 4),
)
_GATED_DEFAULT_MAX_ROWS = _DEFAULT_TABLE_GATED[-1][0]


def _default_table(descs: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, int, int, int], ...]:
    """The measured table for the descriptors' kind (fused gated, int8 or 16-bit)."""
    if any(d.get("gated") for d in descs):
        return _DEFAULT_TABLE_GATED
    if any(d.get("weight_dtype") == "int8" for d in descs):
        return _DEFAULT_TABLE_INT8
    return _DEFAULT_TABLE


def default_tactic(
    descs: Sequence[Mapping[str, Any]], expected_rows_per_expert: float
) -> str:
    """Name of the heuristic default tactic among ``descs`` for a GEMM whose experts are
    expected to get ``expected_rows_per_expert`` rows (``T*k/E_total`` for balanced routing).

    The row count selects a preferred configuration from a measured table (``_DEFAULT_TABLE``);
    when that exact tactic is not compiled or not runnable, the smallest ``tile_m`` at least the
    preferred one (else the largest) is taken, with more ``stages`` first, then the narrower
    ``tile_n``, then the name — so the choice never depends on the order of ``descs``.
    Descriptors with ``runnable`` false are skipped. When fused gated GEMM1 tactics are among
    them (a gated activation's GEMM1), only those are considered up to
    ``_GATED_DEFAULT_MAX_ROWS`` rows per expert (with their own table), and only the others
    above it.
    """
    # GEMM2 tactics split over K serve decode only and are chosen by the tuner, never by
    # default (their speed depends on the shape more than a table can say).
    candidates = [d for d in descs if d.get("runnable", True) and int(d.get("split_k", 1)) == 1]
    if not candidates:
        raise RuntimeError("no runnable tactic is compiled for this configuration and device")
    rows = max(float(expected_rows_per_expert), 0.0)
    gated = [d for d in candidates if d.get("gated")]
    plain = [d for d in candidates if not d.get("gated")]
    if gated and (rows <= _GATED_DEFAULT_MAX_ROWS or not plain):
        candidates = gated
    elif gated:
        candidates = plain
    table = _default_table(candidates)
    _, tile_m, tile_n, stages = next((row for row in table if rows <= row[0]), table[-1])
    exact = sorted(
        str(d["name"]) for d in candidates
        if (int(d["tile_m"]), int(d["tile_n"]), int(d["stages"])) == (tile_m, tile_n, stages)
    )
    if exact:
        return exact[0]
    tile_ms = {int(d["tile_m"]) for d in candidates}
    fitting = [m for m in tile_ms if m >= tile_m]
    chosen_m = min(fitting) if fitting else max(tile_ms)
    pool = [d for d in candidates if int(d["tile_m"]) == chosen_m]
    best = min(pool, key=lambda d: (-int(d["stages"]), int(d["tile_n"]), str(d["name"])))
    return str(best["name"])


def _tile_m_target(expected_rows_per_expert: float) -> float:
    """The smallest row bound of either default table at or above ``expected_rows_per_expert``:
    the only input of the heuristic that depends on the call, so default choices are cached per
    bound (both tables are step functions over these bounds, so ``default_tactic`` gives the
    same answer for the bound as for the rows)."""
    rows = max(float(expected_rows_per_expert), 0.0)
    tables = (*_DEFAULT_TABLE, *_DEFAULT_TABLE_INT8, *_DEFAULT_TABLE_GATED)
    return min(row[0] for row in tables if rows <= row[0])


# --------------------------------------------------------------------------------------------
# The op ``cutlass_moe::fused_moe``. Its arguments are validated and normalised by
# cutlass_fused_moe. It is defined with torch.library.Library (schema, kernels, fake kernel)
# rather than the torch.library.custom_op decorator: same dispatcher op, same torch.compile and
# CUDA graph behaviour, but about 100 us less host overhead per call with 17 arguments
# (custom_op's Python wrapper), which matters for decode-sized calls.
# --------------------------------------------------------------------------------------------

_OP_SCHEMA = (
    "fused_moe(Tensor(a0!) output, Tensor input, Tensor token_selected_experts, "
    "Tensor token_final_scales, Tensor fc1_expert_weights, Tensor fc2_expert_weights, "
    "Tensor? fc1_weight_scales, Tensor? fc2_weight_scales, "
    "Tensor? fc1_expert_biases, Tensor? fc2_expert_biases, Tensor? swiglu_alpha, "
    "Tensor? swiglu_beta, Tensor? swiglu_limit, Tensor(a13!)? workspace_buffer, "
    "int activation, int expert_start, int num_experts_total, int tune_max_num_tokens, "
    "str tactic1, str tactic2, bool enable_pdl=True) -> ()"
)

# The op lives as long as this object: keep it at module level.
_library = torch.library.Library("cutlass_moe", "DEF")
_library.define(_OP_SCHEMA)


def _fused_moe_fake(*args: Any) -> None:
    """Fake (meta) kernel of ``_OP_SCHEMA``: the op only mutates ``output`` and returns nothing,
    so its arguments (those of :func:`_run_fused_moe`) need no inspection."""


def _run_fused_moe(
    output: torch.Tensor,
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    fc1_weight_scales: torch.Tensor | None,
    fc2_weight_scales: torch.Tensor | None,
    fc1_expert_biases: torch.Tensor | None,
    fc2_expert_biases: torch.Tensor | None,
    swiglu_alpha: torch.Tensor | None,
    swiglu_beta: torch.Tensor | None,
    swiglu_limit: torch.Tensor | None,
    workspace_buffer: torch.Tensor | None,
    activation: int,
    expert_start: int,
    num_experts_total: int,
    tune_max_num_tokens: int,
    tactic1: str,
    tactic2: str,
    enable_pdl: bool = True,
) -> None:
    """The op's kernel: runs the MoE layer into ``output`` ([T, H]). ``activation`` is the C++
    Activation value; ``tactic1``/``tactic2`` are tactic names, "" for the heuristic default;
    ``enable_pdl``: programmatic dependent launch between the call's kernels where the GPU
    supports it (sm_90+).
    With int8 expert weights, ``fc1_weight_scales`` ``[E, N1]`` and ``fc2_weight_scales``
    ``[E, H]`` (activation dtype) are their per-output-channel scales; else both are None."""
    num_tokens, hidden_size = input.shape
    if num_tokens == 0:
        return
    top_k = token_selected_experts.shape[1]
    num_experts = fc1_expert_weights.shape[0]
    inter_size = fc2_expert_weights.shape[2]
    device = input.device
    dtypes = (input.dtype, fc1_expert_weights.dtype, output.dtype)
    int8 = fc1_expert_weights.dtype == torch.int8
    if int8 and (fc1_weight_scales is None or fc2_weight_scales is None):
        raise ValueError("int8 expert weights need fc1_weight_scales and fc2_weight_scales")

    for name, tensor in (
        ("input", input),
        ("fc1_expert_weights", fc1_expert_weights),
        ("fc2_expert_weights", fc2_expert_weights),
        ("fc1_weight_scales", fc1_weight_scales),
        ("fc2_weight_scales", fc2_weight_scales),
        ("fc1_expert_biases", fc1_expert_biases),
        ("fc2_expert_biases", fc2_expert_biases),
        ("output", output),
        ("workspace_buffer", workspace_buffer),
    ):
        if tensor is not None and tensor.data_ptr() % _ALIGN_BYTES != 0:
            raise ValueError(
                f"{name} must be {_ALIGN_BYTES}-byte aligned (data_ptr {tensor.data_ptr():#x}); "
                "pass a tensor that does not start at an odd offset into its storage"
            )

    runner = _ext.get_runner(*dtypes)
    with _ext.device_guard(device):
        expected_rows = num_tokens * top_k / max(num_experts_total, 1)
        if tactic1 and tactic2:
            tactic1 = _resolve_tactic(dtypes, 1, activation, tactic1, expected_rows, device)
            tactic2 = _resolve_tactic(dtypes, 2, activation, tactic2, expected_rows, device)
        else:
            tactic1, tactic2 = _tuned_tactics(
                runner, dtypes, activation, device, num_tokens, hidden_size, inter_size,
                num_experts, top_k, num_experts_total, tune_max_num_tokens,
                (fc1_expert_weights, fc2_expert_weights), (tactic1, tactic2),
                (fc1_weight_scales, fc2_weight_scales),
            )
        workspace_bytes = int(
            runner.workspace_size(
                num_tokens, hidden_size, inter_size, num_experts, top_k, activation
            )
        )
        if workspace_buffer is None:
            workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        else:
            workspace = workspace_buffer
            available = workspace.numel() * workspace.element_size()
            if available < workspace_bytes:
                raise ValueError(
                    f"workspace_buffer has {available} bytes, this call needs {workspace_bytes}"
                )
            workspace_bytes = available
        runner.run_moe(
            num_tokens,
            hidden_size,
            inter_size,
            num_experts,
            top_k,
            expert_start,
            activation,
            input.data_ptr(),
            token_selected_experts.data_ptr(),
            token_final_scales.data_ptr(),
            fc1_expert_weights.data_ptr(),
            fc2_expert_weights.data_ptr(),
            _ptr(fc1_expert_biases),
            _ptr(fc2_expert_biases),
            _ptr(swiglu_alpha),
            _ptr(swiglu_beta),
            _ptr(swiglu_limit),
            output.data_ptr(),
            workspace.data_ptr() if workspace_bytes > 0 else 0,
            workspace_bytes,
            tactic1,
            tactic2,
            _ext.stream_handle(device),
            fc1_scales=_ptr(fc1_weight_scales),
            fc2_scales=_ptr(fc2_weight_scales),
            enable_pdl=enable_pdl,
        )


# The CPU kernel is the same function: with the real extension it raises (CUDA tensors only);
# tests use it with a host-memory fake of the extension.
_library.impl("fused_moe", _run_fused_moe, "CUDA")
_library.impl("fused_moe", _run_fused_moe, "CPU")
torch.library.register_fake("cutlass_moe::fused_moe", _fused_moe_fake)


def _ptr(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def supports_activation(desc: Mapping[str, Any], activation: int) -> bool:
    """Whether a tactic descriptor can run with the C++ ``Activation`` value ``activation``.

    A descriptor may list ``activations`` (C++ values or names), as a fused gated GEMM1 tactic
    must; one without that key runs with any activation.
    """
    allowed = desc.get("activations")
    if allowed is None:
        return True
    name = _ext.activation_name(activation)
    return any(
        a == activation if isinstance(a, int) else str(a).lower() == name.lower() for a in allowed
    )


_resolved_tactics: dict[tuple[Any, ...], str] = {}


def _resolve_tactic(
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    gemm: int,
    activation: int,
    forced: str,
    expected_rows_per_expert: float,
    device: torch.device,
) -> str:
    """The tactic name to run: ``forced`` after checking it, else the heuristic default.
    Results are cached (per extension instance, dtypes, GEMM, activation, device, tile target)."""
    target = 0 if forced else _tile_m_target(expected_rows_per_expert)
    key = (_ext.generation(), dtypes, gemm, activation, device, forced, target)
    name = _resolved_tactics.get(key)
    if name is None:
        name = _choose_tactic(dtypes, gemm, activation, forced, target, device)
        _resolved_tactics[key] = name
    return name


def _tuned_tactics(
    runner: Any,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    activation: int,
    device: torch.device,
    num_tokens: int,
    hidden_size: int,
    inter_size: int,
    num_experts: int,
    top_k: int,
    num_experts_total: int,
    tune_max_num_tokens: int,
    weights: tuple[torch.Tensor, torch.Tensor],
    forced: tuple[str, str],
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[str, str]:
    """Tactics from the AutoTuner (cache, tuning inside ``autotune()``, else the heuristic
    default); a forced name for one GEMM still wins for that GEMM. ``scales`` are the int8
    weights' per-channel scales (profiling runs on the real weights and scales)."""
    shape = autotuner.ShapeKey(
        dtypes=autotuner.dtype_tag(dtypes),
        quant=(autotuner.QUANT_INT8_PER_CHANNEL if dtypes[1] == torch.int8
               else autotuner.QUANT_NONE),
        num_experts=num_experts,
        hidden_size=hidden_size,
        inter_size=inter_size,
        top_k=top_k,
        activation=_ext.activation_name(activation),
        ep_size=max(1, num_experts_total // max(num_experts, 1)),
    )
    expected_rows = num_tokens * top_k / max(num_experts_total, 1)

    def runnable(gemm: int) -> list[str]:
        return _runnable_names(dtypes, gemm, activation, device)

    def default(gemm: int) -> str:
        return _resolve_tactic(dtypes, gemm, activation, "", expected_rows, device)

    tuned = list(autotuner.get_tuner().select(
        runner, shape, num_tokens, tune_max_num_tokens, activation, device, weights,
        runnable, default, scales=scales,
    ))
    # A GEMM2 split over K runs only up to SPLIT_K_MAX_ROWS expanded rows; a call above the
    # largest tuned bucket can exceed what its bucket's tactic was tuned (and allowed) for.
    if num_tokens * top_k > split_k_max_rows() and _split_k_of(dtypes, 2, tuned[1], device) > 1:
        tuned[1] = default(2)
    return tuple(
        _resolve_tactic(dtypes, gemm, activation, forced[gemm - 1], expected_rows, device)
        if forced[gemm - 1] else tuned[gemm - 1]
        for gemm in (1, 2)
    )


def split_k_max_rows() -> int:
    """Expanded rows (T*k) up to which GEMM2 tactics split over K may run."""
    return int(getattr(_ext.load_extension(), "SPLIT_K_MAX_ROWS", 0))


def _split_k_of(
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    gemm: int,
    name: str,
    device: torch.device,
) -> int:
    for d in _ext.tactics(*dtypes, gemm, device):
        if d["name"] == name:
            return int(d.get("split_k", 1))
    return 1


_runnable_cache: dict[tuple[Any, ...], list[str]] = {}


def _runnable_names(
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    gemm: int,
    activation: int,
    device: torch.device,
) -> list[str]:
    """Names of the tactics that can serve this GEMM and activation on ``device`` (cached: the
    tuner checks cached entries against it on every call)."""
    key = (_ext.generation(), dtypes, gemm, activation, device)
    names = _runnable_cache.get(key)
    if names is None:
        names = [
            str(d["name"])
            for d in _ext.tactics(*dtypes, gemm, device)
            if d.get("runnable", True) and supports_activation(d, activation)
        ]
        _runnable_cache[key] = names
    return names


def _choose_tactic(
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    gemm: int,
    activation: int,
    forced: str,
    target_rows: int,
    device: torch.device,
) -> str:
    descs = [d for d in _ext.tactics(*dtypes, gemm, device) if supports_activation(d, activation)]
    if not forced:
        return default_tactic(descs, target_rows)
    names = [str(d["name"]) for d in descs if d.get("runnable", True)]
    if forced not in names:
        raise ValueError(
            f"tactic {forced!r} is not a runnable GEMM{gemm} tactic for dtypes "
            f"{tuple(str(d) for d in dtypes)} and activation {_ext.activation_name(activation)} "
            f"on this device; available: {', '.join(names)}"
        )
    return forced


# --------------------------------------------------------------------------------------------
# Validation and normalisation (device-independent), then the public function.
# --------------------------------------------------------------------------------------------


class _Call(NamedTuple):
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


def _check_int8_alignment(fc1: torch.Tensor, fc2: torch.Tensor) -> None:
    """int8 weights ``[E, N, K]``: N % 8 == 0 and K % 16 == 0 for both GEMMs."""
    for name, w in (("fc1_expert_weights", fc1), ("fc2_expert_weights", fc2)):
        rows = w.shape[1]
        if rows % _INT8_N_ALIGN != 0:
            raise ValueError(
                f"int8 {name} [E, N, K] = {_shape(w)}: N={rows} must be a multiple of "
                f"{_INT8_N_ALIGN}"
            )
    for name, w in (("fc1_expert_weights", fc1), ("fc2_expert_weights", fc2)):
        cols = w.shape[2]
        if cols % _INT8_K_ALIGN != 0:
            raise ValueError(
                f"int8 {name} [E, N, K] = {_shape(w)}: K={cols} (the contiguous dimension; "
                f"H for fc1, I for fc2) must be a multiple of {_INT8_K_ALIGN}"
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


def _prepare_call(
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
) -> _Call:
    """Every check that needs no device and no extension; returns the op's arguments."""
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
    if input.dtype not in _ACT_DTYPES:
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
        _check_int8_alignment(fc1_expert_weights, fc2_expert_weights)
    if hidden_size % _ALIGN_ELEMS != 0 or inter_size % _ALIGN_ELEMS != 0:
        raise ValueError(
            f"hidden size H={hidden_size} and intermediate size I={inter_size} must be multiples "
            f"of {_ALIGN_ELEMS} (16-byte aligned GEMM rows)"
        )
    num_experts_total = num_experts * ep_size
    if top_k > num_experts_total:
        raise ValueError(
            f"top_k={top_k} exceeds the total number of experts E_local*ep_size="
            f"{num_experts}*{ep_size}={num_experts_total}"
        )

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
    clamped = any(t is not None for t in (swiglu_alpha, swiglu_beta, swiglu_limit))
    if clamped and act != ActivationType.Swiglu:
        raise ValueError(
            f"swiglu_alpha/swiglu_beta/swiglu_limit are only valid with ActivationType.Swiglu, "
            f"got activation_type {act.name}"
        )
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

    return _Call(
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


def check_expert_ids(token_selected_experts: torch.Tensor, num_experts_total: int) -> None:
    """Raises ``ValueError`` naming the first few ids outside ``[0, num_experts_total)``.

    Synchronises with the host (it reads the ids back); not for CUDA graph capture.
    """
    ids = token_selected_experts
    bad = ids[(ids < 0) | (ids >= num_experts_total)]
    if bad.numel() == 0:
        return
    values = torch.unique(bad).cpu().tolist()
    shown = ", ".join(str(v) for v in values[:_MAX_BAD_IDS_SHOWN])
    more = f" (and {len(values) - _MAX_BAD_IDS_SHOWN} more)" if len(values) > _MAX_BAD_IDS_SHOWN else ""
    raise ValueError(
        f"token_selected_experts holds {bad.numel()} id(s) outside [0, {num_experts_total}): "
        f"{shown}{more}"
    )


def _check_inputs_from_env() -> bool:
    return os.environ.get(CHECK_INPUTS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _require_cuda(device: torch.device) -> None:
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


def cutlass_fused_moe(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    output_dtype: torch.dtype,
    quant_scales: Sequence[torch.Tensor] | None = None,
    fc1_expert_biases: torch.Tensor | None = None,
    fc2_expert_biases: torch.Tensor | None = None,
    input_sf: torch.Tensor | None = None,
    swiglu_alpha: torch.Tensor | None = None,
    swiglu_beta: torch.Tensor | None = None,
    swiglu_limit: torch.Tensor | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    ep_size: int = 1,
    ep_rank: int = 0,
    cluster_size: int = 1,
    cluster_rank: int = 0,
    output: torch.Tensor | None = None,
    enable_alltoall: bool = False,
    use_deepseek_fp8_block_scale: bool = False,
    use_w4_group_scaling: bool = False,
    use_mxfp8_act_scaling: bool = False,
    min_latency_mode: bool = False,
    use_packed_weights: bool = False,
    use_wfp4afp8_humming: bool = False,
    tune_max_num_tokens: int = 8192,
    enable_pdl: bool | None = None,
    activation_type: ActivationType = ActivationType.Swiglu,
    swizzled_input_sf: bool = True,
    use_fused_finalize: bool = True,
    profile_ids: Sequence[int] | None = None,
    workspace_buffer: torch.Tensor | None = None,
    *,
    use_int8_woq_per_channel: bool = False,
    check_inputs: bool = False,
    tactics: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Fused Mixture-of-Experts layer; a drop-in for FlashInfer's ``cutlass_fused_moe``.

    For every token ``t`` and each of its ``k`` choices ``j`` with global expert id
    ``g = token_selected_experts[t, j]`` owned by this rank (local ``e = g - ep_rank*E``)::

        out[t] = sum_j s[t, j] * (W2_e @ act(W1_e @ x[t] + b1_e) + b2_e)

    Choices whose expert is not on this rank (another EP rank's, negative, or >= E*ep_size)
    contribute zero; a token with none gets a zero row. Sums over ranks are the caller's
    all-reduce.

    Args:
        input: ``[T, H]`` float16 or bfloat16 activations (made contiguous if needed).
        token_selected_experts: ``[T, k]`` int32 global expert ids (int64 is converted).
        token_final_scales: ``[T, k]`` float32 router weights (float16/bfloat16 converted).
        fc1_expert_weights: contiguous ``[E, 2*I, H]`` for gated activations (Swiglu, Geglu;
            rows ``[up | gate]``, see ``swap_w13_to_w31``), ``[E, I, H]`` otherwise; input dtype,
            or int8 with ``use_int8_woq_per_channel``. ``E`` is this EP rank's expert count,
            ``I`` this TP rank's intermediate slice.
        fc2_expert_weights: contiguous ``[E, H, I]``, input dtype (or int8, as fc1).
        output_dtype: the input dtype or ``torch.float32``.
        quant_scales: None or empty for weights of the input dtype. With
            ``use_int8_woq_per_channel=True``: ``[fc31_scale, fc2_scale]``, the per-output-
            channel scales ``[E, N1]`` (ordered like fc1's rows: up, then gate) and ``[E, H]``
            in the input dtype (see :mod:`cutlass_moe.quantization`).
        fc1_expert_biases: optional ``[E, 2*I]`` / ``[E, I]``, input dtype.
        fc2_expert_biases: optional ``[E, H]``, input dtype; added on ``tp_rank == 0`` only.
        input_sf: must be None.
        swiglu_alpha, swiglu_beta, swiglu_limit: optional float32 ``[E]`` turning Swiglu into
            the clamped SwiGLU of gpt-oss (``g = min(gate, limit)``,
            ``u = clamp(up, -limit, limit) + beta``, ``a = g * sigmoid(alpha * g) * u``);
            missing ones default to 1, 0 and float32 max.
        tp_size, tp_rank: tensor parallelism; the weights are this rank's slice of I.
        ep_size, ep_rank: expert parallelism; rank r owns global experts ``[r*E, (r+1)*E)``.
        cluster_size, cluster_rank: must be 1 and 0.
        output: optional contiguous ``[T, H]`` tensor of ``output_dtype``, written in place.
        enable_alltoall, use_deepseek_fp8_block_scale, use_w4_group_scaling,
        use_mxfp8_act_scaling, min_latency_mode, use_packed_weights, use_wfp4afp8_humming:
        FlashInfer modes; must be False.
        tune_max_num_tokens: the largest token bucket of the AutoTuner; calls with more tokens
            share its tactics (see :func:`cutlass_moe.autotune`).
        enable_pdl: programmatic dependent launch between the call's kernels (and with the
            kernel before the call): each kernel's launch overlaps the end of the one before
            it, which saves a few microseconds per decode call. None (the default) or True: on
            where the GPU supports it (sm_90 and newer, with code built for it); False: off.
        activation_type: Swiglu (default), Geglu, Gelu, Relu, Silu or Identity.
        swizzled_input_sf: accepted for compatibility (only meaningful with ``input_sf``).
        use_fused_finalize: accepted for compatibility; finalize is always the deterministic
            unfused kernel (no atomics), so results are identical run to run.
        profile_ids: must be None (or all -1); use ``tactics`` to force kernels.
        workspace_buffer: optional contiguous 1-D uint8 scratch on the input's device, reused
            across calls instead of allocating (torch's caching allocator) on each call.

    Keyword-only extensions (not in FlashInfer's signature):

        use_int8_woq_per_channel: TensorRT-LLM's int8 weight-only mode (W8A16): int8
            ``fc1_expert_weights``/``fc2_expert_weights`` in kernel layout (the ordinary
            ``[E, N, K]``, K contiguous; see
            :func:`cutlass_moe.quantization.to_int8_kernel_layout`) with symmetric
            per-output-channel ``quant_scales``; the layer computes with the dequantised
            weights ``q * scale``. Needs ``H`` and ``I`` to be multiples of 16.
        check_inputs: check on the host that every id is in ``[0, E*ep_size)`` and raise
            ``ValueError`` naming the bad ids. It synchronises with the GPU (not for CUDA graph
            capture or ``torch.compile``). Also on for every call when the environment variable
            ``CUTLASS_MOE_CHECK_INPUTS=1``.
        tactics: optional ``(gemm1_tactic_name, gemm2_tactic_name)`` forcing the kernels (names
            from ``MoeRunner.tactics(1)`` / ``(2)``); by default a heuristic picks them from
            the expected rows per expert ``T*k/(E*ep_size)``.

    Returns:
        ``[output]``: a one-element list holding the ``[T, H]`` result of ``output_dtype``
        (``output`` itself when given).

    Raises:
        NotImplementedError: an unsupported dtype, activation or FlashInfer mode.
        ValueError: inconsistent shapes, dtypes, devices, layouts or ranks (the message names
            them), e.g. int8 weights without ``use_int8_woq_per_channel`` or the reverse.
        TypeError: a required tensor, or ``quant_scales`` or one of its entries, of the wrong
            type.
        RuntimeError: no CUDA device, or the compiled extension is missing.
    """
    call = _prepare_call(
        input=input,
        token_selected_experts=token_selected_experts,
        token_final_scales=token_final_scales,
        fc1_expert_weights=fc1_expert_weights,
        fc2_expert_weights=fc2_expert_weights,
        output_dtype=output_dtype,
        quant_scales=quant_scales,
        fc1_expert_biases=fc1_expert_biases,
        fc2_expert_biases=fc2_expert_biases,
        input_sf=input_sf,
        swiglu_alpha=swiglu_alpha,
        swiglu_beta=swiglu_beta,
        swiglu_limit=swiglu_limit,
        tp_size=tp_size,
        tp_rank=tp_rank,
        ep_size=ep_size,
        ep_rank=ep_rank,
        cluster_size=cluster_size,
        cluster_rank=cluster_rank,
        output=output,
        enable_alltoall=enable_alltoall,
        use_deepseek_fp8_block_scale=use_deepseek_fp8_block_scale,
        use_w4_group_scaling=use_w4_group_scaling,
        use_int8_woq_per_channel=use_int8_woq_per_channel,
        use_mxfp8_act_scaling=use_mxfp8_act_scaling,
        min_latency_mode=min_latency_mode,
        use_packed_weights=use_packed_weights,
        use_wfp4afp8_humming=use_wfp4afp8_humming,
        tune_max_num_tokens=tune_max_num_tokens,
        activation_type=activation_type,
        profile_ids=profile_ids,
        workspace_buffer=workspace_buffer,
        tactics=tactics,
    )
    compiling = torch.compiler.is_compiling()
    if check_inputs or (not compiling and _check_inputs_from_env()):
        check_expert_ids(call.raw_token_selected_experts, call.num_experts_total)
    if not compiling:
        _require_cuda(call.input.device)

    out = call.output
    if out is None:
        out = torch.empty(
            (call.input.shape[0], call.input.shape[1]),
            dtype=call.output_dtype,
            device=call.input.device,
        )
    torch.ops.cutlass_moe.fused_moe(
        out,
        call.input,
        call.token_selected_experts,
        call.token_final_scales,
        call.fc1_expert_weights,
        call.fc2_expert_weights,
        call.fc1_weight_scales,
        call.fc2_weight_scales,
        call.fc1_expert_biases,
        call.fc2_expert_biases,
        call.swiglu_alpha,
        call.swiglu_beta,
        call.swiglu_limit,
        call.workspace_buffer,
        _ext.activation_to_enum(call.activation),
        call.expert_start,
        call.num_experts_total,
        tune_max_num_tokens,
        call.tactic1,
        call.tactic2,
        enable_pdl is None or bool(enable_pdl),
    )
    return [out]
