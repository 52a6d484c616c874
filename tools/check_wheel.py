#!/usr/bin/env python3
"""Checks a built cutlass_moe wheel for what it contains, and fails on surprises.

    python3 tools/check_wheel.py dist/*.whl --expect-archs 80,86,89,90 \\
        --expect-ptx 90 --max-size-mb 150 --expect-name cutlass-moe-cu12 --load

It unpacks the wheel into a temporary folder and reports its files and size, its metadata, the
shared libraries its ELF files need (``readelf -d``; ``auditwheel show`` when auditwheel is
installed) and the CUDA architectures embedded in the extension (``cuobjdump --list-elf`` and
``--list-ptx``). It fails (exit status 1, one line per problem) when:

- the metadata lacks a name or version, disagrees with the file name, or (``--expect-name``)
  names another distribution; RECORD is missing, incomplete or has a wrong hash or size;
- a package file is missing: every ``python/cutlass_moe/**/*.py`` of the source tree (or
  ``--source-package``), exactly one ``cutlass_moe/_C`` extension built for the wheel's Python,
  and the ``cutlass-moe`` console script in entry_points.txt;
- an ELF file needs libtorch, libc10, libpython, the shared CUDA runtime (libcudart.so: the
  runtime must be linked statically) or the driver (libcuda.so: the extension must import on a
  machine without one); or the wheel bundles libcuda (``auditwheel repair --exclude
  libcuda.so.1`` keeps it out), libcudart, libtorch or libc10;
- ``--expect-archs``: the SASS architectures differ from the list, or a translation unit lacks
  one of them; ``--expect-ptx``: the PTX architectures differ from the list. Either option
  fails when cuobjdump cannot be found (without them, that is only reported);
- the wheel is larger than ``--max-size-mb`` MiB;
- ``--load``: the extension does not import (in a child interpreter, with no GPU, driver or
  torch needed), or its ``build_info()`` disagrees with the metadata or the expected archs.

cuobjdump is looked for at ``--cuobjdump``, ``$CUOBJDUMP``, on PATH, next to nvcc, in
``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, /usr/local/cuda/bin, and in an installed
nvidia-cuda-cuobjdump package. Exit status: 0 all checks passed, 1 a check failed, 2 the wheel
could not be read.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import email.parser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PACKAGE = "cutlass_moe"
CONSOLE_SCRIPT = ("cutlass-moe", "cutlass_moe.cli:main")
#: The package's Python files when no source tree is at hand to list them.
CORE_PY_FILES = ("__init__.py", "__main__.py", "_ext.py", "_version.py", "cli.py", "ops.py")
DEFAULT_SOURCE_PACKAGE = Path(__file__).resolve().parents[1] / "python" / PACKAGE

#: NEEDED entries that must never appear, with the reason.
FORBIDDEN_NEEDED = (
    (re.compile(r"^libtorch"), "links libtorch (the extension must not depend on torch)"),
    (re.compile(r"^libc10"), "links libc10 (the extension must not depend on torch)"),
    (re.compile(r"^libcudart\.so"), "links the shared CUDA runtime (cudart must be static)"),
    (re.compile(r"^libcuda\.so"), ("links the driver library (the extension must import "
                                   "without a driver; cudart loads it at run time)")),
    (re.compile(r"^libpython"), "links libpython (extension modules must not)"),
)
#: Libraries that must not be bundled (auditwheel renames them to e.g. libcuda-1a2b3c4d.so.1).
FORBIDDEN_BUNDLED = (
    (re.compile(r"^libcuda[-.]"), ("bundles the driver library libcuda (it comes with the "
                                   "NVIDIA driver: repair with --exclude libcuda.so.1)")),
    (re.compile(r"^libcudart[-.]"), "bundles libcudart (cudart must be linked statically)"),
    (re.compile(r"^lib(torch|c10)"), "bundles a torch library"),
)

_CUBIN_RE = re.compile(r"^ELF file\s+\d+:\s+(?P<name>\S+?)\.sm_(?P<arch>\d+[a-z]?)\.cubin\s*$")
_PTX_RE = re.compile(r"^PTX file\s+\d+:\s+(?P<name>\S+?)\.sm_(?P<arch>\d+[a-z]?)\.ptx\s*$")
_NEEDED_RE = re.compile(r"\(NEEDED\)\s+Shared library:\s+\[(?P<lib>[^\]]+)\]")
_RPATH_RE = re.compile(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath):\s+\[(?P<p>[^\]]*)\]")
_WHEEL_NAME_RE = re.compile(
    r"^(?P<dist>[^-]+)-(?P<version>[^-]+)(?:-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)"
    r"-(?P<plat>[^-]+)\.whl$")


class WheelError(Exception):
    """The wheel cannot be read at all (exit status 2)."""


@dataclasses.dataclass
class Report:
    wheel: str
    size_bytes: int = 0
    name: str | None = None
    version: str | None = None
    tags: str | None = None
    files: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    extension: str | None = None
    needed: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    runpath: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    auditwheel: str | None = None
    cuobjdump: str | None = None
    sass_archs: list[str] | None = None
    ptx_archs: list[str] | None = None
    cubins: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    loaded: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, message: str) -> None:
        self.problems.append(message)


# ------------------------------------------------------------------------------------------
# Parsing tool output (pure functions)
# ------------------------------------------------------------------------------------------


def parse_needed(readelf_output: str) -> tuple[list[str], list[str]]:
    """The NEEDED libraries and the RUNPATH/RPATH entries of ``readelf -d`` output."""
    needed = [m["lib"] for m in map(_NEEDED_RE.search, readelf_output.splitlines()) if m]
    paths: list[str] = []
    for m in map(_RPATH_RE.search, readelf_output.splitlines()):
        if m:
            paths += [p for p in m["p"].split(":") if p]
    return needed, paths


def parse_cuobjdump(output: str, ptx: bool = False) -> dict[str, list[str]]:
    """``cuobjdump --list-elf`` (or ``--list-ptx``) output -> {translation unit: [archs]}."""
    pattern = _PTX_RE if ptx else _CUBIN_RE
    units: dict[str, list[str]] = {}
    for line in output.splitlines():
        m = pattern.match(line.strip())
        if m:
            units.setdefault(m["name"], [])
            if m["arch"] not in units[m["name"]]:
                units[m["name"]].append(m["arch"])
    return units


def parse_arch_list(text: str) -> list[str]:
    """``"80,86, sm_90"`` -> ``["80", "86", "90"]``; ``"none"`` -> ``[]`` (``argparse``
    type)."""
    if text.strip().lower() == "none":
        return []
    archs = []
    for part in re.split(r"[,;\s]+", text.strip()):
        if not part:
            continue
        arch = part.lower().removeprefix("sm_").removeprefix("compute_")
        if not re.fullmatch(r"\d+[a-z]?", arch):
            raise argparse.ArgumentTypeError(f"expected archs such as 80,86,89,90, got {text!r}")
        archs.append(arch)
    if not archs:
        raise argparse.ArgumentTypeError("expected at least one arch, or none")
    return archs


def _arch_key(arch: str) -> tuple[int, str]:
    digits = re.match(r"\d+", arch)
    return (int(digits.group()) if digits else 0, arch)


def normalize_name(name: str) -> str:
    """PEP 503 normalisation: ``Cutlass_MOE.cu12`` -> ``cutlass-moe-cu12``."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------------------------------
# Finding tools
# ------------------------------------------------------------------------------------------


def find_cuobjdump(explicit: str | None = None) -> str | None:
    """The first cuobjdump of: ``explicit``, $CUOBJDUMP, PATH, next to nvcc (its real location
    too, for wrapper scripts and symlinks), $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin,
    an installed nvidia-cuda-cuobjdump package (nvidia/*/bin/cuobjdump)."""
    if explicit:
        return explicit if _is_executable(explicit) else None
    candidates: list[str] = []
    if os.environ.get("CUOBJDUMP"):
        candidates.append(os.environ["CUOBJDUMP"])
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(on_path)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).parent / "cuobjdump"))
        candidates.append(str(Path(nvcc).resolve().parent / "cuobjdump"))
        candidates += _wrapped_nvcc_dirs(nvcc)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        if root and os.path.isdir(os.path.join(root, "nvidia")):
            candidates += sorted(str(p) for p in Path(root, "nvidia").glob("*/bin/cuobjdump"))
    return next((c for c in candidates if _is_executable(c)), None)


def _wrapped_nvcc_dirs(nvcc: str) -> list[str]:
    """For an ``nvcc`` that is a small shell script exec'ing the real one, that one's folder."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    found = re.findall(rb"(/[^\s\"']+)/nvcc\b", head)
    return [os.path.join(os.fsdecode(d), "cuobjdump") for d in found]


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _run(argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)


# ------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    expect_archs: list[str] | None = None
    expect_ptx: list[str] | None = None
    max_size_mb: float | None = None
    expect_name: str | None = None
    source_package: Path | None = None
    cuobjdump: str | None = None
    load: bool = False


def check_wheel(wheel: Path, options: Options) -> Report:
    """Every check of the module docstring; raises :class:`WheelError` for an unreadable
    wheel."""
    report = Report(wheel=str(wheel))
    if not wheel.is_file():
        raise WheelError(f"{wheel}: no such file")
    report.size_bytes = wheel.stat().st_size
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise WheelError(f"{wheel}: not a wheel (zip) file: {exc}") from None
    with archive, tempfile.TemporaryDirectory(prefix="check_wheel_") as tmp:
        root = Path(tmp)
        members = [i for i in archive.infolist() if not i.is_dir()]
        for info in members:
            if info.filename.startswith("/") or ".." in Path(info.filename).parts:
                raise WheelError(f"{wheel}: unsafe path {info.filename!r} in the archive")
        archive.extractall(root)
        report.files = sorted((i.filename, i.file_size) for i in members)
        _check_size(report, options)
        dist_info = _check_metadata(report, root, wheel.name, options)
        if dist_info is not None:
            _check_record(report, root, dist_info, [i.filename for i in members])
            _check_entry_points(report, root / dist_info)
        _check_package_files(report, root, options)
        _check_libraries(report, root)
        _auditwheel_show(report, wheel)
        if report.extension:
            _check_archs(report, root / report.extension, options)
            if options.load:
                _check_load(report, root, options)
        elif options.expect_archs is not None or options.expect_ptx is not None:
            report.fail("no extension to read the archs from")
    return report


def _check_size(report: Report, options: Options) -> None:
    if options.max_size_mb is not None and report.size_bytes > options.max_size_mb * 2**20:
        report.fail(f"the wheel is {report.size_bytes / 2**20:.1f} MiB, over the "
                    f"{options.max_size_mb:g} MiB budget")


def _check_metadata(report: Report, root: Path, filename: str, options: Options) -> str | None:
    m = _WHEEL_NAME_RE.match(filename)
    if not m:
        report.fail(f"the file name {filename!r} is not a wheel name "
                    "(name-version-python-abi-platform.whl)")
    else:
        report.tags = f"{m['py']}-{m['abi']}-{m['plat']}"
    dist_infos = sorted(p.name for p in root.glob("*.dist-info") if p.is_dir())
    if len(dist_infos) != 1:
        report.fail(f"expected one .dist-info folder, found {dist_infos or 'none'}")
        return None
    dist_info = dist_infos[0]
    metadata_path = root / dist_info / "METADATA"
    if not metadata_path.is_file():
        report.fail(f"{dist_info}/METADATA is missing")
        return dist_info
    metadata = email.parser.Parser().parsestr(metadata_path.read_text(encoding="utf-8"),
                                              headersonly=True)
    report.name, report.version = metadata.get("Name"), metadata.get("Version")
    if not report.name:
        report.fail("METADATA has no Name")
    if not report.version:
        report.fail("METADATA has no Version")
    if report.name and options.expect_name and \
            normalize_name(report.name) != normalize_name(options.expect_name):
        report.fail(f"METADATA names the distribution {report.name!r}, expected "
                    f"{options.expect_name!r}")
    if report.name and m and normalize_name(m["dist"]) != normalize_name(report.name):
        report.fail(f"the file name's distribution {m['dist']!r} is not METADATA's "
                    f"{report.name!r}")
    if report.version and m and m["version"] != report.version.replace("-", "_"):
        report.fail(f"the file name's version {m['version']!r} is not METADATA's "
                    f"{report.version!r}")
    expected_dir = f"{m['dist']}-{m['version']}.dist-info" if m else None
    if expected_dir and dist_info != expected_dir:
        report.fail(f"the metadata folder is {dist_info}, expected {expected_dir}")
    return dist_info


def _check_record(report: Report, root: Path, dist_info: str, names: Iterable[str]) -> None:
    record_name = f"{dist_info}/RECORD"
    record_path = root / record_name
    if not record_path.is_file():
        report.fail(f"{record_name} is missing")
        return
    listed: dict[str, tuple[str, str]] = {}
    for row in csv.reader(io.StringIO(record_path.read_text(encoding="utf-8"))):
        if row:
            listed[row[0]] = (row[1] if len(row) > 1 else "", row[2] if len(row) > 2 else "")
    for name in names:
        if name == record_name or name.endswith((".dist-info/RECORD.jws",
                                                 ".dist-info/RECORD.p7s")):
            continue
        if name not in listed:
            report.fail(f"{name} is not listed in RECORD")
            continue
        digest, size = listed[name]
        data = (root / name).read_bytes()
        if size and size != str(len(data)):
            report.fail(f"RECORD gives {name} {size} bytes, it has {len(data)}")
        algorithm, _, expected = digest.partition("=")
        if algorithm not in hashlib.algorithms_guaranteed or algorithm in ("md5", "sha1"):
            report.fail(f"RECORD has no usable hash for {name} ({digest or 'none'})")
            continue
        actual = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest()).rstrip(b"=")
        if actual.decode() != expected:
            report.fail(f"RECORD's {algorithm} hash of {name} does not match its content")
    for name in listed:
        if name not in names and not name.endswith("/"):
            report.fail(f"RECORD lists {name}, which is not in the wheel")


def _check_entry_points(report: Report, dist_info: Path) -> None:
    path = dist_info / "entry_points.txt"
    if not path.is_file():
        report.fail(f"{dist_info.name}/entry_points.txt is missing (no `{CONSOLE_SCRIPT[0]}` "
                    "command)")
        return
    section, scripts = None, {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif "=" in line and section == "console_scripts":
            key, value = (x.strip() for x in line.split("=", 1))
            scripts[key] = value
    name, target = CONSOLE_SCRIPT
    if scripts.get(name) != target:
        report.fail(f"entry_points.txt has no console script `{name} = {target}` "
                    f"(console scripts: {scripts or 'none'})")


def _check_package_files(report: Report, root: Path, options: Options) -> None:
    source = options.source_package
    if source is None and DEFAULT_SOURCE_PACKAGE.is_dir():
        source = DEFAULT_SOURCE_PACKAGE
    # Subpackages (integrations/) count too: a wheel that drops a folder must fail.
    expected = (sorted(p.relative_to(source).as_posix() for p in source.rglob("*.py")
                       if "__pycache__" not in p.parts) if source is not None
                else list(CORE_PY_FILES))
    if source is None:
        report.notes.append("no source tree beside this tool: checked the core Python files "
                            "only")
    for name in expected:
        if not (root / PACKAGE / name).is_file():
            report.fail(f"{PACKAGE}/{name} is missing")
    extensions = sorted(str(p.relative_to(root)) for p in (root / PACKAGE).glob("_C.*")
                        if p.suffix in (".so", ".pyd"))
    if not extensions:
        report.fail(f"the compiled extension {PACKAGE}/_C is missing")
        return
    if len(extensions) > 1:
        report.fail(f"more than one compiled extension: {', '.join(extensions)}")
    report.extension = extensions[0]
    py_tag = (report.tags or "").split("-")[0]
    m = re.fullmatch(r"cp(\d)(\d+)", py_tag)
    suffix = Path(report.extension).name
    if m and ".abi3." not in suffix and f".cpython-{m[1]}{m[2]}" not in suffix:
        report.fail(f"{report.extension} is not built for the wheel's Python tag {py_tag}")


def _elf_files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".so" in path.name:
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _check_libraries(report: Report, root: Path) -> None:
    elves = _elf_files(root)
    for path in elves:
        rel = str(path.relative_to(root))
        for pattern, why in FORBIDDEN_BUNDLED:
            if pattern.match(path.name) and rel != report.extension:
                report.fail(f"the wheel {why}: {rel}")
    readelf = shutil.which("readelf")
    if readelf is None:
        report.fail("readelf is not available: cannot check the libraries the extension needs")
        return
    for path in elves:
        rel = str(path.relative_to(root))
        result = _run([readelf, "-d", "-W", str(path)])
        if result.returncode != 0:
            report.fail(f"readelf -d {rel} failed: {result.stderr.strip()}")
            continue
        needed, runpath = parse_needed(result.stdout)
        report.needed[rel] = needed
        if runpath:
            report.runpath[rel] = runpath
        for lib in needed:
            for pattern, why in FORBIDDEN_NEEDED:
                if pattern.match(lib):
                    report.fail(f"{rel} {why}: NEEDED {lib}")


def _auditwheel_show(report: Report, wheel: Path) -> None:
    auditwheel = shutil.which("auditwheel")
    if auditwheel is None:
        report.auditwheel = None
        return
    result = _run([auditwheel, "show", str(wheel)])
    report.auditwheel = (result.stdout + result.stderr).strip()


def _check_archs(report: Report, extension: Path, options: Options) -> None:
    tool = find_cuobjdump(options.cuobjdump)
    if tool is None:
        message = ("cuobjdump unavailable" +
                   (f" at {options.cuobjdump}" if options.cuobjdump else
                    " (install the CUDA toolkit's cuobjdump, or pip install "
                    "nvidia-cuda-cuobjdump, or pass --cuobjdump)"))
        if options.expect_archs is not None or options.expect_ptx is not None:
            report.fail(f"{message}: cannot check the expected archs")
        else:
            report.notes.append(f"{message}: archs not checked")
        return
    report.cuobjdump = tool
    listings = {}
    for flag in ("--list-elf", "--list-ptx"):
        result = _run([tool, flag, str(extension)])
        text = result.stdout + result.stderr
        if result.returncode != 0 and "does not contain device code" not in text:
            report.fail(f"cuobjdump {flag} failed ({result.returncode}): {text.strip()}")
            return
        listings[flag] = text
    report.cubins = parse_cuobjdump(listings["--list-elf"])
    ptx_units = parse_cuobjdump(listings["--list-ptx"], ptx=True)
    report.sass_archs = sorted({a for archs in report.cubins.values() for a in archs},
                               key=_arch_key)
    report.ptx_archs = sorted({a for archs in ptx_units.values() for a in archs}, key=_arch_key)
    if not report.cubins and not ptx_units:
        report.fail(f"{report.extension} contains no device code")
    if options.expect_archs is not None:
        expected = set(options.expect_archs)
        have = set(report.sass_archs)
        if have != expected:
            missing = sorted(expected - have, key=_arch_key)
            extra = sorted(have - expected, key=_arch_key)
            parts = ([f"missing sm_{', sm_'.join(missing)}"] if missing else []) + \
                    ([f"unexpected sm_{', sm_'.join(extra)}"] if extra else [])
            report.fail(f"SASS archs are {_arch_text(report.sass_archs, 'sm')}, expected "
                        f"{_arch_text(options.expect_archs, 'sm')}: {'; '.join(parts)}")
        for unit, archs in sorted(report.cubins.items()):
            lacking = sorted((expected & have) - set(archs), key=_arch_key)
            if lacking:
                report.fail(f"{unit} has no SASS for sm_{', sm_'.join(lacking)}")
    if options.expect_ptx is not None and set(report.ptx_archs) != set(options.expect_ptx):
        report.fail(f"PTX archs are {_arch_text(report.ptx_archs, 'compute')}, expected "
                    f"{_arch_text(options.expect_ptx, 'compute')}")


def _arch_text(archs: Sequence[str], prefix: str) -> str:
    return ", ".join(f"{prefix}_{a}" for a in archs) if archs else "none"


_LOAD_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("cutlass_moe._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
query = getattr(module, "driver_cuda_version", None)
try:
    driver = query() if query else None
except Exception as exc:  # reported, not fatal: the import is what is checked
    driver = f"error: {exc}"
print(json.dumps({"build_info": info, "driver_cuda_version": driver}, default=str))
"""


def _check_load(report: Report, root: Path, options: Options) -> None:
    py_tag = (report.tags or "").split("-")[0]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if py_tag != here and ".abi3." not in (report.extension or ""):
        report.notes.append(f"--load skipped: the wheel is for {py_tag}, this Python is {here}")
        return
    result = _run([sys.executable, "-c", _LOAD_SCRIPT, str(root / report.extension)])
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        report.fail(f"importing {report.extension} failed: "
                    f"{output[-1] if output else f'exit status {result.returncode}'}")
        return
    try:
        loaded = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report.fail(f"importing {report.extension} printed no build info: {result.stdout!r}")
        return
    report.loaded = loaded
    info = loaded.get("build_info") or {}
    if report.version and info.get("version") != report.version:
        report.fail(f"build_info() version {info.get('version')!r} is not METADATA's "
                    f"{report.version!r}")
    if options.expect_archs is not None and \
            [str(a) for a in info.get("archs", [])] != list(options.expect_archs):
        report.fail(f"build_info() archs {info.get('archs')} are not the expected "
                    f"{options.expect_archs}")
    if options.expect_ptx is not None and \
            [str(a) for a in info.get("ptx_archs", [])] != list(options.expect_ptx):
        report.fail(f"build_info() ptx_archs {info.get('ptx_archs')} are not the expected "
                    f"{options.expect_ptx}")


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_report(report: Report, options: Options) -> str:
    lines = [f"wheel: {report.wheel}"]

    def field(key: str, value: Any) -> None:
        lines.append(f"  {key + ':':<13} {value}")

    budget = f" (budget {options.max_size_mb:g} MiB)" if options.max_size_mb is not None else ""
    field("size", f"{_size(report.size_bytes)}{budget}")
    field("distribution", f"{report.name or '?'} {report.version or '?'}")
    field("tags", report.tags or "?")
    unpacked = sum(size for _, size in report.files)
    field("files", f"{len(report.files)}, {_size(unpacked)} unpacked")
    for name, size in report.files:
        lines.append(f"    {_size(size):>11}  {name}")
    field("extension", report.extension or "none")
    for rel, needed in report.needed.items():
        field("NEEDED", f"{rel}: {', '.join(needed) or 'nothing'}")
        if rel in report.runpath:
            field("RUNPATH", f"{rel}: {':'.join(report.runpath[rel])}")
    if report.auditwheel is None:
        field("auditwheel", "unavailable")
    else:
        field("auditwheel", "")
        lines += ["    " + line for line in report.auditwheel.splitlines() if line.strip()]
    if report.sass_archs is not None:
        field("cuobjdump", report.cuobjdump)
        field("SASS", f"{_arch_text(report.sass_archs, 'sm')} "
                      f"({sum(len(a) for a in report.cubins.values())} cubins in "
                      f"{len(report.cubins)} translation units)")
        field("PTX", _arch_text(report.ptx_archs or [], "compute"))
    if report.loaded is not None:
        info = report.loaded.get("build_info") or {}
        field("loads", f"yes: build_info() version {info.get('version')}, CUDA "
                       f"{info.get('cuda_version')}, archs {info.get('archs')}, ptx "
                       f"{info.get('ptx_archs')}; driver_cuda_version() = "
                       f"{report.loaded.get('driver_cuda_version')}")
    for note in report.notes:
        field("note", note)
    if report.ok:
        lines.append("result: OK")
    else:
        lines.append(f"result: FAILED ({len(report.problems)} problem"
                     f"{'s' if len(report.problems) != 1 else ''})")
        lines += [f"  - {problem}" for problem in report.problems]
    return "\n".join(lines)


def report_json(report: Report) -> dict[str, Any]:
    document = dataclasses.asdict(report)
    document["files"] = [{"name": n, "size": s} for n, s in report.files]
    document["ok"] = report.ok
    return document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check_wheel.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+", type=Path, metavar="WHEEL")
    parser.add_argument("--expect-archs", type=parse_arch_list, metavar="LIST",
                        help="SASS archs the extension must hold exactly, e.g. 80,86,89,90")
    parser.add_argument("--expect-ptx", type=parse_arch_list, metavar="LIST",
                        help="PTX archs the extension must hold exactly, e.g. 90 (none: no PTX)")
    parser.add_argument("--max-size-mb", type=float, metavar="MIB",
                        help="fail when a wheel is larger (MiB, 2**20 bytes)")
    parser.add_argument("--expect-name", metavar="NAME",
                        help="the distribution name METADATA must give, e.g. cutlass-moe-cu12")
    parser.add_argument("--source-package", type=Path, metavar="DIR",
                        help="the folder whose *.py files the wheel must hold "
                             f"(default: python/{PACKAGE} beside this tool)")
    parser.add_argument("--cuobjdump", metavar="PATH", help="the cuobjdump to use")
    parser.add_argument("--load", action="store_true",
                        help="import the extension in a child interpreter (when the wheel is "
                             "for this Python) and compare its build_info()")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(expect_archs=args.expect_archs, expect_ptx=args.expect_ptx,
                      max_size_mb=args.max_size_mb, expect_name=args.expect_name,
                      source_package=args.source_package, cuobjdump=args.cuobjdump,
                      load=args.load)
    status = 0
    documents = []
    for wheel in args.wheels:
        try:
            report = check_wheel(wheel, options)
        except WheelError as exc:
            print(f"check_wheel: error: {exc}", file=sys.stderr)
            status = max(status, 2)
            continue
        if not report.ok:
            status = max(status, 1)
        if args.json:
            documents.append(report_json(report))
        else:
            print(format_report(report, options))
    if args.json:
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
