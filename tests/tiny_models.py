"""Tiny random-weight Llama models written as real GGUF files (with llama.cpp's Q/K permutation) for tests."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np

from models.config import LlamaConfig
from models.llama import LAYER_FIELDS, param_shapes

TINY = LlamaConfig(
    vocab_size=260,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    name="tiny",
)


def tiny_config(**changes) -> LlamaConfig:
    return dataclasses.replace(TINY, **changes)


def random_arrays(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """f32 arrays named and laid out as models.llama expects ([in, out], layers stacked)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in param_shapes(cfg).items():
        full = (cfg.num_layers, *shape) if name in LAYER_FIELDS else shape
        scale = 0.1 if name.endswith("norm") else 1.0 / np.sqrt(shape[0])
        base = 1.0 if name.endswith("norm") else 0.0
        arrays[name] = (base + scale * rng.standard_normal(full)).astype(np.float32)
    return arrays


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """260 tokens: <|endoftext|>, <|im_start|>, <|im_end|> (control), the 256 byte symbols, one merge."""
    byte_tokens = sorted(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_tokens, "Ġt"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, ["Ġ t"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF half-split -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path,
    cfg: LlamaConfig,
    arrays: dict[str, np.ndarray],
    *,
    qtype: str = "F32",
    shape_override: dict[str, tuple[int, ...]] | None = None,
    drop: tuple[str, ...] = (),
) -> None:
    """Write `arrays` as a llama-architecture GGUF; 2-D weights stored as `qtype` (F32, F16, Q8_0, Q4_0, ...)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(cfg.name)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )

    hf = {  # gguf name -> HF-layout ([out, in]) host array
        "token_embd.weight": arrays["embed"],
        "output_norm.weight": arrays["final_norm"],
    }
    if "lm_head" in arrays:
        hf["output.weight"] = arrays["lm_head"].T
    names = {
        "attn_norm": "attn_norm.weight",
        "wq": "attn_q.weight",
        "wk": "attn_k.weight",
        "wv": "attn_v.weight",
        "wo": "attn_output.weight",
        "mlp_norm": "ffn_norm.weight",
        "w_gate": "ffn_gate.weight",
        "w_up": "ffn_up.weight",
        "w_down": "ffn_down.weight",
    }
    for ours, suffix in names.items():
        for i in range(cfg.num_layers):
            a = arrays[ours][i]
            a = a.T if a.ndim == 2 else a
            if ours == "wq":
                a = _permute(a, cfg.num_heads)
            elif ours == "wk":
                a = _permute(a, cfg.num_kv_heads)
            hf[f"blk.{i}.{suffix}"] = a
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for name, a in hf.items():
        if name in drop:
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        if shape_override and name in shape_override:
            a = np.zeros(shape_override[name], np.float32)
        if a.ndim == 2 and qtype != "F32":
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)  # shape follows from the bytes
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bytes_per_page(page_size: int, cfg: LlamaConfig = TINY) -> int:
    """f32 K and V bytes of one page of `cfg` (every layer): kv_cache_memory for a given number of pages."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * 4
