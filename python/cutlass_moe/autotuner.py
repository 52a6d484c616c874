"""AutoTuner: the fastest tactic per GEMM and token-count bucket, profiled on the GPU and cached.

A call's token count maps to a bucket (the next power of two, capped at ``tune_max_num_tokens``).
Inside ``with cutlass_moe.autotune():`` a cache miss profiles every runnable tactic of both GEMMs
on synthetic routing of the bucket's size (CUDA events, warm-up, median of repeats over several
routing samples) and records the fastest. Outside it, a miss falls back to the heuristic default
(:func:`cutlass_moe.ops.default_tactic`) and nothing is profiled.

The cache is in memory; :func:`save_tuning_cache` / :func:`load_tuning_cache` persist it as
versioned JSON, and the environment variable ``CUTLASS_MOE_TUNING_CACHE`` names a file that is
loaded at first use and saved after tuning. A corrupt, foreign-GPU, older-schema or other-build
file gives one warning and is ignored; entries naming tactics this build lacks are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("cutlass_moe.autotuner")

#: Environment variable naming a tuning-cache file (loaded at first use, saved after tuning).
CACHE_ENV = "CUTLASS_MOE_TUNING_CACHE"
CACHE_SCHEMA = "cutlass_moe.tuning_cache"
CACHE_VERSION = 1

#: Profiling method: routing samples (seed 0 = exactly balanced, others uniform random),
#: warm-up runs and timed runs per sample; a tactic's time is the median of all timed runs.
PROFILE_SEEDS = (0, 1, 2)
PROFILE_WARMUP = 2
PROFILE_REPEATS = 8


# ------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------


def tuning_buckets(tune_max_num_tokens: int) -> list[int]:
    """The buckets tuned for ``tune_max_num_tokens``: powers of two below it, then the cap."""
    if tune_max_num_tokens < 1:
        raise ValueError(f"tune_max_num_tokens must be >= 1 (got {tune_max_num_tokens})")
    buckets = []
    b = 1
    while b < tune_max_num_tokens:
        buckets.append(b)
        b *= 2
    buckets.append(tune_max_num_tokens)
    return buckets


def bucket_for(num_tokens: int, tune_max_num_tokens: int) -> int:
    """The bucket of a call with ``num_tokens`` tokens: the next power of two, capped at
    ``tune_max_num_tokens`` (calls above the cap share the cap's bucket)."""
    if tune_max_num_tokens < 1:
        raise ValueError(f"tune_max_num_tokens must be >= 1 (got {tune_max_num_tokens})")
    if num_tokens <= 1:
        return 1
    return min(1 << (int(num_tokens) - 1).bit_length(), int(tune_max_num_tokens))


# ------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeKey:
    """Everything besides the bucket that changes which GEMM kernel is fastest."""

    dtypes: str  # "<activation>_<weight>_<output>", e.g. "bf16_bf16_bf16" or "bf16_int8_bf16"
    quant: str  # "none" (weights of the activation dtype) or "int8_per_channel"
    num_experts: int  # experts on this rank
    hidden_size: int
    inter_size: int  # this TP rank's slice
    top_k: int
    activation: str  # ActivationType name
    ep_size: int  # rows per local expert scale with top_k / ep_size

    @property
    def num_experts_total(self) -> int:
        return self.num_experts * self.ep_size


@dataclasses.dataclass(frozen=True)
class TuningKey:
    """One cache entry's key: which GEMM, the shape, the GPU and the bucket."""

    gemm: int
    shape: ShapeKey
    device: str  # GPU name and SM count, e.g. "NVIDIA H100 80GB HBM3/132"
    bucket: int

    def to_json(self) -> dict[str, Any]:
        return {"gemm": self.gemm, "bucket": self.bucket, **dataclasses.asdict(self.shape)}

    @classmethod
    def from_json(cls, entry: dict[str, Any], device: str) -> TuningKey:
        fields = {f.name for f in dataclasses.fields(ShapeKey)}
        shape = ShapeKey(**{name: entry[name] for name in fields})
        for name in ("num_experts", "hidden_size", "inter_size", "top_k", "ep_size"):
            if not isinstance(getattr(shape, name), int):
                raise TypeError(f"{name} must be an integer")
        if not isinstance(entry["gemm"], int) or not isinstance(entry["bucket"], int):
            raise TypeError("gemm and bucket must be integers")
        return cls(int(entry["gemm"]), shape, device, int(entry["bucket"]))


_DTYPE_TAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
               torch.int8: "int8"}

#: ShapeKey.quant of the weight modes (part of the tuning cache's keys).
QUANT_NONE = "none"
QUANT_INT8_PER_CHANNEL = "int8_per_channel"
#: ``tune_model``'s ``weights`` values and their ShapeKey.quant.
WEIGHT_MODES = {"16bit": QUANT_NONE, "int8": QUANT_INT8_PER_CHANNEL}


def dtype_tag(dtypes: Sequence[torch.dtype]) -> str:
    return "_".join(_DTYPE_TAGS.get(d, str(d).removeprefix("torch.")) for d in dtypes)


_device_ids: dict[int, str] = {}


def device_id(device: torch.device | int | None = None) -> str:
    """GPU identity used in keys and cache files: name and multiprocessor count (looked up once
    per device: this is on every call's path). Host-memory devices are named by their type."""
    if isinstance(device, torch.device) and device.type != "cuda":
        return device.type
    if isinstance(device, torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        index = torch.cuda.current_device() if device is None else int(device)
    found = _device_ids.get(index)
    if found is None:
        props = torch.cuda.get_device_properties(index)
        found = _device_ids.setdefault(index, f"{props.name}/{props.multi_processor_count}")
    return found


def build_id() -> str:
    """Identity of the compiled kernels: package, CUTLASS and CUDA versions. Tactic names are
    stable across builds, so a file from the same versions with fewer tactics stays usable."""
    from . import _ext

    info = _ext.build_info()
    return (
        f"{info.get('version', '?')}+cutlass{info.get('cutlass_version', '?')}"
        f"+cuda{info.get('cuda_version', '?')}"
    )


# ------------------------------------------------------------------------------------------
# Profiling
# ------------------------------------------------------------------------------------------


_l2_flush_buffers: dict[str, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Evicts the device's L2 by reading a buffer of twice its size, so that each profiled run
    streams its weights from memory, as a model's calls do (other layers' weights evict them):
    with a warm L2, small decode GEMMs whose weights fit in it would be timed at cache speed
    and the tuner would favour tactics that lose on cold weights."""
    key = str(device)
    buffer = _l2_flush_buffers.get(key)
    if buffer is None:
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
        buffer = torch.ones(max(2 * l2, 1 << 26) // 2, dtype=torch.float16, device=device)
        _l2_flush_buffers[key] = buffer
    buffer.sum()


@dataclasses.dataclass
class ProfileResult:
    tactic: str
    time_us: float  # median over samples and repeats; inf when it failed to run


def profile_gemm(
    runner: Any,
    gemm: int,
    tactic_names: Sequence[str],
    shape: ShapeKey,
    bucket: int,
    activation: int,
    weights: torch.Tensor,
    device: torch.device,
    scales: torch.Tensor | None = None,
) -> list[ProfileResult]:
    """Times each tactic of GEMM ``gemm`` on synthetic routing of ``bucket`` tokens (divided
    over ``ep_size`` ranks), with the real ``weights`` of that GEMM (and, for int8 weights,
    their per-channel ``scales``, which the runner requires), the L2 flushed before each timed
    run. Tactics that fail to launch
    get ``inf`` and a debug log line. Synchronises the device: never call it during capture."""
    from . import _ext

    num_tokens = max(1, math.ceil(bucket / shape.ep_size))
    args = (num_tokens, shape.hidden_size, shape.inter_size, shape.num_experts, shape.top_k,
            activation)
    with _ext.device_guard(device):
        stream = torch.cuda.current_stream(device)
        workspace_bytes = int(runner.workspace_size(*args))
        workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=device)
        times: dict[str, list[float]] = {name: [] for name in tactic_names}
        failed: set[str] = set()
        for seed in PROFILE_SEEDS:
            runner.prepare_gemm_profile(gemm, *args, weights.data_ptr(), workspace.data_ptr(),
                                        workspace_bytes, seed, stream.cuda_stream,
                                        scales=0 if scales is None else scales.data_ptr())
            for name in tactic_names:
                if name in failed:
                    continue
                try:
                    for _ in range(PROFILE_WARMUP):
                        runner.run_gemm_profile(gemm, name, *args, workspace.data_ptr(),
                                                workspace_bytes, stream.cuda_stream)
                    events = [
                        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        for _ in range(PROFILE_REPEATS)
                    ]
                    for start, end in events:
                        _flush_l2(device)
                        start.record(stream)
                        runner.run_gemm_profile(gemm, name, *args, workspace.data_ptr(),
                                                workspace_bytes, stream.cuda_stream)
                        end.record(stream)
                    stream.synchronize()
                    times[name] += [start.elapsed_time(end) * 1e3 for start, end in events]
                except (RuntimeError, ValueError) as exc:
                    logger.debug("tactic %s failed for GEMM%d bucket %d: %s", name, gemm,
                                 bucket, exc)
                    failed.add(name)
                    times[name] = []
    return [
        ProfileResult(name, statistics.median(times[name]) if times[name] else math.inf)
        for name in tactic_names
    ]


# ------------------------------------------------------------------------------------------
# The tuner and its cache
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Selection:
    """What one GEMM of one call ran and why (for logs and tests)."""

    gemm: int
    bucket: int
    tactic: str
    source: str  # "forced", "cache", "tuned" or "default"


class AutoTuner:
    """Process-wide tactic cache with profiling on a miss inside :func:`autotune`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[TuningKey, tuple[str, float]] = {}
        self._tuning_depth = 0
        self._env_loaded = False
        self._last: dict[int, Selection] = {}

    # -- state ---------------------------------------------------------------------------
    @property
    def tuning(self) -> bool:
        return self._tuning_depth > 0

    @contextlib.contextmanager
    def tuning_mode(self, enabled: bool = True) -> Iterator[None]:
        with self._lock:
            if enabled:
                self._tuning_depth += 1
        try:
            yield
        finally:
            with self._lock:
                if enabled:
                    self._tuning_depth -= 1
                    finished = self._tuning_depth == 0
                else:
                    finished = False
            if finished and os.environ.get(CACHE_ENV):
                self.save(os.environ[CACHE_ENV])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._last.clear()

    def entries(self) -> dict[TuningKey, tuple[str, float]]:
        with self._lock:
            return dict(self._entries)

    def record(self, key: TuningKey, tactic: str, time_us: float) -> None:
        with self._lock:
            self._entries[key] = (tactic, time_us)

    def lookup(self, key: TuningKey) -> str | None:
        self._load_env_once()
        with self._lock:
            found = self._entries.get(key)
        return found[0] if found else None

    def last_selection(self, gemm: int) -> Selection | None:
        """What the most recent call in this process ran for GEMM ``gemm``."""
        with self._lock:
            return self._last.get(gemm)

    def _note(self, selection: Selection) -> None:
        with self._lock:
            self._last[selection.gemm] = selection
        logger.debug("GEMM%d bucket %d -> %s (%s)", selection.gemm, selection.bucket,
                     selection.tactic, selection.source)

    # -- selection on the run path --------------------------------------------------------
    def select(
        self,
        runner: Any,
        shape: ShapeKey,
        num_tokens: int,
        tune_max_num_tokens: int,
        activation: int,
        device: torch.device,
        weights: tuple[torch.Tensor, torch.Tensor],
        runnable: Callable[[int], list[str]],
        default: Callable[[int], str],
        scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> tuple[str, str]:
        """The tactics of both GEMMs for a call: cached, freshly tuned (inside ``autotune``)
        or the heuristic default. ``runnable(gemm)`` lists candidate names, ``default(gemm)``
        gives the heuristic choice; ``scales`` are the int8 weights' per-channel scales."""
        bucket = bucket_for(num_tokens, tune_max_num_tokens)
        dev = device_id(device)
        chosen = []
        for gemm in (1, 2):
            key = TuningKey(gemm, shape, dev, bucket)
            name = self.lookup(key)
            source = "cache"
            if name is not None and name not in runnable(gemm):
                name = None  # an entry for a tactic this build or GPU cannot run
            # Profiling times CUDA events: only CUDA tensors are tuned.
            if name is None and self.tuning and device.type == "cuda":
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        "cutlass_moe: cannot tune during CUDA-graph capture (bucket "
                        f"{bucket} of this shape is untuned); run `cutlass-moe tune` or one "
                        "call inside `with cutlass_moe.autotune():` before capturing"
                    )
                name = self.tune_one(runner, gemm, shape, bucket, activation, device,
                                     weights[gemm - 1], runnable(gemm), scales[gemm - 1])
                source = "tuned"
            if name is None:
                name = default(gemm)
                source = "default"
            self._note(Selection(gemm, bucket, name, source))
            chosen.append(name)
        return chosen[0], chosen[1]

    def tune_one(
        self,
        runner: Any,
        gemm: int,
        shape: ShapeKey,
        bucket: int,
        activation: int,
        device: torch.device,
        weights: torch.Tensor,
        candidates: Sequence[str],
        scales: torch.Tensor | None = None,
    ) -> str | None:
        """Profiles ``candidates`` for one GEMM and bucket, records and returns the fastest
        (None when none could run)."""
        results = profile_gemm(runner, gemm, candidates, shape, bucket, activation, weights,
                               device, scales)
        ok = [r for r in results if math.isfinite(r.time_us)]
        if not ok:
            logger.warning("no tactic ran for GEMM%d bucket %d of %s", gemm, bucket, shape)
            return None
        best = min(ok, key=lambda r: (r.time_us, r.tactic))
        self.record(TuningKey(gemm, shape, device_id(device), bucket), best.tactic, best.time_us)
        return best.tactic

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the cache as versioned JSON, atomically (temp file + rename)."""
        path = Path(path)
        with self._lock:
            entries = dict(self._entries)
        by_device: dict[str, list[dict[str, Any]]] = {}
        for key, (tactic, time_us) in sorted(entries.items(), key=lambda kv: _sort_key(kv[0])):
            by_device.setdefault(key.device, []).append(
                {**key.to_json(), "tactic": tactic, "time_us": round(time_us, 3)}
            )
        document = {
            "schema": CACHE_SCHEMA,
            "version": CACHE_VERSION,
            "build_id": build_id(),
            "devices": by_device,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def load(self, path: str | os.PathLike[str], known_tactics: set[str] | None = None) -> int:
        """Merges the entries of a cache file; returns how many were kept. Problems give one
        warning and never raise: a missing, corrupt, foreign or stale file is ignored."""
        try:
            with open(path) as f:
                document = json.load(f)
        except FileNotFoundError:
            warnings.warn(f"cutlass_moe: tuning cache {path} does not exist; ignored",
                          stacklevel=3)
            return 0
        except (OSError, ValueError) as exc:
            warnings.warn(f"cutlass_moe: tuning cache {path} is unreadable ({exc}); ignored",
                          stacklevel=3)
            return 0
        problem = _document_problem(document)
        if problem:
            warnings.warn(f"cutlass_moe: tuning cache {path} {problem}; ignored", stacklevel=3)
            return 0
        if known_tactics is None:
            known_tactics = _known_tactics()
        kept: dict[TuningKey, tuple[str, float]] = {}
        dropped = 0
        for device, items in document["devices"].items():
            if not isinstance(items, list):
                dropped += 1
                continue
            for entry in items:
                try:
                    key = TuningKey.from_json(entry, str(device))
                    tactic = entry["tactic"]
                    time_us = float(entry.get("time_us", math.nan))
                except (KeyError, TypeError, ValueError):
                    dropped += 1
                    continue
                if not isinstance(tactic, str) or tactic not in known_tactics:
                    dropped += 1
                    continue
                kept[key] = (tactic, time_us)
        if dropped:
            warnings.warn(
                f"cutlass_moe: tuning cache {path}: {dropped} entries are malformed or name "
                "tactics this build does not have; they were dropped", stacklevel=3)
        with self._lock:
            self._entries.update(kept)
        return len(kept)

    def _load_env_once(self) -> None:
        if self._env_loaded:
            return
        with self._lock:
            if self._env_loaded:
                return
            self._env_loaded = True
        path = os.environ.get(CACHE_ENV)
        if path and os.path.exists(path):
            self.load(path)


def _sort_key(key: TuningKey) -> tuple[Any, ...]:
    return (key.device, dataclasses.astuple(key.shape), key.gemm, key.bucket)


def _document_problem(document: Any) -> str | None:
    """Why a parsed cache document cannot be used, or None."""
    if not isinstance(document, dict) or document.get("schema") != CACHE_SCHEMA:
        return "is not a cutlass_moe tuning cache"
    version = document.get("version")
    if version != CACHE_VERSION:
        return f"has schema version {version!r}, this build reads version {CACHE_VERSION}"
    if document.get("build_id") != build_id():
        return (f"was written by build {document.get('build_id')!r}, "
                f"this is {build_id()!r} (re-tune with `cutlass-moe tune`)")
    if not isinstance(document.get("devices"), dict):
        return "has no 'devices' table"
    return None


def _known_tactics() -> set[str]:
    from . import _ext

    names: set[str] = set()
    for dtype in (torch.float16, torch.bfloat16):
        for weight in (dtype, torch.int8):
            for out in (dtype, torch.float32):
                try:
                    runner = _ext.get_runner(dtype, weight, out)
                except ValueError:  # a build that does not know this configuration
                    continue
                for gemm in (1, 2):
                    names.update(str(d["name"]) for d in runner.all_tactics(gemm))
    return names


_TUNER = AutoTuner()


def get_tuner() -> AutoTuner:
    """The process-wide tuner used by :func:`cutlass_moe.cutlass_fused_moe`."""
    return _TUNER


def autotune(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """``with cutlass_moe.autotune():`` — calls inside profile every tactic of both GEMMs for
    their token bucket on a cache miss and record the fastest. ``autotune(False)`` is a no-op
    context. When ``CUTLASS_MOE_TUNING_CACHE`` is set, the cache is saved there on exit."""
    return _TUNER.tuning_mode(enabled)


def save_tuning_cache(path: str | os.PathLike[str]) -> None:
    """Writes every tuned entry to ``path`` (versioned JSON, atomic replace)."""
    _TUNER.save(path)


def load_tuning_cache(path: str | os.PathLike[str]) -> int:
    """Merges a tuning cache file; returns the number of entries kept (0 with a warning when
    the file is unusable)."""
    return _TUNER.load(path)


def clear_tuning_cache() -> None:
    """Forgets every tuned entry of this process."""
    _TUNER.clear()


# ------------------------------------------------------------------------------------------
# Tuning a whole model shape ahead of time (``cutlass-moe tune``)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneRow:
    """One GEMM of one bucket: the tuned tactic against the heuristic default."""

    bucket: int
    gemm: int
    best_tactic: str
    best_us: float
    default_tactic: str
    default_us: float

    @property
    def speedup(self) -> float:
        """Default time over tuned time (1.0 when the default is the tuned choice)."""
        return self.default_us / self.best_us if self.best_us > 0 else math.nan


def tune_model(
    num_experts: int,
    hidden_size: int,
    inter_size: int,
    top_k: int,
    dtype: torch.dtype = torch.bfloat16,
    activation: Any = None,
    ep_size: int = 1,
    max_tokens: int = 8192,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    weights: str = "16bit",
) -> list[TuneRow]:
    """Profiles every bucket of ``tuning_buckets(max_tokens)`` for both GEMMs of an MoE layer
    with ``num_experts`` local experts (random weights of the model's shapes), records the
    fastest tactics in the process-wide cache and returns one row per (bucket, GEMM).
    ``progress(done, total)`` is called after each profiled GEMM. Needs a CUDA device.

    ``weights``: ``"16bit"`` (weights of ``dtype``) or ``"int8"`` (the random weights are
    quantised per channel, as :func:`cutlass_moe.quantization.quantize_moe_weights_int8` does;
    entries are keyed with quant ``"int8_per_channel"``, as the calls that use them)."""
    from . import _ext, ops
    from .activation import ActivationType, is_gated, normalize_activation, require_supported
    from .quantization import quantize_int8_per_channel

    if not torch.cuda.is_available():
        raise RuntimeError("cutlass_moe: tuning needs a CUDA device and none is available")
    act = require_supported(normalize_activation(activation or ActivationType.Swiglu))
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 (got {dtype})")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHT_MODES))} "
                         f"(got {weights!r})")
    int8 = weights == "int8"
    for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("inter_size", inter_size), ("top_k", top_k), ("ep_size", ep_size),
                        ("max_tokens", max_tokens)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    if hidden_size % 8 or inter_size % 8:
        raise ValueError(f"hidden_size ({hidden_size}) and inter_size ({inter_size}) must be "
                         "multiples of 8")
    if int8 and (hidden_size % 16 or inter_size % 16):
        raise ValueError(f"int8 weights need hidden_size ({hidden_size}) and inter_size "
                         f"({inter_size}) to be multiples of 16")
    if top_k > num_experts * ep_size:
        raise ValueError(f"top_k ({top_k}) exceeds the number of experts "
                         f"({num_experts}*{ep_size})")
    device = torch.device(device or "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    act_value = _ext.activation_to_enum(act)
    dtypes = (dtype, torch.int8 if int8 else dtype, dtype)
    runner = _ext.get_runner(*dtypes)
    shape = ShapeKey(dtype_tag(dtypes), WEIGHT_MODES[weights], num_experts, hidden_size,
                     inter_size, top_k, _ext.activation_name(act_value), ep_size)
    n1 = 2 * inter_size if is_gated(act) else inter_size
    gen = torch.Generator(device=device).manual_seed(0)
    gemm_weights: tuple[torch.Tensor, torch.Tensor] = (
        torch.randn(num_experts, n1, hidden_size, device=device, dtype=dtype, generator=gen)
        * hidden_size**-0.5,
        torch.randn(num_experts, hidden_size, inter_size, device=device, dtype=dtype,
                    generator=gen) * inter_size**-0.5,
    )
    gemm_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if int8:
        (q1, s1), (q2, s2) = (quantize_int8_per_channel(w) for w in gemm_weights)
        gemm_weights, gemm_scales = (q1, q2), (s1, s2)
    tuner = get_tuner()
    buckets = tuning_buckets(max_tokens)
    rows: list[TuneRow] = []
    total = 2 * len(buckets)
    with _ext.device_guard(device):
        for bucket in buckets:
            local_tokens = max(1, math.ceil(bucket / ep_size))
            expected_rows = local_tokens * top_k / num_experts
            for gemm in (1, 2):
                # GEMM2 tactics split over K serve only calls of few expanded rows.
                descs = [d for d in _ext.tactics(*dtypes, gemm, device)
                         if d.get("runnable", True) and ops.supports_activation(d, act_value)
                         and (int(d.get("split_k", 1)) == 1
                              or local_tokens * top_k <= ops.split_k_max_rows())]
                names = [str(d["name"]) for d in descs]
                default = ops.default_tactic(descs, expected_rows)
                results = profile_gemm(runner, gemm, names, shape, bucket, act_value,
                                       gemm_weights[gemm - 1], device, gemm_scales[gemm - 1])
                ok = [r for r in results if math.isfinite(r.time_us)]
                if not ok:
                    raise RuntimeError(f"no tactic ran for GEMM{gemm} at bucket {bucket}")
                best = min(ok, key=lambda r: (r.time_us, r.tactic))
                default_us = next(r.time_us for r in results if r.tactic == default)
                tuner.record(TuningKey(gemm, shape, device_id(device), bucket), best.tactic,
                             best.time_us)
                rows.append(TuneRow(bucket, gemm, best.tactic, best.time_us, default,
                                    default_us))
                if progress is not None:
                    progress(len(rows), total)
    return rows
