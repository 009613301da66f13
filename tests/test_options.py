"""One options table (jaxserve.options): every front end exposes the same engine options with the same defaults."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from jaxserve.cli import build_parser
from jaxserve.config import EngineConfig, SchedulerConfig
from jaxserve.options import (
    LOAD_OPTIONS,
    OPTIONS,
    engine_config,
    engine_options_from_absl,
    engine_options_from_args,
    options_for,
)
from jaxserve.servers.grpc_server import define_flags

COMMANDS = {
    "serve": ["serve"],
    "batch": ["batch", "--input", "in.jsonl", "--output", "out.jsonl"],
    "generate": ["generate"],
    "chat": ["chat"],
}
BATCHING = {"serve": True, "batch": True, "generate": False, "chat": False}


def _absl(argv=()):
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["jaxserve-grpc", *argv])
    return fv


def test_table_defaults_are_the_config_dataclasses():
    assert engine_config(max_model_len=2048) == EngineConfig()
    by_field = {o.field: o.default for o in OPTIONS if o.field}
    assert by_field["scheduler.max_waiting_requests"] == SchedulerConfig().max_waiting_requests == 4096
    fields = {o.name: o.default for o in OPTIONS if o.field}
    assert engine_config(max_model_len=2048, **fields) == EngineConfig()
    every_engine_option = {o.name for o in OPTIONS if o.engine}
    assert every_engine_option == set(LOAD_OPTIONS) | set(fields)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_argparse_command_has_the_table_defaults(command):
    args = build_parser().parse_args(COMMANDS[command])
    batching = BATCHING[command]
    for o in OPTIONS:
        if batching or not o.batching:
            assert getattr(args, o.name) == o.default, (command, o.name)
    if not batching:  # one stream: no scheduler limits; `--seed` is the sampling seed there
        assert not hasattr(args, "max_num_seqs") and args.seed is None


def test_absl_flags_have_the_table_defaults_and_agree_with_argparse():
    fv = _absl()
    for o in OPTIONS:
        assert fv[o.name].default == o.default, o.name
    serve = engine_options_from_args(build_parser().parse_args(["serve"]), batching=True)
    assert engine_options_from_absl(fv) == serve
    assert set(serve) == {o.name for o in OPTIONS if o.engine}
    one_stream = engine_options_from_args(build_parser().parse_args(["generate"]), batching=False)
    assert set(one_stream) == {o.name for o in options_for(False) if o.engine}


def test_the_same_flags_give_the_same_options_on_every_front_end():
    argparse_line = [
        "serve",
        "--max-num-seqs",
        "8",
        "--no-prefix-caching",
        "--kv-cache-memory",
        "1MiB",
        "-q",
        "int4",
        "-tp",
        "2",
        "--max-waiting-requests",
        "7",
        "--multihost",
        "--kv-cache-dtype",
        "int8",
    ]
    absl_line = [
        "--max_num_seqs=8",
        "--noenable_prefix_caching",
        "--kv_cache_memory=1MiB",
        "--quantization=int4",
        "--tensor_parallel_size=2",
        "--max_waiting_requests=7",
        "--multihost",
        "--kv_cache_dtype=int8",
    ]
    got = engine_options_from_args(build_parser().parse_args(argparse_line), batching=True)
    assert got == engine_options_from_absl(_absl(absl_line))
    assert got["kv_cache_memory"] == 1 << 20 and got["enable_prefix_caching"] is False and got["quantization"] == "int4"
    config = engine_config(max_model_len=128, **{k: v for k, v in got.items() if k not in LOAD_OPTIONS})
    assert dataclasses.asdict(config)["scheduler"]["max_waiting_requests"] == 7


def test_bad_values_name_their_option():
    with pytest.raises(TypeError, match="max_num_seq"):
        engine_config(max_model_len=128, max_num_seq=4)
    with pytest.raises(ValueError, match="--kv_cache_memory"):
        engine_options_from_absl(_absl(["--kv_cache_memory=lots"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-memory", "lots"])
