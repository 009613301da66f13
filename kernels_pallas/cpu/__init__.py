"""Our C++ CPU kernels, called through XLA FFI (`jax.ffi`): built with the system's C++ compiler against the
FFI headers jaxlib ships, registered with XLA:CPU on first use.

`scripts/setup.sh` builds them (`python -m kernels_pallas.cpu.build`); a missing or stale build (the library's
name carries a hash of its sources and flags) is rebuilt on first use when a compiler is present, and is a clear
error naming the fix when not. The kernels target AVX2 + FMA + F16C, the x86-64 baseline of the machines we serve
on; where the CPU has AVX-512 (F, BW, VNNI) wider paths are picked at run time (functions compiled for those
targets, chosen by `__builtin_cpu_supports`), and an `isa` attribute of "avx2" pins the baseline in tests.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("qmatmul.cc", "matmul_f32.cc", "attention.cc", "zeros.cc")
HEADERS = ("common.h",)
CXXFLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared")
# FFI handler symbol -> the target name XLA knows it by.
TARGETS = {
    "JaxserveQMatmulInt8": "jaxserve_qmatmul_int8",
    "JaxserveQMatmulInt4": "jaxserve_qmatmul_int4",
    "JaxserveQMatmulMulti": "jaxserve_qmatmul_multi",
    "JaxserveMatmulF32": "jaxserve_matmul_f32",
    "JaxserveMatmulF32Multi": "jaxserve_matmul_f32_multi",
    "JaxserveMatmulF32NT": "jaxserve_matmul_f32_nt",
    "JaxserveRaggedPagedAttention": "jaxserve_ragged_paged_attention",
    "JaxserveLazyZeros": "jaxserve_lazy_zeros",
}
_lock = threading.Lock()


class CpuKernelsUnavailable(RuntimeError):
    """The C++ kernels cannot be built or loaded here (no compiler, no AVX2): run the jnp reference instead."""


def _build_id() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    h.update(" ".join(CXXFLAGS).encode())
    h.update(jax.ffi.include_dir().encode())
    return h.hexdigest()[:12]


def library_path() -> str:
    return os.path.join(HERE, "_build", f"libjaxserve_cpu-{_build_id()}.so")


def build(verbose: bool = False) -> str:
    """Compile the kernels (if this exact build is not there yet); returns the library's path."""
    path = library_path()
    if os.path.exists(path):
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise CpuKernelsUnavailable(
            "jaxserve's CPU kernels need a C++17 compiler (g++ or clang++) to build, and none is on PATH: install "
            "one (Debian/Ubuntu: apt-get install g++) and rerun `bash scripts/setup.sh`, or run the jnp reference "
            "kernels with attention_backend='reference' (--attention-backend reference)"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    cmd = [cxx, *CXXFLAGS, f"-I{jax.ffi.include_dir()}", *(os.path.join(HERE, s) for s in SOURCES), "-o", tmp]
    if verbose:
        print(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CpuKernelsUnavailable(f"building jaxserve's CPU kernels failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, path)  # atomic: a concurrent loader sees the whole library or none
    for old in os.listdir(os.path.dirname(path)):  # earlier builds of other sources
        if old.startswith("libjaxserve_cpu-") and old != os.path.basename(path) and old.endswith(".so"):
            os.remove(os.path.join(os.path.dirname(path), old))
    return path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux x86-64; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_supports_kernels() -> bool:
    """AVX2, FMA and F16C: what every kernel needs."""
    return {"avx2", "fma", "f16c"} <= cpu_flags()


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI (with F and BW): the quantized matmul's integer GEMM for many rows (picked at run time)."""
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


@functools.cache
def _load() -> None:
    if not cpu_supports_kernels():
        raise CpuKernelsUnavailable(
            "this CPU lacks AVX2/FMA/F16C, which jaxserve's CPU kernels need: run the jnp "
            "reference kernels with attention_backend='reference'"
        )
    lib = ctypes.cdll.LoadLibrary(build())
    for symbol, target in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def ensure_registered() -> None:
    """Build (if needed), load and register every CPU kernel with XLA; raises CpuKernelsUnavailable."""
    with _lock:
        _load()
