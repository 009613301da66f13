"""Orbax checkpoints of a loaded model: its weights (dense or quantized, as held), config and tokenizer.

    DIR/jaxserve.json              format, version, config, dtype, quantization, the bits of each quantized
                                   weight, the source, the tokenizer (its tokenizers JSON and special tokens)
    DIR/params/<name>/             one orbax (OCDBT) checkpoint per parameter: embed, final_norm, lm_head and
                                   every stacked layer field; a quantized one holds {values, scales, mins}

Loading restores each parameter straight into its sharding on the mesh (models.sharding.param_specs): orbax
reads only the slices the process's devices hold, so no process builds a full host copy, and parameters come
in one at a time under a progress bar. The config passes LlamaConfig's bounds and every stored shape must be the
one the config implies before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import LlamaConfig, RopeScaling
from models.gguf_loader import ModelFileError
from models.llama import LAYER_FIELDS, LayerParams, LlamaParams, param_shapes
from models.quant import QuantizedWeight, is_quantized
from models.tokenizer import Tokenizer

FORMAT = "jaxserve-orbax"
VERSION = 1
META = "jaxserve.json"
MAX_META_BYTES = 64 << 20  # the tokenizer's JSON is most of it (SmolLM2: ~3 MB)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META))


def _fields(params: LlamaParams) -> dict:
    """{name: array or QuantizedWeight} of every parameter present (names as in models.llama.param_shapes)."""
    out = {"embed": params.embed, "final_norm": params.final_norm, "lm_head": params.lm_head}
    out.update({name: getattr(params.layers, name) for name in LAYER_FIELDS})
    return {name: leaf for name, leaf in out.items() if leaf is not None}


def _tree(leaf) -> dict:
    """What orbax stores for one parameter: {"value": array} or the quantized weight's arrays."""
    if is_quantized(leaf):
        tree = {"values": leaf.values, "scales": leaf.scales}
        return tree if leaf.mins is None else tree | {"mins": leaf.mins}
    return {"value": leaf}


def tokenizer_meta(tok: Tokenizer) -> dict:
    return {
        "backend": tok.backend.to_str(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": list(tok.eos_token_ids),
        "add_bos": tok.add_bos,
        "chat_template": tok.chat_template,
    }


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_str(meta["backend"])
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ModelFileError(f"{META}: tokenizer: {e}") from None
    return Tokenizer(
        backend,
        bos_token_id=meta.get("bos_token_id"),
        eos_token_ids=meta.get("eos_token_ids") or [],
        add_bos=bool(meta.get("add_bos")),
        chat_template=meta.get("chat_template"),
    )


def save_checkpoint(model, directory: str, *, progress: bool = True) -> dict:
    """Write `model` (a models.loader.LoadedModel) as an orbax checkpoint in `directory` (new or empty).
    Returns the metadata written."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory):
        raise FileExistsError(f"--output {directory}: exists and is not empty")
    os.makedirs(os.path.join(directory, "params"), exist_ok=True)
    fields = _fields(model.params)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(model.config),
        "dtype": model.dtype,
        "quantization": model.quantization,
        "bits": {name: leaf.bits for name, leaf in fields.items() if is_quantized(leaf)},
        "source": os.path.basename(model.path),
        "tokenizer": tokenizer_meta(model.tokenizer),
    }
    ckptr = ocp.StandardCheckpointer()
    for name, leaf in tqdm(fields.items(), desc="saving", unit="tensor", disable=not progress, file=sys.stderr):
        ckptr.save(os.path.join(directory, "params", name), _tree(leaf))
    ckptr.wait_until_finished()
    with open(os.path.join(directory, META), "w", encoding="utf-8") as f:  # last: its presence marks a whole one
        json.dump(meta, f)
    return meta


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if os.path.getsize(path) > MAX_META_BYTES:
        raise ModelFileError(f"{path}: larger than {MAX_META_BYTES >> 20} MiB")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{path}: not a jaxserve orbax checkpoint (format {found!r})")
    for key, kind in (("config", dict), ("tokenizer", dict)):
        if not isinstance(meta.get(key), kind):
            raise ModelFileError(f"{path}: {key} must be an object")
    if meta.get("version") != VERSION:
        raise ModelFileError(f"{path}: checkpoint version {meta.get('version')!r}; this jaxserve reads {VERSION}")
    return meta


def config_from_meta(meta: dict) -> LlamaConfig:
    cfg = dict(meta["config"])
    try:
        if cfg.get("rope_scaling") is not None:
            cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"])
        if cfg.get("rope_freq_factors") is not None:
            cfg["rope_freq_factors"] = tuple(float(x) for x in cfg["rope_freq_factors"])
        return LlamaConfig(**cfg)
    except (TypeError, KeyError) as e:
        raise ModelFileError(f"{META}: config: {e}") from None


def _expected(cfg: LlamaConfig, name: str, bits: int | None) -> dict[str, tuple[int, ...]]:
    """The shapes a parameter's stored arrays must have: dense [(L,) in, out] or quantized [(L,) out, in]."""
    from models.quant import BLOCK

    shape = param_shapes(cfg)[name]
    lead = (cfg.num_layers,) if name in LAYER_FIELDS else ()
    if bits is None:
        return {"value": (*lead, *shape)}
    n, k = shape if name == "embed" else shape[::-1]
    out = {"values": (*lead, n, k // 2 if bits == 4 else k), "scales": (*lead, n, k // BLOCK)}
    return out | ({"mins": out["scales"]} if bits == 4 else {})


def _dtypes(name: str, bits: int | None, dense: str) -> dict[str, str]:
    if bits is None:
        return {"value": dense}
    values = {"values": "uint8" if bits == 4 else "int8", "scales": "float16"}
    return values | ({"mins": "float16"} if bits == 4 else {})


def load_checkpoint(directory: str, *, dtype: str | None = None, mesh: Mesh | None = None, progress: bool = True):
    """-> (config, params, tokenizer, dtype, quantization). mesh: restore into the tensor-parallel shardings of
    models.sharding.param_specs over it (None: the default device). dtype: cast dense weights to it (None: as
    stored)."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from models.sharding import MODEL, param_specs

    directory = os.path.abspath(directory)  # (orbax reads no metadata through a relative path)
    meta = read_meta(directory)
    cfg = config_from_meta(meta)
    tokenizer = tokenizer_from_meta(meta["tokenizer"])
    stored_dtype = meta.get("dtype")
    dtype = dtype or stored_dtype
    if dtype not in DTYPES or stored_dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)} (the checkpoint is {stored_dtype!r})")
    bits = meta.get("bits") or {}
    if not isinstance(bits, dict) or any(b not in (4, 8) for b in bits.values()):
        raise ModelFileError(f"{directory}: {META} bits must map parameter names to 4 or 8; got {bits!r}")
    names = list(param_shapes(cfg))
    for name in names:
        if not os.path.isdir(os.path.join(directory, "params", name)):
            raise ModelFileError(f"{directory}: the checkpoint lacks parameter {name!r}")
    # The tree of specs needs to know which fields are quantized (and how): a skeleton of that shape.
    skeleton = _skeleton(cfg, bits)
    tp = 1 if mesh is None else mesh.shape[MODEL]
    specs = _fields(param_specs(cfg, tp, skeleton))
    device = jax.devices()[0]
    ckptr = ocp.StandardCheckpointer()
    restored = {}
    start = time.perf_counter()
    for name in tqdm(names, desc="restoring", unit="tensor", disable=not progress, file=sys.stderr):
        path = os.path.join(directory, "params", name)
        metadata = ckptr.metadata(path).item_metadata
        if metadata is None:
            raise ModelFileError(f"{directory}: parameter {name!r} has no readable orbax metadata")
        stored = metadata.tree
        want = _expected(cfg, name, bits.get(name))
        got = {k: tuple(v.shape) for k, v in stored.items()}
        if got != want:
            raise ModelFileError(f"{directory}: parameter {name!r} holds {got}; the config implies {want}")
        kinds = {k: jnp.dtype(v.dtype).name for k, v in stored.items()}
        if kinds != _dtypes(name, bits.get(name), stored_dtype):
            raise ModelFileError(f"{directory}: parameter {name!r} holds dtypes {kinds}")
        spec = specs[name]

        def sharding(part, spec=spec):
            s = getattr(spec, part) if is_quantized(spec) else spec
            return jax.sharding.SingleDeviceSharding(device) if mesh is None else NamedSharding(mesh, s or P())

        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding(k)) for k, v in stored.items()}
        restored[name] = ckptr.restore(path, target)
    leaves = {}
    for name, tree in restored.items():
        if name in bits:
            leaves[name] = QuantizedWeight(tree["values"], tree["scales"], tree.get("mins"), None, int(bits[name]))
        else:
            value = tree["value"]
            leaves[name] = value if value.dtype == DTYPES[dtype] else value.astype(DTYPES[dtype])
    params = _params(leaves.get)
    jax.block_until_ready(params)
    if progress:
        print(f"[jaxserve] restored {len(names)} tensors in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    quantization = meta.get("quantization", "none")
    return cfg, params, tokenizer, dtype, quantization


def _skeleton(cfg: LlamaConfig, bits: dict) -> LlamaParams:
    """A LlamaParams of shape placeholders (jax.ShapeDtypeStruct), quantized fields as QuantizedWeights of them:
    what param_specs needs to know (which fields are quantized, their bits and K) before anything is read."""
    import numpy as np

    def leaf(name):
        if name not in param_shapes(cfg):
            return None
        exp = _expected(cfg, name, bits.get(name))
        if name not in bits:
            return jax.ShapeDtypeStruct(exp["value"], jnp.float32)
        arr = {k: jax.ShapeDtypeStruct(v, np.int8) for k, v in exp.items()}
        return QuantizedWeight(arr["values"], arr["scales"], arr.get("mins"), None, int(bits[name]))

    return _params(leaf)


def _params(leaf) -> LlamaParams:
    """The LlamaParams whose field `name` is leaf(name) (None for an absent one): _fields' inverse."""
    return LlamaParams(
        embed=leaf("embed"),
        layers=LayerParams(**{n: leaf(n) for n in LAYER_FIELDS}),
        final_norm=leaf("final_norm"),
        lm_head=leaf("lm_head"),
    )
