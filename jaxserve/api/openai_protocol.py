"""OpenAI request bodies (/v1/completions, /v1/chat/completions) -> `GenerateRequest`, through the shared
validators. vLLM's extensions are accepted (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, include_stop_str_in_output, priority, request_id) plus `timeout` (seconds).
Unknown fields are ignored, as OpenAI does; known fields of the wrong type or range are refused by name.
"""

from __future__ import annotations

import dataclasses

from jaxserve.api.validation import (
    GenerateRequest, Limits, ValidationError, check_messages, check_priority, check_prompt_text, check_request_id,
    check_timeout, check_token_id_list, is_int, sampling_params,
)  # fmt: skip

# Fields we cannot honour: refused when set to anything but their neutral value, never silently ignored.
_UNSUPPORTED = {
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    request: GenerateRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    chat: bool


def parse_completion(body: dict, limits: Limits = Limits(), *, max_prompt_tokens: int) -> OpenAIRequest:
    _common_checks(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ValidationError("prompt", f"one prompt per request (got {len(prompt)}); send one request each")
        prompt = prompt[0]
    if prompt is None:
        raise ValidationError("prompt", "required")
    if isinstance(prompt, list):
        ids, text = check_token_id_list(prompt, max_prompt_tokens, "prompt"), None
    else:
        ids, text = None, check_prompt_text(prompt, limits, "prompt")
    for name in ("logprobs",):  # completions: an int (alternatives per token), not a bool
        if isinstance(body.get(name), bool):
            raise ValidationError(name, "must be an integer in [0, 20] for /v1/completions")
    params = sampling_params(body)
    return _finish(body, limits, params, prompt=text, prompt_token_ids=ids, chat=False)


def parse_chat(body: dict, limits: Limits = Limits()) -> OpenAIRequest:
    _common_checks(body)
    messages = check_messages(body.get("messages"), limits)
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ValidationError("logprobs", "must be a boolean for /v1/chat/completions")
    if top is not None and not logprobs:
        raise ValidationError("top_logprobs", "needs logprobs: true")
    fields = dict(body)
    fields["logprobs"] = (top if top is not None else 0) if logprobs else None
    rename = {}
    if body.get("max_completion_tokens") is not None:
        rename["max_tokens"] = "max_completion_tokens"
    elif body.get("max_tokens") is None:
        fields["max_tokens"] = None  # chat: as many as the context holds
    if top is not None:
        fields["top_logprobs"] = top
        rename["logprobs"] = "top_logprobs"
    params = sampling_params(fields, rename)
    return _finish(body, limits, params, messages=messages, chat=True,
                   max_tokens_field=rename.get("max_tokens", "max_tokens"))


def _common_checks(body: dict) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationError("model", "must be a string")
    for name, neutral in _UNSUPPORTED.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise ValidationError(name, "not supported by this server")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ValidationError("best_of", "not supported (must equal n)")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ValidationError("user", "must be a string")


def _finish(body: dict, limits: Limits, params, *, chat: bool, **prompt) -> OpenAIRequest:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ValidationError("stream", "must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ValidationError("stream_options", "only allowed with stream: true")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ValidationError("stream_options", "must be {include_usage: bool}")
        include_usage = options.get("include_usage", False)
    rid = body.get("request_id")
    priority = body.get("priority", 0)
    if not is_int(priority):
        raise ValidationError("priority", "must be an integer")
    request = GenerateRequest(
        params=params,
        request_id=None if rid is None else check_request_id(rid, limits),
        model=body.get("model"),
        priority=check_priority(priority),
        timeout=check_timeout(body.get("timeout"), limits),
        **prompt,
    )
    return OpenAIRequest(request, stream, include_usage, chat)
