"""Which implementation a kernel call uses."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "reference", "pallas_tpu", "pallas_gpu", "cpu")


def resolve_backend(backend: str) -> str:
    """ "auto" picks the Pallas kernels of the default device's platform, or our C++ kernels (kernels_pallas/cpu,
    through XLA FFI) on a CPU with AVX2/FMA/F16C (the jnp reference on one without); "reference" is the pure-jnp
    oracle everywhere. A kernel without a version for the chosen backend runs its reference (the KV write has no
    C++ kernel: its jnp scatter is already in place)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "cpu":
        from kernels_pallas.cpu import cpu_supports_kernels

        return "cpu" if cpu_supports_kernels() else "reference"
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform, "reference")
