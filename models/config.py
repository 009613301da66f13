"""Model architecture config: one frozen dataclass, read from GGUF metadata or an HF config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# Upper bounds on what a config may declare. They keep a malformed or hostile file from making us allocate
# absurd buffers before we notice; every real model of this family is far below them.
MAX_VOCAB = 1 << 21
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_CONTEXT = 1 << 22
QUANTIZATIONS = ("none", "int8", "int4", "auto")  # how weights are held (models/quant.py)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "linear" (positions divided by `factor`) or "llama3"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2-style with qkv bias)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors stored by llama.cpp as the `rope_freqs.weight` tensor (Llama 3.1 GGUFs).
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None  # attend to at most this many most recent positions (Mistral)
    name: str = "llama"

    def __post_init__(self) -> None:
        bounds = {
            "vocab_size": MAX_VOCAB,
            "hidden_size": MAX_HIDDEN,
            "intermediate_size": 8 * MAX_HIDDEN,
            "num_layers": MAX_LAYERS,
            "num_heads": MAX_HEADS,
            "num_kv_heads": MAX_HEADS,
            "head_dim": 4096,
            "max_position_embeddings": MAX_CONTEXT,
        }
        for field, bound in bounds.items():
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 < value <= bound:
                raise ValueError(f"model config: {field}={value!r} must be an integer in [1, {bound}]")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"model config: rms_norm_eps={self.rms_norm_eps!r} must be a positive number")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"model config: rope_theta={self.rope_theta!r} must be a positive number")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(
                f"model config: rope_freq_factors has {len(self.rope_freq_factors)} entries, "
                f"expected head_dim/2={self.head_dim // 2}"
            )
        if self.sliding_window is not None and not 0 < self.sliding_window <= MAX_CONTEXT:
            raise ValueError(f"model config: sliding_window={self.sliding_window!r} must be in [1, {MAX_CONTEXT}]")
        if self.rope_scaling is not None and self.rope_scaling.kind not in ("linear", "llama3"):
            raise ValueError(f"model config: rope_scaling kind {self.rope_scaling.kind!r} is not supported")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        e, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = e * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * e * f + 2 * e
        embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return l * per_layer + embed + e

    def rope_inv_freq(self) -> np.ndarray:
        """f32[head_dim // 2]: the rotary inverse frequencies, scaling applied."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        if self.rope_freq_factors is not None:
            inv_freq = inv_freq / np.asarray(self.rope_freq_factors, dtype=np.float64)
        scaling = self.rope_scaling
        if scaling is not None and scaling.kind == "linear":
            inv_freq = inv_freq / scaling.factor
        elif scaling is not None and scaling.kind == "llama3":
            # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
            low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
            high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
            mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
            scaled = np.where(mid, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)
            inv_freq = scaled
        return inv_freq.astype(np.float32)


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """Map an HF config.json (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM) onto LlamaConfig."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"config.json: model_type {model_type!r} is not supported (llama, qwen2, mistral)")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        # transformers < 5 writes rope_theta + rope_scaling; 5.x nests both in rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        rope_theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
        kind = rope.get("rope_type", rope.get("type"))
        scaling = None
        if kind == "llama3":
            scaling = RopeScaling(
                "llama3",
                float(rope["factor"]),
                float(rope.get("low_freq_factor", 1.0)),
                float(rope.get("high_freq_factor", 4.0)),
                int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif kind == "linear":
            scaling = RopeScaling("linear", float(rope["factor"]))
        elif kind not in (None, "default"):
            raise ValueError(f"config.json: rope type {kind!r} is not supported")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError("config.json: Qwen2 use_sliding_window=true (per-layer windows) is not supported")
        window = hf.get("sliding_window") if model_type == "mistral" else None
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            sliding_window=int(window) if window else None,
            name=str(hf.get("_name_or_path") or model_type),
        )
    except KeyError as e:
        raise ValueError(f"config.json: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(("config.json", "model config")):
            raise
        raise ValueError(f"config.json: bad value: {e}") from None
