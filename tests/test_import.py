"""Importing cutlass_moe and build_info() work without a GPU, and make no CUDA call (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cutlass_moe

BUILD_INFO_KEYS = ("version", "cutlass_version", "cuda_version", "archs", "fast_build", "tactics")


def test_public_api():
    for name in ("cutlass_fused_moe", "reference_moe", "swap_w13_to_w31", "build_info",
                 "ActivationType", "__version__"):
        assert hasattr(cutlass_moe, name), name
    assert set(cutlass_moe.__all__) >= {"cutlass_fused_moe", "reference_moe", "build_info"}
    assert isinstance(cutlass_moe.__version__, str) and cutlass_moe.__version__


def test_import_makes_no_cuda_call_and_does_not_load_the_extension():
    """In a fresh interpreter that sees no GPU: import, build_info() and a reference call."""
    script = textwrap.dedent(
        """
        import sys, torch
        import cutlass_moe
        assert "cutlass_moe._C" not in sys.modules, "extension imported eagerly"
        info = cutlass_moe.build_info()
        assert isinstance(info, dict) and "extension_available" in info
        x = torch.randn(3, 8)
        ids = torch.tensor([[0], [1], [0]], dtype=torch.int32)
        w1, w2 = torch.randn(2, 16, 8), torch.randn(2, 8, 8)
        cutlass_moe.reference_moe(x, ids, torch.ones(3, 1), w1, w2)
        assert not torch.cuda.is_initialized(), "CUDA was initialised"
        print("ok")
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def _tactic_counts(value):
    """Every integer leaf of the (nested) tactic-count structure of build_info()."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _tactic_counts(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _tactic_counts(v)]
    return []


def test_build_info():
    info = cutlass_moe.build_info()
    assert info["package_version"] == cutlass_moe.__version__
    assert "torch_version" in info
    if not info["extension_available"]:
        assert "cutlass_moe._C" in info["extension_error"]
        return
    for key in BUILD_INFO_KEYS:
        assert key in info, f"build_info() lacks {key!r}: {sorted(info)}"
    counts = _tactic_counts(info["tactics"])
    assert counts and all(n > 0 for n in counts), info["tactics"]
