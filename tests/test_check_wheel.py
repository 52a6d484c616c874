"""tools/check_wheel.py on small synthetic wheels (CPU only, no project build).

Each wheel is a zip with real METADATA, RECORD (hashes) and entry points, the package's *.py
names, and an extension compiled here with gcc: linked against dummy libraries named like
libtorch_cpu.so or libcudart.so.12 where a test needs such a NEEDED entry. A shell script stands
in for cuobjdump, printing the listing a test asks for.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "tools" / "check_wheel.py")
check_wheel = importlib.util.module_from_spec(_spec)
sys.modules["check_wheel"] = check_wheel  # dataclasses look their module up by name
_spec.loader.exec_module(check_wheel)

PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
TAGS = f"{PY_TAG}-{PY_TAG}-linux_x86_64"
PACKAGE_PY = sorted(p.relative_to(ROOT / "python" / "cutlass_moe").as_posix()
                    for p in (ROOT / "python" / "cutlass_moe").rglob("*.py")
                    if "__pycache__" not in p.parts)

needs_toolchain = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("readelf") is None,
    reason="needs gcc and readelf")

LOADABLE_EXTENSION = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject* build_info(PyObject* self, PyObject* args) {
  return Py_BuildValue("{s:s,s:s,s:[s,s],s:[s]}", "version", VERSION, "cuda_version", "12.8",
                       "archs", "80", "90", "ptx_archs", "90");
}
static PyObject* driver_cuda_version(PyObject* self, PyObject* args) {
  return PyLong_FromLong(0);
}
static PyMethodDef methods[] = {
  {"build_info", build_info, METH_NOARGS, ""},
  {"driver_cuda_version", driver_cuda_version, METH_NOARGS, ""},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
"""


def _gcc(*args: str) -> None:
    subprocess.run(["gcc", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """Compiled once: a plain extension, dummy libraries, and extensions that need them."""
    d = tmp_path_factory.mktemp("libs")
    if shutil.which("gcc") is None or shutil.which("readelf") is None:
        pytest.skip("needs gcc and readelf")
    (d / "ext.c").write_text("int cutlass_moe_probe(void) { return 42; }\n")
    (d / "dummy.c").write_text("int dummy_symbol(void) { return 1; }\n")
    out = {"plain": d / "plain.so"}
    _gcc("-shared", "-fPIC", "-o", str(out["plain"]), str(d / "ext.c"), "-Wl,--no-as-needed",
         "-lm")
    for key, soname, link in [("torch", "libtorch_cpu.so", "torch_cpu"),
                              ("cudart", "libcudart.so.12", "cudart"),
                              ("cuda", "libcuda.so.1", "cuda"),
                              ("c10", "libc10.so", "c10")]:
        # the file name the linker looks for (-lNAME -> libNAME.so), with the soname it records
        _gcc("-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(d / f"lib{link}.so"),
             str(d / "dummy.c"))
        out[key] = d / f"ext_{key}.so"
        _gcc("-shared", "-fPIC", "-o", str(out[key]), str(d / "ext.c"), f"-L{d}",
             "-Wl,--no-as-needed", f"-l{link}")
    include = sysconfig.get_paths()["include"]
    if os.path.isfile(os.path.join(include, "Python.h")):
        (d / "loadable.c").write_text(LOADABLE_EXTENSION)
        out["loadable"] = d / "loadable.so"
        _gcc("-shared", "-fPIC", f"-I{include}", '-DVERSION="0.1.0"', "-o",
             str(out["loadable"]), str(d / "loadable.c"))
    return out


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_wheel(directory: Path, extension: Path | None, *, name: str = "cutlass-moe",
               version: str = "0.1.0", tags: str = TAGS, drop: tuple[str, ...] = (),
               extra: dict[str, bytes] | None = None, metadata: str | None = None,
               entry_points: str | None = None, tamper: str | None = None,
               ext_name: str | None = None) -> Path:
    """A wheel of the package's *.py files (empty), ``extension`` as cutlass_moe/_C, and
    ``extra`` files; ``drop`` leaves files out, ``tamper`` changes a file after RECORD."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {f"cutlass_moe/{py}": b"# synthetic\n" for py in PACKAGE_PY}
    if extension is not None:
        files[f"cutlass_moe/{ext_name or '_C' + EXT_SUFFIX}"] = extension.read_bytes()
    files.update(extra or {})
    files[f"{info}/METADATA"] = (metadata if metadata is not None else
                                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 ).encode()
    files[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                              f"Tag: {tags}\n").encode()
    files[f"{info}/entry_points.txt"] = (
        entry_points if entry_points is not None else
        "[console_scripts]\ncutlass-moe = cutlass_moe.cli:main\n").encode()
    for key in drop:
        files.pop(key if "/" in key else f"cutlass_moe/{key}", None)
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    if tamper:
        files[tamper] = files[tamper] + b"# changed after RECORD\n"
    wheel = directory / f"{dist}-{version}-{tags}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def fake_cuobjdump(directory: Path, elf: list[str], ptx: list[str]) -> str:
    """A cuobjdump stand-in printing ``elf`` / ``ptx`` entries ("unit.sm_80")."""
    script = directory / "cuobjdump"
    elf_lines = "".join(f"echo 'ELF file {i + 1}: {e}.cubin'\n" for i, e in enumerate(elf))
    ptx_lines = "".join(f"echo 'PTX file {i + 1}: {p}.ptx'\n" for i, p in enumerate(ptx))
    if not ptx:
        ptx_lines = "echo \"cuobjdump info    : No PTX file found to extract from '$2'.\"\n"
    script.write_text("#!/bin/sh\n"
                      'case "$1" in\n'
                      f"  --list-elf)\n{elf_lines}    ;;\n"
                      f"  --list-ptx)\n{ptx_lines}    ;;\n"
                      "esac\n")
    script.chmod(0o755)
    return str(script)


GOOD_ELF = ["runner.sm_80", "runner.sm_90", "gemm_0.sm_80", "gemm_0.sm_90"]
GOOD_PTX = ["runner.sm_90", "gemm_0.sm_90"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = check_wheel.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ------------------------------------------------------------------------------------------
# Happy path
# ------------------------------------------------------------------------------------------


@needs_toolchain
def test_good_wheel_passes(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])
    tool = fake_cuobjdump(tmp_path, GOOD_ELF, GOOD_PTX)
    status, out, err = run(capsys, wheel, "--expect-archs", "80,90", "--expect-ptx", "90",
                           "--max-size-mb", "1", "--expect-name", "cutlass-moe",
                           "--cuobjdump", tool)
    assert status == 0, out
    assert err == ""
    assert out.rstrip().endswith("result: OK")
    assert "distribution: cutlass-moe 0.1.0" in out
    assert f"NEEDED:       cutlass_moe/_C{EXT_SUFFIX}: libm.so.6" in out
    assert "SASS:         sm_80, sm_90 (4 cubins in 2 translation units)" in out
    assert "PTX:          compute_90" in out
    assert "cutlass_moe/cli.py" in out


@needs_toolchain
def test_renamed_distribution_passes(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"], name="cutlass-moe-cu12")
    assert wheel.name.startswith("cutlass_moe_cu12-0.1.0-")
    status, out, _ = run(capsys, wheel, "--expect-name", "cutlass-moe-cu12",
                         "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, []))
    assert status == 0, out
    assert "distribution: cutlass-moe-cu12 0.1.0" in out


@needs_toolchain
def test_json_report(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["torch"])
    status, out, _ = run(capsys, wheel, "--json",
                         "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, GOOD_PTX))
    assert status == 1
    document = json.loads(out)
    assert document["ok"] is False
    assert document["sass_archs"] == ["80", "90"] and document["ptx_archs"] == ["90"]
    assert "libtorch_cpu.so" in document["needed"][f"cutlass_moe/_C{EXT_SUFFIX}"]
    assert any("libtorch" in p for p in document["problems"])
    assert {"name": "cutlass_moe/cli.py", "size": len(b"# synthetic\n")} in document["files"]


# ------------------------------------------------------------------------------------------
# Each surprise fails
# ------------------------------------------------------------------------------------------


@needs_toolchain
@pytest.mark.parametrize("lib, words", [
    ("torch", "links libtorch (the extension must not depend on torch): NEEDED libtorch_cpu.so"),
    ("c10", "links libc10"),
    ("cudart", "links the shared CUDA runtime (cudart must be static): NEEDED libcudart.so.12"),
    ("cuda", "links the driver library"),
])
def test_forbidden_needed_fails(capsys, libs, tmp_path, lib, words):
    wheel = make_wheel(tmp_path, libs[lib])
    status, out, _ = run(capsys, wheel, "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, []))
    assert status == 1
    assert "result: FAILED (1 problem)" in out
    assert words in out


@needs_toolchain
@pytest.mark.parametrize("bundled, words", [
    ("cutlass_moe.libs/libcuda-1a2b3c4d.so.1", "bundles the driver library libcuda"),
    ("cutlass_moe.libs/libcudart-5e6f7a8b.so.12", "bundles libcudart"),
    ("cutlass_moe.libs/libtorch_cpu-0a0b0c0d.so", "bundles a torch library"),
])
def test_bundled_library_fails(capsys, libs, tmp_path, bundled, words):
    wheel = make_wheel(tmp_path, libs["plain"], extra={bundled: libs["plain"].read_bytes()})
    status, out, _ = run(capsys, wheel, "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, []))
    assert status == 1
    assert words in out and bundled in out


@needs_toolchain
def test_missing_arch_fails(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])
    tool = fake_cuobjdump(tmp_path, ["runner.sm_80", "gemm_0.sm_80"], [])
    status, out, _ = run(capsys, wheel, "--expect-archs", "80,86", "--cuobjdump", tool)
    assert status == 1
    assert "SASS archs are sm_80, expected sm_80, sm_86: missing sm_86" in out


@needs_toolchain
def test_unexpected_arch_and_incomplete_unit_fail(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])
    tool = fake_cuobjdump(tmp_path, ["runner.sm_80", "runner.sm_90", "gemm_0.sm_80"], [])
    status, out, _ = run(capsys, wheel, "--expect-archs", "80", "--cuobjdump", tool)
    assert status == 1
    assert "unexpected sm_90" in out
    status, out, _ = run(capsys, wheel, "--expect-archs", "80,90", "--cuobjdump", tool)
    assert status == 1
    assert "gemm_0 has no SASS for sm_90" in out


@needs_toolchain
def test_ptx_mismatch_fails(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])
    tool = fake_cuobjdump(tmp_path, GOOD_ELF, [])
    status, out, _ = run(capsys, wheel, "--expect-ptx", "90", "--cuobjdump", tool)
    assert status == 1
    assert "PTX archs are none, expected compute_90" in out
    assert run(capsys, wheel, "--expect-ptx", "none", "--cuobjdump", tool)[0] == 0
    tool = fake_cuobjdump(tmp_path, GOOD_ELF, GOOD_PTX)
    status, out, _ = run(capsys, wheel, "--expect-ptx", "none", "--cuobjdump", tool)
    assert status == 1
    assert "PTX archs are compute_90, expected none" in out


@needs_toolchain
def test_no_device_code_fails(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])
    status, out, _ = run(capsys, wheel, "--cuobjdump", fake_cuobjdump(tmp_path, [], []))
    assert status == 1
    assert "contains no device code" in out


@needs_toolchain
def test_size_over_budget_fails(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])
    status, out, _ = run(capsys, wheel, "--max-size-mb", "0.001",
                         "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, []))
    assert status == 1
    assert "MiB, over the 0.001 MiB budget" in out


@needs_toolchain
@pytest.mark.parametrize("kwargs, words", [
    ({"drop": ("cli.py",)}, "cutlass_moe/cli.py is missing"),
    ({"drop": ("__init__.py",)}, "cutlass_moe/__init__.py is missing"),
    ({"drop": ("cutlass_moe/integrations/transformers.py",)},
     "cutlass_moe/integrations/transformers.py is missing"),
    ({"entry_points": "[console_scripts]\nother = x:y\n"},
     "entry_points.txt has no console script `cutlass-moe = cutlass_moe.cli:main`"),
    ({"drop": ("cutlass_moe-0.1.0.dist-info/entry_points.txt",)}, "entry_points.txt is missing"),
    ({"metadata": "Metadata-Version: 2.1\nVersion: 0.1.0\n"}, "METADATA has no Name"),
    ({"metadata": "Metadata-Version: 2.1\nName: cutlass-moe\n"}, "METADATA has no Version"),
    ({"metadata": "Metadata-Version: 2.1\nName: cutlass-moe\nVersion: 0.2.0\n"},
     "the file name's version '0.1.0' is not METADATA's '0.2.0'"),
    ({"tamper": "cutlass_moe/ops.py"}, "hash of cutlass_moe/ops.py does not match"),
    ({"ext_name": "_C.cpython-39-x86_64-linux-gnu.so"},
     f"is not built for the wheel's Python tag {PY_TAG}"),
])
def test_package_problems_fail(capsys, libs, tmp_path, kwargs, words):
    wheel = make_wheel(tmp_path, libs["plain"], **kwargs)
    status, out, _ = run(capsys, wheel, "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, []))
    assert status == 1
    assert words in out


@needs_toolchain
def test_missing_extension_fails(capsys, tmp_path):
    wheel = make_wheel(tmp_path, None)
    status, out, _ = run(capsys, wheel, "--expect-archs", "80")
    assert status == 1
    assert "the compiled extension cutlass_moe/_C is missing" in out
    assert "no extension to read the archs from" in out


@needs_toolchain
def test_wrong_distribution_name_fails(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"], name="cutlass-moe")
    status, out, _ = run(capsys, wheel, "--expect-name", "cutlass-moe-cu13",
                         "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, []))
    assert status == 1
    assert "METADATA names the distribution 'cutlass-moe', expected 'cutlass-moe-cu13'" in out


@needs_toolchain
def test_cuobjdump_unavailable(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])
    missing = str(tmp_path / "no-such-cuobjdump")
    status, out, _ = run(capsys, wheel, "--cuobjdump", missing)
    assert status == 0  # reported, not a failure, when no archs were asked for
    assert "cuobjdump unavailable" in out and "archs not checked" in out
    status, out, _ = run(capsys, wheel, "--cuobjdump", missing, "--expect-archs", "80")
    assert status == 1
    assert "cuobjdump unavailable" in out and "cannot check the expected archs" in out


def test_unreadable_wheel(capsys, tmp_path):
    bad = tmp_path / "cutlass_moe-0.1.0-cp311-cp311-linux_x86_64.whl"
    bad.write_text("not a zip")
    status, _, err = run(capsys, bad)
    assert status == 2 and "not a wheel (zip) file" in err
    status, _, err = run(capsys, tmp_path / "missing.whl")
    assert status == 2 and "no such file" in err


# ------------------------------------------------------------------------------------------
# --load: the extension imports in a child interpreter
# ------------------------------------------------------------------------------------------


@needs_toolchain
def test_load_checks_build_info(capsys, libs, tmp_path):
    if "loadable" not in libs:
        pytest.skip("no Python.h to compile a test extension")
    wheel = make_wheel(tmp_path, libs["loadable"])
    tool = fake_cuobjdump(tmp_path, GOOD_ELF, GOOD_PTX)
    status, out, _ = run(capsys, wheel, "--load", "--expect-archs", "80,90", "--expect-ptx",
                         "90", "--cuobjdump", tool)
    assert status == 0, out
    assert "loads:        yes: build_info() version 0.1.0, CUDA 12.8" in out
    assert "driver_cuda_version() = 0" in out
    other = tmp_path / "other"
    other.mkdir()
    wheel = make_wheel(other, libs["loadable"], version="0.2.0")
    status, out, _ = run(capsys, wheel, "--load", "--cuobjdump", tool)
    assert status == 1
    assert "build_info() version '0.1.0' is not METADATA's '0.2.0'" in out


@needs_toolchain
def test_load_failure_is_reported(capsys, libs, tmp_path):
    wheel = make_wheel(tmp_path, libs["plain"])  # no PyInit__C: the import fails
    status, out, _ = run(capsys, wheel, "--load",
                         "--cuobjdump", fake_cuobjdump(tmp_path, GOOD_ELF, []))
    assert status == 1
    assert f"importing cutlass_moe/_C{EXT_SUFFIX} failed" in out


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def test_parse_needed():
    text = """
Dynamic section at offset 0x2d9e0 contains 30 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [librt.so.1]
 0x0000000000000001 (NEEDED)             Shared library: [libstdc++.so.6]
 0x000000000000001d (RUNPATH)            Library runpath: [$ORIGIN/../cutlass_moe.libs:/x]
"""
    assert check_wheel.parse_needed(text) == (["librt.so.1", "libstdc++.so.6"],
                                              ["$ORIGIN/../cutlass_moe.libs", "/x"])


def test_parse_cuobjdump():
    elf = ("ELF file    1: runner.sm_80.cubin\nELF file    2: runner.sm_90a.cubin\n"
           "ELF file    3: sm80_grouped_gemm_bf16_0.sm_80.cubin\n")
    assert check_wheel.parse_cuobjdump(elf) == {"runner": ["80", "90a"],
                                                "sm80_grouped_gemm_bf16_0": ["80"]}
    assert check_wheel.parse_cuobjdump("PTX file    1: runner.sm_90.ptx\n", ptx=True) == {
        "runner": ["90"]}
    assert check_wheel.parse_cuobjdump("cuobjdump info    : No PTX file found", ptx=True) == {}


def test_parse_arch_list():
    assert check_wheel.parse_arch_list("80,86, sm_89;90") == ["80", "86", "89", "90"]
    assert check_wheel.parse_arch_list("compute_90") == ["90"]
    assert check_wheel.parse_arch_list("none") == []
    with pytest.raises(Exception, match="expected archs"):
        check_wheel.parse_arch_list("80,ampere")


def test_find_cuobjdump(tmp_path, monkeypatch):
    tool = tmp_path / "bin" / "cuobjdump"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("CUOBJDUMP", str(tool))
    assert check_wheel.find_cuobjdump() == str(tool)
    assert check_wheel.find_cuobjdump(str(tmp_path / "nope")) is None
    # next to the real nvcc behind a wrapper script on PATH (as /usr/local/bin/nvcc often is)
    monkeypatch.delenv("CUOBJDUMP")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    (wrappers / "nvcc").write_text(f"#!/bin/sh\nexec {tool.parent}/nvcc \"$@\"\n")
    (wrappers / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(wrappers))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert check_wheel.find_cuobjdump() == str(tool)


def test_normalize_name():
    assert check_wheel.normalize_name("Cutlass_MOE.cu12") == "cutlass-moe-cu12"
