"""The compiled extension ``cutlass_moe._C``: lazy loading, runner cache, enum mapping.

Nothing here runs at import time: ``cutlass_moe._C`` is imported on first use, so
``import cutlass_moe`` works on a machine without a GPU, a driver or a built extension.
``_C.MoeRunner`` objects are cached, one per (activation, weight, output) type triple, and so are
their tactic descriptors (per GEMM and device). All caches are safe to use from several threads.

**Weight types and runner keys.** The weight entry of a triple is a torch dtype for weights whose
storage dtype says what they are (the activation dtype, int8), and a *weight-format tag* (a
string, :data:`PACKED_WEIGHT_FORMATS`) for the group-scaled weight-only formats: ``"int4"``
(:data:`INT4`, W4A16: two nibbles per uint8 byte, group-wise scales), ``"fp8"`` (:data:`FP8`,
float8_e4m3fn weights with float32 group-wise scales) and ``"mxfp4"`` (:data:`MXFP4`, two e2m1
codes per uint8 byte with e8m0 scales per 32 elements). Packed formats share a storage dtype
(torch.uint8 holds int4 and mxfp4, and would hold nvfp4 later), so ``torch.uint8`` itself is
never a weight type: :func:`dtype_to_enum` refuses it and asks for the tag; float8_e4m3fn
weights are named by their tag too (the format is the dtype *and* its group-wise scales). Each
tag maps to its own C++ ``DType`` value (int4 = 4, fp8 = 5, mxfp4 = 6), so the runner key — the
``(act, weight, out)`` ``DType`` triple — of one format can never be another's. A later format
adds a tag and its ``DType`` value here; nothing keyed on ``torch.uint8`` has to change.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

import torch

from ._version import __version__
from .activation import ActivationType

# DType values of include/cutlass_moe/problem.h (part of the binding's ABI).
_DTYPE_TO_ENUM: dict[torch.dtype, int] = {
    torch.float16: 0,
    torch.bfloat16: 1,
    torch.float32: 2,
    torch.int8: 3,
}

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.int8: "int8"}

#: The weight-format tag of int4 group-wise weight-only weights (W4A16; the C++ ``DType`` kInt4,
#: named "int4" like its tactic descriptors' ``weight_dtype``).
INT4 = "int4"
#: The weight-format tag of FP8 (e4m3) group-scaled weight-only weights (C++ ``DType`` kFp8E4m3,
#: named "fp8"): torch.float8_e4m3fn ``[E, N, K]`` with float32 scales ``[E, K/G, N]``.
FP8 = "fp8"
#: The weight-format tag of MXFP4 weight-only weights (C++ ``DType`` kMxfp4, named "mxfp4"):
#: uint8 ``[E, N, K/2]`` (two e2m1 codes per byte) with uint8 e8m0 scales ``[E, K/32, N]``.
MXFP4 = "mxfp4"
#: Weight-format tags and their C++ ``DType`` values (the binding's ABI). A packed format's
#: storage dtype (torch.uint8) does not identify it, so it is keyed by tag; so is fp8, whose
#: runner is the group-scaled weight-only one (``DType`` 5), not a plain float8 GEMM.
PACKED_WEIGHT_FORMATS: dict[str, int] = {INT4: 4, FP8: 5, MXFP4: 6}

#: A weight type: a torch dtype, or a tag of :data:`PACKED_WEIGHT_FORMATS`.
WeightType = torch.dtype | str

# Activation values of include/cutlass_moe/problem.h (part of the binding's ABI). SwigluBias is
# FlashInfer's name for the clamped SwiGLU, which the C++ Swiglu computes when swiglu_alpha/beta/
# limit are given (and, with none, plain SwiGLU: the clamped form at its neutral values): both
# map to kSwiglu, and kSwiglu maps back to Swiglu (the first of them here).
_ACTIVATION_TO_ENUM: dict[ActivationType, int] = {
    ActivationType.Identity: 0,
    ActivationType.Relu: 1,
    ActivationType.Gelu: 2,
    ActivationType.Silu: 3,
    ActivationType.Swiglu: 4,
    ActivationType.SwigluBias: 4,
    ActivationType.Geglu: 5,
    ActivationType.Relu2: 6,
    ActivationType.SwigluStep: 7,
    ActivationType.GegluTanh: 8,
    ActivationType.Situ: 9,
    ActivationType.ClampedRelu2: 10,
}

_lock = threading.Lock()
_extension: ModuleType | None = None
_extension_error: str | None = None
_generation = 0  # bumped whenever the extension object is replaced (tests); keys caches
_runners: dict[tuple[int, int, int], Any] = {}
_tactics: dict[tuple[tuple[int, int, int], int, int], list[dict[str, Any]]] = {}


def generation() -> int:
    """Changes whenever the loaded extension is replaced, so callers can key caches on it."""
    return _generation


def dtype_to_enum(dtype: WeightType) -> int:
    """The C++ ``DType`` value of a torch dtype (fp16=0, bf16=1, fp32=2, int8=3) or of a
    weight-format tag (``"int4"`` = 4, ``"fp8"`` = 5, ``"mxfp4"`` = 6). ``torch.uint8`` is
    refused: it is the storage of several packed formats, which are named by their tag (and so
    is ``torch.float8_e4m3fn``: ``"fp8"``)."""
    if isinstance(dtype, str):
        try:
            return PACKED_WEIGHT_FORMATS[dtype]
        except KeyError:
            known = ", ".join(repr(t) for t in PACKED_WEIGHT_FORMATS)
            raise NotImplementedError(
                f"weight format {dtype!r} has no cutlass_moe kernel type; packed formats: "
                f"{known}"
            ) from None
    try:
        return _DTYPE_TO_ENUM[dtype]
    except KeyError:
        supported = ", ".join([*(str(d) for d in _DTYPE_TO_ENUM),
                               *(repr(t) for t in PACKED_WEIGHT_FORMATS)])
        packed = (" (uint8 is the storage of packed weight formats: name the format, e.g. "
                  f"{INT4!r} or {MXFP4!r})" if dtype == torch.uint8 else
                  f" (float8_e4m3fn weight-only weights are the weight format {FP8!r})"
                  if dtype == torch.float8_e4m3fn else "")
        raise NotImplementedError(
            f"dtype {dtype} has no cutlass_moe kernel type{packed}; supported: {supported}"
        ) from None


def weight_type_name(weight: WeightType) -> str:
    """The C++ ``DType`` name of a weight type, as tactic descriptors' ``weight_dtype`` spell it
    (``"fp16"``, ``"bf16"``, ``"int8"``, ``"int4"``, ``"fp8"``, ``"mxfp4"``);
    NotImplementedError for another."""
    dtype_to_enum(weight)  # raises for a type without a kernel type
    return weight if isinstance(weight, str) else _DTYPE_NAMES[weight]


def activation_to_enum(activation_type: ActivationType) -> int:
    """The C++ ``Activation`` value (Identity=0, Relu=1, Gelu=2, Silu=3, Swiglu=4 (and
    SwigluBias), Geglu=5, Relu2=6, SwigluStep=7, GegluTanh=8, Situ=9, ClampedRelu2=10)."""
    try:
        return _ACTIVATION_TO_ENUM[activation_type]
    except KeyError:
        supported = ", ".join(a.name for a in _ACTIVATION_TO_ENUM)
        raise NotImplementedError(
            f"activation_type {activation_type!r} is not supported; supported: {supported}"
        ) from None


def activation_from_enum(activation: int) -> ActivationType:
    """The ``ActivationType`` of a C++ ``Activation`` value (e.g. 4 -> Swiglu)."""
    for act, value in _ACTIVATION_TO_ENUM.items():
        if value == activation:
            return act
    raise ValueError(f"unknown C++ Activation value {activation}")


def activations_of_enums(values: Iterable[int]) -> frozenset[ActivationType]:
    """Every ``ActivationType`` that runs as one of these C++ ``Activation`` values (4 gives
    both Swiglu and SwigluBias); ValueError for a value that names none."""
    wanted = {int(v) for v in values}
    for value in wanted:
        activation_from_enum(value)  # raises for an unknown value
    return frozenset(act for act, value in _ACTIVATION_TO_ENUM.items() if value in wanted)


def _import_extension() -> ModuleType:
    global _extension, _extension_error
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is None and _extension_error is None:
            try:
                _extension = importlib.import_module("cutlass_moe._C")
            except ImportError as exc:  # not built, or a shared library it needs is missing
                _extension_error = (
                    "the compiled extension cutlass_moe._C is not available "
                    f"({type(exc).__name__}: {exc}). Install a cutlass-moe wheel built for your "
                    "CUDA version, or build from source with `pip install -v .` on a machine "
                    "with the CUDA toolkit."
                )
    if _extension is None:
        raise RuntimeError(_extension_error)
    return _extension


def load_extension() -> ModuleType:
    """Imports ``cutlass_moe._C`` on first call; ``RuntimeError`` (saying why) when missing."""
    return _import_extension()


def extension_available() -> bool:
    """True when ``cutlass_moe._C`` imports."""
    try:
        _import_extension()
    except RuntimeError:
        return False
    return True


def runner_key(
    act_dtype: torch.dtype, weight_dtype: WeightType, out_dtype: torch.dtype
) -> tuple[int, int, int]:
    """The (act, weight, out) ``DType`` triple that identifies one ``MoeRunner``; the weight is
    a dtype or a weight-format tag (``"int4"``, ``"fp8"``, ``"mxfp4"``; see the module
    docstring)."""
    return (dtype_to_enum(act_dtype), dtype_to_enum(weight_dtype), dtype_to_enum(out_dtype))


def get_runner(act_dtype: torch.dtype, weight_dtype: WeightType, out_dtype: torch.dtype) -> Any:
    """The cached ``_C.MoeRunner`` for this type triple (created on first use); int4, fp8 and
    mxfp4 weights use their tags :data:`INT4`, :data:`FP8`, :data:`MXFP4`
    (``get_runner(torch.bfloat16, "fp8", torch.bfloat16)``)."""
    key = runner_key(act_dtype, weight_dtype, out_dtype)
    runner = _runners.get(key)
    if runner is not None:
        return runner
    ext = _import_extension()
    with _lock:
        runner = _runners.get(key)
        if runner is None:
            runner = ext.MoeRunner(*key)
            _runners[key] = runner
    return runner


def tactics(
    act_dtype: torch.dtype,
    weight_dtype: WeightType,
    out_dtype: torch.dtype,
    gemm: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Descriptors of the tactics of GEMM ``gemm`` (1 or 2) runnable on ``device``, cached.

    Each is a dict with keys name, gemm, tile_m, tile_n, tile_k, warp_m, warp_n, warp_k, stages,
    smem_bytes, threads, runnable, act_dtype, weight_dtype ("bf16", "int8", "int4", "fp8",
    "mxfp4", ...), gated,
    split_k, decode, required_cc (0, or 90 for the sm_90a tactics ``sm90_*``, runnable on
    compute capability 9.0 only; see include/cutlass_moe/tactic.h) and, for
    tactics that serve only some activations (fused gated GEMM1), ``activations``: a frozenset
    of :class:`ActivationType` (the binding's C++ values are converted here, at the boundary).
    Callers must not mutate it.
    """
    if gemm not in (1, 2):
        raise ValueError(f"gemm must be 1 or 2, got {gemm}")
    key = (runner_key(act_dtype, weight_dtype, out_dtype), gemm, _device_index(device))
    cached = _tactics.get(key)
    if cached is not None:
        return cached
    runner = get_runner(act_dtype, weight_dtype, out_dtype)
    with device_guard(device):
        descs = [descriptor(d) for d in runner.tactics(gemm)]
    with _lock:
        return _tactics.setdefault(key, descs)


def descriptor(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A tactic descriptor of the binding as the package uses it: a new dict whose
    ``activations`` (when present) is a frozenset of :class:`ActivationType`."""
    desc = dict(raw)
    if desc.get("activations") is not None:
        desc["activations"] = activations_of_enums(desc["activations"])
    return desc


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Makes ``device`` current (the C++ side launches on the current device's streams)."""
    if device.type != "cuda":
        raise ValueError(f"cutlass_moe runs on CUDA tensors, got a tensor on {device}")
    return torch.cuda.device(device)


def stream_handle(device: torch.device) -> int:
    """The ``cudaStream_t`` (as an int) of the current torch stream on ``device``."""
    if device.type != "cuda":
        raise ValueError(f"cutlass_moe runs on CUDA tensors, got a tensor on {device}")
    return int(torch.cuda.current_stream(device).cuda_stream)


def build_info() -> dict[str, Any]:
    """What was built and what it runs with.

    With the extension: ``_C.build_info()`` (version, cutlass_version, cuda_version, archs,
    fast_build, tactic counts per configuration) plus ``extension_available=True``,
    ``package_version``, ``torch_version`` and ``torch_cuda_version``. Without it:
    ``extension_available=False`` and ``extension_error`` saying why, plus the Python-side keys.
    Makes no CUDA call of its own.
    """
    info: dict[str, Any] = {
        "package_version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
    }
    try:
        ext = _import_extension()
    except RuntimeError as exc:
        info["extension_available"] = False
        info["extension_error"] = str(exc)
        return info
    native = dict(ext.build_info())
    native.update(info)
    native["extension_available"] = True
    return native


@contextlib.contextmanager
def _replaced_extension(module: ModuleType | None) -> Iterator[None]:
    """For tests: use ``module`` as the extension (None = missing) and empty the caches."""
    global _extension, _extension_error, _generation
    saved = (_extension, _extension_error, dict(_runners), dict(_tactics))
    with _lock:
        _generation += 1
        _extension = module
        _extension_error = None if module is not None else "cutlass_moe._C is not built (test)"
        _runners.clear()
        _tactics.clear()
    try:
        yield
    finally:
        with _lock:
            _generation += 1
            _extension, _extension_error = saved[0], saved[1]
            _runners.clear()
            _runners.update(saved[2])
            _tactics.clear()
            _tactics.update(saved[3])
