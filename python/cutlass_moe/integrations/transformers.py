"""``experts_implementation="cutlass_moe"`` for Hugging Face transformers 5.x MoE models.

transformers (>= 5.7) routes the experts of its MoE models (every class decorated with
``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, gpt-oss, OLMoE, GLM-4-MoE,
...) through its ``ExpertsInterface``. Importing this module registers cutlass_moe there, after
which one keyword selects it::

    import cutlass_moe.integrations.transformers  # registers "cutlass_moe"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 experts_implementation="cutlass_moe")
    # or, on a loaded model: model.set_experts_implementation("cutlass_moe")

(:func:`register` does the same, idempotently; ``import cutlass_moe`` alone never imports
transformers.)

**The mapping.** transformers calls ``fn(experts, hidden_states, top_k_index, top_k_weights)``
on the experts module; :func:`cutlass_moe_experts_forward` turns the module into one
:func:`cutlass_moe.cutlass_fused_moe` call:

- weights ``gate_up_proj`` ``[E, 2I, H]`` (``is_transposed``: ``[E, H, 2I]``), gate rows first
  (``is_concatenated=False``: gate/up interleaved) become fc1 ``[E, 2I, H]`` rows
  ``[up | gate]``; ``down_proj`` ``[E, H, I]`` (transposed: ``[E, I, H]``) becomes fc2;
  ``has_gate=False`` modules (``up_proj`` only) run an ungated activation; ``has_bias``
  biases follow their weights;
- the activation is what the module's ``_apply_gate`` (gated) or ``act_fn`` (ungated)
  computes, recognised by evaluating it once on a fixed float64 probe of wide range and
  comparing it with every kernel activation whose parameters the module or its config name:
  SiLU gate -> ``Swiglu``, exact GELU -> ``Geglu``, tanh GELU -> ``GegluTanh``, the clamped
  SwiGLU of gpt-oss (alpha 1.702, limit 7, ``up + 1``) and of other families (any alpha, beta 0
  or 1, limit) -> ``Swiglu`` with ``swiglu_alpha/beta/limit``, ``SwigluStep``, softcapped SwiGLU
  -> ``Situ``; ungated ``Relu2``, ``Relu``, ``Silu``, ``Gelu``, ``Identity``, ``ClampedRelu2``.
  Only an exact match (to float64 rounding, or float32 where the module computes in float32)
  is used;
- expert parallelism (``_is_expert_parallel``: local ids, off-rank choices marked with ids
  ``>= E``) maps exactly: ids outside ``[0, E)`` contribute zero in the kernel too.

**Quantised checkpoints.** transformers' fine-grained FP8 experts (``FP8Experts``, which
dispatch through their own ``FP8ExpertsInterface``: :func:`register` registers there too) run
on the fp8 weight-only kernels (e4m3 codes moved as they are, rows ``[up | gate]``, block
scales expanded to ``[E, K/G, N]`` float32), or on the mxfp4 kernels for ``expert_dtype="fp4"``
with power-of-two scales; the weights dequantise exactly to those of the checkpoint loaded
with ``dequantize=True`` (transformers' own FP8 kernels also quantise the activations, these
do not). Static activation scales, blocks the kernels cannot take and e4m3 NaN codes fall back.
gpt-oss's MXFP4 experts (``Mxfp4GptOssExperts``) have no experts hook in transformers:
:func:`convert_experts` and :func:`prepare` raise NotImplementedError for them. Loaded with
``quantization_config=Mxfp4Config(dequantize=True)`` instead (bf16 ``GptOssExperts``),
``prepare(model, weights="mxfp4")`` re-quantises them losslessly to the checkpoint's weights
(docs/transformers.md, "Quantised checkpoints").

**Fallback.** What cannot be expressed exactly runs transformers' own eager experts forward,
with one :class:`CutlassMoeFallbackWarning` per experts class and reason, never a different
result: ``has_post_expert_norm``, an activation or gate that matches no kernel activation,
parameters or buffers the mapping does not know (e.g. quantised checkpoints' scales), DTensor
or meta parameters, float32 (or mixed) dtypes, shapes the kernels refuse (``H``, ``I`` not
multiples of 8), tensors not on a CUDA device, a missing compiled extension, and calls that
need gradients (the fused kernel has no backward: run inference under ``torch.no_grad()``).

**Memory.** The converted weights are made on a module's first call, kept as non-persistent
buffers ``cutlass_moe_*`` of the module (so ``model.to(...)`` moves them and CUDA graphs treat
them as static) and reused; they are rebuilt when a source parameter changes (another tensor,
an in-place update that bumps its version, or new storage). Converting costs one copy of
``gate_up_proj`` (2/3 of the expert weights of a gated model, since it must be reordered to
``[up | gate]``), plus one of ``down_proj`` when it is stored transposed (gpt-oss: the whole
expert weights once more); an untransposed ``down_proj`` (and an ungated ``up_proj``) is
used as it is, without a copy.
:func:`converted_weight_bytes` reports the cost. :func:`prepare` converts in place instead,
module by module, and frees the originals (peak: the model plus one layer's copy), optionally
quantising the 16-bit experts on the way (weight-only: int8 per channel, int4 or FP8 e4m3
group-wise, or MXFP4).

Under ``torch.compile`` the cached conversion is used without re-checking the parameters (run
one eager forward or :func:`prepare` first; a compiled first call builds it at a graph break);
building it inside CUDA-graph capture raises.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    import transformers
except ImportError as _exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "cutlass_moe.integrations.transformers needs Hugging Face transformers >= 5.7 "
        "(pip install 'transformers>=5.7,<6')"
    ) from _exc
try:
    from transformers.integrations import moe as _hf_moe
except ImportError:  # transformers 4.x: no ExpertsInterface (register() says so)
    _hf_moe = None
try:  # the fine-grained FP8 experts (FP8Experts) dispatch through their own ExpertsInterface
    from transformers.integrations import finegrained_fp8 as _hf_fp8
except ImportError:  # pragma: no cover - transformers without it
    _hf_fp8 = None
try:  # gpt-oss's MXFP4 experts (not a dispatching module: see _MXFP4_NOT_IMPLEMENTED)
    from transformers.integrations import mxfp4 as _hf_mxfp4
except ImportError:  # pragma: no cover - transformers without it
    _hf_mxfp4 = None

from .. import _ext, validation
from ..activation import ActivationType
from ..fp8 import dequantize_fp8, quantize_moe_weights_fp8
from ..int4 import dequantize_int4, quantize_moe_weights_int4
from ..mxfp4 import MXFP4_BLOCK, dequantize_mxfp4, quantize_moe_weights_mxfp4
from ..ops import cutlass_fused_moe
from ..quantization import dequantize, quantize_moe_weights_int8
from ..reference import apply_activation

__all__ = [
    "MIN_TRANSFORMERS_VERSION",
    "NAME",
    "ConvertedExperts",
    "CutlassMoeFallbackWarning",
    "UnsupportedExperts",
    "clear_converted_weights",
    "convert_experts",
    "converted_weight_bytes",
    "cutlass_moe_experts_forward",
    "experts_modules",
    "prepare",
    "register",
]

#: The name registered in transformers' ExpertsInterface.
NAME = "cutlass_moe"
#: The first transformers release whose ``experts_implementation`` check accepts registered
#: names (5.0-5.6 accept only a fixed list: eager, grouped_mm, batched_mm, deepgemm).
MIN_TRANSFORMERS_VERSION = (5, 7)

_PLAN_ATTR = "_cutlass_moe_plan"
_PREFIX = "cutlass_moe_"
_FLOAT32_MAX = torch.finfo(torch.float32).max
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Per-expert (or model-wide) activation parameters, float32, and the tensors of a conversion.
_PARAMETER_NAMES = ("swiglu_alpha", "swiglu_beta", "swiglu_limit", "situ_beta",
                    "situ_linear_beta", "clamped_relu2_limit")
_TENSOR_NAMES = ("fc1", "fc2", "fc1_bias", "fc2_bias", "fc1_scale", "fc2_scale",
                 *_PARAMETER_NAMES)
_WEIGHT_KINDS = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": None, "int4": None,
                 "fp8": None, "mxfp4": None}
#: The cutlass_fused_moe flag of each quantised weight format (the scales go in quant_scales).
_FORMAT_FLAGS = {"int8": "use_int8_woq_per_channel", "int4": "use_w4_group_scaling",
                 "fp8": "use_fp8_woq_group_scaling", "mxfp4": "use_w4_group_scaling"}
#: The formats 16-bit experts can be quantised to (prepare, convert_experts).
_QUANTIZERS = ("int8", "int4", "fp8", "mxfp4")
#: The formats whose group size along K is chosen (``group_size``), and its default.
_GROUPED = ("int4", "fp8")
_DEFAULT_GROUP_SIZE = 128
_QUANTIZED_CHECKPOINT_FORMATS = ("fp8", "mxfp4")
_E4M3_NAN = 0x7F  # e4m3fn: S.1111.111 is NaN


class CutlassMoeFallbackWarning(UserWarning):
    """An experts module runs transformers' eager forward instead of cutlass_moe (the message
    says why); issued once per experts class and reason."""


class UnsupportedExperts(ValueError):
    """The experts module cannot be expressed exactly as one ``cutlass_fused_moe`` call; the
    message is the reason."""


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------


def _transformers_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", getattr(transformers, "__version__", ""))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class _NameCheck:
    """Stands in for a model when asking transformers whether it accepts a name."""


def _fp8_interface() -> Any:
    """transformers' ``FP8ExpertsInterface`` (the registry ``FP8Experts`` dispatches through),
    or None where this transformers has none."""
    return getattr(_hf_fp8, "FP8ExpertsInterface", None)


def _fp8_experts_class() -> type | None:
    return getattr(_hf_fp8, "FP8Experts", None)


def _mxfp4_experts_class() -> type | None:
    return getattr(_hf_mxfp4, "Mxfp4GptOssExperts", None)


_MXFP4_NOT_IMPLEMENTED = (
    "gpt-oss's MXFP4 experts (transformers' Mxfp4GptOssExperts) cannot run through cutlass_moe "
    "in transformers {version}: the class is not a @use_experts_implementation module (no "
    "ExpertsInterface hook: Mxfp4GptOssMLP calls its forward_routed with Triton routing data "
    "directly), and its weights are Triton tensors in a hardware-specific swizzled layout. To "
    "run the checkpoint's MXFP4 weights on cutlass_moe, load it dequantized, "
    "from_pretrained(path, dtype=torch.bfloat16, "
    "quantization_config=transformers.Mxfp4Config(dequantize=True)) (bfloat16 GptOssExperts), "
    "then call cutlass_moe.integrations.transformers.prepare(model, weights='mxfp4'): the "
    "re-quantisation recovers exactly the checkpoint's weights (see prepare's documentation)"
)


def _mxfp4_error() -> NotImplementedError:
    return NotImplementedError(_MXFP4_NOT_IMPLEMENTED.format(
        version=getattr(transformers, "__version__", "unknown")))


def register(name: str = NAME) -> None:
    """Registers :func:`cutlass_moe_experts_forward` in transformers' ``ExpertsInterface``
    under ``name`` (idempotent; importing this module has already done it for ``NAME``).

    Raises:
        RuntimeError: the installed transformers cannot take registered names (older than
            5.7: 4.x has no ``ExpertsInterface``, 5.0-5.6 check ``experts_implementation``
            against a fixed list), naming the version found.
    """
    found = getattr(transformers, "__version__", "unknown")
    interface = getattr(_hf_moe, "ExpertsInterface", None)
    if interface is None or _transformers_version() < MIN_TRANSFORMERS_VERSION:
        raise RuntimeError(
            f"cutlass_moe's experts_implementation needs transformers >= "
            f"{'.'.join(map(str, MIN_TRANSFORMERS_VERSION))}, found {found}: transformers 4.x "
            "has no ExpertsInterface and 5.0-5.6 accept only their built-in "
            "experts_implementation names (eager, grouped_mm, batched_mm, deepgemm); "
            "pip install -U 'transformers>=5.7,<6'"
        )
    interface.register(name, cutlass_moe_experts_forward)
    fp8_interface = _fp8_interface()
    if fp8_interface is not None:
        # FP8Experts (fine-grained FP8 checkpoints) look names up in their own interface.
        fp8_interface.register(name, cutlass_moe_experts_forward)
    check = getattr(transformers.PreTrainedModel, "get_correct_experts_implementation", None)
    accepted = check is not None
    if check is not None:
        try:
            check(_NameCheck(), name)
        except ValueError:
            accepted = False
        except (AttributeError, TypeError):  # a newer signature: trust the version check
            pass
    if not accepted:
        interface._global_mapping.pop(name, None)
        if fp8_interface is not None:
            fp8_interface._global_mapping.pop(name, None)
        raise RuntimeError(
            f"transformers {found} does not accept the registered experts_implementation "
            f"{name!r} (its check uses a fixed list of names); cutlass_moe needs a transformers "
            "release whose PreTrainedModel.get_correct_experts_implementation accepts the "
            "names registered in ExpertsInterface (5.7 and newer)"
        )


# ------------------------------------------------------------------------------------------
# The module's structure
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ScaleGrid:
    """A quantised checkpoint's scales of one GEMM: ``[E, rows, cols]`` over weights ``[E, N, K]``
    (row n uses scale row ``n // (N / rows)``, column k scale column ``k // (K / cols)``, as
    transformers' own ``Fp8Dequantize`` derives the blocks from the grid)."""

    name: str
    rows: int
    cols: int
    dtype: torch.dtype

    def block_rows(self, n: int) -> int:
        return n // self.rows

    def group(self, k: int) -> int:
        return k // self.cols


@dataclasses.dataclass(frozen=True)
class _Structure:
    gated: bool
    transposed: bool
    interleaved: bool  # as declared (is_concatenated=False); the probe has the last word
    names: tuple[str, str, str | None, str | None]  # fc1, fc2, fc1 bias, fc2 bias (HF names)
    num_experts: int
    hidden_size: int
    inter_size: int
    dtype: torch.dtype  # the weights' storage dtype (float8_e4m3fn, int8 for packed FP4)
    device: torch.device
    #: "16bit", or the kernel format of a quantised checkpoint's weights: "fp8" (e4m3) or
    #: "mxfp4" (FP8Experts with expert_dtype="fp4": packed e2m1 with power-of-two scales).
    weight_format: str = "16bit"
    scales: tuple[_ScaleGrid, _ScaleGrid] | None = None  # fc1's and fc2's


_DISPATCH_CODE: Any = None


def _dispatch_code() -> Any:
    """The code object of ``@use_experts_implementation``'s dispatching ``forward``."""
    global _DISPATCH_CODE
    if _DISPATCH_CODE is None and _hf_moe is not None:
        class _Probe(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x
        _DISPATCH_CODE = _hf_moe.use_experts_implementation(_Probe).forward.__code__
    return _DISPATCH_CODE


def _eager_forward(module: torch.nn.Module) -> Callable[..., torch.Tensor] | None:
    """The class's own forward, which ``@use_experts_implementation`` wraps (unwrapped through
    every layer of the decorator: transformers' FP8 loader decorates ``FP8Experts`` once per
    replaced module, each time around the previous dispatcher)."""
    forward = getattr(type(module).forward, "__wrapped__", None)
    code = _dispatch_code()
    while (forward is not None and code is not None
           and getattr(forward, "__code__", None) is code
           and getattr(forward, "__wrapped__", None) is not None):
        forward = forward.__wrapped__
    return forward


def _is_experts_module(module: torch.nn.Module) -> bool:
    return (_eager_forward(module) is not None and hasattr(module, "has_gate")
            and hasattr(module, "is_transposed"))


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def _is_fp8_experts(module: torch.nn.Module) -> bool:
    cls = _fp8_experts_class()
    return cls is not None and isinstance(module, cls)


def _structure(module: torch.nn.Module) -> _Structure:
    """Flags, tensor names and sizes of an experts module; UnsupportedExperts for what the
    fused layer cannot express."""
    mxfp4_cls = _mxfp4_experts_class()
    if mxfp4_cls is not None and isinstance(module, mxfp4_cls):
        raise _mxfp4_error()
    if _eager_forward(module) is None:
        raise UnsupportedExperts(
            f"{type(module).__name__} is not a transformers @use_experts_implementation module")
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExperts(
            "has_post_expert_norm: a norm after each expert's down projection (before the "
            "router weights) has no place in the fused layer")
    gated = bool(getattr(module, "has_gate", True))
    has_bias = bool(getattr(module, "has_bias", False))
    transposed = bool(getattr(module, "is_transposed", False))
    interleaved = not bool(getattr(module, "is_concatenated", True))
    fc1 = "gate_up_proj" if gated else "up_proj"
    names = (fc1, "down_proj", fc1 + "_bias" if has_bias else None,
             "down_proj_bias" if has_bias else None)
    fp8_experts = _is_fp8_experts(module)
    scale_names = (fc1 + "_scale_inv", "down_proj_scale_inv") if fp8_experts else ()
    held = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    if fp8_experts and (getattr(module, "activation_scheme", "dynamic") == "static"
                        or any(n.endswith("_activation_scale") for n in held)):
        raise UnsupportedExperts(
            "activation_scheme='static': its FP8 forward quantises the activations with "
            "calibrated per-tensor scales, which the weight-only kernels would ignore")
    tensors = {}
    for name in (*names, *scale_names):
        if name is None:
            continue
        t = getattr(module, name, None)
        if not isinstance(t, torch.Tensor):
            raise UnsupportedExperts(f"the module has no tensor {name!r}")
        tensors[name] = t
    known = set(tensors) | {_PREFIX + n for n in _TENSOR_NAMES}
    unknown = sorted(held - known)
    if unknown:
        raise UnsupportedExperts(
            f"it holds parameters or buffers the mapping does not know ({', '.join(unknown)}); "
            "its forward may use them (quantised checkpoints, extra scales)")
    for name, t in tensors.items():
        if _is_dtensor(t):
            raise UnsupportedExperts(
                f"{name} is a DTensor (a tensor/expert-parallel plan whose experts forward runs "
                "on sharded parameters)")
        if t.device.type == "meta":
            raise UnsupportedExperts(f"{name} is on the meta device (offloaded or not loaded)")
    weights = {n: tensors[n] for n in names if n is not None}
    dtypes = {t.dtype for t in weights.values()}
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise UnsupportedExperts(
            f"its weights are on several devices ({sorted(map(str, devices))})")
    w1, w2 = tensors[names[0]], tensors[names[1]]
    weight_format = "16bit"
    if fp8_experts and {w1.dtype, w2.dtype} <= {torch.float8_e4m3fn, torch.int8}:
        if w1.dtype != w2.dtype or has_bias or transposed:
            raise UnsupportedExperts(
                f"FP8 experts with {names[0]} {w1.dtype}, down_proj {w2.dtype}, "
                f"has_bias={has_bias}, is_transposed={transposed} (one of float8_e4m3fn or "
                "packed FP4 int8 for both, no biases, untransposed needed)")
        weight_format = "fp8" if w1.dtype == torch.float8_e4m3fn else "mxfp4"
    elif len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point or any(
            d.itemsize == 1 for d in dtypes):
        raise UnsupportedExperts(
            f"its weights have dtypes {sorted(map(str, dtypes))} (one floating-point dtype "
            "needed, or the fine-grained FP8 experts' float8_e4m3fn / packed FP4)")

    if w1.dim() != 3 or w2.dim() != 3:
        raise UnsupportedExperts(f"{names[0]} {list(w1.shape)} and down_proj {list(w2.shape)} "
                                 "are not [E, N, K] weights")
    pack = 2 if weight_format == "mxfp4" else 1  # two e2m1 values per byte along K
    if transposed:
        num_experts, hidden_size, fc1_rows = w1.shape
        inter_size = w2.shape[1]
        expected_w2 = [num_experts, inter_size, hidden_size]
    else:
        num_experts, fc1_rows, hidden_size = w1.shape
        hidden_size *= pack
        inter_size = w2.shape[2] * pack
        expected_w2 = [num_experts, hidden_size, inter_size // pack]
    if fc1_rows != (2 * inter_size if gated else inter_size) or list(w2.shape) != expected_w2:
        raise UnsupportedExperts(
            f"{names[0]} {list(w1.shape)} and down_proj {list(w2.shape)} do not fit together "
            f"(is_transposed={transposed}, has_gate={gated})")
    for name, width in ((names[2], fc1_rows), (names[3], hidden_size)):
        if name is not None and list(tensors[name].shape) != [num_experts, width]:
            raise UnsupportedExperts(
                f"{name} is {list(tensors[name].shape)}, expected {[num_experts, width]}")
    grids = None
    if weight_format != "16bit":
        grids = (_scale_grid(tensors[scale_names[0]], scale_names[0], num_experts, fc1_rows,
                             hidden_size, weight_format),
                 _scale_grid(tensors[scale_names[1]], scale_names[1], num_experts, hidden_size,
                             inter_size, weight_format))
        if weight_format == "fp8":
            for name in names[:2]:
                codes = tensors[name].detach().view(torch.uint8)
                if bool(((codes & _E4M3_NAN) == _E4M3_NAN).any()):
                    raise UnsupportedExperts(
                        f"{name} holds e4m3 NaN codes (0x7F/0xFF), which the fp8 kernels do not "
                        "take")
    return _Structure(gated, transposed, interleaved, names, num_experts, hidden_size,
                      inter_size, w1.dtype, next(iter(devices)), weight_format, grids)


def _scale_grid(scale: torch.Tensor, name: str, num_experts: int, n: int, k: int,
                weight_format: str) -> _ScaleGrid:
    """The grid of an FP8Experts scale tensor, checked against what the kernels take."""
    if scale.dim() != 3 or scale.shape[0] != num_experts:
        raise UnsupportedExperts(
            f"{name} is {list(scale.shape)}, not [E={num_experts}, rows, cols] block scales")
    rows, cols = scale.shape[1:]
    if rows < 1 or cols < 1 or n % rows or k % cols:
        raise UnsupportedExperts(
            f"{name} {list(scale.shape)} does not tile its weights [{n}, {k}] into whole blocks")
    group = k // cols
    allowed = (torch.float32, torch.bfloat16, torch.float16,
               getattr(torch, "float8_e8m0fnu", torch.float32))
    if scale.dtype not in allowed:
        raise UnsupportedExperts(f"{name} is {scale.dtype} (float32 or ue8m0 scales needed)")
    if weight_format == "fp8" and group % 32:
        raise UnsupportedExperts(
            f"{name} has blocks of {group} columns along K={k}: the fp8 kernels take groups "
            "that are multiples of 32")
    if weight_format == "mxfp4":
        if group != 32:
            raise UnsupportedExperts(
                f"{name} has blocks of {group} columns along K={k}: MXFP4 scales one group of "
                "32")
        _e8m0_bits(scale.detach(), name)  # raises where a scale is not a power of two
    return _ScaleGrid(name, rows, cols, scale.dtype)


def _e8m0_bits(scale: torch.Tensor, name: str) -> torch.Tensor:
    """The e8m0 bytes (biased exponents) of power-of-two scales."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None and scale.dtype == e8m0:
        return scale.view(torch.uint8)
    s = scale.float()
    mantissa, exponent = torch.frexp(s)
    bits = exponent.to(torch.int32) + 126  # s = 0.5 * 2^exponent = 2^(bits - 127)
    if not bool(((mantissa == 0.5) & (bits >= 0) & (bits <= 254)).all()):
        raise UnsupportedExperts(
            f"{name} holds scales that are not powers of two in e8m0's range: MXFP4 kernels "
            "take e8m0 (2^(x-127)) scales only")
    return bits.to(torch.uint8)


# ------------------------------------------------------------------------------------------
# Recognising the activation
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Form:
    """A kernel activation and its parameters (model-wide values, made per-expert tensors)."""

    activation: ActivationType
    interleaved: bool = False
    params: tuple[tuple[str, float], ...] = ()

    def describe(self) -> str:
        text = self.activation.name
        if self.params:
            shown = ", ".join(f"{n}={'inf' if v == math.inf else f'{v:g}'}"
                              for n, v in self.params)
            text += f" ({shown})"
        return text + (", gate/up interleaved" if self.interleaved else "")


_GATED_PLAIN = (ActivationType.Swiglu, ActivationType.Geglu, ActivationType.GegluTanh)
_UNGATED_PLAIN = (ActivationType.Relu2, ActivationType.Relu, ActivationType.Silu,
                  ActivationType.Gelu, ActivationType.Identity)
_PROBE_ROWS = 16


def _numbers(module: torch.nn.Module, pattern: str) -> list[float]:
    """Positive finite numbers held by attributes matching ``pattern`` of the module, its
    submodules and its config: the candidates for an activation's parameters."""
    owners: list[Any] = list(module.modules())
    config = getattr(module, "config", None)
    if config is not None:
        owners.append(config)
    found = set()
    for owner in owners:
        for name, value in vars(owner).items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and re.search(pattern, name, re.IGNORECASE)
                    and math.isfinite(value) and value > 0):
                found.add(float(value))
    return sorted(found)


def _probe(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Fixed float64 values with magnitudes from 0.1 to 1e6 (log-uniform) and both signs,
    so that clamps, caps and tails are all exercised."""
    gen = torch.Generator().manual_seed(20240617)
    magnitude = 10.0 ** (torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 7 - 1)
    sign = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0).double()
    return (magnitude * sign).to(device)


def _candidates(module: torch.nn.Module, gated: bool) -> Iterator[_Form]:
    limits = _numbers(module, r"limit|clamp")
    if not gated:
        for act in _UNGATED_PLAIN:
            yield _Form(act)
        for limit in limits:
            yield _Form(ActivationType.ClampedRelu2, params=(("clamped_relu2_limit", limit),))
        return
    for act in _GATED_PLAIN:
        yield _Form(act)
    alphas = sorted({1.0, 1.702, *_numbers(module, r"alpha")})
    for alpha in alphas:
        for beta in (0.0, 1.0):
            for limit in (*limits, math.inf):
                if (alpha, beta, limit) != (1.0, 0.0, math.inf):
                    yield _Form(ActivationType.Swiglu, params=(
                        ("swiglu_alpha", alpha), ("swiglu_beta", beta), ("swiglu_limit", limit)))
    for limit in sorted({*limits, 7.0}):
        yield _Form(ActivationType.SwigluStep, params=(("swiglu_limit", limit),))
    caps = sorted({4.0, 25.0, *_numbers(module, r"softcap|situ")})
    for beta in caps:
        for linear_beta in caps:
            yield _Form(ActivationType.Situ, params=(
                ("situ_beta", beta), ("situ_linear_beta", linear_beta)))


def _evaluate(form: _Form, h: torch.Tensor) -> torch.Tensor:
    """The kernel's activation on ``h`` (``[up | gate]`` when gated), in h's dtype."""
    params = dict(form.params)
    if form.activation == ActivationType.Swiglu and params:
        up, gate = h.chunk(2, dim=-1)
        limit = params["swiglu_limit"]
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit) + params["swiglu_beta"]
        return g * torch.sigmoid(params["swiglu_alpha"] * g) * u
    if form.activation == ActivationType.SwigluStep:
        return apply_activation(h, form.activation, limit=params["swiglu_limit"])
    if form.activation == ActivationType.Situ:
        return apply_activation(h, form.activation, situ_beta=params["situ_beta"],
                                situ_linear_beta=params["situ_linear_beta"])
    if form.activation == ActivationType.ClampedRelu2:
        return apply_activation(h, form.activation,
                                clamped_relu2_limit=params["clamped_relu2_limit"])
    return apply_activation(h, form.activation)


def _close(actual: Any, expected: torch.Tensor) -> bool:
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    actual = actual.detach().to(torch.float64)
    return bool(torch.isfinite(expected).all()) and torch.allclose(
        actual, expected, rtol=1e-5, atol=1e-6)


def _split(w: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of transformers' fused gate/up along dim 1 (weights [E, 2I, H] or biases
    [E, 2I]) or of a probe [R, 2I]: gate first, or interleaved (gate_0, up_0, gate_1, ...)."""
    if interleaved:
        return w[:, 0::2], w[:, 1::2]
    return w.chunk(2, dim=1)


def _recognise(module: torch.nn.Module, structure: _Structure) -> _Form:
    """The kernel activation that computes exactly what the module's gate (``_apply_gate``)
    or ungated activation (``act_fn``) computes, found on a fixed probe: float64, or float32
    where the module cannot compute in float64 (e.g. a hub kernel)."""
    width = 2 * structure.inter_size if structure.gated else structure.inter_size
    probe = _probe(_PROBE_ROWS, width, structure.device)
    what = "_apply_gate" if structure.gated else "act_fn"
    actual = error = None
    for dtype in (torch.float64, torch.float32):
        try:
            with torch.no_grad():
                values = probe.to(dtype)
                actual = module._apply_gate(values) if structure.gated else module.act_fn(values)
            probe = values.to(torch.float64)
            break
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot tell": fall back
            error = exc
    if actual is None:
        raise UnsupportedExperts(
            f"its {what} could not be evaluated on a probe ({type(error).__name__}: {error})")
    layouts = (structure.interleaved, not structure.interleaved) if structure.gated else (False,)
    for interleaved in layouts:
        if structure.gated:
            gate, up = _split(probe, interleaved)
            h = torch.cat((up, gate), dim=1)
        else:
            h = probe
        for form in _candidates(module, structure.gated):
            if _close(actual, _evaluate(form, h)):
                return dataclasses.replace(form, interleaved=interleaved)
    act_fn = getattr(module, "act_fn", None)
    named = f" (act_fn {type(act_fn).__name__})" if act_fn is not None else ""
    default_gate = getattr(_hf_moe, "_default_apply_gate", None)
    gate = ("act_fn(gate) * up" if getattr(type(module), "_apply_gate", None) is default_gate
            else "its own _apply_gate")
    raise UnsupportedExperts(
        f"its activation{named}, {gate if structure.gated else 'act_fn(up)'}, matches none of "
        "cutlass_moe's activations exactly")


# ------------------------------------------------------------------------------------------
# Converting the weights
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConvertedExperts:
    """The weights and activation of one experts module in ``cutlass_fused_moe``'s terms."""

    fc1_expert_weights: torch.Tensor
    fc2_expert_weights: torch.Tensor
    activation_type: ActivationType
    fc1_expert_biases: torch.Tensor | None = None
    fc2_expert_biases: torch.Tensor | None = None
    quant_scales: list[torch.Tensor] | None = None
    swiglu_alpha: torch.Tensor | None = None
    swiglu_beta: torch.Tensor | None = None
    swiglu_limit: torch.Tensor | None = None
    situ_beta: torch.Tensor | None = None
    situ_linear_beta: torch.Tensor | None = None
    clamped_relu2_limit: torch.Tensor | None = None
    description: str = ""
    #: the format of the weights: "16bit", "int8" (per-channel scales), "int4" (packed, scales
    #: ``[E, K/G, N]`` in the activation dtype), "fp8" (e4m3, float32 scales ``[E, K/G, N]``)
    #: or "mxfp4" (packed e2m1, e8m0 scales ``[E, K/32, N]``).
    weight_format: str = "16bit"

    def fused_moe_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`cutlass_moe.cutlass_fused_moe` after its six
        positional ones (input, ids, scales, fc1, fc2, output_dtype)."""
        kwargs: dict[str, Any] = {
            "activation_type": self.activation_type,
            "fc1_expert_biases": self.fc1_expert_biases,
            "fc2_expert_biases": self.fc2_expert_biases,
        }
        for name in _PARAMETER_NAMES:
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.quant_scales is not None:
            kwargs["quant_scales"] = self.quant_scales
            kwargs[_FORMAT_FLAGS.get(self.weight_format, _FORMAT_FLAGS["int8"])] = True
        return kwargs

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by their short names (``fc1``, ``fc2``, ``fc1_bias``, ...)."""
        named = {"fc1": self.fc1_expert_weights, "fc2": self.fc2_expert_weights,
                 "fc1_bias": self.fc1_expert_biases, "fc2_bias": self.fc2_expert_biases}
        if self.quant_scales is not None:
            named["fc1_scale"], named["fc2_scale"] = self.quant_scales
        named.update({name: getattr(self, name) for name in _PARAMETER_NAMES})
        return {name: t for name, t in named.items() if t is not None}


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself (detached, sharing storage) when the kernel can read it: contiguous and
    16-byte aligned; a copy otherwise."""
    t = t.detach()
    if not t.is_contiguous() or t.data_ptr() % validation.ALIGN_BYTES != 0:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _expand_scales(scale: torch.Tensor, grid: _ScaleGrid, n: int,
                   weight_format: str) -> torch.Tensor:
    """A checkpoint's block scales ``[E, rows, cols]`` as the kernels' ``[E, K/G, N]``:
    float32 for fp8, e8m0 bytes for mxfp4 (each column n takes its block's row)."""
    scale = scale.detach()
    if weight_format == "mxfp4":
        scale = _e8m0_bits(scale, grid.name)
    else:
        scale = scale.to(torch.float32)
    return scale.transpose(1, 2).repeat_interleave(grid.block_rows(n), dim=2)


def _up_first(t: torch.Tensor, dim: int, inter_size: int) -> torch.Tensor:
    """transformers' ``[gate; up]`` along ``dim`` as the kernels' ``[up; gate]`` (a copy)."""
    gate, up = t.split(inter_size, dim=dim)
    return torch.cat((up, gate), dim=dim)


def _convert_quantized(module: torch.nn.Module, structure: _Structure,
                       form: _Form) -> ConvertedExperts:
    """FP8Experts' FP8 (or packed FP4) weights and block scales in the kernel layout."""
    fmt, names, grids = structure.weight_format, structure.names, structure.scales
    w1 = getattr(module, names[0]).detach()
    w2 = getattr(module, names[1]).detach()
    s1 = _expand_scales(getattr(module, grids[0].name), grids[0], w1.shape[1], fmt)
    s2 = _expand_scales(getattr(module, grids[1].name), grids[1], w2.shape[1], fmt)
    if fmt == "mxfp4":  # the same bytes: low nibble k = 2j, as the kernels read them
        w1, w2 = w1.view(torch.uint8), w2.view(torch.uint8)
    if structure.gated:
        fc1 = _up_first(w1, 1, structure.inter_size)
        s1 = _up_first(s1, 2, structure.inter_size)
    else:
        fc1 = _kernel_ready(w1)
    return ConvertedExperts(
        fc1, _kernel_ready(w2), form.activation,
        quant_scales=[s1.contiguous(), s2.contiguous()],
        description=f"{form.describe()}, {fmt} weights", weight_format=fmt)


def _convert(module: torch.nn.Module, structure: _Structure, form: _Form,
             weights: str = "16bit", group_size: int | None = None) -> ConvertedExperts:
    if structure.weight_format != "16bit":
        converted = _convert_quantized(module, structure, form)
        _add_parameters(converted, form, structure)
        return converted
    names = structure.names
    w1 = getattr(module, names[0]).detach()
    w2 = getattr(module, names[1]).detach()
    if structure.transposed:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    if structure.gated:
        gate, up = _split(w1, form.interleaved)
        fc1 = torch.cat((up, gate), dim=1)
    else:
        fc1 = _kernel_ready(w1)
    fc2 = _kernel_ready(w2)
    fc1_bias = fc2_bias = None
    if names[2] is not None:
        b1 = getattr(module, names[2]).detach()
        if structure.gated:
            gate, up = _split(b1, form.interleaved)
            b1 = torch.cat((up, gate), dim=1)
        fc1_bias = _kernel_ready(b1)
        fc2_bias = _kernel_ready(getattr(module, names[3]))
    converted = ConvertedExperts(fc1, fc2, form.activation, fc1_bias, fc2_bias,
                                 description=form.describe())
    _add_parameters(converted, form, structure)
    if weights in _QUANTIZERS:
        _quantize(converted, weights, group_size, structure.dtype)
    return converted


def _quantize(converted: ConvertedExperts, weights: str, group_size: int | None,
              dtype: torch.dtype) -> None:
    """Replaces the 16-bit fc1/fc2 of ``converted`` (kernel layout, rows ``[up; gate]``) by
    their ``weights`` quantisation with the library's quantisers: int8 per channel, int4
    symmetric group-wise (round to nearest, scales in ``dtype``), fp8 e4m3 group-wise (float32
    scales), MXFP4 (OCP rule, e8m0 scales). Scales ``[E, K/G, N]`` (int8: ``[E, N]``)."""
    fc1, fc2 = converted.fc1_expert_weights, converted.fc2_expert_weights
    if weights == "int8":
        q1, q2, scales = quantize_moe_weights_int8(fc1, fc2, scale_dtype=dtype)
    elif weights == "int4":
        q1, q2, scales = quantize_moe_weights_int4(fc1, fc2, group_size, symmetric=True,
                                                   scale_dtype=dtype)
    elif weights == "fp8":
        q1, q2, scales = quantize_moe_weights_fp8(fc1, fc2, group_size)
    else:
        q1, q2, scales = quantize_moe_weights_mxfp4(fc1, fc2)
    converted.fc1_expert_weights, converted.fc2_expert_weights = q1, q2
    converted.quant_scales = scales
    group = f" (group {group_size})" if weights in _GROUPED else ""
    converted.description += f", {weights} weights{group}"
    converted.weight_format = weights


def _dequantized_weights(weights: str, buffer: Callable[[str], torch.Tensor | None],
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 and fc2 (kernel layout) rebuilt from quantised buffers: the weights the kernels
    compute with (each value formed in float32, rounded once to ``dtype``; int8 and int4 in
    their scales' dtype)."""
    pairs = [(buffer("fc1"), buffer("fc1_scale")), (buffer("fc2"), buffer("fc2_scale"))]
    if weights == "int8":
        return tuple(dequantize(w, s) for w, s in pairs)
    if weights == "int4":
        return tuple(dequantize_int4(w, s, dtype=s.dtype) for w, s in pairs)
    if weights == "fp8":
        return tuple(dequantize_fp8(w, s, dtype) for w, s in pairs)
    return tuple(dequantize_mxfp4(w, s, dtype) for w, s in pairs)


def _add_parameters(converted: ConvertedExperts, form: _Form, structure: _Structure) -> None:
    for name, value in form.params:
        shape = (1,) if name == "clamped_relu2_limit" else (structure.num_experts,)
        value = _FLOAT32_MAX if value == math.inf else value
        setattr(converted, name, torch.full(shape, value, dtype=torch.float32,
                                            device=structure.device))


def convert_experts(module: torch.nn.Module, weights: str = "16bit",
                    group_size: int | None = None) -> ConvertedExperts:
    """The ``cutlass_fused_moe`` arguments that compute exactly what the experts module
    computes (new tensors, or the module's own where no conversion is needed; the module is
    not changed).

    Works on any device and floating dtype (the kernels themselves need float16/bfloat16 on
    CUDA), so its result can also be fed to :func:`cutlass_moe.reference_moe`.

    Args:
        module: a transformers experts module (a ``@use_experts_implementation`` class).
        weights: ``"16bit"`` (the module's dtype), or a quantisation of the 16-bit weights as
            :func:`prepare` makes it: ``"int8"`` (per-channel scales in the module's dtype;
            ``H`` and ``I`` multiples of 16), ``"int4"`` (symmetric group-wise, scales in the
            module's dtype), ``"fp8"`` (e4m3 group-wise, float32 scales) or ``"mxfp4"`` (OCP
            MXFP4, e8m0 scales; ``H`` and ``I`` multiples of 32 for the last three). The
            experts of a fine-grained FP8 checkpoint (transformers' ``FP8Experts``) keep their
            own format (``weight_format`` ``"fp8"``, or ``"mxfp4"`` for
            ``expert_dtype="fp4"``): leave ``weights`` at ``"16bit"`` for them.
        group_size: the group along K of ``"int4"`` and ``"fp8"`` (default 128; a multiple of
            32 dividing ``H`` and ``I``); only with those.

    Raises:
        UnsupportedExperts: the module cannot be expressed exactly (the message says why).
        NotImplementedError: gpt-oss's MXFP4 experts (``Mxfp4GptOssExperts``), which
            transformers gives no experts hook (see docs/transformers.md).
        ValueError: an unknown ``weights``, a quantisation asked for a quantised checkpoint's
            experts, a bad ``group_size``, or shapes the format cannot take.
    """
    if weights not in ("16bit", *_QUANTIZERS):
        raise ValueError(f"weights must be '16bit', 'int8', 'int4', 'fp8' or 'mxfp4', got "
                         f"{weights!r}")
    group_size = _group_size(weights, group_size, "convert_experts")
    structure = _structure(module)
    if weights != "16bit" and structure.weight_format != "16bit":
        raise ValueError(f"the experts hold {structure.weight_format} weights of a quantised "
                         "checkpoint; they are converted as they are (weights='16bit')")
    if weights != "16bit":
        _check_quantizable(structure, weights, group_size, f"convert_experts(weights="
                           f"{weights!r})")
    return _convert(module, structure, _recognise(module, structure), weights, group_size)


def _group_size(weights: str, group_size: object, where: str) -> int | None:
    """The group size a quantisation uses: ``group_size`` checked (a positive multiple of 32),
    the default for int4/fp8, None for the others (where only None, or 32 for mxfp4, is
    accepted)."""
    if weights not in _GROUPED:
        if group_size is None or (weights == "mxfp4" and type(group_size) is int
                                  and group_size == MXFP4_BLOCK):
            return None
        fixed = (" (MXFP4 groups are always 32)" if weights == "mxfp4" else "")
        raise ValueError(f"{where}: group_size applies to weights='int4' and 'fp8' only, got "
                         f"group_size={group_size} with weights={weights!r}{fixed}")
    if group_size is None:
        return _DEFAULT_GROUP_SIZE
    if (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0
            or group_size % 32):
        raise ValueError(f"{where}: group_size must be a positive multiple of 32 (32, 64, 128, "
                         f"...), got {group_size!r}")
    return group_size


def _check_quantizable(structure: _Structure, weights: str, group_size: int | None,
                       where: str) -> None:
    """ValueError unless experts of this shape can be quantised to ``weights`` with
    ``group_size`` (the format's alignment, a group dividing ``H`` and ``I``)."""
    try:
        validation.check_layer_shape(structure.num_experts, structure.hidden_size,
                                     structure.inter_size, 1, 1, weights)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if group_size is None:
        return
    h, i = structure.hidden_size, structure.inter_size
    if h % group_size or i % group_size:
        common = math.gcd(h, i)
        fits = [g for g in (128, 64, 32) if common % g == 0]
        hint = f" (group_size={fits[0]} does)" if fits else ""
        raise ValueError(
            f"{where}: group_size={group_size} must divide both H={h} and I={i} (groups of K "
            f"for fc1 and fc2){hint}")


# ------------------------------------------------------------------------------------------
# The per-module plan: the converted weights (buffers) or the reason to fall back
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """What a conversion was made from: rebuilt when any of it changes."""

    name: str
    ref: weakref.ref
    version: int
    data_ptr: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> _Source:
        return cls(name, weakref.ref(t), t._version, t.data_ptr(), t.dtype, tuple(t.shape))

    def current(self, module: torch.nn.Module) -> bool:
        t = module._parameters.get(self.name)
        return (t is not None and self.ref() is t and t._version == self.version
                and t.data_ptr() == self.data_ptr and t.dtype == self.dtype
                and tuple(t.shape) == self.shape)


@dataclasses.dataclass(frozen=True)
class _Plan:
    reason: str | None  # why the module falls back; None: it runs cutlass_moe
    form: _Form | None = None
    structure: _Structure | None = None
    buffers: tuple[str, ...] = ()  # short names of the registered cutlass_moe_* buffers
    weights: str = "16bit"
    prepared: bool = False  # made by prepare(): the originals are gone
    sources: tuple[_Source, ...] = ()
    group_size: int | None = None  # of 16-bit experts quantised to int4 / fp8 by prepare()

    def describe(self) -> str:
        if self.reason is not None:
            return f"eager: {self.reason}"
        quantized = f", {self.weights} weights" if self.weights != "16bit" else ""
        if self.group_size is not None:
            quantized += f" (group {self.group_size})"
        return f"cutlass_moe: {self.form.describe()}{quantized}"


def _sources(module: torch.nn.Module) -> tuple[_Source, ...]:
    return tuple(_Source.of(name, t) for name, t in module._parameters.items() if t is not None)


def _drop_buffers(module: torch.nn.Module) -> None:
    for name in _TENSOR_NAMES:
        module._buffers.pop(_PREFIX + name, None)


def _kernel_reason(structure: _Structure, weights: str) -> str | None:
    """Why the kernels cannot run this module's weights (dtype, shape, extension)."""
    if weights == "16bit" and structure.dtype not in _KERNEL_DTYPES:
        return (f"its weights are {structure.dtype}: the fused kernels take float16/bfloat16 "
                "weights (load the model with dtype=torch.bfloat16)")
    flag = _FORMAT_FLAGS.get(weights)
    if flag is not None and flag not in inspect.signature(cutlass_fused_moe).parameters:
        return (f"this cutlass_moe has no {weights} weight-only path (cutlass_fused_moe takes "
                f"no {flag})")
    try:
        validation.check_layer_shape(structure.num_experts, structure.hidden_size,
                                     structure.inter_size, 1, 1, weights)
    except ValueError as exc:
        return str(exc)
    try:
        _ext.load_extension()
    except RuntimeError as exc:
        return str(exc)
    return None


def _build_plan(module: torch.nn.Module) -> _Plan:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"cutlass_moe: the converted weights of {type(module).__name__} are made on its "
            "first call, which cannot happen during CUDA-graph capture; run one forward "
            "before capturing (or convert with cutlass_moe.integrations.transformers.prepare)")
    _drop_buffers(module)
    module.__dict__.pop(_PLAN_ATTR, None)
    sources = _sources(module)
    try:
        structure = _structure(module)
        reason = _kernel_reason(structure, structure.weight_format)
        if reason is not None:
            raise UnsupportedExperts(reason)
        form = _recognise(module, structure)
    except UnsupportedExperts as exc:
        plan = _Plan(reason=str(exc), sources=sources)
    else:
        with torch.no_grad():
            converted = _convert(module, structure, form)
        plan = _install(module, converted, form, structure, structure.weight_format, False,
                        sources)
    module.__dict__[_PLAN_ATTR] = plan
    return plan


def _install(module: torch.nn.Module, converted: ConvertedExperts, form: _Form,
             structure: _Structure, weights: str, prepared: bool,
             sources: tuple[_Source, ...], group_size: int | None = None) -> _Plan:
    tensors = converted.tensors()
    for name, t in tensors.items():
        module.register_buffer(_PREFIX + name, t, persistent=False)
    return _Plan(None, form, structure, tuple(tensors), weights, prepared, sources, group_size)


def _current_plan(module: torch.nn.Module) -> _Plan:
    """The module's plan, rebuilt when its parameters changed since it was made."""
    plan = module.__dict__.get(_PLAN_ATTR)
    if plan is not None and (plan.prepared or (
            len(plan.sources) == sum(t is not None for t in module._parameters.values())
            and all(s.current(module) for s in plan.sources))):
        return plan
    return _build_plan(module)


# A compiled first call builds the plan at a graph break (it probes real tensors).
_current_plan_outside_graph = torch.compiler.disable(_current_plan)


# ------------------------------------------------------------------------------------------
# The experts function
# ------------------------------------------------------------------------------------------

_warned: set[tuple[str, str]] = set()


def _warn_once(module: torch.nn.Module, reason: str) -> None:
    key = (type(module).__qualname__, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"cutlass_moe: {type(module).__name__} runs transformers' eager experts forward instead "
        f"of cutlass_moe: {reason}", CutlassMoeFallbackWarning, stacklevel=4)


def _call_reason(module: torch.nn.Module, hidden_states: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> str | None:
    """Why this call cannot run the kernels (dtype, routing tensors, gradients, device)."""
    if hidden_states.dtype not in _KERNEL_DTYPES:
        return (f"hidden states are {hidden_states.dtype}: the fused kernels take float16 or "
                "bfloat16 activations")
    rows = hidden_states.numel() // max(hidden_states.shape[-1], 1)
    if (top_k_index.dtype not in (torch.int32, torch.int64) or top_k_index.dim() == 0
            or top_k_index.numel() != rows * top_k_index.shape[-1]
            or top_k_weights.shape != top_k_index.shape):
        return (f"the routing tensors (top_k_index {list(top_k_index.shape)} "
                f"{top_k_index.dtype}, top_k_weights {list(top_k_weights.shape)}) are not "
                "[tokens, k] expert ids and weights")
    if torch.is_grad_enabled() and (
            hidden_states.requires_grad or top_k_weights.requires_grad
            or any(p.requires_grad for p in module.parameters(recurse=False))):
        return ("gradients are needed (grad mode with tensors that require grad) and the fused "
                "kernels have no backward; run inference under torch.no_grad() or "
                "torch.inference_mode()")
    try:
        validation.require_cuda(hidden_states.device)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return None


def cutlass_moe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' experts function for ``experts_implementation="cutlass_moe"``.

    Args:
        self: the experts module (a ``@use_experts_implementation`` class).
        hidden_states: ``[T, H]`` activations, float16 or bfloat16 on a CUDA device.
        top_k_index: ``[T, k]`` expert ids (this rank's local ids under expert parallelism;
            ids ``>= E`` contribute zero).
        top_k_weights: ``[T, k]`` router weights.

    Returns:
        ``[T, H]`` in the dtype of ``hidden_states``: the experts' weighted sum, from one
        :func:`cutlass_moe.cutlass_fused_moe` call, or from transformers' eager experts
        forward (with one :class:`CutlassMoeFallbackWarning` naming the reason) where the
        module or the call cannot be run exactly by the kernels.
    """
    compiling = torch.compiler.is_compiling()
    reason = _call_reason(self, hidden_states, top_k_index, top_k_weights)
    if reason is not None:
        return _fallback(self, reason, hidden_states, top_k_index, top_k_weights)
    if compiling:
        plan = self.__dict__.get(_PLAN_ATTR)
        if plan is None:
            plan = _current_plan_outside_graph(self)
    else:
        plan = _current_plan(self)
    if plan.reason is not None:
        return _fallback(self, plan.reason, hidden_states, top_k_index, top_k_weights)

    def buffer(name: str) -> torch.Tensor | None:
        return getattr(self, _PREFIX + name) if name in plan.buffers else None

    fc1, fc2 = buffer("fc1"), buffer("fc2")
    fmt = plan.weights
    bias = buffer("fc1_bias")
    # int8/int4 scales are in the activation dtype; fp8/mxfp4 scales are float32/e8m0, so any
    # 16-bit activation dtype goes with them (biases, where there are, have to match).
    weight_dtype = (buffer("fc1_scale").dtype if fmt in ("int8", "int4") else
                    (hidden_states.dtype if bias is None else bias.dtype)
                    if fmt in _QUANTIZED_CHECKPOINT_FORMATS else fc1.dtype)
    if hidden_states.dtype != weight_dtype or hidden_states.device != fc1.device:
        return _fallback(
            self, f"hidden states are {hidden_states.dtype} on {hidden_states.device}, the "
            f"converted weights {weight_dtype} on {fc1.device}", hidden_states, top_k_index,
            top_k_weights)

    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    if not compiling and x.data_ptr() % validation.ALIGN_BYTES != 0:
        x = x.clone()  # a view at an odd offset: the kernels read 16-byte vectors
    ids = top_k_index.reshape(x.shape[0], top_k_index.shape[-1])
    scales = top_k_weights.reshape(x.shape[0], top_k_index.shape[-1])
    if scales.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        scales = scales.float()
    extra: dict[str, Any] = {}
    for name in _PARAMETER_NAMES:
        t = buffer(name)
        if t is not None:  # float32 per the op; model.to(dtype) may have cast the buffer
            extra[name] = t if t.dtype == torch.float32 else t.float()
    if fmt in _FORMAT_FLAGS:
        extra["quant_scales"] = [buffer("fc1_scale"), buffer("fc2_scale")]
        extra[_FORMAT_FLAGS[fmt]] = True
    out = cutlass_fused_moe(
        x, ids, scales, fc1, fc2, x.dtype, fc1_expert_biases=buffer("fc1_bias"),
        fc2_expert_biases=buffer("fc2_bias"), activation_type=plan.form.activation, **extra)[0]
    return out.view(shape)


def _hf_tensors(module: torch.nn.Module, plan: _Plan) -> dict[str, torch.Tensor]:
    """transformers' tensors of a prepared module, rebuilt from its converted buffers
    (exact for 16-bit weights and a quantised checkpoint's tensors; the dequantised weights,
    in the experts' 16-bit dtype, for 16-bit experts that prepare quantised)."""
    structure, form = plan.structure, plan.form

    def buffer(name: str) -> torch.Tensor | None:
        return getattr(module, _PREFIX + name) if name in plan.buffers else None

    if structure.weight_format != "16bit":
        return _hf_quantized_tensors(plan, buffer)
    fc1, fc2 = buffer("fc1"), buffer("fc2")
    if plan.weights in _QUANTIZERS:
        fc1, fc2 = _dequantized_weights(plan.weights, buffer, structure.dtype)

    def gate_first(t: torch.Tensor) -> torch.Tensor:
        up, gate = t.chunk(2, dim=1)
        if form.interleaved:
            return torch.stack((gate, up), dim=2).flatten(1, 2)
        return torch.cat((gate, up), dim=1)

    if structure.gated:
        fc1 = gate_first(fc1)
    if structure.transposed:
        fc1, fc2 = fc1.transpose(1, 2), fc2.transpose(1, 2)
    names = structure.names
    tensors = {names[0]: fc1, names[1]: fc2}
    if names[2] is not None:
        b1 = buffer("fc1_bias")
        tensors[names[2]] = gate_first(b1) if structure.gated else b1
        tensors[names[3]] = buffer("fc2_bias")
    return tensors


def _hf_quantized_tensors(plan: _Plan, buffer: Callable[[str], torch.Tensor | None]
                          ) -> dict[str, torch.Tensor]:
    """FP8Experts' weights and block scales (exactly as loaded) from the kernel layout."""
    structure, fmt = plan.structure, plan.weights
    tensors = {}
    for index, (weight, scale) in enumerate((("fc1", "fc1_scale"), ("fc2", "fc2_scale"))):
        w, s = buffer(weight), buffer(scale)  # [E, N, K(/2)], [E, K/G, N]
        if index == 0 and structure.gated:
            gate_rows = structure.inter_size
            w = _up_first(w, 1, w.shape[1] - gate_rows)  # [up; gate] -> [gate; up]
            s = _up_first(s, 2, s.shape[2] - gate_rows)
        grid = structure.scales[index]
        s = s[:, :, ::grid.block_rows(w.shape[1])].transpose(1, 2)  # [E, rows, cols]
        if fmt == "mxfp4":
            w = w.view(torch.int8)
            if grid.dtype == getattr(torch, "float8_e8m0fnu", None):
                s = s.contiguous().view(grid.dtype)
            else:
                s = torch.exp2(s.float() - 127.0).to(grid.dtype)
        else:
            s = s.to(grid.dtype)
        tensors[structure.names[index]] = w
        tensors[grid.name] = s.contiguous()
    return tensors


def _fallback(module: torch.nn.Module, reason: str, hidden_states: torch.Tensor,
              top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        _warn_once(module, reason)
    eager = _eager_forward(module)
    plan = module.__dict__.get(_PLAN_ATTR)
    if plan is None or not plan.prepared:
        return eager(module, hidden_states, top_k_index, top_k_weights)
    # prepare() removed the originals: lend the eager forward equivalent tensors for the call.
    tensors = _hf_tensors(module, plan)
    module.__dict__.update(tensors)
    try:
        return eager(module, hidden_states, top_k_index, top_k_weights)
    finally:
        for name in tensors:
            module.__dict__.pop(name, None)


# ------------------------------------------------------------------------------------------
# Whole models: prepare, clear, memory
# ------------------------------------------------------------------------------------------


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The ``(name, module)`` pairs of the transformers experts modules in ``model``."""
    return [(name, m) for name, m in model.named_modules() if _is_experts_module(m)]


def prepare(model: torch.nn.Module, weights: str = "bf16",
            group_size: int | None = None) -> dict[str, str]:
    """Converts the experts of ``model`` for cutlass_moe in place, frees the originals and
    selects ``experts_implementation="cutlass_moe"``.

    Module by module: the converted (or quantised) weights are made, kept as the module's
    ``cutlass_moe_*`` buffers, and the original expert parameters are deleted, so the peak is
    the model plus one layer's copy and a model that fits in 16 bits never needs twice the
    memory (int8 and fp8 end at about half the expert bytes, int4 and mxfp4 near a quarter).
    The freed memory goes back to PyTorch's caching allocator (``torch.cuda.empty_cache()``
    returns it to the driver). Memory is only released where nothing else (an optimiser, your
    own variables) still holds the parameters.

    A prepared model keeps working when a call must fall back (float32 activations, CPU
    tensors): the eager forward then runs on weights rebuilt from the buffers (the 16-bit
    weights exactly; for quantised ones, the weights the kernels compute with, dequantised to
    the experts' dtype). It no longer has its expert parameters, so it cannot run another
    experts implementation, be trained, or be saved with ``save_pretrained``; reload the
    checkpoint for that.

    Modules that cannot be expressed exactly are left as they are (and fall back, with one
    warning per reason).

    16-bit experts are quantised by the library's quantisers, weight-only (the activations stay
    16-bit), after the rows are put in the kernels' ``[up; gate]`` order; biases and the
    activation's parameters stay as they are:

    - ``"int8"``: symmetric per output channel, scales in the weights' dtype
      (:mod:`cutlass_moe.quantization`; ``H`` and ``I`` multiples of 16);
    - ``"int4"``: symmetric group-wise, round to nearest (:func:`cutlass_moe.int4.
      quantize_int4_groupwise`: per group of ``group_size`` along K, ``s = max(max(w) / 7,
      -min(w) / 8)`` rounded to the weights' dtype, ``q = clamp(round(w / s), -8, 7) + 8``),
      packed two per byte, scales ``[E, K/G, N]`` in the weights' dtype;
    - ``"fp8"``: e4m3 group-wise (:func:`cutlass_moe.fp8.quantize_fp8_groupwise`: one float32
      scale ``max(|w|) / 448`` per output row and group of ``group_size`` along K, finer than
      DeepSeek's 128x128 blocks), scales ``[E, K/G, N]``;
    - ``"mxfp4"``: OCP MXFP4 (:func:`cutlass_moe.mxfp4.quantize_mxfp4`: e2m1 codes, one e8m0
      scale ``2^(floor(log2(max|w|)) - 2)`` per 32 along K), scales uint8 ``[E, K/32, N]``.

    For int4, fp8 and mxfp4 ``H`` and ``I`` must be multiples of 32, and ``group_size`` (int4,
    fp8) a multiple of 32 dividing both (gpt-oss's 2880 takes 64 or 32, not 128).

    **gpt-oss MXFP4 checkpoints.** transformers' native MXFP4 experts (``Mxfp4GptOssExperts``)
    have no experts hook (``NotImplementedError``). Load the checkpoint dequantised instead,
    ``from_pretrained(path, dtype=torch.bfloat16, quantization_config=Mxfp4Config(
    dequantize=True))`` (transformers also dequantises on its own where it cannot run MXFP4:
    compute capability below 7.5, no Triton or ``kernels`` package, ``use_kernels=True`` on
    CUDA, or the CPU without ``use_kernels=True``), which gives bf16 ``GptOssExperts``, and
    call ``prepare(model, weights="mxfp4")``: the experts are back at 4 bits and **compute
    exactly the checkpoint's weights**. transformers' dequantisation ``code * 2^(x - 127)`` is
    exact in bfloat16 (an e2m1 value has at most 2 significant bits; products down to 2^-128
    are bfloat16 subnormals, exact), and the OCP rule recovers each block: where its largest
    code is 4 or 6 it gives the checkpoint's scale and codes; where it is 2 or 3, 1 or 1.5, or
    0.5 it gives a scale 2, 4 or 8 times smaller (never below 2^-127) and each code that many
    times larger, again an e2m1 value (at most 6), so every dequantised value is identical; an
    all-zero block gets scale 1 and zero codes; the negative-zero code (8) becomes +0. It fails only where the load itself lost information: scale bytes 253-254 with
    large codes overflow bfloat16 (``inf``: ``prepare`` raises), and a float16 load is exact
    only while every value fits float16 (scales from ``2^-23`` to ``2^13``; tested for bf16
    over every scale byte 0-252, and for float16 in that range).

    Args:
        model: a transformers model (or any module holding experts modules).
        weights: ``"bf16"`` or ``"fp16"``: the 16-bit weights as loaded (they must already be
            of that dtype); ``"int8"``, ``"int4"``, ``"fp8"``, ``"mxfp4"``: 16-bit experts
            quantised as above (they must be float16/bfloat16: the activations keep that
            dtype). The experts of a fine-grained FP8 checkpoint (transformers'
            ``FP8Experts``, ``expert_dtype`` ``"fp8"`` / ``"fp4"``) are kept in their own
            format with ``"fp8"`` / ``"mxfp4"`` (block scales expanded to the kernels'
            ``[E, K/G, N]``), and refuse every other ``weights``.
        group_size: the group along K of ``"int4"`` and ``"fp8"`` (default 128); ``None`` or
            32 for ``"mxfp4"``; not taken by the other kinds (nor by an FP8 checkpoint, whose
            blocks are kept).

    Returns:
        ``{module name: what it runs}`` for every experts module, e.g.
        ``"cutlass_moe: Swiglu"``, ``"cutlass_moe: Swiglu, int4 weights (group 128)"`` or
        ``"eager: <reason>"``.

    Raises:
        NotImplementedError: a model with gpt-oss MXFP4 experts (``Mxfp4GptOssExperts``, no
            experts hook in transformers; the message names the route above).
        ValueError: an unknown ``weights``; a ``group_size`` that is not a multiple of 32
            dividing ``H`` and ``I``, or one given where the kind takes none; expert weights
            of another dtype than asked (or not 16-bit, for a quantisation); shapes the format
            cannot take; a quantised checkpoint's experts with another ``weights`` than their
            format; a module already prepared differently (another kind or group size); or a
            model without experts modules. Nothing is changed then.
    """
    if weights not in _WEIGHT_KINDS:
        raise ValueError(f"weights must be 'bf16', 'fp16', 'int8', 'int4', 'fp8' or 'mxfp4', "
                         f"got {weights!r}")
    asked_group = group_size
    group_size = _group_size(weights, group_size, "prepare")
    register()
    mxfp4_cls = _mxfp4_experts_class()
    if mxfp4_cls is not None and any(isinstance(m, mxfp4_cls) for m in model.modules()):
        raise _mxfp4_error()
    modules = experts_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no transformers experts modules "
                         "(@use_experts_implementation classes)")
    kind = weights if weights in _QUANTIZERS else "16bit"
    wanted = _WEIGHT_KINDS[weights]
    report: dict[str, str] = {}
    work = []
    for name, module in modules:
        plan = module.__dict__.get(_PLAN_ATTR)
        if plan is not None and plan.prepared:
            checkpoint = plan.structure.weight_format != "16bit"
            if plan.weights != kind or (wanted is not None and getattr(
                    module, _PREFIX + "fc1").dtype != wanted) or (
                    not checkpoint and plan.group_size != group_size) or (
                    checkpoint and asked_group is not None):
                raise ValueError(f"{name} was already prepared ({plan.describe()}); reload "
                                 "the model to prepare it differently")
            report[name] = plan.describe()
            continue
        try:
            structure = _structure(module)
            form = _recognise(module, structure)
        except UnsupportedExperts as exc:
            report[name] = f"eager: {exc}"
            _warn_once(module, str(exc))
            continue
        where = f"prepare(weights={weights!r})"
        if structure.weight_format != "16bit":  # a quantised checkpoint: kept as it is
            if structure.weight_format != kind:
                raise ValueError(
                    f"{where}: the experts of {name} hold the {structure.weight_format} "
                    "weights of a quantised checkpoint; prepare keeps them as they are: call "
                    f"prepare(model, weights={structure.weight_format!r})")
            if asked_group is not None:
                raise ValueError(
                    f"prepare(weights={weights!r}, group_size={asked_group}): the experts of "
                    f"{name} hold a quantised checkpoint's {kind} weights, whose blocks are "
                    "kept; leave group_size out")
            module_group = None
        else:
            if (wanted is not None and structure.dtype != wanted) or (
                    wanted is None and structure.dtype not in _KERNEL_DTYPES):
                raise ValueError(
                    f"{where}: the experts of {name} are {structure.dtype}; prepare keeps (or "
                    "quantises from) the 16-bit weights as loaded, so load the model with "
                    f"dtype={wanted or torch.bfloat16} (the kernels need activations of the "
                    "weights' dtype)")
            module_group = group_size
            for hf_name in structure.names[:2] if kind in _QUANTIZERS else ():
                if not bool(torch.isfinite(getattr(module, hf_name)).all()):
                    raise ValueError(
                        f"{where}: {name}.{hf_name} holds NaN or inf, which no quantisation "
                        "represents (check the checkpoint, or how it was loaded)")
        flag = _FORMAT_FLAGS.get(kind)
        if flag is not None and flag not in inspect.signature(cutlass_fused_moe).parameters:
            raise ValueError(f"{where}: this cutlass_moe has no {kind} weight-only path")
        _check_quantizable(structure, kind, module_group, f"{where}: {name}")
        work.append((name, module, structure, form, module_group))
    for name, module, structure, form, module_group in work:
        _drop_buffers(module)
        quantize = kind if structure.weight_format == "16bit" else "16bit"
        with torch.no_grad():
            converted = _convert(module, structure, form, quantize, module_group)
        plan = _install(module, converted, form, structure, kind, True, (),
                        module_group if kind in _GROUPED else None)
        del converted
        scale_names = tuple(g.name for g in structure.scales or ())
        for hf_name in (*structure.names, *scale_names):
            if hf_name is not None:
                module._parameters.pop(hf_name, None)
        module.__dict__[_PLAN_ATTR] = plan
        report[name] = plan.describe()
    gc.collect()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(NAME)
    return report


def clear_converted_weights(model: torch.nn.Module) -> int:
    """Drops the converted weights made on first call (not those of :func:`prepare`, which
    replaced the originals); the next call makes them again. Returns the bytes released
    (as :func:`converted_weight_bytes` counts them)."""
    released = converted_weight_bytes(model)
    for _, module in experts_modules(model):
        plan = module.__dict__.get(_PLAN_ATTR)
        if plan is not None and not plan.prepared:
            _drop_buffers(module)
            module.__dict__.pop(_PLAN_ATTR, None)
    return released - converted_weight_bytes(model)


def converted_weight_bytes(model: torch.nn.Module) -> int:
    """The memory cost of the conversions made on first call: bytes of the experts modules'
    ``cutlass_moe_*`` buffers that do not share storage with their parameters. Modules
    converted by :func:`prepare` count zero (their buffers replaced the parameters)."""
    total = 0
    for _, module in experts_modules(model):
        plan = module.__dict__.get(_PLAN_ATTR)
        if plan is not None and plan.prepared:
            continue
        owned = {p.untyped_storage().data_ptr() for p in module.parameters(recurse=False)}
        seen: set[int] = set()
        for name, t in module._buffers.items():
            if not name.startswith(_PREFIX) or t is None:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in owned or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


register()
