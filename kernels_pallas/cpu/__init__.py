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
SOURCES = ("qmatmul.cc", "matmul_f32.cc", "attention.cc", "zeros.cc", "dequant.cc")
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
def _library() -> ctypes.CDLL:
    if not cpu_supports_kernels():
        raise CpuKernelsUnavailable(
            "this CPU lacks AVX2/FMA/F16C, which jaxserve's CPU kernels need: run the jnp "
            "reference kernels with attention_backend='reference'"
        )
    return ctypes.cdll.LoadLibrary(build())


@functools.cache
def _load() -> None:
    lib = _library()
    for symbol, target in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def ensure_registered() -> None:
    """Build (if needed), load and register every CPU kernel with XLA; raises CpuKernelsUnavailable."""
    with _lock:
        _load()


DEQUANT_KINDS = {"F32": 0, "F16": 1, "Q8_0": 2, "Q4_0": 3, "Q4_1": 4}
_BYTES_PER_BLOCK = {"F32": 128, "F16": 64, "Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # per 32 values


def dequantize_gguf(data, kind: str, rows: int, cols: int, *, perm=None, transpose: bool = False, out=None):
    """A GGUF tensor's bytes (`kind` in DEQUANT_KINDS, row-major [rows, cols]) as f32 [rows, cols], or
    [cols, rows] with `transpose` (into `out` if given: a C-contiguous f32 array of that shape); `perm`: output
    row r reads source row perm[r]. One pass in C++ (dequant.cc); None where the library is not available here
    (the caller keeps its numpy path)."""
    import numpy as np

    try:
        with _lock:
            lib = _library()
    except CpuKernelsUnavailable:
        return None
    src = np.ascontiguousarray(data).view(np.uint8)
    if kind not in DEQUANT_KINDS or cols % 32 or src.nbytes != rows * (cols // 32) * _BYTES_PER_BLOCK[kind]:
        raise ValueError(f"dequantize_gguf: {src.nbytes} bytes are not {rows} x {cols} values of {kind}")
    shape = (cols, rows) if transpose else (rows, cols)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: need a C-contiguous float32 array of shape {shape}")
    p = None if perm is None else np.ascontiguousarray(perm, dtype=np.int64)
    if p is not None and (p.shape != (rows,) or p.min() < 0 or p.max() >= rows):
        raise ValueError(f"perm: need a permutation of {rows} rows")
    fn = lib.jaxserve_dequantize
    fn.restype = ctypes.c_int
    rc = fn(
        ctypes.c_void_p(src.ctypes.data),
        ctypes.c_int(DEQUANT_KINDS[kind]),
        ctypes.c_int64(rows),
        ctypes.c_int64(cols),
        None if p is None else ctypes.c_void_p(p.ctypes.data),
        ctypes.c_int(int(transpose)),
        ctypes.c_void_p(out.ctypes.data),
        ctypes.c_int(max(1, min(8, os.cpu_count() or 1))),
    )
    if rc != 0:
        raise ValueError(f"dequantize_gguf: bad kind {kind!r} or shape {rows} x {cols} (columns: a multiple of 32)")
    return out
