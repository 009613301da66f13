"""`jaxserve generate "prompt"` and `jaxserve chat`: stream text from a model (the default one if none given)."""

from __future__ import annotations

import argparse
import os
import sys

from jaxserve.options import add_argparse_flags, argparse_bytes, engine_options_from_args
from models.config import QUANTIZATIONS


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    _add_engine_flags(p)
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")


def _add_engine_flags(p: argparse.ArgumentParser, *, batching: bool = False) -> None:
    add_argparse_flags(p, batching=batching)
    p.add_argument("--quiet", action="store_true", help="no load/speed summary on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt (no chat template)")
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_flags(gen)
    chat = sub.add_parser("chat", help="chat with the model (interactive when stdin is a terminal)")
    chat.add_argument("message", nargs="?", default=None, help="one user message (default: read stdin / REPL)")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_model_flags(chat)
    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
        conflict_handler="resolve",  # (its --model is repeatable)
    )
    _add_engine_flags(serve, batching=True)
    _add_server_flags(serve, port=8000)
    _add_model_lifecycle_flags(serve)
    batch = sub.add_parser("batch", help="run a JSONL file through the engine (resumable; `batch merge` joins shards)")
    batch.add_argument("--input", required=True, help="JSONL: OpenAI batch lines or {id, prompt|messages, ...}")
    batch.add_argument("--output", required=True, help="JSONL results (appended; a rerun skips ids already there)")
    batch.add_argument(
        "--shard",
        default=None,
        help="i/n: this process takes shard i of n; auto: from jax.distributed (every host of a slice)",
    )
    batch.add_argument("--allow-errors", action="store_true", help="exit 0 even when some lines failed")
    batch.add_argument("--flush-interval", type=float, default=1.0, help="seconds between fsyncs of the output")
    batch.add_argument("--served-model-name", default=None, help="the model name written in OpenAI-form outputs")
    batch.add_argument("--max-body-bytes", type=argparse_bytes, default=4 << 20, help="longest input line")
    _add_engine_flags(batch, batching=True)
    merge = sub.add_parser("batch-merge", help=argparse.SUPPRESS)
    merge.add_argument("--input", required=True, help="the job's input (gives the order)")
    merge.add_argument("--output", required=True, help="the job's --output; its .shard-i-of-n files are joined")
    sub.add_parser("grpc", help="the gRPC server (same as jaxserve-grpc; absl flags, see --helpfull)", add_help=False)
    convert = sub.add_parser("convert", help="write a model (as loaded: dtype, quantization) as an orbax checkpoint")
    convert.add_argument("--model", default=None, help="GGUF file, HF directory or orbax checkpoint (default: SmolLM2)")
    convert.add_argument("--output", required=True, help="the checkpoint's directory (new or empty)")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    convert.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    convert.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def _add_server_flags(p: argparse.ArgumentParser, port: int) -> None:
    from jaxserve.api.validation import Limits
    from jaxserve.async_engine import MAX_BUFFERED_TOKENS

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: the model's)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may take before they are cancelled",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="seconds without engine progress before /ready reports not ready",
    )
    p.add_argument("--max-body-bytes", type=argparse_bytes, default=4 << 20, help="request body limit")
    p.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=Limits.max_seqs_per_request,
        help="sequences (prompts x n) one request may add; more is a 400 naming n (or prompt)",
    )
    p.add_argument(
        "--max-response-bytes",
        type=argparse_bytes,
        default=Limits.max_response_bytes,
        help="largest non-streamed answer, estimated up front from n, max_tokens and logprobs (a 400 beyond it)",
    )
    p.add_argument(
        "--stream-write-timeout",
        type=float,
        default=Limits.stream_write_timeout,
        help="seconds a streamed chunk may wait on a client that reads nothing; then the stream and its request end",
    )
    p.add_argument(
        "--stream-buffer-tokens",
        type=int,
        default=MAX_BUFFERED_TOKENS,
        help="tokens (each logprob alternative counts one more) a stream may hold unread before it is ended "
        "and its request aborted",
    )
    p.add_argument(
        "--prefix-cache-per-key",
        action="store_true",
        help="split the prefix cache by API key: a key's requests share cached pages only among themselves",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer <key>' on every model request (repeat for several keys; "
        "default: $JAXSERVE_API_KEY, which keeps the key out of the process list; /health, /ready, /metrics open)",
    )
    p.add_argument("--max-header-bytes", type=argparse_bytes, default=16 << 10, help="request headers limit")


def _add_model_lifecycle_flags(p: argparse.ArgumentParser) -> None:
    from jaxserve.servers.registry import RollbackPolicy

    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="[NAME=]PATH[@VERSION]: a model version to serve (repeatable: several models, several versions of "
        "one; the first version of a name takes its traffic). PATH: GGUF file, HF directory or orbax checkpoint "
        "(default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--model-repository",
        default=None,
        help="DIR laid out DIR/NAME/VERSION/ (a .gguf file, an HF directory or an orbax checkpoint): each name's "
        "newest version is loaded, the others listed for the admin API to load",
    )
    p.add_argument(
        "--admin-key",
        action="append",
        default=None,
        help="the admin API's key (/admin/...; repeatable; default $JAXSERVE_ADMIN_KEY; none: the admin API is off)",
    )
    p.add_argument(
        "--sticky-header",
        default=None,
        help="a request header whose value routes a client to one version of a model (default: the body's `user`)",
    )
    p.add_argument(
        "--memory-budget",
        type=argparse_bytes,
        default=None,
        help="bytes of weights + KV all loaded versions may hold together (a load past it is refused)",
    )
    d = RollbackPolicy()
    p.add_argument("--rollback-window", type=float, default=d.window_seconds, help="seconds of canary health kept")
    p.add_argument(
        "--rollback-min-requests", type=int, default=d.min_requests, help="requests in the window before judging"
    )
    p.add_argument(
        "--rollback-error-margin",
        type=float,
        default=d.error_margin,
        help="a canary whose error rate exceeds the stable version's by this much is set to 0%% traffic",
    )
    p.add_argument(
        "--rollback-ttft-margin",
        type=float,
        default=d.ttft_margin,
        help="... or whose TTFT p99 exceeds the stable's by this fraction",
    )
    p.add_argument(
        "--rollback-ttft-floor",
        type=float,
        default=d.ttft_floor_seconds,
        help="... and by at least this many seconds",
    )
    p.add_argument("--no-auto-rollback", dest="auto_rollback", action="store_false", help="never roll back by itself")


def _sampling(args, default_temperature: float):
    from jaxserve.sampling import SamplingParams

    temperature = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(
        temperature=temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


CLI_BUCKETS = (1, 32, 128, 512)  # one interactive stream: few step shapes, so a cold start compiles little


def _load(args):
    """An engine for one interactive stream (max_num_seqs 1; the sampling --seed also seeds the engine)."""
    from jaxserve.llm import build_engine

    if args.multihost:
        _distributed(args)
    return build_engine(
        **engine_options_from_args(args, batching=False),
        progress=True,
        quiet=args.quiet,
        max_num_seqs=1,
        max_num_batched_tokens=CLI_BUCKETS[-1],
        token_buckets=CLI_BUCKETS,
        seed=args.seed or 0,
    )


def _stream(engine, prompt_ids, params, quiet: bool) -> str:
    """Print the completion as it is produced; return its text."""
    import dataclasses

    from jaxserve.sampling_params import RequestOutputKind

    engine.add_request("cli", prompt_ids, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
    out, pieces = None, []
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                pieces.append(out.outputs[0].text)
                sys.stdout.write(out.outputs[0].text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        engine.abort_request("cli")
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet and out is not None:
        m, n = out.metrics, out.metrics.num_generated_tokens
        rate = 1 / m.tpot if m.tpot else 0.0
        print(
            f"[jaxserve] prompt {len(prompt_ids)} tokens, generated {n} ({out.outputs[0].finish_reason}); "
            f"time to first token {m.ttft * 1e3:.0f} ms; decode {rate:.1f} tokens/s"
            + (
                f"; speculation accepted {m.num_accepted_tokens}/{m.num_draft_tokens} proposed tokens"
                if m.num_draft_tokens
                else ""
            ),
            file=sys.stderr,
        )
    return "".join(pieces)


def cmd_generate(args) -> int:
    from jaxserve.multihost import follow_or_none, release_followers

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    params = _sampling(args, 0.0)  # a bad sampling flag fails before the model loads
    engine = follow_or_none(_load(args))
    if engine is None:
        return 0
    try:
        return _generate(args, engine, prompt, params)
    finally:
        release_followers(engine)


def _generate(args, engine, prompt: str, params) -> int:
    tok = engine.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if args.chat else tok.encode(prompt)
    _stream(engine, ids, params, args.quiet)
    return 0


def cmd_chat(args) -> int:
    from jaxserve.multihost import follow_or_none, release_followers

    params = _sampling(args, 0.7)  # a bad sampling flag fails before the model loads
    engine = follow_or_none(_load(args))
    if engine is None:
        return 0
    try:
        return _chat(args, engine, params)
    finally:
        release_followers(engine)


def _chat(args, engine, params) -> int:
    tok = engine.tokenizer
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def turn(user_text: str) -> None:
        messages.append({"role": "user", "content": user_text})
        ids = tok.encode_chat(messages, add_generation_prompt=True)
        reply = _stream(engine, ids, params, args.quiet)
        messages.append({"role": "assistant", "content": reply})

    if args.message is not None:
        turn(args.message)
    elif sys.stdin.isatty():
        print("[jaxserve] chat: empty line or Ctrl-D to quit, /reset to clear the history", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            if line.strip() == "/reset":
                del messages[int(bool(args.system)) :]
                continue
            turn(line)
    else:
        turn(sys.stdin.read())
    return 0


def _batching_engine(args):
    """The engine `serve` and `batch` run: continuous batching with the scheduler and mesh flags."""
    from jaxserve.llm import build_engine

    return build_engine(**engine_options_from_args(args, batching=True), quiet=args.quiet)


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from jaxserve.api.validation import Limits
    from jaxserve.async_engine import AsyncEngine
    from jaxserve.multihost import follow_or_none, release_followers
    from jaxserve.servers import http_server
    from jaxserve.servers.frontend import Frontend, api_keys_from
    from jaxserve.servers.registry import build_registry, engine_builder, policy_from_flags, start_specs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = start_specs(args.model, args.model_repository, args.served_model_name)
    loaded = [s for s in specs if s.load]
    if args.multihost:
        if len(specs) > 1:
            raise SystemExit("--multihost: serves one model version (give one --model)")
        _distributed(args)
    options = engine_options_from_args(args, batching=True)
    options.pop("model")
    args.model = loaded[0].path
    engine = _batching_engine(args)
    if follow_or_none(engine) is None:  # processes other than 0 replay process 0's steps
        return 0

    builder = engine_builder(options, args.stream_buffer_tokens)
    policy = policy_from_flags(args)
    first, registry = AsyncEngine(engine, max_buffered_tokens=args.stream_buffer_tokens), None
    try:
        registry = build_registry(
            specs, first, None if args.multihost else builder, rollback=policy, memory_budget=args.memory_budget
        )
        limits = Limits(
            max_body_bytes=args.max_body_bytes,
            max_header_bytes=args.max_header_bytes,
            max_seqs_per_request=args.max_seqs_per_request,
            max_response_bytes=args.max_response_bytes,
            stream_write_timeout=args.stream_write_timeout,
        )
        frontend = Frontend(
            registry=registry,
            limits=limits,
            stall_timeout=args.stall_timeout,
            api_keys=api_keys_from(args.api_key),
            prefix_cache_per_key=args.prefix_cache_per_key,
            admin_keys=api_keys_from(args.admin_key, "JAXSERVE_ADMIN_KEY"),
            sticky_header=args.sticky_header,
        )
        return asyncio.run(http_server.serve(frontend, args.host, args.port, drain_timeout=args.drain_timeout))
    finally:
        if registry is not None:
            registry.shutdown()
        else:
            first.shutdown()
        release_followers(engine)


def _shard(args) -> tuple[int, int]:
    """--shard i/n, or auto: jax.distributed (initialized here, before anything else touches jax)."""
    if args.shard is None:
        return 0, 1
    if args.shard == "auto":
        return _distributed(args)
    parts = args.shard.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
        raise ValueError(f"--shard={args.shard!r}: need i/n with 0 <= i < n, or auto")
    return int(parts[0]), int(parts[1])


def _distributed(args) -> tuple[int, int]:
    from jaxserve.multihost import initialize

    return initialize(args.coordinator_address, args.num_processes, args.process_id)


def cmd_batch(args) -> int:
    from jaxserve.api.validation import Limits
    from jaxserve.batch import BatchJob, errors_path_for, iter_records, shard_path
    from jaxserve.servers.registry import default_model_name

    if not os.path.isfile(args.input):
        raise ValueError(f"--input: no such file {args.input!r}")
    if args.multihost:
        raise ValueError("--multihost: a batch job shards its input over hosts instead (--shard auto)")
    from jaxserve.servers.registry import parse_model_flag

    index, count = _shard(args)
    # --model [NAME=]PATH[@VERSION], as `serve` takes it: the results name the model and its version
    name, args.model, version = parse_model_flag(args.model) if args.model else (None, None, None)
    engine = _batching_engine(args)
    job = BatchJob(
        engine,
        args.input,
        args.output,
        shard=(index, count),
        limits=Limits(max_body_bytes=args.max_body_bytes),
        flush_interval=args.flush_interval,
        model_name=args.served_model_name or name or default_model_name(engine.model_card().path),
        model_version=version or "1",
        progress=not args.quiet,
    )
    summary = job.run()
    errors_path = errors_path_for(shard_path(args.output, index, count))
    total_errors = sum(1 for _ in iter_records(errors_path, errors=True))
    print(
        f"[jaxserve batch] shard {index}/{count}: {summary.describe()}; {total_errors} error lines in {errors_path}",
        file=sys.stderr,
    )
    return 1 if total_errors and not args.allow_errors else 0


def cmd_convert(args) -> int:
    from models.checkpoint import save_checkpoint
    from models.loader import load_model

    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        raise ValueError(f"--output {args.output}: exists and is not an empty directory")
    model = load_model(args.model, dtype=args.dtype, quantization=args.quantization, progress=not args.quiet)
    save_checkpoint(model, args.output, progress=not args.quiet)
    if not args.quiet:
        print(
            f"[jaxserve convert] {os.path.basename(model.path)} -> {args.output} ({model.dtype}, "
            f"quantization={model.quantization}; {model.describe_weights()})",
            file=sys.stderr,
        )
    return 0


def cmd_batch_merge(args) -> int:
    from jaxserve.batch import errors_path_for, merge

    written, errors, missing = merge(args.input, args.output)
    print(
        f"[jaxserve batch merge] {written} records -> {args.output}, {errors} error lines -> "
        f"{errors_path_for(args.output)}",
        file=sys.stderr,
    )
    if missing:
        print(
            f"[jaxserve batch merge] {len(missing)} input lines have no result yet (first: line {missing[0]}); "
            "rerun the shards",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["batch", "merge"]:
        argv = ["batch-merge", *argv[2:]]
    if argv[:1] == ["grpc"]:  # absl flags: hand the rest of the line over
        from jaxserve.servers import grpc_server

        grpc_server.run(["jaxserve grpc", *argv[1:]])  # exits through absl
        return 0
    args = build_parser().parse_args(argv)
    from jaxserve.api.validation import PromptTooLongError
    from models.gguf_loader import ModelFileError
    from models.tokenizer import TokenizerError

    try:
        commands = {
            "generate": cmd_generate,
            "chat": cmd_chat,
            "serve": cmd_serve,
            "batch": cmd_batch,
            "batch-merge": cmd_batch_merge,
            "convert": cmd_convert,
        }
        return commands[args.command](args)
    except (ModelFileError, PromptTooLongError, TokenizerError, ValueError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
