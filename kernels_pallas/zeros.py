"""Zeroed buffers that cost nothing until written: the KV page pool at start-up.

jnp.zeros writes every byte when the pool is allocated (SmolLM2 at 64 x 2048 tokens: 5.6 GiB of K and V, ~8 s
on this CPU before the server is ready). On CPU the C++ call (kernels_pallas/cpu/zeros.cc) hands XLA's fresh
buffer back to the kernel with madvise(MADV_DONTNEED): reads see zeros (Linux's guarantee for private anonymous
memory) and pages are faulted in as the first steps write them. Elsewhere (TPU, GPU, or without the C++
kernels) it is jnp.zeros, the reference. Under a mesh each device zeroes its own shard (shard_map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from kernels_pallas.backend import resolve_backend


def zeros(shape: tuple[int, ...], dtype, sharding: NamedSharding | None = None, *, backend: str = "auto") -> jax.Array:
    """A zeroed array of `shape` and `dtype` placed by `sharding` (None: the default device)."""
    dtype = jnp.dtype(dtype)
    if resolve_backend(backend) != "cpu":
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    from kernels_pallas.cpu import ensure_registered

    ensure_registered()
    if sharding is None:
        return jax.jit(lambda: _lazy(shape, dtype))()
    local = sharding.shard_shape(shape)
    fn = jax.shard_map(lambda: _lazy(local, dtype), mesh=sharding.mesh, in_specs=(), out_specs=sharding.spec)
    return jax.jit(fn, out_shardings=sharding)()


def _lazy(shape, dtype) -> jax.Array:
    return jax.ffi.ffi_call("jaxserve_lazy_zeros", jax.ShapeDtypeStruct(shape, dtype))()
