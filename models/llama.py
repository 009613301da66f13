"""The Llama family (Llama 2/3, SmolLM2, Qwen2-style qkv bias): parameter pytree and pure forward functions.

Layers are stacked on a leading axis and run under `lax.scan`, so a 30-layer model compiles as one layer.
Dense weights are stored [in, out]; quantized ones (models.quant.QuantizedWeight) [out, in] as GGUF keeps them.
Every projection goes through `models.quant.linear`, which takes either.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kernels_pallas.backend import resolve_backend
from kernels_pallas.dense_matmul import dense_matmul_nt
from kernels_pallas.kv_write import write_kv
from kernels_pallas.ragged_paged_attention import ragged_paged_attention
from models.cache import AttentionMetadata, KVCache
from models.config import LlamaConfig
from models.layers import apply_rope, rms_norm, rope_cos_sin
from models.quant import (
    HostQuantized,
    QuantizedWeight,
    at_layer,
    embed_lookup,
    head_linear,
    is_quantized,
    linear,
    linear_many,
)
from models.mesh_axes import MODEL, kv_heads_sharded


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
    """One decoder layer's weights, stacked over layers (leading axis L). Projections are dense [L, in, out]
    or a QuantizedWeight [L, out, in]."""

    attn_norm: jax.Array  # [L, E]
    wq: jax.Array | QuantizedWeight  # [L, E, H * D]
    wk: jax.Array | QuantizedWeight  # [L, E, K * D]
    wv: jax.Array | QuantizedWeight  # [L, E, K * D]
    wo: jax.Array | QuantizedWeight  # [L, H * D, E]
    mlp_norm: jax.Array  # [L, E]
    w_gate: jax.Array | QuantizedWeight  # [L, E, F]
    w_up: jax.Array | QuantizedWeight  # [L, E, F]
    w_down: jax.Array | QuantizedWeight  # [L, F, E]
    bq: jax.Array | None = None  # [L, H * D] (qkv bias models only)
    bk: jax.Array | None = None  # [L, K * D]
    bv: jax.Array | None = None  # [L, K * D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LlamaParams:
    embed: jax.Array | QuantizedWeight  # [V, E] (quantized: [V, E] too, which is [out, in] of the tied LM head)
    layers: LayerParams
    final_norm: jax.Array  # [E]
    lm_head: jax.Array | QuantizedWeight | None = None  # [E, V] (quantized: [V, E]); None when tied to embed

    @property
    def dtype(self):
        """The compute dtype (norms are never quantized)."""
        return self.final_norm.dtype


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter, by LlamaParams/LayerParams field name (layer fields without L)."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, k = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {
        "embed": (cfg.vocab_size, e),
        "final_norm": (e,),
        "attn_norm": (e,),
        "wq": (e, h),
        "wk": (e, k),
        "wv": (e, k),
        "wo": (h, e),
        "mlp_norm": (e,),
        "w_gate": (e, f),
        "w_up": (e, f),
        "w_down": (f, e),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (e, cfg.vocab_size)
    if cfg.attention_bias:
        shapes.update(bq=(h,), bk=(k,), bv=(k,))
    return shapes


LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerParams))


def params_from_arrays(cfg: LlamaConfig, arrays: dict[str, np.ndarray | HostQuantized], dtype) -> LlamaParams:
    """Build params from host arrays named as in `param_shapes`, layer ones stacked [L, ...]; checks shapes.
    A HostQuantized entry ([(L,) out, in]) becomes a QuantizedWeight; dense ones are cast to `dtype`."""
    shapes = param_shapes(cfg)
    missing = sorted(set(shapes) - set(arrays))
    if missing:
        raise ValueError(f"weights are missing tensors: {missing}")
    for name, shape in shapes.items():
        a = arrays[name]
        if isinstance(a, HostQuantized):  # [out, in]; the embedding is [V, E] either way
            shape = shape if name == "embed" else shape[::-1]
            got = QuantizedWeight(a.values, a.scales, a.mins, None, a.bits).shape
        else:
            got = tuple(a.shape)
        want = (cfg.num_layers, *shape) if name in LAYER_FIELDS else shape
        if tuple(got) != want:
            raise ValueError(f"weight {name!r} has shape {tuple(got)}, the config implies {want}")

    def dev(name):
        if name not in arrays or name not in shapes:
            return None
        a = arrays[name]
        return a.to_device() if isinstance(a, HostQuantized) else jnp.asarray(a, dtype=dtype)

    layers = LayerParams(**{name: dev(name) for name in LAYER_FIELDS})
    return LlamaParams(embed=dev("embed"), layers=layers, final_norm=dev("final_norm"), lm_head=dev("lm_head"))


def random_arrays(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random host weights ([in, out], layers stacked; norms near 1, the rest scaled by 1/sqrt(fan-in))."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in param_shapes(cfg).items():
        full = (cfg.num_layers, *shape) if name in LAYER_FIELDS else shape
        if name.endswith("norm"):
            arrays[name] = 1.0 + 0.1 * rng.standard_normal(full, dtype=np.float32)
        else:
            fan_in = shape[0] if len(shape) == 2 and name != "embed" else 1
            arrays[name] = rng.standard_normal(full, dtype=np.float32) / np.sqrt(fan_in)
    return arrays


def init_params(cfg: LlamaConfig, seed: int = 0, dtype=jnp.float32) -> LlamaParams:
    """Random weights (for tests and benchmarks of the runtime, not for text)."""
    return params_from_arrays(cfg, random_arrays(cfg, seed), dtype)


def forward(
    params: LlamaParams,
    cfg: LlamaConfig,
    token_ids: jax.Array,  # i32[T]
    positions: jax.Array,  # i32[T]
    cache: KVCache,
    meta: AttentionMetadata,
    *,
    attention_backend: str = "auto",
    interpret_kernels: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the decoder over a ragged batch of T tokens; returns final hidden states [T, E] and the new cache.

    attention_backend picks the kernels (see kernels_pallas.backend); interpret_kernels runs Pallas ones on CPU.
    mesh: a mesh with a "model" axis the params and cache are sharded over (models.sharding); the KV write and
    attention kernels then run per device on its own heads under shard_map, the matmuls are partitioned by XLA.
    """
    num_tokens = token_ids.shape[0]
    num_layers, num_pages, page_size = cache.k.shape[:3]
    h_dim, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = rope_cos_sin(positions, jnp.asarray(cfg.rope_inv_freq()))

    # Layers share one flat page axis ([L * N, P, K, D]) so each layer addresses its pages by an offset
    # instead of slicing (and copying) its part of the cache inside the scan.
    flat_shape = (num_layers * num_pages, *cache.k.shape[2:])
    k_all, v_all = cache.k.reshape(flat_shape), cache.v.reshape(flat_shape)

    def layer(carry, i):
        h, k_all, v_all = carry
        # With the CPU kernels the weight matrices stay stacked and carry the layer index, so the kernel reads its
        # layer in place (a slice would copy the weights every step); norms and biases are sliced.
        p = jax.tree.map(lambda a: at_layer(a, i, in_place=in_place), params.layers, is_leaf=is_quantized)
        with jax.named_scope("attention"):
            x = rms_norm(h, p.attn_norm, cfg.rms_norm_eps)
            q, k, v = mm_many(x, (p.wq, p.wk, p.wv))
            if p.bq is not None:
                q, k, v = q + p.bq, k + p.bk, v + p.bv
            q = apply_rope(q.reshape(num_tokens, h_dim, d), cos, sin)
            k = apply_rope(k.reshape(num_tokens, kv_heads, d), cos, sin)
            v = v.reshape(num_tokens, kv_heads, d)
            slots = jnp.where(meta.slot_mapping < 0, -1, meta.slot_mapping + i * num_pages * page_size)
            o, k_all, v_all = attend(
                q,
                k,
                v,
                k_all,
                v_all,
                slots,
                meta.kv_lens,
                meta.block_tables + i * num_pages,
                meta.query_start_loc,
                meta.num_seqs,
            )
            h = h + mm(o.reshape(num_tokens, h_dim * d), p.wo)
        with jax.named_scope("mlp"):
            x = rms_norm(h, p.mlp_norm, cfg.rms_norm_eps)
            gate, up = mm_many(x, (p.w_gate, p.w_up))
            h = h + mm(jax.nn.silu(gate) * up, p.w_down)
        return (h, k_all, v_all), None

    mm_backend = matmul_backend(attention_backend, mesh)
    mm = functools.partial(linear, backend=mm_backend)
    mm_many = functools.partial(linear_many, backend=mm_backend)
    in_place = resolve_backend(mm_backend) == "cpu"
    attend = functools.partial(
        _write_and_attend,
        sm_scale=d**-0.5,
        sliding_window=cfg.sliding_window,
        backend=attention_backend,
        interpret=interpret_kernels,
        kv_select=None,
    )
    if mesh is not None and mesh.shape[MODEL] > 1:
        attend = _sharded_attend(attend, cfg, mesh)
    h = embed_lookup(params.embed, token_ids, params.dtype)
    layer_ids = jnp.arange(num_layers, dtype=jnp.int32)
    (h, k_all, v_all), _ = jax.lax.scan(layer, (h, k_all, v_all), layer_ids)
    h = rms_norm(h, params.final_norm, cfg.rms_norm_eps)
    return h, KVCache(k_all.reshape(cache.k.shape), v_all.reshape(cache.v.shape))


def _write_and_attend(
    q,
    k,
    v,
    k_all,
    v_all,
    slots,
    kv_lens,
    block_tables,
    query_start_loc,
    num_seqs,
    *,
    sm_scale,
    sliding_window,
    backend,
    interpret,
    kv_select,
):
    """Write this step's K/V, then attend. kv_select = (group, local q heads) when every device holds all KV heads
    (fewer KV heads than devices): this device's q heads then all read one KV head, picked by its index."""
    k_all, v_all = write_kv(k_all, v_all, k, v, slots, backend=backend, interpret=interpret)
    k_read, v_read = k_all, v_all
    if kv_select is not None:
        group, local = kv_select
        head = jax.lax.axis_index(MODEL) * local // group
        k_read = jax.lax.dynamic_slice_in_dim(k_all, head, 1, axis=2)
        v_read = jax.lax.dynamic_slice_in_dim(v_all, head, 1, axis=2)
    o = ragged_paged_attention(
        q,
        k_read,
        v_read,
        kv_lens,
        block_tables,
        query_start_loc,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        backend=backend,
        interpret=interpret,
    )
    return o, k_all, v_all


def _sharded_attend(attend, cfg: LlamaConfig, mesh: jax.sharding.Mesh):
    """`attend` per device over the "model" axis: q [T, H, D] split by head, K/V pages split by KV head (or
    whole on every device when there are fewer KV heads than devices; each device then writes all of them)."""
    tp = mesh.shape[MODEL]
    heads = P(None, MODEL, None)
    if kv_heads_sharded(cfg, tp):
        kv, pages = heads, P(None, None, MODEL, None)
    else:
        kv, pages = P(), P()
        attend = functools.partial(attend, kv_select=(cfg.num_heads // cfg.num_kv_heads, cfg.num_heads // tp))
    return jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(heads, kv, kv, pages, pages, P(), P(), P(), P(), P()),
        out_specs=(heads, pages, pages),
        check_vma=False,
    )


def matmul_backend(backend: str, mesh: jax.sharding.Mesh | None) -> str:
    """The quantized matmul's backend: over a tensor-parallel mesh the jnp reference, which XLA partitions (a
    custom call would make it gather the weights on every device)."""
    return "reference" if mesh is not None and mesh.shape[MODEL] > 1 else backend


def compute_logits(params: LlamaParams, hidden: jax.Array, *, backend: str = "auto") -> jax.Array:
    """hidden: [N, E] -> f32[N, V]. Call it only on the rows that are sampled."""
    head = params.embed if params.lm_head is None else params.lm_head
    if is_quantized(head):  # [V, E] either way
        return head_linear(hidden, head, backend=backend)
    if params.lm_head is not None:
        return (hidden @ params.lm_head).astype(jnp.float32)
    return dense_matmul_nt(hidden, params.embed, backend=backend)  # tied: [V, E], read once for a few rows
