"""Plain-torch reference of the fused MoE layer, the standard of correctness
(docs/architecture.md, "Correctness").

Same semantics as ``cutlass_fused_moe``, computed in ``compute_dtype`` without rounding of
intermediates:

    out[t] = sum_j s[t, j] * (W2_e @ act(W1_e @ x[t] + b1_e) + b2_e),   e = ids[t, j] - ep_rank*E

where choices whose expert is not on this rank (other ranks' ids, negative or too large ids)
contribute zero, and ``b2`` is added on ``tp_rank == 0`` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import (
    ACTIVATION_PARAMETERS,
    DEFAULT_SITU_BETA,
    DEFAULT_SITU_LINEAR_BETA,
    DEFAULT_SWIGLU_STEP_LIMIT,
    ActivationType,
    is_gated,
    require_supported,
)

#: The limit used when clamped SwiGLU is on but no ``swiglu_limit`` was given (no clamping).
DEFAULT_SWIGLU_LIMIT = torch.finfo(torch.float32).max

_SWIGLU_FAMILY = (ActivationType.Swiglu, ActivationType.SwigluBias)


def reference_moe(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    activation_type: ActivationType = ActivationType.Swiglu,
    fc1_expert_biases: torch.Tensor | None = None,
    fc2_expert_biases: torch.Tensor | None = None,
    swiglu_alpha: torch.Tensor | None = None,
    swiglu_beta: torch.Tensor | None = None,
    swiglu_limit: torch.Tensor | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    ep_size: int = 1,
    ep_rank: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    *,
    clamped_relu2_limit: torch.Tensor | None = None,
    situ_beta: torch.Tensor | None = None,
    situ_linear_beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference MoE layer in plain torch (slow, simple, vectorised per expert).

    Args:
        input: ``[T, H]`` activations (any float dtype).
        token_selected_experts: ``[T, k]`` integer global expert ids; ids outside this rank's
            range ``[ep_rank*E, (ep_rank+1)*E)`` contribute zero.
        token_final_scales: ``[T, k]`` router weights.
        fc1_expert_weights: ``[E, 2I, H]`` (rows ``[up | gate]``) for gated activations,
            ``[E, I, H]`` otherwise.
        fc2_expert_weights: ``[E, H, I]``.
        activation_type: any supported :class:`ActivationType` (formulas in
            :func:`apply_activation` and :mod:`cutlass_moe.activation`).
        fc1_expert_biases: optional ``[E, 2I]`` / ``[E, I]``.
        fc2_expert_biases: optional ``[E, H]``, added only when ``tp_rank == 0``.
        swiglu_alpha, swiglu_beta, swiglu_limit: optional ``[E]``; with Swiglu (or SwigluBias)
            any of them switches to the clamped form ``g = min(gate, limit);
            u = clamp(up, -limit, limit) + beta; a = g * sigmoid(alpha * g) * u`` (missing ones
            default to 1, 0, float32 max). ``swiglu_limit`` alone is SwigluStep's per-expert
            limit (default 7).
        tp_size, tp_rank: tensor parallelism (the weights are this rank's slice of I).
        ep_size, ep_rank: expert parallelism (the weights are this rank's experts).
        compute_dtype: dtype of every operation and of the result (float32 or float64).
        clamped_relu2_limit: ClampedRelu2's model-wide limit, one element (required with it).
        situ_beta, situ_linear_beta: optional ``[E]``, Situ's tanh scales (defaults 4 and 25).

    Each per-activation argument is refused (ValueError) with an activation that does not
    take it.

    Returns:
        ``[T, H]`` tensor in ``compute_dtype`` on ``input.device``.
    """
    act = require_supported(activation_type)
    if input.dim() != 2:
        raise ValueError(f"input must be [T, H], got shape {tuple(input.shape)}")
    num_tokens, hidden_size = input.shape
    if token_selected_experts.dim() != 2 or token_selected_experts.shape[0] != num_tokens:
        raise ValueError(
            f"token_selected_experts must be [T={num_tokens}, k], got "
            f"{tuple(token_selected_experts.shape)}"
        )
    if token_final_scales.shape != token_selected_experts.shape:
        raise ValueError(
            f"token_final_scales shape {tuple(token_final_scales.shape)} != "
            f"token_selected_experts shape {tuple(token_selected_experts.shape)}"
        )
    if not 0 <= tp_rank < tp_size or not 0 <= ep_rank < ep_size:
        raise ValueError(
            f"need 0 <= tp_rank < tp_size and 0 <= ep_rank < ep_size, got tp {tp_rank}/{tp_size}, "
            f"ep {ep_rank}/{ep_size}"
        )
    num_experts = fc1_expert_weights.shape[0]
    inter_size = fc2_expert_weights.shape[2]
    gated = is_gated(act)
    expected_fc1 = (num_experts, 2 * inter_size if gated else inter_size, hidden_size)
    if tuple(fc1_expert_weights.shape) != expected_fc1:
        raise ValueError(
            f"fc1_expert_weights must be {list(expected_fc1)} for {act.name}, got "
            f"{list(fc1_expert_weights.shape)}"
        )
    if tuple(fc2_expert_weights.shape) != (num_experts, hidden_size, inter_size):
        raise ValueError(
            f"fc2_expert_weights must be {[num_experts, hidden_size, inter_size]}, got "
            f"{list(fc2_expert_weights.shape)}"
        )
    _check_parameters(act, num_experts, {
        "swiglu_alpha": swiglu_alpha, "swiglu_beta": swiglu_beta, "swiglu_limit": swiglu_limit,
        "situ_beta": situ_beta, "situ_linear_beta": situ_linear_beta,
        "clamped_relu2_limit": clamped_relu2_limit,
    })
    clamped = act in _SWIGLU_FAMILY and any(
        t is not None for t in (swiglu_alpha, swiglu_beta, swiglu_limit))

    device = input.device
    out = torch.zeros(num_tokens, hidden_size, dtype=compute_dtype, device=device)
    top_k = token_selected_experts.shape[1]
    if num_tokens == 0 or top_k == 0:
        return out

    x = input.to(compute_dtype)
    expert_start = ep_rank * num_experts
    local_expert = token_selected_experts.reshape(-1).to(torch.int64) - expert_start
    scales = token_final_scales.reshape(-1).to(compute_dtype)
    token_of_choice = torch.arange(num_tokens, device=device).repeat_interleave(top_k)
    kept = torch.nonzero((local_expert >= 0) & (local_expert < num_experts)).squeeze(1)
    local_expert = local_expert[kept]
    order = torch.argsort(local_expert, stable=True)
    kept = kept[order]
    rows_per_expert = torch.bincount(local_expert, minlength=num_experts).tolist()

    # Per-expert parameters as [E] tensors (defaults filled in), on the input's device.
    per_expert: dict[str, torch.Tensor] = {}
    if clamped:
        per_expert["alpha"] = _or_full(swiglu_alpha, num_experts, 1.0, device)
        per_expert["beta"] = _or_full(swiglu_beta, num_experts, 0.0, device)
        per_expert["limit"] = _or_full(swiglu_limit, num_experts, DEFAULT_SWIGLU_LIMIT, device)
    elif act == ActivationType.SwigluStep:
        per_expert["limit"] = _or_full(swiglu_limit, num_experts, DEFAULT_SWIGLU_STEP_LIMIT,
                                       device)
    elif act == ActivationType.Situ:
        per_expert["situ_beta"] = _or_full(situ_beta, num_experts, DEFAULT_SITU_BETA, device)
        per_expert["situ_linear_beta"] = _or_full(situ_linear_beta, num_experts,
                                                  DEFAULT_SITU_LINEAR_BETA, device)
    model_wide: dict[str, torch.Tensor] = {}
    if act == ActivationType.ClampedRelu2:
        model_wide["clamped_relu2_limit"] = clamped_relu2_limit.reshape(()).to(device,
                                                                            compute_dtype)

    begin = 0
    for expert, rows in enumerate(rows_per_expert):
        if rows == 0:
            continue
        choices = kept[begin : begin + rows]
        begin += rows
        tokens = token_of_choice[choices]
        h = x.index_select(0, tokens) @ fc1_expert_weights[expert].to(compute_dtype).t()
        if fc1_expert_biases is not None:
            h = h + fc1_expert_biases[expert].to(compute_dtype)
        params = {name: values[expert].to(compute_dtype) for name, values in per_expert.items()}
        if clamped:
            a = _clamped_swiglu(h, params["alpha"], params["beta"], params["limit"])
        else:
            a = apply_activation(h, act, **params, **model_wide)
        y = a @ fc2_expert_weights[expert].to(compute_dtype).t()
        if fc2_expert_biases is not None and tp_rank == 0:
            y = y + fc2_expert_biases[expert].to(compute_dtype)
        out.index_add_(0, tokens, y * scales[choices].unsqueeze(1))
    return out


def _check_parameters(
    act: ActivationType, num_experts: int, parameters: dict[str, torch.Tensor | None]
) -> None:
    """Each per-activation argument only with its activation, of its shape; ClampedRelu2's
    limit required (the rule of ``cutlass_fused_moe``, without its dtype and device checks)."""
    for name, tensor in parameters.items():
        if tensor is None:
            continue
        allowed = ACTIVATION_PARAMETERS[name]
        if act not in allowed:
            raise ValueError(
                f"{name} is only valid with ActivationType."
                f"{' or '.join(a.name for a in allowed)}, got {act.name}"
            )
        expected = (1,) if name == "clamped_relu2_limit" else (num_experts,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must be {list(expected)}, got {list(tensor.shape)}")
    if act == ActivationType.ClampedRelu2 and parameters["clamped_relu2_limit"] is None:
        raise ValueError("ActivationType.ClampedRelu2 needs clamped_relu2_limit (one element)")


def apply_activation(
    h: torch.Tensor,
    activation_type: ActivationType,
    *,
    limit: torch.Tensor | float | None = None,
    situ_beta: torch.Tensor | float = DEFAULT_SITU_BETA,
    situ_linear_beta: torch.Tensor | float = DEFAULT_SITU_LINEAR_BETA,
    clamped_relu2_limit: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The activation on GEMM1's output ``h`` (``[rows, 2I]`` gated as ``[up | gate]``, else
    ``[rows, I]``); returns ``[rows, I]`` in ``h``'s dtype. Plain SwiGLU for Swiglu and
    SwigluBias (their clamped form is :func:`reference_moe`'s, with per-expert parameters).

    ``limit``: SwigluStep's limit (default 7); ``situ_beta``/``situ_linear_beta``: Situ's
    scales (defaults 4 and 25); ``clamped_relu2_limit``: ClampedRelu2's (required). Scalars or
    0-d tensors (one expert's values).
    """
    act = require_supported(activation_type)
    if is_gated(act):
        up, gate = h.chunk(2, dim=-1)
        if act in _SWIGLU_FAMILY:
            return up * F.silu(gate)
        if act == ActivationType.Geglu:
            return up * F.gelu(gate)
        if act == ActivationType.GegluTanh:
            return up * F.gelu(gate, approximate="tanh")
        if act == ActivationType.SwigluStep:
            step = DEFAULT_SWIGLU_STEP_LIMIT if limit is None else limit
            step = torch.as_tensor(step, dtype=h.dtype, device=h.device)
            return torch.minimum(F.silu(gate), step) * torch.maximum(torch.minimum(up, step), -step)
        # Situ: the sigmoid reads the uncapped gate.
        b = torch.as_tensor(situ_beta, dtype=h.dtype, device=h.device)
        lb = torch.as_tensor(situ_linear_beta, dtype=h.dtype, device=h.device)
        return (b * torch.tanh(gate / b) * torch.sigmoid(gate)) * (lb * torch.tanh(up / lb))
    if act == ActivationType.Gelu:
        return F.gelu(h)
    if act == ActivationType.Relu:
        return F.relu(h)
    if act == ActivationType.Silu:
        return F.silu(h)
    if act == ActivationType.Relu2:
        return F.relu(h).square()
    if act == ActivationType.ClampedRelu2:
        if clamped_relu2_limit is None:
            raise ValueError("ActivationType.ClampedRelu2 needs clamped_relu2_limit")
        bound = torch.as_tensor(clamped_relu2_limit, dtype=h.dtype, device=h.device)
        return (bound * torch.tanh(F.relu(h) / bound)).square()
    return h


def _clamped_swiglu(
    h: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, limit: torch.Tensor
) -> torch.Tensor:
    up, gate = h.chunk(2, dim=-1)
    g = torch.minimum(gate, limit)
    u = torch.maximum(torch.minimum(up, limit), -limit) + beta
    return g * torch.sigmoid(alpha * g) * u


def _or_full(
    values: torch.Tensor | None, num_experts: int, fill: float, device: torch.device
) -> torch.Tensor:
    if values is not None:
        if values.shape != (num_experts,):
            raise ValueError(
                f"per-expert activation parameters must be [E={num_experts}], got "
                f"{tuple(values.shape)}"
            )
        return values.to(device)
    return torch.full((num_experts,), fill, dtype=torch.float32, device=device)
