"""Other Llama-family checkpoints, as transformers itself builds and saves them: tiny random Llama 3 (llama3 RoPE
scaling, untied embeddings), Qwen2 (qkv bias) and Mistral; jaxserve's logits must equal transformers' (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import LlamaConfig, RopeScaling, config_from_hf
from models.loader import load_model
from tests.engine_runs import scoring_engine

VOCAB = 49152  # the SmolLM2 tokenizer is saved beside each checkpoint, so the vocab must match it

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

FAMILIES = {
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(rope_theta=10000.0, tie_word_embeddings=False, sliding_window=128),
    ),  # < prompt length
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_checkpoint(request, tmp_path_factory, hf_tokenizer):
    import transformers

    config_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms, so a norm that is skipped or misplaced changes the output
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0.0, 0.5)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d, safe_serialization=True)
    hf_tokenizer.save_pretrained(d)
    return request.param, d, model


def test_logits_match_transformers(hf_checkpoint):
    family, path, hf_model = hf_checkpoint
    ours = load_model(path)
    assert ours.config.attention_bias == (family == "qwen2")
    assert ours.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    # long enough that llama3 scaling and RoPE at large positions matter
    ids = [int(x) for x in np.random.default_rng(0).integers(0, VOCAB, size=300)]
    got = scoring_engine(ours, 512, chunk=128).prompt_logits(ids)
    with torch.inference_mode():
        want = hf_model(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, _, extra = FAMILIES["llama3"]
    hf = HFLlamaConfig(**COMMON, **extra)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = config_from_hf(hf.to_dict())
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(cfg.rope_inv_freq(), ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_layers": 10**6}, "num_layers"),
        ({"vocab_size": 1 << 40}, "vocab_size"),
        ({"num_heads": 5}, "not a multiple"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ],
)
def test_absurd_configs_are_rejected(changes, message):
    base = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    )
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**base, **changes})
