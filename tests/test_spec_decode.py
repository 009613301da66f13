"""Speculative decoding, host side: the config's parsing (vLLM's dict and the --speculative-config JSON) and the
n-gram proposer against a brute-force reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.spec_decode import NgramProposer, SpeculativeConfig


def _ngram(k=4, lo=1, hi=4, max_model_len=1 << 20) -> NgramProposer:
    cfg = SpeculativeConfig("ngram", k, prompt_lookup_min=lo, prompt_lookup_max=hi)
    return NgramProposer(cfg, max_model_len)


def reference(tokens: list[int], k: int, lo: int, hi: int, max_model_len: int) -> list[int]:
    """The definition, by brute force: the longest n in [lo, hi] whose suffix occurs earlier; its earliest
    occurrence; the k tokens after it (fewer at the end, none past the context)."""
    k = min(k, max_model_len - len(tokens))
    if k <= 0:
        return []
    for n in range(hi, lo - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for i in range(len(tokens) - n):
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


def test_the_docstring_example():
    # vLLM's: [1,2,3,4,2,3], n in [2, 3], k 4 -> "4 2 3" has no earlier match, "2 3" does: propose what followed
    assert _ngram(k=4, lo=2, hi=3).propose([1, 2, 3, 4, 2, 3]) == [4, 2, 3]


def test_longest_match_first_then_earliest():
    tokens = [1, 2, 5, 9, 1, 2, 6, 9, 1, 2]
    # "9 1 2" occurred at 3: the longest match wins over the earlier "1 2" at 0
    assert _ngram(k=2, lo=1, hi=3).propose(tokens) == [6, 9]
    # matching only 2-grams: "1 2" at 0 and 4, the earliest -> what followed it
    assert _ngram(k=2, lo=2, hi=2).propose(tokens) == [5, 9]


def test_no_match_short_context_and_the_context_end():
    assert _ngram(lo=2).propose([1, 2, 3, 4]) == []  # no repeated n-gram of 2+
    assert _ngram().propose([5]) == []  # nothing earlier to match
    assert _ngram().propose([]) == []
    # proposals never run past max_model_len: 6 tokens of 8 leave room for 2
    assert _ngram(k=4, max_model_len=8).propose([1, 2, 3, 1, 2, 3]) == [1, 2]
    assert _ngram(k=4, max_model_len=6).propose([1, 2, 3, 1, 2, 3]) == []


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), max_size=60),
    k=st.integers(1, 6),
    lo=st.integers(1, 3),
    extra=st.integers(0, 3),
    room=st.integers(0, 80),
)
def test_matches_the_brute_force_definition(tokens, k, lo, extra, room):
    hi = lo + extra
    max_model_len = len(tokens) + room - 10
    got = _ngram(k=k, lo=lo, hi=hi, max_model_len=max_model_len).propose(tokens)
    assert got == reference(tokens, k, lo, hi, max_model_len)


def test_config_parses_vllm_dicts_and_json():
    cfg = SpeculativeConfig.parse(
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    )
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == ("ngram", 4, 2, 4)
    draft = SpeculativeConfig.parse('{"method": "draft_model", "model": "d.gguf", "num_speculative_tokens": 3}')
    assert draft.model == "d.gguf" and draft.num_speculative_tokens == 3
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse(cfg) is cfg


@pytest.mark.parametrize(
    "value,field",
    [
        ('{"method": "ngram"', "speculative_config"),  # not JSON
        ("[1, 2]", "speculative_config"),
        ({"num_speculative_tokens": 4}, "method"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "eagle", "num_speculative_tokens": 4}, "method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5}, "prompt_lookup_min"),
        ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 0}, "prompt_lookup_max"),
        ({"method": "ngram", "num_speculative_tokens": 4, "model": "x"}, "model"),
        ({"method": "draft_model", "num_speculative_tokens": 4}, "model"),
        ({"method": "ngram", "num_speculative_tokens": 4, "num_lookahead": 2}, "num_lookahead"),
        ({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ],
)
def test_bad_configs_name_their_field(value, field):
    with pytest.raises(ValueError) as info:
        SpeculativeConfig.parse(value)
    assert str(info.value).startswith(f"speculative_config.{field}" if field != "speculative_config" else field)
