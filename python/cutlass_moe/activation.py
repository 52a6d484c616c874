"""Activation types between GEMM1 and GEMM2, with FlashInfer-compatible values.

``ActivationType`` mirrors ``flashinfer.fused_moe.ActivationType`` (TensorRT-LLM's
``ActivationType``) so that code written for FlashInfer passes the same values. Members of another
enum class (FlashInfer's own, of any version) are matched by *name*, which is stable across
FlashInfer releases; plain integers are read with this module's values.
"""

from __future__ import annotations

import enum
from enum import IntEnum


class ActivationType(IntEnum):
    """Activation applied to GEMM1's output (values follow FlashInfer's ``ActivationType``).

    Gated activations (``Swiglu``, ``Geglu``) read GEMM1's ``2*I`` columns as ``[up | gate]``:
    ``a = up * act(gate)``. The others read ``I`` columns.
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
    InvalidType = 10

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
)

_GATED = frozenset({ActivationType.Swiglu, ActivationType.Geglu})


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
