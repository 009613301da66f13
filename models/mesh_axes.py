"""The mesh's axis names and the one sharding fact the model itself needs (a leaf module: models.llama and
models.sharding both read it, neither imports the other's way back)."""

from __future__ import annotations

from models.config import LlamaConfig

MODEL = "model"  # the tensor-parallel mesh axis
DATA = "data"  # the data-parallel mesh axis (replicas; each runs its own engine on its row of the mesh)


def kv_heads_sharded(cfg: LlamaConfig, tp: int) -> bool:
    """Whether the KV heads split over `tp` devices (else each device keeps all of them: GQA/MQA with K < tp)."""
    return cfg.num_kv_heads % tp == 0
