"""Drive an LLMEngine to completion in tests, checking that every page comes back."""

from __future__ import annotations


def run_all(engine, prompts, params, prefix="r"):
    """Add every prompt (one SamplingParams for all, or one each), step until done; returns {index: output}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"{prefix}{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id[len(prefix):])] = out
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    bm._check_invariants()
    return done
