"""Hugging Face checkpoint directories: config.json + *.safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
import os

import numpy as np

from models.config import LlamaConfig, config_from_hf
from models.gguf_loader import ModelFileError
from models.llama import param_shapes

MAX_CONFIG_BYTES = 1 << 20

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}


def read_json(path: str, what: str) -> dict:
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ModelFileError(f"{path}: {what} is larger than {MAX_CONFIG_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: {what} is not a JSON object")
    return value


class HFCheckpoint:
    """An HF model directory: its config and a name -> file map of its safetensors tensors."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        self.hf_config = read_json(os.path.join(self.dir, "config.json"), "config.json")
        index = os.path.join(self.dir, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(f"{index}: no 'weight_map' object")
            self.files = {name: os.path.join(self.dir, str(file)) for name, file in weight_map.items()}
        else:
            single = os.path.join(self.dir, "model.safetensors")
            if not os.path.exists(single):
                raise ModelFileError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
            self.files = {name: single for name in self._names_in(single)}

    @staticmethod
    def _names_in(path: str) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types on a corrupt header
            raise ModelFileError(f"{path}: malformed safetensors: {e}") from None

    def config(self) -> LlamaConfig:
        try:
            cfg = config_from_hf(self.hf_config)
        except ValueError as e:
            raise ModelFileError(f"{self.dir}: {e}") from None
        # Checkpoints saved with tied embeddings may still carry a copy of lm_head; trust the config.
        return cfg

    def load_arrays(self, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        """f32 host arrays named as in `models.llama.param_shapes`, layer ones stacked, weights [in, out]."""
        from safetensors import safe_open

        shapes = param_shapes(cfg)
        wanted: dict[str, tuple[str, int | None]] = {}  # hf name -> (our name, layer)
        for hf_name, ours in _GLOBAL_NAMES.items():
            if ours in shapes:
                wanted[hf_name] = (ours, None)
        for i in range(cfg.num_layers):
            for suffix, ours in _LAYER_NAMES.items():
                if ours in shapes:
                    wanted[f"model.layers.{i}.{suffix}"] = (ours, i)
        missing = sorted(n for n in wanted if n not in self.files)
        if missing:
            raise ModelFileError(f"{self.dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

        arrays = {
            ours: np.empty((cfg.num_layers, *shapes[ours]), np.float32)
            for ours in set(_LAYER_NAMES.values())
            if ours in shapes
        }
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.files[name], []).append(name)
        for path, names in by_file.items():
            try:
                with safe_open(path, framework="numpy") as f:
                    for name in names:
                        ours, layer = wanted[name]
                        want = shapes[ours]
                        stored = want if len(want) == 1 or ours == "embed" else want[::-1]  # HF is [out, in]
                        got = tuple(f.get_slice(name).get_shape())
                        if got != stored:
                            raise ModelFileError(f"{path}: tensor {name!r} has shape {got}, config implies {stored}")
                        w = np.asarray(f.get_tensor(name), dtype=np.float32)
                        w = w if len(want) == 1 or ours == "embed" else w.T
                        if layer is None:
                            arrays[ours] = np.ascontiguousarray(w)
                        else:
                            arrays[ours][layer] = w
            except ModelFileError:
                raise
            except Exception as e:
                raise ModelFileError(f"{path}: cannot read tensors: {e}") from None
        return arrays
