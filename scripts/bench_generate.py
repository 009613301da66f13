"""Benchmark jaxserve single-stream greedy generation against its peers, same model and prompt, in one run.

    . .venv/bin/activate && python scripts/bench_generate.py [--max-tokens 128] [--dtype bfloat16] [--json out.json]

Engines: jaxserve (`Generator`), HF transformers (torch CPU, fp32, weights dequantized from the same GGUF) and
llama.cpp (`llama_cpp`, only if installed). Every engine gets the same prompt token ids (jaxserve's tokenizer)
and decodes exactly --max-tokens tokens greedily, ignoring EOS. Per engine it measures:
  load    seconds to load weights and tokenizer;
  cold    TTFT of the first generation (jaxserve: after `warmup`, so it includes compiling the prompt's buckets,
          or loading them from the persistent XLA cache; HF/llama.cpp: first call overheads);
  TTFT    call -> first token (prefill + first sample) of a warm run, median over --runs;
  decode  (tokens - 1) / (last token time - first token time) of a warm run, median over --runs.
Ratios are jaxserve/peer: decode > 1 and TTFT < 1 mean jaxserve is faster. It also checks that jaxserve's and
HF's greedy tokens agree on the first 32 (a sanity line, never an abort). Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax

jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxserve/xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve.generate import Generator, warmup  # noqa: E402
from jaxserve.sampling import SamplingParams  # noqa: E402
from models.loader import default_model_path, load_model  # noqa: E402

DEFAULT_QUESTION = "Explain how a transformer language model generates text, step by step."
AGREE_PREFIX = 32


@dataclasses.dataclass
class EngineResult:
    name: str
    load_s: float
    cold_ttft_s: float
    ttft_s: float
    decode_tps: float
    tokens: list[int]
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


def _summarize(name: str, load_s: float, runs: list[tuple[float, float, list[int]]], **extra: float) -> EngineResult:
    """runs: (ttft_s, decode_tps, tokens) per run; the first is the cold run, the rest are warm."""
    warm = runs[1:]
    return EngineResult(name, load_s, runs[0][0], statistics.median(r[0] for r in warm),
                        statistics.median(r[1] for r in warm), warm[-1][2], dict(extra))


def _rate(times: list[float]) -> float:
    """Decode tokens/s from the timestamps of each generated token."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def bench_jaxserve(args: argparse.Namespace, path: str) -> tuple[EngineResult, str, list[int]]:
    model = load_model(path, dtype=args.dtype)
    tok = model.tokenizer
    text = args.prompt if args.raw else tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tok.encode(text)
    gen = Generator(model, max_model_len=args.max_model_len)
    warmup_s = warmup(gen)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    runs = []
    for _ in range(1 + args.runs):
        r = gen.generate(prompt_ids, params)
        runs.append((r.ttft_s, r.decode_tokens_per_s, r.token_ids))
    return _summarize(f"jaxserve ({args.dtype})", model.load_seconds, runs, warmup_s=warmup_s), text, prompt_ids


def bench_hf(args: argparse.Namespace, path: str, text: str, prompt_ids: list[int]) -> EngineResult:
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantizing progress bar
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    class Timestamps(BaseStreamer):
        """Records when each generated token arrives (the first put() is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value: torch.Tensor) -> None:
            if self.seen_prompt:
                self.times.append(time.perf_counter())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    t0 = time.perf_counter()
    kw = dict(gguf_file=os.path.basename(path))
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - t0
    if tokenizer(text).input_ids != prompt_ids:
        print("note: HF's tokenizer encodes the prompt differently; HF is fed jaxserve's prompt ids")
    input_ids = torch.tensor([prompt_ids])
    n = args.max_tokens
    runs = []
    for _ in range(1 + args.runs):
        streamer = Timestamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, streamer=streamer,
                                 pad_token_id=tokenizer.eos_token_id)
        runs.append((streamer.times[0] - t0, _rate(streamer.times), out[0, len(prompt_ids):].tolist()))
    return _summarize("HF transformers (fp32)", load_s, runs, torch_threads=torch.get_num_threads())


def bench_llama_cpp(args: argparse.Namespace, path: str, prompt_ids: list[int]) -> EngineResult | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python not installed: skipped")
        return None
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=args.max_model_len, n_threads=os.cpu_count() or 2, verbose=False)
    load_s = time.perf_counter() - t0
    runs = []
    for _ in range(1 + args.runs):
        tokens: list[int] = []
        times: list[float] = []
        t0 = time.perf_counter()
        # generate() never stops by itself (EOS included): greedy via top_k=1, temp=0.
        for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == args.max_tokens:
                break
        runs.append((times[0] - t0, _rate(times), tokens))
    return _summarize("llama.cpp", load_s, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=DEFAULT_QUESTION, help="user message, chat-templated unless --raw")
    ap.add_argument("--raw", action="store_true", help="use --prompt as is, without the chat template")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="jaxserve only")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=1, help="warm runs per engine (median reported)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args()
    if args.max_tokens < 2 or args.runs < 1:
        ap.error("--max-tokens must be >= 2 and --runs >= 1")

    path = default_model_path()
    print(f"model {path}\njax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    jx, text, prompt_ids = bench_jaxserve(args, path)
    print(f"prompt {len(prompt_ids)} tokens, {args.max_tokens} new tokens; jaxserve warmup {jx.extra['warmup_s']:.1f}s")
    results = [jx]
    if not args.skip_hf:
        results.append(bench_hf(args, path, text, prompt_ids))
    llama = bench_llama_cpp(args, path, prompt_ids)
    if llama is not None:
        results.append(llama)

    agree = None
    hf = next((r for r in results if r.name.startswith("HF")), None)
    if hf is not None:
        a, b = jx.tokens[:AGREE_PREFIX], hf.tokens[:AGREE_PREFIX]
        agree = a == b
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        print(f"greedy tokens jaxserve vs HF (first {AGREE_PREFIX}): "
              + ("agree" if agree else f"DIFFER from position {first}: {a[first:first + 4]} vs {b[first:first + 4]}"))

    head = f"{'engine':<24}{'load s':>8}{'cold TTFT ms':>14}{'TTFT ms':>10}{'decode tok/s':>14}" \
           f"{'jax/peer decode':>17}{'jax/peer TTFT':>15}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        ratios = ("", "") if r is jx else (f"{jx.decode_tps / r.decode_tps:.2f}x", f"{jx.ttft_s / r.ttft_s:.2f}x")
        print(f"{r.name:<24}{r.load_s:>8.2f}{r.cold_ttft_s * 1e3:>14.0f}{r.ttft_s * 1e3:>10.1f}"
              f"{r.decode_tps:>14.1f}{ratios[0]:>17}{ratios[1]:>15}")
    print("ratios are jaxserve/peer: decode > 1x and TTFT < 1x mean jaxserve is faster")

    if args.json:
        out = {"model": path, "prompt_tokens": len(prompt_ids), "args": vars(args), "tokens_agree_hf": agree,
               "engines": [dataclasses.asdict(r) for r in results],
               "ratios": {r.name: {"decode": jx.decode_tps / r.decode_tps, "ttft": jx.ttft_s / r.ttft_s}
                          for r in results if r is not jx}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
