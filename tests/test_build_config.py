"""The build configuration: package metadata (pyproject.toml, LICENSE) and how CMakeLists.txt
reads CUTLASS_MOE_CUDA_ARCHS, `native` above all (CPU, with cmake and nvcc; one GPU-marked test
resolves `native` on a real GPU).

The CMake tests configure the project in a temporary folder and read its messages; they need
cmake and nvcc and skip without them. Configuring compiles nothing but CMake's own probes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cutlass_moe import diagnostics

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------
# Package metadata
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_build_requirements_leave_cmake_and_ninja_to_scikit_build_core(pyproject):
    """scikit-build-core adds cmake and ninja only where the system lacks them (and warns when
    they are listed)."""
    names = [re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower()
             for r in pyproject["build-system"]["requires"]]
    assert "cmake" not in names and "ninja" not in names
    assert "scikit-build-core" in names and "pybind11" in names
    assert pyproject["tool"]["scikit-build"]["minimum-version"] >= "0.10"
    # minimum-version >= 0.10: the CMake version comes from cmake_minimum_required.
    assert "cmake_minimum_required(VERSION 3.24)" in (ROOT / "CMakeLists.txt").read_text()


def test_license_and_urls(pyproject):
    project = pyproject["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # scikit-build-core puts LICENSE* into the wheel unless told otherwise.
    assert "license-files" not in pyproject["tool"]["scikit-build"].get("wheel", {})
    urls = project["urls"]
    assert urls and all(u.startswith("https://") for u in urls.values())


# ------------------------------------------------------------------------------------------
# CUTLASS_MOE_CUDA_ARCHS in CMakeLists.txt
# ------------------------------------------------------------------------------------------

CMAKE = shutil.which("cmake")
NVCC = shutil.which("nvcc") or next(
    (str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.exists()), None)
needs_toolchain = pytest.mark.skipif(CMAKE is None or NVCC is None,
                                     reason="needs cmake and nvcc")


def configure(build_dir: Path, archs: str, *, hide_gpus: bool = False,
              fast: bool = True) -> subprocess.CompletedProcess:
    """``cmake -S <repo> -B build_dir`` with CUTLASS_MOE_CUDA_ARCHS=archs; its output is
    stdout and stderr together."""
    env = dict(os.environ)
    env.pop("CMAKE_BUILD_PARALLEL_LEVEL", None)
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    args = [CMAKE, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCUTLASS_MOE_CUDA_ARCHS={archs}",
            f"-DCUTLASS_MOE_FAST_BUILD={'ON' if fast else 'OFF'}"]
    try:
        import pybind11
    except ImportError:
        pass  # configuring stops at find_package(pybind11), after the arch messages
    else:
        args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
    return subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600, check=False)


def one_line(output: str) -> str:
    """CMake wraps and indents long messages: join them back for matching."""
    return " ".join(output.split())


def recorded_archs(output: str) -> tuple[str, str, str]:
    """(CMake architectures, SASS recorded for build_info, PTX) from the status line."""
    match = re.search(r"cutlass_moe: CUDA architectures (\S+) \(recorded for build_info: "
                      r"SASS ([^;]*); PTX ([^)]*)\)", output)
    assert match, output
    return match.group(1), match.group(2), match.group(3)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """One build folder for the configure tests, so CMake probes the compiler once."""
    return tmp_path_factory.mktemp("cmake")


@needs_toolchain
def test_native_without_a_visible_gpu_fails_at_configure(tmp_path):
    """Without a GPU, nvcc's -arch=native would build sm_75 code only: configuring fails and
    names the fix."""
    result = configure(tmp_path, "native", hide_gpus=True)
    assert result.returncode != 0
    text = one_line(result.stdout)
    assert ("CUTLASS_MOE_CUDA_ARCHS=native builds for the GPUs visible while the build is "
            "configured, and CMake found none here") in text
    assert "CUTLASS_MOE_CUDA_ARCHS=80 (A100, A30;" in text
    assert "90 (H100, H200)" in text
    assert "CUDA architectures" not in text  # it stops before choosing any


@needs_toolchain
@pytest.mark.parametrize("archs,expected", [
    ("80;86;89;90", ("80-real;86-real;89-real;90-real", "80, 86, 89, 90", "none")),
    ("80; 90+PTX", ("80-real;90-real;90-virtual", "80, 90", "90")),
    ("90a;90-virtual", ("90a-real;90-virtual", "90a", "90")),
])
def test_arch_lists_are_recorded_as_numbers(build_dir, archs, expected):
    result = configure(build_dir, archs)
    assert recorded_archs(result.stdout) == expected


@needs_toolchain
def test_all_major_is_resolved_to_numbers_from_sm_80(build_dir):
    result = configure(build_dir, "all-major")
    cmake_archs, sass, ptx = recorded_archs(result.stdout)
    numbers = [int(re.match(r"\d+", a).group()) for a in cmake_archs.split(";")]
    assert min(numbers) == 80 and "80-real" in cmake_archs.split(";")
    assert sass.startswith("80, 90")
    assert ptx != "none" and "all" not in sass


@needs_toolchain
def test_configure_reports_counts_and_an_estimate(build_dir):
    text = one_line(configure(build_dir, "80").stdout)
    match = re.search(r"cutlass_moe: compiling (\d+) tactics in (\d+) generated files plus 6 "
                      r"other sources, for 1 arch target\(s\) \(80-real\)", text)
    assert match, text
    assert int(match.group(1)) >= int(match.group(2)) > 0
    assert re.search(r"estimated compile time: about \d+ (s|min) with \d+ parallel jobs "
                     r"\(about \d+ (s|min) on 2 cores, \d+ (s|min) on 16", text), text
    release = one_line(configure(build_dir, "80;86;89;90", fast=False).stdout)
    assert "for 4 arch target(s)" in release
    assert "for a quick build for one GPU, configure with CUTLASS_MOE_FAST_BUILD=ON" in release


@needs_toolchain
@pytest.mark.parametrize("archs,message", [
    ("75", "arch 75-real is older than sm_80"),
    ("80;sm_90", "cannot read arch 'sm_90'"),
    (";", "CUTLASS_MOE_CUDA_ARCHS is empty"),
])
def test_unusable_arch_lists_fail_at_configure(build_dir, archs, message):
    result = configure(build_dir, archs)
    assert result.returncode != 0
    assert message in one_line(result.stdout)


@needs_toolchain
@pytest.mark.gpu
def test_native_on_a_gpu_records_its_arch(tmp_path):
    """`native` becomes the visible GPU's number, so build_info and `cutlass-moe info` see a
    build with kernels for it."""
    major, minor = torch.cuda.get_device_capability(0)
    if 10 * major + minor < 80:
        pytest.skip("the GPU is older than sm_80")
    result = configure(tmp_path, "native")
    text = one_line(result.stdout)
    assert f"cutlass_moe: native = {major}{minor}-real" in text
    cmake_archs, sass, ptx = recorded_archs(text)
    assert f"{major}{minor}-real" in cmake_archs.split(";")
    assert f"{major}{minor}" in sass.split(", ") and ptx == "none"
    assert diagnostics.arch_support(major, minor, sass.split(", "), []) == "yes"


# ------------------------------------------------------------------------------------------
# What `info` makes of the recorded archs
# ------------------------------------------------------------------------------------------


def test_arch_support_of_resolved_native_builds():
    """A native build records numbers, so a GPU it was built on is "yes"."""
    assert diagnostics.arch_support(9, 0, ["90"]) == "yes"
    assert diagnostics.arch_support(8, 6, ["80", "86"]) == "yes"
    assert diagnostics.arch_support(8, 9, ["80"]) == "yes (sm_80 code)"


def test_arch_support_of_builds_that_recorded_a_name():
    """Builds made before `native` was resolved recorded the name: "unknown", never a wrong
    "no"."""
    answer = diagnostics.arch_support(9, 0, ["native"])
    assert answer.startswith("unknown (the build recorded its archs as native, not as numbers")
    assert diagnostics.arch_support(9, 0, ["90", "native"]) == "yes"
    assert diagnostics.arch_label("native") == "native"
    assert diagnostics.arch_label("90a") == "sm_90a"
    assert diagnostics.arch_label(90, "compute_") == "compute_90"
