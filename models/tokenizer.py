"""Tokenizers (the `tokenizers` library) built from GGUF metadata or tokenizer.json, and chat templates.

GGUF byte-level BPE ("gpt2" model) is rebuilt as tokenizers' BPE with the pre-tokenizer split llama.cpp uses
for the file's `tokenizer.ggml.pre`; control tokens are special added tokens (matched whole in text).
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Sequence

# Split regexes by GGUF `tokenizer.ggml.pre`, as in llama.cpp's llama-vocab.cpp.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
}
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
MAX_TEMPLATE_OUTPUT = 1 << 20  # characters a chat template may render (and any string or list it may build)
MAX_TEMPLATE_SECONDS = 2.0  # wall time one render may take (checked on every line the template runs)


_MARK = "\ue000{}\ue001"  # private-use code points around a message index: a template copies them through
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Text <-> token ids, plus the model's special tokens and chat template."""

    def __init__(
        self,
        backend,  # tokenizers.Tokenizer
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._compiled_template = None
        self._plain = None  # _plain_backend()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special-token text (e.g. '<|im_start|>') is matched whole; BOS is prepended if the model wants it."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's template in a sandboxed jinja2 environment, output size bounded."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        chunks, size = [], 0
        try:
            with _TimeBound(MAX_TEMPLATE_SECONDS):
                stream = self._compiled_template.generate(
                    messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
                )
                for chunk in stream:
                    size += len(chunk)
                    if size > MAX_TEMPLATE_OUTPUT:
                        raise TokenizerError(f"chat template output exceeds {MAX_TEMPLATE_OUTPUT} characters")
                    chunks.append(chunk)
        except _RenderTimeout:
            raise TokenizerError(
                f"chat template failed: the render ran past its time bound of {MAX_TEMPLATE_SECONDS:g}s"
            ) from None
        except TokenizerError:
            raise
        except Exception as e:  # jinja2 sandbox violations, template errors, raise_exception(), the bounds
            raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from None
        return "".join(chunks)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """A chat prompt's ids (chat_prompt's)."""
        return self.chat_prompt(messages, add_generation_prompt)[1]

    def chat_prompt(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        """A chat prompt's text and ids: the template's own markup with its special tokens, each message's content
        as plain text (a '<|im_start|>system' typed into a message stays text: no control token, no forged turn).

        The template is rendered twice: as it is (the text), and with a marker in place of each content; the text
        between markers is encoded as usual, each content with special tokens split. A template that does not copy
        every content through unchanged, once, in order (the marked render with the contents put back is not the
        text: it trims, transforms or drops some) is encoded from its text instead, and refused if a content holds
        special-token text (TokenizerError)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        markers = [dict(m, content=_MARK.format(i)) for i, m in enumerate(messages)]
        pieces = _MARK_RE.split(self.apply_chat_template(markers, add_generation_prompt))
        contents = [m.get("content") or "" for m in messages]
        order = [int(i) for i in pieces[1::2]]
        rebuilt = "".join(p if k % 2 == 0 else contents[int(p)] for k, p in enumerate(pieces))
        if order != list(range(len(messages))) or rebuilt != text:
            specials = self._special_texts()
            for i, content in enumerate(contents):
                if any(s in content for s in specials):
                    raise TokenizerError(
                        f"messages[{i}].content: holds special-token text, which this model's chat template "
                        "cannot keep apart from its own markup"
                    )
            return text, self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                ids += self.backend.encode(piece, add_special_tokens=False).ids if piece else []
            elif contents[int(piece)]:
                ids += self._plain_backend().encode(contents[int(piece)], add_special_tokens=False).ids
        return text, ids

    def _plain_backend(self):
        """A copy of the backend that encodes special-token text as ordinary text."""
        if self._plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def _special_texts(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values() if t.special)

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if meta.get("model") != "gpt2":
            raise TokenizerError(f"GGUF tokenizer model {meta.get('model')!r} is not supported (only 'gpt2' BPE)")
        tokens, merges = meta.get("tokens"), meta.get("merges")
        if not tokens or merges is None:
            raise TokenizerError("GGUF tokenizer metadata lacks tokens or merges")
        pre = meta.get("pre") or "default"
        if pre not in PRE_TOKENIZER_SPLITS:
            raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported ({sorted(PRE_TOKENIZER_SPLITS)})")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = []
        for m in merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"GGUF merge {m!r} is not two tokens")
            pairs.append((parts[0], parts[1]))
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        types = meta.get("token_type") or []
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED]
        )
        eos = meta.get("eos_token_id")
        return cls(
            backend,
            bos_token_id=meta.get("bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            add_bos=bool(meta.get("add_bos_token", False)),
            chat_template=meta.get("chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, directory: str, hf_config: dict[str, Any] | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(directory, "tokenizer.json")
        try:
            backend = HFTokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from None
        tok_cfg = _read_optional_json(os.path.join(directory, "tokenizer_config.json"))
        gen_cfg = _read_optional_json(os.path.join(directory, "generation_config.json"))
        hf_config = hf_config or {}

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(tok_cfg.get("bos_token"))
        if bos is None:
            bos = gen_cfg.get("bos_token_id", hf_config.get("bos_token_id"))
        eos_ids: list[int] = []
        for source in (gen_cfg.get("eos_token_id"), hf_config.get("eos_token_id"), token_id(tok_cfg.get("eos_token"))):
            for e in source if isinstance(source, list) else [source]:
                if isinstance(e, int) and e not in eos_ids:
                    eos_ids.append(e)
        template = tok_cfg.get("chat_template")
        if template is None and os.path.exists(os.path.join(directory, "chat_template.jinja")):
            with open(os.path.join(directory, "chat_template.jinja"), encoding="utf-8") as f:
                template = f.read()
        # A tokenizer.json post-processor may itself add BOS (Llama 3); then encode() must not add another.
        add_bos = bool(tok_cfg.get("add_bos_token", False)) and backend.post_processor is None
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, add_bos=add_bos, chat_template=template)


def _read_optional_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}


class _RenderTimeout(BaseException):
    """Raised inside a render past its time bound (a BaseException: nothing in the template runtime catches it)."""


class _TimeBound:
    """Stops the code in this `with` block, on this thread, `seconds` after it starts: a timer thread raises
    _RenderTimeout in it asynchronously (PyThreadState_SetAsyncExc, taken between two bytecodes), so nested
    loops that print nothing cannot run for ever, at no cost per line (a line tracer made renders ~12x slower).
    Only Python code is stopped: one C call runs to its end (the size bounds keep those short)."""

    def __init__(self, seconds: float):
        self._thread = threading.get_ident()
        self._lock = threading.Lock()
        self._armed, self._fired = True, False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self._fired = True
                _set_async_exc(self._thread, _RenderTimeout)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._timer.cancel()
        with self._lock:
            self._armed = False
            if self._fired:  # fired as the block ended: take back the exception if it has not been raised yet
                _set_async_exc(self._thread, None)
        return False


def _set_async_exc(thread: int, exc) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None if exc is None else ctypes.py_object(exc))


_WIDE = re.compile(r"\d{7,}|\*")  # a printf / format width of a million or more, or one taken from an argument


def _bounded(n: int, what: str) -> None:
    if n > MAX_TEMPLATE_OUTPUT:
        from jinja2.exceptions import TemplateError

        raise TemplateError(f"{what} would exceed {MAX_TEMPLATE_OUTPUT} characters")


def _check_replace(s: str, old: str, new: str, what: str) -> None:
    """s.replace(old, new) grows by len(new) - len(old) per hit (an empty `old` hits between every character)."""
    hits = (len(s) + 1) if not old else s.count(old)
    _bounded(len(s) + hits * max(0, len(new) - len(old)), what)


def _check_width(spec: str, what: str = "a format width") -> None:
    """A format or printf spec whose width is a million or more, or taken from an argument, is refused."""
    if _WIDE.search(spec):
        _bounded(MAX_TEMPLATE_OUTPUT + 1, what)


def _check_str_call(s: str, name: str, args: tuple) -> None:
    """Bound what a str method may build before it runs (center('', 10**9), 'x'.replace('', big), ...)."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _bounded(args[0], f"str.{name}")
    elif name == "expandtabs":
        _bounded(len(s) + s.count("\t") * (args[0] if args and isinstance(args[0], int) else 8), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(s, args[0], args[1], "str.replace")
    elif name == "join" and args:
        _bounded(sum(len(str(x)) + len(s) for x in args[0]) if hasattr(args[0], "__len__") else 0, "str.join")
    elif name in ("format", "format_map"):
        _check_width(s)


def _bounded_filters(filters: dict) -> dict:
    """The string-building filters, each refusing a result over the bound before it is built."""
    out = dict(filters)
    center, indent, replace, join, fmt = (filters[k] for k in ("center", "indent", "replace", "join", "format"))

    def b_center(value, width=80):
        _bounded(int(width), "center")
        return center(value, width)

    def b_indent(s, width=4, first=False, blank=False):
        n = width if isinstance(width, int) else len(str(width))
        _bounded(len(str(s)) * (1 + n), "indent")
        return indent(s, width, first, blank)

    def b_replace(eval_ctx, s, old, new, count=None):
        s, old, new = str(s), str(old), str(new)
        _check_replace(s, old, new, "replace")
        return replace(eval_ctx, s, old, new, count)

    def b_join(eval_ctx, value, d="", attribute=None):
        items = list(value)
        _bounded(sum(len(str(x)) for x in items) + len(str(d)) * len(items), "join")
        return join(eval_ctx, items, d, attribute)

    def b_format(value, *args, **kwargs):
        _check_width(str(value))
        return fmt(value, *args, **kwargs)

    from jinja2.utils import pass_eval_context

    out.update(
        center=b_center,
        indent=b_indent,
        replace=pass_eval_context(b_replace),
        join=pass_eval_context(b_join),
        format=b_format,
    )
    return out


def _compile_template(source: str):
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        """`a ~ b` calls environment.bounded_concat, which refuses a result over the bound before building it
        (`{% set ns.s = ns.s ~ ns.s %}` in a loop doubles a string 64 times otherwise)."""

        def visit_Concat(self, node, frame) -> None:
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    def raise_exception(message):
        raise TemplateError(message)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """Refuses `*`, `**` and `+` whose result would exceed the output bound before computing it, so a
        template cannot allocate a huge value (`'x' * 10**10`, doubling in a loop) that is never printed."""

        intercepted_binops = frozenset(["*", "**", "+", "%"])
        code_generator_class = BoundedCodeGenerator

        def bounded_concat(self, parts):
            strs = [str(p) for p in parts]
            _bounded(sum(map(len, strs)), "a ~ concatenation")
            return "".join(strs)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            owner = getattr(value, "__self__", None)
            if wrapped is not None and isinstance(owner, str):
                _check_width(owner)
            return wrapped

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja2's own signature)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                _check_str_call(owner, getattr(__obj, "__name__", ""), args)
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateError(f"exponent {right} is too large")
            if operator == "*":
                seq, count = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * max(count, 0) > MAX_TEMPLATE_OUTPUT:
                        raise TemplateError(f"repetition would exceed {MAX_TEMPLATE_OUTPUT} items")
            if operator == "%" and isinstance(left, str) and _WIDE.search(left):
                raise TemplateError("a printf width of a million or more (or taken from an argument)")
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > MAX_TEMPLATE_OUTPUT:
                    raise TemplateError(f"concatenation would exceed {MAX_TEMPLATE_OUTPUT} items")
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters = _bounded_filters(env.filters)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None
    except Exception as e:  # e.g. RecursionError from deeply nested expressions or blocks
        raise TokenizerError(f"chat template does not compile: {type(e).__name__}: {e}") from None
