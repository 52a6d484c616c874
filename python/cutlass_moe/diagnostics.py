"""What ``cutlass-moe info`` reports and checks: the build, the driver, the GPUs, the cache.

- :func:`collect_info` gathers everything as one JSON-able dict (no CUDA call fails it: without
  a GPU, a driver or the compiled extension it says so); :func:`format_info` is its text.
- :func:`arch_support`: whether the compiled archs (SASS, or PTX the driver JIT-compiles) cover a
  GPU's compute capability.
- :func:`check_driver`: whether the installed driver can run this build's CUDA runtime (CUDA
  minor-version compatibility included), as a :class:`DriverCheck`.
- :func:`installed_distributions`: the wheels that provide ``cutlass_moe`` (more than one is a
  conflict).
- :func:`check_tuning_cache`: whether the file ``$CUTLASS_MOE_TUNING_CACHE`` names is usable.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _ext
from ._version import __version__
from .tables import format_table
from .tuning_cache import CACHE_ENV, read_cache

logger = logging.getLogger("cutlass_moe.diagnostics")

#: ``arch_support`` says ``"yes (JIT from compute_NN PTX)"`` when a GPU runs JIT-compiled PTX.
JIT_PREFIX = "JIT from"


def _arch_number(arch: Any) -> int | None:
    digits = ""
    for ch in str(arch).removeprefix("sm_"):
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def arch_support(major: int, minor: int, archs: Sequence[Any],
                 ptx_archs: Sequence[Any] = ()) -> str:
    """Whether a build for ``archs`` (SASS) and ``ptx_archs`` (PTX) has kernels for compute
    capability ``major.minor``: ``"yes"``, ``"yes (sm_86 code)"`` for a binary-compatible lower
    arch of the same major, ``"yes (JIT from compute_90 PTX)"`` when only PTX of an arch at or
    below it fits (the driver compiles it at first use), or ``"no"``."""
    numbers = {n for n in map(_arch_number, archs) if n is not None}
    capability = 10 * major + minor
    if capability in numbers:
        return "yes"
    compatible = [n for n in numbers if n // 10 == major and n < capability]
    if compatible:
        return f"yes (sm_{max(compatible)} code)"
    ptx = [n for n in map(_arch_number, ptx_archs) if n is not None and n <= capability]
    if ptx:
        return f"yes ({JIT_PREFIX} compute_{max(ptx)} PTX)"
    # Builds made before CMakeLists.txt resolved `native` and `all` recorded the name itself.
    names = [str(a) for a in (*archs, *ptx_archs) if _arch_number(a) is None]
    if names:
        return (f"unknown (the build recorded its archs as {', '.join(names)}, not as numbers; "
                "rebuild with CUTLASS_MOE_CUDA_ARCHS naming the arch)")
    return "no"


def arch_label(arch: Any, prefix: str = "sm_") -> str:
    """``"sm_90"`` for an arch number (or ``"90a"``), the name itself for anything else."""
    return f"{prefix}{arch}" if _arch_number(arch) is not None else str(arch)


def cuda_version_text(version: int) -> str:
    """``12080`` -> ``"12.8"`` (the encoding of ``CUDART_VERSION`` and
    ``cudaDriverGetVersion``: 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{(version % 1000) // 10}"


@dataclasses.dataclass(frozen=True)
class DriverCheck:
    """Whether the installed driver can run this build. ``status`` is one of ``ok``,
    ``minor-compat`` (usable through CUDA minor-version compatibility, except for PTX JIT),
    ``too-old``, ``no-driver`` or ``unknown``; ``message`` says it in words."""

    status: str
    message: str


def check_driver(driver_version: int | None, runtime_version: int, *, has_ptx: bool = False,
                 needs_jit: bool = False, unknown_reason: str = "could not ask the driver"
                 ) -> DriverCheck:
    """The driver rule for a build whose CUDA runtime (linked statically) is
    ``runtime_version`` and a driver reporting ``driver_version`` (both encoded as
    1000 * major + 10 * minor; 0 = no driver, None = not known).

    - driver >= runtime: ok.
    - same major, older minor: the kernels compiled to SASS run (CUDA minor-version
      compatibility: a 12.x runtime works with any driver that supports 12.0 or newer), but
      PTX can only be JIT-compiled by a driver at least as new as the toolkit that wrote it.
      ``needs_jit`` (a GPU here has no SASS of its own and would run the PTX) makes that
      ``too-old``; otherwise it is ``minor-compat``, with the PTX caveat when ``has_ptx``.
    - older major: ``too-old`` (a CUDA 13 build needs a driver that supports CUDA 13.0).
    - 0: ``no-driver``; None: ``unknown`` (``unknown_reason`` says why).
    """
    built = cuda_version_text(runtime_version)
    major = runtime_version // 1000
    if driver_version is None:
        return DriverCheck("unknown", f"unknown ({unknown_reason}; this CUDA {built} build "
                                      f"needs a driver that supports CUDA >= {major}.0)")
    if driver_version <= 0:
        return DriverCheck("no-driver", f"none found (running this CUDA {built} build needs an "
                                        f"NVIDIA driver that supports CUDA >= {major}.0)")
    have = cuda_version_text(driver_version)
    if driver_version >= runtime_version:
        return DriverCheck("ok", f"supports CUDA {have} (new enough for this CUDA {built} build)")
    if driver_version // 1000 < major:
        other = (f", or install cutlass-moe-cu{driver_version // 1000} instead"
                 if driver_version // 1000 >= 12 else "")
        return DriverCheck(
            "too-old",
            f"driver supports CUDA {have} but this wheel was built with CUDA {built}: update "
            f"the NVIDIA driver to one that supports CUDA >= {major}.0{other}")
    if needs_jit:
        return DriverCheck(
            "too-old",
            f"driver supports CUDA {have} but this wheel was built with CUDA {built}, and a GPU "
            f"here runs its PTX, which only a driver >= {built} can JIT-compile: update the "
            f"NVIDIA driver to one that supports CUDA >= {built}")
    caveat = f"; PTX JIT for newer GPUs needs a driver >= {built}" if has_ptx else ""
    return DriverCheck(
        "minor-compat",
        f"supports CUDA {have}: runs this CUDA {built} build through minor-version "
        f"compatibility{caveat}")


def query_driver_version() -> tuple[int | None, str | None]:
    """``(_C.driver_cuda_version(), None)`` (0 = no driver), or ``(None, why)`` when the
    driver cannot be asked."""
    try:
        ext = _ext.load_extension()
    except RuntimeError:
        return None, "the extension is not available"
    query = getattr(ext, "driver_cuda_version", None)
    if query is None:
        return None, "this build has no driver_cuda_version()"
    try:
        return int(query()), None
    except (RuntimeError, ValueError, TypeError) as exc:
        return None, f"asking the driver failed: {exc}"


def installed_distributions() -> list[dict[str, str]]:
    """Name and version of each installed distribution that provides the ``cutlass_moe``
    package (cutlass-moe, cutlass-moe-cu12, cutlass-moe-cu13): more than one is a conflict."""
    try:
        names = importlib.metadata.packages_distributions().get("cutlass_moe", [])
    except (OSError, ValueError, KeyError) as exc:  # a broken installation elsewhere
        logger.debug("listing the installed distributions failed: %s", exc)
        return []
    found = []
    for name in sorted(set(names), key=str.lower):
        try:
            found.append({"name": name, "version": importlib.metadata.version(name)})
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def gpu_info() -> tuple[list[dict[str, Any]], str | None]:
    """The visible GPUs (index, name, compute capability, SMs, memory) and, when there are
    none, why."""
    if not torch.cuda.is_available():
        return [], "no CUDA device is available"
    gpus = []
    try:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
            })
    except (RuntimeError, AssertionError) as exc:
        return gpus, f"querying the CUDA devices failed: {exc}"
    return gpus, None if gpus else "no CUDA device is visible"


def check_tuning_cache(path: str | None, extension_available: bool) -> dict[str, Any]:
    """What ``cutlass-moe info`` reports about the tuning cache file ``path`` (the value of
    ``$CUTLASS_MOE_TUNING_CACHE``; None or empty when unset): ``env``, ``path``, ``exists``
    and ``status``, one of ``unset``, ``missing`` (it is created by the first save),
    ``usable`` (with ``entries``, the count this build would load, and ``problem`` when some
    were dropped), ``unusable`` (with ``problem``: the file is ignored) or ``unchecked``
    (without the compiled extension the build it must match is not known)."""
    report: dict[str, Any] = {"env": CACHE_ENV, "path": path or None,
                              "exists": bool(path) and os.path.lexists(path)}
    if not path:
        report["status"] = "unset"
    elif not report["exists"]:
        report["status"] = "missing"
    elif not extension_available:
        report["status"] = "unchecked"
    else:
        # read_cache reports a problem as one warning, the same one a serving process would
        # see when it loads the file.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entries = read_cache(path)
        problems = [_cache_problem(str(w.message), path) for w in caught]
        if entries or not problems:
            report.update(status="usable", entries=len(entries))
        else:
            report["status"] = "unusable"
        if problems:
            report["problem"] = "; ".join(problems)
    return report


def _cache_problem(message: str, path: str) -> str:
    """A read_cache warning without the prefix naming the file (info names it already)."""
    text = message.removeprefix("cutlass_moe: ").removeprefix(f"tuning cache {path}")
    return text.removeprefix(":").removesuffix("; ignored").strip()


def _runtime_version(info: Mapping[str, Any]) -> int | None:
    """The build's CUDA runtime as 1000 * major + 10 * minor: ``cuda_runtime_version``, or
    parsed from ``cuda_version`` ("12.8") for builds that lack it."""
    if info.get("cuda_runtime_version") is not None:
        return int(info["cuda_runtime_version"])
    major, _, minor = str(info.get("cuda_version", "")).partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return None
    return 1000 * int(major) + 10 * int(minor)


def collect_info() -> dict[str, Any]:
    """Everything ``cutlass-moe info`` reports, as one JSON-able dict."""
    info = dict(_ext.build_info())
    gpus, no_gpu_reason = gpu_info()
    archs = info.get("archs") or []
    ptx_archs = info.get("ptx_archs") or []
    for gpu in gpus:
        major, minor = (int(x) for x in gpu["capability"].split("."))
        gpu["kernels"] = (arch_support(major, minor, archs, ptx_archs)
                          if info["extension_available"] else "no")
    info["gpus"] = gpus
    if no_gpu_reason:
        info["no_gpu_reason"] = no_gpu_reason
    info["distributions"] = installed_distributions()
    runtime = _runtime_version(info) if info["extension_available"] else None
    if runtime is not None:
        driver, why = query_driver_version()
        needs_jit = any(str(g["kernels"]).startswith(f"yes ({JIT_PREFIX}") for g in gpus)
        check = check_driver(driver, runtime, has_ptx=bool(ptx_archs), needs_jit=needs_jit,
                             unknown_reason=why or "could not ask the driver")
        info["driver_cuda_version"] = driver
        info["driver"] = {"status": check.status, "message": check.message}
    info["tuning_cache"] = check_tuning_cache(os.environ.get(CACHE_ENV),
                                              bool(info["extension_available"]))
    return info


def format_info(info: Mapping[str, Any], prog: str) -> str:
    """The text of ``cutlass-moe info`` for :func:`collect_info`'s ``info``, headed by the
    command name ``prog`` and the package version."""
    lines = [f"{prog} {info.get('package_version', __version__)}"]

    def field(key: str, value: Any) -> None:
        lines.append(f"  {key + ':':<16} {value}".rstrip())

    dists = info.get("distributions")
    if dists is not None:
        names = ", ".join(f"{d['name']} {d['version']}" for d in dists)
        if len(dists) > 1:
            field("distribution", f"CONFLICT: {names} each install cutlass_moe; uninstall all "
                                  "but one (pip uninstall NAME) and reinstall it")
        else:
            field("distribution", names or "none installed (running from a source tree)")
    field("torch", f"{info.get('torch_version')} (CUDA {info.get('torch_cuda_version') or 'none'})")
    if info.get("extension_available"):
        field("extension", f"cutlass_moe._C {info.get('version', '?')}")
        field("CUTLASS", info.get("cutlass_version", "?"))
        field("CUDA toolkit", f"{info.get('cuda_version', '?')} (runtime linked statically)")
        archs = info.get("archs") or []
        field("compiled archs", ", ".join(arch_label(a) for a in archs) or "none")
        ptx_archs = info.get("ptx_archs") or []
        field("PTX", (", ".join(arch_label(a, "compute_") for a in ptx_archs)
                      + " (JIT-compiled by the driver for newer GPUs)") if ptx_archs else "none")
        driver = info.get("driver")
        if driver:
            label = "TOO OLD: " if driver["status"] == "too-old" else ""
            field("driver", label + driver["message"])
        field("fast build", "yes (a reduced set of tactics)" if info.get("fast_build") else "no")
        tactics = info.get("tactics") or {}
        if tactics:
            field("tactics", "")
            table = format_table(
                ["config", "GEMM1", "GEMM2"],
                [[str(config), str(counts.get("gemm1", 0)), str(counts.get("gemm2", 0))]
                 for config, counts in sorted(tactics.items())],
                left=(0,))
            lines += ["    " + row for row in table.splitlines()]
        else:
            field("tactics", "none")
    else:
        field("extension", f"NOT AVAILABLE: {info.get('extension_error', 'unknown reason')}")
    gpus = info.get("gpus") or []
    for gpu in gpus:
        major, minor = gpu["capability"].split(".")
        field(f"GPU {gpu['index']}",
              f"{gpu['name']}, sm_{major}{minor}, {gpu['multiprocessors']} SMs, "
              f"{gpu['memory_gib']} GiB, kernels for it: {gpu.get('kernels', '?')}")
    if not gpus:
        field("GPU", f"none ({info.get('no_gpu_reason', 'no CUDA device is available')})")
    cache = info.get("tuning_cache") or {}
    if cache.get("path"):
        field("tuning cache", f"${cache['env']}={cache['path']} ({_cache_state(cache)})")
    else:
        field("tuning cache", f"${CACHE_ENV} is not set (tuned tactics live in "
                              "memory unless saved)")
    return "\n".join(lines)


def _cache_state(cache: Mapping[str, Any]) -> str:
    status = cache.get("status")
    problem = cache.get("problem")
    if status == "usable":
        count = cache.get("entries", 0)
        text = f"usable: {count} entr{'y' if count == 1 else 'ies'}"
        return f"{text}; {problem}" if problem else text
    if status == "unusable":
        return f"UNUSABLE, ignored: {problem}"
    if status == "unchecked":
        return "exists; not checked without the compiled extension"
    if status == "missing" or not cache.get("exists"):
        return "does not exist yet; the first save creates it"
    return "exists"
