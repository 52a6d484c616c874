"""Activation types between GEMM1 and GEMM2, with FlashInfer's values.

``ActivationType`` mirrors ``flashinfer.ActivationType`` of FlashInfer 0.7.2
(``flashinfer/tllm_enums.py``; TensorRT-LLM's ``ActivationType`` plus ``ClampedRelu2``) so that
code written for FlashInfer passes the same values. Members of another enum class (FlashInfer's
own, of any version) are matched by *name*, which is stable across FlashInfer releases; plain
integers are read with this module's values, which are FlashInfer's.

The formulas (docs/architecture.md, "Activations"; ``h`` is GEMM1's output plus the fc1 bias;
gated ones read it as ``[up | gate]``)::

    Gelu          gelu(h) = 0.5 h (1 + erf(h / sqrt 2))
    Relu          max(h, 0)
    Silu          h sigmoid(h)
    Identity      h
    Relu2         relu(h)^2
    ClampedRelu2  (L tanh(relu(h) / L))^2, L = clamped_relu2_limit[0] (model-wide)
    Swiglu        up * silu(gate); with swiglu_alpha/beta/limit (per expert) the clamped form
                  g = min(gate, limit); u = clamp(up, -limit, limit) + beta; g sigmoid(alpha g) u
    SwigluBias    Swiglu's clamped form (FlashInfer's name for it)
    Geglu         up * gelu(gate)
    GegluTanh     up * gelu_tanh(gate),
                  gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    SwigluStep    min(silu(gate), L) * clamp(up, -L, L), L = swiglu_limit[e] (default 7)
    Situ          (b tanh(gate / b) sigmoid(gate)) * (lb tanh(up / lb)),
                  b = situ_beta[e] (default 4), lb = situ_linear_beta[e] (default 25)
"""

from __future__ import annotations

import enum
from enum import IntEnum


class ActivationType(IntEnum):
    """Activation applied to GEMM1's output (FlashInfer 0.7.2's ``ActivationType`` values).

    Gated activations (``Swiglu``, ``Geglu``, ``SwigluBias``, ``SwigluStep``, ``GegluTanh``,
    ``Situ``) read GEMM1's ``2*I`` columns as ``[up | gate]``. The others read ``I`` columns.
    """

    Gelu = 0
    Relu = 1
    Silu = 2
    Swiglu = 3
    Geglu = 4
    SwigluBias = 5
    Relu2 = 6
    SwigluStep = 7
    GegluTanh = 8
    Identity = 9
    Situ = 10
    InvalidType = 11
    ClampedRelu2 = 12

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


#: Activations this build implements, in the order error messages list them.
SUPPORTED_ACTIVATIONS: tuple[ActivationType, ...] = (
    ActivationType.Swiglu,
    ActivationType.Geglu,
    ActivationType.Gelu,
    ActivationType.Relu,
    ActivationType.Silu,
    ActivationType.Identity,
    ActivationType.SwigluBias,
    ActivationType.Relu2,
    ActivationType.SwigluStep,
    ActivationType.GegluTanh,
    ActivationType.Situ,
    ActivationType.ClampedRelu2,
)

# FlashInfer's _GATED_ACTIVATION_TYPES.
_GATED = frozenset({
    ActivationType.Swiglu,
    ActivationType.Geglu,
    ActivationType.SwigluBias,
    ActivationType.SwigluStep,
    ActivationType.GegluTanh,
    ActivationType.Situ,
})

#: Defaults of the per-expert parameters that are not given (FlashInfer's values:
#: ``SwigluStepAdaptor::limit``, ``DEFAULT_SITU_BETA``, ``DEFAULT_SITU_LINEAR_BETA``).
DEFAULT_SWIGLU_STEP_LIMIT = 7.0
DEFAULT_SITU_BETA = 4.0
DEFAULT_SITU_LINEAR_BETA = 25.0

#: Which optional per-activation arguments each activation accepts (any other activation
#: refuses them). ``clamped_relu2_limit`` is required with ``ClampedRelu2``.
ACTIVATION_PARAMETERS: dict[str, tuple[ActivationType, ...]] = {
    "swiglu_alpha": (ActivationType.Swiglu, ActivationType.SwigluBias),
    "swiglu_beta": (ActivationType.Swiglu, ActivationType.SwigluBias),
    "swiglu_limit": (ActivationType.Swiglu, ActivationType.SwigluBias, ActivationType.SwigluStep),
    "situ_beta": (ActivationType.Situ,),
    "situ_linear_beta": (ActivationType.Situ,),
    "clamped_relu2_limit": (ActivationType.ClampedRelu2,),
}


def supported_activation_names() -> str:
    """Comma-separated names of the supported activations, for error messages."""
    return ", ".join(a.name for a in SUPPORTED_ACTIVATIONS)


def normalize_activation(activation_type: object) -> ActivationType:
    """Returns the ``ActivationType`` for an enum member (any enum class, matched by name),
    an ``int`` (this module's values) or a name string (case-insensitive).

    Raises ``ValueError`` for a value that names no activation type, ``TypeError`` for another
    kind of object.
    """
    if isinstance(activation_type, ActivationType):
        return activation_type
    if isinstance(activation_type, enum.Enum):
        name = activation_type.name
        for member in ActivationType:
            if member.name.lower() == name.lower():
                return member
        raise ValueError(f"unknown activation_type {activation_type!r}")
    if isinstance(activation_type, int) and not isinstance(activation_type, bool):
        try:
            return ActivationType(activation_type)
        except ValueError:
            raise ValueError(f"unknown activation_type {activation_type!r}") from None
    if isinstance(activation_type, str):
        for member in ActivationType:
            if member.name.lower() == activation_type.lower():
                return member
        raise ValueError(f"unknown activation_type {activation_type!r}")
    raise TypeError(
        f"activation_type must be an ActivationType, int or str, got "
        f"{type(activation_type).__name__}"
    )


def require_supported(activation_type: object) -> ActivationType:
    """``normalize_activation``, then ``NotImplementedError`` for a type this build lacks."""
    act = normalize_activation(activation_type)
    if act not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(
            f"activation_type {act.name} is not supported by cutlass_moe; supported: "
            f"{supported_activation_names()}"
        )
    return act


def is_gated(activation_type: ActivationType) -> bool:
    """True when GEMM1 produces ``2*I`` columns ``[up | gate]`` for this activation."""
    return activation_type in _GATED
