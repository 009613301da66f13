"""Tensor-parallel sharding of the Llama family over a mesh axis "model" (Megatron-style).

    wq, wk, wv, w_gate, w_up   [L, E, out]   columns on "model"  (heads / MLP units split across devices)
    wo, w_down                 [L, in, E]    rows on "model"     (partial sums, all-reduced by XLA)
    embed [V, E], lm_head [E, V]             vocab on "model"
    norms                                    replicated
    KV pages [L, N, P, K, D]                 K (kv heads) on "model"; replicated when K < tp (GQA/MQA)

Quantized weights (models.quant.QuantizedWeight, [L, out, in]) split the same dimension, so their values,
scales and mins move together: a column-parallel one on its out axis (1), a row-parallel one on its in axis (2;
each device's share of K must hold whole groups of 32, or the weight stays replicated).

Head-major layouts make column shards whole heads: device i holds q heads [i*H/tp, (i+1)*H/tp) and, when K
divides by tp, exactly the kv heads those q heads read. A size that does not split the model evenly is refused
at start-up (never a wrong answer mid-serving); MLP and vocab fall back to replication when they do not split.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import LlamaConfig
from models.llama import LayerParams, LlamaParams
from models.mesh_axes import DATA, MODEL, kv_heads_sharded  # noqa: F401  (re-exported)
from models.quant import BLOCK, QuantizedWeight, is_quantized


def check_tensor_parallel(cfg: LlamaConfig, tp: int) -> None:
    """Raise ValueError naming tensor_parallel_size when `tp` cannot split this model's attention heads."""
    h, k = cfg.num_heads, cfg.num_kv_heads
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size={tp!r}: need an integer >= 1")
    valid = [n for n in range(1, h + 1) if h % n == 0 and (k % n == 0 or n % k == 0)]
    if tp not in valid:
        raise ValueError(
            f"tensor_parallel_size={tp}: {cfg.name} has {h} query heads and {k} KV heads; a "
            f"tensor-parallel size must divide the query heads and divide or be a multiple of the "
            f"KV heads: one of {valid}"
        )


def param_specs(cfg: LlamaConfig, tp: int, params=None):
    """A LlamaParams of PartitionSpecs (None where a field is None). With `params`, quantized fields get a
    QuantizedWeight of specs (values, scales and mins split alike)."""
    if tp == 1:
        col = row = kv_col = mlp_col = mlp_row = vocab_rows = vocab_cols = bias = kv_bias = P()
    else:
        kv = kv_heads_sharded(cfg, tp)
        mlp = cfg.intermediate_size % tp == 0
        vocab = cfg.vocab_size % tp == 0
        col, row, bias = P(None, None, MODEL), P(None, MODEL, None), P(None, MODEL)
        kv_col, kv_bias = (col, bias) if kv else (P(), P())
        mlp_col, mlp_row = (col, row) if mlp else (P(), P())
        vocab_rows, vocab_cols = (P(MODEL, None), P(None, MODEL)) if vocab else (P(), P())
    layers = LayerParams(
        attn_norm=P(),
        wq=col,
        wk=kv_col,
        wv=kv_col,
        wo=row,
        mlp_norm=P(),
        w_gate=mlp_col,
        w_up=mlp_col,
        w_down=mlp_row,
        bq=bias if cfg.attention_bias else None,
        bk=kv_bias if cfg.attention_bias else None,
        bv=kv_bias if cfg.attention_bias else None,
    )
    specs = LlamaParams(
        embed=vocab_rows, layers=layers, final_norm=P(), lm_head=None if cfg.tie_word_embeddings else vocab_cols
    )
    return specs if params is None else _quantized_specs(specs, params, tp)


def _quantized_specs(specs, params, tp: int):
    """Dense specs over [.., in, out] -> a QuantizedWeight of specs over its [.., out, in] arrays."""

    def one(spec, leaf):
        if not is_quantized(leaf):
            return spec
        parts = tuple(spec) + (None,) * (len(leaf.values.shape) - len(tuple(spec)))
        if len(parts) == 3:  # a layer weight: dense [L, in, out] -> quantized [L, out, in]
            parts = (parts[0], parts[2], parts[1])
        elif leaf is not params.embed and len(parts) == 2:  # an untied LM head: dense [E, V] -> quantized [V, E]
            parts = (parts[1], parts[0])
        k = leaf.shape[-1]
        if parts[-1] is not None and (k // tp) % BLOCK:  # K must split into whole groups
            parts = (None,) * len(parts)
        spec = P(*parts)
        return QuantizedWeight(spec, spec, None if leaf.mins is None else spec, None, leaf.bits)

    return jax.tree.map(one, specs, params, is_leaf=lambda x: isinstance(x, P) or x is None)


def kv_cache_spec(cfg: LlamaConfig, tp: int) -> P:
    return P(None, None, None, MODEL, None) if tp > 1 and kv_heads_sharded(cfg, tp) else P()


def shard_params(params, cfg: LlamaConfig, mesh: Mesh):
    """Place params on the mesh by `param_specs` (a copy; the unsharded arrays can be dropped)."""
    specs = param_specs(cfg, mesh.shape[MODEL], params)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))
    if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        return jax.device_put(params, shardings)

    # A mesh over several processes: each process holds the same weights and fills its own devices' shards.
    def place(leaf, sharding):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:  # restored into its shards already
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, params, shardings)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of (possibly sharded) arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.addressable_shards[0]
        total += shard.data.size * shard.data.dtype.itemsize
    return total
