"""jaxserve: LLM inference on JAX/XLA. `from jaxserve import LLM, SamplingParams` as in vLLM.

Names are imported lazily so host-only modules (scheduler, block manager) stay free of jax.
"""

_EXPORTS = {
    "LLM": "jaxserve.llm",
    "AsyncEngine": "jaxserve.async_engine",
    "LLMEngine": "jaxserve.engine",
    "EngineConfig": "jaxserve.config",
    "SamplingParams": "jaxserve.sampling_params",
    "RequestOutputKind": "jaxserve.sampling_params",
    "RequestOutput": "jaxserve.outputs",
    "CompletionOutput": "jaxserve.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
