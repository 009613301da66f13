"""OpenAI request bodies (/v1/completions, /v1/chat/completions) -> `GenerateRequest`, through the shared
validators. vLLM's extensions are accepted (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, include_stop_str_in_output, priority, request_id, cache_salt) plus `timeout`
(seconds).
Unknown fields are ignored, as OpenAI does; known fields of the wrong type or range are refused by name.
"""

from __future__ import annotations

import dataclasses
import time

from jaxserve.outputs import new_choices

from jaxserve.api.validation import (
    GenerateRequest,
    Limits,
    ValidationError,
    check_messages,
    check_cache_salt,
    check_priority,
    check_prompt_text,
    check_request_id,
    check_timeout,
    check_token_id_list,
    check_user,
    is_int,
    sampling_params,
)

# Fields we cannot honour: refused when set to anything but their neutral value, never silently ignored.
_UNSUPPORTED = {
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    request: GenerateRequest  # the (first) prompt's
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    chat: bool
    more: tuple[GenerateRequest, ...] = ()  # the other prompts of a /v1/completions prompt list

    @property
    def requests(self) -> tuple[GenerateRequest, ...]:
        """Every prompt's request; prompt i's completion k is choice i * n + k of the response."""
        return (self.request, *self.more)


MAX_PROMPTS = 64  # prompts in one /v1/completions list


def parse_completion(body: dict, limits: Limits = Limits(), *, max_prompt_tokens: int) -> OpenAIRequest:
    _common_checks(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise ValidationError("prompt", "required")
    # A list of strings or of token-id lists is several prompts; a list of ints is one prompt's token ids.
    many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    prompts = prompt if many else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise ValidationError("prompt", f"{len(prompts)} prompts exceeds the limit of {MAX_PROMPTS} per request")
    fields = []
    for i, one in enumerate(prompts):
        where = f"prompt[{i}]" if many else "prompt"
        if isinstance(one, list):
            fields.append({"prompt_token_ids": check_token_id_list(one, max_prompt_tokens, where)})
        else:
            fields.append({"prompt": check_prompt_text(one, limits, where)})
    if isinstance(body.get("logprobs"), bool):  # completions: an int (alternatives per token), not a bool
        raise ValidationError("logprobs", "must be an integer in [0, 20] for /v1/completions")
    params = sampling_params(body)
    return _finish(body, limits, params, fields, chat=False)


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
    return _finish(
        body,
        limits,
        params,
        [{"messages": messages}],
        chat=True,
        max_tokens_field=rename.get("max_tokens", "max_tokens"),
    )


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
    check_user(body.get("user"))


def _finish(
    body: dict, limits: Limits, params, prompts: list[dict], *, chat: bool, max_tokens_field: str = "max_tokens"
) -> OpenAIRequest:
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
    rid = None if rid is None else check_request_id(rid, limits)
    requests = [
        GenerateRequest(
            params=params,
            request_id=None if rid is None else rid if len(prompts) == 1 else f"{rid}-{i}",
            model=body.get("model"),
            user=body.get("user"),
            priority=check_priority(priority),
            timeout=check_timeout(body.get("timeout"), limits),
            cache_salt=check_cache_salt(body.get("cache_salt")),
            max_tokens_field=max_tokens_field,
            **prompt,
        )
        for i, prompt in enumerate(prompts)
    ]
    return OpenAIRequest(requests[0], stream, include_usage, chat, tuple(requests[1:]))


# ---- responses ------------------------------------------------------------------------------------------------


def usage(out) -> dict:
    """Token counts of a request (all n completions) from its RequestOutput, of any output kind (a delta
    carries only its new tokens: the count is the request's metrics')."""
    prompt = len(out.prompt_token_ids)
    completion = out.metrics.num_generated_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": out.num_cached_tokens,
    }


def _usage(out) -> dict:
    u = usage(out)
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]},
    }


def _new_logprobs(comp, count: int) -> list[tuple[int, dict]]:
    """(token id, {id: Logprob}) for the last `count` generated tokens of a completion."""
    if comp.logprobs is None or count == 0:
        return []
    return list(zip(comp.token_ids[-count:], comp.logprobs[-count:]))


class CompletionShape:
    """OpenAI response bodies for one request: `final` (whole), or `start` / `chunks` / `usage_chunk` (stream)."""

    object = "text_completion"

    def __init__(self, model: str, rid: str, version: str | None = None):
        """version: the model version that answers (a body field `model_version` next to `model`)."""
        self.model, self.id, self.created, self.version = model, rid, int(time.time()), version
        self.offsets: dict[int, int] = {}
        self.ended: set[int] = set()  # choices whose finish_reason was sent (outputs.new_choices)

    def _envelope(self, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            **({"model_version": self.version} if self.version is not None else {}),
            "choices": choices,
            **extra,
        }

    def _logprobs(self, comp, count: int) -> dict | None:
        if comp.logprobs is None:
            return None
        entries = _new_logprobs(comp, count)
        offset = self.offsets.get(comp.index, 0)
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, alts in entries:
            piece = alts[tid].decoded_token
            lp["tokens"].append(piece)
            lp["token_logprobs"].append(alts[tid].logprob)
            lp["top_logprobs"].append(
                {a.decoded_token: a.logprob for t, a in sorted(alts.items(), key=lambda x: x[1].rank)}
            )
            lp["text_offset"].append(offset)
            offset += len(piece)
        self.offsets[comp.index] = offset
        return lp

    def final(self, out) -> dict:
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": self._logprobs(c, len(c.token_ids)),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        return self._envelope(choices, usage=_usage(out))

    def start(self, out) -> dict | None:
        return None

    def chunks(self, out, include_usage: bool):
        extra = {"usage": None} if include_usage else {}
        for c in new_choices(out, self.ended):
            yield self._envelope(
                [
                    {
                        "index": c.index,
                        "text": c.delta_text,
                        "logprobs": self._logprobs(c, len(c.delta_token_ids)),
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                ],
                **extra,
            )

    def usage_chunk(self, out) -> dict:
        return self._envelope([], usage=_usage(out))


class ChatShape(CompletionShape):
    object = "chat.completion.chunk"

    def _logprobs(self, comp, count: int) -> dict | None:
        if comp.logprobs is None:
            return None
        content = []
        for tid, alts in _new_logprobs(comp, count):
            top = [a for _, a in sorted(alts.items(), key=lambda x: x[1].rank)]
            content.append(
                {
                    "token": alts[tid].decoded_token,
                    "logprob": alts[tid].logprob,
                    "bytes": list(alts[tid].decoded_token.encode()),
                    "top_logprobs": [
                        {"token": a.decoded_token, "logprob": a.logprob, "bytes": list(a.decoded_token.encode())}
                        for a in top
                    ],
                }
            )
        return {"content": content}

    def final(self, out) -> dict:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c, len(c.token_ids)),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        body = self._envelope(choices, usage=_usage(out))
        body["object"] = "chat.completion"
        return body

    def start(self, out) -> dict:
        return self._envelope(
            [
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for c in out.outputs
            ]
        )

    def chunks(self, out, include_usage: bool):
        extra = {"usage": None} if include_usage else {}
        for c in new_choices(out, self.ended):
            yield self._envelope(
                [
                    {
                        "index": c.index,
                        "delta": {"content": c.delta_text} if c.delta_text else {},
                        "logprobs": self._logprobs(c, len(c.delta_token_ids)),
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                ],
                **extra,
            )
