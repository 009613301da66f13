"""The KV write: Pallas TPU and GPU kernels (interpreted on CPU) equal the XLA scatter, and lower for hardware."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.kv_write import write_kv, write_kv_gpu, write_kv_ref, write_kv_tpu

KERNELS = {"pallas_tpu": write_kv_tpu, "pallas_gpu": write_kv_gpu}


def _case(seed, num_pages=6, page_size=8, kv_heads=3, head_dim=64, tokens=7, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    k_pages = jnp.asarray(rng.standard_normal((num_pages, page_size, kv_heads, head_dim)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((num_pages, page_size, kv_heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((tokens, kv_heads, head_dim)), dtype)
    slots = rng.choice(num_pages * page_size, size=tokens, replace=False).astype(np.int32)
    slots[rng.random(tokens) < 0.3] = -1  # padding rows
    return k_pages, v_pages, k, v, jnp.asarray(slots)


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("seed,page_size,kv_heads,head_dim", [(0, 8, 3, 64), (1, 16, 1, 16), (2, 32, 4, 128)])
def test_interpreted_kernel_equals_scatter(backend, seed, page_size, kv_heads, head_dim):
    args = _case(seed, page_size=page_size, kv_heads=kv_heads, head_dim=head_dim)
    want = write_kv_ref(*args)
    got = jax.jit(lambda *a: write_kv(*a, backend=backend, interpret=True))(*args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert not np.array_equal(np.asarray(want[0]), np.asarray(args[0]))  # something was written


@pytest.mark.parametrize("backend,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_lowers_for_hardware(backend, platform, dtype):
    args = _case(3, num_pages=64, page_size=16, dtype=dtype)
    lowered = jax.jit(KERNELS[backend]).trace(*args).lower(lowering_platforms=(platform,))
    assert "custom_call" in lowered.as_text() or "tpu_custom_call" in lowered.as_text()


def test_bad_shapes_are_clear_errors():
    k_pages, v_pages, k, v, slots = _case(4)
    with pytest.raises(ValueError, match="slot_mapping must be i32"):
        write_kv_tpu(k_pages, v_pages, k, v, slots.astype(jnp.int64) if jax.config.x64_enabled else slots[:2])
    with pytest.raises(ValueError, match="rows"):
        write_kv_gpu(k_pages, v_pages, k[:, :1], v[:, :1], slots)
