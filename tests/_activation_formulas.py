"""Explicit formulas of every activation, written from FlashInfer 0.7.2's / TensorRT-LLM's
definitions (docs/architecture.md, "Activations") independently of cutlass_moe.reference, and a
per-token loop that uses them: the standard the reference and the kernels are checked against.

``h`` is GEMM1's output plus the fc1 bias; gated activations read it as ``[up | gate]``.
"""

from __future__ import annotations

import math

import torch

#: FlashInfer 0.7.2's ActivationType (flashinfer/tllm_enums.py), name -> value, in order.
FLASHINFER_ACTIVATION_VALUES = {
    "Gelu": 0, "Relu": 1, "Silu": 2, "Swiglu": 3, "Geglu": 4, "SwigluBias": 5, "Relu2": 6,
    "SwigluStep": 7, "GegluTanh": 8, "Identity": 9, "Situ": 10, "InvalidType": 11,
    "ClampedRelu2": 12,
}
#: FlashInfer's _GATED_ACTIVATION_TYPES.
FLASHINFER_GATED = {"Swiglu", "Geglu", "SwigluBias", "SwigluStep", "GegluTanh", "Situ"}
#: Every activation cutlass_moe implements, by name.
IMPLEMENTED = ["Swiglu", "Geglu", "Gelu", "Relu", "Silu", "Identity", "SwigluBias", "Relu2",
               "SwigluStep", "GegluTanh", "Situ", "ClampedRelu2"]
#: The FlashInfer 0.7 activations beyond the original six (with SwigluBias, which runs as the
#: clamped SwiGLU).
NEW = ["Relu2", "ClampedRelu2", "GegluTanh", "SwigluStep", "Situ", "SwigluBias"]


def _sigmoid(z: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-z))


def _relu(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z > 0, z, torch.zeros_like(z))


def _clamp(z: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return torch.where(z > high, torch.full_like(z, high),
                       torch.where(z < low, torch.full_like(z, low), z))


def explicit_activation(name: str, h: torch.Tensor, params: dict[str, float] | None = None
                        ) -> torch.Tensor:
    """One expert's activation of ``h`` ([rows, 2I] gated, else [rows, I]).

    ``params`` (one expert's values; missing ones take FlashInfer's defaults):
    ``alpha``, ``beta``, ``limit`` (Swiglu/SwigluBias clamp; SwigluStep's limit, default 7),
    ``situ_beta`` (4), ``situ_linear_beta`` (25), ``clamped_relu2_limit`` (required).
    """
    p = params or {}
    if name in FLASHINFER_GATED:
        half = h.shape[-1] // 2
        up, gate = h[..., :half], h[..., half:]
        if name in ("Swiglu", "SwigluBias"):
            if any(k in p for k in ("alpha", "beta", "limit")):
                alpha, beta = p.get("alpha", 1.0), p.get("beta", 0.0)
                limit = p.get("limit", float(torch.finfo(torch.float32).max))
                g = torch.where(gate > limit, torch.full_like(gate, limit), gate)
                u = _clamp(up, -limit, limit) + beta
                return g * _sigmoid(alpha * g) * u
            return gate * _sigmoid(gate) * up
        if name == "Geglu":
            return 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up
        if name == "GegluTanh":
            inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)
            return 0.5 * gate * (1.0 + torch.tanh(inner)) * up
        if name == "SwigluStep":
            limit = p.get("limit", 7.0)
            silu = gate * _sigmoid(gate)
            return torch.where(silu > limit, torch.full_like(silu, limit), silu) * \
                _clamp(up, -limit, limit)
        if name == "Situ":
            b, lb = p.get("situ_beta", 4.0), p.get("situ_linear_beta", 25.0)
            return (b * torch.tanh(gate / b) * _sigmoid(gate)) * (lb * torch.tanh(up / lb))
        raise AssertionError(name)
    if name == "Gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "Relu":
        return _relu(h)
    if name == "Silu":
        return h * _sigmoid(h)
    if name == "Identity":
        return h
    if name == "Relu2":
        return _relu(h) ** 2
    if name == "ClampedRelu2":
        limit = p["clamped_relu2_limit"]
        return (limit * torch.tanh(_relu(h) / limit)) ** 2
    raise AssertionError(name)


def expert_params(kwargs: dict, expert: int) -> dict[str, float]:
    """One expert's parameters from cutlass_fused_moe-style keyword arguments."""
    out: dict[str, float] = {}
    for key, name in (("swiglu_alpha", "alpha"), ("swiglu_beta", "beta"),
                      ("swiglu_limit", "limit"), ("situ_beta", "situ_beta"),
                      ("situ_linear_beta", "situ_linear_beta")):
        if kwargs.get(key) is not None:
            out[name] = float(kwargs[key][expert])
    if kwargs.get("clamped_relu2_limit") is not None:
        out["clamped_relu2_limit"] = float(kwargs["clamped_relu2_limit"].reshape(-1)[0])
    return out


def naive_layer(x: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor, fc1: torch.Tensor,
                fc2: torch.Tensor, name: str, b1: torch.Tensor | None = None,
                b2: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """The layer as a per-token, per-choice loop in float64 on the CPU with
    :func:`explicit_activation`: ``out[t] = sum_j s[t,j] (W2_e act(W1_e x[t] + b1_e) + b2_e)``."""
    x, fc1, fc2 = x.cpu().double(), fc1.cpu().double(), fc2.cpu().double()
    ids, scales = ids.cpu(), scales.cpu().double()
    num_experts = fc1.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float64)
    params = {e: expert_params({k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                for k, v in kwargs.items()}, e) for e in range(num_experts)}
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < num_experts:
                continue
            h = fc1[e] @ x[t]
            if b1 is not None:
                h = h + b1[e].cpu().double()
            y = fc2[e] @ explicit_activation(name, h, params[e])
            if b2 is not None:
                y = y + b2[e].cpu().double()
            out[t] += scales[t, j] * y
    return out
