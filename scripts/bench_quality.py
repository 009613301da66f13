"""Quality of jaxserve's quantization modes on the real model, next to llama.cpp on the same Q4_1 file.

    .venv/bin/python scripts/bench_quality.py [--modes none,int8,int4,auto,none+kv8] [--tokens 4096] [--json out.json]

A mode is a `quantization=` value, optionally with "+kv8": the same weights over an int8 KV cache
(kv_cache_dtype="int8").

Perplexity: teacher-forced on a fixed English text of --tokens (>= 4096) tokens that no test uses: the Python
reference manual's topic texts shipped with CPython (`pydoc_data.topics`, keys in sorted order; the script prints
the Python version and the text's sha256, since the text follows the interpreter). The ids are jaxserve's
tokenization, fed unchanged to every engine. They are scored in independent windows of --window (512) tokens
(each window starts with an empty cache; every token after a window's first is predicted from the window's
earlier tokens), fed --rows (8) rows per step: under 16 rows the quantized matmul quantizes activations, as in
decode, so this is the W8A8 / W4A8 arithmetic a served stream sees. (On CPUs with AVX-512 VNNI activations are
quantized at every row count, prefill too; elsewhere prefill chunks of 16+ rows keep x in f32:
kernels_pallas.quantized_matmul.f32_min_rows. The LM head takes its activations in two int8 terms wherever
they are quantized: models.quant.head_linear.)
llama.cpp (llama-cpp-python, if installed) evaluates the same windows with logits for every position.

Greedy agreement: 32 fixed prompts (chat-templated), 32 greedy tokens each, per mode against fp32 ("none"):
`exact` = prompts whose 32 tokens all equal fp32's; `prefix` = mean length of the common prefix (of 32).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxserve/xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about rain.",
    "What is 17 times 3?",
    "Name three primary colors.",
    "How do vaccines work?",
    "What is a black hole?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "What does a CPU do?",
    "Translate 'thank you' to French.",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in five words.",
    "What is machine learning?",
    "How many legs does a spider have?",
    "What causes tides?",
    "Write a Python function that adds two numbers.",
    "What is the largest planet?",
    "Define gravity.",
    "List two benefits of exercise.",
    "What is an atom?",
    "How does a rainbow form?",
    "What is democracy?",
    "Suggest a name for a pet fish.",
    "What is the speed of light?",
    "Why do leaves change color?",
    "What is a prime number?",
    "Explain what an API is.",
    "What language is spoken in Brazil?",
    "How do bees make honey?",
    "What is the Pythagorean theorem?",
]


def reference_text() -> tuple[str, str]:
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


def nll_of(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(ids[t + 1] | ids[:t + 1]) over a window, and how many tokens that scored."""
    x = logits[: len(ids) - 1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    tgt = x[np.arange(len(ids) - 1), ids[1:]]
    return float((lse - tgt).sum()), len(ids) - 1


def perplexity_jaxserve(model, wins, rows: int, kv_cache_dtype: str = "auto") -> tuple[float, float]:
    """Each window through the engine's `prompt_logits` (its forward, `rows` tokens per step, fresh pages)."""
    from jaxserve.engine import LLMEngine
    from jaxserve.options import engine_config

    engine = LLMEngine(
        model,
        engine_config(
            max_model_len=max(len(w) for w in wins),
            max_num_seqs=1,
            max_num_batched_tokens=rows,
            token_buckets=(rows,),
            page_size=16,
            kv_cache_dtype=kv_cache_dtype,
        ),
    )
    engine.prompt_logits(wins[0][:rows])  # compiles the scoring bucket: not timed
    t = time.perf_counter()
    total, count = 0.0, 0
    for w in wins:
        s, n = nll_of(engine.prompt_logits(w), w)
        total, count = total + s, count + n
    return math.exp(total / count), time.perf_counter() - t


def perplexity_llama_cpp(path: str, wins) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    n = max(len(w) for w in wins)
    llm = Llama(model_path=path, n_ctx=n, n_batch=n, n_threads=os.cpu_count() or 2, logits_all=True, verbose=False)
    t = time.perf_counter()
    total, count = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w)
        s, k = nll_of(np.asarray(llm.scores[: len(w)]), w)
        total, count = total + s, count + k
    return math.exp(total / count), time.perf_counter() - t


def greedy_tokens(path: str, mode: str, prompts: list[list[int]], n: int, kv: str = "auto") -> list[list[int]]:
    from jaxserve.llm import LLM
    from jaxserve.sampling import SamplingParams

    llm = LLM(
        path,
        quantization=mode,
        kv_cache_dtype=kv,
        quiet=True,
        max_model_len=256,
        max_num_seqs=32,
        max_num_batched_tokens=256,
        token_buckets=(8, 32, 256),
    )
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(k)
    return {"exact": sum(x == y for x, y in zip(a, b)) / len(a), "prefix": float(np.mean(prefix))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="none,int8,int4,auto,none+kv8")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--rows", type=int, default=8, help="rows per step (< 16: activations quantized, as decode)")
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.tokens < 4096:
        ap.error("--tokens must be >= 4096")
    from models.loader import default_model_path, load_model

    path = default_model_path()
    modes = [m for m in args.modes.split(",") if m]
    text, digest = reference_text()
    base = load_model(path, quantization="none")
    ids = base.tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"the reference text has only {len(ids)} tokens")
    wins = windows(ids, args.window)
    print(
        f"model {path}\ntext: pydoc_data.topics (Python {sys.version.split()[0]}, sha256 {digest}), "
        f"{len(ids)} tokens in {len(wins)} windows of {args.window}, {args.rows} rows per step"
    )
    tok = base.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    rows, ref_tokens = [], None
    for name in modes:
        mode, _, kv = name.partition("+")
        model = base if mode == "none" else load_model(path, quantization=mode)
        ppl, secs = perplexity_jaxserve(model, wins, args.rows, "int8" if kv == "kv8" else "auto")
        toks = greedy_tokens(path, mode, prompts, args.greedy_tokens, kv="int8" if kv == "kv8" else "auto")
        ref_tokens = toks if name == "none" else ref_tokens
        row = {
            "engine": f"jaxserve {name}",
            "ppl": ppl,
            "seconds": secs,
            "load_s": model.load_seconds,
            "weights": model.describe_weights(),
        }
        if ref_tokens is not None:
            row.update(agreement(toks, ref_tokens))
        rows.append(row)
        print(f"  {row['engine']}: ppl {ppl:.4f} ({secs:.0f}s); {row['weights']}", flush=True)
        del model
    if not args.skip_llama_cpp:
        res = perplexity_llama_cpp(path, wins)
        if res is None:
            print("  llama.cpp: llama-cpp-python not installed: skipped")
        else:
            rows.append({"engine": "llama.cpp (Q4_1 file)", "ppl": res[0], "seconds": res[1]})
    fp32 = next((r["ppl"] for r in rows if r["engine"] == "jaxserve none"), None)
    print(f"\n{'engine':<24}{'perplexity':>12}{'vs fp32':>10}{'greedy exact':>14}{'prefix /32':>12}")
    for r in rows:
        rel = f"{100 * (r['ppl'] / fp32 - 1):+.2f}%" if fp32 else ""
        ex = f"{r['exact']:.0%}" if "exact" in r else ""
        pre = f"{r['prefix']:.1f}" if "prefix" in r else ""
        print(f"{r['engine']:<24}{r['ppl']:>12.4f}{rel:>10}{ex:>14}{pre:>12}")
    print("(greedy columns: 32 chat prompts x 32 tokens against jaxserve none)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": path, "text_sha256": digest, "tokens": len(ids), "args": vars(args), "rows": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
