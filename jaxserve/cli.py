"""`jaxserve generate "prompt"` and `jaxserve chat`: stream text from a model (the default one if none given)."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla")


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


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    from jaxserve.config import ATTENTION_BACKENDS, KV_CACHE_DTYPES
    from models.config import QUANTIZATIONS

    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations (float32 is the fast path on CPUs without native bf16)")
    p.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default="none",
                   help="weights: int8 (W8A8) or int4 (W4A8) blocks of 32, auto keeps a GGUF file's own "
                        "Q8_0/Q4_0/Q4_1 blocks, none is dense --dtype")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="kernels: auto picks the Pallas ones on TPU/GPU and the C++ ones on CPU; reference runs "
                        "the pure-jnp kernels everywhere")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length the KV cache holds (default: min(2048, the model's context))")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV cache dtype (auto: the model's; int8: per-token, per-head scales, ~3.8x the tokens)")
    p.add_argument("--kv-cache-memory", type=_bytes, default=None,
                   help="bytes for the KV cache, e.g. 512MiB or 2GB (default: a fraction of free memory)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices one model copy is sharded over (must split the attention heads)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="model copies, each with its own batch (needs tp x dp devices)")
    p.add_argument("--multihost", action="store_true",
                   help="one engine over every process's devices (jax.distributed; process 0 serves, the others "
                        "follow its steps)")
    p.add_argument("--coordinator-address", default=None,
                   help="jax.distributed off TPU/SLURM: host:port of process 0 (with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--compile-cache-dir", default=DEFAULT_CACHE_DIR,
                   help="persistent XLA compilation cache ('' to disable)")
    p.add_argument("--quiet", action="store_true", help="no load/speed summary on stderr")


def _bytes(text: str) -> int:
    """'123', '512MiB', '2GB', '1.5G' -> bytes."""
    units = {"": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
             "g": 10**9, "gb": 10**9, "gib": 2**30}  # fmt: skip
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 512MiB, 2GB)") from None
    if not 0 < value < 2**50:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return int(value)


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
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_engine_flags(serve)
    _add_server_flags(serve, port=8000)
    batch = sub.add_parser("batch", help="run a JSONL file through the engine (resumable; `batch merge` joins shards)")
    batch.add_argument("--input", required=True, help="JSONL: OpenAI batch lines or {id, prompt|messages, ...}")
    batch.add_argument("--output", required=True, help="JSONL results (appended; a rerun skips ids already there)")
    batch.add_argument("--shard", default=None,
                       help="i/n: this process takes shard i of n; auto: from jax.distributed (every host of a slice)")
    batch.add_argument("--allow-errors", action="store_true", help="exit 0 even when some lines failed")
    batch.add_argument("--flush-interval", type=float, default=1.0, help="seconds between fsyncs of the output")
    batch.add_argument("--served-model-name", default=None, help="the model name written in OpenAI-form outputs")
    batch.add_argument("--max-body-bytes", type=_bytes, default=4 << 20, help="longest input line")
    _add_engine_flags(batch)
    _add_scheduler_flags(batch)
    merge = sub.add_parser("batch-merge", help=argparse.SUPPRESS)
    merge.add_argument("--input", required=True, help="the job's input (gives the order)")
    merge.add_argument("--output", required=True, help="the job's --output; its .shard-i-of-n files are joined")
    sub.add_parser("grpc", help="the gRPC server (same as jaxserve-grpc; absl flags, see --helpfull)",
                   add_help=False)  # fmt: skip
    return parser


def _add_scheduler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences one step may hold")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens one step may process")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="admission bound: a request beyond it is refused at once (429)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument("--seed", type=int, default=0, help="seeds requests that bring none")


def _add_server_flags(p: argparse.ArgumentParser, port: int) -> None:
    _add_scheduler_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: the model's)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take before they are cancelled")
    p.add_argument("--stall-timeout", type=float, default=120.0,
                   help="seconds without engine progress before /ready reports not ready")
    p.add_argument("--max-body-bytes", type=_bytes, default=4 << 20, help="request body limit")
    p.add_argument("--max-header-bytes", type=_bytes, default=16 << 10, help="request headers limit")


def _sampling(args, default_temperature: float):
    from jaxserve.sampling import SamplingParams

    temperature = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(
        temperature=temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, max_tokens=args.max_tokens,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed, ignore_eos=args.ignore_eos,
    )


CLI_BUCKETS = (1, 32, 128, 512)  # one interactive stream: few step shapes, so a cold start compiles little


def _load(args):
    """An engine for one interactive stream (max_num_seqs 1)."""
    from jaxserve.llm import build_engine

    if args.multihost:
        _distributed(args)
    return build_engine(
        args.model, dtype=args.dtype, quantization=args.quantization, attention_backend=args.attention_backend,
        max_model_len=args.max_model_len, compile_cache_dir=args.compile_cache_dir, progress=True, quiet=args.quiet,
        max_num_seqs=1, max_num_batched_tokens=CLI_BUCKETS[-1], multihost=args.multihost,
        token_buckets=CLI_BUCKETS, page_size=args.page_size, kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory=args.kv_cache_memory, seed=args.seed or 0, tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
    )


def _stream(engine, prompt_ids, params, quiet: bool) -> str:
    """Print the completion as it is produced; return its text."""
    engine.add_request("cli", prompt_ids, params)
    out = None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        engine.abort_request("cli")
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet and out is not None:
        m, n = out.metrics, len(out.outputs[0].token_ids)
        rate = 1 / m.tpot if m.tpot else 0.0
        print(f"[jaxserve] prompt {len(prompt_ids)} tokens, generated {n} ({out.outputs[0].finish_reason}); "
              f"time to first token {m.ttft * 1e3:.0f} ms; decode {rate:.1f} tokens/s", file=sys.stderr)  # fmt: skip
    return out.outputs[0].text if out is not None else ""


def cmd_generate(args) -> int:
    from jaxserve.multihost import follow_or_none, release_followers

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    engine = follow_or_none(_load(args))
    if engine is None:
        return 0
    try:
        return _generate(args, engine, prompt)
    finally:
        release_followers(engine)


def _generate(args, engine, prompt: str) -> int:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if args.chat else prompt
    _stream(engine, tok.encode(text), _sampling(args, 0.0), args.quiet)
    return 0


def cmd_chat(args) -> int:
    from jaxserve.multihost import follow_or_none, release_followers

    engine = follow_or_none(_load(args))
    if engine is None:
        return 0
    try:
        return _chat(args, engine)
    finally:
        release_followers(engine)


def _chat(args, engine) -> int:
    tok = engine.tokenizer
    params = _sampling(args, 0.7)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def turn(user_text: str) -> None:
        messages.append({"role": "user", "content": user_text})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
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
                del messages[int(bool(args.system)):]
                continue
            turn(line)
    else:
        turn(sys.stdin.read())
    return 0


def _batching_engine(args):
    """The engine `serve` and `batch` run: continuous batching with the scheduler and mesh flags."""
    from jaxserve.llm import build_engine

    return build_engine(
        args.model, dtype=args.dtype, quantization=args.quantization, attention_backend=args.attention_backend,
        max_model_len=args.max_model_len, compile_cache_dir=args.compile_cache_dir, quiet=args.quiet,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting_requests=args.max_waiting_requests, page_size=args.page_size, kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        multihost=args.multihost,
    )  # fmt: skip


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from jaxserve.api.validation import Limits
    from jaxserve.async_engine import AsyncEngine
    from jaxserve.multihost import follow_or_none, release_followers
    from jaxserve.servers import http_server
    from jaxserve.servers.frontend import Frontend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.multihost:
        _distributed(args)
    engine = _batching_engine(args)
    if follow_or_none(engine) is None:  # processes other than 0 replay process 0's steps
        return 0
    limits = Limits(max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes)
    frontend = Frontend(AsyncEngine(engine), model_name=args.served_model_name, limits=limits,
                        stall_timeout=args.stall_timeout)  # fmt: skip
    try:
        return asyncio.run(http_server.serve(frontend, args.host, args.port, drain_timeout=args.drain_timeout))
    finally:
        frontend.engine.shutdown()
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
    from jaxserve.servers.frontend import default_model_name

    if not os.path.isfile(args.input):
        raise ValueError(f"--input: no such file {args.input!r}")
    if args.multihost:
        raise ValueError("--multihost: a batch job shards its input over hosts instead (--shard auto)")
    index, count = _shard(args)
    engine = _batching_engine(args)
    job = BatchJob(engine, args.input, args.output, shard=(index, count),
                   limits=Limits(max_body_bytes=args.max_body_bytes), flush_interval=args.flush_interval,
                   model_name=args.served_model_name or default_model_name(engine.model.path),
                   progress=not args.quiet)  # fmt: skip
    summary = job.run()
    errors_path = errors_path_for(shard_path(args.output, index, count))
    total_errors = sum(1 for _ in iter_records(errors_path))
    print(f"[jaxserve batch] shard {index}/{count}: {summary.describe()}; {total_errors} error lines in "
          f"{errors_path}", file=sys.stderr)  # fmt: skip
    return 1 if total_errors and not args.allow_errors else 0


def cmd_batch_merge(args) -> int:
    from jaxserve.batch import errors_path_for, merge

    written, errors, missing = merge(args.input, args.output)
    print(f"[jaxserve batch merge] {written} records -> {args.output}, {errors} error lines -> "
          f"{errors_path_for(args.output)}", file=sys.stderr)  # fmt: skip
    if missing:
        print(f"[jaxserve batch merge] {len(missing)} input lines have no result yet (first: line {missing[0]}); "
              "rerun the shards", file=sys.stderr)  # fmt: skip
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
        commands = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "batch": cmd_batch,
                    "batch-merge": cmd_batch_merge}  # fmt: skip
        return commands[args.command](args)
    except (ModelFileError, PromptTooLongError, TokenizerError, ValueError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
