"""Every engine option, named once: the Python keywords of `jaxserve.LLM` / `build_engine`, the argparse flags
of `jaxserve generate|chat|serve|batch` and the absl flags of the gRPC binary are all derived from OPTIONS.

An option's default is its config dataclass field's (jaxserve.config) where it has one, so the table, the
config and every front end cannot disagree (tests/test_options.py checks each front end against the table).
Flag spellings: argparse `--max-num-seqs` (and an option's aliases, e.g. `-q`), absl `--max_num_seqs`; a bool
that defaults to True is turned off by its `off` flag on argparse (`--no-prefix-caching`) and by absl's own
`--no<name>`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from jaxserve.config import (
    ATTENTION_BACKENDS,
    DEFAULT_COMPILE_CACHE_DIR,
    KV_CACHE_DTYPES,
    SCHEDULING_POLICIES,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_bytes,
)
from models.config import QUANTIZATIONS

_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig, "": EngineConfig}


def _field_default(path: str) -> Any:
    section, _, name = path.rpartition(".")
    (field,) = [f for f in dataclasses.fields(_SECTIONS[section]) if f.name == name]
    return field.default


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the Python keyword and the absl flag
    kind: str  # "int" | "float" | "str" | "bool" | "bytes" (a size: 512MiB, 2GB)
    help: str
    field: str | None = None  # "scheduler.max_num_seqs": where it lands in EngineConfig (its default is this one's)
    default: Any = None  # options without a field (load and process options)
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()  # more argparse spellings
    off: str | None = None  # bools defaulting to True: the argparse flag that turns them off
    batching: bool = False  # only front ends that batch (serve, batch, gRPC); generate/chat run one stream
    engine: bool = True  # a keyword of build_engine (False: the process's jax.distributed setup)

    def __post_init__(self) -> None:
        if self.field is not None:
            object.__setattr__(self, "default", _field_default(self.field))

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("model", "str", "GGUF file or HF directory (default: SmolLM2-135M-Instruct)"),
    Option(
        "dtype",
        "str",
        "weights and activations (float32 is the fast path on CPUs without native bf16)",
        default="float32",
        choices=("float32", "bfloat16"),
    ),
    Option(
        "quantization",
        "str",
        "weights: int8 (W8A8) or int4 (W4A8) blocks of 32, auto keeps a GGUF file's own "
        "Q8_0/Q4_0/Q4_1 blocks, none is dense --dtype",
        default="none",
        choices=QUANTIZATIONS,
        aliases=("-q",),
    ),
    Option(
        "attention_backend",
        "str",
        "kernels: auto picks the Pallas ones on TPU/GPU and the C++ ones on CPU; "
        "reference runs the pure-jnp kernels everywhere",
        field="attention_backend",
        choices=ATTENTION_BACKENDS,
    ),
    Option("max_model_len", "int", "context length the KV cache holds (default: min(2048, the model's context))"),
    Option("page_size", "int", "tokens per KV cache page", field="cache.page_size"),
    Option(
        "kv_cache_dtype",
        "str",
        "KV cache dtype (auto: the model's; int8: per-token, per-head scales, ~3.8x the tokens)",
        field="cache.kv_cache_dtype",
        choices=KV_CACHE_DTYPES,
    ),
    Option(
        "kv_cache_memory",
        "bytes",
        "bytes for the KV cache, e.g. 512MiB or 2GB (default: a fraction of free memory)",
        field="cache.kv_cache_memory",
    ),
    Option(
        "tensor_parallel_size",
        "int",
        "devices one model copy is sharded over (must split the attention heads)",
        field="parallel.tensor_parallel_size",
        aliases=("-tp",),
    ),
    Option(
        "data_parallel_size",
        "int",
        "model copies, each with its own batch (needs tp x dp devices)",
        field="parallel.data_parallel_size",
        aliases=("-dp",),
    ),
    Option(
        "multihost",
        "bool",
        "one engine over every process's devices (jax.distributed; process 0 serves, the others follow its steps)",
        field="parallel.multihost",
    ),
    Option(
        "compile_cache_dir",
        "str",
        "persistent XLA compilation cache ('' to disable)",
        default=DEFAULT_COMPILE_CACHE_DIR,
    ),
    Option("max_num_seqs", "int", "sequences one step may hold", field="scheduler.max_num_seqs", batching=True),
    Option(
        "max_num_batched_tokens",
        "int",
        "tokens one step may process",
        field="scheduler.max_num_batched_tokens",
        batching=True,
    ),
    Option(
        "max_waiting_requests",
        "int",
        "admission bound: a request beyond it is refused at once (HTTP 429, gRPC RESOURCE_EXHAUSTED)",
        field="scheduler.max_waiting_requests",
        batching=True,
    ),
    Option(
        "enable_prefix_caching",
        "bool",
        "reuse KV pages of shared prompt prefixes",
        field="enable_prefix_caching",
        off="--no-prefix-caching",
        batching=True,
    ),
    Option(
        "scheduling_policy",
        "str",
        "fcfs: arrival order, a request's priority other than 0 is refused; priority: requests' priorities order "
        "admission and preemption (lower first)",
        field="scheduler.policy",
        choices=SCHEDULING_POLICIES,
        batching=True,
    ),
    Option("seed", "int", "seeds requests that bring none", field="seed", batching=True),
    Option(
        "speculative_config",
        "str",
        'speculative decoding, vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2} (prompt lookup; exact: the output is unchanged)',
        field="speculative_config",
    ),
    Option(
        "coordinator_address",
        "str",
        "jax.distributed off TPU/SLURM: host:port of process 0 (with --num-processes, --process-id)",
        engine=False,
    ),
    Option("num_processes", "int", "jax.distributed: processes in all", engine=False),
    Option("process_id", "int", "jax.distributed: this process's id", engine=False),
)

BY_NAME = {o.name: o for o in OPTIONS}
# build_engine's own keywords (the model load); the rest of the engine options go to engine_config
LOAD_OPTIONS = ("model", "dtype", "quantization", "max_model_len", "compile_cache_dir")


def options_for(batching: bool) -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if batching or not o.batching)


def engine_config(
    *, max_model_len: int, token_buckets=None, enable_chunked_prefill: bool = True, **options
) -> EngineConfig:
    """Flat keyword options (vLLM's names, OPTIONS' fields) -> the engine's config tree; an unknown keyword is a
    TypeError naming it."""
    sections: dict[str, dict] = {k: {} for k in _SECTIONS}
    for name, value in options.items():
        opt = BY_NAME.get(name)
        if opt is None or opt.field is None:
            raise TypeError(f"unknown engine option {name!r} (options: {sorted(o.name for o in OPTIONS if o.field)})")
        section, _, field = opt.field.rpartition(".")
        sections[section][field] = value
    sections["scheduler"].update(max_model_len=max_model_len, enable_chunked_prefill=enable_chunked_prefill)
    return EngineConfig(
        cache=CacheConfig(**sections["cache"]),
        scheduler=SchedulerConfig(**sections["scheduler"]),
        parallel=ParallelConfig(**sections["parallel"]),
        token_buckets=None if token_buckets is None else tuple(token_buckets),
        **sections[""],
    )


def parallel_config(**options) -> ParallelConfig:
    """The ParallelConfig that engine_config(**options) would build (known before the model is loaded)."""
    fields = {}
    for name, value in options.items():
        opt = BY_NAME.get(name)
        if opt is not None and opt.field is not None and opt.field.startswith("parallel."):
            fields[opt.field.partition(".")[2]] = value
    return ParallelConfig(**fields)


# ---- argparse ---------------------------------------------------------------------------------------------


def argparse_bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_argparse_flags(p: argparse.ArgumentParser, *, batching: bool) -> None:
    """The options as flags of `p`; batching-only ones (scheduler limits, prefix cache, engine seed) only when
    `batching`."""
    for o in options_for(batching):
        if o.kind == "bool":
            if o.default:
                p.add_argument(o.off, dest=o.name, action="store_false", help=f"turn off: {o.help}")
            else:
                p.add_argument(o.flag, *o.aliases, dest=o.name, action="store_true", help=o.help)
            continue
        kind = {"int": int, "float": float, "str": str, "bytes": argparse_bytes}[o.kind]
        p.add_argument(o.flag, *o.aliases, dest=o.name, type=kind, default=o.default, choices=o.choices, help=o.help)


def engine_options_from_args(args: argparse.Namespace, *, batching: bool) -> dict:
    """Parsed argparse flags -> build_engine's keywords."""
    return {o.name: getattr(args, o.name) for o in options_for(batching) if o.engine}


# ---- absl (the gRPC binary) -------------------------------------------------------------------------------


def define_absl_flags(fv) -> None:
    """Every option as an absl flag on `fv` (sizes as strings, parsed by engine_options_from_absl)."""
    from absl import flags

    for o in OPTIONS:
        if o.choices is not None:
            flags.DEFINE_enum(o.name, o.default, list(o.choices), o.help, flag_values=fv)
        elif o.kind == "bytes":
            flags.DEFINE_string(o.name, None if o.default is None else str(o.default), o.help, flag_values=fv)
        else:
            define = {
                "int": flags.DEFINE_integer,
                "float": flags.DEFINE_float,
                "str": flags.DEFINE_string,
                "bool": flags.DEFINE_bool,
            }[o.kind]
            define(o.name, o.default, o.help, flag_values=fv)


def engine_options_from_absl(fv) -> dict:
    """Parsed absl flags -> build_engine's keywords; a bad size is a ValueError naming its flag."""
    options = {}
    for o in OPTIONS:
        if not o.engine:
            continue
        value = getattr(fv, o.name)
        if o.kind == "bytes" and value is not None:
            try:
                value = parse_bytes(value)
            except ValueError as e:
                raise ValueError(f"--{o.name}: {e}") from None
        options[o.name] = value
    return options
