"""Test configuration: the `gpu` marker, and finding the package in a source checkout."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

# An installed cutlass_moe (wheel or editable, with its compiled _C) wins; a plain source
# checkout falls back to python/ (CPU tests only need the Python layer).
if importlib.util.find_spec("cutlass_moe") is None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    from _helpers import WORST_ERRORS

    # Keys naming their own baseline ("int8_vs_unquantized_bfloat16") get a line of their own.
    against_reference = {k: v for k, v in WORST_ERRORS.items() if "_vs_" not in k}
    other = {k: v for k, v in WORST_ERRORS.items() if "_vs_" in k}
    if against_reference:
        worst = ", ".join(f"{k} {v:.3g}" for k, v in sorted(against_reference.items()))
        terminalreporter.write_line(f"worst relative L2 error vs reference_moe: {worst}")
    if other:
        worst = ", ".join(f"{k} {v:.3g}" for k, v in sorted(other.items()))
        terminalreporter.write_line(f"worst relative L2 error, other baselines: {worst}")


@pytest.fixture
def fresh_tuner(monkeypatch):
    """The process-wide AutoTuner, emptied before and after the test, with no tuning-cache file
    and no host-side id check configured in the environment."""
    from cutlass_moe import autotuner, tuning_cache, validation

    monkeypatch.delenv(tuning_cache.CACHE_ENV, raising=False)
    monkeypatch.delenv(validation.CHECK_INPUTS_ENV, raising=False)
    tuner = autotuner.get_tuner()
    tuner.clear()
    yield tuner
    tuner.clear()


@pytest.fixture
def fake_cpu(monkeypatch):
    """The fake extension (tests/_fake_ext.py), with the CUDA-only steps (device guard, stream,
    CUDA check) made CPU-friendly so the whole call path runs on host tensors; the stream handle
    passed to the runner is _fake_ext.FAKE_STREAM."""
    import contextlib

    from _fake_ext import FAKE_STREAM, FakeMoeRunner, make_fake_extension
    from cutlass_moe import _ext, validation

    monkeypatch.setattr(_ext, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_ext, "stream_handle", lambda device: FAKE_STREAM)
    monkeypatch.setattr(validation, "require_cuda", lambda device: None)
    monkeypatch.delenv(validation.CHECK_INPUTS_ENV, raising=False)
    FakeMoeRunner.constructed.clear()
    with _ext._replaced_extension(make_fake_extension()):
        yield
