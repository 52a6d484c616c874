"""cutlass_moe._ext with a fake extension module: enum values, runner cache, build_info (CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from _fake_ext import FakeMoeRunner, make_fake_extension
from _helpers import run_in_threads
from cutlass_moe import ActivationType, _ext


@pytest.fixture
def fake_ext():
    module = make_fake_extension()
    FakeMoeRunner.constructed.clear()
    with _ext._replaced_extension(module):
        yield module


def test_dtype_enum_values_match_problem_h():
    assert _ext.dtype_to_enum(torch.float16) == 0
    assert _ext.dtype_to_enum(torch.bfloat16) == 1
    assert _ext.dtype_to_enum(torch.float32) == 2
    assert _ext.dtype_to_enum(torch.int8) == 3
    with pytest.raises(NotImplementedError, match="float8"):
        _ext.dtype_to_enum(torch.float8_e4m3fn)


def test_activation_enum_values_match_problem_h():
    """The C++ Activation values (include/cutlass_moe/problem.h, the binding's ABI)."""
    expected = {"Identity": 0, "Relu": 1, "Gelu": 2, "Silu": 3, "Swiglu": 4, "SwigluBias": 4,
                "Geglu": 5, "Relu2": 6, "SwigluStep": 7, "GegluTanh": 8, "Situ": 9,
                "ClampedRelu2": 10}
    for name, value in expected.items():
        assert _ext.activation_to_enum(ActivationType[name]) == value
    assert _ext.activation_from_enum(4) == ActivationType.Swiglu
    with pytest.raises(NotImplementedError):
        _ext.activation_to_enum(ActivationType.InvalidType)


def test_flashinfer_activation_values():
    """Our ActivationType keeps FlashInfer's values for the names both have."""
    expected = {"Gelu": 0, "Relu": 1, "Silu": 2, "Swiglu": 3, "Geglu": 4, "SwigluBias": 5,
                "Relu2": 6, "SwigluStep": 7, "GegluTanh": 8, "Identity": 9, "Situ": 10,
                "InvalidType": 11, "ClampedRelu2": 12}
    for name, value in expected.items():
        assert int(ActivationType[name]) == value


def test_runner_cached_per_dtype_triple(fake_ext):
    a = _ext.get_runner(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    b = _ext.get_runner(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    c = _ext.get_runner(torch.bfloat16, torch.bfloat16, torch.float32)
    d = _ext.get_runner(torch.float16, torch.float16, torch.float16)
    assert a is b and a is not c and c is not d
    assert FakeMoeRunner.constructed == [(1, 1, 1), (1, 1, 2), (0, 0, 0)]


def test_runner_cache_is_thread_safe(fake_ext):
    barrier = threading.Barrier(16)
    results = []

    def worker():
        barrier.wait()
        results.append(_ext.get_runner(torch.float16, torch.float16, torch.float32))

    run_in_threads(worker, 16, indexed=False)
    assert len(results) == 16 and all(r is results[0] for r in results)
    assert FakeMoeRunner.constructed == [(0, 0, 2)]


def test_tactics_cached_and_validated(fake_ext, monkeypatch):
    import contextlib

    monkeypatch.setattr(_ext, "device_guard", lambda device: contextlib.nullcontext())
    cpu = torch.device("cpu")
    first = _ext.tactics(torch.bfloat16, torch.bfloat16, torch.bfloat16, 1, cpu)
    again = _ext.tactics(torch.bfloat16, torch.bfloat16, torch.bfloat16, 1, cpu)
    assert first is again and all(d["gemm"] == 1 for d in first)
    assert all(d["gemm"] == 2 for d in
               _ext.tactics(torch.bfloat16, torch.bfloat16, torch.bfloat16, 2, cpu))
    with pytest.raises(ValueError, match="gemm must be 1 or 2"):
        _ext.tactics(torch.bfloat16, torch.bfloat16, torch.bfloat16, 3, cpu)


def test_build_info_with_extension(fake_ext):
    info = _ext.build_info()
    assert info["extension_available"] is True
    for key in ("version", "cutlass_version", "cuda_version", "archs", "fast_build", "tactics",
                "package_version", "torch_version"):
        assert key in info


def test_missing_extension():
    with _ext._replaced_extension(None):
        assert not _ext.extension_available()
        info = _ext.build_info()
        assert info["extension_available"] is False and "not built" in info["extension_error"]
        with pytest.raises(RuntimeError, match="not built"):
            _ext.get_runner(torch.bfloat16, torch.bfloat16, torch.bfloat16)


def test_cuda_only_helpers_reject_cpu():
    with pytest.raises(ValueError, match="CUDA tensors"):
        _ext.stream_handle(torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA tensors"):
        _ext.device_guard(torch.device("cpu"))
