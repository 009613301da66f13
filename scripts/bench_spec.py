"""Speculative decoding: jaxserve's n-gram prompt lookup next to plain decoding and the peers' own lookup modes.

    .venv/bin/python scripts/bench_spec.py [--engines jaxserve,hf,llamacpp] [--k 4] [--num-prompts 4]
        [--max-tokens 128] [--ignore-eos] [--sweep 1,2,4,8,16] [--workload-a] [--draft int4,int8 [--draft-k 4]]
        [--json out.json]

Workload G (input-grounded, where lookup pays): chat prompts of the default model that ask it to repeat a
function of Python's standard library with one variable renamed, or to quote a passage of its documentation;
greedy, one stream at a time, each answer up to its EOS (at most --max-tokens; --ignore-eos: always --max-tokens,
the model then goes on past its answer with text of its own that no lookup can predict: the free-text tail that
a user never sees). Every engine gets the same token ids:

  jaxserve        plain decoding, then speculative_config={"method": "ngram", "num_speculative_tokens": k}
                  (output checked token-identical to plain)
  hf              transformers generate(), plain and with prompt_lookup_num_tokens=k (HF's prompt lookup)
  llamacpp        llama-cpp-python (if importable), plain and with LlamaPromptLookupDecoding(num_pred_tokens=k)

Columns: e2e tok/s = output tokens / the request's wall time (prefill included; the same prompts for all),
decode tok/s = the tokens after the first / their time (TTFT excluded; the median prompt's, and "dec all": all
prompts' tokens after the first / all their time, where a long answer weighs what it takes), the speed-up (x)
of each engine's speculation over its own plain decoding, jaxserve's acceptance rate and mean accepted length.
jaxserve's engines are all built first and take the prompts in turn (plain, speculative, plain, ...): drift on
this shared machine moves plain-vs-speculative ratios by up to 30% between runs made minutes apart.
--sweep: jaxserve on B grounded streams at once (EOS ignored: every stream runs all --max-tokens), speculation
on / off, for each B (where speculation stops paying on this CPU: the default disable_by_batch_size).
--workload-a: 64 prompts x 128 random token ids in, 128 out, speculation on (its default disable_by_batch_size)
/ off: speculation must switch itself off.
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


def run_jaxserve(path: str, prompts, args, specs: dict, batch: int = 1, ignore_eos: bool = True, **options) -> dict:
    """{name: speculative_config or None} -> {name: figures}: one engine per entry, all built first, then each
    group of `batch` prompts runs on every engine in turn (the order rotating per group), so this shared
    machine's drift over minutes hits every engine alike: compare them as ratios."""
    from jaxserve.llm import LLM
    from jaxserve.sampling import SamplingParams

    max_len = max(len(p) for p in prompts) + args.max_tokens + 8
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=ignore_eos)
    llms, base, runs = {}, {}, {}
    for name, spec in specs.items():
        llm = llms[name] = LLM(path, quiet=True, max_model_len=max_len, speculative_config=spec, **options)
        warm = SamplingParams(max_tokens=8)
        llm.generate([{"prompt_token_ids": prompts[0][:32]}], warm, use_tqdm=False)
        st = llm.engine.spec_stats
        base[name] = (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens)
        runs[name] = {"tokens": [], "rates": [], "decode": [], "wall": 0.0}
    names = list(specs)
    from jaxserve.compile_stats import compile_counter

    compiles0 = compile_counter().snapshot()[0]  # process-wide: every engine is built and warm by now
    for g, i in enumerate(range(0, len(prompts), batch)):
        group = prompts[i : i + batch]
        for name in names[g % len(names) :] + names[: g % len(names)]:
            r = runs[name]
            t = time.perf_counter()
            outs = llms[name].generate([{"prompt_token_ids": p} for p in group], params, use_tqdm=False)
            wall = time.perf_counter() - t
            r["wall"] += wall
            r["tokens"] += [o.outputs[0].token_ids for o in outs]
            r["rates"].append(sum(len(o.outputs[0].token_ids) for o in outs) / wall)
            r["decode"] += [(len(o.outputs[0].token_ids) - 1, o.metrics.tpot) for o in outs if o.metrics.tpot]
    compiles = compile_counter().snapshot()[0] - compiles0
    results = {}
    for name, llm in llms.items():
        r, st = runs[name], llm.engine.spec_stats
        drafts, proposed, accepted = (
            a - b for a, b in zip((st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens), base[name])
        )
        results[name] = {
            "tokens": r["tokens"],
            "tok_s": statistics.median(r["rates"]),
            **decode_rates([(n, n * tpot) for n, tpot in r["decode"]]),
            "total_tok_s": sum(len(t) for t in r["tokens"]) / r["wall"],
            "acceptance": accepted / proposed if proposed else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None,
            "compiles_after_warmup": compiles,  # in this process while the prompts ran, any engine's
        }
    del llms
    return results


def run_hf(path: str, prompts, args, k: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 2)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # when each new token came out (generate's first put() is the prompt)
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    extra = {} if k is None else {"prompt_lookup_num_tokens": k}
    if args.ignore_eos:
        extra["min_new_tokens"] = args.max_tokens
    tokens, rates, decode = [], [], []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=4, do_sample=False, **extra)  # warm
        for p in prompts:
            clock = Clock()
            t = time.perf_counter()
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
                **extra,
            )
            wall = time.perf_counter() - t
            new = out[0, len(p) :].tolist()
            tokens.append(new)
            rates.append(len(new) / wall)
            first = clock.times[1]  # the first new token (several tokens may come in one put with lookup)
            decode.append((len(new) - 1, time.perf_counter() - first))
    return {"tokens": tokens, "tok_s": statistics.median(rates), **decode_rates(decode)}


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
    tokens, rates, decode = [], [], []
    for p in prompts:
        llm.reset()
        t = time.perf_counter()
        new = []
        for tok in llm.generate(p, temp=0.0, top_k=1, reset=True):
            new.append(int(tok))
            if len(new) == 1:
                first = time.perf_counter()
            if len(new) >= args.max_tokens or (int(tok) == llm.token_eos() and not args.ignore_eos):
                break
        end = time.perf_counter()
        tokens.append(new)
        rates.append(len(new) / (end - t))
        decode.append((len(new) - 1, end - first))
    del llm
    return {"tokens": tokens, "tok_s": statistics.median(rates), **decode_rates(decode)}


def decode_rates(runs: list[tuple[int, float]]) -> dict:
    """(tokens after the first, their seconds) per prompt -> the median prompt's decode tok/s, and all prompts'
    tokens over all their time (answers of different lengths: the long ones weigh as much as they take)."""
    runs = [(n, t) for n, t in runs if n > 0 and t > 0]
    return {
        "decode_tok_s": statistics.median(n / t for n, t in runs),
        "decode_all_tok_s": sum(n for n, _ in runs) / sum(t for _, t in runs),
    }


def fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--engines", default="jaxserve,hf,llamacpp")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens (and the peers' lookup length)")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--ignore-eos",
        action="store_true",
        help="G and F: generate --max-tokens past the answer's end (EOS), as the sweep and workload A always do",
    )
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
        log("[jaxserve] plain and ngram, prompt by prompt")
        got = run_jaxserve(path, prompts, args, {"plain": None, "ngram": spec}, ignore_eos=args.ignore_eos)
        plain, fast = got["plain"], got["ngram"]
        exact = fast["tokens"] == plain["tokens"]
        rows.append(("jaxserve fp32", plain, fast, fast["acceptance"], fast["mean_accepted_length"]))
        figures["jaxserve"] = {
            "plain": plain["tok_s"],
            "ngram": fast["tok_s"],
            "plain_decode": plain["decode_tok_s"],
            "ngram_decode": fast["decode_tok_s"],
            "plain_decode_all": plain["decode_all_tok_s"],
            "ngram_decode_all": fast["decode_all_tok_s"],
            "output_lens": [len(t) for t in plain["tokens"]],
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
        rows.append((label, plain_p, fast_p, None, None))
        figures[name] = {
            "plain": plain_p["tok_s"],
            "lookup": fast_p["tok_s"],
            "plain_decode": plain_p["decode_tok_s"],
            "lookup_decode": fast_p["decode_tok_s"],
            "plain_decode_all": plain_p["decode_all_tok_s"],
            "lookup_decode_all": fast_p["decode_all_tok_s"],
            "output_lens": [len(t) for t in plain_p["tokens"]],
        }

    until = f"{args.max_tokens} tokens, EOS ignored" if args.ignore_eos else f"up to EOS or {args.max_tokens} tokens"
    print(f"\nworkload G (grounded), one stream, answers {until}, k={args.k}, tok/s")
    print("  e2e: output tokens / request wall time (prefill included), median prompt; decode: tokens after the")
    print("  first / their time, median prompt; decode all: every prompt's tokens after the first / all their time")
    head = f"{'engine':24} {'e2e':>7} {'lookup':>7} {'x':>6}  {'decode':>7} {'lookup':>7} {'x':>6}"
    print(f"{head}  {'dec all':>7} {'lookup':>7} {'x':>6} {'accept':>7} {'mean len':>9}")
    for label, p, f, acc, mal in rows:
        e, d = (p["tok_s"], f["tok_s"]), (p["decode_tok_s"], f["decode_tok_s"])
        a = (p["decode_all_tok_s"], f["decode_all_tok_s"])
        print(
            f"{label:24} {e[0]:7.1f} {e[1]:7.1f} {e[1] / e[0]:5.2f}x  {d[0]:7.1f} {d[1]:7.1f} {d[1] / d[0]:5.2f}x "
            f" {a[0]:7.1f} {a[1]:7.1f} {a[1] / a[0]:5.2f}x {fmt(acc, '{:.0%}'):>7} {fmt(mal):>9}"
        )
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
        draft = {"method": "draft_model", "model": path, "num_speculative_tokens": args.draft_k}
        quants = args.draft.split(",")
        got_all = run_jaxserve(
            path,
            free,
            args,
            {"plain": None} | {q: dict(draft, quantization=q) for q in quants},
            ignore_eos=args.ignore_eos,
        )
        plain = got_all["plain"]
        print(f"\nworkload F (free text), one stream, tok/s (median of {len(free)} prompts), k={args.draft_k}")
        head = f"{'jaxserve fp32 target, draft':28} {'e2e':>7} {'x':>6}  {'decode':>7} {'x':>6}"
        print(f"{head} {'accept':>7} {'mean len':>9} exact")
        print(f"{'none (plain decoding)':28} {plain['tok_s']:7.1f} {'':6}  {plain['decode_tok_s']:7.1f}")
        figures["draft"] = {"plain": plain["tok_s"], "plain_decode": plain["decode_tok_s"]}
        for quant in quants:
            got = got_all[quant]
            exact = got["tokens"] == plain["tokens"]
            figures["draft"][quant] = {
                "tok_s": got["tok_s"],
                "decode_tok_s": got["decode_tok_s"],
                "acceptance": got["acceptance"],
                "mean_accepted_length": got["mean_accepted_length"],
                "exact": exact,
                "compiles_after_warmup": got["compiles_after_warmup"],
            }
            print(
                f"{'self, ' + quant:28} {got['tok_s']:7.1f} {got['tok_s'] / plain['tok_s']:5.2f}x  "
                f"{got['decode_tok_s']:7.1f} {got['decode_tok_s'] / plain['decode_tok_s']:5.2f}x "
                f"{fmt(got['acceptance'], '{:.0%}'):>7} {fmt(got['mean_accepted_length']):>9} {exact}"
            )

    if args.sweep:
        print("\nsweep: B grounded streams at once (speculation's disable_by_batch_size off), total tok/s")
        print(f"{'B':>4} {'off':>8} {'ngram':>8} {'ratio':>7} {'accept':>7}")
        figures["sweep"] = {}
        for b in [int(x) for x in args.sweep.split(",")]:
            ps = (prompts * (-(-b // len(prompts))))[:b]
            got = run_jaxserve(path, ps, args, {"off": None, "on": dict(spec, disable_by_batch_size=None)}, batch=b)
            off, on = got["off"], got["on"]
            figures["sweep"][b] = {"off": off["total_tok_s"], "on": on["total_tok_s"], "acceptance": on["acceptance"]}
            print(
                f"{b:4} {off['total_tok_s']:8.1f} {on['total_tok_s']:8.1f} "
                f"{on['total_tok_s'] / off['total_tok_s']:6.2f}x {fmt(on['acceptance'], '{:.0%}'):>7}"
            )

    if args.workload_a:
        rng = np.random.default_rng(0)
        ids = [rng.integers(100, tok.vocab_size - 100, 128).tolist() for _ in range(64)]
        a_args = argparse.Namespace(**{**vars(args), "max_tokens": 128})
        got = run_jaxserve(path, ids, a_args, {"off": None, "on": spec}, batch=64, max_num_seqs=64)
        off, on = got["off"], got["on"]
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
