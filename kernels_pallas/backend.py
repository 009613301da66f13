"""Which implementation a kernel call uses."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "reference", "pallas_tpu", "pallas_gpu")


def resolve_backend(backend: str) -> str:
    """"auto" picks the Pallas kernel of the default device's platform, or the jnp reference on CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "reference")
