"""Weight loaders: GGUF (every quant type, Q/K un-permutation, malformed files) and HF safetensors dirs."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch

from models.gguf_loader import GGUFFile, ModelFileError
from models.loader import load_model
from tests.tiny_models import TINY, random_arrays, write_gguf

TOL = {"F32": 0.0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}


def assert_same_config(cfg):
    """GGUF stores rms_norm_eps as f32, so it comes back rounded."""
    assert cfg.rms_norm_eps == pytest.approx(TINY.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(cfg, rms_norm_eps=TINY.rms_norm_eps) == TINY


@pytest.fixture(scope="module")
def tiny_arrays():
    return random_arrays(TINY, seed=1)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_arrays):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, TINY, tiny_arrays)
    return path


@pytest.mark.parametrize("qtype", list(TOL))
def test_gguf_roundtrip_undoes_qk_permutation(tmp_path, tiny_arrays, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, TINY, tiny_arrays, qtype=qtype)
    f = GGUFFile(path)
    cfg = f.config()
    assert_same_config(cfg)
    loaded = f.load_arrays(cfg)
    assert set(loaded) == set(tiny_arrays)
    for name, want in tiny_arrays.items():
        assert loaded[name].shape == want.shape, name
        np.testing.assert_allclose(
            loaded[name], want, atol=TOL[qtype] * max(1.0, float(np.abs(want).max())), err_msg=name
        )
    if qtype != "F32":  # a wrong permutation would be off by O(1), far beyond any quantization error
        assert not np.allclose(np.asarray(loaded["wq"][0]), np.asarray(tiny_arrays["wq"][0]), atol=0)


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_cpp_dequantizer_equals_ggufs_numpy_one(kind, rng=np.random.default_rng(5)):
    # The load-time C++ pass (kernels_pallas/cpu/dequant.cc: dequantize + Q/K unpermute + transpose) against
    # gguf's numpy dequantizer, bit for bit; rows not a multiple of the 32-row tile, and odd threads' splits.
    from kernels_pallas.cpu import cpu_supports_kernels, dequantize_gguf
    from models.gguf_loader import unpermute_rows

    if not cpu_supports_kernels():
        pytest.skip("no AVX2/FMA/F16C here: the loader keeps gguf's numpy path")
    rows, cols = 72, 96
    qt = getattr(gguf.GGMLQuantizationType, kind)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    data = w if kind == "F32" else w.astype(np.float16) if kind == "F16" else gguf.quants.quantize(w, qt)
    want = np.asarray(gguf.quants.dequantize(data, qt), np.float32).reshape(rows, cols)
    perm = unpermute_rows(np.arange(rows), 3)
    for p in (None, perm):
        ref = want if p is None else want[p]
        np.testing.assert_array_equal(dequantize_gguf(data, kind, rows, cols, perm=p), ref)
        np.testing.assert_array_equal(dequantize_gguf(data, kind, rows, cols, perm=p, transpose=True), ref.T)
    out = np.zeros((cols, rows), np.float32)
    assert dequantize_gguf(data, kind, rows, cols, transpose=True, out=out) is out
    np.testing.assert_array_equal(out, want.T)
    with pytest.raises(ValueError, match="bytes are not"):  # a size that does not match: refused before reading
        dequantize_gguf(data, kind, rows + 1, cols)
    with pytest.raises(ValueError, match="out: need"):
        dequantize_gguf(data, kind, rows, cols, out=np.zeros((cols, rows), np.float32))


def _random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, rng) -> np.ndarray:
    """Random k-quant blocks whose f16 super-block scales (the last/first 2-4 bytes) are sane numbers."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * 256 // block_elems, block_bytes), dtype=np.uint8)
    scale = np.full((blocks.shape[0], 1), 0.01, np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q6_K:  # ... ql, qh, scales, d(f16)
        blocks[:, -2:] = scale
    else:  # Q4_K: d(f16), dmin(f16), scales, qs
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_dequantization_matches_transformers(tmp_path, qtype, rng=np.random.default_rng(0)):
    """gguf-py cannot quantize k-quants, so write random valid blocks and compare with HF's torch dequantizer."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    data = _random_blocks(qt, 4, rng)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("t", data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = GGUFFile(tmp_path / "k.gguf").dequantize("t")
    ref = hf_dequantize(torch.from_numpy(data.reshape(-1).copy()), int(qt)).reshape(4, 256).numpy()
    assert ours.shape == (4, 256)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert np.abs(ours).max() > 0


def test_tiny_gguf_loads_end_to_end(tiny_gguf):
    model = load_model(tiny_gguf)
    assert_same_config(model.config)
    assert model.tokenizer.encode("<|im_start|>hi there") == [1, *model.tokenizer.encode("hi there")]
    assert model.tokenizer.decode(model.tokenizer.encode("hi there")) == "hi there"


# -- malformed files ----------------------------------------------------------------------------------------


def test_wrong_magic(tmp_path, tiny_gguf):
    bad = tmp_path / "bad.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    data[:4] = b"GGML"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="magic"):
        load_model(bad)


def test_not_a_gguf_at_all(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ModelFileError, match="shorter than the 24-byte header"):
        load_model(bad)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.99])
def test_truncated_gguf(tmp_path, tiny_gguf, fraction):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelFileError, match="truncated|malformed"):
        load_model(bad)


def test_absurd_counts_rejected_before_parsing(tmp_path):
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 5) + b"\0" * 64)
    with pytest.raises(ModelFileError, match="absurd GGUF header"):
        load_model(bad)


def test_unsupported_version(tmp_path):
    bad = tmp_path / "v9.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 1, 1) + b"\0" * 64)
    with pytest.raises(ModelFileError, match="version 9"):
        load_model(bad)


def test_tensor_shape_not_matching_config(tmp_path, tiny_arrays):
    bad = tmp_path / "shape.gguf"
    f = TINY.intermediate_size
    write_gguf(bad, TINY, tiny_arrays, shape_override={"blk.1.ffn_up.weight": (f + 32, TINY.hidden_size)})
    with pytest.raises(ModelFileError, match=r"blk\.1\.ffn_up\.weight.*shape \(160, 64\).*\(128, 64\)"):
        load_model(bad)


def test_missing_tensor(tmp_path, tiny_arrays):
    bad = tmp_path / "missing.gguf"
    write_gguf(bad, TINY, tiny_arrays, drop=("blk.0.attn_k.weight",))
    with pytest.raises(ModelFileError, match=r"blk\.0\.attn_k\.weight.*missing"):
        load_model(bad)


def test_missing_path():
    with pytest.raises(ModelFileError, match="no such file"):
        load_model("/nonexistent/model.gguf")


# -- HF safetensors directory (a real HF checkpoint written by transformers) ----------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model, hf_tokenizer):
    d = tmp_path_factory.mktemp("hf") / "smollm2"
    _plain_hf_copy(hf_model).save_pretrained(d, safe_serialization=True, max_shard_size="200MB")
    hf_tokenizer.save_pretrained(d)
    return d


def _plain_hf_copy(hf_model):
    """transformers refuses to save a model it loaded from GGUF (it counts as quantized): copy the dequantized
    weights into a fresh model of the same config, which saves as an ordinary HF checkpoint."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf_model.state_dict())
    return plain


@pytest.mark.real_model
def test_safetensors_dir_matches_gguf(hf_dir, real_model, real_scorer):
    from tests.engine_runs import scoring_engine

    model = load_model(hf_dir)
    assert model.config.num_layers == real_model.config.num_layers
    assert model.config.tie_word_embeddings == real_model.config.tie_word_embeddings
    engine = scoring_engine(model, 256, chunk=256, page_size=16)
    text = real_model.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}]) == text
    ids = real_model.tokenizer.encode(text)
    assert model.tokenizer.encode(text) == ids
    assert model.tokenizer.eos_token_ids[:1] == real_model.tokenizer.eos_token_ids[:1]
    np.testing.assert_allclose(engine.prompt_logits(ids), real_scorer.prompt_logits(ids), atol=1e-4)


@pytest.mark.real_model
def test_sharded_safetensors_dir(tmp_path, hf_model, hf_tokenizer, hf_dir):
    d = tmp_path / "sharded"
    _plain_hf_copy(hf_model).save_pretrained(d, safe_serialization=True, max_shard_size="100MB")
    hf_tokenizer.save_pretrained(d)
    assert os.path.exists(d / "model.safetensors.index.json")
    a, b = load_model(d), load_model(hf_dir)
    np.testing.assert_array_equal(np.asarray(a.params.layers.wq), np.asarray(b.params.layers.wq))
    shutil.rmtree(d)


def test_safetensors_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        load_model(tmp_path)
