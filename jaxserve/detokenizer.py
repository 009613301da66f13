"""Incremental detokenization: text deltas that never split a UTF-8 character and join to the full decode."""

from __future__ import annotations

from models.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; get the text each one completes.

    Decoding a window of recent tokens (rather than one token) keeps tokenizers whose pieces depend on their
    neighbours right; a delta is held back while the window ends in an incomplete UTF-8 sequence. Only the
    window is kept (the text is the caller's: the deltas), so each token costs the same however long the
    sequence is.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []  # the window: tokens from the window start on
        self._read_offset = 0  # tokens of the window before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.token_ids.append(int(token_id))
        prefix = self._decode(self.token_ids[: self._read_offset])
        full = self._decode(self.token_ids)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            # the new window starts where this one was read up to
            del self.token_ids[: self._read_offset]
            self._read_offset = len(self.token_ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end of a stream: whatever is held back (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.token_ids[: self._read_offset])
        full = self._decode(self.token_ids)
        self.token_ids, self._read_offset = [], 0
        return full[len(prefix) :]


class TextStream:
    """One sequence's text as it is generated: incremental detokenization plus stop strings.

    `add` returns (delta, stop): the text that is safe to show now, and the stop string that ended the text
    (None if none). Up to (longest stop string - 1) characters are held back, because they may be the start of
    a stop string that the next tokens complete; so a stop string never leaks into a delta, and the deltas
    joined equal the final text (cut before the stop string unless include_stop_str_in_output). Only the
    held-back tail is kept: a token's work does not grow with the text before it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: tuple[str, ...] = (),
        *,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop = tuple(stop)
        self.include_stop = include_stop_str_in_output
        self._longest = max((len(s) for s in self.stop), default=0)
        self._held = ""  # decoded, not yet returned: fewer than longest characters (any stop string starts here)
        self.stopped: str | None = None

    def add(self, token_id: int) -> tuple[str, str | None]:
        if self.stopped is not None:
            return "", self.stopped
        return self._advance(self.detok.add(token_id), final=False)

    def finish(self) -> str:
        """The held-back tail at the end of the sequence."""
        if self.stopped is not None:
            return ""
        delta, _ = self._advance(self.detok.flush(), final=True)
        return delta

    def _advance(self, new: str, final: bool) -> tuple[str, str | None]:
        if new:
            # Text already returned was checked when it was held: a match can only start in the held tail.
            held = self._held + new
            hit = min(((i, s) for s in self.stop if (i := held.find(s)) >= 0), default=None)
            if hit is not None:
                i, s = hit
                held = held[: i + len(s) if self.include_stop else i]
                self.stopped = s
                final = True
            self._held = held
        release = len(self._held) if final or not self._longest else max(0, len(self._held) - self._longest + 1)
        delta, self._held = self._held[:release], self._held[release:]
        return delta, self.stopped
