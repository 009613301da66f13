"""IncrementalDetokenizer on the real SmolLM2-135M-Instruct tokenizer: streamed deltas join to the full decode,
every partial stream is a prefix of it, and no delta carries half a UTF-8 character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.detokenizer import REPLACEMENT, IncrementalDetokenizer
from models.tokenizer import Tokenizer
from tests.test_tokenizer import CORPUS_IDS, CORPUS_TEXTS

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    from models.gguf_loader import GGUFFile

    return Tokenizer.from_gguf_metadata(GGUFFile(gguf_path).tokenizer_metadata())


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    final = detok.flush()
    assert len(detok.token_ids) == 0  # only a window is kept, and flush empties it
    return deltas, final


def _check_stream(tok: Tokenizer, text: str, skip_special_tokens: bool) -> list[str]:
    ids = tok.encode(text, add_special_tokens=False)
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    deltas, final = _stream(tok, ids, skip_special_tokens)
    assert "".join(deltas) + final == expected
    # Streaming is monotone: whatever has been sent so far is a prefix of the final text.
    sent = ""
    for d in deltas:
        sent += d
        assert expected.startswith(sent)
    if REPLACEMENT not in expected:
        # No half character ever leaves the detokenizer, and a stream of complete text needs no flush.
        assert not any(REPLACEMENT in d for d in deltas)
        assert final == ""
    return deltas


@pytest.mark.parametrize("text", CORPUS_TEXTS, ids=CORPUS_IDS)
def test_stream_joins_to_decode(tok, text):
    _check_stream(tok, text, skip_special_tokens=True)


@pytest.mark.parametrize("text", CORPUS_TEXTS, ids=CORPUS_IDS)
def test_stream_joins_to_decode_keeping_specials(tok, text):
    _check_stream(tok, text, skip_special_tokens=False)


def test_corpus_splits_characters_across_tokens(tok):
    """The corpus really exercises hold-back: some tokens end mid-character, and their delta waits."""
    held_back = 0
    for text in CORPUS_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        singles = [tok.decode([i]) for i in ids]
        deltas = _check_stream(tok, text, skip_special_tokens=True)
        held_back += sum(1 for s, d in zip(singles, deltas) if REPLACEMENT in s and d == "")
    assert held_back >= 10


@pytest.mark.parametrize(
    "text",
    ["😀", "👨\u200d👩\u200d👧\u200d👦", "日本語", "🇫🇷🇯🇵"],
    ids=["emoji", "zwj_family", "cjk", "flags"],
)
def test_multibyte_emitted_whole(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, final = _stream(tok, ids)
    assert final == ""
    assert "".join(deltas) == text
    # Each non-empty delta is a run of whole characters of the text, in order.
    pos = 0
    for d in deltas:
        assert text[pos : pos + len(d)] == d
        pos += len(d)


def test_special_tokens_skipped_in_stream(tok):
    ids = tok.encode("<|im_start|>assistant\nHello 🤗<|im_end|>", add_special_tokens=False)
    deltas, final = _stream(tok, ids)
    assert "".join(deltas) + final == "assistant\nHello 🤗"
    assert deltas[0] == "" and deltas[-1] == ""  # <|im_start|> and <|im_end|> contribute nothing


def test_incomplete_tail_is_flushed(tok):
    """A stream cut off mid-character emits nothing for it until flush(), which gives the decoder's U+FFFD."""
    ids = tok.encode("ok 🤗", add_special_tokens=False)
    cut = None
    for n in range(1, len(ids)):
        if tok.decode(ids[:n]).endswith(REPLACEMENT):
            cut = n
            break
    assert cut is not None, "🤗 should span more than one token"
    deltas, final = _stream(tok, ids[:cut])
    assert REPLACEMENT not in "".join(deltas)
    assert "".join(deltas) + final == tok.decode(ids[:cut])
    assert final.endswith(REPLACEMENT)


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_random_text_stream(tok, text):
    _check_stream(tok, text, skip_special_tokens=True)
