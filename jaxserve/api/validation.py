"""The one validation layer: every front end (Python API, HTTP, gRPC, batch) turns its input into a
`GenerateRequest` here, and every check names the field it is about.

Sizes are bounded before anything is allocated: the body before parsing, a prompt's characters before
tokenizing, token-id lists before converting. The ranges of the sampling parameters live in one place,
`SamplingParams.__post_init__`; this module maps each front end's names onto it (OpenAI's `max_completion_tokens`
and `top_logprobs`, say) and maps its errors back to the name the client sent.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

from jaxserve.api.errors import APIError, TOO_LARGE, ValidationError, field_of
from jaxserve.sampling_params import MAX_BANNED, SamplingParams, banned_ids, lone_surrogate_at

PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on a request before the engine sees it (the engine's own bounds come from its config)."""

    max_body_bytes: int = 4 << 20
    max_header_bytes: int = 16 << 10
    max_prompt_chars: int = 1 << 20  # checked before tokenizing
    max_messages: int = 1024
    max_request_id_chars: int = 256
    max_timeout_seconds: float = 24 * 3600.0
    max_seqs_per_request: int = 256  # prompts x n that one request may add (the waiting queue holds 4096)
    max_response_bytes: int = 64 << 20  # the most a non-streamed answer may take, estimated before it runs
    stream_write_timeout: float = 30.0  # seconds a streamed chunk may wait on a client that does not read

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"Limits.{f.name}={value!r} must be a positive number")


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """A validated request, front-end neutral. Exactly one of prompt / prompt_token_ids / messages is set."""

    params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None  # rendered with the model's chat template by the front end
    request_id: str | None = None
    model: str | None = None  # 'NAME' or 'NAME@VERSION' (pinned)
    user: str | None = None  # the client's user id: a sticky routing key (one user, one version)
    priority: int = 0
    cache_salt: str | None = None  # prefix-cache pages are shared only among requests with the same salt
    timeout: float | None = None  # seconds from arrival; None = no deadline of its own
    max_tokens_field: str = "max_tokens"  # the client's name for it, for the context check's error


class PromptTooLongError(ValidationError):
    """The prompt leaves no room for a new token in the context (prompts are never truncated)."""


# ---- scalar checks ----------------------------------------------------------------------------------------------


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_request_id(request_id, limits: Limits = Limits(), field: str = "request_id") -> str:
    if not isinstance(request_id, str) or not request_id:
        raise ValidationError(field, "must be a non-empty string")
    if len(request_id) > limits.max_request_id_chars or not request_id.isprintable():
        raise ValidationError(field, f"must be at most {limits.max_request_id_chars} printable characters")
    return request_id


def check_banned(params, eos_token_ids: Sequence[int], field: str = "stop_token_ids") -> None:
    """While min_tokens is not reached a step bans a sequence's stop ids and the model's EOS ids: at most
    MAX_BANNED of them fit the sampler's row (checked here, before queueing, never inside a step)."""
    if params.min_tokens > 0:
        n = len(banned_ids(params, eos_token_ids))
        if n > MAX_BANNED:
            raise ValidationError(
                field,
                f"{len(params.stop_token_ids)} stop token ids and this model's {len(eos_token_ids)} EOS ids "
                f"are {n} ids to ban while min_tokens={params.min_tokens} is not reached; at most {MAX_BANNED} "
                "(fewer stop ids, min_tokens=0 or ignore_eos)",
            )


def check_cache_salt(salt, field: str = "cache_salt") -> str | None:
    """vLLM's cache_salt: a non-empty string of at most 256 printable characters, or None."""
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt or len(salt) > 256 or not salt.isprintable():
        raise ValidationError(field, "must be a non-empty string of at most 256 printable characters")
    return salt


MAX_USER_CHARS = 256


def check_user(user, field: str = "user") -> str | None:
    """OpenAI's `user` (here also the sticky routing key): a string of at most 256 characters, or None."""
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise ValidationError(field, f"must be a string of at most {MAX_USER_CHARS} characters")
    return user


def check_priority(priority, field: str = "priority", *, policy: str = "priority") -> int:
    """An integer in range; other than 0 only where the engine schedules by priority (a client may not jump an
    arrival-order queue)."""
    if not is_int(priority) or abs(priority) > 2**31:
        raise ValidationError(field, f"must be an integer in [-2**31, 2**31], got {_short(priority)}")
    if priority != 0 and policy != "priority":
        raise ValidationError(
            field, f"{priority}: this server schedules in arrival order (start it with --scheduling-policy priority)"
        )
    return priority


def check_timeout(timeout, limits: Limits = Limits(), field: str = "timeout") -> float | None:
    if timeout is None:
        return None
    ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout)
    if not ok or not 0 < timeout <= limits.max_timeout_seconds:
        raise ValidationError(field, f"must be a number of seconds in (0, {limits.max_timeout_seconds:g}]")
    return float(timeout)


# ---- prompts ----------------------------------------------------------------------------------------------------


def check_unicode(text: str, field: str) -> str:
    """Refuse a lone surrogate (sampling_params.lone_surrogate_at), naming the field."""
    at = lone_surrogate_at(text)
    if at is not None:
        raise ValidationError(
            field, f"not valid Unicode text: a lone surrogate (U+{ord(text[at]):04X}) at character {at}"
        )
    return text


def check_prompt_text(text, limits: Limits = Limits(), field: str = "prompt") -> str:
    if not isinstance(text, str):
        raise ValidationError(field, f"must be a string, got {type(text).__name__}")
    if not text:
        raise ValidationError(field, "empty; it must have at least one token")
    if len(text) > limits.max_prompt_chars:
        raise ValidationError(field, f"{len(text)} characters exceeds the limit of {limits.max_prompt_chars}")
    return check_unicode(text, field)


def check_token_id_list(ids, max_len: int, field: str = "prompt") -> tuple[int, ...]:
    """A list of ints, bounded in length before it is converted."""
    if not isinstance(ids, (list, tuple)):
        raise ValidationError(field, f"must be a list of token ids, got {type(ids).__name__}")
    if len(ids) > max_len:
        raise ValidationError(field, f"{len(ids)} token ids exceeds the limit of {max_len}")
    if not all(is_int(t) for t in ids):
        raise ValidationError(field, "every token id must be an integer")
    return tuple(ids)


_TOKEN_BYTES = 16  # JSON per generated token: its text and id
_LOGPROB_BYTES = 96  # JSON per logprob entry (token text, bytes, logprob): an upper estimate


def check_request_size(
    requests: Sequence[GenerateRequest], *, stream: bool, limits: Limits, max_model_len: int
) -> None:
    """Bound the work one request may bring before any of it is queued: its sequences (prompts x n), and for a
    non-streamed answer the size its body may reach (sequences x max_tokens x the JSON a token takes)."""
    first = requests[0]
    seqs = sum(r.params.n for r in requests)
    if seqs > limits.max_seqs_per_request:
        raise ValidationError(
            "n" if len(requests) == 1 else "prompt",
            f"{len(requests)} prompt(s) x n={first.params.n} is {seqs} sequences; one request may add at most "
            f"{limits.max_seqs_per_request}",
        )
    if stream:
        return
    tokens = first.params.max_tokens if first.params.max_tokens is not None else max_model_len
    lp = first.params.logprobs
    per_token = _TOKEN_BYTES + (0 if lp is None else (1 + lp) * _LOGPROB_BYTES)
    estimate = seqs * tokens * per_token
    if estimate > limits.max_response_bytes:
        raise ValidationError(
            first.max_tokens_field,
            f"{seqs} sequence(s) x {tokens} tokens{' with logprobs' if lp is not None else ''} may make a "
            f"{estimate / 2**20:.0f} MiB answer, over this server's {limits.max_response_bytes / 2**20:.0f} MiB for "
            "one that is not streamed: stream it, or ask for fewer tokens, sequences or logprobs",
        )


def check_prompt_tokens(ids: Sequence[int], *, max_model_len: int, vocab_size: int, field: str = "prompt") -> None:
    """A tokenized prompt: non-empty, leaves room for one new token, every id in the vocabulary."""
    if not ids:
        raise ValidationError(field, "empty; it must have at least one token")
    if len(ids) >= max_model_len:
        raise PromptTooLongError(
            field,
            f"{len(ids)} tokens; with room for one new token that exceeds "
            f"max_model_len={max_model_len} (prompts are never truncated)",
        )
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValidationError(field, f"token ids out of range [0, {vocab_size}): {bad[:5]}")


def check_context(
    num_prompt_tokens: int, max_tokens: int | None, *, max_model_len: int, field: str = "max_tokens"
) -> None:
    """Servers refuse a `max_tokens` the context cannot hold (as OpenAI and vLLM do); the Python API stops
    such a request at the context end instead (finish_reason "length")."""
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ValidationError(
            field,
            f"{max_tokens} is too large: this model's context is {max_model_len} tokens "
            f"and the prompt has {num_prompt_tokens} "
            f"({num_prompt_tokens} + {max_tokens} > {max_model_len})",
        )


def check_messages(messages, limits: Limits = Limits(), field: str = "messages") -> tuple[dict, ...]:
    """OpenAI chat messages -> ({"role", "content": str}, ...); content parts of type "text" are joined."""
    if not isinstance(messages, list) or not messages:
        raise ValidationError(field, "must be a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise ValidationError(field, f"{len(messages)} messages exceeds the limit of {limits.max_messages}")
    out, total = [], 0
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise ValidationError(where, "must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise ValidationError(f"{where}.role", f"must be one of {list(CHAT_ROLES)}, got {_short(role)}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValidationError(f"{where}.content[{j}]", "only {type: text, text: str} parts are supported")
                parts.append(check_unicode(part["text"], f"{where}.content[{j}].text"))
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ValidationError(f"{where}.content", f"must be a string, got {type(content).__name__}")
        check_unicode(content, f"{where}.content")
        total += len(content)
        if total > limits.max_prompt_chars:
            raise ValidationError(field, f"more than {limits.max_prompt_chars} characters in all")
        out.append({"role": role, "content": content})
    return tuple(out)


def tokenize_request(
    req: GenerateRequest, tokenizer, *, max_model_len: int, vocab_size: int
) -> tuple[str | None, list[int]]:
    """Render (chat) and tokenize a request's prompt, then check it against the context: (text, token ids)."""
    from models.tokenizer import TokenizerError

    if req.messages is not None:
        try:  # (message contents are text: special-token text in them never becomes a control token)
            text, ids = tokenizer.chat_prompt(list(req.messages), add_generation_prompt=True)
        except TokenizerError as e:
            raise ValidationError("messages", str(e)) from None
    elif req.prompt is not None:
        text, ids = req.prompt, tokenizer.encode(req.prompt)
    else:
        text, ids = None, list(req.prompt_token_ids or ())
    check_prompt_tokens(ids, max_model_len=max_model_len, vocab_size=vocab_size)
    check_context(len(ids), req.params.max_tokens, max_model_len=max_model_len, field=req.max_tokens_field)
    check_logit_bias(req.params, vocab_size)
    return text, ids


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias's token ids must be the model's (SamplingParams checked the rest)."""
    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise ValidationError("logit_bias", f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")


# ---- sampling parameters ----------------------------------------------------------------------------------------


def sampling_params(fields: Mapping, rename: Mapping[str, str] | None = None) -> SamplingParams:
    """SamplingParams from the fields a client set. `rename` maps SamplingParams names to the client's names
    (so an error names what the client sent); fields not set keep the Python API's defaults."""
    rename = rename or {}
    kwargs = {}
    for name in PARAM_FIELDS:
        sent = rename.get(name, name)
        if sent in fields and fields[sent] is not None:
            kwargs[name] = fields[sent]
    if isinstance(kwargs.get("stop_token_ids"), (list, tuple)) and len(kwargs["stop_token_ids"]) > 1024:
        raise ValidationError(rename.get("stop_token_ids", "stop_token_ids"), "too many stop token ids")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        name = field_of(str(e))
        sent = rename.get(name, name)
        message = str(e).split(":", 1)[-1].strip()
        raise ValidationError(sent, f"{message} (got {_short(fields.get(sent))})") from None


# ---- JSON bodies ------------------------------------------------------------------------------------------------


def parse_json_body(raw: bytes, limits: Limits = Limits()) -> dict:
    """Bytes -> a JSON object, bounded; NaN and Infinity literals parse (to be refused by the field's check)."""
    if len(raw) > limits.max_body_bytes:
        raise APIError(TOO_LARGE, f"body: {len(raw)} bytes exceeds the limit of {limits.max_body_bytes}", "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError("body", f"not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise ValidationError("body", "JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints with too many digits
        raise ValidationError("body", f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValidationError("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def _short(value, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."
