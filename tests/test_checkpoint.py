"""Orbax checkpoints (models.checkpoint, `jaxserve convert`): a round trip keeps every weight's bits, the
tokenizer and the greedy tokens, dense and quantized, on the tiny model and on SmolLM2; damaged or mismatched
checkpoints are refused naming what is wrong. (Restoring into TP 3 shards: tests/test_sharding.py.)"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxserve.cli import main as cli_main
from jaxserve.llm import LLM
from jaxserve.sampling import SamplingParams
from models.checkpoint import META, is_checkpoint, save_checkpoint
from models.gguf_loader import ModelFileError
from models.loader import load_model
from tests.tiny_models import TINY, random_arrays, write_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SHAPE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=1 << 20, token_buckets=(32,))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.gguf"
    write_gguf(path, TINY, random_arrays(TINY, seed=3))
    return str(path)


def same_params(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (
        jax.tree.structure(a) == jax.tree.structure(b)
        and len(la) == len(lb)
        and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
    )


def tokens(model, prompts, **extra) -> list[list[int]]:
    llm = LLM(model, quiet=True, **(SHAPE | extra))
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_tiny_round_trip_keeps_bits_tokenizer_and_greedy_tokens(tiny_gguf, tmp_path, quantization):
    source = load_model(tiny_gguf, quantization=quantization)
    out = str(tmp_path / "ckpt")
    meta = save_checkpoint(source, out, progress=False)
    assert is_checkpoint(out) and meta["quantization"] == quantization
    back = load_model(out)
    assert back.quantization == quantization and back.config == source.config and back.dtype == "float32"
    assert same_params(source.params, back.params)
    text = "hello world, <|im_end|> again"
    assert back.tokenizer.encode(text) == source.tokenizer.encode(text)
    assert back.tokenizer.eos_token_ids == source.tokenizer.eos_token_ids
    assert back.tokenizer.chat_template == source.tokenizer.chat_template
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 40)]
    assert tokens(out, prompts) == tokens(source, prompts)


def test_bfloat16_checkpoint_loads_as_stored_or_cast(tiny_gguf, tmp_path):
    out = str(tmp_path / "bf16")
    save_checkpoint(load_model(tiny_gguf, dtype="bfloat16"), out, progress=False)
    assert load_model(out, dtype="bfloat16").params.layers.wq.dtype == "bfloat16"
    assert load_model(out).params.layers.wq.dtype == "float32"  # the compute dtype asked for


def test_convert_cli_writes_a_checkpoint_and_refuses_a_full_directory(tiny_gguf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them (orbax needs them made absolute)
    assert cli_main(["convert", "--model", tiny_gguf, "--output", "cli", "--quantization", "int8", "--quiet"]) == 0
    assert load_model("cli").quantization == "int8"
    assert cli_main(["convert", "--model", tiny_gguf, "--output", str(out), "--quiet"]) == 2
    assert "--output" in capsys.readouterr().err


def test_damaged_or_mismatched_checkpoints_are_refused(tiny_gguf, tmp_path):
    out = str(tmp_path / "ckpt")
    save_checkpoint(load_model(tiny_gguf, quantization="int8"), out, progress=False)
    with pytest.raises(ValueError, match="quantization='int4'.*holds 'int8'"):
        load_model(out, quantization="int4")
    meta_path = os.path.join(out, META)
    meta = json.load(open(meta_path))

    def write(**change):
        with open(meta_path, "w") as f:
            json.dump(meta | change, f)

    write(format="something-else")
    with pytest.raises(ModelFileError, match="not a jaxserve orbax checkpoint"):
        load_model(out)
    write(version=99)
    with pytest.raises(ModelFileError, match="version 99"):
        load_model(out)
    write(config=meta["config"] | {"hidden_size": 96})  # the stored arrays no longer fit the config
    with pytest.raises(ModelFileError, match="parameter 'embed' holds"):
        load_model(out)
    write(config=meta["config"] | {"num_layers": 10**6})  # the config's own bounds, before anything is read
    with pytest.raises(ValueError, match="num_layers"):
        load_model(out)
    write(tokenizer={"backend": "{not json"})
    with pytest.raises(ModelFileError, match="tokenizer"):
        load_model(out)
    write(config="llama")
    with pytest.raises(ModelFileError, match="config must be an object"):
        load_model(out)
    write(bits={"wq": 3})
    with pytest.raises(ModelFileError, match="bits"):
        load_model(out)
    write()
    os.rename(os.path.join(out, "params", "wq"), os.path.join(out, "params", "wq-gone"))
    with pytest.raises(ModelFileError, match="lacks parameter 'wq'"):
        load_model(out)


def test_real_model_round_trip_is_bit_identical_with_the_same_greedy_tokens(real_model, tmp_path):
    """SmolLM2 fp32 from its GGUF -> orbax -> back: every weight the same bits, the same tokenizer, and one
    chat prompt's greedy answer token-identical."""
    out = str(tmp_path / "smollm2")
    save_checkpoint(real_model, out, progress=False)
    back = load_model(out)
    assert back.config == real_model.config and same_params(real_model.params, back.params)
    tok = real_model.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert back.tokenizer.encode(chat, add_special_tokens=False) == tok.encode(chat, add_special_tokens=False)
    prompt = [tok.encode(chat, add_special_tokens=False)]
    real = dict(kv_cache_memory=16 << 20, max_model_len=256)
    got, want = tokens(back, prompt, **real), tokens(real_model, prompt, **real)
    assert got == want and len(got[0]) == GREEDY.max_tokens
