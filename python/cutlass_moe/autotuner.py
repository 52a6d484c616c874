"""AutoTuner: the fastest tactic per GEMM and token-count bucket, profiled on the GPU and cached.

A call's token count maps to a bucket (the next power of two, capped at ``tune_max_num_tokens``).
Inside ``with cutlass_moe.autotune():`` a cache miss profiles every candidate tactic of both
GEMMs (:func:`cutlass_moe.tactics.candidates`) on synthetic routing of the bucket's size (CUDA
events, warm-up, median of repeats over several routing samples, the L2 flushed before each
timed run) and records the fastest. Outside it, a miss falls back to the heuristic default
(:func:`cutlass_moe.tactics.default_for`) and nothing is profiled.

``autotune()`` holds for the context that enters it (a thread, or an asyncio task): other
threads keep running untuned calls, and never profile while, say, capturing a CUDA graph. Two
threads that miss the same key inside ``autotune()`` profile it once.

The cache is in memory; :func:`save_tuning_cache` / :func:`load_tuning_cache` persist it (file
format and its checks: :mod:`cutlass_moe.tuning_cache`), and the environment variable
``CUTLASS_MOE_TUNING_CACHE`` names a file that is loaded at first use and saved after each
outermost ``autotune()`` block (a failed save is a warning). See docs/architecture.md, "Tuner".

int4 group-wise weights (W4A16) are tuned like the others, on their own runner (weight type
``"int4"``): keys carry the group sizes and whether zero points are present
(:func:`cutlass_moe.tuning_cache.quant_int4`), and profiling passes each GEMM's packed weights,
scales, zeros and group size to the runner's profiling calls. FP8 (e4m3) and MXFP4 weight-only
weights likewise (weight types ``"fp8"`` / ``"mxfp4"``; keys
:func:`~cutlass_moe.tuning_cache.quant_fp8`'s ``"fp8_g<G1>[_g<G2>]"`` and ``"mxfp4"``): profiling
passes their weights, scales and group size (32 for mxfp4), never zeros.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import statistics
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import _ext, synthetic, tactics, timing
from .activation import ActivationType, is_gated, normalize_activation, require_supported
from .quantization import quantize_int8_per_channel
from .tuning_cache import (
    CACHE_ENV,
    QUANT_INT8_PER_CHANNEL,
    QUANT_MXFP4,
    QUANT_NONE,
    WEIGHT_MODES,
    ShapeKey,
    TuningKey,
    dtype_tag,
    quant_fp8,
    quant_int4,
    read_cache,
    write_cache,
)
from .validation import MXFP4_GROUP_SIZE, check_group_size, check_layer_shape

logger = logging.getLogger("cutlass_moe.autotuner")

#: Profiling method: routing samples (seed 0 = exactly balanced, others uniform random),
#: warm-up runs and timed runs per sample; a tactic's time is the median of all timed runs.
PROFILE_SEEDS = (0, 1, 2)
PROFILE_WARMUP = 2
PROFILE_REPEATS = 8


# ------------------------------------------------------------------------------------------
# Buckets and keys
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


def shape_key(
    dtypes: tactics.Dtypes,
    activation: ActivationType,
    num_experts: int,
    hidden_size: int,
    inter_size: int,
    top_k: int,
    ep_size: int,
    *,
    group_sizes: tuple[int, int] = (0, 0),
    zeros: bool = False,
) -> ShapeKey:
    """The cache key of a layer shape (everything besides the GPU and the bucket). For int4
    weights (weight type ``"int4"``) ``group_sizes`` ``(G1, G2)`` and ``zeros`` (whether the
    weights have zero points) are part of it (:func:`cutlass_moe.tuning_cache.quant_int4`); for
    fp8 weights the group sizes (:func:`cutlass_moe.tuning_cache.quant_fp8`); mxfp4 weights are
    ``"mxfp4"`` (G = 32 always). ``zeros`` counts for int4 only."""
    if dtypes[1] == _ext.INT4:
        quant = quant_int4(group_sizes, zeros)
    elif dtypes[1] == _ext.FP8:
        quant = quant_fp8(group_sizes)
    elif dtypes[1] == _ext.MXFP4:
        quant = QUANT_MXFP4
    else:
        quant = QUANT_INT8_PER_CHANNEL if dtypes[1] == torch.int8 else QUANT_NONE
    return ShapeKey(dtype_tag(dtypes), quant, num_experts, hidden_size, inter_size, top_k,
                    activation.name, ep_size)


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


# ------------------------------------------------------------------------------------------
# Profiling
# ------------------------------------------------------------------------------------------


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
    activation: ActivationType,
    weights: torch.Tensor,
    device: torch.device,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    group_size: int = 0,
) -> list[ProfileResult]:
    """Times each tactic of GEMM ``gemm`` on synthetic routing of ``bucket`` tokens (divided
    over ``ep_size`` ranks), with the real ``weights`` of that GEMM (and, for int8 weights,
    their per-channel ``scales``, which the runner requires; for int4 weights the packed
    ``[E, N, K/2]`` weights, their ``[E, K/G, N]`` ``scales``, optional ``zeros`` and the GEMM's
    ``group_size``; for fp8 and mxfp4 weights likewise, without zeros), the L2 flushed before
    each timed run. Tactics that fail to launch get
    ``inf`` and a debug log line. Synchronises the device: never call it during capture."""
    num_tokens = max(1, math.ceil(bucket / shape.ep_size))
    args = (num_tokens, shape.hidden_size, shape.inter_size, shape.num_experts, shape.top_k,
            _ext.activation_to_enum(activation))
    with _ext.device_guard(device):
        stream = torch.cuda.current_stream(device)
        flush = timing.l2_flusher(device)
        workspace_bytes = int(runner.workspace_size(*args))
        workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=device)
        times: dict[str, list[float]] = {name: [] for name in tactic_names}
        failed: set[str] = set()
        for seed in PROFILE_SEEDS:
            runner.prepare_gemm_profile(gemm, *args, weights.data_ptr(), workspace.data_ptr(),
                                        workspace_bytes, seed, stream.cuda_stream,
                                        scales=0 if scales is None else scales.data_ptr(),
                                        zeros=0 if zeros is None else zeros.data_ptr(),
                                        group_size=group_size)
            for name in tactic_names:
                if name in failed:
                    continue

                def run(name: str = name) -> None:
                    runner.run_gemm_profile(gemm, name, *args, workspace.data_ptr(),
                                            workspace_bytes, stream.cuda_stream,
                                            group_size=group_size)

                try:
                    times[name] += timing.sample_us([run], PROFILE_WARMUP, PROFILE_REPEATS,
                                                    flush, stream)
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
    """Process-wide tactic cache with profiling on a miss inside :func:`autotune` (per
    context: see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[TuningKey, tuple[str, float]] = {}
        # Depth of nested autotune() blocks in the current context (thread or task).
        self._depth: contextvars.ContextVar[int] = contextvars.ContextVar(
            f"cutlass_moe_autotune_depth_{id(self)}", default=0)
        self._key_locks: dict[TuningKey, threading.Lock] = {}
        self._env_lock = threading.Lock()
        self._env_loaded = False
        self._last: dict[int, Selection] = {}

    # -- state ---------------------------------------------------------------------------
    @property
    def tuning(self) -> bool:
        """Whether the current context is inside ``autotune()``."""
        return self._depth.get() > 0

    @contextlib.contextmanager
    def tuning_mode(self, enabled: bool = True) -> Iterator[None]:
        """Tuning on for the current context while inside; when the outermost block ends and
        ``CUTLASS_MOE_TUNING_CACHE`` is set, the cache is saved there (a failed save is a
        warning: it never replaces the block's own exception)."""
        if not enabled:
            yield
            return
        token = self._depth.set(self._depth.get() + 1)
        try:
            yield
        finally:
            self._depth.reset(token)
            if self._depth.get() == 0 and os.environ.get(CACHE_ENV):
                self._save_quietly(os.environ[CACHE_ENV])

    def _save_quietly(self, path: str) -> None:
        try:
            self.save(path)
        except Exception as exc:  # noqa: BLE001 - any failure of the save is reported, not raised
            warnings.warn(f"cutlass_moe: could not save the tuning cache to {path} "
                          f"({type(exc).__name__}: {exc}); the tuned tactics stay in memory",
                          stacklevel=4)

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
        dtypes: tactics.Dtypes,
        shape: ShapeKey,
        activation: ActivationType,
        device: torch.device,
        num_tokens: int,
        tune_max_num_tokens: int,
        weights: tuple[torch.Tensor, torch.Tensor],
        scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
        zeros: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
        group_sizes: tuple[int, int] = (0, 0),
    ) -> tuple[str, str]:
        """The tactics of both GEMMs of a call: cached, freshly tuned (inside ``autotune``)
        or the heuristic default. A cached tactic this build or GPU cannot run counts as a
        miss; one that cannot serve this call's row count (a GEMM2 split over K, for a call
        above the largest bucket) gives the default. ``weights``/``scales``: the call's expert
        weights (profiling runs on them; ``scales`` are int8 weights' per-channel scales or
        int4/fp8/mxfp4 weights' group-wise ones); ``zeros``/``group_sizes``: int4 weights' zero
        points and the group sizes of int4/fp8/mxfp4 weights (``shape`` already carries them in
        its key)."""
        bucket = bucket_for(num_tokens, tune_max_num_tokens)
        dev = device_id(device)
        expanded_rows = num_tokens * shape.top_k
        chosen = []
        for gemm in (1, 2):
            key = TuningKey(gemm, shape, dev, bucket)
            allowed = tactics.candidate_names(dtypes, gemm, activation, device, expanded_rows)
            name, source = self.lookup(key), "cache"
            if name is not None and name not in allowed:
                if name in tactics.candidate_names(dtypes, gemm, activation, device):
                    source = "default"  # runnable, but not at this call's row count
                name = None
            if name is None and source == "cache" and self.tuning and self._can_profile(device):
                name = self._tune_once(runner, dtypes, key, activation, device,
                                       weights[gemm - 1], scales[gemm - 1], zeros[gemm - 1],
                                       group_sizes[gemm - 1])
                source = "tuned"
            if name is None:
                name = tactics.default_for(dtypes, gemm, activation, device,
                                           expanded_rows / max(shape.num_experts_total, 1))
                source = "default"
            self._note(Selection(gemm, bucket, name, source))
            chosen.append(name)
        return chosen[0], chosen[1]

    @staticmethod
    def _can_profile(device: torch.device) -> bool:
        # Profiling times CUDA events: only CUDA tensors are tuned.
        return device.type == "cuda"

    def _tune_once(
        self,
        runner: Any,
        dtypes: tactics.Dtypes,
        key: TuningKey,
        activation: ActivationType,
        device: torch.device,
        weights: torch.Tensor,
        scales: torch.Tensor | None,
        zeros: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> str | None:
        """Profiles ``key`` unless another thread is doing it or has done it (one lock per
        key); returns the tactic now cached for it (None when no tactic ran)."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "cutlass_moe: cannot tune during CUDA-graph capture (bucket "
                f"{key.bucket} of this shape is untuned); run `cutlass-moe tune` or one "
                "call inside `with cutlass_moe.autotune():` before capturing"
            )
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            done = self.lookup(key)
            if done is not None:
                return done
            local_tokens = max(1, math.ceil(key.bucket / key.shape.ep_size))
            names = tactics.candidate_names(dtypes, key.gemm, activation, device,
                                            local_tokens * key.shape.top_k)
            return self.tune_one(runner, key.gemm, key.shape, key.bucket, activation, device,
                                 weights, names, scales, zeros=zeros, group_size=group_size)

    def tune_one(
        self,
        runner: Any,
        gemm: int,
        shape: ShapeKey,
        bucket: int,
        activation: ActivationType,
        device: torch.device,
        weights: torch.Tensor,
        candidates: Sequence[str],
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> str | None:
        """Profiles ``candidates`` for one GEMM and bucket, records and returns the fastest
        (None when none could run). ``scales``, ``zeros``, ``group_size``: as
        :func:`profile_gemm`."""
        results = profile_gemm(runner, gemm, candidates, shape, bucket, activation, weights,
                               device, scales, zeros, group_size)
        ok = [r for r in results if math.isfinite(r.time_us)]
        if not ok:
            logger.warning("no tactic ran for GEMM%d bucket %d of %s", gemm, bucket, shape)
            return None
        best = min(ok, key=lambda r: (r.time_us, r.tactic))
        self.record(TuningKey(gemm, shape, device_id(device), bucket), best.tactic, best.time_us)
        return best.tactic

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the cache to ``path`` (merged with what the file already holds, under a
        lock; atomic replace). Raises OSError when it cannot be written."""
        write_cache(path, self.entries())

    def load(self, path: str | os.PathLike[str], known_tactics: set[str] | None = None) -> int:
        """Merges the entries of a cache file; returns how many were kept. Problems give one
        warning and never raise: a missing, corrupt, foreign or stale file is ignored."""
        kept = read_cache(path, known=known_tactics)
        with self._lock:
            self._entries.update(kept)
        return len(kept)

    def _load_env_once(self) -> None:
        # Callers arriving while the first one loads wait for it (they must not see an
        # empty cache and run, or capture, a default tactic).
        if self._env_loaded:
            return
        with self._env_lock:
            if self._env_loaded:
                return
            try:
                path = os.environ.get(CACHE_ENV)
                if path and os.path.exists(path):
                    self.load(path)
            finally:
                self._env_loaded = True


_TUNER = AutoTuner()


def get_tuner() -> AutoTuner:
    """The process-wide tuner used by :func:`cutlass_moe.cutlass_fused_moe`."""
    return _TUNER


def autotune(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """``with cutlass_moe.autotune():`` — calls made inside, in this thread or task, profile
    every tactic of both GEMMs for their token bucket on a cache miss and record the fastest.
    ``autotune(False)`` is a no-op context. When ``CUTLASS_MOE_TUNING_CACHE`` is set, the
    cache is saved there when the outermost block exits."""
    return _TUNER.tuning_mode(enabled)


def save_tuning_cache(path: str | os.PathLike[str]) -> None:
    """Writes every tuned entry to ``path`` (versioned JSON; merged with the entries the file
    already has, under a lock; atomic replace)."""
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
    group_size: int | None = None,
    asymmetric: bool = False,
) -> list[TuneRow]:
    """Profiles every bucket of ``tuning_buckets(max_tokens)`` for both GEMMs of an MoE layer
    with ``num_experts`` local experts (random weights of the model's shapes), records the
    fastest tactics in the process-wide cache and returns one row per (bucket, GEMM).
    ``progress(done, total)`` is called after each profiled GEMM. Needs a CUDA device.

    ``weights``: ``"16bit"`` (weights of ``dtype``), ``"int8"`` (the random weights are
    quantised per channel, as :func:`cutlass_moe.quantization.quantize_moe_weights_int8` does;
    entries are keyed with quant ``"int8_per_channel"``, as the calls that use them) or
    ``"int4"`` (quantised group-wise with ``group_size`` for both GEMMs — a multiple of 32
    dividing H and I — and zero points when ``asymmetric``, as
    :func:`cutlass_moe.quantize_int4_groupwise` does; keyed ``quant_int4((G, G), asymmetric)``,
    e.g. ``"int4_g128"``, as the calls with such weights), ``"fp8"`` (float8_e4m3fn weights
    quantised group-wise with ``group_size``, as
    :func:`cutlass_moe.fp8.quantize_moe_weights_fp8` does; keyed ``quant_fp8((G, G))``, e.g.
    ``"fp8_g128"``) or ``"mxfp4"`` (as :func:`cutlass_moe.mxfp4.quantize_moe_weights_mxfp4`
    does; keyed ``"mxfp4"``; ``group_size`` None or 32). ``group_size`` (default: 128 for int4
    and fp8, 32 for mxfp4) applies to these three, ``asymmetric`` to int4 only."""
    if not torch.cuda.is_available():
        raise RuntimeError("cutlass_moe: tuning needs a CUDA device and none is available")
    act = require_supported(normalize_activation(activation or ActivationType.Swiglu))
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 (got {dtype})")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHT_MODES))} "
                         f"(got {weights!r})")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
    check_layer_shape(num_experts, hidden_size, inter_size, top_k, ep_size, weights)
    int8, int4, fp8, mxfp4 = (weights == w for w in ("int8", "int4", "fp8", "mxfp4"))
    if asymmetric and not int4:
        raise ValueError(f"asymmetric (zero points) applies to int4 weights only (got weights="
                         f"{weights!r})")
    if group_size is None:
        group_size = MXFP4_GROUP_SIZE if mxfp4 else 128
    if int4 or fp8 or mxfp4:
        check_group_size(group_size, hidden_size, inter_size, weights)
    device = torch.device(device or "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    weight_type: torch.dtype | str = (torch.int8 if int8 else _ext.INT4 if int4 else _ext.FP8
                                      if fp8 else _ext.MXFP4 if mxfp4 else dtype)
    dtypes = (dtype, weight_type, dtype)
    runner = _ext.get_runner(*dtypes)
    group_sizes = (group_size, group_size) if int4 or fp8 or mxfp4 else (0, 0)
    shape = shape_key(dtypes, act, num_experts, hidden_size, inter_size, top_k, ep_size,
                      group_sizes=group_sizes, zeros=int4 and asymmetric)
    fc1_rows = 2 * inter_size if is_gated(act) else inter_size
    gemm_weights = synthetic.random_expert_weights(num_experts, hidden_size, inter_size,
                                                   fc1_rows, dtype, device)
    gemm_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    gemm_zeros: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if int8:
        (q1, s1), (q2, s2) = (quantize_int8_per_channel(w) for w in gemm_weights)
        gemm_weights, gemm_scales = (q1, q2), (s1, s2)
    if int4 or fp8 or mxfp4:
        layer = (synthetic.quantize_layer_int4(*gemm_weights, group_size, asymmetric) if int4
                 else synthetic.quantize_layer_fp8(*gemm_weights, group_size) if fp8
                 else synthetic.quantize_layer_mxfp4(*gemm_weights))
        gemm_weights, gemm_scales, gemm_zeros = layer.weights, layer.scales, layer.zeros
    tuner = get_tuner()
    buckets = tuning_buckets(max_tokens)
    rows: list[TuneRow] = []
    total = 2 * len(buckets)
    with _ext.device_guard(device):
        for bucket in buckets:
            local_tokens = max(1, math.ceil(bucket / ep_size))
            expected_rows = local_tokens * top_k / num_experts
            for gemm in (1, 2):
                descs = tactics.candidates(dtypes, gemm, act, device, local_tokens * top_k)
                names = [str(d["name"]) for d in descs]
                default = tactics.default_tactic(descs, expected_rows)
                results = profile_gemm(runner, gemm, names, shape, bucket, act,
                                       gemm_weights[gemm - 1], device, gemm_scales[gemm - 1],
                                       gemm_zeros[gemm - 1], group_sizes[gemm - 1])
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
