"""GGUF weights: read with the `gguf` package, checked before anything large is allocated, then either
dequantized to f32 or, under a quantization mode (models.quant), kept as their own blocks (Q8_0, Q4_0, Q4_1:
bit for bit, never through f32) or requantized.

llama.cpp's converter permutes the rows of Q and K of `llama`-architecture models so that RoPE rotates adjacent
pairs; we undo it to get HF's half-split layout, which our RoPE (and every other loader) uses.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from typing import Any

import numpy as np

from models.config import LlamaConfig, RopeScaling
from models.llama import param_shapes
from models.quant import HostQuantized, held_mode, quantizable, quantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
PERMUTED_QK_ARCHS = ("llama", "mistral")  # llama.cpp permutes Q/K only for these

# GGUF tensor name (after "blk.N.") -> our parameter name.
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
    "attn_q.bias": "bq",
    "attn_k.bias": "bk",
    "attn_v.bias": "bv",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
# GGUF block types we keep as they are: type -> (bytes per block of 32, bits)
_KEPT = {"Q8_0": (34, 8), "Q4_0": (18, 4), "Q4_1": (20, 4)}
# Other quantized types under quantization="auto": requantized to the nearest mode that loses nothing visible.
_AUTO_INT8 = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_1", "Q8_K")
_DENSE_TYPES = ("F32", "F16", "BF16", "F64")


class ModelFileError(ValueError):
    """A model file that cannot be used: malformed, truncated, or inconsistent with its own config."""


def _check_header(path: str) -> None:
    """Cheap checks of the fixed header, before the gguf reader walks (and trusts) the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror}") from None
    if len(head) < 24:
        raise ModelFileError(f"{path}: not a GGUF file: only {size} bytes, shorter than the 24-byte header")
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file: magic is {head[:4]!r}, expected {GGUF_MAGIC!r}")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported ({SUPPORTED_VERSIONS})")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise ModelFileError(
            f"{path}: absurd GGUF header: {n_tensors} tensors, {n_kv} metadata entries (limits {MAX_TENSORS}, {MAX_KV})"
        )


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime_ns: int):
    """The gguf library's reader of one file version (its size and mtime are part of the key: a rewritten file
    is read again). Parsing the metadata (a 49k-token vocabulary and its merges) takes seconds; engines and
    versions loaded from the same file in one process share the parse, and the tensors stay a read-only memmap."""
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memmap: the same mapping, but a slice of an np.memmap
        runs Python code (memmap.__array_finalize__) and the parse takes ~250k slices (1.3 s of a start)."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)  # (its base keeps the mapping alive)

    return Reader(path)


class GGUFFile:
    """A parsed, validated GGUF file: metadata, tensor directory, and lazy dequantization."""

    def __init__(self, path: str | os.PathLike):
        import gguf  # imported here: only GGUF users pay for it

        self.path = os.fspath(path)
        _check_header(self.path)
        stat = os.stat(self.path)
        try:
            self._reader = _read(os.path.realpath(self.path), stat.st_size, stat.st_mtime_ns)
        except Exception as e:  # the reader raises assorted errors on a corrupt file: report them as one kind
            raise ModelFileError(f"{self.path}: malformed GGUF: {type(e).__name__}: {e}") from None
        self._gguf = gguf
        size = os.path.getsize(self.path)
        self.tensors = {}
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise ModelFileError(
                    f"{self.path}: truncated GGUF: tensor {t.name!r} needs bytes up to {end}, file has {size}"
                )
            self.tensors[t.name] = t

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ModelFileError(f"{self.path}: metadata {key!r} is malformed: {e}") from None

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", ""))

    def shape(self, name: str) -> tuple[int, ...]:
        """Row-major (numpy/HF) shape of a tensor: GGUF lists dimensions fastest-first."""
        return tuple(int(x) for x in reversed(self.tensors[name].shape))

    def dequantize(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        try:
            out = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelFileError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, not supported") from None
        return np.asarray(out, dtype=np.float32).reshape(self.shape(name))

    def dense(self, name: str, *, transpose: bool = False, heads: int | None = None, out=None) -> np.ndarray:
        """A 2-D tensor as f32 [rows, cols] ([cols, rows] with `transpose`, written into `out` if given); heads:
        undo llama.cpp's Q/K row permutation first. One C++ pass where the CPU kernels are built (dequantize,
        permute and transpose together), gguf's numpy dequantizer otherwise."""
        from kernels_pallas.cpu import DEQUANT_KINDS, dequantize_gguf

        t, (rows, cols) = self.tensors[name], self.shape(name)
        if t.tensor_type.name in DEQUANT_KINDS and cols % 32 == 0:
            perm = None if heads is None else unpermute_rows(np.arange(rows), heads)
            got = dequantize_gguf(t.data, t.tensor_type.name, rows, cols, perm=perm, transpose=transpose, out=out)
            if got is not None:
                return got
        w = self.dequantize(name)
        if heads is not None:
            w = unpermute_rows(w, heads)
        w = w.T if transpose else w
        if out is None:
            return np.ascontiguousarray(w)
        out[...] = w
        return out

    def config(self) -> LlamaConfig:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHS:
            raise ModelFileError(f"{self.path}: architecture {arch!r} is not supported ({SUPPORTED_ARCHS})")

        def need(key):
            value = self.get(f"{arch}.{key}")
            if value is None:
                raise ModelFileError(f"{self.path}: metadata {arch}.{key} is missing")
            return value

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        kv_heads = self.get(f"{arch}.attention.head_count_kv", heads)
        if "token_embd.weight" not in self.tensors:
            raise ModelFileError(f"{self.path}: tensor 'token_embd.weight' is missing")
        vocab = self.get(f"{arch}.vocab_size") or self.shape("token_embd.weight")[0]
        scaling = None
        if self.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", float(self.get(f"{arch}.rope.scaling.factor", 1.0)))
        freq_factors = None
        if "rope_freqs.weight" in self.tensors:
            freq_factors = tuple(float(x) for x in self.dequantize("rope_freqs.weight").reshape(-1))
        try:
            return LlamaConfig(
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(need("feed_forward_length")),
                num_layers=int(need("block_count")),
                num_heads=heads,
                num_kv_heads=int(kv_heads),
                head_dim=int(self.get(f"{arch}.attention.key_length", hidden // max(heads, 1))),
                max_position_embeddings=int(self.get(f"{arch}.context_length", 4096)),
                rms_norm_eps=float(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self.get(f"{arch}.rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                rope_freq_factors=freq_factors,
                tie_word_embeddings="output.weight" not in self.tensors,
                attention_bias="blk.0.attn_q.bias" in self.tensors,
                sliding_window=int(self.get(f"{arch}.attention.sliding_window", 0)) or None,
                name=str(self.get("general.name", arch)),
            )
        except ValueError as e:
            raise ModelFileError(f"{self.path}: {e}") from None

    def check_shapes(self, cfg: LlamaConfig) -> None:
        """Every tensor the model needs is present with the shape the config implies (before dequantizing)."""
        shapes = param_shapes(cfg)
        for gguf_name, ours in _GLOBAL_NAMES.items():
            if ours in shapes:
                want = shapes[ours] if ours != "lm_head" else shapes[ours][::-1]  # GGUF stores [V, E]
                self._check_one(gguf_name, want)
        for i in range(cfg.num_layers):
            for suffix, ours in _LAYER_NAMES.items():
                if ours in shapes:
                    want = shapes[ours] if len(shapes[ours]) == 1 else shapes[ours][::-1]  # GGUF is [out, in]
                    self._check_one(f"blk.{i}.{suffix}", want)
        extra = [n for n in self.tensors if (m := _BLOCK_RE.fullmatch(n)) and int(m.group(1)) >= cfg.num_layers]
        if extra:
            raise ModelFileError(f"{self.path}: tensors beyond block_count={cfg.num_layers}: {extra[:3]}")

    def _check_one(self, name: str, want: tuple[int, ...]) -> None:
        if name not in self.tensors:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing")
        got = self.shape(name)
        if got != tuple(want):
            raise ModelFileError(f"{self.path}: tensor {name!r} has shape {got}, the config implies {tuple(want)}")

    def blocks(self, name: str) -> HostQuantized:
        """A Q8_0 / Q4_0 / Q4_1 tensor's own blocks, [N, K] row-major as GGUF stores them (no dequantizing).

        Q4_0 (value = (nibble - 8) * d) becomes Q4_1's form with min = -8 * d: exact in f16, the nibbles untouched.
        """
        t = self.tensors[name]
        kind = t.tensor_type.name
        block_bytes, bits = _KEPT[kind]
        n, k = self.shape(name)
        raw = np.asarray(t.data, dtype=np.uint8).reshape(n, k // 32, block_bytes)
        scales = np.ascontiguousarray(raw[..., 0:2]).view(np.float16)[..., 0]
        if kind == "Q8_0":
            # llama.cpp's quantizer writes [-127, 127]; -128 (never written by it) would break the kernel's sign trick
            values = np.maximum(np.ascontiguousarray(raw[..., 2:]).view(np.int8), -127).reshape(n, k)
            return HostQuantized(values, scales, None, 8)
        if kind == "Q4_1":
            mins = np.ascontiguousarray(raw[..., 2:4]).view(np.float16)[..., 0]
            return HostQuantized(np.ascontiguousarray(raw[..., 4:]).reshape(n, k // 2), scales, mins, 4)
        mins = (scales.astype(np.float32) * -8.0).astype(np.float16)
        return HostQuantized(np.ascontiguousarray(raw[..., 2:]).reshape(n, k // 2), scales, mins, 4)

    def tensor_mode(self, name: str, quantization: str, *, head: bool = False) -> str:
        """How one 2-D weight is held under `quantization`: "dense", "int8" or "int4" (head: embedding / LM
        head, which int4 keeps in int8)."""
        kind = self.tensors[name].tensor_type.name
        if quantization == "none":
            return "dense"
        if quantization == "auto":
            if kind in _KEPT:
                return "int8" if _KEPT[kind][1] == 8 else "int4"
            if kind in _DENSE_TYPES:
                return "dense"
            return "int8" if kind in _AUTO_INT8 else "int4"
        return held_mode(quantization, head=head)

    def _quantized(self, name: str, mode: str) -> HostQuantized:
        """One weight in `mode`: its own blocks when the file's type already is that mode, else requantized."""
        kind = self.tensors[name].tensor_type.name
        if kind in _KEPT and (_KEPT[kind][1] == 8) == (mode == "int8"):
            return self.blocks(name)
        return quantize(self.dequantize(name), mode)

    def load_arrays(self, cfg: LlamaConfig, quantization: str = "none") -> dict[str, np.ndarray | HostQuantized]:
        """Host weights named as in `models.llama.param_shapes`, layer ones stacked: dense f32 [in, out], or
        (under a quantization mode) `HostQuantized` [(L,) out, in]."""
        self.check_shapes(cfg)
        shapes = param_shapes(cfg)
        unpermute = self.architecture in PERMUTED_QK_ARCHS
        arrays: dict[str, np.ndarray | HostQuantized] = {}
        for gguf_name, ours in _GLOBAL_NAMES.items():
            if ours not in shapes:
                continue
            mode = self.tensor_mode(gguf_name, quantization, head=True) if len(shapes[ours]) == 2 else "dense"
            if mode != "dense" and quantizable(self.shape(gguf_name)):
                arrays[ours] = self._quantized(gguf_name, mode)
            elif len(shapes[ours]) == 2:
                arrays[ours] = self.dense(gguf_name, transpose=ours == "lm_head")
            else:
                arrays[ours] = self.dequantize(gguf_name)
        for suffix, ours in _LAYER_NAMES.items():
            if ours not in shapes:
                continue
            names = [f"blk.{i}.{suffix}" for i in range(cfg.num_layers)]
            heads = cfg.num_heads if ours in ("wq", "bq") else cfg.num_kv_heads if ours in ("wk", "bk") else None
            modes = {self.tensor_mode(n, quantization) for n in names} if len(shapes[ours]) == 2 else {"dense"}
            # One mode per stacked parameter: a file mixing types across layers takes its widest.
            mode = "dense" if "dense" in modes else "int8" if "int8" in modes else modes.pop()
            if mode != "dense" and quantizable(shapes[ours][::-1]):
                per_layer = [self._quantized(n, mode) for n in names]
                if unpermute and heads is not None:
                    rows = unpermute_rows(np.arange(per_layer[0].values.shape[0]), heads)
                    per_layer = [q.take_rows(rows) for q in per_layer]
                arrays[ours] = HostQuantized(
                    np.stack([q.values for q in per_layer]),
                    np.stack([q.scales for q in per_layer]),
                    None if per_layer[0].mins is None else np.stack([q.mins for q in per_layer]),
                    per_layer[0].bits,
                )
                continue
            stacked = np.empty((cfg.num_layers, *shapes[ours]), dtype=np.float32)
            for i, name in enumerate(names):
                if len(shapes[ours]) == 2:
                    self.dense(name, transpose=True, heads=heads if unpermute else None, out=stacked[i])
                    continue
                w = self.dequantize(name)
                stacked[i] = unpermute_rows(w, heads) if unpermute and heads is not None else w
            arrays[ours] = stacked
        return arrays

    def tokenizer_metadata(self) -> dict[str, Any]:
        keys = (
            "model",
            "pre",
            "tokens",
            "token_type",
            "merges",
            "bos_token_id",
            "eos_token_id",
            "unknown_token_id",
            "padding_token_id",
            "add_bos_token",
            "add_eos_token",
        )
        meta = {k: self.get(f"tokenizer.ggml.{k}") for k in keys}
        meta["chat_template"] = self.get("tokenizer.chat_template")
        return meta


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (rows of each head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelFileError(f"cannot unpermute {rows} rows over {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
