"""The C++ kernel cores on every ISA path: ``tests/csrc/kernel_test.cc`` built and run per path.

The driver checks each kernel (CSR gather-dot and x-tiled, dense rows, block) against a naive
dense reference at awkward shapes and batches, with one and three threads.  Each x86-64 path
this CPU executes is built with the flags the library itself uses (``ffi.isa_flags``); a path
the CPU lacks is skipped with the reason.  The aarch64 NEON path is cross-compiled
(``aarch64-linux-gnu-g++``) and run under ``qemu-aarch64`` (Debian ``g++-aarch64-linux-gnu``,
``qemu-user``), natively on an aarch64 machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prunejax.sparse import ffi

CSRC = Path(ffi.__file__).parent / "csrc"
DRIVER = Path(__file__).parent / "csrc" / "kernel_test.cc"
X86_PATHS = ("scalar", "sse2", "avx2", "avx512")


def _build(cxx: str, flags: tuple[str, ...], out: Path, extra: tuple[str, ...] = ()) -> None:
    cmd = [cxx, *flags, "-pthread", f"-I{CSRC}", str(CSRC / "kernels.cc"), str(DRIVER)]
    proc = subprocess.run(
        [*cmd, "-o", str(out), *extra], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"


def _run(cmd: list[str]) -> str:
    """Run the driver; assert it passed a full set of checks; return the ISA it reports."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    first = out.splitlines()[0]
    m = re.search(r"checks=(\d+) failures=(\d+)", out)
    assert first.startswith("isa=") and m is not None, out[-2000:]
    assert int(m.group(2)) == 0 and int(m.group(1)) > 1000, m.group(0)
    return first.removeprefix("isa=")


def _compiler() -> str:
    cxx = ffi.find_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    return cxx


@pytest.mark.parametrize("name", X86_PATHS)
def test_x86_path(name: str, tmp_path: Path) -> None:
    if ffi.machine_arch() != "x86_64":
        pytest.skip(f"not an x86-64 CPU ({ffi.machine_arch()})")
    reason = ffi.supported_isas()[name]
    if reason:
        pytest.skip(f"{name} path: {reason}")
    exe = tmp_path / "kernel_test"
    _build(_compiler(), ffi.isa_flags(name), exe)
    assert _run([str(exe)]) == name


def test_native_path_is_the_best_this_cpu_runs(tmp_path: Path) -> None:
    exe = tmp_path / "kernel_test"
    _build(_compiler(), ffi.isa_flags("native"), exe)
    got = _run([str(exe)])
    paths = ffi.supported_isas()
    best = next((n for n in ("avx512", "avx2", "neon") if n in paths and not paths[n]), None)
    if best is not None:
        assert got == best
    else:
        assert got in ("avx", "sse2", "scalar")


def test_aarch64_neon_path(tmp_path: Path) -> None:
    exe = tmp_path / "kernel_test"
    flags = (*ffi.BASE_FLAGS, *ffi.ISA_FLAGS["aarch64"]["neon"])
    if ffi.machine_arch() == "aarch64":
        _build(_compiler(), flags, exe)
        assert _run([str(exe)]) == "neon"
        return
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip(
            "aarch64 path: needs aarch64-linux-gnu-g++ and qemu-aarch64 "
            "(Debian g++-aarch64-linux-gnu, qemu-user)"
        )
    _build(cxx, flags, exe, ("-static",))
    assert _run([qemu, str(exe)]) == "neon"


def test_prunejax_isa_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNEJAX_ISA", "mmx")
    with pytest.raises(ValueError, match="PRUNEJAX_ISA='mmx' is not an ISA path"):
        ffi.requested_isa()
    if ffi.machine_arch() == "x86_64":
        monkeypatch.setenv("PRUNEJAX_ISA", "avx512")
        monkeypatch.setattr(ffi, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2"}))
        with pytest.raises(ValueError, match="cannot run here: CPU lacks avx512f"):
            ffi.requested_isa()
        monkeypatch.setenv("PRUNEJAX_ISA", "AVX2 ")
        v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}
        monkeypatch.setattr(ffi, "cpu_flags", lambda: frozenset(v3))
        assert ffi.requested_isa() == "avx2"
    monkeypatch.delenv("PRUNEJAX_ISA")
    assert ffi.requested_isa() == "native"


def test_isa_flags_per_path() -> None:
    assert ffi.isa_flags("native")[-1] == "-march=native"
    if ffi.machine_arch() == "x86_64":
        assert "-march=x86-64-v3" in ffi.isa_flags("avx2")
        assert "-march=x86-64-v4" in ffi.isa_flags("avx512")
        assert "-DPRUNEJAX_NO_SIMD" in ffi.isa_flags("scalar")
    with pytest.raises(ValueError, match="no ISA path"):
        ffi.isa_flags("mmx")


def test_loaded_library_reports_its_path() -> None:
    if not ffi.available():
        pytest.skip(f"compiled kernels unavailable: {ffi.build_error()}")
    want = ffi.requested_isa()
    got = ffi.isa()
    if want == "native":
        assert got in ("avx512", "avx2", "avx", "sse2", "neon", "scalar")
    else:
        assert got == want
