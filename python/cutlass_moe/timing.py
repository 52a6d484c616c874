"""Timing on the GPU: one L2 flush, one latency measurement, one CUDA-graph capture.

The AutoTuner, the benchmark and the demo all time through this module, so they measure the
same way: each timed call starts from an idle GPU with a cold L2 (flushed by reading a buffer of
twice its size: a read leaves clean lines, so no write-back lands in the timed call), between
two CUDA events; the median over the samples is reported.

Nothing here runs at import time; every function needs a CUDA device.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: Assumed L2 size when the device does not report one (H100).
DEFAULT_L2_BYTES = 50 * 2**20


def l2_bytes(device: torch.device | int | None = None) -> int:
    """The device's L2 size in bytes (:data:`DEFAULT_L2_BYTES` when it is not reported)."""
    try:
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    except (RuntimeError, AssertionError, ValueError):  # not a CUDA device / CPU-only torch
        size = 0
    return size if size > 0 else DEFAULT_L2_BYTES


class L2Flusher:
    """Evicts the L2 of ``device`` by reading a buffer of twice its size (at least 64 MiB).

    Weights of a model's layer are cold when its call starts (the other layers' weights evicted
    them); without a flush, small decode GEMMs whose weights fit in L2 would be timed at cache
    speed, and the tuner would favour tactics that lose on cold weights."""

    def __init__(self, device: torch.device, l2: int | None = None) -> None:
        size = l2_bytes(device) if l2 is None else l2
        self.buffer = torch.ones(max(2 * size, 1 << 26) // 2, dtype=torch.float16, device=device)

    def __call__(self) -> None:
        self.buffer.sum()


_flushers: dict[str, L2Flusher] = {}
_flushers_lock = threading.Lock()


def l2_flusher(device: torch.device) -> L2Flusher:
    """The process's :class:`L2Flusher` for ``device`` (one buffer per device, made once)."""
    key = str(device)
    with _flushers_lock:
        flusher = _flushers.get(key)
        if flusher is None:
            flusher = _flushers[key] = L2Flusher(device)
    return flusher


def time_us(fns: Sequence[Callable[[], object]], warmup: int, repeats: int,
            flush: Callable[[], object] | None = None) -> float:
    """Median latency in us of one call, cycling through ``fns`` (one per input set): each
    sample is flush, synchronise, event, call, event (a call from an idle GPU)."""
    return statistics.median(sample_us(fns, warmup, repeats, flush))


def sample_us(fns: Sequence[Callable[[], object]], warmup: int, repeats: int,
              flush: Callable[[], object] | None = None,
              stream: torch.cuda.Stream | None = None) -> list[float]:
    """The ``repeats`` samples of :func:`time_us`, in us, recorded on ``stream`` (default: the
    current stream). Raises what the calls raise."""
    for index in range(warmup):
        fns[index % len(fns)]()
    stream = torch.cuda.current_stream() if stream is None else stream
    samples = []
    for index in range(repeats):
        if flush is not None:
            flush()
        stream.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fns[index % len(fns)]()
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return samples


def capture_graph(fn: Callable[[], object], pool: Any = None) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); graphs of one token
    count may share ``pool`` when they are never replayed concurrently."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph
