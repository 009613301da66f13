"""Speculative decoding: jaxserve's n-gram prompt lookup next to plain decoding and the peers' own lookup modes.

    .venv/bin/python scripts/bench_spec.py [--engines jaxserve,hf,llamacpp] [--k 4] [--num-prompts 4]
        [--max-tokens 128] [--sweep 1,2,4,8,16] [--workload-a] [--draft int4,int8 [--draft-k 4]] [--json out.json]

Workload G (input-grounded, where lookup pays): chat prompts of the default model that ask it to repeat a
function of Python's standard library with one variable renamed, or to quote a passage of its documentation;
greedy, --max-tokens out (EOS ignored), one stream at a time. Every engine gets the same token ids:

  jaxserve        plain decoding, then speculative_config={"method": "ngram", "num_speculative_tokens": k}
                  (output checked token-identical to plain)
  hf              transformers generate(), plain and with prompt_lookup_num_tokens=k (HF's prompt lookup)
  llamacpp        llama-cpp-python (if importable), plain and with LlamaPromptLookupDecoding(num_pred_tokens=k)

Columns: e2e tok/s = output tokens / the request's wall time (prefill included; the same prompts for all), the
speed-up of each engine's speculation over its own plain decoding, jaxserve's acceptance rate and mean accepted
length. --sweep: jaxserve on B grounded streams at once, speculation on / off, for each B (where speculation
stops paying on this CPU: the default disable_by_batch_size). --workload-a: 64 prompts x 128 random token ids
in, 128 out, speculation on (its default disable_by_batch_size) / off: speculation must switch itself off.
--draft: workload F (free-text chat answers), jaxserve plain next to a draft model: the target's own file
quantized (a self-speculative pair; no second model file ships here), output checked token-identical. No peer
runs F with a draft: HF's assisted generation and llama.cpp's -md need a second, smaller model with this
tokenizer, and none is installed here.
Absolute times on a shared machine are noise; compare within one run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SOURCES = (
    ("textwrap", "dedent", "lines", "rows"),
    ("shlex", "quote", "s", "text"),
    ("fnmatch", "fnmatch", "name", "filename"),
    ("posixpath", "join", "path", "base"),
    ("string", "capwords", "s", "phrase"),
    ("glob", "has_magic", "s", "pattern"),
    ("heapq", "nsmallest", "n", "count"),
    ("bisect", "insort_right", "a", "arr"),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def grounded_prompts(tok, n: int) -> list[list[int]]:
    """Chat prompts whose answers copy their input: a function with one variable renamed, or a quote."""
    import importlib

    out = []
    for i in range(n):
        mod, fn, old, new = SOURCES[i % len(SOURCES)]
        func = getattr(importlib.import_module(mod), fn)
        if i % 4 == 3:  # a quote of the function's documentation
            doc = inspect.getdoc(func) or ""
            text = f"Here is a passage:\n\n{doc}\n\nRepeat the passage above word for word."
        else:
            code = inspect.getsource(func)
            text = (
                f"Rewrite this Python function with the variable `{old}` renamed to `{new}`. Output only the "
                f"code.\n\n```python\n{code}```"
            )
        chat = [{"role": "user", "content": text}]
        out.append(tok.encode(tok.apply_chat_template(chat), add_special_tokens=False))
    return out


FREE_TEXT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a ten-year-old how a bicycle stays upright.",
    "Describe a walk through a city market on a rainy morning.",
    "What are the pros and cons of working from home? Answer in a few paragraphs.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain why the sky is blue and sunsets are red.",
    "Give advice to someone starting to learn the piano.",
    "Tell the history of the printing press in a few paragraphs.",
)


def free_prompts(tok, n: int) -> list[list[int]]:
    """Workload F: chat prompts whose answers are free text (nothing to look up in the prompt)."""
    chats = [[{"role": "user", "content": FREE_TEXT[i % len(FREE_TEXT)]}] for i in range(n)]
    return [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in chats]


def run_jaxserve(path: str, prompts, args, spec: dict | None, batch: int = 1, **options) -> dict:
    from jaxserve.llm import LLM
    from jaxserve.sampling import SamplingParams

    max_len = max(len(p) for p in prompts) + args.max_tokens + 8
    llm = LLM(path, quiet=True, max_model_len=max_len, speculative_config=spec, **options)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:32]}], SamplingParams(max_tokens=8), use_tqdm=False)  # warm
    engine = llm.engine
    st = engine.spec_stats
    base = (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens)
    tokens, rates = [], []
    t_all = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in group], params, use_tqdm=False)
        wall = time.perf_counter() - t
        tokens += [o.outputs[0].token_ids for o in outs]
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / wall)
    wall_all = time.perf_counter() - t_all
    drafts, proposed, accepted = (
        a - b for a, b in zip((st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens), base)
    )
    del llm
    return {
        "tokens": tokens,
        "tok_s": statistics.median(rates),
        "total_tok_s": sum(len(t) for t in tokens) / wall_all,
        "acceptance": accepted / proposed if proposed else None,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "compiles_after_warmup": engine.runner.compiles_since_warmup if hasattr(engine, "runner") else None,
    }


def run_hf(path: str, prompts, args, k: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 2)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    extra = {} if k is None else {"prompt_lookup_num_tokens": k}
    tokens, rates = [], []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=4, do_sample=False, **extra)  # warm
        for p in prompts:
            t = time.perf_counter()
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )
            wall = time.perf_counter() - t
            new = out[0, len(p) :].tolist()
            tokens.append(new)
            rates.append(len(new) / wall)
    return {"tokens": tokens, "tok_s": statistics.median(rates)}


def run_llamacpp(path: str, prompts, args, k: int | None) -> dict:
    from llama_cpp import Llama

    draft = None
    if k is not None:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=k)
    n_ctx = max(len(p) for p in prompts) + args.max_tokens + 16
    threads = os.cpu_count() or 2
    llm = Llama(
        path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, draft_model=draft, logits_all=True, verbose=False
    )
    tokens, rates = [], []
    for p in prompts:
        llm.reset()
        t = time.perf_counter()
        new = []
        for tok in llm.generate(p, temp=0.0, top_k=1, reset=True):
            new.append(int(tok))
            if len(new) >= args.max_tokens:
                break
        wall = time.perf_counter() - t
        tokens.append(new)
        rates.append(len(new) / wall)
    del llm
    return {"tokens": tokens, "tok_s": statistics.median(rates)}


def fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--engines", default="jaxserve,hf,llamacpp")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens (and the peers' lookup length)")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sweep", default="", help="comma-separated batch sizes for the on/off sweep (e.g. 1,2,4,8,16)")
    ap.add_argument("--workload-a", action="store_true", help="64 x 128 in, 128 out: speculation on vs off")
    ap.add_argument(
        "--draft",
        default="",
        help="workload F (free text) with a draft model: comma-separated quantizations of the target's own file "
        "as the draft (self-speculative, e.g. int4,int8)",
    )
    ap.add_argument("--draft-k", type=int, default=4, help="num_speculative_tokens of the draft model")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    from models.loader import default_model_path
    from models.gguf_loader import GGUFFile
    from models.tokenizer import Tokenizer

    path = os.path.abspath(args.model) if args.model else default_model_path()
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).tokenizer_metadata())
    prompts = grounded_prompts(tok, args.num_prompts)
    log(f"workload G: {len(prompts)} prompts of {[len(p) for p in prompts]} tokens, {args.max_tokens} out, k={args.k}")
    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    engines = args.engines.split(",")
    rows, figures = [], {"prompt_lens": [len(p) for p in prompts], "k": args.k}

    if "jaxserve" in engines:
        log("[jaxserve] plain")
        plain = run_jaxserve(path, prompts, args, None)
        log("[jaxserve] ngram")
        fast = run_jaxserve(path, prompts, args, spec)
        exact = fast["tokens"] == plain["tokens"]
        rows.append(("jaxserve fp32", plain["tok_s"], fast["tok_s"], fast["acceptance"], fast["mean_accepted_length"]))
        figures["jaxserve"] = {
            "plain": plain["tok_s"],
            "ngram": fast["tok_s"],
            "exact": exact,
            "acceptance": fast["acceptance"],
            "mean_accepted_length": fast["mean_accepted_length"],
            "compiles_after_warmup": fast["compiles_after_warmup"],
        }
        log(f"[jaxserve] ngram output token-identical to plain: {exact}")
    for name, runner, label in (("hf", run_hf, "HF transformers fp32"), ("llamacpp", run_llamacpp, "llama.cpp Q4_1")):
        if name not in engines:
            continue
        try:
            log(f"[{name}] plain")
            plain_p = runner(path, prompts, args, None)
            log(f"[{name}] prompt lookup")
            fast_p = runner(path, prompts, args, args.k)
        except ImportError as e:
            log(f"[{name}] not installed ({e}); skipped")
            continue
        rows.append((label, plain_p["tok_s"], fast_p["tok_s"], None, None))
        figures[name] = {"plain": plain_p["tok_s"], "lookup": fast_p["tok_s"]}

    print(f"\nworkload G (grounded), one stream, e2e tok/s (median of {len(prompts)} prompts), k={args.k}")
    print(f"{'engine':24} {'plain':>8} {'lookup':>8} {'speed-up':>9} {'accept':>7} {'mean len':>9}")
    for label, p, f, acc, mal in rows:
        print(f"{label:24} {p:8.1f} {f:8.1f} {f / p:8.2f}x {fmt(acc, '{:.0%}'):>7} {fmt(mal):>9}")
    if "jaxserve" in figures:
        j = figures["jaxserve"]
        for name in ("hf", "llamacpp"):
            if name in figures:
                print(
                    f"jaxserve ngram / {name} lookup: {j['ngram'] / figures[name]['lookup']:.2f}x; "
                    f"jaxserve ngram / {name} plain: {j['ngram'] / figures[name]['plain']:.2f}x"
                )

    if args.draft:
        free = free_prompts(tok, args.num_prompts)
        log(f"workload F: {len(free)} free-text prompts of {[len(p) for p in free]} tokens, {args.max_tokens} out")
        plain = run_jaxserve(path, free, args, None)
        print(f"\nworkload F (free text), one stream, e2e tok/s (median of {len(free)} prompts), k={args.draft_k}")
        print(f"{'jaxserve fp32 target, draft':32} {'tok/s':>8} {'speed-up':>9} {'accept':>7} {'mean len':>9} exact")
        print(f"{'none (plain decoding)':32} {plain['tok_s']:8.1f}")
        figures["draft"] = {"plain": plain["tok_s"]}
        for quant in args.draft.split(","):
            draft = {"method": "draft_model", "model": path, "num_speculative_tokens": args.draft_k}
            got = run_jaxserve(path, free, args, dict(draft, quantization=quant))
            exact = got["tokens"] == plain["tokens"]
            figures["draft"][quant] = {
                "tok_s": got["tok_s"],
                "acceptance": got["acceptance"],
                "mean_accepted_length": got["mean_accepted_length"],
                "exact": exact,
                "compiles_after_warmup": got["compiles_after_warmup"],
            }
            print(
                f"{'self, ' + quant:32} {got['tok_s']:8.1f} {got['tok_s'] / plain['tok_s']:8.2f}x "
                f"{fmt(got['acceptance'], '{:.0%}'):>7} {fmt(got['mean_accepted_length']):>9} {exact}"
            )

    if args.sweep:
        print("\nsweep: B grounded streams at once (speculation's disable_by_batch_size off), total tok/s")
        print(f"{'B':>4} {'off':>8} {'ngram':>8} {'ratio':>7} {'accept':>7}")
        figures["sweep"] = {}
        for b in [int(x) for x in args.sweep.split(",")]:
            ps = (prompts * (-(-b // len(prompts))))[:b]
            off = run_jaxserve(path, ps, args, None, batch=b)
            on = run_jaxserve(path, ps, args, dict(spec, disable_by_batch_size=None), batch=b)
            figures["sweep"][b] = {"off": off["total_tok_s"], "on": on["total_tok_s"], "acceptance": on["acceptance"]}
            print(
                f"{b:4} {off['total_tok_s']:8.1f} {on['total_tok_s']:8.1f} "
                f"{on['total_tok_s'] / off['total_tok_s']:6.2f}x {fmt(on['acceptance'], '{:.0%}'):>7}"
            )

    if args.workload_a:
        rng = np.random.default_rng(0)
        ids = [rng.integers(100, tok.vocab_size - 100, 128).tolist() for _ in range(64)]
        a_args = argparse.Namespace(**{**vars(args), "max_tokens": 128})
        off = run_jaxserve(path, ids, a_args, None, batch=64, max_num_seqs=64)
        on = run_jaxserve(path, ids, a_args, spec, batch=64, max_num_seqs=64)
        figures["workload_a"] = {"off": off["total_tok_s"], "on": on["total_tok_s"]}
        print(
            f"\nworkload A (64 x 128 in, 128 out): off {off['total_tok_s']:.1f} tok/s, ngram {on['total_tok_s']:.1f} "
            f"tok/s ({on['total_tok_s'] / off['total_tok_s']:.2f}x; acceptance {fmt(on['acceptance'], '{:.0%}')})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
