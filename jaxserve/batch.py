"""Batch jobs: JSONL in, JSONL out, through continuous batching; resumable; sharded over the hosts of a slice.

    jaxserve batch --input in.jsonl --output out.jsonl [--shard auto | i/n] [engine flags]
    jaxserve batch merge --input in.jsonl --output out.jsonl          # joins out.jsonl.shard-*-of-n

Input lines, either form (both may be mixed in one file):
    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}   (OpenAI batch)
    {"id": "a", "prompt": "..." | [ids] | "messages": [...], "max_tokens": 64, ...SamplingParams fields}
Output lines follow the input's form: OpenAI batch output objects, or {"id", "text", "finish_reason", "usage"}
(plus "token_ids" with "return_token_ids": true, "choices" when n > 1). Lines are written as requests finish,
not in input order (merge restores input order). Bad lines (not JSON, unknown fields, invalid parameters,
duplicate ids) go to the errors file (out.errors.jsonl) with their line number and the reason; the job goes on.

Resuming: the output file is the job's only state. On start the torn tail a kill may leave is cut off, ids
already written are skipped and error lines already reported are not reported again; outputs are appended in
whole lines, flushed and fsynced, so after `kill -9` at any moment a rerun gives every id exactly once.

Sharding: line -> shard by a hash of its id (so duplicates meet in one shard), shard i of n writes
out.jsonl.shard-i-of-n. The input is read lazily and the engine is fed a bounded number of requests ahead.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import sys
import time
import uuid
import zlib
from collections.abc import Iterator

from jaxserve.api.errors import INTERNAL, APIError, to_api_error
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.api.openai_protocol import ChatShape, CompletionShape, parse_chat, parse_completion, usage
from jaxserve.api.validation import (
    PARAM_FIELDS,
    GenerateRequest,
    Limits,
    ValidationError,
    check_messages,
    check_cache_salt,
    check_priority,
    check_prompt_text,
    check_request_size,
    check_token_id_list,
    parse_json_body,
    sampling_params,
    tokenize_request,
)

log = logging.getLogger("jaxserve.batch")

OPENAI_LINE_FIELDS = {"custom_id", "method", "url", "body"}
OPENAI_URLS = {"/v1/completions": False, "/v1/chat/completions": True}  # url -> chat?
PLAIN_FIELDS = {"id", "prompt", "messages", "priority", "cache_salt", "return_token_ids", "model", *PARAM_FIELDS}


@dataclasses.dataclass
class Item:
    """One good input line."""

    line: int  # 1-based
    key: str  # its id (custom_id or id)
    openai: bool  # the OpenAI batch form (else plain)
    chat: bool
    request: GenerateRequest
    return_token_ids: bool = False


class LineError(Exception):
    def __init__(self, line: int, key: str | None, error: APIError):
        super().__init__(error.message)
        self.line, self.key, self.error = line, key, error


# ---- input ------------------------------------------------------------------------------------------------------


def line_key(body: dict) -> str | None:
    key = body.get("custom_id", body.get("id"))
    return key if isinstance(key, str) and key else None


def parse_line(raw: bytes, line: int, limits: Limits, max_model_len: int) -> Item:
    """One JSONL line -> Item, or LineError naming the field."""
    key = None
    try:
        body = parse_json_body(raw, limits)
        key = line_key(body)
        if "custom_id" in body:
            return _parse_openai(body, line, limits, max_model_len)
        return _parse_plain(body, line, limits, max_model_len)
    except APIError as e:
        raise LineError(line, key, e) from None


def _check_key(value, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 512:
        raise ValidationError(field, "must be a non-empty string of at most 512 characters")
    return value


def _parse_openai(body: dict, line: int, limits: Limits, max_model_len: int) -> Item:
    unknown = sorted(set(body) - OPENAI_LINE_FIELDS)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field(s) {unknown}; a batch line has {sorted(OPENAI_LINE_FIELDS)}")
    key = _check_key(body["custom_id"], "custom_id")
    if body.get("method", "POST") != "POST":
        raise ValidationError("method", "must be POST")
    url = body.get("url")
    if url not in OPENAI_URLS:
        raise ValidationError("url", f"must be one of {sorted(OPENAI_URLS)}, got {url!r}")
    req_body = body.get("body")
    if not isinstance(req_body, dict):
        raise ValidationError("body", "must be an object (the request body)")
    if req_body.get("stream"):
        raise ValidationError("body.stream", "streaming is not supported in a batch")
    chat = OPENAI_URLS[url]
    if chat:
        parsed = parse_chat(req_body, limits)
    else:
        parsed = parse_completion(req_body, limits, max_prompt_tokens=max_model_len)
    if parsed.more:
        raise ValidationError("prompt", "one prompt per batch line (a list of prompts is several lines)")
    want_ids = req_body.get("return_token_ids", False)
    if not isinstance(want_ids, bool):
        raise ValidationError("return_token_ids", "must be a boolean")
    return Item(line, key, True, chat, parsed.request, want_ids)


def _parse_plain(body: dict, line: int, limits: Limits, max_model_len: int) -> Item:
    unknown = sorted(set(body) - PLAIN_FIELDS)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field(s) {unknown}")
    key = _check_key(body.get("id"), "id")
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise ValidationError("prompt", "set exactly one of prompt or messages")
    prompt = ids = messages = None
    if has_messages:
        messages = check_messages(body["messages"], limits)
    elif isinstance(body["prompt"], list):
        ids = check_token_id_list(body["prompt"], max_model_len)
    else:
        prompt = check_prompt_text(body["prompt"], limits)
    want_ids = body.get("return_token_ids", False)
    if not isinstance(want_ids, bool):
        raise ValidationError("return_token_ids", "must be a boolean")
    request = GenerateRequest(
        params=sampling_params(body),
        prompt=prompt,
        prompt_token_ids=ids,
        messages=messages,
        priority=check_priority(body.get("priority", 0)),
        cache_salt=check_cache_salt(body.get("cache_salt")),
    )
    return Item(line, key, False, messages is not None, request, want_ids)


def shard_of(key: str | None, line: int, num_shards: int) -> int:
    """Lines with an id go by a hash of it (duplicates meet in one shard), the rest by line number."""
    if num_shards == 1:
        return 0
    return (zlib.crc32(key.encode()) if key is not None else line) % num_shards


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


# ---- output -----------------------------------------------------------------------------------------------------


class OutputLockedError(ValueError):
    """Another job holds the output file."""


def _lock(path: str):
    """An exclusive, non-blocking lock on `path` (created if missing), held while the returned file is open."""
    import fcntl

    f = open(path, "ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OutputLockedError(f"--output: {path} is being written by another batch job (it holds the lock)") from None
    return f


def errors_path_for(output: str) -> str:
    """out.jsonl -> out.errors.jsonl (out.jsonl.shard-0-of-2 -> out.errors.jsonl.shard-0-of-2)."""
    m = re.match(r"^(.*?)(\.shard-\d+-of-\d+)?$", output)
    base, shard = m.group(1), m.group(2) or ""
    root, ext = os.path.splitext(base)
    return f"{root}.errors{ext or '.jsonl'}{shard}"


def shard_path(output: str, index: int, count: int) -> str:
    return output if count == 1 else f"{output}.shard-{index}-of-{count}"


class Appender:
    """Appends whole lines: buffered, then written, flushed and fsynced together."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "ab")
        self._pending: list[bytes] = []

    def add(self, record: dict) -> None:
        self._pending.append(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def flush(self) -> None:
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._pending.clear()
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self.flush()
        self._file.close()


def cut_torn_tail(path: str, block: int = 1 << 16) -> None:
    """Cut a last line that has no newline (a kill mid-write) off the file, reading backwards from the end."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        if keep < end:
            f.truncate(keep)


def _is_record(record, errors: bool) -> bool:
    """An output record names its request by a non-empty string id (custom_id in the OpenAI form); an error
    record its input line by a positive int."""
    if not isinstance(record, dict):
        return False
    if errors:
        line = record.get("line")
        return isinstance(line, int) and not isinstance(line, bool) and line > 0
    key = record_key(record)
    return isinstance(key, str) and bool(key)


def iter_records(path: str, corrupted: list[int] | None = None, *, errors: bool = False) -> Iterator[tuple[int, dict]]:
    """(byte offset, record) of each complete line of an output file (errors=True: an errors file) that holds a
    record of its kind, streamed; a torn tail is cut off first. Other lines (not JSON, NUL bytes, null, no string
    id, an error without its line) are corrupted: skipped, never fatal, their line numbers appended to `corrupted`."""
    if not os.path.exists(path):
        return
    cut_torn_tail(path)
    with open(path, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if _is_record(record, errors):
                yield offset, record
            elif corrupted is not None:
                corrupted.append(number)
            offset += len(raw)


def recover(path: str, *, errors: bool = False) -> list[dict]:
    """Every complete record of an output file, or an errors file (small files: tests, summaries)."""
    return [record for _, record in iter_records(path, errors=errors)]


def output_record(item: Item, out, model: str, version: str | None = None) -> dict:
    """One result line; `version`: the model version that answered (written as `model_version`)."""
    if item.openai:
        shape = (ChatShape if item.chat else CompletionShape)(model, f"batch-{item.key}", version)
        body = shape.final(out)
        if item.return_token_ids:
            body["prompt_token_ids"] = list(out.prompt_token_ids)
            for choice, comp in zip(body["choices"], out.outputs):
                choice["token_ids"] = list(comp.token_ids)
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": item.key,
            "response": {"status_code": 200, "request_id": f"batch-{item.key}", "body": body},
            "error": None,
        }
    first = out.outputs[0]
    record = {"id": item.key, "text": first.text, "finish_reason": first.finish_reason, "usage": usage(out)}
    if version is not None:
        record["model_version"] = version
    if item.return_token_ids:
        record["token_ids"] = list(first.token_ids)
    if len(out.outputs) > 1:
        record["choices"] = [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                **({"token_ids": list(c.token_ids)} if item.return_token_ids else {}),
            }
            for c in out.outputs
        ]
    return record


def error_record(line: int, key: str | None, err: APIError, openai: bool) -> dict:
    error = {"message": err.message, "param": err.field, "type": err.kind.openai_type}
    if openai:
        return {
            "line": line,
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": key,
            "response": {"status_code": err.kind.http_status, "body": {"error": error}},
            "error": error,
        }
    return {"line": line, "id": key, "error": error}


def record_key(record: dict) -> str | None:
    return record["custom_id"] if "custom_id" in record else record.get("id")


# ---- the job ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    done: int = 0  # requests finished in this run
    skipped: int = 0  # ids already in the output (a resumed run)
    errors: int = 0  # lines that failed in this run
    corrupted: int = 0  # lines of the output / errors files found unreadable when this run started (skipped)
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.output_tokens / self.seconds if self.seconds else 0.0
        return (
            f"{self.done} done, {self.skipped} already done (skipped), {self.errors} errors; "
            f"{self.output_tokens} output tokens in {self.seconds:.1f}s = {rate:.1f} tok/s, "
            f"{self.done / self.seconds if self.seconds else 0.0:.2f} req/s"
            + (f"; {self.corrupted} corrupted output lines skipped" if self.corrupted else "")
        )


class BatchJob:
    """Runs one shard of an input file through an LLMEngine (synchronously, on this thread)."""

    def __init__(
        self,
        engine,
        input_path: str,
        output_path: str,
        *,
        shard: tuple[int, int] = (0, 1),
        limits: Limits = Limits(),
        model_name: str = "",
        model_version: str | None = None,
        flush_interval: float = 1.0,
        progress: bool = True,
    ):
        index, count = shard
        if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
            raise ValueError(f"shard={shard!r}: need 0 <= index < count")
        self.engine = engine
        self.input_path = input_path
        self.shard = (index, count)
        self.output_path = shard_path(output_path, index, count)
        self.errors_path = errors_path_for(self.output_path)
        self.limits = limits
        self.model_name = model_name
        self.model_version = model_version
        self.flush_interval = flush_interval
        self.progress = progress
        self.card = card = engine.model_card()
        # Requests handed to the engine ahead of the running ones: enough to keep every step full, bounded so a
        # file larger than memory streams through.
        self.max_pending = min(card.max_waiting_requests, 2 * card.max_num_seqs + 16)

    def run(self) -> Summary:
        from tqdm import tqdm

        lock = _lock(self.output_path)  # one job per output file, held until this run ends
        corrupted: list[int] = []
        corrupted_errors: list[int] = []
        done_ids = {record_key(r) for _, r in iter_records(self.output_path, corrupted)}
        reported_lines = {r["line"] for _, r in iter_records(self.errors_path, corrupted_errors, errors=True)}
        for path, lines in ((self.output_path, corrupted), (self.errors_path, corrupted_errors)):
            if lines:
                log.warning(
                    "%s: %d corrupted line(s) skipped (%s): their ids are not done",
                    path,
                    len(lines),
                    ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else ""),
                )
        out, errs = Appender(self.output_path), Appender(self.errors_path)
        summary = Summary(corrupted=len(corrupted) + len(corrupted_errors))
        engine, max_len = self.engine, self.engine.max_model_len
        vocab = self.card.vocab_size
        seen: dict[str, int] = {}  # id -> its first line
        pending: dict[str, Item] = {}  # engine request id -> item
        lines = self._my_lines()
        exhausted = False
        start = last_flush = time.perf_counter()
        # The total is known cheaply only for an unsharded job (a shard's share needs every line's id).
        total = sum(1 for _ in read_lines(self.input_path)) if self.progress and self.shard[1] == 1 else None
        bar = tqdm(
            desc=f"batch {self.shard[0]}/{self.shard[1]}",
            total=total,
            unit="req",
            disable=not self.progress,
            file=sys.stderr,
        )

        def fail(line: int, key: str | None, err: APIError, openai: bool) -> None:
            if line not in reported_lines:
                errs.add(error_record(line, key, err, openai))
                summary.errors += 1

        try:
            while True:
                while not exhausted and len(pending) < self.max_pending:
                    try:
                        number, raw = next(lines)
                    except StopIteration:
                        exhausted = True
                        break
                    try:
                        item = parse_line(raw, number, self.limits, max_len)
                    except LineError as e:
                        fail(e.line, e.key, e.error, b'"custom_id"' in raw)
                        continue
                    if item.key in seen:
                        fail(
                            number,
                            item.key,
                            ValidationError(
                                "id" if not item.openai else "custom_id",
                                f"duplicate id {item.key!r} (first on line {seen[item.key]})",
                            ),
                            item.openai,
                        )
                        continue
                    seen[item.key] = number
                    if item.key in done_ids:
                        summary.skipped += 1
                        continue
                    try:
                        check_request_size([item.request], stream=False, limits=self.limits, max_model_len=max_len)
                        _, ids = tokenize_request(
                            item.request, engine.tokenizer, max_model_len=max_len, vocab_size=vocab
                        )
                        rid = f"batch-{number}"
                        engine.add_request(
                            rid,
                            ids,
                            dataclasses.replace(item.request.params, output_kind=RequestOutputKind.FINAL_ONLY),
                            priority=item.request.priority,
                            cache_salt=item.request.cache_salt,
                        )
                    except Exception as e:  # validation; anything else is this line's failure, not the job's
                        fail(number, item.key, to_api_error(e), item.openai)
                        continue
                    pending[rid] = item
                if not pending:
                    break
                for result in engine.step():
                    if not result.finished:
                        continue
                    item = pending.pop(result.request_id)
                    if result.error is not None:
                        fail(item.line, item.key, APIError(INTERNAL, result.error), item.openai)
                        continue
                    out.add(output_record(item, result, self.model_name, self.model_version))
                    summary.done += 1
                    summary.prompt_tokens += len(result.prompt_token_ids)
                    summary.output_tokens += sum(len(c.token_ids) for c in result.outputs)
                    bar.set_postfix_str(
                        f"{summary.output_tokens / (time.perf_counter() - start):.1f} tok/s, {summary.errors} errors",
                        refresh=False,
                    )
                    bar.update(1)
                now = time.perf_counter()
                if now - last_flush >= self.flush_interval:
                    out.flush()
                    errs.flush()
                    last_flush = now
        finally:
            for rid in list(pending):  # an exception or interrupt: leave the engine clean
                engine.abort_request(rid)
            out.close()
            errs.close()
            bar.close()
            lock.close()
        summary.seconds = time.perf_counter() - start
        return summary

    def _my_lines(self) -> Iterator[tuple[int, bytes]]:
        index, count = self.shard
        for number, raw in read_lines(self.input_path):
            if count == 1 or shard_of(_quick_key(raw), number, count) == index:
                yield number, raw


def _quick_key(raw: bytes) -> str | None:
    """The id a line would be sharded by (None when it has none: not JSON, no string id)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return line_key(body) if isinstance(body, dict) else None


# ---- merge ------------------------------------------------------------------------------------------------------


def find_shards(output_path: str) -> list[str]:
    """out.jsonl.shard-i-of-n for i in 0..n-1 (all n must be there)."""
    found = sorted(glob.glob(glob.escape(output_path) + ".shard-*-of-*"))
    counts = {int(m.group(1)) for p in found if (m := re.search(r"\.shard-\d+-of-(\d+)$", p))}
    if len(counts) != 1:
        raise ValueError(f"--output: expected one set of {output_path}.shard-i-of-n files, found {found or 'none'}")
    n = counts.pop()
    paths = [shard_path(output_path, i, n) for i in range(n)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ValueError(f"--output: shard files missing: {missing}")
    return paths


def merge(input_path: str, output_path: str) -> tuple[int, int, list[int]]:
    """Join the shard outputs (and their errors) into output_path / its errors file, in input order.
    Returns (records, error lines, input lines that have neither: work still to do). Holds an index of the
    records (id -> file, offset), not the records."""
    shards = find_shards(output_path)
    index: dict[str, tuple[int, int]] = {}
    for k, path in enumerate(shards):
        for offset, record in iter_records(path):
            index.setdefault(record_key(record), (k, offset))
    errors: dict[int, tuple[int, int]] = {}
    for k, path in enumerate(shards):
        for offset, record in iter_records(errors_path_for(path), errors=True):
            errors[record["line"]] = (k, offset)
    written, missing, first = 0, [], set()
    tmp_out, tmp_err = output_path + ".merging", errors_path_for(output_path) + ".merging"
    outputs = [open(p, "rb") for p in shards]
    error_files = [open(errors_path_for(p), "rb") if os.path.exists(errors_path_for(p)) else None for p in shards]

    def copy(files, where, dest) -> None:
        f = files[where[0]]
        f.seek(where[1])
        dest.write(f.readline())

    try:
        with open(tmp_out, "wb") as out:
            for number, raw in read_lines(input_path):
                key = _quick_key(raw)
                if key is not None and key in index and key not in first:
                    first.add(key)
                    copy(outputs, index[key], out)
                    written += 1
                elif number not in errors:
                    missing.append(number)
        with open(tmp_err, "wb") as err:
            for number in sorted(errors):
                copy(error_files, errors[number], err)
    finally:
        for f in outputs + error_files:
            if f is not None:
                f.close()
    os.replace(tmp_out, output_path)
    os.replace(tmp_err, errors_path_for(output_path))
    return written, len(errors), missing
