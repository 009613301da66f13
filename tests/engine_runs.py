"""Drive an LLMEngine to completion in tests, checking that every page comes back."""

from __future__ import annotations


def greedy(engine, ids, max_tokens: int, *, ignore_eos: bool = True):
    """One greedy request (EOS ignored unless ignore_eos=False), stepped to its end: its CompletionOutput."""
    from jaxserve.sampling import SamplingParams

    engine.add_request("greedy", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos))
    return run_to_end(engine)["greedy"].outputs[0]


def run_to_end(engine) -> dict:
    """Step until no request is left: {request_id: its final output}."""
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


def scoring_engine(model, max_model_len: int, *, chunk: int = 64, page_size: int = 8, buckets=None, **options):
    """An engine for one sequence at a time (prompt_logits, single-stream greedy): prompts in chunks of `chunk`."""
    from jaxserve.engine import LLMEngine
    from jaxserve.options import engine_config

    config = engine_config(
        max_model_len=max_model_len,
        max_num_seqs=1,
        max_num_batched_tokens=chunk,
        page_size=page_size,
        token_buckets=buckets or (chunk,),
        **options,
    )
    return LLMEngine(model, config)


def run_all(engine, prompts, params, prefix="r"):
    """Add every prompt (one SamplingParams for all, or one each), step until done; returns {index: output}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"{prefix}{i}", p, sp)
    done = {int(rid[len(prefix) :]): out for rid, out in run_to_end(engine).items()}
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    bm._check_invariants()
    return done
