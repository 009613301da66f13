"""Quantized weights: the pytree every projection takes in place of a dense array, the one `linear()` they all
call, and the load-time quantizers (numpy, host side).

Modes (vLLM's `quantization=` names):
    none   dense weights in the model dtype (today's path)
    int8   int8 per block of 32 along K with an f16 scale (GGUF's Q8_0), activations int8 per row and block (W8A8)
    int4   4-bit per block of 32 with an f16 scale and min (GGUF's Q4_1), activations int8 (W4A8)
    auto   keep a GGUF file's own precision: Q8_0 stays int8 and Q4_0/Q4_1 stay 4-bit bit for bit (Q4_0 becomes
           Q4_1's form with min = -8 * scale, exact in f16); other quantized types are requantized (Q5/Q6/Q8_K to
           int8, the 2-4 bit K-quants to int4); f16/bf16/f32 matrices stay dense.
The embedding and the (tied) LM head stay int8 in int4 mode, as in llama.cpp's Q4_1 files (token_embd is
Q8_0 there): the LM head is 20% of the weights and the one projection whose error every logit sees. For the same
reason the head's activations go in as two int8 terms (`head_linear`): on the real model that took int4's
perplexity from 14.7403 to 14.7249 (llama.cpp's own on the Q4_1 file: 14.7308) and int8's from 14.7693 to
14.7409 (fp32: 14.6929), with single-stream decode unchanged (scripts/bench_quality.py, bench_generate.py).

Quantized weights are stored [out, in] ("NT", as GGUF and llama.cpp keep them): each output channel's blocks are
contiguous, which is what a GEMV streams. Dense weights stay [in, out].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.dense_matmul import dense_matmul, dense_matmul_many
from kernels_pallas.quantized_matmul import (
    BLOCK,
    dequantize,
    quantize_activations,
    quantized_matmul,
    quantized_matmul_many,
    quantizes_activations,
)
from models.config import QUANTIZATIONS  # noqa: F401  (re-exported: the modes this module implements)


@dataclasses.dataclass
class QuantizedWeight:
    """A [N, K] weight (or [L, N, K] stacked over layers) in blocks of `group` along K."""

    values: jax.Array  # int8[(L,) N, K] (bits 8) | uint8[(L,) N, K // 2] (bits 4, GGUF Q4 nibble order)
    scales: jax.Array  # f16[(L,) N, K // group]
    mins: jax.Array | None  # f16[(L,) N, K // group] (bits 4: weight = nibble * scale + min) | None (bits 8)
    layer: jax.Array | None = None  # i32[]: set inside the layer scan; values are stacked and this picks one
    bits: int = 8  # static

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape [..., N, K] this weight stands for."""
        *lead, n, kv = self.values.shape
        return (*lead, n, kv * 2 if self.bits == 4 else kv)

    def at_layer(self, layer: jax.Array) -> QuantizedWeight:
        return dataclasses.replace(self, layer=layer)

    def dequantize(self) -> jax.Array:
        if self.layer is not None:
            pick = lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, keepdims=False)  # noqa: E731
            return dequantize(pick(self.values), pick(self.scales), None if self.mins is None else pick(self.mins))
        return dequantize(self.values, self.scales, self.mins)

    @property
    def nbytes(self) -> int:
        return sum(
            int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
            for a in (self.values, self.scales, self.mins)
            if a is not None
        )


jax.tree_util.register_dataclass(
    QuantizedWeight, data_fields=["values", "scales", "mins", "layer"], meta_fields=["bits"]
)


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


@dataclasses.dataclass(frozen=True)
class DenseAtLayer:
    """One layer of a dense weight stacked over layers, left stacked: the CPU kernel reads it in place, where
    `stacked[layer]` would make XLA copy the slice before its dot. Made inside the layer scan, never stored."""

    stacked: jax.Array  # [L, K, N]
    layer: jax.Array  # i32[]


def at_layer(w, layer: jax.Array, *, in_place: bool):
    """Layer `layer` of a stacked weight, as `linear` takes it: quantized weights carry the index; dense matrices
    [L, K, N] stay stacked when `in_place` (the CPU kernels); anything else (norms, biases) is sliced."""
    if is_quantized(w):
        return w.at_layer(layer)
    if in_place and w.ndim == 3:
        return DenseAtLayer(w, layer)
    return w[layer]


def linear(x: jax.Array, w, *, backend: str = "auto") -> jax.Array:
    """x [M, K] times a weight: dense [K, N] (x @ w), one layer of a stacked dense one (DenseAtLayer), or
    quantized [N, K] (the quantized matmul). -> [M, N]"""
    if isinstance(w, DenseAtLayer):
        return dense_matmul(x, w.stacked, w.layer, backend=backend)
    if not is_quantized(w):
        return x @ w
    return quantized_matmul(x, w.values, w.scales, w.mins, w.layer, backend=backend).astype(x.dtype)


def head_linear(x: jax.Array, w: QuantizedWeight, *, backend: str = "auto") -> jax.Array:
    """The quantized LM head: x [M, E] . w [V, E]^T -> f32 [M, V] with x in two int8 terms where the matmul
    would quantize it: x = x_q + r (x_q: x quantized per block of 32, exactly as the kernel does; r: the
    remainder), and x_q . w + r_q . w runs as one matmul of 2M rows. The activation error drops from ~1/254 of
    each block's amax to ~1/254^2 (W8A16-like logits, which every token's probability sees) for the cost of M
    more rows: free in a bandwidth-bound GEMV, ~2x the head's integer dots in a batched step."""
    m, k = x.shape
    xf = x.astype(jnp.float32)
    if not quantizes_activations(m, backend):  # x stays f32 on this path: nothing to split
        return linear(xf, w, backend=backend)
    if not quantizes_activations(2 * m, backend):  # 2M rows would keep x f32: M zero rows get the same
        return linear(jnp.concatenate([xf, jnp.zeros_like(xf)]), w, backend=backend)[:m]
    q, d = quantize_activations(xf)
    r = xf - (q.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK) * d[..., None]).reshape(m, k)
    y = linear(jnp.concatenate([xf, r]), w, backend=backend)
    return y[:m] + y[m:]


def linear_many(x: jax.Array, ws, *, backend: str = "auto") -> list[jax.Array]:
    """[linear(x, w) for w in ws]; weights of one kind and layer (quantized of one bit width, or DenseAtLayer) go
    in one kernel call."""
    if len(ws) > 1 and all(isinstance(w, DenseAtLayer) and w.layer is ws[0].layer for w in ws):
        return dense_matmul_many(x, [w.stacked for w in ws], ws[0].layer, backend=backend)
    if len(ws) > 1 and all(is_quantized(w) and w.bits == ws[0].bits and w.layer is ws[0].layer for w in ws):
        outs = quantized_matmul_many(x, [(w.values, w.scales, w.mins) for w in ws], ws[0].layer, backend=backend)
        return [y.astype(x.dtype) for y in outs]
    return [linear(x, w, backend=backend) for w in ws]


def embed_lookup(table, token_ids: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding table [V, E] (dense, or quantized: only the looked-up rows are dequantized)."""
    if not is_quantized(table):
        return table[token_ids]
    values = table.values[token_ids]
    scales = table.scales[token_ids]
    mins = None if table.mins is None else table.mins[token_ids]
    return dequantize(values, scales, mins).astype(dtype)


# ---- load-time quantizers (numpy, host) ---------------------------------------------------------------------


@dataclasses.dataclass
class HostQuantized:
    """A quantized weight on the host, before it is placed on devices (numpy arrays, same layouts)."""

    values: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None
    bits: int

    def to_device(self) -> QuantizedWeight:
        return QuantizedWeight(
            jnp.asarray(self.values),
            jnp.asarray(self.scales),
            None if self.mins is None else jnp.asarray(self.mins),
            None,
            self.bits,
        )

    def take_rows(self, index: np.ndarray) -> HostQuantized:
        """Rows (output channels) permuted or selected: values, scales and mins move together."""
        return HostQuantized(
            self.values[..., index, :],
            self.scales[..., index, :],
            None if self.mins is None else self.mins[..., index, :],
            self.bits,
        )


def quantizable(shape: tuple[int, ...], group: int = BLOCK) -> bool:
    return len(shape) >= 2 and shape[-1] % group == 0 and group % BLOCK == 0


def quantize_int8(w: np.ndarray, group: int = BLOCK) -> HostQuantized:
    """f32[..., N, K] -> int8 values and one f16 scale per group: scale = amax / 127 (GGUF Q8_0 for group 32)."""
    *lead, n, k = w.shape
    wb = np.asarray(w, np.float32).reshape(*lead, n, k // group, group)
    scale = (np.abs(wb).max(axis=-1) / 127.0).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    q = np.where(s > 0, np.rint(wb / np.where(s > 0, s, 1)), 0)
    return HostQuantized(np.clip(q, -127, 127).astype(np.int8).reshape(*lead, n, k), scale, None, 8)


def quantize_int4(w: np.ndarray, group: int = BLOCK) -> HostQuantized:
    """f32[..., N, K] -> 4-bit nibbles with an f16 scale and min per group (GGUF Q4_1 for group 32)."""
    *lead, n, k = w.shape
    wb = np.asarray(w, np.float32).reshape(*lead, n, k // group, group)
    lo, hi = wb.min(axis=-1), wb.max(axis=-1)
    scale = ((hi - lo) / 15.0).astype(np.float16)
    mins = lo.astype(np.float16)
    s, m = scale.astype(np.float32)[..., None], mins.astype(np.float32)[..., None]
    q = np.where(s > 0, np.rint((wb - m) / np.where(s > 0, s, 1)), 0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(*lead, n, k)
    return HostQuantized(pack_4bit(q), scale, mins, 4)


def pack_4bit(q: np.ndarray) -> np.ndarray:
    """uint8 nibbles [..., N, K] -> [..., N, K / 2]: per block of 32, byte j = q[j] | q[j + 16] << 4."""
    *lead, n, k = q.shape
    b = q.reshape(*lead, n, k // BLOCK, 2, BLOCK // 2)
    return (b[..., 0, :] | (b[..., 1, :] << 4)).astype(np.uint8).reshape(*lead, n, k // 2)


def host_dequantize(h: HostQuantized) -> np.ndarray:
    """f32[..., N, K] of a host-side quantized weight (numpy; tests and requantization)."""
    return np.asarray(
        dequantize(jnp.asarray(h.values), jnp.asarray(h.scales), None if h.mins is None else jnp.asarray(h.mins))
    )


def held_mode(quantization: str, *, head: bool = False) -> str:
    """The mode a weight is quantized to under `quantization` ("int8" | "int4"): the embedding and LM head
    (`head`) stay int8 (see the module docstring)."""
    return "int8" if head else quantization


def quantize(w: np.ndarray, mode: str) -> HostQuantized:
    """f32[..., N, K] in mode "int8" or "int4"."""
    return quantize_int8(w) if mode == "int8" else quantize_int4(w)
