"""``cutlass_fused_moe`` and the ``cutlass_moe::fused_moe`` operator it runs.

One code path: the public function validates and normalises its arguments
(:func:`cutlass_moe.validation.prepare_call`: device-independent checks first, then the CUDA
check), allocates the output and calls the dispatcher op ``torch.ops.cutlass_moe.fused_moe``.
The op's kernel takes the tactics from the AutoTuner (cache, tuning inside ``autotune()``, else
the heuristic default of :mod:`cutlass_moe.tactics`), sizes and allocates the workspace for
them from torch's caching allocator and calls ``_C.MoeRunner.run_moe`` on the current stream.
The op mutates ``output`` (and ``workspace_buffer`` when given) and returns nothing; with its
fake kernel it traces under ``torch.compile(fullgraph=True)``, and it is capturable in a CUDA
graph: nothing on the run path synchronises with the host unless ``check_inputs`` is on.

The op is public in the sense that anyone can call ``torch.ops.cutlass_moe.fused_moe``; its
kernel therefore validates its arguments itself
(:func:`cutlass_moe.validation.check_op_arguments`), except for the call that
``cutlass_fused_moe`` has just validated. See docs/architecture.md, "One call".
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from . import _ext, autotuner, tactics, validation
from .activation import ActivationType

# --------------------------------------------------------------------------------------------
# The op ``cutlass_moe::fused_moe``. It is defined with torch.library.Library (schema, kernels,
# fake kernel) rather than the torch.library.custom_op decorator: same dispatcher op, same
# torch.compile and CUDA graph behaviour, but about 100 us less host overhead per call with 24
# arguments (custom_op's Python wrapper), which matters for decode-sized calls.
#
# Arguments, in schema order: output [T, H] (input dtype or float32, written), input [T, H]
# (float16/bfloat16), token_selected_experts [T, k] int32 global ids, token_final_scales [T, k]
# float32, fc1_expert_weights [E, N1, H] and fc2_expert_weights [E, H, I] (input dtype, or int8
# with fc1_weight_scales [E, N1] and fc2_weight_scales [E, H] in the input dtype, or packed int4
# uint8 [E, N1, H/2] and [E, H, I/2] with weight_format "int4" and group-wise scales
# [E, H/G1, N1] and [E, I/G2, H], plus optional zeros of the same shapes), optional
# fc1_expert_biases [E, N1], fc2_expert_biases [E, H], swiglu_alpha/beta/limit float32 [E]
# (Swiglu/SwigluBias: all three or none; SwigluStep: swiglu_limit only), optional
# workspace_buffer 1-D uint8 (written), activation (an ActivationType value), expert_start (this
# rank's first global expert id), num_experts_total (E * ep_size), tune_max_num_tokens,
# tactic1/tactic2 (names, "" for the AutoTuner's choice), enable_pdl, then FlashInfer 0.7's
# per-activation tensors clamped_relu2_limit float32 [1] (ClampedRelu2, required), situ_beta and
# situ_linear_beta float32 [E] (Situ, optional), then int4's fc1_weight_zeros/fc2_weight_zeros
# (both or neither) and weight_format ("", "int4", "fp8" or "mxfp4"; the group sizes are
# K / scales.shape[1], 32 for mxfp4). fp8: float8_e4m3fn weights [E, N1, H] and [E, H, I] with
# float32 scales [E, H/G1, N1] and [E, I/G2, H]; mxfp4: packed uint8 weights [E, N1, H/2] and
# [E, H, I/2] (two e2m1 codes per byte) with uint8 e8m0 scales [E, H/32, N1] and [E, I/32, H];
# neither has zeros.
# Every tensor contiguous, on one device, 16-byte aligned (the GEMM operands); output and
# workspace share no memory with the rest.
# --------------------------------------------------------------------------------------------

_OP_SCHEMA = (
    "fused_moe(Tensor(a0!) output, Tensor input, Tensor token_selected_experts, "
    "Tensor token_final_scales, Tensor fc1_expert_weights, Tensor fc2_expert_weights, "
    "Tensor? fc1_weight_scales, Tensor? fc2_weight_scales, "
    "Tensor? fc1_expert_biases, Tensor? fc2_expert_biases, Tensor? swiglu_alpha, "
    "Tensor? swiglu_beta, Tensor? swiglu_limit, Tensor(a13!)? workspace_buffer, "
    "int activation, int expert_start, int num_experts_total, int tune_max_num_tokens, "
    "str tactic1, str tactic2, bool enable_pdl=True, Tensor? clamped_relu2_limit=None, "
    "Tensor? situ_beta=None, Tensor? situ_linear_beta=None, Tensor? fc1_weight_zeros=None, "
    'Tensor? fc2_weight_zeros=None, str weight_format="") -> ()'
)

# The op lives as long as this object: keep it at module level.
_library = torch.library.Library("cutlass_moe", "DEF")
_library.define(_OP_SCHEMA)

# The output tensor of the op call that cutlass_fused_moe has just validated, per thread: its
# kernel then skips the second validation (the public path would otherwise pay for it twice).
_validated = threading.local()


def _fused_moe_fake(*args: Any) -> None:
    """Fake (meta) kernel: the op only mutates ``output`` and returns nothing; the arguments
    (:class:`~cutlass_moe.validation.OpArguments`) are checked as the real kernel checks them,
    memory overlaps excepted."""
    validation.check_op_arguments(validation.OpArguments(*args), traced=True)


def _run_fused_moe(*args: Any) -> None:
    """The op's kernel: runs the MoE layer into ``output`` ([T, H]); ``args`` in the order of
    :class:`~cutlass_moe.validation.OpArguments`."""
    op = validation.OpArguments(*args)
    if getattr(_validated, "output", None) is op.output:
        _validated.output = None
    else:
        validation.check_op_arguments(op)
    act = validation.op_activation(op.activation)
    num_tokens, hidden_size = op.input.shape
    if num_tokens == 0:
        return
    top_k = op.token_selected_experts.shape[1]
    num_experts = op.fc1_expert_weights.shape[0]
    inter_size = validation.op_inter_size(op)
    group_sizes = validation.op_group_sizes(op)
    device = op.input.device
    validation.check_alignment(op)
    # The weight entry is a dtype, or the weight-format tag ("int4", "fp8", "mxfp4").
    dtypes = (op.input.dtype, validation.op_weight_type(op), op.output.dtype)
    runner = _ext.get_runner(*dtypes)
    act_enum = _ext.activation_to_enum(act)
    with _ext.device_guard(device):
        tactic1, tactic2 = _choose_tactics(
            runner, dtypes, act, device, num_tokens, hidden_size, inter_size, num_experts,
            top_k, op.num_experts_total, op.tune_max_num_tokens,
            (op.fc1_expert_weights, op.fc2_expert_weights),
            (op.fc1_weight_scales, op.fc2_weight_scales), (op.tactic1, op.tactic2),
            (op.fc1_weight_zeros, op.fc2_weight_zeros), group_sizes)
        workspace_bytes = int(runner.workspace_size(
            num_tokens, hidden_size, inter_size, num_experts, top_k, act_enum,
            tactic1=tactic1, tactic2=tactic2, has_fc1_bias=op.fc1_expert_biases is not None))
        workspace = op.workspace_buffer
        if workspace is None:
            workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        else:
            available = workspace.numel() * workspace.element_size()
            if available < workspace_bytes:
                raise ValueError(
                    f"workspace_buffer has {available} bytes, this call needs {workspace_bytes} "
                    f"(tactics {tactic1} / {tactic2})"
                )
            workspace_bytes = available
        runner.run_moe(
            num_tokens, hidden_size, inter_size, num_experts, top_k, op.expert_start, act_enum,
            op.input.data_ptr(), op.token_selected_experts.data_ptr(),
            op.token_final_scales.data_ptr(), op.fc1_expert_weights.data_ptr(),
            op.fc2_expert_weights.data_ptr(), _ptr(op.fc1_expert_biases),
            _ptr(op.fc2_expert_biases), _ptr(op.swiglu_alpha), _ptr(op.swiglu_beta),
            _ptr(op.swiglu_limit), op.output.data_ptr(),
            workspace.data_ptr() if workspace_bytes > 0 else 0, workspace_bytes, tactic1,
            tactic2, _ext.stream_handle(device), fc1_scales=_ptr(op.fc1_weight_scales),
            fc2_scales=_ptr(op.fc2_weight_scales), enable_pdl=op.enable_pdl,
            situ_beta=_ptr(op.situ_beta), situ_linear_beta=_ptr(op.situ_linear_beta),
            clamped_relu2_limit=_ptr(op.clamped_relu2_limit),
            fc1_zeros=_ptr(op.fc1_weight_zeros), fc2_zeros=_ptr(op.fc2_weight_zeros),
            fc1_group_size=group_sizes[0], fc2_group_size=group_sizes[1],
        )


# The CPU kernel is the same function: with the real extension it raises (CUDA tensors only);
# tests use it with a host-memory fake of the extension.
_library.impl("fused_moe", _run_fused_moe, "CUDA")
_library.impl("fused_moe", _run_fused_moe, "CPU")
torch.library.register_fake("cutlass_moe::fused_moe", _fused_moe_fake)


def _ptr(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _choose_tactics(
    runner: Any,
    dtypes: tactics.Dtypes,
    activation: ActivationType,
    device: torch.device,
    num_tokens: int,
    hidden_size: int,
    inter_size: int,
    num_experts: int,
    top_k: int,
    num_experts_total: int,
    tune_max_num_tokens: int,
    weights: tuple[torch.Tensor, torch.Tensor],
    scales: tuple[torch.Tensor | None, torch.Tensor | None],
    forced: tuple[str, str],
    zeros: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    group_sizes: tuple[int, int] = (0, 0),
) -> tuple[str, str]:
    """The tactics of both GEMMs: a forced name (checked) wins for its GEMM; the other comes
    from the AutoTuner (cache, tuning inside ``autotune()``, else the heuristic default).
    ``zeros``/``group_sizes``: int4 weights' zero points and the group sizes of int4, fp8 and
    mxfp4 weights (part of the tuner's key, and what profiling runs with)."""
    expanded_rows = num_tokens * top_k
    if forced[0] and forced[1]:
        return (tactics.resolve(dtypes, 1, activation, device, forced[0], expanded_rows),
                tactics.resolve(dtypes, 2, activation, device, forced[1], expanded_rows))
    shape = autotuner.shape_key(dtypes, activation, num_experts, hidden_size, inter_size, top_k,
                                max(1, num_experts_total // num_experts),
                                group_sizes=group_sizes, zeros=zeros[0] is not None)
    tuned = autotuner.get_tuner().select(runner, dtypes, shape, activation, device, num_tokens,
                                         tune_max_num_tokens, weights, scales, zeros,
                                         group_sizes)
    return tuple(
        tactics.resolve(dtypes, gemm, activation, device, forced[gemm - 1], expanded_rows)
        if forced[gemm - 1] else tuned[gemm - 1]
        for gemm in (1, 2)
    )


_capture_check_warned = False


def _check_ids_now(check_inputs: bool) -> bool:
    """Whether this call checks its expert ids on the host: asked for by ``check_inputs`` or
    ``CUTLASS_MOE_CHECK_INPUTS``, and possible (the check synchronises, which CUDA-graph capture
    forbids: an explicit request then raises, the environment's is skipped with one warning)."""
    global _capture_check_warned
    from_env = validation.check_inputs_from_env()
    if not (check_inputs or from_env):
        return False
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return True
    if check_inputs:
        raise RuntimeError(
            "check_inputs=True reads the expert ids back to the host, which CUDA-graph capture "
            "does not allow; check them in an eager call before capturing"
        )
    if not _capture_check_warned:
        _capture_check_warned = True
        warnings.warn(
            f"cutlass_moe: {validation.CHECK_INPUTS_ENV}=1 is ignored for calls captured in a "
            "CUDA graph (the id check synchronises with the host)", stacklevel=3)
    return False


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
    clamped_relu2_limit: torch.Tensor | None = None,
    situ_beta: torch.Tensor | None = None,
    situ_linear_beta: torch.Tensor | None = None,
    backend: str = "cutlass",
    use_int8_woq_per_channel: bool = False,
    use_fp8_woq_group_scaling: bool = False,
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
        fc1_expert_weights: contiguous ``[E, 2*I, H]`` for gated activations (Swiglu, Geglu,
            SwigluBias, SwigluStep, GegluTanh, Situ; rows ``[up | gate]``, see
            ``swap_w13_to_w31``), ``[E, I, H]`` otherwise; input dtype,
            or int8 with ``use_int8_woq_per_channel``, or packed int4 or MXFP4 ``[E, N1, H/2]``
            uint8 with ``use_w4_group_scaling`` (see there), or float8_e4m3fn with
            ``use_fp8_woq_group_scaling``. ``E`` is this EP rank's expert count, ``I`` this TP
            rank's intermediate slice.
        fc2_expert_weights: contiguous ``[E, H, I]``, input dtype (or int8 / float8_e4m3fn, as
            fc1; packed int4 or MXFP4: ``[E, H, I/2]`` uint8).
        output_dtype: the input dtype or ``torch.float32``.
        quant_scales: None or empty for weights of the input dtype. With
            ``use_int8_woq_per_channel=True``: ``[fc31_scale, fc2_scale]``, the per-output-
            channel scales ``[E, N1]`` (ordered like fc1's rows: up, then gate) and ``[E, H]``
            in the input dtype (see :mod:`cutlass_moe.quantization`). With
            ``use_w4_group_scaling=True``: ``[fc31_scales, fc2_scales]`` (symmetric) or
            ``[fc31_scales, fc2_scales, fc31_zeros, fc2_zeros]`` (asymmetric), the group-wise
            scales ``[E, H/G1, N1]`` and ``[E, I/G2, H]`` and zero points of the same shapes,
            in the input dtype (see ``use_w4_group_scaling``); MXFP4 (same flag):
            ``[fc31_scales, fc2_scales]`` uint8 e8m0 ``[E, H/32, N1]`` and ``[E, I/32, H]``.
            With ``use_fp8_woq_group_scaling=True``: ``[fc31_scales, fc2_scales]`` float32
            ``[E, H/G1, N1]`` and ``[E, I/G2, H]``.
        fc1_expert_biases: optional ``[E, 2*I]`` / ``[E, I]``, input dtype.
        fc2_expert_biases: optional ``[E, H]``, input dtype; added on ``tp_rank == 0`` only.
        input_sf: must be None.
        swiglu_alpha, swiglu_beta, swiglu_limit: optional float32 ``[E]`` turning Swiglu (or
            SwigluBias) into the clamped SwiGLU of gpt-oss (``g = min(gate, limit)``,
            ``u = clamp(up, -limit, limit) + beta``, ``a = g * sigmoid(alpha * g) * u``);
            missing ones default to 1, 0 and float32 max. ``swiglu_limit`` alone is also
            SwigluStep's per-expert limit (default 7). Refused (ValueError) with any other
            activation.
        tp_size, tp_rank: tensor parallelism; the weights are this rank's slice of I.
        ep_size, ep_rank: expert parallelism; rank r owns global experts ``[r*E, (r+1)*E)``.
        cluster_size, cluster_rank: must be 1 and 0.
        output: optional contiguous ``[T, H]`` tensor of ``output_dtype``, written in place.
        use_w4_group_scaling: int4 group-wise weight-only quantization (W4A16; the flag
            TensorRT-LLM and FlashInfer use for their group-wise W4 modes) with float16/bfloat16
            ``input``, served by its own runner and tactics (``weight_dtype`` "int4"; see
            docs/architecture.md, "int4 weights"). The weights are in the *kernel layout*
            (produce it with :func:`cutlass_moe.quantize_int4_groupwise` or
            :func:`cutlass_moe.load_int4_experts`): a linear layer's ``W [N, K]`` (K contiguous)
            is stored as uint8 ``[N, K/2]``, byte ``j`` of a row holding ``k = 2j`` in its low
            nibble and ``k = 2j+1`` in its high nibble, nibble values ``q`` in 0..15 (int8
            tensors are accepted and read as the same bytes). With group size ``G`` (a multiple
            of 32 dividing K — 32, 64 and 128 are the documented ones — or ``G = K``,
            per-channel), scales ``s`` and zeros ``z`` ``[K/G, N]`` (N contiguous) in the input
            dtype, the layer computes with ``W[n, k] = (q[n, k] - z[k//G, n]) * s[k//G, n]``
            (formed in float32, rounded once to the input dtype), ``z = 8`` without zeros
            (symmetric: ``q`` is the signed int4 value + 8). ``G`` is not passed: ``G1 =
            H / fc31_scales.shape[1]`` and ``G2 = I / fc2_scales.shape[1]`` (they may differ).
            Needs ``H`` and ``I`` to be multiples of 32. FlashInfer/TensorRT-LLM's W4A8 mode
            (fp8 activations; activation scales and alphas in ``quant_scales``) is not served:
            ``ValueError``. Not together with ``use_int8_woq_per_channel``.

            **MXFP4** (OCP microscaling) runs under the same flag: ``quant_scales`` of dtype
            uint8 (e8m0; torch.float8_e8m0fnu is read as the same bytes) select it over int4,
            whose scales have the input dtype. Weights uint8 ``[N, K/2]`` per expert, two e2m1
            codes per byte (``k = 2j`` in the low nibble of byte ``j``; code bits ``s e e m``,
            magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), scales ``[K/32, N]`` (``G = 32`` always,
            scale ``2^(x - 127)``); the layer computes with ``value * scale`` formed in float32
            and rounded once to the input dtype. No zero points; both GEMMs must be MXFP4
            (scales of one GEMM uint8 and of the other 16-bit: ``ValueError``). Needs ``H`` and
            ``I`` multiples of 32. Produce it with
            :func:`cutlass_moe.mxfp4.quantize_moe_weights_mxfp4` (see docs/architecture.md).
        enable_alltoall, use_deepseek_fp8_block_scale, use_mxfp8_act_scaling,
        min_latency_mode, use_packed_weights, use_wfp4afp8_humming: FlashInfer modes; must be
        False. ``use_deepseek_fp8_block_scale`` (fp8 activations too) raises an error that is
        both ``NotImplementedError`` and ``ValueError`` and points to the weight-only mode
        ``use_fp8_woq_group_scaling`` with the block scales expanded by
        :func:`cutlass_moe.fp8.expand_block_scales`.
        tune_max_num_tokens: the largest token bucket of the AutoTuner; calls with more tokens
            share its tactics (see :func:`cutlass_moe.autotune`).
        enable_pdl: programmatic dependent launch between the call's kernels (and with the
            kernel before the call): each kernel's launch overlaps the end of the one before
            it, which saves a few microseconds per decode call. None (the default) or True: on
            where the GPU supports it (sm_90 and newer, with code built for it); False: off.
        activation_type: an :class:`~cutlass_moe.ActivationType` (FlashInfer's values, or a
            FlashInfer enum member, matched by name): Swiglu (default), Geglu, Gelu, Relu,
            Silu, Identity, SwigluBias, Relu2, SwigluStep, GegluTanh, Situ or ClampedRelu2
            (formulas in :mod:`cutlass_moe.activation`); InvalidType raises
            ``NotImplementedError``.
        swizzled_input_sf: accepted for compatibility (only meaningful with ``input_sf``).
        use_fused_finalize: accepted for compatibility; finalize is always the unfused kernel
            (no atomics). Determinism: with the same inputs, tactic pair, GPU and build, the
            output is bitwise identical run to run (every sum is formed in a fixed order,
            split-K partials included). Two different tactics (e.g. the heuristic default and a
            tuned one, or the tactics of two token buckets) may differ in the last bits; force
            ``tactics=`` or load a fixed tuning cache where bitwise reproducibility across
            token counts or processes matters.
        profile_ids: must be None (or all -1); use ``tactics`` to force kernels.
        workspace_buffer: optional contiguous 1-D uint8 scratch on the input's device, reused
            across calls instead of allocating (torch's caching allocator) on each call.

    Keyword-only, as in FlashInfer 0.7:

        clamped_relu2_limit: ClampedRelu2's model-wide clamp ``L`` of
            ``(L * tanh(relu(x) / L))**2``, a one-element float32 tensor on the input's device
            (finite and positive; not checked, which would synchronise). Required with
            ClampedRelu2, refused with any other activation.
        situ_beta, situ_linear_beta: Situ's per-expert tanh scales, float32 ``[E]``
            (``a = (b*tanh(gate/b)*sigmoid(gate)) * (lb*tanh(up/lb))``); each defaults to 4.0
            and 25.0 when not given. Refused with any other activation.
        backend: ``"cutlass"``. FlashInfer's ``"cake"`` (its prepared TP8 SiTU NVFP4 call)
            raises ``NotImplementedError``, any other value ``ValueError``.

    Keyword-only extensions (not in FlashInfer's signature):

        use_int8_woq_per_channel: TensorRT-LLM's int8 weight-only mode (W8A16): int8
            ``fc1_expert_weights``/``fc2_expert_weights`` in kernel layout (the ordinary
            ``[E, N, K]``, K contiguous; see
            :func:`cutlass_moe.quantization.to_int8_kernel_layout`) with symmetric
            per-output-channel ``quant_scales``; the layer computes with the dequantised
            weights ``q * scale``. Needs ``H`` and ``I`` to be multiples of 16.
        use_fp8_woq_group_scaling: FP8 (e4m3) group-wise weight-only quantization (W8A16 with
            fp8 weights) with float16/bfloat16 ``input``, on its own runner and tactics
            (``weight_dtype`` "fp8"). ``fc1_expert_weights``/``fc2_expert_weights``:
            ``torch.float8_e4m3fn`` ``[E, N1, H]`` / ``[E, H, I]`` (K contiguous, fc1 rows
            ``[up; gate]``); ``quant_scales=[fc31_scales, fc2_scales]`` float32
            ``[E, H/G1, N1]`` and ``[E, I/G2, H]`` (N contiguous; ``G`` a multiple of 32
            dividing K, or ``G = K`` per channel; read from the scales' shape, separately per
            GEMM). The layer computes with ``float32(v) * s`` rounded once to the input dtype.
            No zero points. Per-tensor scales must be expanded to per-channel ``[E, 1, N]``;
            DeepSeek-V3/Qwen3-FP8 128x128 block scales with
            :func:`cutlass_moe.fp8.expand_block_scales`. Produce the weights with
            :func:`cutlass_moe.fp8.quantize_moe_weights_fp8`. The e4m3fn NaN code must not
            appear in the weights (not checked here: that would read them; importers refuse
            it). Needs ``H`` and ``I`` multiples of 32. Not together with
            ``use_int8_woq_per_channel`` or ``use_w4_group_scaling``.
        check_inputs: check on the host that every id is in ``[0, E*ep_size)`` and raise
            ``ValueError`` naming the bad ids. It synchronises with the GPU: during CUDA-graph
            capture it raises ``RuntimeError`` instead (check before capturing). Also on for
            every eager call when the environment variable ``CUTLASS_MOE_CHECK_INPUTS=1``
            (skipped, with one warning, for calls being captured).
        tactics: optional ``(gemm1_tactic_name, gemm2_tactic_name)`` forcing the kernels (names
            from ``MoeRunner.tactics(1)`` / ``(2)``); by default a heuristic picks them from
            the expected rows per expert ``T*k/(E*ep_size)``.

    Returns:
        ``[output]``: a one-element list holding the ``[T, H]`` result of ``output_dtype``
        (``output`` itself when given).

    Raises:
        NotImplementedError: an unsupported dtype, activation or FlashInfer mode.
        ValueError: inconsistent shapes, dtypes, devices, layouts or ranks (the message names
            them), e.g. int8 weights without ``use_int8_woq_per_channel`` or the reverse, uint8
            (packed int4) weights without ``use_w4_group_scaling``, int4 scales whose group
            size is not a multiple of 32 dividing K, zero points for one GEMM only, or a W4A8
            ``quant_scales`` list; float8_e4m3fn weights without
            ``use_fp8_woq_group_scaling``, fp8 scales that are not float32 ``[E, K/G, N]``,
            MXFP4 scales that are not ``[E, K/32, N]``, zero points with fp8 or MXFP4 weights,
            or formats mixed between the two GEMMs.
        TypeError: a required tensor, or ``quant_scales`` or one of its entries, of the wrong
            type.
        RuntimeError: no CUDA device, or the compiled extension is missing.
    """
    call = validation.prepare_call(
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
        clamped_relu2_limit=clamped_relu2_limit,
        situ_beta=situ_beta,
        situ_linear_beta=situ_linear_beta,
        backend=backend,
        use_fp8_woq_group_scaling=use_fp8_woq_group_scaling,
    )
    compiling = torch.compiler.is_compiling()
    if compiling:
        if check_inputs:
            validation.check_expert_ids(call.raw_token_selected_experts, call.num_experts_total)
    else:
        if _check_ids_now(check_inputs):
            validation.check_expert_ids(call.raw_token_selected_experts, call.num_experts_total)
        validation.require_cuda(call.input.device)

    out = call.output
    if out is None:
        out = torch.empty(
            (call.input.shape[0], call.input.shape[1]),
            dtype=call.output_dtype,
            device=call.input.device,
        )
    op_args = (
        out, call.input, call.token_selected_experts, call.token_final_scales,
        call.fc1_expert_weights, call.fc2_expert_weights, call.fc1_weight_scales,
        call.fc2_weight_scales, call.fc1_expert_biases, call.fc2_expert_biases,
        call.swiglu_alpha, call.swiglu_beta, call.swiglu_limit, call.workspace_buffer,
        int(call.activation), call.expert_start, call.num_experts_total, tune_max_num_tokens,
        call.tactic1, call.tactic2, enable_pdl is None or bool(enable_pdl),
        call.clamped_relu2_limit, call.situ_beta, call.situ_linear_beta,
        call.fc1_weight_zeros, call.fc2_weight_zeros, call.weight_format,
    )
    if compiling:
        torch.ops.cutlass_moe.fused_moe(*op_args)
    else:
        _validated.output = out
        try:
            torch.ops.cutlass_moe.fused_moe(*op_args)
        finally:
            _validated.output = None
    return [out]
