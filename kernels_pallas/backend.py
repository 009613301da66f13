"""Which implementation a kernel call uses."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "reference", "pallas_tpu", "pallas_gpu", "cpu")


def resolve_backend(backend: str) -> str:
    """"auto" picks the Pallas kernels of the default device's platform, or our C++ kernels (kernels_pallas/cpu,
    through XLA FFI) on CPU; "reference" is the pure-jnp oracle everywhere. A kernel without a version for the
    chosen backend runs its reference (the KV write has no C++ kernel: its jnp scatter is already in place)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cpu": "cpu"}.get(jax.default_backend(), "reference")
