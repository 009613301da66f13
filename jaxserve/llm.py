"""`LLM`: offline batched generation, shaped like vLLM's so its users switch by changing the import.

from jaxserve import LLM, SamplingParams
llm = LLM()                                   # the default SmolLM2-135M-Instruct; LLM(model=path) another
outs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0.8, max_tokens=64))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses

import itertools
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jaxserve.config import DEFAULT_COMPILE_CACHE_DIR
from jaxserve.options import engine_config
from jaxserve.outputs import RequestOutput
from jaxserve.sampling import SamplingParams
from jaxserve.sampling_params import RequestOutputKind

if TYPE_CHECKING:
    from models.loader import LoadedModel

__all__ = ["DEFAULT_COMPILE_CACHE_DIR", "LLM", "build_engine", "engine_config", "enable_compile_cache"]

Prompt = str | dict | Sequence[int]


def enable_compile_cache(path: str | None) -> None:
    """Persist compiled executables under `path` (None or '' disables), so a second start-up loads them."""
    import jax

    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def build_engine(
    model: "str | LoadedModel | None" = None,
    *,
    dtype: str = "float32",
    quantization: str = "none",
    max_model_len: int | None = None,
    compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR,
    progress: bool = True,
    quiet: bool = False,
    **options,
):
    """Load a model and start an engine on it (every bucket compiled before this returns). `options`: the
    engine options of jaxserve.options.OPTIONS (and token_buckets, enable_chunked_prefill). `model` may be a
    model loaded already (models.loader.load_model: several engines over one load); dtype and quantization are
    then its own, and asking for others is an error."""
    from jaxserve.engine import LLMEngine
    from models.loader import LoadedModel, load_model

    enable_compile_cache(compile_cache_dir)
    mesh = None  # (an orbax checkpoint under tensor parallel: restored into this mesh's shards)
    if isinstance(model, LoadedModel):
        if (dtype, quantization) not in (("float32", "none"), (str(model.dtype), model.quantization)):
            raise ValueError(
                f"dtype={dtype!r}, quantization={quantization!r}: the loaded model is {model.dtype}, "
                f"quantization={model.quantization!r} (load it again to change them)"
            )
        loaded = model
    else:
        mesh = _restore_mesh(model, options)
        loaded = load_model(model, dtype=dtype, quantization=quantization, mesh=mesh, progress=progress and not quiet)
    max_len = max_model_len or min(2048, loaded.config.max_position_embeddings)
    config = engine_config(max_model_len=max_len, **options)
    show = progress and not quiet
    dp = config.parallel.data_parallel_size
    if dp > 1:  # one engine per mesh row
        from jaxserve.parallel import DataParallelEngine, make_mesh

        grid = make_mesh(config.parallel)
        engines = [LLMEngine(loaded, config, progress=show, mesh=grid.replica(r)) for r in range(dp)]
        engine = DataParallelEngine(engines)
    else:  # (a tensor-parallel engine builds its own mesh)
        engine = LLMEngine(loaded, config, progress=show, mesh=mesh)
        engines = [engine]
    if not quiet:
        runner = engines[0].runner
        print(
            f"[jaxserve] {loaded.config.name} ({os.path.basename(loaded.path)}), {dtype}, loaded in "
            f"{loaded.load_seconds:.1f}s; {loaded.describe_weights()}; {runner.pool.describe()}, allocated in "
            f"{runner.kv_alloc_seconds:.2f}s; "
            f"{runner.describe_memory()}"
            f"{f'; {dp} data-parallel replicas' if dp > 1 else ''}; "
            f"{runner.describe_compile_plan()}",
            file=sys.stderr,
        )
    return engine


def _restore_mesh(model, options: dict):
    """An orbax checkpoint under tensor parallel (one replica): the engine's mesh, built before loading so each
    weight is restored straight into its shards (models.checkpoint); else None (load, then shard)."""
    from models.checkpoint import is_checkpoint

    if model is None or not is_checkpoint(os.fspath(model)):
        return None
    from jaxserve.options import parallel_config

    parallel = parallel_config(**options)
    if parallel.data_parallel_size > 1 or (parallel.tensor_parallel_size == 1 and not parallel.multihost):
        return None
    from jaxserve.parallel import make_mesh

    return make_mesh(dataclasses.replace(parallel, data_parallel_size=1)).replica(0)


class LLM:
    """Offline generation over a continuously batched engine. Keyword options: jaxserve.options.OPTIONS."""

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "float32",
        quantization: str = "none",
        max_model_len: int | None = None,
        compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR,
        quiet: bool = False,
        **options,
    ):
        """quantization (vLLM's name): "none" | "int8" | "int4" | "auto" (a GGUF file's own precision); see
        models.quant."""
        self.engine = build_engine(
            model,
            dtype=dtype,
            quantization=quantization,
            max_model_len=max_model_len,
            compile_cache_dir=compile_cache_dir,
            quiet=quiet,
            **options,
        )
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine) -> "LLM":
        """Wrap an engine that is already running (tests, or several front ends over one engine)."""
        llm = cls.__new__(cls)
        llm.engine, llm._ids = engine, itertools.count()
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One finished output per prompt, in the prompts' order. A prompt is a str, {"prompt": str} or
        {"prompt_token_ids": [...]}. Bad input raises ValueError before anything runs."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"priority: {len(priority)} given for {len(prompts)} prompts")
        engine = self.engine
        requests = [(f"llm-{next(self._ids)}", _prompt_input(p, i)) for i, p in enumerate(prompts)]
        for (rid, prompt), p in zip(requests, params):  # validate everything before queueing anything
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params: need SamplingParams, got {type(p).__name__}")
            engine.check_prompt(engine.tokenize(prompt)[1])
        return self._run(requests, params, priority, use_tqdm)

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        # (contents are text: special-token text typed into a message never becomes a control token)
        rendered = [tok.chat_prompt(list(c), add_generation_prompt=add_generation_prompt) for c in conversations]
        outs = self.generate([{"prompt_token_ids": ids} for _, ids in rendered], sampling_params, use_tqdm=use_tqdm)
        return [dataclasses.replace(o, prompt=text) for o, (text, _) in zip(outs, rendered)]

    def _run(self, requests, params, priority, use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        engine = self.engine
        done: dict[str, RequestOutput] = {}
        pending = list(zip(requests, params, priority))[::-1]
        bar = tqdm(total=len(requests), desc="generating", unit="req", disable=not use_tqdm, file=sys.stderr)
        try:
            while pending or engine.has_unfinished_requests():
                # Feed the queue up to its bound; the rest waits here, not in the engine.
                room = engine.waiting_room
                while pending and pending[-1][1].n <= room:
                    (rid, prompt), p, prio = pending.pop()
                    # (only the finished output is read: nothing is copied per step, as vLLM's LLM does)
                    engine.add_request(rid, prompt, _final_only(p), priority=prio)
                    room -= p.n
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid, _ in requests:  # leave the engine clean for the next call
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid, _ in requests]


def _final_only(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)


def _prompt_input(prompt: Prompt, index: int) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValueError(f"prompts[{index}].prompt_token_ids: need a list of ints")
            return list(ids)
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"]
        raise ValueError(f"prompts[{index}]: a dict prompt needs 'prompt' (str) or 'prompt_token_ids' (list of ints)")
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ValueError(f"prompts[{index}]: need a str, a list of token ids or a dict, got {type(prompt).__name__}")
