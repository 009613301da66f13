"""Quantized weights through the model: loaders (GGUF blocks kept bit for bit, dense checkpoints quantized at
load), the tiny model's quantized forward against its dense twin, and the real SmolLM2 in int8 / int4 / auto."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.gguf_loader import GGUFFile, unpermute_rows
from models.loader import load_model
from models.quant import QuantizedWeight, host_dequantize, is_quantized
from tests.tiny_models import TINY, random_arrays, write_gguf


def _weights(model):
    return {k: v for k, v in vars(model.params.layers).items() if v is not None}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("q") / "tiny.gguf")
    write_gguf(path, TINY, random_arrays(TINY, seed=3))
    return path


@pytest.mark.parametrize("mode, bits", [("int8", 8), ("int4", 4)])
def test_f32_checkpoint_quantized_at_load_is_close_to_dense(tiny_gguf, mode, bits):
    dense = load_model(tiny_gguf)
    quant = load_model(tiny_gguf, quantization=mode)
    for name, w in _weights(quant).items():
        if name.endswith("norm"):
            assert not is_quantized(w)
            continue
        assert is_quantized(w) and w.bits == bits, name
        ref = np.asarray(_weights(dense)[name]).swapaxes(-1, -2)  # dense [L, in, out] -> [L, out, in]
        err = np.abs(np.asarray(w.dequantize()) - ref).max()
        assert err <= (0.01 if bits == 8 else 0.1) * np.abs(ref).max(), (name, err)
    assert quant.params.embed.bits == 8  # the embedding / tied LM head stays int8 under int4
    assert "quantization=" + mode in quant.describe_weights()


def test_bad_mode_is_refused(tiny_gguf):
    with pytest.raises(ValueError, match="quantization='int3'"):
        load_model(tiny_gguf, quantization="int3")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiny_quantized_forward_is_the_dense_forward_of_its_weights(tiny_gguf, mode):
    """The quantized model equals a dense model holding its dequantized weights, up to activation quantization
    (int8 per block of 32: ~0.4% relative), through the CPU kernel and through the reference."""
    from tests.test_model import _dense_reference

    quant = load_model(tiny_gguf, quantization=mode)
    arrays = {}
    for f in ("embed", "final_norm", "lm_head"):
        a = getattr(quant.params, f)
        if a is not None:
            a = np.asarray(a.dequantize() if is_quantized(a) else a)
            arrays[f] = a.T if f == "lm_head" else a  # quantized LM head [V, E] -> dense [E, V]
    for name, w in _weights(quant).items():
        arrays[name] = np.asarray(w.dequantize()).swapaxes(-1, -2) if is_quantized(w) else np.asarray(w)
    ids = list(range(3, 40))
    want = _dense_reference(arrays, TINY, ids)
    from tests.engine_runs import scoring_engine

    got = scoring_engine(quant, 64).prompt_logits(ids)
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


# ---- the real model -------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_auto_keeps_the_files_blocks_bit_for_bit(gguf_path):
    """Q4_1 layers and the Q8_0 embedding: values, scales and mins are the file's bytes (Q rows unpermuted)."""
    f = GGUFFile(gguf_path)
    cfg = f.config()
    model = load_model(gguf_path, quantization="auto")
    wq, up, emb = model.params.layers.wq, model.params.layers.w_up, model.params.embed
    assert (wq.bits, up.bits, emb.bits) == (4, 4, 8)
    for layer in (0, cfg.num_layers - 1):
        raw = np.asarray(f.tensors[f"blk.{layer}.ffn_up.weight"].data).reshape(cfg.intermediate_size, -1, 20)
        np.testing.assert_array_equal(np.asarray(up.values[layer]), raw[..., 4:].reshape(cfg.intermediate_size, -1))
        np.testing.assert_array_equal(
            np.asarray(up.scales[layer]).view(np.uint16), raw[..., 0:2].copy().view(np.uint16)[..., 0]
        )
        np.testing.assert_array_equal(
            np.asarray(up.mins[layer]).view(np.uint16), raw[..., 2:4].copy().view(np.uint16)[..., 0]
        )
        rawq = np.asarray(f.tensors[f"blk.{layer}.attn_q.weight"].data).reshape(cfg.hidden_size, -1, 20)
        rows = unpermute_rows(np.arange(cfg.hidden_size), cfg.num_heads)
        np.testing.assert_array_equal(np.asarray(wq.values[layer]), rawq[rows, :, 4:].reshape(cfg.hidden_size, -1))
    raw = np.asarray(f.tensors["token_embd.weight"].data).reshape(cfg.vocab_size, -1, 34)
    np.testing.assert_array_equal(np.asarray(emb.values), raw[..., 2:].copy().view(np.int8).reshape(cfg.vocab_size, -1))
    # ... and they dequantize to what the f32 loader reads (gguf's own dequantizer)
    dense = f.load_arrays(cfg)
    np.testing.assert_allclose(np.asarray(up.dequantize()).swapaxes(-1, -2), dense["w_up"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(wq.dequantize()).swapaxes(-1, -2), dense["wq"], rtol=1e-6, atol=1e-7)
    assert model.load_seconds < load_model(gguf_path).load_seconds * 2
    assert "0.9" in model.describe_weights().split("(")[-1] or "1.0" in model.describe_weights().split("(")[-1]


@pytest.fixture(scope="module")
def teacher_forced(gguf_path, real_model):
    """Top-1 agreement of each mode's teacher-forced logits with fp32 over a fixed ~200-token text."""
    from tests.engine_runs import scoring_engine

    text = (
        "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
        "synthesize foods from carbon dioxide and water. It generally involves the green pigment chlorophyll "
        "and generates oxygen as a byproduct. The process takes place mainly in the leaves, inside cells "
        "that contain chloroplasts, and it is the source of nearly all the oxygen in the atmosphere. In the "
        "first stage, light is absorbed and its energy is stored in ATP and NADPH; in the second, the Calvin "
        "cycle fixes carbon dioxide into sugars that the plant uses to grow."
    )
    ids = real_model.tokenizer.encode(text)
    ref = scoring_engine(real_model, 512, chunk=256, page_size=16).prompt_logits(ids)
    out = {}
    for mode in ("int8", "int4", "auto"):
        quant = load_model(gguf_path, quantization=mode)
        logits = scoring_engine(quant, 512, chunk=256, page_size=16).prompt_logits(ids)
        out[mode] = float((logits.argmax(-1) == ref.argmax(-1)).mean())
    return out


@pytest.mark.real_model
@pytest.mark.parametrize("mode, floor", [("int8", 0.9), ("int4", 0.85), ("auto", 0.9)])
def test_real_model_quantized_agrees_with_fp32(teacher_forced, mode, floor):
    assert teacher_forced[mode] >= floor, teacher_forced


@pytest.mark.real_model
def test_real_model_int4_engine_answers(gguf_path):
    from jaxserve.llm import LLM
    from jaxserve.sampling import SamplingParams

    llm = LLM(
        gguf_path,
        quantization="int4",
        quiet=True,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        token_buckets=(4, 64),
    )
    assert isinstance(llm.engine.runner.params.layers.w_gate, QuantizedWeight)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    outs = llm.generate(["The capital of France is", "def add(a, b):"], greedy, use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text
    assert llm.engine.runner.compiles_since_warmup == 0
    assert jax.tree.leaves(llm.engine.runner.params.layers.w_gate)[0].dtype == jnp.uint8


@pytest.mark.real_model
def test_real_model_int8_kv_cache_answers_and_holds_more_tokens(gguf_path):
    from jaxserve.llm import LLM
    from jaxserve.sampling import SamplingParams

    kw = dict(
        quiet=True,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        token_buckets=(4, 64),
        kv_cache_memory=16 << 20,
    )
    llm = LLM(gguf_path, kv_cache_dtype="int8", **kw)
    pool = llm.engine.runner.pool
    assert pool.dtype == "int8" and "3.76x" in pool.describe()
    assert llm.engine.runner.cache.k.shape[-1] == 64 + 4 and llm.engine.runner.cache.k.dtype == jnp.int8
    f32_pages = (16 << 20) // (2 * 30 * 16 * 3 * 64 * 4)
    assert pool.num_pages >= 3.7 * f32_pages
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text


@pytest.mark.parametrize("qtype, bits", [("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8)])
def test_auto_keeps_q4_0_q4_1_q8_0_blocks_of_a_tiny_file(tmp_path, qtype, bits):
    """auto holds each kept type in its own width, and its dequantized weights are the f32 loader's (Q4_0 as
    Q4_1's form with min = -8 * scale: the same values)."""
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_gguf(path, TINY, random_arrays(TINY, seed=4), qtype=qtype)
    dense = GGUFFile(path).load_arrays(TINY)
    model = load_model(path, quantization="auto")
    for name, w in _weights(model).items():
        if name.endswith("norm"):
            continue
        assert w.bits == bits, name
        np.testing.assert_allclose(
            np.asarray(w.dequantize()).swapaxes(-1, -2), dense[name], rtol=1e-6, atol=1e-7, err_msg=name
        )
    if qtype == "Q4_0":
        wq = model.params.layers.wq
        np.testing.assert_array_equal(np.asarray(wq.mins), (np.asarray(wq.scales, np.float32) * -8).astype(np.float16))


@pytest.mark.parametrize("qtype, mode", [("Q4_K", "int4"), ("Q6_K", "int8")])
def test_auto_requantizes_k_quants(tmp_path, qtype, mode):
    """K-quants are not kept: auto requantizes Q2-Q4_K to int4 and Q5/Q6_K to int8, within half a step."""
    import gguf

    from tests.test_loaders import _random_blocks

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("t", _random_blocks(qt, 4, np.random.default_rng(1)), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "k.gguf")
    assert f.tensor_mode("t", "auto") == mode and f.tensor_mode("t", "none") == "dense"
    q = f._quantized("t", mode)
    want = f.dequantize("t")
    step = q.scales.astype(np.float32).repeat(32, axis=-1)
    assert np.all(np.abs(host_dequantize(q) - want) <= 0.5 * step + 2e-3 * np.abs(want).max())


@pytest.mark.parametrize(
    "backend, rows", [("cpu", 1), ("cpu", 6), ("cpu", 40), ("reference", 3), ("reference", 10), ("reference", 20)]
)
def test_lm_head_splits_activations_in_two_int8_terms(backend, rows):
    """head_linear: where the matmul quantizes x, x = x_q + r runs as 2M rows and the logits come within 1e-4
    of their scale of the f64 product of the int8 weights, 10x closer than the plain quantized product (so the
    test tells them apart); where the path keeps x f32 (the reference from 16 rows on; 2M >= 16 pads) it is
    that product."""
    from kernels_pallas.quantized_matmul import quantizes_activations
    from models.quant import head_linear, linear, quantize_int8

    rng = np.random.default_rng(rows)
    w = quantize_int8(rng.standard_normal((96, 128)).astype(np.float32)).to_device()
    x = rng.standard_normal((rows, 128)).astype(np.float32) * np.linspace(0.1, 3, 128, dtype=np.float32)
    want = x.astype(np.float64) @ np.asarray(w.dequantize(), np.float64).T
    got = np.asarray(jax.jit(lambda x: head_linear(x, w, backend=backend))(x))
    plain = np.asarray(jax.jit(lambda x: linear(x, w, backend=backend))(x))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    if quantizes_activations(rows, backend):
        assert np.abs(plain - want).max() >= 10 * np.abs(got - want).max()
