"""Shared fixtures. JAX settings go here, before anything imports jax's backends."""

from __future__ import annotations

import os

import jax

CACHE = os.environ.get("JAXSERVE_TEST_CACHE", os.path.expanduser("~/.cache/jaxserve/xla-tests"))
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path() -> str:
    from models.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random-weight model (tests.tiny_models.TINY, seed 3), loaded once."""
    from models.loader import load_model
    from tests.tiny_models import TINY, random_arrays, write_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, TINY, random_arrays(TINY, seed=3))
    return load_model(str(path))


@pytest.fixture(scope="session")
def real_model(gguf_path):
    """SmolLM2-135M-Instruct in fp32, loaded once for the session."""
    from models.loader import load_model

    return load_model(gguf_path, dtype="float32")


@pytest.fixture(scope="session")
def real_scorer(real_model):
    """An engine over the real model for one sequence at a time (prompt_logits, single-stream greedy)."""
    from tests.engine_runs import scoring_engine

    return scoring_engine(real_model, 1024, chunk=512, page_size=16, buckets=(1, 512))


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    """The oracle tokenizer: transformers' own GGUF conversion of the same file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """The oracle model: transformers (torch, fp32) loading the same GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    return model.eval()
